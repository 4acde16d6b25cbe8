//! `sockmesh upgrade --binary PATH` under constant-rate HTTP/1.1 keep-alive load (issue 13,
//! stage 1): chained upgrades lose no request, the old generation exits, the kernel side stays
//! attached and pinned, status shows the generation and the counters continue; successors that
//! fail (exit at once, wrong hand-off protocol, die holding the offered descriptors) leave the
//! running generation serving and its rendezvous usable for a later good upgrade.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sockmesh_tests::daemon::prom_value;
use sockmesh_tests::upgrade::{
    client_counter, failed_upgrade, fake_successor, grpc_python, grpc_server, p99_in, pinned_links, setup,
    unix_now, Load, DRAIN, GRPC_PORT, PORT, VIP,
};
use sockmesh_tests::{
    attached_programs, peers_dir, python, require_privileged, sockmesh_bin, LineChild, Server, TempDir,
};

fn upgrades() -> usize {
    std::env::var("SOCKMESH_TEST_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[test]
fn chained_upgrades_under_keep_alive_load_lose_no_request() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut d) = setup();
    let n = upgrades();
    let programs = attached_programs(node.cgroup_root()).expect("bpftool");
    let links = pinned_links(&d);
    assert!(
        !programs.is_empty() && !links.is_empty(),
        "{programs:?} {links:?}"
    );
    let first_pid = d.pid();
    // 8 connections × 25 requests/s.
    let load = Load::start(node.pod("client"), 8, 25, Duration::from_secs(60 + 15 * n as u64));
    std::thread::sleep(Duration::from_secs(3));
    let steady_until = unix_now();
    let mut windows = Vec::new();
    let mut totals = vec![client_counter(&d, "connections_total")];
    for i in 0..n {
        let t0 = Instant::now();
        let from = unix_now();
        let old = d
            .upgrade(&sockmesh_bin(), DRAIN)
            .unwrap_or_else(|e| panic!("upgrade {}: {e:#}", i + 1));
        let took = t0.elapsed();
        windows.push((from, unix_now(), took));
        let st = d.status().expect("status");
        assert_eq!(
            st["generation"],
            (i + 2) as u64,
            "upgrade {}: {}",
            i + 1,
            st["upgrade"]
        );
        assert_ne!(d.pid(), old);
        assert_eq!(
            d.rendezvous_sockets().len(),
            1,
            "one rendezvous after upgrade {}: {:?}",
            i + 1,
            d.rendezvous_sockets()
        );
        let total = client_counter(&d, "connections_total");
        assert!(
            total >= *totals.last().unwrap(),
            "counters reset at upgrade {}: {totals:?} then {total}",
            i + 1
        );
        totals.push(total);
        eprintln!(
            "upgrade {}: pid {old} -> {} in {took:?}, connections_total {total}, {} live connections moved",
            i + 1,
            d.pid(),
            st["upgrade"]["moved"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    let summary = load.finish();
    eprintln!(
        "load: {}",
        serde_json::to_string(&{
            let mut s = summary.clone();
            s["seconds"] = Value::Null;
            s
        })
        .unwrap()
    );
    let (steady_p99, steady_n) = p99_in(&summary, 0, steady_until);
    for (i, (from, to, took)) in windows.iter().enumerate() {
        let (p99, reqs) = p99_in(&summary, *from, *to + 1);
        eprintln!(
            "upgrade {}: {took:?}, {reqs} requests in its window, window p99 {p99:.1} ms (steady {steady_p99:.1} ms over {steady_n})",
            i + 1
        );
    }
    assert_eq!(summary["failed"], 0, "failed requests: {}", summary["errors"]);
    assert!(summary["ok"].as_u64().unwrap() > 1000, "{summary}");
    // Live connections were moved between requests, not closed and re-established.
    assert_eq!(summary["connects"], 8, "the client had to reconnect: {summary}");
    // The last generation serves; the first is long gone; the kernel side never moved.
    assert_ne!(d.pid(), first_pid);
    assert_eq!(attached_programs(node.cgroup_root()).expect("bpftool"), programs);
    assert_eq!(pinned_links(&d), links);
    let st = d.status().expect("status");
    assert_eq!(st["generation"], (n + 1) as u64);
    assert_eq!(st["upgrade"]["in_progress"], false, "{}", st["upgrade"]);
    assert!(d
        .status_text()
        .expect("status text")
        .contains(&format!("generation {}", n + 1)));
    // Counters continued across every generation: each connection the client opened was
    // counted once by whichever generation accepted it.
    let connects = summary["connects"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        client_counter(&d, "connections_total"),
        connects,
        "proxied connections counted across generations vs the client's connects"
    );
    // The metrics endpoint (the same socket, served by the last generation) agrees.
    let metrics = d.metrics().expect("metrics");
    assert_eq!(
        prom_value(&metrics, "sockmesh_connections_total", &[("pod", "client")]),
        Some(connects as f64),
        "{metrics}"
    );
    // Per-route request counters continued too: every request the client got an answer to was
    // counted by the generation that served it (a reset would leave only the last one's).
    let route = [("service", "echo"), ("route", "default"), ("subset", "v1")];
    let requests = prom_value(&metrics, "sockmesh_requests_total", &route).unwrap_or(0.0);
    let ok = summary["ok"].as_u64().unwrap() as f64;
    eprintln!("sockmesh_requests_total {requests} after {n} upgrades; {ok} requests answered");
    assert!(
        requests >= ok,
        "sockmesh_requests_total {requests} < {ok} requests answered across the upgrades"
    );
    drop(d);
}

#[test]
fn failing_successors_leave_the_daemon_serving_and_a_later_upgrade_works() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut d) = setup();
    let dir = TempDir::new("fakes").expect("temp dir");
    let pid = d.pid();
    let rendezvous = d.rendezvous_sockets();
    assert_eq!(rendezvous.len(), 1, "{rendezvous:?}");
    let load = Load::start(node.pod("client"), 4, 25, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));

    let e = failed_upgrade(&d, &fake_successor(&dir, "exit"), "exited");
    eprintln!("exit: {e}");
    let e = failed_upgrade(&d, &fake_successor(&dir, "wrong-version"), "protocol 99");
    eprintln!("wrong version: {e}");
    let e = failed_upgrade(&d, &fake_successor(&dir, "vanish"), "ready");
    eprintln!("vanish: {e}");
    let e = failed_upgrade(&d, &fake_successor(&dir, "die-after-commit"), "started");
    eprintln!("dies after commit: {e}");
    let e = failed_upgrade(&d, Path::new("/nonexistent/sockmesh"), "nonexistent");
    eprintln!("missing binary: {e}");
    let plain = dir.join("not-a-binary");
    std::fs::write(&plain, "hello").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = failed_upgrade(&d, &plain, "not an executable");
    eprintln!("not executable: {e}");

    // The same daemon serves, untouched, with its rendezvous in place.
    assert_eq!(d.pid(), pid);
    assert_eq!(d.rendezvous_sockets(), rendezvous);
    let st = d.status().expect("status");
    assert_eq!(st["generation"], 1);
    assert_eq!(st["upgrade"]["phase"], "idle");
    assert_eq!(st["upgrade"]["failed"], 4, "{}", st["upgrade"]);
    assert_eq!(st["upgrade"]["refused"], 1, "{}", st["upgrade"]);
    assert!(d.status_text().unwrap().contains("4 failed upgrade(s)"));

    // A good upgrade still works through the same rendezvous.
    d.upgrade(&sockmesh_bin(), DRAIN).expect("upgrade after failures");
    let st = d.status().expect("status");
    assert_eq!(st["generation"], 2);
    assert_eq!(d.rendezvous_sockets().len(), 1, "{:?}", d.rendezvous_sockets());
    std::thread::sleep(Duration::from_secs(1));
    let summary = load.finish();
    eprintln!(
        "load: connects {} ok {} failed {} p99 {} ms",
        summary["connects"], summary["ok"], summary["failed"], summary["p99_ms"]
    );
    assert_eq!(summary["failed"], 0, "failed requests: {}", summary["errors"]);
    assert!(
        !d.log().contains("panicked"),
        "a generation panicked:\n{}",
        d.log()
    );
}

