//! The library on PostgreSQL and Stripe, configured from the environment:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//! STRIPE_SECRET_KEY=sk_test_... \
//! cargo run --example postgres_stripe --features postgres,stripe
//! ```
//!
//! - `DATABASE_URL`: the database (migrated on connect).
//! - `STRIPE_SECRET_KEY`: a Stripe key; `STRIPE_API_BASE` points the gateway at a
//!   Stripe-compatible server instead of Stripe (CI runs this against localstripe).
//! - `STRIPE_CUSTOMER_ID`: the customer who pays, with a default payment method. Without it, and
//!   with a test key only, the example opens a customer and gives it Stripe's test card
//!   `pm_card_visa`.
//!
//! It registers a user, reports the original product's two examples (1M tokens: no charge beyond the fee;
//! then 9M more: one block), resumes anything left pending, and prints the summary and the
//! charges with their PaymentIntents.

use std::sync::Arc;

use token_billing::gateway::stripe::StripeGateway;
use token_billing::{BillingService, CustomerId, PaymentGateway, PostgresUsageStore, UsageReport, UserId};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let database = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let store = PostgresUsageStore::connect(&database).await?;
    let stripe = StripeGateway::from_env()?;
    println!("Store: PostgreSQL. Gateway: Stripe at {}.", stripe.api_base());

    let billing = BillingService::builder(Arc::new(store), Arc::new(stripe.clone())).build();

    // A user of this run, and the customer who pays for them.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let user = UserId::new(format!("example-{}", &run[..12]))?;
    let customer = match std::env::var("STRIPE_CUSTOMER_ID") {
        Ok(id) => CustomerId::new(id)?,
        Err(_) => {
            let key = std::env::var("STRIPE_SECRET_KEY")?;
            if !key.starts_with("sk_test_") && !key.starts_with("rk_test_") {
                return Err("set STRIPE_CUSTOMER_ID: a test card is only given with a test key".into());
            }
            let customer = stripe.create_customer(&user).await?;
            let card = stripe.set_default_payment_method(&customer, "pm_card_visa").await?;
            println!("Opened customer {customer} with the test card {card}.");
            customer
        }
    };
    billing.register_account(&user, Some(customer), None).await?;

    for (event, tokens) in [("req-1", 1_000_000), ("req-2", 9_000_000)] {
        let outcome = billing
            .process_token_usage(UsageReport::new(user.as_str(), tokens, "chat").event_id(event))
            .await?;
        println!(
            "{event}: {tokens} tokens, period total {}, tier {}, {} block charge(s){}",
            outcome.total_tokens,
            outcome.current_tier,
            outcome.tier_charges.len(),
            outcome
                .fixed_fee_charge
                .as_ref()
                .map(|fee| format!(", fixed fee {}", fee.status))
                .unwrap_or_default()
        );
    }
    // A re-sent event is answered with its original outcome and charges nothing.
    let replay = billing
        .process_token_usage(UsageReport::new(user.as_str(), 9_000_000, "chat").event_id("req-2"))
        .await?;
    println!("req-2 again: replayed = {}", replay.replayed);

    let resumed = billing.resume_pending().await?;
    println!(
        "resume_pending: {} claimed, {} succeeded",
        resumed.claimed, resumed.succeeded
    );

    let summary = billing.token_summary(&user, None).await?;
    println!(
        "Summary {}: {} tokens, tier {}, fee {}, {} block(s) for {}, total {} (minor units of {})",
        summary.period,
        summary.total_tokens,
        summary.current_tier,
        summary.fixed_fee_charged,
        summary.tier_charges_count,
        summary.tier_charges_total,
        summary.total_charged,
        summary.currency
    );
    for charge in billing.charges(&user, None).await? {
        println!(
            "  {} {} {} {} -> {}",
            charge.key,
            charge.billing_tier,
            charge.amount,
            charge.status,
            charge.payment_id.as_deref().unwrap_or("-")
        );
    }
    if summary.total_charged != 50_000 {
        return Err(format!("expected 50000 collected, got {}", summary.total_charged).into());
    }
    Ok(())
}
