//! The HTTP side of the Stripe gateway: one request, its retries, and what came back.
//!
//! Retries follow Stripe's official clients, with the same idempotency key: an answer carrying
//! `Stripe-Should-Retry` is retried exactly when it says `true`, whatever its status; without
//! it, connection errors, timeouts, 409 and 5xx are retried, a 429 only for a lock timeout, and
//! other 4xx never. The delay doubles from `initial_delay` up to `max_delay`, and each delay is
//! jittered down to between half and all of it, so that many clients failing together do not
//! retry together.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tracing::{debug, warn};

use crate::gateway::BoxError;

/// The largest response body read; Stripe's objects are a few kilobytes.
const MAX_BODY: usize = 4 << 20;

/// How requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RetryPolicy {
    /// Retries after the first attempt.
    pub(super) max_retries: u32,
    /// The delay before the first retry, before jitter.
    pub(super) initial_delay: Duration,
    /// The longest delay, before jitter.
    pub(super) max_delay: Duration,
}

impl RetryPolicy {
    /// The delay before retry `retry` (1 for the first), jittered by `random` (any value; its
    /// remainder picks a point between half and all of the delay).
    pub(super) fn delay(&self, retry: u32, random: u64) -> Duration {
        let doubled = self
            .initial_delay
            .saturating_mul(1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX));
        let full = doubled.min(self.max_delay);
        let full_ns = u64::try_from(full.as_nanos()).unwrap_or(u64::MAX);
        let half = full_ns / 2;
        Duration::from_nanos(half + random % (full_ns - half + 1))
    }
}

/// A form parameter list, in the order Stripe's bracket notation needs no more than.
pub(super) type Form = Vec<(String, String)>;

/// One API call.
#[derive(Debug)]
pub(super) struct Call<'a> {
    pub(super) method: Method,
    /// Path and query, from `/v1/...`.
    pub(super) path: String,
    /// The form body of a `POST`.
    pub(super) form: Form,
    /// The `Idempotency-Key` of a `POST`: every retry of the call sends the same one.
    pub(super) idempotency_key: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub(super) fn get(path: String) -> Call<'a> {
        Call {
            method: Method::GET,
            path,
            form: Form::new(),
            idempotency_key: None,
        }
    }

    pub(super) fn post(path: String, form: Form, idempotency_key: &'a str) -> Call<'a> {
        Call {
            method: Method::POST,
            path,
            form,
            idempotency_key: Some(idempotency_key),
        }
    }
}

/// Stripe's error object (`{"error": {...}}`), as far as the gateway reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct ApiError {
    /// `card_error`, `invalid_request_error`, `idempotency_error`, `api_error`...
    pub(super) kind: String,
    /// `card_declined`, `authentication_required`, `resource_missing`...
    pub(super) code: Option<String>,
    /// The issuer's reason, for card declines (`insufficient_funds`).
    pub(super) decline_code: Option<String>,
    pub(super) message: String,
    /// The PaymentIntent the error is about, when Stripe includes it (card errors do).
    pub(super) payment_intent: Option<Value>,
}

impl ApiError {
    fn read(status: StatusCode, body: &[u8]) -> ApiError {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let Some(error) = parsed.as_ref().and_then(|v| v.get("error")).filter(|e| e.is_object()) else {
            return ApiError {
                kind: "invalid_response".to_owned(),
                code: None,
                decline_code: None,
                message: format!("HTTP {status} with an unreadable body"),
                payment_intent: None,
            };
        };
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
        ApiError {
            kind: text("type").unwrap_or_default(),
            code: text("code"),
            decline_code: text("decline_code"),
            message: text("message").unwrap_or_else(|| format!("HTTP {status}")),
            payment_intent: error.get("payment_intent").filter(|p| p.is_object()).cloned(),
        }
    }

    /// The most specific code: the decline code, else the error code, else its type.
    pub(super) fn best_code(&self) -> String {
        self.decline_code
            .clone()
            .or_else(|| self.code.clone())
            .unwrap_or_else(|| self.kind.clone())
    }
}

/// What a call came back with, once retries are over.
#[derive(Debug)]
pub(super) enum Reply {
    /// A 2xx with a JSON object.
    Object(Value),
    /// A 4xx other than 409 and 429, as the last answer: the request was refused, nothing was
    /// done (402: declined).
    Refused { status: StatusCode, error: ApiError },
}

