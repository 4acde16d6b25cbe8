//! Privileged end-to-end tests of what a platform team checks when routing goes wrong: hostile
//! HTTP/1.1 input, dead and slow endpoints, requests no route matches, and the operator's view
//! (`sockmesh routes`, `routes apply` of a broken file). Same setup as `routing.rs`: a real
//! `sockmesh run` with a routing policy, an enrolled `client` pod dialling a service VIP that
//! nobody owns (`10.96.0.10`), endpoint pods `v1` and `v2` (not enrolled) running real servers,
//! and real clients: curl and wrk (HTTP/1.1), grpcio from the test venv (gRPC), the npm
//! sofa-rpc-node client (SOFA Bolt, Dubbo 2), a few lines of Python for raw bytes.
//!
//! A "dead" endpoint is a port in the `v2` pod where nothing listens (the connect is refused at
//! once); a "closing" one accepts, reads the request and closes without answering. Assertions are on what users see: status codes, gRPC codes, client-side errors and
//! their latency, and the daemon's Prometheus counters.
//!
//! ```sh
//! SOCKMESH_REQUIRE_PRIVILEGED=1 SOCKMESH_BIN=target/release/sockmesh \
//!   cargo test -p sockmesh-tests --test routing_errors -- --test-threads=1 --nocapture
//! ```

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::Value;
use sockmesh_tests::daemon::{basic_config, prom_value};
use sockmesh_tests::process::{exec_in, status_text};
use sockmesh_tests::rpc::{node_server, rpc_load_command};
use sockmesh_tests::tools::{grpc_python, require, Tool};
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{
    eventually, last_json, peers_dir, pod_exec, python, Daemon, LineChild, Pod, Server, TempDir, VirtualNode,
};

/// The service address the client dials; no interface anywhere holds it.
const VIP: &str = "10.96.0.10";
/// A port in the `v2` pod where nothing listens: connects are refused.
const DEAD_PORT: u16 = 8089;
/// Bound for one client run (the process is killed after it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for waiting on counters to settle.
const SETTLE: Duration = Duration::from_secs(10);
/// A client that gets an error answer from the proxy gets it at once, not after its own timeout.
const PROMPT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// the node, the daemon, the servers

/// The virtual node: `client` (enrolled) and the endpoint pods `v1`, `v2`.
fn node() -> VirtualNode {
    VirtualNode::new(&["client", "v1", "v2"]).expect("virtual node")
}

/// Starts the daemon with `policy` and enrols the client pod.
fn daemon(node: &VirtualNode, policy: &str) -> Daemon {
    let d = Daemon::start(node, &basic_config(node, policy)).expect("daemon start");
    d.enroll(node.pod("client")).expect("enroll client");
    d
}

/// The refused address in the `v2` pod.
fn dead(node: &VirtualNode) -> String {
    node.pod("v2").addr(DEAD_PORT)
}

/// `name_server.js` (HTTP/1.1) in `pod`, named after it.
fn name_server(pod: &Pod, port: u16, stats_port: u16) -> Server {
    node_server(
        pod,
        "name_server.js",
        &[
            "--name",
            &pod.name,
            "--port",
            &port.to_string(),
            "--proto",
            "http1",
            "--stats-port",
            &stats_port.to_string(),
        ],
    )
}

/// `rpc_server.js` in `pod`, named after it.
fn rpc_server(pod: &Pod, protocol: &str, port: u16, stats_port: u16) -> Server {
    node_server(
        pod,
        "rpc_server.js",
        &[
            "--protocol",
            protocol,
            "--name",
            &pod.name,
            "--port",
            &port.to_string(),
            "--stats-port",
            &stats_port.to_string(),
        ],
    )
}

