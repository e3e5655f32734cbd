//! [`InMemoryUsageStore`]: the store of one process, sharded by user.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::id_map::IdMap;
use super::{
    Account, AuditEntry, AuditEvent, EnsureCharge, GatewayEventRecord, OperationUsage, PeriodSummary, PlacedUsage,
    Placement, Placer, RecordUsage, Recorded, Settlement, StoreError, SummaryDelta, TierChargeReport, UsageStore,
    shard_index,
};
use crate::domain::{
    Blocks, Charge, ChargeKey, ChargeKind, ChargeStatus, EventId, MAX_TOKENS, Money, MoneyError, NewCharge,
    OperationType, Period, PeriodKey, Plan, UsageRecord, UserId, charges_for_growth,
};

const STORE: &str = "in-memory store";

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
    /// with its `occurred_at` is refused as too late by the service first.
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

#[derive(Debug, Default)]
struct Shard {
    users: IdMap<UserId, UserBook>,
    /// Pending charges, oldest first, to find the ones to resume without visiting every user.
    pending: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
    /// Failed charges with a retry scheduled, soonest first.
    retries: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
    /// Charges awaiting the customer's authentication, oldest first.
    awaiting: BTreeSet<(DateTime<Utc>, UserId, ChargeKey)>,
}

#[derive(Debug, Default)]
struct UserBook {
    account: Option<Account>,
    events: IdMap<EventId, EventEntry>,
    /// The host's ids of events forgotten with their period (bounded retention), with that
    /// period: a re-send of one is refused, never recorded again.
    forgotten: IdMap<EventId, PeriodKey>,
    periods: Periods,
    charge_index: HashMap<ChargeKey, (PeriodKey, usize)>,
    audit: Vec<TrailItem>,
    gateway_events: HashSet<String>,
}

/// A place in a user's audit trail: an entry; or a recorded event or a created charge, whose
/// entries are read from the event or charge kept in its period (which holds everything they
/// say) rather than kept twice.
#[derive(Debug)]
enum TrailItem {
    Entry(Box<AuditEntry>),
    Usage {
        period: PeriodKey,
        /// The event's place in its period's `consumptions`.
        index: usize,
        total_after: u64,
    },
    /// A charge's creation (its key, label and amount never change) and, when it was leased to
    /// its creator, the start of its first collection.
    ChargeCreated {
        period: PeriodKey,
        /// The charge's place in its period's `charges`.
        index: usize,
        status: ChargeStatus,
        collection_started: bool,
    },
}

/// What dedupe needs to answer a replay with the original outcome.
#[derive(Debug)]
struct EventEntry {
    period: PeriodKey,
    index: usize,
    total_before: u64,
    created_fee: bool,
    blocks: Blocks,
}

#[derive(Debug)]
struct PeriodBook {
    summary: PeriodSummary,
    consumptions: Vec<Arc<UsageRecord>>,
    by_operation: OperationTotals,
    charges: Vec<Charge>,
    /// When the period stops taking late usage, by the plan that rates it: set by its first
    /// kept event (a period opened by a charge alone has no events to forget).
    takes_usage_until: Option<DateTime<Utc>>,
}

impl PeriodBook {
    fn new(summary: PeriodSummary) -> PeriodBook {
        PeriodBook {
            summary,
            consumptions: Vec::new(),
            by_operation: OperationTotals::default(),
            charges: Vec::new(),
            takes_usage_until: None,
        }
    }
}

/// A user's periods, oldest first, in one allocation.
///
/// A user has a period a month, and events go almost always to the latest, which is looked at
/// first. Its book sits next to its key, where a map's node keeps the key, the node's length and
/// the book on separate cache lines: each a likely miss on every event once a host has
/// thousands of users.
#[derive(Debug, Default)]
struct Periods(Vec<(PeriodKey, PeriodBook)>);

