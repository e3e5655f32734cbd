//! Stripe's webhook events turned into [`GatewayEvent`]s: payment updates, and the fixed fee
//! paid by a subscription's invoice.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::client::segment;
use super::objects::{id_of, payment_outcome, text};
use super::webhook::{WebhookError, verify_signature};
use super::{PLAN_KEY, StripeGateway, USER_KEY, library_amount};
use crate::domain::{ChargeKey, Currency, UserId};
use crate::gateway::{GatewayChange, GatewayEvent, PaymentUpdate, metadata_key};

impl StripeGateway {
    /// Checks a webhook's signature and reads it as a [`GatewayEvent`]: a PaymentIntent made
    /// for a charge (`payment_intent.succeeded`, `.payment_failed`, `.requires_action`,
    /// `.processing`, `.canceled`), or a paid invoice of a subscription made by
    /// [`create_subscription`](crate::PaymentGateway::create_subscription) (`invoice.paid`) that
    /// collected money, with the amount it collected. `None` for any other event (among them
    /// `invoice.payment_succeeded`, which Stripe sends for the same payment as `invoice.paid`,
    /// under another event id), or one about objects the library did not make: acknowledge
    /// those.
    ///
    /// `payload` is the raw request body, exactly as received; `signature` the
    /// `Stripe-Signature` header.
    ///
    /// # Errors
    /// [`WebhookError::NotConfigured`] without a webhook secret; a bad signature
    /// ([`WebhookError::SignatureMismatch`], [`WebhookError::MalformedSignature`],
    /// [`WebhookError::OutsideTolerance`]) or payload ([`WebhookError::MalformedEvent`]): answer
    /// `400`. [`WebhookError::Gateway`] when reading an invoice needed its subscription from
    /// Stripe and that failed: answer `5xx`, so that Stripe delivers it again.
    pub async fn webhook_event(&self, payload: &[u8], signature: &str) -> Result<Option<GatewayEvent>, WebhookError> {
        if self.inner.webhook_secrets.is_empty() {
            return Err(WebhookError::NotConfigured);
        }
        verify_signature(
            payload,
            signature,
            &self.inner.webhook_secrets,
            self.inner.clock.now(),
            self.inner.webhook_tolerance,
        )?;
        let event = super::webhook::read_event(payload)?;
        let change = match event.kind.as_str() {
            "payment_intent.succeeded"
            | "payment_intent.payment_failed"
            | "payment_intent.requires_action"
            | "payment_intent.processing"
            | "payment_intent.canceled" => payment_update(&event.object)?.map(GatewayChange::Payment),
            // Stripe also sends `invoice.payment_succeeded` for the same payment, under another
            // event id: reading both would apply the one payment twice.
            "invoice.paid" => self.fee_paid(&event.object).await?,
            _ => None,
        };
        Ok(change.map(|change| GatewayEvent {
            id: event.id,
            event_type: event.kind,
            change,
        }))
    }

