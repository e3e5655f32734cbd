//! Checks of the contract's clause on billable tokens (**Recording: billable tokens**): the
//! period total moves by each event's exact billable tokens, rounded up to a whole token only as
//! a total, one event at a time, in a batch or concurrently; an event's model and token classes
//! read back; and `usage_by_model` counts every event once.

use futures_util::future::join_all;

use super::{fresh_user, period, record, usage_event};
use crate::domain::{
    BillableTokens, BillableTotal, FeeCollection, ModelName, Plan, TokenCounts, TokenDetail, UsageRecord, UserId,
};
use crate::store::{ModelUsage, RecordUsage, UsageStore};

fn whole(tokens: u128) -> u64 {
    u64::try_from(tokens).expect("a total")
}

/// A plan whose blocks are a handful of tokens, so that fractions decide them.
fn small_blocks() -> Plan {
    Plan::builder()
        .included_tokens(2)
        .block_size(1)
        .build()
        .expect("a valid plan")
}

/// An event of `tokens` tokens whose billable amount is `billable_micros` millionths.
fn weighed(user: &UserId, tokens: u64, billable_micros: u128, model: Option<&str>) -> UsageRecord {
    let mut usage = usage_event(user, tokens, "chat", period());
    usage.detail = Some(Box::new(TokenDetail {
        model: model.map(|m| ModelName::new(m).expect("a valid model")),
        counts: Some(TokenCounts {
            input: tokens - 1,
            output: 1,
            ..TokenCounts::default()
        }),
        billable: BillableTokens::from_micros(billable_micros),
    }));
    usage
}

/// The billable amounts the checks record, in millionths: fractions below and above the
/// credit left, whole tokens, and amounts that land exactly on a whole token.
const AMOUNTS: [u128; 9] = [
    400_000, 400_000, 400_000, 1_500_000, 2_000_000, 300_000, 700_000, 999_999, 1,
];

/// **Recording: billable tokens**: each event moves the period total from the exact sum before
/// it, rounded up, to the exact sum after it, rounded up; the summary keeps the credit; charges
/// are the blocks the rounded total owes; a replay answers the same totals; and a batch of the
/// same events does exactly the same.
pub async fn billable_totals_are_exact_sums_rounded_up(store: &dyn UsageStore) {
    let plan = small_blocks();
    let one_by_one = fresh_user("billable");
    let batched = fresh_user("billable-batch");
    let mut exact = 0u128;
    let mut expected = Vec::new();
    for micros in AMOUNTS {
        let before = whole(exact.div_ceil(1_000_000));
        exact += micros;
        expected.push((before, whole(exact.div_ceil(1_000_000))));
    }
    let mut events = Vec::new();
    for (micros, (before, after)) in AMOUNTS.into_iter().zip(&expected) {
        let usage = weighed(&one_by_one, 3, micros, Some("gpt-4o"));
        events.push(usage.clone());
        let recorded = record(store, &plan, usage).await;
        assert_eq!(
            (recorded.total_before, recorded.total_after),
            (*before, *after),
            "an event of {micros} millionths moved the rounded-up total wrongly"
        );
    }
    let summary = store
        .period_summary(&one_by_one, period())
        .await
        .expect("period_summary")
        .expect("a summary");
    let credit = u32::try_from(exact.div_ceil(1_000_000) * 1_000_000 - exact).expect("below a token");
    assert_eq!(
        summary.billable_total(),
        BillableTotal {
            tokens: whole(exact.div_ceil(1_000_000)),
            credit_micros: credit
        },
        "the summary does not keep the exact total"
    );
    let blocks = store
        .charges(&one_by_one, period())
        .await
        .expect("charges")
        .iter()
        .filter(|c| c.kind == crate::ChargeKind::Block)
        .count() as u64;
    assert_eq!(
        blocks,
        plan.blocks_owed(summary.total_tokens),
        "blocks of the rounded-up total"
    );

    // Read back, and replayed with the totals the event really moved.
    let read = store.consumptions(&one_by_one, period()).await.expect("consumptions");
    for event in &events {
        let stored = read
            .iter()
            .find(|r| r.event_id == event.event_id)
            .expect("the event reads back");
        assert_eq!(
            stored.detail, event.detail,
            "an event's model, classes and billable tokens read back"
        );
    }
    for (event, (before, after)) in events.iter().zip(&expected) {
        let replay = store
            .recorded_event(&one_by_one, &event.event_id)
            .await
            .expect("recorded_event")
            .expect("recorded");
        assert_eq!(
            (replay.total_before, replay.total_after),
            (*before, *after),
            "a replay's totals"
        );
    }

    // The same events in one batch.
    let requests = AMOUNTS
        .iter()
        .map(|micros| RecordUsage {
            usage: weighed(&batched, 3, *micros, None),
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        })
        .collect();
    let results = store.record_usage_batch(requests).await.expect("record_usage_batch");
    for (result, (before, after)) in results.iter().zip(&expected) {
        let recorded = result.as_ref().expect("recorded");
        assert_eq!(
            (recorded.total_before, recorded.total_after),
            (*before, *after),
            "a batch's totals"
        );
    }
    let batch_summary = store
        .period_summary(&batched, period())
        .await
        .expect("period_summary")
        .expect("a summary");
    assert_eq!(
        batch_summary.billable_total(),
        summary.billable_total(),
        "a batch ends where single calls do"
    );
}

