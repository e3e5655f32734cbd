//! Reading Stripe's objects: a PaymentIntent's state as a [`PaymentOutcome`].

use serde_json::Value;

use super::client::ApiError;
use crate::gateway::{PaymentOutcome, PaymentStatus};

/// The text at `key`, when it is a non-empty string.
pub(super) fn text<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The id of a field that is either an id or an expanded object.
pub(super) fn id_of<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    match object.get(key) {
        Some(Value::String(id)) if !id.is_empty() => Some(id),
        Some(expanded @ Value::Object(_)) => text(expanded, "id"),
        _ => None,
    }
}

/// Whether an error's codes ask for the customer's authentication: how Stripe reports an
/// off-session payment that needs 3-D Secure.
fn asks_authentication(code: Option<&str>, decline_code: Option<&str>) -> bool {
    code == Some("authentication_required") || decline_code == Some("authentication_required")
}

/// Why a PaymentIntent read from Stripe cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("unreadable PaymentIntent: {0}")]
pub(super) struct Unreadable(pub(super) String);

/// A PaymentIntent's state as the library sees it.
///
/// - `succeeded`: succeeded; `processing`: processing (settled later by webhook);
/// - `requires_action`, or `requires_payment_method` after an `authentication_required` error:
///   requires the customer's action;
/// - `requires_payment_method` after any other error, or `requires_confirmation`: declined, with
///   the decline code; nothing was collected;
/// - `requires_capture`: processing (authorised, not yet captured);
/// - `canceled`: canceled.
pub(super) fn payment_outcome(intent: &Value) -> Result<PaymentOutcome, Unreadable> {
    let payment_id = text(intent, "id")
        .ok_or_else(|| Unreadable("no id".to_owned()))?
        .to_owned();
    let status = text(intent, "status").ok_or_else(|| Unreadable(format!("{payment_id} has no status")))?;
    let error = intent.get("last_payment_error").filter(|e| e.is_object());
    let message = error.and_then(|e| text(e, "message")).map(str::to_owned);
    let (status, decline_code) = match status {
        "succeeded" => (PaymentStatus::Succeeded, None),
        "processing" | "requires_capture" => (PaymentStatus::Processing, None),
        "requires_action" => (PaymentStatus::RequiresAction, None),
        "requires_payment_method"
            if error.is_some_and(|e| asks_authentication(text(e, "code"), text(e, "decline_code"))) =>
        {
            (PaymentStatus::RequiresAction, None)
        }
        "requires_payment_method" | "requires_confirmation" => {
            let code = error
                .and_then(|e| text(e, "decline_code").or_else(|| text(e, "code")))
                .unwrap_or(status);
            (PaymentStatus::Declined, Some(code.to_owned()))
        }
        "canceled" => (
            PaymentStatus::Canceled,
            text(intent, "cancellation_reason").map(str::to_owned),
        ),
        other => return Err(Unreadable(format!("{payment_id} has an unknown status {other:?}"))),
    };
    Ok(PaymentOutcome {
        payment_id,
        status,
        decline_code,
        message,
    })
}

/// The outcome of a `402` to a payment: declined with the decline code, or awaiting the
/// customer when Stripe asks for authentication. Nothing was collected either way.
pub(super) fn refused_payment(error: &ApiError) -> PaymentOutcome {
    let payment_id = error
        .payment_intent
        .as_ref()
        .and_then(|pi| text(pi, "id"))
        .unwrap_or_default()
        .to_owned();
    if asks_authentication(error.code.as_deref(), error.decline_code.as_deref()) {
        return PaymentOutcome {
            payment_id,
            status: PaymentStatus::RequiresAction,
            decline_code: None,
            message: Some(error.message.clone()),
        };
    }
    PaymentOutcome {
        payment_id,
        status: PaymentStatus::Declined,
        decline_code: Some(error.best_code()),
        message: Some(error.message.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn statuses_map_to_the_library_s() {
        let cases = [
            (
                json!({"id": "pi_1", "status": "succeeded"}),
                PaymentStatus::Succeeded,
                None,
            ),
            (
                json!({"id": "pi_1", "status": "processing"}),
                PaymentStatus::Processing,
                None,
            ),
            (
                json!({"id": "pi_1", "status": "requires_capture"}),
                PaymentStatus::Processing,
                None,
            ),
            (
                json!({"id": "pi_1", "status": "requires_action"}),
                PaymentStatus::RequiresAction,
                None,
            ),
            (
                json!({"id": "pi_1", "status": "requires_payment_method",
                       "last_payment_error": {"code": "authentication_required"}}),
                PaymentStatus::RequiresAction,
                None,
            ),
            (
                json!({"id": "pi_1", "status": "requires_payment_method",
                       "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}}),
                PaymentStatus::Declined,
                Some("insufficient_funds"),
            ),
            (
                json!({"id": "pi_1", "status": "requires_payment_method",
                       "last_payment_error": {"code": "card_declined"}}),
                PaymentStatus::Declined,
                Some("card_declined"),
            ),
            (
                json!({"id": "pi_1", "status": "canceled", "cancellation_reason": "abandoned"}),
                PaymentStatus::Canceled,
                Some("abandoned"),
            ),
        ];
        for (intent, status, code) in cases {
            let outcome = payment_outcome(&intent).expect("readable");
            assert_eq!(
                (outcome.status, outcome.decline_code.as_deref()),
                (status, code),
                "{intent}"
            );
            assert_eq!(outcome.payment_id, "pi_1");
        }
    }

    #[test]
    fn unknown_or_missing_statuses_are_unreadable() {
        assert!(payment_outcome(&json!({"id": "pi_1", "status": "exploded"})).is_err());
        assert!(payment_outcome(&json!({"id": "pi_1"})).is_err());
        assert!(payment_outcome(&json!({"status": "succeeded"})).is_err());
    }

    #[test]
    fn refusals_are_declines_or_requests_for_authentication() {
        let declined = ApiError {
            kind: "card_error".to_owned(),
            code: Some("card_declined".to_owned()),
            decline_code: Some("insufficient_funds".to_owned()),
            message: "Your card has insufficient funds.".to_owned(),
            payment_intent: Some(json!({"id": "pi_9", "status": "requires_payment_method"})),
        };
        let outcome = refused_payment(&declined);
        assert_eq!(outcome.status, PaymentStatus::Declined);
        assert_eq!(outcome.decline_code.as_deref(), Some("insufficient_funds"));
        assert_eq!(outcome.payment_id, "pi_9");
        let authenticate = ApiError {
            code: Some("authentication_required".to_owned()),
            decline_code: Some("authentication_required".to_owned()),
            ..declined
        };
        assert_eq!(refused_payment(&authenticate).status, PaymentStatus::RequiresAction);
    }
}
