//! Threshold alerts on PostgreSQL: `token_billing_alerts`, one row per (user, period, alert),
//! inserted in the transaction that records the event crossing the threshold (events that cross
//! one take the locking way of recording, or their batch's statement), read until acknowledged.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PostgresUsageStore;
use super::rows::{PgQuery, db, generic, parse, to_i64, to_u64};
use crate::domain::UserId;
use crate::store::{Alert, StoreError};

const ALERT_COLUMNS: &str = "user_id, period, id, kind, total_tokens, created_at";

fn alert_from(row: &PgRow) -> Result<Alert, StoreError> {
    let kind: serde_json::Value = row.try_get("kind").map_err(db)?;
    Ok(Alert {
        id: row.try_get("id").map_err(db)?,
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        kind: serde_json::from_value(kind).map_err(generic)?,
        total_tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
        created_at: row.try_get::<DateTime<Utc>, _>("created_at").map_err(db)?,
    })
}

/// Alerts as the columns of `token_billing_alerts`, each an array, bound in the table's order:
/// user, period, key, id, kind, total, instant. Shared by the insert below and the batch's
/// statement, which writes a batch's alerts with its events.
#[derive(Debug, Default)]
pub(super) struct AlertColumns<'a> {
    users: Vec<&'a str>,
    periods: Vec<String>,
    keys: Vec<String>,
    ids: Vec<uuid::Uuid>,
    kinds: Vec<serde_json::Value>,
    totals: Vec<i64>,
    ats: Vec<DateTime<Utc>>,
}

impl<'a> AlertColumns<'a> {
    /// Adds one alert's row.
    pub(super) fn push(&mut self, alert: &'a Alert) -> Result<(), StoreError> {
        self.users.push(alert.user_id.as_str());
        self.periods.push(alert.period.to_string());
        self.keys.push(alert.kind.key());
        self.ids.push(alert.id);
        self.kinds.push(serde_json::to_value(alert.kind).map_err(generic)?);
        self.totals.push(to_i64(alert.total_tokens)?);
        self.ats.push(alert.created_at);
        Ok(())
    }

    /// Binds the seven arrays, in the table's column order.
    pub(super) fn bind_arrays<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.users)
            .bind(&self.periods)
            .bind(&self.keys)
            .bind(&self.ids)
            .bind(&self.kinds)
            .bind(&self.totals)
            .bind(&self.ats)
    }
}

impl PostgresUsageStore {
    /// Inserts `alerts` unless their (user, period, kind) exists; answers how many were new.
    pub(super) async fn insert_alerts<'e>(
        executor: impl sqlx::Executor<'e, Database = sqlx::Postgres>,
        alerts: &[Alert],
    ) -> Result<u64, StoreError> {
        if alerts.is_empty() {
            return Ok(0);
        }
        let mut columns = AlertColumns::default();
        for alert in alerts {
            columns.push(alert)?;
        }
        let query = sqlx::query(
            "INSERT INTO token_billing_alerts (user_id, period, alert_key, id, kind, total_tokens, created_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::jsonb[], $6::bigint[],
                                  $7::timestamptz[])
             ON CONFLICT DO NOTHING",
        );
        let inserted = columns.bind_arrays(query).execute(executor).await.map_err(db)?;
        Ok(inserted.rows_affected())
    }

    /// [`UsageStore::raise_alert`](crate::UsageStore::raise_alert).
    pub(super) async fn insert_alert(&self, alert: Alert) -> Result<bool, StoreError> {
        Ok(Self::insert_alerts(&self.pool, std::slice::from_ref(&alert)).await? == 1)
    }

    /// [`UsageStore::pending_alerts`](crate::UsageStore::pending_alerts).
    pub(super) async fn read_pending_alerts(
        &self,
        user: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Alert>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {ALERT_COLUMNS} FROM token_billing_alerts
                  WHERE acknowledged_at IS NULL AND ($1::text IS NULL OR user_id = $1)
                  ORDER BY created_at, id LIMIT $2"
            )
        });
        let rows = sqlx::query(SQL.as_str())
            .bind(user.map(UserId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(alert_from).collect()
    }

    /// [`UsageStore::ack_alert`](crate::UsageStore::ack_alert).
    pub(super) async fn acknowledge_alert(&self, user: &UserId, id: uuid::Uuid) -> Result<bool, StoreError> {
        let acked = sqlx::query(
            "UPDATE token_billing_alerts SET acknowledged_at = now()
              WHERE user_id = $1 AND id = $2 AND acknowledged_at IS NULL",
        )
        .bind(user.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(acked.rows_affected() == 1)
    }
}
