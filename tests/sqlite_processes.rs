//! The SQLite store shared by processes (feature `sqlite`): two processes recording the same
//! events for the same users on one file, and a process killed with SIGKILL at random points,
//! many times, then restarted (with the Stripe gateway against localstripe, feature `stripe`).
//!
//! The processes are this test binary run again on one test, `process_under_test`, which does
//! what its environment says and is otherwise skipped.
#![cfg(all(feature = "sqlite", feature = "testing"))]

mod common;
#[cfg(feature = "stripe")]
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use chrono::Duration;
use common::sqlite::{fresh_path, url};
use common::{nov15, november, user};
use token_billing::{
    BillingService, ChargeKind, ChargeStatus, ManualClock, PaymentGateway, PaymentStatus, Plan, SandboxGateway,
    SqliteUsageStore, UnregisteredUsers, UsageReport, UsageStore, UserId,
};

/// What a process under test is told to do, through its environment.
const ROLE: &str = "TOKEN_BILLING_TEST_ROLE";
const DATABASE: &str = "TOKEN_BILLING_TEST_DATABASE";
const USERS: &str = "TOKEN_BILLING_TEST_USERS";
const EVENTS: &str = "TOKEN_BILLING_TEST_EVENTS";
const ORDER: &str = "TOKEN_BILLING_TEST_ORDER";
const REPORT: &str = "TOKEN_BILLING_TEST_REPORT";
const MINUTES: &str = "TOKEN_BILLING_TEST_MINUTES";

/// Blocks of 10,000 tokens after 10,000 included: events cross many.
fn plan() -> Plan {
    Plan::builder()
        .included_tokens(10_000)
        .block_size(10_000)
        .build()
        .expect("valid")
}

/// The tokens of a user's `i`th event: the same in every process.
fn tokens_of(user: &str, i: u64) -> u64 {
    let salt = user.bytes().map(u64::from).sum::<u64>();
    3_000 + (i * 7_919 + salt * 104_729) % 6_000
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"))
}

/// A service over the file at `path`, with the clock at `minutes` past mid-November.
fn service(store: SqliteUsageStore, gateway: Arc<dyn PaymentGateway>, minutes: i64) -> BillingService {
    BillingService::builder(Arc::new(store), gateway)
        .plan(plan())
        .clock(Arc::new(ManualClock::new(nov15() + Duration::minutes(minutes))))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build()
}

/// Appends a line to the report file and flushes it to the file system before going on.
fn report_line(path: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("the report file");
    writeln!(file, "{line}").expect("a report line");
    file.sync_data().expect("the report on disk");
}

/// The process under test: skipped unless run by a test below, with its role in `ROLE`.
#[test]
#[ignore = "a process the multi-process tests start; it does nothing on its own"]
fn process_under_test() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        match role.as_str() {
            "record" => record_the_same_events().await,
            #[cfg(feature = "stripe")]
            "crash" => crash::record_and_collect_until_killed().await,
            other => panic!("unknown role {other}"),
        }
    });
}

/// Records every user's events `0..EVENTS` (in the order `ORDER` says), several at a time, with
/// a sandbox of its own; then reports each payment its sandbox took.
async fn record_the_same_events() {
    let store = SqliteUsageStore::connect(&url(Path::new(&env(DATABASE))))
        .await
        .expect("the shared file");
    // The other process may open a user's customer at its own sandbox: this one pays them too.
    let sandbox = SandboxGateway::accepting_unknown_customers();
    let billing = service(store, Arc::new(sandbox.clone()), 0);
    let events: u64 = env(EVENTS).parse().expect("a count");
    let mut order: Vec<u64> = (0..events).collect();
    if env(ORDER) == "backwards" {
        order.reverse();
    }
    let users: Vec<String> = env(USERS).split(',').map(str::to_owned).collect();
    for chunk in order.chunks(4) {
        let mut sends = Vec::new();
        for i in chunk {
            for user in &users {
                let report = UsageReport::new(user, tokens_of(user, *i), "chat").event_id(format!("evt-{i}"));
                let billing = billing.clone();
                sends.push(tokio::spawn(async move { billing.process_token_usage(report).await }));
            }
        }
        for send in sends {
            send.await
                .expect("joined")
                .expect("recorded or answered, never refused for a lock");
        }
    }
    let report = PathBuf::from(env(REPORT));
    for payment in sandbox.payments() {
        if payment.status == PaymentStatus::Succeeded {
            report_line(&report, payment.charge_key.as_str());
        }
    }
}

/// Starts this test binary as a process under test with `vars`.
fn start(vars: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("this test binary"));
    command
        .args([
            "--exact",
            "process_under_test",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::null());
    for (name, value) in vars {
        command.env(name, value);
    }
    command.spawn().expect("a process under test")
}

