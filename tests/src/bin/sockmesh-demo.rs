//! `sockmesh-demo`: a guided tour of sockmesh on a throw-away virtual node (`cargo xtask demo`).
//!
//! Builds a node with three pods (`frontend`, `orders`, `legacy`), starts real servers, starts an
//! application in `frontend` BEFORE sockmesh, starts the daemon with the embedded default config,
//! enrolls `frontend` while its application keeps running, sends traffic, applies a routing policy
//! (a canary release), then one with traffic colours (a gray release and a stress test along a
//! two-service chain of `tests/peers/chain_app.py` servers), and prints a table: what was
//! captured, the original destination the daemon reported, what the server saw as the client, and
//! the kernel counters. Everything is removed at the end (also on failure; if the demo itself is
//! SIGKILLed the pod processes die with it but its namespaces and cgroups stay).
//!
//! Needs root, `SOCKMESH_BIN` (or `target/release/sockmesh`), python3 and curl.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "demo/dual_link.rs"]
mod dual_link;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sockmesh_tests::daemon::{prom_value, toml_str};
use sockmesh_tests::process::{check_output, exec_in, run_host_ok, spawn_in};
use sockmesh_tests::util::set_peer_command;
use sockmesh_tests::{
    cgroup2_mount, eventually, peer_command, peers_dir, python, sockmesh_bin, Daemon, LineChild, Pod, Server,
    VirtualNode,
};

/// What a Ctrl-C must clean up: (daemon pid, cgroup root, netns names).
type CleanupState = (u32, Option<PathBuf>, Vec<String>);
static CLEANUP: Mutex<Option<CleanupState>> = Mutex::new(None);

