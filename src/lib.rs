//! Usage-based billing of LLM tokens.
#![forbid(unsafe_code)]

pub mod clock;
pub mod domain;
mod error;
pub mod gateway;
mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use clock::{Clock, ManualClock, SystemClock};
pub use domain::*;
pub use error::{BillingError, UsageError};
pub use gateway::{
    CardBehaviour, GatewayError, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus, SandboxGateway,
    SandboxPayment, Subscription,
};
pub use service::{
    AccountStanding, BillingService, BillingServiceBuilder, CollectionMode, CollectionReport, DunningSchedule,
    PaymentUpdate, Standing, TierCharge, TokenSummary, UnregisteredUsers, UsageOutcome, UsageReport,
};
pub use store::{
    Account, AuditEntry, AuditEvent, InMemoryUsageStore, OperationUsage, PeriodSummary, StoreError, TierChargeReport,
    UsageStore,
};
