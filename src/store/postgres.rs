//! [`PostgresUsageStore`] (feature `postgres`): the original product's schema on PostgreSQL.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::{
    Account, AuditEntry, AuditEvent, BoxError, EnsureCharge, GatewayEventRecord, OperationUsage, PeriodSummary,
    RecordUsage, Recorded, Settlement, StoreError, SummaryDelta, TierChargeReport, UsageStore,
};
use crate::domain::{
    Blocks, Charge, ChargeKey, ChargeKind, ChargeStatus, ClientId, Currency, CustomerId, EventId, FeeCollection,
    Metadata, Money, NewCharge, OperationType, PeriodKey, Plan, PlanId, UsageRecord, UserId, charges_for_growth,
};

const STORE: &str = "PostgreSQL store";

/// The schema migrations, in order: also shipped as plain SQL under `migrations/` for hosts that
/// run their own migration tool.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_token_billing.sql")),
    (
        2,
        include_str!("../../migrations/0002_functions_and_row_level_security.sql"),
    ),
    (3, include_str!("../../migrations/0003_record_token_consumption.sql")),
    (4, include_str!("../../migrations/0004_gateway_events.sql")),
    (5, include_str!("../../migrations/0005_give_up.sql")),
    (6, include_str!("../../migrations/0006_consumption_key.sql")),
    (
        7,
        include_str!("../../migrations/0007_usage_audit_from_consumption.sql"),
    ),
];

/// A [`UsageStore`] on PostgreSQL, safe to share between any number of service instances.
///
/// Every write is one transaction; the period total is incremented in place (the row lock
/// serialises concurrent events of one user and period, which therefore see disjoint intervals),
/// and unique indexes make a second charge for a block, or a second record of an event,
/// impossible whatever the code does. Claims use `FOR UPDATE SKIP LOCKED`, so concurrent
/// collectors never take the same charge.
///
/// # Example
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use token_billing::{BillingService, PostgresUsageStore, SandboxGateway};
///
/// let store = PostgresUsageStore::connect("postgres://postgres@127.0.0.1/test").await?;
/// let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new())).build();
/// # let _ = billing; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresUsageStore {
    pool: PgPool,
    accounts: Arc<AccountCache>,
}

/// Accounts as this store last read or saved them, for placing new events without a read of
/// their own: the record then checks, in its own statement, that the account it was placed
/// with is still the stored one. Bounded: a full shard lets go of the account it has kept
/// longest.
#[derive(Debug)]
struct AccountCache {
    shards: Box<[std::sync::Mutex<CacheShard>]>,
    per_shard: usize,
    hasher: foldhash::fast::RandomState,
}

/// One shard of the account cache: the accounts, and their users in the order they were first
/// kept, oldest first (exactly the users of `accounts`).
#[derive(Debug, Default)]
struct CacheShard {
    accounts: super::id_map::IdMap<UserId, Account>,
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

    fn new(capacity: usize) -> AccountCache {
        AccountCache {
            shards: (0..Self::SHARDS).map(|_| std::sync::Mutex::default()).collect(),
            per_shard: capacity.div_ceil(Self::SHARDS),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn shard(&self, user: &UserId) -> std::sync::MutexGuard<'_, CacheShard> {
        // A map of copies: one poisoned by a panic elsewhere is still a valid cache.
        self.shards[super::shard_index(&self.hasher, user, Self::SHARDS)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, user: &UserId) -> Option<Account> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(user).accounts.get(user).cloned()
    }

    fn put(&self, account: Account) {
        if self.per_shard == 0 {
            return;
        }
        self.shard(&account.user_id).put(account, self.per_shard);
    }

    fn forget(&self, user: &UserId) {
        if self.per_shard > 0 {
            self.shard(user).forget(user);
        }
    }
}

/// Accounts a store keeps for placing events, unless told otherwise
/// ([`PostgresUsageStore::with_account_cache`]).
const ACCOUNT_CACHE: usize = 10_000;

/// The condition, on `token_billing_accounts` as `a`, that the account a record was placed with
/// (bound from `$n` on: customer, plan, earlier plans, subscription, last change) is still the
/// stored one.
fn account_unchanged(first: usize) -> String {
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

/// An account's row, its columns bound as `$1` - `$7` (see `save_account`).
const INSERT_ACCOUNT: &str = "INSERT INTO token_billing_accounts
        (user_id, customer_id, plan_id, earlier_plans, subscription_id, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Binds the account a record was placed with, for [`account_unchanged`]: nulls when there is
/// none (the condition is then not asked).
fn bind_account<'q>(query: PgQuery<'q>, account: Option<&'q Account>) -> PgQuery<'q> {
    query
        .bind(account.and_then(|a| a.customer_id.as_ref().map(CustomerId::as_str)))
        .bind(account.map(|a| a.plan_id.as_str()))
        .bind(account.map(|a| sqlx::types::Json(&a.earlier_plans)))
        .bind(account.and_then(|a| a.subscription_id.as_deref()))
        .bind(account.map(|a| a.updated_at))
}

fn generic(source: impl Into<BoxError>) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: source.into(),
    }
}

/// Maps a database error: connection problems and timeouts may be retried, the rest may not.
fn db(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable {
                store: STORE,
                source: Box::new(error),
            }
        }
        other => generic(other),
    }
}

/// Whether the error is the same event committed concurrently by another caller (same event id,
/// or the very same consumption sent twice).
fn is_duplicate_event(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().as_deref() == Some("23505")
            && matches!(e.constraint(), Some("token_consumption_user_id_event_id_key" | "token_consumption_pkey")))
}

/// Whether PostgreSQL aborted this transaction for a conflict with another: a lock cycle it
/// broke (40P01), or, where a deployment runs above the READ COMMITTED the store is written
/// for, a row another transaction changed (40001). Nothing of it was written, and it can run
/// again.
fn is_deadlock(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if matches!(e.code().as_deref(), Some("40P01" | "40001")))
}

/// Whether a one-statement record gave up (`token_billing_give_up`), or could not run because
/// the schema lacks migration 5: either way it wrote nothing, and another way records the event.
fn gave_up(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().as_deref() == Some("TB001")
            || (e.code().as_deref() == Some("42883") && e.message().contains("token_billing_give_up")))
}

fn is_numeric_overflow(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("22003"))
}

/// A period's summary is in another currency than the charge or plan at hand.
fn currency_mismatch(currency: Currency) -> StoreError {
    generic(format!("the period's summary is not in {currency}"))
}

fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(generic)
}

fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(generic)
}

fn to_u32(value: i32) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(generic)
}

fn parse<T: FromStr>(text: &str) -> Result<T, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse().map_err(generic)
}

fn audit_json(event: &AuditEvent) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(event).map_err(generic)
}

/// What a batch decided for one of its events.
enum Decision {
    /// Recorded before the batch: answered as a re-send.
    Existing,
    /// The same id as the batch's event at this index: answered as its re-send.
    Earlier(usize),
    /// Refused, nothing written.
    Refused(StoreError),
    /// Recorded: the period's total before and after it, and the charges it created.
    Accepted {
        before: u64,
        after: u64,
        charges: Vec<Charge>,
    },
}

/// The charges an event whose interval of the period's total is `(before, after]` creates.
fn charges_between(
    request: &RecordUsage<'_>,
    before: u64,
    after: u64,
) -> Result<Vec<NewCharge>, crate::domain::RatingError> {
    let usage = &request.usage;
    charges_for_growth(
        request.plan,
        request.fee,
        &usage.user_id,
        usage.period,
        before,
        after,
        Some(usage.consumption_id),
    )
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds the columns of an event's consumption row that follow its ids, in this order: event
/// id, tokens, operation type, client, metadata, occurrence, whether the occurrence was
/// reported, the total before it, and its first and end block.
fn bind_consumption<'q>(
    query: PgQuery<'q>,
    usage: &'q UsageRecord,
    before: u64,
    blocks: &Blocks,
) -> Result<PgQuery<'q>, StoreError> {
    Ok(bind_event(query, usage)?
        .bind(to_i64(before)?)
        .bind(to_i64(blocks.first())?)
        .bind(to_i64(blocks.end())?))
}

/// Binds what the host reported of an event, in this order: event id, tokens, operation type,
/// client, metadata, occurrence, and whether the occurrence was reported.
fn bind_event<'q>(query: PgQuery<'q>, usage: &'q UsageRecord) -> Result<PgQuery<'q>, StoreError> {
    Ok(query
        .bind(usage.event_id.as_str())
        .bind(to_i64(usage.tokens)?)
        .bind(usage.operation_type.as_str())
        .bind(usage.client_id.as_ref().map(ClientId::as_str))
        .bind(sqlx::types::Json(&usage.metadata))
        .bind(usage.occurred_at)
        .bind(usage.occurred_at_reported))
}

/// Binds what a compare-and-set writes into the period row: the new total, and the plan's
/// included tokens and block size.
fn bind_new_total<'q>(query: PgQuery<'q>, request: &RecordUsage<'_>, after: u64) -> Result<PgQuery<'q>, StoreError> {
    Ok(query
        .bind(to_i64(after)?)
        .bind(to_i64(request.plan.included_tokens())?)
        .bind(to_i64(request.plan.block_size())?))
}

/// The audit entries of a charge an event creates: its creation, and the start of its
/// collection when the charge is leased to the recording caller.
fn created_charge_audit(charge: &NewCharge, leased: bool) -> Vec<AuditEvent> {
    let mut events = vec![AuditEvent::ChargeCreated {
        key: charge.key.clone(),
        billing_tier: charge.billing_tier.clone(),
        amount: charge.amount,
        status: ChargeStatus::Pending,
    }];
    if leased {
        events.push(AuditEvent::CollectionStarted {
            key: charge.key.clone(),
            round: 0,
            attempt: 1,
        });
    }
    events
}

const ACCOUNT_COLUMNS: &str = "user_id, customer_id, plan_id, earlier_plans, subscription_id, created_at, updated_at";

