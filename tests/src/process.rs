//! Starting processes inside a cgroup and a network namespace, and guards that always reap them.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::node::Pod;

/// How long [`pod_exec`] lets a command run.
pub const POD_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process that is killed (optionally SIGTERM first, with a grace period) and reaped when
/// the guard drops.
#[derive(Debug)]
pub struct GuardedChild {
    child: Child,
    what: String,
    term_grace: Option<Duration>,
    status: Option<ExitStatus>,
}

impl GuardedChild {
    /// Wraps an already spawned child. `what` names it in messages.
    pub fn new(child: Child, what: impl Into<String>) -> GuardedChild {
        GuardedChild {
            child,
            what: what.into(),
            term_grace: None,
            status: None,
        }
    }

    /// On drop/stop send SIGTERM first and wait up to `grace` before SIGKILL.
    pub fn with_term_grace(mut self, grace: Duration) -> GuardedChild {
        self.term_grace = Some(grace);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the child exited (and was reaped).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let s = self
            .child
            .try_wait()
            .with_context(|| format!("waitpid({}) for {}", self.pid(), self.what))?;
        self.status = s;
        Ok(s)
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut interval = Duration::from_millis(5);
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(interval.min(deadline - now));
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `sig` if the child has not been reaped yet (so the pid cannot have been reused).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.try_wait()?.is_none() {
            // SAFETY: plain syscall on our own unreaped child.
            if unsafe { libc::kill(self.pid() as i32, sig) } != 0 {
                bail!(
                    "kill({}, {sig}) for {}: {}",
                    self.pid(),
                    self.what,
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    /// Stops the child (SIGTERM + grace if configured, then SIGKILL) and reaps it.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.try_wait() {
            return Some(s);
        }
        if let Some(grace) = self.term_grace {
            let _ = self.signal(libc::SIGTERM);
            if let Ok(Some(s)) = self.wait_timeout(grace) {
                return Some(s);
            }
            eprintln!(
                "warning: {} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL",
                self.what,
                self.pid()
            );
        }
        let _ = self.child.kill();
        match self.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(s)) => Some(s),
            _ => {
                eprintln!(
                    "warning: {} (pid {}) did not exit after SIGKILL",
                    self.what,
                    self.pid()
                );
                None
            }
        }
    }

