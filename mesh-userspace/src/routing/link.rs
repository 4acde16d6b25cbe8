//! Active / keep-alive dual links: two application chains deployed in the same pods, one
//! serving, the other kept warm at a trickle of its traffic and about 1 % of its resources.
//!
//! ```toml
//! [[links]]
//! name = "trade"
//! services = ["checkout", "cart"]          # services of the policy; a service is in one link
//! initial = "active"                       # active | keepalive: the state before any switch
//! trickle_percent = 1.0                    # keep-alive: share still delivered to the local app
//!                                          # (or trickle_per_second = 5.0: a rate per service)
//! keep_paths = ["/health", "/registry"]    # HTTP path prefixes never moved (health, registry)
//! pool = "pool"                            # optional: a subset (in every service of the link)
//!                                          # that takes the moved traffic; default: the
//!                                          # service's endpoints that are not on this node
//! keepalive = { cpu_percent = 1.0, weight = 1, memory_high = 67108864 }
//! active = { weight = 100 }                # no cpu_percent / memory_high: unlimited ("max")
//! ```
//!
//! Per node, each link has a *local share*: the part of the requests for its services arriving
//! at this node's pods that the local app serves (active: all; keep-alive: the trickle; while
//! switching: a step of the ramp). The rest is *moved* to the active endpoints of the same
//! service elsewhere ([`super::Policy::link_route`]). The share lives in [`LinkRuntime`], owned
//! by the daemon and kept across policy swaps, so counters and a switch in progress survive
//! `routes apply`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, RwLock,
    },
};

use serde::{Deserialize, Serialize};

use super::RouteStats;

pub const MAX_LINKS: usize = 16;
pub const MAX_KEEP_PATHS: usize = 32;
/// Shares are in parts per million.
pub const FULL: u32 = 1_000_000;

/// A link's state on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Active,
    Keepalive,
    Switching,
}

impl LinkState {
    pub fn label(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Keepalive => "keepalive",
            Self::Switching => "switching",
        }
    }
}

/// CPU and memory of a link's cgroups in one state. `None` = no limit ("max").
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    /// Hard cap in percent of one CPU (`cpu.max` / `cpu.cfs_quota_us` over a 100 ms period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Share under contention, cgroup v2 scale 1..=10000 (v1: converted to `cpu.shares`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Bytes: v2 `memory.high`, v1 `memory.soft_limit_in_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high: Option<u64>,
}

