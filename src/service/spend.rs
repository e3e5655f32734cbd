//! Spend control: whether more usage is allowed now ([`BillingService::check_usage`]), holds
//! for calls whose size is known only at their end ([`BillingService::reserve`],
//! [`settle_hold`](BillingService::settle_hold), [`release_hold`](BillingService::release_hold)),
//! and the limit a recorded event leaves its user at. Every decision is the store's, taken in
//! the atomic step that records usage or grants a hold; this file finds the user's limits and
//! period and reads the answers.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{AlertKind, Ceiling, EventId, Headroom, LimitKind, Limits, PeriodKey, Plan, UserId};
use crate::error::{BillingError, UsageError};
use crate::store::{Account, Alert, Hold, HoldDecision, HoldRequest};

use super::report::{UsageOutcome, UsageReport};
use super::{BillingService, store_contract};

/// A request to hold tokens for a call whose size is known only at its end (a streamed
/// completion): [`BillingService::reserve`].
///
/// # Example
/// ```
/// use std::time::Duration;
/// use token_billing::Reservation;
///
/// let reservation = Reservation::new("user-uuid", 40_000).hold_id("call-7").ttl(Duration::from_secs(120));
/// assert_eq!(reservation.estimated_tokens, 40_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reservation {
    /// The user.
    pub user_id: String,
    /// The tokens to hold: the most the call is expected to use.
    pub estimated_tokens: u64,
    /// The hold's id, which its usage is recorded under when it is settled; a request sent again
    /// with the same id answers the same hold. Drawn by the service when absent.
    pub hold_id: Option<String>,
    /// How long the hold lasts unless settled or released; the service's default when absent.
    pub ttl: Option<Duration>,
}

impl Reservation {
    /// A request to hold `estimated_tokens` for `user_id`.
    pub fn new(user_id: impl Into<String>, estimated_tokens: u64) -> Reservation {
        Reservation {
            user_id: user_id.into(),
            estimated_tokens,
            ..Reservation::default()
        }
    }

    /// Sets the hold's id.
    pub fn hold_id(mut self, id: impl Into<String>) -> Self {
        self.hold_id = Some(id.into());
        self
    }

    /// Sets the hold's time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// A hold granted ([`BillingService::reserve`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldGrant {
    /// The hold's id: settle it under this id.
    pub hold_id: EventId,
    /// The tokens held.
    pub granted_tokens: u64,
    /// When the hold stops counting by itself.
    pub expires_at: DateTime<Utc>,
    /// How many more tokens the period allows besides this hold; `None` when no limit applies.
    pub remaining_tokens: Option<u64>,
    /// The period the hold counts in.
    pub period: PeriodKey,
    /// Whether this answers a request sent again (the hold existed already).
    pub replayed: bool,
}

/// Whether more usage is allowed now ([`BillingService::check_usage`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageCheck {
    /// Whether the tokens asked about are allowed.
    pub allowed: bool,
    /// The limit that refuses them, when one does.
    pub refused_by: Option<LimitKind>,
    /// How many more tokens the period allows; `None` when no limit applies.
    pub remaining_tokens: Option<u64>,
    /// The limit that allows fewest tokens, when any applies.
    pub limited_by: Option<LimitKind>,
    /// The user's limits (the account's, or its plan's).
    pub limits: Limits,
    /// The current period.
    pub period: PeriodKey,
    /// Tokens recorded in it.
    pub total_tokens: u64,
    /// Tokens held for calls in flight.
    pub held_tokens: u64,
    /// How many holds are open.
    pub open_holds: u64,
    /// Whether a charge is unpaid for longer than the payment gate's grace (looked at only with
    /// the payment gate).
    pub payment_overdue: bool,
}

