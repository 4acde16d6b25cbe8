//! `sockmesh-demo dual-link` (`cargo xtask demo dual-link`): two application chains share the
//! same pods, one active and one kept alive; `sockmesh switch` swaps them and back under a
//! constant load while a live table shows where each link's requests are served and how fast.
//!
//! Pod `app` runs trade's `checkout` (port 8001) and forest's `game` (port 8002); pod `pool`
//! runs both too (the active capacity a keep-alive link's requests move to). Each app is
//! `tests/peers/link_app.py`: a cache that is cold after start and a pool of connections to its
//! own backend (a two-tier chain). The client pod sends 100 requests/s to each of `app`'s
//! services for [`LOAD_SECONDS`]; everything is bounded and removed at the end (Drop guards,
//! and the demo's signal handler on Ctrl-C). Where the cgroup v1 `cpu` and `memory` hierarchies
//! are mounted, each of pod `app`'s apps also runs in its own link cgroups (demo-owned), so the
//! table shows the CPU cap the switch moves from one link to the other.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sockmesh_tests::cgroup::V1LinkCgroups;
use sockmesh_tests::daemon::toml_str;
use sockmesh_tests::{dual_link, Daemon, LineChild, VirtualNode};

/// How long the load runs; the switches happen at [`SWITCH_AT`] and [`BACK_AT`].
const LOAD_SECONDS: u64 = 26;
const SWITCH_AT: f64 = 8.0;
const BACK_AT: f64 = 17.0;
const RATE: u32 = 100;
/// The services of trade and forest.
const SERVICES: [&str; 2] = ["checkout", "game"];

fn config(node: &VirtualNode, cg: Option<&V1LinkCgroups>) -> String {
    let (app, pool) = (node.pod("app"), node.pod("pool"));
    let mut s = format!(
        "cgroup_root = {}\n",
        toml_str(&node.cgroup_root().to_string_lossy())
    );
    s.push_str(&dual_link::services_toml(app, pool, SERVICES));
    let links = dual_link::Links {
        keepalive_cpu: 2.0,
        ..dual_link::Links::default()
    };
    s.push_str(&dual_link::links_toml(["trade", "forest"], SERVICES, &links));
    let links = cg.map_or(String::new(), |cg| format!("{}\n", cg.links_toml()));
    s.push_str(&format!(
        "\n[[pods]]\nname = \"app\"\nnetns = {}\ncgroup = {}\ninbound_ports = [8001, 8002]\n{links}",
        toml_str(&app.netns.to_string_lossy()),
        toml_str(&app.cgroup.to_string_lossy())
    ));
    s
}

/// Each link's state and local share now (`sockmesh switch --json`).
fn states(d: &Daemon) -> Result<Vec<(String, String, f64)>> {
    let out = d.cli(&["switch", "--json"])?;
    let v: Value = serde_json::from_slice(&out.stdout).context("switch --json")?;
    Ok(v["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or_default().to_owned(),
                l["state"].as_str().unwrap_or_default().to_owned(),
                l["local_share_percent"].as_f64().unwrap_or(0.0),
            )
        })
        .collect())
}

/// A link's CPU cap as the kernel shows it now (`cpu.cfs_quota_us` of its v1 cgroup).
fn cap(cg: Option<&V1LinkCgroups>, link: &str) -> String {
    match cg.map(|cg| V1LinkCgroups::knob(&cg.cpu(link), "cpu.cfs_quota_us")) {
        None => "-".into(),
        Some(q) => match q.parse::<i64>() {
            Ok(q) if q >= 0 => format!("{:.1} %", q as f64 / 1000.0),
            _ => "none".into(),
        },
    }
}

/// One row of the live table from a `link_app.py load --live-ms` line.
fn row(t: f64, live: &Value, links: &[(String, String, f64)], cg: Option<&V1LinkCgroups>) -> (String, u64) {
    let mut cells = Vec::new();
    let mut errors = 0;
    for (i, link) in ["trade", "forest"].iter().enumerate() {
        let tgt = &live["targets"][i];
        let by = tgt["served_by"].as_object().cloned().unwrap_or_default();
        let n = |k: &str| by.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (here, pool, err) = (n(&format!("{link}@app")), n(&format!("{link}@pool")), n("error"));
        errors += err;
        let total = (here + pool + err).max(1);
        let (state, share) = links
            .iter()
            .find(|l| l.0 == *link)
            .map(|l| (l.1.clone(), l.2))
            .unwrap_or_default();
        cells.push(format!(
            "{state:<9} {share:>6.2} % {:>7} | {:>5.1} % {:>5.1} % | {:>6.2} {:>6.2}",
            cap(cg, link),
            100.0 * here as f64 / total as f64,
            100.0 * pool as f64 / total as f64,
            tgt["p50"].as_f64().unwrap_or(0.0),
            tgt["p99"].as_f64().unwrap_or(0.0),
        ));
    }
    (format!("{t:>5.1}s | {} || {}", cells[0], cells[1]), errors)
}

