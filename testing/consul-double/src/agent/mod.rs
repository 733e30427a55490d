//! The local Consul agent: services and TTL checks registered through `/v1/agent/*`, kept
//! in the agent's local state and synced to the catalog under the agent's node by
//! anti-entropy (`sync.rs`), TTL expiry and the critical-service reaper (`timers.rs`),
//! persistence across restarts, and serf's view of the node (alive or failed).
//!
//! Sources (hashicorp/consul): `agent/agent.go` (`addServiceInternal`, `addCheck`,
//! `removeServiceLocked`, `updateTTLCheck`, `persistCheckState`, `loadCheckState`,
//! `loadServices`, `loadChecks`), `agent/local/state.go` (`State`: `UpdateCheck`,
//! `setServiceStateLocked`, `setCheckStateLocked`), `agent/checks/check.go` (`CheckTTL`).
//! Local IDs are case-sensitive, as the agent's Go maps are; the catalog is not.

pub mod definition;
pub(crate) mod endpoints;
mod sync;
mod timers;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

pub use definition::{CheckDef, Refusal, parse_registration};

use crate::model::{CheckRecord, ServiceRecord};

/// `AEInterval`: the period of the full anti-entropy sync.
pub const DEFAULT_AE_INTERVAL: Duration = Duration::from_secs(60);
/// `CheckReapInterval`: how often the reaper looks for services to deregister.
pub const DEFAULT_CHECK_REAP_INTERVAL: Duration = Duration::from_secs(30);
/// `CheckDeregisterIntervalMin`: `DeregisterCriticalServiceAfter` is raised to this.
pub const DEFAULT_CHECK_DEREGISTER_INTERVAL_MIN: Duration = Duration::from_secs(60);
/// `check_update_interval`: an output-only change is synced this late (half to 1.5 times).
pub const DEFAULT_CHECK_UPDATE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// `checks.DefaultBufSize`: longer TTL outputs are truncated.
const OUTPUT_MAX_SIZE: usize = 4096;

pub const CRITICAL: &str = "critical";

/// The local agent's settings; its node name is `Config::node_name`.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// The node's address in the catalog.
    pub address: String,
    pub ae_interval: Duration,
    pub check_reap_interval: Duration,
    /// Upstream's one-minute floor; lowering it is a test-only deviation (CONTRACT.md).
    pub check_deregister_interval_min: Duration,
    pub check_update_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            address: "127.0.0.1".into(),
            ae_interval: DEFAULT_AE_INTERVAL,
            check_reap_interval: DEFAULT_CHECK_REAP_INTERVAL,
            check_deregister_interval_min: DEFAULT_CHECK_DEREGISTER_INTERVAL_MIN,
            check_update_interval: DEFAULT_CHECK_UPDATE_INTERVAL,
        }
    }
}

pub(crate) struct LocalService {
    pub record: ServiceRecord,
    in_sync: bool,
}

pub(crate) struct LocalCheck {
    pub record: CheckRecord,
    pub def: CheckDef,
    /// When the TTL runs out; `None` once it has (`CheckTTL`'s timer fires once).
    ttl_deadline: Option<Instant>,
    /// Kept so an expiry can quote it (`getExpiredOutput`).
    last_output: String,
    /// `CheckState.CriticalTime`: set on a transition to critical through an update, never
    /// by registering a check that starts critical.
    critical_since: Option<Instant>,
    in_sync: bool,
    /// `DeferCheck`: an output-only change waits until then.
    deferred_until: Option<Instant>,
}

/// What the agent's data directory holds for one API-registered service.
#[derive(Clone)]
struct Registration {
    service: ServiceRecord,
    checks: Vec<CheckDef>,
}

/// `persistedCheckState`: the last TTL update, restorable until it expires.
#[derive(Clone)]
struct TtlState {
    status: String,
    output: String,
    expires: Instant,
}

pub(crate) struct LocalAgent {
    pub node: String,
    node_id: String,
    address: String,
    datacenter: String,
    pub config: AgentConfig,
    services: BTreeMap<String, LocalService>,
    checks: BTreeMap<String, LocalCheck>,
    /// Upstream keeps removed entries as `Deleted` states until the server confirms; also
    /// the catalog entries a full sync found on the node but not locally.
    deleted_services: BTreeSet<String>,
    deleted_checks: BTreeSet<String>,
    persisted: BTreeMap<String, Registration>,
    persisted_ttl: BTreeMap<String, TtlState>,
    node_in_sync: bool,
    /// Serf marked the node failed: the servers see it critical and the agent's syncs fail.
    failed: bool,
    next_full_sync: Instant,
    next_reap: Instant,
}

impl LocalAgent {
    pub fn new(
        node: &str,
        node_id: String,
        datacenter: &str,
        config: AgentConfig,
        now: Instant,
    ) -> LocalAgent {
        LocalAgent {
            node: node.to_string(),
            node_id,
            address: config.address.clone(),
            datacenter: datacenter.to_string(),
            next_reap: now + config.check_reap_interval,
            config,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            deleted_services: BTreeSet::new(),
            deleted_checks: BTreeSet::new(),
            persisted: BTreeMap::new(),
            persisted_ttl: BTreeMap::new(),
            node_in_sync: false,
            failed: false,
            // The syncer's first run is a full sync.
            next_full_sync: now,
        }
    }

