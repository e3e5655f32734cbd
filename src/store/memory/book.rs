//! A user's book in [`InMemoryUsageStore`]: the account, the events kept for dedupe, the periods
//! (each with its summary, consumptions, totals by operation type and charges), the audit
//! trail and the gateway events applied; recording an event into it, replaying a recorded one,
//! and inserting charges with the summary figures they move.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashSet};

use super::alerts::KeptAlert;
use super::models::ModelTotals;
use super::retention::takes_usage_until;
use super::{EventRetention, InMemoryUsageStore};
use crate::domain::{
    BillableTotal, Blocks, Charge, ChargeKey, ChargeKind, ChargeStatus, EventId, Money, MoneyError, NewCharge,
    OperationType, PeriodKey, UsageRecord, UserId, charges_for_growth,
};
use crate::store::id_map::IdMap;
use crate::store::{
    Account, AuditEntry, AuditEvent, Hold, OperationUsage, PeriodSummary, Placement, Recorded, StoreError,
};

const STORE: &str = "in-memory store";

#[derive(Debug, Default)]
pub(super) struct UserBook {
    pub(super) account: Option<Account>,
    pub(super) events: IdMap<EventId, EventEntry>,
    /// The host's ids of events forgotten with their period (bounded retention), with that
    /// period: a re-send of one is refused, never recorded again.
    pub(super) forgotten: IdMap<EventId, PeriodKey>,
    pub(super) periods: Periods,
    pub(super) charge_index: HashMap<ChargeKey, (PeriodKey, usize)>,
    pub(super) audit: Vec<TrailItem>,
    pub(super) gateway_events: HashSet<String>,
    /// Holds for calls in flight, of any period, oldest first; expired ones are dropped when
    /// the next hold is granted.
    pub(super) holds: Vec<Hold>,
    /// Threshold alerts, oldest first.
    pub(super) alerts: Vec<KeptAlert>,
}

/// A place in a user's audit trail: an entry; or a recorded event or a created charge, whose
/// entries are read from the event or charge kept in its period (which holds everything they
/// say) rather than kept twice.
#[derive(Debug)]
pub(super) enum TrailItem {
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
pub(super) struct EventEntry {
    pub(super) period: PeriodKey,
    pub(super) index: usize,
    pub(super) total_before: u64,
    /// Whether the event's fraction of a token made the period's total round up one more token
    /// ([`BillableTotal::plus`]): with the event's billable tokens, it gives the total after it.
    pub(super) rounded_up: bool,
    pub(super) created_fee: bool,
    pub(super) blocks: Blocks,
}

#[derive(Debug)]
pub(super) struct PeriodBook {
    pub(super) summary: PeriodSummary,
    pub(super) consumptions: Vec<Arc<UsageRecord>>,
    pub(super) by_operation: OperationTotals,
    pub(super) by_model: ModelTotals,
    pub(super) charges: Vec<Charge>,
    /// When the period stops taking late usage, by the plan that rates it: set by its first
    /// kept event (a period opened by a charge alone has no events to forget).
    pub(super) takes_usage_until: Option<DateTime<Utc>>,
}

impl PeriodBook {
    pub(super) fn new(summary: PeriodSummary) -> PeriodBook {
        PeriodBook {
            summary,
            consumptions: Vec::new(),
            by_operation: OperationTotals::default(),
            by_model: ModelTotals::default(),
            charges: Vec::new(),
            takes_usage_until: None,
        }
    }
}

impl PeriodBook {
    /// Tokens and events by operation type, ordered by type.
    pub(super) fn usage_by_operation(&self) -> Vec<OperationUsage> {
        self.by_operation
            .sorted()
            .into_iter()
            .map(|(op, tokens, count)| OperationUsage {
                operation_type: op.clone(),
                total_tokens: *tokens,
                operations: *count,
            })
            .collect()
    }
}

/// A user's periods, oldest first, in one allocation.
///
/// A user has a period a month, and events go almost always to the latest, which is looked at
/// first. Its book sits next to its key, where a map's node keeps the key, the node's length and
/// the book on separate cache lines: each a likely miss on every event once a host has
/// thousands of users.
#[derive(Debug, Default)]
pub(super) struct Periods(pub(super) Vec<(PeriodKey, PeriodBook)>);

impl Periods {
    /// Where `key` is, or where it would go.
    pub(super) fn find(&self, key: PeriodKey) -> Result<usize, usize> {
        match self.0.last() {
            Some((last, _)) if *last == key => Ok(self.0.len() - 1),
            Some((last, _)) if *last < key => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&key, |(k, _)| *k),
        }
    }

