use super::http::tests::{METRICS_OK, serve};
use super::sweeper::TargetHolds;
use super::*;
use crate::model::PortRange;
use crate::model::Scheme;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

#[tokio::test]
async fn prober_reports_live_ports_and_follows_changes() {
    // Metrics on `a`; `b` is the port just above it (free now, opened later). Adjacent, so
    // no closed port lies between them (a frontier sweep would skip `b`, rightly).
    let mut pair = None;
    for _ in 0..50 {
        let a = serve(METRICS_OK).await;
        let above = SocketAddr::new(a.ip(), a.port().wrapping_add(1));
        if above.port() != 0 && TcpListener::bind(above).await.is_ok() {
            pair = Some((a, above));
            break;
        }
    }
    let (a, b) = pair.expect("a free port just above a metrics port, in 50 tries");
    let (lo, hi) = (a.port(), b.port());
    let target = Target {
        id: TargetId::new("t"),
        service: "svc".into(),
        address: a.ip(),
        ports: PortRange::new(lo, hi).unwrap(),
        path: "/metrics".into(),
        scheme: Scheme::Http,
        tags: vec![],
        meta: BTreeMap::new(),
        revision: 0,
        probe_interval: None,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let settings = ProbeSettings {
        fast_interval: Duration::from_millis(50),
        ..ProbeSettings::default()
    };
    let mut prober = Prober::new(settings, Arc::new(Metrics::new()), tx);
    prober.sync(&[Arc::new(target.clone())]);
    let first = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.live.contains(&a.port()));
    assert!(!first.live.contains(&b.port()));
    assert_eq!(Some(first.generation), prober.generation(&target.id));

    // The second port comes alive: reported at the fast cadence.
    let b_listener = TcpListener::bind(b).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = b_listener.accept().await {
            let _ = stream.read(&mut [0u8; 1024]).await;
            let _ = stream.write_all(METRICS_OK.as_bytes()).await;
        }
    });
    let second = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(second.live.contains(&a.port()) && second.live.contains(&b.port()));

    // A changed spec restarts the loop under a new generation; removal stops it.
    let mut changed = target.clone();
    changed.tags.push("new".into());
    prober.sync(&[Arc::new(changed)]);
    let third = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(third.generation > second.generation);
    prober.sync(&[]);
    assert_eq!(prober.generation(&target.id), None);
}

/// A metrics endpoint on `addr` until the returned handle is aborted and awaited, which
/// closes its connections too, as a worker's exit does.
async fn open(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    serve_worker(addr, Server::default()).await
}

/// How a test worker's metrics server treats its connections.
#[derive(Clone, Default)]
struct Server {
    /// Counts the connections accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Handles one connection at a time, like a single-threaded `wsgiref` or
    /// `http.server` one: a connection that sends nothing blocks it.
    one_at_a_time: bool,
    /// Closes a connection that sends nothing for this long.
    idle_close: Option<Duration>,
    /// The connection (counted from 1) whose answer waits 1.5 s, past the probe timeout.
    slow_connection: Option<usize>,
}

async fn serve_worker(addr: SocketAddr, server: Server) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let number = 1 + server
                .accepted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let delay =
                (server.slow_connection == Some(number)).then_some(Duration::from_millis(1500));
            let answer = answer(stream, server.idle_close, delay);
            if server.one_at_a_time {
                answer.await;
            } else {
                connections.spawn(answer);
            }
        }
    })
}

async fn answer(mut stream: TcpStream, idle_close: Option<Duration>, delay: Option<Duration>) {
    let mut request = [0u8; 1024];
    let idle = idle_close.unwrap_or(Duration::from_secs(3600));
    if matches!(timeout(idle, stream.read(&mut request)).await, Ok(Ok(n)) if n > 0) {
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let _ = stream.write_all(METRICS_OK.as_bytes()).await;
    }
}

/// Settings with holds on, an immediate first sweep and then nothing for `quiet` but
/// sweeps woken by an ended hold.
fn holding_settings(fast_period: Duration) -> ProbeSettings {
    ProbeSettings {
        interval: Duration::from_secs(60),
        timeout: Duration::from_millis(300),
        fast_interval: Duration::from_millis(50),
        fast_period,
        holds: 64,
        ..ProbeSettings::default()
    }
}

async fn next_report(rx: &mut mpsc::Receiver<ProbeReport>, within: Duration) -> ProbeReport {
    timeout(within, rx.recv()).await.unwrap().unwrap()
}

