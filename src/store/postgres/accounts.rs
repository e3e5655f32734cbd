//! The accounts of [`PostgresUsageStore`]: saving them (with their audit entry), reading them,
//! the cache of accounts that new usage events are placed with, and the condition by which a
//! record checks that the account it was placed with is still the stored one.

use std::sync::Arc;

use super::PostgresUsageStore;
use super::rows::{ACCOUNT_COLUMNS, PgQuery, account_from, db, generic};
use crate::domain::{CustomerId, UserId};
use crate::store::{Account, AuditEvent, StoreError, UsageStore};

/// Accounts as this store last read or saved them, for placing new events without a read of
/// their own: the record then checks, in its own statement, that the account it was placed
/// with is still the stored one. Bounded: the shards' bounds add up to the capacity, and a full
/// shard lets go of the account it has kept longest.
#[derive(Debug)]
pub(super) struct AccountCache {
    /// Each shard with the most accounts it keeps.
    shards: Box<[(std::sync::Mutex<CacheShard>, usize)]>,
    hasher: foldhash::fast::RandomState,
}

/// One shard of the account cache: the accounts, and their users in the order they were first
/// kept, oldest first (exactly the users of `accounts`).
#[derive(Debug, Default)]
struct CacheShard {
    accounts: crate::store::id_map::IdMap<UserId, Account>,
    order: std::collections::VecDeque<UserId>,
}

impl CacheShard {
    /// Keeps `account`, in the place its user already has if any, and lets go of the oldest
    /// accounts beyond `bound`.
    fn put(&mut self, account: Account, bound: usize) {
        // Read, and so cloned, for every event of the user.
        let account = account.with_own_plan_ids();
        let user = account.user_id.clone();
        if self.accounts.insert(user.clone(), account).is_some() {
            return;
        }
        self.order.push_back(user);
        while self.accounts.len() > bound {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.accounts.remove(&oldest);
        }
    }

    fn forget(&mut self, user: &UserId) {
        // Rare (an account that changed elsewhere, a failed save): a walk of the shard is fine.
        if self.accounts.remove(user).is_some() {
            self.order.retain(|kept| kept != user);
        }
    }
}

impl AccountCache {
    const SHARDS: usize = 16;

    /// A cache of at most `capacity` accounts: the shards share it out, the first ones one more
    /// than the others when it does not divide evenly.
    pub(super) fn new(capacity: usize) -> AccountCache {
        let (each, more) = (capacity / Self::SHARDS, capacity % Self::SHARDS);
        AccountCache {
            shards: (0..Self::SHARDS)
                .map(|i| (std::sync::Mutex::default(), each + usize::from(i < more)))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// The user's shard, locked, with its bound; `None` for a shard that keeps nothing.
    fn shard(&self, user: &UserId) -> Option<(std::sync::MutexGuard<'_, CacheShard>, usize)> {
        let (shard, bound) = &self.shards[crate::store::shard_index(&self.hasher, user, Self::SHARDS)];
        // A map of copies: one poisoned by a panic elsewhere is still a valid cache.
        (*bound > 0).then(|| (shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner), *bound))
    }

    pub(super) fn get(&self, user: &UserId) -> Option<Account> {
        self.shard(user)?.0.accounts.get(user).cloned()
    }

    pub(super) fn put(&self, account: Account) {
        if let Some((mut shard, bound)) = self.shard(&account.user_id) {
            shard.put(account, bound);
        }
    }

    pub(super) fn forget(&self, user: &UserId) {
        if let Some((mut shard, _)) = self.shard(user) {
            shard.forget(user);
        }
    }
}

/// Accounts a store keeps for placing events, unless told otherwise
/// ([`PostgresUsageStore::with_account_cache`]).
pub(super) const ACCOUNT_CACHE: usize = 10_000;

/// The condition, on `token_billing_accounts` as `a`, that the account a record was placed with
/// (bound from `$n` on: customer, plan, earlier plans, subscription, last change) is still the
/// stored one.
pub(super) fn account_unchanged(first: usize) -> String {
    format!(
        "a.customer_id IS NOT DISTINCT FROM ${} AND a.plan_id = ${} AND a.earlier_plans = ${}::jsonb
         AND a.subscription_id IS NOT DISTINCT FROM ${} AND a.updated_at = ${}",
        first,
        first + 1,
        first + 2,
        first + 3,
        first + 4
    )
}

/// An account's row, its columns bound as `$1` - `$8` (see `save_account`).
const INSERT_ACCOUNT: &str = "INSERT INTO token_billing_accounts
        (user_id, customer_id, plan_id, earlier_plans, subscription_id, created_at, updated_at, limits)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Binds the account a record was placed with, for [`account_unchanged`]: nulls when there is
/// none (the condition is then not asked).
pub(super) fn bind_account<'q>(query: PgQuery<'q>, account: Option<&'q Account>) -> PgQuery<'q> {
    query
        .bind(account.and_then(|a| a.customer_id.as_ref().map(CustomerId::as_str)))
        .bind(account.map(|a| a.plan_id.as_str()))
        .bind(account.map(|a| sqlx::types::Json(&a.earlier_plans)))
        .bind(account.and_then(|a| a.subscription_id.as_deref()))
        .bind(account.map(|a| a.updated_at))
}

impl PostgresUsageStore {
    /// Keeps up to `capacity` accounts (10,000 unless set; 0 keeps none) to place new usage
    /// events with, so that recording one takes one round trip instead of two. Each record
    /// checks in its own statement that the account is still the stored one; one that another
    /// instance changed meanwhile is read again and the event placed again
    /// ([`StoreError::AccountChanged`]).
    ///
    /// # Example
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use token_billing::PostgresUsageStore;
    ///
    /// let store = PostgresUsageStore::connect("postgres://postgres@127.0.0.1/test")
    ///     .await?
    ///     .with_account_cache(100_000);
    /// # let _ = store; Ok(()) }
    /// ```
    #[must_use]
    pub fn with_account_cache(self, capacity: usize) -> PostgresUsageStore {
        PostgresUsageStore {
            accounts: Arc::new(AccountCache::new(capacity)),
            ..self
        }
    }

