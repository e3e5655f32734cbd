//! Group commit in [`PostgresUsageStore`] (on unless `with_group_commit(false)`): the single
//! events that callers of one process record at the same time are gathered into rounds, each
//! recorded as one batch (one statement, one commit), and each caller is answered its own
//! event's outcome.
//!
//! A caller that finds no round running starts one with whatever is waiting, itself included;
//! callers arriving while a round runs wait for the next, which starts the moment a round ends,
//! or beside it once [`SECOND_ROUND_AT`] events wait: no delay is added, and a caller alone is
//! recorded by the one-statement way of a single event (a round of one). Rounds run on tasks of
//! their own, so a caller that stops waiting (a client gone, a timeout) never stops a round
//! that others wait on. A task keeps one pooled connection from round to round, and the only
//! task stays [`LINGER`] for the next event before it ends: a steady caller, alone or not, is
//! recorded without a pool hand-out (and its test round trip) per round. A task holds at most
//! that one connection: it gives it back before a round takes one of the pool's, when the pool
//! has none to spare, and after [`KEEP_AT_MOST`].
//!
//! A round is recorded by `decide_batch`, whose statement checks the accounts the events were
//! placed with as a single record's does: when one moved, nothing is written, the events placed
//! with a stale account are refused (`AccountChanged`, each on its own) and the others recorded
//! again. An event refused on its own merits refuses only itself. When the round's write fails
//! (or its commit's answer is lost) nothing of it is taken as done: each of its events is
//! recorded again on its own, concurrently, where a committed one is answered as this call's
//! record, so no event is lost or recorded twice.

use std::sync::Mutex;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::sync::oneshot;

use super::PostgresUsageStore;
use super::connection::Lent;
use super::record::RecordFailure;
use super::record_batch::{Decision, batch_error};
use crate::domain::{AlertPolicy, Ceiling, FeeCollection, Plan, UsageRecord};
use crate::store::{Account, Alerting, RecordUsage, Recorded, StoreError};

/// The metric of the rounds' sizes (the README's table).
const ROUND_SIZE: &str = "token_billing_group_commit_round_events";

/// The most events a round takes; more wait for the next.
const MAX_ROUND: usize = 1_000;

/// Rounds that may run at once: two, so that one is written while the other is prepared and
/// answered, the next forming meanwhile. Three at once were slower (`benches/postgres.rs`).
const MAX_ROUNDS_RUNNING: usize = 2;

/// The events that must be waiting for a round to start beside one that runs: a round's
/// statement costs PostgreSQL about as much as a handful of its events, so a second round of
/// fewer makes both slower than one round of them all. Measured with 16 callers, 8 was faster
/// than 4, 6 and 12 (`benches/postgres.rs`).
const SECOND_ROUND_AT: usize = 8;

/// The events of a failed round recorded again at once, each on its own.
const FALLBACK_TASKS: usize = 8;

/// How long a round task with no event waiting stays for the next, keeping its connection: a
/// caller recording one event after another is then recorded on that connection by the task
/// it wakes, instead of by a new task on a connection the pool hands out and tests with a round
/// trip. No caller waits for it; the pool has the connection back at most this long after the
/// last round.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a round task keeps one connection before it gives it back to the pool (and takes
/// another for its next round), so that the pool's limits on a connection's life still apply.
const KEEP_AT_MOST: std::time::Duration = std::time::Duration::from_secs(1);

/// The group commit of one store (shared by its clones).
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    state: Mutex<State>,
    /// Wakes the task that stays for the next event (`State::lingering`).
    wake: tokio::sync::Notify,
    /// Rounds to fail on purpose, for the tests of what a failed round does.
    #[cfg(feature = "testing")]
    faults: std::sync::atomic::AtomicUsize,
    /// Whether the next round never ends, for the test of a round task stopped midway.
    #[cfg(feature = "testing")]
    hang: std::sync::atomic::AtomicBool,
    /// Whether the next round waits for `release` before it writes, for the tests that line
    /// events up in a round.
    #[cfg(feature = "testing")]
    held: std::sync::atomic::AtomicBool,
    #[cfg(feature = "testing")]
    release: tokio::sync::Notify,
    /// The rounds of several events run, for the tests that need one.
    #[cfg(feature = "testing")]
    several: std::sync::atomic::AtomicU64,
    /// The rounds whose write failed, their events recorded again one by one.
    #[cfg(feature = "testing")]
    failed: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<Waiting>,
    /// Round tasks, one staying for the next event ([`LINGER`]) included.
    running: usize,
    /// Whether the only round task stays for the next event, to be woken by it.
    lingering: bool,
}

