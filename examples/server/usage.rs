//! Usage reports over HTTP: process-usage's body read into a [`UsageReport`] (the original
//! product's fields; the model and the tokens by class; or a provider's usage object as the
//! provider returned it), its answer, and the usage by model.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use token_billing::{
    AnthropicUsage, BillingError, LimitKind, ModelUsage, ProviderUsage, TokenClass, TokenCounts, UsageError,
    UsageReport,
};

use crate::app::{
    ApiError, AppState, Reader, json_object, kind_of, optional_bool, optional_count, optional_text, required_text,
    success,
};

/// The report's fields as another naming would spell them: a host sending `event_id` instead of
/// `eventId` would lose the retry's dedupe without a word, so these are refused by name.
const MISSPELLED_FIELDS: [(&str, &str); 8] = [
    ("user_id", "userId"),
    ("tokens_used", "tokensUsed"),
    ("operation_type", "operationType"),
    ("client_id", "clientId"),
    ("event_id", "eventId"),
    ("occurred_at", "occurredAt"),
    ("idempotencyKey", "eventId"),
    ("usageMetadata", "usage"),
];

/// The token classes as the API spells them, in [`TokenClass::ALL`]'s order.
const CLASS_FIELDS: [&str; 5] = ["input", "cachedInput", "cacheWrite", "output", "reasoning"];

/// The `tokens` object: each class a whole number, those left out zero.
fn token_counts(tokens: &Value) -> Result<TokenCounts, ApiError> {
    let Value::Object(fields) = tokens else {
        return Err(ApiError::bad_request(format!(
            "tokens must be an object of token classes ({}), not {}",
            CLASS_FIELDS.join(", "),
            kind_of(tokens)
        )));
    };
    if let Some(unknown) = fields.keys().find(|key| !CLASS_FIELDS.contains(&key.as_str())) {
        return Err(ApiError::bad_request(format!(
            "tokens.{unknown} is not a token class: the classes are {}",
            CLASS_FIELDS.join(", ")
        )));
    }
    let count = |field: &str| optional_count(fields, field, 0).map(Option::unwrap_or_default);
    Ok(TokenCounts {
        input: count("input")?,
        cached_input: count("cachedInput")?,
        cache_write: count("cacheWrite")?,
        output: count("output")?,
        reasoning: count("reasoning")?,
    })
}

/// A provider's usage object, named by `provider`: read by the provider's documented rules.
fn provider_counts(provider: &str, usage: &Value) -> Result<TokenCounts, ApiError> {
    if !matches!(provider, "openai" | "anthropic" | "gemini") {
        return Err(ApiError::bad_request(format!(
            "provider is openai, anthropic or gemini, not {provider}"
        )));
    }
    let invalid =
        |e: token_billing::UsageObjectError| ApiError::from(BillingError::InvalidUsage(UsageError::UsageObject(e)));
    // An Anthropic stream's reports, oldest first (message_start's usage, then message_delta's):
    // each later one's counts replace the earlier ones', as the stream's usage is cumulative.
    if let (Value::Array(reports), "anthropic") = (usage, provider) {
        let mut whole = AnthropicUsage::default();
        for report in reports {
            let report: AnthropicUsage = serde_json::from_value(report.clone())
                .map_err(|e| ApiError::bad_request(format!("usage is not anthropic's usage objects: {e}")))?;
            whole = whole.updated_by(&report);
        }
        return whole.token_counts().map_err(invalid);
    }
    if !usage.is_object() {
        return Err(ApiError::bad_request(format!(
            "usage must be the provider's usage object (for anthropic, or its stream's reports in order), not {}",
            kind_of(usage)
        )));
    }
    let read: ProviderUsage = serde_json::from_value(json!({ "provider": provider, "usage": usage }))
        .map_err(|e| ApiError::bad_request(format!("usage is not {provider}'s usage object: {e}")))?;
    read.token_counts().map_err(invalid)
}

