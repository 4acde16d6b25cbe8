//! HTTP/1.1, HTTP/2 and gRPC: hyper serves the app's connection, each request is routed with
//! the live policy and forwarded on a pooled upstream connection to the chosen endpoint.
//!
//! - The policy is loaded per request, so a swap applies to the next request on every open
//!   keep-alive connection and drops none.
//! - Upstream connections are pooled per (pod, endpoint, version) in [`HttpPools`]: HTTP/1.1
//!   keeps a list of keep-alive connections (one request at a time each), HTTP/2 one
//!   multiplexed connection. Every upstream socket is opened by [`ConnCtx::connect`] (the pod's
//!   netns, the daemon's mark).
//! - Hop-by-hop headers are stripped both ways; `Host`/`:authority` is kept as the app sent it;
//!   bodies and trailers stream through (gRPC streaming included).
//! - HTTP/1.1 `Upgrade` (WebSocket and the like) is forwarded on a dedicated upstream
//!   connection and, on `101`, both sides are spliced byte for byte.
//!
//! Answers the proxy makes itself carry `server: sockmesh` and a one-line text body:
//!
//! | failure | reason label | HTTP | gRPC (`grpc-status`, HTTP 200 trailers-only) |
//! |---|---|---|---|
//! | no route matched | `no_route` | 404 | 12 UNIMPLEMENTED |
//! | subset without endpoints | `no_endpoint` | 503 | 14 UNAVAILABLE |
//! | every connect attempt failed | `upstream_connect` | 502 | 14 UNAVAILABLE |
//! | upstream reset after the request was sent (not replayable) | `upstream_reset` | 502 | 14 UNAVAILABLE |
//! | no response head within the route's timeout | `timeout` | 504 | 4 DEADLINE_EXCEEDED |
//! | `CONNECT` | `connect_unsupported` | 501 | 12 UNIMPLEMENTED |
//!
//! No route is UNIMPLEMENTED for gRPC because the method is not served at all through this
//! service; retrying it elsewhere would not help (UNAVAILABLE would invite retries).
//!
//! Client-side protocol errors end only the offending connection and are counted by hyper's
//! classification: `header_too_large` (hyper answers 431), `malformed` (400), `header_timeout`
//! (an HTTP/1.1 head not complete within `[limits] request_head_timeout_ms` of its first byte:
//! 408 and closed), `preface_timeout` (HTTP/2 preface not in within that time: closed),
//! `idle_timeout` (no request for `client_idle_timeout_secs`: closed gracefully; counted, not an
//! error of the client), `incomplete`, `keepalive_timeout` (HTTP/2 ping unanswered), `io`,
//! `connection_error`. An HTTP/2 header list over [`MAX_HTTP2_HEADER_LIST_BYTES`] is refused by
//! the h2 layer with a 431 on that stream only; it does not reach the handler and is not counted.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{
    body::{Body as _, Incoming},
    client::conn as hc,
    server::conn as hs,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use super::ConnCtx;
use crate::{
    proxy::PodCtx,
    routing::{
        colour::{ColourId, COLOUR_HEADER},
        Decision, HeaderLookup, Outcome, ProtocolHint, RequestInfo, RouteStats,
    },
};

/// Largest HTTP/2 header list (`SETTINGS_MAX_HEADER_LIST_SIZE`) accepted from the app; a larger
/// one gets 431 on that stream.
pub const MAX_HTTP2_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// HTTP/2 PING interval on the app's connection and on upstream connections.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// An HTTP/2 peer that does not answer a PING within this time is disconnected.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams the proxy accepts on one HTTP/2 app connection.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// An idle pooled HTTP/1.1 upstream connection is closed after this long.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Pooled HTTP/1.1 upstream connections per (pod, endpoint); beyond it, extra connections
/// serve one request and close.
pub const MAX_POOLED_HTTP1_PER_ENDPOINT: usize = 256;
/// How often idle and dead upstream connections are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);
/// A pooled connection found closed when sending (nothing sent) is replaced this many times
/// per request without using up a retry.
const MAX_STALE_REPLACEMENTS: u32 = 3;

/// Which HTTP the app's connection speaks (from detection or the service's protocol hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 with prior knowledge (the preface), gRPC included.
    Http2,
}

impl HttpVersion {
    fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Upstream connection pools, per (pod, endpoint, version).
#[derive(Default)]
pub struct HttpPools {
    inner: Arc<PoolsInner>,
}

#[derive(Default)]
struct PoolsInner {
    pools: Mutex<HashMap<PoolKey, Arc<EndpointPool>>>,
    sweeper: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    pod: String,
    endpoint: SocketAddr,
    version: HttpVersion,
}

struct EndpointPool {
    /// The pod the connections were opened for; a re-enrolled pod with the same name gets a
    /// fresh pool (its netns may differ).
    pod: Weak<PodCtx>,
    /// HTTP/1.1: connections not known to be closed, ready or busy.
    h1: Mutex<Vec<PooledH1>>,
    /// HTTP/2: the one multiplexed connection. Held across connect so concurrent first
    /// requests share it.
    h2: tokio::sync::Mutex<Option<hc::http2::SendRequest<Body>>>,
    /// HTTP/1.1 requests between taking a connection and getting the response head: their
    /// connections are not in `h1` meanwhile (for [`HttpPools::h1_counts`]).
    h1_busy: AtomicUsize,
}

/// Counts one HTTP/1.1 request in flight on a pool until dropped.
struct Busy<'a>(&'a EndpointPool);

impl<'a> Busy<'a> {
    fn new(p: &'a EndpointPool) -> Self {
        p.h1_busy.fetch_add(1, Relaxed);
        Busy(p)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.h1_busy.fetch_sub(1, Relaxed);
    }
}

struct PooledH1 {
    sender: hc::http1::SendRequest<Body>,
    since: Instant,
    /// Our end's address (the app side's peer, for kernel propagation).
    local: SocketAddr,
}

impl HttpPools {
    /// Upstream connections currently pooled (HTTP/1.1 connections plus HTTP/2 connections).
    #[cfg(test)]
    fn connections(&self) -> usize {
        let pools = self.inner.pools.lock().expect("http pools lock");
        pools
            .values()
            .map(|p| {
                p.h1.lock().expect("h1 pool lock").len() + p.h2.try_lock().map_or(1, |s| s.is_some() as usize)
            })
            .sum()
    }

    fn get(&self, ctx: &ConnCtx, endpoint: SocketAddr, version: HttpVersion) -> Arc<EndpointPool> {
        self.get_for(&ctx.pod, endpoint, version)
    }

    fn get_for(&self, pod: &Arc<PodCtx>, endpoint: SocketAddr, version: HttpVersion) -> Arc<EndpointPool> {
        if !self.inner.sweeper.swap(true, Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&self.inner)));
        }
        let key = PoolKey {
            pod: pod.name.clone(),
            endpoint,
            version,
        };
        let mut pools = self.inner.pools.lock().expect("http pools lock");
        if let Some(p) = pools.get(&key) {
            if Weak::ptr_eq(&p.pod, &Arc::downgrade(pod)) {
                return p.clone();
            }
        }
        let p = Arc::new(EndpointPool {
            pod: Arc::downgrade(pod),
            h1: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            h1_busy: AtomicUsize::new(0),
        });
        pools.insert(key, p.clone());
        p
    }
}

/// Pre-connects (the dual-link switch, [`crate::links`]): opening upstream connections before
/// traffic moves, so the first requests on the new path do not wait for a connect and the
/// app's accept.
impl HttpPools {
    /// HTTP/1.1 connections pooled now, per (pod, endpoint), to any of `endpoints` (pods still
    /// enrolled; idle, streaming a body, or carrying a request until its response head;
    /// connections known to be closed are not counted).
    pub fn h1_counts(&self, endpoints: &[SocketAddr]) -> Vec<(Arc<PodCtx>, SocketAddr, usize)> {
        let pools = self.inner.pools.lock().expect("http pools lock");
        pools
            .iter()
            .filter(|(k, _)| k.version == HttpVersion::Http1 && endpoints.contains(&k.endpoint))
            .filter_map(|(k, p)| {
                let pod = p.pod.upgrade()?;
                let mut h1 = p.h1.lock().expect("h1 pool lock");
                h1.retain(|c| !c.sender.is_closed());
                Some((pod, k.endpoint, h1.len() + p.h1_busy.load(Relaxed)))
            })
            .collect()
    }

