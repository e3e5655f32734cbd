//! Recording a batch of usage events in [`PostgresUsageStore`]: in one transaction and a fixed
//! number of round trips, optimistically first and carefully (period rows locked in a fixed
//! order) when that loses, each event decided by the same rule as one event at a time, and the
//! answers given as single calls would give them.

use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PostgresUsageStore;
use super::alerts::AlertColumns;
use super::connection::Lent;
use super::record::{RecordFailure, charges_between, created_charge_audit, crossed_alerts};
use super::rows::{
    CHARGE_COLUMNS, DetailColumns, audit_json, charge_from, currency_mismatch, db, gave_up, generic, is_deadlock,
    is_duplicate_event, parse, to_i64, to_u32, to_u64,
};
use super::totals::SeenTotal;
use crate::domain::{BillableTotal, Charge, ChargeKind, ClientId, Currency, PeriodKey, UserId};
use crate::store::{RecordUsage, Recorded, StoreError, UsageStore};

/// What a batch decided for one of its events.
pub(super) enum Decision {
    /// Recorded before the batch: answered as a re-send.
    Existing,
    /// The same id as the batch's event at this index: answered as its re-send.
    Earlier(usize),
    /// Refused, nothing written.
    Refused(StoreError),
    /// Recorded by this batch, whose answer could not be read from its statement: answered by
    /// reading the event back.
    Written,
    /// Recorded: the period's total before and after it, and the charges it created.
    Accepted {
        before: u64,
        after: u64,
        charges: Vec<Charge>,
    },
}