/// Blocks SIGINT/SIGTERM/SIGHUP in every thread and handles them in one thread that stops the
/// daemon (SIGTERM, up to 10 s), tears the node down and exits 130. Children start with an
/// empty signal mask (std resets it), so they still see the signals.
fn install_signal_cleanup() {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the current (only) thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the signals blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nsockmesh-demo: interrupted (signal {sig}); cleaning up...");
        let what = CLEANUP.lock().map(|g| g.clone()).unwrap_or(None);
        if let Some((daemon_pid, root, netns)) = what {
            if daemon_pid != 0 {
                // SAFETY: plain syscalls on our own child.
                unsafe { libc::kill(daemon_pid as i32, libc::SIGTERM) };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    // SAFETY: as above; WNOHANG never blocks.
                    let r = unsafe { libc::waitpid(daemon_pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                    if r != 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            for p in sockmesh_tests::node::teardown_resources(root.as_deref(), &netns) {
                eprintln!("warning: {p}");
            }
        }
        sockmesh_tests::util::remove_own_temp_dirs();
        std::process::exit(130);
    });
}

fn register_cleanup(daemon_pid: u32, node: &VirtualNode) {
    let (root, netns) = node.resources();
    if let Ok(mut g) = CLEANUP.lock() {
        *g = Some((daemon_pid, root, netns));
    }
}

fn unregister_cleanup() {
    if let Ok(mut g) = CLEANUP.lock() {
        *g = None;
    }
}

const LINE_TIMEOUT: Duration = Duration::from_secs(15);
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One row of the final table.
struct Row {
    from: String,
    request: String,
    captured: String,
    original_dst: String,
    server_saw: String,
    result: String,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `sockmesh-demo peer ...`: the demo's own copy of the TCP peer (runs inside the pods).
    if args.get(1).map(String::as_str) == Some("peer") {
        std::process::exit(sockmesh_tests::peer::run(&args[2..]));
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("sockmesh-demo: needs root (network namespaces, cgroups, BPF)");
        return ExitCode::from(2);
    }
    let bin = sockmesh_bin();
    if !bin.is_file() {
        eprintln!(
            "sockmesh-demo: {} not found; build it (cargo xtask build) or set SOCKMESH_BIN",
            bin.display()
        );
        return ExitCode::from(2);
    }
    // `sockmesh-demo dual-link`: the active / keep-alive links scene (see demo/dual_link.rs).
    let scene = args.get(1).map(String::as_str);
    if !matches!(scene, None | Some("dual-link")) {
        eprintln!(
            "sockmesh-demo: unknown scene `{}` (scenes: the default tour, dual-link)",
            args[1]
        );
        return ExitCode::from(2);
    }
    for peer in ["http_server.py", "chain_app.py", "link_app.py"] {
        let path = peers_dir().join(peer);
        if !path.is_file() {
            eprintln!(
                "sockmesh-demo: {} not found (run from the source tree)",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    match std::env::current_exe() {
        Ok(me) => set_peer_command(me, vec!["peer".into()]),
        Err(e) => {
            eprintln!("sockmesh-demo: cannot find my own executable: {e}");
            return ExitCode::from(2);
        }
    }
    install_signal_cleanup();
    let result = if scene == Some("dual-link") {
        dual_link::run()
    } else {
        run()
    };
    unregister_cleanup();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nsockmesh-demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const STEPS: u32 = 9;

fn step(n: u32, text: &str) {
    println!("\n[{n}/{STEPS}] {text}");
}

fn default_config_with_root(root: &str) -> Result<String> {
    let mut cmd = Command::new(sockmesh_bin());
    cmd.arg("default-config");
    let out = run_host_ok(cmd, Duration::from_secs(15))?;
    let text = String::from_utf8(out.stdout).context("default-config is not UTF-8")?;
    // cgroup_root is a top-level key: it must come before the first [table], so prepend it and
    // drop any active cgroup_root line of the default.
    let body: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("cgroup_root"))
        .collect();
    Ok(format!(
        "# generated by sockmesh-demo: the embedded default plus this node's attach point\n\
         cgroup_root = {}\n\n{}\n",
        toml_str(root),
        body.join("\n")
    ))
}

fn run() -> Result<()> {
    println!("sockmesh demo: transparent capture on one virtual node, no iptables, no restarts");
    println!("===============================================================================");

    step(
        1,
        "building a virtual node (network namespaces on a bridge + a cgroup subtree)",
    );
    let node = VirtualNode::new(&["frontend", "orders", "legacy"])?;
    register_cleanup(0, &node);
    let (frontend, orders, legacy) = (node.pod("frontend"), node.pod("orders"), node.pod("legacy"));
    println!("      cgroup v2 mount : {}", cgroup2_mount().display());
    println!("      node cgroup     : {}", node.cgroup_root().display());
    for p in node.pods() {
        println!(
            "      pod {:<9} ip {:<12} netns {}",
            p.name,
            p.ip.to_string(),
            p.netns.display()
        );
    }

    step(2, "starting servers");
    let http = Server::http(orders, 8080)?;
    let echo = Server::peer(orders, 9000, "echo")?;
    let who = Server::peer(legacy, 7000, "whoami")?;
    println!("      orders  : HTTP on :8080 (answers `client=<ip>:<port>`), TCP echo on :9000");
    println!("      legacy  : TCP whoami on :7000 (answers `peer=<ip>:<port> ...`)");

    step(
        3,
        "starting an application in `frontend` BEFORE sockmesh exists (it connects to legacy:7000 every ~0.5 s)",
    );
    let mut app = start_app(frontend, &legacy.addr(7000))?;
    println!("      frontend app pid {}", app.child().pid());

    step(4, "starting sockmesh with the embedded default config");
    let config = default_config_with_root(&node.cgroup_root().to_string_lossy())?;
    let daemon = Daemon::start(&node, &config)?;
    register_cleanup(daemon.pid(), &node);
    println!(
        "      sockmesh pid {} (cgroup {}), admin socket {}, metrics http://{}/metrics",
        daemon.pid(),
        node.daemon_cgroup().display(),
        daemon.admin_socket().display(),
        daemon.metrics_addr()
    );

    let result = tour(&node, &daemon, &mut app, &http, &echo, &who);
    if result.is_err() {
        eprintln!("\n--- sockmesh log ---\n{}--- end of log ---", daemon.log());
    }
    result?;

    println!("\ncleaning up: stopping sockmesh, killing pod processes, deleting namespaces and cgroups");
    drop(app);
    drop((http, echo, who));
    let root = node.cgroup_root().to_path_buf();
    let netns = node.netns_paths();
    drop(daemon);
    register_cleanup(0, &node);
    drop(node);
    let left: Vec<String> = netns
        .iter()
        .chain(std::iter::once(&root))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if left.is_empty() {
        println!("done: nothing left behind.");
        Ok(())
    } else {
        bail!("left behind: {left:?}")
    }
}

fn start_app(pod: &Pod, dst: &str) -> Result<LineChild> {
    // Connects, reads the whoami answer, keeps the socket 300 ms (visible in `sockmesh status`),
    // repeats every ~0.5 s until stdin closes or 120 s pass.
    let code = r#"
import socket, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("started", flush=True)
end = time.monotonic() + 120
while not stop.is_set() and time.monotonic() < end:
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print("ok " + data.decode().strip(), flush=True)
        time.sleep(0.3)
        s.close()
    except OSError as e:
        print("err %r" % (e,), flush=True)
    stop.wait(0.2)
print("stopped", flush=True)
"#;
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg("-c").arg(code).arg(dst);
    let mut app = LineChild::spawn(&pod.cgroup, Some(&pod.netns), cmd)?;
    let first = app.recv_line(LINE_TIMEOUT)?;
    if first != "started" {
        bail!("frontend app printed {first:?}");
    }
    Ok(app)
}

/// Reads `n` `ok ...` lines from the app; returns what the server saw (the `peer=` part).
fn app_lines(app: &mut LineChild, n: usize) -> Result<Vec<String>> {
    let mut saw = Vec::new();
    while saw.len() < n {
        let l = app.recv_line(LINE_TIMEOUT)?;
        let Some(rest) = l.strip_prefix("ok ") else {
            bail!("frontend app failed: {l}");
        };
        saw.push(
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix("peer="))
                .unwrap_or(rest)
                .to_owned(),
        );
    }
    Ok(saw)
}

fn counters(d: &Daemon) -> Result<serde_json::Map<String, Value>> {
    d.status()?["counters"]
        .as_object()
        .cloned()
        .ok_or_else(|| anyhow!("status has no counters"))
}

fn captured(d: &Daemon) -> Result<u64> {
    d.counter("connect_captured")
}

/// Polls `status` until a connection of `pod` to `dst` shows up (or `done` says the client
/// finished); returns the status entry.
fn observe(d: &Daemon, pod: &str, dst: &str, mut done: impl FnMut() -> bool) -> Option<Value> {
    let start = Instant::now();
    while start.elapsed() < OBSERVE_TIMEOUT {
        if let Ok(st) = d.status() {
            if let Some(c) = st["connections"].as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| c["pod"] == pod && c["original_dst"] == dst)
                    .cloned()
            }) {
                return Some(c);
            }
        }
        if done() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    None
}

fn describe_observed(c: &Option<Value>) -> String {
    match c {
        Some(c) => format!(
            "{} (client {})",
            c["original_dst"].as_str().unwrap_or("?"),
            c["client"].as_str().unwrap_or("?")
        ),
        None => "(not seen in status)".into(),
    }
}

fn yes_no(delta: u64) -> String {
    if delta > 0 {
        format!("yes (+{delta})")
    } else {
        "no (+0)".into()
    }
}

/// `curl http://<dst>/slow?ms=800` from `pod`, watching status while it runs.
fn curl_row(d: &Daemon, pod: &Pod, dst: &str) -> Result<Row> {
    let before = captured(d)?;
    let url = format!("http://{dst}/demo?ms=800");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in(&pod.cgroup, Some(&pod.netns), cmd)?;
    let seen = observe(d, &pod.name, dst, || {
        child.try_wait().map(|s| s.is_some()).unwrap_or(true)
    });
    let out = child.wait_output(Duration::from_secs(30))?;
    check_output(&format!("curl {url} from {}", pod.name), &out)?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let delta = eventually_delta(d, before)?;
    Ok(Row {
        from: pod.name.clone(),
        request: format!("curl {url}"),
        captured: yes_no(delta),
        original_dst: if delta > 0 {
            describe_observed(&seen)
        } else {
            "- (direct)".into()
        },
        server_saw: body.strip_prefix("client=").unwrap_or(&body).to_owned(),
        result: "HTTP 200".into(),
    })
}

/// `curl` from a pod that is not enrolled into a pod enrolled with `--inbound-port 8080`.
fn inbound_row(d: &Daemon, from: &Pod, to: &Pod) -> Result<Row> {
    let before = d.counter("lookup_assigned")?;
    let url = format!("http://{}/demo", to.addr(8080));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", &url]).stdin(Stdio::null());
    let out =
        sockmesh_tests::process::exec_in(&from.cgroup, Some(&from.netns), cmd, Duration::from_secs(30))?;
    check_output(&format!("curl {url} from {}", from.name), &out)?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let delta = d.counter("lookup_assigned")? - before;
    Ok(Row {
        from: from.name.clone(),
        request: format!("curl {url} (orders enrolled inbound)"),
        captured: if delta > 0 {
            format!("inbound (+{delta})")
        } else {
            "no".into()
        },
        original_dst: format!("{} (sk_lookup, no NAT)", to.addr(8080)),
        server_saw: format!(
            "{} (orders' own IP: sockmesh delivered it)",
            body.strip_prefix("client=").unwrap_or(&body)
        ),
        result: "HTTP 200".into(),
    })
}

/// The captured counter may be summed a moment later: give it a short bounded settle.
fn eventually_delta(d: &Daemon, before: u64) -> Result<u64> {
    let now = eventually(Duration::from_millis(600), || {
        let v = captured(d)?;
        if v > before {
            Ok(v)
        } else {
            bail!("unchanged")
        }
    });
    Ok(match now {
        Ok(v) => v - before,
        Err(_) => captured(d)? - before,
    })
}

fn tour(
    node: &VirtualNode,
    daemon: &Daemon,
    app: &mut LineChild,
    http: &Server,
    echo: &Server,
    who: &Server,
) -> Result<()> {
    let (frontend, orders, legacy) = (node.pod("frontend"), node.pod("orders"), node.pod("legacy"));
    let counters_before = counters(daemon)?;
    let mut rows = Vec::new();

    // The app before enrolment.
    let c0 = captured(daemon)?;
    let saw = app_lines(app, 3)?;
    let c1 = captured(daemon)?;
    rows.push(Row {
        from: "frontend".into(),
        request: format!(
            "app (pid {}) -> {} x3, before enroll",
            app.child().pid(),
            legacy.addr(7000)
        ),
        captured: yes_no(c1 - c0),
        original_dst: "- (not enrolled: direct)".into(),
        server_saw: saw.first().cloned().unwrap_or_default(),
        result: "ok".into(),
    });

    step(
        5,
        "enrolling `frontend` while its application keeps running (no restart)",
    );
    println!(
        "      $ sockmesh enroll --name frontend --netns {} --cgroup {}",
        frontend.netns.display(),
        frontend.cgroup.display()
    );
    daemon.enroll(frontend)?;
    let ps = daemon.status()?["pods"].clone();
    if let Some(p) = ps
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "frontend"))
    {
        println!(
            "      enrolled: pod_id {} cgroup_id {} netns_cookie {} listeners {}",
            p["pod_id"], p["cgroup_id"], p["netns_cookie"], p["listeners"]
        );
    }
    // Skip the connection that may have been in flight during enrolment.
    app_lines(app, 1)?;
    let c2 = captured(daemon)?;
    let mut seen = None;
    let mut saw = Vec::new();
    while saw.len() < 3 {
        if seen.is_none() {
            seen = observe(daemon, "frontend", &legacy.addr(7000), || false);
        }
        saw.extend(app_lines(app, 1)?);
    }
    let c3 = captured(daemon)?;
    rows.push(Row {
        from: "frontend".into(),
        request: format!("same app, same pid -> {} x3, after enroll", legacy.addr(7000)),
        captured: yes_no(c3 - c2),
        original_dst: describe_observed(&seen),
        server_saw: saw.first().cloned().unwrap_or_default(),
        result: "ok".into(),
    });
    app.close_stdin();
    let _ = app.recv_line(LINE_TIMEOUT);
    // Let its last connection finish before measuring the next requests one by one.
    eventually(Duration::from_secs(5), || {
        let n = daemon.status()?["connections"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        if n == 0 {
            Ok(())
        } else {
            bail!("{n} connections still open")
        }
    })
    .ok();

    step(6, "sending traffic");
    rows.push(curl_row(daemon, frontend, &orders.addr(8080))?);

    // Raw TCP echo through the daemon: 12 concurrent connections, 1 byte .. 4 MiB, byte-exact.
    let before = captured(daemon)?;
    let accepted_before = echo.accepted().len();
    let mut cmd = peer_command();
    cmd.args([
        "load",
        "--connect",
        &orders.addr(9000),
        "--connections",
        "12",
        "--sizes",
        "1,1000,65536,1MiB,4MiB",
        "--seconds-limit",
        "30",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = spawn_in(&frontend.cgroup, Some(&frontend.netns), cmd)?;
    let seen = observe(daemon, "frontend", &orders.addr(9000), || {
        child.try_wait().map(|s| s.is_some()).unwrap_or(true)
    });
    let out = child.wait_output(Duration::from_secs(45))?;
    check_output("peer load", &out)?;
    let summary: Value = serde_json::from_slice(&out.stdout).context("peer load summary")?;
    let delta = eventually_delta(daemon, before)?;
    let sources: BTreeSet<String> = echo.accepted()[accepted_before..]
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("peer="))
                .and_then(|a| a.rsplit_once(':').map(|(ip, _)| ip.to_owned()))
        })
        .collect();
    rows.push(Row {
        from: "frontend".into(),
        request: format!("peer load -> {} (12 conns, 1 B..4 MiB echo)", orders.addr(9000)),
        captured: yes_no(delta),
        original_dst: describe_observed(&seen),
        server_saw: format!(
            "{} (all {} conns)",
            sources.iter().cloned().collect::<Vec<_>>().join(","),
            echo.accepted().len() - accepted_before
        ),
        result: format!(
            "{} ok, {} failed, {:.1} MiB verified",
            summary["ok"],
            summary["failed"],
            summary["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
        ),
    });

    // frontend -> legacy whoami, held open so status can show it.
    let before = captured(daemon)?;
    let mut cmd = peer_command();
    cmd.args(["get", "--connect", &legacy.addr(7000), "--hold-ms", "800"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_in(&frontend.cgroup, Some(&frontend.netns), cmd)?;
    let seen = observe(daemon, "frontend", &legacy.addr(7000), || {
        child.try_wait().map(|s| s.is_some()).unwrap_or(true)
    });
    let out = child.wait_output(Duration::from_secs(30))?;
    check_output("peer get whoami", &out)?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let delta = eventually_delta(daemon, before)?;
    rows.push(Row {
        from: "frontend".into(),
        request: format!("raw TCP -> {} (whoami)", legacy.addr(7000)),
        captured: yes_no(delta),
        original_dst: describe_observed(&seen),
        server_saw: line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .unwrap_or(&line)
            .to_owned(),
        result: "ok".into(),
    });

    // legacy is not enrolled: goes direct.
    rows.push(curl_row(daemon, legacy, &orders.addr(8080))?);

    // Inbound: enrol `orders` for its port 8080; legacy's call is now captured on arrival.
    // (Port SHOP_BASE_PORT is the colour scene's: its base `shop` endpoint.)
    println!(
        "      $ sockmesh enroll --name orders --netns {} --cgroup {} --inbound-port 8080 \
         --inbound-port {SHOP_BASE_PORT}",
        orders.netns.display(),
        orders.cgroup.display()
    );
    daemon.cli(&[
        "enroll",
        "--name",
        "orders",
        "--netns",
        &orders.netns.to_string_lossy(),
        "--cgroup",
        &orders.cgroup.to_string_lossy(),
        "--inbound-port",
        "8080",
        "--inbound-port",
        &SHOP_BASE_PORT.to_string(),
    ])?;
    rows.push(inbound_row(daemon, legacy, orders)?);

    let _ = who;
    step(
        7,
        "protocol-aware routing: a canary release by weight and by header",
    );
    routing_tour(node, daemon, http)?;

    step(
        8,
        "traffic colours: a gray release and a stress test that stay inside their colour",
    );
    colour_tour(node, daemon)?;

    step(9, "results");
    print_table(&rows);
    println!("\n  `captured` is the change of the kernel counter connect_captured during that request;");
    println!("  `original dst` is what `sockmesh status` reported for the live proxied connection;");
    println!(
        "  `server saw` is the client address the server itself observed (pod IPs: frontend {}, legacy {}).",
        frontend.ip, legacy.ip
    );

    let counters_after = counters(daemon)?;
    println!("\nkernel counters (sockmesh status, per-CPU sums):");
    println!("  {:<28} {:>8} {:>8} {:>8}", "reason", "before", "after", "delta");
    for (k, v) in &counters_after {
        let a = v.as_u64().unwrap_or(0);
        let b = counters_before.get(k).and_then(Value::as_u64).unwrap_or(0);
        if a > 0 || b > 0 {
            println!("  {k:<28} {b:>8} {a:>8} {:>+8}", a as i64 - b as i64);
        }
    }

    println!("\n$ sockmesh status");
    match daemon.status_text() {
        Ok(t) => println!("{t}"),
        Err(e) => println!("(status failed: {e:#})"),
    }
    let metrics = daemon.metrics().unwrap_or_default();
    let interesting: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("pod=\"frontend\""))
        .collect();
    if !interesting.is_empty() {
        println!("$ curl http://{}/metrics | grep frontend", daemon.metrics_addr());
        for l in interesting {
            println!("{l}");
        }
    }
    Ok(())
}

/// Requests the HTTP server has logged so far.
fn served(s: &Server) -> usize {
    s.stdout().lines().filter(|l| l.starts_with("accepted")).count()
}

/// `curl` `n` times from `pod` to `url` over one keep-alive connection per batch of 100; returns
/// the HTTP codes that were not 200.
fn curl_batch(pod: &Pod, url: &str, n: usize, header: Option<&str>) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        left -= k;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-w", "%{http_code}\\n"]);
        if let Some(h) = header {
            cmd.args(["-H", h]);
        }
        for _ in 0..k {
            cmd.args(["-o", "/dev/null", url]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = spawn_in(&pod.cgroup, Some(&pod.netns), cmd)?.wait_output(Duration::from_secs(60))?;
        check_output(&format!("curl x{k} {url} from {}", pod.name), &out)?;
        bad.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|c| *c != "200")
                .map(str::to_owned),
        );
    }
    Ok(bad)
}