/// A settled hold ([`BillingService::settle_hold`]): the usage's outcome, and how it compares
/// with what was held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettledHold {
    /// The usage's outcome, as [`BillingService::process_token_usage`] answers it.
    #[serde(flatten)]
    pub outcome: UsageOutcome,
    /// The tokens the hold held, when it was still open (not expired, released or settled).
    pub held_tokens: Option<u64>,
    /// Billable tokens used beyond the hold (holds are in billable tokens: a reservation's
    /// estimate is what the call will bill): recorded and charged (they were consumed), and
    /// bounded by this one call.
    pub overshoot_tokens: u64,
}

/// The limits, in tokens, that apply to a user's period.
pub(super) struct SpendLimits<'p> {
    pub(super) period: PeriodKey,
    pub(super) plan: &'p Plan,
    pub(super) limits: Limits,
    pub(super) ceiling: Ceiling,
    pub(super) overdue_before: Option<DateTime<Utc>>,
}

fn remaining(room: Headroom) -> Option<u64> {
    room.limited_by.map(|_| room.remaining)
}

impl BillingService {
    /// The limits of `account`: its own, or its plan's.
    pub(super) fn limits_of(account: Option<&Account>, plan: &Plan) -> Limits {
        account.and_then(|a| a.limits).unwrap_or_else(|| plan.limits())
    }