impl Eq for RawResources {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLink {
    pub name: String,
    pub services: Vec<String>,
    #[serde(default = "keepalive")]
    pub initial: LinkState,
    /// Keep-alive: the share of requests still delivered to the local app (default 1 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trickle_percent: Option<f64>,
    /// Keep-alive: instead of a share, this many requests per second per service still
    /// delivered to the local app (whatever the traffic: a quiet night keeps the same warmth
    /// as a peak). Excludes `trickle_percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trickle_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default = "keepalive_resources")]
    pub keepalive: RawResources,
    #[serde(default)]
    pub active: RawResources,
    /// At most this many upstream HTTP/1.1 connections per (pod, endpoint) opened when a
    /// switch starts, before traffic moves (sized from the demand now, see `HttpPools::h1_demand`); 0: none.
    #[serde(default = "default_preconnect")]
    pub preconnect: u32,
}

/// Most upstream connections a switch pre-connects per (pod, endpoint).
pub const MAX_PRECONNECT: u32 = 256;

fn default_preconnect() -> u32 {
    64
}

// Floats are validated finite.
impl Eq for RawLink {}

fn keepalive() -> LinkState {
    LinkState::Keepalive
}

/// The trickle share when neither `trickle_percent` nor `trickle_per_second` is given.
pub const DEFAULT_TRICKLE_PERCENT: f64 = 1.0;
/// The highest `trickle_per_second` (above it, a share says it better).
pub const MAX_TRICKLE_PER_SECOND: f64 = 100_000.0;

fn keepalive_resources() -> RawResources {
    RawResources {
        cpu_percent: Some(1.0),
        weight: Some(1),
        memory_high: None,
    }
}

/// One compiled link.
#[derive(Debug)]
pub struct Link {
    pub name: Arc<str>,
    /// Indexes into the policy's services.
    pub services: Vec<usize>,
    pub initial: LinkState,
    /// The resting keep-alive share (0 with a rate trickle).
    pub trickle_ppm: u32,
    /// A rate trickle: per service of the link (same order), a gate letting that many
    /// requests per second stay local whatever the share says.
    pub trickle_rate: Option<f64>,
    pub(super) trickle_gates: Vec<RateGate>,
    pub keep_paths: Vec<String>,
    pub pool: Option<Arc<str>>,
    /// Per service of the link (same order): where moved requests may go (the pool subset's
    /// endpoints, or all the service's endpoints; local ones are skipped per request).
    pub(super) elsewhere: Vec<Arc<[SocketAddr]>>,
    pub(super) stats: Vec<Arc<RouteStats>>,
    /// Per service of the link: requests by [`LinkOutcome`] (carried over policy swaps).
    pub(super) counts: Vec<Arc<LinkCounts>>,
    pub(super) next: AtomicUsize,
    /// Requests of the link that asked for a local-or-moved decision (the trickle's clock).
    pub(super) seq: std::sync::atomic::AtomicU64,
    pub keepalive: RawResources,
    pub active: RawResources,
    pub preconnect: u32,
}

impl Link {
    /// The local share of a link in `state` with no switch in progress.
    pub fn resting_share(&self, state: LinkState) -> u32 {
        match state {
            LinkState::Active => FULL,
            _ => self.trickle_ppm,
        }
    }

    /// Where the moved requests of the link's `k`-th service may go (local ones are skipped
    /// per request).
    pub fn elsewhere(&self, k: usize) -> &[SocketAddr] {
        &self.elsewhere[k]
    }
}

/// Lets one request through every `interval` on average, without drift and with a burst of
/// at most two after a quiet spell (a generic cell rate algorithm: one atomic, no lock).
#[derive(Debug)]
pub struct RateGate {
    interval_ns: u64,
    /// The earliest time (ns on [`clock_ns`]'s scale) the next request may pass.
    next: AtomicU64,
}

impl RateGate {
    pub fn per_second(rate: f64) -> Self {
        Self {
            interval_ns: (1e9 / rate).round().max(1.0) as u64,
            next: AtomicU64::new(0),
        }
    }

    /// Whether a request at `now_ns` passes (and, if so, takes its slot).
    pub fn admit(&self, now_ns: u64) -> bool {
        let mut next = self.next.load(Relaxed);
        loop {
            if next > now_ns {
                return false;
            }
            // Slots missed by less than one interval are kept (no drift below the rate);
            // older ones are not banked.
            let base = next.max(now_ns.saturating_sub(self.interval_ns));
            match self
                .next
                .compare_exchange_weak(next, base + self.interval_ns, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(n) => next = n,
            }
        }
    }
}

/// Monotonic nanoseconds since the first call (the rate gates' clock).
pub fn clock_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// What happened to one request of a linked service arriving at this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkOutcome {
    /// Served by the local app (its share: all when active, the trickle in keep-alive).
    Local,
    /// Sent to an endpoint elsewhere.
    Moved,
    /// A keep path (health, registry): always local.
    Kept,
    /// Should have moved, but no endpoint elsewhere: served locally.
    NoElsewhere,
}

/// Requests by outcome, one cell per [`LinkOutcome`]: no lock or allocation per request.
#[derive(Debug, Default)]
pub struct LinkCounts([AtomicU64; 4]);

impl LinkCounts {
    pub fn add(&self, o: LinkOutcome) {
        self.0[o as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, o: LinkOutcome) -> u64 {
        self.0[o as usize].load(Relaxed)
    }

    /// Take over an old policy's counts (a policy swap keeps what Prometheus scrapes).
    pub fn absorb(&self, old: &LinkCounts) {
        for o in LinkOutcome::ALL {
            self.0[o as usize].fetch_add(old.get(o), Relaxed);
        }
    }
}

impl LinkOutcome {
    pub const ALL: [LinkOutcome; 4] = [Self::Local, Self::Moved, Self::Kept, Self::NoElsewhere];

