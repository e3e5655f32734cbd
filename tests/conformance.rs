//! The conformance suites, run against the in-memory store (as a concrete value, a `Box<dyn>` and
//! an `Arc<dyn>`) and the sandbox gateway.

use std::sync::Arc;

use token_billing::testing::gateway::SandboxFixture;
use token_billing::{EventRetention, InMemoryUsageStore, PaymentGateway, SandboxGateway, UsageStore};

token_billing::usage_store_conformance!(in_memory_concrete, async { InMemoryUsageStore::new() });
token_billing::usage_store_conformance!(in_memory_boxed, async {
    Box::new(InMemoryUsageStore::with_shards(4)) as Box<dyn UsageStore>
});
token_billing::usage_store_conformance!(in_memory_arc, async {
    Arc::new(InMemoryUsageStore::with_shards(1)) as Arc<dyn UsageStore>
});
token_billing::usage_store_conformance!(in_memory_keeping_resendable_events, async {
    InMemoryUsageStore::builder()
        .events(EventRetention::Resendable)
        .periods_kept(2)
        .build()
});

token_billing::payment_gateway_conformance!(sandbox_concrete, async {
    let sandbox = SandboxGateway::new();
    (sandbox.clone(), SandboxFixture(sandbox))
});
token_billing::payment_gateway_conformance!(sandbox_boxed, async {
    let sandbox = SandboxGateway::new();
    (
        Box::new(sandbox.clone()) as Box<dyn PaymentGateway>,
        SandboxFixture(sandbox),
    )
});
token_billing::payment_gateway_conformance!(sandbox_arc, async {
    let sandbox = SandboxGateway::new();
    (
        Arc::new(sandbox.clone()) as Arc<dyn PaymentGateway>,
        SandboxFixture(sandbox),
    )
});
