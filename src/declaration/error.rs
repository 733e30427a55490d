//! One error type for every way a target is declared: what is wrong ([`ErrorKind`]) and where
//! the user wrote it ([`FieldPath`]).

use super::rules::{MetaError, PathError, ServiceNameError, TagsError};
use super::{MAX_PORTS_PER_POD, MAX_RANGES_PER_POD, SourceKind};
use crate::model::{PortRange, PortRangeError, SchemeError};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a value was written, in the source's own terms: `targets[3].ports`,
/// `metadata.annotations[workersd.io/ports.web]`, `spec.containers[0].ports`. The whole input
/// (a file that is not YAML) has the empty path.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(String);

impl FieldPath {
    pub fn new(path: impl Into<String>) -> Self {
        Self(path.into())
    }

    /// The whole file or object.
    pub fn whole() -> Self {
        Self::default()
    }

    /// A field below this one: `targets[3]` and `ports` give `targets[3].ports`.
    pub fn field(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_string())
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `path: ` before a message, nothing for the whole input.
    fn prefix(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.0)
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub field: FieldPath,
    pub value: T,
}

impl<T> Located<T> {
    pub fn new(field: FieldPath, value: T) -> Self {
        Self { field, value }
    }
}

/// One problem of a declaration, located by the field that carries it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}{}", .field.prefix(), .kind)]
pub struct DeclarationError {
    pub field: FieldPath,
    pub kind: ErrorKind,
}

impl DeclarationError {
    pub fn new(field: FieldPath, kind: impl Into<ErrorKind>) -> Self {
        Self {
            field,
            kind: kind.into(),
        }
    }
}

/// What is wrong. The messages name the rule broken, so a user can fix it from the log alone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ErrorKind {
    // Any source.
    #[error("{}", .0.required())]
    Required(SourceKind),
    #[error("no port range declared ({})", .0.ports_hint())]
    NoPortRange(SourceKind),
    #[error(transparent)]
    Service(#[from] ServiceNameError),
    #[error(transparent)]
    Ports(#[from] PortRangeError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Scheme(#[from] SchemeError),
    #[error(transparent)]
    Tags(#[from] TagsError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("container name must not be empty")]
    EmptyContainerName,
    #[error("{0} ranges; at most {MAX_RANGES_PER_POD} per pod")]
    TooManyRanges(usize),
    #[error("{0} ports in all; at most {MAX_PORTS_PER_POD} per pod")]
    TooManyPorts(usize),
    #[error("{ports} overlaps {other} declared by {other_field}; one port belongs to one range")]
    RangesOverlap {
        ports: PortRange,
        other: PortRange,
        other_field: FieldPath,
    },

    // The targets file.
    #[error("cannot read {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("file is {bytes} bytes; at most {max} allowed")]
    FileTooLarge { bytes: usize, max: usize },
    #[error("not valid YAML: {0}")]
    Yaml(#[source] Arc<serde_norway::Error>),
    #[error("file is empty; expected a mapping with a `targets` list")]
    EmptyFile,
    #[error("expected a mapping with a `targets` list at the top level")]
    NoTargetsMapping,
    #[error("unknown top-level key (expected only `targets`)")]
    UnknownTopLevelKey,
    #[error("{entries} entries; at most {max} allowed")]
    TooManyEntries { entries: usize, max: usize },
    #[error("must be {0}")]
    WrongType(&'static str),
    #[error("keys and values must be strings")]
    MetaNotStrings,
    #[error("unknown field (expected one of {0})")]
    UnknownField(&'static str),
    #[error("{0:?} is not an IP address (host names are not resolved)")]
    NotAnIp(String),
    #[error("{0} cannot be probed; give the worker host's own IP")]
    Unprobeable(IpAddr),
    #[error("{ports} on {address} overlaps targets[{other}]; one port belongs to one target")]
    EntriesOverlap {
        ports: PortRange,
        address: IpAddr,
        other: usize,
    },

    // Key/value sources: pod annotations, Nomad meta.
    #[error("{bytes} bytes; at most {max}")]
    ValueTooLong { bytes: usize, max: usize },
    #[error("{}", .0.unknown_key())]
    UnknownKey(SourceKind),

    // Nomad meta.
    #[error(
        "a task's meta may only declare its own range (workersd_ports); set the other workersd_ keys on the group or the job"
    )]
    TaskMetaKey,
    #[error("no task named {0:?} in the allocation's group")]
    UnknownTask(String),

    // `WorkerMetrics` resources.
    #[error(transparent)]
    Selector(Arc<kube::core::ParseExpressionError>),
    #[error("must be between 1s and 1h")]
    ProbeIntervalRange,
    #[error("not a duration like \"10s\": {0}")]
    NotADuration(#[source] humantime::DurationError),

    // A valid declaration that a pod or the controller's policy refuses.
    #[error(
        "container {name:?} is neither a container nor a native sidecar of pod {pod} (containers: {containers}; sidecars: {sidecars}); its ports are not probed"
    )]
    UnknownContainer {
        name: String,
        /// `namespace/name`.
        pod: String,
        containers: String,
        sidecars: String,
    },
    #[error(
        "hostNetwork pods share the node's IP and are refused (start workersd with --allow-host-network to permit)"
    )]
    HostNetwork,
    #[error("service-name policy {template:?}: {source}")]
    NamePolicy {
        template: String,
        source: ServiceNameError,
    },
    #[error(
        "namespace {namespace:?} would probe more than {max} ports (--max-ports-per-namespace); this pod's {ports} are refused"
    )]
    NamespaceQuota {
        namespace: String,
        max: usize,
        ports: usize,
    },
}