    pub fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Moved => "moved",
            Self::Kept => "kept",
            Self::NoElsewhere => "no_elsewhere",
        }
    }
}

/// The node's link shares: outlive policy swaps and are shared with the switch engine
/// ([`crate::links`]).
#[derive(Debug, Default)]
pub struct LinkRuntime {
    /// Link name → local share (ppm). A link not listed rests in its policy's `initial` state.
    shares: RwLock<HashMap<String, u32>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LinkCount {
    pub service: String,
    pub link: String,
    pub outcome: &'static str,
    pub requests: u64,
}

impl LinkRuntime {
    pub fn share(&self, link: &str) -> Option<u32> {
        self.shares.read().expect("link shares lock").get(link).copied()
    }

    pub fn set_share(&self, link: &str, ppm: u32) {
        self.shares
            .write()
            .expect("link shares lock")
            .insert(link.to_owned(), ppm.min(FULL));
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::routing::{compile, parse_toml, ProtocolHint, RequestInfo};

    const POLICY: &str = r#"
        [[services]]
        name = "checkout"
        addresses = ["10.96.0.1:80"]
        endpoints = [
          { address = "10.0.0.1:8001" },
          { address = "10.0.9.1:8001", labels = { pool = "yes" } },
        ]
        subsets = [{ name = "all" }, { name = "pool", labels = { pool = "yes" } }]
        [[services]]
        name = "game"
        addresses = ["10.96.0.2:80"]
        endpoints = [{ address = "10.0.0.1:8002" }, { address = "10.0.9.1:8002", labels = { pool = "yes" } }]
        subsets = [{ name = "all" }, { name = "pool", labels = { pool = "yes" } }]
        [[links]]
        name = "trade"
        services = ["checkout"]
        initial = "active"
        pool = "pool"
        [[links]]
        name = "forest"
        services = ["game"]
        trickle_percent = 10
        keep_paths = ["/health"]
        pool = "pool"
    "#;

    fn local(ip: IpAddr) -> bool {
        ip == IpAddr::from([10, 0, 0, 1])
    }

    fn get(path: &str) -> RequestInfo<'_> {
        RequestInfo {
            path: Some(path),
            ..RequestInfo::bare(ProtocolHint::Http1)
        }
    }

    #[test]
    fn keepalive_moves_all_but_the_trickle_and_keep_paths() {
        let p = compile(parse_toml(POLICY).unwrap()).unwrap();
        let rt = LinkRuntime::default();
        let trade: SocketAddr = "10.0.0.1:8001".parse().unwrap();
        let forest: SocketAddr = "10.0.0.1:8002".parse().unwrap();
        let mut moved = 0;
        for _ in 0..20_000 {
            // Active link: always local.
            assert!(p.link_route(trade, &get("/buy"), &rt, local).is_none());
            if let Some(d) = p.link_route(forest, &get("/play"), &rt, local) {
                assert_eq!(d.endpoint, "10.0.9.1:8002".parse().unwrap());
                // The local app is the last resort of retries.
                assert_eq!(*d.retry_endpoints.last().unwrap(), forest);
                moved += 1;
            }
            assert!(p.link_route(forest, &get("/health/live"), &rt, local).is_none());
        }
        // Exact, not only on average.
        assert_eq!(20_000 - moved, 2000, "trickle at 10 %");
        // A switch in progress sets the shares.
        rt.set_share("trade", 0);
        rt.set_share("forest", FULL);
        assert!(p.link_route(trade, &get("/buy"), &rt, local).is_some());
        assert!(p.link_route(forest, &get("/play"), &rt, local).is_none());
        let counts = p.link_counts();
        let n = |o: &str| {
            counts
                .iter()
                .filter(|c| c.outcome == o && c.link == "forest")
                .map(|c| c.requests)
                .sum::<u64>()
        };
        assert_eq!(n("kept"), 20_000);
        assert_eq!(n("moved"), moved);
    }