fn account_from(row: &PgRow) -> Result<Account, StoreError> {
    let earlier: serde_json::Value = row.try_get("earlier_plans").map_err(db)?;
    Ok(Account {
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        customer_id: row
            .try_get::<Option<&str>, _>("customer_id")
            .map_err(db)?
            .map(parse::<CustomerId>)
            .transpose()?,
        plan_id: parse::<PlanId>(row.try_get::<&str, _>("plan_id").map_err(db)?)?,
        earlier_plans: serde_json::from_value(earlier).map_err(generic)?,
        subscription_id: row.try_get("subscription_id").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

const CHARGE_COLUMNS: &str = "user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, \
     status, round, attempts, consumption_id, payment_id, failure_code, failure_message, next_retry_at, lease_until, \
     created_at, updated_at";

fn charge_from(row: &PgRow) -> Result<Charge, StoreError> {
    let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
    Ok(Charge {
        id: row.try_get("id").map_err(db)?,
        key: ChargeKey::from_stored(row.try_get::<String, _>("charge_key").map_err(db)?),
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        kind: parse(row.try_get::<&str, _>("kind").map_err(db)?)?,
        block: to_u64(row.try_get("block").map_err(db)?)?,
        billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
        amount: Money::from_minor(row.try_get("amount_charged").map_err(db)?, currency),
        status: parse(row.try_get::<&str, _>("status").map_err(db)?)?,
        round: to_u32(row.try_get("round").map_err(db)?)?,
        attempts: to_u32(row.try_get("attempts").map_err(db)?)?,
        consumption_id: row.try_get("consumption_id").map_err(db)?,
        payment_id: row.try_get("payment_id").map_err(db)?,
        failure_code: row.try_get("failure_code").map_err(db)?,
        failure_message: row.try_get("failure_message").map_err(db)?,
        next_retry_at: row.try_get("next_retry_at").map_err(db)?,
        lease_until: row.try_get("lease_until").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

fn usage_from(row: &PgRow) -> Result<UsageRecord, StoreError> {
    let metadata: serde_json::Value = row.try_get("metadata").map_err(db)?;
    Ok(UsageRecord {
        consumption_id: row.try_get("id").map_err(db)?,
        event_id: parse::<EventId>(row.try_get::<&str, _>("event_id").map_err(db)?)?,
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        tokens: to_u64(row.try_get("tokens_used").map_err(db)?)?,
        operation_type: parse::<OperationType>(row.try_get::<&str, _>("operation_type").map_err(db)?)?,
        client_id: row
            .try_get::<Option<&str>, _>("client_id")
            .map_err(db)?
            .map(parse::<ClientId>)
            .transpose()?,
        metadata: metadata_from(metadata)?,
        occurred_at: row.try_get("occurred_at").map_err(db)?,
        occurred_at_reported: row.try_get("occurred_at_reported").map_err(db)?,
        recorded_at: row.try_get("created_at").map_err(db)?,
    })
}

/// An event's metadata as stored. The library writes an object of texts; the original product's
/// `record_token_consumption`, which hosts may call beside it, takes any object: a value that is
/// not a text is read as its JSON text (`3`, `true`, `{"a":1}`), so that such an event reads
/// back, and is answered as the original when the library is sent it again with those texts.
fn metadata_from(stored: serde_json::Value) -> Result<Metadata, StoreError> {
    match stored {
        serde_json::Value::Object(entries) => Ok(entries
            .into_iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => (key, text),
                other => (key, other.to_string()),
            })
            .collect()),
        serde_json::Value::Null => Ok(Metadata::new()),
        other => Err(generic(format!(
            "an event's metadata is a JSON {}, not an object",
            match other {
                serde_json::Value::Array(_) => "array",
                _ => "scalar",
            }
        ))),
    }
}

fn summary_from(row: &PgRow) -> Result<PeriodSummary, StoreError> {
    let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
    let money = |column: &str| -> Result<Money, StoreError> {
        Ok(Money::from_minor(row.try_get(column).map_err(db)?, currency))
    };
    Ok(PeriodSummary {
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        currency,
        total_tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
        events: to_u64(row.try_get("events").map_err(db)?)?,
        fixed_fee_charged: money("fixed_fee_charged")?,
        tier_charges_count: to_u64(row.try_get("tier_charges_count").map_err(db)?)?,
        tier_charges_total: money("tier_charges_total")?,
        outstanding_count: to_u64(row.try_get("outstanding_count").map_err(db)?)?,
        outstanding_total: money("outstanding_total")?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

impl PostgresUsageStore {
    /// Connects to `url` with a pool of up to 16 connections, waiting at most 10 seconds for a
    /// connection, and applies the migrations. For other pool settings build the pool yourself
    /// and use [`from_pool`](Self::from_pool).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached; other store errors when
    /// a migration fails.
    pub async fn connect(url: &str) -> Result<PostgresUsageStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(db)?;
        let store = PostgresUsageStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// A store over a pool the host already has. Call [`migrate`](Self::migrate) once, or apply
    /// the files under `migrations/` with your own tool.
    pub fn from_pool(pool: PgPool) -> PostgresUsageStore {
        PostgresUsageStore {
            pool,
            accounts: Arc::new(AccountCache::new(ACCOUNT_CACHE)),
        }
    }

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

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations not applied yet, under an advisory lock so that instances starting
    /// together apply each once. Safe to call at every start.
    ///
    /// # Errors
    /// Store errors.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // One transaction under a transaction-scoped advisory lock: instances starting together
        // apply each migration once, and a cancelled start leaves no lock behind.
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('token_billing_migrations'))")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS token_billing_migrations (
                 version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        for (version, sql) in MIGRATIONS {
            let applied: Option<i32> =
                sqlx::query_scalar("SELECT version FROM token_billing_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if applied.is_none() {
                sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db)?;
                sqlx::query("INSERT INTO token_billing_migrations (version) VALUES ($1)")
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
        }
        tx.commit().await.map_err(db)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(db)
    }

    async fn replay_in(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        event_id: &EventId,
    ) -> Result<Option<Recorded>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
                    occurred_at_reported, created_at, total_before, created_fee, first_block, end_block
               FROM token_consumption WHERE user_id = $1 AND event_id = $2",
        )
        .bind(user.as_str())
        .bind(event_id.as_str())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let usage = usage_from(&row)?;
        let total_before = to_u64(row.try_get("total_before").map_err(db)?)?;
        let created_fee: bool = row.try_get("created_fee").map_err(db)?;
        let first_block: i64 = row.try_get("first_block").map_err(db)?;
        let end_block: i64 = row.try_get("end_block").map_err(db)?;
        let charges = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = $1 AND period = $2
                AND ((kind = 'fixed_fee' AND $3) OR (kind = 'block' AND block >= $4 AND block < $5))
              ORDER BY kind DESC, block"
        ))
        .bind(user.as_str())
        .bind(usage.period.to_string())
        .bind(created_fee)
        .bind(first_block)
        .bind(end_block)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Recorded {
            total_after: total_before + usage.tokens,
            usage: Arc::new(usage),
            total_before,
            charges,
            replayed: true,
        }))
    }

    /// Inserts charges that do not exist yet and moves the summary for them; returns those
    /// created, in the order given.
    async fn insert_charges(
        tx: &mut Transaction<'static, Postgres>,
        charges: Vec<NewCharge>,
        status: ChargeStatus,
        payment_id: Option<&str>,
        now: DateTime<Utc>,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<Charge>, StoreError> {
        let mut created = Vec::with_capacity(charges.len());
        let mut delta = SummaryDelta::default();
        let Some(first) = charges.first() else {
            return Ok(created);
        };
        let (user, period, currency) = (first.user_id.clone(), first.period, first.amount.currency());
        let leased = status == ChargeStatus::Pending && lease_until.is_some();
        let attempts = i32::from(leased);
        for new in charges {
            let row = sqlx::query(&format!(
                "INSERT INTO token_billing_charges
                    (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                     round, attempts, consumption_id, payment_id, lease_until, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $12, $13, $14, $15, $15)
                 ON CONFLICT DO NOTHING
                 RETURNING {CHARGE_COLUMNS}"
            ))
            .bind(new.user_id.as_str())
            .bind(crate::random::uuid_v4())
            .bind(new.key.as_str())
            .bind(new.period.to_string())
            .bind(new.kind.as_str())
            .bind(to_i64(new.block)?)
            .bind(new.billing_tier.as_str())
            .bind(new.amount.minor_units())
            .bind(new.amount.currency().code())
            .bind(status.as_str())
            .bind(attempts)
            .bind(new.consumption_id)
            .bind(payment_id)
            .bind(if leased { lease_until } else { None })
            .bind(now)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
            if let Some(row) = row {
                let charge = charge_from(&row)?;
                delta = delta
                    .plus(SummaryDelta::of(charge.kind, charge.amount.minor_units(), None, status))
                    .ok_or_else(|| generic("summary overflow"))?;
                created.push(charge);
            }
        }
        Self::move_summary(tx, &user, period, currency, delta, now).await?;
        let mut entries = Vec::new();
        for charge in &created {
            entries.push(AuditEvent::ChargeCreated {
                key: charge.key.clone(),
                billing_tier: charge.billing_tier.clone(),
                amount: charge.amount,
                status,
            });
            if leased {
                entries.push(AuditEvent::CollectionStarted {
                    key: charge.key.clone(),
                    round: 0,
                    attempt: 1,
                });
            }
        }
        Self::audit(tx, &user, Some(period), now, &entries).await?;
        Ok(created)
    }

    async fn move_summary(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: PeriodKey,
        currency: Currency,
        delta: SummaryDelta,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if delta == SummaryDelta::default() {
            return Ok(());
        }
        let moved = sqlx::query(
            "UPDATE token_usage_summary
                SET outstanding_count = outstanding_count + $3, outstanding_total = outstanding_total + $4,
                    fixed_fee_charged = fixed_fee_charged + $5, tier_charges_count = tier_charges_count + $6,
                    tier_charges_total = tier_charges_total + $7, updated_at = $8
              WHERE user_id = $1 AND period = $2 AND currency = $9",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(delta.outstanding_count)
        .bind(delta.outstanding_total)
        .bind(delta.fixed_fee_charged)
        .bind(delta.tier_charges_count)
        .bind(delta.tier_charges_total)
        .bind(now)
        .bind(currency.code())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        if moved.rows_affected() != 1 {
            return Err(currency_mismatch(currency));
        }
        Ok(())
    }

    async fn audit(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: Option<PeriodKey>,
        at: DateTime<Utc>,
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let json = events.iter().map(audit_json).collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO token_billing_audit (user_id, at, period, event)
             SELECT $1, $2, $3, e FROM unnest($4::jsonb[]) WITH ORDINALITY AS t(e, n) ORDER BY n",
        )
        .bind(user.as_str())
        .bind(at)
        .bind(period.map(|p| p.to_string()))
        .bind(json)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Makes sure the period's summary row exists, and locks it (before the charges, the order
    /// every record path takes). The plan's allowance and block size are recorded with a period
    /// that has none yet, so that the original product's SQL functions, which read and check
    /// them, rate it as the library does.
    async fn ensure_summary(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: PeriodKey,
        currency: Currency,
        plan: Option<&Plan>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO token_usage_summary AS s (user_id, period, currency, updated_at, included_tokens, block_size)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (user_id, period) DO UPDATE
                SET included_tokens = coalesce(s.included_tokens, EXCLUDED.included_tokens),
                    block_size = coalesce(s.block_size, EXCLUDED.block_size)",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(currency.code())
        .bind(now)
        .bind(plan.map(|p| to_i64(p.included_tokens())).transpose()?)
        .bind(plan.map(|p| to_i64(p.block_size())).transpose()?)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

/// What a claim takes and does: the status it picks, the SQL condition that makes a charge due
/// (`$2` is now), the columns it sets besides the lease, and the audit entries it writes for
/// each claimed charge (a query over `claimed`).
struct ClaimKind {
    status: ChargeStatus,
    due: &'static str,
    set: &'static str,
    audit: &'static str,
}

const CLAIM_PENDING: ClaimKind = ClaimKind {
    status: ChargeStatus::Pending,
    due: "(lease_until IS NULL OR lease_until <= $2)",
    set: "attempts = c.attempts + 1",
    audit: "SELECT jsonb_build_object('type', 'collection_started', 'key', claimed.charge_key,
                'round', claimed.round, 'attempt', claimed.attempts)",
};

const CLAIM_RETRIES: ClaimKind = ClaimKind {
    status: ChargeStatus::Failed,
    due: "next_retry_at <= $2 AND (lease_until IS NULL OR lease_until <= $2)",
    set: "status = 'pending', round = c.round + 1, attempts = c.attempts + 1, next_retry_at = NULL",
    audit: "VALUES (jsonb_build_object('type', 'charge_status_changed', 'key', claimed.charge_key,
                    'from', 'failed', 'to', 'pending', 'payment_id', NULL, 'failure_code', NULL)),
               (jsonb_build_object('type', 'collection_started', 'key', claimed.charge_key,
                    'round', claimed.round, 'attempt', claimed.attempts))",
};

