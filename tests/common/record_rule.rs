//! A property every durable store's tests run: each event recorded gets the interval after the
//! ones before it and exactly the charges the library's rule gives for that interval, a re-send
//! is answered as the original, and the audit trail lists each event once, in order.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use token_billing::store::{EnsureCharge, RecordUsage};
use token_billing::testing::store::{base_instant, fresh_user, usage_event};
use token_billing::{
    AuditEvent, ChargeKind, ChargeStatus, FeeCollection, NewCharge, PeriodKey, Plan, UsageStore, charges_for_growth,
};

/// One case of the property: the plan's allowance and block, who collects the fee, the events'
/// sizes, which one is sent again, and whether the period's row exists before the first event
/// (as `ensure_charge` of another charge leaves it).
#[derive(Debug, Clone)]
pub struct Case {
    pub included: u64,
    pub block: u64,
    pub library_fee: bool,
    pub sizes: Vec<u64>,
    pub resend: prop::sample::Index,
    pub opened: bool,
}

/// The cases: small blocks, so that events cross many.
pub fn cases() -> impl Strategy<Value = Case> {
    (
        0u64..50_000,
        1_000u64..40_000,
        any::<bool>(),
        proptest::collection::vec(1u64..60_000, 1..16),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(included, block, library_fee, sizes, resend, opened)| Case {
            included,
            block,
            library_fee,
            sizes,
            resend,
            opened,
        })
}

/// Runs `case` against `store`.
pub async fn records_charge_what_the_rule_says(store: &dyn UsageStore, case: Case) -> Result<(), TestCaseError> {
    let plan = Plan::builder()
        .included_tokens(case.included)
        .block_size(case.block)
        .build()
        .expect("valid");
    let fee = if case.library_fee {
        FeeCollection::Library
    } else {
        FeeCollection::Subscription
    };
    let user = fresh_user("paths");
    let period = PeriodKey::new(2026, 11).expect("valid");
    if case.opened {
        store
            .ensure_charge(EnsureCharge {
                charge: NewCharge::block(&plan, &user, period, 1_000_000, None),
                status: ChargeStatus::Pending,
                payment_id: None,
                now: base_instant(),
                lease_until: None,
                plan: Some(plan.clone()),
            })
            .await
            .expect("a period row");
    }
    let record = |usage| RecordUsage {
        usage,
        plan: &plan,
        fee,
        lease_until: None,
        alerting: None,
        account: None,
    };
    let mut total = 0u64;
    let mut sent = Vec::new();
    let mut answers = Vec::new();
    for tokens in &case.sizes {
        let usage = usage_event(&user, *tokens, "chat", period);
        sent.push(usage.clone());
        let recorded = store.record_usage(record(usage)).await.expect("recorded");
        prop_assert!(!recorded.replayed);
        prop_assert_eq!((recorded.total_before, recorded.total_after), (total, total + tokens));
        let expected: BTreeSet<(ChargeKind, u64)> =
            charges_for_growth(&plan, fee, &user, period, total, total + tokens, None)
                .expect("rated")
                .iter()
                .map(|c| (c.kind, c.block))
                .collect();
        let created: BTreeSet<(ChargeKind, u64)> = recorded.charges.iter().map(|c| (c.kind, c.block)).collect();
        prop_assert_eq!(created, expected);
        answers.push(recorded);
        total += tokens;
    }
    let resent = case.resend.index(sent.len());
    let original = sent[resent].clone();
    let again = store.record_usage(record(original.clone())).await.expect("answered");
    prop_assert!(again.replayed);
    // The original's answer: its event, its interval and its charges.
    let first = &answers[resent];
    prop_assert_eq!(again.usage.consumption_id, original.consumption_id);
    prop_assert_eq!(
        (again.total_before, again.total_after),
        (first.total_before, first.total_after)
    );
    let keys = |r: &token_billing::store::Recorded| r.charges.iter().map(|c| c.key.clone()).collect::<Vec<_>>();
    prop_assert_eq!(keys(&again), keys(first));
    let summary = store
        .period_summary(&user, period)
        .await
        .expect("summary")
        .expect("a summary");
    prop_assert_eq!((summary.total_tokens, summary.events), (total, case.sizes.len() as u64));
    let consumptions = store.consumptions(&user, period).await.expect("consumptions");
    prop_assert_eq!(consumptions.len(), case.sizes.len());
    // Each event once in the audit trail, in the order recorded, with its total.
    let trail = store.audit_trail(&user, Some(period)).await.expect("audit");
    let usage_entries: Vec<_> = trail
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::UsageRecorded {
                consumption_id,
                total_after,
                ..
            } => Some((*consumption_id, *total_after)),
            _ => None,
        })
        .collect();
    let expected: Vec<_> = sent
        .iter()
        .scan(0, |total, usage| {
            *total += usage.tokens;
            Some((usage.consumption_id, *total))
        })
        .collect();
    prop_assert_eq!(usage_entries, expected);
    Ok(())
}