/// The usage report of a process-usage body.
pub(crate) fn usage_report(body: &Map<String, Value>) -> Result<UsageReport, ApiError> {
    if let Some((field, meant)) = MISSPELLED_FIELDS.iter().find(|(field, _)| body.contains_key(*field)) {
        return Err(ApiError::bad_request(format!(
            "unknown field {field}: the API's fields are camelCase ({meant}); nothing was recorded"
        )));
    }
    let given = |field: &str| body.get(field).filter(|value| !value.is_null());
    let counts = match (given("tokens"), optional_text(body, "provider")?, given("usage")) {
        (None, None, None) => None,
        (Some(tokens), None, None) => Some(token_counts(tokens)?),
        (None, Some(provider), Some(usage)) => Some(provider_counts(&provider, usage)?),
        (None, Some(_), None) => {
            return Err(ApiError::bad_request(
                "provider comes with usage, the provider's usage object",
            ));
        }
        (None, None, Some(_)) => {
            return Err(ApiError::bad_request(
                "usage comes with provider (openai, anthropic or gemini)",
            ));
        }
        (Some(_), _, _) => {
            return Err(ApiError::bad_request(
                "give the tokens by class (tokens) or the provider's usage object (provider, usage), not both",
            ));
        }
    };
    let tokens = match body.get("tokensUsed") {
        None | Some(Value::Null) if counts.is_some() => 0,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "tokensUsed is required, unless tokens or a provider's usage object says it",
            ));
        }
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            ApiError::bad_request(format!("tokensUsed must be a positive whole number of tokens, not {n}"))
        })?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "tokensUsed must be a number, not {}",
                kind_of(other)
            )));
        }
    };
    let mut report = UsageReport::new(
        required_text(body, "userId")?,
        tokens,
        required_text(body, "operationType")?,
    );
    report.token_counts = counts;
    report.model = optional_text(body, "model")?;
    report.client_id = optional_text(body, "clientId")?;
    report.event_id = optional_text(body, "eventId")?;
    report.enforce_limits = optional_bool(body, "enforceLimits")?.unwrap_or(false);
    if let Some(at) = optional_text(body, "occurredAt")? {
        report.occurred_at = Some(
            DateTime::parse_from_rfc3339(&at)
                .map_err(|e| ApiError::bad_request(format!("occurredAt must be an RFC 3339 instant: {e}")))?
                .with_timezone(&Utc),
        );
    }
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(entries)) => {
            let mut pairs = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let Value::String(value) = value else {
                    return Err(ApiError::bad_request(format!("metadata.{key} must be a string")));
                };
                pairs.push((key, value));
            }
            // Built whole: two allocations, however many keys.
            report.metadata = pairs.into_iter().collect();
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "metadata must be an object of strings, not {}",
                kind_of(other)
            )));
        }
    }
    Ok(report)
}

/// The original product's answer to a usage report, in its order, with the limit reached and
/// the tokens the event added to the period's billable total.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Processed {
    consumption_id: uuid::Uuid,
    total_tokens: u64,
    tier_charges: Vec<token_billing::TierCharge>,
    /// The limit the user's period has reached, or null.
    limit_exceeded: Option<LimitKind>,
    billable_tokens: u64,
}

impl From<token_billing::UsageOutcome> for Processed {
    fn from(outcome: token_billing::UsageOutcome) -> Self {
        Processed {
            consumption_id: outcome.consumption_id,
            total_tokens: outcome.total_tokens,
            tier_charges: outcome.tier_charges,
            limit_exceeded: outcome.limit_exceeded,
            billable_tokens: outcome.billable_tokens,
        }
    }
}

/// `POST /api/token-billing/process-usage`: the original product's `processTokenUsage`.
pub(crate) async fn process_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let report = usage_report(&json_object(&headers, body)?)?;
    let outcome = state.billing().process_token_usage(report).await?;
    Ok(success(Processed::from(outcome)))
}

/// Token counts as the API spells them.
pub(crate) fn counts_json(counts: &TokenCounts) -> Value {
    CLASS_FIELDS
        .iter()
        .zip(TokenClass::ALL)
        .map(|(field, class)| ((*field).to_owned(), json!(counts.get(class))))
        .collect::<Map<_, _>>()
        .into()
}

/// A row of the usage by model as the API spells it.
pub(crate) fn model_row(row: &ModelUsage) -> Value {
    json!({
        "model": row.model,
        "events": row.events,
        "totalTokens": row.total_tokens,
        "tokens": counts_json(&row.counts),
        "unclassifiedTokens": row.unclassified_tokens(),
        "billableTokens": row.billable,
    })
}

/// The period's tokens by class, all models together, and those reported without classes.
pub(crate) fn class_split(rows: &[ModelUsage]) -> Value {
    let total = rows.iter().fold(TokenCounts::default(), |sum, row| {
        sum.checked_add(&row.counts).unwrap_or(sum)
    });
    let mut split = counts_json(&total);
    if let Value::Object(fields) = &mut split {
        let unclassified = rows
            .iter()
            .map(ModelUsage::unclassified_tokens)
            .fold(0u64, u64::saturating_add);
        fields.insert("unclassified".to_owned(), json!(unclassified));
    }
    split
}

/// `GET /api/token-billing/usage-by-model/{userId}`: tokens by class and billable tokens by
/// model in the period.
pub(crate) async fn usage_by_model(
    State(state): State<AppState>,
    Reader { user, period }: Reader,
) -> Result<Response, ApiError> {
    let rows = state.billing().usage_by_model(&user, period).await?;
    Ok(success(rows.iter().map(model_row).collect::<Vec<_>>()))
}
