//! What the in-memory store keeps of each event, and how long: everything by default; with
//! `EventRetention::Resendable`, only events the host may send again; with `periods_kept`, the
//! events of the most recent periods. Totals, reports and charges are always complete.

mod common;

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use common::{Harness, november, user};
use token_billing::{AuditEvent, EventRetention, InMemoryUsageStore, PeriodKey, SandboxGateway, UsageReport};

/// How many of the user's events the store keeps for the period.
async fn kept_events(h: &Harness, user: &token_billing::UserId, period: PeriodKey) -> usize {
    h.store.consumptions(user, period).await.expect("read").len()
}

fn harness(store: InMemoryUsageStore) -> Harness {
    let sandbox = SandboxGateway::new();
    Harness::over(Arc::new(store), Arc::new(sandbox.clone()), sandbox, |b| b)
}

#[tokio::test]
async fn keeping_resendable_events_forgets_the_others_but_not_their_totals_or_charges() {
    let h = harness(InMemoryUsageStore::builder().events(EventRetention::Resendable).build());
    let ana = user("ana");
    for (tokens, event) in [(5_000_000, None), (4_000_000, Some("req-1")), (9_000_000, None)] {
        let mut report = UsageReport::new("ana", tokens, "chat");
        report.event_id = event.map(str::to_owned);
        h.service.process_token_usage(report).await.expect("recorded");
    }
    let kept = h.store.consumptions(&ana, november()).await.expect("consumptions");
    assert_eq!(
        kept.iter().map(|c| c.event_id.as_str()).collect::<Vec<_>>(),
        ["req-1"],
        "only the event the host may send again"
    );
    let summary = h.service.token_summary(&ana, Some(november())).await.expect("summary");
    assert_eq!((summary.total_tokens, summary.tier_charges_count), (18_000_000, 2));
    let by_operation = h
        .service
        .usage_by_operation(&ana, Some(november()))
        .await
        .expect("report");
    assert_eq!(
        (by_operation[0].total_tokens, by_operation[0].operations),
        (18_000_000, 3)
    );
    let charges = h.store.charges(&ana, november()).await.expect("charges");
    let blocks: Vec<u64> = charges.iter().filter(|c| c.block > 0).map(|c| c.block).collect();
    assert_eq!(blocks, [1, 2], "each block once");
    let paid = h.succeeded_payments_by_charge();
    assert!(
        charges.iter().all(|c| paid.get(c.key.as_str()) == Some(&1)),
        "each charge paid once"
    );
    // The kept event is still answered with its original outcome, once.
    let again = h
        .service
        .process_token_usage(UsageReport::new("ana", 4_000_000, "chat").event_id("req-1"))
        .await
        .expect("replayed");
    assert!(again.replayed);
    assert_eq!(
        h.service
            .token_summary(&ana, Some(november()))
            .await
            .expect("summary")
            .total_tokens,
        18_000_000
    );
    // The audit trail records charges, and usage only for the kept event.
    let trail = h.service.audit_trail(&ana, None).await.expect("trail");
    let usage_entries = trail
        .iter()
        .filter(|e| matches!(e.event, AuditEvent::UsageRecorded { .. }))
        .count();
    assert_eq!(usage_entries, 1);
    assert!(
        trail
            .iter()
            .any(|e| matches!(e.event, AuditEvent::ChargeCreated { .. }))
    );
}

