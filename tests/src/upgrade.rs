//! The shared set-up of the upgrade suites (`tests/tests/upgrade.rs`, `upgrade_faults.rs`): a
//! client pod and a server pod behind an HTTP/1.1 and a gRPC service, the constant-rate
//! keep-alive load client, the successors that fail, and the readings both suites take
//! (per-pod counters, pinned links, p99 per window).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::daemon::basic_config;
use crate::util::{peers_dir, python, TempDir};
use crate::{Daemon, LineChild, Pod, Server, VirtualNode};

pub const VIP: &str = "10.96.0.10";
pub const PORT: u16 = 8080;
pub const GRPC_PORT: u16 = 50051;
/// The draining generation's deadline (config `drain_timeout_secs`).
pub const DRAIN: Duration = Duration::from_secs(5);

/// The client pod (enrolled), the server pod, and a policy that makes `VIP:PORT` an HTTP
/// service, so the proxy speaks HTTP/1.1 to the client (keep-alive) rather than relaying bytes.
pub fn setup() -> (VirtualNode, Server, Daemon) {
    setup_with(&[])
}

/// [`setup`], the daemon started with extra `run` arguments (e.g. `--take-over`).
pub fn setup_with(args: &[&str]) -> (VirtualNode, Server, Daemon) {
    let node = VirtualNode::new(&["client", "srv"]).expect("virtual node");
    let srv = node.pod("srv");
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(peers_dir().join("upgrade_load.py"))
        .args(["serve", "--port", &PORT.to_string()]);
    let server = Server::start(&srv.cgroup, Some(&srv.netns), cmd).expect("echo server");
    let policy = format!(
        "drain_timeout_secs = {}\n{}{}",
        DRAIN.as_secs(),
        service_toml("echo", "http1", PORT, &srv.addr(PORT), 5000),
        service_toml("who", "grpc", GRPC_PORT, &srv.addr(GRPC_PORT), 5000),
    );
    let d = Daemon::start_with_args(node.daemon_cgroup(), &basic_config(&node, &policy), None, args)
        .expect("daemon start");
    d.enroll(node.pod("client")).expect("enroll client");
    (node, server, d)
}

/// A service at `VIP:port` speaking `protocol` with one endpoint `ep` (subset `v1`) and one
/// route to it, timing out after `timeout_ms`.
pub fn service_toml(name: &str, protocol: &str, port: u16, ep: &str, timeout_ms: u64) -> String {
    format!(
        r#"
[[services]]
name = "{name}"
addresses = ["{VIP}:{port}"]
protocol = "{protocol}"
timeout_ms = {timeout_ms}
endpoints = [{{ address = "{ep}", labels = {{ version = "v1" }} }}]
subsets = [{{ name = "v1", labels = {{ version = "v1" }} }}]

[[services.routes]]
name = "default"
split = [{{ subset = "v1", weight = 100 }}]
"#
    )
}

/// Constant-rate keep-alive load from the client pod until `stop` exists (bounded by
/// `max`); `finish` returns its summary.
pub struct Load {
    child: LineChild,
    stop: PathBuf,
    max: Duration,
    _dir: TempDir,
}

impl Load {
    pub fn start(client: &Pod, conns: u32, rate: u32, max: Duration) -> Load {
        Load::start_sampled(client, conns, rate, max, None)
    }

    /// [`Load::start`], writing every request's due time, latency and outcome to `samples`
    /// (`upgrade_load.py --samples`) when it finishes.
    pub fn start_sampled(client: &Pod, conns: u32, rate: u32, max: Duration, samples: Option<&Path>) -> Load {
        let dir = TempDir::new("load").expect("temp dir");
        let stop = dir.join("stop");
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg(peers_dir().join("upgrade_load.py"))
            .args(["load", "--url", &format!("{VIP}:{PORT}")])
            .args(["--conns", &conns.to_string(), "--rate", &rate.to_string()])
            .args(["--duration", &max.as_secs().to_string(), "--timeout", "1"])
            .arg("--stop-file")
            .arg(&stop);
        if let Some(p) = samples {
            cmd.arg("--samples").arg(p);
        }
        let child = LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("load client");
        Load {
            child,
            stop,
            max,
            _dir: dir,
        }
    }

    pub fn finish(mut self) -> Value {
        std::fs::write(&self.stop, "").expect("stop file");
        let line = self
            .child
            .recv_line(self.max + Duration::from_secs(30))
            .expect("load summary");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("load printed {line:?}: {e}"))
    }
}

