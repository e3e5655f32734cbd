//! [`BillingService`]: the only place that sequences the store and the gateway.
//!
//! One type, one file per responsibility, each adding the `impl` block of its own:
//! - this file: the service, its builder and settings, and the plan and period look-ups every
//!   room uses;
//! - `usage`: recording usage, single and in batches, and placing events in periods;
//! - `collection`: collecting charges, `resume_pending`, claims and leases;
//! - `dunning`: the retry schedule, `retry_failed`, `retry_unpaid`;
//! - `gateway_events`: payment updates and gateway events (webhooks);
//! - `accounts`: registering accounts, opening customers;
//! - `fixed_fee`: the fixed fee, by the library or a gateway subscription;
//! - `fixed_fee_start`: starting the fee with a customer the host names;
//! - `reports`: summaries, standing, the monitoring reports, the audit trail.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::clock::{Clock, SystemClock};
use crate::domain::{AlertPolicy, FeeCollection, Period, PeriodKey, Plan, PlanId, UserId};
use crate::error::BillingError;
use crate::gateway::{PaymentGateway, SandboxGateway};
use crate::store::{Account, InMemoryUsageStore, StoreError, UsageStore};

mod accounts;
mod collection;
mod dunning;
mod fixed_fee;
mod fixed_fee_start;
mod gateway_events;
mod metrics;
mod report;
mod reports;
mod spend;
mod usage;

pub use collection::CollectionReport;
pub use dunning::DunningSchedule;
pub use metrics::describe_metrics;
pub use report::{TierCharge, UsageOutcome, UsageReport};
pub use reports::{AccountStanding, Standing, TokenSummary};
pub use spend::{HoldGrant, Reservation, SettledHold, UsageCheck};

/// When charges are collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CollectionMode {
    /// In the call that created them, as the original product does: the outcome shows each charge's status.
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
    /// default plan. What the embedded default does with the sandbox, so that the original product's own
    /// examples run as written.
    OpenCustomer,
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
    payment_gate_grace: Duration,
    hold_ttl: Duration,
    max_hold_ttl: Duration,
    alerts: AlertPolicy,
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

    /// The default plan, under the id `default` (the original product's plan unless set).
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
    /// default, at least a second; a webhook usually settles it first).
    pub fn processing_recheck(mut self, after: Duration) -> Self {
        // A run claims as of its start what is due then: a recheck due at once would be claimed
        // again by the run that rechecked it, for ever.
        self.settings.processing_recheck = after.max(Duration::from_secs(1));
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

    /// How long a charge may stay unpaid (failed, or awaiting the customer) before the payment
    /// gate of an account that has one ([`Limits::payment_gate`](crate::Limits)) lets no usage
    /// start a new block (zero: at once). Counted from the charge's creation, so that retries
    /// do not move it.
    pub fn payment_gate_grace(mut self, grace: Duration) -> Self {
        self.settings.payment_gate_grace = grace;
        self
    }

    /// How long a hold lasts when the reservation names no time to live (five minutes), and the
    /// longest one may ask for (a day): past it, a hold stops counting by itself.
    pub fn hold_ttl(mut self, default: Duration, max: Duration) -> Self {
        self.settings.max_hold_ttl = max.max(Duration::from_secs(1));
        self.settings.hold_ttl = default.clamp(Duration::from_secs(1), self.settings.max_hold_ttl);
        self
    }

    /// The thresholds that create alerts ([`AlertPolicy::none`] by default): each crossing
    /// creates one alert per user and period, in the step that records the event, for hosts to
    /// read with [`BillingService::pending_alerts`].
    pub fn alerts(mut self, policy: AlertPolicy) -> Self {
        self.settings.alerts = policy;
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
    /// A builder over a store and a gateway, with the original product's plan and the defaults of
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
                payment_gate_grace: Duration::ZERO,
                hold_ttl: Duration::from_secs(300),
                max_hold_ttl: Duration::from_secs(24 * 3600),
                alerts: AlertPolicy::none(),
            },
        }
    }

    /// The embedded default: the original product's plan on an [`InMemoryUsageStore`] and a
    /// [`SandboxGateway`] that opens a customer for every new user, so the original product's examples run
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
        // A plan retired from the catalogue draws no boundary: its periods cannot be rated, and
        // the periods beside them keep their own plans' calendars.
        let one_zone = |account: &Account| {
            account
                .earlier_plans
                .iter()
                .all(|(_, id)| self.plan(id).map_or(true, |plan| plan.zone() == current.zone()))
        };
        let Some(account) = account.filter(|account| !one_zone(account)) else {
            return Ok((candidate, self.period_plan(account, candidate.key())?));
        };
        // Zones move a month's ends by about a day, and each period starts where the one before
        // it ends: the walk from the current plan's month takes a step at most.
        let mut key = candidate.key();
        for _ in 0..4 {
            let (found, plan) = self.period_bounds(Some(account), key)?;
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

    /// The period `key` of the user as [`period_at`](Self::period_at) draws it, and the plan that
    /// rates it: it ends where its month ends in that plan's zone, and starts where the period
    /// before it ends (in the zone of the plan that rated that one, unless that plan is gone
    /// from the catalogue).
    pub(super) fn period_bounds(
        &self,
        account: Option<&Account>,
        key: PeriodKey,
    ) -> Result<(Period, &Plan), BillingError> {
        let plan = self.period_plan(account, key)?;
        let before = self
            .period_plan(account, key.previous())
            .map_or(plan.zone(), Plan::zone);
        if before == plan.zone() {
            return Ok((Period::new(key, plan.zone()), plan));
        }
        let start = Period::new(key.previous(), before).end();
        let end = Period::new(key, plan.zone()).end();
        Ok((Period::from_bounds(key, start, end), plan))
    }

    fn lease_until(&self, now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
        crate::clock::later(now, lease)
    }
}

