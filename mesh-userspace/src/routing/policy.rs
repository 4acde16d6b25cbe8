//! The routing policy's schema (TOML in the daemon config, or a file applied with
//! `sockmesh routes apply`), its validation and the compiled form requests are matched against.
//!
//! ```toml
//! detect_timeout_ms = 300            # top level of the daemon config; default 300
//!
//! [[services]]
//! name = "orders"
//! addresses = ["10.96.0.10:8080"]    # original destinations (VIP:port) that select it
//! hosts = ["orders.default.svc"]     # and/or names (HTTP host, Bolt interface, Dubbo service)
//! protocol = "auto"                  # auto | http1 | http2 | grpc | bolt | dubbo | tcp
//! timeout_ms = 15000                 # per request, unless the route says otherwise
//! retries = 1                        # extra attempts for requests safe to retry
//! endpoints = [
//!   { address = "10.0.1.5:8080", labels = { version = "v1" } },
//!   { address = "10.0.2.7:8080", labels = { version = "v2", colour = "gray" } },
//! ]
//! subsets = [
//!   { name = "v1", labels = { version = "v1" } },
//!   { name = "v2", labels = { version = "v2" } },
//! ]
//! [[services.routes]]
//! name = "canary-by-header"
//! match = { headers = { x-canary = "true" } }
//! split = [{ subset = "v2", weight = 100 }]
//! [[services.routes]]
//! name = "default"                   # no match: catch-all
//! split = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
//! ```
//!
//! Without `subsets`, one subset `all` holds every endpoint; without `routes`, one route
//! `default` sends everything to the first subset. Routes are tried in order; the first whose
//! every given field matches wins.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    colour::{
        self, Choice, ColourId, ColourInputs, ColourOutcome, ColourStats, ColourStatsView, Colours, Fallback,
        Ingress, RawColour, RawIngress, Source,
    },
    kernel::{self, KernelPlan, KernelService, ServiceFacts, ServiceMode},
    ConnPlan, Decision, KeyHash, ProtocolHint, RequestInfo, RetryOrder, RouteError, RouteStats,
    RouteStatsView,
};

pub const DEFAULT_DETECT_TIMEOUT_MS: u64 = 300;
pub const MAX_DETECT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 15_000;
pub const MAX_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_RETRIES: u32 = 1;
pub const MAX_RETRIES: u32 = 5;
pub const MAX_SERVICES: usize = 1024;
pub const MAX_ENDPOINTS: usize = 1024;
pub const MAX_SUBSETS: usize = 64;
pub const MAX_ROUTES: usize = 128;
pub const MAX_SPLIT: usize = 16;
pub const MAX_WEIGHT: u32 = 1_000_000;
pub const MAX_NAME: usize = 253;

/// The policy as written (also what `sockmesh routes` shows and `routes apply` takes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub services: Vec<RawService>,
    /// Traffic colours ([`super::colour`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub colours: Vec<RawColour>,
    /// Rules that colour uncoloured requests entering a service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RawIngress>,
    /// Sources outside this node whose colour headers are believed (other mesh nodes' pod
    /// ranges): CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_sources: Vec<String>,
    /// Active / keep-alive dual links ([`super::link`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<super::link::RawLink>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "auto")]
    pub protocol: ProtocolHint,
    /// `proxy` (default) or `kernel`: routed inside `connect()` ([`super::kernel`]).
    #[serde(default, skip_serializing_if = "ServiceMode::is_proxy")]
    pub mode: ServiceMode,
    /// `mode = "kernel"` only: the daemon connects to every endpoint this often and takes one
    /// that failed twice in a row out of the kernel's choice until it answers twice again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub subsets: Vec<RawSubset>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

fn auto() -> ProtocolHint {
    ProtocolHint::Auto
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: RawMatch,
    pub split: Vec<RawSplit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// Every given field must match (exact, except `path_prefix`); header names are
/// case-insensitive, values exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl RawMatch {
    fn is_catch_all(&self) -> bool {
        self == &RawMatch::default()
    }

    pub(super) fn matches(&self, req: &RequestInfo<'_>) -> bool {
        fn eq(want: &Option<String>, got: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| got == Some(w))
        }
        // The host is normalised only for a route that matches on it.
        self.host
            .as_deref()
            .is_none_or(|w| req.host.map(strip_port).as_deref() == Some(w))
            && eq(&self.path_exact, req.path)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| req.path.is_some_and(|path| path.starts_with(p)))
            && eq(&self.method, req.method)
            && eq(&self.service, req.service)
            && eq(&self.version, req.version)
            && self
                .headers
                .iter()
                .all(|(k, v)| req.headers.header(k) == Some(v.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    pub subset: String,
    pub weight: u32,
}

/// A policy that failed validation: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

fn perr(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parse a policy file (`detect_timeout_ms` and `[[services]]`, nothing else).
pub fn parse_toml(text: &str) -> Result<RawPolicy, PolicyError> {
    toml::from_str(text).map_err(|e| {
        let field = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("policy line {line} column {column}")
            }
            None => "policy".to_owned(),
        };
        perr(field, e.message().to_owned())
    })
}

/// A host name compared case-insensitively and without a port.
fn strip_port(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

/// `::ffff:a.b.c.d` is the IPv4 address it maps (the hooks record it that way too).
pub fn normalise(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

struct Subset {
    name: Arc<str>,
    endpoints: Arc<[SocketAddr]>,
    /// The subset's endpoints by colour (0 = base, the uncoloured ones); only colours present.
    by_colour: Vec<(ColourId, Arc<[SocketAddr]>)>,
    next: AtomicUsize,
}

impl Subset {
    fn of_colour(&self, c: ColourId) -> Option<&Arc<[SocketAddr]>> {
        self.by_colour.iter().find(|(k, _)| *k == c).map(|(_, e)| e)
    }
}

struct Split {
    subset: usize,
    weight: u32,
    stats: Arc<RouteStats>,
}

struct Route {
    name: Arc<str>,
    matches: RawMatch,
    split: Vec<Split>,
    timeout: Duration,
    retries: u32,
}

struct Service {
    /// Position in the policy (counters are laid out by it).
    index: usize,
    name: Arc<str>,
    protocol: ProtocolHint,
    subsets: Vec<Subset>,
    routes: Vec<Route>,
    mode: ServiceMode,
    /// Why the service is or is not routed in the kernel (for `sockmesh routes`).
    kernel_note: String,
}

/// A validated policy, ready to route with.
pub struct Policy {
    raw: RawPolicy,
    detect_timeout: Duration,
    services: Vec<Service>,
    by_addr: HashMap<SocketAddr, usize, KeyHash>,
    by_host: HashMap<String, usize>,
    /// Endpoint address → service, to find the service of a pod's inbound request.
    by_endpoint: HashMap<SocketAddr, usize, KeyHash>,
    passthrough: Arc<RouteStats>,
    colours: Colours,
    ingress: Vec<Ingress>,
    colour_stats: Arc<ColourStats>,
    links: Vec<super::link::Link>,
    /// Service index → link index.
    link_of_service: HashMap<usize, usize>,
    /// The services routed inside `connect()` and their tables.
    kernel: Arc<KernelPlan>,
    pub(super) generation: u64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("generation", &self.generation)
            .field("services", &self.services.len())
            .finish()
    }
}

fn check_name(field: &str, name: &str) -> Result<Arc<str>, PolicyError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(perr(field, format!("must be 1 to {MAX_NAME} characters")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(perr(
            field,
            format!("`{name}` may only use letters, digits, `-`, `_` and `.`"),
        ));
    }
    Ok(name.into())
}

fn check_timeout(field: &str, ms: Option<u64>, default: u64) -> Result<Duration, PolicyError> {
    let ms = ms.unwrap_or(default);
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(perr(field, format!("must be 1 to {MAX_TIMEOUT_MS} ms")));
    }
    Ok(Duration::from_millis(ms))
}

fn check_retries(field: &str, r: Option<u32>, default: u32) -> Result<u32, PolicyError> {
    let r = r.unwrap_or(default);
    if r > MAX_RETRIES {
        return Err(perr(field, format!("at most {MAX_RETRIES}")));
    }
    Ok(r)
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, PolicyError> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| perr(field, format!("`{s}` is not an IP:port (IPv6 as [addr]:port)")))?;
    if a.port() == 0 {
        return Err(perr(field, "port 0"));
    }
    Ok(normalise(a))
}

/// An address as the policy stores it, or `None` when it does not parse.
pub(super) fn normalise_str(s: &str) -> Option<SocketAddr> {
    s.parse().ok().map(normalise)
}

