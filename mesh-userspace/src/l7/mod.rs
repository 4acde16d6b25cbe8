//! Layer-7 handling of a captured connection whose original destination a routing policy
//! cares about (see [`crate::routing`]): protocol detection, then per-request routing.
//!
//! - [`http`]: HTTP/1.1, HTTP/2 and gRPC through hyper (server side on the app's connection,
//!   pooled clients per endpoint upstream).
//! - [`mux`]: SOFA Bolt and Dubbo 2: frames decoded with the codecs in [`crate::protocol`],
//!   each request routed on its own, request ids remapped onto shared upstream connections
//!   per endpoint.
//! - opaque TCP (detected, hinted, or a detection timeout): routed once per connection and
//!   relayed by the opaque relay (`proxy.rs`), which dispatches here; nothing in `l7` uses it.
//!
//! Every handler counts protocol errors in [`L7Errors`] by (protocol, reason) and each request's
//! outcome in the route's [`crate::routing::RouteStats`].

pub mod http;
pub mod mux;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::TcpStream;

use crate::{
    conn::{self, ConnEntry, PodCtx, Shared},
    propagate::{self, ColourKernel},
    routing::{
        colour::{Choice, ColourId, ColourInputs},
        Decision, Policy, RequestInfo, RouteError, Router,
    },
};

/// Protocol errors by (protocol, reason): `sockmesh_protocol_errors_total`.
#[derive(Debug, Default)]
pub struct L7Errors {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl L7Errors {
    pub fn count(&self, protocol: &'static str, reason: &'static str) {
        self.add(protocol, reason, 1);
    }

    /// Add `n` (an upgrade carries the previous generation's counts over).
    pub fn add(&self, protocol: &'static str, reason: &'static str, n: u64) {
        *self
            .counts
            .lock()
            .expect("l7 errors lock")
            .entry((protocol, reason))
            .or_default() += n;
    }

    #[cfg(test)]
    pub fn get(&self, protocol: &str, reason: &str) -> u64 {
        self.counts
            .lock()
            .expect("l7 errors lock")
            .iter()
            .find(|((p, r), _)| *p == protocol && *r == reason)
            .map_or(0, |(_, v)| *v)
    }

    pub fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        self.counts
            .lock()
            .expect("l7 errors lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

/// What the L7 layer shares across every pod and connection.
#[derive(Default)]
pub struct L7Shared {
    pub router: Router,
    pub errors: L7Errors,
    pub http: http::HttpPools,
    pub mux: mux::MuxPools,
    /// Dual links' local shares and counters (kept across policy swaps).
    pub links: Arc<crate::routing::link::LinkRuntime>,
}

/// Everything a protocol handler needs about the connection it serves.
#[derive(Clone)]
pub struct ConnCtx {
    pub pod: Arc<PodCtx>,
    pub shared: Arc<Shared>,
    /// The app's address (outbound) or the remote client's (inbound).
    pub client: SocketAddr,
    /// Where the app meant to go: routing starts from it.
    pub orig: SocketAddr,
    /// The connection's `status` entry (byte counters).
    pub entry: Arc<ConnEntry>,
    /// Captured by the pod's inbound listener: requests go to the pod's own app.
    pub inbound: bool,
    /// Our accepted socket's own address (outbound: the listener the app was sent to).
    pub local: SocketAddr,
}

impl ConnCtx {
    pub fn l7(&self) -> &L7Shared {
        &self.shared.l7
    }

    /// Open an upstream connection to `endpoint` from inside the pod's netns with the daemon's
    /// mark (never captured again), bounded by `timeout`.
    pub async fn connect(&self, endpoint: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        conn::connect_upstream(&self.pod, endpoint, timeout).await
    }

    /// Does a request on this connection come from inside the mesh, so that its colour header
    /// is believed? Outbound: always (the app is an enrolled pod). Inbound: when the client is
    /// an enrolled pod of this node or in the policy's `trusted_sources`.
    pub fn trusted(&self, policy: &Policy) -> bool {
        let ip = self.client.ip();
        !self.inbound || self.shared.mesh_ips.contains(ip) || policy.colours().trusts(ip)
    }

    /// Kernel colour propagation, when this pod uses it and the kernel has it.
    pub fn propagation(&self) -> Option<&ColourKernel> {
        (self.pod.propagate && self.shared.colour.is_available()).then_some(&self.shared.colour)
    }

    /// The colour the kernel recorded for the app's bytes at `offset` of this (outbound)
    /// connection, when the pod propagates. 0 (base) is `None`: the next source decides.
    /// Without colours in the live policy the answer could not matter: no map lookup then.
    pub fn propagated_at(&self, offset: u64) -> Option<ColourId> {
        if self.inbound {
            return None;
        }
        let kernel = self.propagation()?;
        if !self.l7().router.current().colouring() {
            return None;
        }
        let (app_local, app_remote) = propagate::app_side_of_accepted(self.local, self.client);
        let c = kernel.ledger_colour(self.pod.netns_cookie, app_local, app_remote, offset)?;
        ColourId::try_from(c).ok().filter(|&c| c != 0)
    }

    /// Before a request of `colour` goes to the app on our delivering connection `local` →
    /// `endpoint` (inbound, propagating pods): the app thread that reads it takes the colour.
    /// A full map is counted; the request still goes (uncoloured for the kernel).
    pub fn colour_delivery(&self, local: SocketAddr, endpoint: SocketAddr, colour: ColourId) {
        let Some(k) = self.propagation().filter(|_| self.inbound) else {
            return;
        };
        let (app_local, app_remote) = propagate::app_side_of_delivering(local, endpoint);
        if let Err(e) = k.set_inbound(app_local, app_remote, u32::from(colour)) {
            self.l7().errors.count("colour", "inbound_map_failed");
            tracing::debug!("colour for {app_local}: {e}");
        }
    }

    /// Colour one request and decide where it goes: outbound by the policy, within its colour;
    /// inbound to the pod's own app (the sender's proxy already chose this pod).
    /// `propagated` is the colour the kernel recorded for the bytes the request starts at.
    pub fn route(
        &self,
        policy: &Policy,
        info: &RequestInfo<'_>,
        propagated: Option<ColourId>,
    ) -> (Choice, Result<Decision, RouteError>) {
        let pod = match (&self.pod.colour, self.inbound) {
            (Some(c), false) => policy.colours().id(c),
            _ => None,
        };
        let inputs = ColourInputs {
            trusted: self.trusted(policy),
            propagated,
            pod,
        };
        let choice = policy.choose_colour(self.orig, info, inputs, self.inbound);
        if policy.colouring() {
            policy.colour_stats().chosen(&choice);
        }
        let routed = if self.inbound {
            // A keep-alive link's requests move elsewhere, but for its trickle and keep paths
            // (and but for requests of this node's pods: their outbound side applied the link).
            let mesh = &self.shared.mesh_ips;
            Ok((!mesh.routed(self.client.ip()))
                .then(|| policy.link_route(self.orig, info, &self.l7().links, |ip| mesh.contains(ip)))
                .flatten()
                .unwrap_or_else(|| policy.deliver(self.orig)))
        } else {
            // To a linked service's endpoint on this node: its link's share decides here.
            let mesh = &self.shared.mesh_ips;
            policy
                .route_coloured(self.orig, info, choice.colour)
                .map(|d| policy.link_outbound(d, info, &self.l7().links, |ip| mesh.contains(ip)))
        };
        (
            choice,
            routed.map(|d| Decision {
                colour: choice.colour,
                ..d
            }),
        )
    }
}
