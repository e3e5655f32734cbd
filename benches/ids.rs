#![allow(missing_docs, dead_code)] // criterion_group! generates undocumented functions
//! Drawing one random id (a consumption's, a charge's): the crate's own generator, which asks
//! the operating system once per thread and learns of forks from a handler, against the `uuid`
//! crate's own draws, which ask it for every id (`getrandom`) or, with `fast-rng`, use `rand`'s
//! thread generator, which is not seeded again in a forked child.
//!
//! `cargo bench --bench ids`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

/// The generator the crate uses, compiled here as it is (its unit tests, compiled along in test
/// mode without a test harness, are not run here).
#[allow(unused_imports)]
#[path = "../src/random.rs"]
mod random;

fn ids(c: &mut Criterion) {
    c.bench_function("ids/crate_generator_v4", |b| b.iter(|| black_box(random::uuid_v4())));
    // `uuid` with `fast-rng` (enabled for the benches only).
    c.bench_function("ids/uuid_new_v4_fast_rng", |b| {
        b.iter(|| black_box(uuid::Uuid::new_v4()))
    });
    c.bench_function("ids/uuid_now_v7_fast_rng", |b| {
        b.iter(|| black_box(uuid::Uuid::now_v7()))
    });
    // `uuid` without `fast-rng`: a system call per id.
    c.bench_function("ids/getrandom_per_id", |b| {
        b.iter(|| {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes).expect("the system's randomness");
            black_box(uuid::Builder::from_random_bytes(bytes).into_uuid())
        })
    });
}

criterion_group!(benches, ids);
criterion_main!(benches);
