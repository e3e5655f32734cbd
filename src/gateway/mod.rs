//! How money is collected: the [`PaymentGateway`] trait and its implementations.
//!
//! [`SandboxGateway`] is always built; [`StripeGateway`](stripe::StripeGateway) with the feature
//! `stripe`. Every implementation must pass the conformance suite in
//! `token_billing::testing::gateway` (feature `testing`).
//!
//! What a gateway reports later (a webhook) reaches the service as a [`GatewayEvent`], which
//! [`BillingService::apply_gateway_event`](crate::BillingService::apply_gateway_event) applies
//! exactly once.

mod sandbox;
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub mod stripe;

use std::fmt::{self, Debug};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::domain::{Charge, ChargeKey, ChargeKind, CustomerId, Metadata, Money, Plan, PlanId, UserId};

pub use sandbox::{CardBehaviour, SandboxGateway, SandboxPayment};

/// A boxed error from a gateway's transport or client, kept as the source of [`GatewayError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A payment's new state reported by the gateway (a webhook), for the charge it pays: what a
/// gateway hands to [`BillingService::apply_payment_update`](crate::BillingService::apply_payment_update).
///
/// Every payment the service makes carries `user_id`, `charge_key` and `round` in its metadata,
/// so a webhook handler can build this from the payment alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentUpdate {
    /// The charge's user.
    pub user_id: UserId,
    /// The charge.
    pub charge_key: ChargeKey,
    /// The collection round the payment was made in, when known (the payment's `round`
    /// metadata).
    pub round: Option<u32>,
    /// The payment's state.
    pub outcome: PaymentOutcome,
}

/// What went wrong at the gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The gateway could not say whether money moved (timeout, connection lost, a 5xx after
    /// retries). The charge stays pending and is resumed with the same idempotency key.
    #[error("payment outcome unknown at {gateway}")]
    OutcomeUnknown {
        /// Which gateway.
        gateway: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The gateway refused the request itself and certainly charged nothing (invalid parameters,
    /// an unknown customer). Not retried as is.
    #[error("{gateway} rejected the request ({code}): {message}")]
    Rejected {
        /// Which gateway.
        gateway: &'static str,
        /// The gateway's error code.
        code: String,
        /// The gateway's message.
        message: String,
    },
    /// The gateway refused the library's credentials.
    #[error("{gateway} refused the credentials")]
    Unauthorized {
        /// Which gateway.
        gateway: &'static str,
    },
    /// Any other failure.
    #[error("{gateway} failed")]
    Generic {
        /// Which gateway.
        gateway: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// The state of a payment at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PaymentStatus {
    /// The money was collected.
    Succeeded,
    /// Accepted; the final outcome comes later (a webhook).
    Processing,
    /// The customer must authenticate it (3-D Secure, `authentication_required`).
    RequiresAction,
    /// Declined by the card issuer or the gateway's risk checks; nothing was collected.
    Declined,
    /// Canceled; nothing was collected.
    Canceled,
}

/// A payment as the gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentOutcome {
    /// The gateway's payment reference (`pi_...`).
    pub payment_id: String,
    /// Its state.
    pub status: PaymentStatus,
    /// The decline code, when declined (`card_declined`, `insufficient_funds`).
    pub decline_code: Option<String>,
    /// The gateway's message, when there is one.
    pub message: Option<String>,
}

/// One request to collect a charge: the charge (its key, which the payment must carry, its
/// amount, user, period, kind, block, tier and round), the round's idempotency key, and the
/// customer who pays. A gateway that shows the customer a description or attaches metadata
/// derives them with [`description`](Self::description) and [`metadata`](Self::metadata), so
/// that gateways that need neither (the sandbox) format nothing.
#[derive(Clone)]
pub struct PaymentRequest<'a> {
    /// The charge to collect.
    pub charge: &'a Charge,
    /// The idempotency key of this collection round ([`ChargeKey::idempotency_key`]).
    pub idempotency_key: &'a str,
    /// Who pays.
    pub customer: &'a CustomerId,
}

