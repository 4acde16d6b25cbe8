//! Opaque TCP relaying that an upgrade can interrupt and move (issue 13, stage 3).
//!
//! Each direction is a cancel-safe pump: bytes read and not yet written stay in the pump's own
//! buffer, never inside a cancelled future. So once the draining generation's deadline for
//! opaque connections passes, the relay stops between two steps and hands the pair of sockets
//! and both directions' pending bytes (and which sides already half-closed) to the successor,
//! which resumes the relay exactly there.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use super::wire;

/// A draining generation keeps an opaque connection this long (it may end by itself), then
/// moves it to the successor.
pub const OPAQUE_HANDOVER_AFTER: Duration = Duration::from_secs(2);
const BUF: usize = 64 * 1024;

/// One direction: read from one socket, write to the other.
///
/// An idle direction holds no buffer (most relayed connections are idle most of the time): it
/// waits for the socket to be readable, takes a buffer from the thread's pool, reads, and gives
/// the buffer back once everything read has been written.
pub struct Pump {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// EOF read and passed on (the writer half-closed).
    pub done: bool,
}

impl Pump {
    pub fn new(pending: &[u8], done: bool) -> Self {
        let buf = (!pending.is_empty()).then(|| {
            let mut b = take_buf(pending.len());
            b[..pending.len()].copy_from_slice(pending);
            b
        });
        Self {
            buf,
            start: 0,
            end: pending.len(),
            done,
        }
    }