    /// Open HTTP/1.1 connections from `pod` to `endpoint` (concurrently, each bounded by
    /// `timeout`) until `want` are pooled (at most [`MAX_POOLED_HTTP1_PER_ENDPOINT`]). Returns
    /// how many were opened, or the first error when none could be.
    pub async fn preconnect_h1(
        &self,
        shared: &crate::proxy::Shared,
        pod: &Arc<PodCtx>,
        endpoint: SocketAddr,
        want: usize,
        timeout: Duration,
    ) -> io::Result<usize> {
        let pool = self.get_for(pod, endpoint, HttpVersion::Http1);
        let have = {
            let mut h1 = pool.h1.lock().expect("h1 pool lock");
            h1.retain(|c| !c.sender.is_closed());
            h1.len()
        };
        let want = want.min(MAX_POOLED_HTTP1_PER_ENDPOINT);
        if have >= want {
            return Ok(0);
        }
        let propagation = (pod.propagate && shared.colour.is_available()).then(|| shared.colour.clone());
        let mut opens = tokio::task::JoinSet::new();
        for _ in have..want {
            let (pod, propagation) = (pod.clone(), propagation.clone());
            opens.spawn(async move { open_h1(&pod, propagation, endpoint, timeout).await });
        }
        let (mut opened, mut first_err) = (0, None);
        while let Some(r) = opens.join_next().await {
            match r.map_err(io::Error::other).and_then(|r| r) {
                Ok((sender, local)) => {
                    let mut h1 = pool.h1.lock().expect("h1 pool lock");
                    if h1.len() < MAX_POOLED_HTTP1_PER_ENDPOINT {
                        h1.push(PooledH1 {
                            sender,
                            since: Instant::now(),
                            local,
                        });
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
            let mut h1 = p.h1.lock().expect("h1 pool lock");
            h1.retain(|c| {
                let idle_too_long = c.sender.is_ready() && c.since.elapsed() >= UPSTREAM_IDLE_TIMEOUT;
                !c.sender.is_closed() && !idle_too_long
            });
            let h2_live = match p.h2.try_lock() {
                Ok(mut s) => {
                    if s.as_ref().is_some_and(|s| s.is_closed()) {
                        *s = None;
                    }
                    s.is_some()
                }
                Err(_) => true,
            };
            !h1.is_empty() || h2_live
        });
    }
}

/// The app's socket, counting bytes into the connection's and the pod's counters.
struct Counted {
    inner: TcpStream,
    ctx: ConnCtx,
    head: Arc<HeadClock>,
    /// Bytes read but not parsed: by a parked HTTP/1.1 session, or by a previous generation
    /// before it handed the connection over (upgrade). Replayed first, not counted again.
    prefix: Bytes,
    /// Set when the connection is being handed over: hyper's final shutdown must not reach
    /// the socket (it is shared with the next generation).
    keep_open: Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.ctx.entry.bytes_to_upstream.fetch_add(n, Relaxed);
            self.ctx.pod.stats.bytes_upstream.fetch_add(n, Relaxed);
            self.head.on_read(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl Counted {
    fn count_written(&self, n: usize) {
        self.ctx.entry.bytes_to_client.fetch_add(n as u64, Relaxed);
        self.ctx.pod.stats.bytes_downstream.fetch_add(n as u64, Relaxed);
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.keep_open.load(Relaxed) {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if self.head.parking.load(Relaxed) {
            // hyper ends its session on an idle connection we park: the socket stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests in flight on one app connection (until the response body ends), for the idle
/// timeout.
struct Inflight {
    count: AtomicUsize,
    last_change: Mutex<Instant>,
    /// While this generation drains: a response's head is written and its body holds back one
    /// poll ([`HeadOut`]), so hyper reads no further head until it goes on. Stopping the
    /// session now loses nothing and adds no `Connection: close` to a head.
    head_out: std::sync::atomic::AtomicBool,
}

struct InflightGuard(Arc<Inflight>);

impl Inflight {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            last_change: Mutex::new(Instant::now()),
            head_out: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Resolves (when polled) while a response head is out and its body holds back, taking
    /// the signal (the body goes on). [`HeadOut`] wakes the task when it starts holding back.
    async fn head_out(&self) {
        std::future::poll_fn(|_| {
            if self.head_out.swap(false, Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Relaxed);
        *self.last_change.lock().expect("inflight lock") = Instant::now();
        InflightGuard(self.clone())
    }

    /// Resolves once nothing has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = *self.last_change.lock().expect("inflight lock");
            if self.count.load(Relaxed) == 0 && last.elapsed() >= idle {
                return;
            }
            let wake = if self.count.load(Relaxed) == 0 {
                last + idle
            } else {
                Instant::now() + idle
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        *self.0.last_change.lock().expect("inflight lock") = Instant::now();
        self.0.count.fetch_sub(1, Relaxed);
    }
}

/// The request-head clock of one app connection (`[limits] request_head_timeout_ms`, the
/// slowloris defence). HTTP/1.1: started by the first byte read while no request is in
/// flight, stopped when a head is parsed (the handler runs). HTTP/2: started at accept,
/// stopped once the 24-byte preface is in. hyper's own header timer is not used: it also runs
/// while a keep-alive connection waits for its next request, so it closed every idle
/// keep-alive connection after the timeout.
struct HeadClock {
    version: HttpVersion,
    inflight: Arc<Inflight>,
    running: AtomicBool,
    started: Mutex<Option<Instant>>,
    /// Bytes read so far (HTTP/2, until the preface is in).
    read: AtomicUsize,
    notify: tokio::sync::Notify,
    /// An idle HTTP/1.1 session is being ended to park the connection ([`H1_PARK_AFTER`]).
    parking: AtomicBool,
    /// Requests whose head was parsed on this connection.
    served: AtomicUsize,
}

/// The HTTP/2 connection preface (`PRI * HTTP/2.0...`).
const HTTP2_PREFACE_LEN: usize = 24;

impl HeadClock {
    fn new(version: HttpVersion, inflight: Arc<Inflight>) -> Arc<Self> {
        let c = Arc::new(Self {
            version,
            inflight,
            running: AtomicBool::new(false),
            started: Mutex::new(None),
            read: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
            parking: AtomicBool::new(false),
            served: AtomicUsize::new(0),
        });
        if version == HttpVersion::Http2 {
            c.start();
        }
        c
    }

    fn on_read(&self, n: u64) {
        match self.version {
            HttpVersion::Http1 => {
                if !self.running.load(Relaxed) && self.inflight.count.load(Relaxed) == 0 {
                    self.start();
                }
            }
            HttpVersion::Http2 => {
                if self.running.load(Relaxed)
                    && self.read.fetch_add(n as usize, Relaxed) + n as usize >= HTTP2_PREFACE_LEN
                {
                    self.stop();
                }
            }
        }
    }

    fn start(&self) {
        let mut s = self.started.lock().expect("head clock lock");
        if s.is_none() {
            *s = Some(Instant::now());
            self.running.store(true, Relaxed);
            self.notify.notify_one();
        }
    }

    fn running(&self) -> bool {
        self.running.load(Relaxed)
    }

    /// A request head was parsed: the clock stops.
    fn request_started(&self) {
        self.served.fetch_add(1, Relaxed);
        self.stop();
    }

    fn stop(&self) {
        if self.running.swap(false, Relaxed) {
            *self.started.lock().expect("head clock lock") = None;
        }
    }

    /// Resolves once a head (or the preface) has been on its way for `timeout`.
    async fn expired(&self, timeout: Duration) {
        loop {
            let started = *self.started.lock().expect("head clock lock");
            match started {
                None => self.notify.notified().await,
                Some(t) => {
                    tokio::time::sleep_until(t + timeout).await;
                    if *self.started.lock().expect("head clock lock") == Some(t) {
                        return;
                    }
                }
            }
        }
    }
}

/// Answer 408 on the app's socket `fd` (HTTP/1.1, no request in flight, so nothing else is
/// being written), just before the connection is dropped.
fn answer_408(fd: std::os::fd::RawFd) {
    const R: &[u8] =
        b"HTTP/1.1 408 Request Timeout\r\nserver: sockmesh\r\nsockmesh-error: header_timeout\r\n\
connection: close\r\ncontent-length: 0\r\n\r\n";
    // SAFETY: `fd` is the app's socket, still open (its owner is dropped only after this);
    // a non-blocking send of a few bytes.
    unsafe {
        libc::send(
            fd,
            R.as_ptr().cast(),
            R.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// What every request of one app connection shares.
struct ConnState {
    ctx: ConnCtx,
    version: HttpVersion,
    inflight: Arc<Inflight>,
    head: Arc<HeadClock>,
}

/// Serve one app connection until it closes.
pub async fn serve(client: TcpStream, version: HttpVersion, ctx: ConnCtx) {
    serve_with(client, Bytes::new(), version, ctx).await
}

/// An HTTP/1.1 app connection handed over by the previous generation (upgrade), with the bytes
/// it had already read.
pub async fn serve_handed_over(client: TcpStream, read: Bytes, ctx: ConnCtx) {
    serve_with(client, read, HttpVersion::Http1, ctx).await
}

async fn serve_with(client: TcpStream, prefix: Bytes, version: HttpVersion, ctx: ConnCtx) {
    let limits = &ctx.shared.limits;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
    let inflight = Inflight::new();
    let head = HeadClock::new(version, inflight.clone());
    let keep_open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = TokioIo::new(Counted {
        inner: client,
        ctx: ctx.clone(),
        head: head.clone(),
        prefix,
        keep_open: keep_open.clone(),
    });
    let state = Arc::new(ConnState {
        ctx: ctx.clone(),
        version,
        inflight: inflight.clone(),
        head: head.clone(),
    });
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move {
            let mut resp = handle(req, state).await;
            // A draining generation (upgrade) that cannot hand the connection over: the
            // client's next request goes to the successor on a new connection.
            crate::upgrade::close_after_response(
                version == HttpVersion::Http1 && !crate::upgrade::can_hand_over(),
                &mut resp,
            );
            Ok::<_, Infallible>(resp)
        }
    });
    // Run the connection; after the idle timeout ask it to finish gracefully and keep driving
    // it until it does.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => break Some(r),
                    _ = inflight.idle_for(limits.client_idle_timeout), if !closing => {
                        debug!("idle app connection: closing");
                        ctx.l7().errors.count(version.label(), "idle_timeout");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = head.expired(limits.request_head_timeout), if !closing => {
                        if version == HttpVersion::Http1 {
                            answer_408(fd);
                        }
                        break None;
                    }
                    _ = crate::upgrade::drain_close(version == HttpVersion::Http2), if !closing => {
                        debug!("upgrade: draining app connection");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }};
    }
    let result = match version {
        HttpVersion::Http1 => {
            let mut b = hs::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_buf_size(limits.max_request_head_bytes)
                .keep_alive(true);
            serve_h1(&b, io, svc, &ctx, &inflight, &head, fd).await
        }
        HttpVersion::Http2 => {
            let mut b = hs::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
                .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
                .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
            // Boxed: an HTTP/1.1 connection's task keeps no room for it.
            Box::pin(async { drive!(b.serve_connection(io, svc)) }).await
        }
    };
    let Some(result) = result else {
        let reason = match version {
            HttpVersion::Http1 => "header_timeout",
            HttpVersion::Http2 => "preface_timeout",
        };
        debug!(reason, "slow app connection: closed");
        ctx.l7().errors.count(version.label(), reason);
        return;
    };
    if let Err(e) = result {
        let reason = conn_error_reason(&e, version);
        debug!(reason, "app connection ended: {e}");
        ctx.l7().errors.count(version.label(), reason);
    }
}

/// An idle HTTP/1.1 keep-alive connection gives back hyper's session (its 8 KiB read and write
/// buffers, the cached header map, the boxed request handler) after this long without a
/// request and with no head on its way; the next request's first byte starts a new session on
/// the same socket. A new connection gets its first session with its first byte.
pub const H1_PARK_AFTER: Duration = Duration::from_secs(1);

/// Drive an HTTP/1.1 app connection: hyper sessions on the socket, parked while idle (see
/// [`H1_PARK_AFTER`]), with the idle and head time-outs. `None`: a head took too long (408).
async fn serve_h1<S>(
    b: &hs::http1::Builder,
    mut io: TokioIo<Counted>,
    mut svc: S,
    ctx: &ConnCtx,
    inflight: &Inflight,
    head: &HeadClock,
    fd: std::os::fd::RawFd,
) -> Option<Result<(), hyper::Error>>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &ctx.shared.limits;
    loop {
        // Parked (also before the first request): only the socket and this task until the
        // client sends or closes; hyper's session starts with the first byte.
        if io.inner().prefix.is_empty() {
            tokio::select! {
                r = io.inner().inner.readable() => {
                    if r.is_err() {
                        return Some(Ok(()));
                    }
                }
                _ = inflight.idle_for(limits.client_idle_timeout) => {
                    debug!("idle app connection: closing");
                    ctx.l7().errors.count("http1", "idle_timeout");
                    return Some(Ok(()));
                }
                // An upgrade drains this generation: a parked connection is between requests.
                hand = crate::upgrade::drain_http1(std::future::ready(())) => {
                    debug!(hand, "upgrade: draining a parked app connection");
                    if hand {
                        let counted = io.into_inner();
                        let read = counted.prefix.to_vec();
                        crate::upgrade::hand_over_http1(counted.inner, read, ctx);
                    }
                    return Some(Ok(()));
                }
            }
        }
        // Boxed: a parked connection keeps no room for hyper's session state.
        match Box::pin(h1_session(b, io, svc, ctx, inflight, head, fd)).await {
            H1Session::Done(r) => return r,
            H1Session::Parked(i, s) => {
                (io, svc) = (i, s);
                ctx.shared.memory.freed();
            }
        }
    }
}

/// How one hyper session on an HTTP/1.1 app connection ended.
enum H1Session<S> {
    /// The connection is done; `None`: a head took too long (408 sent).
    Done(Option<Result<(), hyper::Error>>),
    /// Idle: hyper's state is dropped, the socket (with any unparsed bytes) and the service
    /// are back.
    Parked(TokioIo<Counted>, S),
}

/// One hyper session: until the connection ends, or is idle long enough to park.
async fn h1_session<S>(
    b: &hs::http1::Builder,
    io: TokioIo<Counted>,
    svc: S,
    ctx: &ConnCtx,
    inflight: &Inflight,
    head: &HeadClock,
    fd: std::os::fd::RawFd,
) -> H1Session<S>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &ctx.shared.limits;
    head.parking.store(false, Relaxed);
    let keep_open = io.inner().keep_open.clone();
    let mut conn = b.serve_connection(io, svc).with_upgrades();
    let (mut closing, mut parking, mut handing) = (false, false, false);
    let park = parkable(inflight, head, head.served.load(Relaxed));
    tokio::pin!(park);
    let r = loop {
        tokio::select! {
            r = &mut conn => break r,
            _ = inflight.idle_for(limits.client_idle_timeout), if !closing => {
                debug!("idle app connection: closing");
                ctx.l7().errors.count("http1", "idle_timeout");
                Pin::new(&mut conn).graceful_shutdown();
                closing = true;
            }
            _ = &mut park, if !closing => {
                head.parking.store(true, Relaxed);
                Pin::new(&mut conn).graceful_shutdown();
                (closing, parking) = (true, true);
            }
            _ = head.expired(limits.request_head_timeout), if !closing => {
                answer_408(fd);
                return H1Session::Done(None);
            }
            // While an upgrade drains this generation: stop at a request boundary and hand the
            // socket (with any bytes already read) to the successor instead of closing it.
            // The boundary is 2 ms with nothing in flight, or (a pipelining client never
            // leaves that gap) a response whose head is written and whose body holds back
            // one poll: hyper then finishes that response (its head already out, so without
            // the `Connection: close` it would add to a head written after the stop) and reads
            // no further head; the pipelined requests stay in its read buffer and move.
            hand = crate::upgrade::drain_http1(async {
                tokio::select! {
                    _ = inflight.idle_for(Duration::from_millis(2)) => {}
                    _ = inflight.head_out() => {}
                }
            }), if !closing => {
                debug!(hand, "upgrade: draining app connection");
                closing = true;
                if hand {
                    keep_open.store(true, Relaxed);
                    handing = true;
                }
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if handing && r.is_ok() {
        if let Some(parts) = conn.into_parts() {
            let counted = parts.io.into_inner();
            let mut read = parts.read_buf.to_vec();
            read.extend_from_slice(&counted.prefix);
            crate::upgrade::hand_over_http1(counted.inner, read, ctx);
            return H1Session::Done(Some(Ok(())));
        }
        return H1Session::Done(Some(r));
    }
    if !parking || r.is_err() {
        return H1Session::Done(Some(r));
    }
    // Upgraded (the socket went with the upgrade): done.
    let Some(parts) = conn.into_parts() else {
        return H1Session::Done(Some(r));
    };
    let mut io = parts.io;
    if !parts.read_buf.is_empty() {
        io.inner_mut().prefix = parts.read_buf;
    }
    H1Session::Parked(io, parts.service)
}

/// Resolves when an HTTP/1.1 session can be parked: it served a request (so hyper is between
/// requests: ending it loses nothing), nothing has been in flight for [`H1_PARK_AFTER`] and no
/// head is on its way.
async fn parkable(inflight: &Inflight, head: &HeadClock, served_at_start: usize) {
    loop {
        inflight.idle_for(H1_PARK_AFTER).await;
        if head.served.load(Relaxed) > served_at_start && !head.running() {
            return;
        }
        tokio::time::sleep(H1_PARK_AFTER).await;
    }
}

/// The counted reason of a connection-level hyper error on the app's side.
fn conn_error_reason(e: &hyper::Error, version: HttpVersion) -> &'static str {
    if e.is_parse_too_large() {
        "header_too_large"
    } else if e.is_parse() {
        "malformed"
    } else if e.is_timeout() {
        match version {
            HttpVersion::Http1 => "header_timeout",
            HttpVersion::Http2 => "keepalive_timeout",
        }
    } else if e.is_incomplete_message() {
        "incomplete"
    } else if std::error::Error::source(e).is_some_and(|s| s.is::<io::Error>()) {
        "io"
    } else {
        "connection_error"
    }
}

/// The size of an HTTP/1.1 request head as sent (request line, headers, CRLFs).
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    line + headers + 2
}

/// Case-insensitive lookup over an `http::HeaderMap` (its `&str` lookup ignores ASCII case).
struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn grpc_service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// Host as the app sent it: `Host` for HTTP/1.1 (else the absolute URI's authority),
/// `:authority` for HTTP/2 (else `Host`).
fn request_host<'a>(version: HttpVersion, uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let from_header = || headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let from_uri = || uri.authority().map(|a| a.as_str());
    match version {
        HttpVersion::Http1 => from_header().or_else(from_uri),
        HttpVersion::Http2 => from_uri().or_else(from_header),
    }
}

/// Remove the headers that describe one hop only: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `TE` (except `trailers`), `Transfer-Encoding` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in proxy {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Methods a request may be replayed with after it was sent (when it has no body).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A response the proxy makes itself.
fn local_reply(status: StatusCode, grpc_code: u8, grpc: bool, msg: &str) -> Response<Body> {
    let mut b = Response::builder().header(header::SERVER, "sockmesh");
    let body = if grpc {
        // Trailers-only: the status travels in the (only) header block.
        b = b
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", grpc_code.to_string())
            .header("grpc-message", grpc_message(msg));
        Bytes::new()
    } else {
        b = b
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        Bytes::from(format!("sockmesh: {msg}\n"))
    };
    b.body(Full::new(body).map_err(|never| match never {}).boxed())
        .expect("a valid local reply")
}

/// `grpc-message` is percent-encoded (printable ASCII except `%` passes as is).
fn grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer for a failure label (see the table in the module docs).
fn failure_reply(reason: &'static str, grpc: bool, msg: &str) -> Response<Body> {
    let (status, code) = match reason {
        "no_route" => (StatusCode::NOT_FOUND, 12),
        "no_endpoint" | "colour_unavailable" => (StatusCode::SERVICE_UNAVAILABLE, 14),
        "timeout" => (StatusCode::GATEWAY_TIMEOUT, 4),
        "connect_unsupported" => (StatusCode::NOT_IMPLEMENTED, 12),
        _ => (StatusCode::BAD_GATEWAY, 14),
    };
    let mut resp = local_reply(status, code, grpc, msg);
    // The reason, machine-readable (`colour_unavailable`, `timeout`, ...).
    resp.headers_mut()
        .insert("sockmesh-error", HeaderValue::from_static(reason));
    resp
}

/// One request from the app: route it, forward it, answer.
async fn handle(req: Request<Incoming>, st: Arc<ConnState>) -> Response<Body> {
    let started = Instant::now();
    let guard = st.inflight.enter();
    st.head.request_started();
    let grpc = is_grpc(req.headers());
    let proto = if grpc { "grpc" } else { st.version.label() };
    // hyper's buffer limit is approximate (a read may carry the head past it): check exactly.
    let max_head = st.ctx.shared.limits.max_request_head_bytes;
    if st.version == HttpVersion::Http1 && head_size(&req) > max_head {
        st.ctx.l7().errors.count(proto, "header_too_large");
        let mut resp = local_reply(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            8,
            false,
            &format!("request head over {max_head} bytes"),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let policy = st.ctx.l7().router.current();
    let routed = {
        let path = req.uri().path();
        let (service, method) = match grpc.then(|| grpc_service_method(path)).flatten() {
            Some((s, m)) => (Some(s), Some(m)),
            None => (None, Some(req.method().as_str())),
        };
        let info = RequestInfo {
            protocol: match (grpc, st.version) {
                (true, _) => ProtocolHint::Grpc,
                (false, HttpVersion::Http1) => ProtocolHint::Http1,
                (false, HttpVersion::Http2) => ProtocolHint::Http2,
            },
            host: request_host(st.version, req.uri(), req.headers()),
            path: Some(path),
            service,
            method,
            version: None,
            headers: &Headers(req.headers()),
        };
        // HTTP/1.1 carries one request at a time: every byte read so far belongs to this
        // request or an earlier one, so the last one read is inside it (the ledger keeps the
        // offsets where the app thread's colour changed).
        let propagated = match st.version {
            HttpVersion::Http1 => st
                .ctx
                .propagated_at(st.ctx.entry.bytes_to_upstream.load(Relaxed).saturating_sub(1)),
            _ => None,
        };
        st.ctx.route(&policy, &info, propagated)
    };
    let (choice, routed) = routed;
    let mut req = req;
    if policy.colouring() {
        // The colour travels with the request (the next hop's proxy reads it); one from outside
        // the mesh, or garbage, never does.
        let h = req.headers_mut();
        h.remove(COLOUR_HEADER);
        if choice.colour != 0 {
            if let Ok(v) = HeaderValue::from_str(policy.colours().name(choice.colour)) {
                h.insert(COLOUR_HEADER, v);
            }
        }
    }
    drop(policy);
    let decision = match routed {
        Ok(d) => d,
        Err(e) => {
            st.ctx.l7().errors.count(proto, e.reason());
            debug!("{e}");
            return failure_reply(e.reason(), grpc, &e.to_string());
        }
    };
    // hyper drops this future when the app closes its connection before the answer: the
    // request was routed (and maybe served), so it is still counted, as `client_closed`.
    let pending = Pending {
        stats: &decision.stats,
        started,
        done: false,
    };
    let result = if req.method() == Method::CONNECT {
        Err(("connect_unsupported", "CONNECT is not proxied".to_owned()))
    } else if st.version == HttpVersion::Http1 && req.headers().contains_key(header::UPGRADE) {
        forward_upgrade(&st, req, &decision, started).await
    } else {
        forward(&st, req, &decision, started).await
    };
    match result {
        Ok(resp) => {
            pending.finish(Outcome::Answered);
            // The request stays in flight until its response body is done.
            let (parts, body) = resp.into_parts();
            let body = body
                .map_frame(move |f| {
                    let _ = &guard;
                    f
                })
                .boxed();
            let body = if st.version == HttpVersion::Http1 {
                HeadOut {
                    inner: body,
                    inflight: st.inflight.clone(),
                    hold: None,
                    done: false,
                }
                .boxed()
            } else {
                body
            };
            Response::from_parts(parts, body)
        }
        Err((reason, msg)) => {
            st.ctx.l7().errors.count(proto, reason);
            pending.finish(Outcome::Failed(reason));
            debug!(reason, "{msg}");
            failure_reply(reason, grpc, &msg)
        }
    }
}

/// An HTTP/1.1 response body that, while this generation drains for an upgrade with a
/// successor to hand connections to, holds back before its first frame and says so in
/// [`Inflight::head_out`]: hyper has written the head and reads no further head until this body
/// ends, so `h1_session` can stop the session at this request boundary. It holds until
/// `h1_session` took the signal (it clears the flag), at most [`HEAD_OUT_HOLD`]. (Holding for
/// one poll was not enough: with pipelined requests in its buffer hyper polls the body again
/// within the same poll of the connection.)
struct HeadOut {
    inner: Body,
    inflight: Arc<Inflight>,
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

/// The longest a response body holds back for the upgrade's hand-over signal.
const HEAD_OUT_HOLD: Duration = Duration::from_millis(5);

impl hyper::body::Body for HeadOut {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if !this.done && crate::upgrade::is_draining() && crate::upgrade::can_hand_over() {
            this.done = true;
            this.inflight.head_out.store(true, Relaxed);
            this.hold = Some(Box::pin(tokio::time::sleep(HEAD_OUT_HOLD)));
            debug!("upgrade: a response head is out; its body holds back");
            // The session's select runs its other branches now (the hold's timer is the
            // bound).
            cx.waker().wake_by_ref();
        }
        this.done = true;
        if let Some(hold) = this.hold.as_mut() {
            if this.inflight.head_out.load(Relaxed) && std::future::Future::poll(hold.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            this.hold = None;
            this.inflight.head_out.store(false, Relaxed);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for HeadOut {
    fn drop(&mut self) {
        if self.hold.is_some() {
            self.inflight.head_out.store(false, Relaxed);
        }
    }
}

/// Counts a routed request once: by its outcome, or as [`CLIENT_CLOSED`] when its handler is
/// dropped before it finished.
struct Pending<'a> {
    stats: &'a RouteStats,
    started: Instant,
    done: bool,
}

impl Pending<'_> {
    fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.stats.record(outcome, self.started.elapsed());
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.stats
                .record(Outcome::Failed(CLIENT_CLOSED), self.started.elapsed());
        }
    }
}

/// Failure reason of a request the app gave up on (closed or reset its connection, or an
/// HTTP/2 stream reset) before the answer came.
pub const CLIENT_CLOSED: &str = "client_closed";

type Failure = (&'static str, String);

/// What the proxy needs to replay a request without a body.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<Body> {
        let mut r = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// The request as it goes upstream: hop-by-hop headers gone, URI in the form the upstream
/// version wants.
fn upstream_parts(parts: &mut http::request::Parts, version: HttpVersion, endpoint: SocketAddr) {
    strip_hop_by_hop(&mut parts.headers);
    match version {
        HttpVersion::Http1 => {
            parts.version = Version::HTTP_11;
            // Origin form; the Host header carries the authority.
            if parts.uri.authority().is_some() {
                if !parts.headers.contains_key(header::HOST) {
                    if let Some(a) = parts
                        .uri
                        .authority()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    {
                        parts.headers.insert(header::HOST, a);
                    }
                }
                let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                if let Ok(u) = pq.parse() {
                    parts.uri = u;
                }
            }
        }
        HttpVersion::Http2 => {
            parts.version = Version::HTTP_2;
            // h2 needs :scheme and :authority: from the URI, else Host, else the endpoint.
            if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
                let authority = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or_else(|| endpoint.to_string());
                let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
                if let Ok(u) = Uri::builder()
                    .scheme("http")
                    .authority(authority.as_str())
                    .path_and_query(pq)
                    .build()
                {
                    parts.uri = u;
                }
            }
            parts.headers.remove(header::HOST);
        }
    }
}

/// Forward one request with retries; the route's timeout bounds everything up to the response
/// head.
async fn forward(
    st: &ConnState,
    req: Request<Incoming>,
    d: &Decision,
    started: Instant,
) -> Result<Response<Incoming>, Failure> {
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, st.version, d.endpoint);
    let no_body = body.is_end_stream();
    let replay = (idempotent(&parts.method) && no_body).then(|| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    });
    let mut pending = Some(Request::from_parts(parts, body.boxed()));
    let deadline = started + d.timeout;
    let attempts = async {
        let mut attempt = 0u32;
        let mut stale = 0u32;
        loop {
            let endpoint = d.endpoint_for_attempt(attempt);
            let req = match pending.take().or_else(|| replay.as_ref().map(Replay::request)) {
                Some(r) => r,
                None => unreachable!("a request is pending or replayable"),
            };
            let failure = match send_once(st, endpoint, req, deadline, d.colour).await {
                Ok(resp) => return Ok(resp),
                Err(Attempt::Stale(r)) if stale < MAX_STALE_REPLACEMENTS => {
                    stale += 1;
                    pending = Some(r);
                    continue;
                }
                Err(Attempt::Stale(r)) => {
                    pending = Some(r);
                    (
                        "upstream_connect",
                        format!("upstream {endpoint} closed before the request was sent"),
                    )
                }
                Err(Attempt::NotConnected(r, e)) => {
                    pending = Some(r);
                    (
                        "upstream_connect",
                        format!("upstream {endpoint} unreachable: {e}"),
                    )
                }
                Err(Attempt::Sent(e)) => {
                    let f = ("upstream_reset", format!("upstream {endpoint} failed: {e}"));
                    if replay.is_none() {
                        return Err(f);
                    }
                    f
                }
            };
            debug!(attempt, "{}", failure.1);
            if attempt >= d.retries {
                return Err(failure);
            }
            attempt += 1;
            d.stats.record_retry();
        }
    };
    match tokio::time::timeout_at(deadline, attempts).await {
        Ok(r) => {
            let mut resp = r?;
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
        Err(_) => Err((
            "timeout",
            format!("no response within {} ms", d.timeout.as_millis()),
        )),
    }
}

enum Attempt {
    /// Could not connect; nothing was sent.
    NotConnected(Request<Body>, io::Error),
    /// The pooled connection was closed before the request was written.
    Stale(Request<Body>),
    /// The request (or part of it) went out and the exchange failed.
    Sent(hyper::Error),
}

/// One attempt on a pooled connection to `endpoint`.
async fn send_once(
    st: &ConnState,
    endpoint: SocketAddr,
    req: Request<Body>,
    deadline: Instant,
    colour: ColourId,
) -> Result<Response<Incoming>, Attempt> {
    let pool = st.ctx.l7().http.get(&st.ctx, endpoint, st.version);
    match st.version {
        HttpVersion::Http1 => {
            let _busy = Busy::new(&pool);
            let (mut sender, local) = match acquire_h1(&pool, &st.ctx, endpoint, deadline).await {
                Ok(s) => s,
                Err(e) => return Err(Attempt::NotConnected(req, e)),
            };
            if sender.ready().await.is_err() {
                return Err(Attempt::Stale(req));
            }
            // The app thread that reads this request takes its colour (this connection carries
            // one request at a time, so the colour is this request's alone).
            st.ctx.colour_delivery(local, endpoint, colour);
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let mut h1 = pool.h1.lock().expect("h1 pool lock");
                    if h1.len() < MAX_POOLED_HTTP1_PER_ENDPOINT {
                        h1.push(PooledH1 {
                            sender,
                            since: Instant::now(),
                            local,
                        });
                    }
                    Ok(resp)
                }
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(Attempt::Stale(req)),
                    None => Err(Attempt::Sent(e.into_error())),
                },
            }
        }
        HttpVersion::Http2 => {
            let mut sender = match acquire_h2(&pool, &st.ctx, endpoint, deadline).await {
                Ok(s) => s,
                Err(e) => return Err(Attempt::NotConnected(req, e)),
            };
            if sender.ready().await.is_err() {
                return Err(Attempt::Stale(req));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(Attempt::Stale(req)),
                    None => Err(Attempt::Sent(e.into_error())),
                },
            }
        }
    }
}

fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A ready pooled HTTP/1.1 connection, or a new one.
async fn acquire_h1(
    pool: &EndpointPool,
    ctx: &ConnCtx,
    endpoint: SocketAddr,
    deadline: Instant,
) -> io::Result<(hc::http1::SendRequest<Body>, SocketAddr)> {
    {
        let mut h1 = pool.h1.lock().expect("h1 pool lock");
        h1.retain(|c| !c.sender.is_closed());
        if let Some(i) = h1.iter().position(|c| c.sender.is_ready()) {
            let c = h1.swap_remove(i);
            return Ok((c.sender, c.local));
        }
    }
    // An inbound delivery connection of a propagating pod: forget its colour when it closes.
    let propagation = ctx.inbound.then(|| ctx.propagation().cloned()).flatten();
    open_h1(&ctx.pod, propagation, endpoint, until(deadline)).await
}

/// A new HTTP/1.1 upstream connection from `pod` to `endpoint` (driven by its own task).
async fn open_h1(
    pod: &PodCtx,
    propagation: Option<crate::propagate::ColourKernel>,
    endpoint: SocketAddr,
    timeout: Duration,
) -> io::Result<(hc::http1::SendRequest<Body>, SocketAddr)> {
    let tcp = crate::proxy::connect_upstream(pod, endpoint, timeout).await?;
    let local = tcp.local_addr()?;
    let (sender, conn) = hc::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream http1 connection to {endpoint}: {e}");
        }
        if let Some(p) = propagation {
            let (app_local, app_remote) = crate::propagate::app_side_of_delivering(local, endpoint);
            p.clear_inbound(app_local, app_remote);
        }
    });
    Ok((sender, local))
}

/// The endpoint's multiplexed HTTP/2 connection, opened on first use or after it closed.
async fn acquire_h2(
    pool: &EndpointPool,
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
    *slot = Some(sender.clone());
    Ok(sender)
}

/// HTTP/1.1 `Upgrade`: forward on a dedicated upstream connection (connect failures retried on
/// the route's other endpoints); on `101`, splice the two upgraded connections.
async fn forward_upgrade(
    st: &ConnState,
    mut req: Request<Incoming>,
    d: &Decision,
    started: Instant,
) -> Result<Response<Incoming>, Failure> {
    let on_client = hyper::upgrade::on(&mut req);
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, HttpVersion::Http1, d.endpoint);
    if let Some(u) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u);
    }
    let up_req = Request::from_parts(parts, body.boxed());
    let deadline = started + d.timeout;
    let exchange = async {
        let mut attempt = 0u32;
        let tcp = loop {
            let endpoint = d.endpoint_for_attempt(attempt);
            match st.ctx.connect(endpoint, until(deadline)).await {
                Ok(t) => break t,
                Err(e) if attempt >= d.retries => {
                    return Err((
                        "upstream_connect",
                        format!("upstream {endpoint} unreachable: {e}"),
                    ))
                }
                Err(e) => debug!(attempt, "upstream {endpoint} unreachable: {e}"),
            }
            attempt += 1;
            d.stats.record_retry();
        };
        let (mut sender, conn) = hc::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ("upstream_connect", format!("upstream handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("upstream upgrade connection: {e}");
            }
        });
        sender
            .send_request(up_req)
            .await
            .map_err(|e| ("upstream_reset", format!("upstream failed: {e}")))
    };
    let mut resp = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(r) => r?,
        Err(_) => {
            return Err((
                "timeout",
                format!("no response within {} ms", d.timeout.as_millis()),
            ))
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let on_upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::join!(on_client, on_upstream) {
                (Ok(c), Ok(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                (c, u) => debug!("upgrade failed: client {:?}, upstream {:?}", c.err(), u.err()),
            }
        });
        // Keep Connection/Upgrade on the 101: they are the handshake.
        let keep_upgrade = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = keep_upgrade {
            resp.headers_mut().insert(header::UPGRADE, u);
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        sync::atomic::{AtomicU64, Ordering::Relaxed},
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        task::JoinSet,
    };

    use super::*;
    use crate::{
        proxy::{ConnEntry, Direction, OrigDstSource, Shared},
        routing::{compile, parse_toml, Policy, Router},
        sys::NetNs,
    };

    /// Every test is bounded by this.
    const BOUND: Duration = Duration::from_secs(20);
    /// The app's original destination the test services claim.
    const VIP: &str = "10.255.0.1:80";

    struct NoOrigDst;

    impl OrigDstSource for NoOrigDst {
        fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    /// A plain upstream (HTTP/1.1 and prior-knowledge HTTP/2) answering its own name. It
    /// echoes what it saw in `x-seen-*` headers, sleeps `x-delay-ms`, and answers gRPC with
    /// the request body and `grpc-status: 0` trailers.
    async fn upstream(name: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        h.fetch_add(1, Relaxed);
                        upstream_answer(name, req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, hits)
    }

    async fn upstream_answer(
        name: &'static str,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        if req.headers().contains_key(header::UPGRADE) {
            // Echo whatever comes after the switch.
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => io.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
            return Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "echo")
                .header("x-name", name)
                .body(empty())
                .unwrap());
        }
        let (parts, body) = req.into_parts();
        if let Some(ms) = parts
            .headers
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or(parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("")
            .to_owned();
        let mut b = Response::builder()
            .header("x-name", name)
            .header("x-seen-host", host)
            .header("x-seen-foo", parts.headers.contains_key("x-foo").to_string())
            .header(
                "x-seen-keep-alive",
                parts.headers.contains_key("keep-alive").to_string(),
            )
            .header("x-seen-path", parts.uri.path());
        if is_grpc(&parts.headers) {
            let data = body.collect().await.unwrap().to_bytes();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("x-upstream", HeaderValue::from_static(name));
            let body = Frames(
                vec![
                    hyper::body::Frame::data(data),
                    hyper::body::Frame::trailers(trailers),
                ]
                .into(),
            );
            b = b.header(header::CONTENT_TYPE, "application/grpc");
            return Ok(b.body(body.boxed()).unwrap());
        }
        let _ = body.collect().await;
        Ok(b.body(full(name)).unwrap())
    }

    fn full(s: &str) -> Body {
        Full::new(Bytes::from(s.to_owned()))
            .map_err(|never| match never {})
            .boxed()
    }

    fn empty() -> Body {
        Empty::new().map_err(|never| match never {}).boxed()
    }

    /// A body made of given frames (data, then trailers).
    struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn policy(text: &str) -> Policy {
        compile(parse_toml(text).unwrap()).unwrap()
    }

    /// The canonical two-version service at [`VIP`] with `routes` appended.
    fn two_versions(v1: SocketAddr, v2: SocketAddr, extra: &str, routes: &str) -> Policy {
        policy(&format!(
            r#"
[[services]]
name = "web"
addresses = ["{VIP}"]
{extra}
endpoints = [
  {{ address = "{v1}", labels = {{ version = "v1" }} }},
  {{ address = "{v2}", labels = {{ version = "v2" }} }},
]
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]
{routes}
"#
        ))
    }

    const CANARY_90_10: &str = r#"