/// Asserts a user's November is whole: every event once, the total their sum, each block from
/// 1 to what the total owes charged once, the fee once, and (when `settled`) every charge paid.
async fn assert_period_whole(store: &SqliteUsageStore, user: &UserId, events: &[(String, u64)], settled: bool) {
    let consumptions = store.consumptions(user, november()).await.expect("consumptions");
    let mut recorded: Vec<(String, u64)> = consumptions
        .iter()
        .map(|c| (c.event_id.as_str().to_owned(), c.tokens))
        .collect();
    recorded.sort();
    let mut expected = events.to_vec();
    expected.sort();
    assert_eq!(recorded, expected, "{user}: every event exactly once");
    let total: u64 = events.iter().map(|(_, tokens)| tokens).sum();
    let summary = store
        .period_summary(user, november())
        .await
        .expect("summary")
        .expect("a summary");
    assert_eq!(
        (summary.total_tokens, summary.events),
        (total, events.len() as u64),
        "{user}"
    );
    let charges = store.charges(user, november()).await.expect("charges");
    let mut blocks: Vec<u64> = charges
        .iter()
        .filter(|c| c.kind == ChargeKind::Block)
        .map(|c| c.block)
        .collect();
    blocks.sort_unstable();
    assert_eq!(
        blocks,
        (1..=plan().blocks_owed(total)).collect::<Vec<_>>(),
        "{user}: each block once"
    );
    assert_eq!(
        charges.iter().filter(|c| c.kind == ChargeKind::FixedFee).count(),
        1,
        "{user}: one fee"
    );
    if settled {
        assert!(
            charges.iter().all(|c| c.status == ChargeStatus::Succeeded),
            "{user}: {charges:#?}"
        );
        let paid = charges.iter().map(|c| c.amount.minor_units()).sum::<i64>();
        assert_eq!(
            summary.fixed_fee_charged.minor_units() + summary.tier_charges_total.minor_units(),
            paid,
            "{user}: the summary agrees with the charges"
        );
    }
}

/// Two processes record the same events of the same users on one file at once, in opposite
/// orders and several at a time each: every event is recorded once (the other process's send
/// is answered as a re-send), every block is charged once, and each charge is paid by one
/// process only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_recording_the_same_events_record_and_charge_each_once() {
    let path = fresh_path("two-processes");
    // Created before the processes start, so that they race on the records, not the schema.
    let store = SqliteUsageStore::connect(&url(&path)).await.expect("the file");
    let users: Vec<String> = (0..3)
        .map(|n| format!("shared-{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
        .collect();
    let events = 40u64;
    let reports: Vec<PathBuf> = (0..2).map(|n| fresh_path(&format!("payments-{n}"))).collect();
    let children: Vec<Child> = ["forwards", "backwards"]
        .iter()
        .zip(&reports)
        .map(|(order, report)| {
            start(&[
                (ROLE, "record".to_owned()),
                (DATABASE, path.display().to_string()),
                (USERS, users.join(",")),
                (EVENTS, events.to_string()),
                (ORDER, (*order).to_owned()),
                (REPORT, report.display().to_string()),
            ])
        })
        .collect();
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("joined")
            .expect("waited");
        assert!(status.success(), "a process under test failed: {status}");
    }
    let mut payments: BTreeMap<String, usize> = BTreeMap::new();
    for report in &reports {
        for line in std::fs::read_to_string(report).unwrap_or_default().lines() {
            *payments.entry(line.to_owned()).or_default() += 1;
        }
    }
    for name in &users {
        let sent: Vec<(String, u64)> = (0..events).map(|i| (format!("evt-{i}"), tokens_of(name, i))).collect();
        let user_id = user(name);
        assert_period_whole(&store, &user_id, &sent, true).await;
        for charge in store.charges(&user_id, november()).await.expect("charges") {
            assert_eq!(
                payments.get(charge.key.as_str()),
                Some(&1),
                "{}: paid once, by one process",
                charge.key
            );
        }
    }
    let mut held = Vec::new();
    for name in &users {
        held.extend(
            store
                .charges(&user(name), november())
                .await
                .expect("charges")
                .into_iter()
                .map(|c| c.key),
        );
    }
    assert!(
        payments.keys().all(|key| held.iter().any(|c| c.as_str() == key)),
        "no payment for a charge the file does not hold"
    );
}

