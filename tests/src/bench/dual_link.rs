//! The dual-link row of the bench (issue 10, docs/dual-link.md): how warm a kept-alive link is
//! when `sockmesh switch --to X --over 0` makes it active.
//!
//! The scenario of `tests/dual_link.rs` and the demo ([`crate::dual_link`]): pod `app` runs
//! trade (port 8001) and forest (8002), each a `link_app.py` with a cache that is cold after
//! start and a pool of backend connections that cost 40 ms each to open; pod `pool` runs both
//! too (where a keep-alive link's requests move); where the cgroup v1 `cpu` and `memory`
//! hierarchies are mounted each of `app`'s apps runs in its own link cgroups, so the keep-alive
//! CPU cap (1.5 % of a CPU) is real. One constant-rate load ([`RATE`]/s to each app, for the
//! whole row) and `switches` switches, alternating forest, trade, forest, ... [`PHASE_MS`]
//! apart. For each switch: p50/p99/max of the first [`WINDOW`] requests the newly active app
//! served, against the p99 of the last [`WINDOW`] it served before the next switch (steady
//! traffic of the same link later in the same run, so both see the same machine); the median
//! warm/steady ratio over the switches is the figure. Also per switch, for where the warm
//! window's slow requests come from: how many of them (above the steady p99) were sent in the
//! first 500 ms, the cache misses and upstream connections the app saw in the window, requests
//! the app itself took > 5 ms over, and the CFS throttling of the link's `cpu` cgroup in each
//! window. Last, a cold-started copy of the app gets the same traffic alone (the warm-vs-cold
//! comparison).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::report::median;
use crate::cgroup::V1LinkCgroups;
use crate::daemon::{basic_config, pod_toml, Daemon};
use crate::dual_link::{self, events, pct, Ev, Links, Load};
use crate::node::VirtualNode;
use crate::process::exec_in;
use crate::servers::Server;
use crate::util::last_json;

/// Requests per second to each link's app.
pub const RATE: u32 = 250;
/// Requests in a warm and in a steady window (the "first 1,000 requests").
pub const WINDOW: usize = 1000;
/// From one switch to the next: a warm window, a gap, a steady window.
pub const PHASE_MS: u64 = 9000;
const CONCURRENCY: u32 = 8;
const KEYS: u32 = 15;
const HEALTH_EVERY: u32 = 50;
/// The longest wait for the keep-alive trickle to fill forest's cache before the first switch.
const WARMUP_MAX_MS: u64 = 6000;
/// Slow requests are split at this many ms after the switch.
const EARLY_MS: u64 = 500;
const LINKS: [&str; 2] = ["trade", "forest"];
/// When the switch's pre-connect is read: after the warm window ([`WINDOW`] / [`RATE`] = 4 s),
/// before the steady one (the last 4 s of the phase).
const GAP_AT_MS: u64 = 4400;
/// How far before a switch the keep-alive throttling is looked at.
const KEEPALIVE_LOOK_MS: u64 = 4000;

/// p50, p99 and max in ms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Pcts {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Pcts {
    pub fn of(l: Vec<f64>) -> Pcts {
        let (p50, p99, max) = pct(l);
        Pcts { p50, p99, max }
    }

    pub fn text(&self) -> String {
        format!("{:.2} / {:.2} / {:.2}", self.p50, self.p99, self.max)
    }
}

/// A link's cgroups over a window: CFS throttling (v1 `cpu.stat`) and major page faults
/// (v1 `memory.stat` `total_pgmajfault`: pages the keep-alive memory limit reclaimed and the
/// app needed again).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Throttled {
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_ms: f64,
    #[serde(default)]
    pub major_faults: u64,
}

