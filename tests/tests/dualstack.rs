//! Privileged end-to-end tests of IPv6 capture on a dual-stack virtual node: pods have
//! `198.18.0.(2+i)/24` and `2001:db8::(2+i)/64` on `eth0`, and real clients (curl -6 / -4, python
//! AF_INET6 sockets, `peer`) in an enrolled pod reach servers in another pod through the daemon's
//! `[::1]:15001` listener. The IPv4-mapped case (`::ffff:a.b.c.d` from an AF_INET6 socket) is in
//! `capture.rs`.
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test dualstack -- --test-threads=1
//! ```

use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::Value;
use sockmesh_tests::checks::{
    counter, out_str, peer_load_all_ok, python_json, wait_counter_at_least, wait_counter_eq, whoami,
};
use sockmesh_tests::cluster::{connections, serve_peer};
use sockmesh_tests::daemon::basic_config;
use sockmesh_tests::node::NodeOptions;
use sockmesh_tests::process::check_output;
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{
    eventually, peers_dir, pod_exec, python, require_privileged, Daemon, LineChild, Pod, Server, VirtualNode,
};

const PEER: &str = env!("CARGO_BIN_EXE_peer");
const SETTLE: Duration = Duration::from_secs(10);
const LINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// helpers

/// A dual-stack node (index 0: `198.18.0.0/24` + `2001:db8::/64`) and a daemon for it.
fn start(pods: &[&str]) -> (VirtualNode, Daemon) {
    let opts = NodeOptions {
        ipv6: true,
        ..NodeOptions::default()
    };
    let node = VirtualNode::with_options(pods, opts).expect("dual-stack virtual node");
    let daemon = Daemon::start(&node, &basic_config(&node, "")).expect("daemon start");
    (node, daemon)
}

fn ip6(pod: &Pod) -> String {
    pod.ip6.expect("dual-stack pod").to_string()
}

fn pod_status(d: &Daemon, pod: &str) -> Value {
    let st = d.status().unwrap();
    st["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pod).cloned())
        .unwrap_or_else(|| panic!("pod {pod} not in status: {}", st["pods"]))
}

/// `http_server.py --bind :: --port <port>` in `pod`: one dual-stack socket (IPv4 clients show
/// up as `::ffff:a.b.c.d`).
fn http_dual_stack(pod: &Pod, port: u16) -> Server {
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(peers_dir().join("http_server.py"))
        .args(["--bind", "::", "--port", &port.to_string()]);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd).unwrap()
}

fn curl(pod: &Pod, family: &str, url: &str) -> String {
    let out = pod_exec(pod, "curl", &["-sS", "-g", family, "--max-time", "15", url]).unwrap();
    check_output(&format!("curl {family} {url} from {}", pod.name), &out).unwrap();
    out_str(&out)
}

