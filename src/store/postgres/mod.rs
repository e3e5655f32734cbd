//! [`PostgresUsageStore`] (feature `postgres`): the original product's schema on PostgreSQL.
//!
//! This file holds the store and its one `impl UsageStore`, which hands each operation to the
//! file that owns it:
//! - `connection`: connecting, the schema migrations, transactions;
//! - `alerts`: threshold alerts, written with the events that cross them;
//! - `accounts`: saving and reading accounts, and the cache new events are placed with;
//! - `record`: recording one event (one statement, a compare-and-set, or a locking
//!   transaction) and replaying a recorded one; `record_batch`: recording a batch;
//!   `group_commit`: gathering the single events of concurrent callers into batches;
//!   `totals`: the period totals this process last wrote, which batches start from;
//! - `charges`: creating, claiming, leasing and settling charges, the summary figures they
//!   move, gateway events, and the audit entries of these writes;
//! - `holds`: spend control's holds, granted in one statement, and a period's spend state;
//! - `reports`: summaries, consumptions, usage by operation, charges by tier, the audit trail;
//! - `rows`: reading rows, converting numbers, mapping database errors.
//!
//! Statements that are fixed text and long are kept as SQL under `sql/`; those assembled from
//! parts stay beside the code that assembles them.

mod accounts;
mod alerts;
mod charges;
mod connection;
mod group_commit;
mod holds;
mod record;
mod record_batch;
mod reports;
mod rows;
mod totals;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use self::accounts::AccountCache;
use self::charges::{CLAIM_AWAITING, CLAIM_PENDING, CLAIM_RETRIES};
pub use self::connection::MIGRATIONS;
use self::group_commit::GroupCommit;
use super::{
    Account, Alert, AuditEntry, EnsureCharge, GatewayEventRecord, Hold, HoldDecision, HoldRequest, OperationUsage,
    PeriodSummary, RecordUsage, Recorded, Settlement, SpendState, StoreError, TierChargeReport, UsageStore,
};
use crate::domain::{Charge, ChargeKey, EventId, PeriodKey, UsageRecord, UserId};

/// A [`UsageStore`] on PostgreSQL, safe to share between any number of service instances.
///
/// Every write is one transaction; the period total is incremented in place (the row lock
/// serialises concurrent events of one user and period, which therefore see disjoint intervals),
/// and unique indexes make a second charge for a block, or a second record of an event,
/// impossible whatever the code does. Claims use `FOR UPDATE SKIP LOCKED`, so concurrent
/// collectors never take the same charge.
///
/// # Example
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use token_billing::{BillingService, PostgresUsageStore, SandboxGateway};
///
/// let store = PostgresUsageStore::connect("postgres://postgres@127.0.0.1/test").await?;
/// let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new())).build();
/// # let _ = billing; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresUsageStore {
    pool: PgPool,
    accounts: Arc<AccountCache>,
    group: Arc<GroupCommit>,
    totals: Arc<totals::TotalsSeen>,
    /// Whether single events go through the group commit.
    grouping: bool,
}

#[async_trait]
impl UsageStore for PostgresUsageStore {
    async fn put_account(&self, account: Account) -> Result<(), StoreError> {
        self.upsert_account(account).await
    }

    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        self.replace_stored_account(expected, account).await
    }

    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        self.read_account(user).await
    }

    async fn account_for_usage(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        self.account_to_place_usage(user).await
    }

    async fn accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
        self.read_accounts(users).await
    }

    async fn record_usage_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        self.record_batch(requests).await
    }

    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        if self.grouping {
            self.record_in_round(request).await
        } else {
            self.record_event(request).await
        }
    }

    async fn ensure_charge(&self, request: EnsureCharge) -> Result<(Charge, bool), StoreError> {
        self.ensure_one_charge(request).await
    }

    async fn claim_pending(
        &self,
        user: Option<&UserId>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_PENDING, user, now, lease_until, limit).await
    }

    async fn claim_due_retries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_RETRIES, None, now, lease_until, limit).await
    }

    async fn claim_awaiting_customer(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Charge>, StoreError> {
        self.claim(&CLAIM_AWAITING, None, now, lease_until, limit).await
    }

    async fn renew_lease(
        &self,
        user: &UserId,
        key: &ChargeKey,
        held_until: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Charge>, StoreError> {
        self.extend_lease(user, key, held_until, lease_until).await
    }

    async fn settle_charge(&self, s: Settlement<'_>) -> Result<Charge, StoreError> {
        self.settle(s).await
    }

    async fn recorded_event(&self, user: &UserId, event_id: &EventId) -> Result<Option<Recorded>, StoreError> {
        self.find_recorded_event(user, event_id).await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.append_audit_entry(entry).await
    }

    async fn gateway_event_applied(&self, user: &UserId, event_id: &str) -> Result<bool, StoreError> {
        self.gateway_event_seen(user, event_id).await
    }

    async fn record_gateway_event(&self, record: GatewayEventRecord) -> Result<bool, StoreError> {
        self.insert_gateway_event(record).await
    }

    async fn charge(&self, user: &UserId, key: &ChargeKey) -> Result<Option<Charge>, StoreError> {
        self.read_charge(user, key).await
    }

    async fn charges(&self, user: &UserId, period: PeriodKey) -> Result<Vec<Charge>, StoreError> {
        self.read_charges(user, period).await
    }

    async fn unpaid_charges(&self, user: &UserId) -> Result<Vec<Charge>, StoreError> {
        self.read_unpaid_charges(user).await
    }

    async fn consumptions(&self, user: &UserId, period: PeriodKey) -> Result<Vec<UsageRecord>, StoreError> {
        self.read_consumptions(user, period).await
    }

    async fn period_summary(&self, user: &UserId, period: PeriodKey) -> Result<Option<PeriodSummary>, StoreError> {
        self.read_period_summary(user, period).await
    }

    async fn usage_by_operation(&self, user: &UserId, period: PeriodKey) -> Result<Vec<OperationUsage>, StoreError> {
        self.read_usage_by_operation(user, period).await
    }

    async fn usage_by_model(&self, user: &UserId, period: PeriodKey) -> Result<Vec<crate::ModelUsage>, StoreError> {
        self.read_usage_by_model(user, period).await
    }

    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError> {
        self.read_charges_by_tier(user, period).await
    }

    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError> {
        self.read_audit_trail(user, period).await
    }

    async fn reserve(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        self.reserve_hold(request).await
    }

    async fn release_hold(&self, user: &UserId, period: PeriodKey, hold_id: &EventId) -> Result<bool, StoreError> {
        self.free_hold(user, period, hold_id).await
    }

    async fn spend_state(
        &self,
        user: &UserId,
        period: PeriodKey,
        now: DateTime<Utc>,
        overdue_before: Option<DateTime<Utc>>,
    ) -> Result<SpendState, StoreError> {
        self.read_spend_state(user, period, now, overdue_before).await
    }

    async fn holds(&self, user: &UserId, period: PeriodKey, now: DateTime<Utc>) -> Result<Vec<Hold>, StoreError> {
        self.open_holds(user, period, now).await
    }

    async fn raise_alert(&self, alert: Alert) -> Result<bool, StoreError> {
        self.insert_alert(alert).await
    }

    async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.read_pending_alerts(user, limit).await
    }

    async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, StoreError> {
        self.acknowledge_alert(user, alert_id).await
    }
}
