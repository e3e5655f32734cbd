//! Checks of the contract's clauses on claims and leases:
//! - **Charges: claims**: `claim_pending`, `claim_due_retries` and `claim_awaiting_customer`
//!   hand a charge to one caller at a time, taking only charges whose lease has expired (or
//!   that have none) and leasing them in the same atomic step; two concurrent retry claims
//!   never start two rounds of one charge.
//! - **Charges: renew_lease compare-and-set**: `renew_lease` extends only the lease the caller
//!   holds.

use chrono::Duration;
use futures_util::future::join_all;

use super::{base_instant, far_future, fresh_user, period, record, settlement, try_record, usage_event};
use crate::domain::{ChargeKey, ChargeStatus, Plan};
use crate::store::{Settlement, UsageStore};

/// **Charges: claims** (`claim_pending`): pending charges are handed to one caller at a time, and
/// again once the lease expires.
pub async fn claim_pending_hands_each_charge_to_one_caller(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("claim");
    let now = base_instant();
    try_record(
        store,
        &plan,
        usage_event(&user, 30_000_000, "chat", period()),
        Some(now + Duration::minutes(2)),
    )
    .await
    .expect("record_usage");
    let held = store
        .claim_pending(Some(&user), now, now + Duration::minutes(2), 100)
        .await
        .expect("claim");
    assert!(held.is_empty(), "charges leased by the recorder are not claimable");

    let later = now + Duration::minutes(3);
    let claims =
        join_all((0..4).map(|_| store.claim_pending(Some(&user), later, later + Duration::minutes(2), 100))).await;
    let mut claimed: Vec<ChargeKey> = claims
        .into_iter()
        .flat_map(|c| c.expect("claim"))
        .map(|c| {
            assert_eq!(c.attempts, 2, "the recorder's attempt and this one");
            assert_eq!(c.lease_until, Some(later + Duration::minutes(2)));
            c.key
        })
        .collect();
    claimed.sort();
    let mut all: Vec<ChargeKey> = store
        .charges(&user, period())
        .await
        .expect("charges")
        .into_iter()
        .map(|c| c.key)
        .collect();
    all.sort();
    assert_eq!(claimed, all, "each pending charge claimed exactly once");

    let limited = store
        .claim_pending(
            Some(&user),
            later + Duration::minutes(5),
            later + Duration::minutes(7),
            2,
        )
        .await
        .expect("claim");
    assert_eq!(limited.len(), 2, "the limit is honoured");
    let all_users = store
        .claim_pending(None, later + Duration::minutes(5), later + Duration::minutes(7), 10_000)
        .await
        .expect("claim");
    assert_eq!(all_users.iter().filter(|c| c.user_id == user).count(), all.len() - 2);
}

