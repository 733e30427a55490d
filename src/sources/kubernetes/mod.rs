//! The Kubernetes source: annotated pods and `WorkerMetrics` custom resources.
//!
//! `watch` (the only module talking to the API server) feeds an [`index::ClusterIndex`] of
//! slim pods ([`pod`]) and compiled resources ([`crd`]); `resolve` turns it into targets, with
//! pods declaring through [`annotations`] or a `WorkerMetrics`; `problems` reports what is
//! refused, as Events.

pub mod annotations;
pub mod crd;
pub mod index;
pub mod nodes;
pub mod pod;
pub mod problems;
pub mod resolve;
pub mod watch;
