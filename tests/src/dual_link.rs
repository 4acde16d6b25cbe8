//! The dual-link scenario (active / keep-alive links, docs/dual-link.md) shared by
//! `tests/dual_link.rs`, the demo (`sockmesh-demo dual-link`) and the bench's dual-link row
//! (`bench::dual_link`): one source for its policy, its apps and its load.
//!
//! Pod `app` runs two apps, one per link, each a real HTTP server (`tests/peers/link_app.py`:
//! a cache that is cold after start, a pool of connections to a backend that costs 40 ms to
//! open): the first link's on port 8001 (VIP 10.96.2.1:80), the second's on 8002
//! (10.96.2.2:80). Pod `pool` runs both services too (labelled `pool = "yes"`): the active
//! endpoints a keep-alive link's requests move to.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{peers_dir, python, Pod, Server};

/// The two apps' ports, first link first.
pub const PORTS: [u16; 2] = [8001, 8002];
/// The two services' VIPs, first link first.
pub const VIPS: [&str; 2] = ["10.96.2.1:80", "10.96.2.2:80"];

/// `[[services]]` for the two apps, named `names` (first link's first): each with an endpoint
/// in `app` and one in `pool` (labelled `pool = "yes"`), subsets `all` and `pool`.
pub fn services_toml(app: &Pod, pool: &Pod, names: [&str; 2]) -> String {
    let mut s = String::new();
    for ((name, vip), port) in names.into_iter().zip(VIPS).zip(PORTS) {
        s.push_str(&format!(
            r#"
[[services]]
name = "{name}"
addresses = ["{vip}"]
protocol = "http1"
timeout_ms = 10000
endpoints = [
  {{ address = "{}" }},
  {{ address = "{}", labels = {{ pool = "yes" }} }},
]
subsets = [{{ name = "all" }}, {{ name = "pool", labels = {{ pool = "yes" }} }}]
"#,
            app.addr(port),
            pool.addr(port)
        ));
    }
    s
}

/// The links' settings (the same for both, but for the second link's active CPU).
#[derive(Debug, Clone)]
pub struct Links {
    /// `trickle_percent = P` or `trickle_per_second = R`.
    pub trickle: String,
    /// The subset moved requests go to; `None`: the service's endpoints on other nodes.
    pub pool: Option<&'static str>,
    /// Keep-alive CPU cap, percent of one CPU.
    pub keepalive_cpu: f64,
    /// Keep-alive `memory_high` in bytes.
    pub keepalive_memory: u64,
    /// The active CPU cap of the first and of the second link, percent of one CPU.
    pub active_cpu: [f64; 2],
}

impl Default for Links {
    fn default() -> Links {
        Links {
            trickle: trickle_percent(5.0),
            pool: Some("pool"),
            keepalive_cpu: 1.5,
            keepalive_memory: 64 << 20,
            active_cpu: [100.0, 100.0],
        }
    }
}

/// A share trickle (`Links::trickle`).
pub fn trickle_percent(p: f64) -> String {
    format!("trickle_percent = {p}")
}

/// `[[links]]` `links[i]` for service `services[i]`, the first link active, the second kept
/// alive.
pub fn links_toml(links: [&str; 2], services: [&str; 2], l: &Links) -> String {
    let pool = l.pool.map_or(String::new(), |p| format!("pool = \"{p}\""));
    let mut s = String::new();
    for (((name, service), initial), active_cpu) in links
        .into_iter()
        .zip(services)
        .zip(["active", "keepalive"])
        .zip(l.active_cpu)
    {
        s.push_str(&format!(
            r#"
[[links]]
name = "{name}"
services = ["{service}"]
initial = "{initial}"
{}
keep_paths = ["/health"]
{pool}
keepalive = {{ cpu_percent = {}, weight = 1, memory_high = {} }}
active = {{ cpu_percent = {active_cpu}, weight = 100 }}
"#,
            l.trickle, l.keepalive_cpu, l.keepalive_memory
        ));
    }
    s
}

