#![allow(missing_docs)] // criterion_group! generates undocumented functions
// Rates and durations of a benchmark, not money.
#![allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
//! `process_token_usage` in one process: the in-memory store and the sandbox gateway.
//!
//! `cargo bench --bench ingest`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use token_billing::{
    BillingService, EventRetention, InMemoryUsageStore, Metadata, Plan, SandboxGateway, UnregisteredUsers, UsageReport,
};

const USERS: u64 = 10_000;

fn service(plan: Plan, retention: EventRetention) -> BillingService {
    let store = InMemoryUsageStore::builder().events(retention).build();
    BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
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

/// Reports built, then timed, this many at a time: small enough to stay in cache, as the
/// reports of a host's requests are.
const CHUNK: u64 = 512;

/// Runs `events` reports spread over `USERS` users on `tasks` tasks of a multi-threaded runtime
/// with two workers, and returns how long they take at the rate `process_token_usage` sustains.
///
/// Each task builds its reports on its own worker, a chunk at a time, and times only the calls:
/// what a host spends building reports is not the library's. The tasks run at once, so the
/// rates they measure add up to the throughput of both cores.
fn run(runtime: &tokio::runtime::Runtime, billing: &BillingService, events: u64, tokens: u64, tasks: u64) -> Duration {
    let rates = runtime.block_on(async {
        let mut handles = Vec::new();
        for task in 0..tasks {
            let billing = billing.clone();
            handles.push(tokio::spawn(async move {
                let metadata = metadata();
                let mut busy = Duration::ZERO;
                let mut done = 0;
                let mine = events / tasks;
                while done < mine {
                    let chunk: Vec<UsageReport> = (done..mine.min(done + CHUNK))
                        .map(|i| {
                            let user = format!("user-{}", (i * tasks + task) % USERS);
                            UsageReport::new(user, tokens, "chat").metadata(metadata.clone())
                        })
                        .collect();
                    done += chunk.len() as u64;
                    let start = Instant::now();
                    for report in chunk {
                        billing.process_token_usage(report).await.expect("recorded");
                    }
                    busy += start.elapsed();
                }
                (done, busy)
            }));
        }
        let mut rates = Vec::new();
        for handle in handles {
            rates.push(handle.await.expect("task"));
        }
        rates
    });
    // Events per second of all tasks together, and the time `events` take at that rate.
    let per_second: f64 = rates
        .iter()
        .map(|(done, busy)| *done as f64 / busy.as_secs_f64().max(1e-9))
        .sum();
    Duration::from_secs_f64(events as f64 / per_second)
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
    // With every event kept, memory grows with each one; keeping only what dedupe and the
    // reports need (these events carry no event id of the host's) it does not.
    for (name, retention) in [
        ("uncharged_two_tasks", EventRetention::All),
        ("uncharged_two_tasks_resendable_kept", EventRetention::Resendable),
    ] {
        let billing = service(Plan::default(), retention);
        run(&runtime, &billing, USERS, 1_000, 2);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(&runtime, &billing, iters.max(2), 1_000, 2))
        });
    }

    // Every event crosses a block and is charged through the sandbox.
    let every_event_charged = Plan::builder()
        .included_tokens(0)
        .block_size(1_000)
        .build()
        .expect("valid");
    for (name, retention) in [
        ("every_event_charged_two_tasks", EventRetention::All),
        (
            "every_event_charged_two_tasks_resendable_kept",
            EventRetention::Resendable,
        ),
    ] {
        let billing = service(every_event_charged.clone(), retention);
        run(&runtime, &billing, USERS, 1_000, 2);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(&runtime, &billing, iters.max(2), 1_000, 2))
        });
    }
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