/// An event waiting for its round, with what recording it needs, owned, and where its answer
/// goes.
#[derive(Debug)]
struct Waiting {
    usage: UsageRecord,
    placed: Placed,
    answer: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// What a [`RecordUsage`] borrows, owned, so that the event can wait on another task.
#[derive(Debug)]
struct Placed {
    plan: Plan,
    fee: FeeCollection,
    lease_until: Option<DateTime<Utc>>,
    alerting: Option<(AlertPolicy, Ceiling)>,
    account: Option<Account>,
}

impl Placed {
    fn of(request: &RecordUsage<'_>) -> Placed {
        Placed {
            plan: request.plan.clone(),
            fee: request.fee,
            lease_until: request.lease_until,
            alerting: request.alerting.map(|a| (a.policy.clone(), a.ceiling)),
            account: request.account.cloned(),
        }
    }

    fn request(&self, usage: UsageRecord) -> RecordUsage<'_> {
        RecordUsage {
            usage,
            plan: &self.plan,
            fee: self.fee,
            lease_until: self.lease_until,
            alerting: self.alerting.as_ref().map(|(policy, ceiling)| Alerting {
                policy,
                ceiling: *ceiling,
            }),
            account: self.account.as_ref(),
        }
    }
}

impl PostgresUsageStore {
    /// [`UsageStore::record_usage`](crate::UsageStore::record_usage) through the group commit.
    pub(super) async fn record_in_round(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        let (answer, answered) = oneshot::channel();
        let waiting = Waiting {
            placed: Placed::of(&request),
            usage: request.usage,
            answer,
        };
        let (round, wake) = {
            let mut state = lock(&self.group.state);
            state.waiting.push(waiting);
            if state.running == 0 || (state.running < MAX_ROUNDS_RUNNING && state.waiting.len() >= SECOND_ROUND_AT) {
                state.running += 1;
                (Some(take_round(&mut state)), false)
            } else {
                (None, state.lingering)
            }
        };
        if wake {
            self.group.wake.notify_one();
        }
        if let Some(round) = round {
            // Made before the task, so that a task dropped before it first runs gives the claim
            // back too.
            let running = Running {
                group: std::sync::Arc::clone(&self.group),
                done: false,
            };
            let store = self.clone();
            tokio::spawn(async move { store.run_rounds(round, running).await });
        }
        answered.await.map_err(|_| StoreError::Unavailable {
            store: "PostgreSQL store",
            source: "the task recording the event's round stopped before it answered".into(),
        })?
    }

    /// Runs `round`, then the rounds that formed meanwhile, until none waits or comes within
    /// [`LINGER`].
    async fn run_rounds(self, mut round: Vec<Waiting>, mut running: Running) {
        // Should this task stop midway (its runtime shutting down, a panic), `running` gives
        // the claim back: the next caller starts a round, and those waiting do not wait for ever.
        // Its rounds run on one pooled connection, given back when it ends.
        let mut connection: Lent = None;
        let mut kept_since = None;
        loop {
            #[allow(clippy::cast_precision_loss, reason = "a count of events, at most MAX_ROUND")]
            metrics::histogram!(ROUND_SIZE).record(round.len() as f64);
            #[cfg(feature = "testing")]
            if self.group.hang.swap(false, std::sync::atomic::Ordering::AcqRel) {
                std::future::pending::<()>().await;
            }
            #[cfg(feature = "testing")]
            if self.group.held.swap(false, std::sync::atomic::Ordering::AcqRel) {
                self.group.release.notified().await;
            }
            self.run_round(round, &mut connection).await;
            self.give_back_if_needed(&mut connection, &mut kept_since);
            // The callers just answered are ready to run: letting them (one turn of the
            // scheduler, no delay) puts those that record again at once in the next round.
            tokio::task::yield_now().await;
            match self.next_round(&mut running).await {
                Some(next) => round = next,
                None => return,
            }
        }
    }

