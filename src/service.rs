//! [`BillingService`]: the only place that sequences the store and the gateway.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

mod fixed_fee_start;

use crate::clock::{Clock, SystemClock};
use crate::domain::check_identifier;
use crate::domain::{
    Charge, ChargeKey, ChargeKind, ChargeStatus, ClientId, Currency, CustomerId, EventId, FeeCollection, Metadata,
    Money, NewCharge, OperationType, Period, PeriodKey, Plan, PlanId, TierLabel, UsageRecord, UserId, check_metadata,
};
use crate::error::{BillingError, UsageError};
use crate::gateway::{
    GatewayChange, GatewayError, GatewayEvent, PaymentGateway, PaymentOutcome, PaymentRequest, PaymentStatus,
    SandboxGateway, Subscription,
};
use crate::store::{
    Account, AuditEntry, EnsureCharge, GatewayEventRecord, InMemoryUsageStore, OperationUsage, PlacedUsage, Placement,
    RecordUsage, Recorded, Settlement, StoreError, TierChargeReport, UsageStore,
};

/// When charges are collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CollectionMode {
    /// In the call that created them, as the seed does: the outcome shows each charge's status.
    #[default]
    Immediate,
    /// Later, by [`BillingService::resume_pending`]: the usage call only records, and returns the
    /// charges as pending. For hosts that keep the gateway off their request path.
    Deferred,
}

/// What happens to the charges of a user with no gateway customer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnregisteredUsers {
    /// The charges wait, pending, until the host registers the user's account with a customer
    /// (registration collects them). The default: a real gateway cannot charge a stranger.
    #[default]
    Wait,
    /// The service opens a customer at the gateway on first need and registers the user on the
    /// default plan. What the embedded default does with the sandbox, so that the seed's own
    /// examples run as written.
    OpenCustomer,
}

/// When failed charges are retried (dunning): the delay after each failed round, in order. A
/// failure after the last delay leaves the charge failed for good, and the account past due.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use token_billing::DunningSchedule;
///
/// let schedule = DunningSchedule::default();
/// assert_eq!(schedule.delay_after_round(0), Some(Duration::from_secs(86_400)));
/// assert_eq!(schedule.delay_after_round(3), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DunningSchedule {
    delays: Vec<Duration>,
}

impl DunningSchedule {
    /// A schedule from its delays; each is at least one second, so that a run of
    /// [`BillingService::retry_failed`] never meets a charge it failed itself.
    pub fn new(delays: Vec<Duration>) -> DunningSchedule {
        DunningSchedule {
            delays: delays.into_iter().map(|d| d.max(Duration::from_secs(1))).collect(),
        }
    }

    /// The delay before retrying a charge whose round `round` (0-based) failed.
    pub fn delay_after_round(&self, round: u32) -> Option<Duration> {
        usize::try_from(round).ok().and_then(|r| self.delays.get(r)).copied()
    }
}

impl Default for DunningSchedule {
    /// One, three and seven days after the first failure, as common dunning defaults do.
    fn default() -> Self {
        const DAY: u64 = 86_400;
        DunningSchedule::new(vec![
            Duration::from_secs(DAY),
            Duration::from_secs(2 * DAY),
            Duration::from_secs(4 * DAY),
        ])
    }
}

/// The service's settings; see [`BillingServiceBuilder`] for each.
#[derive(Debug, Clone)]
struct Settings {
    /// The plans other than the default one.
    plans: foldhash::HashMap<PlanId, Plan>,
    /// The default plan and its id, apart: most accounts name it, and it is found with one
    /// comparison, without hashing the id, twice for every event.
    default_plan_id: PlanId,
    default_plan: Plan,
    fee: FeeCollection,
    collection: CollectionMode,
    unregistered: UnregisteredUsers,
    max_tokens_per_event: u64,
    max_future_skew: Duration,
    lease: Duration,
    processing_recheck: Duration,
    dunning: DunningSchedule,
    batch_size: usize,
}

/// A usage report, as the host sends it: the seed's `processTokenUsage(userId, tokensUsed,
/// operationType, clientId, metadata)`, plus an optional event id for safe retries and an
/// optional instant.
///
/// Fields are raw text: [`BillingService::process_token_usage`] checks them all and answers a
/// typed [`UsageError`].
///
/// # Example
/// ```
/// use token_billing::UsageReport;
///
/// let report = UsageReport::new("user-uuid", 5_000_000, "chat")
///     .client_id("client-uuid")
///     .metadata_entry("conversationId", "conv-123")
///     .event_id("req-42");
/// assert_eq!(report.tokens_used, 5_000_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageReport {
    /// The user (the seed's `userId`).
    pub user_id: String,
    /// Tokens used (the seed's `tokensUsed`).
    pub tokens_used: u64,
    /// The operation (the seed's `operationType`: `chat`, `api_call`).
    pub operation_type: String,
    /// The client (the seed's `clientId`).
    pub client_id: Option<String>,
    /// The seed's `metadata`.
    pub metadata: Metadata,
    /// The host's id of this event; a re-send with the same id is answered with the original
    /// outcome and changes nothing. Without it, every call is a new event.
    pub event_id: Option<String>,
    /// When the usage happened; now when absent.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl UsageReport {
    /// A report of `tokens_used` tokens by `user_id` for `operation_type`.
    pub fn new(user_id: impl Into<String>, tokens_used: u64, operation_type: impl Into<String>) -> UsageReport {
        UsageReport {
            user_id: user_id.into(),
            tokens_used,
            operation_type: operation_type.into(),
            ..UsageReport::default()
        }
    }

    /// Sets the client id.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Adds one metadata entry. The metadata is written again each time (see
    /// [`Metadata::insert`]): give many entries at once with [`metadata`](Self::metadata).
    pub fn metadata_entry(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Sets the event id.
    pub fn event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = Some(event_id.into());
        self
    }

    /// Sets when the usage happened; without it, the usage happened when the report arrives.
    ///
    /// The instant is cut to the microsecond (as SQL timestamps keep it) before anything is
    /// checked: the future check compares the cut instant with the service's clock, and a
    /// re-send compares equal to its stored original in every store.
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }
}

/// A charge as the seed's API shows it in `tierCharges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierCharge {
    /// The charge's id.
    pub id: Uuid,
    /// The tier label (`8M-16M`).
    pub billing_tier: TierLabel,
    /// The amount in minor units (`10000` = BRL 100.00).
    pub amount_charged: i64,
    /// `pending`, `succeeded`, `failed` or `requires_action`.
    pub status: ChargeStatus,
}

impl From<&Charge> for TierCharge {
    fn from(charge: &Charge) -> Self {
        TierCharge {
            id: charge.id,
            billing_tier: charge.billing_tier.clone(),
            amount_charged: charge.amount.minor_units(),
            status: charge.status,
        }
    }
}

/// The outcome of a usage report: the seed's `{ consumptionId, totalTokens, tierCharges }`, and a
/// little more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageOutcome {
    /// The consumption's id.
    pub consumption_id: Uuid,
    /// The period's total tokens after the event.
    pub total_tokens: u64,
    /// The block charges the event created, with their status after collection.
    pub tier_charges: Vec<TierCharge>,
    /// The fixed-fee charge, when the event opened the period and the library collects the fee.
    pub fixed_fee_charge: Option<TierCharge>,
    /// The period the event counts in.
    pub period: PeriodKey,
    /// The tier of the period total (`8M-16M`).
    pub current_tier: TierLabel,
    /// Whether this answers a re-sent event id (nothing changed).
    pub replayed: bool,
}

/// A user's figures for one period: the seed's `getUserTokenSummary`, with amounts in minor
/// units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    /// The user.
    pub user_id: UserId,
    /// The period, `YYYY-MM`.
    pub period: PeriodKey,
    /// The currency of every amount.
    pub currency: Currency,
    /// Tokens used in the period.
    pub total_tokens: u64,
    /// The tier of that total (`0-8M`).
    pub current_tier: TierLabel,
    /// The fixed fee collected.
    pub fixed_fee_charged: i64,
    /// Block charges collected.
    pub tier_charges_count: u64,
    /// Their amount.
    pub tier_charges_total: i64,
    /// `fixed_fee_charged + tier_charges_total`.
    pub total_charged: i64,
    /// Charges created but not collected yet (pending, failed, awaiting the customer).
    pub outstanding_count: u64,
    /// Their amount.
    pub outstanding_total: i64,
}

/// Whether an account is paying its bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Nothing failed or awaiting the customer.
    GoodStanding,
    /// At least one charge failed or awaits the customer's authentication.
    PastDue,
}

/// An account's standing and what it owes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountStanding {
    /// Good standing or past due.
    pub standing: Standing,
    /// The charges failed or awaiting the customer, oldest first.
    pub unpaid_charges: Vec<Charge>,
}

/// What a run of [`BillingService::resume_pending`] or [`BillingService::retry_failed`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionReport {
    /// Charges taken up.
    pub claimed: usize,
    /// Now succeeded.
    pub succeeded: usize,
    /// Now failed (declined).
    pub failed: usize,
    /// Now awaiting the customer's authentication.
    pub requires_action: usize,
    /// Still pending: outcome unknown, processing, or waiting for an account.
    pub pending: usize,
}

impl CollectionReport {
    fn count(&mut self, status: ChargeStatus) {
        match status {
            ChargeStatus::Succeeded => self.succeeded += 1,
            ChargeStatus::Failed => self.failed += 1,
            ChargeStatus::RequiresAction => self.requires_action += 1,
            _ => self.pending += 1,
        }
    }
}

/// A payment's new state reported by the gateway (a webhook), for the charge it pays.
///
/// Every payment the service makes carries `user_id`, `charge_key` and `round` in its metadata,
/// so a webhook handler can build this from the payment alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentUpdate {
    /// The charge's user.
    pub user_id: UserId,
    /// The charge.
    pub charge_key: ChargeKey,
    /// The collection round the payment was made in, when known (the payment's `round`
    /// metadata).
    pub round: Option<u32>,
    /// The payment's state.
    pub outcome: PaymentOutcome,
}

/// Bills token usage: records it, charges what is owed exactly once, answers summaries.
///
/// Cheap to clone (every part is behind an `Arc`) and safe to share between tasks.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use token_billing::{BillingService, UsageReport};
///
/// let billing = BillingService::embedded();
/// let outcome = billing.process_token_usage(UsageReport::new("test-user-id", 10_000_000, "chat")).await?;
/// assert_eq!(outcome.total_tokens, 10_000_000);
/// assert_eq!(outcome.tier_charges.len(), 1);
/// assert_eq!(outcome.tier_charges[0].billing_tier, "8M-16M");
/// assert_eq!(outcome.tier_charges[0].amount_charged, 10000);
///
/// let user = "test-user-id".parse()?;
/// let summary = billing.token_summary(&user, None).await?;
/// assert_eq!((summary.fixed_fee_charged, summary.tier_charges_total, summary.total_charged), (40000, 10000, 50000));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct BillingService {
    store: Arc<dyn UsageStore>,
    gateway: Arc<dyn PaymentGateway>,
    clock: Arc<dyn Clock>,
    settings: Arc<Settings>,
}

