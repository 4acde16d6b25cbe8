//! `cargo xtask bootstrap`: make a fresh Debian 12 machine ready to build and test sockmesh.
//!
//! Every other subcommand runs [`ensure`] first with the [`Purpose`]s it has: the build (always),
//! plus the demo, the bench (and its profiler), the privileged test suite or the kernel matrix.
//! Each installs only what its purposes need ([`apt_packages_for`]), so `cargo xtask demo` does
//! not pull in QEMU, HAProxy or wrk. It is idempotent: it prints one `installing X: reason` line
//! for each thing it installs, the full list apt installs with it, and nothing when all is
//! present. apt is never allowed to remove a package: the install is simulated first and refused
//! when apt would remove anything, and the real install runs with `--no-remove`.
//!
//! Besides apt packages, the nightly `rust-src` and bpf-linker (every purpose: they build the
//! eBPF object), the test suite's purposes install the routing tests' peers: the npm packages of
//! `tests/peers/npm` (`npm ci` from the lockfile; `node_modules` is not in git) and a Python
//! venv at [`TEST_VENV`] with grpcio. The tests look for both there.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::exec;

/// What a subcommand is about to do, and so what the machine must have. Building the eBPF object
/// and the daemon ([`Purpose::Build`]) is part of every purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Purpose {
    /// Build the eBPF object and the daemon (`cargo xtask build-ebpf`)
    Build,
    /// `cargo xtask demo`
    Demo,
    /// `cargo xtask bench`
    Bench,
    /// `cargo xtask bench --profile`
    Profile,
    /// The privileged end-to-end suite (`cargo xtask test`)
    Test,
    /// The kernel matrix in QEMU (`cargo xtask vm-test`, and `test` when /dev/kvm exists)
    Vm,
}

use Purpose::{Bench, Build, Demo, Profile, Test, Vm};

/// One Debian package: its name, why it is installed (shown when it is) and the purposes that
/// need it.
#[derive(Debug, Clone, Copy)]
pub struct AptPackage {
    pub name: &'static str,
    pub reason: &'static str,
    pub purposes: &'static [Purpose],
}

const fn apt(name: &'static str, reason: &'static str, purposes: &'static [Purpose]) -> AptPackage {
    AptPackage {
        name,
        reason,
        purposes,
    }
}

/// Debian packages the build, the demo, the bench and the tests need. Append new tools here
/// with the purposes that run them.
pub const APT_PACKAGES: &[AptPackage] = &[
    apt("llvm-22-dev", "LLVM 22 that bpf-linker links against", &[Build]),
    apt(
        "libpolly-22-dev",
        "needed to link bpf-linker against LLVM 22",
        &[Build],
    ),
    apt(
        "libzstd-dev",
        "needed to link bpf-linker against LLVM 22",
        &[Build],
    ),
    apt(
        "zlib1g-dev",
        "needed to link bpf-linker against LLVM 22",
        &[Build],
    ),
    apt(
        "iproute2",
        "`ip netns` and `ss` for the virtual nodes",
        &[Demo, Bench, Test],
    ),
    apt("curl", "HTTP client of the demo and the tests", &[Demo, Test]),
    apt(
        "python3",
        "the demo's and the tests' servers and clients",
        &[Demo, Bench, Test],
    ),
    apt(
        "bpftool",
        "the tests inspect loaded programs, maps and cgroup attachments; the bench reads the \
         programs' run time",
        &[Bench, Test],
    ),
    apt("util-linux", "`nsenter` for the tests' namespaces", &[Test]),
    apt("procps", "`sysctl` for the tests", &[Test]),
    apt(
        "wrk",
        "HTTP load generator of `cargo xtask bench` and the routing tests",
        &[Bench, Test],
    ),
    apt("haproxy", "reference proxy for `cargo xtask bench`", &[Bench]),
    apt(
        "iptables",
        "the istio-init style capture `cargo xtask bench` compares with",
        &[Bench],
    ),
    apt("fonts-dejavu-core", "the font of the bench chart", &[Bench]),
    apt(
        "python3-venv",
        "the venvs of Envoy (`cargo xtask bench`) and of the tests' gRPC peer",
        &[Bench, Test],
    ),
    apt("linux-perf", "`cargo xtask bench --profile`", &[Profile]),
    apt(
        "nodejs",
        "runs the SOFA Bolt, Dubbo and HTTP/HTTP2 test peers (tests/peers/npm)",
        &[Test],
    ),
    apt(
        "nghttp2-client",
        "`h2load`, the HTTP/2 load generator of the routing tests",
        &[Test],
    ),
    apt(
        "containerd",
        "the Kubernetes node suite's container runtime (CRI) and `ctr` (tests/tests/k8s.rs)",
        &[Test],
    ),
    apt("runc", "the Kubernetes node suite's OCI runtime", &[Test]),
    apt(
        "containernetworking-plugins",
        "bridge and host-local, the CNI chain sockmesh-cni joins in the Kubernetes node suite",
        &[Test],
    ),
    apt(
        "buildah",
        "`cargo xtask image` and the Kubernetes node suite's images (from scratch, no registry)",
        &[Test],
    ),
    apt(
        "nginx-light",
        "nginx as a real server behind the accelerated path (tests/accel.rs)",
        &[Test],
    ),
    apt(
        "qemu-system-x86",
        "boots the kernel matrix (`cargo xtask vm-test`)",
        &[Vm],
    ),
    apt(
        "busybox-static",
        "the kernel matrix guests' initramfs, the Kubernetes node suite's pod images",
        &[Test, Vm],
    ),
    apt("cpio", "packs the kernel matrix guests' initramfs", &[Vm]),
    apt(
        "kmod",
        "`depmod` for the kernel matrix's module trees, `modprobe` inside the guests",
        &[Vm],
    ),
    apt(
        "xz-utils",
        "unpacks the 6.1 kernel image and 6.12's modules for the kernel matrix",
        &[Vm],
    ),
    apt(
        "zstd",
        "unpacks the 6.12 kernel image for the kernel matrix",
        &[Vm],
    ),
];

