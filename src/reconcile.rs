//! The pure reconcile core: live endpoints → desired catalog, and (desired, current) → the
//! minimal operations. No I/O here, so every rule is testable in isolation.

use crate::model::{Catalog, EXTERNAL_SOURCE, ServiceInstance, Target, meta_keys};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Stable and unique per owner and endpoint, so two workersd instances sharing a node never
/// collide and a restarted instance recognises its own entries.
pub fn instance_id(owner: &str, service: &str, address: &str, port: u16) -> String {
    format!("{owner}:{service}:{address}:{port}")
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

/// Ours only when both our marker and our owner id are present: entries of other tools and
/// of other workersd instances sharing the Consul are never touched.
pub fn is_owned_by(instance: &ServiceInstance, owner: &str) -> bool {
    instance
        .meta
        .get(meta_keys::EXTERNAL_SOURCE)
        .map(String::as_str)
        == Some(EXTERNAL_SOURCE)
        && instance.meta.get(meta_keys::OWNER).map(String::as_str) == Some(owner)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or overwrite the instance.
    Register(Arc<ServiceInstance>),
    /// Remove this instance (Consul's txn delete needs its service name as well as its ID).
    Deregister(Arc<ServiceInstance>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// Desired IDs already taken by an entry we do not own: left alone and reported.
    pub conflicts: Vec<String>,
    /// Owned entries no longer desired but kept because deregistration is not yet allowed.
    pub deferred_deregistrations: usize,
}

/// Minimal operations turning `current` (everything the sink holds in our scope, foreign
/// entries included) into `desired`. `allow_deregister` is false until every target has been
/// probed once after start, so a restarted workersd never removes live entries it has not
/// yet re-discovered.
pub fn plan(desired: &Catalog, current: &Catalog, owner: &str, allow_deregister: bool) -> Plan {
    let mut result = Plan::default();
    for (id, want) in desired {
        match current.get(id) {
            Some(have) if !is_owned_by(have, owner) => result.conflicts.push(id.to_string()),
            Some(have) if have == want => {}
            _ => result.ops.push(Op::Register(want.clone())),
        }
    }
    for (id, have) in current {
        if is_owned_by(have, owner) && !desired.contains_key(id) {
            if allow_deregister {
                result.ops.push(Op::Deregister(have.clone()));
            } else {
                result.deferred_deregistrations += 1;
            }
        }
    }
    result
}

/// What a sink holds after `ops` succeed; sinks use it to track Consul without re-reading.
pub fn apply(current: &mut Catalog, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Register(instance) => {
                current.insert(instance.id.clone(), instance.clone());
            }
            Op::Deregister(instance) => {
                current.remove(&instance.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRange, Scheme, TargetId};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const OWNER: &str = "me";

    fn target(address: &str, ports: &str) -> Target {
        Target {
            id: TargetId::new(format!("{address}/{ports}")),
            service: "clever".into(),
            address: address.parse().unwrap(),
            ports: ports.parse::<PortRange>().unwrap(),
            path: "/metrics".into(),
            scheme: Scheme::Http,
            tags: vec!["gunicorn".into()],
            meta: BTreeMap::from([("team".into(), "web".into())]),
            revision: 0,
            probe_interval: None,
        }
    }

    fn instance(owner: Option<&str>, service: &str, port: u16) -> ServiceInstance {
        let mut meta = BTreeMap::new();
        if let Some(owner) = owner {
            meta.insert(
                meta_keys::EXTERNAL_SOURCE.to_string(),
                EXTERNAL_SOURCE.to_string(),
            );
            meta.insert(meta_keys::OWNER.to_string(), owner.to_string());
        }
        ServiceInstance {
            id: instance_id(owner.unwrap_or("other-tool"), service, "10.0.0.1", port).into(),
            service: service.into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec![],
            meta: Arc::new(meta),
        }
    }

    #[test]
    fn desired_catalog_has_one_instance_per_live_port_with_our_meta() {
        let t = target("127.0.0.2", "9011-9020");
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
    fn deregistration_waits_until_allowed() {
        let current = Catalog::from([("x".into(), Arc::new(instance(Some(OWNER), "a", 1)))]);
        let mut stale = current.clone();
        Arc::make_mut(stale.get_mut("x").unwrap()).id = "x".into();
        let held = plan(&Catalog::new(), &stale, OWNER, false);
        assert!(held.ops.is_empty());
        assert_eq!(held.deferred_deregistrations, 1);
        let done = plan(&Catalog::new(), &stale, OWNER, true);
        assert_eq!(done.ops, vec![Op::Deregister(stale["x"].clone())]);
    }

    #[test]
    fn desired_id_held_by_foreign_entry_is_a_conflict_not_an_overwrite() {
        let mut foreign = instance(None, "a", 1);
        foreign.id = "shared".into();
        let mut mine = instance(Some(OWNER), "a", 1);
        mine.id = "shared".into();
        let p = plan(
            &Catalog::from([("shared".into(), Arc::new(mine))]),
            &Catalog::from([("shared".into(), Arc::new(foreign))]),
            OWNER,
            true,
        );
        assert!(p.ops.is_empty());
        assert_eq!(p.conflicts, vec!["shared".to_string()]);
    }

    fn arb_instance(owner: Option<&'static str>) -> impl Strategy<Value = ServiceInstance> {
        (
            prop::sample::select(vec!["a", "b", "c"]),
            1u16..40,
            prop::bool::ANY,
        )
            .prop_map(move |(service, port, tagged)| {
                let mut inst = instance(owner, service, port);
                if tagged {
                    inst.tags.push("t".into());
                }
                inst
            })
    }

    fn arb_catalog(owner: Option<&'static str>) -> impl Strategy<Value = Catalog> {
        prop::collection::vec(arb_instance(owner), 0..30)
            .prop_map(|v| v.into_iter().map(|i| (i.id.clone(), Arc::new(i))).collect())
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_desired_and_spares_foreign_entries(
            desired in arb_catalog(Some(OWNER)),
            ours_now in arb_catalog(Some(OWNER)),
            other_owner in arb_catalog(Some("other-owner")),
            foreign in arb_catalog(None),
        ) {
            let mut current: Catalog = ours_now;
            current.extend(other_owner.clone());
            current.extend(foreign.clone());
            let foreign_before: Catalog = current
                .iter()
                .filter(|(_, i)| !is_owned_by(i, OWNER))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();

            let p = plan(&desired, &current, OWNER, true);
            for op in &p.ops {
                let id = match op { Op::Register(i) | Op::Deregister(i) => &i.id };
                prop_assert!(!foreign_before.contains_key(id), "op touches foreign {id}");
            }
            apply(&mut current, &p.ops);

            let ours_after: Catalog = current
                .iter()
                .filter(|(_, i)| is_owned_by(i, OWNER))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let reachable: Catalog = desired
                .iter()
                .filter(|(id, _)| !p.conflicts.iter().any(|c| c.as_str() == &***id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            prop_assert_eq!(ours_after, reachable);
            let foreign_after: Catalog = current
                .into_iter()
                .filter(|(_, i)| !is_owned_by(i, OWNER))
                .collect();
            prop_assert_eq!(foreign_after, foreign_before);
        }

        #[test]
        fn equal_states_yield_no_operations(
            desired in arb_catalog(Some(OWNER)),
            foreign in arb_catalog(None),
        ) {
            let mut current = foreign;
            current.extend(desired.clone());
            let p = plan(&desired, &current, OWNER, true);
            prop_assert!(p.ops.is_empty());
        }

        #[test]
        fn ops_are_minimal(desired in arb_catalog(Some(OWNER)), current in arb_catalog(Some(OWNER))) {
            let p = plan(&desired, &current, OWNER, true);
            let changed = desired.iter().filter(|(id, i)| current.get(*id) != Some(i)).count();
            let removed = current.keys().filter(|id| !desired.contains_key(*id)).count();
            prop_assert_eq!(p.ops.len(), changed + removed);
        }
    }
}
