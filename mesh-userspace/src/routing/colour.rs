//! Traffic colours: gray releases and stress tests whose requests stay inside their group.
//!
//! ```toml
//! trusted_sources = ["10.244.0.0/16"]     # other mesh nodes' pod ranges (until mTLS exists)
//!
//! [[colours]]
//! name = "gray"
//! id = 1                                   # 1..=255, what the kernel maps carry
//! fallback = "base"                        # no gray endpoint: serve from base (counted)
//! [[colours]]
//! name = "stress"
//! id = 2
//! fallback = "none"                        # never reaches a base endpoint: clear error instead
//!
//! [[ingress]]                              # colour uncoloured requests entering a service
//! service = "entry"
//! colour = "gray"
//! percent = 10                             # alone: 10 % at random
//! # match = { headers = { x-user-group = "beta" } }   # or: requests matching this
//! # hash_header = "x-user-id"              # with percent: the same user always lands alike
//! ```
//!
//! An endpoint's colour is its `colour` label (no label: base). A request's colour comes from,
//! first match wins: the `x-mesh-colour` header / Bolt header or requestProps / Dubbo
//! attachment when the request comes from inside the mesh; the kernel's propagation ledger;
//! the source pod's colour; an ingress rule. The policy routes it only to endpoints of its
//! colour ([`super::Policy::route_coloured`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use serde::{Deserialize, Serialize};

use super::{policy::RawMatch, HeaderLookup, RequestInfo};

/// The header (HTTP, gRPC metadata), Bolt header / requestProps key and Dubbo attachment that
/// carries a request's colour between proxies.
pub const COLOUR_HEADER: &str = "x-mesh-colour";
/// The endpoint label that holds its colour.
pub const LABEL: &str = "colour";
/// The name of "no colour" in headers, metrics and `status`.
pub const BASE: &str = "base";
pub const MAX_COLOURS: usize = 64;
pub const MAX_INGRESS: usize = 256;
pub const MAX_TRUSTED: usize = 256;

/// A colour's id as the kernel maps carry it; 0 is base.
pub type ColourId = u8;

/// What happens to a coloured request when the chosen subsets have no endpoint of its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Serve it from base endpoints (counted as a fallback): gray releases.
    Base,
    /// Refuse it with a clear error (counted): stress tests must never reach base.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColour {
    pub name: String,
    pub id: u32,
    #[serde(default = "fallback_base")]
    pub fallback: Fallback,
}

fn fallback_base() -> Fallback {
    Fallback::Base
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    pub service: String,
    pub colour: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RawMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
}

// `percent` is validated finite, so equality is total in practice.
impl Eq for RawIngress {}

/// One compiled ingress rule.
#[derive(Debug)]
pub(super) struct Ingress {
    pub service: usize,
    pub colour: ColourId,
    /// Out of 10 000 (percent × 100); `None` = every request the match lets through.
    pub basis_points: Option<u32>,
    pub matches: Option<RawMatch>,
    pub hash_header: Option<String>,
}

impl Ingress {
    /// Does this rule colour `req`? `roll` gives a uniform number below 10 000.
    pub fn applies(&self, req: &RequestInfo<'_>, roll: impl FnOnce() -> u32) -> bool {
        if let Some(m) = &self.matches {
            if !m.matches(req) {
                return false;
            }
        }
        let Some(bp) = self.basis_points else {
            return true;
        };
        let bucket = match &self.hash_header {
            Some(h) => match req.headers.header(h) {
                Some(v) => (fnv1a(v.as_bytes()) % 10_000) as u32,
                // No key to hash: the rule cannot place this request.
                None => return false,
            },
            None => roll(),
        };
        bucket < bp
    }
}

/// FNV-1a, 64 bit: stable across daemons and restarts, so a user key lands alike everywhere.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The compiled colour table.
#[derive(Debug, Default)]
pub struct Colours {
    /// id → (name, fallback); index 0 is base.
    by_id: BTreeMap<ColourId, (String, Fallback)>,
    by_name: HashMap<String, ColourId>,
    pub(super) trusted: Vec<crate::config::Cidr>,
}

