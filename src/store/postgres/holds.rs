//! Spend control on PostgreSQL: granting a hold in one statement (`sql/reserve.sql`, deciding
//! with `token_billing_hold` on the locked period row), releasing one, and reading a period's
//! usage recorded and held. A period's holds live in its `token_usage_summary` row, as
//! `{hold id: [tokens, granted at, expires at]}` with instants in microseconds.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::PostgresUsageStore;
use super::rows::{db, generic, to_i64, to_u64};
use crate::domain::{EventId, MAX_TOKENS, PeriodKey, UserId};
use crate::store::{Hold, HoldDecision, HoldRequest, SpendState, StoreError};

/// Whether the user has a charge unpaid since the cut-off `$2`.
const OVERDUE: &str = "EXISTS (SELECT 1 FROM token_billing_charges
                        WHERE user_id = $1 AND status IN ('failed', 'requires_action') AND created_at <= $2)";

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn instant(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| generic(format!("hold instant {micros} out of range")))
}

/// The holds of a period row that have not expired at `now`, oldest first.
fn open_holds(
    user: &UserId,
    period: PeriodKey,
    holds: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<Vec<Hold>, StoreError> {
    let malformed = || generic("a hold in token_usage_summary.holds is not [tokens, granted at, expires at]");
    let mut open = Vec::new();
    for (id, hold) in holds.as_object().into_iter().flatten() {
        let field = |n: usize| hold.get(n).and_then(serde_json::Value::as_i64).ok_or_else(malformed);
        let expires_at = instant(field(2)?)?;
        if expires_at > now {
            open.push(Hold {
                user_id: user.clone(),
                hold_id: EventId::new(id.as_str()).map_err(generic)?,
                period,
                tokens: to_u64(field(0)?)?,
                created_at: instant(field(1)?)?,
                expires_at,
            });
        }
    }
    open.sort_by(|a, b| (a.created_at, &a.hold_id).cmp(&(b.created_at, &b.hold_id)));
    Ok(open)
}

fn state_of(total: u64, open: &[Hold], payment_overdue: bool) -> SpendState {
    SpendState {
        total_tokens: total,
        held_tokens: open.iter().fold(0u64, |held, hold| held.saturating_add(hold.tokens)),
        open_holds: open.len() as u64,
        payment_overdue,
    }
}

impl PostgresUsageStore {
    /// [`UsageStore::reserve`](crate::UsageStore::reserve).
    pub(super) async fn reserve_hold(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        let cap = |tokens: Option<u64>| tokens.map(to_i64).transpose();
        let row = sqlx::query(include_str!("sql/reserve.sql"))
            .bind(request.user_id.as_str())
            .bind(request.period.to_string())
            .bind(request.plan.currency().code())
            .bind(request.now)
            .bind(to_i64(request.plan.included_tokens())?)
            .bind(to_i64(request.plan.block_size())?)
            .bind(request.hold_id.as_str())
            .bind(to_i64(request.tokens)?)
            .bind(micros(request.now))
            .bind(micros(request.expires_at))
            .bind(cap(request.ceiling.spend_cap_tokens)?)
            .bind(cap(request.ceiling.token_cap)?)
            .bind(request.ceiling.payment_gate && request.overdue_before.is_some())
            .bind(request.overdue_before)
            .bind(to_i64(MAX_TOKENS)?)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        if row.try_get::<bool, _>("settled").map_err(db)? {
            return Ok(HoldDecision::Settled);
        }
        let Some(total) = row.try_get::<Option<i64>, _>("total_tokens").map_err(db)? else {
            return Err(generic(format!(
                "period {} of user {} is kept in another currency than its plan's",
                request.period, request.user_id
            )));
        };
        let holds: serde_json::Value = row.try_get("holds").map_err(db)?;
        let overdue = row.try_get::<Option<bool>, _>("overdue").map_err(db)?.unwrap_or(false);
        let open = open_holds(request.user_id, request.period, &holds, request.now)?;
        let state = state_of(to_u64(total)?, &open, overdue);
        if let Some(hold) = open.iter().find(|hold| hold.hold_id == *request.hold_id) {
            if hold.tokens != request.tokens {
                return Err(StoreError::EventConflict {
                    event_id: request.hold_id.clone(),
                });
            }
            // Granted by this statement when it was granted now; a re-sent request otherwise.
            let replayed = micros(hold.created_at) != micros(request.now);
            return Ok(HoldDecision::Granted {
                hold: hold.clone(),
                state,
                replayed,
            });
        }
        match state.headroom(&request.ceiling, request.plan).refuses(request.tokens) {
            Some(limit) => Ok(HoldDecision::Refused { limit, state }),
            None => Err(StoreError::TotalOverflow {
                total: state.used(),
                tokens: request.tokens,
            }),
        }
    }

    /// [`UsageStore::release_hold`](crate::UsageStore::release_hold).
    pub(super) async fn free_hold(
        &self,
        user: &UserId,
        period: PeriodKey,
        hold_id: &EventId,
    ) -> Result<bool, StoreError> {
        let freed = sqlx::query(
            "UPDATE token_usage_summary SET holds = holds - $3
              WHERE user_id = $1 AND period = $2 AND holds ? $3",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(hold_id.as_str())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(freed.rows_affected() == 1)
    }

    /// The period's total and open holds, and whether a charge is overdue, in one read.
    async fn read_holds(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<(u64, Vec<Hold>, bool), StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT s.total_tokens, s.holds, $2::timestamptz IS NOT NULL AND {OVERDUE} AS overdue
                   FROM (SELECT 1) AS one
                   LEFT JOIN token_usage_summary s ON s.user_id = $1 AND s.period = $3"
            )
        });
        let row = sqlx::query(SQL.as_str())
            .bind(user.as_str())
            .bind(overdue_before)
            .bind(period.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let total = row.try_get::<Option<i64>, _>("total_tokens").map_err(db)?.unwrap_or(0);
        let holds: Option<serde_json::Value> = row.try_get("holds").map_err(db)?;
        let open = match holds {
            Some(holds) => open_holds(user, period, &holds, now)?,
            None => Vec::new(),
        };
        let overdue = row.try_get::<Option<bool>, _>("overdue").map_err(db)?.unwrap_or(false);
        Ok((to_u64(total)?, open, overdue))
    }

    /// [`UsageStore::spend_state`](crate::UsageStore::spend_state).
    pub(super) async fn read_spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError> {
        let (total, open, overdue) = self.read_holds(user, period, now, overdue_before).await?;
        Ok(state_of(total, &open, overdue))
    }

    /// [`UsageStore::holds`](crate::UsageStore::holds).
    pub(super) async fn open_holds(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
    ) -> Result<Vec<Hold>, StoreError> {
        Ok(self.read_holds(user, period, now, None).await?.1)
    }
}
