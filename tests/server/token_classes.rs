//! Token classes over real HTTP: process-usage with the model and the tokens by class, or with a
//! provider's usage object as the provider returned it; the plan catalogue and its rate cards
//! from `TOKEN_BILLING_PLANS`; the summary's billable tokens and split by class; the usage by
//! model; and bad class reports refused, recording nothing.

use serde_json::{Value, json};

use super::{API_KEY, Server, config, data, serve, start, variables};

const CATALOGUE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plans.toml");

async fn usage(server: &Server, body: Value) -> super::support::Reply {
    server
        .post("/api/token-billing/process-usage", &body, Some(API_KEY))
        .await
}

async fn summary(server: &Server, user: &str) -> Value {
    data(
        &server
            .get(&format!("/api/token-billing/user-summary/{user}"), Some(API_KEY))
            .await,
    )
}

/// The service configured with the example catalogue, and `user` registered on its `pro` plan.
async fn pro_service(user: &str) -> Server {
    let server = serve(
        config::configure(variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("TOKEN_BILLING_PLANS", CATALOGUE),
        ]))
        .await
        .expect("configured"),
    )
    .await;
    let account = json!({"userId": user, "customerId": format!("cus_{user}"), "planId": "pro"});
    let registered = server
        .post("/api/token-billing/accounts", &account, Some(API_KEY))
        .await;
    assert_eq!(registered.status, 200, "{}", registered.body);
    server
}

#[tokio::test]
async fn an_anthropic_usage_object_is_billed_by_the_plans_rate_card() {
    let server = pro_service("ana").await;
    // Anthropic counts cache reads beside input_tokens: 120,000 read at a tenth.
    let body = json!({
        "userId": "ana", "operationType": "chat", "model": "claude-sonnet-4-5", "eventId": "msg_01",
        "provider": "anthropic",
        "usage": {"input_tokens": 3, "cache_creation_input_tokens": 2_000, "cache_read_input_tokens": 120_000,
                  "output_tokens": 801, "service_tier": "standard"}
    });
    let first = data(&usage(&server, body.clone()).await);
    // 3 + 2,500 + 12,000 + 4,005
    assert_eq!(
        (first["billableTokens"].as_u64(), first["totalTokens"].as_u64()),
        (Some(18_508), Some(18_508))
    );
    let again = data(&usage(&server, body).await);
    assert_eq!(
        again["consumptionId"], first["consumptionId"],
        "a re-send records nothing"
    );

    let first_summary = summary(&server, "ana").await;
    assert_eq!(first_summary["total_tokens"], json!(18_508));
    assert_eq!(first_summary["billableTokens"], json!("18508"));
    assert_eq!(
        first_summary["tokensByClass"],
        json!({"input": 3, "cachedInput": 120_000, "cacheWrite": 2_000, "output": 801, "reasoning": 0, "unclassified": 0})
    );

    // OpenAI and Gemini objects, with fractional weights: the period keeps the exact total.
    let openai = json!({
        "userId": "ana", "operationType": "chat", "model": "gpt-4o-2024-08-06", "provider": "openai",
        "usage": {"prompt_tokens": 2_001, "completion_tokens": 10, "total_tokens": 2_011,
                  "prompt_tokens_details": {"cached_tokens": 1_001}}
    });
    // 1,000 + 500.5 + 40
    assert_eq!(data(&usage(&server, openai).await)["billableTokens"], json!(1_541));
    let gemini = json!({
        "userId": "ana", "operationType": "chat", "model": "gemini-2.5-pro", "provider": "gemini",
        "usage": {"promptTokenCount": 1_001, "cachedContentTokenCount": 1, "candidatesTokenCount": 2,
                  "thoughtsTokenCount": 3, "totalTokenCount": 1_006}
    });
    // 1,000 + 0.25 + 16 + 24: the quarter fits in the half left by the last event's rounding.
    assert_eq!(data(&usage(&server, gemini).await)["billableTokens"], json!(1_040));
    // An Anthropic stream's reports in order: message_start's usage, then message_delta's
    // (which, in older streams, gives only the output).
    let stream = json!({
        "userId": "ana", "operationType": "chat", "model": "claude-sonnet-4-5", "provider": "anthropic",
        "usage": [{"input_tokens": 10, "cache_read_input_tokens": 100, "output_tokens": 1}, {"output_tokens": 20}]
    });
    // 10 input + 100 cache reads at a tenth + 20 output at 5.
    assert_eq!(data(&usage(&server, stream).await)["billableTokens"], json!(120));
    let last_summary = summary(&server, "ana").await;
    assert_eq!(last_summary["billableTokens"], json!("21208.75"));
    assert_eq!(last_summary["total_tokens"], json!(21_209));

    let rows = data(&server.get("/api/token-billing/usage-by-model/ana", Some(API_KEY)).await);
    let models: Vec<&str> = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|row| row["model"].as_str())
        .collect();
    assert_eq!(models, ["claude-sonnet-4-5", "gemini-2.5-pro", "gpt-4o-2024-08-06"]);
    assert_eq!(rows[1]["billableTokens"], json!("1040.25"));
    assert_eq!(rows[2]["tokens"]["cachedInput"], json!(1_001));
}

