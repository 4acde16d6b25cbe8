//! The outside tools a privileged test drives (real clients and servers), found where
//! `cargo xtask bootstrap` puts them, and the check that skips a test loudly when one is
//! missing — or fails it under `SOCKMESH_REQUIRE_PRIVILEGED=1` (CI).

use std::path::PathBuf;
use std::process::Command;

use crate::rpc::npm_peers_problem;
use crate::util::{require_privileged, workspace_root};

/// A tool a test needs.
#[derive(Debug, Clone, Copy)]
pub enum Tool {
    /// `node` on PATH.
    Node,
    /// The npm Bolt/Dubbo clients and servers in `tests/peers/npm/node_modules`.
    NpmPeers,
    /// A Python that imports grpcio ([`grpc_python`]).
    GrpcPython,
    Wrk,
    H2load,
    Curl,
}

/// The Python with grpcio: `$SOCKMESH_TEST_PYTHON`, else `<workspace>/target/test-venv`.
pub fn grpc_python() -> PathBuf {
    match std::env::var_os("SOCKMESH_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/test-venv/bin/python"),
    }
}

/// `name` in a directory of `$PATH`.
pub fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Why `tool` cannot run here (`None` when it can).
pub fn tool_problem(tool: Tool) -> Option<String> {
    let on_path = |cmd: &str, what: &str| in_path(cmd).is_none().then(|| format!("{what} is not on PATH"));
    let problem = match tool {
        Tool::Node => on_path("node", "`node`"),
        Tool::Wrk => on_path("wrk", "`wrk`"),
        Tool::H2load => on_path("h2load", "`h2load` (nghttp2-client)"),
        Tool::Curl => on_path("curl", "`curl`"),
        Tool::NpmPeers => npm_peers_problem(),
        Tool::GrpcPython => {
            let py = grpc_python();
            let ok = Command::new(&py)
                .args(["-c", "import grpc"])
                .output()
                .is_ok_and(|o| o.status.success());
            (!ok).then(|| format!("{} cannot import grpc", py.display()))
        }
    };
    problem.map(|p| format!("{p} (run `cargo xtask bootstrap`)"))
}

/// Like [`require_privileged`], plus the tools: false (after a banner) when something is
/// missing, a panic under `SOCKMESH_REQUIRE_PRIVILEGED=1`.
pub fn require(tools: &[Tool]) -> bool {
    if !require_privileged() {
        return false;
    }
    let problems: Vec<String> = tools.iter().filter_map(|&t| tool_problem(t)).collect();
    if problems.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    if std::env::var("SOCKMESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "{test}: SOCKMESH_REQUIRE_PRIVILEGED=1 but a tool is missing: {}",
            problems.join("; ")
        );
    }
    let banner = format!(
        "\n################################################################\n\
         ## SKIPPED (missing tool): {test}\n## {}\n\
         ################################################################\n",
        problems.join("\n## ")
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
    false
}
