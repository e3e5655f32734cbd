//! Charges in [`SqliteUsageStore`]: creating them with the summary figures they move, claiming,
//! leasing and settling them (each a read and a write in one write transaction, decided in
//! Rust by the rules the in-memory store applies too), gateway events, and the audit entries of
//! these writes.

use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::SqliteUsageStore;
use super::record::append_audit_in;
use super::rows::{
    CHARGE_COLUMNS, SUMMARY_COLUMNS, charge_as_stored, charge_from, db, generic, instant, micros, summary_from, to_i64,
};
use crate::domain::{Charge, ChargeKey, ChargeStatus, NewCharge, PeriodKey, Plan, UserId};
use crate::store::claims::ClaimKind;
use crate::store::{AuditEntry, AuditEvent, EnsureCharge, GatewayEventRecord, PeriodSummary, Settlement, StoreError};

impl SqliteUsageStore {
    /// The claims of [`UsageStore`](crate::UsageStore): up to `limit` charges of `kind` whose
    /// lease expired at `now`, oldest first, leased until `lease_until` in one write
    /// transaction, which no other claim, of this process or another, can interleave with.
    pub(super) async fn claim(
        &self,
        kind: &ClaimKind,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE status = ?1 AND (lease_until IS NULL OR lease_until <= ?2)
                AND (NOT ?3 OR next_retry_at <= ?2) AND (?4 IS NULL OR user_id = ?4)
              ORDER BY created_at, rowid LIMIT ?5"
        ))
        .bind(kind.status.as_str())
        .bind(instant(now))
        .bind(kind.due_retry)
        .bind(user.map(UserId::as_str))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut charge = charge_from(row)?;
            let events = kind.take(&mut charge, now, lease_until);
            charge_as_stored(&mut charge);
            write_charge(&mut tx, &charge).await?;
            for event in &events {
                append_audit_in(&mut tx, &charge.user_id, now, Some(charge.period), event).await?;
            }
            claimed.push(charge);
        }
        tx.commit().await.map_err(db)?;
        Ok(claimed)
    }

    /// [`UsageStore::ensure_charge`](crate::UsageStore::ensure_charge).
    pub(super) async fn ensure_one_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError> {
        let EnsureCharge {
            charge,
            status,
            payment_id,
            now,
            lease_until,
            plan,
        } = request;
        let (user, key) = (charge.user_id.clone(), charge.key.clone());
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        if let Some(existing) = charge_in(&mut tx, &user, &key).await? {
            return Ok((existing, false));
        }
        let mut summary = read_summary(&mut tx, &user, charge.period)
            .await?
            .unwrap_or_else(|| PeriodSummary::empty(user.clone(), charge.period, charge.amount.currency(), now));
        let created = insert_charges(
            &mut tx,
            &mut summary,
            vec![charge],
            status,
            payment_id,
            now,
            lease_until,
        )
        .await?;
        write_summary(&mut tx, &summary, plan.as_ref()).await?;
        tx.commit().await.map_err(db)?;
        let charge = created.into_iter().next().ok_or_else(|| StoreError::NotFound {
            what: "charge",
            key: key.to_string(),
        })?;
        Ok((charge, true))
    }

    /// [`UsageStore::renew_lease`](crate::UsageStore::renew_lease).
    pub(super) async fn extend_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let Some(mut charge) = charge_in(&mut tx, user, key).await? else {
            return Ok(None);
        };
        if charge.status != ChargeStatus::Pending || charge.lease_until != held_until.map(micros) {
            return Ok(None);
        }
        charge.lease_until = Some(micros(lease_until));
        write_charge(&mut tx, &charge).await?;
        tx.commit().await.map_err(db)?;
        Ok(Some(charge))
    }

    /// [`UsageStore::settle_charge`](crate::UsageStore::settle_charge).
    pub(super) async fn settle(&self, s: Settlement<'_>) -> Result<Charge, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let mut charge = charge_in(&mut tx, s.user_id, s.key)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "charge",
                key: s.key.to_string(),
            })?;
        if charge.status != s.expected_status || charge.round != s.expected_round {
            return Err(StoreError::StatusConflict {
                charge: Box::new(charge),
            });
        }
        if !charge.status.can_become(s.status) {
            return Err(StoreError::ForbiddenTransition {
                from: charge.status,
                to: s.status,
            });
        }
        let mut summary = read_summary(&mut tx, s.user_id, charge.period)
            .await?
            .unwrap_or_else(|| PeriodSummary::empty(s.user_id.clone(), charge.period, charge.amount.currency(), s.at));
        summary
            .apply_charge(charge.kind, charge.amount, Some(charge.status), s.status)
            .map_err(generic)?;
        summary.updated_at = s.at;
        write_summary(&mut tx, &summary, None).await?;
        let from = charge.status;
        let (user, to, at) = (s.user_id, s.status, s.at);
        s.apply_to(&mut charge);
        charge_as_stored(&mut charge);
        write_charge(&mut tx, &charge).await?;
        let event = AuditEvent::ChargeStatusChanged {
            key: charge.key.clone(),
            from,
            to,
            payment_id: charge.payment_id.clone(),
            failure_code: charge.failure_code.clone(),
        };
        append_audit_in(&mut tx, user, at, Some(charge.period), &event).await?;
        tx.commit().await.map_err(db)?;
        Ok(charge)
    }

    /// [`UsageStore::append_audit`](crate::UsageStore::append_audit).
    pub(super) async fn append_audit_entry(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        append_audit_in(&mut tx, &entry.user_id, entry.at, entry.period, &entry.event).await?;
        tx.commit().await.map_err(db)
    }

    /// [`UsageStore::gateway_event_applied`](crate::UsageStore::gateway_event_applied).
    pub(super) async fn gateway_event_seen(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM token_billing_gateway_events WHERE user_id = ?1 AND event_id = ?2")
                .bind(user.as_str())
                .bind(event_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db)?;
        Ok(found.is_some())
    }

    /// [`UsageStore::record_gateway_event`](crate::UsageStore::record_gateway_event).
    pub(super) async fn insert_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO token_billing_gateway_events (user_id, event_id, event_type, applied_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        )
        .bind(record.user_id.as_str())
        .bind(&record.event_id)
        .bind(&record.event_type)
        .bind(instant(record.at))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        if inserted {
            append_audit_in(&mut tx, &record.user_id, record.at, record.period, &record.audit).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(inserted)
    }

    /// [`UsageStore::charge`](crate::UsageStore::charge).
    pub(super) async fn read_charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        charge_in(&mut conn, user, key).await
    }

    /// [`UsageStore::charges`](crate::UsageStore::charges).
    pub(super) async fn read_charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = ?1 AND period = ?2 ORDER BY rowid"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }

    /// [`UsageStore::unpaid_charges`](crate::UsageStore::unpaid_charges).
    pub(super) async fn read_unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = ?1 AND status IN ('failed', 'requires_action') ORDER BY period, rowid"
        ))
        .bind(user.as_str())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }
}