    /// Bytes read and not yet written.
    pub fn pending(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[self.start..self.end])
    }

    /// One read or one write. Cancel-safe: readiness waits move no byte, and a read or write
    /// that ran is recorded before the next await.
    async fn step(
        &mut self,
        r: &mut ReadHalf<'_>,
        w: &WriteHalf<'_>,
        conn: &AtomicU64,
        pod: &AtomicU64,
    ) -> std::io::Result<()> {
        if self.start < self.end {
            w.writable().await?;
            let buf = self.buf.as_deref().expect("pending bytes live in the buffer");
            match w.try_write(&buf[self.start..self.end]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.start += n;
                    conn.fetch_add(n as u64, Relaxed);
                    pod.fetch_add(n as u64, Relaxed);
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                        give_buf(self.buf.take());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        r.readable().await?;
        let buf = self.buf.get_or_insert_with(|| take_buf(0));
        // One read through tokio's `poll_read`, which forgets the readiness after a short read:
        // the socket's queue is then empty, so the next step waits for epoll instead of
        // reading EAGAIN (one system call fewer per message; `try_read` keeps the readiness
        // until a read fails). Not ready (a spurious wake): the buffer goes back.
        let mut rb = ReadBuf::new(buf);
        let read = std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(res) => std::task::Poll::Ready(Some(res)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await;
        match read {
            Some(Ok(())) if rb.filled().is_empty() => {
                give_buf(self.buf.take());
                socket2::SockRef::from(w.as_ref()).shutdown(std::net::Shutdown::Write)?;
                self.done = true;
            }
            Some(Ok(())) => (self.start, self.end) = (0, rb.filled().len()),
            None => give_buf(self.buf.take()),
            Some(Err(e)) => return Err(e),
        }
        Ok(())
    }
}

/// Spare relay buffers kept per worker thread.
const SPARE_BUFS: usize = 64;

thread_local! {
    static BUFS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` (and [`BUF`]) bytes, from the thread's spares when it has one.
fn take_buf(len: usize) -> Box<[u8]> {
    if len <= BUF {
        if let Some(b) = BUFS.with(|p| p.borrow_mut().pop()) {
            return b;
        }
    }
    vec![0u8; BUF.max(len)].into_boxed_slice()
}

fn give_buf(b: Option<Box<[u8]>>) {
    if let Some(b) = b.filter(|b| b.len() == BUF) {
        BUFS.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < SPARE_BUFS {
                p.push(b);
            }
        });
    }
}

/// How a relay ended.
pub enum End {
    /// Both directions finished (`failed`: one of them with an error).
    Done { failed: bool },
    /// Moved to the successor.
    HandedOver,
}

/// What a relay needs to count and, if it moves, to describe itself.
pub struct Relay<'a> {
    pub entry: &'a crate::conn::ConnEntry,
    pub stats: &'a crate::conn::PodStats,
    pub pod: &'a str,
    pub inbound: bool,
    pub client: SocketAddr,
    pub orig: SocketAddr,
    pub target: SocketAddr,
}

/// Relay `client` ↔ `upstream` until both directions end, or until a draining generation's
/// deadline for opaque connections passes and a successor takes the pair.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    mut up: Pump,
    mut down: Pump,
    r: Relay<'_>,
) -> End {
    let (mut client, mut upstream) = (client, upstream);
    let deadline = opaque_deadline();
    tokio::pin!(deadline);
    let (mut client_r, client_w) = client.split();
    let (mut upstream_r, upstream_w) = upstream.split();
    let moved = loop {
        if up.done && down.done {
            return End::Done { failed: false };
        }
        tokio::select! {
            res = up.step(&mut client_r, &upstream_w, &r.entry.bytes_to_upstream, &r.stats.bytes_upstream), if !up.done => {
                if res.is_err() {
                    break false;
                }
            }
            res = down.step(&mut upstream_r, &client_w, &r.entry.bytes_to_client, &r.stats.bytes_downstream), if !down.done => {
                if res.is_err() {
                    break false;
                }
            }
            _ = &mut deadline => break true,
        }
    };
    if !moved {
        return End::Done { failed: true };
    }
    let (Ok(c), Ok(u)) = (client.into_std(), upstream.into_std()) else {
        return End::Done { failed: true };
    };
    let meta = wire::Conn {
        pod: r.pod.to_string(),
        inbound: r.inbound,
        client: r.client.to_string(),
        orig: r.orig.to_string(),
        local: r.target.to_string(),
        read: up.pending().to_vec(),
        opaque: true,
        to_client: down.pending().to_vec(),
        client_eof: up.done,
        upstream_eof: down.done,
        ..Default::default()
    };
    if super::send_handover(meta, vec![OwnedFd::from(c), OwnedFd::from(u)]) {
        End::HandedOver
    } else {
        End::Done { failed: true }
    }
}

/// Resolves when this generation drains, a successor takes connections, and
/// [`OPAQUE_HANDOVER_AFTER`] passed.
async fn opaque_deadline() {
    super::draining().await;
    tokio::time::sleep(OPAQUE_HANDOVER_AFTER).await;
    if !super::can_hand_over() {
        std::future::pending::<()>().await;
    }
}

/// N+1: resume a relay N handed over.
pub async fn adopt(daemon: Arc<crate::daemon::Daemon>, c: wire::Conn, client: OwnedFd, upstream: OwnedFd) {
    let parse = |s: &str| s.parse::<SocketAddr>().ok();
    let (Some(peer), Some(orig), Some(target)) = (parse(&c.client), parse(&c.orig), parse(&c.local)) else {
        tracing::warn!("upgrade: a handed-over TCP relay with bad addresses: closed");
        return;
    };
    let Some(pod) = daemon.pod_ctx(&c.pod) else {
        tracing::warn!(pod = %c.pod, "upgrade: a TCP relay of a pod this generation does not serve: closed");
        return;
    };
    let to_tokio = |fd: OwnedFd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true).and_then(|()| TcpStream::from_std(s))
    };
    let (Ok(cs), Ok(us)) = (to_tokio(client), to_tokio(upstream)) else {
        tracing::warn!("upgrade: a handed-over TCP relay could not be registered: closed");
        return;
    };
    let shared = daemon.proxy_shared().clone();
    let dir = if c.inbound {
        crate::conn::Direction::Inbound
    } else {
        crate::conn::Direction::Outbound
    };
    let entry = shared.registry.add(&pod.name, dir, peer, orig);
    *entry.upstream_local.lock().expect("conn lock") = us.local_addr().ok();
    pod.stats.connections_active.fetch_add(1, Relaxed);
    let end = relay(
        cs,
        us,
        Pump::new(&c.read, c.client_eof),
        Pump::new(&c.to_client, c.upstream_eof),
        Relay {
            entry: &entry,
            stats: &pod.stats,
            pod: &pod.name,
            inbound: c.inbound,
            client: peer,
            orig,
            target,
        },
    )
    .await;
    if let End::Done { failed: true } = end {
        shared.errors.relay_reset.fetch_add(1, Relaxed);
    }
    pod.stats.connections_active.fetch_sub(1, Relaxed);
    shared.registry.remove(entry.id);
}
