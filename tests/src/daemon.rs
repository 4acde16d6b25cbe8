//! [`Daemon`]: a `sockmesh run` inside a node's `daemon` cgroup, stopped (SIGTERM, then SIGKILL)
//! when the guard drops.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::node::{Pod, VirtualNode};
use crate::process::{run_host, spawn_in_with, status_text, GuardedChild};
use crate::util::{eventually, free_tcp_port, sockmesh_bin, TempDir};

/// How long the daemon gets to answer `status` after start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon gets to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Bound for every CLI call (`status`, `enroll`, ...).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Daemon {
    bin: PathBuf,
    admin_socket: PathBuf,
    metrics_addr: SocketAddr,
    log_path: PathBuf,
    config_path: PathBuf,
    /// This daemon's pinned state; `sockmesh uninstall` removes it on drop.
    pin_dir: PathBuf,
    state_file: PathBuf,
    /// False once the state was handed to a successor: drop then leaves it alone.
    owns_state: bool,
    child: Option<GuardedChild>,
    /// After [`Daemon::upgrade`]: the generation now running (not our child until the one
    /// that started it exits; this process is a child subreaper, so then it is).
    successor: Option<u32>,
    /// This process's own probe socket (`run --probe-socket`).
    probe_socket: PathBuf,
    /// Dropped last: holds the config, the log and the admin socket (shared with the daemons
    /// started beside this one by [`Daemon::start_take_over`]).
    dir: std::sync::Arc<TempDir>,
}

impl Daemon {
    /// Writes `config_toml` to a temp dir and starts `$SOCKMESH_BIN run` in the node's `daemon`
    /// cgroup (host netns), then waits until `status` answers.
    pub fn start(node: &VirtualNode, config_toml: &str) -> Result<Daemon> {
        Self::start_in(node.daemon_cgroup(), config_toml)
    }

    /// Like [`Daemon::start`] with an explicit cgroup (it must be inside the config's
    /// `cgroup_root`).
    pub fn start_in(cgroup: &Path, config_toml: &str) -> Result<Daemon> {
        Self::start_with_state(cgroup, config_toml, None)
    }

    /// Like [`Daemon::start_in`], re-using the pinned state `(pin_dir, state_file)` that an
    /// earlier daemon handed over with [`Daemon::hand_over_state`] (a restart).
    pub fn start_with_state(
        cgroup: &Path,
        config_toml: &str,
        state: Option<(PathBuf, PathBuf)>,
    ) -> Result<Daemon> {
        Self::start_with_args(cgroup, config_toml, state, &[])
    }