/// Why a call has no answer: the outcome of a `POST` is unknown, except for `Unsendable`.
#[derive(Debug, thiserror::Error)]
pub(super) enum NoAnswer {
    #[error("no answer from Stripe after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: Attempt },
    #[error("Stripe answered HTTP {status}, not to be retried: {message}")]
    DoNotRetry { status: StatusCode, message: String },
    #[error("Stripe answered HTTP {status} with a body that is not a JSON object")]
    Malformed { status: StatusCode },
    #[error("no answer from Stripe within the operation's deadline")]
    Deadline,
    /// The request could not be made at all: nothing was sent.
    #[error("the request could not be built: {0}")]
    Unsendable(#[source] BoxError),
}

/// How one attempt failed in a way worth retrying.
#[derive(Debug)]
pub(super) enum Attempt {
    TimedOut(Duration),
    Transport(BoxError),
    Status { status: StatusCode, message: String },
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempt::TimedOut(after) => write!(f, "timed out after {after:?}"),
            Attempt::Transport(error) => write!(f, "connection error: {error}"),
            Attempt::Status { status, message } => write!(f, "HTTP {status}: {message}"),
        }
    }
}

/// The answer of one attempt.
struct Answer {
    status: StatusCode,
    should_retry: Option<bool>,
    request_id: Option<String>,
    body: Bytes,
}

/// The HTTP client: a pooled hyper client over rustls, the API base, the credentials and the
/// policy.
pub(super) struct StripeClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://authority[/prefix]`, without a trailing slash.
    base: String,
    /// The `Authorization` header, made once when the gateway is built and marked sensitive.
    authorization: HeaderValue,
    /// What `Debug` shows of the key: its kind (`sk_live_`), nothing of the secret.
    key_kind: String,
    api_version: Option<String>,
    timeout: Duration,
    retry: RetryPolicy,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.base)
            .field("secret_key", &format_args!("{}…", self.key_kind))
            .field("api_version", &self.api_version)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl StripeClient {
    /// A client for `base` (`scheme://authority[/prefix]`, without a trailing slash) that sends
    /// `authorization` (the secret key's header, already checked) with every request; `key_kind`
    /// is all `Debug` shows of the key.
    pub(super) fn new(
        base: String,
        authorization: HeaderValue,
        key_kind: String,
        api_version: Option<String>,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> StripeClient {
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(rustls_ring_provider()))
            .unwrap_or_else(|_| unreachable!("the ring provider supports the default protocol versions"))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        StripeClient {
            http,
            base,
            authorization,
            key_kind,
            api_version,
            timeout,
            retry,
        }
    }

    /// The API base requests go to: `scheme://authority[/prefix]`, without a trailing slash.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// Sends a call, retrying what may be retried, until `deadline` at the latest.
    pub(super) async fn send(&self, call: &Call<'_>, deadline: Instant) -> Result<Reply, NoAnswer> {
        let attempts = self.retry.max_retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NoAnswer::Deadline);
            }
            let request = self.request(call).map_err(NoAnswer::Unsendable)?;
            let (failure, refused) = match self.attempt(call, request, self.timeout.min(left)).await {
                Ok(answer) => match Self::judge(answer) {
                    Judged::Final(result) => return result,
                    Judged::Retry { failure, refused } => (failure, refused),
                },
                Err(failure) => (failure, None),
            };
            let delay = self.retry.delay(attempt, random_u64());
            if attempt >= attempts || Instant::now() + delay >= deadline {
                return match refused {
                    // Stripe's last word was a refusal it asked to retry: the request was still
                    // refused, and nothing was done, as Stripe's clients report it.
                    Some(reply) => Ok(reply),
                    None => Err(NoAnswer::Exhausted {
                        attempts: attempt,
                        last: failure,
                    }),
                };
            }
            warn!(method = %call.method, path = %path_only(&call.path), attempt, error = %failure, ?delay, "Stripe request failed: retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Decides what an answer means: final, or worth another attempt. `Stripe-Should-Retry`
    /// decides when present, for any status, as in Stripe's official clients; without it a 409
    /// or 5xx is retried, a 429 only for a lock timeout, and any other 4xx is final.
    ///
    /// A 4xx other than 409 and 429 is a refusal: nothing was done. A 409 (the key's first
    /// request still running), a 429 or a 5xx that is not retried leaves the outcome unknown.
    fn judge(answer: Answer) -> Judged {
        let status = answer.status;
        if status.is_success() {
            return Judged::Final(match serde_json::from_slice::<Value>(&answer.body) {
                Ok(value) if value.is_object() => Ok(Reply::Object(value)),
                _ => Err(NoAnswer::Malformed { status }),
            });
        }
        let error = ApiError::read(status, &answer.body);
        let refusal =
            status.is_client_error() && status != StatusCode::CONFLICT && status != StatusCode::TOO_MANY_REQUESTS;
        let retry = match answer.should_retry {
            Some(told) => told,
            None if status == StatusCode::TOO_MANY_REQUESTS => error.code.as_deref() == Some("lock_timeout"),
            None => !refusal,
        };
        if !retry && refusal {
            return Judged::Final(Ok(Reply::Refused { status, error }));
        }
        let message = match &answer.request_id {
            Some(id) => format!("{} (request {id})", error.message),
            None => error.message.clone(),
        };
        if !retry {
            return Judged::Final(Err(NoAnswer::DoNotRetry { status, message }));
        }
        Judged::Retry {
            failure: Attempt::Status { status, message },
            refused: refusal.then_some(Reply::Refused { status, error }),
        }
    }

    async fn attempt(
        &self,
        call: &Call<'_>,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Answer, Attempt> {
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| Attempt::Transport(Box::new(e)))?;
            let status = response.status();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let should_retry = header("stripe-should-retry").map(|v| v.eq_ignore_ascii_case("true"));
            let request_id = header("request-id");
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(Attempt::Transport)?
                .to_bytes();
            debug!(method = %call.method, path = %path_only(&call.path), %status, request = ?request_id, "Stripe answered");
            Ok(Answer {
                status,
                should_retry,
                request_id,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Attempt::TimedOut(timeout)))
    }

    fn request(&self, call: &Call<'_>) -> Result<Request<Full<Bytes>>, BoxError> {
        let uri: Uri = format!("{}{}", self.base, call.path).parse()?;
        let mut builder = Request::builder()
            .method(call.method.clone())
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, concat!("token-billing/", env!("CARGO_PKG_VERSION")));
        if let Some(version) = &self.api_version {
            builder = builder.header("stripe-version", HeaderValue::from_str(version)?);
        }
        if let Some(key) = call.idempotency_key {
            builder = builder.header("idempotency-key", HeaderValue::from_str(key)?);
        }
        let body = if call.method == Method::POST {
            builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(call.form.iter());
            Bytes::from(form.finish())
        } else {
            Bytes::new()
        };
        Ok(builder.body(Full::new(body))?)
    }
}

