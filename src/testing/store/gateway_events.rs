//! Checks of the contract's clause **Gateway events**: `record_gateway_event` records an event
//! id once per user, appends the record's audit entry in the same atomic step only when the id
//! is new, and reports whether it was; `gateway_event_applied` then finds it.

use futures_util::future::join_all;

use super::{base_instant, fresh_user};
use crate::domain::UserId;
use crate::store::{AuditEntry, AuditEvent, GatewayEventRecord, UsageStore};

/// **Gateway events**: a gateway event is recorded once per user, with one audit entry, and found
/// afterwards; concurrent recordings of one event record it once.
pub async fn gateway_events_are_recorded_once(store: &dyn UsageStore) {
    let user = fresh_user("webhook");
    let other = fresh_user("webhook-other");
    let event = |user: &UserId| {
        GatewayEventRecord::applied(
            user.clone(),
            "evt_1".to_owned(),
            "payment_intent.succeeded".to_owned(),
            base_instant(),
        )
    };
    assert!(!store.gateway_event_applied(&user, "evt_1").await.expect("look-up"));
    let first = join_all((0..8).map(|_| store.record_gateway_event(event(&user)))).await;
    let new = first.into_iter().map(|r| r.expect("record")).filter(|new| *new).count();
    assert_eq!(new, 1, "recorded once");
    assert!(store.gateway_event_applied(&user, "evt_1").await.expect("look-up"));
    assert!(!store.record_gateway_event(event(&user)).await.expect("record again"));
    assert!(!store.gateway_event_applied(&user, "evt_2").await.expect("look-up"));
    assert!(
        !store.gateway_event_applied(&other, "evt_1").await.expect("look-up"),
        "events are per user"
    );
    assert!(store.record_gateway_event(event(&other)).await.expect("another user's"));
    let trail = store.audit_trail(&user, None).await.expect("audit");
    assert_eq!(
        trail,
        vec![AuditEntry {
            at: base_instant(),
            user_id: user.clone(),
            period: None,
            event: AuditEvent::GatewayEventApplied {
                event_id: "evt_1".to_owned(),
                event_type: "payment_intent.succeeded".to_owned(),
            },
        }]
    );
}
