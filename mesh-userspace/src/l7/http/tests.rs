//! End-to-end tests of the HTTP handler: a proxy listener serving app connections through
//! [`super::serve`], real upstream servers, hyper clients.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    HeaderMap, Request, Response, StatusCode,
};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn as hc, server::conn as hs, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};

use super::{forward::CLIENT_CLOSED, headers::is_grpc, session::H1_PARK_AFTER, *};
use crate::{
    conn::{ConnEntry, Direction, OrigDstSource, PodCtx, Shared},
    routing::{compile, parse_toml, Policy, Router},
    sys::NetNs,
};

/// The instruction counter (`cargo xtask instructions`).
mod instructions;

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
async fn send1(c: &mut hc::http1::SendRequest<Body>, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
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

/// One HTTP/2 frame as read from the proxy: (type, flags, stream, payload); `None` at the end
/// of the connection.
async fn read_h2_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.ok()?;
    let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((h[3], h[4], id, payload))
}

fn h2_frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    v.extend([kind, flags]);
    v.extend(id.to_be_bytes());
    v.extend(payload);
    v
}

/// The frame sequence of a gRPC client (grpc-core) whose next call crosses the proxy's
/// graceful close: the call's HEADERS come after the ACK of the shutdown PING, so h2 ignores
/// them, and its stream WINDOW_UPDATE follows. h2 answered that WINDOW_UPDATE with
/// GOAWAY(PROTOCOL_ERROR), failing every call still in flight on the connection (seen once in
/// ~17 runs of the upgrade test: "Stream removed (GOAWAY received; Error code: 1)").
#[tokio::test]
async fn a_call_that_crosses_the_final_goaway_gets_a_clean_goaway_not_a_protocol_error() {
    const GOAWAY: u8 = 0x7;
    const PING: u8 = 0x6;
    tokio::time::timeout(BOUND, async {
        let (v1, _) = upstream("v1").await;
        let (v2, _) = upstream("v2").await;
        // The idle timeout closes the connection gracefully like an upgrade's drain does.
        let limits = crate::config::Limits {
            client_idle_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let p = proxy_with(
            two_versions(v1, v2, "", CANARY_90_10),
            HttpVersion::Http2,
            VIP,
            limits,
        )
        .await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(h2_frame(0x4, 0, 0, &[]));
        s.write_all(&hello).await.unwrap();
        // GOAWAY(2^31-1, NO_ERROR), then the PING whose ACK makes h2 send its final GOAWAY.
        let mut first_goaway = None;
        let ping = loop {
            let (kind, flags, _, payload) = read_h2_frame(&mut s).await.expect("frames");
            match kind {
                GOAWAY => first_goaway = Some(payload),
                PING if flags & 1 == 0 => break payload,
                _ => {}
            }
        };
        let first = first_goaway.expect("a GOAWAY before the PING");
        assert_eq!(first[..4], 0x7fff_ffffu32.to_be_bytes());
        assert_eq!(first[4..8], [0; 4], "NO_ERROR");
        // GET / with :authority web.test (HPACK: three static entries and one literal).
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 8];
        block.extend(b"web.test");
        let late = [
            h2_frame(PING, 1, 0, &ping),
            h2_frame(0x1, 0x4, 1, &block),
            h2_frame(0x8, 0, 1, &5u32.to_be_bytes()),
            h2_frame(0x0, 0x1, 1, &[]),
        ]
        .concat();
        s.write_all(&late).await.unwrap();
        let mut goaways = Vec::new();
        while let Some((kind, _, _, payload)) = read_h2_frame(&mut s).await {
            if kind == GOAWAY {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                goaways.push((last, code));
            }
        }
        // Stream 1 is above the final GOAWAY's last stream: not processed, the client retries
        // it on a new connection. No PROTOCOL_ERROR (1).
        assert_eq!(
            goaways,
            [(0, 0)],
            "(last stream, error code) of the final GOAWAYs"
        );
        let errors = &p.shared.l7.errors;
        assert_eq!(errors.get("http2", "window_update_after_goaway"), 1);
        assert_eq!(errors.get("http2", "connection_error"), 0);
    })
    .await
    .unwrap();
}

