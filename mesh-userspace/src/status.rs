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
        "sockmesh on {} (kernel {}), up {}s; acceleration: {} ({})",
        s(&st["cgroup_root"]),
        s(&st["kernel"]["release"]),
        s(&st["uptime_s"]),
        if accel["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        s(&accel["detail"])
    );
    let pods = st["pods"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "\nPods ({}):", pods.len());
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            let listeners = p["listeners"]
                .as_array()
                .map(|l| l.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
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
            ]
        })
        .collect();
    table(
        &mut o,
        &["POD", "CGROUP ID", "NETNS", "LISTENERS", "ACTIVE", "TOTAL"],
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
    o
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
            "acceleration": {"enabled": false, "detail": "off in config"},
            "pods": [{"name": "web", "cgroup_id": 9, "netns": "/run/netns/web", "external_proxy": false,
                       "listeners": ["127.0.0.1:15001"], "connections_active": 1, "connections_total": 2}],
            "connections": [{"id": 1, "pod": "web", "client": "127.0.0.1:40000", "original_dst": "198.18.0.3:80",
                              "upstream_local": "198.18.0.2:5000", "bytes_to_upstream": 10, "bytes_to_client": 20, "age_ms": 5}],
            "counters": {"connect_captured": 2, "connect_not_enrolled": 0},
            "proxy_errors": {"relay_reset": 0}
        });
        let out = render(&st);
        assert!(out.contains("198.18.0.3:80"), "{out}");
        assert!(out.contains("connect_captured"), "{out}");
        assert!(!out.contains("connect_not_enrolled"), "{out}");
        assert!(!out.contains("Proxy errors"), "{out}");
        assert!(out.contains("web"), "{out}");
    }
}
