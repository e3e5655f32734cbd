//! Where usage, charges and accounts are kept: the [`UsageStore`] trait and its implementations.
//!
//! [`InMemoryUsageStore`] is always built. Every implementation must pass the conformance suite in
//! `token_billing::testing::store` (feature `testing`), which turns the contract below into tests.

mod alerts;
mod claims;
mod holds;
mod id_map;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod records;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt::Debug;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    Charge, ChargeKey, ChargeStatus, EventId, FeeCollection, IdBytes, NewCharge, PeriodKey, Plan, RatingError,
    UsageRecord, UserId,
};

pub use alerts::{Alert, Alerting};
pub use holds::{Hold, HoldDecision, HoldRequest, SpendState};

pub use memory::{EventRetention, InMemoryUsageStore, InMemoryUsageStoreBuilder};
#[cfg(feature = "postgres")]
pub use postgres::{MIGRATIONS, PostgresUsageStore};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) use records::CLASS_COLUMNS;
#[cfg(feature = "postgres")]
pub(crate) use records::SummaryDelta;
pub use records::{Account, AuditEntry, AuditEvent, ModelUsage, OperationUsage, PeriodSummary, TierChargeReport};
#[cfg(feature = "sqlite")]
pub use sqlite::{SQLITE_MIGRATIONS, SqliteUsageStore};

/// Which of `shards` shards keeps `user`'s data: a hash of the id's bytes, cheaper than of its
/// text (which is checked for UTF-8 when read as a `&str`).
pub(crate) fn shard_index(hasher: &foldhash::fast::RandomState, user: &UserId, shards: usize) -> usize {
    use std::hash::BuildHasher;
    let hash = hasher.hash_one(user.id_bytes());
    // The remainder is below the shard count, which is a usize.
    usize::try_from(hash % shards as u64).unwrap_or(0)
}

