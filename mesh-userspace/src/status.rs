//! The human `sockmesh status` view of the daemon's JSON status.

use std::fmt::Write as _;

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Left-aligned columns sized to their widest cell.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(
        out,
        "  {}",
        line(head.iter().map(|h| h.to_string()).collect()).trim_end()
    );
    for r in rows {
        let _ = writeln!(out, "  {}", line(r.clone()).trim_end());
    }
}

pub fn render(st: &Value) -> String {
    let mut o = String::new();
    let accel = &st["acceleration"];
    let _ = writeln!(
        o,
        "sockmesh on {} (kernel {}), up {}s, {} proxy workers; acceleration: {} ({})",
        s(&st["cgroup_root"]),
        s(&st["kernel"]["release"]),
        s(&st["uptime_s"]),
        s(&st["workers"]),
        if accel["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        s(&accel["detail"])
    );
    if let Some(per) = st["worker_connections"].as_array() {
        let per: Vec<String> = per
            .iter()
            .enumerate()
            .map(|(i, n)| format!("w{i} {}", s(n)))
            .collect();
        let _ = writeln!(o, "connections accepted per worker: {}", per.join(", "));
    }
    if !st["generation"].is_null() {
        o.push_str(&crate::upgrade::render_status(&st["generation"], &st["upgrade"]));
    }
    if st["kernel_routes"].is_object() {
        o.push_str(crate::kroute::render(&st["kernel_routes"]).trim_start());
    }
    let fds = &st["open_files"];
    if !fds.is_null() {
        let _ = writeln!(
            o,
            "open files: {} of {} (hard limit {}); connections per pod at most {}",
            s(&fds["open"]),
            s(&fds["limit"]),
            s(&fds["hard_limit"]),
            match fds["per_pod_connection_cap"].as_u64() {
                Some(0) => "unlimited".to_string(),
                _ => s(&fds["per_pod_connection_cap"]),
            }
        );
    }
    let prop = &st["propagation"];
    if !prop.is_null() {
        let _ = writeln!(o, "colour propagation: {}", s(&prop["state"]));
        if prop["available"].as_bool() == Some(true) {
            let pods = prop["pods"]
                .as_array()
                .map(|l| l.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  pods: {}; inbound colour entries {}, coloured threads {}, ledgers {}",
                if pods.is_empty() { "-".to_string() } else { pods },
                s(&prop["inbound_entries"]),
                s(&prop["thread_entries"]),
                s(&prop["ledgers"]),
            );
            let counters = prop["counters"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {}", s(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let _ = writeln!(o, "  {counters}");
        }
    }
    let pods = st["pods"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "\nPods ({}):", pods.len());
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            // `addr×n`: an SO_REUSEPORT group of n sockets (one per worker).
            let listeners = match p["listener_groups"].as_array().filter(|g| !g.is_empty()) {
                Some(groups) => groups
                    .iter()
                    .map(|g| match g["members"].as_u64() {
                        Some(n) if n > 1 => format!("{}×{n}", s(&g["address"])),
                        _ => s(&g["address"]),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                None => p["listeners"]
                    .as_array()
                    .map(|l| l.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            };
            vec![
                s(&p["name"]),
                s(&p["cgroup_id"]),
                s(&p["netns"]),
                if p["external_proxy"].as_bool() == Some(true) {
                    "external proxy".into()
                } else {
                    listeners
                },
                s(&p["connections_active"]),
                s(&p["connections_total"]),
                p["colour"].as_str().unwrap_or("base").to_owned(),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "POD",
            "CGROUP ID",
            "NETNS",
            "LISTENERS",
            "ACTIVE",
            "TOTAL",
            "COLOUR",
        ],
        &rows,
    );
    let conns = st["connections"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "\nLive connections ({}):", conns.len());
    let rows: Vec<Vec<String>> = conns
        .iter()
        .map(|c| {
            vec![
                s(&c["id"]),
                s(&c["pod"]),
                s(&c["direction"]),
                s(&c["client"]),
                s(&c["original_dst"]),
                s(&c["upstream_local"]),
                s(&c["bytes_to_upstream"]),
                s(&c["bytes_to_client"]),
                s(&c["age_ms"]),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "ID",
            "POD",
            "DIR",
            "PEER",
            "ORIGINAL DST",
            "UPSTREAM FROM",
            "BYTES UP",
            "BYTES DOWN",
            "AGE MS",
        ],
        &rows,
    );
    let _ = writeln!(o, "\nKernel counters (non-zero):");
    let rows: Vec<Vec<String>> = st["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| vec![k.clone(), s(v)])
                .collect()
        })
        .unwrap_or_default();
    table(&mut o, &["REASON", "COUNT"], &rows);
    let errs: Vec<Vec<String>> = st["proxy_errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| vec![k.clone(), s(v)])
                .collect()
        })
        .unwrap_or_default();
    if !errs.is_empty() {
        let _ = writeln!(o, "\nProxy errors:");
        table(&mut o, &["REASON", "COUNT"], &errs);
    }
    if st["links"]["links"].as_array().is_some_and(|l| !l.is_empty()) {
        o.push('\n');
        o.push_str(&render_links(&st["links"]));
    }
    o
}

/// Dual links (`sockmesh switch`, and a section of `status`): states, shares, applied limits,
/// the switch in progress with a progress bar, requests by outcome, the last steps.
pub fn render_links(v: &Value) -> String {
    let mut o = String::new();
    let links = v["links"].as_array().cloned().unwrap_or_default();
    if links.is_empty() {
        let _ = writeln!(o, "links: none (the policy defines no [[links]])");
        return o;
    }
    let _ = writeln!(o, "Links:");
    let rows: Vec<Vec<String>> = links
        .iter()
        .map(|l| {
            let applied: Vec<String> = l["cgroups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let knobs: Vec<String> = c["applied"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", s(v)))
                        .collect();
                    format!("{}: {}", s(&c["pod"]), knobs.join(" "))
                })
                .collect();
            vec![
                s(&l["name"]),
                s(&l["state"]),
                format!("{:.2} %", l["local_share_percent"].as_f64().unwrap_or(0.0)),
                match l["trickle_per_second"].as_f64() {
                    Some(r) => format!("{r}/s"),
                    None => format!("{} %", s(&l["trickle_percent"])),
                },
                if applied.is_empty() {
                    "-".into()
                } else {
                    applied.join("; ")
                },
            ]
        })
        .collect();
    table(
        &mut o,
        &["LINK", "STATE", "LOCAL SHARE", "TRICKLE", "APPLIED LIMITS"],
        &rows,
    );
    let sw = &v["switch"];
    match sw.is_object() {
        true => {
            let done = sw["done"].as_u64().unwrap_or(0);
            let steps = sw["steps"].as_u64().unwrap_or(1).max(1);
            let filled = (done * 30 / steps) as usize;
            let _ = writeln!(
                o,
                "switch {} -> {}: [{}{}] {done}/{steps} steps, {} ms of {} ms{}",
                s(&sw["from"]),
                s(&sw["to"]),
                "#".repeat(filled),
                ".".repeat(30 - filled),
                s(&sw["elapsed_ms"]),
                s(&sw["over_ms"]),
                if sw["paused"] == true { " (paused)" } else { "" }
            );
        }
        false => {
            let _ = writeln!(
                o,
                "no switch in progress; {} done, last took {} ms; errors {}",
                s(&v["switches_total"]),
                s(&v["last_switch_ms"]),
                s(&v["errors_total"])
            );
        }
    }
    let reqs: Vec<Vec<String>> = v["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["service"]),
                s(&c["link"]),
                s(&c["outcome"]),
                s(&c["requests"]),
            ]
        })
        .collect();
    if !reqs.is_empty() {
        table(&mut o, &["SERVICE", "LINK", "OUTCOME", "REQUESTS"], &reqs);
    }
    let log = v["log"].as_array().cloned().unwrap_or_default();
    for l in log.iter().rev().take(5).rev() {
        let _ = writeln!(o, "  | {}", log_line(&s(l)));
    }
    o
}