/// Validate and compile. Every error names the field (`services[1].routes[0].split`).
pub fn compile(raw: RawPolicy) -> Result<Policy, PolicyError> {
    let detect_ms = raw.detect_timeout_ms.unwrap_or(DEFAULT_DETECT_TIMEOUT_MS);
    if detect_ms == 0 || detect_ms > MAX_DETECT_TIMEOUT_MS {
        return Err(perr(
            "detect_timeout_ms",
            format!("must be 1 to {MAX_DETECT_TIMEOUT_MS} ms"),
        ));
    }
    if raw.services.len() > MAX_SERVICES {
        return Err(perr("services", format!("at most {MAX_SERVICES}")));
    }
    let colours = compile_colours(&raw)?;
    let mut services = Vec::new();
    let mut by_endpoint = HashMap::default();
    let mut by_addr = HashMap::default();
    let mut by_host = HashMap::new();
    let mut names = HashSet::new();
    let mut kernel_plan = KernelPlan::default();
    for (si, s) in raw.services.iter().enumerate() {
        let f = format!("services[{si}]");
        let name = check_name(&format!("{f}.name"), &s.name)?;
        if &*name == "passthrough" {
            return Err(perr(format!("{f}.name"), "`passthrough` is reserved"));
        }
        if !names.insert(name.clone()) {
            return Err(perr(
                format!("{f}.name"),
                format!("service `{name}` is defined twice"),
            ));
        }
        if s.addresses.is_empty() && s.hosts.is_empty() {
            return Err(perr(
                &f,
                "a service needs `addresses` or `hosts` (how else would traffic reach it?)",
            ));
        }
        for (ai, a) in s.addresses.iter().enumerate() {
            let field = format!("{f}.addresses[{ai}]");
            let addr = parse_addr(&field, a)?;
            if let Some(prev) = by_addr.insert(addr, si) {
                return Err(perr(
                    field,
                    format!("{addr} already belongs to service `{}`", raw.services[prev].name),
                ));
            }
        }
        for (hi, h) in s.hosts.iter().enumerate() {
            let field = format!("{f}.hosts[{hi}]");
            if h.is_empty() || h.len() > MAX_NAME || h.bytes().any(|b| b.is_ascii_whitespace() || b == b':') {
                return Err(perr(field, format!("`{h}` is not a host name")));
            }
            if let Some(prev) = by_host.insert(h.to_ascii_lowercase(), si) {
                return Err(perr(
                    field,
                    format!("`{h}` already belongs to service `{}`", raw.services[prev].name),
                ));
            }
        }
        let timeout = check_timeout(&format!("{f}.timeout_ms"), s.timeout_ms, DEFAULT_TIMEOUT_MS)?;
        let retries = check_retries(&format!("{f}.retries"), s.retries, DEFAULT_RETRIES)?;
        if s.endpoints.is_empty() {
            return Err(perr(
                format!("{f}.endpoints"),
                "a service needs at least one endpoint",
            ));
        }
        if s.endpoints.len() > MAX_ENDPOINTS {
            return Err(perr(format!("{f}.endpoints"), format!("at most {MAX_ENDPOINTS}")));
        }
        let mut endpoints = Vec::new();
        for (ei, e) in s.endpoints.iter().enumerate() {
            let addr = parse_addr(&format!("{f}.endpoints[{ei}].address"), &e.address)?;
            if endpoints.iter().any(|(a, _, _)| *a == addr) {
                return Err(perr(
                    format!("{f}.endpoints[{ei}].address"),
                    format!("{addr} is listed twice"),
                ));
            }
            let colour = match e.labels.get(colour::LABEL) {
                None => 0,
                Some(c) => colours.id(c).ok_or_else(|| {
                    perr(
                        format!("{f}.endpoints[{ei}].labels.{}", colour::LABEL),
                        format!("unknown colour `{c}` (defined: {})", defined(&colours)),
                    )
                })?,
            };
            by_endpoint.entry(addr).or_insert(si);
            endpoints.push((addr, &e.labels, colour));
        }
        let raw_subsets = if s.subsets.is_empty() {
            vec![RawSubset {
                name: "all".into(),
                labels: BTreeMap::new(),
            }]
        } else {
            s.subsets.clone()
        };
        if raw_subsets.len() > MAX_SUBSETS {
            return Err(perr(format!("{f}.subsets"), format!("at most {MAX_SUBSETS}")));
        }
        let mut subsets: Vec<Subset> = Vec::new();
        for (ki, k) in raw_subsets.iter().enumerate() {
            let field = format!("{f}.subsets[{ki}]");
            let sname = check_name(&format!("{field}.name"), &k.name)?;
            if subsets.iter().any(|x| x.name == sname) {
                return Err(perr(
                    format!("{field}.name"),
                    format!("subset `{sname}` is defined twice"),
                ));
            }
            let members: Vec<(SocketAddr, ColourId)> = endpoints
                .iter()
                .filter(|(_, labels, _)| k.labels.iter().all(|(lk, lv)| labels.get(lk) == Some(lv)))
                .map(|(a, _, c)| (*a, *c))
                .collect();
            if members.is_empty() {
                return Err(perr(
                    format!("{field}.labels"),
                    format!("subset `{sname}` selects no endpoint"),
                ));
            }
            let mut by_colour: Vec<(ColourId, Vec<SocketAddr>)> = Vec::new();
            for (a, c) in &members {
                match by_colour.iter_mut().find(|(k, _)| k == c) {
                    Some((_, v)) => v.push(*a),
                    None => by_colour.push((*c, vec![*a])),
                }
            }
            subsets.push(Subset {
                name: sname,
                endpoints: members.iter().map(|(a, _)| *a).collect(),
                by_colour: by_colour.into_iter().map(|(c, v)| (c, v.into())).collect(),
                next: AtomicUsize::new(0),
            });
        }
        let raw_routes = if s.routes.is_empty() {
            vec![RawRoute {
                name: Some("default".into()),
                matches: RawMatch::default(),
                split: vec![RawSplit {
                    subset: subsets[0].name.to_string(),
                    weight: 1,
                }],
                timeout_ms: None,
                retries: None,
            }]
        } else {
            s.routes.clone()
        };
        if raw_routes.len() > MAX_ROUTES {
            return Err(perr(format!("{f}.routes"), format!("at most {MAX_ROUTES}")));
        }
        let mut routes: Vec<Route> = Vec::new();
        for (ri, r) in raw_routes.iter().enumerate() {
            let field = format!("{f}.routes[{ri}]");
            let rname = match &r.name {
                Some(n) => check_name(&format!("{field}.name"), n)?,
                None if r.matches.is_catch_all() => "default".into(),
                None => format!("route{ri}").into(),
            };
            if routes.iter().any(|x| x.name == rname) {
                return Err(perr(
                    format!("{field}.name"),
                    format!("route `{rname}` is defined twice"),
                ));
            }
            if r.split.is_empty() || r.split.len() > MAX_SPLIT {
                return Err(perr(
                    format!("{field}.split"),
                    format!("needs 1 to {MAX_SPLIT} entries"),
                ));
            }
            let mut split = Vec::new();
            let mut total = 0u64;
            for (pi, p) in r.split.iter().enumerate() {
                let pf = format!("{field}.split[{pi}]");
                let idx = subsets.iter().position(|x| *x.name == *p.subset).ok_or_else(|| {
                    perr(
                        format!("{pf}.subset"),
                        format!("no subset `{}` in this service", p.subset),
                    )
                })?;
                if p.weight > MAX_WEIGHT {
                    return Err(perr(format!("{pf}.weight"), format!("at most {MAX_WEIGHT}")));
                }
                if split.iter().any(|x: &Split| x.subset == idx) {
                    return Err(perr(
                        format!("{pf}.subset"),
                        format!("`{}` listed twice", p.subset),
                    ));
                }
                total += u64::from(p.weight);
                split.push(Split {
                    subset: idx,
                    weight: p.weight,
                    stats: Arc::new(RouteStats::new(&name, &rname, &subsets[idx].name)),
                });
            }
            if total == 0 {
                return Err(perr(format!("{field}.split"), "weights add up to 0"));
            }
            for hk in r.matches.headers.keys() {
                if hk.is_empty() || !hk.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(perr(
                        format!("{field}.match.headers"),
                        format!("`{hk}` is not a header name"),
                    ));
                }
            }
            let mut matches = r.matches.clone();
            matches.headers = matches
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            matches.host = matches.host.map(|h| h.to_ascii_lowercase());
            routes.push(Route {
                name: rname,
                matches,
                split,
                timeout: check_timeout(
                    &format!("{field}.timeout_ms"),
                    r.timeout_ms,
                    timeout.as_millis() as u64,
                )?,
                retries: check_retries(&format!("{field}.retries"), r.retries, retries)?,
            });
        }
        let vips: Vec<SocketAddr> = by_addr
            .iter()
            .filter(|(_, i)| **i == si)
            .map(|(a, _)| *a)
            .collect();
        let mut vips = vips;
        vips.sort();
        let facts = ServiceFacts {
            field: &f,
            index: si,
            addresses: &vips,
            subsets: subsets
                .iter()
                .map(|k| (k.name.clone(), k.endpoints.to_vec()))
                .collect(),
            routes: routes
                .iter()
                .map(|r| {
                    (
                        r.matches.is_catch_all(),
                        r.split.iter().map(|p| (p.subset, p.weight)).collect(),
                    )
                })
                .collect(),
        };
        let kernel_note = match (s.mode, kernel::check(&raw, &facts)) {
            (ServiceMode::Kernel, Ok(entries)) => {
                kernel_plan.services.push(KernelService {
                    name: name.clone(),
                    health_interval: s.health_check_ms.map(Duration::from_millis),
                    slot: kernel_plan.services.len() as u32,
                    addresses: vips,
                    entries,
                });
                "kernel: routed inside connect()".to_owned()
            }
            (ServiceMode::Kernel, Err((field, reason))) => {
                return Err(perr(
                    field,
                    format!("mode = \"kernel\" cannot route this service: {reason}"),
                ));
            }
            (ServiceMode::Proxy, _) if s.health_check_ms.is_some() => {
                return Err(perr(
                    format!("{f}.health_check_ms"),
                    "health checks are for mode = \"kernel\" services (the proxy retries instead)",
                ));
            }
            (ServiceMode::Proxy, Ok(_)) => "proxy (qualifies for mode = \"kernel\")".to_owned(),
            (ServiceMode::Proxy, Err((field, reason))) => format!("proxy ({field}: {reason})"),
        };
        services.push(Service {
            index: services.len(),
            name,
            protocol: s.protocol,
            subsets,
            routes,
            mode: s.mode,
            kernel_note,
        });
    }
    if let Err((field, reason)) = kernel::check_plan(&kernel_plan) {
        return Err(perr(field, reason));
    }
    let ingress = compile_ingress(&raw, &services, &colours)?;
    let (links, link_of_service) = compile_links(&raw, &services)?;
    let colour_stats = Arc::new(ColourStats::new(
        services.iter().map(|s| s.name.to_string()).collect(),
        &colours,
    ));
    Ok(Policy {
        raw,
        detect_timeout: Duration::from_millis(detect_ms),
        services,
        by_addr,
        by_host,
        by_endpoint,
        passthrough: Arc::new(RouteStats::new("passthrough", "passthrough", "passthrough")),
        colours,
        ingress,
        colour_stats,
        links,
        link_of_service,
        kernel: Arc::new(kernel_plan),
        generation: 0,
    })
}

