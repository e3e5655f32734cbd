//! [`SandboxGateway`]: an in-process card processor for demos and tests.

use foldhash::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{GatewayError, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus, Subscription};
use crate::domain::{ChargeKey, Currency, CustomerId, Money, Plan, PlanId, UserId};

const GATEWAY: &str = "sandbox";

/// How a sandbox customer's card behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CardBehaviour {
    /// Every payment succeeds.
    Succeeds,
    /// Every payment is declined with this decline code (`insufficient_funds`).
    Declines {
        /// The decline code.
        code: String,
    },
    /// Every payment needs the customer's authentication (3-D Secure).
    RequiresAuthentication,
    /// Every payment is accepted as processing, to be finished with
    /// [`SandboxGateway::finish_payment`].
    Processing,
    /// The next `times` calls fail with a transient error before reaching the processor (nothing
    /// is charged); after that payments succeed.
    FailsTransiently {
        /// How many calls still fail.
        times: u32,
    },
    /// The next `times` payments succeed but their answer is lost on the way back
    /// ([`GatewayError::OutcomeUnknown`]); after that payments succeed and are answered.
    LosesResponse {
        /// How many answers are still lost.
        times: u32,
    },
}

/// A payment in the sandbox's ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPayment {
    /// The payment reference, `pi_sandbox_{n}`.
    pub payment_id: String,
    /// The idempotency key it was made with.
    pub idempotency_key: String,
    /// The charge it pays.
    pub charge_key: ChargeKey,
    /// Who paid.
    pub customer: CustomerId,
    /// How much.
    pub amount: Money,
    /// Its state.
    pub status: PaymentStatus,
    /// The decline code, when declined.
    pub decline_code: Option<String>,
}

/// The prefix of the sandbox's payment references; the number after it is the payment's place in
/// the ledger, from 1.
const PAYMENT_PREFIX: &str = "pi_sandbox_";

/// A payment as the ledger keeps it: its reference is its place in the ledger, and its
/// idempotency key shares the charge key's text in the charge's first round, so that keeping a
/// payment costs no copy of either.
#[derive(Debug)]
struct Payment {
    idempotency_key: Arc<str>,
    charge_key: ChargeKey,
    customer: CustomerId,
    amount: Money,
    status: PaymentStatus,
    decline_code: Option<String>,
    /// The payment made for the same charge before this one (an earlier round's), if any.
    earlier_for_charge: Option<usize>,
}

impl Payment {
    fn outcome(&self, index: usize) -> PaymentOutcome {
        outcome(index, self.status, self.decline_code.clone())
    }

    fn public(&self, index: usize) -> SandboxPayment {
        SandboxPayment {
            payment_id: payment_id(index),
            idempotency_key: self.idempotency_key.to_string(),
            charge_key: self.charge_key.clone(),
            customer: self.customer.clone(),
            amount: self.amount,
            status: self.status,
            decline_code: self.decline_code.clone(),
        }
    }
}

/// The answer for the payment at `index` in the ledger.
fn outcome(index: usize, status: PaymentStatus, decline_code: Option<String>) -> PaymentOutcome {
    PaymentOutcome {
        payment_id: payment_id(index),
        status,
        message: decline_code
            .as_ref()
            .map(|code| format!("Your card was declined ({code}).")),
        decline_code,
    }
}

/// The reference of the payment at `index` in the ledger.
fn payment_id(index: usize) -> String {
    let mut digits = [0; 20];
    let number = crate::domain::decimal(index as u64 + 1, &mut digits);
    let mut id = String::with_capacity(PAYMENT_PREFIX.len() + number.len());
    id.push_str(PAYMENT_PREFIX);
    id.extend(number.iter().map(|&digit| char::from(digit)));
    id
}

/// The place in the ledger of the payment `payment_id` names, if it is one of the sandbox's
/// references (written as [`payment_id`] writes it: no sign, no leading zero).
fn payment_index(payment_id: &str) -> Option<usize> {
    let number = payment_id.strip_prefix(PAYMENT_PREFIX)?;
    if number.is_empty() || number.starts_with('0') || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse::<usize>().ok()?.checked_sub(1)
}