/// Requests a server counted (its stats listener on 127.0.0.1 inside its own pod).
fn served(pod: &Pod, stats_port: u16) -> u64 {
    let url = format!("http://127.0.0.1:{stats_port}/");
    let out = pod_exec(pod, "curl", &["-sS", "--max-time", "5", &url]).expect("curl stats");
    assert!(
        out.status.success(),
        "stats of {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    v["requests"].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// clients and counters

fn run_in(pod: &Pod, mut cmd: Command) -> Output {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(peers_dir());
    }
    exec_in(&pod.cgroup, Some(&pod.netns), cmd, CLIENT_TIMEOUT).expect("client run")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// curl from the client pod; its output (whatever the exit status).
fn curl(node: &VirtualNode, args: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    run_in(node.pod("client"), cmd)
}

/// The value of `name{labels}` (0 when absent).
fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> u64 {
    prom_value(&d.metrics().expect("metrics"), name, labels).unwrap_or(0.0) as u64
}

fn protocol_errors(d: &Daemon, protocol: &str, reason: &str) -> u64 {
    metric(
        d,
        "sockmesh_protocol_errors_total",
        &[("protocol", protocol), ("reason", reason)],
    )
}

fn failures(d: &Daemon, service: &str, reason: &str) -> u64 {
    metric(
        d,
        "sockmesh_request_failures_total",
        &[("service", service), ("reason", reason)],
    )
}

fn retries(d: &Daemon, service: &str) -> u64 {
    metric(d, "sockmesh_request_retries_total", &[("service", service)])
}

/// Waits until `read()` equals `want`; panics with the daemon's metrics otherwise.
fn settle(d: &Daemon, what: &str, want: u64, read: impl Fn() -> u64) {
    eventually(SETTLE, || ensure_eq(what, read(), want))
        .unwrap_or_else(|e| panic!("{e:#}\n--- metrics ---\n{}", d.metrics().unwrap_or_default()));
}

// ---------------------------------------------------------------------------------------------
// 1. HTTP/1.1 hostile input

const HTTP_VIP_PORT: u16 = 80;
const HTTP_PORT: u16 = 8080;
const HTTP_STATS: u16 = 9911;

/// Python run in the client pod: connects to `argv[1]`, sends the hex bytes `argv[2]`, reads
/// until EOF (or 5 s of silence) and prints `{"status_line", "received", "closed"}`.
const RAW_CLIENT: &str = r#"
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(bytes.fromhex(sys.argv[2]))
data, closed = b"", False
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            closed = True
            break
        data += chunk
except socket.timeout:
    pass
except ConnectionResetError:
    closed = True
line = data.split(b"\r\n", 1)[0].decode("latin-1")
print(json.dumps({"status_line": line, "received": len(data), "closed": closed}))
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn http1_oversized_head_gets_431_and_garbage_gets_400_while_another_connection_gets_only_200s() {
    if !require(&[Tool::Node, Tool::Wrk, Tool::Curl]) {
        return;
    }
    let node = node();
    let (v1, v2) = (node.pod("v1"), node.pod("v2"));
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "web"
addresses = ["{VIP}:{HTTP_VIP_PORT}"]
protocol = "http1"
endpoints = [
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
]
"#,
            v1.addr(HTTP_PORT),
            v2.addr(HTTP_PORT)
        ),
    );
    let _servers = [
        name_server(v1, HTTP_PORT, HTTP_STATS),
        name_server(v2, HTTP_PORT, HTTP_STATS),
    ];
    let too_large_before = protocol_errors(&d, "http1", "header_too_large");
    let malformed_before = protocol_errors(&d, "http1", "malformed");

    // The well-behaved client: wrk keep-alive connections throughout.
    let client = node.pod("client");
    let mut cmd = Command::new("wrk");
    cmd.current_dir(peers_dir())
        .args(["-t1", "-c4", "-d5s", "--timeout", "5s", "-s"])
        .arg(peers_dir().join("wrk_count.lua"))
        .arg(format!("http://{VIP}:{HTTP_VIP_PORT}/"));
    let mut wrk = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("wrk");
    eventually(Duration::from_secs(10), || {
        let n = served(v1, HTTP_STATS) + served(v2, HTTP_STATS);
        if n >= 200 {
            Ok(())
        } else {
            bail!("{n} requests served so far")
        }
    })
    .expect("wrk under way");

    const ROUNDS: u64 = 3;
    let url = format!("http://{VIP}:{HTTP_VIP_PORT}/");
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let target = format!("{VIP}:{HTTP_VIP_PORT}");
    for round in 0..ROUNDS {
        // A 70 KiB request head: 431 from the proxy.
        let out = curl(
            &node,
            &["-o", "/dev/null", "-w", "%{http_code}", "-H", &big, &url],
        );
        eprintln!(
            "round {round}: 70 KiB head -> {} (curl {}: {})",
            stdout(&out),
            status_text(out.status),
            stderr(&out).trim()
        );
        assert_eq!(stdout(&out), "431", "a 70 KiB request head: {}", stderr(&out));

        // Garbage: 400 and the connection is closed.
        let mut cmd = Command::new(python());
        cmd.args(["-c", RAW_CLIENT, &target, &hex(b"GARBAGE\r\n\r\n")]);
        let raw = last_json("raw client", &run_in(client, cmd));
        eprintln!("round {round}: GARBAGE -> {raw}");
        let line = raw["status_line"].as_str().unwrap_or_default();
        assert!(line.starts_with("HTTP/1.1 400"), "garbage must get a 400: {raw}");
        assert_eq!(
            raw["closed"],
            Value::Bool(true),
            "and the connection closed: {raw}"
        );
    }

    let summary = loop {
        let line = wrk.recv_line(Duration::from_secs(15)).expect("wrk summary");
        if line.starts_with('{') {
            break serde_json::from_str::<Value>(&line).expect("wrk JSON");
        }
    };
    eprintln!("wrk alongside the hostile input: {summary}");
    for k in ["non_2xx", "connect", "read", "write", "timeout"] {
        assert_eq!(
            summary[k].as_u64(),
            Some(0),
            "the well-behaved client saw {k} errors: {summary}"
        );
    }
    assert!(summary["requests"].as_u64() > Some(200), "{summary}");

    settle(
        &d,
        "protocol_errors{http1,header_too_large}",
        too_large_before + ROUNDS,
        || protocol_errors(&d, "http1", "header_too_large"),
    );
    settle(
        &d,
        "protocol_errors{http1,malformed}",
        malformed_before + ROUNDS,
        || protocol_errors(&d, "http1", "malformed"),
    );
}

/// Python slowloris: connects to `argv[1]`, sends a request head one byte every 250 ms (never
/// finishing it) for at most 20 s and prints `{"closed", "after_ms", "received"}`: whether and
/// when the server closed the connection.
const SLOW_HEAD_CLIENT: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
head = b"GET / HTTP/1.1\r\nHost: slow\r\nx-slow: " + b"a" * 1000
start, i, received, closed = time.monotonic(), 0, 0, False
s.settimeout(0.25)
while time.monotonic() - start < 20 and not closed:
    try:
        s.send(head[i:i + 1])
        i += 1
    except OSError:
        closed = True
        break
    try:
        chunk = s.recv(65536)
        if not chunk:
            closed = True
        received += len(chunk)
    except socket.timeout:
        pass
    except OSError:
        closed = True
print(json.dumps({"closed": closed, "after_ms": int((time.monotonic() - start) * 1000), "received": received, "sent": i}))
"#;

