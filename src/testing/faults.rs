//! Wrappers that inject faults into any store or gateway, to test what the service does when a
//! step fails, loses its answer, or never returns (a crash).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{Charge, ChargeKey, CustomerId, EventId, PeriodKey, Plan, PlanId, UsageRecord, UserId};
use crate::gateway::{GatewayError, PaymentGateway, PaymentOutcome, PaymentRequest, Subscription};
use crate::store::{
    Account, Alert, AuditEntry, EnsureCharge, GatewayEventRecord, Hold, HoldDecision, HoldRequest, OperationUsage,
    PeriodSummary, RecordUsage, Recorded, Settlement, SpendState, StoreError, TierChargeReport, UsageStore,
};

/// What an injected fault does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The call fails before reaching the wrapped store or gateway: nothing happens.
    FailBefore,
    /// The call reaches it and takes effect, then its answer is lost: the caller sees an error.
    FailAfter,
    /// The call never returns, as when the process dies there; a test drops the future to
    /// simulate the crash.
    Hang,
}

/// An operation of [`UsageStore`] that faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOp {
    /// [`UsageStore::put_account`] and [`UsageStore::replace_account`].
    PutAccount,
    /// [`UsageStore::account`].
    Account,
    /// [`UsageStore::record_usage`].
    RecordUsage,
    /// [`UsageStore::ensure_charge`].
    EnsureCharge,
    /// [`UsageStore::claim_pending`].
    ClaimPending,
    /// [`UsageStore::claim_due_retries`].
    ClaimDueRetries,
    /// [`UsageStore::claim_awaiting_customer`].
    ClaimAwaitingCustomer,
    /// [`UsageStore::renew_lease`].
    RenewLease,
    /// [`UsageStore::settle_charge`].
    SettleCharge,
    /// [`UsageStore::recorded_event`].
    RecordedEvent,
    /// [`UsageStore::append_audit`].
    AppendAudit,
    /// [`UsageStore::gateway_event_applied`].
    GatewayEventApplied,
    /// [`UsageStore::record_gateway_event`].
    RecordGatewayEvent,
    /// [`UsageStore::reserve`].
    Reserve,
    /// [`UsageStore::release_hold`].
    ReleaseHold,
}

/// An operation of [`PaymentGateway`] that faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GatewayOp {
    /// [`PaymentGateway::create_customer`].
    CreateCustomer,
    /// [`PaymentGateway::collect`].
    Collect,
    /// [`PaymentGateway::find_payment`].
    FindPayment,
    /// [`PaymentGateway::cancel_payment`].
    CancelPayment,
    /// [`PaymentGateway::create_subscription`].
    CreateSubscription,
}

/// A schedule of faults per operation: each injected fault applies to one call, in order.
#[derive(Debug)]
struct Schedule<Op> {
    queued: Mutex<HashMap<Op, Vec<Fault>>>,
    fired: Mutex<Vec<(Op, Fault)>>,
}

impl<Op> Default for Schedule<Op> {
    fn default() -> Self {
        Schedule {
            queued: Mutex::new(HashMap::new()),
            fired: Mutex::new(Vec::new()),
        }
    }
}

impl<Op: Copy + Eq + std::hash::Hash> Schedule<Op> {
    fn inject(&self, op: Op, fault: Fault, times: usize) {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        queued.entry(op).or_default().extend(std::iter::repeat_n(fault, times));
    }

    fn next(&self, op: Op) -> Option<Fault> {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let faults = queued.get_mut(&op)?;
        if faults.is_empty() {
            return None;
        }
        let fault = faults.remove(0);
        self.fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((op, fault));
        Some(fault)
    }

