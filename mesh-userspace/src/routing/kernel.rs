//! Which services the kernel routes at `connect()` (`mode = "kernel"`), and the table the
//! daemon writes for them into `SM_SVC` / `SM_SVC_EP` (`mesh_common::service`).
//!
//! A service qualifies when nothing about it needs to read a byte or to act after the connect:
//! opaque TCP (`protocol = "tcp"`), found by VIP:port (`addresses`, no `hosts`), one catch-all
//! route (its split is the whole decision), no `timeout_ms`/`retries` (the kernel neither times
//! out nor retries), no colours (colour choice needs the proxy), no ingress rule, and endpoints
//! of the VIP's address family (the destination is rewritten in place). Its table must fit:
//! at most [`SVC_MAX_ENDPOINTS`] (subset, endpoint) entries, [`SVC_SLOTS`] kernel services and
//! [`SVC_KEYS_MAX`] VIPs. A `mode = "kernel"` service that does not qualify is refused, naming
//! the field; every other service says in `sockmesh routes` whether it could.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_common::service::{SVC_KEYS_MAX, SVC_MAX_ENDPOINTS, SVC_SLOTS};
use serde::{Deserialize, Serialize};

use super::{colour, policy::RawPolicy, ProtocolHint};

/// Bounds of `health_check_ms`.
pub const MIN_HEALTH_MS: u64 = 100;
pub const MAX_HEALTH_MS: u64 = 60_000;

/// `mode` of a `[[services]]` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    /// Every connection goes through the daemon's proxy (the default).
    #[default]
    Proxy,
    /// Routed inside `connect()` by the kernel, straight to an endpoint.
    Kernel,
}

impl ServiceMode {
    pub fn is_proxy(&self) -> bool {
        *self == Self::Proxy
    }
}

/// One (subset, endpoint) entry of a kernel-routed service, in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub subset: Arc<str>,
    pub endpoint: SocketAddr,
    /// The subset's weight shared among its endpoints, scaled by 2^32 (only ratios matter).
    pub weight: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    pub name: Arc<str>,
    /// `health_check_ms`: probe the endpoints this often.
    pub health_interval: Option<Duration>,
    /// Slot in the kernel tables (kernel services in policy order).
    pub slot: u32,
    pub addresses: Vec<SocketAddr>,
    pub entries: Vec<KernelEntry>,
}

/// Every kernel-routed service of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPlan {
    pub services: Vec<KernelService>,
}

/// What the compile step knows of a service when it decides.
pub(super) struct ServiceFacts<'a> {
    pub field: &'a str,
    pub index: usize,
    pub addresses: &'a [SocketAddr],
    /// (subset name, its endpoints) in subset order.
    pub subsets: Vec<(Arc<str>, Vec<SocketAddr>)>,
    /// Routes: (is catch-all, split as (subset index, weight)).
    pub routes: Vec<(bool, Vec<(usize, u32)>)>,
}

