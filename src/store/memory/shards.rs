//! The shards of [`InMemoryUsageStore`]: users spread over mutexes by a hash of their id, the
//! locking of one (which takes over a poisoned lock), the indexes of charges to collect that
//! each shard keeps (pending, due for a retry, awaiting the customer), and the walk over them
//! that every claim makes.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};

use super::InMemoryUsageStore;
use super::book::{TrailItem, UserBook};
use crate::domain::{Charge, ChargeKey, ChargeStatus, UserId};
use crate::store::id_map::IdMap;
use crate::store::{AuditEntry, AuditEvent, Recorded, shard_index};

#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) users: IdMap<UserId, UserBook>,
    /// Pending charges, oldest first, to find the ones to resume without visiting every user.
    pub(super) pending: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
    /// Failed charges with a retry scheduled, soonest first.
    pub(super) retries: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
    /// Charges awaiting the customer's authentication, oldest first.
    pub(super) awaiting: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
}

impl InMemoryUsageStore {
    pub(super) fn shard_of(&self, user: &UserId) -> &Mutex<Shard> {
        &self.shards[shard_index(&self.shard_hasher, user, self.shards.len())]
    }

    pub(super) fn shard(&self, user: &UserId) -> MutexGuard<'_, Shard> {
        lock(self.shard_of(user))
    }
}

/// A poisoned shard only means a thread panicked while holding it; every write of the store
/// validates before it mutates, so the data is consistent and the lock can be taken over.
pub(super) fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The claim operations' one mechanism: walks `shards`, offers each charge that `candidates`
/// draws from a shard's index to `claim`, and keeps those it takes, until `limit` are taken.
/// `claim` changes the charge and returns the audit events of the change, or `None` to pass it
/// over. Each shard is locked while it is walked, so a charge is claimed by one caller at a time.
pub(super) fn claim_from<'a>(
    shards: impl IntoIterator<Item = &'a Mutex<Shard>>,
    limit: usize,
    candidates: impl Fn(&Shard) -> Vec<(UserId, ChargeKey)>,
    mut claim: impl FnMut(&mut Charge) -> Option<Vec<AuditEvent>>,
) -> Vec<Charge> {
    let mut claimed = Vec::new();
    for shard in shards {
        if claimed.len() >= limit {
            break;
        }
        let mut shard = lock(shard);
        let shard = &mut *shard;
        for (user_id, key) in candidates(shard) {
            if claimed.len() >= limit {
                break;
            }
            let Some(book) = shard.users.get_mut(&user_id) else {
                continue;
            };
            let Some(charge) = book.charge_mut(&key) else {
                continue;
            };
            let previous = (charge.status, charge.next_retry_at);
            let Some(events) = claim(charge) else {
                continue;
            };
            let charge = charge.clone();
            for event in events {
                book.audit.push(TrailItem::Entry(Box::new(AuditEntry {
                    at: charge.updated_at,
                    user_id: user_id.clone(),
                    period: Some(charge.period),
                    event,
                })));
            }
            shard.index_charge(&charge, Some(previous));
            claimed.push(charge);
        }
    }
    claimed
}

impl Shard {
    /// Indexes the charges an event created (a replay created none: its charges are indexed
    /// as they are).
    pub(super) fn index_recorded(&mut self, recorded: &Recorded) {
        if !recorded.replayed {
            for charge in &recorded.charges {
                self.index_charge(charge, None);
            }
        }
    }

    /// Keeps the pending and retry indexes in step with a charge's status.
    pub(super) fn index_charge(&mut self, charge: &Charge, previous: Option<(ChargeStatus, Option<DateTime<Utc>>)>) {
        let entry = |at: DateTime<Utc>| (at, charge.user_id.clone(), charge.key.clone());
        if let Some((status, retry_at)) = previous {
            if status == ChargeStatus::Pending {
                self.pending.remove(&entry(charge.created_at));
            }
            if status == ChargeStatus::RequiresAction {
                self.awaiting.remove(&entry(charge.created_at));
            }
            if let Some(at) = retry_at {
                self.retries.remove(&entry(at));
            }
        }
        if charge.status == ChargeStatus::Pending {
            self.pending.insert(entry(charge.created_at));
        }
        if charge.status == ChargeStatus::RequiresAction {
            self.awaiting.insert(entry(charge.created_at));
        }
        if charge.status == ChargeStatus::Failed {
            if let Some(at) = charge.next_retry_at {
                self.retries.insert(entry(at));
            }
        }
    }
}
