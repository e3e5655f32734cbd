//! Recording one usage event in [`PostgresUsageStore`]: in one statement when it creates no
//! charge, by a compare-and-set on the period's total, or in a transaction that locks the
//! period row; and answering a re-sent event with its original outcome (the replay). What a
//! write binds, and the charges and audit entries an event creates, are shared with the batch
//! (`record_batch`).

use std::sync::Arc;

use sqlx::{Postgres, Row, Transaction};

use super::PostgresUsageStore;
use super::accounts::{account_unchanged, bind_account};
use super::connection::Lent;
use super::rows::{
    CHARGE_COLUMNS, CONSUMPTION_COLUMNS, DetailColumns, PgQuery, charge_from, currency_mismatch, db, gave_up, generic,
    is_deadlock, is_duplicate_event, is_numeric_overflow, to_i64, to_u64, usage_from,
};
use crate::domain::{
    Blocks, Charge, ChargeKind, ChargeStatus, ClientId, EventId, FeeCollection, NewCharge, UsageRecord, UserId,
    charges_for_growth,
};
use crate::store::{Alert, AuditEvent, RecordUsage, Recorded, StoreError, UsageStore};

/// The charges an event whose interval of the period's total is `(before, after]` creates.
pub(super) fn charges_between(
    request: &RecordUsage<'_>,
    before: u64,
    after: u64,
) -> Result<Vec<NewCharge>, crate::domain::RatingError> {
    let usage = &request.usage;
    charges_for_growth(
        request.plan,
        request.fee,
        &usage.user_id,
        usage.period,
        before,
        after,
        Some(usage.consumption_id),
    )
}

/// Binds the columns of an event's consumption row that follow its ids, in this order: event
/// id, tokens, operation type, client, metadata, occurrence, whether the occurrence was
/// reported, the total before it, its first and end block, its model, token classes and exact
/// billable tokens, and the total after it.
fn bind_consumption<'q>(
    query: PgQuery<'q>,
    usage: &'q UsageRecord,
    (before, after): (u64, u64),
    blocks: &Blocks,
) -> Result<PgQuery<'q>, StoreError> {
    let query = bind_event(query, usage)?
        .bind(to_i64(before)?)
        .bind(to_i64(blocks.first())?)
        .bind(to_i64(blocks.end())?);
    Ok(DetailColumns::bind_one(usage, query)?.bind(to_i64(after)?))
}

/// An event's billable tokens as the ways that move a period total by whole tokens take them:
/// `None` when the event has a fraction of a token, which only the locking way records (it reads
/// and writes the period's rounding credit), or more whole tokens than a total may hold (which
/// the locking way refuses).
fn whole_billable(usage: &UsageRecord) -> Option<u64> {
    let billable = usage.billable();
    if billable.fraction_micros() != 0 {
        return None;
    }
    u64::try_from(billable.whole_tokens())
        .ok()
        .filter(|whole| *whole <= crate::MAX_TOKENS)
}

/// Binds what the host reported of an event, in this order: event id, tokens, operation type,
/// client, metadata, occurrence, and whether the occurrence was reported.
fn bind_event<'q>(query: PgQuery<'q>, usage: &'q UsageRecord) -> Result<PgQuery<'q>, StoreError> {
    Ok(query
        .bind(usage.event_id.as_str())
        .bind(to_i64(usage.tokens)?)
        .bind(usage.operation_type.as_str())
        .bind(usage.client_id.as_ref().map(ClientId::as_str))
        .bind(sqlx::types::Json(&usage.metadata))
        .bind(usage.occurred_at)
        .bind(usage.occurred_at_reported))
}

/// Binds what a compare-and-set writes into the period row: the new total, and the plan's
/// included tokens and block size.
fn bind_new_total<'q>(query: PgQuery<'q>, request: &RecordUsage<'_>, after: u64) -> Result<PgQuery<'q>, StoreError> {
    Ok(query
        .bind(to_i64(after)?)
        .bind(to_i64(request.plan.included_tokens())?)
        .bind(to_i64(request.plan.block_size())?))
}

