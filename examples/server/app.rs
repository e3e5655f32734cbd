//! The routes, their handlers, and how requests and errors are read and answered.
//!
//! Every answer is the original product's envelope: `{"success": true, "data": ...}`, or
//! `{"success": false, "error": "..."}` with a 4xx status for the caller's mistakes and a 5xx
//! status for the service's own failures.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use token_billing::{
    BillableTokens, BillingError, BillingService, Charge, Clock, CustomerId, FeeCollection, GatewayError, LimitKind,
    Limits, Money, Period, PeriodKey, Plan, PlanId, TierCharge, TokenSummary, UserId,
};

use crate::auth::{Auth, AuthError, Caller};
use crate::{spend, usage};

/// The largest request body accepted, in bytes.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// The largest webhook body accepted: Stripe's invoice events can be large.
const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// The most points the dashboard's usage line has (one per hour of a 31-day month).
const MAX_TIMELINE_POINTS: i64 = 744;

/// The Stripe gateway whose webhooks the service receives: `StripeGateway` with the feature
/// `stripe`, and a type with no value without it.
#[cfg(feature = "stripe")]
pub(crate) type StripeWebhooks = token_billing::gateway::stripe::StripeGateway;
/// The Stripe gateway whose webhooks the service receives: none in this build.
#[cfg(not(feature = "stripe"))]
#[derive(Debug, Clone)]
pub(crate) enum StripeWebhooks {}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    billing: BillingService,
    auth: Auth,
    clock: Arc<dyn Clock>,
    stripe: Option<StripeWebhooks>,
}

impl AppState {
    /// The state over a billing service, the credentials, the clock tokens are checked
    /// against, and the Stripe gateway whose webhooks are received, if any.
    pub(crate) fn new(
        billing: BillingService,
        auth: Auth,
        clock: Arc<dyn Clock>,
        stripe: Option<StripeWebhooks>,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                billing,
                auth,
                clock,
                stripe,
            }),
        }
    }

    pub(crate) fn billing(&self) -> &BillingService {
        &self.inner.billing
    }

    /// Who sent the request.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.inner
            .auth
            .caller(header, self.inner.clock.now())
            .map_err(ApiError::unauthorized)
    }

    /// The host's backend, or 401/403.
    pub(crate) fn backend(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Caller::Backend => Ok(()),
            Caller::User(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this endpoint takes the service's API key, not a user token",
            )),
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// For a refusal by a limit (402): the limit, and the tokens still allowed.
    limit: Option<(LimitKind, u64)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            limit: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(error: AuthError) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, error.to_string())
    }

    /// A rejected body: too large, unreadable.
    fn body(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "the body is larger than this endpoint accepts")
        } else {
            ApiError::new(status, rejection.body_text())
        }
    }

    /// A failure of the service itself: logged in full, answered with what failed only.
    fn internal(status: StatusCode, error: &BillingError) -> ApiError {
        tracing::error!(error = ?error, "request failed");
        let what = match error {
            BillingError::Gateway(_) => "the payment gateway failed; retry later",
            BillingError::Store(_) => "the billing store is unavailable; retry later",
            _ => "internal error",
        };
        ApiError::new(status, what)
    }
}

impl From<BillingError> for ApiError {
    fn from(error: BillingError) -> ApiError {
        if let BillingError::LimitExceeded {
            limit,
            remaining_tokens,
        } = error
        {
            return ApiError {
                limit: Some((limit, remaining_tokens)),
                ..ApiError::new(StatusCode::PAYMENT_REQUIRED, error.to_string())
            };
        }
        let status = match &error {
            BillingError::EventConflict { .. }
            | BillingError::EventForgotten { .. }
            | BillingError::PlanChangeMidPeriod { .. }
            | BillingError::FeeCollectedByLibrary
            | BillingError::OtherCustomer { .. }
            | BillingError::NoCustomer { .. } => StatusCode::CONFLICT,
            BillingError::ChargeNotFound { .. } => StatusCode::NOT_FOUND,
            // The gateway refused the request itself (a customer it does not have, a bad
            // parameter): the same request would be refused again, so it is the caller's to
            // change, with the gateway's reason; not a failure to retry later.
            BillingError::Gateway(refusal @ GatewayError::Rejected { .. }) => {
                return ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the payment gateway refused the request: {refusal}"),
                );
            }
            BillingError::Gateway(_) => StatusCode::BAD_GATEWAY,
            BillingError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ if error.is_client_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            return ApiError::internal(status, &error);
        }
        ApiError::new(status, error.to_string())
    }
}

