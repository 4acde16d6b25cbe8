//! The daemon and its descriptor limit: it raises its open-files soft limit to the hard limit at
//! start and shows it in status; when `accept()` fails for lack of descriptors it counts that under
//! its own reason (`accept_no_descriptors`, not `accept_failed`), says so in the log once per
//! interval, and serves the waiting connections once descriptors are free again.

use std::process::Command;
use std::time::Duration;

use sockmesh_tests::daemon::{basic_config, pods_toml};
use sockmesh_tests::process::{check_output, exec_in, pod_exec};
use sockmesh_tests::util::ensure_eq;
use sockmesh_tests::{eventually, peer_bin, python, require_privileged, Daemon, Server, VirtualNode};

/// Opens N connections to ADDR, holds them for S seconds, closes them; prints how many connected.
const HOLD_CLIENT: &str = r#"
import socket, sys, time
host, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(n):
    try:
        socks.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        break
time.sleep(secs)
for s in socks:
    s.close()
print(len(socks))
"#;

/// A proxy error counter from status (`proxy_errors`).
fn proxy_error(daemon: &Daemon, reason: &str) -> u64 {
    daemon.status().expect("status")["proxy_errors"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no proxy_errors.{reason}"))
}

/// `(soft, hard)` open-files limits of `pid` (0: this process).
fn nofile(pid: u32) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes one struct rlimit.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut r) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    (r.rlim_cur as u64, r.rlim_max as u64)
}

/// Sets `pid`'s (0: this process) open-files limits.
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let r = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: prlimit on a pid we started; reads one struct rlimit.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn the_daemon_raises_its_descriptor_limit_and_reports_running_out_as_its_own_reason() {
    if !require_privileged() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).expect("virtual node");
    let (client, server) = (node.pod("client"), node.pod("server"));
    let _who = Server::peer(server, 7000, "whoami").expect("whoami server");
    let _echo = Server::peer(server, 7001, "echo").expect("echo server");
    let cfg = basic_config(&node, &format!("workers = 1\n{}", pods_toml(&[client])));
    // Start the daemon with a soft limit below the hard one (it inherits ours for the moment).
    let (soft0, hard0) = nofile(0);
    let low = 512.min(hard0);
    set_nofile(0, low, hard0);
    let daemon = Daemon::start(&node, &cfg);
    set_nofile(0, soft0, hard0);
    let daemon = daemon.expect("daemon");
    let st = daemon.status().expect("status");
    let fds = &st["open_files"];
    assert_eq!(fds["hard_limit"].as_u64(), Some(hard0), "{fds}");
    assert_eq!(
        fds["limit"].as_u64(),
        Some(hard0),
        "the soft limit is raised from {low} to the hard limit at start: {fds}"
    );
    assert!(fds["open"].as_u64().unwrap_or(0) > 0, "{fds}");
    let checks = st["kernel"]["checks"].to_string();
    assert!(
        checks.contains("open files"),
        "the start-up checks name the limit: {checks}"
    );

    // Squeeze the running daemon's soft limit: a few descriptors above what it holds now. An
    // even number: a proxied connection takes two (the accepted socket, then the upstream
    // one), so with an odd spare the last descriptor would go to an accept whose upstream
    // socket then fails, over and over, and accept would never run out. Counted from /proc
    // once the status request's own connection is closed (status's `open` includes it).
    let hard = fds["hard_limit"].as_u64().unwrap();
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_millis(300));
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .count() as u64;
    set_nofile(pid, open + 8, hard);
    eventually(Duration::from_secs(5), || {
        let l = daemon.status()?["open_files"]["limit"].as_u64().unwrap_or(0);
        ensure_eq("squeezed limit", l, open + 8)
    })
    .expect("status shows the new limit");
    let base_nofd = proxy_error(&daemon, "accept_no_descriptors");
    let base_failed = proxy_error(&daemon, "accept_failed");
    // 40 held connections need ~80 descriptors in the daemon: most wait in the accept queue.
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(HOLD_CLIENT)
        .args([&server.ip.to_string(), "7001", "40", "2"]);
    let out =
        exec_in(&client.cgroup, Some(&client.netns), cmd, Duration::from_secs(30)).expect("hold client");
    check_output("hold client", &out).expect("hold client failed");
    let nofd = proxy_error(&daemon, "accept_no_descriptors") - base_nofd;
    let failed = proxy_error(&daemon, "accept_failed") - base_failed;
    let log = daemon.log();
    let said = log.matches("out of file descriptors").count();
    eprintln!("accept_no_descriptors +{nofd}, accept_failed +{failed}, {said} log line(s)");
    assert!(nofd > 0, "running out of descriptors must be counted");
    assert_eq!(failed, 0, "and not as an ordinary accept failure");
    // Logged at once, then at most once per 10 s (the squeeze lasts about 2 s).
    assert!((1..=2).contains(&said), "{said} log lines:\n{log}");
    assert!(log.contains("accept_no_descriptors"), "the log names the counter");
    let metrics = daemon.metrics().expect("metrics");
    assert!(
        metrics.contains("sockmesh_proxy_errors_total{reason=\"accept_no_descriptors\"}"),
        "the reason is a metric"
    );
    // Descriptors free again: a new connection is served.
    set_nofile(pid, hard, hard);
    eventually(Duration::from_secs(10), || {
        let out = pod_exec(client, peer_bin(), &["get", "--connect", &server.addr(7000)])?;
        check_output("peer get", &out)?;
        Ok(())
    })
    .expect("served again once descriptors are free");
}
