//! `GET /metrics`: what the library reports through the `metrics` facade, in Prometheus's text
//! format, for the host's backend key (the same key as the writes). The recorder is installed
//! once per process, when the service is configured.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::{ApiError, AppState};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder: installed as the global `metrics` recorder the first time
/// it is asked for.
pub(crate) fn recorder() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        match ::metrics::set_global_recorder(recorder) {
            Ok(()) => token_billing::describe_metrics(),
            Err(_) => tracing::warn!("another metrics recorder is installed: /metrics reports nothing"),
        }
        // The recorder keeps histogram samples until its upkeep folds them: run it whether or
        // not anybody scrapes, so that memory stays bounded.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(error = %error, "no upkeep thread for the metrics: each scrape folds them");
        }
        handle
    })
}

/// `GET /metrics`.
pub(crate) async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.backend(&headers)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        recorder().render(),
    )
        .into_response())
}
