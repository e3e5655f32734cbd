//! Checks of the contract's clause **Subscriptions**, for a gateway that offers them (a fixture
//! whose [`subscriptions`](super::GatewayFixture::subscriptions) is `Err` has these checks
//! skipped, with its reason): `create_subscription` answers a subscription of the customer to
//! the plan, which the gateway ties to the user; asking again for the same user, customer and
//! plan answers the same subscription; another plan, or another user paid for by the same
//! customer, gets a subscription of its own.

use crate::domain::{CustomerId, Money, Plan, PlanId, UserId};
use crate::gateway::Subscription;

use super::{Clause, Probe, Verdict, Violation, new_user};

/// Subscribes `user`'s `customer` to `plan_id`; an error is a violation.
async fn subscribe(
    probe: &Probe<'_>,
    user: &UserId,
    customer: &CustomerId,
    (plan_id, plan): (&PlanId, &Plan),
) -> Result<Subscription, Violation> {
    probe
        .gateway
        .create_subscription(user, customer, plan_id, plan)
        .await
        .map_err(|error| {
            probe.violation(
                Clause::Subscriptions,
                format!("create_subscription of {user} to {plan_id} failed: {error} ({error:?})"),
            )
        })
}

/// The plan every subscription check subscribes to first: the default plan.
fn basic() -> (PlanId, Plan) {
    (PlanId::new("default").expect("valid"), Plan::default())
}

/// A second plan, with a fee of its own.
fn premium() -> (PlanId, Plan) {
    let plan = Plan::builder()
        .fixed_fee(Money::from_minor(90_000, Plan::default().currency()))
        .build()
        .expect("a valid plan");
    (PlanId::new("conformance-premium").expect("valid"), plan)
}

/// A subscription names its customer and plan, has a reference, and the gateway ties it to its
/// user.
pub(super) async fn subscription_names_its_user(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    if let Err(unsupported) = probe.fixture.subscriptions() {
        return Ok(Verdict::Skipped(unsupported));
    }
    let customer = probe.fixture.paying_customer().await;
    let user = new_user("subscriber");
    let (plan_id, plan) = basic();
    let subscription = subscribe(probe, &user, &customer, (&plan_id, &plan)).await?;
    probe.ensure(
        subscription.customer_id == customer
            && subscription.plan_id == plan_id
            && !subscription.subscription_id.is_empty(),
        Clause::Subscriptions,
        || format!("a subscription of {customer} to {plan_id} was answered as {subscription:?}"),
    )?;
    let subscriber = probe.fixture.subscriber(&subscription).await;
    probe.ensure(subscriber.as_ref() == Some(&user), Clause::Subscriptions, || {
        format!(
            "the gateway ties the subscription {} made for {user} to {subscriber:?}",
            subscription.subscription_id
        )
    })?;
    Ok(Verdict::Passed)
}

/// Asking again for a user, customer and plan answers the same subscription; another plan, and
/// another user paid for by the same customer, each get their own.
pub(super) async fn subscription_is_made_once_per_user_and_plan(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    if let Err(unsupported) = probe.fixture.subscriptions() {
        return Ok(Verdict::Skipped(unsupported));
    }
    let customer = probe.fixture.paying_customer().await;
    let (user, other) = (new_user("subscriber"), new_user("subscriber"));
    let (basic_id, basic_plan) = basic();
    let (premium_id, premium_plan) = premium();
    let first = subscribe(probe, &user, &customer, (&basic_id, &basic_plan)).await?;
    let again = subscribe(probe, &user, &customer, (&basic_id, &basic_plan)).await?;
    probe.ensure(
        again.subscription_id == first.subscription_id && again.plan_id == basic_id,
        Clause::Subscriptions,
        || {
            format!(
                "asking again for {user}'s subscription to {basic_id} answered {} after {}",
                again.subscription_id, first.subscription_id
            )
        },
    )?;
    let premium = subscribe(probe, &user, &customer, (&premium_id, &premium_plan)).await?;
    probe.ensure(
        premium.subscription_id != first.subscription_id && premium.plan_id == premium_id,
        Clause::Subscriptions,
        || {
            format!(
                "a subscription to {premium_id} was answered as {premium:?}, beside {} to {basic_id}",
                first.subscription_id
            )
        },
    )?;
    let others = subscribe(probe, &other, &customer, (&basic_id, &basic_plan)).await?;
    probe.ensure(
        others.subscription_id != first.subscription_id,
        Clause::Subscriptions,
        || {
            format!(
                "another user paid for by the same customer got {user}'s subscription {}",
                first.subscription_id
            )
        },
    )?;
    let subscriber = probe.fixture.subscriber(&others).await;
    probe.ensure(subscriber.as_ref() == Some(&other), Clause::Subscriptions, || {
        format!(
            "the gateway ties the subscription {} made for {other} to {subscriber:?}",
            others.subscription_id
        )
    })?;
    Ok(Verdict::Passed)
}
