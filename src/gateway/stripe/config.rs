//! Configuring the Stripe gateway: the secret key, the builder and what it checks.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use hyper::header::HeaderValue;

use super::client::{RetryPolicy, StripeClient};
use super::webhook::{DEFAULT_TOLERANCE, WebhookSecret};
use super::{API_VERSION, DEFAULT_API_BASE, Inner, StripeGateway};
use crate::clock::{Clock, SystemClock};

/// A Stripe secret (or restricted) API key. `Debug` shows its kind only (`sk_test_…`).
///
/// # Example
/// ```
/// use token_billing::gateway::stripe::SecretKey;
///
/// let key = SecretKey::new("sk_test_51Habcdef");
/// assert_eq!(format!("{key:?}"), "SecretKey(sk_test_…)");
/// ```
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> SecretKey {
        SecretKey(key.into())
    }

    /// The `Authorization` header carrying the key, marked sensitive so that hyper never shows
    /// it; `None` for an empty key or one with characters other than printable ASCII. Made once,
    /// when the gateway is built, rather than formatted again for every request.
    fn authorization(&self) -> Option<HeaderValue> {
        let key = &self.0;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// What may be shown of the key: its kind (`sk_test_`), nothing of the secret.
    fn kind(&self) -> String {
        super::webhook::prefix_of(&self.0)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}…)", self.kind())
    }
}

/// Why a [`StripeGateway`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripeConfigError {
    /// An environment variable the configuration needs is not set.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// The secret key is empty or has characters an HTTP header cannot carry.
    #[error("the secret key is empty or not printable ASCII")]
    InvalidSecretKey,
    /// The API base is not an `http(s)://host[:port][/path]` URL.
    #[error("invalid API base {base:?}: {reason}")]
    InvalidApiBase {
        /// The base given.
        base: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The API base is plain `http://` on a host other than this machine: the secret key would
    /// cross the network unencrypted. Allow it with
    /// [`allow_insecure_http`](StripeGatewayBuilder::allow_insecure_http) for a test server on
    /// a private network.
    #[error("refusing to send the secret key over plain HTTP to {base}")]
    InsecureApiBase {
        /// The base given.
        base: String,
    },
}

/// Builds a [`StripeGateway`].
///
/// # Example
/// ```
/// use std::time::Duration;
/// use token_billing::gateway::stripe::StripeGateway;
///
/// let stripe = StripeGateway::builder("sk_test_123")
///     .api_base("http://127.0.0.1:8420") // a local Stripe-compatible server
///     .webhook_secret("whsec_old")
///     .webhook_secret("whsec_new") // both accepted while the secret is being rolled
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// assert_eq!(stripe.api_base(), "http://127.0.0.1:8420");
/// # Ok::<(), token_billing::gateway::stripe::StripeConfigError>(())
/// ```
#[derive(Debug)]
pub struct StripeGatewayBuilder {
    secret_key: SecretKey,
    api_base: String,
    api_version: Option<String>,
    webhook_secrets: Vec<WebhookSecret>,
    webhook_tolerance: Duration,
    timeout: Duration,
    deadline: Duration,
    retry: RetryPolicy,
    payment_method_types: Vec<String>,
    allow_insecure_http: bool,
    clock: Arc<dyn Clock>,
}

impl StripeGatewayBuilder {
    /// The API base (`https://api.stripe.com` by default).
    pub fn api_base(mut self, base: impl Into<String>) -> Self {
        self.api_base = base.into();
        self
    }

    /// The `Stripe-Version` sent ([`API_VERSION`] by default); `None` uses the account's.
    pub fn api_version(mut self, version: Option<String>) -> Self {
        self.api_version = version;
        self
    }

    /// Adds a webhook signing secret; give the old and the new one while rolling it.
    pub fn webhook_secret(mut self, secret: impl Into<String>) -> Self {
        self.webhook_secrets.push(WebhookSecret::new(secret));
        self
    }

    /// How far a webhook's signed timestamp may be from now ([`DEFAULT_TOLERANCE`], 5 minutes).
    pub fn webhook_tolerance(mut self, tolerance: Duration) -> Self {
        self.webhook_tolerance = tolerance;
        self
    }

