//! Checks that the compare-and-sets hold with the instants a caller has, whatever the store
//! keeps of them (PostgreSQL and SQLite keep microseconds; `SystemClock` reads nanoseconds):
//! - **Charges: renew_lease compare-and-set**: a lease a claim answered is renewed with it;
//! - **Accounts: replace_account compare-and-set**: an account saved is replaced by naming it;
//! - **Recording: replays and conflicts**: an event sent again as it was sent is a re-send.

use chrono::Duration;

use super::{base_instant, fresh_user, period, try_record, usage_event};
use crate::domain::{Plan, PlanId};
use crate::store::{Account, UsageStore};

/// An instant between two microseconds.
fn finer(at: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    at + Duration::nanoseconds(1_234_567)
}

/// **Charges: renew_lease compare-and-set**, **Accounts: replace_account compare-and-set** and
/// **Recording: replays and conflicts**, with instants finer than a microsecond.
pub async fn instants_finer_than_a_microsecond_compare_as_sent(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("instants");

    let mut usage = usage_event(&user, 1_000, "chat", period());
    usage.occurred_at = finer(base_instant());
    usage.occurred_at_reported = true;
    usage.recorded_at = finer(base_instant());
    let first = try_record(store, &plan, usage.clone(), None).await.expect("recorded");
    let again = try_record(store, &plan, usage, None)
        .await
        .expect("answered as a re-send");
    assert!(again.replayed, "the same event, sent again");
    assert_eq!(again.usage.consumption_id, first.usage.consumption_id);

    let now = finer(base_instant());
    let claimed = store
        .claim_pending(Some(&user), now, finer(now + Duration::minutes(2)), 10)
        .await
        .expect("claim");
    let fee = claimed.first().expect("the fee, pending and free");
    let renewed = store
        .renew_lease(&user, &fee.key, fee.lease_until, finer(now + Duration::minutes(4)))
        .await
        .expect("renew");
    assert!(renewed.is_some(), "the lease the claim answered is the lease held");

    let saved = Account {
        user_id: user.clone(),
        customer_id: None,
        plan_id: PlanId::new("default").expect("a plan id"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: now,
        updated_at: now,
    };
    assert!(store.replace_account(None, saved.clone()).await.expect("saved"));
    let changed = Account {
        updated_at: finer(now + Duration::seconds(1)),
        ..saved.clone()
    };
    assert!(
        store.replace_account(Some(&saved), changed).await.expect("replaced"),
        "the account as saved is the account stored"
    );
}