/// Reads the events a process acknowledged, from its report lines `ack <user> <event> <tokens>`.
fn acknowledged(path: &Path) -> Vec<(String, String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("ack"), Some(user), Some(event), Some(tokens)) => {
                    Some((user.to_owned(), event.to_owned(), tokens.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The time a process under test runs before it is killed: from 0.1 to 1.5 seconds, drawn.
fn kill_after(seed: &mut u64) -> std::time::Duration {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    std::time::Duration::from_millis(100 + (*seed >> 33) % 1_400)
}

#[cfg(feature = "stripe")]
mod crash {
    use super::*;
    use crate::support::{SECRET_KEY, customer_with_card, localstripe, payment_intents_for};
    use token_billing::CustomerId;
    use token_billing::gateway::stripe::StripeGateway;

    const LOCALSTRIPE_URL: &str = "LOCALSTRIPE_URL";
    const PAYS: &str = "4242424242424242";

    fn gateway(base: &str) -> Arc<dyn PaymentGateway> {
        Arc::new(
            StripeGateway::builder(SECRET_KEY)
                .api_base(base)
                .retry_delays(
                    std::time::Duration::from_millis(20),
                    std::time::Duration::from_millis(200),
                )
                .build()
                .expect("a gateway"),
        )
    }

    /// A process under test that is killed: it resumes what its predecessors left pending, then
    /// records its user's events from the last one acknowledged (a re-send after a restart, to
    /// be answered as the original), each collected at once at localstripe, and appends each
    /// acknowledged event to the report. The event after it may have been recorded without an
    /// answer before the kill: it is sent again in its turn.
    pub(super) async fn record_and_collect_until_killed() {
        let store = SqliteUsageStore::connect(&url(Path::new(&env(DATABASE))))
            .await
            .expect("the file");
        let minutes: i64 = env(MINUTES).parse().expect("minutes");
        let billing = service(store, gateway(&env(LOCALSTRIPE_URL)), minutes);
        billing.resume_pending().await.expect("resumed");
        let report = PathBuf::from(env(REPORT));
        let user = env(USERS);
        let next = acknowledged(&report)
            .iter()
            .filter_map(|(_, event, _)| event.trim_start_matches("evt-").parse::<u64>().ok())
            .max()
            .map_or(0, |last| last + 1);
        for i in next.saturating_sub(1).. {
            let tokens = tokens_of(&user, i);
            billing
                .process_token_usage(UsageReport::new(&user, tokens, "chat").event_id(format!("evt-{i}")))
                .await
                .expect("recorded");
            report_line(&report, &format!("ack {user} evt-{i} {tokens}"));
        }
    }

    /// Invariants 1 to 3 through crashes: a process recording and collecting is killed with
    /// SIGKILL at random points, fifteen times, each time started again (later, so that the
    /// leases of what it left pending have expired). Then every acknowledged event is in the file
    /// exactly once, the total is the sum of the events recorded, each block is charged once,
    /// every charge is paid after a last `resume_pending`, and localstripe holds at most one
    /// successful PaymentIntent per charge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_killed_at_random_points_loses_and_doubles_nothing() {
        let path = fresh_path("killed");
        let store = SqliteUsageStore::connect(&url(&path)).await.expect("the file");
        let name = format!("killed-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let user_id = user(&name);
        let customer = CustomerId::new(customer_with_card(PAYS).await).expect("valid");
        let base = localstripe().to_owned();
        service(store.clone(), gateway(&base), 0)
            .register_account(&user_id, Some(customer), None)
            .await
            .expect("registered");
        let report = fresh_path("acks");
        let mut seed = 0x5eed_u64 ^ u64::from(std::process::id());
        let rounds = 15;
        for round in 0..rounds {
            let mut child = start(&[
                (ROLE, "crash".to_owned()),
                (DATABASE, path.display().to_string()),
                (USERS, name.clone()),
                (REPORT, report.display().to_string()),
                (MINUTES, (round * 10).to_string()),
                (LOCALSTRIPE_URL, base.clone()),
            ]);
            tokio::time::sleep(kill_after(&mut seed)).await;
            // `Child::kill` sends SIGKILL: no destructor, no rollback, no flush runs.
            if let Some(status) = child.try_wait().expect("polled") {
                panic!("the process under test ended by itself: {status}");
            }
            child.kill().expect("killed");
            child.wait().expect("reaped");
        }
        let acked = acknowledged(&report);
        assert!(acked.len() >= 5, "the processes got work done between kills: {acked:?}");

        // A last instance, after every lease has expired, collects what the kills left pending.
        let last = service(store.clone(), gateway(&base), rounds * 10 + 10);
        last.resume_pending().await.expect("resumed");

        let consumptions = store.consumptions(&user_id, november()).await.expect("consumptions");
        let recorded: BTreeMap<String, u64> = consumptions
            .iter()
            .map(|c| (c.event_id.as_str().to_owned(), c.tokens))
            .collect();
        assert_eq!(recorded.len(), consumptions.len(), "no event twice");
        for (_, event, tokens) in &acked {
            assert_eq!(
                recorded.get(event),
                Some(tokens),
                "{event} was acknowledged: it is recorded"
            );
        }
        let events: Vec<(String, u64)> = recorded.into_iter().collect();
        assert_period_whole(&store, &user_id, &events, true).await;
        for charge in store.charges(&user_id, november()).await.expect("charges") {
            let succeeded = payment_intents_for(charge.key.as_str())
                .await
                .iter()
                .filter(|intent| intent["status"].as_str() == Some("succeeded"))
                .count();
            assert_eq!(succeeded, 1, "{}: paid exactly once", charge.key);
        }
    }
}