const CLAIM_AWAITING: ClaimKind = ClaimKind {
    status: ChargeStatus::RequiresAction,
    due: "(lease_until IS NULL OR lease_until <= $2)",
    set: "attempts = c.attempts",
    audit: "SELECT NULL::jsonb WHERE false",
};

/// How an event's write is made safe: inside a transaction that already locked and incremented
/// the period row, or by a compare-and-set on its total in the write itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Locked,
    CompareAndSet,
}

/// Why a record attempt stopped: a database error (perhaps a concurrent duplicate) or a store
/// error to return as is.
enum RecordFailure {
    Database(sqlx::Error),
    /// The period total would pass `BIGINT`.
    Overflow,
    /// The account the event was placed with is no longer the stored one.
    AccountChanged,
    Store(StoreError),
}

impl RecordFailure {
    /// A write's error: a total past `BIGINT` is an overflow, anything else the database's.
    fn from_write(error: sqlx::Error) -> RecordFailure {
        if is_numeric_overflow(&error) {
            RecordFailure::Overflow
        } else {
            RecordFailure::Database(error)
        }
    }
}

impl From<StoreError> for RecordFailure {
    fn from(error: StoreError) -> Self {
        RecordFailure::Store(error)
    }
}

impl PostgresUsageStore {
    /// Saves `account` by `sql` (binding its columns as `$1` - `$7`, and `expected`, when given,
    /// as `$8` - `$12` for [`account_unchanged`] and its creation as `$13`) with its audit entry,
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
            .bind(account.updated_at);
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

