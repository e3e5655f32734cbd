//! [`SqliteUsageStore`] (feature `sqlite`): a durable store in one SQLite file, for a host on
//! one machine.
//!
//! This file holds the store and its one `impl UsageStore`, which hands each operation to the
//! file that owns it:
//! - `connection`: opening the file (write-ahead log, `synchronous = FULL`, busy timeout), the
//!   schema migrations, the write and read transactions;
//! - `accounts`: saving and reading accounts;
//! - `record`: recording one event or a batch, and replaying a recorded one;
//! - `charges`: creating, claiming, leasing and settling charges, the summary figures they
//!   move, gateway events and audit entries;
//! - `spend`: holds, spend state and alerts;
//! - `reports`: summaries, consumptions, usage by operation and by model, charges by tier, the
//!   audit trail;
//! - `rows`: instants as text, reading rows, mapping database errors.

mod accounts;
mod charges;
mod connection;
mod record;
mod reports;
mod rows;
mod spend;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqlitePool;
use tokio::sync::Mutex;

pub use self::connection::SQLITE_MIGRATIONS;
use self::connection::Writer;
use super::claims::{CLAIM_AWAITING, CLAIM_PENDING, CLAIM_RETRIES};
use super::{
    Account, Alert, AuditEntry, EnsureCharge, GatewayEventRecord, Hold, HoldDecision, HoldRequest, ModelUsage,
    OperationUsage, PeriodSummary, PlacedUsage, Placer, RecordUsage, Recorded, Settlement, SpendState, StoreError,
    TierChargeReport, UsageStore,
};
use crate::domain::{Charge, ChargeKey, EventId, PeriodKey, UsageRecord, UserId};

/// A [`UsageStore`] in one SQLite file: durable across restarts and crashes, with no database
/// server, and safe for several processes of one machine sharing the file.
///
/// Every write is one `BEGIN IMMEDIATE` transaction, which holds the database's write lock from
/// its first statement to its commit: SQLite writes one transaction at a time, so each
/// operation reads and decides in Rust what it writes, by the same rules as the other stores,
/// and concurrent events of a user see disjoint intervals. Unique keys make a second charge for
/// a block, or a second record of an event, impossible whatever the code does. Within a process,
/// writers queue for the store's one writing connection; across processes, SQLite's busy
/// timeout makes them wait for each other. Reads run beside writes, on the write-ahead log.
///
/// A commit is durable (`synchronous = FULL`): a record the store acknowledged survives the
/// process being killed and the machine losing power.
///
/// # Example
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use token_billing::{BillingService, SandboxGateway, SqliteUsageStore, UsageReport};
///
/// let dir = std::env::temp_dir().join(format!("token-billing-example-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let store = SqliteUsageStore::connect(&format!("sqlite://{}", dir.join("billing.db").display())).await?;
/// let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new())).build();
/// let outcome = billing.process_token_usage(UsageReport::new("user-1", 9_000_000, "chat")).await?;
/// assert_eq!(outcome.tier_charges.len(), 1);
/// # drop(billing); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct SqliteUsageStore {
    /// The connection every write transaction of the process goes through, one at a time.
    writer: Arc<Mutex<Writer>>,
    /// Connections for reads, which run beside the writes.
    reader: SqlitePool,
}

#[async_trait]
impl UsageStore for SqliteUsageStore {
    async fn put_account(&self, account: Account) -> Result<(), StoreError> {
        self.upsert_account(account).await
    }

    async fn replace_account(&self, expected: Option<&Account>, account: Account) -> Result<bool, StoreError> {
        self.replace_stored_account(expected, account).await
    }

    async fn account(&self, user: &UserId) -> Result<Option<Account>, StoreError> {
        self.read_account(user).await
    }

    async fn accounts(&self, users: &[UserId]) -> Result<Vec<Option<Account>>, StoreError> {
        self.read_accounts(users).await
    }

    async fn record_usage(&self, request: RecordUsage<'_>) -> Result<Recorded, StoreError> {
        self.record_event(request).await
    }

    async fn place_and_record_usage<'p>(
        &self,
        usage: UsageRecord,
        place: &mut Placer<'_, 'p>,
    ) -> Result<PlacedUsage<'p>, StoreError> {
        self.place_and_record(usage, place).await
    }

    async fn record_usage_batch(
        &self,
        requests: Vec<RecordUsage<'_>>,
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        self.record_batch(requests).await
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

    async fn usage_by_model(&self, user: &UserId, period: PeriodKey) -> Result<Vec<ModelUsage>, StoreError> {
        self.read_usage_by_model(user, period).await
    }

    async fn charges_by_tier(&self, user: &UserId, period: PeriodKey) -> Result<Vec<TierChargeReport>, StoreError> {
        self.read_charges_by_tier(user, period).await
    }

    async fn reserve(&self, request: HoldRequest<'_>) -> Result<HoldDecision, StoreError> {
        self.reserve_hold(request).await
    }

    async fn release_hold(&self, user: &UserId, period: PeriodKey, hold_id: &EventId) -> Result<bool, StoreError> {
        self.release(user, period, hold_id).await
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
        self.raise(alert).await
    }

    async fn pending_alerts(&self, user: Option<&UserId>, limit: usize) -> Result<Vec<Alert>, StoreError> {
        self.read_pending_alerts(user, limit).await
    }

    async fn ack_alert(&self, user: &UserId, alert_id: uuid::Uuid) -> Result<bool, StoreError> {
        self.acknowledge(user, alert_id).await
    }

    async fn audit_trail(&self, user: &UserId, period: Option<PeriodKey>) -> Result<Vec<AuditEntry>, StoreError> {
        self.read_audit_trail(user, period).await
    }
}
