//! Spend control in [`SqliteUsageStore`]: holds for calls in flight, granted in a write
//! transaction (the lock every record takes too, so that grants and records always see each
//! other), a period's spend state, and threshold alerts, created with the event that crosses
//! them.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::SqliteUsageStore;
use super::rows::{at, count, db, from_json, instant, json, micros, text, to_i64};
use crate::domain::{EventId, PeriodKey, UserId};
use crate::store::{Alert, Hold, HoldDecision, HoldRequest, SpendState, StoreError};

const HOLD_COLUMNS: &str = "user_id, period, hold_id, tokens, created_at, expires_at";
const ALERT_COLUMNS: &str = "user_id, period, id, kind, total_tokens, created_at";

fn hold_from(row: &SqliteRow) -> Result<Hold, StoreError> {
    Ok(Hold {
        user_id: text(row, "user_id")?,
        hold_id: text(row, "hold_id")?,
        period: text(row, "period")?,
        tokens: count(row, "tokens")?,
        created_at: at(row, "created_at")?,
        expires_at: at(row, "expires_at")?,
    })
}

fn alert_from(row: &SqliteRow) -> Result<Alert, StoreError> {
    Ok(Alert {
        id: text(row, "id")?,
        user_id: text(row, "user_id")?,
        period: text(row, "period")?,
        kind: from_json(row, "kind")?,
        total_tokens: count(row, "total_tokens")?,
        created_at: at(row, "created_at")?,
    })
}

impl SqliteUsageStore {
    /// [`UsageStore::reserve`](crate::UsageStore::reserve).
    pub(super) async fn reserve_hold(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let decision = reserve_in(&mut tx, &request).await?;
        tx.commit().await.map_err(db)?;
        Ok(decision)
    }

    /// [`UsageStore::release_hold`](crate::UsageStore::release_hold).
    pub(super) async fn release(
        &self,
        user: &UserId,
        period: PeriodKey,
        hold_id: &EventId,
    ) -> Result<bool, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let freed = free_hold(&mut tx, user, period, hold_id).await?;
        tx.commit().await.map_err(db)?;
        Ok(freed)
    }

    /// [`UsageStore::spend_state`](crate::UsageStore::spend_state), in one read transaction.
    pub(super) async fn read_spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError> {
        let mut tx = self.read().await?;
        spend_state_in(&mut tx, user, period, now, overdue_before).await
    }

    /// [`UsageStore::holds`](crate::UsageStore::holds).
    pub(super) async fn open_holds(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
    ) -> Result<Vec<Hold>, StoreError> {
        sqlx::query(&format!(
            "SELECT {HOLD_COLUMNS} FROM token_billing_holds
              WHERE user_id = ?1 AND period = ?2 AND expires_at > ?3 ORDER BY rowid"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(instant(now))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(hold_from)
        .collect()
    }

    /// [`UsageStore::raise_alert`](crate::UsageStore::raise_alert).
    pub(super) async fn raise(&self, alert: Alert) -> Result<bool, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let created = insert_alert(&mut tx, &alert).await?;
        tx.commit().await.map_err(db)?;
        Ok(created)
    }

    /// [`UsageStore::pending_alerts`](crate::UsageStore::pending_alerts).
    pub(super) async fn read_pending_alerts(
        &self,
        user: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Alert>, StoreError> {
        sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM token_billing_alerts
              WHERE acknowledged_at IS NULL AND (?1 IS NULL OR user_id = ?1)
              ORDER BY created_at, rowid LIMIT ?2"
        ))
        .bind(user.map(UserId::as_str))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(alert_from)
        .collect()
    }

    /// [`UsageStore::ack_alert`](crate::UsageStore::ack_alert).
    pub(super) async fn acknowledge(&self, user: &UserId, id: uuid::Uuid) -> Result<bool, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let acked = sqlx::query(
            "UPDATE token_billing_alerts SET acknowledged_at = ?3
              WHERE user_id = ?1 AND id = ?2 AND acknowledged_at IS NULL",
        )
        .bind(user.as_str())
        .bind(id.to_string())
        .bind(instant(Utc::now()))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        tx.commit().await.map_err(db)?;
        Ok(acked)
    }
}

