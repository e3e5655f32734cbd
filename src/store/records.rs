//! What a store keeps besides usage and charges: accounts, period summaries (and the deltas that
//! move them), the rows of the monitoring reports (by operation, by tier, by model), and the audit trail.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    BillableTokens, BillableTotal, ChargeKey, ChargeKind, ChargeStatus, Currency, CustomerId, EventId, Limits,
    ModelName, Money, OperationType, PeriodKey, PlanId, TierLabel, TokenCounts, UsageRecord, UserId,
};

/// The link between a user, the gateway's customer that pays, and the user's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The user.
    pub user_id: UserId,
    /// The gateway's customer, once known. Charges of a user without one wait, pending.
    pub customer_id: Option<CustomerId>,
    /// The user's plan in the service's catalogue, for the current period on.
    pub plan_id: PlanId,
    /// The plans the user had before, each with the first period it no longer applied to,
    /// oldest first: late usage and summaries of a past period are rated under that period's
    /// plan ([`Account::plan_for`]).
    #[serde(default)]
    pub earlier_plans: Vec<(PeriodKey, PlanId)>,
    /// The gateway subscription that collects the fixed fee, when there is one.
    pub subscription_id: Option<String>,
    /// The account's own limits; `None` takes its plan's ([`Plan::limits`](crate::Plan::limits)).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// When the account was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl Account {
    /// The plan that rates `period`.
    ///
    /// # Example
    /// ```
    /// use token_billing::{Account, PlanId, UserId};
    ///
    /// let now = chrono::Utc::now();
    /// let account = Account {
    ///     user_id: UserId::new("u")?,
    ///     customer_id: None,
    ///     plan_id: PlanId::new("pro")?,
    ///     earlier_plans: vec![("2026-12".parse()?, PlanId::new("default")?)],
    ///     subscription_id: None,
    ///     limits: None,
    ///     created_at: now,
    ///     updated_at: now,
    /// };
    /// assert_eq!(account.plan_for("2026-11".parse()?).as_str(), "default");
    /// assert_eq!(account.plan_for("2026-12".parse()?).as_str(), "pro");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn plan_for(&self, period: PeriodKey) -> &PlanId {
        self.earlier_plans
            .iter()
            .find(|(until, _)| period < *until)
            .map_or(&self.plan_id, |(_, plan)| plan)
    }

    /// The account with plan ids of its own, for a store that keeps it and clones it for every
    /// event. A plan id too long to be kept in place is shared text, which most accounts would
    /// share, and threads cloning different users' accounts would otherwise all write its one
    /// reference count (a cache line moving between cores on every event).
    pub(crate) fn with_own_plan_ids(mut self) -> Account {
        self.plan_id = self.plan_id.unshared();
        for (_, plan) in &mut self.earlier_plans {
            *plan = plan.unshared();
        }
        self
    }
}

/// A user's running figures for one period: the original product's `token_usage_summary` row. Stores keep it
/// up to date on every write, so a summary is read in constant time, never by scanning events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodSummary {
    /// The user.
    pub user_id: UserId,
    /// The period.
    pub period: PeriodKey,
    /// The currency of the period's charges.
    pub currency: Currency,
    /// Billable tokens recorded in the period, rounded up to a whole token (without a rate card,
    /// the tokens recorded). Blocks, tiers and caps are decided on it.
    pub total_tokens: u64,
    /// What rounding the billable total up to `total_tokens` added, in millionths of a token
    /// (zero unless a rate card gives tokens fractional weights): the exact total is
    /// [`billable_total`](Self::billable_total)`().exact()`.
    #[serde(default)]
    pub billable_credit_micros: u32,
    /// Usage events recorded in the period.
    pub events: u64,
    /// The fixed fee really collected (succeeded).
    pub fixed_fee_charged: Money,
    /// Block charges collected (succeeded).
    pub tier_charges_count: u64,
    /// Their amount.
    pub tier_charges_total: Money,
    /// Charges created but not collected yet (pending, failed or awaiting the customer).
    pub outstanding_count: u64,
    /// Their amount.
    pub outstanding_total: Money,
    /// When the summary last changed.
    pub updated_at: DateTime<Utc>,
}

impl PeriodSummary {
    /// The summary of a period with nothing recorded.
    pub fn empty(user_id: UserId, period: PeriodKey, currency: Currency, now: DateTime<Utc>) -> PeriodSummary {
        PeriodSummary {
            user_id,
            period,
            currency,
            total_tokens: 0,
            billable_credit_micros: 0,
            events: 0,
            fixed_fee_charged: Money::zero(currency),
            tier_charges_count: 0,
            tier_charges_total: Money::zero(currency),
            outstanding_count: 0,
            outstanding_total: Money::zero(currency),
            updated_at: now,
        }
    }
}

