//! Upstream HTTP connection pools ([`HttpPools`]) per proxy worker and (pod, endpoint,
//! version): HTTP/1.1
//! keep-alive lists and the one multiplexed HTTP/2 connection, the sweep of idle and dead
//! connections, the dual-link pre-connect, and one attempt of a request on a pooled (or newly
//! opened) connection ([`send_once`]).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::client::conn as hc;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::{
    h1client::{exchange, Failed, H1Body, H1Conn, Park},
    until, Body, BoxError, ConnCtx, ConnState, HttpVersion, RespBody, HTTP2_KEEPALIVE_INTERVAL,
    HTTP2_KEEPALIVE_TIMEOUT,
};
use crate::{
    conn::{worker::PerWorker, PodCtx},
    routing::{colour::ColourId, KeyHash},
};

/// An idle pooled HTTP/1.1 upstream connection is closed after this long.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Pooled HTTP/1.1 upstream connections per (pod, endpoint); beyond it, extra connections
/// serve one request and close.
pub const MAX_POOLED_HTTP1_PER_ENDPOINT: usize = 256;
/// How often idle and dead upstream connections are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// Upstream connection pools, per proxy worker and (pod, endpoint, version): a request only
/// ever uses the pools of the worker serving its connection.
#[derive(Default)]
pub struct HttpPools {
    workers: PerWorker<Arc<PoolsInner>>,
    opened: Arc<Opened>,
}

/// Upstream HTTP connections this process opened (`sockmesh_upstream_http_connects_total`).
#[derive(Default)]
struct Opened {
    /// For a request that found no ready pooled connection (it waited for the connect).
    request: AtomicU64,
    /// Ahead of traffic: the dual-link switch's pre-connect, a successor's before it takes over.
    preconnect: AtomicU64,
}

#[derive(Default)]
struct PoolsInner {
    pools: Mutex<HashMap<PoolKey, Arc<EndpointPool>, KeyHash>>,
    sweeper: AtomicBool,
}

/// A pool's key. The pod is its `PodCtx`'s address: the pool's `Weak` keeps that allocation
/// (so the address) from being reused while the pool exists, and a re-enrolled pod, a new
/// `PodCtx`, gets pools of its own. A lookup per request so allocates and hashes no name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    pod: usize,
    endpoint: SocketAddr,
    version: HttpVersion,
}

fn pod_key(pod: &Arc<PodCtx>) -> usize {
    Arc::as_ptr(pod) as usize
}

struct EndpointPool {
    /// The pod the connections were opened for; a re-enrolled pod with the same name gets a
    /// fresh pool (its netns may differ).
    pod: Weak<PodCtx>,
    /// HTTP/1.1: idle connections not known to be closed (a connection is out of the list
    /// while it carries a request and its response body).
    h1: Mutex<Vec<PooledH1>>,
    /// HTTP/2: the one multiplexed connection. Held across connect so concurrent first
    /// requests share it.
    h2: tokio::sync::Mutex<Option<hc::http2::SendRequest<Body>>>,
    /// HTTP/1.1 requests between taking a connection and the end of their response body (or
    /// the connection's close): their connections are not in `h1` meanwhile (for
    /// [`HttpPools::h1_counts`]).
    h1_busy: AtomicUsize,
    /// HTTP/1.1 app connections on this worker whose latest request went to this pool
    /// ([`LastPool`]): each carries one request at a time, so at most this many of the pool's
    /// connections can be busy at once while they keep sending here. What a switch's
    /// pre-connect sizes from ([`HttpPools::h1_demand`]).
    h1_users: AtomicUsize,
}

/// The pool an HTTP/1.1 app connection's latest request went to, counted in that pool's
/// `h1_users` until the connection sends elsewhere or closes. Set per request, but the count
/// only moves when the endpoint changes.
#[derive(Default)]
pub(super) struct LastPool(Mutex<Option<Arc<EndpointPool>>>);

impl LastPool {
    fn note(&self, pool: &Arc<EndpointPool>) {
        let mut last = self.0.lock().expect("last pool lock");
        if last.as_ref().is_some_and(|p| Arc::ptr_eq(p, pool)) {
            return;
        }
        pool.h1_users.fetch_add(1, Relaxed);
        if let Some(old) = last.replace(pool.clone()) {
            old.h1_users.fetch_sub(1, Relaxed);
        }
    }

