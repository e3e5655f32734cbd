//! Checks of the contract's clause **Cancel**: `cancel_payment` cancels a payment awaiting the
//! customer (it answers `Canceled`, and the charge no longer keeps it); cancels a processing
//! payment or, past cancelling it, reports it `Processing`; MUST NOT cancel a succeeded payment,
//! which it reports as `Succeeded` and which stays found; answers `Canceled` again for a payment
//! already canceled; and refuses a payment id the gateway never issued.

use crate::gateway::{GatewayError, PaymentStatus};

use super::{Clause, Probe, Verdict, Violation, new_charge, shown, shown_found};

/// A payment awaiting the customer is canceled: `Canceled` (twice), and no longer found.
pub(super) async fn awaiting_customer_is_canceled(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.authenticating_customer().await;
    let charge = new_charge();
    let awaiting = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::RequiresAction)
        .await?;
    for attempt in ["the first", "a second"] {
        let canceled = probe.cancel(&awaiting.payment_id).await?;
        probe.ensure(
            (canceled.payment_id.as_str(), canceled.status) == (awaiting.payment_id.as_str(), PaymentStatus::Canceled),
            Clause::Cancel,
            || {
                format!(
                    "{attempt} cancel of a payment awaiting the customer ({}) answered {}",
                    shown(&awaiting),
                    shown(&canceled)
                )
            },
        )?;
    }
    let found = probe.find(&charge).await?;
    probe.ensure(found.is_none(), Clause::Cancel, || {
        format!(
            "find_payment still answered {} for a charge whose only payment was canceled",
            shown_found(&found)
        )
    })?;
    Ok(Verdict::Passed)
}

/// A processing payment is canceled (and no longer found) or, past cancelling, reported
/// `Processing` (and still found).
pub(super) async fn processing_is_canceled_or_reported(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = match probe.fixture.processing_customer().await {
        Ok(customer) => customer,
        Err(unsupported) => return Ok(Verdict::Skipped(unsupported)),
    };
    let charge = new_charge();
    let processing = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::Processing)
        .await?;
    let after = probe.cancel(&processing.payment_id).await?;
    probe.ensure(
        after.payment_id == processing.payment_id
            && matches!(after.status, PaymentStatus::Canceled | PaymentStatus::Processing),
        Clause::Cancel,
        || {
            format!(
                "cancel of a processing payment ({}) answered {}, neither Canceled nor Processing",
                shown(&processing),
                shown(&after)
            )
        },
    )?;
    let found = probe.find(&charge).await?;
    let expected = (after.status == PaymentStatus::Processing)
        .then_some((processing.payment_id.as_str(), PaymentStatus::Processing));
    probe.ensure(
        found.as_ref().map(|f| (f.payment_id.as_str(), f.status)) == expected,
        Clause::Cancel,
        || {
            format!(
                "after cancel answered {}, find_payment answered {}",
                shown(&after),
                shown_found(&found)
            )
        },
    )?;
    Ok(Verdict::Passed)
}

/// A succeeded payment is not canceled: `Succeeded` (twice), and still found succeeded.
pub(super) async fn succeeded_payment_is_not_canceled(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let customer = probe.fixture.paying_customer().await;
    let charge = new_charge();
    let paid = probe
        .collect_as(&charge, 0, &customer, PaymentStatus::Succeeded)
        .await?;
    for attempt in ["the first", "a second"] {
        let after = probe.cancel(&paid.payment_id).await?;
        probe.ensure(
            (after.payment_id.as_str(), after.status) == (paid.payment_id.as_str(), PaymentStatus::Succeeded),
            Clause::Cancel,
            || {
                format!(
                    "{attempt} cancel of a succeeded payment ({}) answered {}, not Succeeded",
                    shown(&paid),
                    shown(&after)
                )
            },
        )?;
    }
    let found = probe.find(&charge).await?;
    probe.ensure(
        found.as_ref().map(|f| (f.payment_id.as_str(), f.status))
            == Some((paid.payment_id.as_str(), PaymentStatus::Succeeded)),
        Clause::Cancel,
        || {
            format!(
                "after cancel_payment of its succeeded payment {}, find_payment answered {} for the charge",
                shown(&paid),
                shown_found(&found)
            )
        },
    )?;
    Ok(Verdict::Passed)
}

/// A payment id the gateway never issued is refused with [`GatewayError::Rejected`].
pub(super) async fn unknown_payment_is_refused(probe: &Probe<'_>) -> Result<Verdict, Violation> {
    let unknown = format!("pi_never_issued_{}", uuid::Uuid::new_v4().simple());
    match probe.gateway.cancel_payment(&unknown).await {
        Err(GatewayError::Rejected { .. }) => Ok(Verdict::Passed),
        Ok(outcome) => Err(probe.violation(
            Clause::Cancel,
            format!(
                "cancel of a payment id never issued answered {} instead of Rejected",
                shown(&outcome)
            ),
        )),
        Err(error) => Err(probe.violation(
            Clause::Cancel,
            format!("cancel of a payment id never issued failed with {error:?} instead of Rejected"),
        )),
    }
}
