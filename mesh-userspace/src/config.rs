//! The node config file (TOML). Parsing and validation are pure functions; the checks that touch
//! the filesystem (paths exist, cgroups sit under the attach root) are separate so tests can
//! call both. Every error names the field it is about.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sockmesh/admin.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15020";
pub const DEFAULT_DRAIN_SECS: u64 = 5;
/// Where links and maps are pinned (on bpffs), so capture outlives a daemon restart.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sockmesh";
/// Enrolment state (pod names and paths) a restarted daemon re-adopts.
pub const DEFAULT_STATE_FILE: &str = "/run/sockmesh/state.json";
/// Most pods a node config may list (the kernel map holds `mesh_common::maps::PODS_MAX`).
pub const MAX_PODS: usize = mesh_common::maps::PODS_MAX as usize;

/// The embedded default policy: what `sockmesh default-config` prints and what the demo runs.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `pods[1].netns`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cgroup_root: Option<PathBuf>,
    outbound_port: Option<u16>,
    admin_socket: Option<PathBuf>,
    metrics_addr: Option<String>,
    daemon_mark: Option<u32>,
    drain_timeout_secs: Option<u64>,
    bpf_log: Option<bool>,
    propagation: Option<bool>,
    pin_dir: Option<PathBuf>,
    state_file: Option<PathBuf>,
    #[serde(default)]
    acceleration: RawAccel,
    #[serde(default)]
    bypass: RawBypass,
    #[serde(default)]
    pods: Vec<RawPod>,
    detect_timeout_ms: Option<u64>,
    workers: Option<u32>,
    pin_workers: Option<bool>,
    reuseport_listeners: Option<bool>,
    #[serde(default)]
    services: Vec<crate::routing::policy::RawService>,
    #[serde(default)]
    colours: Vec<crate::routing::colour::RawColour>,
    #[serde(default)]
    ingress: Vec<crate::routing::colour::RawIngress>,
    #[serde(default)]
    trusted_sources: Vec<String>,
    #[serde(default)]
    links: Vec<crate::routing::link::RawLink>,
    kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    limits: RawLimits,
}

/// `[limits]`: what one client connection or one pod may hold of the proxy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    request_head_timeout_ms: Option<u64>,
    max_request_head_bytes: Option<u64>,
    client_idle_timeout_secs: Option<u64>,
    upstream_body_idle_timeout_secs: Option<u64>,
    max_connections_per_pod: Option<u64>,
}

/// `[limits]`, validated (see [`parse_limits`] for the ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// An HTTP/1.1 request head must be complete this long after its first byte (else 408 and
    /// the connection is closed); an HTTP/2 client must send its preface this long after the
    /// connection is accepted; an HTTP/2, Bolt or Dubbo frame (an HTTP/2 header block) must be
    /// complete this long after the read that brought its first byte. Counted as
    /// `header_timeout` / `preface_timeout` / `frame_timeout`.
    pub request_head_timeout: std::time::Duration,
    /// Largest HTTP/1.1 request head (431 and closed beyond, `header_too_large`).
    pub max_request_head_bytes: usize,
    /// An HTTP app connection with no request in flight for this long is closed gracefully.
    pub client_idle_timeout: std::time::Duration,
    /// An HTTP/1.1 upstream that sends nothing for this long within a response body (its head
    /// already passed on) is given up: its connection and the app's are closed, counted as
    /// `upstream_body_timeout`.
    pub upstream_body_idle_timeout: std::time::Duration,
    /// Concurrent proxied connections one pod may hold (its outbound ones, and the inbound ones
    /// to it); beyond, new ones are reset and counted as `pod_connection_limit`. `None`: a quarter
    /// of the daemon's open-files limit (each connection holds two descriptors, so one pod can
    /// never take more than half of them). `Some(0)`: no cap.
    pub max_connections_per_pod: Option<u64>,
}

pub const DEFAULT_REQUEST_HEAD_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: u64 = 64 * 1024;
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_UPSTREAM_BODY_IDLE_TIMEOUT_SECS: u64 = 300;

impl Default for Limits {
    fn default() -> Self {
        parse_limits(RawLimits::default()).expect("the defaults are valid")
    }
}

impl Limits {
    /// The per-pod connection cap in force (0: none), given the open-files soft limit.
    pub fn pod_connection_cap(&self, nofile_limit: u64) -> u64 {
        self.max_connections_per_pod.unwrap_or(nofile_limit / 4)
    }
}

