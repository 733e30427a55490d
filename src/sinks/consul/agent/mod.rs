//! Agent registration: each live worker is a service of the host's local Consul agent,
//! with a TTL check workersd passes while the worker lives. The agent syncs them to the
//! catalog under its own node, so they live and die with the host: workersd killed, the
//! checks go critical after the TTL and the agent reaps the services; the host dead, serf
//! marks its node failed and every service on it critical at once.
//!
//! Restart safety as in catalog registration: the agent's services carrying our owner id
//! are adopted, nothing is deregistered until every target was probed once, and services
//! of anyone else are never touched (the plan's ownership rules).

mod client;
pub mod registration;

use self::registration::{CheckSettings, Passes, check_id};
use super::{
    ConsulClient, ConsulError, RETRY_MAX, RETRY_MIN, SharedSinkStatus, SyncOutcome, jittered,
    note_pass,
};
use crate::catalog::plan::{self as reconcile, Op};
use crate::metrics::Metrics;
use crate::model::Catalog;
use crate::pipeline::{DesiredRx, DesiredState};
use backon::BackoffBuilder;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::Instant;
use tracing::Instrument;

const SINK: &str = "consul_agent";

pub struct AgentSink {
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    check: CheckSettings,
    /// The agent's services as last read or written; `None`: re-read before writing.
    known: Option<Catalog>,
    last_read: Option<Instant>,
    deregister_allowed: bool,
    passes: Passes,
    reported_conflicts: Vec<String>,
    pub synced: Arc<AtomicBool>,
    pub status: SharedSinkStatus,
    span: tracing::Span,
}

impl AgentSink {
    pub fn new(client: ConsulClient, check: CheckSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            span: tracing::info_span!("consul_agent_sink", owner = %client.settings.owner),
            client: Arc::new(client),
            metrics,
            check,
            known: None,
            last_read: None,
            deregister_allowed: false,
            passes: Passes::default(),
            reported_conflicts: Vec::new(),
            synced: Arc::new(AtomicBool::new(false)),
            status: SharedSinkStatus::default(),
        }
    }

    /// Forget the known state so the next pass re-reads the agent.
    pub fn invalidate(&mut self) {
        self.known = None;
    }

    /// Brings the agent to `desired` and passes every live worker's check that is due.
    pub async fn sync(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        let span = self.span.clone();
        self.pass(desired).instrument(span).await
    }

    async fn pass(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        self.deregister_allowed |= desired.complete;
        let owner = self.client.settings.owner.clone();
        let mut outcome = SyncOutcome::default();
        if self.known.is_none() {
            self.metrics.sink_request(SINK, "read");
            outcome.requests += 1;
            self.known = Some(self.client.agent_services().await?);
            self.last_read = Some(Instant::now());
        }
        let known = self.known.as_ref().expect("read above");
        let plan = reconcile::plan(&desired.catalog, known, &owner, self.deregister_allowed);
        outcome.conflicts = plan.conflicts.len();
        outcome.deferred = plan.deferred_deregistrations;
        if plan.conflicts != self.reported_conflicts {
            if !plan.conflicts.is_empty() {
                tracing::warn!(ids = ?plan.conflicts, "service IDs taken by agent services workersd does not own; left untouched");
            }
            self.reported_conflicts = plan.conflicts.clone();
        }
        // Renames are deregistered first, as in catalog registration.
        for op in plan.first.iter().chain(&plan.ops) {
            outcome.requests += 1;
            match op {
                Op::Register(i) => {
                    self.metrics.sink_request(SINK, "register");
                    let body = registration::registration(i, &self.check);
                    self.client.agent_register(&body).await?;
                    self.passes.passed(i.id.clone(), Instant::now());
                    outcome.registered += 1;
                }
                Op::Deregister(i) => {
                    self.metrics.sink_request(SINK, "deregister");
                    self.client.agent_deregister(&i.id).await?;
                    outcome.deregistered += 1;
                }
            }
            let known = self.known.as_mut().expect("read above");
            reconcile::apply(known, std::slice::from_ref(op));
        }
        // Only the live workers we own are passed; anything else's check is left to expire.
        let known = self.known.as_ref().expect("read above");
        let ours = |id: &str| {
            desired.catalog.contains_key(id)
                && known
                    .get(id)
                    .is_some_and(|have| reconcile::is_owned_by(have, &owner))
        };
        self.passes.retain(ours);
        let live = desired.catalog.keys().filter(|id| ours(id));
        let every = Passes::every(self.check.ttl);
        for id in self.passes.due(live, Instant::now(), every) {
            self.metrics.sink_request(SINK, "check_pass");
            outcome.requests += 1;
            self.client.agent_check_pass(&check_id(&id)).await?;
            self.passes.passed(id, Instant::now());
        }
        self.metrics
            .sink_operations(SINK, "register", outcome.registered as u64);
        self.metrics
            .sink_operations(SINK, "deregister", outcome.deregistered as u64);
        Ok(outcome)
    }

    /// Follows the desired state until `stop` completes; returns the sink for a last pass.
    /// The agent is re-read every resync interval (a local call): an agent restarted in
    /// `-dev` mode, or a service reaped meanwhile, is registered again.
    pub async fn run_until(
        self,
        desired: DesiredRx,
        stop: impl std::future::Future<Output = ()>,
    ) -> Self {
        let span = self.span.clone();
        self.follow(desired, stop).instrument(span).await
    }

    async fn follow(
        mut self,
        mut desired: DesiredRx,
        stop: impl std::future::Future<Output = ()>,
    ) -> Self {
        tokio::pin!(stop);
        let resync = self.client.settings.resync_interval;
        let retries = jittered(RETRY_MIN, RETRY_MAX);
        let mut backoff = retries.build();
        loop {
            let state = desired.borrow_and_update().clone();
            let result = self.sync(&state).await;
            note_pass(&self.status, result.as_ref());
            let retry_in = match result {
                Ok(outcome) => {
                    if outcome.registered + outcome.deregistered > 0 {
                        tracing::info!(
                            registered = outcome.registered,
                            deregistered = outcome.deregistered,
                            "agent services updated"
                        );
                    }
                    if state.complete {
                        self.synced.store(true, Ordering::Relaxed);
                    }
                    backoff = retries.build();
                    None
                }
                Err(e) => {
                    self.metrics.sink_error(SINK, e.kind());
                    let delay = backoff.next().unwrap_or(RETRY_MAX);
                    tracing::warn!(error = %e, retry_in = ?delay, "consul agent sync failed; will re-read and retry");
                    self.invalidate();
                    Some(delay)
                }
            };
            let next_read = self.last_read.map_or_else(Instant::now, |at| at + resync);
            let next_pass = self.passes.next_due(Passes::every(self.check.ttl));
            let wake_at = match retry_in {
                Some(delay) => Instant::now() + delay,
                None => next_pass.map_or(next_read, |pass| pass.min(next_read)),
            };
            tokio::select! {
                () = &mut stop => break,
                changed = desired.changed(), if retry_in.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep_until(wake_at) => {}
            }
            if Instant::now() >= next_read {
                self.invalidate();
            }
        }
        self
    }
}
