//! The reference HTTP service (`examples/server/`) over real HTTP on 127.0.0.1: every endpoint,
//! the original product's flows, retries, a table of bad requests that record nothing, the
//! OpenAPI document against the routes, and the dashboard in headless Chromium.

#[path = "server/alert_webhooks.rs"]
mod alert_webhooks;
// The service's `main` spawns the delivery loop; the tests call one round of it.
#[allow(dead_code)]
#[path = "../examples/server/alerts.rs"]
mod alerts;
#[path = "../examples/server/app.rs"]
mod app;
#[path = "../examples/server/auth.rs"]
mod auth;
#[path = "../examples/server/config.rs"]
mod config;
#[path = "server/metrics.rs"]
mod metrics;
#[path = "../examples/server/openapi.rs"]
mod openapi;
#[path = "../examples/server/plans.rs"]
mod plans;
#[path = "../examples/server/prometheus.rs"]
mod prometheus;
#[path = "../examples/server/spend.rs"]
mod spend;
#[path = "server/spend_control.rs"]
mod spend_control;
#[cfg(feature = "sqlite")]
#[path = "server/sqlite.rs"]
mod sqlite;
mod support;
#[path = "server/token_classes.rs"]
mod token_classes;
#[path = "../examples/server/usage.rs"]
mod usage;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use support::{Reply, request};
use token_billing::{
    BillingService, FeeCollection, InMemoryUsageStore, Period, SandboxGateway, SystemClock, UnregisteredUsers, UserId,
};

use crate::app::{AppState, app, routes};
use crate::auth::{Auth, sign_token};

const API_KEY: &str = "test-api-key-0123456789";
const JWT_SECRET: &str = "test-jwt-secret";

struct Server {
    base: String,
    billing: BillingService,
    sandbox: SandboxGateway,
}

async fn start_with(fee: FeeCollection) -> Server {
    let sandbox = SandboxGateway::new();
    let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(sandbox.clone()))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .fee_collection(fee)
        .alerts(token_billing::AlertPolicy::standard())
        .build();
    let state = AppState::new(
        billing.clone(),
        Auth::new(API_KEY, Some(JWT_SECRET), Some("authenticated".to_owned())),
        Arc::new(SystemClock),
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("address");
    let router = app(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        base: format!("http://{addr}"),
        billing,
        sandbox,
    }
}

async fn start() -> Server {
    start_with(FeeCollection::Library).await
}

fn token_for(user: &str, expires_in: i64) -> String {
    sign_token(
        JWT_SECRET,
        &json!({"sub": user, "role": "authenticated", "aud": "authenticated", "exp": chrono::Utc::now().timestamp() + expires_in}),
    )
}

fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

impl Server {
    async fn post(&self, path: &str, body: &Value, credential: Option<&str>) -> Reply {
        let auth = credential.map(bearer);
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        request(&self.base, "POST", path, &headers, body.to_string().as_bytes()).await
    }

    async fn get(&self, path: &str, credential: Option<&str>) -> Reply {
        let auth = credential.map(bearer);
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        request(&self.base, "GET", path, &headers, b"").await
    }

    async fn usage(&self, body: Value) -> Reply {
        self.post("/api/token-billing/process-usage", &body, Some(API_KEY))
            .await
    }

    /// How many events the store holds of a user this month.
    async fn recorded_events(&self, user: &str) -> usize {
        let user = UserId::new(user).expect("valid");
        let period = Period::containing(chrono::Utc::now(), self.billing.default_plan().zone()).key();
        self.billing
            .store()
            .consumptions(&user, period)
            .await
            .expect("read")
            .len()
    }

    /// What the store holds of a user this month: events and tokens.
    async fn recorded(&self, user: &str) -> (usize, u64) {
        let user = UserId::new(user).expect("valid");
        let period = Period::containing(chrono::Utc::now(), self.billing.default_plan().zone()).key();
        let events = self
            .billing
            .store()
            .consumptions(&user, period)
            .await
            .expect("read")
            .len();
        let summary = self.billing.token_summary(&user, Some(period)).await.expect("summary");
        (events, summary.total_tokens)
    }
}

