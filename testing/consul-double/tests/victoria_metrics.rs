//! Fidelity check with a real Consul client: VictoriaMetrics' `consul_sd_configs`
//! must discover, label and drop workers through the double exactly as it
//! would through Consul. Requires `victoria-metrics` on PATH (Debian package
//! `victoria-metrics`); a missing binary fails the test on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use consul_double::{Config, ConsulDouble};
use serde_json::{Value, json};

const NODE: &str = "workersd-synthetic";
const POLL_STEP: Duration = Duration::from_millis(200);
const DISCOVERY_DEADLINE: Duration = Duration::from_secs(30);

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
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
struct VictoriaMetrics {
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

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// Serves Prometheus text on `/metrics`, standing in for a worker.
async fn start_scrape_target(worker: &'static str) -> SocketAddr {
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

fn service_op(verb: &str, id: &str, name: &str, port: u16, pid: &str) -> Value {
    json!({"Service": {"Verb": verb, "Node": NODE, "Service": {
        "ID": id,
        "Service": name,
        "Port": port,
        "Tags": ["workersd", name],
        "Meta": {"worker_pid": pid, "worker_id": id},
    }}})
}

async fn put_txn(http: &reqwest::Client, double: &ConsulDouble, ops: Value) {
    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .json(&ops)
        .send()
        .await
        .expect("txn request");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, reqwest::StatusCode::OK, "txn failed: {body}");
}

/// Discovered Consul targets by `__address__`, as VM reports them.
async fn consul_targets(http: &reqwest::Client, vm: &str) -> Option<BTreeMap<String, Value>> {
    let response = http.get(format!("{vm}/api/v1/targets")).send().await.ok()?;
    let body: Value = response.json().await.ok()?;
    let active = body["data"]["activeTargets"].as_array()?;
    Some(
        active
            .iter()
            .filter(|t| t["discoveredLabels"]["__meta_consul_node"] == json!(NODE))
            .filter_map(|t| {
                let address = t["discoveredLabels"]["__address__"].as_str()?.to_string();
                Some((address, t.clone()))
            })
            .collect(),
    )
}

/// Polls VM until `accept` holds for the discovered targets or the deadline
/// passes; returns the last observation either way.
async fn poll_targets(
    http: &reqwest::Client,
    vm: &str,
    accept: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> (bool, BTreeMap<String, Value>) {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    while started.elapsed() < DISCOVERY_DEADLINE {
        if let Some(targets) = consul_targets(http, vm).await {
            if accept(&targets) {
                return (true, targets);
            }
            last = targets;
        }
        tokio::time::sleep(POLL_STEP).await;
    }
    (false, last)
}

fn write_scrape_config(dir: &Path, consul: SocketAddr) -> PathBuf {
    // No `datacenter`: VM must learn it from /v1/agent/self, as in production.
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: workers\n    consul_sd_configs:\n      - server: \"{consul}\"\n"
    );
    let path = dir.join("promscrape.yml");
    std::fs::write(&path, config).expect("write scrape config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoria_metrics_discovers_workers_through_the_double() {
    let binary = find_on_path("victoria-metrics").unwrap_or_else(|| {
        panic!(
            "`victoria-metrics` is not on PATH. This fidelity test needs a real Consul client; \
             install it with `apt-get install -y victoria-metrics` (CI must)."
        )
    });

    let double = ConsulDouble::start(Config::default())
        .await
        .expect("start double");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let gunicorn_1 = start_scrape_target("gunicorn-1").await;
    let gunicorn_2 = start_scrape_target("gunicorn-2").await;
    let celery_1 = start_scrape_target("celery-1").await;

    put_txn(
        &http,
        &double,
        json!([
            {"Node": {"Verb": "set", "Node": {
                "Node": NODE, "Address": "127.0.0.1", "Meta": {"managed_by": "workersd"}
            }}},
            service_op("set", "gunicorn-1", "gunicorn", gunicorn_1.port(), "101"),
            service_op("set", "gunicorn-2", "gunicorn", gunicorn_2.port(), "102"),
            service_op("set", "celery-1", "celery", celery_1.port(), "201"),
        ]),
    )
    .await;

    let scratch = TempDir::new("consul-double-vm");
    let config = write_scrape_config(&scratch.0, double.api_addr());
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
    let _vm = VictoriaMetrics { child, log };
    let vm = format!("http://127.0.0.1:{vm_port}");

    let expected: BTreeMap<String, (&str, &str, &str)> = [
        (gunicorn_1, "gunicorn-1", "gunicorn", "101"),
        (gunicorn_2, "gunicorn-2", "gunicorn", "102"),
        (celery_1, "celery-1", "celery", "201"),
    ]
    .into_iter()
    .map(|(addr, id, name, pid)| (addr.to_string(), (id, name, pid)))
    .collect();

    let all_discovered = |targets: &BTreeMap<String, Value>| {
        targets.len() == expected.len()
            && expected.iter().all(|(address, (id, name, pid))| {
                targets.get(address).is_some_and(|t| {
                    let labels = &t["discoveredLabels"];
                    labels["__meta_consul_service_id"] == json!(id)
                        && labels["__meta_consul_service"] == json!(name)
                        && labels["__meta_consul_service_metadata_worker_pid"] == json!(pid)
                        && labels["__meta_consul_service_metadata_worker_id"] == json!(id)
                        && labels["__meta_consul_tags"] == json!(format!(",workersd,{name},"))
                        && labels["__meta_consul_metadata_managed_by"] == json!("workersd")
                        && labels["__meta_consul_dc"] == json!("dc1")
                        && labels["__meta_consul_health"] == json!("passing")
                        && t["health"] == json!("up")
                })
            })
    };
    let (ok, seen) = poll_targets(&http, &vm, all_discovered).await;
    assert!(
        ok,
        "VictoriaMetrics did not discover and scrape all workers via the double within {DISCOVERY_DEADLINE:?}; last seen: {seen:#?}\nstats: {:#?}",
        double.stats()
    );

    // Deregister one gunicorn instance and the only celery instance.
    put_txn(
        &http,
        &double,
        json!([
            service_op("delete", "gunicorn-2", "gunicorn", 0, ""),
            service_op("delete", "celery-1", "celery", 0, ""),
        ]),
    )
    .await;
    let remaining = gunicorn_1.to_string();
    let (ok, seen) = poll_targets(&http, &vm, |targets| {
        targets.len() == 1 && targets.contains_key(&remaining)
    })
    .await;
    assert!(
        ok,
        "deregistered workers did not disappear from VictoriaMetrics; last seen: {seen:#?}"
    );

    // Which parts of the API VM relied on, and did the double serve all of it?
    let stats = double.stats();
    eprintln!("endpoints VictoriaMetrics called: {:#?}", stats.requests);
    eprintln!("query parameters it sent: {:#?}", stats.query_params);
    eprintln!("responses: {:#?}", stats.responses);
    assert!(
        stats.unmatched.is_empty(),
        "VM called unimplemented endpoints: {:?}",
        stats.unmatched
    );
    let vm_routes: BTreeSet<&str> = stats
        .requests
        .keys()
        .map(String::as_str)
        .filter(|route| !route.starts_with("PUT "))
        .collect();
    for required in [
        "GET /v1/agent/self",
        "GET /v1/catalog/services",
        "GET /v1/health/service/{service}",
    ] {
        assert!(
            vm_routes.contains(required),
            "VM never called {required}: {vm_routes:?}"
        );
    }
    for (route, statuses) in &stats.responses {
        assert!(
            statuses.keys().all(|status| *status == 200),
            "{route} answered {statuses:?}"
        );
    }
    assert!(stats.blocking_queries > 0, "VM is expected to long-poll");
    double.shutdown().await;
}
