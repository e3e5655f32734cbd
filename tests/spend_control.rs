//! Spend control through the service: caps, holds for calls in flight, the payment gate, and
//! direct usage under limits, on the in-memory store with a manual clock.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, user};
use proptest::prelude::*;
use token_billing::testing::faults::{Fault, FaultyStore, StoreOp};
use token_billing::{
    AlertKind, AlertPolicy, BillingError, CardBehaviour, Currency, InMemoryUsageStore, LimitKind, Limits, Money, Plan,
    Reservation, SandboxGateway, UsageError, UsageReport,
};

/// A small plan, so that a few hundred tokens cross blocks: 100 included, blocks of 100.
fn small_plan() -> Plan {
    Plan::builder()
        .included_tokens(100)
        .block_size(100)
        .build()
        .expect("a valid plan")
}

fn reservation(user: &str, tokens: u64, id: &str) -> Reservation {
    Reservation::new(user, tokens).hold_id(id).ttl(Duration::from_secs(60))
}

#[tokio::test]
async fn direct_usage_over_a_cap_is_recorded_and_says_which_limit_it_reached() {
    let harness = Harness::new();
    let ana = user("ana");
    harness
        .service
        .set_limits(&ana, Some(Limits::none().with_token_cap(10_000_000)))
        .await
        .expect("set_limits");
    let under = harness
        .service
        .process_token_usage(UsageReport::new("ana", 6_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(under.limit_exceeded, None);
    // Consumed tokens are never refused: recorded past the cap, and the outcome says so.
    let over = harness
        .service
        .process_token_usage(UsageReport::new("ana", 6_000_000, "chat"))
        .await
        .expect("recorded past the cap");
    assert_eq!(
        (over.total_tokens, over.limit_exceeded),
        (12_000_000, Some(LimitKind::TokenCap))
    );
    let check = harness.service.check_usage(&ana, 1).await.expect("check");
    assert_eq!(
        (check.allowed, check.refused_by, check.remaining_tokens),
        (false, Some(LimitKind::TokenCap), Some(0))
    );
    let refused = harness.service.reserve(reservation("ana", 1, "next")).await;
    assert!(matches!(
        refused,
        Err(BillingError::LimitExceeded {
            limit: LimitKind::TokenCap,
            remaining_tokens: 0
        })
    ));
}

#[tokio::test]
async fn an_enforced_report_a_limit_forbids_records_nothing_and_a_resend_of_a_recorded_one_replays() {
    let harness = Harness::new();
    let ana = user("ana");
    // BRL 500.00: the fee and one block, 16M tokens.
    let cap = Limits::none().with_spend_cap(Money::from_minor(50_000, Currency::BRL));
    harness.service.set_limits(&ana, Some(cap)).await.expect("set_limits");
    let first = UsageReport::new("ana", 10_000_000, "chat")
        .event_id("call-1")
        .enforce_limits();
    harness
        .service
        .process_token_usage(first.clone())
        .await
        .expect("within the cap");
    let refused = harness
        .service
        .process_token_usage(
            UsageReport::new("ana", 6_000_001, "chat")
                .event_id("call-2")
                .enforce_limits(),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(BillingError::LimitExceeded {
                limit: LimitKind::SpendCap,
                remaining_tokens: 6_000_000
            })
        ),
        "{refused:?}"
    );
    let summary = harness.service.token_summary(&ana, None).await.expect("summary");
    assert_eq!(
        (summary.total_tokens, summary.tier_charges_count),
        (10_000_000, 1),
        "nothing of the refusal"
    );
    assert_eq!(
        harness.service.check_usage(&ana, 1).await.expect("check").held_tokens,
        0
    );
    // Fits exactly.
    let last = harness
        .service
        .process_token_usage(
            UsageReport::new("ana", 6_000_000, "chat")
                .event_id("call-3")
                .enforce_limits(),
        )
        .await
        .expect("fits exactly");
    assert_eq!(last.limit_exceeded, Some(LimitKind::SpendCap));
    // The first event sent again answers its outcome, though the cap is now reached.
    let again = harness.service.process_token_usage(first).await.expect("a replay");
    assert!(again.replayed);
}

#[tokio::test]
async fn a_batch_enforces_each_event_as_single_calls_would() {
    let harness = Harness::with_plan(small_plan());
    let ana = user("ana");
    harness
        .service
        .set_limits(&ana, Some(Limits::none().with_token_cap(100)))
        .await
        .expect("set_limits");
    let outcomes = harness
        .service
        .process_token_usage_batch(vec![
            UsageReport::new("ana", 60, "chat").event_id("direct"),
            UsageReport::new("ana", 50, "chat")
                .event_id("enforced")
                .enforce_limits(),
            UsageReport::new("ana", 40, "chat").event_id("fits").enforce_limits(),
            UsageReport::new("ana", 30, "chat").event_id("after").enforce_limits(),
        ])
        .await
        .expect("the batch");
    assert!(outcomes[0].is_ok());
    assert!(matches!(
        outcomes[1],
        Err(BillingError::LimitExceeded {
            limit: LimitKind::TokenCap,
            remaining_tokens: 40
        })
    ));
    assert_eq!(outcomes[2].as_ref().map(|o| o.total_tokens).ok(), Some(100));
    assert!(matches!(outcomes[3], Err(BillingError::LimitExceeded { .. })));
    let check = harness.service.check_usage(&ana, 0).await.expect("check");
    assert_eq!((check.total_tokens, check.held_tokens), (100, 0));
}

#[tokio::test]
async fn a_settle_retried_after_a_lost_answer_or_after_expiry_records_the_usage_once() {
    let harness = Harness::with_plan(small_plan());
    let ana = user("ana");
    harness
        .service
        .set_limits(&ana, Some(Limits::none().with_token_cap(1_000)))
        .await
        .expect("set_limits");
    let hold = harness
        .service
        .reserve(reservation("ana", 300, "stream-1"))
        .await
        .expect("granted");
    assert_eq!((hold.granted_tokens, hold.remaining_tokens), (300, Some(700)));
    // The same request again (its answer was lost): the same hold.
    let again = harness
        .service
        .reserve(reservation("ana", 300, "stream-1"))
        .await
        .expect("the same hold");
    assert!(again.replayed);
    assert_eq!(again.expires_at, hold.expires_at);

    let settled = harness
        .service
        .settle_hold("stream-1", UsageReport::new("ana", 420, "chat"))
        .await
        .expect("settled");
    assert_eq!((settled.held_tokens, settled.overshoot_tokens), (Some(300), 120));
    // Retried after a lost answer: the original outcome, recorded once.
    let retried = harness
        .service
        .settle_hold("stream-1", UsageReport::new("ana", 420, "chat"))
        .await
        .expect("replayed");
    assert!(retried.outcome.replayed);
    assert_eq!(retried.outcome.consumption_id, settled.outcome.consumption_id);
    // A hold id that was settled cannot hold again.
    let reused = harness.service.reserve(reservation("ana", 10, "stream-1")).await;
    assert!(matches!(reused, Err(BillingError::EventConflict { .. })), "{reused:?}");

    // A caller that crashes between grant and settle: its hold expires and blocks nobody.
    harness
        .service
        .reserve(reservation("ana", 500, "crashed"))
        .await
        .expect("granted");
    assert!(
        harness
            .service
            .reserve(reservation("ana", 200, "blocked"))
            .await
            .is_err()
    );
    harness.advance(chrono::Duration::seconds(61));
    assert_eq!(
        harness.service.check_usage(&ana, 0).await.expect("check").held_tokens,
        0
    );
    // Its settle arrives after the expiry: the tokens were consumed, and are recorded.
    let late = harness
        .service
        .settle_hold("crashed", UsageReport::new("ana", 450, "chat"))
        .await
        .expect("recorded after expiry");
    assert_eq!((late.outcome.total_tokens, late.held_tokens), (870, None));

    // A released hold frees its tokens at once.
    harness
        .service
        .reserve(reservation("ana", 100, "cancelled"))
        .await
        .expect("granted");
    assert!(harness.service.release_hold(&ana, "cancelled").await.expect("released"));
    assert!(
        !harness
            .service
            .release_hold(&ana, "cancelled")
            .await
            .expect("idempotent")
    );
    assert_eq!(
        harness
            .service
            .check_usage(&ana, 0)
            .await
            .expect("check")
            .remaining_tokens,
        Some(130)
    );
}

/// Registers `user` with a card that declines, behind the payment gate, and records 9M tokens:
/// the fee and the first block are declined. Answers the customer.
async fn declined_behind_the_gate(harness: &Harness, user: &token_billing::UserId) -> token_billing::CustomerId {
    let customer = harness
        .register(
            user,
            CardBehaviour::Declines {
                code: "insufficient_funds".to_owned(),
            },
        )
        .await;
    harness
        .service
        .set_limits(user, Some(Limits::none().with_payment_gate()))
        .await
        .expect("set_limits");
    harness
        .service
        .process_token_usage(UsageReport::new(user.as_str(), 9_000_000, "chat"))
        .await
        .expect("recorded");
    customer
}

#[tokio::test]
async fn a_declined_block_closes_the_payment_gate_until_it_is_paid() {
    let harness = Harness::new();
    let ana = user("ana");
    // The fee and the first block are declined.
    let customer = declined_behind_the_gate(&harness, &ana).await;
    // The block started may be filled; the next may not start.
    let check = harness.service.check_usage(&ana, 7_000_001).await.expect("check");
    assert_eq!(
        (check.refused_by, check.remaining_tokens),
        (Some(LimitKind::PaymentGate), Some(7_000_000))
    );
    assert!(check.payment_overdue);
    let refused = harness
        .service
        .reserve(reservation("ana", 7_000_001, "next-block"))
        .await;
    assert!(matches!(
        refused,
        Err(BillingError::LimitExceeded {
            limit: LimitKind::PaymentGate,
            ..
        })
    ));
    let enforced = harness
        .service
        .process_token_usage(UsageReport::new("ana", 7_000_001, "chat").enforce_limits())
        .await;
    assert!(matches!(
        enforced,
        Err(BillingError::LimitExceeded {
            limit: LimitKind::PaymentGate,
            ..
        })
    ));
    harness
        .service
        .reserve(reservation("ana", 7_000_000, "within"))
        .await
        .expect("within the block started");
    harness.service.release_hold(&ana, "within").await.expect("released");

    // The customer updates the card; the unpaid charges are retried and paid: the gate opens.
    harness
        .sandbox
        .set_behaviour(&customer, CardBehaviour::Succeeds)
        .expect("a known customer");
    harness.service.retry_unpaid(&ana).await.expect("retried");
    let check = harness.service.check_usage(&ana, 7_000_001).await.expect("check");
    assert!(check.allowed && !check.payment_overdue, "{check:?}");
    harness
        .service
        .reserve(reservation("ana", 7_000_001, "next-block"))
        .await
        .expect("the next block may start");
}

#[tokio::test]
async fn the_payment_gate_closing_raises_one_alert() {
    let harness = Harness::with(|b| b.alerts(AlertPolicy::standard()));
    let ana = user("ana");
    // The fee and the first block are declined.
    declined_behind_the_gate(&harness, &ana).await;
    for _ in 0..3 {
        let refused = harness.service.reserve(reservation("ana", 8_000_000, "next")).await;
        assert!(matches!(
            refused,
            Err(BillingError::LimitExceeded {
                limit: LimitKind::PaymentGate,
                ..
            })
        ));
    }
    let gate: Vec<_> = harness
        .service
        .pending_alerts(Some(&ana), 10)
        .await
        .expect("alerts")
        .into_iter()
        .filter(|a| a.kind == AlertKind::PaymentGate)
        .collect();
    assert_eq!(gate.len(), 1, "one alert, however many refusals");
}

#[tokio::test]
async fn the_payment_gate_waits_for_its_grace() {
    let harness = Harness::with(|b| b.payment_gate_grace(Duration::from_secs(3 * 24 * 3600)));
    let ana = user("ana");
    // The fee and the first block are declined.
    declined_behind_the_gate(&harness, &ana).await;
    assert!(
        harness
            .service
            .check_usage(&ana, 8_000_000)
            .await
            .expect("check")
            .allowed
    );
    harness.advance(chrono::Duration::days(3));
    let check = harness.service.check_usage(&ana, 8_000_000).await.expect("check");
    assert_eq!(check.refused_by, Some(LimitKind::PaymentGate));
}

#[tokio::test]
async fn plans_carry_default_limits_and_accounts_override_them() {
    let capped = Plan::builder()
        .limits(Limits::none().with_token_cap(1_000))
        .build()
        .expect("a valid plan");
    let harness = Harness::with_plan(capped);
    let ana = user("ana");
    let check = harness.service.check_usage(&ana, 1_001).await.expect("check");
    assert_eq!(check.refused_by, Some(LimitKind::TokenCap), "the plan's cap");
    harness
        .service
        .set_limits(&ana, Some(Limits::none()))
        .await
        .expect("set_limits");
    let check = harness.service.check_usage(&ana, 1_001).await.expect("check");
    assert!(
        check.allowed && check.remaining_tokens.is_none(),
        "the account lifts it: {check:?}"
    );
    // A plan whose cap is in another currency than its prices is refused.
    let mixed = Plan::builder()
        .limits(Limits::none().with_spend_cap(Money::from_minor(1, Currency::USD)))
        .build();
    assert!(mixed.is_err());
}

#[tokio::test]
async fn bad_reservations_are_refused_with_typed_errors() {
    let harness = Harness::new();
    let zero = harness.service.reserve(Reservation::new("ana", 0)).await;
    assert!(matches!(zero, Err(BillingError::InvalidUsage(UsageError::ZeroTokens))));
    let forever = harness
        .service
        .reserve(Reservation::new("ana", 10).ttl(Duration::from_secs(2 * 24 * 3600)))
        .await;
    assert!(matches!(
        forever,
        Err(BillingError::InvalidUsage(UsageError::HoldTtl { .. }))
    ));
    let bad_user = harness.service.reserve(Reservation::new("", 10)).await;
    assert!(matches!(
        bad_user,
        Err(BillingError::InvalidUsage(UsageError::InvalidId(_)))
    ));
    let conflict = harness
        .service
        .settle_hold("h-1", UsageReport::new("ana", 10, "chat").event_id("other"))
        .await;
    assert!(matches!(conflict, Err(BillingError::EventConflict { .. })));
}

#[tokio::test]
async fn lost_answers_and_crashes_around_holds_lose_nothing_and_double_nothing() {
    let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
    let sandbox = SandboxGateway::new();
    let harness = Harness::over(store.clone(), Arc::new(sandbox.clone()), sandbox, |b| {
        b.plan(small_plan())
    });
    let ana = user("ana");
    harness
        .service
        .set_limits(&ana, Some(Limits::none().with_token_cap(1_000)))
        .await
        .expect("set_limits");

    // The grant's answer is lost: the retry with the same hold id answers the same hold, held once.
    store.inject(StoreOp::Reserve, Fault::FailAfter, 1);
    assert!(harness.service.reserve(reservation("ana", 300, "h-1")).await.is_err());
    let again = harness
        .service
        .reserve(reservation("ana", 300, "h-1"))
        .await
        .expect("the same hold");
    assert!(again.replayed);
    assert_eq!(
        harness.service.check_usage(&ana, 0).await.expect("check").held_tokens,
        300
    );

    // The settle's answer is lost after the usage was recorded: the retry replays it.
    store.inject(StoreOp::RecordUsage, Fault::FailAfter, 1);
    let settle = || harness.service.settle_hold("h-1", UsageReport::new("ana", 280, "chat"));
    assert!(settle().await.is_err());
    assert!(settle().await.expect("replayed").outcome.replayed);
    let check = harness.service.check_usage(&ana, 0).await.expect("check");
    assert_eq!(
        (check.total_tokens, check.held_tokens),
        (280, 0),
        "recorded once, the hold freed"
    );

    // An enforced report whose record fails before it runs: nothing recorded, nothing held.
    store.inject(StoreOp::RecordUsage, Fault::FailBefore, 1);
    let enforced = UsageReport::new("ana", 500, "chat").event_id("e-1").enforce_limits();
    assert!(harness.service.process_token_usage(enforced.clone()).await.is_err());
    let check = harness.service.check_usage(&ana, 0).await.expect("check");
    assert_eq!((check.total_tokens, check.held_tokens), (280, 0));
    // Sent again, it is recorded once.
    harness
        .service
        .process_token_usage(enforced.clone())
        .await
        .expect("recorded");
    assert!(
        harness
            .service
            .process_token_usage(enforced)
            .await
            .expect("replayed")
            .replayed
    );
    assert_eq!(
        harness.service.check_usage(&ana, 0).await.expect("check").total_tokens,
        780
    );
}

/// One step of a random history of one user under a token cap.
#[derive(Debug, Clone)]
enum Step {
    Reserve { tokens: u64, ttl: u64 },
    Settle { hold: usize, tokens: u64 },
    Release { hold: usize },
    Advance { seconds: u64 },
    Direct { tokens: u64 },
    Enforced { tokens: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1u64..=300, 1u64..=120).prop_map(|(tokens, ttl)| Step::Reserve { tokens, ttl }),
        2 => (0usize..16, 1u64..=400).prop_map(|(hold, tokens)| Step::Settle { hold, tokens }),
        1 => (0usize..16).prop_map(|hold| Step::Release { hold }),
        1 => (1u64..=90).prop_map(|seconds| Step::Advance { seconds }),
        1 => (1u64..=200).prop_map(|tokens| Step::Direct { tokens }),
        2 => (1u64..=200).prop_map(|tokens| Step::Enforced { tokens }),
    ]
}

