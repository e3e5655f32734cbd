//! [`StripeGateway`] (feature `stripe`): block charges as off-session PaymentIntents, the fixed
//! fee as a monthly subscription, and signed webhooks turned into [`GatewayEvent`](crate::GatewayEvent)s.
//!
//! This file holds the gateway and its [`PaymentGateway`] operations; `config` the secret key
//! and the builder; `client` the HTTP client and its retries; `objects` reading Stripe's
//! objects; `webhook` signatures; `events` turning webhook events into gateway events.
//!
//! # How it talks to Stripe
//! - Each charge is one PaymentIntent, created and confirmed in one call (`confirm=true`,
//!   `off_session=true`) on the customer's default payment method, in the charge's currency and
//!   minor units, with the round's idempotency key as `Idempotency-Key` and the charge key in its
//!   metadata.
//! - A PaymentIntent is found again by its charge key through the search API
//!   ([`find_payment`](PaymentGateway::find_payment)), which the service calls before it
//!   collects a charge that may have been attempted: Stripe forgets idempotency keys after 24
//!   hours, so after a crash a resumed charge is settled with the payment already made, never
//!   paid twice. Stripe's search index lags writes by up to a minute; the service only looks up
//!   charges whose lease (2 minutes by default) has expired, and within 24 hours the idempotency
//!   key answers first anyway.
//! - Requests are retried as Stripe's official clients retry them, at most
//!   [`max_retries`](StripeGatewayBuilder::max_retries) times (2), with jittered exponential
//!   backoff: any answer Stripe marks `Stripe-Should-Retry: true`, none it marks `false`, and
//!   without the header connection errors, timeouts, 409, 5xx and 429 lock timeouts; other 4xx
//!   never. A payment whose outcome stays unknown is reported as
//!   [`GatewayError::OutcomeUnknown`]: its charge stays pending for
//!   [`resume_pending`](crate::BillingService::resume_pending), never failed.
//! - Statuses: `succeeded`; `processing` (pending, settled later by webhook); `requires_action`
//!   and `authentication_required` declines (awaiting the customer); other `402` declines
//!   (declined, with the decline code); `canceled`.
//!
//! # Example
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use token_billing::gateway::stripe::StripeGateway;
//! use token_billing::{BillingService, InMemoryUsageStore};
//!
//! let stripe = StripeGateway::builder(std::env::var("STRIPE_SECRET_KEY")?)
//!     .webhook_secret(std::env::var("STRIPE_WEBHOOK_SECRET")?)
//!     .build()?;
//! let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(stripe.clone())).build();
//!
//! // In the webhook endpoint, with the raw body and the `Stripe-Signature` header:
//! # let (body, signature): (Vec<u8>, String) = (Vec::new(), String::new());
//! if let Some(event) = stripe.webhook_event(&body, &signature).await? {
//!     billing.apply_gateway_event(event).await?;
//! }
//! # Ok(()) }
//! ```

mod client;
mod config;
mod events;
mod objects;
mod webhook;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::StatusCode;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{info, warn};

use self::client::{ApiError, Call, Form, NoAnswer, Reply, StripeClient, query, segment};
pub use self::config::{SecretKey, StripeConfigError, StripeGatewayBuilder};
use self::objects::{id_of, payment_outcome, refused_payment, text};
pub use self::webhook::{DEFAULT_TOLERANCE, WebhookError, WebhookSecret, sign, verify_signature};
use super::{GatewayError, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus, Subscription, metadata_key};
use crate::clock::Clock;
use crate::domain::{ChargeKey, Currency, CustomerId, Money, Plan, PlanId, UserId};

const GATEWAY: &str = "stripe";

/// Stripe's API, the default base.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// The API version the gateway is written against, sent as `Stripe-Version` unless changed.
pub const API_VERSION: &str = "2024-06-20";

/// Metadata keys the gateway puts on the subscriptions it creates, to recognise their invoices.
const USER_KEY: &str = "token_billing_user";
const PLAN_KEY: &str = "token_billing_plan";

/// The most search pages read for one charge; each holds 100 payments.
const MAX_SEARCH_PAGES: usize = 10;

/// The [`PaymentGateway`] for Stripe; see the [module documentation](self) for what it does.
/// Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct StripeGateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: StripeClient,
    deadline: Duration,
    webhook_secrets: Vec<WebhookSecret>,
    webhook_tolerance: Duration,
    payment_method_types: Vec<String>,
    clock: Arc<dyn Clock>,
}

