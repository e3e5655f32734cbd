//! Checks of the contract's clauses on recording (**Recording: atomic**, **disjoint
//! intervals**, **replays and conflicts**, **overflow**) through `record_usage_batch`: a batch
//! is recorded as `record_usage` would record its events one at a time, in order, each refused
//! on its own without stopping the others.

use uuid::Uuid;

use super::{far_future, fresh_user, period, record, usage_event};
use crate::domain::{ChargeKind, FeeCollection, MAX_TOKENS, Plan};
use crate::store::{AuditEvent, RecordUsage, StoreError, UsageStore};

/// **Recording**, every clause, in a batch: a batch records its events in order, as one at a time
/// would: totals, blocks (each once), re-sends of events recorded before or earlier in the batch,
/// and events refused on their own (a conflict, an overflow) without stopping the others.
pub async fn record_usage_batch_is_record_usage_in_order(store: &dyn UsageStore) {
    let plan = Plan::default();
    let (ana, bea) = (fresh_user("batch-a"), fresh_user("batch-b"));
    let before = usage_event(&ana, 5_000_000, "chat", period());
    record(store, &plan, before.clone()).await;

    let a1 = usage_event(&ana, 4_000_000, "chat", period()); // crosses into block 1
    let b1 = usage_event(&bea, 9_000_000, "embedding", period()); // opens, crosses block 1
    let mut resent_before = before.clone();
    resent_before.consumption_id = Uuid::new_v4();
    let mut resent_a1 = a1.clone();
    resent_a1.consumption_id = Uuid::new_v4();
    let mut conflict = a1.clone();
    conflict.consumption_id = Uuid::new_v4();
    conflict.tokens += 1;
    let overflow = usage_event(&bea, MAX_TOKENS, "chat", period());
    let a2 = usage_event(&ana, 8_000_000, "chat", period()); // 17M: block 2
    let batch = vec![
        a1.clone(),
        b1.clone(),
        resent_before,
        resent_a1,
        conflict,
        overflow,
        a2.clone(),
    ];
    let requests = batch
        .into_iter()
        .map(|usage| RecordUsage {
            usage,
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: Some(far_future()),
            alerting: None,
            account: None,
        })
        .collect();
    let results = store.record_usage_batch(requests).await.expect("the batch");
    assert_eq!(results.len(), 7);
    let ok = |i: usize| results[i].as_ref().unwrap_or_else(|e| panic!("event {i}: {e}"));
    assert_eq!(
        (ok(0).total_before, ok(0).total_after, ok(0).replayed),
        (5_000_000, 9_000_000, false)
    );
    assert_eq!(ok(0).charges.iter().map(|c| c.block).collect::<Vec<_>>(), [1]);
    assert_eq!((ok(1).total_before, ok(1).total_after), (0, 9_000_000));
    assert_eq!(
        ok(1).charges.iter().map(|c| (c.kind, c.block)).collect::<Vec<_>>(),
        [(ChargeKind::FixedFee, 0), (ChargeKind::Block, 1)]
    );
    assert!(ok(2).replayed && ok(2).usage.consumption_id == before.consumption_id);
    assert!(ok(3).replayed && ok(3).usage.consumption_id == a1.consumption_id);
    assert!(matches!(results[4], Err(StoreError::EventConflict { .. })));
    assert!(matches!(results[5], Err(StoreError::TotalOverflow { .. })));
    assert_eq!((ok(6).total_before, ok(6).total_after), (9_000_000, 17_000_000));
    assert_eq!(ok(6).charges.iter().map(|c| c.block).collect::<Vec<_>>(), [2]);

    for (user, total, blocks, events) in [(&ana, 17_000_000, vec![1, 2], 3), (&bea, 9_000_000, vec![1], 1)] {
        let summary = store
            .period_summary(user, period())
            .await
            .expect("summary")
            .expect("a summary");
        assert_eq!((summary.total_tokens, summary.events), (total, events));
        let charges = store.charges(user, period()).await.expect("charges");
        let mut found: Vec<u64> = charges
            .iter()
            .filter(|c| c.kind == ChargeKind::Block)
            .map(|c| c.block)
            .collect();
        found.sort_unstable();
        assert_eq!(found, blocks, "each block once");
        assert_eq!(
            summary.outstanding_count,
            u64::try_from(charges.len()).expect("few"),
            "the summary counts the batch's charges"
        );
        assert_eq!(
            store.consumptions(user, period()).await.expect("consumptions").len(),
            usize::try_from(events).expect("few")
        );
        // Each recorded event once in the audit trail, in order; re-sends and refusals not at all.
        let trail = store.audit_trail(user, Some(period())).await.expect("audit");
        let totals: Vec<u64> = trail
            .iter()
            .filter_map(|e| match e.event {
                AuditEvent::UsageRecorded { total_after, .. } => Some(total_after),
                _ => None,
            })
            .collect();
        let expected: &[u64] = if *user == ana {
            &[5_000_000, 9_000_000, 17_000_000]
        } else {
            &[9_000_000]
        };
        assert_eq!(totals, expected);
    }
    // A user whose only event is refused is left with nothing, not an empty period.
    let cid = fresh_user("batch-c");
    let mut too_much = usage_event(&cid, MAX_TOKENS, "chat", period());
    too_much.tokens = MAX_TOKENS + 1;
    let refused = store
        .record_usage_batch(vec![RecordUsage {
            usage: too_much,
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        }])
        .await
        .expect("the batch");
    assert!(matches!(refused[0], Err(StoreError::TotalOverflow { .. })));
    assert_eq!(store.period_summary(&cid, period()).await.expect("summary"), None);
    // An empty batch is nothing.
    assert!(store.record_usage_batch(Vec::new()).await.expect("empty").is_empty());
}