fn parse_limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    let head_ms = raw
        .request_head_timeout_ms
        .unwrap_or(DEFAULT_REQUEST_HEAD_TIMEOUT_MS);
    if !(100..=3_600_000).contains(&head_ms) {
        return Err(err("limits.request_head_timeout_ms", "must be 100 to 3600000"));
    }
    let head_bytes = raw
        .max_request_head_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEAD_BYTES);
    // hyper's read buffer cannot be smaller than 8 KiB.
    if !(8192..=1 << 20).contains(&head_bytes) {
        return Err(err("limits.max_request_head_bytes", "must be 8192 to 1048576"));
    }
    let idle = raw
        .client_idle_timeout_secs
        .unwrap_or(DEFAULT_CLIENT_IDLE_TIMEOUT_SECS);
    if !(1..=86_400).contains(&idle) {
        return Err(err("limits.client_idle_timeout_secs", "must be 1 to 86400"));
    }
    let body_idle = raw
        .upstream_body_idle_timeout_secs
        .unwrap_or(DEFAULT_UPSTREAM_BODY_IDLE_TIMEOUT_SECS);
    if !(1..=86_400).contains(&body_idle) {
        return Err(err(
            "limits.upstream_body_idle_timeout_secs",
            "must be 1 to 86400",
        ));
    }
    Ok(Limits {
        request_head_timeout: std::time::Duration::from_millis(head_ms),
        max_request_head_bytes: head_bytes as usize,
        client_idle_timeout: std::time::Duration::from_secs(idle),
        upstream_body_idle_timeout: std::time::Duration::from_secs(body_idle),
        max_connections_per_pod: raw.max_connections_per_pod,
    })
}

/// `[kubernetes]`: CRI discovery and DaemonSet behaviour (src/k8s).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    enabled: Option<bool>,
    cri_socket: Option<PathBuf>,
    selector: Option<String>,
    resync_secs: Option<u64>,
    sigterm_keeps_state: Option<bool>,
    cni_conf_dir: Option<PathBuf>,
    cni_check_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccel {
    enabled: Option<bool>,
    max_msg_bytes: Option<u32>,
    flow_budget_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBypass {
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    ports: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    name: Option<String>,
    netns: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    #[serde(default)]
    external_proxy: bool,
    capture: Option<bool>,
    #[serde(default)]
    inbound_ports: Vec<u32>,
    #[serde(default)]
    inbound_all_ports: bool,
    #[serde(default)]
    inbound_exclude_ports: Vec<u32>,
    colour: Option<String>,
    #[serde(default)]
    propagate: bool,
    /// Dual links: link name → the pod's cgroup directories of that link's apps.
    #[serde(default)]
    links: BTreeMap<String, Vec<PathBuf>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDR/PREFIX"))?;
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let prefix: u8 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        Ok(Self { addr, prefix })
    }

    /// Is `ip` inside (IPv4-mapped IPv6 counts as IPv4)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        // IPv4 sits in the top 32 bits, so a prefix counts from the top for both families.
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        let mask = match self.prefix {
            0 => 0,
            p => u128::MAX << (128 - u32::from(p)),
        };
        bits(ip) & mask == bits(self.addr) & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// Another proxy (Envoy, MOSN) owns the outbound port in this pod: capture only.
    pub external_proxy: bool,
    /// Capture with the eBPF hooks (default). `false`: only open the listeners, for nodes where
    /// something else (iptables REDIRECT, for the benchmark) sends traffic to them.
    pub capture: bool,
    /// Ports of the pod captured inbound (`sk_lookup`); empty: no inbound capture.
    pub inbound_ports: Vec<u16>,
    /// Capture every inbound port except `inbound_exclude_ports` (and sockmesh's own).
    pub inbound_all_ports: bool,
    pub inbound_exclude_ports: Vec<u16>,
    /// The pod's traffic colour (a `[[colours]]` name): every request it sends has it.
    pub colour: Option<String>,
    /// Kernel colour propagation for the pod's threads (`POD_FLAG_PROPAGATE`).
    pub propagate: bool,
    /// Dual links: link name → cgroup directories (v1 cpu/memory or v2) of its apps here.
    pub links: BTreeMap<String, Vec<PathBuf>>,
}