    /// Gives the task's connection back to the pool when another may need it (the pool has
    /// none idle and may open no more) or once it was kept [`KEEP_AT_MOST`]; `since` is when
    /// the task took it.
    fn give_back_if_needed(&self, connection: &mut Lent, since: &mut Option<std::time::Instant>) {
        if connection.is_none() {
            *since = None;
            return;
        }
        let taken = *since.get_or_insert_with(std::time::Instant::now);
        let full = self.pool.num_idle() == 0 && self.pool.size() >= self.pool.options().get_max_connections();
        if full || taken.elapsed() >= KEEP_AT_MOST {
            *connection = None;
            *since = None;
        }
    }

    /// The round after one that ended: the events waiting, else the first to arrive within
    /// [`LINGER`] when this is the only round task. `None` when this task ends: nothing came,
    /// or the few waiting are left to the other round running.
    async fn next_round(&self, running: &mut Running) -> Option<Vec<Waiting>> {
        let deadline = tokio::time::Instant::now() + LINGER;
        // Whether this task set `State::lingering`: only it clears the flag.
        let mut lingering = false;
        loop {
            {
                let mut state = lock(&self.group.state);
                if std::mem::take(&mut lingering) {
                    state.lingering = false;
                }
                let alone = state.running == 1;
                let leave = if state.waiting.is_empty() {
                    !alone || tokio::time::Instant::now() >= deadline
                } else {
                    !alone && state.waiting.len() < SECOND_ROUND_AT
                };
                if leave {
                    state.running -= 1;
                    running.done = true;
                    return None;
                }
                if !state.waiting.is_empty() {
                    return Some(take_round(&mut state));
                }
                state.lingering = true;
                lingering = true;
            }
            // Woken by the next event (a wake sent before this waits is kept), or at the deadline.
            let _ = tokio::time::timeout_at(deadline, self.group.wake.notified()).await;
        }
    }

