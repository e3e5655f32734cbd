//! [`InMemoryUsageStore`]: the store of one process, sharded by user.
//!
//! This file holds the store, its builder, [`EventRetention`] and the `impl UsageStore`; the
//! parts that stand apart have files of their own:
//! - `shards`: the shards users are spread over, their locking, and the indexes of charges to
//!   collect that the claims walk;
//! - `book`: a user's book (account, events, periods with their summaries, totals by operation
//!   and charges, audit trail), recording an event into it and inserting charges;
//! - `alerts`: threshold alerts, unique per period and kind;
//! - `holds`: spend control's holds, and the state limits are checked against;
//! - `retention`: forgetting older periods' events, and the forgotten ids.

mod alerts;
mod book;
mod holds;
mod models;
mod retention;
mod shards;

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use self::book::{PeriodBook, TrailItem, UserBook, apply_to_summary, money_error};
use self::shards::{Shard, claim_from};
use super::claims::{CLAIM_AWAITING, CLAIM_PENDING, CLAIM_RETRIES};
use super::{
    Account, Alert, AuditEntry, AuditEvent, EnsureCharge, GatewayEventRecord, Hold, HoldDecision, HoldRequest,
    ModelUsage, OperationUsage, PeriodSummary, PlacedUsage, Placement, Placer, RecordUsage, Recorded, Settlement,
    SpendLocator, SpendState, StoreError, TierChargeReport, UsageStore,
};
use crate::domain::{Charge, ChargeKey, ChargeStatus, EventId, Money, PeriodKey, UsageRecord, UserId};

/// A [`UsageStore`] in the process's memory: the embedded default, and the reference
/// implementation of the contract.
///
/// Users are spread over shards, each behind its own mutex, so unrelated users rarely contend;
/// every operation touches one shard (listing pending charges of all users visits each in turn)
/// and no lock is held across an `.await`. Nothing survives the process: use the PostgreSQL store
/// for durable billing.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use token_billing::{InMemoryUsageStore, UsageStore};
///
/// let store: Arc<dyn UsageStore> = Arc::new(InMemoryUsageStore::new());
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct InMemoryUsageStore {
    shards: Box<[Mutex<Shard>]>,
    shard_hasher: foldhash::fast::RandomState,
    retention: EventRetention,
    periods_kept: Option<u32>,
}

/// What [`InMemoryUsageStore`] keeps of each usage event. Summaries, totals by operation,
/// charges and accounts are always kept; this bounds the part that grows with every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventRetention {
    /// Every event with its metadata, and its audit entry (the default): `consumptions` and the
    /// audit trail list them all.
    #[default]
    All,
    /// Only events the host may send again, those with its own event id, so that a re-send is
    /// answered with its original outcome. An event without one leaves nothing behind but its
    /// share of the totals (summary, totals by operation) and its charges, so memory grows with
    /// charges, not with events. `consumptions` lists the events kept; the audit trail records
    /// charges and accounts, and only the kept events.
    Resendable,
}

/// Builds an [`InMemoryUsageStore`].
///
/// # Example
/// ```
/// use token_billing::{EventRetention, InMemoryUsageStore};
///
/// // Keeps only what dedupe and the reports need, for the current and previous month.
/// let store = InMemoryUsageStore::builder()
///     .events(EventRetention::Resendable)
///     .periods_kept(2)
///     .build();
/// # let _ = store;
/// ```
#[derive(Debug, Clone)]
pub struct InMemoryUsageStoreBuilder {
    shards: usize,
    retention: EventRetention,
    periods_kept: Option<u32>,
}

impl InMemoryUsageStoreBuilder {
    /// How many shards users are spread over (64 by default, at least one): more shards, less
    /// contention between users.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// What is kept of each event ([`EventRetention::All`] by default).
    pub fn events(mut self, retention: EventRetention) -> Self {
        self.retention = retention;
        self
    }

    /// Keeps events (their records and usage audit entries) of each user's `periods` most
    /// recent periods only, at least one; an older period's events are forgotten when a newer
    /// period opens, once the older one no longer takes late usage (its end plus the grace
    /// window of the plan that rates it, and of the user's current plan, has passed).
    /// Summaries and charges of every period stay. All by default.
    ///
    /// The ids of forgotten events the host gave are remembered (the id and its period, a few
    /// dozen bytes, against the hundreds an event's record takes): an event sent without
    /// `occurred_at` is placed when it arrives, so its re-send may come in any later period, and
    /// it is refused there with [`StoreError::EventForgotten`], never recorded twice. A re-send
    /// with its `occurred_at` is refused as too late by the service first. Memory thus still
    /// grows with every event that carries the host's id, by those few dozen bytes, for as long
    /// as the process lives: restart it, or use a durable store, before that matters.
    pub fn periods_kept(mut self, periods: u32) -> Self {
        self.periods_kept = Some(periods.max(1));
        self
    }