/// `[acceleration] enabled`: unset means [`AccelMode::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelMode {
    /// On when every startup self-test check passes, the blocking-reader check included.
    Auto,
    /// `enabled = true`: on when the data-path checks pass, even if blocking readers are at risk
    /// on this kernel (said in the log and in status).
    On,
    /// `enabled = false`.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceleration {
    pub mode: AccelMode,
    pub max_msg_bytes: u32,
    pub flow_budget_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cgroup_root: Option<PathBuf>,
    pub outbound_port: u16,
    pub admin_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub daemon_mark: u32,
    pub drain_timeout_secs: u64,
    pub bpf_log: bool,
    /// Attach the colour propagation hooks when the kernel allows (default on).
    pub propagation: bool,
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
    pub acceleration: Acceleration,
    pub bypass_cidrs: Vec<Cidr>,
    pub bypass_ports: Vec<u16>,
    pub pods: Vec<PodSpec>,
    /// `detect_timeout_ms` and `[[services]]`: the routing policy (validated).
    pub routing: crate::routing::RawPolicy,
    /// Proxy worker threads; `None`: one per CPU.
    pub workers: Option<usize>,
    /// `pin_workers` (default true): pin worker `i` to the `i`-th allowed CPU when there are
    /// enough of them.
    pub pin_workers: bool,
    /// `reuseport_listeners` (default true): each listening address of a pod is an
    /// `SO_REUSEPORT` group of one socket per worker; false: one socket every worker accepts on.
    pub reuseport_listeners: bool,
    /// `[kubernetes]` with `enabled = true`: CRI discovery, DaemonSet behaviour.
    pub kubernetes: Option<crate::k8s::KubernetesConfig>,
    /// `[limits]`: slow and idle clients, per-pod connection cap.
    pub limits: Limits,
}

/// Most proxy worker threads (`workers`).
pub const MAX_WORKERS: u32 = 256;

/// `workers`: 1 ..= [`MAX_WORKERS`].
pub fn check_workers(n: u32) -> Result<usize, String> {
    if (1..=MAX_WORKERS).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("must be between 1 and {MAX_WORKERS}, got {n}"))
    }
}

/// A pod's colour must be one the policy defines (not `base`: that is no colour).
pub fn check_pod_colour(colour: &str, policy: &crate::routing::Policy) -> Result<(), String> {
    match policy.colours().id(colour) {
        Some(c) if c != 0 => Ok(()),
        _ => {
            let defined = policy.colours().names();
            Err(if defined.is_empty() {
                format!("unknown colour `{colour}`: the policy defines no [[colours]]")
            } else {
                format!("unknown colour `{colour}` (defined: {})", defined.join(", "))
            })
        }
    }
}

/// Most meshed inbound ports per pod.
pub const MAX_INBOUND_PORTS: usize = 64;

/// Inbound ports: real ports, not ours, no duplicates.
pub fn check_inbound_ports(ports: &[u32], outbound_port: u16) -> Result<Vec<u16>, String> {
    if ports.len() > MAX_INBOUND_PORTS {
        return Err(format!("at most {MAX_INBOUND_PORTS} ports"));
    }
    let mut out: Vec<u16> = Vec::new();
    for p in ports {
        let port = u16::try_from(*p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p} is not a port (1-65535)"))?;
        if port == outbound_port || port == mesh_common::DEFAULT_INBOUND_PORT {
            return Err(format!("{port} is one of sockmesh's own listener ports"));
        }
        if out.contains(&port) {
            return Err(format!("{port} is listed twice"));
        }
        out.push(port);
    }
    Ok(out)
}

/// Either a list of ports, or all ports minus exclusions; exclusions only make sense with all.
pub fn check_inbound_choice(all: bool, ports: &[u16], exclude: &[u16]) -> Result<(), (&'static str, String)> {
    if all && !ports.is_empty() {
        return Err((
            "inbound_ports",
            "give either inbound_ports or inbound_all_ports, not both".into(),
        ));
    }
    if !all && !exclude.is_empty() {
        return Err((
            "inbound_exclude_ports",
            "only meaningful with inbound_all_ports = true".into(),
        ));
    }
    Ok(())
}

/// `propagate` works on the pod's captured outbound connections: it needs capture.
pub fn check_propagate(propagate: bool, capture: bool) -> Result<(), String> {
    if propagate && !capture {
        return Err("needs capture (the ledger is kept on captured outbound connections)".into());
    }
    Ok(())
}