    /// Records one round on `connection` (see `decide_batch`) and answers each of its callers.
    async fn run_round(&self, round: Vec<Waiting>, connection: &mut Lent) {
        if round.len() == 1 {
            // The one-statement way of a single event, on the task's connection.
            let Waiting { usage, placed, answer } = round.into_iter().next().expect("one event");
            let kept = connection.as_ref().map(|_| usage.clone());
            let mut result = self.record_event_on(placed.request(usage), connection).await;
            if let (Some(usage), Err(StoreError::Unavailable { .. })) = (kept, &result)
                && !answer.is_closed()
            {
                // The connection kept since the last round may have broken meanwhile (the
                // server restarted, the network failed): once more, on one of the pool's.
                result = self.record_again(&placed, usage).await;
            }
            let _ = answer.send(result);
            return;
        }
        #[cfg(feature = "testing")]
        self.group.several.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (placed, rest): (Vec<Placed>, Vec<(UsageRecord, oneshot::Sender<_>)>) =
            round.into_iter().map(|w| (w.placed, (w.usage, w.answer))).unzip();
        let (usages, answers): (Vec<UsageRecord>, Vec<_>) = rest.into_iter().unzip();
        // Kept to record each event again on its own, should the round fail.
        let copies = usages.clone();
        match self.record_round(&placed, usages, connection).await {
            Ok(results) => {
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
            Err(error) => {
                // It may be broken (the server restarted, the network failed): the next round
                // takes another from the pool, which tests it.
                *connection = None;
                tracing::warn!(error = %error, events = copies.len(), "a round failed: recording its events one by one");
                #[cfg(feature = "testing")]
                self.group.failed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                // Each on its own task, as concurrent callers would be, so that the events of
                // different users do not wait for one another; at most FALLBACK_TASKS at once,
                // so that they do not queue for the pool's connections past its timeout.
                let mut tasks = tokio::task::JoinSet::new();
                for ((usage, placed), answer) in copies.into_iter().zip(placed).zip(answers) {
                    if tasks.len() >= FALLBACK_TASKS
                        && let Some(Err(error)) = tasks.join_next().await
                    {
                        tracing::error!(error = %error, "recording an event of a failed round stopped");
                    }
                    // Checked once a task is free: a caller that stopped waiting meanwhile has
                    // its event left unrecorded, as a single record dropped before its statement.
                    if answer.is_closed() {
                        continue;
                    }
                    let store = self.clone();
                    tasks.spawn(async move {
                        let _ = answer.send(store.record_again(&placed, usage).await);
                    });
                }
                while let Some(joined) = tasks.join_next().await {
                    if let Err(error) = joined {
                        tracing::error!(error = %error, "recording an event of a failed round stopped");
                    }
                }
            }
        }
    }

    /// Records on its own, on a connection of the pool, an event whose round failed: found
    /// recorded with this very call's consumption, the round committed it before it failed, and
    /// it is this call's record, not a re-send.
    async fn record_again(&self, placed: &Placed, usage: UsageRecord) -> Result<Recorded, StoreError> {
        let consumption = usage.consumption_id;
        self.record_event(placed.request(usage)).await.map(|mut recorded| {
            if recorded.usage.consumption_id == consumption {
                recorded.replayed = false;
            }
            recorded
        })
    }

    /// The answers of one round of several events: those whose account moved since they were
    /// placed are refused, the others recorded in one batch. `Err` when the round's write
    /// failed: nothing of it may be taken as done.
    async fn record_round(
        &self,
        placed: &[Placed],
        usages: Vec<UsageRecord>,
        connection: &mut Lent,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        #[cfg(feature = "testing")]
        let fault = self.group.take_fault();
        #[cfg(feature = "testing")]
        if fault == Some(Fault::Before) {
            return Err(StoreError::Unavailable {
                store: "PostgreSQL store",
                source: "a round failed on purpose before its transaction".into(),
            });
        }
        let mut positions: Vec<usize> = (0..usages.len()).collect();
        let mut requests: Vec<RecordUsage<'_>> = usages.into_iter().zip(placed).map(|(u, p)| p.request(u)).collect();
        let mut refused = Vec::new();
        let mut checks = 0;
        let decisions = loop {
            match self.decide_batch(&requests, connection).await {
                Ok(decisions) => break decisions,
                // The batch's statement found an account moved, and wrote nothing: the events
                // placed with a stale account are refused (as a single record refuses its own),
                // the others recorded again.
                Err(RecordFailure::AccountChanged) if checks < 3 => {
                    checks += 1;
                    // Given back before the pool's is taken: a task never holds two, so that
                    // rounds never wait on one another for the pool's connections.
                    *connection = None;
                    let users: Vec<_> = requests.iter().map(|r| r.usage.user_id.clone()).collect();
                    let stored = self.read_accounts(&users).await?;
                    let (mut kept_positions, mut kept) = (Vec::new(), Vec::new());
                    for ((position, request), stored) in positions.into_iter().zip(requests).zip(stored) {
                        match request.account {
                            Some(account) if !same_account(account, stored.as_ref()) => {
                                self.accounts.forget(&request.usage.user_id);
                                let usage = Box::new(request.usage);
                                refused.push((position, StoreError::AccountChanged { usage }));
                            }
                            _ => {
                                kept_positions.push(position);
                                kept.push(request);
                            }
                        }
                    }
                    (positions, requests) = (kept_positions, kept);
                }
                Err(failure) => return Err(batch_error(failure)),
            }
        };
        // Answering a re-send reads its original from the pool: given back first, as above.
        if decisions
            .iter()
            .any(|d| matches!(d, Decision::Existing | Decision::Written))
        {
            *connection = None;
        }
        let recorded = self.batch_answers(requests, decisions).await;
        #[cfg(feature = "testing")]
        if fault == Some(Fault::AfterCommit) {
            return Err(StoreError::Unavailable {
                store: "PostgreSQL store",
                source: "a round's commit answer was lost on purpose".into(),
            });
        }
        let mut results: Vec<Option<Result<Recorded, StoreError>>> = (0..placed.len()).map(|_| None).collect();
        for (position, result) in positions.into_iter().zip(recorded) {
            results[position] = Some(result);
        }
        for (position, error) in refused {
            results[position] = Some(Err(error));
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(StoreError::Generic {
                        store: "PostgreSQL store",
                        source: "a round answered fewer events than it took".into(),
                    })
                })
            })
            .collect())
    }
}

