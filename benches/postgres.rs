#![allow(missing_docs)] // criterion_group! generates undocumented functions
// Rates and durations of a benchmark, not money.
#![allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
//! The PostgreSQL store under `process_token_usage`: one event per call with one caller
//! (latency) and with sixteen (throughput), and batches; and `reserve`, one caller and sixteen. `benches/compare-with-pgbench.sh`
//! runs these beside `pgbench -N` on the same server and prints the ratios.
//!
//! `DATABASE_URL` names the server (`postgres://postgres@127.0.0.1:5432/test` by default); the
//! benchmark works in a schema of its own.
//!
//! `cargo bench --features postgres --bench postgres`

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{load, metadata};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use token_billing::{
    BillingService, Limits, PostgresUsageStore, Reservation, SandboxGateway, UnregisteredUsers, UsageReport, UserId,
};

/// Users the events are spread over: each caller has its own, as pgbench's clients update
/// random rows of their own.
const USERS: u64 = 1_600;

/// Events in one batch.
const BATCH: u64 = 1_000;

/// Users of each caller of the batch benchmark: a batch of 1,000 events moves 800 periods.
const USERS_PER_BATCH_CALLER: u64 = 800;

/// Callers of the batch benchmark: `BATCH_CALLERS`, two by default.
fn batch_callers() -> u64 {
    std::env::var("BATCH_CALLERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A service on a fresh schema, and the schema's name (dropped when the benchmark ends).
async fn service() -> (BillingService, String) {
    let url = database_url();
    let schema = format!("tb_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is needed (set DATABASE_URL): {e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let options = PgConnectOptions::from_str(&url)
        .expect("a valid DATABASE_URL")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(70)
        .connect_with(options)
        .await
        .expect("connect");
    // With the group commit (the store's default), unless `GROUP_COMMIT=off` (each single event
    // in a transaction of its own, to compare).
    let grouping = std::env::var("GROUP_COMMIT").map_or(true, |v| v != "off");
    let store = PostgresUsageStore::from_pool(pool).with_group_commit(grouping);
    store.migrate().await.expect("migrate");
    let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    (billing, schema)
}

async fn drop_schema(schema: &str) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
        .expect("connect");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .expect("drop schema");
    admin.close().await;
}

/// A new event id for every event of every run.
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn report(user: u64) -> UsageReport {
    let n = EVENTS.fetch_add(1, Ordering::Relaxed);
    UsageReport::new(format!("bench-user-{user}"), 1_000, "chat")
        .metadata(metadata())
        .event_id(format!("bench-{n}"))
}

/// The group commit's rounds and events, by benchmark, read from its round-size metric with a
/// recorder installed for the benchmark: each round is one transaction, so rounds per event
/// is commits per event. Events recorded with the group commit off are not counted.
static ROUNDS: std::sync::OnceLock<metrics_util::debugging::Snapshotter> = std::sync::OnceLock::new();
static COMMITS: Mutex<Vec<(&str, u64, u64)>> = Mutex::new(Vec::new());

/// Runs `measure`, and keeps the rounds and events the group commit recorded meanwhile.
fn counted_commits(name: &'static str, measure: impl FnOnce() -> Duration) -> Duration {
    let snapshotter = ROUNDS.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the benchmark's recorder");
        snapshotter
    });
    // Taking a snapshot empties the histograms: what is read after `measure` is its own.
    drop(snapshotter.snapshot());
    let elapsed = measure();
    let (mut rounds, mut events) = (0u64, 0u64);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let metrics_util::debugging::DebugValue::Histogram(sizes) = value {
            if key.key().name() == "token_billing_group_commit_round_events" {
                rounds += sizes.len() as u64;
                // Round sizes are whole counts of events, recorded as floats by the facade.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let sum = sizes.iter().map(|s| s.into_inner() as u64).sum::<u64>();
                events += sum;
            }
        }
    }
    COMMITS.lock().expect("commits").push((name, rounds, events));
    elapsed
}

/// Prints the commits per event of each benchmark (rounds per event of the group commit).
fn print_commits() {
    let mut by_name: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
    for (name, rounds, events) in std::mem::take(&mut *COMMITS.lock().expect("commits")) {
        let entry = by_name.entry(name).or_default();
        entry.0 += rounds;
        entry.1 += events;
    }
    for (name, (rounds, events)) in by_name {
        if events > 0 {
            println!(
                "postgres_one_event/{name} commits per event: {:.3} ({rounds} rounds, {events} events)",
                rounds as f64 / events as f64
            );
        }
    }
}

/// How long each event took with one caller, for its median: pgbench reports latencies per
/// transaction, and criterion's estimates are of means over many events.
static LATENCIES: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

/// `events` events by `callers` concurrent callers, each on users of its own; the elapsed time.
fn one_at_a_time(runtime: &tokio::runtime::Runtime, billing: &BillingService, events: u64, callers: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let billing = billing.clone();
                // Exactly `events` events in all, as evenly spread as they go.
                let own = events / callers + u64::from(caller < events % callers);
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(if callers == 1 {
                        usize::try_from(own).unwrap_or(0)
                    } else {
                        0
                    });
                    for i in 0..own {
                        let user = (caller + i * callers) % USERS;
                        let start = Instant::now();
                        billing.process_token_usage(report(user)).await.expect("recorded");
                        if callers == 1 {
                            latencies.push(start.elapsed());
                        }
                    }
                    LATENCIES.lock().expect("latencies").extend(latencies);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller");
        }
        start.elapsed()
    })
}