/// Validate a pod name: what `enroll` and the config accept.
pub fn check_pod_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "`{name}` may only hold letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// Parse and validate the config text (no filesystem access).
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        // toml names the key in its message; keep it, and point at the spot.
        let field = e
            .span()
            .map(|s| format!("at byte {}", s.start))
            .unwrap_or_else(|| "file".into());
        err(field, e.message().to_string())
    })?;
    let routing = crate::routing::RawPolicy {
        detect_timeout_ms: raw.detect_timeout_ms,
        services: raw.services.clone(),
        colours: raw.colours.clone(),
        ingress: raw.ingress.clone(),
        trusted_sources: raw.trusted_sources.clone(),
        links: raw.links.clone(),
    };
    let policy = crate::routing::compile(routing.clone()).map_err(|e| err(e.field, e.reason))?;
    let workers = raw
        .workers
        .map(check_workers)
        .transpose()
        .map_err(|e| err("workers", e))?;
    let kubernetes = parse_kubernetes(raw.kubernetes)?;
    let limits = parse_limits(raw.limits)?;
    let outbound_port = raw.outbound_port.unwrap_or(mesh_common::DEFAULT_OUTBOUND_PORT);
    if outbound_port == 0 {
        return Err(err("outbound_port", "must not be 0"));
    }
    if outbound_port == mesh_common::DEFAULT_INBOUND_PORT {
        return Err(err("outbound_port", "collides with the inbound port 15006"));
    }
    let metrics_addr = raw.metrics_addr.as_deref().unwrap_or(DEFAULT_METRICS_ADDR);
    let metrics_addr: SocketAddr = metrics_addr
        .parse()
        .map_err(|_| err("metrics_addr", format!("`{metrics_addr}` is not IP:PORT")))?;
    let daemon_mark = raw.daemon_mark.unwrap_or(mesh_common::DEFAULT_DAEMON_MARK);
    if daemon_mark == 0 {
        return Err(err(
            "daemon_mark",
            "must not be 0 (unmarked sockets would look like the daemon's)",
        ));
    }
    let pin_dir = raw.pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    if !pin_dir.is_absolute() {
        return Err(err("pin_dir", "must be an absolute path on bpffs"));
    }
    let state_file = raw
        .state_file
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_FILE));
    if !state_file.is_absolute() {
        return Err(err("state_file", "must be an absolute path"));
    }
    if let Some(root) = &raw.cgroup_root {
        if !root.is_absolute() {
            return Err(err("cgroup_root", "must be an absolute path"));
        }
    }
    let acc = Acceleration {
        mode: match raw.acceleration.enabled {
            None => AccelMode::Auto,
            Some(true) => AccelMode::On,
            Some(false) => AccelMode::Off,
        },
        max_msg_bytes: raw
            .acceleration
            .max_msg_bytes
            .unwrap_or(mesh_common::config::DEFAULT_ACCEL_MAX_MSG),
        flow_budget_bytes: raw
            .acceleration
            .flow_budget_bytes
            .unwrap_or(mesh_common::config::DEFAULT_ACCEL_FLOW_BUDGET),
    };
    if acc.max_msg_bytes == 0 || acc.max_msg_bytes > 1 << 20 {
        return Err(err("acceleration.max_msg_bytes", "must be between 1 and 1048576"));
    }
    if acc.flow_budget_bytes < acc.max_msg_bytes as u64 {
        return Err(err(
            "acceleration.flow_budget_bytes",
            "must be at least max_msg_bytes",
        ));
    }
    let mut bypass_cidrs = Vec::new();
    for (i, c) in raw.bypass.cidrs.iter().enumerate() {
        bypass_cidrs.push(Cidr::parse(c).map_err(|r| err(format!("bypass.cidrs[{i}]"), r))?);
    }
    if bypass_cidrs.len() > mesh_common::maps::BYPASS_CIDRS_MAX as usize {
        return Err(err("bypass.cidrs", "too many entries"));
    }
    let mut bypass_ports = Vec::new();
    for (i, p) in raw.bypass.ports.iter().enumerate() {
        match u16::try_from(*p) {
            Ok(p) if p != 0 => bypass_ports.push(p),
            _ => {
                return Err(err(
                    format!("bypass.ports[{i}]"),
                    format!("{p} is not a port (1-65535)"),
                ))
            }
        }
    }
    if bypass_ports.len() > mesh_common::maps::BYPASS_PORTS_MAX as usize {
        return Err(err("bypass.ports", "too many entries"));
    }
    if raw.pods.len() > MAX_PODS {
        return Err(err("pods", format!("at most {MAX_PODS} pods")));
    }
    let mut pods: Vec<PodSpec> = Vec::new();
    for (i, p) in raw.pods.into_iter().enumerate() {
        let name = p.name.ok_or_else(|| err(format!("pods[{i}].name"), "missing"))?;
        check_pod_name(&name).map_err(|r| err(format!("pods[{i}].name"), r))?;
        if pods.iter().any(|q| q.name == name) {
            return Err(err(
                format!("pods[{i}].name"),
                format!("`{name}` is listed twice"),
            ));
        }
        let netns = p
            .netns
            .ok_or_else(|| err(format!("pods[{i}].netns"), "missing"))?;
        let cgroup = p
            .cgroup
            .ok_or_else(|| err(format!("pods[{i}].cgroup"), "missing"))?;
        if !netns.is_absolute() {
            return Err(err(format!("pods[{i}].netns"), "must be an absolute path"));
        }
        if !cgroup.is_absolute() {
            return Err(err(format!("pods[{i}].cgroup"), "must be an absolute path"));
        }
        if pods.iter().any(|q| q.cgroup == cgroup) {
            return Err(err(
                format!("pods[{i}].cgroup"),
                "another pod already uses this cgroup",
            ));
        }
        let inbound_ports = check_inbound_ports(&p.inbound_ports, outbound_port)
            .map_err(|r| err(format!("pods[{i}].inbound_ports"), r))?;
        let inbound_exclude_ports = check_inbound_ports(&p.inbound_exclude_ports, outbound_port)
            .map_err(|r| err(format!("pods[{i}].inbound_exclude_ports"), r))?;
        check_inbound_choice(p.inbound_all_ports, &inbound_ports, &inbound_exclude_ports)
            .map_err(|(f, r)| err(format!("pods[{i}].{f}"), r))?;
        if p.external_proxy && p.capture == Some(false) {
            return Err(err(
                format!("pods[{i}].capture"),
                "an external-proxy pod with capture off would do nothing",
            ));
        }
        if let Some(c) = &p.colour {
            check_pod_colour(c, &policy).map_err(|r| err(format!("pods[{i}].colour"), r))?;
        }
        check_propagate(p.propagate, p.capture.unwrap_or(true))
            .map_err(|r| err(format!("pods[{i}].propagate"), r))?;
        for (link, dirs) in &p.links {
            if !policy.links().iter().any(|l| &*l.name == link.as_str()) {
                return Err(err(
                    format!("pods[{i}].links.{link}"),
                    "no such link in [[links]]",
                ));
            }
            if dirs.is_empty() || dirs.iter().any(|d| !d.is_absolute()) {
                return Err(err(
                    format!("pods[{i}].links.{link}"),
                    "a list of absolute cgroup directories",
                ));
            }
        }
        pods.push(PodSpec {
            name,
            netns,
            cgroup,
            external_proxy: p.external_proxy,
            capture: p.capture.unwrap_or(true),
            inbound_ports,
            inbound_all_ports: p.inbound_all_ports,
            inbound_exclude_ports,
            colour: p.colour.clone(),
            propagate: p.propagate,
            links: p.links.clone(),
        });
    }
    Ok(Config {
        cgroup_root: raw.cgroup_root,
        outbound_port,
        admin_socket: raw
            .admin_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
        metrics_addr,
        daemon_mark,
        drain_timeout_secs: raw.drain_timeout_secs.unwrap_or(DEFAULT_DRAIN_SECS),
        bpf_log: raw.bpf_log.unwrap_or(false),
        propagation: raw.propagation.unwrap_or(true),
        pin_dir,
        state_file,
        acceleration: acc,
        bypass_cidrs,
        bypass_ports,
        pods,
        routing,
        workers,
        pin_workers: raw.pin_workers.unwrap_or(true),
        reuseport_listeners: raw.reuseport_listeners.unwrap_or(true),
        kubernetes,
        limits,
    })
}