/// A boxed error from a store's backend, kept as the source of [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An event id was re-used with different usage; nothing was recorded.
    #[error("event id {event_id} was already used for different usage")]
    EventConflict {
        /// The re-used id.
        event_id: EventId,
    },
    /// The event id was recorded before, in a period whose events the store no longer keeps
    /// (bounded retention): it is not recorded again, and its original outcome can no longer be
    /// told. Nothing was recorded.
    #[error("event id {event_id} was recorded in {period}, whose events are no longer kept")]
    EventForgotten {
        /// The re-sent id.
        event_id: EventId,
        /// The period the original was recorded in.
        period: PeriodKey,
    },
    /// Adding the event would take the period total above [`MAX_TOKENS`](crate::MAX_TOKENS);
    /// nothing was recorded.
    #[error("adding {tokens} tokens to a period total of {total} would overflow")]
    TotalOverflow {
        /// The period total before the event.
        total: u64,
        /// The event's tokens.
        tokens: u64,
    },
    /// The account an event was placed with is no longer the stored one (another instance
    /// changed it since this one read it): nothing was recorded, and the event is given back
    /// to be placed again with the account as it is now.
    #[error("the account of user {} changed while its event was being recorded", usage.user_id)]
    AccountChanged {
        /// The event, unrecorded.
        usage: Box<UsageRecord>,
    },
    /// A compare-and-set lost: the charge is not in the expected status or round any more.
    #[error("charge {} is {} in round {}, not as expected", charge.key, charge.status, charge.round)]
    StatusConflict {
        /// The charge as it is now.
        charge: Box<Charge>,
    },
    /// A status change the charge life cycle forbids ([`ChargeStatus::can_become`]).
    #[error("a charge cannot go from {from} to {to}")]
    ForbiddenTransition {
        /// The current status.
        from: ChargeStatus,
        /// The requested status.
        to: ChargeStatus,
    },
    /// The thing asked for does not exist.
    #[error("{what} {key} not found")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Its key.
        key: String,
    },
    /// The rating rule refused the totals.
    #[error(transparent)]
    Rating(#[from] RatingError),
    /// The store could not be reached or timed out; the operation may be retried. Whether a write
    /// was applied is unknown, which every write here tolerates: they are idempotent.
    #[error("{store} unavailable")]
    Unavailable {
        /// Which store.
        store: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{store} failed")]
    Generic {
        /// Which store.
        store: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

/// The record operation's input: one checked usage event and how to charge for it.
#[derive(Debug, Clone)]
pub struct RecordUsage<'a> {
    /// The event, already checked by the service.
    pub usage: UsageRecord,
    /// The plan that rates the user's period.
    pub plan: &'a Plan,
    /// Who collects the fixed fee.
    pub fee: FeeCollection,
    /// When set, the charges created are leased to the caller until then (it collects them at
    /// once), and each counts one collection attempt.
    pub lease_until: Option<DateTime<Utc>>,
    /// The alerts to create when the event crosses their thresholds, in the same atomic step.
    pub alerting: Option<Alerting<'a>>,
    /// The account the event was placed with (its plan and collection follow from it), when
    /// it came from [`UsageStore::account_for_usage`]. A store whose `account_for_usage` may
    /// answer from a cache MUST refuse the record with [`StoreError::AccountChanged`], writing
    /// nothing, when the stored account is no longer this one; a store that always reads the
    /// account afresh may ignore it.
    pub account: Option<&'a Account>,
}

/// How an event is to be recorded, decided by the service from the account the store holds for
/// its user: what [`UsageStore::place_and_record_usage`] records it with.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'p> {
    /// The plan that rates the event's period.
    pub plan: &'p Plan,
    /// Who collects the fixed fee.
    pub fee: FeeCollection,
    /// When set, the charges created are leased to the caller until then (it collects them at
    /// once), as in [`RecordUsage::lease_until`].
    pub lease_until: Option<DateTime<Utc>>,
    /// The alerts to create, as in [`RecordUsage::alerting`].
    pub alerting: Option<Alerting<'p>>,
}

/// The service's placing of an event, called by [`UsageStore::place_and_record_usage`] with the
/// event and its user's account (`None` for a user without one): it sets the event's period and
/// answers how to record it, or `None` to refuse it. It is quick and never waits, so a store may
/// call it while it holds the user's data.
pub type Placer<'a, 'p> = dyn FnMut(&mut UsageRecord, Option<&Account>) -> Option<Placement<'p>> + Send + 'a;

/// The service's choice, from a user's account (`None` for a user without one), of the period
/// whose spend state [`UsageStore::locate_spend_state`] reads, with the payment gate's cut-off;
/// `None` to read nothing. Quick and never waits, as a [`Placer`].
pub type SpendLocator<'a> = dyn FnMut(Option<&Account>) -> Option<(PeriodKey, Option<DateTime<Utc>>)> + Send + 'a;

/// What [`UsageStore::place_and_record_usage`] did.
#[derive(Debug)]
pub enum PlacedUsage<'p> {
    /// The event was placed and recorded (or answered as a re-send, see [`Recorded::replayed`]).
    Recorded {
        /// What the record operation did.
        recorded: Recorded,
        /// How it was placed.
        placement: Placement<'p>,
        /// The account it was placed with, when the event created or replayed charges (they are
        /// collected from its customer); `None` otherwise, or when the user has no account.
        /// Boxed, so that the answer for most events stays small.
        account: Option<Box<Account>>,
    },
    /// The placer refused the event: nothing was recorded.
    Refused {
        /// The event, given back as the placer left it.
        usage: Box<UsageRecord>,
        /// The account it was refused with (read afresh).
        account: Option<Box<Account>>,
    },
}

/// What the record operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The event as stored; for a replay, the original. Shared with the store that keeps it,
    /// so that recording never copies an event.
    pub usage: Arc<UsageRecord>,
    /// The period total before the event.
    pub total_before: u64,
    /// The period total after the event.
    pub total_after: u64,
    /// The charges the event created, in block order (fixed fee first); for a replay, the
    /// original's charges as they are now.
    pub charges: Vec<Charge>,
    /// Whether the event id had been recorded already, so that nothing changed.
    pub replayed: bool,
}