    #[test]
    fn outbound_requests_to_a_local_keepalive_endpoint_follow_the_share() {
        // The default route spreads over subset `all`: the local endpoint and the pool's.
        let p = compile(parse_toml(POLICY).unwrap()).unwrap();
        let rt = LinkRuntime::default();
        let local_game: SocketAddr = "10.0.0.1:8002".parse().unwrap();
        let vip: SocketAddr = "10.96.0.2:80".parse().unwrap();
        let (mut here, mut moved, mut n) = (0, 0, 0);
        for _ in 0..2000 {
            let d = p.route_coloured(vip, &get("/play"), 0).unwrap();
            let picked_local = d.endpoint == local_game;
            let d = p.link_outbound(d, &get("/play"), &rt, local);
            if picked_local {
                n += 1;
                if d.endpoint == local_game {
                    here += 1;
                } else {
                    assert_eq!(d.endpoint, "10.0.9.1:8002".parse().unwrap());
                    assert_eq!(&*d.route, "link-forest");
                    moved += 1;
                }
            } else {
                // Elsewhere already: untouched.
                assert_eq!(d.endpoint, "10.0.9.1:8002".parse().unwrap());
            }
        }
        // Keep paths stay on the local endpoint.
        for _ in 0..10 {
            let h = p.route_coloured(vip, &get("/health"), 0).unwrap();
            if h.endpoint == local_game {
                assert_eq!(
                    p.link_outbound(h, &get("/health"), &rt, local).endpoint,
                    local_game
                );
            }
        }
        assert!(n > 500, "the route picked the local endpoint {n} times");
        // The trickle (10 %) of those that picked the local endpoint, exactly as inbound.
        let share = f64::from(here) / f64::from(n);
        assert!((0.08..=0.12).contains(&share), "{here}/{n} stayed");
        assert_eq!(here + moved, n);
        // The active link: nothing moves.
        let trade = p
            .route_coloured("10.96.0.1:80".parse().unwrap(), &get("/buy"), 0)
            .unwrap();
        let e = trade.endpoint;
        assert_eq!(p.link_outbound(trade, &get("/buy"), &rt, local).endpoint, e);
    }

    fn err_of(text: &str) -> String {
        compile(parse_toml(text).unwrap()).unwrap_err().field
    }

    #[test]
    fn a_rate_gate_passes_its_rate_without_drift_or_a_banked_burst() {
        let g = RateGate::per_second(20.0); // one per 50 ms
                                            // Offered at 200/s for 10 s: 200 pass (the first at t = 0), whatever the phase.
        let passed = (0..2000u64).filter(|i| g.admit(i * 5_000_000)).count();
        assert_eq!(passed, 200);
        // Quiet for a minute, then a burst: at most two pass at once (no banked minute).
        let t = 70_000_000_000;
        let burst = (0..100).filter(|_| g.admit(t)).count();
        assert!((1..=2).contains(&burst), "{burst} passed in a burst");
        // Offered slower than the rate: everything passes.
        let g = RateGate::per_second(20.0);
        assert!((0..100u64).all(|i| g.admit(i * 100_000_000)));
    }

    #[test]
    fn a_rate_trickle_keeps_its_requests_per_second_local_whatever_the_traffic() {
        let p =
            compile(parse_toml(&POLICY.replace("trickle_percent = 10", "trickle_per_second = 50")).unwrap())
                .unwrap();
        let rt = LinkRuntime::default();
        let forest: SocketAddr = "10.0.0.1:8002".parse().unwrap();
        let l = &p.links()[1];
        assert_eq!((l.trickle_ppm, l.trickle_rate), (0, Some(50.0)));
        // Requests as fast as they come: the gate lets the first one or two stay, then one
        // per 20 ms of the time that passed (the arithmetic is tested on a fake clock above).
        let start = std::time::Instant::now();
        let here = (0..20_000)
            .filter(|_| p.link_route(forest, &get("/play"), &rt, local).is_none())
            .count() as f64;
        let most = 2.0 + (start.elapsed().as_secs_f64() * 50.0).ceil();
        assert!(
            here >= 1.0 && here <= most,
            "{here} stayed local (at most {most})"
        );
        // Active: everything is local, the gate does not matter.
        rt.set_share("forest", FULL);
        assert!((0..1000).all(|_| p.link_route(forest, &get("/play"), &rt, local).is_none()));
    }

