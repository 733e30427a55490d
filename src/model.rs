//! Core types shared by every stage: what a source declares (`Target`) and what a sink
//! publishes (`ServiceInstance`). Sources of any kind (targets file, Kubernetes) produce
//! `Target`s; nothing downstream knows where they came from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

/// Largest number of ports one declared range may span. Worker ranges are small (one port
/// per worker); a range like 1-65535 is a mistake, never a scan.
pub const MAX_RANGE_PORTS: u32 = 256;

/// Inclusive port range, validated non-empty, ordered and at most [`MAX_RANGE_PORTS`] wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("expected a port or an inclusive range like \"9011-9020\", got {0:?}")]
    Syntax(String),
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    #[error("range {0}-{1} is reversed (start must not exceed end)")]
    Reversed(u16, u16),
    #[error("range {start}-{end} spans {len} ports; at most {MAX_RANGE_PORTS} are allowed")]
    TooWide { start: u16, end: u16, len: u32 },
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Result<Self, PortRangeError> {
        if start == 0 {
            return Err(PortRangeError::Port("0".into()));
        }
        if start > end {
            return Err(PortRangeError::Reversed(start, end));
        }
        let len = u32::from(end) - u32::from(start) + 1;
        if len > MAX_RANGE_PORTS {
            return Err(PortRangeError::TooWide { start, end, len });
        }
        Ok(Self { start, end })
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        self.start..=self.end
    }

    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let parse_port = |s: &str| -> Result<u16, PortRangeError> {
            let s = s.trim();
            match s.parse::<u16>() {
                Ok(p) if p > 0 && !s.starts_with('+') => Ok(p),
                _ => Err(PortRangeError::Port(s.to_string())),
            }
        };
        if text.is_empty() {
            return Err(PortRangeError::Syntax(text.to_string()));
        }
        match text.split_once('-') {
            None => {
                let port = parse_port(text)?;
                Self::new(port, port)
            }
            Some((a, b)) => {
                if a.trim().is_empty() || b.trim().is_empty() || b.contains('-') {
                    return Err(PortRangeError::Syntax(text.to_string()));
                }
                Self::new(parse_port(a)?, parse_port(b)?)
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scheme must be \"http\" or \"https\", got {0:?}")]
pub struct SchemeError(pub String);

impl FromStr for Scheme {
    type Err = SchemeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Scheme::Http),
            "https" => Ok(Scheme::Https),
            other => Err(SchemeError(other.to_string())),
        }
    }
}

/// Stable identity of a declared target, chosen by its source. Two snapshots naming the same
/// id describe the same place (so its live ports carry over when other fields change).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(Arc<str>);

impl TargetId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A place where workers may live: one address and a range of ports to probe there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: TargetId,
    pub service: String,
    /// The only address ever probed or published for this target.
    pub address: IpAddr,
    pub ports: PortRange,
    pub path: String,
    pub scheme: Scheme,
    pub tags: Vec<String>,
    /// User meta plus source meta (e.g. Kubernetes namespace and pod), checked by
    /// [`crate::declaration::validate`].
    pub meta: BTreeMap<String, String>,
    /// Bumped by the source when the workers behind the target restarted (e.g. a container
    /// restart): the target is then probed at once, as if new.
    pub revision: u64,
    /// Steady-state probe interval for this target; `None` uses the controller's.
    pub probe_interval: Option<std::time::Duration>,
}

/// One live worker endpoint as a catalog service instance. Sinks publish exactly these.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceInstance {
    /// Shared with the catalogs' keys (one allocation, not one per map).
    pub id: Arc<str>,
    pub service: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// Published meta minus `worker-port`, which is `port` and added by [`Self::published_meta`]:
    /// the rest is the same for every port of a target, so its instances share one map
    /// instead of a copy each.
    pub meta: Arc<BTreeMap<String, String>>,
}

impl ServiceInstance {
    /// The meta map as sinks publish it.
    pub fn published_meta(&self) -> BTreeMap<String, String> {
        let mut meta = (*self.meta).clone();
        meta.insert(meta_keys::WORKER_PORT.into(), self.port.to_string());
        meta
    }
}

/// Desired or current catalog content, keyed by service instance ID. Instances are shared, not
/// copied, between the pipeline's desired state, the published state, plans and the sinks'
/// memory of Consul: a copy of every instance for each of them adds up at tens of thousands of
/// endpoints.
pub type Catalog = BTreeMap<Arc<str>, Arc<ServiceInstance>>;

/// Meta keys workersd writes on every instance it owns. Users may not set them.
pub mod meta_keys {
    /// Consul's convention for "registered by an external tool"; value [`super::EXTERNAL_SOURCE`].
    pub const EXTERNAL_SOURCE: &str = "external-source";
    pub const OWNER: &str = "workersd-owner";
    pub const METRICS_PATH: &str = "metrics-path";
    pub const METRICS_SCHEME: &str = "metrics-scheme";
    pub const WORKER_PORT: &str = "worker-port";
    /// Node meta in node-local mode: the cluster (`--cluster-name`) and the Kubernetes node
    /// whose workers the Consul node holds.
    pub const CLUSTER: &str = "workersd-cluster";
    pub const KUBERNETES_NODE: &str = "workersd-k8s-node";

    pub const RESERVED: [&str; 5] = [
        EXTERNAL_SOURCE,
        OWNER,
        METRICS_PATH,
        METRICS_SCHEME,
        WORKER_PORT,
    ];
}

pub const EXTERNAL_SOURCE: &str = "workersd";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        assert_eq!(
            "9011-9020".parse::<PortRange>().unwrap(),
            PortRange::new(9011, 9020).unwrap()
        );
        assert_eq!(" 9011 - 9012 ".parse::<PortRange>().unwrap().len(), 2);
        assert_eq!("8080".parse::<PortRange>().unwrap().len(), 1);
        assert_eq!("8080".parse::<PortRange>().unwrap().to_string(), "8080");
    }

    #[test]
    fn rejects_bad_ranges_with_reasons() {
        assert_eq!(
            "9020-9011".parse::<PortRange>(),
            Err(PortRangeError::Reversed(9020, 9011))
        );
        assert!(matches!(
            "1-65535".parse::<PortRange>(),
            Err(PortRangeError::TooWide { len: 65535, .. })
        ));
        assert!(matches!(
            "0-10".parse::<PortRange>(),
            Err(PortRangeError::Port(_))
        ));
        assert!(matches!(
            "70000".parse::<PortRange>(),
            Err(PortRangeError::Port(_))
        ));
        assert!(matches!(
            "a-b".parse::<PortRange>(),
            Err(PortRangeError::Port(_))
        ));
        assert!(matches!(
            "1-2-3".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert!(matches!(
            "-5".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert!(matches!(
            "".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert!(matches!(
            "+5".parse::<PortRange>(),
            Err(PortRangeError::Port(_))
        ));
        assert!("1-256".parse::<PortRange>().is_ok());
        assert!("1-257".parse::<PortRange>().is_err());
    }

    #[test]
    fn overlap_is_symmetric_and_inclusive() {
        let a = PortRange::new(10, 20).unwrap();
        let b = PortRange::new(20, 30).unwrap();
        let c = PortRange::new(21, 30).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }
}
