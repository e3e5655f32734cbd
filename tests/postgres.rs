//! The PostgreSQL store against a real PostgreSQL (feature `postgres`).
//!
//! `DATABASE_URL` names the database; without it, the local default
//! `postgres://postgres@127.0.0.1:5432/test` is used. `.ci/run` starts PostgreSQL and creates it.
#![cfg(feature = "postgres")]

mod common;

use common::pg::{schema, store, store_in};
use token_billing::PostgresUsageStore;

token_billing::usage_store_conformance!(postgres_conformance, async { super::store().await });
token_billing::usage_store_conformance!(postgres_without_group_commit_conformance, async {
    super::store().await.with_group_commit(false)
});

mod service {
    use std::sync::Arc;

    use chrono::{Duration, TimeZone, Utc};
    use token_billing::{
        BillingService, ChargeStatus, CollectionMode, ManualClock, PeriodKey, Plan, SandboxGateway, UnregisteredUsers,
        UsageReport, UsageStore, UserId,
    };
    use uuid::Uuid;

    fn fresh(tag: &str) -> String {
        format!("pg-{tag}-{}", &Uuid::new_v4().simple().to_string()[..12])
    }

    fn november() -> PeriodKey {
        PeriodKey::new(2026, 11).expect("valid")
    }

    fn instance(
        store: Arc<dyn UsageStore>,
        sandbox: &SandboxGateway,
        clock: &ManualClock,
        plan: Plan,
    ) -> BillingService {
        BillingService::builder(store, Arc::new(sandbox.clone()))
            .plan(plan)
            .clock(Arc::new(clock.clone()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build()
    }

    /// Blocks of 10,000 tokens after 10,000 included: a race crosses many boundaries.
    fn small_blocks() -> Plan {
        Plan::builder()
            .included_tokens(10_000)
            .block_size(10_000)
            .build()
            .expect("valid")
    }

    fn clock() -> ManualClock {
        ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid"))
    }

    #[tokio::test]
    async fn the_original_products_scenarios_on_postgresql() {
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let billing = instance(Arc::new(super::store().await), &sandbox, &clock, Plan::default());
        let user = fresh("original");
        let small = billing
            .process_token_usage(UsageReport::new(&user, 1_000_000, "chat"))
            .await
            .expect("recorded");
        assert!(small.tier_charges.is_empty());
        let big = billing
            .process_token_usage(UsageReport::new(&user, 10_000_000, "chat").event_id("evt-10m"))
            .await
            .expect("recorded");
        assert_eq!(big.tier_charges.len(), 1);
        assert_eq!(
            (
                big.tier_charges[0].billing_tier.as_str(),
                big.tier_charges[0].amount_charged,
                big.tier_charges[0].status
            ),
            ("8M-16M", 10_000, ChargeStatus::Succeeded)
        );
        let replay = billing
            .process_token_usage(UsageReport::new(&user, 10_000_000, "chat").event_id("evt-10m"))
            .await
            .expect("replayed");
        assert!(replay.replayed && replay.consumption_id == big.consumption_id);

        let example = instance(
            Arc::new(super::store().await),
            &sandbox,
            &clock,
            Plan::builder().included_tokens(4_000_000).build().expect("valid"),
        );
        let user = fresh("example");
        let outcome = example
            .process_token_usage(
                UsageReport::new(&user, 5_000_000, "chat").metadata_entry("conversationId", "conv-123"),
            )
            .await
            .expect("recorded");
        assert_eq!(outcome.tier_charges[0].billing_tier, "4M-12M");
        let summary = example
            .token_summary(&UserId::new(&user).expect("valid"), None)
            .await
            .expect("summary");
        assert_eq!(
            (
                summary.fixed_fee_charged,
                summary.tier_charges_total,
                summary.total_charged,
                summary.current_tier.as_str()
            ),
            (40_000, 10_000, 50_000, "4M-12M")
        );
    }

    /// Waits for the racing tasks (each answers the tokens it sent per user), lets a fresh
    /// instance collect what is left, and checks every user: the total is the sum sent, each
    /// event is counted once, blocks 1 to the number owed are charged once each, nothing is
    /// outstanding, and each charge is paid exactly once.
    async fn settle_and_check_each_block_charged_once(
        tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>,
        users: &[String],
        schema: &str,
        sandbox: &SandboxGateway,
        clock: &ManualClock,
        plan: &Plan,
    ) {
        let mut totals = vec![0u64; users.len()];
        for task in tasks {
            for (total, sent) in totals.iter_mut().zip(task.await.expect("task")) {
                *total += sent;
            }
        }
        let finisher = instance(Arc::new(super::store_in(schema).await), sandbox, clock, plan.clone());
        clock.advance(Duration::minutes(5));
        finisher.resume_pending().await.expect("resume");
        for (name, total) in users.iter().zip(totals) {
            let user = UserId::new(name).expect("valid");
            let summary = finisher.token_summary(&user, Some(november())).await.expect("summary");
            assert_eq!(summary.total_tokens, total);
            assert_eq!(
                (summary.tier_charges_count, summary.outstanding_count),
                (plan.blocks_owed(total), 0)
            );
            // Each event counted once, each block charged once, each (succeeded) charge paid once.
            crate::common::assert_period_consistent(finisher.store().as_ref(), sandbox, &user, november(), plan).await;
        }
    }

    /// Several service instances with pools of their own race on the same users across many block
    /// boundaries while others resume: each block is charged and paid exactly once, and the totals
    /// are the sums of the accepted events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn instances_with_separate_pools_race_and_collect_each_block_once() {
        let plan = small_blocks();
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let users: Vec<String> = (0..3).map(|i| fresh(&format!("race{i}"))).collect();
        let schema = super::schema().await;
        let mut tasks = Vec::new();
        for task in 0..6usize {
            let store: Arc<dyn UsageStore> = Arc::new(super::store_in(&schema).await);
            let mode = if task % 2 == 0 {
                CollectionMode::Immediate
            } else {
                CollectionMode::Deferred
            };
            let billing = BillingService::builder(store, Arc::new(sandbox.clone()))
                .plan(plan.clone())
                .clock(Arc::new(clock.clone()))
                .collection(mode)
                .unregistered_users(UnregisteredUsers::OpenCustomer)
                .build();
            let users = users.clone();
            tasks.push(tokio::spawn(async move {
                let mut sent = vec![0u64; users.len()];
                for i in 0..40usize {
                    let who = (task + i) % users.len();
                    let tokens = 1 + ((task * 7_919 + i * 104_729) % 9_000) as u64;
                    billing
                        .process_token_usage(UsageReport::new(&users[who], tokens, "chat"))
                        .await
                        .expect("recorded");
                    sent[who] += tokens;
                    if i % 10 == 0 {
                        billing.resume_pending().await.expect("resume");
                    }
                }
                sent
            }));
        }
        settle_and_check_each_block_charged_once(tasks, &users, &schema, &sandbox, &clock, &plan).await;
    }
    /// Instances recording batches race with instances recording one event at a time, on the
    /// same users, re-sending some batches: no deadlock, each event counted once, each block
    /// charged and paid once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batches_and_single_events_race_and_charge_each_block_once() {
        let plan = small_blocks();
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let users: Vec<String> = (0..4).map(|i| fresh(&format!("batch{i}"))).collect();
        let schema = super::schema().await;
        let mut tasks = Vec::new();
        for task in 0..4usize {
            let store: Arc<dyn UsageStore> = Arc::new(super::store_in(&schema).await);
            let billing = instance(store, &sandbox, &clock, plan.clone());
            let users = users.clone();
            tasks.push(tokio::spawn(async move {
                let mut sent = vec![0u64; users.len()];
                for round in 0..12usize {
                    let size = 1 + (task * 5 + round * 7) % 25;
                    let reports: Vec<(usize, u64, String)> = (0..size)
                        .map(|i| {
                            let who = (task + round + i) % users.len();
                            let tokens = 1 + ((task * 7_919 + round * 104_729 + i * 31) % 7_000) as u64;
                            (who, tokens, format!("t{task}-r{round}-e{i}"))
                        })
                        .collect();
                    let build = |(who, tokens, id): &(usize, u64, String)| {
                        UsageReport::new(&users[*who], *tokens, "chat").event_id(id.clone())
                    };
                    if task % 2 == 0 {
                        let outcomes = billing
                            .process_token_usage_batch(reports.iter().map(build).collect())
                            .await
                            .expect("a batch");
                        assert!(outcomes.iter().all(|o| o.as_ref().is_ok_and(|o| !o.replayed)));
                        if round % 3 == 0 {
                            // The same batch again: every event answered as a replay.
                            let again = billing
                                .process_token_usage_batch(reports.iter().map(build).collect())
                                .await
                                .expect("a batch");
                            assert!(again.iter().all(|o| o.as_ref().is_ok_and(|o| o.replayed)));
                        }
                    } else {
                        for report in &reports {
                            billing.process_token_usage(build(report)).await.expect("recorded");
                        }
                    }
                    for (who, tokens, _) in &reports {
                        sent[*who] += tokens;
                    }
                }
                sent
            }));
        }
        settle_and_check_each_block_charged_once(tasks, &users, &schema, &sandbox, &clock, &plan).await;
    }

