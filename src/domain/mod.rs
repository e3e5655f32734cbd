//! The pure domain: money, plans, tiers, periods, charge keys and the rule that turns usage into
//! charges.
//!
//! Nothing in this module performs I/O, reads a clock or draws a random number: instants and ids
//! are always arguments. Every amount the library charges comes from a function here, which is
//! why the property tests can hammer them without any store or gateway.

mod charge;
mod ids;
mod metadata;
mod money;
mod period;
mod plan;
mod rating;
mod usage;

pub use charge::{Charge, ChargeStatus, FeeCollection, NewCharge, UnknownChargeStatus, charges_for_growth};
pub use ids::{ChargeKey, ChargeKind, ClientId, CustomerId, EventId, IdError, OperationType, PlanId, UserId};
pub(crate) use ids::{IdBytes, check_identifier, decimal};
pub use metadata::{Metadata, MetadataIter};
pub use money::{Currency, Money, MoneyError};
pub use period::{Period, PeriodError, PeriodKey};
pub use plan::{Plan, PlanBuilder, PlanError};
pub use rating::{Blocks, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, RatingError, Tier, TierLabel, calculate_billing_tier};
pub use usage::{MetadataError, UsageRecord, check_metadata, metadata_limits};