fn check_resources(f: &str, r: &super::link::RawResources) -> Result<(), PolicyError> {
    if let Some(c) = r.cpu_percent {
        // Values the kernel refuses (a quota under 1 ms) are left to the kernel: its error is
        // reported by the actuator and nothing changes.
        if !c.is_finite() || c <= 0.0 || c > 100_000.0 {
            return Err(perr(
                format!("{f}.cpu_percent"),
                "must be above 0 and at most 100000",
            ));
        }
    }
    if let Some(w) = r.weight {
        if !(1..=10_000).contains(&w) {
            return Err(perr(
                format!("{f}.weight"),
                "must be 1 to 10000 (cgroup v2 cpu.weight)",
            ));
        }
    }
    Ok(())
}

/// `[[links]]`: every service named, in one link only; exactly one link starts active.
fn compile_links(
    raw: &RawPolicy,
    services: &[Service],
) -> Result<(Vec<super::link::Link>, HashMap<usize, usize>), PolicyError> {
    use super::link::{Link, LinkState, MAX_KEEP_PATHS, MAX_LINKS};
    if raw.links.len() > MAX_LINKS {
        return Err(perr("links", format!("at most {MAX_LINKS}")));
    }
    let mut links: Vec<Link> = Vec::new();
    let mut of_service = HashMap::new();
    for (li, l) in raw.links.iter().enumerate() {
        let f = format!("links[{li}]");
        let name = check_name(&format!("{f}.name"), &l.name)?;
        if links.iter().any(|x| x.name == name) {
            return Err(perr(
                format!("{f}.name"),
                format!("link `{name}` is defined twice"),
            ));
        }
        if l.services.is_empty() {
            return Err(perr(format!("{f}.services"), "a link needs at least one service"));
        }
        if l.initial == LinkState::Switching {
            return Err(perr(format!("{f}.initial"), "`active` or `keepalive`"));
        }
        if let Some(t) = l.trickle_percent {
            if !t.is_finite() || !(0.0..=100.0).contains(&t) {
                return Err(perr(format!("{f}.trickle_percent"), "must be 0 to 100"));
            }
        }
        if let Some(r) = l.trickle_per_second {
            if l.trickle_percent.is_some() {
                return Err(perr(
                    format!("{f}.trickle_per_second"),
                    "give trickle_percent or trickle_per_second, not both",
                ));
            }
            if !r.is_finite() || r <= 0.0 || r > super::link::MAX_TRICKLE_PER_SECOND {
                return Err(perr(
                    format!("{f}.trickle_per_second"),
                    format!(
                        "must be above 0 and at most {} (use trickle_percent = 0 for none)",
                        super::link::MAX_TRICKLE_PER_SECOND
                    ),
                ));
            }
        }
        if l.keep_paths.len() > MAX_KEEP_PATHS {
            return Err(perr(
                format!("{f}.keep_paths"),
                format!("at most {MAX_KEEP_PATHS}"),
            ));
        }
        for (pi, p) in l.keep_paths.iter().enumerate() {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(perr(
                    format!("{f}.keep_paths[{pi}]"),
                    format!("`{p}` is not a path (starts with `/`)"),
                ));
            }
        }
        if l.preconnect > super::link::MAX_PRECONNECT {
            return Err(perr(
                format!("{f}.preconnect"),
                format!("{} is more than {}", l.preconnect, super::link::MAX_PRECONNECT),
            ));
        }
        check_resources(&format!("{f}.keepalive"), &l.keepalive)?;
        check_resources(&format!("{f}.active"), &l.active)?;
        let mut idx = Vec::new();
        let mut elsewhere = Vec::new();
        let mut stats = Vec::new();
        let mut counts = Vec::new();
        for (si, s) in l.services.iter().enumerate() {
            let field = format!("{f}.services[{si}]");
            let i = services
                .iter()
                .position(|x| *x.name == **s)
                .ok_or_else(|| perr(&field, format!("no service `{s}` in the policy")))?;
            if let Some(prev) = of_service.insert(i, li) {
                return Err(perr(
                    field,
                    format!("service `{s}` is already in link `{}`", raw.links[prev].name),
                ));
            }
            let svc = &services[i];
            if svc.mode == ServiceMode::Kernel {
                // Routed inside connect(): no request would ever see the link's share.
                return Err(perr(
                    field,
                    format!("service `{s}` is routed in the kernel (mode = \"kernel\"); a linked service is routed by the proxy"),
                ));
            }
            let eps: Arc<[SocketAddr]> = match &l.pool {
                Some(pool) => match svc.subsets.iter().find(|k| *k.name == **pool) {
                    Some(k) => k.endpoints.clone(),
                    None => {
                        return Err(perr(
                            format!("{f}.pool"),
                            format!("service `{s}` has no subset `{pool}`"),
                        ))
                    }
                },
                None => {
                    let mut all: Vec<SocketAddr> = Vec::new();
                    for k in &svc.subsets {
                        all.extend(
                            k.endpoints
                                .iter()
                                .filter(|a| !all.contains(a))
                                .copied()
                                .collect::<Vec<_>>(),
                        );
                    }
                    all.into()
                }
            };
            idx.push(i);
            counts.push(Arc::new(super::link::LinkCounts::default()));
            elsewhere.push(eps);
            stats.push(Arc::new(RouteStats::new(
                &svc.name,
                &format!("link-{name}"),
                l.pool.as_deref().unwrap_or("elsewhere"),
            )));
        }
        links.push(Link {
            name,
            services: idx,
            initial: l.initial,
            trickle_ppm: match l.trickle_per_second {
                Some(_) => 0,
                None => {
                    (l.trickle_percent.unwrap_or(super::link::DEFAULT_TRICKLE_PERCENT) * 10_000.0).round()
                        as u32
                }
            },
            trickle_rate: l.trickle_per_second,
            trickle_gates: l
                .trickle_per_second
                .map(|r| {
                    l.services
                        .iter()
                        .map(|_| super::link::RateGate::per_second(r))
                        .collect()
                })
                .unwrap_or_default(),
            keep_paths: l.keep_paths.clone(),
            pool: l.pool.as_deref().map(Into::into),
            elsewhere,
            stats,
            counts,
            next: AtomicUsize::new(0),
            seq: std::sync::atomic::AtomicU64::new(0),
            keepalive: l.keepalive,
            active: l.active,
            preconnect: l.preconnect,
        });
    }
    let active = links.iter().filter(|l| l.initial == LinkState::Active).count();
    if !links.is_empty() && active != 1 {
        return Err(perr(
            "links",
            format!("exactly one link must be `initial = \"active\"` ({active} are)"),
        ));
    }
    Ok((links, of_service))
}

