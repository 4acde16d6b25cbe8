//! Unit tests: both adapters against recorded client captures, and the whole path (app
//! connection, routing, shared upstream connections, timeouts, retries, upgrade drain) against
//! in-process servers.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::mpsc,
};
use tokio_util::codec::{Decoder, Encoder};

use super::{app::*, bolt::*, dubbo::*, *};
use crate::{
    conn::{ConnEntry, Direction, OrigDstSource, PodCtx, Shared},
    protocol::{
        bolt::{self, BoltCodec, BoltFrame},
        dubbo::{self, DubboFrame},
        hessian2,
    },
    routing::{compile, parse_toml, Policy, Router},
    sys::NetNs,
};

const BOLT_V1: &[u8] = include_bytes!("../../protocol/testdata/bolt_v1.c2s.bin");
const BOLT_V2: &[u8] = include_bytes!("../../protocol/testdata/bolt_v2_crc.c2s.bin");
const DUBBO: &[u8] = include_bytes!("../../protocol/testdata/dubbo.c2s.bin");
/// The npm client's `echo` with requestProps `x-canary=true` (and others), default codec.
const BOLT_PROPS: &[u8] = include_bytes!("../../protocol/testdata/bolt_props.c2s.bin");
const VIP: &str = "10.96.0.50:12200";
const WAIT: Duration = Duration::from_secs(20);

struct NoOrigDst;

impl OrigDstSource for NoOrigDst {
    fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }
}

fn frames<P: MuxProto>(bytes: &[u8]) -> Vec<P::Frame> {
    let mut codec = P::Codec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
        out.push(f);
    }
    out
}

/// Read one frame; `None` at EOF or on a reset.
async fn read_frame<P: MuxProto>(r: &mut OwnedReadHalf, buf: &mut BytesMut) -> Option<P::Frame> {
    let mut codec = P::Codec::default();
    loop {
        if let Some(f) = codec.decode(buf).unwrap() {
            return Some(f);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

enum Reply<F> {
    Send(F),
    Crash,
    Nothing,
}

struct TestServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

/// A server that answers every request with `answer` after `delay` (heartbeats at once).
async fn server<P: MuxProto>(
    name: &'static str,
    delay: Duration,
    answer: fn(&P::Frame, &str) -> Reply<P::Frame>,
) -> TestServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            counter.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let (tx, mut rx) = mpsc::unbounded_channel::<P::Frame>();
                let writer = tokio::spawn(async move {
                    let mut codec = P::Codec::default();
                    while let Some(f) = rx.recv().await {
                        let mut buf = BytesMut::new();
                        codec.encode(f, &mut buf).unwrap();
                        if wr.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = BytesMut::new();
                while let Some(req) = read_frame::<P>(&mut rd, &mut buf).await {
                    if let Some(ack) = P::heartbeat_reply(&req) {
                        let _ = tx.send(ack);
                        continue;
                    }
                    match answer(&req, name) {
                        Reply::Send(res) => {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = tx.send(res);
                            });
                        }
                        Reply::Crash => break,
                        Reply::Nothing => {}
                    }
                }
                writer.abort();
            });
        }
    });
    TestServer { addr, accepts }
}

fn bolt_answer(req: &BoltFrame, name: &str) -> Reply<BoltFrame> {
    if req.header("x-crash").is_some() {
        return Reply::Crash;
    }
    if req.cmd_type == bolt::TYPE_REQUEST_ONEWAY {
        return Reply::Nothing;
    }
    let subset = req.header_str(SUBSET_KEY).unwrap_or("-");
    Reply::Send(BoltFrame {
        cmd_code: bolt::CMD_RPC_RESPONSE,
        class_name: Bytes::from_static(b"com.alipay.sofa.rpc.core.response.SofaResponse"),
        content: format!("{name}|{subset}").into(),
        ..req.error_response_to(bolt::status::SUCCESS)
    })
}

fn dubbo_answer(req: &DubboFrame, name: &str) -> Reply<DubboFrame> {
    let inv = dubbo::decode_request_body(&req.body).unwrap();
    if inv.attachment("x-crash").is_some() {
        return Reply::Crash;
    }
    if !req.is_two_way() {
        return Reply::Nothing;
    }
    let mut body = Vec::new();
    let subset = inv.attachment(SUBSET_KEY).unwrap_or("-");
    hessian2::write_string(&mut body, &format!("{name}|{subset}"));
    Reply::Send(DubboFrame {
        flag: dubbo::SERIALIZATION_HESSIAN2,
        status: dubbo::status::OK,
        request_id: req.request_id,
        body: body.into(),
    })
}

fn bolt_content(f: &BoltFrame) -> String {
    String::from_utf8(f.content.to_vec()).unwrap()
}

fn dubbo_content(f: &DubboFrame) -> String {
    hessian2::Reader::new(&f.body).read_string().unwrap()
}

