//! The HTTP service on the SQLite store (`DATABASE_URL=sqlite://...`, feature `sqlite`): usage
//! reported over real HTTP is kept in the file across a restart of the service, and a resend
//! after the restart is answered as the original.

use serde_json::json;

use super::{API_KEY, config, data, serve, variables};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_usage_survives_a_restart_and_a_resend_after_it_is_answered_once() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("server-sqlite");
    std::fs::create_dir_all(&dir).expect("a directory");
    let url = format!(
        "sqlite://{}",
        dir.join(format!("{}.db", uuid::Uuid::new_v4().simple())).display()
    );
    let vars = [
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("DATABASE_URL", url.as_str()),
        ("TOKEN_BILLING_GATEWAY", "sandbox"),
    ];
    let first = config::configure(variables(&vars)).await.expect("configured");
    assert!(first.description.contains("SQLite"), "{}", first.description);
    let server = serve(first).await;
    let report = json!({"userId": "durable", "tokensUsed": 10_000_000, "operationType": "chat", "eventId": "evt-1"});
    let recorded = data(&server.usage(report.clone()).await);
    assert_eq!(recorded["tierCharges"][0]["status"], json!("succeeded"));
    drop(server);

    // Another start of the service on the same file.
    let restarted = serve(config::configure(variables(&vars)).await.expect("configured again")).await;
    let summary = data(
        &restarted
            .get("/api/token-billing/user-summary/durable", Some(API_KEY))
            .await,
    );
    assert_eq!(
        (summary["total_tokens"].clone(), summary["total_charged"].clone()),
        (json!(10_000_000), json!(50_000))
    );
    let resent = data(&restarted.usage(report).await);
    assert_eq!(
        resent["consumptionId"], recorded["consumptionId"],
        "the original's answer: {resent}"
    );
    assert_eq!(restarted.recorded("durable").await, (1, 10_000_000));
}

/// A `DATABASE_URL` of another kind is refused at start, naming the two it takes.
#[tokio::test]
async fn a_database_url_of_another_kind_is_refused() {
    let Err(error) = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("DATABASE_URL", "mysql://root@127.0.0.1/test"),
        ("TOKEN_BILLING_GATEWAY", "sandbox"),
    ]))
    .await
    else {
        panic!("a MySQL URL is refused");
    };
    let error = error.to_string();
    assert!(error.contains("sqlite://") && error.contains("postgres://"), "{error}");
}
