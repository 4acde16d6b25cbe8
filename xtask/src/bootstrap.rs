//! `cargo xtask bootstrap`: make a fresh Debian 12 machine ready to build and test sockmesh.
//!
//! Every other subcommand runs [`ensure`] first. It is idempotent: it prints one
//! `installing X: reason` line for each thing it installs and nothing when all is present.
//!
//! Besides apt packages, the nightly `rust-src` and bpf-linker, it installs the routing tests'
//! peers: the npm packages of `tests/peers/npm` (`npm ci` from the lockfile; `node_modules` is
//! not in git) and a Python venv at [`TEST_VENV`] with grpcio. The tests look for both there.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::exec;

/// Debian packages the build and the privileged tests need, with the reason shown when one is
/// installed. Append test peers here (name, why).
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 that bpf-linker links against"),
    ("libpolly-22-dev", "needed to link bpf-linker against LLVM 22"),
    ("libzstd-dev", "needed to link bpf-linker against LLVM 22"),
    ("zlib1g-dev", "needed to link bpf-linker against LLVM 22"),
    ("bpftool", "inspects loaded programs, maps and cgroup attachments"),
    ("iproute2", "`ip netns` for the privileged tests' virtual nodes"),
    ("curl", "HTTP client for the tests and the demo"),
    (
        "util-linux",
        "`nsenter`, `mount` for the tests' namespaces and bpffs",
    ),
    ("python3", "simple test servers"),
    ("procps", "`ps`, `sysctl` for the tests"),
    ("wrk", "HTTP load generator for `cargo xtask bench`"),
    ("haproxy", "reference proxy for `cargo xtask bench`"),
    (
        "iptables",
        "the istio-init style capture `cargo xtask bench` compares with",
    ),
    ("fonts-dejavu-core", "the font of the bench chart"),
    ("python3-venv", "the venv `cargo xtask bench` installs Envoy into"),
    ("linux-perf", "`cargo xtask bench --profile`"),
    (
        "qemu-system-x86",
        "boots the kernel matrix (`cargo xtask vm-test`)",
    ),
    ("busybox-static", "the kernel matrix guests' initramfs"),
    ("cpio", "packs the kernel matrix guests' initramfs"),
    (
        "kmod",
        "`depmod` for the kernel matrix's module trees, `modprobe` inside the guests",
    ),
    (
        "xz-utils",
        "unpacks the 6.1 kernel image and 6.12's modules for the kernel matrix",
    ),
    ("zstd", "unpacks the 6.12 kernel image for the kernel matrix"),
    (
        "nodejs",
        "runs the SOFA Bolt, Dubbo and HTTP/HTTP2 test peers (tests/peers/npm)",
    ),
    (
        "nghttp2-client",
        "`h2load`, the HTTP/2 load generator of the routing tests",
    ),
];

/// Debian packages installed only when the command they provide is missing from `PATH`, as
/// (command, package, reason): NodeSource's `nodejs` ships `npm` itself and conflicts with
/// Debian's `npm` package.
pub const APT_COMMANDS: &[(&str, &str, &str)] = &[(
    "npm",
    "npm",
    "installs the npm test peers (`npm ci` in tests/peers/npm)",
)];

/// The npm test peers (sofa-rpc-node, sofa-bolt-node, dubbo-remoting, ...), relative to the
/// workspace root.
pub const NPM_PEERS_DIR: &str = "tests/peers/npm";
/// The routing tests' Python venv, relative to the workspace root.
pub const TEST_VENV: &str = "target/test-venv";
/// What [`TEST_VENV`] holds (the gRPC peer: generic handlers on raw bytes, no codegen).
pub const TEST_VENV_PIP: &[&str] = &["grpcio==1.85.3"];
/// The check that [`TEST_VENV`] is complete: exits 0 only when the pinned grpcio imports.
const TEST_VENV_CHECK: &str = "import grpc, sys; sys.exit(grpc.__version__ != '1.85.3')";

/// The bpf-linker release that works with the pinned aya and Debian's LLVM 22.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// `cargo xtask bootstrap`: install whatever is missing (see [`ensure`]).
#[derive(Debug, Args)]
pub struct Options {}

pub fn run(Options {}: Options) -> Result<()> {
    if ensure()? == 0 {
        println!("bootstrap: everything is present");
    }
    Ok(())
}

