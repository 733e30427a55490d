//! Sinks publish the desired catalog: the Consul catalog for `consul_sd_configs`, and a
//! built-in Prometheus HTTP SD endpoint for users without Consul. On Kubernetes, what workersd
//! found is also written back: `WorkerMetrics` status and Warning Events.

pub mod consul;
pub mod http_sd;
pub mod kubernetes_events;
pub mod workermetrics_status;
