//! Privileged end-to-end tests of outbound capture: a real `sockmesh run` on a virtual node, real
//! clients (curl, python, `peer`) in pod network namespaces and cgroups, real servers in other pods.
//!
//! Every test starts with `if !require_privileged() { return; }` and the suite runs with
//! `--test-threads=1` (attachments and pinned maps are kernel-wide state):
//!
//! ```sh
//! SOCKMESH_BIN=target/release/sockmesh cargo test -p sockmesh-tests --test capture -- --test-threads=1
//! ```

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use sockmesh_tests::checks::{counter, out_str, python_json, wait_counter_at_least, wait_counter_eq, whoami};
use sockmesh_tests::cluster::{enroll_inbound, status_dump};
use sockmesh_tests::daemon::{basic_config, pods_toml, prom_value, toml_str};
use sockmesh_tests::process::{check_output, exec_in, status_text};
use sockmesh_tests::util::{ensure_eq, free_tcp_port};
use sockmesh_tests::{
    attached_programs, eventually, peers_dir, pod_exec, python, require_privileged, sockmesh_bin, Daemon,
    LineChild, Pod, Server, TempDir, VirtualNode,
};

const PEER: &str = env!("CARGO_BIN_EXE_peer");
const SETTLE: Duration = Duration::from_secs(10);
const LINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// helpers

fn start(pods: &[&str]) -> (VirtualNode, Daemon) {
    let node = VirtualNode::new(pods).expect("virtual node");
    let daemon = Daemon::start(&node, &basic_config(&node, "")).expect("daemon start");
    (node, daemon)
}

/// The status connections of `pod`.
fn connections_of(d: &Daemon, pod: &str) -> Result<Vec<Value>> {
    let st = d.status()?;
    let conns = st["connections"]
        .as_array()
        .ok_or_else(|| anyhow!("status has no connections array: {st}"))?;
    Ok(conns.iter().filter(|c| c["pod"] == pod).cloned().collect())
}

