//! The Consul catalog sink. Every live worker becomes one service instance under a synthetic
//! node that workersd owns; writes go through `/v1/txn` in batches of at most 128 operations
//! (64 for Consul before 1.14).
//! What Consul really holds is re-read at start, after any error and when a blocking query
//! sees the node change (at most once per resync interval), and corrected: missing entries
//! re-registered, stale owned entries garbage-collected, entries of anyone else never touched.
//!
//! Here: the sink loop and its settings. Pure policy: `txn` (encoding, sizing, splitting),
//! `quarantine` (refused entries), `permission` (ACL refusals), `decode` (Consul's replies).
//! I/O: `client` (HTTP) and `watch` (the blocking query that says when to re-read).

pub mod agent;
mod client;
mod decode;
mod error;
mod permission;
pub mod quarantine;
mod txn;
mod watch;

pub use self::client::{CatalogNode, ConsulClient, Watched};
pub use self::decode::{ModifyIndexes, NodeRead, decode_node_services, decode_owned_node_services};
pub use self::error::{AddressError, ClientError, ConsulError};
pub use self::txn::{LEGACY_MAX_TXN_OPS, MAX_TXN_BYTES, MAX_TXN_OPS};

use self::error::truncate;
use self::permission::{forbidden_txn, is_permission_denied, permission_summary};
use self::quarantine::Quarantine;
use self::txn::{Batch, TxnLimits, encode};
use self::watch::watch_changes;
use crate::catalog::plan::{self as reconcile, Op};
use crate::metrics::Metrics;
use crate::model::{EXTERNAL_SOURCE, meta_keys};
use crate::pipeline::{DesiredRx, DesiredState};
use crate::secret::TokenSource;
use backon::BackoffBuilder;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

const SINK: &str = "consul";

#[derive(Clone, Debug)]
pub struct ConsulSettings {
    /// Base URL, e.g. `http://127.0.0.1:8500`.
    pub address: String,
    pub token: TokenSource,
    pub datacenter: Option<String>,
    pub node: String,
    pub node_address: String,
    /// Written on the node when workersd creates it, beside `external-source`: in node-local
    /// mode it names the cluster and the Kubernetes node, for the janitor.
    pub node_meta: BTreeMap<String, String>,
    pub owner: String,
    pub resync_interval: Duration,
    pub request_timeout: Duration,
    /// Used for `https://` addresses.
    pub tls: crate::tls::TlsSettings,
}

/// Normalises `CONSUL_HTTP_ADDR`-style values (`host:port` or a URL) to a base URL.
pub fn normalize_address(raw: &str) -> Result<String, AddressError> {
    let raw = raw.trim();
    let raw = match raw.strip_suffix('/') {
        Some(stripped) if !stripped.ends_with(':') && !stripped.ends_with('/') => stripped,
        _ => raw,
    };
    if raw.is_empty() {
        return Err(AddressError::Empty);
    }
    let url = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_string()
    } else if raw.contains("://") {
        return Err(AddressError::Scheme(raw.into()));
    } else {
        format!("http://{raw}")
    };
    let parsed = reqwest::Url::parse(&url).map_err(|e| AddressError::Invalid {
        address: raw.into(),
        source: e.into(),
    })?;
    if parsed.host_str().is_none() {
        return Err(AddressError::NoHost(raw.into()));
    }
    Ok(url)
}

/// Capped exponential delays, jittered so that many sidecars that lost the same Consul do not
/// retry in lockstep when it comes back: each delay is the exponential step plus up to as
/// much again at random, so within `[min, 2 * max)`. Never runs out.
fn jittered(min: Duration, max: Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// Retries while Consul is unhealthy are capped low: a retry is one cheap read, and a long
/// outage must not delay convergence. With jitter the delays are 100-200 ms at first and at
/// most 5 s.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(2500);

/// Result of one successful pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub requests: usize,
    pub registered: usize,
    pub deregistered: usize,
    pub conflicts: usize,
    pub deferred: usize,
    /// Operations Consul refused, withheld and retried later.
    pub quarantined: usize,
}

/// What the sink did last, for the status page.
#[derive(Clone, Debug, Default)]
pub struct SinkStatus {
    /// The last pass that succeeded.
    pub last_sync: Option<std::time::SystemTime>,
    /// The last pass that changed anything.
    pub last_write: Option<std::time::SystemTime>,
    /// The last failure and when; `failing` while no pass succeeded since.
    pub last_error: Option<(String, std::time::SystemTime)>,
    pub failing: bool,
}