impl Periods {
    /// Where `key` is, or where it would go.
    fn find(&self, key: PeriodKey) -> Result<usize, usize> {
        match self.0.last() {
            Some((last, _)) if *last == key => Ok(self.0.len() - 1),
            Some((last, _)) if *last < key => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&key, |(k, _)| *k),
        }
    }

    fn get(&self, key: &PeriodKey) -> Option<&PeriodBook> {
        let index = self.find(*key).ok()?;
        self.0.get(index).map(|(_, book)| book)
    }

    fn get_mut(&mut self, key: &PeriodKey) -> Option<&mut PeriodBook> {
        let index = self.find(*key).ok()?;
        self.0.get_mut(index).map(|(_, book)| book)
    }

    fn contains_key(&self, key: &PeriodKey) -> bool {
        self.find(*key).is_ok()
    }

    /// The book of `key`, made by `make` if the period has none.
    fn get_or_insert_with(&mut self, key: PeriodKey, make: impl FnOnce() -> PeriodBook) -> &mut PeriodBook {
        let index = self.find(key).unwrap_or_else(|at| {
            // One more each time: a user gains a period a month, and most users have few.
            self.0.reserve_exact(1);
            self.0.insert(at, (key, make()));
            at
        });
        &mut self.0[index].1
    }

    fn remove(&mut self, key: &PeriodKey) -> Option<PeriodBook> {
        let index = self.find(*key).ok()?;
        Some(self.0.remove(index).1)
    }

    /// The periods before `end`, oldest first.
    fn before_mut(&mut self, end: PeriodKey) -> impl Iterator<Item = (PeriodKey, &mut PeriodBook)> {
        let end = self.find(end).unwrap_or_else(|at| at);
        self.0[..end].iter_mut().map(|(key, book)| (*key, book))
    }

    fn values(&self) -> impl Iterator<Item = &PeriodBook> {
        self.0.iter().map(|(_, book)| book)
    }
}

/// A period's tokens and events by operation type.
///
/// A host reports few operation types (`chat`, `embedding`), and the first two are counted in
/// the period's own memory, next to its summary, rather than behind a pointer; more go to a
/// list of their own.
#[derive(Debug, Default)]
struct OperationTotals {
    first: [Option<(OperationType, u64, u64)>; 2],
    more: Vec<(OperationType, u64, u64)>,
}

impl OperationTotals {
    /// Counts an event of `tokens` of `operation`.
    fn add(&mut self, operation: &OperationType, tokens: u64) {
        let mut counted = self.first.iter_mut().flatten().chain(self.more.iter_mut());
        if let Some((_, total, events)) = counted.find(|(op, ..)| op == operation) {
            (*total, *events) = (*total + tokens, *events + 1);
        } else if let Some(free) = self.first.iter_mut().find(|slot| slot.is_none()) {
            *free = Some((operation.clone(), tokens, 1));
        } else {
            self.more.push((operation.clone(), tokens, 1));
        }
    }

    /// Each operation type's tokens and events, in the types' order.
    fn sorted(&self) -> Vec<&(OperationType, u64, u64)> {
        let mut all: Vec<_> = self.first.iter().flatten().chain(&self.more).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
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

    fn shard_of(&self, user: &UserId) -> &Mutex<Shard> {
        &self.shards[shard_index(&self.shard_hasher, user, self.shards.len())]
    }

    fn shard(&self, user: &UserId) -> MutexGuard<'_, Shard> {
        lock(self.shard_of(user))
    }

    fn read_account(&self, user: &UserId) -> Option<Account> {
        self.shard(user).users.get(user).and_then(|b| b.account.clone())
    }

