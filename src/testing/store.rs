//! The [`UsageStore`] conformance suite: the contract of the trait, one check per function.
//!
//! Each check uses users of its own with random ids, so the suite can run against a shared
//! database without cleaning up between runs. Charges a check does not claim itself are leased
//! far into the future, so that checks claiming across all users take only their own; run the
//! checks that claim across users (`claim_pending_hands_each_charge_to_one_caller`,
//! `claim_due_retries_starts_a_new_round`, `claim_awaiting_customer_rechecks_expired_leases`)
//! one at a time when several runs share one store.

use chrono::{DateTime, Duration, TimeZone, Utc};
use futures_util::future::join_all;
use uuid::Uuid;

use crate::domain::{
    ChargeKey, ChargeKind, ChargeStatus, EventId, FeeCollection, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, Metadata, NewCharge,
    OperationType, PeriodKey, Plan, PlanId, RatingError, UsageRecord, UserId,
};
use crate::store::{
    Account, AuditEntry, AuditEvent, EnsureCharge, GatewayEventRecord, PlacedUsage, Placement, RecordUsage, Recorded,
    Settlement, StoreError, UsageStore,
};

/// A user id no other check or run uses.
pub fn fresh_user(tag: &str) -> UserId {
    let id = Uuid::new_v4().simple().to_string();
    UserId::new(format!("conf-{tag}-{}", &id[..12])).expect("a valid user id")
}

/// The instant the checks run at: mid-November 2026.
pub fn base_instant() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 15, 12, 0, 0)
        .single()
        .expect("a valid instant")
}

fn period() -> PeriodKey {
    PeriodKey::new(2026, 11).expect("a valid period")
}

/// A usage event of `tokens` for `user` in `period`, with a fresh event id.
pub fn usage_event(user: &UserId, tokens: u64, operation: &str, period: PeriodKey) -> UsageRecord {
    let consumption_id = Uuid::new_v4();
    UsageRecord {
        consumption_id,
        // The host's own event id: an event it may send again.
        event_id: EventId::new(format!("ev-{consumption_id}")).expect("a valid event id"),
        user_id: user.clone(),
        period,
        tokens,
        operation_type: OperationType::new(operation).expect("a valid operation type"),
        client_id: None,
        metadata: Metadata::from([("conversationId".to_owned(), "conv-123".to_owned())]),
        occurred_at: base_instant(),
        occurred_at_reported: false,
        recorded_at: base_instant(),
    }
}

/// Far enough ahead that no check's claim takes a charge leased until then.
fn far_future() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2999, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid instant")
}

/// Records `usage` under `plan` with the library collecting the fixed fee, leasing the charges
/// created until `lease_until`.
async fn try_record(
    store: &dyn UsageStore,
    plan: &Plan,
    usage: UsageRecord,
    lease_until: Option<DateTime<Utc>>,
) -> Result<Recorded, StoreError> {
    store
        .record_usage(RecordUsage {
            usage,
            plan,
            fee: FeeCollection::Library,
            lease_until,
            account: None,
        })
        .await
}

async fn record(store: &dyn UsageStore, plan: &Plan, usage: UsageRecord) -> Recorded {
    try_record(store, plan, usage, Some(far_future()))
        .await
        .expect("record_usage")
}

fn settlement<'a>(
    user: &'a UserId,
    key: &'a ChargeKey,
    expected: ChargeStatus,
    round: u32,
    to: ChargeStatus,
) -> Settlement<'a> {
    Settlement {
        user_id: user,
        key,
        expected_status: expected,
        expected_round: round,
        status: to,
        payment_id: Some(format!("pay_{}", Uuid::new_v4().simple())),
        failure_code: (to == ChargeStatus::Failed).then(|| "card_declined".to_owned()),
        failure_message: None,
        next_retry_at: (to == ChargeStatus::Failed).then(far_future),
        lease_until: None,
        at: base_instant(),
    }
}

