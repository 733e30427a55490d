//! What the local agent is sent: one service per live worker, with a TTL check that
//! workersd passes while it holds the worker as live, and when each pass is due. Pure.

use crate::model::ServiceInstance;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The TTL check on every registered worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckSettings {
    /// Not passed within this, the check goes critical (workersd gone or stuck).
    pub ttl: Duration,
    /// Critical for this long, the agent deregisters the service (Consul's minimum: 1 min).
    pub deregister_after: Duration,
}

/// The ID the agent gives the one unnamed check of a service definition (agent/structs
/// `ServiceDefinition.CheckTypes`, numbered only when there are several).
pub fn check_id(service_id: &str) -> String {
    format!("service:{service_id}")
}

/// A Go duration Consul parses (`time.ParseDuration`).
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The body of `PUT /v1/agent/service/register` for `instance`: registered passing, since
/// workersd registers only workers it just found live.
pub fn registration(instance: &ServiceInstance, check: &CheckSettings) -> serde_json::Value {
    json!({
        "ID": &*instance.id,
        "Name": instance.service,
        "Address": instance.address,
        "Port": instance.port,
        "Tags": instance.tags,
        "Meta": instance.published_meta(),
        "Check": {
            "Name": "workersd: worker metrics endpoint live",
            "Notes": "passed by workersd while it holds this worker as live",
            "TTL": go_duration(check.ttl),
            "DeregisterCriticalServiceAfter": go_duration(check.deregister_after),
            "Status": "passing",
        },
    })
}

/// When each live worker's check was last passed (a registration counts).
#[derive(Debug, Default)]
pub struct Passes {
    last: HashMap<Arc<str>, Instant>,
}

impl Passes {
    /// A third of the TTL: two passes may be lost before the check expires.
    pub fn every(ttl: Duration) -> Duration {
        ttl / 3
    }

    /// The workers of `live` whose pass is due at `now`.
    pub fn due<'a>(
        &self,
        live: impl IntoIterator<Item = &'a Arc<str>>,
        now: Instant,
        every: Duration,
    ) -> Vec<Arc<str>> {
        live.into_iter()
            .filter(|id| self.last.get(*id).is_none_or(|at| now >= *at + every))
            .cloned()
            .collect()
    }

    /// The earliest next pass of the workers still remembered.
    pub fn next_due(&self, every: Duration) -> Option<Instant> {
        self.last.values().min().map(|at| *at + every)
    }

    pub fn passed(&mut self, id: Arc<str>, now: Instant) {
        self.last.insert(id, now);
    }

    /// Keeps only the workers still live: a worker gone is no longer passed.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.last.retain(|id, _| live(id));
    }

    pub fn clear(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn instance() -> ServiceInstance {
        ServiceInstance {
            id: "me:web:10.0.0.1:9011".into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 9011,
            tags: vec!["gunicorn".into()],
            meta: Arc::new(BTreeMap::from([("workersd-owner".into(), "me".into())])),
        }
    }

    #[test]
    fn a_worker_is_registered_passing_with_its_ttl_check() {
        let check = CheckSettings {
            ttl: Duration::from_secs(30),
            deregister_after: Duration::from_millis(90_500),
        };
        let body = registration(&instance(), &check);
        assert_eq!(body["ID"], "me:web:10.0.0.1:9011");
        assert_eq!(body["Name"], "web");
        assert_eq!(body["Port"], 9011);
        assert_eq!(body["Meta"]["worker-port"], "9011");
        assert_eq!(body["Meta"]["workersd-owner"], "me");
        assert_eq!(body["Check"]["TTL"], "30s");
        assert_eq!(body["Check"]["DeregisterCriticalServiceAfter"], "90500ms");
        assert_eq!(body["Check"]["Status"], "passing");
        assert_eq!(
            check_id("me:web:10.0.0.1:9011"),
            "service:me:web:10.0.0.1:9011"
        );
    }

    #[test]
    fn passes_are_due_a_third_of_the_ttl_after_the_last_one() {
        let every = Passes::every(Duration::from_secs(30));
        assert_eq!(every, Duration::from_secs(10));
        let t0 = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut passes = Passes::default();
        // Never passed: due at once.
        assert_eq!(passes.due([&a, &b], t0, every), [a.clone(), b.clone()]);
        passes.passed(a.clone(), t0);
        passes.passed(b.clone(), t0 + Duration::from_secs(4));
        assert_eq!(passes.next_due(every), Some(t0 + every));
        assert!(
            passes
                .due([&a, &b], t0 + Duration::from_secs(9), every)
                .is_empty()
        );
        assert_eq!(
            passes.due([&a, &b], t0 + every, every),
            std::slice::from_ref(&a)
        );
        passes.retain(|id| id == "b");
        assert_eq!(passes.next_due(every), Some(t0 + Duration::from_secs(14)));
        passes.clear();
        assert_eq!(passes.next_due(every), None);
    }
}
