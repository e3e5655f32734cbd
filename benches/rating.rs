#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! The pure domain: rating one event (the tier of the new total and the blocks it crossed).
//!
//! `cargo bench --bench rating`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use token_billing::{FeeCollection, PeriodKey, Plan, UserId, charges_for_growth};

fn rating(c: &mut Criterion) {
    let plan = Plan::default();
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

    c.bench_function("tier_label", |b| {
        let tier = plan.tier_of(10_000_000).expect("in range");
        b.iter(|| black_box(black_box(tier).label()))
    });

    let user = UserId::new("bench-user").expect("valid");
    let period = PeriodKey::new(2026, 11).expect("valid");
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
