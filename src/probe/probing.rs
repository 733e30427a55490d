//! One sweep of one target: which ports get which probe, under the shared limiter.

use super::connect::{connect_only, connected_socket};
use super::http::verify;
use super::sweep::SweepPlan;
use super::{Ended, HoldId, Holds, PortStatus, RangeState, SweepKind};
use crate::metrics::Metrics;
use crate::model::Target;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::timeout;

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
    /// Every probe of this sweep and its result (held ports are not probed).
    pub probed: Vec<(u16, PortStatus)>,
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
    let held = |port: u16| holding.is_some_and(|h| h.held.contains_key(&port));
    let mut plan = SweepPlan::new(target.ports.ports(), previous, kind, held);
    let probe = |ports| probe_ports(target, previous, holding, ports, limiter, limit, metrics);
    let mut results = probe(std::mem::take(&mut plan.probe)).await;
    let frontier_opened = results
        .iter()
        .any(|p| plan.opens_frontier(p.port, p.status));
    let mut swept = Swept::default();
    if frontier_opened {
        results.extend(probe(plan.skipped).await);
    } else {
        swept.state.closed.extend(plan.skipped);
    }
    swept
        .state
        .live
        .extend(target.ports.ports().filter(|port| held(*port)));
    for probed in results {
        swept.probed.push((probed.port, probed.status));
        swept.state.record(probed.port, probed.status);
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
/// one per port, and waiting sweeps interleave fairly. A probe's own state (read buffer, TLS)
/// exists only while it has a permit.
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
