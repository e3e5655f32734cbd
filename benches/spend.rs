#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! Spend control in process: `check_usage` (target: 200 ns or less) and `reserve` (target: 1 us
//! or less), for users with a token cap and usage recorded, on the in-memory store. The PostgreSQL store's
//! counterparts are in `benches/postgres.rs`.
//!
//! `cargo bench --bench spend`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use token_billing::{
    BillingService, InMemoryUsageStore, Limits, ManualClock, Reservation, SandboxGateway, UnregisteredUsers,
    UsageReport, UserId,
};

/// Users the calls rotate over, as a host's requests come from many.
const USERS: usize = 1_024;

fn spend(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 15, 12, 0, 0).single().expect("a date"));
    let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
        .clock(Arc::new(clock))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let users: Vec<UserId> = (0..USERS)
        .map(|n| UserId::new(format!("capped-{n}")).expect("a user id"))
        .collect();
    runtime.block_on(async {
        for user in &users {
            billing
                .set_limits(user, Some(Limits::none().with_token_cap(1_000_000_000)))
                .await
                .expect("limits");
            billing
                .process_token_usage(UsageReport::new(user.as_str(), 9_000_000, "chat"))
                .await
                .expect("usage");
        }
    });

    // Each sample runs its calls inside one task, as a host's request handler makes them: the
    // runtime is entered once per sample, not once per call.
    let mut group = c.benchmark_group("memory_spend");
    group.bench_function("check_usage", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for n in 0..iters {
                    let user = &users[usize::try_from(n).unwrap_or(0) % USERS];
                    let check = billing.check_usage(user, 1_000).await.expect("a check");
                    assert!(black_box(check).allowed);
                }
                start.elapsed()
            })
        })
    });
    let holds: Vec<String> = (0..USERS).map(|n| format!("call-{n}")).collect();
    // A hold is released after each grant, so that the user's holds do not pile up; only the
    // grant is timed (with the two clock reads around it, some 50 ns).
    group.bench_function("reserve", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut spent = Duration::ZERO;
                for n in 0..iters {
                    let n = usize::try_from(n).unwrap_or(0) % USERS;
                    let start = Instant::now();
                    let granted = billing
                        .reserve(Reservation::new(users[n].as_str(), 40_000).hold_id(holds[n].as_str()))
                        .await
                        .expect("granted");
                    spent += start.elapsed();
                    black_box(granted);
                    assert!(billing.release_hold(&users[n], &holds[n]).await.expect("released"));
                }
                spent
            })
        })
    });
    group.finish();
}

criterion_group!(benches, spend);
criterion_main!(benches);
