//! The reports of [`SqliteUsageStore`], read from the same tables as the PostgreSQL store's: a
//! period's summary, its consumptions, its usage by operation type, by model and by tier, and
//! a user's audit trail.

use std::collections::BTreeMap;

use sqlx::Row;

use super::SqliteUsageStore;
use super::rows::{
    CONSUMPTION_COLUMNS, SUMMARY_COLUMNS, at, count, counts_from, db, from_json, maybe_text, summary_from, text,
    usage_from,
};
use crate::domain::{BillableTokens, Currency, ModelName, Money, OperationType, PeriodKey, UsageRecord, UserId};
use crate::store::{AuditEntry, ModelUsage, OperationUsage, PeriodSummary, StoreError, TierChargeReport};

impl SqliteUsageStore {
    /// [`UsageStore::consumptions`](crate::UsageStore::consumptions), in recording order.
    pub(super) async fn read_consumptions(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CONSUMPTION_COLUMNS} FROM token_consumption WHERE user_id = ?1 AND period = ?2 ORDER BY rowid"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(usage_from)
        .collect()
    }

    /// [`UsageStore::period_summary`](crate::UsageStore::period_summary): one row by its key.
    pub(super) async fn read_period_summary(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Option<PeriodSummary>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM token_usage_summary WHERE user_id = ?1 AND period = ?2"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        row.as_ref().map(summary_from).transpose()
    }

    /// [`UsageStore::usage_by_operation`](crate::UsageStore::usage_by_operation): the original
    /// product's query, ordered by the types' bytes.
    pub(super) async fn read_usage_by_operation(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<OperationUsage>, StoreError> {
        sqlx::query(
            "SELECT operation_type, SUM(tokens_used) AS total_tokens, COUNT(*) AS operations
               FROM token_consumption WHERE user_id = ?1 AND period = ?2
              GROUP BY operation_type ORDER BY operation_type COLLATE BINARY",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(OperationUsage {
                operation_type: text::<OperationType>(row, "operation_type")?,
                total_tokens: count(row, "total_tokens")?,
                operations: count(row, "operations")?,
            })
        })
        .collect()
    }

    /// [`UsageStore::usage_by_model`](crate::UsageStore::usage_by_model). SQLite has no exact
    /// decimal sum, so the rows are added up here, with the rule every store uses
    /// ([`ModelUsage`]'s counts; an event without classes bills its `tokens_used`).
    pub(super) async fn read_usage_by_model(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<ModelUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, tokens_used, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
                    reasoning_tokens, billable_tokens
               FROM token_consumption WHERE user_id = ?1 AND period = ?2",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        // Ordered as the contract says: no model first, then by the names' bytes.
        let mut by_model: BTreeMap<Option<String>, ModelUsage> = BTreeMap::new();
        for row in &rows {
            let model = maybe_text::<ModelName>(row, "model")?;
            let tokens = count(row, "tokens_used")?;
            let counts = counts_from(row)?;
            let billable =
                maybe_text::<BillableTokens>(row, "billable_tokens")?.unwrap_or_else(|| BillableTokens::whole(tokens));
            let entry = by_model
                .entry(model.as_ref().map(|m| m.as_str().to_owned()))
                .or_insert_with(|| ModelUsage::new(model));
            entry.events += 1;
            entry.total_tokens = entry.total_tokens.saturating_add(tokens);
            if let Some(counts) = counts {
                entry.counts = entry.counts.checked_add(&counts).unwrap_or(entry.counts);
            }
            entry.billable = entry.billable.checked_add(billable).unwrap_or(entry.billable);
        }
        Ok(by_model.into_values().collect())
    }

    /// [`UsageStore::charges_by_tier`](crate::UsageStore::charges_by_tier): the original
    /// product's query, with what was collected.
    pub(super) async fn read_charges_by_tier(
        &self,
        user: &UserId,
        period: PeriodKey,
    ) -> Result<Vec<TierChargeReport>, StoreError> {
        sqlx::query(
            "SELECT billing_tier, MIN(currency) AS currency, COUNT(*) AS charges_count,
                    SUM(amount_charged) AS total_charged,
                    COALESCE(SUM(amount_charged) FILTER (WHERE status = 'succeeded'), 0) AS collected
               FROM token_billing_charges WHERE user_id = ?1 AND period = ?2
              GROUP BY billing_tier, block ORDER BY block",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            let currency: Currency = text(row, "currency")?;
            Ok(TierChargeReport {
                billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
                charges_count: count(row, "charges_count")?,
                total_charged: Money::from_minor(row.try_get("total_charged").map_err(db)?, currency),
                collected: Money::from_minor(row.try_get("collected").map_err(db)?, currency),
            })
        })
        .collect()
    }

    /// [`UsageStore::audit_trail`](crate::UsageStore::audit_trail), in the order written.
    pub(super) async fn read_audit_trail(
        &self,
        user: &UserId,
        period: Option<PeriodKey>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        sqlx::query(
            "SELECT at, period, event FROM token_billing_audit
              WHERE user_id = ?1 AND (?2 IS NULL OR period = ?2) ORDER BY seq",
        )
        .bind(user.as_str())
        .bind(period.map(|p| p.to_string()))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(AuditEntry {
                at: at(row, "at")?,
                user_id: user.clone(),
                period: maybe_text::<PeriodKey>(row, "period")?,
                event: from_json(row, "event")?,
            })
        })
        .collect()
    }
}
