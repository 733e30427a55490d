//! One target's sweep loop: sweeps, reports changes, picks the cadence and waits.

use super::probing::{Holding, Swept, sweep_target};
use super::sweep::{
    Cadence, FullSweeps, hold_pause, on_wake_grid, overran, overrun_warning_due, phase_offset,
};
use super::{Ended, HoldId, Holds, ProbeReport, ProbeSettings, RangeState, SweepKind};
use crate::metrics::Metrics;
use crate::model::{Target, TargetId};
use crate::telemetry::summary::Line;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

pub(super) struct Sweeper {
    pub(super) target: Arc<Target>,
    pub(super) generation: u64,
    pub(super) settings: ProbeSettings,
    pub(super) limiter: Arc<Semaphore>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) reports: mpsc::Sender<ProbeReport>,
    pub(super) holds: Option<Arc<Holds>>,
    pub(super) results: Option<Arc<super::results::ProbeResults>>,
}

impl Sweeper {
    pub(super) async fn run(self) {
        let mut state: Option<RangeState> = None;
        let interval = self.target.probe_interval.unwrap_or(self.settings.interval);
        let mut cadence = Cadence::new(
            self.settings.fast_interval,
            self.settings.fast_period,
            interval,
            phase_offset(&self.target.id, interval),
            Instant::now(),
        );
        let mut full_sweeps = FullSweeps::new(self.settings.full_sweep_interval, Instant::now());
        let mut holds = self.holds.clone().map(TargetHolds::new);
        loop {
            let started = Instant::now();
            let kind = full_sweeps.kind_at(started);
            if let Some(holds) = holds.as_mut() {
                holds.collect_ended(kind);
            }
            // Moved out, not cloned: two small trees copied per sweep showed in profiles.
            let previous = state.take();
            let fresh = RangeState::default();
            let holding = holds.as_ref().and_then(TargetHolds::holding);
            // No bound on the whole sweep: each probe is bounded once it has a permit, and
            // the permit queue is FIFO. Discarding a slow sweep would throw away fresh results
            // and, when every sweep is slow (many timeouts), never report at all.
            // Boxed: inline, the sweep's state would size every sleeping loop, one per target.
            let swept =
                Box::pin(self.sweep(previous.as_ref().unwrap_or(&fresh), kind, holding.as_ref()))
                    .await;
            if let Some(results) = &self.results {
                let held = holds.iter().flat_map(|h| h.held.keys().copied());
                results.record(
                    &self.target,
                    &swept.probed,
                    held,
                    std::time::SystemTime::now(),
                );
            }
            let now = match holds.as_mut() {
                Some(holds) => holds.adopt(swept, &self.target.id, &self.metrics),
                None => swept.state,
            };
            let took = started.elapsed();
            if overran(took, interval) {
                self.metrics.sweep_overruns.inc();
                warn_overrun(took, interval);
            }
            let changed = previous.as_ref().is_none_or(|s| s.live != now.live);
            full_sweeps.swept(kind, changed, started);
            if changed {
                if previous.is_some() {
                    cadence.changed(Instant::now());
                }
                let report = ProbeReport {
                    target: self.target.id.clone(),
                    generation: self.generation,
                    live: now.live.clone(),
                };
                if self.reports.send(report).await.is_err() {
                    return;
                }
            }
            state = Some(now);
            let delay = cadence.delay(Instant::now());
            let wake_at = on_wake_grid(Instant::now() + delay, wake_grid_epoch());
            match &holds {
                // A worker closed its held connection: find out why now, not next interval.
                Some(holds) => tokio::select! {
                    _ = tokio::time::sleep_until(wake_at) => {}
                    _ = holds.owner.wait() => {}
                },
                None => tokio::time::sleep_until(wake_at).await,
            }
        }
    }

    async fn sweep(
        &self,
        previous: &RangeState,
        kind: SweepKind,
        holding: Option<&Holding<'_>>,
    ) -> Swept {
        sweep_target(
            &self.target,
            previous,
            kind,
            holding,
            &self.limiter,
            self.settings.timeout,
            &self.metrics,
        )
        .await
    }
}