    /// Two instances receive the same events at the same moment (a host's retry racing its
    /// original), one as a batch and the other as a batch or one at a time: each event is
    /// recorded once, with the other instance answered by the same consumption as a replay,
    /// and each block is charged and paid once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_same_events_sent_twice_at_once_are_recorded_once() {
        let plan = small_blocks();
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let users: Vec<String> = (0..3).map(|i| fresh(&format!("twice{i}"))).collect();
        let schema = super::schema().await;
        let first = instance(Arc::new(super::store_in(&schema).await), &sandbox, &clock, plan.clone());
        let second = instance(Arc::new(super::store_in(&schema).await), &sandbox, &clock, plan.clone());
        let mut sent = vec![0u64; users.len()];
        for round in 0..16usize {
            let events: Vec<(usize, u64, String)> = (0..1 + round % 9)
                .map(|i| {
                    (
                        (round + i) % users.len(),
                        1 + ((round * 7_919 + i * 104_729) % 9_000) as u64,
                        format!("r{round}-e{i}"),
                    )
                })
                .collect();
            let build = |(who, tokens, id): &(usize, u64, String)| {
                UsageReport::new(&users[*who], *tokens, "chat").event_id(id.clone())
            };
            let batch = first.process_token_usage_batch(events.iter().map(build).collect());
            let answers: Vec<_> = if round % 2 == 0 {
                let other = second.process_token_usage_batch(events.iter().map(build).collect());
                let (batch, other) = tokio::join!(batch, other);
                batch
                    .expect("a batch")
                    .into_iter()
                    .zip(other.expect("a batch"))
                    .collect()
            } else {
                let other = async {
                    let mut answers = Vec::new();
                    for event in &events {
                        answers.push(second.process_token_usage(build(event)).await);
                    }
                    answers
                };
                let (batch, other) = tokio::join!(batch, other);
                batch.expect("a batch").into_iter().zip(other).collect()
            };
            for (i, (a, b)) in answers.into_iter().enumerate() {
                let (a, b) = (a.expect("recorded"), b.expect("recorded"));
                assert_eq!(
                    (a.consumption_id, a.replayed != b.replayed),
                    (b.consumption_id, true),
                    "round {round}, event {i}: one record and one replay of it"
                );
            }
            for (who, tokens, _) in &events {
                sent[*who] += tokens;
            }
        }
        let task = tokio::spawn(async move { sent });
        settle_and_check_each_block_charged_once(vec![task], &users, &schema, &sandbox, &clock, &plan).await;
    }
}

mod sql {
    use std::sync::Arc;

    use proptest::prelude::*;
    use sqlx::Row;
    use token_billing::{BillingService, Plan, SandboxGateway, UnregisteredUsers, UsageReport, UsageStore, UserId};
    use uuid::Uuid;

    fn fresh(tag: &str) -> String {
        format!("pg-{tag}-{}", &Uuid::new_v4().simple().to_string()[..12])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The SQL `calculate_billing_tier` agrees with the Rust domain on random plans and totals,
        /// boundaries included.
        #[test]
        fn calculate_billing_tier_in_sql_agrees_with_rust(
            included in 0u64..=5_000_000_000,
            block in 1u64..=5_000_000_000,
            totals in proptest::collection::vec(0u64..=20_000_000_000, 1..40),
            far in 0u64..=1_000_000_000_000,
        ) {
            let plan = Plan::builder().included_tokens(included).block_size(block).build().expect("valid");
            let mut totals = totals;
            // Boundaries: the allowance, and a block edge and its neighbours.
            totals.extend([0, included, included + 1, included + block, included + block + 1, token_billing::MAX_TOKENS]);
            // Edges of a far block, where a division rounded to numeric precision would be off.
            if let Some(edge) = far
                .checked_mul(block)
                .and_then(|e| e.checked_add(included))
                .filter(|e| *e < token_billing::MAX_TOKENS)
            {
                totals.extend([edge, edge + 1]);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let sql_labels: Vec<String> = runtime.block_on(async {
                let store = super::store().await;
                let totals: Vec<i64> = totals.iter().map(|t| i64::try_from(*t).expect("fits")).collect();
                sqlx::query_scalar(
                    "SELECT calculate_billing_tier(t, $2, $3) FROM unnest($1::bigint[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
                )
                .bind(&totals)
                .bind(i64::try_from(included).expect("fits"))
                .bind(i64::try_from(block).expect("fits"))
                .fetch_all(store.pool())
                .await
                .expect("query")
            });
            let rust_labels: Vec<String> = totals.iter().map(|t| plan.tier_of(*t).expect("in range").label().to_string()).collect();
            prop_assert_eq!(sql_labels, rust_labels);
        }
    }

    #[tokio::test]
    async fn the_original_products_defaults_and_labels_hold_in_sql() {
        let store = super::store().await;
        for (tokens, label) in [
            (1_000_000, "0-8M"),
            (8_000_000, "0-8M"),
            (8_000_001, "8M-16M"),
            (10_000_000, "8M-16M"),
        ] {
            let got: String = sqlx::query_scalar("SELECT calculate_billing_tier($1)")
                .bind(tokens as i64)
                .fetch_one(store.pool())
                .await
                .expect("query");
            assert_eq!(got, label);
        }
    }

    /// The original product's "Consultas SQL Úteis", verbatim but for the user id, against data recorded by
    /// the library now.
    #[tokio::test]
    async fn the_original_products_monitoring_queries_run_verbatim() {
        let store = Arc::new(super::store().await);
        let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build();
        let user = fresh("queries");
        for (tokens, op) in [(6_000_000, "chat"), (3_000_000, "api_call"), (9_000_000, "chat")] {
            billing
                .process_token_usage(UsageReport::new(&user, tokens, op))
                .await
                .expect("recorded");
        }
        let summary = billing
            .token_summary(&UserId::new(&user).expect("valid"), None)
            .await
            .expect("summary");

        let seed_summary = "SELECT * FROM get_user_token_summary('user-uuid');".replace("user-uuid", &user);
        let row = sqlx::query(&seed_summary)
            .fetch_one(store.pool())
            .await
            .expect("summary query");
        assert_eq!(row.get::<i64, _>("total_tokens"), 18_000_000);
        assert_eq!(row.get::<String, _>("current_tier"), summary.current_tier);
        assert_eq!(row.get::<i64, _>("fixed_fee_charged"), summary.fixed_fee_charged);
        assert_eq!(row.get::<i64, _>("tier_charges_count"), 2);
        assert_eq!(row.get::<i64, _>("tier_charges_total"), summary.tier_charges_total);
        assert_eq!(row.get::<i64, _>("total_charged"), summary.total_charged);

        let by_operation = "SELECT 
  operation_type,
  SUM(tokens_used) as total_tokens,
  COUNT(*) as operations
FROM token_consumption 
WHERE user_id = 'user-uuid'
  AND created_at >= date_trunc('month', NOW())
GROUP BY operation_type;"
            .replace("user-uuid", &user);
        // The query runs as written; its SUM (numeric) is read back as text.
        let wrapped = format!(
            "SELECT operation_type, total_tokens::bigint AS total_tokens, operations FROM ({}) AS original",
            by_operation.trim_end_matches(';')
        );
        let mut rows: Vec<(String, i64, i64)> = sqlx::query(&wrapped)
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

        let by_tier = "SELECT 
  billing_tier,
  COUNT(*) as charges_count,
  SUM(amount_charged) as total_charged
FROM token_billing_charges 
WHERE user_id = 'user-uuid'
  AND created_at >= date_trunc('month', NOW())
GROUP BY billing_tier;"
            .replace("user-uuid", &user);
        let wrapped = format!(
            "SELECT billing_tier, charges_count, total_charged::text AS total_charged FROM ({}) AS original",
            by_tier.trim_end_matches(';')
        );
        let mut rows: Vec<(String, i64, String)> = sqlx::query(&wrapped)
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
                ("0-8M".to_owned(), 1, "40000".to_owned()),
                ("16M-24M".to_owned(), 1, "10000".to_owned()),
                ("8M-16M".to_owned(), 1, "10000".to_owned())
            ]
        );
    }

    /// A restricted role with the session setting of user A reads A's rows and none of B's, in
    /// every table.
    #[tokio::test]
    async fn row_level_security_shows_a_user_only_their_rows() {
        let store = Arc::new(super::store().await);
        let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .alerts(token_billing::AlertPolicy::standard())
            .build();
        let (alice, bob) = (fresh("rls-a"), fresh("rls-b"));
        for user in [&alice, &bob] {
            billing
                .process_token_usage(UsageReport::new(user, 9_000_000, "chat"))
                .await
                .expect("recorded");
            store
                .record_gateway_event(token_billing::GatewayEventRecord::applied(
                    UserId::new(user.as_str()).expect("valid"),
                    format!("evt_{user}"),
                    "invoice.paid".to_owned(),
                    chrono::Utc::now(),
                ))
                .await
                .expect("an applied event");
        }
        let mut tx = store.pool().begin().await.expect("begin");
        sqlx::query("SET LOCAL ROLE token_billing_reader")
            .execute(&mut *tx)
            .await
            .expect("role");
        sqlx::query("SELECT set_config('token_billing.user_id', $1, true)")
            .bind(&alice)
            .execute(&mut *tx)
            .await
            .expect("setting");
        for table in [
            "token_consumption",
            "token_billing_charges",
            "token_usage_summary",
            "token_billing_accounts",
            "token_billing_audit",
            "token_billing_gateway_events",
            "token_billing_alerts",
        ] {
            let mine: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE user_id = $1"))
                .bind(&alice)
                .fetch_one(&mut *tx)
                .await
                .expect("count");
            let theirs: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE user_id = $1"))
                .bind(&bob)
                .fetch_one(&mut *tx)
                .await
                .expect("count");
            let others: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE user_id <> $1"))
                .bind(&alice)
                .fetch_one(&mut *tx)
                .await
                .expect("count");
            assert!(mine > 0, "{table}: the user sees their rows");
            assert_eq!((theirs, others), (0, 0), "{table}: and nobody else's");
        }
        let summary: i64 = sqlx::query_scalar("SELECT total_tokens FROM get_user_token_summary($1, $2)")
            .bind(&bob)
            .bind(
                token_billing::Period::containing(chrono::Utc::now(), chrono_tz::America::Sao_Paulo)
                    .key()
                    .to_string(),
            )
            .fetch_one(&mut *tx)
            .await
            .expect("summary");
        assert_eq!(summary, 0, "the summary function sees only the user's rows too");
        let write = sqlx::query("DELETE FROM token_consumption").execute(&mut *tx).await;
        assert!(write.is_err(), "the restricted role cannot write");
        tx.rollback().await.expect("rollback");
    }
}

mod crashes {
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::{TimeZone, Utc};
    use token_billing::store::RecordUsage;
    use token_billing::testing::faults::{Fault, FaultyGateway, GatewayOp};
    use token_billing::{
        BillingService, EventId, FeeCollection, ManualClock, Metadata, OperationType, PaymentStatus, PeriodKey, Plan,
        SandboxGateway, StoreError, UnregisteredUsers, UsageRecord, UsageReport, UsageStore, UserId,
    };
    use uuid::Uuid;

