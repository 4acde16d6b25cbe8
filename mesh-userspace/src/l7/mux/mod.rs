//! SOFA Bolt and Dubbo 2, routed per request: frames from the app's connection are decoded,
//! each request is routed with the live policy and sent on a shared upstream connection to the
//! chosen endpoint under a fresh request id; responses are mapped back to the app's id.
//!
//! ```text
//! app conn ──reader──▶ one task per request ──▶ MuxPools[(pod, endpoint)] ─▶ UpConn writer ─▶ server
//!    ▲                    │ route, retry,            (CONNS_PER_ENDPOINT        │
//!    └──writer◀── mpsc ◀──┘ timeout, stats            shared conns)    UpConn reader ◀┘ pending id → oneshot
//! ```
//!
//! - **App side.** One reader decodes frames; every request runs in its own task (at most
//!   [`MAX_IN_FLIGHT`] per connection, then the reader waits), so a slow request never holds
//!   up the others. Responses go back through one writer task, in completion order, with the
//!   app's own request id. Bytes read from the app count as `bytes_to_upstream`, bytes written
//!   to it as `bytes_to_client` (and the pod's `bytes_upstream` / `bytes_downstream`).
//! - **Upstream.** [`MuxPools`] keeps [`CONNS_PER_ENDPOINT`] lazily opened connections per
//!   (pod, endpoint, protocol), shared by every app connection of the pod (requests take turns
//!   between them). Each request gets a fresh upstream id (Bolt v2 CRCs are recomputed by the
//!   encoder) and a pending entry; one reader task per upstream connection hands responses to
//!   their requests. A connection that dies fails its pending requests and is replaced on next
//!   use. Idle connections send heartbeats every [`UPSTREAM_HEARTBEAT`] (Bolt servers close
//!   silent clients after 90 s, Dubbo providers after 180 s) and are closed after
//!   [`UPSTREAM_IDLE_CLOSE`] without a request (a pooled socket would keep a deleted pod's
//!   netns alive). Heartbeat requests from a server are answered.
//! - **Per request.** The route's timeout covers everything (connect, queueing, the response);
//!   when it fires the app gets Bolt `TIMEOUT` / Dubbo `SERVER_TIMEOUT` and a late response is
//!   dropped. A connect failure (nothing was sent) is retried on `endpoint_for_attempt(n)` up
//!   to the route's `retries`, each connect bounded by [`MAX_CONNECT_TIMEOUT`]; then Bolt
//!   `ERROR_COMM` / Dubbo `SERVICE_ERROR`. An upstream connection that closes with the request
//!   in flight gives Bolt `CONNECTION_CLOSED` / Dubbo `SERVER_ERROR` and is never retried (the
//!   server may have acted on it). No route: Bolt `NO_PROCESSOR` / Dubbo `SERVICE_NOT_FOUND`.
//!   Proxy-made Bolt error responses carry the reason in a `sockmesh-error` header; Dubbo ones
//!   carry it as the message body. Every failure is counted in [`super::L7Errors`]
//!   (`bolt`/`dubbo`, reason) and, once routed, in the route's stats. One-way requests are
//!   forwarded without waiting and count as answered once queued on the upstream connection.
//!   Heartbeats from the app are answered locally, never forwarded.
//! - **Routing input.** Bolt: `service` = the `service` header up to the first `:`, `version` =
//!   what follows it (up to the next `:`), `method` = `sofa_head_method_name`, headers = the
//!   Bolt header map. The npm SOFA client puts only `service` in that map, so a Hessian2
//!   `SofaRequest` content is read too ([`sofa::decode_request`], up to its fields, never the
//!   arguments): `methodName` when the method header is absent, `targetServiceUniqueName`
//!   (`iface:version`) when the `service` header is, and header lookups fall back to its string
//!   `requestProps`. A content that does not decode, or is over the decoder's limits, is no
//!   error: the request is routed on the header map alone. The content is forwarded as is. Dubbo
//!   (Hessian2 bodies): service path, method, service version and the string attachments.
//!   Dubbo bodies in another serialization are routed with no service, method or attachments
//!   (so only an address-selected service's catch-all route applies).
//! - **Subset hint.** A forwarded request that a service routed (not passthrough) carries the
//!   chosen subset in Bolt header / Dubbo attachment `sockmesh-subset`, so servers can see it.
//! - **Bad input.** A framing error (bad magic or proto, lengths beyond the codec limits, an
//!   oversized or malformed Bolt header map, a bad CRC, a frame truncated at EOF) is counted
//!   with the codec's `reason()`; when the request id is known the app gets Bolt
//!   `CODEC_EXCEPTION` / Dubbo `BAD_REQUEST`. The stream can no longer be trusted, so that
//!   connection stops reading and closes once the requests already in flight are answered.
//!   A Dubbo frame whose Hessian2 body does not decode is different: its framing is intact, so
//!   only that request gets `BAD_REQUEST` (counted with the Hessian2 reason) and the connection
//!   carries on, since closing it would fail every unrelated request multiplexed on it.
//! - **Upgrade** (`sockmesh upgrade`, see [`crate::upgrade`] and docs/upgrade.md). When this
//!   generation drains, the reader stops at the next frame boundary: every complete frame
//!   already read is dispatched, the start of a frame that is not complete stays undecoded. The
//!   connection then waits until every request in flight on it has been answered and written
//!   back (heartbeats are answered locally, one-way requests end once queued upstream, and every
//!   request is bounded by its route's timeout, so none of them holds the move up for long) and
//!   hands the app's socket, the undecoded bytes and their stream offset to the successor, which
//!   serves it from those bytes ([`serve_bolt_handed_over`], [`serve_dubbo_handed_over`]). The
//!   app keeps its TCP connection. Requests still in flight at the hand-over deadline (the drain
//!   deadline less [`crate::upgrade::MUX_HANDOVER_MARGIN`]) keep the connection here: their late
//!   responses are still written back, then it closes (the drain deadline closes it at the
//!   latest); counted as `upgrade_not_moved` in the protocol errors. Upstream connections
//!   ([`MuxPools`]) never move: the successor opens its own. With acceleration on, or once the
//!   successor is gone, connections finish on this generation as before.
//!
//! Not done: a request is never retried once written (even when the connection turns out to
//! have been closed by the server just before); the per-(pod, endpoint) pool entries are not
//! pruned when a pod or endpoint goes away (their connections close when idle, the empty slots
//! stay); upstream ids are not shared with servers that send requests of their own (only
//! heartbeats are answered, anything else a server sends unasked is dropped).
//!
//! Layout: this file holds the constants, what the parts share (`Fail`, `Plan`, `CallError`,
//! the `MuxProto` and `MuxDrain` traits, the colour value both adapters write) and the public
//! entry points; `bolt.rs` and `dubbo.rs` are the two protocol adapters; `upstream.rs` the
//! shared upstream connections (`UpConn`, its writer and reader tasks, the pending map, `Slot`,
//! `Pool`, [`MuxPools`]); `app.rs` the app's connection (`serve_with` with the upgrade drain,
//! the writer back to the app, one task per request); `tests.rs` the unit tests.
//!
//! [`sofa::decode_request`]: crate::protocol::sofa::decode_request

