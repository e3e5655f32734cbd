//! Checks of the contract's clauses **Idempotency** (`collect` with a key already used makes
//! no second payment: it answers the first, with the same outcome) and **New rounds** (a key
//! never used before, a later round's, is a new attempt and never replays an earlier round).

use crate::domain::CustomerId;
use crate::gateway::PaymentStatus;

use super::{Clause, Probe, Verdict, Violation, new_charge, shown, shown_found};

/// For a paying, a declining and an authenticating customer, collecting again with the same
/// key answers the first payment with the same outcome, and the charge keeps that payment.
pub(super) async fn reused_key_answers_the_first_payment(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customers: [(&str, CustomerId); 3] = [
        ("paying", probe.fixture.paying_customer().await),
        ("declining", probe.fixture.declining_customer().await),
        ("authenticating", probe.fixture.authenticating_customer().await),
    ];
    for (kind, customer) in &customers {
        let charge = new_charge();
        let first = probe.collect(&charge, 0, customer, Clause::KnownOutcomes).await?;
        // A gateway that cannot tell may answer an error instead; either way, the charge still
        // has the first payment only.
        if let Ok(again) = probe.try_collect(&charge, 0, customer).await {
            probe.ensure(
                (&again.payment_id, again.status, &again.decline_code)
                    == (&first.payment_id, first.status, &first.decline_code),
                Clause::Idempotency,
                || {
                    format!(
                        "a {kind} customer's payment answered {} with a key already used, whose first payment was {}",
                        shown(&again),
                        shown(&first)
                    )
                },
            )?;
        }
        let found = probe.find(&charge).await?;
        let expected = match first.status {
            PaymentStatus::Succeeded | PaymentStatus::RequiresAction | PaymentStatus::Processing => {
                Some((first.payment_id.as_str(), first.status))
            }
            _ => None,
        };
        probe.ensure(
            found.as_ref().map(|f| (f.payment_id.as_str(), f.status)) == expected,
            Clause::Idempotency,
            || {
                format!(
                    "after a {kind} customer's key was used twice, find_payment answered {} (the first payment was {})",
                    shown_found(&found),
                    shown(&first)
                )
            },
        )?;
    }
    Ok(Verdict::Passed)
}

/// A charge declined in round 0 is collected in round 1 once the customer's card pays: a new
/// payment, which the charge then keeps.
pub(super) async fn new_round_is_a_new_attempt(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.declining_customer().await;
    let charge = new_charge();
    let declined = probe.collect_as(&charge, 0, &customer, PaymentStatus::Declined).await?;
    probe.fixture.give_paying_card(&customer).await;
    let paid = probe.collect(&charge, 1, &customer, Clause::NewRounds).await?;
    probe.ensure(
        paid.status == PaymentStatus::Succeeded && paid.payment_id != declined.payment_id,
        Clause::NewRounds,
        || {
            format!(
                "round 1, with a card that pays, answered {} after round 0's {}",
                shown(&paid),
                shown(&declined)
            )
        },
    )?;
    let found = probe.find(&charge).await?;
    probe.ensure(
        found.as_ref().map(|f| (f.payment_id.as_str(), f.status))
            == Some((paid.payment_id.as_str(), PaymentStatus::Succeeded)),
        Clause::LookupByChargeKey,
        || {
            format!(
                "find_payment answered {} for a charge declined in round 0 and paid by {} in round 1",
                shown_found(&found),
                shown(&paid)
            )
        },
    )?;
    Ok(Verdict::Passed)
}
