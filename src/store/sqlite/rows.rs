//! What [`SqliteUsageStore`](super::SqliteUsageStore)'s rooms share about SQLite: instants as
//! text, reading rows into the library's types, converting numbers, and mapping database
//! errors to [`StoreError`]s.

use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::domain::{
    BillableTokens, Charge, ChargeKey, ClientId, Currency, CustomerId, EventId, Metadata, ModelName, Money,
    OperationType, PlanId, TokenCounts, TokenDetail, UsageRecord,
};
use crate::store::{Account, AuditEvent, BoxError, CLASS_COLUMNS, PeriodSummary, StoreError};

const STORE: &str = "SQLite store";

/// How instants are written: UTC, fixed width, to the microsecond. SQLite's own format, so its
/// date functions read it, and text order is time order.
const INSTANT: &str = "%Y-%m-%d %H:%M:%S%.6f";

pub(super) fn generic(source: impl Into<BoxError>) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: source.into(),
    }
}

/// Whether SQLite answered that another connection holds the lock it needs (`SQLITE_BUSY`,
/// `SQLITE_LOCKED` and their extended codes) after the busy timeout: nothing was written.
pub(super) fn is_busy(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().and_then(|code| code.parse::<u32>().ok()).is_some_and(|code| matches!(code & 0xff, 5 | 6)))
}

/// Maps a database error: a lock held too long by another process, connection problems and
/// timeouts may be retried, the rest may not.
pub(super) fn db(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable {
                store: STORE,
                source: Box::new(error),
            }
        }
        busy if is_busy(&busy) => StoreError::Unavailable {
            store: STORE,
            source: Box::new(busy),
        },
        other => generic(other),
    }
}

/// `at` as the store keeps it, to the microsecond: what a write answers, and what a
/// compare-and-set compares, so that a caller's finer instant names what was stored.
pub(super) fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    at.trunc_subsecs(6)
}

/// A charge's instants as the store keeps them.
pub(super) fn charge_as_stored(charge: &mut Charge) {
    charge.next_retry_at = charge.next_retry_at.map(micros);
    charge.lease_until = charge.lease_until.map(micros);
    charge.created_at = micros(charge.created_at);
    charge.updated_at = micros(charge.updated_at);
}

/// An account's instants as the store keeps them.
pub(super) fn account_as_stored(mut account: Account) -> Account {
    account.created_at = micros(account.created_at);
    account.updated_at = micros(account.updated_at);
    account
}

pub(super) fn instant(at: DateTime<Utc>) -> String {
    at.format(INSTANT).to_string()
}

fn parse_instant(text: &str) -> Result<DateTime<Utc>, StoreError> {
    NaiveDateTime::parse_from_str(text, INSTANT)
        .map(|naive| naive.and_utc())
        .map_err(|e| generic(format!("the instant {text:?} is not in the store's format: {e}")))
}

/// An instant column.
pub(super) fn at(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    parse_instant(row.try_get::<&str, _>(column).map_err(db)?)
}

/// An instant column that may be NULL.
pub(super) fn maybe_at(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get::<Option<&str>, _>(column)
        .map_err(db)?
        .map(parse_instant)
        .transpose()
}

pub(super) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(generic)
}

pub(super) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(generic)
}

fn to_u32(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(generic)
}

/// An integer column, as an unsigned count.
pub(super) fn count(row: &SqliteRow, column: &str) -> Result<u64, StoreError> {
    to_u64(row.try_get(column).map_err(db)?)
}

pub(super) fn parse<T: FromStr>(text: &str) -> Result<T, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse().map_err(generic)
}

/// A text column parsed into `T`.
pub(super) fn text<T: FromStr>(row: &SqliteRow, column: &str) -> Result<T, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    parse(row.try_get::<&str, _>(column).map_err(db)?)
}

/// A text column that may be NULL, parsed into `T`.
pub(super) fn maybe_text<T: FromStr>(row: &SqliteRow, column: &str) -> Result<Option<T>, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    row.try_get::<Option<&str>, _>(column)
        .map_err(db)?
        .map(parse)
        .transpose()
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(generic)
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<T, StoreError> {
    serde_json::from_str(row.try_get::<&str, _>(column).map_err(db)?).map_err(generic)
}

pub(super) fn audit_json(event: &AuditEvent) -> Result<String, StoreError> {
    json(event)
}

pub(super) const ACCOUNT_COLUMNS: &str =
    "user_id, customer_id, plan_id, earlier_plans, subscription_id, limits, created_at, updated_at";

pub(super) fn account_from(row: &SqliteRow) -> Result<Account, StoreError> {
    Ok(Account {
        user_id: text(row, "user_id")?,
        customer_id: maybe_text::<CustomerId>(row, "customer_id")?,
        plan_id: text::<PlanId>(row, "plan_id")?,
        earlier_plans: from_json(row, "earlier_plans")?,
        subscription_id: row.try_get("subscription_id").map_err(db)?,
        limits: row
            .try_get::<Option<&str>, _>("limits")
            .map_err(db)?
            .map(|limits| serde_json::from_str(limits).map_err(generic))
            .transpose()?,
        created_at: at(row, "created_at")?,
        updated_at: at(row, "updated_at")?,
    })
}

