//! The HTTP endpoints: /healthz, /readyz and /metrics.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::worker::Readiness;

#[derive(Clone)]
struct AppState {
    ready: Readiness,
    metrics: PrometheusHandle,
}

/// Install the Prometheus recorder (once per process).
pub fn install_metrics() -> Result<PrometheusHandle> {
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Bind `addr` and serve until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { ready, metrics });
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    tracing::info!(addr = %bound, "http listening (/healthz, /readyz, /metrics)");
    Ok(bound)
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not joined\n")
    }
}

async fn metrics_text(State(s): State<AppState>) -> String {
    s.metrics.render()
}
