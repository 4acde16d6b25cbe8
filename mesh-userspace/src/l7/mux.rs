//! SOFA Bolt and Dubbo 2, routed per request: frames from the app's connection are decoded,
//! each request is routed with the live policy and sent on a shared upstream connection to the
//! chosen endpoint under a fresh request id; responses are mapped back to the app's id.

use tokio::net::TcpStream;

use super::ConnCtx;

/// Shared upstream connections, per (pod, endpoint, protocol).
#[derive(Default)]
pub struct MuxPools {}

/// Serve one Bolt connection until it closes.
pub async fn serve_bolt(client: TcpStream, ctx: ConnCtx) {
    let _ = (client, ctx);
    todo!("helper: Bolt handler")
}

/// Serve one Dubbo connection until it closes.
pub async fn serve_dubbo(client: TcpStream, ctx: ConnCtx) {
    let _ = (client, ctx);
    todo!("helper: Dubbo handler")
}