/// The original product's envelope, its fields in its order; a refusal by a limit adds the
/// limit (`reason`) and the tokens still allowed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<T> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<LimitKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_tokens: Option<u64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let envelope: Envelope<()> = Envelope {
            success: false,
            data: None,
            error: Some(self.message),
            reason: self.limit.map(|(limit, _)| limit),
            remaining_tokens: self.limit.map(|(_, remaining)| remaining),
        };
        let mut response = (self.status, axum::Json(envelope)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub(crate) fn success<T: Serialize>(data: T) -> Response {
    axum::Json(Envelope {
        success: true,
        data: Some(data),
        error: None,
        reason: None,
        remaining_tokens: None,
    })
    .into_response()
}

/// Every route: method, path (OpenAPI's syntax, which is axum's) and handler. The OpenAPI
/// document is checked against this table by the tests.
fn table() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("GET", "/", get(about)),
        ("POST", "/api/token-billing/process-usage", post(usage::process_usage)),
        ("GET", "/api/token-billing/user-summary/{userId}", get(user_summary)),
        (
            "POST",
            "/api/token-billing/create-subscription",
            post(create_subscription),
        ),
        ("POST", "/api/token-billing/accounts", post(register_account)),
        ("POST", "/api/token-billing/reserve", post(spend::reserve)),
        ("POST", "/api/token-billing/settle", post(spend::settle)),
        ("POST", "/api/token-billing/release", post(spend::release)),
        (
            "GET",
            "/api/token-billing/usage-by-operation/{userId}",
            get(usage_by_operation),
        ),
        (
            "GET",
            "/api/token-billing/usage-by-model/{userId}",
            get(usage::usage_by_model),
        ),
        (
            "GET",
            "/api/token-billing/charges-by-tier/{userId}",
            get(charges_by_tier),
        ),
        ("GET", "/api/token-billing/dashboard/{userId}", get(dashboard_data)),
        (
            "POST",
            "/api/token-billing/webhooks/stripe",
            post(stripe_webhook).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
        ),
        ("GET", "/api/token-billing/openapi.json", get(openapi)),
        ("GET", "/metrics", get(crate::prometheus::scrape)),
        ("GET", "/dashboard/{userId}", get(dashboard_page)),
    ]
}

/// The routes served, as (method, path).
pub(crate) fn routes() -> Vec<(&'static str, &'static str)> {
    table().into_iter().map(|(method, path, _)| (method, path)).collect()
}

/// The service's router.
pub(crate) fn app(state: AppState) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| router.route(path, handler))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A read of one user's data: the `{userId}` of the path, which the caller may read, and the
/// optional `?period=YYYY-MM`.
///
/// The credentials are checked first: a caller without them is answered 401 whatever the
/// path and the query hold, and learns nothing from how they are read.
pub(crate) struct Reader {
    pub(crate) user: UserId,
    pub(crate) period: Option<PeriodKey>,
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        #[derive(Deserialize)]
        struct PeriodQuery {
            period: Option<String>,
        }
        let caller = state.caller(&parts.headers)?;
        let Path(user) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("userId: {}", e.body_text())))?;
        if !caller.may_read(&user) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "a user token reads only its own user's data",
            ));
        }
        let user: UserId = checked("userId", user)?;
        let Query(query) = Query::<PeriodQuery>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let period: Option<PeriodKey> = query
            .period
            .map(|p| {
                p.parse()
                    .map_err(|e| ApiError::bad_request(format!("period must be YYYY-MM: {e}")))
            })
            .transpose()?;
        Ok(Reader { user, period })
    }
}

