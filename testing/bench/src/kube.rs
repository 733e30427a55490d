//! What the Kubernetes scenarios share: the fake API server loaded by `kube_load.py`, the
//! release `workersd kubernetes` command line, plain HTTP to loopback servers, and per-process
//! CPU and memory from /proc.

use crate::{Args, Children, RANGE_PORTS, child_command, proc_status_kb};
use anyhow::{Context, bail};
use consul_double::ConsulDouble;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Pods per namespace in every loaded cluster.
pub const PODS_PER_NAMESPACE: usize = 1000;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `--workersd` or the release build of this checkout.
pub fn workersd_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let binary = args
        .workersd
        .clone()
        .unwrap_or_else(|| repo_root().join("target/release/workersd"));
    if !binary.exists() {
        bail!(
            "{} missing: cargo build --release --bin workersd",
            binary.display()
        );
    }
    Ok(binary)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the whole response
/// (head and body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, response))
}

pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// The JSON body of a 2xx response.
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let (status, response) = http_request(addr, method, path).await?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: status {status}");
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).with_context(|| format!("{method} {path}: not JSON"))
}

/// The value of an unlabelled (or fully spelled) sample in a Prometheus exposition.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in seconds.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/PID/stat (index 11, 12 after the comm).
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// A /proc/PID/status field (VmRSS:, VmHWM:) in MB; 0 when the process is gone.
pub fn proc_mb(pid: u32, field: &str) -> f64 {
    proc_status_kb(&pid.to_string(), field).unwrap_or(0) as f64 / 1024.0
}

/// The system's 1-minute load average (the machine is shared: printed next to CPU figures).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The fake API server, loaded and kept up by `kube_load.py` (a child in `children`).
pub struct FakeKube {
    pub kubeconfig: String,
    pub addr: SocketAddr,
    pub workdir: PathBuf,
}

impl FakeKube {
    /// Loads `pods` running, annotated pods (`PODS_PER_NAMESPACE` per namespace) whose IPs are
    /// the listeners of `start_pods`; with `pods_per_node`, also the Nodes `node-0`.. and pod
    /// *i* on `node-(i / pods_per_node)`.
    pub fn load(
        children: &mut Children,
        tag: &str,
        pods: usize,
        pods_per_node: Option<usize>,
    ) -> anyhow::Result<Self> {
        let workdir = std::env::temp_dir().join(format!(
            "workersd-bench-{tag}-{}-{pods}",
            std::process::id()
        ));
        std::fs::create_dir_all(&workdir)?;
        let mut cmd = child_command("python3");
        cmd.arg(repo_root().join("testing/bench/kube_load.py"))
            .arg(&workdir)
            .arg(pods.to_string())
            .arg(PODS_PER_NAMESPACE.to_string());
        if let Some(per_node) = pods_per_node {
            cmd.arg(per_node.to_string());
        }
        let mut loader = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = loader.stdout.take().expect("piped");
        children.0.push(loader);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let started: serde_json::Value =
            serde_json::from_str(&line).context("fake_kube did not start")?;
        let kubeconfig = started["kubeconfig"]
            .as_str()
            .context("no kubeconfig")?
            .to_string();
        let url = started["url"].as_str().context("no url")?;
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("fake_kube url {url}"))?;
        Ok(Self {
            kubeconfig,
            addr,
            workdir,
        })
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// `workersd kubernetes` as every Kubernetes scenario runs it: probe interval 10 s, the given
/// fast period, no HTTP SD, its own /metrics on `listen`, the Consul double, logs at warn.
pub fn workersd_kubernetes(
    binary: &Path,
    kube: &FakeKube,
    double: &ConsulDouble,
    listen: SocketAddr,
    fast_period: u64,
) -> Command {
    let mut cmd = child_command(binary);
    cmd.args([
        "kubernetes",
        "--max-ports-per-namespace",
        &(PODS_PER_NAMESPACE * RANGE_PORTS as usize).to_string(),
        "--probe-interval",
        "10s",
        "--fast-period",
        &format!("{fast_period}s"),
        "--http-sd-listen",
        "off",
        "--listen",
        &listen.to_string(),
        "--consul-addr",
        &double.api_url(),
    ])
    .env("KUBECONFIG", &kube.kubeconfig)
    .env("WORKERSD_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    cmd
}

/// Waits (≤ `limit`) until every instance answers /readyz 200 and the double holds
/// `expected` entries; returns the seconds since `started`.
pub async fn wait_synced(
    listens: &[SocketAddr],
    double: &ConsulDouble,
    expected: usize,
    started: Instant,
    limit: Duration,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + limit;
    let mut ready = vec![false; listens.len()];
    loop {
        if Instant::now() > deadline {
            bail!(
                "not synced within {limit:?}: {}/{} instances ready, Consul holds {}/{expected}",
                ready.iter().filter(|r| **r).count(),
                listens.len(),
                double.with_catalog(|c| c.service_count())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (listen, ready) in listens.iter().zip(&mut ready) {
            if !*ready {
                *ready = matches!(http_get(*listen, "/readyz").await, Ok((200, _)));
            }
        }
        if ready.iter().all(|r| *r) && double.with_catalog(|c| c.service_count()) >= expected {
            return Ok(started.elapsed().as_secs_f64());
        }
    }
}
