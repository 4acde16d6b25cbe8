//! HTTP/1.1 `Upgrade` (WebSocket and the like): forwarded on a dedicated upstream connection,
//! then both upgraded connections are spliced byte for byte.

use http::{
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn as hc};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use super::{
    forward::{upstream_parts, Failure},
    headers::strip_hop_by_hop,
    until, ConnState, HttpVersion,
};
use crate::routing::Decision;

/// HTTP/1.1 `Upgrade`: forward on a dedicated upstream connection (connect failures retried on
/// the route's other endpoints); on `101`, splice the two upgraded connections.
pub(super) async fn forward_upgrade(
    st: &ConnState,
    mut req: Request<Incoming>,
    d: &Decision,
    started: Instant,
) -> Result<Response<Incoming>, Failure> {
    // A spliced connection sends no more requests through the pools (and a refused upgrade's
    // next request counts it again).
    st.last_pool.forget();
    let on_client = hyper::upgrade::on(&mut req);
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let (mut parts, body) = req.into_parts();
    upstream_parts(&mut parts, HttpVersion::Http1, d.endpoint);
    if let Some(u) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u);
    }
    let up_req = Request::from_parts(parts, body.boxed());
    let deadline = started + d.timeout;
    let exchange = async {
        let mut attempt = 0u32;
        let tcp = loop {
            let endpoint = d.endpoint_for_attempt(attempt);
            match st.ctx.connect(endpoint, until(deadline)).await {
                Ok(t) => break t,
                Err(e) if attempt >= d.retries => {
                    return Err((
                        "upstream_connect",
                        format!("upstream {endpoint} unreachable: {e}"),
                    ))
                }
                Err(e) => debug!(attempt, "upstream {endpoint} unreachable: {e}"),
            }
            attempt += 1;
            d.stats.record_retry();
        };
        let (mut sender, conn) = hc::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ("upstream_connect", format!("upstream handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("upstream upgrade connection: {e}");
            }
        });
        sender
            .send_request(up_req)
            .await
            .map_err(|e| ("upstream_reset", format!("upstream failed: {e}")))
    };
    let mut resp = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(r) => r?,
        Err(_) => {
            return Err((
                "timeout",
                format!("no response within {} ms", d.timeout.as_millis()),
            ))
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let on_upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::join!(on_client, on_upstream) {
                (Ok(c), Ok(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                (c, u) => debug!("upgrade failed: client {:?}, upstream {:?}", c.err(), u.err()),
            }
        });
        // Keep Connection/Upgrade on the 101: they are the handshake.
        let keep_upgrade = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = keep_upgrade {
            resp.headers_mut().insert(header::UPGRADE, u);
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    Ok(resp)
}
