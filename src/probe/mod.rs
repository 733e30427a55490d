//! The prober: finds which ports of each target's range are live metrics endpoints.
//!
//! One lightweight task per target sweeps its range concurrently under a global limit. A
//! port counts as live once it answered `GET <path>` with 200 and a Prometheus content type;
//! while it stays up, it is held (below) or only reconnected, so workers are not scraped
//! twice. New, changed or changing targets are swept at a fast cadence for a while so ramping
//! or recycled workers are published within about a second.
//!
//! Workers take the first free port of their range, so a new worker always appears on the
//! lowest closed port. Between full sweeps (`full_sweep_interval`) a sweep therefore skips
//! the closed ports above the lowest one; when that one opens, the rest of the range is probed
//! in the same sweep. Each probe is a kernel TCP handshake on both ends, so ports not probed
//! are the only real saving (see BENCHMARKS.md).
//!
//! With holds on (the default), a live worker is not reconnected at all: workersd keeps one
//! idle connection to it and hears at once when it closes (`hold`). A port whose hold ended
//! is reconnected each sweep until the next full sweep holds it again, so a worker server
//! that drops idle connections costs no more than without holds.

mod connect;
mod hold;
mod http;
mod probing;
pub mod results;
mod sweep;
mod sweeper;
#[cfg(test)]
mod tests;

pub use connect::connect_only;
pub use hold::{Ended, HoldId, Holds};
pub use http::{classify_head, verify};
pub use probing::{Holding, Swept, sweep_target};

use crate::metrics::Metrics;
use crate::model::{Target, TargetId};
use results::ProbeResults;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use sweeper::Sweeper;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tracing::Instrument;

/// How the prober sweeps. [`ProbeSettings::default`] is what the command line gives without
/// flags, except `holds`: the CLI's hold capacity depends on the file-descriptor limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Probe interval once a target is steady.
    pub interval: Duration,
    /// Timeout of one port probe (connect plus response head).
    pub timeout: Duration,
    /// Most port probes in flight at once, over all targets.
    pub concurrency: usize,
    /// Probe interval while a target is new or changing.
    pub fast_interval: Duration,
    /// How long a target stays at the fast interval after it appears or changes.
    pub fast_period: Duration,
    /// How often every port is probed; in between, closed ports above the lowest closed one
    /// are skipped. Zero: every sweep is full.
    pub full_sweep_interval: Duration,
    /// Most connections held to live workers (file descriptors). Zero: none, every sweep
    /// reconnects to every live worker.
    pub holds: usize,
}

/// The defaults of [`ProbeSettings`], written once: the CLI shows and parses these texts,
/// [`ProbeSettings::default`] parses the same ones.
pub mod defaults {
    pub const INTERVAL: &str = "10s";
    pub const TIMEOUT: &str = "1s";
    pub const CONCURRENCY: usize = 512;
    pub const FAST_INTERVAL: &str = "500ms";
    pub const FAST_PERIOD: &str = "30s";
    pub const FULL_SWEEP_INTERVAL: &str = "60s";
}

impl Default for ProbeSettings {
    fn default() -> Self {
        let duration = |text: &str| {
            humantime::parse_duration(text).expect("the defaults are valid durations (tested)")
        };
        Self {
            interval: duration(defaults::INTERVAL),
            timeout: duration(defaults::TIMEOUT),
            concurrency: defaults::CONCURRENCY,
            fast_interval: duration(defaults::FAST_INTERVAL),
            fast_period: duration(defaults::FAST_PERIOD),
            full_sweep_interval: duration(defaults::FULL_SWEEP_INTERVAL),
            holds: 0,
        }
    }
}

/// The live ports of one target after a completed sweep. The first sweep of every target
/// generation is always reported; later ones only when the set changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    pub target: TargetId,
    pub generation: u64,
    pub live: BTreeSet<u16>,
}

