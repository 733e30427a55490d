//! Anti-entropy (`agent/local/state.go`: `SyncChanges`, `SyncFull`, `updateSyncState`,
//! `syncService`, `syncCheck`, `deleteService`, `deleteCheck`, `syncNodeInfo`) and the
//! leader's serf reconciliation of the agent's node (`agent/consul/leader.go`:
//! `handleAliveMember`, `handleFailedMember`; names in `agent/structs/catalog.go`).
//! Writes go straight to the catalog, one committed write per sync.

use std::collections::BTreeMap;

use serde_json::json;

use super::{CRITICAL, LocalAgent};
use crate::model::CheckRecord;
use crate::store::{Catalog, NodeSpec, WriteTxn};

pub const SERF_CHECK_ID: &str = "serfHealth";
const SERF_CHECK_NAME: &str = "Serf Health Status";
const SERF_ALIVE_OUTPUT: &str = "Agent alive and reachable";
const SERF_FAILED_OUTPUT: &str = "Agent not live or unreachable";
/// `structs.ConsulServiceID`: a server's own service, never removed by anti-entropy.
const CONSUL_SERVICE_ID: &str = "consul";

impl LocalAgent {
    fn node_spec(&self) -> NodeSpec {
        let tagged = ["lan", "lan_ipv4", "wan", "wan_ipv4"]
            .into_iter()
            .map(|k| (k.to_string(), self.address.clone()))
            .collect();
        NodeSpec {
            id: self.node_id.clone(),
            node: self.node.clone(),
            address: self.address.clone(),
            datacenter: self.datacenter.clone(),
            tagged_addresses: Some(tagged),
            meta: Some(BTreeMap::from([(
                "consul-network-segment".to_string(),
                String::new(),
            )])),
        }
    }

    /// The leader's serf reconciliation: the node with its `serfHealth` check, passing
    /// while the member is alive, critical once failed. Returns the committed index.
    pub fn reconcile_member(&mut self, catalog: &mut Catalog, failed: bool) -> Option<u64> {
        self.failed = failed;
        let mut tx = WriteTxn::begin(catalog);
        if tx.catalog().node(&self.node).is_none() {
            let _ = tx.set_node(self.node_spec());
        }
        let (status, output) = if failed {
            (CRITICAL, SERF_FAILED_OUTPUT)
        } else {
            ("passing", SERF_ALIVE_OUTPUT)
        };
        let _ = tx.set_check(CheckRecord {
            node: self.node.clone(),
            check_id: SERF_CHECK_ID.into(),
            name: SERF_CHECK_NAME.into(),
            status: status.into(),
            notes: String::new(),
            output: output.into(),
            service_id: String::new(),
            service_name: String::new(),
            service_tags: Vec::new(),
            check_type: String::new(),
            definition: json!({}),
            create_index: 0,
            modify_index: 0,
        });
        tx.commit()
    }

    /// Whether a change sync would write anything.
    pub fn has_changes(&self) -> bool {
        !self.failed
            && (!self.node_in_sync
                || !self.deleted_services.is_empty()
                || !self.deleted_checks.is_empty()
                || self.services.values().any(|s| !s.in_sync)
                || self.checks.values().any(|c| !c.in_sync))
    }

    /// `SyncChanges`: pushes what is out of sync or deleted. Nothing reaches the servers
    /// while the node is failed (the RPCs fail; anti-entropy retries later).
    pub fn sync_changes(&mut self, catalog: &mut Catalog) -> Option<u64> {
        if self.failed {
            return None;
        }
        let node = self.node.clone();
        let mut tx = WriteTxn::begin(catalog);
        if !self.node_in_sync || tx.catalog().node(&node).is_none() {
            let _ = tx.set_node(self.node_spec());
            self.node_in_sync = true;
        }
        for id in std::mem::take(&mut self.deleted_services) {
            tx.delete_service(&node, &id);
        }
        for id in std::mem::take(&mut self.deleted_checks) {
            tx.delete_check(&node, &id);
        }
        for (id, service) in self.services.iter_mut().filter(|(_, s)| !s.in_sync) {
            // Meta and weights were validated at registration with the catalog's rules.
            let _ = tx.set_service(&node, service.record.clone());
            service.in_sync = true;
            // `syncService` sends the service's checks along.
            for check in self.checks.values_mut() {
                if check.record.service_id == *id {
                    check.in_sync = false;
                }
            }
        }
        for check in self.checks.values_mut().filter(|c| !c.in_sync) {
            let _ = tx.set_check(check.record.clone());
            check.in_sync = true;
            check.deferred_until = None;
        }
        tx.commit()
    }

    /// `SyncFull`: compares local state with the catalog's view of the node
    /// (`updateSyncState`), schedules the deletion of anything on the node the agent does
    /// not know (but `serfHealth` and the `consul` service), then syncs the changes.
    pub fn sync_full(&mut self, catalog: &mut Catalog, now: tokio::time::Instant) -> Option<u64> {
        self.next_full_sync = now + self.config.ae_interval;
        // The leader's periodic reconcile puts a live member back (e.g. after a wipe).
        let mut index = None;
        if catalog.check(&self.node, SERF_CHECK_ID).is_none() {
            index = self.reconcile_member(catalog, self.failed);
        }
        if self.failed {
            return index;
        }
        let spec = self.node_spec();
        let Some(remote) = catalog.node(&self.node) else {
            self.node_in_sync = false;
            for s in self.services.values_mut() {
                s.in_sync = false;
            }
            for c in self.checks.values_mut() {
                c.in_sync = false;
            }
            return self.sync_changes(catalog).or(index);
        };
        let record = &remote.record;
        if record.id != spec.id
            || record.tagged_addresses != spec.tagged_addresses
            || record.meta != spec.meta
        {
            self.node_in_sync = false;
        }
        for (id, local) in self.services.iter_mut() {
            let remote_service = remote.services.values().find(|r| r.id == *id);
            match remote_service {
                None => local.in_sync = false,
                Some(r) => {
                    if local.record.enable_tag_override {
                        local.record.tags = r.tags.clone();
                    }
                    local.in_sync = local.record.same_content(r);
                }
            }
        }
        for r in remote.services.values() {
            if !self.services.contains_key(&r.id) && r.id != CONSUL_SERVICE_ID {
                self.deleted_services.insert(r.id.clone());
            }
        }
        for (id, local) in self.checks.iter_mut() {
            let remote_check = remote.checks.values().find(|r| r.check_id == *id);
            match remote_check {
                None => local.in_sync = false,
                Some(r) => {
                    let (mut mine, mut theirs) = (local.record.clone(), r.clone());
                    // An output change waiting for its deferred sync is not pushed now.
                    if local.deferred_until.is_some() {
                        mine.output.clear();
                        theirs.output.clear();
                    }
                    local.in_sync = theirs.same_content(&mine);
                }
            }
        }
        for r in remote.checks.values() {
            if !self.checks.contains_key(&r.check_id) && r.check_id != SERF_CHECK_ID {
                self.deleted_checks.insert(r.check_id.clone());
            }
        }
        self.sync_changes(catalog).or(index)
    }
}