    /// The connection stops sending requests through the pools (an `Upgrade`: it becomes a
    /// spliced stream, which may outlive this state's use by far).
    pub(super) fn forget(&self) {
        if let Some(old) = self.0.lock().expect("last pool lock").take() {
            old.h1_users.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for LastPool {
    fn drop(&mut self) {
        if let Some(p) = self.0.get_mut().ok().and_then(|p| p.take()) {
            p.h1_users.fetch_sub(1, Relaxed);
        }
    }
}

/// Counts one HTTP/1.1 request in flight on a pool until dropped.
struct Busy(Arc<EndpointPool>);

impl Busy {
    fn new(p: Arc<EndpointPool>) -> Self {
        p.h1_busy.fetch_add(1, Relaxed);
        Busy(p)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.h1_busy.fetch_sub(1, Relaxed);
    }
}

impl EndpointPool {
    /// Keeps an HTTP/1.1 connection for the next request, unless the endpoint already has
    /// [`MAX_POOLED_HTTP1_PER_ENDPOINT`]; whether it was kept.
    fn park_h1(&self, conn: H1Conn) -> bool {
        let mut h1 = self.h1.lock().expect("h1 pool lock");
        let room = h1.len() < MAX_POOLED_HTTP1_PER_ENDPOINT;
        if room {
            h1.push(PooledH1 {
                conn,
                since: Instant::now(),
            });
            return true;
        }
        drop(h1);
        false
    }

    /// HTTP/1.1 connections held: idle ones not known to be closed, and busy ones.
    fn h1_held(&self) -> usize {
        self.prune_h1(false) + self.h1_busy.load(Relaxed)
    }

    /// The connections this worker's app connections may need at once here: the larger of
    /// those held and the app connections whose latest request came here.
    fn h1_demand(&self) -> usize {
        self.h1_held().max(self.h1_users.load(Relaxed))
    }

    /// Drop the idle HTTP/1.1 connections the upstream closed (and those idle for
    /// [`UPSTREAM_IDLE_TIMEOUT`] when `expire`); how many are left. The dropped ones close
    /// outside the lock.
    fn prune_h1(&self, expire: bool) -> usize {
        let mut dead = Vec::new();
        let mut h1 = self.h1.lock().expect("h1 pool lock");
        let mut i = 0;
        while i < h1.len() {
            let c = &mut h1[i];
            if c.conn.idle_usable() && !(expire && c.since.elapsed() >= UPSTREAM_IDLE_TIMEOUT) {
                i += 1;
            } else {
                dead.push(h1.swap_remove(i));
            }
        }
        let left = h1.len();
        drop(h1);
        drop(dead);
        left
    }
}

struct PooledH1 {
    conn: H1Conn,
    since: Instant,
}

impl HttpPools {
    /// Pools for `workers` proxy workers.
    pub fn new(workers: usize) -> Self {
        Self {
            workers: PerWorker::new(workers, |_| Arc::default()),
            opened: Arc::default(),
        }
    }

    /// Upstream HTTP connections (HTTP/1.1 and HTTP/2) this process opened: (for requests,
    /// ahead of traffic by a pre-connect).
    pub fn connects(&self) -> (u64, u64) {
        (
            self.opened.request.load(Relaxed),
            self.opened.preconnect.load(Relaxed),
        )
    }

    /// Upstream connections currently pooled (HTTP/1.1 connections plus HTTP/2 connections).
    #[cfg(test)]
    pub(super) fn connections(&self) -> usize {
        let mut n = 0;
        for inner in self.workers.all() {
            let pools = inner.pools.lock().expect("http pools lock");
            n += pools
                .values()
                .map(|p| {
                    p.h1.lock().expect("h1 pool lock").len()
                        + p.h2.try_lock().map_or(1, |s| s.is_some() as usize)
                })
                .sum::<usize>();
        }
        n
    }

    fn get(&self, ctx: &ConnCtx, endpoint: SocketAddr, version: HttpVersion) -> Arc<EndpointPool> {
        get_for(self.workers.here(), &ctx.pod, endpoint, version)
    }
}

/// The pool of `pod` to `endpoint` in one worker's pools (its sweeper starts on first use, on
/// the worker running this).
fn get_for(
    inner: &Arc<PoolsInner>,
    pod: &Arc<PodCtx>,
    endpoint: SocketAddr,
    version: HttpVersion,
) -> Arc<EndpointPool> {
    if !inner.sweeper.swap(true, Relaxed) {
        tokio::spawn(sweep(Arc::downgrade(inner)));
    }
    let key = PoolKey {
        pod: pod_key(pod),
        endpoint,
        version,
    };
    let mut pools = inner.pools.lock().expect("http pools lock");
    if let Some(p) = pools.get(&key) {
        return p.clone();
    }
    let p = Arc::new(EndpointPool {
        pod: Arc::downgrade(pod),
        h1: Mutex::new(Vec::new()),
        h2: tokio::sync::Mutex::new(None),
        h1_busy: AtomicUsize::new(0),
        h1_users: AtomicUsize::new(0),
    });
    pools.insert(key, p.clone());
    p
}

/// Pre-connects (the dual-link switch, [`crate::links`]): opening upstream connections before
/// traffic moves, so the first requests on the new path do not wait for a connect and the
/// app's accept.
impl HttpPools {
    /// HTTP/1.1 connections pooled now, per (pod, endpoint), to any of `endpoints` (pods still
    /// enrolled; idle, streaming a body, or carrying a request until its response head;
    /// connections known to be closed are not counted), summed over the workers.
    #[cfg(test)]
    pub fn h1_counts(&self, endpoints: &[SocketAddr]) -> Vec<(Arc<PodCtx>, SocketAddr, usize)> {
        self.h1_counts_where(|ep| endpoints.contains(ep), EndpointPool::h1_held)
    }

    /// The HTTP/1.1 connections each (pod, endpoint) may need at once, summed over the
    /// workers: per worker the larger of [`Self::h1_counts`]'s and the app connections whose
    /// latest request went there (each may send its next request at any moment; a pool sized
    /// from the connections held alone falls short when their requests come in a burst).
    pub fn h1_demand(&self, endpoints: &[SocketAddr]) -> Vec<(Arc<PodCtx>, SocketAddr, usize)> {
        self.h1_counts_where(|ep| endpoints.contains(ep), EndpointPool::h1_demand)
    }

    /// [`Self::h1_demand`] to every endpoint (what a successor pre-connects before it takes
    /// over, [`crate::upgrade`]: the app connections move to it and each may send at once);
    /// pools with no demand are left out.
    pub fn h1_demand_all(&self) -> Vec<(Arc<PodCtx>, SocketAddr, usize)> {
        let mut v = self.h1_counts_where(|_| true, EndpointPool::h1_demand);
        v.retain(|(_, _, n)| *n > 0);
        v
    }

    fn h1_counts_where(
        &self,
        want: impl Fn(&SocketAddr) -> bool,
        count: impl Fn(&EndpointPool) -> usize,
    ) -> Vec<(Arc<PodCtx>, SocketAddr, usize)> {
        let mut out: Vec<(Arc<PodCtx>, SocketAddr, usize)> = Vec::new();
        for inner in self.workers.all() {
            let pools = inner.pools.lock().expect("http pools lock");
            let here = pools
                .iter()
                .filter(|(k, _)| k.version == HttpVersion::Http1 && want(&k.endpoint))
                .filter_map(|(k, p)| {
                    let pod = p.pod.upgrade()?;
                    Some((pod, k.endpoint, count(p)))
                });
            for (pod, ep, n) in here {
                match out.iter_mut().find(|(p, e, _)| Arc::ptr_eq(p, &pod) && *e == ep) {
                    Some(row) => row.2 += n,
                    None => out.push((pod, ep, n)),
                }
            }
        }
        out
    }

    /// Open HTTP/1.1 connections from `pod` to `endpoint` until `want` are pooled, spread over
    /// the workers in proportion to `pod`'s HTTP/1.1 demand ([`Self::h1_demand`]) on each to
    /// `size_from` (the endpoints whose traffic moves to `endpoint`; evenly when there is
    /// none): each worker opens its share on its own runtime, into its own pools
    /// (concurrently, each bounded by `timeout`; at most [`MAX_POOLED_HTTP1_PER_ENDPOINT`] per
    /// worker). Returns how many were opened, or the first error when none could be.
    pub async fn preconnect_h1(
        &self,
        shared: &crate::conn::Shared,
        pod: &Arc<PodCtx>,
        endpoint: SocketAddr,
        want: usize,
        size_from: &[SocketAddr],
        timeout: Duration,
    ) -> io::Result<usize> {
        let all = self.workers.all();
        let used: Vec<usize> = all
            .iter()
            .map(|inner| h1_demand_here(inner, pod, size_from))
            .collect();
        let total: usize = used.iter().sum();
        let share = |i: usize| match total {
            0 => want.div_ceil(all.len()),
            _ => (want * used[i]).div_ceil(total),
        };
        let propagation = (pod.propagate && shared.colour.is_available()).then(|| shared.colour.clone());
        let runs = shared.workers.spawn_each(|i| {
            let i = i % all.len();
            let (inner, want) = (all[i].clone(), share(i));
            let (pod, propagation, counted) = (pod.clone(), propagation.clone(), self.opened.clone());
            async move {
                let r = preconnect_h1_here(&inner, &pod, propagation, endpoint, want, timeout).await;
                if let Ok(n) = r {
                    counted.preconnect.fetch_add(n as u64, Relaxed);
                }
                r
            }
        });
        let (mut opened, mut first_err) = (0, None);
        for r in runs {
            match r.await.map_err(io::Error::other).and_then(|r| r) {
                Ok(k) => opened += k,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if opened == 0 => Err(e),
            _ => Ok(opened),
        }
    }
}

/// `pod`'s HTTP/1.1 demand in one worker's pools to `endpoints` ([`EndpointPool::h1_demand`]).
fn h1_demand_here(inner: &PoolsInner, pod: &Arc<PodCtx>, endpoints: &[SocketAddr]) -> usize {
    let pools = inner.pools.lock().expect("http pools lock");
    pools
        .iter()
        .filter(|(k, p)| {
            k.version == HttpVersion::Http1
                && k.pod == pod_key(pod)
                && endpoints.contains(&k.endpoint)
                && std::ptr::eq(p.pod.as_ptr(), Arc::as_ptr(pod))
        })
        .map(|(_, p)| p.h1_demand())
        .sum()
}

/// [`HttpPools::preconnect_h1`] in one worker's pools.
async fn preconnect_h1_here(
    inner: &Arc<PoolsInner>,
    pod: &Arc<PodCtx>,
    propagation: Option<crate::propagate::ColourKernel>,
    endpoint: SocketAddr,
    want: usize,
    timeout: Duration,
) -> io::Result<usize> {
    let pool = get_for(inner, pod, endpoint, HttpVersion::Http1);
    let have = pool.prune_h1(false);
    let want = want.min(MAX_POOLED_HTTP1_PER_ENDPOINT);
    if have >= want {
        return Ok(0);
    }
    let mut opens = tokio::task::JoinSet::new();
    for _ in have..want {
        let (pod, propagation) = (pod.clone(), propagation.clone());
        opens.spawn(async move { open_h1(&pod, propagation, endpoint, timeout).await });
    }
    let (mut opened, mut first_err) = (0, None);
    while let Some(r) = opens.join_next().await {
        match r.map_err(io::Error::other).and_then(|r| r) {
            Ok(conn) => {
                if pool.park_h1(conn) {
                    opened += 1;
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if opened == 0 => Err(e),
        _ => Ok(opened),
    }
}

/// Drop closed connections, HTTP/1.1 connections idle for [`UPSTREAM_IDLE_TIMEOUT`] and the
/// pools of pods that are gone. Ends with the pools.
async fn sweep(inner: Weak<PoolsInner>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.pools.lock().expect("http pools lock").retain(|_, p| {
            if p.pod.strong_count() == 0 {
                return false;
            }
            let h1_left = p.prune_h1(true);
            let h2_live = match p.h2.try_lock() {
                Ok(mut s) => {
                    if s.as_ref().is_some_and(|s| s.is_closed()) {
                        *s = None;
                    }
                    s.is_some()
                }
                Err(_) => true,
            };
            h1_left > 0 || p.h1_busy.load(Relaxed) > 0 || p.h1_users.load(Relaxed) > 0 || h2_live
        });
    }
}

pub(super) enum Attempt {
    /// Could not connect; nothing was sent.
    NotConnected(Request<Body>, io::Error),
    /// The pooled connection was closed before the request was written.
    Stale(Request<Body>),
    /// The request (or part of it) went out and the exchange failed; HTTP/1.1 gives its head
    /// back (for a replay without cloning it up front).
    Sent(BoxError, Option<Box<http::request::Parts>>),
    /// The upstream answered with bytes that are not a valid HTTP/1.1 response head.
    Malformed(String),
}

/// One attempt on a pooled connection to `endpoint`.
pub(super) async fn send_once(
    st: &ConnState,
    endpoint: SocketAddr,
    req: Request<Body>,
    deadline: Instant,
    colour: ColourId,
) -> Result<Response<RespBody>, Attempt> {
    let pools = &st.ctx.l7().http;
    let pool = pools.get(&st.ctx, endpoint, st.version);
    match st.version {
        HttpVersion::Http1 => {
            st.last_pool.note(&pool);
            let busy = Busy::new(pool.clone());
            let mut conn = match acquire_h1(&pool, &pools.opened, &st.ctx, endpoint, deadline).await {
                Ok(c) => c,
                Err(e) => return Err(Attempt::NotConnected(req, e)),
            };
            // The app thread that reads this request takes its colour (this connection carries
            // one request at a time, so the colour is this request's alone).
            st.ctx.colour_delivery(conn.local, endpoint, colour);
            match exchange(&mut conn, req).await {
                Ok(ex) => {
                    let park: Park = Box::new(move |c| {
                        let busy = busy;
                        busy.0.park_h1(c);
                    });
                    let body = H1Body::new(conn, &ex, park, st.ctx.shared.clone());
                    let mut resp = Response::new(body.boxed());
                    *resp.status_mut() = ex.head.status;
                    *resp.headers_mut() = ex.head.headers;
                    Ok(resp)
                }
                Err(Failed::NotSent(req)) => Err(Attempt::Stale(*req)),
                Err(Failed::Sent(e, head)) => Err(Attempt::Sent(e, Some(head))),
                Err(Failed::Malformed(e)) => Err(Attempt::Malformed(e.0)),
            }
        }
        HttpVersion::Http2 => {
            let mut sender = match acquire_h2(&pool, &pools.opened, &st.ctx, endpoint, deadline).await {
                Ok(s) => s,
                Err(e) => return Err(Attempt::NotConnected(req, e)),
            };
            if sender.ready().await.is_err() {
                return Err(Attempt::Stale(req));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(resp.map(|b| b.map_err(BoxError::from).boxed())),
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(Attempt::Stale(req)),
                    None => Err(Attempt::Sent(e.into_error().into(), None)),
                },
            }
        }
    }
}

/// An idle pooled HTTP/1.1 connection the upstream has not closed (the most recently parked
/// first), or a new one.
async fn acquire_h1(
    pool: &EndpointPool,
    opened: &Opened,
    ctx: &ConnCtx,
    endpoint: SocketAddr,
    deadline: Instant,
) -> io::Result<H1Conn> {
    let mut dead = Vec::new();
    let found = {
        let mut h1 = pool.h1.lock().expect("h1 pool lock");
        loop {
            match h1.pop() {
                Some(mut c) => {
                    if c.conn.idle_usable() {
                        break Some(c.conn);
                    }
                    dead.push(c);
                }
                None => break None,
            }
        }
    };
    drop(dead);
    if let Some(c) = found {
        return Ok(c);
    }
    // An inbound delivery connection of a propagating pod: forget its colour when it closes.
    let propagation = ctx.inbound.then(|| ctx.propagation().cloned()).flatten();
    let c = open_h1(&ctx.pod, propagation, endpoint, until(deadline)).await?;
    opened.request.fetch_add(1, Relaxed);
    Ok(c)
}

/// A new HTTP/1.1 upstream connection from `pod` to `endpoint`.
async fn open_h1(
    pod: &PodCtx,
    propagation: Option<crate::propagate::ColourKernel>,
    endpoint: SocketAddr,
    timeout: Duration,
) -> io::Result<H1Conn> {
    let tcp = crate::conn::connect_upstream(pod, endpoint, timeout).await?;
    H1Conn::new(tcp, endpoint, propagation)
}

/// The endpoint's multiplexed HTTP/2 connection, opened on first use or after it closed.
async fn acquire_h2(
    pool: &EndpointPool,
    opened: &Opened,
    ctx: &ConnCtx,
    endpoint: SocketAddr,
    deadline: Instant,
) -> io::Result<hc::http2::SendRequest<Body>> {
    let mut slot = pool.h2.lock().await;
    if let Some(s) = slot.as_ref() {
        if !s.is_closed() {
            return Ok(s.clone());
        }
    }
    *slot = None;
    let tcp = ctx.connect(endpoint, until(deadline)).await?;
    let (sender, conn) = hc::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream http2 connection to {endpoint}: {e}");
        }
    });
    opened.request.fetch_add(1, Relaxed);
    *slot = Some(sender.clone());
    Ok(sender)
}