fn parse_kubernetes(raw: Option<RawKubernetes>) -> Result<Option<crate::k8s::KubernetesConfig>, ConfigError> {
    let Some(raw) = raw.filter(|k| k.enabled.unwrap_or(true)) else {
        return Ok(None);
    };
    let cri_socket = raw
        .cri_socket
        .unwrap_or_else(|| PathBuf::from(crate::k8s::DEFAULT_CRI_SOCKET));
    if !cri_socket.is_absolute() {
        return Err(err("kubernetes.cri_socket", "must be an absolute path"));
    }
    let selector =
        crate::k8s::parse_selector(raw.selector.as_deref().unwrap_or(crate::k8s::DEFAULT_SELECTOR))
            .map_err(|e| err("kubernetes.selector", e))?;
    let resync_secs = raw.resync_secs.unwrap_or(10);
    if !(1..=3600).contains(&resync_secs) {
        return Err(err("kubernetes.resync_secs", "must be 1 to 3600"));
    }
    if raw.cni_conf_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
        return Err(err("kubernetes.cni_conf_dir", "must be an absolute path"));
    }
    let cni_check_ms = raw.cni_check_ms.unwrap_or(1000);
    if !(100..=60_000).contains(&cni_check_ms) {
        return Err(err("kubernetes.cni_check_ms", "must be 100 to 60000"));
    }
    Ok(Some(crate::k8s::KubernetesConfig {
        cri_socket,
        selector,
        resync_secs,
        sigterm_keeps_state: raw.sigterm_keeps_state.unwrap_or(true),
        cni_conf_dir: raw.cni_conf_dir,
        cni_check_ms,
    }))
}

