//! Checks of the contract's clauses on recording one event (`record_usage`,
//! `place_and_record_usage`, `recorded_event`):
//! - **Recording: atomic**: dedupe, consumption, period total, charges, summary and audit
//!   entries, all or nothing; after an error nothing of the event is visible.
//! - **Recording: disjoint intervals**: concurrent calls for one user and period see disjoint
//!   intervals, so no block is created twice and none is skipped.
//! - **Recording: replays and conflicts**: an event id already recorded for the user changes
//!   nothing and answers the original outcome (`replayed`) for the same usage, and fails with
//!   `EventConflict` for different usage; events without a host id MAY be forgotten, never
//!   their effects.
//! - **Recording: never recorded again**: an event id the store ever accepted for the user is
//!   not recorded again, however long ago: a re-send placed in any later period is answered as
//!   a replay or refused with `EventForgotten`, changing nothing.
//! - **Recording: overflow**: a total past `MAX_TOKENS` fails with `TotalOverflow` and changes
//!   nothing.
//! - **Recording: placing**: `place_and_record_usage` records as `record_usage` does, placed
//!   with the account as stored, and records nothing of a refused event.

use chrono::{Duration, TimeZone, Utc};
use futures_util::future::join_all;
use uuid::Uuid;

use super::{base_instant, far_future, fresh_user, period, record, try_record, usage_event};
use crate::domain::{
    Charge, ChargeKey, ChargeKind, ChargeStatus, EventId, FeeCollection, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, PeriodKey,
    Plan, PlanId, RatingError, UsageRecord, UserId,
};
use crate::store::{
    Account, AuditEntry, PeriodSummary, PlacedUsage, Placement, RecordUsage, Recorded, StoreError, UsageStore,
};

/// **Recording: atomic**: recording stores the consumption, the period total, the fee and block
/// charges, and the summary.
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

/// **Recording: atomic** (after an error nothing of the event is visible): an event that would
/// start more than `MAX_BLOCKS_PER_EVENT` blocks fails and changes nothing.
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

/// **Recording: disjoint intervals**: concurrent records of one user see disjoint intervals:
/// every block from 1 to `blocks_owed` exists exactly once, and the total is the sum of the
/// events.
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

/// **Recording: disjoint intervals** (per user and period): periods keep separate totals and
/// charges.
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

/// **Recording: replays and conflicts**: the same event id with the same usage changes nothing
/// and answers the original outcome.
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

/// **Recording: replays and conflicts**: an event id re-used with different usage fails with
/// `EventConflict` and changes nothing.
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

/// **Recording: replays and conflicts**: `recorded_event` answers a recorded event as a replay
/// (its original outcome), and `None` for others.
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

/// **Recording: replays and conflicts**, under concurrency: concurrent records of one event id
/// record it once; the others are replays.
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

/// **Recording: replays and conflicts** (what a store MAY forget): events the host gave no id for
/// (their event id stands in as the consumption id) are all counted, whatever a store keeps of
/// them: totals, the by-operation report and each block's charge, once. A store may forget such
/// events (they cannot be re-sent), never their effects.
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

