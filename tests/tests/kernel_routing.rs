//! Privileged end-to-end tests of L4 services routed inside `connect()` (`mode = "kernel"`):
//! a real `sockmesh run`, an enrolled client pod dialling a VIP nobody owns (`10.96.0.20`), two
//! endpoint pods (not enrolled) running the `peer` whoami server, and the `peer conns` client
//! opening thousands of short connections. The server's answer names the endpoint that took the
//! connection and the peer address it saw; the client checks `getpeername()` against the VIP.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test kernel_routing -- --test-threads=1
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sockmesh_tests::daemon::basic_config;
use sockmesh_tests::node::NodeOptions;
use sockmesh_tests::process::spawn_in;
use sockmesh_tests::{last_json, require_privileged, Daemon, Server, TempDir, VirtualNode};

const VIP: &str = "10.96.0.20";
const VIP_PORT: u16 = 5432;
const PORT: u16 = 7100;
/// Connections for the split check (the brief: at least 10,000).
const CONNECTIONS: u64 = 10_000;
const SHARE_TOLERANCE: f64 = 2.0;

fn policy(node: &VirtualNode, w1: u32, w2: u32) -> String {
    format!(
        r#"
[[services]]
name = "db"
addresses = ["{VIP}:{VIP_PORT}"]
protocol = "tcp"
mode = "kernel"
endpoints = [
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
]
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]
[[services.routes]]
split = [{{ subset = "v1", weight = {w1} }}, {{ subset = "v2", weight = {w2} }}]
"#,
        node.pod("v1").addr(PORT),
        node.pod("v2").addr(PORT)
    )
}

/// Dropped in field order: the daemon (a clean stop), the servers, then the node (whose
/// `cgroup.kill` would otherwise SIGKILL the daemon first).
struct Setup {
    daemon: Daemon,
    _servers: Vec<Server>,
    node: VirtualNode,
}

fn setup(w1: u32, w2: u32) -> Setup {
    setup_with(|node| policy(node, w1, w2))
}

fn setup_with(policy: impl Fn(&VirtualNode) -> String) -> Setup {
    let node = VirtualNode::new(&["client", "v1", "v2"]).expect("virtual node");
    let servers = ["v1", "v2"]
        .iter()
        .map(|n| Server::peer(node.pod(n), PORT, "whoami").expect("whoami server"))
        .collect();
    let daemon = Daemon::start(&node, &basic_config(&node, &policy(&node))).expect("daemon");
    daemon.enroll(node.pod("client")).expect("enroll client");
    Setup {
        node,
        daemon,
        _servers: servers,
    }
}

/// `peer conns` from the client pod, started now; `args` after `--connect VIP:PORT`.
fn start_conns(s: &Setup, args: &[&str]) -> sockmesh_tests::process::GuardedChild {
    start_conns_to(s, &format!("{VIP}:{VIP_PORT}"), args)
}

fn start_conns_to(s: &Setup, target: &str, args: &[&str]) -> sockmesh_tests::process::GuardedChild {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peer"));
    cmd.args(["conns", "--connect", target])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let pod = s.node.pod("client");
    spawn_in(&pod.cgroup, Some(&pod.netns), cmd).expect("spawn peer conns")
}

fn finish(child: sockmesh_tests::process::GuardedChild) -> (Output, Value) {
    let out = child.wait_output(Duration::from_secs(150)).expect("peer conns");
    let v = last_json("peer conns", &out);
    (out, v)
}

fn endpoint_counts(node: &VirtualNode, v: &Value) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (name, pod) in [("v1", node.pod("v1")), ("v2", node.pod("v2"))] {
        m.insert(
            name.to_owned(),
            v["by_endpoint"][pod.addr(PORT)].as_u64().unwrap_or(0),
        );
    }
    m
}

/// The kernel's per-entry connect counts from `sockmesh routes --json`, by subset.
fn kernel_counts(d: &Daemon) -> (BTreeMap<String, u64>, Value) {
    let out = d.cli(&["routes", "--json"]).expect("routes --json");
    let v: Value = serde_json::from_slice(&out.stdout).expect("routes JSON");
    let mut m = BTreeMap::new();
    for e in v["kernel"]["services"][0]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        *m.entry(e["subset"].as_str().unwrap_or("?").to_owned())
            .or_default() += e["connects"].as_u64().unwrap_or(0);
    }
    (m, v)
}

fn now_us() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()
}