    /// Records an event in its user's book, in a shard locked by the caller, under
    /// `placement`. The charges it creates are then indexed in the shard by the caller
    /// ([`Shard::index_recorded`]).
    fn record_in(
        &self,
        book: &mut UserBook,
        usage: UsageRecord,
        placement: Placement<'_>,
    ) -> Result<Recorded, StoreError> {
        let Placement { plan, fee, lease_until } = placement;
        let user = &usage.user_id;

        let keep = match self.retention {
            EventRetention::All => true,
            EventRetention::Resendable => usage.has_host_event_id(),
        };
        // An event that would not be kept has no original to find: its id is a fresh
        // consumption id, and no such event was kept before it.
        if keep {
            if let Some(original) = book.replay(user, &usage.event_id)? {
                return original.answer_resend(&usage);
            }
            if let Some(period) = book.forgotten.get(&usage.event_id) {
                return Err(StoreError::EventForgotten {
                    event_id: usage.event_id.clone(),
                    period: *period,
                });
            }
        }

        let period = usage.period;
        let before = book.periods.get(&period).map_or(0, |p| p.summary.total_tokens);
        let after = before
            .checked_add(usage.tokens)
            .filter(|t| *t <= MAX_TOKENS)
            .ok_or(StoreError::TotalOverflow {
                total: before,
                tokens: usage.tokens,
            })?;
        let new_charges = charges_for_growth(plan, fee, user, period, before, after, Some(usage.consumption_id))?;
        let blocks = plan.blocks_crossed(before, after)?;

        let now = usage.recorded_at;
        let opened = !book.periods.contains_key(&period);
        if opened {
            book.periods.get_or_insert_with(period, || {
                PeriodBook::new(PeriodSummary::empty(user.clone(), period, plan.currency(), now))
            });
        }
        // Charges first: it is the only step that can fail, and it changes nothing when it does.
        let created = match book.insert_charges(period, new_charges, ChargeStatus::Pending, None, now, lease_until) {
            Ok(created) => created,
            Err(e) => {
                if opened {
                    book.periods.remove(&period);
                }
                return Err(e);
            }
        };
        let usage = Arc::new(usage);
        let period_book = book.periods.get_mut(&period).ok_or_else(|| StoreError::NotFound {
            what: "period",
            key: period.to_string(),
        })?;
        period_book.summary.total_tokens = after;
        period_book.summary.events += 1;
        period_book.summary.updated_at = now;
        period_book.by_operation.add(&usage.operation_type, usage.tokens);
        if keep {
            period_book
                .takes_usage_until
                .get_or_insert_with(|| takes_usage_until(period, plan));
            let index = period_book.consumptions.len();
            period_book.consumptions.push(Arc::clone(&usage));
            book.events.insert(
                usage.event_id.clone(),
                EventEntry {
                    period,
                    index,
                    total_before: before,
                    // Charges that existed already are never in `created`.
                    created_fee: created.iter().any(|c| c.kind == ChargeKind::FixedFee),
                    blocks,
                },
            );
            book.audit.push(TrailItem::Usage {
                period,
                index,
                total_after: after,
            });
        }
        if opened {
            if let Some(kept) = self.periods_kept {
                book.forget_events_before(period, kept, plan, now);
            }
        }
        Ok(Recorded {
            usage,
            total_before: before,
            total_after: after,
            charges: created,
            replayed: false,
        })
    }
}

/// A poisoned shard only means a thread panicked while holding it; every write below validates
/// before it mutates, so the data is consistent and the lock can be taken over.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn money_error(source: MoneyError) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: Box::new(source),
    }
}

/// Moves the summary's figures for a charge entering `to` (from `from`, or newly created).
fn apply_to_summary(
    summary: &mut PeriodSummary,
    kind: ChargeKind,
    amount: Money,
    from: Option<ChargeStatus>,
    to: ChargeStatus,
) -> Result<(), MoneyError> {
    if amount.currency() != summary.currency {
        return Err(MoneyError::CurrencyMismatch {
            left: summary.currency,
            right: amount.currency(),
        });
    }
    SummaryDelta::of(kind, amount.minor_units(), from, to).apply(summary)
}

/// The claim operations' one mechanism: walks `shards`, offers each charge that `candidates`
/// draws from a shard's index to `claim`, and keeps those it takes, until `limit` are taken.
/// `claim` changes the charge and returns the audit events of the change, or `None` to pass it
/// over. Each shard is locked while it is walked, so a charge is claimed by one caller at a time.
fn claim_from<'a>(
    shards: impl IntoIterator<Item = &'a Mutex<Shard>>,
    limit: usize,
    candidates: impl Fn(&Shard) -> Vec<(UserId, ChargeKey)>,
    mut claim: impl FnMut(&mut Charge) -> Option<Vec<AuditEvent>>,
) -> Vec<Charge> {
    let mut claimed = Vec::new();
    for shard in shards {
        if claimed.len() >= limit {
            break;
        }
        let mut shard = lock(shard);
        let shard = &mut *shard;
        for (user_id, key) in candidates(shard) {
            if claimed.len() >= limit {
                break;
            }
            let Some(book) = shard.users.get_mut(&user_id) else {
                continue;
            };
            let Some(charge) = book.charge_mut(&key) else {
                continue;
            };
            let previous = (charge.status, charge.next_retry_at);
            let Some(events) = claim(charge) else {
                continue;
            };
            let charge = charge.clone();
            for event in events {
                book.audit.push(TrailItem::Entry(Box::new(AuditEntry {
                    at: charge.updated_at,
                    user_id: user_id.clone(),
                    period: Some(charge.period),
                    event,
                })));
            }
            shard.index_charge(&charge, Some(previous));
            claimed.push(charge);
        }
    }
    claimed
}

impl Shard {
    /// Indexes the charges an event created (a replay created none: its charges are indexed
    /// as they are).
    fn index_recorded(&mut self, recorded: &Recorded) {
        if !recorded.replayed {
            for charge in &recorded.charges {
                self.index_charge(charge, None);
            }
        }
    }