/// Checks against the running system: the attach root is a cgroup v2 directory, and every pod's
/// netns and cgroup exist, with the cgroup inside the root.
pub fn check_system(cfg: &Config, cgroup2_mount: &Path) -> Result<PathBuf, ConfigError> {
    let root = cfg.cgroup_root.clone().ok_or_else(|| {
        err(
            "cgroup_root",
            "missing (set it in the file or pass --cgroup-root)",
        )
    })?;
    let root = root
        .canonicalize()
        .map_err(|e| err("cgroup_root", format!("{}: {e}", root.display())))?;
    if !root.starts_with(cgroup2_mount) {
        return Err(err(
            "cgroup_root",
            format!(
                "{} is not under the cgroup v2 mount {}",
                root.display(),
                cgroup2_mount.display()
            ),
        ));
    }
    for (i, p) in cfg.pods.iter().enumerate() {
        check_pod_paths(p, &root).map_err(|(f, r)| err(format!("pods[{i}].{f}"), r))?;
    }
    Ok(root)
}

/// Filesystem checks for one pod; the error names the field (`netns` or `cgroup`).
pub fn check_pod_paths(p: &PodSpec, root: &Path) -> Result<(), (&'static str, String)> {
    if let Err(e) = std::fs::File::open(&p.netns) {
        return Err(("netns", format!("{}: {e}", p.netns.display())));
    }
    let cg = p
        .cgroup
        .canonicalize()
        .map_err(|e| ("cgroup", format!("{}: {e}", p.cgroup.display())))?;
    if !cg.join("cgroup.procs").exists() {
        return Err(("cgroup", format!("{} is not a cgroup directory", cg.display())));
    }
    if !cg.starts_with(root) {
        return Err((
            "cgroup",
            format!("{} is not inside cgroup_root {}", cg.display(), root.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_section() {
        assert_eq!(parse("").unwrap().kubernetes, None);
        let k = parse("[kubernetes]\n").unwrap().kubernetes.unwrap();
        assert_eq!(k.cri_socket, Path::new(crate::k8s::DEFAULT_CRI_SOCKET));
        assert_eq!(k.selector, ("sockmesh.io/mesh".into(), "enabled".into()));
        assert!(k.sigterm_keeps_state);
        let k = parse("[kubernetes]\ncri_socket = \"/x/cri.sock\"\nselector = \"mesh=on\"\nresync_secs = 2\nsigterm_keeps_state = false\n")
            .unwrap()
            .kubernetes
            .unwrap();
        assert_eq!((k.resync_secs, k.sigterm_keeps_state), (2, false));
        assert_eq!(parse("[kubernetes]\nenabled = false\n").unwrap().kubernetes, None);
        assert_eq!(
            parse("[kubernetes]\nselector = \"x\"\n").unwrap_err().field,
            "kubernetes.selector"
        );
        assert_eq!(
            parse("[kubernetes]\ncri_socket = \"rel\"\n").unwrap_err().field,
            "kubernetes.cri_socket"
        );
        assert!(parse("[kubernetes]\nbogus = 1\n").is_err());
        let k = parse("[kubernetes]\ncni_conf_dir = \"/etc/cni/net.d\"\ncni_check_ms = 500\n")
            .unwrap()
            .kubernetes
            .unwrap();
        assert_eq!(
            (k.cni_conf_dir.as_deref(), k.cni_check_ms),
            (Some(Path::new("/etc/cni/net.d")), 500)
        );
        assert_eq!(
            parse("[kubernetes]\n").unwrap().kubernetes.unwrap().cni_conf_dir,
            None
        );
        assert_eq!(
            parse("[kubernetes]\ncni_conf_dir = \"net.d\"\n")
                .unwrap_err()
                .field,
            "kubernetes.cni_conf_dir"
        );
        assert_eq!(
            parse("[kubernetes]\ncni_check_ms = 5\n").unwrap_err().field,
            "kubernetes.cni_check_ms"
        );
        // The DaemonSet's ConfigMap.
        let c = parse(include_str!("../../deploy/kubernetes/sockmesh.toml"))
            .expect("deploy/kubernetes/sockmesh.toml");
        assert!(c.kubernetes.is_some_and(|k| k.sigterm_keeps_state));
        assert_eq!(c.admin_socket, Path::new(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn limits_section_defaults_ranges_and_the_per_pod_cap() {
        let d = parse("").unwrap().limits;
        assert_eq!(d.request_head_timeout, std::time::Duration::from_secs(10));
        assert_eq!(d.max_request_head_bytes, 65536);
        assert_eq!(d.client_idle_timeout, std::time::Duration::from_secs(300));
        assert_eq!(d.max_connections_per_pod, None);
        assert_eq!(
            d.pod_connection_cap(20_000),
            5_000,
            "a quarter of the open-files limit"
        );
        let l = parse(
            "[limits]\nrequest_head_timeout_ms = 1500\nmax_request_head_bytes = 16384\n\
             client_idle_timeout_secs = 60\nupstream_body_idle_timeout_secs = 30\nmax_connections_per_pod = 0\n",
        )
        .unwrap()
        .limits;
        assert_eq!(l.request_head_timeout, std::time::Duration::from_millis(1500));
        assert_eq!(l.max_request_head_bytes, 16384);
        assert_eq!(l.client_idle_timeout, std::time::Duration::from_secs(60));
        assert_eq!(l.upstream_body_idle_timeout, std::time::Duration::from_secs(30));
        assert_eq!(l.pod_connection_cap(20_000), 0, "0: no cap");
        for (text, field) in [
            ("request_head_timeout_ms = 10", "limits.request_head_timeout_ms"),
            ("max_request_head_bytes = 100", "limits.max_request_head_bytes"),
            ("client_idle_timeout_secs = 0", "limits.client_idle_timeout_secs"),
            (
                "upstream_body_idle_timeout_secs = 0",
                "limits.upstream_body_idle_timeout_secs",
            ),
        ] {
            assert_eq!(parse(&format!("[limits]\n{text}\n")).unwrap_err().field, field);
        }
        assert!(parse("[limits]\nbogus = 1\n").is_err());
    }

    #[test]
    fn embedded_default_config_parses() {
        let c = parse(DEFAULT_CONFIG).expect("default config");
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(
            c.acceleration.mode,
            AccelMode::Auto,
            "acceleration is on by default wherever the self-test passes"
        );
        assert!(c.pods.is_empty());
        assert_eq!(c.workers, None, "one worker per CPU unless set");
        assert!(
            c.pin_workers,
            "workers are pinned unless the config says otherwise"
        );
        assert!(
            c.reuseport_listeners,
            "listener groups unless the config says otherwise"
        );
    }

    #[test]
    fn full_config_round_trip() {
        let c = parse(
            r#"
            cgroup_root = "/sys/fs/cgroup/x"
            outbound_port = 16001
            metrics_addr = "127.0.0.1:9999"
            workers = 3
            pin_workers = false
            reuseport_listeners = false
            [acceleration]
            enabled = true
            max_msg_bytes = 4096
            [bypass]
            cidrs = ["203.0.113.0/24", "2001:db8::/32"]
            ports = [22, 53]
            [[pods]]
            name = "a"
            netns = "/run/netns/a"
            cgroup = "/sys/fs/cgroup/x/a"
            [[pods]]
            name = "b"
            netns = "/run/netns/b"
            cgroup = "/sys/fs/cgroup/x/b"
            external_proxy = true
            "#,
        )
        .unwrap();
        assert_eq!(c.outbound_port, 16001);
        assert_eq!(c.workers, Some(3));
        assert!(!c.pin_workers);
        assert!(!c.reuseport_listeners);
        assert_eq!(c.bypass_ports, vec![22, 53]);
        assert_eq!(c.bypass_cidrs[1].prefix, 32);
        assert_eq!(c.pods.len(), 2);
        assert!(c.pods[1].external_proxy);
        assert_eq!(c.acceleration.mode, AccelMode::On);
        assert_eq!(c.acceleration.max_msg_bytes, 4096);
    }

    fn field_of(text: &str) -> String {
        parse(text).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of("outbound_port = 0"), "outbound_port");
        assert_eq!(field_of("metrics_addr = \"nope\""), "metrics_addr");
        assert_eq!(
            field_of("[bypass]\ncidrs = [\"10.0.0.0/8\", \"10.0.0.0/40\"]"),
            "bypass.cidrs[1]"
        );
        assert_eq!(field_of("[bypass]\nports = [22, 70000]"), "bypass.ports[1]");
        assert_eq!(
            field_of("[[pods]]\nnetns = \"/a\"\ncgroup = \"/b\""),
            "pods[0].name"
        );
        assert_eq!(
            field_of("[[pods]]\nname = \"a\"\nnetns = \"/a\"\ncgroup = \"/b\"\n[[pods]]\nname = \"a\"\nnetns = \"/c\"\ncgroup = \"/d\""),
            "pods[1].name"
        );
        assert_eq!(
            field_of("[[pods]]\nname = \"a b\"\nnetns = \"/a\"\ncgroup = \"/b\""),
            "pods[0].name"
        );
        assert_eq!(
            field_of("[[pods]]\nname = \"a\"\nnetns = \"rel\"\ncgroup = \"/b\""),
            "pods[0].netns"
        );
        assert_eq!(field_of("daemon_mark = 0"), "daemon_mark");
        assert_eq!(field_of("workers = 0"), "workers");
        assert_eq!(field_of("workers = 257"), "workers");
        assert_eq!(
            field_of(
                "[[pods]]\nname = \"a\"\nnetns = \"/a\"\ncgroup = \"/b\"\ninbound_ports = [8080, 15006]"
            ),
            "pods[0].inbound_ports"
        );
        assert_eq!(field_of("pin_dir = \"rel/x\""), "pin_dir");
        assert_eq!(field_of("state_file = \"s.json\""), "state_file");
        assert_eq!(
            field_of("[acceleration]\nmax_msg_bytes = 0"),
            "acceleration.max_msg_bytes"
        );
    }

    #[test]
    fn propagate_is_per_pod_and_needs_capture() {
        let c = parse(
            "[[pods]]\nname = \"a\"\nnetns = \"/a\"\ncgroup = \"/b\"\npropagate = true\n\
             [[pods]]\nname = \"b\"\nnetns = \"/c\"\ncgroup = \"/d\"",
        )
        .unwrap();
        assert!(c.pods[0].propagate);
        assert!(!c.pods[1].propagate);
        assert!(c.propagation, "the node-wide switch defaults to on");
        assert!(!parse("propagation = false").unwrap().propagation);
        assert_eq!(
            field_of(
                "[[pods]]\nname = \"a\"\nnetns = \"/a\"\ncgroup = \"/b\"\ncapture = false\npropagate = true"
            ),
            "pods[0].propagate"
        );
        assert!(check_propagate(true, true).is_ok());
        assert!(check_propagate(false, false).is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_rejected_with_a_location() {
        let e = parse("cgroup_rot = \"/x\"").unwrap_err();
        assert!(e.reason.contains("cgroup_rot"), "{e}");
        let e = parse("[[pods]\n").unwrap_err();
        assert!(e.field.starts_with("at byte"), "{e}");
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().prefix, 8);
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("::/129").is_err());
        assert!(Cidr::parse("x/1").is_err());
    }

    #[test]
    fn system_checks_name_the_field() {
        let dir = std::env::temp_dir().join(format!("sockmesh-cfg-test-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/cgroup.procs"), "").unwrap();
        std::fs::write(dir.join("ns"), "").unwrap();
        let text = format!(
            "cgroup_root = \"{r}\"\n[[pods]]\nname = \"a\"\nnetns = \"{d}/ns\"\ncgroup = \"{r}/a\"\n[[pods]]\nname = \"b\"\nnetns = \"{d}/missing\"\ncgroup = \"{r}/a2\"\n",
            r = root.display(),
            d = dir.display()
        );
        let c = parse(&text).unwrap();
        let e = check_system(&c, &dir).unwrap_err();
        assert_eq!(e.field, "pods[1].netns");
        let e = check_system(&c, Path::new("/nonexistent-mount")).unwrap_err();
        assert_eq!(e.field, "cgroup_root");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