    /// Saves `account` by `sql` (binding its columns as `$1` - `$8`, and `expected`, when given,
    /// as `$9` - `$13` for [`account_unchanged`] and its creation as `$14`) with its audit entry,
    /// in one transaction;
    /// answers whether a row was written. The kept copy follows: the saved account, or none when
    /// the statement wrote nothing (the kept one may be what changed).
    async fn save_account(&self, sql: &str, account: Account, expected: Option<&Account>) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let earlier_plans = serde_json::to_value(&account.earlier_plans).map_err(generic)?;
        let query = sqlx::query(sql)
            .bind(account.user_id.as_str())
            .bind(account.customer_id.as_ref().map(CustomerId::as_str))
            .bind(account.plan_id.as_str())
            .bind(earlier_plans)
            .bind(account.subscription_id.as_deref())
            .bind(account.created_at)
            .bind(account.updated_at)
            .bind(account.limits.map(sqlx::types::Json));
        let query = match expected {
            Some(expected) => bind_account(query, Some(expected)).bind(expected.created_at),
            None => query,
        };
        if query.execute(&mut *tx).await.map_err(db)?.rows_affected() != 1 {
            self.accounts.forget(&account.user_id);
            return Ok(false);
        }
        Self::audit(
            &mut tx,
            &account.user_id,
            None,
            account.updated_at,
            &[AuditEvent::AccountSaved {
                customer_id: account.customer_id.clone(),
                plan_id: account.plan_id.clone(),
            }],
        )
        .await?;
        match tx.commit().await {
            Ok(()) => {
                self.accounts.put(account);
                Ok(true)
            }
            Err(error) => {
                self.accounts.forget(&account.user_id);
                Err(db(error))
            }
        }
    }

