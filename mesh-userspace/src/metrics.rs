//! Prometheus metrics through the `prometheus-client` crate: one [`Collector`] encodes the
//! daemon's snapshots at scrape time (OpenMetrics text), on a small HTTP/1.0 responder
//! (`GET /metrics`, `GET /healthz`, `GET /ready`). Requests are read with a size and time
//! limit; anything else gets 400/404.

use std::{
    fmt::{self, Write as _},
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder, NoLabelSet,
    },
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{
    daemon::{Daemon, MetricsSnapshot},
    l7::L7Shared,
    routing::stats::LATENCY_BUCKETS,
};

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(l: TcpListener, daemon: Arc<Daemon>) {
    let registry = Arc::new(registry(daemon));
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let registry = registry.clone();
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
            let (code, content_type, body) = match complete {
                Ok(Some(())) => route(&head, &registry),
                _ => ("400 Bad Request", TEXT, "bad request\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn route(head: &[u8], registry: &Registry) -> (&'static str, &'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", CONTENT_TYPE, render(registry)),
        (Some("GET"), Some("/healthz")) => ("200 OK", TEXT, "ok\n".into()),
        (Some("GET"), Some("/ready")) if READY.load(std::sync::atomic::Ordering::Relaxed) => {
            ("200 OK", TEXT, "ready\n".into())
        }
        (Some("GET"), Some("/ready")) => ("503 Service Unavailable", TEXT, "starting\n".into()),
        (Some(_), Some(_)) => ("404 Not Found", TEXT, "not found\n".into()),
        _ => ("400 Bad Request", TEXT, "bad request\n".into()),
    }
}

/// Set once the daemon has enrolled its pods (and run the first CRI discovery): `/ready`.
static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_ready() {
    READY.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn is_ready() -> bool {
    READY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Escape a label value per the exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `/metrics`: OpenMetrics text (the crate's only text format); Prometheus negotiates it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label value, escaped (the crate writes label values as they are).
struct Esc<'a>(&'a str);

impl EncodeLabelValue for Esc<'_> {
    fn encode(&self, e: &mut LabelValueEncoder) -> fmt::Result {
        e.write_str(&label(self.0))
    }
}

type Labels<'a> = Vec<(&'static str, Esc<'a>)>;

/// One counter family (`name` ends in `_total`: the crate writes the suffix itself, and the
/// family name without it, as OpenMetrics wants).
fn counter<'a, L: EncodeLabelSet + 'a>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    let mut m = d.encode_descriptor(base, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter1(d: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    ConstCounter::new(v).encode(d.encode_descriptor(base, help, None, MetricType::Counter)?)
}

fn gauge<'a, L: EncodeLabelSet + 'a, V: EncodeGaugeValue + fmt::Debug>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = d.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge1<V: EncodeGaugeValue + fmt::Debug>(
    d: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    ConstGauge::new(v).encode(d.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Everything one scrape reads, taken from the daemon at scrape time (no second bookkeeping).
pub struct Scrape<'a> {
    pub daemon: MetricsSnapshot,
    pub l7: &'a L7Shared,
    /// Kernel-routed connects and the table generation ([`crate::kroute::metric_rows`]).
    pub kernel_routes: (Vec<crate::kroute::RoutedConnects>, u64),
    /// Dual links ([`crate::links::LinkManager::metric_rows`]).
    pub links: crate::links::LinkMetrics,
}

/// The daemon's metrics, collected at every scrape.
struct DaemonCollector(Arc<Daemon>);

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonCollector")
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut d: DescriptorEncoder) -> fmt::Result {
        let daemon = &self.0;
        encode_scrape(
            &mut d,
            &Scrape {
                daemon: daemon.metrics_snapshot(),
                l7: daemon.l7(),
                kernel_routes: crate::kroute::metric_rows(&daemon.kernel_routes()),
                links: daemon.link_metrics(),
            },
        )
    }
}

/// The registry `/metrics` encodes: one collector reading the daemon.
pub fn registry(daemon: Arc<Daemon>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DaemonCollector(daemon)));
    r
}

