//! What the service reports through the `metrics` facade, read with a recorder of this thread
//! (`metrics-util`'s debugging recorder): each metric of the table in `src/service/metrics.rs`
//! moves when, and only when, what it counts happens.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{Harness, november, user};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use token_billing::testing::faults::{Fault, FaultyGateway, GatewayOp};
use token_billing::{CardBehaviour, FeeCollection, Plan, SandboxGateway, UsageReport};

/// Counters by name and labels (`name{label=value}`), and how many values each histogram took.
fn read(snapshotter: &Snapshotter) -> (BTreeMap<String, u64>, BTreeMap<String, usize>, BTreeMap<String, f64>) {
    let (mut counters, mut histograms, mut gauges) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        match value {
            DebugValue::Counter(n) => {
                counters.insert(name, n);
            }
            DebugValue::Histogram(values) => {
                histograms.insert(name, values.len());
            }
            DebugValue::Gauge(value) => {
                gauges.insert(name, value.into_inner());
            }
        }
    }
    (counters, histograms, gauges)
}

/// Runs `body` on a runtime of this thread with a recorder of this thread, and answers what it
/// recorded.
fn recorded<F: std::future::Future<Output = ()>>(
    body: impl FnOnce() -> F,
) -> (BTreeMap<String, u64>, BTreeMap<String, usize>, BTreeMap<String, f64>) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body());
    read(&snapshotter)
}

#[test]
fn events_are_counted_by_what_became_of_them() {
    let (counters, histograms, _) = recorded(|| async {
        let h = Harness::new();
        let report = || UsageReport::new("ana", 9_000_000, "chat").event_id("evt-1");
        h.service.process_token_usage(report()).await.expect("recorded");
        h.service
            .process_token_usage(report())
            .await
            .expect("answered as a re-send");
        let conflicting = UsageReport::new("ana", 1, "chat").event_id("evt-1");
        assert!(h.service.process_token_usage(conflicting).await.is_err());
        assert!(
            h.service
                .process_token_usage(UsageReport::new("ana", 0, "chat"))
                .await
                .is_err()
        );
        let batch = vec![
            UsageReport::new("ana", 1_000, "chat").event_id("evt-2"),
            UsageReport::new("ana", 0, "chat"),
        ];
        h.service.process_token_usage_batch(batch).await.expect("a batch");
    });
    assert_eq!(counters.get("token_billing_events_recorded_total"), Some(&2));
    assert_eq!(counters.get("token_billing_events_resent_total"), Some(&1));
    assert_eq!(
        counters.get("token_billing_events_refused_total{reason=conflict}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("token_billing_events_refused_total{reason=invalid}"),
        Some(&2)
    );
    // The fee and block 1 of the first event, both collected at once.
    assert_eq!(
        counters.get("token_billing_charges_created_total{kind=fixed_fee}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("token_billing_charges_created_total{kind=block}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("token_billing_collections_total{outcome=succeeded}"),
        Some(&2)
    );
    assert_eq!(histograms.get("token_billing_collection_duration_seconds"), Some(&2));
    // The store's step ran for each event that reached it (a zero is refused before), and the batch.
    assert_eq!(
        histograms.get("token_billing_record_duration_seconds{call=event}"),
        Some(&3)
    );
    assert_eq!(
        histograms.get("token_billing_record_duration_seconds{call=batch}"),
        Some(&1)
    );
    assert!(!counters.contains_key("token_billing_events_failed_total{cause=store}"));
}

#[test]
fn collections_declines_resumes_and_duplicates_are_counted() {
    let (counters, _, gauges) = recorded(|| async {
        // A declined card, and a payment whose answer is lost (left pending, to resume).
        let sandbox = SandboxGateway::new();
        let gateway = Arc::new(FaultyGateway::new(Arc::new(sandbox.clone())));
        let h = Harness::over(
            Arc::new(token_billing::InMemoryUsageStore::new()),
            gateway.clone(),
            sandbox,
            |b| b.plan(Plan::default()),
        );
        h.register(
            &user("declined"),
            CardBehaviour::Declines {
                code: "card_declined".into(),
            },
        )
        .await;
        h.service
            .process_token_usage(UsageReport::new("declined", 100, "chat"))
            .await
            .expect("recorded");
        h.register(&user("lost"), CardBehaviour::Succeeds).await;
        gateway.inject(GatewayOp::Collect, Fault::FailAfter, 1);
        h.service
            .process_token_usage(UsageReport::new("lost", 100, "chat"))
            .await
            .expect("recorded");
        // After the lease, the charge left pending is resumed (and paid).
        h.advance(chrono::Duration::minutes(10));
        h.service.resume_pending().await.expect("resumed");

        // A fee paid twice through a subscription: the second payment is a duplicate.
        let subscribed = Harness::with(|b| b.fee_collection(FeeCollection::Subscription));
        subscribed.register(&user("twice"), CardBehaviour::Succeeds).await;
        for invoice in ["in_first", "in_second"] {
            subscribed
                .service
                .record_fixed_fee_paid(&user("twice"), november(), invoice, Plan::default().fixed_fee())
                .await
                .expect("recorded");
        }
    });
    assert_eq!(
        counters.get("token_billing_collections_total{outcome=failed}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("token_billing_collections_total{outcome=pending}"),
        Some(&1)
    );
    assert_eq!(
        counters.get("token_billing_collections_total{outcome=succeeded}"),
        Some(&1)
    );
    assert_eq!(counters.get("token_billing_charges_resumed_total"), Some(&1));
    assert_eq!(gauges.get("token_billing_charges_past_lease"), Some(&1.0));
    assert_eq!(counters.get("token_billing_duplicate_payments_total"), Some(&1));
}

#[test]
fn a_batch_the_store_cannot_record_counts_each_of_its_events_failed() {
    let (counters, _, _) = recorded(|| async {
        let inner = Arc::new(token_billing::InMemoryUsageStore::new());
        let faulty = Arc::new(token_billing::testing::faults::FaultyStore::new(inner));
        let sandbox = SandboxGateway::new();
        let h = Harness::over(faulty.clone(), Arc::new(sandbox.clone()), sandbox, |b| b);
        faulty.inject(
            token_billing::testing::faults::StoreOp::RecordUsage,
            Fault::FailBefore,
            1,
        );
        let batch = (0..3).map(|i| UsageReport::new("batched", 1_000 + i, "chat")).collect();
        assert!(h.service.process_token_usage_batch(batch).await.is_err());
    });
    assert_eq!(counters.get("token_billing_events_failed_total{cause=store}"), Some(&3));
    assert!(!counters.contains_key("token_billing_events_recorded_total"));
}