/// A raw HTTP/2 connection to the proxy that has sent its preface and an empty SETTINGS.
async fn h2_raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    let mut s = s;
    s.write_all(&hello).await.unwrap();
    s
}

/// The HPACK block of `method` (2: GET, 3: POST) `/` with `:authority web.test`.
fn h2_request_block(method: u8) -> Vec<u8> {
    let mut block = vec![0x80 | method, 0x86, 0x84, 0x01, 8];
    block.extend(b"web.test");
    block
}

/// Writes `parts` to `s` one after the other, `gap` apart, while reading (and discarding) what
/// the proxy sends, until the proxy closes the connection. Returns how many parts were written
/// by then and the time from the first one to the close.
async fn trickle_until_closed(mut s: TcpStream, parts: &[Vec<u8>], gap: Duration) -> (usize, Duration) {
    let (mut rd, mut wr) = s.split();
    let started = std::time::Instant::now();
    let mut sent = 0;
    let write = async {
        for p in parts {
            if wr.write_all(p).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(gap).await;
        }
        std::future::pending::<()>().await;
    };
    let mut sink = Vec::new();
    tokio::select! {
        _ = write => unreachable!(),
        _ = rd.read_to_end(&mut sink) => {}
    }
    (sent, started.elapsed())
}

/// Slow HTTP/2 frames after the preface: a HEADERS frame trickled a byte at a time, a DATA
/// frame that stops halfway, and a header block whose CONTINUATION frames (each complete)
/// trickle, each hold a connection; h2 itself never ends them (its keep-alive PING is answered
/// by such a client). The proxy closes each once it has been in progress for the head
/// time-out, counted once as `frame_timeout`.
#[tokio::test]
async fn slow_http2_frames_and_header_blocks_are_cut_at_the_head_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    tokio::time::timeout(BOUND, async {
        let (v1, _) = upstream("v1").await;
        let (v2, _) = upstream("v2").await;
        let limits = crate::config::Limits {
            request_head_timeout: TIMEOUT,
            ..Default::default()
        };
        let p = proxy_with(
            two_versions(v1, v2, "", CANARY_90_10),
            HttpVersion::Http2,
            VIP,
            limits,
        )
        .await;
        let errors = &p.shared.l7.errors;

        // A HEADERS frame of 49 bytes, one byte every 100 ms (it would take 4.9 s).
        let mut block = h2_request_block(2);
        block.extend(std::iter::repeat_n(0x82, 36));
        let headers = h2_frame(0x1, 0x5, 1, &block);
        let bytes: Vec<Vec<u8>> = headers.iter().map(|b| vec![*b]).collect();
        let s = h2_raw(p.addr).await;
        let (sent, took) = trickle_until_closed(s, &bytes, Duration::from_millis(100)).await;
        assert!(
            sent < bytes.len(),
            "closed only after the whole frame was sent ({took:?})"
        );
        assert!(took >= TIMEOUT, "closed after {took:?}, {sent} bytes");
        eventually("frame_timeout counted", || {
            errors.get("http2", "frame_timeout") == 1
        })
        .await;

        // A POST whose first DATA frame stops halfway.
        let mut s = h2_raw(p.addr).await;
        let mut post = h2_frame(0x1, 0x4, 1, &h2_request_block(3));
        post.extend(&h2_frame(0x0, 0x1, 1, &[7; 100])[..9 + 50]);
        let (sent, took) = trickle_until_closed(s, &[post], Duration::from_secs(30)).await;
        assert_eq!(sent, 1);
        assert!(took >= TIMEOUT, "closed after {took:?}");
        eventually("frame_timeout counted", || {
            errors.get("http2", "frame_timeout") == 2
        })
        .await;

        // A header block in one-byte fragments: HEADERS without END_HEADERS, then a complete
        // CONTINUATION every 300 ms (it would take 3.9 s).
        s = h2_raw(p.addr).await;
        let block = h2_request_block(2);
        let mut parts = vec![h2_frame(0x1, 0x1, 1, &block[..1])];
        for (i, b) in block[1..].iter().enumerate() {
            let last = i + 2 == block.len();
            parts.push(h2_frame(0x9, if last { 0x4 } else { 0 }, 1, &[*b]));
        }
        let (sent, took) = trickle_until_closed(s, &parts, Duration::from_millis(300)).await;
        assert!(
            sent < parts.len(),
            "closed only after the whole block was sent ({took:?})"
        );
        assert!(took >= TIMEOUT, "closed after {took:?}, {sent} frames");
        eventually("frame_timeout counted", || {
            errors.get("http2", "frame_timeout") == 3
        })
        .await;

        // Counted once per connection, and nothing else went wrong.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(errors.get("http2", "frame_timeout"), 3);
        assert_eq!(errors.get("http2", "preface_timeout"), 0);
        // A real client is served.
        let mut c = h2_client(p.addr).await;
        let resp = c.send_request(get("/").body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await
    .unwrap();
}

/// A request body that yields `chunks` chunks of `size` bytes, `gap` apart.
struct SlowBody {
    chunks: usize,
    size: usize,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for SlowBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        let gap = self.gap;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
        std::task::ready!(std::future::Future::poll(sleep.as_mut(), cx));
        self.sleep = None;
        self.chunks -= 1;
        Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b'x';
            self.size
        ])))))
    }
}

