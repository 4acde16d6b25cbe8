//! The daemon's side of the policy table in the kernel: the compiled [`KernelPlan`] of the live
//! policy, with the endpoints an operator (or a health check) marked down, becomes the tables
//! `ebpf::ServiceTables` writes; and their counters become `sockmesh routes` and `/metrics`.

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddr};

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

/// Prometheus lines: connects routed per (service, subset, endpoint) and the table generation.
pub fn metrics(o: &mut String, v: &Value) {
    let _ = writeln!(
        o,
        "# HELP sockmesh_kernel_routed_connects_total Connects routed inside connect() to an endpoint.\n# TYPE sockmesh_kernel_routed_connects_total counter"
    );
    for s in v["services"].as_array().cloned().unwrap_or_default() {
        for e in s["entries"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                o,
                "sockmesh_kernel_routed_connects_total{{service=\"{}\",subset=\"{}\",endpoint=\"{}\"}} {}",
                s["name"].as_str().unwrap_or("?"),
                e["subset"].as_str().unwrap_or("?"),
                e["endpoint"].as_str().unwrap_or("?"),
                e["connects"].as_u64().unwrap_or(0)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP sockmesh_kernel_routes_generation Generation of the kernel service tables.\n# TYPE sockmesh_kernel_routes_generation gauge"
    );
    let _ = writeln!(
        o,
        "sockmesh_kernel_routes_generation {}",
        v["generation"].as_u64().unwrap_or(0)
    );
}