#[tokio::test]
async fn held_workers_are_not_reconnected_and_their_exit_is_noticed_at_once() {
    let target = six_ports(5);
    let at = |port| SocketAddr::new(target.address, port);
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = Server {
        accepted: accepted.clone(),
        ..Server::default()
    };
    let worker = serve_worker(at(9011), server).await;
    let (tx, mut rx) = mpsc::channel(16);
    let metrics = Arc::new(Metrics::new());
    let mut prober = Prober::new(
        holding_settings(Duration::from_millis(600)),
        metrics.clone(),
        tx,
    );
    prober.sync(&[Arc::new(target.clone())]);
    let first = next_report(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(first.live, ports(&[9011]));

    // ~12 fast sweeps: the held worker is not connected to again (hold + verify only).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(metrics.encode().contains("workersd_held_connections 1"));

    // Now at the 60 s interval: the worker's exit is still reported at once.
    let started = Instant::now();
    close(worker).await;
    let gone = next_report(&mut rx, Duration::from_secs(5)).await;
    assert!(gone.live.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(metrics.encode().contains("workersd_held_connections 0"));
}

#[tokio::test]
async fn a_server_that_handles_one_connection_at_a_time_is_not_held() {
    let target = six_ports(6);
    let addr = SocketAddr::new(target.address, 9011);
    let _worker = serve_worker(addr, one_at_a_time()).await;
    let (tx, mut rx) = mpsc::channel(16);
    let metrics = Arc::new(Metrics::new());
    let settings = holding_settings(Duration::from_secs(5));
    let mut prober = Prober::new(settings, metrics.clone(), tx);
    prober.sync(&[Arc::new(target.clone())]);
    let first = next_report(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(first.live, ports(&[9011]));
    // Later sweeps (every 50 ms) do not hold it either, so Prometheus can still scrape it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(metrics.encode().contains("workersd_held_connections 0"));
    assert_eq!(
        verify(addr, "/metrics", Scheme::Http, Duration::from_secs(1)).await,
        PortStatus::Live
    );
}

#[tokio::test(flavor = "current_thread")]
async fn events_of_a_sweep_carry_the_target_id_from_the_sweepers_span() {
    let (captured, _default) = crate::fixtures::CapturedLogs::json_default();
    let target = six_ports(10);
    let _worker = serve_worker(SocketAddr::new(target.address, 9011), one_at_a_time()).await;
    let (tx, mut rx) = mpsc::channel(16);
    let mut prober = Prober::new(
        holding_settings(Duration::from_secs(5)),
        Arc::new(Metrics::new()),
        tx,
    );
    prober.sync(&[Arc::new(target.clone())]);
    next_report(&mut rx, Duration::from_secs(5)).await;
    let logs = captured.text();
    let line = logs
        .lines()
        .find(|line| line.contains("answered only once"))
        .unwrap_or_else(|| panic!("no hold pause logged in {logs}"));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["span"]["name"], "sweeper", "{line}");
    assert_eq!(event["span"]["target_id"], "t", "{line}");
    assert_eq!(
        event["target"], "workersd::probe::sweeper",
        "tracing's own key: {line}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn targets_whose_holds_pause_together_are_logged_once_not_once_each() {
    let (captured, _default) = crate::fixtures::CapturedLogs::json_default();
    let mut workers = Vec::new();
    let mut targets = Vec::new();
    for host in 30..35 {
        let target = Target {
            id: TargetId::new(format!("t{host}")),
            ..six_ports(host)
        };
        workers.push(serve_worker(SocketAddr::new(target.address, 9011), one_at_a_time()).await);
        targets.push(Arc::new(target));
    }
    let (tx, mut rx) = mpsc::channel(16);
    let mut prober = Prober::new(
        holding_settings(Duration::from_secs(5)),
        Arc::new(Metrics::new()),
        tx,
    );
    prober.sync(&targets);
    for _ in &targets {
        next_report(&mut rx, Duration::from_secs(5)).await;
    }
    let logs = captured.text();
    let paused = logs
        .lines()
        .filter(|l| l.contains("answered only once"))
        .count();
    assert_eq!(
        paused, 1,
        "one line for the first, the others summarized later: {logs}"
    );
}

#[tokio::test]
async fn a_port_whose_hold_ended_is_reconnected_until_the_next_full_sweep() {
    let target = six_ports(7);
    let addr = SocketAddr::new(target.address, 9011);
    let server = Server {
        idle_close: Some(Duration::from_millis(100)),
        ..Server::default()
    };
    let _worker = serve_worker(addr, server).await;
    let mut holding = TargetHolds::new(holds(16));
    let owner = holding.owner.clone();
    let (state, held) = sweep_holding(&target, &mut holding, SweepKind::Full, None).await;
    assert_eq!((state.live.clone(), held), (ports(&[9011]), 1));

    timeout(Duration::from_secs(5), owner.wait())
        .await
        .expect("the server closes the idle hold");
    let (state, held) =
        sweep_holding(&target, &mut holding, SweepKind::Frontier, Some(&state)).await;
    assert_eq!(
        (state.live.clone(), held),
        (ports(&[9011]), 0),
        "reconnected, not held"
    );
    let (state, held) = sweep_holding(&target, &mut holding, SweepKind::Full, Some(&state)).await;
    assert_eq!((state.live, held), (ports(&[9011]), 1), "held again");
}

#[tokio::test]
async fn holding_a_target_that_blocked_is_retried_at_growing_full_sweep_intervals() {
    let target = six_ports(8);
    let addr = SocketAddr::new(target.address, 9011);
    let _worker = serve_worker(addr, one_at_a_time()).await;
    let mut holding = TargetHolds::new(holds(16));
    let mut state = RangeState::default();
    let mut held_at_full = Vec::new();
    for kind in [
        SweepKind::Full,
        SweepKind::Frontier,
        SweepKind::Full, // retried, blocks again: now two full sweeps off
        SweepKind::Full,
        SweepKind::Frontier,
    ] {
        let (now, held) = sweep_holding(&target, &mut holding, kind, Some(&state)).await;
        assert_eq!((now.live.clone(), held), (ports(&[9011]), 0), "{kind:?}");
        held_at_full.push((holding.strikes, holding.paused_sweeps));
        state = now;
    }
    assert_eq!(held_at_full, [(1, 1), (1, 1), (2, 2), (2, 1), (2, 1)]);
    assert_eq!(
        verify(addr, "/metrics", Scheme::Http, Duration::from_secs(1)).await,
        PortStatus::Live,
        "never left holding the server"
    );
}

#[tokio::test]
async fn a_worker_that_was_only_slow_is_held_from_the_next_full_sweep() {
    let target = six_ports(9);
    let addr = SocketAddr::new(target.address, 9011);
    // The first request waits past the probe timeout (a loaded worker); later ones do not.
    // The first connection is the hold, the second the first request.
    let server = Server {
        slow_connection: Some(2),
        ..Server::default()
    };
    let _worker = serve_worker(addr, server).await;
    let mut holding = TargetHolds::new(holds(16));
    let (state, held) = sweep_holding(&target, &mut holding, SweepKind::Full, None).await;
    assert_eq!(
        (state.live.clone(), held, holding.strikes),
        (ports(&[9011]), 0, 1)
    );
    let (state, held) = sweep_holding(&target, &mut holding, SweepKind::Full, Some(&state)).await;
    assert_eq!((state.live, held), (ports(&[9011]), 1));
}

fn one_at_a_time() -> Server {
    Server {
        one_at_a_time: true,
        ..Server::default()
    }
}

fn holds(capacity: usize) -> Arc<Holds> {
    Holds::start(capacity, Duration::from_secs(60), Duration::from_secs(1)).unwrap()
}

/// One sweep as a sweeper with holds runs it; the new state and the ports held after it.
async fn sweep_holding(
    target: &Target,
    holding: &mut TargetHolds,
    kind: SweepKind,
    previous: Option<&RangeState>,
) -> (RangeState, usize) {
    let (limiter, metrics) = (Semaphore::new(4), Metrics::new());
    holding.collect_ended(kind);
    let plan = holding.holding();
    let swept = sweep_target(
        target,
        previous.unwrap_or(&RangeState::default()),
        kind,
        plan.as_ref(),
        &limiter,
        Duration::from_secs(1),
        &metrics,
    )
    .await;
    let state = holding.adopt(swept, &target.id, &metrics);
    (state, holding.held.len())
}

async fn close(worker: tokio::task::JoinHandle<()>) {
    worker.abort();
    let _ = worker.await;
}

/// A range of six ports on an address of its own, so tests do not collide.
fn six_ports(host: u8) -> Target {
    Target {
        id: TargetId::new("t"),
        service: "svc".into(),
        address: std::net::IpAddr::from([127, 93, 0, host]),
        ports: PortRange::new(9011, 9016).unwrap(),
        path: "/metrics".into(),
        scheme: Scheme::Http,
        tags: vec![],
        meta: BTreeMap::new(),
        revision: 0,
        probe_interval: None,
    }
}

async fn sweep_of(target: &Target, previous: &RangeState, kind: SweepKind) -> RangeState {
    // Fewer permits than ports: probes wait their turn while others run.
    let (limiter, metrics) = (Semaphore::new(2), Metrics::new());
    sweep_target(
        target,
        previous,
        kind,
        None,
        &limiter,
        Duration::from_secs(2),
        &metrics,
    )
    .await
    .state
}

fn ports(list: &[u16]) -> BTreeSet<u16> {
    list.iter().copied().collect()
}

#[tokio::test]
async fn frontier_sweeps_skip_closed_ports_above_the_lowest_until_a_full_sweep() {
    let target = six_ports(1);
    let at = |port| SocketAddr::new(target.address, port);
    let _w1 = open(at(9011)).await;
    let _w2 = open(at(9012)).await;
    let known = sweep_of(&target, &RangeState::default(), SweepKind::Frontier).await;
    assert_eq!(known.live, ports(&[9011, 9012]));
    assert_eq!(known.closed, ports(&[9013, 9014, 9015, 9016]));

    // Not first-free: 9015 opens while 9013 stays closed. Only a full sweep looks there.
    let _w5 = open(at(9015)).await;
    let frontier = sweep_of(&target, &known, SweepKind::Frontier).await;
    assert_eq!(frontier, known);
    let full = sweep_of(&target, &known, SweepKind::Full).await;
    assert_eq!(full.live, ports(&[9011, 9012, 9015]));
    assert_eq!(full.closed, ports(&[9013, 9014, 9016]));
}

#[tokio::test]
async fn an_opened_frontier_port_probes_the_rest_of_the_range_at_once() {
    let target = six_ports(2);
    let at = |port| SocketAddr::new(target.address, port);
    let _w1 = open(at(9011)).await;
    let known = sweep_of(&target, &RangeState::default(), SweepKind::Full).await;
    assert_eq!(known.live, ports(&[9011]));
    // Three workers start together: 9012 (the frontier), 9013 and 9014.
    let _w = [
        open(at(9012)).await,
        open(at(9013)).await,
        open(at(9014)).await,
    ];
    let now = sweep_of(&target, &known, SweepKind::Frontier).await;
    assert_eq!(now.live, ports(&[9011, 9012, 9013, 9014]));
    assert_eq!(now.closed, ports(&[9015, 9016]));
}

#[tokio::test]
async fn a_dead_worker_frees_the_lowest_port_which_becomes_the_frontier() {
    let target = six_ports(3);
    let at = |port| SocketAddr::new(target.address, port);
    let w1 = open(at(9011)).await;
    let _w2 = open(at(9012)).await;
    let known = sweep_of(&target, &RangeState::default(), SweepKind::Full).await;
    assert_eq!(known.live, ports(&[9011, 9012]));
    // Recycled by --max-requests: 9011 dies, its replacement takes 9011 again.
    close(w1).await;
    let dead = sweep_of(&target, &known, SweepKind::Frontier).await;
    assert_eq!(dead.live, ports(&[9012]));
    assert_eq!(dead.closed.first(), Some(&9011));
    let _w1 = open(at(9011)).await;
    let back = sweep_of(&target, &dead, SweepKind::Frontier).await;
    assert_eq!(back.live, ports(&[9011, 9012]));
}

#[test]
fn a_sweep_waiting_for_permits_is_a_small_future() {
    let target = six_ports(4);
    let (previous, limiter, metrics) = (RangeState::default(), Semaphore::new(1), Metrics::new());
    let waiting = sweep_target(
        &target,
        &previous,
        SweepKind::Full,
        None,
        &limiter,
        Duration::from_secs(1),
        &metrics,
    );
    let in_flight = verify(
        SocketAddr::new(target.address, 9011),
        "/metrics",
        Scheme::Http,
        Duration::from_secs(1),
    );
    // A probe in flight is large; a whole sweep waiting for its turn is not.
    assert!(std::mem::size_of_val(&in_flight) > 2048);
    assert!(
        std::mem::size_of_val(&waiting) <= 1024,
        "{} bytes",
        std::mem::size_of_val(&waiting)
    );
}