/// The policy: `VIP` is a service with subsets v1 and v2 (one endpoint each), a header
/// route `x-canary: true` → v2 and a 90/10 default split.
fn policy(protocol: &str, v1: SocketAddr, v2: SocketAddr, timeout_ms: u64, retries: u32) -> Router {
    let text = format!(
        r#"
        [[services]]
        name = "echo"
        addresses = ["{VIP}"]
        protocol = "{protocol}"
        timeout_ms = {timeout_ms}
        retries = {retries}
        endpoints = [
          {{ address = "{v1}", labels = {{ version = "v1" }} }},
          {{ address = "{v2}", labels = {{ version = "v2" }} }},
        ]
        subsets = [
          {{ name = "v1", labels = {{ version = "v1" }} }},
          {{ name = "v2", labels = {{ version = "v2" }} }},
        ]
        [[services.routes]]
        name = "canary"
        match = {{ headers = {{ x-canary = "true" }} }}
        split = [{{ subset = "v2", weight = 100 }}]
        [[services.routes]]
        name = "default"
        split = [{{ subset = "v1", weight = 90 }}, {{ subset = "v2", weight = 10 }}]
        "#
    );
    Router::new(compile(parse_toml(&text).unwrap()).unwrap())
}

/// The proxy side: a listener whose connections are served by `serve_bolt`/`serve_dubbo`
/// as if captured on their way to `VIP`.
struct Mesh {
    addr: SocketAddr,
    shared: Arc<Shared>,
    pod: Arc<PodCtx>,
}

async fn mesh<P: MuxProto>(router: Router) -> Mesh {
    mesh_with::<P, _>(router, || UpgradeDrain).await
}

/// The context of an app connection from `client` in the test mesh.
fn test_ctx(shared: &Arc<Shared>, pod: &Arc<PodCtx>, client: SocketAddr) -> ConnCtx {
    ConnCtx {
        pod: pod.clone(),
        shared: shared.clone(),
        client,
        orig: VIP.parse().unwrap(),
        entry: Arc::new(ConnEntry {
            id: 1,
            pod: "t".into(),
            direction: Direction::Outbound,
            client,
            original_dst: VIP.parse().unwrap(),
            upstream_local: Mutex::new(None),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            started: Instant::now(),
        }),
        inbound: false,
        local: VIP.parse().unwrap(),
    }
}

/// A mesh whose app connections learn of a drain from `drain()`.
async fn mesh_with<P: MuxProto, D: MuxDrain>(router: Router, drain: impl Fn() -> D + Send + 'static) -> Mesh {
    mesh_limited::<P, D>(router, crate::config::Limits::default(), drain).await
}

/// [`mesh_with`] with its own `[limits]`.
async fn mesh_limited<P: MuxProto, D: MuxDrain>(
    router: Router,
    limits: crate::config::Limits,
    drain: impl Fn() -> D + Send + 'static,
) -> Mesh {
    let mut shared = Shared::new(Box::new(NoOrigDst), router);
    shared.limits = limits;
    let shared = Arc::new(shared);
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
    let (s2, p2) = (shared.clone(), pod.clone());
    tokio::spawn(async move {
        loop {
            let (s, client) = l.accept().await.unwrap();
            let ctx = test_ctx(&s2, &p2, client);
            tokio::spawn(serve_with::<P, D>(s, BytesMut::new(), 0, ctx, drain()));
        }
    });
    Mesh { addr, shared, pod }
}

impl Mesh {
    fn route_view(&self, route: &str, subset: &str) -> crate::routing::RouteStatsView {
        let policy = self.shared.l7.router.current();
        let s = policy
            .stats()
            .into_iter()
            .find(|s| s.route == route && s.subset == subset)
            .unwrap();
        s.view()
    }

    fn errors(&self, protocol: &str, reason: &str) -> u64 {
        self.shared.l7.errors.get(protocol, reason)
    }
}

/// An app connection speaking `P`.
struct App<P: MuxProto> {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    codec: P::Codec,
}

impl<P: MuxProto> App<P> {
    async fn connect(m: &Mesh) -> Self {
        let (rd, wr) = TcpStream::connect(m.addr).await.unwrap().into_split();
        Self {
            rd,
            wr,
            buf: BytesMut::new(),
            codec: P::Codec::default(),
        }
    }

