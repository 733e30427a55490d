//! Assembles a running controller from a source of targets. Every mode (standalone now,
//! Kubernetes next) feeds the same pipeline and sinks through a `TargetSnapshot` channel.

use crate::cli::{RunArgs, StandaloneArgs};
use crate::metrics::Metrics;
use crate::pipeline::{self, desired_channel};
use crate::probe::ProbeSettings;
use crate::secret::Secret;
use crate::server::{self, Readiness};
use crate::sinks::{consul, http_sd};
use crate::sources::{TargetSnapshot, file};
use crate::validate;
use anyhow::{Context, bail};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

pub async fn run_standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.targets)
        .with_context(|| format!("cannot read targets file {}", args.targets.display()))?;
    let targets = match file::parse_targets(&text) {
        Ok(targets) => targets,
        Err(errors) => {
            for error in &errors {
                tracing::error!(file = %args.targets.display(), error = %error, "invalid targets file");
            }
            bail!(
                "{} has {} error(s); run `workersd check --targets {}`",
                args.targets.display(),
                errors.len(),
                args.targets.display()
            );
        }
    };
    tracing::info!(file = %args.targets.display(), targets = targets.len(), "targets file loaded");
    let metrics = Arc::new(Metrics::new());
    let (targets_tx, targets_rx) = watch::channel::<TargetSnapshot>(Arc::new(targets));
    tokio::spawn(file::watch_targets_file(
        args.targets.clone(),
        args.reload_interval,
        text,
        targets_tx,
        metrics.clone(),
    ));
    run_controller(args.run, targets_rx, metrics).await
}

fn consul_settings(
    run: &RunArgs,
    addr: &str,
    node: String,
    owner: String,
) -> anyhow::Result<consul::ConsulSettings> {
    let address = consul::normalize_address(addr)
        .map_err(anyhow::Error::msg)
        .context("--consul-addr")?;
    let token = match &run.consul_token_file {
        Some(path) => Some(
            Secret::from_file(path)
                .map_err(anyhow::Error::msg)
                .context("--consul-token-file")?,
        ),
        None => std::env::var("CONSUL_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| Secret::new(t.trim())),
    };
    Ok(consul::ConsulSettings {
        address,
        token,
        datacenter: run.consul_datacenter.clone(),
        node,
        node_address: run.consul_node_address.clone(),
        owner,
        resync_interval: run.consul_resync_interval,
        request_timeout: run.consul_timeout,
    })
}

/// Runs the pipeline and sinks for targets arriving on `targets` until SIGINT/SIGTERM.
/// Shutdown deregisters nothing: entries stay live for the next instance to adopt.
pub async fn run_controller(
    run: RunArgs,
    targets: watch::Receiver<TargetSnapshot>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    run.validate().map_err(anyhow::Error::msg)?;
    let node = match &run.consul_node {
        Some(node) => node.clone(),
        None => default_node_name(),
    };
    let owner = run.owner_id.clone().unwrap_or_else(|| node.clone());
    validate::owner_id(&owner)
        .map_err(anyhow::Error::msg)
        .context("--owner-id")?;
    validate::owner_id(&node)
        .map_err(anyhow::Error::msg)
        .context("--consul-node")?;

    let mut readiness = Readiness::default();
    let sink = match &run.consul_addr {
        Some(addr) => {
            let settings = consul_settings(&run, addr, node.clone(), owner.clone())?;
            tracing::info!(
                consul = %settings.address,
                node = %settings.node,
                owner = %settings.owner,
                token = settings.token.is_some(),
                "consul sink enabled"
            );
            let client = consul::ConsulClient::new(settings).map_err(anyhow::Error::msg)?;
            let sink = consul::ConsulSink::new(client, metrics.clone());
            readiness.consul_synced = Some(sink.synced.clone());
            Some(sink)
        }
        None => {
            tracing::info!("consul sink disabled (no --consul-addr)");
            None
        }
    };
    let readiness = Arc::new(readiness);

    // Bind before starting work so a taken port is a clear start-up error.
    let own = server::bind(run.listen, "--listen").await?;
    let sd = match run.http_sd_listen.0 {
        Some(addr) => Some(server::bind(addr, "--http-sd-listen").await?),
        None => None,
    };

    let (desired_tx, desired_rx) = desired_channel();
    let settings = ProbeSettings {
        interval: run.probe_interval,
        timeout: run.probe_timeout,
        concurrency: run.probe_concurrency,
        fast_interval: run.fast_interval,
        fast_period: run.fast_period,
    };
    tokio::spawn(pipeline::run(
        owner,
        targets,
        settings,
        metrics.clone(),
        desired_tx,
    ));
    if let Some(sink) = sink {
        tokio::spawn(sink.run(desired_rx.clone()));
    }
    tokio::spawn(mark_probed(desired_rx.clone(), readiness.clone()));

    tracing::info!(listen = %run.listen, "serving /metrics, /healthz and /readyz");
    tokio::spawn(server::serve(own, server::router(metrics, readiness)));
    if let Some(listener) = sd {
        tracing::info!(listen = %listener.local_addr()?, "serving Prometheus HTTP SD at /targets");
        tokio::spawn(server::serve(listener, http_sd::router(desired_rx)));
    }
    shutdown_signal().await;
    tracing::info!("shutting down; catalog entries are left in place for the next instance");
    Ok(())
}

async fn mark_probed(mut desired: pipeline::DesiredRx, readiness: Arc<Readiness>) {
    loop {
        if desired.borrow_and_update().complete {
            readiness.probed.store(true, Ordering::Relaxed);
            return;
        }
        if desired.changed().await.is_err() {
            return;
        }
    }
}

fn default_node_name() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
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

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