[[services.routes]]
name = "canary"
match = { headers = { x-canary = "true" } }
split = [{ subset = "v2", weight = 100 }]
[[services.routes]]
name = "default"
split = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
"#;

    struct Proxy {
        addr: SocketAddr,
        shared: Arc<Shared>,
        pod: Arc<PodCtx>,
        entries: Arc<Mutex<Vec<Arc<ConnEntry>>>>,
    }

    /// A proxy listener serving every accepted connection as `version`, as if the app had
    /// connected to `orig`.
    async fn proxy(policy: Policy, version: HttpVersion, orig: &str) -> Proxy {
        proxy_with(policy, version, orig, crate::config::Limits::default()).await
    }

    async fn proxy_with(
        policy: Policy,
        version: HttpVersion,
        orig: &str,
        limits: crate::config::Limits,
    ) -> Proxy {
        let orig: SocketAddr = orig.parse().unwrap();
        let shared = Arc::new(Shared::new(Box::new(NoOrigDst), Router::new(policy)).with_limits(limits));
        let pod = Arc::new(PodCtx {
            name: "t".into(),
            netns: NetNs::current().unwrap(),
            stats: Arc::default(),
            outbound_port: 0,
            inbound_port: 0,
            mark: 0,
            colour: None,
            propagate: false,
            netns_cookie: 0,
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let entries = Arc::new(Mutex::new(Vec::new()));
        let (s, p, e) = (shared.clone(), pod.clone(), entries.clone());
        tokio::spawn(async move {
            let mut id = 0;
            loop {
                let (c, peer) = l.accept().await.unwrap();
                id += 1;
                let entry = Arc::new(ConnEntry {
                    id,
                    pod: "t".into(),
                    direction: Direction::Outbound,
                    client: peer,
                    original_dst: orig,
                    upstream_local: Mutex::new(None),
                    bytes_to_upstream: AtomicU64::new(0),
                    bytes_to_client: AtomicU64::new(0),
                    started: std::time::Instant::now(),
                });
                e.lock().unwrap().push(entry.clone());
                let ctx = ConnCtx {
                    pod: p.clone(),
                    shared: s.clone(),
                    client: peer,
                    orig,
                    entry,
                    inbound: false,
                    local: orig,
                };
                tokio::spawn(serve(c, version, ctx));
            }
        });
        Proxy {
            addr,
            shared,
            pod,
            entries,
        }
    }

    async fn h1_client(addr: SocketAddr) -> hc::http1::SendRequest<Body> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hc::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn h2_client(addr: SocketAddr) -> hc::http2::SendRequest<Body> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hc::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get(path: &str) -> http::request::Builder {
        Request::get(path).header(header::HOST, "web.test")
    }

    /// Send on a keep-alive HTTP/1.1 connection; (status, x-name or body, response).
    async fn send1(
        c: &mut hc::http1::SendRequest<Body>,
        req: Request<Body>,
    ) -> (StatusCode, HeaderMap, String) {
        c.ready().await.unwrap();
        let resp = c.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn name(h: &HeaderMap) -> &str {
        h.get("x-name").and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn dead_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn http1_split_90_10_over_keepalive_and_bytes_counted() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let p = proxy(two_versions(v1, v2, "", CANARY_90_10), HttpVersion::Http1, VIP).await;
            let mut tasks = JoinSet::new();
            for _ in 0..4 {
                let addr = p.addr;
                tasks.spawn(async move {
                    let mut c = h1_client(addr).await;
                    let mut v2 = 0u32;
                    for _ in 0..500 {
                        let (st, h, body) = send1(&mut c, get("/x?q=1").body(empty()).unwrap()).await;
                        assert_eq!(st, StatusCode::OK);
                        assert_eq!(name(&h), body);
                        v2 += (body == "v2") as u32;
                    }
                    v2
                });
            }
            let mut v2 = 0;
            while let Some(r) = tasks.join_next().await {
                v2 += r.unwrap();
            }
            let share = f64::from(v2) / 2000.0;
            assert!((0.07..=0.13).contains(&share), "v2 share {share}");
            // Four app connections, each kept alive for 500 requests.
            assert_eq!(p.entries.lock().unwrap().len(), 4);
            // Upstream connections are reused: a handful, not one per request.
            let pooled = p.shared.l7.http.connections();
            assert!((2..=8).contains(&pooled), "pooled {pooled}");
            let up: u64 = p
                .entries
                .lock()
                .unwrap()
                .iter()
                .map(|e| e.bytes_to_upstream.load(Relaxed))
                .sum();
            let down: u64 = p
                .entries
                .lock()
                .unwrap()
                .iter()
                .map(|e| e.bytes_to_client.load(Relaxed))
                .sum();
            assert!(up > 2000 * 20 && down > 2000 * 20, "up {up} down {down}");
            assert_eq!(p.pod.stats.bytes_upstream.load(Relaxed), up);
            assert_eq!(p.pod.stats.bytes_downstream.load(Relaxed), down);
            let stats: BTreeMap<String, u64> = p
                .shared
                .l7
                .router
                .current()
                .stats()
                .iter()
                .map(|s| (format!("{}/{}", s.route, s.subset), s.requests.load(Relaxed)))
                .collect();
            assert_eq!(stats["default/v1"] + stats["default/v2"], 2000);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn header_match_sends_all_to_v2_keeping_host_and_stripping_hop_by_hop() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let p = proxy(two_versions(v1, v2, "", CANARY_90_10), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            for _ in 0..100 {
                let req = get("/canary")
                    .header("X-Canary", "true")
                    .header(header::CONNECTION, "x-foo")
                    .header("x-foo", "1")
                    .header("keep-alive", "timeout=5")
                    .body(empty())
                    .unwrap();
                let (st, h, body) = send1(&mut c, req).await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, "v2"));
                assert_eq!(h["x-seen-host"], "web.test");
                assert_eq!(h["x-seen-foo"], "false");
                assert_eq!(h["x-seen-keep-alive"], "false");
                assert_eq!(h["x-seen-path"], "/canary");
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn http2_requests_on_one_connection_are_routed_individually() {
        tokio::time::timeout(BOUND, async {
            let (v1, hits1) = upstream("v1").await;
            let (v2, hits2) = upstream("v2").await;
            let routes = r#"
[[services.routes]]
split = [{ subset = "v1", weight = 50 }, { subset = "v2", weight = 50 }]
"#;
            let p = proxy(two_versions(v1, v2, "", routes), HttpVersion::Http2, VIP).await;
            let c = h2_client(p.addr).await;
            let mut tasks = JoinSet::new();
            for _ in 0..200 {
                let mut c = c.clone();
                tasks.spawn(async move {
                    c.ready().await.unwrap();
                    let req = Request::get("http://web.test/h2").body(empty()).unwrap();
                    let resp = c.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    assert_eq!(resp.headers()["x-seen-host"], "web.test");
                    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
                });
            }
            let mut names = BTreeMap::new();
            while let Some(r) = tasks.join_next().await {
                *names.entry(r.unwrap()).or_insert(0) += 1;
            }
            assert_eq!(p.entries.lock().unwrap().len(), 1, "one app connection");
            assert!(names["v1"] > 20 && names["v2"] > 20, "{names:?}");
            assert_eq!(hits1.load(Relaxed) + hits2.load(Relaxed), 200);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn grpc_is_routed_by_service_and_trailers_pass() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let routes = r#"
[[services.routes]]
name = "echo"
match = { service = "pkg.Echo", method = "Say" }
split = [{ subset = "v2", weight = 1 }]
[[services.routes]]
name = "default"
split = [{ subset = "v1", weight = 1 }]
"#;
            let p = proxy(two_versions(v1, v2, "", routes), HttpVersion::Http2, VIP).await;
            let mut c = h2_client(p.addr).await;
            for (path, want) in [("/pkg.Echo/Say", "v2"), ("/pkg.Echo/Other", "v1")] {
                let req = Request::post(format!("http://web.test{path}"))
                    .header(header::CONTENT_TYPE, "application/grpc+proto")
                    .header(header::TE, "trailers")
                    .body(full("\0\0\0\0\x05hello"))
                    .unwrap();
                c.ready().await.unwrap();
                let resp = c.send_request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(name(resp.headers()), want);
                let collected = resp.into_body().collect().await.unwrap();
                let trailers = collected.trailers().cloned().expect("trailers");
                assert_eq!(trailers["grpc-status"], "0");
                assert_eq!(trailers["x-upstream"], want);
                assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");
            }
            // No route for gRPC: trailers-only UNIMPLEMENTED.
            let only_echo = two_versions(
                v1,
                v2,
                "",
                r#"
[[services.routes]]
match = { service = "pkg.Echo" }
split = [{ subset = "v2", weight = 1 }]
"#,
            );
            p.shared.l7.router.replace(only_echo);
            let req = Request::post("http://web.test/pkg.Nope/Call")
                .header(header::CONTENT_TYPE, "application/grpc")
                .body(empty())
                .unwrap();
            c.ready().await.unwrap();
            let resp = c.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["grpc-status"], "12");
            assert_eq!(resp.headers()["server"], "sockmesh");
            assert_eq!(p.shared.l7.errors.get("grpc", "no_route"), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn unreachable_endpoint_gives_502_and_a_retry_reaches_a_live_one() {
        tokio::time::timeout(BOUND, async {
            let (live, hits) = upstream("live").await;
            let dead = dead_addr();
            let text = format!(
                r#"
[[services]]
name = "dead"
addresses = ["10.255.0.2:80"]
retries = 0
endpoints = [{{ address = "{dead}" }}]
[[services]]
name = "mixed"
addresses = ["10.255.0.3:80"]
retries = 1
endpoints = [{{ address = "{dead}" }}, {{ address = "{live}" }}]
"#
            );
            let p = proxy(policy(&text), HttpVersion::Http1, "10.255.0.2:80").await;
            let mut c = h1_client(p.addr).await;
            let (st, h, body) = send1(
                &mut c,
                Request::post("/").header("host", "d").body(full("x")).unwrap(),
            )
            .await;
            assert_eq!(st, StatusCode::BAD_GATEWAY);
            assert_eq!(h["server"], "sockmesh");
            assert!(body.contains("unreachable"), "{body}");
            assert_eq!(p.shared.l7.errors.get("http1", "upstream_connect"), 1);
            let pol = p.shared.l7.router.current();
            let dead_stats = pol.stats().into_iter().find(|s| s.service == "dead").unwrap();
            assert_eq!(dead_stats.view().failures.get("upstream_connect"), Some(&1));
            // The same connection still works for the next request.
            let (st, _, _) = send1(&mut c, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::BAD_GATEWAY);

            let p = proxy(policy(&text), HttpVersion::Http1, "10.255.0.3:80").await;
            let mut c = h1_client(p.addr).await;
            for _ in 0..6 {
                // A body too: nothing was sent to the dead endpoint, so it is safe to retry.
                let (st, _, body) = send1(
                    &mut c,
                    Request::post("/")
                        .header("host", "m")
                        .body(full("payload"))
                        .unwrap(),
                )
                .await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, "live"));
            }
            assert_eq!(hits.load(Relaxed), 6);
            let mixed = p
                .shared
                .l7
                .router
                .current()
                .stats()
                .into_iter()
                .find(|s| s.service == "mixed")
                .unwrap();
            let v = mixed.view();
            assert_eq!(v.requests, 6);
            assert!(
                v.retries >= 3,
                "round robin starts half of them on the dead endpoint: {v:?}"
            );
            assert!(v.failures.is_empty(), "{v:?}");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_request_the_app_gives_up_on_is_counted_as_client_closed() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let routes = r#"
[[services.routes]]
split = [{ subset = "v1", weight = 1 }]
"#;
            let p = proxy(two_versions(v1, v2, "", routes), HttpVersion::Http1, VIP).await;
            let mut app = TcpStream::connect(p.addr).await.unwrap();
            app.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\nx-delay-ms: 3000\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(app);
            let stats = p.shared.l7.router.current().stats();
            let v1_stats = stats.iter().find(|s| s.subset == "v1").unwrap().clone();
            eventually("the abandoned request to be counted", || {
                v1_stats.view().requests == 1
            })
            .await;
            let v = v1_stats.view();
            assert_eq!(v.failures.get(CLIENT_CLOSED), Some(&1), "{v:?}");
            assert_eq!(v.latency_buckets.last(), Some(&1));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn slow_upstream_gives_504_after_the_route_timeout() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let routes = r#"
[[services.routes]]
timeout_ms = 200
retries = 0
split = [{ subset = "v1", weight = 1 }]
"#;
            let p = proxy(two_versions(v1, v2, "", routes), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            let t = Instant::now();
            let (st, h, _) = send1(
                &mut c,
                get("/").header("x-delay-ms", "3000").body(empty()).unwrap(),
            )
            .await;
            let took = t.elapsed();
            assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(h["server"], "sockmesh");
            assert!(
                took >= Duration::from_millis(200) && took < Duration::from_millis(1500),
                "{took:?}"
            );
            assert_eq!(p.shared.l7.errors.get("http1", "timeout"), 1);
            // A fast request on the same connection still works.
            let (st, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "v1"));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn oversized_and_malformed_heads_are_answered_and_counted_others_unaffected() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let p = proxy(two_versions(v1, v2, "", CANARY_90_10), HttpVersion::Http1, VIP).await;
            let mut good = h1_client(p.addr).await;
            let (st, _, _) = send1(&mut good, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK);

            let mut raw = TcpStream::connect(p.addr).await.unwrap();
            let big = "a".repeat(crate::config::DEFAULT_MAX_REQUEST_HEAD_BYTES as usize + 1024);
            let head = format!("GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: {big}\r\n\r\n");
            // The proxy may answer and close before it read everything.
            let _ = raw.write_all(head.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = raw.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
            let errors = &p.shared.l7.errors;
            eventually("header_too_large counted", || {
                errors.get("http1", "header_too_large") == 1
            })
            .await;

            let mut raw = TcpStream::connect(p.addr).await.unwrap();
            raw.write_all(b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = raw.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
            eventually("malformed counted", || errors.get("http1", "malformed") == 1).await;

            // The other keep-alive connection is untouched.
            let (st, _, _) = send1(&mut good, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn slow_heads_get_408_while_idle_keep_alive_connections_are_parked_not_closed() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let limits = crate::config::Limits {
                request_head_timeout: Duration::from_millis(1200),
                ..Default::default()
            };
            let p = proxy_with(
                two_versions(v1, v2, "", CANARY_90_10),
                HttpVersion::Http1,
                VIP,
                limits,
            )
            .await;
            let errors = &p.shared.l7.errors;
            // Idle for longer than the head time-out and than the park delay: still served on
            // the same connection, and not counted as a slow head.
            let mut good = h1_client(p.addr).await;
            let (st, _, _) = send1(&mut good, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK);
            tokio::time::sleep(H1_PARK_AFTER + Duration::from_millis(1000)).await;
            let (st, _, _) = send1(&mut good, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK, "a parked connection serves its next request");
            // A head split across the park: its first bytes wake the session.
            let mut raw = TcpStream::connect(p.addr).await.unwrap();
            raw.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
                .await
                .unwrap();
            let mut first = [0u8; 12];
            raw.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");
            tokio::time::sleep(H1_PARK_AFTER + Duration::from_millis(1000)).await;
            raw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            raw.write_all(b"Host: web.test\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut rest = Vec::new();
            raw.read_to_end(&mut rest).await.unwrap();
            let rest = String::from_utf8_lossy(&rest);
            assert!(rest.matches("HTTP/1.1 200").count() == 1, "{rest}");
            assert_eq!(errors.get("http1", "header_timeout"), 0);

            // Slowloris: a head that never ends, a byte every 50 ms, gets 408 after 1.2 s (longer
            // than the park delay: a head on its way is never parked) and is closed.
            let started = std::time::Instant::now();
            let mut slow = TcpStream::connect(p.addr).await.unwrap();
            let (mut rd, mut wr) = slow.split();
            let trickle = async {
                for b in b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                std::future::pending::<()>().await;
            };
            let mut answer = Vec::new();
            tokio::select! {
                _ = trickle => {}
                _ = rd.read_to_end(&mut answer) => {}
            }
            let waited = started.elapsed();
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(waited >= Duration::from_millis(1190), "{waited:?}");
            assert!(waited < Duration::from_secs(5), "{waited:?}");
            eventually("header_timeout counted", || {
                errors.get("http1", "header_timeout") == 1
            })
            .await;
            // The other keep-alive connection is untouched.
            let (st, _, _) = send1(&mut good, get("/").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::OK);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_http2_preface_that_never_completes_is_closed_and_counted() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let limits = crate::config::Limits {
                request_head_timeout: Duration::from_millis(300),
                ..Default::default()
            };
            let p = proxy_with(
                two_versions(v1, v2, "", CANARY_90_10),
                HttpVersion::Http2,
                VIP,
                limits,
            )
            .await;
            let mut slow = TcpStream::connect(p.addr).await.unwrap();
            slow.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = slow.read_to_end(&mut answer).await;
            let errors = &p.shared.l7.errors;
            eventually("preface_timeout counted", || {
                errors.get("http2", "preface_timeout") == 1
            })
            .await;
            // A real client is served.
            let mut c = h2_client(p.addr).await;
            let resp = c.send_request(get("/").body(empty()).unwrap()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn policy_swap_applies_to_the_next_request_on_the_same_connection() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let to = |subset: &str| {
                two_versions(
                    v1,
                    v2,
                    "",
                    &format!("[[services.routes]]\nsplit = [{{ subset = \"{subset}\", weight = 1 }}]\n"),
                )
            };
            let p = proxy(to("v1"), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            for _ in 0..3 {
                let (_, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
                assert_eq!(body, "v1");
            }
            p.shared.l7.router.replace(to("v2"));
            for _ in 0..3 {
                let (_, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
                assert_eq!(body, "v2");
            }
            assert_eq!(
                p.entries.lock().unwrap().len(),
                1,
                "the same keep-alive connection"
            );
            // The new policy's route (subset v2) counted the 3 requests it routed.
            let total: u64 = p
                .shared
                .l7
                .router
                .current()
                .stats()
                .iter()
                .map(|s| s.requests.load(Relaxed))
                .sum();
            assert_eq!(total, 3);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn no_route_answers_404_and_query_is_not_part_of_the_path() {
        // (`no_endpoint` cannot be built: the policy refuses a subset without endpoints.)
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let text = format!(
                r#"
[[services]]
name = "web"
addresses = ["{VIP}"]
endpoints = [{{ address = "{v1}" }}]
[[services.routes]]
match = {{ path_exact = "/api" }}
split = [{{ subset = "all", weight = 1 }}]
"#
            );
            let p = proxy(policy(&text), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            let (st, h, body) = send1(&mut c, get("/other").body(empty()).unwrap()).await;
            assert_eq!(st, StatusCode::NOT_FOUND);
            assert_eq!(h["server"], "sockmesh");
            assert!(body.starts_with("sockmesh: "), "{body}");
            let (st, h, body) = send1(&mut c, get("/api?x=1").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "v1"));
            assert_eq!(h["x-seen-path"], "/api");
            assert_eq!(p.shared.l7.errors.get("http1", "no_route"), 1);
        })
        .await
        .unwrap();
    }

    /// Accepts, reads a request head, then resets the connection.
    async fn resetter() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                });
            }
        });
        addr
    }

    /// A hand-written HTTP/1.1 server: answers every request on a connection with `response`,
    /// and closes the connection `close_after` after the first answer when set (without
    /// `connection: close`, as an idle timeout would). Counts accepted connections.
    async fn raw_upstream(
        response: &'static [u8],
        close_after: Option<Duration>,
    ) -> (SocketAddr, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let body_len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while seen.len() < end + 4 + body_len {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        seen.drain(..end + 4 + body_len);
                        s.write_all(response).await.unwrap();
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn one_endpoint(addr: SocketAddr) -> Policy {
        policy(&format!(
            r#"
[[services]]
name = "web"
addresses = ["{VIP}"]
endpoints = [{{ address = "{addr}", labels = {{ version = "v1" }} }}]
subsets = [{{ name = "v1", labels = {{ version = "v1" }} }}]
[[services.routes]]
split = [{{ subset = "v1", weight = 1 }}]
"#
        ))
    }

    #[tokio::test]
    async fn empty_responses_keep_the_upstream_connection_alive() {
        tokio::time::timeout(BOUND, async {
            let (up, accepted) = raw_upstream(b"HTTP/1.1 204 No Content\r\n\r\n", None).await;
            let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            for _ in 0..5 {
                let (st, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
                assert_eq!((st, body.as_str()), (StatusCode::NO_CONTENT, ""));
            }
            assert_eq!(accepted.load(Relaxed), 1, "one upstream connection for all five");
            assert_eq!(p.shared.l7.http.connections(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced_even_for_a_post() {
        tokio::time::timeout(BOUND, async {
            let (up, accepted) = raw_upstream(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                Some(Duration::from_millis(20)),
            )
            .await;
            let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            for i in 0..3 {
                // Let the server close the idle pooled connection first.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let req = Request::post("/orders")
                    .header(header::HOST, "web.test")
                    .body(full(&format!("order {i}")))
                    .unwrap();
                let (st, _, body) = send1(&mut c, req).await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, "ok"), "POST {i}");
            }
            assert_eq!(accepted.load(Relaxed), 3);
            let v = p.shared.l7.router.current().stats()[0].view();
            assert_eq!((v.requests, v.retries), (3, 0), "{v:?}");
            assert!(v.failures.is_empty(), "{v:?}");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn reset_after_send_is_retried_only_when_idempotent_without_body() {
        tokio::time::timeout(BOUND, async {
            let bad = resetter().await;
            let (live, _) = upstream("live").await;
            let text = format!(
                r#"
[[services]]
name = "web"
addresses = ["{VIP}"]
retries = 1
endpoints = [{{ address = "{bad}" }}, {{ address = "{live}" }}]
"#
            );
            let p = proxy(policy(&text), HttpVersion::Http1, VIP).await;
            let mut c = h1_client(p.addr).await;
            // Round robin: requests 1 and 3 start on the resetting endpoint.
            let (st, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "live"));
            let (st, _, body) = send1(&mut c, get("/").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "live"));
            let post = Request::post("/")
                .header(header::HOST, "web.test")
                .body(full("data"))
                .unwrap();
            let (st, h, _) = send1(&mut c, post).await;
            assert_eq!(st, StatusCode::BAD_GATEWAY);
            assert_eq!(h["server"], "sockmesh");
            assert_eq!(p.shared.l7.errors.get("http1", "upstream_reset"), 1);
            let v = p.shared.l7.router.current().stats()[0].view();
            assert_eq!((v.requests, v.retries), (3, 1), "{v:?}");
            assert_eq!(v.failures.get("upstream_reset"), Some(&1));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn http1_upgrade_is_spliced_after_101() {
        tokio::time::timeout(BOUND, async {
            let (v1, _) = upstream("v1").await;
            let (v2, _) = upstream("v2").await;
            let p = proxy(two_versions(v1, v2, "", CANARY_90_10), HttpVersion::Http1, VIP).await;
            let mut raw = TcpStream::connect(p.addr).await.unwrap();
            let req = "GET /ws HTTP/1.1\r\nHost: web.test\r\nx-canary: true\r\n\
                       Connection: Upgrade\r\nUpgrade: echo\r\n\r\n";
            raw.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(raw.read(&mut byte).await.unwrap(), 1, "{head:?}");
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 101"), "{head}");
            assert!(
                head.contains("upgrade: echo") && head.contains("x-name: v2"),
                "{head}"
            );
            for msg in [&b"ping"[..], b"second message"] {
                raw.write_all(msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                raw.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg);
            }
        })
        .await
        .unwrap();
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Thing"));
        h.insert("x-thing", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(left, ["host=a", "te=trailers"]);
    }

    #[test]
    fn request_info_helpers() {
        assert_eq!(
            grpc_service_method("/pkg.Svc/Method"),
            Some(("pkg.Svc", "Method"))
        );
        assert_eq!(grpc_service_method("/pkg.Svc"), None);
        assert_eq!(grpc_service_method("/a/b/c"), None);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("true"));
        assert_eq!(Headers(&h).header("X-Canary"), Some("true"));
        assert_eq!(Headers(&h).header("x-other"), None);
        assert_eq!(grpc_message("50% off\n"), "50%25 off%0A");
    }
    /// A switch's pre-connect: the connections are opened up front, pooled, and the requests
    /// that follow open none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn preconnected_connections_are_pooled_and_reused() {
        tokio::time::timeout(BOUND, async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let ep = l.local_addr().unwrap();
            let accepted = Arc::new(AtomicU64::new(0));
            let a = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    a.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        let svc = service_fn(|req| upstream_answer("up", req));
                        let _ = hs::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            let p = proxy(
                policy(&format!(
                    "[[services]]\nname = \"web\"\naddresses = [\"{VIP}\"]\nendpoints = [{{ address = \"{ep}\" }}]\n"
                )),
                HttpVersion::Http1,
                VIP,
            )
            .await;
            let pools = &p.shared.l7.http;
            let opened = pools
                .preconnect_h1(&p.shared, &p.pod, ep, 4, Duration::from_secs(2))
                .await
                .unwrap();
            assert_eq!(opened, 4);
            eventually("4 accepts", || accepted.load(Relaxed) == 4).await;
            let counts = pools.h1_counts(&[ep]);
            assert_eq!(counts.len(), 1);
            assert_eq!((counts[0].0.name.as_str(), counts[0].1, counts[0].2), ("t", ep, 4));
            // Already there: nothing more is opened.
            let again = pools.preconnect_h1(&p.shared, &p.pod, ep, 3, Duration::from_secs(2));
            assert_eq!(again.await.unwrap(), 0);
            let mut c = h1_client(p.addr).await;
            for _ in 0..20 {
                let (st, _, body) = send1(&mut c, get("/x").body(empty()).unwrap()).await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, "up"));
            }
            assert_eq!(accepted.load(Relaxed), 4, "a request opened its own connection");
            // Nothing listening: the error, and nothing pooled for it.
            let dead = dead_addr();
            assert!(pools
                .preconnect_h1(&p.shared, &p.pod, dead, 2, Duration::from_secs(2))
                .await
                .is_err());
            assert_eq!(pools.h1_counts(&[dead])[0].2, 0);
        })
        .await
        .expect("bounded");
    }
}