    /// Like [`Daemon::start_with_state`], with extra `run` arguments (e.g. `--take-over`).
    pub fn start_with_args(
        cgroup: &Path,
        config_toml: &str,
        state: Option<(PathBuf, PathBuf)>,
        args: &[&str],
    ) -> Result<Daemon> {
        let dir = TempDir::new("daemon")?;
        let config_path = dir.join("sockmesh.toml");
        std::fs::write(&config_path, config_toml)
            .with_context(|| format!("failed to write {}", config_path.display()))?;
        let admin_socket = dir.join("admin.sock");
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;

        // Each daemon gets its own pinned state (bpffs) and state file, removed on drop, so
        // daemons never adopt each other's links, whatever the config says.
        let (pin_dir, state_file) = state.unwrap_or_else(|| {
            (
                PathBuf::from(format!(
                    "/sys/fs/bpf/sockmesh-test-{}-{}",
                    std::process::id(),
                    crate::util::unique()
                )),
                dir.join("state.json"),
            )
        });
        let mut daemon = Daemon::spawn(
            cgroup,
            std::sync::Arc::new(dir),
            Paths {
                config_path,
                admin_socket,
                metrics_addr,
                pin_dir,
                state_file,
            },
            "daemon",
            args,
            &[],
        )?;
        let what = format!("sockmesh run {}", args.join(" "));
        let ready = eventually(READY_TIMEOUT, || {
            if let Some(s) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Not worth polling further: report at once.
                return Ok(Err(anyhow!("daemon exited during start-up ({})", status_text(s))));
            }
            daemon.status().map(|_| Ok(()))
        });
        match ready.and_then(|r| r) {
            Ok(()) => Ok(daemon),
            Err(e) => {
                daemon.print_log("daemon failed to start");
                Err(e.context(format!("`{what}` did not become ready")))
            }
        }
    }

    /// A `sockmesh run --take-over` (with `args`, e.g. `--take-over=any`, and `env`) started
    /// beside this daemon in `cgroup`, as a DaemonSet's surge pod would be: the same config,
    /// pinned state, state file (and lock), admin socket and metrics address; its own log and
    /// probe socket. Not waited for: it may wait (not ready) or take over. It does not own
    /// the pinned state until [`Daemon::hand_state_to`] says so.
    pub fn start_take_over(&self, cgroup: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let n = crate::util::unique();
        let mut all = vec!["--take-over"];
        if args.iter().any(|a| a.starts_with("--take-over")) {
            all.clear();
        }
        all.extend_from_slice(args);
        let mut d = Daemon::spawn(
            cgroup,
            self.dir.clone(),
            Paths {
                config_path: self.config_path.clone(),
                admin_socket: self.admin_socket.clone(),
                metrics_addr: self.metrics_addr,
                pin_dir: self.pin_dir.clone(),
                state_file: self.state_file.clone(),
            },
            &format!("take-over-{n}"),
            &all,
            env,
        )?;
        d.owns_state = false;
        Ok(d)
    }

    /// The pinned state (uninstalled when its owner drops) now belongs to `other` (a daemon
    /// that took the node over from this one).
    pub fn hand_state_to(&mut self, other: &mut Daemon) {
        other.owns_state = self.owns_state;
        self.owns_state = false;
    }

    fn spawn(
        cgroup: &Path,
        dir: std::sync::Arc<TempDir>,
        p: Paths,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let bin = sockmesh_bin();
        let Paths {
            config_path,
            admin_socket,
            metrics_addr,
            pin_dir,
            state_file,
        } = p;
        let log_path = dir.join(format!("{name}.log"));
        let probe_socket = dir.join(format!("{name}.probe.sock"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-file")
            .arg(&state_file)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .arg("--probe-socket")
            .arg(&probe_socket)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = spawn_in_with(cgroup, None, cmd, libc::SIGTERM)?.with_term_grace(STOP_GRACE);
        Ok(Daemon {
            bin,
            admin_socket,
            metrics_addr,
            log_path,
            config_path,
            pin_dir,
            state_file,
            owns_state: true,
            child: Some(child),
            successor: None,
            probe_socket,
            dir,
        })
    }

    /// `GET /<what>` (`ready`, `healthz`) on this process's own probe socket: the status code
    /// and the body.
    pub fn probe(&self, what: &str) -> Result<(u16, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.probe_socket)
            .with_context(|| format!("connect {}", self.probe_socket.display()))?;
        s.set_read_timeout(Some(CLI_TIMEOUT))?;
        s.set_write_timeout(Some(CLI_TIMEOUT))?;
        write!(s, "GET /{what} HTTP/1.0\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("probe answered {resp:?}"))?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        Ok((code, body.trim().to_owned()))
    }

    /// Whether this guard's process still runs (not exited, not a zombie).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) if self.successor.is_none() => matches!(c.try_wait(), Ok(None)),
            _ => false,
        }
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The bpffs directory holding this daemon's pinned links and maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Give this daemon's pinned state to a successor ([`Daemon::start_with_state`]): dropping
    /// this guard will no longer uninstall it. The state file is copied out of this guard's
    /// temp dir, which goes away with it.
    pub fn hand_over_state(&mut self) -> Result<(PathBuf, PathBuf)> {
        self.owns_state = false;
        let keep = std::env::temp_dir().join(format!(
            "sockmesh-test-state-{}-{}.json",
            std::process::id(),
            crate::util::unique()
        ));
        if self.state_file.exists() {
            std::fs::copy(&self.state_file, &keep)?;
        }
        Ok((self.pin_dir.clone(), keep))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn probe_socket(&self) -> &Path {
        &self.probe_socket
    }

    /// The daemon's pid (0 once stopped).
    pub fn pid(&self) -> u32 {
        if let Some(p) = self.successor {
            return p;
        }
        self.child.as_ref().map(|c| c.pid()).unwrap_or(0)
    }

    /// `sockmesh upgrade --binary <binary>`, whatever its exit status (bounded).
    pub fn upgrade_raw(&self, binary: &Path) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("upgrade")
            .arg("--binary")
            .arg(binary)
            .arg("--admin-socket")
            .arg(&self.admin_socket);
        run_host(cmd, UPGRADE_TIMEOUT)
    }

    /// A successful `sockmesh upgrade --binary <binary>`: waits (up to `drain` plus
    /// [`STOP_GRACE`]) until the previous generation exited, then follows the new one
    /// (`pid`, `status`, `stop` and drop act on it). Returns the previous generation's pid.
    pub fn upgrade(&mut self, binary: &Path, drain: Duration) -> Result<u32> {
        // Orphans of our daemons (the new generation, once the old one exits) become ours.
        // SAFETY: plain prctl on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let old = self.pid();
        let out = self.upgrade_raw(binary)?;
        if !out.status.success() {
            bail!(
                "`sockmesh upgrade` failed ({}): {}{}",
                status_text(out.status),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        // The new generation answers status (a request accepted by the old one just before it
        // stopped serving admin would still be answered by it).
        let new = eventually(Duration::from_secs(5), || {
            let st = self.status()?;
            let pid = st["upgrade"]["pid"]
                .as_u64()
                .ok_or_else(|| anyhow!("status names no pid: {}", st["upgrade"]))?
                as u32;
            if pid == old {
                bail!("status still answered by the previous generation (pid {old})");
            }
            Ok(pid)
        })?;
        let deadline = std::time::Instant::now() + drain + STOP_GRACE;
        match self.child.as_mut() {
            Some(c) if self.successor.is_none() => {
                if c.wait_timeout(deadline.saturating_duration_since(std::time::Instant::now()))?
                    .is_none()
                {
                    bail!("the previous generation (pid {old}) did not exit after the upgrade");
                }
                self.child = None;
            }
            _ => {
                if !wait_pid_exit(old, deadline) {
                    bail!("the previous generation (pid {old}) did not exit after the upgrade");
                }
            }
        }
        self.successor = Some(new);
        Ok(old)
    }

    /// The upgrade rendezvous sockets next to the state file (`<stem>.upgrade.<gen>.sock`).
    pub fn rendezvous_sockets(&self) -> Vec<PathBuf> {
        let stem = self
            .state_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = format!("{stem}.upgrade.");
        let dir = self.state_file.parent().unwrap_or(Path::new("/"));
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Everything the daemon wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Panics (with the log) if any generation of this daemon panicked.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "a generation panicked:\n{log}");
    }

    fn print_log(&self, why: &str) {
        eprintln!("==================== sockmesh log ({why}) ====================");
        eprintln!("{}", self.log());
        eprintln!("==================== end of sockmesh log ====================");
    }

    /// Runs `sockmesh <args> --admin-socket <ours>` with a time-out and returns its output,
    /// whatever the exit status.
    pub fn cli_raw(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--admin-socket").arg(&self.admin_socket);
        run_host(cmd, CLI_TIMEOUT)
    }

    /// Like [`Daemon::cli_raw`] but fails unless the command exits 0.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = self.cli_raw(args)?;
        if !out.status.success() {
            bail!(
                "`sockmesh {}` failed ({}): {}{}",
                args.join(" "),
                status_text(out.status),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(out)
    }

    /// `sockmesh status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.cli(&["status", "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`sockmesh status --json` printed invalid JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `sockmesh status` (human form).
    pub fn status_text(&self) -> Result<String> {
        let out = self.cli(&["status"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `counters.<name>` from `status` (missing counts as an error, so typos show).
    pub fn counter(&self, name: &str) -> Result<u64> {
        let st = self.status()?;
        st["counters"][name]
            .as_u64()
            .ok_or_else(|| anyhow!("status has no counters.{name}: {}", st["counters"]))
    }

    /// `sockmesh enroll` for `pod`.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        self.enroll_with(pod, false)
    }

    /// `sockmesh enroll`, with `--external-proxy` when asked.
    pub fn enroll_with(&self, pod: &Pod, external_proxy: bool) -> Result<()> {
        let netns = pod.netns.to_string_lossy();
        let cgroup = pod.cgroup.to_string_lossy();
        let mut args = vec![
            "enroll", "--name", &pod.name, "--netns", &netns, "--cgroup", &cgroup,
        ];
        if external_proxy {
            args.push("--external-proxy");
        }
        self.cli(&args).map(drop)
    }

    /// `sockmesh enroll` for `pod` with extra flags (e.g. `--propagate`).
    pub fn enroll_args(&self, pod: &Pod, extra: &[&str]) -> Result<()> {
        let netns = pod.netns.to_string_lossy();
        let cgroup = pod.cgroup.to_string_lossy();
        let mut args = vec![
            "enroll", "--name", &pod.name, "--netns", &netns, "--cgroup", &cgroup,
        ];
        args.extend_from_slice(extra);
        self.cli(&args).map(drop)
    }

    /// One request on the admin socket (JSON lines), without spawning the CLI: for requests a
    /// test makes by the hundred. Fails unless the daemon answers `ok`; returns its `status`.
    pub fn admin(&self, request: &Value) -> Result<Value> {
        use std::io::{BufRead, BufReader};
        let s = std::os::unix::net::UnixStream::connect(&self.admin_socket)
            .with_context(|| format!("connect {}", self.admin_socket.display()))?;
        s.set_read_timeout(Some(CLI_TIMEOUT))?;
        s.set_write_timeout(Some(CLI_TIMEOUT))?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        (&s).write_all(&line)?;
        let mut resp = String::new();
        BufReader::new(&s).read_line(&mut resp)?;
        let v: Value =
            serde_json::from_str(&resp).with_context(|| format!("admin answered {resp:?} to {request}"))?;
        if v["ok"].as_bool() != Some(true) {
            bail!("admin request {request} refused: {}", v["error"]);
        }
        Ok(v["status"].clone())
    }

    /// `sockmesh unenroll --name <name>`.
    pub fn unenroll(&self, name: &str) -> Result<()> {
        self.cli(&["unenroll", "--name", name]).map(drop)
    }

    /// `GET /metrics` from the metrics address; returns the body.
    pub fn metrics(&self) -> Result<String> {
        http_get(self.metrics_addr, "/metrics")
    }

    /// SIGKILLs the daemon (a crash: no clean-up runs) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(pid) = self.successor.take() {
            // SAFETY: plain syscall; the pid is ours to wait for (subreaper) once it dies.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            if !wait_pid_exit(pid, std::time::Instant::now() + STOP_GRACE) {
                bail!("daemon pid {pid} survived SIGKILL");
            }
            return Ok(());
        }
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("daemon already stopped"))?;
        child.signal(libc::SIGKILL)?;
        match child.wait_timeout(STOP_GRACE)? {
            Some(_) => Ok(()),
            None => bail!("daemon pid {} survived SIGKILL", child.pid()),
        }
    }

    /// Follow generation `pid` from now on (after [`Daemon::kill`] of the generation this guard
    /// followed, when its successor carries on): `pid`, `status`, `stop` and drop act on it.
    /// The caller must have made this process a child subreaper (see [`Daemon::upgrade`]) so
    /// that the orphaned successor can be reaped.
    pub fn follow(&mut self, pid: u32) {
        self.successor = Some(pid);
    }

    /// Waits (bounded) until the generation this guard follows exits by itself (e.g. a
    /// generation that handed over and drained); its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = std::time::Instant::now() + timeout;
        if let Some(pid) = self.successor {
            let st = wait_pid_status(pid, deadline);
            if st.is_some() {
                self.successor = None;
            }
            return Ok(st);
        }
        match self.child.as_mut() {
            Some(c) => c.wait_timeout(timeout),
            None => bail!("daemon already stopped"),
        }
    }

    /// `sockmesh stop --keep-state`: waits until the daemon no longer answers, then hands its
    /// pinned state over for [`Daemon::start_with_state`].
    pub fn stop_keep_state(&mut self) -> Result<(PathBuf, PathBuf)> {
        let out = self.cli(&["stop", "--keep-state"])?;
        if !out.status.success() {
            bail!("sockmesh stop --keep-state: {}", status_text(out.status));
        }
        eventually(Duration::from_secs(15), || {
            anyhow::ensure!(self.status().is_err(), "daemon still answers");
            Ok(())
        })?;
        self.hand_over_state()
    }

    /// Stops the daemon now (SIGTERM, up to [`STOP_GRACE`], then SIGKILL) and returns how it
    /// exited. The log is printed when it did not exit 0.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(pid) = self.successor.take() {
            // SAFETY: plain syscalls on the generation we follow.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let mut st = wait_pid_status(pid, std::time::Instant::now() + STOP_GRACE);
            if st.is_none() {
                eprintln!("warning: sockmesh pid {pid} ignored SIGTERM; sending SIGKILL");
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                st = wait_pid_status(pid, std::time::Instant::now() + STOP_GRACE);
            }
            if !matches!(st, Some(s) if s.success()) {
                self.print_log(&format!("upgraded daemon (pid {pid}) exited with {st:?}"));
            }
            return st;
        }
        let mut child = self.child.take()?;
        let st = child.stop();
        if !matches!(st, Some(s) if s.success()) {
            self.print_log(&format!(
                "daemon exited with {}",
                st.map(status_text).unwrap_or_else(|| "unknown status".into())
            ));
        }
        st
    }
}

