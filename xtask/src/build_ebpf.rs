//! `cargo xtask build-ebpf`: compile `mesh-ebpf` for the kernel with nightly and bpf-linker.
//!
//! The object lands at [`ebpf_object_path`], where `mesh-userspace/build.rs` picks it up.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{bootstrap, exec, workspace_root};

/// The eBPF crate, its target and the cargo profile (root Cargo.toml) it is built with.
pub const EBPF_PACKAGE: &str = "mesh-ebpf";
pub const EBPF_TARGET: &str = "bpfel-unknown-none";
pub const EBPF_PROFILE: &str = "bpf";

/// `cargo xtask build-ebpf`: bootstrap, then build the kernel object.
#[derive(Debug, Args)]
pub struct Options {}

pub fn run(Options {}: Options) -> Result<()> {
    bootstrap::ensure(&[bootstrap::Purpose::Build])?;
    let object = build(&workspace_root())?;
    let size = fs::metadata(&object)
        .with_context(|| format!("build succeeded but {} is missing", object.display()))?
        .len();
    println!("ebpf object: {} ({size} bytes)", object.display());
    Ok(())
}

/// Where the kernel object lands: `<root>/target/bpfel-unknown-none/bpf/mesh-ebpf`.
pub fn ebpf_object_path(root: &Path) -> PathBuf {
    root.join("target")
        .join(EBPF_TARGET)
        .join(EBPF_PROFILE)
        .join(EBPF_PACKAGE)
}

/// Builds the kernel object (no bootstrap) and returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    exec::run(exec::nightly_cargo(root).args([
        "build",
        "-p",
        EBPF_PACKAGE,
        "--target",
        EBPF_TARGET,
        "-Z",
        "build-std=core",
        "--profile",
        EBPF_PROFILE,
    ]))?;
    Ok(ebpf_object_path(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_path_layout() {
        assert_eq!(
            ebpf_object_path(Path::new("/w")),
            PathBuf::from("/w/target/bpfel-unknown-none/bpf/mesh-ebpf")
        );
    }
}