impl Recorded {
    /// How every store answers a re-send of an event it has recorded: the original outcome when
    /// `usage` reports the same usage ([`UsageRecord::same_usage`]), and
    /// [`StoreError::EventConflict`] when it reports something else under the same event id.
    pub(crate) fn answer_resend(self, usage: &UsageRecord) -> Result<Recorded, StoreError> {
        if self.usage.same_usage(usage) {
            Ok(self)
        } else {
            Err(StoreError::EventConflict {
                event_id: usage.event_id.clone(),
            })
        }
    }
}

/// A charge to create unless its key exists: the fixed fee when a period is opened, or recorded
/// as paid by a subscription.
#[derive(Debug, Clone)]
pub struct EnsureCharge {
    /// The charge.
    pub charge: NewCharge,
    /// Its status if created: `Pending` to collect it, `Succeeded` when it was paid elsewhere.
    pub status: ChargeStatus,
    /// The payment reference, for a charge paid elsewhere.
    pub payment_id: Option<String>,
    /// Now.
    pub now: DateTime<Utc>,
    /// When set, a created charge is leased to the caller until then.
    pub lease_until: Option<DateTime<Utc>>,
    /// The plan that rates the charge's period, when known. A store that keeps a period's rating
    /// with it (the PostgreSQL store's summary row, whose allowance and block size the original
    /// product's SQL functions read and check) records it when this charge opens the period.
    pub plan: Option<Plan>,
}

/// A gateway event to remember, so that it is acted on once, with the audit entry that records
/// it: an event applied ([`AuditEvent::GatewayEventApplied`]), or a duplicate payment reported
/// ([`AuditEvent::DuplicatePayment`], under the id `duplicate-payment:{payment}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEventRecord {
    /// The user it is about.
    pub user_id: UserId,
    /// The id remembered: the gateway's event id.
    pub event_id: String,
    /// The gateway's event type (`payment_intent.succeeded`).
    pub event_type: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The period of the audit entry, when it is about one.
    pub period: Option<PeriodKey>,
    /// The audit entry appended with the record, in the same atomic step.
    pub audit: AuditEvent,
}

impl GatewayEventRecord {
    /// The record of a gateway event applied.
    pub fn applied(user_id: UserId, event_id: String, event_type: String, at: DateTime<Utc>) -> GatewayEventRecord {
        GatewayEventRecord {
            audit: AuditEvent::GatewayEventApplied {
                event_id: event_id.clone(),
                event_type: event_type.clone(),
            },
            user_id,
            event_id,
            event_type,
            at,
            period: None,
        }
    }
}

/// A compare-and-set of a charge's status.
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    /// The charge's user.
    pub user_id: &'a UserId,
    /// The charge.
    pub key: &'a ChargeKey,
    /// The status the caller saw.
    pub expected_status: ChargeStatus,
    /// The round the caller saw.
    pub expected_round: u32,
    /// The new status.
    pub status: ChargeStatus,
    /// The gateway's payment reference, kept if `None`.
    pub payment_id: Option<String>,
    /// The decline code (replaces the stored one; cleared on success).
    pub failure_code: Option<String>,
    /// The gateway's failure message (replaces the stored one; cleared on success).
    pub failure_message: Option<String>,
    /// When to retry a failure.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// The lease to leave on the charge: `None` releases it; a charge left pending (a payment
    /// still processing) keeps it until the time to check again.
    pub lease_until: Option<DateTime<Utc>>,
    /// Now.
    pub at: DateTime<Utc>,
}

