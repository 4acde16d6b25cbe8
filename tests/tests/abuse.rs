//! Abuse from one pod must not starve normal requests from another (issue 11, item 5), and
//! 10,000 idle keep-alive connections through one node cost little memory, little CPU, and give
//! their memory and descriptors back when they close.
//!
//! One pod (`abuser`) runs a slowloris client, a connect flood, a flood of held connections
//! and 10,000 idle keep-alive connections, one at a time, against a server pod (`victim`).
//! Meanwhile a normal client in another pod (`client`) sends HTTP/1.1 requests at a constant
//! 200 requests/s through the mesh to its own server (`web`), both services routed by the
//! proxy's HTTP/1.1 path. Its p99 is measured without abuse and during each abuse.
//!
//! **The bound** ([`P99_BOUND`]): during any abuse the normal client's p99 (the median of three
//! 2-second windows' p99s) stays under 250 ms and none of its requests fails. What starvation looks like is not a slower millisecond: a
//! client whose connection was refused, whose requests queue behind a blocked worker or whose
//! descriptors were taken fails requests or waits seconds (the client's time-out is 5 s). The
//! bound must hold on a loaded 2-core machine: on this VM, with a TCG qemu guest and two
//! compilers running beside the test (load average 8.5), the p99 *without* any abuse was
//! 19-31 ms and single requests took 60 ms (the client waits for a core behind the other
//! runnable threads), so a bound relative to that baseline would measure the neighbours, not
//! the abuse. 250 ms is eight times that loaded baseline and still catches a quarter-second
//! stall. The numbers of each run are printed (`--nocapture`).

use std::time::{Duration, Instant};

use sockmesh_tests::abuse::{self, Latency};
use sockmesh_tests::daemon::{basic_config, pod_toml, prom_value};
use sockmesh_tests::{peer_command, require_privileged, Daemon, LineChild, Server, VirtualNode};

/// The normal client's rate, and the measuring windows per phase.
const RPS: u64 = 200;
const SECS: u64 = 2;
const WINDOWS: usize = 3;
/// See the module doc.
const P99_BOUND: Duration = Duration::from_millis(250);

const WEB_PORT: u16 = 8080;
const VICTIM_HTTP_PORT: u16 = 8081;
const VICTIM_WHOAMI_PORT: u16 = 7000;
const VICTIM_ECHO_PORT: u16 = 9000;

/// The 10,000 idle connections' goal: daemon RSS per connection (issue 11).
const IDLE_CONNS: usize = 10_000;
const RSS_GOAL_BYTES_PER_CONN: u64 = 8 * 1024;

/// A node with the four pods, their servers and a daemon routing both HTTP services.
struct Mesh {
    daemon: Daemon,
    _servers: Vec<Server>,
    node: VirtualNode,
}

impl Mesh {
    /// `limits`: the `[limits]` lines of the config.
    fn start(limits: &str) -> Mesh {
        let node = VirtualNode::new(&["abuser", "client", "web", "victim"]).expect("virtual node");
        let (web, victim) = (node.pod("web"), node.pod("victim"));
        let servers = vec![
            abuse::http_server(web, WEB_PORT).expect("web server"),
            abuse::http_server(victim, VICTIM_HTTP_PORT).expect("victim http server"),
            Server::peer(victim, VICTIM_WHOAMI_PORT, "whoami").expect("victim whoami server"),
            abuse::async_echo_server(victim, VICTIM_ECHO_PORT).expect("victim echo server"),
        ];
        let service = |name: &str, addr: String| {
            format!(
                "\n[[services]]\nname = \"{name}\"\naddresses = [\"{addr}\"]\nprotocol = \"http1\"\n\
                 endpoints = [{{ address = \"{addr}\" }}]\n"
            )
        };
        let cfg = basic_config(
            &node,
            &format!(
                "{}\n{}{}{}{}",
                if limits.is_empty() {
                    String::new()
                } else {
                    format!("[limits]\n{limits}")
                },
                service("web", web.addr(WEB_PORT)),
                service("victim", victim.addr(VICTIM_HTTP_PORT)),
                pod_toml(node.pod("abuser"), ""),
                pod_toml(node.pod("client"), ""),
            ),
        );
        let daemon = Daemon::start(&node, &cfg).expect("daemon");
        Mesh {
            daemon,
            _servers: servers,
            node,
        }
    }