/// Whether the stored account is the one an event was placed with, by what a single record
/// compares (`account_unchanged`): customer, plan, earlier plans, subscription, last change.
fn same_account(placed: &Account, stored: Option<&Account>) -> bool {
    stored.is_some_and(|stored| {
        stored.customer_id == placed.customer_id
            && stored.plan_id == placed.plan_id
            && stored.earlier_plans == placed.earlier_plans
            && stored.subscription_id == placed.subscription_id
            // As PostgreSQL keeps it, to the microsecond.
            && stored.updated_at.trunc_subsecs(6) == placed.updated_at.trunc_subsecs(6)
    })
}

/// A round task's claim on the group: given back if the task stops before it ends its loop,
/// the events waiting then answered [`StoreError::Unavailable`] (their senders dropped), so
/// that they are sent again.
struct Running {
    group: std::sync::Arc<GroupCommit>,
    done: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.done {
            let mut state = lock(&self.group.state);
            state.running -= 1;
            // A task stopped while it stayed for the next event: none stays now.
            if state.running == 0 {
                state.lingering = false;
            }
            state.waiting.clear();
        }
    }
}

/// The next round: up to [`MAX_ROUND`] of the events waiting, oldest first. An event whose
/// caller stopped waiting (a client gone, a timeout) is dropped unrecorded, as a single record
/// dropped before its statement records nothing.
fn take_round(state: &mut State) -> Vec<Waiting> {
    state.waiting.retain(|waiting| !waiting.answer.is_closed());
    if state.waiting.len() <= MAX_ROUND {
        std::mem::take(&mut state.waiting)
    } else {
        state.waiting.drain(..MAX_ROUND).collect()
    }
}

/// The state's lock; held for a push or a take, never across an `.await`.
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A failure a test makes a round meet.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The round fails before it writes anything.
    Before,
    /// The round's transaction commits, and its answer is lost.
    AfterCommit,
}

#[cfg(feature = "testing")]
impl GroupCommit {
    /// The fault the next round of several events meets, taken once.
    fn take_fault(&self) -> Option<Fault> {
        match self.faults.swap(0, std::sync::atomic::Ordering::AcqRel) {
            0 => None,
            1 => Some(Fault::Before),
            _ => Some(Fault::AfterCommit),
        }
    }
}

#[cfg(feature = "testing")]
impl PostgresUsageStore {
    /// Makes the next round of several events fail (feature `testing`): before it writes
    /// anything, or (`after_commit`) once its transaction committed, as when the commit's
    /// answer is lost. Every caller of that round must still be answered its event's outcome,
    /// each event recorded once.
    pub fn fail_next_round(&self, after_commit: bool) {
        self.group
            .faults
            .store(if after_commit { 2 } else { 1 }, std::sync::atomic::Ordering::Release);
    }

    /// Makes the next round never end (feature `testing`), as a round whose task stops
    /// midway: its runtime shuts down, or it panics.
    pub fn hang_next_round(&self) {
        self.group.hang.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the hang [`hang_next_round`](Self::hang_next_round) asked for is still to come
    /// (feature `testing`).
    pub fn round_hang_pending(&self) -> bool {
        self.group.hang.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes the next round wait, before it writes, until
    /// [`release_held_round`](Self::release_held_round) (feature `testing`): the events sent
    /// meanwhile wait for the round after it, in the order they arrive
    /// ([`waiting_events`](Self::waiting_events) counts them).
    pub fn hold_next_round(&self) {
        self.group.held.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the hold [`hold_next_round`](Self::hold_next_round) asked for is still to come
    /// (feature `testing`): no round has started since.
    pub fn round_hold_pending(&self) -> bool {
        self.group.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lets the held round write (feature `testing`).
    pub fn release_held_round(&self) {
        self.group.release.notify_one();
    }

    /// The events waiting for a round (feature `testing`).
    pub fn waiting_events(&self) -> usize {
        lock(&self.group.state).waiting.len()
    }

    /// How many rounds of several events this store has run (feature `testing`): a test that
    /// sends events at once reads it to know they met in a round.
    pub fn rounds_of_several_events(&self) -> u64 {
        self.group.several.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many rounds of several events failed, their events then recorded one by one
    /// (feature `testing`).
    pub fn failed_rounds(&self) -> u64 {
        self.group.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the failure [`fail_next_round`](Self::fail_next_round) asked for is still to
    /// come (feature `testing`): no round of several events has run since.
    pub fn round_failure_pending(&self) -> bool {
        self.group.faults.load(std::sync::atomic::Ordering::Acquire) != 0
    }
}