fn data(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["success"], json!(true), "{body}");
    body["data"].clone()
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn the_original_products_flows_answer_its_shapes() {
    let server = start().await;
    // 1M tokens: within the 8M allowance, no block charge.
    let first = data(
        &server
            .usage(json!({"userId": "test-user-id", "tokensUsed": 1_000_000, "operationType": "chat"}))
            .await,
    );
    // The original product's three fields, and the limit reached (none without limits).
    assert_eq!(
        keys(&first),
        [
            "billableTokens",
            "consumptionId",
            "limitExceeded",
            "tierCharges",
            "totalTokens"
        ]
    );
    assert_eq!(
        first["billableTokens"], first["totalTokens"],
        "without a card, every token bills one"
    );
    assert_eq!(first["limitExceeded"], json!(null));
    assert_eq!(
        (first["totalTokens"].clone(), first["tierCharges"].clone()),
        (json!(1_000_000), json!([]))
    );

    // 10M tokens for another user: one charge, collected at once.
    let second = data(
        &server
            .usage(json!({
                "userId": "user-uuid", "tokensUsed": 10_000_000, "operationType": "chat", "clientId": "client-uuid",
                "metadata": {"conversationId": "conv-123", "agentId": "agent-456"}
            }))
            .await,
    );
    let charges = second["tierCharges"].as_array().expect("charges");
    assert_eq!(charges.len(), 1);
    assert_eq!(keys(&charges[0]), ["amount_charged", "billing_tier", "id", "status"]);
    assert_eq!(
        (
            &charges[0]["billing_tier"],
            &charges[0]["amount_charged"],
            &charges[0]["status"]
        ),
        (&json!("8M-16M"), &json!(10_000), &json!("succeeded"))
    );

    // The summary, with the API key and with the user's own token.
    for credential in [API_KEY.to_owned(), token_for("user-uuid", 600)] {
        let summary = data(
            &server
                .get("/api/token-billing/user-summary/user-uuid", Some(&credential))
                .await,
        );
        assert_eq!(
            summary,
            json!({
                "total_tokens": 10_000_000, "current_tier": "8M-16M", "fixed_fee_charged": 40_000,
                "tier_charges_count": 1, "tier_charges_total": 10_000, "total_charged": 50_000,
                "limits": {"spendCap": null, "tokenCap": null, "paymentGate": false},
                "remainingTokens": null, "heldTokens": 0, "openHolds": [],
                // Token classes: the exact billable total, and tokens reported without classes.
                "billableTokens": "10000000",
                "tokensByClass": {"input": 0, "cachedInput": 0, "cacheWrite": 0, "output": 0, "reasoning": 0,
                                  "unclassified": 10_000_000}
            })
        );
    }
    // The envelope in the original product's order: success first.
    let raw = server
        .get("/api/token-billing/user-summary/user-uuid", Some(API_KEY))
        .await
        .body;
    assert!(
        raw.starts_with(r#"{"success":true,"data":{"total_tokens":10000000,"current_tier""#),
        "{raw}"
    );
}

#[tokio::test]
async fn a_retry_with_the_same_event_id_answers_the_original_outcome() {
    let server = start().await;
    let event = json!({"userId": "retrier", "tokensUsed": 9_000_000, "operationType": "chat", "eventId": "req-1"});
    let first = server.usage(event.clone()).await;
    let again = server.usage(event.clone()).await;
    assert_eq!(first.status, 200);
    assert_eq!(again.body, first.body, "the same answer, byte for byte");
    assert_eq!(server.recorded("retrier").await, (1, 9_000_000), "recorded once");
    // The same id for other usage is refused, and records nothing.
    let conflict = server
        .usage(json!({"userId": "retrier", "tokensUsed": 5, "operationType": "chat", "eventId": "req-1"}))
        .await;
    assert_eq!(conflict.status, 409);
    assert_eq!(server.recorded("retrier").await, (1, 9_000_000));
    assert_eq!(server.sandbox.payments().len(), 2, "the fee and one block, once");
}

#[tokio::test]
async fn an_account_on_a_plan_the_service_lacks_is_a_server_error_and_records_nothing() {
    let server = start().await;
    let now = chrono::Utc::now();
    let account = token_billing::Account {
        user_id: UserId::new("on-retired-plan").expect("valid"),
        customer_id: None,
        plan_id: token_billing::PlanId::new("retired").expect("valid"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: now,
        updated_at: now,
    };
    server.billing.store().put_account(account).await.expect("saved");
    // Not the caller's mistake: a 5xx, which a host retries rather than drops.
    let usage = server
        .usage(json!({"userId": "on-retired-plan", "tokensUsed": 1_000, "operationType": "chat"}))
        .await;
    assert_eq!(usage.status, 500, "{}", usage.body);
    assert!(
        !usage.body.contains("retired"),
        "no internals in the answer: {}",
        usage.body
    );
    assert_eq!(server.recorded_events("on-retired-plan").await, 0);
    let summary = server
        .get("/api/token-billing/user-summary/on-retired-plan", Some(API_KEY))
        .await;
    assert_eq!(summary.status, 500, "{}", summary.body);
}

#[tokio::test]
async fn the_monitoring_reports_accounts_and_subscriptions() {
    let server = start().await;
    for (tokens, operation) in [(5_000_000, "chat"), (4_000_000, "embedding"), (10_000_000, "chat")] {
        server
            .usage(json!({"userId": "mon", "tokensUsed": tokens, "operationType": operation}))
            .await;
    }
    let token = token_for("mon", 600);
    let by_operation = data(
        &server
            .get("/api/token-billing/usage-by-operation/mon", Some(&token))
            .await,
    );
    assert_eq!(
        by_operation,
        json!([
            {"operation_type": "chat", "total_tokens": 15_000_000, "operations": 2},
            {"operation_type": "embedding", "total_tokens": 4_000_000, "operations": 1}
        ])
    );
    let by_tier = data(
        &server
            .get("/api/token-billing/charges-by-tier/mon", Some(API_KEY))
            .await,
    );
    assert_eq!(
        by_tier,
        json!([
            {"billing_tier": "0-8M", "charges_count": 1, "total_charged": 40_000, "collected": 40_000},
            {"billing_tier": "8M-16M", "charges_count": 1, "total_charged": 10_000, "collected": 10_000},
            {"billing_tier": "16M-24M", "charges_count": 1, "total_charged": 10_000, "collected": 10_000}
        ])
    );
    let dashboard = data(&server.get("/api/token-billing/dashboard/mon", Some(&token)).await);
    assert_eq!(dashboard["summary"]["total_charged"], json!(60_000));
    assert_eq!(dashboard["charges"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        dashboard["timeline"]
            .as_array()
            .and_then(|t| t.last())
            .map(|p| &p["totalTokens"]),
        Some(&json!(19_000_000))
    );

    // Accounts link a user to the customer who pays.
    let customer = token_billing::CustomerId::new("cus_known").expect("valid");
    server
        .sandbox
        .add_customer(customer, token_billing::CardBehaviour::Succeeds);
    let account = data(
        &server
            .post(
                "/api/token-billing/accounts",
                &json!({"userId": "acc", "customerId": "cus_known"}),
                Some(API_KEY),
            )
            .await,
    );
    assert_eq!(
        account,
        json!({
            "userId": "acc", "customerId": "cus_known", "planId": "default",
            "limits": {"spendCap": null, "tokenCap": null, "paymentGate": false}
        })
    );

    // With the library collecting the fee, create-subscription makes no subscription: it opens
    // the month, whose fee the library charges.
    let opened = data(
        &server
            .post(
                "/api/token-billing/create-subscription",
                &json!({"customerId": "cus_known", "userId": "acc"}),
                Some(API_KEY),
            )
            .await,
    );
    assert_eq!(
        (&opened["feeCollection"], &opened["subscriptionId"], &opened["status"]),
        (&json!("library"), &Value::Null, &json!("succeeded"))
    );
    assert!(server.sandbox.subscriptions().is_empty());
    let subscribing = start_with(FeeCollection::Subscription).await;
    // A user who pays with another customer is not moved by a subscription request.
    for id in ["cus_first", "cus_second"] {
        subscribing.sandbox.add_customer(
            token_billing::CustomerId::new(id).expect("valid"),
            token_billing::CardBehaviour::Succeeds,
        );
    }
    data(
        &subscribing
            .post(
                "/api/token-billing/accounts",
                &json!({"userId": "settled", "customerId": "cus_first"}),
                Some(API_KEY),
            )
            .await,
    );
    let moved = subscribing
        .post(
            "/api/token-billing/create-subscription",
            &json!({"customerId": "cus_second", "userId": "settled"}),
            Some(API_KEY),
        )
        .await;
    assert_eq!(moved.status, 409, "{}", moved.body);
    let account = subscribing
        .billing
        .store()
        .account(&UserId::new("settled").expect("valid"))
        .await
        .expect("read")
        .expect("the account");
    assert_eq!(account.customer_id.map(String::from).as_deref(), Some("cus_first"));
    assert!(subscribing.sandbox.subscriptions().is_empty());
    subscribing.sandbox.add_customer(
        token_billing::CustomerId::new("cus_stripe_id").expect("valid"),
        token_billing::CardBehaviour::Succeeds,
    );
    let subscription = data(
        &subscribing
            .post(
                "/api/token-billing/create-subscription",
                &json!({"customerId": "cus_stripe_id", "userId": "sub-user"}),
                Some(API_KEY),
            )
            .await,
    );
    assert_eq!(
        (&subscription["customerId"], &subscription["status"]),
        (&json!("cus_stripe_id"), &json!("active"))
    );
    assert_eq!(subscribing.sandbox.subscriptions().len(), 1);
}

/// Serves a configured service on 127.0.0.1, as `main` does. The `sandbox` handle is a fresh
/// one: the configured service's gateway is its own.
async fn serve(configured: config::Configured) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server {
        base: format!("http://{}", listener.local_addr().expect("address")),
        billing: configured.billing.clone(),
        sandbox: SandboxGateway::new(),
    };
    let router = app(configured.state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    server
}

/// On the defaults (the in-memory store and the sandbox, only the API key set), the original
/// product's three calls all succeed for a new user, in either fee mode; create-subscription
/// repeated charges the fixed fee once and makes one subscription.
#[tokio::test]
async fn on_the_defaults_the_original_products_three_calls_succeed_for_a_new_user() {
    for mode in ["library", "subscription"] {
        let mut pairs = vec![("TOKEN_BILLING_API_KEY", API_KEY)];
        if mode == "subscription" {
            pairs.push(("TOKEN_BILLING_FEE_COLLECTION", "subscription"));
        }
        let server = serve(config::configure(variables(&pairs)).await.expect("configured")).await;
        let subscribe = json!({"customerId": "cus_new_customer", "userId": "new-user"});
        let created = data(
            &server
                .post("/api/token-billing/create-subscription", &subscribe, Some(API_KEY))
                .await,
        );
        assert_eq!(created["feeCollection"], json!(mode), "{mode}: {created}");
        assert_eq!(created["customerId"], json!("cus_new_customer"), "{mode}: {created}");
        if mode == "library" {
            // No subscription: the library charged the period's fee, now.
            assert_eq!(created["subscriptionId"], Value::Null, "{created}");
            let fee = &created["fixedFeeCharge"];
            assert_eq!(
                (&fee["billing_tier"], &fee["amount_charged"], &fee["status"]),
                (&json!("0-8M"), &json!(40_000), &json!("succeeded")),
                "{created}"
            );
            assert_eq!(created["status"], json!("succeeded"), "{created}");
        } else {
            assert!(
                created["subscriptionId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("sub_")),
                "{created}"
            );
            assert_eq!(created["status"], json!("active"), "{created}");
            assert_eq!(created["fixedFeeCharge"], Value::Null, "{created}");
        }
        let usage = data(
            &server
                .usage(json!({"userId": "new-user", "tokensUsed": 10_000_000, "operationType": "chat"}))
                .await,
        );
        assert_eq!(
            (
                &usage["tierCharges"][0]["billing_tier"],
                &usage["tierCharges"][0]["status"]
            ),
            (&json!("8M-16M"), &json!("succeeded")),
            "{mode}: {usage}"
        );
        let summary = data(
            &server
                .get("/api/token-billing/user-summary/new-user", Some(API_KEY))
                .await,
        );
        // The subscription's fee is recorded when its invoice is reported paid, not before.
        let fee = if mode == "library" { 40_000 } else { 0 };
        assert_eq!(
            summary,
            json!({
                "total_tokens": 10_000_000, "current_tier": "8M-16M", "fixed_fee_charged": fee,
                "tier_charges_count": 1, "tier_charges_total": 10_000, "total_charged": fee + 10_000,
                // Spend control's fields: no limit, nothing held.
                "limits": {"spendCap": null, "tokenCap": null, "paymentGate": false},
                "remainingTokens": null, "heldTokens": 0, "openHolds": [],
                "billableTokens": "10000000",
                "tokensByClass": {"input": 0, "cachedInput": 0, "cacheWrite": 0, "output": 0, "reasoning": 0,
                                  "unclassified": 10_000_000}
            }),
            "{mode}"
        );

        // Asked again: the same fee charge, or the same subscription, and nothing charged twice.
        let again = data(
            &server
                .post("/api/token-billing/create-subscription", &subscribe, Some(API_KEY))
                .await,
        );
        assert_eq!(again["fixedFeeCharge"]["id"], created["fixedFeeCharge"]["id"], "{mode}");
        assert_eq!(again["subscriptionId"], created["subscriptionId"], "{mode}");
        let charges = server
            .billing
            .charges(&UserId::new("new-user").expect("valid"), None)
            .await
            .expect("charges");
        let fees = charges
            .iter()
            .filter(|c| c.kind == token_billing::ChargeKind::FixedFee)
            .count();
        assert_eq!(fees, usize::from(mode == "library"), "{mode}: {charges:?}");
        let summary = data(
            &server
                .get("/api/token-billing/user-summary/new-user", Some(API_KEY))
                .await,
        );
        assert_eq!(summary["total_charged"], json!(fee + 10_000), "{mode}");

        // The service says which mode collects the fee.
        let about = data(&server.get("/", None).await);
        assert_eq!(about["feeCollection"], json!(mode), "{about}");
    }
}

/// A customer the gateway does not know: create-subscription answers the caller's error with
/// the gateway's reason, and leaves the user without that customer, in either fee mode. A
/// customer the gateway knows then succeeds, and the fee is paid once.
#[tokio::test]
async fn a_customer_the_gateway_refuses_is_the_callers_error_and_leaves_the_account_as_it_was() {
    for fee in [FeeCollection::Subscription, FeeCollection::Library] {
        // The plain sandbox: a customer it was not told of does not exist.
        let server = start_with(fee).await;
        let user = UserId::new("refused").expect("valid");
        let refused = server
            .post(
                "/api/token-billing/create-subscription",
                &json!({"customerId": "cus_missing", "userId": "refused"}),
                Some(API_KEY),
            )
            .await;
        assert_eq!(refused.status, 422, "{fee:?}: {}", refused.body);
        let message = refused.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            message.contains("resource_missing") && message.contains("No such customer: cus_missing"),
            "{fee:?}: {message}"
        );
        let account = server.billing.store().account(&user).await.expect("read");
        assert!(
            account.as_ref().is_none_or(|a| a.customer_id.is_none()),
            "{fee:?}: {account:?}"
        );
        assert!(server.sandbox.subscriptions().is_empty(), "{fee:?}");
        assert!(server.sandbox.payments().is_empty(), "{fee:?}");

        // With a customer the gateway knows, the same call succeeds, and pays the fee once.
        let known = token_billing::CustomerId::new("cus_known").expect("valid");
        server
            .sandbox
            .add_customer(known.clone(), token_billing::CardBehaviour::Succeeds);
        let created = data(
            &server
                .post(
                    "/api/token-billing/create-subscription",
                    &json!({"customerId": "cus_known", "userId": "refused"}),
                    Some(API_KEY),
                )
                .await,
        );
        assert_eq!(created["customerId"], json!("cus_known"), "{fee:?}: {created}");
        let account = server
            .billing
            .store()
            .account(&user)
            .await
            .expect("read")
            .expect("the account");
        assert_eq!(account.customer_id.as_ref(), Some(&known), "{fee:?}");
        if fee == FeeCollection::Library {
            assert_eq!(created["fixedFeeCharge"]["status"], json!("succeeded"), "{created}");
            assert_eq!(
                server
                    .sandbox
                    .collected(&known, token_billing::Currency::BRL)
                    .minor_units(),
                40_000
            );
        } else {
            assert_eq!(server.sandbox.subscriptions().len(), 1);
            assert_eq!(account.subscription_id.as_deref(), created["subscriptionId"].as_str());
        }
    }
}

/// The Stripe gateway refusing a customer it does not have (localstripe): the caller's error
/// with Stripe's reason, and no customer registered.
#[cfg(feature = "stripe")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_stripe_does_not_have_is_the_callers_error_and_registers_nothing() {
    let server = serve(
        config::configure(variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("STRIPE_SECRET_KEY", support::SECRET_KEY),
            ("STRIPE_API_BASE", support::localstripe()),
            ("TOKEN_BILLING_STORE", "memory"),
            ("TOKEN_BILLING_FEE_COLLECTION", "subscription"),
        ]))
        .await
        .expect("configured"),
    )
    .await;
    let refused = server
        .post(
            "/api/token-billing/create-subscription",
            &json!({"customerId": "cus_not_at_stripe", "userId": "stripe-refused"}),
            Some(API_KEY),
        )
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    // Stripe's reason (localstripe's is a bare "Not Found"), not a "retry later".
    let message = refused.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("stripe rejected the request"), "{message}");
    let account = server
        .billing
        .store()
        .account(&UserId::new("stripe-refused").expect("valid"))
        .await
        .expect("read");
    assert_eq!(account, None);
}