/// One link app (`link_app.py serve`) in `pod` on `port`, answering `name`.
pub fn app_server(pod: &Pod, port: u16, name: &str) -> Result<Server> {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(peers_dir().join("link_app.py")).args([
        "serve",
        "--port",
        &port.to_string(),
        "--name",
        name,
    ]);
    Server::start(&pod.cgroup, Some(&pod.netns), cmd)
}

/// `/__stats` of the link app on `port` in `pod` (from inside the pod to its own address: not
/// captured).
pub fn app_stats(pod: &Pod, port: u16) -> Result<Value> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{port}/__stats"),
    ]);
    let o = crate::exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(10))?;
    serde_json::from_slice(&o.stdout).with_context(|| format!("stats of {}:{port}: {o:?}", pod.name))
}

/// The constant-rate load (`link_app.py load`): `rate` requests/s to each target.
#[derive(Debug, Clone)]
pub struct Load {
    pub targets: Vec<String>,
    pub rate: u32,
    pub seconds: f64,
    pub keys: u32,
    /// Client connections (threads) per target.
    pub concurrency: u32,
    /// Every n-th request is a `GET /health` (0: none).
    pub health_every: u32,
    /// A live summary line every this many ms (0: none).
    pub live_ms: u32,
}

impl Load {
    /// The command to run inside the client pod; it prints one JSON line at the end (see
    /// [`events`]).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(python());
        cmd.arg("-u").arg(peers_dir().join("link_app.py")).arg("load");
        for t in &self.targets {
            cmd.args(["--target", t]);
        }
        cmd.args([
            "--rate",
            &self.rate.to_string(),
            "--seconds",
            &self.seconds.to_string(),
            "--keys",
            &self.keys.to_string(),
            "--concurrency",
            &self.concurrency.to_string(),
            "--health-every",
            &self.health_every.to_string(),
        ]);
        if self.live_ms > 0 {
            cmd.args(["--live-ms", &self.live_ms.to_string()]);
        }
        cmd
    }
}

/// One request of the load's output.
#[derive(Debug, Clone, Copy)]
pub struct Ev {
    /// Index into the load's targets.
    pub target: usize,
    /// When it was sent, epoch ms.
    pub sent_ms: u64,
    pub latency_ms: f64,
    /// Index into the names of who answered; `None`: failed.
    pub name: Option<usize>,
    pub health: bool,
    /// ms it was sent after its slot in the constant-rate schedule (the client stalled).
    pub late_ms: u64,
}

/// The requests and the answering apps' names of the load's final JSON line.
pub fn events(v: &Value) -> (Vec<Ev>, Vec<String>) {
    let names = v["names"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| n.as_str().unwrap_or_default().to_owned())
        .collect();
    let evs = v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some(Ev {
                target: e[0].as_u64()? as usize,
                sent_ms: e[1].as_u64()?,
                latency_ms: e[2].as_f64()?,
                name: e[3].as_i64().filter(|&i| i >= 0).map(|i| i as usize),
                health: e[4].as_u64() == Some(1),
                late_ms: e[5].as_u64().unwrap_or(0),
            })
        })
        .collect();
    (evs, names)
}

/// p50, p99 and max of latencies (nearest rank); panics when empty.
pub fn pct(mut l: Vec<f64>) -> (f64, f64, f64) {
    assert!(!l.is_empty(), "no latencies");
    l.sort_by(f64::total_cmp);
    let at = |q: f64| l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1];
    (at(0.50), at(0.99), l[l.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(pct(l), (500.0, 990.0, 1000.0));
        assert_eq!(pct(vec![3.0]), (3.0, 3.0, 3.0));
    }

    #[test]
    fn the_load_line_is_parsed() {
        let v: Value =
            serde_json::from_str(r#"{"names":["a@app"],"events":[[1,1000,2.5,0,0,7],[0,1001,3.0,-1,1]]}"#)
                .unwrap();
        let (evs, names) = events(&v);
        assert_eq!(names, ["a@app"]);
        assert_eq!((evs[0].target, evs[0].sent_ms, evs[0].name), (1, 1000, Some(0)));
        assert!(evs[1].name.is_none() && evs[1].health);
        assert_eq!((evs[0].late_ms, evs[1].late_ms), (7, 0));
    }
}
