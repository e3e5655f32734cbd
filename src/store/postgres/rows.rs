//! What [`PostgresUsageStore`](super::PostgresUsageStore)'s rooms share about PostgreSQL: reading
//! its rows into the library's types, converting numbers between the two, and mapping database
//! errors to [`StoreError`]s.

use std::str::FromStr;

use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

use crate::domain::{BillableTokens, Charge, ModelName, TokenClass, TokenCounts, TokenDetail, UsageRecord};
use crate::domain::{ChargeKey, ClientId, Currency, CustomerId, EventId, Metadata, Money, OperationType, PlanId};
use crate::store::{Account, AuditEvent, BoxError, CLASS_COLUMNS, PeriodSummary, StoreError};

const STORE: &str = "PostgreSQL store";

pub(super) fn generic(source: impl Into<BoxError>) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: source.into(),
    }
}

/// Maps a database error: connection problems and timeouts may be retried, the rest may not.
pub(super) fn db(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable {
                store: STORE,
                source: Box::new(error),
            }
        }
        // The connection was lost (class 08), or the server ended the session: shut down,
        // restarting, the backend terminated (57P01 - 57P03), or idle too long (57P05).
        sqlx::Error::Database(ref e)
            if e.code().is_some_and(|code| {
                code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "57P05")
            }) =>
        {
            StoreError::Unavailable {
                store: STORE,
                source: Box::new(error),
            }
        }
        other => generic(other),
    }
}

/// Whether the error is the same event committed concurrently by another caller (same event id,
/// or the very same consumption sent twice).
pub(super) fn is_duplicate_event(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().as_deref() == Some("23505")
            && matches!(e.constraint(), Some("token_consumption_user_id_event_id_key" | "token_consumption_pkey")))
}

/// Whether PostgreSQL aborted this transaction for a conflict with another: a lock cycle it
/// broke (40P01), or, where a deployment runs above the READ COMMITTED the store is written
/// for, a row another transaction changed (40001). Nothing of it was written, and it can run
/// again.
pub(super) fn is_deadlock(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if matches!(e.code().as_deref(), Some("40P01" | "40001")))
}

/// Whether a one-statement record gave up (`token_billing_give_up`), or could not run because
/// the schema lacks migration 5: either way it wrote nothing, and another way records the event.
pub(super) fn gave_up(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().as_deref() == Some("TB001")
            || (e.code().as_deref() == Some("42883") && e.message().contains("token_billing_give_up")))
}

pub(super) fn is_numeric_overflow(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("22003"))
}

/// A period's summary is in another currency than the charge or plan at hand.
pub(super) fn currency_mismatch(currency: Currency) -> StoreError {
    generic(format!("the period's summary is not in {currency}"))
}

pub(super) fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(generic)
}

pub(super) fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(generic)
}

pub(super) fn to_u32(value: i32) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(generic)
}

pub(super) fn parse<T: FromStr>(text: &str) -> Result<T, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse().map_err(generic)
}

pub(super) fn audit_json(event: &AuditEvent) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(event).map_err(generic)
}

pub(super) type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

pub(super) const ACCOUNT_COLUMNS: &str =
    "user_id, customer_id, plan_id, earlier_plans, subscription_id, created_at, updated_at, limits";

