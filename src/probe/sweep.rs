//! Sweep policy, as functions of plain values (times are passed in, never read here): when
//! a full sweep is due, which ports a sweep probes, how long a sweeper waits and where its
//! wake-up falls, when an overrun is worth a warning, and how long holding pauses after a
//! worker was blocked by its hold.

use super::{PortStatus, RangeState, SweepKind};
use crate::model::TargetId;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::time::Instant;

/// When a target's next full sweep is due. Workers take the first free port, so a worker
/// above the lowest closed one (what only a full sweep finds) comes from a start-up race
/// while workers change. Full sweeps run every `base` after a change; each one that finds
/// nothing new doubles the gap, up to [`FullSweeps::MAX_BACKOFF`] × `base`, because on stable
/// targets full sweeps were most of all probes.
#[derive(Debug)]
pub(super) struct FullSweeps {
    base: Duration,
    gap: Duration,
    next: Instant,
}

impl FullSweeps {
    pub(super) const MAX_BACKOFF: u32 = 8;

    /// The first sweep, at `now`, is full.
    pub(super) fn new(base: Duration, now: Instant) -> Self {
        Self {
            base,
            gap: base,
            next: now,
        }
    }

    pub(super) fn kind_at(&self, now: Instant) -> SweepKind {
        if now >= self.next {
            SweepKind::Full
        } else {
            SweepKind::Frontier
        }
    }

    /// Records a sweep that started at `started` and whether it changed the live set.
    pub(super) fn swept(&mut self, kind: SweepKind, changed: bool, started: Instant) {
        if changed {
            self.gap = self.base;
        }
        match kind {
            SweepKind::Full => {
                if !changed {
                    self.gap = (self.gap * 2).min(self.base * Self::MAX_BACKOFF);
                }
                self.next = started + self.gap;
            }
            SweepKind::Frontier if changed => self.next = self.next.min(started + self.base),
            SweepKind::Frontier => {}
        }
    }
}

/// Which ports a sweep probes at once, and which it skips unless the frontier opens.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SweepPlan {
    /// Probed at once.
    pub(super) probe: Vec<u16>,
    /// Known-closed ports above the frontier, skipped by a frontier sweep.
    pub(super) skipped: Vec<u16>,
    /// The lowest closed port: a new worker appears there first.
    pub(super) frontier: Option<u16>,
}

impl SweepPlan {
    /// Held ports (`held`) are neither probed nor skipped: they are live without a probe.
    pub(super) fn new(
        ports: impl Iterator<Item = u16>,
        previous: &RangeState,
        kind: SweepKind,
        held: impl Fn(u16) -> bool,
    ) -> Self {
        let frontier = previous.closed.first().copied();
        let (probe, skipped) = ports.filter(|port| !held(*port)).partition(|port| {
            kind == SweepKind::Full || !previous.closed.contains(port) || Some(*port) == frontier
        });
        Self {
            probe,
            skipped,
            frontier,
        }
    }

    /// Whether a probe result opened the frontier: several workers may have started since,
    /// so the skipped ports are probed too. A timeout counts (something is there).
    pub(super) fn opens_frontier(&self, port: u16, status: PortStatus) -> bool {
        Some(port) == self.frontier && status != PortStatus::Refused
    }
}

impl RangeState {
    /// Counts one probe result: live, closed, or neither (it answered, but not as a worker).
    pub(super) fn record(&mut self, port: u16, status: PortStatus) {
        match status {
            PortStatus::Live => self.live.insert(port),
            PortStatus::Refused => self.closed.insert(port),
            _ => false,
        };
    }
}

/// How long a sweeper waits between sweeps: `fast_interval` for `fast_period` after it starts
/// and after each change, then `interval`. The first slow wait adds the target's phase, so
/// slow sweeps of targets created together spread over the interval.
#[derive(Debug)]
pub(super) struct Cadence {
    fast_interval: Duration,
    fast_period: Duration,
    interval: Duration,
    phase: Duration,
    fast_until: Instant,
    phase_applied: bool,
}

impl Cadence {
    pub(super) fn new(
        fast_interval: Duration,
        fast_period: Duration,
        interval: Duration,
        phase: Duration,
        now: Instant,
    ) -> Self {
        Self {
            fast_interval,
            fast_period,
            interval,
            phase,
            fast_until: now + fast_period,
            phase_applied: false,
        }
    }

    /// The live set changed after the first sweep: workers are ramping or recycling, so
    /// watch closely for a while.
    pub(super) fn changed(&mut self, now: Instant) {
        self.fast_until = now + self.fast_period;
    }

