//! Held connections: one idle TCP connection to each live worker, so the kernel says when the
//! worker goes instead of workersd asking every sweep.
//!
//! Reconnecting to every live port each interval is a full handshake and teardown per worker,
//! almost all of it in the kernel (BENCHMARKS.md, "Held connections"). A held
//! connection costs nothing while the worker lives: when its process exits the kernel closes
//! the connection (FIN or RST), epoll reports it here at once and the target's sweeper probes
//! that port right away. TCP keepalive covers a host that vanishes without a word.
//!
//! One thread waits on all held sockets. A held connection is a descriptor plus a map entry;
//! there is no task, buffer or timer per connection.

use crate::telemetry::summary::Summary;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use socket2::{SockRef, TcpKeepalive};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Wakes the waiting thread to stop.
const STOP: Token = Token(0);

/// A held connection, as its owner knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldId(Token);

/// Held connections of one target whose worker closed them (or whose host stopped answering
/// keepalives), for its sweeper to probe again.
#[derive(Debug, Default)]
pub struct Ended {
    ports: Mutex<Vec<(u16, HoldId)>>,
    notify: Notify,
}

impl Ended {
    /// The holds that ended since the last call.
    pub fn take(&self) -> Vec<(u16, HoldId)> {
        std::mem::take(&mut *lock(&self.ports))
    }

    /// Resolves when a hold ends (at once if one ended since the last wait).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    fn push(&self, port: u16, id: HoldId) {
        lock(&self.ports).push((port, id));
        self.notify.notify_one();
    }
}

struct Held {
    stream: TcpStream,
    port: u16,
    owner: Arc<Ended>,
}

struct Shared {
    registry: Registry,
    held: Mutex<HashMap<Token, Held>>,
    stop: AtomicBool,
}

/// All held connections of the process and the thread that waits on them.
pub struct Holds {
    shared: Arc<Shared>,
    waker: Waker,
    next: AtomicUsize,
    capacity: usize,
    keepalive: TcpKeepalive,
    full_warned: AtomicBool,
    /// Targets whose holds were paused (their workers answered only once a held connection
    /// closed), logged as one line for the first of a minute and one for the rest.
    pub(super) paused: Mutex<Summary>,
}

impl Holds {
    /// Starts the waiting thread. `capacity` bounds the held connections (file descriptors);
    /// beyond it workers are probed by reconnecting. A peer that stops answering is dropped
    /// after `idle` plus three keepalive probes `interval` apart.
    pub fn start(capacity: usize, idle: Duration, interval: Duration) -> io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), STOP)?;
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone()?,
            held: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("workersd-holds".into())
            .spawn(move || wait_for_ends(poll, &thread_shared))?;
        let keepalive = TcpKeepalive::new()
            .with_time(whole_seconds(idle))
            .with_interval(whole_seconds(interval))
            .with_retries(3);
        Ok(Arc::new(Self {
            shared,
            waker,
            next: AtomicUsize::new(STOP.0 + 1),
            capacity,
            keepalive,
            full_warned: AtomicBool::new(false),
            paused: Mutex::new(Summary::new(Duration::from_secs(60))),
        }))
    }

    /// Holds the connected `socket` to a worker on `port`; its end is reported to `owner`.
    /// `None` (and the socket closed) when the capacity is reached or registration fails.
    pub fn hold(&self, socket: socket2::Socket, port: u16, owner: &Arc<Ended>) -> Option<HoldId> {
        if self.shared.stop.load(Ordering::Relaxed) {
            return None;
        }
        if self.len() >= self.capacity {
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    capacity = self.capacity,
                    "holding as many worker connections as file descriptors allow; further \
                     workers are probed by reconnecting (raise the nofile limit)"
                );
            }
            return None;
        }
        // Best effort: without keepalive only a vanished host goes unnoticed, and the
        // next full sweep's connect still finds it.
        let _ = SockRef::from(&socket).set_tcp_keepalive(&self.keepalive);
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket));
        // Tokens are never reused, so a late release cannot close a newer hold.
        let token = Token(self.next.fetch_add(1, Ordering::Relaxed));
        let mut held = lock(&self.shared.held);
        // Registered under the lock: an end reported at once finds the entry.
        if let Err(e) = self
            .shared
            .registry
            .register(&mut stream, token, Interest::READABLE)
        {
            tracing::debug!(error = %e, port, "cannot hold a worker connection");
            return None;
        }
        held.insert(
            token,
            Held {
                stream,
                port,
                owner: owner.clone(),
            },
        );
        Some(HoldId(token))
    }

    /// Closes a hold; nothing if it already ended.
    pub fn release(&self, id: HoldId) {
        let removed = lock(&self.shared.held).remove(&id.0);
        if let Some(mut held) = removed {
            let _ = self.shared.registry.deregister(&mut held.stream);
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        lock(&self.shared.held).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        lock(&self.shared.held).clear();
    }
}

