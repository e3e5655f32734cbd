//! Failures of the gateway and the store at every step of the charge protocol, and crashes
//! between its steps: after `resume_pending` and `retry_failed`, every block is paid exactly
//! once and no usage is lost.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as Span;
use common::{Harness, november, user};
use token_billing::store::{PlacedUsage, Placement};
use token_billing::testing::faults::{Fault, FaultyGateway, FaultyStore, GatewayOp, StoreOp};
use token_billing::testing::store::{fresh_user, usage_event};
use token_billing::{
    BillingError, CardBehaviour, ChargeKind, ChargeStatus, CollectionMode, CustomerId, FeeCollection,
    InMemoryUsageStore, PaymentGateway, PaymentStatus, PaymentUpdate, Plan, SandboxGateway, Standing, StoreError,
    UsageReport, UsageStore, UserId,
};

/// A harness whose store and gateway are wrapped in fault injectors.
fn faulty() -> (Harness, Arc<FaultyStore>, Arc<FaultyGateway>) {
    let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
    let sandbox = SandboxGateway::new();
    let gateway = Arc::new(FaultyGateway::new(Arc::new(sandbox.clone())));
    let h = Harness::over(store.clone(), gateway.clone(), sandbox, |b| b);
    (h, store, gateway)
}

fn past_lease(h: &Harness) {
    h.advance(Span::minutes(3));
}

#[tokio::test]
async fn declined_charge_is_retried_on_the_dunning_schedule_with_a_new_key() {
    let h = Harness::new();
    let ana = user("ana");
    let customer = h
        .register(
            &ana,
            CardBehaviour::Declines {
                code: "insufficient_funds".into(),
            },
        )
        .await;
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("ana", 9_000_000, "chat"))
        .await
        .expect("usage is recorded even when the card declines");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Failed);
    let standing = h.service.account_standing(&ana).await.expect("standing");
    assert_eq!(standing.standing, Standing::PastDue);
    assert_eq!(standing.unpaid_charges.len(), 2, "the fee and the block");
    assert!(
        standing
            .unpaid_charges
            .iter()
            .all(|c| c.failure_code.as_deref() == Some("insufficient_funds"))
    );

    // Not due yet: nothing happens.
    h.advance(Span::hours(23));
    assert_eq!(h.service.retry_failed().await.expect("retry").claimed, 0);

    // The customer fixes the card; the retry a day later succeeds, in round 1, with a new key.
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("known customer");
    h.advance(Span::hours(2));
    let report = h.service.retry_failed().await.expect("retry");
    assert_eq!((report.claimed, report.succeeded), (2, 2));
    assert_eq!(
        h.service.account_standing(&ana).await.expect("standing").standing,
        Standing::GoodStanding
    );
    let block = h.store.charges(&ana, november()).await.expect("charges")[1].clone();
    assert_eq!((block.status, block.round), (ChargeStatus::Succeeded, 1));
    let payments = h.sandbox.payments_for_charge(&block.key);
    assert_eq!(payments.len(), 2);
    assert_eq!(payments[0].status, PaymentStatus::Declined);
    assert_eq!(payments[1].status, PaymentStatus::Succeeded);
    assert_ne!(payments[0].idempotency_key, payments[1].idempotency_key);
    h.assert_period_consistent(&ana, november(), &Plan::default()).await;
    let summary = h.service.token_summary(&ana, None).await.expect("summary");
    assert_eq!(summary.total_charged, 50_000);
}

#[tokio::test]
async fn dunning_stops_after_the_schedule_and_the_account_stays_past_due() {
    let h = Harness::new();
    let bea = user("bea");
    h.register(
        &bea,
        CardBehaviour::Declines {
            code: "card_declined".into(),
        },
    )
    .await;
    h.service
        .process_token_usage(UsageReport::new("bea", 100, "chat"))
        .await
        .expect("recorded");
    let mut rounds = 0;
    for _ in 0..10 {
        h.advance(Span::days(5));
        rounds += h.service.retry_failed().await.expect("retry").claimed;
    }
    assert_eq!(rounds, 3, "three retries, then the schedule is exhausted");
    let fee = h.store.charges(&bea, november()).await.expect("charges")[0].clone();
    assert_eq!(
        (fee.status, fee.round, fee.next_retry_at),
        (ChargeStatus::Failed, 3, None)
    );
    assert_eq!(h.sandbox.payments_for_charge(&fee.key).len(), 4);
    assert_eq!(
        h.service.account_standing(&bea).await.expect("standing").standing,
        Standing::PastDue
    );
}

#[tokio::test]
async fn authentication_required_waits_for_the_customer_then_settles_once() {
    let h = Harness::new();
    let caio = user("caio");
    h.register(&caio, CardBehaviour::RequiresAuthentication).await;
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("caio", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::RequiresAction);
    assert_eq!(
        h.service.account_standing(&caio).await.expect("standing").standing,
        Standing::PastDue
    );
    // Resuming does not touch charges that wait for the customer.
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").claimed, 0);

    // The customer authenticates; the gateway's webhook reports it, twice.
    for charge in h.store.charges(&caio, november()).await.expect("charges") {
        let payment_id = charge.payment_id.clone().expect("a payment reference");
        let outcome = h.sandbox.finish_payment(&payment_id, true).expect("finish");
        for _ in 0..2 {
            let settled = h
                .service
                .apply_payment_update(PaymentUpdate {
                    user_id: caio.clone(),
                    charge_key: charge.key.clone(),
                    round: Some(charge.round),
                    outcome: outcome.clone(),
                })
                .await
                .expect("applied");
            assert_eq!(settled.status, ChargeStatus::Succeeded);
        }
    }
    assert_eq!(
        h.service.account_standing(&caio).await.expect("standing").standing,
        Standing::GoodStanding
    );
    let summary = h.service.token_summary(&caio, None).await.expect("summary");
    assert_eq!((summary.total_charged, summary.tier_charges_count), (50_000, 1));
    h.assert_period_consistent(&caio, november(), &Plan::default()).await;
}

#[tokio::test]
async fn processing_payments_stay_pending_until_the_webhook() {
    let h = Harness::new();
    let dani = user("dani");
    h.register(&dani, CardBehaviour::Processing).await;
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("dani", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Pending);
    let block = h.store.charges(&dani, november()).await.expect("charges")[1].clone();
    let payment_id = block.payment_id.clone().expect("the processing payment is referenced");
    // A resume before the recheck time leaves it alone; after it, finds the same payment.
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").claimed, 0);
    h.advance(Span::minutes(20));
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!((report.claimed, report.pending), (2, 2));
    assert_eq!(
        h.sandbox.payments_for_charge(&block.key).len(),
        1,
        "looked up, not paid again"
    );
    let outcome = h.sandbox.finish_payment(&payment_id, true).expect("finish");
    let settled = h
        .service
        .apply_payment_update(PaymentUpdate {
            user_id: dani.clone(),
            charge_key: block.key.clone(),
            round: None,
            outcome,
        })
        .await
        .expect("applied");
    assert_eq!(settled.status, ChargeStatus::Succeeded);
}