/// A JSON object body: the body limit, the content type and the syntax checked.
pub(crate) fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(ApiError::body)?;
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json",
        ));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(error) => Err(ApiError::bad_request(format!("malformed JSON: {error}"))),
    }
}

/// A required string field.
pub(crate) fn required_text(body: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("{field} is required"))),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a string"))),
    }
}

/// An optional string field.
pub(crate) fn optional_text(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ApiError::bad_request(format!("{field} must be a string"))),
    }
}

/// An optional boolean field.
pub(crate) fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{field} must be true or false, not {}",
            kind_of(other)
        ))),
    }
}

/// An optional field that is a whole number (`at_least` or more).
pub(crate) fn optional_count(body: &Map<String, Value>, field: &str, at_least: u64) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(count) if count >= at_least => Ok(Some(count)),
            _ => Err(ApiError::bad_request(format!(
                "{field} must be a whole number of at least {at_least}, not {n}"
            ))),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "{field} must be a number, not {}",
            kind_of(other)
        ))),
    }
}

/// An identifier checked by the library's rules.
pub(crate) fn checked<T, E>(field: &str, text: String) -> Result<T, ApiError>
where
    T: TryFrom<String, Error = E>,
    E: std::fmt::Display,
{
    T::try_from(text).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

/// A required string field that is an identifier, checked by the library's rules.
pub(crate) fn required_id<T>(body: &Map<String, Value>, field: &str) -> Result<T, ApiError>
where
    T: TryFrom<String>,
    T::Error: std::fmt::Display,
{
    checked(field, required_text(body, field)?)
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The original product's summary, in its order.
#[derive(Serialize)]
struct SummaryFields<'a> {
    total_tokens: u64,
    current_tier: &'a str,
    fixed_fee_charged: i64,
    tier_charges_count: u64,
    tier_charges_total: i64,
    total_charged: i64,
}

impl<'a> From<&'a TokenSummary> for SummaryFields<'a> {
    fn from(summary: &'a TokenSummary) -> Self {
        SummaryFields {
            total_tokens: summary.total_tokens,
            current_tier: &summary.current_tier,
            fixed_fee_charged: summary.fixed_fee_charged,
            tier_charges_count: summary.tier_charges_count,
            tier_charges_total: summary.tier_charges_total,
            total_charged: summary.total_charged,
        }
    }
}

/// `GET /api/token-billing/user-summary/{userId}`: the original product's `getUserTokenSummary`,
/// with the user's limits, the tokens they still allow and the holds open now.
async fn user_summary(State(state): State<AppState>, Reader { user, period }: Reader) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct UserSummary<'a> {
        #[serde(flatten)]
        summary: SummaryFields<'a>,
        limits: Value,
        remaining_tokens: Option<u64>,
        held_tokens: u64,
        open_holds: Vec<Value>,
        billable_tokens: BillableTokens,
        tokens_by_class: Value,
    }
    let billing = state.billing();
    let summary = billing.token_summary(&user, period).await?;
    let by_model = billing.usage_by_model(&user, Some(summary.period)).await?;
    let check = billing.check_usage(&user, 0).await?;
    let holds = billing.open_holds(&user).await?;
    Ok(success(UserSummary {
        summary: SummaryFields::from(&summary),
        limits: spend::limits_json(&check.limits),
        remaining_tokens: check.remaining_tokens,
        held_tokens: check.held_tokens,
        open_holds: holds.iter().map(spend::hold_json).collect(),
        billable_tokens: summary.billable_tokens,
        tokens_by_class: usage::class_split(&by_model),
    }))
}