/// The exposition of a registry (OpenMetrics text, `# EOF` last).
pub fn render(r: &Registry) -> String {
    let mut o = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut o, r) {
        tracing::warn!("metrics encoding failed: {e}");
    }
    o
}

pub fn encode_scrape(d: &mut DescriptorEncoder, s: &Scrape) -> fmt::Result {
    let m = &s.daemon;
    fn pod(p: &crate::daemon::PodMetrics) -> Labels<'_> {
        vec![("pod", Esc(&p.name))]
    }
    gauge1(
        d,
        "sockmesh_pods_enrolled",
        "Pods currently enrolled.",
        m.pods.len() as u64,
    )?;
    counter(
        d,
        "sockmesh_connections_total",
        "Connections proxied, per pod.",
        m.pods.iter().map(|p| (pod(p), p.connections_total)),
    )?;
    gauge(
        d,
        "sockmesh_connections_active",
        "Connections open now, per pod.",
        m.pods.iter().map(|p| (pod(p), p.connections_active)),
    )?;
    let workers: Vec<String> = (0..m.worker_connections.len()).map(|i| i.to_string()).collect();
    counter(
        d,
        "sockmesh_worker_connections_total",
        "Connections accepted, per proxy worker (each serves its connections to the end).",
        workers
            .iter()
            .zip(&m.worker_connections)
            .map(|(w, n)| (vec![("worker", Esc(w))], *n)),
    )?;
    counter(
        d,
        "sockmesh_bytes_total",
        "Bytes relayed, per pod and direction.",
        m.pods.iter().flat_map(|p| {
            [
                (
                    vec![("pod", Esc(&p.name)), ("direction", Esc("upstream"))],
                    p.bytes_upstream,
                ),
                (
                    vec![("pod", Esc(&p.name)), ("direction", Esc("downstream"))],
                    p.bytes_downstream,
                ),
            ]
        }),
    )?;
    gauge1(
        d,
        "sockmesh_propagation_available",
        "Kernel colour propagation is attached (1) or unavailable (0).",
        u64::from(m.propagation_available),
    )?;
    let by_reason = |rows: &[(&'static str, u64)]| -> Vec<(Labels<'static>, u64)> {
        rows.iter().map(|(r, v)| (vec![("reason", Esc(r))], *v)).collect()
    };
    counter(
        d,
        "sockmesh_kernel_events_total",
        "Kernel hook outcomes by reason.",
        by_reason(&m.kernel),
    )?;
    counter(
        d,
        "sockmesh_proxy_errors_total",
        "Connections the proxy dropped, by reason.",
        by_reason(&m.errors),
    )?;
    counter(
        d,
        "sockmesh_admin_errors_total",
        "Admin requests refused, by reason.",
        by_reason(&m.admin_errors),
    )?;
    encode_k8s(d)?;
    encode_l7(d, s.l7)?;
    encode_links(d, &s.links)?;
    let (connects, generation) = &s.kernel_routes;
    counter(
        d,
        "sockmesh_kernel_routed_connects_total",
        "Connects routed inside connect() to an endpoint.",
        connects.iter().map(|c| {
            (
                vec![
                    ("service", Esc(&c.service)),
                    ("subset", Esc(&c.subset)),
                    ("endpoint", Esc(&c.endpoint)),
                ],
                c.connects,
            )
        }),
    )?;
    gauge1(
        d,
        "sockmesh_kernel_routes_generation",
        "Generation of the kernel service tables.",
        *generation,
    )
}