/// **Charges: claims** (`claim_due_retries`): a failed charge whose retry is due becomes pending
/// in the next round, leased to one claimer: concurrent claims never start two rounds.
pub async fn claim_due_retries_starts_a_new_round(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("retry");
    let recorded = record(store, &plan, usage_event(&user, 1_000, "chat", period())).await;
    let key = recorded.charges[0].key.clone();
    let due_at = base_instant() + Duration::days(1);
    store
        .settle_charge(Settlement {
            next_retry_at: Some(due_at),
            ..settlement(&user, &key, ChargeStatus::Pending, 0, ChargeStatus::Failed)
        })
        .await
        .expect("fail");
    let early = store
        .claim_due_retries(due_at - Duration::hours(1), due_at, 10_000)
        .await
        .expect("claim retries");
    assert!(early.iter().all(|c| c.key != key), "not due yet");
    let claims = join_all((0..4).map(|_| store.claim_due_retries(due_at, due_at + Duration::minutes(2), 10_000))).await;
    let mine: Vec<_> = claims
        .into_iter()
        .flat_map(|c| c.expect("claim retries"))
        .filter(|c| c.key == key)
        .collect();
    assert!(mine.len() <= 1, "claimed at most once by these claims");
    let charge = store.charge(&user, &key).await.expect("charge").expect("exists");
    assert_eq!(
        (charge.status, charge.round, charge.next_retry_at),
        (ChargeStatus::Pending, 1, None)
    );
    assert_eq!(charge.attempts, 2, "one more attempt, once");
    assert_eq!(
        charge.failure_code.as_deref(),
        Some("card_declined"),
        "the last failure stays visible"
    );
    if let Some(claimed) = mine.first() {
        assert_eq!(claimed.lease_until, Some(due_at + Duration::minutes(2)));
    }
    let again = store
        .claim_due_retries(due_at, due_at + Duration::minutes(2), 10_000)
        .await
        .expect("claim retries");
    assert!(again.iter().all(|c| c.key != key), "claimed once");
    store
        .settle_charge(settlement(
            &user,
            &key,
            ChargeStatus::Pending,
            1,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("round 1 succeeds");
}

/// **Charges: claims** (`claim_awaiting_customer`), and the lease `settle_charge` sets: charges
/// awaiting the customer are leased for a recheck once their lease has expired, to one claimer at
/// a time, without counting an attempt.
pub async fn claim_awaiting_customer_rechecks_expired_leases(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("awaiting");
    let recorded = record(store, &plan, usage_event(&user, 1_000, "chat", period())).await;
    let key = recorded.charges[0].key.clone();
    let recheck_at = base_instant() + Duration::minutes(15);
    let settled = store
        .settle_charge(Settlement {
            lease_until: Some(recheck_at),
            ..settlement(&user, &key, ChargeStatus::Pending, 0, ChargeStatus::RequiresAction)
        })
        .await
        .expect("requires action");
    assert_eq!(settled.lease_until, Some(recheck_at), "settle_charge sets the lease");
    let early = store
        .claim_awaiting_customer(recheck_at - Duration::minutes(1), recheck_at, 10_000)
        .await
        .expect("claim");
    assert!(early.iter().all(|c| c.key != key), "its lease still holds");
    let claims =
        join_all((0..4).map(|_| store.claim_awaiting_customer(recheck_at, recheck_at + Duration::minutes(15), 10_000)))
            .await;
    let mine: Vec<_> = claims
        .into_iter()
        .flat_map(|c| c.expect("claim"))
        .filter(|c| c.key == key)
        .collect();
    assert_eq!(mine.len(), 1, "claimed exactly once");
    assert_eq!(mine[0].status, ChargeStatus::RequiresAction);
    assert_eq!(mine[0].attempts, recorded.charges[0].attempts, "no attempt counted");
    assert_eq!(mine[0].lease_until, Some(recheck_at + Duration::minutes(15)));
}

/// **Charges: renew_lease compare-and-set**: `renew_lease` extends only the lease the caller
/// holds.
pub async fn renew_lease_is_a_compare_and_set(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("renew");
    let recorded = record(store, &plan, usage_event(&user, 1_000, "chat", period())).await;
    let fee = &recorded.charges[0];
    let held = fee.lease_until;
    let later = far_future() + Duration::days(1);
    let renewed = store
        .renew_lease(&user, &fee.key, held, later)
        .await
        .expect("renew")
        .expect("held");
    assert_eq!(renewed.lease_until, Some(later));
    assert_eq!(renewed.attempts, fee.attempts, "renewing is not an attempt");
    assert_eq!(
        store
            .renew_lease(&user, &fee.key, held, later + Duration::days(1))
            .await
            .expect("renew"),
        None,
        "the old lease is no longer held"
    );
    store
        .settle_charge(settlement(
            &user,
            &fee.key,
            ChargeStatus::Pending,
            0,
            ChargeStatus::Succeeded,
        ))
        .await
        .expect("settle");
    let settled = store.charge(&user, &fee.key).await.expect("charge").expect("exists");
    assert_eq!(
        store
            .renew_lease(&user, &fee.key, settled.lease_until, later)
            .await
            .expect("renew"),
        None,
        "a settled charge is not leased"
    );
}