/// Why a service cannot be routed in the kernel: (field, reason). `Ok` holds its entries.
pub(super) fn check(raw: &RawPolicy, f: &ServiceFacts<'_>) -> Result<Vec<KernelEntry>, (String, String)> {
    let s = &raw.services[f.index];
    let field = f.field;
    let no = |suffix: &str, reason: String| Err((format!("{field}{suffix}"), reason));
    if let Some(ms) = s.health_check_ms {
        if !(MIN_HEALTH_MS..=MAX_HEALTH_MS).contains(&ms) {
            return no(
                ".health_check_ms",
                format!("must be {MIN_HEALTH_MS} to {MAX_HEALTH_MS} ms"),
            );
        }
    }
    if s.protocol != ProtocolHint::Tcp {
        return no(
            ".protocol",
            format!(
                "the kernel routes opaque TCP only (protocol = \"tcp\"); {:?} needs the proxy",
                s.protocol
            )
            .to_ascii_lowercase(),
        );
    }
    if s.addresses.is_empty() {
        return no(".addresses", "the kernel finds a service by VIP:port only".into());
    }
    if !s.hosts.is_empty() {
        return no(".hosts", "routing by host name needs the proxy".into());
    }
    if s.timeout_ms.is_some() {
        return no(".timeout_ms", "the kernel path has no request timeout".into());
    }
    if s.retries.is_some() {
        return no(".retries", "the kernel path does not retry".into());
    }
    for (ei, e) in s.endpoints.iter().enumerate() {
        if e.labels.contains_key(colour::LABEL) {
            return no(
                &format!(".endpoints[{ei}].labels.{}", colour::LABEL),
                "colours need the proxy".into(),
            );
        }
    }
    if raw.ingress.iter().any(|g| g.service == s.name) {
        return no(
            "",
            "an [[ingress]] rule colours this service: colours need the proxy".into(),
        );
    }
    if f.routes.len() != 1 || !f.routes[0].0 {
        let ri = f.routes.iter().position(|(catch_all, _)| !catch_all).unwrap_or(1);
        return no(
            &format!(".routes[{ri}]"),
            "the kernel routes by one catch-all route; per-request matches need the proxy".into(),
        );
    }
    if let Some(r) = s.routes.first() {
        if r.timeout_ms.is_some() || r.retries.is_some() {
            return no(
                ".routes[0]",
                "the kernel path neither times out nor retries".into(),
            );
        }
    }
    let v4 = f.addresses.iter().map(|a| a.is_ipv4()).collect::<Vec<_>>();
    if v4.iter().any(|x| *x != v4[0]) {
        return no(
            ".addresses",
            "mixes IPv4 and IPv6 VIPs; the kernel path needs one family".into(),
        );
    }
    let mut entries = Vec::new();
    for (sub, weight) in &f.routes[0].1 {
        let (sname, eps) = &f.subsets[*sub];
        for ep in eps {
            if ep.is_ipv4() != v4[0] {
                let ei = s
                    .endpoints
                    .iter()
                    .position(|e| super::policy::normalise_str(&e.address) == Some(*ep))
                    .unwrap_or(0);
                return no(
                    &format!(".endpoints[{ei}].address"),
                    "an endpoint of another address family than the VIP (the kernel rewrites the \
                     destination in place)"
                        .into(),
                );
            }
            entries.push(KernelEntry {
                subset: sname.clone(),
                endpoint: *ep,
                weight: (u64::from(*weight) << 32) / eps.len() as u64,
            });
        }
    }
    if entries.len() > SVC_MAX_ENDPOINTS as usize {
        return no(
            ".routes[0].split",
            format!(
                "{} (subset, endpoint) entries; the kernel table holds at most {SVC_MAX_ENDPOINTS} per \
                 service (SVC_MAX_ENDPOINTS)",
                entries.len()
            ),
        );
    }
    Ok(entries)
}

