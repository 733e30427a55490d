//! `workersd nomad`: this Nomad client's allocations, into the shared pipeline and sinks.

use super::settings::ConsulNode;
use super::{Controller, shutdown};
use crate::cli::NomadArgs;
use crate::metrics::Metrics;
use crate::secret::{FileSecret, Secret, TokenSource};
use crate::sources::TargetSnapshot;
use crate::sources::nomad::client::{NomadClient, NomadSettings};
use crate::sources::nomad::watch as nomad_watch;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

fn nomad_settings(args: &NomadArgs) -> anyhow::Result<NomadSettings> {
    let token = match &args.nomad_token_file {
        Some(path) => TokenSource::File(FileSecret::open(path).context("--nomad-token-file")?),
        None => match std::env::var("NOMAD_TOKEN") {
            Ok(token) if !token.trim().is_empty() => TokenSource::Fixed(Secret::new(token.trim())),
            _ => TokenSource::None,
        },
    };
    let address =
        crate::sinks::consul::normalize_address(&args.nomad_addr).context("--nomad-addr")?;
    Ok(NomadSettings {
        address,
        token,
        region: args.nomad_region.clone(),
        tls: crate::tls::TlsSettings {
            ca_file: args.nomad_ca_file.clone(),
            client_cert: args.nomad_client_cert.clone(),
            client_key: args.nomad_client_key.clone(),
            server_name: args.nomad_tls_server_name.clone(),
        },
        wait: args.nomad_wait.min(Duration::from_secs(300)),
        request_timeout: Duration::from_secs(10),
    })
}

/// The Consul node (and owner id) of one Nomad client: `workersd-<node name>`.
fn consul_node(node_name: &str) -> ConsulNode {
    let name: String = node_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    ConsulNode::named(format!("workersd-{name}"))
}

pub async fn run_nomad(args: NomadArgs) -> anyhow::Result<()> {
    let client = NomadClient::new(nomad_settings(&args)?)?;
    let node = tokio::select! {
        node = client.node() => node.context("cannot find this Nomad agent's node")?,
        () = shutdown::signal() => return Ok(()),
    };
    tracing::info!(node_id = %node.id, node = %node.name, "following this Nomad client's allocations");
    let namespace = (args.nomad_namespace != "*").then(|| args.nomad_namespace.clone());
    let controller =
        Controller::prepare(args.run, consul_node(&node.name), Arc::new(Metrics::new())).await?;
    let (targets_tx, targets_rx) = watch::channel::<TargetSnapshot>(Arc::new(Vec::new()));
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(nomad_watch::run(
        client,
        node.id,
        namespace,
        targets_tx,
        controller.metrics.clone(),
        ready_tx,
    ));
    tokio::select! {
        _ = ready_rx => {}
        () = shutdown::signal() => return Ok(()),
    }
    let started = controller.start(targets_rx);
    shutdown::signal().await;
    started.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_nomad_client_owns_its_entries_under_its_node_name() {
        assert_eq!(consul_node("client-1").name, "workersd-client-1");
        assert_eq!(consul_node("ip_10_0_0_5 x").name, "workersd-ip-10-0-0-5-x");
    }
}
