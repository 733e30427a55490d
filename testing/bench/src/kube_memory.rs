//! `kube-memory`: one release `workersd kubernetes` (no leader election) against the fake API
//! server with N pods; sync time, memory and steady CPU.

use crate::kube::{
    FakeKube, PODS_PER_NAMESPACE, free_port, http_get, metric, proc_cpu_secs, proc_mb, wait_synced,
    workersd_binary, workersd_kubernetes,
};
use crate::{Args, Children, live_per_pod, start_pods};
use anyhow::Context;
use consul_double::{Config as DoubleConfig, ConsulDouble};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub async fn kube_scenario(args: &Args) -> anyhow::Result<()> {
    let binary = workersd_binary(args)?;
    println!(
        "|pods|namespaces|live endpoints|held connections|sync s|VmHWM MB|VmRSS MB after sync|VmRSS MB end|CPU % of a core ({:?}, interval 10s)|in that window: probes live / refused|Consul node reads / blocking watches / txns|",
        args.measure
    );
    for &n in &args.pods {
        let pods = start_pods(n)?;
        let double = ConsulDouble::start(DoubleConfig::default()).await?;
        let mut children = Children::default();
        let kube = FakeKube::load(&mut children, "kube", n, None)?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let started = Instant::now();
        let workersd = workersd_kubernetes(&binary, &kube, &double, listen, args.kube_fast_period)
            .args(["--leader-election", "false"])
            .spawn()?;
        let pid = workersd.id();
        children.0.push(workersd);
        let expected = n * live_per_pod() as usize;
        // Synced: every pod is a target, probed once, and Consul holds every endpoint.
        let sync = wait_synced(
            &[listen],
            &double,
            expected,
            started,
            Duration::from_secs(300),
        )
        .await?;
        let rss_sync = proc_mb(pid, "VmRSS:");
        let (_, body) = http_get(listen, "/metrics").await?;
        let live = metric(&body, "workersd_live_endpoints").unwrap_or(-1.0);
        // Leave the fast cadence (--fast-period after each target's start) and the first
        // phase-offset slow sleep (up to one interval) behind before measuring.
        let settle = args.kube_settle.unwrap_or(args.kube_fast_period + 12);
        tokio::time::sleep(Duration::from_secs(settle)).await;
        let (_, before) = http_get(listen, "/metrics").await?;
        double.reset_stats();
        let cpu0 = proc_cpu_secs(pid).context("workersd exited")?;
        let t0 = Instant::now();
        tokio::time::sleep(args.measure).await;
        let cpu1 = proc_cpu_secs(pid).context("workersd exited")?;
        let consul = double.stats();
        let (_, after) = http_get(listen, "/metrics").await?;
        let probes = |result: &str| {
            let name = format!("workersd_probes_total{{result=\"{result}\"}}");
            metric(&after, &name).unwrap_or(0.0) - metric(&before, &name).unwrap_or(0.0)
        };
        let reads_all = consul.requests_matching("GET /v1/catalog/node-services");
        let window = format!(
            "{} / {} | {} / {} / {}",
            probes("live"),
            probes("refused"),
            reads_all - consul.blocking_queries,
            consul.blocking_queries,
            consul.requests_matching("PUT /v1/txn"),
        );
        let cpu_pct = 100.0 * (cpu1 - cpu0) / t0.elapsed().as_secs_f64();
        let hwm = proc_mb(pid, "VmHWM:");
        let rss_end = proc_mb(pid, "VmRSS:");
        let (_, body) = http_get(listen, "/metrics").await?;
        let held = metric(&body, "workersd_held_connections").unwrap_or(-1.0);
        println!(
            "|{n}|{}|{live}|{held}|{sync:.1}|{hwm:.1}|{rss_sync:.1}|{rss_end:.1}|{cpu_pct:.1}|{window}|",
            n.div_ceil(PODS_PER_NAMESPACE)
        );
        drop(children);
        drop(kube);
        drop(pods);
        double.shutdown().await;
    }
    Ok(())
}