    fn clear(&self) {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn fired(&self) -> Vec<(Op, Fault)> {
        self.fired.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs `call` under the next fault scheduled for `op`, failing with `error(fault)`.
    async fn run<T, E, F>(&self, op: Op, call: F, error: impl Fn(Fault) -> E) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        match self.next(op) {
            None => call.await,
            Some(Fault::FailBefore) => Err(error(Fault::FailBefore)),
            Some(Fault::FailAfter) => {
                let _ = call.await;
                Err(error(Fault::FailAfter))
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault: {0:?}")]
struct Injected(Fault);

/// A [`UsageStore`] that fails chosen calls of the store it wraps.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use token_billing::InMemoryUsageStore;
/// use token_billing::testing::faults::{Fault, FaultyStore, StoreOp};
///
/// let store = FaultyStore::new(Arc::new(InMemoryUsageStore::new()));
/// // The next settlement is applied but its answer is lost.
/// store.inject(StoreOp::SettleCharge, Fault::FailAfter, 1);
/// ```
pub struct FaultyStore {
    inner: Arc<dyn UsageStore>,
    schedule: Schedule<StoreOp>,
    account_changes: AtomicUsize,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl FaultyStore {
    /// Wraps a store; no faults until injected.
    pub fn new(inner: Arc<dyn UsageStore>) -> FaultyStore {
        FaultyStore {
            inner,
            schedule: Schedule::default(),
            account_changes: AtomicUsize::new(0),
        }
    }

    /// Refuses the next `times` calls of `record_usage` with [`StoreError::AccountChanged`],
    /// giving each event back unrecorded, as a store that caches accounts does when another
    /// instance changed the user's account since it was read (this hook refuses records placed
    /// without an account too, which such a store would not check). This is how a host checks what its service does when
    /// its own store's cache goes stale.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use token_billing::testing::faults::FaultyStore;
    /// use token_billing::{BillingService, InMemoryUsageStore, SandboxGateway, UsageReport};
    ///
    /// let store = Arc::new(FaultyStore::new(Arc::new(InMemoryUsageStore::new())));
    /// let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new())).build();
    /// // The event is placed again with the account read afresh, and recorded once.
    /// store.refuse_as_account_changed(2);
    /// let outcome = billing.process_token_usage(UsageReport::new("ana", 1_000, "chat")).await?;
    /// assert_eq!(outcome.total_tokens, 1_000);
    /// # Ok::<(), token_billing::BillingError>(())
    /// # }).unwrap();
    /// ```
    pub fn refuse_as_account_changed(&self, times: usize) {
        self.account_changes.fetch_add(times, Ordering::SeqCst);
    }

    /// Makes the next `times` calls of `op` fail with `fault`.
    pub fn inject(&self, op: StoreOp, fault: Fault, times: usize) {
        self.schedule.inject(op, fault, times);
    }

    /// Removes the faults not fired yet.
    pub fn clear(&self) {
        self.schedule.clear();
    }

    /// The faults fired so far, in order.
    pub fn fired(&self) -> Vec<(StoreOp, Fault)> {
        self.schedule.fired()
    }

    async fn run<T, F>(&self, op: StoreOp, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        self.schedule
            .run(op, call, |fault| StoreError::Unavailable {
                store: "faulty store",
                source: Box::new(Injected(fault)),
            })
            .await
    }
}

#[async_trait]
impl UsageStore for FaultyStore {
    async fn put_account(&self, account: Account) -> Result<(), StoreError> {
        self.run(StoreOp::PutAccount, self.inner.put_account(account)).await
    }
    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        self.run(StoreOp::PutAccount, self.inner.replace_account(expected, account))
            .await
    }
    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        self.run(StoreOp::Account, self.inner.account(user)).await
    }
    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        let changed = self
            .account_changes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1));
        if changed.is_ok() {
            return Err(StoreError::AccountChanged {
                usage: Box::new(request.usage),
            });
        }
        self.run(StoreOp::RecordUsage, self.inner.record_usage(request)).await
    }
    async fn ensure_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError> {
        self.run(StoreOp::EnsureCharge, self.inner.ensure_charge(request)).await
    }
    async fn claim_pending(
        &self,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.run(
            StoreOp::ClaimPending,
            self.inner.claim_pending(user, now, lease_until, limit),
        )
        .await
    }
    async fn claim_due_retries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.run(
            StoreOp::ClaimDueRetries,
            self.inner.claim_due_retries(now, lease_until, limit),
        )
        .await
    }
    async fn claim_awaiting_customer(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.run(
            StoreOp::ClaimAwaitingCustomer,
            self.inner.claim_awaiting_customer(now, lease_until, limit),
        )
        .await
    }
    async fn renew_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        self.run(
            StoreOp::RenewLease,
            self.inner.renew_lease(user, key, held_until, lease_until),
        )
        .await
    }
    async fn settle_charge(&self, settlement: Settlement<'_>) -> Result<Charge, StoreError> {
        self.run(StoreOp::SettleCharge, self.inner.settle_charge(settlement))
            .await
    }
    async fn recorded_event(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
        self.run(StoreOp::RecordedEvent, self.inner.recorded_event(user, event_id))
            .await
    }
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.run(StoreOp::AppendAudit, self.inner.append_audit(entry)).await
    }
    async fn gateway_event_applied(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        self.run(
            StoreOp::GatewayEventApplied,
            self.inner.gateway_event_applied(user, event_id),
        )
        .await
    }
    async fn record_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        self.run(StoreOp::RecordGatewayEvent, self.inner.record_gateway_event(record))
            .await
    }
    async fn charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        self.inner.charge(user, key).await
    }
    async fn charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        self.inner.charges(user, period).await
    }
    async fn unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        self.inner.unpaid_charges(user).await
    }
    async fn consumptions(&self, user: &UserId, period: PeriodKey) -> Result<Vec<UsageRecord>, StoreError> {
        self.inner.consumptions(user, period).await
    }
    async fn period_summary(&self, user: &UserId, period: PeriodKey) -> Result<Option<PeriodSummary>, StoreError> {
        self.inner.period_summary(user, period).await
    }
    async fn usage_by_operation(&self, user: &UserId, period: PeriodKey) -> Result<Vec<OperationUsage>, StoreError> {
        self.inner.usage_by_operation(user, period).await
    }
    async fn usage_by_model(&self, user: &UserId, period: PeriodKey) -> Result<Vec<crate::ModelUsage>, StoreError> {
        self.inner.usage_by_model(user, period).await
    }
    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError> {
        self.inner.charges_by_tier(user, period).await
    }
    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_trail(user, period).await
    }
    async fn reserve(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        self.run(StoreOp::Reserve, self.inner.reserve(request)).await
    }
    async fn release_hold(&self, user: &UserId, period: PeriodKey, hold_id: &EventId) -> Result<bool, StoreError> {
        self.run(StoreOp::ReleaseHold, self.inner.release_hold(user, period, hold_id))
            .await
    }
    async fn spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError> {
        self.inner.spend_state(user, period, now, overdue_before).await
    }
    async fn holds(&self, user: &UserId, period: PeriodKey, now: DateTime<Utc>) -> Result<Vec<Hold>, StoreError> {
        self.inner.holds(user, period, now).await
    }
    async fn raise_alert(&self, alert: Alert) -> Result<bool, StoreError> {
        self.inner.raise_alert(alert).await
    }
    async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.inner.pending_alerts(user, limit).await
    }
    async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, StoreError> {
        self.inner.ack_alert(user, alert_id).await
    }
}

