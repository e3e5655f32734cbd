// Bytes per event are a ratio for a report, not money.
#![allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
//! Memory of the in-memory store per recorded event (without metadata), for each
//! [`EventRetention`], and per event kept with the benchmarks' metadata: the growth of the
//! process's resident memory while events are recorded, divided by their number. Each
//! retention is measured in a fresh process (this program runs itself again), so that memory
//! freed by one measurement is not reused by the next.
//!
//! `cargo bench --bench memory`

mod common;

use std::process::Command;
use std::sync::Arc;

use common::metadata;
use token_billing::{
    BillingService, EventRetention, InMemoryUsageStore, SandboxGateway, UnregisteredUsers, UsageReport,
};

/// Users the events are spread over, as in `benches/ingest.rs`.
const USERS: u64 = 10_000;

/// Resident memory of this process in bytes, from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (Linux) is needed");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("a resident page count");
    pages * 4096
}

/// The retention of a measurement, whether its events carry the host's own ids (which
/// `Resendable` keeps, to answer a resend), and whether they carry metadata.
fn retention(name: &str) -> (EventRetention, bool, bool) {
    match name {
        "all" => (EventRetention::All, false, false),
        "resendable" => (EventRetention::Resendable, false, false),
        "resendable_with_event_ids" => (EventRetention::Resendable, true, false),
        "all_with_metadata" => (EventRetention::All, false, true),
        other => panic!("unknown measurement {other}"),
    }
}

/// Records `events` events and prints the bytes each one added: `bytes <retention> <per event>`.
fn measure(name: &str, events: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (retention, event_ids, with_metadata) = retention(name);
    let store = InMemoryUsageStore::builder().events(retention).build();
    let billing = BillingService::builder(Arc::new(store), Arc::new(SandboxGateway::new()))
        .unregistered_users(UnregisteredUsers::OpenCustomer)
        .build();
    runtime.block_on(async {
        // Every user's period opened first: the measurement is of events, not of users. What
        // the users took (their accounts and periods, and their customers in the sandbox) is
        // reported on its own.
        let empty = resident_bytes();
        for user in 0..USERS {
            let report = UsageReport::new(format!("user-{user}"), 1, "chat");
            billing.process_token_usage(report).await.expect("recorded");
        }
        let before = resident_bytes();
        println!(
            "user-bytes {name} {:.1}",
            before.saturating_sub(empty) as f64 / USERS as f64
        );
        for i in 0..events {
            let mut report = UsageReport::new(format!("user-{}", i % USERS), 1_000, "chat");
            if event_ids {
                report = report.event_id(format!("ev-{i:012}"));
            }
            if with_metadata {
                report = report.metadata(metadata());
            }
            billing.process_token_usage(report).await.expect("recorded");
        }
        let after = resident_bytes();
        println!(
            "bytes {name} {:.1}",
            after.saturating_sub(before) as f64 / events as f64
        );
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: u64 = if args.iter().any(|a| a == "--bench") {
        2_000_000
    } else {
        50_000
    };
    if let Some(position) = args.iter().position(|a| a == "--measure") {
        measure(&args[position + 1], events);
        return;
    }
    println!("in-memory store, {events} events of {USERS} users, without metadata but the last:");
    for name in ["all", "resendable", "resendable_with_event_ids", "all_with_metadata"] {
        let mut command = Command::new(std::env::current_exe().expect("this program"));
        command.args(["--measure", name]);
        if args.iter().any(|a| a == "--bench") {
            command.arg("--bench");
        }
        let output = command.output().expect("a measurement");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let per_event: f64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("bytes {name} ")))
            .and_then(|value| value.trim().parse().ok())
            .expect("a figure");
        let per_user: f64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("user-bytes {name} ")))
            .and_then(|value| value.trim().parse().ok())
            .expect("a figure");
        println!("memory/{name}: {per_event:.0} bytes per event, {per_user:.0} bytes per user");
        if name.starts_with("all") {
            // Keeping every event costs memory for each one.
            assert!(per_event > 0.0, "events kept in full take memory");
        }
    }
}
