//! Recording usage in [`SqliteUsageStore`]: one event, placed and recorded in one write
//! transaction, and the answer to a re-sent one.
//!
//! SQLite writes one transaction at a time, so the event's whole step runs in Rust inside the
//! transaction, with the rules every store shares: the total moves by
//! [`BillableTotal::plus`](crate::BillableTotal::plus), the charges are [`charges_for_growth`]'s, the alerts
//! [`AlertPolicy::crossed`](crate::AlertPolicy::crossed)'s. Nothing is visible until the commit,
//! and an error drops the transaction, which rolls it back.

use std::sync::Arc;

use sqlx::{Row, SqliteConnection};

use super::SqliteUsageStore;
use super::charges::{insert_charges, read_summary, write_summary};
use super::rows::{
    ACCOUNT_COLUMNS, CHARGE_COLUMNS, CONSUMPTION_COLUMNS, account_from, audit_json, charge_from, db, instant, json,
    micros, to_i64, usage_from,
};
use super::spend::{free_hold, insert_alert};
use crate::domain::{
    Blocks, ChargeKey, ChargeKind, ChargeStatus, EventId, ModelName, TokenClass, UsageRecord, UserId,
    charges_for_growth,
};
use crate::store::{
    Account, Alert, AuditEvent, PeriodSummary, PlacedUsage, Placement, Placer, RecordUsage, Recorded, StoreError,
};

impl SqliteUsageStore {
    /// [`UsageStore::record_usage`](crate::UsageStore::record_usage). The account is not
    /// cached, so the one the event was placed with needs no check.
    pub(super) async fn record_event(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        let placement = Placement {
            plan: request.plan,
            fee: request.fee,
            lease_until: request.lease_until,
            alerting: request.alerting,
        };
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let seen = seen_in(&mut tx, &request.usage.user_id, &request.usage.event_id).await?;
        let recorded = record_in(&mut tx, request.usage, placement, &seen).await?;
        tx.commit().await.map_err(db)?;
        Ok(recorded)
    }

    /// [`UsageStore::place_and_record_usage`](crate::UsageStore::place_and_record_usage): the
    /// account is read in the write transaction that records the event, so no change to it can
    /// come between the placing and the record.
    pub(super) async fn place_and_record<'p>(
        &self,
        mut usage: UsageRecord,
        place: &mut Placer<'_, 'p>,
    ) -> Result<PlacedUsage<'p>, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let mut seen = seen_in(&mut tx, &usage.user_id, &usage.event_id).await?;
        let account = seen.account.take();
        let Some(placement) = place(&mut usage, account.as_ref()) else {
            return Ok(PlacedUsage::Refused {
                usage: Box::new(usage),
                account: account.map(Box::new),
            });
        };
        let recorded = record_in(&mut tx, usage, placement, &seen).await?;
        tx.commit().await.map_err(db)?;
        Ok(PlacedUsage::Recorded {
            account: account.filter(|_| !recorded.charges.is_empty()).map(Box::new),
            recorded,
            placement,
        })
    }

    /// [`UsageStore::record_usage_batch`](crate::UsageStore::record_usage_batch): the whole
    /// batch in one write transaction (one commit), each event as `record_usage` records it;
    /// an event refused on its own merits is rolled back alone, to a savepoint.
    pub(super) async fn record_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        let mut writer = self.writer().await?;
        let mut tx = writer.begin().await?;
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let placement = Placement {
                plan: request.plan,
                fee: request.fee,
                lease_until: request.lease_until,
                alerting: request.alerting,
            };
            sqlx::query("SAVEPOINT token_billing_event")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let seen = seen_in(&mut tx, &request.usage.user_id, &request.usage.event_id).await?;
            match record_in(&mut tx, request.usage, placement, &seen).await {
                Ok(recorded) => results.push(Ok(recorded)),
                Err(
                    refused @ (StoreError::EventConflict { .. }
                    | StoreError::EventForgotten { .. }
                    | StoreError::TotalOverflow { .. }
                    | StoreError::Rating(_)),
                ) => {
                    sqlx::query("ROLLBACK TO token_billing_event")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    results.push(Err(refused));
                }
                Err(failure) => return Err(failure),
            }
            sqlx::query("RELEASE token_billing_event")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(results)
    }

    /// [`UsageStore::recorded_event`](crate::UsageStore::recorded_event).
    pub(super) async fn find_recorded_event(
        &self,
        user: &UserId,
        event_id: &EventId,
    ) -> Result<Option<Recorded>, StoreError> {
        let mut tx = self.read().await?;
        replay_in(&mut tx, user, event_id).await
    }
}

