//! The pod context every proxied connection carries ([`PodCtx`]), the per-pod and node-wide
//! counters ([`PodStats`], [`ProxyErrors`]), the addresses of the mesh's pods ([`MeshIps`]),
//! and admission: the per-pod connection cap ([`admit`], [`Held`]) and the heap trim after
//! many connections closed ([`MemoryTrim`]).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tracing::warn;

use super::Shared;
use crate::sys::NetNs;

/// Per-pod counters (also the Prometheus labels).
#[derive(Debug, Default)]
pub struct PodStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub bytes_upstream: AtomicU64,
    pub bytes_downstream: AtomicU64,
    /// Connections the proxy holds for this pod right now, from accept to close (upstream
    /// connects in progress included): what `[limits] max_connections_per_pod` caps.
    pub held: AtomicU64,
}

/// Why a proxied connection was dropped; each has a metric.
#[derive(Debug, Default)]
pub struct ProxyErrors {
    pub accept_failed: AtomicU64,
    /// `accept()` failed with EMFILE/ENFILE: the daemon (or the host) ran out of descriptors.
    pub accept_no_descriptors: AtomicU64,
    /// When the last "out of descriptors" warning was logged (ms since the Unix epoch), so it
    /// is said once per [`NO_FD_LOG_INTERVAL`], with the count since.
    no_fd_logged_ms: AtomicU64,
    no_fd_unlogged: AtomicU64,
    pub orig_dst_unknown: AtomicU64,
    pub orig_dst_is_proxy: AtomicU64,
    pub upstream_socket_failed: AtomicU64,
    pub upstream_connect_failed: AtomicU64,
    pub relay_reset: AtomicU64,
    /// A pod already held `max_connections_per_pod` connections: the new one was reset.
    pub pod_connection_limit: AtomicU64,
    pod_limit_logged_ms: AtomicU64,
}

/// How often an accept that ran out of descriptors is logged (each one is counted).
pub const NO_FD_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl ProxyErrors {
    /// Count an accept that failed for lack of descriptors; `Some(n)` when it is time to log
    /// (`n` failures since the last log line, this one included).
    pub fn note_no_descriptors(&self, now_ms: u64) -> Option<u64> {
        self.accept_no_descriptors.fetch_add(1, Relaxed);
        let unlogged = self.no_fd_unlogged.fetch_add(1, Relaxed) + 1;
        let last = self.no_fd_logged_ms.load(Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= NO_FD_LOG_INTERVAL.as_millis() as u64;
        if due
            && self
                .no_fd_logged_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
        {
            self.no_fd_unlogged.fetch_sub(unlogged, Relaxed);
            return Some(unlogged);
        }
        None
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("accept_failed", self.accept_failed.load(Relaxed)),
            ("accept_no_descriptors", self.accept_no_descriptors.load(Relaxed)),
            ("orig_dst_unknown", self.orig_dst_unknown.load(Relaxed)),
            ("orig_dst_is_proxy", self.orig_dst_is_proxy.load(Relaxed)),
            (
                "upstream_socket_failed",
                self.upstream_socket_failed.load(Relaxed),
            ),
            (
                "upstream_connect_failed",
                self.upstream_connect_failed.load(Relaxed),
            ),
            ("relay_reset", self.relay_reset.load(Relaxed)),
            ("pod_connection_limit", self.pod_connection_limit.load(Relaxed)),
        ]
    }

    /// Count a connection refused by the per-pod cap; true when it is time to say so in the
    /// log (once per [`NO_FD_LOG_INTERVAL`]).
    fn note_pod_limit(&self, now_ms: u64) -> bool {
        self.pod_connection_limit.fetch_add(1, Relaxed);
        let last = self.pod_limit_logged_ms.load(Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= NO_FD_LOG_INTERVAL.as_millis() as u64)
            && self
                .pod_limit_logged_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
    }
}

/// One connection counted against its pod's cap (and in the node's total) until dropped.
pub(crate) struct Held {
    stats: Arc<PodStats>,
    shared: Arc<Shared>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.held.fetch_sub(1, Relaxed);
        self.shared.memory.freed();
    }
}

/// Admit a new connection of `pod` under its cap, or count the refusal (`None`: reset it).
pub(crate) fn admit(pod: &PodCtx, shared: &Arc<Shared>) -> Option<Held> {
    let held = pod.stats.held.fetch_add(1, Relaxed) + 1;
    let cap = shared.pod_cap.load(Relaxed);
    if cap != 0 && held > cap {
        pod.stats.held.fetch_sub(1, Relaxed);
        if shared.errors.note_pod_limit(crate::sys::unix_ms()) {
            warn!(
                pod = %pod.name,
                "pod holds {cap} proxied connections, its cap ([limits] max_connections_per_pod): \
                 new ones are reset (counted as pod_connection_limit; said once per {}s)",
                NO_FD_LOG_INTERVAL.as_secs()
            );
        }
        return None;
    }
    shared.memory.opened();
    Some(Held {
        stats: pod.stats.clone(),
        shared: shared.clone(),
    })
}

