//! Checks of the contract's clauses on spend control (`reserve`, `release_hold`, `spend_state`,
//! `holds`):
//! - **Spend control: atomic grant**: recorded usage, open holds and a new hold never pass the
//!   ceiling together, whatever the concurrency, and a record sees the holds granted before it;
//! - **Spend control: expiry**: an expired hold stops counting by itself;
//! - **Spend control: replays and conflicts**: a reserve sent again answers the same hold, one
//!   with other tokens is a conflict, one of a recorded event is settled;
//! - **Spend control: settle**: recording an event frees the hold of its id, in one step;
//! - **Spend control: overflow**.

use chrono::{DateTime, Duration, Utc};
use futures_util::future::join_all;

use super::{base_instant, far_future, fresh_user, period, record, settlement, try_record, usage_event};
use crate::domain::{
    Ceiling, ChargeKind, ChargeStatus, EventId, FeeCollection, LimitKind, Limits, MAX_TOKENS, Money, Plan, UserId,
};
use crate::store::{HoldDecision, HoldRequest, RecordUsage, SpendState, StoreError, UsageStore};

fn hold_id(tag: &str) -> EventId {
    EventId::new(format!("hold-{tag}-{}", uuid::Uuid::new_v4().simple())).expect("a valid hold id")
}

/// A request for `tokens` under `id`, at `now`, expiring a minute later, under `ceiling`.
fn request<'a>(
    user: &'a UserId,
    id: &'a EventId,
    tokens: u64,
    plan: &'a Plan,
    ceiling: Ceiling,
    now: DateTime<Utc>,
) -> HoldRequest<'a> {
    HoldRequest {
        user_id: user,
        hold_id: id,
        period: period(),
        tokens,
        now,
        expires_at: now + Duration::minutes(1),
        plan,
        ceiling,
        overdue_before: None,
    }
}

fn token_cap(tokens: u64) -> Ceiling {
    Ceiling {
        token_cap: Some(tokens),
        ..Ceiling::default()
    }
}

async fn reserve(store: &dyn UsageStore, request: HoldRequest<'_>) -> HoldDecision {
    store.reserve(request).await.expect("reserve")
}

async fn state(store: &dyn UsageStore, user: &UserId, now: DateTime<Utc>) -> SpendState {
    store.spend_state(user, period(), now, None).await.expect("spend_state")
}

/// **Spend control: atomic grant**: of many concurrent reservations against a cap, exactly as
/// many are granted as fit; the rest are refused by the cap; a record then sees the holds, and
/// the spend cap is turned into tokens by the plan.
pub async fn concurrent_holds_never_pass_the_ceiling(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("cap");
    let now = base_instant();
    let ids: Vec<EventId> = (0..40).map(|i| hold_id(&i.to_string())).collect();
    let decisions = join_all(
        ids.iter()
            .map(|id| store.reserve(request(&user, id, 7_000, &plan, token_cap(100_000), now))),
    )
    .await;
    let mut granted = 0;
    for decision in decisions {
        match decision.expect("reserve") {
            HoldDecision::Granted { replayed: false, .. } => granted += 1,
            HoldDecision::Refused {
                limit: LimitKind::TokenCap,
                state,
            } => assert!(state.used() + 7_000 > 100_000, "refused with room left: {state:?}"),
            other => panic!("unexpected decision {other:?}"),
        }
    }
    assert_eq!(granted, 14, "100,000 holds fourteen reservations of 7,000");
    let held = state(store, &user, now).await;
    assert_eq!((held.held_tokens, held.open_holds, held.total_tokens), (98_000, 14, 0));
    assert_eq!(store.holds(&user, period(), now).await.expect("holds").len(), 14);

    // Recorded usage counts with the holds.
    record(store, &plan, usage_event(&user, 1_500, "chat", period())).await;
    let refused = reserve(
        store,
        request(&user, &hold_id("after"), 1_000, &plan, token_cap(100_000), now),
    )
    .await;
    assert!(
        matches!(refused, HoldDecision::Refused { limit: LimitKind::TokenCap, state } if state.used() == 99_500),
        "{refused:?}"
    );
    let fits = reserve(
        store,
        request(&user, &hold_id("fits"), 500, &plan, token_cap(100_000), now),
    )
    .await;
    assert!(matches!(fits, HoldDecision::Granted { .. }), "{fits:?}");

    // A spend cap of BRL 600.00 is the fee and two blocks: 24M tokens.
    let capped = fresh_user("spend-cap");
    let ceiling = Limits::none()
        .with_spend_cap(Money::from_minor(60_000, plan.currency()))
        .ceiling(&plan)
        .expect("the plan's currency");
    let refused = reserve(
        store,
        request(&capped, &hold_id("big"), 24_000_001, &plan, ceiling, now),
    )
    .await;
    assert!(
        matches!(
            refused,
            HoldDecision::Refused {
                limit: LimitKind::SpendCap,
                ..
            }
        ),
        "{refused:?}"
    );
    let granted = reserve(
        store,
        request(&capped, &hold_id("fit"), 24_000_000, &plan, ceiling, now),
    )
    .await;
    assert!(matches!(granted, HoldDecision::Granted { .. }), "{granted:?}");
}