/// The waiting thread: any readiness on a held connection (end of stream, reset, keepalive
/// timeout, even unexpected data) ends the hold and tells its owner.
fn wait_for_ends(mut poll: Poll, shared: &Shared) {
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "waiting on held worker connections failed; reconnecting every sweep instead");
            shared.stop.store(true, Ordering::Relaxed);
            // Every hold ends: its owner probes the port again rather than trust it forever.
            for (token, held) in lock(&shared.held).drain() {
                held.owner.push(held.port, HoldId(token));
            }
            return;
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut held = lock(&shared.held);
        for event in &events {
            if let Some(mut ended) = held.remove(&event.token()) {
                let _ = shared.registry.deregister(&mut ended.stream);
                ended.owner.push(ended.port, HoldId(event.token()));
            }
        }
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    fn connected(listener: &TcpListener) -> socket2::Socket {
        socket2::Socket::from(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
    }

    async fn next_end(ended: &Ended) -> Vec<(u16, HoldId)> {
        tokio::time::timeout(Duration::from_secs(5), ended.wait())
            .await
            .expect("the end of a held connection is reported");
        ended.take()
    }

    #[tokio::test]
    async fn a_closed_worker_connection_is_reported_to_its_owner_at_once() {
        let holds = Holds::start(16, Duration::from_secs(10), Duration::from_secs(1)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (first, second) = (Arc::new(Ended::default()), Arc::new(Ended::default()));
        let a = holds.hold(connected(&listener), 9011, &first).unwrap();
        let (worker_a, _) = listener.accept().unwrap();
        let b = holds.hold(connected(&listener), 9012, &second).unwrap();
        let (_worker_b, _) = listener.accept().unwrap();
        assert_eq!(holds.len(), 2);

        let started = Instant::now();
        drop(worker_a);
        assert_eq!(next_end(&first).await, vec![(9011, a)]);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(holds.len(), 1);
        assert!(
            second.take().is_empty(),
            "only the owner of the ended hold hears"
        );

        holds.release(b);
        holds.release(a); // already ended: nothing happens
        assert!(holds.is_empty());
    }

    #[tokio::test]
    async fn a_released_hold_closes_its_connection_without_reporting() {
        let holds = Holds::start(16, Duration::from_secs(10), Duration::from_secs(1)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let owner = Arc::new(Ended::default());
        let id = holds.hold(connected(&listener), 9011, &owner).unwrap();
        let (mut worker, _) = listener.accept().unwrap();
        holds.release(id);
        let mut buf = [0u8; 1];
        worker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let read = std::io::Read::read(&mut worker, &mut buf).unwrap();
        assert_eq!(read, 0, "the worker sees end of stream");
        let woken = tokio::time::timeout(Duration::from_millis(200), owner.wait()).await;
        assert!(woken.is_err() && owner.take().is_empty());
    }

    #[tokio::test]
    async fn holds_stop_at_their_capacity() {
        let holds = Holds::start(1, Duration::from_secs(10), Duration::from_secs(1)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let owner = Arc::new(Ended::default());
        assert!(holds.hold(connected(&listener), 1, &owner).is_some());
        assert!(holds.hold(connected(&listener), 2, &owner).is_none());
        assert_eq!(holds.len(), 1);
    }

    #[test]
    fn keepalive_times_are_whole_seconds_of_at_least_one() {
        assert_eq!(
            whole_seconds(Duration::from_millis(500)),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole_seconds(Duration::from_millis(2500)),
            Duration::from_secs(3)
        );
        assert_eq!(
            whole_seconds(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }
}
