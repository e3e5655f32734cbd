//! Threshold alerts in a user's book of [`InMemoryUsageStore`](super::InMemoryUsageStore):
//! created under the shard's lock with the event that crosses them, unique per period and kind.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::InMemoryUsageStore;
use super::book::UserBook;
use super::shards;
use crate::domain::{PeriodKey, Plan, UserId};
use crate::store::{Alert, Alerting};

/// An alert kept in a user's book, and whether the host acknowledged it.
#[derive(Debug)]
pub(super) struct KeptAlert {
    pub(super) alert: Alert,
    pub(super) acknowledged: bool,
}

impl InMemoryUsageStore {
    /// Up to `limit` alerts not acknowledged, of one user or of all (shard by shard), oldest
    /// first.
    pub(super) fn alerts_pending(&self, user: Option<&UserId>, limit: usize) -> Vec<Alert> {
        let mut pending = Vec::new();
        match user {
            Some(user) => {
                if let Some(book) = self.shard(user).users.get(user) {
                    pending.extend(book.pending_alerts().take(limit).cloned());
                }
            }
            None => {
                'shards: for shard in &self.shards {
                    let shard = shards::lock(shard);
                    for book in shard.users.values() {
                        pending.extend(book.pending_alerts().take(limit - pending.len()).cloned());
                        if pending.len() >= limit {
                            break 'shards;
                        }
                    }
                }
            }
        }
        pending.sort_by_key(|alert| alert.created_at);
        pending
    }
}

impl UserBook {
    /// Creates `alert` unless the user's period has one of its kind; answers whether it did.
    pub(super) fn raise_alert(&mut self, alert: Alert) -> bool {
        let exists = self
            .alerts
            .iter()
            .any(|kept| kept.alert.period == alert.period && kept.alert.kind == alert.kind);
        if !exists {
            self.alerts.push(KeptAlert {
                alert,
                acknowledged: false,
            });
        }
        !exists
    }

    /// Creates the alerts an event crosses, moving `period` from `before` to `after`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn raise_crossed(
        &mut self,
        user: &UserId,
        period: PeriodKey,
        plan: &Plan,
        alerting: &Alerting<'_>,
        (before, after): (u64, u64),
        at: DateTime<Utc>,
    ) {
        for kind in alerting.policy.crossed(plan, &alerting.ceiling, before, after) {
            self.raise_alert(Alert::new(user.clone(), period, kind, after, at));
        }
    }

    /// The alerts not acknowledged, oldest first.
    pub(super) fn pending_alerts(&self) -> impl Iterator<Item = &Alert> {
        self.alerts
            .iter()
            .filter(|kept| !kept.acknowledged)
            .map(|kept| &kept.alert)
    }

    /// Acknowledges an alert; answers whether it was pending.
    pub(super) fn ack_alert(&mut self, id: Uuid) -> bool {
        match self.alerts.iter_mut().find(|kept| kept.alert.id == id) {
            Some(kept) if !kept.acknowledged => {
                kept.acknowledged = true;
                true
            }
            _ => false,
        }
    }
}
