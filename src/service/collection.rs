//! Collection: charging what recording created (at once, or by `resume_pending`), under leases
//! that hand a charge to one collector at a time, and settling the gateway's answer by a
//! compare-and-set.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::domain::{Charge, ChargeStatus, CustomerId, UserId};
use crate::error::BillingError;
use crate::gateway::{GatewayError, PaymentOutcome, PaymentRequest, PaymentStatus};
use crate::store::{Settlement, StoreError};

use super::{BillingService, metrics};

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
    pub(super) fn count(&mut self, status: ChargeStatus) {
        match status {
            ChargeStatus::Succeeded => self.succeeded += 1,
            ChargeStatus::Failed => self.failed += 1,
            ChargeStatus::RequiresAction => self.requires_action += 1,
            _ => self.pending += 1,
        }
    }
}

impl BillingService {
    /// Collects one claimed charge and settles it, leaving `charge` as it is then; never fails:
    /// whatever goes wrong leaves the charge pending (to resume) or failed (to retry), and is
    /// logged. `false` when the lease on the charge was lost: `charge` is left as it was, and
    /// the charge to whoever holds it now.
    pub(super) async fn collect_charge(&self, charge: &mut Charge, customer: &CustomerId) -> bool {
        let started = std::time::Instant::now();
        let collected = self.collect_held_charge(charge, customer).await;
        if collected {
            metrics::collected(charge.status, started.elapsed());
        }
        collected
    }

    /// [`collect_charge`](Self::collect_charge), without its metrics.
    async fn collect_held_charge(&self, charge: &mut Charge, customer: &CustomerId) -> bool {
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
    pub(super) async fn close_previous_round(&self, charge: Charge) -> Result<Charge, Charge> {
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
    pub(super) async fn try_settle(
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
    pub(super) async fn collect_claimed_of(&self, user: Option<&UserId>) -> Result<CollectionReport, BillingError> {
        let mut report = CollectionReport::default();
        let started = self.clock.now();
        let mut waiting = Vec::new();
        let mut resumed = 0;
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
                if user.is_none() {
                    metrics::resumed_past_lease(resumed);
                }
                return Ok(report);
            }
            report.claimed += claimed.len();
            // Claimed before: by a collector whose lease expired, or one that left them waiting.
            resumed += claimed.iter().filter(|charge| charge.attempts > 1).count();
            self.collect_all(claimed, &mut report, &mut waiting).await;
        }
    }

    /// Collects claimed charges, counting each outcome in `report`. A charge whose user has no
    /// customer to charge is put in `waiting`, still leased, for the run to give up its lease
    /// once it has claimed everything ([`give_up_leases`](Self::give_up_leases)).
    pub(super) async fn collect_all(
        &self,
        claimed: Vec<Charge>,
        report: &mut CollectionReport,
        waiting: &mut Vec<Charge>,
    ) {
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
    pub(super) async fn give_up_leases(&self, waiting: Vec<Charge>, at: DateTime<Utc>) {
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
}