/// Builds a [`BillingService`].
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use token_billing::{BillingService, CollectionMode, InMemoryUsageStore, Plan, SandboxGateway};
///
/// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
///     .plan(Plan::builder().included_tokens(4_000_000).build()?)
///     .collection(CollectionMode::Deferred)
///     .max_tokens_per_event(100_000_000)
///     .build();
/// # let _ = billing;
/// # Ok::<(), token_billing::PlanError>(())
/// ```
#[derive(Debug)]
pub struct BillingServiceBuilder {
    store: Arc<dyn UsageStore>,
    gateway: Arc<dyn PaymentGateway>,
    clock: Arc<dyn Clock>,
    settings: Settings,
}

impl BillingServiceBuilder {
    /// The clock (the system clock by default).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The default plan, under the id `default` (the seed's plan unless set).
    pub fn plan(mut self, plan: Plan) -> Self {
        self.settings.default_plan = plan;
        self
    }

    /// Adds a plan to the catalogue, for accounts registered on it (under the id `default`, the
    /// default plan, as [`BillingServiceBuilder::plan`] sets it).
    ///
    /// # Example
    /// ```
    /// use std::sync::Arc;
    /// use token_billing::{BillingService, InMemoryUsageStore, Plan, PlanId, SandboxGateway};
    ///
    /// let pro = Plan::builder().included_tokens(50_000_000).build()?;
    /// let small = Plan::builder().included_tokens(1_000_000).build()?;
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
    ///     .add_plan(PlanId::new("pro")?, pro.clone())
    ///     .add_plan(PlanId::new("default")?, small.clone())
    ///     .build();
    /// assert_eq!(billing.plan(&PlanId::new("pro")?)?, &pro);
    /// assert_eq!(billing.plan(&PlanId::new("default")?)?, &small);
    /// assert_eq!(billing.default_plan(), &small);
    /// assert!(billing.plan(&PlanId::new("gold")?).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_plan(mut self, id: PlanId, plan: Plan) -> Self {
        if id == self.settings.default_plan_id {
            self.settings.default_plan = plan;
        } else {
            self.settings.plans.insert(id, plan);
        }
        self
    }

    /// Who collects the fixed fee ([`FeeCollection::Library`] by default).
    pub fn fee_collection(mut self, fee: FeeCollection) -> Self {
        self.settings.fee = fee;
        self
    }

    /// When charges are collected ([`CollectionMode::Immediate`] by default).
    pub fn collection(mut self, mode: CollectionMode) -> Self {
        self.settings.collection = mode;
        self
    }

    /// What happens to users with no customer ([`UnregisteredUsers::Wait`] by default).
    pub fn unregistered_users(mut self, policy: UnregisteredUsers) -> Self {
        self.settings.unregistered = policy;
        self
    }

    /// The most tokens one event may report (1,000,000,000 by default).
    pub fn max_tokens_per_event(mut self, max: u64) -> Self {
        self.settings.max_tokens_per_event = max;
        self
    }

    /// How far in the future an event's instant may be, for clock skew (5 minutes by default).
    /// The event's instant is cut to the microsecond first; one exactly `skew` ahead is taken.
    pub fn max_future_skew(mut self, skew: Duration) -> Self {
        self.settings.max_future_skew = skew;
        self
    }

    /// How long a collector holds a charge before another may resume it (2 minutes by default,
    /// at least 1 second). It must exceed the longest one gateway call can take; a collector
    /// working through many charges renews its lease on each before calling the gateway.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// How long a processing payment is left alone before it is checked again (15 minutes by
    /// default; a webhook usually settles it first).
    pub fn processing_recheck(mut self, after: Duration) -> Self {
        self.settings.processing_recheck = after;
        self
    }

    /// The dunning schedule ([`DunningSchedule::default`] by default).
    pub fn dunning(mut self, schedule: DunningSchedule) -> Self {
        self.settings.dunning = schedule;
        self
    }

    /// How many charges one store call of `resume_pending` or `retry_failed` takes up (100).
    pub fn batch_size(mut self, size: usize) -> Self {
        self.settings.batch_size = size.max(1);
        self
    }

    /// The service.
    pub fn build(self) -> BillingService {
        BillingService {
            store: self.store,
            gateway: self.gateway,
            clock: self.clock,
            settings: Arc::new(self.settings),
        }
    }
}

/// What the service decided for an event before recording it.
enum Placed<'p> {
    /// Record it so: under this plan, its charges leased to the caller (to collect them at
    /// once) when the placement says until when.
    Record(Placement<'p>),
    /// Refused (unless it is a re-send).
    Refused(UsageError),
}

/// How many times an account change is made again over the account as it is, when another
/// caller changed it first, before giving up.
const ACCOUNT_ATTEMPTS: usize = 5;

/// The error of an account change that lost to other changes every time.
fn account_kept_changing(user: &UserId) -> BillingError {
    StoreError::Generic {
        store: "store",
        source: format!("the account of user {user} kept changing while it was being changed: try again").into(),
    }
    .into()
}

/// The period containing `instant` in `zone`, from a per-thread memory of the last one found:
/// nearly every event falls in the current month, and drawing a month's boundaries in a time
/// zone is the costliest step of placing an event.
fn period_containing(instant: DateTime<Utc>, zone: chrono_tz::Tz) -> Period {
    thread_local! {
        static LAST: Cell<Option<(chrono_tz::Tz, Period)>> = const { Cell::new(None) };
    }
    LAST.with(|last| match last.get() {
        Some((cached_zone, period)) if cached_zone == zone && period.contains(instant) => period,
        _ => {
            let period = Period::containing(instant, zone);
            last.set(Some((zone, period)));
            period
        }
    })
}

fn default_plan_id() -> PlanId {
    PlanId::new("default").unwrap_or_else(|_| unreachable!("\"default\" is a valid plan id"))
}

impl BillingService {
    /// A builder over a store and a gateway, with the seed's plan and the defaults of
    /// [`BillingServiceBuilder`].
    pub fn builder(store: Arc<dyn UsageStore>, gateway: Arc<dyn PaymentGateway>) -> BillingServiceBuilder {
        BillingServiceBuilder {
            store,
            gateway,
            clock: Arc::new(SystemClock),
            settings: Settings {
                plans: foldhash::HashMap::default(),
                default_plan_id: default_plan_id(),
                default_plan: Plan::default(),
                fee: FeeCollection::Library,
                collection: CollectionMode::Immediate,
                unregistered: UnregisteredUsers::Wait,
                max_tokens_per_event: 1_000_000_000,
                max_future_skew: Duration::from_secs(300),
                lease: Duration::from_secs(120),
                processing_recheck: Duration::from_secs(900),
                dunning: DunningSchedule::default(),
                batch_size: 100,
            },
        }
    }

    /// The embedded default: the seed's plan on an [`InMemoryUsageStore`] and a
    /// [`SandboxGateway`] that opens a customer for every new user, so the seed's examples run
    /// as written.
    pub fn embedded() -> BillingService {
        BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn UsageStore> {
        &self.store
    }

    /// The gateway.
    pub fn gateway(&self) -> &Arc<dyn PaymentGateway> {
        &self.gateway
    }

    /// The plan with this id.
    ///
    /// # Errors
    /// [`BillingError::UnknownPlan`].
    pub fn plan(&self, id: &PlanId) -> Result<&Plan, BillingError> {
        if *id == self.settings.default_plan_id {
            return Ok(&self.settings.default_plan);
        }
        self.settings
            .plans
            .get(id)
            .ok_or_else(|| BillingError::UnknownPlan { plan_id: id.clone() })
    }

    /// Who collects the fixed fee.
    pub fn fee_collection(&self) -> FeeCollection {
        self.settings.fee
    }

    /// The default plan.
    pub fn default_plan(&self) -> &Plan {
        &self.settings.default_plan
    }

    /// The user's current plan: the one whose zone draws the period boundaries.
    fn current_plan(&self, account: Option<&Account>) -> Result<&Plan, BillingError> {
        match account {
            Some(account) => self.plan_of(account, &account.plan_id),
            None => Ok(self.default_plan()),
        }
    }

    /// A plan an account names: one missing from the catalogue is the service's configuration
    /// at fault, not the caller's request.
    fn plan_of(&self, account: &Account, id: &PlanId) -> Result<&Plan, BillingError> {
        self.plan(id).map_err(|_| BillingError::AccountPlanMissing {
            user_id: account.user_id.clone(),
            plan_id: id.clone(),
        })
    }

    /// The plan that rates `period` for the user: the plan the account had then.
    fn period_plan(&self, account: Option<&Account>, period: PeriodKey) -> Result<&Plan, BillingError> {
        match account {
            Some(account) => self.plan_of(account, account.plan_for(period)),
            None => Ok(self.default_plan()),
        }
    }

    /// The period `instant` falls in for the user, and the plan that rates it.
    ///
    /// A period belongs to the plan that rates it: it ends where its month ends in that plan's
    /// zone, and starts where the period before it ended. When every plan the account had keeps
    /// one zone, that is the calendar month in it. When they differ (a user moved from a São
    /// Paulo plan to a Tokyo one), the periods still follow one another without gap or overlap:
    /// November under the São Paulo plan ends at midnight in São Paulo, and December under the
    /// Tokyo plan starts there, so an instant of 30 November in São Paulo is November's
    /// (reported late, it is rated and placed by November's plan), and December's end is drawn
    /// in Tokyo.
    fn period_at(&self, account: Option<&Account>, instant: DateTime<Utc>) -> Result<(Period, &Plan), BillingError> {
        let current = self.current_plan(account)?;
        let candidate = period_containing(instant, current.zone());
        let one_zone = |account: &Account| {
            account
                .earlier_plans
                .iter()
                .all(|(_, id)| self.plan(id).is_ok_and(|plan| plan.zone() == current.zone()))
        };
        let Some(account) = account.filter(|account| !one_zone(account)) else {
            return Ok((candidate, self.period_plan(account, candidate.key())?));
        };
        let period = |key: PeriodKey| -> Result<(Period, &Plan), BillingError> {
            let plan = self.period_plan(Some(account), key)?;
            let before = self.period_plan(Some(account), key.previous())?;
            let start = Period::new(key.previous(), before.zone()).end();
            let end = Period::new(key, plan.zone()).end();
            Ok((Period::from_bounds(key, start, end), plan))
        };
        // Zones move a month's ends by about a day, and each period starts where the one before
        // it ends: the walk from the current plan's month takes a step at most.
        let mut key = candidate.key();
        for _ in 0..4 {
            let (found, plan) = period(key)?;
            if instant < found.start() {
                key = key.previous();
            } else if instant >= found.end() {
                key = key.next();
            } else {
                return Ok((found, plan));
            }
        }
        Ok((candidate, self.period_plan(Some(account), candidate.key())?))
    }

    /// Registers (or updates) a user's account: the gateway customer that pays, and the plan.
    /// `None` keeps what the account has (a new account: no customer, the default plan), so that
    /// changing the customer never changes the plan, nor the reverse. Charges that were waiting
    /// for the account and that no collector holds are collected now.
    ///
    /// A new plan rates the current period on; earlier periods (late usage, summaries) keep the
    /// plan they had. A period's end is drawn in the zone of the plan that rates it, and the
    /// next period starts there: after a move to a plan in another zone, late usage of the last
    /// period under the old plan is placed by the old plan's calendar. A gateway subscription for the fixed fee is not changed: cancel it at the
    /// gateway, and call [`create_subscription`](Self::create_subscription) for the new plan.
    ///
    /// # Errors
    /// [`BillingError::UnknownPlan`] for a plan the caller names; [`BillingError::AccountPlanMissing`]
    /// when it names none and the account's own plan is missing from the catalogue;
    /// [`BillingError::PlanChangeMidPeriod`] when the plan changes
    /// while the current period has usage or charges, a fixed fee collected ahead of usage
    /// included (change plans between periods, before the new period's fee); store errors.
    ///
    /// The check for usage and the change are two store calls: an event of the user recorded
    /// between them is rated under the old plan while the account then names the new one for
    /// the same period. Change a plan when none of the user's events is in flight.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, CardBehaviour, CustomerId, UserId};
    /// # let sandbox = token_billing::SandboxGateway::new();
    /// # let billing = BillingService::builder(std::sync::Arc::new(token_billing::InMemoryUsageStore::new()), std::sync::Arc::new(sandbox.clone())).build();
    /// let user = UserId::new("user-uuid")?;
    /// let customer = CustomerId::new("cus_123")?;
    /// # sandbox.add_customer(customer.clone(), CardBehaviour::Succeeds);
    /// let account = billing.register_account(&user, Some(customer), None).await?;
    /// assert_eq!(account.plan_id.as_str(), "default");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn register_account(
        &self,
        user: &UserId,
        customer: Option<CustomerId>,
        plan_id: Option<PlanId>,
    ) -> Result<Account, BillingError> {
        let span = info_span!("register_account", user = %user);
        async {
            for _ in 0..ACCOUNT_ATTEMPTS {
                let now = self.clock.now();
                let existing = self.store.account(user).await?;
                let account = self
                    .registered(user, existing.as_ref(), customer.clone(), plan_id.clone(), now)
                    .await?;
                // Saved only over the account it was made from: a change another caller made
                // meanwhile (a customer opened for the user's charges, another registration) is
                // read and registered over, never lost.
                if self.store.replace_account(existing.as_ref(), account.clone()).await? {
                    info!(customer = ?account.customer_id, plan = %account.plan_id, "account registered");
                    if account.customer_id.is_some() {
                        self.collect_claimed_of(Some(user)).await?;
                    }
                    return Ok(account);
                }
                debug!("the account changed while it was registered: registering again over it");
            }
            Err(account_kept_changing(user))
        }
        .instrument(span)
        .await
    }

