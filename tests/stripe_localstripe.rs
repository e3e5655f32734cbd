//! The Stripe gateway against localstripe, a stateful Stripe-compatible server on 127.0.0.1:
//! the gateway conformance suite, charges that succeed, are declined or need authentication,
//! the fixed fee by subscription, signed webhooks delivered to an endpoint, and crashes.
//!
//! `LOCALSTRIPE_URL` names a running server (`.ci/run` starts one); without it, the tests start
//! one themselves from a virtualenv under `target/` (made on first use, with pip).
#![cfg(all(feature = "stripe", feature = "testing"))]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use support::{
    Received, SECRET_KEY, card, collecting_endpoint, customer_with_card, eventually, forget_idempotency_keys, http,
    localstripe, payment_intents_for, register_webhook, stripe,
};
use token_billing::gateway::stripe::{StripeGateway, WebhookError, sign};
use token_billing::testing::faults::{Fault, FaultyGateway, FaultyStore, GatewayOp, StoreOp};
use token_billing::testing::gateway::{Check, GatewayFixture, Unsupported};
use token_billing::{
    BillingService, Charge, ChargeKind, ChargeStatus, Clock, Currency, CustomerId, FeeCollection, GatewayChange,
    GatewayEvent, InMemoryUsageStore, ManualClock, Money, PaymentGateway, PeriodKey, Standing, Subscription,
    UsageReport, UsageStore, UserId,
};

const WEBHOOK_SECRET: &str = "whsec_token_billing_tests";
const PAYS: &str = "4242424242424242";
const DECLINES: &str = "4000000000000341";
const AUTHENTICATES: &str = "4000002500003155";

fn gateway() -> StripeGateway {
    StripeGateway::builder(SECRET_KEY)
        .api_base(localstripe())
        .webhook_secret(WEBHOOK_SECRET)
        .retry_delays(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .expect("a gateway")
}

/// Customers with localstripe's test cards, and what localstripe recorded of the payments and
/// subscriptions made.
struct Cards;

/// A Stripe object by its path, as localstripe holds it; `None` when it has no such object.
async fn stripe_object(path: &str) -> Option<serde_json::Value> {
    let auth = format!("Bearer {SECRET_KEY}");
    let (status, body) = http(localstripe(), "GET", path, &[("Authorization", auth.as_str())], "").await;
    if status == 404 {
        return None;
    }
    assert!(status < 300, "GET {path}: {status} {body}");
    Some(serde_json::from_str(&body).expect("a JSON answer"))
}

#[async_trait]
impl GatewayFixture for Cards {
    async fn paying_customer(&self) -> CustomerId {
        CustomerId::new(customer_with_card(PAYS).await).expect("valid")
    }
    async fn declining_customer(&self) -> CustomerId {
        CustomerId::new(customer_with_card(DECLINES).await).expect("valid")
    }
    fn decline_code(&self) -> &str {
        // localstripe declines 4000000000000341 with the error code `card_declined` and no
        // decline code of the issuer's, which the gateway then reports.
        "card_declined"
    }
    async fn authenticating_customer(&self) -> CustomerId {
        CustomerId::new(customer_with_card(AUTHENTICATES).await).expect("valid")
    }
    async fn processing_customer(&self) -> Result<CustomerId, Unsupported> {
        // localstripe simulates card payments only, which it settles at once: none stays
        // `processing` (at Stripe, asynchronous methods such as SEPA debits do).
        Err(Unsupported(
            "localstripe simulates card payments only, and none of them stays processing",
        ))
    }
    async fn give_paying_card(&self, customer: &CustomerId) {
        gateway()
            .set_default_payment_method(customer, &card(PAYS).await)
            .await
            .expect("a card that pays, as the default");
    }
    async fn amount_charged(&self, payment_id: &str) -> Option<Money> {
        let intent = stripe_object(&format!("/v1/payment_intents/{payment_id}")).await?;
        let amount = intent["amount"].as_i64().expect("an amount");
        let currency: Currency = intent["currency"]
            .as_str()
            .expect("a currency")
            .parse()
            .expect("a known currency");
        // Stripe counts the Icelandic krona in hundredths, the library in whole kronur.
        Some(match currency {
            Currency::ISK => Money::from_minor(amount / 100, currency),
            _ => Money::from_minor(amount, currency),
        })
    }
    fn subscriptions(&self) -> Result<(), Unsupported> {
        Ok(())
    }
    async fn subscriber(&self, subscription: &Subscription) -> Option<UserId> {
        let found = stripe_object(&format!("/v1/subscriptions/{}", subscription.subscription_id)).await?;
        // The metadata key the gateway reads a paid invoice's user from.
        UserId::new(found["metadata"]["token_billing_user"].as_str()?).ok()
    }
}

token_billing::payment_gateway_conformance!(localstripe_conformance, async { (super::gateway(), super::Cards) });

/// The whole suite at once: every check passes but those localstripe cannot simulate, which are
/// skipped for the reason the fixture gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_conforms_but_for_what_localstripe_cannot_simulate() {
    let report = token_billing::testing::gateway::run(&gateway(), &Cards).await;
    report.assert_conforms();
    let skipped: Vec<Check> = report.skipped().into_iter().map(|(check, _)| check).collect();
    assert_eq!(
        skipped,
        [
            Check::ProcessingIsReportedProcessing,
            Check::ProcessingIsFound,
            Check::ProcessingIsCanceledOrReported,
        ],
        "{report}"
    );
}

