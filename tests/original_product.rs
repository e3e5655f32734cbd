//! The original product's own examples and tests, on the embedded defaults.

mod common;

use common::{Harness, november, user};
use token_billing::{BillingService, ChargeStatus, Plan, UsageReport};

#[tokio::test]
async fn one_million_tokens_create_no_tier_charge() {
    // The original product: processTokenUsage('test-user-id', 1000000, 'chat') -> tierCharges: [] (within 8M).
    let h = Harness::new();
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("test-user-id", 1_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.total_tokens, 1_000_000);
    assert!(outcome.tier_charges.is_empty());
    assert_eq!(outcome.current_tier, "0-8M");
    let fee = outcome.fixed_fee_charge.expect("the period opened: the fixed fee");
    assert_eq!((fee.amount_charged, fee.status), (40_000, ChargeStatus::Succeeded));
}

#[tokio::test]
async fn ten_million_tokens_create_exactly_one_charge_of_the_second_tier() {
    // The original product: processTokenUsage('test-user-id', 10000000, 'chat') -> tierCharges: [charge].
    let h = Harness::new();
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("test-user-id", 10_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.total_tokens, 10_000_000);
    assert_eq!(outcome.tier_charges.len(), 1);
    let charge = &outcome.tier_charges[0];
    assert_eq!(charge.billing_tier, "8M-16M");
    assert_eq!(charge.amount_charged, 10_000);
    assert_eq!(charge.status, ChargeStatus::Succeeded);
    h.assert_period_consistent(&user("test-user-id"), november(), &Plan::default())
        .await;
}

#[tokio::test]
async fn embedded_default_runs_the_original_products_test_as_written() {
    // BillingService::embedded() with the system clock: the original product's two tests in sequence.
    let billing = BillingService::embedded();
    let first = billing
        .process_token_usage(UsageReport::new("test-user-id", 1_000_000, "chat"))
        .await
        .expect("recorded");
    assert!(first.tier_charges.is_empty());
    let second = billing
        .process_token_usage(UsageReport::new("test-user-id", 10_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(second.total_tokens, 11_000_000);
    assert_eq!(second.tier_charges.len(), 1);
    assert_eq!(second.tier_charges[0].billing_tier, "8M-16M");
}

#[tokio::test]
async fn api_example_with_four_million_included_is_reproduced_exactly() {
    let plan = Plan::builder().included_tokens(4_000_000).build().expect("valid plan");
    let h = Harness::with_plan(plan.clone());
    let outcome = h
        .service
        .process_token_usage(
            UsageReport::new("user-uuid", 5_000_000, "chat")
                .client_id("client-uuid")
                .metadata_entry("conversationId", "conv-123")
                .metadata_entry("agentId", "agent-456"),
        )
        .await
        .expect("recorded");
    assert_eq!(outcome.total_tokens, 5_000_000);
    assert_eq!(outcome.tier_charges.len(), 1);
    assert_eq!(outcome.tier_charges[0].billing_tier, "4M-12M");
    assert_eq!(outcome.tier_charges[0].amount_charged, 10_000);
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Succeeded);

    let summary = h
        .service
        .token_summary(&user("user-uuid"), None)
        .await
        .expect("summary");
    assert_eq!(summary.total_tokens, 5_000_000);
    assert_eq!(summary.current_tier, "4M-12M");
    assert_eq!(summary.fixed_fee_charged, 40_000);
    assert_eq!(summary.tier_charges_count, 1);
    assert_eq!(summary.tier_charges_total, 10_000);
    assert_eq!(summary.total_charged, 50_000);
    assert_eq!(summary.period, november());
    h.assert_period_consistent(&user("user-uuid"), november(), &plan).await;

    // The original product's JSON shapes, field for field.
    let json = serde_json::to_value(&outcome).expect("serialise");
    assert_eq!(json["consumptionId"], outcome.consumption_id.to_string());
    assert_eq!(json["totalTokens"], 5_000_000);
    assert_eq!(json["tierCharges"][0]["billing_tier"], "4M-12M");
    assert_eq!(json["tierCharges"][0]["amount_charged"], 10_000);
    assert_eq!(json["tierCharges"][0]["status"], "succeeded");
    assert!(json["tierCharges"][0]["id"].is_string());
    let json = serde_json::to_value(&summary).expect("serialise");
    for (field, value) in [
        ("total_tokens", serde_json::json!(5_000_000)),
        ("current_tier", serde_json::json!("4M-12M")),
        ("fixed_fee_charged", serde_json::json!(40_000)),
        ("tier_charges_count", serde_json::json!(1)),
        ("tier_charges_total", serde_json::json!(10_000)),
        ("total_charged", serde_json::json!(50_000)),
        ("period", serde_json::json!("2026-11")),
        ("currency", serde_json::json!("BRL")),
    ] {
        assert_eq!(json[field], value, "{field}");
    }
}

#[tokio::test]
async fn monitoring_reports_answer_the_original_products_queries() {
    let h = Harness::new();
    for (tokens, op) in [(6_000_000, "chat"), (3_000_000, "api_call"), (9_000_000, "chat")] {
        h.service
            .process_token_usage(UsageReport::new("user-uuid", tokens, op))
            .await
            .expect("recorded");
    }
    let u = user("user-uuid");
    let by_op = h.service.usage_by_operation(&u, None).await.expect("report");
    let rows: Vec<_> = by_op
        .iter()
        .map(|r| (r.operation_type.as_str(), r.total_tokens, r.operations))
        .collect();
    assert_eq!(rows, [("api_call", 3_000_000, 1), ("chat", 15_000_000, 2)]);
    let by_tier = h.service.charges_by_tier(&u, None).await.expect("report");
    let rows: Vec<_> = by_tier
        .iter()
        .map(|r| (r.billing_tier.as_str(), r.charges_count, r.total_charged.minor_units()))
        .collect();
    assert_eq!(
        rows,
        [("0-8M", 1, 40_000), ("8M-16M", 1, 10_000), ("16M-24M", 1, 10_000)]
    );
}

#[tokio::test]
async fn summary_of_a_user_without_usage_is_zero_in_the_plan_currency() {
    let h = Harness::new();
    let summary = h.service.token_summary(&user("nobody"), None).await.expect("summary");
    assert_eq!(
        (
            summary.total_tokens,
            summary.total_charged,
            summary.current_tier.as_str()
        ),
        (0, 0, "0-8M")
    );
    assert_eq!(summary.currency.code(), "BRL");
}
