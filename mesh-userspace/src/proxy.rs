//! The node proxy's data plane: per-pod outbound listeners opened inside the pod's network
//! namespace, and opaque TCP relaying to the original destination, connecting from inside the
//! same namespace so the server sees the pod's address. The original destination comes through
//! an [`OrigDstSource`], so the relaying logic can be tested without a kernel.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, warn, Instrument};

use crate::{
    l7::{self, ConnCtx, L7Shared},
    protocol::detect::{self, Detection},
    routing::{ConnPlan, Outcome, ProtocolHint, RequestInfo, Router},
    sys::{self, NetNs},
};

pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LISTEN_BACKLOG: i32 = 4096;
/// After a pod's listener is told to stop, keep accepting what is already queued until the
/// queue has been quiet this long, so connects captured just before unenroll are not lost.
const ACCEPT_DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Where did the app mean to go? (The kernel answers through `SO_ORIGINAL_DST`.)
pub trait OrigDstSource: Send + Sync + 'static {
    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr>;
}

/// The real source: `getsockopt(SO_ORIGINAL_DST)` answered by the `cgroup/getsockopt` hook.
pub struct KernelOrigDst;

impl OrigDstSource for KernelOrigDst {
    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        let v6 = accepted.local_addr()?.is_ipv6();
        sys::original_dst(accepted.as_raw_fd(), v6)
    }
}

/// Which way a proxied connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the pod's app out (captured by connect4/6): the original destination comes from
    /// `SO_ORIGINAL_DST`.
    Outbound,
    /// Into the pod (captured by sk_lookup): the accepted socket's local address is the
    /// original destination.
    Inbound,
}

/// Per-pod counters (also the Prometheus labels).
#[derive(Debug, Default)]
pub struct PodStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub bytes_upstream: AtomicU64,
    pub bytes_downstream: AtomicU64,
    /// Connections the proxy holds for this pod right now, from accept to close (upstream
    /// connects in progress included): what `[limits] max_connections_per_pod` caps.
    pub held: AtomicU64,
}

/// Why a proxied connection was dropped; each has a metric.
#[derive(Debug, Default)]
pub struct ProxyErrors {
    pub accept_failed: AtomicU64,
    /// `accept()` failed with EMFILE/ENFILE: the daemon (or the host) ran out of descriptors.
    pub accept_no_descriptors: AtomicU64,
    /// When the last "out of descriptors" warning was logged (ms since the Unix epoch), so it
    /// is said once per [`NO_FD_LOG_INTERVAL`], with the count since.
    no_fd_logged_ms: AtomicU64,
    no_fd_unlogged: AtomicU64,
    pub orig_dst_unknown: AtomicU64,
    pub orig_dst_is_proxy: AtomicU64,
    pub upstream_socket_failed: AtomicU64,
    pub upstream_connect_failed: AtomicU64,
    pub relay_reset: AtomicU64,
    /// A pod already held `max_connections_per_pod` connections: the new one was reset.
    pub pod_connection_limit: AtomicU64,
    pod_limit_logged_ms: AtomicU64,
}

/// How often an accept that ran out of descriptors is logged (each one is counted).
pub const NO_FD_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl ProxyErrors {
    /// Count an accept that failed for lack of descriptors; `Some(n)` when it is time to log
    /// (`n` failures since the last log line, this one included).
    pub fn note_no_descriptors(&self, now_ms: u64) -> Option<u64> {
        self.accept_no_descriptors.fetch_add(1, Relaxed);
        let unlogged = self.no_fd_unlogged.fetch_add(1, Relaxed) + 1;
        let last = self.no_fd_logged_ms.load(Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= NO_FD_LOG_INTERVAL.as_millis() as u64;
        if due
            && self
                .no_fd_logged_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
        {
            self.no_fd_unlogged.fetch_sub(unlogged, Relaxed);
            return Some(unlogged);
        }
        None
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("accept_failed", self.accept_failed.load(Relaxed)),
            ("accept_no_descriptors", self.accept_no_descriptors.load(Relaxed)),
            ("orig_dst_unknown", self.orig_dst_unknown.load(Relaxed)),
            ("orig_dst_is_proxy", self.orig_dst_is_proxy.load(Relaxed)),
            (
                "upstream_socket_failed",
                self.upstream_socket_failed.load(Relaxed),
            ),
            (
                "upstream_connect_failed",
                self.upstream_connect_failed.load(Relaxed),
            ),
            ("relay_reset", self.relay_reset.load(Relaxed)),
            ("pod_connection_limit", self.pod_connection_limit.load(Relaxed)),
        ]
    }

    /// Count a connection refused by the per-pod cap; true when it is time to say so in the
    /// log (once per [`NO_FD_LOG_INTERVAL`]).
    fn note_pod_limit(&self, now_ms: u64) -> bool {
        self.pod_connection_limit.fetch_add(1, Relaxed);
        let last = self.pod_limit_logged_ms.load(Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= NO_FD_LOG_INTERVAL.as_millis() as u64)
            && self
                .pod_limit_logged_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
    }
}