impl PeriodSummary {
    /// Moves the figures for a charge of `kind` and `amount` entering `to` (from `from`, or
    /// newly created): the one bookkeeping rule of every store.
    pub(crate) fn apply_charge(
        &mut self,
        kind: ChargeKind,
        amount: Money,
        from: Option<ChargeStatus>,
        to: ChargeStatus,
    ) -> Result<(), crate::MoneyError> {
        if amount.currency() != self.currency {
            return Err(crate::MoneyError::CurrencyMismatch {
                left: self.currency,
                right: amount.currency(),
            });
        }
        SummaryDelta::of(kind, amount.minor_units(), from, to).apply(self)
    }

    /// The period's billable total, exact.
    pub fn billable_total(&self) -> BillableTotal {
        BillableTotal {
            tokens: self.total_tokens,
            credit_micros: self.billable_credit_micros,
        }
    }
}

/// How a charge entering a status moves its period's summary: the one bookkeeping rule every
/// store applies, so summaries agree with charges in all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SummaryDelta {
    pub(crate) outstanding_count: i64,
    pub(crate) outstanding_total: i64,
    pub(crate) fixed_fee_charged: i64,
    pub(crate) tier_charges_count: i64,
    pub(crate) tier_charges_total: i64,
}

impl SummaryDelta {
    /// The change for a charge of `kind` and `amount` (minor units) moving from `from` (`None`
    /// when it is created) to `to`.
    pub(crate) fn of(kind: ChargeKind, amount: i64, from: Option<ChargeStatus>, to: ChargeStatus) -> SummaryDelta {
        let was_open = from.is_some_and(|f| f != ChargeStatus::Succeeded);
        let was_paid = from == Some(ChargeStatus::Succeeded);
        let is_paid = to == ChargeStatus::Succeeded;
        let mut delta = SummaryDelta::default();
        if from.is_none() && !is_paid {
            delta.outstanding_count = 1;
            delta.outstanding_total = amount;
        }
        if was_open && is_paid {
            delta.outstanding_count = -1;
            delta.outstanding_total = -amount;
        }
        if is_paid && !was_paid {
            match kind {
                ChargeKind::FixedFee => delta.fixed_fee_charged = amount,
                ChargeKind::Block => {
                    delta.tier_charges_count = 1;
                    delta.tier_charges_total = amount;
                }
            }
        }
        delta
    }

    /// The sum of two changes; `None` on overflow.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn plus(self, other: SummaryDelta) -> Option<SummaryDelta> {
        Some(SummaryDelta {
            outstanding_count: self.outstanding_count.checked_add(other.outstanding_count)?,
            outstanding_total: self.outstanding_total.checked_add(other.outstanding_total)?,
            fixed_fee_charged: self.fixed_fee_charged.checked_add(other.fixed_fee_charged)?,
            tier_charges_count: self.tier_charges_count.checked_add(other.tier_charges_count)?,
            tier_charges_total: self.tier_charges_total.checked_add(other.tier_charges_total)?,
        })
    }

    /// Applies the change to a summary.
    pub(crate) fn apply(self, summary: &mut PeriodSummary) -> Result<(), crate::MoneyError> {
        let currency = summary.currency;
        let add_count = |count: u64, by: i64| {
            count
                .checked_add_signed(by)
                .ok_or(crate::MoneyError::OutOfRange { currency })
        };
        let add_money = |money: Money, by: i64| money.checked_add(Money::from_minor(by, currency));
        summary.outstanding_count = add_count(summary.outstanding_count, self.outstanding_count)?;
        summary.outstanding_total = add_money(summary.outstanding_total, self.outstanding_total)?;
        summary.fixed_fee_charged = add_money(summary.fixed_fee_charged, self.fixed_fee_charged)?;
        summary.tier_charges_count = add_count(summary.tier_charges_count, self.tier_charges_count)?;
        summary.tier_charges_total = add_money(summary.tier_charges_total, self.tier_charges_total)?;
        Ok(())
    }
}

/// Tokens and operations of one operation type in a period (the original product's "consumo por operação").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationUsage {
    /// The operation type.
    pub operation_type: OperationType,
    /// Tokens used by it.
    pub total_tokens: u64,
    /// How many events reported it.
    pub operations: u64,
}

