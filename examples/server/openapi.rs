//! The OpenAPI 3.1 document of the service, served at `/api/token-billing/openapi.json`. The
//! tests hold it to the router: every route is documented, and every documented route exists.

use serde_json::{Value, json};

fn envelope(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["success", "data"],
        "properties": {"success": {"const": true}, "data": data}
    })
}

fn ok(description: &str, data: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": envelope(data)}}})
}

fn error(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn user_path() -> Value {
    json!({"name": "userId", "in": "path", "required": true, "schema": {"type": "string", "maxLength": 128}})
}

fn period_query() -> Value {
    json!({"name": "period", "in": "query", "required": false,
           "description": "The month, YYYY-MM; the current one when absent.",
           "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}})
}

fn limit_refusal(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LimitRefusal"}}}})
}

/// process-usage's answer: the original product's, the limit reached and the billable tokens.
fn processed() -> Value {
    json!({
        "type": "object",
        "required": ["consumptionId", "totalTokens", "tierCharges", "limitExceeded", "billableTokens"],
        "properties": {
            "consumptionId": {"type": "string", "format": "uuid"},
            "totalTokens": {"type": "integer", "description": "The month's billable tokens, rounded up to a whole token: the tokens used, unless the plan's rate card weighs their classes."},
            "billableTokens": {"type": "integer", "minimum": 0, "description": "What this event added to totalTokens: its tokens weighed by the month's rate card. The month keeps fractions exactly and rounds its total up, so the events' figures add up to the total."},
            "tierCharges": {"type": "array", "items": {"$ref": "#/components/schemas/TierCharge"}},
            "limitExceeded": {"enum": ["spend_cap", "token_cap", "payment_gate", null], "description": "The limit the month's usage has reached, which refuses the next reservation; null when none."}
        }
    })
}

/// settle's answer: process-usage's, and how the usage compares with the hold.
fn settled() -> Value {
    let mut answer = processed();
    answer["properties"]["heldTokens"] = json!({"type": ["integer", "null"], "description": "The tokens the hold held; null when it had expired or was released."});
    answer["properties"]["overshootTokens"] =
        json!({"type": "integer", "minimum": 0, "description": "Tokens used beyond the hold, recorded and charged."});
    answer
}

/// The fields of a usage report beyond the original product's: the model, and the tokens by
/// class or a provider's usage object, from which `tokensUsed` may be left out.
fn report_fields(properties: &mut Value) {
    let counts = json!({"type": "integer", "minimum": 0});
    properties["tokensUsed"]["description"] = json!(
        "Every token of the call. Required unless tokens or a provider's usage object gives them; must equal their sum when both are given."
    );
    properties["model"] = json!({"type": ["string", "null"], "maxLength": 128, "examples": ["claude-sonnet-4-5"], "description": "The model that served the call: the plan's rate card weighs its token classes by it."});
    properties["tokens"] = json!({
        "type": ["object", "null"], "additionalProperties": false,
        "description": "The call's tokens by class, disjoint (cached input is not also input; reasoning is not also output). Classes left out are zero.",
        "properties": {"input": counts, "cachedInput": counts, "cacheWrite": counts, "output": counts, "reasoning": counts}
    });
    properties["provider"] =
        json!({"enum": ["openai", "anthropic", "gemini", null], "description": "Whose usage object usage is."});
    properties["usage"] = json!({"type": ["object", "array", "null"], "description": "The provider's usage object as it returned it (OpenAI Chat Completions' or Responses' usage, Anthropic Messages' usage, Gemini's usageMetadata), read by the provider's documented rules; for anthropic, also a stream's usage reports in order (message_start's, then message_delta's), combined as the stream's cumulative usage. A contradictory or partial object (a part larger than its whole, no input_tokens) is refused (400)."});
}

/// A usage report's body: `schema` with the fields of [`report_fields`].
fn report_body(mut schema: Value) -> Value {
    report_fields(&mut schema["properties"]);
    schema
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

/// The errors every authenticated read can answer.
fn read_errors() -> [(&'static str, Value); 5] {
    [
        ("400", error("A bad user id or period.")),
        ("401", error("Missing, malformed, invalid or expired credentials.")),
        ("403", error("A user token for another user.")),
        ("500", error("The user's plan is missing from the service's catalogue.")),
        ("503", error("The billing store is unavailable.")),
    ]
}

/// The errors every write can answer, besides its own.
fn write_errors() -> [(&'static str, Value); 4] {
    [
        ("401", error("Missing or invalid API key.")),
        ("403", error("A user token: writes take the API key.")),
        ("413", error("The body is larger than 64 KiB.")),
        ("415", error("The body is not application/json.")),
    ]
}

/// A write's responses: its own (an object by status) and the errors of every write.
fn write_responses(own: Value) -> Value {
    let mut responses = own;
    for (status, answer) in write_errors() {
        responses[status] = answer;
    }
    responses
}

fn read(summary: &str, description: &str, data: Value) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert("200".to_owned(), ok(description, data));
    for (status, answer) in read_errors() {
        responses.insert(status.to_owned(), answer);
    }
    json!({
        "summary": summary,
        "security": [{"apiKey": []}, {"userToken": []}],
        "parameters": [user_path(), period_query()],
        "responses": responses,
    })
}

/// The document.
pub(crate) fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "token-billing",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Usage-based billing of LLM tokens: the original product's API over the token-billing library. Amounts are integer minor units of the plan's currency (centavos for BRL)."
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "TOKEN_BILLING_API_KEY: the host's backend. Required for writes."},
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "An HS256 JWT signed with TOKEN_BILLING_JWT_SECRET (as Supabase issues them) whose sub is the user: reads of that user's data only."}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["success", "error"],
                    "properties": {"success": {"const": false}, "error": {"type": "string"}}
                },
                "LimitRefusal": {
                    "type": "object",
                    "required": ["success", "error", "reason", "remainingTokens"],
                    "properties": {
                        "success": {"const": false},
                        "error": {"type": "string"},
                        "reason": {"enum": ["spend_cap", "token_cap", "payment_gate"], "description": "The limit that refuses: the month's charges would pass the spend cap, its tokens the token cap, or a charge is unpaid past its grace and the usage would start a new block."},
                        "remainingTokens": {"type": "integer", "minimum": 0, "description": "How many more tokens the month allows now."}
                    }
                },
                "Limits": {
                    "type": "object",
                    "required": ["spendCap", "tokenCap", "paymentGate"],
                    "properties": {
                        "spendCap": {"type": ["integer", "null"], "minimum": 0, "description": "The most a month may be charged, fixed fee included, in minor units of the plan's currency."},
                        "tokenCap": {"type": ["integer", "null"], "minimum": 0},
                        "paymentGate": {"type": "boolean", "description": "Whether a charge unpaid past its grace stops usage from starting a new block."}
                    }
                },
                "Hold": {
                    "type": "object",
                    "required": ["holdId", "tokens", "createdAt", "expiresAt"],
                    "properties": {
                        "holdId": {"type": "string"},
                        "tokens": {"type": "integer", "minimum": 1},
                        "createdAt": {"type": "string", "format": "date-time"},
                        "expiresAt": {"type": "string", "format": "date-time"}
                    }
                },
                "TierCharge": {
                    "type": "object",
                    "required": ["id", "billing_tier", "amount_charged", "status"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "billing_tier": {"type": "string", "examples": ["8M-16M"]},
                        "amount_charged": {"type": "integer", "examples": [10000]},
                        "status": {"enum": ["pending", "succeeded", "failed", "requires_action"]}
                    }
                },
                "Summary": {
                    "type": "object",
                    "required": ["total_tokens", "current_tier", "fixed_fee_charged", "tier_charges_count", "tier_charges_total", "total_charged"],
                    "properties": {
                        "total_tokens": {"type": "integer", "minimum": 0},
                        "current_tier": {"type": "string", "examples": ["4M-12M"]},
                        "fixed_fee_charged": {"type": "integer"},
                        "tier_charges_count": {"type": "integer", "minimum": 0},
                        "tier_charges_total": {"type": "integer"},
                        "total_charged": {"type": "integer"},
                        "limits": {"$ref": "#/components/schemas/Limits"},
                        "remainingTokens": {"type": ["integer", "null"], "minimum": 0, "description": "How many more tokens the current month allows under the limits, counting open holds; null when no limit applies."},
                        "heldTokens": {"type": "integer", "minimum": 0},
                        "openHolds": {"type": "array", "items": {"$ref": "#/components/schemas/Hold"}},
                        "billableTokens": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,6})?$", "description": "The month's exact billable tokens, as a decimal (total_tokens is it rounded up)."},
                        "tokensByClass": {"$ref": "#/components/schemas/TokensByClass"}
                    }
                },
                "TokensByClass": {
                    "type": "object",
                    "description": "Tokens by class, and those reported without classes (tokensUsed alone).",
                    "properties": {
                        "input": {"type": "integer"}, "cachedInput": {"type": "integer"}, "cacheWrite": {"type": "integer"},
                        "output": {"type": "integer"}, "reasoning": {"type": "integer"}, "unclassified": {"type": "integer"}
                    }
                },
                "ModelUsage": {
                    "type": "object",
                    "properties": {
                        "model": {"type": ["string", "null"], "description": "null for usage reported without a model."},
                        "events": {"type": "integer"}, "totalTokens": {"type": "integer"},
                        "tokens": {"$ref": "#/components/schemas/TokensByClass"},
                        "unclassifiedTokens": {"type": "integer"},
                        "billableTokens": {"type": "string", "description": "Exact, as a decimal."}
                    }
                }
            }
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "What this service is, and which mode collects the fixed fee (TOKEN_BILLING_FEE_COLLECTION).",
                    "responses": {"200": ok("The service.", json!({
                        "type": "object",
                        "required": ["service", "version", "feeCollection", "openapi"],
                        "properties": {
                            "service": {"const": "token-billing"},
                            "version": {"type": "string"},
                            "feeCollection": {"enum": ["library", "subscription"], "description": "library: the service charges the fee when a month opens (first usage, or create-subscription); subscription: a gateway subscription collects it."},
                            "openapi": {"type": "string", "description": "Where this document is."}
                        }
                    }))}
                }
            },
            "/api/token-billing/process-usage": {
                "post": {
                    "summary": "Records a user's token usage and charges every block it starts (the original product's processTokenUsage).",
                    "security": [{"apiKey": []}],
                    "requestBody": body(report_body(json!({
                        "type": "object",
                        "required": ["userId", "operationType"],
                        "properties": {
                            "userId": {"type": "string", "maxLength": 128},
                            "tokensUsed": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000u64},
                            "operationType": {"type": "string", "maxLength": 64, "examples": ["chat"]},
                            "clientId": {"type": ["string", "null"], "maxLength": 128},
                            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 500}, "maxProperties": 50},
                            "eventId": {"type": ["string", "null"], "maxLength": 128, "description": "The caller's id of this event: a retry with the same id answers the original outcome and records nothing."},
                            "occurredAt": {"type": ["string", "null"], "format": "date-time"},
                            "enforceLimits": {"type": ["boolean", "null"], "description": "Refuse the report (402, nothing recorded) when the user's limits forbid it: for a call of known size reported before it is made. Without it a limit never refuses usage, which was consumed."}
                        }
                    }))),
                    "responses": write_responses(json!({
                        "200": ok("The usage was recorded (or had been, for a retried eventId).", processed()),
                        "402": limit_refusal("enforceLimits was set and a limit forbids the usage. Nothing was recorded."),
                        "400": error("Malformed JSON, a missing or mistyped field (or one spelled snake_case, such as event_id), zero or too many tokens, bad ids or metadata, tokensUsed unlike the classes' sum, tokens and usage both given, a contradictory usage object. Nothing was recorded."),
                        "409": error("The eventId was used before for different usage. Nothing was recorded."),
                        "500": error("The user's plan is missing from the service's catalogue. Nothing was recorded: retry with the same eventId once it is back."),
                        "502": error("The payment gateway failed."),
                        "503": error("The billing store is unavailable: retry with the same eventId.")
                    }))
                }
            },
            "/api/token-billing/user-summary/{userId}": {
                "get": read("A user's figures for a month (the original product's getUserTokenSummary).", "The summary.", json!({"$ref": "#/components/schemas/Summary"}))
            },
            "/api/token-billing/usage-by-operation/{userId}": {
                "get": read("Tokens and operations by operation type in a month (the original product's monitoring query).", "One row per operation type.", json!({
                    "type": "array",
                    "items": {"type": "object", "properties": {
                        "operation_type": {"type": "string"}, "total_tokens": {"type": "integer"}, "operations": {"type": "integer"}
                    }}
                }))
            },
            "/api/token-billing/usage-by-model/{userId}": {
                "get": read("Tokens by class and billable tokens by model in a month.", "One row per model, usage without a model first.", json!({
                    "type": "array", "items": {"$ref": "#/components/schemas/ModelUsage"}
                }))
            },
            "/api/token-billing/charges-by-tier/{userId}": {
                "get": read("Charges by tier in a month (the original product's monitoring query).", "One row per tier.", json!({
                    "type": "array",
                    "items": {"type": "object", "properties": {
                        "billing_tier": {"type": "string"}, "charges_count": {"type": "integer"},
                        "total_charged": {"type": "integer"}, "collected": {"type": "integer"}
                    }}
                }))
            },
            "/api/token-billing/dashboard/{userId}": {
                "get": read("Everything the dashboard draws: the plan, the summary, cumulative usage and the charges.", "The month's data.", json!({
                    "type": "object",
                    "required": ["userId", "period", "plan", "summary", "timeline", "charges"],
                    "properties": {
                        "userId": {"type": "string"},
                        "period": {"type": "object", "properties": {
                            "key": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
                            "end": {"type": "string", "format": "date-time"}, "zone": {"type": "string"}
                        }},
                        "plan": {"type": "object", "properties": {
                            "currency": {"type": "string"}, "exponent": {"type": "integer"}, "fixedFee": {"type": "integer"},
                            "includedTokens": {"type": "integer"}, "blockSize": {"type": "integer"}, "blockPrice": {"type": "integer"}
                        }},
                        "summary": {"allOf": [{"$ref": "#/components/schemas/Summary"}, {"type": "object", "properties": {
                            "outstanding_count": {"type": "integer"}, "outstanding_total": {"type": "integer"}
                        }}]},
                        "timeline": {"type": "array", "items": {"type": "object", "properties": {
                            "at": {"type": "string", "format": "date-time"}, "totalTokens": {"type": "integer"}
                        }}},
                        "charges": {"type": "array", "items": {"type": "object", "properties": {
                            "id": {"type": "string", "format": "uuid"}, "kind": {"enum": ["fixed_fee", "block"]},
                            "block": {"type": "integer"}, "billing_tier": {"type": "string"}, "amount_charged": {"type": "integer"},
                            "status": {"enum": ["pending", "succeeded", "failed", "requires_action"]},
                            "failure_code": {"type": ["string", "null"]}, "created_at": {"type": "string", "format": "date-time"}
                        }}}
                    }
                }))
            },
            "/api/token-billing/accounts": {
                "post": {
                    "summary": "Links a user to the payment customer who pays (and optionally a plan: without planId the account keeps its plan, the default for a new one); charges waiting for it are collected.",
                    "security": [{"apiKey": []}],
                    "requestBody": body(json!({
                        "type": "object",
                        "required": ["userId", "customerId"],
                        "properties": {
                            "userId": {"type": "string", "maxLength": 128},
                            "customerId": {"type": "string", "maxLength": 255},
                            "planId": {"type": "string", "maxLength": 64},
                            "spendCap": {"type": ["integer", "null"], "minimum": 0, "description": "The most a month may be charged, in minor units of the plan's currency. Naming any of spendCap, tokenCap and paymentGate replaces the account's limits with those named; naming none keeps them."},
                            "tokenCap": {"type": ["integer", "null"], "minimum": 0},
                            "paymentGate": {"type": ["boolean", "null"]}
                        }
                    })),
                    "responses": write_responses(json!({
                        "200": ok("The account, with the limits that apply to it (its own, or its plan's).", json!({
                            "type": "object",
                            "properties": {"userId": {"type": "string"}, "customerId": {"type": "string"}, "planId": {"type": "string"}, "limits": {"$ref": "#/components/schemas/Limits"}}
                        })),
                        "400": error("A missing or bad field, or an unknown plan."),
                        "409": error("A plan change while the month has usage or charges."),
                        "502": error("The payment gateway failed while collecting the charges that waited for the account."),
                        "503": error("The billing store is unavailable.")
                    }))
                }
            },
            "/api/token-billing/reserve": {
                "post": {
                    "summary": "Holds tokens for a call whose size is known only at its end (a streamed completion), if the user's limits allow them: usage recorded, holds open and this estimate never pass a limit together, whatever the concurrency. Settle the hold with the real usage, or release it; unsettled, it stops counting after ttlSeconds.",
                    "security": [{"apiKey": []}],
                    "requestBody": body(json!({
                        "type": "object",
                        "required": ["userId", "estimatedTokens"],
                        "properties": {
                            "userId": {"type": "string", "maxLength": 128},
                            "estimatedTokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000u64},
                            "holdId": {"type": ["string", "null"], "maxLength": 128, "description": "The hold's id, which settle records the usage under; a retry with the same id and estimate answers the same hold. Drawn by the service when absent."},
                            "ttlSeconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 86_400, "description": "How long the hold lasts unless settled or released (300 by default)."}
                        }
                    })),
                    "responses": write_responses(json!({
                        "200": ok("The hold.", json!({
                            "type": "object",
                            "required": ["holdId", "grantedTokens", "expiresAt", "remainingTokens"],
                            "properties": {
                                "holdId": {"type": "string"},
                                "grantedTokens": {"type": "integer"},
                                "expiresAt": {"type": "string", "format": "date-time"},
                                "remainingTokens": {"type": ["integer", "null"], "description": "Tokens the month still allows besides this hold; null when no limit applies."},
                                "replayed": {"type": "boolean"}
                            }
                        })),
                        "400": error("A missing or bad field, a zero estimate or time to live. Nothing was held."),
                        "402": limit_refusal("A limit refuses the estimate. Nothing was held."),
                        "409": error("The holdId is open with another estimate, or was settled already."),
                        "500": error("The user's plan is missing from the service's catalogue."),
                        "503": error("The billing store is unavailable: retry with the same holdId.")
                    }))
                }
            },
            "/api/token-billing/settle": {
                "post": {
                    "summary": "Records a held call's real usage, exactly once, under the hold's id, and frees the hold; answers as process-usage does. Never refused by a limit (the tokens were consumed), even after the hold expired; usage beyond the hold is recorded, charged and reported as overshootTokens. A retry answers the same.",
                    "security": [{"apiKey": []}],
                    "requestBody": body(report_body(json!({
                        "type": "object",
                        "required": ["userId", "holdId", "operationType"],
                        "properties": {
                            "userId": {"type": "string", "maxLength": 128},
                            "holdId": {"type": "string", "maxLength": 128},
                            "tokensUsed": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000u64},
                            "operationType": {"type": "string", "maxLength": 64},
                            "clientId": {"type": ["string", "null"], "maxLength": 128},
                            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 500}, "maxProperties": 50}
                        }
                    }))),
                    "responses": write_responses(json!({
                        "200": ok("The usage was recorded (or had been, for a retry).", settled()),
                        "400": error("A missing or bad field. Nothing was recorded."),
                        "409": error("The holdId was settled before with other usage. Nothing was recorded."),
                        "500": error("The user's plan is missing from the service's catalogue."),
                        "502": error("The payment gateway failed."),
                        "503": error("The billing store is unavailable: retry with the same holdId.")
                    }))
                }
            },
            "/api/token-billing/release": {
                "post": {
                    "summary": "Frees a hold without usage (the call was cancelled); idempotent.",
                    "security": [{"apiKey": []}],
                    "requestBody": body(json!({
                        "type": "object",
                        "required": ["userId", "holdId"],
                        "properties": {"userId": {"type": "string", "maxLength": 128}, "holdId": {"type": "string", "maxLength": 128}}
                    })),
                    "responses": write_responses(json!({
                        "200": ok("Whether the hold was open.", json!({
                            "type": "object",
                            "required": ["holdId", "released"],
                            "properties": {"holdId": {"type": "string"}, "released": {"type": "boolean"}}
                        })),
                        "400": error("A missing or bad field."),
                        "500": error("The user's plan is missing from the service's catalogue."),
                        "503": error("The billing store is unavailable.")
                    }))
                }
            },
            "/api/token-billing/create-subscription": {
                "post": {
                    "summary": "Starts the monthly fixed fee of userId, paid by customerId (the original product's create-subscription). With TOKEN_BILLING_FEE_COLLECTION=subscription the payment gateway subscribes the customer, and the fee is recorded for userId when the gateway reports the invoice paid. With the library collecting the fee (the default) the current month is opened and its fee charged now, once however often this is called; there is no subscription. Either way the customer is registered for the user only once the gateway has accepted it.",
                    "security": [{"apiKey": []}],
                    "requestBody": body(json!({
                        "type": "object",
                        "required": ["customerId", "userId"],
                        "properties": {"customerId": {"type": "string", "maxLength": 255, "examples": ["cus_stripe_id"]}, "userId": {"type": "string", "maxLength": 128}}
                    })),
                    "responses": write_responses(json!({
                        "200": ok("The subscription, or the month's fixed-fee charge; feeCollection says which mode collects the fee.", json!({
                            "type": "object",
                            "required": ["subscriptionId", "customerId", "status", "feeCollection", "fixedFeeCharge"],
                            "properties": {
                                "subscriptionId": {"type": ["string", "null"], "description": "The gateway's subscription; null when the library collects the fee."},
                                "customerId": {"type": "string"},
                                "status": {"type": "string", "description": "The subscription's status (active); with the library collecting the fee, the fixed-fee charge's (succeeded, or failed when the card was declined: it is retried on the dunning schedule)."},
                                "feeCollection": {"enum": ["library", "subscription"]},
                                "fixedFeeCharge": {"oneOf": [{"$ref": "#/components/schemas/TierCharge"}, {"type": "null"}], "description": "The month's fixed-fee charge when the library collects the fee; null with a subscription."}
                            }
                        })),
                        "400": error("A missing or bad field."),
                        "409": error("The user pays with another customer (change it with /accounts). Nothing was changed."),
                        "422": error("The payment gateway refused the request (a customer it does not have: resource_missing), with its reason. Nothing was registered; retrying the same request fails again."),
                        "502": error("The payment gateway failed: retry later."),
                        "503": error("The billing store is unavailable.")
                    }))
                }
            },
            "/api/token-billing/webhooks/stripe": {
                "post": {
                    "summary": "Stripe's webhook endpoint: the Stripe-Signature is verified, each event applied once.",
                    "parameters": [{"name": "Stripe-Signature", "in": "header", "required": true, "schema": {"type": "string"}}],
                    "requestBody": body(json!({"type": "object"})),
                    "responses": {
                        "200": ok("Received; applied is false for events that are not the service's or were applied before.", json!({
                            "type": "object", "properties": {"applied": {"type": "boolean"}}
                        })),
                        "400": error("A bad signature or payload."),
                        "404": error("Stripe is not configured."),
                        "413": error("The body is larger than 1 MiB."),
                        "422": error("Reading the event needed Stripe, which refused the request (an object it does not have), with its reason."),
                        "502": error("Reading the event needed Stripe, which failed: Stripe delivers it again."),
                        "503": error("The billing store is unavailable: Stripe delivers it again.")
                    }
                }
            },
            "/api/token-billing/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            },
            "/metrics": {
                "get": {
                    "summary": "The library's metrics (events, charges, collections, latencies) in Prometheus's text format; the names and labels are documented in the crate's README.",
                    "security": [{"apiKey": []}],
                    "responses": {
                        "200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "401": error("Missing or invalid API key."),
                        "403": error("A user token: the metrics take the API key.")
                    }
                }
            },
            "/dashboard/{userId}": {
                "get": {
                    "summary": "The user's dashboard page for the current month. Open it as /dashboard/{userId}#token=<the user's token>: the fragment never reaches the server, and the page removes it from the address at once.",
                    "parameters": [user_path()],
                    "responses": {"200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}}
                }
            }
        }
    })
}