#[tokio::test]
async fn tokens_by_class_are_taken_beside_the_original_fields() {
    let server = start().await;
    let body = json!({
        "userId": "bea", "operationType": "chat", "model": "gpt-4o",
        "tokens": {"input": 700, "cachedInput": 2_000, "output": 300, "reasoning": 50}
    });
    let recorded = data(&usage(&server, body).await);
    // No rate card on the default plan: every token weighs 1.
    assert_eq!(
        (recorded["totalTokens"].as_u64(), recorded["billableTokens"].as_u64()),
        (Some(3_050), Some(3_050))
    );
    // tokensUsed may be given too, when it agrees.
    let agreeing = json!({
        "userId": "bea", "operationType": "chat", "tokensUsed": 10, "tokens": {"input": 4, "output": 6}
    });
    assert_eq!(data(&usage(&server, agreeing).await)["totalTokens"], json!(3_060));
    let plain = json!({"userId": "bea", "operationType": "embedding", "tokensUsed": 40});
    assert_eq!(data(&usage(&server, plain).await)["totalTokens"], json!(3_100));
    assert_eq!(
        summary(&server, "bea").await["tokensByClass"],
        json!({"input": 704, "cachedInput": 2_000, "cacheWrite": 0, "output": 306, "reasoning": 50, "unclassified": 40})
    );
}

#[tokio::test]
async fn bad_class_reports_are_refused_and_record_nothing() {
    let server = start().await;
    let base = |extra: Value| {
        let mut body = json!({"userId": "cid", "operationType": "chat"});
        body.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        body
    };
    let cases = [
        (json!({}), "tokensUsed is required"),
        (
            json!({"tokens": {"input": 1, "images": 2}}),
            "tokens.images is not a token class",
        ),
        (json!({"tokens": {"input": 0.5}}), "input"),
        (json!({"tokens": [1, 2]}), "tokens must be an object"),
        (
            json!({"tokens": {"input": 4}, "tokensUsed": 5}),
            "is not the sum of the token classes",
        ),
        (json!({"tokens": {}}), "at least 1"),
        (json!({"provider": "openai"}), "provider comes with usage"),
        (json!({"usage": {"prompt_tokens": 1}}), "usage comes with provider"),
        (
            json!({"provider": "mistral", "usage": {}}),
            "openai, anthropic or gemini",
        ),
        (
            json!({"provider": "openai", "usage": {"prompt_tokens": 1, "completion_tokens": 1}, "tokens": {"input": 2}}),
            "not both",
        ),
        (
            json!({"provider": "openai", "usage": {"completion_tokens": 1}}),
            "not openai's usage object",
        ),
        (
            json!({"provider": "anthropic", "usage": "12"}),
            "usage must be the provider's usage object",
        ),
        (
            json!({"provider": "openai", "usage": {"prompt_tokens": 10, "completion_tokens": 1,
                                                    "prompt_tokens_details": {"cached_tokens": 11}}}),
            "cached_tokens (11) is larger than prompt_tokens (10)",
        ),
        (
            json!({"provider": "gemini", "usage": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 12}}),
            "larger than totalTokenCount",
        ),
        (
            json!({"usageMetadata": {"promptTokenCount": 1}}),
            "unknown field usageMetadata",
        ),
        (json!({"tokens": {"input": 1}, "model": "has space"}), "model"),
    ];
    for (extra, expected) in cases {
        let reply = usage(&server, base(extra.clone())).await;
        assert_eq!(reply.status, 400, "{extra}: {}", reply.body);
        let error = reply.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(expected), "{extra}: {error}");
    }
    assert_eq!(
        summary(&server, "cid").await["total_tokens"],
        json!(0),
        "nothing recorded"
    );
}

#[tokio::test]
async fn a_bad_plan_catalogue_stops_the_service_from_starting() {
    let dir = super::tempdir("plans");
    let cases = [
        (
            "floats.toml",
            "[plans.default.rate_card.default]\ninput = 0.1\n",
            "floating-point",
        ),
        ("empty.json", r#"{"plans": {}}"#, "names no plan"),
        ("typo.toml", "[plan.default]\n", "not a plan catalogue"),
    ];
    for (name, text, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("written");
        let Err(error) = config::configure(variables(&[
            ("TOKEN_BILLING_API_KEY", API_KEY),
            ("TOKEN_BILLING_PLANS", path.to_str().expect("a path")),
        ]))
        .await
        else {
            panic!("{name} was taken");
        };
        assert!(error.to_string().contains(expected), "{name}: {error}");
    }
    let missing = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("TOKEN_BILLING_PLANS", "/nonexistent/plans.toml"),
    ]))
    .await;
    assert!(missing.is_err_and(|e| e.to_string().contains("cannot read")));
    // The catalogue in JSON, as the library serialises plans.
    let json_path = dir.join("plans.json");
    let plan = token_billing::Plan::builder()
        .included_tokens(1_000)
        .build()
        .expect("a plan");
    std::fs::write(&json_path, json!({"plans": {"default": plan}}).to_string()).expect("written");
    let configured = config::configure(variables(&[
        ("TOKEN_BILLING_API_KEY", API_KEY),
        ("TOKEN_BILLING_PLANS", json_path.to_str().expect("a path")),
    ]))
    .await
    .expect("configured");
    assert_eq!(configured.billing.default_plan().included_tokens(), 1_000);
    assert!(
        configured.description.contains("plans: default from"),
        "{}",
        configured.description
    );
}