/// Accounts are stored and read back whole.
pub async fn account_round_trips(store: &dyn UsageStore) {
    let user = fresh_user("account");
    assert_eq!(store.account(&user).await.expect("account"), None);
    let account = Account {
        user_id: user.clone(),
        customer_id: Some("cus_123".parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: vec![(period(), PlanId::new("starter").expect("valid"))],
        subscription_id: None,
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

/// `replace_account` saves an account only over the one expected, and changes nothing otherwise.
pub async fn replace_account_is_a_compare_and_set(store: &dyn UsageStore) {
    let user = fresh_user("replace");
    let first = Account {
        user_id: user.clone(),
        customer_id: None,
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
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

/// Concurrent `replace_account` calls, each redoing its change on the account as it is when it
/// loses, lose no change.
pub async fn concurrent_account_replacements_lose_no_change(store: &dyn UsageStore) {
    let user = fresh_user("replacements");
    let account = Account {
        user_id: user.clone(),
        customer_id: Some("cus_0".parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
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

/// `place_and_record_usage` places each event with the account as stored when it is placed (none
/// for a user without one), records it under the placement, answers the account when the event
/// created charges, and records nothing of a refused event, which it gives back as the placer
/// left it.
pub async fn place_and_record_places_with_the_stored_account(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("placed");
    let lease = Some(far_future());
    let placement = |lease_until| Placement {
        plan: &plan,
        fee: FeeCollection::Library,
        lease_until,
    };
    // Places every event with `placement` and says which account it was placed with.
    async fn place<'p>(
        store: &dyn UsageStore,
        usage: UsageRecord,
        placement: Option<Placement<'p>>,
    ) -> (PlacedUsage<'p>, Vec<Option<Account>>) {
        let mut seen = Vec::new();
        let placed = store
            .place_and_record_usage(usage, &mut |_, account| {
                seen.push(account.cloned());
                placement
            })
            .await
            .expect("place_and_record_usage");
        (placed, seen)
    }

    // A user without an account: placed with none, recorded under the placement, charges leased.
    let first = usage_event(&user, 8_000_001, "chat", period());
    let (placed, seen) = place(store, first.clone(), Some(placement(lease))).await;
    assert_eq!(seen, [None]);
    let PlacedUsage::Recorded {
        recorded,
        placement: used,
        account,
    } = placed
    else {
        panic!("recorded: {placed:?}");
    };
    assert_eq!(
        (recorded.total_after, recorded.replayed, account),
        (8_000_001, false, None)
    );
    assert_eq!(used.lease_until, lease);
    assert_eq!(recorded.charges.len(), 2);
    assert!(
        recorded
            .charges
            .iter()
            .all(|c| c.lease_until == lease && c.attempts == 1)
    );

    // With an account: placed with it as stored; answered with it only when charges are created.
    let account = Account {
        user_id: user.clone(),
        customer_id: Some("cus_placed".parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    store.put_account(account.clone()).await.expect("put_account");
    let (placed, seen) = place(store, usage_event(&user, 100, "chat", period()), Some(placement(None))).await;
    assert_eq!(seen, [Some(account.clone())]);
    assert!(matches!(placed, PlacedUsage::Recorded { ref recorded, account: None, .. } if recorded.charges.is_empty()));

    // A changed account is the one the next event is placed with.
    let changed = Account {
        customer_id: Some("cus_changed".parse().expect("valid")),
        updated_at: base_instant() + Duration::minutes(1),
        ..account
    };
    store.put_account(changed.clone()).await.expect("put_account");
    let (placed, seen) = place(
        store,
        usage_event(&user, 8_000_000, "chat", period()),
        Some(placement(None)),
    )
    .await;
    assert_eq!(seen.last(), Some(&Some(changed.clone())));
    let PlacedUsage::Recorded { recorded, account, .. } = placed else {
        panic!("recorded: {placed:?}");
    };
    assert_eq!((recorded.total_after, recorded.charges.len()), (16_000_101, 1));
    assert_eq!(account.as_deref(), Some(&changed));

    // Refused: nothing recorded, the event given back as the placer left it.
    let refused = usage_event(&user, 5_000_000, "chat", period());
    let mut moved = refused.clone();
    moved.period = period().next();
    let placed = store
        .place_and_record_usage(refused.clone(), &mut |usage, _| {
            usage.period = period().next();
            None
        })
        .await
        .expect("place_and_record_usage");
    let PlacedUsage::Refused { usage, account } = placed else {
        panic!("refused: {placed:?}");
    };
    assert_eq!((*usage, account.as_deref()), (moved, Some(&changed)));
    assert_eq!(
        store.recorded_event(&user, &refused.event_id).await.expect("lookup"),
        None
    );
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (16_000_101, 3));
    assert_eq!(
        store.period_summary(&user, period().next()).await.expect("summary"),
        None
    );

    // A re-sent event is answered with its original outcome.
    let (placed, _) = place(store, first.clone(), Some(placement(None))).await;
    let PlacedUsage::Recorded { recorded, .. } = placed else {
        panic!("replayed: {placed:?}");
    };
    assert!(recorded.replayed);
    assert_eq!(
        (recorded.usage.consumption_id, recorded.total_after),
        (first.consumption_id, 8_000_001)
    );
}

/// `accounts` answers one entry per user asked, in the order asked (repeats included), `None`
/// for a user without an account, and nothing of users not asked.
pub async fn accounts_answer_each_user_in_order(store: &dyn UsageStore) {
    let account = |user: &UserId, customer: &str| Account {
        user_id: user.clone(),
        customer_id: Some(customer.parse().expect("valid")),
        plan_id: PlanId::new("default").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
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

/// Events the host gave no id for (their event id stands in as the consumption id) are all
/// counted, whatever a store keeps of them: totals, the by-operation report and each block's
/// charge, once. A store may forget such events (they cannot be re-sent), never their effects.
pub async fn events_without_a_host_id_are_all_counted(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("anonymous");
    let mut total = 0;
    for tokens in [5_000_000, 4_000_000, 9_000_000] {
        let mut usage = usage_event(&user, tokens, "chat", period());
        usage.event_id = EventId::of_consumption(usage.consumption_id);
        assert!(!usage.has_host_event_id());
        let recorded = record(store, &plan, usage).await;
        assert!(!recorded.replayed);
        assert_eq!((recorded.total_before, recorded.total_after), (total, total + tokens));
        total += tokens;
    }
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (18_000_000, 3));
    let by_operation = store.usage_by_operation(&user, period()).await.expect("report");
    assert_eq!(
        by_operation
            .iter()
            .map(|r| (r.operation_type.as_str(), r.total_tokens, r.operations))
            .collect::<Vec<_>>(),
        [("chat", 18_000_000, 3)]
    );
    let charges = store.charges(&user, period()).await.expect("charges");
    assert_eq!(charges.iter().map(|c| c.block).collect::<Vec<_>>(), [0, 1, 2]);
}

/// Recording stores the consumption, the period total, the fee and block charges, and the summary.
pub async fn record_creates_usage_charges_and_summary(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("record");
    let first = record(store, &plan, usage_event(&user, 1_000_000, "chat", period())).await;
    assert_eq!(
        (first.total_before, first.total_after, first.replayed),
        (0, 1_000_000, false)
    );
    assert_eq!(
        first.charges.len(),
        1,
        "the first usage opens the period: the fixed fee"
    );
    assert_eq!(first.charges[0].kind, ChargeKind::FixedFee);
    assert_eq!(first.charges[0].billing_tier, "0-8M");
    assert_eq!(first.charges[0].amount, plan.fixed_fee());
    assert_eq!(first.charges[0].status, ChargeStatus::Pending);

    let second = record(store, &plan, usage_event(&user, 9_000_000, "chat", period())).await;
    assert_eq!((second.total_before, second.total_after), (1_000_000, 10_000_000));
    assert_eq!(second.charges.len(), 1);
    let block = &second.charges[0];
    assert_eq!(
        (block.kind, block.block, block.billing_tier.as_str()),
        (ChargeKind::Block, 1, "8M-16M")
    );
    assert_eq!(block.key, ChargeKey::new(&user, period(), ChargeKind::Block, 1));
    assert_eq!(block.amount.minor_units(), 10_000);
    assert_eq!(block.consumption_id, Some(second.usage.consumption_id));

    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (10_000_000, 2));
    assert_eq!(
        (summary.outstanding_count, summary.outstanding_total.minor_units()),
        (2, 50_000)
    );
    assert_eq!(summary.fixed_fee_charged.minor_units(), 0);
    assert_eq!(summary.tier_charges_count, 0);
    let consumptions = store.consumptions(&user, period()).await.expect("consumptions");
    assert_eq!(consumptions, vec![(*first.usage).clone(), (*second.usage).clone()]);
    let charges = store.charges(&user, period()).await.expect("charges");
    assert_eq!(charges.iter().map(|c| c.block).collect::<Vec<_>>(), [0, 1]);
}

/// The same event id with the same usage changes nothing and answers the original outcome.
pub async fn record_is_idempotent_by_event_id(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("dedupe");
    let usage = usage_event(&user, 10_000_000, "chat", period());
    let original = record(store, &plan, usage.clone()).await;
    let mut resent = usage.clone();
    resent.consumption_id = Uuid::new_v4();
    resent.recorded_at = base_instant() + Duration::seconds(3);
    resent.occurred_at = resent.recorded_at;
    let replay = record(store, &plan, resent).await;
    assert!(replay.replayed);
    assert_eq!(replay.usage, original.usage);
    assert_eq!((replay.total_before, replay.total_after), (0, 10_000_000));
    assert_eq!(
        replay.charges.iter().map(|c| &c.key).collect::<Vec<_>>(),
        original.charges.iter().map(|c| &c.key).collect::<Vec<_>>()
    );
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (10_000_000, 1));
    assert_eq!(
        store.consumptions(&user, period()).await.expect("consumptions").len(),
        1
    );
    assert_eq!(store.charges(&user, period()).await.expect("charges").len(), 2);
}

/// A batch records its events in order, as one at a time would: totals, blocks (each once),
/// re-sends of events recorded before or earlier in the batch, and events refused on their own
/// (a conflict, an overflow) without stopping the others.
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
            account: None,
        }])
        .await
        .expect("the batch");
    assert!(matches!(refused[0], Err(StoreError::TotalOverflow { .. })));
    assert_eq!(store.period_summary(&cid, period()).await.expect("summary"), None);
    // An empty batch is nothing.
    assert!(store.record_usage_batch(Vec::new()).await.expect("empty").is_empty());
}

/// An event id re-used with different usage fails and changes nothing.
pub async fn event_id_conflict_changes_nothing(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("conflict");
    let usage = usage_event(&user, 1_000, "chat", period());
    record(store, &plan, usage.clone()).await;
    let mut different = usage.clone();
    different.tokens = 9_000_000;
    let error = try_record(store, &plan, different, None)
        .await
        .expect_err("a conflicting event id must fail");
    assert!(
        matches!(error, StoreError::EventConflict { ref event_id } if *event_id == usage.event_id),
        "{error:?}"
    );
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (1_000, 1));
    assert_eq!(store.charges(&user, period()).await.expect("charges").len(), 1);
}

/// Event ids are unique per user: two users may use the same one.
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

/// A total above `MAX_TOKENS` fails with `TotalOverflow` and changes nothing.
pub async fn overflow_changes_nothing(store: &dyn UsageStore) {
    let plan = Plan::builder()
        .included_tokens(0)
        .block_size(MAX_TOKENS / 4)
        .build()
        .expect("a valid plan");
    let user = fresh_user("overflow");
    record(store, &plan, usage_event(&user, MAX_TOKENS - 5, "chat", period())).await;
    let charges_before = store.charges(&user, period()).await.expect("charges");
    let error = try_record(store, &plan, usage_event(&user, 6, "chat", period()), None)
        .await
        .expect_err("overflow must fail");
    assert!(
        matches!(error, StoreError::TotalOverflow { total, tokens: 6 } if total == MAX_TOKENS - 5),
        "{error:?}"
    );
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (MAX_TOKENS - 5, 1));
    assert_eq!(store.charges(&user, period()).await.expect("charges"), charges_before);
    let last = record(store, &plan, usage_event(&user, 5, "chat", period())).await;
    assert_eq!(last.total_after, MAX_TOKENS);
}

/// Concurrent records of one user see disjoint intervals: every block from 1 to `blocks_owed`
/// exists exactly once, and the total is the sum of the events.
pub async fn concurrent_records_cross_disjoint_blocks(store: &dyn UsageStore) {
    let plan = Plan::builder()
        .included_tokens(1_000)
        .block_size(1_000)
        .build()
        .expect("a valid plan");
    let user = fresh_user("race");
    let sizes: Vec<u64> = (0..120).map(|i| 137 + (i * 7919) % 2_500).collect();
    let total: u64 = sizes.iter().sum();
    let results = join_all(sizes.iter().map(|&tokens| {
        let usage = usage_event(&user, tokens, "chat", period());
        let plan = &plan;
        async move { try_record(store, plan, usage, None).await }
    }))
    .await;
    let mut intervals: Vec<(u64, u64)> = results
        .into_iter()
        .map(|r| r.expect("record_usage"))
        .map(|r| (r.total_before, r.total_after))
        .collect();
    intervals.sort_unstable();
    let mut expected_start = 0;
    for (before, after) in &intervals {
        assert_eq!(*before, expected_start, "intervals must tile [0, total]");
        expected_start = *after;
    }
    assert_eq!(expected_start, total);
    let charges = store.charges(&user, period()).await.expect("charges");
    let mut blocks: Vec<u64> = charges
        .iter()
        .filter(|c| c.kind == ChargeKind::Block)
        .map(|c| c.block)
        .collect();
    blocks.sort_unstable();
    assert_eq!(blocks, (1..=plan.blocks_owed(total)).collect::<Vec<_>>());
    assert_eq!(charges.iter().filter(|c| c.kind == ChargeKind::FixedFee).count(), 1);
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (total, 120));
}