    /// The account `register_account` saves over `existing`, or why it may not.
    async fn registered(
        &self,
        user: &UserId,
        existing: Option<&Account>,
        customer: Option<CustomerId>,
        plan_id: Option<PlanId>,
        now: DateTime<Utc>,
    ) -> Result<Account, BillingError> {
        let current_plan = existing.map_or(&self.settings.default_plan_id, |a| &a.plan_id);
        let plan = match (&plan_id, existing) {
            // The caller's plan: unknown is the caller's mistake.
            (Some(named), _) => self.plan(named)?,
            // The account's own, kept: missing is the service's configuration.
            (None, Some(account)) => self.plan_of(account, current_plan)?,
            (None, None) => self.default_plan(),
        };
        let plan_id = plan_id.unwrap_or_else(|| current_plan.clone());
        let mut earlier_plans = existing.map(|a| a.earlier_plans.clone()).unwrap_or_default();
        if current_plan != &plan_id && self.plan(current_plan).ok() != Some(plan) {
            // The period under way, by the plan being left.
            let period = self.period_at(existing, now)?.0.key();
            // The plan the period had before any change made in it stays the one before it: a
            // second change in the same period does not make the first one's plan history.
            earlier_plans.retain(|(until, _)| *until <= period);
            if earlier_plans.last().is_none_or(|(until, _)| *until != period) {
                earlier_plans.push((period, current_plan.clone()));
            }
            // Any usage or charge fixes the period's plan: a fee charged ahead of usage
            // (`open_period`, or a subscription's invoice) was the old plan's.
            let in_use = self.store.period_summary(user, period).await?.is_some();
            if in_use {
                return Err(BillingError::PlanChangeMidPeriod {
                    user_id: user.clone(),
                    period,
                });
            }
        }
        Ok(Account {
            user_id: user.clone(),
            customer_id: customer.or_else(|| existing.and_then(|a| a.customer_id.clone())),
            plan_id,
            earlier_plans,
            subscription_id: existing.and_then(|a| a.subscription_id.clone()),
            created_at: existing.map_or(now, |a| a.created_at),
            updated_at: now,
        })
    }

    /// The user's customer, opening one if the policy says so.
    async fn customer_for(&self, user: &UserId, account: Option<&Account>) -> Result<Option<CustomerId>, BillingError> {
        if let Some(customer) = account.and_then(|a| a.customer_id.clone()) {
            return Ok(Some(customer));
        }
        if self.settings.unregistered != UnregisteredUsers::OpenCustomer {
            return Ok(None);
        }
        let customer = self.gateway.create_customer(user).await?;
        // The account is saved with the new customer only over the one it was read as: a
        // registration made meanwhile (its own customer, a plan) is kept, and its customer
        // pays. The account is read again until one or the other holds.
        let mut expected = account.cloned();
        for _ in 0..ACCOUNT_ATTEMPTS {
            if let Some(registered) = expected.as_ref().and_then(|a| a.customer_id.clone()) {
                info!(user = %user, opened = %customer, customer = %registered, "the user was registered meanwhile: its customer pays");
                return Ok(Some(registered));
            }
            let now = self.clock.now();
            let opened = match &expected {
                Some(account) => Account {
                    customer_id: Some(customer.clone()),
                    updated_at: now,
                    ..account.clone()
                },
                None => Account {
                    user_id: user.clone(),
                    customer_id: Some(customer.clone()),
                    plan_id: self.settings.default_plan_id.clone(),
                    earlier_plans: Vec::new(),
                    subscription_id: None,
                    created_at: now,
                    updated_at: now,
                },
            };
            if self.store.replace_account(expected.as_ref(), opened).await? {
                info!(user = %user, customer = %customer, "opened a customer for an unregistered user");
                return Ok(Some(customer));
            }
            expected = self.store.account(user).await?;
        }
        Err(account_kept_changing(user))
    }

    /// Reads a report into the record to store, refusing malformed content: bad identifiers,
    /// zero tokens, metadata beyond Stripe's limits. Checks no store, no limit and no plan, so
    /// a bad report is refused even when the store is down.
    fn read_report(report: UsageReport, now: DateTime<Utc>) -> Result<UsageRecord, UsageError> {
        let user_id = UserId::new(report.user_id)?;
        let operation_type = OperationType::new(report.operation_type)?;
        let client_id = report.client_id.map(ClientId::new).transpose()?;
        if report.tokens_used == 0 {
            return Err(UsageError::ZeroTokens);
        }
        check_metadata(&report.metadata)?;
        let consumption_id = crate::random::uuid_v4();
        let event_id = match report.event_id {
            Some(id) => EventId::new(id)?,
            None => EventId::of_consumption(consumption_id),
        };
        // Instants are kept to the microsecond, as SQL timestamps are, so a re-sent event compares
        // equal to its stored original in every store.
        let now = now.trunc_subsecs(6);
        let occurred_at = report.occurred_at.map_or(now, |at| at.trunc_subsecs(6));
        Ok(UsageRecord {
            consumption_id,
            event_id,
            user_id,
            // Set from the plan's zone by `place_in_period`.
            period: PeriodKey::UNPLACED,
            tokens: report.tokens_used,
            operation_type,
            client_id,
            metadata: report.metadata,
            occurred_at,
            occurred_at_reported: report.occurred_at.is_some(),
            recorded_at: now,
        })
    }

    /// Checks the service's limits: the tokens of one event, and how far in the future it may
    /// have happened.
    fn check_limits(&self, usage: &UsageRecord, now: DateTime<Utc>) -> Result<(), UsageError> {
        let max = self.settings.max_tokens_per_event;
        if usage.tokens > max {
            return Err(UsageError::TooManyTokens {
                tokens: usage.tokens,
                max,
            });
        }
        if usage.occurred_at <= now {
            return Ok(());
        }
        if usage.occurred_at > crate::clock::later(now, self.settings.max_future_skew) {
            return Err(UsageError::InFuture {
                occurred_at: usage.occurred_at,
                now,
            });
        }
        Ok(())
    }

    /// Puts a checked event in its period ([`period_at`](Self::period_at)), refusing it when the
    /// period has ended and the grace window of the plan that rates it has passed: the window is
    /// half-open, so an event arriving at exactly the period's end plus the grace is refused.
    fn place_in_period(
        &self,
        usage: &mut UsageRecord,
        account: Option<&Account>,
        now: DateTime<Utc>,
    ) -> Result<Result<(), UsageError>, BillingError> {
        let (period, plan) = self.period_at(account, usage.occurred_at)?;
        // While the period is open there is no grace window to work out.
        if now >= period.end() {
            let accepted_until = crate::clock::later(period.end(), plan.late_usage_grace());
            if now >= accepted_until {
                return Ok(Err(UsageError::TooLate {
                    period: period.key(),
                    accepted_until,
                }));
            }
        }
        usage.period = period.key();
        Ok(Ok(()))
    }

    fn lease_until(&self, now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
        crate::clock::later(now, lease)
    }

