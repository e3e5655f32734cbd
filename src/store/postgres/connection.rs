//! Connecting [`PostgresUsageStore`] to a database: the pool, the schema migrations and applying
//! them, the transactions every write runs in, and the connection a caller keeps between writes.

use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::PostgresUsageStore;
use super::accounts::{ACCOUNT_CACHE, AccountCache};
use super::rows::db;
use crate::store::StoreError;

/// The schema migrations, in order: also shipped as plain SQL under `migrations/` for hosts that
/// run their own migration tool.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../../migrations/0001_token_billing.sql")),
    (
        2,
        include_str!("../../../migrations/0002_functions_and_row_level_security.sql"),
    ),
    (3, include_str!("../../../migrations/0003_record_token_consumption.sql")),
    (4, include_str!("../../../migrations/0004_gateway_events.sql")),
    (5, include_str!("../../../migrations/0005_give_up.sql")),
    (6, include_str!("../../../migrations/0006_consumption_key.sql")),
    (
        7,
        include_str!("../../../migrations/0007_usage_audit_from_consumption.sql"),
    ),
    (8, include_str!("../../../migrations/0008_spend_control.sql")),
    (9, include_str!("../../../migrations/0009_token_classes.sql")),
];

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
            group: Arc::default(),
            totals: Arc::default(),
            grouping: true,
        }
    }

    /// Whether single events recorded at the same time by this process's callers are gathered
    /// into shared writes (group commit; on unless turned off): each round of events is one
    /// statement and one commit, and each caller still gets its own event's answer, exactly as
    /// without it. Each round task (two at most) keeps one of the pool's connections from round
    /// to round, and gives it back when the pool has none to spare, after a second, or 10 ms
    /// after its last event. With 16 callers it records more than twice, with 64 more than four
    /// times as many events a second as `pgbench -N` commits transactions (BENCHMARKS.md); off,
    /// about as many.
    ///
    /// Turn it off when the store is used from several Tokio runtimes that stop while others
    /// still record (rounds run on tasks of the runtime of the caller that starts them, and a
    /// round cut short answers its callers [`StoreError::Unavailable`](crate::StoreError), to be
    /// sent again), or when other sessions hold locks on the summary rows for long (a round that
    /// waits for one delays every event in it).
    ///
    /// # Example
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use token_billing::PostgresUsageStore;
    ///
    /// let store = PostgresUsageStore::connect("postgres://postgres@127.0.0.1/test")
    ///     .await?
    ///     .with_group_commit(false);
    /// # let _ = store; Ok(()) }
    /// ```
    #[must_use]
    pub fn with_group_commit(self, on: bool) -> PostgresUsageStore {
        PostgresUsageStore { grouping: on, ..self }
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

    pub(super) async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(db)
    }
}

/// A connection of the pool that a caller recording one write after another keeps between
/// them (the group commit's task: `decide_batch`, `record_event_on`), instead of taking one
/// from the pool, and by default testing it with a round trip, for each. `None` until the
/// first write takes one; set back to `None` to give it back.
pub(super) type Lent = Option<sqlx::pool::PoolConnection<Postgres>>;
