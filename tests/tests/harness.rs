//! Tests of the virtual-node harness itself (root; no daemon but in the sweep test): pods talk over
//! the bridge, processes land in the right cgroup and netns, the peers work, teardown leaves nothing
//! behind, even after a panic, and the next harness start sweeps what a killed test process left.
//! Run with `--test-threads=1`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sockmesh_tests::cgroup::{cgroup_of_pid, procs};
use sockmesh_tests::process::check_output;
use sockmesh_tests::{
    eventually, pod_exec, require_privileged, require_root, spawn_in, LineChild, Server, VirtualNode,
};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

fn peers(file: &str) -> PathBuf {
    sockmesh_tests::peers_dir().join(file)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Leftovers {
    netns: Vec<PathBuf>,
    cgroup_root: PathBuf,
}

fn leftovers(node: &VirtualNode) -> Leftovers {
    Leftovers {
        netns: node.netns_paths(),
        cgroup_root: node.cgroup_root().to_path_buf(),
    }
}

fn assert_gone(l: &Leftovers) {
    for ns in &l.netns {
        assert!(!ns.exists(), "netns {} left behind", ns.display());
    }
    assert!(
        !l.cgroup_root.exists(),
        "cgroup {} left behind",
        l.cgroup_root.display()
    );
}

#[test]
fn pods_reach_each_other_without_daemon_and_teardown_is_clean() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").clone(), node.pod("b").clone());
    assert_eq!(a.ip.to_string(), "198.18.0.2");
    assert_eq!(b.ip.to_string(), "198.18.0.3");
    assert!(a.netns.exists() && b.netns.exists());
    assert!(a.cgroup.is_dir() && b.cgroup.is_dir() && node.daemon_cgroup().is_dir());
    assert!(node.cgroup_root().starts_with(sockmesh_tests::cgroup2_mount()));

    let server = Server::peer(&b, 7000, "whoami").unwrap();
    let out = pod_exec(&a, PEER, &["get", "--connect", &b.addr(7000)]).unwrap();
    check_output("peer get", &out).unwrap();
    let line = stdout(&out);
    assert!(
        line.starts_with("peer=198.18.0.2:") && line.trim_end().ends_with("local=198.18.0.3:7000"),
        "{line}"
    );
    assert_eq!(server.accepted().len(), 1, "{}", server.stdout());

    // The pod netns only has lo and eth0 (nothing leaked into or out of the host netns).
    let links = pod_exec(&a, "ip", &["-o", "link"]).unwrap();
    let names: Vec<String> = stdout(&links)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
        .map(|s| s.split('@').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["lo", "eth0"]);

    let l = leftovers(&node);
    drop(server);
    drop(node);
    assert_gone(&l);
}

#[test]
fn spawn_in_places_process_in_cgroup_and_netns_and_drop_kills_it() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["a"]).unwrap();
    let a = node.pod("a");
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let child = spawn_in(&a.cgroup, Some(&a.netns), cmd).unwrap();
    let pid = child.pid();
    assert_eq!(cgroup_of_pid(pid).unwrap(), a.cgroup);
    let ns_of_child = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    let ns_of_pod = std::fs::metadata(&a.netns).unwrap().ino();
    assert_eq!(ns_of_child, ns_of_pod);
    assert_eq!(procs(&a.cgroup), vec![pid as i32]);
    drop(child);
    assert!(procs(&a.cgroup).is_empty());
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists() || {
            // A recycled pid would not be in our cgroup.
            cgroup_of_pid(pid).map(|c| c != a.cgroup).unwrap_or(true)
        }
    );
}

