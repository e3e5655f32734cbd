//! The SQLite store against the real SQLite engine (feature `sqlite`): the store contract, the
//! invariants as property tests, the original product's monitoring queries on its tables, and
//! a file closed and opened again. Several processes on one file, and processes killed
//! mid-write, are in `sqlite_processes.rs`.
#![cfg(feature = "sqlite")]

mod common;

use std::sync::Arc;

use common::sqlite::{fresh_path, store, url};
use common::{Harness, user};
use proptest::prelude::*;
use sqlx::Row;
use token_billing::{
    BillingService, ChargeStatus, PeriodKey, Plan, SandboxGateway, SqliteUsageStore, StoreError, UnregisteredUsers,
    UsageReport, UsageStore,
};

token_billing::usage_store_conformance!(sqlite_conformance, async { super::store().await });

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Invariants 1, 2 and 5 on SQLite: each event gets the interval after the ones before it and
    /// exactly the charges the rule gives, a re-send is answered as the original, and the audit
    /// trail lists each event once, in order.
    #[test]
    fn each_record_charges_what_the_rule_says(case in common::record_rule::cases()) {
        runtime().block_on(async {
            common::record_rule::records_charge_what_the_rule_says(&store().await, case).await
        })?;
    }
}

/// Splits `total` at `cuts` (taken modulo the total) into parts that add up to it.
fn split(total: u64, cuts: &[u64]) -> Vec<u64> {
    let mut points: Vec<u64> = cuts.iter().map(|c| c % total).filter(|c| *c > 0).collect();
    points.push(0);
    points.push(total);
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| w[1] - w[0]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Invariants 1 to 4 on SQLite, through the service: the parts of a total sent at once by
    /// several tasks (some of them twice) are each recorded once, every block from 1 to what the
    /// total owes is charged once and paid once, and the summary agrees with the charges, as if
    /// the total had come in one event.
    #[test]
    fn concurrent_parts_and_resends_bill_as_one_event(
        total in 1u64..=90_000,
        cuts in proptest::collection::vec(0u64..90_000, 0..20),
        resent in proptest::collection::vec(any::<bool>(), 20),
    ) {
        let plan = Plan::builder().included_tokens(10_000).block_size(7_000).build().expect("valid");
        runtime().block_on(async {
            let sandbox = SandboxGateway::new();
            let h = Harness::over(Arc::new(store().await), Arc::new(sandbox.clone()), sandbox, |b| b.plan(plan.clone()));
            let parts = split(total, &cuts);
            let mut sends = Vec::new();
            for (i, tokens) in parts.iter().enumerate() {
                let copies = if resent[i % resent.len()] { 2 } else { 1 };
                for _ in 0..copies {
                    let service = h.service.clone();
                    let report = UsageReport::new("racer", *tokens, "chat").event_id(format!("part-{i}"));
                    sends.push(tokio::spawn(async move { service.process_token_usage(report).await }));
                }
            }
            for send in sends {
                send.await.expect("joined").expect("recorded or answered");
            }
            let racer = user("racer");
            h.assert_period_consistent(&racer, common::november(), &plan).await;
            let consumptions = h.store.consumptions(&racer, common::november()).await.expect("consumptions");
            prop_assert_eq!(consumptions.len(), parts.len(), "each part once");
            let paid = h.succeeded_payments_by_charge();
            prop_assert!(paid.values().all(|n| *n == 1), "one payment per charge: {:?}", paid);
            Ok(())
        })?;
    }
}

