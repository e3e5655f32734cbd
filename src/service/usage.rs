//! Recording usage: one report (`process_token_usage`), a batch (`process_token_usage_batch`),
//! and how an event is read, checked and placed in its period before the store records it.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::domain::{
    BillableTokens, Charge, ChargeKind, ClientId, EventId, Limits, ModelName, OperationType, PeriodKey, Plan,
    TokenDetail, UsageRecord, UserId, check_metadata,
};
use crate::error::{BillingError, UsageError};
use crate::store::{Account, Alerting, HoldDecision, PlacedUsage, Placement, RecordUsage, Recorded, StoreError};

use super::report::{TierCharge, UsageOutcome, UsageReport};
use super::{BillingService, CollectionMode, UnregisteredUsers, metrics, store_contract};

/// What the service decided for an event before recording it.
pub(super) enum Placed<'p> {
    /// Record it so: under this plan, its charges leased to the caller (to collect them at
    /// once) when the placement says until when.
    Record(Placement<'p>),
    /// Refused (unless it is a re-send).
    Refused(UsageError),
}

impl BillingService {
    /// Reads a report into the record to store, refusing malformed content: bad identifiers,
    /// zero tokens, metadata beyond Stripe's limits. Checks no store, no limit and no plan, so
    /// a bad report is refused even when the store is down.
    fn read_report(report: UsageReport, now: DateTime<Utc>) -> Result<UsageRecord, UsageError> {
        let user_id = UserId::new(report.user_id)?;
        let operation_type = OperationType::new(report.operation_type)?;
        let client_id = report.client_id.map(ClientId::new).transpose()?;
        let model = report.model.map(ModelName::new).transpose()?;
        let tokens = match &report.token_counts {
            None => report.tokens_used,
            Some(counts) => {
                let classes = counts.total().ok_or(UsageError::TooManyTokens {
                    tokens: u64::MAX,
                    max: crate::MAX_TOKENS,
                })?;
                if report.tokens_used != 0 && report.tokens_used != classes {
                    return Err(UsageError::TokensMismatch {
                        tokens_used: report.tokens_used,
                        classes,
                    });
                }
                classes
            }
        };
        if tokens == 0 {
            return Err(UsageError::ZeroTokens);
        }
        // Weighed by the period's rate card once the event is placed (`place`).
        let detail = (model.is_some() || report.token_counts.is_some()).then(|| {
            Box::new(TokenDetail {
                model,
                counts: report.token_counts,
                billable: BillableTokens::whole(tokens),
            })
        });
        check_metadata(&report.metadata)?;
        let consumption_id = crate::random::uuid_v4();
        let event_id = match report.event_id {
            Some(id) => EventId::new(id)?,
            None => EventId::of_consumption(consumption_id),
        };
        // Instants are kept to the microsecond, as SQL timestamps are, so a re-sent event compares
        // equal to its stored original in every store.
        let now = now.trunc_subsecs(6);
        let occurred_at = report.occurred_at.map_or(now, |at| at.trunc_subsecs(6));
        Ok(UsageRecord {
            consumption_id,
            event_id,
            user_id,
            // Set from the plan's zone by `place_in_period`.
            period: PeriodKey::UNPLACED,
            tokens,
            operation_type,
            client_id,
            metadata: report.metadata,
            occurred_at,
            occurred_at_reported: report.occurred_at.is_some(),
            recorded_at: now,
            detail,
        })
    }

    /// Checks the service's limits: the tokens of one event, and how far in the future it may
    /// have happened.
    fn check_limits(&self, usage: &UsageRecord, now: DateTime<Utc>) -> Result<(), UsageError> {
        let max = self.settings.max_tokens_per_event;
        if usage.tokens > max {
            return Err(UsageError::TooManyTokens {
                tokens: usage.tokens,
                max,
            });
        }
        if usage.occurred_at <= now {
            return Ok(());
        }
        if usage.occurred_at > crate::clock::later(now, self.settings.max_future_skew) {
            return Err(UsageError::InFuture {
                occurred_at: usage.occurred_at,
                now,
            });
        }
        Ok(())
    }