    fn fresh(tag: &str) -> String {
        format!("pg-{tag}-{}", &Uuid::new_v4().simple().to_string()[..12])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_record_and_collect_is_resumed_by_another_instance() {
        let sandbox = SandboxGateway::new();
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid"));
        let hanging = Arc::new(FaultyGateway::new(Arc::new(sandbox.clone())));
        hanging.inject(GatewayOp::Collect, Fault::Hang, 1);
        let schema = super::schema().await;
        let crashing = BillingService::builder(Arc::new(super::store_in(&schema).await), hanging)
            .clock(Arc::new(clock.clone()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build();
        let user = fresh("crash");
        let died = tokio::time::timeout(
            Duration::from_millis(300),
            crashing.process_token_usage(UsageReport::new(&user, 8_000_001, "chat")),
        )
        .await;
        assert!(died.is_err(), "the process died while collecting");
        drop(crashing);
        assert!(sandbox.payments().is_empty());

        let survivor = BillingService::builder(Arc::new(super::store_in(&schema).await), Arc::new(sandbox.clone()))
            .clock(Arc::new(clock.clone()))
            .unregistered_users(UnregisteredUsers::OpenCustomer)
            .build();
        let user = UserId::new(&user).expect("valid");
        // Other tests share the database: look at this user's charges, not at the run's counts.
        survivor.resume_pending().await.expect("resume");
        let held = survivor.charges(&user, None).await.expect("charges");
        assert!(
            held.iter()
                .all(|c| c.attempts == 1 && c.status == token_billing::ChargeStatus::Pending),
            "the lease still holds"
        );
        clock.advance(chrono::Duration::minutes(3));
        survivor.resume_pending().await.expect("resume");
        let charges = survivor.charges(&user, None).await.expect("charges");
        assert_eq!(charges.len(), 2);
        assert!(
            charges
                .iter()
                .all(|c| c.status == token_billing::ChargeStatus::Succeeded)
        );
        for charge in survivor.charges(&user, None).await.expect("charges") {
            let paid = sandbox
                .payments_for_charge(&charge.key)
                .iter()
                .filter(|p| p.status == PaymentStatus::Succeeded)
                .count();
            assert_eq!(paid, 1);
        }
        assert_eq!(
            survivor.token_summary(&user, None).await.expect("summary").total_tokens,
            8_000_001
        );
    }

    fn event(user: &UserId, tokens: u64) -> UsageRecord {
        let id = Uuid::new_v4();
        let at = Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid");
        UsageRecord {
            consumption_id: id,
            event_id: EventId::new(id.to_string()).expect("valid"),
            user_id: user.clone(),
            period: PeriodKey::new(2026, 11).expect("valid"),
            tokens,
            operation_type: OperationType::new("chat").expect("valid"),
            client_id: None,
            metadata: Metadata::new(),
            occurred_at: at,
            occurred_at_reported: false,
            recorded_at: at,
            detail: None,
        }
    }

    /// The record transaction is stopped midway (it waits on the period's row, and its
    /// connection is terminated): nothing of it is visible afterwards, and the store reports an
    /// error instead of an outcome.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_transaction_killed_midway_leaves_nothing_half_written() {
        let store = Arc::new(super::store().await);
        let plan = Plan::default();
        let user = UserId::new(fresh("killed")).expect("valid");
        let record = |usage: UsageRecord| {
            let store = store.clone();
            let plan = plan.clone();
            async move {
                store
                    .record_usage(RecordUsage {
                        usage,
                        plan: &plan,
                        fee: FeeCollection::Library,
                        lease_until: None,
                        alerting: None,
                        account: None,
                    })
                    .await
            }
        };
        record(event(&user, 1_000)).await.expect("recorded");

        // Another session holds an uncommitted charge for block 1, so the next record, which
        // starts block 1, stops midway: after its increment of the period total, while writing
        // its charges.
        let mut blocker = store.pool().begin().await.expect("begin");
        let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *blocker)
            .await
            .expect("pid");
        sqlx::query(
            "INSERT INTO token_billing_charges
                (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                 created_at, updated_at)
             VALUES ($1, gen_random_uuid(), 'blocker', '2026-11', 'block', 1, '8M-16M', 10000, 'BRL', 'pending',
                     now(), now())",
        )
        .bind(user.as_str())
        .execute(&mut *blocker)
        .await
        .expect("blocking insert");
        let doomed = event(&user, 9_000_000);
        let doomed_id = doomed.event_id.clone();
        let pending = tokio::spawn(record(doomed));
        let mut victim = None;
        for _ in 0..250 {
            victim =
                sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))")
                    .bind(blocker_pid)
                    .fetch_optional(store.pool())
                    .await
                    .expect("activity");
            if victim.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(victim) = victim else {
            blocker.rollback().await.expect("rollback");
            panic!("the record transaction never waited on the blocker");
        };
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(victim)
            .execute(store.pool())
            .await
            .expect("terminate");
        blocker.rollback().await.expect("rollback");
        let result = pending.await.expect("task");
        assert!(
            matches!(result, Err(StoreError::Unavailable { .. } | StoreError::Generic { .. })),
            "the caller learns it failed: {result:?}"
        );

        let period = PeriodKey::new(2026, 11).expect("valid");
        let summary = store
            .period_summary(&user, period)
            .await
            .expect("summary")
            .expect("a summary");
        assert_eq!(
            (summary.total_tokens, summary.events),
            (1_000, 1),
            "the total did not move"
        );
        assert_eq!(store.consumptions(&user, period).await.expect("consumptions").len(), 1);
        assert_eq!(
            store.charges(&user, period).await.expect("charges").len(),
            1,
            "only the fee"
        );
        assert_eq!(store.recorded_event(&user, &doomed_id).await.expect("lookup"), None);
        // The host re-sends it: recorded once.
        let mut again = event(&user, 9_000_000);
        again.event_id = doomed_id;
        let recorded = record(again).await.expect("recorded");
        assert_eq!((recorded.total_after, recorded.charges.len()), (9_001_000, 1));
    }

    /// Bad input to the store and database errors surface as typed errors, and change nothing.
    #[tokio::test]
    async fn database_errors_are_typed() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://postgres@127.0.0.1:1/none")
            .expect("a lazy pool");
        let unreachable = token_billing::PostgresUsageStore::from_pool(pool);
        let error = unreachable.migrate().await;
        assert!(matches!(error, Err(StoreError::Unavailable { .. })), "{error:?}");
        let error = unreachable.account(&UserId::new("someone").expect("valid")).await;
        assert!(matches!(error, Err(StoreError::Unavailable { .. })), "{error:?}");
        let store = super::store().await;
        let user = UserId::new(fresh("typed")).expect("valid");
        let missing = token_billing::ChargeKey::new(
            &user,
            PeriodKey::new(2026, 11).expect("valid"),
            token_billing::ChargeKind::Block,
            1,
        );
        let settled = store
            .settle_charge(token_billing::store::Settlement {
                user_id: &user,
                key: &missing,
                expected_status: token_billing::ChargeStatus::Pending,
                expected_round: 0,
                status: token_billing::ChargeStatus::Succeeded,
                payment_id: None,
                failure_code: None,
                failure_message: None,
                next_retry_at: None,
                lease_until: None,
                at: Utc::now(),
            })
            .await;
        assert!(matches!(settled, Err(StoreError::NotFound { .. })), "{settled:?}");
    }
}

mod record_function {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;
    use sqlx::Row;
    use token_billing::{
        BillingService, ChargeKind, ChargeStatus, PeriodKey, Plan, SandboxGateway, TierLabel, UnregisteredUsers,
        UsageReport, UsageStore, UserId,
    };
    use uuid::Uuid;

    fn fresh(tag: &str) -> String {
        format!("pg-{tag}-{}", &Uuid::new_v4().simple().to_string()[..12])
    }

    type Bill = BTreeSet<(ChargeKind, u64, TierLabel, i64, ChargeStatus)>;

