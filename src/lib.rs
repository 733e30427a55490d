//! workersd: gives every worker process of a multi-process web service its own Prometheus
//! scrape target. Stages: `sources` → `probe` → `reconcile` (pure) → `sinks`.

pub mod app;
pub mod cli;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod probe;
pub mod reconcile;
pub mod secret;
pub mod server;
pub mod sinks;
pub mod sources;
pub mod tls;
pub mod validate;