pub(super) fn account_from(row: &PgRow) -> Result<Account, StoreError> {
    let earlier: serde_json::Value = row.try_get("earlier_plans").map_err(db)?;
    Ok(Account {
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        customer_id: row
            .try_get::<Option<&str>, _>("customer_id")
            .map_err(db)?
            .map(parse::<CustomerId>)
            .transpose()?,
        plan_id: parse::<PlanId>(row.try_get::<&str, _>("plan_id").map_err(db)?)?,
        earlier_plans: serde_json::from_value(earlier).map_err(generic)?,
        subscription_id: row.try_get("subscription_id").map_err(db)?,
        limits: row
            .try_get::<Option<sqlx::types::Json<crate::domain::Limits>>, _>("limits")
            .map_err(db)?
            .map(|limits| limits.0),
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

pub(super) const CHARGE_COLUMNS: &str = "user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, \
     currency, status, round, attempts, consumption_id, payment_id, failure_code, failure_message, next_retry_at, \
     lease_until, created_at, updated_at";

pub(super) fn charge_from(row: &PgRow) -> Result<Charge, StoreError> {
    let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
    Ok(Charge {
        id: row.try_get("id").map_err(db)?,
        key: ChargeKey::from_stored(row.try_get::<String, _>("charge_key").map_err(db)?),
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        kind: parse(row.try_get::<&str, _>("kind").map_err(db)?)?,
        block: to_u64(row.try_get("block").map_err(db)?)?,
        billing_tier: row.try_get::<String, _>("billing_tier").map_err(db)?.into(),
        amount: Money::from_minor(row.try_get("amount_charged").map_err(db)?, currency),
        status: parse(row.try_get::<&str, _>("status").map_err(db)?)?,
        round: to_u32(row.try_get("round").map_err(db)?)?,
        attempts: to_u32(row.try_get("attempts").map_err(db)?)?,
        consumption_id: row.try_get("consumption_id").map_err(db)?,
        payment_id: row.try_get("payment_id").map_err(db)?,
        failure_code: row.try_get("failure_code").map_err(db)?,
        failure_message: row.try_get("failure_message").map_err(db)?,
        next_retry_at: row.try_get("next_retry_at").map_err(db)?,
        lease_until: row.try_get("lease_until").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

/// The columns [`usage_from`] reads of a `token_consumption` row.
pub(super) const CONSUMPTION_COLUMNS: &str = "user_id, id, event_id, period, tokens_used, operation_type, client_id,
    metadata, occurred_at, occurred_at_reported, created_at, model, input_tokens, cached_input_tokens,
    cache_write_tokens, output_tokens, reasoning_tokens, billable_tokens::text AS billable_tokens";

/// The columns of events' model, token classes and exact billable tokens (migration 9), as
/// arrays for a batch or one by one: NULL for an event whose report gave only `tokens_used`.
#[derive(Default)]
pub(super) struct DetailColumns<'a> {
    models: Vec<Option<&'a str>>,
    counts: [Vec<Option<i64>>; 5],
    billable: Vec<Option<String>>,
}

impl<'a> DetailColumns<'a> {
    /// Adds an event's columns.
    pub(super) fn push(&mut self, usage: &'a UsageRecord) -> Result<(), StoreError> {
        let detail = usage.detail.as_deref();
        self.models.push(usage.model().map(ModelName::as_str));
        let counts = detail.and_then(|d| d.counts);
        for (column, class) in self.counts.iter_mut().zip(TokenClass::ALL) {
            column.push(counts.map(|c| to_i64(c.get(class))).transpose()?);
        }
        self.billable.push(detail.map(|d| d.billable.to_string()));
        Ok(())
    }

    /// Binds the columns as arrays, in this order: model, the five classes in
    /// [`TokenClass::ALL`]'s order, billable tokens (text, cast to `numeric` by the statement).
    pub(super) fn bind_arrays<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        let query = query.bind(&self.models);
        self.counts
            .iter()
            .fold(query, |query, column| query.bind(column))
            .bind(&self.billable)
    }

    /// Binds one event's columns, in the order of [`bind_arrays`](Self::bind_arrays).
    pub(super) fn bind_one<'q>(usage: &'q UsageRecord, query: PgQuery<'q>) -> Result<PgQuery<'q>, StoreError> {
        let counts = usage.detail.as_ref().and_then(|d| d.counts);
        let mut query = query.bind(usage.model().map(ModelName::as_str));
        for class in TokenClass::ALL {
            query = query.bind(counts.map(|c| to_i64(c.get(class))).transpose()?);
        }
        Ok(query.bind(usage.detail.as_ref().map(|d| d.billable.to_string())))
    }
}

/// The model, token classes and billable tokens of a consumption row read with
/// [`CONSUMPTION_COLUMNS`].
fn detail_from(row: &PgRow) -> Result<Option<Box<TokenDetail>>, StoreError> {
    let Some(billable) = row.try_get::<Option<&str>, _>("billable_tokens").map_err(db)? else {
        return Ok(None);
    };
    let class = |column: &str| -> Result<Option<u64>, StoreError> {
        row.try_get::<Option<i64>, _>(column)
            .map_err(db)?
            .map(to_u64)
            .transpose()
    };
    let mut columns = [None; 5];
    for (value, column) in columns.iter_mut().zip(CLASS_COLUMNS) {
        *value = class(column)?;
    }
    let counts = TokenCounts::from_columns(columns);
    Ok(Some(Box::new(TokenDetail {
        model: row
            .try_get::<Option<&str>, _>("model")
            .map_err(db)?
            .map(parse::<ModelName>)
            .transpose()?,
        counts,
        billable: parse::<BillableTokens>(billable)?,
    })))
}

pub(super) fn usage_from(row: &PgRow) -> Result<UsageRecord, StoreError> {
    let metadata: serde_json::Value = row.try_get("metadata").map_err(db)?;
    Ok(UsageRecord {
        consumption_id: row.try_get("id").map_err(db)?,
        event_id: parse::<EventId>(row.try_get::<&str, _>("event_id").map_err(db)?)?,
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        tokens: to_u64(row.try_get("tokens_used").map_err(db)?)?,
        operation_type: parse::<OperationType>(row.try_get::<&str, _>("operation_type").map_err(db)?)?,
        client_id: row
            .try_get::<Option<&str>, _>("client_id")
            .map_err(db)?
            .map(parse::<ClientId>)
            .transpose()?,
        metadata: metadata_from(metadata)?,
        occurred_at: row.try_get("occurred_at").map_err(db)?,
        occurred_at_reported: row.try_get("occurred_at_reported").map_err(db)?,
        recorded_at: row.try_get("created_at").map_err(db)?,
        detail: detail_from(row)?,
    })
}

/// An event's metadata as stored. The library writes an object of texts; the original product's
/// `record_token_consumption`, which hosts may call beside it, takes any object: a value that is
/// not a text is read as its JSON text (`3`, `true`, `{"a":1}`), so that such an event reads
/// back, and is answered as the original when the library is sent it again with those texts.
fn metadata_from(stored: serde_json::Value) -> Result<Metadata, StoreError> {
    match stored {
        serde_json::Value::Object(entries) => Ok(entries
            .into_iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => (key, text),
                other => (key, other.to_string()),
            })
            .collect()),
        serde_json::Value::Null => Ok(Metadata::new()),
        other => Err(generic(format!(
            "an event's metadata is a JSON {}, not an object",
            match other {
                serde_json::Value::Array(_) => "array",
                _ => "scalar",
            }
        ))),
    }
}

pub(super) fn summary_from(row: &PgRow) -> Result<PeriodSummary, StoreError> {
    let currency: Currency = parse(row.try_get::<&str, _>("currency").map_err(db)?)?;
    let money = |column: &str| -> Result<Money, StoreError> {
        Ok(Money::from_minor(row.try_get(column).map_err(db)?, currency))
    };
    Ok(PeriodSummary {
        user_id: parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
        period: parse(row.try_get::<&str, _>("period").map_err(db)?)?,
        currency,
        total_tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
        billable_credit_micros: to_u32(row.try_get("billable_credit").map_err(db)?)?,
        events: to_u64(row.try_get("events").map_err(db)?)?,
        fixed_fee_charged: money("fixed_fee_charged")?,
        tier_charges_count: to_u64(row.try_get("tier_charges_count").map_err(db)?)?,
        tier_charges_total: money("tier_charges_total")?,
        outstanding_count: to_u64(row.try_get("outstanding_count").map_err(db)?)?,
        outstanding_total: money("outstanding_total")?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}