    /// The store.
    pub fn build(self) -> InMemoryUsageStore {
        InMemoryUsageStore {
            shards: (0..self.shards).map(|_| Mutex::new(Shard::default())).collect(),
            shard_hasher: foldhash::fast::RandomState::default(),
            retention: self.retention,
            periods_kept: self.periods_kept,
        }
    }
}

impl Default for InMemoryUsageStore {
    fn default() -> Self {
        InMemoryUsageStore::new()
    }
}

impl InMemoryUsageStore {
    /// A store with 64 shards that keeps every event.
    pub fn new() -> InMemoryUsageStore {
        InMemoryUsageStore::builder().build()
    }

    /// A store with `shards` shards (at least one): more shards, less contention between users.
    pub fn with_shards(shards: usize) -> InMemoryUsageStore {
        InMemoryUsageStore::builder().shards(shards).build()
    }

    /// A builder, to choose the shards and what is kept of each event.
    pub fn builder() -> InMemoryUsageStoreBuilder {
        InMemoryUsageStoreBuilder {
            shards: 64,
            retention: EventRetention::All,
            periods_kept: None,
        }
    }

    fn read_account(&self, user: &UserId) -> Option<Account> {
        self.shard(user).users.get(user).and_then(|b| b.account.clone())
    }
}