/// Milliseconds since the Unix epoch (for log throttling).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One connection counted against its pod's cap (and in the node's total) until dropped.
struct Held {
    stats: Arc<PodStats>,
    shared: Arc<Shared>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.held.fetch_sub(1, Relaxed);
        self.shared.memory.freed();
    }
}

/// Admit a new connection of `pod` under its cap, or count the refusal (`None`: reset it).
fn admit(pod: &PodCtx, shared: &Arc<Shared>) -> Option<Held> {
    let held = pod.stats.held.fetch_add(1, Relaxed) + 1;
    let cap = shared.pod_cap.load(Relaxed);
    if cap != 0 && held > cap {
        pod.stats.held.fetch_sub(1, Relaxed);
        if shared.errors.note_pod_limit(now_ms()) {
            warn!(
                pod = %pod.name,
                "pod holds {cap} proxied connections, its cap ([limits] max_connections_per_pod): \
                 new ones are reset (counted as pod_connection_limit; said once per {}s)",
                NO_FD_LOG_INTERVAL.as_secs()
            );
        }
        return None;
    }
    shared.memory.opened();
    Some(Held {
        stats: pod.stats.clone(),
        shared: shared.clone(),
    })
}

/// Gives the allocator's free memory back to the system after many connections closed or
/// parked their buffers: glibc keeps freed heap pages otherwise, so RSS would stay at the peak
/// of a connection burst. A task started with the first connection checks every
/// [`TRIM_EVERY`] and trims when at least [`TRIM_AFTER`] connections were freed since the last
/// trim (at most one `malloc_trim` per interval, none while nothing changes).
#[derive(Debug, Default)]
pub struct MemoryTrim {
    /// Connections closed or parked since the last trim.
    freed: Arc<AtomicU64>,
    started: std::sync::atomic::AtomicBool,
    /// Trims done so far.
    pub trims: Arc<AtomicU64>,
}

const TRIM_AFTER: u64 = 1000;
const TRIM_EVERY: Duration = Duration::from_secs(2);

impl MemoryTrim {
    fn opened(&self) {
        if !self.started.swap(true, Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(trimmer(self.freed.clone(), self.trims.clone()));
            }
        }
    }

    /// A connection closed, or an idle one gave back its buffers.
    pub fn freed(&self) {
        self.freed.fetch_add(1, Relaxed);
    }
}

async fn trimmer(freed: Arc<AtomicU64>, trims: Arc<AtomicU64>) {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        if freed.load(Relaxed) >= TRIM_AFTER {
            freed.store(0, Relaxed);
            trims.fetch_add(1, Relaxed);
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// `malloc_trim(0)`: hand every free page of every arena back to the kernel.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One live proxied connection, as `status` shows it.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub client: SocketAddr,
    pub original_dst: SocketAddr,
    pub upstream_local: Mutex<Option<SocketAddr>>,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub started: Instant,
}

#[derive(Debug, Serialize, Clone)]
pub struct ConnView {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub client: String,
    pub original_dst: String,
    pub upstream_local: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub age_ms: u64,
}

/// Live connections, for status.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<ConnEntry>>>,
}