/// The original product's monitoring queries run on the SQLite file as written, but for
/// `date_trunc('month', NOW())`, which SQLite spells `strftime('%Y-%m-01', 'now')`.
#[tokio::test]
async fn the_original_products_monitoring_queries_run_on_its_tables() {
    let store = Arc::new(store().await);
    let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new()))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let user_id = format!("queries-{}", uuid::Uuid::new_v4().simple());
    for (tokens, op) in [(6_000_000, "chat"), (3_000_000, "api_call"), (9_000_000, "chat")] {
        billing
            .process_token_usage(UsageReport::new(&user_id, tokens, op))
            .await
            .expect("recorded");
    }
    let month_start = "strftime('%Y-%m-01', 'now')";
    let by_operation = format!(
        "SELECT 
  operation_type,
  SUM(tokens_used) as total_tokens,
  COUNT(*) as operations
FROM token_consumption 
WHERE user_id = 'user-uuid'
  AND created_at >= {month_start}
GROUP BY operation_type;"
    )
    .replace("user-uuid", &user_id);
    let mut rows: Vec<(String, i64, i64)> = sqlx::query(&by_operation)
        .fetch_all(store.pool())
        .await
        .expect("operations query")
        .iter()
        .map(|r| (r.get("operation_type"), r.get("total_tokens"), r.get("operations")))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("api_call".to_owned(), 3_000_000, 1),
            ("chat".to_owned(), 15_000_000, 2)
        ]
    );

    let by_tier = format!(
        "SELECT 
  billing_tier,
  COUNT(*) as charges_count,
  SUM(amount_charged) as total_charged
FROM token_billing_charges 
WHERE user_id = 'user-uuid'
  AND created_at >= {month_start}
GROUP BY billing_tier;"
    )
    .replace("user-uuid", &user_id);
    let mut rows: Vec<(String, i64, i64)> = sqlx::query(&by_tier)
        .fetch_all(store.pool())
        .await
        .expect("tiers query")
        .iter()
        .map(|r| (r.get("billing_tier"), r.get("charges_count"), r.get("total_charged")))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("0-8M".to_owned(), 1, 40_000),
            ("16M-24M".to_owned(), 1, 10_000),
            ("8M-16M".to_owned(), 1, 10_000)
        ]
    );
    let summary = sqlx::query(
        "SELECT total_tokens, fixed_fee_charged, tier_charges_count, tier_charges_total, included_tokens, block_size
           FROM token_usage_summary WHERE user_id = ?1",
    )
    .bind(&user_id)
    .fetch_one(store.pool())
    .await
    .expect("the summary row");
    assert_eq!(
        (
            summary.get::<i64, _>("total_tokens"),
            summary.get::<i64, _>("fixed_fee_charged"),
            summary.get::<i64, _>("tier_charges_count"),
            summary.get::<i64, _>("tier_charges_total"),
            summary.get::<i64, _>("included_tokens"),
            summary.get::<i64, _>("block_size"),
        ),
        (18_000_000, 40_000, 2, 20_000, 8_000_000, 8_000_000)
    );
}

/// What a store wrote is there after the file is closed and opened again (the migrations run
/// again and change nothing), and an event sent again then is answered as the original, not
/// recorded or charged twice.
#[tokio::test]
async fn a_file_opened_again_keeps_everything_and_answers_resends() {
    let path = fresh_path("reopened");
    let plan = Plan::default();
    let first = SqliteUsageStore::connect(&url(&path)).await.expect("opened");
    let billing = BillingService::builder(Arc::new(first.clone()), Arc::new(SandboxGateway::new()))
        .plan(plan.clone())
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let report = || UsageReport::new("reopened", 10_000_000, "chat").event_id("evt-1");
    let original = billing.process_token_usage(report()).await.expect("recorded");
    assert_eq!(original.tier_charges.len(), 1);
    drop(billing);
    first.pool().close().await;
    drop(first);

    let again = SqliteUsageStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("opened again");
    let sandbox = SandboxGateway::new();
    let billing = BillingService::builder(Arc::new(again.clone()), Arc::new(sandbox.clone()))
        .plan(plan.clone())
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    let resent = billing.process_token_usage(report()).await.expect("answered");
    assert!(resent.replayed);
    assert_eq!(resent.consumption_id, original.consumption_id);
    assert!(sandbox.payments().is_empty(), "nothing paid again");
    let reopened = user("reopened");
    let period: PeriodKey = original.period;
    let summary = again
        .period_summary(&reopened, period)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!((summary.total_tokens, summary.events), (10_000_000, 1));
    let charges = again.charges(&reopened, period).await.expect("charges");
    assert_eq!(charges.len(), 2);
    assert!(charges.iter().all(|c| c.status == ChargeStatus::Succeeded));
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM token_billing_migrations ORDER BY version")
        .fetch_all(again.pool())
        .await
        .expect("versions");
    assert_eq!(
        versions,
        token_billing::store::SQLITE_MIGRATIONS
            .iter()
            .map(|(v, _)| *v)
            .collect::<Vec<_>>()
    );
}

/// The file is opened in the modes durability rests on: the write-ahead log and
/// `synchronous = FULL` (2), on every connection.
#[tokio::test]
async fn the_file_is_opened_with_the_write_ahead_log_and_full_sync() {
    let store = store().await;
    let mut conn = store.pool().acquire().await.expect("a connection");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .expect("journal");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .expect("sync");
    assert_eq!((journal.as_str(), synchronous), ("wal", 2));
}

