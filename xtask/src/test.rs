//! `cargo xtask test`: the single test command (README, CI's `.ci/run`).
//!
//! As root: bootstrap (first, since some host tests use what it installs), the host unit tests,
//! the eBPF object, the release daemon and the privileged end-to-end suite, one test at a time,
//! then the kernel matrix ([`crate::vm`]) when /dev/kvm exists (`--no-vm` skips it). Without
//! root: the host unit tests only, and a loud banner saying the privileged suite was skipped. Child output streams straight
//! through: CI judges the run by cargo test's own summary lines.

use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;

use crate::{bootstrap, build_ebpf, daemon, exec, k8s, vm, workspace_root};

/// Crates whose unit tests run on the host without root or nightly.
const HOST_PACKAGES: &[&str] = &["mesh-common", "mesh-userspace", "xtask"];
/// The crate holding the privileged end-to-end tests.
const PRIVILEGED_PACKAGE: &str = "sockmesh-tests";
/// Exit status when the privileged suite could not run because the caller is not root.
const NOT_ROOT_EXIT: u8 = 2;
const SKIPPED_BANNER: &str = "PRIVILEGED SUITE SKIPPED: cargo xtask test must run as root to run \
                              the privileged end-to-end tests";

/// `cargo xtask test [--host-only | --no-host] [--no-vm] [-- <test args>]`
#[derive(Debug, Args)]
pub struct Options {
    /// Run only the host unit tests (no root or nightly needed)
    #[arg(long, conflicts_with_all = ["no_host", "args"])]
    host_only: bool,
    /// Skip the host unit tests
    #[arg(long)]
    no_host: bool,
    /// Skip the kernel matrix (`cargo xtask vm-test`) after the privileged suite
    #[arg(long)]
    no_vm: bool,
    /// Passed to the privileged suite's test binaries, e.g. a test name filter
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

pub fn run(opts: Options) -> Result<ExitCode> {
    let root = workspace_root();
    let privileged = !opts.host_only && bootstrap::is_root()?;
    // As root, bootstrap comes first: some host tests (the deploy/kubernetes validation) use
    // tools it installs, and on a fresh machine nothing else would install them.
    if privileged {
        let purposes = test_purposes(opts.no_vm, Path::new("/dev/kvm").exists());
        step("bootstrap", || bootstrap::ensure(&purposes))?;
    }
    if !opts.no_host {
        step("host unit tests", || host_tests(&root))?;
    }
    if opts.host_only {
        return Ok(ExitCode::SUCCESS);
    }
    if !privileged {
        let rule = "=".repeat(SKIPPED_BANNER.len());
        eprintln!("\n{rule}\n{SKIPPED_BANNER}\n{rule}\n");
        return Ok(ExitCode::from(NOT_ROOT_EXIT));
    }
    step("build-ebpf", || build_ebpf::build(&root))?;
    step("build sockmesh (release)", || daemon::build(&root))?;
    // sockmesh-cni and the node agent image for the Kubernetes suite (tests/tests/k8s.rs).
    step("image (sockmesh + sockmesh-cni)", || {
        k8s::build_image(&root, k8s::IMAGE, &root.join(k8s::IMAGE_ARCHIVE))
    })?;
    let start = Instant::now();
    let host = step("privileged suite", || privileged_tests(&root, &opts.args));
    if opts.no_vm {
        return host.map(|()| ExitCode::SUCCESS);
    }
    if !Path::new("/dev/kvm").exists() {
        println!("kernel matrix skipped: /dev/kvm not available");
        return host.map(|()| ExitCode::SUCCESS);
    }
    // The matrix runs even when the host suite failed: its table puts the host's line first.
    let host_row = vm::Row::host(host.is_ok(), start.elapsed());
    let matrix = step("kernel matrix", || {
        vm::matrix(&root, &vm::Options::for_test_suite(opts.args), Some(host_row))
    });
    host?;
    matrix
}

/// What the privileged run needs: the suite, and the kernel matrix's QEMU and initramfs tools
/// when the matrix will run (/dev/kvm exists and `--no-vm` is not given).
fn test_purposes(no_vm: bool, have_kvm: bool) -> Vec<bootstrap::Purpose> {
    let mut purposes = vec![bootstrap::Purpose::Test];
    if !no_vm && have_kvm {
        purposes.push(bootstrap::Purpose::Vm);
    }
    purposes
}

fn host_tests(root: &Path) -> Result<()> {
    let mut cmd = exec::cargo(root);
    cmd.arg("test");
    for package in HOST_PACKAGES {
        cmd.args(["-p", package]);
    }
    exec::run(&mut cmd)
}

fn privileged_tests(root: &Path, args: &[String]) -> Result<()> {
    exec::run(
        exec::cargo(root)
            .env("SOCKMESH_BIN", daemon::sockmesh_bin_path(root))
            .env("SOCKMESH_REQUIRE_PRIVILEGED", "1")
            // Every test file runs even when one fails: one red run shows every failure.
            .args([
                "test",
                "--no-fail-fast",
                "-p",
                PRIVILEGED_PACKAGE,
                "--",
                "--test-threads=1",
            ])
            .args(args),
    )
}

/// Runs one step and prints `== name: 41.2s` (or `failed after`) when it ends.
fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let result = f();
    let outcome = if result.is_ok() { "" } else { "failed after " };
    println!("== {name}: {outcome}{}", seconds(start.elapsed()));
    result
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1}s", elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Options,
    }

    #[test]
    fn args_after_double_dash_reach_the_suite() {
        let cli = Cli::try_parse_from(["test", "--no-host", "--", "capture", "--nocapture"]).unwrap();
        assert!(cli.opts.no_host && !cli.opts.host_only);
        assert_eq!(cli.opts.args, ["capture", "--nocapture"]);
    }

    #[test]
    fn no_vm_flag_parses() {
        let cli = Cli::try_parse_from(["test", "--no-vm", "--", "capture"]).unwrap();
        assert!(cli.opts.no_vm);
        assert_eq!(cli.opts.args, ["capture"]);
    }

    #[test]
    fn host_only_conflicts() {
        assert!(Cli::try_parse_from(["test", "--host-only", "--no-host"]).is_err());
        assert!(Cli::try_parse_from(["test", "--host-only", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["test", "--host-only"]).is_ok());
    }

    #[test]
    fn the_matrix_tools_come_only_with_the_matrix() {
        use bootstrap::Purpose::{Test, Vm};
        assert_eq!(test_purposes(false, true), [Test, Vm]);
        assert_eq!(test_purposes(true, true), [Test]);
        assert_eq!(test_purposes(false, false), [Test]);
    }

    #[test]
    fn timing_format() {
        assert_eq!(seconds(Duration::from_millis(41_234)), "41.2s");
    }
}
