//! Starting a user's fixed fee with a customer the host names (the original product's
//! create-subscription), in either fee mode: the customer is registered only once the gateway
//! has accepted it.

use tracing::{Instrument, info, info_span, warn};

use super::{ACCOUNT_ATTEMPTS, BillingService, account_kept_changing};
use crate::domain::{Charge, ChargeStatus, CustomerId, FeeCollection, UserId};
use crate::error::BillingError;
use crate::gateway::{GatewayError, Subscription};
use crate::store::Account;

/// The gateway's code for an object it does not have (a customer, here): Stripe's, which the
/// sandbox shares.
const RESOURCE_MISSING: &str = "resource_missing";

/// Refuses an account that pays with another customer than `named`.
fn same_customer(user: &UserId, account: Option<&Account>, named: &CustomerId) -> Result<(), BillingError> {
    match account.and_then(|a| a.customer_id.as_ref()) {
        Some(current) if current != named => Err(BillingError::OtherCustomer {
            user_id: user.clone(),
            current: current.clone(),
            named: named.clone(),
        }),
        _ => Ok(()),
    }
}

impl BillingService {
    /// Subscribes `customer` to the fixed fee of the user's plan at the gateway and then, only
    /// once the gateway has made the subscription, registers the customer and the subscription
    /// on the user's account (a new account on the default plan if the user has none). A
    /// gateway that refuses (a customer it does not have) leaves the account as it was.
    /// Idempotent: asked again, the gateway answers the subscription it made.
    ///
    /// Where [`create_subscription`](Self::create_subscription) subscribes the customer the
    /// account already names, this takes the customer from the caller, as the original
    /// product's create-subscription does.
    ///
    /// # Errors
    /// [`BillingError::FeeCollectedByLibrary`] unless the service runs with
    /// [`FeeCollection::Subscription`]; [`BillingError::OtherCustomer`] when the account pays
    /// with another customer (nothing is asked of the gateway); [`BillingError::Gateway`] with
    /// [`GatewayError::Rejected`] when the gateway refuses the customer, nothing registered;
    /// [`BillingError::AccountPlanMissing`]; gateway and store errors.
    ///
    /// The gateway is asked before the account is saved: should the account be given another
    /// customer in between, the subscription just made is left at the gateway (logged as an
    /// error, to be cancelled there) and [`BillingError::OtherCustomer`] is returned.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use token_billing::{BillingError, BillingService, CustomerId, FeeCollection, InMemoryUsageStore, SandboxGateway, UserId};
    ///
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
    ///     .fee_collection(FeeCollection::Subscription)
    ///     .build();
    /// let user = UserId::new("user-uuid")?;
    /// // The sandbox does not know this customer: nothing is registered.
    /// let refused = billing.subscribe_customer(&user, CustomerId::new("cus_unknown")?).await;
    /// assert!(matches!(refused, Err(BillingError::Gateway(_))));
    /// assert_eq!(billing.store().account(&user).await?, None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn subscribe_customer(&self, user: &UserId, customer: CustomerId) -> Result<Subscription, BillingError> {
        let span = info_span!("subscribe_customer", user = %user, customer = %customer);
        async {
            if self.settings.fee != FeeCollection::Subscription {
                return Err(BillingError::FeeCollectedByLibrary);
            }
            let existing = self.store.account(user).await?;
            same_customer(user, existing.as_ref(), &customer)?;
            let plan = self.current_plan(existing.as_ref())?;
            let plan_id = existing
                .as_ref()
                .map_or(&self.settings.default_plan_id, |a| &a.plan_id)
                .clone();
            let subscription = self
                .gateway
                .create_subscription(user, &customer, &plan_id, plan)
                .await?;
            // Saved only over the account as it is read, whatever else changed in it meanwhile.
            let mut expected = existing;
            for _ in 0..ACCOUNT_ATTEMPTS {
                if let Err(error) = same_customer(user, expected.as_ref(), &customer) {
                    tracing::error!(
                        subscription = %subscription.subscription_id,
                        "the account was given another customer while subscribing: cancel this subscription at the gateway"
                    );
                    return Err(error);
                }
                let newly_paying = expected.as_ref().is_none_or(|a| a.customer_id.is_none());
                let mut account = self
                    .registered(user, expected.as_ref(), Some(customer.clone()), None, self.clock.now())
                    .await?;
                account.subscription_id = Some(subscription.subscription_id.clone());
                if self.store.replace_account(expected.as_ref(), account).await? {
                    info!(subscription = %subscription.subscription_id, "customer subscribed and registered");
                    if newly_paying {
                        // Charges that waited for the user's customer are collected now.
                        self.collect_claimed_of(Some(user)).await?;
                    }
                    return Ok(subscription);
                }
                expected = self.store.account(user).await?;
            }
            Err(account_kept_changing(user))
        }
        .instrument(span)
        .await
    }

    /// Registers `customer` as the one who pays for the user (unless the account already names
    /// it) and opens the user's current period with [`open_period`](Self::open_period): with
    /// [`FeeCollection::Library`], the period's fixed fee is charged now, once however often
    /// this is called. Returns the fixed-fee charge, whose status says whether it was paid (a
    /// declined card leaves it failed, to dunning, and the customer registered). With
    /// [`FeeCollection::Subscription`] it changes nothing and returns `None`: use
    /// [`subscribe_customer`](Self::subscribe_customer).
    ///
    /// Charges that waited for the user's customer are collected with it one at a time. When the gateway refuses the customer (it does not have it: `resource_missing`),
    /// the registration made here is undone with a compare-and-set (a change made meanwhile by
    /// another caller is kept) and the refusal is returned; the one charge it was refused for
    /// stays failed (the period's fee, usually: owed whoever pays it), dunning retries it once
    /// the account has a customer, and a call of this method registering one retries it at
    /// once. The charges after it were never tried, and keep waiting.
    ///
    /// # Errors
    /// [`BillingError::OtherCustomer`] when the account pays with another customer (nothing is
    /// changed); [`BillingError::Gateway`] with [`GatewayError::Rejected`] when the gateway does
    /// not have the customer; [`BillingError::AccountPlanMissing`]; store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use token_billing::{BillingService, ChargeKind, ChargeStatus, CustomerId, InMemoryUsageStore, SandboxGateway, UserId};
    ///
    /// let sandbox = SandboxGateway::accepting_unknown_customers();
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(sandbox)).build();
    /// let user = UserId::new("user-uuid")?;
    /// let customer = CustomerId::new("cus_123")?;
    /// let fee = billing.open_period_for_customer(&user, customer.clone()).await?.expect("the library collects the fee");
    /// assert_eq!((fee.kind, fee.status, fee.amount.minor_units()), (ChargeKind::FixedFee, ChargeStatus::Succeeded, 40000));
    /// // Again: the same charge, not a second one.
    /// let again = billing.open_period_for_customer(&user, customer.clone()).await?.expect("the fee");
    /// assert_eq!(again.id, fee.id);
    /// assert_eq!(billing.store().account(&user).await?.and_then(|a| a.customer_id), Some(customer));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn open_period_for_customer(
        &self,
        user: &UserId,
        customer: CustomerId,
    ) -> Result<Option<Charge>, BillingError> {
        let span = info_span!("open_period_for_customer", user = %user, customer = %customer);
        async {
            if self.settings.fee != FeeCollection::Library {
                return Ok(None);
            }
            // A failure recorded from here on is this call's; one recorded before is older.
            let started = self.clock.now();
            let existing = self.store.account(user).await?;
            same_customer(user, existing.as_ref(), &customer)?;
            // Saved without collecting what waited for it: those charges are collected below,
            // one at a time, so that a customer the gateway does not have fails one charge at
            // most, not all of them.
            let registered = match existing.as_ref().and_then(|a| a.customer_id.as_ref()) {
                Some(_) => None,
                None => Some(self.save_registration(user, Some(customer.clone()), None).await?),
            };
            let Some(mut fee) = self.open_period(user, None).await? else {
                return Ok(None);
            };
            // A fee that failed before the customer was registered is retried with it now.
            if registered.is_some() && fee.status == ChargeStatus::Failed && fee.updated_at < started {
                self.retry_unpaid(user).await?;
                if let Some(retried) = self
                    .charges(user, Some(fee.period))
                    .await?
                    .into_iter()
                    .find(|c| c.id == fee.id)
                {
                    fee = retried;
                }
            }
            let refused = |charge: &Charge| {
                charge.status == ChargeStatus::Failed && charge.failure_code.as_deref() == Some(RESOURCE_MISSING)
            };
            let mut missing = refused(&fee);
            if !missing && registered.is_some() {
                missing = self.collect_waiting_one_by_one(user, &customer, refused).await?;
                if let Some(now) = self.store.charge(user, &fee.key).await? {
                    fee = now;
                }
            }
            if !missing {
                return Ok(Some(fee));
            }
            if let Some(registered) = registered {
                // Charges still waiting stay pending for the customer the host names next. Undone
                // only over the account as registered here: a registration made
                // meanwhile is another caller's, and is kept.
                let restored = Account {
                    customer_id: None,
                    updated_at: self.clock.now(),
                    ..registered.clone()
                };
                if self.store.replace_account(Some(&registered), restored).await? {
                    info!("the gateway does not have the customer: registration undone");
                } else {
                    warn!("the gateway does not have the customer, but the account changed meanwhile: kept as it is");
                }
            }
            Err(BillingError::Gateway(GatewayError::Rejected {
                gateway: self.gateway.name(),
                code: RESOURCE_MISSING.to_owned(),
                message: fee
                    .failure_message
                    .unwrap_or_else(|| format!("the gateway does not have customer {customer}")),
            }))
        }
        .instrument(span)
        .await
    }

    /// Collects the user's pending charges one at a time, in the store's order, with `customer`, until
    /// one is `refused` (the gateway does not have the customer): answers whether one was. The
    /// charges after it are not claimed, and wait as they were.
    async fn collect_waiting_one_by_one(
        &self,
        user: &UserId,
        customer: &CustomerId,
        refused: impl Fn(&Charge) -> bool,
    ) -> Result<bool, BillingError> {
        // As of the start, as a run claims: a charge this loop leased is not claimed again.
        let started = self.clock.now();
        loop {
            let now = self.clock.now().max(started);
            let mut claimed = self
                .store
                .claim_pending(Some(user), started, self.lease_until(now, self.settings.lease), 1)
                .await?;
            let Some(mut charge) = claimed.pop() else {
                return Ok(false);
            };
            self.collect_charge(&mut charge, customer).await;
            if refused(&charge) {
                return Ok(true);
            }
        }
    }
}
