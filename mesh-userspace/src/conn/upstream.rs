//! Upstream connects: sockets opened inside the pod's network namespace with the daemon's mark
//! (so the eBPF hooks never capture them again), and closing a client with RST. Used by the
//! opaque relay in [`crate::proxy`] and by the L7 handlers in [`crate::l7`].

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::PodCtx;

/// How long an upstream connect may take (the opaque relay's bound).
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect to `dst` from inside the pod's netns with the daemon's mark (so the hooks never
/// capture it again), bounded by `timeout`.
pub async fn connect_upstream(pod: &PodCtx, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = upstream_socket(pod, dst)?;
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )),
    }
}

/// Close with RST, so the app sees a refused/reset connection rather than a clean EOF.
pub(crate) fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// An unconnected upstream socket created inside the pod's netns, marked as the daemon's.
pub(crate) fn upstream_socket(pod: &PodCtx, dst: SocketAddr) -> io::Result<TcpSocket> {
    let s = pod
        .netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))
        .map_err(|e| io::Error::other(e.to_string()))??;
    if pod.mark != 0 {
        s.set_mark(pod.mark)?;
    }
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    Ok(TcpSocket::from_std_stream(s.into()))
}
