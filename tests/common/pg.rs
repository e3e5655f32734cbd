//! Test schemas on a real PostgreSQL, for the tests of the PostgreSQL store (feature
//! `postgres`): `DATABASE_URL` names the database; without it, the local default
//! `postgres://postgres@127.0.0.1:5432/test` is used. `.ci/run` starts PostgreSQL and creates it.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use token_billing::PostgresUsageStore;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// How old a test schema must be before a later run drops it: far longer than any run lasts.
const SCHEMA_KEPT_SECONDS: u64 = 3_600;

/// A new schema, so that a test that collects across all users (`resume_pending`, the claims of
/// the conformance suite) sees only its own data. Its name carries its creation time: the first
/// test of a run drops the schemas earlier runs left, once they are an hour old, so that a
/// long-lived development database does not fill up with them.
pub async fn schema() -> String {
    static CLEANED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let schema = format!("tb_test_{now}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let url = database_url();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at {url} is needed for these tests (set DATABASE_URL): {error}"));
    if !CLEANED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT nspname FROM pg_namespace WHERE nspname ~ '^tb_test_[0-9]+_'")
                .fetch_all(&admin)
                .await
                .expect("test schemas");
        for name in names {
            let created = name
                .trim_start_matches("tb_test_")
                .split('_')
                .next()
                .and_then(|t| t.parse::<u64>().ok());
            if created.is_some_and(|created| now.saturating_sub(created) > SCHEMA_KEPT_SECONDS) {
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&admin)
                    .await
                    .expect("drop an old test schema");
            }
        }
    }
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    schema
}

/// A store on its own pool in `schema`, migrated.
pub async fn store_in(schema: &str) -> PostgresUsageStore {
    let options = PgConnectOptions::from_str(&database_url())
        .expect("a valid DATABASE_URL")
        .options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect");
    let store = PostgresUsageStore::from_pool(pool);
    store.migrate().await.expect("migrate");
    store
}

/// A store in a schema of its own.
pub async fn store() -> PostgresUsageStore {
    store_in(&schema().await).await
}