fn pod_status(d: &Daemon, pod: &str) -> Result<Value> {
    let st = d.status()?;
    st["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pod).cloned())
        .ok_or_else(|| anyhow!("pod {pod} not in status: {}", st["pods"]))
}

/// Asserts a whoami line shows `client` as the source and `server` as the destination.
fn assert_whoami(line: &str, client: &Pod, server_addr: &str) {
    let want_peer = format!("peer={}:", client.ip);
    let want_local = format!("local={server_addr}");
    assert!(
        line.starts_with(&want_peer) && line.ends_with(&want_local),
        "server saw {line:?}; expected {want_peer}<port> {want_local} (the client pod's own IP, \
         not 127.0.0.1 or the node)"
    );
}

fn interactive(pod: &Pod, addr: &str) -> (LineChild, String) {
    let mut cmd = Command::new(PEER);
    cmd.args(["interactive", "--connect", addr, "--seconds-limit", "60"]);
    let mut c = LineChild::spawn(&pod.cgroup, Some(&pod.netns), cmd).unwrap();
    let hello = c.recv_line(LINE).unwrap();
    assert!(hello.starts_with("connected "), "{hello}");
    (c, hello)
}

fn echo_roundtrip(c: &mut LineChild, word: &str) {
    c.send_line(word).unwrap();
    assert_eq!(c.recv_line(LINE).unwrap(), format!("echo {word}"));
}

// ---------------------------------------------------------------------------------------------
// capture basics

#[test]
fn curl_and_raw_tcp_from_an_enrolled_pod_are_captured_and_keep_the_pod_ip() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _http = Server::http(server, 8080).unwrap();
    let _who = Server::peer(server, 7000, "whoami").unwrap();
    daemon.enroll(client).unwrap();
    let ps = pod_status(&daemon, "client").unwrap();
    assert_eq!(ps["external_proxy"], false, "{ps}");
    assert!(
        ps["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|a| a == "127.0.0.1:15001")),
        "enrolled pod should have a 127.0.0.1:15001 listener: {ps}"
    );
    assert_eq!(
        ps["cgroup_id"].as_u64(),
        Some(sockmesh_tests::cgroup::cgroup_id(&client.cgroup).unwrap()),
        "cgroup_id must be the cgroup directory's inode: {ps}"
    );
    let c0 = counter(&daemon, "connect_captured");

    let out = pod_exec(
        client,
        "curl",
        &[
            "-sS",
            "--max-time",
            "15",
            &format!("http://{}/hello", server.addr(8080)),
        ],
    )
    .unwrap();
    check_output("curl through the daemon", &out).unwrap();
    let body = out_str(&out);
    assert!(
        body.starts_with(&format!("client={}:", client.ip)),
        "http server saw {body:?}; expected client={}:<port>",
        client.ip
    );
    wait_counter_at_least(&daemon, "connect_captured", c0 + 1);

    let line = whoami(client, &server.addr(7000));
    assert_whoami(&line, client, &server.addr(7000));
    wait_counter_at_least(&daemon, "connect_captured", c0 + 2);

    let ps = pod_status(&daemon, "client").unwrap();
    assert!(
        ps["connections_total"].as_u64().unwrap_or(0) >= 2,
        "the daemon should have proxied both connections: {ps}"
    );

    let metrics = eventually(SETTLE, || {
        let m = daemon.metrics()?;
        let total = prom_value(&m, "sockmesh_connections_total", &[("pod", "client")])
            .ok_or_else(|| anyhow!("no sockmesh_connections_total{{pod=\"client\"}}:\n{m}"))?;
        if total < 2.0 {
            bail!("sockmesh_connections_total{{pod=\"client\"}} = {total}");
        }
        Ok(m)
    })
    .unwrap();
    let kernel = prom_value(
        &metrics,
        "sockmesh_kernel_events_total",
        &[("reason", "connect_captured")],
    );
    assert!(
        kernel.is_some_and(|v| v >= 2.0),
        "sockmesh_kernel_events_total{{reason=\"connect_captured\"}} = {kernel:?}:\n{metrics}"
    );
    let up = prom_value(
        &metrics,
        "sockmesh_bytes_total",
        &[("pod", "client"), ("direction", "upstream")],
    );
    let down = prom_value(
        &metrics,
        "sockmesh_bytes_total",
        &[("pod", "client"), ("direction", "downstream")],
    );
    assert!(
        up.is_some_and(|v| v > 0.0) && down.is_some_and(|v| v > 0.0),
        "bytes_total upstream={up:?} downstream={down:?}:\n{metrics}"
    );
}

#[test]
fn a_long_lived_connection_shows_its_original_destination_in_status() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let echo = Server::peer(server, 9000, "echo").unwrap();
    daemon.enroll(client).unwrap();
    let c0 = counter(&daemon, "connect_captured");

    let (mut conn, _hello) = interactive(client, &server.addr(9000));
    echo_roundtrip(&mut conn, "first");
    let c = eventually(SETTLE, || {
        let conns = connections_of(&daemon, "client")?;
        match conns.as_slice() {
            [c] => Ok(c.clone()),
            other => bail!("expected one connection of pod client, got {other:?}"),
        }
    })
    .unwrap();
    assert_eq!(c["original_dst"], server.addr(9000), "{c}");
    let client_addr = c["client"].as_str().unwrap_or_default();
    assert!(
        client_addr.starts_with("127.0.0.1:") || client_addr.starts_with(&client.ip.to_string()),
        "status client should be the app's socket: {c}"
    );
    if let Some(up) = c["upstream_local"].as_str() {
        assert!(
            up.starts_with(&format!("{}:", client.ip)),
            "upstream must leave from the pod's IP: {c}"
        );
        // The server saw exactly that upstream socket.
        let accepted = echo.accepted();
        assert!(
            accepted.iter().any(|l| l.contains(&format!("peer={up} "))),
            "server accepted {accepted:?}, status upstream_local {up}"
        );
    }
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    // Bytes keep flowing and are counted.
    echo_roundtrip(&mut conn, "second");
    eventually(SETTLE, || {
        let conns = connections_of(&daemon, "client")?;
        let c = conns.first().ok_or_else(|| anyhow!("connection gone"))?;
        let (up, down) = (
            c["bytes_to_upstream"].as_u64().unwrap_or(0),
            c["bytes_to_client"].as_u64().unwrap_or(0),
        );
        // "first\n" + "second\n" = 13 bytes each way.
        if up >= 13 && down >= 13 {
            Ok(())
        } else {
            bail!("bytes_to_upstream={up} bytes_to_client={down}: {c}")
        }
    })
    .unwrap();

    conn.close_stdin();
    assert_eq!(conn.recv_line(LINE).unwrap(), "closed");
    eventually(SETTLE, || {
        let n = connections_of(&daemon, "client")?.len();
        let active = pod_status(&daemon, "client")?["connections_active"]
            .as_u64()
            .unwrap_or(u64::MAX);
        if n == 0 && active == 0 {
            Ok(())
        } else {
            bail!("{n} connections listed, connections_active={active} after close")
        }
    })
    .unwrap();
}

