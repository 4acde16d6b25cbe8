//! `sockmesh run --take-over` (issue 13, the DaemonSet path): a rolling update with
//! `maxSurge: 1, maxUnavailable: 0` starts the new pod's `run` while the old pod's still
//! serves. Each `run` here is in a cgroup of its own inside the attach root, as each pod's is.
//! The new one takes the node over by itself (the `--upgrade` hand-off) under constant-rate
//! keep-alive load without losing a request; the old one stays alive and not ready on its own
//! probe socket until SIGTERM, then exits 0 leaving the node to its successor; a third `run`
//! takes over from the second. An older binary never takes over from a newer daemon unless
//! asked (`--take-over=any`): it waits, not ready, without exiting.

use std::time::Duration;

use sockmesh_tests::upgrade::{client_counter, p99_in, pinned_links, setup_with, unix_now, Load, DRAIN};
use sockmesh_tests::{attached_programs, eventually, require_privileged, Daemon};

/// `old` serves; `new` is a `run --take-over` started beside it. Waits until `new` is ready,
/// then checks what the operator (and the kubelet) would: `new` answers status as generation
/// `generation`, `old` is alive, healthy, not ready, and holds nothing of the node once it
/// drained.
fn takes_over(old: &mut Daemon, new: &mut Daemon, generation: u64) {
    eventually(Duration::from_secs(60), || {
        let (code, body) = new.probe("ready")?;
        anyhow::ensure!(code == 200, "{code} {body}");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("the take-over never got ready: {e:#}\n{}", new.log()));
    old.hand_state_to(new);
    let st = new.status().expect("status");
    assert_eq!(st["generation"], generation, "{}", st["upgrade"]);
    assert_eq!(
        st["upgrade"]["pid"],
        new.pid(),
        "status answered by the new generation"
    );
    let (code, body) = old.probe("ready").expect("old probe");
    assert_eq!(code, 503, "the old generation still says ready: {body}");
    assert!(body.contains("handed over"), "{body}");
    // Drained: it stays (its container must not exit), not ready, healthy.
    let reason = eventually(DRAIN + Duration::from_secs(10), || {
        let (code, body) = old.probe("ready")?;
        anyhow::ensure!(code == 503 && body.contains("waits for SIGTERM"), "{code} {body}");
        Ok(body)
    })
    .unwrap_or_else(|e| panic!("the old generation did not go idle: {e:#}\n{}", old.log()));
    eprintln!("old generation (pid {}): {reason}", old.pid());
    assert!(
        old.alive(),
        "the old generation exited after handing over:\n{}",
        old.log()
    );
    assert_eq!(old.probe("healthz").expect("healthz").0, 200);
    // It holds nothing: no kernel object, no lock, one socket (its probe's).
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", old.pid()))
        .expect("fds")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    let sockets = fds.iter().filter(|f| f.starts_with("socket:")).count();
    assert!(
        sockets <= 1 && !fds.iter().any(|f| f.contains("bpf") || f.ends_with(".lock")),
        "the idle generation still holds: {fds:?}"
    );
    eventually(Duration::from_secs(5), || {
        let st = new.status()?;
        anyhow::ensure!(st["upgrade"]["previous"]["exited"] == true, "{}", st["upgrade"]);
        Ok(())
    })
    .expect("the new generation saw the old one's last counters");
}

/// On failed requests: when they failed, against what each generation logged.
fn explain_failures(summary: &serde_json::Value, generations: &[&Daemon]) {
    if summary["failed"] == 0 {
        return;
    }
    for s in summary["seconds"].as_array().into_iter().flatten() {
        if s["failed"].as_u64().unwrap_or(0) > 0 {
            eprintln!("second {}: {s}", s["t"]);
        }
    }
    for (i, d) in generations.iter().enumerate() {
        eprintln!("===== generation {} (pid {}) =====\n{}", i + 1, d.pid(), d.log());
    }
}

/// SIGTERM (the kubelet deleting the old pod): exit 0.
fn sigterm_exits_0(d: &mut Daemon) {
    let st = d.stop();
    assert!(
        matches!(st, Some(s) if s.success()),
        "SIGTERM: {st:?}\n{}",
        d.log()
    );
}

#[test]
fn a_take_over_run_beside_the_daemon_takes_the_node_and_the_old_one_idles_until_sigterm() {
    if !require_privileged() {
        return;
    }
    // Every generation is a `run --take-over`, as in the DaemonSet: the first starts fresh.
    let (node, _server, mut n1) = setup_with(&["--take-over"]);
    assert!(n1.log().contains("starting fresh"), "{}", n1.log());
    assert_eq!(n1.probe("ready").expect("probe").0, 200);
    let programs = attached_programs(node.cgroup_root()).expect("bpftool");
    let links = pinned_links(&n1);
    let load = Load::start(node.pod("client"), 8, 25, Duration::from_secs(150));
    std::thread::sleep(Duration::from_secs(2));
    let steady_until = unix_now();

    let from2 = unix_now();
    let mut n2 = n1
        .start_take_over(&node.create_cgroup("pod-2").expect("cgroup"), &[], &[])
        .expect("second run");
    takes_over(&mut n1, &mut n2, 2);
    let to2 = unix_now();
    sigterm_exits_0(&mut n1);
    // The node is the successor's: capture and serving go on, the kernel side untouched.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(n2.status().expect("status")["generation"], 2);
    assert_eq!(n2.probe("ready").expect("probe").0, 200);
    assert_eq!(attached_programs(node.cgroup_root()).expect("bpftool"), programs);
    assert_eq!(pinned_links(&n2), links);

    // Chained: a third `run` takes over from the second.
    let from3 = unix_now();
    let mut n3 = n2
        .start_take_over(&node.create_cgroup("pod-3").expect("cgroup"), &[], &[])
        .expect("third run");
    takes_over(&mut n2, &mut n3, 3);
    let to3 = unix_now();
    sigterm_exits_0(&mut n2);
    std::thread::sleep(Duration::from_secs(2));

    let summary = load.finish();
    eprintln!(
        "load across two take-overs: connects {} ok {} failed {} p99 {} ms",
        summary["connects"], summary["ok"], summary["failed"], summary["p99_ms"]
    );
    let (steady, _) = p99_in(&summary, 0, steady_until.saturating_sub(1));
    for (i, (from, to)) in [(from2, to2), (from3, to3)].iter().enumerate() {
        let (p99, n) = p99_in(&summary, *from, *to);
        eprintln!(
            "take-over {}: {n} requests in its window, window p99 {p99:.1} ms (steady {steady:.1} ms)",
            i + 1
        );
    }
    explain_failures(&summary, &[&n1, &n2, &n3]);
    assert_eq!(summary["failed"], 0, "failed requests: {}", summary["errors"]);
    assert!(summary["ok"].as_u64().unwrap() > 500, "{summary}");
    // The connections moved with each hand-off: none was re-established.
    assert_eq!(summary["connects"], 8, "the client had to reconnect: {summary}");
    assert_eq!(client_counter(&n3, "connections_total"), 8);
    assert_eq!(n3.status().expect("status")["generation"], 3);
    assert_eq!(attached_programs(node.cgroup_root()).expect("bpftool"), programs);
    assert_eq!(pinned_links(&n3), links);
    assert_eq!(n3.rendezvous_sockets().len(), 1, "{:?}", n3.rendezvous_sockets());
}

#[test]
fn an_older_run_never_takes_over_from_a_newer_daemon_unless_asked() {
    if !require_privileged() {
        return;
    }
    let (node, _server, mut n1) = setup_with(&["--take-over"]);
    let load = Load::start(node.pod("client"), 4, 25, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    // A restarted container of an old image (test-only: this binary says it is 0.0.1).
    let older = [("SOCKMESH_TEST_BINARY_VERSION", "0.0.1")];
    let mut old = n1
        .start_take_over(&node.create_cgroup("pod-old").expect("cgroup"), &[], &older)
        .expect("older run");
    let why = eventually(Duration::from_secs(20), || {
        let (code, body) = old.probe("ready")?;
        anyhow::ensure!(code == 503 && body.contains("newer"), "{code} {body}");
        Ok(body)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", old.log()));
    eprintln!("older run: {why}");
    // It waits: still there several retries later, said so once, asked nothing of the daemon.
    std::thread::sleep(Duration::from_secs(6));
    assert!(old.alive(), "the older run exited:\n{}", old.log());
    assert_eq!(old.probe("healthz").expect("healthz").0, 200);
    assert_eq!(old.log().matches("which is newer").count(), 1, "{}", old.log());
    let st = n1.status().expect("status");
    assert_eq!(st["generation"], 1);
    assert_eq!(st["upgrade"]["pid"], n1.pid());
    assert_eq!(st["upgrade"]["attempts"], 0, "{}", st["upgrade"]);
    assert_eq!(n1.probe("ready").expect("probe").0, 200);
    // SIGTERM while waiting: exit 0, nothing taken.
    sigterm_exits_0(&mut old);
    assert_eq!(n1.status().expect("status")["upgrade"]["pid"], n1.pid());

    // Asked explicitly (a rollback): `--take-over=any` does take over from the newer daemon.
    let mut rollback = n1
        .start_take_over(
            &node.create_cgroup("pod-rollback").expect("cgroup"),
            &["--take-over=any"],
            &older,
        )
        .expect("rollback run");
    takes_over(&mut n1, &mut rollback, 2);
    sigterm_exits_0(&mut n1);
    std::thread::sleep(Duration::from_secs(1));
    let summary = load.finish();
    eprintln!(
        "load: connects {} ok {} failed {}",
        summary["connects"], summary["ok"], summary["failed"]
    );
    explain_failures(&summary, &[&n1, &rollback]);
    assert_eq!(summary["failed"], 0, "failed requests: {}", summary["errors"]);
    assert_eq!(summary["connects"], 4, "{summary}");
}