/// One charge by key, read on `conn`.
async fn charge_in(conn: &mut SqliteConnection, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = ?1 AND charge_key = ?2"
    ))
    .bind(user.as_str())
    .bind(key.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    row.as_ref().map(charge_from).transpose()
}

/// Writes what a claim, a lease or a settlement changes of a charge.
async fn write_charge(conn: &mut SqliteConnection, charge: &Charge) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE token_billing_charges
            SET status = ?3, round = ?4, attempts = ?5, payment_id = ?6, failure_code = ?7, failure_message = ?8,
                next_retry_at = ?9, lease_until = ?10, updated_at = ?11
          WHERE user_id = ?1 AND charge_key = ?2",
    )
    .bind(charge.user_id.as_str())
    .bind(charge.key.as_str())
    .bind(charge.status.as_str())
    .bind(i64::from(charge.round))
    .bind(i64::from(charge.attempts))
    .bind(charge.payment_id.as_deref())
    .bind(charge.failure_code.as_deref())
    .bind(charge.failure_message.as_deref())
    .bind(charge.next_retry_at.map(instant))
    .bind(charge.lease_until.map(instant))
    .bind(instant(charge.updated_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// The period's summary, if it has one.
pub(super) async fn read_summary(
    conn: &mut SqliteConnection,
    user: &UserId,
    period: PeriodKey,
) -> Result<Option<PeriodSummary>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM token_usage_summary WHERE user_id = ?1 AND period = ?2"
    ))
    .bind(user.as_str())
    .bind(period.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    row.as_ref().map(summary_from).transpose()
}