#[test]
fn http1_slow_request_head_is_cut_at_10_s_and_counted_while_others_are_served() {
    if !require(&[Tool::Node, Tool::Curl]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "web"
addresses = ["{VIP}:{HTTP_VIP_PORT}"]
protocol = "http1"
endpoints = [{{ address = "{}" }}]
"#,
            v1.addr(HTTP_PORT)
        ),
    );
    let _server = name_server(v1, HTTP_PORT, HTTP_STATS);
    let before = protocol_errors(&d, "http1", "header_timeout");
    let client = node.pod("client");
    let mut cmd = Command::new(python());
    cmd.args(["-c", SLOW_HEAD_CLIENT, &format!("{VIP}:{HTTP_VIP_PORT}")]);
    let mut slow = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("slow client");

    // Meanwhile other requests are served at once.
    let out = curl(
        &node,
        &[
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &format!("http://{VIP}:{HTTP_VIP_PORT}/[1-50]"),
        ],
    );
    assert!(out.status.success(), "curl: {}", stderr(&out));
    assert_eq!(stdout(&out).lines().filter(|l| *l == "200").count(), 50);

    let line = slow
        .recv_line(Duration::from_secs(25))
        .expect("slow client result");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    eprintln!("a request head trickling in: {v}");
    assert_eq!(
        v["closed"],
        Value::Bool(true),
        "the daemon must cut a slow head: {v}"
    );
    let after = v["after_ms"].as_u64().unwrap_or(0);
    assert!(
        (9_500..15_000).contains(&after),
        "cut after {after} ms, expected about 10 s: {v}"
    );
    settle(&d, "protocol_errors{http1,header_timeout}", before + 1, || {
        protocol_errors(&d, "http1", "header_timeout")
    });
    assert_eq!(
        served(v1, HTTP_STATS),
        50,
        "the slow head never reached the endpoint"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. upstream failures

#[test]
fn http1_dead_endpoint_is_retried_on_the_live_one_and_alone_gives_502_from_sockmesh() {
    if !require(&[Tool::Node, Tool::Curl]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    let dead = dead(&node);
    // `mixed`: the dead endpoint and a live one in one subset, one retry. `dead`: only the dead
    // endpoint (a retry goes to it again). Both use the default subset `all` and route `default`.
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "mixed"
addresses = ["{VIP}:80"]
protocol = "http1"
timeout_ms = 5000
retries = 1
endpoints = [
  {{ address = "{dead}" }},
  {{ address = "{}" }},
]

[[services]]
name = "dead"
addresses = ["{VIP}:81"]
protocol = "http1"
timeout_ms = 5000
retries = 1
endpoints = [{{ address = "{dead}" }}]
"#,
            v1.addr(HTTP_PORT)
        ),
    );
    let _live = name_server(v1, HTTP_PORT, HTTP_STATS);

    // 40 GETs over one connection: endpoints take turns, so 20 start on the dead one and are
    // retried on the live one. Every one is answered by v1.
    const N: u64 = 40;
    let out = curl(
        &node,
        &["-w", " %{http_code}\n", &format!("http://{VIP}:80/[1-{N}]")],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "curl: {}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, N, "{text}");
    assert!(
        lines.iter().all(|l| *l == "v1 200"),
        "every GET must be answered by the live endpoint: {text}"
    );
    assert_eq!(served(v1, HTTP_STATS), N);
    settle(&d, "sockmesh_request_retries_total{service=mixed}", N / 2, || {
        retries(&d, "mixed")
    });
    assert_eq!(metric(&d, "sockmesh_requests_total", &[("service", "mixed")]), N);
    assert_eq!(failures(&d, "mixed", "upstream_connect"), 0);

    // Only the dead endpoint: 502 made by sockmesh, counted as upstream_connect.
    const M: u64 = 5;
    let connect_errors_before = protocol_errors(&d, "http1", "upstream_connect");
    let started = Instant::now();
    let out = curl(
        &node,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %header{server}\n",
            &format!("http://{VIP}:81/[1-{M}]"),
        ],
    );
    let elapsed = started.elapsed();
    let text = stdout(&out);
    eprintln!("dead endpoint: {text:?} in {elapsed:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, M, "{text} {}", stderr(&out));
    assert!(
        lines.iter().all(|l| *l == "502 sockmesh"),
        "a dead endpoint must give 502 with `server: sockmesh`: {text}"
    );
    assert!(elapsed < PROMPT, "{M} refused requests took {elapsed:?}");
    settle(&d, "request_failures{dead,upstream_connect}", M, || {
        failures(&d, "dead", "upstream_connect")
    });
    settle(
        &d,
        "protocol_errors{http1,upstream_connect}",
        connect_errors_before + M,
        || protocol_errors(&d, "http1", "upstream_connect"),
    );
    // The one retry each was made (to the same, only, endpoint).
    assert_eq!(retries(&d, "dead"), M);
    assert_eq!(metric(&d, "sockmesh_requests_total", &[("service", "dead")]), M);
}

#[test]
fn http1_slow_endpoint_gives_504_at_the_route_timeout_and_the_connection_keeps_working() {
    if !require(&[Tool::Curl]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    const TIMEOUT_MS: u64 = 300;
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "slow"
addresses = ["{VIP}:80"]
protocol = "http1"
retries = 0
endpoints = [{{ address = "{}" }}]

[[services.routes]]
name = "default"
split = [{{ subset = "all", weight = 1 }}]
timeout_ms = {TIMEOUT_MS}
"#,
            v1.addr(HTTP_PORT)
        ),
    );
    // http_server.py delays its answer by `?ms=N`.
    let server = Server::http(v1, HTTP_PORT).expect("http_server.py");

    // Two requests on one connection: the first waits 2 s upstream, the second none.
    let out = curl(
        &node,
        &[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}|%header{server}|%{num_connects}|%{time_total}\n",
            &format!("http://{VIP}:80/slow?ms=2000"),
            &format!("http://{VIP}:80/fast"),
        ],
    );
    let text = stdout(&out);
    eprintln!("slow endpoint: {text:?}");
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 2, "{text} {}", stderr(&out));
    assert_eq!(
        (lines[0][0], lines[0][1]),
        ("504", "sockmesh"),
        "a slow endpoint must give 504 from sockmesh: {text}"
    );
    let took: f64 = lines[0][3].parse().expect("time_total");
    assert!(
        took >= TIMEOUT_MS as f64 / 1000.0 - 0.01 && took < 1.5,
        "the 504 must come at the route's {TIMEOUT_MS} ms timeout, not after {took} s"
    );
    assert_eq!(lines[1][0], "200", "the next request must work: {text}");
    assert_eq!(
        (lines[0][2], lines[1][2]),
        ("1", "0"),
        "the second request must reuse the first one's connection: {text}"
    );
    eventually(SETTLE, || {
        let a = server.accepted();
        if a.iter().any(|l| l.contains("path=/fast")) {
            Ok(())
        } else {
            bail!("the endpoint did not see /fast: {a:?}")
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    settle(&d, "request_failures{slow,timeout}", 1, || {
        failures(&d, "slow", "timeout")
    });
    assert_eq!(metric(&d, "sockmesh_requests_total", &[("service", "slow")]), 2);
}

/// A port in the `v2` pod where [`BROKEN_SERVER`] `close` listens.
const CLOSING_PORT: u16 = 8088;
/// A port in the `v2` pod where [`BROKEN_SERVER`] `hold` listens.
const SILENT_PORT: u16 = 8087;

/// A server that never answers: it accepts, reads what arrives first (the request) and prints
/// `accepted peer=... bytes=N`; then `close` (argv[2]) closes the connection (an upstream that
/// fails after the request was sent) and `hold` keeps reading until the peer closes (an
/// upstream that hangs).
const BROKEN_SERVER: &str = r#"
import socket, sys, threading
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(128)
print(f"listening 0.0.0.0:{port}", flush=True)
def handle(c, a):
    c.settimeout(5 if mode == "close" else 120)
    n = 0
    try:
        n = len(c.recv(65536))
    except OSError:
        pass
    print(f"accepted peer={a[0]}:{a[1]} bytes={n}", flush=True)
    try:
        while mode == "hold" and c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=handle, args=(c, a), daemon=True).start()
"#;

fn broken_server(pod: &Pod, port: u16, mode: &str) -> Server {
    let mut cmd = Command::new(python());
    cmd.args(["-u", "-c", BROKEN_SERVER, &port.to_string(), mode]);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd).expect("broken server")
}

fn closing_server(pod: &Pod) -> Server {
    broken_server(pod, CLOSING_PORT, "close")
}