#[test]
fn node_drop_kills_stray_processes_even_after_a_panic() {
    if !require_root() {
        return;
    }
    let mut l = None;
    let mut stray = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let node = VirtualNode::new(&["a", "b"]).unwrap();
        l = Some(leftovers(&node));
        let extra = node.create_cgroup("extra").unwrap();
        // A process not owned by any guard: only the node's teardown can stop it.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 120 & sleep 120 & wait"]);
        let child = spawn_in(&extra, Some(&node.pod("b").netns), cmd).unwrap();
        stray = child.pid();
        std::mem::forget(child);
        eventually(Duration::from_secs(5), || {
            if procs(&extra).len() == 3 {
                Ok(())
            } else {
                anyhow::bail!("children not started: {:?}", procs(&extra))
            }
        })
        .unwrap();
        panic!("deliberate panic to exercise teardown");
    }));
    assert!(result.is_err());
    assert_gone(&l.unwrap());
    // Reap the forgotten child so it does not linger as a zombie.
    // SAFETY: waitpid on our own child pid.
    unsafe {
        libc::waitpid(stray as i32, std::ptr::null_mut(), 0);
    }
}

#[test]
fn peer_load_is_byte_exact_and_fast_without_daemon() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).unwrap();
    let (c, s) = (node.pod("client"), node.pod("server"));
    let _echo = Server::peer(s, 9000, "echo").unwrap();
    let start = std::time::Instant::now();
    let out = pod_exec(
        c,
        PEER,
        &[
            "load",
            "--connect",
            &s.addr(9000),
            "--connections",
            "100",
            "--sizes",
            "1,1000,65536,1MiB,16MiB,64MiB",
            "--seconds-limit",
            "50",
        ],
    )
    .unwrap();
    check_output("peer load", &out).unwrap();
    let summary: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    eprintln!("direct peer load (no daemon): {summary} in {:?}", start.elapsed());
    assert_eq!(summary["ok"], 100);
    assert_eq!(summary["failed"], 0);
    // 16 full cycles of (1+1000+64KiB+1MiB+16MiB+64MiB) plus 1+1000+64KiB+1MiB.
    let cycle: u64 = 1 + 1000 + 65536 + (1 << 20) + (16 << 20) + (64 << 20);
    let expected = 16 * cycle + 1 + 1000 + 65536 + (1 << 20);
    assert_eq!(summary["bytes"].as_u64().unwrap(), expected);
}

#[test]
fn peer_sink_and_interactive_modes() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["client", "server"]).unwrap();
    let (c, s) = (node.pod("client"), node.pod("server"));
    let _sink = Server::peer(s, 9100, "sink").unwrap();
    let out = pod_exec(c, PEER, &["get", "--connect", &s.addr(9100), "--send", "a"]).unwrap();
    check_output("peer get sink", &out).unwrap();
    assert_eq!(stdout(&out).trim(), "bytes=1 fnv1a64=af63dc4c8601ec8c");

    let _echo = Server::peer(s, 9000, "echo").unwrap();
    let mut cmd = Command::new(PEER);
    cmd.args(["interactive", "--connect", &s.addr(9000)]);
    let mut cli = LineChild::spawn(&c.cgroup, Some(&c.netns), cmd).unwrap();
    let hello = cli.recv_line(Duration::from_secs(10)).unwrap();
    assert!(
        hello.starts_with("connected local=198.18.0.2:") && hello.ends_with("peer=198.18.0.3:9000"),
        "{hello}"
    );
    for word in ["one", "two"] {
        cli.send_line(word).unwrap();
        assert_eq!(
            cli.recv_line(Duration::from_secs(10)).unwrap(),
            format!("echo {word}")
        );
    }
    cli.close_stdin();
    assert_eq!(cli.recv_line(Duration::from_secs(10)).unwrap(), "closed");
}

