//! Prometheus text exposition on a small HTTP/1.0 responder (`GET /metrics`, `GET /healthz`).
//! Requests are read with a size and time limit; anything else gets 400/404.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::daemon::Daemon;

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
        (Some(_), Some(_)) => ("404 Not Found", "not found\n".into()),
        _ => ("400 Bad Request", "bad request\n".into()),
    }
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
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
