//! Property tests of the pure domain and of the service's charging rules.

mod common;

use std::collections::BTreeSet;

use common::{Harness, november, user};
use proptest::prelude::*;
use rust_decimal::Decimal;
use token_billing::{
    AlertPolicy, Ceiling, ChargeKind, ChargeStatus, Currency, Limits, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, Money, Plan,
    TierLabel, UsageReport,
};

fn currency() -> impl Strategy<Value = Currency> {
    proptest::sample::select(Currency::ALL.to_vec())
}

fn plan() -> impl Strategy<Value = Plan> {
    (0u64..=50_000_000, 1u64..=20_000_000, 0i64..=1_000_000, 0i64..=1_000_000).prop_map(
        |(included, block, fee, price)| {
            Plan::builder()
                .included_tokens(included)
                .block_size(block)
                .fixed_fee(Money::from_minor(fee, Currency::BRL))
                .block_price(Money::from_minor(price, Currency::BRL))
                .build()
                .expect("a valid plan")
        },
    )
}

/// Reads a compact label part (`1.5M`, `750K`, `500`) back into tokens, exactly.
fn parse_compact(text: &str) -> u64 {
    let (number, unit) = match text.strip_suffix('M') {
        Some(n) => (n, 1_000_000u64),
        None => match text.strip_suffix('K') {
            Some(n) => (n, 1_000),
            None => (text, 1),
        },
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    assert!(!fraction.ends_with('0'), "no trailing zeros in {text}");
    let digits = unit.ilog10();
    let places = u32::try_from(fraction.len()).expect("short");
    assert!(places <= digits, "{text}");
    let fraction_value = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u64>().expect("digits") * 10u64.pow(digits - places)
    };
    whole.parse::<u64>().expect("digits") * unit + fraction_value
}

proptest! {
    #[test]
    fn money_from_minor_units_round_trips(minor in any::<i64>(), currency in currency()) {
        let money = Money::from_minor(minor, currency);
        prop_assert_eq!(money.minor_units(), minor);
        prop_assert_eq!(Money::new(money.amount(), currency), Ok(money));
        prop_assert_eq!(money.amount().scale(), currency.exponent());
    }

    #[test]
    fn money_from_decimals_is_exact_or_refused(mantissa in -10i64.pow(15)..10i64.pow(15), scale in 0u32..=6, currency in currency()) {
        let amount = Decimal::new(mantissa, scale);
        match Money::new(amount, currency) {
            Ok(money) => {
                prop_assert!(amount.normalize().scale() <= currency.exponent());
                prop_assert_eq!(money.amount(), amount, "the value is kept exactly");
                prop_assert_eq!(Money::from_minor(money.minor_units(), currency), money);
            }
            Err(_) => prop_assert!(amount.normalize().scale() > currency.exponent(), "refused only for excess precision"),
        }
    }

    #[test]
    fn tiers_contain_their_totals_and_labels_are_exact(plan in plan(), total in 0u64..=2_000_000_000) {
        let tier = plan.tier_of(total).expect("in range");
        prop_assert!(tier.contains(total));
        prop_assert_eq!(tier.index(), plan.blocks_owed(total));
        prop_assert_eq!(tier, plan.tier_at(tier.index()));
        let label = tier.label();
        prop_assert_eq!(&label, &plan.tier_of(total).expect("in range").label(), "stable");
        let (lower, upper) = label.split_once('-').expect("a range label");
        prop_assert_eq!(parse_compact(lower), tier.lower());
        prop_assert_eq!(parse_compact(upper), tier.upper());
    }

    #[test]
    fn tiers_are_ordered_and_adjacent(plan in plan(), index in 0u64..10_000) {
        let here = plan.tier_at(index);
        let next = plan.tier_at(index + 1);
        prop_assert_eq!(here.upper(), next.lower());
        prop_assert!(here.lower() <= here.upper() && next.lower() < next.upper());
        prop_assert_ne!(here.label(), next.label());
        prop_assert_eq!(next.upper() - next.lower(), plan.block_size());
    }

    #[test]
    fn blocks_owed_is_the_package_formula(plan in plan(), total in 0u64..=MAX_TOKENS) {
        let owed = plan.blocks_owed(total);
        let over = u128::from(total.saturating_sub(plan.included_tokens()));
        let block = u128::from(plan.block_size());
        prop_assert_eq!(u128::from(owed), over.div_ceil(block));
    }

    #[test]
    fn crossing_is_additive(plan in plan(), mut totals in proptest::collection::vec(0u64..=400_000_000, 3)) {
        totals.sort_unstable();
        let (a, b, c) = (totals[0], totals[1], totals[2]);
        let whole: Vec<u64> = plan.blocks_crossed(a, c).expect("ok").into_iter().collect();
        let mut parts: Vec<u64> = plan.blocks_crossed(a, b).expect("ok").into_iter().collect();
        parts.extend(plan.blocks_crossed(b, c).expect("ok"));
        prop_assert_eq!(whole, parts);
    }
}

