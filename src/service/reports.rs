//! Reports: a user's summary, standing, charges, the original product's two monitoring queries,
//! usage by model and the audit trail.

use serde::{Deserialize, Serialize};

use crate::domain::{BillableTokens, Charge, Currency, Money, Period, PeriodKey, Plan, TierLabel, UserId};
use crate::error::BillingError;
use crate::store::{AuditEntry, ModelUsage, OperationUsage, StoreError, TierChargeReport};

use super::BillingService;

/// A user's figures for one period: the original product's `getUserTokenSummary`, with amounts in minor
/// units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    /// The user.
    pub user_id: UserId,
    /// The period, `YYYY-MM`.
    pub period: PeriodKey,
    /// The currency of every amount.
    pub currency: Currency,
    /// Billable tokens used in the period, rounded up to a whole token: the tokens used, unless
    /// a rate card weighs their classes. Tiers, blocks and caps are decided on it.
    pub total_tokens: u64,
    /// The exact billable tokens (`total_tokens` before rounding up).
    pub billable_tokens: BillableTokens,
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

impl BillingService {
    /// The period asked for (the user's current one when `None`) and the plan that rates it.
    async fn period_of(&self, user: &UserId, period: Option<PeriodKey>) -> Result<(PeriodKey, &Plan), BillingError> {
        let account = self.store.account(user).await?;
        let period = match period {
            Some(period) => period,
            None => self.period_at(account.as_ref(), self.clock.now())?.0.key(),
        };
        Ok((period, self.period_plan(account.as_ref(), period)?))
    }

    /// The user's period `period` (the current one when `None`) as the service draws it: a
    /// calendar month in the zone of the plan that rates it, which, after a move to a plan in
    /// another zone, starts where the period before it ended.
    ///
    /// # Errors
    /// [`BillingError::AccountPlanMissing`] when the plan that rates the period is gone from the
    /// catalogue; store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// let user = UserId::new("user-uuid")?;
    /// let november = billing.period(&user, Some("2026-11".parse()?)).await?;
    /// // The original product's plan bills by São Paulo's months (UTC-03:00).
    /// assert_eq!(november.start().to_rfc3339(), "2026-11-01T03:00:00+00:00");
    /// assert_eq!(november.end().to_rfc3339(), "2026-12-01T03:00:00+00:00");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn period(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Period, BillingError> {
        let account = self.store.account(user).await?;
        match period {
            Some(key) => Ok(self.period_bounds(account.as_ref(), key)?.0),
            None => Ok(self.period_at(account.as_ref(), self.clock.now())?.0),
        }
    }

    /// The user's figures for a period (the current one when `None`): the original product's
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
            billable_tokens: summary
                .as_ref()
                .map_or(BillableTokens::ZERO, |s| s.billable_total().exact()),
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
    /// the original product's "consumo de tokens por operação".
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

    /// Tokens by class and billable tokens by model in a period (the current one when `None`),
    /// ordered by model name, usage reported without a model first. Every event counts in one
    /// row: the rows' `billable` add up to the period's exact billable total.
    ///
    /// # Errors
    /// Store errors; [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, TokenCounts, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// let counts = TokenCounts { input: 700, cached_input: 2_000, output: 300, ..Default::default() };
    /// billing.process_token_usage(UsageReport::with_counts("user-uuid", counts, "chat").model("gpt-4o")).await?;
    /// billing.process_token_usage(UsageReport::new("user-uuid", 500, "embedding")).await?;
    /// let rows = billing.usage_by_model(&UserId::new("user-uuid")?, None).await?;
    /// assert_eq!(rows[0].model, None);
    /// assert_eq!((rows[0].total_tokens, rows[0].unclassified_tokens()), (500, 500));
    /// assert_eq!(rows[1].model.as_ref().map(|m| m.as_str()), Some("gpt-4o"));
    /// assert_eq!((rows[1].counts.cached_input, rows[1].billable.to_string().as_str()), (2_000, "3000"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(user = %user, period = ?period))]
    pub async fn usage_by_model(
        &self,
        user: &UserId,
        period: Option<PeriodKey>,
    ) -> Result<Vec<ModelUsage>, BillingError> {
        let (period, _) = self.period_of(user, period).await?;
        Ok(self.store.usage_by_model(user, period).await?)
    }

    /// Charge counts and amounts by tier in a period (the current one when `None`): the original product's
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