#[tokio::test]
async fn transient_gateway_errors_leave_charges_pending_until_resumed() {
    let h = Harness::new();
    let edu = user("edu");
    let customer = h.register(&edu, CardBehaviour::FailsTransiently { times: 2 }).await;
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("edu", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Pending);
    assert_eq!(outcome.fixed_fee_charge.expect("fee").status, ChargeStatus::Pending);
    // The recorder's lease holds: an immediate resume takes nothing.
    assert_eq!(h.service.resume_pending().await.expect("resume").claimed, 0);
    past_lease(&h);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!((report.claimed, report.succeeded), (2, 2));
    assert_eq!(
        h.sandbox
            .collected(&customer, token_billing::Currency::BRL)
            .minor_units(),
        50_000
    );
    h.assert_period_consistent(&edu, november(), &Plan::default()).await;
}

#[tokio::test]
async fn an_outcome_lost_after_the_gateway_charged_is_found_not_paid_again() {
    let h = Harness::new();
    let fabi = user("fabi");
    h.register(&fabi, CardBehaviour::LosesResponse { times: 2 }).await;
    h.service
        .process_token_usage(UsageReport::new("fabi", 8_000_001, "chat"))
        .await
        .expect("recorded");
    let charges = h.store.charges(&fabi, november()).await.expect("charges");
    assert!(
        charges.iter().all(|c| c.status == ChargeStatus::Pending),
        "outcome unknown: pending"
    );
    assert_eq!(h.sandbox.payments().len(), 2, "but the money moved");
    past_lease(&h);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(report.succeeded, 2);
    assert_eq!(h.sandbox.payments().len(), 2, "found, not paid again");
    h.assert_period_consistent(&fabi, november(), &Plan::default()).await;
}

#[tokio::test]
async fn a_gateway_that_forgets_idempotency_keys_still_never_charges_twice() {
    // The payments are made, their answers lost, and the gateway no longer honours the keys (a
    // Stripe key older than 24 hours, a test server): only the look-up of earlier payments by
    // charge key prevents a second payment.
    let (h, _store, gateway) = faulty();
    let gabi = user("gabi");
    h.register(&gabi, CardBehaviour::Succeeds).await;
    h.sandbox.forget_idempotency_keys();
    gateway.inject(GatewayOp::Collect, Fault::FailAfter, 2);
    h.service
        .process_token_usage(UsageReport::new("gabi", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert_eq!(h.sandbox.payments().len(), 2);
    past_lease(&h);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(report.succeeded, 2);
    assert_eq!(h.sandbox.payments().len(), 2, "found, not paid again");
    h.assert_period_consistent(&gabi, november(), &Plan::default()).await;

    // Without the look-up, the same key would have paid again: the sandbox really forgot it.
    let charge = h.store.charges(&gabi, november()).await.expect("charges")[1].clone();
    let key = charge.key.clone();
    let again = h
        .sandbox
        .collect(&token_billing::PaymentRequest {
            charge: &charge,
            idempotency_key: key.as_str(),
            customer: &h
                .sandbox
                .customer_of(&gabi)
                .unwrap_or_else(|| "cus_gabi".parse().expect("valid")),
        })
        .await
        .expect("collect");
    assert_eq!(again.status, PaymentStatus::Succeeded);
    assert_eq!(h.sandbox.payments().len(), 3);
}

#[tokio::test]
async fn a_store_failure_before_recording_records_nothing() {
    let (h, store, _) = faulty();
    store.inject(StoreOp::RecordUsage, Fault::FailBefore, 1);
    let error = h
        .service
        .process_token_usage(UsageReport::new("hugo", 9_000_000, "chat").event_id("evt-1"))
        .await
        .expect_err("the store failed");
    assert!(matches!(error, BillingError::Store(_)), "{error:?}");
    assert!(!error.is_client_error());
    let hugo = user("hugo");
    assert_eq!(h.store.period_summary(&hugo, november()).await.expect("summary"), None);
    assert!(h.sandbox.payments().is_empty());
    // The host retries the same event: recorded once.
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("hugo", 9_000_000, "chat").event_id("evt-1"))
        .await
        .expect("recorded");
    assert!(!outcome.replayed);
    h.assert_period_consistent(&hugo, november(), &Plan::default()).await;
}

#[tokio::test]
async fn an_event_placed_with_a_changed_account_is_placed_again_twice_at_most() {
    let (h, store, _) = faulty();
    let hugo = user("hugo");
    // Twice refused as placed with a stale account: placed again each time, recorded once.
    store.refuse_as_account_changed(2);
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("hugo", 9_000_000, "chat").event_id("evt-1"))
        .await
        .expect("recorded on the third placing");
    assert!(!outcome.replayed);
    assert_eq!(outcome.total_tokens, 9_000_000);
    assert_eq!(h.store.consumptions(&hugo, november()).await.expect("events").len(), 1);
    assert_eq!(h.sandbox.payments().len(), 2, "the fee and the block, once each");

    // A third refusal in a row is the caller's error, and nothing of the event is recorded.
    store.refuse_as_account_changed(3);
    let error = h
        .service
        .process_token_usage(UsageReport::new("hugo", 1_000, "chat").event_id("evt-2"))
        .await
        .expect_err("the account kept changing");
    assert!(
        matches!(error, BillingError::Store(StoreError::AccountChanged { .. })),
        "{error:?}"
    );
    assert_eq!(h.store.consumptions(&hugo, november()).await.expect("events").len(), 1);
    let summary = h.store.period_summary(&hugo, november()).await.expect("summary");
    assert_eq!(summary.expect("the period").total_tokens, 9_000_000);
    h.assert_period_consistent(&hugo, november(), &Plan::default()).await;
}

#[tokio::test]
async fn placing_again_before_a_refusal_leaves_both_account_changes_to_the_record() {
    let store = FaultyStore::new(Arc::new(InMemoryUsageStore::new()));
    let plan = Plan::default();
    let ines = fresh_user("ines");
    let event = usage_event(&ines, 1_000, "chat", november());
    store.refuse_as_account_changed(2);
    let mut placings = 0;
    let placed = store
        .place_and_record_usage(event, &mut |_, _| {
            placings += 1;
            // The first placing, with the account as first read, refuses the event; the
            // store reads the account afresh and places it again.
            (placings > 1).then_some(Placement {
                plan: &plan,
                fee: FeeCollection::Library,
                lease_until: None,
                alerting: None,
            })
        })
        .await
        .expect("recorded after the refusal's re-placing and two changed accounts");
    assert!(matches!(placed, PlacedUsage::Recorded { .. }));
    assert_eq!(placings, 4);
    assert_eq!(store.consumptions(&ines, november()).await.expect("events").len(), 1);
}