/// The audit entries of a charge an event creates: its creation, and the start of its
/// collection when the charge is leased to the recording caller.
pub(super) fn created_charge_audit(charge: &NewCharge, leased: bool) -> Vec<AuditEvent> {
    let mut events = vec![AuditEvent::ChargeCreated {
        key: charge.key.clone(),
        billing_tier: charge.billing_tier.clone(),
        amount: charge.amount,
        status: ChargeStatus::Pending,
    }];
    if leased {
        events.push(AuditEvent::CollectionStarted {
            key: charge.key.clone(),
            round: 0,
            attempt: 1,
        });
    }
    events
}

/// How an event's write is made safe: inside a transaction that already locked and incremented
/// the period row, or by a compare-and-set on its total in the write itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Locked,
    CompareAndSet,
}

/// The statement that writes an event behind `gate` (`sql/write_event.sql`), its fragments
/// filled in once per gate.
fn write_event_sql(gate: Gate) -> &'static str {
    fn fill(gate: Gate) -> String {
        // Under the compare-and-set the row is locked here, if its total is still `before`, and
        // every write below happens only then; the summary also takes the new total, and frees
        // the hold the event settles (the locking way frees it with the increment).
        let (locked, totals) = match gate {
            Gate::Locked => ("SELECT 1", ""),
            Gate::CompareAndSet => (
                "SELECT 1 FROM token_usage_summary
                      WHERE user_id = $8 AND period = $9 AND total_tokens = $22 FOR UPDATE",
                "total_tokens = $33, events = events + 1, updated_at = $14,
                     included_tokens = coalesce(included_tokens, $34), block_size = coalesce(block_size, $35),
                     holds = holds - $15,",
            ),
        };
        let summary_gate = match gate {
            Gate::Locked => "EXISTS (SELECT 1 FROM created)",
            Gate::CompareAndSet => "EXISTS (SELECT 1 FROM locked)",
        };
        include_str!("sql/write_event.sql")
            .replace("{locked}", locked)
            .replace("{totals}", totals)
            .replace("{summary_gate}", summary_gate)
            .replace("{CHARGE_COLUMNS}", CHARGE_COLUMNS)
    }
    static LOCKED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| fill(Gate::Locked));
    static COMPARE_AND_SET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| fill(Gate::CompareAndSet));
    match gate {
        Gate::Locked => LOCKED.as_str(),
        Gate::CompareAndSet => COMPARE_AND_SET.as_str(),
    }
}

/// The alerts an event crosses, moving its period from `before` to `after`.
pub(super) fn crossed_alerts(request: &RecordUsage<'_>, before: u64, after: u64) -> Vec<Alert> {
    let Some(alerting) = request.alerting else {
        return Vec::new();
    };
    let usage = &request.usage;
    alerting
        .policy
        .crossed(request.plan, &alerting.ceiling, before, after)
        .into_iter()
        .map(|kind| Alert::new(usage.user_id.clone(), usage.period, kind, after, usage.recorded_at))
        .collect()
}

/// Why a record attempt stopped: a database error (perhaps a concurrent duplicate) or a store
/// error to return as is.
pub(super) enum RecordFailure {
    Database(sqlx::Error),
    /// The period total would pass `BIGINT`.
    Overflow,
    /// The account the event was placed with is no longer the stored one.
    AccountChanged,
    Store(StoreError),
}

impl RecordFailure {
    /// A write's error: a total past `BIGINT` is an overflow, anything else the database's.
    pub(super) fn from_write(error: sqlx::Error) -> RecordFailure {
        if is_numeric_overflow(&error) {
            RecordFailure::Overflow
        } else {
            RecordFailure::Database(error)
        }
    }
}

impl From<StoreError> for RecordFailure {
    fn from(error: StoreError) -> Self {
        RecordFailure::Store(error)
    }
}

