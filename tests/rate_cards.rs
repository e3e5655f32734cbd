//! Token classes and rate cards through the service: weights of 1 change nothing, billable totals
//! do not depend on how a call's classes are split over events, and a rate card change applies
//! from the next period.

mod common;

use std::collections::BTreeSet;

use chrono::{Duration, TimeZone, Utc};
use common::{Harness, november, user};
use proptest::prelude::*;
use token_billing::{
    BillableTokens, ChargeKind, ClassWeights, ModelName, Plan, RateCard, TierLabel, TokenCounts, UsageReport, UserId,
    Weight,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// What a period cost: (kind, block, tier label, amount).
type Bill = BTreeSet<(ChargeKind, u64, TierLabel, i64)>;

async fn bill(h: &Harness, user: &UserId) -> Bill {
    h.store
        .charges(user, november())
        .await
        .expect("charges")
        .iter()
        .map(|c| (c.kind, c.block, c.billing_tier.clone(), c.amount.minor_units()))
        .collect()
}

fn small_plan() -> token_billing::PlanBuilder {
    Plan::builder().included_tokens(5_000).block_size(3_000)
}

fn counts() -> impl Strategy<Value = TokenCounts> {
    (0u64..4_000, 0u64..4_000, 0u64..2_000, 0u64..3_000, 0u64..2_000).prop_map(
        |(input, cached_input, cache_write, output, reasoning)| TokenCounts {
            input,
            cached_input,
            cache_write,
            output,
            reasoning,
        },
    )
}

/// A weight of up to 8 with up to six decimal places.
fn weight() -> impl Strategy<Value = Weight> {
    (0u64..=8_000_000).prop_map(|micros| Weight::from_micros(micros).expect("a weight"))
}

fn weights() -> impl Strategy<Value = ClassWeights> {
    (weight(), weight(), weight(), weight(), weight()).prop_map(
        |(input, cached_input, cache_write, output, reasoning)| ClassWeights {
            input,
            cached_input,
            cache_write,
            output,
            reasoning,
        },
    )
}

const MODELS: [&str; 3] = ["gpt-4o-2024-08-06", "claude-sonnet-4-5", "gemini-2.5-pro"];

/// A card with a default row and rows for a prefix and an exact name.
fn card() -> impl Strategy<Value = RateCard> {
    (weights(), weights(), weights()).prop_map(|(default, gpt, claude)| {
        RateCard::new(default)
            .with_model("gpt-4o*", gpt)
            .and_then(|c| c.with_model("claude-sonnet-4-5", claude))
            .expect("valid patterns")
    })
}

/// Splits each class of `counts` into `parts` events at the cuts given (fractions of each class).
fn split(counts: &TokenCounts, cuts: &[u16]) -> Vec<TokenCounts> {
    let parts = cuts.len() / 5 + 1;
    let mut out = vec![TokenCounts::default(); parts];
    let classes = [
        counts.input,
        counts.cached_input,
        counts.cache_write,
        counts.output,
        counts.reasoning,
    ];
    for (class, total) in classes.into_iter().enumerate() {
        let mut left = total;
        for (part, slot) in out.iter_mut().enumerate() {
            let share = if part + 1 == parts {
                left
            } else {
                let cut = u64::from(cuts.get(part * 5 + class).copied().unwrap_or(0));
                (total * cut / u64::from(u16::MAX)).min(left)
            };
            left -= share;
            match class {
                0 => slot.input = share,
                1 => slot.cached_input = share,
                2 => slot.cache_write = share,
                3 => slot.output = share,
                _ => slot.reasoning = share,
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Weights of 1 reproduce today's billing exactly: a report by class under a card of ones
    /// answers and charges what a plain report of the same tokens does without a card.
    #[test]
    fn weights_of_one_give_todays_charges(calls in proptest::collection::vec((counts(), 0usize..3), 1..20)) {
        let ones = RateCard::new(ClassWeights::default())
            .with_model("gpt-4o*", ClassWeights::uniform(Weight::ONE))
            .expect("a card");
        let with_card = Harness::with_plan(small_plan().rate_card(ones).build().expect("a plan"));
        let without = Harness::with_plan(small_plan().build().expect("a plan"));
        let (a, b) = (user("classes"), user("plain"));
        runtime().block_on(async {
            for (counts, model) in &calls {
                let Some(tokens) = counts.total().filter(|t| *t > 0) else { continue };
                let classed = UsageReport::with_counts(a.as_str(), *counts, "chat").model(MODELS[*model]);
                let one = with_card.service.process_token_usage(classed).await.expect("recorded");
                let plain = UsageReport::new(b.as_str(), tokens, "chat");
                let other = without.service.process_token_usage(plain).await.expect("recorded");
                assert_eq!(one.billable_tokens, tokens);
                assert_eq!(
                    (one.total_tokens, &one.current_tier, one.tier_charges.len(), one.billable_tokens),
                    (other.total_tokens, &other.current_tier, other.tier_charges.len(), other.billable_tokens)
                );
            }
            assert_eq!(bill(&with_card, &a).await, bill(&without, &b).await);
        });
    }

    /// Split invariance for billable totals: splitting each call's classes over several events
    /// (and shuffling them) ends the period at the same exact billable total, the same rounded
    /// total and the same charges as recording each call whole; and that total is the exact
    /// weighted sum rounded up once.
    #[test]
    fn billable_totals_do_not_depend_on_the_split(
        card in card(),
        calls in proptest::collection::vec((counts(), 0usize..3, proptest::collection::vec(any::<u16>(), 0..15)), 1..8),
        seed in any::<u64>(),
    ) {
        let plan = small_plan().rate_card(card.clone()).build().expect("a plan");
        let whole = Harness::with_plan(plan.clone());
        let split_up = Harness::with_plan(plan.clone());
        let (a, b) = (user("whole"), user("split"));
        let mut exact = 0u128;
        let mut pieces = Vec::new();
        for (counts, model, cuts) in &calls {
            let model = ModelName::new(MODELS[*model]).expect("a model");
            exact += card.billable(Some(&model), counts).micros();
            pieces.extend(split(counts, cuts).into_iter().map(|c| (c, model.clone())));
        }
        // A deterministic shuffle from the seed.
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        let mut state = seed | 1;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bound = u64::try_from(i + 1).expect("small");
            order.swap(i, usize::try_from(state % bound).expect("below i + 1"));
        }
        runtime().block_on(async {
            for (counts, model, _) in &calls {
                if counts.total() == Some(0) { continue }
                let report = UsageReport::with_counts(a.as_str(), *counts, "chat").model(MODELS[*model]);
                whole.service.process_token_usage(report).await.expect("recorded");
            }
            let mut added = 0u64;
            for i in order {
                let (counts, model) = &pieces[i];
                if counts.total() == Some(0) { continue }
                let report = UsageReport::with_counts(b.as_str(), *counts, "chat").model(model.as_str());
                added += split_up.service.process_token_usage(report).await.expect("recorded").billable_tokens;
            }
            let summary = |h: &Harness, u: &UserId| {
                let store = h.store.clone();
                let u = u.clone();
                async move { store.period_summary(&u, november()).await.expect("summary").expect("a period") }
            };
            let (one, other) = (summary(&whole, &a).await, summary(&split_up, &b).await);
            assert_eq!(one.billable_total(), other.billable_total());
            assert_eq!(one.billable_total().exact(), BillableTokens::from_micros(exact));
            assert_eq!(u128::from(one.total_tokens), exact.div_ceil(1_000_000));
            // The events' answers add up to the period's total.
            assert_eq!(added, other.total_tokens);
            assert_eq!(bill(&whole, &a).await, bill(&split_up, &b).await);
            split_up.assert_period_consistent(&b, november(), &plan).await;
        });
    }

    /// A changed rate card applies from the period it names: usage of the period before is
    /// rated by the old card whenever it is reported (late usage included), and usage of the
    /// new period by the new one.
    #[test]
    fn a_rate_card_change_takes_effect_only_at_the_next_period(
        before in weights(),
        after in weights(),
        calls in proptest::collection::vec((counts(), 0i64..40, any::<bool>()), 1..12),
    ) {
        let december = "2026-12".parse().expect("a period");
        let plan = small_plan()
            .rate_card(RateCard::new(before))
            .rate_card_from(december, Some(RateCard::new(after)))
            .build()
            .expect("a plan");
        let h = Harness::with_plan(plan);
        let u = user("change");
        // Within the grace of November's end (São Paulo), usage may still name November.
        let end_of_november = Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).single().expect("an instant");
        runtime().block_on(async {
            let mut exact = std::collections::HashMap::new();
            for (counts, hours, late) in calls {
                if counts.total() == Some(0) { continue }
                let now = end_of_november - Duration::hours(20) + Duration::hours(hours);
                h.clock.set(now);
                let mut report = UsageReport::with_counts(u.as_str(), counts, "chat");
                // Usage of November reported after December began: rated by November's card.
                if late && now >= end_of_november {
                    report = report.occurred_at(end_of_november - Duration::hours(1));
                }
                let outcome = h.service.process_token_usage(report).await.expect("recorded");
                let weights = if outcome.period == november() { &before } else { &after };
                *exact.entry(outcome.period).or_insert(0u128) += weights.billable(&counts).micros();
            }
            for (period, micros) in exact {
                let summary = h.store.period_summary(&u, period).await.expect("summary").expect("a period");
                assert_eq!(summary.billable_total().exact().micros(), micros, "{period} rated by its own card");
            }
        });
    }
}

/// The original product's cases, with a rate card on the plan: a plain report's tokens weigh 1,
/// so 1M tokens start no block and 10M one `8M-16M` block, as they always did.
#[tokio::test]
async fn plain_reports_bill_as_the_original_product_under_any_card() {
    let card = RateCard::new(ClassWeights::uniform("2.5".parse().expect("a weight")));
    let h = Harness::with_plan(Plan::builder().rate_card(card).build().expect("a plan"));
    let one = h
        .service
        .process_token_usage(UsageReport::new("small", 1_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(
        (one.total_tokens, one.tier_charges.len(), one.current_tier.as_str()),
        (1_000_000, 0, "0-8M")
    );
    let ten = h
        .service
        .process_token_usage(UsageReport::new("large", 10_000_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(ten.tier_charges.len(), 1);
    assert_eq!(ten.tier_charges[0].billing_tier.as_str(), "8M-16M");
    assert_eq!(ten.billable_tokens, 10_000_000);
}

/// An Anthropic call with cache reads, from its usage object, under a card that prices cache
/// reads at a tenth: the billable tokens are the weighted sum, and the summary by model says so.
#[tokio::test]
async fn an_anthropic_call_with_cache_reads_bills_its_weighted_tokens() {
    let card: RateCard = serde_json::from_value(serde_json::json!({
        "models": { "claude-*": { "cached_input": "0.1", "cache_write": "1.25", "output": 5 } }
    }))
    .expect("a card");
    let h = Harness::with_plan(Plan::builder().rate_card(card).build().expect("a plan"));
    let usage: token_billing::ProviderUsage = serde_json::from_value(serde_json::json!({
        "provider": "anthropic",
        "usage": { "input_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 120000, "output_tokens": 801 }
    }))
    .expect("a usage object");
    let report = UsageReport::from_provider_usage("ana", &usage, "chat")
        .expect("consistent")
        .model("claude-sonnet-4-5")
        .event_id("msg_01");
    let outcome = h.service.process_token_usage(report.clone()).await.expect("recorded");
    // 3 + 12,000 + 4,005
    assert_eq!((outcome.billable_tokens, outcome.total_tokens), (16_008, 16_008));
    let again = h.service.process_token_usage(report).await.expect("replayed");
    assert!(again.replayed);
    assert_eq!(again.billable_tokens, 16_008);
    let rows = h.service.usage_by_model(&user("ana"), None).await.expect("by model");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].counts.cached_input, 120_000);
    assert_eq!(rows[0].billable.to_string(), "16008");
}

/// A report whose `tokens_used` contradicts its classes, or whose classes add up to nothing,
/// is refused with a typed error and records nothing.
#[tokio::test]
async fn inconsistent_class_reports_are_refused() {
    let h = Harness::new();
    let counts = TokenCounts {
        input: 10,
        output: 5,
        ..TokenCounts::default()
    };
    let mut report = UsageReport::with_counts("bob", counts, "chat");
    report.tokens_used = 14;
    let error = h.service.process_token_usage(report).await.unwrap_err();
    assert!(
        matches!(
            error,
            token_billing::BillingError::InvalidUsage(token_billing::UsageError::TokensMismatch {
                tokens_used: 14,
                classes: 15
            })
        ),
        "{error}"
    );
    let empty = UsageReport::with_counts("bob", TokenCounts::default(), "chat");
    assert!(matches!(
        h.service.process_token_usage(empty).await,
        Err(token_billing::BillingError::InvalidUsage(
            token_billing::UsageError::ZeroTokens
        ))
    ));
    let bad_model = UsageReport::with_counts("bob", counts, "chat").model("has space");
    assert!(matches!(
        h.service.process_token_usage(bad_model).await,
        Err(token_billing::BillingError::InvalidUsage(
            token_billing::UsageError::InvalidId(_)
        ))
    ));
    assert!(
        h.store
            .period_summary(&user("bob"), november())
            .await
            .expect("summary")
            .is_none()
    );
}

/// Holds are in billable tokens: a call reserved by its billable estimate and settled from its
/// usage object overshoots by what it bills beyond the hold, not by its raw tokens.
#[tokio::test]
async fn a_hold_is_settled_in_billable_tokens() {
    let card: RateCard = serde_json::from_value(serde_json::json!({
        "models": { "claude-*": { "cached_input": "0.1", "output": 5 } }
    }))
    .expect("a card");
    let h = Harness::with_plan(Plan::builder().rate_card(card).build().expect("a plan"));
    let hold = h
        .service
        .reserve(token_billing::Reservation::new("eva", 5_000).hold_id("call-1"))
        .await
        .expect("granted");
    assert_eq!(hold.granted_tokens, 5_000);
    // 40,000 tokens, of which 38,000 cache reads: 1,000 + 3,800 + 1,000 × 5 = 9,800 billable.
    let counts = TokenCounts {
        input: 1_000,
        cached_input: 38_000,
        output: 1_000,
        ..TokenCounts::default()
    };
    let report = UsageReport::with_counts("eva", counts, "chat").model("claude-sonnet-4-5");
    let settled = h.service.settle_hold("call-1", report).await.expect("settled");
    assert_eq!(settled.outcome.billable_tokens, 9_800);
    assert_eq!((settled.held_tokens, settled.overshoot_tokens), (Some(5_000), 4_800));
}

/// A batch holds an enforced event together with the unenforced events before it, summed
/// exactly: 200 events of a tenth of a token are 20 tokens, not 200, so an enforced event that
/// fits the cap with them is accepted, and one that does not is refused.
#[tokio::test]
async fn a_batch_holds_fractions_summed_exactly() {
    let card = RateCard::new(ClassWeights::uniform("0.1".parse().expect("a weight")));
    let h = Harness::with_plan(Plan::builder().rate_card(card).build().expect("a plan"));
    let fay = user("fay");
    h.service
        .set_limits(&fay, Some(token_billing::Limits::none().with_token_cap(100)))
        .await
        .expect("limits");
    let tenth = TokenCounts {
        input: 1,
        ..TokenCounts::default()
    };
    let batch = |last_input: u64, tag: &str| {
        let mut reports: Vec<UsageReport> = (0..200)
            .map(|i| UsageReport::with_counts("fay", tenth, "chat").event_id(format!("{tag}-{i}")))
            .collect();
        let last = TokenCounts {
            input: last_input,
            ..TokenCounts::default()
        };
        reports.push(
            UsageReport::with_counts("fay", last, "chat")
                .event_id(format!("{tag}-last"))
                .enforce_limits(),
        );
        reports
    };
    // 20 + 80 = 100 billable tokens: exactly the cap.
    let outcomes = h
        .service
        .process_token_usage_batch(batch(800, "a"))
        .await
        .expect("recorded");
    let last = outcomes.last().expect("answered").as_ref().expect("within the cap");
    assert_eq!(last.total_tokens, 100);
    // Now at the cap: the next enforced event is refused, the unenforced ones recorded.
    let outcomes = h
        .service
        .process_token_usage_batch(batch(10, "b"))
        .await
        .expect("recorded");
    assert!(matches!(
        outcomes.last().expect("answered"),
        Err(token_billing::BillingError::LimitExceeded { .. })
    ));
    assert!(outcomes[..200].iter().all(Result::is_ok));
}

/// A call's overshoot is its own billable tokens against its hold, rounded up, whatever the
/// rounding earlier events left in the period: 100.4 billable tokens against a hold of 100 is
/// one token over, and the outcome says the call's exact billable tokens.
#[tokio::test]
async fn an_overshoot_does_not_depend_on_earlier_rounding() {
    let card = RateCard::new(ClassWeights::uniform("0.2".parse().expect("a weight")));
    let h = Harness::with_plan(Plan::builder().rate_card(card).build().expect("a plan"));
    let counts = |input: u64| TokenCounts {
        input,
        ..TokenCounts::default()
    };
    for (user, earlier) in [("gus", None), ("hal", Some(3))] {
        // 0.6 billable tokens before: the period rounds them up to 1, leaving 0.4 of credit.
        if let Some(input) = earlier {
            let report = UsageReport::with_counts(user, counts(input), "chat");
            h.service.process_token_usage(report).await.expect("recorded");
        }
        h.service
            .reserve(token_billing::Reservation::new(user, 100).hold_id("call"))
            .await
            .expect("granted");
        // 502 tokens at 0.2: 100.4 billable.
        let report = UsageReport::with_counts(user, counts(502), "chat");
        let settled = h.service.settle_hold("call", report).await.expect("settled");
        assert_eq!(settled.outcome.billable_exact.to_string(), "100.4", "{user}");
        assert_eq!(settled.overshoot_tokens, 1, "{user}");
    }
}
