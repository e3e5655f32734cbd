//! Checks of the contract's clause **Customers**: `create_customer` opens a customer the gateway
//! then accepts (with a payment method that pays, its payments succeed), answers the same
//! customer when asked again for the same user (a retry), and another customer for another
//! user.

use crate::gateway::PaymentStatus;

use super::{Clause, Probe, Verdict, Violation, new_charge, new_user, shown};

/// A customer the gateway opened, given a card that pays, pays.
pub(super) async fn opened_customer_is_accepted(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let user = new_user("customer");
    let customer = probe.gateway.create_customer(&user).await.map_err(|error| {
        probe.violation(
            Clause::Customers,
            format!("create_customer failed: {error} ({error:?})"),
        )
    })?;
    probe.fixture.give_paying_card(&customer).await;
    let outcome = probe.collect(&new_charge(), 0, &customer, Clause::Customers).await?;
    probe.ensure(outcome.status == PaymentStatus::Succeeded, Clause::Customers, || {
        format!(
            "the customer {customer} opened by create_customer, given a card that pays, paid {}",
            shown(&outcome)
        )
    })?;
    Ok(Verdict::Passed)
}

/// Asking again for a user answers the customer opened for it; another user gets another.
pub(super) async fn customer_is_opened_once_per_user(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let (user, other) = (new_user("customer"), new_user("customer"));
    let mut opened = Vec::new();
    for (who, user) in [
        ("a user", &user),
        ("the same user again", &user),
        ("another user", &other),
    ] {
        let customer = probe.gateway.create_customer(user).await.map_err(|error| {
            probe.violation(
                Clause::Customers,
                format!("create_customer for {who} failed: {error} ({error:?})"),
            )
        })?;
        opened.push(customer);
    }
    probe.ensure(opened[0] == opened[1], Clause::Customers, || {
        format!(
            "create_customer opened {} and then {} for the same user",
            opened[0], opened[1]
        )
    })?;
    probe.ensure(opened[0] != opened[2], Clause::Customers, || {
        format!("create_customer answered {} for two users", opened[0])
    })?;
    Ok(Verdict::Passed)
}
