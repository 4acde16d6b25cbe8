//! `cargo xtask`: sockmesh's build, test and demo orchestration.
//!
//! A thin CLI over external commands (apt, rustup, cargo): one module per subcommand, each with
//! `Options` and `run()`. Every subcommand first runs [`bootstrap`], which installs on a fresh
//! Debian 12 machine what that subcommand needs (and never removes a package). No sockmesh logic
//! lives here.
//!
//! - `cargo xtask bootstrap [--for build|demo|bench|profile|test|vm]`: install missing apt
//!   packages, nightly's rust-src and bpf-linker (and the test peers), for everything or for the
//!   given purposes.
//! - `cargo xtask build-ebpf`: build the kernel object into
//!   `target/bpfel-unknown-none/bpf/mesh-ebpf`.
//! - `cargo xtask test [--host-only | --no-host] [-- <test args>]`: host unit tests, then (as
//!   root) the privileged end-to-end suite.
//! - `cargo xtask vm-test [--kernel 6.1|6.12|all] [-- <test args>]`: the privileged suite inside
//!   QEMU on Debian's 6.1 and 6.12 kernels (as root); `test` runs it too when /dev/kvm exists.
//! - `cargo xtask demo [dual-link]`: build everything and run the demo (as root).
//! - `cargo xtask bench [--quick]`: build everything and run the benchmark (as root); a full run
//!   writes BENCHMARKS.md and docs/bench.png, `--quick` (a smoke run) writes
//!   `target/bench/BENCHMARKS-quick.md` and `target/bench/bench-quick.png` instead.
//! - `cargo xtask image [--tag NAME:TAG] [--out FILE]`: the Kubernetes node agent's OCI image
//!   (buildah, from scratch) as a docker-archive for `ctr -n k8s.io images import` (as root).
//! - `cargo xtask fuzz [--seconds N]`: run every protocol codec fuzz target for N seconds
//!   (nightly, cargo-fuzz) and report executions and crashes.
//! - `cargo xtask instructions [--requests N]`: the proxy's CPU instructions per HTTP/1.1
//!   request, counted by callgrind (needs valgrind), and the functions they go to.

mod bench;
mod bootstrap;
mod build_ebpf;
mod daemon;
mod demo;
mod exec;
mod fuzz;
mod instructions;
mod k8s;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and demo sockmesh",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what a fresh Debian 12 machine lacks (apt packages, rust-src, bpf-linker, test peers)
    Bootstrap(bootstrap::Options),
    /// Build the eBPF object (nightly, bpf-linker) into target/bpfel-unknown-none/bpf/mesh-ebpf
    BuildEbpf(build_ebpf::Options),
    /// Run the host unit tests, then (as root) the privileged end-to-end suite
    Test(test::Options),
    /// Build everything and run the demo (as root)
    Demo(demo::Options),
    /// Build everything and benchmark sockmesh against iptables, Envoy and HAProxy (as root)
    ///
    /// A full run (about 5 minutes) is the record: it rewrites BENCHMARKS.md and docs/bench.png,
    /// to be committed. `--quick` (about a minute) is a smoke run: it writes
    /// target/bench/BENCHMARKS-quick.md and target/bench/bench-quick.png and never touches the
    /// committed files. Raw samples go to target/bench/results.json.
    Bench(bench::Options),
    /// Run the protocol codec fuzz targets for a bounded time each (nightly, cargo-fuzz)
    Fuzz(fuzz::Options),
    /// Count the proxy's CPU instructions per HTTP/1.1 request with callgrind (needs valgrind)
    ///
    /// Sequential 1 KiB GETs over one keep-alive connection through an in-process proxy, minus
    /// the same client and upstream talking directly, divided by the requests; then the
    /// functions with the largest differences. Needs valgrind (apt-get install valgrind), not
    /// root. The callgrind files stay in target/instructions/.
    Instructions(instructions::Options),
    /// Run the privileged suite inside QEMU on Debian's 6.1 and 6.12 kernels (as root)
    VmTest(vm::Options),
    /// Build the Kubernetes node agent image (sockmesh + sockmesh-cni, from scratch) into
    /// target/image/sockmesh-image.tar (as root: buildah)
    Image(k8s::Options),
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bootstrap(opts) => bootstrap::run(opts).map(|()| ExitCode::SUCCESS),
        Command::BuildEbpf(opts) => build_ebpf::run(opts).map(|()| ExitCode::SUCCESS),
        Command::Test(opts) => test::run(opts),
        Command::Demo(opts) => demo::run(opts).map(|()| ExitCode::SUCCESS),
        Command::VmTest(opts) => vm::run(opts),
        Command::Bench(opts) => bench::run(opts).map(|()| ExitCode::SUCCESS),
        Command::Fuzz(opts) => fuzz::run(opts).map(|()| ExitCode::SUCCESS),
        Command::Instructions(opts) => instructions::run(opts).map(|()| ExitCode::SUCCESS),
        Command::Image(opts) => k8s::run(opts).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|err| {
        // The chain without a backtrace: the failing command line is in the message.
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_help_says_where_each_kind_of_run_writes() {
        let mut cli = Cli::command();
        let bench = cli.find_subcommand_mut("bench").expect("bench subcommand");
        let help = bench.render_long_help().to_string();
        for path in [
            "BENCHMARKS.md",
            "docs/bench.png",
            "target/bench/BENCHMARKS-quick.md",
            "target/bench/bench-quick.png",
        ] {
            assert!(
                help.contains(path),
                "`cargo xtask bench --help` lacks {path}:\n{help}"
            );
        }
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