/// A [`PaymentGateway`] that fails chosen calls of the gateway it wraps. A failure reports
/// [`GatewayError::OutcomeUnknown`], as a lost connection does.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use token_billing::SandboxGateway;
/// use token_billing::testing::faults::{Fault, FaultyGateway, GatewayOp};
///
/// let gateway = FaultyGateway::new(Arc::new(SandboxGateway::new()));
/// // The next payment is made, but the answer never arrives.
/// gateway.inject(GatewayOp::Collect, Fault::FailAfter, 1);
/// ```
pub struct FaultyGateway {
    inner: Arc<dyn PaymentGateway>,
    schedule: Schedule<GatewayOp>,
}

impl fmt::Debug for FaultyGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyGateway")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl FaultyGateway {
    /// Wraps a gateway; no faults until injected.
    pub fn new(inner: Arc<dyn PaymentGateway>) -> FaultyGateway {
        FaultyGateway {
            inner,
            schedule: Schedule::default(),
        }
    }

    /// Makes the next `times` calls of `op` fail with `fault`.
    pub fn inject(&self, op: GatewayOp, fault: Fault, times: usize) {
        self.schedule.inject(op, fault, times);
    }

    /// Removes the faults not fired yet.
    pub fn clear(&self) {
        self.schedule.clear();
    }

    /// The faults fired so far, in order.
    pub fn fired(&self) -> Vec<(GatewayOp, Fault)> {
        self.schedule.fired()
    }

    async fn run<T, F>(&self, op: GatewayOp, call: F) -> Result<T, GatewayError>
    where
        F: std::future::Future<Output = Result<T, GatewayError>> + Send,
        T: Send,
    {
        self.schedule
            .run(op, call, |fault| GatewayError::OutcomeUnknown {
                gateway: "faulty gateway",
                source: Box::new(Injected(fault)),
            })
            .await
    }
}

#[async_trait]
impl PaymentGateway for FaultyGateway {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn create_customer(&self, user: &UserId) -> Result<CustomerId, GatewayError> {
        self.run(GatewayOp::CreateCustomer, self.inner.create_customer(user))
            .await
    }
    async fn collect(&self, request: &PaymentRequest<'_>) -> Result<PaymentOutcome, GatewayError> {
        self.run(GatewayOp::Collect, self.inner.collect(request)).await
    }
    async fn find_payment(&self, charge_key: &ChargeKey) -> Result<Option<PaymentOutcome>, GatewayError> {
        self.run(GatewayOp::FindPayment, self.inner.find_payment(charge_key))
            .await
    }
    async fn cancel_payment(&self, payment_id: &str) -> Result<PaymentOutcome, GatewayError> {
        self.run(GatewayOp::CancelPayment, self.inner.cancel_payment(payment_id))
            .await
    }
    async fn create_subscription(
        &self,
        user: &UserId,
        customer: &CustomerId,
        plan_id: &PlanId,
        plan: &Plan,
    ) -> Result<Subscription, GatewayError> {
        self.run(
            GatewayOp::CreateSubscription,
            self.inner.create_subscription(user, customer, plan_id, plan),
        )
        .await
    }
}