#[tokio::test]
async fn periods_kept_forgets_the_events_of_older_periods_only() {
    let h = harness(InMemoryUsageStore::builder().periods_kept(2).build());
    let bea = user("bea");
    let months = [(2026, 9), (2026, 10), (2026, 11)];
    for (i, (year, month)) in months.into_iter().enumerate() {
        h.clock
            .set(Utc.with_ymd_and_hms(year, month, 15, 12, 0, 0).single().expect("valid"));
        h.service
            .process_token_usage(UsageReport::new("bea", 9_000_000, "chat").event_id(format!("req-{i}")))
            .await
            .expect("recorded");
    }
    let period = |y, m| PeriodKey::new(y, m).expect("valid");
    assert_eq!(kept_events(&h, &bea, period(2026, 9)).await, 0, "forgotten");
    for month in [10, 11] {
        assert_eq!(kept_events(&h, &bea, period(2026, month)).await, 1);
    }
    // September's totals and charges stay.
    let september = h
        .service
        .token_summary(&bea, Some(period(2026, 9)))
        .await
        .expect("summary");
    assert_eq!((september.total_tokens, september.total_charged), (9_000_000, 50_000));
    let trail = h.service.audit_trail(&bea, Some(period(2026, 9))).await.expect("trail");
    assert!(
        !trail
            .iter()
            .any(|e| matches!(e.event, AuditEvent::UsageRecorded { .. }))
    );
    assert!(
        trail
            .iter()
            .any(|e| matches!(e.event, AuditEvent::ChargeCreated { .. }))
    );
    // A re-send of October's event is still recognised.
    h.clock.advance(Duration::days(1));
    let late = h
        .service
        .process_token_usage(
            UsageReport::new("bea", 9_000_000, "chat")
                .event_id("req-1")
                .occurred_at(Utc.with_ymd_and_hms(2026, 10, 15, 12, 0, 0).single().expect("valid")),
        )
        .await;
    assert!(late.is_ok_and(|o| o.replayed));
    // September's event is forgotten, and its period closed: a re-send is refused, not counted.
    let forgotten = h
        .service
        .process_token_usage(
            UsageReport::new("bea", 9_000_000, "chat")
                .event_id("req-0")
                .occurred_at(Utc.with_ymd_and_hms(2026, 9, 15, 12, 0, 0).single().expect("valid")),
        )
        .await;
    assert!(matches!(
        forgotten,
        Err(token_billing::BillingError::InvalidUsage(
            token_billing::UsageError::TooLate { .. }
        ))
    ));
    assert_eq!(
        h.service
            .token_summary(&bea, Some(period(2026, 9)))
            .await
            .expect("summary")
            .total_tokens,
        9_000_000
    );
}

/// An older period's events are kept while the period still takes late usage: a re-send inside
/// the grace window reaches the store and must be answered as the original, not counted again.
#[tokio::test]
async fn periods_kept_keeps_a_period_s_events_while_it_takes_late_usage() {
    let h = harness(InMemoryUsageStore::builder().periods_kept(1).build());
    let cid = user("cid");
    let october_event = |tokens| {
        UsageReport::new("cid", tokens, "chat")
            .event_id("req-0")
            .occurred_at(Utc.with_ymd_and_hms(2026, 10, 31, 20, 0, 0).single().expect("valid"))
    };
    h.clock
        .set(Utc.with_ymd_and_hms(2026, 10, 31, 20, 0, 0).single().expect("valid"));
    h.service
        .process_token_usage(october_event(9_000_000))
        .await
        .expect("recorded");
    // November opens (with `periods_kept(1)` the older period would be the one to forget).
    h.clock
        .set(Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).single().expect("valid"));
    h.service
        .process_token_usage(UsageReport::new("cid", 1_000, "chat").event_id("req-1"))
        .await
        .expect("recorded");
    // On 2 November, inside October's grace window, the October event is sent again.
    h.clock
        .set(Utc.with_ymd_and_hms(2026, 11, 2, 12, 0, 0).single().expect("valid"));
    let again = h
        .service
        .process_token_usage(october_event(9_000_000))
        .await
        .expect("answered");
    assert!(again.replayed, "answered as the original");
    let october = PeriodKey::new(2026, 10).expect("valid");
    let summary = h.service.token_summary(&cid, Some(october)).await.expect("summary");
    assert_eq!((summary.total_tokens, summary.tier_charges_count), (9_000_000, 1));
    // Once October takes no more usage, the next period to open forgets its events.
    h.clock
        .set(Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).single().expect("valid"));
    h.service
        .process_token_usage(UsageReport::new("cid", 1_000, "chat").event_id("req-2"))
        .await
        .expect("recorded");
    assert!(
        h.store.consumptions(&cid, october).await.expect("read").is_empty(),
        "forgotten once closed"
    );
}