    async fn send(&mut self, frames: impl IntoIterator<Item = P::Frame>) {
        let mut out = BytesMut::new();
        for f in frames {
            self.codec.encode(f, &mut out).unwrap();
        }
        self.wr.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> P::Frame {
        tokio::time::timeout(WAIT, read_frame::<P>(&mut self.rd, &mut self.buf))
            .await
            .expect("a response in time")
            .expect("a response, not EOF")
    }

    async fn call(&mut self, f: P::Frame) -> P::Frame {
        self.send([f]).await;
        self.recv().await
    }

    /// The proxy closes the connection (after whatever it still had to say).
    async fn expect_closed(&mut self) -> Vec<P::Frame> {
        let mut got = Vec::new();
        let read = async {
            while let Some(f) = read_frame::<P>(&mut self.rd, &mut self.buf).await {
                got.push(f);
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("the proxy closes the connection");
        got
    }
}

fn bolt_request(template: &BoltFrame, id: u32, headers: &[(&str, &str)]) -> BoltFrame {
    let mut f = template.clone();
    f.request_id = id;
    for (k, v) in headers {
        f.set_header(k, v);
    }
    f
}

fn dubbo_request(template: &DubboFrame, id: u64, attachments: &[(&str, &str)]) -> DubboFrame {
    let mut f = template.clone();
    f.request_id = id;
    for (k, v) in attachments {
        f.body = dubbo::add_attachment(&f.body, k, v).unwrap().into();
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bolt_2000_multiplexed_requests_split_90_10_with_the_apps_ids() {
    let delay = Duration::from_millis(20);
    let v1 = server::<Bolt>("v1", delay, bolt_answer).await;
    let v2 = server::<Bolt>("v2", delay, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 10_000, 1)).await;
    let t1 = frames::<Bolt>(BOLT_V1).remove(0);
    let t2 = frames::<Bolt>(BOLT_V2).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    let n = 2000u32;
    // v1 frames for even ids, v2 frames with a CRC for odd ones, all written at once.
    let reqs: Vec<BoltFrame> = (1..=n)
        .map(|id| bolt_request(if id % 2 == 0 { &t1 } else { &t2 }, id, &[]))
        .collect();
    let started = Instant::now();
    app.send(reqs).await;
    let mut seen = std::collections::HashSet::new();
    let mut v2_count = 0;
    for _ in 0..n {
        let r = app.recv().await;
        assert_eq!(r.status, bolt::status::SUCCESS);
        assert!(seen.insert(r.request_id), "duplicate id {}", r.request_id);
        assert_eq!(
            r.proto,
            if r.request_id % 2 == 0 {
                bolt::PROTO_V1
            } else {
                bolt::PROTO_V2
            }
        );
        match bolt_content(&r).as_str() {
            "v1|v1" => {}
            "v2|v2" => v2_count += 1,
            other => panic!("unexpected content {other:?}"),
        }
    }
    assert_eq!(seen, (1..=n).collect());
    // 2000 × 20 ms one after another would take 40 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let share = f64::from(v2_count) / f64::from(n);
    assert!((0.07..=0.13).contains(&share), "v2 share {share}");
    let (s1, s2) = (m.route_view("default", "v1"), m.route_view("default", "v2"));
    assert_eq!(s1.requests + s2.requests, u64::from(n));
    assert!(s1.failures.is_empty() && s2.failures.is_empty());
    assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
    assert!(v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
    assert!(m.pod.stats.bytes_upstream.load(Relaxed) >= (BOLT_V1.len() / 2) as u64 * u64::from(n));
    assert!(m.pod.stats.bytes_downstream.load(Relaxed) > 20 * u64::from(n));
}

#[tokio::test]
async fn bolt_header_match_overrides_the_split_and_connections_are_shared() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 10_000, 1)).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut a = App::<Bolt>::connect(&m).await;
    let mut b = App::<Bolt>::connect(&m).await;
    a.send((1..=200).map(|id| bolt_request(&t, id, &[("X-Canary", "true")])))
        .await;
    b.send((1..=200).map(|id| bolt_request(&t, id, &[]))).await;
    for _ in 0..200 {
        assert_eq!(bolt_content(&a.recv().await), "v2|v2");
        assert_eq!(b.recv().await.status, bolt::status::SUCCESS);
    }
    assert_eq!(m.route_view("canary", "v2").requests, 200);
    // A third app connection later: still the same upstream connections.
    let mut c = App::<Bolt>::connect(&m).await;
    c.send((1..=100).map(|id| bolt_request(&t, id, &[("x-canary", "true")])))
        .await;
    for _ in 0..100 {
        assert_eq!(c.recv().await.status, bolt::status::SUCCESS);
    }
    assert!(
        v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT,
        "{}",
        v2.accepts.load(Relaxed)
    );
    assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
    let (bolt_live, _) = m.shared.l7.mux.live_connections();
    assert!((1..=2 * CONNS_PER_ENDPOINT).contains(&bolt_live), "{bolt_live}");
}

/// Answers with the subset and the request's content as received.
fn bolt_echo_content(req: &BoltFrame, name: &str) -> Reply<BoltFrame> {
    let subset = req.header_str(SUBSET_KEY).unwrap_or("-");
    let mut content = format!("{name}|{subset}|").into_bytes();
    content.extend_from_slice(&req.content);
    Reply::Send(BoltFrame {
        cmd_code: bolt::CMD_RPC_RESPONSE,
        content: content.into(),
        ..req.error_response_to(bolt::status::SUCCESS)
    })
}

/// A service at `VIP` with subsets v1 and v2, `routes` (TOML) before a catch-all to v1.
fn bolt_policy(v1: SocketAddr, v2: SocketAddr, routes: &str) -> Policy {
    let text = format!(
        r#"
        [[services]]
        name = "echo"
        addresses = ["{VIP}"]
        protocol = "bolt"
        endpoints = [
          {{ address = "{v1}", labels = {{ version = "v1" }} }},
          {{ address = "{v2}", labels = {{ version = "v2" }} }},
        ]
        subsets = [
          {{ name = "v1", labels = {{ version = "v1" }} }},
          {{ name = "v2", labels = {{ version = "v2" }} }},
        ]
        {routes}
        [[services.routes]]
        name = "default"
        split = [{{ subset = "v1", weight = 100 }}]
        "#
    );
    compile(parse_toml(&text).unwrap()).unwrap()
}

#[tokio::test]
async fn bolt_routes_on_the_sofa_request_body_of_the_npm_client() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_echo_content).await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_echo_content).await;
    let canary = r#"
        [[services.routes]]
        name = "canary"
        match = { headers = { X-Canary = "true" } }
        split = [{ subset = "v2", weight = 100 }]
    "#;
    let m = mesh::<Bolt>(Router::new(bolt_policy(v1.addr, v2.addr, canary))).await;
    // The real client's frame: only `service` in the Bolt header map; `x-canary` and the
    // method are only in the Hessian2 SofaRequest.
    let props = frames::<Bolt>(BOLT_PROPS).remove(0);
    assert_eq!(props.headers.len(), 1);
    assert_eq!(props.header(BOLT_METHOD_HEADER), None);
    let plain = frames::<Bolt>(BOLT_V1);
    let answer = |f: &BoltFrame, want: &str| {
        assert_eq!(f.status, bolt::status::SUCCESS);
        let content = &f.content[..];
        let (head, body) = content.split_at(want.len());
        assert_eq!(head, want.as_bytes());
        body.to_vec()
    };
    let mut app = App::<Bolt>::connect(&m).await;

    // A headers match on requestProps; the content reaches the server byte for byte.
    let got = app.call(bolt_request(&props, 1, &[])).await;
    assert_eq!(answer(&got, "v2|v2|"), &props.content[..]);
    assert_eq!(m.route_view("canary", "v2").requests, 1);
    // No x-canary in the body: the catch-all.
    let got = app.call(bolt_request(&plain[0], 2, &[])).await;
    assert_eq!(answer(&got, "v1|v1|"), &plain[0].content[..]);
    // The Bolt header map comes first.
    let got = app.call(bolt_request(&props, 3, &[("x-canary", "false")])).await;
    answer(&got, "v1|v1|");

    // A method match (and a service match) on the same request, after a live policy change.
    let by_method = r#"
        [[services.routes]]
        name = "echo-method"
        match = { method = "echo", service = "com.sockmesh.test.EchoService" }
        split = [{ subset = "v2", weight = 100 }]
    "#;
    m.shared
        .l7
        .router
        .replace(bolt_policy(v1.addr, v2.addr, by_method));
    let got = app.call(bolt_request(&props, 4, &[])).await;
    assert_eq!(answer(&got, "v2|v2|"), &props.content[..]);
    assert_eq!(m.route_view("echo-method", "v2").requests, 1);
    // `fail` is another method: the catch-all.
    answer(&app.call(bolt_request(&plain[1], 5, &[])).await, "v1|v1|");
    // Without the `service` header, the service comes from targetServiceUniqueName.
    let mut no_service = bolt_request(&props, 6, &[]);
    assert!(no_service.remove_header(bolt::HEADER_SERVICE));
    answer(&app.call(no_service).await, "v2|v2|");
    // A method header wins over the body.
    answer(
        &app.call(bolt_request(&props, 7, &[(BOLT_METHOD_HEADER, "other")]))
            .await,
        "v1|v1|",
    );
    assert_eq!(m.route_view("echo-method", "v2").requests, 2);

    // A content that is not a valid SofaRequest: routed on the header map, no error, and
    // forwarded as is.
    let mut bad = bolt_request(&props, 8, &[]);
    let mut content = bad.content.to_vec();
    content.truncate(60);
    bad.content = content.into();
    let got = app.call(bad.clone()).await;
    assert_eq!(answer(&got, "v1|v1|"), &bad.content[..]);
    let policy = m.shared.l7.router.current();
    assert!(policy.stats().iter().all(|s| s.view().failures.is_empty()));
    assert_eq!(m.errors("bolt", "hessian2_truncated"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dubbo_split_header_match_heartbeat_and_bad_body() {
    let delay = Duration::from_millis(5);
    let v1 = server::<Dubbo>("v1", delay, dubbo_answer).await;
    let v2 = server::<Dubbo>("v2", delay, dubbo_answer).await;
    let m = mesh::<Dubbo>(policy("dubbo", v1.addr, v2.addr, 10_000, 1)).await;
    let t = frames::<Dubbo>(DUBBO).remove(0);
    let mut app = App::<Dubbo>::connect(&m).await;
    let n = 2000u64;
    // Large ids: the app's ids are 64-bit and must come back unchanged.
    let base = 1u64 << 40;
    app.send((0..n).map(|i| dubbo_request(&t, base + i, &[]))).await;
    let mut seen = std::collections::HashSet::new();
    let mut v2_count = 0;
    for _ in 0..n {
        let r = app.recv().await;
        assert_eq!(r.status, dubbo::status::OK);
        assert!(seen.insert(r.request_id));
        match dubbo_content(&r).as_str() {
            "v1|v1" => {}
            "v2|v2" => v2_count += 1,
            other => panic!("unexpected content {other:?}"),
        }
    }
    assert_eq!(seen, (base..base + n).collect());
    let share = v2_count as f64 / n as f64;
    assert!((0.07..=0.13).contains(&share), "v2 share {share}");

    // The attachment overrides the split.
    app.send((1..=100).map(|id| dubbo_request(&t, id, &[("x-canary", "true")])))
        .await;
    for _ in 0..100 {
        assert_eq!(dubbo_content(&app.recv().await), "v2|v2");
    }
    assert_eq!(m.route_view("canary", "v2").requests, 100);

    // A heartbeat is answered by the proxy.
    let hb = Dubbo::heartbeat(77);
    let r = app.call(hb).await;
    assert_eq!(
        (r.request_id, r.is_event(), r.is_request(), r.status),
        (77, true, false, dubbo::status::OK)
    );

    // A body that is not Hessian2: BAD_REQUEST for that request, the connection carries on.
    let mut bad = t.clone();
    bad.request_id = 5000;
    bad.body = Bytes::from_static(b"\x90not hessian");
    let r = app.call(bad).await;
    assert_eq!((r.request_id, r.status), (5000, dubbo::status::BAD_REQUEST));
    assert_eq!(m.errors("dubbo", "hessian2_unexpected_tag"), 1);
    let r = app.call(dubbo_request(&t, 5001, &[])).await;
    assert_eq!((r.request_id, r.status), (5001, dubbo::status::OK));
    assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
    assert!(v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn dead_endpoint_is_retried_then_answered_with_an_error() {
    let dead = dead_port().await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", dead, v2.addr, 5_000, 1)).await;
    let t = frames::<Bolt>(BOLT_V2).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    // Until the split sends one to v1 (the dead endpoint).
    let mut failed = 0;
    for id in 1..=200 {
        let r = app.call(bolt_request(&t, id, &[])).await;
        assert_eq!(r.request_id, id);
        if r.status != bolt::status::SUCCESS {
            assert_eq!(r.status, bolt::status::ERROR_COMM);
            assert_eq!(r.proto, bolt::PROTO_V2);
            let msg = r.header_str(ERROR_HEADER).unwrap();
            assert!(msg.contains(&dead.to_string()), "{msg}");
            failed += 1;
        }
    }
    assert!(failed > 0);
    let s = m.route_view("default", "v1");
    assert_eq!(s.requests, failed);
    // One endpoint in the subset: the retry tries it again.
    assert_eq!(s.retries, failed);
    assert_eq!(s.failures.get("upstream_connect"), Some(&failed));
    assert_eq!(m.errors("bolt", "upstream_connect"), failed);
    assert_eq!(m.route_view("default", "v2").failures.len(), 0);

    // Dubbo: SERVICE_ERROR with a message naming the endpoint.
    let dead2 = dead_port().await;
    let m = mesh::<Dubbo>(policy("dubbo", dead, dead2, 5_000, 2)).await;
    let mut app = App::<Dubbo>::connect(&m).await;
    let r = app.call(dubbo_request(&frames::<Dubbo>(DUBBO)[0], 9, &[])).await;
    assert_eq!((r.request_id, r.status), (9, dubbo::status::SERVICE_ERROR));
    let msg = dubbo_content(&r);
    assert!(
        msg.contains(&dead.to_string()) || msg.contains(&dead2.to_string()),
        "{msg}"
    );
    assert_eq!(m.errors("dubbo", "upstream_connect"), 1);
}

#[tokio::test]
async fn retry_goes_to_the_other_endpoint_of_the_subset() {
    let dead = dead_port().await;
    let live = server::<Bolt>("live", Duration::ZERO, bolt_answer).await;
    let text = format!(
        r#"
        [[services]]
        name = "echo"
        addresses = ["{VIP}"]
        retries = 1
        endpoints = [{{ address = "{dead}" }}, {{ address = "{}" }}]
        "#,
        live.addr
    );
    let m = mesh::<Bolt>(Router::new(compile(parse_toml(&text).unwrap()).unwrap())).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    for id in 1..=10 {
        let r = app.call(bolt_request(&t, id, &[])).await;
        assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
        assert_eq!(bolt_content(&r), "live|all");
    }
    let s = m.route_view("default", "all");
    assert_eq!((s.requests, s.retries), (10, 5));
    assert!(s.failures.is_empty());
}

#[tokio::test]
async fn slow_upstream_times_out_and_the_connection_stays_usable() {
    let slow = server::<Bolt>("v1", Duration::from_millis(600), bolt_answer).await;
    let fast = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", slow.addr, fast.addr, 150, 1)).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    // Until one goes to the slow subset.
    let mut id = 0;
    loop {
        id += 1;
        let started = Instant::now();
        let r = app.call(bolt_request(&t, id, &[])).await;
        assert_eq!(r.request_id, id);
        if r.status == bolt::status::TIMEOUT {
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(140) && took < Duration::from_millis(550),
                "{took:?}"
            );
            break;
        }
        assert_eq!(bolt_content(&r), "v2|v2");
    }
    assert_eq!(m.errors("bolt", "timeout"), 1);
    assert_eq!(m.route_view("default", "v1").failures.get("timeout"), Some(&1));
    // The late response arrives upstream and is dropped; the next answer is the next request's.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = app.call(bolt_request(&t, 9999, &[("x-canary", "true")])).await;
    assert_eq!((r.request_id, r.status), (9999, bolt::status::SUCCESS));
    assert_eq!(bolt_content(&r), "v2|v2");
}

#[tokio::test]
async fn upstream_dying_mid_request_fails_it_and_is_replaced() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    let r = app
        .call(bolt_request(&t, 1, &[("x-crash", "1"), ("x-canary", "true")]))
        .await;
    assert_eq!((r.request_id, r.status), (1, bolt::status::CONNECTION_CLOSED));
    assert_eq!(m.errors("bolt", "upstream_reset"), 1);
    for id in 2..=10 {
        let r = app.call(bolt_request(&t, id, &[("x-canary", "true")])).await;
        assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
    }
    assert!(v2.accepts.load(Relaxed) >= 2);
}

#[tokio::test]
async fn bad_input_is_counted_and_closes_only_that_connection() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut good = App::<Bolt>::connect(&m).await;
    assert_eq!(
        good.call(bolt_request(&t, 1, &[])).await.status,
        bolt::status::SUCCESS
    );

    // Garbage: no request id, so no response; counted and closed.
    let mut garbage = App::<Bolt>::connect(&m).await;
    garbage.wr.write_all(b"\x07GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(garbage.expect_closed().await.is_empty());
    assert_eq!(m.errors("bolt", "bolt_bad_proto"), 1);

    // A content length beyond the limit: the id is known, so CODEC_EXCEPTION, then close.
    let mut big = App::<Bolt>::connect(&m).await;
    let mut bytes = BytesMut::new();
    BoltCodec::default()
        .encode(bolt_request(&t, 42, &[]), &mut bytes)
        .unwrap();
    bytes[18..22].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    big.wr.write_all(&bytes[..22]).await.unwrap();
    let got = big.expect_closed().await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].request_id, got[0].status),
        (42, bolt::status::CODEC_EXCEPTION)
    );
    assert_eq!(m.errors("bolt", "bolt_frame_too_large"), 1);

    // A frame cut short at EOF.
    let mut cut = App::<Bolt>::connect(&m).await;
    cut.wr.write_all(&BOLT_V1[..30]).await.unwrap();
    cut.wr.shutdown().await.unwrap();
    assert!(cut.expect_closed().await.is_empty());
    assert_eq!(m.errors("bolt", "bolt_truncated"), 1);

    // The first connection never noticed.
    for id in 2..=5 {
        let r = good.call(bolt_request(&t, id, &[])).await;
        assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
    }

    // Dubbo: bad magic closes; an oversized body with its id gets BAD_REQUEST first.
    let d1 = server::<Dubbo>("v1", Duration::ZERO, dubbo_answer).await;
    let d2 = server::<Dubbo>("v2", Duration::ZERO, dubbo_answer).await;
    let m = mesh::<Dubbo>(policy("dubbo", d1.addr, d2.addr, 5_000, 1)).await;
    let mut garbage = App::<Dubbo>::connect(&m).await;
    garbage.wr.write_all(b"hello there").await.unwrap();
    assert!(garbage.expect_closed().await.is_empty());
    assert_eq!(m.errors("dubbo", "dubbo_bad_magic"), 1);
    let mut big = App::<Dubbo>::connect(&m).await;
    let mut header = DUBBO[..dubbo::HEADER_LEN].to_vec();
    header[4..12].copy_from_slice(&77u64.to_be_bytes());
    header[12..16].copy_from_slice(&(64u32 << 20).to_be_bytes());
    big.wr.write_all(&header).await.unwrap();
    let got = big.expect_closed().await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].request_id, got[0].status),
        (77, dubbo::status::BAD_REQUEST)
    );
    assert_eq!(m.errors("dubbo", "dubbo_frame_too_large"), 1);
}