fn defined(c: &Colours) -> String {
    let mut names = vec![colour::BASE.to_owned()];
    names.extend(c.names());
    names.join(", ")
}

/// `[[colours]]` and `trusted_sources`.
fn compile_colours(raw: &RawPolicy) -> Result<Colours, PolicyError> {
    let mut colours = Colours::default();
    if raw.colours.len() > colour::MAX_COLOURS {
        return Err(perr("colours", format!("at most {}", colour::MAX_COLOURS)));
    }
    for (i, c) in raw.colours.iter().enumerate() {
        let f = format!("colours[{i}]");
        let name = check_name(&format!("{f}.name"), &c.name)?;
        if name.eq_ignore_ascii_case(colour::BASE) {
            return Err(perr(format!("{f}.name"), "`base` is the name of no colour"));
        }
        if colours.id(&name).is_some() {
            return Err(perr(
                format!("{f}.name"),
                format!("colour `{name}` is defined twice"),
            ));
        }
        if c.id == 0 || c.id > 255 {
            return Err(perr(format!("{f}.id"), "must be 1 to 255 (0 is base)"));
        }
        let id = c.id as ColourId;
        if colours.name(id) != colour::BASE {
            return Err(perr(
                format!("{f}.id"),
                format!("id {id} already belongs to colour `{}`", colours.name(id)),
            ));
        }
        colours.insert(id, &name, c.fallback);
    }
    if raw.trusted_sources.len() > colour::MAX_TRUSTED {
        return Err(perr(
            "trusted_sources",
            format!("at most {}", colour::MAX_TRUSTED),
        ));
    }
    for (i, t) in raw.trusted_sources.iter().enumerate() {
        let cidr = crate::config::Cidr::parse(t).map_err(|e| perr(format!("trusted_sources[{i}]"), e))?;
        colours.trusted.push(cidr);
    }
    Ok(colours)
}

/// `[[ingress]]`, after the services (rules name them).
fn compile_ingress(
    raw: &RawPolicy,
    services: &[Service],
    colours: &Colours,
) -> Result<Vec<Ingress>, PolicyError> {
    if raw.ingress.len() > colour::MAX_INGRESS {
        return Err(perr("ingress", format!("at most {}", colour::MAX_INGRESS)));
    }
    let mut out = Vec::new();
    for (i, r) in raw.ingress.iter().enumerate() {
        let f = format!("ingress[{i}]");
        let service = services
            .iter()
            .position(|s| *s.name == *r.service)
            .ok_or_else(|| perr(format!("{f}.service"), format!("no service `{}`", r.service)))?;
        let c = colours.id(&r.colour).filter(|&c| c != 0).ok_or_else(|| {
            perr(
                format!("{f}.colour"),
                format!(
                    "unknown colour `{}` (defined: {})",
                    r.colour,
                    colours.names().join(", ")
                ),
            )
        })?;
        let basis_points = match r.percent {
            None => None,
            Some(p) if p.is_finite() && (0.0..=100.0).contains(&p) => Some((p * 100.0).round() as u32),
            Some(p) => return Err(perr(format!("{f}.percent"), format!("{p} is not 0 to 100"))),
        };
        if r.hash_header.is_some() && basis_points.is_none() {
            return Err(perr(
                format!("{f}.hash_header"),
                "needs `percent` (the share of user keys to colour)",
            ));
        }
        if let Some(h) = &r.hash_header {
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(perr(
                    format!("{f}.hash_header"),
                    format!("`{h}` is not a header name"),
                ));
            }
        }
        if r.matches.is_none() && basis_points.is_none() {
            return Err(perr(
                &f,
                "a rule needs `percent`, `match` or both (it would colour every request)",
            ));
        }
        let matches = r.matches.clone().map(|mut m| {
            m.headers = m
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            m.host = m.host.map(|h| h.to_ascii_lowercase());
            m
        });
        out.push(Ingress {
            service,
            colour: c,
            basis_points,
            matches,
            hash_header: r.hash_header.clone(),
        });
    }
    Ok(out)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
    });
}

/// A uniform number in `0..n` (xorshift64*; per thread, no locks).
fn random_below(n: u64) -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((u128::from(r) * u128::from(n)) >> 64) as u64
    })
}