/// A per-pod counter of the client pod from `status` (e.g. `connections_total`).
pub fn client_counter(d: &Daemon, name: &str) -> u64 {
    let st = d.status().expect("status");
    st["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "client")
        .and_then(|p| p[name].as_u64())
        .unwrap_or_else(|| panic!("no client pod {name} in status: {}", st["pods"]))
}

/// Pinned links under the daemon's pin dir (names).
pub fn pinned_links(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.pin_dir().join("links"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The worst per-second p99 of the load summary's seconds in `from..=to` (unix seconds), and
/// how many requests those seconds hold.
pub fn p99_in(load: &Value, from: u64, to: u64) -> (f64, u64) {
    let mut worst = 0.0f64;
    let mut n = 0;
    for s in load["seconds"].as_array().into_iter().flatten() {
        let t = s["t"].as_u64().unwrap_or(0);
        if t >= from && t <= to {
            worst = worst.max(s["p99_ms"].as_f64().unwrap_or(0.0));
            n += s["n"].as_u64().unwrap_or(0);
        }
    }
    (worst, n)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An executable wrapper script in `dir` named `name` running `body` (`"$@"` are the daemon's
/// arguments, `run ... --upgrade`): a successor for `sockmesh upgrade --binary`.
pub fn successor_script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write successor script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A wrapper script that runs `upgrade_fake.py --mode <mode>` with the daemon's arguments.
pub fn fake_successor(dir: &TempDir, mode: &str) -> PathBuf {
    successor_script(
        dir,
        &format!("fake-{mode}"),
        &format!(
            "exec {} {} --mode {mode} \"$@\"",
            python().display(),
            peers_dir().join("upgrade_fake.py").display()
        ),
    )
}

/// `sockmesh upgrade --binary <binary>` that must fail with `expect` in its error; the error.
pub fn failed_upgrade(d: &Daemon, binary: &Path, expect: &str) -> String {
    let out = d.upgrade_raw(binary).expect("sockmesh upgrade");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "upgrade with {} succeeded",
        binary.display()
    );
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    err
}

pub use crate::tools::grpc_python;

/// The gRPC test server (`grpc_peer.py serve`) in the server pod on [`GRPC_PORT`].
pub fn grpc_server(srv: &Pod) -> Server {
    let mut cmd = Command::new(grpc_python());
    cmd.arg("-u").arg(peers_dir().join("grpc_peer.py")).args([
        "serve",
        "--name",
        "v1",
        "--port",
        &GRPC_PORT.to_string(),
    ]);
    Server::start(&srv.cgroup, Some(&srv.netns), cmd).expect("grpc server")
}

/// A real successor (`$SOCKMESH_BIN`) that stops at one step of the hand-off until released,
/// so that a test can `kill -9` either generation there: `SOCKMESH_TEST_UPGRADE_PAUSE`
/// (test-only, see mesh-userspace/src/upgrade/new.rs) with `point` = `offer` (descriptors
/// taken, kernel state not yet adopted), `commit` (`Ready` said, `Commit` read, not accepting
/// yet), `started` (`Started` said) or `conn` (the first moved HTTP/1.1 connection adopted).
/// Dropping it releases the successor (if it still waits).
pub struct PausedSuccessor {
    dir: TempDir,
    point: String,
    binary: PathBuf,
}

impl PausedSuccessor {
    pub fn new(point: &str) -> PausedSuccessor {
        PausedSuccessor::with_env(point, "")
    }

    /// [`PausedSuccessor::new`] with more environment for the successor (`VAR=value ...`).
    pub fn with_env(point: &str, env: &str) -> PausedSuccessor {
        let dir = TempDir::new("paused").expect("temp dir");
        let binary = successor_script(
            &dir,
            &format!("paused-{point}"),
            &format!(
                "{env} SOCKMESH_TEST_UPGRADE_PAUSE={point}:{} exec {} \"$@\"",
                dir.path().display(),
                crate::util::sockmesh_bin().display()
            ),
        );
        PausedSuccessor {
            dir,
            point: point.to_owned(),
            binary,
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Waits until the successor reached its pause point; its pid.
    pub fn wait(&self, timeout: Duration) -> u32 {
        let f = self.dir.join(&self.point);
        crate::util::eventually(timeout, || {
            let text = std::fs::read_to_string(&f)?;
            Ok(text.trim().parse::<u32>()?)
        })
        .unwrap_or_else(|e| panic!("the successor never reached `{}`: {e:#}", self.point))
    }

    /// Lets the successor go on.
    pub fn release(&self) {
        let _ = std::fs::write(self.dir.join(format!("{}.go", self.point)), "");
    }
}

impl Drop for PausedSuccessor {
    fn drop(&mut self) {
        self.release();
    }
}

/// A successor that announces hand-off protocol `version` in its `Hello` (the real binary,
/// `SOCKMESH_TEST_HANDOFF_PROTOCOL`, test-only).
pub fn other_protocol_successor(dir: &TempDir, version: u32) -> PathBuf {
    successor_script(
        dir,
        &format!("protocol-{version}"),
        &format!(
            "SOCKMESH_TEST_HANDOFF_PROTOCOL={version} exec {} \"$@\"",
            crate::util::sockmesh_bin().display()
        ),
    )
}

/// `sockmesh upgrade --binary <binary>` against `d` in a thread (it blocks until the hand-off's
/// outcome): join it for the output.
pub fn spawn_upgrade(
    d: &Daemon,
    binary: &Path,
) -> std::thread::JoinHandle<anyhow::Result<std::process::Output>> {
    // Orphans of our daemons (a successor whose parent was killed) become ours to reap.
    // SAFETY: plain prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut cmd = Command::new(crate::util::sockmesh_bin());
    cmd.arg("upgrade")
        .arg("--binary")
        .arg(binary)
        .arg("--admin-socket")
        .arg(d.admin_socket());
    std::thread::spawn(move || crate::run_host(cmd, crate::daemon::UPGRADE_TIMEOUT))
}

/// `kill -9` of `pid` (a generation); waits (bounded) until it is gone or a zombie, reaping it
/// when it is ours.
pub fn kill9(pid: u32) {
    // SAFETY: plain syscalls on a pid the test started (directly or through the daemon).
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
    let gone = crate::util::eventually(Duration::from_secs(10), || {
        let mut status = 0;
        // SAFETY: plain waitpid on one pid.
        unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
        anyhow::ensure!(stat.is_empty() || state == Some('Z'), "pid {pid} still runs");
        Ok(())
    });
    gone.unwrap_or_else(|e| panic!("{e:#}"));
}

/// Whether `pid` runs (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
    !stat.is_empty() && state != Some('Z')
}

/// A daemon restarted on `d`'s pinned state with `d`'s config (what an operator does after the
/// daemon died): `d` no longer owns the state.
pub fn restart(node: &VirtualNode, d: &mut Daemon) -> Daemon {
    let cfg = std::fs::read_to_string(d.config_path()).expect("config");
    let state = d.hand_over_state().expect("hand over state");
    Daemon::start_with_state(node.daemon_cgroup(), &cfg, Some(state)).expect("restarted daemon")
}

/// `count` GETs from the client pod to `url`, each on a new connection (1 s time-out):
/// `{"ok","failed","errors"}`.
pub fn gets(client: &Pod, url: &str, count: u32) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(peers_dir().join("upgrade_load.py")).args([
        "get",
        "--url",
        url,
        "--count",
        &count.to_string(),
    ]);
    let out = crate::exec_in(&client.cgroup, Some(&client.netns), cmd, Duration::from_secs(60)).expect("get");
    crate::last_json("upgrade_load.py get", &out)
}

/// One client of `upgrade_load.py <mode> --url VIP:PORT <args>` in the client pod, printing
/// lines.
pub fn load_client(client: &Pod, mode: &str, args: &[&str]) -> LineChild {
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(peers_dir().join("upgrade_load.py"))
        .args([mode, "--url", &format!("{VIP}:{PORT}")])
        .args(args);
    LineChild::spawn(&client.cgroup, Some(&client.netns), cmd).expect("client")
}

/// The daemon's `sockmesh_upstream_http_connects_total`: (for requests, pre-connected ahead of
/// traffic), since its generation started.
pub fn upstream_connects(d: &Daemon) -> anyhow::Result<(u64, u64)> {
    let text = d.metrics()?;
    let get = |kind: &str| {
        crate::daemon::prom_value(&text, "sockmesh_upstream_http_connects_total", &[("kind", kind)])
            .map(|v| v as u64)
            .ok_or_else(|| {
                anyhow::anyhow!("no sockmesh_upstream_http_connects_total{{kind={kind:?}}} in /metrics")
            })
    };
    Ok((get("request")?, get("preconnect")?))
}