/// **Recording: never recorded again**: an event id the store ever accepted for the user is not
/// recorded again, however long ago. An event sent without `occurred_at` is placed when it
/// arrives, so its re-send can come in any later period: here the same event, recorded in
/// November 2026, is sent again, unchanged, in December (before and after other usage opened
/// it) and in April 2027 (after usage opened it, when a store that bounds its memory may have
/// forgotten November's events), each time through `record_usage`, `record_usage_batch` and
/// `place_and_record_usage`. Each re-send MUST be answered as a replay of the original
/// (`replayed`, the original's consumption id, period and total) or refused with
/// `EventForgotten` naming the original's id and period, and MUST change nothing: the later
/// period's summary, charges, events and audit trail, and November's, stay as they were.
pub async fn resends_in_later_periods_are_not_recorded_again(store: &dyn UsageStore) {
    const CLAUSE: &str = "Recording: never recorded again (an event id the store ever accepted for the user MUST NOT \
                          be recorded again, however long ago)";
    let plan = Plan::default();
    let user = fresh_user("resent-later");
    let event = usage_event(&user, 9_000_000, "chat", period());
    let original = record(store, &plan, event.clone()).await;
    assert!(!original.replayed);

    let december = period().next();
    let april = PeriodKey::new(2027, 4).expect("a valid period");
    let in_december = Utc
        .with_ymd_and_hms(2026, 12, 10, 12, 0, 0)
        .single()
        .expect("a valid instant");
    let in_april = Utc
        .with_ymd_and_hms(2027, 4, 10, 12, 0, 0)
        .single()
        .expect("a valid instant");
    // Each time: the period the re-send is placed in, when it arrives, and whether other usage
    // opened that period first.
    for (later, at, opened_first) in [
        (december, in_december, false),
        (december, in_december + Duration::hours(1), true),
        (april, in_april, true),
    ] {
        if opened_first {
            let mut other = usage_event(&user, 1_000, "chat", later);
            other.recorded_at = at - Duration::minutes(1);
            other.occurred_at = other.recorded_at;
            record(store, &plan, other).await;
        }
        for via in [Via::Record, Via::Batch, Via::PlaceAndRecord] {
            let (november, before) = (
                period_state(store, &user, period()).await,
                period_state(store, &user, later).await,
            );
            let mut resent = event.clone();
            // A new call, as the service makes it: a new consumption id, placed on arrival.
            resent.consumption_id = Uuid::new_v4();
            resent.period = later;
            resent.recorded_at = at;
            resent.occurred_at = at;
            let answer = via.record(store, &plan, resent).await;
            let what = format!(
                "{} of {} (recorded in {}) sent again in {later}",
                via.name(),
                event.event_id,
                period()
            );
            match answer {
                Ok(replay) => {
                    assert!(replay.replayed, "{CLAUSE}: {what} was recorded again: {replay:?}");
                    assert_eq!(
                        (
                            replay.usage.consumption_id,
                            replay.usage.period,
                            replay.total_before,
                            replay.total_after
                        ),
                        (
                            original.usage.consumption_id,
                            original.usage.period,
                            original.total_before,
                            original.total_after
                        ),
                        "{CLAUSE}: {what} was not answered with the original's outcome"
                    );
                }
                Err(StoreError::EventForgotten {
                    event_id,
                    period: recorded_in,
                }) => {
                    assert_eq!(
                        (&event_id, recorded_in),
                        (&event.event_id, period()),
                        "{CLAUSE}: {what} was refused as forgotten with another id or period"
                    );
                }
                Err(error) => {
                    panic!("{CLAUSE}: {what} must be answered as a replay or refused with EventForgotten: {error:?}")
                }
            }
            assert_eq!(
                period_state(store, &user, later).await,
                before,
                "{CLAUSE}: {what} changed {later}"
            );
            assert_eq!(
                period_state(store, &user, period()).await,
                november,
                "{CLAUSE}: {what} changed {}",
                period()
            );
        }
    }
}

/// A store's entry points for recording an event.
#[derive(Debug, Clone, Copy)]
enum Via {
    Record,
    Batch,
    PlaceAndRecord,
}

impl Via {
    /// The entry point's method.
    fn name(self) -> &'static str {
        match self {
            Via::Record => "record_usage",
            Via::Batch => "record_usage_batch",
            Via::PlaceAndRecord => "place_and_record_usage",
        }
    }

    /// Records `usage` under `plan` through this entry point, as `record_usage` answers.
    async fn record(self, store: &dyn UsageStore, plan: &Plan, usage: UsageRecord) -> Result<Recorded, StoreError> {
        match self {
            Via::Record => try_record(store, plan, usage, None).await,
            Via::Batch => {
                let mut answers = store
                    .record_usage_batch(vec![RecordUsage {
                        usage,
                        plan,
                        fee: FeeCollection::Library,
                        lease_until: None,
                        alerting: None,
                        account: None,
                    }])
                    .await
                    .expect("record_usage_batch");
                assert_eq!(answers.len(), 1, "one answer per event of the batch");
                answers.remove(0)
            }
            Via::PlaceAndRecord => {
                let placed = store
                    .place_and_record_usage(usage, &mut |_, _| {
                        Some(Placement {
                            plan,
                            fee: FeeCollection::Library,
                            lease_until: None,
                            alerting: None,
                        })
                    })
                    .await?;
                match placed {
                    PlacedUsage::Recorded { recorded, .. } => Ok(recorded),
                    PlacedUsage::Refused { .. } => {
                        panic!("Recording: placing: an event its placer placed was answered refused: {placed:?}")
                    }
                }
            }
        }
    }
}

/// What a store shows of a user's period: its summary, charges, events and audit trail.
async fn period_state(
    store: &dyn UsageStore,
    user: &UserId,
    period: PeriodKey,
) -> (Option<PeriodSummary>, Vec<Charge>, Vec<UsageRecord>, Vec<AuditEntry>) {
    (
        store.period_summary(user, period).await.expect("period_summary"),
        store.charges(user, period).await.expect("charges"),
        store.consumptions(user, period).await.expect("consumptions"),
        store.audit_trail(user, Some(period)).await.expect("audit_trail"),
    )
}

/// **Recording: overflow**: a total above `MAX_TOKENS` fails with `TotalOverflow` and changes
/// nothing.
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

/// **Recording: placing**: `place_and_record_usage` places each event with the account as stored
/// when it is placed (none for a user without one), records it under the placement, answers the
/// account when the event created charges, and records nothing of a refused event, which it gives
/// back as the placer left it.
pub async fn place_and_record_places_with_the_stored_account(store: &dyn UsageStore) {
    let plan = Plan::default();
    let user = fresh_user("placed");
    let lease = Some(far_future());
    let placement = |lease_until| Placement {
        plan: &plan,
        fee: FeeCollection::Library,
        lease_until,
        alerting: None,
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
        limits: None,
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