impl Colours {
    pub(super) fn insert(&mut self, id: ColourId, name: &str, fallback: Fallback) {
        self.by_id.insert(id, (name.to_owned(), fallback));
        self.by_name.insert(name.to_ascii_lowercase(), id);
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The id of a colour name (`base` is 0), case-insensitive.
    pub fn id(&self, name: &str) -> Option<ColourId> {
        if name.eq_ignore_ascii_case(BASE) {
            return Some(0);
        }
        self.by_name.get(&name.to_ascii_lowercase()).copied()
    }

    /// A colour's name (`base` for 0 and for ids no longer defined).
    pub fn name(&self, id: ColourId) -> &str {
        self.by_id.get(&id).map_or(BASE, |(n, _)| n.as_str())
    }

    pub fn fallback(&self, id: ColourId) -> Fallback {
        self.by_id.get(&id).map_or(Fallback::Base, |(_, f)| *f)
    }

    /// Is `ip` in `trusted_sources`?
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    pub fn names(&self) -> Vec<String> {
        self.by_id.values().map(|(n, _)| n.clone()).collect()
    }
}

/// Where a request's colour came from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Uncoloured: base.
    None,
    /// The request's own `x-mesh-colour` (from inside the mesh).
    Header,
    /// The kernel's propagation ledger (an app that does not forward headers).
    Kernel,
    /// The source pod's colour.
    Pod,
    /// An ingress rule of the service.
    Ingress,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Header => "header",
            Self::Kernel => "kernel",
            Self::Pod => "pod",
            Self::Ingress => "ingress",
        }
    }
}

/// What the handler knows besides the request itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ColourInputs {
    /// The request came from inside the mesh: an enrolled pod (outbound, or inbound from a
    /// local pod's address) or a `trusted_sources` address. Otherwise its colour header is
    /// stripped.
    pub trusted: bool,
    /// The colour the kernel ledger recorded for the bytes this request starts at.
    pub propagated: Option<ColourId>,
    /// The source pod's colour (outbound only).
    pub pod: Option<ColourId>,
}

/// A request's colour and how it was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub colour: ColourId,
    pub source: Source,
    /// A colour header arrived from outside the mesh and was dropped.
    pub stripped: bool,
    /// A colour header from inside the mesh named no colour; it was ignored.
    pub invalid: bool,
}

impl Choice {
    pub const BASE: Choice = Choice {
        colour: 0,
        source: Source::None,
        stripped: false,
        invalid: false,
    };
}

/// Colour counters, shown by `sockmesh routes`/`status` and on `/metrics`. Lock-free: one
/// cell of atomics per (service, colour) laid out at compile time, so counting a request costs
/// a few relaxed increments.
#[derive(Debug, Default)]
pub struct ColourStats {
    /// Service names, in policy order.
    services: Vec<String>,
    /// Colour names by position (0 = base), and each colour id's position.
    colours: Vec<String>,
    position: Vec<(ColourId, usize)>,
    /// `services.len() × colours.len()` cells of (requests, fallbacks to base, refused).
    cells: Vec<[AtomicU64; 3]>,
    /// Requests by [`Source`] (in its declaration order).
    per_source: [AtomicU64; 5],
    /// Colour headers dropped because the request came from outside the mesh.
    pub stripped: AtomicU64,
    /// Colour headers from inside the mesh that named no colour.
    pub invalid: AtomicU64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ColourCount {
    pub service: String,
    pub colour: String,
    pub requests: u64,
    pub fallbacks: u64,
    pub unavailable: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct ColourStatsView {
    /// Only (service, colour) pairs that saw a request.
    pub per_service: Vec<ColourCount>,
    pub by_source: BTreeMap<String, u64>,
    pub stripped: u64,
    pub invalid: u64,
}

/// What happened to a routed coloured request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColourOutcome {
    Routed,
    FellBack,
    Unavailable,
}

const SOURCES: [Source; 5] = [
    Source::None,
    Source::Header,
    Source::Kernel,
    Source::Pod,
    Source::Ingress,
];

impl ColourStats {
    pub(super) fn new(services: Vec<String>, colours: &Colours) -> Self {
        let mut names = vec![BASE.to_owned()];
        let mut position = vec![(0, 0)];
        for (id, (name, _)) in &colours.by_id {
            position.push((*id, names.len()));
            names.push(name.clone());
        }
        let cells = (0..services.len() * names.len())
            .map(|_| Default::default())
            .collect();
        Self {
            services,
            colours: names,
            position,
            cells,
            ..Self::default()
        }
    }

