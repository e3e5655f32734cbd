//! Checks of the contract's clauses on alerts:
//! - **Alerts: created with the event**: recording creates exactly the alerts the policy's
//!   thresholds crossed by the event's interval, once per (user, period, kind), whatever the
//!   concurrency, and in batches too;
//! - **Alerts: outbox**: pending alerts are answered until acknowledged, with stable ids.

use futures_util::future::join_all;

use super::{base_instant, far_future, fresh_user, period, usage_event};
use crate::domain::{AlertKind, AlertPolicy, Ceiling, FeeCollection, Plan};
use crate::store::{Alert, Alerting, RecordUsage, UsageStore};

fn request<'a>(
    plan: &'a Plan,
    policy: &'a AlertPolicy,
    ceiling: Ceiling,
    usage: crate::domain::UsageRecord,
) -> RecordUsage<'a> {
    RecordUsage {
        usage,
        plan,
        fee: FeeCollection::Library,
        lease_until: Some(far_future()),
        alerting: Some(Alerting { policy, ceiling }),
        account: None,
    }
}

/// **Alerts: created with the event**: concurrent events crossing thresholds together create
/// each crossed alert exactly once, with the total of the event that crossed it; events that
/// cross none create none; `raise_alert` does not double one.
pub async fn each_crossed_threshold_creates_one_alert(store: &dyn UsageStore) {
    let plan = Plan::builder()
        .included_tokens(1_000)
        .block_size(1_000)
        .build()
        .expect("a valid plan");
    let policy = AlertPolicy::standard();
    let ceiling = Ceiling {
        token_cap: Some(5_000),
        ..Ceiling::default()
    };
    let user = fresh_user("alerts");
    // 40 events of 137 tokens: 5,480 in all, past the cap.
    let results = join_all((0..40).map(|_| {
        let usage = usage_event(&user, 137, "chat", period());
        let (plan, policy) = (&plan, &policy);
        async move { store.record_usage(request(plan, policy, ceiling, usage)).await }
    }))
    .await;
    let mut crossings = Vec::new();
    for result in results {
        let recorded = result.expect("record_usage");
        crossings.extend(policy.crossed(&plan, &ceiling, recorded.total_before, recorded.total_after));
    }
    let pending = store.pending_alerts(Some(&user), 100).await.expect("pending_alerts");
    let mut kinds: Vec<AlertKind> = pending.iter().map(|a| a.kind).collect();
    kinds.sort();
    crossings.sort();
    let mut expected = policy.crossed(&plan, &ceiling, 0, 40 * 137);
    expected.sort();
    assert_eq!(kinds, expected, "every threshold crossed, once");
    assert_eq!(crossings, expected, "each by the event whose interval holds it");
    for alert in &pending {
        assert_eq!((&alert.user_id, alert.period), (&user, period()));
    }
    let cap = pending
        .iter()
        .find(|a| a.kind == AlertKind::CapReached)
        .expect("the cap's alert");
    assert!(cap.total_tokens >= 5_000 && cap.total_tokens < 5_000 + 137, "{cap:?}");

    // One event at a time, each crossing a threshold that starts no block (the way an event
    // that creates no charge is recorded must write its alerts too).
    let steady = fresh_user("alerts-steady");
    for tokens in [700, 200, 3_600, 100] {
        let usage = usage_event(&steady, tokens, "chat", period());
        store
            .record_usage(request(&plan, &policy, ceiling, usage))
            .await
            .expect("record_usage");
    }
    let mut kinds: Vec<AlertKind> = store
        .pending_alerts(Some(&steady), 100)
        .await
        .expect("pending_alerts")
        .iter()
        .map(|a| a.kind)
        .collect();
    kinds.sort();
    let mut expected = policy.crossed(&plan, &ceiling, 0, 4_600);
    expected.sort();
    assert_eq!(kinds, expected, "alerts of events one at a time");

    // Raised again (a second instance, a retry): not doubled.
    let again = Alert::new(user.clone(), period(), AlertKind::CapReached, 5_480, base_instant());
    assert!(!store.raise_alert(again).await.expect("raise_alert"));
    let gate = Alert::new(user.clone(), period(), AlertKind::PaymentGate, 5_480, base_instant());
    assert!(store.raise_alert(gate.clone()).await.expect("raise_alert"));
    assert!(!store.raise_alert(gate).await.expect("raise_alert"));

    // A batch crosses its own thresholds.
    let batched = fresh_user("alerts-batch");
    let requests = (0..3)
        .map(|_| request(&plan, &policy, ceiling, usage_event(&batched, 500, "chat", period())))
        .collect();
    let results = store.record_usage_batch(requests).await.expect("the batch");
    assert!(results.iter().all(Result::is_ok));
    let mut kinds: Vec<AlertKind> = store
        .pending_alerts(Some(&batched), 100)
        .await
        .expect("pending_alerts")
        .iter()
        .map(|a| a.kind)
        .collect();
    kinds.sort();
    let mut expected = policy.crossed(&plan, &ceiling, 0, 1_500);
    expected.sort();
    assert_eq!(kinds, expected);
}

/// **Alerts: outbox**: an alert stays pending, with its id, until acknowledged; acknowledging
/// twice answers `false`; pending alerts of all users include the user's.
pub async fn alerts_are_pending_until_acknowledged(store: &dyn UsageStore) {
    let plan = Plan::default();
    let policy = AlertPolicy {
        allowance_percent: vec![50],
        ..AlertPolicy::none()
    };
    let user = fresh_user("outbox");
    store
        .record_usage(request(
            &plan,
            &policy,
            Ceiling::default(),
            usage_event(&user, 4_000_000, "chat", period()),
        ))
        .await
        .expect("record_usage");
    let first = store.pending_alerts(Some(&user), 10).await.expect("pending");
    assert_eq!(first.len(), 1);
    let again = store.pending_alerts(Some(&user), 10).await.expect("pending");
    assert_eq!(first, again, "the same alert, with the same id, until acknowledged");
    let everyone = store.pending_alerts(None, 100_000).await.expect("pending");
    assert!(everyone.iter().any(|a| a.id == first[0].id));
    assert!(store.ack_alert(&user, first[0].id).await.expect("ack"));
    assert!(!store.ack_alert(&user, first[0].id).await.expect("ack"));
    assert!(store.pending_alerts(Some(&user), 10).await.expect("pending").is_empty());
    // An event crossing nothing creates nothing.
    store
        .record_usage(request(
            &plan,
            &policy,
            Ceiling::default(),
            usage_event(&user, 1, "chat", period()),
        ))
        .await
        .expect("record_usage");
    assert!(store.pending_alerts(Some(&user), 10).await.expect("pending").is_empty());
}