    /// Keeps the pending and retry indexes in step with a charge's status.
    fn index_charge(&mut self, charge: &Charge, previous: Option<(ChargeStatus, Option<DateTime<Utc>>)>) {
        let entry = |at: DateTime<Utc>| (at, charge.user_id.clone(), charge.key.clone());
        if let Some((status, retry_at)) = previous {
            if status == ChargeStatus::Pending {
                self.pending.remove(&entry(charge.created_at));
            }
            if status == ChargeStatus::RequiresAction {
                self.awaiting.remove(&entry(charge.created_at));
            }
            if let Some(at) = retry_at {
                self.retries.remove(&entry(at));
            }
        }
        if charge.status == ChargeStatus::Pending {
            self.pending.insert(entry(charge.created_at));
        }
        if charge.status == ChargeStatus::RequiresAction {
            self.awaiting.insert(entry(charge.created_at));
        }
        if charge.status == ChargeStatus::Failed {
            if let Some(at) = charge.next_retry_at {
                self.retries.insert(entry(at));
            }
        }
    }
}

/// Until when `plan` takes late usage for `period`: its end plus the plan's grace window, or
/// for ever when that is past the last instant there is.
fn takes_usage_until(period: PeriodKey, plan: &Plan) -> DateTime<Utc> {
    crate::clock::later(Period::new(period, plan.zone()).end(), plan.late_usage_grace())
}

impl UserBook {
    /// Saves the user's account, with its audit entry.
    fn save_account(&mut self, account: Account) {
        // Read, and so cloned, for every event of the user.
        let account = account.with_own_plan_ids();
        self.audit.push(TrailItem::Entry(Box::new(AuditEntry {
            at: account.updated_at,
            user_id: account.user_id.clone(),
            period: None,
            event: AuditEvent::AccountSaved {
                customer_id: account.customer_id.clone(),
                plan_id: account.plan_id.clone(),
            },
        })));
        self.account = Some(account);
    }

    /// The outcome of an event already recorded, as a replay.
    fn replay(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
        let Some(entry) = self.events.get(event_id) else {
            return Ok(None);
        };
        let original = self
            .periods
            .get(&entry.period)
            .and_then(|p| p.consumptions.get(entry.index))
            .ok_or_else(|| StoreError::NotFound {
                what: "consumption",
                key: event_id.to_string(),
            })?;
        let keys = entry
            .created_fee
            .then(|| ChargeKey::new(user, entry.period, ChargeKind::FixedFee, 0))
            .into_iter()
            .chain(
                entry
                    .blocks
                    .into_iter()
                    .map(|b| ChargeKey::new(user, entry.period, ChargeKind::Block, b)),
            );
        Ok(Some(Recorded {
            usage: Arc::clone(original),
            total_before: entry.total_before,
            total_after: entry.total_before + original.tokens,
            charges: keys.filter_map(|k| self.charge(&k).cloned()).collect(),
            replayed: true,
        }))
    }

    /// Forgets the events (records, ids, usage audit entries) of the periods before the `kept`
    /// most recent ones, up to `newest`, that no longer take usage, so that a re-send reaching
    /// the store is always answered as the original, never recorded twice. A period takes late
    /// usage while the grace window of the plan that rates it is open (the service judges
    /// lateness by that plan); the window of `current`, the plan of the period opening, whose
    /// zone draws the periods' boundaries, is waited for as well, so that a store never forgets
    /// what a caller judging by the current plan could still send: its events are kept until
    /// both have closed.
    fn forget_events_before(&mut self, newest: PeriodKey, kept: u32, current: &Plan, now: DateTime<Utc>) {
        // Walks back no further than the oldest period (a large `kept` costs nothing): none is
        // before a cutoff that reached it.
        let Some(oldest) = self.periods.0.first().map(|(key, _)| *key) else {
            return;
        };
        let mut cutoff = newest;
        for _ in 1..kept {
            if cutoff <= oldest {
                return;
            }
            cutoff = cutoff.previous();
        }
        let mut forgotten = Vec::new();
        for (key, book) in self.periods.before_mut(cutoff) {
            let open_for_current = takes_usage_until(key, current) > now;
            if book.consumptions.is_empty()
                || open_for_current
                || book.takes_usage_until.is_none_or(|until| until > now)
            {
                continue;
            }
            for usage in book.consumptions.drain(..) {
                self.events.remove(&usage.event_id);
                // An id the service drew can never be sent again; the host's can, in any period.
                if usage.has_host_event_id() {
                    self.forgotten.insert(usage.event_id.clone(), key);
                }
            }
            book.consumptions.shrink_to_fit();
            forgotten.push(key);
        }
        if !forgotten.is_empty() {
            self.audit
                .retain(|item| !matches!(item, TrailItem::Usage { period, .. } if forgotten.contains(period)));
        }
    }

