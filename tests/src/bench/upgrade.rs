//! The upgrade row of the bench (issue 13, docs/upgrade.md): what a live upgrade costs the
//! requests that arrive while it happens.
//!
//! The scenario of `tests/upgrade.rs` ([`crate::upgrade::setup`]): an enrolled `client` pod
//! sends constant-rate HTTP/1.1 keep-alive load ([`CONNS`] connections, [`RATE`] requests/s
//! each, `upgrade_load.py`) through the proxy (a routed HTTP/1.1 service) to a server pod, and
//! the daemon is upgraded `upgrades` times to the same binary, [`PHASE_MS`] apart. For each
//! upgrade: p50/p99/max of the requests due from the command until [`AFTER_MS`] after the old
//! generation exited (the window), against the p99 of an equally long stretch of steady
//! traffic later in the same phase (the same machine a few seconds later); the median
//! window/steady ratio over the upgrades is the figure (the goal: ≤ 2). Also: failed
//! requests (the goal: none) and the client's connects (every connection moved: [`CONNS`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::dual_link::Pcts;
use super::report::{md_table, median, text_table, Goal};
use crate::node::VirtualNode;
use crate::upgrade::{setup, Load, DRAIN};
use crate::util::{sockmesh_bin, TempDir};

/// Keep-alive connections of the load.
pub const CONNS: u32 = 8;
/// Requests per second on each connection.
pub const RATE: u32 = 50;
/// From one upgrade to the next (an upgrade takes about 2.5 s: the old generation stays 2 s
/// after the hand-off, to take it back should the new one die).
pub const PHASE_MS: u64 = 10_000;
/// The window ends this long after the old generation exited.
pub const AFTER_MS: u64 = 500;
/// The steady stretch starts this long after the window ended.
const STEADY_AFTER_MS: u64 = 1500;

/// One upgrade.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Upgrade {
    /// From the command to the old generation's exit.
    pub took_ms: f64,
    pub window: Pcts,
    pub window_n: usize,
    pub steady: Pcts,
    pub steady_n: usize,
    /// Live connections the new generation took over (status `upgrade.moved`).
    pub moved: u64,
    /// Window requests slower than the steady stretch's p99, and on how many distinct
    /// connections (one per connection: a cost each connection pays once, at its move).
    #[serde(default)]
    pub slow: usize,
    #[serde(default)]
    pub slow_conns: usize,
    /// Upstream HTTP connections the new generation opened by the end of the window: for
    /// requests that found no pooled one, and pre-connected before it took over
    /// (`sockmesh_upstream_http_connects_total`).
    #[serde(default)]
    pub request_connects: u64,
    #[serde(default)]
    pub preconnects: u64,
    /// How long the moved connections waited between the old generation stopping them and
    /// the new one serving them (status `upgrade.handover_wait`): mean and largest.
    #[serde(default)]
    pub wait_mean_ms: f64,
    #[serde(default)]
    pub wait_max_ms: f64,
}

impl Upgrade {
    /// Window p99 / steady p99.
    pub fn ratio(&self) -> f64 {
        if self.steady.p99 > 0.0 {
            self.window.p99 / self.steady.p99
        } else {
            f64::NAN
        }
    }
}

/// The row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpgradeResult {
    pub conns: u32,
    pub rate: u32,
    pub upgrades: Vec<Upgrade>,
    pub requests: usize,
    pub failed: usize,
    /// Connections the client opened over the whole row ([`CONNS`]: none was re-established).
    pub connects: u64,
    pub seconds: f64,
}

impl UpgradeResult {
    /// The median window/steady p99 ratio over the upgrades.
    pub fn median_ratio(&self) -> f64 {
        median(&self.upgrades.iter().map(Upgrade::ratio).collect::<Vec<_>>())
    }

    /// The median time an upgrade took.
    pub fn median_took_ms(&self) -> f64 {
        median(&self.upgrades.iter().map(|u| u.took_ms).collect::<Vec<_>>())
    }
}

/// One request of the load: when it was due (unix ms), its latency, whether it succeeded, the
/// connection it went on.
struct Sample {
    due_ms: f64,
    latency_ms: f64,
    ok: bool,
    conn: u32,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn read_samples(path: &std::path::Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(due), Some(lat), Some(ok)) = (f.next(), f.next(), f.next()) else {
            bail!("bad sample line {line:?}");
        };
        out.push(Sample {
            due_ms: due.parse().context("due")?,
            latency_ms: lat.parse().context("latency")?,
            ok: ok == "1",
            conn: f.next().and_then(|c| c.parse().ok()).unwrap_or(0),
        });
    }
    Ok(out)
}

fn in_range(samples: &[Sample], from: f64, to: f64) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.due_ms >= from && s.due_ms < to)
        .map(|s| s.latency_ms)
        .collect()
}

/// Requests due in `from..to` slower than `over` ms, and the distinct connections they went on.
fn slow_in_range(samples: &[Sample], from: f64, to: f64, over: f64) -> (usize, usize) {
    let slow: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.due_ms >= from && s.due_ms < to && s.latency_ms > over)
        .collect();
    let conns: std::collections::BTreeSet<u32> = slow.iter().map(|s| s.conn).collect();
    (slow.len(), conns.len())
}