/// A real gateway over the in-memory store forgets, on restart, every total and charge: it is
/// refused unless the operator accepts that with `TOKEN_BILLING_STORE=memory`.
#[tokio::test]
async fn a_real_gateway_on_the_in_memory_store_needs_the_operators_consent() {
    let Err(error) = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("STRIPE_SECRET_KEY", "sk_test_unused"),
        ("STRIPE_API_BASE", "http://127.0.0.1:9"),
    ]))
    .await
    else {
        panic!("Stripe on the in-memory store, not consented to, is refused");
    };
    let error = error.to_string();
    assert!(
        error.contains("DATABASE_URL") && error.contains("TOKEN_BILLING_STORE=memory"),
        "{error}"
    );
    #[cfg(feature = "stripe")]
    {
        let consented = config::configure(variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("STRIPE_SECRET_KEY", "sk_test_unused"),
            ("STRIPE_API_BASE", "http://127.0.0.1:9"),
            ("TOKEN_BILLING_STORE", "memory"),
        ]))
        .await
        .expect("consented to");
        assert!(
            consented.description.contains("TOKEN_BILLING_STORE=memory"),
            "{}",
            consented.description
        );
        // What a restart then costs is logged at `warn`.
        assert!(
            consented
                .warnings
                .iter()
                .any(|w| w.contains("restart") && w.contains("under-billing") && w.contains("fixed fee")),
            "{:?}",
            consented.warnings
        );
    }
    // Named with a database, or naming another store, is a mistake.
    for refused in [
        variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("TOKEN_BILLING_STORE", "memory"),
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
        ]),
        variables(&[("TOKEN_BILLING_API_KEY", API_KEY), ("TOKEN_BILLING_STORE", "disk")]),
    ] {
        assert!(config::configure(refused).await.is_err());
    }
    // The defaults (the sandbox) lose nothing that was paid: no warning.
    let defaults = config::configure(variables(&[("TOKEN_BILLING_API_KEY", API_KEY)]))
        .await
        .expect("configured");
    assert!(defaults.warnings.is_empty(), "{:?}", defaults.warnings);
}
/// A lookup over fixed variables, as the environment would give them.
/// The PostgreSQL the tests use: `DATABASE_URL`, else the local test database.
#[cfg(feature = "postgres")]
fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn variables(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[tokio::test]
async fn configuration_comes_from_the_environment_and_is_logged_without_secrets() {
    let configured = config::configure(variables(&[("TOKEN_BILLING_API_KEY", "very-secret-key-0123")]))
        .await
        .expect("configured");
    assert_eq!(configured.addr, "127.0.0.1:3000");
    assert!(
        configured.description.contains("in memory"),
        "{}",
        configured.description
    );
    assert!(configured.description.contains("sandbox"), "{}", configured.description);
    assert!(!configured.description.contains("very-secret-key-0123"));
    assert!(configured.billing.fee_collection() == FeeCollection::Library);
    // The configured service takes the configured key, and the sandbox opens customers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let router = app(configured.state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let body = json!({"userId": "configured", "tokensUsed": 9_000_000, "operationType": "chat"}).to_string();
    let reply = request(
        &base,
        "POST",
        "/api/token-billing/process-usage",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer very-secret-key-0123"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(data(&reply)["tierCharges"][0]["status"], json!("succeeded"));
    for refused in [
        variables(&[]),
        variables(&[("TOKEN_BILLING_API_KEY", "too-short")]),
        variables(&[("TOKEN_BILLING_API_KEY", "long-enough-key-0123\n")]),
        variables(&[
            ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
            ("TOKEN_BILLING_JWT_SECRET", " a-jwt-secret"),
        ]),
        variables(&[
            ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
            ("TOKEN_BILLING_FEE_COLLECTION", "sometimes"),
        ]),
        variables(&[
            ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
            ("TOKEN_BILLING_GATEWAY", "paypal"),
        ]),
        variables(&[
            ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
            ("TOKEN_BILLING_GATEWAY", "stripe"),
        ]),
    ] {
        assert!(config::configure(refused).await.is_err());
    }
    // A durable store with the sandbox, whose customers always pay, would keep charges as paid
    // that nobody paid: refused unless named, and before connecting (nothing listens here).
    let Err(error) = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
    ]))
    .await
    else {
        panic!("PostgreSQL with the sandbox, not named, is refused");
    };
    assert!(error.to_string().contains("TOKEN_BILLING_GATEWAY=sandbox"), "{error}");
    // Named, the sandbox is what the log says.
    let named = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
        ("TOKEN_BILLING_GATEWAY", "sandbox"),
    ]))
    .await
    .expect("configured");
    assert!(
        named.description.contains("TOKEN_BILLING_GATEWAY=sandbox"),
        "{}",
        named.description
    );
    let subscribing = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", "long-enough-key-0123"),
        ("TOKEN_BILLING_FEE_COLLECTION", "subscription"),
        ("TOKEN_BILLING_ADDR", "127.0.0.1:0"),
    ]))
    .await
    .expect("configured");
    assert_eq!(subscribing.billing.fee_collection(), FeeCollection::Subscription);
    assert_eq!(subscribing.addr, "127.0.0.1:0");
}