/// `(µs, endpoint)` per connection from a `peer conns --log` file.
fn read_log(path: &Path) -> Vec<(u128, String)> {
    let mut v: Vec<(u128, String)> = std::fs::read_to_string(path)
        .expect("conns log")
        .lines()
        .filter_map(|l| {
            let (t, e) = l.split_once(' ')?;
            Some((t.parse().ok()?, e.to_owned()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_90_10_split_is_done_in_the_kernel_without_the_proxy() {
    if !require_privileged() {
        return;
    }
    // Acceleration forced on (its self-test fails on some kernels): kernel-routed sockets must
    // stay out of the sockhash all the same.
    let s = setup_with(|node| format!("{}\n[acceleration]\nenabled = true\n", policy(node, 90, 10)));
    let captured_before = s.daemon.counter("connect_captured").unwrap();
    let routed_before = s.daemon.counter("kroute_routed").unwrap();
    let sockhash_before = s.daemon.counter("sockops_sockhash_added").unwrap();
    let started = Instant::now();
    let (out, v) = finish(start_conns(&s, &["--count", &CONNECTIONS.to_string()]));
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "peer conns failed: {v}");
    assert_eq!(v["ok"].as_u64(), Some(CONNECTIONS), "{v}");
    assert_eq!(
        v["getpeername_mismatch"].as_u64(),
        Some(0),
        "getpeername must show the VIP: {v}"
    );
    // The servers saw the client pod's own address: no proxy in between.
    let client_ip = s.node.pod("client").ip.to_string();
    let peers: Vec<&String> = v["peer_ips"].as_object().unwrap().keys().collect();
    assert_eq!(peers, vec![&client_ip], "servers saw {peers:?}");
    let counts = endpoint_counts(&s.node, &v);
    let (v1, v2) = (counts["v1"], counts["v2"]);
    assert_eq!(v1 + v2, CONNECTIONS, "answers from unknown servers: {v}");
    let share = 100.0 * v1 as f64 / CONNECTIONS as f64;
    eprintln!(
        "kernel split: v1 {v1} ({share:.2}%), v2 {v2} ({:.2}%) of {CONNECTIONS} connections in {secs:.1} s",
        100.0 - share
    );
    assert!((share - 90.0).abs() <= SHARE_TOLERANCE, "v1 share {share:.2}%");
    // The kernel counted each choice, and the proxy saw none of them.
    let (kc, routes) = kernel_counts(&s.daemon);
    assert_eq!(kc.get("v1").copied(), Some(v1), "kernel counts {kc:?}");
    assert_eq!(kc.get("v2").copied(), Some(v2), "kernel counts {kc:?}");
    assert_eq!(
        s.daemon.counter("kroute_routed").unwrap() - routed_before,
        CONNECTIONS
    );
    assert_eq!(s.daemon.counter("connect_captured").unwrap(), captured_before);
    // Acceleration is on, yet a kernel-routed socket has no proxy side to short-circuit to:
    // it stays out of the sockhash (tcp_bpf's paths would slow its every send and receive).
    let st = s.daemon.status().unwrap();
    assert_eq!(st["acceleration"]["enabled"], true, "{}", st["acceleration"]);
    assert_eq!(
        s.daemon.counter("sockops_sockhash_added").unwrap(),
        sockhash_before,
        "kernel-routed sockets joined the sockhash"
    );
    assert_eq!(routes["services"][0]["mode"], "kernel");
    assert!(routes["kernel"]["generation"].as_u64().unwrap() >= 1);
    let text = String::from_utf8_lossy(&s.daemon.cli(&["routes"]).unwrap().stdout).into_owned();
    assert!(text.contains("kernel-routed services: 1"), "{text}");
    let status = s.daemon.status_text().unwrap();
    assert!(status.contains("kernel-routed services: 1"), "{status}");
    let m = s.daemon.metrics().unwrap();
    assert!(
        m.contains(&format!(
            "sockmesh_kernel_routed_connects_total{{service=\"db\",subset=\"v1\",endpoint=\"{}\"}} {v1}",
            s.node.pod("v1").addr(PORT)
        )),
        "{m}"
    );
}

#[test]
fn a_weight_change_under_load_is_followed_by_new_connects_and_none_fails() {
    if !require_privileged() {
        return;
    }
    let s = setup(100, 0);
    let dir = TempDir::new("kroute-latency").unwrap();
    let log = dir.join("conns.log");
    let policy_file = dir.join("flip.toml");
    std::fs::write(&policy_file, policy(&s.node, 0, 100)).unwrap();
    let child = start_conns(&s, &["--seconds", "5", "--log", log.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(2000));
    let t0 = now_us();
    s.daemon
        .cli(&["routes", "apply", policy_file.to_str().unwrap()])
        .expect("routes apply");
    let t1 = now_us();
    let (out, v) = finish(child);
    assert!(out.status.success(), "a connect failed during the change: {v}");
    let conns = read_log(&log);
    let (v1, v2) = (s.node.pod("v1").addr(PORT), s.node.pod("v2").addr(PORT));
    let before: Vec<_> = conns.iter().filter(|(t, _)| *t < t0).collect();
    assert!(
        before.len() > 100,
        "too little load before the change: {}",
        before.len()
    );
    assert!(before.iter().all(|(_, e)| *e == v1), "v2 got traffic at weight 0");
    let first_new = conns.iter().find(|(t, e)| *t >= t0 && *e == v2).map(|(t, _)| *t);
    let last_old = conns
        .iter()
        .filter(|(_, e)| *e == v1)
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let old_after_apply = conns.iter().filter(|(t, e)| *t > t1 && *e == v1).count();
    let (_, routes) = kernel_counts(&s.daemon);
    let write_us = routes["kernel"]["last_write"]["write_us"].as_u64().unwrap_or(0);
    let flip = routes["kernel"]["last_write"]["flipped_at_unix_us"]
        .as_u64()
        .expect("flip time") as u128;
    assert!(
        t0 <= flip && flip <= t1,
        "flip {flip} outside the apply [{t0}, {t1}]"
    );
    // Connects are stamped before connect(): one stamped after the flip ran its hook after it.
    let old_after_flip = conns.iter().filter(|(t, e)| *t > flip && *e == v1).count();
    let first_new_after_flip = conns
        .iter()
        .find(|(t, e)| *t >= flip && *e == v2)
        .map(|(t, _)| t - flip);
    let ms = |t: u128| (t as f64 - t0 as f64) / 1000.0;
    eprintln!(
        "weight change: `routes apply` took {:.2} ms (CLI start, compile, admin round trip); \
         the tables flipped {:.2} ms after it started ({write_us} us to write); first connect to \
         v2 started {:.2} ms after the apply started, {} us after the flip; last connect to v1 \
         started {:.3} ms after the apply started ({:+} us from the flip); {} connects in all, \
         {} after the apply started, none failed",
        ms(t1),
        ms(flip),
        first_new.map(ms).unwrap_or(f64::NAN),
        first_new_after_flip
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into()),
        ms(last_old),
        last_old as i128 - flip as i128,
        conns.len(),
        conns.iter().filter(|(t, _)| *t >= t0).count(),
    );
    assert_eq!(
        old_after_flip, 0,
        "connects that started after the flip went to the old endpoint"
    );
    assert_eq!(
        old_after_apply, 0,
        "connects went to the old endpoint after the apply returned"
    );
    assert!(first_new.is_some(), "no connect followed the new weights");
}

#[test]
fn kernel_routes_survive_kill_9_of_the_daemon_and_endpoints_marked_down_leave_the_choice() {
    if !require_privileged() {
        return;
    }
    let mut s = setup(50, 50);
    let (v1, v2) = (s.node.pod("v1").addr(PORT), s.node.pod("v2").addr(PORT));
    // Down: every connect goes to v2; up again: both.
    // (the CLI to take it down, the admin API to put it back)
    let out = s
        .daemon
        .cli(&["routes", "endpoint", &v1, "--down"])
        .expect("mark v1 down");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let (out, v) = finish(start_conns(&s, &["--count", "400"]));
    assert!(out.status.success(), "{v}");
    assert_eq!(v["by_endpoint"][&v2].as_u64(), Some(400), "v1 is down: {v}");
    let (_, routes) = kernel_counts(&s.daemon);
    assert_eq!(routes["kernel"]["services"][0]["entries"][0]["down"], true);
    s.daemon
        .admin(&json!({"op": "kernel_endpoint", "address": v1, "up": true}))
        .expect("mark v1 up");

    let gen_before = routes["kernel"]["generation"].as_u64().unwrap();
    let dir = TempDir::new("kroute-kill").unwrap();
    let log = dir.join("conns.log");
    let child = start_conns(&s, &["--seconds", "5", "--log", log.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(1500));
    s.daemon.kill().expect("kill -9 the daemon");
    let killed = now_us();
    let (out, v) = finish(child);
    assert!(out.status.success(), "connects failed with the daemon dead: {v}");
    let after: Vec<_> = read_log(&log).into_iter().filter(|(t, _)| *t > killed).collect();
    let n1 = after.iter().filter(|(_, e)| *e == v1).count();
    let n2 = after.iter().filter(|(_, e)| *e == v2).count();
    eprintln!(
        "kill -9 under load: {} connects in all, {} after the kill: v1 {n1}, v2 {n2}, failed {}",
        v["ok"],
        after.len(),
        v["failed"]
    );
    assert!(
        after.len() > 200,
        "too few connects after the kill: {}",
        after.len()
    );
    assert_eq!(n1 + n2, after.len(), "connects went elsewhere after the kill");
    let share = 100.0 * n1 as f64 / after.len() as f64;
    assert!(
        (share - 50.0).abs() < 10.0,
        "the last policy's 50/50 no longer holds: {share:.1}%"
    );

    // A successor adopts the pinned tables: the generation goes on and so do the counters.
    let state = s.daemon.hand_over_state().expect("hand over");
    let cfg = basic_config(&s.node, &policy(&s.node, 50, 50));
    s.daemon = Daemon::start_with_state(s.node.daemon_cgroup(), &cfg, Some(state)).expect("successor");
    let (kc, routes) = kernel_counts(&s.daemon);
    let total: u64 = kc.values().sum();
    let all = 400 + v["ok"].as_u64().unwrap();
    eprintln!(
        "successor: table generation {} (was {gen_before}), kernel connect counts {kc:?}",
        routes["kernel"]["generation"]
    );
    assert!(routes["kernel"]["generation"].as_u64().unwrap() > gen_before);
    assert_eq!(total, all, "the counters must survive the restart: {kc:?}");
}

#[test]
fn a_policy_whose_tables_do_not_fit_is_refused_and_the_old_one_keeps_serving() {
    if !require_privileged() {
        return;
    }
    let s = setup(90, 10);
    let gen_before = kernel_counts(&s.daemon).1["kernel"]["generation"].clone();
    let eps: Vec<String> = (0..40)
        .map(|i| format!("{{ address = \"10.0.9.{i}:5432\", labels = {{ version = \"v1\" }} }}"))
        .collect();
    let big = policy(&s.node, 90, 10).replace(
        "endpoints = [\n",
        &format!("endpoints = [\n  {},\n", eps.join(",\n  ")),
    );
    // The CLI refuses before sending (exit 64), naming the limit...
    let dir = TempDir::new("kroute-big").unwrap();
    let file = dir.join("big.toml");
    std::fs::write(&file, &big).unwrap();
    let out = s
        .daemon
        .cli_raw(&["routes", "apply", file.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("SVC_MAX_ENDPOINTS"), "{err}");
    // ... and so does the daemon for a client that does not check.
    let mut endpoints: Vec<Value> = (0..40)
        .map(|i| json!({"address": format!("10.0.9.{i}:5432"), "labels": {"version": "v1"}}))
        .collect();
    endpoints.push(json!({"address": s.node.pod("v2").addr(PORT), "labels": {"version": "v2"}}));
    let raw = json!({"services": [{
        "name": "db",
        "addresses": [format!("{VIP}:{VIP_PORT}")],
        "protocol": "tcp",
        "mode": "kernel",
        "endpoints": endpoints,
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
        "routes": [{"split": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
    }]});
    let e = s
        .daemon
        .admin(&json!({"op": "routes_apply", "policy": raw}))
        .expect_err("the daemon must refuse");
    assert!(e.to_string().contains("services[0].routes[0].split"), "{e}");
    // The old policy keeps serving, in the kernel.
    let (kc, routes) = kernel_counts(&s.daemon);
    assert_eq!(routes["kernel"]["generation"], gen_before);
    let (out, v) = finish(start_conns(&s, &["--count", "300"]));
    assert!(out.status.success(), "{v}");
    let (kc2, _) = kernel_counts(&s.daemon);
    let routed: u64 = kc2.values().sum::<u64>() - kc.values().sum::<u64>();
    assert_eq!(routed, 300, "the old tables must still route: {kc2:?}");
}

/// connect6: an IPv6 service with IPv6 endpoints, and the IPv4 service dialled through an
/// AF_INET6 socket as `::ffff:10.96.0.20` (its IPv4 endpoints, mapped).
#[test]
fn ipv6_and_ipv4_mapped_connects_are_routed_in_the_kernel() {
    if !require_privileged() {
        return;
    }
    const VIP6: &str = "fd00:96::20";
    let node = VirtualNode::with_options(
        &["client", "v1", "v2"],
        NodeOptions {
            ipv6: true,
            ..NodeOptions::default()
        },
    )
    .expect("dual-stack node");
    let mut servers = Vec::new();
    for n in ["v1", "v2"] {
        let pod = node.pod(n);
        servers.push(Server::peer(pod, PORT, "whoami").expect("v4 whoami"));
        let mut cmd = sockmesh_tests::util::peer_command();
        cmd.args(["serve", "--listen", &pod.addr6(PORT), "--mode", "whoami"]);
        servers.push(Server::start(&pod.cgroup, Some(&pod.netns), cmd).expect("v6 whoami"));
    }
    let v6_service = format!(
        r#"
[[services]]
name = "db6"
addresses = ["[{VIP6}]:{VIP_PORT}"]
protocol = "tcp"
mode = "kernel"
endpoints = [
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
]
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]
[[services.routes]]
split = [{{ subset = "v1", weight = 90 }}, {{ subset = "v2", weight = 10 }}]
"#,
        node.pod("v1").addr6(PORT),
        node.pod("v2").addr6(PORT)
    );
    let cfg = basic_config(&node, &(policy(&node, 90, 10) + &v6_service));
    let daemon = Daemon::start(&node, &cfg).expect("daemon");
    daemon.enroll(node.pod("client")).expect("enroll client");
    let s = Setup {
        daemon,
        _servers: servers,
        node,
    };
    let client6 = s.node.pod("client").ip6.unwrap().to_string();

    let (out, v) = finish(start_conns_to(
        &s,
        &format!("[{VIP6}]:{VIP_PORT}"),
        &["--count", "2000"],
    ));
    assert!(out.status.success(), "{v}");
    assert_eq!(v["getpeername_mismatch"].as_u64(), Some(0), "{v}");
    let peers: Vec<&String> = v["peer_ips"].as_object().unwrap().keys().collect();
    assert_eq!(peers, vec![&format!("[{client6}]")], "servers saw {peers:?}");
    let n1 = v["by_endpoint"][s.node.pod("v1").addr6(PORT)]
        .as_u64()
        .unwrap_or(0);
    let n2 = v["by_endpoint"][s.node.pod("v2").addr6(PORT)]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(n1 + n2, 2000, "{v}");
    let share = 100.0 * n1 as f64 / 2000.0;
    eprintln!("IPv6 kernel split: v1 {n1} ({share:.2}%), v2 {n2} of 2000");
    assert!((share - 90.0).abs() <= 3.0, "v1 share {share:.2}%");

    let (out, v) = finish(start_conns_to(
        &s,
        &format!("[::ffff:{VIP}]:{VIP_PORT}"),
        &["--count", "500"],
    ));
    assert!(out.status.success(), "{v}");
    assert_eq!(v["getpeername_mismatch"].as_u64(), Some(0), "{v}");
    let counts = endpoint_counts(&s.node, &v);
    eprintln!("IPv4-mapped kernel split: {counts:?} of 500");
    assert_eq!(counts["v1"] + counts["v2"], 500, "{v}");
    assert!(counts["v2"] > 0 && counts["v1"] > counts["v2"], "{counts:?}");
}

/// The original destination is recorded as for a proxied connect: a server that sees the
/// connection in the client pod's own netns (an endpoint in the same pod) gets the VIP from
/// `SO_ORIGINAL_DST`, answered by `cgroup/getsockopt` from the flow record.
#[test]
fn so_original_dst_answers_the_vip_for_a_kernel_routed_connection() {
    if !require_privileged() {
        return;
    }
    const LOCAL_VIP: &str = "10.96.0.30:6000";
    let node = VirtualNode::new(&["client"]).expect("virtual node");
    let client = node.pod("client");
    let endpoint = client.addr(7200);
    let script = format!(
        r#"
import socket, struct
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{}", 7200))
s.listen(8)
print("listening", flush=True)
c, a = s.accept()
raw = c.getsockopt(socket.SOL_IP, 80, 16)
port = struct.unpack("!H", raw[2:4])[0]
print("orig=%s:%d peer=%s" % (socket.inet_ntoa(raw[4:8]), port, a[0]), flush=True)
c.sendall(b"peer=%s:%d local={endpoint}\n" % (a[0].encode(), a[1]))
c.close()
"#,
        client.ip
    );
    let mut cmd = Command::new(sockmesh_tests::python());
    cmd.args(["-u", "-c", &script]);
    let server = Server::start(&client.cgroup, Some(&client.netns), cmd).expect("python server");
    let policy = format!(
        "[[services]]\nname = \"local\"\naddresses = [\"{LOCAL_VIP}\"]\nprotocol = \"tcp\"\nmode = \"kernel\"\nendpoints = [{{ address = \"{endpoint}\" }}]\n"
    );
    let daemon = Daemon::start(&node, &basic_config(&node, &policy)).expect("daemon");
    daemon.enroll(client).expect("enroll");
    let s = Setup {
        daemon,
        _servers: vec![server],
        node,
    };
    let (out, v) = finish(start_conns_to(&s, LOCAL_VIP, &["--count", "1"]));
    assert!(out.status.success(), "{v}");
    let text = sockmesh_tests::eventually(Duration::from_secs(5), || {
        let t = s._servers[0].stdout();
        anyhow::ensure!(t.contains("orig="), "no answer yet: {t}");
        Ok(t)
    })
    .expect("server output");
    assert!(
        text.contains(&format!("orig={LOCAL_VIP} peer={}", s.node.pod("client").ip)),
        "{text}"
    );
    assert_eq!(s.daemon.counter("kroute_routed").unwrap(), 1);
}

/// `health_check_ms`: an endpoint that dies under load leaves the kernel's choice after two
/// failed probes, and comes back after two answered ones.
#[test]
fn a_dead_endpoint_leaves_the_choice_by_health_checks_and_comes_back() {
    if !require_privileged() {
        return;
    }
    let mut s = setup_with(|node| {
        policy(node, 50, 50).replace("mode = \"kernel\"", "mode = \"kernel\"\nhealth_check_ms = 200")
    });
    let (v1, v2) = (s.node.pod("v1").addr(PORT), s.node.pod("v2").addr(PORT));
    let dir = TempDir::new("kroute-health").unwrap();
    let log = dir.join("conns.log");
    let child = start_conns(&s, &["--seconds", "5", "--log", log.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(1500));
    let killed = now_us();
    let pid = s._servers[0].pid() as i32;
    // SAFETY: a plain kill(2) of the v1 server this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill the v1 server");
    let (_, v) = finish(child);
    let conns = read_log(&log);
    let fails: Vec<u128> = conns
        .iter()
        .filter(|(_, e)| e == "FAIL")
        .map(|(t, _)| *t)
        .collect();
    let last_fail = fails.iter().max().copied().unwrap_or(killed);
    let settled = last_fail.max(killed);
    let after: Vec<_> = conns.iter().filter(|(t, _)| *t > settled).collect();
    eprintln!(
        "health: {} connects, {} failed, the last {:.0} ms after v1 died; {} after that: v1 {}, v2 {}",
        conns.len(),
        fails.len(),
        (last_fail as f64 - killed as f64) / 1000.0,
        after.len(),
        after.iter().filter(|(_, e)| *e == v1).count(),
        after.iter().filter(|(_, e)| *e == v2).count(),
    );
    assert!(
        last_fail - killed < 2_000_000,
        "failures went on for {} ms: {v}",
        (last_fail - killed) / 1000
    );
    assert!(
        after.len() > 200,
        "too few connects after v1 left: {}",
        after.len()
    );
    assert!(
        after.iter().all(|(_, e)| *e == v2),
        "connects still reach the dead v1"
    );
    let (_, routes) = kernel_counts(&s.daemon);
    assert_eq!(
        routes["kernel"]["unhealthy"],
        json!([v1.clone()]),
        "{}",
        routes["kernel"]
    );
    assert_eq!(routes["kernel"]["services"][0]["entries"][0]["down"], true);

    // Back: v1 answers again and rejoins.
    s._servers
        .push(Server::peer(s.node.pod("v1"), PORT, "whoami").expect("v1 again"));
    sockmesh_tests::eventually(Duration::from_secs(5), || {
        let (_, r) = kernel_counts(&s.daemon);
        anyhow::ensure!(
            r["kernel"]["unhealthy"] == json!([]),
            "still unhealthy: {}",
            r["kernel"]
        );
        Ok(())
    })
    .expect("v1 comes back");
    let (out, v) = finish(start_conns(&s, &["--count", "400"]));
    assert!(out.status.success(), "{v}");
    let counts = endpoint_counts(&s.node, &v);
    assert!(counts["v1"] > 100 && counts["v2"] > 100, "{counts:?}");
}
