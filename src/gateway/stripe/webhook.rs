//! Stripe webhooks: the `Stripe-Signature` check, and reading events.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ring::hmac;
use serde_json::Value;

use crate::gateway::GatewayError;

/// How far a webhook's timestamp may be from now: Stripe's default, 5 minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// A webhook endpoint's signing secret (`whsec_...`). Never shown by `Debug`.
///
/// # Example
/// ```
/// use token_billing::gateway::stripe::WebhookSecret;
///
/// let secret = WebhookSecret::new("whsec_c2VjcmV0");
/// assert_eq!(format!("{secret:?}"), "WebhookSecret(whsec_…)");
/// ```
#[derive(Clone)]
pub struct WebhookSecret(hmac::Key, String);

impl WebhookSecret {
    /// The secret as Stripe shows it, prefix included.
    pub fn new(secret: impl Into<String>) -> WebhookSecret {
        let secret = secret.into();
        WebhookSecret(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()), prefix_of(&secret))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({}…)", self.1)
    }
}

/// What a redacted secret still shows: its kind (`whsec_`, `sk_test_`, `rk_live_`), nothing of
/// the secret itself.
pub(super) fn prefix_of(secret: &str) -> String {
    let mut parts = secret.split_inclusive('_');
    let Some(kind) = parts.next().filter(|p| p.ends_with('_') && p.len() <= 6) else {
        return String::new();
    };
    match parts.next() {
        Some(mode @ ("test_" | "live_")) => format!("{kind}{mode}"),
        _ => kind.to_owned(),
    }
}

/// Why a webhook was refused. Answer the first four with `400` (Stripe stops retrying a delivery
/// that a retry cannot fix only when it is acknowledged, so log them), and
/// [`WebhookError::Gateway`] with `5xx`, so that Stripe delivers it again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The `Stripe-Signature` header is missing or not of the form `t=...,v1=...`.
    #[error("malformed Stripe-Signature header: {0}")]
    MalformedSignature(&'static str),
    /// No `v1` signature matches the payload under any configured secret: a forged or tampered
    /// request, or the wrong secret.
    #[error("no signature matches the payload")]
    SignatureMismatch,
    /// The signature is valid but its timestamp is further from now than the tolerance: a
    /// replayed request.
    #[error("the signature's timestamp {timestamp} is outside the tolerance of {tolerance:?} around {now}")]
    OutsideTolerance {
        /// The timestamp signed.
        timestamp: DateTime<Utc>,
        /// Now.
        now: DateTime<Utc>,
        /// The tolerance.
        tolerance: Duration,
    },
    /// The payload is not a Stripe event.
    #[error("the payload is not a Stripe event: {0}")]
    MalformedEvent(String),
    /// No webhook secret is configured on the gateway.
    #[error("no webhook secret is configured")]
    NotConfigured,
    /// Reading the event needed Stripe (an invoice's subscription) and Stripe failed.
    #[error("could not read the event's objects from Stripe")]
    Gateway(#[source] GatewayError),
}

/// Checks a webhook's `Stripe-Signature` header against its raw payload: HMAC-SHA256 of
/// `{t}.{payload}` under each secret, compared in constant time with each `v1` signature (Stripe
/// signs with every active secret while one is being rolled), and the timestamp `t` within
/// `tolerance` of `now`. Returns the signed timestamp.
///
/// # Errors
/// [`WebhookError::MalformedSignature`], [`WebhookError::SignatureMismatch`],
/// [`WebhookError::OutsideTolerance`].
///
/// # Example
/// ```
/// use chrono::{TimeZone, Utc};
/// use token_billing::gateway::stripe::{DEFAULT_TOLERANCE, WebhookError, WebhookSecret, verify_signature};
///
/// let secret = WebhookSecret::new("whsec_test");
/// let payload = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
/// let now = Utc.timestamp_opt(1_790_000_000, 0).unwrap();
/// let header = token_billing::gateway::stripe::sign(payload, "whsec_test", now);
/// assert!(verify_signature(payload, &header, &[secret.clone()], now, DEFAULT_TOLERANCE).is_ok());
///
/// let tampered = br#"{"id":"evt_1","type":"payment_intent.payment_failed"}"#;
/// assert!(matches!(
///     verify_signature(tampered, &header, &[secret], now, DEFAULT_TOLERANCE),
///     Err(WebhookError::SignatureMismatch)
/// ));
/// ```
pub fn verify_signature(
    payload: &[u8],
    header: &str,
    secrets: &[WebhookSecret],
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<DateTime<Utc>, WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(WebhookError::MalformedSignature("an element is not key=value"))?;
        match key {
            "t" if timestamp.is_none() => {
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| WebhookError::MalformedSignature("t is not a number"))?,
                );
            }
            "t" => return Err(WebhookError::MalformedSignature("t is given twice")),
            // Malformed hex cannot match; other schemes (v0, the test scheme) are ignored.
            "v1" => signatures.extend(decode_hex(value)),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::MalformedSignature("no t"))?;
    if signatures.is_empty() {
        return Err(WebhookError::MalformedSignature("no v1 signature"));
    }
    let mut signed = Vec::with_capacity(payload.len() + 21);
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(payload);
    // Every pair is tried, so the time taken does not tell which secret or signature matched.
    let matched = secrets.iter().fold(false, |matched, secret| {
        signatures.iter().fold(matched, |matched, signature| {
            hmac::verify(&secret.0, &signed, signature).is_ok() | matched
        })
    });
    if !matched {
        return Err(WebhookError::SignatureMismatch);
    }
    let signed_at =
        DateTime::<Utc>::from_timestamp(timestamp, 0).ok_or(WebhookError::MalformedSignature("t is out of range"))?;
    let skew = (now - signed_at).abs().to_std().unwrap_or(Duration::MAX);
    if skew > tolerance {
        return Err(WebhookError::OutsideTolerance {
            timestamp: signed_at,
            now,
            tolerance,
        });
    }
    Ok(signed_at)
}

