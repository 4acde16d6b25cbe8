//! The node proxy's data plane: per-pod outbound listeners opened inside the pod's network
//! namespace, and opaque TCP relaying to the original destination, connecting from inside the
//! same namespace so the server sees the pod's address. The original destination comes through
//! an [`OrigDstSource`], so the relaying logic can be tested without a kernel.
//!
//! Each listening address of a pod is an `SO_REUSEPORT` group of one socket per proxy worker
//! ([`crate::conn::worker`]); each worker accepts on its own member only (registered with its
//! own runtime), so the kernel's choice of member is the choice of worker and a new connection
//! wakes one thread. A connection is served, start to end, by the worker that accepted it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, warn, Instrument};

use crate::{
    conn::{admit, reset, upstream_socket, Direction, PodCtx, Shared, UPSTREAM_CONNECT_TIMEOUT},
    l7::{self, ConnCtx},
    protocol::detect::{self, Detection},
    routing::{ConnPlan, Outcome, ProtocolHint, RequestInfo},
    sys::NetNs,
};

const LISTEN_BACKLOG: i32 = 4096;
/// After a pod's listener is told to stop, keep accepting what is already queued until the
/// queue has been quiet this long, so connects captured just before unenroll are not lost.
const ACCEPT_DRAIN_QUIET: Duration = Duration::from_millis(200);

/// One listening address of a pod: the members of an `SO_REUSEPORT` group (one per worker,
/// each accepted on by its own worker only, so a new connection wakes one thread), member 0
/// first (the socket in the pod's `SM_LISTENERS` slot: sk_lookup assigns it and the kernel
/// picks a member of its group, see ARCHITECTURE.md "Listeners"). Or one socket without
/// `SO_REUSEPORT` (`reuseport_listeners = false`, or inherited from a generation before
/// hand-off protocol 3) that every worker accepts on.
pub struct ListenerGroup {
    pub addr: SocketAddr,
    pub dir: Direction,
    /// This generation's own copies, kept for an upgrade hand-off (`upgrade/`) and the take-back.
    pub members: Vec<OwnedFd>,
}

impl ListenerGroup {
    /// Whether member 0 has `SO_REUSEPORT` (a group that can take more members).
    pub fn reuseport(&self) -> bool {
        self.members
            .first()
            .and_then(|m| socket2::SockRef::from(m).reuse_port().ok())
            .unwrap_or(false)
    }
}

/// A pod's running listeners. Dropping it without [`PodProxy::stop`] aborts them at once.
pub struct PodProxy {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub listeners: Vec<SocketAddr>,
    /// Every listening address's sockets (see [`ListenerGroup`]).
    pub groups: Vec<ListenerGroup>,
    /// The pod, for connections handed over by a previous generation.
    pub pod: Arc<PodCtx>,
}

