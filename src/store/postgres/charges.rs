//! The charges of [`PostgresUsageStore`]: creating them (those a record did not create, and
//! [`UsageStore::ensure_charge`]), the period summary figures they move, claiming and leasing
//! them for collection, settling them, the gateway events that report on them, reading them,
//! and writing the audit entries of these changes.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::PostgresUsageStore;
use super::rows::{CHARGE_COLUMNS, audit_json, charge_from, currency_mismatch, db, generic, to_i64};
use crate::domain::{Charge, ChargeKey, ChargeStatus, Currency, NewCharge, PeriodKey, Plan, UserId};
use crate::store::{
    AuditEntry, AuditEvent, EnsureCharge, GatewayEventRecord, Settlement, StoreError, SummaryDelta, UsageStore,
};

/// What a claim takes and does: the status it picks, the SQL condition that makes a charge due
/// (`$2` is now), the columns it sets besides the lease, and the audit entries it writes for
/// each claimed charge (a query over `claimed`).
pub(super) struct ClaimKind {
    status: ChargeStatus,
    due: &'static str,
    set: &'static str,
    audit: &'static str,
}

pub(super) const CLAIM_PENDING: ClaimKind = ClaimKind {
    status: ChargeStatus::Pending,
    due: "(lease_until IS NULL OR lease_until <= $2)",
    set: "attempts = c.attempts + 1",
    audit: "SELECT jsonb_build_object('type', 'collection_started', 'key', claimed.charge_key,
                'round', claimed.round, 'attempt', claimed.attempts)",
};

pub(super) const CLAIM_RETRIES: ClaimKind = ClaimKind {
    status: ChargeStatus::Failed,
    due: "next_retry_at <= $2 AND (lease_until IS NULL OR lease_until <= $2)",
    set: "status = 'pending', round = c.round + 1, attempts = c.attempts + 1, next_retry_at = NULL",
    audit: "VALUES (jsonb_build_object('type', 'charge_status_changed', 'key', claimed.charge_key,
                    'from', 'failed', 'to', 'pending', 'payment_id', NULL, 'failure_code', NULL)),
               (jsonb_build_object('type', 'collection_started', 'key', claimed.charge_key,
                    'round', claimed.round, 'attempt', claimed.attempts))",
};

pub(super) const CLAIM_AWAITING: ClaimKind = ClaimKind {
    status: ChargeStatus::RequiresAction,
    due: "(lease_until IS NULL OR lease_until <= $2)",
    set: "attempts = c.attempts",
    audit: "SELECT NULL::jsonb WHERE false",
};

