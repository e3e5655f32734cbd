//! What the stores exchange for spend control: a hold (tokens reserved for a call in flight),
//! the request that grants one, the store's decision, and a period's spend state (usage recorded
//! and held, and whether a payment is overdue), all decided in one atomic step with the usage.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::{Ceiling, EventId, Headroom, LimitKind, MAX_TOKENS, PeriodKey, Plan, UserId};

/// Tokens reserved for a call whose size is known only at its end. It counts against the
/// period's limits until it is settled (recorded as usage under its id), released, or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The user.
    pub user_id: UserId,
    /// The hold's id: the event id its usage is recorded under when it is settled.
    pub hold_id: EventId,
    /// The period it counts in.
    pub period: PeriodKey,
    /// The tokens held.
    pub tokens: u64,
    /// When it was granted.
    pub created_at: DateTime<Utc>,
    /// When it stops counting by itself.
    pub expires_at: DateTime<Utc>,
}

/// A period's usage as spend control sees it, read in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendState {
    /// Tokens recorded in the period.
    pub total_tokens: u64,
    /// Tokens of the period's holds that have not expired.
    pub held_tokens: u64,
    /// How many such holds there are.
    pub open_holds: u64,
    /// Whether the user has a charge unpaid since before the payment gate's cut-off (only
    /// looked at when the request names one).
    pub payment_overdue: bool,
}

impl SpendState {
    /// Tokens recorded and held: what limits are checked against.
    pub fn used(&self) -> u64 {
        self.total_tokens.saturating_add(self.held_tokens)
    }

    /// How many more tokens `ceiling` allows in a period rated by `plan`.
    pub fn headroom(&self, ceiling: &Ceiling, plan: &Plan) -> Headroom {
        ceiling.headroom(plan, self.used(), self.payment_overdue)
    }
}

/// A request to hold tokens ([`UsageStore::reserve`](super::UsageStore::reserve)).
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest<'a> {
    /// The user.
    pub user_id: &'a UserId,
    /// The hold's id.
    pub hold_id: &'a EventId,
    /// The period it counts in (the current one, by the plan that rates it).
    pub period: PeriodKey,
    /// The tokens to hold.
    pub tokens: u64,
    /// Now: holds that expired by now no longer count.
    pub now: DateTime<Utc>,
    /// When the hold expires.
    pub expires_at: DateTime<Utc>,
    /// The plan that rates the period.
    pub plan: &'a Plan,
    /// The period's limits in tokens.
    pub ceiling: Ceiling,
    /// With the payment gate: charges unpaid (failed, or awaiting the customer) that were
    /// created at or before this instant close it.
    pub overdue_before: Option<DateTime<Utc>>,
}

impl HoldRequest<'_> {
    /// The decision on a new hold for a period in `state` (no hold of the request's id open,
    /// the request's id not recorded): the rule every store applies in its atomic step. A
    /// store keeps the hold of a [`HoldDecision::Granted`] it answers.
    pub(crate) fn decide(&self, state: SpendState) -> Result<HoldDecision, StoreError> {
        if let Some(limit) = state.headroom(&self.ceiling, self.plan).refuses(self.tokens) {
            return Ok(HoldDecision::Refused { limit, state });
        }
        let used = state.used();
        if used.checked_add(self.tokens).is_none_or(|t| t > MAX_TOKENS) {
            return Err(StoreError::TotalOverflow {
                total: used,
                tokens: self.tokens,
            });
        }
        Ok(HoldDecision::Granted {
            hold: Hold {
                user_id: self.user_id.clone(),
                hold_id: self.hold_id.clone(),
                period: self.period,
                tokens: self.tokens,
                created_at: self.now,
                expires_at: self.expires_at,
            },
            state: SpendState {
                held_tokens: state.held_tokens + self.tokens,
                open_holds: state.open_holds + 1,
                ..state
            },
            replayed: false,
        })
    }
}

/// What [`UsageStore::reserve`](super::UsageStore::reserve) decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldDecision {
    /// The hold is granted (or was already, for a re-sent request: `replayed`).
    Granted {
        /// The hold.
        hold: Hold,
        /// The period's state with the hold.
        state: SpendState,
        /// Whether the hold existed already, so that nothing changed.
        replayed: bool,
    },
    /// A limit refuses it; nothing changed.
    Refused {
        /// The limit that refuses.
        limit: LimitKind,
        /// The period's state.
        state: SpendState,
    },
    /// The hold id was already recorded as a usage event (the hold was settled): nothing is
    /// held.
    Settled,
}
