//! Checks of the contract's clause **Accounts: replace_account compare-and-set**:
//! `replace_account` MUST be a compare-and-set on the whole account, atomic with the store's
//! other writes of it, so that two callers changing one account never lose either change. With
//! them, the reads of the accounts it compares against, as `put_account`, `account` and
//! `accounts` document them (no clause of their own): an account reads back whole, and
//! `accounts` answers each user asked, in order.

use chrono::Duration;
use futures_util::future::join_all;

use super::{base_instant, fresh_user, period};
use crate::domain::{PlanId, UserId};
use crate::store::{Account, AuditEvent, UsageStore};

/// Accounts are stored and read back whole: what **Accounts: replace_account compare-and-set**
/// compares the expected account against (`put_account` and `account` as they document
/// themselves).
pub async fn account_round_trips(store: &dyn UsageStore) {
    let user = fresh_user("account");
    assert_eq!(store.account(&user).await.expect("account"), None);
    let account = Account {
        user_id: user.clone(),
        customer_id: Some("cus_123".parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: vec![(period(), PlanId::new("starter").expect("valid"))],
        subscription_id: None,
        limits: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    store.put_account(account.clone()).await.expect("put_account");
    assert_eq!(store.account(&user).await.expect("account"), Some(account.clone()));
    let changed = Account {
        subscription_id: Some("sub_1".to_owned()),
        ..account
    };
    store.put_account(changed.clone()).await.expect("put_account");
    assert_eq!(store.account(&user).await.expect("account"), Some(changed));
}

/// **Accounts: replace_account compare-and-set**: `replace_account` saves an account only over
/// the one expected, and changes nothing otherwise (no audit entry for a refused write).
pub async fn replace_account_is_a_compare_and_set(store: &dyn UsageStore) {
    let user = fresh_user("replace");
    let first = Account {
        user_id: user.clone(),
        customer_id: None,
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    assert!(
        store.replace_account(None, first.clone()).await.expect("replace"),
        "no account yet"
    );
    let other = Account {
        customer_id: Some("cus_other".parse().expect("valid")),
        ..first.clone()
    };
    assert!(
        !store.replace_account(None, other.clone()).await.expect("replace"),
        "an account exists now"
    );
    assert_eq!(store.account(&user).await.expect("account"), Some(first.clone()));
    let paying = Account {
        customer_id: Some("cus_paying".parse().expect("valid")),
        updated_at: base_instant() + Duration::seconds(1),
        ..first.clone()
    };
    assert!(
        store
            .replace_account(Some(&first), paying.clone())
            .await
            .expect("replace")
    );
    assert_eq!(store.account(&user).await.expect("account"), Some(paying.clone()));
    // `first` is not the account any more: a write made from it would lose `paying`.
    assert!(!store.replace_account(Some(&first), other).await.expect("replace"));
    assert_eq!(store.account(&user).await.expect("account"), Some(paying.clone()));
    let moved = Account {
        plan_id: PlanId::new("pro").expect("valid"),
        earlier_plans: vec![(period(), PlanId::new("default").expect("valid"))],
        ..paying.clone()
    };
    assert!(
        store
            .replace_account(Some(&paying), moved.clone())
            .await
            .expect("replace")
    );
    assert_eq!(store.account(&user).await.expect("account"), Some(moved));
    let saved = store
        .audit_trail(&user, None)
        .await
        .expect("trail")
        .into_iter()
        .filter(|e| matches!(e.event, AuditEvent::AccountSaved { .. }))
        .count();
    assert_eq!(saved, 3, "an audit entry per account saved, none for a refused write");
}

/// Lets the other futures of the task run once (as a runtime's `yield_now` does).
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

/// **Accounts: replace_account compare-and-set**, under concurrency: concurrent `replace_account`
/// calls, each redoing its change on the account as it is when it loses, lose no change.
pub async fn concurrent_account_replacements_lose_no_change(store: &dyn UsageStore) {
    let user = fresh_user("replacements");
    let account = Account {
        user_id: user.clone(),
        customer_id: Some("cus_0".parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    store.put_account(account).await.expect("put_account");
    let (callers, changes) = (6, 4);
    join_all((0..callers).map(|_| async {
        for _ in 0..changes {
            loop {
                let current = store.account(&user).await.expect("account").expect("an account");
                let count: u32 = current.customer_id.as_ref().expect("a customer").as_str()["cus_".len()..]
                    .parse()
                    .expect("a count");
                let next = Account {
                    customer_id: Some(format!("cus_{}", count + 1).parse().expect("valid")),
                    ..current.clone()
                };
                // The other callers read the same account meanwhile: all but one lose.
                yield_now().await;
                if store.replace_account(Some(&current), next).await.expect("replace") {
                    break;
                }
            }
        }
    }))
    .await;
    let last = store.account(&user).await.expect("account").expect("an account");
    assert_eq!(
        last.customer_id.expect("a customer").as_str(),
        format!("cus_{}", callers * changes),
        "every change counted once"
    );
}

/// `accounts` answers one entry per user asked, in the order asked (repeats included), `None`
/// for a user without an account, and nothing of users not asked: the batch read of the accounts
/// **Accounts: replace_account compare-and-set** guards, as `accounts` documents it.
pub async fn accounts_answer_each_user_in_order(store: &dyn UsageStore) {
    let account = |user: &UserId, customer: &str| Account {
        user_id: user.clone(),
        customer_id: Some(customer.parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    let (a, b, nobody, other) = (
        fresh_user("acc-a"),
        fresh_user("acc-b"),
        fresh_user("acc-none"),
        fresh_user("acc-other"),
    );
    for (user, customer) in [(&a, "cus_a"), (&b, "cus_b"), (&other, "cus_other")] {
        store.put_account(account(user, customer)).await.expect("put_account");
    }
    let asked = [b.clone(), nobody.clone(), a.clone(), b.clone()];
    let answered = store.accounts(&asked).await.expect("accounts");
    let customers: Vec<Option<String>> = answered
        .iter()
        .map(|found| {
            found
                .as_ref()
                .and_then(|a| a.customer_id.as_ref())
                .map(ToString::to_string)
        })
        .collect();
    assert_eq!(
        customers,
        [
            Some("cus_b".to_owned()),
            None,
            Some("cus_a".to_owned()),
            Some("cus_b".to_owned())
        ]
    );
    let users: Vec<Option<&UserId>> = answered
        .iter()
        .map(|found| found.as_ref().map(|a| &a.user_id))
        .collect();
    assert_eq!(users, [Some(&b), None, Some(&a), Some(&b)]);
    assert!(store.accounts(&[]).await.expect("accounts").is_empty());
}
