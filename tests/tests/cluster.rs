//! Privileged end-to-end tests on a two-node virtual cluster ([`Cluster`]): node 1's pods in
//! `198.18.1.0/24`, node 2's in `198.18.2.0/24` (and `2001:db8:0:<n>::/64`), each node with its
//! own bridge, cgroup subtree and `sockmesh run`, the nodes routed over a veth between their
//! network namespaces.
//!
//! Also the inbound-capture tests (`sk_lookup`, per-pod `inbound_ports`), same node and across
//! nodes.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test cluster -- --test-threads=1
//! ```

use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;
use sockmesh_tests::checks::{counter, peer_load_all_ok, python_json_within, wait_counter_eq, whoami};
use sockmesh_tests::cluster::{
    connections, enroll_inbound, pod_toml_with_inbound, serve_peer, status_dump, Cluster,
};
use sockmesh_tests::daemon::{basic_config, pods_toml};
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{eventually, require_privileged, Daemon, LineChild, Pod, Server, VirtualNode};

const PEER: &str = env!("CARGO_BIN_EXE_peer");
const SETTLE: Duration = Duration::from_secs(10);
const LINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// helpers

/// Asserts a whoami line shows `source_ip` as the peer and `server_addr` as the local address.
fn assert_whoami_from(line: &str, source_ip: &str, server_addr: &str) {
    let want_peer = format!("peer={source_ip}:");
    let want_local = format!("local={server_addr}");
    assert!(
        line.starts_with(&want_peer) && line.ends_with(&want_local),
        "server saw {line:?}; expected {want_peer}<port> {want_local}"
    );
}

fn interactive(pod: &Pod, addr: &str) -> LineChild {
    let mut cmd = Command::new(PEER);
    cmd.args(["interactive", "--connect", addr, "--seconds-limit", "60"]);
    let mut c = LineChild::spawn(&pod.cgroup, Some(&pod.netns), cmd).unwrap();
    let hello = c.recv_line(LINE).unwrap();
    assert!(hello.starts_with("connected "), "{hello}");
    c
}

fn echo_roundtrip(c: &mut LineChild, word: &str) {
    c.send_line(word).unwrap();
    assert_eq!(c.recv_line(LINE).unwrap(), format!("echo {word}"));
}

fn close(mut c: LineChild) {
    c.close_stdin();
    assert_eq!(c.recv_line(LINE).unwrap(), "closed");
}