#[test]
fn a_request_half_sent_across_an_upgrade_is_answered_on_the_same_connection() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut d) = setup();
    let client = node.pod("client");
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(peers_dir().join("upgrade_load.py"))
        .args(["slow", "--url", &format!("{VIP}:{PORT}")]);
    let mut slow = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("slow client");
    let line = slow.recv_line(Duration::from_secs(20)).expect("partial");
    assert!(line.starts_with("partial "), "{line}");
    // The old generation read the first half of the head: those bytes move with the socket.
    d.upgrade(&sockmesh_bin(), DRAIN).expect("upgrade");
    let st = d.status().expect("status");
    assert_eq!(st["generation"], 2);
    assert_eq!(st["upgrade"]["moved"], 1, "{}", st["upgrade"]);
    assert_eq!(
        st["upgrade"]["moved_read_bytes"],
        "GET /?id=slow-2 HTTP/1.1\r\nHo".len(),
        "the half head the old generation had read moved with the socket: {}",
        st["upgrade"]
    );
    slow.send_line("go").expect("go");
    let out: Value =
        serde_json::from_str(&slow.recv_line(Duration::from_secs(20)).expect("result")).expect("json");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["port_before"], out["port_after"], "{out}");
    assert_eq!(
        client_counter(&d, "connections_total"),
        1,
        "one connection, moved"
    );
}