/// One switch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Switch {
    /// The link made active.
    pub to: String,
    /// The first [`WINDOW`] requests the newly active app served.
    pub warm: Pcts,
    /// The last [`WINDOW`] it served before the next switch.
    pub steady: Pcts,
    /// Of the warm window: requests above the steady p99 sent in the first [`EARLY_MS`] ms /
    /// later.
    pub slow_early: usize,
    pub slow_later: usize,
    /// ms from the switch to the end of the warm window and to the start of the steady one.
    pub warm_end_ms: u64,
    pub steady_start_ms: u64,
    /// Cache misses of the app in the warm / steady window's time.
    pub misses_warm: usize,
    pub misses_steady: usize,
    /// Requests of the warm / steady window sent more than 50 ms after their slot (the load
    /// client stalled: the machine, not the path).
    pub late_warm: usize,
    pub late_steady: usize,
    /// Connections the app accepted in the warm window, and how many of them the switch's
    /// pre-connect opened.
    pub accepted_warm: u64,
    /// ms after the switch command the app's accept loop took the last of those connections
    /// (its own clock: a request on a connection the app has not accepted yet waits for it).
    #[serde(default)]
    pub last_accept_ms: Option<u64>,
    /// ms the daemon's pre-connect took (`switch --json`).
    #[serde(default)]
    pub preconnect_ms: Option<f64>,
    pub preconnected: u64,
    /// Requests the app itself took > 5 ms over, in the warm / steady window.
    pub app_slow_warm: usize,
    pub app_slow_steady: usize,
    /// Throttling of the link's `cpu` cgroup in the warm / steady window (None: no v1 cgroups),
    /// and in the last [`KEEPALIVE_LOOK_MS`] before the switch (its keep-alive cap).
    #[serde(default)]
    pub throttled_keepalive: Option<Throttled>,
    pub throttled_warm: Option<Throttled>,
    pub throttled_steady: Option<Throttled>,
}

impl Switch {
    pub fn ratio(&self) -> f64 {
        if self.steady.p99 > 0.0 {
            self.warm.p99 / self.steady.p99
        } else {
            0.0
        }
    }
}

