//! `cargo xtask instructions [--requests N] [--top N] [--inclusive]`: the proxy's CPU
//! instructions per HTTP/1.1 request, counted exactly by callgrind (valgrind must be installed:
//! `apt-get install valgrind`; it is not part of CI).
//!
//! Builds mesh-userspace's unit tests in the release profile and runs the `#[ignore]`d
//! `l7::http::tests::instructions::instructions_per_request` twice under
//! `valgrind --tool=callgrind`: sequential 1 KiB GETs over one keep-alive connection through the
//! in-process proxy (`proxied`), then from the same client straight to the same upstream
//! (`direct`), all on one current-thread runtime. Only the measured requests are counted
//! (`--toggle-collect` on the function that runs them, after a warm-up of 200 requests). The
//! proxy's instructions per request are (proxied - direct) / requests; the functions listed are
//! the largest differences between the two runs (callgrind_annotate, self cost by default).
//! The callgrind files stay in `target/instructions/` for `callgrind_annotate`.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::{exec, workspace_root};

/// The test that makes the requests (`mesh-userspace/src/l7/http/tests/instructions.rs`).
pub const TEST: &str = "l7::http::tests::instructions::instructions_per_request";
/// callgrind counts only inside this function (the measured requests).
const TOGGLE: &str = "*tests::instructions::measured_phase";
/// Where the callgrind files go, relative to the workspace root.
pub const OUT_DIR: &str = "target/instructions";

#[derive(Debug, Args)]
pub struct Options {
    /// Requests counted (after 200 warm-up requests)
    #[arg(long, default_value_t = 2000)]
    pub requests: u64,
    /// Functions listed, largest first
    #[arg(long, default_value_t = 30)]
    pub top: usize,
    /// List functions by inclusive cost (self plus callees) instead of self cost
    #[arg(long)]
    pub inclusive: bool,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let path = exec::child_path();
    for tool in ["valgrind", "callgrind_annotate"] {
        if exec::find_in_path(tool, &path).is_none() {
            bail!("`{tool}` not found: `cargo xtask instructions` needs valgrind (apt-get install valgrind)");
        }
    }
    let root = workspace_root();
    let exe = build_test(&root)?;
    let out = root.join(OUT_DIR);
    fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;

    let mut totals = Vec::new();
    for mode in ["direct", "proxied"] {
        let file = out.join(format!("callgrind.{mode}.out"));
        println!("counting {} {mode} requests under callgrind", opts.requests);
        let mut cmd = exec::command("valgrind");
        cmd.current_dir(&root)
            .env("SOCKMESH_INSTR_MODE", mode)
            .env("SOCKMESH_INSTR_REQUESTS", opts.requests.to_string())
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", file.display()))
            .arg(format!("--toggle-collect={TOGGLE}"))
            .arg(&exe)
            .args(["--ignored", "--exact", TEST, "--test-threads=1"]);
        exec::capture(&mut cmd)?;
        let text = fs::read_to_string(&file).with_context(|| format!("failed to read {}", file.display()))?;
        let total = totals_of(&text).with_context(|| format!("no totals in {}", file.display()))?;
        totals.push((mode, file, total));
    }
    let (direct, proxied) = (&totals[0], &totals[1]);
    let n = opts.requests as f64;
    let per_request = (proxied.2 as f64 - direct.2 as f64) / n;
    println!();
    println!(
        "direct:  {:>14} instructions ({:.0} per request)",
        direct.2,
        direct.2 as f64 / n
    );
    println!(
        "proxied: {:>14} instructions ({:.0} per request)",
        proxied.2,
        proxied.2 as f64 / n
    );
    println!("the proxy: {per_request:.0} instructions per request");

    let annotate = |file: &Path| -> Result<HashMap<String, i64>> {
        let mut cmd = exec::command("callgrind_annotate");
        cmd.arg("--threshold=100")
            .arg(format!(
                "--inclusive={}",
                if opts.inclusive { "yes" } else { "no" }
            ))
            .arg(file);
        Ok(function_costs(&exec::capture(&mut cmd)?))
    };
    let rows = differences(&annotate(&direct.1)?, &annotate(&proxied.1)?);
    let kind = if opts.inclusive { "inclusive" } else { "self" };
    println!("\nlargest differences, proxied - direct ({kind} cost per request, share of the proxy's):");
    for (cost, name) in rows.iter().take(opts.top) {
        let per = *cost as f64 / n;
        println!("{per:>8.0} {:>5.1}%  {name}", 100.0 * per / per_request);
    }
    println!(
        "\ncallgrind files: {} and {} (callgrind_annotate --inclusive=yes FILE)",
        direct.1.display(),
        proxied.1.display()
    );
    Ok(())
}