#[test]
fn grpc_calls_across_an_upgrade_drain_with_goaway_and_none_fails() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut d) = setup();
    let _grpc = grpc_server(node.pod("srv"));
    // One channel (one HTTP/2 connection to the proxy), 4 calls in flight, long enough to span
    // the upgrade: the old generation sends GOAWAY, the channel reconnects to the new one.
    let client = node.pod("client");
    let mut cmd = Command::new(grpc_python());
    cmd.arg("-u").arg(peers_dir().join("grpc_peer.py")).args([
        "call",
        "--target",
        &format!("{VIP}:{GRPC_PORT}"),
        "--requests",
        "8000",
        "--concurrency",
        "4",
        "--seconds-limit",
        "60",
    ]);
    let mut calls = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("grpc client");
    // Upgrade once the calls run (the channel's connection is in the old generation).
    sockmesh_tests::eventually(Duration::from_secs(20), || {
        anyhow::ensure!(client_counter(&d, "connections_active") >= 1, "no call yet");
        Ok(())
    })
    .expect("grpc calls started");
    d.upgrade(&sockmesh_bin(), DRAIN).expect("upgrade");
    assert_eq!(d.status().expect("status")["generation"], 2);
    let line = calls.recv_line(Duration::from_secs(90)).expect("grpc summary");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    eprintln!("grpc across the upgrade: {v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["answered"], 8000, "{v}");
    // The calls really spanned the upgrade: the new generation proxied some of them.
    let st = d.status().expect("status");
    assert!(
        client_counter(&d, "connections_total") >= 2,
        "one connection per generation: {}",
        st["pods"]
    );
}

#[test]
fn an_opaque_tcp_connection_moves_as_a_pair_after_the_deadline_and_keeps_its_bytes() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut d) = setup();
    let srv = node.pod("srv");
    let _echo = Server::peer(srv, 9001, "echo").expect("echo server");
    // No service for this address: the proxy relays it byte for byte (opaque TCP).
    let client = node.pod("client");
    let mut cmd = sockmesh_tests::peer_command();
    cmd.args([
        "interactive",
        "--connect",
        &srv.addr(9001),
        "--seconds-limit",
        "60",
    ]);
    let mut conn = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("client");
    let hello = conn.recv_line(Duration::from_secs(20)).expect("connected");
    assert!(hello.starts_with("connected "), "{hello}");
    let echo = |line: &str, conn: &mut LineChild| {
        conn.send_line(line).expect("send");
        let back = conn.recv_line(Duration::from_secs(10)).expect("echo");
        assert_eq!(back, format!("echo {line}"));
    };
    echo("before the upgrade", &mut conn);
    let t0 = Instant::now();
    d.upgrade(&sockmesh_bin(), DRAIN).expect("upgrade");
    let took = t0.elapsed();
    let st = d.status().expect("status");
    assert_eq!(st["upgrade"]["moved_opaque"], 1, "{}", st["upgrade"]);
    // The old generation exited because the pair moved, not because its drain deadline passed.
    assert!(
        took < DRAIN,
        "the upgrade waited for the drain deadline: {took:?}"
    );
    echo("after the upgrade, same connection", &mut conn);
    for i in 0..50 {
        echo(&format!("line {i}"), &mut conn);
    }
    // Half-close through the new generation: the server's EOF comes back.
    conn.close_stdin();
    assert_eq!(conn.recv_line(Duration::from_secs(10)).expect("closed"), "closed");
    eprintln!("opaque TCP moved; upgrade took {took:?}");
}

#[test]
fn streams_in_flight_move_with_their_buffered_bytes_and_arrive_intact() {
    if !require_privileged() {
        return;
    }
    // (Not run with `[acceleration] enabled = true`: `peer load` reads with blocking sockets,
    // which get EAGAIN from the sockmap receive path on this kernel, upgrade or not; and with
    // acceleration on, connections are not moved at all, see docs/upgrade.md.)
    let (node, _server, mut d) = setup();
    let srv = node.pod("srv");
    let _echo = Server::peer(srv, 9001, "echo").expect("echo server");
    // 4 connections each streaming 1 GiB through the proxy to the echo server and verifying
    // every byte that comes back: the move happens mid-stream, with bytes in the relay's buffers.
    let client = node.pod("client");
    let mut cmd = sockmesh_tests::peer_command();
    cmd.args([
        "load",
        "--connect",
        &srv.addr(9001),
        "--connections",
        "4",
        "--sizes",
        "1024MiB",
        "--seconds-limit",
        "120",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let load = sockmesh_tests::spawn_in(&client.cgroup, Some(&client.netns), cmd).expect("load");
    sockmesh_tests::eventually(Duration::from_secs(20), || {
        anyhow::ensure!(client_counter(&d, "connections_active") >= 4, "not streaming yet");
        Ok(())
    })
    .expect("streams started");
    d.upgrade(&sockmesh_bin(), DRAIN).expect("upgrade");
    let st = d.status().expect("status");
    let out = load.wait_output(Duration::from_secs(150)).expect("load output");
    let v = sockmesh_tests::last_json("peer load", &out);
    eprintln!("streams across the upgrade: {v}; upgrade {}", st["upgrade"]);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["ok"], 4, "{v}");
    assert_eq!(
        st["upgrade"]["moved_opaque"], 4,
        "the streams moved (not waited out): {}",
        st["upgrade"]
    );
}