    pub(super) fn get(&self, key: &PeriodKey) -> Option<&PeriodBook> {
        let index = self.find(*key).ok()?;
        self.0.get(index).map(|(_, book)| book)
    }

    pub(super) fn get_mut(&mut self, key: &PeriodKey) -> Option<&mut PeriodBook> {
        let index = self.find(*key).ok()?;
        self.0.get_mut(index).map(|(_, book)| book)
    }

    pub(super) fn contains_key(&self, key: &PeriodKey) -> bool {
        self.find(*key).is_ok()
    }

    /// The book of `key`, made by `make` if the period has none.
    pub(super) fn get_or_insert_with(&mut self, key: PeriodKey, make: impl FnOnce() -> PeriodBook) -> &mut PeriodBook {
        let index = self.find(key).unwrap_or_else(|at| {
            // One more each time: a user gains a period a month, and most users have few.
            self.0.reserve_exact(1);
            self.0.insert(at, (key, make()));
            at
        });
        &mut self.0[index].1
    }

    pub(super) fn remove(&mut self, key: &PeriodKey) -> Option<PeriodBook> {
        let index = self.find(*key).ok()?;
        Some(self.0.remove(index).1)
    }

    /// The periods before `end`, oldest first.
    pub(super) fn before_mut(&mut self, end: PeriodKey) -> impl Iterator<Item = (PeriodKey, &mut PeriodBook)> {
        let end = self.find(end).unwrap_or_else(|at| at);
        self.0[..end].iter_mut().map(|(key, book)| (*key, book))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &PeriodBook> {
        self.0.iter().map(|(_, book)| book)
    }
}

/// A period's tokens and events by operation type.
///
/// A host reports few operation types (`chat`, `embedding`), and the first two are counted in
/// the period's own memory, next to its summary, rather than behind a pointer; more go to a
/// list of their own.
#[derive(Debug, Default)]
pub(super) struct OperationTotals {
    first: [Option<(OperationType, u64, u64)>; 2],
    more: Vec<(OperationType, u64, u64)>,
}

impl OperationTotals {
    /// Counts an event of `tokens` of `operation`.
    pub(super) fn add(&mut self, operation: &OperationType, tokens: u64) {
        let mut counted = self.first.iter_mut().flatten().chain(self.more.iter_mut());
        if let Some((_, total, events)) = counted.find(|(op, ..)| op == operation) {
            (*total, *events) = (*total + tokens, *events + 1);
        } else if let Some(free) = self.first.iter_mut().find(|slot| slot.is_none()) {
            *free = Some((operation.clone(), tokens, 1));
        } else {
            self.more.push((operation.clone(), tokens, 1));
        }
    }

    /// The tokens of every operation type together.
    pub(super) fn total_tokens(&self) -> u64 {
        let all = self.first.iter().flatten().chain(&self.more);
        all.fold(0u64, |sum, (_, tokens, _)| sum.saturating_add(*tokens))
    }