/// **Spend control: expiry**: a hold stops counting when its time to live passes, without
/// anyone releasing it; a hold counts only in its own period.
pub async fn expired_holds_stop_counting(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("expiry");
    let now = base_instant();
    let granted = reserve(
        store,
        request(&user, &hold_id("crashed"), 10_000, &plan, token_cap(10_000), now),
    )
    .await;
    assert!(matches!(granted, HoldDecision::Granted { .. }), "{granted:?}");
    let refused = reserve(
        store,
        request(&user, &hold_id("blocked"), 1, &plan, token_cap(10_000), now),
    )
    .await;
    assert!(matches!(refused, HoldDecision::Refused { .. }), "{refused:?}");

    let later = now + Duration::minutes(2);
    assert_eq!(
        state(store, &user, later).await.held_tokens,
        0,
        "the expired hold no longer counts"
    );
    assert!(store.holds(&user, period(), later).await.expect("holds").is_empty());
    let granted = reserve(
        store,
        request(&user, &hold_id("after"), 10_000, &plan, token_cap(10_000), later),
    )
    .await;
    assert!(matches!(granted, HoldDecision::Granted { .. }), "{granted:?}");
    let next = store
        .spend_state(&user, period().next(), later, None)
        .await
        .expect("spend_state");
    assert_eq!(next.held_tokens, 0, "a hold counts in its own period only");
}

/// **Spend control: replays and conflicts**: a reserve sent again answers the same hold and
/// holds nothing more; other tokens under an open hold's id are a conflict; the id of a
/// recorded event is settled. **Spend control: overflow**.
pub async fn reserves_are_idempotent_by_hold_id(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("hold-replay");
    let now = base_instant();
    let id = hold_id("retried");
    let first = reserve(store, request(&user, &id, 5_000, &plan, token_cap(100_000), now)).await;
    let HoldDecision::Granted {
        hold, replayed: false, ..
    } = first
    else {
        panic!("granted: {first:?}")
    };
    let again = reserve(
        store,
        request(&user, &id, 5_000, &plan, token_cap(100_000), now + Duration::seconds(1)),
    )
    .await;
    assert!(
        matches!(&again, HoldDecision::Granted { hold: same, replayed: true, state } if *same == hold && state.held_tokens == 5_000),
        "{again:?}"
    );
    let conflict = store
        .reserve(request(&user, &id, 6_000, &plan, token_cap(100_000), now))
        .await;
    assert!(
        matches!(conflict, Err(StoreError::EventConflict { .. })),
        "{conflict:?}"
    );
    assert_eq!(state(store, &user, now).await.held_tokens, 5_000);

    let event = usage_event(&user, 1_000, "chat", period());
    record(store, &plan, event.clone()).await;
    let settled = reserve(
        store,
        request(&user, &event.event_id, 1_000, &plan, token_cap(100_000), now),
    )
    .await;
    assert_eq!(settled, HoldDecision::Settled, "a recorded event's id holds nothing");

    let unlimited = store
        .reserve(request(
            &user,
            &hold_id("huge"),
            MAX_TOKENS,
            &plan,
            Ceiling::default(),
            now,
        ))
        .await;
    assert!(
        matches!(unlimited, Err(StoreError::TotalOverflow { .. })),
        "{unlimited:?}"
    );
}