    /// The wait after a sweep that ended at `now`.
    pub(super) fn delay(&mut self, now: Instant) -> Duration {
        if now < self.fast_until {
            self.fast_interval
        } else if !self.phase_applied {
            self.phase_applied = true;
            self.interval + self.phase
        } else {
            self.interval
        }
    }
}

/// Sweeps wake on a grid shared by the process rather than each at its own instant: spread
/// over the interval, many targets would wake the runtime once per refused connect. The
/// phase spread over the interval is kept, at the grid's granularity.
pub(super) const WAKE_GRID: Duration = Duration::from_millis(50);

/// `at` rounded up to the wake grid that starts at `epoch` (never earlier than `at`, at most
/// one step later; `epoch` itself when `at` is before it).
pub(super) fn on_wake_grid(at: Instant, epoch: Instant) -> Instant {
    let since = at.saturating_duration_since(epoch).as_nanos();
    let grid = WAKE_GRID.as_nanos();
    let rounded_up = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(rounded_up as u64)
}

/// A fixed offset in `[0, interval)` per target id, spreading targets over the interval.
pub(super) fn phase_offset(id: &TargetId, interval: Duration) -> Duration {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    let fraction = (hasher.finish() % 1000) as u32;
    interval * fraction / 1000
}

/// A sweep overran when it took longer than the interval.
pub(super) fn overran(took: Duration, interval: Duration) -> bool {
    took > interval
}

/// Overruns are logged at most this often for the whole process: at scale every target
/// overruns together, and one line (plus the counter) says it all.
pub(super) const OVERRUN_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Whether an overrun at `now` is logged, given when one was last logged.
pub(super) fn overrun_warning_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= OVERRUN_WARNING_EVERY)
}

