//! HTTP/1.1, HTTP/2 and gRPC: hyper serves the app's connection, each request is routed with
//! the live policy and forwarded on a pooled upstream connection to the chosen endpoint.

use tokio::net::TcpStream;

use super::ConnCtx;

/// Which HTTP the app's connection speaks (from detection or the service's protocol hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 with prior knowledge (the preface), gRPC included.
    Http2,
}

/// Upstream connection pools, per (pod, endpoint, version).
#[derive(Default)]
pub struct HttpPools {}

/// Serve one app connection until it closes.
pub async fn serve(client: TcpStream, version: HttpVersion, ctx: ConnCtx) {
    let _ = (client, version, ctx);
    todo!("helper: HTTP handler")
}