/// No answer: the outcome is unknown, unless nothing was sent.
fn unknown(error: NoAnswer) -> GatewayError {
    match error {
        NoAnswer::Unsendable(source) => rejected("invalid_request", source.to_string()),
        error => GatewayError::OutcomeUnknown {
            gateway: GATEWAY,
            source: Box::new(error),
        },
    }
}

fn rejected(code: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::Rejected {
        gateway: GATEWAY,
        code: code.into(),
        message: message.into(),
    }
}

/// A final refusal as a gateway error.
fn refused(status: StatusCode, error: ApiError) -> GatewayError {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return GatewayError::Unauthorized { gateway: GATEWAY };
    }
    rejected(error.best_code(), error.message)
}

fn unreadable(what: impl fmt::Display) -> GatewayError {
    GatewayError::OutcomeUnknown {
        gateway: GATEWAY,
        source: format!("unreadable answer from Stripe: {what}").into(),
    }
}

/// An object reply, or the refusal as an error.
fn object(reply: Result<Reply, NoAnswer>) -> Result<Value, GatewayError> {
    match reply.map_err(unknown)? {
        Reply::Object(value) => Ok(value),
        Reply::Refused { status, error } => Err(refused(status, error)),
    }
}

/// Stripe's currency code: ISO 4217, lower case.
fn currency_code(currency: Currency) -> String {
    currency.code().to_ascii_lowercase()
}

/// An amount as Stripe takes it: the currency's minor units, but for the two special cases of
/// Stripe's. ISK, a zero-decimal currency, is sent as a two-decimal amount (5 ISK is 500);
/// three-decimal currencies are charged in multiples of ten minor units only.
fn stripe_amount(amount: Money) -> Result<i64, GatewayError> {
    let minor = amount.minor_units();
    match amount.currency() {
        Currency::ISK => minor
            .checked_mul(100)
            .ok_or_else(|| rejected("amount_too_large", format!("cannot charge {amount}"))),
        currency if currency.exponent() == 3 && minor % 10 != 0 => Err(rejected(
            "amount_not_supported",
            format!("{amount} has a non-zero last decimal, which Stripe cannot charge"),
        )),
        _ => Ok(minor),
    }
}

/// An amount as Stripe reports it, back in the library's minor units: the inverse of
/// [`stripe_amount`]. `None` for an ISK amount with decimals, which no charge of the library's
/// can have.
fn library_amount(amount: i64, currency: Currency) -> Option<Money> {
    match currency {
        Currency::ISK if amount % 100 != 0 => None,
        Currency::ISK => Some(Money::from_minor(amount / 100, currency)),
        _ => Some(Money::from_minor(amount, currency)),
    }
}

/// A payment made for a charge, as found by search.
#[derive(Debug)]
struct Found {
    /// When it was created (Unix seconds; 0 when Stripe did not say).
    created: i64,
    /// The collection round its metadata names.
    round: Option<u32>,
    /// Its state.
    outcome: PaymentOutcome,
}

/// The payment to keep among a charge's: a succeeded one first, else the latest still in
/// flight (processing, awaiting the customer); `None` when each was declined or canceled.
fn payment_to_keep(found: &[Found]) -> Option<PaymentOutcome> {
    let succeeded = found.iter().find(|f| f.outcome.status == PaymentStatus::Succeeded);
    succeeded
        .or_else(|| {
            found
                .iter()
                .filter(|f| {
                    matches!(
                        f.outcome.status,
                        PaymentStatus::Processing | PaymentStatus::RequiresAction
                    )
                })
                .max_by_key(|f| f.created)
        })
        .map(|f| f.outcome.clone())
}

impl StripeGateway {
    /// The API base requests go to.
    pub fn api_base(&self) -> &str {
        self.inner.client.base()
    }

