//! One request from the app: route it ([`handle`]), forward it upstream with retries and
//! replays ([`forward`]), and the answers the proxy makes itself on failure.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;
use tracing::debug;

use super::{
    headers::{
        grpc_message, grpc_service_method, head_size, is_grpc, request_host, strip_hop_by_hop, Headers,
    },
    pool::{send_once, Attempt},
    upgrade::forward_upgrade,
    Body, ConnState, HttpVersion, RespBody,
};
use crate::routing::{colour::COLOUR_HEADER, Decision, Outcome, ProtocolHint, RequestInfo, RouteStats};

/// A pooled connection found closed when sending (nothing sent) is replaced this many times
/// per request without using up a retry.
const MAX_STALE_REPLACEMENTS: u32 = 3;

/// Methods a request may be replayed with after it was sent (when it has no body).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A response the proxy makes itself.
fn local_reply(status: StatusCode, grpc_code: u8, grpc: bool, msg: &str) -> Response<RespBody> {
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

/// The answer for a failure label (see the table in the module docs).
fn failure_reply(reason: &'static str, grpc: bool, msg: &str) -> Response<RespBody> {
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
pub(super) async fn handle(req: Request<Incoming>, st: Arc<ConnState>) -> Response<RespBody> {
    let started = Instant::now();
    let guard = st.in_flight();
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
        forward_upgrade(&st, req, &decision, started)
            .await
            .map(|r| r.map(|b| b.map_err(super::BoxError::from).boxed()))
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
            // While draining for an upgrade, an HTTP/1.1 response marks its request boundary.
            let body = if st.version == HttpVersion::Http1 {
                super::session::HeadOut::new(body, st.clone()).boxed()
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

pub(super) type Failure = (&'static str, String);

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
pub(super) fn upstream_parts(parts: &mut http::request::Parts, version: HttpVersion, endpoint: SocketAddr) {
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
) -> Result<Response<RespBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, st.version, d.endpoint);
    let replayable = idempotent(&parts.method) && body.is_end_stream();
    // HTTP/1.1 gives the head back when an attempt fails after sending (`Attempt::Sent`), so
    // only HTTP/2 keeps a copy from the start.
    let mut replay = (replayable && st.version == HttpVersion::Http2).then(|| Replay {
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
                Err(Attempt::Malformed(m)) => {
                    return Err((
                        "upstream_malformed",
                        format!("upstream {endpoint} sent a bad response: {m}"),
                    ))
                }
                Err(Attempt::Sent(e, head)) => {
                    let f = ("upstream_reset", format!("upstream {endpoint} failed: {e}"));
                    if !replayable {
                        return Err(f);
                    }
                    if let (None, Some(head)) = (&replay, head) {
                        replay = Some(Replay {
                            method: head.method,
                            uri: head.uri,
                            version: head.version,
                            headers: head.headers,
                        });
                    }
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
