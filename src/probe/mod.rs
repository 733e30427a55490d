//! The prober: finds which ports of each target's range are live metrics endpoints.
//!
//! One lightweight task per target sweeps its range concurrently under a global limit. A
//! port counts as live once it answered `GET <path>` with 200 and a Prometheus content type;
//! while it stays up, it is held (below) or only reconnected, so workers are not scraped
//! twice. New, changed or changing targets are swept at a fast cadence for a while so ramping
//! or recycled workers are published within about a second.
//!
//! Workers take the first free port of their range, so a new worker always appears on the
//! lowest closed port. Between full sweeps (`full_sweep_interval`) a sweep therefore skips
//! the closed ports above the lowest one; when that one opens, the rest of the range is probed
//! in the same sweep. Each probe is a kernel TCP handshake on both ends, so ports not probed
//! are the only real saving (see BENCHMARKS.md).
//!
//! With holds on (the default), a live worker is not reconnected at all: workersd keeps one
//! idle connection to it and hears at once when it closes ([`hold`]). A port whose hold ended
//! is reconnected each sweep until the next full sweep holds it again, so a worker server
//! that drops idle connections costs no more than without holds.

mod hold;

pub use hold::{Ended, HoldId, Holds};

use crate::metrics::Metrics;
use crate::model::{Scheme, Target, TargetId};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout};

/// Response headers larger than this are not a metrics endpoint we recognise.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
    pub fast_interval: Duration,
    pub fast_period: Duration,
    /// How often every port is probed; in between, closed ports above the lowest closed one
    /// are skipped. Zero: every sweep is full.
    pub full_sweep_interval: Duration,
    /// Most connections held to live workers (file descriptors). Zero: none, every sweep
    /// reconnects to every live worker.
    pub holds: usize,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            concurrency: 512,
            fast_interval: Duration::from_millis(500),
            fast_period: Duration::from_secs(30),
            full_sweep_interval: Duration::from_secs(60),
            holds: 0,
        }
    }
}

/// The live ports of one target after a completed sweep. The first sweep of every target
/// generation is always reported; later ones only when the set changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    pub target: TargetId,
    pub generation: u64,
    pub live: BTreeSet<u16>,
}

/// What the previous sweep of a target found; the next sweep starts from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeState {
    /// Verified metrics endpoints: later sweeps only TCP-connect them.
    pub live: BTreeSet<u16>,
    /// Ports whose latest probe was refused (or that were skipped since).
    pub closed: BTreeSet<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepKind {
    /// Every port of the range.
    Full,
    /// Every port except the closed ones above the lowest closed port, unless that one opened.
    Frontier,
}

/// Why a port is or is not a live worker; also the `result` label of the probe counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortStatus {
    Live,
    Refused,
    Timeout,
    HttpStatus,
    ContentType,
    Malformed,
    TlsHandshake,
}

impl PortStatus {
    pub fn label(self) -> &'static str {
        match self {
            PortStatus::Live => "live",
            PortStatus::Refused => "refused",
            PortStatus::Timeout => "timeout",
            PortStatus::HttpStatus => "http_status",
            PortStatus::ContentType => "content_type",
            PortStatus::Malformed => "malformed",
            PortStatus::TlsHandshake => "tls_handshake",
        }
    }
}

struct Running {
    target: Arc<Target>,
    generation: u64,
    task: AbortHandle,
}

/// Owns one sweep loop per target and keeps them in step with the sources' snapshots.
pub struct Prober {
    settings: ProbeSettings,
    limiter: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<ProbeReport>,
    holds: Option<Arc<Holds>>,
    running: HashMap<TargetId, Running>,
    next_generation: u64,
}

