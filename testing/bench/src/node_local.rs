//! `node-local`: N Nodes with P pods each on the fake API server and one release `workersd
//! kubernetes --node-name node-k` per node (a DaemonSet), all writing to one Consul double.
//! Measured: start-up time, per-instance CPU and memory in a steady window (the janitor, the
//! Lease holder, apart from the others), the API server's requests by verb and resource during
//! start-up and the window, its open watches by resource, and Consul's requests in the window.

use crate::kube::{
    FakeKube, free_port, http_get, http_json, load_average, metric, proc_cpu_secs, proc_mb,
    wait_synced, workersd_binary, workersd_kubernetes,
};
use crate::{Args, Children, live_per_pod, start_pods_by};
use anyhow::Context;
use consul_double::{Config as DoubleConfig, ConsulDouble};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The Lease every instance competes for (workersd's default `--lease-name`).
const LEASE: &str = "workersd";

struct Instance {
    identity: String,
    listen: SocketAddr,
    pid: u32,
}

/// The API server's request counts since the last reset: by "verb resource", plus what it
/// counts by path only (discovery, /version) as "other".
async fn api_requests(kube: &FakeKube) -> anyhow::Result<BTreeMap<String, u64>> {
    let reply = http_json(kube.addr, "GET", "/_control/requests").await?;
    let mut counts: BTreeMap<String, u64> = reply["byVerb"]
        .as_object()
        .context("byVerb")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let total = reply["total"].as_u64().unwrap_or(0);
    let other = total.saturating_sub(counts.values().sum());
    if other > 0 {
        counts.insert("other (discovery, version)".into(), other);
    }
    Ok(counts)
}

/// Open watches by resource.
async fn api_watches(kube: &FakeKube) -> anyhow::Result<BTreeMap<String, u64>> {
    let reply = http_json(kube.addr, "GET", "/_control/watches").await?;
    let mut counts = BTreeMap::new();
    for watch in reply["watches"].as_array().context("watches")? {
        let resource = watch["resource"].as_str().unwrap_or("?").to_string();
        *counts.entry(resource).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The Lease's holderIdentity, read through the control API (not counted as a request).
async fn lease_holder(kube: &FakeKube) -> anyhow::Result<Option<String>> {
    let state = http_json(kube.addr, "GET", "/_control/state?resource=leases").await?;
    let holder = state["storages"]
        .as_object()
        .into_iter()
        .flat_map(|stores| stores.values())
        .filter_map(|store| store["objects"].as_array())
        .flatten()
        .find(|lease| lease["metadata"]["name"] == LEASE)
        .and_then(|lease| lease["spec"]["holderIdentity"].as_str())
        .map(str::to_string);
    Ok(holder)
}

/// Every instance's /metrics.
async fn scrape(instances: &[Instance]) -> anyhow::Result<Vec<String>> {
    let mut bodies = Vec::with_capacity(instances.len());
    for instance in instances {
        bodies.push(http_get(instance.listen, "/metrics").await?.1);
    }
    Ok(bodies)
}

fn total(counts: &BTreeMap<String, u64>) -> u64 {
    counts.values().sum()
}

/// "a 3, b 1" by count, largest first.
fn breakdown(counts: &BTreeMap<String, u64>) -> String {
    let mut pairs: Vec<_> = counts.iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// "mean / max" of the values, or "-" when there are none.
fn mean_max(values: &[f64], decimals: usize) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    format!("{mean:.decimals$} / {max:.decimals$}")
}

pub async fn node_local_scenario(args: &Args) -> anyhow::Result<()> {
    let binary = workersd_binary(args)?;
    let settle = args.kube_settle.unwrap_or(args.kube_fast_period + 12);
    println!(
        "# {} pods per node, {} live of 10 ports each, --probe-interval 10s, --fast-period {}s, settle {settle} s, window {:?}",
        args.pods_per_node,
        live_per_pod(),
        args.kube_fast_period,
        args.measure
    );
    let mut rows = Vec::new();
    for &nodes in &args.nodes {
        rows.push(run(args, &binary, nodes, settle).await?);
    }
    println!("# table");
    println!(
        "|nodes|pods|live endpoints|sync s|janitor CPU % of a core|janitor VmHWM / VmRSS MB|other instances CPU % mean / max|others VmHWM MB mean / max|others VmRSS MB mean / max|API requests at start-up (per instance)|API requests in the window per minute (per instance)|open watches (per instance)|Consul requests in the window per minute (per instance)|load 1 min before / after the window|"
    );
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

async fn run(
    args: &Args,
    binary: &std::path::Path,
    nodes: usize,
    settle: u64,
) -> anyhow::Result<String> {
    let n = nodes * args.pods_per_node;
    println!("## {nodes} nodes, {n} pods");
    // One pod server per node: fewer descriptors per process than `start_pods`' 2,000 pods
    // (listeners, held connections and every instance's probes in flight at the start).
    let pods = start_pods_by(n, args.pods_per_node)?;
    let double = ConsulDouble::start(DoubleConfig::default()).await?;
    let mut children = Children::default();
    let loading = Instant::now();
    let kube = FakeKube::load(&mut children, "node-local", n, Some(args.pods_per_node))?;
    println!(
        "  loaded {nodes} Nodes and {n} pods in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    http_json(kube.addr, "POST", "/_control/requests/reset").await?;
    let started = Instant::now();
    // Stopped before the API server, so no instance logs its disappearance.
    let mut running = Children::default();
    let mut instances = Vec::with_capacity(nodes);
    for k in 0..nodes {
        let identity = format!("workersd-node-{k}");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = workersd_kubernetes(binary, &kube, &double, listen, args.kube_fast_period)
            .args(["--node-name", &format!("node-{k}"), "--identity", &identity])
            .spawn()?;
        instances.push(Instance {
            identity,
            listen,
            pid: child.id(),
        });
        running.0.push(child);
    }
    let listens: Vec<SocketAddr> = instances.iter().map(|i| i.listen).collect();
    let expected = n * live_per_pod() as usize;
    let sync = wait_synced(
        &listens,
        &double,
        expected,
        started,
        Duration::from_secs(300),
    )
    .await?;
    let startup = api_requests(&kube).await?;
    let startup_consul = double.stats();
    let at_sync = scrape(&instances).await?;
    let timed_out: f64 = at_sync
        .iter()
        .map(|m| metric(m, "workersd_probes_total{result=\"timeout\"}").unwrap_or(0.0))
        .sum();
    println!(
        "  synced in {sync:.1} s: every instance ready, Consul holds {expected} entries; {timed_out} probes timed out meanwhile"
    );
    println!("  API requests at start-up: {}", breakdown(&startup));
    println!(
        "  Consul requests at start-up: {}",
        breakdown(&startup_consul.requests)
    );

    // Out of the fast cadence and the first phase-offset slow sleep before measuring.
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let load_before = load_average();
    let before = scrape(&instances).await?;
    http_json(kube.addr, "POST", "/_control/requests/reset").await?;
    double.reset_stats();
    let cpu0: Vec<f64> = instances
        .iter()
        .map(|i| proc_cpu_secs(i.pid).context("an instance exited"))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    tokio::time::sleep(args.measure).await;
    let cpu1: Vec<f64> = instances
        .iter()
        .map(|i| proc_cpu_secs(i.pid).context("an instance exited"))
        .collect::<Result<_, _>>()?;
    let window = t0.elapsed().as_secs_f64();
    let steady = api_requests(&kube).await?;
    let consul = double.stats();
    let watches = api_watches(&kube).await?;
    let load_after = load_average();
    let holder = lease_holder(&kube).await?;
    let janitor = instances
        .iter()
        .position(|i| Some(&i.identity) == holder.as_ref());

    let mut live = 0.0;
    let mut held = 0.0;
    let (mut refused, mut timeouts) = (0.0, 0.0);
    let (mut cpu, mut hwm, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let mut janitor_cell = ("-".to_string(), "-".to_string());
    let after = scrape(&instances).await?;
    for (k, instance) in instances.iter().enumerate() {
        let after = &after[k];
        live += metric(after, "workersd_live_endpoints").unwrap_or(0.0);
        held += metric(after, "workersd_held_connections").unwrap_or(0.0);
        let probes = |result: &str| {
            let name = format!("workersd_probes_total{{result=\"{result}\"}}");
            metric(after, &name).unwrap_or(0.0) - metric(&before[k], &name).unwrap_or(0.0)
        };
        refused += probes("refused");
        timeouts += probes("timeout");
        let pct = 100.0 * (cpu1[k] - cpu0[k]) / window;
        let (h, r) = (
            proc_mb(instance.pid, "VmHWM:"),
            proc_mb(instance.pid, "VmRSS:"),
        );
        println!(
            "  {}{}: CPU {pct:.2} % of a core, VmHWM {h:.1} MB, VmRSS {r:.1} MB",
            instance.identity,
            if Some(k) == janitor { " (janitor)" } else { "" }
        );
        if Some(k) == janitor {
            janitor_cell = (format!("{pct:.2}"), format!("{h:.1} / {r:.1}"));
        } else {
            cpu.push(pct);
            hwm.push(h);
            rss.push(r);
        }
    }
    let per_minute = 60.0 / window;
    println!(
        "  in the window ({window:.0} s): {live} live endpoints, {held} held connections, {refused} refused and {timeouts} timed-out probes over all instances; Lease held by {}",
        holder.as_deref().unwrap_or("nobody")
    );
    println!("  API requests in the window: {}", breakdown(&steady));
    println!("  open watches at the end: {}", breakdown(&watches));
    println!(
        "  Consul requests in the window: {} (blocking: {})",
        breakdown(&consul.requests),
        consul.blocking_queries
    );
    println!("  load average (1 min): {load_before} before, {load_after} after the window");
    let per = |count: u64| count as f64 / nodes as f64;
    let consul_total: u64 = consul.requests.values().sum();
    let row = format!(
        "|{nodes}|{n}|{live}|{sync:.1}|{}|{}|{}|{}|{}|{} ({:.1})|{:.0} ({:.1})|{} ({:.1})|{:.0} ({:.1})|{load_before} / {load_after}|",
        janitor_cell.0,
        janitor_cell.1,
        mean_max(&cpu, 2),
        mean_max(&hwm, 1),
        mean_max(&rss, 1),
        total(&startup),
        per(total(&startup)),
        total(&steady) as f64 * per_minute,
        per(total(&steady)) * per_minute,
        total(&watches),
        per(total(&watches)),
        consul_total as f64 * per_minute,
        per(consul_total) * per_minute,
    );
    drop(running);
    drop(children);
    drop(kube);
    drop(pods);
    double.shutdown().await;
    Ok(row)
}
