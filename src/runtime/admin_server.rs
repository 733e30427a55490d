//! The controller's own HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and the status
//! page (`/`, `/status`).

use super::{limits, status_page};
use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Ready once targets are loaded, every target was probed once and (when enabled) Consul
/// holds the result.
#[derive(Default)]
pub struct Readiness {
    /// Waiting for leadership: healthy, but not the instance doing the work.
    pub standby: AtomicBool,
    pub probed: AtomicBool,
    pub consul_synced: Option<Arc<AtomicBool>>,
    /// Kubernetes mode: the WorkerMetrics CRD is absent (annotations still work), shared
    /// with the watch task.
    pub crd_missing: Arc<AtomicBool>,
}

impl Readiness {
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if self.standby.load(Ordering::Relaxed) {
            problems.push("standing by for leadership");
        }
        if !self.probed.load(Ordering::Relaxed) {
            problems.push("targets not yet probed");
        }
        if self
            .consul_synced
            .as_ref()
            .is_some_and(|s| !s.load(Ordering::Relaxed))
        {
            problems.push("consul not yet synced");
        }
        problems
    }

    /// Conditions worth reporting that do not make the instance unready.
    pub fn notes(&self) -> Vec<&'static str> {
        let mut notes = Vec::new();
        if self.crd_missing.load(Ordering::Relaxed) {
            notes.push("WorkerMetrics CRD not installed: only pod annotations are used");
        }
        notes
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    status: status_page::Sources,
}

async fn status_html(State(state): State<AppState>) -> impl IntoResponse {
    let page = status_page::html(&status_page::status(&state.status));
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page)
}

async fn status_json(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(status_page::status(&state.status))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Gauges of state kept elsewhere, read when scraped.
    let m = &state.metrics;
    m.ready
        .set(i64::from(state.readiness.problems().is_empty()));
    if let Some(open) = limits::open_fds() {
        m.open_fds.set(open as i64);
    }
    if let Ok(limit) = limits::current() {
        m.max_fds.set(i64::try_from(limit.soft).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let problems = state.readiness.problems();
    let notes = state.readiness.notes();
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    if problems.is_empty() {
        (StatusCode::OK, format!("ready{notes}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}{notes}\n", problems.join(", ")),
        )
    }
}

pub fn router(metrics_: Arc<Metrics>, status: status_page::Sources) -> axum::Router {
    axum::Router::new()
        .route("/", get(status_html))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics: metrics_,
            readiness: status.readiness.clone(),
            status,
        })
}

/// Binds first (so a taken port fails start-up with a clear error), then serves forever.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))
}

pub async fn serve(listener: tokio::net::TcpListener, router: axum::Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}
