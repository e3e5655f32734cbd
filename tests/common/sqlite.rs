//! Test databases for the SQLite store (feature `sqlite`): a new file for each store, under
//! cargo's temporary directory for integration tests, so that tests do not share a write lock
//! (and a check that claims across all users sees only its own charges).

use std::path::PathBuf;

use token_billing::SqliteUsageStore;

/// A path for a new database file, under a directory of this test run.
pub fn fresh_path(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sqlite");
    std::fs::create_dir_all(&dir).expect("a directory for test databases");
    dir.join(format!("{tag}-{}.db", uuid::Uuid::new_v4().simple()))
}

/// The `sqlite://` URL of a path.
pub fn url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A store on a new file.
pub async fn store() -> SqliteUsageStore {
    SqliteUsageStore::connect(&url(&fresh_path("store")))
        .await
        .expect("a SQLite store on a new file")
}