/// A link log line (`<unix ms> <message>`) with its time as `HH:MM:SS.mmm` UTC.
fn log_line(l: &str) -> String {
    match l
        .split_once(' ')
        .and_then(|(t, m)| Some((t.parse::<u64>().ok()?, m)))
    {
        Some((ms, m)) => {
            let day_ms = ms % 86_400_000;
            format!(
                "{:02}:{:02}:{:02}.{:03} {m}",
                day_ms / 3_600_000,
                day_ms / 60_000 % 60,
                day_ms / 1000 % 60,
                day_ms % 1000
            )
        }
        None => l.to_owned(),
    }
}

/// `sockmesh routes` as text: per service its subsets, then each route with its match, split
/// and counters (requests, failures, p50-ish from the histogram is left to Prometheus).
pub fn render_routes(v: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "routing policy generation {} (detect timeout {} ms)",
        v["generation"].as_u64().unwrap_or(0),
        v["detect_timeout_ms"].as_u64().unwrap_or(0)
    );
    let services = v["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        let _ = writeln!(
            o,
            "no services: every connection is relayed to its original destination"
        );
    }
    for s in &services {
        let _ = writeln!(
            o,
            "\nservice {} ({})",
            s["name"].as_str().unwrap_or("?"),
            s["protocol"].as_str().unwrap_or("?")
        );
        if let Some(subsets) = s["subsets"].as_object() {
            for (name, eps) in subsets {
                let eps: Vec<&str> = eps
                    .as_array()
                    .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
                    .unwrap_or_default();
                let coloured: Vec<String> = eps
                    .iter()
                    .map(|e| match s["endpoint_colours"][*e].as_str() {
                        Some(c) => format!("{e} ({c})"),
                        None => (*e).to_owned(),
                    })
                    .collect();
                let _ = writeln!(o, "  subset {name}: {}", coloured.join(", "));
            }
        }
        for r in s["routes"].as_array().cloned().unwrap_or_default() {
            let m = match r["match"].as_object() {
                Some(m) if !m.is_empty() => serde_json::to_string(m).unwrap_or_default(),
                _ => "any".into(),
            };
            let _ = writeln!(
                o,
                "  route {} match {m} timeout {} ms retries {}",
                r["name"].as_str().unwrap_or("?"),
                r["timeout_ms"].as_u64().unwrap_or(0),
                r["retries"].as_u64().unwrap_or(0)
            );
            for p in r["split"].as_array().cloned().unwrap_or_default() {
                let st = &p["stats"];
                let failures: u64 = st["failures"]
                    .as_object()
                    .map(|f| f.values().filter_map(|x| x.as_u64()).sum())
                    .unwrap_or(0);
                let _ = writeln!(
                    o,
                    "    -> {:<12} weight {:>7}  requests {:>9}  failures {:>7}  retries {:>6}",
                    p["subset"].as_str().unwrap_or("?"),
                    p["weight"].as_u64().unwrap_or(0),
                    st["requests"].as_u64().unwrap_or(0),
                    failures,
                    st["retries"].as_u64().unwrap_or(0)
                );
            }
        }
    }
    let pt = &v["passthrough"];
    let _ = writeln!(
        o,
        "\npassthrough (no service matched): requests {}",
        pt["requests"].as_u64().unwrap_or(0)
    );
    render_colours(&mut o, v);
    if v["kernel"].is_object() {
        o.push_str(&crate::kroute::render(&v["kernel"]));
    }
    o
}