impl Prober {
    pub fn new(
        settings: ProbeSettings,
        metrics: Arc<Metrics>,
        reports: mpsc::Sender<ProbeReport>,
    ) -> Self {
        let limiter = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let holds = (settings.holds > 0)
            .then(|| {
                // Keepalive notices a vanished host about when a reconnecting sweep would.
                Holds::start(settings.holds, settings.interval, settings.timeout)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "cannot hold worker connections; reconnecting every sweep instead")
                    })
                    .ok()
            })
            .flatten();
        Self {
            settings,
            limiter,
            metrics,
            reports,
            holds,
            running: HashMap::new(),
            next_generation: 1,
        }
    }

    /// Starts loops for new targets, restarts changed ones (probed at once, then fast) and
    /// stops removed ones.
    pub fn sync<'a>(&mut self, targets: impl IntoIterator<Item = &'a Arc<Target>>) {
        let wanted: HashMap<&TargetId, &Arc<Target>> =
            targets.into_iter().map(|t| (&t.id, t)).collect();
        self.running.retain(|id, running| {
            let keep = wanted.get(id).is_some_and(|t| **t == running.target);
            if !keep {
                running.task.abort();
            }
            keep
        });
        for (id, target) in wanted {
            if self.running.contains_key(id) {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let sweeper = Sweeper {
                target: target.clone(),
                generation,
                settings: self.settings.clone(),
                limiter: self.limiter.clone(),
                metrics: self.metrics.clone(),
                reports: self.reports.clone(),
                holds: self.holds.clone(),
            };
            let task = tokio::spawn(sweeper.run()).abort_handle();
            self.running.insert(
                id.clone(),
                Running {
                    target: target.clone(),
                    generation,
                    task,
                },
            );
        }
    }

    /// The generation whose reports are current for `id`; older ones are stale.
    pub fn generation(&self, id: &TargetId) -> Option<u64> {
        self.running.get(id).map(|r| r.generation)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}

struct Sweeper {
    target: Arc<Target>,
    generation: u64,
    settings: ProbeSettings,
    limiter: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    reports: mpsc::Sender<ProbeReport>,
    holds: Option<Arc<Holds>>,
}

impl Sweeper {
    async fn run(self) {
        let mut state: Option<RangeState> = None;
        let mut fast_until = Instant::now() + self.settings.fast_period;
        let mut slow_phase_applied = false;
        let mut full_sweeps = FullSweeps::new(self.settings.full_sweep_interval, Instant::now());
        let interval = self.target.probe_interval.unwrap_or(self.settings.interval);
        let mut holds = self.holds.clone().map(TargetHolds::new);
        loop {
            let started = Instant::now();
            let kind = full_sweeps.kind_at(started);
            if let Some(holds) = holds.as_mut() {
                holds.collect_ended(kind);
            }
            // Moved out, not cloned: two small trees copied per sweep showed in profiles.
            let previous = state.take();
            let fresh = RangeState::default();
            let holding = holds.as_ref().and_then(TargetHolds::holding);
            // No bound on the whole sweep: each probe is bounded once it holds a permit, and
            // the permit queue is FIFO. Discarding a slow sweep would throw away fresh results
            // and, when every sweep is slow (many timeouts), never report at all.
            // Boxed: inline, the sweep's state would size every sleeping loop (10,000 of them).
            let swept =
                Box::pin(self.sweep(previous.as_ref().unwrap_or(&fresh), kind, holding.as_ref()))
                    .await;
            let now = match holds.as_mut() {
                Some(holds) => holds.adopt(swept, &self.target.id, &self.metrics),
                None => swept.state,
            };
            let took = started.elapsed();
            if took > interval {
                self.metrics.sweep_overruns.inc();
                warn_overrun(&self.target.id, took, interval);
            }
            let changed = previous.as_ref().is_none_or(|s| s.live != now.live);
            full_sweeps.swept(kind, changed, started);
            if changed {
                if previous.is_some() {
                    // Workers are ramping or recycling: watch closely for a while.
                    fast_until = Instant::now() + self.settings.fast_period;
                }
                let report = ProbeReport {
                    target: self.target.id.clone(),
                    generation: self.generation,
                    live: now.live.clone(),
                };
                if self.reports.send(report).await.is_err() {
                    return;
                }
            }
            state = Some(now);
            let delay = if Instant::now() < fast_until {
                self.settings.fast_interval
            } else if !slow_phase_applied {
                // Spread slow sweeps of targets created together over the interval.
                slow_phase_applied = true;
                interval + phase_offset(&self.target.id, interval)
            } else {
                interval
            };
            let wake_at = on_wake_grid(Instant::now() + delay);
            match &holds {
                // A worker closed its held connection: find out why now, not next interval.
                Some(holds) => tokio::select! {
                    _ = tokio::time::sleep_until(wake_at) => {}
                    _ = holds.owner.wait() => {}
                },
                None => tokio::time::sleep_until(wake_at).await,
            }
        }
    }

    async fn sweep(
        &self,
        previous: &RangeState,
        kind: SweepKind,
        holding: Option<&Holding<'_>>,
    ) -> Swept {
        sweep_target(
            &self.target,
            previous,
            kind,
            holding,
            &self.limiter,
            self.settings.timeout,
            &self.metrics,
        )
        .await
    }
}

/// When a target's next full sweep is due. Workers take the first free port, so a worker
/// above the lowest closed one (what only a full sweep finds) comes from a start-up race
/// while workers change. Full sweeps run every `base` after a change; each one that finds
/// nothing new doubles the gap, up to [`FullSweeps::MAX_BACKOFF`] × `base`. At 10,000
/// stable pods with 4 of 10 ports live, 60 s full sweeps were 45 % of all probes.
struct FullSweeps {
    base: Duration,
    gap: Duration,
    next: Instant,
}

impl FullSweeps {
    const MAX_BACKOFF: u32 = 8;

    fn new(base: Duration, now: Instant) -> Self {
        Self {
            base,
            gap: base,
            next: now,
        }
    }

    fn kind_at(&self, now: Instant) -> SweepKind {
        if now >= self.next {
            SweepKind::Full
        } else {
            SweepKind::Frontier
        }
    }

    /// Records a sweep that started at `started` and whether it changed the live set.
    fn swept(&mut self, kind: SweepKind, changed: bool, started: Instant) {
        if changed {
            self.gap = self.base;
        }
        match kind {
            SweepKind::Full => {
                if !changed {
                    self.gap = (self.gap * 2).min(self.base * Self::MAX_BACKOFF);
                }
                self.next = started + self.gap;
            }
            SweepKind::Frontier if changed => self.next = self.next.min(started + self.base),
            SweepKind::Frontier => {}
        }
    }
}

/// A sweeper's held connections and what it learnt about holding its target's workers.
struct TargetHolds {
    holds: Arc<Holds>,
    owner: Arc<Ended>,
    held: BTreeMap<u16, HoldId>,
    /// Ports whose hold ended: reconnected each sweep until the next full sweep holds them
    /// again, so a server that closes idle connections is not reconnected in a loop.
    resting: BTreeSet<u16>,
    /// Times a worker answered only once its held connection was let go (a server that
    /// handles one connection at a time, or a timeout under load).
    strikes: u32,
    /// Full sweeps left before holding is tried again: 1, 2, 4 … 64 after each strike, so a
    /// timeout under load costs one full-sweep interval and a one-at-a-time server a
    /// probe timeout's wait at growing intervals.
    paused_sweeps: u32,
}

impl TargetHolds {
    fn new(holds: Arc<Holds>) -> Self {
        Self {
            holds,
            owner: Arc::default(),
            held: BTreeMap::new(),
            resting: BTreeSet::new(),
            strikes: 0,
            paused_sweeps: 0,
        }
    }

    /// Forgets the holds that ended (their ports are probed again) before a sweep.
    fn collect_ended(&mut self, kind: SweepKind) {
        for (port, id) in self.owner.take() {
            if self.held.get(&port) == Some(&id) {
                self.held.remove(&port);
                self.resting.insert(port);
            }
        }
        if kind == SweepKind::Full {
            self.resting.clear();
            self.paused_sweeps = self.paused_sweeps.saturating_sub(1);
        }
    }

    fn holding(&self) -> Option<Holding<'_>> {
        (self.paused_sweeps == 0).then_some(Holding {
            holds: &self.holds,
            owner: &self.owner,
            held: &self.held,
            resting: &self.resting,
            verify_held: self.strikes > 0,
        })
    }

    /// Keeps the sweep's new holds and lets go of any port that is no longer live.
    fn adopt(&mut self, swept: Swept, target: &TargetId, metrics: &Metrics) -> RangeState {
        for (port, id) in swept.held {
            if let Some(old) = self.held.insert(port, id) {
                self.holds.release(old);
            }
        }
        if swept.blocked_by_hold {
            self.strikes += 1;
            self.paused_sweeps = 1 << (self.strikes - 1).min(6);
            tracing::info!(target = %target, full_sweeps = self.paused_sweeps,
                "a worker answered only once its idle connection was closed (a metrics server \
                 that handles one connection at a time, or a slow one); reconnecting to this \
                 target's workers instead of holding them for a while");
        }
        let holds = &self.holds;
        let paused = self.paused_sweeps > 0;
        self.held.retain(|port, id| {
            let keep = !paused && swept.state.live.contains(port);
            if !keep {
                holds.release(*id);
            }
            keep
        });
        metrics.held_connections.set(holds.len() as i64);
        swept.state
    }
}

