//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use workersd::catalog::desired_catalog;
use workersd::model::{PortRange, Scheme, Target, TargetId};
use workersd::pipeline::DesiredState;

/// `pods` targets of `service` on 10.1.x.y, each with `live` workers from port 9011, owned
/// by `owner`.
pub fn desired_of(
    service: &str,
    owner: &str,
    pods: usize,
    live: u16,
    complete: bool,
    meta: BTreeMap<String, String>,
) -> DesiredState {
    let targets: Vec<Target> = (0..pods)
        .map(|i| Target {
            id: TargetId::new(format!("pod-{i}")),
            service: service.into(),
            address: format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
            ports: PortRange::new(9011, 9020).unwrap(),
            path: "/metrics".into(),
            scheme: Scheme::Http,
            tags: vec!["gunicorn".into()],
            meta: meta.clone(),
            revision: 0,
            probe_interval: None,
        })
        .collect();
    let ports: BTreeSet<u16> = (9011..9011 + live).collect();
    DesiredState {
        catalog: desired_catalog(owner, targets.iter().map(|t| (t, &ports))),
        complete,
    }
}
