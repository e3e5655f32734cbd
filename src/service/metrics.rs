//! What the service reports through the [`metrics`] facade: events recorded, re-sent, refused
//! and failed, charges created and collected, how long recording and collecting take, charges
//! resumed after their lease, and duplicate payments. The library only emits; the host installs
//! the recorder it likes (`metrics-exporter-prometheus`, say). Without one, each emission is a
//! relaxed atomic load.
//!
//! The names, kinds and labels are in the README's "Metrics" table, which this file keeps to.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::domain::{Charge, ChargeKind, ChargeStatus};
use crate::error::BillingError;

const EVENTS_RECORDED: &str = "token_billing_events_recorded_total";
const EVENTS_RESENT: &str = "token_billing_events_resent_total";
const EVENTS_REFUSED: &str = "token_billing_events_refused_total";
const EVENTS_FAILED: &str = "token_billing_events_failed_total";
const RECORD_DURATION: &str = "token_billing_record_duration_seconds";
const CHARGES_CREATED: &str = "token_billing_charges_created_total";
const COLLECTIONS: &str = "token_billing_collections_total";
const COLLECTION_DURATION: &str = "token_billing_collection_duration_seconds";
const CHARGES_RESUMED: &str = "token_billing_charges_resumed_total";
const CHARGES_PAST_LEASE: &str = "token_billing_charges_past_lease";
const DUPLICATE_PAYMENTS: &str = "token_billing_duplicate_payments_total";

/// Registers the description and unit of every metric with the installed recorder, for
/// exporters that print them (Prometheus's `# HELP`). Call it once, after installing the
/// recorder; the metrics are emitted whether or not it is called.
///
/// # Example
/// ```
/// // With no recorder installed, this does nothing.
/// token_billing::describe_metrics();
/// ```
pub fn describe_metrics() {
    describe_counter!(EVENTS_RECORDED, "Usage events recorded, re-sends aside.");
    describe_counter!(
        EVENTS_RESENT,
        "Usage events sent again, answered with their original outcome."
    );
    describe_counter!(
        EVENTS_REFUSED,
        "Usage events refused on their own merits, by reason; nothing recorded."
    );
    describe_counter!(
        EVENTS_FAILED,
        "Usage events that failed for the system (store, gateway, configuration)."
    );
    describe_histogram!(
        RECORD_DURATION,
        Unit::Seconds,
        "The store's atomic step recording one event or one batch."
    );
    describe_counter!(CHARGES_CREATED, "Charges created, by kind.");
    describe_counter!(COLLECTIONS, "Collection attempts, by how they left the charge.");
    describe_histogram!(
        COLLECTION_DURATION,
        Unit::Seconds,
        "One collection attempt, gateway calls and settlement."
    );
    describe_counter!(
        CHARGES_RESUMED,
        "Pending charges taken up again after an earlier collector's lease expired."
    );
    describe_gauge!(
        CHARGES_PAST_LEASE,
        "Pending charges past their lease found by the latest resume_pending."
    );
    describe_counter!(
        DUPLICATE_PAYMENTS,
        "Second successful payments for a charge already paid: refund them."
    );
}

/// An event's outcome: recorded, re-sent, refused (by reason) or failed (by cause).
pub(super) fn event_answered<T>(result: &Result<T, BillingError>, replayed: impl FnOnce(&T) -> bool) {
    match result {
        Ok(outcome) if replayed(outcome) => counter!(EVENTS_RESENT).increment(1),
        Ok(_) => counter!(EVENTS_RECORDED).increment(1),
        Err(error) => match refusal_reason(error) {
            Some(reason) => counter!(EVENTS_REFUSED, "reason" => reason).increment(1),
            None => counter!(EVENTS_FAILED, "cause" => failure_cause(error)).increment(1),
        },
    }
}

/// `events` events failed together (a batch the store could not record), for `error`.
pub(super) fn events_failed(error: &BillingError, events: usize) {
    let events = u64::try_from(events).unwrap_or(u64::MAX);
    match refusal_reason(error) {
        Some(reason) => counter!(EVENTS_REFUSED, "reason" => reason).increment(events),
        None => counter!(EVENTS_FAILED, "cause" => failure_cause(error)).increment(events),
    }
}

/// Why an event was refused on its own merits; `None` for a failure of the system.
fn refusal_reason(error: &BillingError) -> Option<&'static str> {
    Some(match error {
        BillingError::InvalidUsage(_) | BillingError::InvalidId(_) => "invalid",
        BillingError::EventConflict { .. } => "conflict",
        BillingError::EventForgotten { .. } => "forgotten",
        BillingError::TotalOverflow { .. } => "overflow",
        BillingError::LimitExceeded { .. } => "limit",
        BillingError::UnknownPlan { .. } | BillingError::Plan(_) | BillingError::PlanChangeMidPeriod { .. } => "plan",
        BillingError::FeeCollectedByLibrary
        | BillingError::OtherCustomer { .. }
        | BillingError::NoCustomer { .. }
        | BillingError::ChargeNotFound { .. } => "account",
        BillingError::Rating(_) => "rating",
        BillingError::Store(_) | BillingError::Gateway(_) | BillingError::AccountPlanMissing { .. } => return None,
    })
}

fn failure_cause(error: &BillingError) -> &'static str {
    match error {
        BillingError::Gateway(_) => "gateway",
        BillingError::AccountPlanMissing { .. } => "configuration",
        _ => "store",
    }
}

/// The store's step for one event (`event`) or a batch (`batch`) took `elapsed`.
pub(super) fn recorded_in(call: &'static str, elapsed: Duration) {
    histogram!(RECORD_DURATION, "call" => call).record(elapsed.as_secs_f64());
}

/// Charges were created.
pub(super) fn charges_created(charges: &[Charge]) {
    for charge in charges {
        counter!(CHARGES_CREATED, "kind" => kind_label(charge.kind)).increment(1);
    }
}

fn kind_label(kind: ChargeKind) -> &'static str {
    match kind {
        ChargeKind::FixedFee => "fixed_fee",
        ChargeKind::Block => "block",
    }
}

/// A collection attempt left its charge in `status` after `elapsed`.
pub(super) fn collected(status: ChargeStatus, elapsed: Duration) {
    counter!(COLLECTIONS, "outcome" => status.as_str()).increment(1);
    histogram!(COLLECTION_DURATION).record(elapsed.as_secs_f64());
}

/// `resume_pending` took up `count` charges whose earlier collector's lease had expired.
pub(super) fn resumed_past_lease(count: usize) {
    let count = u64::try_from(count).unwrap_or(u64::MAX);
    counter!(CHARGES_RESUMED).increment(count);
    #[allow(clippy::cast_precision_loss, reason = "a count of charges, far below 2^52")]
    gauge!(CHARGES_PAST_LEASE).set(count as f64);
}

/// A second successful payment was reported for a charge already paid.
pub(super) fn duplicate_payment() {
    counter!(DUPLICATE_PAYMENTS).increment(1);
}
