//! The last result of every port of every target, for the status page. Each sweep records
//! what it probed; ports it did not probe (skipped above the frontier, or held) keep their
//! last result.

use super::PortStatus;
use crate::model::{Target, TargetId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A port's last probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortResult {
    pub status: PortStatus,
    pub at: SystemTime,
    /// Live and held since: its exit would be noticed at once.
    pub held: bool,
}

/// One target as last swept.
#[derive(Clone, Debug)]
pub struct TargetResults {
    pub target: Arc<Target>,
    pub swept_at: SystemTime,
    pub ports: BTreeMap<u16, PortResult>,
}

#[derive(Debug, Default)]
pub struct ProbeResults {
    targets: Mutex<HashMap<TargetId, TargetResults>>,
}

impl ProbeResults {
    /// A sweep of `target` at `at`: `probed` are its probes, `held` the ports live without one.
    pub fn record(
        &self,
        target: &Arc<Target>,
        probed: &[(u16, PortStatus)],
        held: impl IntoIterator<Item = u16>,
        at: SystemTime,
    ) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let entry = targets
            .entry(target.id.clone())
            .or_insert_with(|| TargetResults {
                target: target.clone(),
                swept_at: at,
                ports: BTreeMap::new(),
            });
        entry.target = target.clone();
        entry.swept_at = at;
        for (port, status) in probed {
            entry.ports.insert(
                *port,
                PortResult {
                    status: *status,
                    at,
                    held: false,
                },
            );
        }
        for port in held {
            let result = entry.ports.entry(port).or_insert(PortResult {
                status: PortStatus::Live,
                at,
                held: true,
            });
            result.held = true;
        }
    }

    pub fn forget(&self, id: &TargetId) {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Every target, in id order.
    pub fn snapshot(&self) -> Vec<TargetResults> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<TargetResults> = targets.values().cloned().collect();
        all.sort_by(|a, b| a.target.id.as_str().cmp(b.target.id.as_str()));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::target;
    use std::time::Duration;

    #[test]
    fn unprobed_ports_keep_their_last_result_and_held_ones_are_marked() {
        let results = ProbeResults::default();
        let t = Arc::new(target("web-1").build());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(10);
        results.record(
            &t,
            &[(9011, PortStatus::Live), (9012, PortStatus::Refused)],
            [],
            t0,
        );
        // Next sweep: 9011 held (not probed), 9012 skipped, 9013 timed out.
        results.record(&t, &[(9013, PortStatus::Timeout)], [9011], t1);
        let (only,) = <[_; 1]>::try_from(results.snapshot())
            .ok()
            .map(|[a]| (a,))
            .unwrap();
        assert_eq!(only.swept_at, t1);
        let seen: Vec<_> = only
            .ports
            .iter()
            .map(|(p, r)| (*p, r.status, r.at, r.held))
            .collect();
        assert_eq!(
            seen,
            [
                (9011, PortStatus::Live, t0, true),
                (9012, PortStatus::Refused, t0, false),
                (9013, PortStatus::Timeout, t1, false),
            ]
        );
        results.forget(&t.id);
        assert!(results.snapshot().is_empty());
    }
}