/// The packages of [`APT_PACKAGES`] that any of `purposes` (plus [`Purpose::Build`], always)
/// needs, as (name, reason), in table order.
pub fn apt_packages_for(purposes: &[Purpose]) -> Vec<(&'static str, &'static str)> {
    APT_PACKAGES
        .iter()
        .filter(|p| p.purposes.iter().any(|q| *q == Build || purposes.contains(q)))
        .map(|p| (p.name, p.reason))
        .collect()
}

/// Whether `purposes` include the privileged suite's peers (npm packages, the gRPC venv, `npm`):
/// the suite itself, and the kernel matrix, whose guests run the same suite.
fn needs_test_peers(purposes: &[Purpose]) -> bool {
    purposes.iter().any(|p| matches!(p, Test | Vm))
}

/// Debian packages the test suite's purposes install only when the command they provide is
/// missing from `PATH`, as (command, package, reason): NodeSource's `nodejs` ships `npm` itself
/// and conflicts with Debian's `npm` package.
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

/// `cargo xtask bootstrap [--for PURPOSE]...`: install whatever is missing (see [`ensure`]).
#[derive(Debug, Args)]
pub struct Options {
    /// Install only what this needs (repeatable); everything by default
    #[arg(long = "for", value_enum, value_name = "PURPOSE")]
    purposes: Vec<Purpose>,
}

pub fn run(opts: Options) -> Result<()> {
    let purposes = if opts.purposes.is_empty() {
        Purpose::value_variants().to_vec()
    } else {
        opts.purposes
    };
    if ensure(&purposes)? == 0 {
        println!("bootstrap: everything is present");
    }
    Ok(())
}