use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use super::ConnCtx;
use crate::routing::{
    colour::{self, Choice, ColourId},
    Decision, Policy,
};

mod app;
mod bolt;
mod dubbo;
#[cfg(test)]
mod tests;
mod upstream;

use app::{serve, serve_with, UpgradeDrain};
use bolt::Bolt;
use dubbo::Dubbo;
pub use upstream::MuxPools;
use upstream::Pool;

/// Upstream connections per (pod, endpoint, protocol).
pub const CONNS_PER_ENDPOINT: usize = 2;
/// Requests of one app connection in flight at once; past it the reader waits.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Frames queued towards one connection (app or upstream) before senders wait.
const QUEUE: usize = 1024;
/// Encode up to this much before one write.
const WRITE_BATCH: usize = 64 * 1024;
/// Each upstream connect is bounded by this (and by what is left of the request's timeout),
/// so a black-holed endpoint leaves time to retry another.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An upstream connection that wrote nothing for this long sends a heartbeat.
pub const UPSTREAM_HEARTBEAT: Duration = Duration::from_secs(15);
/// An upstream connection with no request for this long (and none pending) is closed.
pub const UPSTREAM_IDLE_CLOSE: Duration = Duration::from_secs(120);
/// Bolt header / Dubbo attachment naming the subset the mesh chose.
pub const SUBSET_KEY: &str = "sockmesh-subset";
/// Bolt header carrying the reason of an error response the proxy made.
pub const ERROR_HEADER: &str = "sockmesh-error";
/// Bolt header with the method name (SOFA RPC clients set it).
pub const BOLT_METHOD_HEADER: &str = "sofa_head_method_name";

/// Why a forwarded request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    /// The route's timeout fired.
    Timeout,
    /// No upstream connection could be opened (nothing was sent).
    Connect,
    /// The upstream connection closed with the request in flight.
    Closed,
}

impl Fail {
    fn reason(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "upstream_connect",
            Self::Closed => "upstream_reset",
        }
    }
}

