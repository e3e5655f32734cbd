//! `GET /metrics` over real HTTP: the library's metrics in Prometheus's text format, for the
//! backend key only.

use serde_json::json;

use super::{API_KEY, config, data, serve, token_for, variables};

#[tokio::test]
async fn metrics_are_scraped_in_prometheus_text_with_the_backend_key() {
    let server = serve(
        config::configure(variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("TOKEN_BILLING_JWT_SECRET", super::JWT_SECRET),
        ]))
        .await
        .expect("configured"),
    )
    .await;
    data(
        &server
            .usage(json!({"userId": "scraped", "tokensUsed": 9_000_000, "operationType": "chat"}))
            .await,
    );
    let refused = server
        .usage(json!({"userId": "scraped", "tokensUsed": 0, "operationType": "chat"}))
        .await;
    assert_eq!(refused.status, 400);

    assert_eq!(server.get("/metrics", None).await.status, 401);
    assert_eq!(
        server.get("/metrics", Some(&token_for("scraped", 60))).await.status,
        403,
        "a user's token does not read the service's metrics"
    );
    let scraped = server.get("/metrics", Some(API_KEY)).await;
    assert_eq!(scraped.status, 200, "{}", scraped.body);
    assert!(
        scraped
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        scraped.header("content-type")
    );
    let value = |name: &str| -> f64 {
        scraped
            .body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {}", scraped.body))
    };
    // Other tests of this binary report too: at least this test's events are counted.
    assert!(value("token_billing_events_recorded_total") >= 1.0);
    assert!(value("token_billing_events_refused_total{reason=\"invalid\"}") >= 1.0);
    assert!(value("token_billing_charges_created_total{kind=\"block\"}") >= 1.0);
    assert!(value("token_billing_collections_total{outcome=\"succeeded\"}") >= 2.0);
    assert!(
        scraped.body.contains("# HELP token_billing_events_recorded_total"),
        "described: {}",
        scraped.body
    );
    assert!(scraped.body.contains("token_billing_collection_duration_seconds"));
}