/// Signs a payload as Stripe does (`t={now},v1={hex}`): for tests of webhook endpoints, and to
/// forward events between services.
///
/// # Example
/// ```
/// use chrono::{TimeZone, Utc};
///
/// let header = token_billing::gateway::stripe::sign(b"{}", "whsec_test", Utc.timestamp_opt(1_790_000_000, 0).unwrap());
/// assert!(header.starts_with("t=1790000000,v1="));
/// ```
pub fn sign(payload: &[u8], secret: &str, now: DateTime<Utc>) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{}.", now.timestamp()).into_bytes();
    signed.extend_from_slice(payload);
    let tag = hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={},v1={hex}", now.timestamp())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect()
}

/// A Stripe event, as far as the gateway reads it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StripeEvent {
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) object: Value,
}

pub(super) fn read_event(payload: &[u8]) -> Result<StripeEvent, WebhookError> {
    let event: Value = serde_json::from_slice(payload).map_err(|e| WebhookError::MalformedEvent(e.to_string()))?;
    let field = |key: &str| {
        event
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| WebhookError::MalformedEvent(format!("no {key}")))
    };
    let id = field("id")?;
    let kind = field("type")?;
    let object = event
        .get("data")
        .and_then(|d| d.get("object"))
        .filter(|o| o.is_object())
        .cloned()
        .ok_or_else(|| WebhookError::MalformedEvent("no data.object".to_owned()))?;
    Ok(StripeEvent { id, kind, object })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(seconds, 0).single().expect("valid")
    }

    const PAYLOAD: &[u8] = br#"{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1"}}}"#;

    #[test]
    fn a_valid_signature_is_accepted() {
        let header = sign(PAYLOAD, "whsec_a", at(1_790_000_000));
        let secrets = [WebhookSecret::new("whsec_a")];
        assert_eq!(
            verify_signature(PAYLOAD, &header, &secrets, at(1_790_000_100), DEFAULT_TOLERANCE).expect("valid"),
            at(1_790_000_000)
        );
    }

    #[test]
    fn a_tampered_body_or_a_wrong_secret_is_refused() {
        let header = sign(PAYLOAD, "whsec_a", at(1_790_000_000));
        let mut tampered = PAYLOAD.to_vec();
        tampered[10] ^= 1;
        let right = [WebhookSecret::new("whsec_a")];
        let wrong = [WebhookSecret::new("whsec_b")];
        let now = at(1_790_000_000);
        assert!(matches!(
            verify_signature(&tampered, &header, &right, now, DEFAULT_TOLERANCE),
            Err(WebhookError::SignatureMismatch)
        ));
        assert!(matches!(
            verify_signature(PAYLOAD, &header, &wrong, now, DEFAULT_TOLERANCE),
            Err(WebhookError::SignatureMismatch)
        ));
        // The timestamp is signed too: changing it breaks the signature.
        let moved = header.replacen("t=1790000000", "t=1790000001", 1);
        assert!(matches!(
            verify_signature(PAYLOAD, &moved, &right, now, DEFAULT_TOLERANCE),
            Err(WebhookError::SignatureMismatch)
        ));
    }

    #[test]
    fn timestamps_beyond_the_tolerance_are_refused_both_ways() {
        let header = sign(PAYLOAD, "whsec_a", at(1_790_000_000));
        let secrets = [WebhookSecret::new("whsec_a")];
        for now in [at(1_790_000_301), at(1_789_999_699)] {
            assert!(matches!(
                verify_signature(PAYLOAD, &header, &secrets, now, DEFAULT_TOLERANCE),
                Err(WebhookError::OutsideTolerance { .. })
            ));
        }
        for now in [at(1_790_000_300), at(1_789_999_700)] {
            assert!(verify_signature(PAYLOAD, &header, &secrets, now, DEFAULT_TOLERANCE).is_ok());
        }
    }

    #[test]
    fn any_of_several_signatures_and_secrets_may_match() {
        // During a secret roll Stripe signs with the old and the new secret.
        let now = at(1_790_000_000);
        let old = sign(PAYLOAD, "whsec_old", now);
        let new = sign(PAYLOAD, "whsec_new", now);
        let both = format!("{old},v1={}", new.split("v1=").nth(1).expect("v1"));
        for secrets in [
            vec![WebhookSecret::new("whsec_old")],
            vec![WebhookSecret::new("whsec_new")],
            vec![WebhookSecret::new("whsec_other"), WebhookSecret::new("whsec_new")],
        ] {
            assert!(verify_signature(PAYLOAD, &both, &secrets, now, DEFAULT_TOLERANCE).is_ok());
        }
        assert!(matches!(
            verify_signature(
                PAYLOAD,
                &both,
                &[WebhookSecret::new("whsec_other")],
                now,
                DEFAULT_TOLERANCE
            ),
            Err(WebhookError::SignatureMismatch)
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let secrets = [WebhookSecret::new("whsec_a")];
        let now = at(1_790_000_000);
        for header in [
            "",
            "t=1790000000",
            "v1=00",
            "t=abc,v1=00",
            "t=1,t=2,v1=00",
            "garbage",
            "t=99999999999999999999,v1=00",
        ] {
            assert!(
                matches!(
                    verify_signature(PAYLOAD, header, &secrets, now, DEFAULT_TOLERANCE),
                    Err(WebhookError::MalformedSignature(_))
                ),
                "{header:?}"
            );
        }
        // A v1 that is not hex is no signature at all.
        assert!(matches!(
            verify_signature(PAYLOAD, "t=1790000000,v1=zz", &secrets, now, DEFAULT_TOLERANCE),
            Err(WebhookError::MalformedSignature(_))
        ));
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            format!("{:?}", WebhookSecret::new("whsec_abcdef")),
            "WebhookSecret(whsec_…)"
        );
        assert_eq!(prefix_of("sk_test_51Habc"), "sk_test_");
        assert_eq!(prefix_of("nounderscore"), "");
        assert_eq!(prefix_of("whsec_test_abc"), "whsec_test_");
        assert_eq!(prefix_of("whsec_abc_def"), "whsec_");
        assert_eq!(prefix_of("rk_live_xyz"), "rk_live_");
    }

    #[test]
    fn events_need_an_id_a_type_and_an_object() {
        let event = read_event(PAYLOAD).expect("an event");
        assert_eq!(
            (event.id.as_str(), event.kind.as_str()),
            ("evt_1", "payment_intent.succeeded")
        );
        for bad in [
            &b"not json"[..],
            br#"{"type":"x","data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"x"}"#,
        ] {
            assert!(matches!(read_event(bad), Err(WebhookError::MalformedEvent(_))));
        }
    }
}