pub(super) const CHARGE_COLUMNS: &str = "user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, \
     currency, status, round, attempts, consumption_id, payment_id, failure_code, failure_message, next_retry_at, \
     lease_until, created_at, updated_at";

pub(super) fn charge_from(row: &SqliteRow) -> Result<Charge, StoreError> {
    let currency: Currency = text(row, "currency")?;
    Ok(Charge {
        id: text(row, "id")?,
        key: ChargeKey::from_stored(row.try_get::<String, _>("charge_key").map_err(db)?),
        user_id: text(row, "user_id")?,
        period: text(row, "period")?,
        kind: text(row, "kind")?,
        block: count(row, "block")?,
        billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
        amount: Money::from_minor(row.try_get("amount_charged").map_err(db)?, currency),
        status: text(row, "status")?,
        round: to_u32(row.try_get("round").map_err(db)?)?,
        attempts: to_u32(row.try_get("attempts").map_err(db)?)?,
        consumption_id: maybe_text(row, "consumption_id")?,
        payment_id: row.try_get("payment_id").map_err(db)?,
        failure_code: row.try_get("failure_code").map_err(db)?,
        failure_message: row.try_get("failure_message").map_err(db)?,
        next_retry_at: maybe_at(row, "next_retry_at")?,
        lease_until: maybe_at(row, "lease_until")?,
        created_at: at(row, "created_at")?,
        updated_at: at(row, "updated_at")?,
    })
}

/// The columns [`usage_from`] reads of a `token_consumption` row.
pub(super) const CONSUMPTION_COLUMNS: &str = "user_id, id, event_id, period, tokens_used, operation_type, client_id,
    metadata, occurred_at, occurred_at_reported, created_at, model, input_tokens, cached_input_tokens,
    cache_write_tokens, output_tokens, reasoning_tokens, billable_tokens";

/// The token classes of a consumption row: `None` for an event that reported none.
pub(super) fn counts_from(row: &SqliteRow) -> Result<Option<TokenCounts>, StoreError> {
    let mut columns = [None; 5];
    for (value, column) in columns.iter_mut().zip(CLASS_COLUMNS) {
        *value = row
            .try_get::<Option<i64>, _>(column)
            .map_err(db)?
            .map(to_u64)
            .transpose()?;
    }
    Ok(TokenCounts::from_columns(columns))
}

/// The model, token classes and billable tokens of a consumption row: `None` for an event
/// reported with `tokens_used` alone.
fn detail_from(row: &SqliteRow) -> Result<Option<Box<TokenDetail>>, StoreError> {
    let Some(billable) = maybe_text::<BillableTokens>(row, "billable_tokens")? else {
        return Ok(None);
    };
    let counts = counts_from(row)?;
    Ok(Some(Box::new(TokenDetail {
        model: maybe_text::<ModelName>(row, "model")?,
        counts,
        billable,
    })))
}

pub(super) fn usage_from(row: &SqliteRow) -> Result<UsageRecord, StoreError> {
    Ok(UsageRecord {
        consumption_id: text(row, "id")?,
        event_id: text::<EventId>(row, "event_id")?,
        user_id: text(row, "user_id")?,
        period: text(row, "period")?,
        tokens: count(row, "tokens_used")?,
        operation_type: text::<OperationType>(row, "operation_type")?,
        client_id: maybe_text::<ClientId>(row, "client_id")?,
        metadata: from_json::<Metadata>(row, "metadata")?,
        occurred_at: at(row, "occurred_at")?,
        occurred_at_reported: row.try_get("occurred_at_reported").map_err(db)?,
        recorded_at: at(row, "created_at")?,
        detail: detail_from(row)?,
    })
}

pub(super) const SUMMARY_COLUMNS: &str = "user_id, period, currency, total_tokens, billable_credit, events, \
     fixed_fee_charged, tier_charges_count, tier_charges_total, outstanding_count, outstanding_total, updated_at";

pub(super) fn summary_from(row: &SqliteRow) -> Result<PeriodSummary, StoreError> {
    let currency: Currency = text(row, "currency")?;
    let money = |column: &str| -> Result<Money, StoreError> {
        Ok(Money::from_minor(row.try_get(column).map_err(db)?, currency))
    };
    Ok(PeriodSummary {
        user_id: text(row, "user_id")?,
        period: text(row, "period")?,
        currency,
        total_tokens: count(row, "total_tokens")?,
        billable_credit_micros: to_u32(row.try_get("billable_credit").map_err(db)?)?,
        events: count(row, "events")?,
        fixed_fee_charged: money("fixed_fee_charged")?,
        tier_charges_count: count(row, "tier_charges_count")?,
        tier_charges_total: money("tier_charges_total")?,
        outstanding_count: count(row, "outstanding_count")?,
        outstanding_total: money("outstanding_total")?,
        updated_at: at(row, "updated_at")?,
    })
}
