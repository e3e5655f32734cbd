//! What the benchmarks share. Each benchmark uses some of it.
#![allow(dead_code)]

use token_billing::{BillingService, Metadata, UsageReport};

/// The metadata of every benchmark's events: three keys, as a host attaches to a request.
pub(crate) fn metadata() -> Metadata {
    Metadata::from([
        ("conversationId", "conv-123"),
        ("agentId", "agent-456"),
        ("model", "gpt-large"),
    ])
}

/// Records `events` events of 1,000 tokens for `user`, a thousand per batch.
pub(crate) async fn load(billing: &BillingService, user: &str, events: u64) {
    let mut sent = 0;
    while sent < events {
        let batch = (events - sent).min(1_000);
        let reports = (0..batch).map(|_| UsageReport::new(user, 1_000, "chat")).collect();
        let outcomes = billing.process_token_usage_batch(reports).await.expect("a batch");
        assert!(outcomes.iter().all(Result::is_ok), "every event recorded");
        sent += batch;
    }
}
