//! Wires a source's snapshots to the prober and turns probe reports into the desired catalog
//! every sink follows.

use crate::metrics::Metrics;
use crate::model::{Catalog, Target, TargetId};
use crate::probe::{ProbeReport, ProbeSettings, Prober};
use crate::reconcile::desired_catalog;
use crate::sources::TargetSnapshot;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

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

#[derive(Default)]
struct View {
    targets: HashMap<TargetId, Target>,
    live: HashMap<TargetId, BTreeSet<u16>>,
    swept: HashSet<TargetId>,
}

impl View {
    fn apply_snapshot(&mut self, snapshot: &[Target]) {
        self.targets = snapshot.iter().map(|t| (t.id.clone(), t.clone())).collect();
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
    }

    fn desired(&self, owner: &str) -> DesiredState {
        let live = self
            .targets
            .values()
            .filter_map(|t| self.live.get(&t.id).map(|ports| (t, ports)));
        DesiredState {
            catalog: desired_catalog(owner, live),
            complete: self.targets.keys().all(|id| self.swept.contains(id)),
        }
    }
}

/// Runs until the targets channel closes.
pub async fn run(
    owner: String,
    mut targets: watch::Receiver<TargetSnapshot>,
    settings: ProbeSettings,
    metrics: Arc<Metrics>,
    out: watch::Sender<Arc<DesiredState>>,
) {
    let (report_tx, mut reports) = mpsc::channel::<ProbeReport>(4096);
    let mut prober = Prober::new(settings, metrics.clone(), report_tx);
    let mut view = View::default();
    let snapshot = targets.borrow_and_update().clone();
    prober.sync(&snapshot);
    view.apply_snapshot(&snapshot);
    publish(&view, &owner, &metrics, &out);
    loop {
        tokio::select! {
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = targets.borrow_and_update().clone();
                prober.sync(&snapshot);
                view.apply_snapshot(&snapshot);
            }
            Some(report) = reports.recv() => {
                accept(&mut view, &prober, report);
                // Coalesce a burst of reports into one rebuild.
                while let Ok(report) = reports.try_recv() {
                    accept(&mut view, &prober, report);
                }
            }
        }
        publish(&view, &owner, &metrics, &out);
    }
}

fn accept(view: &mut View, prober: &Prober, report: ProbeReport) {
    if prober.generation(&report.target) != Some(report.generation) {
        return; // from a loop that has since been restarted or stopped
    }
    view.swept.insert(report.target.clone());
    view.live.insert(report.target, report.live);
}

fn publish(view: &View, owner: &str, metrics: &Metrics, out: &watch::Sender<Arc<DesiredState>>) {
    let desired = view.desired(owner);
    metrics.targets.set(view.targets.len() as i64);
    metrics.live_endpoints.set(desired.catalog.len() as i64);
    out.send_if_modified(|current| {
        if **current == desired {
            false
        } else {
            *current = Arc::new(desired);
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortRange, Scheme};
    use std::collections::BTreeMap;

    fn target(id: &str, ports: &str, tag: &str) -> Target {
        Target {
            id: TargetId::new(id),
            service: "svc".into(),
            address: "127.0.0.9".parse().unwrap(),
            ports: ports.parse::<PortRange>().unwrap(),
            path: "/metrics".into(),
            scheme: Scheme::Http,
            tags: vec![tag.into()],
            meta: BTreeMap::new(),
            revision: 0,
            probe_interval: None,
        }
    }

    #[test]
    fn complete_only_when_every_target_swept() {
        let mut view = View::default();
        view.apply_snapshot(&[target("a", "10-12", "x"), target("b", "20-22", "x")]);
        assert!(!view.desired("o").complete);
        view.swept.insert(TargetId::new("a"));
        view.live
            .insert(TargetId::new("a"), BTreeSet::from([10, 11]));
        let d = view.desired("o");
        assert!(!d.complete);
        assert_eq!(d.catalog.len(), 2);
        view.swept.insert(TargetId::new("b"));
        assert!(view.desired("o").complete);
        view.apply_snapshot(&[]);
        assert!(view.desired("o").complete && view.desired("o").catalog.is_empty());
    }

    #[test]
    fn spec_edits_keep_live_ports_within_the_new_range() {
        let mut view = View::default();
        view.apply_snapshot(&[target("a", "10-12", "x")]);
        view.swept.insert(TargetId::new("a"));
        view.live
            .insert(TargetId::new("a"), BTreeSet::from([10, 12]));
        view.apply_snapshot(&[target("a", "10-11", "y")]);
        let d = view.desired("o");
        assert_eq!(d.catalog.len(), 1);
        assert_eq!(d.catalog.values().next().unwrap().tags, vec!["y"]);
    }
}
