//! Bounded retention in [`InMemoryUsageStore`] ([`periods_kept`]): forgetting the events of a
//! user's older periods once they take no more late usage, and remembering the ids the host
//! gave them, so that a re-send is refused rather than recorded twice.
//!
//! [`InMemoryUsageStore`]: super::InMemoryUsageStore
//! [`periods_kept`]: super::InMemoryUsageStoreBuilder::periods_kept

use chrono::{DateTime, Utc};

use super::book::{TrailItem, UserBook};
use crate::domain::{Period, PeriodKey, Plan};

/// Until when `plan` takes late usage for `period`: its end plus the plan's grace window, or
/// for ever when that is past the last instant there is.
pub(super) fn takes_usage_until(period: PeriodKey, plan: &Plan) -> DateTime<Utc> {
    crate::clock::later(Period::new(period, plan.zone()).end(), plan.late_usage_grace())
}

impl UserBook {
    /// Forgets the events (records, ids, usage audit entries) of the periods before the `kept`
    /// most recent ones, up to `newest`, that no longer take usage, so that a re-send reaching
    /// the store is always answered as the original, never recorded twice. A period takes late
    /// usage while the grace window of the plan that rates it is open (the service judges
    /// lateness by that plan); the window of `current`, the plan of the period opening, whose
    /// zone draws the periods' boundaries, is waited for as well, so that a store never forgets
    /// what a caller judging by the current plan could still send: its events are kept until
    /// both have closed.
    pub(super) fn forget_events_before(&mut self, newest: PeriodKey, kept: u32, current: &Plan, now: DateTime<Utc>) {
        // Walks back no further than the oldest period (a large `kept` costs nothing): none is
        // before a cutoff that reached it.
        let Some(oldest) = self.periods.0.first().map(|(key, _)| *key) else {
            return;
        };
        let mut cutoff = newest;
        for _ in 1..kept {
            if cutoff <= oldest {
                return;
            }
            cutoff = cutoff.previous();
        }
        let mut forgotten = Vec::new();
        for (key, book) in self.periods.before_mut(cutoff) {
            let open_for_current = takes_usage_until(key, current) > now;
            if book.consumptions.is_empty()
                || open_for_current
                || book.takes_usage_until.is_none_or(|until| until > now)
            {
                continue;
            }
            for usage in book.consumptions.drain(..) {
                self.events.remove(&usage.event_id);
                // An id the service drew can never be sent again; the host's can, in any period.
                if usage.has_host_event_id() {
                    self.forgotten.insert(usage.event_id.clone(), key);
                }
            }
            book.consumptions.shrink_to_fit();
            forgotten.push(key);
        }
        if !forgotten.is_empty() {
            self.audit
                .retain(|item| !matches!(item, TrailItem::Usage { period, .. } if forgotten.contains(period)));
        }
    }
}