/// What the previous sweep of a target found; the next sweep starts from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeState {
    /// Verified metrics endpoints: later sweeps only TCP-connect them.
    pub live: BTreeSet<u16>,
    /// Ports whose latest probe was refused (or that were skipped since).
    pub closed: BTreeSet<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepKind {
    /// Every port of the range.
    Full,
    /// Every port except the closed ones above the lowest closed port, unless that one opened.
    Frontier,
}

/// Why a port is or is not a live worker; also the `result` label of the probe counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortStatus {
    Live,
    Refused,
    Timeout,
    HttpStatus,
    ContentType,
    Malformed,
    TlsHandshake,
}

impl PortStatus {
    pub fn label(self) -> &'static str {
        match self {
            PortStatus::Live => "live",
            PortStatus::Refused => "refused",
            PortStatus::Timeout => "timeout",
            PortStatus::HttpStatus => "http_status",
            PortStatus::ContentType => "content_type",
            PortStatus::Malformed => "malformed",
            PortStatus::TlsHandshake => "tls_handshake",
        }
    }
}

/// A running sweeper: the target it sweeps, its generation, and how to stop it.
struct SweeperHandle {
    target: Arc<Target>,
    generation: u64,
    task: AbortHandle,
}

/// Owns one sweep loop per target and keeps them in step with the sources' snapshots.
pub struct Prober {
    settings: ProbeSettings,
    limiter: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<ProbeReport>,
    holds: Option<Arc<Holds>>,
    sweepers: HashMap<TargetId, SweeperHandle>,
    next_generation: u64,
    results: Option<Arc<ProbeResults>>,
}

impl Prober {
    pub fn new(
        settings: ProbeSettings,
        metrics: Arc<Metrics>,
        reports: mpsc::Sender<ProbeReport>,
    ) -> Self {
        let limiter = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let holds = (settings.holds > 0)
            .then(|| {
                // Keepalive notices a vanished host about when a reconnecting sweep would.
                Holds::start(settings.holds, settings.interval, settings.timeout)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "cannot hold worker connections; reconnecting every sweep instead")
                    })
                    .ok()
            })
            .flatten();
        Self {
            settings,
            limiter,
            metrics,
            reports,
            holds,
            sweepers: HashMap::new(),
            next_generation: 1,
            results: None,
        }
    }

    /// Records every port's last result in `results` (the status page reads them).
    pub fn recording(mut self, results: Arc<ProbeResults>) -> Self {
        self.results = Some(results);
        self
    }

    /// Starts loops for new targets, restarts changed ones (probed at once, then fast) and
    /// stops removed ones.
    pub fn sync<'a>(&mut self, targets: impl IntoIterator<Item = &'a Arc<Target>>) {
        let wanted: HashMap<&TargetId, &Arc<Target>> =
            targets.into_iter().map(|t| (&t.id, t)).collect();
        self.sweepers.retain(|id, sweeper| {
            let keep = wanted.get(id).is_some_and(|t| **t == sweeper.target);
            if !keep {
                sweeper.task.abort();
                if let Some(results) = &self.results {
                    results.forget(id);
                }
            }
            keep
        });
        for (id, target) in wanted {
            if self.sweepers.contains_key(id) {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let sweeper = Sweeper {
                target: target.clone(),
                generation,
                settings: self.settings.clone(),
                limiter: self.limiter.clone(),
                metrics: self.metrics.clone(),
                reports: self.reports.clone(),
                holds: self.holds.clone(),
                results: self.results.clone(),
            };
            // Events of the sweep carry its target from the span.
            let span = tracing::info_span!("sweeper", target_id = %id, generation);
            let task = tokio::spawn(sweeper.run().instrument(span)).abort_handle();
            self.sweepers.insert(
                id.clone(),
                SweeperHandle {
                    target: target.clone(),
                    generation,
                    task,
                },
            );
        }
    }

    /// The generation whose reports are current for `id`; older ones are stale.
    pub fn generation(&self, id: &TargetId) -> Option<u64> {
        self.sweepers.get(id).map(|s| s.generation)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for sweeper in self.sweepers.values() {
            sweeper.task.abort();
        }
    }
}
