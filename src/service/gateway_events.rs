//! What gateways report later (webhooks): payment updates, a subscription's paid fee, and
//! duplicate payments to refund.

use tracing::{Instrument, debug, info, info_span};

use crate::domain::check_identifier;
use crate::domain::{Charge, ChargeStatus};
use crate::error::BillingError;
use crate::gateway::{GatewayChange, GatewayEvent, PaymentOutcome, PaymentStatus, PaymentUpdate};
use crate::store::{GatewayEventRecord, StoreError};

use super::{BillingService, metrics};

impl BillingService {
    /// Applies a payment's new state reported by the gateway (a webhook) to its charge,
    /// idempotently: a charge already in that state, or already succeeded, is left as it is.
    ///
    /// A success is always applied: money moved for the charge, whichever round it came from. A
    /// success for a charge already paid by another payment is a duplicate: it is recorded in
    /// the audit trail ([`AuditEvent::DuplicatePayment`](crate::AuditEvent::DuplicatePayment))
    /// and logged at `error` for the host to refund. A failure or a request for authentication
    /// that names another round, or another payment than the charge's, is stale (the charge was
    /// retried since) and is ignored; a charge awaiting the customer follows the payment it
    /// names, whichever round made it. A failed charge's payment reported in flight again
    /// (processing, or awaiting authentication) is applied only when the gateway's payment is in
    /// that state now: the update may be an earlier state of the payment, delivered after its
    /// failure, since gateways do not keep their events in order.
    ///
    /// # Errors
    /// [`BillingError::ChargeNotFound`]; store errors; gateway errors when a failed payment
    /// reported in flight again cannot be looked up (answer them so that the event is delivered
    /// again).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, ChargeStatus, PaymentOutcome, PaymentStatus, PaymentUpdate, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let user = UserId::new("user-uuid")?;
    /// let fee = billing.charges(&user, None).await?.remove(0);
    ///
    /// // What a webhook handler does with `payment_intent.succeeded`: applying it twice is harmless.
    /// let update = PaymentUpdate {
    ///     user_id: user,
    ///     charge_key: fee.key.clone(),
    ///     round: Some(fee.round),
    ///     outcome: PaymentOutcome { payment_id: fee.payment_id.clone().unwrap_or_default(), status: PaymentStatus::Succeeded, decline_code: None, message: None },
    /// };
    /// assert_eq!(billing.apply_payment_update(update.clone()).await?.status, ChargeStatus::Succeeded);
    /// assert_eq!(billing.apply_payment_update(update).await?.status, ChargeStatus::Succeeded);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn apply_payment_update(&self, update: PaymentUpdate) -> Result<Charge, BillingError> {
        let span = info_span!("apply_payment_update", user = %update.user_id, charge = %update.charge_key);
        async {
            let target = match update.outcome.status {
                PaymentStatus::Succeeded => ChargeStatus::Succeeded,
                PaymentStatus::RequiresAction => ChargeStatus::RequiresAction,
                PaymentStatus::Declined | PaymentStatus::Canceled => ChargeStatus::Failed,
                _ => ChargeStatus::Pending,
            };
            loop {
                let charge = self
                    .store
                    .charge(&update.user_id, &update.charge_key)
                    .await?
                    .ok_or_else(|| BillingError::ChargeNotFound {
                        key: update.charge_key.to_string(),
                    })?;
                // A failure or authentication request is stale when it names another round, or
                // another payment than the one the charge is waiting on. A charge awaiting the
                // customer waits on the payment it names, whichever round made it: a new round
                // waits on the previous round's payment when that one could not be cancelled.
                let names_another_payment = charge
                    .payment_id
                    .as_ref()
                    .is_some_and(|p| *p != update.outcome.payment_id);
                let waits_on_it = charge.status == ChargeStatus::RequiresAction && !names_another_payment;
                let stale = target != ChargeStatus::Succeeded
                    && (names_another_payment || (!waits_on_it && update.round.is_some_and(|r| r != charge.round)));
                if target == ChargeStatus::Succeeded
                    && charge.status == ChargeStatus::Succeeded
                    && !update.outcome.payment_id.is_empty()
                    && charge.payment_id.as_ref() != Some(&update.outcome.payment_id)
                {
                    self.report_duplicate_payment(&charge, &update.outcome.payment_id)
                        .await?;
                    return Ok(charge);
                }
                if stale || charge.status == target || !charge.status.can_become(target) {
                    debug!(status = %charge.status, stale, "payment update changes nothing");
                    return Ok(charge);
                }
                // A failed payment in flight again (processing, awaiting authentication) is
                // either the customer trying it again or an earlier state of it delivered after
                // its failure: gateways do not keep their events in order. Only the gateway's
                // payment as it is now tells them apart.
                if charge.status == ChargeStatus::Failed
                    && target != ChargeStatus::Succeeded
                    && !self.in_flight_again(&charge, &update.outcome).await?
                {
                    debug!("an earlier state of a failed payment, delivered late: changes nothing");
                    return Ok(charge);
                }
                match self.try_settle(&charge, Ok(update.outcome.clone())).await {
                    Ok(settled) => {
                        info!(status = %settled.status, "payment update applied");
                        return Ok(settled);
                    }
                    // Changed under us: read it again and decide again.
                    Err(StoreError::StatusConflict { .. }) => continue,
                    Err(error) => return Err(error.into()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Whether the gateway's payment for `charge` is now the one `reported`, in its state: a
    /// failed payment reported in flight again really is.
    async fn in_flight_again(&self, charge: &Charge, reported: &PaymentOutcome) -> Result<bool, BillingError> {
        let now = self.gateway.find_payment(&charge.key).await?;
        Ok(now.is_some_and(|now| now.payment_id == reported.payment_id && now.status == reported.status))
    }

    /// Applies an event the gateway reported (a verified webhook), once per event id: a payment's
    /// new state goes through [`apply_payment_update`](Self::apply_payment_update), a paid
    /// subscription invoice through [`record_fixed_fee_paid`](Self::record_fixed_fee_paid) for
    /// the calendar month (in the user's plan's zone) its subscription period starts in.
    ///
    /// Returns the charge as it is after the event, or `None` when the event id was applied
    /// before (gateways deliver events at least once). The event is remembered only after it
    /// was applied, so an event whose application failed is applied when delivered again; two
    /// deliveries racing each other both apply it, which is harmless, because applying is
    /// idempotent.
    ///
    /// # Errors
    /// [`BillingError::InvalidId`] for an event id that is empty, longer than 255 bytes or not
    /// printable ASCII; [`BillingError::ChargeNotFound`] for a payment of a charge this store
    /// does not know (another environment sharing the gateway account, say: acknowledge it);
    /// [`BillingError::Gateway`] for a paid invoice in another currency than the plan's;
    /// [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks; gateway errors when a failed payment reported in flight again cannot be looked
    /// up, and store errors (answer these so that the gateway delivers the event again).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, ChargeStatus, GatewayChange, GatewayEvent, PaymentOutcome, PaymentStatus, PaymentUpdate, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let user = UserId::new("user-uuid")?;
    /// let fee = billing.charges(&user, None).await?.remove(0);
    /// let event = GatewayEvent {
    ///     id: "evt_1".to_owned(),
    ///     event_type: "payment_intent.succeeded".to_owned(),
    ///     change: GatewayChange::Payment(PaymentUpdate {
    ///         user_id: user.clone(),
    ///         charge_key: fee.key.clone(),
    ///         round: Some(0),
    ///         outcome: PaymentOutcome { payment_id: fee.payment_id.clone().unwrap_or_default(), status: PaymentStatus::Succeeded, decline_code: None, message: None },
    ///     }),
    /// };
    /// let charge = billing.apply_gateway_event(event.clone()).await?.expect("applied");
    /// assert_eq!(charge.status, ChargeStatus::Succeeded);
    /// // The same event delivered again is recognised and changes nothing.
    /// assert!(billing.apply_gateway_event(event).await?.is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn apply_gateway_event(&self, event: GatewayEvent) -> Result<Option<Charge>, BillingError> {
        let span =
            info_span!("apply_gateway_event", user = %event.user_id(), event = %event.id, kind = %event.event_type);
        async {
            check_identifier("gateway event id", &event.id, 255)?;
            let user = event.user_id().clone();
            if self.store.gateway_event_applied(&user, &event.id).await? {
                debug!("event already applied");
                return Ok(None);
            }
            let charge = match event.change {
                GatewayChange::Payment(update) => self.apply_payment_update(update).await?,
                GatewayChange::FixedFeePaid {
                    user_id,
                    period_start,
                    payment_id,
                    amount,
                } => {
                    let account = self.store.account(&user_id).await?;
                    let period = self.period_at(account.as_ref(), period_start)?.0.key();
                    self.record_fixed_fee_paid(&user_id, period, &payment_id, amount)
                        .await?
                }
            };
            self.store
                .record_gateway_event(GatewayEventRecord::applied(
                    user,
                    event.id,
                    event.event_type,
                    self.clock.now(),
                ))
                .await?;
            Ok(Some(charge))
        }
        .instrument(span)
        .await
    }

    /// Records and logs a second successful payment for a charge already paid: the money must be
    /// refunded by the host; the charge keeps its first payment. Reported once per duplicate
    /// payment, however often the gateway reports it.
    async fn report_duplicate_payment(&self, charge: &Charge, duplicate: &str) -> Result<(), BillingError> {
        let new = self
            .store
            .record_gateway_event(GatewayEventRecord {
                user_id: charge.user_id.clone(),
                event_id: format!("duplicate-payment:{duplicate}"),
                event_type: "duplicate_payment".to_owned(),
                at: self.clock.now(),
                period: Some(charge.period),
                audit: crate::store::AuditEvent::DuplicatePayment {
                    key: charge.key.clone(),
                    kept_payment_id: charge.payment_id.clone(),
                    duplicate_payment_id: duplicate.to_owned(),
                },
            })
            .await?;
        if new {
            metrics::duplicate_payment();
            tracing::error!(
                charge = %charge.key,
                kept = ?charge.payment_id,
                duplicate = %duplicate,
                "a second payment succeeded for a charge already paid: refund it"
            );
        }
        Ok(())
    }
}
