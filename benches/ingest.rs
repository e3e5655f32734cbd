#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! `process_token_usage` in one process: the in-memory store and the sandbox gateway.
//!
//! `cargo bench --bench ingest`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use token_billing::{
    BillingService, InMemoryUsageStore, Metadata, Plan, SandboxGateway, UnregisteredUsers, UsageReport,
};

const USERS: u64 = 10_000;

fn service(plan: Plan) -> BillingService {
    BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
        .plan(plan)
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .max_tokens_per_event(u64::from(u32::MAX))
        .build()
}

fn metadata() -> Metadata {
    Metadata::from([
        ("conversationId".to_owned(), "conv-123".to_owned()),
        ("agentId".to_owned(), "agent-456".to_owned()),
        ("model".to_owned(), "gpt-large".to_owned()),
    ])
}

/// Runs `events` reports spread over `USERS` users on `tasks` tasks of a multi-threaded runtime
/// with two workers, and returns the elapsed time.
fn run(runtime: &tokio::runtime::Runtime, billing: &BillingService, events: u64, tokens: u64, tasks: u64) -> Duration {
    let metadata = metadata();
    runtime.block_on(async {
        let start = Instant::now();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let billing = billing.clone();
            let metadata = metadata.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..events / tasks {
                    let user = format!("user-{}", (i * tasks + task) % USERS);
                    billing
                        .process_token_usage(UsageReport::new(user, tokens, "chat").metadata(metadata.clone()))
                        .await
                        .expect("recorded");
                }
            }));
        }
        for handle in handles {
            handle.await.expect("task");
        }
        start.elapsed()
    })
}

fn ingest(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("process_token_usage");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);

    // Events of 1,000 tokens on the seed's plan: after each user's first event opens the period,
    // nothing is charged for a long time. The service is reused, so users keep accumulating.
    let billing = service(Plan::default());
    run(&runtime, &billing, USERS, 1_000, 2);
    group.bench_function("uncharged_two_tasks", |b| {
        b.iter_custom(|iters| run(&runtime, &billing, iters.max(2), 1_000, 2))
    });

    // Every event crosses a block and is charged through the sandbox.
    let every_event_charged = Plan::builder()
        .included_tokens(0)
        .block_size(1_000)
        .build()
        .expect("valid");
    let billing = service(every_event_charged);
    run(&runtime, &billing, USERS, 1_000, 2);
    group.bench_function("every_event_charged_two_tasks", |b| {
        b.iter_custom(|iters| run(&runtime, &billing, iters.max(2), 1_000, 2))
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