/// **Spend control: settle**: recording an event frees the hold of its id in the same step,
/// in a single record, a replay of it, and a batch; releasing frees a hold once.
pub async fn recording_frees_the_hold_of_its_id(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("settle");
    let now = base_instant();
    let mut settled = usage_event(&user, 70_000, "chat", period());
    settled.event_id = hold_id("streamed");
    let granted = reserve(
        store,
        request(&user, &settled.event_id, 50_000, &plan, token_cap(100_000), now),
    )
    .await;
    assert!(matches!(granted, HoldDecision::Granted { .. }), "{granted:?}");
    record(store, &plan, settled.clone()).await;
    let after = state(store, &user, now).await;
    assert_eq!(
        (after.total_tokens, after.held_tokens),
        (70_000, 0),
        "usage above its hold is recorded whole, and the hold freed"
    );

    let mut batched = usage_event(&user, 1_000, "chat", period());
    batched.event_id = hold_id("batched");
    reserve(
        store,
        request(&user, &batched.event_id, 1_000, &plan, token_cap(100_000), now),
    )
    .await;
    let results = store
        .record_usage_batch(vec![RecordUsage {
            usage: batched,
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: Some(far_future()),
            alerting: None,
            account: None,
        }])
        .await
        .expect("the batch");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        state(store, &user, now).await.held_tokens,
        0,
        "a batch frees its events' holds"
    );

    let released = hold_id("cancelled");
    reserve(store, request(&user, &released, 2_000, &plan, token_cap(100_000), now)).await;
    assert!(store.release_hold(&user, period(), &released).await.expect("release"));
    assert!(!store.release_hold(&user, period(), &released).await.expect("release"));
    assert_eq!(
        state(store, &user, now).await,
        SpendState {
            total_tokens: 71_000,
            ..SpendState::default()
        }
    );
}

/// **Spend control: atomic grant** (the payment gate): while a charge created at or before the
/// cut-off is unpaid, no hold may start a new block; usage may still fill the block started.
pub async fn the_payment_gate_lets_no_hold_start_a_block(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("gate");
    let now = base_instant();
    let recorded = try_record(
        store,
        &plan,
        usage_event(&user, 9_000_000, "chat", period()),
        Some(far_future()),
    )
    .await
    .expect("record_usage");
    let block = recorded
        .charges
        .iter()
        .find(|c| c.kind == ChargeKind::Block)
        .expect("the first block's charge");
    store
        .settle_charge(settlement(
            &user,
            &block.key,
            ChargeStatus::Pending,
            0,
            ChargeStatus::Failed,
        ))
        .await
        .expect("declined");
    let gate = Ceiling {
        payment_gate: true,
        ..Ceiling::default()
    };
    let (next_block, recent_id) = (hold_id("next-block"), hold_id("recent"));
    let overdue = HoldRequest {
        overdue_before: Some(block.created_at + Duration::hours(1)),
        ..request(&user, &next_block, 7_000_001, &plan, gate, now)
    };
    let refused = reserve(store, overdue).await;
    assert!(
        matches!(refused, HoldDecision::Refused { limit: LimitKind::PaymentGate, state } if state.payment_overdue),
        "{refused:?}"
    );
    let within = HoldRequest {
        tokens: 7_000_000,
        ..overdue
    };
    assert!(matches!(reserve(store, within).await, HoldDecision::Granted { .. }));
    // A charge newer than the cut-off does not close the gate.
    let recent = HoldRequest {
        overdue_before: Some(block.created_at - Duration::hours(1)),
        ..request(&user, &recent_id, 1_000, &plan, gate, now)
    };
    assert!(matches!(reserve(store, recent).await, HoldDecision::Granted { .. }));
    let seen = store
        .spend_state(&user, period(), now, Some(block.created_at))
        .await
        .expect("spend_state");
    assert!(seen.payment_overdue);
}