    /// Collects stdout/stderr (whichever were piped) until the child exits or `timeout` passes.
    /// On time-out the child is killed and an error carrying the partial output is returned.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let out_rx = self.child.stdout.take().map(spawn_reader);
        let err_rx = self.child.stderr.take().map(spawn_reader);
        let status = self.wait_timeout(timeout)?;
        let status = match status {
            Some(s) => s,
            None => {
                self.stop();
                let stdout = collect(out_rx, Duration::from_secs(2));
                let stderr = collect(err_rx, Duration::from_secs(2));
                bail!(
                    "{} timed out after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.what,
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
        };
        // The pipes close when the child exits unless a grandchild inherited them: bound it.
        let stdout = collect(out_rx, Duration::from_secs(5));
        let stderr = collect(err_rx, Duration::from_secs(5));
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn collect(rx: Option<mpsc::Receiver<Vec<u8>>>, timeout: Duration) -> Vec<u8> {
    rx.and_then(|rx| rx.recv_timeout(timeout).ok())
        .unwrap_or_default()
}

/// Spawns `cmd` with the child moved into `cgroup` (a directory of the test-owned subtree) and, if
/// given, into the network namespace at `netns`. Both happen in the child before `exec` (so even
/// the program's first instruction runs inside them); the parent-death signal is SIGKILL.
pub fn spawn_in(cgroup: &Path, netns: Option<&Path>, cmd: Command) -> Result<GuardedChild> {
    spawn_in_with(cgroup, netns, cmd, libc::SIGKILL)
}

/// [`spawn_in`] with a chosen parent-death signal (the daemon gets SIGTERM so it can clean up).
pub fn spawn_in_with(
    cgroup: &Path,
    netns: Option<&Path>,
    mut cmd: Command,
    death_signal: i32,
) -> Result<GuardedChild> {
    let what = describe(&cmd);
    let procs_path = cgroup.join("cgroup.procs");
    let procs: File = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("failed to open {} for {what}", procs_path.display()))?;
    let ns: Option<File> = netns
        .map(|p| File::open(p).with_context(|| format!("failed to open netns {}", p.display())))
        .transpose()?;
    let procs_fd = procs.as_raw_fd();
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe syscalls on fds opened above (O_CLOEXEC,
    // so they do not leak into the program) and reads errno.
    unsafe {
        cmd.pre_exec(move || {
            let zero = b"0";
            if libc::write(procs_fd, zero.as_ptr().cast(), zero.len()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            unblock_all_signals()
        });
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "failed to spawn {what} in cgroup {} netns {}",
            cgroup.display(),
            netns
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "<current>".into())
        )
    })?;
    drop(procs);
    drop(ns);
    Ok(GuardedChild::new(child, what))
}

/// Children must start with an empty signal mask even when the parent blocks signals (the demo
/// handles SIGINT with `sigwait`, and a blocked mask is inherited across `exec`). Only
/// async-signal-safe calls: meant for `pre_exec`.
fn unblock_all_signals() -> std::io::Result<()> {
    // SAFETY: sigemptyset on a local, then sigprocmask; both async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `program arg1 arg2 ...` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion inside `cgroup` and `netns` with a time-out; stdout and stderr are
/// captured, stdin is empty.
pub fn exec_in(cgroup: &Path, netns: Option<&Path>, mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_in(cgroup, netns, cmd)?.wait_output(timeout)
}

/// Runs `program args...` inside `pod` (its cgroup and netns) to completion, at most
/// [`POD_EXEC_TIMEOUT`].
pub fn pod_exec<S: AsRef<std::ffi::OsStr>>(
    pod: &Pod,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[S],
) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    exec_in(&pod.cgroup, Some(&pod.netns), cmd, POD_EXEC_TIMEOUT)
}

/// Runs a host command (current cgroup and netns) to completion with a time-out.
pub fn run_host(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = describe(&cmd);
    // SAFETY: only async-signal-safe calls (see `unblock_all_signals`).
    unsafe {
        cmd.pre_exec(unblock_all_signals);
    }
    let child = cmd.spawn().with_context(|| format!("failed to spawn {what}"))?;
    GuardedChild::new(child, what).wait_output(timeout)
}

/// Like [`run_host`] but fails unless the command exits 0; the error echoes the command and its
/// stderr.
pub fn run_host_ok(cmd: Command, timeout: Duration) -> Result<Output> {
    let what = describe(&cmd);
    let out = run_host(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `exit 3` / `signal 9` for messages.
pub fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s:?}"),
    }
}

/// Fails with stdout/stderr unless `out` is a success.
pub fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        status_text(out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A line-oriented child: write lines to its stdin, receive its stdout lines with a time-out.
/// Used for long-lived clients that a test drives step by step (`peer interactive`).
#[derive(Debug)]
pub struct LineChild {
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Last so it drops (kills the child) after stdin closes.
    child: GuardedChild,
}

impl LineChild {
    /// Spawns `cmd` like [`spawn_in`] with piped stdin/stdout; stderr goes to the test's stderr.
    pub fn spawn(cgroup: &Path, netns: Option<&Path>, mut cmd: Command) -> Result<LineChild> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_in(cgroup, netns, cmd)?;
        let stdin = child.child_mut().stdin.take();
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(LineChild {
            stdin,
            lines: rx,
            child,
        })
    }

    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin of {} already closed", self.child.what()))?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("write to stdin of {}", self.child.what()))
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn recv_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("no output line from {} within {timeout:?}", self.child.what())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.wait_timeout(Duration::from_secs(2))?;
                bail!("{} closed its stdout (status {st:?})", self.child.what())
            }
        }
    }

    /// Closes stdin (the child sees EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn child(&mut self) -> &mut GuardedChild {
        &mut self.child
    }
}