/// Writes the summary, creating its row with `plan`'s allowance and block size (when given) if
/// the period has none yet: in a write transaction, so that it replaces what the same
/// transaction read.
pub(super) async fn write_summary(
    conn: &mut SqliteConnection,
    summary: &PeriodSummary,
    plan: Option<&Plan>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO token_usage_summary (user_id, period, currency, total_tokens, billable_credit, events,
             fixed_fee_charged, tier_charges_count, tier_charges_total, outstanding_count, outstanding_total,
             included_tokens, block_size, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (user_id, period) DO UPDATE SET total_tokens = excluded.total_tokens,
             billable_credit = excluded.billable_credit, events = excluded.events,
             fixed_fee_charged = excluded.fixed_fee_charged, tier_charges_count = excluded.tier_charges_count,
             tier_charges_total = excluded.tier_charges_total, outstanding_count = excluded.outstanding_count,
             outstanding_total = excluded.outstanding_total,
             included_tokens = coalesce(token_usage_summary.included_tokens, excluded.included_tokens),
             block_size = coalesce(token_usage_summary.block_size, excluded.block_size),
             updated_at = excluded.updated_at",
    )
    .bind(summary.user_id.as_str())
    .bind(summary.period.to_string())
    .bind(summary.currency.to_string())
    .bind(to_i64(summary.total_tokens)?)
    .bind(i64::from(summary.billable_credit_micros))
    .bind(to_i64(summary.events)?)
    .bind(summary.fixed_fee_charged.minor_units())
    .bind(to_i64(summary.tier_charges_count)?)
    .bind(summary.tier_charges_total.minor_units())
    .bind(to_i64(summary.outstanding_count)?)
    .bind(summary.outstanding_total.minor_units())
    .bind(plan.map(|p| to_i64(p.included_tokens())).transpose()?)
    .bind(plan.map(|p| to_i64(p.block_size())).transpose()?)
    .bind(instant(summary.updated_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Inserts the charges that do not exist yet, in order, and moves `summary`'s figures for them
/// (the caller writes it); returns those created. A new charge that does not fit the summary
/// (its currency) fails the whole transaction; one that exists is skipped, as in memory.
pub(super) async fn insert_charges(
    conn: &mut SqliteConnection,
    summary: &mut PeriodSummary,
    charges: Vec<NewCharge>,
    status: ChargeStatus,
    payment_id: Option<String>,
    now: DateTime<Utc>,
    lease_until: Option<DateTime<Utc>>,
) -> Result<Vec<Charge>, StoreError> {
    let mut created = Vec::with_capacity(charges.len());
    for new in charges {
        let mut charge = new.into_charge(crate::random::uuid_v4(), status, now);
        charge.payment_id.clone_from(&payment_id);
        if status == ChargeStatus::Pending && lease_until.is_some() {
            charge.lease_until = lease_until;
            charge.attempts = 1;
        }
        charge_as_stored(&mut charge);
        let inserted = sqlx::query(
            "INSERT INTO token_billing_charges (user_id, id, charge_key, period, kind, block, billing_tier,
                 amount_charged, currency, status, round, attempts, consumption_id, payment_id, lease_until,
                 created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16)
             ON CONFLICT (user_id, charge_key) DO NOTHING",
        )
        .bind(charge.user_id.as_str())
        .bind(charge.id.to_string())
        .bind(charge.key.as_str())
        .bind(charge.period.to_string())
        .bind(charge.kind.as_str())
        .bind(to_i64(charge.block)?)
        .bind(charge.billing_tier.as_str())
        .bind(charge.amount.minor_units())
        .bind(charge.amount.currency().to_string())
        .bind(charge.status.as_str())
        .bind(i64::from(charge.round))
        .bind(i64::from(charge.attempts))
        .bind(charge.consumption_id.map(|id| id.to_string()))
        .bind(charge.payment_id.as_deref())
        .bind(charge.lease_until.map(instant))
        .bind(instant(now))
        .execute(&mut *conn)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        if !inserted {
            continue;
        }
        // A charge of another currency than the period's fails the transaction, which is then
        // rolled back.
        summary
            .apply_charge(charge.kind, charge.amount, None, status)
            .map_err(generic)?;
        let created_event = AuditEvent::ChargeCreated {
            key: charge.key.clone(),
            billing_tier: charge.billing_tier.clone(),
            amount: charge.amount,
            status,
        };
        append_audit_in(conn, &charge.user_id, now, Some(charge.period), &created_event).await?;
        if charge.attempts == 1 {
            let started = AuditEvent::CollectionStarted {
                key: charge.key.clone(),
                round: 0,
                attempt: 1,
            };
            append_audit_in(conn, &charge.user_id, now, Some(charge.period), &started).await?;
        }
        created.push(charge);
    }
    summary.updated_at = now;
    Ok(created)
}