#[test]
fn config_listed_pods_are_captured_from_start() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).unwrap();
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _who = Server::peer(server, 7000, "whoami").unwrap();
    // Every setting of the file is honoured: here the worker count as well.
    let cfg = basic_config(&node, &format!("workers = 1\n{}", pods_toml(&[client])));
    let daemon = Daemon::start(&node, &cfg).unwrap();
    pod_status(&daemon, "client").unwrap();
    assert_eq!(daemon.status().unwrap()["workers"], 1);
    let c0 = counter(&daemon, "connect_captured");
    let line = whoami(client, &server.addr(7000));
    assert_whoami(&line, client, &server.addr(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
}

// ---------------------------------------------------------------------------------------------
// who is and is not captured

#[test]
fn a_pod_that_is_not_enrolled_is_never_captured() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["enrolled", "plain", "server"]);
    let (enrolled, plain, server) = (node.pod("enrolled"), node.pod("plain"), node.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();
    daemon.enroll(enrolled).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    let total0 = pod_status(&daemon, "enrolled").unwrap()["connections_total"]
        .as_u64()
        .unwrap_or(0);

    for _ in 0..3 {
        let line = whoami(plain, &server.addr(7000));
        assert_whoami(&line, plain, &server.addr(7000));
    }
    // The plain pod's connections reached the server directly...
    assert_eq!(who.accepted().len(), 3, "{}", who.stdout());
    // ...and the daemon neither captured nor proxied them.
    wait_counter_eq(&daemon, "connect_captured", c0);
    assert!(connections_of(&daemon, "plain").unwrap().is_empty());
    let st = daemon.status().unwrap();
    assert!(
        !st["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "plain"),
        "{st}"
    );
    assert_eq!(
        pod_status(&daemon, "enrolled").unwrap()["connections_total"]
            .as_u64()
            .unwrap_or(0),
        total0
    );
    // The enrolled pod on the same node still is captured (the test is not vacuous).
    let line = whoami(enrolled, &server.addr(7000));
    assert_whoami(&line, enrolled, &server.addr(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
}

#[test]
fn unenroll_stops_new_captures_but_open_connections_keep_working() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    let who = Server::peer(server, 7000, "whoami").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");

    let (mut conn, _) = interactive(app, &server.addr(9000));
    echo_roundtrip(&mut conn, "before-unenroll");
    eventually(SETTLE, || {
        ensure_eq("connections of app", connections_of(&daemon, "app")?.len(), 1)
    })
    .unwrap();
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    daemon.unenroll("app").unwrap();
    let st = daemon.status().unwrap();
    assert!(
        !st["pods"].as_array().unwrap().iter().any(|p| p["name"] == "app"),
        "app still listed after unenroll: {}",
        st["pods"]
    );

    // The connection opened through the daemon keeps working.
    for word in ["after-unenroll-1", "after-unenroll-2"] {
        echo_roundtrip(&mut conn, word);
    }

    // New connections go direct.
    let line = whoami(app, &server.addr(7000));
    assert_whoami(&line, app, &server.addr(7000));
    assert_eq!(who.accepted().len(), 1);
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    conn.close_stdin();
    assert_eq!(conn.recv_line(LINE).unwrap(), "closed");
}

#[test]
fn enrolling_a_running_pod_captures_its_new_connections_without_restart() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let _who = Server::peer(server, 7000, "whoami").unwrap();

    // An application already running in the pod: connects every 100 ms for at most 60 s.
    let code = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print("started", flush=True)
end = time.monotonic() + secs
while time.monotonic() < end:
    try:
        s = socket.create_connection((host, port), timeout=5)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        print("ok " + data.decode().strip(), flush=True)
    except OSError as e:
        print("err %r" % (e,), flush=True)
    time.sleep(0.1)
print("done", flush=True)
"#;
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg("-c")
        .arg(code)
        .args([&server.ip.to_string(), "7000", "60"]);
    let mut app_proc = LineChild::spawn(&app.cgroup, Some(&app.netns), cmd).unwrap();
    let pid = app_proc.child().pid();
    assert_eq!(app_proc.recv_line(LINE).unwrap(), "started");

    let mut lines = Vec::new();
    let next_ok = |c: &mut LineChild, lines: &mut Vec<String>| {
        let l = c.recv_line(LINE).unwrap();
        assert!(
            l.starts_with("ok "),
            "the running app saw a failure: {l} (earlier: {lines:?})"
        );
        assert_whoami(&l[3..], app, &server.addr(7000));
        lines.push(l);
    };
    for _ in 0..3 {
        next_ok(&mut app_proc, &mut lines);
    }
    let c0 = counter(&daemon, "connect_captured");
    next_ok(&mut app_proc, &mut lines);
    assert_eq!(
        counter(&daemon, "connect_captured"),
        c0,
        "not enrolled yet: nothing may be captured"
    );

    daemon.enroll(app).unwrap();
    let enrolled_at = Instant::now();
    // Its next connections are captured: watch the counter while the app keeps succeeding.
    loop {
        next_ok(&mut app_proc, &mut lines);
        if counter(&daemon, "connect_captured") >= c0 + 3 {
            break;
        }
        assert!(
            enrolled_at.elapsed() < SETTLE,
            "connect_captured stayed at {} (< {}) for {SETTLE:?} after enroll\nstatus: {}",
            counter(&daemon, "connect_captured"),
            c0 + 3,
            status_dump(&daemon)
        );
    }
    // Same process, never restarted.
    assert!(app_proc.child().try_wait().unwrap().is_none());
    assert_eq!(app_proc.child().pid(), pid);
    assert!(
        pod_status(&daemon, "app").unwrap()["connections_total"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    );
}

// ---------------------------------------------------------------------------------------------
// data integrity

#[test]
fn payloads_from_1_byte_to_64_mib_arrive_intact_over_100_concurrent_connections() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    daemon.enroll(client).unwrap();
    let c0 = counter(&daemon, "connect_captured");

    let started = Instant::now();
    let mut cmd = Command::new(PEER);
    cmd.args([
        "load",
        "--connect",
        &server.addr(9000),
        "--connections",
        "100",
        "--sizes",
        "1,1000,65536,1MiB,16MiB,64MiB",
        "--seconds-limit",
        "75",
    ]);
    let out = exec_in(&client.cgroup, Some(&client.netns), cmd, Duration::from_secs(90)).unwrap();
    let elapsed = started.elapsed();
    eprintln!(
        "peer load through sockmesh: {} in {elapsed:?}",
        out_str(&out).trim()
    );
    check_output("peer load through the daemon", &out).unwrap();
    let summary: Value = serde_json::from_str(out_str(&out).trim()).unwrap();
    assert_eq!(summary["ok"], 100, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    let cycle: u64 = 1 + 1000 + 65536 + (1 << 20) + (16 << 20) + (64 << 20);
    let expected = 16 * cycle + 1 + 1000 + 65536 + (1 << 20);
    assert_eq!(summary["bytes"].as_u64(), Some(expected), "{summary}");
    wait_counter_eq(&daemon, "connect_captured", c0 + 100);
    let m = daemon.metrics().unwrap();
    let up = prom_value(
        &m,
        "sockmesh_bytes_total",
        &[("pod", "client"), ("direction", "upstream")],
    )
    .unwrap_or(0.0);
    assert!(
        up >= expected as f64,
        "sockmesh_bytes_total upstream {up} < {expected} bytes sent"
    );
    if elapsed > Duration::from_secs(45) {
        eprintln!("WARNING: 100-connection load took {elapsed:?} through the daemon");
    }
}

/// Connections accepted per worker (`sockmesh_worker_connections_total{worker}`, workers 0, 1).
fn per_worker(daemon: &Daemon) -> Vec<f64> {
    let m = daemon.metrics().unwrap();
    assert_eq!(
        prom_value(&m, "sockmesh_worker_connections_total", &[("worker", "2")]),
        None,
        "only two workers"
    );
    ["0", "1"]
        .iter()
        .map(|w| prom_value(&m, "sockmesh_worker_connections_total", &[("worker", w)]).unwrap_or(0.0))
        .collect()
}

/// `conns` echo connections from `from` to `to:9000` at once, every payload back intact.
fn echo_load(from: &Pod, to: &Pod, conns: u64) {
    let mut cmd = Command::new(PEER);
    cmd.args([
        "load",
        "--connect",
        &to.addr(9000),
        "--connections",
        &conns.to_string(),
        "--sizes",
        "1,1000,65536",
        "--seconds-limit",
        "60",
    ]);
    let out = exec_in(&from.cgroup, Some(&from.netns), cmd, Duration::from_secs(75)).unwrap();
    check_output("peer load through the daemon", &out).unwrap();
    let summary: Value = serde_json::from_str(out_str(&out).trim()).unwrap();
    assert_eq!(summary["ok"], conns, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
}

/// The listener group of `addr` in a pod's status (`listener_groups`).
fn listener_group(daemon: &Daemon, pod: &str, addr: &str) -> Value {
    let p = pod_status(daemon, pod).unwrap();
    p["listener_groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["address"] == addr))
        .cloned()
        .unwrap_or_else(|| panic!("no listener group {addr} in {p}"))
}

#[test]
fn with_two_workers_each_has_its_own_listener_and_both_accept_outbound_and_inbound() {
    if !require_privileged() {
        return;
    }
    // client: enrolled outbound; server: inbound port 9000 (enrolled later); ext: not enrolled.
    let node = VirtualNode::new(&["client", "server", "ext"]).expect("virtual node");
    let (client, server, ext) = (node.pod("client"), node.pod("server"), node.pod("ext"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    let cfg = basic_config(&node, &format!("workers = 2\n{}", pods_toml(&[client])));
    let daemon = Daemon::start(&node, &cfg).expect("daemon start");
    let text = daemon.status_text().unwrap();
    assert!(text.contains("2 proxy workers"), "{text}");
    // An SO_REUSEPORT group per address: one listening socket per worker, as `ss` shows them
    // in the pod's netns (each worker accepts on its own, so a connection wakes one thread).
    let v4 = client.listening_sockets(15001).unwrap();
    assert_eq!(
        v4.iter().filter(|l| l.contains("127.0.0.1:15001")).count(),
        2,
        "{v4:?}"
    );
    assert!(v4.iter().all(|l| l.contains("sockmesh")), "{v4:?}");
    let g = listener_group(&daemon, "client", "127.0.0.1:15001");
    assert_eq!(
        (g["members"].as_u64(), g["reuseport"].as_bool()),
        (Some(2), Some(true)),
        "{g}"
    );
    assert!(text.contains("127.0.0.1:15001×2"), "{text}");

    // Outbound: many connections at once, each echoing its payload back intact, spread over
    // both workers (the kernel picks a member of the group).
    let conns = 300u64;
    let c0 = counter(&daemon, "connect_captured");
    let before = per_worker(&daemon);
    echo_load(client, server, conns);
    wait_counter_eq(&daemon, "connect_captured", c0 + conns);
    let out: Vec<f64> = per_worker(&daemon)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    eprintln!("outbound connections accepted per worker: {out:?}");
    assert!(
        out.iter().all(|n| *n > 0.0),
        "outbound, per worker: {out:?} (both workers should accept)"
    );
    assert!(
        out.iter().sum::<f64>() >= conns as f64,
        "outbound, per worker: {out:?}"
    );

    // Inbound: sk_lookup assigns member 0 of the server's inbound group (the socket in the
    // sockmap) and the kernel still picks within the group.
    enroll_inbound(&daemon, server, &[9000]).unwrap();
    let inb = server.listening_sockets(15006).unwrap();
    assert_eq!(
        inb.iter().filter(|l| l.contains("127.0.0.1:15006")).count(),
        2,
        "{inb:?}"
    );
    let assigned = counter(&daemon, "lookup_assigned");
    let before = per_worker(&daemon);
    echo_load(ext, server, conns);
    wait_counter_at_least(&daemon, "lookup_assigned", assigned + conns);
    let inbound: Vec<f64> = per_worker(&daemon)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    eprintln!("inbound connections accepted per worker: {inbound:?}");
    assert!(
        inbound.iter().all(|n| *n > 0.0),
        "inbound, per worker: {inbound:?} (both workers should accept)"
    );
    assert!(
        inbound.iter().sum::<f64>() >= conns as f64,
        "inbound, per worker: {inbound:?}"
    );
    let text = daemon.status_text().unwrap();
    assert!(text.contains("connections accepted per worker: w0 "), "{text}");
}

#[test]
fn with_listener_groups_off_every_worker_shares_one_socket() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("virtual node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    let cfg = basic_config(
        &node,
        &format!(
            "workers = 2\nreuseport_listeners = false\n{}",
            pods_toml(&[client])
        ),
    );
    let daemon = Daemon::start(&node, &cfg).expect("daemon start");
    let v4 = client.listening_sockets(15001).unwrap();
    assert_eq!(
        v4.iter().filter(|l| l.contains("127.0.0.1:15001")).count(),
        1,
        "{v4:?}"
    );
    let g = listener_group(&daemon, "client", "127.0.0.1:15001");
    assert_eq!(
        (g["members"].as_u64(), g["reuseport"].as_bool()),
        (Some(1), Some(false)),
        "{g}"
    );
    echo_load(client, server, 100);
}

// ---------------------------------------------------------------------------------------------
// what the application and third parties see

#[test]
fn getpeername_in_the_app_returns_the_original_destination() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    let g0 = counter(&daemon, "getpeername_rewritten");
    let code = r#"
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
peer = s.getpeername()
local = s.getsockname()
s.sendall(b"ping")
back = b""
while len(back) < 4:
    chunk = s.recv(4 - len(back))
    if not chunk:
        break
    back += chunk
s.close()
print(json.dumps({"peer": "%s:%d" % peer[:2], "local": "%s:%d" % local[:2], "echo": back.decode()}))
"#;
    let v = python_json(app, code, &[&server.ip.to_string(), "9000"]);
    assert_eq!(v["echo"], "ping", "{v}");
    assert_eq!(
        v["peer"],
        server.addr(9000),
        "getpeername() must show the original destination, not the proxy: {v}"
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    wait_counter_at_least(&daemon, "getpeername_rewritten", g0 + 1);
}

#[test]
fn ipv4_mapped_ipv6_connect_is_captured_and_arrives() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    let code = r#"
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(("::ffff:" + sys.argv[1], int(sys.argv[2])))
peer = s.getpeername()
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
s.close()
print(json.dumps({"reply": data.decode().strip(), "peer": "[%s]:%d" % peer[:2]}))
"#;
    let v = python_json(app, code, &[&server.ip.to_string(), "7000"]);
    let reply = v["reply"].as_str().unwrap_or_default();
    assert_whoami(reply, app, &server.addr(7000));
    assert_eq!(who.accepted().len(), 1);
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    let total = pod_status(&daemon, "app").unwrap()["connections_total"]
        .as_u64()
        .unwrap_or(0);
    assert!(total >= 1, "the v4-mapped connection was not proxied");
}

#[test]
fn a_third_party_proxy_reads_the_original_destination_with_so_original_dst() {
    if !require_privileged() {
        return;
    }
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let _http = Server::http(server, 8080).unwrap();

    // The proxy lives in the app's netns (it must own 127.0.0.1:15001 there) but in its own
    // cgroup inside the attach point: in the pod's cgroup its own connections would be captured.
    let proxy_cg = node.create_cgroup("third-party-proxy").unwrap();
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(peers_dir().join("orig_dst_proxy.py"))
        .args(["--count", "1", "--timeout", "60"]);
    let proxy = Server::start(&proxy_cg, Some(&app.netns), cmd).unwrap();

    daemon.enroll_with(app, true).unwrap();
    let ps = pod_status(&daemon, "app").unwrap();
    assert_eq!(ps["external_proxy"], true, "{ps}");
    assert!(
        ps["listeners"].as_array().is_none_or(|l| l.is_empty()),
        "with external_proxy the daemon must not open listeners: {ps}"
    );
    let g0 = counter(&daemon, "getsockopt_answered");
    let c0 = counter(&daemon, "connect_captured");

    let line = whoami(app, &server.addr(8080));
    let v: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("expected the proxy's JSON, got {line:?} ({e})"));
    assert_eq!(
        v["original_dst"],
        server.addr(8080),
        "SO_ORIGINAL_DST seen by the proxy: {v}\nproxy stdout: {}",
        proxy.stdout()
    );
    assert_eq!(v["original_dst_family"], 2, "{v}");
    assert_eq!(v["so_type"], 1, "{v}");
    assert!(v["tcp_info_len"].as_u64().unwrap_or(0) > 100, "{v}");
    assert!(
        v["peer"].as_str().unwrap_or_default().starts_with("127.0.0.1:"),
        "{v}"
    );
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);
    wait_counter_at_least(&daemon, "getsockopt_answered", g0 + 1);
}

fn probe(pod: &Pod, addr: &str) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(peers_dir().join("sockopt_probe.py"))
        .args(["--connect", addr]);
    let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(60)).unwrap();
    check_output("sockopt_probe.py", &out).unwrap();
    serde_json::from_str(out_str(&out).trim())
        .unwrap_or_else(|e| panic!("sockopt_probe printed non-JSON ({e}): {}", out_str(&out)))
}