impl PaymentRequest<'_> {
    /// What the payment is for, as the customer may see it: `Tokens 8M-16M, 2026-11` for a
    /// block, `Monthly fee, 2026-11` for the fixed fee.
    pub fn description(&self) -> String {
        let charge = self.charge;
        match charge.kind {
            ChargeKind::FixedFee => format!("Monthly fee, {}", charge.period),
            _ => format!("Tokens {}, {}", charge.billing_tier, charge.period),
        }
    }

    /// The metadata a payment carries so that it can be found and understood later: the user,
    /// period, kind, block, charge key and collection round.
    ///
    /// # Example
    /// ```
    /// use token_billing::{ChargeStatus, CustomerId, NewCharge, PaymentRequest, Plan, UserId};
    ///
    /// let user = UserId::new("alice").unwrap();
    /// let charge = NewCharge::block(&Plan::default(), &user, "2026-11".parse().unwrap(), 1, None)
    ///     .into_charge(uuid::Uuid::new_v4(), ChargeStatus::Pending, chrono::Utc::now());
    /// let customer = CustomerId::new("cus_1").unwrap();
    /// let key = charge.idempotency_key();
    /// let request = PaymentRequest { charge: &charge, idempotency_key: &key, customer: &customer };
    /// let metadata = request.metadata();
    /// assert_eq!(&metadata["charge_key"], charge.key.as_str());
    /// assert_eq!(&metadata["round"], "0");
    /// ```
    pub fn metadata(&self) -> Metadata {
        let charge = self.charge;
        Metadata::from([
            (metadata_key::USER_ID, charge.user_id.to_string()),
            (metadata_key::PERIOD, charge.period.to_string()),
            (metadata_key::KIND, charge.kind.to_string()),
            (metadata_key::BLOCK, charge.block.to_string()),
            (metadata_key::CHARGE_KEY, charge.key.to_string()),
            (metadata_key::ROUND, charge.round.to_string()),
        ])
    }
}

/// The keys of the metadata a payment carries ([`PaymentRequest::metadata`]): gateways read
/// them back from the payments they search and the notifications they receive, so each is
/// spelled once.
pub(crate) mod metadata_key {
    /// The charge's user.
    pub(crate) const USER_ID: &str = "user_id";
    /// The charge's period (`2026-11`).
    pub(crate) const PERIOD: &str = "period";
    /// The charge's kind (`block`, `fixed_fee`).
    pub(crate) const KIND: &str = "kind";
    /// The charge's block number.
    pub(crate) const BLOCK: &str = "block";
    /// The charge key, by which every payment made for a charge is found.
    pub(crate) const CHARGE_KEY: &str = "charge_key";
    /// The collection round the payment was made in.
    pub(crate) const ROUND: &str = "round";
}

impl Debug for PaymentRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentRequest")
            .field("charge", &self.charge.key)
            .field("idempotency_key", &self.idempotency_key)
            .field("customer", &self.customer)
            .field("amount", &self.charge.amount)
            .finish_non_exhaustive()
    }
}

/// A gateway subscription that collects a plan's fixed fee every period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The gateway's subscription reference (`sub_...`).
    pub subscription_id: String,
    /// The customer.
    pub customer_id: CustomerId,
    /// The plan whose fixed fee it collects.
    pub plan_id: PlanId,
    /// The gateway's status for it (`active`, `incomplete`).
    pub status: String,
}

/// Something the gateway reports after the fact (a webhook), in the library's terms.
///
/// A gateway adapter builds it from a verified notification
/// ([`StripeGateway::webhook_event`](stripe::StripeGateway::webhook_event)); the host passes it
/// to [`BillingService::apply_gateway_event`](crate::BillingService::apply_gateway_event), which
/// applies each event id once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEvent {
    /// The gateway's id of the event (`evt_...`): the key it is deduplicated by.
    pub id: String,
    /// The gateway's name for the event (`payment_intent.succeeded`), for the audit trail.
    pub event_type: String,
    /// What changed.
    pub change: GatewayChange,
}

