//! The daemon's life cycle as a platform team meets it: it crashes under load (`kill -9`), it
//! restarts and re-adopts pinned state without re-enrolment, it stops keeping its state for a
//! successor, and `sockmesh uninstall` leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sockmesh_tests::daemon::{basic_config, pods_toml};
use sockmesh_tests::process::{check_output, exec_in, run_host};
use sockmesh_tests::{
    attached_programs, eventually, python, require_privileged, sockmesh_bin, Daemon, Pod, Server, VirtualNode,
};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

/// Connects, sends a line, reads the echo, closes: one request per connection, as fast as it
/// can for `secs`. Prints one JSON record per failure (with its time) and a summary.
const CONNECT_LOOP: &str = r#"
import socket, sys, json, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok, fails, t0 = 0, [], time.time()
while time.time() - t0 < secs:
    t = time.time() - t0
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = s.recv(64)
            if not b:
                break
            got += b
        s.close()
        if got == b"ping\n":
            ok += 1
        else:
            fails.append({"t": t, "error": "short echo %r" % got})
    except OSError as e:
        fails.append({"t": t, "error": str(e)})
print(json.dumps({"ok": ok, "fails": fails, "secs": time.time() - t0}))
"#;

fn one_request(pod: &Pod, server: &Pod) -> bool {
    let mut cmd = Command::new(PEER);
    cmd.args(["get", "--connect", &server.addr(7000), "--seconds-limit", "10"]);
    let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(20)).expect("peer get");
    out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with(&format!("peer={}:", pod.ip))
}

/// Program ids `bpftool` shows attached anywhere under `root`.
fn attached_ids(root: &std::path::Path) -> Vec<String> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "cgroup", "tree"]).arg(root);
    let out = run_host(cmd, Duration::from_secs(30)).expect("bpftool cgroup tree");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut ids = Vec::new();
    for cg in v.as_array().into_iter().flatten() {
        for p in cg["programs"].as_array().into_iter().flatten() {
            ids.push(p["id"].to_string());
        }
    }
    ids
}

fn prog_exists(id: &str) -> bool {
    let mut cmd = Command::new("bpftool");
    cmd.args(["prog", "show", "id", id]);
    run_host(cmd, Duration::from_secs(30))
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn after_kill_9_new_connections_go_direct_and_only_in_flight_ones_are_lost() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _echo = Server::peer(server, 9000, "echo").expect("echo server");
    let mut daemon = Daemon::start(&node, &basic_config(&node, &pods_toml(&[client]))).expect("daemon");
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(CONNECT_LOOP)
        .args([&server.ip.to_string(), "9000", "6"]);
    let load = std::thread::spawn({
        let (cg, ns) = (client.cgroup.clone(), client.netns.clone());
        move || exec_in(&cg, Some(&ns), cmd, Duration::from_secs(60))
    });
    // Let the load run through the daemon, then kill it.
    let captured = eventually(Duration::from_secs(10), || {
        let n = daemon.counter("connect_captured")?;
        anyhow::ensure!(n >= 50, "only {n} captured so far");
        Ok(n)
    })
    .expect("load is captured");
    let kill_at = std::time::Instant::now();
    daemon.kill().expect("kill -9");
    let out = load.join().unwrap().expect("load loop");
    check_output("connect loop", &out).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("loop JSON");
    let fails = v["fails"].as_array().cloned().unwrap_or_default();
    eprintln!(
        "{} connections succeeded, {} failed; {captured} captured before the kill at ~{:?}: {fails:?}",
        v["ok"],
        fails.len(),
        kill_at
    );
    // The only casualties are the connections inside the daemon when it died: the client is
    // sequential, so at most one is in flight (two if the kill lands between accept and relay).
    assert!(fails.len() <= 2, "failed connections after kill -9: {fails:?}");
    assert!(
        v["ok"].as_u64().unwrap_or(0) > captured,
        "the load kept going after the kill: {v}"
    );
    // And after the kill, connects go direct: the server sees the client pod itself.
    assert!(one_request(client, server) || one_request_echo(client, server));
}

/// A direct echo round trip (the whoami server is not running in this test).
fn one_request_echo(client: &Pod, server: &Pod) -> bool {
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(CONNECT_LOOP)
        .args([&server.ip.to_string(), "9000", "0.3"]);
    let out = exec_in(&client.cgroup, Some(&client.netns), cmd, Duration::from_secs(30)).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["ok"].as_u64().unwrap_or(0) > 0 && v["fails"].as_array().map(Vec::is_empty).unwrap_or(false)
}

