//! workersd benchmark harness (see BENCHMARKS.md). Scenarios:
//!
//! - `sweep`: N simulated pods (10-port range, 4 open, on 127.20.x.y) served by child
//!   processes; one full sweep by workersd's prober vs `nmap -sT` vs a bare tokio connect loop.
//! - `consul`: initial sync of 4·N endpoints against the in-process Consul double, then a
//!   no-change sync and a re-read resync.
//! - `latency`: port opened → entry visible in the Consul double, fast cadence and steady state.
//! - `kube-memory`: `target/release/workersd kubernetes` against the fake API server with N pods.
//! - `node-local`: N `workersd kubernetes --node-name` instances, one per fake node, with
//!   `--pods-per-node` pods each; per-instance CPU and memory, API server and Consul requests.
//!
//! Everything is loopback only; every wait is bounded; children die with the harness
//! (PR_SET_PDEATHSIG plus an explicit kill on exit).

mod kube;
mod kube_memory;
mod node_local;

use anyhow::{Context, bail};
use consul_double::{Config as DoubleConfig, ConsulDouble};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use workersd::catalog::{desired_catalog, instance_id};
use workersd::metrics::Metrics;
use workersd::model::{PortRange, Scheme, Target, TargetId};
use workersd::pipeline::{self, DesiredState};
use workersd::probe::{ProbeSettings, RangeState, SweepKind, sweep_target};
use workersd::secret::TokenSource;
use workersd::sinks::consul::{ConsulClient, ConsulSettings, ConsulSink};

const FIRST_PORT: u16 = 9011;
const RANGE_PORTS: u16 = 10;
const OPEN_PORTS: u16 = 4;
/// Pods per serving child: 4 listeners and up to 4 connections held by workersd per pod,
/// under the 20,000 fd hard limit of this host.
const PODS_PER_CHILD: usize = 2000;
const OWNER: &str = "workersd-bench";
const SERVICE: &str = "bench";
const EXPOSITION: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 58\r\nConnection: close\r\n\r\n# TYPE up gauge\nup 1\n# TYPE requests_total counter\nrequests_total 7\n";

fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 20, (i / 200) as u8, (1 + i % 200) as u8)
}

fn pod_target(i: usize) -> Target {
    Target {
        id: TargetId::new(format!("pod-{i}")),
        service: SERVICE.into(),
        address: IpAddr::V4(pod_addr(i)),
        ports: PortRange::new(FIRST_PORT, FIRST_PORT + RANGE_PORTS - 1).expect("valid range"),
        path: "/metrics".into(),
        scheme: Scheme::Http,
        tags: vec!["bench".into()],
        meta: BTreeMap::new(),
        revision: 0,
        probe_interval: None,
    }
}

/// Live workers per pod (`--live`, default [`OPEN_PORTS`]); serving children get it too.
static LIVE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

fn live_per_pod() -> u16 {
    *LIVE.get_or_init(|| OPEN_PORTS)
}

fn open_ports() -> BTreeSet<u16> {
    (FIRST_PORT..FIRST_PORT + live_per_pod()).collect()
}

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args {
    scenario: String,
    pods: Vec<usize>,
    concurrency: usize,
    timeout: Duration,
    samples: usize,
    steady_samples: usize,
    steady_interval: Duration,
    measure: Duration,
    no_nmap: bool,
    first: usize,
    kube_fast_period: u64,
    /// Seconds between sync and the CPU window; default: the fast period plus 12 s.
    kube_settle: Option<u64>,
    workersd: Option<std::path::PathBuf>,
    /// node-local: the node counts to run, and pods per node.
    nodes: Vec<usize>,
    pods_per_node: usize,
}