/// What the bench reads from the new generation right after an upgrade.
struct Evidence {
    took_ms: f64,
    moved: u64,
    request_connects: u64,
    preconnects: u64,
    wait_mean_ms: f64,
    wait_max_ms: f64,
}

/// Runs the row: `upgrades` upgrades under load; `on_node(daemon pid, node)` is told of every
/// generation (for Ctrl-C clean-up).
pub fn run(upgrades: u32, on_node: &dyn Fn(u32, &VirtualNode)) -> Result<UpgradeResult> {
    if upgrades == 0 {
        bail!("the upgrade row needs at least one upgrade");
    }
    let started = Instant::now();
    let (node, _server, mut d) = setup();
    on_node(d.pid(), &node);
    let dir = TempDir::new("bench-upgrade")?;
    let samples_path = dir.join("samples");
    let max = Duration::from_millis(PHASE_MS * u64::from(upgrades) + 20_000);
    let load = Load::start_sampled(node.pod("client"), CONNS, RATE, max, Some(&samples_path));
    // Every connection open and warm before the first upgrade.
    std::thread::sleep(Duration::from_secs(3));
    let mut windows = Vec::new();
    for i in 0..upgrades {
        let phase = Instant::now();
        let from = unix_ms();
        let phase_end = from + PHASE_MS as f64;
        let t0 = Instant::now();
        d.upgrade(&sockmesh_bin(), DRAIN)
            .with_context(|| format!("upgrade {}", i + 1))?;
        let took_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let to = unix_ms() + AFTER_MS as f64;
        on_node(d.pid(), &node);
        let st = d.status()?;
        let moved = st["upgrade"]["moved"].as_u64().unwrap_or(0);
        let wait = &st["upgrade"]["handover_wait"];
        let (request_connects, preconnects) = crate::upgrade::upstream_connects(&d)?;
        let ev = Evidence {
            took_ms,
            moved,
            request_connects,
            preconnects,
            wait_mean_ms: wait["mean_ms"].as_f64().unwrap_or(0.0),
            wait_max_ms: wait["max_ms"].as_f64().unwrap_or(0.0),
        };
        eprintln!(
            "bench upgrade {}/{upgrades}: {took_ms:.0} ms, {moved} connections moved (waited {:.1} ms mean, {:.1} max); the new generation opened {request_connects} upstream connections for requests, {preconnects} ahead",
            i + 1,
            ev.wait_mean_ms,
            ev.wait_max_ms
        );
        windows.push((from, to, phase_end, ev));
        let rest = Duration::from_millis(PHASE_MS).saturating_sub(phase.elapsed());
        std::thread::sleep(rest);
    }
    let summary = load.finish();
    let samples = read_samples(&samples_path)?;
    let mut res = UpgradeResult {
        conns: CONNS,
        rate: RATE,
        requests: samples.len(),
        failed: samples.iter().filter(|s| !s.ok).count(),
        connects: summary["connects"].as_u64().unwrap_or(0),
        ..UpgradeResult::default()
    };
    for (from, to, phase_end, ev) in windows {
        let window = in_range(&samples, from, to);
        // As long as the window, before the next upgrade starts.
        let steady_from = to + STEADY_AFTER_MS as f64;
        let steady = in_range(&samples, steady_from, (steady_from + (to - from)).min(phase_end));
        let steady_n = steady.len();
        let steady = Pcts::of(steady);
        let (slow, slow_conns) = slow_in_range(&samples, from, to, steady.p99);
        res.upgrades.push(Upgrade {
            took_ms: ev.took_ms,
            window_n: window.len(),
            window: Pcts::of(window),
            steady_n,
            steady,
            moved: ev.moved,
            slow,
            slow_conns,
            request_connects: ev.request_connects,
            preconnects: ev.preconnects,
            wait_mean_ms: ev.wait_mean_ms,
            wait_max_ms: ev.wait_max_ms,
        });
    }
    res.seconds = started.elapsed().as_secs_f64();
    Ok(res)
}

/// The goal: p99 inside an upgrade's window ≤ this times steady state (issue 13).
pub const WINDOW_GOAL: f64 = 2.0;

/// Issue 13's goals read on the row: the window's p99, no failed request, no reconnect.
pub fn goals(u: &UpgradeResult) -> Vec<Goal> {
    let ratios: Vec<String> = u.upgrades.iter().map(|x| format!("{:.2}", x.ratio())).collect();
    let m = u.median_ratio();
    vec![
        Goal {
            goal: format!(
                "upgrades: p99 inside the upgrade window <= {WINDOW_GOAL}x steady state (median over the upgrades)"
            ),
            measured: format!(
                "{m:.2}x (median of {} upgrades; per upgrade {}); an upgrade took {:.0} ms (median)",
                u.upgrades.len(),
                ratios.join(", "),
                u.median_took_ms()
            ),
            met: (!u.upgrades.is_empty()).then_some(m <= WINDOW_GOAL),
        },
        Goal {
            goal: "upgrades: 0 failed requests, and no connection re-established".into(),
            measured: format!(
                "{} failed of {}; the client opened {} connections for {} ({})",
                u.failed,
                u.requests,
                u.connects,
                u.conns,
                if u.connects == u64::from(u.conns) {
                    "every one moved at every upgrade"
                } else {
                    "some were re-established"
                }
            ),
            met: Some(u.failed == 0 && u.connects == u64::from(u.conns)),
        },
    ]
}