impl Registry {
    pub(crate) fn add(
        &self,
        pod: &str,
        direction: Direction,
        client: SocketAddr,
        original_dst: SocketAddr,
    ) -> Arc<ConnEntry> {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let e = Arc::new(ConnEntry {
            id,
            pod: pod.to_string(),
            direction,
            client,
            original_dst,
            upstream_local: Mutex::new(None),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.conns.lock().expect("registry lock").insert(id, e.clone());
        e
    }

    pub(crate) fn remove(&self, id: u64) {
        self.conns.lock().expect("registry lock").remove(&id);
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<ConnView> {
        self.conns
            .lock()
            .expect("registry lock")
            .values()
            .map(|e| ConnView {
                id: e.id,
                pod: e.pod.clone(),
                direction: e.direction,
                client: e.client.to_string(),
                original_dst: e.original_dst.to_string(),
                upstream_local: e.upstream_local.lock().expect("conn lock").map(|a| a.to_string()),
                bytes_to_upstream: e.bytes_to_upstream.load(Relaxed),
                bytes_to_client: e.bytes_to_client.load(Relaxed),
                age_ms: e.started.elapsed().as_millis() as u64,
            })
            .collect()
    }
}

/// What the relay needs to know about the pod and the node.
pub struct PodCtx {
    pub name: String,
    pub netns: NetNs,
    pub stats: Arc<PodStats>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub mark: u32,
    /// The pod's colour (`enroll --colour`): every request it sends has it unless the request
    /// or the kernel says otherwise.
    pub colour: Option<String>,
    /// Colour propagation by the kernel for this pod's apps.
    pub propagate: bool,
    /// The pod's netns cookie (keys of the kernel's per-connection maps).
    pub netns_cookie: u64,
}

/// The addresses of this node's enrolled pods: requests from them come from inside the mesh.
#[derive(Debug, Default)]
pub struct MeshIps {
    ips: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// The addresses of pods whose outbound requests this daemon routes (not `external_proxy`):
    /// their requests to a linked service already had the link's decision
    /// ([`crate::routing::Policy::link_outbound`]), so the inbound side does not decide again.
    routed: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl MeshIps {
    pub fn add(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.ips.write().expect("mesh ips lock");
        for ip in ips {
            *m.entry(*ip).or_default() += 1;
        }
    }

    pub fn remove(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.ips.write().expect("mesh ips lock");
        for ip in ips {
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        !ip.is_loopback() && self.ips.read().expect("mesh ips lock").contains_key(&ip)
    }

    /// A pod whose outbound requests this daemon routes (see the `routed` field).
    pub fn add_routed(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.routed.write().expect("mesh ips lock");
        for ip in ips {
            *m.entry(*ip).or_default() += 1;
        }
    }

    pub fn remove_routed(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.routed.write().expect("mesh ips lock");
        for ip in ips {
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }

    /// Does a connection from `ip` come from a pod of this node whose outbound requests this
    /// daemon routed (so a link already decided where they go)?
    pub fn routed(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        !ip.is_loopback() && self.routed.read().expect("mesh ips lock").contains_key(&ip)
    }
}

/// Shared by every pod's listeners.
pub struct Shared {
    pub registry: Registry,
    pub errors: ProxyErrors,
    pub orig: Box<dyn OrigDstSource>,
    /// The routing policy, protocol error counters and upstream pools.
    pub l7: L7Shared,
    /// Enrolled pods' addresses (who is inside the mesh).
    pub mesh_ips: MeshIps,
    /// Kernel colour propagation (see `propagate.rs`); unavailable until the daemon wires it.
    pub colour: crate::propagate::ColourKernel,
    /// `[limits]`: slow and idle clients, the per-pod connection cap.
    pub limits: crate::config::Limits,
    /// The per-pod connection cap in force (0: none), resolved from `limits` at start.
    pub pod_cap: AtomicU64,
    /// Live connections, and the heap trim after large closes.
    pub memory: MemoryTrim,
}

impl Shared {
    pub fn new(orig: Box<dyn OrigDstSource>, router: Router) -> Self {
        Self {
            registry: Registry::default(),
            errors: ProxyErrors::default(),
            orig,
            l7: L7Shared {
                router,
                ..L7Shared::default()
            },
            mesh_ips: MeshIps::default(),
            colour: crate::propagate::ColourKernel::disabled("not wired to a kernel".into()),
            limits: crate::config::Limits::default(),
            pod_cap: AtomicU64::new(0),
            memory: MemoryTrim::default(),
        }
    }

    /// With the config's `[limits]`; the per-pod cap is resolved against the open-files
    /// limit in force now.
    pub fn with_limits(mut self, limits: crate::config::Limits) -> Self {
        let nofile = sys::nofile_limit().map(|(soft, _)| soft).unwrap_or(0);
        self.pod_cap = AtomicU64::new(limits.pod_connection_cap(nofile));
        self.limits = limits;
        self
    }

    /// With the kernel's colour propagation handle.
    pub fn with_colour(mut self, colour: crate::propagate::ColourKernel) -> Self {
        self.colour = colour;
        self
    }
}

/// A pod's running listeners. Dropping it without [`PodProxy::stop`] aborts them at once.
pub struct PodProxy {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub listeners: Vec<SocketAddr>,
    /// Duplicates of the listening sockets, for an upgrade hand-off (`upgrade/`).
    pub handoff: Vec<(SocketAddr, Direction, std::os::fd::OwnedFd)>,
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
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Create a listening socket inside `ns`.
pub fn bind_in(ns: &NetNs, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    ns.run(|| -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// The pod's outbound listeners: 127.0.0.1 (required) and ::1 (when the pod has IPv6; without
/// it IPv6 connects are simply not captured: the hook finds no listener and lets them go).
pub fn outbound_listeners(pod: &PodCtx) -> io::Result<Vec<std::net::TcpListener>> {
    let v4: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, pod.outbound_port).into();
    let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, pod.outbound_port).into();
    // After an upgrade: the previous generation's sockets (same accept queues), not new ones.
    let inherited: Vec<_> = [v4, v6]
        .into_iter()
        .filter_map(|a| crate::upgrade::take_listener(&pod.name, a))
        .collect();
    if !inherited.is_empty() {
        return Ok(inherited);
    }
    let mut out = vec![bind_in(&pod.netns, v4).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("failed to listen on {v4} in pod `{}`: {e}", pod.name),
        )
    })?];
    match bind_in(&pod.netns, v6) {
        Ok(l) => out.push(l),
        Err(e) => warn!(pod = %pod.name, "no IPv6 outbound listener: {e}"),
    }
    Ok(out)
}

/// The pod's inbound listener for one family, on loopback: it is only ever reached through
/// `sk_lookup`, which hands it connections for the pod's own addresses.
pub fn inbound_listener(pod: &PodCtx, port: u16, v6: bool) -> io::Result<std::net::TcpListener> {
    let addr: SocketAddr = if v6 {
        (std::net::Ipv6Addr::LOCALHOST, port).into()
    } else {
        (std::net::Ipv4Addr::LOCALHOST, port).into()
    };
    if let Some(l) = crate::upgrade::take_listener(&pod.name, addr) {
        return Ok(l);
    }
    bind_in(&pod.netns, addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("failed to listen on {addr} in pod `{}`: {e}", pod.name),
        )
    })
}

/// Serve a pod's listeners until [`PodProxy::stop`].
pub fn serve(
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    listeners: Vec<(std::net::TcpListener, Direction)>,
) -> io::Result<PodProxy> {
    let (stop, stop_rx) = watch::channel(false);
    let pod_ctx = pod.clone();
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    let mut handoff = Vec::new();
    for (l, dir) in listeners {
        addrs.push(l.local_addr()?);
        handoff.push((l.local_addr()?, dir, std::os::fd::OwnedFd::from(l.try_clone()?)));
        let l = TcpListener::from_std(l)?;
        tasks.push(tokio::spawn(accept_loop(
            l,
            dir,
            pod.clone(),
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    Ok(PodProxy {
        stop,
        tasks,
        listeners: addrs,
        handoff,
        pod: pod_ctx,
    })
}

async fn accept_loop(
    l: TcpListener,
    dir: Direction,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((s, peer)) => spawn_conn(s, peer, dir, &pod, &shared),
                Err(e) if crate::sys::is_out_of_fds(&e) => {
                    // The connection stays in the kernel's accept queue; back off so the loop
                    // does not spin while descriptors are short.
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
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
    let Some(held) = admit(pod, shared) else {
        reset(s);
        return;
    };
    let pod = pod.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let _held = held;
        let orig = match dir {
            Direction::Outbound => shared.orig.orig_dst(&s),
            Direction::Inbound => s.local_addr(),
        };
        let orig = match orig {
            Ok(a) => a,
            Err(e) => {
                shared.errors.orig_dst_unknown.fetch_add(1, Relaxed);
                warn!(pod = %pod.name, client = %peer, "no original destination, closing: {e}");
                reset(s);
                return;
            }
        };
        let span = tracing::debug_span!("conn", pod = %pod.name, ?dir, client = %peer, orig = %orig);
        if is_proxy_itself(&pod, orig) {
            // Would connect to ourselves.
            shared.errors.orig_dst_is_proxy.fetch_add(1, Relaxed);
            reset(s);
            return;
        }
        let plan = shared
            .l7
            .router
            .current()
            .connection_for(orig, dir == Direction::Inbound);
        match plan {
            ConnPlan::Opaque => {
                // Boxed like the L7 path: each connection's task holds only its own path's state.
                Box::pin(relay(s, peer, orig, orig, dir, pod, shared))
                    .instrument(span)
                    .await;
            }
            ConnPlan::L7 { hint, detect_timeout } => {
                // Boxed: the L7 handlers' state is large, and a relayed connection's task (most
                // idle connections) should not carry room for it.
                Box::pin(dispatch(s, peer, orig, dir, hint, detect_timeout, pod, shared))
                    .instrument(span)
                    .await
            }
        }
    });
}

fn is_proxy_itself(pod: &PodCtx, orig: SocketAddr) -> bool {
    orig.ip().is_loopback() && (orig.port() == pod.outbound_port || orig.port() == pod.inbound_port)
}

/// A connection a routing policy cares about: find its protocol (hint or detection), then hand
/// it to that protocol's handler; opaque TCP is routed once and relayed.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    s: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
    dir: Direction,
    hint: ProtocolHint,
    detect_timeout: Duration,
    pod: Arc<PodCtx>,
    shared: Arc<Shared>,
) {
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
                return;
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
        let ok = Box::pin(relay(s, peer, orig, decision.endpoint, dir, pod, shared)).await;
        decision.stats.record(
            if ok {
                Outcome::Answered
            } else {
                Outcome::Failed("upstream_connect")
            },
            started.elapsed(),
        );
        return;
    }
    let _ = s.set_nodelay(true);
    let entry = shared.registry.add(&pod.name, dir, peer, orig);
    pod.stats.connections_total.fetch_add(1, Relaxed);
    pod.stats.connections_active.fetch_add(1, Relaxed);
    let ctx = ConnCtx {
        pod: pod.clone(),
        shared: shared.clone(),
        client: peer,
        orig,
        entry: entry.clone(),
        inbound: dir == Direction::Inbound,
        local: s.local_addr().unwrap_or(orig),
    };
    // Each handler boxed: a connection holds only its own protocol's state.
    match detected {
        Detection::Http1 => Box::pin(l7::http::serve(s, l7::http::HttpVersion::Http1, ctx)).await,
        Detection::Http2 => Box::pin(l7::http::serve(s, l7::http::HttpVersion::Http2, ctx)).await,
        Detection::Bolt { .. } => Box::pin(l7::mux::serve_bolt(s, ctx)).await,
        Detection::Dubbo => Box::pin(l7::mux::serve_dubbo(s, ctx)).await,
        Detection::Opaque | Detection::NeedMore => unreachable!("relayed above"),
    }
    pod.stats.connections_active.fetch_sub(1, Relaxed);
    shared.registry.remove(entry.id);
}

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
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// An unconnected upstream socket created inside the pod's netns, marked as the daemon's.
fn upstream_socket(pod: &PodCtx, dst: SocketAddr) -> io::Result<TcpSocket> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn out_of_descriptor_accepts_are_all_counted_and_logged_once_per_interval() {
        let e = ProxyErrors::default();
        let t0 = 1_000_000u64;
        assert_eq!(
            e.note_no_descriptors(t0),
            Some(1),
            "the first one is reported at once"
        );
        for i in 1..50 {
            assert_eq!(e.note_no_descriptors(t0 + i * 100), None);
        }
        let next = t0 + NO_FD_LOG_INTERVAL.as_millis() as u64;
        assert_eq!(
            e.note_no_descriptors(next),
            Some(50),
            "49 since the last report, plus this one"
        );
        assert_eq!(e.accept_no_descriptors.load(Relaxed), 51);
        assert_eq!(e.accept_failed.load(Relaxed), 0, "not an ordinary accept failure");
    }

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