impl Drop for TargetHolds {
    fn drop(&mut self) {
        for id in self.held.values() {
            self.holds.release(*id);
        }
    }
}

/// What a sweep may do with held connections.
pub struct Holding<'a> {
    pub holds: &'a Holds,
    pub owner: &'a Arc<Ended>,
    /// Ports held now: live without a probe.
    pub held: &'a BTreeMap<u16, HoldId>,
    /// Ports not to hold in this sweep (their hold ended since the last full sweep).
    pub resting: &'a BTreeSet<u16>,
    /// Check that verified workers still answer while held, as new ones always are.
    pub verify_held: bool,
}

/// The outcome of one sweep.
#[derive(Debug, Default)]
pub struct Swept {
    pub state: RangeState,
    /// Connections this sweep started holding.
    pub held: Vec<(u16, HoldId)>,
    /// A worker answered only once its held connection was let go: its server handles one
    /// connection at a time, and holding would block its scrapes.
    pub blocked_by_hold: bool,
}

/// One sweep of `target`'s range under the shared `limiter`, starting from what the previous
/// sweep found: held ports are live without a probe, other live ports only get a TCP connect
/// (kept as a hold when `holding`), the others the full HTTP check, and a frontier sweep
/// skips known-closed ports above the lowest one unless that one opened. This is what every
/// sweep loop runs; it is public for the benchmark harness (`testing/bench`).
pub async fn sweep_target(
    target: &Target,
    previous: &RangeState,
    kind: SweepKind,
    holding: Option<&Holding<'_>>,
    limiter: &Semaphore,
    limit: Duration,
    metrics: &Metrics,
) -> Swept {
    let held = |port: &u16| holding.is_some_and(|h| h.held.contains_key(port));
    let frontier = previous.closed.first().copied();
    let (now, skipped): (Vec<u16>, Vec<u16>) = target
        .ports
        .ports()
        .filter(|port| !held(port))
        .partition(|port| {
            kind == SweepKind::Full || !previous.closed.contains(port) || Some(*port) == frontier
        });
    let probe = |ports| probe_ports(target, previous, holding, ports, limiter, limit, metrics);
    let mut results = probe(now).await;
    let frontier_opened = results
        .iter()
        .any(|p| Some(p.port) == frontier && p.status != PortStatus::Refused);
    let mut swept = Swept::default();
    if frontier_opened {
        // Several workers may have started since: look at the whole range now.
        results.extend(probe(skipped).await);
    } else {
        swept.state.closed.extend(skipped);
    }
    swept
        .state
        .live
        .extend(target.ports.ports().filter(|port| held(port)));
    for probed in results {
        match probed.status {
            PortStatus::Live => swept.state.live.insert(probed.port),
            PortStatus::Refused => swept.state.closed.insert(probed.port),
            _ => false,
        };
        swept.held.extend(probed.hold.map(|id| (probed.port, id)));
        swept.blocked_by_hold |= probed.blocked_by_hold;
    }
    swept
}