/// Where a daemon's files are.
struct Paths {
    config_path: PathBuf,
    admin_socket: PathBuf,
    metrics_addr: SocketAddr,
    pin_dir: PathBuf,
    state_file: PathBuf,
}

/// How long `sockmesh upgrade` may take (the new generation adopts the kernel state and runs
/// the acceleration self-test before it takes over).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(150);

/// Waits until `pid` (our child, or an orphan we reap as subreaper) exited; its status if we
/// reaped it.
fn wait_pid_status(pid: u32, deadline: std::time::Instant) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on one pid.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r == pid as i32 {
            return Some(ExitStatus::from_raw(status));
        }
        if r < 0 {
            // Not (yet) our child: gone, or a zombie somebody else must reap.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            if stat.is_empty() || state == Some('Z') {
                return Some(ExitStatus::from_raw(0));
            }
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_pid_exit(pid: u32, deadline: std::time::Instant) -> bool {
    wait_pid_status(pid, deadline).is_some()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let st = self.stop();
            if panicking && matches!(st, Some(s) if s.success()) {
                self.print_log("test failed");
            }
            // Whatever happened to the daemon (even kill -9), leave no pinned link or map.
            if !self.owns_state {
                return;
            }
            let mut cmd = Command::new(&self.bin);
            cmd.arg("uninstall")
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .arg("--state-file")
                .arg(&self.state_file)
                .arg("--admin-socket")
                .arg(&self.admin_socket);
            match run_host(cmd, CLI_TIMEOUT) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "warning: `sockmesh uninstall --pin-dir {}` failed ({}): {}",
                    self.pin_dir.display(),
                    status_text(out.status),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("warning: sockmesh uninstall: {e:#}"),
            }
            if self.pin_dir.exists() {
                eprintln!(
                    "warning: pinned state {} survived `sockmesh uninstall`",
                    self.pin_dir.display()
                );
            }
        }));
    }
}