impl PostgresUsageStore {
    /// Records a batch atomically in a fixed number of round trips: the period rows' totals,
    /// then every charge, consumption, summary change, freed hold, audit entry and alert in one
    /// statement. Events are decided in Rust, in order, by the same rule as one event at a time.
    ///
    /// The optimistic ways (`Way::Seen`, which starts from the totals this process last wrote
    /// where it knows them, and `Way::Optimistic`, which reads them) take no lock and trust that
    /// no event of the batch was recorded before; the write, one statement and so one
    /// transaction of its own, moves each period row only if its total is still the one
    /// started from, and fails on the event id's unique index if an id is taken (no speculative
    /// insert per row): one or two round trips, one commit. Nothing stays either way: a moved
    /// total makes the statement give itself up, and the answer names the way to try next; a
    /// taken id is a unique violation that `decide_batch` retries carefully. The careful way, a
    /// transaction that looks up the events recorded before and locks the period rows in a
    /// fixed order (so that concurrent batches never deadlock), meets a taken id only when a
    /// writer outside those locks (the same event id in another period) took it meanwhile. An
    /// account an event carries (a round of single events placed with cached accounts) is
    /// checked by the write itself, as one event's write checks it:
    /// [`RecordFailure::AccountChanged`] when one moved, nothing written.
    async fn try_record_batch(
        &self,
        requests: &[RecordUsage<'_>],
        way: Way,
        connection: &mut Lent,
    ) -> Result<Result<Vec<Decision>, Way>, RecordFailure> {
        let optimistic = way != Way::Careful;
        use foldhash::{HashMap, HashSet};
        use std::collections::BTreeMap;

        type Group = (UserId, PeriodKey);

        let Some(first) = requests.first() else {
            return Ok(Ok(Vec::new()));
        };
        let now = first.usage.recorded_at;
        // Optimistically no transaction: the read takes no lock, and the write is one statement.
        let connection: &mut sqlx::PgConnection = match connection {
            Some(connection) => connection,
            None => connection.insert(self.pool.acquire().await.map_err(RecordFailure::Database)?),
        };
        let mut session = if optimistic {
            Session::Alone(connection)
        } else {
            Session::Transaction(
                sqlx::Connection::begin(connection)
                    .await
                    .map_err(RecordFailure::Database)?,
            )
        };

        // The period rows of the batch's events, locked in the batch's key order: those that
        // exist are locked (not rewritten), the missing ones created in the same order, and a
        // row another writer created meanwhile is locked after it committed.
        let mut groups: BTreeMap<Group, &RecordUsage<'_>> = BTreeMap::new();
        for request in requests {
            groups
                .entry((request.usage.user_id.clone(), request.usage.period))
                .or_insert(request);
        }
        // Each period row's total and currency (`None`: one the crate does not know).
        let mut totals: HashMap<Group, (BillableTotal, Option<Currency>)> = HashMap::default();
        let mut created_rows: HashSet<Group> = HashSet::default();
        // A period row read: its key, its total and its currency.
        let period_row = |row: &PgRow| -> Result<(Group, BillableTotal, Option<Currency>), StoreError> {
            let group: Group = (
                parse(row.try_get::<&str, _>("user_id").map_err(db)?)?,
                parse(row.try_get::<&str, _>("period").map_err(db)?)?,
            );
            let total = BillableTotal {
                tokens: to_u64(row.try_get("total_tokens").map_err(db)?)?,
                credit_micros: to_u32(row.try_get("billable_credit").map_err(db)?)?,
            };
            let currency = row.try_get::<&str, _>("currency").map_err(db)?.parse().ok();
            Ok((group, total, currency))
        };
        let mut missing: Vec<(&Group, &RecordUsage<'_>)> =
            groups.iter().map(|(group, request)| (group, *request)).collect();
        // The totals this process last wrote, unless they turned out out of date.
        let mut from_seen: HashSet<Group> = HashSet::default();
        if way == Way::Seen {
            missing.retain(|(group, _)| match self.totals.get(group) {
                Some(seen) => {
                    totals.insert((*group).clone(), (seen.total, Some(seen.currency)));
                    from_seen.insert((*group).clone());
                    false
                }
                None => true,
            });
        }
        for round in 0..3 {
            if missing.is_empty() {
                break;
            }
            let (users, periods): (Vec<&str>, Vec<String>) = missing
                .iter()
                .map(|((user, period), _)| (user.as_str(), period.to_string()))
                .unzip();
            // Optimistically read as they are; carefully locked, in the batch's key order.
            let lock = if optimistic { "" } else { "ORDER BY g.n FOR UPDATE OF s" };
            let mut rows = sqlx::query(&format!(
                "SELECT s.user_id, s.period, s.total_tokens, s.billable_credit, s.currency, false AS inserted
                   FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS g(user_id, period, n)
                   JOIN token_usage_summary s ON s.user_id = g.user_id AND s.period = g.period
                 {lock}"
            ))
            .bind(&users)
            .bind(&periods)
            .fetch_all(&mut *session)
            .await
            .map_err(RecordFailure::Database)?;
            let found: HashSet<(&str, &str)> = rows
                .iter()
                .map(|row| Ok((row.try_get("user_id").map_err(db)?, row.try_get("period").map_err(db)?)))
                .collect::<Result<_, StoreError>>()?;
            let absent: Vec<usize> = (0..users.len())
                .filter(|&i| !found.contains(&(users[i], periods[i].as_str())))
                .collect();
            if optimistic && !absent.is_empty() {
                // A period opens: the careful way creates its row.
                return Ok(Err(Way::Careful));
            }
            if !absent.is_empty() && round < 2 {
                let mut currencies = Vec::with_capacity(absent.len());
                let mut included = Vec::with_capacity(absent.len());
                let mut blocks = Vec::with_capacity(absent.len());
                for &i in &absent {
                    let plan = missing[i].1.plan;
                    currencies.push(plan.currency().code());
                    included.push(to_i64(plan.included_tokens())?);
                    blocks.push(to_i64(plan.block_size())?);
                }
                let absent_users: Vec<&str> = absent.iter().map(|&i| users[i]).collect();
                let absent_periods: Vec<&str> = absent.iter().map(|&i| periods[i].as_str()).collect();
                rows.extend(
                    sqlx::query(include_str!("sql/open_period_rows.sql"))
                        .bind(&absent_users)
                        .bind(&absent_periods)
                        .bind(&currencies)
                        .bind(&included)
                        .bind(&blocks)
                        .bind(now)
                        .fetch_all(&mut *session)
                        .await
                        .map_err(RecordFailure::Database)?,
                );
            }
            for row in &rows {
                let (group, total, currency) = period_row(row)?;
                if row.try_get::<bool, _>("inserted").map_err(db)? {
                    created_rows.insert(group.clone());
                }
                totals.insert(group, (total, currency));
            }
            // Rows another writer created between the lock and the insert: locked next round.
            missing.retain(|(group, _)| !totals.contains_key(*group));
        }

        // Events already recorded (only the host's own ids can have been): looked up by the
        // careful way once it holds the period rows, so that no writer of those periods can
        // record one of them before the write; the optimistic one finds them taken when it
        // writes.
        let mut existing: HashSet<(String, String)> = HashSet::default();
        let (users, events): (Vec<&str>, Vec<&str>) = requests
            .iter()
            .filter(|r| !optimistic && r.usage.has_host_event_id())
            .map(|r| (r.usage.user_id.as_str(), r.usage.event_id.as_str()))
            .unzip();
        if !users.is_empty() {
            let rows = sqlx::query(
                "SELECT c.user_id, c.event_id
                   FROM token_consumption c
                   JOIN unnest($1::text[], $2::text[]) AS e(user_id, event_id)
                     ON c.user_id = e.user_id AND c.event_id = e.event_id",
            )
            .bind(&users)
            .bind(&events)
            .fetch_all(&mut *session)
            .await
            .map_err(RecordFailure::Database)?;
            for row in rows {
                existing.insert((row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?));
            }
        }
        let is_existing = |r: &RecordUsage<'_>| {
            !existing.is_empty() && existing.contains(&(r.usage.user_id.to_string(), r.usage.event_id.to_string()))
        };

        // The totals as read: the write moves a period row only from these.
        let read: HashMap<Group, BillableTotal> = totals
            .iter()
            .map(|(group, (total, _))| (group.clone(), *total))
            .collect();

        // Each event decided in order, against the totals the ones before it left.
        let mut decisions = Vec::with_capacity(requests.len());
        let mut seen: HashMap<(&UserId, &crate::domain::EventId), usize> = HashMap::default();
        let mut charges_of: Vec<Vec<crate::domain::NewCharge>> = Vec::with_capacity(requests.len());
        let mut events_per_group: HashMap<Group, i64> = HashMap::default();
        for (i, request) in requests.iter().enumerate() {
            let usage = &request.usage;
            charges_of.push(Vec::new());
            if is_existing(request) {
                decisions.push(Decision::Existing);
                continue;
            }
            if let Some(&earlier) = seen.get(&(&usage.user_id, &usage.event_id)) {
                decisions.push(Decision::Earlier(earlier));
                continue;
            }
            let group = (usage.user_id.clone(), usage.period);
            let Some((total, currency)) = totals.get_mut(&group) else {
                decisions.push(Decision::Refused(generic("a period row of the batch is missing")));
                continue;
            };
            // Each event against its own plan: the events of one period may have been placed
            // with different accounts (a round gathers independent callers).
            if *currency != Some(request.plan.currency()) {
                decisions.push(Decision::Refused(currency_mismatch(request.plan.currency())));
                continue;
            }
            let Some(moved) = total.plus(usage.billable()) else {
                decisions.push(Decision::Refused(StoreError::TotalOverflow {
                    total: total.tokens,
                    tokens: usage.tokens,
                }));
                continue;
            };
            let (before, after) = (total.tokens, moved.tokens);
            let charges = match charges_between(request, before, after) {
                Ok(charges) => charges,
                Err(error) => {
                    decisions.push(Decision::Refused(error.into()));
                    continue;
                }
            };
            charges_of[i] = charges;
            *total = moved;
            *events_per_group.entry(group).or_insert(0) += 1;
            seen.insert((&usage.user_id, &usage.event_id), i);
            decisions.push(Decision::Accepted {
                before,
                after,
                charges: Vec::new(),
            });
        }

        // A refusal decided from a kept total is answered only once the total is read.
        let refused_from_seen = requests.iter().zip(&decisions).any(|(request, decision)| {
            matches!(decision, Decision::Refused(_))
                && from_seen.contains(&(request.usage.user_id.clone(), request.usage.period))
        });
        if refused_from_seen {
            self.totals.forget(from_seen.iter());
            return Ok(Err(Way::Optimistic));
        }

        // Everything written in one statement.
        let mut c_users = Vec::new();
        let mut c_ids = Vec::new();
        let mut c_keys = Vec::new();
        // Each period's name, written once for all its rows.
        let period_names: HashMap<PeriodKey, String> =
            groups.keys().map(|(_, period)| (*period, period.to_string())).collect();
        let name_of = |period: &PeriodKey| {
            period_names
                .get(period)
                .map(String::as_str)
                .ok_or_else(|| generic("a period of the batch without its name"))
        };
        let mut c_periods = Vec::new();
        let mut c_kinds = Vec::new();
        let mut c_blocks = Vec::new();
        let mut c_tiers = Vec::new();
        let mut c_amounts = Vec::new();
        let mut c_currencies = Vec::new();
        let mut c_consumptions = Vec::new();
        let mut c_attempts = Vec::new();
        let mut c_leases = Vec::new();
        let mut x_users = Vec::new();
        let mut x_ids = Vec::new();
        let mut x_events = Vec::new();
        let mut x_periods = Vec::new();
        let mut x_tokens = Vec::new();
        let mut x_operations = Vec::new();
        let mut x_clients: Vec<Option<&str>> = Vec::new();
        let mut x_metadata = Vec::new();
        let mut x_occurred = Vec::new();
        let mut x_reported = Vec::new();
        let mut x_before = Vec::new();
        let mut x_first = Vec::new();
        let mut x_end = Vec::new();
        let mut x_after = Vec::new();
        let mut x_details = DetailColumns::default();
        let mut c_at = Vec::new();
        let mut x_at = Vec::new();
        let mut a_at = Vec::new();
        // The latest instant of each period's events, the summary's last change.
        let mut latest_of: HashMap<Group, chrono::DateTime<chrono::Utc>> = HashMap::default();
        // The accounts the events were placed with, checked by the write as one event's is.
        let mut p_users = Vec::new();
        let mut p_customers: Vec<Option<&str>> = Vec::new();
        let mut p_plans = Vec::new();
        let mut p_earlier = Vec::new();
        let mut p_subscriptions: Vec<Option<&str>> = Vec::new();
        let mut p_updated = Vec::new();
        let mut a_charges = Vec::new();
        let mut a_events = Vec::new();
        // Each audit entry's and each consumption's place in the audit trail: an event's
        // charges, then the event, event after event.
        let mut a_places = Vec::new();
        let mut x_places = Vec::new();
        let mut places = 0i64;
        // The charges each period row will owe, when all of them are created.
        let mut owed: HashMap<Group, (i64, i64)> = HashMap::default();
        for (i, request) in requests.iter().enumerate() {
            // The account of every event decided here, refused ones included: an event placed
            // with an account that changed is answered `AccountChanged` (and placed again),
            // whatever it would have been refused for.
            if let (Some(account), Decision::Accepted { .. } | Decision::Refused(_)) = (request.account, &decisions[i])
            {
                p_users.push(request.usage.user_id.as_str());
                p_customers.push(account.customer_id.as_ref().map(crate::domain::CustomerId::as_str));
                p_plans.push(account.plan_id.as_str());
                p_earlier.push(sqlx::types::Json(&account.earlier_plans));
                p_subscriptions.push(account.subscription_id.as_deref());
                p_updated.push(account.updated_at);
            }
            let Decision::Accepted { before, after, .. } = decisions[i] else {
                continue;
            };
            let usage = &request.usage;
            let period = name_of(&usage.period)?;
            let leased = request.lease_until.is_some();
            for charge in &charges_of[i] {
                let owes = owed.entry((usage.user_id.clone(), usage.period)).or_default();
                owes.0 += 1;
                owes.1 += charge.amount.minor_units();
                let id = crate::random::uuid_v4();
                c_users.push(usage.user_id.as_str());
                c_ids.push(id);
                c_keys.push(charge.key.as_str());
                c_periods.push(period);
                c_kinds.push(charge.kind.as_str());
                c_blocks.push(to_i64(charge.block)?);
                c_tiers.push(charge.billing_tier.as_str());
                c_amounts.push(charge.amount.minor_units());
                c_currencies.push(charge.amount.currency().code());
                c_consumptions.push(usage.consumption_id);
                c_attempts.push(i32::from(leased));
                c_leases.push(request.lease_until);
                c_at.push(usage.recorded_at);
                for event in &created_charge_audit(charge, leased) {
                    a_charges.push(id);
                    a_events.push(audit_json(event)?);
                    places += 1;
                    a_places.push(places);
                    a_at.push(usage.recorded_at);
                }
            }
            let blocks = request.plan.blocks_crossed(before, after).map_err(StoreError::from)?;
            x_users.push(usage.user_id.as_str());
            x_ids.push(usage.consumption_id);
            x_events.push(usage.event_id.as_str());
            x_periods.push(period);
            x_tokens.push(to_i64(usage.tokens)?);
            x_operations.push(usage.operation_type.as_str());
            x_clients.push(usage.client_id.as_ref().map(ClientId::as_str));
            x_metadata.push(sqlx::types::Json(&usage.metadata));
            x_occurred.push(usage.occurred_at);
            x_reported.push(usage.occurred_at_reported);
            x_at.push(usage.recorded_at);
            let latest = latest_of
                .entry((usage.user_id.clone(), usage.period))
                .or_insert(usage.recorded_at);
            *latest = (*latest).max(usage.recorded_at);
            x_before.push(to_i64(before)?);
            x_first.push(to_i64(blocks.first())?);
            x_end.push(to_i64(blocks.end())?);
            x_after.push(to_i64(after)?);
            x_details.push(usage)?;
            places += 1;
            x_places.push(places);
        }
        let mut g_users = Vec::new();
        let mut g_periods = Vec::new();
        let mut g_totals = Vec::new();
        let mut g_events = Vec::new();
        let mut g_before = Vec::new();
        let mut g_charges = Vec::new();
        let mut g_amounts = Vec::new();
        let mut g_included = Vec::new();
        let mut g_blocks = Vec::new();
        let mut g_credits = Vec::new();
        let mut g_credits_before = Vec::new();
        let mut g_at = Vec::new();
        let mut e_users = Vec::new();
        let mut e_periods = Vec::new();
        for (group, (total, _)) in &totals {
            match events_per_group.get(group) {
                Some(count) => {
                    g_users.push(group.0.as_str());
                    g_periods.push(group.1.to_string());
                    g_totals.push(to_i64(total.tokens)?);
                    g_credits.push(i32::try_from(total.credit_micros).map_err(generic)?);
                    g_events.push(*count);
                    let before = read.get(group).copied().unwrap_or_default();
                    g_before.push(to_i64(before.tokens)?);
                    g_credits_before.push(i32::try_from(before.credit_micros).map_err(generic)?);
                    g_at.push(latest_of.get(group).copied().unwrap_or(now));
                    let (charges, amount) = owed.get(group).copied().unwrap_or_default();
                    g_charges.push(charges);
                    g_amounts.push(amount);
                    let plan = groups.get(group).ok_or_else(|| generic("a group of the batch"))?.plan;
                    g_included.push(to_i64(plan.included_tokens())?);
                    g_blocks.push(to_i64(plan.block_size())?);
                }
                // A row this batch opened for events that were all refused: not kept.
                None if created_rows.contains(group) => {
                    e_users.push(group.0.as_str());
                    e_periods.push(group.1.to_string());
                }
                None => {}
            }
        }
        // The alerts the batch's events cross, written with them.
        let mut alerts = Vec::new();
        for (decision, request) in decisions.iter().zip(requests) {
            if let Decision::Accepted { before, after, .. } = decision {
                alerts.extend(crossed_alerts(request, *before, *after));
            }
        }
        let mut alert_columns = AlertColumns::default();
        for alert in &alerts {
            alert_columns.push(alert)?;
        }
        let query = sqlx::query(batch_sql(optimistic))
            .bind(&c_users)
            .bind(&c_ids)
            .bind(&c_keys)
            .bind(&c_periods)
            .bind(&c_kinds)
            .bind(&c_blocks)
            .bind(&c_tiers)
            .bind(&c_amounts)
            .bind(&c_currencies)
            .bind(&c_consumptions)
            .bind(&c_attempts)
            .bind(&c_leases)
            .bind(&c_at)
            .bind(&g_users)
            .bind(&g_periods)
            .bind(&g_totals)
            .bind(&g_events)
            .bind(&e_users)
            .bind(&e_periods)
            .bind(&x_users)
            .bind(&x_ids)
            .bind(&x_events)
            .bind(&x_periods)
            .bind(&x_tokens)
            .bind(&x_operations)
            .bind(&x_clients)
            .bind(&x_metadata)
            .bind(&x_occurred)
            .bind(&x_reported)
            .bind(&x_before)
            .bind(&x_first)
            .bind(&x_end)
            .bind(&a_charges)
            .bind(&a_events)
            .bind(&g_included)
            .bind(&g_blocks)
            .bind(&g_before)
            .bind(&g_charges)
            .bind(&g_amounts)
            .bind(&a_places)
            .bind(&x_places)
            .bind(places)
            .bind(&g_credits)
            .bind(&g_credits_before);
        let query = x_details
            .bind_arrays(query)
            .bind(&x_after)
            .bind(&g_at)
            .bind(&x_at)
            .bind(&a_at);
        let query = alert_columns
            .bind_arrays(query)
            .bind(&p_users)
            .bind(&p_customers)
            .bind(&p_plans)
            .bind(&p_earlier)
            .bind(&p_subscriptions)
            .bind(&p_updated);
        let rows = match query.fetch_all(&mut *session).await {
            Ok(rows) => rows,
            // An account moved: the caller reads the accounts again and places its events anew.
            Err(error) if gave_up(&error) && account_moved(&error) => {
                return Err(RecordFailure::AccountChanged);
            }
            // A total moved since it was read, an event id or a charge was taken: nothing of
            // this stayed. The next attempt reads the totals this one took as kept, or else is
            // careful.
            Err(error) if gave_up(&error) && !from_seen.is_empty() => {
                self.totals.forget(from_seen.iter());
                return Ok(Err(Way::Optimistic));
            }
            Err(error) if gave_up(&error) => return Ok(Err(Way::Careful)),
            Err(error) => return Err(RecordFailure::from_write(error)),
        };
        let mut created = match created_charges(&rows) {
            Ok(created) => Some(created),
            // The optimistic statement committed itself: the batch is written, and its events
            // are answered by reading them back, never as a failed batch.
            Err(_) if matches!(session, Session::Alone(_)) => None,
            Err(error) => return Err(error.into()),
        };
        if let Session::Transaction(tx) = session {
            tx.commit().await.map_err(RecordFailure::Database)?;
        }
        for (decision, request) in decisions.iter_mut().zip(requests) {
            match (decision, created.as_mut()) {
                (Decision::Accepted { charges, .. }, Some(created)) => {
                    *charges = created.remove(&request.usage.consumption_id).unwrap_or_default();
                    charges.sort_by_key(|c| (c.kind != ChargeKind::FixedFee, c.block));
                }
                (decision @ Decision::Accepted { .. }, None) => *decision = Decision::Written,
                _ => {}
            }
        }
        self.totals.written(
            totals
                .iter()
                .filter(|(group, _)| events_per_group.contains_key(*group))
                .filter_map(|(group, (total, currency))| {
                    Some((
                        group.clone(),
                        SeenTotal {
                            total: *total,
                            currency: (*currency)?,
                        },
                    ))
                }),
        );
        Ok(Ok(decisions))
    }

    /// The answers to a batch whose decisions are committed, each event moved into its answer.
    /// The batch is written: a failure here (reading an event recorded before it) is that
    /// event's answer, never the batch's, so that nothing makes the host send the batch again.
    pub(super) async fn batch_answers(
        &self,
        requests: Vec<RecordUsage<'_>>,
        decisions: Vec<Decision>,
    ) -> Vec<Result<Recorded, StoreError>> {
        let mut results: Vec<Result<Recorded, StoreError>> = Vec::with_capacity(requests.len());
        for (request, decision) in requests.into_iter().zip(decisions) {
            let usage = request.usage;
            results.push(match decision {
                Decision::Accepted { before, after, charges } => Ok(Recorded {
                    usage: Arc::new(usage),
                    total_before: before,
                    total_after: after,
                    charges,
                    replayed: false,
                }),
                Decision::Earlier(earlier) => match &results[earlier] {
                    Ok(original) => Recorded {
                        replayed: true,
                        ..original.clone()
                    }
                    .answer_resend(&usage),
                    Err(_) => Err(generic("an earlier event of the batch with the same id has no answer")),
                },
                Decision::Existing => match self.recorded_event(&usage.user_id, &usage.event_id).await {
                    Ok(Some(original)) => original.answer_resend(&usage),
                    Ok(None) => Err(generic("an event recorded before the batch is gone")),
                    Err(error) => Err(error),
                },
                Decision::Refused(error) => Err(error),
                Decision::Written => match self.recorded_event(&usage.user_id, &usage.event_id).await {
                    Ok(Some(recorded)) => Ok(Recorded {
                        replayed: false,
                        ..recorded
                    }),
                    Ok(None) => Err(generic("an event the batch recorded is gone")),
                    Err(error) => Err(error),
                },
            });
        }
        results
    }

    /// [`UsageStore::record_usage_batch`].
    pub(super) async fn record_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        // Its connection back in the pool before the answers read any event.
        let decided = self.decide_batch(&requests, &mut None).await;
        match decided {
            Ok(decisions) => Ok(self.batch_answers(requests, decisions).await),
            Err(failure) => Err(batch_error(failure)),
        }
    }

