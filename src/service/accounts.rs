//! Accounts: registering a user's customer and plan, and opening a customer for a user who has
//! none.

use chrono::{DateTime, Utc};
use tracing::{Instrument, debug, info, info_span};

use crate::domain::{CustomerId, Limits, PlanError, PlanId, UserId};
use crate::error::BillingError;
use crate::store::Account;

use super::{ACCOUNT_ATTEMPTS, BillingService, UnregisteredUsers, account_kept_changing, period_containing};

impl BillingService {
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
            let account = self.save_registration(user, customer, plan_id).await?;
            if account.customer_id.is_some() {
                self.collect_claimed_of(Some(user)).await?;
            }
            Ok(account)
        }
        .instrument(span)
        .await
    }

    /// Sets the user's own limits, or with `None` clears them so that the plan's apply
    /// ([`Plan::limits`](crate::Plan::limits)); a user without an account is registered on the
    /// default plan. The limits apply at once, to the current period included: usage already
    /// recorded stays, and a period already past a new cap refuses what would go further.
    ///
    /// # Errors
    /// [`BillingError::Plan`] with [`PlanError::SpendCapCurrency`] when the spend cap is not in
    /// the currency of the user's plan; [`BillingError::AccountPlanMissing`]; store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, Currency, Limits, Money};
    ///
    /// let billing = BillingService::embedded();
    /// let user = "user-uuid".parse()?;
    /// let cap = Limits::none().with_spend_cap(Money::from_minor(100_000, Currency::BRL));
    /// let account = billing.set_limits(&user, Some(cap)).await?;
    /// assert_eq!(account.limits, Some(cap));
    /// // A cap in another currency than the plan's is refused.
    /// let dollars = Limits::none().with_spend_cap(Money::from_minor(100, Currency::USD));
    /// assert!(billing.set_limits(&user, Some(dollars)).await.is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn set_limits(&self, user: &UserId, limits: Option<Limits>) -> Result<Account, BillingError> {
        for _ in 0..ACCOUNT_ATTEMPTS {
            let now = self.clock.now();
            let existing = self.store.account(user).await?;
            let account = Account {
                limits,
                ..self.registered(user, existing.as_ref(), None, None, now).await?
            };
            let currency = self.current_plan(Some(&account))?.currency();
            if let Some(cap) = limits.and_then(|limits| limits.spend_cap) {
                if cap.currency() != currency {
                    return Err(PlanError::SpendCapCurrency {
                        plan: currency,
                        spend_cap: cap.currency(),
                    }
                    .into());
                }
            }
            if self.store.replace_account(existing.as_ref(), account.clone()).await? {
                info!(user = %user, limits = ?account.limits, "limits set");
                return Ok(account);
            }
        }
        Err(account_kept_changing(user))
    }

    /// Saves the account `register_account` registers, collecting nothing.
    pub(super) async fn save_registration(
        &self,
        user: &UserId,
        customer: Option<CustomerId>,
        plan_id: Option<PlanId>,
    ) -> Result<Account, BillingError> {
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
                return Ok(account);
            }
            debug!("the account changed while it was registered: registering again over it");
        }
        Err(account_kept_changing(user))
    }

    /// The account `register_account` saves over `existing`, or why it may not.
    pub(super) async fn registered(
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
            // The period under way, by the plan being left; by the new one when the plan being
            // left is gone from the catalogue (its calendar is unknown, and a user on it could
            // otherwise never be moved off it).
            let period = match self.period_at(existing, now) {
                Ok((period, _)) => period.key(),
                Err(BillingError::AccountPlanMissing { .. }) => period_containing(now, plan.zone()).key(),
                Err(error) => return Err(error),
            };
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
            limits: existing.and_then(|a| a.limits),
            created_at: existing.map_or(now, |a| a.created_at),
            updated_at: now,
        })
    }

    /// The user's customer, opening one if the policy says so.
    pub(super) async fn customer_for(
        &self,
        user: &UserId,
        account: Option<&Account>,
    ) -> Result<Option<CustomerId>, BillingError> {
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
                    limits: None,
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
}