/// One port's probe.
struct Probed {
    port: u16,
    status: PortStatus,
    hold: Option<HoldId>,
    blocked_by_hold: bool,
}

impl Probed {
    fn plain(port: u16, status: PortStatus) -> Self {
        Self {
            port,
            status,
            hold: None,
            blocked_by_hold: false,
        }
    }
}

/// Probes `ports` of `target`, taking permits one at a time from the shared first-come
/// `limiter` while earlier probes run. A sweep waiting for its turn is one small waiter, not
/// one per port (10,000 targets × 10 ports once queued ~50 MB of waiting futures), and waiting
/// sweeps interleave fairly. A probe's own state (~6 KB: read buffer, TLS) exists only while
/// it holds a permit.
async fn probe_ports(
    target: &Target,
    previous: &RangeState,
    holding: Option<&Holding<'_>>,
    ports: Vec<u16>,
    limiter: &Semaphore,
    limit: Duration,
    metrics: &Metrics,
) -> Vec<Probed> {
    let mut results = Vec::with_capacity(ports.len());
    let mut pending = ports.into_iter();
    let mut next = pending.next();
    let mut in_flight = FuturesUnordered::new();
    // Kept across iterations so a finishing probe does not lose this sweep's place in line.
    let mut acquire = std::pin::pin!(limiter.acquire());
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => results.push(done),
            permit = &mut acquire, if next.is_some() => {
                let port = next.take().expect("guarded by is_some");
                next = pending.next();
                acquire.set(limiter.acquire());
                match permit {
                    Ok(permit) => in_flight.push(Box::pin(async move {
                        let hold = holding.filter(|h| !h.resting.contains(&port));
                        let probed = probe_port(target, port, previous, hold, limit).await;
                        drop(permit);
                        metrics.probe(probed.status.label());
                        probed
                    })),
                    // Closed semaphore: only at shutdown.
                    Err(_) => results.push(Probed::plain(port, PortStatus::Refused)),
                }
            }
            else => break,
        }
    }
    results
}