    /// Records a usage event and collects the charges it creates: the seed's
    /// `processTokenUsage`.
    ///
    /// The event counts in the period of its `occurred_at` in the plan's zone. Recording is one
    /// atomic store operation: the usage is never lost once this returns `Ok`, whatever the
    /// gateway does. Charges whose collection fails transiently stay pending for
    /// [`resume_pending`](Self::resume_pending); declined ones are retried by
    /// [`retry_failed`](Self::retry_failed).
    ///
    /// # Errors
    /// [`BillingError::InvalidUsage`] for a bad report; [`BillingError::EventConflict`] for an
    /// event id re-used with different usage; [`BillingError::TotalOverflow`];
    /// [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks; store errors. A
    /// refused report records nothing. After a store error the event may or may not have been
    /// recorded (the store's answer may be what was lost): send it again with the same event id,
    /// and it is recorded once either way.
    ///
    /// A re-sent event id is answered with the original outcome even when the event would now be
    /// refused (its grace window has passed, or the limits changed).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingError, BillingService, UsageError, UsageReport};
    ///
    /// let billing = BillingService::embedded();
    /// let report = UsageReport::new("user-uuid", 9_000_000, "chat").event_id("req-1");
    /// let outcome = billing.process_token_usage(report.clone()).await?;
    /// assert_eq!((outcome.total_tokens, outcome.current_tier.as_str()), (9_000_000, "8M-16M"));
    ///
    /// // The same event again: the original outcome, nothing recorded twice.
    /// let again = billing.process_token_usage(report).await?;
    /// assert!(again.replayed && again.consumption_id == outcome.consumption_id);
    ///
    /// // Bad input is refused with a typed error.
    /// let error = billing.process_token_usage(UsageReport::new("user-uuid", 0, "chat")).await.unwrap_err();
    /// assert!(matches!(error, BillingError::InvalidUsage(UsageError::ZeroTokens)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn process_token_usage(&self, report: UsageReport) -> Result<UsageOutcome, BillingError> {
        let span = info_span!(
            "process_token_usage",
            user = %report.user_id.chars().take(UserId::MAX_LEN).collect::<String>(),
            period = tracing::field::Empty,
            consumption = tracing::field::Empty,
        );
        async {
            let result = self.record_report(report).await;
            if let Err(error) = &result {
                if error.is_client_error() {
                    info!(error = %error, "usage refused");
                }
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn record_report(&self, report: UsageReport) -> Result<UsageOutcome, BillingError> {
        let now = self.clock.now();
        let usage = Self::read_report(report, now)?;
        // The store places the event with the user's account and records it. Why an event was
        // not placed is kept here: refused on its merits (`Ok`), or not placeable at all (`Err`:
        // an account naming an unknown plan).
        let mut refusal: Option<Result<UsageError, BillingError>> = None;
        let mut placed_in = None;
        let mut place = |usage: &mut UsageRecord, account: Option<&Account>| {
            let (placement, why_not) = match self.place(usage, account, now) {
                Ok(Placed::Record(placement)) => (Some(placement), None),
                Ok(Placed::Refused(error)) => (None, Some(Ok(error))),
                Err(error) => (None, Some(Err(error))),
            };
            refusal = why_not;
            placed_in = Some(usage.period);
            placement
        };
        match self.store.place_and_record_usage(usage, &mut place).await? {
            PlacedUsage::Recorded {
                recorded,
                placement,
                account,
            } => {
                let span = tracing::Span::current();
                span.record("period", tracing::field::display(recorded.usage.period));
                span.record("consumption", tracing::field::display(recorded.usage.consumption_id));
                let collect_now = placement.lease_until.is_some();
                let plan = if recorded.replayed && placed_in != Some(recorded.usage.period) {
                    // A re-send placed in another period than its original (sent again without
                    // `occurred_at` after the month turned) is answered with the tier of the
                    // original's period, whose plan may not be the one this placing used.
                    let account = self.store.account(&recorded.usage.user_id).await?;
                    self.period_plan(account.as_ref(), recorded.usage.period)?
                } else {
                    placement.plan
                };
                self.finish(recorded, collect_now, account.as_deref(), plan).await
            }
            PlacedUsage::Refused { usage, account } => {
                let error = match refusal {
                    Some(Ok(error)) => error,
                    Some(Err(error)) => return Err(error),
                    None => {
                        return Err(StoreError::Generic {
                            store: "store",
                            source: "the store refused an event its placing accepted".into(),
                        }
                        .into());
                    }
                };
                // A re-sent event is answered with its original outcome even when it would now
                // be refused: its window has passed, or the limits changed since it was
                // recorded. The look-up is boxed: refusals are rare, and the futures of other
                // events need not make room for it.
                match Box::pin(self.replay_of(&usage, account.as_deref())).await? {
                    Some(outcome) => Ok(outcome),
                    None => Err(error.into()),
                }
            }
        }
    }

    /// Decides, for a read event, the plan that rates it and whether its charges are collected
    /// at once (leased to the caller); or why it is refused.
    fn place<'s>(
        &'s self,
        usage: &mut UsageRecord,
        account: Option<&Account>,
        now: DateTime<Utc>,
    ) -> Result<Placed<'s>, BillingError> {
        let refused = match self.check_limits(usage, now) {
            Ok(()) => self.place_in_period(usage, account, now)?,
            Err(error) => Err(error),
        };
        if let Err(error) = refused {
            return Ok(Placed::Refused(error));
        }
        let plan = self.period_plan(account, usage.period)?;
        let collect_now = self.settings.collection == CollectionMode::Immediate
            && (account.is_some_and(|a| a.customer_id.is_some())
                || self.settings.unregistered == UnregisteredUsers::OpenCustomer);
        Ok(Placed::Record(Placement {
            plan,
            fee: self.settings.fee,
            lease_until: collect_now.then(|| self.lease_until(now, self.settings.lease)),
        }))
    }

    /// Collects the charges an event created (when they were leased to this caller) and answers
    /// its outcome.
    async fn finish(
        &self,
        recorded: Recorded,
        collect_now: bool,
        account: Option<&Account>,
        plan: &Plan,
    ) -> Result<UsageOutcome, BillingError> {
        if recorded.replayed {
            debug!(event = %recorded.usage.event_id, "event replayed: answering the original outcome");
        } else {
            // Per request, as a metering path logs in the crates hosts know (sqlx, tower-http):
            // what happens to the charges (collected, failed) is logged at `info` and `warn`.
            debug!(
                tokens = recorded.usage.tokens,
                total = recorded.total_after,
                charges = recorded.charges.len(),
                "usage recorded"
            );
        }
        let mut charges = recorded.charges;
        if collect_now && !recorded.replayed && !charges.is_empty() {
            // Boxed: most events create no charge, and their futures need not make room for a
            // collection's.
            Box::pin(self.collect_created(&mut charges, &recorded.usage.user_id, account)).await;
        }
        Self::outcome(&recorded.usage, recorded.total_after, &charges, recorded.replayed, plan)
    }

    /// Collects the charges an event just created, leased to this caller, replacing each with
    /// its state after collection.
    async fn collect_created(&self, charges: &mut [Charge], user: &UserId, account: Option<&Account>) {
        match self.customer_for(user, account).await {
            Ok(Some(customer)) => {
                for charge in charges {
                    self.collect_charge(charge, &customer).await;
                }
            }
            Ok(None) => {}
            Err(error) => warn!(error = %error, "no customer: charges stay pending"),
        }
    }