/// With `DATABASE_URL` and the sandbox named by `TOKEN_BILLING_GATEWAY=sandbox`, the service
/// runs on PostgreSQL and the sandbox.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_with_the_sandbox_runs_when_the_sandbox_is_named() {
    let database = database_url();
    let configured = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("DATABASE_URL", &database),
        ("TOKEN_BILLING_GATEWAY", "sandbox"),
    ]))
    .await
    .expect("configured");
    for part in ["PostgreSQL", "sandbox (TOKEN_BILLING_GATEWAY=sandbox)"] {
        assert!(
            configured.description.contains(part),
            "{part}: {}",
            configured.description
        );
    }
}

/// With `DATABASE_URL` and `STRIPE_SECRET_KEY`, the service runs on PostgreSQL and Stripe
/// (localstripe here): a registered user's usage is charged through PaymentIntents.
#[cfg(all(feature = "postgres", feature = "stripe"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_with_postgresql_and_stripe_it_bills_through_them() {
    let database = database_url();
    let configured = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("DATABASE_URL", &database),
        ("STRIPE_SECRET_KEY", support::SECRET_KEY),
        ("STRIPE_API_BASE", support::localstripe()),
        ("STRIPE_WEBHOOK_SECRET", "whsec_server_test"),
    ]))
    .await
    .expect("configured");
    assert!(
        configured.description.contains("PostgreSQL"),
        "{}",
        configured.description
    );
    assert!(
        configured.description.contains("Stripe at http://127.0.0.1:"),
        "{}",
        configured.description
    );
    assert!(!configured.description.contains(support::SECRET_KEY));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Server {
        base: format!("http://{}", listener.local_addr().expect("address")),
        billing: configured.billing.clone(),
        sandbox: SandboxGateway::new(),
    };
    let router = app(configured.state);
    tokio::spawn(async move { axum::serve(listener, router).await });

    let user = format!("srv-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let customer = support::customer_with_card("4242424242424242").await;
    data(
        &server
            .post(
                "/api/token-billing/accounts",
                &json!({"userId": user, "customerId": customer}),
                Some(API_KEY),
            )
            .await,
    );
    let outcome = data(
        &server
            .usage(json!({"userId": user, "tokensUsed": 10_000_000, "operationType": "chat"}))
            .await,
    );
    assert_eq!(outcome["tierCharges"][0]["status"], json!("succeeded"));
    let summary = data(
        &server
            .get(&format!("/api/token-billing/user-summary/{user}"), Some(API_KEY))
            .await,
    );
    assert_eq!(summary["total_charged"], json!(50_000));
    let charges = configured
        .billing
        .charges(&UserId::new(user.as_str()).expect("valid"), None)
        .await
        .expect("charges");
    for charge in charges {
        assert_eq!(
            support::payment_intents_for(charge.key.as_str()).await.len(),
            1,
            "{}",
            charge.key
        );
    }
}

