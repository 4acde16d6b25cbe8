//! `cargo xtask demo [dual-link]`: build everything and run the demo (its logic lives in the tests
//! crate: `tests/src/bin/sockmesh-demo.rs`, the dual-link scene in `tests/src/bin/demo/`).

use anyhow::Result;
use clap::Args;

use crate::{bootstrap, build_ebpf, daemon, exec, workspace_root};

/// `cargo xtask demo [SCENE] [-- <demo args>]` (as root)
#[derive(Debug, Args)]
pub struct Options {
    /// The scene: none for the capture / routing / colour tour, `dual-link` for active /
    /// keep-alive links switched under load
    #[arg(value_parser = ["dual-link"])]
    scene: Option<String>,
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
        .args(opts.scene.iter())
        .args(&opts.args);
    // Becomes the demo: it gets Ctrl-C directly and its exit code is ours.
    Err(exec::replace(&mut cmd))
}