/// A service at a virtual IP nobody owns, two versions of it, 90/10 by weight, and a header
/// that sends a request to the canary whatever the weights say. Applied to the running daemon.
fn routing_tour(node: &VirtualNode, daemon: &Daemon, v1: &Server) -> Result<()> {
    let (frontend, orders, legacy) = (node.pod("frontend"), node.pod("orders"), node.pod("legacy"));
    let v2 = Server::http(legacy, 8080)?;
    let vip = "10.96.0.10:80";
    let policy = format!(
        r#"[[services]]
name = "orders"
addresses = ["{vip}"]
endpoints = [
  {{ address = "{}", labels = {{ version = "v1" }} }},
  {{ address = "{}", labels = {{ version = "v2" }} }},
]
subsets = [{{ name = "v1", labels = {{ version = "v1" }} }}, {{ name = "v2", labels = {{ version = "v2" }} }}]

[[services.routes]]
name = "canary"
match = {{ headers = {{ x-canary = "true" }} }}
split = [{{ subset = "v2", weight = 100 }}]

[[services.routes]]
name = "default"
split = [{{ subset = "v1", weight = 90 }}, {{ subset = "v2", weight = 10 }}]
"#,
        orders.addr(8080),
        legacy.addr(8080)
    );
    let file = daemon.dir().join("orders-policy.toml");
    std::fs::write(&file, &policy)?;
    println!(
        "      v1 = orders {} , v2 = legacy {} ; the app calls http://{vip}/",
        orders.addr(8080),
        legacy.addr(8080)
    );
    println!("      $ sockmesh routes apply {}", file.display());
    for l in policy.lines() {
        println!("        | {l}");
    }
    let out = daemon.cli(&["routes", "apply", &file.to_string_lossy()])?;
    println!("      {}", String::from_utf8_lossy(&out.stdout).trim());

    let url = format!("http://{vip}/catalog");
    let n = 1000;
    let (a1, a2) = (served(v1), served(&v2));
    let bad = curl_batch(frontend, &url, n, None)?;
    let (b1, b2) = (served(v1), served(&v2));
    let (d1, d2) = (b1 - a1, b2 - a2);
    println!(
        "      {n} x curl {url}: v1 served {d1} ({:.1}%), v2 served {d2} ({:.1}%), non-200: {}",
        100.0 * d1 as f64 / n as f64,
        100.0 * d2 as f64 / n as f64,
        bad.len()
    );
    if !bad.is_empty() || d1 + d2 != n {
        let codes: BTreeSet<&String> = bad.iter().collect();
        bail!(
            "routing lost requests: {} non-200 (codes {codes:?}), {} served of {n}",
            bad.len(),
            d1 + d2
        );
    }
    let bad = curl_batch(frontend, &url, 100, Some("x-canary: true"))?;
    let (c1, c2) = (served(v1), served(&v2));
    println!(
        "      100 x curl -H 'x-canary: true' {url}: v1 served {}, v2 served {}, non-200: {}",
        c1 - b1,
        c2 - b2,
        bad.len()
    );
    if c2 - b2 != 100 {
        bail!("the canary header was not honoured: v2 served {} of 100", c2 - b2);
    }
    println!("\n$ sockmesh routes");
    let out = daemon.cli(&["routes"])?;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {l}");
    }
    Ok(())
}

