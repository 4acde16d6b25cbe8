//! `cargo xtask fuzz [--seconds N] [--target NAME]...`: run the protocol codec (and `cni_plan`,
//! sockmesh-cni's input handling, `upgrade_wire`, the upgrade's hand-off messages, and
//! `h1_response`, the HTTP/1.1 upstream client's response parsers) fuzz targets in
//! `mesh-userspace/fuzz` for a bounded time each and report executions and crashes.
//!
//! Installs cargo-fuzz when it is missing (`cargo install cargo-fuzz --locked`). Each target
//! runs as `cargo +nightly fuzz run <target> corpus/<target> <testdata> -- -max_total_time=N`:
//! the captured wire bytes in `mesh-userspace/src/protocol/testdata` seed every target, and new
//! inputs go to the target's own (git-ignored) corpus. libFuzzer's output goes to
//! `target/fuzz-logs/<target>.log`; a crash input lands in `mesh-userspace/fuzz/artifacts/`.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::{exec, workspace_root};

/// The fuzz crate, relative to the workspace root.
pub const FUZZ_DIR: &str = "mesh-userspace/fuzz";
/// Seed inputs: the real client and server captures.
pub const SEED_DIR: &str = "mesh-userspace/src/protocol/testdata";
/// Every target in the fuzz crate's Cargo.toml.
pub const TARGETS: &[&str] = &[
    "detect",
    "bolt_decode",
    "dubbo_decode",
    "hessian2_decode",
    "sofa_decode",
    "cni_plan",
    "upgrade_wire",
    "h1_response",
];

#[derive(Debug, Args)]
pub struct Options {
    /// Seconds to fuzz each target
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Run only this target (repeatable); all targets by default
    #[arg(long = "target", value_name = "NAME")]
    pub targets: Vec<String>,
}

/// What one target's run produced.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    target: String,
    executions: Option<u64>,
    crashed: bool,
    artifact: Option<String>,
    log: PathBuf,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        opts.targets.clone()
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!("unknown fuzz target `{unknown}` (known: {})", TARGETS.join(", "));
    }
    ensure_cargo_fuzz()?;

    let root = workspace_root();
    let fuzz_dir = root.join(FUZZ_DIR);
    let logs = root.join("target").join("fuzz-logs");
    fs::create_dir_all(&logs).with_context(|| format!("failed to create {}", logs.display()))?;
    exec::run(exec::nightly_cargo(&fuzz_dir).args(["fuzz", "build"]))?;

    let mut reports = Vec::new();
    for target in &targets {
        println!("fuzzing `{target}` for {} s", opts.seconds);
        reports.push(run_target(&root, &fuzz_dir, &logs, target, opts.seconds)?);
    }

    println!("\n{:<16} {:>14}  result", "target", "executions");
    for r in &reports {
        let execs = r.executions.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let result = match (&r.crashed, &r.artifact) {
            (false, _) => "ok".to_owned(),
            (true, Some(a)) => format!("CRASH, input {a}"),
            (true, None) => format!("CRASH, see {}", r.log.display()),
        };
        println!("{:<16} {:>14}  {result}", r.target, execs);
    }
    let crashed: Vec<&str> = reports
        .iter()
        .filter(|r| r.crashed)
        .map(|r| r.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if exec::find_in_path("cargo-fuzz", &exec::child_path()).is_some() {
        return Ok(());
    }
    println!("installing cargo-fuzz: not found (cargo install cargo-fuzz --locked)");
    exec::run(exec::cargo(&workspace_root()).args(["install", "cargo-fuzz", "--locked"]))
}

fn run_target(root: &Path, fuzz_dir: &Path, logs: &Path, target: &str, seconds: u64) -> Result<Report> {
    let corpus = fuzz_dir.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("failed to create {}", corpus.display()))?;
    let log = logs.join(format!("{target}.log"));
    let log_file = File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
    let mut cmd = exec::nightly_cargo(fuzz_dir);
    cmd.args(["fuzz", "run", target])
        .arg(&corpus)
        .arg(root.join(SEED_DIR))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .stdout(Stdio::null())
        .stderr(log_file);
    // A crash is a non-zero exit: report it rather than stop at the first target.
    let status = exec::status(&mut cmd)?;
    let output = fs::read_to_string(&log).with_context(|| format!("failed to read {}", log.display()))?;
    let mut report = parse_log(target, &output, log);
    report.crashed |= !status.success();
    Ok(report)
}

/// Read executions and any crash artifact out of libFuzzer's output.
fn parse_log(target: &str, output: &str, log: PathBuf) -> Report {
    // "Done 1234 runs in 30 second(s)" on a clean finish; otherwise the last "#1234 ..." line.
    let done = output.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("Done ")?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let last_status = || {
        output.lines().rev().find_map(|l| {
            let rest = l.trim().strip_prefix('#')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    let artifact = output.lines().find_map(|l| {
        let (_, path) = l.split_once("Test unit written to ")?;
        Some(path.trim().to_owned())
    });
    let crashed = artifact.is_some() || output.contains("ERROR: libFuzzer") || done.is_none();
    Report {
        target: target.to_owned(),
        executions: done.or_else(last_status),
        crashed,
        artifact,
        log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_clean_run() {
        let out = "#2\tINITED cov: 10\n#4096\tpulse  cov: 30\nDone 123456 runs in 31 second(s)\n";
        let r = parse_log("detect", out, PathBuf::from("x.log"));
        assert_eq!(
            (r.executions, r.crashed, r.artifact),
            (Some(123_456), false, None)
        );
    }

    #[test]
    fn parses_a_crash() {
        let out = "#1024\tpulse\n#2000\tNEW cov: 3\nthread panicked\n==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='a/'; Test unit written to a/crash-abc\n";
        let r = parse_log("bolt_decode", out, PathBuf::from("x.log"));
        assert_eq!(r.executions, Some(2000));
        assert!(r.crashed);
        assert_eq!(r.artifact.as_deref(), Some("a/crash-abc"));
    }

    #[test]
    fn targets_match_the_fuzz_manifest() {
        let manifest = fs::read_to_string(workspace_root().join(FUZZ_DIR).join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
        }
    }
}