    pub fn service(&self, id: &str) -> Option<&ServiceRecord> {
        self.services.get(id).map(|s| &s.record)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services.values().map(|s| &s.record)
    }

    pub fn check(&self, id: &str) -> Option<&CheckRecord> {
        self.checks.get(id).map(|c| &c.record)
    }

    pub fn checks(&self) -> impl Iterator<Item = &CheckRecord> {
        self.checks.values().map(|c| &c.record)
    }

    /// `addServiceInternal` with `persist`: checks keep the status and output of a check
    /// with the same ID (the state snapshot), the TTL timers restart, and with
    /// `replace_existing_checks` the service's other checks are removed.
    pub fn add_service(
        &mut self,
        service: ServiceRecord,
        defs: Vec<CheckDef>,
        replace_existing_checks: bool,
        now: Instant,
    ) {
        let id = service.id.clone();
        let mut registration = self.persisted.remove(&id).unwrap_or(Registration {
            service: service.clone(),
            checks: Vec::new(),
        });
        registration.service = service.clone();
        let stale: Vec<String> = self
            .checks
            .iter()
            .filter(|(check_id, c)| {
                c.record.service_id == id && !defs.iter().any(|d| &d.check_id == *check_id)
            })
            .map(|(check_id, _)| check_id.clone())
            .collect();
        let in_sync = self
            .services
            .get(&id)
            .is_some_and(|old| old.record.same_content(&service));
        self.deleted_services.remove(&id);
        self.services.insert(
            id.clone(),
            LocalService {
                record: service.clone(),
                in_sync,
            },
        );
        for def in defs {
            let snapshot = self.checks.get(&def.check_id).map(|c| &c.record);
            let record = CheckRecord {
                node: self.node.clone(),
                check_id: def.check_id.clone(),
                name: def.name.clone(),
                status: snapshot.map_or_else(
                    || {
                        Some(def.status.clone())
                            .filter(|s| !s.is_empty())
                            .unwrap_or(CRITICAL.into())
                    },
                    |c| c.status.clone(),
                ),
                notes: def.notes.clone(),
                output: snapshot.map(|c| c.output.clone()).unwrap_or_default(),
                service_id: id.clone(),
                service_name: service.service.clone(),
                service_tags: service.tags.clone(),
                check_type: "ttl".into(),
                definition: json!({}),
                create_index: 0,
                modify_index: 0,
            };
            registration.checks.retain(|d| d.check_id != def.check_id);
            registration.checks.push(def.clone());
            self.insert_check(record, def, now);
        }
        if replace_existing_checks {
            for check_id in stale {
                self.remove_check(&check_id);
                registration.checks.retain(|d| d.check_id != check_id);
            }
        }
        self.persisted.insert(id, registration);
    }

    /// `setCheckStateLocked`: a new `CheckState` (no critical time, in sync only if
    /// identical to the one it replaces) with a fresh `CheckTTL`.
    fn insert_check(&mut self, record: CheckRecord, def: CheckDef, now: Instant) {
        let in_sync = self
            .checks
            .get(&record.check_id)
            .is_some_and(|old| old.record.same_content(&record));
        self.deleted_checks.remove(&record.check_id);
        self.checks.insert(
            record.check_id.clone(),
            LocalCheck {
                ttl_deadline: Some(now + def.ttl),
                def,
                record,
                last_output: String::new(),
                critical_since: None,
                in_sync,
                deferred_until: None,
            },
        );
    }

    fn remove_check(&mut self, check_id: &str) {
        if self.checks.remove(check_id).is_some() {
            self.deleted_checks.insert(check_id.to_string());
        }
        self.persisted_ttl.remove(check_id);
    }

    /// `removeServiceLocked`: the service and its checks, locally, on disk and (at the
    /// next sync) in the catalog. False if there is no such service.
    pub fn remove_service(&mut self, id: &str) -> bool {
        if self.services.remove(id).is_none() {
            return false;
        }
        self.deleted_services.insert(id.to_string());
        let checks: Vec<String> = self
            .checks
            .iter()
            .filter(|(_, c)| c.record.service_id == id)
            .map(|(check_id, _)| check_id.clone())
            .collect();
        for check_id in checks {
            self.remove_check(&check_id);
        }
        self.persisted.remove(id);
        true
    }

    /// `updateTTLCheck` + `CheckTTL.SetStatus`: truncates the output, restarts the TTL and
    /// persists the state (restorable for one TTL). The caller has vetted the check ID.
    pub fn update_ttl(&mut self, check_id: &str, status: &str, output: &str, now: Instant) {
        let Some(check) = self.checks.get_mut(check_id) else {
            return;
        };
        let output = truncate_output(output);
        check.last_output = output.clone();
        check.ttl_deadline = Some(now + check.def.ttl);
        self.persisted_ttl.insert(
            check_id.to_string(),
            TtlState {
                status: status.to_string(),
                output: output.clone(),
                expires: now + check.def.ttl,
            },
        );
        self.update_check(check_id, status, &output, now);
    }

