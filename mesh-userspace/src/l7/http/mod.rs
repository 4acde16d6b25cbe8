//! HTTP/1.1, HTTP/2 and gRPC: hyper serves the app's connection, each request is routed with
//! the live policy and forwarded on a pooled upstream connection to the chosen endpoint.
//!
//! - The policy is loaded per request, so a swap applies to the next request on every open
//!   keep-alive connection and drops none.
//! - Upstream connections are pooled per (pod, endpoint, version) in [`HttpPools`]: HTTP/1.1
//!   keeps a list of idle keep-alive connections (one request at a time each), HTTP/2 one
//!   multiplexed connection. Every upstream socket is opened by [`ConnCtx::connect`] (the pod's
//!   netns, the daemon's mark).
//! - HTTP/1.1 upstream is not hyper's client but `h1client`, driven by the request's own task:
//!   it writes the head it serialises and the body, reads the response head (`httparse`, at most
//!   [`h1wire::MAX_RESPONSE_HEAD_BYTES`], interim 1xx skipped), and the response body reads the
//!   connection as the app's side polls it and parks it back in the pool when it ended cleanly
//!   and neither side closes it (no connection task, no channel, no wake-up between tasks; a
//!   pooled connection the upstream closed is noticed from tokio's cached readiness, without a
//!   system call). HTTP/2 upstream and `Upgrade` forwarding use hyper's client.
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
//! | HTTP/1.1 upstream's response head malformed, over 64 KiB, or with a bad `Content-Length` (not retried) | `upstream_malformed` | 502 | 14 UNAVAILABLE |
//! | no response head within the route's timeout | `timeout` | 504 | 4 DEADLINE_EXCEEDED |
//! | `CONNECT` | `connect_unsupported` | 501 | 12 UNIMPLEMENTED |
//!
//! An HTTP/1.1 upstream's response body that fails after its head was passed on (a bad chunk:
//! `upstream_malformed`; closed or reset before its end: `upstream_reset`; nothing sent for
//! `[limits] upstream_body_idle_timeout_secs`: `upstream_body_timeout`) cannot be answered any
//! more: the app's connection is cut, and the reason is counted in the protocol errors.
//!
//! No route is UNIMPLEMENTED for gRPC because the method is not served at all through this
//! service; retrying it elsewhere would not help (UNAVAILABLE would invite retries).
//!
//! Client-side protocol errors end only the offending connection and are counted by hyper's
//! classification: `header_too_large` (hyper answers 431), `malformed` (400), `header_timeout`
//! (an HTTP/1.1 head not complete within `[limits] request_head_timeout_ms` of its first byte:
//! 408 and closed), `preface_timeout` (HTTP/2 preface not in within that time: closed),
//! `frame_timeout` (an HTTP/2 frame or header block not complete within that time of the read
//! that brought its first byte: closed, see `late_frames`), `idle_timeout` (no request for `client_idle_timeout_secs`: closed gracefully; counted, not an
//! error of the client), `incomplete`, `keepalive_timeout` (HTTP/2 ping unanswered), `io`,
//! `connection_error`. An HTTP/2 header list over [`MAX_HTTP2_HEADER_LIST_BYTES`] is refused by
//! the h2 layer with a 431 on that stream only; it does not reach the handler and is not counted.
//!
//! Layout: here the entry points ([`serve`], [`serve_handed_over`]), [`HttpVersion`] and what
//! every request of a connection shares; `session` the app's side of the connection (byte
//! counting, idle and head clocks, HTTP/1.1 session parking, the hyper server); `forward` one
//! request (routing, retries, replays, the proxy's own answers); `pool` upstream pools and one
//! attempt on a pooled connection; `h1client` the HTTP/1.1 upstream client (`h1wire` its
//! parsers and head writer, no I/O: the `h1_response` fuzz target); `upgrade` HTTP/1.1
//! `Upgrade` splicing; `headers` header and gRPC helpers.

mod forward;
mod h1client;
mod h1wire;
mod headers;
mod late_frames;
mod pool;
mod session;
#[cfg(test)]
mod tests;
mod upgrade;

use std::{future::Future, pin::Pin, time::Duration};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use tokio::{net::TcpStream, time::Instant};

use super::ConnCtx;
pub use pool::HttpPools;
use session::{serve_with, HeadClock, Inflight};

/// Largest HTTP/2 header list (`SETTINGS_MAX_HEADER_LIST_SIZE`) accepted from the app; a larger
/// one gets 431 on that stream.
pub const MAX_HTTP2_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// HTTP/2 PING interval on the app's connection and on upstream connections.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// An HTTP/2 peer that does not answer a PING within this time is disconnected.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams the proxy accepts on one HTTP/2 app connection.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 1024;

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

/// A request body on its way upstream (the app's, or an empty replay).
type Body = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body on its way to the app (an upstream's, or the proxy's own answer).
type RespBody = BoxBody<Bytes, BoxError>;

/// What every request of one app connection shares, with the connection's clocks: one
/// allocation per connection, which a parked HTTP/1.1 connection keeps (with its socket).
struct ConnState {
    ctx: ConnCtx,
    version: HttpVersion,
    inflight: Inflight,
    head: HeadClock,
    /// Set when the connection is being handed over (upgrade): hyper's final shutdown must
    /// not reach the socket (it is shared with the next generation).
    keep_open: std::sync::atomic::AtomicBool,
    /// HTTP/1.1: the upstream pool the latest request went to (the pre-connect's sizing).
    last_pool: pool::LastPool,
}

/// Serve one app connection until it closes. The future holds only what the connection keeps
/// while idle (its socket and its [`ConnState`]); the HTTP/2 or HTTP/1.1 driver is chosen here.
pub fn serve(
    client: TcpStream,
    version: HttpVersion,
    ctx: ConnCtx,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    serve_with(client, Bytes::new(), version, ctx)
}

/// An HTTP/1.1 app connection handed over by the previous generation (upgrade), with the bytes
/// it had already read.
pub fn serve_handed_over(
    client: TcpStream,
    read: Bytes,
    ctx: ConnCtx,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    serve_with(client, read, HttpVersion::Http1, ctx)
}

/// Time left until `deadline` (zero once it passed).
fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
