//! Builders for test objects, so a test states only what matters to it.

use crate::model::{EXTERNAL_SOURCE, meta_keys};
use crate::model::{PortRange, Scheme, ServiceInstance, Target, TargetId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A target with the defaults a worker usually has: service `web` on 127.0.0.1, ports
/// 9011-9020, `/metrics` over http, no tags or meta.
pub fn target(id: &str) -> TargetBuilder {
    TargetBuilder(Target {
        id: TargetId::new(id),
        service: "web".into(),
        address: "127.0.0.1".parse().expect("an IP address"),
        ports: PortRange::new(9011, 9020).expect("a valid range"),
        path: "/metrics".into(),
        scheme: Scheme::Http,
        tags: Vec::new(),
        meta: BTreeMap::new(),
        revision: 0,
        probe_interval: None,
    })
}

pub struct TargetBuilder(Target);

impl TargetBuilder {
    pub fn service(mut self, service: &str) -> Self {
        self.0.service = service.into();
        self
    }

    pub fn address(mut self, address: &str) -> Self {
        self.0.address = address.parse().expect("an IP address");
        self
    }

    /// `ports` as written in a declaration, e.g. `9011-9020`.
    pub fn ports(mut self, ports: &str) -> Self {
        self.0.ports = ports.parse().expect("a valid port range");
        self
    }

    pub fn path(mut self, path: &str) -> Self {
        self.0.path = path.into();
        self
    }

    pub fn tag(mut self, tag: &str) -> Self {
        self.0.tags.push(tag.into());
        self
    }

    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.0.meta.insert(key.into(), value.into());
        self
    }

    pub fn build(self) -> Target {
        self.0
    }

    pub fn shared(self) -> Arc<Target> {
        Arc::new(self.0)
    }
}

/// A catalog entry on 10.0.0.1, owned by `owner` (with workersd's marker) or, for `None`,
/// by another tool (no marker).
pub fn instance(owner: Option<&str>, service: &str, port: u16) -> ServiceInstance {
    let mut meta = BTreeMap::new();
    if let Some(owner) = owner {
        meta.insert(meta_keys::EXTERNAL_SOURCE.into(), EXTERNAL_SOURCE.into());
        meta.insert(meta_keys::OWNER.into(), owner.into());
    }
    let id = crate::catalog::instance_id(owner.unwrap_or("other-tool"), service, "10.0.0.1", port);
    ServiceInstance {
        id: id.into(),
        service: service.into(),
        address: "10.0.0.1".into(),
        port,
        tags: Vec::new(),
        meta: Arc::new(meta),
    }
}

/// Log output captured for a test to read: a `Write` (for `with_writer(move || logs.clone())`)
/// and a `MakeWriter` (for a layer that takes one).
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Captures this thread's events as flattened JSON lines until the guard drops.
    pub fn json_default() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("not poisoned").clone()).expect("UTF-8 logs")
    }

    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_string).collect()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}
