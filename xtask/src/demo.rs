//! `cargo xtask demo`: build everything and run the demo (its logic lives in the tests crate).

use anyhow::Result;
use clap::Args;

use crate::{bootstrap, build_ebpf, daemon, exec, workspace_root};

/// `cargo xtask demo [-- <demo args>]` (as root)
#[derive(Debug, Args)]
pub struct Options {
    /// Passed to `sockmesh-demo`
    #[arg(last = true, value_name = "DEMO_ARGS")]
    args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    bootstrap::require_root(
        "`cargo xtask demo` (it creates network namespaces and cgroups and attaches eBPF programs)",
    )?;
    bootstrap::ensure(&[bootstrap::Purpose::Demo])?;
    let root = workspace_root();
    build_ebpf::build(&root)?;
    let sockmesh = daemon::build(&root)?;
    exec::run(exec::cargo(&root).args(["build", "-p", "sockmesh-tests", "--bin", "sockmesh-demo"]))?;

    let demo = root.join("target").join("debug").join("sockmesh-demo");
    let mut cmd = exec::command(&demo);
    cmd.current_dir(&root)
        .env("SOCKMESH_BIN", sockmesh)
        .args(&opts.args);
    // Becomes the demo: it gets Ctrl-C directly and its exit code is ours.
    Err(exec::replace(&mut cmd))
}
