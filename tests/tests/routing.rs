//! Privileged end-to-end tests of protocol-aware routing: a real `sockmesh run` with a routing
//! policy, an enrolled client pod talking to a service VIP that nobody owns (`10.96.0.10`; the
//! connect is captured before any route lookup), and two endpoint pods (not enrolled) labelled
//! `v1` and `v2` running real servers. Real clients drive the load: wrk and curl (HTTP/1.1),
//! h2load (HTTP/2), grpcio (gRPC), the npm sofa-rpc-node client (SOFA Bolt, Dubbo 2).
//!
//! Every service has the same two routes: `canary` (header / metadata / attachment
//! `x-canary: true` -> all to v2) and `default` (v1 90, v2 10). The tests check that every
//! request is answered, the observed shares are within [`SHARE_TOLERANCE`] points of the weights,
//! the daemon's `sockmesh_requests_total` per subset agrees with what the servers or clients
//! counted, and the match overrides the split.
//!
//! Tools come from `cargo xtask bootstrap`: `node` and `tests/peers/npm/node_modules`, the venv
//! `target/test-venv` with grpcio (or `$SOCKMESH_TEST_PYTHON`), `wrk`, `h2load`, `curl`. A missing
//! tool skips the test with a banner, or fails it under `SOCKMESH_REQUIRE_PRIVILEGED=1`.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test routing -- --test-threads=1
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use serde_json::Value;
use sockmesh_tests::daemon::{basic_config, prom_value};
use sockmesh_tests::process::exec_in;
use sockmesh_tests::rpc::{
    node_server, npm_dir, rpc_load, rpc_load_raw, rpc_load_with, rpc_servers, RPC_STATS,
};
use sockmesh_tests::tools::{grpc_python, require, Tool};
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{
    eventually, last_json, peers_dir, pod_exec, python, workspace_root, Daemon, LineChild, Pod, Server,
    TempDir, VirtualNode,
};

/// The service address the client dials; no interface anywhere holds it.
const VIP: &str = "10.96.0.10";
/// Requests per protocol for the split checks (the brief: at least 10,000).
const REQUESTS: u64 = 10_000;
/// Largest allowed distance, in percentage points, between an observed share and its weight.
const SHARE_TOLERANCE: f64 = 2.0;
/// The default route's weights.
const V1_WEIGHT: u32 = 90;
const V2_WEIGHT: u32 = 10;
/// wrk's connections (`-c`): at most this many requests are cut off when a run ends.
const WRK_IN_FLIGHT: u64 = 8;
/// Bound for one load run (a client process is killed after it).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for waiting on counters to settle.
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// the node, the policy and the servers

/// The virtual node: `client` (enrolled) and the endpoints `v1`, `v2`.
fn node() -> VirtualNode {
    VirtualNode::new(&["client", "v1", "v2"]).expect("virtual node")
}

/// One `[[services]]` entry: `VIP:vip_port` -> endpoints `v1:port`, `v2:port`; routes `canary`
/// (`x-canary: true` -> v2) and `default` (v1 `w1`, v2 `w2`).
fn service_toml(
    node: &VirtualNode,
    name: &str,
    protocol: &str,
    vip_port: u16,
    port: u16,
    w1: u32,
    w2: u32,
) -> String {
    let (v1, v2) = (node.pod("v1"), node.pod("v2"));
    format!(
        r#"
[[services]]
name = "{name}"
addresses = ["{VIP}:{vip_port}"]
protocol = "{protocol}"
timeout_ms = 10000
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
split = [{{ subset = "v2", weight = 100 }}]

[[services.routes]]
name = "default"
split = [{{ subset = "v1", weight = {w1} }}, {{ subset = "v2", weight = {w2} }}]
"#,
        v1.addr(port),
        v2.addr(port)
    )
}

/// Starts the daemon with `policy` and enrols the client pod.
fn daemon(node: &VirtualNode, policy: &str) -> Daemon {
    let d = Daemon::start(node, &basic_config(node, policy)).expect("daemon start");
    d.enroll(node.pod("client")).expect("enroll client");
    d
}

/// Endpoint servers named after their pods (`v1`, `v2`), started by `start(pod, name)`.
fn endpoints(node: &VirtualNode, start: impl Fn(&Pod, &str) -> Server) -> Vec<Server> {
    ["v1", "v2"].iter().map(|n| start(node.pod(n), n)).collect()
}

/// `name_server.js` in the endpoint pods, answering with its name over `proto` (`http1`,
/// `h2c`) on `port`, with its request counts on `stats_port`.
fn name_servers(node: &VirtualNode, proto: &str, port: u16, stats_port: u16) -> Vec<Server> {
    let (port, stats_port) = (port.to_string(), stats_port.to_string());
    endpoints(node, |pod, name| {
        node_server(
            pod,
            "name_server.js",
            &[
                "--name",
                name,
                "--port",
                &port,
                "--proto",
                proto,
                "--stats-port",
                &stats_port,
            ],
        )
    })
}