#[async_trait]
impl UsageStore for InMemoryUsageStore {
    async fn put_account(&self, account: Account) -> Result<(), StoreError> {
        let mut shard = self.shard(&account.user_id);
        shard
            .users
            .get_or_insert_with(&account.user_id, UserBook::default)
            .save_account(account);
        Ok(())
    }

    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        let mut shard = self.shard(&account.user_id);
        let stored = shard.users.get(&account.user_id).and_then(|book| book.account.as_ref());
        if stored != expected {
            return Ok(false);
        }
        shard
            .users
            .get_or_insert_with(&account.user_id, UserBook::default)
            .save_account(account);
        Ok(true)
    }

    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        Ok(self.read_account(user))
    }

    async fn account_for_usage(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        // Read afresh, as `account` does, without a second call through the trait.
        Ok(self.read_account(user))
    }

    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        // Accounts are read afresh from the map: the account an event was placed with needs no
        // check.
        let placement = Placement {
            plan: request.plan,
            fee: request.fee,
            lease_until: request.lease_until,
            alerting: request.alerting,
        };
        let mut shard = self.shard(&request.usage.user_id);
        let shard = &mut *shard;
        let (book, new) = shard
            .users
            .get_or_insert_with_news(&request.usage.user_id, UserBook::default);
        // Kept only for a new user, whose book a failed record takes back, as
        // `place_and_record_usage` does.
        let new_user = new.then(|| request.usage.user_id.clone());
        match self.record_in(book, request.usage, placement) {
            Ok(recorded) => {
                shard.index_recorded(&recorded);
                Ok(recorded)
            }
            Err(error) => {
                if let Some(user) = new_user {
                    shard.users.remove(&user);
                }
                Err(error)
            }
        }
    }

    async fn place_and_record_usage<'p>(
        &self,
        mut usage: UsageRecord,
        place: &mut Placer<'_, 'p>,
    ) -> Result<PlacedUsage<'p>, StoreError> {
        // One look-up of the user: the event is placed with the account as it is under the
        // shard's lock, which no change can pass, and recorded before the lock is let go.
        let mut shard = self.shard(&usage.user_id);
        let shard = &mut *shard;
        let (book, new) = shard.users.get_or_insert_with_news(&usage.user_id, UserBook::default);
        let Some(placement) = place(&mut usage, book.account.as_ref()) else {
            let account = book.account.clone().map(Box::new);
            if new {
                // A refused event leaves nothing behind, not even an empty book; nor does a
                // failed record (below).
                shard.users.remove(&usage.user_id);
            }
            return Ok(PlacedUsage::Refused {
                usage: Box::new(usage),
                account,
            });
        };
        // Kept only for a new user, whose book a failed record takes back.
        let new_user = new.then(|| usage.user_id.clone());
        let recorded = match self.record_in(book, usage, placement) {
            Ok(recorded) => recorded,
            Err(error) => {
                if let Some(user) = new_user {
                    shard.users.remove(&user);
                }
                return Err(error);
            }
        };
        // The account is copied only for the charges' collection.
        let account = if recorded.charges.is_empty() {
            None
        } else {
            book.account.clone().map(Box::new)
        };
        shard.index_recorded(&recorded);
        Ok(PlacedUsage::Recorded {
            recorded,
            placement,
            account,
        })
    }

    async fn ensure_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError> {
        let EnsureCharge {
            charge,
            status,
            payment_id,
            now,
            lease_until,
            plan,
        } = request;
        let user = charge.user_id.clone();
        let period = charge.period;
        let mut shard = self.shard(&user);
        let shard = &mut *shard;
        let book = shard.users.get_or_insert_with(&user, UserBook::default);
        if let Some(existing) = book.charge(&charge.key) {
            return Ok((existing.clone(), false));
        }
        let currency = charge.amount.currency();
        let opened = book.periods.get(&period).is_none();
        book.periods.get_or_insert_with(period, || {
            PeriodBook::new(PeriodSummary::empty(user.clone(), period, currency, now))
        });
        let created = book.insert_charges(period, vec![charge], status, payment_id, now, lease_until)?;
        // A period opened by its fee (a monthly job, a subscription's invoice) is a new period as
        // much as one opened by an event: older periods' events may be forgotten now, by the
        // plan that rates it.
        if let (true, Some(kept), Some(plan)) = (opened, self.periods_kept, plan.as_ref()) {
            book.forget_events_before(period, kept, plan, now);
        }
        let charge = created.into_iter().next().ok_or_else(|| StoreError::NotFound {
            what: "charge",
            key: user.to_string(),
        })?;
        shard.index_charge(&charge, None);
        Ok((charge, true))
    }

    async fn claim_pending(
        &self,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let shards: Vec<&Mutex<Shard>> = match user {
            Some(user) => vec![self.shard_of(user)],
            None => self.shards.iter().collect(),
        };
        let candidates = |shard: &Shard| -> Vec<(UserId, ChargeKey)> {
            shard
                .pending
                .iter()
                .filter(|(_, u, _)| user.is_none_or(|wanted| wanted == u))
                .map(|(_, u, k)| (u.clone(), k.clone()))
                .collect()
        };
        Ok(claim_from(shards, limit, candidates, |charge| {
            CLAIM_PENDING
                .may_take(charge, now)
                .then(|| CLAIM_PENDING.take(charge, now, lease_until))
        }))
    }

    async fn claim_due_retries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let candidates = |shard: &Shard| -> Vec<(UserId, ChargeKey)> {
            shard
                .retries
                .iter()
                .take_while(|(at, _, _)| *at <= now)
                .map(|(_, u, k)| (u.clone(), k.clone()))
                .collect()
        };
        Ok(claim_from(self.shards.iter(), limit, candidates, |charge| {
            CLAIM_RETRIES
                .may_take(charge, now)
                .then(|| CLAIM_RETRIES.take(charge, now, lease_until))
        }))
    }

    async fn claim_awaiting_customer(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        let candidates = |shard: &Shard| -> Vec<(UserId, ChargeKey)> {
            shard.awaiting.iter().map(|(_, u, k)| (u.clone(), k.clone())).collect()
        };
        Ok(claim_from(self.shards.iter(), limit, candidates, |charge| {
            CLAIM_AWAITING
                .may_take(charge, now)
                .then(|| CLAIM_AWAITING.take(charge, now, lease_until))
        }))
    }

    async fn renew_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        let mut shard = self.shard(user);
        let Some(charge) = shard.users.get_mut(user).and_then(|b| b.charge_mut(key)) else {
            return Ok(None);
        };
        if charge.status != ChargeStatus::Pending || charge.lease_until != held_until {
            return Ok(None);
        }
        charge.lease_until = Some(lease_until);
        Ok(Some(charge.clone()))
    }

    async fn recorded_event(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
        match self.shard(user).users.get(user) {
            Some(book) => book.replay(user, event_id),
            None => Ok(None),
        }
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let mut shard = self.shard(&entry.user_id);
        shard
            .users
            .get_or_insert_with(&entry.user_id, UserBook::default)
            .audit
            .push(TrailItem::Entry(Box::new(entry)));
        Ok(())
    }

    async fn gateway_event_applied(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        let shard = self.shard(user);
        Ok(shard
            .users
            .get(user)
            .is_some_and(|book| book.gateway_events.contains(event_id)))
    }

    async fn record_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        let mut shard = self.shard(&record.user_id);
        let book = shard.users.get_or_insert_with(&record.user_id, UserBook::default);
        if !book.gateway_events.insert(record.event_id) {
            return Ok(false);
        }
        book.audit.push(TrailItem::Entry(Box::new(AuditEntry {
            at: record.at,
            user_id: record.user_id,
            period: record.period,
            event: record.audit,
        })));
        Ok(true)
    }

    async fn settle_charge(&self, s: Settlement<'_>) -> Result<Charge, StoreError> {
        let mut shard = self.shard(s.user_id);
        let shard = &mut *shard;
        let not_found = || StoreError::NotFound {
            what: "charge",
            key: s.key.to_string(),
        };
        let book = shard.users.get_mut(s.user_id).ok_or_else(not_found)?;
        let (period, index) = *book.charge_index.get(s.key).ok_or_else(not_found)?;
        let period_book = book.periods.get_mut(&period).ok_or_else(not_found)?;
        let charge = period_book.charges.get_mut(index).ok_or_else(not_found)?;
        if charge.status != s.expected_status || charge.round != s.expected_round {
            return Err(StoreError::StatusConflict {
                charge: Box::new(charge.clone()),
            });
        }
        if !charge.status.can_become(s.status) {
            return Err(StoreError::ForbiddenTransition {
                from: charge.status,
                to: s.status,
            });
        }
        let mut summary = period_book.summary.clone();
        apply_to_summary(&mut summary, charge.kind, charge.amount, Some(charge.status), s.status)
            .map_err(money_error)?;
        summary.updated_at = s.at;
        period_book.summary = summary;
        let previous = (charge.status, charge.next_retry_at);
        let from = charge.status;
        let (user, to, at) = (s.user_id, s.status, s.at);
        // The settlement is this call's: its texts move into the charge.
        s.apply_to(charge);
        let charge = charge.clone();
        book.audit.push(TrailItem::Entry(Box::new(AuditEntry {
            at,
            user_id: user.clone(),
            period: Some(period),
            event: AuditEvent::ChargeStatusChanged {
                key: charge.key.clone(),
                from,
                to,
                payment_id: charge.payment_id.clone(),
                failure_code: charge.failure_code.clone(),
            },
        })));
        shard.index_charge(&charge, Some(previous));
        Ok(charge)
    }

    async fn charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        Ok(self.shard(user).users.get(user).and_then(|b| b.charge(key).cloned()))
    }

    async fn charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .and_then(|b| b.periods.get(&period))
            .map(|p| p.charges.clone())
            .unwrap_or_default())
    }

    async fn unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .map(|b| {
                b.periods
                    .values()
                    .flat_map(|p| p.charges.iter().filter(|c| c.status.is_unpaid()).cloned())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn consumptions(&self, user: &UserId, period: PeriodKey) -> Result<Vec<UsageRecord>, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .and_then(|b| b.periods.get(&period))
            .map(|p| p.consumptions.iter().map(|u| UsageRecord::clone(u)).collect())
            .unwrap_or_default())
    }

    async fn period_summary(&self, user: &UserId, period: PeriodKey) -> Result<Option<PeriodSummary>, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .and_then(|b| b.periods.get(&period))
            .map(|p| p.summary.clone()))
    }

    async fn usage_by_operation(&self, user: &UserId, period: PeriodKey) -> Result<Vec<OperationUsage>, StoreError> {
        let shard = self.shard(user);
        let book = shard.users.get(user).and_then(|b| b.periods.get(&period));
        Ok(book.map_or_else(Vec::new, PeriodBook::usage_by_operation))
    }

    async fn usage_by_model(&self, user: &UserId, period: PeriodKey) -> Result<Vec<ModelUsage>, StoreError> {
        let shard = self.shard(user);
        let book = shard.users.get(user).and_then(|b| b.periods.get(&period));
        Ok(book.map_or_else(Vec::new, |p| {
            p.by_model.report(&p.summary, p.by_operation.total_tokens())
        }))
    }

    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError> {
        let charges = self.charges(user, period).await?;
        let mut by_tier: BTreeMap<u64, TierChargeReport> = BTreeMap::new();
        for charge in charges {
            let zero = Money::zero(charge.amount.currency());
            let report = by_tier.entry(charge.block).or_insert_with(|| TierChargeReport {
                billing_tier: charge.billing_tier.clone(),
                charges_count: 0,
                total_charged: zero,
                collected: zero,
            });
            report.charges_count += 1;
            report.total_charged = report.total_charged.checked_add(charge.amount).map_err(money_error)?;
            if charge.status == ChargeStatus::Succeeded {
                report.collected = report.collected.checked_add(charge.amount).map_err(money_error)?;
            }
        }
        Ok(by_tier.into_values().collect())
    }

    async fn reserve(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        let mut shard = self.shard(request.user_id);
        let (book, new) = shard.users.get_or_insert_with_news(request.user_id, UserBook::default);
        let decision = book.reserve(&request);
        if new && !matches!(decision, Ok(HoldDecision::Granted { .. })) {
            shard.users.remove(request.user_id);
        }
        decision
    }

    async fn release_hold(&self, user: &UserId, period: PeriodKey, hold_id: &EventId) -> Result<bool, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get_mut(user)
            .is_some_and(|book| book.free_hold(period, hold_id)))
    }

    async fn spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .map(|book| book.spend_state(period, now, overdue_before, None))
            .unwrap_or_default())
    }

    async fn locate_spend_state(
        &self,
        user: &UserId,
        now: DateTime<Utc>,
        locate: &mut SpendLocator<'_>,
    ) -> Result<Option<SpendState>, StoreError> {
        // One look-up of the user, and no copy of the account.
        let shard = self.shard(user);
        let book = shard.users.get(user);
        Ok(
            locate(book.and_then(|book| book.account.as_ref())).map(|(period, overdue_before)| {
                book.map(|book| book.spend_state(period, now, overdue_before, None))
                    .unwrap_or_default()
            }),
        )
    }

    async fn holds(&self, user: &UserId, period: PeriodKey, now: DateTime<Utc>) -> Result<Vec<Hold>, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get(user)
            .map(|book| book.open_holds(period, now).cloned().collect())
            .unwrap_or_default())
    }

    async fn raise_alert(&self, alert: Alert) -> Result<bool, StoreError> {
        let mut shard = self.shard(&alert.user_id);
        let user = alert.user_id.clone();
        Ok(shard
            .users
            .get_or_insert_with(&user, UserBook::default)
            .raise_alert(alert))
    }

    async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, StoreError> {
        Ok(self.alerts_pending(user, limit))
    }

    async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, StoreError> {
        Ok(self
            .shard(user)
            .users
            .get_mut(user)
            .is_some_and(|book| book.ack_alert(alert_id)))
    }

    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError> {
        let shard = self.shard(user);
        let Some(book) = shard.users.get(user) else {
            return Ok(Vec::new());
        };
        let wanted = |of: PeriodKey| period.is_none_or(|p| p == of);
        let mut trail = Vec::with_capacity(book.audit.len());
        for item in &book.audit {
            match item {
                TrailItem::Entry(entry) => {
                    if period.is_none() || entry.period == period {
                        trail.push(AuditEntry::clone(entry));
                    }
                }
                TrailItem::Usage {
                    period: of,
                    index,
                    total_after,
                } if wanted(*of) => {
                    // A usage item is dropped with its period's events (`forget_events_before`),
                    // so its event is there.
                    let Some(usage) = book.periods.get(of).and_then(|p| p.consumptions.get(*index)) else {
                        continue;
                    };
                    trail.push(AuditEntry {
                        at: usage.recorded_at,
                        user_id: user.clone(),
                        period: Some(*of),
                        event: AuditEvent::UsageRecorded {
                            consumption_id: usage.consumption_id,
                            event_id: usage.event_id.clone(),
                            tokens: usage.tokens,
                            total_after: *total_after,
                        },
                    });
                }
                TrailItem::ChargeCreated {
                    period: of,
                    index,
                    status,
                    collection_started,
                } if wanted(*of) => {
                    // Charges are never removed from their period.
                    let Some(charge) = book.periods.get(of).and_then(|p| p.charges.get(*index)) else {
                        continue;
                    };
                    let entry = |event| AuditEntry {
                        at: charge.created_at,
                        user_id: user.clone(),
                        period: Some(*of),
                        event,
                    };
                    trail.push(entry(AuditEvent::ChargeCreated {
                        key: charge.key.clone(),
                        billing_tier: charge.billing_tier.clone(),
                        amount: charge.amount,
                        status: *status,
                    }));
                    if *collection_started {
                        trail.push(entry(AuditEvent::CollectionStarted {
                            key: charge.key.clone(),
                            round: 0,
                            attempt: 1,
                        }));
                    }
                }
                // Of another period than the one asked for.
                TrailItem::Usage { .. } | TrailItem::ChargeCreated { .. } => {}
            }
        }
        Ok(trail)
    }
}