    async fn bill(store: &dyn UsageStore, user: &UserId, period: PeriodKey) -> Bill {
        store
            .charges(user, period)
            .await
            .expect("charges")
            .into_iter()
            .map(|c| (c.kind, c.block, c.billing_tier, c.amount.minor_units(), c.status))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// `record_token_consumption` in SQL and the library's record operation agree: the same
        /// events give the same charges, summary and audit trail shape, and the library collects
        /// what SQL recorded.
        #[test]
        fn the_sql_record_function_agrees_with_the_library(
            included in 0u64..50_000,
            block in 1_000u64..40_000,
            sizes in proptest::collection::vec(1u64..60_000, 1..12),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let plan = Plan::builder().included_tokens(included).block_size(block).build().expect("valid");
                let store = Arc::new(super::store().await);
                let sandbox = SandboxGateway::new();
                let billing = BillingService::builder(store.clone(), Arc::new(sandbox.clone()))
                    .plan(plan.clone())
                    .collection(token_billing::CollectionMode::Deferred)
                    .unregistered_users(UnregisteredUsers::OpenCustomer)
                    .build();
                let (by_sql, by_library) = (fresh("sqlfn"), fresh("libfn"));
                let mut period = None;
                for (i, tokens) in sizes.iter().enumerate() {
                    let row = sqlx::query(
                        "SELECT * FROM record_token_consumption($1, $2, 'chat', NULL, '{}', $3, now(), $4, $5)",
                    )
                    .bind(&by_sql)
                    .bind(i64::try_from(*tokens).expect("fits"))
                    .bind(format!("e{i}"))
                    .bind(i64::try_from(included).expect("fits"))
                    .bind(i64::try_from(block).expect("fits"))
                    .fetch_one(store.pool())
                    .await
                    .expect("recorded in SQL");
                    let outcome = billing
                        .process_token_usage(UsageReport::new(&by_library, *tokens, "chat").event_id(format!("e{i}")))
                        .await
                        .expect("recorded by the library");
                    prop_assert_eq!(row.get::<i64, _>("total_tokens"), i64::try_from(outcome.total_tokens).expect("fits"));
                    period = Some(outcome.period);
                }
                // A re-sent event is a replay in SQL too.
                let again = sqlx::query("SELECT * FROM record_token_consumption($1, $2, 'chat', NULL, '{}', 'e0', now(), $3, $4)")
                    .bind(&by_sql)
                    .bind(i64::try_from(sizes[0]).expect("fits"))
                    .bind(i64::try_from(included).expect("fits"))
                    .bind(i64::try_from(block).expect("fits"))
                    .fetch_one(store.pool())
                    .await
                    .expect("replayed");
                prop_assert!(again.get::<bool, _>("replayed"));

                let period = period.expect("a period");
                let (sql_user, lib_user) = (UserId::new(&by_sql).expect("valid"), UserId::new(&by_library).expect("valid"));
                prop_assert_eq!(bill(&*store, &sql_user, period).await, bill(&*store, &lib_user, period).await);
                let sql_summary = store.period_summary(&sql_user, period).await.expect("summary").expect("a summary");
                let lib_summary = store.period_summary(&lib_user, period).await.expect("summary").expect("a summary");
                prop_assert_eq!(
                    (sql_summary.total_tokens, sql_summary.events, sql_summary.outstanding_count, sql_summary.outstanding_total),
                    (lib_summary.total_tokens, lib_summary.events, lib_summary.outstanding_count, lib_summary.outstanding_total)
                );
                let kinds = |trail: Vec<token_billing::AuditEntry>| -> Vec<String> {
                    trail.into_iter().map(|e| serde_json::to_value(&e.event).expect("json")["type"].to_string()).collect()
                };
                let sql_trail = kinds(store.audit_trail(&sql_user, Some(period)).await.expect("the SQL audit trail reads back"));
                let lib_trail = kinds(store.audit_trail(&lib_user, Some(period)).await.expect("audit"));
                prop_assert_eq!(sql_trail, lib_trail.into_iter().filter(|k| k != "\"account_saved\"").collect::<Vec<_>>());

                // The library collects what SQL recorded, once.
                let customer: token_billing::CustomerId = "cus_sql".parse().expect("valid");
                sandbox.add_customer(customer.clone(), token_billing::CardBehaviour::Succeeds);
                billing.register_account(&sql_user, Some(customer), None).await.expect("registered");
                let collected = bill(&*store, &sql_user, period).await;
                prop_assert!(collected.iter().all(|c| c.4 == ChargeStatus::Succeeded), "{:?}", collected);
                for charge in store.charges(&sql_user, period).await.expect("charges") {
                    prop_assert_eq!(sandbox.payments_for_charge(&charge.key).len(), 1, "{} paid once", charge.key);
                }
                Ok(())
            })?;
        }
    }

    /// The original product's function takes any JSON object as metadata; the library reads
    /// values that are not texts as their JSON text, and answers a re-send of the event with
    /// those texts as the original.
    #[tokio::test]
    async fn metadata_the_sql_function_took_reads_back_and_replays() {
        let store = Arc::new(super::store().await);
        let user = fresh("sqlmeta");
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp(chrono::Utc::now().timestamp() - 60, 0)
            .expect("an instant");
        sqlx::query(
            "SELECT * FROM record_token_consumption($1, 1000, 'chat', NULL,
                 '{\"requests\": 3, \"cached\": true, \"conversation\": \"c-1\"}', 'e1', $2)",
        )
        .bind(&user)
        .bind(at)
        .fetch_one(store.pool())
        .await
        .expect("recorded by SQL");
        let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new())).build();
        let user_id = UserId::new(user.clone()).expect("valid");
        let period = token_billing::Period::containing(at, billing.default_plan().zone()).key();
        let events = store.consumptions(&user_id, period).await.expect("read back");
        let metadata: Vec<(&str, &str)> = events[0].metadata.iter().collect();
        assert_eq!(
            metadata,
            [("cached", "true"), ("conversation", "c-1"), ("requests", "3")]
        );
        let again = billing
            .process_token_usage(
                UsageReport::new(user.as_str(), 1000, "chat")
                    .event_id("e1")
                    .occurred_at(at)
                    .metadata_entry("requests", "3")
                    .metadata_entry("cached", "true")
                    .metadata_entry("conversation", "c-1"),
            )
            .await
            .expect("answered");
        assert!(again.replayed);
        assert_eq!(
            (again.consumption_id, again.total_tokens),
            (events[0].consumption_id, 1000)
        );
    }

    /// A period the library opened by charging its fee ahead of usage carries its plan's
    /// allowance and block size, so the function refuses to rate it under another plan.
    #[tokio::test]
    async fn a_period_opened_by_its_fee_is_refused_to_the_sql_function_under_another_plan() {
        let store = Arc::new(super::store().await);
        let pro = token_billing::PlanId::new("pro").expect("valid");
        let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new()))
            .add_plan(
                pro.clone(),
                Plan::builder()
                    .included_tokens(20_000_000)
                    .block_size(10_000_000)
                    .build()
                    .expect("valid"),
            )
            .build();
        let user = fresh("sqlopened");
        let user_id = UserId::new(user.clone()).expect("valid");
        billing
            .register_account(&user_id, None, Some(pro))
            .await
            .expect("on pro");
        billing
            .open_period(&user_id, None)
            .await
            .expect("opened")
            .expect("the fee");
        let default_plan = sqlx::query("SELECT * FROM record_token_consumption($1, 12000000, 'chat')")
            .bind(&user)
            .fetch_one(store.pool())
            .await;
        assert!(default_plan.is_err(), "the period is pro's, not the default plan's");
        sqlx::query(
            "SELECT * FROM record_token_consumption($1, 12000000, 'chat', p_included_tokens => 20000000,
                 p_block_size => 10000000)",
        )
        .bind(&user)
        .fetch_one(store.pool())
        .await
        .expect("pro's own allowance and blocks are taken");
    }

    #[tokio::test]
    async fn the_sql_record_function_refuses_bad_input_and_records_nothing() {
        let store = super::store().await;
        let user = fresh("sqlbad");
        for (tokens, operation) in [(0i64, "chat"), (-5, "chat"), (10, ""), (10, "has space")] {
            let result = sqlx::query("SELECT * FROM record_token_consumption($1, $2, $3)")
                .bind(&user)
                .bind(tokens)
                .bind(operation)
                .fetch_one(store.pool())
                .await;
            assert!(result.is_err(), "{tokens} {operation:?}");
        }
        sqlx::query("SELECT * FROM record_token_consumption($1, 10, 'chat', NULL, '{}', 'dup')")
            .bind(&user)
            .fetch_one(store.pool())
            .await
            .expect("recorded");
        let conflict = sqlx::query("SELECT * FROM record_token_consumption($1, 11, 'chat', NULL, '{}', 'dup')")
            .bind(&user)
            .fetch_one(store.pool())
            .await;
        assert!(conflict.is_err(), "an event id re-used for different usage");
        for (call, why) in [
            (
                "SELECT * FROM record_token_consumption($1, 10, 'chat', NULL, '{}', 'p', now(), 4000000)",
                "another plan",
            ),
            (
                "SELECT * FROM record_token_consumption($1, 10, 'chat', NULL, '{}', 'c', now(), 8000000, 8000000, 40000, 10000, 'XXX')",
                "unknown currency",
            ),
            (
                "SELECT * FROM record_token_consumption($1, 10, 'chat', NULL, '{}', 'f', now() + interval '1 hour')",
                "future",
            ),
            (
                "SELECT * FROM record_token_consumption($1, 10, 'chat', NULL, '{}', 'l', now() - interval '100 days')",
                "too late",
            ),
        ] {
            let refused = sqlx::query(call).bind(&user).fetch_one(store.pool()).await;
            assert!(refused.is_err(), "{why}");
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM token_consumption WHERE user_id = $1")
            .bind(&user)
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(count, 1);
    }
}

/// The audit trail's usage entries come from the consumptions themselves (migration 7), except
/// for those written with an audit row of their own (before it, or by the SQL function): every
/// way of recording lists each event once, in order.
/// A store on a fresh schema and a service over it that opens customers for unknown users and
/// leaves charges pending (no collection on the recording path).
async fn deferred_service() -> (std::sync::Arc<PostgresUsageStore>, token_billing::BillingService) {
    use std::sync::Arc;
    use token_billing::{BillingService, CollectionMode, SandboxGateway, UnregisteredUsers};

    let store = Arc::new(store().await);
    let billing = BillingService::builder(store.clone(), Arc::new(SandboxGateway::new()))
        .collection(CollectionMode::Deferred)
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    (store, billing)
}

#[tokio::test]
async fn every_way_of_recording_lists_each_event_once_in_the_audit_trail() {
    use token_billing::{AuditEvent, UsageReport};

    let (store, billing) = deferred_service().await;
    let user = format!("trail-{}", uuid::Uuid::new_v4().simple());
    let by_sql = |event: &'static str, tokens: i64| {
        let (store, user) = (store.clone(), user.clone());
        async move {
            sqlx::query("SELECT * FROM record_token_consumption($1, $2, 'chat', NULL, '{}', $3)")
                .bind(&user)
                .bind(tokens)
                .bind(event)
                .fetch_one(store.pool())
                .await
                .expect("recorded in SQL");
        }
    };
    by_sql("s1", 5_000_000).await;
    let one = billing
        .process_token_usage(UsageReport::new(&user, 1_000, "chat").event_id("l1"))
        .await
        .expect("one event, no charge");
    billing
        .process_token_usage(UsageReport::new(&user, 4_000_000, "chat").event_id("l2"))
        .await
        .expect("one event starting a block");
    let batch = billing
        .process_token_usage_batch(vec![
            UsageReport::new(&user, 9_000_000, "chat").event_id("b1"),
            UsageReport::new(&user, 2_000, "chat").event_id("b2"),
        ])
        .await
        .expect("a batch");
    assert!(batch.iter().all(Result::is_ok));
    by_sql("s2", 3_000).await;
    billing
        .process_token_usage(UsageReport::new(&user, 1_000, "chat").event_id("l1"))
        .await
        .expect("a resend records nothing");

    let user_id = token_billing::UserId::new(user.clone()).expect("valid");
    let trail = billing.audit_trail(&user_id, Some(one.period)).await.expect("trail");
    let usage: Vec<(String, u64)> = trail
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::UsageRecorded {
                event_id, total_after, ..
            } => Some((event_id.to_string(), *total_after)),
            _ => None,
        })
        .collect();
    let expected = [
        ("s1", 5_000_000),
        ("l1", 5_001_000),
        ("l2", 9_001_000),
        ("b1", 18_001_000),
        ("b2", 18_003_000),
        ("s2", 18_006_000),
    ];
    assert_eq!(
        usage,
        expected.map(|(id, total)| (id.to_owned(), total)).to_vec(),
        "{trail:#?}"
    );
    // A charge sits beside the event that created it (l2 starts block 1, b1 block 2): after
    // the event before, before the event after.
    let position =
        |wanted: &dyn Fn(&AuditEvent) -> bool| trail.iter().position(|e| wanted(&e.event)).expect("in the trail");
    let event = |id: &'static str| {
        position(&move |e| matches!(e, AuditEvent::UsageRecorded { event_id, .. } if event_id.as_str() == id))
    };
    let block = |n: &'static str| {
        position(&move |e| matches!(e, AuditEvent::ChargeCreated { key, .. } if key.as_str().ends_with(n)))
    };
    let (block_1, block_2) = (block(":block:1"), block(":block:2"));
    assert!(event("l1") < block_1 && block_1 < event("b1"), "{trail:#?}");
    assert!(event("l2") < block_2 && block_2 < event("b2"), "{trail:#?}");
}

