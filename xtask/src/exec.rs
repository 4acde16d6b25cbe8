//! Running external commands: one place that builds `Command`s with the right environment and
//! turns a failure into an error naming the full command line and its exit status.
//!
//! Helpers print nothing on success; children inherit stdio unless the output is captured.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Variables a parent `cargo`/rustup leaves behind that must not steer a child cargo: the child
/// sets its own `CARGO`, and the workspace layout (`<root>/target`) is a contract other crates
/// rely on (mesh-userspace's build.rs, `SOCKMESH_BIN`).
const CARGO_LEAKAGE: &[&str] = &["CARGO", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"];

/// Additionally removed for the nightly eBPF build: toolchain selection left by the parent's
/// rustup proxy, compiler overrides, and host rustflags (e.g. `-C target-cpu=native`) that make no
/// sense for `bpfel-unknown-none`. Target rustflags belong in the root `.cargo/config.toml`,
/// which still applies once these are gone.
const NIGHTLY_LEAKAGE: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
];

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where rustup's proxies and `cargo install` live.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// The `PATH` every child gets: `$CARGO_HOME/bin` first (so `cargo`, `rustup` and a freshly
/// installed `bpf-linker` are found even when the caller's `PATH` lacks it), then the caller's.
pub fn child_path() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    prepend_path(cargo_bin_dir().as_deref(), &current)
}

fn prepend_path(dir: Option<&Path>, current: &OsStr) -> OsString {
    let Some(dir) = dir else {
        return current.to_owned();
    };
    let mut entries: Vec<PathBuf> = vec![dir.to_owned()];
    entries.extend(env::split_paths(current).filter(|p| p != dir));
    env::join_paths(entries).unwrap_or_else(|_| current.to_owned())
}

/// Finds an executable called `name` in a `PATH`-style list.
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// A command whose `PATH` is [`child_path`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path());
    cmd
}

/// `cargo` for host builds and tests, run in the workspace root.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = command("cargo");
    cmd.current_dir(root);
    for key in CARGO_LEAKAGE {
        cmd.env_remove(key);
    }
    cmd
}

/// `cargo +nightly`, run in the workspace root, with the parent's toolchain and rustflags removed
/// so that nightly (and only the flags the workspace configures) is really used.
pub fn nightly_cargo(root: &Path) -> Command {
    let mut cmd = cargo(root);
    for key in NIGHTLY_LEAKAGE {
        cmd.env_remove(key);
    }
    cmd.arg("+nightly");
    cmd
}

/// Runs `cmd` with inherited stdio; an error if it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    check(cmd, status)
}

/// Runs `cmd` with inherited stdio and returns its exit status; an error only if it cannot start.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| spawn_failed(cmd))
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr too.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let output = output(cmd)?;
    check(cmd, output.status).map_err(|e| with_stderr(e, &output))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a check: `Some(stdout)` when it succeeds, `None` when it exits unsuccessfully (the
/// answer is "no"), an error only when it cannot start at all.
pub fn probe(cmd: &mut Command) -> Result<Option<String>> {
    let output = output(cmd)?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Replaces this process with `cmd` (which then owns the terminal, its signals and the exit
/// code); returns only if it cannot start.
pub fn replace(cmd: &mut Command) -> anyhow::Error {
    #[cfg(unix)]
    let err = std::os::unix::process::CommandExt::exec(cmd);
    #[cfg(not(unix))]
    let err = std::io::Error::new(std::io::ErrorKind::Unsupported, "exec needs unix");
    anyhow::Error::new(err).context(spawn_failed(cmd))
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| spawn_failed(cmd))
}

fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("command failed ({status}): {}", display(cmd))
    }
}

fn with_stderr(err: anyhow::Error, output: &Output) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    if stderr.is_empty() {
        err
    } else {
        anyhow!("{err}\n{stderr}")
    }
}

fn spawn_failed(cmd: &Command) -> String {
    format!("failed to start: {}", display(cmd))
}

/// The command as a shell line: environment it sets (except `PATH`), program, arguments, and the
/// directory it runs in, e.g. ``LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker (in /work)``.
pub fn display(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let (Some(value), false) = (value, key == "PATH") {
            let _ = write!(line, "{}={} ", key.to_string_lossy(), quote(value));
        }
    }
    line.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    let mut shown = format!("`{line}`");
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(shown, " (in {})", dir.display());
    }
    shown
}

/// Single-quotes a word when a shell would otherwise split or expand it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_args_and_dir() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "bpf-linker", "--features", "a b"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", "/ignored")
            .env_remove("RUSTFLAGS")
            .current_dir("/work");
        assert_eq!(
            display(&cmd),
            "`LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --features 'a b'` (in /work)"
        );
    }

    #[test]
    fn quote_escapes_single_quotes_and_empty() {
        assert_eq!(quote(OsStr::new("${Status}")), "'${Status}'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
        assert_eq!(quote(OsStr::new("--test-threads=1")), "--test-threads=1");
    }

    #[test]
    fn prepend_path_puts_dir_first_once() {
        let joined = prepend_path(
            Some(Path::new("/root/.cargo/bin")),
            OsStr::new("/usr/bin:/root/.cargo/bin:/bin"),
        );
        assert_eq!(joined, OsString::from("/root/.cargo/bin:/usr/bin:/bin"));
        assert_eq!(
            prepend_path(None, OsStr::new("/usr/bin")),
            OsString::from("/usr/bin")
        );
    }

    #[test]
    fn failure_names_command_and_status() {
        let err = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("`sh -c 'exit 3'`"), "{msg}");
    }

    #[test]
    fn capture_failure_includes_stderr_and_probe_says_no() {
        let err = capture(Command::new("sh").args(["-c", "echo oops >&2; exit 1"])).unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
        assert_eq!(probe(Command::new("false").arg("x")).unwrap(), None);
        assert_eq!(
            probe(Command::new("echo").arg("hi")).unwrap().as_deref(),
            Some("hi\n")
        );
        assert!(probe(&mut Command::new("/nonexistent/definitely-not-here")).is_err());
    }
}