/// What the service must have done, kept beside it: holds by id with their tokens and expiry
/// (seconds since the start), the period total, and the tokens consumed beyond any hold.
#[derive(Debug, Default)]
struct Model {
    holds: BTreeMap<String, (u64, u64)>,
    settled: BTreeMap<String, u64>,
    total: u64,
    beyond_holds: u64,
    now: u64,
}

impl Model {
    fn held(&self) -> u64 {
        self.holds
            .values()
            .filter(|(_, expires)| *expires > self.now)
            .map(|(t, _)| t)
            .sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// For random interleavings of reserves, settles (again, and after expiry), releases,
    /// expiries, direct and enforced events: every grant and refusal is exactly what the cap
    /// allows; at every step the usage recorded and held stays within the cap but for usage
    /// consumed beyond a hold; every settled hold's usage is recorded exactly once.
    #[test]
    fn holds_and_usage_never_pass_the_cap_but_by_consumed_usage(
        cap in 0u64..=1_000,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async {
            let harness = Harness::with_plan(small_plan());
            let service = &harness.service;
            let ana = user("ana");
            service.set_limits(&ana, Some(Limits::none().with_token_cap(cap))).await.expect("set_limits");
            let mut model = Model::default();
            let mut ids: Vec<String> = Vec::new();
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Reserve { tokens, ttl } => {
                        let id = format!("hold-{n}");
                        let used = model.total + model.held();
                        let answer = service
                            .reserve(Reservation::new("ana", tokens).hold_id(id.clone()).ttl(Duration::from_secs(ttl)))
                            .await;
                        if used + tokens <= cap {
                            let hold = answer.expect("granted within the cap");
                            prop_assert_eq!(hold.remaining_tokens, Some(cap - used - tokens));
                            model.holds.insert(id.clone(), (tokens, model.now + ttl));
                        } else {
                            let refused = matches!(answer, Err(BillingError::LimitExceeded { limit: LimitKind::TokenCap, remaining_tokens }) if remaining_tokens == cap.saturating_sub(used));
                            prop_assert!(refused, "refused exactly past the cap");
                        }
                        ids.push(id);
                    }
                    Step::Settle { hold, tokens } => {
                        let Some(id) = ids.get(hold % ids.len().max(1)).cloned() else { continue };
                        let answer = service.settle_hold(&id, UsageReport::new("ana", tokens, "chat")).await;
                        match model.settled.get(&id) {
                            Some(&recorded) if recorded == tokens => prop_assert!(answer.expect("a replay").outcome.replayed),
                            Some(_) => {
                                let conflict = matches!(answer, Err(BillingError::EventConflict { .. }));
                                prop_assert!(conflict, "other usage under a settled id is a conflict");
                            }
                            None => {
                                let settled = answer.expect("settled");
                                let open = model.holds.remove(&id).filter(|(_, expires)| *expires > model.now);
                                let held = open.map(|(t, _)| t);
                                prop_assert_eq!(settled.held_tokens, held);
                                model.beyond_holds += tokens.saturating_sub(held.unwrap_or(0));
                                model.total += tokens;
                                model.settled.insert(id, tokens);
                            }
                        }
                    }
                    Step::Release { hold } => {
                        let Some(id) = ids.get(hold % ids.len().max(1)).cloned() else { continue };
                        let open = model.holds.remove(&id).is_some_and(|(_, expires)| expires > model.now);
                        let released = service.release_hold(&ana, &id).await.expect("release");
                        // An expired hold may still be there to free: only an open one must be.
                        prop_assert!(released || !open);
                    }
                    Step::Advance { seconds } => {
                        harness.advance(chrono::Duration::seconds(i64::try_from(seconds).expect("small")));
                        model.now += seconds;
                    }
                    Step::Direct { tokens } => {
                        service.process_token_usage(UsageReport::new("ana", tokens, "chat")).await.expect("never refused");
                        model.total += tokens;
                        model.beyond_holds += tokens;
                    }
                    Step::Enforced { tokens } => {
                        let used = model.total + model.held();
                        let answer = service
                            .process_token_usage(UsageReport::new("ana", tokens, "chat").enforce_limits())
                            .await;
                        if used + tokens <= cap {
                            answer.expect("within the cap");
                            model.total += tokens;
                        } else {
                            let refused = matches!(answer, Err(BillingError::LimitExceeded { .. }));
                            prop_assert!(refused, "refused past the cap");
                        }
                    }
                }
                let check = service.check_usage(&ana, 0).await.expect("check");
                prop_assert_eq!(check.total_tokens, model.total, "every settled hold recorded once");
                prop_assert_eq!(check.held_tokens, model.held());
                prop_assert!(
                    check.total_tokens + check.held_tokens <= cap + model.beyond_holds,
                    "within the cap but for consumed usage"
                );
            }
            Ok(())
        })?;
    }
}