    /// Records a batch and answers what it decided for each event: the first attempt is
    /// optimistic, the next ones careful (see `try_record_batch`). A concurrent record of an
    /// event of the batch makes an attempt give up, and the next one answers that event as a
    /// replay. [`RecordFailure::AccountChanged`] when an account an event carries to check is no
    /// longer the stored one: nothing of the batch is recorded.
    ///
    /// Every attempt runs on `connection`, taken from the pool when it holds none and left in
    /// it for the caller's next batch: a group-commit task records round after round on one
    /// connection instead of taking one from the pool (and, by default, testing it with a
    /// round trip) for each. The caller drops it once a batch failed, as it may be broken.
    pub(super) async fn decide_batch(
        &self,
        requests: &[RecordUsage<'_>],
        connection: &mut Lent,
    ) -> Result<Vec<Decision>, RecordFailure> {
        let mut attempts = 0;
        let mut way = Way::Seen;
        loop {
            attempts += 1;
            match self.try_record_batch(requests, way, connection).await {
                Ok(Ok(decisions)) => return Ok(decisions),
                Ok(Err(next)) if attempts < 5 => way = next,
                Ok(Err(_)) => {
                    return Err(generic("the batch kept meeting concurrent records of its events").into());
                }
                Err(RecordFailure::Database(error)) if is_duplicate_event(&error) && attempts < 5 => way = Way::Careful,
                // An optimistic write updates its period rows in no fixed order, and a careful one
                // locks rows created by another batch after its own: the rare lock cycle that
                // makes is broken by PostgreSQL, and the batch runs again, carefully.
                Err(RecordFailure::Database(error)) if is_deadlock(&error) && attempts < 5 => way = Way::Careful,
                Err(failure) => return Err(failure),
            }
        }
    }
}

/// How a batch is attempted (see `try_record_batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Optimistically, with the totals this process last wrote where it knows them.
    Seen,
    /// Optimistically, every total read.
    Optimistic,
    /// Carefully, the period rows locked.
    Careful,
}