#[tokio::test]
async fn a_record_whose_answer_is_lost_is_replayed_by_the_hosts_retry_and_resumed() {
    let (h, store, _) = faulty();
    store.inject(StoreOp::RecordUsage, Fault::FailAfter, 1);
    let report = UsageReport::new("iara", 9_000_000, "chat").event_id("evt-lost");
    h.service
        .process_token_usage(report.clone())
        .await
        .expect_err("the answer was lost");
    let retried = h.service.process_token_usage(report).await.expect("replayed");
    assert!(retried.replayed);
    assert_eq!(retried.total_tokens, 9_000_000, "counted once");
    assert_eq!(retried.tier_charges.len(), 1);
    assert!(h.sandbox.payments().is_empty(), "nothing collected yet");
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").succeeded, 2);
    h.assert_period_consistent(&user("iara"), november(), &Plan::default())
        .await;
}

#[tokio::test]
async fn a_failed_settlement_leaves_the_charge_pending_and_resume_finds_the_payment() {
    let (h, store, _) = faulty();
    let joao = user("joao");
    h.register(&joao, CardBehaviour::Succeeds).await;
    store.inject(StoreOp::SettleCharge, Fault::FailBefore, 2);
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("joao", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Pending);
    assert_eq!(h.sandbox.payments().len(), 2);
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").succeeded, 2);
    assert_eq!(h.sandbox.payments().len(), 2);
    h.assert_period_consistent(&joao, november(), &Plan::default()).await;
}

#[tokio::test]
async fn a_settlement_whose_answer_is_lost_is_already_stored() {
    let (h, store, _) = faulty();
    let kaua = user("kaua");
    h.register(&kaua, CardBehaviour::Succeeds).await;
    store.inject(StoreOp::SettleCharge, Fault::FailAfter, 2);
    h.service
        .process_token_usage(UsageReport::new("kaua", 8_000_001, "chat"))
        .await
        .expect("recorded");
    past_lease(&h);
    assert_eq!(
        h.service.resume_pending().await.expect("resume").claimed,
        0,
        "nothing left pending"
    );
    h.assert_period_consistent(&kaua, november(), &Plan::default()).await;
    assert_eq!(
        h.service
            .token_summary(&kaua, None)
            .await
            .expect("summary")
            .total_charged,
        50_000
    );
}

#[tokio::test]
async fn failures_to_claim_or_to_save_an_opened_customer_are_recovered() {
    let (h, store, _) = faulty();
    // The customer is opened at the gateway but the account cannot be saved.
    store.inject(StoreOp::PutAccount, Fault::FailBefore, 1);
    h.service
        .process_token_usage(UsageReport::new("lia", 8_000_001, "chat"))
        .await
        .expect("usage is recorded anyway");
    assert!(h.sandbox.payments().is_empty());
    past_lease(&h);
    store.inject(StoreOp::ClaimPending, Fault::FailBefore, 1);
    assert!(h.service.resume_pending().await.is_err(), "claiming failed");
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(report.succeeded, 2);
    assert!(h.sandbox.customer_of(&user("lia")).is_some());
    h.assert_period_consistent(&user("lia"), november(), &Plan::default())
        .await;
}

#[tokio::test]
async fn a_crash_between_record_and_collect_is_resumed_by_another_instance() {
    let (h, _, gateway) = faulty();
    let mari = user("mari");
    h.register(&mari, CardBehaviour::Succeeds).await;
    gateway.inject(GatewayOp::Collect, Fault::Hang, 1);
    let crashed = tokio::time::timeout(
        Duration::from_millis(50),
        h.service
            .process_token_usage(UsageReport::new("mari", 8_000_001, "chat")),
    )
    .await;
    assert!(crashed.is_err(), "the process died while collecting");
    assert!(h.sandbox.payments().is_empty(), "nothing was paid");
    let charges = h.store.charges(&mari, november()).await.expect("charges");
    assert_eq!(charges.len(), 2, "but the usage and its charges were recorded");

    let other = h.restart(Arc::new(h.sandbox.clone()));
    past_lease(&h);
    assert_eq!(other.resume_pending().await.expect("resume").succeeded, 2);
    h.assert_period_consistent(&mari, november(), &Plan::default()).await;
}

#[tokio::test]
async fn a_crash_between_collect_and_settle_is_resumed_without_paying_twice() {
    let (h, store, _) = faulty();
    let nina = user("nina");
    h.register(&nina, CardBehaviour::Succeeds).await;
    store.inject(StoreOp::SettleCharge, Fault::Hang, 1);
    let crashed = tokio::time::timeout(
        Duration::from_millis(50),
        h.service
            .process_token_usage(UsageReport::new("nina", 8_000_001, "chat")),
    )
    .await;
    assert!(crashed.is_err(), "the process died while settling");
    assert_eq!(
        h.sandbox.payments().len(),
        1,
        "the first charge was paid, its settlement lost"
    );

    let other = h.restart(Arc::new(h.sandbox.clone()));
    past_lease(&h);
    assert_eq!(other.resume_pending().await.expect("resume").succeeded, 2);
    assert_eq!(h.sandbox.payments().len(), 2, "one payment per charge");
    h.assert_period_consistent(&nina, november(), &Plan::default()).await;
}

/// One step of a random fault schedule.
#[derive(Debug, Clone, Copy)]
enum Step {
    Usage(u64),
    GatewayFault(Fault),
    StoreFault(StoreOp, Fault),
    Decline,
    Transient,
}

mod random_faults {
    use super::*;
    use proptest::prelude::*;