/// A store that answered against its contract (a batch operation with a different number of
/// answers than questions): nothing can be matched safely, so nothing is answered.
pub(super) fn store_contract(what: String) -> BillingError {
    BillingError::Store(StoreError::Generic {
        store: "store contract",
        source: what.into(),
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    const ZONES: [chrono_tz::Tz; 7] = [
        chrono_tz::America::Sao_Paulo,
        chrono_tz::Asia::Tokyo,
        chrono_tz::UTC,
        chrono_tz::America::New_York,
        chrono_tz::Asia::Kathmandu,
        chrono_tz::Pacific::Chatham,
        chrono_tz::Pacific::Pago_Pago,
    ];

    fn plan_id(zone: usize) -> PlanId {
        PlanId::new(format!("zone-{zone}")).expect("a plan id")
    }

    /// A service whose catalogue has a plan in each of `ZONES`.
    fn service() -> BillingService {
        let builder = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()));
        ZONES
            .iter()
            .enumerate()
            .fold(builder, |builder, (i, zone)| {
                builder.add_plan(plan_id(i), Plan::builder().zone(*zone).build().expect("a plan"))
            })
            .build()
    }

    proptest! {
        /// Whatever zones an account's plans were in, `period_at` places every instant in
        /// exactly one period: the one that contains it, which ends where its month ends in the
        /// zone of the plan that rates it and starts where the period before it ends.
        #[test]
        fn periods_tile_time_across_plans_in_different_zones(
            zones in proptest::collection::vec(0..ZONES.len(), 1..6),
            first_month in 1u32..=12,
            gaps in proptest::collection::vec(1u32..4, 5),
            seconds in 0i64..(2 * 366 * 24 * 3600),
        ) {
            let billing = service();
            // Plans changed at the given months: each earlier plan applies before its `until`.
            let mut until = PeriodKey::new(2026, first_month).expect("a month");
            let mut earlier_plans = Vec::new();
            for i in 1..zones.len() {
                earlier_plans.push((until, plan_id(zones[i - 1])));
                for _ in 0..gaps[i % gaps.len()] {
                    until = until.next();
                }
            }
            let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("an instant");
            let account = Account {
                user_id: UserId::new("tiled").expect("a user"),
                customer_id: None,
                plan_id: plan_id(*zones.last().expect("one zone at least")),
                earlier_plans,
                subscription_id: None,
                limits: None,
                created_at: now,
                updated_at: now,
            };
            let instant = now + chrono::Duration::seconds(seconds);
            let (period, plan) = billing.period_at(Some(&account), instant).expect("placed");
            prop_assert!(period.start() <= instant && instant < period.end(), "{period:?} {instant}");
            prop_assert_eq!(plan, billing.period_plan(Some(&account), period.key()).expect("a plan"));
            prop_assert_eq!(period.end(), Period::new(period.key(), plan.zone()).end());
            let before = billing.period_plan(Some(&account), period.key().previous()).expect("a plan");
            prop_assert_eq!(period.start(), Period::new(period.key().previous(), before.zone()).end());
        }
    }
}
