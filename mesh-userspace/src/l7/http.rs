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
//! (slow HTTP/1.1 head), `incomplete`, `keepalive_timeout` (HTTP/2 ping unanswered), `io`,
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
    routing::{Decision, HeaderLookup, Outcome, ProtocolHint, RequestInfo},
};

/// Largest HTTP/1.1 request head (request line and headers) the proxy reads; larger gets 431
/// and the connection is closed.
pub const MAX_HTTP1_HEAD_BYTES: usize = 64 * 1024;
/// Largest HTTP/2 header list (`SETTINGS_MAX_HEADER_LIST_SIZE`) accepted from the app; a larger
/// one gets 431 on that stream.
pub const MAX_HTTP2_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// An HTTP/1.1 client must send a complete request head within this time.
pub const HTTP1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING interval on the app's connection and on upstream connections.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// An HTTP/2 peer that does not answer a PING within this time is disconnected.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams the proxy accepts on one HTTP/2 app connection.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// An app connection with no request in flight for this long is closed gracefully (HTTP/1.1:
/// closed; HTTP/2: GOAWAY).
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
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
}

struct PooledH1 {
    sender: hc::http1::SendRequest<Body>,
    since: Instant,
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
        if !self.inner.sweeper.swap(true, Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&self.inner)));
        }
        let key = PoolKey {
            pod: ctx.pod.name.clone(),
            endpoint,
            version,
        };
        let mut pools = self.inner.pools.lock().expect("http pools lock");
        if let Some(p) = pools.get(&key) {
            if Weak::ptr_eq(&p.pod, &Arc::downgrade(&ctx.pod)) {
                return p.clone();
            }
        }
        let p = Arc::new(EndpointPool {
            pod: Arc::downgrade(&ctx.pod),
            h1: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
        });
        pools.insert(key, p.clone());
        p
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
                !c.sender.is_closed() && !(c.sender.is_ready() && c.since.elapsed() >= UPSTREAM_IDLE_TIMEOUT)
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
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.ctx.entry.bytes_to_upstream.fetch_add(n, Relaxed);
            self.ctx.pod.stats.bytes_upstream.fetch_add(n, Relaxed);
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests in flight on one app connection (until the response body ends), for the idle
/// timeout.
struct Inflight {
    count: AtomicUsize,
    last_change: Mutex<Instant>,
}

struct InflightGuard(Arc<Inflight>);

impl Inflight {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            last_change: Mutex::new(Instant::now()),
        })
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

/// What every request of one app connection shares.
struct ConnState {
    ctx: ConnCtx,
    version: HttpVersion,
    inflight: Arc<Inflight>,
}

/// Serve one app connection until it closes.
pub async fn serve(client: TcpStream, version: HttpVersion, ctx: ConnCtx) {
    let io = TokioIo::new(Counted {
        inner: client,
        ctx: ctx.clone(),
    });
    let inflight = Inflight::new();
    let state = Arc::new(ConnState {
        ctx: ctx.clone(),
        version,
        inflight: inflight.clone(),
    });
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, state).await) }
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
                    r = conn.as_mut() => break r,
                    _ = inflight.idle_for(CLIENT_IDLE_TIMEOUT), if !closing => {
                        debug!("idle app connection: closing");
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
                .header_read_timeout(HTTP1_HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HTTP1_HEAD_BYTES)
                .keep_alive(true);
            drive!(b.serve_connection(io, svc).with_upgrades())
        }
        HttpVersion::Http2 => {
            let mut b = hs::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
                .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
                .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
            drive!(b.serve_connection(io, svc))
        }
    };
    if let Err(e) = result {
        let reason = conn_error_reason(&e, version);
        debug!(reason, "app connection ended: {e}");
        ctx.l7().errors.count(version.label(), reason);
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
        "no_endpoint" => (StatusCode::SERVICE_UNAVAILABLE, 14),
        "timeout" => (StatusCode::GATEWAY_TIMEOUT, 4),
        "connect_unsupported" => (StatusCode::NOT_IMPLEMENTED, 12),
        _ => (StatusCode::BAD_GATEWAY, 14),
    };
    local_reply(status, code, grpc, msg)
}

/// One request from the app: route it, forward it, answer.
async fn handle(req: Request<Incoming>, st: Arc<ConnState>) -> Response<Body> {
    let started = Instant::now();
    let guard = st.inflight.enter();
    let grpc = is_grpc(req.headers());
    let proto = if grpc { "grpc" } else { st.version.label() };
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
        policy.route(st.ctx.orig, &info)
    };
    drop(policy);
    let decision = match routed {
        Ok(d) => d,
        Err(e) => {
            st.ctx.l7().errors.count(proto, e.reason());
            debug!("{e}");
            return failure_reply(e.reason(), grpc, &e.to_string());
        }
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
            decision.stats.record(Outcome::Answered, started.elapsed());
            // The request stays in flight until its response body is done.
            let (parts, body) = resp.into_parts();
            let body = body
                .map_frame(move |f| {
                    let _ = &guard;
                    f
                })
                .boxed();
            Response::from_parts(parts, body)
        }
        Err((reason, msg)) => {
            st.ctx.l7().errors.count(proto, reason);
            decision.stats.record(Outcome::Failed(reason), started.elapsed());
            debug!(reason, "{msg}");
            failure_reply(reason, grpc, &msg)
        }
    }
}

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
            let failure = match send_once(st, endpoint, req, deadline).await {
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
) -> Result<Response<Incoming>, Attempt> {
    let pool = st.ctx.l7().http.get(&st.ctx, endpoint, st.version);
    match st.version {
        HttpVersion::Http1 => {
            let mut sender = match acquire_h1(&pool, &st.ctx, endpoint, deadline).await {
                Ok(s) => s,
                Err(e) => return Err(Attempt::NotConnected(req, e)),
            };
            if sender.ready().await.is_err() {
                return Err(Attempt::Stale(req));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let mut h1 = pool.h1.lock().expect("h1 pool lock");
                    if h1.len() < MAX_POOLED_HTTP1_PER_ENDPOINT {
                        h1.push(PooledH1 {
                            sender,
                            since: Instant::now(),
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
) -> io::Result<hc::http1::SendRequest<Body>> {
    {
        let mut h1 = pool.h1.lock().expect("h1 pool lock");
        h1.retain(|c| !c.sender.is_closed());
        if let Some(i) = h1.iter().position(|c| c.sender.is_ready()) {
            return Ok(h1.swap_remove(i).sender);
        }
    }
    let tcp = ctx.connect(endpoint, until(deadline)).await?;
    let (sender, conn) = hc::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream http1 connection to {endpoint}: {e}");
        }
    });
    Ok(sender)
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