#[tokio::test]
async fn the_stripe_webhook_endpoint_needs_the_stripe_gateway() {
    let server = start().await;
    let reply = request(&server.base, "POST", "/api/token-billing/webhooks/stripe", &[], b"{}").await;
    assert_eq!(reply.status, 404);
}

#[cfg(feature = "stripe")]
#[tokio::test]
async fn stripe_webhooks_are_verified_and_applied_once() {
    use token_billing::gateway::stripe::{StripeGateway, sign};

    let sandbox = SandboxGateway::new();
    let customer = token_billing::CustomerId::new("cus_auth").expect("valid");
    sandbox.add_customer(customer.clone(), token_billing::CardBehaviour::RequiresAuthentication);
    let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(sandbox.clone())).build();
    let user = UserId::new("hooked").expect("valid");
    billing
        .register_account(&user, Some(customer), None)
        .await
        .expect("registered");
    let outcome = billing
        .process_token_usage(token_billing::UsageReport::new("hooked", 100, "chat"))
        .await
        .expect("recorded");
    let fee = outcome.fixed_fee_charge.expect("the fee");
    let charge = billing.charges(&user, None).await.expect("charges").remove(0);
    assert_eq!(fee.status, token_billing::ChargeStatus::RequiresAction);
    let stripe = StripeGateway::builder("sk_test_unused")
        .api_base("http://127.0.0.1:9")
        .webhook_secret("whsec_server")
        .build()
        .expect("a gateway");
    let state = AppState::new(
        billing.clone(),
        Auth::new(API_KEY, None, None),
        Arc::new(SystemClock),
        Some(stripe),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let router = app(state);
    tokio::spawn(async move { axum::serve(listener, router).await });

    let payment = charge.payment_id.clone().expect("the payment");
    let event = json!({"id": "evt_server_1", "type": "payment_intent.succeeded", "data": {"object": {
        "id": payment, "status": "succeeded",
        "metadata": {"user_id": "hooked", "period": charge.period.to_string(), "kind": "fixed_fee", "block": "0",
                     "charge_key": charge.key.to_string(), "round": "0"}}}})
    .to_string();
    let deliver = |signature: String| {
        let base = base.clone();
        let event = event.clone();
        async move {
            request(
                &base,
                "POST",
                "/api/token-billing/webhooks/stripe",
                &[("Content-Type", "application/json"), ("Stripe-Signature", &signature)],
                event.as_bytes(),
            )
            .await
        }
    };
    let forged = deliver(sign(event.as_bytes(), "whsec_other", chrono::Utc::now())).await;
    assert_eq!(forged.status, 400, "{}", forged.body);
    let signature = sign(event.as_bytes(), "whsec_server", chrono::Utc::now());
    assert_eq!(data(&deliver(signature.clone()).await), json!({"applied": true}));
    assert_eq!(
        data(&deliver(signature).await),
        json!({"applied": false}),
        "delivered twice, applied once"
    );
    let settled = billing.charges(&user, None).await.expect("charges").remove(0);
    assert_eq!(settled.status, token_billing::ChargeStatus::Succeeded);
}

