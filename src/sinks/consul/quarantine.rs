//! What the Consul sink does when Consul refuses some operations of a transaction, apart from
//! any I/O. A txn is atomic (Consul's `TxnRW` rolls everything back on any per-op error), so
//! one bad entry would otherwise block every other entry of its batch, and the node.
//! The refused operations are isolated, the rest resent, and the refused ones withheld with
//! a jittered, growing delay until their content changes or the delay runs out.

use crate::catalog::plan::Op;
use crate::model::ServiceInstance;
use backon::BackoffBuilder;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// First delay before a refused operation is tried again.
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(10);
/// The delay stops growing here (jitter adds up to as much again).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Why Consul refused an operation, as far as its text tells.
#[derive(Debug, PartialEq, Eq)]
pub enum Cause {
    /// The entry itself (a meta pair over Consul's limits, a permission on its name, …):
    /// resending it cannot help until it changes.
    Entry,
    /// The sink's last read of Consul is out of date (the node is gone, a `cas` index moved):
    /// every operation may fail for it; re-read Consul instead of blaming the entry.
    StaleRead,
}

/// Texts from Consul's state store (`agent/consul/state/catalog.go`, `txn.go`) that say the
/// catalog changed under the sink rather than that the operation is bad.
pub fn cause(what: &str) -> Cause {
    const STALE: [&str; 3] = [
        "Missing node registration",
        "index is stale",
        "doesn't exist",
    ];
    if STALE.iter().any(|s| what.contains(s)) {
        Cause::StaleRead
    } else {
        Cause::Entry
    }
}

/// How to go on after Consul refused a batch of `len` operations with per-op `errors`.
#[derive(Debug, PartialEq, Eq)]
pub struct Isolation {
    /// Indexes of the refused operations, each with Consul's first reason, in order.
    pub refused: Vec<(usize, String)>,
    /// Indexes of the operations to resend (none of them was refused), in order.
    pub resend: Vec<usize>,
}