/// `{"name","requests","connections","by_header"}` from a server's stats listener (127.0.0.1 in
/// its own, not enrolled, pod).
fn stats(pod: &Pod, stats_port: u16) -> Value {
    let url = format!("http://127.0.0.1:{stats_port}/");
    let out = pod_exec(pod, "curl", &["-sS", "--max-time", "5", &url]).expect("curl stats");
    assert!(
        out.status.success(),
        "stats of {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

/// Requests per server name from the two endpoints' stats.
fn server_counts(node: &VirtualNode, stats_port: u16) -> BTreeMap<String, u64> {
    ["v1", "v2"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                stats(node.pod(n), stats_port)["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// checks

/// `sockmesh_requests_total{service,route,subset}` (0 when absent).
fn routed(m: &str, service: &str, route: &str, subset: &str) -> u64 {
    prom_value(
        m,
        "sockmesh_requests_total",
        &[("service", service), ("route", route), ("subset", subset)],
    )
    .unwrap_or(0.0) as u64
}

/// Requests routed per subset by `route` of `service`.
fn routed_per_subset(d: &Daemon, service: &str, route: &str) -> BTreeMap<String, u64> {
    let m = d.metrics().expect("metrics");
    ["v1", "v2"]
        .iter()
        .map(|s| (s.to_string(), routed(&m, service, route, s)))
        .collect()
}

/// The sum of every sample of `name` whose labels include `labels`.
fn prom_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (lab, val) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| lab.split(',').any(|p| p.trim() == format!("{k}=\"{v}\"")))
                .then(|| val.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

/// Asserts v1's share of `counts` is within [`SHARE_TOLERANCE`] points of `V1_WEIGHT`%, prints
/// the shares (they end up in the report), and that both subsets got requests.
fn assert_shares(what: &str, counts: &BTreeMap<String, u64>) {
    let (v1, v2) = (get(counts, "v1"), get(counts, "v2"));
    let total = v1 + v2;
    assert!(total > 0, "{what}: no requests counted: {counts:?}");
    let share = 100.0 * v1 as f64 / total as f64;
    let want = 100.0 * V1_WEIGHT as f64 / (V1_WEIGHT + V2_WEIGHT) as f64;
    eprintln!(
        "{what}: v1 {v1} ({share:.2}%), v2 {v2} ({:.2}%) of {total}",
        100.0 - share
    );
    assert!(
        (share - want).abs() <= SHARE_TOLERANCE,
        "{what}: v1 share {share:.2}% is not within {SHARE_TOLERANCE} points of {want}% ({counts:?})"
    );
    assert!(
        v1 > 0 && v2 > 0,
        "{what}: both subsets must get requests: {counts:?}"
    );
    let extra: Vec<_> = counts.keys().filter(|k| *k != "v1" && *k != "v2").collect();
    assert!(extra.is_empty(), "{what}: answers from unknown servers {extra:?}");
}

/// Waits until the daemon's per-subset count for `route` grew by exactly `want` since `before`.
fn assert_routed(
    d: &Daemon,
    service: &str,
    route: &str,
    before: &BTreeMap<String, u64>,
    want: &BTreeMap<String, u64>,
) {
    eventually(SETTLE, || {
        let now = delta(&routed_per_subset(d, service, route), before);
        ensure_eq(
            &format!("sockmesh_requests_total{{service={service},route={route}}} per subset"),
            &now,
            want,
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn by_server(v: &Value) -> BTreeMap<String, u64> {
    v["by_server"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn run_in(pod: &Pod, mut cmd: Command) -> Output {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(peers_dir());
    }
    exec_in(&pod.cgroup, Some(&pod.netns), cmd, LOAD_TIMEOUT).expect("client run")
}

// ---------------------------------------------------------------------------------------------
// clients

/// `grpc_peer.py call` from the client pod; its JSON summary.
fn grpc_call(node: &VirtualNode, vip_port: u16, requests: u64, metadata: Option<&str>) -> Value {
    let mut cmd = Command::new(grpc_python());
    cmd.arg(peers_dir().join("grpc_peer.py")).args([
        "call",
        "--target",
        &format!("{VIP}:{vip_port}"),
        "--requests",
        &requests.to_string(),
        "--concurrency",
        "32",
        "--seconds-limit",
        "50",
    ]);
    if let Some(m) = metadata {
        cmd.args(["--metadata", m]);
    }
    let out = run_in(node.pod("client"), cmd);
    let v = last_json("grpc_peer.py call", &out);
    assert!(
        out.status.success() && v["answered"].as_u64() == Some(requests) && v["errors"].as_u64() == Some(0),
        "grpc: not every call was answered: {v} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// One `wrk -t2 -c8` run of `seconds` against `VIP:vip_port`; its JSON summary, asserting no
/// error of any kind.
fn wrk(node: &VirtualNode, vip_port: u16, seconds: u32) -> Value {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c8", &format!("-d{seconds}s"), "--timeout", "10s", "-s"])
        .arg(peers_dir().join("wrk_count.lua"))
        .arg(format!("http://{VIP}:{vip_port}/"));
    let out = run_in(node.pod("client"), cmd);
    let v = last_json("wrk", &out);
    for k in ["non_2xx", "connect", "read", "write", "timeout"] {
        assert_eq!(v[k].as_u64(), Some(0), "wrk saw {k} errors: {v}");
    }
    assert!(out.status.success(), "wrk failed: {v}");
    v
}

/// `h2load -n requests -c 2 -m 16` against `VIP:vip_port` (h2c prior knowledge); asserts every
/// request succeeded with a 2xx.
fn h2load(node: &VirtualNode, vip_port: u16, requests: u64, header: Option<&str>) {
    let mut cmd = Command::new("h2load");
    cmd.args(["-n", &requests.to_string(), "-c", "2", "-m", "16"]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://{VIP}:{vip_port}/"));
    let out = run_in(node.pod("client"), cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let want_req = format!(
        "requests: {requests} total, {requests} started, {requests} done, {requests} succeeded, 0 failed"
    );
    let want_2xx = format!("status codes: {requests} 2xx");
    assert!(
        out.status.success() && text.contains(&want_req) && text.contains(&want_2xx),
        "h2load: not every request answered with 2xx:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Proxied connections of the client pod so far (`sockmesh_connections_total{pod="client"}`).
fn client_connections(d: &Daemon) -> u64 {
    prom_value(
        &d.metrics().expect("metrics"),
        "sockmesh_connections_total",
        &[("pod", "client")],
    )
    .unwrap_or(0.0) as u64
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1

const HTTP1_VIP_PORT: u16 = 80;
const HTTP1_PORT: u16 = 8080;
const HTTP1_STATS: u16 = 9901;

#[test]
fn http1_requests_split_90_10_and_a_header_sends_all_to_v2() {
    if !require(&[Tool::Node, Tool::Wrk, Tool::Curl]) {
        return;
    }
    let node = node();
    let d = daemon(
        &node,
        &service_toml(
            &node,
            "web",
            "auto",
            HTTP1_VIP_PORT,
            HTTP1_PORT,
            V1_WEIGHT,
            V2_WEIGHT,
        ),
    );
    let _servers = name_servers(&node, "http1", HTTP1_PORT, HTTP1_STATS);
    let before = routed_per_subset(&d, "web", "default");

    // wrk runs for a duration, not a count: repeat short runs until 10,000 were answered.
    let start = Instant::now();
    let (mut answered, mut runs) = (0, 0);
    while answered < REQUESTS {
        runs += 1;
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "only {answered} requests answered in 45 s"
        );
        answered += wrk(&node, HTTP1_VIP_PORT, 3)["requests"].as_u64().unwrap_or(0);
    }
    let counts = server_counts(&node, HTTP1_STATS);
    let served: u64 = counts.values().sum();
    // A request in flight when wrk stops is served (or only routed) but not counted by wrk.
    assert!(served >= answered, "servers saw {served} < {answered} answered");
    assert_shares("http1 (server-side)", &counts);
    // Requests wrk abandoned when it stopped are counted once the daemon sees the close (as
    // failures with reason client_closed), so wait for the counters to settle.
    eventually(SETTLE, || {
        let routed_now = delta(&routed_per_subset(&d, "web", "default"), &before);
        for s in ["v1", "v2"] {
            let (r, c) = (get(&routed_now, s), get(&counts, s));
            ensure!(
                r >= c && r <= c + WRK_IN_FLIGHT * runs,
                "sockmesh_requests_total{{subset={s}}} {r} vs {c} served ({runs} wrk runs)"
            );
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    // The header match overrides the split: 200 requests over one curl connection, all to v2.
    let canary_before = routed_per_subset(&d, "web", "canary");
    assert_eq!(
        http1_answers(&node, 200, Some("x-canary: true")),
        BTreeMap::from([("v2".to_owned(), 200)]),
        "200 answers, all from v2"
    );
    let after = server_counts(&node, HTTP1_STATS);
    assert_eq!(get(&after, "v1"), get(&counts, "v1"), "v1 got canary requests");
    assert_eq!(get(&after, "v2"), get(&counts, "v2") + 200);
    assert_eq!(
        stats(node.pod("v2"), HTTP1_STATS)["by_header"]["true"].as_u64(),
        Some(200)
    );
    assert_routed(
        &d,
        "web",
        "canary",
        &canary_before,
        &BTreeMap::from([("v1".into(), 0), ("v2".into(), 200)]),
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/2

const H2_VIP_PORT: u16 = 81;
const H2_PORT: u16 = 8081;
const H2_STATS: u16 = 9902;

#[test]
fn http2_requests_split_90_10_and_a_header_sends_all_to_v2() {
    if !require(&[Tool::Node, Tool::H2load, Tool::Curl]) {
        return;
    }
    let node = node();
    let d = daemon(
        &node,
        &service_toml(&node, "web2", "auto", H2_VIP_PORT, H2_PORT, V1_WEIGHT, V2_WEIGHT),
    );
    let _servers = name_servers(&node, "h2c", H2_PORT, H2_STATS);
    let before = routed_per_subset(&d, "web2", "default");
    h2load(&node, H2_VIP_PORT, REQUESTS, None);
    let counts = server_counts(&node, H2_STATS);
    assert_eq!(counts.values().sum::<u64>(), REQUESTS, "servers: {counts:?}");
    assert_shares("http2 (server-side)", &counts);
    assert_routed(&d, "web2", "default", &before, &counts);

    let canary_before = routed_per_subset(&d, "web2", "canary");
    h2load(&node, H2_VIP_PORT, 1000, Some("x-canary: true"));
    let after = server_counts(&node, H2_STATS);
    assert_eq!(get(&after, "v1"), get(&counts, "v1"), "v1 got canary requests");
    assert_eq!(get(&after, "v2"), get(&counts, "v2") + 1000);
    assert_eq!(
        stats(node.pod("v2"), H2_STATS)["by_header"]["true"].as_u64(),
        Some(1000)
    );
    assert_routed(
        &d,
        "web2",
        "canary",
        &canary_before,
        &BTreeMap::from([("v1".into(), 0), ("v2".into(), 1000)]),
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC

const GRPC_PORT: u16 = 50051;

#[test]
fn grpc_calls_split_90_10_and_metadata_sends_all_to_v2() {
    if !require(&[Tool::GrpcPython]) {
        return;
    }
    let node = node();
    let d = daemon(
        &node,
        &service_toml(
            &node, "greeter", "grpc", GRPC_PORT, GRPC_PORT, V1_WEIGHT, V2_WEIGHT,
        ),
    );
    let port = GRPC_PORT.to_string();
    let _servers = endpoints(&node, |pod, name| {
        let mut cmd = Command::new(grpc_python());
        cmd.arg("-u")
            .arg(peers_dir().join("grpc_peer.py"))
            .args(["serve", "--name", name, "--port", &port]);
        Server::start(&pod.cgroup, Some(&pod.netns), cmd).expect("grpc server")
    });
    let before = routed_per_subset(&d, "greeter", "default");
    let conns_before = client_connections(&d);
    let v = grpc_call(&node, GRPC_PORT, REQUESTS, None);
    let counts = by_server(&v);
    assert_shares("grpc (client-side)", &counts);
    assert_routed(&d, "greeter", "default", &before, &counts);
    assert_eq!(
        client_connections(&d) - conns_before,
        1,
        "the grpc client used one channel"
    );

    let canary_before = routed_per_subset(&d, "greeter", "canary");
    let v = grpc_call(&node, GRPC_PORT, 1000, Some("x-canary=true"));
    assert_eq!(by_server(&v), BTreeMap::from([("v2".into(), 1000)]), "{v}");
    assert_routed(
        &d,
        "greeter",
        "canary",
        &canary_before,
        &BTreeMap::from([("v1".into(), 0), ("v2".into(), 1000)]),
    );
}

// ---------------------------------------------------------------------------------------------
// SOFA Bolt and Dubbo 2: many requests over ONE client connection, still split per request

const BOLT_PORT: u16 = 12200;
const DUBBO_PORT: u16 = 20880;
fn rpc_split_over_one_connection(protocol: &str, port: u16) {
    let node = node();
    let service = format!("{protocol}-svc");
    let d = daemon(
        &node,
        &service_toml(&node, &service, protocol, port, port, V1_WEIGHT, V2_WEIGHT),
    );
    let _servers = rpc_servers(&node, protocol, port);
    let before = routed_per_subset(&d, &service, "default");
    let conns_before = client_connections(&d);
    let v = rpc_load(
        node.pod("client"),
        &format!("{VIP}:{port}"),
        protocol,
        REQUESTS,
        None,
    );
    assert_eq!(
        v["connections"].as_u64(),
        Some(1),
        "the {protocol} client made one connection: {v}"
    );
    assert_eq!(
        client_connections(&d) - conns_before,
        1,
        "the daemon proxied one client connection"
    );
    let counts = by_server(&v);
    assert_shares(&format!("{protocol} (client-side, one connection)"), &counts);
    assert_eq!(
        server_counts(&node, RPC_STATS),
        counts,
        "servers and client disagree"
    );
    assert_routed(&d, &service, "default", &before, &counts);

    let canary_before = routed_per_subset(&d, &service, "canary");
    let v = rpc_load(
        node.pod("client"),
        &format!("{VIP}:{port}"),
        protocol,
        1000,
        Some("x-canary=true"),
    );
    assert_eq!(by_server(&v), BTreeMap::from([("v2".into(), 1000)]), "{v}");
    assert_eq!(
        stats(node.pod("v2"), RPC_STATS)["by_header"]["true"].as_u64(),
        Some(1000)
    );
    assert_routed(
        &d,
        &service,
        "canary",
        &canary_before,
        &BTreeMap::from([("v1".into(), 0), ("v2".into(), 1000)]),
    );

    if protocol == "bolt" {
        // The stock npm client leaves the Bolt header map almost empty: the method and the
        // request properties travel in the hessian body, and the match still holds.
        let canary_before = routed_per_subset(&d, &service, "canary");
        let v = rpc_load_with(
            node.pod("client"),
            &format!("{VIP}:{port}"),
            protocol,
            1000,
            Some("x-canary=true"),
            &["--stock-bolt"],
        );
        assert_eq!(
            by_server(&v),
            BTreeMap::from([("v2".into(), 1000)]),
            "stock client: {v}"
        );
        assert_routed(
            &d,
            &service,
            "canary",
            &canary_before,
            &BTreeMap::from([("v1".into(), 0), ("v2".into(), 1000)]),
        );
    }
}

/// Colours over one RPC connection: v2 is the gray endpoint and the policy has a `stress` colour
/// with no endpoint and no fallback. Base requests only reach v1 (the split's 10 % to v2 has no
/// base endpoint there), gray ones only v2, stress ones get an error and reach nobody.
fn rpc_colours_over_one_connection(protocol: &str, port: u16) {
    let node = node();
    let service = format!("{protocol}-svc");
    let colours = "\n[[colours]]\nname = \"gray\"\nid = 1\n\n[[colours]]\nname = \"stress\"\nid = 2\nfallback = \"none\"\n";
    let svc = service_toml(&node, &service, protocol, port, port, V1_WEIGHT, V2_WEIGHT).replace(
        "version = \"v2\" } },",
        "version = \"v2\", colour = \"gray\" } },",
    );
    assert!(svc.contains("colour = \"gray\""), "{svc}");
    let d = daemon(&node, &format!("{colours}{svc}"));
    let _servers = rpc_servers(&node, protocol, port);
    let n = 2000;
    let base = rpc_load(node.pod("client"), &format!("{VIP}:{port}"), protocol, n, None);
    assert_eq!(
        by_server(&base),
        BTreeMap::from([("v1".into(), n)]),
        "base: {base}"
    );
    let gray = rpc_load(
        node.pod("client"),
        &format!("{VIP}:{port}"),
        protocol,
        n,
        Some("x-mesh-colour=gray"),
    );
    assert_eq!(
        by_server(&gray),
        BTreeMap::from([("v2".into(), n)]),
        "gray: {gray}"
    );
    let (_, stress) = rpc_load_raw(
        node.pod("client"),
        &format!("{VIP}:{port}"),
        protocol,
        500,
        Some("x-mesh-colour=stress"),
        &[],
    );
    assert_eq!(
        stress["answered"].as_u64(),
        Some(0),
        "stress must reach nobody: {stress}"
    );
    assert_eq!(
        stress["errors"].as_u64(),
        Some(500),
        "every stress call gets an error: {stress}"
    );
    // The servers saw no stress request, and only base on v1 / gray on v2.
    let (v1, v2) = (stats(node.pod("v1"), RPC_STATS), stats(node.pod("v2"), RPC_STATS));
    assert_eq!(v1["requests"].as_u64(), Some(n), "{v1}");
    assert_eq!(v2["requests"].as_u64(), Some(n), "{v2}");
    if protocol == "dubbo" {
        // Dubbo attachments reach the server's requestProps: the colour travelled with the call.
        assert_eq!(v2["by_colour"]["gray"].as_u64(), Some(n), "{v2}");
        assert_eq!(v1["by_colour"]["gray"].as_u64(), None, "{v1}");
    }
    let unavailable = prom_value(
        &d.metrics().expect("metrics"),
        "sockmesh_colour_unavailable_total",
        &[("service", &service), ("colour", "stress")],
    );
    assert_eq!(unavailable, Some(500.0));
}

#[test]
fn bolt_colours_stay_in_their_group_over_one_connection() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_colours_over_one_connection("bolt", BOLT_PORT);
}

#[test]
fn dubbo_colours_stay_in_their_group_over_one_connection() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_colours_over_one_connection("dubbo", DUBBO_PORT);
}

#[test]
fn bolt_requests_over_one_connection_split_90_10_and_a_header_sends_all_to_v2() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_split_over_one_connection("bolt", BOLT_PORT);
}

#[test]
fn dubbo_requests_over_one_connection_split_90_10_and_an_attachment_sends_all_to_v2() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    rpc_split_over_one_connection("dubbo", DUBBO_PORT);
}

// ---------------------------------------------------------------------------------------------
// `sockmesh routes apply` under load

fn apply(d: &Daemon, dir: &TempDir, name: &str, policy: &str) -> Output {
    let path = dir.join(name);
    std::fs::write(&path, policy).expect("write policy");
    d.cli_raw(&["routes", "apply", &path.to_string_lossy()])
        .expect("routes apply")
}

#[test]
fn routes_apply_during_bolt_load_loses_nothing_and_later_requests_follow_the_new_weights() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    let node = node();
    let d = daemon(
        &node,
        &service_toml(
            &node, "bolt-svc", "bolt", BOLT_PORT, BOLT_PORT, V1_WEIGHT, V2_WEIGHT,
        ),
    );
    let _servers = rpc_servers(&node, "bolt", BOLT_PORT);
    let dir = TempDir::new("routes").expect("temp dir");

    // An invalid policy is refused with 64, naming the field, and changes nothing.
    let mut bad = service_toml(&node, "bolt-svc", "bolt", BOLT_PORT, BOLT_PORT, 0, 100);
    bad = bad.replace("subset = \"v2\", weight = 100", "subset = \"v3\", weight = 100");
    let out = apply(&d, &dir, "bad.toml", &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "bad policy: {err}");
    assert!(
        err.contains("services[0].routes[0].split[0].subset"),
        "the field is named: {err}"
    );
    let m = d.metrics().unwrap();
    assert_eq!(
        prom_value(&m, "sockmesh_routing_policy_generation", &[]),
        Some(0.0)
    );

    // 20,000 calls over one connection, at most 16 in flight; the policy turns to 0/100 once
    // 4,000 were answered.
    const TOTAL: u64 = 20_000;
    const IN_FLIGHT: u64 = 16;
    let mut cmd = Command::new("node");
    cmd.current_dir(npm_dir())
        .arg(npm_dir().join("rpc_load.js"))
        .args([
            "--protocol",
            "bolt",
            "--connect",
            &format!("{VIP}:{BOLT_PORT}"),
            "--requests",
            &TOTAL.to_string(),
            "--concurrency",
            &IN_FLIGHT.to_string(),
            "--seconds-limit",
            "50",
            "--progress-every",
            "1000",
        ]);
    let client = node.pod("client");
    let mut load = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("rpc_load");
    loop {
        let line = load.recv_line(Duration::from_secs(30)).expect("load progress");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v.get("progress").is_some(), "load ended early: {line}");
        if v["progress"].as_u64() >= Some(4000) {
            break;
        }
    }
    let out = apply(
        &d,
        &dir,
        "all-v2.toml",
        &service_toml(&node, "bolt-svc", "bolt", BOLT_PORT, BOLT_PORT, 0, 100),
    );
    assert!(
        out.status.success(),
        "routes apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at_apply = server_counts(&node, RPC_STATS);
    let summary = loop {
        let line = load.recv_line(Duration::from_secs(50)).expect("load summary");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        if v.get("progress").is_none() {
            break v;
        }
    };
    eprintln!("bolt load across routes apply: {summary}");
    assert_eq!(summary["answered"].as_u64(), Some(TOTAL), "{summary}");
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
    assert_eq!(summary["connections"].as_u64(), Some(1), "{summary}");
    let end = server_counts(&node, RPC_STATS);
    // Only calls already routed when the new policy landed may still reach v1.
    assert!(
        get(&end, "v1") <= get(&at_apply, "v1") + IN_FLIGHT,
        "v1 kept getting requests after 0/100: at apply {at_apply:?}, at the end {end:?}"
    );
    assert!(
        get(&end, "v2") - get(&at_apply, "v2") >= TOTAL / 2,
        "{at_apply:?} -> {end:?}"
    );
    assert_eq!(end.values().sum::<u64>(), TOTAL);
    let m = d.metrics().unwrap();
    assert_eq!(
        prom_value(&m, "sockmesh_routing_policy_generation", &[]),
        Some(1.0)
    );

    // A fresh run: everything to v2.
    let v = rpc_load(
        node.pod("client"),
        &format!("{VIP}:{BOLT_PORT}"),
        "bolt",
        2000,
        None,
    );
    assert_eq!(by_server(&v), BTreeMap::from([("v2".into(), 2000)]), "{v}");
}

#[test]
fn routes_apply_during_http1_load_drops_no_request_and_later_requests_follow_the_new_weights() {
    if !require(&[Tool::Node, Tool::Wrk, Tool::Curl]) {
        return;
    }
    let node = node();
    let d = daemon(
        &node,
        &service_toml(
            &node,
            "web",
            "http1",
            HTTP1_VIP_PORT,
            HTTP1_PORT,
            V1_WEIGHT,
            V2_WEIGHT,
        ),
    );
    let _servers = name_servers(&node, "http1", HTTP1_PORT, HTTP1_STATS);
    let dir = TempDir::new("routes").expect("temp dir");
    let client = node.pod("client");
    let mut cmd = Command::new("wrk");
    cmd.current_dir(peers_dir())
        .args(["-t2", "-c8", "-d6s", "--timeout", "10s", "-s"])
        .arg(peers_dir().join("wrk_count.lua"))
        .arg(format!("http://{VIP}:{HTTP1_VIP_PORT}/"));
    let mut load = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("wrk");
    // Apply once the load is well under way (some thousands of requests served).
    eventually(Duration::from_secs(10), || {
        let n: u64 = server_counts(&node, HTTP1_STATS).values().sum();
        if n >= 3000 {
            Ok(())
        } else {
            bail!("{n} requests served so far")
        }
    })
    .expect("load under way");
    let conns_before = client_connections(&d);
    let out = apply(
        &d,
        &dir,
        "all-v2.toml",
        &service_toml(&node, "web", "http1", HTTP1_VIP_PORT, HTTP1_PORT, 0, 100),
    );
    assert!(
        out.status.success(),
        "routes apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at_apply = server_counts(&node, HTTP1_STATS);
    let summary = loop {
        let line = load.recv_line(Duration::from_secs(30)).expect("wrk summary");
        if line.starts_with('{') {
            break serde_json::from_str::<Value>(&line).expect("wrk JSON");
        }
    };
    eprintln!("wrk across routes apply: {summary}, at apply {at_apply:?}");
    for k in ["non_2xx", "connect", "read", "write", "timeout"] {
        assert_eq!(
            summary[k].as_u64(),
            Some(0),
            "wrk saw {k} errors across the apply: {summary}"
        );
    }
    let end = server_counts(&node, HTTP1_STATS);
    let served: u64 = end.values().sum();
    let answered = summary["requests"].as_u64().unwrap_or(0);
    assert!(
        served >= answered,
        "servers saw {served} < {answered} answered by wrk"
    );
    assert!(
        get(&end, "v1") <= get(&at_apply, "v1") + WRK_IN_FLIGHT,
        "v1 kept getting requests after 0/100: at apply {at_apply:?}, at the end {end:?}"
    );
    assert!(
        get(&end, "v2") > get(&at_apply, "v2") + 1000,
        "{at_apply:?} -> {end:?}"
    );
    // The keep-alive connections were not dropped: no new client connection was proxied.
    assert_eq!(
        client_connections(&d),
        conns_before,
        "wrk had to reconnect across the apply"
    );
}

/// Which endpoint answered each of `n` curl requests (one connection, with `header` if given)
/// from the client pod to the HTTP/1.1 VIP.
fn http1_answers(node: &VirtualNode, n: u32, header: Option<&str>) -> BTreeMap<String, u64> {
    let url = format!("http://{VIP}:{HTTP1_VIP_PORT}/[1-{n}]");
    let mut args = vec!["-sS", "--fail", "--max-time", "30", "-w", "\n", &url];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    let out = pod_exec(node.pod("client"), "curl", &args).expect("curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *by.entry(l.to_owned()).or_insert(0) += 1;
    }
    by
}

/// `sockmesh stop --keep-state`, then a successor on the same pinned state with `config`.
fn restart(d: &mut Daemon, node: &VirtualNode, config: &str) -> Daemon {
    let state = d.stop_keep_state().expect("sockmesh stop --keep-state");
    Daemon::start_with_state(node.daemon_cgroup(), config, Some(state)).expect("successor")
}

#[test]
fn a_policy_applied_at_runtime_survives_a_restart_unless_the_config_changed() {
    if !require(&[Tool::Node, Tool::Curl]) {
        return;
    }
    let node = node();
    let all_to = |w1, w2| service_toml(&node, "web", "http1", HTTP1_VIP_PORT, HTTP1_PORT, w1, w2);
    let config = basic_config(&node, &all_to(100, 0));
    let mut first = daemon(&node, &all_to(100, 0));
    let _servers = name_servers(&node, "http1", HTTP1_PORT, HTTP1_STATS);
    let only = |name: &str| BTreeMap::from([(name.to_owned(), 20u64)]);
    assert_eq!(http1_answers(&node, 20, None), only("v1"), "the config's policy");

    let dir = TempDir::new("routes").expect("temp dir");
    let out = apply(&first, &dir, "all-v2.toml", &all_to(0, 100));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(http1_answers(&node, 20, None), only("v2"), "the applied policy");

    // A successor with the same config goes on with the applied policy, from its first request.
    let mut second = restart(&mut first, &node, &config);
    assert_eq!(
        http1_answers(&node, 20, None),
        only("v2"),
        "after a restart: {}",
        second.log()
    );
    assert!(second
        .log()
        .contains("resumed the routing policy applied at runtime"));

    // An edited config file is newer than the runtime policy: it wins.
    let edited = config.replace("timeout_ms = 10000", "timeout_ms = 9000");
    assert_ne!(edited, config);
    let third = restart(&mut second, &node, &edited);
    assert_eq!(
        http1_answers(&node, 20, None),
        only("v1"),
        "after a restart with an edited config: {}",
        third.log()
    );
    assert!(third
        .log()
        .contains("routing policy changed since `routes apply`"));
}

// ---------------------------------------------------------------------------------------------
// bad input

/// Python run in the client pod: connects to `addr`, sends the bytes of `file` then `garbage`,
/// and prints `{"received": n, "closed": bool}` (read until EOF or 5 s of silence).
const RAW_CLIENT: &str = r#"
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
data = open(sys.argv[2], "rb").read() + bytes.fromhex(sys.argv[3])
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(data)
received, closed = 0, False
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            closed = True
            break
        received += len(chunk)
except socket.timeout:
    pass
except ConnectionResetError:
    closed = True
print(json.dumps({"received": received, "closed": closed}))
"#;

fn testdata(name: &str) -> PathBuf {
    workspace_root()
        .join("mesh-userspace/src/protocol/testdata")
        .join(name)
}

/// Valid frames captured from the real npm client, then garbage, on one connection: the daemon
/// counts a protocol error and closes it, while another client keeps being served.
fn garbage_after_valid_frames(protocol: &str, port: u16, capture: &Path) {
    let node = node();
    let service = format!("{protocol}-svc");
    let d = daemon(
        &node,
        &service_toml(&node, &service, protocol, port, port, V1_WEIGHT, V2_WEIGHT),
    );
    let _servers = rpc_servers(&node, protocol, port);
    let errors_before = prom_sum(
        &d.metrics().unwrap(),
        "sockmesh_protocol_errors_total",
        &[("protocol", protocol)],
    );

    // The well-behaved client runs throughout.
    let client = node.pod("client");
    let mut cmd = Command::new("node");
    cmd.current_dir(npm_dir())
        .arg(npm_dir().join("rpc_load.js"))
        .args([
            "--protocol",
            protocol,
            "--connect",
            &format!("{VIP}:{port}"),
            "--requests",
            "3000",
            "--concurrency",
            "8",
            "--seconds-limit",
            "40",
            "--progress-every",
            "500",
        ]);
    let mut good = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("rpc_load");
    good.recv_line(Duration::from_secs(20))
        .expect("good client under way");

    let garbage = "ff".repeat(64);
    let mut cmd = Command::new(python());
    cmd.args(["-c", RAW_CLIENT, &format!("{VIP}:{port}")])
        .arg(capture)
        .arg(&garbage);
    let out = run_in(client, cmd);
    let raw = last_json("raw client", &out);
    eprintln!("{protocol}: valid frames + garbage -> {raw}");
    assert_eq!(
        raw["closed"],
        Value::Bool(true),
        "the daemon must close a connection sending garbage: {raw}"
    );
    eventually(SETTLE, || {
        let now = prom_sum(
            &d.metrics()?,
            "sockmesh_protocol_errors_total",
            &[("protocol", protocol)],
        );
        if now > errors_before {
            Ok(())
        } else {
            Err(anyhow!(
                "sockmesh_protocol_errors_total{{protocol={protocol}}} still {now}"
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.metrics().unwrap_or_default()));

    let summary = loop {
        let line = good
            .recv_line(Duration::from_secs(40))
            .expect("good client summary");
        let v: Value = serde_json::from_str(&line)
            .with_context(|| line.clone())
            .expect("JSON");
        if v.get("progress").is_none() {
            break v;
        }
    };
    assert_eq!(
        summary["answered"].as_u64(),
        Some(3000),
        "the other client kept working: {summary}"
    );
    assert_eq!(summary["errors"].as_u64(), Some(0), "{summary}");
}

#[test]
fn bolt_garbage_after_a_valid_frame_is_a_protocol_error_and_other_clients_keep_working() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    garbage_after_valid_frames("bolt", BOLT_PORT, &testdata("bolt_v1.c2s.bin"));
}

#[test]
fn dubbo_garbage_after_a_valid_frame_is_a_protocol_error_and_other_clients_keep_working() {
    if !require(&[Tool::Node, Tool::NpmPeers, Tool::Curl]) {
        return;
    }
    garbage_after_valid_frames("dubbo", DUBBO_PORT, &testdata("dubbo.c2s.bin"));
}
