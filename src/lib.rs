//! workersd gives every worker process of a multi-process web service (gunicorn, uwsgi,
//! puma, ...) its own Prometheus scrape target.
//!
//! ```text
//!  sources ──snapshots──▶ probe ──live ports──▶ catalog ──desired state──▶ sinks
//!  file, kubernetes,      sweeps each          desired (pure)              consul (catalog or
//!  nomad (declaration     target's range       plan (pure, per sink)       agent), http_sd,
//!  checks every declared                                                   workermetrics_status,
//!  target)                                                                 kubernetes_events
//! ```
//!
//! - [`sources`] say where workers may live; every way of declaring a target goes through
//!   [`declaration`], the one validator, into [`model::Target`]s.
//! - [`probe`] finds which ports of each range are live metrics endpoints; its scheduling
//!   policy (`probe::sweep`) is pure, its sockets are in `probe::connect` and `probe::http`.
//! - [`catalog`] is the pure core: the desired catalog and the plan that reaches it without
//!   touching entries workersd does not own. [`pipeline`] is the loop between them.
//! - [`sinks`] publish: Consul (`sinks::consul`: the catalog with its pure `txn` sizing, or
//!   the local agent's services), Prometheus HTTP SD, and on Kubernetes the WorkerMetrics
//!   status and Warning Events.
//! - [`runtime`] assembles a controller for each mode (standalone, Kubernetes, Nomad), with
//!   leader election and the node-local janitor, the admin server (`/metrics`, `/healthz`,
//!   `/readyz`, the status page), limits and shutdown;
//!   [`telemetry`] sets up logs, [`metrics`] holds workersd's own metrics.

pub mod catalog;
pub mod cli;
pub mod declaration;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod kube_mock;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod probe;
pub mod runtime;
pub mod secret;
pub mod sinks;
pub mod sources;
pub mod telemetry;
pub mod tls;
