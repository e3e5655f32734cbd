//! Dunning: the schedule on which declined charges are retried, `retry_failed` and
//! `retry_unpaid`.

use std::time::Duration;

use tracing::{Instrument, info_span};

use crate::domain::{ChargeStatus, UserId};
use crate::error::BillingError;
use crate::store::{Settlement, StoreError};

use super::{BillingService, CollectionReport};

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

impl BillingService {
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
}