/// The frame clock counts a frame only while it is incomplete: a header block sent in parts
/// within the head time-out, and an upload of many frames that lasts twice the time-out, are
/// served.
#[tokio::test]
async fn an_http2_header_block_in_parts_and_a_long_upload_are_served() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    tokio::time::timeout(BOUND, async {
        let (v1, _) = upstream("v1").await;
        let (v2, _) = upstream("v2").await;
        let limits = crate::config::Limits {
            request_head_timeout: TIMEOUT,
            ..Default::default()
        };
        let p = proxy_with(
            two_versions(v1, v2, "", CANARY_90_10),
            HttpVersion::Http2,
            VIP,
            limits,
        )
        .await;
        let errors = &p.shared.l7.errors;

        // GET / as HEADERS + CONTINUATION + CONTINUATION, 150 ms apart.
        let mut s = h2_raw(p.addr).await;
        let block = h2_request_block(2);
        let parts = [
            h2_frame(0x1, 0x1, 1, &block[..4]),
            h2_frame(0x9, 0, 1, &block[4..8]),
            h2_frame(0x9, 0x4, 1, &block[8..]),
        ];
        for part in &parts {
            s.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let body = loop {
            let (kind, flags, id, payload) = read_h2_frame(&mut s).await.expect("an answer");
            if kind == 0x0 && id == 1 && flags & 0x1 != 0 {
                break payload;
            }
        };
        assert!(
            body == b"v1" || body == b"v2",
            "{:?}",
            String::from_utf8_lossy(&body)
        );

        // A gRPC upload (the upstream echoes it) of 20 chunks of 16 KiB, 100 ms apart.
        let mut c = h2_client(p.addr).await;
        let (chunks, size) = (20, 16 * 1024);
        let req = Request::post("http://web.test/pkg.Echo/Say")
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(
                SlowBody {
                    chunks,
                    size,
                    gap: Duration::from_millis(100),
                    sleep: None,
                }
                .boxed(),
            )
            .unwrap();
        let started = std::time::Instant::now();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let echoed = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed.len(), chunks * size);
        let took = started.elapsed();
        assert!(
            took > TIMEOUT,
            "the upload took {took:?}: not longer than the time-out"
        );
        assert_eq!(errors.get("http2", "frame_timeout"), 0);
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

/// What a scripted upstream does after writing an answer.
#[derive(Debug, Clone, Copy)]
enum Then {
    KeepOpen,
    Close,
    /// Close after this long (without `connection: close`, as an idle timeout would).
    CloseAfter(Duration),
}

/// A hand-written HTTP/1.1 server: reads each request (head, then a Content-Length or chunked
/// body), writes what `answer` returns for (head, body), then goes on as it says. Counts
/// accepted connections.
async fn scripted_upstream<F>(answer: F) -> (SocketAddr, Arc<AtomicU64>)
where
    F: Fn(&str, &[u8]) -> (Vec<u8>, Then) + Send + Sync + 'static,
{
    use super::h1wire::{Chunk, ChunkDecoder};
    use bytes::{Buf, BytesMut};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let (a, answer) = (accepted.clone(), Arc::new(answer));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Relaxed);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = BytesMut::new();
                loop {
                    let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read_buf(&mut seen).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => continue,
                        }
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                    seen.advance(end + 4);
                    let lower = head.to_ascii_lowercase();
                    let mut body = Vec::new();
                    if lower.contains("transfer-encoding: chunked") {
                        let mut dec = ChunkDecoder::new();
                        loop {
                            match dec.decode(&mut seen).unwrap() {
                                Some(Chunk::Data(d)) => body.extend_from_slice(&d),
                                Some(Chunk::Trailers(_)) => {}
                                Some(Chunk::End) => break,
                                None => match s.read_buf(&mut seen).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) => {}
                                },
                            }
                        }
                    } else {
                        let len: usize = lower
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while seen.len() < len {
                            match s.read_buf(&mut seen).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                        body = seen.split_to(len).to_vec();
                    }
                    let (response, then) = answer(&head, &body);
                    if s.write_all(&response).await.is_err() {
                        return;
                    }
                    match then {
                        Then::KeepOpen => {}
                        Then::Close => return,
                        Then::CloseAfter(after) => {
                            tokio::time::sleep(after).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A hand-written HTTP/1.1 server answering every request on a connection with `response`,
/// and closing the connection `close_after` after the first answer when set.
async fn raw_upstream(
    response: &'static [u8],
    close_after: Option<Duration>,
) -> (SocketAddr, Arc<AtomicU64>) {
    let then = close_after.map_or(Then::KeepOpen, Then::CloseAfter);
    scripted_upstream(move |_, _| (response.to_vec(), then)).await
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
        // A plain request first, then another app connection's: two app connections send to
        // v2, one upstream connection serves both in turn.
        raw.write_all(b"GET /a HTTP/1.1\r\nHost: web.test\r\nx-canary: true\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("\r\n\r\nv2") {
            let mut b = [0u8; 512];
            let n = raw.read(&mut b).await.unwrap();
            assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        let mut other = h1_client(p.addr).await;
        let canary = get("/b").header("x-canary", "true").body(empty()).unwrap();
        assert_eq!(send1(&mut other, canary).await.0, StatusCode::OK);
        assert_eq!(p.shared.l7.http.h1_demand(&[v2])[0].2, 2);
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
        // The spliced connection sends no more requests: a switch does not size for it.
        assert_eq!(p.shared.l7.http.h1_demand(&[v2])[0].2, 1);
    })
    .await
    .unwrap();
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
                .preconnect_h1(&p.shared, &p.pod, ep, 4, &[ep], Duration::from_secs(2))
                .await
                .unwrap();
            assert_eq!(opened, 4);
            eventually("4 accepts", || accepted.load(Relaxed) == 4).await;
            let counts = pools.h1_counts(&[ep]);
            assert_eq!(counts.len(), 1);
            assert_eq!((counts[0].0.name.as_str(), counts[0].1, counts[0].2), ("t", ep, 4));
            // Already there: nothing more is opened.
            let again = pools.preconnect_h1(&p.shared, &p.pod, ep, 3, &[ep], Duration::from_secs(2)).await;
            assert_eq!(again.unwrap(), 0);
            let mut c = h1_client(p.addr).await;
            for _ in 0..20 {
                let (st, _, body) = send1(&mut c, get("/x").body(empty()).unwrap()).await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, "up"));
            }
            assert_eq!(accepted.load(Relaxed), 4, "a request opened its own connection");
            // Counted as pre-connects, none for the requests.
            assert_eq!(pools.connects(), (0, 4));
            // What a switch sizes from: every app connection that sent here may send again at
            // once, though sequential requests kept to the pool's 4.
            let mut more = Vec::new();
            for _ in 0..6 {
                let mut c = h1_client(p.addr).await;
                let (st, _, _) = send1(&mut c, get("/x").body(empty()).unwrap()).await;
                assert_eq!(st, StatusCode::OK);
                more.push(c);
            }
            assert_eq!(accepted.load(Relaxed), 4);
            assert_eq!(pools.h1_counts(&[ep])[0].2, 4);
            assert_eq!(pools.h1_demand(&[ep])[0].2, 7);
            drop(more);
            eventually("the closed app connections leave the demand", || {
                pools.h1_demand(&[ep])[0].2 == 4
            })
            .await;
            // Nothing listening: the error, and nothing pooled for it.
            let dead = dead_addr();
            assert!(pools
                .preconnect_h1(&p.shared, &p.pod, dead, 2, &[dead], Duration::from_secs(2))
                .await
                .is_err());
            assert_eq!(pools.h1_counts(&[dead])[0].2, 0);
            // What an upgrade's Commit names: the pools with connections, the dead one left out.
            let all = pools.h1_demand_all();
            assert_eq!(all.len(), 1, "{:?}", all.iter().map(|(_, e, n)| (e, n)).collect::<Vec<_>>());
            assert_eq!((all[0].1, all[0].2), (ep, 4));
        })
        .await
        .expect("bounded");
}

