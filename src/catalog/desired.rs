//! The desired catalog: one entry per live worker port of each declared target, owned by this
//! workersd. Pure: built from targets and probe results, no I/O.

use crate::model::{Catalog, EXTERNAL_SOURCE, ServiceInstance, Target, TargetId, meta_keys};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Stable and unique per owner and endpoint, so two workersd instances sharing a node never
/// collide and a restarted instance recognises its own entries. Lower case: Consul matches
/// service IDs case-insensitively (its memdb ID indexes lower-case them), so two IDs that
/// differ only in case would be one row there.
pub fn instance_id(owner: &str, service: &str, address: &str, port: u16) -> String {
    let mut id = format!("{owner}:{service}:{address}:{port}");
    id.make_ascii_lowercase();
    id
}

/// One instance per live port of each target.
pub fn desired_catalog<'a>(
    owner: &str,
    live: impl IntoIterator<Item = (&'a Target, &'a BTreeSet<u16>)>,
) -> Catalog {
    let mut catalog = Catalog::new();
    for (target, ports) in live {
        let address = target.address.to_string();
        let mut meta = target.meta.clone();
        meta.insert(meta_keys::EXTERNAL_SOURCE.into(), EXTERNAL_SOURCE.into());
        meta.insert(meta_keys::OWNER.into(), owner.into());
        meta.insert(meta_keys::METRICS_PATH.into(), target.path.clone());
        meta.insert(
            meta_keys::METRICS_SCHEME.into(),
            target.scheme.as_str().into(),
        );
        // `worker-port` is the instance's port, added when published.
        let meta = Arc::new(meta);
        for &port in ports.iter().filter(|p| target.ports.contains(**p)) {
            let instance = ServiceInstance {
                id: instance_id(owner, &target.service, &address, port).into(),
                service: target.service.clone(),
                address: address.clone(),
                port,
                tags: target.tags.clone(),
                meta: meta.clone(),
            };
            catalog.insert(instance.id.clone(), Arc::new(instance));
        }
    }
    catalog
}

/// What every sink should publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub catalog: Catalog,
    /// Every declared target has been swept at least once. Until then an absent entry may
    /// just be not yet re-discovered, so sinks must not deregister anything.
    pub complete: bool,
}

pub type DesiredRx = watch::Receiver<Arc<DesiredState>>;

pub fn desired_channel() -> (watch::Sender<Arc<DesiredState>>, DesiredRx) {
    watch::channel(Arc::new(DesiredState::default()))
}

/// The desired catalog, kept incrementally: a probe report or a source snapshot only
/// rebuilds the entries of the targets it changed, not every endpoint.
#[derive(Default)]
pub struct DesiredCatalog {
    owner: String,
    /// Shared with the prober's sweep loops: one copy of each target, not one per stage.
    targets: HashMap<TargetId, Arc<Target>>,
    live: HashMap<TargetId, BTreeSet<u16>>,
    swept: HashSet<TargetId>,
    /// The desired catalog of `targets` × `live`.
    catalog: Catalog,
    /// The catalog IDs each target contributed.
    ids: HashMap<TargetId, Vec<Arc<str>>>,
    /// IDs two targets produced at once (same service, address and port; never in a valid
    /// configuration): removing one falls back to a full rebuild so the other stays.
    contested: HashSet<Arc<str>>,
    /// The catalog or `complete` may have changed since the last publish.
    dirty: bool,
}

impl DesiredCatalog {
    pub fn new(owner: &str) -> Self {
        Self {
            owner: owner.to_string(),
            dirty: true,
            ..Self::default()
        }
    }

