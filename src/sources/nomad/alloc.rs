//! One Nomad allocation, as `/v1/node/:id/allocations` returns it (nomad/structs
//! `Allocation`, with its `Job`), read into targets. Pure.
//!
//! Opt-in is `workersd_*` meta, read like pod annotations by the one key/value reader:
//! `workersd_service`, `workersd_ports` (a range for the allocation), `workersd_ports_<task>`
//! (a range for one task), `workersd_path`, `workersd_scheme`, `workersd_tags`,
//! `workersd_meta_<key>`. Group meta overrides job meta, as Nomad merges them. A task's own
//! meta may only declare that task's range (its `workersd_ports`): a service or path per task
//! would make one allocation several declarations, so those keys belong on the group or job.

use crate::declaration::{Declaration, DeclarationError, ErrorKind, FieldPath, SourceKind, keyed};
use crate::model::{Target, TargetId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Nomad meta values are strings without a documented bound; a longer one is refused.
pub const MAX_META_VALUE: usize = 4096;

const KEYS: keyed::Keys = keyed::Keys {
    source: SourceKind::NomadMeta,
    prefix: "workersd_",
    ports_scoped: "ports_",
    meta: "meta_",
    max_value: MAX_META_VALUE,
};

type Meta = Option<BTreeMap<String, String>>;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Allocation {
    #[serde(rename = "ID")]
    pub id: String,
    pub namespace: String,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub node_name: String,
    #[serde(rename = "JobID")]
    pub job_id: String,
    pub job: Option<Job>,
    pub task_group: String,
    /// `run`, `stop`, `evict`.
    pub desired_status: String,
    /// `pending`, `running`, `complete`, `failed`, `lost`, `unknown`.
    pub client_status: String,
    pub task_states: Option<BTreeMap<String, TaskState>>,
    pub allocated_resources: Option<AllocatedResources>,
    /// Bridge mode: the allocation's own address in its network namespace.
    pub network_status: Option<NetworkStatus>,
    pub modify_index: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Job {
    #[serde(rename = "ID")]
    pub id: String,
    pub meta: Meta,
    pub task_groups: Option<Vec<TaskGroup>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskGroup {
    pub name: String,
    pub meta: Meta,
    pub tasks: Option<Vec<Task>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Task {
    pub name: String,
    pub meta: Meta,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskState {
    /// `pending`, `running`, `dead`.
    pub state: String,
    pub restarts: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AllocatedResources {
    pub shared: Option<SharedResources>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SharedResources {
    pub networks: Option<Vec<Network>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Network {
    /// `host` (or empty) or `bridge`.
    pub mode: String,
    #[serde(rename = "IP")]
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkStatus {
    pub address: String,
}

/// Why an opted-in allocation publishes nothing.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<DeclarationError>),
    #[error("the allocation has no address: no bridge-mode address and no network with an IP")]
    NoAddress,
    #[error("the allocation's address {0:?} is not an IP address")]
    BadAddress(String),
}

impl Allocation {
    fn group(&self) -> Option<&TaskGroup> {
        self.job
            .as_ref()?
            .task_groups
            .as_ref()?
            .iter()
            .find(|g| g.name == self.task_group)
    }

    /// Whether Nomad runs it and means to keep it running.
    pub fn is_running(&self) -> bool {
        self.client_status == "running" && self.desired_status == "run"
    }

    fn task_running(&self, task: &str) -> Option<u64> {
        let state = self.task_states.as_ref()?.get(task)?;
        (state.state == "running").then_some(state.restarts)
    }

    /// The one address probed and published: the bridge-mode address when Nomad reports
    /// one, else the IP of the allocation's first network (host mode: the host address its
    /// ports are reserved on).
    pub fn address(&self) -> Result<IpAddr, AllocError> {
        let bridge = self
            .network_status
            .as_ref()
            .map(|s| s.address.as_str())
            .filter(|a| !a.is_empty());
        let host = || {
            self.allocated_resources
                .as_ref()?
                .shared
                .as_ref()?
                .networks
                .as_ref()?
                .iter()
                .map(|n| n.ip.as_str())
                .find(|ip| !ip.is_empty())
        };
        let address = bridge.or_else(host).ok_or(AllocError::NoAddress)?;
        address
            .parse()
            .map_err(|_| AllocError::BadAddress(address.to_string()))
    }
}

fn job_field(key: &str) -> FieldPath {
    FieldPath::new(format!("job.meta.{key}"))
}

/// The allocation's declaration. `Ok(None)`: not opted in.
pub fn declaration(alloc: &Allocation) -> Result<Option<Declaration>, Vec<DeclarationError>> {
    let group = alloc.group();
    let job_meta = alloc.job.as_ref().and_then(|j| j.meta.as_ref());
    let group_meta = group.and_then(|g| g.meta.as_ref());
    // Group over job, each key remembering where it was written.
    let mut merged: BTreeMap<String, (String, FieldPath)> = BTreeMap::new();
    for (key, value) in job_meta.into_iter().flatten() {
        merged.insert(key.clone(), (value.clone(), job_field(key)));
    }
    let group_name = group.map_or("", |g| g.name.as_str());
    for (key, value) in group_meta.into_iter().flatten() {
        let field = FieldPath::new(format!("group[{group_name:?}].meta.{key}"));
        merged.insert(key.clone(), (value.clone(), field));
    }
    let mut errors = Vec::new();
    for task in group.and_then(|g| g.tasks.as_ref()).into_iter().flatten() {
        for (key, value) in task.meta.iter().flatten() {
            let field = FieldPath::new(format!("task[{:?}].meta.{key}", task.name));
            if key == "workersd_ports" {
                merged.insert(
                    format!("workersd_ports_{}", task.name),
                    (value.clone(), field),
                );
            } else if key.starts_with(KEYS.prefix) {
                errors.push(DeclarationError::new(field, ErrorKind::TaskMetaKey));
            }
        }
    }
    let pairs: Vec<(String, String)> = merged
        .iter()
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    let field = |key: &str| {
        merged
            .get(key)
            .map_or_else(|| job_field(key), |(_, field)| field.clone())
    };
    let parsed = keyed::parse(&KEYS, pairs.iter().map(|(k, v)| (k, v)), field);
    match parsed {
        Ok(declared) if errors.is_empty() => Ok(declared),
        Ok(_) => Err(errors),
        Err(mut more) => {
            errors.append(&mut more);
            Err(errors)
        }
    }
}

/// Targets of a running allocation under its declaration: one per range whose task runs
/// (an allocation-wide range: while any task runs).
pub fn targets(alloc: &Allocation, declared: &Declaration) -> Result<Vec<Target>, AllocError> {
    if !alloc.is_running() {
        return Ok(Vec::new());
    }
    let tasks: Vec<&str> = alloc
        .group()
        .and_then(|g| g.tasks.as_ref())
        .into_iter()
        .flatten()
        .map(|t| t.name.as_str())
        .collect();
    let unknown: Vec<DeclarationError> = declared
        .ranges
        .iter()
        .filter_map(|r| r.container.as_deref())
        .filter(|task| !tasks.contains(task))
        .map(|task| {
            DeclarationError::new(
                FieldPath::new(format!("workersd_ports_{task}")),
                ErrorKind::UnknownTask(task.to_string()),
            )
        })
        .collect();
    if !unknown.is_empty() {
        return Err(AllocError::Invalid(unknown));
    }
    let address = alloc.address()?;
    let group = alloc.task_group.as_str();
    Ok(declared
        .ranges
        .iter()
        .filter_map(|range| {
            let restarts = match &range.container {
                Some(task) => alloc.task_running(task)?,
                None => {
                    let running: Vec<u64> =
                        tasks.iter().filter_map(|t| alloc.task_running(t)).collect();
                    if running.is_empty() {
                        return None;
                    }
                    running.iter().sum()
                }
            };
            let mut meta = declared.meta.clone();
            meta.insert("nomad-namespace".into(), alloc.namespace.clone());
            meta.insert("nomad-job".into(), alloc.job_id.clone());
            meta.insert("nomad-group".into(), group.to_string());
            meta.insert("nomad-alloc-id".into(), alloc.id.clone());
            meta.insert("nomad-node".into(), alloc.node_name.clone());
            if let Some(task) = &range.container {
                meta.insert("nomad-task".into(), task.clone());
            }
            let task = range.container.as_deref().unwrap_or("");
            Some(Target {
                id: TargetId::new(format!("nomad:{}/{task}/{}", alloc.id, range.ports)),
                service: declared.service.clone(),
                address,
                ports: range.ports,
                path: declared.path.clone(),
                scheme: declared.scheme,
                tags: declared.tags.clone(),
                meta,
                revision: restarts,
                probe_interval: None,
            })
        })
        .collect())
}

/// Every allocation's targets, and the problems of those whose declaration is refused
/// (by allocation ID), so one bad job never stops the others.
pub fn resolve(allocs: &[Allocation]) -> (Vec<Target>, BTreeMap<String, AllocError>) {
    let mut all = Vec::new();
    let mut problems = BTreeMap::new();
    for alloc in allocs {
        let outcome = declaration(alloc)
            .map_err(AllocError::Invalid)
            .and_then(|declared| match declared {
                Some(declared) => targets(alloc, &declared),
                None => Ok(Vec::new()),
            });
        match outcome {
            Ok(mut found) => all.append(&mut found),
            Err(e) => {
                problems.insert(alloc.id.clone(), e);
            }
        }
    }
    (all, problems)
}

#[cfg(test)]
mod tests;