pub fn run() -> Result<()> {
    println!("sockmesh demo: active / keep-alive dual links (two chains in the same pods, swapped warm)");
    println!("========================================================================================");
    println!("\n[1/4] a virtual node with pods client, app, pool");
    let node = VirtualNode::new(&["client", "app", "pool"])?;
    super::register_cleanup(0, &node);
    // Declared before the apps: dropped after them (it kills what is left in it, then removes it).
    let cg = if V1LinkCgroups::available() {
        Some(V1LinkCgroups::new(node.prefix(), &["trade", "forest"])?)
    } else {
        println!("      (no cgroup v1 cpu/memory hierarchies here: the links' CPU caps are left out)");
        None
    };
    let mut servers = Vec::new();
    for (pod, tag) in [("app", "app"), ("pool", "pool")] {
        for (port, link) in [(8001, "trade"), (8002, "forest")] {
            let s = dual_link::app_server(node.pod(pod), port, &format!("{link}@{tag}"))?;
            if let (Some(cg), "app") = (&cg, pod) {
                cg.enter(link, s.pid())?;
            }
            servers.push(s);
        }
    }
    println!(
        "      app  {}: trade's checkout :8001, forest's game :8002 (each with a cache and a backend pool)",
        node.pod("app").ip
    );
    println!(
        "      pool {}: the same two apps, the active capacity elsewhere",
        node.pod("pool").ip
    );

    println!(
        "\n[2/4] sockmesh with [[links]]: trade active, forest kept alive (5 % trickle, /health never moved, 2 % of a CPU)"
    );
    let daemon = Daemon::start(&node, &config(&node, cg.as_ref()))?;
    super::register_cleanup(daemon.pid(), &node);
    let result = tour(&node, &daemon, cg.as_ref());
    if result.is_err() {
        eprintln!("\n--- sockmesh log ---\n{}--- end of log ---", daemon.log());
    }
    result?;

    println!("\n[4/4] cleaning up: stopping sockmesh, the apps, deleting namespaces and cgroups");
    drop(servers);
    let v1_dirs: Vec<std::path::PathBuf> = cg.iter().flat_map(|c| c.dirs("trade")).collect();
    drop(cg);
    let root = node.cgroup_root().to_path_buf();
    let netns = node.netns_paths();
    drop(daemon);
    super::register_cleanup(0, &node);
    drop(node);
    let left: Vec<String> = netns
        .iter()
        .chain(std::iter::once(&root))
        .chain(v1_dirs.iter())
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !left.is_empty() {
        bail!("left behind: {left:?}");
    }
    println!("done: nothing left behind.");
    Ok(())
}

fn tour(node: &VirtualNode, d: &Daemon, cg: Option<&V1LinkCgroups>) -> Result<()> {
    println!(
        "\n[3/4] {RATE} requests/s to each link's app in pod `app` for {LOAD_SECONDS} s; switch to forest at {SWITCH_AT} s \
         (over 3 s, 3 steps), back at {BACK_AT} s (instant)"
    );
    let client = node.pod("client");
    let app = node.pod("app");
    let cmd = dual_link::Load {
        targets: dual_link::PORTS.iter().map(|&p| app.addr(p)).collect(),
        rate: RATE,
        seconds: LOAD_SECONDS as f64,
        keys: 15,
        concurrency: 4,
        health_every: 50,
        live_ms: 1000,
    }
    .command();
    let mut load = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd)?;
    println!("      (per second: each link's state and local share, where its requests were served, the latencies the");
    println!(
        "      client saw; `at app` includes the /health checks, every 50th request, which are never moved."
    );
    println!("      `cpu cap` is the CFS quota the kernel holds for the link's cgroup now.)");
    println!();
    println!(
        "        |              trade (checkout)                            ||              forest (game)"
    );
    println!("   time | state      local  cpu cap | at app  at pool | p50 ms p99 ms || state      local  cpu cap | at app  at pool | p50 ms p99 ms");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(LOAD_SECONDS + 30);
    let (mut switched, mut back, mut errors) = (false, false, 0);
    loop {
        if Instant::now() > deadline {
            bail!("the load did not finish in time");
        }
        let line = load.recv_line(Duration::from_secs(LOAD_SECONDS + 20))?;
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v.get("live").is_none() {
            // The final summary line.
            let total = v["events"].as_array().map_or(0, Vec::len);
            let failed = v["errors"].as_u64().unwrap_or(0);
            println!("\n      {total} requests, {failed} failed (live rows counted {errors})");
            if failed > 0 {
                bail!("{failed} requests failed");
            }
            break;
        }
        let t = v["live"].as_f64().unwrap_or(0.0);
        let (text, e) = row(t, &v, &states(d)?, cg);
        errors += e;
        println!("{text}");
        if !switched && t >= SWITCH_AT {
            switched = true;
            let out = d.cli(&["switch", "--to", "forest", "--over", "3s", "--steps", "3"])?;
            println!(
                "   ---> sockmesh switch --to forest --over 3s --steps 3: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        if !back && t >= BACK_AT {
            back = true;
            let out = d.cli(&["switch", "--back", "--over", "0"])?;
            println!(
                "   ---> sockmesh switch --back --over 0: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    let out = d.cli(&["switch"])?;
    println!("\n      sockmesh switch (the links' view now):");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("        {l}");
    }
    Ok(())
}
