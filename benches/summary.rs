#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! `token_summary` on the in-memory store for a user with 1,000 events in the period and for
//! one with 1,000,000: the answer must not grow with the events (the PostgreSQL store's
//! counterpart is in `benches/postgres.rs`).
//!
//! `cargo bench --bench summary`

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use common::load;
use criterion::{Criterion, criterion_group, criterion_main};
use token_billing::{BillingService, InMemoryUsageStore, ManualClock, SandboxGateway, UnregisteredUsers, UserId};

/// Events of the light and the heavy user. Run as a test (`cargo test --benches`), the heavy
/// user gets fewer, to keep the run short.
fn sizes() -> (u64, u64) {
    if std::env::args().any(|a| a == "--bench") {
        (1_000, 1_000_000)
    } else {
        (1_000, 10_000)
    }
}

fn summary(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 15, 12, 0, 0).single().expect("a date"));
    let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
        .clock(Arc::new(clock))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let (light, heavy) = sizes();
    runtime.block_on(async {
        load(&billing, "light-user", light).await;
        load(&billing, "heavy-user", heavy).await;
    });

    let mut group = c.benchmark_group("memory_token_summary");
    for (name, user, events) in [
        ("after_1k_events", "light-user", light),
        ("after_1m_events", "heavy-user", heavy),
    ] {
        let user = UserId::new(user).expect("a user id");
        let expected = events * 1_000;
        group.bench_function(name, |b| {
            b.iter(|| {
                let summary = runtime.block_on(billing.token_summary(&user, None)).expect("a summary");
                assert_eq!(summary.total_tokens, expected);
                summary
            })
        });
    }
    group.finish();
}

criterion_group!(benches, summary);
criterion_main!(benches);