/// What a key's text names in the ledger.
#[derive(Debug, Default, Clone, Copy)]
struct Keyed {
    /// As an idempotency key, the payment it made.
    payment: Option<usize>,
    /// As a charge key, the latest payment made for the charge; each payment names the one
    /// before it.
    latest_for_charge: Option<usize>,
}

#[derive(Debug, Default)]
struct Ledger {
    customers: HashMap<CustomerId, CardBehaviour>,
    customer_of_user: HashMap<UserId, CustomerId>,
    payments: Vec<Payment>,
    /// Idempotency keys and charge keys, by their text: one map, since a charge's first round
    /// is made with its key as its idempotency key, so that most payments take one entry.
    by_key: HashMap<Arc<str>, Keyed>,
    /// The subscriptions made, each with the fee it collects and the user it was made for.
    subscriptions: Vec<(Subscription, Money, UserId)>,
    calls: u64,
    forget_idempotency_keys: bool,
    /// How a customer id the sandbox was not told of behaves when first named, if it is opened
    /// at all: `None` refuses it as Stripe refuses a customer it does not have.
    unknown_customers: Option<CardBehaviour>,
}

/// An in-process payment gateway that keeps state like a card processor: customers whose
/// payments succeed, are declined, need authentication or fail transiently; idempotency keys
/// honoured (a key never makes a second payment); and a ledger that tests inspect to prove that
/// nobody paid twice.
///
/// Clones share one ledger, so a test keeps a handle on the sandbox it gave the service.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use token_billing::{ChargeStatus, Currency, Money, NewCharge, PaymentGateway, PaymentRequest, PaymentStatus,
///     Plan, SandboxGateway, UserId};
///
/// let sandbox = SandboxGateway::new();
/// let user = UserId::new("alice").unwrap();
/// let customer = sandbox.create_customer(&user).await.unwrap();
/// let charge = NewCharge::block(&Plan::default(), &user, "2026-11".parse().unwrap(), 1, None)
///     .into_charge(uuid::Uuid::new_v4(), ChargeStatus::Pending, chrono::Utc::now());
/// let key = charge.key.clone();
/// let request = PaymentRequest { charge: &charge, idempotency_key: key.as_str(), customer: &customer };
/// let first = sandbox.collect(&request).await.unwrap();
/// let again = sandbox.collect(&request).await.unwrap(); // same key: same payment
/// assert_eq!(first, again);
/// assert_eq!(first.status, PaymentStatus::Succeeded);
/// assert_eq!(sandbox.payments_for_charge(&key).len(), 1);
/// assert_eq!(sandbox.collected(&customer, Currency::BRL), Money::from_minor(10_000, Currency::BRL));
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct SandboxGateway {
    ledger: Arc<Mutex<Ledger>>,
}

impl SandboxGateway {
    /// An empty sandbox.
    pub fn new() -> SandboxGateway {
        SandboxGateway::default()
    }

