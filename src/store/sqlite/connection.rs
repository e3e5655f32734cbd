//! Opening [`SqliteUsageStore`]'s database file: the connection settings that make a committed
//! write durable and let several processes share the file, the schema migrations, and the write
//! transactions every change runs in.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use super::SqliteUsageStore;
use super::rows::{db, generic, instant, is_busy};
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
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use token_billing::SqliteUsageStore;
    ///
    /// # let dir = std::env::temp_dir().join(format!("token-billing-doc-with-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let url = format!("sqlite://{}", dir.join("billing.db").display());
    /// // Writers of other processes are waited for up to two minutes.
    /// let options = SqliteUsageStore::options(&url)?.busy_timeout(Duration::from_secs(120));
    /// let store = SqliteUsageStore::connect_with(options).await?;
    /// # drop(store); std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<SqliteUsageStore, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        // A database in memory exists once per connection, and the store reads on others.
        let file = options.get_filename().to_string_lossy();
        if file.is_empty() || file.contains(":memory:") || file.contains("sqlx-in-memory") {
            return Err(generic(
                "a SQLite database in memory is not shared between connections: name a file, or use the \
                 in-memory store",
            ));
        }
        // Hand-written rather than a pool of one: taking a connection from sqlx's pool costs
        // about 70 µs, a quarter of a durable commit (benches/sqlite.rs), and the writer is
        // taken for every event.
        let writer = Writer {
            conn: SqliteConnection::connect_with(&options).await.map_err(db)?,
            options: options.clone(),
            suspect: false,
        };
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            // A SQLite connection is a file handle in this process, not a socket to check.
            .test_before_acquire(false)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(db)?;
        let store = SqliteUsageStore {
            writer: Arc::new(Mutex::new(writer)),
            reader,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The default options with the store's busy timeout: start from these to change one
    /// setting and pass them to [`connect_with`](Self::connect_with).
    ///
    /// # Errors
    /// A malformed URL, or a URL of another scheme than `sqlite:`.
    pub fn options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
        // sqlx reads any other URL as a relative path (`postgres:` a directory).
        if url.contains("://") && !url.starts_with("sqlite:") {
            return Err(generic(format!(
                "{} is not a SQLite URL: sqlite://<file>",
                url.split("://").next().unwrap_or_default()
            )));
        }
        Ok(SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .busy_timeout(BUSY_TIMEOUT))
    }

    /// The pool of connections the store reads with, for a host's own queries of the file
    /// (the original product's monitoring queries run on it).
    pub fn pool(&self) -> &SqlitePool {
        &self.reader
    }

    /// Applies the migrations not applied yet, in one write transaction, so that processes
    /// opening the file together apply each once. Safe to call at every start.
    ///
    /// # Errors
    /// Store errors.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
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

    /// The writing connection, once the writers of this process before the caller are done:
    /// SQLite writes one transaction at a time, and the process's writers queue here, in
    /// order, rather than in SQLite's busy handler, which sleeps.
    pub(super) async fn writer(&self) -> Result<MutexGuard<'_, Writer>, StoreError> {
        let mut writer = self.writer.lock().await;
        if writer.suspect {
            // A transaction may be open that nobody will end, holding the file's write lock:
            // closing the connection ends it (SQLite rolls it back).
            tracing::warn!("the SQLite writing connection was left mid-begin or failed: opening it again");
            writer.conn = SqliteConnection::connect_with(&writer.options).await.map_err(db)?;
            writer.suspect = false;
        }
        Ok(writer)
    }

    /// A read transaction: its reads see one committed state of the database.
    pub(super) async fn read(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.reader.begin().await.map_err(db)
    }
}

/// The connection every write of a [`SqliteUsageStore`] goes through, with what it needs to
/// open it again.
#[derive(Debug)]
pub(super) struct Writer {
    conn: SqliteConnection,
    options: SqliteConnectOptions,
    /// Set while a `BEGIN` runs, and after one failed for another reason than a lock: a caller
    /// dropped in between (a client gone, a timeout) leaves a transaction open that sqlx has
    /// not handed to anyone, so the next writer opens the connection again.
    suspect: bool,
}

impl Writer {
    /// A write transaction, begun `IMMEDIATE`: it takes the database's write lock at once, so
    /// that what it reads stays true until it commits, and no later statement of it can fail
    /// for a lock another process holds. SQLite's busy handler waits for the lock up to the
    /// busy timeout; a lock still held then is answered [`StoreError::Unavailable`], nothing
    /// written. A transaction dropped before its commit is rolled back before the connection's
    /// next statement.
    pub(super) async fn begin(&mut self) -> Result<Transaction<'_, Sqlite>, StoreError> {
        self.suspect = true;
        let begun = self.conn.begin_with("BEGIN IMMEDIATE").await;
        self.suspect = begun.as_ref().is_err_and(|error| !is_busy(error));
        begun.map_err(db)
    }
}
