//! The PostgreSQL store against a real PostgreSQL (feature `postgres`).
//!
//! `DATABASE_URL` names the database; without it, the local default
//! `postgres://postgres@127.0.0.1:5432/test` is used. `.ci/run` starts PostgreSQL and creates it.
#![cfg(feature = "postgres")]

use token_billing::PostgresUsageStore;

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn store() -> PostgresUsageStore {
    let url = database_url();
    match PostgresUsageStore::connect(&url).await {
        Ok(store) => store,
        Err(error) => panic!("PostgreSQL at {url} is needed for these tests (set DATABASE_URL): {error:?}"),
    }
}

token_billing::usage_store_conformance!(postgres_conformance, async { super::store().await });

mod service {
    use std::sync::Arc;

    use chrono::{Duration, TimeZone, Utc};
    use token_billing::{
        BillingService, ChargeKind, ChargeStatus, CollectionMode, ManualClock, PaymentStatus, PeriodKey, Plan,
        SandboxGateway, UnregisteredUsers, UsageReport, UsageStore, UserId,
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

    fn clock() -> ManualClock {
        ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 15, 15, 0, 0).single().expect("valid"))
    }

    #[tokio::test]
    async fn the_seed_scenarios_on_postgresql() {
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let billing = instance(Arc::new(super::store().await), &sandbox, &clock, Plan::default());
        let user = fresh("seed");
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

    /// Several service instances with pools of their own race on the same users across many block
    /// boundaries while others resume: each block is charged and paid exactly once, and the totals
    /// are the sums of the accepted events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn instances_with_separate_pools_race_and_collect_each_block_once() {
        let plan = Plan::builder()
            .included_tokens(10_000)
            .block_size(10_000)
            .build()
            .expect("valid");
        let sandbox = SandboxGateway::new();
        let clock = clock();
        let users: Vec<String> = (0..3).map(|i| fresh(&format!("race{i}"))).collect();
        let mut tasks = Vec::new();
        for task in 0..6usize {
            let store: Arc<dyn UsageStore> = Arc::new(super::store().await);
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
        let mut totals = vec![0u64; users.len()];
        for task in tasks {
            for (total, sent) in totals.iter_mut().zip(task.await.expect("task")) {
                *total += sent;
            }
        }
        let finisher = instance(Arc::new(super::store().await), &sandbox, &clock, plan.clone());
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
            let charges = finisher.store().charges(&user, november()).await.expect("charges");
            let mut blocks: Vec<u64> = charges
                .iter()
                .filter(|c| c.kind == ChargeKind::Block)
                .map(|c| c.block)
                .collect();
            blocks.sort_unstable();
            assert_eq!(blocks, (1..=plan.blocks_owed(total)).collect::<Vec<_>>());
            for charge in &charges {
                let paid = sandbox
                    .payments_for_charge(&charge.key)
                    .iter()
                    .filter(|p| p.status == PaymentStatus::Succeeded)
                    .count();
                assert_eq!(paid, 1, "{} paid {paid} times", charge.key);
            }
        }
    }
}