    /// The deadline of an operation starting now.
    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.deadline
    }

    async fn send(&self, call: Call<'_>, deadline: Instant) -> Result<Reply, NoAnswer> {
        self.inner.client.send(&call, deadline).await
    }

    /// Sends a call whose answer must be an object.
    async fn fetch(&self, call: Call<'_>, deadline: Instant) -> Result<Value, GatewayError> {
        object(self.send(call, deadline).await)
    }

    /// Reads an object that may not exist (`GET`): `None` when Stripe answers 404.
    async fn fetch_if_exists(&self, path: String, deadline: Instant) -> Result<Option<Value>, GatewayError> {
        match self.send(Call::get(path), deadline).await {
            Ok(Reply::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            other => object(other).map(Some),
        }
    }

    /// Attaches a payment method to a customer and makes it the default for the customer's
    /// payments (off-session charges, subscription invoices). Returns the attached payment
    /// method's id: a test token such as `pm_card_visa` becomes a new `pm_...`.
    ///
    /// # Errors
    /// [`GatewayError::Rejected`] when Stripe refuses (a card declined on attachment, an
    /// unknown customer); [`GatewayError::OutcomeUnknown`] without an answer.
    pub async fn set_default_payment_method(
        &self,
        customer: &CustomerId,
        payment_method: &str,
    ) -> Result<String, GatewayError> {
        let deadline = self.deadline();
        let key = format!("tb:attach:{customer}:{payment_method}");
        let attached = self
            .fetch(
                Call::post(
                    format!("/v1/payment_methods/{}/attach", segment(payment_method)),
                    vec![("customer".to_owned(), customer.to_string())],
                    &key,
                ),
                deadline,
            )
            .await?;
        let id = text(&attached, "id")
            .ok_or_else(|| unreadable("an attached payment method without id"))?
            .to_owned();
        // Setting a default twice is harmless, but a key that repeats would replay an earlier
        // setting of this card over a later one of another (A, then B, then A again within the
        // day Stripe keeps keys, would leave B): each setting has a key of its own.
        let key = default_payment_method_key(customer, &id);
        self.fetch(
            Call::post(
                format!("/v1/customers/{}", segment(customer.as_str())),
                vec![("invoice_settings[default_payment_method]".to_owned(), id.clone())],
                &key,
            ),
            deadline,
        )
        .await?;
        Ok(id)
    }

    /// The customer's default payment method: the invoice default, else the default source.
    async fn default_payment_method(&self, customer: &CustomerId, deadline: Instant) -> Result<String, GatewayError> {
        let found = self
            .fetch(
                Call::get(format!("/v1/customers/{}", segment(customer.as_str()))),
                deadline,
            )
            .await?;
        if found.get("deleted").and_then(Value::as_bool) == Some(true) {
            return Err(rejected("resource_missing", format!("customer {customer} was deleted")));
        }
        found
            .get("invoice_settings")
            .and_then(|settings| id_of(settings, "default_payment_method"))
            .or_else(|| id_of(&found, "default_source"))
            .map(str::to_owned)
            .ok_or_else(|| {
                rejected(
                    "no_payment_method",
                    format!("customer {customer} has no default payment method"),
                )
            })
    }

    /// Every PaymentIntent whose metadata names the charge, through the search API.
    async fn payments_for(&self, charge_key: &ChargeKey, deadline: Instant) -> Result<Vec<Value>, GatewayError> {
        let escaped = charge_key.as_str().replace('\\', "\\\\").replace('\'', "\\'");
        let search = format!("metadata['{}']:'{escaped}'", metadata_key::CHARGE_KEY);
        let mut found = Vec::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_SEARCH_PAGES {
            let mut params = vec![("query", search.as_str()), ("limit", "100")];
            if let Some(page) = &page {
                params.push(("page", page));
            }
            let result = self
                .fetch(
                    Call::get(format!("/v1/payment_intents/search?{}", query(&params))),
                    deadline,
                )
                .await?;
            let data = result
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| unreadable("a search result without data"))?;
            found.extend(
                data.iter()
                    .filter(|pi| {
                        pi.get("metadata").and_then(|m| text(m, metadata_key::CHARGE_KEY)) == Some(charge_key.as_str())
                    })
                    .cloned(),
            );
            let more = result.get("has_more").and_then(Value::as_bool) == Some(true);
            page = text(&result, "next_page").map(str::to_owned);
            if !more || page.is_none() {
                return Ok(found);
            }
        }
        Err(unreadable(format!(
            "more than {} payments for {charge_key}",
            MAX_SEARCH_PAGES * 100
        )))
    }

    /// Every payment made for a charge, read; an unreadable one makes the answer unknown
    /// rather than hide a success.
    async fn found_payments(&self, charge_key: &ChargeKey, deadline: Instant) -> Result<Vec<Found>, GatewayError> {
        self.payments_for(charge_key, deadline)
            .await?
            .iter()
            .map(|intent| -> Result<Found, GatewayError> {
                Ok(Found {
                    created: intent.get("created").and_then(Value::as_i64).unwrap_or(0),
                    round: intent
                        .get("metadata")
                        .and_then(|m| text(m, metadata_key::ROUND))
                        .and_then(|r| r.parse().ok()),
                    outcome: payment_outcome(intent).map_err(unreadable)?,
                })
            })
            .collect()
    }

    /// The payment to keep for a charge: a succeeded one first, else the latest still in
    /// flight.
    async fn payment_for(
        &self,
        charge_key: &ChargeKey,
        deadline: Instant,
    ) -> Result<Option<PaymentOutcome>, GatewayError> {
        Ok(payment_to_keep(&self.found_payments(charge_key, deadline).await?))
    }

    /// The id of the Stripe plan that bills a plan's fixed fee monthly, created if missing. The
    /// id names the fee and currency, so a changed fee is a new Stripe plan.
    async fn fee_plan(&self, plan_id: &PlanId, plan: &Plan, deadline: Instant) -> Result<String, GatewayError> {
        let fee = plan.fixed_fee();
        let currency = currency_code(fee.currency());
        let id = format!("tb-fee-{plan_id}-{}-{currency}", fee.minor_units());
        if self
            .fetch_if_exists(format!("/v1/plans/{}", segment(&id)), deadline)
            .await?
            .is_some()
        {
            return Ok(id);
        }
        let key = format!("tb:plan:{id}");
        let form: Form = vec![
            ("id".to_owned(), id.clone()),
            ("amount".to_owned(), stripe_amount(fee)?.to_string()),
            ("currency".to_owned(), currency),
            ("interval".to_owned(), "month".to_owned()),
            ("product[name]".to_owned(), format!("Monthly fee ({plan_id})")),
            (format!("metadata[{PLAN_KEY}]"), plan_id.to_string()),
        ];
        match self
            .send(Call::post("/v1/plans".to_owned(), form, &key), deadline)
            .await
        {
            // Created meanwhile by another caller, or now.
            Ok(Reply::Refused { error, .. }) if error.code.as_deref() == Some("resource_already_exists") => Ok(id),
            other => object(other).map(|_| id),
        }
    }

    /// The customer's live subscription to a plan's fee made for `user`, if any.
    async fn existing_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        deadline: Instant,
    ) -> Result<Option<Value>, GatewayError> {
        let listed = self
            .fetch(
                Call::get(format!(
                    "/v1/subscriptions?{}",
                    query(&[("customer", customer.as_str()), ("limit", "100")])
                )),
                deadline,
            )
            .await?;
        let data = listed
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| unreadable("a subscription list without data"))?;
        Ok(data
            .iter()
            .find(|sub| {
                let metadata = sub.get("metadata");
                metadata.and_then(|m| text(m, USER_KEY)) == Some(user.as_str())
                    && metadata.and_then(|m| text(m, PLAN_KEY)) == Some(plan_id.as_str())
                    && !matches!(text(sub, "status"), Some("canceled" | "incomplete_expired"))
            })
            .cloned())
    }
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    fn name(&self) -> &'static str {
        GATEWAY
    }

    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, GatewayError> {
        let key = format!("tb:customer:{user}");
        let form: Form = vec![
            (format!("metadata[{USER_KEY}]"), user.to_string()),
            ("description".to_owned(), format!("token-billing user {user}")),
        ];
        let customer = self
            .fetch(Call::post("/v1/customers".to_owned(), form, &key), self.deadline())
            .await?;
        let id = text(&customer, "id").ok_or_else(|| unreadable("a customer without id"))?;
        CustomerId::new(id).map_err(unreadable)
    }

    async fn collect(&self, request: &PaymentRequest<'_>) -> Result<PaymentOutcome, GatewayError> {
        if request.charge.amount.minor_units() <= 0 {
            return Err(rejected(
                "amount_too_small",
                format!("cannot charge {}", request.charge.amount),
            ));
        }
        let amount = stripe_amount(request.charge.amount)?;
        let deadline = self.deadline();
        let payment_method = self.default_payment_method(request.customer, deadline).await?;
        let mut form: Form = vec![
            ("amount".to_owned(), amount.to_string()),
            ("currency".to_owned(), currency_code(request.charge.amount.currency())),
            ("customer".to_owned(), request.customer.to_string()),
            ("payment_method".to_owned(), payment_method),
            ("confirm".to_owned(), "true".to_owned()),
            ("off_session".to_owned(), "true".to_owned()),
            ("description".to_owned(), request.description()),
        ];
        form.extend(
            self.inner
                .payment_method_types
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("payment_method_types[{i}]"), t.clone())),
        );
        form.extend(
            request
                .metadata()
                .iter()
                .map(|(k, v)| (format!("metadata[{k}]"), v.to_owned())),
        );
        let reply = self
            .send(
                Call::post("/v1/payment_intents".to_owned(), form, request.idempotency_key),
                deadline,
            )
            .await
            .map_err(unknown)?;
        match reply {
            Reply::Object(intent) => payment_outcome(&intent).map_err(unreadable),
            Reply::Refused { status, error } if status == StatusCode::PAYMENT_REQUIRED => {
                let outcome = refused_payment(&error);
                info!(charge = %request.charge.key, status = ?outcome.status, code = ?outcome.decline_code, "Stripe refused the payment");
                Ok(outcome)
            }
            Reply::Refused { error, .. } if error.kind == "idempotency_error" => {
                // The key was used with other parameters (the customer changed card since an
                // attempt whose answer was lost): that attempt may have paid. Keep what it made.
                // If it was declined or canceled, that is this round's outcome: nothing was
                // collected, and the key would only answer the same until Stripe forgets it.
                // If nothing is found yet, the outcome stays unknown.
                warn!(charge = %request.charge.key, "idempotency key re-used with other parameters: looking up the charge's payments");
                let found = self.found_payments(&request.charge.key, deadline).await?;
                let this_round = || {
                    found
                        .iter()
                        .filter(|f| {
                            f.round == Some(request.charge.round)
                                && matches!(f.outcome.status, PaymentStatus::Declined | PaymentStatus::Canceled)
                        })
                        .max_by_key(|f| f.created)
                        .map(|f| f.outcome.clone())
                };
                match payment_to_keep(&found).or_else(this_round) {
                    Some(outcome) => Ok(outcome),
                    None => Err(GatewayError::OutcomeUnknown {
                        gateway: GATEWAY,
                        source: format!(
                            "idempotency key {} was used with other parameters",
                            request.idempotency_key
                        )
                        .into(),
                    }),
                }
            }
            Reply::Refused { status, error } => Err(refused(status, error)),
        }
    }

    async fn find_payment(&self, charge_key: &ChargeKey) -> Result<Option<PaymentOutcome>, GatewayError> {
        self.payment_for(charge_key, self.deadline()).await
    }

    async fn cancel_payment(&self, payment_id: &str) -> Result<PaymentOutcome, GatewayError> {
        let deadline = self.deadline();
        let key = format!("tb:cancel:{payment_id}");
        let path = format!("/v1/payment_intents/{}", segment(payment_id));
        match self
            .send(Call::post(format!("{path}/cancel"), Form::new(), &key), deadline)
            .await
            .map_err(unknown)?
        {
            Reply::Object(intent) => payment_outcome(&intent).map_err(unreadable),
            // Not cancelable any more (it succeeded, or is processing): report its state.
            Reply::Refused {
                status: StatusCode::BAD_REQUEST,
                ..
            } => payment_outcome(&self.fetch(Call::get(path), deadline).await?).map_err(unreadable),
            Reply::Refused { status, error } => Err(refused(status, error)),
        }
    }

    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        plan: &Plan,
    ) -> Result<Subscription, GatewayError> {
        let deadline = self.deadline();
        let to_subscription = |sub: &Value| -> Result<Subscription, GatewayError> {
            Ok(Subscription {
                subscription_id: text(sub, "id")
                    .ok_or_else(|| unreadable("a subscription without id"))?
                    .to_owned(),
                customer_id: customer.clone(),
                plan_id: plan_id.clone(),
                status: text(sub, "status").unwrap_or("unknown").to_owned(),
            })
        };
        if let Some(existing) = self.existing_subscription(user, customer, plan_id, deadline).await? {
            return to_subscription(&existing);
        }
        let fee_plan = self.fee_plan(plan_id, plan, deadline).await?;
        // One key per user, plan, fee, customer and day: concurrent calls make one subscription,
        // and a fee changed that day makes a subscription of its own (a key Stripe kept with the
        // old fee's parameters would refuse it until the next day).
        let day = self.inner.clock.now().format("%Y-%m-%d");
        let key = subscription_key(user, plan_id, &fee_plan, customer, &day.to_string());
        let mut form: Form = vec![
            ("customer".to_owned(), customer.to_string()),
            ("items[0][plan]".to_owned(), fee_plan),
        ];
        for (name, value) in [(USER_KEY, user.as_str()), (PLAN_KEY, plan_id.as_str())] {
            form.push((format!("metadata[{name}]"), value.to_owned()));
            form.push((format!("items[0][metadata][{name}]"), value.to_owned()));
        }
        let created = self
            .fetch(Call::post("/v1/subscriptions".to_owned(), form, &key), deadline)
            .await?;
        to_subscription(&created)
    }
}

