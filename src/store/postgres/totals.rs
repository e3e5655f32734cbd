//! The period totals this process last wrote, so that an optimistic batch (a round of the group
//! commit, most often) skips reading them: its write is a compare-and-set on each period row's
//! total, so a total another process moved since makes the write give itself up, and the batch
//! reads the totals afresh. A hint, never a source of truth: whatever it holds, nothing is
//! recorded against a total that is not the stored one.

use std::sync::Mutex;

use crate::domain::{BillableTotal, Currency, PeriodKey, UserId};

/// The most periods kept; when full, all are forgotten (the next batches read them again).
const CAPACITY: usize = 65_536;

/// A period's total as last written by this process, and its currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SeenTotal {
    pub(super) total: BillableTotal,
    pub(super) currency: Currency,
}

/// The period totals last written, by user and period (shared by a store's clones).
#[derive(Debug, Default)]
pub(super) struct TotalsSeen {
    seen: Mutex<foldhash::HashMap<(UserId, PeriodKey), SeenTotal>>,
}

impl TotalsSeen {
    /// The total last written for `group`, if this process knows it.
    pub(super) fn get(&self, group: &(UserId, PeriodKey)) -> Option<SeenTotal> {
        self.lock().get(group).cloned()
    }

    /// Keeps the totals a committed write left.
    pub(super) fn written(&self, totals: impl IntoIterator<Item = ((UserId, PeriodKey), SeenTotal)>) {
        let mut seen = self.lock();
        for (group, total) in totals {
            if seen.len() >= CAPACITY && !seen.contains_key(&group) {
                seen.clear();
            }
            seen.insert(group, total);
        }
    }

    /// Moves a kept total by a single event recorded by whole tokens from `before` to
    /// `after`: kept only if it was `before` (else it is forgotten, and read again when needed).
    pub(super) fn moved(&self, group: (UserId, PeriodKey), before: u64, after: u64, whole: bool) {
        let mut seen = self.lock();
        match seen.get_mut(&group) {
            Some(kept) if whole && kept.total.tokens == before => kept.total.tokens = after,
            Some(_) => {
                seen.remove(&group);
            }
            None => {}
        }
    }

    /// Forgets `groups`' totals, found out of date.
    pub(super) fn forget<'a>(&self, groups: impl IntoIterator<Item = &'a (UserId, PeriodKey)>) {
        let mut seen = self.lock();
        for group in groups {
            seen.remove(group);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<(UserId, PeriodKey), SeenTotal>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(user: &str) -> (UserId, PeriodKey) {
        (
            UserId::new(user).expect("a user id"),
            "2026-11".parse().expect("a period"),
        )
    }

    fn seen(tokens: u64) -> SeenTotal {
        SeenTotal {
            total: BillableTotal {
                tokens,
                credit_micros: 0,
            },
            currency: Currency::BRL,
        }
    }

    #[test]
    fn a_single_event_moves_a_kept_total_only_from_where_it_was() {
        let totals = TotalsSeen::default();
        totals.written([(group("a"), seen(100)), (group("b"), seen(100))]);
        totals.moved(group("a"), 100, 150, true);
        assert_eq!(totals.get(&group("a")), Some(seen(150)));
        // Another writer moved b meanwhile: the kept total is no longer known.
        totals.moved(group("b"), 120, 170, true);
        assert_eq!(totals.get(&group("b")), None);
        // A fraction of a token moves the rounding credit, which a single event's answer does
        // not tell.
        totals.moved(group("a"), 150, 151, false);
        assert_eq!(totals.get(&group("a")), None);
    }

    #[test]
    fn forgotten_totals_are_read_again() {
        let totals = TotalsSeen::default();
        totals.written([(group("a"), seen(100))]);
        totals.forget([&group("a")]);
        assert_eq!(totals.get(&group("a")), None);
    }
}
