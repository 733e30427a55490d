//! Sweep policy: when full sweeps are due, and when a sweeper wakes.

use super::SweepKind;
use crate::model::TargetId;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::time::Instant;

/// When a target's next full sweep is due. Workers take the first free port, so a worker
/// above the lowest closed one (what only a full sweep finds) comes from a start-up race
/// while workers change. Full sweeps run every `base` after a change; each one that finds
/// nothing new doubles the gap, up to [`FullSweeps::MAX_BACKOFF`] × `base`. At 10,000
/// stable pods with 4 of 10 ports live, 60 s full sweeps were 45 % of all probes.
pub(super) struct FullSweeps {
    base: Duration,
    gap: Duration,
    pub(super) next: Instant,
}

impl FullSweeps {
    const MAX_BACKOFF: u32 = 8;

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
/// Sweeps wake on a 50 ms grid shared by the process. Spread over the interval, 10,000
/// targets would otherwise wake the runtime 1,000 times a second, each wake-up a park and
/// unpark for one refused connect; on the grid it is 20 wake-ups with ~50 sweeps each. The
/// phase spread over the interval is kept, at 50 ms granularity.
pub(super) const WAKE_GRID: Duration = Duration::from_millis(50);

pub(super) fn on_wake_grid(at: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let since = at.saturating_duration_since(epoch).as_nanos();
    let grid = WAKE_GRID.as_nanos();
    let rounded_up = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(rounded_up as u64)
}

pub(super) fn phase_offset(id: &TargetId, interval: Duration) -> Duration {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    let fraction = (hasher.finish() % 1000) as u32;
    interval * fraction / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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
            assert_eq!(
                full.kind_at(next - Duration::from_secs(1)),
                SweepKind::Frontier
            );
            assert_eq!(full.kind_at(next), SweepKind::Full);
            gaps.push((next - at).as_secs());
            at = next;
            full.swept(SweepKind::Full, false, at);
        }
        assert_eq!(gaps, [60, 120, 240, 480, 480]);
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
    fn wake_ups_fall_on_a_shared_grid_never_early_and_at_most_one_step_late() {
        let base = Instant::now();
        let mut wakes = BTreeSet::new();
        for ms in 0..500u64 {
            let at = base + Duration::from_micros(ms * 997);
            let wake = on_wake_grid(at);
            assert!(wake >= at && wake < at + WAKE_GRID, "{ms}");
            wakes.insert(wake);
        }
        // ~0.5 s of deadlines spread a millisecond apart: 10 or 11 distinct wake-ups.
        assert!((10..=11).contains(&wakes.len()), "{}", wakes.len());
    }
}