/// What the row measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DualLinkResult {
    pub rate: u32,
    pub window: usize,
    pub switches: Vec<Switch>,
    /// A cold-started copy's first [`WINDOW`] requests, the same traffic alone.
    pub cold: Option<Pcts>,
    pub requests: usize,
    pub failed: usize,
    /// Requests the load sent more than 50 ms after their slot (the machine stalled).
    pub late: u64,
    pub cold_late: u64,
    /// Whether the link cgroups (and so the keep-alive CPU cap) were in place.
    pub cgroups: bool,
    pub seconds: f64,
    /// Anything that makes part of the row less than complete.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl DualLinkResult {
    /// The median warm/steady p99 ratio over the switches.
    pub fn median_ratio(&self) -> f64 {
        median(&self.switches.iter().map(Switch::ratio).collect::<Vec<_>>())
    }

    /// The median warm/steady p99 ratio over the switches whose two windows had no request
    /// sent late (the load kept up), and how many there were.
    pub fn quiet_median_ratio(&self) -> (f64, usize) {
        let r: Vec<f64> = self
            .switches
            .iter()
            .filter(|s| s.late_warm == 0 && s.late_steady == 0)
            .map(Switch::ratio)
            .collect();
        (median(&r), r.len())
    }

    /// The median warm p99 (ms) over the switches.
    pub fn median_warm_p99(&self) -> f64 {
        median(&self.switches.iter().map(|s| s.warm.p99).collect::<Vec<_>>())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sleep_until(t_ms: u64) {
    let now = now_ms();
    if t_ms > now {
        std::thread::sleep(Duration::from_millis(t_ms - now));
    }
}

/// A field of a `key value` lines file of a cgroup.
fn stat_field(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Samples of one link's cgroups: (epoch ms, periods, throttled periods, throttled ns, major
/// faults).
type StatSamples = Vec<(u64, u64, u64, u64, u64)>;

/// A sample of a link's v1 `cpu` and `memory` cgroups now.
fn cgroup_sample(cpu: &Path, mem: &Path) -> Option<(u64, u64, u64, u64, u64)> {
    Some((
        now_ms(),
        stat_field(cpu, "cpu.stat", "nr_periods")?,
        stat_field(cpu, "cpu.stat", "nr_throttled")?,
        stat_field(cpu, "cpu.stat", "throttled_time")?,
        stat_field(mem, "memory.stat", "total_pgmajfault").unwrap_or(0),
    ))
}

/// Throttling between the last sample at or before `from` and the first at or after `to`.
fn throttled(samples: &StatSamples, from: u64, to: u64) -> Option<Throttled> {
    let a = samples.iter().rev().find(|s| s.0 <= from)?;
    let b = samples.iter().find(|s| s.0 >= to)?;
    Some(Throttled {
        periods: b.1.saturating_sub(a.1),
        throttled_periods: b.2.saturating_sub(a.2),
        throttled_ms: b.3.saturating_sub(a.3) as f64 / 1e6,
        major_faults: b.4.saturating_sub(a.4),
    })
}

/// The node and everything on it; fields drop in order: apps, then cgroups, then the node.
struct Row {
    daemon: Daemon,
    /// Kept running; dropped before the cgroups they are in.
    _servers: Vec<Server>,
    cg: Option<V1LinkCgroups>,
    node: VirtualNode,
}

impl Row {
    /// `/__stats` of the app on `port` in `pod`.
    fn stats(&self, pod: &str, port: u16) -> Result<Value> {
        dual_link::app_stats(self.node.pod(pod), port)
    }

    fn load(
        &self,
        targets: Vec<String>,
        seconds: f64,
        health_every: u32,
    ) -> std::thread::JoinHandle<Result<Value>> {
        let cmd = Load {
            targets,
            rate: RATE,
            seconds,
            keys: KEYS,
            concurrency: CONCURRENCY,
            health_every,
            live_ms: 0,
        }
        .command();
        let client = self.node.pod("client");
        let (cgroup, netns) = (client.cgroup.clone(), client.netns.clone());
        let limit = Duration::from_secs_f64(seconds + 60.0);
        std::thread::spawn(move || {
            let out = exec_in(&cgroup, Some(&netns), cmd, limit)?;
            Ok(last_json("link_app.py load", &out))
        })
    }
}

/// What the orchestration saw at one switch.
struct Mark {
    to: usize,
    at: u64,
    preconnected: u64,
    preconnect_ms: Option<f64>,
}

/// Runs the row: `switches` switches under constant load (about 10 s + `switches` x 9 s, plus
/// a cold copy's 6 s). `on_node` is told the node and the daemon's pid (for Ctrl-C clean-up;
/// the caller clears it).
pub fn run(switches: u32, on_node: &dyn Fn(u32, &VirtualNode)) -> Result<DualLinkResult> {
    if switches == 0 {
        bail!("the dual-link row needs at least one switch");
    }
    let started = std::time::Instant::now();
    let node = VirtualNode::new(&["client", "app", "pool", "cold"])?;
    on_node(0, &node);
    let cg = if V1LinkCgroups::available() {
        Some(V1LinkCgroups::new(node.prefix(), &LINKS)?)
    } else {
        None
    };
    let mut policy = dual_link::services_toml(node.pod("app"), node.pod("pool"), LINKS);
    policy.push_str(&dual_link::links_toml(LINKS, LINKS, &Links::default()));
    let mut pod = format!(
        "inbound_ports = [{}, {}]\n",
        dual_link::PORTS[0],
        dual_link::PORTS[1]
    );
    if let Some(cg) = &cg {
        pod.push_str(&cg.links_toml());
    }
    policy.push_str(&pod_toml(node.pod("app"), &pod));
    let daemon = Daemon::start(&node, &basic_config(&node, &policy))?;
    on_node(daemon.pid(), &node);
    let mut servers = Vec::new();
    for (p, tag) in [("app", "app"), ("pool", "pool")] {
        for (port, link) in dual_link::PORTS.into_iter().zip(LINKS) {
            let s = dual_link::app_server(node.pod(p), port, &format!("{link}@{tag}"))?;
            if let (Some(cg), "app") = (&cg, p) {
                cg.enter(link, s.pid())?;
            }
            servers.push(s);
        }
    }
    // Up (its pool opened) but never used until the end.
    servers.push(dual_link::app_server(
        node.pod("cold"),
        dual_link::PORTS[1],
        "forest@cold",
    )?);
    let row = Row {
        daemon,
        _servers: servers,
        cg,
        node,
    };
    let result = measure(&row, switches, started);
    if result.is_err() {
        eprintln!("--- sockmesh log ---\n{}--- end of log ---", row.daemon.log());
    }
    drop(row);
    result
}

fn measure(row: &Row, switches: u32, started: std::time::Instant) -> Result<DualLinkResult> {
    let app = row.node.pod("app");
    let targets: Vec<String> = dual_link::PORTS.iter().map(|&p| app.addr(p)).collect();
    let seconds = (WARMUP_MAX_MS + u64::from(switches) * PHASE_MS + 1000) as f64 / 1000.0;
    println!(
        "bench: dual links: {RATE} requests/s to each of trade and forest for up to {seconds:.0} s, \
         {switches} switches (--over 0) {} s apart",
        PHASE_MS / 1000
    );
    let t0 = now_ms() + 700; // the load starts about then (python start-up)
    let load = row.load(targets, seconds, HEALTH_EVERY);
    // Kept alive means warm: the trickle fills forest@app's cache before the first switch
    // (bounded), as hours of keep-alive would.
    let dirs: Option<Vec<(PathBuf, PathBuf)>> = row
        .cg
        .as_ref()
        .map(|cg| LINKS.iter().map(|l| (cg.cpu(l), cg.mem(l))).collect());
    let mut samples: Vec<StatSamples> = vec![Vec::new(), Vec::new()];
    let sample = |samples: &mut Vec<StatSamples>| {
        for (i, (cpu, mem)) in dirs.iter().flatten().enumerate() {
            samples[i].extend(cgroup_sample(cpu, mem));
        }
    };
    sleep_until(t0 + 1000);
    while row.stats("app", dual_link::PORTS[1])?["misses"]
        .as_u64()
        .unwrap_or(0)
        < u64::from(KEYS)
        && now_ms() < t0 + WARMUP_MAX_MS
    {
        sample(&mut samples);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut marks = Vec::new();
    let mut next = now_ms();
    for k in 0..switches as usize {
        let to = if k % 2 == 0 { 1 } else { 0 };
        sample(&mut samples);
        let at = now_ms();
        row.daemon
            .cli(&["switch", "--to", LINKS[to], "--over", "0"])
            .with_context(|| format!("switch {} to {}", k + 1, LINKS[to]))?;
        next = at + PHASE_MS;
        // Nothing but reading cpu.stat in the windows: the pre-connect is read between them.
        let mut preconnect = None;
        while now_ms() + 100 < next {
            sample(&mut samples);
            if preconnect.is_none() && now_ms() >= at + GAP_AT_MS {
                preconnect = Some(preconnected(&row.daemon, &app.addr(dual_link::PORTS[to])));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        marks.push(Mark {
            to,
            at,
            preconnected: preconnect.map_or(0, |p| p.0),
            preconnect_ms: preconnect.and_then(|p| p.1),
        });
        sample(&mut samples);
        sleep_until(next);
    }
    sample(&mut samples);
    // The apps' own view (misses, accepts, slow requests) at the end: their lists keep the last
    // 2,000 accepts and 500 slow requests, enough for one run of this row.
    let stats = [
        row.stats("app", dual_link::PORTS[0])?,
        row.stats("app", dual_link::PORTS[1])?,
    ];
    let v = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let (evs, names) = events(&v);
    let failed = evs.iter().filter(|e| e.name.is_none()).count();
    let late = v["late"].as_u64().unwrap_or(0);
    let mut out = DualLinkResult {
        rate: RATE,
        window: WINDOW,
        requests: evs.len(),
        failed,
        late,
        cgroups: row.cg.is_some(),
        ..DualLinkResult::default()
    };
    if failed > 0 {
        out.notes
            .push(format!("{failed} requests FAILED (a switch must lose none)"));
    }
    for (st, link) in stats.iter().zip(LINKS) {
        if st["slow"].as_array().map_or(0, Vec::len) >= 500 {
            out.notes.push(format!(
                "{link}@app's list of slow requests (its last 500) is full: the early switches' app-side counts may be short"
            ));
        }
    }
    for (k, m) in marks.iter().enumerate() {
        let end = marks.get(k + 1).map_or(next, |n| n.at);
        let who = format!("{}@app", LINKS[m.to]);
        let served: Vec<&Ev> = evs
            .iter()
            .filter(|e| e.target == m.to && !e.health && e.sent_ms >= m.at && e.sent_ms < end)
            .filter(|e| e.name.is_some_and(|i| names[i] == who))
            .collect();
        if served.len() < 2 * WINDOW {
            // The load fell far behind: this switch has no two windows to compare.
            out.notes.push(format!(
                "switch {} to {} left out: the app served {} requests before the next switch, fewer than two windows of {WINDOW}",
                k + 1,
                LINKS[m.to],
                served.len()
            ));
            continue;
        }
        let warm = &served[..WINDOW];
        let steady = &served[served.len() - WINDOW..];
        let lat = |w: &[&Ev]| w.iter().map(|e| e.latency_ms).collect::<Vec<_>>();
        let (warm_p, steady_p) = (Pcts::of(lat(warm)), Pcts::of(lat(steady)));
        let (w_end, s_start, s_end) = (
            warm[WINDOW - 1].sent_ms,
            steady[0].sent_ms,
            steady[WINDOW - 1].sent_ms,
        );
        let slow = |early: bool| {
            warm.iter()
                .filter(|e| e.latency_ms > steady_p.p99)
                .filter(|e| (e.sent_ms < m.at + EARLY_MS) == early)
                .count()
        };
        let st = &stats[m.to];
        let times = |key: &str| -> Vec<u64> {
            st[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_u64().or_else(|| e[0].as_u64()))
                .collect()
        };
        let in_window = |v: &[u64], a: u64, b: u64| v.iter().filter(|&&t| t >= a && t <= b).count();
        let slow_app = times("slow");
        let missed = times("miss_ms");
        let late = |w: &[&Ev]| w.iter().filter(|e| e.late_ms > 50).count();
        out.switches.push(Switch {
            to: LINKS[m.to].to_owned(),
            warm: warm_p,
            steady: steady_p,
            slow_early: slow(true),
            slow_later: slow(false),
            warm_end_ms: w_end - m.at,
            steady_start_ms: s_start - m.at,
            misses_warm: in_window(&missed, m.at, w_end),
            misses_steady: in_window(&missed, s_start, s_end),
            late_warm: late(warm),
            late_steady: late(steady),
            accepted_warm: in_window(&times("accept_ms"), m.at, w_end) as u64,
            last_accept_ms: times("accept_ms")
                .into_iter()
                .filter(|&t| t >= m.at && t <= w_end)
                .max()
                .map(|t| t - m.at),
            preconnect_ms: m.preconnect_ms,
            preconnected: m.preconnected,
            app_slow_warm: in_window(&slow_app, m.at, w_end),
            app_slow_steady: in_window(&slow_app, s_start, s_end),
            throttled_keepalive: throttled(&samples[m.to], m.at.saturating_sub(KEEPALIVE_LOOK_MS), m.at),
            throttled_warm: throttled(&samples[m.to], m.at, w_end),
            throttled_steady: throttled(&samples[m.to], s_start, s_end),
        });
    }
    // The cold copy: the same traffic shape, alone, after the switches.
    let cold = row.node.pod("cold").addr(dual_link::PORTS[1]);
    let cv = row
        .load(vec![cold], WINDOW as f64 / f64::from(RATE) + 0.6, 0)
        .join()
        .map_err(|_| anyhow::anyhow!("cold load thread panicked"))??;
    let (cevs, _) = events(&cv);
    out.cold_late = cv["late"].as_u64().unwrap_or(0);
    if cevs.len() >= WINDOW && cevs.iter().all(|e| e.name.is_some()) {
        out.cold = Some(Pcts::of(cevs.iter().take(WINDOW).map(|e| e.latency_ms).collect()));
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Connections the last switch pre-connected to `endpoint`, and how long its pre-connect took
/// in ms (`switch --json`).
fn preconnected(d: &Daemon, endpoint: &str) -> (u64, Option<f64>) {
    d.cli(&["switch", "--json"])
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .map_or((0, None), |v| {
            let opened = v["preconnect"]["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["pod"] == "app" && p["endpoint"] == endpoint)
                .filter_map(|p| p["opened"].as_u64())
                .sum();
            (opened, v["preconnect"]["ms"].as_f64())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_the_difference_of_the_samples_around_a_window() {
        let s: StatSamples = vec![
            (100, 10, 1, 1_000_000, 5),
            (200, 11, 1, 1_000_000, 5),
            (300, 13, 3, 5_000_000, 9),
        ];
        let t = throttled(&s, 150, 250).unwrap();
        assert_eq!((t.periods, t.throttled_periods, t.major_faults), (3, 2, 4));
        assert!((t.throttled_ms - 4.0).abs() < 1e-9);
        assert!(throttled(&s, 50, 250).is_none(), "no sample before the window");
        assert!(throttled(&s, 150, 350).is_none(), "no sample after the window");
    }

    #[test]
    fn the_figure_is_the_median_ratio() {
        let sw = |w: f64, s: f64| Switch {
            warm: Pcts {
                p99: w,
                ..Pcts::default()
            },
            steady: Pcts {
                p99: s,
                ..Pcts::default()
            },
            ..Switch::default()
        };
        let r = DualLinkResult {
            switches: vec![sw(2.0, 1.0), sw(1.0, 1.0), sw(3.0, 4.0)],
            ..DualLinkResult::default()
        };
        assert_eq!(r.median_ratio(), 1.0);
        assert_eq!(r.quiet_median_ratio(), (1.0, 3));
        assert_eq!(r.median_warm_p99(), 2.0);
    }
}
