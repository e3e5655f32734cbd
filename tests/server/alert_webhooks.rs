//! Threshold alerts delivered by the reference service as signed webhooks, to a real HTTP
//! receiver that checks each signature: every alert arrives with its stable id, is acknowledged
//! once taken, and is delivered again after a receiver's failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ring::hmac;
use token_billing::{AlertKind, AlertPolicy, BillingService, InMemoryUsageStore, SandboxGateway, UsageReport};

use super::alerts::{AlertWebhook, Backoff, deliver_pending};
use super::support::{Answer, Received, serve};

const SECRET: &str = "alert-webhook-secret-0123";

/// Checks a delivery's signature as a receiver does: HMAC-SHA256 of `t.body` under the secret,
/// compared in constant time, within five minutes. Answers the alert's id from the body.
fn verified(received: &Received) -> String {
    let header = received.header("tokenbilling-signature").expect("a signature");
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v.to_owned()),
            _ => {}
        }
    }
    let timestamp = timestamp.expect("a timestamp");
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 300, "fresh");
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&received.body);
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let valid = signatures.iter().any(|hex| {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect();
        hmac::verify(&key, &signed, &bytes).is_ok()
    });
    assert!(valid, "the signature verifies");
    let body: serde_json::Value = serde_json::from_slice(&received.body).expect("JSON");
    let id = body["id"].as_str().expect("an id").to_owned();
    assert_eq!(received.header("tokenbilling-event-id"), Some(id.as_str()));
    assert_eq!(body["data"]["id"].as_str(), Some(id.as_str()));
    id
}

fn billing() -> BillingService {
    BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
        .alerts(AlertPolicy::standard())
        .build()
}

#[tokio::test]
async fn alerts_are_delivered_signed_once_taken_and_again_after_a_failure() {
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (sink, count) = (received.clone(), calls.clone());
    // The receiver fails its first request, then takes every one.
    let addr = serve(move |request| {
        sink.lock().expect("lock").push(request);
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            Answer::raw(500, "down")
        } else {
            Answer::raw(204, "")
        }
    })
    .await;
    let webhook = AlertWebhook::new(&format!("http://{addr}/hooks/billing"), SECRET).expect("a webhook");
    let billing = billing();
    // 9M tokens: 80% and 100% of the allowance, and the first block.
    billing
        .process_token_usage(UsageReport::new("ana", 9_000_000, "chat"))
        .await
        .expect("recorded");
    let pending = billing.pending_alerts(None, 10).await.expect("pending");
    assert_eq!(
        pending.iter().map(|a| a.kind).collect::<Vec<_>>(),
        [
            AlertKind::Allowance { percent: 80 },
            AlertKind::Allowance { percent: 100 },
            AlertKind::Block { block: 1 }
        ]
    );

    let mut backoff = Backoff::default();
    let delivered = deliver_pending(&billing, &webhook, &mut backoff).await;
    assert_eq!(delivered, 2, "the first failed and stays pending");
    assert_eq!(billing.pending_alerts(None, 10).await.expect("pending").len(), 1);
    // Not tried again before its backoff.
    assert_eq!(deliver_pending(&billing, &webhook, &mut backoff).await, 0);
    tokio::time::sleep(std::time::Duration::from_millis(2_600)).await;
    assert_eq!(deliver_pending(&billing, &webhook, &mut backoff).await, 1);
    assert!(billing.pending_alerts(None, 10).await.expect("pending").is_empty());

    let received = received.lock().expect("lock").clone();
    assert_eq!(received.len(), 4, "three alerts, one of them twice");
    let ids: Vec<String> = received.iter().map(verified).collect();
    assert_eq!(ids[0], ids[3], "the failed one again, with the same id");
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
    for request in &received {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/hooks/billing")
        );
    }
}

#[tokio::test]
async fn a_tampered_body_does_not_verify() {
    let webhook = AlertWebhook::new("http://127.0.0.1:9/alerts", SECRET).expect("a webhook");
    let at = chrono::Utc::now();
    let header = webhook.signature(at, br#"{"id":"a"}"#);
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let hex = header.split("v1=").nth(1).expect("v1");
    let tag: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let signed = |body: &str| format!("{}.{body}", at.timestamp()).into_bytes();
    assert!(hmac::verify(&key, &signed(r#"{"id":"a"}"#), &tag).is_ok());
    assert!(hmac::verify(&key, &signed(r#"{"id":"b"}"#), &tag).is_err());
    for bad in ["https://example.com/x", "http://:80/x", "http://host:port/x"] {
        assert!(AlertWebhook::new(bad, SECRET).is_err(), "{bad}");
    }
    assert!(AlertWebhook::new("http://127.0.0.1/x", "short").is_err());
}

#[tokio::test]
async fn the_service_delivers_alerts_only_with_both_the_url_and_the_secret() {
    let variables = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    };
    let key = ("TOKEN_BILLING_API_KEY", super::API_KEY);
    let none = super::config::configure(variables(&[key])).await.expect("configured");
    assert!(none.alert_webhook.is_none());
    assert!(
        none.description.contains("alerts: kept for the dashboard"),
        "{}",
        none.description
    );
    let both = super::config::configure(variables(&[
        key,
        ("TOKEN_BILLING_ALERT_WEBHOOK_URL", "http://127.0.0.1:9000/alerts"),
        ("TOKEN_BILLING_ALERT_WEBHOOK_SECRET", SECRET),
    ]))
    .await
    .expect("configured");
    assert!(both.alert_webhook.is_some());
    assert!(!both.description.contains(SECRET), "no secret in the log");
    let url_only = super::config::configure(variables(&[
        key,
        ("TOKEN_BILLING_ALERT_WEBHOOK_URL", "http://127.0.0.1:9000/alerts"),
    ]))
    .await;
    assert!(url_only.is_err());
}
