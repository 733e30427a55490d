//! workersd: gives every worker process of a multi-process web service its own Prometheus
//! scrape target. Stages: `sources` → `probe` → `catalog` (pure) → `sinks`; `runtime` wires
//! them together.

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