/// The colour table and its counters, when the policy has colours.
fn render_colours(o: &mut String, v: &Value) {
    let colours = v["colours"].as_array().cloned().unwrap_or_default();
    if colours.is_empty() {
        return;
    }
    let names: Vec<String> = colours
        .iter()
        .map(|c| {
            format!(
                "{} (id {}, fallback {})",
                s(&c["name"]),
                s(&c["id"]),
                s(&c["fallback"])
            )
        })
        .collect();
    let _ = writeln!(o, "\ncolours: {}", names.join(", "));
    let cs = &v["colour_stats"];
    let rows: Vec<Vec<String>> = cs["per_service"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            vec![
                s(&c["service"]),
                s(&c["colour"]),
                s(&c["requests"]),
                s(&c["fallbacks"]),
                s(&c["unavailable"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            o,
            &["SERVICE", "COLOUR", "REQUESTS", "FELL BACK", "UNAVAILABLE"],
            &rows,
        );
    }
    let sources: Vec<String> = cs["by_source"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} {}", s(n))).collect())
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "colour sources: {}; stripped (from outside the mesh) {}; invalid {}",
        if sources.is_empty() {
            "-".into()
        } else {
            sources.join(", ")
        },
        s(&cs["stripped"]),
        s(&cs["invalid"])
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pods_connections_and_nonzero_counters() {
        let st = serde_json::json!({
            "cgroup_root": "/sys/fs/cgroup/x",
            "kernel": {"release": "6.18"},
            "uptime_s": 3,
            "workers": 2,
            "worker_connections": [7, 5],
            "acceleration": {"enabled": false, "detail": "off in config"},
            "pods": [{"name": "web", "cgroup_id": 9, "netns": "/run/netns/web", "external_proxy": false,
                       "listeners": ["127.0.0.1:15001", "[::1]:15001"],
                       "listener_groups": [{"address": "127.0.0.1:15001", "members": 2}, {"address": "[::1]:15001", "members": 1}],
                       "connections_active": 1, "connections_total": 2}],
            "connections": [{"id": 1, "pod": "web", "client": "127.0.0.1:40000", "original_dst": "198.18.0.3:80",
                              "upstream_local": "198.18.0.2:5000", "bytes_to_upstream": 10, "bytes_to_client": 20, "age_ms": 5}],
            "counters": {"connect_captured": 2, "connect_not_enrolled": 0},
            "proxy_errors": {"relay_reset": 0}
        });
        let out = render(&st);
        assert!(out.contains("198.18.0.3:80"), "{out}");
        assert!(out.contains("127.0.0.1:15001×2,[::1]:15001 "), "{out}");
        assert!(out.contains("connect_captured"), "{out}");
        assert!(!out.contains("connect_not_enrolled"), "{out}");
        assert!(!out.contains("Proxy errors"), "{out}");
        assert!(out.contains("web"), "{out}");
        assert!(out.contains("up 3s, 2 proxy workers"), "{out}");
        assert!(
            out.contains("connections accepted per worker: w0 7, w1 5"),
            "{out}"
        );
    }
}