/// A verified worker gets a TCP connect, anything else the full HTTP check; with `hold`, the
/// connection to a live worker is kept.
async fn probe_port(
    target: &Target,
    port: u16,
    previous: &RangeState,
    hold: Option<&Holding<'_>>,
    limit: Duration,
) -> Probed {
    let addr = SocketAddr::new(target.address, port);
    let verified = previous.live.contains(&port);
    let Some(hold) = hold else {
        let status = if verified {
            connect_only(addr, limit).await
        } else {
            verify(addr, &target.path, target.scheme, limit).await
        };
        return Probed::plain(port, status);
    };
    // Held first, then verified over a second connection: a server that handles one
    // connection at a time is then stuck on the held one, and shows it by timing out.
    let id = match timeout(limit, connected_socket(addr)).await {
        Ok(Ok(socket)) => hold.holds.hold(socket, port, hold.owner),
        Ok(Err(_)) => return Probed::plain(port, PortStatus::Refused),
        Err(_) => return Probed::plain(port, PortStatus::Timeout),
    };
    if verified && !hold.verify_held {
        return Probed {
            hold: id,
            ..Probed::plain(port, PortStatus::Live)
        };
    }
    let status = verify(addr, &target.path, target.scheme, limit).await;
    let Some(id) = id else {
        return Probed::plain(port, status);
    };
    match status {
        PortStatus::Live => Probed {
            hold: Some(id),
            ..Probed::plain(port, status)
        },
        PortStatus::Timeout => {
            hold.holds.release(id);
            let again = verify(addr, &target.path, target.scheme, limit).await;
            Probed {
                blocked_by_hold: again == PortStatus::Live,
                ..Probed::plain(port, again)
            }
        }
        _ => {
            hold.holds.release(id);
            Probed::plain(port, status)
        }
    }
}

/// Logs a slow sweep at most once a minute for the whole process: at scale every target
/// overruns together, and one line (plus the counter) says it all.
fn warn_overrun(target: &TargetId, took: Duration, interval: Duration) {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
        *last = Some(Instant::now());
        tracing::warn!(target = %target, took = ?took, interval = ?interval,
            "sweeps take longer than their interval (workersd_sweep_overruns_total); raise --probe-concurrency or the interval");
    }
}

/// Sweeps wake on a 50 ms grid shared by the process. Spread over the interval, 10,000
/// targets would otherwise wake the runtime 1,000 times a second, each wake-up a park and
/// unpark for one refused connect; on the grid it is 20 wake-ups with ~50 sweeps each. The
/// phase spread over the interval is kept, at 50 ms granularity.
const WAKE_GRID: Duration = Duration::from_millis(50);

fn on_wake_grid(at: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let since = at.saturating_duration_since(epoch).as_nanos();
    let grid = WAKE_GRID.as_nanos();
    let rounded_up = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(rounded_up as u64)
}

fn phase_offset(id: &TargetId, interval: Duration) -> Duration {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    let fraction = (hasher.finish() % 1000) as u32;
    interval * fraction / 1000
}

/// A TCP connect, for ports already verified as metrics endpoints.
pub async fn connect_only(addr: SocketAddr, limit: Duration) -> PortStatus {
    match timeout(limit, connect_and_close(addr)).await {
        Ok(Ok(())) => PortStatus::Live,
        Ok(Err(_)) => PortStatus::Refused,
        Err(_) => PortStatus::Timeout,
    }
}

/// Connects to `addr` and closes at once.
async fn connect_and_close(addr: SocketAddr) -> io::Result<()> {
    connected_socket(addr).await.map(drop)
}

/// A connected socket to `addr`, outside the reactor (to be closed or held).
async fn connected_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    match start_connect(addr)? {
        Connect::Done(socket) => Ok(socket),
        Connect::Pending(socket) => Ok(finish_connect(socket).await?.into_std()?.into()),
    }
}