/// Exactly one status connection of `pod` going `direction`.
fn one_connection(d: &Daemon, pod: &str, direction: Option<&str>) -> Value {
    eventually(SETTLE, || {
        let conns = connections(d, pod, direction)?;
        match conns.as_slice() {
            [c] => Ok(c.clone()),
            other => bail!("expected one {direction:?} connection of pod {pod}, got {other:?}"),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\nstatus: {}", status_dump(d)))
}

/// `n` sequential whoami requests from `pod` to each of `targets` (python, one process, bounded
/// by a deadline); returns `{"ok": {target: n_ok}, "fails": [...]}`.
fn sequential_requests(pod: &Pod, targets: &[String], n: usize) -> Value {
    let code = r#"
import json, socket, sys, time
n, src, targets = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
deadline = time.monotonic() + 150
ok, fails = {t: 0 for t in targets}, []
for i in range(n):
    for t in targets:
        if time.monotonic() > deadline:
            fails.append({"i": i, "target": t, "error": "deadline"})
            continue
        host, port = t.rsplit(":", 1)
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            line = data.decode().strip()
            if line.startswith("peer=" + src + ":") and line.endswith("local=" + t):
                ok[t] += 1
            else:
                fails.append({"i": i, "target": t, "error": "unexpected reply %r" % line})
        except OSError as e:
            fails.append({"i": i, "target": t, "error": repr(e)})
print(json.dumps({"ok": ok, "fails": fails[:20], "n_fails": len(fails)}))
"#;
    let (n, src) = (n.to_string(), pod.ip.to_string());
    let mut args = vec![n.as_str(), src.as_str()];
    args.extend(targets.iter().map(String::as_str));
    python_json_within(pod, code, &args, Duration::from_secs(170))
}

// ---------------------------------------------------------------------------------------------
// two nodes, outbound capture

#[test]
fn the_cluster_routes_pods_across_nodes_without_any_daemon() {
    if !require_privileged() {
        return;
    }
    let cluster = Cluster::new(&[&["client"], &["server"]]).unwrap();
    let (client, server) = (cluster.node(0).pod("client"), cluster.node(1).pod("server"));
    assert_eq!(client.ip.to_string(), "198.18.1.2");
    assert_eq!(server.ip.to_string(), "198.18.2.2");
    assert_ne!(cluster.node(0).cgroup_root(), cluster.node(1).cgroup_root());
    let _who = serve_peer(server, &server.addr(7000), "whoami").unwrap();
    let _who6 = serve_peer(server, &server.addr6(7000), "whoami").unwrap();
    assert_whoami_from(
        &whoami(client, &server.addr(7000)),
        &client.ip.to_string(),
        &server.addr(7000),
    );
    assert_whoami_from(
        &whoami(client, &server.addr6(7000)),
        &format!("[{}]", client.ip6.unwrap()),
        &server.addr6(7000),
    );
}

#[test]
fn a_pod_on_node_1_calls_a_pod_on_node_2_captured_outbound_on_node_1_with_its_own_ip() {
    if !require_privileged() {
        return;
    }
    let cluster = Cluster::new(&[&["client"], &["server"]]).unwrap();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let (client, server) = (n1.pod("client"), n2.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();
    let who6 = serve_peer(server, &server.addr6(7001), "whoami").unwrap();
    let echo = Server::peer(server, 9000, "echo").unwrap();
    let d1 = Daemon::start(n1, &basic_config(n1, "")).unwrap();
    let d2 = Daemon::start(n2, &basic_config(n2, "")).unwrap();
    d1.enroll(client).unwrap();
    let (c1, c2) = (counter(&d1, "connect_captured"), counter(&d2, "connect_captured"));

    // whoami: the node-2 server sees the node-1 pod's own address.
    let line = whoami(client, &server.addr(7000));
    assert_whoami_from(&line, &client.ip.to_string(), &server.addr(7000));
    assert_eq!(who.accepted().len(), 1);
    wait_counter_eq(&d1, "connect_captured", c1 + 1);
    // IPv6 across nodes too.
    let line = whoami(client, &server.addr6(7001));
    assert_whoami_from(&line, &format!("[{}]", client.ip6.unwrap()), &server.addr6(7001));
    assert_eq!(who6.accepted().len(), 1);
    wait_counter_eq(&d1, "connect_captured", c1 + 2);

    // A long-lived connection shows in node 1's status with the node-2 pod as original_dst.
    let mut conn = interactive(client, &server.addr(9000));
    echo_roundtrip(&mut conn, "cross-node");
    let c = one_connection(&d1, "client", None);
    assert_eq!(c["original_dst"], server.addr(9000), "{c}");
    if let Some(dir) = c["direction"].as_str() {
        assert_eq!(dir, "outbound", "{c}");
    }
    let up = c["upstream_local"].as_str().unwrap_or_default();
    assert!(up.starts_with(&format!("{}:", client.ip)), "{c}");
    assert!(
        echo.accepted().iter().any(|l| l.contains(&format!("peer={up} "))),
        "node-2 server accepted {:?}, node-1 status upstream_local {up}",
        echo.accepted()
    );
    close(conn);
    wait_counter_eq(&d1, "connect_captured", c1 + 3);
    // Node 2's daemon has no enrolled pod: it captured nothing and lists nothing.
    assert_eq!(counter(&d2, "connect_captured"), c2);
    assert!(
        d2.status().unwrap()["connections"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{}",
        status_dump(&d2)
    );
}

#[test]
fn two_hundred_sequential_requests_same_node_and_cross_node_all_succeed() {
    if !require_privileged() {
        return;
    }
    const N: usize = 200;
    let cluster = Cluster::new(&[&["client", "local"], &["remote"]]).unwrap();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let (client, local, remote) = (n1.pod("client"), n1.pod("local"), n2.pod("remote"));
    let who_local = Server::peer(local, 7000, "whoami").unwrap();
    let who_remote = Server::peer(remote, 7000, "whoami").unwrap();
    let d1 = Daemon::start(n1, &basic_config(n1, &pods_toml(&[client]))).unwrap();
    let _d2 = Daemon::start(n2, &basic_config(n2, "")).unwrap();
    let c0 = counter(&d1, "connect_captured");

    let targets = [local.addr(7000), remote.addr(7000)];
    let started = std::time::Instant::now();
    let v = sequential_requests(client, &targets, N);
    eprintln!("{N} x 2 sequential requests in {:?}: {v}", started.elapsed());
    assert_eq!(v["n_fails"], 0, "{v}");
    for t in &targets {
        assert_eq!(v["ok"][t], N, "{v}");
    }
    wait_counter_eq(&d1, "connect_captured", c0 + 2 * N as u64);
    assert_eq!(who_local.accepted().len(), N);
    assert_eq!(who_remote.accepted().len(), N);
    for a in who_local.accepted().iter().chain(who_remote.accepted().iter()) {
        assert!(a.contains(&format!("peer={}:", client.ip)), "server accepted {a}");
    }
    let total = d1.status().unwrap()["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "client").cloned())
        .map(|p| p["connections_total"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    assert!(total >= 2 * N as u64, "connections_total {total}");
}

#[test]
fn fifty_concurrent_cross_node_connections_arrive_byte_exact() {
    if !require_privileged() {
        return;
    }
    const N: u64 = 50;
    let cluster = Cluster::new(&[&["client"], &["server"]]).unwrap();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let (client, server) = (n1.pod("client"), n2.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    let d1 = Daemon::start(n1, &basic_config(n1, &pods_toml(&[client]))).unwrap();
    let c0 = counter(&d1, "connect_captured");
    peer_load_all_ok(client, &server.addr(9000), N, "peer load across nodes");
    wait_counter_eq(&d1, "connect_captured", c0 + N);
}

// ---------------------------------------------------------------------------------------------
// inbound capture (sk_lookup; per-pod `inbound_ports`)
//
// Contract: a connection arriving at the pod's address on an inbound port, from outside the pod,
// is handed to the daemon's inbound listener in that pod's netns (`lookup_assigned`), which
// connects to the application at the same address:port from inside the pod (so the application
// sees the pod's own IP: documented limitation). Status connections carry `direction`; inbound
// ones have `client` = the remote peer and `original_dst` = the pod address:port.

#[test]
fn inbound_same_node_a_call_is_captured_outbound_in_a_and_inbound_in_b() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).unwrap();
    let (a, b) = (node.pod("a"), node.pod("b"));
    let echo = serve_peer(b, "0.0.0.0:9000", "echo").unwrap();
    let who = serve_peer(b, "0.0.0.0:8080", "whoami").unwrap();
    let cfg = basic_config(
        &node,
        &format!("{}{}", pods_toml(&[a]), pod_toml_with_inbound(b, &[9000, 8080])),
    );
    let daemon = Daemon::start(&node, &cfg).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    let l0 = counter(&daemon, "lookup_assigned");

    let mut conn = interactive(a, &b.addr(9000));
    echo_roundtrip(&mut conn, "both-ways");
    let out = one_connection(&daemon, "a", Some("outbound"));
    assert_eq!(out["original_dst"], b.addr(9000), "{out}");
    let inb = one_connection(&daemon, "b", Some("inbound"));
    assert_eq!(inb["original_dst"], b.addr(9000), "{inb}");
    let client = inb["client"].as_str().unwrap_or_default();
    assert!(
        client.starts_with(&format!("{}:", a.ip)),
        "inbound client must be pod a's address: {inb}"
    );
    // The outbound leg's upstream socket is exactly the inbound leg's client.
    assert_eq!(out["upstream_local"].as_str(), Some(client), "{out}\n{inb}");
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    wait_counter_eq(&daemon, "lookup_assigned", l0 + 1);
    // The application's view: the connection comes from the pod's own IP (documented).
    let accepted = echo.accepted();
    assert!(
        accepted.len() == 1 && accepted[0].contains(&format!("peer={}:", b.ip)),
        "app in b accepted {accepted:?}; expected one connection from b's own IP {}",
        b.ip
    );
    close(conn);
    eventually(SETTLE, || {
        ensure_eq(
            "connections after close",
            connections(&daemon, "b", None)?.len(),
            0,
        )
    })
    .unwrap();

    // The second listed port too, with a short-lived connection.
    let line = whoami(a, &b.addr(8080));
    assert_whoami_from(&line, &b.ip.to_string(), &b.addr(8080));
    assert_eq!(who.accepted().len(), 1);
    wait_counter_eq(&daemon, "lookup_assigned", l0 + 2);
    wait_counter_eq(&daemon, "connect_captured", c0 + 2);
}

#[test]
fn inbound_across_nodes_outbound_on_daemon_1_and_inbound_on_daemon_2() {
    if !require_privileged() {
        return;
    }
    let cluster = Cluster::new(&[&["client"], &["server"]]).unwrap();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let (client, server) = (n1.pod("client"), n2.pod("server"));
    let _echo = serve_peer(server, "0.0.0.0:9000", "echo").unwrap();
    let d1 = Daemon::start(n1, &basic_config(n1, &pods_toml(&[client]))).unwrap();
    let d2 = Daemon::start(n2, &basic_config(n2, &pod_toml_with_inbound(server, &[9000]))).unwrap();
    let c1 = counter(&d1, "connect_captured");
    let l2 = counter(&d2, "lookup_assigned");

    let mut conn = interactive(client, &server.addr(9000));
    echo_roundtrip(&mut conn, "node1-to-node2");
    let out = one_connection(&d1, "client", Some("outbound"));
    assert_eq!(out["original_dst"], server.addr(9000), "{out}");
    let inb = one_connection(&d2, "server", Some("inbound"));
    assert_eq!(inb["original_dst"], server.addr(9000), "{inb}");
    assert!(
        inb["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", client.ip))),
        "node 2 must see node 1's pod as the inbound client: {inb}"
    );
    assert_eq!(out["upstream_local"], inb["client"], "{out}\n{inb}");
    // Each daemon lists only its own leg.
    assert!(connections(&d1, "server", None).unwrap().is_empty());
    assert!(connections(&d2, "client", None).unwrap().is_empty());
    wait_counter_eq(&d1, "connect_captured", c1 + 1);
    wait_counter_eq(&d2, "lookup_assigned", l2 + 1);
    echo_roundtrip(&mut conn, "still-flowing");
    close(conn);
}

#[test]
fn inbound_a_port_that_is_not_listed_is_not_captured() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).unwrap();
    let (a, b) = (node.pod("a"), node.pod("b"));
    let listed = serve_peer(b, "0.0.0.0:7000", "whoami").unwrap();
    let unlisted = serve_peer(b, "0.0.0.0:7001", "whoami").unwrap();
    let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    enroll_inbound(&daemon, b, &[7000]).unwrap();
    let l0 = counter(&daemon, "lookup_assigned");
    let total0 = |d: &Daemon| {
        d.status().unwrap()["pods"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "b").cloned())
            .map(|p| p["connections_total"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let t0 = total0(&daemon);

    // a is not enrolled: its connect goes out directly; 7001 is not an inbound port of b.
    for _ in 0..3 {
        let line = whoami(a, &b.addr(7001));
        assert_whoami_from(&line, &a.ip.to_string(), &b.addr(7001));
    }
    assert_eq!(unlisted.accepted().len(), 3);
    wait_counter_eq(&daemon, "lookup_assigned", l0);
    assert_eq!(total0(&daemon), t0, "no connection to 7001 may be proxied");

    // Not vacuous: the listed port is captured inbound.
    let line = whoami(a, &b.addr(7000));
    assert_whoami_from(&line, &b.ip.to_string(), &b.addr(7000));
    assert_eq!(listed.accepted().len(), 1);
    wait_counter_eq(&daemon, "lookup_assigned", l0 + 1);
}

#[test]
fn inbound_an_application_bound_only_to_the_pod_ip_is_still_reachable() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).unwrap();
    let (a, b) = (node.pod("a"), node.pod("b"));
    // Bound to 198.18.0.3:7000 only, not 0.0.0.0.
    let who = Server::peer(b, 7000, "whoami").unwrap();
    let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    enroll_inbound(&daemon, b, &[7000]).unwrap();
    let l0 = counter(&daemon, "lookup_assigned");
    for _ in 0..3 {
        let line = whoami(a, &b.addr(7000));
        assert_whoami_from(&line, &b.ip.to_string(), &b.addr(7000));
    }
    assert_eq!(who.accepted().len(), 3);
    wait_counter_eq(&daemon, "lookup_assigned", l0 + 3);
}
