//! The routing model: services, endpoints with labels, subsets selected by labels, routes with
//! matches, weighted splits, per-route timeouts and retries.
//!
//! A [`Policy`] is immutable once compiled; the [`Router`] holds the live one behind a lock and
//! swaps it whole when the admin API applies a new policy. Handlers load the current policy per
//! request (HTTP, Bolt, Dubbo) or per connection (opaque TCP), so a change applies to the next
//! request on every existing connection and drops none.
//!
//! How a connection finds its service:
//! - by original destination: a service lists `addresses` (VIP:port) and every connection to one
//!   of them belongs to it;
//! - by name: a service lists `hosts`; a connection to an address no service claims is sniffed
//!   (when any service has hosts) and each request picks the service whose host matches its
//!   HTTP `Host`/`:authority` (port stripped), Bolt `service` header (the interface, without the
//!   `:version` suffix) or Dubbo service path. A request that matches no service goes to its
//!   original destination ("passthrough").
//!
//! [`policy`] holds the config schema and its validation; [`stats`] the per-route counters.

pub mod colour;
pub mod kernel;
pub mod link;
pub mod policy;
pub mod stats;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

pub use kernel::KernelPlan;
pub use policy::{compile, parse_toml, Policy, PolicyError, RawPolicy};
pub use stats::{Outcome, RouteStats, RouteStatsView};

/// The protocol a service speaks, as configured. `Auto` detects from the first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolHint {
    Auto,
    Http1,
    Http2,
    Grpc,
    Bolt,
    Dubbo,
    Tcp,
}

/// What to do with a new connection before reading a byte of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnPlan {
    /// No service claims it and nothing is routed by name: relay bytes to the original
    /// destination, as before routing existed (no detection delay).
    Opaque,
    /// Read the first bytes (up to `detect_timeout`) unless `hint` names the protocol, then
    /// route per request; opaque TCP (detected or hinted) is routed once per connection with
    /// [`Policy::route_coloured`] with the pod's colour.
    L7 {
        hint: ProtocolHint,
        detect_timeout: Duration,
    },
}

/// Case-insensitive header/metadata/attachment lookup of one request.
pub trait HeaderLookup {
    /// The value of `name` (ASCII case-insensitive); the first one when repeated.
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for () {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
}

/// What a route can match on, filled by each protocol's handler:
/// - HTTP/1.1, HTTP/2: `host` (Host or :authority, port stripped), `path` (without query),
///   `method` (GET, POST...), headers.
/// - gRPC: as HTTP/2, plus `service` = `pkg.Service` and `method` = `Method` from the path
///   `/pkg.Service/Method`; headers are the metadata.
/// - Bolt: `service` = the `service` header without `:version` (the interface), `version` =
///   what follows the `:`, `method` = the `sofa_head_method_name` header; each falls back to
///   the SofaRequest body (`targetServiceUniqueName`, `methodName`), which is where the npm
///   client puts them. Headers are the Bolt header map, then the body's string `requestProps`.
/// - Dubbo: `service` = the service path, `method` = the method name, `version` from the body,
///   headers are the attachments.
#[derive(Clone, Copy)]
pub struct RequestInfo<'a> {
    pub protocol: ProtocolHint,
    pub host: Option<&'a str>,
    pub path: Option<&'a str>,
    pub service: Option<&'a str>,
    pub method: Option<&'a str>,
    pub version: Option<&'a str>,
    pub headers: &'a dyn HeaderLookup,
}

impl<'a> RequestInfo<'a> {
    /// A request with nothing to match on but the protocol (e.g. opaque TCP).
    pub fn bare(protocol: ProtocolHint) -> Self {
        Self {
            protocol,
            host: None,
            path: None,
            service: None,
            method: None,
            version: None,
            headers: &(),
        }
    }
}

/// Where one request (or one opaque connection) goes.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Service name, or `passthrough` when no service matched.
    pub service: Arc<str>,
    /// Route name (`default` when the service's routes did not name it), or `passthrough`.
    pub route: Arc<str>,
    /// Subset name, or `passthrough`.
    pub subset: Arc<str>,
    /// The endpoint chosen for the first attempt.
    pub endpoint: SocketAddr,
    /// The other endpoints of the same subset, in the order retries should use them (the first
    /// attempt's endpoint again when it is alone).
    pub retry_endpoints: RetryOrder,
    /// Per-request timeout (whole request: connect, send, response head or frame).
    pub timeout: Duration,
    /// Extra attempts allowed when the request is safe to retry (nothing was sent upstream,
    /// or HTTP with an idempotent method and no body).
    pub retries: u32,
    /// Count the request's outcome here.
    pub stats: Arc<RouteStats>,
    /// The request's colour (0: base), whatever endpoint it ended up at.
    pub colour: colour::ColourId,
}