    async fn try_record(&self, request: &RecordUsage<'_>) -> Result<Recorded, RecordFailure> {
        let usage = &request.usage;
        let user = &usage.user_id;
        let mut tx = self.begin().await?;
        if request.account.is_some() {
            static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                format!(
                    "SELECT EXISTS (SELECT 1 FROM token_billing_accounts a WHERE a.user_id = $1 AND {})",
                    account_unchanged(2)
                )
            });
            let query = sqlx::query(SQL.as_str()).bind(user.as_str());
            let unchanged: bool = bind_account(query, request.account)
                .fetch_one(&mut *tx)
                .await
                .map_err(RecordFailure::Database)?
                .try_get(0)
                .map_err(db)?;
            if !unchanged {
                return Err(RecordFailure::AccountChanged);
            }
        }
        let now = usage.recorded_at;
        let tokens = to_i64(usage.tokens)?;
        // The increment, unless the event was recorded before, in one round trip. It takes the
        // summary row's lock until commit: concurrent events of this user and period see
        // disjoint intervals.
        let row = sqlx::query(
            "WITH recorded AS (
                 SELECT 1 FROM token_consumption WHERE user_id = $1 AND event_id = $8
             ), incremented AS (
                 INSERT INTO token_usage_summary
                     (user_id, period, currency, total_tokens, events, updated_at, included_tokens, block_size)
                 SELECT $1, $2, $3, $4, 1, $5, $6, $7 WHERE NOT EXISTS (SELECT 1 FROM recorded)
                 ON CONFLICT (user_id, period) DO UPDATE
                    SET total_tokens = token_usage_summary.total_tokens + EXCLUDED.total_tokens,
                        events = token_usage_summary.events + 1, updated_at = EXCLUDED.updated_at,
                        included_tokens = coalesce(token_usage_summary.included_tokens, EXCLUDED.included_tokens),
                        block_size = coalesce(token_usage_summary.block_size, EXCLUDED.block_size)
                  WHERE token_usage_summary.currency = EXCLUDED.currency
                 RETURNING total_tokens
             )
             SELECT EXISTS (SELECT 1 FROM recorded) AS replayed, (SELECT total_tokens FROM incremented) AS total",
        )
        .bind(user.as_str())
        .bind(usage.period.to_string())
        .bind(request.plan.currency().code())
        .bind(tokens)
        .bind(now)
        .bind(to_i64(request.plan.included_tokens())?)
        .bind(to_i64(request.plan.block_size())?)
        .bind(usage.event_id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(RecordFailure::from_write)?;
        if row.try_get::<bool, _>("replayed").map_err(db)? {
            let original = Self::replay_in(&mut tx, user, &usage.event_id)
                .await?
                .ok_or_else(|| generic("a recorded event vanished"))?;
            tx.rollback().await.map_err(db)?;
            return Ok(original.answer_resend(usage)?);
        }
        let after: i64 = row
            .try_get::<Option<i64>, _>("total")
            .map_err(db)?
            .ok_or_else(|| currency_mismatch(request.plan.currency()))?;
        let after = to_u64(after)?;
        let before = after - usage.tokens;
        let created = Self::write_event(&mut *tx, request, before, after, Gate::Locked)
            .await?
            .ok_or_else(|| generic("the locked write did not happen"))?;
        tx.commit().await.map_err(RecordFailure::Database)?;
        Ok(Recorded {
            usage: Arc::new(usage.clone()),
            total_before: before,
            total_after: after,
            charges: created,
            replayed: false,
        })
    }

    /// Records an event that creates no charge in one statement, one round trip and no explicit
    /// transaction: the period's total moves by the event's tokens (the row's lock orders
    /// concurrent events, so their intervals are disjoint), the consumption and its audit entry
    /// are written from the `UPDATE`'s `RETURNING`, and if the interval starts a block or opens
    /// a period whose fee the library charges, or the event id is taken, the statement calls
    /// `token_billing_give_up` and everything of it is undone. The rule is the one
    /// [`charges_for_growth`] applies, in SQL. `None` when nothing was written: no period row
    /// in this currency, a total that would pass [`crate::MAX_TOKENS`], or the statement gave
    /// up.
    async fn try_record_direct(&self, request: &RecordUsage<'_>) -> Result<Option<Recorded>, RecordFailure> {
        let usage = &request.usage;
        // An account that changed since the event was placed moves nothing here; the next path
        // tells that apart from the other reasons.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "WITH moved AS (
                 UPDATE token_usage_summary
                    SET total_tokens = total_tokens + $6, events = events + 1, updated_at = $3,
                        included_tokens = coalesce(included_tokens, $12), block_size = coalesce(block_size, $13)
                  WHERE user_id = $1 AND period = $2 AND currency = $14 AND total_tokens <= $15 - $6
                    AND (NOT $17 OR EXISTS (SELECT 1 FROM token_billing_accounts a
                                             WHERE a.user_id = $1 AND {account}))
                 RETURNING total_tokens - $6 AS before, total_tokens AS after
             ), rated AS (
                 SELECT before, after,
                        CASE WHEN before <= $12 THEN 0 ELSE (before - $12 - 1) / $13 + 1 END AS owed_before,
                        CASE WHEN after <= $12 THEN 0 ELSE (after - $12 - 1) / $13 + 1 END AS owed_after
                   FROM moved
             ), consumption AS (
                 INSERT INTO token_consumption
                     (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
                      occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
                      audit_seq)
                 SELECT $1, $4, $5, $2, $6, $7, $8, $9, $10, $11, $3, r.before, false, r.owed_before + 1,
                        r.owed_after + 1, nextval('token_billing_audit_seq_seq')
                   FROM rated r
                 ON CONFLICT DO NOTHING
                 RETURNING 1
             )
             SELECT r.before, r.after,
                    CASE WHEN r.owed_after > r.owed_before OR ($16 AND r.before = 0)
                              THEN token_billing_give_up('the event creates charges')
                         WHEN NOT EXISTS (SELECT 1 FROM consumption)
                              THEN token_billing_give_up('the event id is recorded')
                    END AS gave_up
               FROM rated r",
                account = account_unchanged(18)
            )
        });
        let query = sqlx::query(SQL.as_str())
            .bind(usage.user_id.as_str())
            .bind(usage.period.to_string())
            .bind(usage.recorded_at)
            .bind(usage.consumption_id);
        let result = bind_event(query, usage)?
            .bind(to_i64(request.plan.included_tokens())?)
            .bind(to_i64(request.plan.block_size())?)
            .bind(request.plan.currency().code())
            .bind(to_i64(crate::MAX_TOKENS)?)
            .bind(request.fee == FeeCollection::Library)
            .bind(request.account.is_some());
        let result = bind_account(result, request.account).fetch_optional(&self.pool).await;
        let row = match result {
            Ok(Some(row)) => row,
            Ok(None) => return Ok(None),
            Err(error) if gave_up(&error) => return Ok(None),
            Err(error) => return Err(RecordFailure::Database(error)),
        };
        let before = to_u64(row.try_get("before").map_err(db)?)?;
        let after = to_u64(row.try_get("after").map_err(db)?)?;
        Ok(Some(Recorded {
            usage: Arc::new(usage.clone()),
            total_before: before,
            total_after: after,
            charges: Vec::new(),
            replayed: false,
        }))
    }

    /// Records an event in two round trips and no explicit transaction, when its period row
    /// exists: reads the total (and whether the event was recorded), decides the charges, then
    /// writes everything in one statement that first locks the row *if its total is still the
    /// one read* (a compare-and-set). `None` when the period row is missing, or when the total
    /// moved under every attempt: the caller takes the locking path.
    async fn try_record_fast(&self, request: &RecordUsage<'_>) -> Result<Option<Recorded>, RecordFailure> {
        let usage = &request.usage;
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT s.total_tokens, s.currency,
                    EXISTS (SELECT 1 FROM token_consumption c WHERE c.user_id = $1 AND c.event_id = $3) AS recorded,
                    NOT $4 OR EXISTS (SELECT 1 FROM token_billing_accounts a WHERE a.user_id = $1 AND {})
                        AS account_unchanged
               FROM (SELECT 1) AS one
               LEFT JOIN token_usage_summary s ON s.user_id = $1 AND s.period = $2",
                account_unchanged(5)
            )
        });
        for _ in 0..3 {
            let query = sqlx::query(SQL.as_str())
                .bind(usage.user_id.as_str())
                .bind(usage.period.to_string())
                .bind(usage.event_id.as_str())
                .bind(request.account.is_some());
            let row = bind_account(query, request.account)
                .fetch_one(&self.pool)
                .await
                .map_err(RecordFailure::Database)?;
            if row.try_get::<bool, _>("recorded").map_err(db)? {
                let original = self
                    .recorded_event(&usage.user_id, &usage.event_id)
                    .await?
                    .ok_or_else(|| generic("a recorded event vanished"))?;
                return Ok(Some(original.answer_resend(usage)?));
            }
            if !row.try_get::<bool, _>("account_unchanged").map_err(db)? {
                return Err(RecordFailure::AccountChanged);
            }
            let Some(total) = row.try_get::<Option<i64>, _>("total_tokens").map_err(db)? else {
                return Ok(None);
            };
            if row.try_get::<Option<&str>, _>("currency").map_err(db)? != Some(request.plan.currency().code()) {
                return Err(currency_mismatch(request.plan.currency()).into());
            }
            let before = to_u64(total)?;
            let after = before
                .checked_add(usage.tokens)
                .filter(|t| *t <= crate::MAX_TOKENS)
                .ok_or(StoreError::TotalOverflow {
                    total: before,
                    tokens: usage.tokens,
                })?;
            if let Some(created) = Self::write_event(&self.pool, request, before, after, Gate::CompareAndSet).await? {
                return Ok(Some(Recorded {
                    usage: Arc::new(usage.clone()),
                    total_before: before,
                    total_after: after,
                    charges: created,
                    replayed: false,
                }));
            }
            // Another event of the user moved the total first: read it again.
        }
        Ok(None)
    }

    /// Writes an event whose interval `(before, after]` is decided: its charges (the fixed fee
    /// may exist already, the rest follows from those created), the summary's figures, the
    /// consumption and its audit entries, in one statement. `None` when the compare-and-set
    /// lost (the total is not `before` any more); nothing is written then.
    async fn write_event<'e>(
        executor: impl sqlx::Executor<'e, Database = Postgres>,
        request: &RecordUsage<'_>,
        before: u64,
        after: u64,
        gate: Gate,
    ) -> Result<Option<Vec<Charge>>, RecordFailure> {
        let usage = &request.usage;
        let charges = charges_between(request, before, after).map_err(StoreError::from)?;
        let blocks = request.plan.blocks_crossed(before, after).map_err(StoreError::from)?;
        let leased = request.lease_until.is_some();
        let mut ids = Vec::with_capacity(charges.len());
        let mut keys = Vec::with_capacity(charges.len());
        let mut kinds = Vec::with_capacity(charges.len());
        let mut block_numbers = Vec::with_capacity(charges.len());
        let mut tiers = Vec::with_capacity(charges.len());
        let mut amounts = Vec::with_capacity(charges.len());
        let mut audits = Vec::with_capacity(charges.len());
        for charge in &charges {
            let events = created_charge_audit(charge, leased);
            ids.push(crate::random::uuid_v4());
            keys.push(charge.key.as_str());
            kinds.push(charge.kind.as_str());
            block_numbers.push(to_i64(charge.block)?);
            tiers.push(charge.billing_tier.as_str());
            amounts.push(charge.amount.minor_units());
            audits.push(serde_json::to_value(&events).map_err(generic)?);
        }
        // Under the compare-and-set the row is locked here, if its total is still `before`, and
        // every write below happens only then; the summary also takes the new total.
        let (locked, totals) = match gate {
            Gate::Locked => ("SELECT 1", ""),
            Gate::CompareAndSet => (
                "SELECT 1 FROM token_usage_summary
                  WHERE user_id = $8 AND period = $9 AND total_tokens = $22 FOR UPDATE",
                "total_tokens = $25, events = events + 1, updated_at = $14,
                 included_tokens = coalesce(included_tokens, $26), block_size = coalesce(block_size, $27),",
            ),
        };
        let summary_gate = match gate {
            Gate::Locked => "EXISTS (SELECT 1 FROM created)",
            Gate::CompareAndSet => "EXISTS (SELECT 1 FROM locked)",
        };
        let sql = format!(
            "WITH locked AS (
                 {locked}
             ), input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],
                                      $7::jsonb[]) WITH ORDINALITY AS i(id, charge_key, kind, block, billing_tier,
                                                                         amount, audit, n)
             ), created AS (
                 INSERT INTO token_billing_charges
                     (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                      round, attempts, consumption_id, lease_until, created_at, updated_at)
                 SELECT $8, id, charge_key, $9, kind, block, billing_tier, amount, $10, 'pending', 0, $11, $12, $13,
                        $14, $14
                   FROM input WHERE EXISTS (SELECT 1 FROM locked) ORDER BY n
                 ON CONFLICT DO NOTHING
                 RETURNING {CHARGE_COLUMNS}
             ), summary AS (
                 UPDATE token_usage_summary
                    SET {totals}
                        outstanding_count = outstanding_count + (SELECT count(*) FROM created),
                        outstanding_total = outstanding_total + (SELECT coalesce(sum(amount_charged), 0) FROM created)
                  WHERE user_id = $8 AND period = $9 AND {summary_gate}
             ), consumption AS (
                 INSERT INTO token_consumption
                     (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
                      occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
                      audit_seq)
                 SELECT $8, $12, $15, $9, $16, $17, $18, $19, $20, $21, $14, $22,
                        EXISTS (SELECT 1 FROM created WHERE kind = 'fixed_fee'), $23, $24,
                        nextval('token_billing_audit_seq_seq')
                  WHERE EXISTS (SELECT 1 FROM locked)
             ), audited AS (
                 INSERT INTO token_billing_audit (user_id, at, period, event)
                 SELECT $8, $14, $9, a.event
                   FROM input i JOIN created c ON c.id = i.id,
                        LATERAL jsonb_array_elements(i.audit) WITH ORDINALITY AS a(event, k)
                  ORDER BY i.n, a.k
             )
             SELECT EXISTS (SELECT 1 FROM locked) AS won, created.*
               FROM (SELECT 1) AS one LEFT JOIN created ON true"
        );
        let mut query = sqlx::query(&sql)
            .bind(&ids)
            .bind(&keys)
            .bind(&kinds)
            .bind(&block_numbers)
            .bind(&tiers)
            .bind(&amounts)
            .bind(&audits)
            .bind(usage.user_id.as_str())
            .bind(usage.period.to_string())
            .bind(request.plan.currency().code())
            .bind(i32::from(leased))
            .bind(usage.consumption_id)
            .bind(request.lease_until)
            .bind(usage.recorded_at);
        query = bind_consumption(query, usage, before, &blocks)?;
        if gate == Gate::CompareAndSet {
            query = bind_new_total(query, request, after)?;
        }
        let rows = query.fetch_all(executor).await.map_err(RecordFailure::Database)?;
        let won = match rows.first() {
            Some(row) => row.try_get::<bool, _>("won").map_err(db)?,
            None => false,
        };
        if !won {
            return Ok(None);
        }
        let mut created = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<uuid::Uuid>, _>("id").map_err(db)?.is_some() {
                created.push(charge_from(row)?);
            }
        }
        created.sort_by_key(|c| (c.kind != ChargeKind::FixedFee, c.block));
        Ok(Some(created))
    }

    /// Records a batch in one transaction and a fixed number of round trips: the period rows'
    /// totals, then every charge, consumption, summary change and audit entry in one statement.
    /// Events are decided in Rust, in order, by the same rule as one event at a time.
    ///
    /// `optimistic` reads the totals without locks and trusts that no event of the batch was
    /// recorded before; the write then moves each period row only if its total is still the one
    /// read, and fails on the event id's unique index if an id is taken (no speculative insert
    /// per row). Either way nothing stays: a moved total rolls the transaction back and answers
    /// `None`, a taken id is a unique violation that `record_usage_batch` retries, and the
    /// careful way, which looks up the events recorded before and locks the period rows in a
    /// fixed order (so that concurrent batches never deadlock), does it again. The careful way
    /// meets a taken id only when a writer outside those locks (the same event id in another
    /// period) took it meanwhile.
    async fn try_record_batch(
        &self,
        requests: &[RecordUsage<'_>],
        optimistic: bool,
    ) -> Result<Option<Vec<Decision>>, RecordFailure> {
        use foldhash::{HashMap, HashSet};
        use std::collections::BTreeMap;

        type Group = (UserId, PeriodKey);

        let Some(first) = requests.first() else {
            return Ok(Some(Vec::new()));
        };
        let now = first.usage.recorded_at;
        let mut tx = self.begin().await?;

        // The period rows of the batch's events, locked in the batch's key order: those that
        // exist are locked (not rewritten), the missing ones created in the same order, and a
        // row another writer created meanwhile is locked after it committed.
        let mut groups: BTreeMap<Group, &RecordUsage<'_>> = BTreeMap::new();
        for request in requests {
            groups
                .entry((request.usage.user_id.clone(), request.usage.period))
                .or_insert(request);
        }
        let mut totals: HashMap<Group, (u64, bool)> = HashMap::default();
        let mut created_rows: HashSet<Group> = HashSet::default();
        // A period row read: its key, its total, and whether it is in the currency of the
        // batch's events for it.
        let period_row = |row: &PgRow| -> Result<(Group, u64, bool), StoreError> {
            let group: Group = (
                parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
                parse(row.try_get::<&str, _>("period").map_err(db)?)?,
            );
            let total = to_u64(row.try_get("total_tokens").map_err(db)?)?;
            let currency: &str = row.try_get("currency").map_err(db)?;
            let same_currency = groups.get(&group).is_some_and(|r| r.plan.currency().code() == currency);
            Ok((group, total, same_currency))
        };
        let mut missing: Vec<(&Group, &RecordUsage<'_>)> =
            groups.iter().map(|(group, request)| (group, *request)).collect();
        for round in 0..3 {
            if missing.is_empty() {
                break;
            }
            let (users, periods): (Vec<&str>, Vec<String>) = missing
                .iter()
                .map(|((user, period), _)| (user.as_str(), period.to_string()))
                .unzip();
            // Optimistically read as they are; carefully locked, in the batch's key order.
            let lock = if optimistic { "" } else { "ORDER BY g.n FOR UPDATE OF s" };
            let mut rows = sqlx::query(&format!(
                "SELECT s.user_id, s.period, s.total_tokens, s.currency, false AS inserted
                   FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS g(user_id, period, n)
                   JOIN token_usage_summary s ON s.user_id = g.user_id AND s.period = g.period
                 {lock}"
            ))
            .bind(&users)
            .bind(&periods)
            .fetch_all(&mut *tx)
            .await
            .map_err(RecordFailure::Database)?;
            let found: HashSet<(&str, &str)> = rows
                .iter()
                .map(|row| Ok((row.try_get("user_id").map_err(db)?, row.try_get("period").map_err(db)?)))
                .collect::<Result<_, StoreError>>()?;
            let absent: Vec<usize> = (0..users.len())
                .filter(|&i| !found.contains(&(users[i], periods[i].as_str())))
                .collect();
            if optimistic && !absent.is_empty() {
                // A period opens: the careful way creates its row.
                tx.rollback().await.map_err(RecordFailure::Database)?;
                return Ok(None);
            }
            if !absent.is_empty() && round < 2 {
                let mut currencies = Vec::with_capacity(absent.len());
                let mut included = Vec::with_capacity(absent.len());
                let mut blocks = Vec::with_capacity(absent.len());
                for &i in &absent {
                    let plan = missing[i].1.plan;
                    currencies.push(plan.currency().code());
                    included.push(to_i64(plan.included_tokens())?);
                    blocks.push(to_i64(plan.block_size())?);
                }
                let absent_users: Vec<&str> = absent.iter().map(|&i| users[i]).collect();
                let absent_periods: Vec<&str> = absent.iter().map(|&i| periods[i].as_str()).collect();
                rows.extend(
                    sqlx::query(
                        "INSERT INTO token_usage_summary AS s
                             (user_id, period, currency, total_tokens, events, updated_at, included_tokens,
                              block_size)
                         SELECT g.user_id, g.period, g.currency, 0, 0, $6, g.included, g.block
                           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
                                WITH ORDINALITY AS g(user_id, period, currency, included, block, n)
                          ORDER BY g.n
                         ON CONFLICT (user_id, period) DO NOTHING
                         RETURNING s.user_id, s.period, s.total_tokens, s.currency, true AS inserted",
                    )
                    .bind(&absent_users)
                    .bind(&absent_periods)
                    .bind(&currencies)
                    .bind(&included)
                    .bind(&blocks)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(RecordFailure::Database)?,
                );
            }
            for row in &rows {
                let (group, total, same_currency) = period_row(row)?;
                if row.try_get::<bool, _>("inserted").map_err(db)? {
                    created_rows.insert(group.clone());
                }
                totals.insert(group, (total, same_currency));
            }
            // Rows another writer created between the lock and the insert: locked next round.
            missing.retain(|(group, _)| !totals.contains_key(*group));
        }

        // Events already recorded (only the host's own ids can have been): looked up by the
        // careful way once it holds the period rows, so that no writer of those periods can
        // record one of them before the write; the optimistic one finds them taken when it
        // writes.
        let mut existing: HashSet<(String, String)> = HashSet::default();
        let (users, events): (Vec<&str>, Vec<&str>) = requests
            .iter()
            .filter(|r| !optimistic && r.usage.has_host_event_id())
            .map(|r| (r.usage.user_id.as_str(), r.usage.event_id.as_str()))
            .unzip();
        if !users.is_empty() {
            let rows = sqlx::query(
                "SELECT c.user_id, c.event_id
                   FROM token_consumption c
                   JOIN unnest($1::text[], $2::text[]) AS e(user_id, event_id)
                     ON c.user_id = e.user_id AND c.event_id = e.event_id",
            )
            .bind(&users)
            .bind(&events)
            .fetch_all(&mut *tx)
            .await
            .map_err(RecordFailure::Database)?;
            for row in rows {
                existing.insert((row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?));
            }
        }
        let is_existing = |r: &RecordUsage<'_>| {
            !existing.is_empty() && existing.contains(&(r.usage.user_id.to_string(), r.usage.event_id.to_string()))
        };

        // The totals as read: the write moves a period row only from these.
        let read: HashMap<Group, u64> = totals
            .iter()
            .map(|(group, (total, _))| (group.clone(), *total))
            .collect();

        // Each event decided in order, against the totals the ones before it left.
        let mut decisions = Vec::with_capacity(requests.len());
        let mut seen: HashMap<(&UserId, &crate::domain::EventId), usize> = HashMap::default();
        let mut charges_of: Vec<Vec<crate::domain::NewCharge>> = Vec::with_capacity(requests.len());
        let mut events_per_group: HashMap<Group, i64> = HashMap::default();
        for (i, request) in requests.iter().enumerate() {
            let usage = &request.usage;
            charges_of.push(Vec::new());
            if is_existing(request) {
                decisions.push(Decision::Existing);
                continue;
            }
            if let Some(&earlier) = seen.get(&(&usage.user_id, &usage.event_id)) {
                decisions.push(Decision::Earlier(earlier));
                continue;
            }
            let group = (usage.user_id.clone(), usage.period);
            let Some((total, same_currency)) = totals.get_mut(&group) else {
                decisions.push(Decision::Refused(generic("a period row of the batch is missing")));
                continue;
            };
            if !*same_currency {
                decisions.push(Decision::Refused(currency_mismatch(request.plan.currency())));
                continue;
            }
            let before = *total;
            let Some(after) = before.checked_add(usage.tokens).filter(|t| *t <= crate::MAX_TOKENS) else {
                decisions.push(Decision::Refused(StoreError::TotalOverflow {
                    total: before,
                    tokens: usage.tokens,
                }));
                continue;
            };
            let charges = match charges_between(request, before, after) {
                Ok(charges) => charges,
                Err(error) => {
                    decisions.push(Decision::Refused(error.into()));
                    continue;
                }
            };
            charges_of[i] = charges;
            *total = after;
            *events_per_group.entry(group).or_insert(0) += 1;
            seen.insert((&usage.user_id, &usage.event_id), i);
            decisions.push(Decision::Accepted {
                before,
                after,
                charges: Vec::new(),
            });
        }

        // Everything written in one statement.
        let mut c_users = Vec::new();
        let mut c_ids = Vec::new();
        let mut c_keys = Vec::new();
        // Each period's name, written once for all its rows.
        let period_names: HashMap<PeriodKey, String> =
            groups.keys().map(|(_, period)| (*period, period.to_string())).collect();
        let name_of = |period: &PeriodKey| {
            period_names
                .get(period)
                .map(String::as_str)
                .ok_or_else(|| generic("a period of the batch without its name"))
        };
        let mut c_periods = Vec::new();
        let mut c_kinds = Vec::new();
        let mut c_blocks = Vec::new();
        let mut c_tiers = Vec::new();
        let mut c_amounts = Vec::new();
        let mut c_currencies = Vec::new();
        let mut c_consumptions = Vec::new();
        let mut c_attempts = Vec::new();
        let mut c_leases = Vec::new();
        let mut x_users = Vec::new();
        let mut x_ids = Vec::new();
        let mut x_events = Vec::new();
        let mut x_periods = Vec::new();
        let mut x_tokens = Vec::new();
        let mut x_operations = Vec::new();
        let mut x_clients: Vec<Option<&str>> = Vec::new();
        let mut x_metadata = Vec::new();
        let mut x_occurred = Vec::new();
        let mut x_reported = Vec::new();
        let mut x_before = Vec::new();
        let mut x_first = Vec::new();
        let mut x_end = Vec::new();
        let mut a_charges = Vec::new();
        let mut a_events = Vec::new();
        // Each audit entry's and each consumption's place in the audit trail: an event's
        // charges, then the event, event after event.
        let mut a_places = Vec::new();
        let mut x_places = Vec::new();
        let mut places = 0i64;
        // The charges each period row will owe, when all of them are created.
        let mut owed: HashMap<Group, (i64, i64)> = HashMap::default();
        for (i, request) in requests.iter().enumerate() {
            let Decision::Accepted { before, after, .. } = decisions[i] else {
                continue;
            };
            let usage = &request.usage;
            let period = name_of(&usage.period)?;
            let leased = request.lease_until.is_some();
            for charge in &charges_of[i] {
                let owes = owed.entry((usage.user_id.clone(), usage.period)).or_default();
                owes.0 += 1;
                owes.1 += charge.amount.minor_units();
                let id = crate::random::uuid_v4();
                c_users.push(usage.user_id.as_str());
                c_ids.push(id);
                c_keys.push(charge.key.as_str());
                c_periods.push(period);
                c_kinds.push(charge.kind.as_str());
                c_blocks.push(to_i64(charge.block)?);
                c_tiers.push(charge.billing_tier.as_str());
                c_amounts.push(charge.amount.minor_units());
                c_currencies.push(charge.amount.currency().code());
                c_consumptions.push(usage.consumption_id);
                c_attempts.push(i32::from(leased));
                c_leases.push(request.lease_until);
                for event in &created_charge_audit(charge, leased) {
                    a_charges.push(id);
                    a_events.push(audit_json(event)?);
                    places += 1;
                    a_places.push(places);
                }
            }
            let blocks = request.plan.blocks_crossed(before, after).map_err(StoreError::from)?;
            x_users.push(usage.user_id.as_str());
            x_ids.push(usage.consumption_id);
            x_events.push(usage.event_id.as_str());
            x_periods.push(period);
            x_tokens.push(to_i64(usage.tokens)?);
            x_operations.push(usage.operation_type.as_str());
            x_clients.push(usage.client_id.as_ref().map(ClientId::as_str));
            x_metadata.push(sqlx::types::Json(&usage.metadata));
            x_occurred.push(usage.occurred_at);
            x_reported.push(usage.occurred_at_reported);
            x_before.push(to_i64(before)?);
            x_first.push(to_i64(blocks.first())?);
            x_end.push(to_i64(blocks.end())?);
            places += 1;
            x_places.push(places);
        }
        let mut g_users = Vec::new();
        let mut g_periods = Vec::new();
        let mut g_totals = Vec::new();
        let mut g_events = Vec::new();
        let mut g_before = Vec::new();
        let mut g_charges = Vec::new();
        let mut g_amounts = Vec::new();
        let mut g_included = Vec::new();
        let mut g_blocks = Vec::new();
        let mut e_users = Vec::new();
        let mut e_periods = Vec::new();
        for (group, (total, _)) in &totals {
            match events_per_group.get(group) {
                Some(count) => {
                    g_users.push(group.0.as_str());
                    g_periods.push(group.1.to_string());
                    g_totals.push(to_i64(*total)?);
                    g_events.push(*count);
                    g_before.push(to_i64(read.get(group).copied().unwrap_or_default())?);
                    let (charges, amount) = owed.get(group).copied().unwrap_or_default();
                    g_charges.push(charges);
                    g_amounts.push(amount);
                    let plan = groups.get(group).ok_or_else(|| generic("a group of the batch"))?.plan;
                    g_included.push(to_i64(plan.included_tokens())?);
                    g_blocks.push(to_i64(plan.block_size())?);
                }
                // A row this batch opened for events that were all refused: not kept.
                None if created_rows.contains(group) => {
                    e_users.push(group.0.as_str());
                    e_periods.push(group.1.to_string());
                }
                None => {}
            }
        }
        // The period rows this write moves: optimistically, each one whose total is still the one
        // read, owing every charge of the batch; carefully, every one, already locked. Nothing
        // of a period is written before its row is moved, so a batch takes a period's lock
        // before it writes anything another writer of that period could wait on.
        let (moved, summary) = if optimistic {
            (
                "UPDATE token_usage_summary s
                    SET total_tokens = g.total_after, events = s.events + g.events, updated_at = $13,
                        included_tokens = coalesce(s.included_tokens, g.included),
                        block_size = coalesce(s.block_size, g.block),
                        outstanding_count = s.outstanding_count + g.charges,
                        outstanding_total = s.outstanding_total + g.amount
                   FROM groups g
                  WHERE s.user_id = g.user_id AND s.period = g.period AND s.total_tokens = g.total_before
                 RETURNING s.user_id, s.period",
                "",
            )
        } else {
            (
                "SELECT user_id, period FROM groups",
                "outstanding AS (
                     SELECT user_id, period, count(*) AS charges, sum(amount_charged) AS amount
                       FROM created GROUP BY user_id, period
                 ), summary AS (
                     UPDATE token_usage_summary s
                        SET total_tokens = g.total_after, events = s.events + g.events, updated_at = $13,
                            included_tokens = coalesce(s.included_tokens, g.included),
                            block_size = coalesce(s.block_size, g.block),
                            outstanding_count = s.outstanding_count + coalesce(o.charges, 0),
                            outstanding_total = s.outstanding_total + coalesce(o.amount, 0)
                       FROM groups g LEFT JOIN outstanding o ON o.user_id = g.user_id AND o.period = g.period
                      WHERE s.user_id = g.user_id AND s.period = g.period
                 ),",
            )
        };
        let rows = sqlx::query(&format!(
            "WITH places AS (
                 SELECT array_agg(nextval('token_billing_audit_seq_seq') ORDER BY p) AS seqs
                   FROM generate_series(1, $42::bigint) AS p
             ), charge_input AS (
                 SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                                      $7::text[], $8::bigint[], $9::text[], $10::uuid[], $11::int[],
                                      $12::timestamptz[])
                      WITH ORDINALITY AS i(user_id, id, charge_key, period, kind, block, billing_tier, amount,
                                           currency, consumption_id, attempts, lease_until, n)
             ), groups AS (
                 SELECT * FROM unnest($14::text[], $15::text[], $16::bigint[], $17::bigint[], $35::bigint[],
                                      $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[])
                      AS g(user_id, period, total_after, events, included, block, total_before, charges, amount)
             ), moved AS (
                 {moved}
             ), created AS (
                 INSERT INTO token_billing_charges
                     (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                      round, attempts, consumption_id, lease_until, created_at, updated_at)
                 SELECT i.user_id, i.id, i.charge_key, i.period, i.kind, i.block, i.billing_tier, i.amount,
                        i.currency, 'pending', 0, i.attempts, i.consumption_id, i.lease_until, $13, $13
                   FROM charge_input i JOIN moved m ON m.user_id = i.user_id AND m.period = i.period
                  ORDER BY i.n
                 ON CONFLICT DO NOTHING
                 RETURNING {CHARGE_COLUMNS}
             ), {summary} emptied AS (
                 DELETE FROM token_usage_summary s
                  USING unnest($18::text[], $19::text[]) AS e(user_id, period)
                  WHERE s.user_id = e.user_id AND s.period = e.period AND s.events = 0
             ), consumption AS (
                 INSERT INTO token_consumption
                     (user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
                      occurred_at_reported, created_at, total_before, created_fee, first_block, end_block,
                      audit_seq)
                 SELECT x.user_id, x.id, x.event_id, x.period, x.tokens, x.operation_type, x.client_id, x.metadata,
                        x.occurred_at, x.reported, $13, x.before,
                        x.id IN (SELECT c.consumption_id FROM created c WHERE c.kind = 'fixed_fee'),
                        x.first_block, x.end_block, (SELECT seqs FROM places)[x.place]
                   FROM unnest($20::text[], $21::uuid[], $22::text[], $23::text[], $24::bigint[], $25::text[],
                               $26::text[], $27::jsonb[], $28::timestamptz[], $29::bool[], $30::bigint[],
                               $31::bigint[], $32::bigint[], $41::bigint[])
                        AS x(user_id, id, event_id, period, tokens, operation_type, client_id, metadata, occurred_at,
                             reported, before, first_block, end_block, place)
                   JOIN moved m ON m.user_id = x.user_id AND m.period = x.period
                 RETURNING 1
             ), audited AS (
                 INSERT INTO token_billing_audit (user_id, seq, at, period, event)
                 SELECT c.user_id, (SELECT seqs FROM places)[a.place], $13, c.period, a.event
                   FROM unnest($33::uuid[], $34::jsonb[], $40::bigint[]) AS a(charge_id, event, place)
                   JOIN created c ON c.id = a.charge_id
             )
             SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM consumption) AS inserted,
                    (SELECT count(*) FROM created) AS charged, created.*
               FROM (SELECT 1) AS one LEFT JOIN created ON true"
        ))
        .bind(&c_users)
        .bind(&c_ids)
        .bind(&c_keys)
        .bind(&c_periods)
        .bind(&c_kinds)
        .bind(&c_blocks)
        .bind(&c_tiers)
        .bind(&c_amounts)
        .bind(&c_currencies)
        .bind(&c_consumptions)
        .bind(&c_attempts)
        .bind(&c_leases)
        .bind(now)
        .bind(&g_users)
        .bind(&g_periods)
        .bind(&g_totals)
        .bind(&g_events)
        .bind(&e_users)
        .bind(&e_periods)
        .bind(&x_users)
        .bind(&x_ids)
        .bind(&x_events)
        .bind(&x_periods)
        .bind(&x_tokens)
        .bind(&x_operations)
        .bind(&x_clients)
        .bind(&x_metadata)
        .bind(&x_occurred)
        .bind(&x_reported)
        .bind(&x_before)
        .bind(&x_first)
        .bind(&x_end)
        .bind(&a_charges)
        .bind(&a_events)
        .bind(&g_included)
        .bind(&g_blocks)
        .bind(&g_before)
        .bind(&g_charges)
        .bind(&g_amounts)
        .bind(&a_places)
        .bind(&x_places)
        .bind(places)
        .fetch_all(&mut *tx)
        .await
        .map_err(RecordFailure::from_write)?;
        let counts = |column: &str| -> Result<usize, StoreError> {
            let count: i64 = rows.first().map_or(Ok(0), |row| row.try_get(column)).map_err(db)?;
            usize::try_from(count).map_err(generic)
        };
        let lost = counts("moved")? != g_users.len()
            || counts("inserted")? != x_users.len()
            || (optimistic && counts("charged")? != c_users.len());
        if lost {
            // A total moved since it was read, an event id or a charge was taken: nothing of
            // this stays.
            tx.rollback().await.map_err(RecordFailure::Database)?;
            return Ok(None);
        }
        let mut created: HashMap<uuid::Uuid, Vec<Charge>> = HashMap::default();
        for row in &rows {
            if row.try_get::<Option<uuid::Uuid>, _>("id").map_err(db)?.is_none() {
                continue;
            }
            let charge = charge_from(row)?;
            if let Some(consumption) = charge.consumption_id {
                created.entry(consumption).or_default().push(charge);
            }
        }
        tx.commit().await.map_err(RecordFailure::Database)?;
        for (decision, request) in decisions.iter_mut().zip(requests) {
            if let Decision::Accepted { charges, .. } = decision {
                *charges = created.remove(&request.usage.consumption_id).unwrap_or_default();
                charges.sort_by_key(|c| (c.kind != ChargeKind::FixedFee, c.block));
            }
        }
        Ok(Some(decisions))
    }

    /// The answers to a batch whose decisions are committed, each event moved into its answer.
    /// The batch is written: a failure here (reading an event recorded before it) is that
    /// event's answer, never the batch's, so that nothing makes the host send the batch again.
    async fn batch_answers(
        &self,
        requests: Vec<RecordUsage<'_>>,
        decisions: Vec<Decision>,
    ) -> Vec<Result<Recorded, StoreError>> {
        let mut results: Vec<Result<Recorded, StoreError>> = Vec::with_capacity(requests.len());
        for (request, decision) in requests.into_iter().zip(decisions) {
            let usage = request.usage;
            results.push(match decision {
                Decision::Accepted { before, after, charges } => Ok(Recorded {
                    usage: Arc::new(usage),
                    total_before: before,
                    total_after: after,
                    charges,
                    replayed: false,
                }),
                Decision::Earlier(earlier) => match &results[earlier] {
                    Ok(original) => Recorded {
                        replayed: true,
                        ..original.clone()
                    }
                    .answer_resend(&usage),
                    Err(_) => Err(generic("an earlier event of the batch with the same id was refused")),
                },
                Decision::Existing => match self.recorded_event(&usage.user_id, &usage.event_id).await {
                    Ok(Some(original)) => original.answer_resend(&usage),
                    Ok(None) => Err(generic("an event recorded before the batch is gone")),
                    Err(error) => Err(error),
                },
                Decision::Refused(error) => Err(error),
            });
        }
        results
    }

    /// Leases, in one statement, up to `limit` charges that `kind` picks and nobody holds
    /// (`FOR UPDATE SKIP LOCKED`), applies its changes, and audits them.
    async fn claim(
        &self,
        kind: &ClaimKind,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let ClaimKind {
            status,
            due: due_column,
            set,
            audit,
        } = kind;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "WITH picked AS (
                 SELECT user_id, id FROM token_billing_charges
                  WHERE status = $1 AND {due_column} AND ($3::text IS NULL OR user_id = $3)
                  ORDER BY created_at
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE token_billing_charges c SET {set}, lease_until = $5, updated_at = $2
                   FROM picked WHERE c.user_id = picked.user_id AND c.id = picked.id
                 RETURNING c.*
             ), audited AS (
                 INSERT INTO token_billing_audit (user_id, at, period, event)
                 SELECT claimed.user_id, $2, claimed.period, e.event
                   FROM claimed, LATERAL ({audit}) AS e(event)
             )
             SELECT {CHARGE_COLUMNS} FROM claimed ORDER BY created_at"
        );
        let rows = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(now)
            .bind(user.map(UserId::as_str))
            .bind(limit)
            .bind(lease_until)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        // The claim is committed: a row that cannot be read must not take the others with it.
        // It stays leased, and is taken again (and logged again) when its lease expires.
        Ok(rows
            .iter()
            .filter_map(|row| match charge_from(row) {
                Ok(charge) => Some(charge),
                Err(error) => {
                    tracing::error!(error = %error, "a claimed charge could not be read; it is skipped");
                    None
                }
            })
            .collect())
    }
}

