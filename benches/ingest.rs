#![allow(missing_docs)] // criterion_group! generates undocumented functions
// Rates and durations of a benchmark, not money.
#![allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
//! `process_token_usage` in one process: the in-memory store and the sandbox gateway.
//!
//! `cargo bench --bench ingest`

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::metadata;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use token_billing::{
    BillingService, EventRetention, InMemoryUsageStore, Plan, SandboxGateway, UnregisteredUsers, UsageReport,
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

/// Reports built, then timed, this many at a time: small enough to stay in cache, as the
/// reports of a host's requests are.
const CHUNK: u64 = 512;

/// Runs `events` reports spread over `USERS` users on `threads` threads, one core each, and
/// returns the wall-clock time the calls took.
///
/// Each thread drives its own Tokio runtime (so that the two streams of calls really run on
/// two cores: on one two-worker runtime, a task woken by the other is often run by the same
/// worker, and the two take turns). The threads build their reports a chunk at a time (what a
/// host spends building reports is not the library's), then wait for each other, process
/// their chunks at once, and wait for each other again; each times every round from the moment
/// all are ready to the moment all are done, and the longest total is the answer. If the
/// threads did not really run in parallel, the rounds take longer: the time is never
/// flattered.
fn run(billing: &BillingService, events: u64, tokens: u64, threads: u64) -> Duration {
    let parties = usize::try_from(threads).expect("a thread count");
    let (ready, done) = (Barrier::new(parties), Barrier::new(parties));
    let mine = events / threads;
    let elapsed = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (billing, ready, done) = (billing.clone(), &ready, &done);
                scope.spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("a runtime");
                    let metadata = metadata();
                    let mut elapsed = Duration::ZERO;
                    let mut sent = 0;
                    while sent < mine {
                        let chunk: Vec<UsageReport> = (sent..mine.min(sent + CHUNK))
                            .map(|i| {
                                let user = format!("user-{}", (i * threads + thread) % USERS);
                                UsageReport::new(user, tokens, "chat").metadata(metadata.clone())
                            })
                            .collect();
                        sent += chunk.len() as u64;
                        ready.wait();
                        let start = Instant::now();
                        runtime.block_on(async {
                            for report in chunk {
                                billing.process_token_usage(report).await.expect("recorded");
                            }
                        });
                        done.wait();
                        elapsed += start.elapsed();
                    }
                    elapsed
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a thread"))
            .max()
            .unwrap_or_default()
    });
    // The time for `events`, from the events actually sent (a multiple of `threads`).
    elapsed.mul_f64(events as f64 / (mine * threads).max(1) as f64)
}

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("process_token_usage");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);

    // Events of 1,000 tokens on the original product's plan: after each user's first event opens the period,
    // nothing is charged for a long time. The service is reused, so users keep accumulating.
    // With every event kept, memory grows with each one; keeping only what dedupe and the
    // reports need (these events carry no event id of the host's) it does not.
    for (name, retention) in [
        ("uncharged_two_tasks", EventRetention::All),
        ("uncharged_two_tasks_resendable_kept", EventRetention::Resendable),
    ] {
        let billing = service(Plan::default(), retention);
        run(&billing, USERS, 1_000, 2);
        group.bench_function(name, |b| b.iter_custom(|iters| run(&billing, iters.max(2), 1_000, 2)));
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
        run(&billing, USERS, 1_000, 2);
        group.bench_function(name, |b| b.iter_custom(|iters| run(&billing, iters.max(2), 1_000, 2)));
    }
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