/// Stripe's events can be larger than the other endpoints' bodies: the webhook endpoint takes
/// them up to 1 MiB.
#[cfg(feature = "stripe")]
#[tokio::test]
async fn the_stripe_webhook_endpoint_takes_bodies_up_to_a_mebibyte() {
    use token_billing::gateway::stripe::{StripeGateway, sign};

    let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new())).build();
    let stripe = StripeGateway::builder("sk_test_unused")
        .api_base("http://127.0.0.1:9")
        .webhook_secret("whsec_server")
        .build()
        .expect("a gateway");
    let state = AppState::new(
        billing,
        Auth::new(API_KEY, None, None),
        Arc::new(SystemClock),
        Some(stripe),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let router = app(state);
    tokio::spawn(async move { axum::serve(listener, router).await });

    // An event of a type the service ignores, padded to `padding` bytes and signed.
    let deliver = |padding: usize| {
        let base = base.clone();
        let event = json!({"id": "evt_large", "type": "customer.updated", "data": {"object": {
            "id": "cus_large", "description": "x".repeat(padding)}}})
        .to_string();
        async move {
            let signature = sign(event.as_bytes(), "whsec_server", chrono::Utc::now());
            let reply = request(
                &base,
                "POST",
                "/api/token-billing/webhooks/stripe",
                &[("Content-Type", "application/json"), ("Stripe-Signature", &signature)],
                event.as_bytes(),
            )
            .await;
            (event.len(), reply)
        }
    };
    let (size, large) = deliver(200 * 1024).await;
    assert!(size > app::MAX_BODY, "{size} bytes");
    assert_eq!(data(&large), json!({"applied": false}));
    // Just past the limit, so that the refusal comes with the body all but read.
    let (size, too_large) = deliver(1024 * 1024 + 1024).await;
    assert!(size > 1024 * 1024, "{size} bytes");
    assert_eq!(too_large.status, 413, "{}", too_large.body);
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let server = start().await;
    let document = data_of_openapi(&server).await;
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for method in operations.as_object().expect("operations").keys() {
            documented.push((method.to_ascii_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut served: Vec<(String, String)> = routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    served.sort();
    assert_eq!(
        documented, served,
        "every route documented, every documented route served"
    );
    // And every documented route answers as a route, not as a 404 or 405 of the router.
    for (method, path) in served {
        let concrete = path.replace("{userId}", "probe");
        let reply = match method.as_str() {
            "GET" => server.get(&concrete, Some(API_KEY)).await,
            _ => server.post(&concrete, &json!({}), Some(API_KEY)).await,
        };
        assert!(reply.status != 405, "{method} {path}: {}", reply.body);
        if reply.status == 404 {
            assert_ne!(reply.json()["error"], json!("no such route"), "{method} {path}");
        }
    }
}

async fn data_of_openapi(server: &Server) -> Value {
    let reply = server.get("/api/token-billing/openapi.json", None).await;
    assert_eq!(reply.status, 200);
    let document = reply.json();
    assert_eq!(document["openapi"], json!("3.1.0"));
    document
}

/// A bad request: what it is, method, path, headers, body, and the status it must get.
type BadRequest<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, String, u16);

/// Bad requests: each answered with a 4xx JSON error, and nothing recorded.
#[tokio::test]
async fn bad_requests_are_refused_with_a_clear_error_and_record_nothing() {
    let server = start().await;
    let other = token_for("someone-else", 600);
    let expired = token_for("victim", -3600);
    let victim_token = token_for("victim", 600);
    let usage = |fields: Value| {
        let mut body = json!({"userId": "victim", "tokensUsed": 1_000, "operationType": "chat"});
        for (key, value) in fields.as_object().expect("fields") {
            if value.is_null() {
                body.as_object_mut().expect("object").remove(key);
            } else {
                body[key] = value.clone();
            }
        }
        body.to_string()
    };
    let many_keys: serde_json::Map<String, Value> = (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
    let key = bearer(API_KEY);
    let (expired, victim_token, other) = (bearer(&expired), bearer(&victim_token), bearer(&other));
    let json_type = ("Content-Type", "application/json");
    let with_key = [json_type, ("Authorization", key.as_str())];
    let cases: Vec<BadRequest> = vec![
        (
            "malformed JSON",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            "{\"userId\": ".to_owned(),
            400,
        ),
        (
            "an array",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            "[1]".to_owned(),
            400,
        ),
        (
            "userId a number",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"userId": 7})),
            400,
        ),
        (
            "tokensUsed a string",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": "1000"})),
            400,
        ),
        (
            "event_id for eventId: a retry would not be recognised",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"event_id": "req-1"})),
            400,
        ),
        (
            "occurred_at for occurredAt",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"occurred_at": "2026-11-15T12:00:00Z"})),
            400,
        ),
        (
            "metadata an array",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"metadata": [1]})),
            400,
        ),
        (
            "a metadata value a number",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"metadata": {"n": 1}})),
            400,
        ),
        (
            "clientId an object",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"clientId": {}})),
            400,
        ),
        (
            "no userId",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"userId": null})),
            400,
        ),
        (
            "no tokensUsed",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": null})),
            400,
        ),
        (
            "no operationType",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"operationType": null})),
            400,
        ),
        (
            "zero tokens",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": 0})),
            400,
        ),
        (
            "negative tokens",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": -5})),
            400,
        ),
        (
            "fractional tokens",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": 1.5})),
            400,
        ),
        (
            "huge tokens",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": 1e30})),
            400,
        ),
        (
            "tokens past u64",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            r#"{"userId":"victim","tokensUsed":18446744073709551616,"operationType":"chat"}"#.to_owned(),
            400,
        ),
        (
            "more tokens than one event may have",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"tokensUsed": 1_000_000_001u64})),
            400,
        ),
        (
            "51 metadata keys",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"metadata": many_keys})),
            400,
        ),
        (
            "a metadata value too long",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"metadata": {"k": "x".repeat(501)}})),
            400,
        ),
        (
            "a user id with spaces",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"userId": "vic tim"})),
            400,
        ),
        (
            "an occurredAt not a date",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"occurredAt": "yesterday"})),
            400,
        ),
        (
            "a body past 64 KiB",
            "POST",
            "/api/token-billing/process-usage",
            with_key.to_vec(),
            usage(json!({"metadata": {"k": "x".repeat(70_000)}})),
            413,
        ),
        (
            "no JSON content type",
            "POST",
            "/api/token-billing/process-usage",
            vec![("Authorization", key.as_str())],
            usage(json!({})),
            415,
        ),
        (
            "no credentials",
            "POST",
            "/api/token-billing/process-usage",
            vec![json_type],
            usage(json!({})),
            401,
        ),
        (
            "a wrong key",
            "POST",
            "/api/token-billing/process-usage",
            vec![json_type, ("Authorization", "Bearer wrong")],
            usage(json!({})),
            401,
        ),
        (
            "not a bearer",
            "POST",
            "/api/token-billing/process-usage",
            vec![json_type, ("Authorization", "Basic dGVzdA==")],
            usage(json!({})),
            401,
        ),
        (
            "an expired token",
            "GET",
            "/api/token-billing/user-summary/victim",
            vec![("Authorization", expired.as_str())],
            String::new(),
            401,
        ),
        (
            "a user token writing",
            "POST",
            "/api/token-billing/process-usage",
            vec![json_type, ("Authorization", victim_token.as_str())],
            usage(json!({})),
            403,
        ),
        (
            "another user's summary",
            "GET",
            "/api/token-billing/user-summary/victim",
            vec![("Authorization", other.as_str())],
            String::new(),
            403,
        ),
        (
            "another user's dashboard",
            "GET",
            "/api/token-billing/dashboard/victim",
            vec![("Authorization", other.as_str())],
            String::new(),
            403,
        ),
        (
            "another user's operations",
            "GET",
            "/api/token-billing/usage-by-operation/victim",
            vec![("Authorization", other.as_str())],
            String::new(),
            403,
        ),
        (
            "another user's tiers",
            "GET",
            "/api/token-billing/charges-by-tier/victim",
            vec![("Authorization", other.as_str())],
            String::new(),
            403,
        ),
        (
            "a user token registering",
            "POST",
            "/api/token-billing/accounts",
            vec![json_type, ("Authorization", victim_token.as_str())],
            json!({"userId": "victim", "customerId": "cus_x"}).to_string(),
            403,
        ),
        (
            "a user token subscribing",
            "POST",
            "/api/token-billing/create-subscription",
            vec![json_type, ("Authorization", victim_token.as_str())],
            json!({"userId": "victim", "customerId": "cus_x"}).to_string(),
            403,
        ),
        (
            "a path that is not UTF-8",
            "GET",
            "/api/token-billing/user-summary/%FF",
            vec![("Authorization", key.as_str())],
            String::new(),
            400,
        ),
        (
            "a bad period",
            "GET",
            "/api/token-billing/user-summary/victim?period=2026-13",
            vec![("Authorization", key.as_str())],
            String::new(),
            400,
        ),
        (
            "a bad period without credentials",
            "GET",
            "/api/token-billing/user-summary/victim?period=2026-13",
            Vec::new(),
            String::new(),
            401,
        ),
        (
            "a bad period of another user",
            "GET",
            "/api/token-billing/usage-by-operation/victim?period=2026-13",
            vec![("Authorization", other.as_str())],
            String::new(),
            403,
        ),
        (
            "an unknown route",
            "GET",
            "/api/token-billing/nothing-here",
            vec![("Authorization", key.as_str())],
            String::new(),
            404,
        ),
        (
            "a wrong method",
            "GET",
            "/api/token-billing/process-usage",
            vec![("Authorization", key.as_str())],
            String::new(),
            405,
        ),
        (
            "a wrong method on a read",
            "DELETE",
            "/api/token-billing/user-summary/victim",
            vec![("Authorization", key.as_str())],
            String::new(),
            405,
        ),
    ];
    let document = crate::openapi::document();
    for (name, method, path, headers, body, status) in &cases {
        let reply = request(&server.base, method, path, headers, body.as_bytes()).await;
        // The status is documented for the route (the router's own 404 and 405 aside).
        if let Some(route) = route_of(method, path) {
            let documented = &document["paths"][route][method.to_ascii_lowercase()]["responses"][status.to_string()];
            assert!(
                documented.is_object(),
                "{name}: {status} is not documented for {method} {route}"
            );
        }
        assert_eq!(reply.status, *status, "{name}: {}", reply.body);
        let error = reply.json();
        assert_eq!(error["success"], json!(false), "{name}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{name}: a message");
        assert_eq!(reply.header("content-type"), Some("application/json"), "{name}");
        if *status == 401 {
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{name}");
        }
    }
    assert_eq!(server.recorded("victim").await, (0, 0), "nothing recorded");
    assert!(server.sandbox.payments().is_empty(), "nothing charged");
    // A valid request still works afterwards.
    let fine = server
        .usage(json!({"userId": "victim", "tokensUsed": 1_000, "operationType": "chat"}))
        .await;
    assert_eq!(fine.status, 200, "{}", fine.body);
}