impl<'a> Settlement<'a> {
    /// A compare-and-set of `charge`, as the caller saw it, to `status` at `at`: nothing else
    /// changes and the lease is released. Set the other fields with struct update syntax.
    ///
    /// # Example
    /// ```
    /// # fn demo(charge: &token_billing::Charge) {
    /// use token_billing::ChargeStatus;
    /// use token_billing::store::Settlement;
    ///
    /// let paid = Settlement {
    ///     payment_id: Some("pi_123".to_owned()),
    ///     ..Settlement::of(charge, ChargeStatus::Succeeded, chrono::Utc::now())
    /// };
    /// # let _ = paid; }
    /// ```
    pub fn of(charge: &'a Charge, status: ChargeStatus, at: DateTime<Utc>) -> Settlement<'a> {
        Settlement {
            user_id: &charge.user_id,
            key: &charge.key,
            expected_status: charge.status,
            expected_round: charge.round,
            status,
            payment_id: None,
            failure_code: None,
            failure_message: None,
            next_retry_at: None,
            lease_until: None,
            at,
        }
    }

    /// Moves the settlement into `charge` (whose status and round the caller has checked): the
    /// status, the payment reference (kept when `None`), the failure (cleared on success,
    /// kept when the settlement names none), the retry time of a failure, the lease and the
    /// time.
    pub(crate) fn apply_to(self, charge: &mut Charge) {
        charge.status = self.status;
        if self.payment_id.is_some() {
            charge.payment_id = self.payment_id;
        }
        if self.status == ChargeStatus::Succeeded {
            charge.failure_code = None;
            charge.failure_message = None;
        } else if self.failure_code.is_some() || self.failure_message.is_some() {
            charge.failure_code = self.failure_code;
            charge.failure_message = self.failure_message;
        }
        charge.next_retry_at = if self.status == ChargeStatus::Failed {
            self.next_retry_at
        } else {
            None
        };
        charge.lease_until = self.lease_until;
        charge.updated_at = self.at;
    }
}

/// Stores usage, charges, summaries, accounts and the audit trail.
///
/// # Contract
/// Every implementation MUST meet these; the conformance suite (`testing::store`) checks each.
///
/// Recording ([`record_usage`](Self::record_usage)):
/// - It MUST be atomic: dedupe the event id, append the consumption, add its tokens to the period
///   total, create a `Pending` charge for every charge [`charges_for_growth`](crate::charges_for_growth)
///   gives for the interval `(before, after]`, update the period summary and append the audit
///   entries, all or nothing. After an error nothing of the event is visible.
/// - Concurrent calls for the same user and period MUST see disjoint intervals: the increment is
///   atomic, so no block is created twice and none is skipped.
/// - A charge key MUST be unique: a second charge with the same key can never be stored.
/// - An event id already recorded for the user MUST change nothing and return the original
///   outcome with `replayed = true` when the usage is the same ([`UsageRecord::same_usage`]), and
///   MUST fail with [`StoreError::EventConflict`] when it differs. A store MAY forget events
///   whose id only stands in for the host's ([`UsageRecord::has_host_event_id`] is false): the
///   service draws a new consumption id, hence a new id, for every such call, so none is ever
///   sent again.
/// - An event id the store ever accepted for the user MUST NOT be recorded again, however long
///   ago: an event sent without `occurred_at` is placed when it arrives, so a re-send can come
///   in any later period. A store that forgets the details of old events (to bound its memory)
///   MUST still remember their ids, and refuse a re-send of one with
///   [`StoreError::EventForgotten`], changing nothing.
/// - A total that would exceed [`MAX_TOKENS`](crate::MAX_TOKENS) MUST fail with
///   [`StoreError::TotalOverflow`] and change nothing.
/// - The period total MUST move by the event's billable tokens ([`UsageRecord::billable`]), not
///   its `tokens`, kept exactly: the summary's `total_tokens` is the exact sum rounded up to a
///   whole token and `billable_credit_micros` what the rounding added, both moved by
///   [`BillableTotal::plus`](crate::BillableTotal::plus). The event's detail (model, classes,
///   billable tokens) MUST read back as recorded, and a replay MUST answer the totals the event
///   really moved. [`usage_by_model`](Self::usage_by_model) MUST count every event in one row.
/// - [`place_and_record_usage`](Self::place_and_record_usage) MUST record an event as
///   `record_usage` does, placed with the user's account as stored (a kept copy only if the
///   record checks it, as [`RecordUsage::account`] says); it MUST record nothing of an event
///   the placer refuses, and answer the account it placed the event with whenever the event
///   created or replayed charges.
///
/// Charges:
/// - [`settle_charge`](Self::settle_charge) MUST be a compare-and-set on (status, round): it
///   fails with [`StoreError::StatusConflict`] when either differs, and with
///   [`StoreError::ForbiddenTransition`] when [`ChargeStatus::can_become`] forbids the change. It
///   sets the lease to `settlement.lease_until`.
/// - [`claim_pending`](Self::claim_pending), [`claim_due_retries`](Self::claim_due_retries) and
///   [`claim_awaiting_customer`](Self::claim_awaiting_customer) MUST hand a charge to one caller
///   at a time: they take only charges whose lease has expired (or that have none) and lease
///   them in the same atomic step, so two concurrent claims never return the same charge, and
///   two concurrent retry claims never start two rounds of one charge.
/// - [`renew_lease`](Self::renew_lease) MUST be a compare-and-set on the lease.
/// - Summaries MUST always agree with the charges: `fixed_fee_charged` and `tier_charges_*` sum
///   the succeeded fixed-fee and block charges, `outstanding_*` the others.
///
/// Accounts: [`replace_account`](Self::replace_account) MUST be a compare-and-set on the whole
/// account, atomic with the store's other writes of it, so that two callers changing one account
/// (a registration and a customer opened for the user's charges, two instances) never lose
/// either change. The default reads and then writes: it is atomic only for a store whose calls
/// never wait between the two (a map in the process's memory); any other store overrides it.
///
/// Gateway events: [`record_gateway_event`](Self::record_gateway_event) MUST record an event id
/// once per user, append the record's audit entry in the same atomic step only when the id is
/// new, and report whether it was; [`gateway_event_applied`](Self::gateway_event_applied) MUST
/// then find it.
///
/// Spend control ([`reserve`](Self::reserve)):
/// - A hold MUST be granted in one atomic step with the period's usage: only when the period's
///   recorded tokens, its holds that have not expired (a hold of the same id aside) and the
///   request's tokens are within [`HoldRequest::ceiling`] ([`SpendState::headroom`]). Concurrent
///   reserves and records of one user MUST see each other, so that granted holds and recorded
///   usage never pass the ceiling together, on any number of instances.
/// - A hold expired at `now` MUST NOT count, without anyone releasing it.
/// - A reserve with the id of an open hold MUST change nothing and answer it (`replayed`) when
///   the tokens are the same, and fail with [`StoreError::EventConflict`] when they differ; a
///   reserve with the id of a recorded event MUST answer [`HoldDecision::Settled`].
/// - Recording an event MUST free the hold of its period whose id is the event's id, in the
///   same atomic step (a replay of the event frees it too).
/// - With no limit in the ceiling, a reserve past [`MAX_TOKENS`](crate::MAX_TOKENS) fails with
///   [`StoreError::TotalOverflow`].
///
/// Alerts:
/// - Recording an event with [`RecordUsage::alerting`] MUST create, in the same atomic step, an
///   [`Alert`] for each kind [`AlertPolicy::crossed`](crate::AlertPolicy::crossed) gives for its
///   interval `(before, after]`, and none other; at most one per (user, period, kind), whatever
///   the concurrency ([`raise_alert`](Self::raise_alert) included).
/// - [`pending_alerts`](Self::pending_alerts) MUST answer every alert not acknowledged, oldest
///   first, with the id it was created with; [`ack_alert`](Self::ack_alert) removes one from
///   them.
///
/// Isolation: every operation touches one user's data only, and reads return only the named
/// user's rows.
///
/// Implementations MUST NOT hold a lock across an `.await`, and SHOULD let unrelated users
/// proceed in parallel.
#[async_trait]
pub trait UsageStore: Send + Sync + Debug {
    /// Saves an account (insert or replace), with an audit entry.
    async fn put_account(&self, account: Account) -> Result<(), StoreError>;

