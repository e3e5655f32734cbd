//! Accounts in [`SqliteUsageStore`]: saving one with its audit entry, a compare-and-set of one,
//! and reading them. Accounts are always read from the file, never cached: another process may
//! change them.

use sqlx::SqliteConnection;

use super::SqliteUsageStore;
use super::record::append_audit_in;
use super::rows::{ACCOUNT_COLUMNS, account_as_stored, account_from, db, instant, json};
use crate::domain::UserId;
use crate::store::{Account, AuditEvent, StoreError};

impl SqliteUsageStore {
    /// [`UsageStore::put_account`](crate::UsageStore::put_account).
    pub(super) async fn upsert_account(&self, account: Account) -> Result<(), StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        save_in(&mut tx, &account).await?;
        tx.commit().await.map_err(db)
    }

    /// [`UsageStore::replace_account`](crate::UsageStore::replace_account): the read and the
    /// write in one write transaction.
    pub(super) async fn replace_stored_account(
        &self,
        expected: Option<&Account>,
        account: Account,
    ) -> Result<bool, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        if account_in(&mut tx, &account.user_id).await? != expected.cloned().map(account_as_stored) {
            return Ok(false);
        }
        save_in(&mut tx, &account).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    /// [`UsageStore::account`](crate::UsageStore::account).
    pub(super) async fn read_account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        account_in(&mut conn, user).await
    }

    /// [`UsageStore::accounts`](crate::UsageStore::accounts): one query for all of them.
    pub(super) async fn read_accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
        let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
        let rows = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM token_billing_accounts
              WHERE user_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(json(&ids)?)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        let found = rows.iter().map(account_from).collect::<Result<Vec<_>, _>>()?;
        Ok(users
            .iter()
            .map(|user| found.iter().find(|account| account.user_id == *user).cloned())
            .collect())
    }
}

/// The user's account, read on `conn` (in a transaction when the caller needs it to stay so).
async fn account_in(conn: &mut SqliteConnection, user: &UserId) -> Result<Option<Account>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM token_billing_accounts WHERE user_id = ?1"
    ))
    .bind(user.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    row.as_ref().map(account_from).transpose()
}

/// Inserts or replaces the account, with its audit entry.
async fn save_in(conn: &mut SqliteConnection, account: &Account) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO token_billing_accounts
             (user_id, customer_id, plan_id, earlier_plans, subscription_id, limits, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (user_id) DO UPDATE SET customer_id = excluded.customer_id, plan_id = excluded.plan_id,
             earlier_plans = excluded.earlier_plans, subscription_id = excluded.subscription_id,
             limits = excluded.limits, created_at = excluded.created_at, updated_at = excluded.updated_at",
    )
    .bind(account.user_id.as_str())
    .bind(account.customer_id.as_ref().map(|c| c.as_str().to_owned()))
    .bind(account.plan_id.as_str())
    .bind(json(&account.earlier_plans)?)
    .bind(account.subscription_id.as_deref())
    .bind(account.limits.as_ref().map(json).transpose()?)
    .bind(instant(account.created_at))
    .bind(instant(account.updated_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    let event = AuditEvent::AccountSaved {
        customer_id: account.customer_id.clone(),
        plan_id: account.plan_id.clone(),
    };
    append_audit_in(conn, &account.user_id, account.updated_at, None, &event).await
}
