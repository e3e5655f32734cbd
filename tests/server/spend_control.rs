//! Spend control over real HTTP: an account's limits, reserve, settle and release, enforced
//! reports answered 402 in the original API's style, and the summary's limits and holds.

use serde_json::{Value, json};

use super::{API_KEY, Server, data, start};

impl Server {
    async fn write(&self, path: &str, body: Value) -> super::support::Reply {
        self.post(path, &body, Some(API_KEY)).await
    }
}

/// A refusal by a limit: 402, `success: false`, the error, the limit and the tokens left.
fn refusal(reply: &super::support::Reply, reason: &str, remaining: u64) {
    assert_eq!(reply.status, 402, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["success"], json!(false), "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    assert_eq!(
        (body["reason"].as_str(), body["remainingTokens"].as_u64()),
        (Some(reason), Some(remaining)),
        "{body}"
    );
    assert!(body.get("data").is_none(), "{body}");
}

#[tokio::test]
async fn a_capped_user_reserves_settles_and_is_refused_past_the_cap() {
    let server = start().await;
    let account = data(
        &server
            .write(
                "/api/token-billing/accounts",
                json!({"userId": "ana", "customerId": "cus_ana", "tokenCap": 1_000_000, "paymentGate": true}),
            )
            .await,
    );
    assert_eq!(
        account["limits"],
        json!({"spendCap": null, "tokenCap": 1_000_000, "paymentGate": true})
    );

    let hold = data(
        &server
            .write(
                "/api/token-billing/reserve",
                json!({"userId": "ana", "estimatedTokens": 600_000, "holdId": "call-1", "ttlSeconds": 120}),
            )
            .await,
    );
    assert_eq!(
        (hold["holdId"].as_str(), hold["grantedTokens"].as_u64()),
        (Some("call-1"), Some(600_000))
    );
    assert_eq!(hold["remainingTokens"], json!(400_000));
    assert!(hold["expiresAt"].as_str().is_some());

    let refused = server
        .write(
            "/api/token-billing/reserve",
            json!({"userId": "ana", "estimatedTokens": 500_000}),
        )
        .await;
    refusal(&refused, "token_cap", 400_000);

    let summary = data(&server.get("/api/token-billing/user-summary/ana", Some(API_KEY)).await);
    assert_eq!(
        (summary["heldTokens"].as_u64(), summary["remainingTokens"].as_u64()),
        (Some(600_000), Some(400_000))
    );
    assert_eq!(summary["openHolds"][0]["holdId"], json!("call-1"));
    assert_eq!(summary["limits"]["tokenCap"], json!(1_000_000));
    assert_eq!(summary["total_tokens"], json!(0), "the original product's fields stay");

    let settle = json!({"userId": "ana", "holdId": "call-1", "tokensUsed": 700_000, "operationType": "chat"});
    let settled = data(&server.write("/api/token-billing/settle", settle.clone()).await);
    assert_eq!(
        (settled["totalTokens"].as_u64(), settled["overshootTokens"].as_u64()),
        (Some(700_000), Some(100_000))
    );
    assert_eq!(settled["heldTokens"], json!(600_000));
    assert_eq!(settled["limitExceeded"], json!(null));
    let again = data(&server.write("/api/token-billing/settle", settle).await);
    assert_eq!(
        again["consumptionId"], settled["consumptionId"],
        "a repeated settle answers the same"
    );
    assert_eq!(server.recorded("ana").await, (1, 700_000));

    // A report of known size asks for enforcement: refused, nothing recorded.
    let enforced = json!({"userId": "ana", "tokensUsed": 300_001, "operationType": "chat", "enforceLimits": true});
    refusal(&server.usage(enforced).await, "token_cap", 300_000);
    assert_eq!(server.recorded("ana").await, (1, 700_000));
    // Reported after the fact, it is recorded, and the answer says the cap is reached.
    let direct = data(
        &server
            .usage(json!({"userId": "ana", "tokensUsed": 300_000, "operationType": "chat"}))
            .await,
    );
    assert_eq!(direct["limitExceeded"], json!("token_cap"));

    let hold = server
        .write(
            "/api/token-billing/reserve",
            json!({"userId": "ana", "estimatedTokens": 1}),
        )
        .await;
    refusal(&hold, "token_cap", 0);
}

#[tokio::test]
async fn a_released_hold_frees_its_tokens_and_bad_requests_change_nothing() {
    let server = start().await;
    data(
        &server
            .write(
                "/api/token-billing/accounts",
                json!({"userId": "bea", "customerId": "cus_bea", "spendCap": 50_000}),
            )
            .await,
    );
    // BRL 500.00: the fee and one block, 16M tokens.
    let hold = data(
        &server
            .write(
                "/api/token-billing/reserve",
                json!({"userId": "bea", "estimatedTokens": 16_000_000, "holdId": "h"}),
            )
            .await,
    );
    assert_eq!(hold["remainingTokens"], json!(0));
    refusal(
        &server
            .write(
                "/api/token-billing/reserve",
                json!({"userId": "bea", "estimatedTokens": 1}),
            )
            .await,
        "spend_cap",
        0,
    );
    let released = data(
        &server
            .write("/api/token-billing/release", json!({"userId": "bea", "holdId": "h"}))
            .await,
    );
    assert_eq!(released["released"], json!(true));
    let again = data(
        &server
            .write("/api/token-billing/release", json!({"userId": "bea", "holdId": "h"}))
            .await,
    );
    assert_eq!(again["released"], json!(false));

    for (body, status) in [
        (json!({"userId": "bea"}), 400),
        (json!({"userId": "bea", "estimatedTokens": 0}), 400),
        (json!({"userId": "bea", "estimatedTokens": "5"}), 400),
        (json!({"userId": "bea", "estimatedTokens": 5, "ttlSeconds": 0}), 400),
        (
            json!({"userId": "bea", "estimatedTokens": 5, "ttlSeconds": 10_000_000}),
            400,
        ),
    ] {
        let reply = server.write("/api/token-billing/reserve", body.clone()).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
    }
    let unauthenticated = server
        .post(
            "/api/token-billing/reserve",
            &json!({"userId": "bea", "estimatedTokens": 5}),
            None,
        )
        .await;
    assert_eq!(unauthenticated.status, 401);
    let bad_gate = server
        .write(
            "/api/token-billing/accounts",
            json!({"userId": "bea", "customerId": "cus_bea", "paymentGate": "yes"}),
        )
        .await;
    assert_eq!(bad_gate.status, 400, "{}", bad_gate.body);
    let summary = data(&server.get("/api/token-billing/user-summary/bea", Some(API_KEY)).await);
    assert_eq!(
        (summary["heldTokens"].as_u64(), summary["limits"]["spendCap"].as_i64()),
        (Some(0), Some(50_000))
    );
}
