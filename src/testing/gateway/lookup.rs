//! Checks of the contract's clause **Look-up by charge key**: `find_payment` finds the payments
//! made for a charge by the charge's key, in any round and after the answer was lost; it answers
//! a succeeded payment first, else one in flight (processing, awaiting the customer); `None` for
//! a charge never collected or whose payments were all declined; never another charge's
//! payment, even one whose key begins with this charge's key.

use crate::gateway::{PaymentOutcome, PaymentStatus};

use super::{Clause, Probe, Verdict, Violation, charge_of, new_charge, new_user, shown, shown_found};

/// `Ok` when `find_payment` answers `expected` (its reference and status) for `charge`, else a
/// violation saying what happened to the charge (`story`).
async fn expect_found(
    probe: &Probe<'_>,
    charge: &crate::domain::Charge,
    expected: &PaymentOutcome,
    story: &str,
) -> Result<(), Violation> {
    let found = probe.find(charge).await?;
    probe.ensure(
        found.as_ref().map(|f| (f.payment_id.as_str(), f.status))
            == Some((expected.payment_id.as_str(), expected.status)),
        Clause::LookupByChargeKey,
        || {
            format!(
                "find_payment answered {} for a charge {story}, not its payment {}",
                shown_found(&found),
                shown(expected)
            )
        },
    )
}

/// A charge never collected has no payment, though the same user's block 10, whose key begins
/// with block 1's, was paid, and another user's block 1 too.
pub(super) async fn never_collected_has_no_payment(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.paying_customer().await;
    let user = new_user("lookup");
    let (block_1, block_10) = (charge_of(&user, 1), charge_of(&user, 10));
    debug_assert!(block_10.key.as_str().starts_with(block_1.key.as_str()));
    let paid = probe.collect(&block_10, 0, &customer, Clause::KnownOutcomes).await?;
    let other_user = probe
        .collect(&new_charge(), 0, &customer, Clause::KnownOutcomes)
        .await?;
    for (charge, story) in [
        (&block_1, "never collected, beside the same user's paid block 10"),
        (&new_charge(), "never collected, of a new user"),
    ] {
        let found = probe.find(charge).await?;
        probe.ensure(found.is_none(), Clause::LookupByChargeKey, || {
            format!(
                "find_payment answered {} for a charge {story} (payments made: {} and {})",
                shown_found(&found),
                shown(&paid),
                shown(&other_user)
            )
        })?;
    }
    expect_found(probe, &block_10, &paid, "paid once").await?;
    Ok(Verdict::Passed)
}

/// A payment whose answer never reached the caller is found by its charge.
pub(super) async fn found_after_the_answer_was_lost(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.paying_customer().await;
    let charge = new_charge();
    // The caller loses the answer (a crash, a connection lost): only the charge's key is left to
    // find the payment by. The answer is kept here only to name the payment expected.
    let lost = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::Succeeded)
        .await?;
    expect_found(probe, &charge, &lost, "paid, whose answer was lost").await?;
    Ok(Verdict::Passed)
}

/// A payment awaiting the customer is found, awaiting the customer.
pub(super) async fn awaiting_customer_is_found(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.authenticating_customer().await;
    let charge = new_charge();
    let awaiting = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::RequiresAction)
        .await?;
    expect_found(probe, &charge, &awaiting, "awaiting the customer").await?;
    Ok(Verdict::Passed)
}

/// A processing payment is found, processing.
pub(super) async fn processing_is_found(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = match probe.fixture.processing_customer().await {
        Ok(customer) => customer,
        Err(unsupported) => return Ok(Verdict::Skipped(unsupported)),
    };
    let charge = new_charge();
    let processing = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::Processing)
        .await?;
    expect_found(probe, &charge, &processing, "processing").await?;
    Ok(Verdict::Passed)
}

/// A charge whose only payment was declined has none to keep, in either round.
pub(super) async fn declined_has_no_payment_to_keep(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.declining_customer().await;
    let charge = new_charge();
    for round in [0, 1] {
        probe
            .collect_as(&charge, round, &customer, PaymentStatus::Declined)
            .await?;
        let found = probe.find(&charge).await?;
        probe.ensure(found.is_none(), Clause::LookupByChargeKey, || {
            format!(
                "find_payment answered {} for a charge declined in rounds 0..={round}",
                shown_found(&found)
            )
        })?;
    }
    Ok(Verdict::Passed)
}

/// A charge awaiting the customer in round 0 and paid in round 1 (the customer gave a card that
/// pays) is answered with round 1's success, not round 0's payment in flight.
pub(super) async fn success_is_found_before_one_in_flight(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.authenticating_customer().await;
    let charge = new_charge();
    let awaiting = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::RequiresAction)
        .await?;
    probe.fixture.give_paying_card(&customer).await;
    let paid = probe.collect(&charge, 1, &customer, Clause::NewRounds).await?;
    probe.ensure(
        paid.status == PaymentStatus::Succeeded && paid.payment_id != awaiting.payment_id,
        Clause::NewRounds,
        || {
            format!(
                "round 1, with a card that pays, answered {} after round 0's {}",
                shown(&paid),
                shown(&awaiting)
            )
        },
    )?;
    expect_found(
        probe,
        &charge,
        &paid,
        "awaiting the customer in round 0 and paid in round 1",
    )
    .await?;
    Ok(Verdict::Passed)
}
