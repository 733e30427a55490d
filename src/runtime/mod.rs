//! Assembles a running controller. Every mode (standalone, Kubernetes) feeds the same
//! pipeline and sinks through a `TargetSnapshot` channel.

use crate::cli::{KubernetesArgs, Liveness, RunArgs, StandaloneArgs};
pub mod admin_server;
pub mod leader;
pub mod limits;

use self::admin_server::{self as server, Readiness};
use self::leader::LeaseSettings;
use crate::metrics::Metrics;
use crate::pipeline::{self, DesiredRx, desired_channel};
use crate::probe::ProbeSettings;
use crate::secret::{FileSecret, Secret, TokenSource};
use crate::sinks::workermetrics_status as status;
use crate::sinks::{consul, http_sd};
use crate::sources::kubernetes::resolve::ResolveSettings;
use crate::sources::kubernetes::spec::NamePolicy;
use crate::sources::kubernetes::watch as kube_watch;
use crate::sources::{self, TargetSnapshot, file};
use crate::validate;
use anyhow::{Context, bail};
use futures::FutureExt;
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
    let controller =
        Controller::prepare(args.run, default_node_name(), Arc::new(Metrics::new())).await?;
    let (targets_tx, targets_rx) =
        watch::channel::<TargetSnapshot>(sources::share_unchanged(targets, &[]));
    tokio::spawn(file::watch_targets_file(
        args.targets.clone(),
        args.reload_interval,
        text,
        targets_tx,
        controller.metrics.clone(),
    ));
    let running = controller.start(targets_rx);
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

pub async fn run_kubernetes(args: KubernetesArgs) -> anyhow::Result<()> {
    validate::owner_id(&args.cluster_name)
        .map_err(anyhow::Error::msg)
        .context("--cluster-name")?;
    let names = NamePolicy::new(&args.service_name_template)
        .map_err(anyhow::Error::msg)
        .context("--service-name-template")?;
    let client = kube::Client::try_default().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let controller = Controller::prepare(
        args.run,
        format!("workersd-{}", args.cluster_name),
        Arc::new(Metrics::new()),
    )
    .await?;
    let identity = args.identity.clone().unwrap_or_else(hostname_or_localhost);
    // Renewal runs on its own task from the moment the lease is held: the initial sync below
    // can take longer than the whole lease on a big cluster, and nothing the rest of the
    // process awaits may keep the lease from being renewed.
    let mut lost = if args.leader_election {
        let settings = LeaseSettings {
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
        };
        let api = kube::Api::namespaced(client.clone(), &settings.namespace);
        controller.readiness.standby.store(true, Ordering::Relaxed);
        let acquired = tokio::select! {
            acquired = leader::acquire(&api, &settings) => acquired,
            _ = shutdown_signal() => return Ok(()),
        };
        controller.readiness.standby.store(false, Ordering::Relaxed);
        let lease = format!("{}/{}", settings.namespace, settings.name);
        let holder = tokio::spawn(async move { leader::hold(&api, &settings, acquired).await });
        async move {
            let _ = holder.await;
            lease
        }
        .boxed()
    } else {
        std::future::pending::<String>().boxed()
    };
    let watch_settings = kube_watch::WatchSettings {
        namespaces: args.namespaces.clone(),
        resolve: ResolveSettings {
            names,
            allow_host_network: args.allow_host_network,
            max_ports_per_namespace: args.max_ports_per_namespace,
        },
        identity,
        crd_missing: controller.readiness.crd_missing.clone(),
        event_refresh: args.event_refresh_interval,
    };
    let metrics = controller.metrics.clone();
    let refused = controller.refused();
    let outputs = tokio::select! {
        outputs = kube_watch::start(client.clone(), watch_settings, metrics, refused) => outputs,
        lease = &mut lost => bail!("lost leadership of lease {lease} during the initial sync; exiting so a standby takes over"),
        _ = shutdown_signal() => return Ok(()),
    };
    let running = controller.start(outputs.targets);
    tokio::spawn(status::run(
        client,
        outputs.resources,
        running.desired.clone(),
    ));
    tokio::select! {
        lease = &mut lost => {
            bail!("lost leadership of lease {lease}; exiting so a standby takes over")
        }
        _ = shutdown_signal() => {}
    }
    running.stop().await;
    Ok(())
}

fn consul_settings(
    run: &RunArgs,
    addr: &str,
    node: String,
    owner: String,
) -> anyhow::Result<consul::ConsulSettings> {
    let address = consul::normalize_address(addr).context("--consul-addr")?;
    let token = match &run.consul_token_file {
        Some(path) => TokenSource::File(
            FileSecret::open(path)
                .map_err(anyhow::Error::msg)
                .context("--consul-token-file")?,
        ),
        None => match std::env::var("CONSUL_HTTP_TOKEN") {
            Ok(token) if !token.trim().is_empty() => TokenSource::Fixed(Secret::new(token.trim())),
            _ => TokenSource::None,
        },
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
        tls: crate::tls::TlsSettings {
            ca_file: run.consul_ca_file.clone(),
            client_cert: run.consul_client_cert.clone(),
            client_key: run.consul_client_key.clone(),
            server_name: run.consul_tls_server_name.clone(),
        },
    })
}

