//! The fixed fee: a period opened by the library (`open_period`), or a gateway subscription
//! (`create_subscription`) whose paid invoices are recorded (`record_fixed_fee_paid`).

use tracing::{Instrument, info, info_span};

use crate::domain::{Charge, ChargeStatus, FeeCollection, Money, NewCharge, PeriodKey, UserId};
use crate::error::BillingError;
use crate::gateway::{GatewayError, PaymentOutcome, PaymentStatus, PaymentUpdate, Subscription};
use crate::store::{Account, EnsureCharge};

use super::{ACCOUNT_ATTEMPTS, BillingService, CollectionMode, account_kept_changing, metrics};

impl BillingService {
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
            if created {
                metrics::charges_created(std::slice::from_ref(&charge));
            }
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

    /// Subscribes the user's customer to the plan's fixed fee at the gateway (the original product's
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
}