#[test]
fn http1_upstream_closing_after_the_request_gives_502_and_only_idempotent_requests_are_replayed() {
    if !require(&[Tool::Curl]) {
        return;
    }
    let node = node();
    let v2 = node.pod("v2");
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "closing"
addresses = ["{VIP}:80"]
protocol = "http1"
timeout_ms = 5000
retries = 1
endpoints = [{{ address = "{}" }}]
"#,
            v2.addr(CLOSING_PORT)
        ),
    );
    let server = closing_server(v2);
    let url = format!("http://{VIP}:80/");
    let w = ["-o", "/dev/null", "-w", "%{http_code} %header{server}"];

    // A POST with a body went out and cannot be replayed: one attempt, 502.
    let mut args = vec!["-X", "POST", "-d", "payload"];
    args.extend(w);
    args.push(&url);
    let out = curl(&node, &args);
    assert_eq!(stdout(&out), "502 sockmesh", "POST: {}", stderr(&out));
    eventually(SETTLE, || {
        ensure_eq("connections the endpoint saw", server.accepted().len(), 1)
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        retries(&d, "closing"),
        0,
        "a POST with a body must not be replayed"
    );

    // A GET is idempotent and has no body: replayed once (the one endpoint again), then 502.
    let mut args = w.to_vec();
    args.push(&url);
    let out = curl(&node, &args);
    assert_eq!(stdout(&out), "502 sockmesh", "GET: {}", stderr(&out));
    eventually(SETTLE, || {
        ensure_eq("connections the endpoint saw", server.accepted().len(), 3)
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(retries(&d, "closing"), 1, "the GET is replayed once");
    eprintln!("closing endpoint saw: {:?}", server.accepted());
    assert!(
        server.accepted().iter().all(|l| !l.ends_with("bytes=0")),
        "every connection carried a request: {:?}",
        server.accepted()
    );
    settle(&d, "request_failures{closing,upstream_reset}", 2, || {
        failures(&d, "closing", "upstream_reset")
    });
}

const H2_PORT: u16 = 8081;
const H2_STATS: u16 = 9914;

/// `h2load` (h2c prior knowledge) from the client pod; its stdout.
fn h2load(node: &VirtualNode, vip_port: u16, requests: u64) -> String {
    let mut cmd = Command::new("h2load");
    cmd.args(["-n", &requests.to_string(), "-c", "1", "-m", "8"])
        .arg(format!("http://{VIP}:{vip_port}/"));
    let out = run_in(node.pod("client"), cmd);
    let text = stdout(&out);
    assert!(out.status.success(), "h2load:\n{text}\n{}", stderr(&out));
    text
}

fn h2load_codes(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("no status codes line in\n{text}"))
        .to_owned()
}

#[test]
fn http2_dead_endpoint_is_retried_on_the_live_one_and_alone_gives_502s_to_h2load() {
    if !require(&[Tool::Node, Tool::H2load, Tool::Curl]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    let dead = dead(&node);
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "mixed2"
addresses = ["{VIP}:81"]
protocol = "http2"
timeout_ms = 5000
retries = 1
endpoints = [
  {{ address = "{dead}" }},
  {{ address = "{}" }},
]

[[services]]
name = "dead2"
addresses = ["{VIP}:82"]
protocol = "http2"
timeout_ms = 5000
retries = 0
endpoints = [{{ address = "{dead}" }}]
"#,
            v1.addr(H2_PORT)
        ),
    );
    let _live = node_server(
        v1,
        "name_server.js",
        &[
            "--name",
            "v1",
            "--port",
            &H2_PORT.to_string(),
            "--proto",
            "h2c",
            "--stats-port",
            &H2_STATS.to_string(),
        ],
    );
    const N: u64 = 200;
    let text = h2load(&node, 81, N);
    let codes = h2load_codes(&text);
    eprintln!("h2load, dead + live: {codes}");
    assert!(
        codes.contains(&format!("{N} 2xx, 0 3xx, 0 4xx, 0 5xx")),
        "every request answered 2xx:\n{text}"
    );
    assert_eq!(served(v1, H2_STATS), N);
    settle(
        &d,
        "sockmesh_request_retries_total{service=mixed2}",
        N / 2,
        || retries(&d, "mixed2"),
    );

    const M: u64 = 20;
    let text = h2load(&node, 82, M);
    let codes = h2load_codes(&text);
    eprintln!("h2load, dead only: {codes}");
    assert!(
        codes.contains(&format!("0 2xx, 0 3xx, 0 4xx, {M} 5xx")),
        "every request to the dead endpoint is a 5xx:\n{text}"
    );
    settle(&d, "request_failures{dead2,upstream_connect}", M, || {
        failures(&d, "dead2", "upstream_connect")
    });
    // The 502 itself, from sockmesh, with curl's prior-knowledge HTTP/2.
    let out = curl(
        &node,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %header{server}",
            &format!("http://{VIP}:82/"),
        ],
    );
    assert_eq!(stdout(&out), "2 502 sockmesh", "{}", stderr(&out));
}

/// Python: a raw HTTP/2 (h2c prior knowledge) client to `argv[1]` that ignores the server's
/// header list limit. Stream 1: GET / with 25 copies of a 2,900-byte header (one literal, then
/// one-byte HPACK indexes: a 3 KB frame, a ~72 KiB decoded list); stream 3: a plain GET /.
/// Prints `{"status": {"1": ..., "3": ...}, "rst": {...}, "goaway": code|null}` once both
/// streams ended, the connection closed, or 5 s passed.
const RAW_H2_CLIENT: &str = r#"
import json, socket, struct, sys
target = sys.argv[1]
host, port = target.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
def frame(t, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload
def hint(n, bits, first):
    top = (1 << bits) - 1
    if n < top:
        return bytes([first | n])
    out, n = [first | top], n - top
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + [n])
def lit(b):
    return hint(len(b), 7, 0) + b
# :method GET, :scheme http, :path /, :authority (literal, not indexed)
base = b"\x82\x86\x84" + b"\x01" + lit(target.encode())
# x-a: a*2900 added to the dynamic table (index 62), then referenced 24 more times
big = base + b"\x40" + lit(b"x-a") + lit(b"a" * 2900) + b"\xbe" * 24
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 5, 1, big) + frame(1, 5, 3, base))
# HPACK Huffman codes of the digits (a status is three of them), RFC 7541 appendix B
DIGITS = {"00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
          "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9"}
def huffman_digits(data):
    bits, out, code = "".join(f"{b:08b}" for b in data), "", ""
    for bit in bits:
        code += bit
        if code in DIGITS:
            out, code = out + DIGITS[code], ""
    return out if set(code) <= {"1"} else "huffman:" + data.hex()
STATIC = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}
def status_of(block):
    b0 = block[0]
    if b0 & 0x80:
        return STATIC.get(b0 & 0x7F, "index%d" % (b0 & 0x7F))
    if b0 & 0x0F == 8 or b0 & 0x3F == 8:
        n = block[1]
        if n & 0x80:
            return huffman_digits(block[2:2 + (n & 0x7F)])
        return block[2:2 + n].decode()
    return "?" + block[:4].hex()