/// A validated, bound controller whose health endpoints already answer; `start` begins the work.
pub struct Controller {
    run: RunArgs,
    owner: String,
    /// Descriptors left for held worker connections once probes and the rest have theirs.
    hold_capacity: usize,
    sink: Option<consul::ConsulSink>,
    desired_tx: watch::Sender<Arc<pipeline::DesiredState>>,
    desired_rx: DesiredRx,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Controller {
    pub async fn prepare(
        run: RunArgs,
        default_node: String,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        run.validate().map_err(anyhow::Error::msg)?;
        let fds = limits::raise_for(run.probe_concurrency).map_err(anyhow::Error::msg)?;
        tracing::debug!(soft = fds.soft, hard = fds.hard, "file-descriptor limit");
        let node = run.consul_node.clone().unwrap_or(default_node);
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
                let client = consul::ConsulClient::new(settings)?;
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
        // Bind before any work so a taken port is a clear start-up error.
        let own = server::bind(run.listen, "--listen").await?;
        let sd_listener = match run.http_sd_listen.0 {
            Some(addr) => Some(server::bind(addr, "--http-sd-listen").await?),
            None => None,
        };
        tracing::info!(listen = %run.listen, "serving /metrics, /healthz and /readyz");
        tokio::spawn(server::serve(
            own,
            server::router(metrics.clone(), readiness.clone()),
        ));
        // HTTP SD answers from the start: a standby says so (503) rather than leaving
        // Prometheus hanging.
        let (desired_tx, desired_rx) = desired_channel();
        if let Some(listener) = sd_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listen = %addr, "serving Prometheus HTTP SD at /targets");
            }
            let router = http_sd::router(desired_rx.clone(), readiness.clone());
            tokio::spawn(server::serve(listener, router));
        }
        Ok(Self {
            hold_capacity: limits::hold_capacity(fds, run.probe_concurrency),
            run,
            owner,
            sink,
            desired_tx,
            desired_rx,
            metrics,
            readiness,
        })
    }

    /// The catalog entries Consul refused and the sink holds back; `None` without a Consul sink.
    pub fn refused(
        &self,
    ) -> Option<watch::Receiver<crate::sinks::consul::quarantine::RefusedEntries>> {
        self.sink.as_ref().map(consul::ConsulSink::refused)
    }

    /// Starts probing, publishing and serving HTTP SD for the targets on `targets`.
    pub fn start(self, targets: watch::Receiver<TargetSnapshot>) -> Running {
        let (desired_tx, desired_rx) = (self.desired_tx, self.desired_rx);
        let settings = ProbeSettings {
            interval: self.run.probe_interval,
            timeout: self.run.probe_timeout,
            concurrency: self.run.probe_concurrency,
            fast_interval: self.run.fast_interval,
            fast_period: self.run.fast_period,
            full_sweep_interval: self.run.full_sweep_interval,
            holds: match self.run.liveness {
                Liveness::Hold => self.hold_capacity,
                Liveness::Connect => 0,
            },
        };
        tokio::spawn(pipeline::run(
            self.owner,
            targets,
            settings,
            self.metrics.clone(),
            desired_tx,
        ));
        let (stop_sink, sink_stopped) = tokio::sync::oneshot::channel::<()>();
        let sink_task = self.sink.map(|sink| {
            let stop = async {
                let _ = sink_stopped.await;
            };
            tokio::spawn(sink.run_until(desired_rx.clone(), stop))
        });
        tokio::spawn(mark_probed(desired_rx.clone(), self.readiness.clone()));
        Running {
            desired: desired_rx,
            sink_task,
            stop_sink,
            deregister_on_exit: self.run.deregister_on_exit,
        }
    }
}

/// A started controller.
pub struct Running {
    pub desired: DesiredRx,
    sink_task: Option<tokio::task::JoinHandle<consul::ConsulSink>>,
    stop_sink: tokio::sync::oneshot::Sender<()>,
    deregister_on_exit: bool,
}

impl Running {
    /// Stops writing. Entries stay in place for the next instance, unless
    /// `--deregister-on-exit` asked for this owner's entries to be removed.
    pub async fn stop(self) {
        let Some(task) = self.sink_task else {
            tracing::info!("shutting down");
            return;
        };
        if !self.deregister_on_exit {
            task.abort();
            let _ = task.await;
            tracing::info!(
                "shutting down; catalog entries are left in place for the next instance"
            );
            return;
        }
        // The running sink finishes its pass and hands itself back for the last one.
        let _ = self.stop_sink.send(());
        let limit = std::time::Duration::from_secs(10);
        let mut sink = match tokio::time::timeout(limit, task).await {
            Ok(Ok(sink)) => sink,
            _ => {
                tracing::error!(
                    "shutting down; the Consul sink did not stop within 10s, entries are left in place"
                );
                return;
            }
        };
        // Re-read first: the last pass must see what Consul holds now.
        sink.invalidate();
        let empty = pipeline::DesiredState {
            catalog: Default::default(),
            complete: true,
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), sink.sync(&empty)).await {
            Ok(Ok(outcome)) => tracing::info!(
                deregistered = outcome.deregistered,
                "shutting down; deregistered this owner's entries"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "shutting down; could not deregister this owner's entries")
            }
            Err(_) => tracing::error!("shutting down; deregistration timed out after 10s"),
        }
    }
}

async fn mark_probed(mut desired: DesiredRx, readiness: Arc<Readiness>) {
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

fn hostname_or_localhost() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
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
