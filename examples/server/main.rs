//! The reference HTTP service: the original product's API over the token-billing library.
//!
//! ```sh
//! TOKEN_BILLING_API_KEY=dev-key-0123456789 cargo run --example server
//! ```
//!
//! Configuration, from the environment:
//! - `TOKEN_BILLING_API_KEY` (required): the key of the host's backend, for writes and any read.
//!   At least 16 characters.
//! - `TOKEN_BILLING_JWT_SECRET`: the HS256 secret of user tokens (Supabase's JWT secret); a
//!   user's token reads that user's summary, reports and dashboard. Its `aud` must be
//!   `TOKEN_BILLING_JWT_AUDIENCE` (`authenticated`, as Supabase issues them; `*` for any).
//! - `TOKEN_BILLING_ADDR`: where to listen (`127.0.0.1:3000`).
//! - `RUST_LOG`: what to log, as `tracing-subscriber`'s `EnvFilter` directives (`info` by
//!   default; `info,token_billing=debug` adds one line per recorded event).
//! - `DATABASE_URL`: `sqlite://billing.db`, the SQLite store (feature `sqlite`), or
//!   `postgres://...`, the PostgreSQL store (feature `postgres`); else the in-memory store.
//! - `STRIPE_SECRET_KEY`, `STRIPE_API_BASE`, `STRIPE_WEBHOOK_SECRET`: the Stripe gateway
//!   (feature `stripe`); else the sandbox gateway, which opens a customer for every new user,
//!   takes any customer id it is named (create-subscription's `customerId`) as a customer, and
//!   whose payments always succeed.
//! - `TOKEN_BILLING_GATEWAY`: `stripe` (which needs `STRIPE_SECRET_KEY`) or `sandbox` (which
//!   refuses it). With `DATABASE_URL` and no `STRIPE_SECRET_KEY` the service refuses to start
//!   unless it is `sandbox`: the durable store would keep the sandbox's charges as paid though
//!   no money moved.
//! - `TOKEN_BILLING_STORE`: `memory` (which refuses `DATABASE_URL`). With `STRIPE_SECRET_KEY`
//!   and no `DATABASE_URL` the service refuses to start unless it is `memory`: a restart then
//!   forgets every total and charge, so later usage is rated from zero (under-billed) and the
//!   period's fixed fee is charged again with the same key, which only the gateway's 24-hour
//!   idempotency window keeps from being paid twice. The service logs that at `warn`.
//! - `TOKEN_BILLING_ALERT_WEBHOOK_URL`, `TOKEN_BILLING_ALERT_WEBHOOK_SECRET`: where threshold
//!   alerts (80% and 100% of the allowance, each block, 90% of the cap, the cap, the payment
//!   gate) are POSTed, signed with HMAC-SHA256 (`TokenBilling-Signature: t=...,v1=...`), with
//!   retries; without them alerts are kept for the dashboard only.
//! - `TOKEN_BILLING_PLANS`: a file of the plan catalogue (TOML, or JSON when it ends in `.json`:
//!   the library's serialised form of plans, rate cards included, under their ids; `default`
//!   rates users without an account). `examples/plans.toml` is an example.
//! - `TOKEN_BILLING_FEE_COLLECTION`: `library` (default: the fee is charged with the first
//!   usage of the month, or by create-subscription, which opens the month) or `subscription`
//!   (create-subscription makes a gateway subscription, which collects it). The startup log and
//!   `GET /` say which.
//!
//! Every minute it resumes charges left pending; every hour it retries declined ones.

mod alerts;
mod app;
mod auth;
mod config;
mod openapi;
mod plans;
mod prometheus;
mod spend;
mod usage;

use std::time::Duration;

use token_billing::BillingService;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // RUST_LOG takes the usual directives (`info`, `info,token_billing=debug`); `info` when
    // unset. One that does not parse stops the service rather than log less than was asked.
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => EnvFilter::try_new(&directives).map_err(|e| format!("RUST_LOG={directives}: {e}"))?,
        Err(_) => EnvFilter::new("info"),
    };
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let configured = config::configure(|name| std::env::var(name).ok()).await?;
    info!("{}", configured.description);
    for warning in &configured.warnings {
        warn!("{warning}");
    }
    for (method, path) in app::routes() {
        tracing::debug!(%method, %path, "route");
    }
    if let Some(webhook) = configured.alert_webhook {
        alerts::spawn_delivery(configured.billing.clone(), webhook);
    }
    spawn_jobs(configured.billing);
    let listener = tokio::net::TcpListener::bind(&configured.addr).await?;
    info!(address = %listener.local_addr()?, "listening");
    axum::serve(listener, app::app(configured.state))
        .with_graceful_shutdown(shutdown())
        .await?;
    info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or `SIGTERM` (what a container's orchestrator sends): requests in flight
/// are answered, no new one is taken. A job stopped mid-way leaves its charges leased, and the
/// next instance's `resume_pending` takes them once the lease expires.
async fn shutdown() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    info!("shutting down");
}

/// The two jobs a host runs: `resume_pending` every minute, `retry_failed` every hour.
fn spawn_jobs(billing: BillingService) {
    every(
        Duration::from_secs(60),
        "resume_pending",
        billing.clone(),
        |b| async move { b.resume_pending().await },
    );
    every(Duration::from_secs(3600), "retry_failed", billing, |b| async move {
        b.retry_failed().await
    });
}

/// Runs `job` every `period`, logging its failures. A run that overruns its period delays the
/// next one rather than being followed by a burst of catch-up runs.
fn every<F, Fut>(period: Duration, name: &'static str, billing: BillingService, job: F)
where
    F: Fn(BillingService) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<token_billing::CollectionReport, token_billing::BillingError>> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = job(billing.clone()).await {
                error!(job = name, error = %e, "background job failed");
            }
        }
    });
}
