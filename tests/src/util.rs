//! Small helpers: bounded polling, privilege checks, paths of the binaries under test, temp dirs.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// One counter for every unique name the harness makes in this process (nodes, temp dirs).
static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// The value of `key` (e.g. `"VmRSS:"`) in a `/proc/<pid>/status`-style text, trimmed.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

/// A process-unique number.
pub fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` until it returns `Ok`, for at most `timeout`. The interval starts at 20 ms and backs
/// off to 250 ms. On time-out the last error is returned with how long was waited.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(err.context(format!(
                "condition not met within {timeout:?} ({attempts} attempts)"
            )));
        }
        std::thread::sleep(interval.min(timeout - elapsed));
        interval = (interval * 2).min(Duration::from_millis(250));
    }
}

/// Like `assert_eq!` but as a `Result`, for use inside [`eventually`].
pub fn ensure_eq<T: PartialEq + Debug>(what: &str, left: T, right: T) -> Result<()> {
    if left == right {
        Ok(())
    } else {
        bail!("{what}: {left:?} != {right:?}")
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The daemon binary: `$SOCKMESH_BIN`, else `<workspace>/target/release/sockmesh`.
pub fn sockmesh_bin() -> PathBuf {
    match std::env::var_os("SOCKMESH_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/release/sockmesh"),
    }
}

/// The `peer` test binary: `$SOCKMESH_PEER_BIN`, else next to the running executable (the demo,
/// or `target/<profile>/` for a test binary living in `target/<profile>/deps/`).
pub fn peer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SOCKMESH_PEER_BIN") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("peer");
            if candidate.is_file() {
                return candidate;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    workspace_root().join("target/debug/peer")
}

/// An override for how to run the peer: (program, leading args). The demo sets it to itself +
/// `peer`, so it works without a separately built `peer` binary.
static PEER_COMMAND: std::sync::OnceLock<(PathBuf, Vec<String>)> = std::sync::OnceLock::new();

/// Makes [`peer_command`] run `program leading_args... <peer args>` (first call wins).
pub fn set_peer_command(program: PathBuf, leading_args: Vec<String>) {
    let _ = PEER_COMMAND.set((program, leading_args));
}

/// A `Command` that runs the peer (see [`crate::peer`]); add the peer's arguments.
pub fn peer_command() -> std::process::Command {
    match PEER_COMMAND.get() {
        Some((program, lead)) => {
            let mut c = std::process::Command::new(program);
            c.args(lead);
            c
        }
        None => std::process::Command::new(peer_bin()),
    }
}

/// `tests/peers/` (the python peers).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The python interpreter: `$SOCKMESH_PYTHON`, else `python3` from `PATH`.
pub fn python() -> PathBuf {
    match std::env::var_os("SOCKMESH_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("python3"),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn current_test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .unwrap_or_else(|| "<unnamed test>".to_owned())
}

fn skip_or_panic(test: &str, why: &str) -> bool {
    if std::env::var("SOCKMESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "{test}: SOCKMESH_REQUIRE_PRIVILEGED=1 but this test cannot run: {why} \
             (run as root with SOCKMESH_BIN pointing at a built `sockmesh`)"
        );
    }
    // Straight to fd 2: libtest captures `eprintln!` of passing tests, and a skip must be seen.
    let banner = format!(
        "\n################################################################\n\
         ## SKIPPED (needs root): {test}\n\
         ## reason: {why}\n\
         ## set SOCKMESH_REQUIRE_PRIVILEGED=1 to make this a failure\n\
         ################################################################\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
    false
}

fn privilege_problem(need_daemon: bool) -> Option<String> {
    if !is_root() {
        return Some("not running as root".into());
    }
    if let Err(e) = crate::cgroup::try_cgroup2_mount() {
        return Some(format!("{e:#}"));
    }
    if !is_executable(Path::new("/usr/sbin/ip")) && !is_executable(Path::new("/sbin/ip")) {
        return Some("iproute2 `ip` not found".into());
    }
    if need_daemon {
        let bin = sockmesh_bin();
        if !is_executable(&bin) {
            return Some(format!(
                "sockmesh binary {} is missing (build it with `cargo build --release -p \
                 mesh-userspace` or set SOCKMESH_BIN)",
                bin.display()
            ));
        }
    }
    None
}

/// For tests that need root, the cgroup v2 mount and the `sockmesh` binary. Returns `false` (after a
/// loud `SKIPPED` banner) when something is missing, or panics when `SOCKMESH_REQUIRE_PRIVILEGED=1`.
/// The first call of a process sweeps what killed test processes left ([`crate::sweep`]).
pub fn require_privileged() -> bool {
    match privilege_problem(true) {
        None => {
            crate::sweep::sweep_once();
            true
        }
        Some(why) => skip_or_panic(&current_test_name(), &why),
    }
}

/// Like [`require_privileged`] for harness tests that do not run the daemon.
pub fn require_root() -> bool {
    match privilege_problem(false) {
        None => {
            crate::sweep::sweep_once();
            true
        }
        Some(why) => skip_or_panic(&current_test_name(), &why),
    }
}

/// A free TCP port on 127.0.0.1 in the current network namespace (racy but good enough: the
/// kernel hands out ephemeral ports round-robin).
pub fn free_tcp_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A directory under the system temp dir, removed recursively on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("sockmesh-test-{}-{}-{tag}", std::process::id(), unique()));
        std::fs::create_dir_all(&path).with_context(|| format!("failed to create {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: failed to remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes every [`TempDir`] this process created (for a signal handler that exits without
/// running destructors).
pub fn remove_own_temp_dirs() {
    let prefix = format!("sockmesh-test-{}-", std::process::id());
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The BPF programs `bpftool` reports attached to `cgroup` or any cgroup below it
/// (`bpftool -j cgroup tree <cgroup>`), as `"<cgroup> <attach_type> <name>"` strings.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<String>> {
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["-j", "cgroup", "tree"]).arg(cgroup);
    let out = crate::process::run_host(cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "bpftool cgroup tree {} failed: {}",
            cgroup.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("bpftool printed non-JSON: {text}"))?;
    let mut found = Vec::new();
    for entry in v
        .as_array()
        .ok_or_else(|| anyhow!("bpftool: not an array: {text}"))?
    {
        let cg = entry["cgroup"].as_str().unwrap_or("?");
        if let Some(progs) = entry["programs"].as_array() {
            for p in progs {
                found.push(format!(
                    "{cg} {} {}",
                    p["attach_type"].as_str().unwrap_or("?"),
                    p["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_returns_first_success() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), || {
            n += 1;
            if n < 3 {
                bail!("not yet")
            } else {
                Ok(n)
            }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn eventually_is_bounded_and_keeps_the_last_error() {
        let start = Instant::now();
        let err = eventually(Duration::from_millis(200), || -> Result<()> { bail!("nope") }).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        let msg = format!("{err:#}");
        assert!(msg.contains("nope") && msg.contains("not met"), "{msg}");
    }

    #[test]
    fn temp_dir_is_removed() {
        let p = {
            let d = TempDir::new("unit").unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
            d.path().to_path_buf()
        };
        assert!(!p.exists());
    }
}

/// The last stdout line of `out` that is a JSON object (the peers and load clients print their
/// summary last). Panics, showing both streams, when there is none or it does not parse.
pub fn last_json(what: &str, out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "{what} printed no JSON ({}): stdout {stdout:?} stderr {:?}",
                crate::process::status_text(out.status),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: bad JSON {line:?}: {e}"))
}
