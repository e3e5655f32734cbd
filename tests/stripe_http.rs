//! The Stripe gateway against a local fake Stripe, for what a stateful test server does not
//! simulate: conflicts, rate limits, server errors with and without `Stripe-Should-Retry`,
//! timeouts, dropped connections, idempotency errors, malformed bodies; and webhooks read
//! through the gateway.
#![cfg(feature = "stripe")]

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde_json::json;
use support::{Answer, Received, SECRET_KEY, serve};
use token_billing::gateway::stripe::{StripeConfigError, StripeGateway, WebhookError, sign};
use token_billing::{
    Charge, ChargeKey, ChargeKind, ChargeStatus, Currency, CustomerId, GatewayChange, GatewayError, GatewayEvent,
    ManualClock, Metadata, Money, NewCharge, PaymentGateway, PaymentRequest, PaymentStatus, PeriodKey, Plan, UserId,
};

/// A fake Stripe: a customer `cus_1` with the default payment method `pm_1`, and scripted
/// answers for everything else, in order; every request is kept.
#[derive(Clone, Default)]
struct FakeStripe {
    script: Arc<Mutex<VecDeque<Answer>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeStripe {
    fn new(answers: impl IntoIterator<Item = Answer>) -> FakeStripe {
        FakeStripe {
            script: Arc::new(Mutex::new(answers.into_iter().collect())),
            received: Arc::default(),
        }
    }

    async fn start(&self, timeout: Duration) -> StripeGateway {
        let fake = self.clone();
        let addr = serve(move |request| fake.answer(request)).await;
        StripeGateway::builder(SECRET_KEY)
            .api_base(format!("http://{addr}"))
            .webhook_secret("whsec_test")
            .timeout(timeout)
            .retry_delays(Duration::from_millis(5), Duration::from_millis(20))
            .clock(Arc::new(ManualClock::new(signed_at())))
            .build()
            .expect("a gateway")
    }

    fn answer(&self, request: Received) -> Answer {
        let customer = request.method == "GET" && request.path.starts_with("/v1/customers/");
        self.received.lock().expect("lock").push(request);
        if customer {
            return Answer::json(
                200,
                json!({"id": "cus_1", "object": "customer", "invoice_settings": {"default_payment_method": "pm_1"}}),
            );
        }
        self.script
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or_else(|| Answer::json(500, json!({"error": {"type": "api_error", "message": "unscripted"}})))
    }

    /// The requests made, customers' look-ups aside.
    fn calls(&self) -> Vec<Received> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| !r.path.starts_with("/v1/customers/"))
            .cloned()
            .collect()
    }
}

fn user() -> UserId {
    UserId::new("test-user-id").expect("valid")
}

fn key() -> ChargeKey {
    ChargeKey::new(&user(), PeriodKey::new(2026, 11).expect("valid"), ChargeKind::Block, 1)
}

fn customer() -> CustomerId {
    CustomerId::new("cus_1").expect("valid")
}

fn signed_at() -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_795_000_000, 0).single().expect("valid")
}

/// The charge `collect` pays: the block of `key()`, in round 0.
fn charge(amount: Money) -> Charge {
    let charge = Charge {
        amount,
        ..NewCharge::block(&Plan::default(), &user(), key_period(), 1, None).into_charge(
            uuid::Uuid::new_v4(),
            ChargeStatus::Pending,
            Utc::now(),
        )
    };
    assert_eq!((&charge.key, charge.round), (&key(), 0));
    charge
}

/// The metadata the library puts on the charge's payments.
fn metadata() -> Metadata {
    let charge = charge(brl(10_000));
    let customer = customer();
    let idempotency_key = charge.idempotency_key();
    let request = PaymentRequest {
        charge: &charge,
        idempotency_key: &idempotency_key,
        customer: &customer,
    };
    request.metadata()
}

async fn collect(gateway: &StripeGateway, amount: Money) -> Result<token_billing::PaymentOutcome, GatewayError> {
    let key = key();
    let customer = customer();
    let charge = charge(amount);
    gateway
        .collect(&PaymentRequest {
            charge: &charge,
            idempotency_key: key.as_str(),
            customer: &customer,
        })
        .await
}

fn key_period() -> PeriodKey {
    PeriodKey::new(2026, 11).expect("valid")
}

fn brl(minor: i64) -> Money {
    Money::from_minor(minor, Currency::BRL)
}