    /// A paid invoice of one of the library's subscriptions, as the fee it collected. An
    /// invoice that collected nothing (a trial, a full discount) is not a fee collected; one
    /// paid from the customer's credit balance is, though no money moved at its payment.
    async fn fee_paid(&self, invoice: &Value) -> Result<Option<GatewayChange>, WebhookError> {
        let details = invoice
            .get("parent")
            .and_then(|p| p.get("subscription_details"))
            .or_else(|| invoice.get("subscription_details"));
        let Some(subscription) =
            id_of(invoice, "subscription").or_else(|| details.and_then(|d| id_of(d, "subscription")))
        else {
            return Ok(None);
        };
        // The fee collected is the invoice's total after discounts and before tax (the plan's
        // price is the fee, tax is added on top of it). `total_excluding_tax` is missing from
        // older API versions and may be null; `amount_paid` is the last resort only, as it is 0
        // for an invoice paid from the customer's credit balance.
        let total = ["total_excluding_tax", "total", "amount_paid"]
            .into_iter()
            .find_map(|field| invoice.get(field).filter(|v| !v.is_null()));
        let stripe_total = total.and_then(Value::as_i64);
        // Nothing collected, or a credit: no fee. Checked before the invoice is known to be the
        // library's, so that a trial's invoice costs no request to Stripe.
        if stripe_total.is_some_and(|t| t <= 0) {
            return Ok(None);
        }
        let payment_id = text(invoice, "id")
            .ok_or_else(|| WebhookError::MalformedEvent("an invoice without id".to_owned()))?
            .to_owned();
        let lines = invoice
            .get("lines")
            .and_then(|l| l.get("data"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ours = |metadata: Option<&Value>| {
            let metadata = metadata?;
            text(metadata, PLAN_KEY)?;
            text(metadata, USER_KEY).map(str::to_owned)
        };
        // The user: on the subscription's line (its item's metadata), on the subscription's
        // details in the invoice, or on the subscription itself.
        let on_line = lines
            .iter()
            .find_map(|line| ours(line.get("metadata")).map(|user| (line, user)));
        let line = on_line.as_ref().map(|&(line, _)| line);
        let user = match on_line
            .map(|(_, user)| user)
            .or_else(|| ours(details.and_then(|d| d.get("metadata"))))
        {
            Some(user) => user,
            None => {
                let path = format!("/v1/subscriptions/{}", segment(subscription));
                // Deleted since: not the library's to apply.
                let Some(found) = self
                    .fetch_if_exists(path, self.deadline())
                    .await
                    .map_err(WebhookError::Gateway)?
                else {
                    return Ok(None);
                };
                match ours(found.get("metadata")) {
                    Some(user) => user,
                    None => return Ok(None),
                }
            }
        };
        let user_id = UserId::new(user).map_err(|e| WebhookError::MalformedEvent(e.to_string()))?;
        // Read only now that the invoice is known to be the library's: an invoice of another
        // product of the account's, in a currency the library does not know, is not refused.
        let currency = text(invoice, "currency")
            .ok_or_else(|| WebhookError::MalformedEvent(format!("invoice {payment_id} has no currency")))?
            .parse::<Currency>()
            .map_err(|e: crate::MoneyError| WebhookError::MalformedEvent(format!("invoice {payment_id}: {e}")))?;
        let amount = stripe_total
            .and_then(|total| library_amount(total, currency))
            .ok_or_else(|| {
                WebhookError::MalformedEvent(format!("invoice {payment_id} has no readable total in {currency}"))
            })?;
        // The period the invoice pays is its subscription line's: an invoice's own
        // period_start is the previous period's for a renewal.
        let start = line
            .or_else(|| lines.iter().find(|l| l.get("period").is_some()))
            .and_then(|l| l.get("period"))
            .and_then(|p| p.get("start"))
            .and_then(Value::as_i64)
            .ok_or_else(|| WebhookError::MalformedEvent(format!("invoice {payment_id} has no subscription period")))?;
        let period_start = DateTime::<Utc>::from_timestamp(start, 0)
            .ok_or_else(|| WebhookError::MalformedEvent(format!("invoice {payment_id} has a bad period")))?;
        Ok(Some(GatewayChange::FixedFeePaid {
            user_id,
            period_start,
            amount,
            payment_id,
        }))
    }
}

/// A PaymentIntent made for a charge, as a payment update; `None` for one the library did not
/// make (no charge key in its metadata).
fn payment_update(intent: &Value) -> Result<Option<PaymentUpdate>, WebhookError> {
    use WebhookError::MalformedEvent;
    let Some(metadata) = intent
        .get("metadata")
        .filter(|m| m.get(metadata_key::CHARGE_KEY).is_some())
    else {
        return Ok(None);
    };
    let field = |key: &str| text(metadata, key).ok_or_else(|| MalformedEvent(format!("no {key} in the metadata")));
    let user_id = UserId::new(field(metadata_key::USER_ID)?).map_err(|e| MalformedEvent(e.to_string()))?;
    let charge_key = ChargeKey::new(
        &user_id,
        field(metadata_key::PERIOD)?
            .parse()
            .map_err(|e: crate::PeriodError| MalformedEvent(e.to_string()))?,
        field(metadata_key::KIND)?
            .parse()
            .map_err(|e: crate::IdError| MalformedEvent(e.to_string()))?,
        field(metadata_key::BLOCK)?
            .parse()
            .map_err(|e: std::num::ParseIntError| MalformedEvent(e.to_string()))?,
    );
    if charge_key.as_str() != field(metadata_key::CHARGE_KEY)? {
        return Err(MalformedEvent("the charge key does not match its parts".to_owned()));
    }
    let round = text(metadata, metadata_key::ROUND).and_then(|r| r.parse().ok());
    let outcome = payment_outcome(intent).map_err(|e| MalformedEvent(e.to_string()))?;
    Ok(Some(PaymentUpdate {
        user_id,
        charge_key,
        round,
        outcome,
    }))
}