    /// Each operation type's tokens and events, in the types' order.
    pub(super) fn sorted(&self) -> Vec<&(OperationType, u64, u64)> {
        let mut all: Vec<_> = self.first.iter().flatten().chain(&self.more).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl InMemoryUsageStore {
    /// Records an event in its user's book, in a shard locked by the caller, under
    /// `placement`. The charges it creates are then indexed in the shard by the caller
    /// ([`Shard::index_recorded`](super::shards::Shard::index_recorded)).
    pub(super) fn record_in(
        &self,
        book: &mut UserBook,
        usage: UsageRecord,
        placement: Placement<'_>,
    ) -> Result<Recorded, StoreError> {
        let Placement {
            plan,
            fee,
            lease_until,
            alerting,
        } = placement;
        let user = &usage.user_id;

        let keep = match self.retention {
            EventRetention::All => true,
            EventRetention::Resendable => usage.has_host_event_id(),
        };
        // An event that would not be kept has no original to find: its id is a fresh
        // consumption id, and no such event was kept before it.
        if keep {
            if let Some(original) = book.replay(user, &usage.event_id)? {
                let answer = original.answer_resend(&usage)?;
                if !book.holds.is_empty() {
                    book.free_hold(answer.usage.period, &usage.event_id);
                }
                return Ok(answer);
            }
            if let Some(period) = book.forgotten.get(&usage.event_id) {
                return Err(StoreError::EventForgotten {
                    event_id: usage.event_id.clone(),
                    period: *period,
                });
            }
        }

        let period = usage.period;
        let total = book
            .periods
            .get(&period)
            .map_or_else(BillableTotal::default, |p| p.summary.billable_total());
        let before = total.tokens;
        let moved = total.plus(usage.billable()).ok_or(StoreError::TotalOverflow {
            total: before,
            tokens: usage.tokens,
        })?;
        let after = moved.tokens;
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
        period_book.summary.billable_credit_micros = moved.credit_micros;
        period_book.summary.events += 1;
        period_book.summary.updated_at = now;
        period_book.by_operation.add(&usage.operation_type, usage.tokens);
        period_book.by_model.add(&usage);
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
                    rounded_up: rounded_up(before, after, &usage),
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
        if !book.holds.is_empty() {
            book.free_hold(period, &usage.event_id);
        }
        if let Some(alerting) = &alerting {
            book.raise_crossed(&usage.user_id, period, plan, alerting, (before, after), now);
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

/// Whether an event that moved its period's total from `before` to `after` rounded it up one
/// more token than its whole billable tokens.
fn rounded_up(before: u64, after: u64, usage: &UsageRecord) -> bool {
    u128::from(after - before) > usage.billable().whole_tokens()
}

/// The total after a recorded event, from the total before it and whether it rounded up.
fn total_after(before: u64, rounded_up: bool, usage: &UsageRecord) -> u64 {
    // The event was recorded, so its whole tokens fit between the two totals.
    let whole = u64::try_from(usage.billable().whole_tokens()).unwrap_or(u64::MAX);
    before.saturating_add(whole).saturating_add(u64::from(rounded_up))
}

pub(super) fn money_error(source: MoneyError) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: Box::new(source),
    }
}

/// Moves the summary's figures for a charge entering `to` (from `from`, or newly created).
pub(super) fn apply_to_summary(
    summary: &mut PeriodSummary,
    kind: ChargeKind,
    amount: Money,
    from: Option<ChargeStatus>,
    to: ChargeStatus,
) -> Result<(), MoneyError> {
    summary.apply_charge(kind, amount, from, to)
}

impl UserBook {
    /// Saves the user's account, with its audit entry.
    pub(super) fn save_account(&mut self, account: Account) {
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
    pub(super) fn replay(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
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
            total_after: total_after(entry.total_before, entry.rounded_up, original),
            charges: keys.filter_map(|k| self.charge(&k).cloned()).collect(),
            replayed: true,
        }))
    }

    pub(super) fn charge_mut(&mut self, key: &ChargeKey) -> Option<&mut Charge> {
        let (period, index) = *self.charge_index.get(key)?;
        self.periods.get_mut(&period)?.charges.get_mut(index)
    }

    pub(super) fn charge(&self, key: &ChargeKey) -> Option<&Charge> {
        let (period, index) = self.charge_index.get(key)?;
        self.periods.get(period)?.charges.get(*index)
    }

    /// Inserts charges that do not exist yet, in order; returns those created.
    pub(super) fn insert_charges(
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

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
