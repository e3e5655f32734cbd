//! The errors [`BillingService`](crate::BillingService) answers with.

use chrono::{DateTime, Utc};

use crate::domain::{
    CustomerId, EventId, IdError, LimitKind, MetadataError, PeriodKey, PlanError, PlanId, RatingError, UserId,
};
use crate::gateway::GatewayError;
use crate::store::StoreError;

/// Why a usage report was refused. Nothing of a refused report is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// An identifier (user, event, operation type, client) is empty, too long or has a bad
    /// character.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// Zero tokens: nothing to bill, and most likely a bug in the caller.
    #[error("tokens used must be at least 1")]
    ZeroTokens,
    /// More tokens in one event than the service accepts.
    #[error("{tokens} tokens in one event is more than the maximum of {max}")]
    TooManyTokens {
        /// The event's tokens.
        tokens: u64,
        /// The configured maximum.
        max: u64,
    },
    /// Metadata beyond Stripe's limits.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The event says it happened more than the allowed skew in the future.
    #[error("occurred_at {occurred_at} is in the future (now {now})")]
    InFuture {
        /// The event's instant.
        occurred_at: DateTime<Utc>,
        /// The service's now.
        now: DateTime<Utc>,
    },
    /// The event's period ended longer ago than the plan's grace window.
    #[error("usage for period {period} was accepted until {accepted_until}")]
    TooLate {
        /// The event's period.
        period: PeriodKey,
        /// The end of the grace window.
        accepted_until: DateTime<Utc>,
    },
    /// The report gave both `tokens_used` and token classes, and they disagree.
    #[error("tokens used ({tokens_used}) is not the sum of the token classes ({classes})")]
    TokensMismatch {
        /// The report's `tokens_used`.
        tokens_used: u64,
        /// The sum of its classes.
        classes: u64,
    },
    /// A provider's usage object contradicts itself (a part larger than its whole).
    #[error(transparent)]
    UsageObject(#[from] crate::domain::UsageObjectError),
    /// A hold's time to live is zero or longer than the service allows.
    #[error("a hold's time to live must be between 1 s and {max:?}, not {ttl:?}")]
    HoldTtl {
        /// The time to live asked for.
        ttl: std::time::Duration,
        /// The longest the service allows.
        max: std::time::Duration,
    },
}

/// Everything [`BillingService`](crate::BillingService) can answer with besides success.
///
/// Input errors ([`BillingError::InvalidUsage`], [`BillingError::EventConflict`],
/// [`BillingError::TotalOverflow`]) are the caller's and change nothing; store and gateway errors
/// carry their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BillingError {
    /// The usage report is invalid; nothing was recorded.
    #[error("invalid usage: {0}")]
    InvalidUsage(#[from] UsageError),
    /// An identifier passed to the service is invalid.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The event id was already used for different usage; nothing was recorded.
    #[error("event id {event_id} was already used for different usage")]
    EventConflict {
        /// The re-used event id.
        event_id: EventId,
    },
    /// The event id was recorded before, in a period whose events the store no longer keeps
    /// (bounded retention, [`InMemoryUsageStoreBuilder::periods_kept`](crate::InMemoryUsageStoreBuilder::periods_kept)):
    /// a re-send, not recorded again, whose original outcome can no longer be told. Nothing was
    /// recorded.
    #[error("event id {event_id} was recorded in {period}, whose events are no longer kept")]
    EventForgotten {
        /// The re-sent id.
        event_id: EventId,
        /// The period the original was recorded in.
        period: PeriodKey,
    },
    /// The event would take the period total above [`MAX_TOKENS`](crate::MAX_TOKENS); nothing was
    /// recorded.
    #[error("adding {tokens} tokens to a period total of {total} would overflow")]
    TotalOverflow {
        /// The period total.
        total: u64,
        /// The event's tokens.
        tokens: u64,
    },
    /// No plan with this id in the service's catalogue.
    #[error("unknown plan {plan_id}")]
    UnknownPlan {
        /// The plan id.
        plan_id: PlanId,
    },
    /// The user's account names a plan this service's catalogue does not have (a plan retired
    /// from it, or an account registered by a service with another catalogue): the service's
    /// configuration is at fault, not the request, which may succeed once the plan is back.
    #[error("the account of user {user_id} names plan {plan_id}, which is not in this service's catalogue")]
    AccountPlanMissing {
        /// The user.
        user_id: UserId,
        /// The plan the account names.
        plan_id: PlanId,
    },
    /// A plan is invalid.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A plan change would re-rate a period that already has usage or charges (its fixed fee
    /// collected ahead of usage, say); change plans between periods.
    #[error("user {user_id} already has usage or charges in {period} under another plan")]
    PlanChangeMidPeriod {
        /// The user.
        user_id: UserId,
        /// The period with usage or charges.
        period: PeriodKey,
    },
    /// A gateway subscription was asked for while the library collects the fixed fee
    /// ([`FeeCollection::Library`](crate::FeeCollection::Library)): both would collect it.
    #[error("the library collects the fixed fee: a subscription would collect it twice")]
    FeeCollectedByLibrary,
    /// The user's account pays with another gateway customer than the one named: changing who
    /// pays is a registration ([`BillingService::register_account`](crate::BillingService::register_account)),
    /// not a side effect of starting the fixed fee. Nothing was changed.
    #[error("user {user_id} pays with customer {current}, not {named}")]
    OtherCustomer {
        /// The user.
        user_id: UserId,
        /// The customer the account pays with.
        current: CustomerId,
        /// The customer the caller named.
        named: CustomerId,
    },
    /// The user has no gateway customer to charge.
    #[error("user {user_id} has no payment customer")]
    NoCustomer {
        /// The user.
        user_id: UserId,
    },
    /// A limit of the user's account refuses the usage (a reservation, or a report that asked
    /// for enforcement): nothing was recorded or held.
    #[error("{limit} reached: {remaining_tokens} more tokens allowed")]
    LimitExceeded {
        /// The limit that refuses.
        limit: LimitKind,
        /// How many more tokens the period allows now.
        remaining_tokens: u64,
    },
    /// No such charge.
    #[error("charge {key} not found")]
    ChargeNotFound {
        /// The charge key asked for.
        key: String,
    },
    /// The rating rule refused a total.
    #[error(transparent)]
    Rating(#[from] RatingError),
    /// The store failed.
    #[error("store error")]
    Store(#[source] StoreError),
    /// The payment gateway failed.
    #[error("payment gateway error")]
    Gateway(#[from] GatewayError),
}

impl From<StoreError> for BillingError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::EventConflict { event_id } => BillingError::EventConflict { event_id },
            StoreError::EventForgotten { event_id, period } => BillingError::EventForgotten { event_id, period },
            StoreError::TotalOverflow { total, tokens } => BillingError::TotalOverflow { total, tokens },
            StoreError::Rating(e) => BillingError::Rating(e),
            other => BillingError::Store(other),
        }
    }
}

impl BillingError {
    /// Whether the error is the caller's (bad input, unknown ids), as opposed to a failure of the
    /// store or gateway, or of the service's configuration ([`BillingError::AccountPlanMissing`]).
    /// An HTTP service answers the first with 4xx and the others with 5xx.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            BillingError::Store(_) | BillingError::Gateway(_) | BillingError::AccountPlanMissing { .. }
        )
    }
}
