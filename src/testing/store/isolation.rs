//! Checks of the contract's clause **Isolation**: every operation touches one user's data only,
//! and reads return only the named user's rows; an event id, recorded *for the user*, is
//! another user's to use as well.

use chrono::Duration;
use uuid::Uuid;

use super::{base_instant, fresh_user, period, record, usage_event};
use crate::domain::{ChargeKey, ChargeKind, EventId, Plan};
use crate::store::{AuditEntry, AuditEvent, UsageStore};

/// **Isolation**: reads name one user and return only that user's rows.
pub async fn reads_are_isolated_per_user(store: &dyn UsageStore) {
    let plan = Plan::default();
    let (alice, bob) = (fresh_user("iso-a"), fresh_user("iso-b"));
    record(store, &plan, usage_event(&alice, 20_000_000, "chat", period())).await;
    assert_eq!(store.period_summary(&bob, period()).await.expect("summary"), None);
    assert!(store.charges(&bob, period()).await.expect("charges").is_empty());
    assert!(
        store
            .consumptions(&bob, period())
            .await
            .expect("consumptions")
            .is_empty()
    );
    assert!(
        store
            .usage_by_operation(&bob, period())
            .await
            .expect("by op")
            .is_empty()
    );
    assert!(store.charges_by_tier(&bob, period()).await.expect("by tier").is_empty());
    assert!(store.audit_trail(&bob, None).await.expect("audit").is_empty());
    let alice_key = ChargeKey::new(&alice, period(), ChargeKind::Block, 1);
    assert_eq!(store.charge(&bob, &alice_key).await.expect("charge"), None);
    assert!(store.charge(&alice, &alice_key).await.expect("charge").is_some());
    let claimed = store
        .claim_pending(Some(&bob), base_instant(), base_instant() + Duration::minutes(1), 100)
        .await
        .expect("claim");
    assert!(claimed.is_empty());
}

/// **Isolation**, and **Recording: replays and conflicts** (an event id is recorded *for the
/// user*): event ids are unique per user, so two users may use the same one.
pub async fn event_ids_are_scoped_per_user(store: &dyn UsageStore) {
    let plan = Plan::default();
    let (alice, bob) = (fresh_user("scope-a"), fresh_user("scope-b"));
    let event = EventId::new(format!("evt-{}", Uuid::new_v4().simple())).expect("valid");
    for (user, tokens) in [(&alice, 5), (&bob, 7)] {
        let mut usage = usage_event(user, tokens, "chat", period());
        usage.event_id = event.clone();
        let recorded = record(store, &plan, usage).await;
        assert!(!recorded.replayed);
        assert_eq!(recorded.total_after, tokens);
    }
}

/// **Isolation**: `append_audit` adds to the named user's trail only.
pub async fn audit_entries_can_be_appended(store: &dyn UsageStore) {
    let user = fresh_user("append");
    let entry = AuditEntry {
        at: base_instant(),
        user_id: user.clone(),
        period: Some(period()),
        event: AuditEvent::DuplicatePayment {
            key: ChargeKey::new(&user, period(), ChargeKind::Block, 1),
            kept_payment_id: Some("pi_1".to_owned()),
            duplicate_payment_id: "pi_2".to_owned(),
        },
    };
    store.append_audit(entry.clone()).await.expect("append");
    assert_eq!(
        store.audit_trail(&user, Some(period())).await.expect("audit"),
        vec![entry]
    );
    assert!(
        store
            .audit_trail(&fresh_user("else"), None)
            .await
            .expect("audit")
            .is_empty()
    );
}