buf, status, rst, goaway, ended = b"", {}, {}, None, set()
try:
    while not ({1, 3} <= ended) and goaway is None:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            t, fl, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9:9 + n], buf[9 + n:]
            if t == 4 and not fl & 1:
                s.sendall(frame(4, 1, 0, b""))
            elif t == 1:
                status.setdefault(str(sid), status_of(payload))
            elif t == 3:
                rst[str(sid)] = int.from_bytes(payload[:4], "big")
                ended.add(sid)
            elif t == 7:
                goaway = int.from_bytes(payload[4:8], "big")
            if t in (0, 1) and fl & 1:
                ended.add(sid)
except socket.timeout:
    pass
print(json.dumps({"status": status, "rst": rst, "goaway": goaway}))
"#;

#[test]
fn http2_oversized_header_list_gets_431_on_that_stream_and_the_connection_keeps_working() {
    if !require(&[Tool::Node, Tool::H2load, Tool::Curl]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    let _d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "web2"
addresses = ["{VIP}:81"]
protocol = "http2"
endpoints = [{{ address = "{}" }}]
"#,
            v1.addr(H2_PORT)
        ),
    );
    let _live = node_server(
        v1,
        "name_server.js",
        &[
            "--name",
            "v1",
            "--port",
            &H2_PORT.to_string(),
            "--proto",
            "h2c",
            "--stats-port",
            &H2_STATS.to_string(),
        ],
    );
    // A well-behaved client (nghttp2: curl, h2load) will not send a header list over the
    // server's advertised SETTINGS_MAX_HEADER_LIST_SIZE, so a raw client does: stream 1 with
    // ~72 KiB of headers, then stream 3, a plain GET, on the same connection.
    let mut cmd = Command::new(python());
    cmd.args(["-c", RAW_H2_CLIENT, &format!("{VIP}:81")]);
    let v = last_json("raw h2 client", &run_in(node.pod("client"), cmd));
    eprintln!("HTTP/2 ~72 KiB header list, then a plain GET: {v}");
    assert_eq!(v["status"]["1"], "431", "the oversized stream gets 431: {v}");
    assert_eq!(
        v["status"]["3"], "200",
        "the next stream on the same connection works: {v}"
    );
    assert_eq!(v["goaway"], Value::Null, "the connection is not torn down: {v}");
    assert_eq!(
        served(v1, H2_STATS),
        1,
        "the oversized request never reached the endpoint"
    );
    let codes = h2load_codes(&h2load(&node, 81, 1000));
    assert!(codes.contains("1000 2xx, 0 3xx, 0 4xx, 0 5xx"), "{codes}");
}

const GRPC_PORT: u16 = 50051;

/// grpcio, one channel to `argv[1]`: `argv[3]` unary calls of method `argv[2]`, each with a
/// 5 s deadline; prints `{"codes": {"<numeric status>": n}, "details", "max_ms"}`.
const GRPC_CLIENT: &str = r#"
import json, sys, time
import grpc
target, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
codes, details, max_ms = {}, None, 0
with grpc.insecure_channel(target) as ch:
    call = ch.unary_unary(path)
    for _ in range(n):
        t = time.monotonic()
        try:
            call(b"who", timeout=5)
            code = 0
        except grpc.RpcError as e:
            code = e.code().value[0]
            details = details or e.details()
        max_ms = max(max_ms, int((time.monotonic() - t) * 1000))
        codes[str(code)] = codes.get(str(code), 0) + 1
print(json.dumps({"codes": codes, "details": details, "max_ms": max_ms}))
"#;

fn grpc_calls(node: &VirtualNode, vip_port: u16, path: &str, n: u64) -> Value {
    let mut cmd = Command::new(grpc_python());
    cmd.args([
        "-c",
        GRPC_CLIENT,
        &format!("{VIP}:{vip_port}"),
        path,
        &n.to_string(),
    ]);
    let v = last_json("grpc client", &run_in(node.pod("client"), cmd));
    eprintln!("grpc {VIP}:{vip_port}{path}: {v}");
    v
}

#[test]
fn grpc_no_route_is_unimplemented_a_dead_endpoint_unavailable_and_a_silent_one_deadline_exceeded() {
    if !require(&[Tool::GrpcPython]) {
        return;
    }
    let node = node();
    let v1 = node.pod("v1");
    let dead = dead(&node);
    let live = v1.addr(GRPC_PORT);
    let silent = node.pod("v2").addr(SILENT_PORT);
    // `greeter` on :50051 routes only `sockmesh.test.Other` (the live server answers
    // `sockmesh.test.Who/Name`, so an UNIMPLEMENTED can only be the proxy's); `greeter-dead`
    // on :50052 has the dead endpoint; `greeter-ok` on :50053 shows the server is there;
    // `greeter-silent` on :50054 has an endpoint that never answers.
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "greeter"
addresses = ["{VIP}:50051"]
protocol = "grpc"
endpoints = [{{ address = "{live}" }}]

[[services.routes]]
name = "other-only"
match = {{ service = "sockmesh.test.Other" }}
split = [{{ subset = "all", weight = 1 }}]

[[services]]
name = "greeter-dead"
addresses = ["{VIP}:50052"]
protocol = "grpc"
retries = 1
endpoints = [{{ address = "{dead}" }}]

[[services]]
name = "greeter-ok"
addresses = ["{VIP}:50053"]
protocol = "grpc"
endpoints = [{{ address = "{live}" }}]

[[services]]
name = "greeter-silent"
addresses = ["{VIP}:50054"]
protocol = "grpc"
timeout_ms = 500
endpoints = [{{ address = "{silent}" }}]
"#
        ),
    );
    let mut cmd = Command::new(grpc_python());
    cmd.arg("-u").arg(peers_dir().join("grpc_peer.py")).args([
        "serve",
        "--name",
        "v1",
        "--port",
        &GRPC_PORT.to_string(),
    ]);
    let _server = Server::start(&v1.cgroup, Some(&v1.netns), cmd).expect("grpc server");
    let _silent = broken_server(node.pod("v2"), SILENT_PORT, "hold");
    const N: u64 = 20;
    const PATH: &str = "/sockmesh.test.Who/Name";

    let ok = grpc_calls(&node, 50053, PATH, N);
    assert_eq!(
        ok["codes"]["0"].as_u64(),
        Some(N),
        "the live service answers: {ok}"
    );

    let no_route_before = protocol_errors(&d, "grpc", "no_route");
    let v = grpc_calls(&node, 50051, PATH, N);
    assert_eq!(
        v["codes"],
        serde_json::json!({ "12": N }),
        "no matching route must be UNIMPLEMENTED (12): {v}"
    );
    assert!(
        v["details"].as_str().unwrap_or_default().contains("no route"),
        "the message says why: {v}"
    );
    assert!(v["max_ms"].as_u64() < Some(PROMPT.as_millis() as u64), "{v}");
    settle(&d, "protocol_errors{grpc,no_route}", no_route_before + N, || {
        protocol_errors(&d, "grpc", "no_route")
    });
    let m = d.metrics().unwrap();
    let lines: Vec<&str> = m.lines().filter(|l| l.contains("no_route")).collect();
    eprintln!("metrics naming no_route: {lines:?}");

    let v = grpc_calls(&node, 50052, PATH, N);
    assert_eq!(
        v["codes"],
        serde_json::json!({ "14": N }),
        "a dead endpoint must be UNAVAILABLE (14): {v}"
    );
    assert!(v["max_ms"].as_u64() < Some(PROMPT.as_millis() as u64), "{v}");
    settle(&d, "request_failures{greeter-dead,upstream_connect}", N, || {
        failures(&d, "greeter-dead", "upstream_connect")
    });
    assert_eq!(retries(&d, "greeter-dead"), N);

    // An endpoint that never answers: DEADLINE_EXCEEDED (4) at the route's 500 ms, before the
    // client's own 5 s deadline.
    const S: u64 = 3;
    let v = grpc_calls(&node, 50054, PATH, S);
    assert_eq!(
        v["codes"],
        serde_json::json!({ "4": S }),
        "a silent endpoint must be DEADLINE_EXCEEDED (4): {v}"
    );
    assert!(
        (400..2000).contains(&v["max_ms"].as_u64().unwrap_or(0)),
        "cut at the route's 500 ms: {v}"
    );
    settle(&d, "request_failures{greeter-silent,timeout}", S, || {
        failures(&d, "greeter-silent", "timeout")
    });
}