/// The colour scene's services: `shop` (endpoints in `orders`, each calling `stock`) and `stock`
/// (endpoints in `legacy`). Their VIPs belong to nobody: the connects are captured first.
const SHOP_VIP: &str = "10.96.0.20:80";
const STOCK_VIP: &str = "10.96.0.21:80";
/// `shop`'s endpoints in `orders`, by colour. The base one is also an inbound port of `orders`
/// (enrolled in step 6), so a colour sent to it from outside the mesh meets sockmesh.
const SHOP_BASE_PORT: u16 = 8101;
const SHOP_PORTS: [(&str, u16); 3] = [("base", SHOP_BASE_PORT), ("gray", 8102), ("stress", 8103)];
/// `stock`'s endpoints in `legacy`: no stress endpoint, so stress must stop before it.
const STOCK_PORTS: [(&str, u16); 2] = [("base", 8201), ("gray", 8202)];
const CHAIN_LOAD_SECONDS: u64 = 60;

/// The colour policy for the scene: `gray` falls back to base, `stress` to nothing.
fn colour_policy(orders: &Pod, legacy: &Pod) -> String {
    let endpoints = |pod: &Pod, ports: &[(&str, u16)]| -> String {
        ports
            .iter()
            .map(|&(colour, port)| {
                let labels = if colour == "base" {
                    String::new()
                } else {
                    format!(", labels = {{ colour = \"{colour}\" }}")
                };
                format!("  {{ address = \"{}\"{labels} }},\n", pod.addr(port))
            })
            .collect()
    };
    format!(
        r#"[[colours]]
name = "gray"
id = 1
fallback = "base"

[[colours]]
name = "stress"
id = 2
fallback = "none"

[[services]]
name = "shop"
addresses = ["{SHOP_VIP}"]
protocol = "http1"
endpoints = [
{}]

[[services]]
name = "stock"
addresses = ["{STOCK_VIP}"]
protocol = "http1"
endpoints = [
{}]
"#,
        endpoints(orders, &SHOP_PORTS),
        endpoints(legacy, &STOCK_PORTS)
    )
}