/// Tokens of one model in a period, by class, and the billable tokens they made: a row of
/// [`UsageStore::usage_by_model`](crate::UsageStore::usage_by_model).
///
/// # Example
/// ```
/// use token_billing::{BillableTokens, ModelUsage, TokenCounts};
///
/// let row = ModelUsage {
///     model: Some("gpt-4o".parse()?),
///     events: 2,
///     total_tokens: 1_500,
///     counts: TokenCounts { input: 1_000, output: 500, ..Default::default() },
///     billable: BillableTokens::whole(3_000),
/// };
/// assert_eq!(row.unclassified_tokens(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsage {
    /// The model; `None` for usage reported without one.
    pub model: Option<ModelName>,
    /// How many events reported it.
    pub events: u64,
    /// All their tokens (the original product's `tokens_used`), classified or not.
    pub total_tokens: u64,
    /// Their tokens by class, from the events that reported classes.
    pub counts: TokenCounts,
    /// Their exact billable tokens.
    pub billable: BillableTokens,
}

impl ModelUsage {
    /// An empty row for `model`.
    pub fn new(model: Option<ModelName>) -> ModelUsage {
        ModelUsage {
            model,
            events: 0,
            total_tokens: 0,
            counts: TokenCounts::default(),
            billable: BillableTokens::ZERO,
        }
    }

    /// Tokens of events that reported only their number, not their classes.
    pub fn unclassified_tokens(&self) -> u64 {
        self.total_tokens
            .saturating_sub(self.counts.total().unwrap_or(u64::MAX))
    }

    /// Counts one more event of the row's model. Saturates rather than overflow: a period's
    /// totals are bounded far below `u64` by the stores.
    pub fn add(&mut self, usage: &UsageRecord) {
        self.events += 1;
        self.total_tokens = self.total_tokens.saturating_add(usage.tokens);
        if let Some(counts) = usage.detail.as_ref().and_then(|d| d.counts) {
            self.counts = self.counts.checked_add(&counts).unwrap_or(self.counts);
        }
        self.billable = self.billable.checked_add(usage.billable()).unwrap_or(self.billable);
    }
}

/// Charges of one tier in a period (the original product's "cobranças por faixas").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierChargeReport {
    /// The tier label.
    pub billing_tier: TierLabel,
    /// Charges created in the tier, whatever their status, as the original product's query counts them.
    pub charges_count: u64,
    /// Their amount.
    pub total_charged: Money,
    /// The part of it collected (succeeded).
    pub collected: Money,
}

/// One line of the audit trail: every consumption, charge creation, collection attempt and status
/// change is recorded by the store in the same atomic operation as the change itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub at: DateTime<Utc>,
    /// Whose.
    pub user_id: UserId,
    /// Which period, when the entry is about one.
    pub period: Option<PeriodKey>,
    /// What happened.
    pub event: AuditEvent,
}

/// What an [`AuditEntry`] records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditEvent {
    /// A usage event was recorded.
    UsageRecorded {
        /// The consumption.
        consumption_id: Uuid,
        /// Its event id.
        event_id: EventId,
        /// Its tokens.
        tokens: u64,
        /// The period total after it.
        total_after: u64,
    },
    /// The gateway reported a second successful payment for a charge already paid: money to
    /// refund. Recorded, logged at `error`, and never applied to the charge.
    DuplicatePayment {
        /// The charge.
        key: ChargeKey,
        /// The payment the charge is settled with.
        kept_payment_id: Option<String>,
        /// The other payment.
        duplicate_payment_id: String,
    },
    /// A charge was created.
    ChargeCreated {
        /// The charge.
        key: ChargeKey,
        /// Its tier label.
        billing_tier: TierLabel,
        /// Its amount.
        amount: Money,
        /// Its first status.
        status: ChargeStatus,
    },
    /// A charge was claimed for collection: a gateway call follows, unless the user has no
    /// customer yet.
    CollectionStarted {
        /// The charge.
        key: ChargeKey,
        /// Its round.
        round: u32,
        /// The attempt number, over all rounds.
        attempt: u32,
    },
    /// A charge changed status.
    ChargeStatusChanged {
        /// The charge.
        key: ChargeKey,
        /// Before.
        from: ChargeStatus,
        /// After.
        to: ChargeStatus,
        /// The gateway's payment reference.
        payment_id: Option<String>,
        /// The decline code, for failures.
        failure_code: Option<String>,
    },
    /// A gateway event (a webhook) was applied; a later delivery of the same event id is
    /// ignored.
    GatewayEventApplied {
        /// The gateway's event id.
        event_id: String,
        /// The gateway's event type (`payment_intent.succeeded`).
        event_type: String,
    },
    /// An account was registered or changed.
    AccountSaved {
        /// Its customer.
        customer_id: Option<CustomerId>,
        /// Its plan.
        plan_id: PlanId,
    },
}

/// The columns of a consumption's token classes in the SQL stores, in [`TokenClass::ALL`](crate::TokenClass::ALL)'s order.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) const CLASS_COLUMNS: [&str; 5] = [
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
];