impl PostgresUsageStore {
    /// Inserts charges that do not exist yet and moves the summary for them; returns those
    /// created, in the order given.
    pub(super) async fn insert_charges(
        tx: &mut Transaction<'static, Postgres>,
        charges: Vec<NewCharge>,
        status: ChargeStatus,
        payment_id: Option<&str>,
        now: DateTime<Utc>,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<Charge>, StoreError> {
        let mut created = Vec::with_capacity(charges.len());
        let mut delta = SummaryDelta::default();
        let Some(first) = charges.first() else {
            return Ok(created);
        };
        let (user, period, currency) = (first.user_id.clone(), first.period, first.amount.currency());
        let leased = status == ChargeStatus::Pending && lease_until.is_some();
        let attempts = i32::from(leased);
        for new in charges {
            let row = sqlx::query(&format!(
                "INSERT INTO token_billing_charges
                    (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                     round, attempts, consumption_id, payment_id, lease_until, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $12, $13, $14, $15, $15)
                 ON CONFLICT DO NOTHING
                 RETURNING {CHARGE_COLUMNS}"
            ))
            .bind(new.user_id.as_str())
            .bind(crate::random::uuid_v4())
            .bind(new.key.as_str())
            .bind(new.period.to_string())
            .bind(new.kind.as_str())
            .bind(to_i64(new.block)?)
            .bind(new.billing_tier.as_str())
            .bind(new.amount.minor_units())
            .bind(new.amount.currency().code())
            .bind(status.as_str())
            .bind(attempts)
            .bind(new.consumption_id)
            .bind(payment_id)
            .bind(if leased { lease_until } else { None })
            .bind(now)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
            if let Some(row) = row {
                let charge = charge_from(&row)?;
                delta = delta
                    .plus(SummaryDelta::of(charge.kind, charge.amount.minor_units(), None, status))
                    .ok_or_else(|| generic("summary overflow"))?;
                created.push(charge);
            }
        }
        Self::move_summary(tx, &user, period, currency, delta, now).await?;
        let mut entries = Vec::new();
        for charge in &created {
            entries.push(AuditEvent::ChargeCreated {
                key: charge.key.clone(),
                billing_tier: charge.billing_tier.clone(),
                amount: charge.amount,
                status,
            });
            if leased {
                entries.push(AuditEvent::CollectionStarted {
                    key: charge.key.clone(),
                    round: 0,
                    attempt: 1,
                });
            }
        }
        Self::audit(tx, &user, Some(period), now, &entries).await?;
        Ok(created)
    }

    async fn move_summary(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: PeriodKey,
        currency: Currency,
        delta: SummaryDelta,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if delta == SummaryDelta::default() {
            return Ok(());
        }
        let moved = sqlx::query(
            "UPDATE token_usage_summary
                SET outstanding_count = outstanding_count + $3, outstanding_total = outstanding_total + $4,
                    fixed_fee_charged = fixed_fee_charged + $5, tier_charges_count = tier_charges_count + $6,
                    tier_charges_total = tier_charges_total + $7, updated_at = $8
              WHERE user_id = $1 AND period = $2 AND currency = $9",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(delta.outstanding_count)
        .bind(delta.outstanding_total)
        .bind(delta.fixed_fee_charged)
        .bind(delta.tier_charges_count)
        .bind(delta.tier_charges_total)
        .bind(now)
        .bind(currency.code())
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        if moved.rows_affected() != 1 {
            return Err(currency_mismatch(currency));
        }
        Ok(())
    }

    pub(super) async fn audit(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: Option<PeriodKey>,
        at: DateTime<Utc>,
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let json = events.iter().map(audit_json).collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO token_billing_audit (user_id, at, period, event)
             SELECT $1, $2, $3, e FROM unnest($4::jsonb[]) WITH ORDINALITY AS t(e, n) ORDER BY n",
        )
        .bind(user.as_str())
        .bind(at)
        .bind(period.map(|p| p.to_string()))
        .bind(json)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Makes sure the period's summary row exists, and locks it (before the charges, the order
    /// every record path takes). The plan's allowance and block size are recorded with a period
    /// that has none yet, so that the original product's SQL functions, which read and check
    /// them, rate it as the library does.
    async fn ensure_summary(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        period: PeriodKey,
        currency: Currency,
        plan: Option<&Plan>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO token_usage_summary AS s (user_id, period, currency, updated_at, included_tokens, block_size)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (user_id, period) DO UPDATE
                SET included_tokens = coalesce(s.included_tokens, EXCLUDED.included_tokens),
                    block_size = coalesce(s.block_size, EXCLUDED.block_size)",
        )
        .bind(user.as_str())
        .bind(period.to_string())
        .bind(currency.code())
        .bind(now)
        .bind(plan.map(|p| to_i64(p.included_tokens())).transpose()?)
        .bind(plan.map(|p| to_i64(p.block_size())).transpose()?)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Leases, in one statement, up to `limit` charges that `kind` picks and nobody holds
    /// (`FOR UPDATE SKIP LOCKED`), applies its changes, and audits them.
    pub(super) async fn claim(
        &self,
        kind: &ClaimKind,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let ClaimKind {
            status,
            due: due_column,
            set,
            audit,
        } = kind;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "WITH picked AS (
                 SELECT user_id, id FROM token_billing_charges
                  WHERE status = $1 AND {due_column} AND ($3::text IS NULL OR user_id = $3)
                  ORDER BY created_at
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE token_billing_charges c SET {set}, lease_until = $5, updated_at = $2
                   FROM picked WHERE c.user_id = picked.user_id AND c.id = picked.id
                 RETURNING c.*
             ), audited AS (
                 INSERT INTO token_billing_audit (user_id, at, period, event)
                 SELECT claimed.user_id, $2, claimed.period, e.event
                   FROM claimed, LATERAL ({audit}) AS e(event)
             )
             SELECT {CHARGE_COLUMNS} FROM claimed ORDER BY created_at"
        );
        let rows = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(now)
            .bind(user.map(UserId::as_str))
            .bind(limit)
            .bind(lease_until)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        // The claim is committed: a row that cannot be read must not take the others with it.
        // It stays leased, and is taken again (and logged again) when its lease expires.
        Ok(rows
            .iter()
            .filter_map(|row| match charge_from(row) {
                Ok(charge) => Some(charge),
                Err(error) => {
                    tracing::error!(error = %error, "a claimed charge could not be read; it is skipped");
                    None
                }
            })
            .collect())
    }

