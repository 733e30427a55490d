//! workersd's own metrics, exposed on `--listen` at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOpLabels {
    pub sink: &'static str,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkErrorLabels {
    pub sink: &'static str,
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// 1 while /readyz answers 200; set when scraped.
    pub ready: Gauge,
    leading: Family<RoleLabel, Gauge>,
    /// The process' open file descriptors and its soft limit, by their conventional names
    /// (no prefix); set when scraped.
    pub open_fds: Gauge,
    pub max_fds: Gauge,
    probes: Family<ResultLabel, Counter>,
    pub targets: Gauge,
    pub live_endpoints: Gauge,
    sink_operations: Family<SinkOpLabels, Counter>,
    sink_requests: Family<SinkOpLabels, Counter>,
    sink_errors: Family<SinkErrorLabels, Counter>,
    reconcile_duration: Histogram,
    config_reloads: Family<ResultLabel, Counter>,
    pub sweep_overruns: Counter,
    pub held_connections: Gauge,
    invalid_objects: Family<KindLabel, Gauge>,
    crd_installed: Family<CrdLabel, Gauge>,
    sink_quarantined: Family<SinkLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrdLabel {
    pub crd: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// Empty when not built from a git checkout.
    commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let open_fds = Gauge::default();
        root.register(
            "process_open_fds",
            "Open file descriptors",
            open_fds.clone(),
        );
        let max_fds = Gauge::default();
        root.register(
            "process_max_fds",
            "The soft limit of open file descriptors",
            max_fds.clone(),
        );
        let registry = root.sub_registry_with_prefix("workersd");
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while /readyz answers 200 (targets probed, Consul synced, not standing by)",
            ready.clone(),
        );
        // Only set in Kubernetes mode, so the sample is absent elsewhere.
        let leading = Family::<RoleLabel, Gauge>::default();
        registry.register(
            "leading",
            "1 while this instance holds the Lease, by role: leader (deployment mode's prober) or janitor (node-local mode)",
            leading.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("WORKERSD_COMMIT"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels say which build runs",
            build_info.clone(),
        );
        let probes = Family::<ResultLabel, Counter>::default();
        registry.register("probes", "Port probes by result", probes.clone());
        let targets = Gauge::default();
        registry.register(
            "targets",
            "Declared targets (address and port range)",
            targets.clone(),
        );
        let live_endpoints = Gauge::default();
        registry.register(
            "live_endpoints",
            "Live worker endpoints in the desired catalog",
            live_endpoints.clone(),
        );
        let sink_operations = Family::<SinkOpLabels, Counter>::default();
        registry.register(
            "sink_operations",
            "Catalog operations written, by sink and operation",
            sink_operations.clone(),
        );
        let sink_requests = Family::<SinkOpLabels, Counter>::default();
        registry.register(
            "sink_requests",
            "Requests made by sinks, by sink and request kind",
            sink_requests.clone(),
        );
        let sink_errors = Family::<SinkErrorLabels, Counter>::default();
        registry.register(
            "sink_errors",
            "Sink errors, by sink and kind",
            sink_errors.clone(),
        );
        let reconcile_duration = Histogram::new([0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time to plan and write one reconcile pass",
            reconcile_duration.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Targets file reloads by result",
            config_reloads.clone(),
        );
        let sweep_overruns = Counter::default();
        registry.register(
            "sweep_overruns",
            "Sweeps that took longer than their interval (results still used)",
            sweep_overruns.clone(),
        );
        let held_connections = Gauge::default();
        registry.register(
            "held_connections",
            "Idle connections held to live workers (their end is noticed at once)",
            held_connections.clone(),
        );
        let invalid_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "invalid_objects",
            "Objects whose workersd declaration is refused (see their Warning Events), by kind",
            invalid_objects.clone(),
        );
        // Only set in Kubernetes mode, so the sample is absent elsewhere.
        let crd_installed = Family::<CrdLabel, Gauge>::default();
        registry.register(
            "crd_installed",
            "1 while the named CRD is served by the API server, 0 while it is absent (its resources are then ignored)",
            crd_installed.clone(),
        );
        let sink_quarantined = Family::<SinkLabel, Gauge>::default();
        registry.register(
            "sink_quarantined_operations",
            "Operations the sink's backend refused on their own, held back and retried later (see the warning naming each)",
            sink_quarantined.clone(),
        );
        Self {
            invalid_objects,
            crd_installed,
            sink_quarantined,
            registry: root,
            ready,
            leading,
            open_fds,
            max_fds,
            probes,
            targets,
            live_endpoints,
            sink_operations,
            sink_requests,
            sink_errors,
            reconcile_duration,
            config_reloads,
            sweep_overruns,
            held_connections,
        }
    }

    pub fn probe(&self, result: &'static str) {
        self.probes.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn sink_operations(&self, sink: &'static str, op: &'static str, count: u64) {
        self.sink_operations
            .get_or_create(&SinkOpLabels { sink, op })
            .inc_by(count);
    }

    pub fn sink_request(&self, sink: &'static str, op: &'static str) {
        self.sink_requests
            .get_or_create(&SinkOpLabels { sink, op })
            .inc();
    }

    pub fn sink_error(&self, sink: &'static str, kind: &'static str) {
        self.sink_errors
            .get_or_create(&SinkErrorLabels { sink, kind })
            .inc();
    }

    pub fn reconcile_duration(&self, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn invalid_objects(&self, kind: &'static str, count: usize) {
        self.invalid_objects
            .get_or_create(&KindLabel { kind })
            .set(count as i64);
    }

    pub fn leading(&self, role: &'static str, leading: bool) {
        self.leading
            .get_or_create(&RoleLabel { role })
            .set(i64::from(leading));
    }

    pub fn crd_installed(&self, crd: &'static str, installed: bool) {
        self.crd_installed
            .get_or_create(&CrdLabel { crd })
            .set(i64::from(installed));
    }

    pub fn sink_quarantined(&self, sink: &'static str, count: usize) {
        self.sink_quarantined
            .get_or_create(&SinkLabel { sink })
            .set(count as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_carry_their_conventional_names_and_roles_appear_once_set() {
        let m = Metrics::new();
        m.open_fds.set(12);
        m.max_fds.set(1024);
        let text = m.encode();
        assert!(text.contains("\nprocess_open_fds 12\n"), "{text}");
        assert!(text.contains("\nprocess_max_fds 1024\n"), "{text}");
        assert!(text.contains("\nworkersd_ready 0\n"), "{text}");
        assert!(
            !text.contains("workersd_leading{"),
            "absent until a Lease is in play: {text}"
        );
        m.leading("janitor", true);
        assert!(m.encode().contains("workersd_leading{role=\"janitor\"} 1"));
    }

    #[test]
    fn build_info_names_the_version_and_commit() {
        let text = Metrics::new().encode();
        let line = format!(
            "workersd_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("WORKERSD_COMMIT")
        );
        assert!(text.contains(&line), "{line} not in {text}");
    }

    #[test]
    fn encodes_counters_with_labels() {
        let m = Metrics::new();
        m.probe("live");
        m.probe("live");
        m.sink_operations("consul", "register", 3);
        let text = m.encode();
        assert!(
            text.contains("workersd_probes_total{result=\"live\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("workersd_sink_operations_total{sink=\"consul\",op=\"register\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
