//! What the service logs at which level: one recorded event is `debug` (a metering path logs per
//! request at `debug`), what happens to a charge is `info`.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::Harness;
use token_billing::UsageReport;
use tracing::Level;

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("not poisoned")).into_owned()
    }
}

/// The log of one event of 9M tokens (a fee and a block collected) with `level` enabled.
fn log_of_one_event(level: Level) -> String {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let h = Harness::new();
        h.service
            .process_token_usage(UsageReport::new("lia", 9_000_000, "chat"))
            .await
            .expect("recorded");
        h.service
            .process_token_usage_batch(vec![UsageReport::new("lia", 1_000, "chat")])
            .await
            .expect("recorded");
    });
    captured.text()
}

#[test]
fn a_recorded_event_is_logged_at_debug_and_its_charges_at_info() {
    let info = log_of_one_event(Level::INFO);
    assert!(!info.contains("usage recorded"), "{info}");
    assert!(!info.contains("batch recorded"), "{info}");
    assert!(
        info.contains("charge settled"),
        "collection outcomes stay at info: {info}"
    );
    let debug = log_of_one_event(Level::DEBUG);
    assert!(
        debug.contains("usage recorded") && debug.contains("batch recorded"),
        "{debug}"
    );
}