    /// [`UsageStore::put_account`].
    pub(super) async fn upsert_account(&self, account: Account) -> Result<(), StoreError> {
        static PUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "{INSERT_ACCOUNT}
                 ON CONFLICT (user_id) DO UPDATE
                    SET customer_id = EXCLUDED.customer_id, plan_id = EXCLUDED.plan_id,
                        earlier_plans = EXCLUDED.earlier_plans, subscription_id = EXCLUDED.subscription_id,
                        created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
                        limits = EXCLUDED.limits"
            )
        });
        self.save_account(&PUT, account, None).await.map(|_| ())
    }

    /// [`UsageStore::replace_account`].
    pub(super) async fn replace_stored_account(
        &self,
        expected: Option<&Account>,
        account: Account,
    ) -> Result<bool, StoreError> {
        static REPLACE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "UPDATE token_billing_accounts AS a
                    SET customer_id = $2, plan_id = $3, earlier_plans = $4, subscription_id = $5, created_at = $6,
                        updated_at = $7, limits = $8
                  WHERE a.user_id = $1 AND {} AND a.created_at = $14",
                account_unchanged(9)
            )
        });
        static CREATE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| format!("{INSERT_ACCOUNT} ON CONFLICT (user_id) DO NOTHING"));
        // The update locks the row and checks it as it is then: a compare-and-set.
        let sql = match expected {
            None => CREATE.as_str(),
            Some(_) => REPLACE.as_str(),
        };
        self.save_account(sql, account, expected).await
    }

    /// [`UsageStore::account`].
    pub(super) async fn read_account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM token_billing_accounts WHERE user_id = $1"
        ))
        .bind(user.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let account = row.as_ref().map(account_from).transpose()?;
        match &account {
            Some(account) => self.accounts.put(account.clone()),
            None => self.accounts.forget(user),
        }
        Ok(account)
    }

    /// [`UsageStore::account_for_usage`].
    pub(super) async fn account_to_place_usage(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        match self.accounts.get(user) {
            Some(account) => Ok(Some(account)),
            None => self.account(user).await,
        }
    }

    /// [`UsageStore::accounts`].
    pub(super) async fn read_accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
        let mut ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        // A join on the unnested ids probes the primary key once per id; `= ANY($1)` compared
        // every row it read with every id.
        let rows = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM token_billing_accounts
              WHERE user_id IN (SELECT DISTINCT u FROM unnest($1::text[]) AS u)"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let account = account_from(row)?;
            found.insert(account.user_id.clone(), account);
        }
        Ok(users.iter().map(|user| found.get(user).cloned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn account(n: usize) -> Account {
        let at = DateTime::from_timestamp(1_795_000_000, 0).expect("an instant");
        Account {
            user_id: UserId::new(format!("user-{n}")).expect("a user id"),
            customer_id: None,
            plan_id: crate::PlanId::new("default").expect("a plan id"),
            earlier_plans: Vec::new(),
            subscription_id: None,
            limits: None,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn the_account_cache_keeps_what_it_was_given_and_stays_within_its_bound() {
        let cache = AccountCache::new(32);
        for n in 0..1_000 {
            cache.put(account(n));
            assert_eq!(cache.get(&account(n).user_id), Some(account(n)));
        }
        let kept = |cache: &AccountCache| -> usize {
            cache
                .shards
                .iter()
                .map(|(s, _)| s.lock().expect("a shard").accounts.len())
                .sum()
        };
        assert!(kept(&cache) <= 32, "{} accounts kept", kept(&cache));
        // A capacity the shards do not divide evenly is still the most kept.
        for capacity in [1, 5, 17, 40] {
            let small = AccountCache::new(capacity);
            for n in 0..1_000 {
                small.put(account(n));
            }
            assert_eq!(kept(&small), capacity, "with_account_cache({capacity})");
        }
        cache.forget(&account(999).user_id);
        assert_eq!(cache.get(&account(999).user_id), None);

        // Kept with a plan id of its own (it is cloned for every event of its user), when the
        // id is too long to be kept in place and is shared text.
        let mut given = account(1);
        given.plan_id = crate::PlanId::new("a-plan-with-a-long-name-2026").expect("a plan id");
        cache.put(given.clone());
        let kept = cache.get(&given.user_id).expect("kept");
        assert_eq!(kept, given);
        assert!(!std::ptr::eq(kept.plan_id.as_str(), given.plan_id.as_str()));

        let none = AccountCache::new(0);
        none.put(account(1));
        assert_eq!(none.get(&account(1).user_id), None);
    }

    #[test]
    fn a_full_shard_lets_go_of_the_account_it_kept_longest() {
        let mut shard = CacheShard::default();
        let users = |shard: &CacheShard| -> Vec<String> {
            let mut users: Vec<String> = shard.accounts.keys().map(ToString::to_string).collect();
            users.sort();
            assert_eq!(shard.order.len(), shard.accounts.len());
            users
        };
        for n in 1..=4 {
            shard.put(account(n), 3);
        }
        assert_eq!(users(&shard), ["user-2", "user-3", "user-4"]);
        // Kept again (read afresh, say): it keeps its place.
        shard.put(account(2), 3);
        shard.put(account(5), 3);
        assert_eq!(users(&shard), ["user-3", "user-4", "user-5"]);
        shard.forget(&account(4).user_id);
        shard.forget(&account(9).user_id);
        shard.put(account(6), 3);
        assert_eq!(users(&shard), ["user-3", "user-5", "user-6"]);
        shard.put(account(7), 3);
        assert_eq!(users(&shard), ["user-5", "user-6", "user-7"]);
    }

    /// A host with more active users than the cache holds still finds most of what it holds:
    /// with users drawn evenly from twice the capacity, about half the look-ups hit (a cache
    /// that emptied a full shard found 28%).
    #[test]
    fn a_cache_smaller_than_the_active_users_still_serves_its_share() {
        let cache = AccountCache::new(1_600);
        let (mut hits, mut state) = (0, 0x9E37_79B9_7F4A_7C15_u64);
        let lookups = 200_000;
        for _ in 0..lookups {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let account = account(usize::try_from(state % 3_200).expect("small"));
            match cache.get(&account.user_id) {
                Some(_) => hits += 1,
                None => cache.put(account),
            }
        }
        let rate = f64::from(hits) / f64::from(lookups);
        assert!(rate > 0.45, "hit rate {rate:.3}");
    }
}
