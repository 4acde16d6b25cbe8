//! The daemon's side of the policy table in the kernel: the compiled [`KernelPlan`] of the live
//! policy, with the endpoints an operator (or a health check) marked down, becomes the tables
//! `ebpf::ServiceTables` writes; and their counters become `sockmesh routes` and `/metrics`.

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use crate::{
    ebpf::{ServiceTables, TableService},
    routing::KernelPlan,
};

/// The tables for `plan`, with `down` endpoints at zero width.
pub fn tables(plan: &KernelPlan, down: &BTreeSet<SocketAddr>) -> Vec<TableService> {
    plan.services
        .iter()
        .map(|s| TableService {
            slot: s.slot,
            identity: s
                .entries
                .iter()
                .map(|e| format!("{}|{}|{}", s.name, e.subset, e.endpoint))
                .collect(),
            addresses: s.addresses.clone(),
            entries: s
                .entries
                .iter()
                .map(|e| (e.endpoint, e.weight, down.contains(&e.endpoint)))
                .collect(),
        })
        .collect()
}

/// `kernel` of `sockmesh routes --json`: the table generation and per service its entries with
/// their share, state and connects routed.
pub fn view(plan: &KernelPlan, t: &ServiceTables, down: &BTreeSet<SocketAddr>) -> Value {
    let (generation, half) = t.generation();
    let services: Vec<Value> = plan
        .services
        .iter()
        .map(|s| {
            let counts = t.counts(s.slot, s.entries.len());
            let up_total: u128 = s
                .entries
                .iter()
                .filter(|e| !down.contains(&e.endpoint))
                .map(|e| e.weight as u128)
                .sum();
            let entries: Vec<Value> = s
                .entries
                .iter()
                .zip(counts)
                .map(|(e, n)| {
                    let is_down = down.contains(&e.endpoint);
                    let share = if is_down || up_total == 0 {
                        0.0
                    } else {
                        100.0 * e.weight as f64 / up_total as f64
                    };
                    json!({
                        "subset": &*e.subset,
                        "endpoint": e.endpoint.to_string(),
                        "share_percent": (share * 100.0).round() / 100.0,
                        "down": is_down,
                        "connects": n,
                    })
                })
                .collect();
            json!({
                "name": &*s.name,
                "slot": s.slot,
                "addresses": s.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "entries": entries,
            })
        })
        .collect();
    json!({
        "generation": generation,
        "half": half,
        "last_write": t.last,
        "down": down.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "services": services,
    })
}

/// The `kernel` part of `sockmesh routes` as text.
pub fn render(v: &Value) -> String {
    let mut o = String::new();
    let services = v["services"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        o,
        "\nkernel-routed services: {} (table generation {}, half {}{})",
        services.len(),
        v["generation"].as_u64().unwrap_or(0),
        v["half"].as_u64().unwrap_or(0),
        match v["last_write"]["write_us"].as_u64() {
            Some(us) => format!(", last write {us} us"),
            None => String::new(),
        }
    );
    for s in &services {
        let addrs: Vec<&str> = s["addresses"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  service {} {} (slot {})",
            s["name"].as_str().unwrap_or("?"),
            addrs.join(", "),
            s["slot"].as_u64().unwrap_or(0)
        );
        for e in s["entries"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                o,
                "    -> {:<12} {:<24} share {:>6.2}%{}  connects {:>9}",
                e["subset"].as_str().unwrap_or("?"),
                e["endpoint"].as_str().unwrap_or("?"),
                e["share_percent"].as_f64().unwrap_or(0.0),
                if e["down"].as_bool() == Some(true) {
                    " DOWN"
                } else {
                    ""
                },
                e["connects"].as_u64().unwrap_or(0)
            );
        }
    }
    o
}

/// Two failed probes in a row take an endpoint out; two answered ones put it back.
pub const HEALTH_FLIPS_AFTER: u32 = 2;

/// The endpoints to probe and how often (the shortest `health_check_ms` of the services that
/// list them); `None` when no kernel service asks for health checks.
pub fn health_targets(plan: &KernelPlan) -> Option<(Duration, BTreeSet<SocketAddr>)> {
    let mut every: Option<Duration> = None;
    let mut eps = BTreeSet::new();
    for s in &plan.services {
        if let Some(i) = s.health_interval {
            every = Some(every.map_or(i, |e| e.min(i)));
            eps.extend(s.entries.iter().map(|e| e.endpoint));
        }
    }
    every.map(|e| (e, eps))
}

/// Consecutive probe results per endpoint.
#[derive(Debug, Default)]
pub struct Health {
    streak: std::collections::BTreeMap<SocketAddr, (bool, u32)>,
    pub down: BTreeSet<SocketAddr>,
}

impl Health {
    /// Record one round of probes; true when the set of endpoints down changed.
    pub fn record(&mut self, results: &[(SocketAddr, bool)]) -> bool {
        let before = self.down.clone();
        let probed: BTreeSet<SocketAddr> = results.iter().map(|(a, _)| *a).collect();
        // Endpoints no longer probed (policy changed) are forgotten.
        self.streak.retain(|a, _| probed.contains(a));
        self.down.retain(|a| probed.contains(a));
        for (a, ok) in results {
            let e = self.streak.entry(*a).or_insert((*ok, 0));
            if e.0 == *ok {
                e.1 += 1;
            } else {
                *e = (*ok, 1);
            }
            if e.1 >= HEALTH_FLIPS_AFTER {
                if *ok {
                    self.down.remove(a);
                } else {
                    self.down.insert(*a);
                }
            }
        }
        self.down != before
    }
}