/// The whole plan must fit the maps.
pub(super) fn check_plan(plan: &KernelPlan) -> Result<(), (String, String)> {
    if plan.services.len() > SVC_SLOTS as usize {
        return Err((
            "services".into(),
            format!(
                "{} services with mode = \"kernel\"; the kernel table holds at most {SVC_SLOTS} (SVC_SLOTS)",
                plan.services.len()
            ),
        ));
    }
    let keys: usize = plan.services.iter().map(|s| s.addresses.len()).sum();
    if keys > SVC_KEYS_MAX as usize {
        return Err((
            "services".into(),
            format!(
                "{keys} addresses of kernel-routed services; the kernel table holds at most \
                 {SVC_KEYS_MAX} (SVC_KEYS_MAX)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::routing::{compile, parse_toml, Policy, PolicyError};

    fn kernel_service(extra: &str, eps: &str, split: &str) -> String {
        format!(
            r#"
            [[services]]
            name = "db"
            addresses = ["10.96.0.20:5432"]
            protocol = "tcp"
            mode = "kernel"
            {extra}
            endpoints = [{eps}]
            subsets = [
              {{ name = "v1", labels = {{ version = "v1" }} }},
              {{ name = "v2", labels = {{ version = "v2" }} }},
            ]
            [[services.routes]]
            split = [{split}]
            "#
        )
    }

    const EPS: &str = r#"{ address = "10.0.1.1:5432", labels = { version = "v1" } },
        { address = "10.0.1.2:5432", labels = { version = "v1" } },
        { address = "10.0.2.1:5432", labels = { version = "v2" } }"#;
    const SPLIT: &str = r#"{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }"#;

    fn ok(text: &str) -> Policy {
        compile(parse_toml(text).unwrap()).unwrap()
    }

    fn refused(text: &str) -> PolicyError {
        compile(parse_toml(text).unwrap()).unwrap_err()
    }

    #[test]
    fn a_weighted_tcp_service_compiles_to_entries_with_the_subset_weight_shared() {
        let p = ok(&kernel_service("", EPS, SPLIT));
        let plan = p.kernel_plan();
        assert_eq!(plan.services.len(), 1);
        let s = &plan.services[0];
        assert_eq!((&*s.name, s.slot), ("db", 0));
        assert_eq!(s.addresses, vec!["10.96.0.20:5432".parse().unwrap()]);
        let got: Vec<(String, String)> = s
            .entries
            .iter()
            .map(|e| (e.subset.to_string(), e.endpoint.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("v1", "10.0.1.1:5432"),
                ("v1", "10.0.1.2:5432"),
                ("v2", "10.0.2.1:5432")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        // v1's 90 is shared by its two endpoints: 45 / 45 / 10.
        let w: Vec<u64> = s.entries.iter().map(|e| e.weight).collect();
        assert_eq!(w[0], w[1]);
        assert_eq!(w[0] * 2, w[2] * 9);
        let v = serde_json::to_value(p.view()).unwrap();
        assert_eq!(v["services"][0]["mode"], "kernel");
        assert!(v["services"][0]["kernel"].as_str().unwrap().starts_with("kernel"));
    }

    #[test]
    fn a_kernel_service_that_needs_the_proxy_is_refused_naming_the_field() {
        let cases = [
            (
                kernel_service("", EPS, SPLIT).replace("protocol = \"tcp\"", "protocol = \"http1\""),
                "services[0].protocol",
            ),
            (kernel_service("retries = 2", EPS, SPLIT), "services[0].retries"),
            (kernel_service("timeout_ms = 5", EPS, SPLIT), "services[0].timeout_ms"),
            (
                kernel_service("hosts = [\"db.svc\"]", EPS, SPLIT),
                "services[0].hosts",
            ),
            (
                kernel_service("", &EPS.replace("version = \"v2\" }", "version = \"v2\", colour = \"gray\" }"), SPLIT)
                    + "\n[[colours]]\nname = \"gray\"\nid = 1\n",
                "services[0].endpoints[2].labels.colour",
            ),
            (
                kernel_service("", EPS, SPLIT)
                    + "\n[[services.routes]]\nname = \"x\"\nmatch = { path_prefix = \"/\" }\nsplit = [{ subset = \"v1\", weight = 1 }]\n",
                "services[0].routes[1]",
            ),
            (
                kernel_service("", &EPS.replace("10.0.2.1:5432", "[fd00::1]:5432"), SPLIT),
                "services[0].endpoints[2].address",
            ),
            (kernel_service("health_check_ms = 5", EPS, SPLIT), "services[0].health_check_ms"),
        ];
        for (text, field) in cases {
            let e = refused(&text);
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains("mode = \"kernel\""), "{e}");
        }
    }

    #[test]
    fn a_table_that_does_not_fit_is_refused_naming_the_limit() {
        let eps: Vec<String> = (0..33)
            .map(|i| format!("{{ address = \"10.0.3.{i}:5432\", labels = {{ version = \"v1\" }} }}"))
            .collect();
        let e = refused(&kernel_service("", &(eps.join(",") + "," + EPS), SPLIT));
        assert_eq!(e.field, "services[0].routes[0].split");
        assert!(e.reason.contains("SVC_MAX_ENDPOINTS"), "{e}");
        // Too many kernel services.
        let many: String = (0..=mesh_common::service::SVC_SLOTS)
            .map(|i| {
                format!(
                    "[[services]]\nname = \"s{i}\"\naddresses = [\"10.97.{}.{}:80\"]\nprotocol = \"tcp\"\nmode = \"kernel\"\nendpoints = [{{ address = \"10.0.0.1:80\" }}]\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        let e = refused(&many);
        assert_eq!(e.field, "services");
        assert!(e.reason.contains("SVC_SLOTS"), "{e}");
    }

    #[test]
    fn proxy_services_say_whether_they_could_be_routed_in_the_kernel() {
        let p = ok(&(kernel_service("", EPS, SPLIT).replace("mode = \"kernel\"", "")
            + r#"
            [[services]]
            name = "web"
            addresses = ["10.96.0.30:80"]
            protocol = "http1"
            endpoints = [{ address = "10.0.5.1:80" }]
            "#));
        assert!(p.kernel_plan().services.is_empty());
        let v = serde_json::to_value(p.view()).unwrap();
        assert_eq!(v["services"][0]["mode"], "proxy");
        assert_eq!(
            v["services"][0]["kernel"],
            "proxy (qualifies for mode = \"kernel\")"
        );
        assert!(
            v["services"][1]["kernel"]
                .as_str()
                .unwrap()
                .starts_with("proxy (services[1].protocol:"),
            "{}",
            v["services"][1]["kernel"]
        );
        // Health checks are for kernel services only.
        let e =
            refused(&kernel_service("health_check_ms = 500", EPS, SPLIT).replace("mode = \"kernel\"", ""));
        assert_eq!(e.field, "services[0].health_check_ms");
        let hp = ok(&kernel_service("health_check_ms = 500", EPS, SPLIT));
        assert_eq!(
            hp.kernel_plan().services[0].health_interval,
            Some(std::time::Duration::from_millis(500))
        );
        // `mode` round-trips (and stays out of files that never set it).
        let raw = p.raw().clone();
        let text = toml::to_string(&raw).unwrap();
        assert!(!text.contains("mode"));
    }
}