#[cfg(test)]
mod tests {
    use super::shards::lock;
    use super::*;
    use crate::domain::{MAX_TOKENS, OperationType, Plan};

    /// Accounts that name one plan through one shared text (a name too long to be kept in
    /// place) are kept with texts of their own, so that reading two users' accounts on two
    /// threads writes two reference counts, not one.
    #[tokio::test]
    async fn kept_accounts_do_not_share_their_plan_ids() {
        let store = InMemoryUsageStore::new();
        let plan = crate::PlanId::new("a-plan-with-a-long-name-2026").expect("valid");
        let at = DateTime::UNIX_EPOCH;
        for user in ["ana", "bea"] {
            let account = Account {
                user_id: UserId::new(user).expect("valid"),
                customer_id: None,
                plan_id: plan.clone(),
                earlier_plans: vec![(PeriodKey::new(2026, 10).expect("valid"), plan.clone())],
                subscription_id: None,
                limits: None,
                created_at: at,
                updated_at: at,
            };
            store.put_account(account).await.expect("kept");
        }
        let read = |user: &str| {
            store
                .read_account(&UserId::new(user).expect("valid"))
                .expect("an account")
        };
        let (ana, bea) = (read("ana"), read("bea"));
        for id in [&ana.plan_id, &bea.plan_id, &ana.earlier_plans[0].1] {
            assert_eq!(id, &plan);
            assert!(!std::ptr::eq(id.as_str(), plan.as_str()), "shares the caller's text");
        }
        assert!(!std::ptr::eq(ana.plan_id.as_str(), bea.plan_id.as_str()));
    }