/// A split entry of `route` by weight among the subsets with endpoints of `colour`, and those
/// endpoints. The weights are the route's own when every subset has some.
fn pick_split<'a>(
    svc: &'a Service,
    route: &'a Route,
    colour: ColourId,
) -> Option<(&'a Split, &'a Arc<[SocketAddr]>)> {
    let total: u64 = route
        .split
        .iter()
        .filter(|s| svc.subsets[s.subset].of_colour(colour).is_some())
        .map(|s| u64::from(s.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut pick = random_below(total);
    for s in &route.split {
        if let Some(eps) = svc.subsets[s.subset].of_colour(colour) {
            let w = u64::from(s.weight);
            if pick < w {
                return Some((s, eps));
            }
            pick -= w;
        }
    }
    None
}

impl Policy {
    /// No services: every connection is opaque TCP to its original destination.
    pub fn empty() -> Self {
        compile(RawPolicy::default()).expect("the empty policy is valid")
    }

    pub fn raw(&self) -> &RawPolicy {
        &self.raw
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The services routed inside `connect()` and their tables.
    pub fn kernel_plan(&self) -> &Arc<KernelPlan> {
        &self.kernel
    }

    /// Per connection, before reading: relay untouched, or look at the bytes. A pod's inbound
    /// connections are parsed only when colours are defined (to strip, apply ingress rules and
    /// hand the colour to the app); they are never routed elsewhere.
    pub fn connection_for(&self, orig: SocketAddr, inbound: bool) -> ConnPlan {
        if inbound {
            return if self.colouring() || self.linked(orig) {
                ConnPlan::L7 {
                    hint: ProtocolHint::Auto,
                    detect_timeout: self.detect_timeout,
                }
            } else {
                ConnPlan::Opaque
            };
        }
        match self.connection(orig) {
            // An app calling a linked endpoint's address directly: the link decides here
            // (see [`Policy::link_outbound`]).
            ConnPlan::Opaque if self.linked(orig) => ConnPlan::L7 {
                hint: ProtocolHint::Auto,
                detect_timeout: self.detect_timeout,
            },
            p => p,
        }
    }

    /// Per connection, before reading: relay untouched, or look at the bytes.
    pub fn connection(&self, orig: SocketAddr) -> ConnPlan {
        match self.by_addr.get(&normalise(orig)) {
            Some(&i) => ConnPlan::L7 {
                hint: self.services[i].protocol,
                detect_timeout: self.detect_timeout,
            },
            None if !self.by_host.is_empty() => ConnPlan::L7 {
                hint: ProtocolHint::Auto,
                detect_timeout: self.detect_timeout,
            },
            None => ConnPlan::Opaque,
        }
    }

    /// The service a request belongs to: by original destination, else by name.
    fn service_for(&self, orig: SocketAddr, req: &RequestInfo<'_>) -> Option<&Service> {
        if let Some(&i) = self.by_addr.get(&normalise(orig)) {
            return Some(&self.services[i]);
        }
        let name = match req.protocol {
            ProtocolHint::Bolt | ProtocolHint::Dubbo => req.service.map(|s| s.to_ascii_lowercase().into()),
            _ => req.host.map(strip_port),
        }?;
        self.by_host.get(&*name).map(|&i| &self.services[i])
    }

    fn passthrough(&self, orig: SocketAddr) -> Decision {
        Decision {
            service: "passthrough".into(),
            route: "passthrough".into(),
            subset: "passthrough".into(),
            endpoint: orig,
            retry_endpoints: RetryOrder::default(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            retries: DEFAULT_RETRIES,
            stats: self.passthrough.clone(),
            colour: 0,
        }
    }

    /// Route one uncoloured (base) request that arrived on a connection to `orig`.
    #[cfg(test)]
    pub fn route(&self, orig: SocketAddr, req: &RequestInfo<'_>) -> Result<Decision, RouteError> {
        self.route_coloured(orig, req, 0)
    }

    /// Route one request of colour `colour` (0 = base). Closure: it goes only to endpoints of
    /// its colour, chosen by the route's weights among the subsets that have some. Without
    /// any, a `fallback = "base"` colour goes to base endpoints (counted) and a `fallback =
    /// "none"` colour is refused ([`RouteError::ColourUnavailable`]). A base request never
    /// reaches a coloured endpoint.
    pub fn route_coloured(
        &self,
        orig: SocketAddr,
        req: &RequestInfo<'_>,
        colour: ColourId,
    ) -> Result<Decision, RouteError> {
        let Some(svc) = self.service_for(orig, req) else {
            return Ok(self.passthrough(orig));
        };
        let Some(route) = svc.routes.iter().find(|r| r.matches.matches(req)) else {
            return Err(RouteError::NoRoute(svc.name.clone()));
        };
        let mut outcome = ColourOutcome::Routed;
        let picked = match pick_split(svc, route, colour) {
            Some(p) => Some(p),
            None if colour != 0 => match self.colours.fallback(colour) {
                Fallback::Base => {
                    outcome = ColourOutcome::FellBack;
                    pick_split(svc, route, 0)
                }
                Fallback::None => {
                    let name = self.colours.name(colour);
                    self.colour_stats
                        .routed(svc.index, colour, ColourOutcome::Unavailable);
                    return Err(RouteError::ColourUnavailable {
                        service: svc.name.clone(),
                        colour: name.into(),
                    });
                }
            },
            None => None,
        };
        let Some((split, endpoints)) = picked else {
            // Every subset of the route lacks endpoints of this colour (and of base).
            let subset = &svc.subsets[route.split[0].subset];
            return Err(RouteError::NoEndpoint {
                service: svc.name.clone(),
                subset: subset.name.clone(),
            });
        };
        if !self.colours.is_empty() {
            self.colour_stats.routed(svc.index, colour, outcome);
        }
        let subset = &svc.subsets[split.subset];
        let n = endpoints.len();
        let first = subset.next.fetch_add(1, Relaxed) % n;
        // The others from the next one on (the chosen one again when it is alone).
        let retry_endpoints = RetryOrder::rotation(endpoints, first + 1, (n - 1).max(1));
        Ok(Decision {
            service: svc.name.clone(),
            route: route.name.clone(),
            subset: subset.name.clone(),
            endpoint: endpoints[first],
            retry_endpoints,
            timeout: route.timeout,
            retries: route.retries,
            stats: split.stats.clone(),
            colour,
        })
    }

    /// Is `orig` an endpoint of a service in a link (its inbound requests may move)?
    fn linked(&self, orig: SocketAddr) -> bool {
        self.by_endpoint
            .get(&normalise(orig))
            .is_some_and(|s| self.link_of_service.contains_key(s))
    }

    /// Every endpoint address of the service with index `si` (a link's `services` entries).
    pub fn service_endpoints(&self, si: usize) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .by_endpoint
            .iter()
            .filter(|(_, &s)| s == si)
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v
    }

    /// The policy's links.
    pub fn links(&self) -> &[super::link::Link] {
        &self.links
    }

    /// Requests of linked services arriving here, by (service, link, outcome); zeros left out.
    pub fn link_counts(&self) -> Vec<super::link::LinkCount> {
        let mut out = Vec::new();
        for l in &self.links {
            for (k, &si) in l.services.iter().enumerate() {
                for o in super::link::LinkOutcome::ALL {
                    let n = l.counts[k].get(o);
                    if n > 0 {
                        out.push(super::link::LinkCount {
                            service: self.services[si].name.to_string(),
                            link: l.name.to_string(),
                            outcome: o.label(),
                            requests: n,
                        });
                    }
                }
            }
        }
        out
    }

    /// A request arriving at this node's endpoint `orig`: `None` delivers it to the local app
    /// (not linked, the link's local share, a keep path, or nowhere else to go); `Some` moves
    /// it to an endpoint elsewhere (`is_local` says which addresses are this node's), with the
    /// other endpoints elsewhere and finally the local app as retries. Counted per (service,
    /// link, outcome) in `rt`.
    pub fn link_route(
        &self,
        orig: SocketAddr,
        req: &RequestInfo<'_>,
        rt: &super::link::LinkRuntime,
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Option<Decision> {
        use super::link::LinkOutcome;
        let orig = normalise(orig);
        let si = *self.by_endpoint.get(&orig)?;
        let link = &self.links[*self.link_of_service.get(&si)?];
        let k = link.services.iter().position(|&x| x == si)?;
        let svc = &self.services[si];
        let count = |o| link.counts[k].add(o);
        if req
            .path
            .is_some_and(|p| link.keep_paths.iter().any(|k| p.starts_with(k.as_str())))
        {
            count(LinkOutcome::Kept);
            return None;
        }
        let share = rt
            .share(&link.name)
            .unwrap_or_else(|| link.resting_share(link.initial));
        // Deterministic: of every FULL requests exactly `share` stay, spread evenly, so a
        // trickle is exact over any window (not only on average).
        let n = link.seq.fetch_add(1, Relaxed);
        let (s, full) = (u128::from(share), u128::from(super::link::FULL));
        let stays = (u128::from(n) + 1) * s / full > u128::from(n) * s / full;
        // A rate trickle lets its requests per second stay on top of the share (a switch's
        // ramp only adds to it).
        if share >= super::link::FULL
            || stays
            || link
                .trickle_gates
                .get(k)
                .is_some_and(|g| g.admit(super::link::clock_ns()))
        {
            count(LinkOutcome::Local);
            return None;
        }
        let targets: Vec<SocketAddr> = link.elsewhere[k]
            .iter()
            .filter(|a| **a != orig && !is_local(a.ip()))
            .copied()
            .collect();
        if targets.is_empty() {
            count(LinkOutcome::NoElsewhere);
            return None;
        }
        count(LinkOutcome::Moved);
        let n = targets.len();
        let first = link.next.fetch_add(1, Relaxed) % n;
        let mut retry: Vec<SocketAddr> = (1..n).map(|j| targets[(first + j) % n]).collect();
        retry.push(orig);
        let route = &svc.routes[0];
        Some(Decision {
            service: svc.name.clone(),
            route: format!("link-{}", link.name).into(),
            subset: link.pool.clone().unwrap_or_else(|| "elsewhere".into()),
            endpoint: targets[first],
            retry_endpoints: retry.into(),
            timeout: route.timeout,
            retries: route.retries.max(1),
            stats: link.stats[k].clone(),
            colour: 0,
        })
    }

    /// An outbound decision `d` of an enrolled pod on this node: when the route picked an
    /// endpoint on this node (`is_local`) of a linked service, the link's local share, trickle
    /// and keep paths decide as on the inbound side (the proxy delivers such a request itself,
    /// so it never passes that side); moved requests go to the link's endpoints elsewhere.
    pub fn link_outbound(
        &self,
        d: Decision,
        req: &RequestInfo<'_>,
        rt: &super::link::LinkRuntime,
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Decision {
        if !is_local(d.endpoint.ip()) || !self.linked(d.endpoint) {
            return d;
        }
        match self.link_route(d.endpoint, req, rt, is_local) {
            Some(moved) => Decision {
                colour: d.colour,
                ..moved
            },
            None => d,
        }
    }

    /// The colour table of this policy.
    pub fn colours(&self) -> &Colours {
        &self.colours
    }

    pub fn colour_stats(&self) -> &ColourStats {
        &self.colour_stats
    }

    /// Does this policy colour anything? (Inbound connections are parsed only then.)
    pub fn colouring(&self) -> bool {
        !self.colours.is_empty()
    }

    /// A request's colour, first match wins: its own colour header (believed only from inside
    /// the mesh, else stripped), the kernel's propagation ledger, the source pod's colour, an
    /// ingress rule of the service it is for. `inbound` requests find their service by the
    /// endpoint they arrived at (`orig` is the pod's own address).
    pub fn choose_colour(
        &self,
        orig: SocketAddr,
        req: &RequestInfo<'_>,
        inputs: ColourInputs,
        inbound: bool,
    ) -> Choice {
        let mut choice = Choice::BASE;
        if self.colours.is_empty() {
            // Nothing is coloured: headers pass untouched.
            return choice;
        }
        if let Some(h) = colour::header_of(req.headers) {
            if !inputs.trusted {
                choice.stripped = true;
            } else {
                match self.colours.id(h.trim()) {
                    Some(c) => {
                        choice.colour = c;
                        choice.source = Source::Header;
                        return choice;
                    }
                    None => choice.invalid = true,
                }
            }
        }
        let known = |c: ColourId| c != 0 && self.colours.name(c) != colour::BASE;
        if let Some(c) = inputs.propagated.filter(|&c| known(c)) {
            choice.colour = c;
            choice.source = Source::Kernel;
            return choice;
        }
        if let Some(c) = inputs.pod.filter(|&c| known(c)) {
            choice.colour = c;
            choice.source = Source::Pod;
            return choice;
        }
        if !self.ingress.is_empty() {
            let svc = if inbound {
                self.by_endpoint.get(&normalise(orig)).copied()
            } else {
                self.service_for(orig, req)
                    .and_then(|s| self.services.iter().position(|x| std::ptr::eq(x, s)))
            };
            if let Some(si) = svc {
                if let Some(rule) = self
                    .ingress
                    .iter()
                    .find(|r| r.service == si && r.applies(req, || random_below(10_000) as u32))
                {
                    choice.colour = rule.colour;
                    choice.source = Source::Ingress;
                }
            }
        }
        choice
    }

    /// A request that arrived on a pod's inbound side: it goes to the pod's own app.
    pub fn deliver(&self, orig: SocketAddr) -> Decision {
        self.passthrough(orig)
    }

    /// Route a base opaque TCP connection (one decision for its whole life).
    #[cfg(test)]
    pub fn route_tcp(&self, orig: SocketAddr) -> Result<Decision, RouteError> {
        self.route(orig, &RequestInfo::bare(ProtocolHint::Tcp))
    }

    /// Every route's counters (passthrough last).
    pub fn stats(&self) -> Vec<Arc<RouteStats>> {
        let mut out: Vec<Arc<RouteStats>> = self
            .services
            .iter()
            .flat_map(|s| {
                s.routes
                    .iter()
                    .flat_map(|r| r.split.iter().map(|p| p.stats.clone()))
            })
            .collect();
        out.push(self.passthrough.clone());
        out
    }

    /// Take over the counters of `old` for every (service, route, subset) that still exists.
    pub(super) fn adopt_stats(&mut self, old: &Policy) {
        let old_stats: HashMap<(String, String, String), Arc<RouteStats>> = old
            .stats()
            .into_iter()
            .map(|s| ((s.service.clone(), s.route.clone(), s.subset.clone()), s))
            .collect();
        for s in self.stats() {
            if let Some(o) = old_stats.get(&(s.service.clone(), s.route.clone(), s.subset.clone())) {
                s.absorb(o);
            }
        }
        self.colour_stats.absorb(&old.colour_stats);
        for l in &self.links {
            let Some(ol) = old.links.iter().find(|x| x.name == l.name) else {
                continue;
            };
            for (k, &si) in l.services.iter().enumerate() {
                let name = &self.services[si].name;
                if let Some(ok) = ol.services.iter().position(|&x| old.services[x].name == *name) {
                    l.counts[k].absorb(&ol.counts[ok]);
                }
            }
        }
    }

    /// The live policy for `sockmesh routes`: what was written, each subset's endpoints, and
    /// every route's counters.
    pub fn view(&self) -> PolicyView {
        PolicyView {
            generation: self.generation,
            detect_timeout_ms: self.detect_timeout.as_millis() as u64,
            services: self
                .services
                .iter()
                .map(|s| ServiceView {
                    name: s.name.to_string(),
                    protocol: s.protocol,
                    mode: s.mode,
                    kernel: s.kernel_note.clone(),
                    endpoint_colours: s
                        .subsets
                        .iter()
                        .flat_map(|k| k.by_colour.iter())
                        .filter(|(c, _)| *c != 0)
                        .flat_map(|(c, eps)| {
                            eps.iter()
                                .map(|e| (e.to_string(), self.colours.name(*c).to_owned()))
                        })
                        .collect(),
                    subsets: s
                        .subsets
                        .iter()
                        .map(|k| {
                            (
                                k.name.to_string(),
                                k.endpoints.iter().map(|a| a.to_string()).collect(),
                            )
                        })
                        .collect(),
                    routes: s
                        .routes
                        .iter()
                        .map(|r| RouteView {
                            name: r.name.to_string(),
                            matches: r.matches.clone(),
                            timeout_ms: r.timeout.as_millis() as u64,
                            retries: r.retries,
                            split: r
                                .split
                                .iter()
                                .map(|p| SplitView {
                                    subset: s.subsets[p.subset].name.to_string(),
                                    weight: p.weight,
                                    stats: p.stats.view(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            passthrough: self.passthrough.view(),
            colours: self
                .raw
                .colours
                .iter()
                .map(|c| ColourView {
                    name: c.name.clone(),
                    id: c.id,
                    fallback: c.fallback,
                })
                .collect(),
            colour_stats: self.colour_stats.view(),
            policy: self.raw.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    pub generation: u64,
    pub detect_timeout_ms: u64,
    pub services: Vec<ServiceView>,
    pub passthrough: RouteStatsView,
    pub colours: Vec<ColourView>,
    pub colour_stats: ColourStatsView,
    /// The policy as written, ready to edit and apply again.
    pub policy: RawPolicy,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColourView {
    pub name: String,
    pub id: u32,
    pub fallback: Fallback,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub protocol: ProtocolHint,
    pub mode: ServiceMode,
    /// Whether the kernel routes it, or why not.
    pub kernel: String,
    /// Coloured endpoints' colours (base endpoints are not listed).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_colours: BTreeMap<String, String>,
    pub subsets: BTreeMap<String, Vec<String>>,
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RawMatch,
    pub timeout_ms: u64,
    pub retries: u32,
    pub split: Vec<SplitView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitView {
    pub subset: String,
    pub weight: u32,
    pub stats: RouteStatsView,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{HeaderLookup, Outcome, Router};

    const ORDERS: &str = r#"
        [[services]]
        name = "orders"
        addresses = ["10.96.0.10:8080"]
        hosts = ["orders.default.svc"]
        endpoints = [
          { address = "10.0.1.1:8080", labels = { version = "v1" } },
          { address = "10.0.1.2:8080", labels = { version = "v1" } },
          { address = "10.0.2.1:8080", labels = { version = "v2" } },
        ]
        subsets = [
          { name = "v1", labels = { version = "v1" } },
          { name = "v2", labels = { version = "v2" } },
        ]
        [[services.routes]]
        name = "canary"
        match = { headers = { X-Canary = "true" } }
        split = [{ subset = "v2", weight = 1 }]
        timeout_ms = 250
        retries = 3
        [[services.routes]]
        name = "pay"
        match = { service = "com.example.Pay", method = "charge" }
        split = [{ subset = "v2", weight = 1 }]
        [[services.routes]]
        split = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
    "#;

    struct Headers(&'static [(&'static str, &'static str)]);

    impl HeaderLookup for Headers {
        fn header(&self, name: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
    }

    fn policy(text: &str) -> Policy {
        compile(parse_toml(text).unwrap()).unwrap()
    }

    fn error(text: &str) -> PolicyError {
        compile(parse_toml(text).unwrap()).unwrap_err()
    }

    fn vip() -> SocketAddr {
        "10.96.0.10:8080".parse().unwrap()
    }

    #[test]
    fn weighted_split_is_within_a_point_over_20000_requests() {
        let p = policy(ORDERS);
        let mut v2 = 0;
        for _ in 0..20_000 {
            let d = p.route(vip(), &RequestInfo::bare(ProtocolHint::Http1)).unwrap();
            assert_eq!(&*d.route, "default");
            if &*d.subset == "v2" {
                assert_eq!(d.endpoint, "10.0.2.1:8080".parse().unwrap());
                v2 += 1;
            }
        }
        let share = f64::from(v2) / 200.0;
        assert!((9.0..=11.0).contains(&share), "v2 got {share}%");
    }

    #[test]
    fn endpoints_of_a_subset_take_turns_and_retries_use_the_others() {
        let p = policy(ORDERS);
        let headers = Headers(&[]);
        let req = RequestInfo {
            headers: &headers,
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let d = p.route(vip(), &req).unwrap();
            if &*d.subset == "v1" {
                seen.insert(d.endpoint);
                assert_ne!(d.endpoint_for_attempt(1), d.endpoint, "a retry goes elsewhere");
            }
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn header_match_overrides_the_split_case_insensitively() {
        let p = policy(ORDERS);
        let headers = Headers(&[("x-canary", "true")]);
        let req = RequestInfo {
            headers: &headers,
            ..RequestInfo::bare(ProtocolHint::Http2)
        };
        for _ in 0..100 {
            let d = p.route(vip(), &req).unwrap();
            assert_eq!((&*d.route, &*d.subset), ("canary", "v2"));
            assert_eq!(d.timeout, Duration::from_millis(250));
            assert_eq!(d.retries, 3);
            // Alone in its subset: retries go to the same endpoint again.
            assert_eq!(d.endpoint_for_attempt(2), d.endpoint);
        }
        let wrong = Headers(&[("x-canary", "TRUE")]);
        let req = RequestInfo {
            headers: &wrong,
            ..RequestInfo::bare(ProtocolHint::Http2)
        };
        assert_eq!(
            &*p.route(vip(), &req).unwrap().route,
            "default",
            "values are exact"
        );
    }

    #[test]
    fn rpc_service_and_method_match() {
        let p = policy(ORDERS);
        let req = RequestInfo {
            service: Some("com.example.Pay"),
            method: Some("charge"),
            ..RequestInfo::bare(ProtocolHint::Bolt)
        };
        assert_eq!(&*p.route(vip(), &req).unwrap().route, "pay");
        let other = RequestInfo {
            method: Some("refund"),
            ..req
        };
        assert_eq!(&*p.route(vip(), &other).unwrap().route, "default");
    }

    #[test]
    fn services_are_found_by_address_v4_mapped_address_or_host() {
        let p = policy(ORDERS);
        assert!(matches!(
            p.connection(vip()),
            ConnPlan::L7 {
                hint: ProtocolHint::Auto,
                ..
            }
        ));
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:8080".parse().unwrap();
        assert_eq!(
            &*p.route(mapped, &RequestInfo::bare(ProtocolHint::Tcp))
                .unwrap()
                .service,
            "orders"
        );
        // Another address: sniffed, because a service is known by host name.
        let other: SocketAddr = "10.0.9.9:80".parse().unwrap();
        assert!(matches!(p.connection(other), ConnPlan::L7 { .. }));
        let by_host = RequestInfo {
            host: Some("Orders.Default.Svc:8080"),
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        assert_eq!(&*p.route(other, &by_host).unwrap().service, "orders");
        let unknown = RequestInfo {
            host: Some("example.com"),
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        let d = p.route(other, &unknown).unwrap();
        assert_eq!((&*d.service, d.endpoint), ("passthrough", other));
        // Without host names nothing else is even looked at.
        let addr_only = policy(&ORDERS.replace(r#"hosts = ["orders.default.svc"]"#, ""));
        assert_eq!(addr_only.connection(other), ConnPlan::Opaque);
        assert_eq!(Policy::empty().connection(vip()), ConnPlan::Opaque);
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let text = ORDERS.replace(
            "split = [{ subset = \"v1\", weight = 90 }, { subset = \"v2\", weight = 10 }]",
            "match = { path_prefix = \"/api\" }\n        split = [{ subset = \"v1\", weight = 1 }]",
        );
        let p = policy(&text);
        let e = p.route_tcp(vip()).unwrap_err();
        assert_eq!(e.reason(), "no_route");
        let api = RequestInfo {
            path: Some("/api/orders"),
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        assert_eq!(&*p.route(vip(), &api).unwrap().subset, "v1");
    }

    #[test]
    fn defaults_without_subsets_or_routes() {
        let p = policy(
            r#"
            [[services]]
            name = "db"
            addresses = ["10.96.0.20:5432"]
            protocol = "tcp"
            endpoints = [{ address = "10.0.3.1:5432" }]
            "#,
        );
        assert!(matches!(
            p.connection("10.96.0.20:5432".parse().unwrap()),
            ConnPlan::L7 {
                hint: ProtocolHint::Tcp,
                ..
            }
        ));
        let d = p.route_tcp("10.96.0.20:5432".parse().unwrap()).unwrap();
        assert_eq!((&*d.route, &*d.subset), ("default", "all"));
        assert_eq!(d.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(d.retries, DEFAULT_RETRIES);
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (r#"name = "orders""#, r#"name = "or ders""#, "services[0].name"),
            (
                r#""10.96.0.10:8080""#,
                r#""10.96.0.10""#,
                "services[0].addresses[0]",
            ),
            (
                r#"{ subset = "v1", weight = 90 }"#,
                r#"{ subset = "v3", weight = 90 }"#,
                "services[0].routes[2].split[0].subset",
            ),
            (
                r#"labels = { version = "v2" } }"#,
                r#"labels = { version = "v9" } }"#,
                "services[0].subsets[1].labels",
            ),
            (
                "timeout_ms = 250",
                "timeout_ms = 0",
                "services[0].routes[0].timeout_ms",
            ),
            ("retries = 3", "retries = 99", "services[0].routes[0].retries"),
            (
                "weight = 1 }]\n        timeout_ms",
                "weight = 0 }]\n        timeout_ms",
                "services[0].routes[0].split",
            ),
            (
                r#"address = "10.0.1.2:8080""#,
                r#"address = "10.0.1.1:8080""#,
                "services[0].endpoints[1].address",
            ),
            (
                r#"X-Canary = "true""#,
                r#""X Canary" = "true""#,
                "services[0].routes[0].match.headers",
            ),
        ];
        for (from, to, field) in cases {
            assert!(ORDERS.contains(from), "{from}");
            let e = error(&ORDERS.replacen(from, to, 1));
            assert_eq!(e.field, *field, "{from} -> {to}: {e}");
        }
        let twice = format!(
            "{ORDERS}\n{}",
            ORDERS.replace("name = \"orders\"", "name = \"orders2\"")
        );
        let e = error(&twice);
        assert_eq!(e.field, "services[1].addresses[0]");
        assert!(e.reason.contains("orders"), "{e}");
        let e = parse_toml("[[services]]\nname = \"x\"\nbogus = 1").unwrap_err();
        assert_eq!(e.field, "policy line 3 column 1", "{e}");
        assert_eq!(error("detect_timeout_ms = 0").field, "detect_timeout_ms");
    }

    #[test]
    fn replacing_keeps_counters_of_routes_that_stay_and_bumps_the_generation() {
        let router = Router::new(policy(ORDERS));
        let d = router.current().route_tcp(vip()).unwrap();
        d.stats.record(Outcome::Answered, Duration::from_millis(1));
        let old = router.current();
        router.replace(policy(&ORDERS.replace("weight = 90", "weight = 0")));
        let now = router.current();
        assert_eq!(now.generation(), 1);
        let carried: u64 = now
            .stats()
            .iter()
            .filter(|s| s.route == "default")
            .map(|s| s.requests.load(Relaxed))
            .sum();
        assert_eq!(carried, 1);
        // Requests in flight on the old policy still count somewhere; the old Arc stays valid.
        assert_eq!(old.generation(), 0);
        for _ in 0..100 {
            assert_eq!(&*now.route_tcp(vip()).unwrap().subset, "v2");
        }
        let view = serde_json::to_value(now.view()).unwrap();
        assert_eq!(view["services"][0]["routes"][2]["split"][0]["weight"], 0);
        assert_eq!(view["services"][0]["routes"][2]["split"][1]["weight"], 10);
        assert_eq!(view["policy"]["services"][0]["name"], "orders");
    }

    const COLOURED: &str = r#"
        trusted_sources = ["10.244.0.0/16"]
        [[colours]]
        name = "gray"
        id = 1
        [[colours]]
        name = "stress"
        id = 2
        fallback = "none"
        [[services]]
        name = "mid"
        addresses = ["10.96.0.10:8080"]
        endpoints = [
          { address = "10.0.1.1:8080", labels = { version = "v1" } },
          { address = "10.0.1.2:8080", labels = { version = "v1", colour = "gray" } },
          { address = "10.0.2.1:8080", labels = { version = "v2" } },
          { address = "10.0.2.2:8080", labels = { version = "v2", colour = "gray" } },
          { address = "10.0.3.1:8080", labels = { version = "v1", colour = "stress" } },
        ]
        subsets = [
          { name = "v1", labels = { version = "v1" } },
          { name = "v2", labels = { version = "v2" } },
        ]
        [[services.routes]]
        split = [{ subset = "v1", weight = 80 }, { subset = "v2", weight = 20 }]
        [[services]]
        name = "leaf"
        addresses = ["10.96.0.11:8080"]
        endpoints = [
          { address = "10.0.4.1:8080" },
          { address = "10.0.4.2:8080", labels = { colour = "gray" } },
        ]
        [[ingress]]
        service = "mid"
        colour = "gray"
        match = { headers = { x-group = "beta" } }
        [[ingress]]
        service = "mid"
        colour = "gray"
        percent = 25
        hash_header = "x-user"
    "#;

    fn endpoint_colour(a: SocketAddr) -> &'static str {
        match a.to_string().as_str() {
            "10.0.1.2:8080" | "10.0.2.2:8080" | "10.0.4.2:8080" => "gray",
            "10.0.3.1:8080" => "stress",
            _ => "base",
        }
    }

    #[test]
    fn each_colour_reaches_only_its_own_endpoints_and_splits_still_apply() {
        let p = policy(COLOURED);
        let req = RequestInfo::bare(ProtocolHint::Http1);
        let gray = p.colours().id("gray").unwrap();
        let mut v2 = [0u32; 2];
        for (colour, name) in [(0, "base"), (gray, "gray")] {
            for _ in 0..4000 {
                let d = p.route_coloured(vip(), &req, colour).unwrap();
                assert_eq!(endpoint_colour(d.endpoint), name, "{d:?}");
                for r in d.retry_endpoints.iter() {
                    assert_eq!(endpoint_colour(r), name, "retry {r}");
                }
                if &*d.subset == "v2" {
                    v2[usize::from(colour)] += 1;
                }
            }
        }
        for n in v2 {
            assert!((600..1000).contains(&n), "v2 share within the colour: {n}/4000");
        }
        let stress = p.colours().id("stress").unwrap();
        // Stress exists only in v1: the whole route's traffic goes there.
        for _ in 0..100 {
            let d = p.route_coloured(vip(), &req, stress).unwrap();
            assert_eq!(d.endpoint, "10.0.3.1:8080".parse().unwrap());
        }
    }

    #[test]
    fn fallback_base_serves_from_base_and_fallback_none_refuses() {
        let p = policy(COLOURED);
        let req = RequestInfo::bare(ProtocolHint::Http1);
        let leaf: SocketAddr = "10.96.0.11:8080".parse().unwrap();
        let stress = p.colours().id("stress").unwrap();
        let e = p.route_coloured(leaf, &req, stress).unwrap_err();
        assert_eq!(e.reason(), "colour_unavailable");
        assert!(e.to_string().contains("stress"), "{e}");
        let raw = COLOURED.replace("fallback = \"none\"", "fallback = \"base\"");
        let p2 = policy(&raw);
        let d = p2.route_coloured(leaf, &req, stress).unwrap();
        assert_eq!(d.endpoint, "10.0.4.1:8080".parse().unwrap());
        let v = p2.colour_stats().view();
        let c = v
            .per_service
            .iter()
            .find(|c| c.service == "leaf" && c.colour == "stress")
            .unwrap();
        assert_eq!((c.requests, c.fallbacks, c.unavailable), (1, 1, 0));
        let v = p.colour_stats().view();
        let c = v
            .per_service
            .iter()
            .find(|c| c.service == "leaf" && c.colour == "stress")
            .unwrap();
        assert_eq!((c.requests, c.unavailable), (1, 1));
    }

    #[test]
    fn a_base_request_never_reaches_a_coloured_endpoint_even_when_only_those_exist() {
        let raw = r#"
            [[colours]]
            name = "gray"
            id = 1
            [[services]]
            name = "s"
            addresses = ["10.96.0.10:8080"]
            endpoints = [{ address = "10.0.1.2:8080", labels = { colour = "gray" } }]
        "#;
        let p = policy(raw);
        let e = p
            .route(vip(), &RequestInfo::bare(ProtocolHint::Http1))
            .unwrap_err();
        assert_eq!(e.reason(), "no_endpoint");
    }

    #[test]
    fn colour_sources_in_order_and_trust() {
        let p = policy(COLOURED);
        let gray = p.colours().id("gray").unwrap();
        let stress = p.colours().id("stress").unwrap();
        let req = |h: &'static Headers| RequestInfo {
            headers: h,
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        let trusted = ColourInputs {
            trusted: true,
            propagated: Some(gray),
            pod: Some(gray),
        };
        static H_STRESS: Headers = Headers(&[("X-Mesh-Colour", "stress")]);
        static H_GARBAGE: Headers = Headers(&[("x-mesh-colour", "\u{1}purple; drop table")]);
        static H_NONE: Headers = Headers(&[]);
        let c = p.choose_colour(vip(), &req(&H_STRESS), trusted, false);
        assert_eq!((c.colour, c.source), (stress, Source::Header));
        // From outside the mesh the header is stripped and the next source decides.
        let outside = ColourInputs {
            trusted: false,
            ..trusted
        };
        let c = p.choose_colour(vip(), &req(&H_STRESS), outside, false);
        assert_eq!((c.colour, c.source, c.stripped), (gray, Source::Kernel, true));
        // Garbage is ignored (counted), not fatal.
        let c = p.choose_colour(vip(), &req(&H_GARBAGE), trusted, false);
        assert_eq!((c.colour, c.source, c.invalid), (gray, Source::Kernel, true));
        let pod_only = ColourInputs {
            trusted: true,
            propagated: None,
            pod: Some(gray),
        };
        let c = p.choose_colour(vip(), &req(&H_NONE), pod_only, false);
        assert_eq!((c.colour, c.source), (gray, Source::Pod));
        // An id the policy no longer defines is base.
        let stale = ColourInputs {
            trusted: true,
            propagated: Some(9),
            pod: None,
        };
        let c = p.choose_colour(vip(), &req(&H_NONE), stale, false);
        assert_eq!(c, Choice::BASE);
        assert!(p.colours().trusts("10.244.7.1".parse().unwrap()));
        assert!(!p.colours().trusts("10.245.7.1".parse().unwrap()));
    }

    #[test]
    fn ingress_rules_match_headers_or_hash_a_user_key() {
        let p = policy(COLOURED);
        let gray = p.colours().id("gray").unwrap();
        let none = ColourInputs {
            trusted: true,
            propagated: None,
            pod: None,
        };
        static BETA: Headers = Headers(&[("X-Group", "beta")]);
        let req = RequestInfo {
            headers: &BETA,
            ..RequestInfo::bare(ProtocolHint::Http1)
        };
        let c = p.choose_colour(vip(), &req, none, false);
        assert_eq!((c.colour, c.source), (gray, Source::Ingress));
        // Inbound: the service is found by the endpoint the request arrived at.
        let c = p.choose_colour("10.0.1.1:8080".parse().unwrap(), &req, none, true);
        assert_eq!((c.colour, c.source), (gray, Source::Ingress));
        // Not the leaf's endpoints: no rule names the leaf.
        let c = p.choose_colour("10.0.4.1:8080".parse().unwrap(), &req, none, true);
        assert_eq!(c, Choice::BASE);
        // 25 % of user keys, and always the same ones.
        let mut coloured = 0;
        for u in 0..2000 {
            let key: &'static str = Box::leak(format!("user-{u}").into_boxed_str());
            let h: &'static Headers = Box::leak(Box::new(Headers(Box::leak(Box::new([("x-user", key)])))));
            let r = RequestInfo {
                headers: h,
                ..RequestInfo::bare(ProtocolHint::Http1)
            };
            let first = p.choose_colour(vip(), &r, none, false);
            for _ in 0..3 {
                assert_eq!(p.choose_colour(vip(), &r, none, false), first, "{key}");
            }
            coloured += usize::from(first.colour == gray);
        }
        assert!((400..600).contains(&coloured), "{coloured}/2000 users coloured");
        // No key: the hashed rule does not apply.
        let c = p.choose_colour(vip(), &RequestInfo::bare(ProtocolHint::Http1), none, false);
        assert_eq!(c, Choice::BASE);
    }

    #[test]
    fn bad_colour_policies_name_the_field() {
        let cases = [
            (
                COLOURED.replace("colour = \"gray\" }", "colour = \"grey\" }"),
                "services[0].endpoints[1].labels.colour",
            ),
            (COLOURED.replace("id = 2", "id = 1"), "colours[1].id"),
            (COLOURED.replace("id = 2", "id = 0"), "colours[1].id"),
            (COLOURED.replace("id = 2", "id = 256"), "colours[1].id"),
            (
                COLOURED.replace("name = \"stress\"", "name = \"gray\""),
                "colours[1].name",
            ),
            (
                COLOURED.replace("name = \"stress\"", "name = \"base\""),
                "colours[1].name",
            ),
            (
                COLOURED.replace("percent = 25", "percent = 250"),
                "ingress[1].percent",
            ),
            (
                COLOURED.replace("percent = 25", "percent = -1"),
                "ingress[1].percent",
            ),
            (COLOURED.replace("percent = 25\n", ""), "ingress[1].hash_header"),
            (
                COLOURED.replace(
                    "service = \"mid\"\n        colour = \"gray\"\n        match",
                    "service = \"nope\"\n        colour = \"gray\"\n        match",
                ),
                "ingress[0].service",
            ),
            (
                COLOURED.replace(
                    "colour = \"gray\"\n        percent",
                    "colour = \"purple\"\n        percent",
                ),
                "ingress[1].colour",
            ),
            (
                COLOURED.replace("10.244.0.0/16", "10.244.0.0/40"),
                "trusted_sources[0]",
            ),
        ];
        for (text, field) in cases {
            let e = compile(parse_toml(&text).unwrap()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let e = parse_toml(&COLOURED.replace("fallback = \"none\"", "fallback = \"maybe\"")).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
    }

    #[test]
    fn colour_counters_survive_a_policy_swap() {
        let router = Router::new(policy(COLOURED));
        let gray = router.current().colours().id("gray").unwrap();
        router
            .current()
            .route_coloured(vip(), &RequestInfo::bare(ProtocolHint::Http1), gray)
            .unwrap();
        router.replace(policy(COLOURED));
        let v = router.current().colour_stats().view();
        let c = v.per_service.iter().find(|c| c.colour == "gray").unwrap();
        assert_eq!(c.requests, 1);
    }
}