/// The row per upgrade: (header, rows).
pub fn rows(u: &UpgradeResult) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let h = vec![
        "#",
        "took ms",
        "window p50 / p99 / max ms (requests)",
        "steady p50 / p99 / max ms (requests)",
        "window/steady p99",
        "connections moved",
        "window requests > steady p99 (connections)",
        "new generation's upstream connects: for requests / ahead",
        "moved connections' wait mean / max ms",
    ];
    let rows = u
        .upgrades
        .iter()
        .enumerate()
        .map(|(i, x)| {
            vec![
                (i + 1).to_string(),
                format!("{:.0}", x.took_ms),
                format!("{} ({})", x.window.text(), x.window_n),
                format!("{} ({})", x.steady.text(), x.steady_n),
                format!("{:.2}", x.ratio()),
                x.moved.to_string(),
                format!("{} ({})", x.slow, x.slow_conns),
                format!("{} / {}", x.request_connects, x.preconnects),
                format!("{:.1} / {:.1}", x.wait_mean_ms, x.wait_max_ms),
            ]
        })
        .collect();
    (h, rows)
}

/// The section: a paragraph and the per-upgrade table (markdown or text).
pub fn section(u: &UpgradeResult, md: bool) -> String {
    let (h, rows) = rows(u);
    let mut o = format!(
        "HTTP/1.1 keep-alive load, {} connections x {} requests/s (`upgrade_load.py`, a routed \
         service), and {} upgrades `sockmesh upgrade --binary <the same binary>` {} s apart. Per \
         upgrade, the requests due from the command until {} ms after the old generation exited \
         (the window) against an equally long stretch of steady traffic {:.1} s later (before the \
         next upgrade); the figure is the median window/steady p99 ratio. The old generation stays \
         2 s after handing over (to take the hand-off back should the new one die), so an upgrade \
         takes about 2.5 s. The last three columns say what a window's slow requests waited for: \
         how many were slower than the steady p99 and on how many of the connections (a cost each \
         moved connection pays once shows as one per connection), the upstream connections the new \
         generation opened for requests (a cold pool) and ahead of them (its pre-connect to the old \
         generation's pool sizes), and how long the moved connections waited between the two \
         generations. {} requests, {} failed, {} connections opened; {:.0} s.\n\n",
        u.conns,
        u.rate,
        u.upgrades.len(),
        PHASE_MS / 1000,
        AFTER_MS,
        STEADY_AFTER_MS as f64 / 1000.0,
        u.requests,
        u.failed,
        u.connects,
        u.seconds
    );
    o.push_str(&if md {
        md_table(&h, &rows)
    } else {
        text_table(&h, &rows)
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(window_p99: f64, steady_p99: f64) -> Upgrade {
        Upgrade {
            took_ms: 2500.0,
            window: Pcts {
                p50: 1.0,
                p99: window_p99,
                max: 30.0,
            },
            window_n: 1200,
            steady: Pcts {
                p50: 1.0,
                p99: steady_p99,
                max: 20.0,
            },
            steady_n: 1200,
            moved: 8,
            ..Upgrade::default()
        }
    }

    #[test]
    fn goals_read_the_median_ratio_the_failures_and_the_reconnects() {
        let mut u = UpgradeResult {
            conns: 8,
            rate: 50,
            upgrades: vec![upgrade(6.0, 2.0), upgrade(3.0, 2.0), upgrade(2.0, 2.0)],
            requests: 10_000,
            failed: 0,
            connects: 8,
            seconds: 70.0,
        };
        assert!((u.median_ratio() - 1.5).abs() < 1e-9);
        let g = goals(&u);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].met, Some(true), "{}", g[0].measured);
        assert!(g[0].measured.contains("3.00, 1.50, 1.00"), "{}", g[0].measured);
        assert_eq!(g[1].met, Some(true));
        // A reconnect, or a failed request, misses the second goal; a slow window the first.
        u.connects = 9;
        assert_eq!(goals(&u)[1].met, Some(false));
        u.connects = 8;
        u.failed = 1;
        assert_eq!(goals(&u)[1].met, Some(false));
        u.upgrades = vec![upgrade(9.0, 2.0), upgrade(5.0, 2.0)];
        assert_eq!(goals(&u)[0].met, Some(false));
        u.upgrades[0].slow = 12;
        u.upgrades[0].slow_conns = 8;
        u.upgrades[0].preconnects = 8;
        u.upgrades[0].wait_mean_ms = 0.3;
        u.upgrades[0].wait_max_ms = 0.5;
        let md = section(&u, true);
        assert!(md.contains("| 1 |") && md.contains("4.50"), "{md}");
        assert!(md.contains("| 12 (8) | 0 / 8 | 0.3 / 0.5 |"), "{md}");
    }
}