impl PodProxy {
    /// Stop accepting; what is already queued is still served. Live connections continue.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// Give every group with fewer than `to` members new ones (bound in the pod's netns with
    /// `SO_REUSEPORT`; a socket without it gets it first, so the group forms around it), each
    /// accepted on by worker `index % workers`. The upgrade hand-off calls this for a successor
    /// with more workers, so that every member it will accept on is one this generation holds
    /// and accepts on too: no member is ever closed with connections in its queue. A member
    /// that cannot be added is logged and the group serves with what it has. Returns the
    /// members added.
    pub fn grow(&mut self, shared: &Arc<Shared>, to: usize) -> usize {
        let mut added = 0;
        for g in &mut self.groups {
            if g.members.len() >= to {
                continue;
            }
            if let Some(m0) = g.members.first() {
                if let Err(e) = socket2::SockRef::from(m0).set_reuse_port(true) {
                    warn!(pod = %self.pod.name, addr = %g.addr, "listener group not grown: {e}");
                    continue;
                }
            }
            while g.members.len() < to {
                let j = g.members.len();
                let l = match bind_in(&self.pod.netns, g.addr, true) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(pod = %self.pod.name, addr = %g.addr, members = j,
                            "listener group not grown (its workers share its members): {e}");
                        break;
                    }
                };
                let copy = match l.try_clone() {
                    Ok(c) => OwnedFd::from(c),
                    Err(e) => {
                        warn!(pod = %self.pod.name, addr = %g.addr, "listener group not grown: {e}");
                        break;
                    }
                };
                let stop = self.stop.subscribe();
                let (pod, sh, dir) = (self.pod.clone(), shared.clone(), g.dir);
                self.tasks.push(shared.workers.spawn_on(j, move || {
                    accept_loop(TcpListener::from_std(l).ok(), dir, pod, sh, stop)
                }));
                g.members.push(copy);
                added += 1;
            }
        }
        added
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Create a listening socket inside `ns`, with `SO_REUSEPORT` when it is (or may become) a
/// member of a group.
pub fn bind_in(ns: &NetNs, addr: SocketAddr, reuseport: bool) -> io::Result<std::net::TcpListener> {
    ns.run(|| -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        if reuseport {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// The sockets of one listening address: after an upgrade the previous generation's (the same
/// accept queues), else `members` new ones in an `SO_REUSEPORT` group (`None`: one socket
/// without it). The first must bind; a later member that cannot is logged, and the workers
/// share the members there are.
fn open_group(
    pod: &PodCtx,
    addr: SocketAddr,
    members: Option<usize>,
) -> io::Result<Vec<std::net::TcpListener>> {
    let inherited = crate::upgrade::take_group(&pod.name, addr);
    if !inherited.is_empty() {
        return Ok(inherited);
    }
    let n = members.unwrap_or(1).max(1);
    let mut out = Vec::with_capacity(n);
    for j in 0..n {
        match bind_in(&pod.netns, addr, members.is_some()) {
            Ok(l) => out.push(l),
            Err(e) if j == 0 => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("failed to listen on {addr} in pod `{}`: {e}", pod.name),
                ))
            }
            Err(e) => {
                warn!(pod = %pod.name, %addr, members = j, "listener group smaller than the workers (they share its members): {e}");
                break;
            }
        }
    }
    Ok(out)
}

/// The pod's outbound listeners: 127.0.0.1 (required) and ::1 (when the pod has IPv6; without
/// it IPv6 connects are simply not captured: the hook finds no listener and lets them go).
/// Each a group of `members` sockets (see [`ListenerGroup`]).
pub fn outbound_listeners(
    pod: &PodCtx,
    members: Option<usize>,
) -> io::Result<Vec<Vec<std::net::TcpListener>>> {
    let v4: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, pod.outbound_port).into();
    let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, pod.outbound_port).into();
    // After an upgrade: the previous generation's sockets (same accept queues), not new ones.
    let inherited: Vec<_> = [v4, v6]
        .into_iter()
        .map(|a| crate::upgrade::take_group(&pod.name, a))
        .filter(|g| !g.is_empty())
        .collect();
    if !inherited.is_empty() {
        return Ok(inherited);
    }
    let mut out = vec![open_group(pod, v4, members)?];
    match open_group(pod, v6, members) {
        Ok(l) => out.push(l),
        Err(e) => warn!(pod = %pod.name, "no IPv6 outbound listener: {e}"),
    }
    Ok(out)
}

/// The pod's inbound listener group for one family, on loopback: it is only ever reached
/// through `sk_lookup`, which hands it connections for the pod's own addresses (member 0 is
/// the socket in the sockmap).
pub fn inbound_listener(
    pod: &PodCtx,
    port: u16,
    v6: bool,
    members: Option<usize>,
) -> io::Result<Vec<std::net::TcpListener>> {
    let addr: SocketAddr = if v6 {
        (std::net::Ipv6Addr::LOCALHOST, port).into()
    } else {
        (std::net::Ipv4Addr::LOCALHOST, port).into()
    };
    open_group(pod, addr, members)
}

/// The workers that accept on member `j` of a group of `m` members when there are `w`:
/// with at least as many members as workers, one (worker `j % w`, which takes members `j`,
/// `j + w`, ...); with fewer, the members are shared (`m = 1`: every worker accepts on the one
/// socket, woken together).
pub fn acceptors(j: usize, m: usize, w: usize) -> Vec<usize> {
    let w = w.max(1);
    if m >= w {
        vec![j % w]
    } else {
        (0..w).filter(|x| x % m.max(1) == j).collect()
    }
}

