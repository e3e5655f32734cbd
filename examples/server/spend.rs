//! Spend control over HTTP: holding tokens for a call in flight (`reserve`), recording its usage
//! (`settle`), freeing a hold unused (`release`), and how limits and holds are shown.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Value, json};
use token_billing::{Hold, Limits, Reservation, UserId};

use crate::app::{ApiError, AppState, json_object, optional_count, required_id, required_text, success};
use crate::usage::{Processed, usage_report};

/// A user's limits as the API shows them: `spendCap` in minor units, `tokenCap`, `paymentGate`.
pub(crate) fn limits_json(limits: &Limits) -> Value {
    json!({
        "spendCap": limits.spend_cap.map(|cap| cap.minor_units()),
        "tokenCap": limits.token_cap,
        "paymentGate": limits.payment_gate,
    })
}

/// A hold as the API shows it.
pub(crate) fn hold_json(hold: &Hold) -> Value {
    json!({
        "holdId": hold.hold_id,
        "tokens": hold.tokens,
        "createdAt": hold.created_at,
        "expiresAt": hold.expires_at,
    })
}

/// `POST /api/token-billing/reserve` `{userId, estimatedTokens, holdId?, ttlSeconds?}`: holds
/// tokens for a call whose size is known at its end; 402 with the limit (`reason`) and the tokens
/// still allowed when a limit refuses.
pub(crate) async fn reserve(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let body = json_object(&headers, body)?;
    let estimated = optional_count(&body, "estimatedTokens", 1)?
        .ok_or_else(|| ApiError::bad_request("estimatedTokens is required"))?;
    let mut reservation = Reservation::new(required_text(&body, "userId")?, estimated);
    reservation.hold_id = crate::app::optional_text(&body, "holdId")?;
    reservation.ttl = optional_count(&body, "ttlSeconds", 1)?.map(std::time::Duration::from_secs);
    let hold = state.billing().reserve(reservation).await?;
    Ok(success(json!({
        "holdId": hold.hold_id,
        "grantedTokens": hold.granted_tokens,
        "expiresAt": hold.expires_at,
        "remainingTokens": hold.remaining_tokens,
        "replayed": hold.replayed,
    })))
}

/// `POST /api/token-billing/settle` `{userId, holdId, tokensUsed, operationType, clientId?,
/// metadata?}`: records a held call's real usage under the hold's id, as process-usage answers
/// it, with the tokens used beyond the hold (`overshootTokens`); sent again, the same answer.
pub(crate) async fn settle(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let body = json_object(&headers, body)?;
    let hold_id = required_text(&body, "holdId")?;
    let report = usage_report(&body)?;
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Settled {
        #[serde(flatten)]
        processed: Processed,
        held_tokens: Option<u64>,
        overshoot_tokens: u64,
    }
    let settled = state.billing().settle_hold(&hold_id, report).await?;
    Ok(success(Settled {
        processed: Processed::from(settled.outcome),
        held_tokens: settled.held_tokens,
        overshoot_tokens: settled.overshoot_tokens,
    }))
}

/// `POST /api/token-billing/release` `{userId, holdId}`: frees a hold without usage.
pub(crate) async fn release(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let body = json_object(&headers, body)?;
    let user: UserId = required_id(&body, "userId")?;
    let hold_id = required_text(&body, "holdId")?;
    let released = state.billing().release_hold(&user, &hold_id).await?;
    Ok(success(json!({ "holdId": hold_id, "released": released })))
}