#[test]
fn python_peers_run_in_pods() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["client", "server", "proxy"]).unwrap();
    let (c, s, p) = (node.pod("client"), node.pod("server"), node.pod("proxy"));

    let _http = Server::http(s, 8080).unwrap();
    let out = pod_exec(
        c,
        "curl",
        &["-sS", "--max-time", "10", &format!("http://{}/", s.addr(8080))],
    )
    .unwrap();
    check_output("curl", &out).unwrap();
    assert!(stdout(&out).starts_with("client=198.18.0.2:"), "{}", stdout(&out));

    // Without capture the proxy's SO_ORIGINAL_DST fails with an errno (no conntrack entry).
    let mut cmd = Command::new(sockmesh_tests::python());
    cmd.arg("-u").arg(peers("orig_dst_proxy.py"));
    let proxy = Server::start(&p.cgroup, Some(&p.netns), cmd).unwrap();
    let out = pod_exec(p, PEER, &["get", "--connect", "127.0.0.1:15001"]).unwrap();
    check_output("peer get proxy", &out).unwrap();
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(v["original_dst"].is_null(), "{v}");
    assert!(v["original_dst_errno"].is_string(), "{v}");
    assert_eq!(v["so_type"], 1, "{v}");
    assert!(v["tcp_info_len"].as_u64().unwrap() > 100, "{v}");
    eventually(Duration::from_secs(5), || {
        if proxy.stdout().lines().any(|l| l.starts_with('{')) {
            Ok(())
        } else {
            anyhow::bail!("proxy printed nothing")
        }
    })
    .unwrap();

    let _echo = Server::peer(s, 9000, "echo").unwrap();
    let out = pod_exec(
        c,
        sockmesh_tests::python(),
        &[
            peers("sockopt_probe.py").to_str().unwrap(),
            "--connect",
            &s.addr(9000),
        ],
    )
    .unwrap();
    check_output("sockopt_probe", &out).unwrap();
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    eprintln!("sockopt probe without hooks: {v}");
    assert_eq!(v["options"]["tcp_info_104"]["len"], 104);
    assert!(v["options"]["tcp_info_8192"]["len"].as_u64().unwrap() > 104);
    assert!(v["options"]["so_original_dst"]["errno"].is_string());
    assert_eq!(v["peer"], s.addr(9000));
}

#[test]
fn stdin_is_not_inherited_by_pod_exec() {
    if !require_root() {
        return;
    }
    let node = VirtualNode::new(&["a"]).unwrap();
    // `cat` with an inherited terminal stdin would block; pod_exec gives it /dev/null.
    let out = pod_exec(node.pod("a"), "cat", &[] as &[&str]).unwrap();
    assert!(out.status.success());
    let _ = Stdio::null();
}

/// Which part [`a_killed_test_process_leftovers_go_at_the_next_harness_start`] plays in a child
/// process: `leak` (a test that builds a node with a daemon, then is killed) or `start` (the
/// next test process: it only starts the harness).
const SWEEP_ROLE: &str = "SOCKMESH_TEST_SWEEP_ROLE";
const SWEEP_TEST: &str = "a_killed_test_process_leftovers_go_at_the_next_harness_start";

/// `bpftool link show`: every BPF link's `(id, cgroup id)` (0 for links of other kinds).
fn bpf_links() -> Vec<(u64, u64)> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "link", "show"]);
    let out = sockmesh_tests::run_host(cmd, Duration::from_secs(30)).unwrap();
    check_output("bpftool link show", &out).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| Some((l["id"].as_u64()?, l["cgroup_id"].as_u64().unwrap_or(0))))
        .collect()
}

/// The ids of the links attached to the cgroup at `path`, sorted.
fn cgroup_links(path: &std::path::Path) -> Vec<u64> {
    let id = sockmesh_tests::cgroup::cgroup_id(path).unwrap();
    let mut v: Vec<u64> = bpf_links()
        .into_iter()
        .filter(|l| l.1 == id)
        .map(|l| l.0)
        .collect();
    v.sort();
    v
}