/// Checks the host and installs what is missing; returns how many things it installed.
pub fn ensure() -> Result<usize> {
    if env::consts::OS != "linux" {
        bail!(
            "sockmesh builds and runs on Linux only (this is {}): it needs eBPF, cgroup v2 \
             and network namespaces",
            env::consts::OS
        );
    }
    let mut installed = apt_packages()?;
    installed += rust_src()?;
    installed += bpf_linker()?;
    let root = crate::workspace_root();
    installed += npm_peers(&root)?;
    installed += test_venv(&root)?;
    Ok(installed)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    effective_uid(&status)
        .map(|uid| uid == 0)
        .context("no `Uid:` line in /proc/self/status")
}

/// Fails with a message naming `what` needs root when this process is not root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root()? {
        bail!("{what} needs root: rerun as root (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

/// The effective uid from `/proc/self/status` (`Uid:\treal\teffective\tsaved\tfs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

fn apt_packages() -> Result<usize> {
    let mut missing = Vec::new();
    for &(package, reason) in APT_PACKAGES {
        let status = exec::probe(exec::command("dpkg-query").args(["-W", "-f=${Status}", package]))
            .context("`dpkg-query` is unavailable: bootstrap supports Debian 12 only")?;
        if !status.as_deref().is_some_and(dpkg_installed) {
            missing.push((package, reason));
        }
    }
    let path = exec::child_path();
    for &(command, package, reason) in APT_COMMANDS {
        if exec::find_in_path(command, &path).is_none() && !missing.iter().any(|&(p, _)| p == package) {
            missing.push((package, reason));
        }
    }
    if missing.is_empty() {
        return Ok(0);
    }
    let names: Vec<&str> = missing.iter().map(|&(name, _)| name).collect();
    require_root(&format!("installing apt packages ({})", names.join(" ")))?;
    for (package, reason) in &missing {
        println!("installing {package}: {reason}");
    }
    exec::run(exec::command("apt-get").arg("update"))?;
    exec::run(
        exec::command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&names),
    )?;
    Ok(missing.len())
}

/// `npm ci` in [`NPM_PEERS_DIR`] when its `node_modules` is missing or older than the lockfile.
fn npm_peers(root: &Path) -> Result<usize> {
    let dir = root.join(NPM_PEERS_DIR);
    let lock = dir.join("package-lock.json");
    if !lock.is_file() {
        bail!(
            "{} is missing: the npm test peers cannot be installed",
            lock.display()
        );
    }
    // npm records what it installed in `node_modules/.package-lock.json`.
    let installed = dir.join("node_modules").join(".package-lock.json");
    let reason = match modified(&installed) {
        None => "no node_modules (it is not in git)".to_owned(),
        Some(at) => {
            let newer = [lock.clone(), dir.join("package.json")]
                .into_iter()
                .find(|f| modified(f).is_some_and(|m| m > at));
            match newer {
                None => return Ok(0),
                Some(f) => format!("{} changed since the last install", f.display()),
            }
        }
    };
    println!("installing the npm test peers in {}: {reason}", dir.display());
    let npm = exec::find_in_path("npm", &exec::child_path())
        .context("`npm` is not on PATH (apt-get install npm, or NodeSource's nodejs)")?;
    exec::run(
        exec::command(npm)
            .current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]),
    )?;
    Ok(1)
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The Python of [`TEST_VENV`].
pub fn test_venv_python(root: &Path) -> PathBuf {
    root.join(TEST_VENV).join("bin").join("python")
}

