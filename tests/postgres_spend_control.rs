//! Spend control on a real PostgreSQL, from several service instances with pools of their own:
//! caps hold exactly under concurrency, and holds of crashed callers expire (feature
//! `postgres`).
#![cfg(feature = "postgres")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::nov15;
use common::pg::{schema, store_in};
use futures_util::future::join_all;
use token_billing::{
    AlertKind, AlertPolicy, BillingError, BillingService, LimitKind, Limits, ManualClock, Reservation, SandboxGateway,
    UnregisteredUsers, UsageReport, UserId,
};

/// `count` service instances over one schema, each on its own pool, sharing a manual clock.
async fn instances(count: usize) -> (Vec<BillingService>, ManualClock) {
    let schema = schema().await;
    let clock = ManualClock::new(nov15());
    let mut instances = Vec::new();
    for _ in 0..count {
        let store = store_in(&schema).await;
        instances.push(
            BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::accepting_unknown_customers()))
                .clock(Arc::new(clock.clone()))
                .unregistered_users(UnregisteredUsers::OpenCustomer)
                .alerts(AlertPolicy::standard())
                .build(),
        );
    }
    (instances, clock)
}

fn fresh_user(tag: &str) -> UserId {
    UserId::new(format!("pg-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])).expect("valid")
}

/// 1,000 reservations for one user from four instances against a cap that fits 250 of them:
/// exactly 250 are granted and nothing more is held; the holders crash, their holds expire,
/// and the user can reserve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_from_four_instances_grant_exactly_what_the_cap_fits() {
    let (instances, clock) = instances(4).await;
    let user = fresh_user("reserve-race");
    instances[0]
        .set_limits(&user, Some(Limits::none().with_token_cap(250 * 40_000)))
        .await
        .expect("set_limits");
    let results = join_all((0..1_000).map(|i| {
        let billing = instances[i % instances.len()].clone();
        let user = user.to_string();
        async move {
            billing
                .reserve(
                    Reservation::new(user, 40_000)
                        .hold_id(format!("call-{i}"))
                        .ttl(Duration::from_secs(60)),
                )
                .await
        }
    }))
    .await;
    let mut granted = 0;
    for result in results {
        match result {
            Ok(hold) => {
                granted += 1;
                assert_eq!(hold.granted_tokens, 40_000);
            }
            Err(BillingError::LimitExceeded {
                limit: LimitKind::TokenCap,
                remaining_tokens,
            }) => assert!(remaining_tokens < 40_000, "refused with {remaining_tokens} left"),
            Err(other) => panic!("unexpected answer: {other:?}"),
        }
    }
    assert_eq!(granted, 250, "exactly the reservations the cap fits");
    let check = instances[3].check_usage(&user, 1).await.expect("check_usage");
    assert_eq!(
        (check.held_tokens, check.open_holds, check.remaining_tokens),
        (10_000_000, 250, Some(0))
    );
    assert!(!check.allowed);

    // The holders crash and never settle: once the time to live has passed, nothing is held.
    clock.advance(chrono::Duration::seconds(61));
    let again = instances[2]
        .reserve(Reservation::new(user.to_string(), 40_000).hold_id("after-the-crash"))
        .await
        .expect("reserved again once the crashed holds expired");
    assert_eq!(again.remaining_tokens, Some(10_000_000 - 40_000));
}

/// Reports that ask for enforcement, sent concurrently from four instances: exactly as many are
/// recorded as the cap fits, the others are refused and record nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforced_reports_from_four_instances_never_pass_the_cap() {
    let (instances, _clock) = instances(4).await;
    let user = fresh_user("enforced-race");
    instances[0]
        .set_limits(&user, Some(Limits::none().with_token_cap(30 * 300_000)))
        .await
        .expect("set_limits");
    let results = join_all((0..120).map(|i| {
        let billing = instances[i % instances.len()].clone();
        let report = UsageReport::new(user.to_string(), 300_000, "chat")
            .event_id(format!("call-{i}"))
            .enforce_limits();
        async move { billing.process_token_usage(report).await }
    }))
    .await;
    let recorded = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(_) | Err(BillingError::LimitExceeded { .. }))),
        "{results:?}"
    );
    assert_eq!(recorded, 30);
    let summary = instances[1].token_summary(&user, None).await.expect("summary");
    assert_eq!(summary.total_tokens, 9_000_000, "the cap exactly, nothing past it");
    let check = instances[2].check_usage(&user, 1).await.expect("check_usage");
    assert_eq!(
        (check.held_tokens, check.remaining_tokens),
        (0, Some(0)),
        "every event's hold was freed"
    );
}

/// Events from four instances that cross thresholds together: exactly one alert per threshold
/// crossed, each with the total of the event that crossed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_from_four_instances_create_each_alert_once() {
    let (instances, _clock) = instances(4).await;
    let user = fresh_user("alert-race");
    instances[0]
        .set_limits(&user, Some(Limits::none().with_token_cap(30_000_000)))
        .await
        .expect("set_limits");
    let results = join_all((0..200).map(|i| {
        let billing = instances[i % instances.len()].clone();
        let report = UsageReport::new(user.to_string(), 150_000, "chat").event_id(format!("e-{i}"));
        async move { billing.process_token_usage(report).await }
    }))
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let alerts = instances[1].pending_alerts(Some(&user), 100).await.expect("alerts");
    let mut kinds: Vec<AlertKind> = alerts.iter().map(|a| a.kind).collect();
    kinds.sort();
    // 30M tokens: 80% and 100% of the 8M allowance, blocks 1 to 3, 90% of the cap and the cap.
    let mut expected = vec![
        AlertKind::Allowance { percent: 80 },
        AlertKind::Allowance { percent: 100 },
        AlertKind::Block { block: 1 },
        AlertKind::Block { block: 2 },
        AlertKind::Block { block: 3 },
        AlertKind::Cap { percent: 90 },
        AlertKind::CapReached,
    ];
    expected.sort();
    assert_eq!(kinds, expected);
    let cap = alerts
        .iter()
        .find(|a| a.kind == AlertKind::CapReached)
        .expect("the cap");
    assert_eq!(cap.total_tokens, 30_000_000);
}