/// Asserts a whoami line shows `client`'s IPv6 address as the source and `server_addr`.
fn assert_whoami6(line: &str, client: &Pod, server_addr: &str) {
    let want_peer = format!("peer=[{}]:", ip6(client));
    let want_local = format!("local={server_addr}");
    assert!(
        line.starts_with(&want_peer) && line.ends_with(&want_local),
        "server saw {line:?}; expected {want_peer}<port> {want_local} (the client pod's own IPv6 \
         address, not ::1 or the node)"
    );
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn curl_6_and_curl_4_from_an_enrolled_pod_are_captured_and_keep_the_pod_address() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    assert_eq!(ip6(client), "2001:db8::2");
    assert_eq!(ip6(server), "2001:db8::3");
    let http = http_dual_stack(server, 8080);
    let _who6 = serve_peer(server, &server.addr6(7000), "whoami").unwrap();
    daemon.enroll(client).unwrap();
    let ps = pod_status(&daemon, "client");
    assert!(
        ps["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|a| a == "[::1]:15001")),
        "a dual-stack enrolled pod should have a [::1]:15001 listener: {ps}"
    );
    let c0 = counter(&daemon, "connect_captured");

    // curl -6 to the server's IPv6 address.
    let body = curl(client, "-6", &format!("http://{}/v6", server.addr6(8080)));
    assert!(
        body.starts_with(&format!("client={}:", ip6(client))),
        "http server saw {body:?}; expected client={}:<port>",
        ip6(client)
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    // curl -4 to the same (dual-stack) server: the v4 pod address, shown v4-mapped.
    let body = curl(client, "-4", &format!("http://{}/v4", server.addr(8080)));
    let ip4 = client.ip.to_string();
    assert!(
        body.starts_with(&format!("client=::ffff:{ip4}:")) || body.starts_with(&format!("client={ip4}:")),
        "http server saw {body:?}; expected client=[::ffff:]{ip4}:<port>"
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 2);
    let accepted = http.accepted();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(
        accepted[0].contains(&format!("peer={}:", ip6(client))),
        "{accepted:?}"
    );
    assert!(
        accepted[0].ends_with("path=/v6") && accepted[1].ends_with("path=/v4"),
        "{accepted:?}"
    );

    // Raw TCP over IPv6.
    let line = whoami(client, &server.addr6(7000));
    assert_whoami6(&line, client, &server.addr6(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 3);
    let total = pod_status(&daemon, "client")["connections_total"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        total >= 3,
        "the daemon should have proxied all 3 connections, says {total}"
    );
}

#[test]
fn an_af_inet6_client_s_getpeername_returns_the_original_ipv6_destination() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let _echo = serve_peer(server, &server.addr6(9000), "echo").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    let g0 = counter(&daemon, "getpeername_rewritten");
    let code = r#"
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
peer = s.getpeername()
local = s.getsockname()
s.sendall(b"ping6")
back = b""
while len(back) < 5:
    chunk = s.recv(5 - len(back))
    if not chunk:
        break
    back += chunk
s.close()
print(json.dumps({"peer": "[%s]:%d" % peer[:2], "local": "[%s]:%d" % local[:2], "echo": back.decode()}))
"#;
    let v = python_json(app, code, &[&ip6(server), "9000"]);
    assert_eq!(v["echo"], "ping6", "{v}");
    assert_eq!(
        v["peer"],
        server.addr6(9000),
        "getpeername() must show the original IPv6 destination, not [::1]:15001: {v}"
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    wait_counter_at_least(&daemon, "getpeername_rewritten", g0 + 1);
}

#[test]
fn status_shows_the_ipv6_original_destination_and_the_server_sees_the_pod_s_ipv6_address() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let echo = serve_peer(server, &server.addr6(9000), "echo").unwrap();
    daemon.enroll(client).unwrap();
    let c0 = counter(&daemon, "connect_captured");

    let mut cmd = Command::new(PEER);
    cmd.args([
        "interactive",
        "--connect",
        &server.addr6(9000),
        "--seconds-limit",
        "60",
    ]);
    let mut conn = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).unwrap();
    let hello = conn.recv_line(LINE).unwrap();
    assert!(hello.starts_with("connected "), "{hello}");
    conn.send_line("hello6").unwrap();
    assert_eq!(conn.recv_line(LINE).unwrap(), "echo hello6");

    let c = eventually(SETTLE, || {
        let conns = connections(&daemon, "client", None)?;
        match conns.as_slice() {
            [c] => Ok(c.clone()),
            other => bail!("expected one connection of pod client, got {other:?}"),
        }
    })
    .unwrap();
    eprintln!("status connection: {c}");
    assert_eq!(
        c["original_dst"],
        server.addr6(9000),
        "status original_dst must be the IPv6 destination: {c}"
    );
    let up = c["upstream_local"]
        .as_str()
        .ok_or_else(|| anyhow!("no upstream_local in {c}"))
        .unwrap();
    assert!(
        up.starts_with(&format!("[{}]:", ip6(client))),
        "the upstream connection must leave from the pod's IPv6 address: {c}"
    );
    // The server saw exactly that upstream socket: the client pod's IPv6 address.
    let accepted = echo.accepted();
    assert!(
        accepted.iter().any(|l| l.contains(&format!("peer={up} "))),
        "server accepted {accepted:?}, status upstream_local {up}"
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    conn.close_stdin();
    assert_eq!(conn.recv_line(LINE).unwrap(), "closed");
    eventually(SETTLE, || {
        ensure_eq(
            "connections after close",
            connections(&daemon, "client", None)?.len(),
            0,
        )
    })
    .unwrap();
}

#[test]
fn a_pod_that_is_not_enrolled_connects_over_ipv6_directly() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["enrolled", "plain", "server"]);
    let (enrolled, plain, server) = (node.pod("enrolled"), node.pod("plain"), node.pod("server"));
    let who = serve_peer(server, &server.addr6(7000), "whoami").unwrap();
    daemon.enroll(enrolled).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    for _ in 0..3 {
        let line = whoami(plain, &server.addr6(7000));
        assert_whoami6(&line, plain, &server.addr6(7000));
    }
    assert_eq!(who.accepted().len(), 3, "{}", who.stdout());
    wait_counter_eq(&daemon, "connect_captured", c0);
    assert!(connections(&daemon, "plain", None).unwrap().is_empty());
    // Not vacuous: the enrolled pod's IPv6 connect is captured.
    let line = whoami(enrolled, &server.addr6(7000));
    assert_whoami6(&line, enrolled, &server.addr6(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
}

#[test]
fn fifty_concurrent_ipv6_connections_arrive_byte_exact() {
    if !require_privileged() {
        return;
    }
    const N: u64 = 50;
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _echo = serve_peer(server, &server.addr6(9000), "echo").unwrap();
    daemon.enroll(client).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    peer_load_all_ok(
        client,
        &server.addr6(9000),
        N,
        "peer load over IPv6 through the daemon",
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + N);
}
