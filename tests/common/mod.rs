//! Shared test harness: a service on the in-memory store and the sandbox, with a manual clock.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod record_rule;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use token_billing::{
    BillingService, BillingServiceBuilder, ChargeKind, ChargeStatus, CustomerId, InMemoryUsageStore, ManualClock,
    PaymentGateway, PaymentStatus, PeriodKey, Plan, SandboxGateway, UnregisteredUsers, UsageStore, UserId,
};

/// Mid-November 2026, São Paulo time.
pub fn nov15() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid")
}

pub fn november() -> PeriodKey {
    PeriodKey::new(2026, 11).expect("valid")
}

pub fn user(id: &str) -> UserId {
    UserId::new(id).expect("valid user id")
}

pub struct Harness {
    pub service: BillingService,
    pub store: Arc<dyn UsageStore>,
    pub sandbox: SandboxGateway,
    pub clock: ManualClock,
}

impl Harness {
    /// The embedded default, with a manual clock at `nov15()`.
    pub fn new() -> Harness {
        Harness::with(|b| b)
    }

    pub fn with_plan(plan: Plan) -> Harness {
        Harness::with(|b| b.plan(plan))
    }

    /// A harness whose builder is adjusted by `configure` (which starts from OpenCustomer).
    pub fn with(configure: impl FnOnce(BillingServiceBuilder) -> BillingServiceBuilder) -> Harness {
        let store: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
        let sandbox = SandboxGateway::new();
        Harness::over(store, Arc::new(sandbox.clone()), sandbox, configure)
    }

    /// A harness over a given store and gateway (wrappers of the sandbox, say).
    pub fn over(
        store: Arc<dyn UsageStore>,
        gateway: Arc<dyn PaymentGateway>,
        sandbox: SandboxGateway,
        configure: impl FnOnce(BillingServiceBuilder) -> BillingServiceBuilder,
    ) -> Harness {
        let clock = ManualClock::new(nov15());
        let builder = BillingService::builder(store.clone(), gateway)
            .clock(Arc::new(clock.clone()))
            .unregistered_users(UnregisteredUsers::OpenCustomer);
        Harness {
            service: configure(builder).build(),
            store,
            sandbox,
            clock,
        }
    }

    /// A second service instance over the same store, gateway and clock (another process).
    pub fn restart(&self, gateway: Arc<dyn PaymentGateway>) -> BillingService {
        BillingService::builder(self.store.clone(), gateway)
            .clock(Arc::new(self.clock.clone()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build()
    }

    /// Registers `user` with a sandbox customer whose card behaves as `behaviour`.
    pub async fn register(&self, user: &UserId, behaviour: token_billing::CardBehaviour) -> CustomerId {
        let customer = CustomerId::new(format!("cus_{user}")).expect("valid");
        self.sandbox.add_customer(customer.clone(), behaviour);
        self.service
            .register_account(user, Some(customer.clone()), None)
            .await
            .expect("register_account");
        customer
    }

    pub fn advance(&self, by: chrono::Duration) {
        self.clock.advance(by);
    }

    /// [`assert_period_consistent`] on this harness's store and sandbox.
    pub async fn assert_period_consistent(&self, user: &UserId, period: PeriodKey, plan: &Plan) {
        assert_period_consistent(self.store.as_ref(), &self.sandbox, user, period, plan).await;
    }

    /// Succeeded payments per charge key, over the whole sandbox.
    pub fn succeeded_payments_by_charge(&self) -> BTreeMap<String, usize> {
        let mut paid = BTreeMap::new();
        for payment in self.sandbox.payments() {
            if payment.status == PaymentStatus::Succeeded {
                *paid.entry(payment.charge_key.to_string()).or_insert(0) += 1;
            }
        }
        paid
    }
}

/// Asserts every invariant of a settled period: blocks 1..=blocks_owed(total) exist once each,
/// every succeeded charge was paid exactly once at the sandbox and no other charge was paid, the
/// summary agrees with the charges, and the total is the sum of the consumptions' billable tokens.
pub async fn assert_period_consistent(
    store: &dyn UsageStore,
    sandbox: &SandboxGateway,
    user: &UserId,
    period: PeriodKey,
    plan: &Plan,
) {
    let summary = store.period_summary(user, period).await.expect("summary");
    let consumptions = store.consumptions(user, period).await.expect("consumptions");
    // The billable total: every event's exact billable tokens (its tokens, without a rate
    // card), summed and rounded up to a whole token.
    let exact: u128 = consumptions.iter().map(|c| c.billable().micros()).sum();
    let total = u64::try_from(exact.div_ceil(1_000_000)).expect("a total");
    assert_eq!(
        summary.as_ref().map_or(0, |s| s.total_tokens),
        total,
        "no lost or doubled usage"
    );
    let charges = store.charges(user, period).await.expect("charges");
    let mut blocks: Vec<u64> = charges
        .iter()
        .filter(|c| c.kind == ChargeKind::Block)
        .map(|c| c.block)
        .collect();
    blocks.sort_unstable();
    assert_eq!(
        blocks,
        (1..=plan.blocks_owed(total)).collect::<Vec<_>>(),
        "each block exactly once"
    );
    for charge in &charges {
        let paid = sandbox
            .payments_for_charge(&charge.key)
            .into_iter()
            .filter(|p| p.status == PaymentStatus::Succeeded)
            .count();
        let expected = usize::from(charge.status == ChargeStatus::Succeeded && !charge.amount.is_zero());
        assert_eq!(
            paid, expected,
            "{} is {} and was paid {paid} times",
            charge.key, charge.status
        );
    }
    if let Some(summary) = summary {
        let succeeded = |kind| {
            charges
                .iter()
                .filter(|c| c.kind == kind && c.status == ChargeStatus::Succeeded)
                .map(|c| c.amount.minor_units())
                .sum::<i64>()
        };
        assert_eq!(summary.fixed_fee_charged.minor_units(), succeeded(ChargeKind::FixedFee));
        assert_eq!(summary.tier_charges_total.minor_units(), succeeded(ChargeKind::Block));
        let outstanding: i64 = charges
            .iter()
            .filter(|c| c.status != ChargeStatus::Succeeded)
            .map(|c| c.amount.minor_units())
            .sum();
        assert_eq!(summary.outstanding_total.minor_units(), outstanding);
    }
}