/// `None` when isolating cannot help: no usable per-op error, an index out of range, the
/// node's own operation (`node_op`) refused (nothing can be registered without it), or a
/// refusal caused by a stale read; the caller then fails the pass and re-reads Consul.
pub fn isolate(
    len: usize,
    errors: &[(usize, String)],
    node_op: Option<usize>,
) -> Option<Isolation> {
    if errors.is_empty() || errors.iter().any(|(i, _)| *i >= len) {
        return None;
    }
    if errors
        .iter()
        .any(|(i, what)| Some(*i) == node_op || cause(what) == Cause::StaleRead)
    {
        return None;
    }
    let mut refused: Vec<(usize, String)> = Vec::new();
    for (i, what) in errors {
        if !refused.iter().any(|(r, _)| r == i) {
            refused.push((*i, what.clone()));
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    let resend = (0..len)
        .filter(|i| !refused.iter().any(|(r, _)| r == i))
        .collect();
    Some(Isolation { refused, resend })
}

/// The meta key a Consul meta error names (`Couldn't load metadata pair ('KEY', …`), if any:
/// the field to name in the log line.
pub fn refused_field(what: &str) -> Option<&str> {
    let start = what.find("metadata pair ('")? + "metadata pair ('".len();
    let len = what[start..].find('\'')?;
    Some(&what[start..start + len])
}

/// One entry withheld, as published to whoever reports it (Kubernetes Events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The refused entry (its ID is the service ID).
    pub instance: Arc<ServiceInstance>,
    /// Consul's reason, as it gave it.
    pub error: String,
}

/// The entries withheld now, sorted by service ID.
pub type RefusedEntries = Arc<Vec<Refused>>;

struct Withheld {
    op: Op,
    /// Consul's reason for the last refusal.
    what: String,
    retry_at: Instant,
    refusals: u32,
    delays: backon::ExponentialBackoff,
}

/// Refused operations withheld, by service ID.
#[derive(Default)]
pub struct Quarantine {
    withheld: HashMap<Arc<str>, Withheld>,
}

fn op_id(op: &Op) -> &Arc<str> {
    match op {
        Op::Register(i) | Op::Deregister(i) => &i.id,
    }
}

fn delays() -> backon::ExponentialBackoff {
    super::jittered(MIN_RETRY_DELAY, MAX_RETRY_DELAY).build()
}

impl Quarantine {
    pub fn len(&self) -> usize {
        self.withheld.len()
    }

    pub fn is_empty(&self) -> bool {
        self.withheld.is_empty()
    }

    /// Whether `op` is withheld at `now`: an equal operation was refused and its delay has
    /// not run out. A changed operation (a fixed declaration) is never withheld.
    pub fn withholds(&self, op: &Op, now: Instant) -> bool {
        self.withheld
            .get(op_id(op))
            .is_some_and(|h| h.op == *op && now < h.retry_at)
    }

    /// Records a refusal of `op` for the reason `what`; returns how long it is withheld and how
    /// often it was refused in a row. The delay grows only while the same operation keeps
    /// being refused.
    pub fn refuse(&mut self, op: &Op, what: &str, now: Instant) -> (Duration, u32) {
        let withheld = self
            .withheld
            .entry(op_id(op).clone())
            .or_insert_with(|| Withheld {
                op: op.clone(),
                what: String::new(),
                retry_at: now,
                refusals: 0,
                delays: delays(),
            });
        if withheld.op != *op {
            *withheld = Withheld {
                op: op.clone(),
                what: String::new(),
                retry_at: now,
                refusals: 0,
                delays: delays(),
            };
        }
        let delay = withheld.delays.next().unwrap_or(MAX_RETRY_DELAY);
        withheld.refusals += 1;
        withheld.retry_at = now + delay;
        what.clone_into(&mut withheld.what);
        (delay, withheld.refusals)
    }

    /// `op` was applied: it is no longer withheld.
    pub fn accepted(&mut self, op: &Op) {
        if self.withheld.get(op_id(op)).is_some_and(|h| h.op == *op) {
            self.withheld.remove(op_id(op));
        }
    }

    /// Forgets operations no longer planned as they were refused (the declaration changed or
    /// the target went away): `planned` are this pass's operations.
    pub fn retain_planned<'a>(&mut self, planned: impl IntoIterator<Item = &'a Op>) {
        if self.withheld.is_empty() {
            return;
        }
        let planned: HashMap<&Arc<str>, &Op> =
            planned.into_iter().map(|op| (op_id(op), op)).collect();
        self.withheld
            .retain(|id, h| planned.get(id).is_some_and(|op| **op == h.op));
    }

    /// The entries withheld now, sorted by service ID.
    pub fn entries(&self) -> Vec<Refused> {
        let mut entries: Vec<Refused> = self
            .withheld
            .values()
            .map(|h| Refused {
                instance: match &h.op {
                    Op::Register(i) | Op::Deregister(i) => i.clone(),
                },
                error: h.what.clone(),
            })
            .collect();
        entries.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        entries
    }

    /// When the first withheld operation may be tried again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.withheld.values().map(|h| h.retry_at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceInstance;
    use std::collections::BTreeMap;

    fn op(id: &str, port: u16) -> Op {
        Op::Register(Arc::new(ServiceInstance {
            id: id.into(),
            service: "s".into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec![],
            meta: Arc::new(BTreeMap::new()),
        }))
    }

    const META_ERROR: &str = "Invalid Service Meta for node n and serviceID a: Couldn't load metadata pair ('metrics-path', '/mmm'): Value is too long (limit: 512 characters)";

    #[test]
    fn refused_ops_are_isolated_and_the_rest_resent() {
        let errors = vec![(3, META_ERROR.to_string()), (1, "Permission denied".into())];
        let iso = isolate(5, &errors, Some(0)).unwrap();
        assert_eq!(
            iso.refused,
            vec![(1, "Permission denied".into()), (3, META_ERROR.into())]
        );
        assert_eq!(iso.resend, vec![0, 2, 4]);
        // Every op refused: nothing to resend.
        let all: Vec<_> = (0..3).map(|i| (i, META_ERROR.to_string())).collect();
        assert_eq!(isolate(3, &all, None).unwrap().resend, Vec::<usize>::new());
        // The same op twice is one refusal.
        let twice = vec![(2, "a".to_string()), (2, "b".to_string())];
        assert_eq!(
            isolate(3, &twice, None).unwrap().refused,
            vec![(2, "a".into())]
        );
    }

    #[test]
    fn isolation_gives_up_when_it_cannot_help() {
        let entry = |i: usize| (i, META_ERROR.to_string());
        assert!(isolate(3, &[], None).is_none(), "no per-op errors");
        assert!(
            isolate(3, &[entry(3)], None).is_none(),
            "index out of range"
        );
        assert!(
            isolate(3, &[entry(0)], Some(0)).is_none(),
            "the node refused"
        );
        for stale in [
            "Missing node registration",
            "failed to set node \"n\", index is stale",
            "failed to delete service \"a\" on node \"n\", index is stale",
        ] {
            assert!(
                isolate(3, &[entry(1), (2, stale.into())], None).is_none(),
                "{stale}"
            );
        }
    }

    #[test]
    fn names_the_refused_field() {
        assert_eq!(refused_field(META_ERROR), Some("metrics-path"));
        assert_eq!(refused_field("Permission denied"), None);
    }

    #[test]
    fn refused_ops_are_withheld_with_growing_jittered_delays_until_they_change() {
        let now = Instant::now();
        let mut q = Quarantine::default();
        let bad = op("a", 1);
        assert!(!q.withholds(&bad, now));
        let (first, n) = q.refuse(&bad, "x", now);
        assert_eq!(n, 1);
        assert!(
            (MIN_RETRY_DELAY..MIN_RETRY_DELAY * 2).contains(&first),
            "{first:?}"
        );
        assert!(q.withholds(&bad, now + first - Duration::from_millis(1)));
        assert!(
            !q.withholds(&bad, now + first),
            "retried once the delay ran out"
        );
        // The same op refused again waits longer; a changed op is not withheld at all.
        let (second, n) = q.refuse(&bad, "x", now + first);
        assert_eq!(n, 2);
        assert!(
            (MIN_RETRY_DELAY * 2..MIN_RETRY_DELAY * 4).contains(&second),
            "{second:?}"
        );
        assert!(!q.withholds(&op("a", 2), now));
        assert_eq!(q.next_retry(), Some(now + first + second));
        // Refusing the changed op starts over.
        let (restart, n) = q.refuse(&op("a", 2), "x", now);
        assert_eq!(n, 1);
        assert!(restart < MIN_RETRY_DELAY * 2);
        // Many refusals stay within the cap (plus jitter).
        for _ in 0..20 {
            let (d, _) = q.refuse(&op("a", 2), "x", now);
            assert!(d < MAX_RETRY_DELAY * 2, "{d:?}");
        }
    }

    #[test]
    fn accepted_or_unplanned_ops_are_forgotten() {
        let now = Instant::now();
        let mut q = Quarantine::default();
        let (a, b, c) = (op("a", 1), op("b", 1), op("c", 1));
        for o in [&a, &b, &c] {
            q.refuse(o, "x", now);
        }
        q.accepted(&a);
        assert_eq!(q.len(), 2);
        assert!(!q.is_empty());
        // `b` is still planned as refused, `c` changed: only `b` stays.
        q.retain_planned([&b, &op("c", 2)]);
        assert_eq!(q.len(), 1);
        assert!(q.withholds(&b, now));
        q.retain_planned([]);
        assert!(q.is_empty());
    }

    #[test]
    fn entries_list_what_is_withheld_with_the_last_reason_sorted_until_it_leaves() {
        let now = Instant::now();
        let mut q = Quarantine::default();
        let (a, b) = (op("a", 1), op("b", 1));
        q.refuse(&b, "first", now);
        q.refuse(&a, "meta", now);
        q.refuse(&b, "second", now);
        let listed = |q: &Quarantine| {
            q.entries()
                .into_iter()
                .map(|r| (r.instance.id.to_string(), r.error))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            listed(&q),
            vec![("a".into(), "meta".into()), ("b".into(), "second".into())]
        );
        q.accepted(&a);
        q.retain_planned([&op("b", 2)]);
        assert_eq!(listed(&q), vec![]);
    }

    #[test]
    fn two_quarantines_do_not_retry_in_lockstep() {
        let now = Instant::now();
        let delays = || {
            let mut q = Quarantine::default();
            (0..5)
                .map(|_| q.refuse(&op("a", 1), "x", now).0)
                .collect::<Vec<_>>()
        };
        assert_ne!(delays(), delays());
    }
}