/// `POST /api/token-billing/accounts`: links a user to the customer who pays (and a plan).
async fn register_account(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let body = json_object(&headers, body)?;
    let user: UserId = required_id(&body, "userId")?;
    let customer: CustomerId = required_id(&body, "customerId")?;
    let plan: Option<PlanId> = optional_text(&body, "planId")?
        .map(|p| checked("planId", p))
        .transpose()?;
    let spend_cap = optional_count(&body, "spendCap", 0)?;
    let token_cap = optional_count(&body, "tokenCap", 0)?;
    let payment_gate = optional_bool(&body, "paymentGate")?;
    let billing = state.billing();
    let mut account = billing.register_account(&user, Some(customer), plan).await?;
    if spend_cap.is_some() || token_cap.is_some() || payment_gate.is_some() {
        // The limits named replace the account's; the spend cap is in the plan's currency.
        let currency = billing.plan(&account.plan_id)?.currency();
        let spend_cap = spend_cap
            .map(|cap| i64::try_from(cap).map_err(|_| ApiError::bad_request("spendCap is too large")))
            .transpose()?;
        let limits = Limits {
            spend_cap: spend_cap.map(|cap| Money::from_minor(cap, currency)),
            token_cap,
            payment_gate: payment_gate.unwrap_or(false),
        };
        account = billing.set_limits(&user, Some(limits)).await?;
    }
    let limits = account
        .limits
        .unwrap_or_else(|| billing.plan(&account.plan_id).map(Plan::limits).unwrap_or_default());
    Ok(success(json!({
        "userId": account.user_id,
        "customerId": account.customer_id,
        "planId": account.plan_id,
        "limits": spend::limits_json(&limits),
    })))
}

/// The answer to create-subscription: the original product's subscription, and which mode
/// collects the fixed fee. With the library collecting it there is no subscription
/// (`subscriptionId` is null): `status` is the period's fixed-fee charge's, and
/// `fixedFeeCharge` that charge, as `tierCharges` show charges.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Subscribed {
    subscription_id: Option<String>,
    customer_id: CustomerId,
    status: Value,
    fee_collection: FeeCollection,
    fixed_fee_charge: Option<TierCharge>,
}

/// `POST /api/token-billing/create-subscription`: the original product's monthly fee for the
/// user whose customer is named. With a gateway subscription collecting the fee, the gateway
/// subscribes the customer; with the library collecting it, the current period is opened and
/// its fee charged now, once. Either way the customer is registered for the user only once the
/// gateway has accepted it.
async fn create_subscription(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    let body = json_object(&headers, body)?;
    let customer: CustomerId = required_id(&body, "customerId")?;
    // Only a missing userId gets the reason it is needed (the original product's body had
    // none); a mistyped or invalid one is answered as any other field's.
    let user: UserId = match body.get("userId") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "userId is required: the fixed fee is collected and recorded for that user",
            ));
        }
        Some(_) => required_id(&body, "userId")?,
    };
    let billing = state.billing();
    let moved = |error: BillingError| match error {
        error @ BillingError::OtherCustomer { .. } => ApiError::new(
            StatusCode::CONFLICT,
            format!("{error}: change it with POST /api/token-billing/accounts first"),
        ),
        error => error.into(),
    };
    let fee_collection = billing.fee_collection();
    let subscribed = if fee_collection == FeeCollection::Subscription {
        let subscription = billing.subscribe_customer(&user, customer).await.map_err(moved)?;
        Subscribed {
            subscription_id: Some(subscription.subscription_id),
            customer_id: subscription.customer_id,
            status: Value::String(subscription.status),
            fee_collection,
            fixed_fee_charge: None,
        }
    } else {
        let fee = billing
            .open_period_for_customer(&user, customer.clone())
            .await
            .map_err(moved)?
            .ok_or_else(|| {
                tracing::error!("the library collects the fixed fee, yet opened no fee charge");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            })?;
        let fee = TierCharge::from(&fee);
        Subscribed {
            subscription_id: None,
            customer_id: customer,
            status: serde_json::to_value(fee.status).unwrap_or(Value::Null),
            fee_collection,
            fixed_fee_charge: Some(fee),
        }
    };
    Ok(success(subscribed))
}

/// `GET /api/token-billing/usage-by-operation/{userId}`: the original product's first monitoring query.
async fn usage_by_operation(
    State(state): State<AppState>,
    Reader { user, period }: Reader,
) -> Result<Response, ApiError> {
    let rows = state.billing().usage_by_operation(&user, period).await?;
    Ok(success(Value::Array(
        rows.iter()
            .map(|r| json!({"operation_type": r.operation_type, "total_tokens": r.total_tokens, "operations": r.operations}))
            .collect(),
    )))
}