/// The Kubernetes integration's counters (zero without `[kubernetes]`).
fn encode_k8s(d: &mut DescriptorEncoder) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    let k = &crate::k8s::STATS;
    counter(
        d,
        "sockmesh_k8s_cni_add_total",
        "CNI ADDs by outcome: enrolled during ADD (opt-in annotation), not_selected (left to discovery), failed (opted in but refused; discovery retries).",
        [
            ("enrolled", &k.add_enrolled),
            ("not_selected", &k.add_not_selected),
            ("failed", &k.add_failed),
        ]
        .map(|(r, v)| (vec![("result", Esc(r))], v.load(Relaxed))),
    )?;
    counter1(
        d,
        "sockmesh_k8s_cni_rechained_total",
        "Times the node's CNI config lost sockmesh-cni and the agent chained it back.",
        k.cni_rechained.load(Relaxed),
    )?;
    counter1(
        d,
        "sockmesh_k8s_cni_check_errors_total",
        "Checks of the node's CNI config that could not read, parse or write it.",
        k.cni_rechain_errors.load(Relaxed),
    )?;
    counter(
        d,
        "sockmesh_k8s_link_cgroups_total",
        "Linked pods' container cgroups (sockmesh.io/links) registered, or refused (bad annotation, unknown link, kernel refused a value).",
        [("registered", &k.links_registered), ("refused", &k.link_errors)]
            .map(|(r, v)| (vec![("result", Esc(r))], v.load(Relaxed))),
    )
}

/// Per-route request metrics of the live policy and protocol errors.
fn encode_l7(d: &mut DescriptorEncoder, l7: &L7Shared) -> fmt::Result {
    let policy = l7.router.current();
    let stats: Vec<_> = policy.stats().iter().map(|s| s.view()).collect();
    fn route(s: &crate::routing::RouteStatsView) -> Labels<'_> {
        vec![
            ("service", Esc(&s.service)),
            ("route", Esc(&s.route)),
            ("subset", Esc(&s.subset)),
        ]
    }
    gauge1(
        d,
        "sockmesh_routing_policy_generation",
        "Policies applied since start (0: the config file's).",
        policy.generation(),
    )?;
    counter(
        d,
        "sockmesh_requests_total",
        "Requests routed (opaque TCP: connections), per service, route and subset.",
        stats.iter().map(|s| (route(s), s.requests)),
    )?;
    counter(
        d,
        "sockmesh_request_failures_total",
        "Requests the proxy answered for or closed, by reason.",
        stats.iter().flat_map(|s| {
            s.failures.iter().map(move |(r, v)| {
                let mut l = route(s);
                l.push(("reason", Esc(r)));
                (l, *v)
            })
        }),
    )?;
    counter(
        d,
        "sockmesh_request_retries_total",
        "Extra attempts made for requests.",
        stats.iter().map(|s| (route(s), s.retries)),
    )?;
    let mut h = d.encode_descriptor(
        "sockmesh_request_duration_seconds",
        "Time from request to response (opaque TCP: connection lifetime).",
        None,
        MetricType::Histogram,
    )?;
    for s in &stats {
        // The crate sums per-bucket counts; the view holds cumulative ones.
        let mut prev = 0;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(&s.latency_buckets)
            .map(|(le, n)| {
                let b = (*le, n.saturating_sub(prev));
                prev = *n;
                b
            })
            .collect();
        buckets.push((f64::MAX, s.requests.saturating_sub(prev)));
        h.encode_family(&route(s))?.encode_histogram::<NoLabelSet>(
            s.latency_sum_seconds,
            s.requests,
            &buckets,
            None,
        )?;
    }
    encode_colours(d, &policy)?;
    counter(
        d,
        "sockmesh_protocol_errors_total",
        "Bad input and routing failures per protocol, by reason.",
        l7.errors
            .snapshot()
            .into_iter()
            .map(|((p, r), v)| (vec![("protocol", Esc(p)), ("reason", Esc(r))], v)),
    )?;
    counter(
        d,
        "sockmesh_upgrade_moved_connections_total",
        "App connections moved to a new generation by upgrades (kept by the app), by protocol.",
        crate::upgrade::moved_totals()
            .into_iter()
            .map(|(p, v)| (vec![("protocol", Esc(p))], v)),
    )?;
    let (buckets, sum, _) = crate::upgrade::handover_wait();
    let count: u64 = buckets.iter().sum();
    let mut h = d.encode_descriptor(
        "sockmesh_upgrade_handover_wait_seconds",
        "Moved app connections this process took over, by how long each waited between the previous generation stopping it and this one serving it.",
        None,
        MetricType::Histogram,
    )?;
    let les = crate::upgrade::HANDOVER_WAIT_BUCKETS
        .iter()
        .copied()
        .chain([f64::MAX]);
    let buckets: Vec<(f64, u64)> = les.zip(buckets).collect();
    h.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    let (request, preconnect) = l7.http.connects();
    counter(
        d,
        "sockmesh_upstream_http_connects_total",
        "Upstream HTTP connections this process opened: for a request that found no pooled connection (kind=request), or ahead of traffic (kind=preconnect: a dual-link switch, a new generation before it takes over).",
        [("request", request), ("preconnect", preconnect)]
            .into_iter()
            .map(|(k, v)| (vec![("kind", Esc(k))], v)),
    )?;
    counter(
        d,
        "sockmesh_upgrade_total",
        "Upgrade hand-offs this generation took part in as the old one, by result (successor_died: handed over, then taken back when the successor died while this generation drained).",
        crate::upgrade::outcome_totals()
            .into_iter()
            .map(|(r, v)| (vec![("result", Esc(r))], v)),
    )
}

