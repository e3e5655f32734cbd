//! Checks of the contract's clauses on charges:
//! - **Recording: unique charge keys**: a second charge with a key already stored is never
//!   stored, whether usage or `ensure_charge` (concurrently, too) asks for it.
//! - **Charges: settle compare-and-set**: `settle_charge` is a compare-and-set on (status,
//!   round), failing with `StatusConflict` when either differs and with `ForbiddenTransition`
//!   when `ChargeStatus::can_become` forbids the change.
//! - **Charges: summaries agree**: `fixed_fee_charged` and `tier_charges_*` sum the succeeded
//!   fixed-fee and block charges, `outstanding_*` the others.

use futures_util::future::join_all;

use super::{base_instant, fresh_user, period, record, settlement, usage_event};
use crate::domain::{ChargeKey, ChargeKind, ChargeStatus, NewCharge, Plan};
use crate::store::{EnsureCharge, StoreError, UsageStore};

/// **Recording: unique charge keys**: a period opened ahead of usage keeps its one fee charge
/// when usage arrives.
pub async fn existing_fee_charge_is_not_created_again(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("opened");
    let (fee, created) = store
        .ensure_charge(EnsureCharge {
            charge: NewCharge::fixed_fee(&plan, &user, period(), None),
            status: ChargeStatus::Pending,
            payment_id: None,
            now: base_instant(),
            lease_until: None,
            plan: Some(plan.clone()),
        })
        .await
        .expect("ensure_charge");
    assert!(created);
    let recorded = record(store, &plan, usage_event(&user, 8_000_001, "chat", period())).await;
    assert_eq!(
        recorded.charges.iter().map(|c| c.kind).collect::<Vec<_>>(),
        [ChargeKind::Block]
    );
    let charges = store.charges(&user, period()).await.expect("charges");
    assert_eq!(charges.len(), 2);
    assert_eq!(charges[0].id, fee.id);
}

/// **Recording: unique charge keys**, through `ensure_charge`: it creates a charge once; later
/// and concurrent calls return the stored one.
pub async fn ensure_charge_is_idempotent(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("ensure");
    let request = EnsureCharge {
        charge: NewCharge::fixed_fee(&plan, &user, period(), None),
        status: ChargeStatus::Succeeded,
        payment_id: Some("in_1".to_owned()),
        now: base_instant(),
        lease_until: None,
        plan: Some(plan.clone()),
    };
    let calls = join_all((0..8).map(|_| store.ensure_charge(request.clone()))).await;
    let created = calls.iter().filter(|r| r.as_ref().expect("ensure_charge").1).count();
    assert_eq!(created, 1, "exactly one caller creates the charge");
    let charges = store.charges(&user, period()).await.expect("charges");
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].status, ChargeStatus::Succeeded);
    assert_eq!(charges[0].payment_id.as_deref(), Some("in_1"));
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!(summary.fixed_fee_charged, plan.fixed_fee());
    assert_eq!((summary.total_tokens, summary.outstanding_count), (0, 0));
}