/// An event that would start more than `MAX_BLOCKS_PER_EVENT` blocks fails and changes nothing.
pub async fn too_many_blocks_changes_nothing(store: &dyn UsageStore) {
    let plan = Plan::builder()
        .included_tokens(0)
        .block_size(1)
        .build()
        .expect("a valid plan");
    let user = fresh_user("blocks");
    let error = try_record(
        store,
        &plan,
        usage_event(&user, MAX_BLOCKS_PER_EVENT + 1, "chat", period()),
        None,
    )
    .await
    .expect_err("too many blocks must fail");
    assert!(
        matches!(error, StoreError::Rating(RatingError::TooManyBlocks { .. })),
        "{error:?}"
    );
    assert_eq!(store.period_summary(&user, period()).await.expect("summary"), None);
    assert!(
        store
            .consumptions(&user, period())
            .await
            .expect("consumptions")
            .is_empty()
    );
    assert!(store.audit_trail(&user, None).await.expect("audit").is_empty());
    let ok = record(store, &plan, usage_event(&user, MAX_BLOCKS_PER_EVENT, "chat", period())).await;
    assert_eq!(
        ok.charges.len() as u64,
        MAX_BLOCKS_PER_EVENT + 1,
        "the fee and every block"
    );
}

/// Periods keep separate totals and charges.
pub async fn periods_are_separate(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("periods");
    let december = period().next();
    record(store, &plan, usage_event(&user, 9_000_000, "chat", period())).await;
    let next = record(store, &plan, usage_event(&user, 9_000_000, "chat", december)).await;
    assert_eq!((next.total_before, next.total_after), (0, 9_000_000));
    assert_eq!(next.charges.len(), 2, "a new period has its own fee and blocks");
    assert!(next.charges.iter().all(|c| c.period == december));
    for p in [period(), december] {
        let s = store
            .period_summary(&user, p)
            .await
            .expect("summary")
            .expect("a summary");
        assert_eq!(s.total_tokens, 9_000_000);
    }
}