impl GatewayEvent {
    /// The user the event is about.
    pub fn user_id(&self) -> &UserId {
        match &self.change {
            GatewayChange::Payment(update) => &update.user_id,
            GatewayChange::FixedFeePaid { user_id, .. } => user_id,
        }
    }
}

/// What a [`GatewayEvent`] reports.
///
/// # Example
/// ```
/// use chrono::{TimeZone, Utc};
/// use token_billing::{Currency, GatewayChange, GatewayEvent, Money, UserId};
///
/// // A subscription invoice that collected BRL 360.00 (the BRL 400.00 fee, 10% off) for the
/// // period starting on 1 November 2026 in São Paulo.
/// let event = GatewayEvent {
///     id: "evt_1".to_owned(),
///     event_type: "invoice.paid".to_owned(),
///     change: GatewayChange::FixedFeePaid {
///         user_id: UserId::new("alice").unwrap(),
///         period_start: Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap(),
///         amount: Money::from_minor(36_000, Currency::BRL),
///         payment_id: "in_1".to_owned(),
///     },
/// };
/// assert_eq!(event.user_id().as_str(), "alice");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatewayChange {
    /// A payment made for a charge changed state.
    Payment(PaymentUpdate),
    /// A gateway subscription collected a fixed fee: its invoice was paid.
    FixedFeePaid {
        /// The subscriber.
        user_id: UserId,
        /// The start of the subscription period the invoice pays; the library's period is the
        /// calendar month containing it in the user's plan's zone.
        period_start: DateTime<Utc>,
        /// The fee the invoice collected, after discounts and before tax, in the invoice's
        /// currency and that currency's minor units. It is what the invoice collected, not the
        /// plan's price: the two differ after a discount, a proration or a price change.
        amount: Money,
        /// The gateway's reference of the payment (the invoice, `in_...`).
        payment_id: String,
    },
}