mod record_paths {
    use proptest::prelude::*;

    use crate::common::record_rule::{cases, records_charge_what_the_rule_says};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whichever way the store takes for an event (one statement when it creates no charge,
        /// a compare-and-set, the locking transaction), each event gets the interval after the
        /// ones before it and exactly the charges the library's rule gives for that interval,
        /// and a resend is answered as the original. A case whose period row exists before its
        /// first event (`opened`) makes that event take a way that finds the row.
        #[test]
        fn every_record_path_charges_what_the_rule_says(case in cases()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async { records_charge_what_the_rule_says(&super::store().await, case).await })?;
        }
    }
}

mod schema {
    use sqlx::Row;

    /// Applying the migrations twice, through `migrate` or as plain SQL files, is harmless.
    #[tokio::test]
    async fn migrations_can_be_applied_twice() {
        let schema = super::schema().await;
        let store = super::store_in(&schema).await;
        store.migrate().await.expect("again through migrate");
        for (version, sql) in token_billing::store::MIGRATIONS {
            sqlx::raw_sql(sql)
                .execute(store.pool())
                .await
                .unwrap_or_else(|e| panic!("migration {version} applied a second time: {e}"));
        }
        let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM token_billing_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("versions");
        assert_eq!(
            versions,
            (1..=i32::try_from(token_billing::store::MIGRATIONS.len()).expect("few")).collect::<Vec<_>>()
        );
    }

    /// Every primary key and unique index leads with user_id, so the schema distributes by user.
    #[tokio::test]
    async fn every_key_leads_with_user_id() {
        let store = super::store().await;
        let rows = sqlx::query(
            "SELECT t.relname AS table_name, i.relname AS index_name, a.attname AS first_column
               FROM pg_index x
               JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_class t ON t.oid = x.indrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
               JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0]
              WHERE n.nspname = current_schema() AND (x.indisunique OR x.indisprimary)
                AND t.relname LIKE 'token_%' AND t.relname <> 'token_billing_migrations'",
        )
        .fetch_all(store.pool())
        .await
        .expect("catalogue");
        assert!(rows.len() >= 8, "the keys are there: {}", rows.len());
        for row in rows {
            let (table, index, first): (String, String, String) =
                (row.get("table_name"), row.get("index_name"), row.get("first_column"));
            assert_eq!(first, "user_id", "{table}.{index}");
        }
    }

    /// The database itself refuses a second charge for a block, whatever the code does.
    #[tokio::test]
    async fn the_database_enforces_one_charge_per_block() {
        let store = super::store().await;
        let insert = "INSERT INTO token_billing_charges
                (user_id, id, charge_key, period, kind, block, billing_tier, amount_charged, currency, status,
                 created_at, updated_at)
             VALUES ('u', gen_random_uuid(), $1, '2026-11', 'block', 1, '8M-16M', 10000, 'BRL', 'pending', now(), now())";
        sqlx::query(insert)
            .bind("key-a")
            .execute(store.pool())
            .await
            .expect("first");
        let second = sqlx::query(insert).bind("key-b").execute(store.pool()).await;
        let code = match second {
            Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
            other => panic!("a second charge for the block was accepted: {other:?}"),
        };
        assert_eq!(code.as_deref(), Some("23505"));
    }
}

#[tokio::test]
async fn a_batch_whose_earlier_event_cannot_be_read_back_answers_that_event_alone() {
    use token_billing::UsageReport;

    let (store, billing) = deferred_service().await;
    let user = format!("unreadable-{}", uuid::Uuid::new_v4().simple());
    billing
        .process_token_usage(UsageReport::new(&user, 1_000, "chat").event_id("old"))
        .await
        .expect("recorded");
    // The stored event no longer reads back as an event (its metadata holds a number).
    sqlx::query("UPDATE token_consumption SET metadata = '{\"model\": 1}' WHERE user_id = $1 AND event_id = 'old'")
        .bind(&user)
        .execute(store.pool())
        .await
        .expect("metadata changed behind the store's back");

    // The batch is written before the re-sent event is read back: its failure is that event's
    // answer, and the new event's answer says it was recorded, so nothing is sent twice.
    let answers = billing
        .process_token_usage_batch(vec![
            UsageReport::new(&user, 1_000, "chat").event_id("old"),
            UsageReport::new(&user, 2_000, "chat").event_id("new"),
        ])
        .await
        .expect("answered event by event");
    assert!(answers[0].is_err(), "{answers:?}");
    let new = answers[1].as_ref().expect("the new event is recorded");
    assert_eq!(new.total_tokens, 3_000);
    assert!(!new.replayed);
    let again = billing
        .process_token_usage(UsageReport::new(&user, 2_000, "chat").event_id("new"))
        .await
        .expect("a re-send");
    assert!(again.replayed);
    assert_eq!(again.consumption_id, new.consumption_id);
    let user_id = token_billing::UserId::new(user).expect("valid");
    let summary = billing.token_summary(&user_id, None).await.expect("a summary");
    assert_eq!(summary.total_tokens, 3_000);
}

#[tokio::test]
async fn an_instance_records_with_the_account_another_instance_changed_since_it_cached_it() {
    use std::sync::Arc;
    use token_billing::{
        BillingService, CollectionMode, CustomerId, Plan, PlanId, SandboxGateway, UsageReport, UserId,
    };

    // Two instances of a host: each its own store (and account cache) on the same database.
    let schema = schema().await;
    let small = PlanId::new("small-blocks").expect("a plan id");
    let small_blocks = Plan::builder()
        .included_tokens(0)
        .block_size(1_000)
        .build()
        .expect("a plan");
    let instance = |store: PostgresUsageStore| {
        BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
            .collection(CollectionMode::Deferred)
            .add_plan(small.clone(), small_blocks.clone())
            .build()
    };
    let (a, b) = (instance(store_in(&schema).await), instance(store_in(&schema).await));
    let user = UserId::new(format!("cached-{}", uuid::Uuid::new_v4().simple())).expect("a user id");
    let customer = CustomerId::new("cus_cached").expect("a customer id");
    // The first instance saves the account, and keeps it, on the default plan.
    a.register_account(&user, Some(customer.clone()), None)
        .await
        .expect("registered on the default plan");
    // The other instance moves the user to blocks of 1,000 tokens with none included.
    b.register_account(&user, Some(customer), Some(small.clone()))
        .await
        .expect("moved to small blocks before any usage");

    // The first instance records with the account as it is: 2,000 tokens on small blocks owe
    // two blocks, which the default plan (8,000,000 tokens included) would not.
    let outcome = a
        .process_token_usage(UsageReport::new(user.as_str(), 2_000, "chat").event_id("e1"))
        .await
        .expect("recorded");
    assert_eq!(outcome.total_tokens, 2_000);
    assert_eq!(outcome.tier_charges.len(), 2, "{outcome:?}");
    let resent = a
        .process_token_usage(UsageReport::new(user.as_str(), 2_000, "chat").event_id("e1"))
        .await
        .expect("a re-send");
    assert!(resent.replayed);
    assert_eq!(resent.consumption_id, outcome.consumption_id);
    let summary = b.token_summary(&user, None).await.expect("a summary");
    assert_eq!(summary.total_tokens, 2_000, "recorded once");
}

#[tokio::test]
async fn a_record_placed_with_an_account_that_changed_since_writes_nothing_and_gives_the_event_back() {
    use token_billing::store::{Account, RecordUsage, StoreError, UsageStore};
    use token_billing::testing::store::{base_instant, fresh_user, usage_event};
    use token_billing::{FeeCollection, PeriodKey, Plan, PlanId};

    let store = store().await;
    let user = fresh_user("changed");
    let period = PeriodKey::new(2026, 11).expect("a period");
    let plan = Plan::default();
    let read = Account {
        user_id: user.clone(),
        customer_id: None,
        plan_id: PlanId::new("default").expect("a plan id"),
        earlier_plans: Vec::new(),
        subscription_id: None,
        limits: None,
        created_at: base_instant(),
        updated_at: base_instant(),
    };
    store.put_account(read.clone()).await.expect("saved");
    let record = |usage, account| {
        let store = &store;
        let plan = &plan;
        async move {
            store
                .record_usage(RecordUsage {
                    usage,
                    plan,
                    fee: FeeCollection::Library,
                    lease_until: None,
                    alerting: None,
                    account,
                })
                .await
        }
    };
    // The period is open: the next small event would be recorded by the one-statement path.
    record(usage_event(&user, 1_000, "chat", period), Some(&read))
        .await
        .expect("recorded with the account as stored");

    let changed = Account {
        customer_id: Some(token_billing::CustomerId::new("cus_new").expect("a customer id")),
        // Finer than the microseconds PostgreSQL keeps: compared as stored all the same.
        updated_at: base_instant() + chrono::Duration::nanoseconds(1_000_001_234),
        ..read.clone()
    };
    store.put_account(changed.clone()).await.expect("changed");
    let before = store
        .period_summary(&user, period)
        .await
        .expect("read")
        .expect("a summary");
    let charges = store.charges(&user, period).await.expect("read");
    // One event without charges (the one-statement path), one that starts a block (the
    // compare-and-set path), one in a period not opened yet (no period row).
    let later = PeriodKey::new(2026, 12).expect("a period");
    for usage in [
        usage_event(&user, 1_000, "chat", period),
        usage_event(&user, 8_000_000, "chat", period),
        usage_event(&user, 1_000, "chat", later),
    ] {
        match record(usage.clone(), Some(&read)).await {
            Err(StoreError::AccountChanged { usage: back }) => assert_eq!(*back, usage),
            other => panic!("expected AccountChanged, got {other:?}"),
        }
        assert_eq!(store.recorded_event(&user, &usage.event_id).await.expect("read"), None);
    }
    let after = store
        .period_summary(&user, period)
        .await
        .expect("read")
        .expect("a summary");
    assert_eq!(after, before, "nothing written");
    assert_eq!(store.period_summary(&user, later).await.expect("read"), None);
    assert_eq!(store.charges(&user, period).await.expect("read"), charges);

    // Placed with the account as it is, the same events are recorded.
    let recorded = record(usage_event(&user, 8_000_000, "chat", period), Some(&changed))
        .await
        .expect("recorded with the account as stored");
    assert!(!recorded.charges.is_empty());
}