/// A comma-separated list of counts, each 1 to `max`.
fn counts(flag: &str, value: &str, max: usize) -> anyhow::Result<Vec<usize>> {
    let counts = value
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| flag.to_string())?;
    if counts.iter().any(|&n| n == 0 || n > max) {
        bail!("{flag}: 1 to {max}");
    }
    Ok(counts)
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let scenario = it.next().context(
        "usage: workersd-bench <sweep|consul|latency|kube-memory|node-local> [--pods N[,N..]] [--concurrency C] \
         [--nodes N[,N..]] [--pods-per-node P] [--live K] [--samples S] [--steady-samples S] [--steady-interval SECS] [--measure SECS] [--kube-fast-period SECS] [--kube-settle SECS] [--workersd BINARY] [--no-nmap]",
    )?;
    let mut args = Args {
        scenario,
        pods: vec![100, 1000, 10_000],
        concurrency: 512,
        timeout: Duration::from_secs(1),
        samples: 50,
        steady_samples: 10,
        steady_interval: Duration::from_secs(10),
        measure: Duration::from_secs(60),
        no_nmap: false,
        first: 0,
        kube_fast_period: 30,
        kube_settle: None,
        workersd: None,
        nodes: vec![1, 10],
        pods_per_node: 110,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pods" => args.pods = counts(&flag, &value()?, 50_000)?,
            "--nodes" => args.nodes = counts(&flag, &value()?, 100)?,
            "--pods-per-node" => {
                args.pods_per_node = value()?.parse().context("--pods-per-node")?;
                if !(1..=1000).contains(&args.pods_per_node) {
                    bail!("--pods-per-node: 1 to 1000");
                }
            }
            "--concurrency" => args.concurrency = value()?.parse()?,
            "--live" => {
                let live: u16 = value()?.parse().context("--live")?;
                if !(1..=10).contains(&live) {
                    bail!("--live: 1 to 10 of the 10 ports");
                }
                LIVE.set(live)
                    .map_err(|_| anyhow::anyhow!("--live given twice"))?;
            }
            "--timeout-ms" => args.timeout = Duration::from_millis(value()?.parse()?),
            "--samples" => args.samples = value()?.parse()?,
            "--steady-samples" => args.steady_samples = value()?.parse()?,
            "--steady-interval" => args.steady_interval = Duration::from_secs(value()?.parse()?),
            "--measure" => args.measure = Duration::from_secs(value()?.parse()?),
            "--first" => args.first = value()?.parse()?,
            "--no-nmap" => args.no_nmap = true,
            "--kube-fast-period" => args.kube_fast_period = value()?.parse()?,
            "--kube-settle" => args.kube_settle = Some(value()?.parse()?),
            "--workersd" => args.workersd = Some(value()?.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let nofile = raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.scenario == "serve" {
        return runtime.block_on(serve(args.first, args.pods[0]));
    }
    if args.scenario == "probe-workersd" || args.scenario == "probe-bare" {
        return runtime.block_on(probe_child(&args));
    }
    workersd::tls::install_crypto_provider();
    println!(
        "# workersd-bench {} | RLIMIT_NOFILE soft=hard={nofile} | concurrency {} | probe timeout {:?}",
        args.scenario, args.concurrency, args.timeout
    );
    match args.scenario.as_str() {
        "sweep" => runtime.block_on(sweep_scenario(&args)),
        "consul" => runtime.block_on(consul_scenario(&args)),
        "latency" => runtime.block_on(latency_scenario(&args)),
        "kube-memory" => runtime.block_on(kube_memory::kube_scenario(&args)),
        "node-local" => runtime.block_on(node_local::node_local_scenario(&args)),
        other => bail!("unknown scenario {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Process plumbing

/// Raises the fd limit of the harness and its children (workersd included): both limits to
/// 2^20 where allowed (root: CAP_SYS_RESOURCE), as a container runtime's default nofile is,
/// else the soft limit to the hard one.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let wide = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: plain syscalls on stack structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_max >= wide.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &wide) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A command whose process is killed when the harness dies.
fn child_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// Children killed (SIGKILL) and reaped on drop.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        // SIGTERM first so a child can stop its own children (the fake API server), then
        // SIGKILL after at most 3 s.
        for child in &mut self.0 {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in &mut self.0 {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu: f64,
    maxrss_kb: i64,
}

fn rusage(who: i32) -> Usage {
    // SAFETY: getrusage fills the struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        cpu: secs(ru.ru_utime) + secs(ru.ru_stime),
        maxrss_kb: ru.ru_maxrss,
    }
}

fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd` to completion; returns its stdout, wall time, CPU seconds and peak RSS (MB), the
/// last two from wait4 for exactly that process.
fn run_child(cmd: &mut Command, limit: Duration) -> anyhow::Result<(String, f64, Usage)> {
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let mut status = 0;
    // SAFETY: wait4 fills the struct; the Child is not waited elsewhere (std never reaps on drop).
    let ru = loop {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if got == pid {
            break ru;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            bail!("child {pid} exceeded {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed().as_secs_f64();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let usage = Usage {
        cpu: secs(ru.ru_utime) + secs(ru.ru_stime),
        maxrss_kb: ru.ru_maxrss,
    };
    let out = reader.join().unwrap_or_default();
    if status != 0 {
        bail!("child exited with status {status}");
    }
    Ok((out, wall, usage))
}

// ---------------------------------------------------------------------------------------------
// Simulated pods

/// `serve` mode (a child): listeners for pods first..first+count, until stdin closes.
async fn serve(first: usize, count: usize) -> anyhow::Result<()> {
    let mut listeners = Vec::with_capacity(count * live_per_pod() as usize);
    for i in first..first + count {
        for port in open_ports() {
            let addr = SocketAddr::new(IpAddr::V4(pod_addr(i)), port);
            listeners.push(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind {addr}"))?,
            );
        }
    }
    static ACCEPT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    for listener in listeners {
        tokio::spawn(async move {
            loop {
                let mut stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors (EMFILE) with many held connections: keep the port
                    // served, as a real server does, instead of leaving it to time out.
                    Err(e) => {
                        if !ACCEPT_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            eprintln!("pod server {first}..: accept failed ({e}); retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // A connect-only probe closes at once (read 0); an HTTP probe sends a request.
                    if let Ok(n) = stream.read(&mut buf).await
                        && n > 0
                    {
                        let _ = stream.write_all(EXPOSITION.as_bytes()).await;
                    }
                });
            }
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
    Ok(())
}

/// Spawns serving children for pods 0..n and waits until every listener is bound.
fn start_pods(n: usize) -> anyhow::Result<Children> {
    start_pods_by(n, PODS_PER_CHILD)
}

/// `start_pods` with `per_child` pods per serving child.
fn start_pods_by(n: usize, per_child: usize) -> anyhow::Result<Children> {
    let exe = std::env::current_exe()?;
    let mut children = Children::default();
    for first in (0..n).step_by(per_child) {
        let count = per_child.min(n - first);
        let mut child = child_command(&exe)
            .args([
                "serve",
                "--first",
                &first.to_string(),
                "--pods",
                &count.to_string(),
                "--live",
                &live_per_pod().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        children.0.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("pod server for {first}..{} failed to start", first + count);
        }
    }
    Ok(children)
}

// ---------------------------------------------------------------------------------------------
// sweep

struct Run {
    wall: f64,
    cpu: f64,
    peak_rss_mb: f64,
    open: usize,
}

async fn workersd_sweep(
    targets: &[Arc<Target>],
    previous: &[Arc<RangeState>],
    kind: SweepKind,
    concurrency: usize,
    timeout: Duration,
) -> (Run, Vec<Arc<RangeState>>) {
    let before = rusage(libc::RUSAGE_SELF);
    let started = Instant::now();
    // As in the daemon: one task per target, one global limiter, one metrics registry.
    let limiter = Arc::new(Semaphore::new(concurrency));
    let metrics = Arc::new(Metrics::new());
    let tasks: Vec<_> = targets
        .iter()
        .zip(previous)
        .map(|(target, previous)| {
            let (target, previous) = (target.clone(), previous.clone());
            let (limiter, metrics) = (limiter.clone(), metrics.clone());
            tokio::spawn(async move {
                sweep_target(&target, &previous, kind, None, &limiter, timeout, &metrics)
                    .await
                    .state
            })
        })
        .collect();
    let mut live = Vec::with_capacity(tasks.len());
    for task in tasks {
        live.push(Arc::new(task.await.unwrap_or_default()));
    }
    let wall = started.elapsed().as_secs_f64();
    let after = rusage(libc::RUSAGE_SELF);
    let run = Run {
        wall,
        cpu: after.cpu - before.cpu,
        peak_rss_mb: 0.0,
        open: live.iter().map(|l| l.live.len()).sum(),
    };
    (run, live)
}

/// The practical limit: connect to every address:port with the same concurrency, nothing else.
async fn bare_sweep(addrs: &[SocketAddr], concurrency: usize, timeout: Duration) -> Run {
    let before = rusage(libc::RUSAGE_SELF);
    let started = Instant::now();
    let limiter = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let permit = limiter.clone().acquire_owned().await.expect("open");
        tasks.push(tokio::spawn(async move {
            let ok = matches!(
                tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            drop(permit);
            ok
        }));
    }
    let mut open = 0;
    for task in tasks {
        open += usize::from(task.await.unwrap_or(false));
    }
    let wall = started.elapsed().as_secs_f64();
    let after = rusage(libc::RUSAGE_SELF);
    Run {
        wall,
        cpu: after.cpu - before.cpu,
        peak_rss_mb: 0.0,
        open,
    }
}

fn nmap_flags(n: usize, concurrency: usize) -> Vec<String> {
    [
        "-sT",
        "-n",
        "-Pn",
        "-T4",
        "--max-retries",
        "1",
        "--min-rate",
        "20000",
        "--min-parallelism",
        &concurrency.to_string(),
        "--min-hostgroup",
        &n.min(4096).to_string(),
        "--host-timeout",
        "120s",
        "-p",
        &format!("{FIRST_PORT}-{}", FIRST_PORT + RANGE_PORTS - 1),
        "--open",
        "-oG",
        "-",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn nmap_sweep(n: usize, concurrency: usize) -> anyhow::Result<Run> {
    let hosts = std::env::temp_dir().join(format!("workersd-bench-hosts-{}", std::process::id()));
    let list: String = (0..n).map(|i| format!("{}\n", pod_addr(i))).collect();
    std::fs::write(&hosts, list)?;
    drain_time_wait();
    let mut flags = nmap_flags(n, concurrency);
    flags.push("-iL".into());
    flags.push(hosts.display().to_string());
    let (out, wall, usage) = run_child(
        child_command("nmap").args(&flags).stderr(Stdio::null()),
        Duration::from_secs(600),
    )
    .context("nmap (apt-get install nmap)")?;
    let _ = std::fs::remove_file(&hosts);
    Ok(Run {
        wall,
        cpu: usage.cpu,
        peak_rss_mb: usage.maxrss_kb as f64 / 1024.0,
        open: out.matches("/open/").count(),
    })
}

/// Child mode: one tool's sweeps in a process of its own, so CPU and peak RSS are its alone.
/// Prints `RESULT name wall cpu open` lines.
async fn probe_child(args: &Args) -> anyhow::Result<()> {
    let n = args.pods[0];
    let targets: Vec<Arc<Target>> = (0..n).map(|i| Arc::new(pod_target(i))).collect();
    if args.scenario == "probe-workersd" {
        let (c, t) = (args.concurrency, args.timeout);
        let none: Vec<_> = (0..n).map(|_| Arc::new(RangeState::default())).collect();
        let (first, known) = workersd_sweep(&targets, &none, SweepKind::Full, c, t).await;
        let (steady, _) = workersd_sweep(&targets, &known, SweepKind::Full, c, t).await;
        drain_time_wait();
        let (frontier, _) = workersd_sweep(&targets, &known, SweepKind::Frontier, c, t).await;
        for (name, run) in [("first", first), ("steady", steady), ("frontier", frontier)] {
            println!("RESULT {name} {} {} {}", run.wall, run.cpu, run.open);
        }
    } else {
        let addrs: Vec<SocketAddr> = targets
            .iter()
            .flat_map(|t| t.ports.ports().map(|p| SocketAddr::new(t.address, p)))
            .collect();
        let run = bare_sweep(&addrs, args.concurrency, args.timeout).await;
        println!("RESULT bare {} {} {}", run.wall, run.cpu, run.open);
    }
    Ok(())
}

/// Sockets in TIME_WAIT (from /proc/net/sockstat).
fn time_wait() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("TCP:"))?.to_string();
            let mut words = line.split_whitespace();
            words.find(|w| *w == "tw")?;
            words.next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Every tool starts with a drained TIME_WAIT table (100,000 connects leave ~100,000 sockets
/// in TIME_WAIT for 60 s; the table holds net.ipv4.tcp_max_tw_buckets, here 131,072, and a
/// full table slows whoever runs next). Bounded at 75 s.
fn drain_time_wait() {
    let started = Instant::now();
    // Other processes on the host keep a few thousand; drain what the previous tool left.
    if time_wait() < 20_000 {
        return;
    }
    while time_wait() >= 20_000 && started.elapsed() < Duration::from_secs(75) {
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "  (waited {:.0} s for TIME_WAIT to drain: {} left)",
        started.elapsed().as_secs_f64(),
        time_wait()
    );
}

fn tool_runs(args: &Args, tool: &str, n: usize) -> anyhow::Result<Vec<Run>> {
    drain_time_wait();
    let exe = std::env::current_exe()?;
    let (out, _, usage) = run_child(
        child_command(exe).args([
            tool,
            "--pods",
            &n.to_string(),
            "--concurrency",
            &args.concurrency.to_string(),
            "--timeout-ms",
            &args.timeout.as_millis().to_string(),
        ]),
        Duration::from_secs(600),
    )?;
    let runs = out
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Run {
                wall: f[1].parse().unwrap_or(f64::NAN),
                cpu: f[2].parse().unwrap_or(f64::NAN),
                peak_rss_mb: usage.maxrss_kb as f64 / 1024.0,
                open: f[3].parse().unwrap_or(0),
            }
        })
        .collect::<Vec<_>>();
    if runs.is_empty() {
        bail!("{tool} printed no result");
    }
    Ok(runs)
}

fn print_run(name: &str, run: &Run, expected: usize) {
    println!(
        "  {name:<22} wall {:>8.3} s  cpu {:>7.3} s  peak RSS {:>7.1} MB  open {}/{}",
        run.wall, run.cpu, run.peak_rss_mb, run.open, expected
    );
}

async fn sweep_scenario(args: &Args) -> anyhow::Result<()> {
    println!(
        "|pods|ports|workersd first sweep (HTTP verify) s|workersd full steady sweep (connect) s|workersd frontier sweep s|bare loop s|nmap s|first/nmap|full/nmap|frontier/nmap|first/bare|full/bare|frontier/bare|workersd cpu s (first/full/frontier)|workersd peak RSS MB|bare cpu s|bare peak RSS MB|nmap cpu s|nmap peak RSS MB|"
    );
    let mut rows = Vec::new();
    for &n in &args.pods {
        let children = start_pods(n)?;
        let targets: Vec<Arc<Target>> = (0..n).map(|i| Arc::new(pod_target(i))).collect();
        let addrs: Vec<SocketAddr> = targets
            .iter()
            .flat_map(|t| t.ports.ports().map(|p| SocketAddr::new(t.address, p)))
            .collect();
        let expected = n * live_per_pod() as usize;
        println!("## {n} pods, {} ports, {expected} open", addrs.len());
        let mut runs = tool_runs(args, "probe-workersd", n)?.into_iter();
        let (first, steady, frontier) = (
            runs.next().context("first")?,
            runs.next().context("steady")?,
            runs.next().context("frontier")?,
        );
        print_run("workersd first sweep", &first, expected);
        print_run("workersd full steady", &steady, expected);
        print_run("workersd frontier", &frontier, expected);
        let bare = tool_runs(args, "probe-bare", n)?.remove(0);
        print_run("bare tokio connect", &bare, expected);
        let nmap = if args.no_nmap {
            None
        } else {
            println!(
                "  nmap {} -iL HOSTS",
                nmap_flags(n, args.concurrency).join(" ")
            );
            let run = nmap_sweep(n, args.concurrency)?;
            print_run("nmap -sT", &run, expected);
            Some(run)
        };
        for (name, run) in [
            ("first", &first),
            ("steady", &steady),
            ("frontier", &frontier),
            ("bare", &bare),
        ] {
            if run.open != expected {
                println!(
                    "  WARNING: {name} found {} open, expected {expected}",
                    run.open
                );
            }
        }
        let ratio = |a: f64, b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}", a / b));
        let nmap_wall = nmap.as_ref().map(|r| r.wall);
        println!(
            "  ratios: first/nmap {}  full/nmap {}  frontier/nmap {}  first/bare {:.2}  full/bare {:.2}  frontier/bare {:.2}",
            ratio(first.wall, nmap_wall),
            ratio(steady.wall, nmap_wall),
            ratio(frontier.wall, nmap_wall),
            first.wall / bare.wall,
            steady.wall / bare.wall,
            frontier.wall / bare.wall
        );
        rows.push(format!(
            "|{n}|{}|{:.3}|{:.3}|{:.3}|{:.3}|{}|{}|{}|{}|{:.2}|{:.2}|{:.2}|{:.2} / {:.2} / {:.2}|{:.0}|{:.2}|{:.0}|{}|{}|",
            addrs.len(),
            first.wall,
            steady.wall,
            frontier.wall,
            bare.wall,
            nmap_wall.map_or("-".into(), |w| format!("{w:.3}")),
            ratio(first.wall, nmap_wall),
            ratio(steady.wall, nmap_wall),
            ratio(frontier.wall, nmap_wall),
            first.wall / bare.wall,
            steady.wall / bare.wall,
            frontier.wall / bare.wall,
            first.cpu,
            steady.cpu,
            frontier.cpu,
            first.peak_rss_mb,
            bare.cpu,
            bare.peak_rss_mb,
            nmap.as_ref()
                .map_or("-".into(), |r| format!("{:.2}", r.cpu)),
            nmap.as_ref()
                .map_or("-".into(), |r| format!("{:.0}", r.peak_rss_mb)),
        ));
        drop(children);
    }
    println!("# table");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// consul

fn consul_sink(double: &ConsulDouble, metrics: Arc<Metrics>) -> anyhow::Result<ConsulSink> {
    let client = ConsulClient::new(ConsulSettings {
        address: double.api_url(),
        token: TokenSource::None,
        datacenter: None,
        node: OWNER.into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: OWNER.into(),
        resync_interval: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        tls: Default::default(),
    })
    .map_err(anyhow::Error::msg)?;
    Ok(ConsulSink::new(client, metrics))
}

async fn consul_scenario(args: &Args) -> anyhow::Result<()> {
    println!(
        "|pods|Consul accepts ops/txn|endpoints E|initial txn requests|of which refused|ops applied|bound ceil(E/64)|initial sync s|no-change sync: requests|resync re-read: txn requests|"
    );
    // Consul 1.14 and later accept 128 operations per txn, older releases 64.
    for (n, max_txn_ops) in args.pods.iter().flat_map(|&n| [(n, 128), (n, 64)]) {
        let double = ConsulDouble::start(DoubleConfig {
            max_txn_ops,
            ..DoubleConfig::default()
        })
        .await?;
        let targets: Vec<Target> = (0..n).map(pod_target).collect();
        let live = open_ports();
        let catalog = desired_catalog(OWNER, targets.iter().map(|t| (t, &live)));
        let endpoints = catalog.len();
        let desired = DesiredState {
            catalog,
            complete: true,
        };
        let mut sink = consul_sink(&double, Arc::new(Metrics::new()))?;
        double.reset_stats();
        let started = Instant::now();
        let first = sink.sync(&desired).await?;
        let took = started.elapsed().as_secs_f64();
        let stats = double.stats();
        let txns = stats.requests_matching("PUT /v1/txn");
        let refused = stats.txn.rejected;
        let ops = stats.txn.ops_applied;
        let present = double.with_catalog(|c| c.service_count());
        // No change: the sink knows Consul matches and writes nothing.
        double.reset_stats();
        let again = sink.sync(&desired).await?;
        let no_change_requests = double.stats().requests.values().sum::<u64>();
        // Periodic resync: re-read Consul, still nothing to write.
        sink.invalidate();
        double.reset_stats();
        sink.sync(&desired).await?;
        let resync_txns = double.stats().requests_matching("PUT /v1/txn");
        println!(
            "|{n}|{max_txn_ops}|{endpoints}|{txns}|{refused}|{ops}|{}|{took:.3}|{no_change_requests}|{resync_txns}|",
            endpoints.div_ceil(64),
        );
        if present < endpoints || first.registered != endpoints || again.requests != 0 {
            println!(
                "  WARNING: double holds {present}, registered {}, no-change requests {}",
                first.registered, again.requests
            );
        }
        double.shutdown().await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// latency

struct Lcg(u64);
impl Lcg {
    fn next_fraction(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                if let Ok(n) = stream.read(&mut buf).await
                    && n > 0
                {
                    let _ = stream.write_all(EXPOSITION.as_bytes()).await;
                }
            });
        }
    }))
}

async fn wait_for(
    double: &ConsulDouble,
    id: &str,
    present: bool,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if double.with_catalog(|c| c.service(OWNER, id).is_some()) == present {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Runs `samples` open → visible measurements; `settle` is waited after each removal. The
/// worker opens the first port of the range, as a first-free worker recycled by
/// `--max-requests` does, or with `any_port` each port of the range in turn (what only a full
/// sweep finds).
async fn latency_run(
    settings: ProbeSettings,
    samples: usize,
    settle: Duration,
    jitter: Duration,
    seed: u64,
    any_port: bool,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let address = Ipv4Addr::new(127, 21, 0, 1);
    let double = ConsulDouble::start(DoubleConfig::default()).await?;
    let metrics = Arc::new(Metrics::new());
    let mut target = pod_target(0);
    target.address = IpAddr::V4(address);
    let (_targets_tx, targets_rx) = watch::channel(Arc::new(vec![Arc::new(target.clone())]));
    let (desired_tx, desired_rx) = pipeline::desired_channel();
    let pipeline = tokio::spawn(pipeline::run(
        OWNER.into(),
        targets_rx,
        settings.clone(),
        metrics.clone(),
        desired_tx,
    ));
    let sink = tokio::spawn(consul_sink(&double, metrics)?.run(desired_rx));
    // The first sweep (nothing open) writes the node; then the target is in the fast cadence.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bound = settings.interval * 3 + Duration::from_secs(5);
    let mut rng = Lcg(seed);
    let mut latencies = Vec::with_capacity(samples);
    let mut missed = 0;
    for k in 0..samples {
        let port = if any_port {
            FIRST_PORT + (k % RANGE_PORTS as usize) as u16
        } else {
            FIRST_PORT
        };
        let id = instance_id(OWNER, SERVICE, &address.to_string(), port);
        tokio::time::sleep(jitter.mul_f64(rng.next_fraction())).await;
        let server = serve_metrics(SocketAddr::new(IpAddr::V4(address), port)).await?;
        match wait_for(&double, &id, true, bound).await {
            Some(latency) => latencies.push(latency.as_secs_f64()),
            None => missed += 1,
        }
        server.abort();
        let _ = server.await;
        if wait_for(&double, &id, false, bound).await.is_none() {
            bail!("entry {id} not removed within {bound:?}");
        }
        tokio::time::sleep(settle).await;
    }
    pipeline.abort();
    sink.abort();
    double.shutdown().await;
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, missed))
}

async fn latency_scenario(args: &Args) -> anyhow::Result<()> {
    let fast = ProbeSettings {
        timeout: args.timeout,
        ..ProbeSettings::default()
    };
    let (lat, missed) = latency_run(
        fast.clone(),
        args.samples,
        Duration::ZERO,
        fast.fast_interval,
        1,
        false,
    )
    .await?;
    let report = |name: &str, s: &ProbeSettings, lat: &[f64], missed: usize| {
        println!(
            "|{name}|{:?}|{:?}|{:?}|{}|{:.3}|{:.3}|{:.3}|{missed}|",
            s.interval,
            s.fast_interval,
            s.fast_period,
            lat.len(),
            percentile(lat, 50.0),
            percentile(lat, 99.0),
            lat.last().copied().unwrap_or(f64::NAN),
        )
    };
    println!("|cadence|interval|fast interval|fast period|samples|p50 s|p99 s|max s|missed|");
    report("fast, first-free port", &fast, &lat, missed);
    // Any port of the range: found at this speed only with every sweep full.
    let full = ProbeSettings {
        full_sweep_interval: Duration::ZERO,
        ..fast.clone()
    };
    let (lat, missed) = latency_run(
        full.clone(),
        args.samples,
        Duration::ZERO,
        full.fast_interval,
        3,
        true,
    )
    .await?;
    report(
        "fast, any port, --full-sweep-interval 0s",
        &full,
        &lat,
        missed,
    );
    // Steady state: a short fast window, then wait it out (plus the first slow sleep's phase
    // offset) before each opening, at a random point of the interval.
    let steady = ProbeSettings {
        interval: args.steady_interval,
        timeout: args.timeout,
        fast_period: Duration::from_secs(1),
        ..ProbeSettings::default()
    };
    let settle = steady.fast_period + steady.interval * 2;
    let (lat, missed) = latency_run(
        steady.clone(),
        args.steady_samples,
        settle,
        steady.interval,
        2,
        false,
    )
    .await?;
    report("steady, first-free port", &steady, &lat, missed);
    Ok(())
}
