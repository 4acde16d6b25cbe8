//! The release `sockmesh` daemon build shared by `test` and `demo`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::exec;

/// `<root>/target/release/sockmesh`, handed to the tests and the demo as `SOCKMESH_BIN`.
pub fn sockmesh_bin_path(root: &Path) -> PathBuf {
    root.join("target").join("release").join("sockmesh")
}

/// Builds the daemon in release mode. Its build.rs embeds the object from `build-ebpf` and
/// reruns when that object changes, so call this after [`crate::build_ebpf::build`].
pub fn build(root: &Path) -> Result<PathBuf> {
    exec::run(exec::cargo(root).args(["build", "--release", "-p", "mesh-userspace", "--bin", "sockmesh"]))?;
    Ok(sockmesh_bin_path(root))
}