/// Shared between a sink's loop and the status page.
pub type SharedSinkStatus = Arc<std::sync::Mutex<SinkStatus>>;

/// Records a pass's result.
pub(crate) fn note_pass(status: &SharedSinkStatus, result: Result<&SyncOutcome, &ConsulError>) {
    let now = std::time::SystemTime::now();
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(outcome) => {
            status.last_sync = Some(now);
            if outcome.registered + outcome.deregistered > 0 {
                status.last_write = Some(now);
            }
            status.failing = false;
        }
        Err(e) => {
            status.last_error = Some((e.to_string(), now));
            status.failing = true;
        }
    }
}

/// What retiring a node did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retired {
    pub deregistered: usize,
    pub node_removed: bool,
    /// Entries of other owners left on the node (they keep it).
    pub others: usize,
}

/// The sink's memory of Consul between passes: `None` means "re-read before writing".
pub struct ConsulSink {
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    known: Option<NodeRead>,
    /// The index of every successful read, for the change watch (sent even when equal).
    reads: tokio::sync::watch::Sender<Option<u64>>,
    last_read: Option<Instant>,
    deregister_allowed: bool,
    reported_conflicts: Vec<String>,
    txn_limits: TxnLimits,
    /// Operations Consul refused, withheld so they do not block the others.
    quarantine: Quarantine,
    /// The entries withheld, published when the set changes (for Kubernetes Events).
    refused: tokio::sync::watch::Sender<quarantine::RefusedEntries>,
    /// This pass's entries the token may not write: left out so the others are published,
    /// then the pass reports `Forbidden`. Not quarantined: they are resent on the sink's
    /// own retry, so a fixed policy takes effect within seconds.
    denied: Vec<(usize, String)>,
    pub synced: Arc<AtomicBool>,
    pub status: SharedSinkStatus,
    /// Every event of the sink and its watch is inside it, so none repeats the node.
    span: tracing::Span,
}

impl ConsulSink {
    pub fn new(client: ConsulClient, metrics: Arc<Metrics>) -> Self {
        let span = tracing::info_span!("consul_sink", node = %client.settings.node);
        Self {
            span,
            client: Arc::new(client),
            metrics,
            known: None,
            reads: tokio::sync::watch::Sender::new(None),
            last_read: None,
            deregister_allowed: false,
            reported_conflicts: Vec::new(),
            txn_limits: TxnLimits::default(),
            quarantine: Quarantine::default(),
            refused: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            denied: Vec::new(),
            synced: Arc::new(AtomicBool::new(false)),
            status: SharedSinkStatus::default(),
        }
    }

    /// Brings Consul to `desired` with the fewest writes; no request at all when the known
    /// state already matches.
    pub async fn sync(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        let span = self.span.clone();
        self.pass(desired).instrument(span).await
    }