/// Checks the host and installs what `purposes` (and the build, always) need and is missing;
/// returns how many things it installed.
pub fn ensure(purposes: &[Purpose]) -> Result<usize> {
    if env::consts::OS != "linux" {
        bail!(
            "sockmesh builds and runs on Linux only (this is {}): it needs eBPF, cgroup v2 \
             and network namespaces",
            env::consts::OS
        );
    }
    let mut installed = apt_packages(purposes)?;
    installed += rust_src()?;
    installed += bpf_linker()?;
    if needs_test_peers(purposes) {
        let root = crate::workspace_root();
        installed += npm_peers(&root)?;
        installed += test_venv(&root)?;
        installed += crate::k8s::ensure_venv(&root)?;
    }
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

fn apt_packages(purposes: &[Purpose]) -> Result<usize> {
    let mut missing = Vec::new();
    for (package, reason) in apt_packages_for(purposes) {
        let status = exec::probe(exec::command("dpkg-query").args(["-W", "-f=${Status}", package]))
            .context("`dpkg-query` is unavailable: bootstrap supports Debian 12 only")?;
        if !status.as_deref().is_some_and(dpkg_installed) {
            missing.push((package, reason));
        }
    }
    if needs_test_peers(purposes) {
        let path = exec::child_path();
        for &(command, package, reason) in APT_COMMANDS {
            if exec::find_in_path(command, &path).is_none() && !missing.iter().any(|&(p, _)| p == package) {
                missing.push((package, reason));
            }
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
    // Ask apt what it would do before letting it do anything: it may want to remove packages
    // (a conflicting backport, another tool's runtime) to satisfy these, and that is never ours
    // to decide.
    let plan = simulate(&names, &[])?;
    if plan.remove.is_empty() {
        install(&names, &[], &plan)?;
    } else {
        install_around_backports(&names, &plan)?;
    }
    let still: Vec<&str> = names
        .iter()
        .copied()
        .filter(|p| {
            !exec::probe(exec::command("dpkg-query").args(["-W", "-f=${Status}", p]))
                .ok()
                .flatten()
                .as_deref()
                .is_some_and(dpkg_installed)
        })
        .collect();
    if !still.is_empty() {
        bail!("apt-get finished but {} is still not installed", still.join(" "));
    }
    Ok(missing.len())
}

/// What apt would do to install `names` (with `extra` options), from its simulation.
fn simulate(names: &[&str], extra: &[String]) -> Result<AptPlan> {
    let simulated = exec::capture(apt_install(names, extra).arg("--simulate"))
        .with_context(|| format!("apt-get cannot install {}", names.join(" ")))?;
    Ok(AptPlan::parse(&simulated))
}

/// Installs `names` as `plan` (their simulation) said; `--no-remove` as well, so that should the
/// real run differ from the simulation, apt aborts rather than remove anything.
fn install(names: &[&str], extra: &[String], plan: &AptPlan) -> Result<()> {
    println!("{}", plan.summary());
    exec::run(apt_install(names, extra).arg("--no-remove"))?;
    println!("installed with apt: {}", plan.installed_list());
    Ok(())
}

/// apt wants to remove something to install `names`. The one case bootstrap resolves: what it
/// would remove came from the release's backports (this machine kind ships qemu-utils 10 from
/// bookworm-backports, which breaks bookworm's own qemu-system 7.2). Then the packages that cause
/// the removal are installed from the same backports, through a private apt source list under
/// `target/` (the machine's own sources are not touched), and the rest as usual. Anything else is
/// refused, naming what apt would remove.
fn install_around_backports(names: &[&str], plan: &AptPlan) -> Result<()> {
    let refuse = |why: &str| {
        anyhow::anyhow!(
            "apt-get would remove {} to install {}; bootstrap never removes packages{why}. \
             Resolve the conflict by hand (or install those packages yourself), then rerun",
            plan.remove.join(" "),
            names.join(" ")
        )
    };
    let backported = plan
        .remove
        .iter()
        .all(|p| installed_version(p).is_some_and(|v| v.contains("~bpo")));
    let Some(codename) = os_codename().filter(|_| backported) else {
        return Err(refuse(""));
    };
    let mut conflicting = Vec::new();
    for name in names {
        if !simulate(&[name], &[])?.remove.is_empty() {
            conflicting.push(*name);
        }
    }
    let rest: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !conflicting.contains(n))
        .collect();
    if conflicting.is_empty() {
        return Err(refuse(" (no single package causes it)"));
    }
    let suite = format!("{codename}-backports");
    println!(
        "apt would remove {} (installed from {suite}) to install {}: installing those from {suite} too",
        plan.remove.join(" "),
        conflicting.join(" ")
    );
    let mut extra = backports_sources(&codename)?;
    extra.extend(["-t".to_owned(), suite.clone()]);
    let bp_plan = simulate(&conflicting, &extra)?;
    if !bp_plan.remove.is_empty() {
        return Err(refuse(&format!(" (even from {suite})")));
    }
    if !rest.is_empty() {
        let rest_plan = simulate(&rest, &[])?;
        if !rest_plan.remove.is_empty() {
            return Err(refuse(""));
        }
        install(&rest, &[], &rest_plan)?;
    }
    install(&conflicting, &extra, &bp_plan)
}

/// The installed version of `package`, if any.
fn installed_version(package: &str) -> Option<String> {
    exec::probe(exec::command("dpkg-query").args(["-W", "-f=${Version}", package]))
        .ok()
        .flatten()
        .filter(|v| !v.trim().is_empty())
}

/// `VERSION_CODENAME` of /etc/os-release (`bookworm`).
fn os_codename() -> Option<String> {
    let release = fs::read_to_string("/etc/os-release").ok()?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// apt options for a private source list: the machine's own sources plus `<codename>-backports`,
/// with package lists under `target/apt-backports` (updated here).
fn backports_sources(codename: &str) -> Result<Vec<String>> {
    let dir = crate::workspace_root().join("target/apt-backports");
    let parts = dir.join("sources.list.d");
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial")).with_context(|| format!("create {}", lists.display()))?;
    fs::create_dir_all(&parts)?;
    for entry in fs::read_dir("/etc/apt/sources.list.d").context("read /etc/apt/sources.list.d")? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".sources") || name.ends_with(".list") {
            fs::copy(&path, parts.join(name))?;
        }
    }
    fs::write(
        parts.join("sockmesh-backports.sources"),
        format!(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {codename}-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    let extra = vec![
        "-o".to_owned(),
        format!("Dir::Etc::sourceparts={}", parts.display()),
        "-o".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
    ];
    exec::run(exec::command("apt-get").args(&extra).arg("update"))?;
    Ok(extra)
}

/// `apt-get install -y --no-install-recommends <names>`, non-interactive, in the C locale (so
/// its simulation output can be parsed).
fn apt_install(names: &[&str], extra: &[String]) -> std::process::Command {
    let mut cmd = exec::command("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .args(extra)
        .args(["install", "-y", "--no-install-recommends"])
        .args(names);
    cmd
}

/// What `apt-get install --simulate` says it would do: packages it would install new, upgrade
/// and remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AptPlan {
    pub install: Vec<String>,
    pub upgrade: Vec<String>,
    pub remove: Vec<String>,
}

impl AptPlan {
    /// Parses the simulation's `Inst name (version ...)` (new), `Inst name [old] (new ...)`
    /// (upgrade) and `Remv name [version]` lines; everything else is ignored.
    pub fn parse(simulation: &str) -> AptPlan {
        let mut plan = AptPlan::default();
        for line in simulation.lines() {
            let mut words = line.split_whitespace();
            let (Some(action), Some(name)) = (words.next(), words.next()) else {
                continue;
            };
            match action {
                "Inst" if words.next().is_some_and(|w| w.starts_with('[')) => {
                    plan.upgrade.push(name.to_owned());
                }
                "Inst" => plan.install.push(name.to_owned()),
                "Remv" => plan.remove.push(name.to_owned()),
                _ => {}
            }
        }
        plan
    }

    /// One line saying what apt is about to install, dependencies included.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "apt will install {} package(s), dependencies included: {}",
            self.install.len(),
            self.install.join(" ")
        );
        if !self.upgrade.is_empty() {
            s.push_str(&format!(
                "; and upgrade {}: {}",
                self.upgrade.len(),
                self.upgrade.join(" ")
            ));
        }
        s
    }

    /// Every package apt installed or upgraded, space-separated.
    pub fn installed_list(&self) -> String {
        let all: Vec<&str> = self
            .install
            .iter()
            .chain(&self.upgrade)
            .map(String::as_str)
            .collect();
        if all.is_empty() {
            "nothing new (already present)".to_owned()
        } else {
            all.join(" ")
        }
    }
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
        let mut names: Vec<&str> = APT_PACKAGES.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), APT_PACKAGES.len());
        for &(_, package, _) in APT_COMMANDS {
            assert!(!names.contains(&package), "{package} is in both lists");
        }
        for p in APT_PACKAGES {
            assert!(!p.purposes.is_empty(), "{} is needed by nothing", p.name);
        }
    }

    fn names(purposes: &[Purpose]) -> Vec<&'static str> {
        apt_packages_for(purposes).into_iter().map(|(n, _)| n).collect()
    }

    const BUILD: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];

    #[test]
    fn the_build_needs_only_llvm() {
        assert_eq!(names(&[]), BUILD);
        assert_eq!(names(&[Build]), BUILD);
    }

    #[test]
    fn the_demo_gets_only_what_it_runs() {
        let demo = names(&[Demo]);
        let mut want = BUILD.to_vec();
        want.extend(["iproute2", "curl", "python3"]);
        assert_eq!(demo, want);
        assert!(!needs_test_peers(&[Demo]));
    }

    /// Every external program `sockmesh-demo` starts by name is in the demo's packages.
    #[test]
    fn the_demo_packages_cover_the_demo_binary() {
        let src = fs::read_to_string(crate::workspace_root().join("tests/src/bin/sockmesh-demo.rs"))
            .expect("demo source");
        // Programs the demo (and the harness it uses: `ip` for namespaces, `python3` for its
        // servers) runs, and the Debian package of each.
        let provided_by = [("curl", "curl"), ("ip", "iproute2"), ("python3", "python3")];
        let demo = names(&[Demo]);
        let mut seen = 0;
        for part in src.split("Command::new(\"").skip(1) {
            let program = part.split('"').next().unwrap_or_default();
            let package = provided_by
                .iter()
                .find(|(c, _)| *c == program)
                .map(|(_, p)| *p)
                .unwrap_or_else(|| panic!("the demo runs `{program}`: add it and its package here"));
            assert!(
                demo.contains(&package),
                "{program} ({package}) is not in {demo:?}"
            );
            seen += 1;
        }
        assert!(seen > 0, "found no Command::new(\"...\") in the demo");
        for (_, package) in provided_by {
            assert!(demo.contains(&package), "{package} is not in {demo:?}");
        }
    }

    #[test]
    fn the_bench_gets_its_peers_but_not_the_vm_or_the_test_peers() {
        let bench = names(&[Bench]);
        for p in [
            "wrk",
            "haproxy",
            "iptables",
            "fonts-dejavu-core",
            "python3-venv",
            "bpftool",
        ] {
            assert!(bench.contains(&p), "bench lacks {p}");
        }
        for p in ["qemu-system-x86", "nodejs", "nghttp2-client", "linux-perf"] {
            assert!(!bench.contains(&p), "bench gets {p}");
        }
        assert!(names(&[Bench, Profile]).contains(&"linux-perf"));
        assert!(!needs_test_peers(&[Bench, Profile]));
    }

    #[test]
    fn the_test_suite_gets_every_tool_it_runs() {
        let test = names(&[Test]);
        for p in [
            "bpftool",
            "iproute2",
            "curl",
            "python3",
            "python3-venv",
            "util-linux",
            "procps",
            "wrk",
            "nodejs",
            "nghttp2-client",
            "nginx-light",
        ] {
            assert!(test.contains(&p), "test lacks {p}");
        }
        for p in ["qemu-system-x86", "haproxy", "iptables"] {
            assert!(!test.contains(&p), "test alone gets {p}");
        }
        assert!(needs_test_peers(&[Test]));
        // The kernel matrix runs the same suite in its guests, plus QEMU and the initramfs tools.
        let vm = names(&[Test, Vm]);
        for p in test
            .iter()
            .chain(&["qemu-system-x86", "busybox-static", "cpio", "kmod"])
        {
            assert!(vm.contains(p), "vm-test lacks {p}");
        }
        assert!(needs_test_peers(&[Vm]));
    }

    #[test]
    fn everything_is_every_package() {
        assert_eq!(names(Purpose::value_variants()).len(), APT_PACKAGES.len());
    }

    #[test]
    fn apt_simulation_is_parsed() {
        let out = "Reading package lists...\n\
            The following packages will be REMOVED:\n  qemu-utils\n\
            Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
            Inst libtext-charwidth-perl (0.04-11 Debian:12.15/oldstable [amd64])\n\
            Inst curl [7.88.1-10+deb12u12] (7.88.1-10+deb12u14 Debian:12.15/oldstable [amd64])\n\
            Inst cowsay (3.03+dfsg2-8 Debian:12.15/oldstable [all])\n\
            Conf libtext-charwidth-perl (0.04-11 Debian:12.15/oldstable [amd64])\n\
            Conf cowsay (3.03+dfsg2-8 Debian:12.15/oldstable [all])\n";
        let plan = AptPlan::parse(out);
        assert_eq!(plan.install, ["libtext-charwidth-perl", "cowsay"]);
        assert_eq!(plan.upgrade, ["curl"]);
        assert_eq!(plan.remove, ["qemu-utils"]);
        assert!(plan.summary().contains("2 package(s)"), "{}", plan.summary());
        assert_eq!(plan.installed_list(), "libtext-charwidth-perl cowsay curl");
        let nothing = AptPlan::parse("wrk is already the newest version (4.1.0-3+b2).\n");
        assert_eq!(nothing, AptPlan::default());
        assert_eq!(nothing.installed_list(), "nothing new (already present)");
    }
}
