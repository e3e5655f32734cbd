//! Threshold alerts as stores keep them: an outbox of [`Alert`]s, each created in the atomic step
//! that records the event crossing its threshold, unique per (user, period, kind), read by hosts
//! until they acknowledge it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{AlertKind, AlertPolicy, Ceiling, PeriodKey, UserId};

/// A threshold a user's period crossed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Its id: stable, so that a host delivering it more than once can tell.
    pub id: Uuid,
    /// The user.
    pub user_id: UserId,
    /// The period.
    pub period: PeriodKey,
    /// What was crossed.
    pub kind: AlertKind,
    /// The period's total after the event that crossed it.
    pub total_tokens: u64,
    /// When.
    pub created_at: DateTime<Utc>,
}

impl Alert {
    /// A new alert, with a fresh id.
    pub fn new(user_id: UserId, period: PeriodKey, kind: AlertKind, total_tokens: u64, at: DateTime<Utc>) -> Alert {
        Alert {
            id: crate::random::uuid_v4(),
            user_id,
            period,
            kind,
            total_tokens,
            created_at: at,
        }
    }
}

/// Which alerts recording an event creates: the service's policy, under the period's limits in
/// tokens ([`AlertPolicy::crossed`]).
#[derive(Debug, Clone, Copy)]
pub struct Alerting<'a> {
    /// The thresholds.
    pub policy: &'a AlertPolicy,
    /// The period's limits, for the thresholds of the cap.
    pub ceiling: Ceiling,
}