/// What `chain_app.py load` reported: answers ("<status> <body>") and their counts, errors.
struct ChainLoad {
    answers: BTreeMap<String, u64>,
    sent: u64,
    errors: u64,
}

impl ChainLoad {
    /// How many answers start with `prefix`.
    fn count(&self, prefix: &str) -> u64 {
        self.answers
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    fn describe(&self) -> String {
        self.answers
            .iter()
            .map(|(k, n)| format!("{n} x `{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `n` requests from `pod` to `target` by `chain_app.py load` (4 keep-alive connections), each
/// with `x-mesh-colour: <colour>` unless `colour` is "base".
fn chain_load(pod: &Pod, target: &str, n: u32, colour: &str) -> Result<ChainLoad> {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(peers_dir().join("chain_app.py")).args([
        "load",
        "--target",
        target,
        "--requests",
        &n.to_string(),
        "--concurrency",
        "4",
        "--mix",
        colour,
        "--seconds-limit",
        &CHAIN_LOAD_SECONDS.to_string(),
    ]);
    let out = exec_in(
        &pod.cgroup,
        Some(&pod.netns),
        cmd,
        Duration::from_secs(CHAIN_LOAD_SECONDS + 30),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| {
        anyhow!(
            "chain_app.py load from {} printed no summary: {stdout} {}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let v: Value = serde_json::from_str(line).context("chain_app.py load summary")?;
    let answers = v["by_kind"][colour]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    Ok(ChainLoad {
        answers,
        sent: v["sent"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0),
    })
}

/// What one chain endpoint has served so far, by the colour header it received ("none": no
/// header): `GET /__stats`, asked from inside its own pod at the pod's own address.
fn endpoint_served(pod: &Pod, port: u16) -> Result<BTreeMap<String, u64>> {
    let url = format!("http://{}/__stats", pod.addr(port));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", &url]);
    let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(10))?;
    check_output(&format!("curl {url}"), &out)?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("stats of {url}"))?;
    Ok(v["served"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

/// Every chain endpoint's served counts: (service, endpoint colour) → {received colour: n}.
type Served = BTreeMap<(&'static str, &'static str), BTreeMap<String, u64>>;

fn all_served(orders: &Pod, legacy: &Pod) -> Result<Served> {
    let mut out = BTreeMap::new();
    for &(colour, port) in &SHOP_PORTS {
        out.insert(("shop", colour), endpoint_served(orders, port)?);
    }
    for &(colour, port) in &STOCK_PORTS {
        out.insert(("stock", colour), endpoint_served(legacy, port)?);
    }
    Ok(out)
}

/// What an endpoint received between two readings, colour by colour (non-zero only).
fn served_delta(before: &Served, after: &Served, key: (&'static str, &'static str)) -> BTreeMap<String, u64> {
    let empty = BTreeMap::new();
    let b = before.get(&key).unwrap_or(&empty);
    after
        .get(&key)
        .unwrap_or(&empty)
        .iter()
        .map(|(c, n)| (c.clone(), n - b.get(c).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn colour_metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
    Ok(prom_value(&d.metrics()?, name, labels).unwrap_or(0.0) as u64)
}

/// One kind of request of the colour scene: what was sent, then what happened.
fn scene_line(label: &str, sent: &str, result: &str) {
    println!("      {label:<8} {sent}");
    println!("      {:<8} => {result}", "");
}

/// Two services in a chain, shop -> stock, each with a base and a gray endpoint; shop also has a
/// stress endpoint, stock has none. The endpoints are `chain_app.py` servers that answer with
/// the path the request took (`shop/gray stock/gray`) and forward the colour header they got.
/// The policy goes to the running daemon with `sockmesh routes apply`, like step 7's.
fn colour_tour(node: &VirtualNode, daemon: &Daemon) -> Result<()> {
    let (frontend, orders, legacy) = (node.pod("frontend"), node.pod("orders"), node.pod("legacy"));
    let mut servers = Vec::new();
    for (pod, service, next, ports) in [
        (orders, "shop", Some(STOCK_VIP), &SHOP_PORTS[..]),
        (legacy, "stock", None, &STOCK_PORTS[..]),
    ] {
        for &(colour, port) in ports {
            let mut cmd = Command::new(python());
            cmd.arg("-u").arg(peers_dir().join("chain_app.py")).args([
                "serve",
                "--port",
                &port.to_string(),
                "--name",
                service,
                "--colour",
                colour,
            ]);
            if let Some(next) = next {
                cmd.args(["--next", next, "--forward"]);
            }
            servers.push(Server::start(&pod.cgroup, Some(&pod.netns), cmd)?);
        }
    }
    let ports = |ps: &[(&str, u16)]| {
        ps.iter()
            .map(|(c, p)| format!("{c} :{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "      shop  = {SHOP_VIP}, endpoints in orders ({}), each calls stock",
        ports(&SHOP_PORTS)
    );
    println!(
        "      stock = {STOCK_VIP}, endpoints in legacy ({}): no stress endpoint",
        ports(&STOCK_PORTS)
    );
    println!("      (tests/peers/chain_app.py: answers with the path it took, forwards x-mesh-colour)");
    let policy = colour_policy(orders, legacy);
    let file = daemon.dir().join("colour-policy.toml");
    std::fs::write(&file, &policy)?;
    println!("      $ sockmesh routes apply {}", file.display());
    for l in policy.lines() {
        println!("        | {l}");
    }
    let out = daemon.cli(&["routes", "apply", &file.to_string_lossy()])?;
    println!("      {}", String::from_utf8_lossy(&out.stdout).trim());

    let n = 200;
    let mut problems = Vec::new();
    let s0 = all_served(orders, legacy)?;

    // Gray, from a pod in the mesh: every hop stays gray.
    let gray = chain_load(frontend, SHOP_VIP, n, "gray")?;
    let gray_ok = gray.count("200 shop/gray stock/gray");
    let s1 = all_served(orders, legacy)?;
    // What the endpoints themselves received: the gray ones the header, the base ones nothing.
    let at = |k| served_delta(&s0, &s1, k);
    let gray_received = at(("stock", "gray")).get("gray").copied().unwrap_or(0);
    let gray_at_base: u64 =
        at(("shop", "base")).values().sum::<u64>() + at(("stock", "base")).values().sum::<u64>();
    scene_line(
        "gray",
        &format!("{n} x `x-mesh-colour: gray`, frontend -> shop"),
        &format!(
            "{gray_ok} answered `shop/gray stock/gray`, {} otherwise, {} errors; stock/gray got \
             the header {gray_received} times, base endpoints served {gray_at_base}",
            gray.sent - gray_ok,
            gray.errors
        ),
    );
    if gray_ok != u64::from(n) || gray.errors > 0 || gray_received != u64::from(n) || gray_at_base > 0 {
        problems.push(format!("gray left its colour: {}", gray.describe()));
    }

    // Base: never reaches a gray (or stress) endpoint.
    let base = chain_load(frontend, SHOP_VIP, n, "base")?;
    let base_ok = base.count("200 shop/base stock/base");
    let s2 = all_served(orders, legacy)?;
    let base_at_coloured: u64 = [("shop", "gray"), ("shop", "stress"), ("stock", "gray")]
        .into_iter()
        .map(|k| served_delta(&s1, &s2, k).values().sum::<u64>())
        .sum();
    scene_line(
        "base",
        &format!("{n} x no colour, frontend -> shop"),
        &format!(
            "{base_ok} answered `shop/base stock/base`, {} errors; gray and stress endpoints \
             served {base_at_coloured}",
            base.errors
        ),
    );
    if base_ok != u64::from(n) || base.errors > 0 || base_at_coloured > 0 {
        problems.push(format!(
            "base reached a coloured endpoint: {} (coloured endpoints served {base_at_coloured})",
            base.describe()
        ));
    }

    // Stress: shop has a stress endpoint, stock does not, and stress falls back to nothing.
    let unavailable = |d: &Daemon| {
        colour_metric(
            d,
            "sockmesh_colour_unavailable_total",
            &[("service", "stock"), ("colour", "stress")],
        )
    };
    let u0 = unavailable(daemon)?;
    let stress_n = 50;
    let stress = chain_load(frontend, SHOP_VIP, stress_n, "stress")?;
    let refused = stress.count("503 shop/stress");
    let s_stress = all_served(orders, legacy)?;
    let stock_stress: u64 = STOCK_PORTS
        .iter()
        .map(|&(c, _)| {
            served_delta(&s2, &s_stress, ("stock", c))
                .get("stress")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    scene_line(
        "stress",
        &format!("{stress_n} x `x-mesh-colour: stress`, frontend -> shop"),
        &format!(
            "{refused} reached shop/stress and were refused (503) at the stock hop; stock served \
             {stock_stress} stress requests"
        ),
    );
    if refused != u64::from(stress_n) || stock_stress > 0 {
        problems.push(format!(
            "stress was not refused before stock: {}",
            stress.describe()
        ));
    }
    // The refusal itself, asked of stock directly.
    let url = format!("http://{STOCK_VIP}/");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-i",
        "--max-time",
        "15",
        "-H",
        "x-mesh-colour: stress",
        &url,
    ]);
    let out = exec_in(
        &frontend.cgroup,
        Some(&frontend.netns),
        cmd,
        Duration::from_secs(30),
    )?;
    check_output(&format!("curl {url}"), &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let head: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("HTTP/") || l.to_ascii_lowercase().starts_with("sockmesh-error"))
        .collect();
    println!("               $ curl -si -H 'x-mesh-colour: stress' {url}   (from frontend)");
    for l in &head {
        println!("                 {l}");
    }
    if !head.iter().any(|l| l.starts_with("HTTP/1.1 503"))
        || !head
            .iter()
            .any(|l| l.eq_ignore_ascii_case("sockmesh-error: colour_unavailable"))
    {
        problems.push(format!(
            "stress to stock was not refused as colour_unavailable: {text}"
        ));
    }
    let u1 = unavailable(daemon)?;
    println!(
        "               sockmesh_colour_unavailable_total{{service=\"stock\",colour=\"stress\"}} +{} \
         (the chain's and curl's)",
        u1 - u0
    );
    if u1 - u0 != u64::from(stress_n) + 1 {
        problems.push(format!(
            "colour_unavailable counted {} refusals, expected {}",
            u1 - u0,
            stress_n + 1
        ));
    }

    // From outside the mesh: legacy is not enrolled. It calls shop's base endpoint directly
    // (an inbound port of orders) claiming gray; sockmesh strips the header on the way in.
    let stripped = |d: &Daemon| colour_metric(d, "sockmesh_colour_stripped_total", &[]);
    let st0 = stripped(daemon)?;
    let s3 = all_served(orders, legacy)?;
    let outside_n = 50;
    let shop_base = orders.addr(SHOP_BASE_PORT);
    let outside = chain_load(legacy, &shop_base, outside_n, "gray")?;
    let s4 = all_served(orders, legacy)?;
    let outside_base = outside.count("200 shop/base stock/base");
    let got = served_delta(&s3, &s4, ("shop", "base"));
    let st1 = stripped(daemon)?;
    scene_line(
        "outside",
        &format!(
            "{outside_n} x `x-mesh-colour: gray`, legacy (not in the mesh) -> shop's base endpoint \
             {shop_base}"
        ),
        &format!(
            "{outside_base} answered `shop/base stock/base`; shop/base received {}; \
             sockmesh_colour_stripped_total +{}",
            got.iter()
                .map(|(c, n)| match c.as_str() {
                    "none" => format!("{n} with no colour header"),
                    c => format!("{n} with `x-mesh-colour: {c}`"),
                })
                .collect::<Vec<_>>()
                .join(", "),
            st1 - st0
        ),
    );
    if outside_base != u64::from(outside_n)
        || got.contains_key("gray")
        || got.get("none").copied().unwrap_or(0) != u64::from(outside_n)
        || st1 - st0 < u64::from(outside_n)
    {
        problems.push(format!(
            "an outside colour was believed: {} (stripped +{})",
            outside.describe(),
            st1 - st0
        ));
    }

    println!("\n$ sockmesh routes   (the colour lines)");
    let out = daemon.cli(&["routes"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut in_colours = false;
    for l in text.lines() {
        in_colours |= l.starts_with("colours:");
        if in_colours || l.starts_with("service ") || (l.starts_with("  subset ") && l.contains(" (")) {
            println!("  {l}");
        }
    }
    drop(servers);
    if !problems.is_empty() {
        bail!("colours did not hold:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let headers = [
        "from",
        "request",
        "captured",
        "original dst (sockmesh status)",
        "server saw client",
        "result",
    ];
    let cells: Vec<[&str; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.from.as_str(),
                r.request.as_str(),
                r.captured.as_str(),
                r.original_dst.as_str(),
                r.server_saw.as_str(),
                r.result.as_str(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.len());
        }
    }
    let line = |vals: [&str; 6]| {
        let mut s = String::from(" ");
        for (i, v) in vals.iter().enumerate() {
            s.push_str(&format!(" {v:<w$} |", w = widths[i]));
        }
        s.pop();
        println!("{}", s.trim_end());
    };
    line(headers);
    println!(
        "  {}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for c in cells {
        line(c);
    }
}