    /// A sandbox that opens any customer id it was not told of, the first time a payment or a
    /// subscription names it, as a customer whose payments succeed: a host's own customer ids
    /// then work as they are, with no [`add_customer`](Self::add_customer) first. Demos and
    /// reference services use it; tests that need an unknown customer refused use
    /// [`new`](Self::new), which answers such a customer [`GatewayError::Rejected`]
    /// (`resource_missing`).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{CustomerId, PaymentGateway, Plan, PlanId, SandboxGateway, UserId};
    ///
    /// let user = UserId::new("alice")?;
    /// let customer = CustomerId::new("cus_from_the_host")?;
    /// let plan_id = PlanId::new("default")?;
    /// // The plain sandbox does not know the customer...
    /// let refusing = SandboxGateway::new();
    /// assert!(refusing.create_subscription(&user, &customer, &plan_id, &Plan::default()).await.is_err());
    /// // ...this one opens it, as a customer who pays.
    /// let accepting = SandboxGateway::accepting_unknown_customers();
    /// let subscription = accepting.create_subscription(&user, &customer, &plan_id, &Plan::default()).await?;
    /// assert_eq!((subscription.customer_id, subscription.status.as_str()), (customer, "active"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn accepting_unknown_customers() -> SandboxGateway {
        let sandbox = SandboxGateway::new();
        sandbox.ledger().unknown_customers = Some(CardBehaviour::Succeeds);
        sandbox
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every change below is validated before it is made, so a poisoned ledger is consistent.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The payment `payment_id` names, with its place in the ledger.
    fn payment_mut<'l>(ledger: &'l mut Ledger, payment_id: &str) -> Result<(usize, &'l mut Payment), GatewayError> {
        payment_index(payment_id)
            .and_then(|index| Some((index, ledger.payments.get_mut(index)?)))
            .ok_or_else(|| rejected("resource_missing", format!("No such payment: {payment_id}")))
    }

    /// Makes the sandbox ignore idempotency keys from now on, as a card processor does once a
    /// key has expired (Stripe keeps them 24 hours) and as some test servers always do: every
    /// call then makes a new payment, and only the service's look-up of earlier payments
    /// prevents paying twice.
    pub fn forget_idempotency_keys(&self) {
        let mut ledger = self.ledger();
        ledger.forget_idempotency_keys = true;
        for keyed in ledger.by_key.values_mut() {
            keyed.payment = None;
        }
    }

    /// Adds (or replaces) a customer whose card behaves as `behaviour`.
    pub fn add_customer(&self, customer: CustomerId, behaviour: CardBehaviour) {
        self.ledger().customers.insert(customer, behaviour);
    }

    /// Changes how a customer's card behaves (the customer updated their card, say).
    ///
    /// # Errors
    /// [`GatewayError::Rejected`] for an unknown customer.
    pub fn set_behaviour(&self, customer: &CustomerId, behaviour: CardBehaviour) -> Result<(), GatewayError> {
        match self.ledger().customers.get_mut(customer) {
            Some(current) => {
                *current = behaviour;
                Ok(())
            }
            None => Err(no_such_customer(customer)),
        }
    }

    /// The customer the sandbox opened for `user`, if any.
    pub fn customer_of(&self, user: &UserId) -> Option<CustomerId> {
        self.ledger().customer_of_user.get(user).cloned()
    }

    /// Every payment made, in order.
    pub fn payments(&self) -> Vec<SandboxPayment> {
        let ledger = self.ledger();
        ledger
            .payments
            .iter()
            .enumerate()
            .map(|(index, payment)| payment.public(index))
            .collect()
    }

    /// The payments made for one charge, over all its rounds.
    pub fn payments_for_charge(&self, charge_key: &ChargeKey) -> Vec<SandboxPayment> {
        let ledger = self.ledger();
        let mut payments: Vec<SandboxPayment> = ledger
            .made_for(charge_key)
            .map(|(index, payment)| payment.public(index))
            .collect();
        payments.reverse();
        payments
    }

    /// The total a customer paid (succeeded payments) in `currency`.
    pub fn collected(&self, customer: &CustomerId, currency: Currency) -> Money {
        self.ledger()
            .payments
            .iter()
            .filter(|p| {
                &p.customer == customer && p.status == PaymentStatus::Succeeded && p.amount.currency() == currency
            })
            .fold(Money::zero(currency), |sum, p| sum.checked_add(p.amount).unwrap_or(sum))
    }

    /// The subscriptions created (each names its customer and plan), with the fee each collects
    /// per period.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{PaymentGateway, Plan, PlanId, SandboxGateway, UserId};
    ///
    /// let sandbox = SandboxGateway::new();
    /// let user = UserId::new("alice").unwrap();
    /// let customer = sandbox.create_customer(&user).await.unwrap();
    /// let plan_id = PlanId::new("default").unwrap();
    /// let subscription = sandbox.create_subscription(&user, &customer, &plan_id, &Plan::default()).await.unwrap();
    /// assert_eq!(subscription.plan_id, plan_id);
    /// assert_eq!(sandbox.subscriptions(), [(subscription, Plan::default().fixed_fee())]);
    /// # });
    /// ```
    pub fn subscriptions(&self) -> Vec<(Subscription, Money)> {
        self.ledger()
            .subscriptions
            .iter()
            .map(|(subscription, fee, _)| (subscription.clone(), *fee))
            .collect()
    }

    /// The user a subscription was made for (whose fee it collects), by its reference; `None`
    /// for a reference the sandbox never issued.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{PaymentGateway, Plan, PlanId, SandboxGateway, UserId};
    ///
    /// let sandbox = SandboxGateway::new();
    /// let user = UserId::new("alice").unwrap();
    /// let customer = sandbox.create_customer(&user).await.unwrap();
    /// let plan_id = PlanId::new("default").unwrap();
    /// let subscription = sandbox.create_subscription(&user, &customer, &plan_id, &Plan::default()).await.unwrap();
    /// assert_eq!(sandbox.subscriber(&subscription.subscription_id), Some(user));
    /// assert_eq!(sandbox.subscriber("sub_elsewhere"), None);
    /// # });
    /// ```
    pub fn subscriber(&self, subscription_id: &str) -> Option<UserId> {
        self.ledger()
            .subscriptions
            .iter()
            .find(|(subscription, _, _)| subscription.subscription_id == subscription_id)
            .map(|(_, _, user)| user.clone())
    }

    /// How many calls reached the sandbox (`collect`, `find_payment`, customers, subscriptions).
    pub fn calls(&self) -> u64 {
        self.ledger().calls
    }

    /// Finishes a payment that is processing or awaits authentication, as the customer or the
    /// bank would: `succeeded` or declined with `card_declined`. Returns the new outcome, which a
    /// host feeds to `BillingService::apply_payment_update` as it would a webhook.
    ///
    /// # Errors
    /// [`GatewayError::Rejected`] for an unknown payment or one already final.
    pub fn finish_payment(&self, payment_id: &str, succeeded: bool) -> Result<PaymentOutcome, GatewayError> {
        let mut ledger = self.ledger();
        let (index, payment) = Self::payment_mut(&mut ledger, payment_id)?;
        if !matches!(
            payment.status,
            PaymentStatus::Processing | PaymentStatus::RequiresAction
        ) {
            return Err(rejected(
                "payment_intent_unexpected_state",
                format!("payment {payment_id} is already final"),
            ));
        }
        if succeeded {
            payment.status = PaymentStatus::Succeeded;
        } else {
            payment.status = PaymentStatus::Declined;
            payment.decline_code = Some("card_declined".to_owned());
        }
        Ok(payment.outcome(index))
    }
}