#[test]
fn a_restarted_daemon_re_adopts_pinned_state_and_enrolment_without_duplicates() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _whoami = Server::peer(server, 7000, "whoami").expect("whoami server");
    // Enrolled at runtime, not in the config: only the state file knows about it.
    let cfg = basic_config(&node, "");
    let mut first = Daemon::start(&node, &cfg).expect("first daemon");
    first.enroll(client).expect("enroll");
    assert!(one_request(client, server));
    assert_eq!(first.counter("connect_captured").unwrap(), 1);
    let ids_before = attached_ids(node.cgroup_root());
    assert_eq!(ids_before.len(), 6, "six cgroup hooks: {ids_before:?}");
    first.kill().expect("kill -9");
    let state = first.hand_over_state().expect("hand over");
    assert!(
        std::fs::read_dir(state.0.join("links"))
            // Not counting the colour tracepoints' links (present on 6.3+ kernels).
            .map(|d| d
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().ends_with("_colour"))
                .count())
            .unwrap_or(0)
            == 6,
        "the cgroup links stay pinned after kill -9"
    );
    // While no daemon runs: direct, and the hooks count why.
    assert!(one_request(client, server), "direct while the daemon is down");
    let second = Daemon::start_with_state(node.daemon_cgroup(), &cfg, Some(state)).expect("second daemon");
    let st = second.status().unwrap();
    let pods: Vec<&str> = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        pods,
        vec![client.name.as_str()],
        "enrolment survived the restart: {st}"
    );
    assert!(
        second.counter("connect_no_listener").unwrap() >= 1,
        "the pinned counters saw the direct connect while the daemon was down"
    );
    let ids_after = attached_ids(node.cgroup_root());
    assert_eq!(
        ids_before, ids_after,
        "the same programs stay attached: no detach, no duplicates"
    );
    assert!(one_request(client, server));
    eventually(Duration::from_secs(5), || {
        let n = second.counter("connect_captured")?;
        anyhow::ensure!(n == 2, "connect_captured = {n}, want 2 (one before, one after)");
        Ok(())
    })
    .unwrap();
    drop(first);
}

#[test]
fn stop_keep_state_hands_over_and_plain_stop_removes_everything() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _whoami = Server::peer(server, 7000, "whoami").expect("whoami server");
    let cfg = basic_config(&node, &pods_toml(&[client]));
    let mut first = Daemon::start(&node, &cfg).expect("first daemon");
    let state = first.stop_keep_state().expect("sockmesh stop --keep-state");
    assert_eq!(
        attached_ids(node.cgroup_root()).len(),
        6,
        "hooks stay attached for the successor"
    );
    let pin_dir = state.0.clone();
    let mut second =
        Daemon::start_with_state(node.daemon_cgroup(), &cfg, Some(state)).expect("second daemon");
    assert!(one_request(client, server));
    assert_eq!(second.counter("connect_captured").unwrap(), 1);
    // A plain stop (SIGTERM) detaches and unpins everything.
    let st = second.stop().expect("exit status");
    assert!(st.success(), "daemon exit {st:?}");
    assert!(!pin_dir.exists(), "{} removed", pin_dir.display());
    assert!(
        attached_programs(node.cgroup_root()).unwrap().is_empty(),
        "no hook attached"
    );
    drop(first);
}

#[test]
fn uninstall_stops_the_daemon_and_leaves_no_program_map_pin_or_listener() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _whoami = Server::peer(server, 7000, "whoami").expect("whoami server");
    let daemon = Daemon::start(&node, &basic_config(&node, &pods_toml(&[client]))).expect("daemon");
    assert!(one_request(client, server));
    let ids = attached_ids(node.cgroup_root());
    assert_eq!(ids.len(), 6, "{ids:?}");
    let out = Command::new(sockmesh_bin())
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(daemon.pin_dir())
        .arg("--state-file")
        .arg(daemon.state_file())
        .arg("--admin-socket")
        .arg(daemon.admin_socket())
        .output()
        .expect("sockmesh uninstall");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(daemon.status().is_err(), "the daemon was stopped");
    assert!(!daemon.pin_dir().exists(), "no pin left");
    assert!(!daemon.state_file().exists(), "no state file left");
    assert!(
        attached_programs(node.cgroup_root()).unwrap().is_empty(),
        "no cgroup attachment left"
    );
    for id in &ids {
        assert!(!prog_exists(id), "program {id} is still loaded");
    }
    // No listener remains in the pod, and the pod connects directly.
    let mut ss = Command::new("ss");
    ss.args(["-Hltn", "sport = :15001"]);
    let out = exec_in(&client.cgroup, Some(&client.netns), ss, Duration::from_secs(10)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "listener left: {out:?}"
    );
    assert!(one_request(client, server));
}