    fn step() -> impl Strategy<Value = Step> {
        let fault = prop_oneof![Just(Fault::FailBefore), Just(Fault::FailAfter)];
        prop_oneof![
            6 => (1u64..30_000).prop_map(Step::Usage),
            1 => fault.clone().prop_map(Step::GatewayFault),
            1 => (prop_oneof![Just(StoreOp::SettleCharge), Just(StoreOp::ClaimPending), Just(StoreOp::RecordUsage)], fault)
                .prop_map(|(op, f)| Step::StoreFault(op, f)),
            1 => Just(Step::Decline),
            1 => Just(Step::Transient),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn after_resume_and_retry_every_block_is_paid_exactly_once(steps in proptest::collection::vec(step(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let plan = Plan::builder().included_tokens(20_000).block_size(15_000).build().expect("valid");
                let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
                let sandbox = SandboxGateway::new();
                let gateway = Arc::new(FaultyGateway::new(Arc::new(sandbox.clone())));
                let h = Harness::over(store.clone(), gateway.clone(), sandbox, |b| b.plan(plan.clone()));
                let olga = user("olga");
                let customer = h.register(&olga, CardBehaviour::Succeeds).await;
                let mut accepted = 0u64;
                for (i, step) in steps.iter().enumerate() {
                    match *step {
                        Step::Usage(tokens) => {
                            let report = UsageReport::new("olga", tokens, "chat").event_id(format!("e{i}"));
                            // The host retries a failed report with the same event id until it
                            // gets an answer.
                            let mut outcome = None;
                            for _ in 0..5 {
                                if let Ok(answer) = h.service.process_token_usage(report.clone()).await {
                                    outcome = Some(answer);
                                    break;
                                }
                            }
                            let outcome = outcome.expect("recorded within five tries");
                            accepted += tokens;
                            prop_assert!(outcome.total_tokens >= tokens);
                        }
                        Step::GatewayFault(fault) => gateway.inject(GatewayOp::Collect, fault, 1),
                        Step::StoreFault(op, fault) => store.inject(op, fault, 1),
                        Step::Decline => h.sandbox.set_behaviour(&customer, CardBehaviour::Declines { code: "card_declined".into() }).expect("customer"),
                        Step::Transient => h.sandbox.set_behaviour(&customer, CardBehaviour::FailsTransiently { times: 1 }).expect("customer"),
                    }
                    h.advance(Span::seconds(10));
                }
                // Recovery: faults cleared, the card fixed, the jobs run until nothing is left.
                store.clear();
                gateway.clear();
                h.sandbox.set_behaviour(&customer, CardBehaviour::Succeeds).expect("customer");
                for _ in 0..6 {
                    h.advance(Span::days(2));
                    h.service.resume_pending().await.expect("resume");
                    h.service.retry_failed().await.expect("retry");
                }
                let charges = h.store.charges(&olga, november()).await.expect("charges");
                prop_assert!(charges.iter().all(|c| c.status == ChargeStatus::Succeeded), "all collected: {:?}",
                    charges.iter().map(|c| (c.block, c.status)).collect::<Vec<_>>());
                let summary = h.service.token_summary(&olga, None).await.expect("summary");
                prop_assert_eq!(summary.total_tokens, accepted, "no usage lost or doubled");
                prop_assert_eq!(summary.tier_charges_count, plan.blocks_owed(accepted));
                let fees = charges.iter().filter(|c| c.kind == ChargeKind::FixedFee).count();
                prop_assert_eq!(fees, usize::from(accepted > 0), "one fee once the period has usage");
                h.assert_period_consistent(&olga, november(), &plan).await;
                Ok(())
            })?;
        }
    }
}

#[tokio::test]
async fn a_card_update_retries_unpaid_charges_even_after_the_schedule_ran_out() {
    let h = Harness::new();
    let paulo = user("paulo");
    let customer = h
        .register(
            &paulo,
            CardBehaviour::Declines {
                code: "expired_card".into(),
            },
        )
        .await;
    h.service
        .process_token_usage(UsageReport::new("paulo", 8_000_001, "chat"))
        .await
        .expect("recorded");
    for _ in 0..5 {
        h.advance(Span::days(5));
        h.service.retry_failed().await.expect("retry");
    }
    let exhausted = h.store.charges(&paulo, november()).await.expect("charges");
    assert!(
        exhausted
            .iter()
            .all(|c| c.status == ChargeStatus::Failed && c.next_retry_at.is_none())
    );

    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("customer");
    let report = h.service.retry_unpaid(&paulo).await.expect("retry");
    assert_eq!((report.claimed, report.succeeded), (2, 2));
    assert_eq!(
        h.service.account_standing(&paulo).await.expect("standing").standing,
        Standing::GoodStanding
    );
    assert_eq!(
        h.service.retry_unpaid(&paulo).await.expect("retry").claimed,
        0,
        "nothing left"
    );
    h.assert_period_consistent(&paulo, november(), &Plan::default()).await;
}

/// A user whose fixed fee was declined in round 0 and whose retry, a day later, is processing:
/// the user, the fee, round 0's declined payment and the fee in round 1, waiting.
async fn round_one_processing(
    h: &Harness,
    name: &str,
) -> (
    UserId,
    token_billing::Charge,
    token_billing::SandboxPayment,
    token_billing::Charge,
) {
    let who = user(name);
    let customer = h
        .register(
            &who,
            CardBehaviour::Declines {
                code: "card_declined".into(),
            },
        )
        .await;
    h.service
        .process_token_usage(UsageReport::new(name, 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&who, november()).await.expect("charges")[0].clone();
    let declined = h.sandbox.payments_for_charge(&fee.key)[0].clone();
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Processing)
        .expect("customer");
    h.advance(Span::days(1));
    h.service.retry_failed().await.expect("retry");
    let in_flight = h.store.charge(&who, &fee.key).await.expect("charge").expect("exists");
    assert_eq!((in_flight.status, in_flight.round), (ChargeStatus::Pending, 1));
    (who, fee, declined, in_flight)
}

/// Round 1's `payment` of `fee` succeeds, and its webhook pays the charge.
async fn round_one_completes(h: &Harness, who: &UserId, fee: &token_billing::Charge, payment: &str) {
    let outcome = h.sandbox.finish_payment(payment, true).expect("finish");
    let paid = h
        .service
        .apply_payment_update(PaymentUpdate {
            user_id: who.clone(),
            charge_key: fee.key.clone(),
            round: Some(1),
            outcome,
        })
        .await
        .expect("applied");
    assert_eq!(paid.status, ChargeStatus::Succeeded);
}

#[tokio::test]
async fn a_stale_failure_from_an_earlier_round_does_not_override_the_current_round() {
    let h = Harness::new();
    let (rita, fee, declined, in_flight) = round_one_processing(&h, "rita").await;

    // Round 0's decline arrives late, as webhooks may, with and without its round.
    for round in [Some(0), None] {
        let late = h
            .service
            .apply_payment_update(PaymentUpdate {
                user_id: rita.clone(),
                charge_key: fee.key.clone(),
                round,
                outcome: token_billing::PaymentOutcome {
                    payment_id: declined.payment_id.clone(),
                    status: PaymentStatus::Declined,
                    decline_code: Some("card_declined".into()),
                    message: None,
                },
            })
            .await
            .expect("ignored");
        assert_eq!((late.status, late.round), (ChargeStatus::Pending, 1), "round {round:?}");
    }
    // Round 1's own outcome still lands.
    let current = in_flight.payment_id.clone().expect("round 1's payment");
    round_one_completes(&h, &rita, &fee, &current).await;
    assert_eq!(
        h.service.account_standing(&rita).await.expect("standing").standing,
        Standing::GoodStanding
    );
}

#[tokio::test]
async fn an_earlier_state_of_a_failed_payment_delivered_late_changes_nothing() {
    let h = Harness::new();
    let tess = user("tess");
    let customer = h.register(&tess, CardBehaviour::Processing).await;
    h.service
        .process_token_usage(UsageReport::new("tess", 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&tess, november()).await.expect("charges")[0].clone();
    assert_eq!(fee.status, ChargeStatus::Pending, "processing: the webhook decides");
    let payment = h.sandbox.payments_for_charge(&fee.key)[0].payment_id.clone();
    // The payment fails, and its failure is delivered first.
    let failed = h.sandbox.finish_payment(&payment, false).expect("finish");
    let update = |outcome| PaymentUpdate {
        user_id: tess.clone(),
        charge_key: fee.key.clone(),
        round: Some(0),
        outcome,
    };
    let charge = h.service.apply_payment_update(update(failed)).await.expect("applied");
    assert_eq!(charge.status, ChargeStatus::Failed);
    let retry_at = charge.next_retry_at.expect("dunning scheduled a retry");
    // Its earlier states arrive late: it was processing, and (for another method) awaiting
    // authentication. Neither reopens the charge, nor moves its dunning.
    for status in [PaymentStatus::Processing, PaymentStatus::RequiresAction] {
        let late = h
            .service
            .apply_payment_update(update(token_billing::PaymentOutcome {
                payment_id: payment.clone(),
                status,
                decline_code: None,
                message: None,
            }))
            .await
            .expect("ignored");
        assert_eq!(
            (late.status, late.next_retry_at),
            (ChargeStatus::Failed, Some(retry_at)),
            "{status:?}"
        );
    }
    assert_eq!(
        h.service.account_standing(&tess).await.expect("standing").standing,
        Standing::PastDue
    );
    // Dunning still retries it on schedule.
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("customer");
    h.clock.set(retry_at);
    assert_eq!(h.service.retry_failed().await.expect("retry").succeeded, 1);
}

#[tokio::test]
async fn a_failed_payment_the_customer_tries_again_is_followed() {
    let sandbox = SandboxGateway::new();
    let gateway = Arc::new(Interposing::over(sandbox.clone()));
    let h = Harness::over(Arc::new(InMemoryUsageStore::new()), gateway.clone(), sandbox, |b| b);
    let uma = user("uma");
    h.register(&uma, CardBehaviour::Processing).await;
    h.service
        .process_token_usage(UsageReport::new("uma", 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&uma, november()).await.expect("charges")[0].clone();
    let payment = h.sandbox.payments_for_charge(&fee.key)[0].payment_id.clone();
    let failed = h.sandbox.finish_payment(&payment, false).expect("finish");
    let update = |outcome| PaymentUpdate {
        user_id: uma.clone(),
        charge_key: fee.key.clone(),
        round: Some(0),
        outcome,
    };
    h.service.apply_payment_update(update(failed)).await.expect("applied");
    // The customer confirms the same payment again, on a page of the host's: the gateway has
    // it awaiting authentication now, and says so.
    let again = token_billing::PaymentOutcome {
        payment_id: payment.clone(),
        status: PaymentStatus::RequiresAction,
        decline_code: None,
        message: None,
    };
    *gateway.found.lock().expect("not poisoned") = Some(Some(again.clone()));
    let charge = h.service.apply_payment_update(update(again)).await.expect("applied");
    assert_eq!(charge.status, ChargeStatus::RequiresAction);
}

#[tokio::test]
async fn a_later_rounds_own_processing_payment_is_followed_when_resumed_not_cancelled() {
    let h = Harness::new();
    let (zed, fee, _, waiting) = round_one_processing(&h, "zed").await;
    let own = waiting.payment_id.clone().expect("round 1's payment");
    // Its webhook is lost; the next run resumes the charge and finds its payment still in flight.
    h.advance(Span::minutes(20));
    h.service.resume_pending().await.expect("resume");
    let payments = h.sandbox.payments_for_charge(&fee.key);
    assert_eq!(payments.len(), 2, "no third payment");
    assert_eq!(
        payments[1].status,
        PaymentStatus::Processing,
        "round 1's own payment is not cancelled"
    );
    // It completes, and the charge is paid by it.
    round_one_completes(&h, &zed, &fee, &own).await;
}

#[tokio::test]
async fn an_update_for_an_unknown_charge_is_an_error() {
    let h = Harness::new();
    let error = h
        .service
        .apply_payment_update(PaymentUpdate {
            user_id: user("nobody"),
            charge_key: token_billing::ChargeKey::new(&user("nobody"), november(), ChargeKind::Block, 1),
            round: None,
            outcome: token_billing::PaymentOutcome {
                payment_id: "pi_x".into(),
                status: PaymentStatus::Succeeded,
                decline_code: None,
                message: None,
            },
        })
        .await
        .expect_err("no such charge");
    assert!(matches!(error, BillingError::ChargeNotFound { .. }));
}

#[tokio::test]
async fn a_failed_account_read_never_resets_the_account() {
    let pro = token_billing::PlanId::new("pro").expect("valid");
    let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
    let sandbox = SandboxGateway::new();
    let h = Harness::over(store.clone(), Arc::new(sandbox.clone()), sandbox, |b| {
        b.add_plan(
            pro.clone(),
            Plan::builder().included_tokens(1_000).build().expect("valid"),
        )
        .collection(CollectionMode::Deferred)
    });
    let sol = user("sol");
    let customer = CustomerId::new("cus_sol").expect("valid");
    h.sandbox.add_customer(customer.clone(), CardBehaviour::Succeeds);
    h.service
        .register_account(&sol, Some(customer.clone()), Some(pro.clone()))
        .await
        .expect("registered");
    h.service
        .process_token_usage(UsageReport::new("sol", 5_000, "chat"))
        .await
        .expect("recorded");
    store.inject(StoreOp::Account, Fault::FailBefore, 1);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(
        (report.claimed, report.pending),
        (2, 2),
        "the charges wait for a later run"
    );
    let account = h.store.account(&sol).await.expect("account").expect("registered");
    assert_eq!(
        (account.plan_id, account.customer_id),
        (pro, Some(customer)),
        "untouched"
    );
    assert_eq!(h.sandbox.customer_of(&sol), None, "no customer opened on a read error");
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").succeeded, 2);
}

/// The sandbox, with another caller's steps landing in the middle of its calls: another
/// instance's resume in the middle of a batch of slow payments, or the host's registration of a
/// user saved while a customer is opened for it.
#[derive(Debug)]
struct Interposing {
    inner: SandboxGateway,
    /// Each payment takes 90 seconds on this clock, and the third lets this instance resume.
    slow: Option<(token_billing::ManualClock, Once<token_billing::BillingService>)>,
    calls: std::sync::atomic::AtomicU32,
    /// Saved into this store when a customer is opened.
    registration: Option<(Arc<dyn UsageStore>, Once<token_billing::Account>)>,
    /// What `find_payment` answers instead of the sandbox, which cannot model a payment the
    /// customer is trying again, nor Stripe's way of reporting one whose authentication failed
    /// as declined while the customer can still complete it.
    found: std::sync::Mutex<Option<Option<token_billing::PaymentOutcome>>>,
}

/// Something an interposing step takes once.
type Once<T> = tokio::sync::Mutex<Option<T>>;

impl Interposing {
    fn over(inner: SandboxGateway) -> Interposing {
        Interposing {
            inner,
            slow: None,
            calls: std::sync::atomic::AtomicU32::new(0),
            registration: None,
            found: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl token_billing::PaymentGateway for Interposing {
    fn name(&self) -> &'static str {
        "interposing"
    }
    async fn create_customer(&self, user: &token_billing::UserId) -> Result<CustomerId, token_billing::GatewayError> {
        if let Some((store, registration)) = &self.registration {
            let account = registration.lock().await.take();
            if let Some(account) = account {
                store.put_account(account).await.expect("the registration is saved");
            }
        }
        self.inner.create_customer(user).await
    }
    async fn collect(
        &self,
        request: &token_billing::PaymentRequest<'_>,
    ) -> Result<token_billing::PaymentOutcome, token_billing::GatewayError> {
        let Some((clock, meanwhile)) = &self.slow else {
            return self.inner.collect(request).await;
        };
        clock.advance(Span::seconds(90));
        // By the third call, the leases the first caller took for its whole batch have expired.
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
            if let Some(other) = meanwhile.lock().await.take() {
                let report = other.resume_pending().await.expect("the other instance resumes");
                assert!(report.claimed > 0, "the other instance found expired leases");
            }
        }
        self.inner.collect(request).await
    }
    async fn find_payment(
        &self,
        key: &token_billing::ChargeKey,
    ) -> Result<Option<token_billing::PaymentOutcome>, token_billing::GatewayError> {
        let found = self.found.lock().expect("not poisoned").clone();
        match found {
            Some(found) => Ok(found),
            None => self.inner.find_payment(key).await,
        }
    }
    async fn cancel_payment(&self, id: &str) -> Result<token_billing::PaymentOutcome, token_billing::GatewayError> {
        self.inner.cancel_payment(id).await
    }
    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &token_billing::PlanId,
        plan: &Plan,
    ) -> Result<token_billing::Subscription, token_billing::GatewayError> {
        self.inner.create_subscription(user, customer, plan_id, plan).await
    }
}

#[tokio::test]
async fn a_long_batch_renews_its_leases_and_never_collects_what_another_instance_took() {
    let sandbox = SandboxGateway::new();
    sandbox.forget_idempotency_keys();
    let store: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
    let clock = token_billing::ManualClock::new(common::nov15());
    let other = token_billing::BillingService::builder(store.clone(), Arc::new(sandbox.clone()))
        .clock(Arc::new(clock.clone()))
        .build();
    let slow = Arc::new(Interposing {
        slow: Some((clock.clone(), tokio::sync::Mutex::new(Some(other)))),
        ..Interposing::over(sandbox.clone())
    });
    let first = token_billing::BillingService::builder(store.clone(), slow)
        .clock(Arc::new(clock.clone()))
        .build();
    let vic = user("vic");
    let customer = CustomerId::new("cus_vic").expect("valid");
    sandbox.add_customer(customer.clone(), CardBehaviour::Succeeds);
    first
        .register_account(&vic, Some(customer), None)
        .await
        .expect("registered");
    // Six charges, 90 s each against a 2-minute lease: the later ones' leases run out mid-batch,
    // and the other instance resumes while the first call is in flight.
    first
        .process_token_usage(UsageReport::new("vic", 8_000_000 * 6, "chat"))
        .await
        .expect("recorded");
    clock.advance(Span::minutes(10));
    first.resume_pending().await.expect("resume");
    let charges = store.charges(&vic, november()).await.expect("charges");
    assert_eq!(charges.len(), 6);
    for charge in &charges {
        let paid = sandbox
            .payments_for_charge(&charge.key)
            .iter()
            .filter(|p| p.status == PaymentStatus::Succeeded)
            .count();
        assert_eq!(paid, 1, "{} paid {paid} times", charge.key);
    }
}

#[tokio::test]
async fn an_authenticated_payment_whose_webhook_was_lost_is_settled_by_resume() {
    let h = Harness::new();
    let tom = user("tom");
    h.register(&tom, CardBehaviour::RequiresAuthentication).await;
    h.service
        .process_token_usage(UsageReport::new("tom", 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&tom, november()).await.expect("charges")[0].clone();
    assert_eq!(fee.status, ChargeStatus::RequiresAction);
    h.sandbox
        .finish_payment(fee.payment_id.as_deref().expect("payment"), true)
        .expect("the customer authenticates");
    h.advance(Span::minutes(20));
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(report.succeeded, 1);
    assert_eq!(
        h.service.account_standing(&tom).await.expect("standing").standing,
        Standing::GoodStanding
    );
    assert_eq!(h.sandbox.payments().len(), 1);
}

/// Applies the webhook of round 0's `payment` of `fee`: its authentication failed.
async fn authentication_failed(
    h: &Harness,
    who: &UserId,
    fee: &token_billing::Charge,
    payment: &str,
) -> token_billing::Charge {
    h.service
        .apply_payment_update(PaymentUpdate {
            user_id: who.clone(),
            charge_key: fee.key.clone(),
            round: Some(0),
            outcome: token_billing::PaymentOutcome {
                payment_id: payment.to_owned(),
                status: PaymentStatus::Declined,
                decline_code: Some("authentication_failed".into()),
                message: None,
            },
        })
        .await
        .expect("applied")
}

/// A user whose fixed fee asked for authentication, which the gateway then reported failed
/// (the payment itself stays open for the customer); the customer's card now pays, and a day
/// has passed, so the charge is due for its next round. The user, the fee and the open payment.
async fn failed_authentication(h: &Harness, name: &str) -> (UserId, token_billing::Charge, String) {
    let who = user(name);
    let customer = h.register(&who, CardBehaviour::RequiresAuthentication).await;
    h.service
        .process_token_usage(UsageReport::new(name, 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&who, november()).await.expect("charges")[0].clone();
    let open = fee.payment_id.clone().expect("the payment awaiting authentication");
    authentication_failed(h, &who, &fee, &open).await;
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("customer");
    h.advance(Span::days(1));
    (who, fee, open)
}

#[tokio::test]
async fn an_authentication_that_failed_without_its_webhook_goes_to_dunning() {
    let h = Harness::new();
    let yan = user("yan");
    let customer = h.register(&yan, CardBehaviour::RequiresAuthentication).await;
    h.service
        .process_token_usage(UsageReport::new("yan", 100, "chat"))
        .await
        .expect("recorded");
    let fee = h.store.charges(&yan, november()).await.expect("charges")[0].clone();
    assert_eq!(fee.status, ChargeStatus::RequiresAction);
    // The customer's authentication fails; its webhook never arrives.
    let open = fee.payment_id.clone().expect("the payment awaiting the customer");
    h.sandbox.finish_payment(&open, false).expect("finish");
    // The next look at charges awaiting their customer finds nothing in flight: the fee fails,
    // and the dunning schedule retries it.
    h.advance(Span::minutes(20));
    h.service.resume_pending().await.expect("resume");
    let failed = h.store.charge(&yan, &fee.key).await.expect("read").expect("the fee");
    assert_eq!(failed.status, ChargeStatus::Failed);
    let retry_at = failed.next_retry_at.expect("a retry scheduled");
    h.sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("customer");
    h.clock.set(retry_at);
    assert_eq!(h.service.retry_failed().await.expect("retry").succeeded, 1);
    assert_eq!(
        h.service.account_standing(&yan).await.expect("standing").standing,
        Standing::GoodStanding
    );
}

#[tokio::test]
async fn a_new_round_cancels_the_previous_rounds_open_payment() {
    let h = Harness::new();
    let (_, fee, open) = failed_authentication(&h, "uli").await;
    let report = h.service.retry_failed().await.expect("retry");
    assert_eq!(report.succeeded, 1);
    let payments = h.sandbox.payments_for_charge(&fee.key);
    assert_eq!(payments.len(), 2);
    assert_eq!(
        payments[0].status,
        PaymentStatus::Canceled,
        "the old payment can no longer succeed"
    );
    assert_eq!(payments[1].status, PaymentStatus::Succeeded);
    assert!(h.sandbox.finish_payment(&open, true).is_err());
}

#[tokio::test]
async fn a_new_round_whose_cancel_failed_cancels_the_previous_payment_when_resumed() {
    let sandbox = SandboxGateway::new();
    let interposing = Arc::new(Interposing::over(sandbox.clone()));
    let gateway = Arc::new(FaultyGateway::new(interposing.clone()));
    let h = Harness::over(Arc::new(InMemoryUsageStore::new()), gateway.clone(), sandbox, |b| b);
    let (wes, fee, open) = failed_authentication(&h, "wes").await;
    // As Stripe does, the gateway reports the open payment as declined: a look-up finds none.
    *interposing.found.lock().expect("not poisoned") = Some(None);
    // The retry claims round 1, but cancelling round 0's payment fails: nothing is collected.
    gateway.inject(GatewayOp::CancelPayment, Fault::FailBefore, 1);
    let report = h.service.retry_failed().await.expect("retry");
    assert_eq!((report.claimed, report.succeeded, report.pending), (1, 0, 1));
    assert_eq!(h.sandbox.payments_for_charge(&fee.key).len(), 1, "no second payment");
    // The lease runs out and another run resumes the charge: round 0's payment is cancelled
    // before round 1's is made.
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").succeeded, 1);
    let payments = h.sandbox.payments_for_charge(&fee.key);
    assert_eq!(
        payments.iter().map(|p| p.status).collect::<Vec<_>>(),
        [PaymentStatus::Canceled, PaymentStatus::Succeeded]
    );
    assert!(
        h.sandbox.finish_payment(&open, true).is_err(),
        "the old payment can no longer succeed"
    );
    let charge = h.store.charge(&wes, &fee.key).await.expect("read").expect("the fee");
    assert_eq!((charge.status, charge.round), (ChargeStatus::Succeeded, 1));
}

/// A sandbox whose payments cannot be canceled once made: they report themselves in the given
/// state (processing: a customer who re-confirmed a declined payment with a bank debit, say;
/// awaiting authentication: one who started confirming it again).
#[derive(Debug)]
struct Uncancelable(SandboxGateway, PaymentStatus);

#[async_trait::async_trait]
impl PaymentGateway for Uncancelable {
    fn name(&self) -> &'static str {
        "uncancelable"
    }
    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, token_billing::GatewayError> {
        self.0.create_customer(user).await
    }
    async fn collect(
        &self,
        request: &token_billing::PaymentRequest<'_>,
    ) -> Result<token_billing::PaymentOutcome, token_billing::GatewayError> {
        self.0.collect(request).await
    }
    async fn find_payment(
        &self,
        key: &token_billing::ChargeKey,
    ) -> Result<Option<token_billing::PaymentOutcome>, token_billing::GatewayError> {
        self.0.find_payment(key).await
    }
    async fn cancel_payment(&self, id: &str) -> Result<token_billing::PaymentOutcome, token_billing::GatewayError> {
        Ok(token_billing::PaymentOutcome {
            payment_id: id.to_owned(),
            status: self.1,
            decline_code: None,
            message: None,
        })
    }
    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &token_billing::PlanId,
        plan: &Plan,
    ) -> Result<token_billing::Subscription, token_billing::GatewayError> {
        self.0.create_subscription(user, customer, plan_id, plan).await
    }
}

#[tokio::test]
async fn a_new_round_awaiting_the_previous_payments_customer_follows_its_failure() {
    let sandbox = SandboxGateway::new();
    let h = Harness::over(
        Arc::new(InMemoryUsageStore::new()),
        Arc::new(Uncancelable(sandbox.clone(), PaymentStatus::RequiresAction)),
        sandbox,
        |b| b,
    );
    let (xia, fee, open) = failed_authentication(&h, "xia").await;
    // Round 1 finds round 0's payment awaiting the customer again: the charge waits on it.
    h.service.retry_failed().await.expect("retry");
    let waiting = h.store.charge(&xia, &fee.key).await.expect("read").expect("the fee");
    assert_eq!(
        (waiting.status, waiting.round, waiting.payment_id.as_deref()),
        (ChargeStatus::RequiresAction, 1, Some(open.as_str()))
    );
    // That payment fails; its webhook names round 0, the round that made it.
    let failed = authentication_failed(&h, &xia, &fee, &open).await;
    assert_eq!((failed.status, failed.round), (ChargeStatus::Failed, 1));
    assert!(failed.next_retry_at.is_some(), "dunning goes on");
}

#[tokio::test]
async fn a_new_round_waits_on_a_previous_payment_that_can_no_longer_be_canceled() {
    let sandbox = SandboxGateway::new();
    let h = Harness::over(
        Arc::new(InMemoryUsageStore::new()),
        Arc::new(Uncancelable(sandbox.clone(), PaymentStatus::Processing)),
        sandbox,
        |b| b,
    );
    let (vic, fee, open) = failed_authentication(&h, "vic").await;
    // The old payment is processing: a new one could be paid beside it, so none is made.
    let report = h.service.retry_failed().await.expect("retry");
    assert_eq!((report.claimed, report.succeeded, report.pending), (1, 0, 1));
    assert_eq!(h.sandbox.payments_for_charge(&fee.key).len(), 1, "no second payment");
    let charge = h.store.charge(&vic, &fee.key).await.expect("read").expect("the fee");
    assert_eq!(
        (charge.status, charge.payment_id.as_deref()),
        (ChargeStatus::Pending, Some(open.as_str()))
    );
    // Its lease runs out and the charge is resumed: it still waits on that payment.
    h.advance(Span::hours(1));
    h.service.resume_pending().await.expect("resume");
    assert_eq!(
        h.sandbox.payments_for_charge(&fee.key).len(),
        1,
        "still no second payment"
    );
    // It completes; its webhook settles the charge with it.
    let outcome = h.sandbox.finish_payment(&open, true).expect("finished");
    let settled = h
        .service
        .apply_payment_update(PaymentUpdate {
            user_id: vic.clone(),
            charge_key: fee.key.clone(),
            round: None,
            outcome,
        })
        .await
        .expect("applied");
    assert_eq!(settled.status, ChargeStatus::Succeeded);
    h.assert_period_consistent(&vic, november(), &Plan::default()).await;
}

#[tokio::test]
async fn failures_of_the_other_steps_leave_nothing_lost_or_doubled() {
    let (h, store, gateway) = faulty();
    let wil = user("wil");
    // Opening a customer fails: the charges wait, then are collected.
    gateway.inject(GatewayOp::CreateCustomer, Fault::FailBefore, 1);
    h.service
        .process_token_usage(UsageReport::new("wil", 8_000_001, "chat"))
        .await
        .expect("recorded");
    assert!(h.sandbox.payments().is_empty());
    past_lease(&h);
    // The look-up fails once (the charges were claimed before): they stay pending.
    gateway.inject(GatewayOp::FindPayment, Fault::FailBefore, 2);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(report.pending, 2);
    assert!(h.sandbox.payments().is_empty(), "nothing collected without the look-up");
    past_lease(&h);
    assert_eq!(h.service.resume_pending().await.expect("resume").succeeded, 2);

    // Opening December's period fails after the fee charge was stored: opening again finds it.
    h.clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 2, 12, 0, 0).unwrap());
    store.inject(StoreOp::EnsureCharge, Fault::FailAfter, 1);
    assert!(h.service.open_period(&wil, None).await.is_err());
    past_lease(&h);
    let fee = h
        .service
        .open_period(&wil, None)
        .await
        .expect("opened")
        .expect("the fee");
    h.service.resume_pending().await.expect("resume");
    let fee = h.store.charge(&wil, &fee.key).await.expect("charge").expect("exists");
    assert_eq!(fee.status, ChargeStatus::Succeeded);
    assert_eq!(h.sandbox.payments_for_charge(&fee.key).len(), 1);

    // Claiming retries fails: the next run retries.
    let december = token_billing::PeriodKey::new(2026, 12).expect("valid");
    h.sandbox
        .set_behaviour(
            &h.sandbox.customer_of(&wil).expect("customer"),
            CardBehaviour::Declines {
                code: "card_declined".into(),
            },
        )
        .expect("customer");
    h.service
        .process_token_usage(UsageReport::new("wil", 8_000_001, "chat"))
        .await
        .expect("recorded");
    h.sandbox
        .set_behaviour(&h.sandbox.customer_of(&wil).expect("customer"), CardBehaviour::Succeeds)
        .expect("customer");
    h.advance(Span::days(1));
    store.inject(StoreOp::ClaimDueRetries, Fault::FailBefore, 1);
    assert!(h.service.retry_failed().await.is_err());
    assert_eq!(h.service.retry_failed().await.expect("retry").succeeded, 1);
    h.assert_period_consistent(&wil, november(), &Plan::default()).await;
    h.assert_period_consistent(&wil, december, &Plan::default()).await;
}

/// A paid invoice applied, then the store fails to remember the event (before or after it
/// writes): Stripe delivers it again, and the fee is recorded once, with no duplicate payment
/// reported, and the event is remembered from then on.
#[tokio::test]
async fn a_fee_event_not_remembered_is_applied_once_when_delivered_again() {
    for fault in [Fault::FailBefore, Fault::FailAfter] {
        let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
        let sandbox = SandboxGateway::new();
        let h = Harness::over(store.clone(), Arc::new(sandbox.clone()), sandbox, |b| {
            b.fee_collection(token_billing::FeeCollection::Subscription)
        });
        let eva = user("eva");
        h.register(&eva, CardBehaviour::Succeeds).await;
        let event = token_billing::GatewayEvent {
            id: "evt_invoice_paid".to_owned(),
            event_type: "invoice.paid".to_owned(),
            change: token_billing::GatewayChange::FixedFeePaid {
                user_id: eva.clone(),
                period_start: chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 11, 1, 3, 0, 0)
                    .single()
                    .expect("valid"),
                payment_id: "in_1".to_owned(),
                amount: Plan::default().fixed_fee(),
            },
        };
        store.inject(StoreOp::RecordGatewayEvent, fault, 1);
        h.service
            .apply_gateway_event(event.clone())
            .await
            .expect_err("the event was not remembered");
        let again = h
            .service
            .apply_gateway_event(event.clone())
            .await
            .expect("delivered again");
        // Lost before the store wrote it, the event is applied now; lost after, it was remembered
        // and its fee recorded the first time.
        assert_eq!(again.is_some(), fault == Fault::FailBefore, "{fault:?}");
        assert!(
            h.service
                .apply_gateway_event(event)
                .await
                .expect("a third time")
                .is_none(),
            "remembered now"
        );
        let summary = h.service.token_summary(&eva, Some(november())).await.expect("summary");
        assert_eq!(summary.fixed_fee_charged, 40_000, "{fault:?}");
        let fees = h.store.charges(&eva, november()).await.expect("charges");
        assert_eq!(fees.len(), 1, "{fault:?}");
        assert_eq!(
            (fees[0].status, fees[0].payment_id.as_deref()),
            (ChargeStatus::Succeeded, Some("in_1")),
            "{fault:?}"
        );
        let trail = h.service.audit_trail(&eva, Some(november())).await.expect("trail");
        assert!(
            !trail
                .iter()
                .any(|e| matches!(e.event, token_billing::AuditEvent::DuplicatePayment { .. })),
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_registration_made_while_a_customer_is_opened_is_kept_and_its_customer_pays() {
    let store: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
    let sandbox = SandboxGateway::new();
    let gil = user("gil");
    let theirs = CustomerId::new("cus_gil_registered").expect("valid");
    sandbox.add_customer(theirs.clone(), CardBehaviour::Succeeds);
    let pro = token_billing::PlanId::new("pro").expect("valid");
    let registration = token_billing::Account {
        user_id: gil.clone(),
        customer_id: Some(theirs.clone()),
        plan_id: pro.clone(),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: common::nov15(),
        updated_at: common::nov15(),
    };
    let gateway = Arc::new(Interposing {
        registration: Some((store.clone(), tokio::sync::Mutex::new(Some(registration.clone())))),
        ..Interposing::over(sandbox.clone())
    });
    let h = Harness::over(store, gateway, sandbox, |b| b.add_plan(pro.clone(), Plan::default()));
    // Gil's first event is charged; opening a customer for it, the registration lands.
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("gil", 9_000_000, "chat"))
        .await
        .expect("recorded");
    assert!(outcome.tier_charges.iter().all(|c| c.status == ChargeStatus::Succeeded));
    assert_eq!(h.store.account(&gil).await.expect("read"), Some(registration));
    let payers: Vec<CustomerId> = h.sandbox.payments().into_iter().map(|p| p.customer).collect();
    assert_eq!(
        payers,
        [theirs.clone(), theirs],
        "the fee and the block, by the registered customer"
    );
}

/// A recording call that cannot open the user's customer (the gateway failed) gives up the
/// leases it took on the event's charges: the next run collects them at once, not after the
/// lease.
#[tokio::test]
async fn charges_whose_customer_could_not_be_opened_are_not_left_leased() {
    let (h, _store, gateway) = faulty();
    gateway.inject(GatewayOp::CreateCustomer, Fault::FailBefore, 1);
    let outcome = h
        .service
        .process_token_usage(UsageReport::new("gus", 9_000_000, "chat"))
        .await
        .expect("recorded all the same");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Pending);
    let report = h.service.resume_pending().await.expect("resume");
    assert_eq!(
        (report.claimed, report.succeeded),
        (2, 2),
        "the fee and block 1, with no time passed"
    );
    h.assert_period_consistent(&user("gus"), november(), &token_billing::Plan::default())
        .await;
}