    /// How long one attempt of one request may take, connection included (20 seconds by
    /// default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one gateway operation may take, with all its requests and retries (50 seconds
    /// by default); past it, the outcome is unknown and the charge stays pending. Keep it below
    /// half the service's lease ([`BillingServiceBuilder::lease`](crate::BillingServiceBuilder::lease),
    /// 2 minutes by default): a collector is sure to hold a charge that long when it calls the
    /// gateway, and no other collector may take it meanwhile.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Retries after the first attempt (2 by default, as Stripe's clients).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.retry.max_retries = retries;
        self
    }

    /// The backoff: the first delay and the longest (0.5 and 5 seconds by default), each
    /// jittered down to between half and all of it.
    pub fn retry_delays(mut self, initial: Duration, max: Duration) -> Self {
        self.retry.initial_delay = initial;
        self.retry.max_delay = max.max(initial);
        self
    }

    /// The payment method types a charge may use (`["card"]` by default). Asynchronous ones
    /// (`sepa_debit`) answer `processing`, and are settled by webhook.
    pub fn payment_method_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.payment_method_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Allows a plain `http://` API base on another host than this machine (a test server on a
    /// private network). Never for Stripe itself.
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }

    /// The clock webhook timestamps are checked against (the system clock by default).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The gateway. No request is made until it is used, from within a Tokio runtime.
    ///
    /// # Errors
    /// [`StripeConfigError`] for a bad key or API base.
    pub fn build(self) -> Result<StripeGateway, StripeConfigError> {
        let authorization = self
            .secret_key
            .authorization()
            .ok_or(StripeConfigError::InvalidSecretKey)?;
        let api_base = self.checked_base()?.to_string().trim_end_matches('/').to_owned();
        let client = StripeClient::new(
            api_base,
            authorization,
            self.secret_key.kind(),
            self.api_version,
            self.timeout,
            self.retry,
        );
        Ok(StripeGateway {
            inner: Arc::new(Inner {
                client,
                deadline: self.deadline,
                webhook_secrets: self.webhook_secrets,
                webhook_tolerance: self.webhook_tolerance,
                payment_method_types: self.payment_method_types,
                clock: self.clock,
            }),
        })
    }

    fn checked_base(&self) -> Result<Uri, StripeConfigError> {
        let invalid = |reason| StripeConfigError::InvalidApiBase {
            base: self.api_base.clone(),
            reason,
        };
        let uri: Uri = self.api_base.parse().map_err(|_| invalid("not a URL"))?;
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        if uri.query().is_some() {
            return Err(invalid("it has a query"));
        }
        match uri.scheme_str() {
            Some("https") => Ok(uri),
            Some("http") => {
                let loopback = host == "localhost"
                    || host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if loopback || self.allow_insecure_http {
                    Ok(uri)
                } else {
                    Err(StripeConfigError::InsecureApiBase {
                        base: self.api_base.clone(),
                    })
                }
            }
            _ => Err(invalid("the scheme is not http or https")),
        }
    }
}

impl StripeGateway {
    /// A builder for a gateway with this secret key.
    pub fn builder(secret_key: impl Into<String>) -> StripeGatewayBuilder {
        StripeGatewayBuilder {
            secret_key: SecretKey::new(secret_key),
            api_base: DEFAULT_API_BASE.to_owned(),
            api_version: Some(API_VERSION.to_owned()),
            webhook_secrets: Vec::new(),
            webhook_tolerance: DEFAULT_TOLERANCE,
            timeout: Duration::from_secs(20),
            deadline: Duration::from_secs(50),
            retry: RetryPolicy {
                max_retries: 2,
                initial_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(5),
            },
            payment_method_types: vec!["card".to_owned()],
            allow_insecure_http: false,
            clock: Arc::new(SystemClock),
        }
    }

    /// A gateway configured from the environment: `STRIPE_SECRET_KEY` (required),
    /// `STRIPE_API_BASE` (optional) and `STRIPE_WEBHOOK_SECRET` (optional; several separated by
    /// commas while rolling it).
    ///
    /// # Errors
    /// [`StripeConfigError::Missing`] without a key; what [`StripeGatewayBuilder::build`] refuses.
    pub fn from_env() -> Result<StripeGateway, StripeConfigError> {
        StripeGateway::from_lookup(|name| std::env::var(name).ok())
    }

    /// A gateway configured from the same variables as [`from_env`](Self::from_env), read
    /// through `lookup` (a configuration file, a secret store).
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    ///
    /// # Example
    /// ```
    /// use token_billing::gateway::stripe::StripeGateway;
    ///
    /// let stripe = StripeGateway::from_lookup(|name| match name {
    ///     "STRIPE_SECRET_KEY" => Some("sk_test_123".to_owned()),
    ///     "STRIPE_API_BASE" => Some("http://127.0.0.1:8420".to_owned()),
    ///     _ => None,
    /// })?;
    /// assert_eq!(stripe.api_base(), "http://127.0.0.1:8420");
    /// # Ok::<(), token_billing::gateway::stripe::StripeConfigError>(())
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<StripeGateway, StripeConfigError> {
        let present = |name| lookup(name).filter(|v: &String| !v.trim().is_empty());
        let key = present("STRIPE_SECRET_KEY").ok_or(StripeConfigError::Missing("STRIPE_SECRET_KEY"))?;
        let mut builder = StripeGateway::builder(key);
        if let Some(base) = present("STRIPE_API_BASE") {
            builder = builder.api_base(base);
        }
        if let Some(secrets) = present("STRIPE_WEBHOOK_SECRET") {
            for secret in secrets.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                builder = builder.webhook_secret(secret);
            }
        }
        builder.build()
    }
}