    /// `State.UpdateCheck`: tracks the critical time, ignores no-op updates, defers an
    /// output-only change by about `check_update_interval`, marks anything else unsynced.
    fn update_check(&mut self, check_id: &str, status: &str, output: &str, now: Instant) {
        let interval = self.config.check_update_interval;
        let Some(check) = self.checks.get_mut(check_id) else {
            return;
        };
        if status == CRITICAL {
            check.critical_since.get_or_insert(now);
        } else {
            check.critical_since = None;
        }
        if check.record.status == status && check.record.output == output {
            return;
        }
        if !interval.is_zero() && check.record.status == status {
            check.record.output = output.to_string();
            if check.deferred_until.is_none() {
                // `lib.RandomStagger(interval)`: below `interval` (jitter gives up to 1/16).
                let stagger = crate::query::jitter(interval * 16);
                check.deferred_until = Some(now + interval / 2 + stagger);
            }
            return;
        }
        check.record.status = status.to_string();
        check.record.output = output.to_string();
        check.in_sync = false;
    }

    /// An agent restart: local state is rebuilt from the data directory (`loadServices`,
    /// `loadChecks`: every check starts critical unless its persisted TTL state has not
    /// expired yet). `dev`: an agent run with `-dev` persists nothing and comes back empty.
    pub fn restart(&mut self, dev: bool, now: Instant) {
        if dev {
            self.persisted.clear();
            self.persisted_ttl.clear();
        }
        self.services.clear();
        self.checks.clear();
        self.deleted_services.clear();
        self.deleted_checks.clear();
        self.node_in_sync = false;
        self.persisted_ttl.retain(|_, state| state.expires > now);
        let registrations: Vec<Registration> = self.persisted.values().cloned().collect();
        for registration in registrations {
            let service = registration.service.clone();
            let id = service.id.clone();
            self.services.insert(
                id.clone(),
                LocalService {
                    record: service.clone(),
                    in_sync: false,
                },
            );
            for def in registration.checks {
                let restored = self.persisted_ttl.get(&def.check_id);
                let record = CheckRecord {
                    node: self.node.clone(),
                    check_id: def.check_id.clone(),
                    name: def.name.clone(),
                    status: restored.map_or(CRITICAL.into(), |s| s.status.clone()),
                    notes: def.notes.clone(),
                    output: restored.map(|s| s.output.clone()).unwrap_or_default(),
                    service_id: id.clone(),
                    service_name: service.service.clone(),
                    service_tags: service.tags.clone(),
                    check_type: "ttl".into(),
                    definition: json!({}),
                    create_index: 0,
                    modify_index: 0,
                };
                self.insert_check(record, def, now);
            }
        }
        self.next_full_sync = now;
        self.next_reap = now + self.config.check_reap_interval;
    }

    /// `GET /control/agent`: the local state as the agent sees it.
    pub fn dump(&self, now: Instant) -> Value {
        let checks: Vec<Value> = self
            .checks
            .values()
            .map(|c| {
                json!({
                    "CheckID": c.record.check_id,
                    "ServiceID": c.record.service_id,
                    "Status": c.record.status,
                    "Output": c.record.output,
                    "InSync": c.in_sync,
                    "TTLSeconds": c.def.ttl.as_secs_f64(),
                    "DeregisterCriticalServiceAfterSeconds":
                        self.reap_after(&c.def).map(|d| d.as_secs_f64()),
                    "CriticalForSeconds":
                        c.critical_since.map(|t| now.duration_since(t).as_secs_f64()),
                })
            })
            .collect();
        json!({
            "node": self.node,
            "address": self.address,
            "failed": self.failed,
            "services": self.services.values().map(|s| json!({
                "ID": s.record.id, "Service": s.record.service, "InSync": s.in_sync,
            })).collect::<Vec<_>>(),
            "checks": checks,
            "persisted_services": self.persisted.keys().collect::<Vec<_>>(),
        })
    }

    /// The reaper's timeout for a check: `DeregisterCriticalServiceAfter` raised to the
    /// minimum, or none.
    fn reap_after(&self, def: &CheckDef) -> Option<Duration> {
        let given = def.deregister_critical_service_after;
        (!given.is_zero()).then(|| given.max(self.config.check_deregister_interval_min))
    }
}

/// `CheckTTL.SetStatus`: outputs over `DefaultBufSize` are cut with a note.
fn truncate_output(output: &str) -> String {
    if output.len() <= OUTPUT_MAX_SIZE {
        return output.to_string();
    }
    let mut cut = OUTPUT_MAX_SIZE;
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{} ... (captured {OUTPUT_MAX_SIZE} of {} bytes)",
        &output[..cut],
        output.len()
    )
}