    async fn pass(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        // Once every target was probed after start, absent entries really are gone.
        self.deregister_allowed |= desired.complete;
        let owner = self.client.settings.owner.clone();
        let mut outcome = SyncOutcome::default();
        self.denied.clear();
        if self.known.is_none() {
            self.metrics.sink_request(SINK, "read");
            outcome.requests += 1;
            let read = self.client.read_node(&desired.catalog).await?;
            if let Some(meta) = &read.node_meta {
                let marker = meta.get(meta_keys::EXTERNAL_SOURCE);
                if marker.map(String::as_str) != Some(EXTERNAL_SOURCE) {
                    return Err(ConsulError::NodeNotOwned {
                        node: self.client.settings.node.clone(),
                        found: marker.cloned(),
                    });
                }
            }
            self.last_read = Some(Instant::now());
            self.reads.send_replace(Some(read.index));
            self.known = Some(read);
            crate::runtime::limits::release_free_memory();
        }
        let known = self.known.as_mut().expect("read above");
        let plan = reconcile::plan(
            &desired.catalog,
            &known.services,
            &owner,
            self.deregister_allowed,
        );
        outcome.conflicts = plan.conflicts.len();
        outcome.deferred = plan.deferred_deregistrations;
        // Reported when the set changes, not on every pass.
        if plan.conflicts != self.reported_conflicts {
            if !plan.conflicts.is_empty() {
                tracing::warn!(ids = ?plan.conflicts, "service IDs taken by entries workersd does not own; left untouched");
            }
            self.reported_conflicts = plan.conflicts.clone();
        }
        // Services need their node; it is (re)created in the first batch when missing.
        let needs_node = known.node_meta.is_none();
        // Operations Consul refused stay out until their delay runs out or they change.
        self.quarantine
            .retain_planned(plan.first.iter().chain(&plan.ops));
        let now = Instant::now();
        let sendable = |ops: &[Op]| -> Vec<usize> {
            (0..ops.len())
                .filter(|&i| !self.quarantine.withholds(&ops[i], now))
                .collect()
        };
        let (first, rest) = (sendable(&plan.first), sendable(&plan.ops));
        if first.is_empty() && rest.is_empty() {
            self.count_quarantined(&mut outcome);
            return self.denied_error().map_or(Ok(outcome), Err);
        }
        let client = self.client.clone();
        let settings = &client.settings;
        let mut batch = Batch::default();
        if needs_node {
            batch.push(
                encode(&txn::node_op(
                    &settings.node,
                    &settings.node_address,
                    &settings.node_meta,
                    settings.datacenter.as_deref(),
                )),
                None,
            );
        }
        for (ops, sendable) in [(&plan.first, first), (&plan.ops, rest)] {
            if sendable.is_empty() {
                continue;
            }
            for op in sendable.into_iter().map(|i| &ops[i]) {
                let (Op::Register(i) | Op::Deregister(i)) = op;
                // The index read (0: absent when read). Unknown for an entry that exists:
                // refused as stale, and the re-read learns it.
                let modify_index = self
                    .known
                    .as_ref()
                    .and_then(|k| k.modify_index.get(&i.id).copied())
                    .unwrap_or(0);
                let encoded = encode(&txn::service_op(&settings.node, op, modify_index));
                if !batch.ops.is_empty() && !self.txn_limits.fit(&batch, encoded.len()) {
                    self.send(std::mem::take(&mut batch), &mut outcome).await?;
                }
                batch.push(encoded, Some(op));
            }
            // Rows deleted in `first` are committed before they are set again.
            if !batch.ops.is_empty() {
                self.send(std::mem::take(&mut batch), &mut outcome).await?;
            }
        }
        self.count_quarantined(&mut outcome);
        self.metrics
            .sink_operations(SINK, "register", outcome.registered as u64);
        self.metrics
            .sink_operations(SINK, "deregister", outcome.deregistered as u64);
        self.denied_error().map_or(Ok(outcome), Err)
    }