/// Full sweeps without holding a target after its `strikes`-th worker answered only once its
/// held connection was let go: 1, 2, 4 … 64. A timeout under load then costs one full-sweep
/// interval, a server that handles one connection at a time a probe timeout at growing
/// intervals.
pub(super) fn hold_pause(strikes: u32) -> u32 {
    1 << strikes.saturating_sub(1).min(6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const NS: Duration = Duration::from_nanos(1);

    fn ports(list: &[u16]) -> BTreeSet<u16> {
        list.iter().copied().collect()
    }

    fn state(live: &[u16], closed: &[u16]) -> RangeState {
        RangeState {
            live: ports(live),
            closed: ports(closed),
        }
    }

    #[test]
    fn full_sweeps_back_off_while_nothing_changes_and_return_after_a_change() {
        let base = Duration::from_secs(60);
        let start = Instant::now();
        let mut full = FullSweeps::new(base, start);
        assert_eq!(
            full.kind_at(start),
            SweepKind::Full,
            "the first sweep is full"
        );
        full.swept(SweepKind::Full, true, start);
        // Full sweeps that find nothing new: 60 s, then 120, 240, 480, 480 s apart.
        let mut at = start;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let next = full.next;
            assert_eq!(full.kind_at(next - NS), SweepKind::Frontier);
            assert_eq!(full.kind_at(next), SweepKind::Full);
            assert_eq!(full.kind_at(next + NS), SweepKind::Full);
            gaps.push((next - at).as_secs());
            at = next;
            full.swept(SweepKind::Full, false, at);
        }
        assert_eq!(gaps, [60, 120, 240, 480, 480]);
        assert_eq!(base * FullSweeps::MAX_BACKOFF, Duration::from_secs(480));
        // A worker exits (a frontier sweep sees it): a full sweep follows within 60 s, and
        // backs off again from there.
        let change = at + Duration::from_secs(10);
        full.swept(SweepKind::Frontier, true, change);
        assert_eq!(full.next, change + base);
        full.swept(SweepKind::Full, false, full.next);
        assert_eq!(full.next - (change + base), base * 2);
        // A full sweep that itself finds a change keeps the base gap.
        let found = full.next;
        full.swept(SweepKind::Full, true, found);
        assert_eq!(full.next, found + base);
        // `--full-sweep-interval 0s`: every sweep is full.
        let mut always = FullSweeps::new(Duration::ZERO, start);
        always.swept(SweepKind::Full, false, start);
        assert_eq!(always.kind_at(start), SweepKind::Full);
    }

    #[test]
    fn the_backoff_is_capped_at_its_maximum_from_any_base() {
        let base = Duration::from_secs(7);
        let start = Instant::now();
        let mut full = FullSweeps::new(base, start);
        let mut at = start;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            full.swept(SweepKind::Full, false, at);
            gaps.push((full.next - at).as_secs());
            at = full.next;
        }
        // The first full sweep finding nothing new already doubles the gap.
        assert_eq!(gaps, [14, 28, 56, 56, 56, 56]);
    }

    #[test]
    fn a_frontier_sweep_moves_the_next_full_sweep_only_earlier_and_only_on_a_change() {
        let base = Duration::from_secs(60);
        let start = Instant::now();
        let mut full = FullSweeps::new(base, start);
        full.swept(SweepKind::Full, false, start);
        assert_eq!(full.next, start + base * 2);
        // Nothing changed: the full sweep stays where it was.
        full.swept(SweepKind::Frontier, false, start + Duration::from_secs(30));
        assert_eq!(full.next, start + base * 2);
        // A change due later than the full sweep already planned does not postpone it.
        let late = start + Duration::from_secs(90);
        full.swept(SweepKind::Frontier, true, late);
        assert_eq!(full.next, start + base * 2);
        // ...but the gap after it starts from the base again.
        full.swept(SweepKind::Full, false, full.next);
        assert_eq!(full.next, start + base * 2 + base * 2);
        // A change sooner than the full sweep planned brings it forward.
        let at = full.next - Duration::from_secs(200);
        full.swept(SweepKind::Frontier, true, at);
        assert_eq!(full.next, at + base);
    }

    #[test]
    fn a_full_sweep_plan_probes_every_port_not_held() {
        let previous = state(&[1], &[2, 3, 4]);
        let plan = SweepPlan::new(1..=5, &previous, SweepKind::Full, |p| p == 5);
        assert_eq!(
            plan,
            SweepPlan {
                probe: vec![1, 2, 3, 4],
                skipped: vec![],
                frontier: Some(2),
            }
        );
    }

    #[test]
    fn a_frontier_sweep_plan_skips_closed_ports_above_the_lowest_closed_one() {
        // 1 live, 2 (the frontier) and 4, 6 closed, 3 and 5 unknown (timed out before).
        let previous = state(&[1], &[2, 4, 6]);
        let plan = SweepPlan::new(1..=6, &previous, SweepKind::Frontier, |p| p == 1);
        assert_eq!(
            plan,
            SweepPlan {
                probe: vec![2, 3, 5],
                skipped: vec![4, 6],
                frontier: Some(2),
            }
        );
        // Held ports are skipped by neither list, closed or not.
        let plan = SweepPlan::new(1..=6, &previous, SweepKind::Frontier, |p| p == 4);
        assert_eq!((plan.probe, plan.skipped), (vec![1, 2, 3, 5], vec![6]));
        // Nothing known closed: no frontier, every port probed.
        let plan = SweepPlan::new(1..=3, &state(&[1], &[]), SweepKind::Frontier, |_| false);
        assert_eq!(
            (plan.probe, plan.skipped, plan.frontier),
            (vec![1, 2, 3], vec![], None)
        );
    }

    #[test]
    fn only_an_answer_at_the_frontier_opens_it() {
        let plan = SweepPlan::new(1..=4, &state(&[1], &[2, 3, 4]), SweepKind::Frontier, |_| {
            false
        });
        assert!(plan.opens_frontier(2, PortStatus::Live));
        assert!(plan.opens_frontier(2, PortStatus::Timeout));
        assert!(plan.opens_frontier(2, PortStatus::HttpStatus));
        assert!(!plan.opens_frontier(2, PortStatus::Refused));
        assert!(
            !plan.opens_frontier(1, PortStatus::Live),
            "not the frontier"
        );
        let none = SweepPlan::new(1..=2, &state(&[], &[]), SweepKind::Frontier, |_| false);
        assert!(!none.opens_frontier(1, PortStatus::Live));
    }

    #[test]
    fn a_probe_result_counts_as_live_closed_or_neither() {
        let mut now = RangeState::default();
        now.record(1, PortStatus::Live);
        now.record(2, PortStatus::Refused);
        for status in [
            PortStatus::Timeout,
            PortStatus::HttpStatus,
            PortStatus::ContentType,
            PortStatus::Malformed,
            PortStatus::TlsHandshake,
        ] {
            now.record(3, status);
        }
        assert_eq!(now, state(&[1], &[2]));
    }

    #[test]
    fn the_cadence_is_fast_after_a_start_or_change_then_slow_with_the_phase_once() {
        let (fast, period, interval, phase) = (
            Duration::from_millis(500),
            Duration::from_secs(30),
            Duration::from_secs(10),
            Duration::from_secs(3),
        );
        let start = Instant::now();
        let mut cadence = Cadence::new(fast, period, interval, phase, start);
        assert_eq!(cadence.delay(start), fast);
        assert_eq!(cadence.delay(start + period - NS), fast);
        assert_eq!(cadence.delay(start + period), interval + phase);
        assert_eq!(cadence.delay(start + period), interval);
        // A change: fast again for the period, then the interval without the phase.
        let change = start + period * 2;
        cadence.changed(change);
        assert_eq!(cadence.delay(change + period - NS), fast);
        assert_eq!(cadence.delay(change + period), interval);
    }

    #[test]
    fn wake_ups_round_up_to_the_grid_from_its_epoch() {
        let epoch = Instant::now();
        assert_eq!(on_wake_grid(epoch, epoch), epoch);
        assert_eq!(on_wake_grid(epoch + NS, epoch), epoch + WAKE_GRID);
        assert_eq!(on_wake_grid(epoch + WAKE_GRID, epoch), epoch + WAKE_GRID);
        assert_eq!(
            on_wake_grid(epoch + WAKE_GRID + NS, epoch),
            epoch + WAKE_GRID * 2
        );
        let at = epoch + Duration::from_millis(10 * 50 + 20);
        assert_eq!(on_wake_grid(at, epoch), epoch + WAKE_GRID * 11);
        // Before the epoch (cannot happen in a sweeper): the epoch itself.
        assert_eq!(on_wake_grid(epoch, epoch + WAKE_GRID), epoch + WAKE_GRID);
    }

    #[test]
    fn wake_ups_fall_on_a_shared_grid_never_early_and_at_most_one_step_late() {
        let epoch = Instant::now();
        let mut wakes = BTreeSet::new();
        for ms in 0..500u64 {
            let at = epoch + Duration::from_micros(ms * 997);
            let wake = on_wake_grid(at, epoch);
            assert!(wake >= at && wake < at + WAKE_GRID, "{ms}");
            wakes.insert(wake);
        }
        // ~0.5 s of deadlines spread a millisecond apart: 10 distinct wake-ups and the epoch.
        assert_eq!(wakes.len(), 11);
    }

    #[test]
    fn phase_offsets_are_fixed_per_target_and_spread_over_the_interval() {
        let interval = Duration::from_secs(10);
        let id = TargetId::new("ns/pod");
        assert_eq!(phase_offset(&id, interval), phase_offset(&id, interval));
        assert_eq!(phase_offset(&id, Duration::ZERO), Duration::ZERO);
        let offsets: Vec<Duration> = (0..1000)
            .map(|i| phase_offset(&TargetId::new(format!("ns/pod-{i}")), interval))
            .collect();
        assert!(offsets.iter().all(|o| *o < interval), "within the interval");
        let tenth = interval / 10;
        assert!(offsets.iter().any(|o| *o < tenth), "some early");
        assert!(offsets.iter().any(|o| *o >= interval - tenth), "some late");
        let distinct: BTreeSet<_> = offsets.iter().collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
        // In thousandths of the interval.
        assert!(offsets.iter().all(|o| o.as_millis() % 10 == 0));
    }

    #[test]
    fn a_sweep_overruns_only_past_its_interval() {
        let interval = Duration::from_secs(10);
        assert!(!overran(interval - NS, interval));
        assert!(!overran(interval, interval));
        assert!(overran(interval + NS, interval));
    }

    #[test]
    fn an_overrun_is_logged_at_most_once_per_period() {
        let now = Instant::now() + OVERRUN_WARNING_EVERY;
        assert!(overrun_warning_due(None, now));
        assert!(!overrun_warning_due(Some(now), now));
        assert!(!overrun_warning_due(
            Some(now - OVERRUN_WARNING_EVERY + NS),
            now
        ));
        assert!(overrun_warning_due(Some(now - OVERRUN_WARNING_EVERY), now));
        assert!(!overrun_warning_due(Some(now + NS), now), "clock order");
        assert_eq!(OVERRUN_WARNING_EVERY, Duration::from_secs(60));
    }

    #[test]
    fn holding_pauses_for_doubling_full_sweeps_up_to_64() {
        let pauses: Vec<u32> = (1..=9).map(hold_pause).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(hold_pause(u32::MAX), 64);
    }
}