// ---------------------------------------------------------------------------------------------
// 3. `sockmesh routes` and `routes apply` of broken files

fn web_policy(node: &VirtualNode, v2_subset_in_canary: &str) -> String {
    let (v1, v2) = (node.pod("v1"), node.pod("v2"));
    format!(
        r#"
[[services]]
name = "web"
addresses = ["{VIP}:{HTTP_VIP_PORT}"]
protocol = "http1"
timeout_ms = 10000
retries = 1
endpoints = [
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
]
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]

[[services.routes]]
name = "canary"
match = {{ headers = {{ x-canary = "true" }} }}
split = [{{ subset = "{v2_subset_in_canary}", weight = 100 }}]
timeout_ms = 2000
retries = 0

[[services.routes]]
name = "default"
split = [{{ subset = "v1", weight = 90 }}, {{ subset = "v2", weight = 10 }}]
"#,
        v1.addr(HTTP_PORT),
        v2.addr(HTTP_PORT)
    )
}

/// `sockmesh routes --json`.
fn routes_json(d: &Daemon) -> Value {
    let out = d.cli(&["routes", "--json"]).expect("routes --json");
    serde_json::from_slice(&out.stdout).expect("routes JSON")
}

/// (route, subset) -> (weight, requests) from the `-> subset weight W requests R ...` lines of
/// `sockmesh routes`, under the `route NAME ...` line they follow.
fn text_splits(text: &str) -> Vec<(String, String, u64, u64)> {
    let mut route = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["route", name, ..] => route = name.to_string(),
            ["->", subset, "weight", w, "requests", r, ..] => out.push((
                route.clone(),
                subset.to_string(),
                w.parse().unwrap_or(u64::MAX),
                r.parse().unwrap_or(u64::MAX),
            )),
            _ => {}
        }
    }
    out
}

