//! The plan: (desired, current) → the minimal operations, and the ownership rules that keep
//! every entry workersd does not own untouched. Pure, so every rule is testable in isolation.

use crate::model::{Catalog, EXTERNAL_SOURCE, ServiceInstance, meta_keys};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The key under which Consul stores a service ID or node name: IDs equal under it are the
/// same row. Borrowed when already lower case, as workersd's own IDs are.
pub fn row_key(id: &str) -> std::borrow::Cow<'_, str> {
    if id.chars().any(char::is_uppercase) {
        std::borrow::Cow::Owned(id.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}

/// Ours only when both our marker and our owner id are present: entries of other tools and
/// of other workersd instances sharing the Consul are never touched.
pub fn is_owned_by(instance: &ServiceInstance, owner: &str) -> bool {
    instance
        .meta
        .get(meta_keys::EXTERNAL_SOURCE)
        .map(String::as_str)
        == Some(EXTERNAL_SOURCE)
        // Owner ids are part of service IDs, which Consul compares case-insensitively: two
        // owners differing only in case would share rows, so they are one owner.
        && instance
            .meta
            .get(meta_keys::OWNER)
            .is_some_and(|o| o.eq_ignore_ascii_case(owner))
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
    /// Deregistrations of rows that `ops` registers again under another spelling of the ID
    /// or another service name: they must be committed before `ops` are sent. In one txn,
    /// Consul 1.15-1.20 would delete the entry just written (same row), and the newest
    /// Consul refuses a set that renames a stored service.
    pub first: Vec<Op>,
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
    // Current entries whose ID is not spelt as its row key (rare): found by row for the
    // desired IDs, which are lower case.
    let by_row: HashMap<String, &Arc<ServiceInstance>> = current
        .iter()
        .filter(|(id, _)| row_key(id) != ***id)
        .map(|(id, have)| (row_key(id).into_owned(), have))
        .collect();
    // Current entries replaced through another spelling of their ID, deregistered in `first`.
    let mut replaced: BTreeSet<&str> = BTreeSet::new();
    for (id, want) in desired {
        let have = current
            .get(id)
            .or_else(|| by_row.get(row_key(id).as_ref()).copied());
        match have {
            Some(have) if !is_owned_by(have, owner) => result.conflicts.push(id.to_string()),
            Some(have) if have == want => {}
            Some(have) if have.id != want.id || have.service != want.service => {
                replaced.insert(&have.id);
                result.first.push(Op::Deregister(have.clone()));
                result.ops.push(Op::Register(want.clone()));
            }
            _ => result.ops.push(Op::Register(want.clone())),
        }
    }
    for (id, have) in current {
        if is_owned_by(have, owner) && !desired.contains_key(id) && !replaced.contains(&**id) {
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
    use crate::catalog::instance_id;
    use crate::fixtures::instance;
    use proptest::prelude::*;

    const OWNER: &str = "me";

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

    #[test]
    fn row_keys_are_lower_case_and_borrowed_when_already_so() {
        assert_eq!(row_key("Me:Web"), "me:web");
        assert!(matches!(row_key("me:web"), std::borrow::Cow::Borrowed(_)));
    }

    /// A row Consul already holds under another spelling of the ID, or under another service
    /// name, is deleted in `first` and set again in `ops`, never both in one txn.
    #[test]
    fn a_case_only_change_deletes_the_old_row_before_setting_the_new_one() {
        let owned = |id: &str, service: &str, owner: &str| {
            let mut i = instance(Some(owner), service, 1);
            i.id = id.into();
            Arc::new(i)
        };
        let want = owned("me:clever:10.0.0.1:1", "clever", OWNER);
        let desired = Catalog::from([(want.id.clone(), want.clone())]);
        // An old entry with an upper-case ID (and service name) on the same row.
        let old = owned("me:Clever:10.0.0.1:1", "Clever", OWNER);
        let current = Catalog::from([(old.id.clone(), old.clone())]);
        for allowed in [true, false] {
            let p = plan(&desired, &current, OWNER, allowed);
            assert_eq!(p.first, vec![Op::Deregister(old.clone())]);
            assert_eq!(p.ops, vec![Op::Register(want.clone())]);
            assert_eq!(p.deferred_deregistrations, 0);
        }
        // Same ID, service name changed in case only: also two steps (the newest Consul
        // refuses to rename a service through its ID).
        let renamed = owned("me:clever:10.0.0.1:1", "Clever", OWNER);
        let current = Catalog::from([(renamed.id.clone(), renamed.clone())]);
        let p = plan(&desired, &current, OWNER, true);
        assert_eq!(p.first, vec![Op::Deregister(renamed)]);
        assert_eq!(p.ops, vec![Op::Register(want.clone())]);
        // Owner ids differing in case are one owner: only the meta changes, one set.
        let other_case = owned("me:clever:10.0.0.1:1", "clever", "ME");
        let current = Catalog::from([(other_case.id.clone(), other_case)]);
        let p = plan(&desired, &current, OWNER, true);
        assert!(p.first.is_empty());
        assert_eq!(p.ops, vec![Op::Register(want.clone())]);
        // A foreign entry on the same row is a conflict, never overwritten.
        let mut foreign = instance(None, "clever", 1);
        foreign.id = "ME:CLEVER:10.0.0.1:1".into();
        let current = Catalog::from([(foreign.id.clone(), Arc::new(foreign))]);
        let p = plan(&desired, &current, OWNER, true);
        assert!(p.ops.is_empty() && p.first.is_empty());
        assert_eq!(p.conflicts, vec![want.id.to_string()]);
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

    /// Entries we do not own, a third of them holding one of our IDs (as another tool, or a
    /// hand-made registration, may), half of those spelt in upper case.
    fn arb_foreign(owner: Option<&'static str>) -> impl Strategy<Value = Catalog> {
        prop::collection::vec((arb_instance(owner), 0u8..6), 0..30).prop_map(|v| {
            v.into_iter()
                .map(|(mut i, steal)| {
                    let ours = instance_id(OWNER, &i.service, &i.address, i.port);
                    match steal {
                        0 => i.id = ours.into(),
                        1 => i.id = ours.to_uppercase().into(),
                        _ => {}
                    }
                    (i.id.clone(), Arc::new(i))
                })
                .collect()
        })
    }

    /// What Consul holds after these registrations in order: one entry per row, the last.
    fn consul_rows(catalogs: impl IntoIterator<Item = Catalog>) -> Catalog {
        let mut rows: Catalog = Catalog::new();
        for (id, entry) in catalogs.into_iter().flatten() {
            rows.retain(|held, _| row_key(held) != row_key(&id));
            rows.insert(id, entry);
        }
        rows
    }

    proptest! {
        #[test]
        fn applying_the_plan_yields_desired_and_spares_foreign_entries(
            desired in arb_catalog(Some(OWNER)),
            ours_now in arb_catalog(Some(OWNER)),
            other_owner in arb_foreign(Some("other-owner")),
            foreign in arb_foreign(None),
        ) {
            let mut current = consul_rows([ours_now, other_owner, foreign]);
            let foreign_before: Catalog = current
                .iter()
                .filter(|(_, i)| !is_owned_by(i, OWNER))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();

            let p = plan(&desired, &current, OWNER, true);
            // Exactly the desired IDs whose row a foreign entry holds are conflicts.
            let held_by_others: BTreeSet<&str> = desired
                .keys()
                .filter(|id| foreign_before.keys().any(|f| row_key(f) == row_key(id)))
                .map(|id| &**id)
                .collect();
            let conflicts: BTreeSet<&str> = p.conflicts.iter().map(String::as_str).collect();
            prop_assert_eq!(conflicts, held_by_others);
            for op in p.first.iter().chain(&p.ops) {
                let id = match op { Op::Register(i) | Op::Deregister(i) => &i.id };
                prop_assert!(!foreign_before.contains_key(id), "op touches foreign {id}");
            }
            apply(&mut current, &p.first);
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
            prop_assert!(p.first.is_empty(), "no ID differs only in case here");
            let changed = desired.iter().filter(|(id, i)| current.get(*id) != Some(i)).count();
            let removed = current.keys().filter(|id| !desired.contains_key(*id)).count();
            prop_assert_eq!(p.ops.len(), changed + removed);
        }
    }
}
