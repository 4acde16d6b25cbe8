//! Prometheus text exposition on a small HTTP/1.0 responder (`GET /metrics`, `GET /healthz`).
//! Requests are read with a size and time limit; anything else gets 400/404.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{daemon::Daemon, l7::L7Shared, routing::stats::LATENCY_BUCKETS};

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(l: TcpListener, daemon: Arc<Daemon>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let complete = tokio::time::timeout(READ_TIMEOUT, async {
                loop {
                    let n = s.read(&mut buf).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                        return Some(());
                    }
                    if head.len() > MAX_REQUEST_HEAD {
                        return None;
                    }
                }
            })
            .await;
            let (code, body) = match complete {
                Ok(Some(())) => route(&head, &daemon),
                _ => ("400 Bad Request", "bad request\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

fn route(head: &[u8], daemon: &Daemon) -> (&'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render(daemon)),
        (Some("GET"), Some("/healthz")) => ("200 OK", "ok\n".into()),
        (Some("GET"), Some("/ready")) if READY.load(std::sync::atomic::Ordering::Relaxed) => {
            ("200 OK", "ready\n".into())
        }
        (Some("GET"), Some("/ready")) => ("503 Service Unavailable", "starting\n".into()),
        (Some(_), Some(_)) => ("404 Not Found", "not found\n".into()),
        _ => ("400 Bad Request", "bad request\n".into()),
    }
}

/// Set once the daemon has enrolled its pods (and run the first CRI discovery): `/ready`.
static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_ready() {
    READY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Escape a label value per the exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(daemon: &Daemon) -> String {
    let m = daemon.metrics_snapshot();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP sockmesh_pods_enrolled Pods currently enrolled.\n# TYPE sockmesh_pods_enrolled gauge"
    );
    let _ = writeln!(o, "sockmesh_pods_enrolled {}", m.pods.len());
    let _ = writeln!(o, "# HELP sockmesh_connections_total Connections proxied, per pod.\n# TYPE sockmesh_connections_total counter");
    for p in &m.pods {
        let _ = writeln!(
            o,
            "sockmesh_connections_total{{pod=\"{}\"}} {}",
            label(&p.name),
            p.connections_total
        );
    }
    let _ = writeln!(o, "# HELP sockmesh_connections_active Connections open now, per pod.\n# TYPE sockmesh_connections_active gauge");
    for p in &m.pods {
        let _ = writeln!(
            o,
            "sockmesh_connections_active{{pod=\"{}\"}} {}",
            label(&p.name),
            p.connections_active
        );
    }
    let _ = writeln!(o, "# HELP sockmesh_bytes_total Bytes relayed, per pod and direction.\n# TYPE sockmesh_bytes_total counter");
    for p in &m.pods {
        let n = label(&p.name);
        let _ = writeln!(
            o,
            "sockmesh_bytes_total{{pod=\"{n}\",direction=\"upstream\"}} {}",
            p.bytes_upstream
        );
        let _ = writeln!(
            o,
            "sockmesh_bytes_total{{pod=\"{n}\",direction=\"downstream\"}} {}",
            p.bytes_downstream
        );
    }
    let _ = writeln!(
        o,
        "# HELP sockmesh_propagation_available Kernel colour propagation is attached (1) or unavailable (0).\n# TYPE sockmesh_propagation_available gauge"
    );
    let _ = writeln!(
        o,
        "sockmesh_propagation_available {}",
        u8::from(m.propagation_available)
    );
    let _ = writeln!(o, "# HELP sockmesh_kernel_events_total Kernel hook outcomes by reason.\n# TYPE sockmesh_kernel_events_total counter");
    for (r, v) in &m.kernel {
        let _ = writeln!(o, "sockmesh_kernel_events_total{{reason=\"{r}\"}} {v}");
    }
    let _ = writeln!(o, "# HELP sockmesh_proxy_errors_total Connections the proxy dropped, by reason.\n# TYPE sockmesh_proxy_errors_total counter");
    for (r, v) in &m.errors {
        let _ = writeln!(o, "sockmesh_proxy_errors_total{{reason=\"{r}\"}} {v}");
    }
    let _ = writeln!(o, "# HELP sockmesh_admin_errors_total Admin requests refused, by reason.\n# TYPE sockmesh_admin_errors_total counter");
    for (r, v) in &m.admin_errors {
        let _ = writeln!(o, "sockmesh_admin_errors_total{{reason=\"{r}\"}} {v}");
    }
    render_k8s(&mut o);
    render_l7(&mut o, daemon.l7());
    daemon.render_links(&mut o);
    crate::kroute::metrics(&mut o, &daemon.kernel_routes());
    o
}

/// The Kubernetes integration's counters (zero without `[kubernetes]`).
fn render_k8s(o: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let k = &crate::k8s::STATS;
    let _ = writeln!(o, "# HELP sockmesh_k8s_cni_add_total CNI ADDs by outcome: enrolled during ADD (opt-in annotation), not_selected (left to discovery), failed (opted in but refused; discovery retries).\n# TYPE sockmesh_k8s_cni_add_total counter");
    for (r, v) in [
        ("enrolled", &k.add_enrolled),
        ("not_selected", &k.add_not_selected),
        ("failed", &k.add_failed),
    ] {
        let _ = writeln!(
            o,
            "sockmesh_k8s_cni_add_total{{result=\"{r}\"}} {}",
            v.load(Relaxed)
        );
    }
    let _ = writeln!(o, "# HELP sockmesh_k8s_cni_rechained_total Times the node's CNI config lost sockmesh-cni and the agent chained it back.\n# TYPE sockmesh_k8s_cni_rechained_total counter");
    let _ = writeln!(
        o,
        "sockmesh_k8s_cni_rechained_total {}",
        k.cni_rechained.load(Relaxed)
    );
    let _ = writeln!(o, "# HELP sockmesh_k8s_cni_check_errors_total Checks of the node's CNI config that could not read, parse or write it.\n# TYPE sockmesh_k8s_cni_check_errors_total counter");
    let _ = writeln!(
        o,
        "sockmesh_k8s_cni_check_errors_total {}",
        k.cni_rechain_errors.load(Relaxed)
    );
}

/// Per-route request metrics of the live policy and protocol errors.
fn render_l7(o: &mut String, l7: &L7Shared) {
    let policy = l7.router.current();
    let stats: Vec<_> = policy.stats().iter().map(|s| s.view()).collect();
    let labels = |s: &crate::routing::RouteStatsView| {
        format!(
            "service=\"{}\",route=\"{}\",subset=\"{}\"",
            label(&s.service),
            label(&s.route),
            label(&s.subset)
        )
    };
    let _ = writeln!(o, "# HELP sockmesh_routing_policy_generation Policies applied since start (0: the config file's).\n# TYPE sockmesh_routing_policy_generation gauge");
    let _ = writeln!(o, "sockmesh_routing_policy_generation {}", policy.generation());
    let _ = writeln!(o, "# HELP sockmesh_requests_total Requests routed (opaque TCP: connections), per service, route and subset.\n# TYPE sockmesh_requests_total counter");
    for s in &stats {
        let _ = writeln!(o, "sockmesh_requests_total{{{}}} {}", labels(s), s.requests);
    }
    let _ = writeln!(o, "# HELP sockmesh_request_failures_total Requests the proxy answered for or closed, by reason.\n# TYPE sockmesh_request_failures_total counter");
    for s in &stats {
        for (r, v) in &s.failures {
            let _ = writeln!(
                o,
                "sockmesh_request_failures_total{{{},reason=\"{}\"}} {v}",
                labels(s),
                label(r)
            );
        }
    }
    let _ = writeln!(o, "# HELP sockmesh_request_retries_total Extra attempts made for requests.\n# TYPE sockmesh_request_retries_total counter");
    for s in &stats {
        let _ = writeln!(o, "sockmesh_request_retries_total{{{}}} {}", labels(s), s.retries);
    }
    let _ = writeln!(o, "# HELP sockmesh_request_duration_seconds Time from request to response (opaque TCP: connection lifetime).\n# TYPE sockmesh_request_duration_seconds histogram");
    for s in &stats {
        let l = labels(s);
        for (le, n) in LATENCY_BUCKETS.iter().zip(&s.latency_buckets) {
            let _ = writeln!(
                o,
                "sockmesh_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "sockmesh_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
            s.requests
        );
        let _ = writeln!(
            o,
            "sockmesh_request_duration_seconds_sum{{{l}}} {}",
            s.latency_sum_seconds
        );
        let _ = writeln!(o, "sockmesh_request_duration_seconds_count{{{l}}} {}", s.requests);
    }
    render_colours(o, &policy);
    let _ = writeln!(o, "# HELP sockmesh_protocol_errors_total Bad input and routing failures per protocol, by reason.\n# TYPE sockmesh_protocol_errors_total counter");
    for ((p, r), v) in l7.errors.snapshot() {
        let _ = writeln!(
            o,
            "sockmesh_protocol_errors_total{{protocol=\"{p}\",reason=\"{r}\"}} {v}"
        );
    }
}

/// Colour counters (only when the policy defines colours).
fn render_colours(o: &mut String, policy: &crate::routing::Policy) {
    if !policy.colouring() {
        return;
    }
    let v = policy.colour_stats().view();
    let per = [
        (
            "sockmesh_colour_requests_total",
            "Requests routed, per service and colour.",
            0,
        ),
        (
            "sockmesh_colour_fallbacks_total",
            "Coloured requests served by base endpoints (no endpoint of their colour, fallback = base).",
            1,
        ),
        (
            "sockmesh_colour_unavailable_total",
            "Coloured requests refused: no endpoint of their colour and fallback = none.",
            2,
        ),
    ];
    for (name, help, which) in per {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for c in &v.per_service {
            let n = [c.requests, c.fallbacks, c.unavailable][which];
            let _ = writeln!(
                o,
                "{name}{{service=\"{}\",colour=\"{}\"}} {n}",
                label(&c.service),
                label(&c.colour)
            );
        }
    }
    let _ = writeln!(o, "# HELP sockmesh_colour_source_total Requests by where their colour came from (none: base).\n# TYPE sockmesh_colour_source_total counter");
    for (src, n) in &v.by_source {
        let _ = writeln!(o, "sockmesh_colour_source_total{{source=\"{src}\"}} {n}");
    }
    let _ = writeln!(o, "# HELP sockmesh_colour_stripped_total Colour headers dropped because the request came from outside the mesh.\n# TYPE sockmesh_colour_stripped_total counter");
    let _ = writeln!(o, "sockmesh_colour_stripped_total {}", v.stripped);
    let _ = writeln!(o, "# HELP sockmesh_colour_invalid_total Colour headers from inside the mesh that named no colour (ignored).\n# TYPE sockmesh_colour_invalid_total counter");
    let _ = writeln!(o, "sockmesh_colour_invalid_total {}", v.invalid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metrics_are_labelled_and_cumulative() {
        use crate::routing::{compile, parse_toml, Outcome, Router};
        let raw = parse_toml(
            r#"
            [[services]]
            name = "orders"
            addresses = ["10.96.0.10:80"]
            endpoints = [{ address = "10.0.0.1:80", labels = { version = "v1" } }]
            "#,
        )
        .unwrap();
        let l7 = L7Shared {
            router: Router::new(compile(raw).unwrap()),
            ..Default::default()
        };
        let d = l7
            .router
            .current()
            .route_tcp("10.96.0.10:80".parse().unwrap())
            .unwrap();
        d.stats.record(Outcome::Answered, Duration::from_millis(2));
        d.stats.record(Outcome::Failed("timeout"), Duration::from_secs(1));
        l7.errors.count("bolt", "bad_magic");
        let mut o = String::new();
        render_l7(&mut o, &l7);
        let l = r#"service="orders",route="default",subset="all""#;
        for want in [
            format!("sockmesh_requests_total{{{l}}} 2"),
            format!("sockmesh_request_failures_total{{{l},reason=\"timeout\"}} 1"),
            format!("sockmesh_request_duration_seconds_bucket{{{l},le=\"0.0025\"}} 1"),
            format!("sockmesh_request_duration_seconds_bucket{{{l},le=\"1\"}} 2"),
            format!("sockmesh_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2"),
            format!("sockmesh_request_duration_seconds_count{{{l}}} 2"),
            "sockmesh_protocol_errors_total{protocol=\"bolt\",reason=\"bad_magic\"} 1".to_string(),
            "sockmesh_routing_policy_generation 0".to_string(),
        ] {
            assert!(o.lines().any(|x| x == want), "missing `{want}` in\n{o}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