/// The idempotency key of one setting of a customer's default payment method: its own, so that
/// Stripe never replays an earlier setting in its place.
fn default_payment_method_key(customer: &CustomerId, payment_method: &str) -> String {
    format!(
        "tb:default-payment-method:{customer}:{payment_method}:{}",
        crate::random::uuid_v4().simple()
    )
}

/// The idempotency key of a subscription's creation.
fn subscription_key(user: &UserId, plan_id: &PlanId, fee_plan: &str, customer: &CustomerId, day: &str) -> String {
    format!("tb:subscription:{user}:{plan_id}:{fee_plan}:{customer}:{day}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setting_of_a_default_payment_method_has_a_key_of_its_own() {
        let customer = CustomerId::new("cus_1").expect("valid");
        let (first, again) = (
            default_payment_method_key(&customer, "pm_a"),
            default_payment_method_key(&customer, "pm_a"),
        );
        assert_ne!(
            first, again,
            "setting card A again after B is not a replay of the first"
        );
        assert!(first.len() <= 255, "Stripe's limit on keys: {first}");
    }

    #[test]
    fn a_subscriptions_key_changes_with_its_fee_and_its_day() {
        let (user, plan, customer) = (
            UserId::new("u").expect("valid"),
            PlanId::new("default").expect("valid"),
            CustomerId::new("cus_1").expect("valid"),
        );
        let key = |fee: &str, day: &str| subscription_key(&user, &plan, fee, &customer, day);
        let first = key("tb-fee-default-40000-brl", "2026-11-28");
        assert_eq!(first, key("tb-fee-default-40000-brl", "2026-11-28"), "a retry replays");
        assert_ne!(first, key("tb-fee-default-50000-brl", "2026-11-28"), "a new fee");
        assert_ne!(first, key("tb-fee-default-40000-brl", "2026-11-29"), "another day");
    }

    #[test]
    fn amounts_read_back_from_stripe_are_the_amounts_sent() {
        for amount in [
            Money::from_minor(40_000, Currency::BRL),
            Money::from_minor(500, Currency::JPY),
            Money::from_minor(5, Currency::ISK),
            Money::from_minor(1_230, Currency::BHD),
        ] {
            let sent = stripe_amount(amount).expect("an amount Stripe charges");
            assert_eq!(library_amount(sent, amount.currency()), Some(amount), "{amount}");
        }
        // Stripe's two-decimal krona with decimals left is no amount the library charged.
        assert_eq!(library_amount(550, Currency::ISK), None);
    }

    #[test]
    fn the_payment_kept_is_a_success_else_the_latest_in_flight() {
        fn found(created: i64, status: PaymentStatus) -> Found {
            Found {
                created,
                round: Some(0),
                outcome: PaymentOutcome {
                    payment_id: format!("pi_{created}"),
                    status,
                    decline_code: None,
                    message: None,
                },
            }
        }
        fn kept(found: &[Found]) -> Option<String> {
            payment_to_keep(found).map(|o| o.payment_id)
        }
        assert_eq!(
            kept(&[
                found(1, PaymentStatus::Processing),
                found(2, PaymentStatus::Succeeded),
                found(3, PaymentStatus::RequiresAction),
            ]),
            Some("pi_2".to_owned())
        );
        assert_eq!(
            kept(&[
                found(1, PaymentStatus::Processing),
                found(3, PaymentStatus::RequiresAction),
                found(2, PaymentStatus::Declined),
            ]),
            Some("pi_3".to_owned())
        );
        assert_eq!(
            kept(&[found(1, PaymentStatus::Declined), found(2, PaymentStatus::Canceled)]),
            None
        );
    }
}