/// `GET /api/token-billing/charges-by-tier/{userId}`: the original product's second monitoring query.
async fn charges_by_tier(State(state): State<AppState>, Reader { user, period }: Reader) -> Result<Response, ApiError> {
    let rows = state.billing().charges_by_tier(&user, period).await?;
    Ok(success(Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "billing_tier": r.billing_tier,
                    "charges_count": r.charges_count,
                    "total_charged": r.total_charged.minor_units(),
                    "collected": r.collected.minor_units(),
                })
            })
            .collect(),
    )))
}

/// The plan that rates `period` for the user. One no longer in the catalogue is the
/// service's misconfiguration, not the caller's mistake.
async fn plan_of(billing: &BillingService, user: &UserId, period: PeriodKey) -> Result<Plan, ApiError> {
    let account = billing.store().account(user).await.map_err(BillingError::from)?;
    let plan = match account {
        Some(account) => billing.plan(account.plan_for(period)),
        None => Ok(billing.default_plan()),
    };
    plan.cloned()
        .map_err(|e| ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, &e))
}

fn charge_row(charge: &Charge) -> Value {
    json!({
        "id": charge.id,
        "kind": charge.kind,
        "block": charge.block,
        "billing_tier": charge.billing_tier,
        "amount_charged": charge.amount.minor_units(),
        "status": charge.status,
        "failure_code": charge.failure_code,
        "created_at": charge.created_at,
    })
}

/// Cumulative usage over the period, at most one point per bucket of the period's length.
fn timeline(mut events: Vec<(DateTime<Utc>, BillableTokens)>, period: &Period) -> Vec<Value> {
    let span = (period.end() - period.start()).num_seconds().max(1);
    let mut points: Vec<(i64, DateTime<Utc>, BillableTokens)> = Vec::new();
    let mut total = BillableTokens::ZERO;
    events.sort_unstable_by_key(|(at, _)| *at);
    for (at, billable) in events {
        total = total.checked_add(billable).unwrap_or(total);
        let bucket = (at - period.start()).num_seconds().clamp(0, span - 1) * MAX_TIMELINE_POINTS / span;
        match points.last_mut() {
            Some(last) if last.0 == bucket => {
                last.1 = at;
                last.2 = total;
            }
            _ => points.push((bucket, at, total)),
        }
    }
    // Billable totals as the period rounds them: up to a whole token.
    points
        .into_iter()
        .map(|(_, at, total)| json!({"at": at, "totalTokens": total.rounded_up()}))
        .collect()
}