    fn charge_mut(&mut self, key: &ChargeKey) -> Option<&mut Charge> {
        let (period, index) = *self.charge_index.get(key)?;
        self.periods.get_mut(&period)?.charges.get_mut(index)
    }

    fn charge(&self, key: &ChargeKey) -> Option<&Charge> {
        let (period, index) = self.charge_index.get(key)?;
        self.periods.get(period)?.charges.get(*index)
    }

    /// Inserts charges that do not exist yet, in order; returns those created.
    fn insert_charges(
        &mut self,
        period: PeriodKey,
        charges: Vec<NewCharge>,
        status: ChargeStatus,
        payment_id: Option<String>,
        now: DateTime<Utc>,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<Charge>, StoreError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let book = self.periods.get_mut(&period).ok_or_else(|| StoreError::NotFound {
            what: "period",
            key: period.to_string(),
        })?;
        // Validate the whole batch against the summary before changing anything.
        let mut summary = book.summary.clone();
        let mut created = Vec::with_capacity(charges.len());
        for new in charges {
            if self.charge_index.contains_key(&new.key) {
                continue;
            }
            apply_to_summary(&mut summary, new.kind, new.amount, None, status).map_err(money_error)?;
            let mut charge = new.into_charge(crate::random::uuid_v4(), status, now);
            charge.payment_id = payment_id.clone();
            if status == ChargeStatus::Pending && lease_until.is_some() {
                charge.lease_until = lease_until;
                charge.attempts = 1;
            }
            created.push(charge);
        }
        summary.updated_at = now;
        book.summary = summary;
        for charge in &created {
            let index = book.charges.len();
            self.charge_index.insert(charge.key.clone(), (period, index));
            book.charges.push(charge.clone());
            self.audit.push(TrailItem::ChargeCreated {
                period,
                index,
                status,
                collection_started: charge.attempts == 1,
            });
        }
        Ok(created)
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
            if !charge.is_claimable(now) {
                return None;
            }
            charge.lease_until = Some(lease_until);
            charge.attempts = charge.attempts.saturating_add(1);
            charge.updated_at = now;
            Some(vec![AuditEvent::CollectionStarted {
                key: charge.key.clone(),
                round: charge.round,
                attempt: charge.attempts,
            }])
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
            if charge.status != ChargeStatus::Failed || charge.lease_until.is_some_and(|until| until > now) {
                return None;
            }
            charge.status = ChargeStatus::Pending;
            charge.round = charge.round.saturating_add(1);
            charge.attempts = charge.attempts.saturating_add(1);
            charge.next_retry_at = None;
            charge.lease_until = Some(lease_until);
            charge.updated_at = now;
            Some(vec![
                AuditEvent::ChargeStatusChanged {
                    key: charge.key.clone(),
                    from: ChargeStatus::Failed,
                    to: ChargeStatus::Pending,
                    payment_id: None,
                    failure_code: None,
                },
                AuditEvent::CollectionStarted {
                    key: charge.key.clone(),
                    round: charge.round,
                    attempt: charge.attempts,
                },
            ])
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
            if charge.status != ChargeStatus::RequiresAction || charge.lease_until.is_some_and(|until| until > now) {
                return None;
            }
            charge.lease_until = Some(lease_until);
            charge.updated_at = now;
            Some(Vec::new())
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
        charge.status = s.status;
        // The settlement is this call's: its texts move into the charge.
        if s.payment_id.is_some() {
            charge.payment_id = s.payment_id;
        }
        if s.status == ChargeStatus::Succeeded {
            charge.failure_code = None;
            charge.failure_message = None;
        } else if s.failure_code.is_some() || s.failure_message.is_some() {
            charge.failure_code = s.failure_code;
            charge.failure_message = s.failure_message;
        }
        charge.next_retry_at = if s.status == ChargeStatus::Failed {
            s.next_retry_at
        } else {
            None
        };
        charge.lease_until = s.lease_until;
        charge.updated_at = s.at;
        let charge = charge.clone();
        book.audit.push(TrailItem::Entry(Box::new(AuditEntry {
            at: s.at,
            user_id: s.user_id.clone(),
            period: Some(period),
            event: AuditEvent::ChargeStatusChanged {
                key: charge.key.clone(),
                from,
                to: s.status,
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
        Ok(self
            .shard(user)
            .users
            .get(user)
            .and_then(|b| b.periods.get(&period))
            .map(|p| {
                p.by_operation
                    .sorted()
                    .into_iter()
                    .map(|(op, tokens, count)| OperationUsage {
                        operation_type: op.clone(),
                        total_tokens: *tokens,
                        operations: *count,
                    })
                    .collect()
            })
            .unwrap_or_default())
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
    use super::*;

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
                account: None,
            })
            .await;
        assert!(matches!(failed, Err(StoreError::TotalOverflow { .. })), "{failed:?}");
        assert_eq!(books(), 1);
    }

    fn key(month: u32) -> PeriodKey {
        PeriodKey::new(2026, month).expect("valid")
    }

    fn book(month: u32) -> PeriodBook {
        let user = UserId::new("ana").expect("valid");
        PeriodBook::new(PeriodSummary::empty(
            user,
            key(month),
            crate::Currency::BRL,
            DateTime::UNIX_EPOCH,
        ))
    }

    proptest::proptest! {
        /// Periods opened in any order are found, kept in order and forgotten as a sorted map
        /// of them would be.
        #[test]
        fn periods_behave_as_a_sorted_map(
            steps in proptest::collection::vec((1..=12_u32, proptest::bool::ANY), 1..40),
        ) {
            let (mut periods, mut model) = (Periods::default(), BTreeMap::new());
            for (month, remove) in steps {
                // The model counts the events each period was given since it was opened.
                if remove {
                    let removed = periods.remove(&key(month)).map(|b| b.summary.events);
                    proptest::prop_assert_eq!(removed, model.remove(&key(month)));
                } else {
                    periods.get_or_insert_with(key(month), || book(month)).summary.events += 1;
                    *model.entry(key(month)).or_insert(0) += 1;
                    if let Some(book) = periods.get_mut(&key(month)) {
                        book.summary.events += 1;
                    }
                    *model.entry(key(month)).or_insert(0) += 1;
                }
                for month in 1..=12 {
                    let found = periods.get(&key(month)).map(|b| (b.summary.period, b.summary.events));
                    let expected = model.get(&key(month)).map(|events| (key(month), *events));
                    proptest::prop_assert_eq!(found, expected);
                    proptest::prop_assert_eq!(periods.contains_key(&key(month)), model.contains_key(&key(month)));
                }
                let all: Vec<_> = periods.values().map(|b| b.summary.period).collect();
                proptest::prop_assert_eq!(all, model.keys().copied().collect::<Vec<_>>());
                for end in 1..=12 {
                    let before: Vec<_> = periods.before_mut(key(end)).map(|(k, _)| k).collect();
                    let expected: Vec<_> = model.range(..key(end)).map(|(k, _)| *k).collect();
                    proptest::prop_assert_eq!(before, expected);
                }
            }
        }

        /// Each operation type is counted once, with its tokens and events, and read back in
        /// the types' order, however many types a period sees.
        #[test]
        fn operation_totals_count_as_a_sorted_map(
            events in proptest::collection::vec((0..6_usize, 1..1_000_u64), 0..40),
        ) {
            const TYPES: [&str; 6] = ["embedding", "chat", "api_call", "zeta", "alpha", "chat-large"];
            let (mut totals, mut model) = (OperationTotals::default(), BTreeMap::new());
            for (operation, tokens) in events {
                totals.add(&OperationType::new(TYPES[operation]).expect("valid"), tokens);
                let (sum, count) = model.entry(TYPES[operation]).or_insert((0, 0));
                (*sum, *count) = (*sum + tokens, *count + 1);
            }
            let read: Vec<_> = totals
                .sorted()
                .into_iter()
                .map(|(op, tokens, events)| (op.as_str(), (*tokens, *events)))
                .collect();
            proptest::prop_assert_eq!(read, model.into_iter().collect::<Vec<_>>());
        }
    }

    /// A kept event's place in the audit trail is what the memory figures count: a few words,
    /// not an entry.
    #[test]
    fn an_events_place_in_the_trail_is_small() {
        assert!(
            std::mem::size_of::<TrailItem>() <= 32,
            "{}",
            std::mem::size_of::<TrailItem>()
        );
        assert!(std::mem::size_of::<TrailItem>() < std::mem::size_of::<AuditEntry>() / 2);
    }
}