impl PostgresUsageStore {
    async fn replay_in(
        tx: &mut Transaction<'static, Postgres>,
        user: &UserId,
        event_id: &EventId,
    ) -> Result<Option<Recorded>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {CONSUMPTION_COLUMNS}, total_before, created_fee, first_block, end_block,
                        coalesce(total_after, total_before + tokens_used) AS total_after
                   FROM token_consumption WHERE user_id = $1 AND event_id = $2"
            )
        });
        let row = sqlx::query(SQL.as_str())
            .bind(user.as_str())
            .bind(event_id.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let usage = usage_from(&row)?;
        let total_before = to_u64(row.try_get("total_before").map_err(db)?)?;
        let total_after = to_u64(row.try_get("total_after").map_err(db)?)?;
        let created_fee: bool = row.try_get("created_fee").map_err(db)?;
        let first_block: i64 = row.try_get("first_block").map_err(db)?;
        let end_block: i64 = row.try_get("end_block").map_err(db)?;
        let charges = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM token_billing_charges
              WHERE user_id = $1 AND period = $2
                AND ((kind = 'fixed_fee' AND $3) OR (kind = 'block' AND block >= $4 AND block < $5))
              ORDER BY kind DESC, block"
        ))
        .bind(user.as_str())
        .bind(usage.period.to_string())
        .bind(created_fee)
        .bind(first_block)
        .bind(end_block)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?
        .iter()
        .map(charge_from)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Recorded {
            total_after,
            usage: Arc::new(usage),
            total_before,
            charges,
            replayed: true,
        }))
    }

    async fn try_record(&self, request: &RecordUsage<'_>) -> Result<Recorded, RecordFailure> {
        let usage = &request.usage;
        let user = &usage.user_id;
        let mut tx = self.begin().await?;
        if request.account.is_some() {
            static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                format!(
                    "SELECT EXISTS (SELECT 1 FROM token_billing_accounts a WHERE a.user_id = $1 AND {})",
                    account_unchanged(2)
                )
            });
            let query = sqlx::query(SQL.as_str()).bind(user.as_str());
            let unchanged: bool = bind_account(query, request.account)
                .fetch_one(&mut *tx)
                .await
                .map_err(RecordFailure::Database)?
                .try_get(0)
                .map_err(db)?;
            if !unchanged {
                return Err(RecordFailure::AccountChanged);
            }
        }
        let now = usage.recorded_at;
        let billable = usage.billable();
        let whole = u64::try_from(billable.whole_tokens())
            .ok()
            .filter(|w| *w <= crate::MAX_TOKENS)
            .ok_or(RecordFailure::Overflow)?;
        let fraction = i32::try_from(billable.fraction_micros()).map_err(generic)?;
        // The increment, unless the event was recorded before, in one round trip. It takes the
        // summary row's lock until commit: concurrent events of this user and period see
        // disjoint intervals.
        let row = sqlx::query(include_str!("sql/increment_period_total.sql"))
            .bind(user.as_str())
            .bind(usage.period.to_string())
            .bind(request.plan.currency().code())
            .bind(to_i64(whole)?)
            .bind(now)
            .bind(to_i64(request.plan.included_tokens())?)
            .bind(to_i64(request.plan.block_size())?)
            .bind(usage.event_id.as_str())
            .bind(fraction)
            .fetch_one(&mut *tx)
            .await
            .map_err(RecordFailure::from_write)?;
        if row.try_get::<bool, _>("replayed").map_err(db)? {
            let original = Self::replay_in(&mut tx, user, &usage.event_id)
                .await?
                .ok_or_else(|| generic("a recorded event vanished"))?;
            tx.rollback().await.map_err(db)?;
            return Ok(original.answer_resend(usage)?);
        }
        let after: i64 = row
            .try_get::<Option<i64>, _>("total")
            .map_err(db)?
            .ok_or_else(|| currency_mismatch(request.plan.currency()))?;
        let after = to_u64(after)?;
        let credit = row
            .try_get::<Option<i32>, _>("credit")
            .map_err(db)?
            .ok_or_else(|| generic("the incremented period row has no credit"))?;
        // The event started one more token exactly when the credit it left and its fraction
        // reach a whole token (see `BillableTotal::plus`).
        let rounded_up = i64::from(credit) + i64::from(fraction) >= crate::MICROS_PER_TOKEN as i64;
        let before = after
            .checked_sub(whole + u64::from(rounded_up))
            .ok_or_else(|| generic("the period total moved back"))?;
        let created = Self::write_event(&mut *tx, request, before, after, Gate::Locked)
            .await?
            .ok_or_else(|| generic("the locked write did not happen"))?;
        Self::insert_alerts(&mut *tx, &crossed_alerts(request, before, after)).await?;
        tx.commit().await.map_err(RecordFailure::Database)?;
        Ok(Recorded {
            usage: Arc::new(usage.clone()),
            total_before: before,
            total_after: after,
            charges: created,
            replayed: false,
        })
    }

    /// Records an event that creates no charge in one statement, one round trip and no explicit
    /// transaction: the period's total moves by the event's tokens (the row's lock orders
    /// concurrent events, so their intervals are disjoint), the consumption and its audit entry
    /// are written from the `UPDATE`'s `RETURNING`, and if the interval starts a block or opens
    /// a period whose fee the library charges, or the event id is taken, the statement calls
    /// `token_billing_give_up` and everything of it is undone. The rule is the one
    /// [`charges_for_growth`] applies, in SQL. `None` when nothing was written: no period row
    /// in this currency, a total that would pass [`crate::MAX_TOKENS`], or the statement gave
    /// up.
    async fn try_record_direct(
        &self,
        request: &RecordUsage<'_>,
        connection: &mut Lent,
    ) -> Result<Option<Recorded>, RecordFailure> {
        let usage = &request.usage;
        let Some(whole) = whole_billable(usage) else {
            return Ok(None);
        };
        // An account that changed since the event was placed moves nothing here; the next path
        // tells that apart from the other reasons.
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            include_str!("sql/record_direct.sql").replace("{account}", &account_unchanged(18))
        });
        let query = sqlx::query(SQL.as_str())
            .bind(usage.user_id.as_str())
            .bind(usage.period.to_string())
            .bind(usage.recorded_at)
            .bind(usage.consumption_id);
        let result = bind_event(query, usage)?
            .bind(to_i64(request.plan.included_tokens())?)
            .bind(to_i64(request.plan.block_size())?)
            .bind(request.plan.currency().code())
            .bind(to_i64(crate::MAX_TOKENS)?)
            .bind(request.fee == FeeCollection::Library)
            .bind(request.account.is_some());
        // The totals where an alert starts: an event that reaches one gives up, for the ways that
        // write its alerts with it (a block's alert comes with its charge, which gives up too).
        let points: Vec<i64> = match request.alerting {
            Some(alerting) => alerting
                .policy
                .points(request.plan, &alerting.ceiling)
                .into_iter()
                .map(|(at, _)| to_i64(at))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let result = bind_account(result, request.account).bind(points).bind(to_i64(whole)?);
        let connection: &mut sqlx::PgConnection = match connection {
            Some(connection) => connection,
            None => connection.insert(self.pool.acquire().await.map_err(RecordFailure::Database)?),
        };
        let result = DetailColumns::bind_one(usage, result)?.fetch_optional(connection).await;
        let row = match result {
            Ok(Some(row)) => row,
            Ok(None) => return Ok(None),
            Err(error) if gave_up(&error) => return Ok(None),
            Err(error) => return Err(RecordFailure::Database(error)),
        };
        let before = to_u64(row.try_get("before").map_err(db)?)?;
        let after = to_u64(row.try_get("after").map_err(db)?)?;
        Ok(Some(Recorded {
            usage: Arc::new(usage.clone()),
            total_before: before,
            total_after: after,
            charges: Vec::new(),
            replayed: false,
        }))
    }

    /// Records an event in two round trips and no explicit transaction, when its period row
    /// exists: reads the total (and whether the event was recorded), decides the charges, then
    /// writes everything in one statement that first locks the row *if its total is still the
    /// one read* (a compare-and-set). `None` when the period row is missing, or when the total
    /// moved under every attempt: the caller takes the locking path.
    async fn try_record_fast(&self, request: &RecordUsage<'_>) -> Result<Option<Recorded>, RecordFailure> {
        let usage = &request.usage;
        let Some(whole) = whole_billable(usage) else {
            return Ok(None);
        };
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT s.total_tokens, s.currency,
                    EXISTS (SELECT 1 FROM token_consumption c WHERE c.user_id = $1 AND c.event_id = $3) AS recorded,
                    NOT $4 OR EXISTS (SELECT 1 FROM token_billing_accounts a WHERE a.user_id = $1 AND {})
                        AS account_unchanged
               FROM (SELECT 1) AS one
               LEFT JOIN token_usage_summary s ON s.user_id = $1 AND s.period = $2",
                account_unchanged(5)
            )
        });
        for _ in 0..3 {
            let query = sqlx::query(SQL.as_str())
                .bind(usage.user_id.as_str())
                .bind(usage.period.to_string())
                .bind(usage.event_id.as_str())
                .bind(request.account.is_some());
            let row = bind_account(query, request.account)
                .fetch_one(&self.pool)
                .await
                .map_err(RecordFailure::Database)?;
            if row.try_get::<bool, _>("recorded").map_err(db)? {
                let original = self
                    .recorded_event(&usage.user_id, &usage.event_id)
                    .await?
                    .ok_or_else(|| generic("a recorded event vanished"))?;
                return Ok(Some(original.answer_resend(usage)?));
            }
            if !row.try_get::<bool, _>("account_unchanged").map_err(db)? {
                return Err(RecordFailure::AccountChanged);
            }
            let Some(total) = row.try_get::<Option<i64>, _>("total_tokens").map_err(db)? else {
                return Ok(None);
            };
            if row.try_get::<Option<&str>, _>("currency").map_err(db)? != Some(request.plan.currency().code()) {
                return Err(currency_mismatch(request.plan.currency()).into());
            }
            let before = to_u64(total)?;
            let after =
                before
                    .checked_add(whole)
                    .filter(|t| *t <= crate::MAX_TOKENS)
                    .ok_or(StoreError::TotalOverflow {
                        total: before,
                        tokens: usage.tokens,
                    })?;
            if request
                .alerting
                .is_some_and(|a| !a.policy.crossed(request.plan, &a.ceiling, before, after).is_empty())
            {
                // Its alerts are written in the locking way's transaction.
                return Ok(None);
            }
            if let Some(created) = Self::write_event(&self.pool, request, before, after, Gate::CompareAndSet).await? {
                return Ok(Some(Recorded {
                    usage: Arc::new(usage.clone()),
                    total_before: before,
                    total_after: after,
                    charges: created,
                    replayed: false,
                }));
            }
            // Another event of the user moved the total first: read it again.
        }
        Ok(None)
    }

    /// Writes an event whose interval `(before, after]` is decided: its charges (the fixed fee
    /// may exist already, the rest follows from those created), the summary's figures, the
    /// consumption and its audit entries, in one statement. `None` when the compare-and-set
    /// lost (the total is not `before` any more); nothing is written then.
    async fn write_event<'e>(
        executor: impl sqlx::Executor<'e, Database = Postgres>,
        request: &RecordUsage<'_>,
        before: u64,
        after: u64,
        gate: Gate,
    ) -> Result<Option<Vec<Charge>>, RecordFailure> {
        let usage = &request.usage;
        let charges = charges_between(request, before, after).map_err(StoreError::from)?;
        let blocks = request.plan.blocks_crossed(before, after).map_err(StoreError::from)?;
        let leased = request.lease_until.is_some();
        let mut ids = Vec::with_capacity(charges.len());
        let mut keys = Vec::with_capacity(charges.len());
        let mut kinds = Vec::with_capacity(charges.len());
        let mut block_numbers = Vec::with_capacity(charges.len());
        let mut tiers = Vec::with_capacity(charges.len());
        let mut amounts = Vec::with_capacity(charges.len());
        let mut audits = Vec::with_capacity(charges.len());
        for charge in &charges {
            let events = created_charge_audit(charge, leased);
            ids.push(crate::random::uuid_v4());
            keys.push(charge.key.as_str());
            kinds.push(charge.kind.as_str());
            block_numbers.push(to_i64(charge.block)?);
            tiers.push(charge.billing_tier.as_str());
            amounts.push(charge.amount.minor_units());
            audits.push(serde_json::to_value(&events).map_err(generic)?);
        }
        let sql = write_event_sql(gate);
        let mut query = sqlx::query(sql)
            .bind(&ids)
            .bind(&keys)
            .bind(&kinds)
            .bind(&block_numbers)
            .bind(&tiers)
            .bind(&amounts)
            .bind(&audits)
            .bind(usage.user_id.as_str())
            .bind(usage.period.to_string())
            .bind(request.plan.currency().code())
            .bind(i32::from(leased))
            .bind(usage.consumption_id)
            .bind(request.lease_until)
            .bind(usage.recorded_at);
        query = bind_consumption(query, usage, (before, after), &blocks)?;
        if gate == Gate::CompareAndSet {
            query = bind_new_total(query, request, after)?;
        }
        let rows = query.fetch_all(executor).await.map_err(RecordFailure::Database)?;
        let won = match rows.first() {
            Some(row) => row.try_get::<bool, _>("won").map_err(db)?,
            None => false,
        };
        if !won {
            return Ok(None);
        }
        let mut created = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<uuid::Uuid>, _>("id").map_err(db)?.is_some() {
                created.push(charge_from(row)?);
            }
        }
        created.sort_by_key(|c| (c.kind != ChargeKind::FixedFee, c.block));
        Ok(Some(created))
    }

    /// [`UsageStore::record_usage`], one event on its own; the period total it moved is kept
    /// for the batches that follow (`totals`).
    pub(super) async fn record_event(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        self.record_event_on(request, &mut None).await
    }

    /// [`record_event`](Self::record_event), its one-statement way on `connection` (taken from
    /// the pool when it holds none, and left in it once that way recorded the event), as the
    /// group commit's task records a round of one event on the connection it keeps. Every
    /// other way gives `connection` back first: they take the pool's, and after a failed
    /// statement it may be broken.
    pub(super) async fn record_event_on(
        &self,
        request: RecordUsage<'_>,
        connection: &mut Lent,
    ) -> Result<Recorded, StoreError> {
        let recorded = self.record_one(request, connection).await;
        if let Ok(recorded) = &recorded
            && !recorded.replayed
        {
            let usage = &recorded.usage;
            let whole = usage.billable().fraction_micros() == 0;
            self.totals.moved(
                (usage.user_id.clone(), usage.period),
                recorded.total_before,
                recorded.total_after,
                whole,
            );
        }
        recorded
    }

    async fn record_one(&self, request: RecordUsage<'_>, connection: &mut Lent) -> Result<Recorded, StoreError> {
        // One statement when the event creates no charge; else a compare-and-set; else the
        // locking transaction. A concurrent record of the same event makes the locking one fail
        // on the event's unique index, and the next attempt answers it as a replay: two attempts
        // suffice, the third is a margin.
        let account_changed = |request: RecordUsage<'_>| {
            self.accounts.forget(&request.usage.user_id);
            Err(StoreError::AccountChanged {
                usage: Box::new(request.usage),
            })
        };
        let direct = self.try_record_direct(&request, connection).await;
        if !matches!(direct, Ok(Some(_))) {
            *connection = None;
        }
        match direct {
            Ok(Some(recorded)) => return Ok(recorded),
            // A new period, charges to create, a resend, a changed account: the ways below.
            Ok(None) => {}
            Err(RecordFailure::AccountChanged) => return account_changed(request),
            Err(RecordFailure::Store(error)) => return Err(error),
            Err(RecordFailure::Database(error)) if is_deadlock(&error) => {}
            Err(RecordFailure::Overflow) => {}
            Err(RecordFailure::Database(error)) => return Err(db(error)),
        }
        match self.try_record_fast(&request).await {
            Ok(Some(recorded)) => return Ok(recorded),
            // A new period, or a total that kept moving: the locking path.
            Ok(None) => {}
            Err(RecordFailure::AccountChanged) => return account_changed(request),
            Err(RecordFailure::Store(error)) => return Err(error),
            // A concurrent record of the same event won the unique index: answered below.
            Err(RecordFailure::Database(error)) if is_duplicate_event(&error) || is_deadlock(&error) => {}
            Err(RecordFailure::Overflow) => {}
            Err(RecordFailure::Database(error)) => return Err(db(error)),
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.try_record(&request).await {
                Ok(recorded) => return Ok(recorded),
                Err(RecordFailure::AccountChanged) => return account_changed(request),
                Err(RecordFailure::Store(error)) => return Err(error),
                Err(RecordFailure::Database(error)) if is_duplicate_event(&error) && attempts < 3 => continue,
                // The same event id sent concurrently for two periods can meet a batch holding
                // the other period row: PostgreSQL breaks the cycle, and this runs again.
                Err(RecordFailure::Database(error)) if is_deadlock(&error) && attempts < 3 => continue,
                Err(RecordFailure::Overflow) => {
                    let total = self
                        .period_summary(&request.usage.user_id, request.usage.period)
                        .await?
                        .map_or(0, |s| s.total_tokens);
                    return Err(StoreError::TotalOverflow {
                        total,
                        tokens: request.usage.tokens,
                    });
                }
                Err(RecordFailure::Database(error)) => return Err(db(error)),
            }
        }
    }

    /// [`UsageStore::recorded_event`].
    pub(super) async fn find_recorded_event(
        &self,
        user: &UserId,
        event_id: &EventId,
    ) -> Result<Option<Recorded>, StoreError> {
        let mut tx = self.begin().await?;
        let found = Self::replay_in(&mut tx, user, event_id).await?;
        tx.rollback().await.map_err(db)?;
        Ok(found)
    }
}
