//! The Nomad source (in progress, issue 18): a node's allocations opted in by `workersd_*`
//! meta. `alloc` reads one allocation as Nomad's API returns it into targets; pure.

pub mod alloc;