    /// Puts a checked event in its period ([`period_at`](Self::period_at)), refusing it when the
    /// period has ended and the grace window of the plan that rates it has passed: the window is
    /// half-open, so an event arriving at exactly the period's end plus the grace is refused.
    fn place_in_period(
        &self,
        usage: &mut UsageRecord,
        account: Option<&Account>,
        now: DateTime<Utc>,
    ) -> Result<Result<(), UsageError>, BillingError> {
        let (period, plan) = self.period_at(account, usage.occurred_at)?;
        // While the period is open there is no grace window to work out.
        if now >= period.end() {
            let accepted_until = crate::clock::later(period.end(), plan.late_usage_grace());
            if now >= accepted_until {
                return Ok(Err(UsageError::TooLate {
                    period: period.key(),
                    accepted_until,
                }));
            }
        }
        usage.period = period.key();
        Ok(Ok(()))
    }

    /// Records a usage event and collects the charges it creates: the original product's
    /// `processTokenUsage`.
    ///
    /// The event counts in the period of its `occurred_at` in the plan's zone. Recording is one
    /// atomic store operation: the usage is never lost once this returns `Ok`, whatever the
    /// gateway does. Charges whose collection fails transiently stay pending for
    /// [`resume_pending`](Self::resume_pending); declined ones are retried by
    /// [`retry_failed`](Self::retry_failed).
    ///
    /// # Errors
    /// [`BillingError::InvalidUsage`] for a bad report; [`BillingError::EventConflict`] for an
    /// event id re-used with different usage; [`BillingError::TotalOverflow`];
    /// [`BillingError::AccountPlanMissing`] when the user's account names a plan the catalogue lacks; store errors. A
    /// refused report records nothing. After a store error the event may or may not have been
    /// recorded (the store's answer may be what was lost): send it again with the same event id,
    /// and it is recorded once either way.
    ///
    /// A re-sent event id is answered with the original outcome even when the event would now be
    /// refused (its grace window has passed, or the limits changed).
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingError, BillingService, UsageError, UsageReport};
    ///
    /// let billing = BillingService::embedded();
    /// let report = UsageReport::new("user-uuid", 9_000_000, "chat").event_id("req-1");
    /// let outcome = billing.process_token_usage(report.clone()).await?;
    /// assert_eq!((outcome.total_tokens, outcome.current_tier.as_str()), (9_000_000, "8M-16M"));
    ///
    /// // The same event again: the original outcome, nothing recorded twice.
    /// let again = billing.process_token_usage(report).await?;
    /// assert!(again.replayed && again.consumption_id == outcome.consumption_id);
    ///
    /// // Bad input is refused with a typed error.
    /// let error = billing.process_token_usage(UsageReport::new("user-uuid", 0, "chat")).await.unwrap_err();
    /// assert!(matches!(error, BillingError::InvalidUsage(UsageError::ZeroTokens)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn process_token_usage(&self, report: UsageReport) -> Result<UsageOutcome, BillingError> {
        let span = info_span!(
            "process_token_usage",
            user = %report.user_id.chars().take(UserId::MAX_LEN).collect::<String>(),
            period = tracing::field::Empty,
            consumption = tracing::field::Empty,
        );
        async {
            let result = self.record_report(report).await;
            metrics::event_answered(&result, |outcome| outcome.replayed);
            if let Err(error) = &result {
                if error.is_client_error() {
                    info!(error = %error, "usage refused");
                }
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn record_report(&self, report: UsageReport) -> Result<UsageOutcome, BillingError> {
        let now = self.clock.now();
        let enforce = report.enforce_limits;
        let usage = Self::read_report(report, now)?;
        if enforce {
            if let Some(refused) = Box::pin(self.enforce_limits(&usage, now)).await? {
                return refused;
            }
        }
        // The store places the event with the user's account and records it. Why an event was
        // not placed is kept here: refused on its merits (`Ok`), or not placeable at all (`Err`:
        // an account naming an unknown plan).
        let mut refusal: Option<Result<UsageError, BillingError>> = None;
        let mut placed_in = None;
        let mut limits = Limits::none();
        let mut place = |usage: &mut UsageRecord, account: Option<&Account>| {
            let (placement, why_not) = match self.place(usage, account, now) {
                Ok(Placed::Record(placement)) => {
                    limits = Self::limits_of(account, placement.plan);
                    (Some(placement), None)
                }
                Ok(Placed::Refused(error)) => (None, Some(Ok(error))),
                Err(error) => (None, Some(Err(error))),
            };
            refusal = why_not;
            placed_in = Some(usage.period);
            placement
        };
        // An enforced event's hold is given back when recording fails: its retry holds again.
        let held = enforce.then(|| (usage.user_id.clone(), usage.event_id.clone()));
        let started = std::time::Instant::now();
        let placed = self.store.place_and_record_usage(usage, &mut place).await;
        metrics::recorded_in("event", started.elapsed());
        let placed = match placed {
            Ok(placed) => placed,
            Err(error) => {
                if let (Some((user, event)), Some(period)) = (held, placed_in) {
                    if let Err(release) = self.store.release_hold(&user, period, &event).await {
                        warn!(error = %release, "the hold of an unrecorded event stays until it expires");
                    }
                }
                return Err(error.into());
            }
        };
        match placed {
            PlacedUsage::Recorded {
                recorded,
                placement,
                account,
            } => {
                let span = tracing::Span::current();
                span.record("period", tracing::field::display(recorded.usage.period));
                span.record("consumption", tracing::field::display(recorded.usage.consumption_id));
                let collect_now = placement.lease_until.is_some();
                let plan = if recorded.replayed && placed_in != Some(recorded.usage.period) {
                    // A re-send placed in another period than its original (sent again without
                    // `occurred_at` after the month turned) is answered with the tier of the
                    // original's period, whose plan may not be the one this placing used.
                    let account = self.store.account(&recorded.usage.user_id).await?;
                    self.period_plan(account.as_ref(), recorded.usage.period)?
                } else {
                    placement.plan
                };
                let (user, period) = (recorded.usage.user_id.clone(), recorded.usage.period);
                let mut outcome = self.finish(recorded, collect_now, account.as_deref(), plan).await?;
                if !limits.is_none() {
                    let limits = self.spend_limits(limits, period, plan, now)?;
                    outcome.limit_exceeded = self.limit_reached(&user, &limits, outcome.total_tokens, now).await?;
                }
                Ok(outcome)
            }
            PlacedUsage::Refused { usage, account } => {
                let error = match refusal {
                    Some(Ok(error)) => error,
                    Some(Err(error)) => return Err(error),
                    None => {
                        return Err(StoreError::Generic {
                            store: "store",
                            source: "the store refused an event its placing accepted".into(),
                        }
                        .into());
                    }
                };
                // A re-sent event is answered with its original outcome even when it would now
                // be refused: its window has passed, or the limits changed since it was
                // recorded. The look-up is boxed: refusals are rare, and the futures of other
                // events need not make room for it.
                match Box::pin(self.replay_of(&usage, account.as_deref())).await? {
                    Some(outcome) => Ok(outcome),
                    None => Err(error.into()),
                }
            }
        }
    }

    /// Holds an event's tokens under its id before it is recorded, when its report asks for
    /// the user's limits to be enforced: the hold decides atomically whether the limits allow
    /// it, and recording the event frees it. Answers the refusal (or, for a re-sent event, its
    /// original outcome) when a limit refuses; `None` to go on and record.
    async fn enforce_limits(
        &self,
        usage: &UsageRecord,
        now: DateTime<Utc>,
    ) -> Result<Option<Result<UsageOutcome, BillingError>>, BillingError> {
        let account = self.store.account(&usage.user_id).await?;
        let mut placed = usage.clone();
        let Placed::Record(placement) = self.place(&mut placed, account.as_ref(), now)? else {
            // Refused on its own merits: recording answers why.
            return Ok(None);
        };
        self.enforce_on(&placed, placement.plan, account.as_ref(), BillableTokens::ZERO, now)
            .await
    }

    /// Holds the event's billable tokens plus `ahead`, rounded up, under the event's id if the
    /// limits of its placed period allow them (`ahead`: the billable tokens of events recorded
    /// before it in the same store call).
    async fn enforce_on(
        &self,
        usage: &UsageRecord,
        plan: &Plan,
        account: Option<&Account>,
        ahead: BillableTokens,
        now: DateTime<Utc>,
    ) -> Result<Option<Result<UsageOutcome, BillingError>>, BillingError> {
        let limits = Self::limits_of(account, plan);
        if limits.is_none() {
            return Ok(None);
        }
        let limits = self.spend_limits(limits, usage.period, plan, now)?;
        let expires_at = crate::clock::later(now, self.settings.lease);
        let held = usage.billable().checked_add(ahead);
        let tokens = held.map_or(u64::MAX, BillableTokens::rounded_up);
        match self
            .hold_tokens(&usage.user_id, &usage.event_id, tokens, &limits, now, expires_at)
            .await?
        {
            HoldDecision::Granted { .. } | HoldDecision::Settled => Ok(None),
            HoldDecision::Refused { limit, state } => Ok(Some(match self.replay_of(usage, account).await? {
                Some(outcome) => Ok(outcome),
                None => Err(BillingError::LimitExceeded {
                    limit,
                    // What is left once the events ahead of it are recorded.
                    remaining_tokens: state
                        .headroom(&limits.ceiling, limits.plan)
                        .remaining
                        .saturating_sub(ahead.rounded_up()),
                }),
            })),
        }
    }

    /// Decides, for a read event, the plan that rates it and whether its charges are collected
    /// at once (leased to the caller); or why it is refused.
    fn place<'s>(
        &'s self,
        usage: &mut UsageRecord,
        account: Option<&Account>,
        now: DateTime<Utc>,
    ) -> Result<Placed<'s>, BillingError> {
        let refused = match self.check_limits(usage, now) {
            Ok(()) => self.place_in_period(usage, account, now)?,
            Err(error) => Err(error),
        };
        if let Err(error) = refused {
            return Ok(Placed::Refused(error));
        }
        let plan = self.period_plan(account, usage.period)?;
        if let Some(detail) = &mut usage.detail {
            detail.billable = match (detail.counts, plan.rate_card(usage.period)) {
                (Some(counts), Some(card)) => card.billable(detail.model.as_ref(), &counts),
                _ => BillableTokens::whole(usage.tokens),
            };
        }
        let collect_now = self.settings.collection == CollectionMode::Immediate
            && (account.is_some_and(|a| a.customer_id.is_some())
                || self.settings.unregistered == UnregisteredUsers::OpenCustomer);
        let alerting = (!self.settings.alerts.is_none()).then(|| Alerting {
            policy: &self.settings.alerts,
            // A cap that does not fit the plan (checked when limits are set) has no alerts.
            ceiling: Self::limits_of(account, plan).ceiling(plan).unwrap_or_default(),
        });
        Ok(Placed::Record(Placement {
            plan,
            fee: self.settings.fee,
            lease_until: collect_now.then(|| self.lease_until(now, self.settings.lease)),
            alerting,
        }))
    }

    /// Collects the charges an event created (when they were leased to this caller) and answers
    /// its outcome.
    async fn finish(
        &self,
        recorded: Recorded,
        collect_now: bool,
        account: Option<&Account>,
        plan: &Plan,
    ) -> Result<UsageOutcome, BillingError> {
        if recorded.replayed {
            debug!(event = %recorded.usage.event_id, "event replayed: answering the original outcome");
        } else {
            // Per request, as a metering path logs in the crates hosts know (sqlx, tower-http):
            // what happens to the charges (collected, failed) is logged at `info` and `warn`.
            debug!(
                tokens = recorded.usage.tokens,
                total = recorded.total_after,
                charges = recorded.charges.len(),
                "usage recorded"
            );
        }
        let mut charges = recorded.charges;
        if !recorded.replayed {
            metrics::charges_created(&charges);
        }
        if collect_now && !recorded.replayed && !charges.is_empty() {
            // Boxed: most events create no charge, and their futures need not make room for a
            // collection's.
            Box::pin(self.collect_created(&mut charges, &recorded.usage.user_id, account)).await;
        }
        Self::outcome(
            &recorded.usage,
            (recorded.total_before, recorded.total_after),
            &charges,
            recorded.replayed,
            plan,
        )
    }

    /// Collects the charges an event just created, leased to this caller, replacing each with
    /// its state after collection.
    async fn collect_created(&self, charges: &mut [Charge], user: &UserId, account: Option<&Account>) {
        match self.customer_for(user, account).await {
            Ok(Some(customer)) => {
                for charge in charges {
                    self.collect_charge(charge, &customer).await;
                }
            }
            Ok(None) => self.give_up_leases(charges.to_vec(), self.clock.now()).await,
            Err(error) => {
                warn!(error = %error, "no customer: charges stay pending");
                // Not left leased to a caller that cannot collect them: the next run, or a
                // registration, takes them at once.
                self.give_up_leases(charges.to_vec(), self.clock.now()).await;
            }
        }
    }

    /// Records many usage events in one store operation (one transaction on PostgreSQL), then
    /// collects the charges they created: for hosts that meter in bulk (a queue consumer, a
    /// log shipper), where one call per event would cost a round trip each.
    ///
    /// Each report is checked and answered on its own, in order: a bad report gets its typed
    /// error and records nothing, without stopping the others; a re-sent event id answers its
    /// original outcome; events of one user see the totals of the ones before them, so blocks
    /// are charged exactly once whatever the batching.
    ///
    /// # Errors
    /// The outer error is the store's: with a store that records a batch atomically
    /// (PostgreSQL), nothing of the batch was recorded; with one that records an event at a
    /// time, the events before the failure were. Send the batch again with the same event ids
    /// and every event is recorded once. Give event ids: a report without one cannot be told
    /// from a new event.
    ///
    /// # Example
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use token_billing::{BillingError, BillingService, UsageError, UsageReport, UserId};
    ///
    /// let billing = BillingService::embedded();
    /// let outcomes = billing
    ///     .process_token_usage_batch(vec![
    ///         UsageReport::new("user-uuid", 5_000_000, "chat").event_id("req-1"),
    ///         UsageReport::new("user-uuid", 0, "chat").event_id("req-2"), // refused, alone
    ///         UsageReport::new("user-uuid", 5_000_000, "chat").event_id("req-3"),
    ///     ])
    ///     .await?;
    /// assert_eq!(outcomes[0].as_ref().map(|o| o.total_tokens).ok(), Some(5_000_000));
    /// assert!(matches!(outcomes[1], Err(BillingError::InvalidUsage(UsageError::ZeroTokens))));
    /// let third = outcomes[2].as_ref().expect("recorded");
    /// assert_eq!((third.total_tokens, third.tier_charges.len()), (10_000_000, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn process_token_usage_batch(
        &self,
        reports: Vec<UsageReport>,
    ) -> Result<Vec<Result<UsageOutcome, BillingError>>, BillingError> {
        let events = reports.len();
        let span = info_span!("process_token_usage_batch", events);
        let answered = async {
            let now = self.clock.now();
            let mut outcomes: Vec<Option<Result<UsageOutcome, BillingError>>> = Vec::with_capacity(reports.len());
            let mut read = Vec::with_capacity(reports.len());
            for report in reports {
                let enforce = report.enforce_limits;
                match Self::read_report(report, now) {
                    Ok(usage) => {
                        read.push((outcomes.len(), usage, enforce));
                        outcomes.push(None);
                    }
                    Err(error) => outcomes.push(Some(Err(error.into()))),
                }
            }
            let mut users: Vec<UserId> = read.iter().map(|(_, usage, _)| usage.user_id.clone()).collect();
            users.sort_unstable();
            users.dedup();
            let found = self.store.accounts(&users).await?;
            if found.len() != users.len() {
                return Err(store_contract(format!(
                    "accounts answered {} accounts for {} users",
                    found.len(),
                    users.len()
                )));
            }
            let mut accounts: HashMap<UserId, Option<Account>> = users.into_iter().zip(found).collect();

            // Each event placed in its period, or refused (and perhaps a re-send).
            let mut requests = Vec::with_capacity(read.len());
            let mut placed = Vec::with_capacity(read.len());
            // Events refused on their own that may re-send an event recorded earlier in the
            // batch: answered once that one is, as they would be one by one.
            let mut refused_resends = Vec::new();
            // Tokens of unenforced events placed so far, by user and period: an enforced event
            // after them is held with them, since they are recorded before it.
            let mut unheld: HashMap<(UserId, PeriodKey), BillableTokens> = HashMap::new();
            for (position, mut usage, enforce) in read {
                let account = accounts.get(&usage.user_id).and_then(Option::as_ref);
                match self.place(&mut usage, account, now) {
                    Ok(Placed::Record(placement)) => {
                        let key = (usage.user_id.clone(), usage.period);
                        if enforce {
                            let ahead = unheld.get(&key).copied().unwrap_or_default();
                            match self.enforce_on(&usage, placement.plan, account, ahead, now).await {
                                Ok(None) => {}
                                Ok(Some(answer)) => {
                                    outcomes[position] = Some(answer);
                                    continue;
                                }
                                Err(error) => {
                                    outcomes[position] = Some(Err(error));
                                    continue;
                                }
                            }
                        } else {
                            // Summed exactly, and rounded up once where the hold is decided.
                            let sum = unheld.entry(key).or_default();
                            *sum = sum.checked_add(usage.billable()).unwrap_or(*sum);
                        }
                        placed.push((position, placement.plan, placement.lease_until.is_some()));
                        requests.push(RecordUsage {
                            usage,
                            plan: placement.plan,
                            fee: placement.fee,
                            lease_until: placement.lease_until,
                            alerting: placement.alerting,
                            // Read afresh by `accounts` above.
                            account: None,
                        });
                    }
                    Ok(Placed::Refused(error)) => {
                        let answer = match self.replay_of(&usage, account).await {
                            Ok(Some(outcome)) => Ok(outcome),
                            Ok(None) if usage.has_host_event_id() => {
                                refused_resends.push((position, usage, error));
                                continue;
                            }
                            Ok(None) => Err(error.into()),
                            Err(failure) => Err(failure),
                        };
                        outcomes[position] = Some(answer);
                    }
                    Err(error) => outcomes[position] = Some(Err(error)),
                }
            }
            let sent = requests.len();
            let started = std::time::Instant::now();
            let recorded = self.store.record_usage_batch(requests).await;
            metrics::recorded_in("batch", started.elapsed());
            let recorded = recorded?;
            if recorded.len() != sent {
                return Err(store_contract(format!(
                    "record_usage_batch answered {} results for {sent} events",
                    recorded.len()
                )));
            }
            debug!(
                recorded = recorded.iter().filter(|r| r.is_ok()).count(),
                "batch recorded"
            );
            // The events this batch recorded, by the host's id: the position of each and what it
            // was recorded as, for the re-sends of it later in the batch.
            let mut recorded_here: HashMap<(UserId, EventId), (usize, Arc<UsageRecord>)> = HashMap::new();
            let mut replays_of_recorded_here = Vec::new();
            for ((position, plan, collect_now), result) in placed.into_iter().zip(recorded) {
                let answer = match result {
                    Ok(recorded) => {
                        if recorded.usage.has_host_event_id() {
                            let id = (recorded.usage.user_id.clone(), recorded.usage.event_id.clone());
                            match recorded_here.get(&id) {
                                Some((original, _)) if recorded.replayed => {
                                    replays_of_recorded_here.push((position, *original));
                                }
                                Some(_) => {}
                                None if recorded.replayed => {}
                                None => {
                                    recorded_here.insert(id, (position, Arc::clone(&recorded.usage)));
                                }
                            }
                        }
                        let user = recorded.usage.user_id.clone();
                        let account = accounts.get(&user).and_then(Option::as_ref);
                        // Collecting may open the user's customer: the user's later events in
                        // the batch must see it, not open another.
                        let opens = collect_now
                            && !recorded.replayed
                            && !recorded.charges.is_empty()
                            && account.is_none_or(|a| a.customer_id.is_none());
                        // A replay is answered with the tier of its original's period, whose
                        // plan may not be the one this placing used.
                        let answer = if recorded.replayed {
                            self.period_plan(account, recorded.usage.period)
                        } else {
                            Ok(plan)
                        };
                        let answer = match answer {
                            Ok(plan) => self.finish(recorded, collect_now, account, plan).await,
                            Err(error) => Err(error),
                        };
                        if opens {
                            if let Ok(account) = self.store.account(&user).await {
                                accounts.insert(user, account);
                            }
                        }
                        answer
                    }
                    Err(refused) => Err(refused.into()),
                };
                outcomes[position] = Some(answer);
            }
            // A re-send of an event of this batch is answered as it would be after that event
            // alone: with the original's outcome once its charges were collected, or refused for
            // other usage, or refused on its own merits when the original was not recorded.
            let replay_of_position =
                |outcomes: &[Option<Result<UsageOutcome, BillingError>>], original: usize| match outcomes.get(original)
                {
                    Some(Some(Ok(outcome))) => Some(UsageOutcome {
                        replayed: true,
                        ..outcome.clone()
                    }),
                    _ => None,
                };
            for (position, original) in replays_of_recorded_here {
                if let Some(replay) = replay_of_position(&outcomes, original) {
                    outcomes[position] = Some(Ok(replay));
                }
            }
            for (position, usage, error) in refused_resends {
                let id = (usage.user_id.clone(), usage.event_id.clone());
                let answer = match recorded_here.get(&id) {
                    Some((original, _)) if *original > position => Err(error.into()),
                    Some((_, recorded)) if !recorded.same_usage(&usage) => Err(BillingError::EventConflict {
                        event_id: usage.event_id.clone(),
                    }),
                    Some((original, _)) => replay_of_position(&outcomes, *original).ok_or_else(|| error.into()),
                    None => Err(error.into()),
                };
                outcomes[position] = Some(answer);
            }
            let outcomes: Vec<_> = outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| unreachable!("every report is answered")))
                .collect();
            for outcome in &outcomes {
                metrics::event_answered(outcome, |outcome| outcome.replayed);
            }
            Ok(outcomes)
        }
        .instrument(span)
        .await;
        if let Err(error) = &answered {
            // Not one event of the batch was answered: each failed.
            metrics::events_failed(error, events);
        }
        answered
    }

    /// The original outcome of an event that was already recorded with the same usage; `None`
    /// when it was not recorded (or the host gave no event id, so it cannot be a re-send).
    async fn replay_of(
        &self,
        usage: &UsageRecord,
        account: Option<&Account>,
    ) -> Result<Option<UsageOutcome>, BillingError> {
        if !usage.has_host_event_id() {
            return Ok(None);
        }
        let Some(recorded) = self.store.recorded_event(&usage.user_id, &usage.event_id).await? else {
            return Ok(None);
        };
        if !recorded.usage.same_usage(usage) {
            return Err(BillingError::EventConflict {
                event_id: usage.event_id.clone(),
            });
        }
        let plan = self.period_plan(account, recorded.usage.period)?;
        debug!(event = %usage.event_id, "event replayed: answering the original outcome");
        let totals = (recorded.total_before, recorded.total_after);
        Self::outcome(&recorded.usage, totals, &recorded.charges, true, plan).map(Some)
    }

    fn outcome(
        usage: &UsageRecord,
        (total_before, total_after): (u64, u64),
        charges: &[Charge],
        replayed: bool,
        plan: &Plan,
    ) -> Result<UsageOutcome, BillingError> {
        let is_fee = |c: &&Charge| c.kind == ChargeKind::FixedFee;
        Ok(UsageOutcome {
            consumption_id: usage.consumption_id,
            total_tokens: total_after,
            tier_charges: charges.iter().filter(|c| !is_fee(c)).map(TierCharge::from).collect(),
            fixed_fee_charge: charges.iter().find(is_fee).map(TierCharge::from),
            period: usage.period,
            current_tier: plan.tier_of(total_after)?.label(),
            replayed,
            limit_exceeded: None,
            billable_tokens: total_after.saturating_sub(total_before),
            billable_exact: usage.billable(),
        })
    }
}