/// What one answer means.
enum Judged {
    /// The call's result: no other attempt is made.
    Final(Result<Reply, NoAnswer>),
    /// Worth another attempt. `refused` is the refusal the answer stands for when no attempt is
    /// left (a 4xx Stripe asked to retry); without one, running out leaves the outcome unknown.
    Retry { failure: Attempt, refused: Option<Reply> },
}

/// The path without its query, for logs (search queries carry charge keys).
fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// A random number for jitter, from the operating system (as UUIDs are drawn).
fn random_u64() -> u64 {
    let bits = uuid::Uuid::new_v4().as_u128();
    // The low 64 bits of a v4 UUID are random but for two variant bits; enough for jitter.
    u64::try_from(bits & u128::from(u64::MAX)).unwrap_or(0)
}

fn rustls_ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Percent-encodes one path segment (an object id).
pub(super) fn segment(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

/// Encodes query parameters.
pub(super) fn query(pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(pairs.iter());
    query.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_and_jitter_down_to_half() {
        let policy = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
        };
        for random in [0, 1, 7, u64::MAX / 3, u64::MAX] {
            for (retry, full) in [(1, 500), (2, 1000), (3, 2000), (4, 2000), (40, 2000)] {
                let delay = policy.delay(retry, random);
                let full = Duration::from_millis(full);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "retry {retry}: {delay:?} of {full:?}"
                );
            }
        }
        assert_eq!(policy.delay(1, 0), Duration::from_millis(250));
    }

    #[test]
    fn errors_are_read_from_stripe_bodies_or_described() {
        let body = br#"{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds","message":"Your card has insufficient funds."}}"#;
        let error = ApiError::read(StatusCode::PAYMENT_REQUIRED, body);
        assert_eq!(error.kind, "card_error");
        assert_eq!(error.best_code(), "insufficient_funds");
        let unreadable = ApiError::read(StatusCode::BAD_REQUEST, b"<html>oops</html>");
        assert_eq!(unreadable.kind, "invalid_response");
        assert!(unreadable.message.contains("400"));
    }

    #[test]
    fn ids_are_encoded_as_path_segments() {
        assert_eq!(segment("cus_123"), "cus_123");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