/// What a write transaction reads of an event's user before it records the event, in one
/// statement: the account, whether the event id is recorded, and whether a hold has its id.
struct Seen {
    account: Option<Account>,
    recorded: bool,
    held: bool,
}

/// Reads [`Seen`] for `event_id` of `user`.
async fn seen_in(conn: &mut SqliteConnection, user: &UserId, event_id: &EventId) -> Result<Seen, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {ACCOUNT_COLUMNS},
                EXISTS (SELECT 1 FROM token_consumption WHERE user_id = ?1 AND event_id = ?2) AS recorded,
                EXISTS (SELECT 1 FROM token_billing_holds WHERE user_id = ?1 AND hold_id = ?2) AS held
           FROM (SELECT 1) LEFT JOIN token_billing_accounts ON user_id = ?1"
    ))
    .bind(user.as_str())
    .bind(event_id.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let has_account = row.try_get::<Option<&str>, _>("user_id").map_err(db)?.is_some();
    Ok(Seen {
        account: if has_account { Some(account_from(&row)?) } else { None },
        recorded: row.try_get("recorded").map_err(db)?,
        held: row.try_get("held").map_err(db)?,
    })
}

/// Records `usage` under `placement` in the write transaction `conn` is in, `seen` read in it
/// before; see the store contract.
async fn record_in(
    conn: &mut SqliteConnection,
    usage: UsageRecord,
    placement: Placement<'_>,
    seen: &Seen,
) -> Result<Recorded, StoreError> {
    let Placement {
        plan,
        fee,
        lease_until,
        alerting,
    } = placement;
    // As stored, so that a re-send compares with the original as it was sent.
    let mut usage = usage;
    usage.occurred_at = micros(usage.occurred_at);
    usage.recorded_at = micros(usage.recorded_at);
    let user = &usage.user_id;
    if seen.recorded {
        let original = replay_in(conn, user, &usage.event_id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "consumption",
                key: usage.event_id.to_string(),
            })?;
        let answer = original.answer_resend(&usage)?;
        if seen.held {
            free_hold(conn, user, answer.usage.period, &usage.event_id).await?;
        }
        return Ok(answer);
    }

    let period = usage.period;
    let now = usage.recorded_at;
    let mut summary = read_summary(conn, user, period)
        .await?
        .unwrap_or_else(|| PeriodSummary::empty(user.clone(), period, plan.currency(), now));
    let total = summary.billable_total();
    let before = total.tokens;
    let moved = total.plus(usage.billable()).ok_or(StoreError::TotalOverflow {
        total: before,
        tokens: usage.tokens,
    })?;
    let after = moved.tokens;
    let new_charges = charges_for_growth(plan, fee, user, period, before, after, Some(usage.consumption_id))?;
    let blocks = plan.blocks_crossed(before, after)?;
    let created = insert_charges(
        conn,
        &mut summary,
        new_charges,
        ChargeStatus::Pending,
        None,
        now,
        lease_until,
    )
    .await?;
    summary.total_tokens = after;
    summary.billable_credit_micros = moved.credit_micros;
    summary.events += 1;
    summary.updated_at = now;
    write_summary(conn, &summary, Some(plan)).await?;
    let created_fee = created.iter().any(|c| c.kind == ChargeKind::FixedFee);
    insert_consumption(conn, &usage, (before, after), created_fee, blocks).await?;
    if seen.held {
        free_hold(conn, user, period, &usage.event_id).await?;
    }
    if let Some(alerting) = &alerting {
        for kind in alerting.policy.crossed(plan, &alerting.ceiling, before, after) {
            insert_alert(conn, &Alert::new(user.clone(), period, kind, after, now)).await?;
        }
    }
    Ok(Recorded {
        usage: Arc::new(usage),
        total_before: before,
        total_after: after,
        charges: created,
        replayed: false,
    })
}

