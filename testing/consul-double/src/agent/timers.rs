//! What runs on the agent's clocks: TTL expiry (`agent/checks/check.go`, `CheckTTL.run`),
//! deferred output syncs (`agent/local/state.go`, `UpdateCheck`'s `DeferCheck`) and the
//! critical-service reaper (`agent/agent.go`, `reapServices`/`reapServicesInternal`).

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::{CRITICAL, LocalAgent};

impl LocalAgent {
    /// Everything due by `now`; true when a full sync is due too.
    pub fn run_timers(&mut self, now: Instant) -> bool {
        let expired: Vec<(String, String)> = self
            .checks
            .iter_mut()
            .filter(|(_, c)| c.ttl_deadline.is_some_and(|d| d <= now))
            .map(|(id, c)| {
                c.ttl_deadline = None;
                (id.clone(), expired_output(&c.last_output))
            })
            .collect();
        for (id, output) in expired {
            self.update_check(&id, CRITICAL, &output, now);
        }
        for check in self.checks.values_mut() {
            if check.deferred_until.is_some_and(|d| d <= now) {
                check.deferred_until = None;
                check.in_sync = false;
            }
        }
        if now >= self.next_reap {
            self.next_reap = now + self.config.check_reap_interval;
            self.reap(now);
        }
        now >= self.next_full_sync
    }

    /// `reapServicesInternal`: a service one of whose checks has been critical for longer
    /// than its (raised) `DeregisterCriticalServiceAfter` is deregistered.
    fn reap(&mut self, now: Instant) {
        let mut doomed = BTreeSet::new();
        for check in self.checks.values() {
            let (Some(since), Some(timeout)) = (check.critical_since, self.reap_after(&check.def))
            else {
                continue;
            };
            if !check.record.service_id.is_empty() && now.duration_since(since) > timeout {
                doomed.insert(check.record.service_id.clone());
            }
        }
        for service_id in doomed {
            tracing::info!(
                service = %service_id,
                "check critical for too long; deregistered service"
            );
            self.remove_service(&service_id);
        }
    }
}

/// `CheckTTL.getExpiredOutput`.
fn expired_output(last_output: &str) -> String {
    if last_output.is_empty() {
        "TTL expired".into()
    } else {
        format!("TTL expired (last output before timeout follows): {last_output}")
    }
}