/// The answers of the scripted upstream the HTTP/1.1 client tests talk to, by path.
fn scripted_answer(head: &str, body: &[u8]) -> (Vec<u8>, Then) {
    let path = head.split(' ').nth(1).unwrap_or("");
    let keep = |b: &[u8]| (b.to_vec(), Then::KeepOpen);
    match path {
        "/cl" if head.starts_with("HEAD ") => keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        "/cl" => keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        "/chunked" => keep(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
        ),
        "/continue" => keep(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/nocontent" => keep(b"HTTP/1.1 204 No Content\r\n\r\n"),
        "/notmodified" => keep(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"),
        "/echo" => {
            let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
            let mut r = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-chunked: {chunked}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            (r, Then::KeepOpen)
        }
        "/eof" => (b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec(), Then::Close),
        // Both keep the connection open: the proxy must not reuse it anyway.
        "/close" => keep(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
        "/http10" => keep(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/garbage" => keep(b"HTTX/1.1 200 OK\r\n\r\n"),
        "/huge" => keep(format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(70 * 1024)).as_bytes()),
        "/badlength" => keep(b"HTTP/1.1 200 OK\r\ncontent-length: 12x\r\n\r\n"),
        "/badchunk" => keep(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"),
        "/short" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            Then::Close,
        ),
        "/half" => {
            let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec();
            r.extend_from_slice(&[b'x'; 50]);
            (r, Then::KeepOpen)
        }
        _ => keep(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    }
}

#[tokio::test]
async fn http1_upstream_bodies_of_every_framing_arrive_on_one_reused_connection() {
    tokio::time::timeout(BOUND, async {
        let (up, accepted) = scripted_upstream(scripted_answer).await;
        let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
        let mut c = h1_client(p.addr).await;
        for round in 0..2 {
            let (st, _, body) = send1(&mut c, get("/cl").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "hello"), "round {round}");
            // Chunked, with an extension and trailers (passed on: the client asked for them).
            c.ready().await.unwrap();
            let req = get("/chunked")
                .header(header::TE, "trailers")
                .body(empty())
                .unwrap();
            let resp = c.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let got = resp.into_body().collect().await.unwrap();
            let trailers = got.trailers().cloned();
            assert_eq!(got.to_bytes(), "hello world");
            assert_eq!(trailers.expect("trailers")["x-sum"], "11");
            // The 100 Continue is skipped.
            let (st, _, body) = send1(&mut c, get("/continue").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::OK, "ok"));
            // No body: HEAD (its content-length kept), 204, 304.
            let head = Request::head("/cl")
                .header(header::HOST, "web.test")
                .body(empty())
                .unwrap();
            let (st, h, body) = send1(&mut c, head).await;
            assert_eq!(
                (st, body.as_str(), h[header::CONTENT_LENGTH].to_str().unwrap()),
                (StatusCode::OK, "", "5")
            );
            let (st, _, body) = send1(&mut c, get("/nocontent").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::NO_CONTENT, ""));
            let (st, _, body) = send1(&mut c, get("/notmodified").body(empty()).unwrap()).await;
            assert_eq!((st, body.as_str()), (StatusCode::NOT_MODIFIED, ""));
            // Uploads: with a length as is, without one chunked (trailers included).
            let post = Request::post("/echo").header(header::HOST, "web.test");
            let (st, h, body) = send1(&mut c, post.body(full("sized body")).unwrap()).await;
            assert_eq!(
                (st, body.as_str(), h["x-chunked"].to_str().unwrap()),
                (StatusCode::OK, "sized body", "false")
            );
            let mut trailers = HeaderMap::new();
            trailers.insert("x-check", HeaderValue::from_static("1"));
            let frames = Frames(
                [
                    hyper::body::Frame::data(Bytes::from_static(b"in ")),
                    hyper::body::Frame::data(Bytes::from_static(b"parts")),
                    hyper::body::Frame::trailers(trailers),
                ]
                .into(),
            );
            let post = Request::post("/echo").header(header::HOST, "web.test");
            let (st, h, body) = send1(&mut c, post.body(frames.boxed()).unwrap()).await;
            assert_eq!(
                (st, body.as_str(), h["x-chunked"].to_str().unwrap()),
                (StatusCode::OK, "in parts", "true")
            );
        }
        assert_eq!(
            accepted.load(Relaxed),
            1,
            "one upstream connection for every request"
        );
        assert_eq!(p.shared.l7.http.connections(), 1);
        assert_eq!(p.shared.l7.http.connects(), (1, 0));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn http1_upstream_responses_that_end_their_connection_are_not_reused() {
    tokio::time::timeout(BOUND, async {
        let (up, accepted) = scripted_upstream(scripted_answer).await;
        let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
        let mut c = h1_client(p.addr).await;
        for (path, want) in [("/eof", "until close"), ("/close", "ok"), ("/http10", "ok")] {
            for _ in 0..2 {
                let (st, _, body) = send1(&mut c, get(path).body(empty()).unwrap()).await;
                assert_eq!((st, body.as_str()), (StatusCode::OK, want), "{path}");
            }
        }
        assert_eq!(accepted.load(Relaxed), 6, "a connection per request");
        assert_eq!(p.shared.l7.http.connections(), 0);
        assert_eq!(p.shared.l7.http.connects(), (6, 0));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_upstream_responses_are_answered_502_counted_and_the_proxy_goes_on() {
    tokio::time::timeout(BOUND, async {
        let (up, _) = scripted_upstream(scripted_answer).await;
        let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
        let errors = &p.shared.l7.errors;
        let mut c = h1_client(p.addr).await;
        // Malformed, oversized (70 KiB) and bad-length heads: the proxy answers.
        for (i, path) in ["/garbage", "/huge", "/badlength"].into_iter().enumerate() {
            let (st, h, _) = send1(&mut c, get(path).body(empty()).unwrap()).await;
            assert_eq!(
                (st, h["sockmesh-error"].to_str().unwrap()),
                (StatusCode::BAD_GATEWAY, "upstream_malformed"),
                "{path}"
            );
            assert_eq!(errors.get("http1", "upstream_malformed"), i as u64 + 1, "{path}");
        }
        let v = p.shared.l7.router.current().stats()[0].view();
        assert_eq!(v.failures.get("upstream_malformed"), Some(&3), "{v:?}");
        let (st, _, body) = send1(&mut c, get("/cl").body(empty()).unwrap()).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "hello"));
        // A bad chunk or an early close after the head is out: the app's connection is cut.
        for (path, reason) in [("/badchunk", "upstream_malformed"), ("/short", "upstream_reset")] {
            let before = errors.get("http1", reason);
            let mut c2 = h1_client(p.addr).await;
            c2.ready().await.unwrap();
            // hyper may find the error before the head is flushed: no response at all then.
            let failed = match c2.send_request(get(path).body(empty()).unwrap()).await {
                Ok(resp) => {
                    assert_eq!(resp.status(), StatusCode::OK);
                    resp.into_body().collect().await.is_err()
                }
                Err(_) => true,
            };
            assert!(failed, "{path}: the response must fail, not look complete");
            assert_eq!(errors.get("http1", reason), before + 1, "{path}");
        }
        let (st, _, body) = send1(&mut c, get("/cl").body(empty()).unwrap()).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "hello"));
    })
    .await
    .unwrap();
}

/// An upstream that stops within a response body is given up after
/// `upstream_body_idle_timeout`: the app's connection is cut (the head is out), the upstream
/// connection closed and not pooled, the failure counted; the next request is served.
#[tokio::test]
async fn an_upstream_stalled_within_a_body_is_given_up_and_counted() {
    tokio::time::timeout(BOUND, async {
        let (up, accepted) = scripted_upstream(scripted_answer).await;
        let limits = crate::config::Limits {
            upstream_body_idle_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let p = proxy_with(one_endpoint(up), HttpVersion::Http1, VIP, limits).await;
        let mut c = h1_client(p.addr).await;
        c.ready().await.unwrap();
        let started = std::time::Instant::now();
        let resp = c.send_request(get("/half").body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.into_body().collect().await.is_err(),
            "the body must fail, not look complete"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(p.shared.l7.errors.get("http1", "upstream_body_timeout"), 1);
        assert_eq!(
            p.shared.l7.http.h1_counts(&[up])[0].2,
            0,
            "the stalled connection is not kept"
        );
        let mut c = h1_client(p.addr).await;
        let (st, _, body) = send1(&mut c, get("/cl").body(empty()).unwrap()).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "hello"));
        assert_eq!(accepted.load(Relaxed), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_response_body_dropped_midway_closes_its_upstream_connection() {
    tokio::time::timeout(BOUND, async {
        let (up, accepted) = scripted_upstream(scripted_answer).await;
        let p = proxy(one_endpoint(up), HttpVersion::Http1, VIP).await;
        let pools = &p.shared.l7.http;
        let mut c = h1_client(p.addr).await;
        c.ready().await.unwrap();
        let resp = c.send_request(get("/half").body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Busy while its body streams.
        assert_eq!(pools.h1_counts(&[up])[0].2, 1);
        drop((resp, c));
        eventually("the half-read connection gone", || {
            pools.h1_counts(&[up])[0].2 == 0
        })
        .await;
        let mut c = h1_client(p.addr).await;
        let (st, _, body) = send1(&mut c, get("/cl").body(empty()).unwrap()).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "hello"));
        assert_eq!(
            accepted.load(Relaxed),
            2,
            "the half-read connection was not reused"
        );
        assert_eq!(pools.h1_counts(&[up])[0].2, 1);
    })
    .await
    .unwrap();
}
