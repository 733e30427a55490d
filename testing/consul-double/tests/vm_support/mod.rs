//! VictoriaMetrics as a real `consul_sd_configs` client, for the fidelity tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const POLL_STEP: Duration = Duration::from_millis(200);
pub const DISCOVERY_DEADLINE: Duration = Duration::from_secs(30);

pub fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!("{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The VictoriaMetrics child process; killed (and its log shown on failure)
/// on drop.
pub struct VictoriaMetrics {
    child: Child,
    log: PathBuf,
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- victoria-metrics log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// Serves Prometheus text on `/metrics`, standing in for a worker.
pub async fn start_scrape_target(worker: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            format!("# TYPE worker_up gauge\nworker_up{{worker=\"{worker}\"}} 1\n")
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Discovered Consul targets by `__address__`, as VM reports them.
pub async fn consul_targets(
    http: &reqwest::Client,
    vm: &str,
    node: &str,
) -> Option<BTreeMap<String, Value>> {
    let response = http.get(format!("{vm}/api/v1/targets")).send().await.ok()?;
    let body: Value = response.json().await.ok()?;
    let active = body["data"]["activeTargets"].as_array()?;
    Some(
        active
            .iter()
            .filter(|t| t["discoveredLabels"]["__meta_consul_node"] == json!(node))
            .filter_map(|t| {
                let address = t["discoveredLabels"]["__address__"].as_str()?.to_string();
                Some((address, t.clone()))
            })
            .collect(),
    )
}

/// Polls VM until `accept` holds for the discovered targets or the deadline
/// passes; returns the last observation either way.
pub async fn poll_targets(
    http: &reqwest::Client,
    vm: &str,
    node: &str,
    accept: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> (bool, BTreeMap<String, Value>) {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    while started.elapsed() < DISCOVERY_DEADLINE {
        if let Some(targets) = consul_targets(http, vm, node).await {
            if accept(&targets) {
                return (true, targets);
            }
            last = targets;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    (false, last)
}

/// `relabel_configs`: YAML list items indented for the job (empty for none).
pub fn write_scrape_config(dir: &Path, consul: SocketAddr, relabel_configs: &str) -> PathBuf {
    // No `datacenter`: VM must learn it from /v1/agent/self, as in production.
    let mut config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: workers\n    consul_sd_configs:\n      - server: \"{consul}\"\n"
    );
    if !relabel_configs.is_empty() {
        config.push_str("    relabel_configs:\n");
        config.push_str(relabel_configs);
    }
    let path = dir.join("promscrape.yml");
    std::fs::write(&path, config).expect("write scrape config");
    path
}

/// Starts VictoriaMetrics with `consul_sd_configs` against `consul`, rechecking every second.
pub fn start_victoria_metrics(
    scratch: &TempDir,
    consul: SocketAddr,
    relabel_configs: &str,
) -> (VictoriaMetrics, String) {
    let binary = find_on_path("victoria-metrics").unwrap_or_else(|| {
        panic!(
            "`victoria-metrics` is not on PATH. This fidelity test needs a real Consul client; \
             install it with `apt-get install -y victoria-metrics` (CI must)."
        )
    });
    let config = write_scrape_config(&scratch.0, consul, relabel_configs);
    let vm_port = free_port();
    let log = scratch.0.join("victoria-metrics.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(&binary)
        .arg(format!(
            "-storageDataPath={}",
            scratch.0.join("data").display()
        ))
        .arg(format!("-httpListenAddr=127.0.0.1:{vm_port}"))
        .arg(format!("-promscrape.config={}", config.display()))
        .arg("-promscrape.consulSDCheckInterval=1s")
        .arg("-loggerLevel=INFO")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log handle"))
        .stderr(log_file)
        .spawn()
        .expect("spawn victoria-metrics");
    (
        VictoriaMetrics { child, log },
        format!("http://127.0.0.1:{vm_port}"),
    )
}