/// Gives the allocator's free memory back to the system after many connections closed or
/// parked their buffers: glibc keeps freed heap pages otherwise, so RSS would stay at the peak
/// of a connection burst. A task started with the first connection checks every
/// [`TRIM_EVERY`] and trims when at least [`TRIM_AFTER`] connections were freed since the last
/// trim, or when some were and none in the last interval (the end of a burst); at most one
/// `malloc_trim` per interval, none while nothing changes.
#[derive(Debug, Default)]
pub struct MemoryTrim {
    /// Connections closed or parked since the last trim.
    freed: Arc<AtomicU64>,
    started: std::sync::atomic::AtomicBool,
    /// Trims done so far.
    pub trims: Arc<AtomicU64>,
}

const TRIM_AFTER: u64 = 1000;
const TRIM_EVERY: Duration = Duration::from_secs(2);

impl MemoryTrim {
    fn opened(&self) {
        if !self.started.swap(true, Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(trimmer(self.freed.clone(), self.trims.clone()));
            }
        }
    }

    /// A connection closed, or an idle one gave back its buffers.
    pub fn freed(&self) {
        self.freed.fetch_add(1, Relaxed);
    }
}

async fn trimmer(freed: Arc<AtomicU64>, trims: Arc<AtomicU64>) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let now = freed.load(Relaxed);
        // Many freed, or a burst that has ended (nothing freed in the last interval): the
        // tail of a burst (under TRIM_AFTER after the last trim) is given back too.
        let ended = now > 0 && now == seen;
        seen = now;
        if now >= TRIM_AFTER || ended {
            freed.store(0, Relaxed);
            seen = 0;
            trims.fetch_add(1, Relaxed);
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// `malloc_trim(0)`: hand every free page of every arena back to the kernel.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the relay needs to know about the pod and the node.
pub struct PodCtx {
    pub name: String,
    pub netns: NetNs,
    pub stats: Arc<PodStats>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub mark: u32,
    /// The pod's colour (`enroll --colour`): every request it sends has it unless the request
    /// or the kernel says otherwise.
    pub colour: Option<String>,
    /// Colour propagation by the kernel for this pod's apps.
    pub propagate: bool,
    /// The pod's netns cookie (keys of the kernel's per-connection maps).
    pub netns_cookie: u64,
}

/// The addresses of this node's enrolled pods: requests from them come from inside the mesh.
#[derive(Debug, Default)]
pub struct MeshIps {
    ips: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// The addresses of pods whose outbound requests this daemon routes (not `external_proxy`):
    /// their requests to a linked service already had the link's decision
    /// ([`crate::routing::Policy::link_outbound`]), so the inbound side does not decide again.
    routed: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl MeshIps {
    pub fn add(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.ips.write().expect("mesh ips lock");
        for ip in ips {
            *m.entry(*ip).or_default() += 1;
        }
    }

    pub fn remove(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.ips.write().expect("mesh ips lock");
        for ip in ips {
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        !ip.is_loopback() && self.ips.read().expect("mesh ips lock").contains_key(&ip)
    }

    /// A pod whose outbound requests this daemon routes (see the `routed` field).
    pub fn add_routed(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.routed.write().expect("mesh ips lock");
        for ip in ips {
            *m.entry(*ip).or_default() += 1;
        }
    }

    pub fn remove_routed(&self, ips: &[std::net::IpAddr]) {
        let mut m = self.routed.write().expect("mesh ips lock");
        for ip in ips {
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }

    /// Does a connection from `ip` come from a pod of this node whose outbound requests this
    /// daemon routed (so a link already decided where they go)?
    pub fn routed(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        !ip.is_loopback() && self.routed.read().expect("mesh ips lock").contains_key(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_descriptor_accepts_are_all_counted_and_logged_once_per_interval() {
        let e = ProxyErrors::default();
        let t0 = 1_000_000u64;
        assert_eq!(
            e.note_no_descriptors(t0),
            Some(1),
            "the first one is reported at once"
        );
        for i in 1..50 {
            assert_eq!(e.note_no_descriptors(t0 + i * 100), None);
        }
        let next = t0 + NO_FD_LOG_INTERVAL.as_millis() as u64;
        assert_eq!(
            e.note_no_descriptors(next),
            Some(50),
            "49 since the last report, plus this one"
        );
        assert_eq!(e.accept_no_descriptors.load(Relaxed), 51);
        assert_eq!(e.accept_failed.load(Relaxed), 0, "not an ordinary accept failure");
    }
}
