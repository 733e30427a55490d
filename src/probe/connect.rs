//! Socket code: nonblocking connects outside the reactor and the spare sockets they reuse.

use super::PortStatus;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;

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
pub(super) async fn connected_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    match start_connect(addr)? {
        Connect::Done(socket) => Ok(socket),
        Connect::Pending(socket) => Ok(finish_connect(socket).await?.into_std()?.into()),
    }
}

/// Connects to `addr`, registering the socket with tokio only once there is a connection to
/// talk over: a refused port (most of a sweep's HTTP probes) never touches the reactor.
pub(super) async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
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
/// socket then saves the reactor round trip (epoll registration, wake-up, deregistration), a
/// large part of a steady sweep's CPU. Otherwise the connect is `Pending`; the check costs two
/// cheap syscalls.
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
/// one refused connect per target (its lowest closed port), and creating and closing a socket
/// for it costs about as much as the connect itself. Linux lets a socket connect again once
/// it is disconnected (`connect` to `AF_UNSPEC`), which is cheaper. Per thread, so no
/// lock. A refused connect takes and returns its socket within one call, so one spare per
/// thread covers it; two at most keep them inside the 256 descriptors `limits` leaves free
/// besides probes, even with a runtime thread per core on large hosts.
pub(super) mod spare_sockets {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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
        // Backlog 0 queues one connection; the queue is now full.
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
}