/// **Charges: settle compare-and-set**: `settle_charge` is a compare-and-set on status and round
/// (`StatusConflict`), refuses forbidden transitions (`ForbiddenTransition`) and unknown charges
/// (`NotFound`), and of concurrent settlements exactly one wins.
pub async fn settle_is_a_compare_and_set(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("settle");
    let recorded = record(store, &plan, usage_event(&user, 8_000_001, "chat", period())).await;
    let key = recorded.charges[1].key.clone();

    let stale_round = store
        .settle_charge(settlement(
            &user,
            &key,
            ChargeStatus::Pending,
            1,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect_err("wrong round");
    assert!(
        matches!(stale_round, StoreError::StatusConflict { .. }),
        "{stale_round:?}"
    );

    let settled = store
        .settle_charge(settlement(
            &user,
            &key,
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("settle");
    assert_eq!(settled.status, ChargeStatus::Succeeded);
    assert!(settled.payment_id.is_some());

    let lost = store
        .settle_charge(settlement(&user, &key, ChargeStatus::Pending, 0, ChargeStatus::Failed))
        .await
        .expect_err("the second settlement must lose");
    match lost {
        StoreError::StatusConflict { charge } => assert_eq!(charge.status, ChargeStatus::Succeeded),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forbidden = store
        .settle_charge(settlement(
            &user,
            &key,
            ChargeStatus::Succeeded,
            0,
            ChargeStatus::Pending,
        ))
        .await
        .expect_err("nothing leaves Succeeded");
    assert!(
        matches!(forbidden, StoreError::ForbiddenTransition { .. }),
        "{forbidden:?}"
    );

    let missing = ChargeKey::new(&user, period(), ChargeKind::Block, 99);
    let not_found = store
        .settle_charge(settlement(
            &user,
            &missing,
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect_err("no such charge");
    assert!(matches!(not_found, StoreError::NotFound { .. }), "{not_found:?}");

    // Concurrent settlements of one charge: exactly one wins.
    let fee = recorded.charges[0].key.clone();
    let results = join_all((0..6).map(|i| {
        let to = if i % 2 == 0 {
            ChargeStatus::Succeeded
        } else {
            ChargeStatus::Failed
        };
        let fee = &fee;
        let user = &user;
        async move {
            store
                .settle_charge(settlement(user, fee, ChargeStatus::Pending, 0, to))
                .await
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
}

/// **Charges: summaries agree**: the summary's collected and outstanding figures follow every
/// status change.
pub async fn summary_agrees_with_charges(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("summary");
    let recorded = record(store, &plan, usage_event(&user, 40_000_000, "chat", period())).await;
    assert_eq!(recorded.charges.len(), 5);
    let keys: Vec<ChargeKey> = recorded.charges.iter().map(|c| c.key.clone()).collect();
    store
        .settle_charge(settlement(
            &user,
            &keys[0],
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("fee");
    store
        .settle_charge(settlement(
            &user,
            &keys[1],
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("block 1");
    store
        .settle_charge(settlement(
            &user,
            &keys[2],
            ChargeStatus::Pending,
            0,
            ChargeStatus::Failed,
        ))
        .await
        .expect("block 2");
    store
        .settle_charge(settlement(
            &user,
            &keys[3],
            ChargeStatus::Pending,
            0,
            ChargeStatus::RequiresAction,
        ))
        .await
        .expect("block 3");
    store
        .settle_charge(settlement(
            &user,
            &keys[3],
            ChargeStatus::RequiresAction,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("block 3 authenticated");
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    let charges = store.charges(&user, period()).await.expect("charges");
    let sum = |pred: &dyn Fn(&crate::Charge) -> bool| -> (u64, i64) {
        let matching: Vec<_> = charges.iter().filter(|c| pred(c)).collect();
        (
            matching.len() as u64,
            matching.iter().map(|c| c.amount.minor_units()).sum(),
        )
    };
    let fee = sum(&|c| c.kind == ChargeKind::FixedFee && c.status == ChargeStatus::Succeeded);
    let tiers = sum(&|c| c.kind == ChargeKind::Block && c.status == ChargeStatus::Succeeded);
    let outstanding = sum(&|c| c.status != ChargeStatus::Succeeded);
    assert_eq!(summary.fixed_fee_charged.minor_units(), fee.1);
    assert_eq!(
        (summary.tier_charges_count, summary.tier_charges_total.minor_units()),
        tiers
    );
    assert_eq!(
        (summary.outstanding_count, summary.outstanding_total.minor_units()),
        outstanding
    );
    assert_eq!((tiers.0, outstanding.0), (2, 2));
    let unpaid = store.unpaid_charges(&user).await.expect("unpaid");
    assert_eq!(unpaid.iter().map(|c| c.block).collect::<Vec<_>>(), [2]);
}