/// Why a batch's statement gives itself up when an account moved (`sql/record_batch.sql`).
const ACCOUNT_MOVED: &str = "an account the batch was placed with changed";

/// Whether a batch's statement gave itself up because an account moved.
fn account_moved(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.message().ends_with(ACCOUNT_MOVED))
}

/// The charges a batch's statement created, by the consumption that created them.
fn created_charges(rows: &[PgRow]) -> Result<foldhash::HashMap<uuid::Uuid, Vec<Charge>>, StoreError> {
    let mut created: foldhash::HashMap<uuid::Uuid, Vec<Charge>> = foldhash::HashMap::default();
    for row in rows {
        if row.try_get::<Option<uuid::Uuid>, _>("id").map_err(db)?.is_none() {
            continue;
        }
        let charge = charge_from(row)?;
        if let Some(consumption) = charge.consumption_id {
            created.entry(consumption).or_default().push(charge);
        }
    }
    Ok(created)
}

/// The error a batch that could not be recorded answers.
pub(super) fn batch_error(failure: RecordFailure) -> StoreError {
    match failure {
        RecordFailure::Store(error) => error,
        RecordFailure::Overflow => generic("a period total passed BIGINT"),
        // A host's batches are placed with accounts read afresh, and carry none to check.
        RecordFailure::AccountChanged => generic("an account a batch was placed with changed"),
        RecordFailure::Database(error) => db(error),
    }
}

