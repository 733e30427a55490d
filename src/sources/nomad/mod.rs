//! The Nomad source: this node's allocations, opted in by `workersd_*` meta, followed with
//! blocking queries on the local agent. `alloc` reads one allocation into targets (pure);
//! `client` is the only module talking to Nomad; `watch` is the loop.

pub mod alloc;
pub mod client;
pub mod watch;
