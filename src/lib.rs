//! Usage-based billing of LLM tokens, embedded in your Rust service.
//!
//! Report each user's token usage; the library records it, charges a fixed monthly fee that
//! covers an included allowance, charges a block price the moment a user starts each new block of
//! tokens beyond it, never charges anything twice, and answers per-user summaries.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use token_billing::{BillingService, ChargeStatus, UsageReport, UserId};
//!
//! // The original product's plan (BRL 400.00 covering 8M tokens, BRL 100.00 per started 8M block) on the
//! // in-memory store and the sandbox gateway.
//! let billing = BillingService::embedded();
//!
//! let outcome = billing
//!     .process_token_usage(UsageReport::new("test-user-id", 10_000_000, "chat").event_id("req-1"))
//!     .await?;
//! assert_eq!(outcome.tier_charges.len(), 1);
//! assert_eq!(outcome.tier_charges[0].billing_tier, "8M-16M");
//! assert_eq!(outcome.tier_charges[0].amount_charged, 10000); // centavos
//! assert_eq!(outcome.tier_charges[0].status, ChargeStatus::Succeeded);
//!
//! // A retry of the same event changes nothing and answers the original outcome.
//! let retry = billing
//!     .process_token_usage(UsageReport::new("test-user-id", 10_000_000, "chat").event_id("req-1"))
//!     .await?;
//! assert!(retry.replayed);
//! assert_eq!(retry.consumption_id, outcome.consumption_id);
//!
//! let summary = billing.token_summary(&UserId::new("test-user-id")?, None).await?;
//! assert_eq!(summary.total_charged, 50000); // the fixed fee and one block
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Shape
//! - [`domain`]: pure and synchronous: [`Money`], [`Currency`], [`Plan`], [`Tier`], [`Period`],
//!   the rating rule and [`ChargeKey`]s. No I/O, no clock, no randomness.
//! - [`BillingService`]: the only place that sequences the store and the gateway.
//! - [`store`]: the [`UsageStore`] trait, [`InMemoryUsageStore`], `SqliteUsageStore` (feature
//!   `sqlite`) and `PostgresUsageStore` (feature `postgres`).
//! - [`gateway`]: the [`PaymentGateway`] trait, [`SandboxGateway`], and `StripeGateway`
//!   (feature `stripe`); [`GatewayEvent`]s for what gateways report later (webhooks).
//! - [`clock`]: [`Clock`], [`SystemClock`] and [`ManualClock`].
//! - `testing` (feature `testing`): the conformance suites and fault-injecting wrappers.
//!
//! # The charge protocol
//! Recording is one atomic store operation: dedupe the event id, append the consumption, add the
//! tokens to the period total, and create a pending charge for every block the new total
//! started, each under a unique key. Collection happens outside that operation, with the
//! charge's deterministic idempotency key, and its outcome is stored by a compare-and-set on the
//! charge's status. A crash anywhere leaves a pending charge that
//! [`BillingService::resume_pending`] collects later, after looking up any payment already made
//! for it, so that nothing is paid twice.
//!
//! # Features
//! - `sqlite`: `SqliteUsageStore`, durable in one file, with the PostgreSQL store's tables.
//! - `postgres`: `PostgresUsageStore`, with the original product's tables and SQL functions.
//! - `stripe`: `StripeGateway` (PaymentIntents, subscriptions, signed webhooks), on hyper and
//!   rustls.
//! - `testing`: the conformance suites for `UsageStore` and `PaymentGateway` implementations,
//!   and wrappers that inject faults.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod domain;
mod error;
pub mod gateway;
mod random;
mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use clock::{Clock, ManualClock, SystemClock};
pub use domain::*;
pub use error::{BillingError, UsageError};
pub use gateway::{
    CardBehaviour, GatewayChange, GatewayError, GatewayEvent, PaymentGateway, PaymentOutcome, PaymentRequest,
    PaymentStatus, PaymentUpdate, SandboxGateway, SandboxPayment, Subscription,
};
pub use service::{
    AccountStanding, BillingService, BillingServiceBuilder, CollectionMode, CollectionReport, DunningSchedule,
    HoldGrant, Reservation, SettledHold, Standing, TierCharge, TokenSummary, UnregisteredUsers, UsageCheck,
    UsageOutcome, UsageReport, describe_metrics,
};
#[cfg(feature = "postgres")]
pub use store::PostgresUsageStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteUsageStore;
pub use store::{
    Account, Alert, AuditEntry, AuditEvent, EventRetention, GatewayEventRecord, Hold, InMemoryUsageStore,
    InMemoryUsageStoreBuilder, ModelUsage, OperationUsage, PeriodSummary, SpendState, StoreError, TierChargeReport,
    UsageStore,
};

/// The README's examples, compiled and run as doc tests (they use every feature).
#[cfg(all(doctest, feature = "postgres", feature = "sqlite", feature = "stripe"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