/// This test binary running only this test, as `role`.
fn sweep_child(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([SWEEP_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(SWEEP_ROLE, role);
    cmd
}

#[test]
fn a_killed_test_process_leftovers_go_at_the_next_harness_start() {
    use sockmesh_tests::daemon::basic_config;
    use sockmesh_tests::Daemon;
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    match std::env::var(SWEEP_ROLE).as_deref() {
        Ok("leak") => {
            assert!(require_privileged());
            let node = VirtualNode::new(&["a"]).unwrap();
            let daemon = Daemon::start(&node, &basic_config(&node, "")).unwrap();
            let leaked = serde_json::json!({
                "cgroup": node.cgroup_root(),
                "netns": node.netns_paths(),
                "pin_dir": daemon.pin_dir(),
                "temp": daemon.dir(),
                "daemon": daemon.pid(),
            });
            println!("leaked {leaked}");
            // Killed long before this ends; if not, the guards clean up and the parent fails.
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        Ok("start") => {
            assert!(require_privileged());
            return;
        }
        _ => {}
    }
    if !require_privileged() {
        return;
    }
    // A live test's node and daemon, which no sweep may touch.
    let live = VirtualNode::new(&["live"]).unwrap();
    let live_daemon = Daemon::start(&live, &basic_config(&live, "")).unwrap();
    let live_pin = live_daemon.pin_dir().to_path_buf();
    let live_links = cgroup_links(live.cgroup_root());
    assert!(!live_links.is_empty());

    // A test process in its own process group, killed the way `timeout -s KILL` kills one: the
    // whole group at once, so neither it nor its daemon cleans up.
    let mut cmd = sweep_child("leak");
    cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = sockmesh_tests::GuardedChild::new(cmd.spawn().unwrap(), "leaking test process");
    let stdout = child.child_mut().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            // After libtest's `test <name> ... ` on the same line.
            if let Some((_, j)) = line.split_once("leaked ") {
                let _ = tx.send(j.to_owned());
            }
        }
    });
    let leaked: Value = serde_json::from_str(&rx.recv_timeout(Duration::from_secs(90)).unwrap()).unwrap();
    let path = |k: &str| PathBuf::from(leaked[k].as_str().unwrap());
    let (cgroup, pin_dir, temp) = (path("cgroup"), path("pin_dir"), path("temp"));
    let netns: Vec<PathBuf> = leaked["netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| PathBuf::from(n.as_str().unwrap()))
        .collect();
    let links = cgroup_links(&cgroup);
    assert!(!links.is_empty(), "the leaking daemon attached no link");
    // SAFETY: kill has no memory preconditions; the group is the child's own.
    assert_eq!(unsafe { libc::kill(-(child.pid() as i32), libc::SIGKILL) }, 0);
    let st = child
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("killed child exits");
    assert!(!st.success());
    let daemon_pid = leaked["daemon"].as_u64().unwrap();
    eventually(Duration::from_secs(10), || {
        match std::fs::read_to_string(format!("/proc/{daemon_pid}/stat")) {
            Ok(s) if !s.contains(") Z ") => anyhow::bail!("daemon {daemon_pid} still runs"),
            _ => Ok(()),
        }
    })
    .unwrap();
    // What the killed test left: its cgroup, netns, pinned links (still attached) and temp dir.
    assert!(cgroup.is_dir() && pin_dir.is_dir() && temp.is_dir());
    assert!(netns.iter().all(|n| n.exists()), "{netns:?}");
    assert_eq!(
        cgroup_links(&cgroup),
        links,
        "the pinned links outlive their daemon"
    );

    // The next test process's harness start sweeps all of it, and says so.
    let out = sockmesh_tests::run_host(sweep_child("start"), Duration::from_secs(120)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("next test process:\n{err}");
    check_output("next test process", &out).unwrap();
    for gone in [&cgroup, &pin_dir, &temp] {
        assert!(!gone.exists(), "{} left", gone.display());
        assert!(
            err.lines()
                .any(|l| l.starts_with("harness sweep: ") && l.contains(&*gone.to_string_lossy())),
            "the sweep did not name {}",
            gone.display()
        );
    }
    for n in &netns {
        assert!(!n.exists(), "{} left", n.display());
    }
    eventually(Duration::from_secs(10), || {
        let all = bpf_links();
        match links.iter().find(|l| all.iter().any(|a| a.0 == **l)) {
            Some(l) => anyhow::bail!("link {l} still exists"),
            None => Ok(()),
        }
    })
    .unwrap();

    // The live test's resources are untouched and its daemon still serves.
    assert!(live.cgroup_root().is_dir() && live_pin.is_dir());
    assert!(live.netns_paths().iter().all(|n| n.exists()));
    assert_eq!(cgroup_links(live.cgroup_root()), live_links);
    live_daemon.status().unwrap();
}