    /// Applies `batch` in one transaction, or in smaller ones when Consul refuses it as too
    /// big (413: more operations or bytes than it accepts); the limits learnt are kept. On
    /// any other error, the next pass re-reads Consul (a batch may have been applied in part).
    async fn send(
        &mut self,
        batch: Batch<'_>,
        outcome: &mut SyncOutcome,
    ) -> Result<(), ConsulError> {
        let mut queue = std::collections::VecDeque::from([batch]);
        while let Some(part) = queue.pop_front() {
            self.metrics.sink_request(SINK, "txn");
            outcome.requests += 1;
            match self.client.txn(part.body()).await {
                Ok(written) => self.applied(part, &written, outcome),
                Err(e) if self.txn_limits.shrink(&e, &part) => {
                    for piece in part.split(&self.txn_limits).into_iter().rev() {
                        queue.push_front(piece);
                    }
                }
                Err(e) => {
                    let node_op = part.ops.iter().position(|(_, op)| op.is_none());
                    if let Some(summary) = forbidden_txn(&e, node_op) {
                        self.known = None;
                        return Err(ConsulError::Forbidden(summary));
                    }
                    match self.isolate(&e, part) {
                        Some(rest) if rest.ops.is_empty() => {}
                        Some(rest) => queue.push_front(rest),
                        None => {
                            self.known = None;
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Withholds the operations of `batch` that Consul refused for themselves and returns
    /// the others, to resend; `None` when isolating cannot help (see [`quarantine::isolate`]).
    fn isolate<'p>(&mut self, error: &ConsulError, batch: Batch<'p>) -> Option<Batch<'p>> {
        let refusals = match error {
            ConsulError::TxnRejected { failed, .. } => failed.clone(),
            // One operation over Consul's body limit on its own.
            ConsulError::Status {
                status: 413, body, ..
            } if batch.ops.len() == 1 => vec![(0, body.clone())],
            _ => return None,
        };
        let node_op = batch.ops.iter().position(|(_, op)| op.is_none());
        let isolation = quarantine::isolate(batch.ops.len(), &refusals, node_op)?;
        let now = Instant::now();
        let mut slots: Vec<_> = batch.ops.into_iter().map(Some).collect();
        for (i, what) in &isolation.refused {
            if let Some((_, Some(op))) = slots[*i].take() {
                if is_permission_denied(what) {
                    self.denied.push((*i, what.clone()));
                } else {
                    self.withhold(op, what, now);
                }
            }
        }
        let mut rest = Batch::default();
        for (encoded, op) in slots.into_iter().flatten() {
            rest.push(encoded, op);
        }
        Some(rest)
    }

    fn withhold(&mut self, op: &Op, what: &str, now: Instant) {
        let (delay, refusals) = self.quarantine.refuse(op, what, now);
        let (verb, instance) = match op {
            Op::Register(i) => ("register", i),
            Op::Deregister(i) => ("deregister", i),
        };
        self.metrics.sink_error(SINK, "entry_refused");
        tracing::warn!(
            service_id = %instance.id,
            service = %instance.service,
            address = %instance.address,
            port = instance.port,
            field = quarantine::refused_field(what).unwrap_or("-"),
            verb,
            error = %truncate(what),
            retry_in = ?delay,
            refusals,
            "Consul refused one catalog entry; it is withheld and retried later, every other entry is published"
        );
    }

    fn applied(
        &mut self,
        batch: Batch<'_>,
        written: &BTreeMap<String, u64>,
        outcome: &mut SyncOutcome,
    ) {
        let known = self.known.as_mut().expect("read before any write");
        for (_, op) in batch.ops {
            match op {
                None => {
                    let mut meta = self.client.settings.node_meta.clone();
                    meta.insert(
                        meta_keys::EXTERNAL_SOURCE.to_string(),
                        EXTERNAL_SOURCE.to_string(),
                    );
                    known.node_meta = Some(meta);
                }
                Some(op) => {
                    self.quarantine.accepted(op);
                    match op {
                        Op::Register(i) => {
                            outcome.registered += 1;
                            match written.get(&*i.id) {
                                Some(&index) => known.modify_index.insert(i.id.clone(), index),
                                None => known.modify_index.remove(&i.id),
                            };
                        }
                        Op::Deregister(i) => {
                            outcome.deregistered += 1;
                            known.modify_index.remove(&i.id);
                        }
                    }
                    reconcile::apply(&mut known.services, std::slice::from_ref(op));
                }
            }
        }
    }

    /// `Forbidden` when this pass left out entries the token may not write: the pass
    /// published what it could, and the policy gets fixed (readiness says so) rather than
    /// the refusal passing as a synced catalog.
    fn denied_error(&self) -> Option<ConsulError> {
        let summary = permission_summary(&self.denied, self.denied.len())?;
        Some(ConsulError::Forbidden(summary))
    }

    fn count_quarantined(&self, outcome: &mut SyncOutcome) {
        outcome.quarantined = self.quarantine.len();
        self.metrics.sink_quarantined(SINK, outcome.quarantined);
        self.publish_refused();
    }

    /// Sends the withheld entries when they differ from those sent last: an entry leaves once
    /// accepted, no longer desired, or changed.
    fn publish_refused(&self) {
        let entries = self.quarantine.entries();
        self.refused.send_if_modified(|sent| {
            let changed = **sent != entries;
            if changed {
                *sent = Arc::new(entries);
            }
            changed
        });
    }

    /// The entries Consul refused and the sink withholds, updated whenever that set changes.
    pub fn refused(&self) -> tokio::sync::watch::Receiver<quarantine::RefusedEntries> {
        self.refused.subscribe()
    }

    /// Removes every entry this owner has on the node, then the node itself once nothing is
    /// left on it (an entry of anyone else keeps it). For a node whose workers are known
    /// gone: the janitor retires the node of a deleted Kubernetes node.
    pub async fn retire(&mut self) -> Result<Retired, ConsulError> {
        self.invalidate();
        let nothing = DesiredState {
            catalog: Default::default(),
            complete: true,
        };
        let outcome = self.sync(&nothing).await?;
        let known = self
            .known
            .as_ref()
            .expect("a successful pass read the node");
        let exists = known.node_meta.is_some();
        let others = known.services.len();
        if exists && others == 0 {
            self.client.deregister_node().await?;
        }
        Ok(Retired {
            deregistered: outcome.deregistered,
            node_removed: exists && others == 0,
            others,
        })
    }

    /// Forget the known state so the next pass re-reads Consul.
    pub fn invalidate(&mut self) {
        self.known = None;
    }

    /// Follows the desired state until the channel closes. Never deregisters on shutdown: a
    /// restarting workersd must leave live entries in place.
    pub async fn run(self, desired: DesiredRx) {
        self.run_until(desired, std::future::pending()).await;
    }

    /// As [`Self::run`], until `stop` completes (after the pass in progress). Returns the sink,
    /// so a last pass (`--deregister-on-exit`) uses the same client and memory of Consul.
    ///
    /// Consul is re-read only when a blocking query on the node reports a change (our own
    /// writes included), at most once per resync interval: re-reading unchanged entries
    /// every interval was a large share of the steady-state CPU (BENCHMARKS.md).
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
        let resync_interval = self.client.settings.resync_interval;
        let changes = Arc::new(tokio::sync::Notify::new());
        // Dropping the set aborts the watch, so it never outlives its sink.
        let mut watcher = tokio::task::JoinSet::new();
        watcher.spawn(
            watch_changes(
                self.client.clone(),
                self.reads.subscribe(),
                changes.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("consul_watch")),
        );
        let retries = jittered(RETRY_MIN, RETRY_MAX);
        let mut backoff = retries.build();
        let mut change_seen = false;
        loop {
            let state = desired.borrow_and_update().clone();
            let started = std::time::Instant::now();
            let result = self.sync(&state).await;
            note_pass(&self.status, result.as_ref());
            let retry_in = match result {
                Ok(outcome) => {
                    self.metrics.reconcile_duration(started.elapsed());
                    if outcome.registered + outcome.deregistered > 0 {
                        tracing::info!(
                            registered = outcome.registered,
                            deregistered = outcome.deregistered,
                            requests = outcome.requests,
                            "consul catalog updated"
                        );
                    }
                    if state.complete {
                        self.synced.store(true, Ordering::Relaxed);
                    }
                    backoff = retries.build();
                    None
                }
                Err(e) => {
                    // Refusals isolated before the pass failed are withheld all the same.
                    self.publish_refused();
                    self.metrics.sink_error(SINK, e.kind());
                    let delay = backoff.next().unwrap_or(RETRY_MAX);
                    tracing::warn!(error = %e, retry_in = ?delay, "consul sync failed; will re-read and retry");
                    self.invalidate();
                    Some(delay)
                }
            };
            let next_resync = self
                .last_read
                .map_or_else(Instant::now, |at| at + resync_interval);
            let wake_at = match retry_in {
                Some(delay) => Some(Instant::now() + delay),
                None => [
                    change_seen.then_some(next_resync),
                    self.quarantine.next_retry(),
                ]
                .into_iter()
                .flatten()
                .min(),
            };
            tokio::select! {
                () = &mut stop => break,
                changed = desired.changed(), if retry_in.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = changes.notified(), if !change_seen => change_seen = true,
                () = sleep_until_some(wake_at) => {}
            }
            if change_seen && Instant::now() >= next_resync {
                self.invalidate();
                change_seen = false;
            }
        }
        drop(watcher);
        self
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The Consul sink of either registration: the catalog under a synthetic node, or the local
/// agent's services.
pub enum Sink {
    Catalog(ConsulSink),
    Agent(agent::AgentSink),
}

impl Sink {
    pub fn status(&self) -> SharedSinkStatus {
        match self {
            Sink::Catalog(sink) => sink.status.clone(),
            Sink::Agent(sink) => sink.status.clone(),
        }
    }

    /// Set once a complete desired state was published.
    pub fn synced(&self) -> Arc<AtomicBool> {
        match self {
            Sink::Catalog(sink) => sink.synced.clone(),
            Sink::Agent(sink) => sink.synced.clone(),
        }
    }

    /// The entries Consul refused on their own; only a catalog transaction refuses one entry
    /// and commits the others.
    pub fn refused(&self) -> Option<tokio::sync::watch::Receiver<quarantine::RefusedEntries>> {
        match self {
            Sink::Catalog(sink) => Some(sink.refused()),
            Sink::Agent(_) => None,
        }
    }

    pub async fn run_until(
        self,
        desired: DesiredRx,
        stop: impl std::future::Future<Output = ()>,
    ) -> Self {
        match self {
            Sink::Catalog(sink) => Sink::Catalog(sink.run_until(desired, stop).await),
            Sink::Agent(sink) => Sink::Agent(sink.run_until(desired, stop).await),
        }
    }

    pub fn invalidate(&mut self) {
        match self {
            Sink::Catalog(sink) => sink.invalidate(),
            Sink::Agent(sink) => sink.invalidate(),
        }
    }

    pub async fn sync(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        match self {
            Sink::Catalog(sink) => sink.sync(desired).await,
            Sink::Agent(sink) => sink.sync(desired).await,
        }
    }
}

#[cfg(test)]
mod tests;