/// The route (its template) that serves `method` and `path`, if any.
fn route_of(method: &str, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('?').next().unwrap_or(path).split('/').collect();
    routes().into_iter().find_map(|(m, template)| {
        let parts: Vec<&str> = template.split('/').collect();
        let same = m == method
            && parts.len() == segments.len()
            && parts.iter().zip(&segments).all(|(p, s)| p.starts_with('{') || p == s);
        same.then_some(template)
    })
}

/// Where Debian's Chromium is, if installed.
fn chromium() -> Option<String> {
    let candidates = [std::env::var("CHROMIUM").ok(), Some("/usr/bin/chromium".to_owned())];
    candidates.into_iter().flatten().find(|path| Path::new(path).exists())
}

fn headless(chromium: &str, profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}

/// The text of the element with `id` in a page.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let start = dom.find(&open).unwrap_or_else(|| panic!("no #{id} in the page"));
    let after = &dom[start..];
    let text = &after[after.find('>').expect("a tag") + 1..];
    &text[..text.find('<').expect("a closing tag")]
}

fn grouped(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn brl(minor: i64) -> String {
    format!("BRL {}.{:02}", grouped(minor / 100), (minor % 100).abs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_reports_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var("TOKEN_BILLING_BROWSER_TESTS").as_deref() != Ok("required"),
            "Chromium is required (apt-get install chromium)"
        );
        eprintln!("skipped: install Debian's chromium to run the dashboard in a browser");
        return;
    };
    let server = start().await;
    // Usage spread over the month so far.
    let now = chrono::Utc::now();
    let start_of_month = Period::containing(now, server.billing.default_plan().zone()).start();
    for (i, tokens) in [3_000_000, 6_000_000, 9_000_000].into_iter().enumerate() {
        let at = start_of_month + (now - start_of_month) * i32::try_from(i + 1).expect("small") / 3;
        let reply = server
            .usage(
                json!({"userId": "dana", "tokensUsed": tokens, "operationType": "chat", "occurredAt": at.to_rfc3339()}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // A call reported by class, with its model.
    let classes = json!({"userId": "dana", "operationType": "chat", "model": "gpt-4o",
                         "tokens": {"input": 600, "cachedInput": 300, "output": 100}});
    assert_eq!(server.usage(classes).await.status, 200);
    // A cap (BRL 700.00: the fee and three blocks, 32M tokens), a call in flight.
    let limits = json!({"userId": "dana", "customerId": "cus_dana", "spendCap": 70_000, "paymentGate": true});
    data(&server.post("/api/token-billing/accounts", &limits, Some(API_KEY)).await);
    let hold = json!({"userId": "dana", "estimatedTokens": 2_000_000, "holdId": "stream-1"});
    data(&server.post("/api/token-billing/reserve", &hold, Some(API_KEY)).await);
    let token = token_for("dana", 600);
    let api = data(&server.get("/api/token-billing/dashboard/dana", Some(&token)).await);
    assert_eq!(api["spend"]["capTokens"], json!(32_000_000));
    assert_eq!(api["spend"]["remainingTokens"], json!(11_999_000));
    let summary = &api["summary"];

    // This Chromium reports console output where the checks below look for it.
    let control = {
        let chromium = chromium.clone();
        let profile = tempdir("chromium-control");
        tokio::task::spawn_blocking(move || {
            headless(
                &chromium,
                &profile,
                &["--dump-dom", "data:text/html,<script>console.error('control')</script>"],
            )
        })
        .await
        .expect("chromium ran")
    };
    assert!(
        String::from_utf8_lossy(&control.stderr)
            .lines()
            .any(|l| l.contains(":CONSOLE") && l.contains("control")),
        "console output is not visible in Chromium's log"
    );

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let profile = tempdir("chromium-dom");
    let url = format!("{}/dashboard/dana#token={token}", server.base);
    let chromium_run = {
        let chromium = chromium.clone();
        let url = url.clone();
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || headless(&chromium, &profile, &["--dump-dom", &url]))
    };
    let output = chromium_run.await.expect("chromium ran");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let log = String::from_utf8_lossy(&output.stderr);
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "the page wrote to the console: {console:#?}");
    assert!(dom.contains("data-loaded=\"true\""), "the page loaded its data: {dom}");
    assert_eq!(text_of(&dom, "message"), "", "no error shown");
    assert_eq!(
        text_of(&dom, "total-tokens"),
        grouped(summary["total_tokens"].as_i64().expect("tokens"))
    );
    assert_eq!(
        text_of(&dom, "current-tier"),
        summary["current_tier"].as_str().expect("tier")
    );
    for (id, field) in [
        ("fixed-fee-charged", "fixed_fee_charged"),
        ("tier-charges-total", "tier_charges_total"),
        ("total-charged", "total_charged"),
        ("outstanding-total", "outstanding_total"),
    ] {
        assert_eq!(
            text_of(&dom, id),
            brl(summary[field].as_i64().expect("amount")),
            "#{id}"
        );
    }
    assert_eq!(
        text_of(&dom, "tier-charges-count"),
        summary["tier_charges_count"].to_string()
    );
    let table_rows = |id: &str| {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id}"));
        let body = &dom[start..];
        body[..body.find("</tbody>").expect("the table's end")]
            .matches("<tr>")
            .count()
    };
    assert_eq!(
        table_rows("charges"),
        api["charges"].as_array().expect("charges").len(),
        "one row per charge"
    );
    // Tokens by model and class: the usage without a model, then gpt-4o's classes.
    assert_eq!(table_rows("by-model"), 2);
    assert!(dom.contains("<td>(no model)</td>"), "usage reported without a model");
    assert!(
        dom.contains("<td>gpt-4o</td><td>600</td><td>300</td><td>0</td><td>100</td><td>0</td><td>0</td><td>1,000</td>"),
        "the model's classes and billable tokens"
    );
    assert_eq!(text_of(&dom, "billable-tokens"), grouped(18_001_000));
    assert!(dom.contains("id=\"usage-line\""), "the usage line is drawn");
    assert_eq!(text_of(&dom, "cap"), format!("{} · payment gate", brl(70_000)));
    assert_eq!(text_of(&dom, "remaining-tokens"), grouped(11_999_000));
    assert_eq!(
        text_of(&dom, "held-tokens"),
        format!("{} in 1 hold", grouped(2_000_000))
    );
    // 18M tokens: 80% and 100% of the allowance, blocks 1 and 2.
    assert_eq!(dom.matches("class=\"alert\"").count(), 4, "one line per alert");
    assert_eq!(
        dom.matches("class=\"cap-line\"").count(),
        1,
        "the cap (32M) is drawn: the chart reaches the end of the next block (32M)"
    );
    assert_eq!(
        dom.matches("class=\"boundary\"").count(),
        3,
        "the allowance, and the ends of blocks 1 and 2 (18M tokens are in block 2)"
    );

    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempdir("chromium-shot");
    let shot = format!("--screenshot={}", screenshot.display());
    let output = tokio::task::spawn_blocking(move || {
        headless(
            &chromium,
            &profile,
            &["--window-size=1280,1100", "--hide-scrollbars", &shot, &url],
        )
    })
    .await
    .expect("chromium ran");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real picture");
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("token-billing-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The original product's frontend helper, as the README shows it (with the header added), run
/// by Node.js against the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_products_frontend_snippet_works_with_the_added_header() {
    let node = ["/usr/bin/node", "/usr/local/bin/node"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(node) = node else {
        assert!(
            std::env::var("TOKEN_BILLING_BROWSER_TESTS").as_deref() != Ok("required"),
            "Node.js is required to run the README's snippet"
        );
        eprintln!("skipped: install Node.js to run the README's frontend snippet");
        return;
    };
    let server = start().await;
    let readme = include_str!("../README.md");
    let snippet = readme
        .split("```javascript\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's snippet");
    // The page's origin is the service: relative URLs go to it.
    let script = format!(
        "const BASE = {base:?};\nconst TOKEN_BILLING_API_KEY = {API_KEY:?};\n\
         const originFetch = fetch;\nglobalThis.fetch = (url, init) => originFetch(BASE + url, init);\n\
         {snippet}\n\
         new TokenUsageTracker().trackTokenUsage('node-user', 10000000)\n\
           .then(data => console.log('RESULT ' + JSON.stringify(data)), () => process.exit(1));\n",
        base = server.base
    );
    let output = tokio::task::spawn_blocking(move || Command::new(node).arg("-e").arg(script).output())
        .await
        .expect("node ran")
        .expect("node started");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Tokens processados:"), "{stdout}");
    let result: Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .expect("the result"),
    )
    .expect("JSON");
    assert_eq!(result["totalTokens"], json!(10_000_000));
    assert_eq!(result["tierCharges"][0]["billing_tier"], json!("8M-16M"));
    assert_eq!(server.recorded("node-user").await, (1, 10_000_000));
}

/// The service as built (`cargo run --example server`) stops on `SIGTERM`, what a container's
/// orchestrator sends: it answers until then, then exits cleanly.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_service_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    // Integration tests run from target/<profile>/deps; cargo builds the examples beside it.
    let binary = std::env::current_exe()
        .expect("the test binary")
        .parent()
        .and_then(Path::parent)
        .expect("the target directory")
        .join("examples/server");
    // `cargo test` builds every example before it runs a test; `cargo test --test server`
    // alone does not, and an older build must not stand in for the current source.
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run `cargo test` or `cargo build --example server`)",
                binary.display()
            )
        });
    // Every source of the service, whatever files it is split into.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/server");
    let sources = std::fs::read_dir(&dir).expect("the service's sources");
    for path in sources.map(|entry| entry.expect("an entry").path()) {
        let source = path.file_name().expect("a name").to_string_lossy().into_owned();
        let changed = std::fs::metadata(&path).and_then(|m| m.modified()).expect("the source");
        assert!(
            changed <= built,
            "{} is older than {source}: run `cargo test` or `cargo build --example server`",
            binary.display()
        );
    }
    let mut child = Command::new(&binary)
        .env_clear()
        .env("TOKEN_BILLING_API_KEY", API_KEY)
        .env("TOKEN_BILLING_ADDR", "127.0.0.1:0")
        .env("NO_COLOR", "1")
        // The usual directives: the library's debug lines (one per recorded event) on top.
        .env("RUST_LOG", "info,token_billing=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the service starts");
    let (lines, log) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("its output");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let address = loop {
        let line = log
            .recv_timeout(Duration::from_secs(20))
            .expect("the service logs where it listens");
        let address = line
            .split_once("address=")
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or_default().to_owned());
        seen.push(line);
        if let Some(address) = address {
            break address;
        }
    };
    let base = format!("http://{address}");
    let reply = request(&base, "GET", "/api/token-billing/openapi.json", &[], b"").await;
    assert_eq!(reply.status, 200, "it serves before the signal");
    let auth = format!("Bearer {API_KEY}");
    let reply = request(
        &base,
        "POST",
        "/api/token-billing/process-usage",
        &[("Authorization", auth.as_str()), ("Content-Type", "application/json")],
        br#"{"userId":"sig-user","tokensUsed":1000,"operationType":"chat"}"#,
    )
    .await;
    assert_eq!(reply.status, 200);

    // The shell's own `kill`: no other package needed.
    let sent = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("kill");
    assert!(sent.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("its status") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exited with {status}");
    seen.extend(log.try_iter());
    assert!(
        seen.iter().any(|line| line.contains("shutting down")) && seen.iter().any(|line| line.contains("stopped")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|line| line.contains("DEBUG") && line.contains("usage recorded")),
        "RUST_LOG's directive for token_billing: {seen:#?}"
    );
}