fn rejected(code: &str, message: String) -> GatewayError {
    GatewayError::Rejected {
        gateway: GATEWAY,
        code: code.to_owned(),
        message,
    }
}

fn no_such_customer(customer: &CustomerId) -> GatewayError {
    rejected("resource_missing", format!("No such customer: {customer}"))
}

impl Ledger {
    /// How a customer's card behaves: one not known is opened if the sandbox accepts unknown
    /// customers, else refused.
    fn customer_mut(&mut self, customer: &CustomerId) -> Result<&mut CardBehaviour, GatewayError> {
        if !self.customers.contains_key(customer) {
            let behaviour = self
                .unknown_customers
                .clone()
                .ok_or_else(|| no_such_customer(customer))?;
            self.customers.insert(customer.clone(), behaviour);
        }
        self.customers
            .get_mut(customer)
            .ok_or_else(|| no_such_customer(customer))
    }

    /// The payments made for a charge, latest first, with their places in the ledger.
    fn made_for<'l>(&'l self, charge_key: &ChargeKey) -> impl Iterator<Item = (usize, &'l Payment)> + 'l {
        let latest = self
            .by_key
            .get(charge_key.as_str())
            .and_then(|keyed| keyed.latest_for_charge);
        std::iter::successors(latest.map(|index| (index, &self.payments[index])), |(_, payment)| {
            payment.earlier_for_charge.map(|index| (index, &self.payments[index]))
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SandboxFault(&'static str);

#[async_trait]
impl PaymentGateway for SandboxGateway {
    fn name(&self) -> &'static str {
        GATEWAY
    }

    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, GatewayError> {
        let mut ledger = self.ledger();
        ledger.calls += 1;
        if let Some(existing) = ledger.customer_of_user.get(user) {
            return Ok(existing.clone());
        }
        // The next number not taken: a customer added or opened by its id may hold one.
        let mut number = ledger.customers.len() + 1;
        let id = loop {
            let id = CustomerId::new(format!("cus_sandbox_{number}")).map_err(|e| GatewayError::Generic {
                gateway: GATEWAY,
                source: Box::new(e),
            })?;
            if !ledger.customers.contains_key(&id) {
                break id;
            }
            number += 1;
        };
        ledger.customers.insert(id.clone(), CardBehaviour::Succeeds);
        ledger.customer_of_user.insert(user.clone(), id.clone());
        Ok(id)
    }

    async fn collect(&self, request: &PaymentRequest<'_>) -> Result<PaymentOutcome, GatewayError> {
        let mut guard = self.ledger();
        let ledger = &mut *guard;
        ledger.calls += 1;
        if let Some(index) = ledger
            .by_key
            .get(request.idempotency_key)
            .and_then(|keyed| keyed.payment)
        {
            let payment = &ledger.payments[index];
            if payment.amount != request.charge.amount || &payment.customer != request.customer {
                return Err(rejected(
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with."
                        .to_owned(),
                ));
            }
            return Ok(payment.outcome(index));
        }
        if request.charge.amount.minor_units() <= 0 {
            return Err(rejected(
                "parameter_invalid_integer",
                "amount must be positive".to_owned(),
            ));
        }
        let behaviour = ledger.customer_mut(request.customer)?;
        let (status, decline_code, lose_response) = match behaviour {
            CardBehaviour::Succeeds => (PaymentStatus::Succeeded, None, false),
            CardBehaviour::Declines { code } => (PaymentStatus::Declined, Some(code.clone()), false),
            CardBehaviour::RequiresAuthentication => (PaymentStatus::RequiresAction, None, false),
            CardBehaviour::Processing => (PaymentStatus::Processing, None, false),
            CardBehaviour::FailsTransiently { times } => {
                if *times > 0 {
                    *times -= 1;
                    return Err(GatewayError::OutcomeUnknown {
                        gateway: GATEWAY,
                        source: Box::new(SandboxFault("connection reset before the request was sent")),
                    });
                }
                (PaymentStatus::Succeeded, None, false)
            }
            CardBehaviour::LosesResponse { times } => {
                let lose = *times > 0;
                *times = times.saturating_sub(1);
                (PaymentStatus::Succeeded, None, lose)
            }
        };
        let index = ledger.payments.len();
        let first_round = request.idempotency_key == request.charge.key.as_str();
        let idempotency_key = if first_round {
            Arc::clone(request.charge.key.text())
        } else {
            Arc::from(request.idempotency_key)
        };
        let keep_key = !ledger.forget_idempotency_keys;
        let earlier_for_charge = {
            let keyed = ledger.by_key.entry(Arc::clone(request.charge.key.text())).or_default();
            if first_round && keep_key {
                keyed.payment = Some(index);
            }
            keyed.latest_for_charge.replace(index)
        };
        if !first_round && keep_key {
            ledger.by_key.entry(Arc::clone(&idempotency_key)).or_default().payment = Some(index);
        }
        let answer = (index, status, decline_code.clone());
        ledger.payments.push(Payment {
            idempotency_key,
            charge_key: request.charge.key.clone(),
            customer: request.customer.clone(),
            amount: request.charge.amount,
            status,
            decline_code,
            earlier_for_charge,
        });
        // The answer is written without the ledger: callers on other threads wait less for it.
        drop(guard);
        if lose_response {
            return Err(GatewayError::OutcomeUnknown {
                gateway: GATEWAY,
                source: Box::new(SandboxFault("connection lost after the payment was made")),
            });
        }
        let (index, status, decline_code) = answer;
        Ok(outcome(index, status, decline_code))
    }

    async fn find_payment(&self, charge_key: &ChargeKey) -> Result<Option<PaymentOutcome>, GatewayError> {
        let mut ledger = self.ledger();
        ledger.calls += 1;
        // The first succeeded payment, else the latest one still in flight.
        let best = ledger
            .made_for(charge_key)
            .filter(|(_, p)| p.status == PaymentStatus::Succeeded)
            .last()
            .or_else(|| {
                ledger
                    .made_for(charge_key)
                    .find(|(_, p)| matches!(p.status, PaymentStatus::Processing | PaymentStatus::RequiresAction))
            });
        Ok(best.map(|(index, p)| p.outcome(index)))
    }

    async fn cancel_payment(&self, payment_id: &str) -> Result<PaymentOutcome, GatewayError> {
        let mut ledger = self.ledger();
        ledger.calls += 1;
        let (index, payment) = Self::payment_mut(&mut ledger, payment_id)?;
        if matches!(
            payment.status,
            PaymentStatus::Processing | PaymentStatus::RequiresAction
        ) {
            payment.status = PaymentStatus::Canceled;
        }
        Ok(payment.outcome(index))
    }

    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        plan: &Plan,
    ) -> Result<Subscription, GatewayError> {
        let mut ledger = self.ledger();
        ledger.calls += 1;
        ledger.customer_mut(customer)?;
        // Only the user's subscription to this plan is kept: one to another plan, or one the
        // same customer pays for another user, collects another fee.
        if let Some((existing, _, _)) = ledger.subscriptions.iter().find(|(s, _, subscriber)| {
            subscriber == user && &s.customer_id == customer && &s.plan_id == plan_id && s.status == "active"
        }) {
            return Ok(existing.clone());
        }
        let subscription = Subscription {
            subscription_id: format!("sub_sandbox_{}_{}", ledger.subscriptions.len() + 1, plan_id),
            customer_id: customer.clone(),
            plan_id: plan_id.clone(),
            status: "active".to_owned(),
        };
        ledger
            .subscriptions
            .push((subscription.clone(), plan.fixed_fee(), user.clone()));
        Ok(subscription)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Charge, ChargeStatus, NewCharge, UserId};

    fn charge(round: u32) -> Charge {
        let user = UserId::new("alice").expect("valid");
        let period = "2026-11".parse().expect("valid");
        let mut charge = NewCharge::block(&Plan::default(), &user, period, 1, None).into_charge(
            uuid::Uuid::nil(),
            ChargeStatus::Pending,
            chrono::DateTime::UNIX_EPOCH,
        );
        charge.round = round;
        charge
    }

    /// A sandbox with one customer, whose payments stay processing until finished.
    async fn processing_customer() -> (SandboxGateway, CustomerId) {
        let sandbox = SandboxGateway::new();
        let customer = sandbox
            .create_customer(&UserId::new("alice").expect("valid"))
            .await
            .expect("a customer");
        sandbox
            .set_behaviour(&customer, CardBehaviour::Processing)
            .expect("known");
        (sandbox, customer)
    }

    async fn collect(sandbox: &SandboxGateway, customer: &CustomerId, round: u32) -> PaymentOutcome {
        let charge = charge(round);
        let key = charge.idempotency_key();
        let request = PaymentRequest {
            charge: &charge,
            idempotency_key: &key,
            customer,
        };
        sandbox.collect(&request).await.expect("an outcome")
    }

    #[tokio::test]
    async fn a_charges_payments_over_its_rounds_are_listed_in_order_and_the_first_success_is_found() {
        let (sandbox, customer) = processing_customer().await;
        let processing = collect(&sandbox, &customer, 0).await;
        sandbox
            .set_behaviour(&customer, CardBehaviour::Succeeds)
            .expect("known");
        let first_success = collect(&sandbox, &customer, 1).await;
        let second_success = collect(&sandbox, &customer, 2).await;
        // A key already used answers its payment again, whatever the card does now.
        sandbox
            .set_behaviour(
                &customer,
                CardBehaviour::Declines {
                    code: "card_declined".to_owned(),
                },
            )
            .expect("known");
        assert_eq!(collect(&sandbox, &customer, 1).await, first_success);

        let key = charge(0).key;
        let payments = sandbox.payments_for_charge(&key);
        let listed: Vec<(&str, &str, PaymentStatus)> = payments
            .iter()
            .map(|p| (p.payment_id.as_str(), p.idempotency_key.as_str(), p.status))
            .collect();
        let round_1 = format!("{key}:r1");
        let round_2 = format!("{key}:r2");
        assert_eq!(
            listed,
            [
                ("pi_sandbox_1", key.as_str(), PaymentStatus::Processing),
                ("pi_sandbox_2", round_1.as_str(), PaymentStatus::Succeeded),
                ("pi_sandbox_3", round_2.as_str(), PaymentStatus::Succeeded),
            ]
        );
        assert_eq!(sandbox.payments(), payments);
        assert_eq!(processing.payment_id, "pi_sandbox_1");
        assert_eq!(second_success.payment_id, "pi_sandbox_3");
        assert_eq!(
            sandbox.find_payment(&key).await.expect("an answer"),
            Some(first_success)
        );

        // With no success, the latest payment still in flight.
        let (sandbox, customer) = processing_customer().await;
        collect(&sandbox, &customer, 0).await;
        let latest = collect(&sandbox, &customer, 1).await;
        assert_eq!(sandbox.find_payment(&key).await.expect("an answer"), Some(latest));
    }

    #[tokio::test]
    async fn forgetting_idempotency_keys_forgets_those_already_used_but_not_the_charges_payments() {
        let (sandbox, customer) = processing_customer().await;
        let first = collect(&sandbox, &customer, 0).await;
        let retry = collect(&sandbox, &customer, 1).await;
        assert_eq!(collect(&sandbox, &customer, 0).await, first, "a key is honoured");
        sandbox.forget_idempotency_keys();
        // Keys used before, of the first round (the charge's key) and of a later one, and a key
        // used after: each call makes a payment.
        let again = collect(&sandbox, &customer, 0).await;
        let retry_again = collect(&sandbox, &customer, 1).await;
        assert_ne!(again.payment_id, first.payment_id);
        assert_ne!(retry_again.payment_id, retry.payment_id);
        assert_ne!(collect(&sandbox, &customer, 0).await.payment_id, again.payment_id);
        // The charge still knows all five of its payments, in the order they were made.
        let key = charge(0).key;
        assert_eq!(sandbox.payments_for_charge(&key).len(), 5);
        assert_eq!(sandbox.payments(), sandbox.payments_for_charge(&key));
    }

    #[tokio::test]
    async fn only_the_sandboxs_own_references_name_a_payment() {
        let (sandbox, customer) = processing_customer().await;
        let made = collect(&sandbox, &customer, 0).await;
        for unknown in [
            "pi_sandbox_0",
            "pi_sandbox_01",
            "pi_sandbox_+1",
            "pi_sandbox_",
            "pi_sandbox_2",
            "pi_1",
            "pi_sandbox_99999999999999999999999",
        ] {
            let error = sandbox.finish_payment(unknown, true).expect_err("no such payment");
            assert!(
                matches!(&error, GatewayError::Rejected { code, .. } if code == "resource_missing"),
                "{unknown}: {error:?}"
            );
            assert!(sandbox.cancel_payment(unknown).await.is_err(), "{unknown}");
        }
        assert_eq!(sandbox.payments()[0].status, PaymentStatus::Processing);
        let finished = sandbox
            .finish_payment(&made.payment_id, true)
            .expect("its own reference");
        assert_eq!(
            (finished.payment_id.as_str(), finished.status),
            ("pi_sandbox_1", PaymentStatus::Succeeded)
        );
    }

    #[tokio::test]
    async fn unknown_customers_are_refused_unless_the_sandbox_accepts_them() {
        let named = CustomerId::new("cus_sandbox_1").expect("valid");
        let refusing = SandboxGateway::new();
        let charge = charge(0);
        let key = charge.idempotency_key();
        let request = PaymentRequest {
            charge: &charge,
            idempotency_key: &key,
            customer: &named,
        };
        let error = refusing.collect(&request).await.expect_err("an unknown customer");
        assert!(
            matches!(&error, GatewayError::Rejected { code, .. } if code == "resource_missing"),
            "{error:?}"
        );
        assert!(refusing.payments().is_empty());

        let accepting = SandboxGateway::accepting_unknown_customers();
        let paid = accepting.collect(&request).await.expect("opened and paid");
        assert_eq!(paid.status, PaymentStatus::Succeeded);
        assert_eq!(accepting.collected(&named, Currency::BRL), charge.amount);
        // Opened, it is a customer like any other.
        accepting
            .set_behaviour(&named, CardBehaviour::RequiresAuthentication)
            .expect("known now");
        // A customer the sandbox opens for a user never takes an id already in use.
        let opened = accepting
            .create_customer(&UserId::new("bob").expect("valid"))
            .await
            .expect("a customer");
        assert_ne!(opened, named);
    }
}
