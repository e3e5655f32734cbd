//! Opening [`SqliteUsageStore`]'s database file: the connection settings that make a committed
//! write durable and let several processes share the file, the schema migrations, and the write
//! transactions every change runs in.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, Transaction};

use super::SqliteUsageStore;
use super::rows::{db, instant, is_busy};
use crate::store::StoreError;

/// The SQLite schema migrations, in order: also shipped as plain SQL under `migrations/sqlite/`
/// for hosts that run their own migration tool.
pub const SQLITE_MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../../migrations/sqlite/0001_token_billing.sql"))];

/// How long a write waits for another connection or process to finish its own before it is
/// answered [`StoreError::Unavailable`], unless the options say otherwise.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections that read, beside the one that writes.
const READERS: u32 = 4;

impl SqliteUsageStore {
    /// Opens the database at `url` (`sqlite://billing.db`, or a plain path), creating the file
    /// if it does not exist, and applies the migrations.
    ///
    /// The connections use the write-ahead log, `synchronous = FULL` (SQLite's setting under
    /// which a committed transaction survives a power loss in that mode) and a busy timeout of
    /// 30 seconds. For other settings, pass your own options to
    /// [`connect_with`](Self::connect_with).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use token_billing::SqliteUsageStore;
    ///
    /// let dir = std::env::temp_dir().join(format!("token-billing-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let store = SqliteUsageStore::connect(&format!("sqlite://{}", dir.join("billing.db").display())).await?;
    /// # drop(store); std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened or stays locked; other store
    /// errors when the URL is malformed or a migration fails.
    pub async fn connect(url: &str) -> Result<SqliteUsageStore, StoreError> {
        SqliteUsageStore::connect_with(SqliteUsageStore::options(url)?).await
    }

    /// Opens the database with `options`, after setting on them what the store relies on: the
    /// file is created if missing, the journal is the write-ahead log, `synchronous` is `FULL`,
    /// and foreign keys are on. The busy timeout is left as given when the options set one
    /// (sqlx's default is 5 seconds; [`connect`](Self::connect) sets 30).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<SqliteUsageStore, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        // A database in memory exists once per connection: one connection does everything.
        let in_memory = options.get_filename().as_os_str().is_empty()
            || options.get_filename().to_string_lossy().contains(":memory:");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(u32::from(in_memory))
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(READERS)
                .acquire_timeout(BUSY_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(db)?
        };
        let store = SqliteUsageStore { writer, reader };
        store.migrate().await?;
        Ok(store)
    }

    /// The default options with the store's busy timeout: start from these to change one
    /// setting and pass them to [`connect_with`](Self::connect_with).
    ///
    /// # Errors
    /// A malformed URL.
    pub fn options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        Ok(SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .busy_timeout(BUSY_TIMEOUT))
    }

    /// The pool the store writes through (one connection: SQLite writes one transaction at a
    /// time, and callers of one process queue here rather than in SQLite's busy handler).
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// Applies the migrations not applied yet, in one write transaction, so that processes
    /// opening the file together apply each once. Safe to call at every start.
    ///
    /// # Errors
    /// Store errors.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS token_billing_migrations (
                 version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL) STRICT",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        for (version, sql) in SQLITE_MIGRATIONS {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM token_billing_migrations WHERE version = ?1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if applied.is_none() {
                sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db)?;
                sqlx::query("INSERT INTO token_billing_migrations (version, applied_at) VALUES (?1, ?2)")
                    .bind(version)
                    .bind(instant(chrono::Utc::now()))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
        }
        tx.commit().await.map_err(db)
    }

    /// A write transaction, begun `IMMEDIATE`: it takes the database's write lock at once, so
    /// that what it reads stays true until it commits, and no later statement of it can fail
    /// for a lock another process holds. SQLite's busy handler waits for the lock up to the
    /// busy timeout; a lock still held after a few such waits is answered
    /// [`StoreError::Unavailable`], nothing written.
    pub(super) async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let mut attempts = 0;
        loop {
            match self.writer.begin_with("BEGIN IMMEDIATE").await {
                Ok(tx) => return Ok(tx),
                Err(error) if is_busy(&error) && attempts < 2 => {
                    attempts += 1;
                    tracing::debug!("the SQLite database stayed locked for the busy timeout: waiting again");
                }
                Err(error) => return Err(db(error)),
            }
        }
    }

    /// A read transaction: its reads see one committed state of the database.
    pub(super) async fn read(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.reader.begin().await.map_err(db)
    }
}