    pub fn apply_snapshot(&mut self, snapshot: &[Arc<Target>]) {
        let shared = snapshot
            .iter()
            .map(|t| {
                // `Arc` equality: the same allocation (a target shared from the last
                // snapshot) is equal without comparing fields.
                let kept = self.targets.get(&t.id).filter(|old| *old == t).cloned();
                (t.id.clone(), kept.unwrap_or_else(|| Arc::clone(t)))
            })
            .collect();
        let old = std::mem::replace(&mut self.targets, shared);
        self.carry_over_replaced(&old);
        // Keep live ports of unchanged ids (a tag edit must not flap entries) but never a
        // port outside the target's current range.
        self.live.retain(|id, ports| match self.targets.get(id) {
            Some(t) => {
                ports.retain(|p| t.ports.contains(*p));
                true
            }
            None => false,
        });
        self.swept.retain(|id| self.targets.contains_key(id));
        let changed: Vec<TargetId> = old
            .iter()
            .filter(|(id, t)| self.targets.get(*id) != Some(*t))
            .map(|(id, _)| id.clone())
            .chain(
                self.targets
                    .keys()
                    .filter(|id| !old.contains_key(*id))
                    .cloned(),
            )
            .collect();
        for id in &changed {
            self.rebuild_target(id);
        }
        // Membership changes move `complete` even when no entry changed.
        self.dirty = true;
    }

    /// A target replaced by a new one at the same address and service (a port-range edit
    /// changes a file target's id) hands its live ports inside the new range to its successor
    /// until the successor's first sweep reports, so the edit does not flap entries.
    fn carry_over_replaced(&mut self, old: &HashMap<TargetId, Arc<Target>>) {
        let mut successors: HashMap<(IpAddr, &str), Vec<&Target>> = HashMap::new();
        for (id, target) in &self.targets {
            if !old.contains_key(id) && !self.live.contains_key(id) {
                successors
                    .entry((target.address, target.service.as_str()))
                    .or_default()
                    .push(target);
            }
        }
        if successors.is_empty() {
            return;
        }
        let mut carried: Vec<(TargetId, u16)> = Vec::new();
        for (id, replaced) in old.iter().filter(|(id, _)| !self.targets.contains_key(*id)) {
            let (Some(ports), Some(next)) = (
                self.live.get(id),
                successors.get(&(replaced.address, replaced.service.as_str())),
            ) else {
                continue;
            };
            for successor in next {
                let inside = ports.iter().filter(|p| successor.ports.contains(**p));
                carried.extend(inside.map(|p| (successor.id.clone(), *p)));
            }
        }
        for (id, port) in carried {
            self.live.entry(id).or_default().insert(port);
        }
    }

    /// A completed sweep of `id` found `live`.
    pub fn set_live(&mut self, id: TargetId, live: BTreeSet<u16>) {
        if self.swept.insert(id.clone()) {
            self.dirty = true;
        }
        if self.live.get(&id) == Some(&live) {
            return;
        }
        self.live.insert(id.clone(), live);
        self.rebuild_target(&id);
    }

    /// Replaces `id`'s entries in the catalog by what its target and live ports give now.
    fn rebuild_target(&mut self, id: &TargetId) {
        self.dirty = true;
        for old in self.ids.remove(id).unwrap_or_default() {
            if self.contested.contains(&old) {
                self.rebuild_all();
                return;
            }
            self.catalog.remove(&old);
        }
        self.insert_target(id);
    }

    fn insert_target(&mut self, id: &TargetId) {
        let (Some(target), Some(ports)) = (self.targets.get(id), self.live.get(id)) else {
            return;
        };
        let entries = desired_catalog(&self.owner, [(&**target, ports)]);
        if entries.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for (key, instance) in entries {
            if self.catalog.insert(key.clone(), instance).is_some() {
                self.contested.insert(key.clone());
            }
            ids.push(key);
        }
        self.ids.insert(id.clone(), ids);
    }

    fn rebuild_all(&mut self) {
        self.catalog.clear();
        self.ids.clear();
        self.contested.clear();
        let ids: Vec<TargetId> = self.targets.keys().cloned().collect();
        for id in &ids {
            self.insert_target(id);
        }
        self.dirty = true;
    }