/// The connection a batch attempt runs on: alone for the optimistic way, whose write is one
/// statement, or in the careful way's transaction.
enum Session<'c> {
    Alone(&'c mut sqlx::PgConnection),
    Transaction(sqlx::Transaction<'c, sqlx::Postgres>),
}

impl std::ops::Deref for Session<'_> {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &sqlx::PgConnection {
        match self {
            Session::Alone(connection) => connection,
            Session::Transaction(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        match self {
            Session::Alone(connection) => connection,
            Session::Transaction(tx) => tx,
        }
    }
}

/// The statement that writes a batch (`sql/record_batch.sql`), optimistically or carefully, its
/// fragments filled in once per way.
fn batch_sql(optimistic: bool) -> &'static str {
    fn fill(optimistic: bool) -> String {
        // The period rows this write moves: optimistically, each one whose total is still the one
        // read, owing every charge of the batch; carefully, every one, already locked. Nothing
        // of a period is written before its row is moved, so a batch takes a period's lock
        // before it writes anything another writer of that period could wait on.
        let (moved, summary) = if optimistic {
            (
                "UPDATE token_usage_summary s
                        SET total_tokens = g.total_after, billable_credit = g.credit_after,
                            events = s.events + g.events, updated_at = g.at, holds = {holds},
                            included_tokens = coalesce(s.included_tokens, g.included),
                            block_size = coalesce(s.block_size, g.block),
                            outstanding_count = s.outstanding_count + g.charges,
                            outstanding_total = s.outstanding_total + g.amount
                       FROM groups g
                      WHERE s.user_id = g.user_id AND s.period = g.period AND s.total_tokens = g.total_before
                        AND s.billable_credit = g.credit_before
                     RETURNING s.user_id, s.period",
                "",
            )
        } else {
            (
                "SELECT user_id, period FROM groups",
                "outstanding AS (
                         SELECT user_id, period, count(*) AS charges, sum(amount_charged) AS amount
                           FROM created GROUP BY user_id, period
                     ), summary AS (
                         UPDATE token_usage_summary s
                            SET total_tokens = g.total_after, billable_credit = g.credit_after,
                                events = s.events + g.events, updated_at = g.at, holds = {holds},
                                included_tokens = coalesce(s.included_tokens, g.included),
                                block_size = coalesce(s.block_size, g.block),
                                outstanding_count = s.outstanding_count + coalesce(o.charges, 0),
                                outstanding_total = s.outstanding_total + coalesce(o.amount, 0)
                           FROM groups g LEFT JOIN outstanding o ON o.user_id = g.user_id AND o.period = g.period
                          WHERE s.user_id = g.user_id AND s.period = g.period
                     ),",
            )
        };
        // Optimistically, any period row not moved, event not inserted or charge not created
        // means another writer came first; carefully, the rows are locked and only an event id
        // taken by a writer outside those locks can be.
        let lost = if optimistic {
            "(SELECT count(*) FROM moved) <> cardinality($14::text[])
                 OR (SELECT count(*) FROM consumption) <> cardinality($20::text[])
                 OR (SELECT count(*) FROM created) <> cardinality($1::text[])"
        } else {
            "(SELECT count(*) FROM moved) <> cardinality($14::text[])
                 OR (SELECT count(*) FROM consumption) <> cardinality($20::text[])"
        };
        // The holds of the period's events freed: read only when the period holds any.
        let holds = "CASE WHEN s.holds = '{}'::jsonb THEN s.holds
                          ELSE s.holds - ARRAY(SELECT h.event_id
                                                 FROM unnest($20::text[], $23::text[], $22::text[])
                                                      AS h(user_id, period, event_id)
                                                WHERE h.user_id = s.user_id AND h.period = s.period) END";
        include_str!("sql/record_batch.sql")
            .replace("{moved}", moved)
            .replace("{summary}", summary)
            .replace("{holds}", holds)
            .replace("{lost}", lost)
            .replace("{CHARGE_COLUMNS}", CHARGE_COLUMNS)
    }
    static OPTIMISTIC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| fill(true));
    static CAREFUL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| fill(false));
    if optimistic {
        OPTIMISTIC.as_str()
    } else {
        CAREFUL.as_str()
    }
}