/// Grants the hold `request` asks for, or refuses it, in the write transaction `conn` is in;
/// see the store contract.
async fn reserve_in(conn: &mut SqliteConnection, request: &HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
    // The hold's instants as stored.
    let request = &HoldRequest {
        now: micros(request.now),
        expires_at: micros(request.expires_at),
        ..*request
    };
    let user = request.user_id.as_str();
    let recorded: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM token_consumption WHERE user_id = ?1 AND event_id = ?2")
            .bind(user)
            .bind(request.hold_id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    if recorded.is_some() {
        return Ok(HoldDecision::Settled);
    }
    let now = request.now;
    // Expired holds are dropped here, where the user's holds are written anyway.
    sqlx::query("DELETE FROM token_billing_holds WHERE user_id = ?1 AND expires_at <= ?2")
        .bind(user)
        .bind(instant(now))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let open = sqlx::query(&format!(
        "SELECT {HOLD_COLUMNS} FROM token_billing_holds WHERE user_id = ?1 AND period = ?2 AND hold_id = ?3"
    ))
    .bind(user)
    .bind(request.period.to_string())
    .bind(request.hold_id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let state = spend_state_in(conn, request.user_id, request.period, now, request.overdue_before).await?;
    if let Some(open) = open {
        let hold = hold_from(&open)?;
        if hold.tokens != request.tokens {
            return Err(StoreError::EventConflict {
                event_id: request.hold_id.clone(),
            });
        }
        return Ok(HoldDecision::Granted {
            hold,
            state,
            replayed: true,
        });
    }
    let decision = request.decide(state)?;
    if let HoldDecision::Granted { hold, .. } = &decision {
        sqlx::query(
            "INSERT INTO token_billing_holds (user_id, period, hold_id, tokens, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(user)
        .bind(hold.period.to_string())
        .bind(hold.hold_id.as_str())
        .bind(to_i64(hold.tokens)?)
        .bind(instant(hold.created_at))
        .bind(instant(hold.expires_at))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(decision)
}

/// The period's usage recorded and held at `now`, and whether a charge unpaid since
/// `overdue_before` or earlier closes the payment gate, read on `conn`.
async fn spend_state_in(
    conn: &mut SqliteConnection,
    user: &UserId,
    period: PeriodKey,
    now: DateTime<Utc>,
    overdue_before: Option<DateTime<Utc>>,
) -> Result<SpendState, StoreError> {
    let row = sqlx::query(
        "SELECT (SELECT total_tokens FROM token_usage_summary WHERE user_id = ?1 AND period = ?2) AS total_tokens,
                (SELECT coalesce(sum(tokens), 0) FROM token_billing_holds
                  WHERE user_id = ?1 AND period = ?2 AND expires_at > ?3) AS held_tokens,
                (SELECT count(*) FROM token_billing_holds
                  WHERE user_id = ?1 AND period = ?2 AND expires_at > ?3) AS open_holds,
                ?4 IS NOT NULL AND EXISTS (SELECT 1 FROM token_billing_charges
                  WHERE user_id = ?1 AND status IN ('failed', 'requires_action') AND created_at <= ?4)
                  AS payment_overdue",
    )
    .bind(user.as_str())
    .bind(period.to_string())
    .bind(instant(now))
    .bind(overdue_before.map(instant))
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    Ok(SpendState {
        total_tokens: row
            .try_get::<Option<i64>, _>("total_tokens")
            .map_err(db)?
            .map_or(Ok(0), super::rows::to_u64)?,
        held_tokens: count(&row, "held_tokens")?,
        open_holds: count(&row, "open_holds")?,
        payment_overdue: row.try_get("payment_overdue").map_err(db)?,
    })
}

/// Frees the hold `hold_id` of the user's period, in the write transaction `conn` is in;
/// answers whether there was one.
pub(super) async fn free_hold(
    conn: &mut SqliteConnection,
    user: &UserId,
    period: PeriodKey,
    hold_id: &EventId,
) -> Result<bool, StoreError> {
    let freed = sqlx::query("DELETE FROM token_billing_holds WHERE user_id = ?1 AND period = ?2 AND hold_id = ?3")
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(hold_id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(freed.rows_affected() == 1)
}

/// Creates `alert` unless its user's period has one of its kind; answers whether it did.
pub(super) async fn insert_alert(conn: &mut SqliteConnection, alert: &Alert) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO token_billing_alerts (user_id, period, alert_key, id, kind, total_tokens, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
    )
    .bind(alert.user_id.as_str())
    .bind(alert.period.to_string())
    .bind(alert.kind.key())
    .bind(alert.id.to_string())
    .bind(json(&alert.kind)?)
    .bind(to_i64(alert.total_tokens)?)
    .bind(instant(alert.created_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(inserted.rows_affected() == 1)
}