/// Connects to `addr`, registering the socket with tokio only once there is a connection to
/// talk over: a refused port (most of a sweep's HTTP probes) never touches the reactor.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    match start_connect(addr)? {
        Connect::Done(socket) => TcpStream::from_std(std::net::TcpStream::from(socket)),
        Connect::Pending(socket) => finish_connect(socket).await,
    }
}

enum Connect {
    Done(socket2::Socket),
    Pending(socket2::Socket),
}

/// A nonblocking `connect(2)`. To a local address (loopback, the host's own workers in
/// standalone mode) the handshake, or the refusal, is over before it returns; asking the
/// socket then saves the reactor round trip (epoll registration, wake-up, deregistration),
/// about a fifth of a steady sweep's CPU. Otherwise the connect is `Pending`; the check costs
/// two cheap syscalls.
fn start_connect(addr: SocketAddr) -> io::Result<Connect> {
    let socket = spare_sockets::take(addr)?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(Connect::Done(socket)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(refused) = socket.take_error()? {
        spare_sockets::put_back(socket, addr);
        return Err(refused);
    }
    if socket.peer_addr().is_ok() {
        return Ok(Connect::Done(socket));
    }
    Ok(Connect::Pending(socket))
}

/// Sockets whose connect was refused, kept for the next connect. A steady sweep is mostly
/// one refused connect per target (its lowest closed port); creating and closing a socket
/// for it cost about as much as the connect itself. Linux lets a socket connect again once
/// it is disconnected (`connect` to `AF_UNSPEC`), at about half the cost. Per thread, so no
/// lock. A refused connect takes and returns its socket within one call, so one spare per
/// thread covers it; two at most keep them inside the 256 descriptors `limits` leaves free
/// besides probes, even with a runtime thread per core on large hosts.
mod spare_sockets {
    use socket2::{Domain, Socket, Type};
    use std::cell::RefCell;
    use std::io;
    use std::net::SocketAddr;

    const PER_THREAD: usize = 2;

    thread_local! {
        static SPARE: RefCell<[Vec<Socket>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
    }

    fn slot(addr: &SocketAddr) -> usize {
        usize::from(addr.is_ipv6())
    }

    /// A spare socket for `addr`'s family, or a new one.
    pub fn take(addr: SocketAddr) -> io::Result<Socket> {
        match SPARE.with(|spare| spare.borrow_mut()[slot(&addr)].pop()) {
            Some(socket) => Ok(socket),
            None => Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None),
        }
    }

    /// Keeps a socket whose connect failed (its error already taken), once disconnected;
    /// closes it when it cannot be disconnected or enough are kept.
    pub fn put_back(socket: Socket, addr: SocketAddr) {
        if !disconnect(&socket) {
            return;
        }
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            let kept = &mut spare[slot(&addr)];
            if kept.len() < PER_THREAD {
                kept.push(socket);
            }
        });
    }

    /// `connect(AF_UNSPEC)`: back to unconnected, so the next `connect` starts afresh
    /// (without it, the next one fails with ECONNABORTED).
    fn disconnect(socket: &Socket) -> bool {
        use std::os::fd::AsRawFd;
        let unspec = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
        // SAFETY: the descriptor is open (owned by `socket`), and `unspec` is a valid
        // sockaddr of `len` bytes that outlives the call.
        unsafe { libc::connect(socket.as_raw_fd(), &unspec, len) == 0 }
    }

    #[cfg(test)]
    pub fn kept(addr: SocketAddr) -> usize {
        SPARE.with(|spare| spare.borrow()[slot(&addr)].len())
    }
}

/// Waits in tokio for a connect that was still under way.
async fn finish_connect(socket: socket2::Socket) -> io::Result<TcpStream> {
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable().await?;
    if let Some(failed) = stream.take_error()? {
        return Err(failed);
    }
    // Writable without an error but not connected does not happen on Linux; be strict anyway.
    stream.peer_addr()?;
    Ok(stream)
}

/// Full verification: connect (TLS for https), `GET path`, and require 200 with a Prometheus
/// text or OpenMetrics content type. Only the response head is read.
pub async fn verify(addr: SocketAddr, path: &str, scheme: Scheme, limit: Duration) -> PortStatus {
    match timeout(limit, get_head(addr, path, scheme)).await {
        Ok(status) => status,
        Err(_) => PortStatus::Timeout,
    }
}