fn intent(status: &str) -> serde_json::Value {
    json!({"id": "pi_1", "object": "payment_intent", "status": status, "created": 1_795_000_000, "metadata": metadata()})
}

fn error(status: u16, kind: &str, code: &str) -> Answer {
    Answer::json(
        status,
        json!({"error": {"type": kind, "code": code, "message": format!("{kind} {code}")}}),
    )
}

#[tokio::test]
async fn a_payment_is_one_confirmed_off_session_intent_in_minor_units_under_the_charge_key() {
    let fake = FakeStripe::new([Answer::json(200, intent("succeeded"))]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let outcome = collect(&gateway, brl(10_000)).await.expect("collected");
    assert_eq!(
        (outcome.payment_id.as_str(), outcome.status),
        ("pi_1", PaymentStatus::Succeeded)
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("POST", "/v1/payment_intents")
    );
    assert_eq!(call.header("idempotency-key"), Some(key().as_str()));
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {SECRET_KEY}").as_str())
    );
    assert_eq!(
        call.header("stripe-version"),
        Some(token_billing::gateway::stripe::API_VERSION)
    );
    for (name, value) in [
        ("amount", "10000"),
        ("currency", "brl"),
        ("customer", "cus_1"),
        ("payment_method", "pm_1"),
        ("confirm", "true"),
        ("off_session", "true"),
        ("payment_method_types[0]", "card"),
        ("description", "Tokens 8M-16M, 2026-11"),
    ] {
        assert_eq!(call.form_value(name).as_deref(), Some(value), "{name}");
    }
    // The library's metadata, the charge key and round among it, each as `metadata[name]`.
    let metadata = metadata();
    assert!(metadata.values().any(|v| v == key().as_str()), "{metadata:?}");
    for (name, value) in &metadata {
        let name = format!("metadata[{name}]");
        assert_eq!(call.form_value(&name).as_deref(), Some(value), "{name}");
    }
}