/// `holds` reservations by `callers` concurrent callers, each on users of its own, every hold
/// of one second (so that a user's holds stay few, as calls finish); the elapsed time. With one
/// caller each reservation's latency is kept, for the median.
fn reserving(runtime: &tokio::runtime::Runtime, billing: &BillingService, holds: u64, callers: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let billing = billing.clone();
                let own = holds / callers + u64::from(caller < holds % callers);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for i in 0..own {
                        let user = (caller + i * callers) % USERS;
                        let n = EVENTS.fetch_add(1, Ordering::Relaxed);
                        let reservation = Reservation::new(format!("bench-user-{user}"), 1_000)
                            .hold_id(format!("hold-{n}"))
                            .ttl(Duration::from_secs(1));
                        let start = Instant::now();
                        billing.reserve(reservation).await.expect("granted");
                        if callers == 1 {
                            latencies.push(start.elapsed());
                        }
                    }
                    RESERVE_LATENCIES.lock().expect("latencies").extend(latencies);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller");
        }
        start.elapsed()
    })
}

/// How long each reservation took with one caller.
static RESERVE_LATENCIES: Mutex<Vec<Duration>> = Mutex::new(Vec::new());

/// The median and 99th percentile of `latencies`, printed under `name`.
fn print_latencies(name: &str, mut latencies: Vec<Duration>) {
    latencies.sort_unstable();
    if let (Some(median), Some(p99)) = (
        latencies.get(latencies.len() / 2),
        latencies.get(latencies.len() * 99 / 100),
    ) {
        println!(
            "{name} latency per event: median {} us, p99 {} us, {} events",
            median.as_micros(),
            p99.as_micros(),
            latencies.len()
        );
    }
}

/// `batches` batches of `BATCH` events by `callers` concurrent callers, each over its own 800
/// users (as the sixteen callers above have their own), so that a batch moves 800 periods.
fn batched(runtime: &tokio::runtime::Runtime, billing: &BillingService, batches: u64, callers: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let billing = billing.clone();
                let own = batches / callers + u64::from(caller < batches % callers);
                tokio::spawn(async move {
                    for b in 0..own {
                        let reports = (0..BATCH)
                            .map(|i| report(caller + callers * ((b * BATCH + i) % USERS_PER_BATCH_CALLER)))
                            .collect();
                        let outcomes = billing.process_token_usage_batch(reports).await.expect("a batch");
                        assert!(outcomes.iter().all(Result::is_ok));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller");
        }
        start.elapsed()
    })
}

fn postgres(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (billing, schema) = runtime.block_on(service());
    // Every user's period is opened (its fee charged) before measuring the steady state.
    runtime.block_on(async {
        let reports = (0..USERS.max(batch_callers() * USERS_PER_BATCH_CALLER))
            .map(report)
            .collect();
        billing.process_token_usage_batch(reports).await.expect("warm-up");
    });

    let mut group = c.benchmark_group("postgres_one_event");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("one_caller", |b| {
        b.iter_custom(|iters| one_at_a_time(&runtime, &billing, iters, 1))
    });
    group.bench_function("sixteen_callers", |b| {
        b.iter_custom(|iters| counted_commits("sixteen_callers", || one_at_a_time(&runtime, &billing, iters, 16)))
    });
    group.bench_function("sixty_four_callers", |b| {
        b.iter_custom(|iters| counted_commits("sixty_four_callers", || one_at_a_time(&runtime, &billing, iters, 64)))
    });
    group.finish();
    print_commits();
    print_latencies(
        "postgres_one_event/one_caller",
        std::mem::take(&mut *LATENCIES.lock().expect("latencies")),
    );

    // Holds for calls in flight, for users with a token cap, decided in one statement each.
    runtime.block_on(async {
        for user in 0..USERS {
            let user = UserId::new(format!("bench-user-{user}")).expect("a user id");
            billing
                .set_limits(&user, Some(Limits::none().with_token_cap(1_000_000_000_000)))
                .await
                .expect("limits");
        }
    });
    let mut group = c.benchmark_group("postgres_reserve");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("one_caller", |b| {
        b.iter_custom(|iters| reserving(&runtime, &billing, iters, 1))
    });
    group.bench_function("sixteen_callers", |b| {
        b.iter_custom(|iters| reserving(&runtime, &billing, iters, 16))
    });
    group.finish();
    print_latencies(
        "postgres_reserve/one_caller",
        std::mem::take(&mut *RESERVE_LATENCIES.lock().expect("latencies")),
    );

    let mut group = c.benchmark_group("postgres_batch");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let callers = batch_callers();
    let name = if callers == 2 {
        "batches_of_1000_two_callers".to_owned()
    } else {
        format!("batches_of_1000_{callers}_callers")
    };
    group.bench_function(name, |b| {
        b.iter_custom(|iters| batched(&runtime, &billing, iters, callers))
    });
    group.finish();

    // `token_summary` for a user with 1,000 events in the period and one with 1,000,000, each
    // loaded only when its benchmark is selected.
    let heavy_events = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        10_000
    };
    let mut group = c.benchmark_group("postgres_token_summary");
    for (name, user, events) in [
        ("after_1k_events", "summary-light", 1_000u64),
        ("after_1m_events", "summary-heavy", heavy_events),
    ] {
        let user = UserId::new(user).expect("a user id");
        let mut loaded = false;
        group.bench_function(name, |b| {
            if !loaded {
                runtime.block_on(load(&billing, user.as_str(), events));
                loaded = true;
            }
            b.iter(|| {
                let summary = runtime.block_on(billing.token_summary(&user, None)).expect("a summary");
                assert_eq!(summary.total_tokens, events * 1_000);
                summary
            })
        });
    }
    group.finish();
    runtime.block_on(drop_schema(&schema));
}

criterion_group!(benches, postgres);
criterion_main!(benches);