/// Serve a pod's listener groups until [`PodProxy::stop`]: each member on the workers
/// [`acceptors`] gives it, as a duplicate registered with that worker's reactor.
pub fn serve(
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    listeners: Vec<(Vec<std::net::TcpListener>, Direction)>,
) -> io::Result<PodProxy> {
    let (stop, stop_rx) = watch::channel(false);
    let pod_ctx = pod.clone();
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    let mut groups = Vec::new();
    let w = shared.workers.count();
    let abort = |tasks: &[JoinHandle<()>]| {
        for t in tasks {
            t.abort();
        }
    };
    for (members, dir) in listeners {
        let Some(first) = members.first() else { continue };
        let addr = first.local_addr()?;
        addrs.push(addr);
        let mut copies = Vec::with_capacity(members.len());
        let m = members.len();
        for (j, l) in members.iter().enumerate() {
            copies.push(OwnedFd::from(l.try_clone()?));
            for worker in acceptors(j, m, w) {
                let l = match l.try_clone() {
                    Ok(l) => l,
                    Err(e) => {
                        abort(&tasks);
                        return Err(e);
                    }
                };
                let mut failed = None;
                let (pod, sh, rx) = (pod.clone(), shared.clone(), stop_rx.clone());
                let t = shared.workers.spawn_on(worker, || {
                    let l = TcpListener::from_std(l);
                    if let Err(e) = &l {
                        failed = Some(io::Error::new(e.kind(), e.to_string()));
                    }
                    accept_loop(l.ok(), dir, pod, sh, rx)
                });
                tasks.push(t);
                if let Some(e) = failed {
                    abort(&tasks);
                    return Err(e);
                }
            }
        }
        groups.push(ListenerGroup {
            addr,
            dir,
            members: copies,
        });
    }
    Ok(PodProxy {
        stop,
        tasks,
        listeners: addrs,
        groups,
        pod: pod_ctx,
    })
}