/// A minimal HTTP/1.0 GET over a std `TcpStream`, bounded by 10 s.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("read response from {addr}{path}"))?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}{path}: {resp:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        bail!("GET {addr}{path}: {status_line}");
    }
    Ok(body.to_owned())
}

/// The value of the first Prometheus sample `name{labels}` whose label set contains every pair in
/// `labels` (order-independent).
pub fn prom_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value_part) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let ok = labels.iter().all(|(k, v)| {
            label_part
                .split(',')
                .any(|pair| pair.trim() == format!("{k}=\"{v}\""))
        });
        if ok {
            if let Some(v) = value_part.split_whitespace().next() {
                if let Ok(v) = v.parse() {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// A config for `node`: `cgroup_root` plus `extra` TOML appended verbatim.
pub fn basic_config(node: &VirtualNode, extra: &str) -> String {
    format!(
        "cgroup_root = {}\n{extra}",
        toml_str(&node.cgroup_root().to_string_lossy())
    )
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// `[[pods]]` entries for `pods`.
pub fn pods_toml(pods: &[&Pod]) -> String {
    pods.iter().map(|p| pod_toml(p, "")).collect()
}

/// One `[[pods]]` entry for `pod`, with `extra` settings (TOML lines) appended.
pub fn pod_toml(pod: &Pod, extra: &str) -> String {
    let mut s = format!(
        "\n[[pods]]\nname = {}\nnetns = {}\ncgroup = {}\n",
        toml_str(&pod.name),
        toml_str(&pod.netns.to_string_lossy()),
        toml_str(&pod.cgroup.to_string_lossy())
    );
    if !extra.is_empty() {
        s.push_str(extra);
        if !extra.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prom_values_are_found_by_labels() {
        let text = "# HELP x\n\
sockmesh_connections_total{pod=\"frontend\"} 3\n\
sockmesh_bytes_total{direction=\"upstream\",pod=\"frontend\"} 120\n\
sockmesh_kernel_events_total{reason=\"connect_captured\"} 7\n\
sockmesh_up 1\n";
        assert_eq!(
            prom_value(text, "sockmesh_connections_total", &[("pod", "frontend")]),
            Some(3.0)
        );
        assert_eq!(
            prom_value(
                text,
                "sockmesh_bytes_total",
                &[("pod", "frontend"), ("direction", "upstream")]
            ),
            Some(120.0)
        );
        assert_eq!(
            prom_value(text, "sockmesh_connections_total", &[("pod", "x")]),
            None
        );
        assert_eq!(prom_value(text, "sockmesh_up", &[]), Some(1.0));
        assert_eq!(prom_value(text, "sockmesh_kernel_events", &[]), None);
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
