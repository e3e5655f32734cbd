//! The [`PaymentGateway`] conformance suite.
//!
//! A gateway cannot be told from outside how a customer's card behaves, so the suite asks a
//! [`GatewayFixture`] for customers of each kind (at Stripe: customers with the test cards that
//! succeed, decline or need authentication).

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::{Charge, ChargeStatus, CustomerId, Money, NewCharge, PeriodKey, Plan, PlanId, UserId};
use crate::gateway::{PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus};

/// Customers of each kind for the conformance suite.
#[async_trait]
pub trait GatewayFixture: Send + Sync {
    /// A new customer whose payments succeed.
    async fn paying_customer(&self) -> CustomerId;
    /// A new customer whose payments are declined.
    async fn declining_customer(&self) -> CustomerId;
    /// A new customer whose payments need authentication.
    async fn authenticating_customer(&self) -> CustomerId;
}

/// The fixture for [`SandboxGateway`](crate::SandboxGateway): sets card behaviours directly.
#[derive(Debug, Clone)]
pub struct SandboxFixture(pub crate::SandboxGateway);

impl SandboxFixture {
    fn customer(&self, behaviour: crate::CardBehaviour) -> CustomerId {
        let id = CustomerId::new(format!("cus_fixture_{}", Uuid::new_v4().simple())).expect("a valid customer id");
        self.0.add_customer(id.clone(), behaviour);
        id
    }
}

#[async_trait]
impl GatewayFixture for SandboxFixture {
    async fn paying_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::Succeeds)
    }
    async fn declining_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::Declines {
            code: "insufficient_funds".to_owned(),
        })
    }
    async fn authenticating_customer(&self) -> CustomerId {
        self.customer(crate::CardBehaviour::RequiresAuthentication)
    }
}

/// A block charge of a new user, as the service would collect it.
fn new_charge() -> Charge {
    let user = UserId::new(format!("gw-{}", Uuid::new_v4().simple())).expect("a valid user id");
    let period = PeriodKey::new(2026, 11).expect("valid");
    NewCharge::block(&Plan::default(), &user, period, 1, None).into_charge(
        Uuid::new_v4(),
        ChargeStatus::Pending,
        chrono::Utc::now(),
    )
}

async fn collect(
    gateway: &dyn PaymentGateway,
    charge: &Charge,
    round: u32,
    customer: &CustomerId,
) -> Result<PaymentOutcome, crate::GatewayError> {
    let charge = Charge {
        round,
        ..charge.clone()
    };
    let idempotency_key = charge.idempotency_key();
    gateway
        .collect(&PaymentRequest {
            charge: &charge,
            idempotency_key: &idempotency_key,
            customer,
        })
        .await
}

/// The same idempotency key never makes a second payment; the payment is found by its charge.
pub async fn collect_is_idempotent(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) {
    let customer = fixture.paying_customer().await;
    let charge = new_charge();
    let key = charge.key.clone();
    let first = collect(gateway, &charge, 0, &customer).await.expect("collect");
    assert_eq!(first.status, PaymentStatus::Succeeded);
    let second = collect(gateway, &charge, 0, &customer).await.expect("collect again");
    assert_eq!(second.payment_id, first.payment_id, "same key, same payment");
    let found = gateway
        .find_payment(&key)
        .await
        .expect("find_payment")
        .expect("the payment");
    assert_eq!(
        (found.payment_id, found.status),
        (first.payment_id, PaymentStatus::Succeeded)
    );
}

/// Each round's key makes its own payment; `find_payment` prefers the one that succeeded.
pub async fn rounds_are_separate_payments_found_by_charge(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) {
    let customer = fixture.paying_customer().await;
    let charge = new_charge();
    let key = charge.key.clone();
    let round0 = collect(gateway, &charge, 0, &customer).await.expect("round 0");
    let round1 = collect(gateway, &charge, 1, &customer).await.expect("round 1");
    assert_ne!(round0.payment_id, round1.payment_id);
    let found = gateway
        .find_payment(&key)
        .await
        .expect("find_payment")
        .expect("a payment");
    assert_eq!(found.status, PaymentStatus::Succeeded);
    assert!(found.payment_id == round0.payment_id || found.payment_id == round1.payment_id);
}

/// A decline is an `Ok` outcome with a code, and leaves nothing for `find_payment` to keep.
pub async fn declines_are_reported_with_a_code(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) {
    let customer = fixture.declining_customer().await;
    let charge = new_charge();
    let key = charge.key.clone();
    let outcome = collect(gateway, &charge, 0, &customer)
        .await
        .expect("a decline is an outcome");
    assert_eq!(outcome.status, PaymentStatus::Declined);
    assert!(outcome.decline_code.as_deref().is_some_and(|c| !c.is_empty()));
    assert_eq!(gateway.find_payment(&key).await.expect("find_payment"), None);
}

/// A payment that needs the customer is reported as `RequiresAction`, and found.
pub async fn authentication_is_reported_as_requires_action(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) {
    let customer = fixture.authenticating_customer().await;
    let charge = new_charge();
    let key = charge.key.clone();
    let outcome = collect(gateway, &charge, 0, &customer).await.expect("collect");
    assert_eq!(outcome.status, PaymentStatus::RequiresAction);
    let found = gateway
        .find_payment(&key)
        .await
        .expect("find_payment")
        .expect("the payment");
    assert_eq!(
        (found.payment_id, found.status),
        (outcome.payment_id, PaymentStatus::RequiresAction)
    );
}

/// A charge never collected has no payment.
pub async fn unknown_charges_have_no_payment(gateway: &dyn PaymentGateway, _fixture: &dyn GatewayFixture) {
    assert_eq!(
        gateway.find_payment(&new_charge().key).await.expect("find_payment"),
        None
    );
}

/// A subscription for a plan's fixed fee is created for a customer, and is that plan's: asking
/// again for the plan keeps it, while another plan gets a subscription of its own.
pub async fn subscriptions_are_created(gateway: &dyn PaymentGateway, fixture: &dyn GatewayFixture) {
    let customer = fixture.paying_customer().await;
    let user = UserId::new(format!("sub-{}", Uuid::new_v4().simple())).expect("a valid user id");
    let basic = PlanId::new("default").expect("valid");
    let premium = PlanId::new("conformance-premium").expect("valid");
    let premium_plan = Plan::builder()
        .fixed_fee(Money::from_minor(90_000, Plan::default().currency()))
        .build()
        .expect("a valid plan");
    let mut subscriptions = Vec::new();
    for (plan_id, plan) in [(&basic, Plan::default()), (&premium, premium_plan)] {
        let subscription = gateway
            .create_subscription(&user, &customer, plan_id, &plan)
            .await
            .expect("create_subscription");
        assert_eq!((&subscription.customer_id, &subscription.plan_id), (&customer, plan_id));
        assert!(!subscription.subscription_id.is_empty());
        // Asking again keeps the subscription the customer has to the plan.
        let again = gateway
            .create_subscription(&user, &customer, plan_id, &plan)
            .await
            .expect("create_subscription again");
        assert_eq!(
            (&again.subscription_id, &again.plan_id),
            (&subscription.subscription_id, plan_id)
        );
        subscriptions.push(subscription.subscription_id);
    }
    assert_ne!(
        subscriptions[0], subscriptions[1],
        "a subscription to one plan does not collect another plan's fee"
    );
}