#[test]
fn routes_shows_what_was_served_and_apply_refuses_broken_files_with_64() {
    if !require(&[Tool::Node, Tool::Curl]) {
        return;
    }
    let node = node();
    let (v1, v2) = (node.pod("v1"), node.pod("v2"));
    let d = daemon(&node, &web_policy(&node, "v2"));
    let _servers = [
        name_server(v1, HTTP_PORT, HTTP_STATS),
        name_server(v2, HTTP_PORT, HTTP_STATS),
    ];

    // 300 requests on the default route, 30 with the canary header.
    const DEFAULT: u64 = 300;
    const CANARY: u64 = 30;
    for (n, header) in [(DEFAULT, None), (CANARY, Some("x-canary: true"))] {
        let url = format!("http://{VIP}:{HTTP_VIP_PORT}/[1-{n}]");
        let mut args = vec!["--fail", "-o", "/dev/null", "-w", "%{http_code}\n"];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let out = curl(&node, &args);
        assert!(out.status.success(), "curl: {}", stderr(&out));
        assert_eq!(stdout(&out).lines().filter(|l| *l == "200").count() as u64, n);
    }
    let (s1, s2) = (served(v1, HTTP_STATS), served(v2, HTTP_STATS));
    assert_eq!(s1 + s2, DEFAULT + CANARY);
    let want = [
        ("canary", "v2", 100, CANARY),
        ("default", "v1", 90, s1),
        ("default", "v2", 10, s2 - CANARY),
    ];
    eprintln!("served: v1 {s1}, v2 {s2}; want per (route, subset, weight, requests): {want:?}");

    // --json: service, subsets with endpoints, routes with split weights and per-subset counts.
    let j = eventually(SETTLE, || {
        let j = routes_json(&d);
        let svc = j["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "web"))
            .cloned()
            .ok_or_else(|| anyhow!("no service `web` in {j}"))?;
        let mut got = Vec::new();
        for r in svc["routes"].as_array().into_iter().flatten() {
            for p in r["split"].as_array().into_iter().flatten() {
                got.push((
                    r["name"].as_str().unwrap_or("?").to_owned(),
                    p["subset"].as_str().unwrap_or("?").to_owned(),
                    p["weight"].as_u64().unwrap_or(0),
                    p["stats"]["requests"].as_u64().unwrap_or(0),
                ));
            }
        }
        let want: Vec<_> = want
            .iter()
            .map(|(r, s, w, n)| (r.to_string(), s.to_string(), *w as u64, *n))
            .collect();
        ensure_eq("routes --json (route, subset, weight, requests)", &got, &want)?;
        Ok(j)
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let svc = &j["services"][0];
    assert_eq!(svc["protocol"], "http1", "{svc}");
    assert_eq!(
        svc["subsets"],
        serde_json::json!({ "v1": [v1.addr(HTTP_PORT)], "v2": [v2.addr(HTTP_PORT)] }),
        "{svc}"
    );
    let canary = &svc["routes"][0];
    assert_eq!(canary["match"]["headers"]["x-canary"], "true", "{canary}");
    assert_eq!(
        (canary["timeout_ms"].as_u64(), canary["retries"].as_u64()),
        (Some(2000), Some(0)),
        "{canary}"
    );
    assert_eq!(
        (
            svc["routes"][1]["timeout_ms"].as_u64(),
            svc["routes"][1]["retries"].as_u64()
        ),
        (Some(10000), Some(1)),
        "the default route inherits the service's timeout and retries: {svc}"
    );
    for r in svc["routes"].as_array().unwrap() {
        for p in r["split"].as_array().unwrap() {
            assert_eq!(p["stats"]["failures"], serde_json::json!({}), "{p}");
            assert_eq!(p["stats"]["retries"].as_u64(), Some(0), "{p}");
        }
    }
    assert_eq!(j["generation"].as_u64(), Some(0), "{j}");
    assert_eq!(
        j["policy"]["services"][0]["name"], "web",
        "the policy as written is included: {j}"
    );

    // Text: the service, its subsets with endpoints, the routes and the same counts.
    let text = stdout(&d.cli(&["routes"]).expect("routes"));
    eprintln!("sockmesh routes:\n{text}");
    assert!(text.contains("service web (http1)"), "{text}");
    for (name, pod) in [("v1", v1), ("v2", v2)] {
        let line = format!("subset {name}: {}", pod.addr(HTTP_PORT));
        assert!(text.contains(&line), "`{line}` missing:\n{text}");
    }
    assert!(
        text.contains("route canary match {\"headers\":{\"x-canary\":\"true\"}} timeout 2000 ms retries 0"),
        "{text}"
    );
    assert!(
        text.contains("route default match any timeout 10000 ms retries 1"),
        "{text}"
    );
    let got = text_splits(&text);
    let want_text: Vec<_> = want
        .iter()
        .map(|(r, s, w, n)| (r.to_string(), s.to_string(), *w as u64, *n))
        .collect();
    assert_eq!(got, want_text, "per-subset lines of `sockmesh routes`:\n{text}");

    // `routes apply` of broken files: 64, the problem named, nothing changed.
    let dir = TempDir::new("routes").expect("temp dir");
    let syntax = dir.join("syntax.toml");
    std::fs::write(
        &syntax,
        web_policy(&node, "v2").replacen("[[services]]", "[[services]", 1),
    )
    .unwrap();
    let unknown = dir.join("unknown-subset.toml");
    std::fs::write(&unknown, web_policy(&node, "v3")).unwrap();
    for (file, names) in [
        (&syntax, &["invalid table header"][..]),
        (
            &unknown,
            &["services[0].routes[0].split[0].subset", "no subset `v3`"][..],
        ),
    ] {
        let out = d
            .cli_raw(&["routes", "apply", &file.to_string_lossy()])
            .expect("routes apply");
        let err = stderr(&out);
        eprintln!(
            "routes apply {}: {} {err:?}",
            file.display(),
            status_text(out.status)
        );
        assert_eq!(out.status.code(), Some(64), "{}: {err}", file.display());
        assert!(err.contains(&*file.to_string_lossy()), "the file is named: {err}");
        for n in names {
            assert!(err.contains(n), "`{n}` is named: {err}");
        }
        assert_eq!(
            metric(&d, "sockmesh_routing_policy_generation", &[]),
            0,
            "a refused policy must not change the generation"
        );
    }
    let after = routes_json(&d);
    assert_eq!(after["generation"].as_u64(), Some(0));
    assert_eq!(after["policy"], j["policy"], "the live policy is unchanged");
    // And still in force: a canary request goes to v2.
    let out = curl(
        &node,
        &[
            "--fail",
            "-H",
            "x-canary: true",
            &format!("http://{VIP}:{HTTP_VIP_PORT}/"),
        ],
    );
    assert_eq!(stdout(&out), "v2", "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// 4. SOFA Bolt and Dubbo 2 with the npm client

const RPC_STATS: u16 = 9913;

/// `rpc_load.js` from the client pod against `VIP:vip_port`; its output.
fn rpc_load(
    node: &VirtualNode,
    protocol: &str,
    vip_port: u16,
    requests: u64,
    concurrency: u32,
) -> (Output, Value) {
    let mut cmd = rpc_load_command(protocol, &format!("{VIP}:{vip_port}"));
    cmd.args([
        "--requests",
        &requests.to_string(),
        "--concurrency",
        &concurrency.to_string(),
        "--seconds-limit",
        "20",
    ]);
    let out = run_in(node.pod("client"), cmd);
    let v = last_json("rpc_load.js", &out);
    eprintln!("{protocol} {VIP}:{vip_port}: {v} ({})", status_text(out.status));
    (out, v)
}

/// What the npm client reports for an error answer. Dubbo error responses carry sockmesh's
/// message as the body and the client shows it; Bolt ones carry it only in the `sockmesh-error`
/// header with an empty content, which sofa-bolt-node turns into its generic "Server exception
/// ... check the server log" error. Neither may look like a client-side timeout.
fn client_error(protocol: &str, v: &Value, dubbo_says: &str) {
    let e = v["first_error"].as_str().unwrap_or_default();
    assert!(!e.is_empty(), "the client names an error: {v}");
    assert!(
        !e.to_ascii_lowercase().contains("timeout"),
        "an error answer, not a client-side timeout: {v}"
    );
    if protocol == "dubbo" {
        assert!(
            e.contains(dubbo_says),
            "the Dubbo client shows sockmesh's reason `{dubbo_says}`: {v}"
        );
    }
}

/// Five services on `port` .. `port+4`: `<p>-ok` (the live server in v1), `<p>-dead` (the dead
/// endpoint, one retry, 3 s timeout), `<p>-noroute` (only a route for another interface),
/// `<p>-closing` ([`BROKEN_SERVER`]: closes with the request in flight), `<p>-silent` (never
/// answers, 500 ms timeout). Checks the live one
/// answers, and that each failure gives every call an error quickly (not a client time-out),
/// counted by the daemon, with no retry of a request that was sent.
fn rpc_failures(protocol: &str, port: u16) {
    let node = node();
    let v1 = node.pod("v1");
    let dead = dead(&node);
    let live = v1.addr(port);
    let (ok_port, dead_port, noroute_port, closing_port, silent_port) =
        (port, port + 1, port + 2, port + 3, port + 4);
    let closing = node.pod("v2").addr(CLOSING_PORT);
    let silent = node.pod("v2").addr(SILENT_PORT);
    let d = daemon(
        &node,
        &format!(
            r#"
[[services]]
name = "{protocol}-ok"
addresses = ["{VIP}:{ok_port}"]
protocol = "{protocol}"
endpoints = [{{ address = "{live}" }}]

[[services]]
name = "{protocol}-dead"
addresses = ["{VIP}:{dead_port}"]
protocol = "{protocol}"
timeout_ms = 3000
retries = 1
endpoints = [{{ address = "{dead}" }}]

[[services]]
name = "{protocol}-noroute"
addresses = ["{VIP}:{noroute_port}"]
protocol = "{protocol}"
endpoints = [{{ address = "{live}" }}]

[[services.routes]]
name = "other"
match = {{ service = "com.sockmesh.test.OtherService" }}
split = [{{ subset = "all", weight = 1 }}]

[[services]]
name = "{protocol}-closing"
addresses = ["{VIP}:{closing_port}"]
protocol = "{protocol}"
timeout_ms = 3000
retries = 1
endpoints = [{{ address = "{closing}" }}]

[[services]]
name = "{protocol}-silent"
addresses = ["{VIP}:{silent_port}"]
protocol = "{protocol}"
timeout_ms = 500
retries = 1
endpoints = [{{ address = "{silent}" }}]
"#
        ),
    );
    let _server = rpc_server(v1, protocol, port, RPC_STATS);
    let closer = closing_server(node.pod("v2"));
    let _silent = broken_server(node.pod("v2"), SILENT_PORT, "hold");
    const N: u64 = 20;

    let (out, v) = rpc_load(&node, protocol, ok_port, N, 4);
    assert!(
        out.status.success() && v["answered"].as_u64() == Some(N),
        "the live service answers every call: {v} {}",
        stderr(&out)
    );
    let served_before = served(v1, RPC_STATS);

    // Dead endpoint: every call an error, promptly, none answered.
    let connect_before = protocol_errors(&d, protocol, "upstream_connect");
    let (out, v) = rpc_load(&node, protocol, dead_port, N, 4);
    assert!(!out.status.success(), "rpc_load must fail: {v}");
    assert_eq!(
        (v["answered"].as_u64(), v["errors"].as_u64()),
        (Some(0), Some(N)),
        "every call to a dead endpoint is an error: {v} {}",
        stderr(&out)
    );
    assert!(
        v["elapsed_ms"].as_u64() < Some(PROMPT.as_millis() as u64),
        "errors, not hangs: {v}"
    );
    client_error(protocol, &v, &format!("cannot connect to {dead}"));
    assert_eq!(
        v["connections"].as_u64(),
        Some(1),
        "the client kept its connection: {v}"
    );
    settle(
        &d,
        &format!("request_failures{{{protocol}-dead,upstream_connect}}"),
        N,
        || failures(&d, &format!("{protocol}-dead"), "upstream_connect"),
    );
    settle(
        &d,
        &format!("protocol_errors{{{protocol},upstream_connect}}"),
        connect_before + N,
        || protocol_errors(&d, protocol, "upstream_connect"),
    );
    assert_eq!(retries(&d, &format!("{protocol}-dead")), N);

    // No route for the interface: every call a clean error, promptly, nothing reaches a server.
    let no_route_before = protocol_errors(&d, protocol, "no_route");
    let (out, v) = rpc_load(&node, protocol, noroute_port, N, 4);
    assert!(!out.status.success(), "rpc_load must fail: {v}");
    assert_eq!(
        (v["answered"].as_u64(), v["errors"].as_u64()),
        (Some(0), Some(N)),
        "every call without a route is an error: {v} {}",
        stderr(&out)
    );
    assert!(
        v["elapsed_ms"].as_u64() < Some(PROMPT.as_millis() as u64),
        "errors, not hangs: {v}"
    );
    client_error(protocol, &v, "has no route");
    settle(
        &d,
        &format!("protocol_errors{{{protocol},no_route}}"),
        no_route_before + N,
        || protocol_errors(&d, protocol, "no_route"),
    );
    assert_eq!(served(v1, RPC_STATS), served_before, "no call reached the server");

    // An endpoint that closes with the request in flight: every call an error, promptly (one
    // call at a time, so no request finds its pooled connection already closed). The request
    // was sent, so it is not retried: one connection per call reaches the endpoint.
    let (out, v) = rpc_load(&node, protocol, closing_port, N, 1);
    assert!(!out.status.success(), "rpc_load must fail: {v}");
    assert_eq!(
        (v["answered"].as_u64(), v["errors"].as_u64()),
        (Some(0), Some(N)),
        "every call to a closing endpoint is an error: {v} {}",
        stderr(&out)
    );
    assert!(
        v["elapsed_ms"].as_u64() < Some(PROMPT.as_millis() as u64),
        "errors, not hangs: {v}"
    );
    client_error(protocol, &v, "closed with the request in flight");
    let service = format!("{protocol}-closing");
    // The same reason as HTTP's (docs/routing.md): dashboards keyed on it see every protocol.
    settle(
        &d,
        &format!("request_failures{{{service},upstream_reset}}"),
        N,
        || failures(&d, &service, "upstream_reset"),
    );
    assert_eq!(retries(&d, &service), 0, "a sent request is never retried");
    eventually(SETTLE, || {
        ensure_eq(
            "connections the closing endpoint saw",
            closer.accepted().len() as u64,
            N,
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    // An endpoint that never answers: the route's 500 ms timeout answers each call with an
    // error (Bolt TIMEOUT, Dubbo SERVER_TIMEOUT), well before the client's own 10 s.
    const S: u64 = 8;
    let (out, v) = rpc_load(&node, protocol, silent_port, S, 4);
    assert!(!out.status.success(), "rpc_load must fail: {v}");
    assert_eq!(
        (v["answered"].as_u64(), v["errors"].as_u64()),
        (Some(0), Some(S)),
        "every call to a silent endpoint is an error: {v} {}",
        stderr(&out)
    );
    let ms = v["elapsed_ms"].as_u64().unwrap_or(0);
    assert!(
        (2 * 500..PROMPT.as_millis() as u64).contains(&ms),
        "{S} calls, 4 at a time, each cut at 500 ms: {ms} ms ({v})"
    );
    client_error(protocol, &v, "within 500 ms");
    let service = format!("{protocol}-silent");
    settle(&d, &format!("request_failures{{{service},timeout}}"), S, || {
        failures(&d, &service, "timeout")
    });
    assert_eq!(retries(&d, &service), 0, "a sent request is never retried");
}

#[test]
fn bolt_dead_or_closing_endpoint_and_missing_route_give_the_npm_client_prompt_errors() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_failures("bolt", 12200);
}

#[test]
fn dubbo_dead_or_closing_endpoint_and_missing_route_give_the_npm_client_prompt_errors() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_failures("dubbo", 20880);
}