/// Splits `total` at the cut points into positive parts.
fn split(total: u64, mut cuts: Vec<u64>) -> Vec<u64> {
    cuts.retain(|c| *c > 0 && *c < total);
    cuts.sort_unstable();
    cuts.dedup();
    let mut parts = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain(std::iter::once(total)) {
        parts.push(cut - start);
        start = cut;
    }
    parts
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// What a period cost, as a set of (kind, block, tier label, amount, status).
type Bill = BTreeSet<(ChargeKind, u64, TierLabel, i64, ChargeStatus)>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Invariant 4: what a period costs depends only on its total, not on how usage was split
    /// into events, nor their order, nor how two users' events interleave.
    #[test]
    fn split_order_and_interleaving_do_not_change_the_bill(
        total in 1u64..=120_000,
        cuts_a in proptest::collection::vec(0u64..120_000, 0..25),
        cuts_b in proptest::collection::vec(0u64..120_000, 0..25),
        interleave in proptest::collection::vec(any::<bool>(), 60),
        shuffle_seed in any::<u64>(),
    ) {
        let plan = Plan::builder().included_tokens(10_000).block_size(7_000).build().expect("valid");
        runtime().block_on(async {
            let bill_of = |h: &Harness, name: &str| {
                let store = h.store.clone();
                let u = user(name);
                async move {
                    store.charges(&u, november()).await.expect("charges").into_iter()
                        .map(|c| (c.kind, c.block, c.billing_tier, c.amount.minor_units(), c.status))
                        .collect::<Bill>()
                }
            };
            // One event of the whole total.
            let reference = Harness::with_plan(plan.clone());
            reference.service.process_token_usage(UsageReport::new("solo", total, "chat")).await.expect("recorded");
            let expected = bill_of(&reference, "solo").await;

            // The same total for two users, split differently, shuffled and interleaved.
            let h = Harness::with_plan(plan.clone());
            let mut a = split(total, cuts_a);
            let mut b = split(total, cuts_b);
            let mut seed = shuffle_seed;
            for parts in [&mut a, &mut b] {
                for i in (1..parts.len()).rev() {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    parts.swap(i, (seed >> 33) as usize % (i + 1));
                }
            }
            let (mut ia, mut ib) = (a.into_iter(), b.into_iter());
            let mut turn = interleave.into_iter().cycle();
            loop {
                let (name, next) = if turn.next().unwrap_or(true) { ("alice", ia.next()) } else { ("bob", ib.next()) };
                let next = next.map(|t| (name, t)).or_else(|| ia.next().map(|t| ("alice", t))).or_else(|| ib.next().map(|t| ("bob", t)));
                let Some((name, tokens)) = next else { break };
                h.service.process_token_usage(UsageReport::new(name, tokens, "chat")).await.expect("recorded");
            }
            for name in ["alice", "bob"] {
                prop_assert_eq!(&bill_of(&h, name).await, &expected, "{}", name);
                h.assert_period_consistent(&user(name), november(), &plan).await;
            }
            let blocks = expected.iter().filter(|c| c.0 == ChargeKind::Block).count() as u64;
            prop_assert_eq!(blocks, plan.blocks_owed(total), "each block exactly once up to blocks_owed");
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Invariant 4 again, through batches: the same events sent one at a time or in batches of
    /// any sizes (with some batches sent twice) give the same bill, each block once.
    #[test]
    fn batching_does_not_change_the_bill(
        total in 1u64..=120_000,
        cuts in proptest::collection::vec(0u64..120_000, 0..30),
        sizes in proptest::collection::vec(1usize..8, 1..30),
        resend in proptest::collection::vec(any::<bool>(), 30),
    ) {
        let plan = Plan::builder().included_tokens(10_000).block_size(7_000).build().expect("valid");
        runtime().block_on(async {
            let parts = split(total, cuts);
            let reports: Vec<UsageReport> = parts
                .iter()
                .enumerate()
                .map(|(i, tokens)| UsageReport::new("batcher", *tokens, "chat").event_id(format!("e{i}")))
                .collect();
            let one_by_one = Harness::with_plan(plan.clone());
            for report in reports.clone() {
                one_by_one.service.process_token_usage(report).await.expect("recorded");
            }
            let batched = Harness::with_plan(plan.clone());
            let mut rest = reports.as_slice();
            let mut size = sizes.iter().cycle();
            let mut again = resend.iter().cycle();
            while !rest.is_empty() {
                let n = (*size.next().unwrap_or(&1)).min(rest.len());
                let (batch, tail) = rest.split_at(n);
                let outcomes = batched.service.process_token_usage_batch(batch.to_vec()).await.expect("a batch");
                prop_assert!(outcomes.iter().all(Result::is_ok));
                if *again.next().unwrap_or(&false) {
                    let replays = batched.service.process_token_usage_batch(batch.to_vec()).await.expect("a batch");
                    prop_assert!(replays.iter().all(|o| o.as_ref().is_ok_and(|o| o.replayed)));
                }
                rest = tail;
            }
            let bill = |h: &Harness| {
                let store = h.store.clone();
                async move {
                    store.charges(&user("batcher"), november()).await.expect("charges").into_iter()
                        .map(|c| (c.kind, c.block, c.billing_tier, c.amount.minor_units(), c.status))
                        .collect::<Bill>()
                }
            };
            prop_assert_eq!(bill(&batched).await, bill(&one_by_one).await);
            batched.assert_period_consistent(&user("batcher"), november(), &plan).await;
            Ok(())
        })?;
    }
}

/// An answer with what two services cannot share left out: the consumption id, drawn at
/// random for each event.
fn comparable(answer: &Result<token_billing::UsageOutcome, token_billing::BillingError>) -> Result<String, String> {
    match answer {
        Ok(outcome) => {
            let charge =
                |c: &token_billing::TierCharge| format!("{} {} {:?}", c.billing_tier, c.amount_charged, c.status);
            Ok(format!(
                "{} {} {} replayed={} fee={:?} blocks={:?}",
                outcome.period,
                outcome.total_tokens,
                outcome.current_tier,
                outcome.replayed,
                outcome.fixed_fee_charge.as_ref().map(charge),
                outcome.tier_charges.iter().map(charge).collect::<Vec<_>>()
            ))
        }
        Err(error) => Err(error.to_string()),
    }
}

/// One report of a batch: a user, tokens, an event id from a small set (so that ids repeat,
/// with the same usage or another), and perhaps an instant: in November, or in a period whose
/// grace window has passed.
fn batch_report() -> impl Strategy<Value = UsageReport> {
    (
        0usize..2,
        proptest::sample::select(vec![1_000u64, 3_000_000, 8_000_000, 9_000_000]),
        proptest::option::of(0usize..4),
        0usize..4,
    )
        .prop_map(|(who, tokens, event, when)| {
            let mut report = UsageReport::new(["ana", "bob"][who], tokens, "chat");
            if let Some(event) = event {
                report = report.event_id(format!("evt-{event}"));
            }
            let day =
                |month, day| chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, month, day, 12, 0, 0).unwrap();
            match when {
                1 => report.occurred_at(day(11, 2)),
                2 => report.occurred_at(day(9, 1)),
                _ => report,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// A batch answers each event as the same events sent one by one would be answered: the
    /// same totals, tiers, charges and statuses, the same replays, the same refusals (a
    /// conflicting re-send of an event earlier in the batch is a conflict, not too late).
    #[test]
    fn a_batch_answers_each_event_as_single_calls_would(
        reports in proptest::collection::vec(batch_report(), 1..12),
    ) {
        runtime().block_on(async {
            let one_by_one = Harness::new();
            let mut expected = Vec::new();
            for report in reports.clone() {
                expected.push(comparable(&one_by_one.service.process_token_usage(report).await));
            }
            let batched = Harness::new();
            let answers = batched.service.process_token_usage_batch(reports).await.expect("a batch");
            let answers: Vec<_> = answers.iter().map(comparable).collect();
            prop_assert_eq!(answers, expected);
            for name in ["ana", "bob"] {
                batched.assert_period_consistent(&user(name), november(), &Plan::default()).await;
            }
            Ok(())
        })?;
    }
}

/// What a period of `total` tokens is charged under `plan`, in minor units, computed wide.
fn charged(plan: &Plan, total: u64) -> i128 {
    if total == 0 {
        return 0;
    }
    i128::from(plan.fixed_fee().minor_units())
        + i128::from(plan.blocks_owed(total)) * i128::from(plan.block_price().minor_units())
}

proptest! {
    /// A spend cap turned into tokens: the most a period may use is charged within the cap, and
    /// one token more is not.
    #[test]
    fn the_tokens_a_spend_cap_allows_are_the_most_it_pays_for(
        plan in plan(),
        cap in -1_000i64..=50_000_000,
    ) {
        let tokens = plan.tokens_within(Money::from_minor(cap, Currency::BRL)).expect("same currency");
        prop_assert!(charged(&plan, tokens) <= i128::from(cap.max(0)), "{} tokens", tokens);
        if tokens < MAX_TOKENS {
            prop_assert!(charged(&plan, tokens + 1) > i128::from(cap), "{} tokens", tokens);
        }
    }
}

proptest! {
    /// A period's headroom under its limits: the tokens allowed are exactly those that keep the
    /// total within every limit that applies (the spend cap's charges, the token cap, and with
    /// the gate closed no new block), and the limit named is one that allows no more.
    #[test]
    fn headroom_allows_exactly_what_every_limit_allows(
        plan in plan(),
        used in 0u64..=200_000_000,
        spend_cap in proptest::option::of(-1_000i64..=50_000_000),
        token_cap in proptest::option::of(0u64..=200_000_000),
        payment_gate in any::<bool>(),
        overdue in any::<bool>(),
    ) {
        let mut limits = Limits::none();
        limits.spend_cap = spend_cap.map(|cap| Money::from_minor(cap, Currency::BRL));
        limits.token_cap = token_cap;
        limits.payment_gate = payment_gate;
        let room = limits.ceiling(&plan).expect("same currency").headroom(&plan, used, overdue);
        let allowed = |total: u64| {
            spend_cap.is_none_or(|cap| total <= used || charged(&plan, total) <= i128::from(cap))
                && token_cap.is_none_or(|cap| total <= cap)
                && !(payment_gate && overdue && plan.blocks_owed(total) > plan.blocks_owed(used))
        };
        let no_limit = limits.is_none() || (payment_gate && !overdue && spend_cap.is_none() && token_cap.is_none());
        if room.limited_by.is_none() {
            prop_assert!(no_limit);
            prop_assert_eq!(room.remaining, MAX_TOKENS - used);
        } else {
            let last = used + room.remaining;
            prop_assert!(room.remaining == 0 || allowed(last), "{} tokens more are allowed", room.remaining);
            prop_assert!(last >= MAX_TOKENS || !allowed(last + 1), "one more is refused");
            prop_assert_eq!(room.refuses(room.remaining + 1), room.limited_by);
            prop_assert_eq!(room.refuses(room.remaining), None);
        }
    }
}

proptest! {
    /// Alerts under any split of usage: the alerts crossed from `a` to `c` are those crossed from
    /// `a` to `b` and from `b` to `c`, none twice, so events never double or lose an alert.
    #[test]
    fn alerts_crossed_split_as_the_usage_splits(
        plan in plan(),
        cap in proptest::option::of(0u64..=100_000_000),
        percents in proptest::collection::vec(0u8..=120, 0..4),
        a in 0u64..=100_000_000,
        d1 in 0u64..=50_000_000,
        d2 in 0u64..=50_000_000,
    ) {
        let policy = AlertPolicy {
            allowance_percent: percents.clone(),
            blocks: true,
            cap_percent: percents,
            cap_reached: true,
            payment_gate: false,
        };
        let ceiling = Ceiling { token_cap: cap, ..Ceiling::default() };
        let (b, c) = (a + d1, a + d1 + d2);
        // An event starting more blocks than that is refused before its alerts.
        prop_assume!(plan.blocks_owed(c) - plan.blocks_owed(a) <= MAX_BLOCKS_PER_EVENT);
        let mut whole = policy.crossed(&plan, &ceiling, a, c);
        let mut parts = policy.crossed(&plan, &ceiling, a, b);
        parts.extend(policy.crossed(&plan, &ceiling, b, c));
        let mut distinct = parts.clone();
        distinct.sort();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), parts.len(), "no alert crossed twice");
        whole.sort();
        parts.sort();
        prop_assert_eq!(whole, parts);
    }
}
