//! Many tasks racing on a few users across many block boundaries, on a multi-threaded runtime.

mod common;

use std::sync::Arc;

use common::{Harness, november, user};
use token_billing::{CollectionMode, Currency, Money, PaymentStatus, Plan, UsageReport};

fn small_blocks() -> Plan {
    Plan::builder()
        .included_tokens(10_000)
        .block_size(10_000)
        .build()
        .expect("valid plan")
}

const USERS: [&str; 3] = ["ana", "bruno", "carla"];

/// Event sizes that straddle block boundaries often: deterministic, varied.
fn sizes(task: usize, events: u64) -> impl Iterator<Item = u64> {
    (0..events).map(move |i| 1 + (task as u64 * 7_919 + i * 104_729) % 9_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_tasks_pay_each_block_exactly_once() {
    let plan = small_blocks();
    let h = Arc::new(Harness::with_plan(plan.clone()));
    let mut tasks = Vec::new();
    for task in 0..16usize {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = [0u64; 3];
            for (i, tokens) in sizes(task, 150).enumerate() {
                let who = (task + i) % USERS.len();
                h.service
                    .process_token_usage(UsageReport::new(USERS[who], tokens, "chat"))
                    .await
                    .expect("recorded");
                sent[who] += tokens;
            }
            sent
        }));
    }
    let mut totals = [0u64; 3];
    for task in tasks {
        let sent = task.await.expect("task");
        for (total, s) in totals.iter_mut().zip(sent) {
            *total += s;
        }
    }
    for (name, total) in USERS.iter().zip(totals) {
        let u = user(name);
        let summary = h.service.token_summary(&u, None).await.expect("summary");
        assert_eq!(summary.total_tokens, total, "every event counted once");
        let owed = plan.blocks_owed(total);
        assert!(owed > 100, "the race crossed many boundaries ({owed})");
        assert_eq!(summary.tier_charges_count, owed);
        assert_eq!(summary.outstanding_count, 0);
        h.assert_period_consistent(&u, november(), &plan).await;
        let customer = h.sandbox.customer_of(&u).expect("a sandbox customer");
        let expected = plan
            .block_price()
            .checked_mul(owed)
            .and_then(|blocks| blocks.checked_add(plan.fixed_fee()))
            .expect("no overflow");
        assert_eq!(
            h.sandbox.collected(&customer, Currency::BRL),
            expected,
            "{name} paid exactly the bill"
        );
    }
    assert!(
        h.succeeded_payments_by_charge().values().all(|&n| n == 1),
        "nobody paid twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_resumers_and_recorders_never_collect_twice() {
    // Deferred collection: recorders only record, several resumers collect at the same time.
    let plan = small_blocks();
    let h = Arc::new(Harness::with(|b| {
        b.plan(small_blocks()).collection(CollectionMode::Deferred)
    }));
    let mut recorders = Vec::new();
    for task in 0..8usize {
        let h = h.clone();
        recorders.push(tokio::spawn(async move {
            for (i, tokens) in sizes(task, 100).enumerate() {
                let who = USERS[(task + i) % USERS.len()];
                let outcome = h
                    .service
                    .process_token_usage(UsageReport::new(who, tokens, "chat"))
                    .await
                    .expect("recorded");
                assert!(
                    outcome
                        .tier_charges
                        .iter()
                        .all(|c| c.status == token_billing::ChargeStatus::Pending)
                );
            }
        }));
    }
    let mut resumers = Vec::new();
    for _ in 0..4 {
        let h = h.clone();
        resumers.push(tokio::spawn(async move {
            let mut claimed = 0;
            for _ in 0..50 {
                claimed += h.service.resume_pending().await.expect("resume").claimed;
                tokio::task::yield_now().await;
            }
            claimed
        }));
    }
    for r in recorders {
        r.await.expect("recorder");
    }
    let mut claimed: usize = 0;
    for r in resumers {
        claimed += r.await.expect("resumer");
    }
    claimed += h.service.resume_pending().await.expect("final resume").claimed;
    let payments = h.sandbox.payments();
    assert_eq!(claimed, payments.len(), "each claimed charge made one payment");
    assert!(payments.iter().all(|p| p.status == PaymentStatus::Succeeded));
    assert!(
        h.succeeded_payments_by_charge().values().all(|&n| n == 1),
        "nobody paid twice"
    );
    for name in USERS {
        h.assert_period_consistent(&user(name), november(), &plan).await;
        let summary = h.service.token_summary(&user(name), None).await.expect("summary");
        assert_eq!(summary.outstanding_count, 0, "everything collected");
        assert_eq!(
            summary.fixed_fee_charged,
            Money::from_minor(40_000, Currency::BRL).minor_units()
        );
    }
}

/// Tasks send the same events at once (a host's retry racing its original), some as batches
/// and some one at a time: each event is recorded once, every other send answered with its
/// consumption as a replay, and each block paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_events_sent_at_once_as_batches_and_singly_are_recorded_once() {
    let plan = small_blocks();
    let h = Arc::new(Harness::with_plan(plan.clone()));
    let events: Vec<(usize, u64, String)> = sizes(0, 400)
        .enumerate()
        .map(|(i, tokens)| (i % USERS.len(), tokens, format!("event-{i}")))
        .collect();
    let events = Arc::new(events);
    let mut tasks = Vec::new();
    for task in 0..6usize {
        let (h, events) = (h.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let report = |(who, tokens, id): &(usize, u64, String)| {
                UsageReport::new(USERS[*who], *tokens, "chat").event_id(id.clone())
            };
            let mut answers = Vec::with_capacity(events.len());
            for chunk in events.chunks(1 + task * 7) {
                if task % 2 == 0 {
                    let outcomes = h
                        .service
                        .process_token_usage_batch(chunk.iter().map(report).collect())
                        .await
                        .expect("a batch");
                    answers.extend(outcomes.into_iter().map(|o| o.expect("recorded")));
                } else {
                    for event in chunk {
                        answers.push(h.service.process_token_usage(report(event)).await.expect("recorded"));
                    }
                }
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    for i in 0..events.len() {
        let sends: Vec<_> = answers.iter().map(|a| &a[i]).collect();
        assert_eq!(
            sends.iter().filter(|o| !o.replayed).count(),
            1,
            "event {i} recorded exactly once"
        );
        assert!(
            sends.iter().all(|o| o.consumption_id == sends[0].consumption_id),
            "event {i}: every answer names the one consumption"
        );
    }
    let mut totals = [0u64; 3];
    for (who, tokens, _) in events.iter() {
        totals[*who] += tokens;
    }
    for (name, total) in USERS.iter().zip(totals) {
        let u = user(name);
        let summary = h.service.token_summary(&u, None).await.expect("summary");
        assert_eq!(summary.total_tokens, total, "{name}: each event counted once");
        assert_eq!(summary.tier_charges_count, plan.blocks_owed(total));
        h.assert_period_consistent(&u, november(), &plan).await;
    }
    assert!(
        h.succeeded_payments_by_charge().values().all(|&n| n == 1),
        "nobody paid twice"
    );
}
