//! Checks of what the store reports of what it recorded:
//! - **Recording: atomic**, for the audit entries it appends with each event, and the entries
//!   of each charge created and status changed (**Charges: settle compare-and-set**): the audit
//!   trail records every change.
//! - The original product's two monitoring reports, usage by operation type and charges by
//!   tier, updated with each event and following the charges (**Charges: summaries agree**).

use chrono::Duration;

use super::{base_instant, fresh_user, period, record, settlement, try_record, usage_event};
use crate::domain::{ChargeStatus, NewCharge, Plan};
use crate::store::{AuditEntry, AuditEvent, EnsureCharge, Settlement, UsageStore};

/// The original product's two monitoring reports, usage by operation type and charges by tier:
/// updated with each event (**Recording: atomic**) and following the charges' statuses
/// (**Charges: summaries agree**).
pub async fn reports_group_by_operation_and_tier(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("reports");
    for (tokens, op) in [(5_000_000, "chat"), (4_000_000, "embedding"), (10_000_000, "chat")] {
        record(store, &plan, usage_event(&user, tokens, op, period())).await;
    }
    let by_op = store.usage_by_operation(&user, period()).await.expect("by operation");
    let rows: Vec<(&str, u64, u64)> = by_op
        .iter()
        .map(|r| (r.operation_type.as_str(), r.total_tokens, r.operations))
        .collect();
    assert_eq!(rows, [("chat", 15_000_000, 2), ("embedding", 4_000_000, 1)]);
    let charges = store.charges(&user, period()).await.expect("charges");
    let block1 = charges.iter().find(|c| c.block == 1).expect("block 1");
    store
        .settle_charge(settlement(
            &user,
            &block1.key,
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("settle");
    let by_tier = store.charges_by_tier(&user, period()).await.expect("by tier");
    let rows: Vec<(&str, u64, i64, i64)> = by_tier
        .iter()
        .map(|r| {
            (
                r.billing_tier.as_str(),
                r.charges_count,
                r.total_charged.minor_units(),
                r.collected.minor_units(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("0-8M", 1, 40_000, 0),
            ("8M-16M", 1, 10_000, 10_000),
            ("16M-24M", 1, 10_000, 0)
        ]
    );
}

/// **Recording: atomic** (the audit entries are appended with the event) and **Charges: settle
/// compare-and-set** (a status change is audited): every consumption, charge creation, collection
/// start and status change is in the audit trail.
pub async fn audit_trail_records_every_change(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("audit");
    let now = base_instant();
    let recorded = try_record(
        store,
        &plan,
        usage_event(&user, 8_000_001, "chat", period()),
        Some(now + Duration::minutes(2)),
    )
    .await
    .expect("record");
    let block = &recorded.charges[1];
    store
        .settle_charge(Settlement {
            // Settled a minute after its creation, which its creation entry must not take on.
            at: now + Duration::minutes(1),
            ..settlement(&user, &block.key, ChargeStatus::Pending, 0, ChargeStatus::Succeeded)
        })
        .await
        .expect("settle");
    let trail = store.audit_trail(&user, Some(period())).await.expect("audit");
    let kinds: Vec<&str> = trail
        .iter()
        .map(|e| match &e.event {
            AuditEvent::UsageRecorded { .. } => "usage",
            AuditEvent::ChargeCreated { .. } => "created",
            AuditEvent::CollectionStarted { .. } => "attempt",
            AuditEvent::ChargeStatusChanged { .. } => "status",
            AuditEvent::AccountSaved { .. } => "account",
            _ => "other",
        })
        .collect();
    for kind in ["usage", "created", "attempt", "status"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(kinds.iter().filter(|k| **k == "created").count(), 2);
    assert!(trail.iter().all(|e| e.user_id == user && e.period == Some(period())));
    assert!(trail.iter().any(|e| matches!(&e.event,
        AuditEvent::ChargeStatusChanged { key, from: ChargeStatus::Pending, to: ChargeStatus::Succeeded, .. } if *key == block.key)));
    assert!(trail.iter().any(|e| matches!(&e.event,
        AuditEvent::UsageRecorded { consumption_id, tokens: 8_000_001, .. } if *consumption_id == recorded.usage.consumption_id)));
    // Each creation says what was created, as it was created, and when; a charge leased to its
    // creator starts its first collection at once.
    for charge in &recorded.charges {
        let created: Vec<&AuditEntry> = trail
            .iter()
            .filter(|e| matches!(&e.event, AuditEvent::ChargeCreated { key, .. } if *key == charge.key))
            .collect();
        assert_eq!(created.len(), 1, "{}", charge.key);
        assert_eq!(created[0].at, charge.created_at);
        assert_eq!(
            created[0].event,
            AuditEvent::ChargeCreated {
                key: charge.key.clone(),
                billing_tier: charge.billing_tier.clone(),
                amount: charge.amount,
                status: ChargeStatus::Pending,
            }
        );
        assert!(trail.iter().any(|e| e.event
            == AuditEvent::CollectionStarted {
                key: charge.key.clone(),
                round: 0,
                attempt: 1,
            }));
    }

    // A charge paid elsewhere is created succeeded, with no collection of its own.
    let next = period().next();
    let (paid, created) = store
        .ensure_charge(EnsureCharge {
            charge: NewCharge::fixed_fee(&plan, &user, next, None),
            status: ChargeStatus::Succeeded,
            payment_id: Some("pi_paid_elsewhere".to_owned()),
            now: now + Duration::days(40),
            lease_until: None,
            plan: Some(plan.clone()),
        })
        .await
        .expect("ensure_charge");
    assert!(created);
    let trail = store.audit_trail(&user, Some(next)).await.expect("audit");
    let events: Vec<&AuditEvent> = trail.iter().map(|e| &e.event).collect();
    assert_eq!(
        events,
        [&AuditEvent::ChargeCreated {
            key: paid.key.clone(),
            billing_tier: paid.billing_tier.clone(),
            amount: paid.amount,
            status: ChargeStatus::Succeeded,
        }]
    );
    assert_eq!(trail[0].at, now + Duration::days(40));
}
