//! The [`UsageStore`] conformance suite: one check or more for every clause of the trait's
//! `# Contract`, each check in the file of the clauses it checks, and named after what it
//! checks. Every check is a plain async function over `&dyn UsageStore`, public here as
//! `testing::store::<check>`, that panics when the store breaks the clause its doc names;
//! [`usage_store_conformance!`](crate::usage_store_conformance) expands one `#[tokio::test]` per
//! check, named after it, so that a test runner lists a failing check by name.
//!
//! | clauses | file | what it calls |
//! |---|---|---|
//! | Recording: atomic, disjoint intervals, replays and conflicts, never recorded again, overflow, placing | `recording.rs` | `record_usage`, `recorded_event`, `place_and_record_usage` |
//! | Recording, every clause, in a batch | `batches.rs` | `record_usage_batch` |
//! | Recording: billable tokens | `classes.rs` | `record_usage`, `record_usage_batch`, `usage_by_model` |
//! | Recording: unique charge keys; Charges: settle compare-and-set, summaries agree | `charges.rs` | `ensure_charge`, `settle_charge`, `period_summary` |
//! | Charges: claims, renew_lease compare-and-set | `claims.rs` | `claim_pending`, `claim_due_retries`, `claim_awaiting_customer`, `renew_lease` |
//! | Accounts: replace_account compare-and-set | `accounts.rs` | `put_account`, `replace_account`, `account`, `accounts` |
//! | Spend control: atomic grant, expiry, replays and conflicts, settle, overflow | `holds.rs` | `reserve`, `release_hold`, `spend_state`, `holds` |
//! | Alerts: created with the event, outbox | `alerts.rs` | `record_usage`, `record_usage_batch`, `raise_alert`, `pending_alerts`, `ack_alert` |
//! | Gateway events | `gateway_events.rs` | `record_gateway_event`, `gateway_event_applied` |
//! | Compare-and-sets and replays with instants finer than a microsecond | `instants.rs` | `record_usage`, `claim_pending`, `renew_lease`, `replace_account` |
//! | Isolation | `isolation.rs` | every read, with another user's id; `append_audit` |
//! | Recording: atomic (audit entries); the original product's reports | `reports.rs` | `audit_trail`, `usage_by_operation`, `charges_by_tier` |
//!
//! The clauses are named as above in each check's doc (the contract states them as a list):
//! **Recording: atomic** is its first item, **Recording: replays and conflicts** the one on an
//! event id already recorded, **Charges: claims** the one on `claim_*`, and so on.
//!
//! Each check uses users of its own with random ids, so the suite can run against a shared
//! database without cleaning up between runs. Charges a check does not claim itself are leased
//! far into the future, so that checks claiming across all users take only their own; run the
//! checks that claim across users (`claim_pending_hands_each_charge_to_one_caller`,
//! `claim_due_retries_starts_a_new_round`, `claim_awaiting_customer_rechecks_expired_leases`)
//! one at a time when several runs share one store.
//!
//! The fixtures the checks build on ([`fresh_user`], [`base_instant`], [`usage_event`]) are
//! public, for a store's own tests.

mod accounts;
mod alerts;
mod batches;
mod charges;
mod claims;
mod classes;
mod gateway_events;
mod holds;
mod instants;
mod isolation;
mod recording;
mod reports;

pub use accounts::{
    account_round_trips, accounts_answer_each_user_in_order, concurrent_account_replacements_lose_no_change,
    replace_account_is_a_compare_and_set,
};
pub use alerts::{alerts_are_pending_until_acknowledged, each_crossed_threshold_creates_one_alert};
pub use batches::record_usage_batch_is_record_usage_in_order;
pub use charges::{
    ensure_charge_is_idempotent, existing_fee_charge_is_not_created_again, settle_is_a_compare_and_set,
    summary_agrees_with_charges,
};
pub use claims::{
    claim_awaiting_customer_rechecks_expired_leases, claim_due_retries_starts_a_new_round,
    claim_pending_hands_each_charge_to_one_caller, renew_lease_is_a_compare_and_set,
};
pub use classes::{
    billable_totals_are_exact_sums_rounded_up, concurrent_fractions_sum_exactly, usage_by_model_counts_every_event_once,
};
pub use gateway_events::gateway_events_are_recorded_once;
pub use holds::{
    concurrent_holds_never_pass_the_ceiling, expired_holds_stop_counting, recording_frees_the_hold_of_its_id,
    reserves_are_idempotent_by_hold_id, the_payment_gate_lets_no_hold_start_a_block,
};
pub use instants::instants_finer_than_a_microsecond_compare_as_sent;
pub use isolation::{audit_entries_can_be_appended, event_ids_are_scoped_per_user, reads_are_isolated_per_user};
pub use recording::{
    concurrent_records_cross_disjoint_blocks, concurrent_resends_record_once, event_id_conflict_changes_nothing,
    events_without_a_host_id_are_all_counted, overflow_changes_nothing, periods_are_separate,
    place_and_record_places_with_the_stored_account, record_creates_usage_charges_and_summary,
    record_is_idempotent_by_event_id, recorded_events_are_found_by_id, resends_in_later_periods_are_not_recorded_again,
    too_many_blocks_changes_nothing,
};
pub use reports::{audit_trail_records_every_change, reports_group_by_operation_and_tier};

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::domain::{
    ChargeKey, ChargeStatus, EventId, FeeCollection, Metadata, OperationType, PeriodKey, Plan, UsageRecord, UserId,
};
use crate::store::{RecordUsage, Recorded, Settlement, StoreError, UsageStore};

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
        detail: None,
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
            alerting: None,
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
