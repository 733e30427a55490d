//! The in-memory catalog: nodes, their services and checks, secondary
//! indexes, and an undo-logged write transaction that gives every write
//! endpoint Consul's all-or-nothing semantics.
//!
//! Like Consul's memdb indexes, node names, service IDs, check IDs and
//! service names are matched case-insensitively; records keep the caller's
//! spelling.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{CheckRecord, Meta, NodeRecord, ServiceRecord};

pub fn key(name: &str) -> String {
    name.to_lowercase()
}

// Consul's `state.ErrMissingNode` / `ErrMissingService` texts.
pub const ERR_MISSING_NODE: &str = "Missing node registration";
pub const ERR_MISSING_SERVICE: &str = "Missing service registration";

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub record: NodeRecord,
    /// Keyed by lower-cased service ID.
    pub services: BTreeMap<String, ServiceRecord>,
    /// Keyed by lower-cased check ID.
    pub checks: BTreeMap<String, CheckRecord>,
}

#[derive(Clone, Debug, Default)]
pub struct ServiceNameEntry {
    /// Spelling of the first registered instance, used as the map key in
    /// `/v1/catalog/services`.
    pub display_name: String,
    /// (lower-cased node name, lower-cased service ID).
    pub instances: BTreeSet<(String, String)>,
    /// Tag -> number of instances carrying it, so listing all tags of a
    /// service name does not scan its instances.
    pub tag_counts: BTreeMap<String, usize>,
}

#[derive(Clone, Debug)]
pub struct Catalog {
    /// Highest index that modified anything; what `X-Consul-Index` reports.
    pub index: u64,
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Lower-cased node ID -> lower-cased node name.
    node_ids: HashMap<String, String>,
    pub services_by_name: BTreeMap<String, ServiceNameEntry>,
    /// Lower-cased node name -> last index that changed the node, its
    /// services or its checks (Consul's `node.<name>` index entry, read by
    /// `catalogNodeMaxIndex` in agent/consul/state/catalog.go).
    node_indexes: HashMap<String, u64>,
    /// Last index that deleted a node (`catalogNodeLastExtinctionIndex`):
    /// what a read of an unknown node reports.
    node_extinction_index: u64,
}

enum Undo {
    Node {
        node_key: String,
        before: Option<NodeRecord>,
    },
    Service {
        node_key: String,
        id_key: String,
        before: Option<ServiceRecord>,
    },
    Check {
        node_key: String,
        id_key: String,
        before: Option<CheckRecord>,
    },
}

/// A node write as understood by the state store (`ensureNodeTxn`).
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: Option<Meta>,
    pub meta: Option<Meta>,
}

impl Catalog {
    pub fn new(initial_index: u64) -> Catalog {
        Catalog {
            index: initial_index.max(1),
            nodes: BTreeMap::new(),
            node_ids: HashMap::new(),
            services_by_name: BTreeMap::new(),
            node_indexes: HashMap::new(),
            node_extinction_index: 0,
        }
    }