/// Colour counters (only when the policy defines colours).
fn encode_colours(d: &mut DescriptorEncoder, policy: &crate::routing::Policy) -> fmt::Result {
    if !policy.colouring() {
        return Ok(());
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
        counter(
            d,
            name,
            help,
            v.per_service.iter().map(|c| {
                (
                    vec![("service", Esc(&c.service)), ("colour", Esc(&c.colour))],
                    [c.requests, c.fallbacks, c.unavailable][which],
                )
            }),
        )?;
    }
    counter(
        d,
        "sockmesh_colour_source_total",
        "Requests by where their colour came from (none: base).",
        v.by_source
            .iter()
            .map(|(src, n)| (vec![("source", Esc(src))], *n)),
    )?;
    counter1(
        d,
        "sockmesh_colour_stripped_total",
        "Colour headers dropped because the request came from outside the mesh.",
        v.stripped,
    )?;
    counter1(
        d,
        "sockmesh_colour_invalid_total",
        "Colour headers from inside the mesh that named no colour (ignored).",
        v.invalid,
    )
}

/// Dual links: states, shares, trickle, the limits the kernel shows, switch progress.
fn encode_links(d: &mut DescriptorEncoder, m: &crate::links::LinkMetrics) -> fmt::Result {
    use crate::routing::link::LinkState;
    if m.links.is_empty() {
        return Ok(());
    }
    fn link(l: &crate::links::LinkRow) -> Labels<'_> {
        vec![("link", Esc(&l.name))]
    }
    gauge(
        d,
        "sockmesh_link_state",
        "Each link's state on this node (1 for the current one).",
        m.links.iter().flat_map(|l| {
            [LinkState::Active, LinkState::Keepalive, LinkState::Switching].map(|s| {
                (
                    vec![("link", Esc(&l.name)), ("state", Esc(s.label()))],
                    u64::from(l.state == s),
                )
            })
        }),
    )?;
    gauge(
        d,
        "sockmesh_link_local_share_ratio",
        "Share of a link's requests arriving here served by the local app.",
        m.links.iter().map(|l| (link(l), l.local_share)),
    )?;
    gauge(
        d,
        "sockmesh_link_trickle_ratio",
        "A link's keep-alive share setting (0 with a rate trickle).",
        m.links.iter().map(|l| (link(l), l.trickle_share)),
    )?;
    gauge(
        d,
        "sockmesh_link_trickle_per_second",
        "A link's keep-alive rate setting per service (links with a rate trickle).",
        m.links
            .iter()
            .filter_map(|l| Some((link(l), l.trickle_per_second?))),
    )?;
    let applied = |f: fn(&crate::links::AppliedLimits) -> Option<f64>| {
        m.links
            .iter()
            .flat_map(move |l| {
                l.applied.iter().filter_map(move |(pod, a)| {
                    Some((vec![("link", Esc(&l.name)), ("pod", Esc(pod))], f(a)?))
                })
            })
            .collect::<Vec<_>>()
    };
    gauge(
        d,
        "sockmesh_link_cpu_limit_cpus",
        "CPU cap of a link's cgroup in a pod as the kernel shows it (absent: unlimited).",
        applied(|a| a.cpus),
    )?;
    gauge(
        d,
        "sockmesh_link_cpu_weight",
        "CPU weight of a link's cgroup in a pod as the kernel shows it (v1: cpu.shares).",
        applied(|a| a.weight.map(|w| w as f64)),
    )?;
    gauge(
        d,
        "sockmesh_link_memory_high_bytes",
        "memory.high of a link's cgroup in a pod as the kernel shows it (absent: unlimited).",
        applied(|a| a.memory_high.map(|b| b as f64)),
    )?;
    counter(
        d,
        "sockmesh_link_requests_total",
        "Requests of linked services arriving here, by outcome (local, moved, kept, no_elsewhere).",
        m.requests.iter().map(|c| {
            (
                vec![
                    ("service", Esc(&c.service)),
                    ("link", Esc(&c.link)),
                    ("outcome", Esc(c.outcome)),
                ],
                c.requests,
            )
        }),
    )?;
    match m.progress {
        Some(p) => gauge1(
            d,
            "sockmesh_link_switch_progress_ratio",
            "Steps done of the switch in progress (absent: none).",
            p,
        )?,
        None => {
            // The family is declared with no sample, so a dashboard sees it exists.
            d.encode_descriptor(
                "sockmesh_link_switch_progress_ratio",
                "Steps done of the switch in progress (absent: none).",
                None,
                MetricType::Gauge,
            )?;
        }
    }
    counter1(
        d,
        "sockmesh_link_switches_total",
        "Completed switches.",
        m.switches_total,
    )?;
    if let Some(secs) = m.last_switch_seconds {
        gauge1(
            d,
            "sockmesh_link_last_switch_seconds",
            "Duration of the last completed switch.",
            secs,
        )?;
    }
    counter1(
        d,
        "sockmesh_link_errors_total",
        "Resource changes the kernel refused during switches.",
        m.errors_total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{compile, parse_toml, Outcome, Router};

    /// A collector over owned test data: what `DaemonCollector` reads from a daemon.
    struct Fixture {
        l7: L7Shared,
        links: crate::links::LinkMetrics,
    }

    impl fmt::Debug for Fixture {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Fixture")
        }
    }

    impl Collector for Fixture {
        fn encode(&self, mut d: DescriptorEncoder) -> fmt::Result {
            let daemon = MetricsSnapshot {
                pods: vec![crate::daemon::PodMetrics {
                    name: "11111111-2222-3333-4444-555555555555".into(),
                    connections_total: 3,
                    connections_active: 1,
                    bytes_upstream: 120,
                    bytes_downstream: 4096,
                }],
                kernel: vec![("connect_captured", 7), ("connect_bypassed", 2)],
                errors: vec![("upstream_refused", 1)],
                admin_errors: vec![("bad_name", 4)],
                propagation_available: true,
                worker_connections: vec![5, 6],
            };
            encode_scrape(
                &mut d,
                &Scrape {
                    daemon,
                    l7: &self.l7,
                    kernel_routes: crate::kroute::metric_rows(&serde_json::json!({
                        "generation": 7,
                        "services": [{"name": "db", "entries": [
                            {"subset": "v2", "endpoint": "10.0.2.1:5432", "connects": 100}]}]
                    })),
                    links: self.links.clone(),
                },
            )
        }
    }

    fn scrape(l7: L7Shared, links: crate::links::LinkMetrics) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(Fixture { l7, links }));
        render(&r)
    }

    /// The value of `name{labels}` (labels in any order), as the test harness's `prom_value`
    /// reads it.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (lp, v) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| lp.split(',').any(|p| p.trim() == format!("{k}=\"{v}\"")))
                .then(|| v.split_whitespace().next()?.parse().ok())?
        })
    }

    fn orders() -> L7Shared {
        let raw = parse_toml(
            r#"
            [[services]]
            name = "orders"
            addresses = ["10.96.0.10:80"]
            endpoints = [{ address = "10.0.0.1:80", labels = { version = "v1" } }]
            [[colours]]
            name = "gray"
            id = 1
            "#,
        )
        .unwrap();
        L7Shared {
            router: Router::new(compile(raw).unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn route_metrics_are_labelled_and_cumulative() {
        let l7 = orders();
        let d = l7
            .router
            .current()
            .route_tcp("10.96.0.10:80".parse().unwrap())
            .unwrap();
        d.stats.record(Outcome::Answered, Duration::from_millis(2));
        d.stats.record(Outcome::Failed("timeout"), Duration::from_secs(1));
        l7.errors.count("bolt", "bad_magic");
        let o = scrape(l7, Default::default());
        let r = [("service", "orders"), ("route", "default"), ("subset", "all")];
        let with = |extra: &[(&'static str, &'static str)]| [&r[..], extra].concat();
        for (name, labels, want) in [
            ("sockmesh_requests_total", with(&[]), 2.0),
            (
                "sockmesh_request_failures_total",
                with(&[("reason", "timeout")]),
                1.0,
            ),
            (
                "sockmesh_request_duration_seconds_bucket",
                with(&[("le", "0.0025")]),
                1.0,
            ),
            (
                "sockmesh_request_duration_seconds_bucket",
                with(&[("le", "1.0")]),
                2.0,
            ),
            (
                "sockmesh_request_duration_seconds_bucket",
                with(&[("le", "+Inf")]),
                2.0,
            ),
            ("sockmesh_request_duration_seconds_count", with(&[]), 2.0),
            ("sockmesh_request_duration_seconds_sum", with(&[]), 1.002),
            (
                "sockmesh_protocol_errors_total",
                vec![("protocol", "bolt"), ("reason", "bad_magic")],
                1.0,
            ),
            ("sockmesh_routing_policy_generation", vec![], 0.0),
        ] {
            assert_eq!(value(&o, name, &labels), Some(want), "{name}{labels:?} in\n{o}");
        }
        let o: String = o
            .lines()
            .filter(|x| x.contains(r#"service="orders""#))
            .map(|x| format!("{x}\n"))
            .collect();
        // Every bucket bound is kept, and the counts never go down.
        let buckets: Vec<f64> = o
            .lines()
            .filter(|x| x.starts_with("sockmesh_request_duration_seconds_bucket"))
            .map(|x| x.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1, "{o}");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{o}");
    }

    /// The whole exposition parses as OpenMetrics: every sample belongs to a family declared
    /// with `# TYPE` before it (counter samples end in `_total`, histogram samples in
    /// `_bucket`/`_sum`/`_count`), `# EOF` ends it, and every metric name the tests and the
    /// Grafana dashboard read is there with its value.
    #[test]
    fn full_exposition_parses_and_keeps_the_names() {
        let l7 = orders();
        let d = l7
            .router
            .current()
            .route_tcp("10.96.0.10:80".parse().unwrap())
            .unwrap();
        d.stats.record(Outcome::Answered, Duration::from_millis(2));
        l7.errors.count("http1", "bad_request");
        let links = one_link("a");
        let o = scrape(l7, links);
        assert!(o.ends_with("# EOF\n"), "{o}");
        let mut types: std::collections::BTreeMap<&str, &str> = Default::default();
        let mut samples = 0;
        for line in o.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(types.insert(name, kind).is_none(), "family {name} declared twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            samples += 1;
            let (series, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok() || v == "+Inf", "value of `{line}`");
            let name = series.split('{').next().unwrap();
            if let Some(l) = series.split_once('{').map(|(_, l)| l) {
                assert!(l.ends_with('}') && l.len() > 1, "labels of `{line}`");
                assert!(
                    parse_labels(l.strip_suffix('}').unwrap()).is_some(),
                    "labels of `{line}`"
                );
            }
            let family = [
                ("_total", "counter"),
                ("_bucket", "histogram"),
                ("_sum", "histogram"),
                ("_count", "histogram"),
                ("", "gauge"),
            ]
            .iter()
            .find_map(|(suffix, kind)| {
                let f = name.strip_suffix(suffix)?;
                (types.get(f) == Some(kind)).then_some(f)
            });
            assert!(
                family.is_some(),
                "`{line}` has no # TYPE of its kind before it:\n{o}"
            );
        }
        assert!(samples > 20, "{o}");
        for (name, labels, want) in [
            ("sockmesh_pods_enrolled", vec![], 1.0),
            (
                "sockmesh_connections_total",
                vec![("pod", "11111111-2222-3333-4444-555555555555")],
                3.0,
            ),
            (
                "sockmesh_connections_active",
                vec![("pod", "11111111-2222-3333-4444-555555555555")],
                1.0,
            ),
            ("sockmesh_bytes_total", vec![("direction", "downstream")], 4096.0),
            ("sockmesh_worker_connections_total", vec![("worker", "1")], 6.0),
            ("sockmesh_propagation_available", vec![], 1.0),
            (
                "sockmesh_kernel_events_total",
                vec![("reason", "connect_captured")],
                7.0,
            ),
            (
                "sockmesh_proxy_errors_total",
                vec![("reason", "upstream_refused")],
                1.0,
            ),
            ("sockmesh_admin_errors_total", vec![("reason", "bad_name")], 4.0),
            ("sockmesh_k8s_cni_add_total", vec![("result", "failed")], 0.0),
            ("sockmesh_k8s_cni_rechained_total", vec![], 0.0),
            ("sockmesh_k8s_cni_check_errors_total", vec![], 0.0),
            ("sockmesh_requests_total", vec![("service", "orders")], 1.0),
            ("sockmesh_request_retries_total", vec![("service", "orders")], 0.0),
            (
                "sockmesh_request_duration_seconds_count",
                vec![("service", "orders")],
                1.0,
            ),
            (
                "sockmesh_request_duration_seconds_bucket",
                vec![("le", "0.0025")],
                1.0,
            ),
            ("sockmesh_routing_policy_generation", vec![], 0.0),
            ("sockmesh_protocol_errors_total", vec![("protocol", "http1")], 1.0),
            ("sockmesh_colour_stripped_total", vec![], 0.0),
            (
                "sockmesh_upgrade_moved_connections_total",
                vec![("protocol", "bolt")],
                0.0,
            ),
            ("sockmesh_colour_invalid_total", vec![], 0.0),
            (
                "sockmesh_colour_requests_total",
                vec![("service", "orders"), ("colour", "base")],
                1.0,
            ),
            (
                "sockmesh_kernel_routed_connects_total",
                vec![("endpoint", "10.0.2.1:5432")],
                100.0,
            ),
            ("sockmesh_kernel_routes_generation", vec![], 7.0),
            (
                "sockmesh_link_state",
                vec![("link", "a"), ("state", "keepalive")],
                1.0,
            ),
            ("sockmesh_link_local_share_ratio", vec![("link", "a")], 0.25),
            ("sockmesh_link_trickle_per_second", vec![("link", "a")], 5.0),
            (
                "sockmesh_link_cpu_limit_cpus",
                vec![("link", "a"), ("pod", "p1")],
                0.015,
            ),
            ("sockmesh_link_switches_total", vec![], 2.0),
        ] {
            assert_eq!(value(&o, name, &labels), Some(want), "{name}{labels:?} in\n{o}");
        }
        // The Grafana dashboard's metric names are all served.
        let dash = include_str!("../../deploy/grafana/sockmesh-dashboard.json");
        for name in dash
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("sockmesh_"))
        {
            let declared = ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix).is_some_and(|f| types.contains_key(f)));
            assert!(
                declared,
                "the dashboard reads {name}, which /metrics does not serve:\n{o}"
            );
        }
    }

    /// One link in keep-alive with a rate trickle, a switch half done, one pod's cgroup.
    fn one_link(name: &str) -> crate::links::LinkMetrics {
        use crate::links::{AppliedLimits, LinkMetrics, LinkRow};
        LinkMetrics {
            links: vec![LinkRow {
                name: name.into(),
                state: crate::routing::link::LinkState::Keepalive,
                local_share: 0.25,
                trickle_share: 0.0,
                trickle_per_second: Some(5.0),
                applied: vec![(
                    "p1".into(),
                    AppliedLimits::parse(&[
                        ("cpu.max".into(), "1500 100000".into()),
                        ("cpu.weight".into(), "1".into()),
                        ("memory.high".into(), "max".into()),
                    ]),
                )],
            }],
            requests: vec![crate::routing::link::LinkCount {
                service: "game".into(),
                link: name.into(),
                outcome: "moved",
                requests: 9,
            }],
            progress: Some(0.5),
            switches_total: 2,
            last_switch_seconds: Some(1.5),
            errors_total: 0,
        }
    }

    #[test]
    fn link_metrics_show_states_trickle_and_applied_limits() {
        let o = scrape(L7Shared::default(), one_link("forest"));
        let l = [("link", "forest")];
        assert_eq!(
            value(&o, "sockmesh_link_state", &[l[0], ("state", "keepalive")]),
            Some(1.0)
        );
        assert_eq!(
            value(&o, "sockmesh_link_state", &[l[0], ("state", "active")]),
            Some(0.0)
        );
        assert_eq!(value(&o, "sockmesh_link_local_share_ratio", &l), Some(0.25));
        assert_eq!(value(&o, "sockmesh_link_trickle_per_second", &l), Some(5.0));
        let p = [l[0], ("pod", "p1")];
        assert_eq!(value(&o, "sockmesh_link_cpu_limit_cpus", &p), Some(0.015));
        assert_eq!(value(&o, "sockmesh_link_cpu_weight", &p), Some(1.0));
        assert_eq!(
            value(&o, "sockmesh_link_memory_high_bytes", &p),
            None,
            "unlimited: absent"
        );
        assert_eq!(
            value(
                &o,
                "sockmesh_link_requests_total",
                &[("service", "game"), l[0], ("outcome", "moved")]
            ),
            Some(9.0)
        );
        assert_eq!(value(&o, "sockmesh_link_switch_progress_ratio", &[]), Some(0.5));
        assert_eq!(value(&o, "sockmesh_link_switches_total", &[]), Some(2.0));
        assert_eq!(value(&o, "sockmesh_link_last_switch_seconds", &[]), Some(1.5));
        // No links: no link family at all.
        let o = scrape(L7Shared::default(), Default::default());
        assert!(!o.contains("sockmesh_link_"), "{o}");
    }

    /// `k="v",k2="v2"` with escaped values; `None` when malformed.
    fn parse_labels(s: &str) -> Option<Vec<(&str, &str)>> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (k, after) = rest.split_once("=\"")?;
            let bytes = after.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            if i >= bytes.len() {
                return None;
            }
            out.push((k.trim_start_matches(',').trim(), &after[..i]));
            rest = after[i + 1..].trim_start_matches(',');
        }
        Some(out)
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let o = scrape(L7Shared::default(), one_link("a\"b"));
        assert!(
            o.contains("sockmesh_link_local_share_ratio{link=\"a\\\"b\"} 0.25\n"),
            "{o}"
        );
        let line = o
            .lines()
            .find(|l| l.starts_with("sockmesh_link_local_share_ratio{"))
            .unwrap();
        let labels = line.split_once('{').unwrap().1.rsplit_once('}').unwrap().0;
        assert_eq!(parse_labels(labels), Some(vec![("link", r#"a\"b"#)]));
        assert_eq!(parse_labels(r#"a="x"#), None);
    }
}
