//! The Kubernetes source: annotated pods and `WorkerMetrics` custom resources.

pub mod crd;
pub mod resolve;
pub mod spec;
pub mod watch;
