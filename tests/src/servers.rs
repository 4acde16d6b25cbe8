//! [`Server`]: a long-running test server (the `peer` binary or a python peer) inside a pod, with
//! its stdout in a file so a test can read what it saw (`listening ...`, `accepted peer=...`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::node::Pod;
use crate::process::{describe, spawn_in, status_text, GuardedChild};
use crate::util::{eventually, peer_command, peers_dir, python, TempDir};

/// How long a server gets to print `listening`.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Server {
    child: GuardedChild,
    what: String,
    dir: TempDir,
}

impl Server {
    /// `peer serve --listen <pod ip>:<port> --mode <mode>` inside `pod`.
    pub fn peer(pod: &Pod, port: u16, mode: &str) -> Result<Server> {
        let mut cmd = peer_command();
        cmd.args(["serve", "--listen", &pod.addr(port), "--mode", mode]);
        Server::start(&pod.cgroup, Some(&pod.netns), cmd)
    }

    /// `tests/peers/http_server.py --bind 0.0.0.0 --port <port>` inside `pod`.
    pub fn http(pod: &Pod, port: u16) -> Result<Server> {
        let mut cmd = Command::new(python());
        cmd.arg("-u").arg(peers_dir().join("http_server.py")).args([
            "--bind",
            "0.0.0.0",
            "--port",
            &port.to_string(),
        ]);
        Server::start(&pod.cgroup, Some(&pod.netns), cmd)
    }

    /// Starts `cmd` in `cgroup`/`netns` with stdout and stderr in a log file and waits (bounded)
    /// until it prints a line starting with `listening`.
    pub fn start(cgroup: &Path, netns: Option<&Path>, mut cmd: Command) -> Result<Server> {
        let dir = TempDir::new("server")?;
        let out = std::fs::File::create(dir.join("stdout"))?;
        let err = std::fs::File::create(dir.join("stderr"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let what = describe(&cmd);
        let child = spawn_in(cgroup, netns, cmd)?;
        let mut server = Server { child, what, dir };
        let ready = eventually(LISTEN_TIMEOUT, || {
            if let Some(s) = server.child.try_wait()? {
                return Ok(Err(anyhow::anyhow!(
                    "exited before listening ({})",
                    status_text(s)
                )));
            }
            if server.stdout().lines().any(|l| l.starts_with("listening")) {
                Ok(Ok(()))
            } else {
                bail!("not listening yet")
            }
        });
        match ready.and_then(|r| r) {
            Ok(()) => Ok(server),
            Err(e) => Err(e.context(format!(
                "server `{}` did not start; stderr:\n{}",
                server.what,
                server.stderr()
            ))),
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The `accepted ...` lines so far (one per accepted connection / request).
    pub fn accepted(&self) -> Vec<String> {
        self.stdout()
            .lines()
            .filter(|l| l.starts_with("accepted"))
            .map(str::to_owned)
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Fails if the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(s) = self.child.try_wait().context("wait")? {
            bail!(
                "server `{}` exited ({}); stderr:\n{}",
                self.what,
                status_text(s),
                self.stderr()
            );
        }
        Ok(())
    }
}
