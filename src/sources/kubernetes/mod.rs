//! The Kubernetes source: annotated pods and `WorkerMetrics` custom resources.

pub mod crd;
pub mod events;
pub mod leader;
pub mod resolve;
pub mod spec;
pub mod status;
pub mod watch;

#[cfg(test)]
mod api_tests;
