//! Counters carried from generation N to N+1 at the source (the pods' `PodStats`, the proxy's
//! error counters, the admin refusals), so metrics and status continue instead of resetting.
//! Kernel counters live in pinned maps and need nothing. N sends snapshots while it drains;
//! N+1 adds what changed since the previous one.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use super::wire::{Counter, PodCounters, Snapshot};
use crate::{
    daemon::Daemon,
    proxy::{PodStats, ProxyErrors},
};

fn proxy_field<'a>(e: &'a ProxyErrors, name: &str) -> Option<&'a AtomicU64> {
    Some(match name {
        "accept_failed" => &e.accept_failed,
        "accept_no_descriptors" => &e.accept_no_descriptors,
        "orig_dst_unknown" => &e.orig_dst_unknown,
        "orig_dst_is_proxy" => &e.orig_dst_is_proxy,
        "upstream_socket_failed" => &e.upstream_socket_failed,
        "upstream_connect_failed" => &e.upstream_connect_failed,
        "relay_reset" => &e.relay_reset,
        "pod_connection_limit" => &e.pod_connection_limit,
        _ => return None,
    })
}

/// This generation's counters, as N sends them. `pods` is taken once at the hand-off: the
/// drain takes the pods out of the daemon, their counters go on.
pub fn snapshot(d: &Daemon, pods: &[(String, Arc<PodStats>)], last: bool) -> Snapshot {
    let pods = pods
        .iter()
        .cloned()
        .map(|(name, s)| PodCounters {
            name,
            connections_total: s.connections_total.load(Relaxed),
            connections_active: s.connections_active.load(Relaxed),
            bytes_upstream: s.bytes_upstream.load(Relaxed),
            bytes_downstream: s.bytes_downstream.load(Relaxed),
        })
        .collect();
    let counter = |(name, value): (&str, u64)| Counter {
        name: name.to_string(),
        value,
    };
    Snapshot {
        pods,
        proxy_errors: d
            .proxy_shared()
            .errors
            .snapshot()
            .into_iter()
            .map(counter)
            .collect(),
        admin_errors: d.admin_error_counts().into_iter().map(counter).collect(),
        connections_left: d.proxy_shared().registry.len() as u64,
        last,
    }
}

/// N+1's side: applies each snapshot as the difference from the one before.
#[derive(Default)]
pub struct Carry {
    prev: Option<Snapshot>,
}

fn add(a: &AtomicU64, from: u64, to: u64) {
    if to >= from {
        a.fetch_add(to - from, Relaxed);
    } else {
        // Only the active-connection gauge goes down.
        let _ = a.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(from - to)));
    }
}

impl Carry {
    pub fn apply(&mut self, d: &Daemon, mut s: Snapshot) {
        if s.last {
            // Whatever N still held when it exited is gone: no longer active anywhere.
            for p in &mut s.pods {
                p.connections_active = 0;
            }
        }
        let prev = self.prev.take().unwrap_or_default();
        let prev_pods: BTreeMap<&str, &PodCounters> =
            prev.pods.iter().map(|p| (p.name.as_str(), p)).collect();
        let zero = PodCounters::default();
        let stats: BTreeMap<String, _> = d.pod_stats().into_iter().collect();
        for p in &s.pods {
            let Some(st) = stats.get(&p.name) else {
                continue;
            };
            let q = prev_pods.get(p.name.as_str()).copied().unwrap_or(&zero);
            add(&st.connections_total, q.connections_total, p.connections_total);
            add(&st.connections_active, q.connections_active, p.connections_active);
            add(&st.bytes_upstream, q.bytes_upstream, p.bytes_upstream);
            add(&st.bytes_downstream, q.bytes_downstream, p.bytes_downstream);
        }
        let before =
            |list: &[Counter], name: &str| list.iter().find(|c| c.name == name).map_or(0, |c| c.value);
        let shared = d.proxy_shared();
        for c in &s.proxy_errors {
            if let Some(a) = proxy_field(&shared.errors, &c.name) {
                add(a, before(&prev.proxy_errors, &c.name), c.value);
            }
        }
        for c in &s.admin_errors {
            let delta = c.value.saturating_sub(before(&prev.admin_errors, &c.name));
            d.add_admin_errors(&c.name, delta);
        }
        self.prev = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proxy_error_counter_carries_over() {
        let e = ProxyErrors::default();
        for (name, _) in e.snapshot() {
            assert!(
                proxy_field(&e, name).is_some(),
                "proxy error counter {name} is not carried to the next generation"
            );
        }
    }
}