    /// The `X-Consul-Index` of a node read: the node's own index, or the
    /// last node deletion for an unknown node (Consul's `nodeServices`).
    pub fn node_index(&self, name: &str) -> u64 {
        let node_key = key(name);
        match self.node_indexes.get(&node_key) {
            Some(index) if self.nodes.contains_key(&node_key) => *index,
            _ => self.node_extinction_index,
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.get(&key(name))
    }

    pub fn node_by_id(&self, id: &str) -> Option<&NodeEntry> {
        self.nodes.get(self.node_ids.get(&key(id))?)
    }

    pub fn service(&self, node: &str, id: &str) -> Option<&ServiceRecord> {
        self.node(node)?.services.get(&key(id))
    }

    pub fn check(&self, node: &str, id: &str) -> Option<&CheckRecord> {
        self.node(node)?.checks.get(&key(id))
    }

    pub fn service_count(&self) -> usize {
        self.services_by_name
            .values()
            .map(|e| e.instances.len())
            .sum()
    }

    /// Instances of one service name, ordered by (node, service ID).
    pub fn instances_of<'a>(
        &'a self,
        name: &str,
    ) -> impl Iterator<Item = (&'a NodeEntry, &'a ServiceRecord)> + 'a {
        self.services_by_name
            .get(&key(name))
            .into_iter()
            .flat_map(|entry| entry.instances.iter())
            .filter_map(|(node_key, id_key)| {
                let node = self.nodes.get(node_key)?;
                Some((node, node.services.get(id_key)?))
            })
    }

    // -- low-level mutators that keep the secondary indexes right ----------

    fn put_node_raw(&mut self, node_key: &str, record: Option<NodeRecord>) {
        if let Some(old) = self.nodes.get(node_key)
            && !old.record.id.is_empty()
        {
            self.node_ids.remove(&key(&old.record.id));
        }
        match record {
            Some(record) => {
                if !record.id.is_empty() {
                    self.node_ids.insert(key(&record.id), node_key.to_string());
                }
                match self.nodes.get_mut(node_key) {
                    Some(entry) => entry.record = record,
                    None => {
                        self.nodes.insert(
                            node_key.to_string(),
                            NodeEntry {
                                record,
                                services: BTreeMap::new(),
                                checks: BTreeMap::new(),
                            },
                        );
                    }
                }
            }
            None => {
                self.nodes.remove(node_key);
            }
        }
    }

    fn put_service_raw(&mut self, node_key: &str, id_key: &str, record: Option<ServiceRecord>) {
        let Some(node) = self.nodes.get_mut(node_key) else {
            return;
        };
        let old = match record {
            Some(record) => node.services.insert(id_key.to_string(), record),
            None => node.services.remove(id_key),
        };
        let new = node.services.get(id_key).cloned();
        let instance = (node_key.to_string(), id_key.to_string());
        if let Some(old) = old {
            let name_key = key(&old.service);
            if let Some(entry) = self.services_by_name.get_mut(&name_key) {
                entry.instances.remove(&instance);
                for tag in &old.tags {
                    if let Some(count) = entry.tag_counts.get_mut(tag) {
                        *count -= 1;
                        if *count == 0 {
                            entry.tag_counts.remove(tag);
                        }
                    }
                }
                if entry.instances.is_empty() {
                    self.services_by_name.remove(&name_key);
                }
            }
        }
        if let Some(new) = new {
            let entry = self
                .services_by_name
                .entry(key(&new.service))
                .or_insert_with(|| ServiceNameEntry {
                    display_name: new.service.clone(),
                    ..ServiceNameEntry::default()
                });
            entry.instances.insert(instance);
            for tag in &new.tags {
                *entry.tag_counts.entry(tag.clone()).or_insert(0) += 1;
            }
        }
    }

    fn put_check_raw(&mut self, node_key: &str, id_key: &str, record: Option<CheckRecord>) {
        let Some(node) = self.nodes.get_mut(node_key) else {
            return;
        };
        match record {
            Some(record) => {
                node.checks.insert(id_key.to_string(), record);
            }
            None => {
                node.checks.remove(id_key);
            }
        }
    }
}

/// An open write transaction. Every mutation is logged so that
/// [`WriteTxn::rollback`] restores the exact previous state; nothing else
/// can observe the catalog meanwhile because the caller holds the write lock.
pub struct WriteTxn<'a> {
    catalog: &'a mut Catalog,
    index: u64,
    undo: Vec<Undo>,
}