    /// An event placed for a user the store has never seen, then refused by the placer or
    /// failed by the store, leaves no book behind; one recorded does.
    #[tokio::test]
    async fn a_new_users_refused_or_failed_event_leaves_no_book() {
        let store = InMemoryUsageStore::new();
        let plan = Plan::default();
        let placement = Placement {
            plan: &plan,
            fee: crate::FeeCollection::Library,
            lease_until: None,
            alerting: None,
        };
        let at = DateTime::UNIX_EPOCH;
        let event = |tokens| {
            let consumption_id = uuid::Uuid::new_v4();
            UsageRecord {
                consumption_id,
                event_id: EventId::of_consumption(consumption_id),
                user_id: UserId::new("newcomer").expect("valid"),
                period: key(11),
                tokens,
                operation_type: OperationType::new("chat").expect("valid"),
                client_id: None,
                metadata: crate::Metadata::new(),
                occurred_at: at,
                occurred_at_reported: false,
                recorded_at: at,
                detail: None,
            }
        };
        let books = || store.shards.iter().map(|shard| lock(shard).users.len()).sum::<usize>();

        let refused = store.place_and_record_usage(event(1_000), &mut |_, _| None).await;
        assert!(
            matches!(refused, Ok(PlacedUsage::Refused { account: None, .. })),
            "{refused:?}"
        );
        assert_eq!(books(), 0);
        let failed = store
            .place_and_record_usage(event(MAX_TOKENS + 1), &mut |_, _| Some(placement))
            .await;
        assert!(matches!(failed, Err(StoreError::TotalOverflow { .. })), "{failed:?}");
        assert_eq!(books(), 0);
        let recorded = store
            .place_and_record_usage(event(1_000), &mut |_, _| Some(placement))
            .await;
        assert!(matches!(recorded, Ok(PlacedUsage::Recorded { .. })), "{recorded:?}");
        assert_eq!(books(), 1);

        // Recorded directly (a batch, a store caller): a failure leaves no book either.
        let other = UsageRecord {
            user_id: UserId::new("another-newcomer").expect("valid"),
            ..event(MAX_TOKENS + 1)
        };
        let failed = store
            .record_usage(RecordUsage {
                usage: other,
                plan: &plan,
                fee: crate::FeeCollection::Library,
                lease_until: None,
                alerting: None,
                account: None,
            })
            .await;
        assert!(matches!(failed, Err(StoreError::TotalOverflow { .. })), "{failed:?}");
        assert_eq!(books(), 1);
    }

    fn key(month: u32) -> PeriodKey {
        PeriodKey::new(2026, month).expect("valid")
    }
}
