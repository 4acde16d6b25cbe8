//! Counters carried from generation N to N+1 at the source (the pods' `PodStats`, the proxy's
//! error counters, the admin refusals, the per-route request counters and the protocol errors),
//! so metrics and status continue instead of resetting.
//! Kernel counters live in pinned maps and need nothing. N sends snapshots while it drains;
//! N+1 adds what changed since the previous one.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use super::wire::{Counter, PodCounters, RouteCounters, Snapshot};
use crate::{
    conn::{PodStats, ProxyErrors},
    daemon::Daemon,
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
        routes: d
            .l7()
            .router
            .current()
            .stats()
            .iter()
            .map(|s| route_counters(&s.view()))
            .collect(),
        protocol_errors: d
            .l7()
            .errors
            .snapshot()
            .into_iter()
            .map(|((p, r), value)| Counter {
                name: format!("{p}/{r}"),
                value,
            })
            .collect(),
        moved: super::moved_totals().into_iter().map(counter).collect(),
    }
}

fn route_counters(v: &crate::routing::RouteStatsView) -> RouteCounters {
    let mut below = 0;
    let buckets = v
        .latency_buckets
        .iter()
        .map(|&c| {
            let n = c.saturating_sub(below);
            below = c;
            n
        })
        .collect();
    RouteCounters {
        service: v.service.clone(),
        route: v.route.clone(),
        subset: v.subset.clone(),
        requests: v.requests,
        retries: v.retries,
        failures: v
            .failures
            .iter()
            .map(|(name, value)| Counter {
                name: name.clone(),
                value: *value,
            })
            .collect(),
        buckets,
        latency_sum_us: (v.latency_sum_seconds * 1e6).round() as u64,
    }
}

/// Counter names arrive as strings; the counters are keyed by `&'static str`. The names come
/// from the same code in the previous generation, so the set is small and fixed: each distinct
/// one is leaked once.
fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().expect("intern lock");
    if let Some(n) = names.get(name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(n);
    n
}

/// What changed in one route between two snapshots.
fn route_delta(now: &RouteCounters, before: Option<&RouteCounters>) -> RouteCounters {
    let zero = RouteCounters::default();
    let b = before.unwrap_or(&zero);
    let was = |name: &str| b.failures.iter().find(|c| c.name == name).map_or(0, |c| c.value);
    RouteCounters {
        service: now.service.clone(),
        route: now.route.clone(),
        subset: now.subset.clone(),
        requests: now.requests.saturating_sub(b.requests),
        retries: now.retries.saturating_sub(b.retries),
        failures: now
            .failures
            .iter()
            .map(|c| Counter {
                name: c.name.clone(),
                value: c.value.saturating_sub(was(&c.name)),
            })
            .filter(|c| c.value > 0)
            .collect(),
        buckets: now
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(b.buckets.get(i).copied().unwrap_or(0)))
            .collect(),
        latency_sum_us: now.latency_sum_us.saturating_sub(b.latency_sum_us),
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
        // Routes by their labels: a route this generation's policy no longer has is dropped
        // (as a policy change drops it).
        let policy = d.l7().router.current();
        let route_stats = policy.stats();
        for r in &s.routes {
            let key =
                |x: &&RouteCounters| x.service == r.service && x.route == r.route && x.subset == r.subset;
            let delta = route_delta(r, prev.routes.iter().find(key));
            let Some(stats) = route_stats
                .iter()
                .find(|t| t.service == r.service && t.route == r.route && t.subset == r.subset)
            else {
                continue;
            };
            let failures: Vec<(&'static str, u64)> = delta
                .failures
                .iter()
                .map(|c| (intern(&c.name), c.value))
                .collect();
            stats.add_counts(
                delta.requests,
                delta.retries,
                &failures,
                &delta.buckets,
                delta.latency_sum_us,
            );
        }
        for c in &s.moved {
            let delta = c.value.saturating_sub(before(&prev.moved, &c.name));
            super::add_moved(&c.name, delta);
        }
        for c in &s.protocol_errors {
            let delta = c.value.saturating_sub(before(&prev.protocol_errors, &c.name));
            if let (Some((p, r)), true) = (c.name.split_once('/'), delta > 0) {
                d.l7().errors.add(intern(p), intern(r), delta);
            }
        }
        self.prev = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_s_counters_carried_in_two_snapshots_equal_the_original() {
        use crate::routing::{stats::RouteStats, Outcome};
        use std::time::Duration;
        let n = RouteStats::new("orders", "default", "v1");
        let n1 = RouteStats::new("orders", "default", "v1");
        n.record(Outcome::Answered, Duration::from_millis(2));
        n.record(Outcome::Failed("timeout"), Duration::from_secs(1));
        let first = route_counters(&n.view());
        n.record(Outcome::Answered, Duration::from_micros(300));
        n.record(Outcome::Failed("timeout"), Duration::from_millis(40));
        n.record_retry();
        let second = route_counters(&n.view());
        for (now, before) in [(&first, None), (&second, Some(&first))] {
            let d = route_delta(now, before);
            let f: Vec<_> = d.failures.iter().map(|c| (intern(&c.name), c.value)).collect();
            n1.add_counts(d.requests, d.retries, &f, &d.buckets, d.latency_sum_us);
        }
        assert_eq!(n1.view(), n.view());
    }

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