/// The store keeps an older period's events while either the grace window of the plan that
/// rates that period or that of the user's current plan is open, whichever way the user's plan
/// changed: a re-send of an October event inside either window is answered with its original
/// outcome, never counted twice (the service judges a late event by the current plan's window,
/// and answers a re-send the store still knows as the original).
#[tokio::test]
async fn periods_kept_keeps_a_period_s_events_while_either_plan_s_grace_is_open() {
    let short = token_billing::PlanId::new("short-grace").expect("valid");
    let default = token_billing::PlanId::new("default").expect("valid");
    let at = |day, hour| Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).single().expect("valid");
    // October on the default plan (72 hours), then on the short one (an hour); and the reverse.
    for (october_plan, november_plan) in [(&default, &short), (&short, &default)] {
        let sandbox = SandboxGateway::new();
        let h = Harness::over(
            Arc::new(InMemoryUsageStore::builder().periods_kept(1).build()),
            Arc::new(sandbox.clone()),
            sandbox,
            |b| {
                b.add_plan(
                    short.clone(),
                    token_billing::Plan::builder()
                        .late_usage_grace(std::time::Duration::from_secs(3_600))
                        .build()
                        .expect("valid"),
                )
            },
        );
        let cid = user("cid");
        let october_event = || {
            UsageReport::new("cid", 9_000_000, "chat")
                .event_id("req-0")
                .occurred_at(Utc.with_ymd_and_hms(2026, 10, 31, 20, 0, 0).single().expect("valid"))
        };
        h.clock
            .set(Utc.with_ymd_and_hms(2026, 10, 31, 19, 0, 0).single().expect("valid"));
        h.service
            .register_account(&cid, None, Some(october_plan.clone()))
            .await
            .expect("October's plan");
        h.clock
            .set(Utc.with_ymd_and_hms(2026, 10, 31, 20, 0, 0).single().expect("valid"));
        h.service.process_token_usage(october_event()).await.expect("recorded");
        h.clock.set(at(1, 11));
        h.service
            .register_account(&cid, None, Some(november_plan.clone()))
            .await
            .expect("November's plan");
        // November opens after the short window closed, inside the 72-hour one.
        h.clock.set(at(1, 12));
        h.service
            .process_token_usage(UsageReport::new("cid", 1_000, "chat").event_id("req-1"))
            .await
            .expect("November opens");
        h.clock.set(at(2, 12));
        let again = h.service.process_token_usage(october_event()).await.expect("answered");
        assert!(
            again.replayed,
            "{october_plan} then {november_plan}: answered as the original"
        );
        let october = PeriodKey::new(2026, 10).expect("valid");
        let summary = h.service.token_summary(&cid, Some(october)).await.expect("summary");
        assert_eq!(
            summary.total_tokens, 9_000_000,
            "{october_plan} then {november_plan}: counted once"
        );
    }
}

/// A period opened by its fee ahead of usage (a monthly `open_period` job) is a new period as
/// much as one opened by an event: older periods' events are forgotten then too, so memory does
/// not grow month after month.
#[tokio::test]
async fn periods_kept_forgets_when_the_monthly_job_opens_each_period() {
    let h = harness(InMemoryUsageStore::builder().periods_kept(1).build());
    let cid = user("cid");
    let months = [(2026, 8), (2026, 9), (2026, 10), (2026, 11)];
    for (i, (year, month)) in months.into_iter().enumerate() {
        // The job runs on the 5th, past the previous month's grace window, before any usage.
        h.clock
            .set(Utc.with_ymd_and_hms(year, month, 5, 12, 0, 0).single().expect("valid"));
        h.service
            .open_period(&cid, None)
            .await
            .expect("opened")
            .expect("the fee");
        h.service
            .process_token_usage(UsageReport::new("cid", 1_000, "chat").event_id(format!("req-{i}")))
            .await
            .expect("recorded");
    }
    let period = |y, m| PeriodKey::new(y, m).expect("valid");
    for month in [8, 9, 10] {
        assert_eq!(
            kept_events(&h, &cid, period(2026, month)).await,
            0,
            "2026-{month} forgotten"
        );
    }
    assert_eq!(kept_events(&h, &cid, period(2026, 11)).await, 1);
    // Totals stay.
    let august = h
        .service
        .token_summary(&cid, Some(period(2026, 8)))
        .await
        .expect("summary");
    assert_eq!(august.total_tokens, 1_000);
}