async fn get_head(addr: SocketAddr, path: &str, scheme: Scheme) -> PortStatus {
    let stream = match connect(addr).await {
        Ok(stream) => stream,
        Err(_) => return PortStatus::Refused,
    };
    match scheme {
        Scheme::Http => http_get_head(stream, addr, path).await,
        Scheme::Https => {
            let connector = tokio_rustls::TlsConnector::from(crate::tls::probe_client_config());
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            match connector.connect(name, stream).await {
                Ok(tls) => http_get_head(tls, addr, path).await,
                Err(_) => PortStatus::TlsHandshake,
            }
        }
    }
}

async fn http_get_head(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    path: &str,
) -> PortStatus {
    let host = match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: workersd/{}\r\n\
         Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\
         Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return PortStatus::Malformed;
    }
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return classify_head(&head),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_RESPONSE_HEAD {
            return classify_head(&head);
        }
    }
}

/// Classifies a response head (status line and headers).
pub fn classify_head(head: &[u8]) -> PortStatus {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return PortStatus::Malformed;
    };
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return PortStatus::Malformed;
    };
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return PortStatus::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return PortStatus::Malformed;
    }
    if code != "200" {
        return PortStatus::HttpStatus;
    }
    let content_type = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_ascii_lowercase())
    });
    let media_type = content_type
        .as_deref()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if media_type == "text/plain" || media_type == "application/openmetrics-text" {
        PortStatus::Live
    } else {
        PortStatus::ContentType
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortRange;
    use std::collections::BTreeMap;
    use tokio::net::TcpListener;

    #[test]
    fn classifies_response_heads() {
        let ok =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\r\n";
        assert_eq!(classify_head(ok), PortStatus::Live);
        let om = b"HTTP/1.0 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0\r\n\r\n# HELP";
        assert_eq!(classify_head(om), PortStatus::Live);
        let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n";
        assert_eq!(classify_head(html), PortStatus::ContentType);
        let none = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(classify_head(none), PortStatus::ContentType);
        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\n";
        assert_eq!(classify_head(missing), PortStatus::HttpStatus);
        assert_eq!(classify_head(b"SSH-2.0-OpenSSH\r\n"), PortStatus::Malformed);
        assert_eq!(classify_head(b"\xff\xfe\r\n\r\n"), PortStatus::Malformed);
    }

    /// A one-shot-per-connection HTTP server answering with `response`.
    async fn serve(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    const METRICS_OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 6\r\n\r\nup 1\n\n";

    #[tokio::test]
    async fn verifies_real_sockets() {
        let limit = Duration::from_secs(2);
        let metrics = serve(METRICS_OK).await;
        assert_eq!(
            verify(metrics, "/metrics", Scheme::Http, limit).await,
            PortStatus::Live
        );
        let html = serve("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>").await;
        assert_eq!(
            verify(html, "/metrics", Scheme::Http, limit).await,
            PortStatus::ContentType
        );
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        assert_eq!(
            verify(
                silent_addr,
                "/metrics",
                Scheme::Http,
                Duration::from_millis(200)
            )
            .await,
            PortStatus::Timeout
        );
        drop(silent);
        assert_eq!(
            verify(silent_addr, "/metrics", Scheme::Http, limit).await,
            PortStatus::Refused
        );
        assert_eq!(connect_only(metrics, limit).await, PortStatus::Live);
    }

    #[tokio::test]
    async fn connect_only_tells_live_from_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Duration::from_secs(2);
        assert_eq!(connect_only(addr, limit).await, PortStatus::Live);
        drop(listener);
        assert_eq!(connect_only(addr, limit).await, PortStatus::Refused);
    }

    /// A listener whose accept queue is full drops new SYNs, so the handshake is not over
    /// when `connect(2)` returns, as for a remote worker: the connect must finish in the
    /// reactor (after the SYN is retransmitted, ~1 s) or time out.
    #[tokio::test]
    async fn connect_only_waits_for_a_handshake_that_is_not_over_at_once() {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // Backlog 0 holds one connection; the queue is now full.
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(
            connect_only(addr, Duration::from_millis(300)).await,
            PortStatus::Timeout
        );
        let pending = tokio::spawn(connect_only(addr, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Make room: the retransmitted SYN is then answered.
        let accepted = listener.accept().unwrap();
        assert_eq!(pending.await.unwrap(), PortStatus::Live);
        drop(accepted);
    }

    #[tokio::test]
    async fn verifies_https_workers_with_any_certificate() {
        use tokio_rustls::rustls::ServerConfig;
        use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        crate::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["worker.invalid".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = tls.read(&mut [0u8; 1024]).await;
                    let _ = tls.write_all(METRICS_OK.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let limit = Duration::from_secs(2);
        assert_eq!(
            verify(addr, "/metrics", Scheme::Https, limit).await,
            PortStatus::Live
        );
        let plain = serve(METRICS_OK).await;
        assert_eq!(
            verify(plain, "/metrics", Scheme::Https, limit).await,
            PortStatus::TlsHandshake
        );
    }

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
        let (state, held) =
            sweep_holding(&target, &mut holding, SweepKind::Full, Some(&state)).await;
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
        let (state, held) =
            sweep_holding(&target, &mut holding, SweepKind::Full, Some(&state)).await;
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_socket_refused_is_reused_and_still_connects_to_a_live_worker() {
        let closed = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            gone.local_addr().unwrap()
        };
        let limit = Duration::from_secs(1);
        assert_eq!(spare_sockets::kept(closed), 0);
        assert_eq!(connect_only(closed, limit).await, PortStatus::Refused);
        assert_eq!(spare_sockets::kept(closed), 1, "kept after the refusal");
        for _ in 0..3 {
            assert_eq!(connect_only(closed, limit).await, PortStatus::Refused);
            assert_eq!(spare_sockets::kept(closed), 1, "taken and put back");
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        assert_eq!(connect_only(live, limit).await, PortStatus::Live);
        assert_eq!(
            spare_sockets::kept(closed),
            0,
            "the spare made the connection"
        );
        timeout(limit, listener.accept()).await.unwrap().unwrap();
    }

    #[test]
    fn full_sweeps_back_off_while_nothing_changes_and_return_after_a_change() {
        let base = Duration::from_secs(60);
        let start = Instant::now();
        let mut full = FullSweeps::new(base, start);
        assert_eq!(
            full.kind_at(start),
            SweepKind::Full,
            "the first sweep is full"
        );
        full.swept(SweepKind::Full, true, start);
        // Full sweeps that find nothing new: 60 s, then 120, 240, 480, 480 s apart.
        let mut at = start;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let next = full.next;
            assert_eq!(
                full.kind_at(next - Duration::from_secs(1)),
                SweepKind::Frontier
            );
            assert_eq!(full.kind_at(next), SweepKind::Full);
            gaps.push((next - at).as_secs());
            at = next;
            full.swept(SweepKind::Full, false, at);
        }
        assert_eq!(gaps, [60, 120, 240, 480, 480]);
        // A worker exits (a frontier sweep sees it): a full sweep follows within 60 s, and
        // backs off again from there.
        let change = at + Duration::from_secs(10);
        full.swept(SweepKind::Frontier, true, change);
        assert_eq!(full.next, change + base);
        full.swept(SweepKind::Full, false, full.next);
        assert_eq!(full.next - (change + base), base * 2);
        // A full sweep that itself finds a change keeps the base gap.
        let found = full.next;
        full.swept(SweepKind::Full, true, found);
        assert_eq!(full.next, found + base);
        // `--full-sweep-interval 0s`: every sweep is full.
        let mut always = FullSweeps::new(Duration::ZERO, start);
        always.swept(SweepKind::Full, false, start);
        assert_eq!(always.kind_at(start), SweepKind::Full);
    }

    #[test]
    fn wake_ups_fall_on_a_shared_grid_never_early_and_at_most_one_step_late() {
        let base = Instant::now();
        let mut wakes = BTreeSet::new();
        for ms in 0..500u64 {
            let at = base + Duration::from_micros(ms * 997);
            let wake = on_wake_grid(at);
            assert!(wake >= at && wake < at + WAKE_GRID, "{ms}");
            wakes.insert(wake);
        }
        // ~0.5 s of deadlines spread a millisecond apart: 10 or 11 distinct wake-ups.
        assert!((10..=11).contains(&wakes.len()), "{}", wakes.len());
    }

    #[test]
    fn a_sweep_waiting_for_permits_is_a_small_future() {
        let target = six_ports(4);
        let (previous, limiter, metrics) =
            (RangeState::default(), Semaphore::new(1), Metrics::new());
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
}