/// Builds mesh-userspace's unit tests (release) and returns the test executable.
fn build_test(root: &Path) -> Result<PathBuf> {
    let mut cmd = exec::cargo(root);
    cmd.args([
        "test",
        "--release",
        "-p",
        "mesh-userspace",
        "--bin",
        "sockmesh",
        "--no-run",
        "--message-format=json",
    ]);
    println!(
        "building mesh-userspace's unit tests (release): {}",
        exec::display(&cmd)
    );
    let json = exec::capture(&mut cmd)?;
    executable(&json).context("cargo printed no test executable for mesh-userspace's `sockmesh`")
}

/// The `sockmesh` test executable in cargo's JSON messages.
fn executable(json: &str) -> Option<PathBuf> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"test\":true"))
        .filter(|l| l.contains("\"name\":\"sockmesh\""))
        .find_map(|l| {
            let rest = l.split_once("\"executable\":\"")?.1;
            Some(PathBuf::from(rest.split_once('"')?.0))
        })
}

/// The event total of a callgrind file (`totals:`, else `summary:`).
fn totals_of(text: &str) -> Option<u64> {
    let find = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
    };
    find("totals:").or_else(|| find("summary:"))
}

/// Cost per function from callgrind_annotate's listing (`  1,234 (12.3%)  file:function [obj]`).
fn function_costs(listing: &str) -> HashMap<String, i64> {
    let mut costs = HashMap::new();
    for line in listing.lines() {
        let Some((cost, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(cost) = cost.replace(',', "").parse::<i64>() else {
            continue;
        };
        let Some((_, name)) = rest.split_once(")  ") else {
            continue;
        };
        if name.contains("PROGRAM TOTALS") {
            continue;
        }
        // The object file in brackets adds nothing here.
        let name = match name.rfind(" [") {
            Some(i) if name.ends_with(']') => &name[..i],
            _ => name,
        };
        *costs.entry(name.trim().to_owned()).or_default() += cost;
    }
    costs
}

/// `after - before` per function, largest first.
fn differences(before: &HashMap<String, i64>, after: &HashMap<String, i64>) -> Vec<(i64, String)> {
    let mut rows: Vec<(i64, String)> = after
        .keys()
        .chain(before.keys())
        .map(|k| {
            let d = after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
            (d, k.clone())
        })
        .collect();
    rows.sort();
    rows.dedup();
    rows.reverse();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_test_executable() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"sockmesh","kind":["bin"]},"profile":{"test":false},"executable":"/t/release/sockmesh"}
{"reason":"compiler-artifact","target":{"name":"sockmesh","kind":["bin"]},"profile":{"opt_level":"3","test":true},"executable":"/t/release/deps/sockmesh-abc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable(json),
            Some(PathBuf::from("/t/release/deps/sockmesh-abc"))
        );
        assert_eq!(executable(r#"{"reason":"build-finished","success":true}"#), None);
    }

    #[test]
    fn reads_totals_and_costs() {
        assert_eq!(
            totals_of("events: Ir\nsummary: 99\ntotals: 132507423\n"),
            Some(132_507_423)
        );
        assert_eq!(totals_of("events: Ir\nsummary: 99\n"), Some(99));
        let listing = "\
132,507,423 (100.0%)  PROGRAM TOTALS
--------------------------------------------------------------------------------
14,384,000 (10.86%)  ???:<core::str::lossy::Utf8Chunks as core::iter::traits::iterator::Iterator>::next [/t/sockmesh-abc]
 7,307,786 ( 5.52%)  ./string/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/libc.so.6]
";
        let c = function_costs(listing);
        assert_eq!(c.len(), 2);
        assert_eq!(c["./string/memmove.S:__memcpy_avx_unaligned_erms"], 7_307_786);
        let before = HashMap::from([("a".to_owned(), 10), ("b".to_owned(), 5)]);
        let after = HashMap::from([("a".to_owned(), 30), ("c".to_owned(), 1)]);
        assert_eq!(
            differences(&before, &after),
            [(20, "a".to_owned()), (1, "c".to_owned()), (-5, "b".to_owned())]
        );
    }
}