/// What to do with one frame from the app.
enum Plan<F> {
    /// Answer it locally (heartbeat, or an error already counted).
    Reply(F),
    /// Nothing to send back.
    Ignore,
    Forward {
        frame: F,
        decision: Decision,
        oneway: bool,
    },
}

/// What the generic machinery needs from a protocol.
trait MuxProto: Send + Sync + 'static {
    type Frame: Clone + Debug + Send + Sync + 'static;
    type Codec: Decoder<Item = Self::Frame, Error = Self::Error>
        + Encoder<Self::Frame, Error = Self::Error>
        + Default
        + Send
        + 'static;
    type Error: std::error::Error + From<std::io::Error> + Send + 'static;
    const NAME: &'static str;
    /// The largest request id the wire carries.
    const MAX_ID: u64;

    fn pool(pools: &MuxPools) -> &Pool<Self>
    where
        Self: Sized;
    fn id(f: &Self::Frame) -> u64;
    fn set_id(f: &mut Self::Frame, id: u64);
    fn is_response(f: &Self::Frame) -> bool;
    /// A heartbeat request to keep an idle upstream connection open.
    fn heartbeat(id: u64) -> Self::Frame;
    /// The answer to `f` when it is a heartbeat request.
    fn heartbeat_reply(f: &Self::Frame) -> Option<Self::Frame>;
    /// Route one frame from the app (counting what it rejects).
    /// `propagated` is the kernel ledger's colour for the frame's first byte.
    fn plan(
        ctx: &ConnCtx,
        policy: &Policy,
        f: Self::Frame,
        propagated: Option<ColourId>,
    ) -> Plan<Self::Frame>;
    /// The proxy's error response to `req` (which carries the app's id).
    fn fail_reply(req: &Self::Frame, why: Fail, msg: &str) -> Self::Frame;
    fn error_reason(e: &Self::Error) -> &'static str;
    fn error_id(e: &Self::Error) -> Option<u64>;
    /// The response to a request whose framing was bad; `prefix` is the start of the buffer as
    /// it was before decoding (the frame's fixed header, when it was there).
    fn bad_input_reply(prefix: &[u8], id: u64, msg: &str) -> Self::Frame;
}

/// The colour value a forwarded RPC request carries, if it must be written: its colour's name,
/// or `base` over a colour that came from outside the mesh or named nothing (a Bolt body's
/// requestProps and a Dubbo attachment cannot be removed in place, only overridden).
fn colour_value<'p>(policy: &'p Policy, choice: &Choice, had_colour: bool) -> Option<&'p str> {
    if !policy.colouring() {
        return None;
    }
    if choice.colour != 0 {
        Some(policy.colours().name(choice.colour))
    } else {
        had_colour.then_some(colour::BASE)
    }
}

/// Why a request could not be handed to an upstream connection or got no response.
#[derive(Debug)]
enum CallError {
    /// Nothing was written: safe to try again on a fresh connection.
    NotSent,
    /// The connection closed with the request in flight.
    Closed,
}

/// Serve one Bolt connection until it closes (or an upgrade moves it).
pub async fn serve_bolt(client: TcpStream, ctx: ConnCtx) {
    serve::<Bolt>(client, ctx).await
}

/// Serve one Dubbo connection until it closes (or an upgrade moves it).
pub async fn serve_dubbo(client: TcpStream, ctx: ConnCtx) {
    serve::<Dubbo>(client, ctx).await
}

/// A Bolt connection the previous generation handed over (upgrade): `read` are the bytes it
/// had read and not decoded (the start of the next frame), `offset` the stream offset they
/// start at.
pub async fn serve_bolt_handed_over(client: TcpStream, read: Vec<u8>, offset: u64, ctx: ConnCtx) {
    serve_with::<Bolt, _>(client, BytesMut::from(&read[..]), offset, ctx, UpgradeDrain).await
}

/// A Dubbo connection the previous generation handed over; see [`serve_bolt_handed_over`].
pub async fn serve_dubbo_handed_over(client: TcpStream, read: Vec<u8>, offset: u64, ctx: ConnCtx) {
    serve_with::<Dubbo, _>(client, BytesMut::from(&read[..]), offset, ctx, UpgradeDrain).await
}

/// How an app connection learns that it should move to another generation, and moves.
trait MuxDrain: Send + 'static {
    /// Resolves when the connection should stop reading at the next frame boundary and be
    /// handed over: the instant by which the requests in flight must be answered (else it
    /// stays). Never resolves when there is nothing to hand over to.
    fn wait(&self) -> impl std::future::Future<Output = Instant> + Send;
    /// Give the socket (every response written) and the undecoded bytes to the successor.
    fn hand_over(&self, s: TcpStream, read: Vec<u8>, offset: u64, ctx: &ConnCtx, proto: &'static str);
}