/// A plan whose grace window has no end takes late usage for ever: the store keeps its events,
/// and recording under it never fails.
#[tokio::test]
async fn a_grace_window_without_end_keeps_its_events() {
    let forever = token_billing::Plan::builder()
        .late_usage_grace(std::time::Duration::MAX)
        .build()
        .expect("valid");
    let sandbox = SandboxGateway::new();
    let h = Harness::over(
        Arc::new(InMemoryUsageStore::builder().periods_kept(1).build()),
        Arc::new(sandbox.clone()),
        sandbox,
        |b| b.plan(forever),
    );
    let dee = user("dee");
    for (i, month) in [9, 10, 11].into_iter().enumerate() {
        h.clock
            .set(Utc.with_ymd_and_hms(2026, month, 15, 12, 0, 0).single().expect("valid"));
        h.service
            .process_token_usage(UsageReport::new("dee", 1_000, "chat").event_id(format!("req-{i}")))
            .await
            .expect("recorded");
    }
    let september = PeriodKey::new(2026, 9).expect("valid");
    assert_eq!(
        kept_events(&h, &dee, september).await,
        1,
        "September still takes late usage: its event is kept"
    );
    let again = h
        .service
        .process_token_usage(
            UsageReport::new("dee", 1_000, "chat")
                .event_id("req-0")
                .occurred_at(Utc.with_ymd_and_hms(2026, 9, 15, 12, 0, 0).single().expect("valid")),
        )
        .await
        .expect("answered");
    assert!(again.replayed);
}

/// An event sent without `occurred_at` is placed when it arrives, so its re-send can come in any
/// later period, long after the store forgot the original's details: it is refused there, with
/// the period it was recorded in, and never recorded or charged again. With either retention.
#[tokio::test]
async fn a_forgotten_event_sent_again_in_a_later_period_is_refused_not_billed_twice() {
    for retention in [EventRetention::All, EventRetention::Resendable] {
        let h = harness(InMemoryUsageStore::builder().events(retention).periods_kept(1).build());
        let dan = user("dan");
        let event = || UsageReport::new("dan", 9_000_000, "chat").event_id("req-nov");
        h.service
            .process_token_usage(event())
            .await
            .expect("recorded in November");
        // December and January open; November's events are forgotten once it takes no usage.
        for (month, day) in [(2026, 12), (2027, 1)].into_iter().zip([10, 10]) {
            h.clock.set(
                Utc.with_ymd_and_hms(month.0, month.1, day, 12, 0, 0)
                    .single()
                    .expect("valid"),
            );
            h.service
                .process_token_usage(UsageReport::new("dan", 1_000, "chat"))
                .await
                .expect("recorded");
        }
        assert_eq!(kept_events(&h, &dan, november()).await, 0, "{retention:?}: forgotten");
        let paid_before = h.succeeded_payments_by_charge();

        // The same event, unchanged, arrives again in January.
        let again = h.service.process_token_usage(event()).await;
        assert!(
            matches!(
                &again,
                Err(token_billing::BillingError::EventForgotten { event_id, period })
                    if event_id.as_str() == "req-nov" && *period == november()
            ),
            "{retention:?}: {again:?}"
        );
        let january = PeriodKey::new(2027, 1).expect("valid");
        let summary = h.service.token_summary(&dan, Some(january)).await.expect("summary");
        assert_eq!(
            (summary.total_tokens, summary.tier_charges_count),
            (1_000, 0),
            "{retention:?}: nothing recorded again"
        );
        assert_eq!(
            h.succeeded_payments_by_charge(),
            paid_before,
            "{retention:?}: nothing paid again"
        );
        // In a batch too.
        let batch = h.service.process_token_usage_batch(vec![event()]).await.expect("batch");
        assert!(
            matches!(batch[0], Err(token_billing::BillingError::EventForgotten { .. })),
            "{retention:?}: {:?}",
            batch[0]
        );
        let summary = h.service.token_summary(&dan, Some(january)).await.expect("summary");
        assert_eq!(summary.total_tokens, 1_000, "{retention:?}");
    }
}
