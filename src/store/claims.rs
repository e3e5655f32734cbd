//! What a claim does to the charges it takes, for the stores that decide in Rust (in memory,
//! SQLite): which charges each claim of [`UsageStore`](super::UsageStore) may take, and the
//! change and audit entries of taking one. The PostgreSQL store says the same in SQL.

use chrono::{DateTime, Utc};

use super::AuditEvent;
use crate::domain::{Charge, ChargeStatus};

/// Which charges a claim takes, and what it does to each.
pub(crate) struct ClaimKind {
    /// The status of the charges it takes.
    pub(crate) status: ChargeStatus,
    /// Whether it takes only charges whose retry is due.
    pub(crate) due_retry: bool,
    /// Changes a charge taken, and answers the audit entries of the change.
    take: fn(&mut Charge) -> Vec<AuditEvent>,
}

impl ClaimKind {
    /// Whether the claim may take `charge` at `now`: in its status, with no lease or an expired
    /// one, and due when it takes retries.
    pub(crate) fn may_take(&self, charge: &Charge, now: DateTime<Utc>) -> bool {
        charge.status == self.status
            && charge.lease_until.is_none_or(|until| until <= now)
            && (!self.due_retry || charge.next_retry_at.is_some_and(|at| at <= now))
    }

    /// Takes `charge` at `now`, leased until `lease_until`; answers the audit entries.
    pub(crate) fn take(&self, charge: &mut Charge, now: DateTime<Utc>, lease_until: DateTime<Utc>) -> Vec<AuditEvent> {
        let events = (self.take)(charge);
        charge.lease_until = Some(lease_until);
        charge.updated_at = now;
        events
    }
}

/// [`UsageStore::claim_pending`](super::UsageStore::claim_pending): one more collection attempt.
pub(crate) const CLAIM_PENDING: ClaimKind = ClaimKind {
    status: ChargeStatus::Pending,
    due_retry: false,
    take: |charge| {
        charge.attempts = charge.attempts.saturating_add(1);
        vec![AuditEvent::CollectionStarted {
            key: charge.key.clone(),
            round: charge.round,
            attempt: charge.attempts,
        }]
    },
};

/// [`UsageStore::claim_due_retries`](super::UsageStore::claim_due_retries): a failed charge back
/// to pending, in the next round.
pub(crate) const CLAIM_RETRIES: ClaimKind = ClaimKind {
    status: ChargeStatus::Failed,
    due_retry: true,
    take: |charge| {
        charge.status = ChargeStatus::Pending;
        charge.round = charge.round.saturating_add(1);
        charge.attempts = charge.attempts.saturating_add(1);
        charge.next_retry_at = None;
        vec![
            AuditEvent::ChargeStatusChanged {
                key: charge.key.clone(),
                from: ChargeStatus::Failed,
                to: ChargeStatus::Pending,
                payment_id: None,
                failure_code: None,
            },
            AuditEvent::CollectionStarted {
                key: charge.key.clone(),
                round: charge.round,
                attempt: charge.attempts,
            },
        ]
    },
};

/// [`UsageStore::claim_awaiting_customer`](super::UsageStore::claim_awaiting_customer): a lease
/// to look the payment up again, no attempt.
pub(crate) const CLAIM_AWAITING: ClaimKind = ClaimKind {
    status: ChargeStatus::RequiresAction,
    due_retry: false,
    take: |_| Vec::new(),
};