/// A URL of another kind, a database in memory and a file that cannot be created are typed
/// errors, not panics.
#[tokio::test]
async fn bad_locations_are_typed_errors() {
    let Err(StoreError::Generic { source, .. }) = SqliteUsageStore::connect("postgres://not-sqlite").await else {
        panic!("a PostgreSQL URL is refused");
    };
    assert!(source.to_string().contains("not a SQLite URL"), "{source}");
    // A database in memory is one per connection: the store's reads would not see its writes.
    let Err(StoreError::Generic { source, .. }) = SqliteUsageStore::connect("sqlite::memory:").await else {
        panic!("a database in memory is refused");
    };
    assert!(source.to_string().contains("in memory"), "{source}");
    let missing_dir = fresh_path("missing").join("no-such-dir").join("billing.db");
    assert!(SqliteUsageStore::connect(&url(&missing_dir)).await.is_err());
}

/// Callers dropped at any point of their write (a client that disconnects, a host's timeout)
/// leave the store able to write, in this process and in another on the same file: no write
/// lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cancelled_at_any_point_leave_the_store_writable() {
    let path = fresh_path("cancelled");
    let store = SqliteUsageStore::connect(&url(&path)).await.expect("opened");
    let plan = Plan::default();
    for attempt in 0..3_000u64 {
        let usage = token_billing::testing::store::usage_event(
            &user(&format!("cancelled-{}", attempt % 7)),
            1_000,
            "chat",
            common::november(),
        );
        let record = store.record_usage(token_billing::store::RecordUsage {
            usage,
            plan: &plan,
            fee: token_billing::FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        });
        // Dropped after a few microseconds, somewhere in the write.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(attempt % 400), record).await;
    }
    let after = token_billing::testing::store::usage_event(&user("after"), 1_000, "chat", common::november());
    store
        .record_usage(token_billing::store::RecordUsage {
            usage: after,
            plan: &plan,
            fee: token_billing::FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        })
        .await
        .expect("the store still writes");
    // Another process's view: a second store on the file writes without waiting for a lock.
    let other = SqliteUsageStore::connect_with(
        SqliteUsageStore::options(&url(&path))
            .expect("options")
            .busy_timeout(std::time::Duration::from_secs(2)),
    )
    .await
    .expect("opened again");
    let usage = token_billing::testing::store::usage_event(&user("other"), 1_000, "chat", common::november());
    other
        .record_usage(token_billing::store::RecordUsage {
            usage,
            plan: &plan,
            fee: token_billing::FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        })
        .await
        .expect("no lock left behind");
}

/// A charge that exists is skipped before anything is checked of it, as in memory: a period
/// whose fee was charged in reais records an event rated by a plan in dollars that starts no
/// block (its fee exists), on both stores.
#[tokio::test]
async fn an_existing_charge_is_skipped_before_its_currency_is_checked() {
    let reais = Plan::default();
    let usd = |minor| token_billing::Money::from_minor(minor, token_billing::Currency::USD);
    let dollars = Plan::builder()
        .fixed_fee(usd(4_000))
        .block_price(usd(1_000))
        .zone(chrono_tz::America::Sao_Paulo)
        .build()
        .expect("valid");
    let memory = token_billing::InMemoryUsageStore::new();
    let sqlite = store().await;
    for store in [&memory as &dyn UsageStore, &sqlite] {
        let user = token_billing::testing::store::fresh_user("currency");
        let period = common::november();
        store
            .ensure_charge(token_billing::store::EnsureCharge {
                charge: token_billing::NewCharge::fixed_fee(&reais, &user, period, None),
                status: ChargeStatus::Pending,
                payment_id: None,
                now: common::nov15(),
                lease_until: None,
                plan: Some(reais.clone()),
            })
            .await
            .expect("the fee, in reais");
        let recorded = store
            .record_usage(token_billing::store::RecordUsage {
                usage: token_billing::testing::store::usage_event(&user, 1_000, "chat", period),
                plan: &dollars,
                fee: token_billing::FeeCollection::Library,
                lease_until: None,
                alerting: None,
                account: None,
            })
            .await
            .expect("recorded: the fee exists");
        assert!(recorded.charges.is_empty(), "{store:?}");
    }
}