    fn cell(&self, service: usize, colour: ColourId) -> Option<&[AtomicU64; 3]> {
        let pos = self.position.iter().find(|(c, _)| *c == colour)?.1;
        self.cells.get(service * self.colours.len() + pos)
    }

    pub fn chosen(&self, c: &Choice) {
        if c.stripped {
            self.stripped.fetch_add(1, Relaxed);
        }
        if c.invalid {
            self.invalid.fetch_add(1, Relaxed);
        }
        let i = SOURCES.iter().position(|s| *s == c.source).unwrap_or(0);
        self.per_source[i].fetch_add(1, Relaxed);
    }

    /// Count one request of `colour` routed to service number `service` (policy order).
    pub fn routed(&self, service: usize, colour: ColourId, outcome: ColourOutcome) {
        let Some(cell) = self.cell(service, colour) else {
            return;
        };
        cell[0].fetch_add(1, Relaxed);
        match outcome {
            ColourOutcome::Routed => {}
            ColourOutcome::FellBack => {
                cell[1].fetch_add(1, Relaxed);
            }
            ColourOutcome::Unavailable => {
                cell[2].fetch_add(1, Relaxed);
            }
        }
    }

    /// Take over another table's counts for every (service, colour) both have by name (a
    /// policy swap keeps what Prometheus scrapes).
    pub fn absorb(&self, old: &ColourStats) {
        for (si, service) in self.services.iter().enumerate() {
            let Some(osi) = old.services.iter().position(|s| s == service) else {
                continue;
            };
            for (ci, colour) in self.colours.iter().enumerate() {
                let Some(oci) = old.colours.iter().position(|c| c == colour) else {
                    continue;
                };
                let (new, prev) = (
                    &self.cells[si * self.colours.len() + ci],
                    &old.cells[osi * old.colours.len() + oci],
                );
                for k in 0..3 {
                    new[k].fetch_add(prev[k].load(Relaxed), Relaxed);
                }
            }
        }
        for (n, o) in self.per_source.iter().zip(&old.per_source) {
            n.fetch_add(o.load(Relaxed), Relaxed);
        }
        self.stripped.fetch_add(old.stripped.load(Relaxed), Relaxed);
        self.invalid.fetch_add(old.invalid.load(Relaxed), Relaxed);
    }

    pub fn view(&self) -> ColourStatsView {
        let mut per_service = Vec::new();
        for (si, service) in self.services.iter().enumerate() {
            for (ci, colour) in self.colours.iter().enumerate() {
                let c = &self.cells[si * self.colours.len() + ci];
                let requests = c[0].load(Relaxed);
                if requests == 0 {
                    continue;
                }
                per_service.push(ColourCount {
                    service: service.clone(),
                    colour: colour.clone(),
                    requests,
                    fallbacks: c[1].load(Relaxed),
                    unavailable: c[2].load(Relaxed),
                });
            }
        }
        ColourStatsView {
            per_service,
            by_source: SOURCES
                .iter()
                .zip(&self.per_source)
                .map(|(s, n)| (s.label().to_owned(), n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            stripped: self.stripped.load(Relaxed),
            invalid: self.invalid.load(Relaxed),
        }
    }
}

/// The colour header of a request, if any (first value).
pub fn header_of(headers: &dyn HeaderLookup) -> Option<&str> {
    headers.header(COLOUR_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        // Known FNV-1a 64 vectors: a user key must hash the same on every node and release.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
