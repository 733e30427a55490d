//! Sinks publish the desired catalog: the Consul catalog for `consul_sd_configs`, and a
//! built-in Prometheus HTTP SD endpoint for users without Consul.

pub mod consul;
pub mod http_sd;
pub mod quarantine;
