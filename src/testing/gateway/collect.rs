//! Checks of `collect`'s answers, under the contract's clauses **Known outcomes** (each kind of
//! payment reported with its status: succeeded, declined with its decline code, awaiting the
//! customer, processing), **Nothing collected on refusal** (a declined or refused request
//! collects nothing) and **Minor units** (the payment is for exactly the charge's amount, in
//! its currency's minor units).

use crate::domain::{Charge, Currency, Money};
use crate::gateway::PaymentStatus;

use super::{Clause, Probe, Verdict, Violation, new_charge, shown, shown_found};

/// A paying customer's payment is `Succeeded`, with a reference and no decline code.
pub(super) async fn succeeded_is_reported_succeeded(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.paying_customer().await;
    let outcome = probe
        .collect(&new_charge(), 0, &customer, Clause::KnownOutcomes)
        .await?;
    probe.ensure(
        outcome.status == PaymentStatus::Succeeded && outcome.decline_code.is_none(),
        Clause::KnownOutcomes,
        || {
            format!(
                "a paying customer's payment was answered {}, not Succeeded",
                shown(&outcome)
            )
        },
    )?;
    probe.ensure(!outcome.payment_id.is_empty(), Clause::KnownOutcomes, || {
        "a succeeded payment was answered without its payment_id".to_owned()
    })?;
    Ok(Verdict::Passed)
}

/// A declining customer's payment is `Declined` with the fixture's decline code, and leaves no
/// payment to keep: nothing was collected.
pub(super) async fn decline_is_reported_with_its_code(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.declining_customer().await;
    let charge = new_charge();
    let outcome = probe.collect(&charge, 0, &customer, Clause::KnownOutcomes).await?;
    let expected = probe.fixture.decline_code();
    probe.ensure(
        outcome.status == PaymentStatus::Declined && outcome.decline_code.as_deref() == Some(expected),
        Clause::KnownOutcomes,
        || {
            format!(
                "a declined payment was answered {}, not Declined ({expected})",
                shown(&outcome)
            )
        },
    )?;
    let found = probe.find(&charge).await?;
    probe.ensure(found.is_none(), Clause::NothingCollectedOnRefusal, || {
        format!(
            "after a decline, find_payment answered {} for the charge",
            shown_found(&found)
        )
    })?;
    Ok(Verdict::Passed)
}

/// A payment that needs authentication is `RequiresAction`, with its reference.
pub(super) async fn authentication_is_reported_requires_action(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.authenticating_customer().await;
    let outcome = probe
        .collect(&new_charge(), 0, &customer, Clause::KnownOutcomes)
        .await?;
    probe.ensure(
        outcome.status == PaymentStatus::RequiresAction && !outcome.payment_id.is_empty(),
        Clause::KnownOutcomes,
        || {
            format!(
                "a payment needing authentication was answered {}, not RequiresAction with its payment_id",
                shown(&outcome)
            )
        },
    )?;
    Ok(Verdict::Passed)
}

/// A payment whose outcome comes later is `Processing`, with its reference.
pub(super) async fn processing_is_reported_processing(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = match probe.fixture.processing_customer().await {
        Ok(customer) => customer,
        Err(unsupported) => return Ok(Verdict::Skipped(unsupported)),
    };
    let outcome = probe
        .collect(&new_charge(), 0, &customer, Clause::KnownOutcomes)
        .await?;
    probe.ensure(
        outcome.status == PaymentStatus::Processing && !outcome.payment_id.is_empty(),
        Clause::KnownOutcomes,
        || {
            format!(
                "a payment still processing was answered {}, not Processing with its payment_id",
                shown(&outcome)
            )
        },
    )?;
    Ok(Verdict::Passed)
}

/// A request for a customer the gateway never opened is refused with an error, and no payment
/// for the charge exists afterwards.
pub(super) async fn unknown_customer_is_refused(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let unknown = crate::domain::CustomerId::new(format!("cus_never_opened_{}", uuid::Uuid::new_v4().simple()))
        .expect("a valid customer id");
    let charge = new_charge();
    if let Ok(outcome) = probe.try_collect(&charge, 0, &unknown).await {
        return Err(probe.violation(
            Clause::NothingCollectedOnRefusal,
            format!(
                "collect for a customer the gateway never opened answered {} instead of an error",
                shown(&outcome)
            ),
        ));
    }
    let found = probe.find(&charge).await?;
    probe.ensure(found.is_none(), Clause::NothingCollectedOnRefusal, || {
        format!(
            "after a refused request, find_payment answered {} for the charge",
            shown_found(&found)
        )
    })?;
    Ok(Verdict::Passed)
}

/// Charges in a two-decimal, a zero-decimal and a three-decimal currency are each charged
/// exactly their amount, as the gateway's records show it.
pub(super) async fn amounts_are_in_minor_units(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.paying_customer().await;
    for amount in [
        Money::from_minor(40_000, Currency::BRL),
        Money::from_minor(500, Currency::JPY),
        // Three decimals, the last a zero: what every gateway can charge (Stripe only charges
        // multiples of ten in these currencies).
        Money::from_minor(1_230, Currency::BHD),
    ] {
        let charge = Charge { amount, ..new_charge() };
        let outcome = probe.collect(&charge, 0, &customer, Clause::MinorUnits).await?;
        probe.ensure(
            outcome.status == PaymentStatus::Succeeded,
            Clause::KnownOutcomes,
            || {
                format!(
                    "a paying customer's payment of {amount} was answered {}",
                    shown(&outcome)
                )
            },
        )?;
        let charged = probe.fixture.amount_charged(&outcome.payment_id).await;
        probe.ensure(charged == Some(amount), Clause::MinorUnits, || {
            format!(
                "a charge of {amount} ({} minor units) was charged as {}",
                amount.minor_units(),
                charged.map_or_else(
                    || "nothing the gateway knows".to_owned(),
                    |charged| format!("{charged} ({} minor units)", charged.minor_units())
                )
            )
        })?;
    }
    Ok(Verdict::Passed)
}