    /// Records many usage events in one store operation (one transaction on PostgreSQL), then
    /// collects the charges they created: for hosts that meter in bulk (a queue consumer, a
    /// log shipper), where one call per event would cost a round trip each.
    ///
    /// Each report is checked and answered on its own, in order: a bad report gets its typed
    /// error and records nothing, without stopping the others; a re-sent event id answers its
    /// original outcome; events of one user see the totals of the ones before them, so blocks
    /// are charged exactly once whatever the batching.
    ///
    /// # Errors
    /// The outer error is the store's: with a store that records a batch atomically
    /// (PostgreSQL), nothing of the batch was recorded; with one that records an event at a
    /// time, the events before the failure were. Send the batch again with the same event ids
    /// and every event is recorded once. Give event ids: a report without one cannot be told
    /// from a new event.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingError, BillingService, UsageError, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// let outcomes = billing
    ///     .process_token_usage_batch(vec![
    ///         UsageReport::new("user-uuid", 5_000_000, "chat").event_id("req-1"),
    ///         UsageReport::new("user-uuid", 0, "chat").event_id("req-2"), // refused, alone
    ///         UsageReport::new("user-uuid", 5_000_000, "chat").event_id("req-3"),
    ///     ])
    ///     .await?;
    /// assert_eq!(outcomes[0].as_ref().map(|o| o.total_tokens).ok(), Some(5_000_000));
    /// assert!(matches!(outcomes[1], Err(BillingError::InvalidUsage(UsageError::ZeroTokens))));
    /// let third = outcomes[2].as_ref().expect("recorded");
    /// assert_eq!((third.total_tokens, third.tier_charges.len()), (10_000_000, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn process_token_usage_batch(
        &self,
        reports: Vec<UsageReport>,
    ) -> Result<Vec<Result<UsageOutcome, BillingError>>, BillingError> {
        let span = info_span!("process_token_usage_batch", events = reports.len());
        async {
            let now = self.clock.now();
            let mut outcomes: Vec<Option<Result<UsageOutcome, BillingError>>> = Vec::with_capacity(reports.len());
            let mut read = Vec::with_capacity(reports.len());
            for report in reports {
                match Self::read_report(report, now) {
                    Ok(usage) => {
                        read.push((outcomes.len(), usage));
                        outcomes.push(None);
                    }
                    Err(error) => outcomes.push(Some(Err(error.into()))),
                }
            }
            let mut users: Vec<UserId> = read.iter().map(|(_, usage)| usage.user_id.clone()).collect();
            users.sort_unstable();
            users.dedup();
            let found = self.store.accounts(&users).await?;
            if found.len() != users.len() {
                return Err(store_contract(format!(
                    "accounts answered {} accounts for {} users",
                    found.len(),
                    users.len()
                )));
            }
            let mut accounts: HashMap<UserId, Option<Account>> = users.into_iter().zip(found).collect();

            // Each event placed in its period, or refused (and perhaps a re-send).
            let mut requests = Vec::with_capacity(read.len());
            let mut placed = Vec::with_capacity(read.len());
            // Events refused on their own that may re-send an event recorded earlier in the
            // batch: answered once that one is, as they would be one by one.
            let mut refused_resends = Vec::new();
            for (position, mut usage) in read {
                let account = accounts.get(&usage.user_id).and_then(Option::as_ref);
                match self.place(&mut usage, account, now) {
                    Ok(Placed::Record(placement)) => {
                        placed.push((position, placement.plan, placement.lease_until.is_some()));
                        requests.push(RecordUsage {
                            usage,
                            plan: placement.plan,
                            fee: placement.fee,
                            lease_until: placement.lease_until,
                            // Read afresh by `accounts` above.
                            account: None,
                        });
                    }
                    Ok(Placed::Refused(error)) => {
                        let answer = match self.replay_of(&usage, account).await {
                            Ok(Some(outcome)) => Ok(outcome),
                            Ok(None) if usage.has_host_event_id() => {
                                refused_resends.push((position, usage, error));
                                continue;
                            }
                            Ok(None) => Err(error.into()),
                            Err(failure) => Err(failure),
                        };
                        outcomes[position] = Some(answer);
                    }
                    Err(error) => outcomes[position] = Some(Err(error)),
                }
            }
            let sent = requests.len();
            let recorded = self.store.record_usage_batch(requests).await?;
            if recorded.len() != sent {
                return Err(store_contract(format!(
                    "record_usage_batch answered {} results for {sent} events",
                    recorded.len()
                )));
            }
            debug!(
                recorded = recorded.iter().filter(|r| r.is_ok()).count(),
                "batch recorded"
            );
            // The events this batch recorded, by the host's id: the position of each and what it
            // was recorded as, for the re-sends of it later in the batch.
            let mut recorded_here: HashMap<(UserId, EventId), (usize, Arc<UsageRecord>)> = HashMap::new();
            let mut replays_of_recorded_here = Vec::new();
            for ((position, plan, collect_now), result) in placed.into_iter().zip(recorded) {
                let answer = match result {
                    Ok(recorded) => {
                        if recorded.usage.has_host_event_id() {
                            let id = (recorded.usage.user_id.clone(), recorded.usage.event_id.clone());
                            match recorded_here.get(&id) {
                                Some((original, _)) if recorded.replayed => {
                                    replays_of_recorded_here.push((position, *original));
                                }
                                Some(_) => {}
                                None if recorded.replayed => {}
                                None => {
                                    recorded_here.insert(id, (position, Arc::clone(&recorded.usage)));
                                }
                            }
                        }
                        let user = recorded.usage.user_id.clone();
                        let account = accounts.get(&user).and_then(Option::as_ref);
                        // Collecting may open the user's customer: the user's later events in
                        // the batch must see it, not open another.
                        let opens = collect_now
                            && !recorded.replayed
                            && !recorded.charges.is_empty()
                            && account.is_none_or(|a| a.customer_id.is_none());
                        // A replay is answered with the tier of its original's period, whose
                        // plan may not be the one this placing used.
                        let answer = if recorded.replayed {
                            self.period_plan(account, recorded.usage.period)
                        } else {
                            Ok(plan)
                        };
                        let answer = match answer {
                            Ok(plan) => self.finish(recorded, collect_now, account, plan).await,
                            Err(error) => Err(error),
                        };
                        if opens {
                            if let Ok(account) = self.store.account(&user).await {
                                accounts.insert(user, account);
                            }
                        }
                        answer
                    }
                    Err(refused) => Err(refused.into()),
                };
                outcomes[position] = Some(answer);
            }
            // A re-send of an event of this batch is answered as it would be after that event
            // alone: with the original's outcome once its charges were collected, or refused for
            // other usage, or refused on its own merits when the original was not recorded.
            let replay_of_position =
                |outcomes: &[Option<Result<UsageOutcome, BillingError>>], original: usize| match outcomes.get(original)
                {
                    Some(Some(Ok(outcome))) => Some(UsageOutcome {
                        replayed: true,
                        ..outcome.clone()
                    }),
                    _ => None,
                };
            for (position, original) in replays_of_recorded_here {
                if let Some(replay) = replay_of_position(&outcomes, original) {
                    outcomes[position] = Some(Ok(replay));
                }
            }
            for (position, usage, error) in refused_resends {
                let id = (usage.user_id.clone(), usage.event_id.clone());
                let answer = match recorded_here.get(&id) {
                    Some((original, _)) if *original > position => Err(error.into()),
                    Some((_, recorded)) if !recorded.same_usage(&usage) => Err(BillingError::EventConflict {
                        event_id: usage.event_id.clone(),
                    }),
                    Some((original, _)) => replay_of_position(&outcomes, *original).ok_or_else(|| error.into()),
                    None => Err(error.into()),
                };
                outcomes[position] = Some(answer);
            }
            Ok(outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| unreachable!("every report is answered")))
                .collect())
        }
        .instrument(span)
        .await
    }

    /// The original outcome of an event that was already recorded with the same usage; `None`
    /// when it was not recorded (or the host gave no event id, so it cannot be a re-send).
    async fn replay_of(
        &self,
        usage: &UsageRecord,
        account: Option<&Account>,
    ) -> Result<Option<UsageOutcome>, BillingError> {
        if !usage.has_host_event_id() {
            return Ok(None);
        }
        let Some(recorded) = self.store.recorded_event(&usage.user_id, &usage.event_id).await? else {
            return Ok(None);
        };
        if !recorded.usage.same_usage(usage) {
            return Err(BillingError::EventConflict {
                event_id: usage.event_id.clone(),
            });
        }
        let plan = self.period_plan(account, recorded.usage.period)?;
        debug!(event = %usage.event_id, "event replayed: answering the original outcome");
        Self::outcome(&recorded.usage, recorded.total_after, &recorded.charges, true, plan).map(Some)
    }

    fn outcome(
        usage: &UsageRecord,
        total_after: u64,
        charges: &[Charge],
        replayed: bool,
        plan: &Plan,
    ) -> Result<UsageOutcome, BillingError> {
        let is_fee = |c: &&Charge| c.kind == ChargeKind::FixedFee;
        Ok(UsageOutcome {
            consumption_id: usage.consumption_id,
            total_tokens: total_after,
            tier_charges: charges.iter().filter(|c| !is_fee(c)).map(TierCharge::from).collect(),
            fixed_fee_charge: charges.iter().find(is_fee).map(TierCharge::from),
            period: usage.period,
            current_tier: plan.tier_of(total_after)?.label(),
            replayed,
        })
    }

    /// Collects one claimed charge and settles it, leaving `charge` as it is then; never fails:
    /// whatever goes wrong leaves the charge pending (to resume) or failed (to retry), and is
    /// logged. `false` when the lease on the charge was lost: `charge` is left as it was, and
    /// the charge to whoever holds it now.
    async fn collect_charge(&self, charge: &mut Charge, customer: &CustomerId) -> bool {
        let span = info_span!("collect_charge", user = %charge.user_id, period = %charge.period, charge = %charge.key, round = charge.round);
        async {
            // Hold the charge for the whole call: a lease taken for a batch may be running out.
            if !self.hold(charge).await {
                return false;
            }
            // A charge that may have been attempted before is looked up first: the gateway may have
            // forgotten the idempotency key, or this may be a later round of a charge paid out of band.
            if charge.attempts > 1 {
                match self.gateway.find_payment(&charge.key).await {
                    Ok(Some(outcome)) => {
                        info!(payment = %outcome.payment_id, status = ?outcome.status, "found an earlier payment for the charge");
                        *charge = self.settle(charge, Ok(outcome)).await;
                        return true;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        warn!(error = %error, "could not look up earlier payments: charge stays pending");
                        return true;
                    }
                }
            }
            // Nothing of the charge is paid or in flight. A later round may still name an earlier
            // round's payment (a retry whose cancel failed, or whose collector stopped after its
            // claim): cancel it, under this lease, so that it cannot succeed beside the new one.
            if charge.round > 0 && charge.payment_id.is_some() {
                match self.close_previous_round(charge.clone()).await {
                    Ok(open_for_a_new_payment) => *charge = open_for_a_new_payment,
                    Err(settled) => {
                        *charge = settled;
                        return true;
                    }
                }
            }
            if charge.amount.is_zero() {
                // Nothing to collect (a free plan's fee or blocks): settled without the gateway,
                // which would refuse a zero amount.
                let nothing = PaymentOutcome {
                    payment_id: String::new(),
                    status: PaymentStatus::Succeeded,
                    decline_code: None,
                    message: None,
                };
                *charge = self.settle(charge, Ok(nothing)).await;
                return true;
            }
            let idempotency_key = charge.idempotency_key();
            let request = PaymentRequest {
                charge,
                idempotency_key: &idempotency_key,
                customer,
            };
            let result = self.gateway.collect(&request).await;
            *charge = self.settle(charge, result).await;
            true
        }
        .instrument(span)
        .await
    }

    /// A charge in a later round still names an earlier round's payment: cancel it if it is
    /// open, so that it cannot succeed later beside the new round's payment, nor be found by the
    /// look-up as the charge's payment. `Err` with the settled charge when that payment
    /// turns out to have succeeded after all, or cannot be canceled while it may still succeed
    /// (processing, awaiting the customer): the charge then waits on it.
    async fn close_previous_round(&self, charge: Charge) -> Result<Charge, Charge> {
        let Some(previous) = charge.payment_id.clone() else {
            return Ok(charge);
        };
        match self.gateway.cancel_payment(&previous).await {
            Ok(outcome)
                if matches!(
                    outcome.status,
                    PaymentStatus::Succeeded | PaymentStatus::Processing | PaymentStatus::RequiresAction
                ) =>
            {
                // It succeeded after all, or is still live and could: the charge follows it
                // instead of a new payment that could be paid beside it.
                info!(charge = %charge.key, payment = %previous, status = ?outcome.status, "the previous round's payment is not over");
                Err(self.settle(&charge, Ok(outcome)).await)
            }
            Ok(_) | Err(GatewayError::Rejected { .. }) => Ok(charge),
            Err(error) => {
                // Collecting now could pay twice if the old payment completes: leave the charge
                // pending; resume_pending tries again once the lease expires.
                warn!(charge = %charge.key, error = %error, "could not cancel the previous round's payment");
                Err(charge)
            }
        }
    }

    /// Makes sure the caller holds a pending charge's lease for at least half a lease more,
    /// renewing it (and `charge` with it) when needed. `false` when the lease was lost (another
    /// collector holds the charge, or it was settled): the charge must then be left alone.
    async fn hold(&self, charge: &mut Charge) -> bool {
        let now = self.clock.now();
        let half = self.lease_until(now, self.settings.lease / 2);
        if charge.status != ChargeStatus::Pending || charge.lease_until.is_some_and(|until| until >= half) {
            return true;
        }
        let renewed = self
            .store
            .renew_lease(
                &charge.user_id,
                &charge.key,
                charge.lease_until,
                self.lease_until(now, self.settings.lease),
            )
            .await;
        match renewed {
            Ok(Some(renewed)) => {
                *charge = renewed;
                true
            }
            Ok(None) => {
                debug!("lease lost: another collector holds the charge");
                false
            }
            Err(error) => {
                warn!(error = %error, "could not renew the lease: charge left for a later run");
                false
            }
        }
    }

    /// Stores a gateway answer with a compare-and-set on the charge's status and round; never
    /// fails: a lost compare-and-set returns the charge as it is now, and a store failure leaves
    /// it pending (to resume), logged.
    async fn settle(&self, charge: &Charge, result: Result<PaymentOutcome, GatewayError>) -> Charge {
        match self.try_settle(charge, result).await {
            Ok(settled) => {
                info!(status = %settled.status, payment = ?settled.payment_id, "charge settled");
                settled
            }
            Err(StoreError::StatusConflict { charge: current }) => {
                debug!(status = %current.status, "charge settled elsewhere first");
                *current
            }
            Err(error) => {
                warn!(error = %error, "could not store the payment outcome: charge stays pending and will be resumed");
                charge.clone()
            }
        }
    }

    /// The compare-and-set behind [`settle`](Self::settle). An unknown outcome changes nothing
    /// and returns the charge as it was.
    async fn try_settle(
        &self,
        charge: &Charge,
        result: Result<PaymentOutcome, GatewayError>,
    ) -> Result<Charge, StoreError> {
        let now = self.clock.now();
        let (status, payment_id, code, message) = match result {
            Ok(outcome) => {
                let status = match outcome.status {
                    PaymentStatus::Succeeded => ChargeStatus::Succeeded,
                    PaymentStatus::Processing => ChargeStatus::Pending,
                    PaymentStatus::RequiresAction => ChargeStatus::RequiresAction,
                    _ => ChargeStatus::Failed,
                };
                let code = match outcome.status {
                    PaymentStatus::Canceled => Some(outcome.decline_code.unwrap_or_else(|| "canceled".to_owned())),
                    PaymentStatus::Declined => Some(outcome.decline_code.unwrap_or_else(|| "declined".to_owned())),
                    PaymentStatus::RequiresAction => Some("authentication_required".to_owned()),
                    _ => None,
                };
                // An empty reference means no payment was made (a zero amount).
                let payment_id = Some(outcome.payment_id).filter(|id| !id.is_empty());
                (status, payment_id, code, outcome.message)
            }
            Err(GatewayError::Rejected { code, message, .. }) => {
                warn!(code = %code, message = %message, "gateway rejected the payment request");
                (ChargeStatus::Failed, None, Some(code), Some(message))
            }
            Err(error) => {
                warn!(error = %error, "payment outcome unknown: charge stays pending and will be resumed");
                return Ok(charge.clone());
            }
        };
        let next_retry_at = (status == ChargeStatus::Failed)
            .then(|| self.settings.dunning.delay_after_round(charge.round))
            .flatten()
            .map(|delay| self.lease_until(now, delay));
        // A payment still processing, or awaiting the customer, is looked at again later.
        let lease_until = matches!(status, ChargeStatus::Pending | ChargeStatus::RequiresAction)
            .then(|| self.lease_until(now, self.settings.processing_recheck));
        self.store
            .settle_charge(Settlement {
                payment_id,
                failure_code: code,
                failure_message: message,
                next_retry_at,
                lease_until,
                ..Settlement::of(charge, status, now)
            })
            .await
    }

    /// Collects what the store hands over, for one user or all; returns what happened. Bounded:
    /// a charge leased during this run is not claimed again by it.
    async fn collect_claimed_of(&self, user: Option<&UserId>) -> Result<CollectionReport, BillingError> {
        let mut report = CollectionReport::default();
        let started = self.clock.now();
        let mut waiting = Vec::new();
        loop {
            let now = self.clock.now().max(started);
            let claimed = self
                .store
                .claim_pending(
                    user,
                    started,
                    self.lease_until(now, self.settings.lease),
                    self.settings.batch_size,
                )
                .await?;
            if claimed.is_empty() {
                self.give_up_leases(waiting, started).await;
                return Ok(report);
            }
            report.claimed += claimed.len();
            self.collect_all(claimed, &mut report, &mut waiting).await;
        }
    }

    /// Collects claimed charges, counting each outcome in `report`. A charge whose user has no
    /// customer to charge is put in `waiting`, still leased, for the run to give up its lease
    /// once it has claimed everything ([`give_up_leases`](Self::give_up_leases)).
    async fn collect_all(&self, claimed: Vec<Charge>, report: &mut CollectionReport, waiting: &mut Vec<Charge>) {
        let mut customers: HashMap<UserId, Option<CustomerId>> = HashMap::new();
        for mut charge in claimed {
            let customer = match customers.get(&charge.user_id) {
                Some(customer) => customer.clone(),
                None => {
                    // A store error is not "no account": the charge is left for a later run, and
                    // no customer is opened on its strength.
                    let customer = match self.store.account(&charge.user_id).await {
                        Ok(account) => match self.customer_for(&charge.user_id, account.as_ref()).await {
                            Ok(customer) => customer,
                            Err(error) => {
                                warn!(user = %charge.user_id, error = %error, "could not open a customer: charges wait");
                                None
                            }
                        },
                        Err(error) => {
                            warn!(user = %charge.user_id, error = %error, "could not read the account: charges wait");
                            None
                        }
                    };
                    customers.insert(charge.user_id.clone(), customer.clone());
                    customer
                }
            };
            let status = match customer {
                Some(customer) => {
                    if self.collect_charge(&mut charge, &customer).await {
                        charge.status
                    } else {
                        ChargeStatus::Pending
                    }
                }
                None => {
                    debug!(user = %charge.user_id, charge = %charge.key, "no customer yet: charge waits");
                    waiting.push(charge);
                    ChargeStatus::Pending
                }
            };
            report.count(status);
        }
    }

    /// Gives up the leases a run holds on charges it could not collect for want of a customer,
    /// as of `at` (the run's start), so that a registration or a run from then on collects them
    /// at once instead of after the lease. Given up only at the end of a run, which claims
    /// only charges whose lease expired before it started: a charge given up earlier would be
    /// claimed again by the same run, over and over. A lease another collector holds now is
    /// left as it is (the give-up is a compare-and-set), and one that cannot be given up
    /// expires as usual.
    async fn give_up_leases(&self, waiting: Vec<Charge>, at: DateTime<Utc>) {
        for charge in waiting {
            match self
                .store
                .renew_lease(&charge.user_id, &charge.key, charge.lease_until, at)
                .await
            {
                Ok(_) => {}
                Err(error) => {
                    warn!(charge = %charge.key, error = %error, "could not give up the lease: the charge waits for it to expire");
                }
            }
        }
    }

    /// Looks again at charges awaiting the customer whose recheck time has come: a payment the
    /// customer completed is settled even if its webhook was lost.
    async fn recheck_awaiting_customer(&self, report: &mut CollectionReport) -> Result<(), BillingError> {
        let started = self.clock.now();
        loop {
            let claimed = self
                .store
                .claim_awaiting_customer(
                    started,
                    self.lease_until(started, self.settings.processing_recheck),
                    self.settings.batch_size,
                )
                .await?;
            if claimed.is_empty() {
                return Ok(());
            }
            report.claimed += claimed.len();
            for charge in claimed {
                let status = match self.gateway.find_payment(&charge.key).await {
                    Ok(Some(outcome)) if outcome.status == PaymentStatus::Succeeded => {
                        self.settle(&charge, Ok(outcome)).await.status
                    }
                    Ok(Some(_)) => charge.status,
                    Ok(None) => {
                        // No payment for the charge succeeded or is in flight: the one awaiting
                        // the customer failed or was cancelled, and its webhook was lost. The
                        // charge fails, and dunning takes it from there (its next round cancels
                        // that payment first, should the look-up have been wrong).
                        let over = PaymentOutcome {
                            payment_id: charge.payment_id.clone().unwrap_or_default(),
                            status: PaymentStatus::Declined,
                            decline_code: None,
                            message: Some("the payment awaiting the customer ended without collecting".to_owned()),
                        };
                        info!(charge = %charge.key, "the payment awaiting the customer is over: the charge fails");
                        self.settle(&charge, Ok(over)).await.status
                    }
                    Err(error) => {
                        warn!(charge = %charge.key, error = %error, "could not look up the payment");
                        charge.status
                    }
                };
                report.count(status);
            }
        }
    }

    /// Resumes charges left pending: by a crash between record and collect or between collect and
    /// settle, by an unknown gateway outcome, or waiting for an account. Also looks again at
    /// charges awaiting the customer's authentication, so that one whose webhook was lost is
    /// settled once the customer paid, or failed (for the dunning schedule to retry) once no
    /// payment for it is in flight any more.
    ///
    /// Safe to run on several instances at once and as often as wanted: a charge is held by one
    /// collector at a time (its lease, renewed before each gateway call), and collection reuses
    /// the charge's idempotency key after looking up earlier payments, so nothing is paid twice.
    /// A run takes only charges whose lease had expired when it started, so it always ends.
    ///
    /// # Errors
    /// Store errors while claiming; collection problems are reported per charge.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, CollectionMode, InMemoryUsageStore, SandboxGateway, UnregisteredUsers, UsageReport};
    /// use std::sync::Arc;
    ///
    /// // With deferred collection, usage calls only record; a background job collects.
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
    ///     .collection(CollectionMode::Deferred)
    ///     .unregistered_users(UnregisteredUsers::OpenCustomer)
    ///     .build();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 9_000_000, "chat")).await?;
    /// let report = billing.resume_pending().await?;
    /// assert_eq!((report.claimed, report.succeeded), (2, 2)); // the fixed fee and block 1
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn resume_pending(&self) -> Result<CollectionReport, BillingError> {
        async {
            let mut report = self.collect_claimed_of(None).await?;
            self.recheck_awaiting_customer(&mut report).await?;
            Ok(report)
        }
        .instrument(info_span!("resume_pending"))
        .await
    }

    /// Retries failed charges whose dunning delay has passed, each in a new round with a new
    /// idempotency key (a gateway replays a declined answer for a re-used key). Run it on a
    /// schedule, hourly say.
    ///
    /// # Errors
    /// Store errors while claiming.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use token_billing::{BillingService, CardBehaviour, CustomerId, InMemoryUsageStore, ManualClock, SandboxGateway, UsageReport, UserId};
    ///
    /// let clock = ManualClock::new(chrono::Utc::now());
    /// let sandbox = SandboxGateway::new();
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(sandbox.clone()))
    ///     .clock(Arc::new(clock.clone()))
    ///     .build();
    /// let customer = CustomerId::new("cus_123")?;
    /// sandbox.add_customer(customer.clone(), CardBehaviour::Declines { code: "insufficient_funds".into() });
    /// billing.register_account(&UserId::new("user-uuid")?, Some(customer.clone()), None).await?;
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?; // the fee is declined
    ///
    /// sandbox.set_behaviour(&customer, CardBehaviour::Succeeds)?;
    /// clock.advance(chrono::Duration::days(1));
    /// assert_eq!(billing.retry_failed().await?.succeeded, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn retry_failed(&self) -> Result<CollectionReport, BillingError> {
        async {
            let mut report = CollectionReport::default();
            // Claims are made as of the run's start, so the run ends even if its own retries fail
            // again with a short delay.
            let started = self.clock.now();
            let mut waiting = Vec::new();
            loop {
                let now = self.clock.now().max(started);
                let claimed = self
                    .store
                    .claim_due_retries(
                        started,
                        self.lease_until(now, self.settings.lease),
                        self.settings.batch_size,
                    )
                    .await?;
                if claimed.is_empty() {
                    self.give_up_leases(waiting, started).await;
                    return Ok(report);
                }
                report.claimed += claimed.len();
                let mut to_collect = Vec::with_capacity(claimed.len());
                for charge in claimed {
                    match self.close_previous_round(charge).await {
                        // Closed: the collection need not close it again.
                        Ok(mut charge) => {
                            charge.payment_id = None;
                            to_collect.push(charge);
                        }
                        Err(settled) => report.count(settled.status),
                    }
                }
                self.collect_all(to_collect, &mut report, &mut waiting).await;
            }
        }
        .instrument(info_span!("retry_failed"))
        .await
    }

    /// Retries a user's failed charges now, whatever their dunning schedule says: what a host
    /// does when the customer updates their card. Each charge starts a new round (a new
    /// idempotency key) and is looked up first, so a charge paid in the meantime is not paid
    /// again. Charges awaiting the customer's authentication are left to the customer. Other
    /// users' retries that are due are run too.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn retry_unpaid(&self, user: &UserId) -> Result<CollectionReport, BillingError> {
        let now = self.clock.now();
        for charge in self.store.unpaid_charges(user).await? {
            if charge.status != ChargeStatus::Failed {
                continue;
            }
            let due_now = Settlement {
                next_retry_at: Some(now),
                ..Settlement::of(&charge, ChargeStatus::Failed, now)
            };
            match self.store.settle_charge(due_now).await {
                Ok(_) | Err(StoreError::StatusConflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.retry_failed().await
    }

    /// Applies a payment's new state reported by the gateway (a webhook) to its charge,
    /// idempotently: a charge already in that state, or already succeeded, is left as it is.
    ///
    /// A success is always applied: money moved for the charge, whichever round it came from. A
    /// success for a charge already paid by another payment is a duplicate: it is recorded in
    /// the audit trail ([`AuditEvent::DuplicatePayment`](crate::AuditEvent::DuplicatePayment))
    /// and logged at `error` for the host to refund. A failure or a request for authentication
    /// that names another round, or another payment than the charge's, is stale (the charge was
    /// retried since) and is ignored; a charge awaiting the customer follows the payment it
    /// names, whichever round made it. A failed charge's payment reported in flight again
    /// (processing, or awaiting authentication) is applied only when the gateway's payment is in
    /// that state now: the update may be an earlier state of the payment, delivered after its
    /// failure, since gateways do not keep their events in order.
    ///
    /// # Errors
    /// [`BillingError::ChargeNotFound`]; store errors; gateway errors when a failed payment
    /// reported in flight again cannot be looked up (answer them so that the event is delivered
    /// again).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, ChargeStatus, PaymentOutcome, PaymentStatus, PaymentUpdate, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let user = UserId::new("user-uuid")?;
    /// let fee = billing.charges(&user, None).await?.remove(0);
    ///
    /// // What a webhook handler does with `payment_intent.succeeded`: applying it twice is harmless.
    /// let update = PaymentUpdate {
    ///     user_id: user,
    ///     charge_key: fee.key.clone(),
    ///     round: Some(fee.round),
    ///     outcome: PaymentOutcome { payment_id: fee.payment_id.clone().unwrap_or_default(), status: PaymentStatus::Succeeded, decline_code: None, message: None },
    /// };
    /// assert_eq!(billing.apply_payment_update(update.clone()).await?.status, ChargeStatus::Succeeded);
    /// assert_eq!(billing.apply_payment_update(update).await?.status, ChargeStatus::Succeeded);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn apply_payment_update(&self, update: PaymentUpdate) -> Result<Charge, BillingError> {
        let span = info_span!("apply_payment_update", user = %update.user_id, charge = %update.charge_key);
        async {
            let target = match update.outcome.status {
                PaymentStatus::Succeeded => ChargeStatus::Succeeded,
                PaymentStatus::RequiresAction => ChargeStatus::RequiresAction,
                PaymentStatus::Declined | PaymentStatus::Canceled => ChargeStatus::Failed,
                _ => ChargeStatus::Pending,
            };
            loop {
                let charge = self
                    .store
                    .charge(&update.user_id, &update.charge_key)
                    .await?
                    .ok_or_else(|| BillingError::ChargeNotFound {
                        key: update.charge_key.to_string(),
                    })?;
                // A failure or authentication request is stale when it names another round, or
                // another payment than the one the charge is waiting on. A charge awaiting the
                // customer waits on the payment it names, whichever round made it: a new round
                // waits on the previous round's payment when that one could not be cancelled.
                let names_another_payment = charge
                    .payment_id
                    .as_ref()
                    .is_some_and(|p| *p != update.outcome.payment_id);
                let waits_on_it = charge.status == ChargeStatus::RequiresAction && !names_another_payment;
                let stale = target != ChargeStatus::Succeeded
                    && (names_another_payment || (!waits_on_it && update.round.is_some_and(|r| r != charge.round)));
                if target == ChargeStatus::Succeeded
                    && charge.status == ChargeStatus::Succeeded
                    && !update.outcome.payment_id.is_empty()
                    && charge.payment_id.as_ref() != Some(&update.outcome.payment_id)
                {
                    self.report_duplicate_payment(&charge, &update.outcome.payment_id)
                        .await?;
                    return Ok(charge);
                }
                if stale || charge.status == target || !charge.status.can_become(target) {
                    debug!(status = %charge.status, stale, "payment update changes nothing");
                    return Ok(charge);
                }
                // A failed payment in flight again (processing, awaiting authentication) is
                // either the customer trying it again or an earlier state of it delivered after
                // its failure: gateways do not keep their events in order. Only the gateway's
                // payment as it is now tells them apart.
                if charge.status == ChargeStatus::Failed
                    && target != ChargeStatus::Succeeded
                    && !self.in_flight_again(&charge, &update.outcome).await?
                {
                    debug!("an earlier state of a failed payment, delivered late: changes nothing");
                    return Ok(charge);
                }
                match self.try_settle(&charge, Ok(update.outcome.clone())).await {
                    Ok(settled) => {
                        info!(status = %settled.status, "payment update applied");
                        return Ok(settled);
                    }
                    // Changed under us: read it again and decide again.
                    Err(StoreError::StatusConflict { .. }) => continue,
                    Err(error) => return Err(error.into()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Whether the gateway's payment for `charge` is now the one `reported`, in its state: a
    /// failed payment reported in flight again really is.
    async fn in_flight_again(&self, charge: &Charge, reported: &PaymentOutcome) -> Result<bool, BillingError> {
        let now = self.gateway.find_payment(&charge.key).await?;
        Ok(now.is_some_and(|now| now.payment_id == reported.payment_id && now.status == reported.status))
    }

    /// Applies an event the gateway reported (a verified webhook), once per event id: a payment's
    /// new state goes through [`apply_payment_update`](Self::apply_payment_update), a paid
    /// subscription invoice through [`record_fixed_fee_paid`](Self::record_fixed_fee_paid) for
    /// the calendar month (in the user's plan's zone) its subscription period starts in.
    ///
    /// Returns the charge as it is after the event, or `None` when the event id was applied
    /// before (gateways deliver events at least once). The event is remembered only after it
    /// was applied, so an event whose application failed is applied when delivered again; two
    /// deliveries racing each other both apply it, which is harmless, because applying is
    /// idempotent.
    ///
    /// # Errors
    /// [`BillingError::InvalidId`] for an event id that is empty, longer than 255 bytes or not
    /// printable ASCII; [`BillingError::ChargeNotFound`] for a payment of a charge this store
    /// does not know (another environment sharing the gateway account, say: acknowledge it);
    /// [`BillingError::Gateway`] for a paid invoice in another currency than the plan's;
    /// [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks; gateway errors when a failed payment reported in flight again cannot be looked
    /// up, and store errors (answer these so that the gateway delivers the event again).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, ChargeStatus, GatewayChange, GatewayEvent, PaymentOutcome, PaymentStatus, PaymentUpdate, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let user = UserId::new("user-uuid")?;
    /// let fee = billing.charges(&user, None).await?.remove(0);
    /// let event = GatewayEvent {
    ///     id: "evt_1".to_owned(),
    ///     event_type: "payment_intent.succeeded".to_owned(),
    ///     change: GatewayChange::Payment(PaymentUpdate {
    ///         user_id: user.clone(),
    ///         charge_key: fee.key.clone(),
    ///         round: Some(0),
    ///         outcome: PaymentOutcome { payment_id: fee.payment_id.clone().unwrap_or_default(), status: PaymentStatus::Succeeded, decline_code: None, message: None },
    ///     }),
    /// };
    /// let charge = billing.apply_gateway_event(event.clone()).await?.expect("applied");
    /// assert_eq!(charge.status, ChargeStatus::Succeeded);
    /// // The same event delivered again is recognised and changes nothing.
    /// assert!(billing.apply_gateway_event(event).await?.is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn apply_gateway_event(&self, event: GatewayEvent) -> Result<Option<Charge>, BillingError> {
        let span =
            info_span!("apply_gateway_event", user = %event.user_id(), event = %event.id, kind = %event.event_type);
        async {
            check_identifier("gateway event id", &event.id, 255)?;
            let user = event.user_id().clone();
            if self.store.gateway_event_applied(&user, &event.id).await? {
                debug!("event already applied");
                return Ok(None);
            }
            let charge = match event.change {
                GatewayChange::Payment(update) => self.apply_payment_update(update).await?,
                GatewayChange::FixedFeePaid {
                    user_id,
                    period_start,
                    payment_id,
                    amount,
                } => {
                    let account = self.store.account(&user_id).await?;
                    let period = self.period_at(account.as_ref(), period_start)?.0.key();
                    self.record_fixed_fee_paid(&user_id, period, &payment_id, amount)
                        .await?
                }
            };
            self.store
                .record_gateway_event(GatewayEventRecord::applied(
                    user,
                    event.id,
                    event.event_type,
                    self.clock.now(),
                ))
                .await?;
            Ok(Some(charge))
        }
        .instrument(span)
        .await
    }

    /// Records and logs a second successful payment for a charge already paid: the money must be
    /// refunded by the host; the charge keeps its first payment. Reported once per duplicate
    /// payment, however often the gateway reports it.
    async fn report_duplicate_payment(&self, charge: &Charge, duplicate: &str) -> Result<(), BillingError> {
        let new = self
            .store
            .record_gateway_event(GatewayEventRecord {
                user_id: charge.user_id.clone(),
                event_id: format!("duplicate-payment:{duplicate}"),
                event_type: "duplicate_payment".to_owned(),
                at: self.clock.now(),
                period: Some(charge.period),
                audit: crate::store::AuditEvent::DuplicatePayment {
                    key: charge.key.clone(),
                    kept_payment_id: charge.payment_id.clone(),
                    duplicate_payment_id: duplicate.to_owned(),
                },
            })
            .await?;
        if new {
            tracing::error!(
                charge = %charge.key,
                kept = ?charge.payment_id,
                duplicate = %duplicate,
                "a second payment succeeded for a charge already paid: refund it"
            );
        }
        Ok(())
    }

    /// Opens a period for a user ahead of usage (a monthly job): with [`FeeCollection::Library`],
    /// creates and collects the fixed-fee charge unless it exists. Idempotent.
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, ChargeKind, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// let user = UserId::new("user-uuid")?;
    /// let fee = billing.open_period(&user, None).await?.expect("the library collects the fee");
    /// assert_eq!((fee.kind, fee.amount.minor_units()), (ChargeKind::FixedFee, 40000));
    /// // Opening again finds the same charge.
    /// assert_eq!(billing.open_period(&user, None).await?.map(|c| c.id), Some(fee.id));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn open_period(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Option<Charge>, BillingError> {
        let span = info_span!("open_period", user = %user, period = tracing::field::Empty);
        async {
            if self.settings.fee != FeeCollection::Library {
                return Ok(None);
            }
            let account = self.store.account(user).await?;
            let now = self.clock.now();
            let period = match period {
                Some(period) => period,
                None => self.period_at(account.as_ref(), now)?.0.key(),
            };
            tracing::Span::current().record("period", tracing::field::display(period));
            let plan = self.period_plan(account.as_ref(), period)?;
            let customer = self.customer_for(user, account.as_ref()).await?;
            let collect = customer.is_some() && self.settings.collection == CollectionMode::Immediate;
            let (charge, created) = self
                .store
                .ensure_charge(EnsureCharge {
                    charge: NewCharge::fixed_fee(plan, user, period, None),
                    status: ChargeStatus::Pending,
                    payment_id: None,
                    now,
                    lease_until: collect.then(|| self.lease_until(now, self.settings.lease)),
                    plan: Some(plan.clone()),
                })
                .await?;
            match customer {
                Some(customer) if created && collect => {
                    let mut charge = charge;
                    self.collect_charge(&mut charge, &customer).await;
                    Ok(Some(charge))
                }
                _ => Ok(Some(charge)),
            }
        }
        .instrument(span)
        .await
    }

    /// Subscribes the user's customer to the plan's fixed fee at the gateway (the seed's
    /// create-subscription) and keeps the subscription on the account. With
    /// [`FeeCollection::Subscription`], the gateway then collects the fee and the host reports
    /// each paid invoice with [`record_fixed_fee_paid`](Self::record_fixed_fee_paid).
    ///
    /// # Errors
    /// [`BillingError::FeeCollectedByLibrary`] unless the service runs with
    /// [`FeeCollection::Subscription`]: otherwise the fee would be collected twice, by the library
    /// and by the subscription. [`BillingError::NoCustomer`] when the user has no customer (and
    /// the policy opens none); [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks; gateway and store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{
    ///     BillingService, Currency, FeeCollection, InMemoryUsageStore, Money, SandboxGateway, UnregisteredUsers, UserId,
    /// };
    /// use std::sync::Arc;
    ///
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
    ///     .fee_collection(FeeCollection::Subscription)
    ///     .unregistered_users(UnregisteredUsers::OpenCustomer)
    ///     .build();
    /// let user = UserId::new("user-uuid")?;
    /// let subscription = billing.create_subscription(&user).await?;
    /// assert_eq!(subscription.status, "active");
    ///
    /// // Later, the gateway reports the month's invoice paid (a webhook), here with a 10% coupon;
    /// // reporting it twice is harmless.
    /// let paid = Money::from_minor(36_000, Currency::BRL);
    /// billing.record_fixed_fee_paid(&user, "2026-11".parse()?, "in_123", paid).await?;
    /// billing.record_fixed_fee_paid(&user, "2026-11".parse()?, "in_123", paid).await?;
    /// assert_eq!(billing.token_summary(&user, Some("2026-11".parse()?)).await?.fixed_fee_charged, 36000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn create_subscription(&self, user: &UserId) -> Result<Subscription, BillingError> {
        let span = info_span!("create_subscription", user = %user);
        async {
            if self.settings.fee != FeeCollection::Subscription {
                return Err(BillingError::FeeCollectedByLibrary);
            }
            let account = self.store.account(user).await?;
            let plan = self.current_plan(account.as_ref())?;
            let customer = self
                .customer_for(user, account.as_ref())
                .await?
                .ok_or_else(|| BillingError::NoCustomer { user_id: user.clone() })?;
            let account = self
                .store
                .account(user)
                .await?
                .ok_or_else(|| BillingError::NoCustomer { user_id: user.clone() })?;
            let subscription = self
                .gateway
                .create_subscription(user, &customer, &account.plan_id, plan)
                .await?;
            // Saved over the account as it is then, whatever else changed in it meanwhile.
            let mut expected = account;
            for _ in 0..ACCOUNT_ATTEMPTS {
                let subscribed = Account {
                    subscription_id: Some(subscription.subscription_id.clone()),
                    updated_at: self.clock.now(),
                    ..expected.clone()
                };
                if self.store.replace_account(Some(&expected), subscribed).await? {
                    info!(subscription = %subscription.subscription_id, "subscription created");
                    return Ok(subscription);
                }
                expected = self
                    .store
                    .account(user)
                    .await?
                    .ok_or_else(|| BillingError::NoCustomer { user_id: user.clone() })?;
            }
            Err(account_kept_changing(user))
        }
        .instrument(span)
        .await
    }

    /// Records that the gateway collected the period's fixed fee (its subscription invoice was
    /// paid), `amount` being what the invoice collected for it (after a discount, say), so that
    /// the summary's `fixed_fee_charged` is what was really collected. Exactly once per user and
    /// period: a repeated report changes nothing, and a fixed-fee charge the library had created
    /// is marked paid (at its own amount) instead of being charged again.
    ///
    /// # Errors
    /// Store errors; [`BillingError::Gateway`] when `amount` is in another currency than the
    /// plan that rates the period (nothing is recorded: the gateway's report does not fit);
    /// [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    pub async fn record_fixed_fee_paid(
        &self,
        user: &UserId,
        period: PeriodKey,
        payment_id: &str,
        amount: Money,
    ) -> Result<Charge, BillingError> {
        let span = info_span!("record_fixed_fee_paid", user = %user, period = %period, payment = %payment_id);
        async {
            let account = self.store.account(user).await?;
            let plan = self.period_plan(account.as_ref(), period)?;
            if amount.currency() != plan.currency() {
                return Err(BillingError::Gateway(GatewayError::Generic {
                    gateway: "fixed fee report",
                    source: format!(
                        "the fee was paid in {}, the plan bills {period} in {}",
                        amount.currency(),
                        plan.currency()
                    )
                    .into(),
                }));
            }
            let now = self.clock.now();
            let (charge, created) = self
                .store
                .ensure_charge(EnsureCharge {
                    charge: NewCharge {
                        amount,
                        ..NewCharge::fixed_fee(plan, user, period, None)
                    },
                    status: ChargeStatus::Succeeded,
                    payment_id: Some(payment_id.to_owned()),
                    now,
                    lease_until: None,
                    plan: Some(plan.clone()),
                })
                .await?;
            if created {
                info!("fixed fee recorded as paid");
                return Ok(charge);
            }
            // It existed: mark it paid if it was not, or report a second payment if it was.
            let outcome = PaymentOutcome {
                payment_id: payment_id.to_owned(),
                status: PaymentStatus::Succeeded,
                decline_code: None,
                message: None,
            };
            self.apply_payment_update(PaymentUpdate {
                user_id: user.clone(),
                charge_key: charge.key,
                round: None,
                outcome,
            })
            .await
        }
        .instrument(span)
        .await
    }

    /// The period asked for (the user's current one when `None`) and the plan that rates it.
    async fn period_of(&self, user: &UserId, period: Option<PeriodKey>) -> Result<(PeriodKey, &Plan), BillingError> {
        let account = self.store.account(user).await?;
        let period = match period {
            Some(period) => period,
            None => self.period_at(account.as_ref(), self.clock.now())?.0.key(),
        };
        Ok((period, self.period_plan(account.as_ref(), period)?))
    }

    /// The user's figures for a period (the current one when `None`): the seed's
    /// `getUserTokenSummary`. Constant time: read from the period summary the store keeps.
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 17_000_000, "chat")).await?;
    /// let summary = billing.token_summary(&UserId::new("user-uuid")?, None).await?;
    /// assert_eq!(summary.current_tier, "16M-24M");
    /// assert_eq!((summary.fixed_fee_charged, summary.tier_charges_count, summary.tier_charges_total), (40000, 2, 20000));
    /// assert_eq!(summary.total_charged, 60000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn token_summary(&self, user: &UserId, period: Option<PeriodKey>) -> Result<TokenSummary, BillingError> {
        let (period, plan) = self.period_of(user, period).await?;
        let summary = self.store.period_summary(user, period).await?;
        let currency = summary.as_ref().map_or(plan.currency(), |s| s.currency);
        let zero = Money::zero(currency);
        let total_tokens = summary.as_ref().map_or(0, |s| s.total_tokens);
        let fixed_fee_charged = summary.as_ref().map_or(zero, |s| s.fixed_fee_charged);
        let tier_charges_total = summary.as_ref().map_or(zero, |s| s.tier_charges_total);
        let total_charged = fixed_fee_charged.checked_add(tier_charges_total).map_err(|e| {
            BillingError::Store(StoreError::Generic {
                store: "summary",
                source: Box::new(e),
            })
        })?;
        Ok(TokenSummary {
            user_id: user.clone(),
            period,
            currency,
            total_tokens,
            current_tier: plan.tier_of(total_tokens)?.label(),
            fixed_fee_charged: fixed_fee_charged.minor_units(),
            tier_charges_count: summary.as_ref().map_or(0, |s| s.tier_charges_count),
            tier_charges_total: tier_charges_total.minor_units(),
            total_charged: total_charged.minor_units(),
            outstanding_count: summary.as_ref().map_or(0, |s| s.outstanding_count),
            outstanding_total: summary.as_ref().map_or(0, |s| s.outstanding_total.minor_units()),
        })
    }

    /// Tokens and operation counts by operation type in a period (the current one when `None`):
    /// the seed's "consumo de tokens por operação".
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 1_000, "chat")).await?;
    /// billing.process_token_usage(UsageReport::new("user-uuid", 2_000, "chat")).await?;
    /// billing.process_token_usage(UsageReport::new("user-uuid", 500, "embedding")).await?;
    /// let rows = billing.usage_by_operation(&UserId::new("user-uuid")?, None).await?;
    /// assert_eq!((rows[0].operation_type.as_str(), rows[0].total_tokens, rows[0].operations), ("chat", 3_000, 2));
    /// assert_eq!((rows[1].operation_type.as_str(), rows[1].total_tokens, rows[1].operations), ("embedding", 500, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn usage_by_operation(
        &self,
        user: &UserId,
        period: Option<PeriodKey>,
    ) -> Result<Vec<OperationUsage>, BillingError> {
        let (period, _) = self.period_of(user, period).await?;
        Ok(self.store.usage_by_operation(user, period).await?)
    }

    /// Charge counts and amounts by tier in a period (the current one when `None`): the seed's
    /// "cobranças por faixas no período".
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 9_000_000, "chat")).await?;
    /// let rows = billing.charges_by_tier(&UserId::new("user-uuid")?, None).await?;
    /// let tiers: Vec<_> = rows.iter().map(|r| (r.billing_tier.as_str(), r.charges_count, r.total_charged.minor_units())).collect();
    /// assert_eq!(tiers, [("0-8M", 1, 40000), ("8M-16M", 1, 10000)]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn charges_by_tier(
        &self,
        user: &UserId,
        period: Option<PeriodKey>,
    ) -> Result<Vec<TierChargeReport>, BillingError> {
        let (period, _) = self.period_of(user, period).await?;
        Ok(self.store.charges_by_tier(user, period).await?)
    }

    /// The user's charges in a period (the current one when `None`).
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn charges(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<Charge>, BillingError> {
        let (period, _) = self.period_of(user, period).await?;
        Ok(self.store.charges(user, period).await?)
    }

    /// Whether the account is in good standing or past due, and what it owes. A host may refuse
    /// usage from past-due accounts.
    ///
    /// # Errors
    /// Store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, Standing, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let standing = billing.account_standing(&UserId::new("user-uuid")?).await?;
    /// assert_eq!(standing.standing, Standing::GoodStanding);
    /// assert!(standing.unpaid_charges.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user))]
    pub async fn account_standing(&self, user: &UserId) -> Result<AccountStanding, BillingError> {
        let unpaid_charges = self.store.unpaid_charges(user).await?;
        Ok(AccountStanding {
            standing: if unpaid_charges.is_empty() {
                Standing::GoodStanding
            } else {
                Standing::PastDue
            },
            unpaid_charges,
        })
    }

    /// The user's audit trail (of one period, or all of it), oldest first.
    ///
    /// # Errors
    /// Store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{AuditEvent, BillingService, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// billing.process_token_usage(UsageReport::new("user-uuid", 100, "chat")).await?;
    /// let trail = billing.audit_trail(&UserId::new("user-uuid")?, None).await?;
    /// assert!(trail.iter().any(|entry| matches!(entry.event, AuditEvent::UsageRecorded { tokens: 100, .. })));
    /// assert!(trail.iter().any(|entry| matches!(entry.event, AuditEvent::ChargeStatusChanged { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, BillingError> {
        Ok(self.store.audit_trail(user, period).await?)
    }
}

/// A store that answered against its contract (a batch operation with a different number of
/// answers than questions): nothing can be matched safely, so nothing is answered.
fn store_contract(what: String) -> BillingError {
    BillingError::Store(StoreError::Generic {
        store: "store contract",
        source: what.into(),
    })
}