#[async_trait]
impl UsageStore for PostgresUsageStore {
    async fn put_account(&self, account: Account) -> Result<(), StoreError> {
        static PUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "{INSERT_ACCOUNT}
                 ON CONFLICT (user_id) DO UPDATE
                    SET customer_id = EXCLUDED.customer_id, plan_id = EXCLUDED.plan_id,
                        earlier_plans = EXCLUDED.earlier_plans, subscription_id = EXCLUDED.subscription_id,
                        created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
            )
        });
        self.save_account(&PUT, account, None).await.map(|_| ())
    }

    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        static REPLACE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "UPDATE token_billing_accounts AS a
                    SET customer_id = $2, plan_id = $3, earlier_plans = $4, subscription_id = $5, created_at = $6,
                        updated_at = $7
                  WHERE a.user_id = $1 AND {} AND a.created_at = $13",
                account_unchanged(8)
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

    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
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

    async fn account_for_usage(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        match self.accounts.get(user) {
            Some(account) => Ok(Some(account)),
            None => self.account(user).await,
        }
    }

    async fn accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
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

    async fn record_usage_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        // The first attempt is optimistic; the next ones are careful (see `try_record_batch`). A
        // concurrent record of an event of the batch makes an attempt give up, and the next one
        // answers that event as a replay.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.try_record_batch(&requests, attempts == 1).await {
                Ok(Some(decisions)) => return Ok(self.batch_answers(requests, decisions).await),
                Ok(None) if attempts < 4 => continue,
                Ok(None) => return Err(generic("the batch kept meeting concurrent records of its events")),
                Err(RecordFailure::Store(error)) => return Err(error),
                Err(RecordFailure::Database(error)) if is_duplicate_event(&error) && attempts < 4 => continue,
                // An optimistic write updates its period rows in no fixed order, and a careful one
                // locks rows created by another batch after its own: the rare lock cycle that
                // makes is broken by PostgreSQL, and the batch runs again, carefully.
                Err(RecordFailure::Database(error)) if is_deadlock(&error) && attempts < 4 => continue,
                Err(RecordFailure::Overflow) => return Err(generic("a period total passed BIGINT")),
                // Batches are placed with accounts read afresh, and carry none to check.
                Err(RecordFailure::AccountChanged) => return Err(generic("a batch checked an account")),
                Err(RecordFailure::Database(error)) => return Err(db(error)),
            }
        }
    }

    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        // One statement when the event creates no charge; else a compare-and-set; else the
        // locking transaction. A concurrent record of the same event makes the locking one fail
        // on the event's unique index, and the next attempt answers it as a replay: two attempts
        // suffice, the third is a margin.
        let account_changed = |request: RecordUsage<'_>| {
            self.accounts.forget(&request.usage.user_id);
            Err(StoreError::AccountChanged {
                usage: Box::new(request.usage),
            })
        };
        match self.try_record_direct(&request).await {
            Ok(Some(recorded)) => return Ok(recorded),
            // A new period, charges to create, a resend, a changed account: the ways below.
            Ok(None) => {}
            Err(RecordFailure::AccountChanged) => return account_changed(request),
            Err(RecordFailure::Store(error)) => return Err(error),
            Err(RecordFailure::Database(error)) if is_deadlock(&error) => {}
            Err(RecordFailure::Overflow) => {}
            Err(RecordFailure::Database(error)) => return Err(db(error)),
        }
        match self.try_record_fast(&request).await {
            Ok(Some(recorded)) => return Ok(recorded),
            // A new period, or a total that kept moving: the locking path.
            Ok(None) => {}
            Err(RecordFailure::AccountChanged) => return account_changed(request),
            Err(RecordFailure::Store(error)) => return Err(error),
            // A concurrent record of the same event won the unique index: answered below.
            Err(RecordFailure::Database(error)) if is_duplicate_event(&error) || is_deadlock(&error) => {}
            Err(RecordFailure::Overflow) => {}
            Err(RecordFailure::Database(error)) => return Err(db(error)),
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.try_record(&request).await {
                Ok(recorded) => return Ok(recorded),
                Err(RecordFailure::AccountChanged) => return account_changed(request),
                Err(RecordFailure::Store(error)) => return Err(error),
                Err(RecordFailure::Database(error)) if is_duplicate_event(&error) && attempts < 3 => continue,
                // The same event id sent concurrently for two periods can meet a batch holding
                // the other period row: PostgreSQL breaks the cycle, and this runs again.
                Err(RecordFailure::Database(error)) if is_deadlock(&error) && attempts < 3 => continue,
                Err(RecordFailure::Overflow) => {
                    let total = self
                        .period_summary(&request.usage.user_id, request.usage.period)
                        .await?
                        .map_or(0, |s| s.total_tokens);
                    return Err(StoreError::TotalOverflow {
                        total,
                        tokens: request.usage.tokens,
                    });
                }
                Err(RecordFailure::Database(error)) => return Err(db(error)),
            }
        }
    }

    async fn ensure_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError> {
        let EnsureCharge {
            charge,
            status,
            payment_id,
            now,
            lease_until,
            plan,
        } = request;
        let (user, key) = (charge.user_id.clone(), charge.key.clone());
        let mut tx = self.begin().await?;
        Self::ensure_summary(
            &mut tx,
            &user,
            charge.period,
            charge.amount.currency(),
            plan.as_ref(),
            now,
        )
        .await?;
        let created =
            Self::insert_charges(&mut tx, vec![charge], status, payment_id.as_deref(), now, lease_until).await?;
        tx.commit().await.map_err(db)?;
        match created.into_iter().next() {
            Some(charge) => Ok((charge, true)),
            None => {
                let existing = self.charge(&user, &key).await?.ok_or_else(|| StoreError::NotFound {
                    what: "charge",
                    key: key.to_string(),
                })?;
                Ok((existing, false))
            }
        }
    }

    async fn claim_pending(
        &self,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_PENDING, user, now, lease_until, limit).await
    }

    async fn claim_due_retries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_RETRIES, None, now, lease_until, limit).await
    }

    async fn claim_awaiting_customer(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_AWAITING, None, now, lease_until, limit).await
    }

    async fn renew_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE token_billing_charges SET lease_until = $4
              WHERE user_id = $1 AND charge_key = $2 AND status = 'pending' AND lease_until IS NOT DISTINCT FROM $3
              RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(user.as_str())
        .bind(key.as_str())
        .bind(held_until)
        .bind(lease_until)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(charge_from).transpose()
    }

    async fn settle_charge(&self, s: Settlement<'_>) -> Result<Charge, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND charge_key = $2 FOR UPDATE"
        ))
        .bind(s.user_id.as_str())
        .bind(s.key.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound {
            what: "charge",
            key: s.key.to_string(),
        })?;
        let current = charge_from(&row)?;
        if current.status != s.expected_status || current.round != s.expected_round {
            return Err(StoreError::StatusConflict {
                charge: Box::new(current),
            });
        }
        if !current.status.can_become(s.status) {
            return Err(StoreError::ForbiddenTransition {
                from: current.status,
                to: s.status,
            });
        }
        let succeeded = s.status == ChargeStatus::Succeeded;
        let replace_failure = !succeeded && (s.failure_code.is_some() || s.failure_message.is_some());
        let row = sqlx::query(&format!(
            "UPDATE token_billing_charges
                SET status = $3, payment_id = COALESCE($4, payment_id),
                    failure_code = CASE WHEN $5 THEN NULL WHEN $6 THEN $7 ELSE failure_code END,
                    failure_message = CASE WHEN $5 THEN NULL WHEN $6 THEN $8 ELSE failure_message END,
                    next_retry_at = $9, lease_until = $10, updated_at = $11
              WHERE user_id = $1 AND charge_key = $2
              RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(s.user_id.as_str())
        .bind(s.key.as_str())
        .bind(s.status.as_str())
        .bind(s.payment_id.as_deref())
        .bind(succeeded)
        .bind(replace_failure)
        .bind(s.failure_code.as_deref())
        .bind(s.failure_message.as_deref())
        .bind(if s.status == ChargeStatus::Failed {
            s.next_retry_at
        } else {
            None
        })
        .bind(s.lease_until)
        .bind(s.at)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let charge = charge_from(&row)?;
        let delta = SummaryDelta::of(charge.kind, charge.amount.minor_units(), Some(current.status), s.status);
        Self::move_summary(&mut tx, s.user_id, charge.period, charge.amount.currency(), delta, s.at).await?;
        Self::audit(
            &mut tx,
            s.user_id,
            Some(charge.period),
            s.at,
            &[AuditEvent::ChargeStatusChanged {
                key: charge.key.clone(),
                from: current.status,
                to: s.status,
                payment_id: charge.payment_id.clone(),
                failure_code: charge.failure_code.clone(),
            }],
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(charge)
    }

    async fn recorded_event(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
        let mut tx = self.begin().await?;
        let found = Self::replay_in(&mut tx, user, event_id).await?;
        tx.rollback().await.map_err(db)?;
        Ok(found)
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        Self::audit(&mut tx, &entry.user_id, entry.period, entry.at, &[entry.event]).await?;
        tx.commit().await.map_err(db)
    }

    async fn gateway_event_applied(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM token_billing_gateway_events WHERE user_id = $1 AND event_id = $2)",
        )
        .bind(user.as_str())
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    async fn record_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        let audit = audit_json(&record.audit)?;
        // One statement: the id and its audit entry together, or neither.
        let inserted: i64 = sqlx::query_scalar(
            "WITH recorded AS (
                 INSERT INTO token_billing_gateway_events (user_id, event_id, event_type, applied_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, event_id) DO NOTHING
                 RETURNING user_id
             ), audited AS (
                 INSERT INTO token_billing_audit (user_id, at, period, event)
                 SELECT user_id, $4, $5, $6 FROM recorded
             )
             SELECT count(*) FROM recorded",
        )
        .bind(record.user_id.as_str())
        .bind(&record.event_id)
        .bind(&record.event_type)
        .bind(record.at)
        .bind(record.period.map(|p| p.to_string()))
        .bind(audit)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(inserted > 0)
    }

    async fn charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND charge_key = $2"
        ))
        .bind(user.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(charge_from).transpose()
    }

    async fn charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND period = $2
              ORDER BY kind DESC, block"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }

    async fn unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = $1 AND status IN ('failed', 'requires_action') ORDER BY created_at, kind DESC, block"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }

    async fn consumptions(&self, user: &UserId, period: PeriodKey) -> Result<Vec<UsageRecord>, StoreError> {
        sqlx::query(
            "SELECT user_id, id, event_id, period, tokens_used, operation_type, client_id, metadata, occurred_at,
                    occurred_at_reported, created_at
               FROM token_consumption WHERE user_id = $1 AND period = $2 ORDER BY total_before",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(usage_from)
        .collect()
    }

    async fn period_summary(&self, user: &UserId, period: PeriodKey) -> Result<Option<PeriodSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, period, currency, total_tokens, events, fixed_fee_charged, tier_charges_count,
                    tier_charges_total, outstanding_count, outstanding_total, updated_at
               FROM token_usage_summary WHERE user_id = $1 AND period = $2",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(summary_from).transpose()
    }

    async fn usage_by_operation(&self, user: &UserId, period: PeriodKey) -> Result<Vec<OperationUsage>, StoreError> {
        sqlx::query(
            "SELECT operation_type, SUM(tokens_used)::bigint AS total_tokens, COUNT(*) AS operations
               FROM token_consumption WHERE user_id = $1 AND period = $2
              GROUP BY operation_type ORDER BY operation_type COLLATE \"C\"",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(OperationUsage {
                operation_type: parse::<OperationType>(row.try_get::<&str, _>("operation_type").map_err(db)?)?,
                total_tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
                operations: to_u64(row.try_get("operations").map_err(db)?)?,
            })
        })
        .collect()
    }

    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError> {
        sqlx::query(
            "SELECT billing_tier, MIN(currency) AS currency, COUNT(*) AS charges_count,
                    SUM(amount_charged)::bigint AS total_charged,
                    COALESCE(SUM(amount_charged) FILTER (WHERE status = 'succeeded'), 0)::bigint AS collected
               FROM token_billing_charges WHERE user_id = $1 AND period = $2
              GROUP BY billing_tier, block ORDER BY block",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
            Ok(TierChargeReport {
                billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
                charges_count: to_u64(row.try_get("charges_count").map_err(db)?)?,
                total_charged: Money::from_minor(row.try_get("total_charged").map_err(db)?, currency),
                collected: Money::from_minor(row.try_get("collected").map_err(db)?, currency),
            })
        })
        .collect()
    }

    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError> {
        // Usage entries are the consumptions placed in the trail's order (migration 7); older
        // ones, and those `record_token_consumption` writes, are audit rows of their own.
        sqlx::query(
            "SELECT at, period, event FROM (
                 SELECT seq, at, period, event FROM token_billing_audit
                  WHERE user_id = $1 AND ($2::text IS NULL OR period = $2)
                 UNION ALL
                 SELECT audit_seq, created_at, period,
                        jsonb_build_object('type', 'usage_recorded', 'consumption_id', id, 'event_id', event_id,
                                           'tokens', tokens_used, 'total_after', total_before + tokens_used)
                   FROM token_consumption
                  WHERE user_id = $1 AND ($2::text IS NULL OR period = $2) AND audit_seq IS NOT NULL
             ) AS trail ORDER BY seq",
        )
        .bind(user.as_str())
        .bind(period.map(|p| p.to_string()))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(AuditEntry {
                at: row.try_get("at").map_err(db)?,
                user_id: user.clone(),
                period: row
                    .try_get::<Option<&str>, _>("period")
                    .map_err(db)?
                    .map(parse::<PeriodKey>)
                    .transpose()?,
                event: serde_json::from_value(row.try_get("event").map_err(db)?).map_err(generic)?,
            })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(n: usize) -> Account {
        let at = DateTime::from_timestamp(1_795_000_000, 0).expect("an instant");
        Account {
            user_id: UserId::new(format!("user-{n}")).expect("a user id"),
            customer_id: None,
            plan_id: crate::PlanId::new("default").expect("a plan id"),
            earlier_plans: Vec::new(),
            subscription_id: None,
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
        let kept: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().expect("a shard").accounts.len())
            .sum();
        assert!(kept <= 32, "{kept} accounts kept");
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