/// One TCP connect to each endpoint from inside `netns` (the daemon's mark on the socket, so
/// no hook captures it), all at once, each bounded by `timeout`.
pub async fn probe(
    netns: &std::path::Path,
    mark: u32,
    endpoints: &BTreeSet<SocketAddr>,
    timeout: Duration,
) -> Vec<(SocketAddr, bool)> {
    let Ok(ns) = crate::sys::NetNs::open(netns) else {
        return Vec::new();
    };
    let mut set = tokio::task::JoinSet::new();
    for &ep in endpoints {
        let sock = ns.run(|| -> std::io::Result<tokio::net::TcpSocket> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(ep),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            if mark != 0 {
                s.set_mark(mark)?;
            }
            s.set_nonblocking(true)?;
            Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
        });
        let Ok(Ok(sock)) = sock else {
            continue;
        };
        set.spawn(async move {
            let ok = matches!(tokio::time::timeout(timeout, sock.connect(ep)).await, Ok(Ok(_)));
            (ep, ok)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

/// One sample of `sockmesh_kernel_routed_connects_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedConnects {
    pub service: String,
    pub subset: String,
    pub endpoint: String,
    pub connects: u64,
}

/// The metric samples (`/metrics`, src/metrics.rs): connects routed per (service, subset,
/// endpoint), and the table generation.
pub fn metric_rows(v: &Value) -> (Vec<RoutedConnects>, u64) {
    let mut rows = Vec::new();
    for s in v["services"].as_array().into_iter().flatten() {
        for e in s["entries"].as_array().into_iter().flatten() {
            rows.push(RoutedConnects {
                service: s["name"].as_str().unwrap_or("?").to_string(),
                subset: e["subset"].as_str().unwrap_or("?").to_string(),
                endpoint: e["endpoint"].as_str().unwrap_or("?").to_string(),
                connects: e["connects"].as_u64().unwrap_or(0),
            });
        }
    }
    (rows, v["generation"].as_u64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "generation": 7,
            "half": 1,
            "last_write": { "generation": 7, "half": 1, "write_us": 42, "flipped_at_unix_us": 1, "services": 1 },
            "down": ["10.0.2.1:5432"],
            "services": [{
                "name": "db",
                "slot": 0,
                "addresses": ["10.96.0.20:5432"],
                "entries": [
                    { "subset": "v1", "endpoint": "10.0.1.1:5432", "share_percent": 100.0, "down": false, "connects": 900 },
                    { "subset": "v2", "endpoint": "10.0.2.1:5432", "share_percent": 0.0, "down": true, "connects": 100 },
                ],
            }],
        })
    }

    #[test]
    fn text_names_services_entries_and_the_generation() {
        let t = render(&sample());
        assert!(
            t.contains("kernel-routed services: 1 (table generation 7, half 1, last write 42 us)"),
            "{t}"
        );
        assert!(t.contains("service db 10.96.0.20:5432 (slot 0)"), "{t}");
        assert!(t.contains("10.0.2.1:5432") && t.contains("DOWN"), "{t}");
        assert!(t.lines().any(|l| l.contains("v1") && l.ends_with(" 900")), "{t}");
    }

    #[test]
    fn metrics_count_per_service_subset_and_endpoint() {
        let (rows, generation) = metric_rows(&sample());
        assert!(rows.contains(&RoutedConnects {
            service: "db".into(),
            subset: "v2".into(),
            endpoint: "10.0.2.1:5432".into(),
            connects: 100,
        }));
        assert_eq!(generation, 7);
    }

    #[test]
    fn down_endpoints_get_zero_width_but_keep_their_place() {
        use crate::routing::kernel::{KernelEntry, KernelService};
        let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
        let plan = KernelPlan {
            services: vec![KernelService {
                name: "db".into(),
                health_interval: None,
                slot: 3,
                addresses: vec![ep("10.96.0.20:5432")],
                entries: vec![
                    KernelEntry {
                        subset: "v1".into(),
                        endpoint: ep("10.0.1.1:5432"),
                        weight: 9,
                    },
                    KernelEntry {
                        subset: "v2".into(),
                        endpoint: ep("10.0.2.1:5432"),
                        weight: 1,
                    },
                ],
            }],
        };
        let down = [ep("10.0.1.1:5432")].into_iter().collect();
        let t = tables(&plan, &down);
        assert_eq!(t[0].slot, 3);
        assert_eq!(
            t[0].entries,
            vec![(ep("10.0.1.1:5432"), 9, true), (ep("10.0.2.1:5432"), 1, false)]
        );
        assert_eq!(t[0].identity[1], "db|v2|10.0.2.1:5432");
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn two_failures_take_an_endpoint_down_and_two_answers_bring_it_back() {
        let a: SocketAddr = "10.0.1.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.1.2:80".parse().unwrap();
        let mut h = Health::default();
        assert!(!h.record(&[(a, false), (b, true)]));
        assert!(h.record(&[(a, false), (b, true)]));
        assert_eq!(h.down, [a].into_iter().collect());
        assert!(!h.record(&[(a, true), (b, true)]), "one answer is not enough");
        assert!(!h.record(&[(a, false), (b, true)]), "the streak starts again");
        assert!(!h.record(&[(a, true), (b, true)]));
        assert!(h.record(&[(a, true), (b, true)]));
        assert!(h.down.is_empty());
        // An endpoint that is no longer probed is forgotten.
        h.record(&[(a, false)]);
        h.record(&[(a, false)]);
        assert!(h.record(&[(b, true)]));
        assert!(h.down.is_empty());
    }
}
