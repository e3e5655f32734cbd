#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The pure domain: rating one event (the tier of the new total and the blocks it crossed), and
//! the same with a rate card first weighing the event's token classes by its model.
//!
//! `cargo bench --bench rating`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use token_billing::{
    BillableTotal, ClassWeights, FeeCollection, ModelName, PeriodKey, Plan, RateCard, TokenCounts, UserId,
    charges_for_growth,
};

fn rating(c: &mut Criterion) {
    let plan = Plan::default();
    let period = PeriodKey::new(2026, 11).expect("valid");
    // A stream of (before, after) pairs: most events stay inside a block, one in ~20 crosses.
    let pairs: Vec<(u64, u64)> = (0..1024u64)
        .map(|i| {
            let before = 3_000_000 + i * 400_123;
            (before, before + 400_000 + i % 7)
        })
        .collect();

    c.bench_function("rate_one_event", |b| {
        let mut i = 0;
        b.iter(|| {
            let (before, after) = pairs[i & 1023];
            i += 1;
            let tier = plan.tier_of(black_box(after)).expect("in range");
            let crossed = plan.blocks_crossed(black_box(before), after).expect("in range");
            black_box((tier.index(), crossed.len()))
        })
    });

    // A card as a host prices three providers: prefixes, an exact name, fractional weights.
    let weights = |cached: &str, write: &str, output: &str| ClassWeights {
        cached_input: cached.parse().expect("a weight"),
        cache_write: write.parse().expect("a weight"),
        output: output.parse().expect("a weight"),
        reasoning: output.parse().expect("a weight"),
        ..ClassWeights::default()
    };
    let card = RateCard::new(weights("1", "1", "4"))
        .with_model("gpt-4o*", weights("0.5", "1", "4"))
        .and_then(|c| c.with_model("gpt-4o-mini*", weights("0.5", "1", "4")))
        .and_then(|c| c.with_model("o3*", weights("0.25", "1", "4")))
        .and_then(|c| c.with_model("claude-*", weights("0.1", "1.25", "5")))
        .and_then(|c| c.with_model("claude-haiku-4-5", weights("0.1", "1.25", "5")))
        .and_then(|c| c.with_model("gemini-2.5-pro*", weights("0.25", "1", "8")))
        .expect("valid patterns");
    let carded = Plan::builder().rate_card(card).build().expect("a valid plan");
    let models: Vec<ModelName> = ["gpt-4o-2024-08-06", "claude-sonnet-4-5", "gemini-2.5-pro", "o3-mini"]
        .iter()
        .map(|m| ModelName::new(*m).expect("a model"))
        .collect();
    let events: Vec<(BillableTotal, TokenCounts)> = (0..1024u64)
        .map(|i| {
            let total = BillableTotal {
                tokens: 3_000_000 + i * 400_123,
                credit_micros: (i * 7_919 % 1_000_000) as u32,
            };
            let counts = TokenCounts {
                input: 20_000 + i,
                cached_input: 300_000 + i * 3,
                cache_write: i % 5 * 1_000,
                output: 15_000 + i % 13,
                reasoning: i % 3 * 2_000,
            };
            (total, counts)
        })
        .collect();
    c.bench_function("rate_one_event_with_a_rate_card", |b| {
        let mut i = 0;
        b.iter(|| {
            let (total, counts) = &events[i & 1023];
            let model = &models[i & 3];
            i += 1;
            let card = carded.rate_card(black_box(period)).expect("a card");
            let billable = card.billable(Some(black_box(model)), black_box(counts));
            let after = black_box(*total).plus(billable).expect("in range");
            let tier = carded.tier_of(after.tokens).expect("in range");
            let crossed = carded.blocks_crossed(total.tokens, after.tokens).expect("in range");
            black_box((tier.index(), crossed.len()))
        })
    });

    c.bench_function("tier_label", |b| {
        let tier = plan.tier_of(10_000_000).expect("in range");
        b.iter(|| black_box(black_box(tier).label()))
    });

    let user = UserId::new("bench-user").expect("valid");
    c.bench_function("charges_for_growth_crossing_one_block", |b| {
        b.iter(|| {
            charges_for_growth(
                &plan,
                FeeCollection::Library,
                &user,
                period,
                black_box(7_999_000),
                black_box(8_000_100),
                None,
            )
            .expect("in range")
        })
    });
}

criterion_group!(benches, rating);
criterion_main!(benches);