    /// `limits` in tokens, for `period` rated by `plan`.
    pub(super) fn spend_limits<'p>(
        &self,
        limits: Limits,
        period: PeriodKey,
        plan: &'p Plan,
        now: DateTime<Utc>,
    ) -> Result<SpendLimits<'p>, BillingError> {
        let ceiling = limits.ceiling(plan).map_err(|error| {
            BillingError::Store(crate::store::StoreError::Generic {
                store: "service",
                source: format!("the limits of user's period {period} do not fit its plan: {error}").into(),
            })
        })?;
        Ok(SpendLimits {
            period,
            plan,
            limits,
            ceiling,
            overdue_before: limits.payment_gate.then(|| {
                let grace =
                    chrono::Duration::from_std(self.settings.payment_gate_grace).unwrap_or(chrono::Duration::MAX);
                now.checked_sub_signed(grace).unwrap_or(DateTime::<Utc>::MIN_UTC)
            }),
        })
    }

    /// The user's current period and its limits.
    async fn current_limits(&self, user: &UserId, now: DateTime<Utc>) -> Result<SpendLimits<'_>, BillingError> {
        let account = self.store.account(user).await?;
        let (period, plan) = self.period_at(account.as_ref(), now)?;
        self.spend_limits(Self::limits_of(account.as_ref(), plan), period.key(), plan, now)
    }

    /// Whether `tokens` more tokens of usage are allowed for the user now, and how many remain
    /// in the current period under the user's limits, counting the usage recorded and the holds
    /// open. Writes nothing; the answer may be stale by the time usage follows (use
    /// [`reserve`](Self::reserve) to hold tokens atomically).
    ///
    /// # Errors
    /// [`BillingError::AccountPlanMissing`]; store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingService, LimitKind, Limits, UsageReport};
    ///
    /// let billing = BillingService::embedded();
    /// let user = "capped-user".parse()?;
    /// billing.register_account(&user, None, None).await?;
    /// billing.set_limits(&user, Some(Limits::none().with_token_cap(10_000_000))).await?;
    /// billing.process_token_usage(UsageReport::new("capped-user", 9_000_000, "chat")).await?;
    ///
    /// let check = billing.check_usage(&user, 2_000_000).await?;
    /// assert!(!check.allowed);
    /// assert_eq!((check.refused_by, check.remaining_tokens), (Some(LimitKind::TokenCap), Some(1_000_000)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn check_usage(&self, user: &UserId, tokens: u64) -> Result<UsageCheck, BillingError> {
        let now = self.clock.now();
        // The limits are found from the account as the store holds it, in the same call that
        // reads the period's state.
        let mut located = None;
        let state = self
            .store
            .locate_spend_state(user, now, &mut |account| {
                let limits = self.period_at(account, now).and_then(|(period, plan)| {
                    self.spend_limits(Self::limits_of(account, plan), period.key(), plan, now)
                });
                let found = limits.as_ref().ok().map(|l| (l.period, l.overdue_before));
                located = Some(limits);
                found
            })
            .await?;
        let limits =
            located.ok_or_else(|| store_contract("locate_spend_state did not call its locator".to_owned()))??;
        let state = state.ok_or_else(|| store_contract("locate_spend_state read no state".to_owned()))?;
        let room = state.headroom(&limits.ceiling, limits.plan);
        let refused_by = room.refuses(tokens);
        Ok(UsageCheck {
            allowed: refused_by.is_none() && tokens <= room.remaining,
            refused_by,
            remaining_tokens: remaining(room),
            limited_by: room.limited_by,
            limits: limits.limits,
            period: limits.period,
            total_tokens: state.total_tokens,
            held_tokens: state.held_tokens,
            open_holds: state.open_holds,
            payment_overdue: state.payment_overdue,
        })
    }

    /// Holds tokens for a call whose size is known only at its end, if the user's limits allow
    /// them: the usage recorded, the holds open and this estimate never exceed a limit together,
    /// whatever the concurrency (the store decides in one atomic step). Settle the hold with the
    /// call's real usage ([`settle_hold`](Self::settle_hold)) or release it
    /// ([`release_hold`](Self::release_hold)); a hold neither settled nor released stops
    /// counting when its time to live passes, so a crashed caller never blocks the user.
    ///
    /// A request sent again with the same hold id and estimate answers the same hold.
    ///
    /// # Errors
    /// [`BillingError::LimitExceeded`] when a limit refuses (nothing is held);
    /// [`BillingError::InvalidUsage`] for a bad user or hold id, a zero estimate or one above
    /// the service's maximum per event, or a time to live out of bounds;
    /// [`BillingError::EventConflict`] when the hold id is open with another estimate, or was
    /// already settled; store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingError, BillingService, LimitKind, Limits, Reservation, UsageReport};
    ///
    /// let billing = BillingService::embedded();
    /// let user = "streaming-user".parse()?;
    /// billing.register_account(&user, None, None).await?;
    /// billing.set_limits(&user, Some(Limits::none().with_token_cap(100_000))).await?;
    ///
    /// let hold = billing.reserve(Reservation::new("streaming-user", 80_000).hold_id("call-1")).await?;
    /// assert_eq!(hold.remaining_tokens, Some(20_000));
    /// // A second call cannot hold what the first holds.
    /// let refused = billing.reserve(Reservation::new("streaming-user", 30_000)).await.unwrap_err();
    /// assert!(matches!(refused, BillingError::LimitExceeded { limit: LimitKind::TokenCap, remaining_tokens: 20_000 }));
    ///
    /// // The call used 50,000: recorded once under the hold's id, and the hold is freed.
    /// let settled = billing.settle_hold("call-1", UsageReport::new("streaming-user", 50_000, "chat")).await?;
    /// assert_eq!((settled.outcome.total_tokens, settled.overshoot_tokens), (50_000, 0));
    /// assert_eq!(billing.check_usage(&user, 1).await?.remaining_tokens, Some(50_000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn reserve(&self, reservation: Reservation) -> Result<HoldGrant, BillingError> {
        let now = self.clock.now();
        let user = UserId::new(reservation.user_id).map_err(UsageError::from)?;
        let tokens = reservation.estimated_tokens;
        if tokens == 0 {
            return Err(UsageError::ZeroTokens.into());
        }
        let max = self.settings.max_tokens_per_event;
        if tokens > max {
            return Err(UsageError::TooManyTokens { tokens, max }.into());
        }
        let ttl = reservation.ttl.unwrap_or(self.settings.hold_ttl);
        let max_ttl = self.settings.max_hold_ttl;
        if ttl.is_zero() || ttl > max_ttl {
            return Err(UsageError::HoldTtl { ttl, max: max_ttl }.into());
        }
        let hold_id = match reservation.hold_id {
            Some(id) => EventId::new(id).map_err(UsageError::from)?,
            None => EventId::of_consumption(crate::random::uuid_v4()),
        };
        let limits = self.current_limits(&user, now).await?;
        let decision = self
            .hold_tokens(&user, &hold_id, tokens, &limits, now, crate::clock::later(now, ttl))
            .await?;
        match decision {
            HoldDecision::Granted { hold, state, replayed } => Ok(HoldGrant {
                remaining_tokens: remaining(state.headroom(&limits.ceiling, limits.plan)),
                hold_id: hold.hold_id,
                granted_tokens: hold.tokens,
                expires_at: hold.expires_at,
                period: hold.period,
                replayed,
            }),
            HoldDecision::Refused { limit, state } => Err(BillingError::LimitExceeded {
                limit,
                remaining_tokens: state.headroom(&limits.ceiling, limits.plan).remaining,
            }),
            HoldDecision::Settled => Err(BillingError::EventConflict { event_id: hold_id }),
        }
    }

    /// Asks the store for a hold of `tokens` in the period of `limits`.
    pub(super) async fn hold_tokens(
        &self,
        user: &UserId,
        hold_id: &EventId,
        tokens: u64,
        limits: &SpendLimits<'_>,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<HoldDecision, BillingError> {
        let decision = self
            .store
            .reserve(HoldRequest {
                user_id: user,
                hold_id,
                period: limits.period,
                tokens,
                now,
                expires_at,
                plan: limits.plan,
                ceiling: limits.ceiling,
                overdue_before: limits.overdue_before,
            })
            .await?;
        match &decision {
            HoldDecision::Refused {
                limit: LimitKind::PaymentGate,
                state,
            } if self.settings.alerts.payment_gate => {
                tracing::info!(limit = %LimitKind::PaymentGate, tokens, "hold refused");
                let alert = Alert::new(
                    user.clone(),
                    limits.period,
                    AlertKind::PaymentGate,
                    state.total_tokens,
                    now,
                );
                if self.store.raise_alert(alert).await? {
                    tracing::info!("the payment gate closed: alert raised");
                }
            }
            HoldDecision::Refused { limit, .. } => tracing::info!(%limit, tokens, "hold refused"),
            HoldDecision::Granted { replayed: false, .. } => tracing::debug!(tokens, "hold granted"),
            _ => {}
        }
        Ok(decision)
    }

    /// Records the real usage of a held call, exactly once, under the hold's id (its event id),
    /// and frees the hold. A limit never refuses it: the tokens were consumed. Usage beyond the
    /// hold is recorded and charged as usual, and reported as `overshoot_tokens`; a settle that
    /// arrives after the hold expired still records the usage. Sent again, it answers the
    /// original outcome.
    ///
    /// # Errors
    /// As [`process_token_usage`](Self::process_token_usage) (the report's event id, when it
    /// has one, must be the hold's: [`BillingError::EventConflict`] otherwise).
    ///
    /// # Example
    /// See [`reserve`](Self::reserve).
    pub async fn settle_hold(&self, hold_id: &str, report: UsageReport) -> Result<SettledHold, BillingError> {
        let event_id = EventId::new(hold_id).map_err(UsageError::from)?;
        if report.event_id.as_deref().is_some_and(|id| id != hold_id) {
            return Err(BillingError::EventConflict { event_id });
        }
        let user = UserId::new(report.user_id.as_str()).map_err(UsageError::from)?;
        let now = self.clock.now();
        let account = self.store.account(&user).await?;
        let (period, _) = self.period_at(account.as_ref(), now)?;
        let held = self
            .store
            .holds(&user, period.key(), now)
            .await?
            .into_iter()
            .find(|hold| hold.hold_id == event_id)
            .map(|hold| hold.tokens);
        let outcome = self
            .process_token_usage(UsageReport {
                event_id: Some(hold_id.to_owned()),
                enforce_limits: false,
                ..report
            })
            .await?;
        Ok(SettledHold {
            // Holds are in billable tokens: the call's own billable tokens, rounded up, are
            // compared with the hold, whatever the period's rounding before it.
            overshoot_tokens: held.map_or(0, |held| outcome.billable_exact.rounded_up().saturating_sub(held)),
            held_tokens: held,
            outcome,
        })
    }

    /// Frees a hold without usage (the call was cancelled before it used any tokens); answers
    /// whether it was open. Idempotent.
    ///
    /// # Errors
    /// [`BillingError::InvalidId`] for a bad hold id; store errors.
    pub async fn release_hold(&self, user: &UserId, hold_id: &str) -> Result<bool, BillingError> {
        let hold_id = EventId::new(hold_id)?;
        let now = self.clock.now();
        let account = self.store.account(user).await?;
        let (period, _) = self.period_at(account.as_ref(), now)?;
        if self.store.release_hold(user, period.key(), &hold_id).await? {
            return Ok(true);
        }
        // Granted before the month turned, it counts in the period before.
        let (previous, _) = self.period_at(account.as_ref(), period.start() - chrono::Duration::microseconds(1))?;
        Ok(self.store.release_hold(user, previous.key(), &hold_id).await?)
    }

    /// The user's holds open now in the current period, oldest first.
    ///
    /// # Errors
    /// [`BillingError::AccountPlanMissing`]; store errors.
    pub async fn open_holds(&self, user: &UserId) -> Result<Vec<Hold>, BillingError> {
        let now = self.clock.now();
        let account = self.store.account(user).await?;
        let (period, _) = self.period_at(account.as_ref(), now)?;
        Ok(self.store.holds(user, period.key(), now).await?)
    }

    /// Up to `limit` alerts not acknowledged yet, of one user or of all, oldest first: an
    /// outbox a host delivers from (at least once: each alert keeps its id), acknowledging each
    /// delivered with [`ack_alert`](Self::ack_alert).
    ///
    /// # Errors
    /// Store errors.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use token_billing::{AlertKind, AlertPolicy, BillingService, InMemoryUsageStore, SandboxGateway, UsageReport};
    ///
    /// let billing = BillingService::builder(Arc::new(InMemoryUsageStore::new()), Arc::new(SandboxGateway::new()))
    ///     .alerts(AlertPolicy::standard())
    ///     .build();
    /// billing.process_token_usage(UsageReport::new("ana", 7_000_000, "chat")).await?;
    /// let user = "ana".parse()?;
    /// let alerts = billing.pending_alerts(Some(&user), 10).await?;
    /// assert_eq!(alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), [AlertKind::Allowance { percent: 80 }]);
    /// assert!(billing.ack_alert(&user, alerts[0].id).await?);
    /// assert!(billing.pending_alerts(Some(&user), 10).await?.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, BillingError> {
        Ok(self.store.pending_alerts(user, limit).await?)
    }

    /// Acknowledges an alert once delivered; answers whether it was pending. Idempotent.
    ///
    /// # Errors
    /// Store errors.
    pub async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, BillingError> {
        Ok(self.store.ack_alert(user, alert_id).await?)
    }

    /// The limit a period total reaches, when one does: the next check or reservation of any
    /// tokens is refused by it. Reads the unpaid charges only for an account with the payment
    /// gate whose period has started a block.
    pub(super) async fn limit_reached(
        &self,
        user: &UserId,
        limits: &SpendLimits<'_>,
        total: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<LimitKind>, BillingError> {
        if limits.ceiling.is_none() {
            return Ok(None);
        }
        let overdue = match limits.overdue_before {
            Some(_) if limits.plan.blocks_owed(total) > 0 => {
                self.store
                    .spend_state(user, limits.period, now, limits.overdue_before)
                    .await?
                    .payment_overdue
            }
            _ => false,
        };
        let room = limits.ceiling.headroom(limits.plan, total, overdue);
        Ok(room.limited_by.filter(|_| room.remaining == 0))
    }
}
