//! Connection plumbing below both the opaque relay ([`crate::proxy`]) and the protocol
//! handlers ([`crate::l7`]): what every proxied connection needs whichever way it is served.
//!
//! - [`pod`]: the pod context ([`PodCtx`]), per-pod counters, proxy error counters, the mesh's
//!   pod addresses, and admission under the per-pod connection cap.
//! - [`registry`]: live connections, as `status` shows them.
//! - [`upstream`]: connecting upstream from inside the pod's netns with the daemon's mark.
//! - [`worker`]: the proxy's workers (thread-per-core), per-worker values and their counters.
//! - here: [`Shared`], the node-wide state every pod's listeners share, the original
//!   destination source, and a connection's [`Direction`].
//!
//! `proxy` (accept loop, dispatch, relay) uses this module and `l7`; `l7` uses this module and
//! never `proxy`. The one reference back up is [`Shared::l7`], the L7 layer's shared state
//! (routing policy, protocol error counters, upstream pools), which `Shared` owns.

pub mod pod;
pub mod registry;
pub mod upstream;
pub mod worker;

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::atomic::AtomicU64};

use serde::Serialize;
use tokio::net::TcpStream;

pub(crate) use pod::admit;
pub use pod::{MemoryTrim, MeshIps, PodCtx, PodStats, ProxyErrors};
pub use registry::{ConnEntry, Registry};
pub use upstream::{connect_upstream, UPSTREAM_CONNECT_TIMEOUT};
pub(crate) use upstream::{reset, upstream_socket};
pub use worker::Workers;

use crate::{l7::L7Shared, routing::Router, sys};

/// Where did the app mean to go? (The kernel answers through `SO_ORIGINAL_DST`.)
pub trait OrigDstSource: Send + Sync + 'static {
    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr>;
}

/// The real source: `getsockopt(SO_ORIGINAL_DST)` answered by the `cgroup/getsockopt` hook.
pub struct KernelOrigDst;

impl OrigDstSource for KernelOrigDst {
    fn orig_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        let v6 = accepted.local_addr()?.is_ipv6();
        sys::original_dst(accepted.as_raw_fd(), v6)
    }
}

/// Which way a proxied connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the pod's app out (captured by connect4/6): the original destination comes from
    /// `SO_ORIGINAL_DST`.
    Outbound,
    /// Into the pod (captured by sk_lookup): the accepted socket's local address is the
    /// original destination.
    Inbound,
}

/// Shared by every pod's listeners.
pub struct Shared {
    pub registry: Registry,
    pub errors: ProxyErrors,
    pub orig: Box<dyn OrigDstSource>,
    /// The routing policy, protocol error counters and upstream pools.
    pub l7: L7Shared,
    /// Enrolled pods' addresses (who is inside the mesh).
    pub mesh_ips: MeshIps,
    /// Kernel colour propagation (see `propagate.rs`); unavailable until the daemon wires it.
    pub colour: crate::propagate::ColourKernel,
    /// `[limits]`: slow and idle clients, the per-pod connection cap.
    pub limits: crate::config::Limits,
    /// The per-pod connection cap in force (0: none), resolved from `limits` at start.
    pub pod_cap: AtomicU64,
    /// Live connections, and the heap trim after large closes.
    pub memory: MemoryTrim,
    /// The proxy's workers: where listeners' accept loops run (none in unit tests).
    pub workers: Workers,
}

impl Shared {
    pub fn new(orig: Box<dyn OrigDstSource>, router: Router) -> Self {
        Self {
            registry: Registry::default(),
            errors: ProxyErrors::default(),
            orig,
            l7: L7Shared {
                router,
                ..L7Shared::default()
            },
            mesh_ips: MeshIps::default(),
            colour: crate::propagate::ColourKernel::disabled("not wired to a kernel".into()),
            limits: crate::config::Limits::default(),
            pod_cap: AtomicU64::new(0),
            memory: MemoryTrim::default(),
            workers: Workers::default(),
        }
    }

    /// Served by these workers: each gets its own upstream pools.
    pub fn with_workers(mut self, workers: Workers) -> Self {
        let n = workers.count();
        self.l7.http = crate::l7::http::HttpPools::new(n);
        self.l7.mux = crate::l7::mux::MuxPools::new(n);
        self.workers = workers;
        self
    }

    /// With the config's `[limits]`; the per-pod cap is resolved against the open-files
    /// limit in force now.
    pub fn with_limits(mut self, limits: crate::config::Limits) -> Self {
        let nofile = sys::nofile_limit().map(|(soft, _)| soft).unwrap_or(0);
        self.pod_cap = AtomicU64::new(limits.pod_connection_cap(nofile));
        self.limits = limits;
        self
    }

    /// With the kernel's colour propagation handle.
    pub fn with_colour(mut self, colour: crate::propagate::ColourKernel) -> Self {
        self.colour = colour;
        self
    }
}
