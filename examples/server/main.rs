//! The reference HTTP service: the original product's API over the token-billing library.
//!
//! ```sh
//! TOKEN_BILLING_API_KEY=dev-key cargo run --example server
//! ```
//!
//! Configuration, from the environment:
//! - `TOKEN_BILLING_API_KEY` (required): the key of the host's backend, for writes and any read.
//! - `TOKEN_BILLING_JWT_SECRET`: the HS256 secret of user tokens (Supabase's JWT secret); a
//!   user's token reads that user's summary, reports and dashboard. `TOKEN_BILLING_JWT_AUDIENCE`
//!   makes the `aud` claim required (Supabase: `authenticated`).
//! - `TOKEN_BILLING_ADDR`: where to listen (`127.0.0.1:3000`).
//! - `DATABASE_URL`: the PostgreSQL store (feature `postgres`); else the in-memory store.
//! - `STRIPE_SECRET_KEY`, `STRIPE_API_BASE`, `STRIPE_WEBHOOK_SECRET`: the Stripe gateway
//!   (feature `stripe`); else the sandbox gateway, which opens a customer for every new user.
//! - `TOKEN_BILLING_FEE_COLLECTION`: `library` (default: the fee is charged with the first
//!   usage of the month) or `subscription` (a Stripe subscription collects it).
//!
//! Every minute it resumes charges left pending; every hour it retries declined ones.

mod app;
mod auth;
mod config;
mod openapi;

use std::time::Duration;

use token_billing::BillingService;
use tracing::{error, info};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let level = match std::env::var("RUST_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt().with_max_level(level).init();

    let configured = config::configure(|name| std::env::var(name).ok()).await?;
    info!("{}", configured.description);
    for (method, path) in app::routes() {
        tracing::debug!(%method, %path, "route");
    }
    spawn_jobs(configured.billing);
    let listener = tokio::net::TcpListener::bind(&configured.addr).await?;
    info!(address = %listener.local_addr()?, "listening");
    axum::serve(listener, app::app(configured.state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            info!("shutting down");
        })
        .await?;
    Ok(())
}

/// The two jobs a host runs: `resume_pending` every minute, `retry_failed` every hour.
fn spawn_jobs(billing: BillingService) {
    let resumer = billing.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            if let Err(e) = resumer.resume_pending().await {
                error!(error = %e, "resume_pending failed");
            }
        }
    });
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            if let Err(e) = billing.retry_failed().await {
                error!(error = %e, "retry_failed failed");
            }
        }
    });
}