/// Collects money from customers.
///
/// # Contract
/// Every implementation MUST meet these clauses; the conformance suite
/// (`token_billing::testing::gateway`, feature `testing`) checks each, and a failing check names
/// the clause it found broken.
/// - **Idempotency.** [`collect`](Self::collect) with an idempotency key already used MUST NOT
///   create a second payment: it answers the first payment (the same `payment_id`, and the same
///   status and decline code while that payment has not changed since), or, for a gateway that
///   cannot tell, an error; never a new charge to the customer.
/// - **New rounds.** A key never used before (a later round of the same charge) MUST be a new
///   attempt on the customer's current payment method: it never replays an earlier round's
///   outcome, so that a charge declined once is collected once the customer fixes their card.
/// - **Known outcomes.** `collect` MUST return `Ok` only when it knows the payment's state, and
///   [`GatewayError::OutcomeUnknown`] whenever money may have moved without it knowing. The
///   state is reported as it is: [`PaymentStatus::Succeeded`] when the money was collected;
///   [`PaymentStatus::Declined`] with the issuer's decline code in `decline_code`
///   (`insufficient_funds`) when it was declined; [`PaymentStatus::RequiresAction`] when the
///   customer must authenticate it; [`PaymentStatus::Processing`] when its outcome comes later.
///   An outcome that is succeeded, processing or awaiting the customer carries the gateway's
///   `payment_id`.
/// - **Nothing collected on refusal.** `collect` MUST NOT report [`PaymentStatus::Declined`]
///   or [`GatewayError::Rejected`] unless nothing was collected. A request for a customer the
///   gateway does not know is refused with an error and collects nothing.
/// - **Minor units.** The payment MUST be for exactly `request.charge.amount`: its currency,
///   and its amount in that currency's minor units as the library counts them
///   ([`Money::minor_units`](crate::Money::minor_units): 40000 is BRL 400.00, 500 is JPY 500,
///   1230 is BHD 1.230). A gateway whose API counts a currency otherwise converts exactly
///   (Stripe's ISK), never through a float.
/// - **Look-up by charge key.** The payment MUST carry `request.charge.key`, so that
///   [`find_payment`](Self::find_payment) finds every payment made for a charge, in any round,
///   even after the gateway forgot the idempotency key or its answer was lost. `find_payment`
///   answers a succeeded payment first, else one still in flight (processing, awaiting the
///   customer); `None` for a charge never collected, or whose payments were all declined or
///   canceled; never a payment of another charge, even one whose key begins with this one's.
///   The service calls it before collecting a charge that may have been attempted already, and
///   keeps a payment it finds instead of creating another.
/// - **Cancel.** [`cancel_payment`](Self::cancel_payment) MUST cancel a payment awaiting the
///   customer: it answers `Canceled`, the payment can no longer succeed, and `find_payment` no
///   longer answers it. A processing payment is canceled the same way, or, when the gateway is
///   past cancelling it, reported as `Processing`. It MUST NOT cancel a succeeded payment: it
///   reports it as `Succeeded`, and the payment stays found. A payment already canceled is
///   reported `Canceled` again; a payment id the gateway never issued is refused with
///   [`GatewayError::Rejected`]. The answer always carries the payment's own `payment_id`.
/// - **Customers.** [`create_customer`](Self::create_customer) MUST open a customer the
///   gateway then accepts: once the customer has a payment method that pays, its payments
///   succeed. Calling it again for the same user (a retry after a lost answer or a crash, within
///   the gateway's idempotency window: 24 hours at Stripe) MUST answer the same customer, not
///   open a second one; another user gets a customer of its own.
/// - **Subscriptions.** For a gateway that offers them,
///   [`create_subscription`](Self::create_subscription) MUST answer a subscription of the
///   customer to the plan, which the gateway's records tie to the user (its paid invoices are
///   reported for that user). Asking again for the same user, customer and plan answers the
///   same subscription; another plan, or another user paid for by the same customer, gets one of
///   its own, since each collects a fee of its own. A gateway without subscriptions refuses with
///   [`GatewayError::Rejected`]; its conformance fixture says so, and the suite skips these
///   checks and reports them skipped.
#[async_trait]
pub trait PaymentGateway: Send + Sync + Debug {
    /// A short name for logs (`sandbox`, `stripe`).
    fn name(&self) -> &'static str;

    /// Opens a customer for a user (the embedded default does this for unregistered users);
    /// the same customer again for the same user. See the contract's **Customers**.
    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, GatewayError>;

    /// Creates and confirms an off-session payment; see the contract.
    async fn collect(&self, request: &PaymentRequest<'_>) -> Result<PaymentOutcome, GatewayError>;

    /// The most relevant payment made for a charge in any round: a succeeded one first, then one
    /// still in flight (processing, requiring action); `None` when every payment made was
    /// declined or canceled, or none was made.
    async fn find_payment(&self, charge_key: &ChargeKey) -> Result<Option<PaymentOutcome>, GatewayError>;

    /// Cancels a payment that has not succeeded, so that it cannot succeed later (a customer
    /// completing an old authentication) once a new round has been started. Returns the
    /// payment's state after the attempt: `Canceled`, or its state when it could not be
    /// canceled: `Succeeded` (never canceled), `Processing` (a gateway past cancelling it, which
    /// may still succeed), or, for one already declined, `Declined` (or `Canceled`, at a gateway
    /// that cancels declined payments too). See the contract's **Cancel**.
    async fn cancel_payment(&self, payment_id: &str) -> Result<PaymentOutcome, GatewayError>;

    /// Subscribes a user's customer to a plan's fixed fee (the original product's
    /// create-subscription). The subscription MUST name the user, so that its paid invoices can
    /// be told apart and reported as [`GatewayChange::FixedFeePaid`] for that user. A user whose
    /// customer is already subscribed to the plan keeps that subscription: it is returned, not
    /// duplicated. See the contract's **Subscriptions**.
    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        plan: &Plan,
    ) -> Result<Subscription, GatewayError>;
}
