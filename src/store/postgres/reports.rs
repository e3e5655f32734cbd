//! The reports of [`PostgresUsageStore`], read from the original product's tables: a period's
//! summary, its consumptions, its usage by operation type and its charges by tier, and a user's
//! audit trail.

use sqlx::Row;

use super::PostgresUsageStore;
use super::rows::{CONSUMPTION_COLUMNS, db, generic, parse, summary_from, to_u64, usage_from};
use crate::domain::{
    BillableTokens, Currency, ModelName, Money, OperationType, PeriodKey, TokenCounts, UsageRecord, UserId,
};
use crate::store::{AuditEntry, ModelUsage, OperationUsage, PeriodSummary, StoreError, TierChargeReport};

impl PostgresUsageStore {
    /// [`UsageStore::consumptions`](crate::UsageStore::consumptions).
    pub(super) async fn read_consumptions(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CONSUMPTION_COLUMNS} FROM token_consumption WHERE user_id = $1 AND period = $2
                  ORDER BY total_before, audit_seq"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(usage_from)
        .collect()
    }

    /// [`UsageStore::period_summary`](crate::UsageStore::period_summary).
    pub(super) async fn read_period_summary(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Option<PeriodSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, period, currency, total_tokens, billable_credit, events, fixed_fee_charged, tier_charges_count,
                    tier_charges_total, outstanding_count, outstanding_total, updated_at
               FROM token_usage_summary WHERE user_id = $1 AND period = $2",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(summary_from).transpose()
    }

    /// [`UsageStore::usage_by_operation`](crate::UsageStore::usage_by_operation).
    pub(super) async fn read_usage_by_operation(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<OperationUsage>, StoreError> {
        sqlx::query(
            "SELECT operation_type, SUM(tokens_used)::bigint AS total_tokens, COUNT(*) AS operations
               FROM token_consumption WHERE user_id = $1 AND period = $2
              GROUP BY operation_type ORDER BY operation_type COLLATE \"C\"",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(OperationUsage {
                operation_type: parse::<OperationType>(row.try_get::<&str, _>("operation_type").map_err(db)?)?,
                total_tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
                operations: to_u64(row.try_get("operations").map_err(db)?)?,
            })
        })
        .collect()
    }

    /// [`UsageStore::usage_by_model`](crate::UsageStore::usage_by_model): events without
    /// token classes count in `total_tokens` alone, and bill their `tokens_used`.
    pub(super) async fn read_usage_by_model(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<ModelUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, COUNT(*) AS events, SUM(tokens_used)::bigint AS total_tokens,
                    coalesce(SUM(input_tokens), 0)::bigint AS input,
                    coalesce(SUM(cached_input_tokens), 0)::bigint AS cached_input,
                    coalesce(SUM(cache_write_tokens), 0)::bigint AS cache_write,
                    coalesce(SUM(output_tokens), 0)::bigint AS output,
                    coalesce(SUM(reasoning_tokens), 0)::bigint AS reasoning,
                    SUM(coalesce(billable_tokens, tokens_used))::text AS billable
               FROM token_consumption WHERE user_id = $1 AND period = $2
              GROUP BY model ORDER BY model COLLATE \"C\" NULLS FIRST",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let count = |column: &str| -> Result<u64, StoreError> { to_u64(row.try_get(column).map_err(db)?) };
                Ok(ModelUsage {
                    model: row
                        .try_get::<Option<&str>, _>("model")
                        .map_err(db)?
                        .map(parse::<ModelName>)
                        .transpose()?,
                    events: count("events")?,
                    total_tokens: count("total_tokens")?,
                    counts: TokenCounts {
                        input: count("input")?,
                        cached_input: count("cached_input")?,
                        cache_write: count("cache_write")?,
                        output: count("output")?,
                        reasoning: count("reasoning")?,
                    },
                    billable: parse::<BillableTokens>(row.try_get::<&str, _>("billable").map_err(db)?)?,
                })
            })
            .collect()
    }

    /// [`UsageStore::charges_by_tier`](crate::UsageStore::charges_by_tier).
    pub(super) async fn read_charges_by_tier(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<TierChargeReport>, StoreError> {
        sqlx::query(
            "SELECT billing_tier, MIN(currency) AS currency, COUNT(*) AS charges_count,
                    SUM(amount_charged)::bigint AS total_charged,
                    COALESCE(SUM(amount_charged) FILTER (WHERE status = 'succeeded'), 0)::bigint AS collected
               FROM token_billing_charges WHERE user_id = $1 AND period = $2
              GROUP BY billing_tier, block ORDER BY block",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
            Ok(TierChargeReport {
                billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
                charges_count: to_u64(row.try_get("charges_count").map_err(db)?)?,
                total_charged: Money::from_minor(row.try_get("total_charged").map_err(db)?, currency),
                collected: Money::from_minor(row.try_get("collected").map_err(db)?, currency),
            })
        })
        .collect()
    }

    /// [`UsageStore::audit_trail`](crate::UsageStore::audit_trail).
    pub(super) async fn read_audit_trail(
        &self,
        user: &UserId,
        period: Option<PeriodKey>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Usage entries are the consumptions placed in the trail's order (migration 7); older
        // ones, and those `record_token_consumption` writes, are audit rows of their own.
        sqlx::query(include_str!("sql/audit_trail.sql"))
            .bind(user.as_str())
            .bind(period.map(|p| p.to_string()))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
            .iter()
            .map(|row| {
                Ok(AuditEntry {
                    at: row.try_get("at").map_err(db)?,
                    user_id: user.clone(),
                    period: row
                        .try_get::<Option<&str>, _>("period")
                        .map_err(db)?
                        .map(parse::<PeriodKey>)
                        .transpose()?,
                    event: serde_json::from_value(row.try_get("event").map_err(db)?).map_err(generic)?,
                })
            })
            .collect()
    }
}