/// A venv at [`TEST_VENV`] with [`TEST_VENV_PIP`], created or completed when the check fails.
fn test_venv(root: &Path) -> Result<usize> {
    let venv = root.join(TEST_VENV);
    let python = test_venv_python(root);
    if python.is_file() && exec::probe(exec::command(&python).args(["-c", TEST_VENV_CHECK]))?.is_some() {
        return Ok(0);
    }
    println!(
        "installing a Python venv at {} with {}: the gRPC peer of the routing tests",
        venv.display(),
        TEST_VENV_PIP.join(" ")
    );
    if !python.is_file() {
        exec::run(exec::command("python3").arg("-m").arg("venv").arg(&venv))
            .context("`python3 -m venv` failed (apt-get install python3-venv)")?;
    }
    exec::run(
        exec::command(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(TEST_VENV_PIP),
    )?;
    Ok(1)
}

/// Whether `dpkg-query -W -f='${Status}'` output says the package is installed. Status is
/// "want error state" (e.g. `install ok installed`); a package with several architectures
/// prints one such triple per architecture, concatenated.
pub fn dpkg_installed(status: &str) -> bool {
    let words: Vec<&str> = status.split_whitespace().flat_map(split_glued_triples).collect();
    words
        .chunks(3)
        .any(|t| matches!(t, ["install" | "hold", "ok", "installed"]))
}

/// `installedinstall` (two architectures' statuses printed back to back) into two words.
fn split_glued_triples(word: &str) -> Vec<&str> {
    const STATES: &[&str] = &[
        "installed",
        "not-installed",
        "config-files",
        "half-installed",
        "unpacked",
        "half-configured",
        "triggers-awaited",
        "triggers-pending",
    ];
    for state in STATES {
        if let Some(rest) = word.strip_prefix(state) {
            if !rest.is_empty() {
                return vec![&word[..state.len()], rest];
            }
        }
    }
    vec![word]
}

fn rust_src() -> Result<usize> {
    let toolchains = exec::capture(exec::command("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (nightly + rust-src)")?;
    if !has_nightly(&toolchains) {
        bail!(
            "the nightly Rust toolchain is not installed (`rustup toolchain list` shows no \
             `nightly`); the eBPF crate needs it and it cannot be downloaded on this machine: \
             install it where the network allows with \
             `rustup toolchain install nightly --component rust-src`"
        );
    }
    let components = exec::capture(exec::command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|c| c.trim() == "rust-src") {
        return Ok(0);
    }
    println!("installing rust-src for nightly: `-Z build-std=core` for bpfel-unknown-none");
    exec::run(exec::command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok(1)
}

/// Whether `rustup toolchain list` shows the toolchain `+nightly` selects (`nightly-<host>`),
/// not only a dated one like `nightly-2026-05-19-<host>`.
pub fn has_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn bpf_linker() -> Result<usize> {
    let reason = match exec::find_in_path("bpf-linker", &exec::child_path()) {
        None => format!("not found on PATH or in {}", cargo_bin_shown()),
        Some(path) => match exec::capture(exec::command(&path).arg("--version")) {
            Ok(version) if bpf_linker_version_ok(&version) => return Ok(0),
            Ok(version) => format!(
                "{} is `{}`, need {BPF_LINKER_SERIES}",
                path.display(),
                version.trim()
            ),
            Err(err) => format!(
                "{} does not run ({})",
                path.display(),
                err.to_string().replace('\n', "; ")
            ),
        },
    };
    println!("installing bpf-linker {BPF_LINKER_VERSION}: {reason} (takes a few minutes)");
    // `--force`: a broken copy of the same version would otherwise be kept as "already installed".
    exec::run(
        exec::command("cargo")
            .env_remove("CARGO")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )?;
    Ok(1)
}

fn cargo_bin_shown() -> String {
    exec::cargo_bin_dir().map_or_else(|| "$CARGO_HOME/bin".to_owned(), |d| d.display().to_string())
}

/// Whether `bpf-linker --version` output (`bpf-linker 0.13.0`) is from the 0.13 series.
pub fn bpf_linker_version_ok(output: &str) -> bool {
    output
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v == BPF_LINKER_SERIES || v.starts_with(&format!("{BPF_LINKER_SERIES}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        assert!(dpkg_installed("install ok installed"));
        assert!(dpkg_installed("hold ok installed"));
        assert!(dpkg_installed("install ok installedinstall ok installed"));
        assert!(!dpkg_installed(""));
        assert!(!dpkg_installed("deinstall ok config-files"));
        assert!(!dpkg_installed("unknown ok not-installed"));
        assert!(!dpkg_installed("install reinstreq half-installed"));
        assert!(!dpkg_installed("install ok unpacked"));
    }

    #[test]
    fn bpf_linker_version() {
        assert!(bpf_linker_version_ok("bpf-linker 0.13.0\n"));
        assert!(bpf_linker_version_ok("bpf-linker 0.13.4"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.12.1"));
        assert!(!bpf_linker_version_ok("bpf-linker 0.130.0"));
        assert!(!bpf_linker_version_ok("bpf-linker 1.0.13"));
        assert!(!bpf_linker_version_ok(""));
    }

    #[test]
    fn nightly_detection() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly("nightly-2026-05-19-x86_64-unknown-linux-gnu\n"));
        assert!(has_nightly("nightly-x86_64-unknown-linux-gnu (active)\n"));
    }

    #[test]
    fn uid_from_proc_status() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn package_list_is_unique() {
        let mut names: Vec<&str> = APT_PACKAGES.iter().map(|&(n, _)| n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), APT_PACKAGES.len());
        for &(_, package, _) in APT_COMMANDS {
            assert!(!names.contains(&package), "{package} is in both lists");
        }
    }
}