#[tokio::test]
async fn amounts_follow_the_currency_s_exponent() {
    let fake = FakeStripe::new((0..3).map(|_| Answer::json(200, intent("succeeded"))));
    let gateway = fake.start(Duration::from_secs(5)).await;
    collect(&gateway, Money::from_minor(500, Currency::JPY))
        .await
        .expect("yen");
    collect(&gateway, Money::from_minor(1_230, Currency::BHD))
        .await
        .expect("dinar");
    // Stripe takes the krona, a zero-decimal currency, as a two-decimal amount.
    collect(&gateway, Money::from_minor(500, Currency::ISK))
        .await
        .expect("krona");
    let amounts: Vec<_> = fake
        .calls()
        .iter()
        .map(|c| {
            (
                c.form_value("amount").expect("amount"),
                c.form_value("currency").expect("currency"),
            )
        })
        .collect();
    let expected = [("500", "jpy"), ("1230", "bhd"), ("50000", "isk")].map(|(a, c)| (a.to_owned(), c.to_owned()));
    assert_eq!(amounts, expected);
    // Stripe charges three-decimal currencies in tens: refused before any request.
    let refused = collect(&gateway, Money::from_minor(1_235, Currency::BHD)).await;
    assert!(matches!(refused, Err(GatewayError::Rejected { ref code, .. }) if code == "amount_not_supported"));
    assert!(matches!(
        collect(&gateway, brl(0)).await,
        Err(GatewayError::Rejected { .. })
    ));
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn conflicts_and_server_errors_are_retried_with_the_same_idempotency_key() {
    let fake = FakeStripe::new([
        error(409, "idempotency_error", "idempotency_key_in_use"),
        error(500, "api_error", "internal"),
        Answer::json(200, intent("succeeded")),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let outcome = collect(&gateway, brl(10_000))
        .await
        .expect("collected on the third attempt");
    assert_eq!(outcome.status, PaymentStatus::Succeeded);
    let keys: Vec<_> = fake
        .calls()
        .iter()
        .map(|c| c.header("idempotency-key").map(str::to_owned))
        .collect();
    assert_eq!(keys, vec![Some(key().to_string()); 3]);
}

#[tokio::test]
async fn after_two_retries_the_outcome_is_unknown_and_nothing_more_is_sent() {
    let fake = FakeStripe::new([
        error(502, "api_error", "bad_gateway"),
        error(503, "api_error", "unavailable"),
        error(500, "api_error", "internal"),
        Answer::json(200, intent("succeeded")),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn stripe_should_retry_false_is_honoured() {
    // Each of these is retried without the header.
    for (status, kind, code) in [
        (500, "api_error", "internal"),
        (409, "idempotency_error", "idempotency_key_in_use"),
        (429, "invalid_request_error", "lock_timeout"),
    ] {
        let fake = FakeStripe::new([
            error(status, kind, code).with_header("stripe-should-retry", "false"),
            Answer::json(200, intent("succeeded")),
        ]);
        let gateway = fake.start(Duration::from_secs(5)).await;
        let result = collect(&gateway, brl(10_000)).await;
        assert!(
            matches!(result, Err(GatewayError::OutcomeUnknown { .. })),
            "{status}: {result:?}"
        );
        assert_eq!(fake.calls().len(), 1, "{status}: not retried");
    }
}

#[tokio::test]
async fn rate_limits_are_retried_only_when_stripe_says_so() {
    // A plain rate limit is not retried, as Stripe's clients do not: the outcome is unknown
    // (the charge stays pending), never failed.
    let fake = FakeStripe::new([
        error(429, "rate_limit_error", "rate_limit"),
        Answer::json(200, intent("succeeded")),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    assert_eq!(fake.calls().len(), 1);
    // With Stripe-Should-Retry: true, or for a lock timeout, it is.
    let fake = FakeStripe::new([
        error(429, "rate_limit_error", "rate_limit").with_header("stripe-should-retry", "true"),
        error(429, "invalid_request_error", "lock_timeout"),
        Answer::json(200, intent("succeeded")),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert_eq!(
        collect(&gateway, brl(10_000)).await.expect("collected").status,
        PaymentStatus::Succeeded
    );
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn every_operation_ends_by_its_deadline() {
    let slow = || Answer::json(200, intent("succeeded")).after(Duration::from_secs(5));
    let fake = FakeStripe::new([slow(), slow(), slow()]);
    let addr = {
        let fake = fake.clone();
        serve(move |request| fake.answer(request)).await
    };
    let gateway = StripeGateway::builder(SECRET_KEY)
        .api_base(format!("http://{addr}"))
        .timeout(Duration::from_secs(5))
        .deadline(Duration::from_millis(400))
        .build()
        .expect("a gateway");
    let started = Instant::now();
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_key_reused_with_other_parameters_keeps_the_payment_it_made() {
    let reused = || error(400, "idempotency_error", "idempotency_error");
    let search = |data: serde_json::Value| {
        Answer::json(200, json!({"object": "search_result", "data": data, "has_more": false}))
    };
    let fake = FakeStripe::new([
        reused(),
        search(json!([intent("succeeded")])),
        reused(),
        search(json!([])),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let outcome = collect(&gateway, brl(10_000)).await.expect("the earlier payment");
    assert_eq!(
        (outcome.payment_id.as_str(), outcome.status),
        ("pi_1", PaymentStatus::Succeeded)
    );
    // Nothing found (yet): unknown, so the charge stays pending; never failed.
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    let paths: Vec<String> = fake
        .calls()
        .iter()
        .map(|c| c.path.split('?').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/payment_intents",
            "/v1/payment_intents/search",
            "/v1/payment_intents",
            "/v1/payment_intents/search"
        ]
    );
}

#[tokio::test]
async fn a_key_reused_with_other_parameters_whose_payment_was_declined_is_declined() {
    let reused = || error(400, "idempotency_error", "idempotency_error");
    let search = |data: serde_json::Value| {
        Answer::json(200, json!({"object": "search_result", "data": data, "has_more": false}))
    };
    let mut declined = intent("requires_payment_method");
    declined["last_payment_error"] = json!({"code": "card_declined", "decline_code": "insufficient_funds"});
    let mut canceled = intent("canceled");
    canceled["cancellation_reason"] = json!("abandoned");
    // The same payment, made in another round than this request's.
    let mut earlier = declined.clone();
    earlier["metadata"]["round"] = json!("1");
    let fake = FakeStripe::new([
        reused(),
        search(json!([declined])),
        reused(),
        search(json!([canceled])),
        reused(),
        search(json!([earlier])),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    // The attempt made with this round's key was declined: nothing was collected, and the key
    // would give no other answer until Stripe forgets it, so the decline is the outcome.
    let outcome = collect(&gateway, brl(10_000)).await.expect("the round's decline");
    assert_eq!(
        (
            outcome.payment_id.as_str(),
            outcome.status,
            outcome.decline_code.as_deref()
        ),
        ("pi_1", PaymentStatus::Declined, Some("insufficient_funds"))
    );
    let outcome = collect(&gateway, brl(10_000)).await.expect("the round's cancellation");
    assert_eq!(
        (outcome.status, outcome.decline_code.as_deref()),
        (PaymentStatus::Canceled, Some("abandoned"))
    );
    // Another round's decline says nothing of what this round's key did: unknown.
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    assert_eq!(fake.calls().len(), 6);
}

#[tokio::test]
async fn client_errors_are_retried_only_when_stripe_says_so() {
    let cases = [
        (
            error(400, "invalid_request_error", "parameter_invalid_integer"),
            "parameter_invalid_integer",
        ),
        (
            error(400, "invalid_request_error", "resource_missing").with_header("stripe-should-retry", "false"),
            "resource_missing",
        ),
        (
            error(404, "invalid_request_error", "resource_missing"),
            "resource_missing",
        ),
    ];
    for (answer, expected) in cases {
        let fake = FakeStripe::new([answer, Answer::json(200, intent("succeeded"))]);
        let gateway = fake.start(Duration::from_secs(5)).await;
        let result = collect(&gateway, brl(10_000)).await;
        assert!(
            matches!(result, Err(GatewayError::Rejected { ref code, .. }) if code == expected),
            "{expected}: {result:?}"
        );
        assert_eq!(fake.calls().len(), 1, "{expected}: sent once");
    }
    for status in [401, 403] {
        let fake = FakeStripe::new([error(status, "invalid_request_error", "api_key_invalid")]);
        let gateway = fake.start(Duration::from_secs(5)).await;
        let result = collect(&gateway, brl(10_000)).await;
        assert!(matches!(result, Err(GatewayError::Unauthorized { .. })), "{result:?}");
        assert_eq!(fake.calls().len(), 1);
    }
    // Stripe-Should-Retry: true makes any status retried, as in Stripe's clients...
    let retry = || error(400, "invalid_request_error", "resource_missing").with_header("stripe-should-retry", "true");
    let fake = FakeStripe::new([retry(), Answer::json(200, intent("succeeded"))]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert_eq!(
        collect(&gateway, brl(10_000)).await.expect("collected").status,
        PaymentStatus::Succeeded
    );
    assert_eq!(fake.calls().len(), 2, "retried");
    // ... and a refusal that is still the answer once the retries are spent is a refusal.
    let fake = FakeStripe::new([retry(), retry(), retry(), Answer::json(200, intent("succeeded"))]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let result = collect(&gateway, brl(10_000)).await;
    assert!(
        matches!(result, Err(GatewayError::Rejected { ref code, .. }) if code == "resource_missing"),
        "{result:?}"
    );
    assert_eq!(fake.calls().len(), 3, "the first attempt and two retries");
}

#[tokio::test]
async fn timeouts_are_bounded_and_retried() {
    let slow = || Answer::json(200, intent("succeeded")).after(Duration::from_secs(3));
    let fake = FakeStripe::new([slow(), Answer::json(200, intent("succeeded"))]);
    let gateway = fake.start(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(
        collect(&gateway, brl(10_000)).await.expect("collected").status,
        PaymentStatus::Succeeded
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the slow attempt was cut short"
    );
    assert_eq!(fake.calls().len(), 2);

    let fake = FakeStripe::new([slow(), slow(), slow()]);
    let gateway = fake.start(Duration::from_millis(300)).await;
    let started = Instant::now();
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "three bounded attempts");
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test]
async fn dropped_connections_are_retried() {
    let fake = FakeStripe::new([Answer::HangUp, Answer::json(200, intent("succeeded"))]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert_eq!(
        collect(&gateway, brl(10_000)).await.expect("collected").status,
        PaymentStatus::Succeeded
    );
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test]
async fn malformed_answers_leave_the_outcome_unknown_or_are_read_safely() {
    // A success whose body cannot be read: money may have moved, so the outcome is unknown (the
    // charge stays pending), and the call is not repeated.
    for body in [
        Answer::raw(200, "not json"),
        Answer::json(200, json!({"id": "pi_1"})),
        Answer::json(200, json!({"id": "pi_1", "status": "exploded"})),
        Answer::json(200, json!([1, 2, 3])),
    ] {
        let fake = FakeStripe::new([body]);
        let gateway = fake.start(Duration::from_secs(5)).await;
        let result = collect(&gateway, brl(10_000)).await;
        assert!(matches!(result, Err(GatewayError::OutcomeUnknown { .. })), "{result:?}");
        assert_eq!(fake.calls().len(), 1);
    }
    // A server error without a readable body is retried, then unknown.
    let fake = FakeStripe::new([Answer::raw(500, "<html>"), Answer::raw(502, ""), Answer::raw(503, "")]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert!(matches!(
        collect(&gateway, brl(10_000)).await,
        Err(GatewayError::OutcomeUnknown { .. })
    ));
    // A decline without a readable body is still a decline: a 402 never collects.
    let fake = FakeStripe::new([Answer::raw(402, "garbage")]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert_eq!(
        collect(&gateway, brl(10_000)).await.expect("an outcome").status,
        PaymentStatus::Declined
    );
}

#[tokio::test]
async fn declines_keep_their_code_and_authentication_requests_their_payment() {
    let declined = Answer::json(
        402,
        json!({"error": {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
               "message": "Your card has insufficient funds.",
               "payment_intent": {"id": "pi_7", "status": "requires_payment_method"}}}),
    );
    let authenticate = Answer::json(
        402,
        json!({"error": {"type": "card_error", "code": "authentication_required", "decline_code": "authentication_required",
               "message": "This payment requires authentication.",
               "payment_intent": {"id": "pi_8", "status": "requires_payment_method"}}}),
    );
    let fake = FakeStripe::new([declined, authenticate, Answer::json(200, intent("processing"))]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let outcome = collect(&gateway, brl(10_000)).await.expect("an outcome");
    assert_eq!(
        (
            outcome.payment_id.as_str(),
            outcome.status,
            outcome.decline_code.as_deref()
        ),
        ("pi_7", PaymentStatus::Declined, Some("insufficient_funds"))
    );
    let outcome = collect(&gateway, brl(10_000)).await.expect("an outcome");
    assert_eq!(
        (outcome.payment_id.as_str(), outcome.status),
        ("pi_8", PaymentStatus::RequiresAction)
    );
    let outcome = collect(&gateway, brl(10_000)).await.expect("an outcome");
    assert_eq!(outcome.status, PaymentStatus::Processing);
    assert_eq!(fake.calls().len(), 3, "declines are not retried");
}

#[tokio::test]
async fn a_customer_without_a_payment_method_is_refused_before_any_payment() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let addr = serve(move |request: Received| {
        sink.lock().expect("lock").push(request.path.clone());
        Answer::json(
            200,
            json!({"id": "cus_1", "object": "customer", "invoice_settings": {"default_payment_method": null}}),
        )
    })
    .await;
    let gateway = StripeGateway::builder(SECRET_KEY)
        .api_base(format!("http://{addr}"))
        .build()
        .expect("a gateway");
    let result = collect(&gateway, brl(10_000)).await;
    assert!(matches!(result, Err(GatewayError::Rejected { ref code, .. }) if code == "no_payment_method"));
    assert_eq!(*received.lock().expect("lock"), ["/v1/customers/cus_1"]);
}

#[tokio::test]
async fn payments_are_found_by_charge_key_over_every_search_page() {
    let user = UserId::new("o'brien").expect("valid");
    let key = ChargeKey::new(&user, PeriodKey::new(2026, 11).expect("valid"), ChargeKind::Block, 2);
    let with = |id: &str, status: &str, created: i64| json!({"id": id, "status": status, "created": created, "metadata": {"charge_key": key.as_str()}});
    let fake = FakeStripe::new([
        Answer::json(
            200,
            json!({"object": "search_result", "data": [with("pi_a", "requires_payment_method", 1), with("pi_b", "processing", 2)],
                   "has_more": true, "next_page": "page2"}),
        ),
        Answer::json(
            200,
            json!({"object": "search_result", "data": [with("pi_c", "succeeded", 3)], "has_more": false, "next_page": null}),
        ),
        Answer::json(
            200,
            json!({"object": "search_result", "data": [with("pi_a", "requires_payment_method", 1), with("pi_b", "processing", 2), with("pi_d", "requires_action", 4)],
                   "has_more": false}),
        ),
        Answer::json(
            200,
            json!({"object": "search_result", "data": [with("pi_a", "canceled", 1)], "has_more": false}),
        ),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    let found = gateway.find_payment(&key).await.expect("searched").expect("found");
    assert_eq!(
        (found.payment_id.as_str(), found.status),
        ("pi_c", PaymentStatus::Succeeded)
    );
    let calls = fake.calls();
    let queries: Vec<Vec<(String, String)>> = calls
        .iter()
        .map(|c| {
            form_urlencoded::parse(c.path.split_once('?').expect("a query").1.as_bytes())
                .into_owned()
                .collect()
        })
        .collect();
    assert_eq!(
        queries[0].iter().find(|(k, _)| k == "query").map(|(_, v)| v.as_str()),
        Some(r"metadata['charge_key']:'tb:o\'brien:2026-11:block:2'")
    );
    assert!(queries[1].contains(&("page".to_owned(), "page2".to_owned())));
    // Without a success, the latest payment still in flight.
    let found = gateway.find_payment(&key).await.expect("searched").expect("found");
    assert_eq!(
        (found.payment_id.as_str(), found.status),
        ("pi_d", PaymentStatus::RequiresAction)
    );
    // Only declined or canceled payments: nothing to keep.
    assert_eq!(gateway.find_payment(&key).await.expect("searched"), None);
}

#[tokio::test]
async fn a_payment_that_cannot_be_canceled_reports_its_state() {
    let fake = FakeStripe::new([
        error(400, "invalid_request_error", "payment_intent_unexpected_state"),
        Answer::json(200, intent("succeeded")),
        Answer::json(200, intent("canceled")),
    ]);
    let gateway = fake.start(Duration::from_secs(5)).await;
    assert_eq!(
        gateway.cancel_payment("pi_1").await.expect("state").status,
        PaymentStatus::Succeeded
    );
    assert_eq!(
        gateway.cancel_payment("pi_1").await.expect("canceled").status,
        PaymentStatus::Canceled
    );
    let paths: Vec<_> = fake
        .calls()
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(
        paths,
        [
            "POST /v1/payment_intents/pi_1/cancel",
            "GET /v1/payment_intents/pi_1",
            "POST /v1/payment_intents/pi_1/cancel"
        ]
    );
}

#[tokio::test]
async fn configuration_refuses_bad_keys_and_plain_http_to_other_hosts() {
    assert!(matches!(
        StripeGateway::builder("").build(),
        Err(StripeConfigError::InvalidSecretKey)
    ));
    assert!(matches!(
        StripeGateway::builder("sk_test with space").build(),
        Err(StripeConfigError::InvalidSecretKey)
    ));
    for base in ["http://stripe.example.com", "http://10.0.0.7:12111"] {
        assert!(
            matches!(
                StripeGateway::builder(SECRET_KEY).api_base(base).build(),
                Err(StripeConfigError::InsecureApiBase { .. })
            ),
            "{base}"
        );
        assert!(
            StripeGateway::builder(SECRET_KEY)
                .api_base(base)
                .allow_insecure_http(true)
                .build()
                .is_ok()
        );
    }
    for base in ["ftp://x", "not a url", "https://api.stripe.com?x=1"] {
        assert!(matches!(
            StripeGateway::builder(SECRET_KEY).api_base(base).build(),
            Err(StripeConfigError::InvalidApiBase { .. })
        ));
    }
    for base in [
        "https://api.stripe.com",
        "http://127.0.0.1:8420",
        "http://localhost:12111",
        "http://[::1]:1",
    ] {
        assert!(
            StripeGateway::builder(SECRET_KEY).api_base(base).build().is_ok(),
            "{base}"
        );
    }
    let gateway = StripeGateway::builder("sk_live_supersecret")
        .webhook_secret("whsec_alsosecret")
        .build()
        .expect("a gateway");
    let shown = format!("{gateway:?}");
    assert!(
        !shown.contains("supersecret") && !shown.contains("alsosecret"),
        "{shown}"
    );
    assert!(shown.contains("sk_live_"), "{shown}");
}

fn webhook(kind: &str, object: serde_json::Value) -> Vec<u8> {
    json!({"id": "evt_1", "object": "event", "type": kind, "data": {"object": object}})
        .to_string()
        .into_bytes()
}

/// Delivers an event of type `kind` about `object` to the gateway, signed as Stripe signs it:
/// what the gateway reads from it.
async fn deliver(
    gateway: &StripeGateway,
    kind: &str,
    object: serde_json::Value,
) -> Result<Option<GatewayEvent>, WebhookError> {
    let payload = webhook(kind, object);
    gateway
        .webhook_event(&payload, &sign(&payload, "whsec_test", signed_at()))
        .await
}

/// What the gateway reads from an event about one of the library's objects.
async fn ours(gateway: &StripeGateway, kind: &str, object: serde_json::Value) -> GatewayEvent {
    deliver(gateway, kind, object)
        .await
        .expect("verified")
        .unwrap_or_else(|| panic!("{kind}: the library's"))
}

/// The fee paid for the period starting at 1_793_588_400, by invoice `payment_id`.
fn fee_paid(payment_id: &str, amount: Money) -> GatewayChange {
    GatewayChange::FixedFeePaid {
        user_id: user(),
        period_start: Utc.timestamp_opt(1_793_588_400, 0).single().expect("valid"),
        amount,
        payment_id: payment_id.to_owned(),
    }
}

#[tokio::test]
async fn webhooks_become_gateway_events() {
    let fake = FakeStripe::new([Answer::json(
        200,
        json!({"id": "sub_2", "object": "subscription", "status": "active",
               "metadata": {"token_billing_user": "test-user-id", "token_billing_plan": "default"}}),
    )]);
    let gateway = fake.start(Duration::from_secs(5)).await;

    let mut failed = intent("requires_payment_method");
    failed["last_payment_error"] = json!({"code": "card_declined", "decline_code": "expired_card"});
    for (kind, object, status) in [
        (
            "payment_intent.succeeded",
            intent("succeeded"),
            PaymentStatus::Succeeded,
        ),
        ("payment_intent.payment_failed", failed, PaymentStatus::Declined),
        (
            "payment_intent.requires_action",
            intent("requires_action"),
            PaymentStatus::RequiresAction,
        ),
    ] {
        let event = ours(&gateway, kind, object).await;
        assert_eq!((event.id.as_str(), event.event_type.as_str()), ("evt_1", kind));
        let GatewayChange::Payment(update) = event.change else {
            panic!("a payment update")
        };
        assert_eq!(
            (update.charge_key, update.round, update.outcome.status),
            (key(), Some(0), status)
        );
    }

    // A paid invoice of the library's subscription is the fee it collected, its total after
    // discounts and before tax. Its user is on the line...
    let lines = json!({"data": [{"type": "subscription", "period": {"start": 1_793_588_400, "end": 1_796_180_400},
                                 "metadata": {"token_billing_user": "test-user-id", "token_billing_plan": "default"}}]});
    let invoice = json!({"id": "in_1", "object": "invoice", "subscription": "sub_1", "status": "paid",
        "currency": "brl", "total_excluding_tax": 36_000, "total": 39_600, "amount_paid": 39_600, "lines": lines});
    let event = ours(&gateway, "invoice.paid", invoice.clone()).await;
    assert_eq!(event.change, fee_paid("in_1", brl(36_000)));
    // (Stripe's `invoice.payment_succeeded` for the same payment, under another event id, is not
    // read: the fee would be applied twice.)
    assert_eq!(
        deliver(&gateway, "invoice.payment_succeeded", invoice)
            .await
            .expect("verified"),
        None
    );
    // ... in the invoice's subscription details (newer API versions), without a request; an
    // older invoice without `total_excluding_tax` is read by its total ...
    let invoice = json!({"id": "in_2", "object": "invoice", "currency": "brl", "total_excluding_tax": null,
        "total": 40_000, "amount_paid": 40_000, "period_start": 1_790_000_000,
        "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_2",
            "metadata": {"token_billing_user": "test-user-id", "token_billing_plan": "default"}}},
        "lines": {"data": [{"parent": {"type": "subscription_item_details"}, "metadata": {},
                            "period": {"start": 1_793_588_400, "end": 1_796_180_400}}]}});
    // The line's period, not the invoice's (a renewal's is the month before).
    assert_eq!(
        ours(&gateway, "invoice.paid", invoice).await.change,
        fee_paid("in_2", brl(40_000))
    );
    assert!(fake.calls().is_empty(), "nothing asked of Stripe");
    // ... or only on the subscription, read from Stripe; an invoice with neither total is read
    // by what was paid.
    let invoice = json!({"id": "in_3", "object": "invoice", "subscription": "sub_2", "currency": "brl",
        "amount_paid": 40_000, "lines": {"data": [{"type": "subscription", "metadata": {}, "period": {"start": 1_793_588_400}}]}});
    assert_eq!(
        ours(&gateway, "invoice.paid", invoice).await.change,
        fee_paid("in_3", brl(40_000))
    );
    assert_eq!(
        fake.calls().last().map(|c| c.path.as_str()),
        Some("/v1/subscriptions/sub_2")
    );
    // A subscription deleted since is not the library's business; one that names nobody neither.
    for answer in [
        error(404, "invalid_request_error", "resource_missing"),
        Answer::json(200, json!({"id": "sub_3", "metadata": {"user_id": "someone"}})),
    ] {
        fake.script.lock().expect("lock").push_back(answer);
        let invoice = json!({"id": "in_4", "subscription": "sub_3", "amount_paid": 40_000,
            "lines": {"data": [{"period": {"start": 1_793_588_400}}]}});
        assert_eq!(
            deliver(&gateway, "invoice.paid", invoice).await.expect("verified"),
            None
        );
    }
    // An invoice paid from the customer's credit balance collected the fee too, though nothing
    // was paid at the time.
    let invoice = json!({"id": "in_6", "subscription": "sub_1", "currency": "brl", "total_excluding_tax": 40_000,
        "total": 40_000, "amount_paid": 0, "lines": lines});
    assert_eq!(
        ours(&gateway, "invoice.paid", invoice).await.change,
        fee_paid("in_6", brl(40_000))
    );
    // Stripe's krona has two decimals, the library's none.
    let invoice = json!({"id": "in_7", "subscription": "sub_1", "currency": "isk", "total_excluding_tax": 500_000,
        "lines": lines});
    assert_eq!(
        ours(&gateway, "invoice.paid", invoice).await.change,
        fee_paid("in_7", Money::from_minor(5_000, Currency::ISK))
    );
    // An invoice that collected nothing (a trial, a full discount) is no fee collected.
    let invoice = json!({"id": "in_5", "subscription": "sub_1", "currency": "brl", "total_excluding_tax": 0,
        "total": 0, "amount_paid": 0, "lines": lines});
    assert_eq!(
        deliver(&gateway, "invoice.paid", invoice).await.expect("verified"),
        None
    );
    // The library's invoice in a currency it does not know, or in krona with decimals, cannot
    // be read.
    for (currency, total) in [("xyz", 40_000), ("isk", 500_050)] {
        let invoice =
            json!({"id": "in_8", "subscription": "sub_1", "currency": currency, "total": total, "lines": lines});
        assert!(
            matches!(
                deliver(&gateway, "invoice.paid", invoice).await,
                Err(WebhookError::MalformedEvent(_))
            ),
            "{currency} {total}"
        );
    }

    // Events about objects the library did not make, or of other types, are not its business.
    for (kind, object) in [
        (
            "payment_intent.succeeded",
            json!({"id": "pi_x", "status": "succeeded", "metadata": {}}),
        ),
        ("customer.created", json!({"id": "cus_1"})),
        ("invoice.paid", json!({"id": "in_3", "status": "paid"})),
    ] {
        assert_eq!(deliver(&gateway, kind, object).await.expect("verified"), None, "{kind}");
    }

    // A charge key that does not match its parts is refused.
    let mut forged = intent("succeeded");
    forged["metadata"]["charge_key"] = json!("tb:someone-else:2026-11:block:1");
    assert!(matches!(
        deliver(&gateway, "payment_intent.succeeded", forged).await,
        Err(WebhookError::MalformedEvent(_))
    ));
    // A bad signature is refused before anything is read.
    let payload = webhook("payment_intent.succeeded", intent("succeeded"));
    assert!(matches!(
        gateway
            .webhook_event(&payload, &sign(&payload, "whsec_wrong", signed_at()))
            .await,
        Err(WebhookError::SignatureMismatch)
    ));
    let unconfigured = StripeGateway::builder(SECRET_KEY).build().expect("a gateway");
    assert!(matches!(
        deliver(&unconfigured, "payment_intent.succeeded", intent("succeeded")).await,
        Err(WebhookError::NotConfigured)
    ));
}