impl<'a> WriteTxn<'a> {
    pub fn begin(catalog: &'a mut Catalog) -> WriteTxn<'a> {
        let index = catalog.index + 1;
        WriteTxn {
            catalog,
            index,
            undo: Vec::new(),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        self.catalog
    }

    /// Makes the changes visible. Returns the new index, or `None` when the
    /// transaction changed nothing (Consul does not move table indexes, and
    /// so does not wake blocking queries, for idempotent writes).
    pub fn commit(self) -> Option<u64> {
        if self.undo.is_empty() {
            return None;
        }
        self.catalog.index = self.index;
        for step in &self.undo {
            let (Undo::Node { node_key, .. }
            | Undo::Service { node_key, .. }
            | Undo::Check { node_key, .. }) = step;
            if self.catalog.nodes.contains_key(node_key) {
                self.catalog
                    .node_indexes
                    .insert(node_key.clone(), self.index);
            } else {
                self.catalog.node_indexes.remove(node_key);
                self.catalog.node_extinction_index = self.index;
            }
        }
        Some(self.index)
    }

    pub fn rollback(mut self) {
        while let Some(step) = self.undo.pop() {
            match step {
                Undo::Node { node_key, before } => self.catalog.put_node_raw(&node_key, before),
                Undo::Service {
                    node_key,
                    id_key,
                    before,
                } => self.catalog.put_service_raw(&node_key, &id_key, before),
                Undo::Check {
                    node_key,
                    id_key,
                    before,
                } => self.catalog.put_check_raw(&node_key, &id_key, before),
            }
        }
    }

    fn put_node(&mut self, node_key: &str, record: Option<NodeRecord>) {
        let before = self.catalog.nodes.get(node_key).map(|e| e.record.clone());
        self.undo.push(Undo::Node {
            node_key: node_key.to_string(),
            before,
        });
        self.catalog.put_node_raw(node_key, record);
    }

    fn put_service(&mut self, node_key: &str, id_key: &str, record: Option<ServiceRecord>) {
        let before = self
            .catalog
            .nodes
            .get(node_key)
            .and_then(|n| n.services.get(id_key).cloned());
        self.undo.push(Undo::Service {
            node_key: node_key.to_string(),
            id_key: id_key.to_string(),
            before,
        });
        self.catalog.put_service_raw(node_key, id_key, record);
    }

    fn put_check(&mut self, node_key: &str, id_key: &str, record: Option<CheckRecord>) {
        let before = self
            .catalog
            .nodes
            .get(node_key)
            .and_then(|n| n.checks.get(id_key).cloned());
        self.undo.push(Undo::Check {
            node_key: node_key.to_string(),
            id_key: id_key.to_string(),
            before,
        });
        self.catalog.put_check_raw(node_key, id_key, record);
    }

    // -- state-store operations --------------------------------------------

    /// Creates or replaces a node (Consul's `ensureNodeTxn`).
    pub fn set_node(&mut self, spec: NodeSpec) -> Result<NodeRecord, String> {
        let node_key = key(&spec.node);
        if !spec.id.is_empty()
            && let Some(owner) = self.catalog.node_ids.get(&key(&spec.id))
            && *owner != node_key
        {
            let owner_name = self
                .catalog
                .nodes
                .get(owner)
                .map(|e| e.record.node.clone())
                .unwrap_or_default();
            return Err(format!(
                "node ID {:?} for node {:?} aliases existing node {:?}",
                spec.id, spec.node, owner_name
            ));
        }
        let mut record = NodeRecord {
            id: spec.id,
            node: spec.node,
            address: spec.address,
            datacenter: spec.datacenter,
            tagged_addresses: spec.tagged_addresses,
            meta: spec.meta,
            create_index: self.index,
            modify_index: self.index,
        };
        if let Some(existing) = self.catalog.nodes.get(&node_key) {
            if existing.record.same_content(&record) {
                return Ok(existing.record.clone());
            }
            record.create_index = existing.record.create_index;
        }
        self.put_node(&node_key, Some(record.clone()));
        Ok(record)
    }

    /// Removes a node with its services and checks; absent nodes are a no-op.
    pub fn delete_node(&mut self, name: &str) {
        let node_key = key(name);
        let Some(entry) = self.catalog.nodes.get(&node_key) else {
            return;
        };
        let service_keys: Vec<String> = entry.services.keys().cloned().collect();
        let check_keys: Vec<String> = entry.checks.keys().cloned().collect();
        for id_key in check_keys {
            self.put_check(&node_key, &id_key, None);
        }
        for id_key in service_keys {
            self.put_service(&node_key, &id_key, None);
        }
        self.put_node(&node_key, None);
    }

    /// Creates or replaces a service instance (Consul's `ensureServiceTxn`).
    /// `record` carries content only; indexes are assigned here.
    pub fn set_service(
        &mut self,
        node: &str,
        mut record: ServiceRecord,
    ) -> Result<ServiceRecord, String> {
        validate_service_meta(node, &record)?;
        let node_key = key(node);
        if !self.catalog.nodes.contains_key(&node_key) {
            return Err(ERR_MISSING_NODE.to_string());
        }
        let id_key = key(&record.id);
        record.create_index = self.index;
        record.modify_index = self.index;
        if let Some(existing) = self
            .catalog
            .nodes
            .get(&node_key)
            .and_then(|n| n.services.get(&id_key))
        {
            if existing.same_content(&record) {
                return Ok(existing.clone());
            }
            record.create_index = existing.create_index;
            // Checks copy the service's name and tags; only then rescan them.
            if existing.service != record.service || existing.tags != record.tags {
                self.put_service(&node_key, &id_key, Some(record.clone()));
                self.refresh_service_checks(&node_key, &record);
                return Ok(record);
            }
        }
        // A brand-new instance cannot have checks yet: set_check needs it.
        self.put_service(&node_key, &id_key, Some(record.clone()));
        Ok(record)
    }

    /// Service checks denormalise the service name and tags; keep them in step.
    fn refresh_service_checks(&mut self, node_key: &str, service: &ServiceRecord) {
        let Some(entry) = self.catalog.nodes.get(node_key) else {
            return;
        };
        let stale: Vec<(String, CheckRecord)> = entry
            .checks
            .iter()
            .filter(|(_, c)| {
                key(&c.service_id) == key(&service.id)
                    && (c.service_name != service.service || c.service_tags != service.tags)
            })
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (id_key, mut check) in stale {
            check.service_name = service.service.clone();
            check.service_tags = service.tags.clone();
            check.modify_index = self.index;
            self.put_check(node_key, &id_key, Some(check));
        }
    }

    /// Removes a service and its checks; absent services are a no-op.
    pub fn delete_service(&mut self, node: &str, id: &str) {
        let node_key = key(node);
        let id_key = key(id);
        let Some(entry) = self.catalog.nodes.get(&node_key) else {
            return;
        };
        if !entry.services.contains_key(&id_key) {
            return;
        }
        let checks: Vec<String> = entry
            .checks
            .iter()
            .filter(|(_, c)| key(&c.service_id) == id_key)
            .map(|(k, _)| k.clone())
            .collect();
        for check_key in checks {
            self.put_check(&node_key, &check_key, None);
        }
        self.put_service(&node_key, &id_key, None);
    }

    /// Creates or replaces a check (Consul's `ensureCheckTxn`).
    pub fn set_check(&mut self, mut record: CheckRecord) -> Result<CheckRecord, String> {
        let node_key = key(&record.node);
        let Some(node) = self.catalog.nodes.get(&node_key) else {
            return Err(ERR_MISSING_NODE.to_string());
        };
        if record.status.is_empty() {
            record.status = "critical".to_string();
        }
        if record.service_id.is_empty() {
            record.service_name.clear();
            record.service_tags.clear();
        } else {
            let Some(service) = node.services.get(&key(&record.service_id)) else {
                return Err(ERR_MISSING_SERVICE.to_string());
            };
            record.service_name = service.service.clone();
            record.service_tags = service.tags.clone();
        }
        let id_key = key(&record.check_id);
        record.create_index = self.index;
        record.modify_index = self.index;
        if let Some(existing) = node.checks.get(&id_key) {
            if existing.same_content(&record) {
                return Ok(existing.clone());
            }
            record.create_index = existing.create_index;
        }
        self.put_check(&node_key, &id_key, Some(record.clone()));
        Ok(record)
    }

    pub fn delete_check(&mut self, node: &str, id: &str) {
        let node_key = key(node);
        let id_key = key(id);
        if self
            .catalog
            .nodes
            .get(&node_key)
            .is_some_and(|n| n.checks.contains_key(&id_key))
        {
            self.put_check(&node_key, &id_key, None);
        }
    }
}

// Limits from Consul's `structs.validateMetadata`.
const META_MAX_PAIRS: usize = 64;
const META_KEY_MAX_LEN: usize = 128;
const META_VALUE_MAX_LEN: usize = 512;
const META_RESERVED_PREFIX: &str = "consul-";

fn validate_service_meta(node: &str, service: &ServiceRecord) -> Result<(), String> {
    let Some(meta) = &service.meta else {
        return Ok(());
    };
    validate_meta(meta).map_err(|detail| {
        format!(
            "Invalid Service Meta for node {} and serviceID {}: {}",
            node, service.id, detail
        )
    })
}

/// Consul's `structs.validateMetadata` for service meta: its error text, unwrapped (the
/// catalog and the agent endpoint each add their own prefix).
pub fn validate_meta(meta: &Meta) -> Result<(), String> {
    if meta.len() > META_MAX_PAIRS {
        return Err(format!(
            "Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
        ));
    }
    for (k, v) in meta {
        let problem = if k.is_empty() {
            Some("Key cannot be blank".to_string())
        } else if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("Key contains invalid characters".to_string())
        } else if k.len() > META_KEY_MAX_LEN {
            Some(format!(
                "Key is too long (limit: {META_KEY_MAX_LEN} characters)"
            ))
        } else if k.starts_with(META_RESERVED_PREFIX) {
            Some(format!(
                "Key prefix '{META_RESERVED_PREFIX}' is reserved for internal use"
            ))
        } else if v.len() > META_VALUE_MAX_LEN {
            Some(format!(
                "Value is too long (limit: {META_VALUE_MAX_LEN} characters)"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(format!(
                "Couldn't load metadata pair ('{k}', '{v}'): {problem}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Weights;

    fn node(name: &str) -> NodeSpec {
        NodeSpec {
            node: name.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            ..NodeSpec::default()
        }
    }

    fn service(id: &str, name: &str, tags: &[&str]) -> ServiceRecord {
        ServiceRecord {
            kind: String::new(),
            id: id.into(),
            service: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: String::new(),
            tagged_addresses: None,
            meta: None,
            port: 80,
            weights: Weights::normalized(None),
            enable_tag_override: false,
            mesh: Default::default(),
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn rollback_restores_indexes_and_records() {
        let mut cat = Catalog::new(1);
        let mut tx = WriteTxn::begin(&mut cat);
        tx.set_node(node("n1")).unwrap();
        tx.set_service("n1", service("a", "web", &["x"])).unwrap();
        assert_eq!(tx.commit(), Some(2));

        let before = format!("{:?}", (&cat.nodes, &cat.services_by_name));
        let mut tx = WriteTxn::begin(&mut cat);
        tx.set_service("N1", service("b", "web", &["y"])).unwrap();
        tx.delete_service("n1", "A");
        tx.delete_node("n1");
        tx.set_node(node("n2")).unwrap();
        tx.rollback();
        assert_eq!(format!("{:?}", (&cat.nodes, &cat.services_by_name)), before);
        assert_eq!(cat.index, 2);
    }

    #[test]
    fn identical_write_changes_nothing() {
        let mut cat = Catalog::new(5);
        let mut tx = WriteTxn::begin(&mut cat);
        tx.set_node(node("n1")).unwrap();
        tx.set_service("n1", service("a", "web", &[])).unwrap();
        assert_eq!(tx.commit(), Some(6));
        let mut tx = WriteTxn::begin(&mut cat);
        let rec = tx.set_service("n1", service("a", "web", &[])).unwrap();
        assert_eq!((rec.create_index, rec.modify_index), (6, 6));
        assert_eq!(tx.commit(), None);
        assert_eq!(cat.index, 6);
    }

    #[test]
    fn service_on_missing_node_fails_and_bad_meta_is_rejected() {
        let mut cat = Catalog::new(1);
        let mut tx = WriteTxn::begin(&mut cat);
        assert_eq!(
            tx.set_service("ghost", service("a", "web", &[]))
                .unwrap_err(),
            ERR_MISSING_NODE
        );
        tx.set_node(node("n1")).unwrap();
        let mut bad = service("a", "web", &[]);
        bad.meta = Some([("bad.key".to_string(), "v".to_string())].into());
        let err = tx.set_service("n1", bad).unwrap_err();
        assert!(err.contains("Key contains invalid characters"), "{err}");
        tx.rollback();
        assert!(cat.nodes.is_empty());
    }

    #[test]
    fn tag_counts_follow_updates() {
        let mut cat = Catalog::new(1);
        let mut tx = WriteTxn::begin(&mut cat);
        tx.set_node(node("n1")).unwrap();
        tx.set_service("n1", service("a", "web", &["x", "y"]))
            .unwrap();
        tx.set_service("n1", service("b", "web", &["y"])).unwrap();
        tx.set_service("n1", service("a", "web", &["z"])).unwrap();
        tx.commit();
        let tags: Vec<_> = cat.services_by_name["web"]
            .tag_counts
            .keys()
            .cloned()
            .collect();
        assert_eq!(tags, ["y", "z"]);
        let mut tx = WriteTxn::begin(&mut cat);
        tx.delete_node("n1");
        tx.commit();
        assert!(cat.services_by_name.is_empty());
    }
}