/// A sweeper's held connections and what it learnt about holding its target's workers.
pub(super) struct TargetHolds {
    pub(super) holds: Arc<Holds>,
    pub(super) owner: Arc<Ended>,
    pub(super) held: BTreeMap<u16, HoldId>,
    /// Ports whose hold ended: reconnected each sweep until the next full sweep holds them
    /// again, so a server that closes idle connections is not reconnected in a loop.
    pub(super) resting: BTreeSet<u16>,
    /// Times a worker answered only once its held connection was let go (a server that
    /// handles one connection at a time, or a timeout under load).
    pub(super) strikes: u32,
    /// Full sweeps left before holding is tried again (see [`hold_pause`]).
    pub(super) paused_sweeps: u32,
}

impl TargetHolds {
    pub(super) fn new(holds: Arc<Holds>) -> Self {
        Self {
            holds,
            owner: Arc::default(),
            held: BTreeMap::new(),
            resting: BTreeSet::new(),
            strikes: 0,
            paused_sweeps: 0,
        }
    }

    /// Forgets the holds that ended (their ports are probed again) before a sweep.
    pub(super) fn collect_ended(&mut self, kind: SweepKind) {
        for (port, id) in self.owner.take() {
            if self.held.get(&port) == Some(&id) {
                self.held.remove(&port);
                self.resting.insert(port);
            }
        }
        if kind == SweepKind::Full {
            self.resting.clear();
            self.paused_sweeps = self.paused_sweeps.saturating_sub(1);
        }
    }

    pub(super) fn holding(&self) -> Option<Holding<'_>> {
        (self.paused_sweeps == 0).then_some(Holding {
            holds: &self.holds,
            owner: &self.owner,
            held: &self.held,
            resting: &self.resting,
            verify_held: self.strikes > 0,
        })
    }

    /// Keeps the sweep's new holds and lets go of any port that is no longer live.
    pub(super) fn adopt(
        &mut self,
        swept: Swept,
        target: &TargetId,
        metrics: &Metrics,
    ) -> RangeState {
        for (port, id) in swept.held {
            if let Some(old) = self.held.insert(port, id) {
                self.holds.release(old);
            }
        }
        let now = Instant::now();
        let lines = {
            let mut summary = self.holds.paused.lock().unwrap_or_else(|e| e.into_inner());
            if swept.blocked_by_hold {
                self.strikes += 1;
                self.paused_sweeps = hold_pause(self.strikes);
                summary.note(target.as_str(), now)
            } else {
                summary.due(now).into_iter().collect()
            }
        };
        for line in lines {
            log_reconnecting(line, self.paused_sweeps);
        }
        let holds = &self.holds;
        let paused = self.paused_sweeps > 0;
        self.held.retain(|port, id| {
            let keep = !paused && swept.state.live.contains(port);
            if !keep {
                holds.release(*id);
            }
            keep
        });
        metrics.held_connections.set(holds.len() as i64);
        swept.state
    }
}

impl Drop for TargetHolds {
    fn drop(&mut self) {
        for id in self.held.values() {
            self.holds.release(*id);
        }
    }
}

fn log_reconnecting(line: Line, full_sweeps: u32) {
    match line {
        Line::First(_) => tracing::info!(
            full_sweeps,
            "a worker answered only once its idle connection was closed (a metrics server \
             that handles one connection at a time, or a slow one); reconnecting to this \
             target's workers instead of holding them for a while (more such targets within \
             a minute are summarized in one line)"
        ),
        // Not in the current sweeper's span: the line is about other targets.
        Line::More { count, examples } => tracing::info!(
            parent: None,
            targets = count,
            examples = ?examples,
            "more targets' workers answered only once their idle connection was closed; \
             reconnecting to them instead of holding them for a while"
        ),
    }
}

/// Logs a slow sweep (in its sweeper's span) at most once per
/// [`OVERRUN_WARNING_EVERY`](super::sweep::OVERRUN_WARNING_EVERY) for the whole process.
fn warn_overrun(took: Duration, interval: Duration) {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if overrun_warning_due(*last, now) {
        *last = Some(now);
        tracing::warn!(took = ?took, interval = ?interval,
            "sweeps take longer than their interval (workersd_sweep_overruns_total); raise --probe-concurrency or the interval");
    }
}

/// The start of the process's wake grid: the first time a sweeper asks.
fn wake_grid_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}