#[tokio::test]
async fn a_trickled_frame_is_cut_at_the_head_timeout_and_a_silent_connection_at_the_idle_timeout() {
    const HEAD: Duration = Duration::from_millis(400);
    const IDLE: Duration = Duration::from_millis(1500);
    let limits = crate::config::Limits {
        request_head_timeout: HEAD,
        client_idle_timeout: IDLE,
        ..crate::config::Limits::default()
    };
    // The servers answer after 2 s: longer than the idle timeout.
    let v1 = server::<Bolt>("v1", Duration::from_secs(2), bolt_answer).await;
    let v2 = server::<Bolt>("v2", Duration::from_secs(2), bolt_answer).await;
    let m = mesh_limited::<Bolt, _>(policy("bolt", v1.addr, v2.addr, 5_000, 1), limits, || {
        UpgradeDrain
    })
    .await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let frame = encoded::<Bolt>([bolt_request(&t, 7, &[])]);

    // A frame whose halves come 150 ms apart (well inside the head timeout) is served, and
    // the connection is not idle while its request is in flight past the idle timeout.
    let mut ok = App::<Bolt>::connect(&m).await;
    ok.wr.write_all(&frame[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    ok.wr.write_all(&frame[20..]).await.unwrap();
    let r = ok.recv().await;
    let answered = Instant::now();
    assert_eq!((r.request_id, r.status), (7, bolt::status::SUCCESS));

    // A slowloris: one byte every 100 ms never completes the frame; bytes arriving do not
    // reset the clock, so the connection is closed one head timeout after its first byte.
    let mut slow = App::<Bolt>::connect(&m).await;
    let started = Instant::now();
    let trickle = {
        let bytes = frame.clone();
        let mut wr = slow.wr;
        tokio::spawn(async move {
            for b in bytes.iter().take(bytes.len() - 1) {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Held open, never finished.
            tokio::time::sleep(WAIT).await;
        })
    };
    let got = tokio::time::timeout(WAIT, read_frame::<Bolt>(&mut slow.rd, &mut slow.buf))
        .await
        .expect("the proxy closes a trickled frame");
    assert!(got.is_none(), "no answer to an unfinished frame");
    let cut_after = started.elapsed();
    assert!(
        cut_after >= HEAD,
        "cut after {cut_after:?}, before the head timeout"
    );
    assert!(
        frame.len() as u128 * 100 > cut_after.as_millis(),
        "cut only at the frame's end"
    );
    assert_eq!(m.errors("bolt", "frame_timeout"), 1);
    trickle.abort();

    // The first connection, silent since its answer: closed an idle timeout after it,
    // counted; never as a frame timeout.
    assert!(ok.expect_closed().await.is_empty());
    let idle = answered.elapsed();
    assert!(
        idle >= IDLE - Duration::from_millis(50),
        "closed {idle:?} after the last response"
    );
    assert_eq!(m.errors("bolt", "idle_timeout"), 1);
    assert_eq!(m.errors("bolt", "frame_timeout"), 1);
}

#[tokio::test]
async fn bolt_heartbeats_and_one_way_requests() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
    let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
    let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
    let mut app = App::<Bolt>::connect(&m).await;
    let r = app.call(Bolt::heartbeat(31)).await;
    assert_eq!(
        (r.request_id, r.cmd_type, r.cmd_code),
        (31, bolt::TYPE_RESPONSE, bolt::CMD_HEARTBEAT)
    );
    // Heartbeats are not forwarded: no upstream connection yet.
    assert_eq!(v1.accepts.load(Relaxed) + v2.accepts.load(Relaxed), 0);
    let mut oneway = frames::<Bolt>(BOLT_V1).remove(0);
    oneway.cmd_type = bolt::TYPE_REQUEST_ONEWAY;
    oneway.request_id = 32;
    app.send([oneway]).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    // The next frame the app sees answers the next two-way request (nothing for the one-way).
    let r = app.call(bolt_request(&t, 33, &[])).await;
    assert_eq!((r.request_id, r.status), (33, bolt::status::SUCCESS));
    let s = m.route_view("default", "v1");
    assert_eq!(s.requests + m.route_view("default", "v2").requests, 2);
}

#[tokio::test]
async fn no_route_answers_no_processor_and_service_not_found() {
    let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
    let text = format!(
        r#"
        [[services]]
        name = "echo"
        addresses = ["{VIP}"]
        endpoints = [{{ address = "{}" }}]
        [[services.routes]]
        match = {{ method = "only-this" }}
        split = [{{ subset = "all", weight = 1 }}]
        "#,
        v1.addr
    );
    let router = || Router::new(compile(parse_toml(&text).unwrap()).unwrap());
    let m = mesh::<Bolt>(router()).await;
    let mut app = App::<Bolt>::connect(&m).await;
    let r = app.call(bolt_request(&frames::<Bolt>(BOLT_V1)[0], 5, &[])).await;
    assert_eq!((r.request_id, r.status), (5, bolt::status::NO_PROCESSOR));
    assert_eq!(m.errors("bolt", "no_route"), 1);
    let m = mesh::<Dubbo>(router()).await;
    let mut app = App::<Dubbo>::connect(&m).await;
    let r = app.call(dubbo_request(&frames::<Dubbo>(DUBBO)[0], 6, &[])).await;
    assert_eq!((r.request_id, r.status), (6, dubbo::status::SERVICE_NOT_FOUND));
    assert_eq!(m.errors("dubbo", "no_route"), 1);
}

// ---------------------------------------------------------------------------------------
// Upgrade: moving an app connection at a frame boundary

/// A drain the test starts (`go`: the hand-over deadline); moved connections come out of
/// `moved` with their undecoded bytes and the stream offset.
#[derive(Clone)]
struct TestDrain {
    go: tokio::sync::watch::Receiver<Option<Instant>>,
    moved: mpsc::UnboundedSender<(TcpStream, Vec<u8>, u64)>,
}

type Moved = mpsc::UnboundedReceiver<(TcpStream, Vec<u8>, u64)>;

impl TestDrain {
    fn new() -> (Self, tokio::sync::watch::Sender<Option<Instant>>, Moved) {
        let (go_tx, go) = tokio::sync::watch::channel(None);
        let (moved, moved_rx) = mpsc::unbounded_channel();
        (Self { go, moved }, go_tx, moved_rx)
    }
}

impl MuxDrain for TestDrain {
    async fn wait(&self) -> Instant {
        let mut go = self.go.clone();
        let by = match go.wait_for(|g| g.is_some()).await {
            Ok(by) => *by,
            Err(_) => None,
        };
        match by {
            Some(by) => by,
            None => std::future::pending().await,
        }
    }

    fn hand_over(&self, s: TcpStream, read: Vec<u8>, offset: u64, _: &ConnCtx, _: &'static str) {
        let _ = self.moved.send((s, read, offset));
    }
}

fn encoded<P: MuxProto>(frames: impl IntoIterator<Item = P::Frame>) -> BytesMut {
    let mut codec = P::Codec::default();
    let mut out = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut out).unwrap();
    }
    out
}