    /// The normal client's latency over [`WINDOWS`] windows of [`SECS`] s: requests summed, the
    /// p99 the median of the windows' p99s (a neighbour's burst on this shared machine spoils
    /// one window; starvation by the abuse spoils all of them).
    fn client_p99(&self, what: &str) -> Latency {
        let web = self.node.pod("web").addr(WEB_PORT);
        let runs: Vec<Latency> = (0..WINDOWS)
            .map(|_| abuse::measure_rate(self.node.pod("client"), &web, RPS, SECS).expect("peer rate"))
            .collect();
        let mut p99s: Vec<u64> = runs.iter().map(|l| l.p99_us).collect();
        p99s.sort_unstable();
        let mut p50s: Vec<u64> = runs.iter().map(|l| l.p50_us).collect();
        p50s.sort_unstable();
        let l = Latency {
            sent: runs.iter().map(|l| l.sent).sum(),
            ok: runs.iter().map(|l| l.ok).sum(),
            failed: runs.iter().map(|l| l.failed).sum(),
            p50_us: p50s[p50s.len() / 2],
            p99_us: p99s[p99s.len() / 2],
            max_us: runs.iter().map(|l| l.max_us).max().unwrap_or(0),
        };
        eprintln!(
            "{what}: {} of {} ok, p50 {} us, p99 {} us (windows: {:?} us), max {} us",
            l.ok,
            l.sent,
            l.p50_us,
            l.p99_us,
            runs.iter().map(|l| l.p99_us).collect::<Vec<_>>(),
            l.max_us
        );
        l
    }

    /// The normal client's p99 during an abuse: bounded, and nothing failed.
    fn check_not_starved(&self, what: &str, l: Latency) {
        assert_eq!(l.failed, 0, "{what}: the normal client's requests failed: {l:?}");
        assert_eq!(l.ok, l.sent, "{what}: {l:?}");
        assert!(
            Duration::from_micros(l.p99_us) <= P99_BOUND,
            "{what}: the normal client's p99 is {} us, over the {P99_BOUND:?} bound: {l:?}",
            l.p99_us
        );
    }

    fn abuser(&self, args: &[&str]) -> LineChild {
        let mut cmd = peer_command();
        cmd.args(args);
        let pod = self.node.pod("abuser");
        LineChild::spawn(&pod.cgroup, Some(&pod.netns), cmd).expect("abuser")
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        prom_value(&self.daemon.metrics().expect("metrics"), name, labels).unwrap_or(0.0)
    }

    fn proxy_error(&self, reason: &str) -> f64 {
        self.metric("sockmesh_proxy_errors_total", &[("reason", reason)])
    }

    fn protocol_error(&self, protocol: &str, reason: &str) -> f64 {
        self.metric(
            "sockmesh_protocol_errors_total",
            &[("protocol", protocol), ("reason", reason)],
        )
    }
}

/// The last JSON line of a finished abuser (bounded wait).
fn abuser_report(mut a: LineChild, within: Duration) -> serde_json::Value {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = a.recv_line(left).expect("abuser report");
        if line.starts_with('{') {
            return serde_json::from_str(&line).expect("abuser JSON");
        }
    }
}

