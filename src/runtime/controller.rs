//! A controller: validated and bound (`Controller`), then probing and publishing (`Started`).

use super::admin_server::{self as server, Readiness};
use super::settings::{ConsulNode, consul_settings};
use super::{limits, shutdown, status_page};
use crate::cli::{Registration, RunArgs};
use crate::declaration;
use crate::metrics::Metrics;
use crate::pipeline::{self, DesiredRx, desired_channel};
use crate::probe::results::ProbeResults;
use crate::sinks::consul::agent::AgentSink;
use crate::sinks::consul::agent::registration::CheckSettings;
use crate::sinks::{consul, http_sd};
use crate::sources::TargetSnapshot;
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

/// A validated, bound controller whose health endpoints already answer; `start` begins the work.
pub struct Controller {
    run: RunArgs,
    owner: String,
    /// Descriptors left for held worker connections once probes and the rest have theirs.
    hold_capacity: usize,
    sink: Option<consul::Sink>,
    /// Every port's last probe result, for the status page.
    results: Arc<ProbeResults>,
    /// The Consul sink's settings, for other writers of the same Consul (the janitor).
    consul: Option<consul::ConsulSettings>,
    desired_tx: watch::Sender<Arc<pipeline::DesiredState>>,
    desired_rx: DesiredRx,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Controller {
    pub async fn prepare(
        run: RunArgs,
        default_node: ConsulNode,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        run.validate()?;
        let fds = limits::raise_for(run.probe_concurrency)?;
        tracing::debug!(soft = fds.soft, hard = fds.hard, "file-descriptor limit");
        let node = match &run.consul_node {
            Some(name) => ConsulNode::named(name.clone()),
            None => default_node,
        };
        let owner = run.owner_id.clone().unwrap_or_else(|| node.name.clone());
        declaration::owner_id(&owner).context("--owner-id")?;
        declaration::owner_id(&node.name).context("--consul-node")?;

        let mut readiness = Readiness::default();
        let mut consul = None;
        let sink = match &run.consul_addr {
            Some(addr) => {
                let settings = consul_settings(&run, addr, node.clone(), owner.clone())?;
                consul = Some(settings.clone());
                tracing::info!(
                    consul = %settings.address,
                    registration = ?run.consul_registration,
                    node = %settings.node,
                    owner = %settings.owner,
                    token = settings.token.is_some(),
                    "consul sink enabled"
                );
                let client = consul::ConsulClient::new(settings)?;
                let sink = match run.consul_registration {
                    Registration::Catalog => {
                        consul::Sink::Catalog(consul::ConsulSink::new(client, metrics.clone()))
                    }
                    Registration::Agent => {
                        let check = CheckSettings {
                            ttl: run.consul_check_ttl,
                            deregister_after: run.consul_deregister_critical_after,
                        };
                        consul::Sink::Agent(AgentSink::new(client, check, metrics.clone()))
                    }
                };
                readiness.consul_synced = Some(sink.synced());
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
        tracing::info!(listen = %run.listen, "serving the status page (/, /status), /metrics, /healthz and /readyz");
        let results = Arc::new(ProbeResults::default());
        let status = status_page::Sources {
            results: results.clone(),
            readiness: readiness.clone(),
            consul: sink.as_ref().map(consul::Sink::status),
            refused: sink.as_ref().and_then(consul::Sink::refused),
        };
        tokio::spawn(server::serve(own, server::router(metrics.clone(), status)));
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
            results,
            run,
            owner,
            sink,
            consul,
            desired_tx,
            desired_rx,
            metrics,
            readiness,
        })
    }

    pub fn consul_settings(&self) -> Option<&consul::ConsulSettings> {
        self.consul.as_ref()
    }

    /// The catalog entries Consul refused and the sink holds back; `None` without a Consul sink.
    pub fn refused(
        &self,
    ) -> Option<watch::Receiver<crate::sinks::consul::quarantine::RefusedEntries>> {
        self.sink.as_ref().and_then(consul::Sink::refused)
    }

    /// Starts probing, publishing and serving HTTP SD for the targets on `targets`.
    pub fn start(self, targets: watch::Receiver<TargetSnapshot>) -> Started {
        let (desired_tx, desired_rx) = (self.desired_tx, self.desired_rx);
        let settings = self.run.probe_settings(self.hold_capacity);
        tokio::spawn(pipeline::run_recording(
            self.owner,
            targets,
            settings,
            self.metrics.clone(),
            desired_tx,
            Some(self.results),
        ));
        let (stop_sink, sink_stopped) = tokio::sync::oneshot::channel::<()>();
        let sink_task = self.sink.map(|sink| {
            let stop = async {
                let _ = sink_stopped.await;
            };
            tokio::spawn(sink.run_until(desired_rx.clone(), stop))
        });
        tokio::spawn(mark_probed(desired_rx.clone(), self.readiness.clone()));
        Started {
            desired: desired_rx,
            sink_task,
            stop_sink,
            deregister_on_exit: self.run.deregister_on_exit,
        }
    }
}

/// A started controller.
pub struct Started {
    pub desired: DesiredRx,
    sink_task: Option<tokio::task::JoinHandle<consul::Sink>>,
    stop_sink: tokio::sync::oneshot::Sender<()>,
    deregister_on_exit: bool,
}

impl Started {
    /// Stops writing. Entries stay in place for the next instance, unless
    /// `--deregister-on-exit` asked for this owner's entries to be removed.
    pub async fn stop(self) {
        shutdown::stop_sink(self.sink_task, self.stop_sink, self.deregister_on_exit).await;
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
