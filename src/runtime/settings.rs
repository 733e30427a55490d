//! Settings derived from flags and the host: the Consul client's settings and default names.

use crate::cli::RunArgs;
use crate::secret::{FileSecret, Secret, TokenSource};
use crate::sinks::consul;
use anyhow::Context;
use std::collections::BTreeMap;

/// The synthetic Consul node a mode publishes under, unless `--consul-node` names another.
#[derive(Clone, Debug)]
pub struct ConsulNode {
    pub name: String,
    /// Written on the node beside `external-source` when workersd creates it.
    pub meta: BTreeMap<String, String>,
}

impl ConsulNode {
    pub fn named(name: String) -> Self {
        Self {
            name,
            meta: BTreeMap::new(),
        }
    }
}

pub(super) fn consul_settings(
    run: &RunArgs,
    addr: &str,
    node: ConsulNode,
    owner: String,
) -> anyhow::Result<consul::ConsulSettings> {
    let address = consul::normalize_address(addr).context("--consul-addr")?;
    let token = match &run.consul_token_file {
        Some(path) => TokenSource::File(FileSecret::open(path).context("--consul-token-file")?),
        None => match std::env::var("CONSUL_HTTP_TOKEN") {
            Ok(token) if !token.trim().is_empty() => TokenSource::Fixed(Secret::new(token.trim())),
            _ => TokenSource::None,
        },
    };
    Ok(consul::ConsulSettings {
        address,
        token,
        datacenter: run.consul_datacenter.clone(),
        node: node.name,
        node_address: run.consul_node_address.clone(),
        node_meta: node.meta,
        owner,
        resync_interval: run.consul_resync_interval,
        request_timeout: run.consul_timeout,
        tls: crate::tls::TlsSettings {
            ca_file: run.consul_ca_file.clone(),
            client_cert: run.consul_client_cert.clone(),
            client_key: run.consul_client_key.clone(),
            server_name: run.consul_tls_server_name.clone(),
        },
    })
}

pub(super) fn hostname_or_localhost() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

pub(super) fn default_node() -> ConsulNode {
    ConsulNode::named(default_node_name())
}

fn default_node_name() -> String {
    let host: String = hostname_or_localhost()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("workersd-{host}")
}