/// Appends the consumption row. Its audit entry is written by the schema's trigger, in the
/// same statement.
async fn insert_consumption(
    conn: &mut SqliteConnection,
    usage: &UsageRecord,
    (before, after): (u64, u64),
    created_fee: bool,
    blocks: Blocks,
) -> Result<(), StoreError> {
    let detail = usage.detail.as_deref();
    let counts = detail.and_then(|d| d.counts);
    let mut query = sqlx::query(
        "INSERT INTO token_consumption (user_id, id, event_id, period, tokens_used, operation_type, client_id,
             metadata, occurred_at, occurred_at_reported, created_at, total_before, total_after, created_fee,
             first_block, end_block, model, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
             reasoning_tokens, billable_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
                 ?22, ?23)",
    )
    .bind(usage.user_id.as_str())
    .bind(usage.consumption_id.to_string())
    .bind(usage.event_id.as_str())
    .bind(usage.period.to_string())
    .bind(to_i64(usage.tokens)?)
    .bind(usage.operation_type.as_str())
    .bind(usage.client_id.as_ref().map(|c| c.as_str().to_owned()))
    .bind(json(&usage.metadata)?)
    .bind(instant(usage.occurred_at))
    .bind(usage.occurred_at_reported)
    .bind(instant(usage.recorded_at))
    .bind(to_i64(before)?)
    .bind(to_i64(after)?)
    .bind(created_fee)
    .bind(to_i64(blocks.first())?)
    .bind(to_i64(blocks.end())?)
    .bind(usage.model().map(ModelName::as_str));
    for class in TokenClass::ALL {
        query = query.bind(counts.map(|c| to_i64(c.get(class))).transpose()?);
    }
    query
        .bind(detail.map(|d| d.billable.to_string()))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Appends an audit entry in the transaction `conn` is in.
pub(super) async fn append_audit_in(
    conn: &mut SqliteConnection,
    user: &UserId,
    at: chrono::DateTime<chrono::Utc>,
    period: Option<crate::domain::PeriodKey>,
    event: &AuditEvent,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO token_billing_audit (user_id, at, period, event) VALUES (?1, ?2, ?3, ?4)")
        .bind(user.as_str())
        .bind(instant(at))
        .bind(period.map(|p| p.to_string()))
        .bind(audit_json(event)?)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// The outcome of the event recorded under `event_id`, as a replay.
async fn replay_in(
    conn: &mut SqliteConnection,
    user: &UserId,
    event_id: &EventId,
) -> Result<Option<Recorded>, StoreError> {
    let Some(row) = sqlx::query(&format!(
        "SELECT {CONSUMPTION_COLUMNS}, total_before, total_after, created_fee, first_block, end_block
           FROM token_consumption WHERE user_id = ?1 AND event_id = ?2"
    ))
    .bind(user.as_str())
    .bind(event_id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?
    else {
        return Ok(None);
    };
    let usage = usage_from(&row)?;
    let count = |column: &str| super::rows::count(&row, column);
    let blocks = Blocks::new(count("first_block")?, count("end_block")?);
    let created_fee: bool = row.try_get("created_fee").map_err(db)?;
    let keys: Vec<String> = created_fee
        .then(|| ChargeKey::new(user, usage.period, ChargeKind::FixedFee, 0))
        .into_iter()
        .chain(
            blocks
                .into_iter()
                .map(|b| ChargeKey::new(user, usage.period, ChargeKind::Block, b)),
        )
        .map(|key| key.as_str().to_owned())
        .collect();
    let mut charges = Vec::with_capacity(keys.len());
    if !keys.is_empty() {
        let rows = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = ?1 AND charge_key IN (SELECT value FROM json_each(?2)) ORDER BY rowid"
        ))
        .bind(user.as_str())
        .bind(json(&keys)?)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        for row in &rows {
            charges.push(charge_from(row)?);
        }
    }
    Ok(Some(Recorded {
        total_before: count("total_before")?,
        total_after: count("total_after")?,
        usage: Arc::new(usage),
        charges,
        replayed: true,
    }))
}