/// Until the proxy has read `n` bytes from its app connections.
async fn read_by_proxy(m: &Mesh, n: u64) {
    let t0 = Instant::now();
    while m.pod.stats.bytes_upstream.load(Relaxed) < n {
        assert!(
            t0.elapsed() < WAIT,
            "the proxy read {} of {n} bytes",
            m.pod.stats.bytes_upstream.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn draining_answers_the_requests_in_flight_then_moves_the_socket_with_a_partial_frame() {
    const DELAY: Duration = Duration::from_millis(300);
    let v1 = server::<Bolt>("v1", DELAY, bolt_answer).await;
    let v2 = server::<Bolt>("v2", DELAY, bolt_answer).await;
    let (drain, go, mut moved) = TestDrain::new();
    let next_gen = TestDrain::new().0;
    let m = mesh_with::<Bolt, _>(policy("bolt", v1.addr, v2.addr, 5_000, 1), move || drain.clone()).await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    // Three requests, a heartbeat and a one-way request, then the first 10 bytes of the next
    // request: the proxy has read everything when the drain starts.
    let mut oneway = bolt_request(&t, 4, &[]);
    oneway.cmd_type = bolt::TYPE_REQUEST_ONEWAY;
    let whole = encoded::<Bolt>([
        bolt_request(&t, 1, &[]),
        bolt_request(&t, 2, &[]),
        bolt_request(&t, 3, &[]),
        Bolt::heartbeat(5),
        oneway,
    ]);
    let next = encoded::<Bolt>([bolt_request(&t, 6, &[])]);
    let sent = Instant::now();
    app.wr.write_all(&whole).await.unwrap();
    app.wr.write_all(&next[..10]).await.unwrap();
    read_by_proxy(&m, (whole.len() + 10) as u64).await;
    go.send_replace(Some(Instant::now() + WAIT));
    let (s, read, offset) = tokio::time::timeout(WAIT, moved.recv())
        .await
        .expect("moved in time")
        .expect("moved");
    // Not before the requests in flight were answered (the servers take DELAY)...
    assert!(sent.elapsed() >= DELAY, "moved after {:?}", sent.elapsed());
    // ... and written back: the answers are at the app already, the heartbeat's among them;
    // nothing for the one-way request.
    let mut ids: Vec<u32> = Vec::new();
    for _ in 0..4 {
        let r = app.recv().await;
        assert!(r.cmd_type == bolt::TYPE_RESPONSE, "{r:?}");
        ids.push(r.request_id);
    }
    ids.sort();
    assert_eq!(ids, [1, 2, 3, 5]);
    // The bytes of the next frame moved with the socket, at their stream offset.
    assert_eq!(read, &next[..10]);
    assert_eq!(offset, whole.len() as u64);
    // The next generation serves the same socket from there.
    let ctx = test_ctx(&m.shared, &m.pod, app.wr.local_addr().unwrap());
    tokio::spawn(serve_with::<Bolt, _>(
        s,
        BytesMut::from(&read[..]),
        offset,
        ctx,
        next_gen,
    ));
    app.wr.write_all(&next[10..]).await.unwrap();
    let r = app.recv().await;
    assert_eq!((r.request_id, r.status), (6, bolt::status::SUCCESS));
    let r = app.call(bolt_request(&t, 7, &[])).await;
    assert_eq!((r.request_id, r.status), (7, bolt::status::SUCCESS));
    // Each request counted once: 1, 2, 3, the one-way 4, 6 and 7.
    let s = m.route_view("default", "v1");
    assert_eq!(s.requests + m.route_view("default", "v2").requests, 6);
    assert_eq!(m.errors("bolt", "upgrade_not_moved"), 0);
}

#[tokio::test]
async fn dubbo_moves_at_a_frame_boundary_too() {
    let v1 = server::<Dubbo>("v1", Duration::from_millis(100), dubbo_answer).await;
    let v2 = server::<Dubbo>("v2", Duration::from_millis(100), dubbo_answer).await;
    let (drain, go, mut moved) = TestDrain::new();
    let m = mesh_with::<Dubbo, _>(policy("dubbo", v1.addr, v2.addr, 5_000, 1), move || drain.clone()).await;
    let t = frames::<Dubbo>(DUBBO).remove(0);
    let mut app = App::<Dubbo>::connect(&m).await;
    let whole = encoded::<Dubbo>([dubbo_request(&t, 1, &[]), dubbo_request(&t, 2, &[])]);
    let next = encoded::<Dubbo>([dubbo_request(&t, 3, &[])]);
    app.wr.write_all(&whole).await.unwrap();
    app.wr.write_all(&next[..20]).await.unwrap();
    read_by_proxy(&m, (whole.len() + 20) as u64).await;
    go.send_replace(Some(Instant::now() + WAIT));
    let (s, read, offset) = tokio::time::timeout(WAIT, moved.recv()).await.unwrap().unwrap();
    let mut ids = vec![app.recv().await.request_id, app.recv().await.request_id];
    ids.sort();
    assert_eq!(ids, [1, 2]);
    assert_eq!((read.as_slice(), offset), (&next[..20], whole.len() as u64));
    let ctx = test_ctx(&m.shared, &m.pod, app.wr.local_addr().unwrap());
    tokio::spawn(serve_with::<Dubbo, _>(
        s,
        BytesMut::from(&read[..]),
        offset,
        ctx,
        TestDrain::new().0,
    ));
    app.wr.write_all(&next[20..]).await.unwrap();
    assert_eq!(app.recv().await.request_id, 3);
}

#[tokio::test]
async fn requests_unanswered_by_the_hand_over_deadline_keep_the_connection_until_answered() {
    let slow = server::<Bolt>("v1", Duration::from_millis(1500), bolt_answer).await;
    let slow2 = server::<Bolt>("v2", Duration::from_millis(1500), bolt_answer).await;
    let (drain, go, mut moved) = TestDrain::new();
    let m = mesh_with::<Bolt, _>(policy("bolt", slow.addr, slow2.addr, 5_000, 1), move || {
        drain.clone()
    })
    .await;
    let t = frames::<Bolt>(BOLT_V1).remove(0);
    let mut app = App::<Bolt>::connect(&m).await;
    let whole = encoded::<Bolt>([bolt_request(&t, 1, &[])]);
    app.wr.write_all(&whole).await.unwrap();
    read_by_proxy(&m, whole.len() as u64).await;
    go.send_replace(Some(Instant::now() + Duration::from_millis(100)));
    // The late answer still reaches the app, then the connection closes; nothing moved.
    let got = app.expect_closed().await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].request_id, got[0].status), (1, bolt::status::SUCCESS));
    assert!(moved.try_recv().is_err(), "moved with a request in flight");
    assert_eq!(m.errors("bolt", "upgrade_not_moved"), 1);
}