    /// [`UsageStore::ensure_charge`].
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
        let mut tx = self.begin().await?;
        Self::ensure_summary(
            &mut tx,
            &user,
            charge.period,
            charge.amount.currency(),
            plan.as_ref(),
            now,
        )
        .await?;
        let created =
            Self::insert_charges(&mut tx, vec![charge], status, payment_id.as_deref(), now, lease_until).await?;
        tx.commit().await.map_err(db)?;
        match created.into_iter().next() {
            Some(charge) => Ok((charge, true)),
            None => {
                let existing = self.charge(&user, &key).await?.ok_or_else(|| StoreError::NotFound {
                    what: "charge",
                    key: key.to_string(),
                })?;
                Ok((existing, false))
            }
        }
    }

    /// [`UsageStore::renew_lease`].
    pub(super) async fn extend_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE token_billing_charges SET lease_until = $4
              WHERE user_id = $1 AND charge_key = $2 AND status = 'pending' AND lease_until IS NOT DISTINCT FROM $3
              RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(user.as_str())
        .bind(key.as_str())
        .bind(held_until)
        .bind(lease_until)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(charge_from).transpose()
    }

    /// [`UsageStore::settle_charge`].
    pub(super) async fn settle(&self, s: Settlement<'_>) -> Result<Charge, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND charge_key = $2 FOR UPDATE"
        ))
        .bind(s.user_id.as_str())
        .bind(s.key.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound {
            what: "charge",
            key: s.key.to_string(),
        })?;
        let current = charge_from(&row)?;
        if current.status != s.expected_status || current.round != s.expected_round {
            return Err(StoreError::StatusConflict {
                charge: Box::new(current),
            });
        }
        if !current.status.can_become(s.status) {
            return Err(StoreError::ForbiddenTransition {
                from: current.status,
                to: s.status,
            });
        }
        let succeeded = s.status == ChargeStatus::Succeeded;
        let replace_failure = !succeeded && (s.failure_code.is_some() || s.failure_message.is_some());
        let row = sqlx::query(&format!(
            "UPDATE token_billing_charges
                SET status = $3, payment_id = COALESCE($4, payment_id),
                    failure_code = CASE WHEN $5 THEN NULL WHEN $6 THEN $7 ELSE failure_code END,
                    failure_message = CASE WHEN $5 THEN NULL WHEN $6 THEN $8 ELSE failure_message END,
                    next_retry_at = $9, lease_until = $10, updated_at = $11
              WHERE user_id = $1 AND charge_key = $2
              RETURNING {CHARGE_COLUMNS}"
        ))
        .bind(s.user_id.as_str())
        .bind(s.key.as_str())
        .bind(s.status.as_str())
        .bind(s.payment_id.as_deref())
        .bind(succeeded)
        .bind(replace_failure)
        .bind(s.failure_code.as_deref())
        .bind(s.failure_message.as_deref())
        .bind(if s.status == ChargeStatus::Failed {
            s.next_retry_at
        } else {
            None
        })
        .bind(s.lease_until)
        .bind(s.at)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let charge = charge_from(&row)?;
        let delta = SummaryDelta::of(charge.kind, charge.amount.minor_units(), Some(current.status), s.status);
        Self::move_summary(&mut tx, s.user_id, charge.period, charge.amount.currency(), delta, s.at).await?;
        Self::audit(
            &mut tx,
            s.user_id,
            Some(charge.period),
            s.at,
            &[AuditEvent::ChargeStatusChanged {
                key: charge.key.clone(),
                from: current.status,
                to: s.status,
                payment_id: charge.payment_id.clone(),
                failure_code: charge.failure_code.clone(),
            }],
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(charge)
    }

    /// [`UsageStore::append_audit`].
    pub(super) async fn append_audit_entry(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        Self::audit(&mut tx, &entry.user_id, entry.period, entry.at, &[entry.event]).await?;
        tx.commit().await.map_err(db)
    }

    /// [`UsageStore::gateway_event_applied`].
    pub(super) async fn gateway_event_seen(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM token_billing_gateway_events WHERE user_id = $1 AND event_id = $2)",
        )
        .bind(user.as_str())
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// [`UsageStore::record_gateway_event`].
    pub(super) async fn insert_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        let audit = audit_json(&record.audit)?;
        // One statement: the id and its audit entry together, or neither.
        let inserted: i64 = sqlx::query_scalar(include_str!("sql/record_gateway_event.sql"))
            .bind(record.user_id.as_str())
            .bind(&record.event_id)
            .bind(&record.event_type)
            .bind(record.at)
            .bind(record.period.map(|p| p.to_string()))
            .bind(audit)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(inserted > 0)
    }

    /// [`UsageStore::charge`].
    pub(super) async fn read_charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND charge_key = $2"
        ))
        .bind(user.as_str())
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(charge_from).transpose()
    }

    /// [`UsageStore::charges`].
    pub(super) async fn read_charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges WHERE user_id = $1 AND period = $2
              ORDER BY kind DESC, block"
        ))
        .bind(user.as_str())
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }

    /// [`UsageStore::unpaid_charges`].
    pub(super) async fn read_unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = $1 AND status IN ('failed', 'requires_action') ORDER BY created_at, kind DESC, block"
        ))
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect()
    }
}