fn fresh_user(tag: &str) -> UserId {
    UserId::new(format!("ls-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])).expect("valid")
}

fn nov15() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid")
}

fn november() -> PeriodKey {
    PeriodKey::new(2026, 11).expect("valid")
}

struct Billing {
    service: BillingService,
    clock: ManualClock,
}

fn billing_over(store: Arc<dyn UsageStore>, gateway: Arc<dyn PaymentGateway>, fee: FeeCollection) -> Billing {
    let clock = ManualClock::new(nov15());
    let service = BillingService::builder(store, gateway)
        .clock(Arc::new(clock.clone()))
        .fee_collection(fee)
        .build();
    Billing { service, clock }
}

fn billing() -> Billing {
    billing_over(
        Arc::new(InMemoryUsageStore::new()),
        Arc::new(gateway()),
        FeeCollection::Library,
    )
}

/// Registers a user with a customer whose default card is `card`.
async fn register(billing: &Billing, user: &UserId, card: &str) -> CustomerId {
    let customer = CustomerId::new(customer_with_card(card).await).expect("valid");
    billing
        .service
        .register_account(user, Some(customer.clone()), None)
        .await
        .expect("registered");
    customer
}

/// Asserts that localstripe holds exactly one PaymentIntent for each charge, in the charge's
/// amount and currency, and that it succeeded exactly when the charge did.
async fn assert_one_payment_intent_each(charges: &[Charge]) {
    for charge in charges {
        let intents = payment_intents_for(charge.key.as_str()).await;
        assert_eq!(intents.len(), 1, "{}: {intents:#?}", charge.key);
        let intent = &intents[0];
        assert_eq!(intent["amount"].as_i64(), Some(charge.amount.minor_units()));
        assert_eq!(intent["currency"].as_str(), Some("brl"));
        assert_eq!(
            intent["status"].as_str() == Some("succeeded"),
            charge.status == ChargeStatus::Succeeded,
            "{}: {} at Stripe, {} here",
            charge.key,
            intent["status"],
            charge.status
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_charge_is_one_payment_intent_per_charge() {
    let billing = billing();
    let user = fresh_user("pays");
    register(&billing, &user, PAYS).await;
    let outcome = billing
        .service
        .process_token_usage(UsageReport::new(user.as_str(), 10_000_000, "chat").event_id("e-1"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges.len(), 1);
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Succeeded);
    assert_eq!(
        outcome.fixed_fee_charge.as_ref().map(|c| c.status),
        Some(ChargeStatus::Succeeded)
    );
    let summary = billing.service.token_summary(&user, None).await.expect("summary");
    assert_eq!(summary.total_charged, 50_000);
    let charges = billing.service.charges(&user, None).await.expect("charges");
    assert_one_payment_intent_each(&charges).await;
    let intent = &payment_intents_for(charges[1].key.as_str()).await[0];
    assert_eq!(intent["description"].as_str(), Some("Tokens 8M-16M, 2026-11"));
    assert_eq!(intent["metadata"]["user_id"].as_str(), Some(user.as_str()));
    assert_eq!(intent["metadata"]["round"].as_str(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_fails_the_charges_until_a_new_card_pays_them() {
    let billing = billing();
    let stripe_gateway = gateway();
    let user = fresh_user("declined");
    let customer = register(&billing, &user, DECLINES).await;
    let outcome = billing
        .service
        .process_token_usage(UsageReport::new(user.as_str(), 8_500_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Failed);
    let standing = billing.service.account_standing(&user).await.expect("standing");
    assert_eq!(standing.standing, Standing::PastDue);
    for charge in &standing.unpaid_charges {
        assert_eq!(charge.failure_code.as_deref(), Some("card_declined"));
    }

    // The customer adds a working card; the host retries at once.
    stripe_gateway
        .set_default_payment_method(&customer, &card(PAYS).await)
        .await
        .expect("set as default");
    let report = billing.service.retry_unpaid(&user).await.expect("retried");
    assert_eq!(report.succeeded, 2);
    let charges = billing.service.charges(&user, None).await.expect("charges");
    assert!(
        charges
            .iter()
            .all(|c| c.status == ChargeStatus::Succeeded && c.round == 1)
    );
    for charge in &charges {
        let intents = payment_intents_for(charge.key.as_str()).await;
        let statuses: Vec<_> = intents.iter().map(|i| i["status"].as_str().unwrap_or("")).collect();
        assert_eq!(intents.len(), 2, "one declined round, one paid: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == "succeeded").count(), 1);
    }
}

/// The first event localstripe delivered to `received` about `user` that `wanted` accepts,
/// verified and read by the gateway; waits for it up to 15 s.
async fn delivered_event(
    gateway: &StripeGateway,
    received: &Mutex<Vec<Received>>,
    user: &UserId,
    wanted: impl Fn(&GatewayEvent) -> bool,
) -> GatewayEvent {
    let wanted = &wanted;
    eventually("such a webhook", move || async move {
        let deliveries = received.lock().expect("lock").clone();
        for request in deliveries {
            let signature = request.header("stripe-signature").expect("every delivery is signed");
            let event = gateway
                .webhook_event(&request.body, signature)
                .await
                .expect("a valid delivery");
            if let Some(event) = event.filter(|e| e.user_id() == user && wanted(e)) {
                return Some(event);
            }
        }
        None
    })
    .await
}

/// The first delivery of an event of type `kind` about the subscription `subscription`, as
/// localstripe sent it (not read by the gateway); waits for it up to 15 s.
async fn delivery_about(received: &Mutex<Vec<Received>>, kind: &str, subscription: &str) -> Received {
    eventually(kind, move || async move {
        received.lock().expect("lock").iter().find_map(|request| {
            let event: serde_json::Value = serde_json::from_slice(&request.body).ok()?;
            (event["type"] == kind && event["data"]["object"]["subscription"] == subscription).then(|| request.clone())
        })
    })
    .await
}

/// The `invoice.paid` event Stripe sends along with an `invoice.payment_succeeded` delivery:
/// the same invoice under an event id of its own, signed with the endpoint's secret.
/// localstripe sends only the latter.
fn as_invoice_paid(delivery: &Received) -> (Vec<u8>, String) {
    let mut event: serde_json::Value = serde_json::from_slice(&delivery.body).expect("a JSON event");
    let id = format!("{}_paid", event["id"].as_str().expect("an event id"));
    event["id"] = id.into();
    event["type"] = "invoice.paid".into();
    let payload = event.to_string().into_bytes();
    let signature = sign(&payload, WEBHOOK_SECRET, Utc::now());
    (payload, signature)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_that_needs_authentication_waits_for_the_customer_then_the_webhook_settles_it() {
    let (addr, received) = collecting_endpoint().await;
    register_webhook(
        &format!("auth-{}", addr.port()),
        &format!("http://{addr}/webhooks/stripe"),
        WEBHOOK_SECRET,
    )
    .await;
    let billing = billing();
    let stripe_gateway = gateway();
    let user = fresh_user("auth");
    register(&billing, &user, AUTHENTICATES).await;
    let outcome = billing
        .service
        .process_token_usage(UsageReport::new(user.as_str(), 8_500_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(outcome.tier_charges[0].status, ChargeStatus::RequiresAction);
    let block = billing.service.charges(&user, None).await.expect("charges").remove(1);
    let payment = block.payment_id.clone().expect("the payment awaiting the customer");

    // The customer authenticates (in the browser, with the client secret).
    let intent = stripe("GET", &format!("/v1/payment_intents/{payment}"), &[]).await;
    let secret = intent["client_secret"].as_str().expect("a client secret");
    stripe(
        "POST",
        &format!("/v1/payment_intents/{payment}/_authenticate"),
        &[("client_secret", secret), ("success", "true")],
    )
    .await;

    // Stripe reports it: the signed webhook reaches the endpoint, and is applied once.
    let event = delivered_event(&stripe_gateway, &received, &user, |e| {
        e.event_type == "payment_intent.succeeded"
            && matches!(&e.change, GatewayChange::Payment(u) if u.outcome.payment_id == payment)
    })
    .await;
    let charge = billing
        .service
        .apply_gateway_event(event.clone())
        .await
        .expect("applied")
        .expect("a new event");
    assert_eq!(charge.status, ChargeStatus::Succeeded);
    assert_eq!(billing.service.apply_gateway_event(event).await.expect("applied"), None);
    let trail = billing.service.audit_trail(&user, None).await.expect("trail");
    assert_eq!(
        trail
            .iter()
            .filter(|e| matches!(e.event, token_billing::AuditEvent::GatewayEventApplied { .. }))
            .count(),
        1
    );
    let charges = billing.service.charges(&user, None).await.expect("charges");
    assert_one_payment_intent_each(&charges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_collects_the_fixed_fee_reported_by_its_paid_invoice() {
    let (addr, received) = collecting_endpoint().await;
    register_webhook(
        &format!("sub-{}", addr.port()),
        &format!("http://{addr}/webhooks/stripe"),
        WEBHOOK_SECRET,
    )
    .await;
    let stripe_gateway = gateway();
    let billing = billing_over(
        Arc::new(InMemoryUsageStore::new()),
        Arc::new(stripe_gateway.clone()),
        FeeCollection::Subscription,
    );
    let user = fresh_user("sub");
    let customer = register(&billing, &user, PAYS).await;
    let subscription = billing.service.create_subscription(&user).await.expect("subscribed");
    assert_eq!(subscription.status, "active");
    // Asking again keeps the one subscription.
    let again = billing.service.create_subscription(&user).await.expect("subscribed");
    assert_eq!(again.subscription_id, subscription.subscription_id);
    let listed = stripe("GET", &format!("/v1/subscriptions?customer={customer}"), &[]).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["data"][0]["plan"]["amount"].as_i64(), Some(40_000));

    // Stripe reports the paid invoice twice, as `invoice.payment_succeeded` and `invoice.paid`
    // under two event ids: the gateway reads only the second, so the fee is not applied twice.
    let succeeded = delivery_about(&received, "invoice.payment_succeeded", &subscription.subscription_id).await;
    let signature = succeeded.header("stripe-signature").expect("signed");
    assert_eq!(
        stripe_gateway
            .webhook_event(&succeeded.body, signature)
            .await
            .expect("a valid delivery"),
        None
    );
    let (paid, signature) = as_invoice_paid(&succeeded);
    let event = stripe_gateway
        .webhook_event(&paid, &signature)
        .await
        .expect("a valid delivery")
        .expect("the library's invoice");
    let GatewayChange::FixedFeePaid {
        ref user_id,
        amount,
        ref payment_id,
        ..
    } = event.change
    else {
        panic!("a fee paid: {event:?}")
    };
    assert_eq!(user_id, &user);
    assert_eq!(
        amount,
        Money::from_minor(40_000, Currency::BRL),
        "what the invoice collected"
    );
    assert!(payment_id.starts_with("in_"));
    let charge = billing
        .service
        .apply_gateway_event(event.clone())
        .await
        .expect("applied")
        .expect("new");
    assert_eq!(
        (charge.kind, charge.status),
        (ChargeKind::FixedFee, ChargeStatus::Succeeded)
    );
    // The fee is recorded for the month, in the plan's zone, that the invoice's period starts
    // in: localstripe's clock is this machine's.
    let period = charge.period;
    assert_eq!(
        period,
        token_billing::Period::containing(Utc::now(), chrono_tz::America::Sao_Paulo).key()
    );
    let summary = billing
        .service
        .token_summary(&user, Some(period))
        .await
        .expect("summary");
    assert_eq!((summary.fixed_fee_charged, summary.total_charged), (40_000, 40_000));
    assert_eq!(billing.service.apply_gateway_event(event).await.expect("applied"), None);
    assert_eq!(
        billing
            .service
            .token_summary(&user, Some(period))
            .await
            .expect("summary")
            .fixed_fee_charged,
        40_000,
        "once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_with_a_tampered_body_or_another_secret_are_refused() {
    let (addr, received) = collecting_endpoint().await;
    register_webhook(
        &format!("tamper-{}", addr.port()),
        &format!("http://{addr}/hook"),
        WEBHOOK_SECRET,
    )
    .await;
    // Any object makes localstripe send an event.
    stripe("POST", "/v1/customers", &[("description", "webhook probe")]).await;
    let deliveries = &*received;
    eventually("a delivery", move || async move {
        (!deliveries.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    let delivery = received.lock().expect("lock")[0].clone();
    let signature = delivery.header("stripe-signature").expect("signed");
    let stripe_gateway = gateway();
    assert!(stripe_gateway.webhook_event(&delivery.body, signature).await.is_ok());
    let mut tampered = delivery.body.to_vec();
    let at = tampered.iter().position(|b| *b == b'"').expect("a quote");
    tampered.insert(at + 1, b'x');
    assert!(matches!(
        stripe_gateway.webhook_event(&tampered, signature).await,
        Err(WebhookError::SignatureMismatch)
    ));
    let other = StripeGateway::builder(SECRET_KEY)
        .api_base(localstripe())
        .webhook_secret("whsec_another")
        .build()
        .expect("a gateway");
    assert!(matches!(
        other.webhook_event(&delivery.body, signature).await,
        Err(WebhookError::SignatureMismatch)
    ));
}

/// Runs `usage` on `service` until the store's fault fires, then drops it: the process died
/// there.
async fn crash_when_fired(service: &BillingService, store: &FaultyStore, usage: UsageReport, op: StoreOp) {
    let service = service.clone();
    let task = tokio::spawn(async move { service.process_token_usage(usage).await });
    eventually("the crash point", move || async move {
        store.fired().iter().any(|(fired, _)| *fired == op).then_some(())
    })
    .await;
    task.abort();
    assert!(task.await.is_err(), "the process died before answering");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_payment_intent_was_created_is_resumed_without_a_second_one() {
    let inner: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
    let faulty = Arc::new(FaultyStore::new(inner.clone()));
    let crashed = billing_over(faulty.clone(), Arc::new(gateway()), FeeCollection::Library);
    let user = fresh_user("crash");
    register(&crashed, &user, PAYS).await;
    faulty.inject(StoreOp::SettleCharge, Fault::Hang, 1);
    crash_when_fired(
        &crashed.service,
        &faulty,
        UsageReport::new(user.as_str(), 8_500_000, "chat"),
        StoreOp::SettleCharge,
    )
    .await;
    let charges = inner.charges(&user, november()).await.expect("charges");
    assert!(charges.iter().all(|c| c.status == ChargeStatus::Pending));
    assert_eq!(
        payment_intents_for(charges[0].key.as_str()).await.len(),
        1,
        "the fee was paid"
    );
    // Stripe forgets idempotency keys after a day: only the look-up can prevent a second payment.
    forget_idempotency_keys(user.as_str()).await;

    // Another instance, after the lease expired.
    let restarted = billing_over(inner.clone(), Arc::new(gateway()), FeeCollection::Library);
    restarted.clock.set(crashed.clock.now() + chrono::Duration::minutes(3));
    let report = restarted.service.resume_pending().await.expect("resumed");
    assert_eq!(report.succeeded, 2);
    let charges = inner.charges(&user, november()).await.expect("charges");
    assert_one_payment_intent_each(&charges).await;
    assert_eq!(
        restarted
            .service
            .token_summary(&user, Some(november()))
            .await
            .expect("summary")
            .total_charged,
        50_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_on_the_way_back_leaves_the_charge_pending_then_resumed_once() {
    let faulty = Arc::new(FaultyGateway::new(Arc::new(gateway())));
    let billing = billing_over(
        Arc::new(InMemoryUsageStore::new()),
        faulty.clone(),
        FeeCollection::Library,
    );
    let user = fresh_user("lost");
    register(&billing, &user, PAYS).await;
    faulty.inject(GatewayOp::Collect, Fault::FailAfter, 2);
    let outcome = billing
        .service
        .process_token_usage(UsageReport::new(user.as_str(), 8_500_000, "chat"))
        .await
        .expect("recorded");
    assert_eq!(
        outcome.tier_charges[0].status,
        ChargeStatus::Pending,
        "unknown, never failed"
    );
    forget_idempotency_keys(user.as_str()).await;
    billing.clock.advance(chrono::Duration::minutes(3));
    assert_eq!(billing.service.resume_pending().await.expect("resumed").succeeded, 2);
    let charges = billing.service.charges(&user, None).await.expect("charges");
    assert_one_payment_intent_each(&charges).await;
    assert!(
        charges
            .iter()
            .all(|c| c.payment_id.as_deref().is_some_and(|p| p.starts_with("pi_")))
    );
}