#[tokio::test]
async fn a_late_event_refused_by_a_kept_account_is_placed_again_with_the_account_as_it_is() {
    use std::sync::Arc;
    use std::time::Duration;
    use token_billing::{
        BillingService, CollectionMode, CustomerId, ManualClock, Plan, PlanId, SandboxGateway, UsageReport, UserId,
    };

    let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().expect("an instant");
    let clock = Arc::new(ManualClock::new(at("2026-11-10T12:00:00Z")));
    let schema = schema().await;
    let long = PlanId::new("long-grace").expect("a plan id");
    let instance = |store: PostgresUsageStore| {
        BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
            .clock(clock.clone())
            .collection(CollectionMode::Deferred)
            // The default plan takes late usage for an hour after its period; the other for
            // the library's default three days.
            .plan(
                Plan::builder()
                    .late_usage_grace(Duration::from_secs(3_600))
                    .build()
                    .expect("a plan"),
            )
            .add_plan(long.clone(), Plan::default())
            .build()
    };
    let (a, b) = (instance(store_in(&schema).await), instance(store_in(&schema).await));
    let user = UserId::new(format!("late-{}", uuid::Uuid::new_v4().simple())).expect("a user id");
    let customer = CustomerId::new("cus_late").expect("a customer id");
    a.register_account(&user, Some(customer.clone()), None)
        .await
        .expect("registered on the one-hour plan");
    clock.set(at("2026-11-20T12:00:00Z"));
    b.register_account(&user, Some(customer), Some(long))
        .await
        .expect("moved to the three-day plan before any usage in November");

    // Two days and a half after November ended, wherever the plan's zone is. The first instance
    // still keeps the account on the one-hour plan, which would refuse this November event;
    // November's plan as it is now takes it.
    clock.set(at("2026-12-03T12:00:00Z"));
    let outcome = a
        .process_token_usage(
            UsageReport::new(user.as_str(), 1_000, "chat")
                .event_id("late")
                .occurred_at(at("2026-11-15T12:00:00Z")),
        )
        .await
        .expect("taken within the grace of November's plan");
    assert_eq!(outcome.period.to_string(), "2026-11");
    assert_eq!(outcome.total_tokens, 1_000);
}

/// Two instances changing one account at once (one its customer, the other its plan) both
/// take effect: each saves over the account it read, and registers again over the other's
/// change when it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_account_lose_neither_change() {
    use std::sync::Arc;
    use token_billing::{BillingService, CustomerId, ManualClock, Plan, PlanId, SandboxGateway, UserId};

    let clock = Arc::new(ManualClock::new("2026-11-10T12:00:00Z".parse().expect("an instant")));
    let schema = schema().await;
    let pro = PlanId::new("pro").expect("a plan id");
    let instance = |store: PostgresUsageStore| {
        BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
            .clock(clock.clone())
            .add_plan(
                pro.clone(),
                Plan::builder().included_tokens(20_000_000).build().expect("a plan"),
            )
            .build()
    };
    let (a, b) = (instance(store_in(&schema).await), instance(store_in(&schema).await));
    for n in 0..20 {
        let user = UserId::new(format!("both-{n}-{}", uuid::Uuid::new_v4().simple())).expect("a user id");
        a.register_account(&user, Some(CustomerId::new("cus_first").expect("valid")), None)
            .await
            .expect("registered");
        let card = CustomerId::new("cus_new_card").expect("valid");
        let (customer, plan) = tokio::join!(
            a.register_account(&user, Some(card.clone()), None),
            b.register_account(&user, None, Some(pro.clone())),
        );
        customer.expect("the new customer");
        plan.expect("the new plan");
        let stored = a.store().account(&user).await.expect("read").expect("an account");
        assert_eq!(
            (stored.customer_id.as_ref(), stored.plan_id.as_str()),
            (Some(&card), "pro"),
            "round {n}"
        );
    }
}

/// Group commit: single events recorded at the same time by many tasks are gathered into
/// rounds, one transaction each; a round that fails, before it writes or after its commit (its
/// answer lost), loses and doubles no caller's event: each is recorded again on its own, and a
/// committed one is answered as a re-send.
mod group_commit {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use token_billing::store::RecordUsage;
    use token_billing::testing::store::{fresh_user, usage_event};
    use token_billing::{ChargeKind, FeeCollection, PeriodKey, Plan, UsageStore, UserId};

    fn small_blocks() -> Plan {
        Plan::builder()
            .included_tokens(10_000)
            .block_size(10_000)
            .build()
            .expect("valid")
    }

    /// The blocks charged to `user` in `period`, in order.
    async fn blocks_charged(store: &token_billing::PostgresUsageStore, user: &UserId, period: PeriodKey) -> Vec<u64> {
        let mut blocks: Vec<u64> = store
            .charges(user, period)
            .await
            .expect("charges")
            .iter()
            .filter(|c| c.kind == ChargeKind::Block)
            .map(|c| c.block)
            .collect();
        blocks.sort_unstable();
        blocks
    }

    /// Records `usage` on a task of its own, placed with `plan` and `account`, as one caller of
    /// a host would.
    fn spawn_record(
        store: &Arc<token_billing::PostgresUsageStore>,
        usage: token_billing::UsageRecord,
        plan: Arc<Plan>,
        account: Option<token_billing::store::Account>,
    ) -> tokio::task::JoinHandle<Result<token_billing::store::Recorded, token_billing::StoreError>> {
        let store = Arc::clone(store);
        tokio::spawn(async move {
            store
                .record_usage(RecordUsage {
                    usage,
                    plan: &plan,
                    fee: FeeCollection::Library,
                    lease_until: None,
                    alerting: None,
                    account: account.as_ref(),
                })
                .await
        })
    }