    /// The current targets, shared with the prober.
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.targets.values()
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The desired state, when it may have changed since the last call (no clone otherwise).
    pub fn take_changed(&mut self) -> Option<DesiredState> {
        std::mem::take(&mut self.dirty).then(|| self.desired())
    }

    pub fn desired(&self) -> DesiredState {
        DesiredState {
            catalog: self.catalog.clone(),
            complete: self.targets.keys().all(|id| self.swept.contains(id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{is_owned_by, row_key};
    use crate::fixtures;

    const OWNER: &str = "me";

    fn target(id: &str, ports: &str, tag: &str) -> Arc<Target> {
        fixtures::target(id)
            .service("svc")
            .address("127.0.0.9")
            .ports(ports)
            .tag(tag)
            .shared()
    }

    #[test]
    fn desired_catalog_has_one_instance_per_live_port_with_our_meta() {
        let t = fixtures::target("t")
            .service("clever")
            .address("127.0.0.2")
            .tag("gunicorn")
            .meta("team", "web")
            .build();
        let live = BTreeSet::from([9011, 9013, 9999]);
        let catalog = desired_catalog(OWNER, [(&t, &live)]);
        assert_eq!(
            catalog.len(),
            2,
            "a port outside the range is never published"
        );
        let inst = &catalog["me:clever:127.0.0.2:9013"];
        assert_eq!(inst.address, "127.0.0.2");
        assert_eq!(inst.port, 9013);
        assert_eq!(inst.meta["external-source"], "workersd");
        assert_eq!(inst.meta["workersd-owner"], "me");
        assert_eq!(inst.meta["metrics-path"], "/metrics");
        assert_eq!(inst.meta["metrics-scheme"], "http");
        assert_eq!(inst.published_meta()["worker-port"], "9013");
        assert_eq!(inst.meta["team"], "web");
        // Every port of a target shares one meta map.
        let other = &catalog["me:clever:127.0.0.2:9011"];
        assert!(Arc::ptr_eq(&inst.meta, &other.meta));
        assert_eq!(other.published_meta()["worker-port"], "9011");
        assert!(is_owned_by(inst, OWNER));
        assert!(!is_owned_by(inst, "someone-else"));
    }

    #[test]
    fn ids_cannot_differ_only_in_case() {
        let id = instance_id("Cluster-A", "Clever", "fe80::1", 9011);
        assert_eq!(id, instance_id("cluster-a", "clever", "FE80::1", 9011));
        assert_eq!(row_key(&id), id, "our own IDs are already row keys");
    }

    #[test]
    fn the_prober_gets_every_target_of_the_snapshot() {
        let mut desired = DesiredCatalog::new("o");
        desired.apply_snapshot(&[target("a", "10-12", "x"), target("b", "20-22", "x")]);
        let mut ids: Vec<String> = desired.targets().map(|t| t.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(desired.target_count(), 2);
    }

    #[test]
    fn a_change_is_taken_once_and_an_unchanged_report_gives_nothing() {
        let mut desired = DesiredCatalog::new("o");
        desired.apply_snapshot(&[target("a", "10-12", "x")]);
        desired.set_live(TargetId::new("a"), BTreeSet::from([10]));
        let taken = desired.take_changed().expect("a change to publish");
        assert_eq!(taken, desired.desired());
        assert_eq!(taken.catalog.len(), 1);
        assert!(taken.complete);
        assert_eq!(desired.take_changed(), None, "taken once");
        desired.set_live(TargetId::new("a"), BTreeSet::from([10]));
        assert_eq!(desired.take_changed(), None, "an unchanged report");
    }

    #[test]
    fn complete_only_when_every_target_swept() {
        let mut view = DesiredCatalog::new("o");
        view.apply_snapshot(&[target("a", "10-12", "x"), target("b", "20-22", "x")]);
        assert!(!view.desired().complete);
        view.set_live(TargetId::new("a"), BTreeSet::from([10, 11]));
        let d = view.desired();
        assert!(!d.complete);
        assert_eq!(d.catalog.len(), 2);
        view.set_live(TargetId::new("b"), BTreeSet::new());
        assert!(view.desired().complete);
        view.apply_snapshot(&[]);
        assert!(view.desired().complete && view.desired().catalog.is_empty());
    }

    #[test]
    fn spec_edits_keep_live_ports_within_the_new_range() {
        let mut view = DesiredCatalog::new("o");
        view.apply_snapshot(&[target("a", "10-12", "x")]);
        view.set_live(TargetId::new("a"), BTreeSet::from([10, 12]));
        view.apply_snapshot(&[target("a", "10-11", "y")]);
        let d = view.desired();
        assert_eq!(d.catalog.len(), 1);
        assert_eq!(d.catalog.values().next().unwrap().tags, vec!["y"]);
    }

    #[test]
    fn a_port_range_edit_hands_live_ports_to_the_new_target() {
        let mut view = DesiredCatalog::new("o");
        view.apply_snapshot(&[target("a", "10-12", "x")]);
        view.set_live(TargetId::new("a"), BTreeSet::from([10, 12]));
        let before = view.desired().catalog;
        // The edit changes the id (file targets are keyed by address and range).
        view.apply_snapshot(&[target("b", "10-20", "x")]);
        assert_eq!(
            view.desired().catalog,
            before,
            "live entries stay in place until b is swept"
        );
        assert!(!view.desired().complete);
        view.set_live(TargetId::new("b"), BTreeSet::from([10, 12, 15]));
        assert_eq!(view.desired().catalog.len(), 3);
        // Narrowing drops what falls outside the new range only.
        view.apply_snapshot(&[target("c", "10-11", "x")]);
        assert_eq!(view.desired().catalog.len(), 1);
    }

    #[test]
    fn unchanged_reports_leave_nothing_to_publish() {
        let mut view = DesiredCatalog::new("o");
        view.apply_snapshot(&[target("a", "10-12", "x")]);
        view.set_live(TargetId::new("a"), BTreeSet::from([10]));
        view.dirty = false;
        view.set_live(TargetId::new("a"), BTreeSet::from([10]));
        assert!(
            !view.dirty,
            "same live set, already swept: no rebuild, no publish"
        );
        view.set_live(TargetId::new("a"), BTreeSet::from([10, 11]));
        assert!(view.dirty);
    }

    #[test]
    fn a_shared_id_survives_the_removal_of_one_of_its_targets() {
        // Two targets yielding the same instance ID (never valid, but must not lose entries).
        let mut view = DesiredCatalog::new("o");
        let (a, b) = (target("a", "10-12", "x"), target("b", "10-12", "x"));
        view.apply_snapshot(&[a.clone(), b.clone()]);
        view.set_live(TargetId::new("a"), BTreeSet::from([10]));
        view.set_live(TargetId::new("b"), BTreeSet::from([10]));
        view.set_live(TargetId::new("a"), BTreeSet::new());
        assert_eq!(view.desired().catalog.len(), 1);
        view.apply_snapshot(&[a]);
        assert!(view.desired().catalog.is_empty());
    }

    /// The rules of the view, kept apart from its own state: a target's live ports are its
    /// last report, a replaced target's live ports inside the successor's range until the
    /// successor reports, and never a port outside the target's current range.
    #[derive(Default)]
    struct Model {
        targets: Vec<Arc<Target>>,
        live: HashMap<String, BTreeSet<u16>>,
        swept: HashSet<String>,
    }

    impl Model {
        fn snapshot(&mut self, next: Vec<Arc<Target>>) {
            let is_old = |id: &str| self.targets.iter().any(|t| t.id.as_str() == id);
            let mut live: HashMap<String, BTreeSet<u16>> = HashMap::new();
            for t in &next {
                let id = t.id.as_str();
                if let Some(ports) = self.live.get(id) {
                    live.insert(
                        id.into(),
                        ports
                            .iter()
                            .copied()
                            .filter(|p| t.ports.contains(*p))
                            .collect(),
                    );
                } else if !is_old(id) {
                    // A successor: every removed target of the same address and service
                    // hands over its live ports that fall inside the new range.
                    for gone in self
                        .targets
                        .iter()
                        .filter(|o| !next.iter().any(|n| n.id == o.id))
                    {
                        if (gone.address, &gone.service) != (t.address, &t.service) {
                            continue;
                        }
                        for p in self.live.get(gone.id.as_str()).into_iter().flatten() {
                            if t.ports.contains(*p) {
                                live.entry(id.into()).or_default().insert(*p);
                            }
                        }
                    }
                }
            }
            self.swept
                .retain(|id| next.iter().any(|t| t.id.as_str() == id));
            self.live = live;
            self.targets = next;
        }

        fn report(&mut self, id: &str, ports: BTreeSet<u16>) {
            self.swept.insert(id.into());
            self.live.insert(id.into(), ports);
        }

        fn catalog(&self) -> Catalog {
            let live = self
                .targets
                .iter()
                .filter_map(|t| self.live.get(t.id.as_str()).map(|ports| (&**t, ports)));
            desired_catalog("o", live)
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Snapshot(Vec<(u8, u8, bool)>),
        Report(u8, Vec<u16>),
    }

    fn arb_step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            prop::collection::vec((0u8..6, 0u8..3, any::<bool>()), 0..6).prop_map(Step::Snapshot),
            (0u8..6, prop::collection::vec(10u16..16, 0..5))
                .prop_map(|(t, ports)| Step::Report(t, ports)),
        ]
    }

    proptest::proptest! {
        #[test]
        fn incremental_catalog_follows_the_rules_of_live_ports(
            steps in proptest::collection::vec(arb_step(), 1..40)
        ) {
            let mut view = DesiredCatalog::new("o");
            let mut model = Model::default();
            for step in steps {
                match step {
                    Step::Snapshot(entries) => {
                        let mut targets: Vec<Arc<Target>> = Vec::new();
                        for (id, width, tagged) in entries {
                            let id = format!("t{id}");
                            if targets.iter().any(|t| t.id.as_str() == id) {
                                continue;
                            }
                            let ports = format!("10-{}", 12 + width);
                            let mut t = target(&id, &ports, if tagged { "x" } else { "y" });
                            // Distinct addresses, except t0 and t1 which collide on purpose.
                            let n: u8 = id[1..].parse().unwrap();
                            Arc::make_mut(&mut t).address =
                                format!("127.0.0.{}", n.max(1)).parse().unwrap();
                            targets.push(t);
                        }
                        view.apply_snapshot(&targets);
                        model.snapshot(targets);
                    }
                    Step::Report(id, ports) => {
                        let id = format!("t{id}");
                        if model.targets.iter().any(|t| t.id.as_str() == id) {
                            let ports: BTreeSet<u16> = ports.into_iter().collect();
                            view.set_live(TargetId::new(id.as_str()), ports.clone());
                            model.report(&id, ports);
                        }
                    }
                }
                let desired = view.desired();
                let want = model.catalog();
                proptest::prop_assert_eq!(
                    desired.catalog.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>()
                );
                for (id, instance) in &desired.catalog {
                    // On a contested ID either holder may win; otherwise entries are equal.
                    if !view.contested.contains(id) {
                        proptest::prop_assert_eq!(instance, &want[id]);
                    }
                }
                let all_swept = model.targets.iter().all(|t| model.swept.contains(t.id.as_str()));
                proptest::prop_assert_eq!(desired.complete, all_swept);
            }
        }
    }
}