/// `GET /api/token-billing/dashboard/{userId}`: everything the dashboard page draws.
async fn dashboard_data(State(state): State<AppState>, Reader { user, period }: Reader) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Summary<'a> {
        #[serde(flatten)]
        original: SummaryFields<'a>,
        outstanding_count: u64,
        outstanding_total: i64,
    }
    let billing = state.billing();
    let summary = billing.token_summary(&user, period).await?;
    let plan = plan_of(billing, &user, summary.period).await?;
    let period = billing.period(&user, Some(summary.period)).await?;
    let events = billing
        .store()
        .consumptions(&user, summary.period)
        .await
        .map_err(BillingError::from)?
        .into_iter()
        .map(|c| (c.occurred_at, c.billable()))
        .collect();
    let charges = billing.charges(&user, Some(summary.period)).await?;
    let check = billing.check_usage(&user, 0).await?;
    let holds = billing.open_holds(&user).await?;
    let alerts = billing.pending_alerts(Some(&user), 50).await?;
    let by_model = billing.usage_by_model(&user, Some(summary.period)).await?;
    let cap_tokens = check.limits.ceiling(&plan).unwrap_or_default().cap_tokens();
    Ok(success(json!({
        "userId": user,
        "period": {"key": summary.period, "start": period.start(), "end": period.end(), "zone": plan.zone().name()},
        "plan": {
            "currency": plan.currency(),
            "exponent": plan.currency().exponent(),
            "fixedFee": plan.fixed_fee().minor_units(),
            "includedTokens": plan.included_tokens(),
            "blockSize": plan.block_size(),
            "blockPrice": plan.block_price().minor_units(),
        },
        "summary": Summary {
            original: SummaryFields::from(&summary),
            outstanding_count: summary.outstanding_count,
            outstanding_total: summary.outstanding_total,
        },
        "billableTokens": summary.billable_tokens,
        "tokensByClass": usage::class_split(&by_model),
        "byModel": by_model.iter().map(usage::model_row).collect::<Vec<_>>(),
        "timeline": timeline(events, &period),
        "charges": charges.iter().map(charge_row).collect::<Vec<_>>(),
        "spend": {
            "limits": spend::limits_json(&check.limits),
            "capTokens": cap_tokens,
            "remainingTokens": check.remaining_tokens,
            "limitedBy": check.limited_by,
            "heldTokens": check.held_tokens,
            "openHolds": holds.iter().map(spend::hold_json).collect::<Vec<_>>(),
        },
        "alerts": alerts.iter().map(|alert| json!({
            "id": alert.id,
            "kind": alert.kind.key(),
            "totalTokens": alert.total_tokens,
            "createdAt": alert.created_at,
        })).collect::<Vec<_>>(),
    })))
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy: only its own inline script and style (by hash), and
/// requests to this origin.
fn dashboard_policy() -> &'static HeaderValue {
    static POLICY: OnceLock<HeaderValue> = OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = |open: &str, close: &str| {
            let start = DASHBOARD.find(open).map(|i| i + open.len()).unwrap_or(0);
            let end = DASHBOARD[start..].find(close).map_or(start, |i| start + i);
            let digest = ring::digest::digest(&ring::digest::SHA256, &DASHBOARD.as_bytes()[start..end]);
            format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
        };
        let policy = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>")
        );
        HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
    })
}

/// `GET /dashboard/{userId}`: the page; it reads its data with the token in the URL's fragment,
/// which browsers never send to the server.
async fn dashboard_page() -> Response {
    let mut response = Html(DASHBOARD).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, dashboard_policy().clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /`: what this service is, and which mode collects the fixed fee.
async fn about(State(state): State<AppState>) -> Response {
    success(json!({
        "service": "token-billing",
        "version": env!("CARGO_PKG_VERSION"),
        "feeCollection": state.billing().fee_collection(),
        "openapi": "/api/token-billing/openapi.json",
    }))
}

/// `GET /api/token-billing/openapi.json`.
async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

/// `POST /api/token-billing/webhooks/stripe`: Stripe's events, signature-checked, applied once.
async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let stripe = state
        .inner
        .stripe
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "Stripe is not configured (STRIPE_SECRET_KEY)"))?;
    let body = body.map_err(ApiError::body)?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("missing Stripe-Signature"))?;
    apply_stripe_event(&state, stripe, &body, signature).await
}

#[cfg(feature = "stripe")]
async fn apply_stripe_event(
    state: &AppState,
    stripe: &StripeWebhooks,
    body: &[u8],
    signature: &str,
) -> Result<Response, ApiError> {
    use token_billing::gateway::stripe::WebhookError;

    let event = match stripe.webhook_event(body, signature).await {
        Ok(Some(event)) => event,
        Ok(None) => return Ok(success(json!({"applied": false}))),
        Err(WebhookError::Gateway(error)) => return Err(BillingError::Gateway(error).into()),
        Err(error @ WebhookError::NotConfigured) => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, error.to_string()));
        }
        Err(error) => return Err(ApiError::bad_request(error.to_string())),
    };
    match state.billing().apply_gateway_event(event).await {
        Ok(applied) => Ok(success(json!({"applied": applied.is_some()}))),
        // A payment of a charge this service does not know: acknowledged, so Stripe stops.
        Err(BillingError::ChargeNotFound { key }) => {
            tracing::warn!(charge = %key, "webhook for an unknown charge");
            Ok(success(json!({"applied": false})))
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(not(feature = "stripe"))]
async fn apply_stripe_event(
    _state: &AppState,
    stripe: &StripeWebhooks,
    _body: &[u8],
    _signature: &str,
) -> Result<Response, ApiError> {
    match *stripe {}
}