#[test]
fn slowloris_and_connect_floods_from_one_pod_do_not_starve_another_pod() {
    if !require_privileged() {
        return;
    }
    // A 2 s head time-out keeps the test short (default 10 s); a cap of 1,000 connections per
    // pod lets a flood of held connections reach it.
    let mesh = Mesh::start("request_head_timeout_ms = 2000\nmax_connections_per_pod = 1000");
    let victim = mesh.node.pod("victim");
    let _ = mesh.client_p99("warm-up");
    let base = mesh.client_p99("no abuse");
    mesh.check_not_starved("no abuse", base);

    // (a) Slowloris: 300 connections trickling a request head that never ends, for 12 s.
    let slow = mesh.abuser(&[
        "slowloris",
        "--connect",
        &victim.addr(VICTIM_HTTP_PORT),
        "--conns",
        "300",
        "--seconds",
        "12",
        "--interval-ms",
        "500",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let l = mesh.client_p99("slowloris");
    let report = abuser_report(slow, Duration::from_secs(30));
    eprintln!("slowloris: {report}");
    mesh.check_not_starved("slowloris", l);
    let closed = report["closed"].as_u64().unwrap_or(0) + report["resets"].as_u64().unwrap_or(0);
    assert!(
        closed >= 300,
        "every slow connection is closed 2 s into its head (300 connections, 12 s): {report}"
    );
    assert!(
        report["got_408"].as_u64().unwrap_or(0) > 0,
        "and answered 408 first: {report}"
    );
    let timeouts = mesh.protocol_error("http1", "header_timeout");
    assert!(timeouts >= 300.0, "counted as header_timeout: {timeouts}");

    // (b) Connect flood: 4 threads connecting (and closing) as fast as they can for 8 s.
    let flood = mesh.abuser(&[
        "conns",
        "--connect",
        &victim.addr(VICTIM_WHOAMI_PORT),
        "--seconds",
        "8",
        "--threads",
        "4",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let l = mesh.client_p99("connect flood");
    let report = abuser_report(flood, Duration::from_secs(40));
    eprintln!(
        "connect flood: {} connections in {} ms",
        report["ok"], report["elapsed_ms"]
    );
    mesh.check_not_starved("connect flood", l);

    // (b') A flood of held connections: 3,000 against a cap of 1,000. The first 1,000 are
    // served; the rest are reset and counted; the other pod's connections are not capped by it.
    let refused_before = mesh.proxy_error("pod_connection_limit");
    let mut hold = mesh.abuser(&[
        "hold",
        "--connect",
        &victim.addr(VICTIM_HTTP_PORT),
        "--conns",
        "3000",
        "--proto",
        "http",
        "--seconds",
        "60",
    ]);
    let held = hold.recv_line(Duration::from_secs(60)).expect("hold: held line");
    eprintln!("held flood: {held}");
    // What an operator sees: the cap, and the pod sitting at it.
    let st = mesh.daemon.status().expect("status");
    assert_eq!(
        st["open_files"]["per_pod_connection_cap"], 1000,
        "{}",
        st["open_files"]
    );
    let abuser = st["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "abuser"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(abuser["connections_held"], 1000, "{abuser}");
    let text = mesh.daemon.status_text().expect("status text");
    assert!(text.contains("connections per pod at most 1000"), "{text}");
    let l = mesh.client_p99("held connections at the pod's cap");
    hold.close_stdin();
    let report = abuser_report(hold, Duration::from_secs(30));
    mesh.check_not_starved("held connections at the pod's cap", l);
    let refused = mesh.proxy_error("pod_connection_limit") - refused_before;
    eprintln!("held flood: {report}, pod_connection_limit +{refused}");
    assert_eq!(report["held"], 1000, "exactly the cap is served: {report}");
    assert_eq!(report["failed"], 2000, "{report}");
    assert_eq!(refused, 2000.0, "each refused connection is counted");
    assert!(
        mesh.daemon.log().contains("pod_connection_limit"),
        "the log names the counter"
    );
    let after = mesh.client_p99("no abuse, after");
    mesh.check_not_starved("no abuse, after", after);
    // Under the cap again: the abuser is served.
    let l = abuse::measure_rate(mesh.node.pod("abuser"), &victim.addr(VICTIM_HTTP_PORT), 50, 1)
        .expect("abuser rate");
    assert_eq!(l.ok, l.sent, "the abuser is served again below its cap: {l:?}");
}

/// What one round of [`IDLE_CONNS`] idle connections cost the daemon.
#[derive(Debug)]
struct IdleReport {
    rss_before_kib: u64,
    rss_held_kib: u64,
    rss_after_kib: u64,
    fds_before: usize,
    fds_held: usize,
    fds_after: usize,
    idle_cpu_percent: f64,
    held: u64,
    p99_held: Latency,
}

impl IdleReport {
    fn bytes_per_conn(&self) -> u64 {
        (self.rss_held_kib.saturating_sub(self.rss_before_kib) * 1024) / self.held.max(1)
    }
}

/// Holds [`IDLE_CONNS`] connections from the abuser to `target` (`proto`: `http` or `echo`,
/// one exchange each, then idle) for at least `min_hold`, measuring the daemon and the normal
/// client meanwhile; then closes them and measures what the daemon gave back.
fn idle_round(mesh: &Mesh, target: &str, proto: &str, conns: usize, min_hold: Duration) -> IdleReport {
    let pid = mesh.daemon.pid();
    let _ = mesh.client_p99("warm-up");
    let rss_before_kib = abuse::rss_kib(pid).unwrap();
    let fds_before = abuse::open_fds(pid).unwrap();
    let n = conns.to_string();
    let mut hold = mesh.abuser(&[
        "hold",
        "--connect",
        target,
        "--conns",
        &n,
        "--proto",
        proto,
        "--seconds",
        "300",
    ]);
    let held_line = hold.recv_line(Duration::from_secs(240)).expect("hold: held line");
    let held_at = Instant::now();
    eprintln!("{proto}: {held_line}");
    let held: u64 = held_line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("held N");
    assert_eq!(held, conns as u64, "every connection opened: {held_line}");
    // Idle CPU: the daemon's CPU time over 5 s with every connection idle.
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = abuse::cpu_secs(pid).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu_percent = (abuse::cpu_secs(pid).unwrap() - cpu0) / 5.0 * 100.0;
    let rss_held_kib = abuse::rss_kib(pid).unwrap();
    let fds_held = abuse::open_fds(pid).unwrap();
    eprintln!(
        "{proto}: anon RSS {} KiB while held",
        abuse::rss_anon_kib(pid).unwrap_or(0)
    );
    let p99_held = mesh.client_p99(&format!("{conns} idle {proto} connections held"));
    if let Some(left) = min_hold.checked_sub(held_at.elapsed()) {
        std::thread::sleep(left);
    }
    hold.close_stdin();
    let report = abuser_report(hold, Duration::from_secs(120));
    eprintln!("{proto}: {report}");
    assert_eq!(
        report["closed_while_held"],
        0,
        "no idle connection was closed while held ({:?}): {report}",
        held_at.elapsed()
    );
    // Closed: the descriptors come back at once, the memory after the trim.
    sockmesh_tests::eventually(Duration::from_secs(30), || {
        let fds = abuse::open_fds(pid)?;
        anyhow::ensure!(
            fds <= fds_before + 64,
            "{fds} descriptors open (before: {fds_before})"
        );
        Ok(())
    })
    .expect("descriptors given back");
    // The daemon trims its heap every 2 s after connections closed (conn/pod.rs MemoryTrim):
    // wait (bounded) until RSS is three quarters of the way back, or report what it is.
    let back_to = rss_before_kib + rss_held_kib.saturating_sub(rss_before_kib) / 4;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    std::thread::sleep(Duration::from_secs(3));
    while abuse::rss_kib(pid).unwrap() > back_to && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = IdleReport {
        rss_before_kib,
        rss_held_kib,
        rss_after_kib: abuse::rss_kib(pid).unwrap(),
        fds_before,
        fds_held,
        fds_after: abuse::open_fds(pid).unwrap(),
        idle_cpu_percent,
        held,
        p99_held,
    };
    eprintln!(
        "{proto}: RSS {} -> {} -> {} KiB ({} bytes per connection), fds {} -> {} -> {}, idle CPU {:.2} %",
        r.rss_before_kib,
        r.rss_held_kib,
        r.rss_after_kib,
        r.bytes_per_conn(),
        r.fds_before,
        r.fds_held,
        r.fds_after,
        r.idle_cpu_percent
    );
    r
}

/// The checks both kinds of idle connections share.
fn check_idle(mesh: &Mesh, what: &str, r: &IdleReport, fds_per_conn: usize) {
    mesh.check_not_starved(what, r.p99_held);
    assert!(
        r.fds_held >= r.fds_before + fds_per_conn * r.held as usize,
        "{what}: the daemon holds the connections: {r:?}"
    );
    assert!(
        r.bytes_per_conn() <= RSS_GOAL_BYTES_PER_CONN,
        "{what}: {} bytes of daemon RSS per idle connection, over the {RSS_GOAL_BYTES_PER_CONN} goal: {r:?}",
        r.bytes_per_conn()
    );
    assert!(
        r.idle_cpu_percent < 5.0,
        "{what}: idle connections cost {:.2} % CPU: {r:?}",
        r.idle_cpu_percent
    );
    // Memory given back: RSS falls at least three quarters of the way back to where it was.
    let grown = r.rss_held_kib.saturating_sub(r.rss_before_kib);
    assert!(
        r.rss_after_kib <= r.rss_before_kib + grown / 4,
        "{what}: RSS stays near its peak after the connections closed: {r:?}"
    );
}

/// How many idle connections this machine's descriptor limit lets the daemon hold, `per_conn`
/// descriptors each, up to [`IDLE_CONNS`] (the hard limit here is 20,000 and a relayed
/// connection takes two descriptors in the daemon).
fn idle_conns(per_conn: usize) -> usize {
    let (_, hard) = sockmesh_tests::abuse::nofile();
    IDLE_CONNS.min((hard as usize).saturating_sub(2_000) / per_conn)
}

/// One pod holds them all: the per-pod cap (by default a quarter of the open-files limit, 5,000
/// here) is set above.
const IDLE_LIMITS: &str = "max_connections_per_pod = 12000";

#[test]
fn ten_thousand_idle_http_keep_alive_connections_are_cheap_and_given_back() {
    if !require_privileged() {
        return;
    }
    let mesh = Mesh::start(IDLE_LIMITS);
    let victim = mesh.node.pod("victim").addr(VICTIM_HTTP_PORT);
    // Held past the default 10 s head time-out: an idle keep-alive connection is not a slow head.
    let n = idle_conns(1);
    assert_eq!(
        n, IDLE_CONNS,
        "the descriptor limit allows 10,000 HTTP connections"
    );
    let r = idle_round(&mesh, &victim, "http", n, Duration::from_secs(15));
    check_idle(&mesh, "idle HTTP/1.1 keep-alive", &r, 1);
    assert_eq!(
        mesh.protocol_error("http1", "header_timeout"),
        0.0,
        "idle connections are not counted as slow heads"
    );
}

#[test]
fn ten_thousand_idle_relayed_connections_are_cheap_and_given_back() {
    if !require_privileged() {
        return;
    }
    let mesh = Mesh::start(IDLE_LIMITS);
    let echo = mesh.node.pod("victim").addr(VICTIM_ECHO_PORT);
    let r = idle_round(&mesh, &echo, "echo", idle_conns(2), Duration::ZERO);
    check_idle(&mesh, "idle relayed TCP", &r, 2);
}
