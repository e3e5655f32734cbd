//! Threshold alerts delivered as signed webhooks: the library's outbox (`pending_alerts`) is
//! read every second, each alert POSTed to `TOKEN_BILLING_ALERT_WEBHOOK_URL` and acknowledged
//! once the receiver answers 2xx. Delivery is at least once: an alert keeps its id
//! (`TokenBilling-Event-Id`), so a receiver drops what it has seen. A failed delivery is retried
//! with exponential backoff (1 s, doubling, at most 5 minutes) and jitter.
//!
//! The signature, `TokenBilling-Signature: t=<unix seconds>,v1=<hex>`, is HMAC-SHA256 under
//! `TOKEN_BILLING_ALERT_WEBHOOK_SECRET` of `<t>.<body>`, as Stripe signs its webhooks: a
//! receiver recomputes it, compares in constant time, and refuses a `t` older than it tolerates.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::json;
use token_billing::{Alert, BillingService};
use tracing::{debug, info, warn};

/// The longest wait between two attempts to deliver one alert.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long one delivery may take, connection included.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where alerts go and the key that signs them.
#[derive(Clone)]
pub(crate) struct AlertWebhook {
    host: String,
    port: u16,
    path: String,
    key: hmac::Key,
}

impl std::fmt::Debug for AlertWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        write!(f, "AlertWebhook(http://{}:{}{})", self.host, self.port, self.path)
    }
}

impl AlertWebhook {
    /// A webhook to `url` (`http://host[:port]/path`), signed with `secret`. The service speaks
    /// plain HTTP to it: put a receiver outside the host behind a TLS-terminating proxy.
    pub(crate) fn new(url: &str, secret: &str) -> Result<AlertWebhook, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("TOKEN_BILLING_ALERT_WEBHOOK_URL must start with http://, not {url}"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| format!("TOKEN_BILLING_ALERT_WEBHOOK_URL has a bad port: {url}"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("TOKEN_BILLING_ALERT_WEBHOOK_URL names no host: {url}"));
        }
        if secret.len() < 16 {
            return Err("TOKEN_BILLING_ALERT_WEBHOOK_SECRET must be at least 16 characters".to_owned());
        }
        Ok(AlertWebhook {
            host: host.to_owned(),
            port,
            path: if path.is_empty() {
                "/".to_owned()
            } else {
                path.to_owned()
            },
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        })
    }

    /// The signature header's value for `body` sent at `at`.
    pub(crate) fn signature(&self, at: DateTime<Utc>, body: &[u8]) -> String {
        let timestamp = at.timestamp();
        let mut signed = format!("{timestamp}.").into_bytes();
        signed.extend_from_slice(body);
        let tag = hmac::sign(&self.key, &signed);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={timestamp},v1={hex}")
    }

    /// POSTs one alert; answers whether the receiver took it (2xx).
    async fn post(&self, alert: &Alert) -> Result<bool, String> {
        let body = json!({
            "id": alert.id,
            "type": "token_billing.alert",
            "createdAt": alert.created_at,
            "data": alert,
        })
        .to_string();
        let signature = self.signature(Utc::now(), body.as_bytes());
        let send = async {
            let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            let request = Request::post(self.path.as_str())
                .header("host", format!("{}:{}", self.host, self.port))
                .header("content-type", "application/json")
                .header("tokenbilling-event-id", alert.id.to_string())
                .header("tokenbilling-signature", signature)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| format!("request: {e}"))?;
            let response = sender.send_request(request).await.map_err(|e| format!("send: {e}"))?;
            let status = response.status();
            // The answer's body is read and dropped, so the connection closes cleanly.
            let _ = response.into_body().collect().await;
            Ok(status.is_success())
        };
        tokio::time::timeout(DELIVERY_TIMEOUT, send)
            .await
            .map_err(|_| "timed out".to_owned())?
    }
}

/// When each alert that failed may be tried again, and how many times it failed.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    retries: HashMap<uuid::Uuid, (u32, tokio::time::Instant)>,
}

impl Backoff {
    fn due(&self, alert: &Alert, now: tokio::time::Instant) -> bool {
        self.retries.get(&alert.id).is_none_or(|(_, at)| *at <= now)
    }

    fn failed(&mut self, alert: &Alert, now: tokio::time::Instant) {
        let failures = self.retries.get(&alert.id).map_or(0, |(n, _)| *n) + 1;
        let base = Duration::from_secs(1u64 << failures.min(9)).min(MAX_BACKOFF);
        // Up to a quarter more, so that receivers coming back are not hit all at once.
        let share = u32::try_from(alert.id.as_u128() % 100).unwrap_or(0);
        let jitter = base / 4 * share / 100;
        self.retries.insert(alert.id, (failures, now + base + jitter));
    }
}

/// Delivers the alerts pending now whose backoff has passed; answers how many were delivered.
pub(crate) async fn deliver_pending(billing: &BillingService, webhook: &AlertWebhook, backoff: &mut Backoff) -> usize {
    let pending = match billing.pending_alerts(None, 100).await {
        Ok(pending) => pending,
        Err(error) => {
            warn!(error = %error, "cannot read pending alerts");
            return 0;
        }
    };
    let now = tokio::time::Instant::now();
    let mut delivered = 0;
    for alert in &pending {
        if !backoff.due(alert, now) {
            continue;
        }
        match webhook.post(alert).await {
            Ok(true) => {
                backoff.retries.remove(&alert.id);
                match billing.ack_alert(&alert.user_id, alert.id).await {
                    Ok(_) => delivered += 1,
                    // Delivered again later: the receiver drops it by its id.
                    Err(error) => warn!(error = %error, alert = %alert.id, "alert delivered but not acknowledged"),
                }
                debug!(alert = %alert.id, kind = %alert.kind, "alert delivered");
            }
            Ok(false) | Err(_) => {
                warn!(alert = %alert.id, "alert not delivered: retrying with backoff");
                backoff.failed(alert, now);
            }
        }
    }
    delivered
}

/// Delivers alerts every second, for as long as the service runs.
pub(crate) fn spawn_delivery(billing: BillingService, webhook: AlertWebhook) {
    info!(webhook = ?webhook, "delivering alerts");
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            deliver_pending(&billing, &webhook, &mut backoff).await;
        }
    });
}