    /// 64 events of 4 users, sent at once by 64 tasks, with the round that forms failing as
    /// `after_commit` says; then every caller has its answer and every event is recorded once.
    async fn a_failed_round_loses_and_doubles_nothing(after_commit: bool) {
        let store = Arc::new(super::store().await.with_group_commit(true));
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let users: Vec<UserId> = (0..4).map(|_| fresh_user("round")).collect();
        store.fail_next_round(after_commit);
        let mut sent: BTreeMap<UserId, u64> = BTreeMap::new();
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let user = users[usize::try_from(i % 4).expect("small")].clone();
            let tokens = 1_000 + i * 37;
            *sent.entry(user.clone()).or_default() += tokens;
            let mut usage = usage_event(&user, tokens, "chat", period);
            if i % 2 == 1 {
                // An event sent without the host's id: its consumption id stands in.
                usage.event_id = token_billing::EventId::new(usage.consumption_id.to_string()).expect("an id");
                assert!(!usage.has_host_event_id());
            }
            tasks.push(spawn_record(&store, usage, Arc::clone(&plan), None));
        }
        for task in tasks {
            let recorded = task.await.expect("joined").expect("every caller is answered its event");
            assert!(
                !recorded.replayed,
                "each caller's own event, even where the round's commit answer was lost"
            );
        }
        assert!(
            !store.round_failure_pending(),
            "a round of several events formed, and failed"
        );
        for (user, tokens) in &sent {
            let consumptions = store.consumptions(user, period).await.expect("consumptions");
            assert_eq!(consumptions.len(), 16, "{user}: each event once");
            let summary = store
                .period_summary(user, period)
                .await
                .expect("read")
                .expect("a summary");
            assert_eq!((summary.total_tokens, summary.events), (*tokens, 16), "{user}");
            assert_eq!(
                blocks_charged(&store, user, period).await,
                (1..=plan.blocks_owed(*tokens)).collect::<Vec<_>>(),
                "{user}"
            );
        }
    }

    /// A round whose task stops midway (here its runtime shuts down) answers its callers that
    /// the store is unavailable, and leaves the store recording: the next caller starts a round.
    #[test]
    fn a_round_task_stopped_midway_leaves_the_store_recording() {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime")
        };
        let main = runtime();
        let store = Arc::new(main.block_on(super::store()).with_group_commit(true));
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("stopped");
        let record = |store: Arc<token_billing::PostgresUsageStore>, plan: Arc<Plan>, user: UserId| async move {
            store
                .record_usage(RecordUsage {
                    usage: usage_event(&user, 1_000, "chat", period),
                    plan: &plan,
                    fee: FeeCollection::Library,
                    lease_until: None,
                    alerting: None,
                    account: None,
                })
                .await
        };
        // The first caller's round runs on a runtime of its own, which is shut down under it.
        let doomed = runtime();
        store.hang_next_round();
        let caller = doomed.spawn(record(Arc::clone(&store), Arc::clone(&plan), user.clone()));
        // Once its round has started (and hangs), the runtime goes.
        let started = std::time::Instant::now();
        while store.round_hang_pending() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the round started"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        doomed.shutdown_timeout(std::time::Duration::from_secs(1));
        assert!(
            main.block_on(caller).is_err(),
            "the caller's task stopped with its runtime"
        );
        let next = main.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), record(store, plan, user)).await
        });
        assert!(next.expect("a round started for the next caller").is_ok(), "recorded");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_failing_before_it_writes_loses_and_doubles_nothing() {
        a_failed_round_loses_and_doubles_nothing(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_whose_commit_answer_is_lost_loses_and_doubles_nothing() {
        a_failed_round_loses_and_doubles_nothing(true).await;
    }

    /// Sends `usages` at once, each on its own task placed with the account beside it, and
    /// answers each event's outcome, in order; asserts that a round of several events formed
    /// and that no round failed (so that no event was recorded by the one-by-one fallback).
    async fn sent_at_once(
        store: &Arc<token_billing::PostgresUsageStore>,
        plan: &Arc<Plan>,
        usages: Vec<(token_billing::UsageRecord, Option<token_billing::store::Account>)>,
    ) -> Vec<Result<token_billing::store::Recorded, token_billing::StoreError>> {
        let (before, failed) = (store.rounds_of_several_events(), store.failed_rounds());
        let tasks: Vec<_> = usages
            .into_iter()
            .map(|(usage, account)| spawn_record(store, usage, Arc::clone(plan), account))
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("joined"));
        }
        assert!(
            store.rounds_of_several_events() > before,
            "the events were recorded in a round of several"
        );
        assert_eq!(store.failed_rounds(), failed, "no round failed");
        outcomes
    }

    /// A group-commit store in a schema of its own, on a pool made by `pool`, its connections
    /// named `application_name` on the server.
    async fn store_on(
        pool: sqlx::postgres::PgPoolOptions,
        application_name: &str,
    ) -> Arc<token_billing::PostgresUsageStore> {
        use std::str::FromStr;

        let schema = super::schema().await;
        let options = sqlx::postgres::PgConnectOptions::from_str(&super::common::pg::database_url())
            .expect("a valid DATABASE_URL")
            .options([("search_path", schema.as_str())])
            .application_name(application_name);
        let store = token_billing::PostgresUsageStore::from_pool(pool.connect_with(options).await.expect("connect"));
        store.migrate().await.expect("migrate");
        Arc::new(store.with_group_commit(true))
    }

    /// Has the server end every session named `application_name`, and waits until they ended.
    async fn close_connections_named(application_name: &str) {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&super::common::pg::database_url())
            .await
            .expect("connect");
        sqlx::query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1")
            .bind(application_name)
            .execute(&admin)
            .await
            .expect("closed");
        admin.close().await;
    }

    /// Waits, by polling, until `done`.
    fn until(done: &dyn Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A round task keeps one connection from round to round, and gives it back before anything
    /// of the round takes one from the pool (a round of one event, the originals of re-sent
    /// events): on a pool of a single connection, every caller is answered, none waiting for a
    /// connection the task holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_task_never_holds_two_of_the_pools_connections() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(2));
        let store = store_on(pool, "tb-one-connection").await;
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let event = || usage_event(&fresh_user("one-connection"), 1_000, "chat", period);
        let send = |usage| spawn_record(&store, usage, Arc::clone(&plan), None);
        let original = event();
        send(original.clone()).await.expect("joined").expect("recorded");
        // One task runs the rounds below, each held until the next waits behind it: one event,
        // two events (on the connection the task then keeps), one event alone (on the pool's
        // connection), and a re-send beside a new event (its original read from the pool).
        store.hold_next_round();
        let mut tasks = vec![send(event())];
        until(&|| !store.round_hold_pending());
        let waiting = |tasks: &mut Vec<_>, usages: Vec<token_billing::UsageRecord>| {
            for (n, usage) in usages.into_iter().enumerate() {
                tasks.push(send(usage));
                until(&|| store.waiting_events() == n + 1);
            }
        };
        waiting(&mut tasks, vec![event(), event()]);
        store.hold_next_round();
        store.release_held_round();
        until(&|| !store.round_hold_pending());
        waiting(&mut tasks, vec![event()]);
        store.hold_next_round();
        store.release_held_round();
        until(&|| !store.round_hold_pending());
        let mut resent = original.clone();
        resent.consumption_id = uuid::Uuid::new_v4();
        waiting(&mut tasks, vec![resent, event()]);
        let rounds = store.rounds_of_several_events();
        store.release_held_round();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("joined").expect("every caller is answered"));
        }
        assert_eq!(
            store.rounds_of_several_events(),
            rounds + 1,
            "the re-send met a new event"
        );
        let replayed: Vec<bool> = answers.iter().map(|a| a.replayed).collect();
        assert_eq!(replayed, [false, false, false, false, true, false]);
        assert_eq!(
            answers[4].usage.consumption_id, original.consumption_id,
            "the original's answer"
        );
    }

    /// A lone caller's events are recorded one after another by one task, on the connection it
    /// keeps. When the server closes that connection between two events, the next is recorded
    /// on one of the pool's all the same: answered as its own record, recorded once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_event_on_a_connection_the_server_closed_is_recorded_on_another() {
        use sqlx::postgres::PgPoolOptions;

        let name = format!("tb-closed-one-{}", uuid::Uuid::new_v4().simple());
        let store = store_on(PgPoolOptions::new().max_connections(4), &name).await;
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("closed-one");
        // The period is open (its fee charged): the events below are recorded in one statement.
        let usage = || usage_event(&user, 100, "chat", period);
        spawn_record(&store, usage(), Arc::clone(&plan), None)
            .await
            .expect("joined")
            .expect("opened");
        // One task records the two events below, held before each: the first on a connection it
        // then keeps, the second once the server closed that connection.
        store.hold_next_round();
        let (first, second) = (usage(), usage());
        let mut tasks = vec![spawn_record(&store, first.clone(), Arc::clone(&plan), None)];
        until(&|| !store.round_hold_pending());
        tasks.push(spawn_record(&store, second.clone(), Arc::clone(&plan), None));
        until(&|| store.waiting_events() == 1);
        store.hold_next_round();
        store.release_held_round();
        until(&|| !store.round_hold_pending());
        close_connections_named(&name).await;
        store.release_held_round();
        for (task, sent) in tasks.into_iter().zip([&first, &second]) {
            let recorded = task.await.expect("joined").expect("recorded");
            assert!(!recorded.replayed, "its own record");
            assert_eq!(recorded.usage.consumption_id, sent.consumption_id);
        }
        let consumptions = store.consumptions(&user, period).await.expect("read");
        assert_eq!(consumptions.len(), 3, "each event once");
    }

    /// The task that stays for a lone caller's next event gives its connection back to the
    /// pool soon after the last one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_callers_connection_goes_back_to_the_pool_after_its_last_event() {
        let store = store_on(sqlx::postgres::PgPoolOptions::new().max_connections(4), "tb-lone").await;
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("lone");
        for _ in 0..20 {
            spawn_record(&store, usage_event(&user, 100, "chat", period), Arc::clone(&plan), None)
                .await
                .expect("joined")
                .expect("recorded");
        }
        let pool = store.pool();
        until(&|| pool.num_idle() == usize::try_from(pool.size()).expect("small"));
    }

    /// A round task records its rounds on one connection, kept from round to round. When the
    /// server closes it between two rounds, the round that meets it fails, its events are each
    /// recorded on their own (none lost, none twice), and the round after it takes another
    /// connection from the pool instead of failing too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_on_a_connection_the_server_closed_loses_nothing_and_the_next_takes_another() {
        use sqlx::postgres::PgPoolOptions;

        // Named, so that its connections can be told apart on the server.
        let name = format!("tb-closed-{}", uuid::Uuid::new_v4().simple());
        let store = store_on(PgPoolOptions::new().max_connections(4), &name).await;
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let first = usage_event(&fresh_user("closed"), 1_000, "chat", period);
        let mut events = vec![first.clone()];
        let mut tasks = Vec::new();
        // Sends two events, which wait for the held round to end.
        let mut two_waiting = |tasks: &mut Vec<_>| {
            for n in 1..=2 {
                let usage = usage_event(&fresh_user("closed"), 1_000, "chat", period);
                events.push(usage.clone());
                tasks.push(spawn_record(&store, usage, Arc::clone(&plan), None));
                until(&|| store.waiting_events() == n);
            }
        };
        // One task runs every round below: the first (one event) is held while two events wait.
        store.hold_next_round();
        tasks.push(spawn_record(&store, first, Arc::clone(&plan), None));
        until(&|| !store.round_hold_pending());
        two_waiting(&mut tasks);
        store.hold_next_round();
        store.release_held_round();
        until(&|| !store.round_hold_pending());
        // The second round (two events) is held, then recorded on a connection the task keeps;
        // the third is held while the server closes every connection of the store.
        two_waiting(&mut tasks);
        store.hold_next_round();
        let failed = store.failed_rounds();
        store.release_held_round();
        until(&|| !store.round_hold_pending());
        assert_eq!(store.failed_rounds(), failed, "the second round was recorded");
        close_connections_named(&name).await;
        // A fourth round waits behind the third.
        two_waiting(&mut tasks);
        store.release_held_round();
        for task in tasks {
            let recorded = task.await.expect("joined").expect("every caller is answered its event");
            assert!(!recorded.replayed, "each caller's own event");
        }
        assert_eq!(
            store.failed_rounds(),
            failed + 1,
            "only the round on the closed connection failed"
        );
        for usage in &events {
            let consumptions = store.consumptions(&usage.user_id, period).await.expect("read");
            assert_eq!(consumptions.len(), 1, "{}: recorded once", usage.user_id);
            assert_eq!(consumptions[0].event_id, usage.event_id);
        }
    }

    /// In a round, an event placed with an account that changed since is refused on its own
    /// (`AccountChanged`, as a single record refuses it), and the round's other events are
    /// recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_refuses_only_the_events_placed_with_an_account_that_changed() {
        use token_billing::store::Account;
        use token_billing::testing::store::base_instant;

        let store = Arc::new(super::store().await.with_group_commit(true));
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let users: Vec<UserId> = (0..8).map(|_| fresh_user("placed")).collect();
        let mut placed = Vec::new();
        for user in &users {
            let account = Account {
                user_id: user.clone(),
                customer_id: None,
                plan_id: token_billing::PlanId::new("default").expect("a plan id"),
                earlier_plans: Vec::new(),
                subscription_id: None,
                limits: None,
                created_at: base_instant(),
                updated_at: base_instant(),
            };
            store.put_account(account.clone()).await.expect("saved");
            placed.push(account);
        }
        // Every user's period is open, so that the events below take the rounds' common way.
        let opening = users
            .iter()
            .zip(&placed)
            .map(|(user, account)| (usage_event(user, 1_000, "chat", period), Some(account.clone())));
        for outcome in sent_at_once(&store, &plan, opening.collect()).await {
            outcome.expect("recorded with the accounts as stored");
        }
        // Half the users' accounts change after the events were placed with them.
        for account in &placed[..4] {
            let changed = Account {
                subscription_id: Some("sub_new".to_owned()),
                updated_at: base_instant() + chrono::Duration::seconds(1),
                ..account.clone()
            };
            store.put_account(changed).await.expect("changed");
        }
        let mut usages = Vec::new();
        for _ in 0..4 {
            for (user, account) in users.iter().zip(&placed) {
                usages.push((usage_event(user, 1_000, "chat", period), Some(account.clone())));
            }
        }
        let sent: Vec<_> = usages.iter().map(|(usage, _)| usage.clone()).collect();
        let outcomes = sent_at_once(&store, &plan, usages).await;
        for (usage, outcome) in sent.iter().zip(outcomes) {
            let stale = users[..4].contains(&usage.user_id);
            match outcome {
                Err(token_billing::StoreError::AccountChanged { usage: back }) if stale => assert_eq!(*back, *usage),
                Ok(recorded) if !stale => assert_eq!(recorded.usage.event_id, usage.event_id),
                other => panic!("{} (account changed: {stale}): {other:?}", usage.user_id),
            }
        }
        for (n, user) in users.iter().enumerate() {
            let events = store.consumptions(user, period).await.expect("consumptions").len();
            assert_eq!(events, if n < 4 { 1 } else { 5 }, "{user}");
        }
    }

    /// Each event of a round is stamped with its own instant (`recorded_at`), not its round's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_event_of_a_round_keeps_its_own_instant() {
        let store = Arc::new(super::store().await.with_group_commit(true));
        let plan = Arc::new(small_blocks());
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("instants");
        let mut usages = Vec::new();
        for n in 0..32i64 {
            let mut usage = usage_event(&user, 1_000, "chat", period);
            usage.recorded_at =
                token_billing::testing::store::base_instant() + chrono::Duration::milliseconds(n * 1_001);
            usages.push((usage, None));
        }
        let sent: BTreeMap<_, _> = usages
            .iter()
            .map(|(usage, _)| (usage.event_id.clone(), usage.recorded_at))
            .collect();
        for outcome in sent_at_once(&store, &Arc::clone(&plan), usages).await {
            outcome.expect("recorded");
        }
        let kept = store.consumptions(&user, period).await.expect("consumptions");
        assert_eq!(kept.len(), sent.len());
        let mut instant_of = BTreeMap::new();
        for usage in kept {
            assert_eq!(
                Some(&usage.recorded_at),
                sent.get(&usage.event_id),
                "{}",
                usage.event_id
            );
            instant_of.insert(usage.consumption_id, usage.recorded_at);
        }
        // The fee and the blocks of 10,000 tokens the events started: each charge stamped
        // with the instant of the event that created it.
        let charges = store.charges(&user, period).await.expect("charges");
        assert_eq!(charges.len(), 4, "{charges:?}");
        for charge in charges {
            let event = charge.consumption_id.expect("created by an event");
            assert_eq!(Some(&charge.created_at), instant_of.get(&event), "{}", charge.key);
        }
    }

    /// Events of one period placed with different plans (callers holding different copies of
    /// an account) may meet in one round: each is decided against its own plan, and one placed
    /// with an account that changed since is answered `AccountChanged`, whatever else it would
    /// be refused for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_of_a_round_placed_with_different_accounts_are_each_decided_on_their_own() {
        use token_billing::store::Account;
        use token_billing::testing::store::base_instant;
        use token_billing::{Currency, Money};

        let store = Arc::new(super::store().await.with_group_commit(true));
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("moved-plan");
        let old = Account {
            user_id: user.clone(),
            customer_id: None,
            plan_id: token_billing::PlanId::new("old-usd").expect("a plan id"),
            earlier_plans: Vec::new(),
            subscription_id: None,
            limits: None,
            created_at: base_instant(),
            updated_at: base_instant(),
        };
        let current = Account {
            plan_id: token_billing::PlanId::new("default").expect("a plan id"),
            updated_at: base_instant() + chrono::Duration::seconds(1),
            ..old.clone()
        };
        store.put_account(current.clone()).await.expect("saved");
        let usd = Arc::new(
            Plan::builder()
                .fixed_fee(Money::from_minor(40_000, Currency::USD))
                .block_price(Money::from_minor(10_000, Currency::USD))
                .zone(chrono_tz::America::New_York)
                .build()
                .expect("a plan"),
        );
        let brl = Arc::new(small_blocks());
        // The period opens in the current plan's currency.
        store
            .record_usage(RecordUsage {
                usage: usage_event(&user, 1_000, "chat", period),
                plan: &brl,
                fee: FeeCollection::Library,
                lease_until: None,
                alerting: None,
                account: Some(&current),
            })
            .await
            .expect("opened");
        let send = |usage, plan, account| spawn_record(&store, usage, plan, account);
        // Another user's round is held while three events of this user wait, in this order, for
        // the next round: one placed with the old account and its plan, one with the current
        // account, and one with the current account but a plan in another currency.
        store.hold_next_round();
        let holder = send(
            usage_event(&fresh_user("holder"), 1_000, "chat", period),
            Arc::clone(&brl),
            None,
        );
        until(&|| !store.round_hold_pending());
        let stale = usage_event(&user, 1_000, "chat", period);
        let fresh = usage_event(&user, 1_000, "chat", period);
        let other_currency = usage_event(&user, 1_000, "chat", period);
        let sends = [
            (stale.clone(), Arc::clone(&usd), Some(old.clone())),
            (fresh.clone(), Arc::clone(&brl), Some(current.clone())),
            (other_currency.clone(), Arc::clone(&usd), Some(current.clone())),
        ];
        let mut tasks = Vec::new();
        for (n, (usage, plan, account)) in sends.into_iter().enumerate() {
            tasks.push(send(usage, plan, account));
            until(&|| store.waiting_events() == n + 1);
        }
        let (before, failed) = (store.rounds_of_several_events(), store.failed_rounds());
        store.release_held_round();
        holder
            .await
            .expect("joined")
            .expect("the held round's event is recorded");
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("joined"));
        }
        assert_eq!(
            store.rounds_of_several_events(),
            before + 1,
            "the three met in one round"
        );
        assert_eq!(store.failed_rounds(), failed, "no round failed");
        let mut outcomes = outcomes.into_iter();
        match outcomes.next().expect("the stale event's answer") {
            Err(token_billing::StoreError::AccountChanged { usage }) => assert_eq!(*usage, stale),
            other => panic!("the event placed with the old account: {other:?}"),
        }
        let recorded = outcomes
            .next()
            .expect("the fresh event's answer")
            .expect("the event placed with the current account is recorded");
        assert_eq!(recorded.usage.event_id, fresh.event_id);
        match outcomes.next().expect("the other currency's answer") {
            // Its account is the stored one: its own refusal stands.
            Err(error @ token_billing::StoreError::Generic { .. }) => {
                assert!(format!("{error:?}").contains("not in USD"), "{error:?}");
            }
            other => panic!("the event in another currency: {other:?}"),
        }
        assert_eq!(store.consumptions(&user, period).await.expect("read").len(), 2);
    }

    /// A process starts its batches from the period totals it last wrote: when another
    /// process moved them since, the batch is written against the stored totals all the same.
    /// Two stores on one database take turns: each event gets the interval after the ones
    /// before it, and each block is charged once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn totals_another_process_moved_are_read_again() {
        let schema = super::schema().await;
        let (a, b) = (super::store_in(&schema).await, super::store_in(&schema).await);
        let plan = small_blocks();
        let period = PeriodKey::new(2026, 11).expect("a period");
        let users: Vec<UserId> = (0..3).map(|_| fresh_user("turns")).collect();
        let request = |usage| RecordUsage {
            usage,
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        };
        let mut sent: BTreeMap<UserId, u64> = BTreeMap::new();
        let mut events = Vec::new();
        for turn in 0..12u64 {
            let (here, there) = if turn % 2 == 0 { (&a, &b) } else { (&b, &a) };
            // A batch of every user's events, from the totals this store last wrote ...
            let batch: Vec<_> = users
                .iter()
                .map(|user| {
                    let tokens = 3_000 + turn * 101;
                    *sent.entry(user.clone()).or_default() += tokens;
                    let usage = usage_event(user, tokens, "chat", period);
                    events.push((user.clone(), usage.event_id.clone()));
                    request(usage)
                })
                .collect();
            for outcome in here.record_usage_batch(batch).await.expect("a batch") {
                outcome.expect("recorded");
            }
            // ... and the other store moves one user's total on its own.
            let user = &users[usize::try_from(turn % 3).expect("small")];
            *sent.entry(user.clone()).or_default() += 4_321;
            let usage = usage_event(user, 4_321, "chat", period);
            events.push((user.clone(), usage.event_id.clone()));
            there.record_usage(request(usage)).await.expect("recorded");
        }
        for (user, total) in &sent {
            let mut intervals = Vec::new();
            for (_, event) in events.iter().filter(|(u, _)| u == user) {
                let recorded = a.recorded_event(user, event).await.expect("read").expect("recorded");
                intervals.push((recorded.total_before, recorded.total_after));
            }
            intervals.sort_unstable();
            let mut expected_before = 0;
            for (before, after) in &intervals {
                assert_eq!(*before, expected_before, "{user}: each interval follows the one before");
                expected_before = *after;
            }
            assert_eq!(expected_before, *total, "{user}");
            let summary = b.period_summary(user, period).await.expect("read").expect("a summary");
            assert_eq!(summary.total_tokens, *total, "{user}");
            assert_eq!(
                blocks_charged(&a, user, period).await,
                (1..=plan.blocks_owed(*total)).collect::<Vec<_>>(),
                "{user}"
            );
        }
    }

    /// A refusal is never answered from a total this process kept: when the stored total is not
    /// the kept one (here a period restored to an earlier state behind the store's back), the
    /// batch reads it and decides again.
    #[tokio::test]
    async fn a_refusal_is_decided_on_the_stored_total_not_a_kept_one() {
        let store = super::store().await;
        // Blocks so large that a total near the most it holds owes a few.
        let plan = Plan::builder().block_size(1 << 60).build().expect("a plan");
        let period = PeriodKey::new(2026, 11).expect("a period");
        let user = fresh_user("restored");
        let request = |usage| RecordUsage {
            usage,
            plan: &plan,
            fee: FeeCollection::Library,
            lease_until: None,
            alerting: None,
            account: None,
        };
        let batch = |tokens| vec![request(usage_event(&user, tokens, "chat", period))];
        // Two batches: the period opens, then its total comes close to the most a total holds,
        // which the store keeps as the period's total.
        for tokens in [1_000, token_billing::MAX_TOKENS - 2_000] {
            for outcome in store.record_usage_batch(batch(tokens)).await.expect("a batch") {
                outcome.expect("recorded");
            }
        }
        sqlx::query("UPDATE token_usage_summary SET total_tokens = 1000 WHERE user_id = $1")
            .bind(user.as_str())
            .execute(store.pool())
            .await
            .expect("restored");
        // From the kept total, 5,000 more tokens would pass the most a total holds.
        let outcomes = store.record_usage_batch(batch(5_000)).await.expect("a batch");
        let recorded = outcomes.into_iter().next().expect("one answer").expect("recorded");
        assert_eq!((recorded.total_before, recorded.total_after), (1_000, 6_000));
    }
}