impl Decision {
    /// The endpoint for attempt `n` (0 = first).
    pub fn endpoint_for_attempt(&self, n: u32) -> SocketAddr {
        if n == 0 || self.retry_endpoints.is_empty() {
            return self.endpoint;
        }
        self.retry_endpoints
            .get((n as usize - 1) % self.retry_endpoints.len())
            .unwrap_or(self.endpoint)
    }
}

/// The endpoints retries use, in order: `len` endpoints of a shared list from `start` on,
/// wrapping around. A request's order is a rotation of its subset's endpoints, so making one
/// allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct RetryOrder {
    list: Option<Arc<[SocketAddr]>>,
    start: usize,
    len: usize,
}

impl RetryOrder {
    /// `len` endpoints of `list` from `start` on, wrapping around.
    pub fn rotation(list: &Arc<[SocketAddr]>, start: usize, len: usize) -> Self {
        Self {
            list: (!list.is_empty()).then(|| list.clone()),
            start,
            len: if list.is_empty() { 0 } else { len },
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th endpoint of the order.
    pub fn get(&self, i: usize) -> Option<SocketAddr> {
        let list = self.list.as_ref()?;
        (i < self.len).then(|| list[(self.start + i) % list.len()])
    }

    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }
}

impl From<Vec<SocketAddr>> for RetryOrder {
    fn from(v: Vec<SocketAddr>) -> Self {
        let len = v.len();
        Self::rotation(&v.into(), 0, len)
    }
}

/// Why a request could not be routed (each is a counted reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The service matched but no route did (and it has no catch-all route).
    #[error("service `{0}` has no route for this request")]
    NoRoute(Arc<str>),
    /// The chosen subset has no endpoints.
    #[error("subset `{subset}` of service `{service}` has no endpoints")]
    NoEndpoint { service: Arc<str>, subset: Arc<str> },
    /// The request's colour has no endpoint in this service and must not fall back to base.
    #[error("service `{service}` has no `{colour}` endpoint and colour `{colour}` never falls back to base")]
    ColourUnavailable { service: Arc<str>, colour: Arc<str> },
}

impl RouteError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoRoute(_) => "no_route",
            Self::NoEndpoint { .. } => "no_endpoint",
            Self::ColourUnavailable { .. } => "colour_unavailable",
        }
    }
}

/// The live policy, swapped whole by the admin API.
pub struct Router {
    live: RwLock<Arc<Policy>>,
}

impl Router {
    pub fn new(policy: Policy) -> Self {
        Self {
            live: RwLock::new(Arc::new(policy)),
        }
    }

    /// The policy in force now. Cheap (an `Arc` clone); hold it for one request.
    pub fn current(&self) -> Arc<Policy> {
        self.live.read().expect("policy lock").clone()
    }

    /// Install a new policy. Counters of routes that keep their (service, route, subset) name
    /// carry over, so a policy change does not reset what Prometheus scrapes.
    pub fn replace(&self, mut next: Policy) {
        let mut live = self.live.write().expect("policy lock");
        next.adopt_stats(&live);
        next.generation = live.generation + 1;
        *live = Arc::new(next);
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new(Policy::empty())
    }
}

/// Hashes keys looked up per request (addresses, the upstream pools' keys) with a
/// multiply-rotate mix instead of SipHash. The maps it serves are filled from the daemon's
/// own data (the policy, enrolled pods), never from what a client sends, so flooding
/// resistance buys nothing there.
#[derive(Default)]
pub struct KeyHasher(u64);

/// The `BuildHasher` of maps keyed with [`KeyHasher`].
pub type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

impl KeyHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.add(v.into());
    }

    fn write_u16(&mut self, v: u16) {
        self.add(v.into());
    }

    fn write_u32(&mut self, v: u32) {
        self.add(v.into());
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod retry_order_tests {
    use super::*;

    #[test]
    fn a_rotation_is_the_other_endpoints_from_the_next_one_on() {
        for n in 1..5usize {
            let list: Arc<[SocketAddr]> = (0..n)
                .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 80)))
                .collect();
            for first in 0..n {
                let order = RetryOrder::rotation(&list, first + 1, (n - 1).max(1));
                let want: Vec<SocketAddr> = (1..n.max(2)).map(|k| list[(first + k) % n]).collect();
                assert_eq!(order.iter().collect::<Vec<_>>(), want, "n {n} first {first}");
                assert_eq!(order.len(), want.len());
            }
        }
        let v: Vec<SocketAddr> = vec!["10.0.0.9:1".parse().unwrap(), "10.0.0.8:1".parse().unwrap()];
        assert_eq!(RetryOrder::from(v.clone()).iter().collect::<Vec<_>>(), v);
        assert!(RetryOrder::default().is_empty());
        assert_eq!(RetryOrder::default().get(0), None);
    }
}