    /// Saves `account` (as [`put_account`](Self::put_account) does) only if the user's account
    /// is still `expected` (none, for `None`), and answers whether it did; nothing is written
    /// when it is not. The service changes accounts through this, reading the account again and
    /// redoing its change when another caller changed it first.
    ///
    /// The default reads the account and then saves, which is atomic only where the two calls
    /// never wait (see the contract); a store reached over a connection overrides it with one
    /// atomic step, as both stores of this crate do.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::testing::store::fresh_user;
    /// use token_billing::{Account, CustomerId, InMemoryUsageStore, PlanId, UsageStore};
    ///
    /// let store = InMemoryUsageStore::new();
    /// let user = fresh_user("replaced");
    /// let now = chrono::Utc::now();
    /// let first = Account {
    ///     user_id: user.clone(),
    ///     customer_id: None,
    ///     plan_id: PlanId::new("default")?,
    ///     earlier_plans: Vec::new(),
    ///     subscription_id: None,
    ///     limits: None,
    ///     created_at: now,
    ///     updated_at: now,
    /// };
    /// assert!(store.replace_account(None, first.clone()).await?);
    /// // Another caller read no account: its write would lose this one, and is refused.
    /// assert!(!store.replace_account(None, first.clone()).await?);
    /// let paying = Account { customer_id: Some(CustomerId::new("cus_1")?), ..first.clone() };
    /// assert!(store.replace_account(Some(&first), paying.clone()).await?);
    /// assert_eq!(store.account(&user).await?, Some(paying));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        if self.account(&account.user_id).await?.as_ref() != expected {
            return Ok(false);
        }
        self.put_account(account).await?;
        Ok(true)
    }

    /// The user's account, if registered.
    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError>;

    /// The account to place a new usage event with, passed back in [`RecordUsage::account`]. A
    /// store MAY answer it from a cache (the PostgreSQL store does, saving a round trip per
    /// event) if its `record_usage` then refuses a record placed with an account that changed
    /// since ([`StoreError::AccountChanged`]). The default reads [`account`](Self::account).
    async fn account_for_usage(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        self.account(user).await
    }

    /// Records one usage event atomically; see the contract.
    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError>;

    /// Places one usage event with the account the store holds for its user, then records it as
    /// [`record_usage`](Self::record_usage) does: the service's path for every event. `place`
    /// decides from the event and the account how to record it, or refuses it; a refused event
    /// records nothing and is given back.
    ///
    /// The default reads the account with [`account_for_usage`](Self::account_for_usage), places
    /// the event and calls `record_usage`. Since that account may come from a cache, it reads
    /// the account afresh with [`account`](Self::account) and places the event again before it
    /// answers a refusal, and when the record is refused with [`StoreError::AccountChanged`] (at
    /// most twice), so that no event is refused or recorded by an account that changed. A store that keeps a user's account beside the rest of the
    /// user's data may place and record in one step, with the account as it is then (the
    /// in-memory store does: one look-up of the user, no copy of the account, one call).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::store::{Placement, PlacedUsage};
    /// use token_billing::testing::store::{fresh_user, usage_event};
    /// use token_billing::{FeeCollection, InMemoryUsageStore, Plan, UsageStore};
    ///
    /// let store = InMemoryUsageStore::new();
    /// let plan = Plan::default();
    /// let user = fresh_user("placed");
    /// let event = usage_event(&user, 9_000_000, "chat", "2026-11".parse()?);
    /// let placed = store
    ///     .place_and_record_usage(event, &mut |_event, account| {
    ///         // A user without an account is rated on the default plan.
    ///         assert!(account.is_none());
    ///         Some(Placement { plan: &plan, fee: FeeCollection::Library, lease_until: None, alerting: None })
    ///     })
    ///     .await?;
    /// let PlacedUsage::Recorded { recorded, .. } = placed else { panic!("recorded") };
    /// assert_eq!((recorded.total_after, recorded.charges.len()), (9_000_000, 2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    async fn place_and_record_usage<'p>(
        &self,
        mut usage: UsageRecord,
        place: &mut Placer<'_, 'p>,
    ) -> Result<PlacedUsage<'p>, StoreError> {
        let mut account = self.account_for_usage(&usage.user_id).await?;
        let mut fresh = false;
        // Re-placings after `AccountChanged`, counted apart from the one before a refusal.
        let mut changes = 0;
        loop {
            let Some(placement) = place(&mut usage, account.as_ref()) else {
                if fresh {
                    return Ok(PlacedUsage::Refused {
                        usage: Box::new(usage),
                        account: account.map(Box::new),
                    });
                }
                account = self.account(&usage.user_id).await?;
                fresh = true;
                continue;
            };
            let request = RecordUsage {
                usage,
                plan: placement.plan,
                fee: placement.fee,
                lease_until: placement.lease_until,
                alerting: placement.alerting,
                account: account.as_ref(),
            };
            match self.record_usage(request).await {
                Ok(recorded) => {
                    return Ok(PlacedUsage::Recorded {
                        account: account.filter(|_| !recorded.charges.is_empty()).map(Box::new),
                        recorded,
                        placement,
                    });
                }
                Err(StoreError::AccountChanged { usage: unrecorded }) if changes < 2 => {
                    changes += 1;
                    tracing::debug!("the account changed since it was read: placing the event again");
                    usage = *unrecorded;
                    account = self.account(&usage.user_id).await?;
                    fresh = true;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Records several usage events, in order, as [`record_usage`](Self::record_usage) would
    /// one after the other: each event sees the totals the ones before it left, and every clause
    /// of the contract holds for each. The results come in the order of `requests`; an event
    /// refused on its own merits (an event-id conflict, a forgotten event sent again, an overflow, too many blocks) records
    /// nothing of itself and does not stop the others.
    ///
    /// A store SHOULD record the whole batch in one atomic operation (the PostgreSQL store
    /// uses one transaction), so that `Err` means nothing of it was recorded. This default
    /// records one event at a time: after an `Err`, the events before the failure are recorded.
    /// Either way, sending the batch again with the same event ids records each event once.
    async fn record_usage_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            results.push(match self.record_usage(request).await {
                Ok(recorded) => Ok(recorded),
                Err(
                    refused @ (StoreError::EventConflict { .. }
                    | StoreError::EventForgotten { .. }
                    | StoreError::TotalOverflow { .. }
                    | StoreError::Rating(_)),
                ) => Err(refused),
                Err(failure) => return Err(failure),
            });
        }
        Ok(results)
    }

    /// The accounts of several users, in the order asked (`None` for a user without one). This
    /// default reads them one at a time.
    async fn accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
        let mut accounts = Vec::with_capacity(users.len());
        for user in users {
            accounts.push(self.account(user).await?);
        }
        Ok(accounts)
    }

    /// Creates the charge unless one with its key exists; returns the stored charge and whether
    /// it was created. Updates the summary (creating it for the plan's currency if absent).
    async fn ensure_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError>;

    /// Leases up to `limit` pending charges that nobody holds at `now` (of one user, or of all
    /// users), until `lease_until`, counting one collection attempt for each. Older charges
    /// SHOULD come first; no order across users is promised.
    async fn claim_pending(
        &self,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError>;

    /// Moves up to `limit` failed charges whose `next_retry_at` is due at `now` back to `Pending`
    /// in the next round, leased until `lease_until`, counting one attempt for each.
    async fn claim_due_retries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError>;

    /// Leases up to `limit` charges awaiting the customer (`RequiresAction`) whose lease has
    /// expired at `now`, until `lease_until`, so their payment can be looked up again. Does not
    /// count an attempt: nothing is collected.
    async fn claim_awaiting_customer(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError>;

    /// Extends a lease the caller holds, or gives it up (a `lease_until` not after now makes the
    /// charge claimable at once): when the charge is `Pending` and its lease is still
    /// `held_until`, sets it to `lease_until` and returns the charge; otherwise (someone else
    /// took it, or it was settled) returns `None` and changes nothing.
    async fn renew_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError>;

    /// Compare-and-set of a charge's status; see the contract.
    async fn settle_charge(&self, settlement: Settlement<'_>) -> Result<Charge, StoreError>;

    /// The outcome of an event already recorded under `event_id` for `user`, as
    /// [`record_usage`](Self::record_usage) would answer a replay of it (`replayed = true`).
    async fn recorded_event(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError>;

    /// Appends an entry to the user's audit trail, for what the service observes outside any
    /// other store operation (a duplicate payment reported by the gateway).
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError>;

    /// Whether a gateway event was recorded as applied for the user.
    async fn gateway_event_applied(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError>;

    /// Remembers a gateway event id for the user and appends the record's audit entry, unless
    /// the id was recorded already; returns whether it was new. Idempotent.
    async fn record_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError>;

    /// One charge by key.
    async fn charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError>;

    /// The user's charges in a period, in creation order (fixed fee, then blocks).
    async fn charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError>;

    /// The user's charges that are failed or await the customer, in any period.
    async fn unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError>;

    /// The user's recorded usage events in a period, in recording order.
    async fn consumptions(&self, user: &UserId, period: PeriodKey) -> Result<Vec<UsageRecord>, StoreError>;

    /// The period summary, if anything was recorded in the period. Constant time.
    async fn period_summary(&self, user: &UserId, period: PeriodKey) -> Result<Option<PeriodSummary>, StoreError>;

    /// Tokens and operations by operation type in a period, ordered by operation type.
    async fn usage_by_operation(&self, user: &UserId, period: PeriodKey) -> Result<Vec<OperationUsage>, StoreError>;

    /// Tokens by class and billable tokens by model in a period, ordered by model name, usage
    /// reported without a model first (as `None`). Every event counts in exactly one row: the
    /// rows' `total_tokens` add up to the period's tokens, and their `billable` to its exact
    /// billable total.
    async fn usage_by_model(&self, user: &UserId, period: PeriodKey) -> Result<Vec<ModelUsage>, StoreError>;

    /// Charge counts and amounts by tier label in a period, ordered by tier.
    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError>;

    /// Holds `request.tokens` for a call in flight if the period's limits allow them; see the
    /// contract.
    async fn reserve(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError>;

    /// Frees an open hold without usage; answers whether there was one (an expired hold is
    /// freed too). Idempotent.
    async fn release_hold(&self, user: &UserId, period: PeriodKey, hold_id: &EventId) -> Result<bool, StoreError>;

    /// The period's usage recorded and held at `now`, and, when `overdue_before` is given,
    /// whether the user has a charge unpaid (failed, or awaiting the customer) created at or
    /// before it. Reads only; constant time but for the holds and the unpaid charges.
    async fn spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError>;

    /// The spend state of the period `locate` picks from the user's account, as
    /// [`spend_state`](Self::spend_state) reads it: what a check of the user's limits needs, in
    /// one call. The default reads the account, then the state; a store that keeps a user's
    /// account beside the rest of the user's data may answer in one look-up (the in-memory
    /// store does).
    async fn locate_spend_state(
        &self,
        user: &UserId,
        now: DateTime<Utc>,
        locate: &mut SpendLocator<'_>,
    ) -> Result<Option<SpendState>, StoreError> {
        let account = self.account(user).await?;
        match locate(account.as_ref()) {
            Some((period, overdue_before)) => Ok(Some(self.spend_state(user, period, now, overdue_before).await?)),
            None => Ok(None),
        }
    }

    /// The period's holds that have not expired at `now`, oldest first.
    async fn holds(&self, user: &UserId, period: PeriodKey, now: DateTime<Utc>) -> Result<Vec<Hold>, StoreError>;

    /// Creates `alert` unless its user's period has one of its kind; answers whether it did.
    async fn raise_alert(&self, alert: Alert) -> Result<bool, StoreError>;

    /// Up to `limit` alerts not acknowledged (of one user, or of all), oldest first (across
    /// users, oldest first within each store shard or database scan: no global order is
    /// promised).
    async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, StoreError>;

    /// Acknowledges an alert: it is no longer pending. Answers whether it was. Idempotent.
    async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, StoreError>;

    /// The user's audit trail (of one period, or all of it), oldest first.
    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError>;
}
