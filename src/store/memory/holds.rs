//! Spend control in a user's book of [`InMemoryUsageStore`](super::InMemoryUsageStore): the
//! user's holds, the period's state that limits are checked against, and granting a hold, all
//! under the shard's lock that recording takes too, so that a grant and a record never miss
//! each other.

use chrono::{DateTime, Utc};

use super::book::UserBook;
use crate::domain::{EventId, PeriodKey};
use crate::store::{Hold, HoldDecision, HoldRequest, SpendState, StoreError};

impl UserBook {
    /// The period's usage recorded and held at `now` (a hold named `except` aside), and whether a
    /// charge unpaid since `overdue_before` or earlier closes the payment gate.
    pub(super) fn spend_state(
        &self,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
        except: Option<&EventId>,
    ) -> SpendState {
        let (mut held_tokens, mut open_holds) = (0u64, 0u64);
        for hold in self.open_holds(period, now) {
            if Some(&hold.hold_id) != except {
                held_tokens = held_tokens.saturating_add(hold.tokens);
                open_holds += 1;
            }
        }
        SpendState {
            total_tokens: self.periods.get(&period).map_or(0, |p| p.summary.total_tokens),
            held_tokens,
            open_holds,
            payment_overdue: overdue_before.is_some_and(|cutoff| {
                self.periods
                    .values()
                    .any(|p| p.charges.iter().any(|c| c.status.is_unpaid() && c.created_at <= cutoff))
            }),
        }
    }

    /// The period's holds that have not expired at `now`.
    pub(super) fn open_holds(&self, period: PeriodKey, now: DateTime<Utc>) -> impl Iterator<Item = &Hold> {
        self.holds
            .iter()
            .filter(move |hold| hold.period == period && hold.expires_at > now)
    }

    /// Frees the hold the event `event_id` settles, once the event is recorded.
    pub(super) fn free_hold(&mut self, period: PeriodKey, event_id: &EventId) -> bool {
        let before = self.holds.len();
        self.holds
            .retain(|hold| !(hold.period == period && hold.hold_id == *event_id));
        self.holds.len() != before
    }

    /// Grants the hold `request` asks for, or refuses it; see the store contract.
    pub(super) fn reserve(&mut self, request: &HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        if self.events.get(request.hold_id).is_some() || self.forgotten.get(request.hold_id).is_some() {
            return Ok(HoldDecision::Settled);
        }
        // Expired holds are dropped here, where the book is written anyway.
        let now = request.now;
        self.holds.retain(|hold| hold.expires_at > now);
        if let Some(open) = self
            .holds
            .iter()
            .find(|hold| hold.period == request.period && hold.hold_id == *request.hold_id)
        {
            if open.tokens != request.tokens {
                return Err(StoreError::EventConflict {
                    event_id: request.hold_id.clone(),
                });
            }
            let hold = open.clone();
            let state = self.spend_state(request.period, now, request.overdue_before, None);
            return Ok(HoldDecision::Granted {
                hold,
                state,
                replayed: true,
            });
        }
        let state = self.spend_state(request.period, now, request.overdue_before, None);
        let decision = request.decide(state)?;
        if let HoldDecision::Granted { hold, .. } = &decision {
            self.holds.push(hold.clone());
        }
        Ok(decision)
    }
}
