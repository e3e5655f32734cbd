#![allow(missing_docs)] // criterion_group! generates undocumented functions
// Rates and durations of a benchmark, not money.
#![allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
//! The SQLite store under `process_token_usage`, one event per call, with one caller and with
//! eight, beside a plain SQLite insert of the same rows into the same table of another file,
//! opened the same way (write-ahead log, `synchronous = FULL`, one writing connection), in the
//! same run; and `token_summary` after 1,000 events and after 100,000. At the end it prints each
//! rate and the ratio of the store's to the plain insert's.
//!
//! `cargo bench --features sqlite --bench sqlite`

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{load, metadata};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sqlx::SqlitePool;
use token_billing::{BillingService, SandboxGateway, SqliteUsageStore, UnregisteredUsers, UsageReport, UserId};

/// Users the events are spread over, each caller on users of its own.
const USERS: u64 = 1_600;

/// Time and events measured for each benchmark, for the rates printed at the end.
static MEASURED: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

static EVENTS: AtomicU64 = AtomicU64::new(0);

fn measured(name: &'static str, elapsed: Duration, events: u64) -> Duration {
    let mut all = MEASURED.lock().expect("measured");
    let entry = all.entry(name).or_default();
    entry.0 += elapsed;
    entry.1 += events;
    elapsed
}

/// A new database file under this run's directory.
fn fresh_file(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sqlite-bench");
    std::fs::create_dir_all(&dir).expect("a directory");
    dir.join(format!("{tag}-{}.db", uuid::Uuid::new_v4().simple()))
}

fn report(user: u64) -> UsageReport {
    let n = EVENTS.fetch_add(1, Ordering::Relaxed);
    UsageReport::new(format!("bench-user-{user}"), 1_000, "chat")
        .metadata(metadata())
        .event_id(format!("bench-{n}"))
}

/// `events` events by `callers` concurrent callers, each on users of its own; the elapsed time.
fn one_at_a_time(runtime: &tokio::runtime::Runtime, billing: &BillingService, events: u64, callers: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let billing = billing.clone();
                let own = events / callers + u64::from(caller < events % callers);
                tokio::spawn(async move {
                    for i in 0..own {
                        let user = (caller + i * callers) % USERS;
                        billing.process_token_usage(report(user)).await.expect("recorded");
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

/// The same rows inserted by plain SQL, one transaction each (SQLite's autocommit), by
/// `callers` concurrent callers through one writing connection.
fn plain_inserts(runtime: &tokio::runtime::Runtime, pool: &SqlitePool, events: u64, callers: u64) -> Duration {
    let metadata = serde_json::to_string(&metadata()).expect("metadata");
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let pool = pool.clone();
                let metadata = metadata.clone();
                let own = events / callers + u64::from(caller < events % callers);
                tokio::spawn(async move {
                    for i in 0..own {
                        let user = (caller + i * callers) % USERS;
                        let n = EVENTS.fetch_add(1, Ordering::Relaxed);
                        let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.6f").to_string();
                        sqlx::query(
                            "INSERT INTO token_consumption (user_id, id, event_id, period, tokens_used, operation_type,
                                 metadata, occurred_at, created_at, total_before, total_after, created_fee,
                                 first_block, end_block)
                             VALUES (?1, ?2, ?3, '2026-12', 1000, 'chat', ?4, ?5, ?5, ?6, ?6 + 1000, 0, 1, 1)",
                        )
                        .bind(format!("bench-user-{user}"))
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(format!("bench-{n}"))
                        .bind(&metadata)
                        .bind(&now)
                        .bind(i64::try_from(i * 1_000).expect("small"))
                        .execute(&pool)
                        .await
                        .expect("inserted");
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

fn sqlite(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (billing, plain) = runtime.block_on(async {
        let url = format!("sqlite://{}", fresh_file("store").display());
        let store = SqliteUsageStore::connect(&url).await.expect("the store's file");
        let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build();
        // The plain inserts' file: the same schema, opened with the same settings.
        let plain_url = format!("sqlite://{}", fresh_file("plain").display());
        let plain = SqliteUsageStore::connect(&plain_url).await.expect("the plain file");
        (billing, plain.pool().clone())
    });
    // Every user's period is opened (its fee charged) before measuring the steady state.
    runtime.block_on(async {
        let reports = (0..USERS).map(report).collect();
        billing.process_token_usage_batch(reports).await.expect("warm-up");
    });

    for (group_name, callers) in [("one_caller", 1u64), ("eight_callers", 8)] {
        let mut group = c.benchmark_group(format!("sqlite_one_event_{group_name}"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
        let (store_name, plain_name) = if callers == 1 {
            ("store, one caller", "plain insert, one caller")
        } else {
            ("store, eight callers", "plain insert, eight callers")
        };
        group.bench_function("store", |b| {
            b.iter_custom(|iters| measured(store_name, one_at_a_time(&runtime, &billing, iters, callers), iters))
        });
        group.bench_function("plain_insert", |b| {
            b.iter_custom(|iters| measured(plain_name, plain_inserts(&runtime, &plain, iters, callers), iters))
        });
        group.finish();
    }

    // `token_summary` reads one row, however many events the period holds. The heavy user is
    // loaded with 100,000 events when measuring, 10,000 when the benchmarks run once as tests.
    let heavy_events = if std::env::args().any(|a| a == "--bench") {
        100_000
    } else {
        10_000
    };
    let mut group = c.benchmark_group("sqlite_token_summary");
    for (name, user, events) in [
        ("after_1k_events", "summary-light", 1_000u64),
        ("after_100k_events", "summary-heavy", heavy_events),
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

    let all = MEASURED.lock().expect("measured");
    let rate = |name: &str| {
        all.get(name)
            .filter(|(elapsed, events)| *events > 0 && !elapsed.is_zero())
            .map(|(elapsed, events)| *events as f64 / elapsed.as_secs_f64())
    };
    for callers in ["one caller", "eight callers"] {
        let store = rate(&format!("store, {callers}"));
        let plain = rate(&format!("plain insert, {callers}"));
        if let (Some(store), Some(plain)) = (store, plain) {
            println!(
                "sqlite, {callers}: store {store:.0} events/s, plain insert {plain:.0} rows/s, ratio {:.2}",
                store / plain
            );
        }
    }
}

criterion_group!(benches, sqlite);
criterion_main!(benches);