    #[test]
    fn counters_survive_a_policy_swap() {
        let router = crate::routing::Router::new(compile(parse_toml(POLICY).unwrap()).unwrap());
        let rt = LinkRuntime::default();
        let forest: SocketAddr = "10.0.0.1:8002".parse().unwrap();
        for _ in 0..10 {
            router.current().link_route(forest, &get("/health"), &rt, local);
        }
        router.replace(compile(parse_toml(POLICY).unwrap()).unwrap());
        router.current().link_route(forest, &get("/health"), &rt, local);
        let c = router.current().link_counts();
        assert_eq!((c[0].outcome, c[0].requests), ("kept", 11), "{c:?}");
    }

    #[test]
    fn without_an_endpoint_elsewhere_the_request_stays_local() {
        let p = compile(parse_toml(POLICY).unwrap()).unwrap();
        let rt = LinkRuntime::default();
        rt.set_share("forest", 0);
        let forest: SocketAddr = "10.0.0.1:8002".parse().unwrap();
        // Everything is "local": nowhere to move to.
        assert!(p.link_route(forest, &get("/play"), &rt, |_| true).is_none());
        assert_eq!(p.link_counts()[0].outcome, "no_elsewhere");
    }

    #[test]
    fn invalid_links_name_the_field() {
        let field = |extra: &str| {
            let text = POLICY.replace(
                "pool = \"pool\"\n        [[links]]",
                &format!("pool = \"pool\"\n{extra}\n        [[links]]"),
            );
            compile(parse_toml(&text).unwrap()).unwrap_err().field
        };
        assert_eq!(field("trickle_percent = 101.0"), "links[0].trickle_percent");
        assert_eq!(field("trickle_per_second = 0.0"), "links[0].trickle_per_second");
        assert_eq!(field("trickle_per_second = 1e9"), "links[0].trickle_per_second");
        assert_eq!(
            err_of(&POLICY.replace(
                "trickle_percent = 10",
                "trickle_percent = 10\ntrickle_per_second = 5"
            )),
            "links[1].trickle_per_second",
            "a share and a rate at once"
        );
        assert_eq!(field("keep_paths = [\"health\"]"), "links[0].keep_paths[0]");
        assert_eq!(field("keepalive = { weight = 0 }"), "links[0].keepalive.weight");
        assert_eq!(field("preconnect = 257"), "links[0].preconnect");
        assert_eq!(
            field("active = { cpu_percent = -1.0 }"),
            "links[0].active.cpu_percent"
        );
        let err = |text: &str| compile(parse_toml(text).unwrap()).unwrap_err().field;
        assert_eq!(
            err(&POLICY.replace("services = [\"game\"]", "services = [\"nope\"]")),
            "links[1].services[0]"
        );
        assert_eq!(
            err(&POLICY.replace("services = [\"game\"]", "services = [\"checkout\"]")),
            "links[1].services[0]"
        );
        assert_eq!(
            err(&POLICY.replace("name = \"forest\"", "name = \"trade\"")),
            "links[1].name"
        );
        assert_eq!(
            err(&POLICY.replace("trickle_percent = 10", "initial = \"active\"")),
            "links"
        );
        assert_eq!(err(&POLICY.replace("initial = \"active\"", "")), "links");
        assert_eq!(
            err(&POLICY.replace(
                "keep_paths = [\"/health\"]\n        pool = \"pool\"",
                "pool = \"nope\""
            )),
            "links[1].pool"
        );
    }
}