/// **Recording: billable tokens**, concurrently: events with fractions of a token recorded at
/// once still end at the exact sum rounded up, with every block charged once.
pub async fn concurrent_fractions_sum_exactly(store: &dyn UsageStore) {
    let plan = small_blocks();
    let user = fresh_user("fractions");
    let amounts: Vec<u128> = (0..24u128).map(|i| 250_000 + i * 37_501).collect();
    let exact: u128 = amounts.iter().sum();
    join_all(amounts.iter().map(|micros| {
        let usage = weighed(&user, 2, *micros, Some("claude-sonnet-4-5"));
        let plan = &plan;
        async move { record(store, plan, usage).await }
    }))
    .await;
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("period_summary")
        .expect("a summary");
    assert_eq!(
        summary.billable_total().exact().micros(),
        exact,
        "concurrent fractions lost or doubled"
    );
    let mut blocks: Vec<u64> = store
        .charges(&user, period())
        .await
        .expect("charges")
        .iter()
        .filter(|c| c.kind == crate::ChargeKind::Block)
        .map(|c| c.block)
        .collect();
    blocks.sort_unstable();
    assert_eq!(
        blocks,
        (1..=plan.blocks_owed(summary.total_tokens)).collect::<Vec<_>>(),
        "every block once"
    );
}

/// **Recording: billable tokens**: `usage_by_model` counts every event in exactly one row, by
/// model name (no model first), with the classes and exact billable tokens of its events.
pub async fn usage_by_model_counts_every_event_once(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("by-model");
    record(store, &plan, usage_event(&user, 1_000, "chat", period())).await;
    record(store, &plan, weighed(&user, 10, 2_500_000, Some("gpt-4o"))).await;
    record(store, &plan, weighed(&user, 20, 4_000_000, Some("gpt-4o"))).await;
    record(store, &plan, weighed(&user, 5, 500_000, None)).await;
    let mut named_only = usage_event(&user, 7, "chat", period());
    named_only.detail = Some(Box::new(TokenDetail {
        model: Some(ModelName::new("claude-haiku-4-5").expect("a valid model")),
        counts: None,
        billable: BillableTokens::whole(7),
    }));
    record(store, &plan, named_only).await;
    let rows = store.usage_by_model(&user, period()).await.expect("usage_by_model");
    let counts = |input: u64, output: u64| TokenCounts {
        input,
        output,
        ..TokenCounts::default()
    };
    let row = |model: Option<&str>, events, total_tokens, counts, billable: u128| ModelUsage {
        model: model.map(|m| ModelName::new(m).expect("a valid model")),
        events,
        total_tokens,
        counts,
        billable: BillableTokens::from_micros(billable),
    };
    assert_eq!(
        rows,
        vec![
            row(None, 2, 1_005, counts(4, 1), 1_000_500_000),
            row(Some("claude-haiku-4-5"), 1, 7, TokenCounts::default(), 7_000_000),
            row(Some("gpt-4o"), 2, 30, counts(28, 2), 6_500_000),
        ]
    );
    assert_eq!(rows[1].unclassified_tokens(), 7);
    let other = fresh_user("by-model-none");
    assert!(
        store
            .usage_by_model(&other, period())
            .await
            .expect("usage_by_model")
            .is_empty()
    );
}
