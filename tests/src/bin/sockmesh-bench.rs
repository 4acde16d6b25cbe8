//! `sockmesh-bench`: sockmesh's benchmark (`cargo xtask bench`).
//!
//! ```text
//! sockmesh-bench [--quick] [--out-dir DIR] [--seconds-per-run S] [--rounds N] [--profile SECS]
//! ```
//!
//! Builds a virtual node, measures every scenario interleaved (see `sockmesh_tests::bench`) and
//! prints a table. A full run is the record: it writes `<out-dir>/BENCHMARKS.md` and
//! `<out-dir>/docs/bench.png` (out-dir defaults to the workspace root, the committed files). A
//! `--quick` smoke run writes `<out-dir>/BENCHMARKS-quick.md` and `<out-dir>/bench-quick.png`
//! instead (out-dir defaults to `target/bench`), never the record ([`report::outputs`]). Raw
//! samples go to `target/bench/results.json`. Needs root,
//! `SOCKMESH_BIN`, wrk, haproxy, iptables; Envoy from `ENVOY_BIN` or `target/bench-venv`
//! (skipped loudly when absent).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use sockmesh_tests::bench::{chart, load, proxies, report, run};
use sockmesh_tests::{sockmesh_bin, workspace_root};

const USAGE: &str = "usage: sockmesh-bench [--quick] [--out-dir DIR] [--seconds-per-run S] [--rounds N] \
                     [--profile SECS] [--only grid|dual-link|upgrade|syscalls] [--switches N] [--upgrades N]\n\
                     a full run writes DIR/BENCHMARKS.md and DIR/docs/bench.png (DIR: the workspace \
                     root); --quick writes DIR/BENCHMARKS-quick.md and DIR/bench-quick.png (DIR: \
                     target/bench), and so does --only (one part is never the record); --switches: \
                     of the dual-link row (default 6, 4 with --quick); --upgrades: of the upgrade \
                     row (default 6, 3 with --quick)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some((cmd, rest)) = args.split_first() {
        if let Some(r) = load::dispatch(cmd, rest) {
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sockmesh-bench {cmd}: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    match main_bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nsockmesh-bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_bench(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut out_dir: Option<PathBuf> = None;
    let mut seconds: Option<f64> = None;
    let mut rounds: Option<u32> = None;
    let mut profile = 0u32;
    let mut only = None;
    let mut switches: Option<u32> = None;
    let mut upgrades: Option<u32> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--quick" => quick = true,
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--seconds-per-run" => seconds = Some(value()?.parse().context("--seconds-per-run")?),
            "--rounds" => rounds = Some(value()?.parse().context("--rounds")?),
            "--profile" => profile = value()?.parse().context("--profile")?,
            "--only" => {
                let v = value()?;
                only = Some(
                    run::Part::parse(v)
                        .with_context(|| format!("--only {v:?}: one of {}\n{USAGE}", run::Part::NAMES))?,
                );
            }
            "--switches" => switches = Some(value()?.parse().context("--switches")?),
            "--upgrades" => upgrades = Some(value()?.parse().context("--upgrades")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    // Five short rounds rather than three long ones: a median of five shrugs off the bursts of
    // other work on a shared 2-core machine.
    let rounds = rounds.unwrap_or(if quick { 3 } else { 5 });
    if rounds < 3 {
        bail!("--rounds must be at least 3 (medians of at least 3 interleaved runs)");
    }
    let seconds = seconds.unwrap_or(if quick { 0.4 } else { 0.9 });
    if !(0.1..=60.0).contains(&seconds) {
        bail!("--seconds-per-run must be between 0.1 and 60");
    }
    let switches = switches.unwrap_or(if quick { 4 } else { 6 });
    if !(1..=40).contains(&switches) {
        bail!("--switches must be between 1 and 40");
    }
    let upgrades = upgrades.unwrap_or(if quick { 3 } else { 6 });
    if !(1..=40).contains(&upgrades) {
        bail!("--upgrades must be between 1 and 40");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces, cgroups, BPF, iptables in the pods)");
    }
    let bin = sockmesh_bin();
    if !bin.is_file() {
        bail!(
            "{} not found: build it (cargo xtask bench does) or set SOCKMESH_BIN",
            bin.display()
        );
    }
    run::install_signal_cleanup();
    let data_dir = workspace_root().join("target/bench");
    let opts = run::Options {
        quick,
        seconds_per_run: seconds,
        rounds,
        envoy: proxies::envoy_bin(),
        haproxy: None,
        wrk: None,
        profile_seconds: profile,
        data_dir: data_dir.clone(),
        only,
        switches,
        upgrades,
    };
    let command = format!("sockmesh-bench {}", args.join(" "));
    let res = run::run(&opts)?;

    std::fs::create_dir_all(&data_dir)?;
    let json = data_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&res)?)?;
    println!("\n{}", report::text_report(&res));
    if let Some(p) = &res.profile {
        println!("Profile of the daemon (eBPF HTTP load, routed L7):\n{p}\n");
    }
    if let Some(t) = &res.syscalls {
        println!("System calls per HTTP request:\n{t}\n");
    }
    let cells = report::cells(&res);
    let root = workspace_root();
    // One part of the bench is never the record either.
    let out = report::outputs(&root, quick || only.is_some(), out_dir.as_deref());
    let png = &out.chart;
    let chart_ref = if cells.is_empty() {
        None
    } else {
        match chart::render(&cells, png) {
            Ok(()) => Some(out.chart_link.as_str()),
            Err(e) => {
                eprintln!("warning: no chart: {e:#}");
                None
            }
        }
    };
    // Paths relative to the workspace root, so the command works in any checkout.
    let rel = |p: &std::path::Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    let machine = report::Machine::detect(format!(
        "SOCKMESH_BIN={} ENVOY_BIN={} target/release/{command}",
        rel(&bin),
        opts.envoy.as_deref().map(rel).unwrap_or_default()
    ));
    let md = &out.markdown;
    if let Some(dir) = md.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(md, report::markdown(&res, &machine, chart_ref))
        .with_context(|| format!("write {}", md.display()))?;
    if chart_ref.is_some() {
        println!("wrote {}, {} and {}", md.display(), png.display(), json.display());
    } else {
        println!("wrote {} and {}", md.display(), json.display());
    }
    if quick || only.is_some() {
        println!(
            "(a --quick or --only run: BENCHMARKS.md and docs/bench.png are left alone; a full \
             `cargo xtask bench` writes them)"
        );
    }
    Ok(())
}