/// A period opened ahead of usage keeps its one fee charge when usage arrives.
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

/// `ensure_charge` creates a charge once; later calls return the stored one.
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

/// `settle_charge` is a compare-and-set on status and round, and refuses forbidden transitions.
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

/// The summary's collected and outstanding figures follow every status change.
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

/// Pending charges are handed to one caller at a time, and again once the lease expires.
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

/// A failed charge whose retry is due becomes pending in the next round, leased to one claimer:
/// concurrent claims never start two rounds.
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

/// Charges awaiting the customer are leased for a recheck once their lease has expired, to one
/// claimer at a time, without counting an attempt.
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

/// `renew_lease` extends only the lease the caller holds.
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

/// `recorded_event` answers a recorded event as a replay, and `None` for others.
pub async fn recorded_events_are_found_by_id(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("lookup");
    let usage = usage_event(&user, 9_000_000, "chat", period());
    let original = record(store, &plan, usage.clone()).await;
    let found = store
        .recorded_event(&user, &usage.event_id)
        .await
        .expect("lookup")
        .expect("recorded");
    assert!(found.replayed);
    assert_eq!((found.usage, found.total_after), (original.usage, original.total_after));
    assert_eq!(found.charges.len(), 2);
    assert_eq!(
        store
            .recorded_event(&fresh_user("other"), &usage.event_id)
            .await
            .expect("lookup"),
        None
    );
}

/// Concurrent records of one event id record it once; the others are replays.
pub async fn concurrent_resends_record_once(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("resend");
    let usage = usage_event(&user, 9_000_000, "chat", period());
    let results = join_all((0..6).map(|_| {
        let usage = usage.clone();
        let plan = &plan;
        async move { try_record(store, plan, usage, Some(far_future())).await }
    }))
    .await;
    let recorded: Vec<Recorded> = results.into_iter().map(|r| r.expect("record_usage")).collect();
    assert_eq!(recorded.iter().filter(|r| !r.replayed).count(), 1, "recorded once");
    assert!(recorded.iter().all(|r| r.total_after == 9_000_000));
    let summary = store
        .period_summary(&user, period())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!((summary.total_tokens, summary.events), (9_000_000, 1));
}

/// `append_audit` adds to the named user's trail only.
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

/// A gateway event is recorded once per user, with one audit entry, and found afterwards;
/// concurrent recordings of one event record it once.
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

/// The seed's two monitoring reports: usage by operation type and charges by tier.
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

/// Reads name one user and return only that user's rows.
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

/// Every consumption, charge creation, collection start and status change is in the audit trail.
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