#[test]
fn the_getsockopt_hook_leaves_options_it_does_not_own_untouched() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["plain", "app", "server"]).unwrap();
    let (plain, app, server) = (node.pod("plain"), node.pod("app"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").unwrap();

    let before_plain = probe(plain, &server.addr(9000));
    let before_app = probe(app, &server.addr(9000));
    assert!(
        attached_programs(node.cgroup_root()).unwrap().is_empty(),
        "nothing may be attached before the daemon starts"
    );

    let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
    daemon.enroll(app).unwrap();
    let progs = attached_programs(node.cgroup_root()).unwrap();
    eprintln!("attached with the daemon running: {progs:#?}");
    assert!(
        progs.iter().any(|p| p.contains("getsockopt")),
        "expected a cgroup getsockopt program on {}: {progs:?}",
        node.cgroup_root().display()
    );

    let after_plain = probe(plain, &server.addr(9000));
    assert_eq!(
        before_plain["options"], after_plain["options"],
        "a non-captured socket must see identical getsockopt results with the hook attached"
    );

    // A captured socket: every option but SO_ORIGINAL_DST must be unchanged too.
    let after_app = probe(app, &server.addr(9000));
    for k in ["tcp_info_104", "tcp_info_8192", "tcp_congestion_5000", "so_type"] {
        assert_eq!(
            before_app["options"][k], after_app["options"][k],
            "{k}: before {before_app} after {after_app}"
        );
    }
    assert!(connections_of(&daemon, "app").is_ok(), "status must keep working");
}

#[test]
fn the_daemon_s_own_upstream_connections_are_never_captured_again() {
    if !require_privileged() {
        return;
    }
    const N: usize = 20;
    let (node, daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let echo = Server::peer(server, 9000, "echo").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");

    // Hold N connections open so status shows them all at once.
    let code = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        print("bad echo", flush=True)
        sys.exit(1)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
for s in socks:
    s.close()
print("closed", flush=True)
"#;
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg("-c")
        .arg(code)
        .args([&server.ip.to_string(), "9000", &N.to_string()]);
    let mut holder = LineChild::spawn(&app.cgroup, Some(&app.netns), cmd).unwrap();
    assert_eq!(holder.recv_line(Duration::from_secs(30)).unwrap(), "ready");

    let conns = eventually(SETTLE, || {
        let c = connections_of(&daemon, "app")?;
        ensure_eq("connections listed for app", c.len(), N)?;
        Ok(c)
    })
    .unwrap();
    wait_counter_eq(&daemon, "connect_captured", c0 + N as u64);
    eventually(SETTLE, || ensure_eq("server accepts", echo.accepted().len(), N)).unwrap();
    for a in echo.accepted() {
        assert!(
            a.contains(&format!("peer={}:", app.ip)),
            "server accepted {a}: not from the pod IP"
        );
    }
    let upstream_locals: HashSet<String> = conns
        .iter()
        .filter_map(|c| c["upstream_local"].as_str().map(str::to_owned))
        .collect();
    let all = daemon.status().unwrap()["connections"].clone();
    for c in all.as_array().unwrap() {
        assert_eq!(c["original_dst"], server.addr(9000), "{c}");
        let client = c["client"].as_str().unwrap_or_default();
        assert!(
            !upstream_locals.contains(client),
            "a connection whose client is the daemon's own upstream socket was captured: {c}"
        );
        assert_eq!(c["pod"], "app", "{c}");
    }
    holder.close_stdin();
    assert_eq!(holder.recv_line(LINE).unwrap(), "closed");
    eventually(SETTLE, || {
        ensure_eq(
            "connections after close",
            connections_of(&daemon, "app")?.len(),
            0,
        )
    })
    .unwrap();
    // Still exactly N: nothing was captured late either.
    assert_eq!(counter(&daemon, "connect_captured"), c0 + N as u64);
    assert_eq!(echo.accepted().len(), N);
}

// ---------------------------------------------------------------------------------------------
// configuration and failure

fn run_with_config(node: &VirtualNode, config: &str) -> std::process::Output {
    let dir = TempDir::new("badconfig").unwrap();
    let path = dir.join("sockmesh.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(sockmesh_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_tcp_port().unwrap()));
    exec_in(node.daemon_cgroup(), None, cmd, Duration::from_secs(20))
        .expect("sockmesh run with an invalid config must exit, not keep running")
}

#[test]
fn an_invalid_config_exits_64_naming_the_field_and_attaches_nothing() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).unwrap();
    let (a, b) = (node.pod("a"), node.pod("b"));
    // A cgroup outside this node's cgroup_root that is still test-owned (another node's pod), so
    // even a daemon that wrongly accepted it could not touch anything but test state.
    let other = VirtualNode::new(&["elsewhere"]).unwrap();
    let outside = other.pod("elsewhere").cgroup.clone();
    let cases: Vec<(&str, String)> = vec![
        ("outbound_port", basic_config(&node, "outbound_port = 0\n")),
        (
            "pods[1].netns",
            basic_config(
                &node,
                &format!(
                    "{}\n[[pods]]\nname = \"ghost\"\nnetns = \"/run/netns/{}-does-not-exist\"\ncgroup = {}\n",
                    pods_toml(&[a]),
                    node.prefix(),
                    toml_str(&b.cgroup.to_string_lossy())
                ),
            ),
        ),
        (
            "pods[0].cgroup",
            basic_config(
                &node,
                &format!(
                    "\n[[pods]]\nname = \"escape\"\nnetns = {}\ncgroup = {}\n",
                    toml_str(&a.netns.to_string_lossy()),
                    toml_str(&outside.to_string_lossy())
                ),
            ),
        ),
        (
            "bypass.ports",
            basic_config(&node, "\n[bypass]\nports = [22, 70000]\n"),
        ),
        ("cgroup_root", "outbound_port = 15001\n".to_owned()),
        ("no_such_option", basic_config(&node, "no_such_option = 1\n")),
        ("workers", basic_config(&node, "workers = 0\n")),
    ];
    let mut failures = Vec::new();
    for (field, config) in &cases {
        let out = run_with_config(&node, config);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let text = format!("{stderr}{}", out_str(&out));
        if out.status.code() != Some(64) {
            failures.push(format!(
                "{field}: expected exit 64, got {} ({text})",
                status_text(out.status)
            ));
        } else if !text.contains(field) {
            failures.push(format!("{field}: message does not name the field: {text}"));
        }
        for root in [node.cgroup_root(), other.cgroup_root()] {
            let progs = attached_programs(root).unwrap();
            if !progs.is_empty() {
                failures.push(format!("{field}: programs left attached: {progs:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "invalid configs:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn if_the_daemon_dies_pods_connect_directly_and_a_successor_resumes_capture() {
    if !require_privileged() {
        return;
    }
    let (node, mut daemon) = start(&["app", "server"]);
    let (app, server) = (node.pod("app"), node.pod("server"));
    let who = Server::peer(server, 7000, "whoami").unwrap();
    daemon.enroll(app).unwrap();
    let c0 = counter(&daemon, "connect_captured");
    assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    wait_counter_eq(&daemon, "connect_captured", c0 + 1);

    daemon.kill().unwrap();
    let left = attached_programs(node.cgroup_root()).unwrap_or_default();
    eprintln!("attached after SIGKILL of the daemon: {left:?}");
    // Fail safe: with no listener alive the hooks must let connects go straight through.
    for _ in 0..3 {
        assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    }
    assert_eq!(who.accepted().len(), 4);

    // A successor on the same pinned state re-adopts the links and the enrolment: capture
    // resumes for the pod without enrolling it again.
    let state = daemon.hand_over_state().unwrap();
    let successor =
        Daemon::start_with_state(node.daemon_cgroup(), &basic_config(&node, ""), Some(state)).unwrap();
    eventually(SETTLE, || pod_status(&successor, "app")).unwrap_or_else(|e| {
        panic!(
            "the successor did not restore the enrolment: {e:#}\n{}",
            status_dump(&successor)
        )
    });
    let c1 = counter(&successor, "connect_captured");
    assert_whoami(&whoami(app, &server.addr(7000)), app, &server.addr(7000));
    wait_counter_eq(&successor, "connect_captured", c1 + 1);
    assert_eq!(who.accepted().len(), 5);
}