async fn accept_loop(
    l: Option<TcpListener>,
    dir: Direction,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // None: the listener could not be set up on this worker; `serve` fails and aborts us.
    let Some(l) = l else {
        return;
    };
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, peer)) => spawn_conn(s, peer, dir, &pod, &shared),
                Err(e) if crate::sys::is_out_of_fds(&e) => {
                    // The connection stays in the kernel's accept queue; back off so the loop
                    // does not spin while descriptors are short.
                    let now_ms = crate::sys::unix_ms();
                    if let Some(n) = shared.errors.note_no_descriptors(now_ms) {
                        let (soft, hard) = crate::sys::nofile_limit().unwrap_or((0, 0));
                        // Listing /proc/self/fd needs a descriptor too.
                        let open = crate::sys::open_fds()
                            .map(|n| n.to_string())
                            .unwrap_or_else(|_| "all".into());
                        warn!(
                            pod = %pod.name,
                            "out of file descriptors: accept failed {n} time(s) since the last report ({e}); \
                             {open} open, limit {soft} (hard {hard}); connections wait in the accept queue \
                             (counted as accept_no_descriptors)"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    shared.errors.accept_failed.fetch_add(1, Relaxed);
                    warn!(pod = %pod.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    // Serve what the kernel already queued, then close. After an upgrade hand-off the
    // successor accepts from the same queue: leave it to the successor.
    while !crate::upgrade::is_draining() {
        let Ok(Ok((s, peer))) = tokio::time::timeout(ACCEPT_DRAIN_QUIET, l.accept()).await else {
            break;
        };
        spawn_conn(s, peer, dir, &pod, &shared);
    }
}

fn spawn_conn(s: TcpStream, peer: SocketAddr, dir: Direction, pod: &Arc<PodCtx>, shared: &Arc<Shared>) {
    shared.workers.note_accepted();
    let Some(held) = admit(pod, shared) else {
        reset(s);
        return;
    };
    let pod = pod.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        // Counted against the pod until the task ends (captured, not copied into the task).
        let _ = &held;
        let Some((orig, span, plan)) = plan(&s, peer, dir, &pod, &shared) else {
            reset(s);
            return;
        };
        match plan {
            ConnPlan::Opaque => {
                // Boxed like the L7 path: each connection's task holds only its own path's state.
                Box::pin(relay(s, peer, orig, orig, dir, pod, shared))
                    .instrument(span)
                    .await;
            }
            ConnPlan::L7 { hint, detect_timeout } => {
                // Boxed: the L7 handlers' state is large, and a relayed connection's task (most
                // idle connections) should not carry room for it. Detection and routing return
                // the protocol's handler, boxed on its own, so that a long-lived connection
                // keeps only the handler's state, not theirs.
                let mut conn = Box::pin(dispatch(s, peer, orig, dir, hint, detect_timeout, &pod, &shared))
                    .instrument(span)
                    .await;
                // Awaited in place: the task keeps one copy of the handler's box and span.
                if let Some(L7Conn { serve, entry_id }) = &mut conn {
                    serve.await;
                    pod.stats.connections_active.fetch_sub(1, Relaxed);
                    shared.registry.remove(*entry_id);
                }
            }
        }
    });
}

/// Where an accepted connection was meant to go, its span, and how it is served; `None` (counted
/// and logged): reset it.
fn plan(
    s: &TcpStream,
    peer: SocketAddr,
    dir: Direction,
    pod: &PodCtx,
    shared: &Shared,
) -> Option<(SocketAddr, tracing::Span, ConnPlan)> {
    let orig = match dir {
        Direction::Outbound => shared.orig.orig_dst(s),
        Direction::Inbound => s.local_addr(),
    };
    let orig = match orig {
        Ok(a) => a,
        Err(e) => {
            shared.errors.orig_dst_unknown.fetch_add(1, Relaxed);
            warn!(pod = %pod.name, client = %peer, "no original destination, closing: {e}");
            return None;
        }
    };
    let span = tracing::debug_span!("conn", pod = %pod.name, ?dir, client = %peer, orig = %orig);
    if is_proxy_itself(pod, orig) {
        // Would connect to ourselves.
        shared.errors.orig_dst_is_proxy.fetch_add(1, Relaxed);
        return None;
    }
    let plan = shared
        .l7
        .router
        .current()
        .connection_for(orig, dir == Direction::Inbound);
    Some((orig, span, plan))
}

fn is_proxy_itself(pod: &PodCtx, orig: SocketAddr) -> bool {
    orig.ip().is_loopback() && (orig.port() == pod.outbound_port || orig.port() == pod.inbound_port)
}

/// An L7 connection's handler, counted in `connections_active` and listed in `status` (entry
/// `entry_id`) until it returns.
struct L7Conn {
    /// In the connection's span.
    serve: tracing::instrument::Instrumented<Pin<Box<dyn Future<Output = ()> + Send>>>,
    entry_id: u64,
}

/// A connection a routing policy cares about: find its protocol (hint or detection), then
/// return that protocol's handler; opaque TCP is routed once and relayed here (`None`).
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    s: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
    dir: Direction,
    hint: ProtocolHint,
    detect_timeout: Duration,
    pod: &Arc<PodCtx>,
    shared: &Arc<Shared>,
) -> Option<L7Conn> {
    let detected = match hint {
        ProtocolHint::Auto => detect::peek_detect(&s, detect_timeout, None).await,
        ProtocolHint::Http1 => Detection::Http1,
        ProtocolHint::Http2 | ProtocolHint::Grpc => Detection::Http2,
        ProtocolHint::Bolt => Detection::Bolt { version: None },
        ProtocolHint::Dubbo => Detection::Dubbo,
        ProtocolHint::Tcp => Detection::Opaque,
    };
    debug!(?detected, "protocol");
    if matches!(detected, Detection::Opaque | Detection::NeedMore) {
        let policy = shared.l7.router.current();
        let routed = if dir == Direction::Inbound {
            let bare = RequestInfo::bare(ProtocolHint::Tcp);
            let mesh = &shared.mesh_ips;
            // From a pod of this node: its outbound side applied the link already.
            Ok((!mesh.routed(peer.ip()))
                .then(|| policy.link_route(orig, &bare, &shared.l7.links, |ip| mesh.contains(ip)))
                .flatten()
                .unwrap_or_else(|| policy.deliver(orig)))
        } else {
            // One colour for the whole connection: the pod's (a byte stream carries no header).
            let colour = pod
                .colour
                .as_deref()
                .and_then(|c| policy.colours().id(c))
                .unwrap_or(0);
            let bare = RequestInfo::bare(ProtocolHint::Tcp);
            let mesh = &shared.mesh_ips;
            policy
                .route_coloured(orig, &bare, colour)
                .map(|d| policy.link_outbound(d, &bare, &shared.l7.links, |ip| mesh.contains(ip)))
        };
        let decision = match routed {
            Ok(d) => d,
            Err(e) => {
                shared.l7.errors.count("tcp", e.reason());
                debug!("{e}");
                reset(s);
                return None;
            }
        };
        debug!(
            service = %decision.service,
            route = %decision.route,
            subset = %decision.subset,
            endpoint = %decision.endpoint,
            "opaque TCP routed"
        );
        let started = Instant::now();
        let (pod, shared) = (pod.clone(), shared.clone());
        let ok = Box::pin(relay(s, peer, orig, decision.endpoint, dir, pod, shared)).await;
        decision.stats.record(
            if ok {
                Outcome::Answered
            } else {
                Outcome::Failed("upstream_connect")
            },
            started.elapsed(),
        );
        return None;
    }
    let _ = s.set_nodelay(true);
    let entry = shared.registry.add(&pod.name, dir, peer, orig);
    pod.stats.connections_total.fetch_add(1, Relaxed);
    pod.stats.connections_active.fetch_add(1, Relaxed);
    let entry_id = entry.id;
    let ctx = ConnCtx {
        pod: pod.clone(),
        shared: shared.clone(),
        client: peer,
        orig,
        entry,
        inbound: dir == Direction::Inbound,
        local: s.local_addr().unwrap_or(orig),
    };
    // Each handler boxed: a connection holds only its own protocol's state.
    let serve: Pin<Box<dyn Future<Output = ()> + Send>> = match detected {
        Detection::Http1 => l7::http::serve(s, l7::http::HttpVersion::Http1, ctx),
        Detection::Http2 => l7::http::serve(s, l7::http::HttpVersion::Http2, ctx),
        Detection::Bolt { .. } => Box::pin(l7::mux::serve_bolt(s, ctx)),
        Detection::Dubbo => Box::pin(l7::mux::serve_dubbo(s, ctx)),
        Detection::Opaque | Detection::NeedMore => unreachable!("relayed above"),
    };
    Some(L7Conn {
        // dispatch runs in the connection's span.
        serve: serve.instrument(tracing::Span::current()),
        entry_id,
    })
}

/// Relay a connection to `orig` byte for byte to `target` (the original destination, or the
/// endpoint a TCP route chose). False when the upstream could not be reached.
async fn relay(
    client: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
    target: SocketAddr,
    dir: Direction,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) -> bool {
    let sock = match upstream_socket(&pod, target) {
        Ok(s) => s,
        Err(e) if crate::sys::is_out_of_fds(&e) => {
            // The accept got the last descriptor and its upstream socket none: the same
            // shortage as an accept that fails (counted and logged the same way), except that
            // this connection is reset.
            shared.errors.upstream_socket_failed.fetch_add(1, Relaxed);
            let now_ms = crate::sys::unix_ms();
            if let Some(n) = shared.errors.note_no_descriptors(now_ms) {
                let (soft, hard) = crate::sys::nofile_limit().unwrap_or((0, 0));
                warn!(
                    pod = %pod.name,
                    "out of file descriptors: {n} connection(s) since the last report could not get their descriptors \
                     (here the upstream socket: {e}); limit {soft} (hard {hard}); this one is reset \
                     (counted as accept_no_descriptors)"
                );
            }
            reset(client);
            return false;
        }
        Err(e) => {
            shared.errors.upstream_socket_failed.fetch_add(1, Relaxed);
            warn!("failed to create upstream socket: {e}");
            reset(client);
            return false;
        }
    };
    let upstream = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, sock.connect(target)).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            shared.errors.upstream_connect_failed.fetch_add(1, Relaxed);
            debug!("upstream connect to {target} failed: {e}");
            reset(client);
            return false;
        }
        Err(_) => {
            shared.errors.upstream_connect_failed.fetch_add(1, Relaxed);
            debug!("upstream connect to {target} timed out");
            reset(client);
            return false;
        }
    };
    let _ = client.set_nodelay(true);
    let entry = shared.registry.add(&pod.name, dir, peer, orig);
    *entry.upstream_local.lock().expect("conn lock") = upstream.local_addr().ok();
    pod.stats.connections_total.fetch_add(1, Relaxed);
    pod.stats.connections_active.fetch_add(1, Relaxed);
    debug!("relaying");
    // Half-close travels through; an error in either direction ends both. While an upgrade
    // drains this generation, the pair moves to the successor after a deadline.
    use crate::upgrade::tcp;
    let end = tcp::relay(
        client,
        upstream,
        tcp::Pump::new(&[], false),
        tcp::Pump::new(&[], false),
        tcp::Relay {
            entry: &entry,
            stats: &pod.stats,
            pod: &pod.name,
            inbound: dir == Direction::Inbound,
            client: peer,
            orig,
            target,
        },
    )
    .await;
    if matches!(end, tcp::End::Done { failed: true }) {
        shared.errors.relay_reset.fetch_add(1, Relaxed);
    }
    pod.stats.connections_active.fetch_sub(1, Relaxed);
    shared.registry.remove(entry.id);
    debug!("closed");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conn::OrigDstSource, routing::Router};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The test source: every accepted connection "was going to" one fixed address.
    struct FixedOrigDst(SocketAddr);

    impl OrigDstSource for FixedOrigDst {
        fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
            Ok(self.0)
        }
    }

    struct NoOrigDst;

    impl OrigDstSource for NoOrigDst {
        fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    fn pod() -> Arc<PodCtx> {
        Arc::new(PodCtx {
            name: "t".into(),
            netns: NetNs::current().unwrap(),
            stats: Arc::default(),
            outbound_port: 0,
            inbound_port: 0,
            mark: 0,
            colour: None,
            propagate: false,
            netns_cookie: 0,
        })
    }

    async fn serve_one(l: TcpListener, pod: Arc<PodCtx>, shared: Arc<Shared>) {
        let (s, peer) = l.accept().await.unwrap();
        spawn_conn(s, peer, Direction::Outbound, &pod, &shared);
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts_bytes() {
        // Upstream: echo the request reversed after the client half-closes.
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).await.unwrap();
            v.reverse();
            s.write_all(&v).await.unwrap();
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let shared = Arc::new(Shared::new(
            Box::new(FixedOrigDst(server_addr)),
            Router::default(),
        ));
        let p = pod();
        tokio::spawn(serve_one(proxy, p.clone(), shared.clone()));
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&payload).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        let mut want = payload.clone();
        want.reverse();
        assert_eq!(back, want);
        // Counters settle once the relay task finishes.
        for _ in 0..100 {
            if p.stats.connections_active.load(Relaxed) == 0 && shared.registry.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(p.stats.connections_total.load(Relaxed), 1);
        assert_eq!(p.stats.connections_active.load(Relaxed), 0);
        assert_eq!(p.stats.bytes_upstream.load(Relaxed), 300_000);
        assert_eq!(p.stats.bytes_downstream.load(Relaxed), 300_000);
        assert!(shared.registry.is_empty());
    }

    /// A policy: `vip` is a service whose endpoints are labelled by version; one subset per
    /// version, equal weights.
    fn routed(vip: SocketAddr, endpoints: &[(SocketAddr, &str)], protocol: &str, detect_ms: u64) -> Router {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|(a, v)| format!("{{ address = \"{a}\", labels = {{ version = \"{v}\" }} }}"))
            .collect();
        let versions: std::collections::BTreeSet<&str> = endpoints.iter().map(|(_, v)| *v).collect();
        let subsets: Vec<String> = versions
            .iter()
            .map(|v| format!("{{ name = \"{v}\", labels = {{ version = \"{v}\" }} }}"))
            .collect();
        let split: Vec<String> = versions
            .iter()
            .map(|v| format!("{{ subset = \"{v}\", weight = 50 }}"))
            .collect();
        let text = format!(
            "detect_timeout_ms = {detect_ms}\n[[services]]\nname = \"svc\"\naddresses = [\"{vip}\"]\n\
             protocol = \"{protocol}\"\nendpoints = [{}]\nsubsets = [{}]\n\
             [[services.routes]]\nsplit = [{}]\n",
            eps.join(", "),
            subsets.join(", "),
            split.join(", ")
        );
        Router::new(crate::routing::compile(crate::routing::parse_toml(&text).unwrap()).unwrap())
    }

    /// A server that writes `banner` first, then echoes.
    async fn banner_server(banner: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    s.write_all(banner.as_bytes()).await.unwrap();
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        a
    }

    async fn accept_all(l: TcpListener, pod: Arc<PodCtx>, shared: Arc<Shared>) {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            spawn_conn(s, peer, Direction::Outbound, &pod, &shared);
        }
    }

    #[tokio::test]
    async fn opaque_tcp_is_routed_per_connection_and_counted() {
        let vip: SocketAddr = "10.96.0.99:5432".parse().unwrap();
        let v1 = banner_server("v1\n").await;
        let v2 = banner_server("v2\n").await;
        let shared = Arc::new(Shared::new(
            Box::new(FixedOrigDst(vip)),
            routed(vip, &[(v1, "v1"), (v2, "v2")], "tcp", 300),
        ));
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        tokio::spawn(accept_all(proxy, pod(), shared.clone()));
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..200 {
            let mut c = TcpStream::connect(proxy_addr).await.unwrap();
            let mut b = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            *seen.entry(String::from_utf8_lossy(&b).into_owned()).or_default() += 1;
        }
        assert_eq!(seen.values().sum::<u32>(), 200);
        let v2_share = seen.get("v2\n").copied().unwrap_or(0);
        assert!((60..=140).contains(&v2_share), "{seen:?}");
        // Connections close after the client drops: counts are per connection.
        let policy = shared.l7.router.current();
        let mut total = 0;
        for _ in 0..100 {
            total = policy
                .stats()
                .iter()
                .map(|s| s.requests.load(Relaxed))
                .sum::<u64>();
            if total >= 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(total, 200);
    }

    #[tokio::test]
    async fn a_pod_at_its_connection_cap_gets_resets_counted_and_other_pods_do_not() {
        let upstream = banner_server("hi\n").await;
        let limits = crate::config::Limits {
            max_connections_per_pod: Some(2),
            ..Default::default()
        };
        let shared =
            Arc::new(Shared::new(Box::new(FixedOrigDst(upstream)), Router::default()).with_limits(limits));
        assert_eq!(shared.pod_cap.load(Relaxed), 2);
        let (a, b) = (pod(), pod());
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        tokio::spawn(accept_all(la, a.clone(), shared.clone()));
        tokio::spawn(accept_all(lb, b.clone(), shared.clone()));
        async fn banner(addr: SocketAddr) -> io::Result<TcpStream> {
            let mut c = TcpStream::connect(addr).await?;
            let mut buf = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            assert_eq!(&buf, b"hi\n");
            Ok(c)
        }
        let first = banner(addr_a).await.expect("first connection of pod a");
        let _second = banner(addr_a).await.expect("second connection of pod a");
        let third = banner(addr_a).await;
        assert!(third.is_err(), "over the cap: reset, got {third:?}");
        assert_eq!(shared.errors.pod_connection_limit.load(Relaxed), 1);
        assert_eq!(a.stats.held.load(Relaxed), 2);
        let _other = banner(addr_b).await.expect("another pod is not capped by pod a");
        // One closes: pod a is served again.
        drop(first);
        for _ in 0..100 {
            if a.stats.held.load(Relaxed) < 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        banner(addr_a).await.expect("below the cap again");
        assert_eq!(shared.errors.pod_connection_limit.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn server_speaks_first_is_not_stalled_beyond_the_detection_timeout() {
        let vip: SocketAddr = "10.96.0.98:3306".parse().unwrap();
        let v1 = banner_server("hello\n").await;
        let shared = Arc::new(Shared::new(
            Box::new(FixedOrigDst(vip)),
            routed(vip, &[(v1, "v1")], "auto", 100),
        ));
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        tokio::spawn(accept_all(proxy, pod(), shared.clone()));
        let start = Instant::now();
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let mut b = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"hello\n");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(90), "detection waited {waited:?}");
        assert!(waited < Duration::from_secs(2), "stalled {waited:?}");
        c.write_all(b"ping").await.unwrap();
        let mut e = [0u8; 4];
        c.read_exact(&mut e).await.unwrap();
        assert_eq!(&e, b"ping");
    }

    #[tokio::test]
    async fn unknown_original_destination_resets_and_counts() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let shared = Arc::new(Shared::new(Box::new(NoOrigDst), Router::default()));
        tokio::spawn(serve_one(proxy, pod(), shared.clone()));
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let mut buf = [0u8; 1];
        let r = c.read(&mut buf).await;
        assert!(
            matches!(r, Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(shared.errors.orig_dst_unknown.load(Relaxed), 1);
    }

    #[test]
    fn each_member_has_its_own_worker_and_fewer_members_are_shared() {
        // One member per worker: each its own.
        assert_eq!(
            (0..2).map(|j| acceptors(j, 2, 2)).collect::<Vec<_>>(),
            [vec![0], vec![1]]
        );
        // More members than workers (inherited from a generation with more): a worker takes
        // several.
        assert_eq!(
            (0..3).map(|j| acceptors(j, 3, 2)).collect::<Vec<_>>(),
            [vec![0], vec![1], vec![0]]
        );
        // One socket: every worker accepts on it (the shared mode).
        assert_eq!(acceptors(0, 1, 3), vec![0, 1, 2]);
        // Two members, four workers: each member two workers.
        assert_eq!(acceptors(1, 2, 4), vec![1, 3]);
    }

    #[tokio::test]
    async fn a_plain_listener_grows_into_a_reuseport_group_that_keeps_serving() {
        let upstream = banner_server("hi\n").await;
        let shared = Arc::new(Shared::new(Box::new(FixedOrigDst(upstream)), Router::default()));
        let p = pod();
        // Without SO_REUSEPORT, as a binary before hand-off protocol 3 created it.
        let l = bind_in(&p.netns, "127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        let mut proxy = serve(p.clone(), shared.clone(), vec![(vec![l], Direction::Outbound)]).unwrap();
        assert!(!proxy.groups[0].reuseport());
        assert_eq!(proxy.grow(&shared, 3), 2);
        assert_eq!(
            proxy.grow(&shared, 3),
            0,
            "a group never grows twice to the same size"
        );
        let g = &proxy.groups[0];
        assert_eq!(g.members.len(), 3);
        assert!(g.reuseport(), "member 0 got SO_REUSEPORT");
        for m in &g.members {
            let a = socket2::SockRef::from(m)
                .local_addr()
                .unwrap()
                .as_socket()
                .unwrap();
            assert_eq!(a, addr);
        }
        // Every connection is answered, whichever member the kernel picked.
        for _ in 0..60 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&b, b"hi\n");
        }
        // The kernel spread them: each member's queue was accepted from (none left queued).
        for m in &proxy.groups[0].members {
            assert_eq!(crate::sys::accept_queue_len(m).unwrap(), 0);
        }
        proxy.stop().await;
    }

    #[tokio::test]
    async fn refused_upstream_resets_the_client() {
        // A port with nothing listening.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let shared = Arc::new(Shared::new(Box::new(FixedOrigDst(dead)), Router::default()));
        tokio::spawn(serve_one(proxy, pod(), shared.clone()));
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let mut buf = [0u8; 1];
        let r = c.read(&mut buf).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(shared.errors.upstream_connect_failed.load(Relaxed), 1);
    }
}
