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

use std::{
    collections::HashMap,
    fmt::Debug,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
    task::AbortHandle,
};
use tokio_util::codec::{Decoder, Encoder};
use tracing::debug;

use super::ConnCtx;
use crate::{
    protocol::{
        bolt::{self, BoltCodec, BoltError, BoltFrame},
        dubbo::{self, DubboCodec, DubboError, DubboFrame},
        sofa::{self, SofaRequestInfo},
    },
    routing::{
        colour::{self, Choice, ColourId},
        Decision, HeaderLookup, Outcome, Policy, ProtocolHint, RequestInfo,
    },
};

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

// ---------------------------------------------------------------------------------------------
// Bolt

struct Bolt;

/// Case-insensitive lookup in a Bolt header map, then in the SofaRequest's `requestProps`.
struct BoltHeaders<'a> {
    frame: &'a BoltFrame,
    body: Option<&'a SofaRequestInfo<'a>>,
}

impl HeaderLookup for BoltHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        let in_map = self
            .frame
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|h| h.value.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok());
        in_map.or_else(|| self.body?.prop(name))
    }
}

/// The routing fields of a Bolt request's SofaRequest content, when it has one that decodes.
/// Anything else (another class or codec, a malformed body, one over the decoder's limits) is
/// `None`, and not an error: the request is routed on its header map.
fn bolt_body(f: &BoltFrame) -> Option<SofaRequestInfo<'_>> {
    match sofa::decode_request(&f.class_name, f.codec, &f.content) {
        Ok(body) => body,
        Err(e) => {
            debug!(
                id = f.request_id,
                reason = e.reason(),
                "bolt: routing on the header map only: {e}"
            );
            None
        }
    }
}

fn bolt_heartbeat_ack(req: &BoltFrame) -> BoltFrame {
    BoltFrame {
        cmd_code: bolt::CMD_HEARTBEAT,
        ..req.error_response_to(bolt::status::SUCCESS)
    }
}

impl MuxProto for Bolt {
    type Frame = BoltFrame;
    type Codec = BoltCodec;
    type Error = BoltError;
    const NAME: &'static str = "bolt";
    const MAX_ID: u64 = u32::MAX as u64;

    fn pool(pools: &MuxPools) -> &Pool<Self> {
        &pools.bolt
    }

    fn id(f: &BoltFrame) -> u64 {
        u64::from(f.request_id)
    }

    fn set_id(f: &mut BoltFrame, id: u64) {
        f.request_id = id as u32;
    }

    fn is_response(f: &BoltFrame) -> bool {
        f.is_response()
    }

    fn heartbeat(id: u64) -> BoltFrame {
        BoltFrame {
            cmd_type: bolt::TYPE_REQUEST,
            cmd_code: bolt::CMD_HEARTBEAT,
            timeout: 1000,
            status: 0,
            ..bolt::error_response(id as u32, 0)
        }
    }

    fn heartbeat_reply(f: &BoltFrame) -> Option<BoltFrame> {
        (f.is_heartbeat() && f.cmd_type == bolt::TYPE_REQUEST).then(|| bolt_heartbeat_ack(f))
    }

    fn plan(
        ctx: &ConnCtx,
        policy: &Policy,
        mut f: BoltFrame,
        propagated: Option<ColourId>,
    ) -> Plan<BoltFrame> {
        if f.is_response() {
            ctx.l7().errors.count(Self::NAME, "unexpected_response");
            return Plan::Ignore;
        }
        if f.is_heartbeat() {
            return Self::heartbeat_reply(&f).map_or(Plan::Ignore, Plan::Reply);
        }
        let oneway = f.cmd_type == bolt::TYPE_REQUEST_ONEWAY;
        let routed = {
            let body = bolt_body(&f);
            let mut target = f.header_str(bolt::HEADER_SERVICE).unwrap_or("").split(':');
            let (service, version) = match target.next().filter(|s| !s.is_empty()) {
                Some(service) => (Some(service), target.next().filter(|s| !s.is_empty())),
                None => body
                    .as_ref()
                    .map_or((None, None), SofaRequestInfo::service_version),
            };
            let method = f
                .header_str(BOLT_METHOD_HEADER)
                .or_else(|| body.as_ref()?.method.as_deref());
            let headers = BoltHeaders {
                frame: &f,
                body: body.as_ref(),
            };
            let had_colour = colour::header_of(&headers).is_some();
            let info = RequestInfo {
                protocol: ProtocolHint::Bolt,
                host: None,
                path: None,
                service,
                method,
                version,
                headers: &headers,
            };
            let (choice, routed) = ctx.route(policy, &info, propagated);
            (colour_value(policy, &choice, had_colour), routed)
        };
        let (colour_value, routed) = routed;
        if let Some(v) = colour_value {
            f.set_header(colour::COLOUR_HEADER, v);
        }
        match routed {
            Ok(decision) => {
                if &*decision.service != "passthrough" {
                    f.set_header(SUBSET_KEY, &decision.subset);
                }
                Plan::Forward {
                    frame: f,
                    decision,
                    oneway,
                }
            }
            Err(e) => {
                ctx.l7().errors.count(Self::NAME, e.reason());
                debug!(id = f.request_id, "bolt: {e}");
                if oneway {
                    return Plan::Ignore;
                }
                let mut reply = f.error_response_to(bolt::status::NO_PROCESSOR);
                reply.set_header(ERROR_HEADER, &format!("sockmesh: {e}"));
                Plan::Reply(reply)
            }
        }
    }

    fn fail_reply(req: &BoltFrame, why: Fail, msg: &str) -> BoltFrame {
        let status = match why {
            Fail::Timeout => bolt::status::TIMEOUT,
            Fail::Connect => bolt::status::ERROR_COMM,
            Fail::Closed => bolt::status::CONNECTION_CLOSED,
        };
        let mut reply = req.error_response_to(status);
        reply.set_header(ERROR_HEADER, msg);
        reply
    }

    fn error_reason(e: &BoltError) -> &'static str {
        e.reason()
    }

    fn error_id(e: &BoltError) -> Option<u64> {
        e.request_id().map(u64::from)
    }

    fn bad_input_reply(prefix: &[u8], id: u64, msg: &str) -> BoltFrame {
        // Answer in the frame's own version when its fixed header is still at hand.
        let mut reply = bolt::error_response(id as u32, bolt::status::CODEC_EXCEPTION);
        match prefix {
            [bolt::PROTO_V2, ver1, _, _, _, _, _, _, _, _, codec, switch, ..] => {
                reply.proto = bolt::PROTO_V2;
                reply.ver1 = *ver1;
                reply.codec = *codec;
                reply.switch = *switch;
            }
            [bolt::PROTO_V1, _, _, _, _, _, _, _, _, codec, ..] => reply.codec = *codec,
            _ => {}
        }
        reply.set_header(ERROR_HEADER, msg);
        reply
    }
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

// ---------------------------------------------------------------------------------------------
// Dubbo

struct Dubbo;

/// Case-insensitive lookup in a Dubbo request's string attachments (the last one wins, as in
/// Java's map).
struct DubboAttachments<'a>(&'a [(String, String)]);

impl HeaderLookup for DubboAttachments<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Hessian2 `null`: the body of a heartbeat and of its response.
const HESSIAN2_NULL: &[u8] = b"N";

impl MuxProto for Dubbo {
    type Frame = DubboFrame;
    type Codec = DubboCodec;
    type Error = DubboError;
    const NAME: &'static str = "dubbo";
    const MAX_ID: u64 = u64::MAX;

    fn pool(pools: &MuxPools) -> &Pool<Self> {
        &pools.dubbo
    }

    fn id(f: &DubboFrame) -> u64 {
        f.request_id
    }

    fn set_id(f: &mut DubboFrame, id: u64) {
        f.request_id = id;
    }

    fn is_response(f: &DubboFrame) -> bool {
        !f.is_request()
    }

    fn heartbeat(id: u64) -> DubboFrame {
        DubboFrame {
            flag: dubbo::FLAG_REQUEST
                | dubbo::FLAG_TWO_WAY
                | dubbo::FLAG_EVENT
                | dubbo::SERIALIZATION_HESSIAN2,
            status: 0,
            request_id: id,
            body: Bytes::from_static(HESSIAN2_NULL),
        }
    }

    fn heartbeat_reply(f: &DubboFrame) -> Option<DubboFrame> {
        (f.is_request() && f.is_event() && f.is_two_way()).then(|| DubboFrame {
            flag: dubbo::FLAG_EVENT | f.serialization_id(),
            status: dubbo::status::OK,
            request_id: f.request_id,
            body: Bytes::from_static(HESSIAN2_NULL),
        })
    }

    fn plan(
        ctx: &ConnCtx,
        policy: &Policy,
        mut f: DubboFrame,
        propagated: Option<ColourId>,
    ) -> Plan<DubboFrame> {
        if !f.is_request() {
            ctx.l7().errors.count(Self::NAME, "unexpected_response");
            return Plan::Ignore;
        }
        if f.is_event() {
            // Heartbeats; one-way events (read-only notices) concern this hop only.
            return Self::heartbeat_reply(&f).map_or(Plan::Ignore, Plan::Reply);
        }
        let oneway = !f.is_two_way();
        let invocation = if f.serialization_id() == dubbo::SERIALIZATION_HESSIAN2 {
            match dubbo::decode_request_body(&f.body) {
                Ok(inv) => Some(inv),
                Err(e) => {
                    ctx.l7().errors.count(Self::NAME, e.reason());
                    debug!(id = f.request_id, "dubbo: undecodable body: {e}");
                    if oneway {
                        return Plan::Ignore;
                    }
                    let msg = format!("sockmesh: cannot decode the request body: {e}");
                    return Plan::Reply(dubbo::error_response(
                        f.request_id,
                        dubbo::status::BAD_REQUEST,
                        &msg,
                    ));
                }
            }
        } else {
            None
        };
        let (colour_value, routed) = match &invocation {
            Some(inv) => {
                let headers = DubboAttachments(&inv.attachments);
                let (choice, routed) = ctx.route(
                    policy,
                    &RequestInfo {
                        protocol: ProtocolHint::Dubbo,
                        host: None,
                        path: None,
                        service: Some(&inv.service_path),
                        method: Some(&inv.method),
                        version: Some(&inv.service_version)
                            .filter(|v| !v.is_empty())
                            .map(|v| v.as_str()),
                        headers: &headers,
                    },
                    propagated,
                );
                let had_colour = colour::header_of(&headers).is_some();
                (colour_value(policy, &choice, had_colour), routed)
            }
            None => {
                let (choice, routed) = ctx.route(policy, &RequestInfo::bare(ProtocolHint::Dubbo), propagated);
                (colour_value(policy, &choice, false), routed)
            }
        };
        if let (Some(v), Some(_)) = (colour_value, &invocation) {
            // The body decoded above, so this cannot fail; forward it unchanged if it does.
            if let Ok(body) = dubbo::add_attachment(&f.body, colour::COLOUR_HEADER, v) {
                f.body = body.into();
            }
        }
        match routed {
            Ok(decision) => {
                if invocation.is_some() && &*decision.service != "passthrough" {
                    // The body decoded above, so this cannot fail; forward it unchanged if it does.
                    if let Ok(body) = dubbo::add_attachment(&f.body, SUBSET_KEY, &decision.subset) {
                        f.body = body.into();
                    }
                }
                Plan::Forward {
                    frame: f,
                    decision,
                    oneway,
                }
            }
            Err(e) => {
                ctx.l7().errors.count(Self::NAME, e.reason());
                debug!(id = f.request_id, "dubbo: {e}");
                if oneway {
                    return Plan::Ignore;
                }
                let msg = format!("sockmesh: {e}");
                Plan::Reply(dubbo::error_response(
                    f.request_id,
                    dubbo::status::SERVICE_NOT_FOUND,
                    &msg,
                ))
            }
        }
    }

    fn fail_reply(req: &DubboFrame, why: Fail, msg: &str) -> DubboFrame {
        let status = match why {
            Fail::Timeout => dubbo::status::SERVER_TIMEOUT,
            Fail::Connect => dubbo::status::SERVICE_ERROR,
            Fail::Closed => dubbo::status::SERVER_ERROR,
        };
        dubbo::error_response(req.request_id, status, msg)
    }

    fn error_reason(e: &DubboError) -> &'static str {
        e.reason()
    }

    fn error_id(e: &DubboError) -> Option<u64> {
        e.request_id()
    }

    fn bad_input_reply(_prefix: &[u8], id: u64, msg: &str) -> DubboFrame {
        dubbo::error_response(id, dubbo::status::BAD_REQUEST, msg)
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream connections

/// Why a request could not be handed to an upstream connection or got no response.
#[derive(Debug)]
enum CallError {
    /// Nothing was written: safe to try again on a fresh connection.
    NotSent,
    /// The connection closed with the request in flight.
    Closed,
}

struct UpState<F> {
    alive: bool,
    /// Upstream id → where its response goes (`None`: a one-way request not yet queued).
    pending: HashMap<u64, Option<oneshot::Sender<F>>>,
    last_used: Instant,
}

/// One shared upstream connection: a writer task fed by `tx`, a reader task that hands
/// responses to `pending`.
struct UpConn<P: MuxProto> {
    endpoint: SocketAddr,
    tx: mpsc::Sender<P::Frame>,
    state: Mutex<UpState<P::Frame>>,
    next_id: AtomicU64,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl<P: MuxProto> UpConn<P> {
    fn start(stream: TcpStream, endpoint: SocketAddr) -> Arc<Self> {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(QUEUE);
        let conn = Arc::new(Self {
            endpoint,
            tx,
            state: Mutex::new(UpState {
                alive: true,
                pending: HashMap::new(),
                last_used: Instant::now(),
            }),
            next_id: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
        });
        let w = tokio::spawn(upstream_writer(conn.clone(), rx, wr));
        let r = tokio::spawn(upstream_reader(conn.clone(), rd));
        conn.tasks
            .lock()
            .expect("upconn lock")
            .extend([w.abort_handle(), r.abort_handle()]);
        conn
    }

    fn is_alive(&self) -> bool {
        self.state.lock().expect("upconn lock").alive
    }

    /// A fresh id that no pending request uses (Bolt ids are 32 bits and wrap).
    fn fresh_id(&self, state: &UpState<P::Frame>) -> u64 {
        loop {
            let id = self.next_id.fetch_add(1, Relaxed) & P::MAX_ID;
            if id != 0 && !state.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Mark dead, fail every pending request (their receivers see the sender dropped) and
    /// stop both tasks.
    fn kill(&self) {
        {
            let mut st = self.state.lock().expect("upconn lock");
            st.alive = false;
            st.pending.clear();
        }
        for t in self.tasks.lock().expect("upconn lock").drain(..) {
            t.abort();
        }
    }

    /// Send one request; wait for its response unless it is one-way.
    async fn call(
        self: &Arc<Self>,
        mut frame: P::Frame,
        oneway: bool,
    ) -> Result<Option<P::Frame>, CallError> {
        let (id, rx) = {
            let mut st = self.state.lock().expect("upconn lock");
            if !st.alive {
                return Err(CallError::NotSent);
            }
            let id = self.fresh_id(&st);
            let (tx, rx) = if oneway {
                (None, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            };
            st.pending.insert(id, tx);
            st.last_used = Instant::now();
            (id, rx)
        };
        // Removes the entry however this ends (response, timeout, cancellation).
        let _guard = PendingGuard { conn: self, id };
        P::set_id(&mut frame, id);
        if self.tx.send(frame).await.is_err() {
            return Err(CallError::NotSent);
        }
        match rx {
            None => Ok(None),
            Some(rx) => rx.await.map(Some).map_err(|_| CallError::Closed),
        }
    }

    /// Hand an upstream response to its request (dropped when it gave up).
    fn on_frame(&self, frame: P::Frame) {
        if P::is_response(&frame) {
            let waiter = self
                .state
                .lock()
                .expect("upconn lock")
                .pending
                .remove(&P::id(&frame));
            match waiter {
                Some(Some(tx)) => {
                    let _ = tx.send(frame);
                }
                _ => {
                    debug!(endpoint = %self.endpoint, id = P::id(&frame), "late or unknown upstream response dropped")
                }
            }
        } else if let Some(reply) = P::heartbeat_reply(&frame) {
            let _ = self.tx.try_send(reply);
        } else {
            debug!(endpoint = %self.endpoint, "request from an upstream server ignored");
        }
    }

    /// Retire the connection when it has been idle long enough; only then is it unused.
    fn try_retire(&self) -> bool {
        let mut st = self.state.lock().expect("upconn lock");
        if st.alive && st.pending.is_empty() && st.last_used.elapsed() >= UPSTREAM_IDLE_CLOSE {
            st.alive = false;
            true
        } else {
            false
        }
    }
}

struct PendingGuard<'a, P: MuxProto> {
    conn: &'a UpConn<P>,
    id: u64,
}

impl<P: MuxProto> Drop for PendingGuard<'_, P> {
    fn drop(&mut self) {
        self.conn
            .state
            .lock()
            .expect("upconn lock")
            .pending
            .remove(&self.id);
    }
}

fn encode_into<P: MuxProto>(codec: &mut P::Codec, frame: P::Frame, buf: &mut BytesMut) {
    if let Err(e) = codec.encode(frame, buf) {
        debug!("{}: frame not encodable, dropped: {e}", P::NAME);
    }
}

async fn upstream_writer<P: MuxProto>(
    conn: Arc<UpConn<P>>,
    mut rx: mpsc::Receiver<P::Frame>,
    mut w: OwnedWriteHalf,
) {
    let mut codec = P::Codec::default();
    let mut buf = BytesMut::new();
    loop {
        let first = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            () = tokio::time::sleep(UPSTREAM_HEARTBEAT) => {
                if conn.try_retire() {
                    // Nobody can queue any more; write what one-way requests already queued.
                    rx.close();
                    while let Ok(f) = rx.try_recv() {
                        encode_into::<P>(&mut codec, f, &mut buf);
                    }
                    let _ = w.write_all(&buf).await;
                    let _ = w.shutdown().await;
                    debug!(endpoint = %conn.endpoint, "idle upstream connection closed");
                    conn.kill();
                    return;
                }
                let id = conn.fresh_id(&conn.state.lock().expect("upconn lock"));
                P::heartbeat(id)
            }
        };
        encode_into::<P>(&mut codec, first, &mut buf);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => encode_into::<P>(&mut codec, f, &mut buf),
                Err(_) => break,
            }
        }
        if let Err(e) = w.write_all(&buf).await {
            debug!(endpoint = %conn.endpoint, "upstream write failed: {e}");
            break;
        }
        buf.clear();
    }
    conn.kill();
}

async fn upstream_reader<P: MuxProto>(conn: Arc<UpConn<P>>, mut r: OwnedReadHalf) {
    let mut codec = P::Codec::default();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    'read: loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => conn.on_frame(f),
                Ok(None) => break,
                Err(e) => {
                    debug!(endpoint = %conn.endpoint, "bad {} frame from upstream: {e}", P::NAME);
                    break 'read;
                }
            }
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                debug!(endpoint = %conn.endpoint, "upstream read failed: {e}");
                break;
            }
        }
    }
    conn.kill();
}

struct SlotState<P: MuxProto> {
    conn: Option<Arc<UpConn<P>>>,
    /// The last failed connect: (attempt number, message).
    failed: Option<(u64, String)>,
}

/// One upstream connection, opened on first use and replaced when it dies.
struct Slot<P: MuxProto> {
    state: tokio::sync::Mutex<SlotState<P>>,
    attempts: AtomicU64,
}

impl<P: MuxProto> Slot<P> {
    fn new() -> Self {
        Self {
            state: tokio::sync::Mutex::new(SlotState {
                conn: None,
                failed: None,
            }),
            attempts: AtomicU64::new(0),
        }
    }

    /// The live connection, or a new one. Requests that queued behind a connect attempt that
    /// failed share its failure instead of trying again one after another.
    async fn get(
        &self,
        ctx: &ConnCtx,
        endpoint: SocketAddr,
        timeout: Duration,
    ) -> Result<Arc<UpConn<P>>, String> {
        let seen = self.attempts.load(Relaxed);
        let mut st = self.state.lock().await;
        if let Some(c) = &st.conn {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        st.conn = None;
        if let Some((attempt, msg)) = &st.failed {
            if *attempt > seen {
                return Err(msg.clone());
            }
        }
        let attempt = self.attempts.fetch_add(1, Relaxed) + 1;
        match ctx.connect(endpoint, timeout).await {
            Ok(s) => {
                let c = UpConn::start(s, endpoint);
                st.conn = Some(c.clone());
                st.failed = None;
                Ok(c)
            }
            Err(e) => {
                let msg = format!("sockmesh: cannot connect to {endpoint}: {e}");
                st.failed = Some((attempt, msg.clone()));
                Err(msg)
            }
        }
    }

    fn live(&self) -> usize {
        self.state
            .try_lock()
            .map_or(0, |st| st.conn.as_ref().map_or(0, |c| usize::from(c.is_alive())))
    }
}

/// The connections to one endpoint from one pod.
type Slots<P> = Arc<[Slot<P>]>;

/// The upstream connections of one protocol, by (pod name, endpoint).
struct Pool<P: MuxProto> {
    endpoints: Mutex<HashMap<(String, SocketAddr), Slots<P>>>,
    turn: AtomicUsize,
}

impl<P: MuxProto> Default for Pool<P> {
    fn default() -> Self {
        Self {
            endpoints: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
        }
    }
}

impl<P: MuxProto> Pool<P> {
    async fn get(
        &self,
        ctx: &ConnCtx,
        endpoint: SocketAddr,
        timeout: Duration,
    ) -> Result<Arc<UpConn<P>>, String> {
        let slots = self
            .endpoints
            .lock()
            .expect("pool lock")
            .entry((ctx.pod.name.clone(), endpoint))
            .or_insert_with(|| (0..CONNS_PER_ENDPOINT).map(|_| Slot::new()).collect())
            .clone();
        let slot = &slots[self.turn.fetch_add(1, Relaxed) % slots.len()];
        slot.get(ctx, endpoint, timeout).await
    }

    fn live(&self) -> usize {
        let all: Vec<_> = self
            .endpoints
            .lock()
            .expect("pool lock")
            .values()
            .cloned()
            .collect();
        all.iter().flat_map(|s| s.iter()).map(Slot::live).sum()
    }
}

/// Shared upstream connections, per (pod, endpoint, protocol).
#[derive(Default)]
pub struct MuxPools {
    bolt: Pool<Bolt>,
    dubbo: Pool<Dubbo>,
}

impl MuxPools {
    /// Live upstream connections: (Bolt, Dubbo). Approximate while connects are under way.
    #[allow(dead_code)] // for status and tests
    pub fn live_connections(&self) -> (usize, usize) {
        (self.bolt.live(), self.dubbo.live())
    }
}

// ---------------------------------------------------------------------------------------------
// The app's connection

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

async fn serve<P: MuxProto>(client: TcpStream, ctx: ConnCtx) {
    serve_with::<P, _>(client, BytesMut::new(), 0, ctx, UpgradeDrain).await
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

/// The real one: `sockmesh upgrade` (see [`crate::upgrade`]).
struct UpgradeDrain;

impl MuxDrain for UpgradeDrain {
    async fn wait(&self) -> Instant {
        match crate::upgrade::drain_mux().await {
            Some(by) => by,
            // This generation drains but cannot move connections (acceleration on, or the
            // successor is gone): the connection finishes here.
            None => std::future::pending().await,
        }
    }

    fn hand_over(&self, s: TcpStream, read: Vec<u8>, offset: u64, ctx: &ConnCtx, proto: &'static str) {
        crate::upgrade::hand_over_mux(s, read, offset, ctx, proto);
    }
}

async fn serve_with<P: MuxProto, D: MuxDrain>(
    client: TcpStream,
    prefix: BytesMut,
    offset: u64,
    ctx: ConnCtx,
    drain: D,
) {
    let (mut rd, wr) = client.into_split();
    let (tx, rx) = mpsc::channel::<P::Frame>(QUEUE);
    let mut writer = tokio::spawn(app_writer::<P>(wr, rx, ctx.clone()));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut codec = P::Codec::default();
    let mut buf = prefix;
    buf.reserve(8 * 1024);
    let mut eof = false;
    // Bytes read from the app so far: a frame starts at `read - buf.len()` (the stream offset
    // the kernel's propagation ledger is keyed by). A handed-over connection continues the
    // count of the generation that read its first bytes.
    let mut read: u64 = offset + buf.len() as u64;
    let draining = drain.wait();
    tokio::pin!(draining);
    // Set when the connection is to move: answer what is in flight by then, or stay.
    let mut hand_over_by: Option<Instant> = None;
    loop {
        let start = read - buf.len() as u64;
        let mut prefix = [0u8; 16];
        let plen = buf.len().min(prefix.len());
        prefix[..plen].copy_from_slice(&buf[..plen]);
        let decoded = if eof {
            codec.decode_eof(&mut buf)
        } else {
            codec.decode(&mut buf)
        };
        match decoded {
            Ok(Some(frame)) => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let propagated = ctx.propagated_at(start);
                tokio::spawn(request::<P>(ctx.clone(), frame, propagated, tx.clone(), permit));
                continue;
            }
            Ok(None) if eof => break,
            Ok(None) => {}
            Err(e) => {
                let reason = P::error_reason(&e);
                ctx.l7().errors.count(P::NAME, reason);
                debug!(client = %ctx.client, "bad {} input, closing: {e}", P::NAME);
                if let Some(id) = P::error_id(&e) {
                    let msg = format!("sockmesh: {e}");
                    let _ = tx.send(P::bad_input_reply(&prefix[..plen], id, &msg)).await;
                }
                break;
            }
        }
        // Every complete frame is decoded and dispatched: `buf` holds at most the start of
        // the next one. A frame boundary, where an upgrade may stop reading.
        let got = tokio::select! {
            by = &mut draining, if hand_over_by.is_none() => {
                hand_over_by = Some(by);
                break;
            }
            r = rd.read_buf(&mut buf) => r,
        };
        match got {
            Ok(0) => eof = true,
            Ok(n) => {
                read += n as u64;
                ctx.entry.bytes_to_upstream.fetch_add(n as u64, Relaxed);
                ctx.pod.stats.bytes_upstream.fetch_add(n as u64, Relaxed);
            }
            Err(e) => {
                debug!(client = %ctx.client, "read from the app failed: {e}");
                break;
            }
        }
    }
    // The writer ends once every request task has sent its response (and it was written).
    drop(tx);
    let Some(by) = hand_over_by else {
        if let Ok(Some(mut w)) = writer.await {
            let _ = w.shutdown().await;
        }
        return;
    };
    debug!(client = %ctx.client, in_flight = MAX_IN_FLIGHT - in_flight.available_permits(),
        "upgrade: {} connection stopped reading at a frame boundary", P::NAME);
    match tokio::time::timeout_at(by.into(), &mut writer).await {
        Ok(Ok(Some(w))) => match rd.reunite(w) {
            Ok(s) => {
                let at = read - buf.len() as u64;
                drain.hand_over(s, buf.to_vec(), at, &ctx, P::NAME);
            }
            Err(e) => debug!("upgrade: {} connection not handed over: {e}", P::NAME),
        },
        // The app's socket failed while answering: nothing to move.
        Ok(_) => {}
        Err(_) => {
            // Requests still in flight at the hand-over deadline: the connection stays on
            // this generation, late responses are still written back; then it closes (or
            // the drain deadline closes it).
            ctx.l7().errors.count(P::NAME, "upgrade_not_moved");
            tracing::info!(client = %ctx.client, in_flight = MAX_IN_FLIGHT - in_flight.available_permits(),
                "upgrade: {} requests still in flight at the hand-over deadline: the connection stays and closes", P::NAME);
            if let Ok(Some(mut w)) = writer.await {
                let _ = w.shutdown().await;
            }
        }
    }
}

/// Write responses back to the app until every sender is gone; the write half back (not shut
/// down: the connection may move), `None` when a write failed.
async fn app_writer<P: MuxProto>(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<P::Frame>,
    ctx: ConnCtx,
) -> Option<OwnedWriteHalf> {
    let mut codec = P::Codec::default();
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        encode_into::<P>(&mut codec, first, &mut buf);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => encode_into::<P>(&mut codec, f, &mut buf),
                Err(_) => break,
            }
        }
        if let Err(e) = w.write_all(&buf).await {
            debug!(client = %ctx.client, "write to the app failed: {e}");
            return None;
        }
        ctx.entry.bytes_to_client.fetch_add(buf.len() as u64, Relaxed);
        ctx.pod
            .stats
            .bytes_downstream
            .fetch_add(buf.len() as u64, Relaxed);
        buf.clear();
    }
    Some(w)
}

/// One request from the app, start to finish.
async fn request<P: MuxProto>(
    ctx: ConnCtx,
    frame: P::Frame,
    propagated: Option<ColourId>,
    out: mpsc::Sender<P::Frame>,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let policy = ctx.l7().router.current();
    let (frame, decision, oneway) = match P::plan(&ctx, &policy, frame, propagated) {
        Plan::Reply(f) => {
            let _ = out.send(f).await;
            return;
        }
        Plan::Ignore => return,
        Plan::Forward {
            frame,
            decision,
            oneway,
        } => (frame, decision, oneway),
    };
    drop(policy);
    let app_id = P::id(&frame);
    let deadline = started + decision.timeout;
    let mut last = decision.endpoint;
    let result = tokio::time::timeout_at(
        deadline.into(),
        forward::<P>(&ctx, &decision, &frame, oneway, deadline, &mut last),
    )
    .await;
    let (reply, outcome) = match result {
        Ok(Ok(Some(mut response))) => {
            P::set_id(&mut response, app_id);
            (Some(response), Outcome::Answered)
        }
        Ok(Ok(None)) => (None, Outcome::Answered),
        Ok(Err((why, msg))) => (
            Some(P::fail_reply(&frame, why, &msg)),
            Outcome::Failed(why.reason()),
        ),
        Err(_) => {
            let msg = format!(
                "sockmesh: no response from {last} within {} ms",
                decision.timeout.as_millis()
            );
            (
                Some(P::fail_reply(&frame, Fail::Timeout, &msg)),
                Outcome::Failed(Fail::Timeout.reason()),
            )
        }
    };
    if let Outcome::Failed(reason) = outcome {
        ctx.l7().errors.count(P::NAME, reason);
        debug!(id = app_id, endpoint = %last, "{} request failed: {reason}", P::NAME);
    }
    decision.stats.record(outcome, started.elapsed());
    if let (Some(reply), false) = (reply, oneway) {
        let _ = out.send(reply).await;
    }
}

/// Try the decision's endpoints: a connect failure (nothing sent) moves on to the next
/// attempt; anything after sending is final.
async fn forward<P: MuxProto>(
    ctx: &ConnCtx,
    decision: &Decision,
    frame: &P::Frame,
    oneway: bool,
    deadline: Instant,
    last: &mut SocketAddr,
) -> Result<Option<P::Frame>, (Fail, String)> {
    let pool = P::pool(&ctx.l7().mux);
    let mut error = String::new();
    for attempt in 0..=decision.retries {
        let endpoint = decision.endpoint_for_attempt(attempt);
        *last = endpoint;
        if attempt > 0 {
            decision.stats.record_retry();
        }
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(MAX_CONNECT_TIMEOUT);
        let conn = match pool.get(ctx, endpoint, timeout).await {
            Ok(c) => c,
            Err(msg) => {
                error = msg;
                continue;
            }
        };
        match conn.call(frame.clone(), oneway).await {
            Ok(response) => return Ok(response),
            Err(CallError::NotSent) => {
                error = format!("sockmesh: the connection to {endpoint} closed before the request was sent");
            }
            Err(CallError::Closed) => {
                return Err((
                    Fail::Closed,
                    format!("sockmesh: the connection to {endpoint} closed with the request in flight"),
                ));
            }
        }
    }
    Err((Fail::Connect, error))
}

#[cfg(test)]
mod tests {
    use std::io;

    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        conn::{ConnEntry, Direction, OrigDstSource, PodCtx, Shared},
        protocol::hessian2,
        routing::{compile, parse_toml, Router},
        sys::NetNs,
    };

    const BOLT_V1: &[u8] = include_bytes!("../protocol/testdata/bolt_v1.c2s.bin");
    const BOLT_V2: &[u8] = include_bytes!("../protocol/testdata/bolt_v2_crc.c2s.bin");
    const DUBBO: &[u8] = include_bytes!("../protocol/testdata/dubbo.c2s.bin");
    /// The npm client's `echo` with requestProps `x-canary=true` (and others), default codec.
    const BOLT_PROPS: &[u8] = include_bytes!("../protocol/testdata/bolt_props.c2s.bin");
    const VIP: &str = "10.96.0.50:12200";
    const WAIT: Duration = Duration::from_secs(20);

    struct NoOrigDst;

    impl OrigDstSource for NoOrigDst {
        fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    fn frames<P: MuxProto>(bytes: &[u8]) -> Vec<P::Frame> {
        let mut codec = P::Codec::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    /// Read one frame; `None` at EOF or on a reset.
    async fn read_frame<P: MuxProto>(r: &mut OwnedReadHalf, buf: &mut BytesMut) -> Option<P::Frame> {
        let mut codec = P::Codec::default();
        loop {
            if let Some(f) = codec.decode(buf).unwrap() {
                return Some(f);
            }
            match r.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    enum Reply<F> {
        Send(F),
        Crash,
        Nothing,
    }

    struct TestServer {
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
    }

    /// A server that answers every request with `answer` after `delay` (heartbeats at once).
    async fn server<P: MuxProto>(
        name: &'static str,
        delay: Duration,
        answer: fn(&P::Frame, &str) -> Reply<P::Frame>,
    ) -> TestServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                counter.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.into_split();
                    let (tx, mut rx) = mpsc::unbounded_channel::<P::Frame>();
                    let writer = tokio::spawn(async move {
                        let mut codec = P::Codec::default();
                        while let Some(f) = rx.recv().await {
                            let mut buf = BytesMut::new();
                            codec.encode(f, &mut buf).unwrap();
                            if wr.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = BytesMut::new();
                    while let Some(req) = read_frame::<P>(&mut rd, &mut buf).await {
                        if let Some(ack) = P::heartbeat_reply(&req) {
                            let _ = tx.send(ack);
                            continue;
                        }
                        match answer(&req, name) {
                            Reply::Send(res) => {
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = tx.send(res);
                                });
                            }
                            Reply::Crash => break,
                            Reply::Nothing => {}
                        }
                    }
                    writer.abort();
                });
            }
        });
        TestServer { addr, accepts }
    }

    fn bolt_answer(req: &BoltFrame, name: &str) -> Reply<BoltFrame> {
        if req.header("x-crash").is_some() {
            return Reply::Crash;
        }
        if req.cmd_type == bolt::TYPE_REQUEST_ONEWAY {
            return Reply::Nothing;
        }
        let subset = req.header_str(SUBSET_KEY).unwrap_or("-");
        Reply::Send(BoltFrame {
            cmd_code: bolt::CMD_RPC_RESPONSE,
            class_name: Bytes::from_static(b"com.alipay.sofa.rpc.core.response.SofaResponse"),
            content: format!("{name}|{subset}").into(),
            ..req.error_response_to(bolt::status::SUCCESS)
        })
    }

    fn dubbo_answer(req: &DubboFrame, name: &str) -> Reply<DubboFrame> {
        let inv = dubbo::decode_request_body(&req.body).unwrap();
        if inv.attachment("x-crash").is_some() {
            return Reply::Crash;
        }
        if !req.is_two_way() {
            return Reply::Nothing;
        }
        let mut body = Vec::new();
        let subset = inv.attachment(SUBSET_KEY).unwrap_or("-");
        hessian2::write_string(&mut body, &format!("{name}|{subset}"));
        Reply::Send(DubboFrame {
            flag: dubbo::SERIALIZATION_HESSIAN2,
            status: dubbo::status::OK,
            request_id: req.request_id,
            body: body.into(),
        })
    }

    fn bolt_content(f: &BoltFrame) -> String {
        String::from_utf8(f.content.to_vec()).unwrap()
    }

    fn dubbo_content(f: &DubboFrame) -> String {
        hessian2::Reader::new(&f.body).read_string().unwrap()
    }

    /// The policy: `VIP` is a service with subsets v1 and v2 (one endpoint each), a header
    /// route `x-canary: true` → v2 and a 90/10 default split.
    fn policy(protocol: &str, v1: SocketAddr, v2: SocketAddr, timeout_ms: u64, retries: u32) -> Router {
        let text = format!(
            r#"
            [[services]]
            name = "echo"
            addresses = ["{VIP}"]
            protocol = "{protocol}"
            timeout_ms = {timeout_ms}
            retries = {retries}
            endpoints = [
              {{ address = "{v1}", labels = {{ version = "v1" }} }},
              {{ address = "{v2}", labels = {{ version = "v2" }} }},
            ]
            subsets = [
              {{ name = "v1", labels = {{ version = "v1" }} }},
              {{ name = "v2", labels = {{ version = "v2" }} }},
            ]
            [[services.routes]]
            name = "canary"
            match = {{ headers = {{ x-canary = "true" }} }}
            split = [{{ subset = "v2", weight = 100 }}]
            [[services.routes]]
            name = "default"
            split = [{{ subset = "v1", weight = 90 }}, {{ subset = "v2", weight = 10 }}]
            "#
        );
        Router::new(compile(parse_toml(&text).unwrap()).unwrap())
    }

    /// The proxy side: a listener whose connections are served by `serve_bolt`/`serve_dubbo`
    /// as if captured on their way to `VIP`.
    struct Mesh {
        addr: SocketAddr,
        shared: Arc<Shared>,
        pod: Arc<PodCtx>,
    }

    async fn mesh<P: MuxProto>(router: Router) -> Mesh {
        mesh_with::<P, _>(router, || UpgradeDrain).await
    }

    /// The context of an app connection from `client` in the test mesh.
    fn test_ctx(shared: &Arc<Shared>, pod: &Arc<PodCtx>, client: SocketAddr) -> ConnCtx {
        ConnCtx {
            pod: pod.clone(),
            shared: shared.clone(),
            client,
            orig: VIP.parse().unwrap(),
            entry: Arc::new(ConnEntry {
                id: 1,
                pod: "t".into(),
                direction: Direction::Outbound,
                client,
                original_dst: VIP.parse().unwrap(),
                upstream_local: Mutex::new(None),
                bytes_to_upstream: AtomicU64::new(0),
                bytes_to_client: AtomicU64::new(0),
                started: Instant::now(),
            }),
            inbound: false,
            local: VIP.parse().unwrap(),
        }
    }

    /// A mesh whose app connections learn of a drain from `drain()`.
    async fn mesh_with<P: MuxProto, D: MuxDrain>(
        router: Router,
        drain: impl Fn() -> D + Send + 'static,
    ) -> Mesh {
        let shared = Arc::new(Shared::new(Box::new(NoOrigDst), router));
        let pod = Arc::new(PodCtx {
            name: "t".into(),
            netns: NetNs::current().unwrap(),
            stats: Arc::default(),
            outbound_port: 0,
            inbound_port: 0,
            mark: 0,
            colour: None,
            propagate: false,
            netns_cookie: 0,
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (s2, p2) = (shared.clone(), pod.clone());
        tokio::spawn(async move {
            loop {
                let (s, client) = l.accept().await.unwrap();
                let ctx = test_ctx(&s2, &p2, client);
                tokio::spawn(serve_with::<P, D>(s, BytesMut::new(), 0, ctx, drain()));
            }
        });
        Mesh { addr, shared, pod }
    }

    impl Mesh {
        fn route_view(&self, route: &str, subset: &str) -> crate::routing::RouteStatsView {
            let policy = self.shared.l7.router.current();
            let s = policy
                .stats()
                .into_iter()
                .find(|s| s.route == route && s.subset == subset)
                .unwrap();
            s.view()
        }

        fn errors(&self, protocol: &str, reason: &str) -> u64 {
            self.shared.l7.errors.get(protocol, reason)
        }
    }

    /// An app connection speaking `P`.
    struct App<P: MuxProto> {
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
        buf: BytesMut,
        codec: P::Codec,
    }

    impl<P: MuxProto> App<P> {
        async fn connect(m: &Mesh) -> Self {
            let (rd, wr) = TcpStream::connect(m.addr).await.unwrap().into_split();
            Self {
                rd,
                wr,
                buf: BytesMut::new(),
                codec: P::Codec::default(),
            }
        }

        async fn send(&mut self, frames: impl IntoIterator<Item = P::Frame>) {
            let mut out = BytesMut::new();
            for f in frames {
                self.codec.encode(f, &mut out).unwrap();
            }
            self.wr.write_all(&out).await.unwrap();
        }

        async fn recv(&mut self) -> P::Frame {
            tokio::time::timeout(WAIT, read_frame::<P>(&mut self.rd, &mut self.buf))
                .await
                .expect("a response in time")
                .expect("a response, not EOF")
        }

        async fn call(&mut self, f: P::Frame) -> P::Frame {
            self.send([f]).await;
            self.recv().await
        }

        /// The proxy closes the connection (after whatever it still had to say).
        async fn expect_closed(&mut self) -> Vec<P::Frame> {
            let mut got = Vec::new();
            let read = async {
                while let Some(f) = read_frame::<P>(&mut self.rd, &mut self.buf).await {
                    got.push(f);
                }
            };
            tokio::time::timeout(WAIT, read)
                .await
                .expect("the proxy closes the connection");
            got
        }
    }

    fn bolt_request(template: &BoltFrame, id: u32, headers: &[(&str, &str)]) -> BoltFrame {
        let mut f = template.clone();
        f.request_id = id;
        for (k, v) in headers {
            f.set_header(k, v);
        }
        f
    }

    fn dubbo_request(template: &DubboFrame, id: u64, attachments: &[(&str, &str)]) -> DubboFrame {
        let mut f = template.clone();
        f.request_id = id;
        for (k, v) in attachments {
            f.body = dubbo::add_attachment(&f.body, k, v).unwrap().into();
        }
        f
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bolt_2000_multiplexed_requests_split_90_10_with_the_apps_ids() {
        let delay = Duration::from_millis(20);
        let v1 = server::<Bolt>("v1", delay, bolt_answer).await;
        let v2 = server::<Bolt>("v2", delay, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 10_000, 1)).await;
        let t1 = frames::<Bolt>(BOLT_V1).remove(0);
        let t2 = frames::<Bolt>(BOLT_V2).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        let n = 2000u32;
        // v1 frames for even ids, v2 frames with a CRC for odd ones, all written at once.
        let reqs: Vec<BoltFrame> = (1..=n)
            .map(|id| bolt_request(if id % 2 == 0 { &t1 } else { &t2 }, id, &[]))
            .collect();
        let started = Instant::now();
        app.send(reqs).await;
        let mut seen = std::collections::HashSet::new();
        let mut v2_count = 0;
        for _ in 0..n {
            let r = app.recv().await;
            assert_eq!(r.status, bolt::status::SUCCESS);
            assert!(seen.insert(r.request_id), "duplicate id {}", r.request_id);
            assert_eq!(
                r.proto,
                if r.request_id % 2 == 0 {
                    bolt::PROTO_V1
                } else {
                    bolt::PROTO_V2
                }
            );
            match bolt_content(&r).as_str() {
                "v1|v1" => {}
                "v2|v2" => v2_count += 1,
                other => panic!("unexpected content {other:?}"),
            }
        }
        assert_eq!(seen, (1..=n).collect());
        // 2000 × 20 ms one after another would take 40 s.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let share = f64::from(v2_count) / f64::from(n);
        assert!((0.07..=0.13).contains(&share), "v2 share {share}");
        let (s1, s2) = (m.route_view("default", "v1"), m.route_view("default", "v2"));
        assert_eq!(s1.requests + s2.requests, u64::from(n));
        assert!(s1.failures.is_empty() && s2.failures.is_empty());
        assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
        assert!(v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
        assert!(m.pod.stats.bytes_upstream.load(Relaxed) >= (BOLT_V1.len() / 2) as u64 * u64::from(n));
        assert!(m.pod.stats.bytes_downstream.load(Relaxed) > 20 * u64::from(n));
    }

    #[tokio::test]
    async fn bolt_header_match_overrides_the_split_and_connections_are_shared() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 10_000, 1)).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut a = App::<Bolt>::connect(&m).await;
        let mut b = App::<Bolt>::connect(&m).await;
        a.send((1..=200).map(|id| bolt_request(&t, id, &[("X-Canary", "true")])))
            .await;
        b.send((1..=200).map(|id| bolt_request(&t, id, &[]))).await;
        for _ in 0..200 {
            assert_eq!(bolt_content(&a.recv().await), "v2|v2");
            assert_eq!(b.recv().await.status, bolt::status::SUCCESS);
        }
        assert_eq!(m.route_view("canary", "v2").requests, 200);
        // A third app connection later: still the same upstream connections.
        let mut c = App::<Bolt>::connect(&m).await;
        c.send((1..=100).map(|id| bolt_request(&t, id, &[("x-canary", "true")])))
            .await;
        for _ in 0..100 {
            assert_eq!(c.recv().await.status, bolt::status::SUCCESS);
        }
        assert!(
            v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT,
            "{}",
            v2.accepts.load(Relaxed)
        );
        assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
        let (bolt_live, _) = m.shared.l7.mux.live_connections();
        assert!((1..=2 * CONNS_PER_ENDPOINT).contains(&bolt_live), "{bolt_live}");
    }

    /// Answers with the subset and the request's content as received.
    fn bolt_echo_content(req: &BoltFrame, name: &str) -> Reply<BoltFrame> {
        let subset = req.header_str(SUBSET_KEY).unwrap_or("-");
        let mut content = format!("{name}|{subset}|").into_bytes();
        content.extend_from_slice(&req.content);
        Reply::Send(BoltFrame {
            cmd_code: bolt::CMD_RPC_RESPONSE,
            content: content.into(),
            ..req.error_response_to(bolt::status::SUCCESS)
        })
    }

    /// A service at `VIP` with subsets v1 and v2, `routes` (TOML) before a catch-all to v1.
    fn bolt_policy(v1: SocketAddr, v2: SocketAddr, routes: &str) -> Policy {
        let text = format!(
            r#"
            [[services]]
            name = "echo"
            addresses = ["{VIP}"]
            protocol = "bolt"
            endpoints = [
              {{ address = "{v1}", labels = {{ version = "v1" }} }},
              {{ address = "{v2}", labels = {{ version = "v2" }} }},
            ]
            subsets = [
              {{ name = "v1", labels = {{ version = "v1" }} }},
              {{ name = "v2", labels = {{ version = "v2" }} }},
            ]
            {routes}
            [[services.routes]]
            name = "default"
            split = [{{ subset = "v1", weight = 100 }}]
            "#
        );
        compile(parse_toml(&text).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn bolt_routes_on_the_sofa_request_body_of_the_npm_client() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_echo_content).await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_echo_content).await;
        let canary = r#"
            [[services.routes]]
            name = "canary"
            match = { headers = { X-Canary = "true" } }
            split = [{ subset = "v2", weight = 100 }]
        "#;
        let m = mesh::<Bolt>(Router::new(bolt_policy(v1.addr, v2.addr, canary))).await;
        // The real client's frame: only `service` in the Bolt header map; `x-canary` and the
        // method are only in the Hessian2 SofaRequest.
        let props = frames::<Bolt>(BOLT_PROPS).remove(0);
        assert_eq!(props.headers.len(), 1);
        assert_eq!(props.header(BOLT_METHOD_HEADER), None);
        let plain = frames::<Bolt>(BOLT_V1);
        let answer = |f: &BoltFrame, want: &str| {
            assert_eq!(f.status, bolt::status::SUCCESS);
            let content = &f.content[..];
            let (head, body) = content.split_at(want.len());
            assert_eq!(head, want.as_bytes());
            body.to_vec()
        };
        let mut app = App::<Bolt>::connect(&m).await;

        // A headers match on requestProps; the content reaches the server byte for byte.
        let got = app.call(bolt_request(&props, 1, &[])).await;
        assert_eq!(answer(&got, "v2|v2|"), &props.content[..]);
        assert_eq!(m.route_view("canary", "v2").requests, 1);
        // No x-canary in the body: the catch-all.
        let got = app.call(bolt_request(&plain[0], 2, &[])).await;
        assert_eq!(answer(&got, "v1|v1|"), &plain[0].content[..]);
        // The Bolt header map comes first.
        let got = app.call(bolt_request(&props, 3, &[("x-canary", "false")])).await;
        answer(&got, "v1|v1|");

        // A method match (and a service match) on the same request, after a live policy change.
        let by_method = r#"
            [[services.routes]]
            name = "echo-method"
            match = { method = "echo", service = "com.sockmesh.test.EchoService" }
            split = [{ subset = "v2", weight = 100 }]
        "#;
        m.shared
            .l7
            .router
            .replace(bolt_policy(v1.addr, v2.addr, by_method));
        let got = app.call(bolt_request(&props, 4, &[])).await;
        assert_eq!(answer(&got, "v2|v2|"), &props.content[..]);
        assert_eq!(m.route_view("echo-method", "v2").requests, 1);
        // `fail` is another method: the catch-all.
        answer(&app.call(bolt_request(&plain[1], 5, &[])).await, "v1|v1|");
        // Without the `service` header, the service comes from targetServiceUniqueName.
        let mut no_service = bolt_request(&props, 6, &[]);
        assert!(no_service.remove_header(bolt::HEADER_SERVICE));
        answer(&app.call(no_service).await, "v2|v2|");
        // A method header wins over the body.
        answer(
            &app.call(bolt_request(&props, 7, &[(BOLT_METHOD_HEADER, "other")]))
                .await,
            "v1|v1|",
        );
        assert_eq!(m.route_view("echo-method", "v2").requests, 2);

        // A content that is not a valid SofaRequest: routed on the header map, no error, and
        // forwarded as is.
        let mut bad = bolt_request(&props, 8, &[]);
        let mut content = bad.content.to_vec();
        content.truncate(60);
        bad.content = content.into();
        let got = app.call(bad.clone()).await;
        assert_eq!(answer(&got, "v1|v1|"), &bad.content[..]);
        let policy = m.shared.l7.router.current();
        assert!(policy.stats().iter().all(|s| s.view().failures.is_empty()));
        assert_eq!(m.errors("bolt", "hessian2_truncated"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dubbo_split_header_match_heartbeat_and_bad_body() {
        let delay = Duration::from_millis(5);
        let v1 = server::<Dubbo>("v1", delay, dubbo_answer).await;
        let v2 = server::<Dubbo>("v2", delay, dubbo_answer).await;
        let m = mesh::<Dubbo>(policy("dubbo", v1.addr, v2.addr, 10_000, 1)).await;
        let t = frames::<Dubbo>(DUBBO).remove(0);
        let mut app = App::<Dubbo>::connect(&m).await;
        let n = 2000u64;
        // Large ids: the app's ids are 64-bit and must come back unchanged.
        let base = 1u64 << 40;
        app.send((0..n).map(|i| dubbo_request(&t, base + i, &[]))).await;
        let mut seen = std::collections::HashSet::new();
        let mut v2_count = 0;
        for _ in 0..n {
            let r = app.recv().await;
            assert_eq!(r.status, dubbo::status::OK);
            assert!(seen.insert(r.request_id));
            match dubbo_content(&r).as_str() {
                "v1|v1" => {}
                "v2|v2" => v2_count += 1,
                other => panic!("unexpected content {other:?}"),
            }
        }
        assert_eq!(seen, (base..base + n).collect());
        let share = v2_count as f64 / n as f64;
        assert!((0.07..=0.13).contains(&share), "v2 share {share}");

        // The attachment overrides the split.
        app.send((1..=100).map(|id| dubbo_request(&t, id, &[("x-canary", "true")])))
            .await;
        for _ in 0..100 {
            assert_eq!(dubbo_content(&app.recv().await), "v2|v2");
        }
        assert_eq!(m.route_view("canary", "v2").requests, 100);

        // A heartbeat is answered by the proxy.
        let hb = Dubbo::heartbeat(77);
        let r = app.call(hb).await;
        assert_eq!(
            (r.request_id, r.is_event(), r.is_request(), r.status),
            (77, true, false, dubbo::status::OK)
        );

        // A body that is not Hessian2: BAD_REQUEST for that request, the connection carries on.
        let mut bad = t.clone();
        bad.request_id = 5000;
        bad.body = Bytes::from_static(b"\x90not hessian");
        let r = app.call(bad).await;
        assert_eq!((r.request_id, r.status), (5000, dubbo::status::BAD_REQUEST));
        assert_eq!(m.errors("dubbo", "hessian2_unexpected_tag"), 1);
        let r = app.call(dubbo_request(&t, 5001, &[])).await;
        assert_eq!((r.request_id, r.status), (5001, dubbo::status::OK));
        assert!(v1.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
        assert!(v2.accepts.load(Relaxed) <= CONNS_PER_ENDPOINT);
    }

    /// A port nothing listens on.
    async fn dead_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn dead_endpoint_is_retried_then_answered_with_an_error() {
        let dead = dead_port().await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", dead, v2.addr, 5_000, 1)).await;
        let t = frames::<Bolt>(BOLT_V2).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        // Until the split sends one to v1 (the dead endpoint).
        let mut failed = 0;
        for id in 1..=200 {
            let r = app.call(bolt_request(&t, id, &[])).await;
            assert_eq!(r.request_id, id);
            if r.status != bolt::status::SUCCESS {
                assert_eq!(r.status, bolt::status::ERROR_COMM);
                assert_eq!(r.proto, bolt::PROTO_V2);
                let msg = r.header_str(ERROR_HEADER).unwrap();
                assert!(msg.contains(&dead.to_string()), "{msg}");
                failed += 1;
            }
        }
        assert!(failed > 0);
        let s = m.route_view("default", "v1");
        assert_eq!(s.requests, failed);
        // One endpoint in the subset: the retry tries it again.
        assert_eq!(s.retries, failed);
        assert_eq!(s.failures.get("upstream_connect"), Some(&failed));
        assert_eq!(m.errors("bolt", "upstream_connect"), failed);
        assert_eq!(m.route_view("default", "v2").failures.len(), 0);

        // Dubbo: SERVICE_ERROR with a message naming the endpoint.
        let dead2 = dead_port().await;
        let m = mesh::<Dubbo>(policy("dubbo", dead, dead2, 5_000, 2)).await;
        let mut app = App::<Dubbo>::connect(&m).await;
        let r = app.call(dubbo_request(&frames::<Dubbo>(DUBBO)[0], 9, &[])).await;
        assert_eq!((r.request_id, r.status), (9, dubbo::status::SERVICE_ERROR));
        let msg = dubbo_content(&r);
        assert!(
            msg.contains(&dead.to_string()) || msg.contains(&dead2.to_string()),
            "{msg}"
        );
        assert_eq!(m.errors("dubbo", "upstream_connect"), 1);
    }

    #[tokio::test]
    async fn retry_goes_to_the_other_endpoint_of_the_subset() {
        let dead = dead_port().await;
        let live = server::<Bolt>("live", Duration::ZERO, bolt_answer).await;
        let text = format!(
            r#"
            [[services]]
            name = "echo"
            addresses = ["{VIP}"]
            retries = 1
            endpoints = [{{ address = "{dead}" }}, {{ address = "{}" }}]
            "#,
            live.addr
        );
        let m = mesh::<Bolt>(Router::new(compile(parse_toml(&text).unwrap()).unwrap())).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        for id in 1..=10 {
            let r = app.call(bolt_request(&t, id, &[])).await;
            assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
            assert_eq!(bolt_content(&r), "live|all");
        }
        let s = m.route_view("default", "all");
        assert_eq!((s.requests, s.retries), (10, 5));
        assert!(s.failures.is_empty());
    }

    #[tokio::test]
    async fn slow_upstream_times_out_and_the_connection_stays_usable() {
        let slow = server::<Bolt>("v1", Duration::from_millis(600), bolt_answer).await;
        let fast = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", slow.addr, fast.addr, 150, 1)).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        // Until one goes to the slow subset.
        let mut id = 0;
        loop {
            id += 1;
            let started = Instant::now();
            let r = app.call(bolt_request(&t, id, &[])).await;
            assert_eq!(r.request_id, id);
            if r.status == bolt::status::TIMEOUT {
                let took = started.elapsed();
                assert!(
                    took >= Duration::from_millis(140) && took < Duration::from_millis(550),
                    "{took:?}"
                );
                break;
            }
            assert_eq!(bolt_content(&r), "v2|v2");
        }
        assert_eq!(m.errors("bolt", "timeout"), 1);
        assert_eq!(m.route_view("default", "v1").failures.get("timeout"), Some(&1));
        // The late response arrives upstream and is dropped; the next answer is the next request's.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = app.call(bolt_request(&t, 9999, &[("x-canary", "true")])).await;
        assert_eq!((r.request_id, r.status), (9999, bolt::status::SUCCESS));
        assert_eq!(bolt_content(&r), "v2|v2");
    }

    #[tokio::test]
    async fn upstream_dying_mid_request_fails_it_and_is_replaced() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        let r = app
            .call(bolt_request(&t, 1, &[("x-crash", "1"), ("x-canary", "true")]))
            .await;
        assert_eq!((r.request_id, r.status), (1, bolt::status::CONNECTION_CLOSED));
        assert_eq!(m.errors("bolt", "upstream_reset"), 1);
        for id in 2..=10 {
            let r = app.call(bolt_request(&t, id, &[("x-canary", "true")])).await;
            assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
        }
        assert!(v2.accepts.load(Relaxed) >= 2);
    }

    #[tokio::test]
    async fn bad_input_is_counted_and_closes_only_that_connection() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut good = App::<Bolt>::connect(&m).await;
        assert_eq!(
            good.call(bolt_request(&t, 1, &[])).await.status,
            bolt::status::SUCCESS
        );

        // Garbage: no request id, so no response; counted and closed.
        let mut garbage = App::<Bolt>::connect(&m).await;
        garbage.wr.write_all(b"\x07GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(garbage.expect_closed().await.is_empty());
        assert_eq!(m.errors("bolt", "bolt_bad_proto"), 1);

        // A content length beyond the limit: the id is known, so CODEC_EXCEPTION, then close.
        let mut big = App::<Bolt>::connect(&m).await;
        let mut bytes = BytesMut::new();
        BoltCodec::default()
            .encode(bolt_request(&t, 42, &[]), &mut bytes)
            .unwrap();
        bytes[18..22].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        big.wr.write_all(&bytes[..22]).await.unwrap();
        let got = big.expect_closed().await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].request_id, got[0].status),
            (42, bolt::status::CODEC_EXCEPTION)
        );
        assert_eq!(m.errors("bolt", "bolt_frame_too_large"), 1);

        // A frame cut short at EOF.
        let mut cut = App::<Bolt>::connect(&m).await;
        cut.wr.write_all(&BOLT_V1[..30]).await.unwrap();
        cut.wr.shutdown().await.unwrap();
        assert!(cut.expect_closed().await.is_empty());
        assert_eq!(m.errors("bolt", "bolt_truncated"), 1);

        // The first connection never noticed.
        for id in 2..=5 {
            let r = good.call(bolt_request(&t, id, &[])).await;
            assert_eq!((r.request_id, r.status), (id, bolt::status::SUCCESS));
        }

        // Dubbo: bad magic closes; an oversized body with its id gets BAD_REQUEST first.
        let d1 = server::<Dubbo>("v1", Duration::ZERO, dubbo_answer).await;
        let d2 = server::<Dubbo>("v2", Duration::ZERO, dubbo_answer).await;
        let m = mesh::<Dubbo>(policy("dubbo", d1.addr, d2.addr, 5_000, 1)).await;
        let mut garbage = App::<Dubbo>::connect(&m).await;
        garbage.wr.write_all(b"hello there").await.unwrap();
        assert!(garbage.expect_closed().await.is_empty());
        assert_eq!(m.errors("dubbo", "dubbo_bad_magic"), 1);
        let mut big = App::<Dubbo>::connect(&m).await;
        let mut header = DUBBO[..dubbo::HEADER_LEN].to_vec();
        header[4..12].copy_from_slice(&77u64.to_be_bytes());
        header[12..16].copy_from_slice(&(64u32 << 20).to_be_bytes());
        big.wr.write_all(&header).await.unwrap();
        let got = big.expect_closed().await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].request_id, got[0].status),
            (77, dubbo::status::BAD_REQUEST)
        );
        assert_eq!(m.errors("dubbo", "dubbo_frame_too_large"), 1);
    }

    #[tokio::test]
    async fn bolt_heartbeats_and_one_way_requests() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
        let v2 = server::<Bolt>("v2", Duration::ZERO, bolt_answer).await;
        let m = mesh::<Bolt>(policy("bolt", v1.addr, v2.addr, 5_000, 1)).await;
        let mut app = App::<Bolt>::connect(&m).await;
        let r = app.call(Bolt::heartbeat(31)).await;
        assert_eq!(
            (r.request_id, r.cmd_type, r.cmd_code),
            (31, bolt::TYPE_RESPONSE, bolt::CMD_HEARTBEAT)
        );
        // Heartbeats are not forwarded: no upstream connection yet.
        assert_eq!(v1.accepts.load(Relaxed) + v2.accepts.load(Relaxed), 0);
        let mut oneway = frames::<Bolt>(BOLT_V1).remove(0);
        oneway.cmd_type = bolt::TYPE_REQUEST_ONEWAY;
        oneway.request_id = 32;
        app.send([oneway]).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        // The next frame the app sees answers the next two-way request (nothing for the one-way).
        let r = app.call(bolt_request(&t, 33, &[])).await;
        assert_eq!((r.request_id, r.status), (33, bolt::status::SUCCESS));
        let s = m.route_view("default", "v1");
        assert_eq!(s.requests + m.route_view("default", "v2").requests, 2);
    }

    #[tokio::test]
    async fn no_route_answers_no_processor_and_service_not_found() {
        let v1 = server::<Bolt>("v1", Duration::ZERO, bolt_answer).await;
        let text = format!(
            r#"
            [[services]]
            name = "echo"
            addresses = ["{VIP}"]
            endpoints = [{{ address = "{}" }}]
            [[services.routes]]
            match = {{ method = "only-this" }}
            split = [{{ subset = "all", weight = 1 }}]
            "#,
            v1.addr
        );
        let router = || Router::new(compile(parse_toml(&text).unwrap()).unwrap());
        let m = mesh::<Bolt>(router()).await;
        let mut app = App::<Bolt>::connect(&m).await;
        let r = app.call(bolt_request(&frames::<Bolt>(BOLT_V1)[0], 5, &[])).await;
        assert_eq!((r.request_id, r.status), (5, bolt::status::NO_PROCESSOR));
        assert_eq!(m.errors("bolt", "no_route"), 1);
        let m = mesh::<Dubbo>(router()).await;
        let mut app = App::<Dubbo>::connect(&m).await;
        let r = app.call(dubbo_request(&frames::<Dubbo>(DUBBO)[0], 6, &[])).await;
        assert_eq!((r.request_id, r.status), (6, dubbo::status::SERVICE_NOT_FOUND));
        assert_eq!(m.errors("dubbo", "no_route"), 1);
    }

    // ---------------------------------------------------------------------------------------
    // Upgrade: moving an app connection at a frame boundary

    /// A drain the test starts (`go`: the hand-over deadline); moved connections come out of
    /// `moved` with their undecoded bytes and the stream offset.
    #[derive(Clone)]
    struct TestDrain {
        go: tokio::sync::watch::Receiver<Option<Instant>>,
        moved: mpsc::UnboundedSender<(TcpStream, Vec<u8>, u64)>,
    }

    type Moved = mpsc::UnboundedReceiver<(TcpStream, Vec<u8>, u64)>;

    impl TestDrain {
        fn new() -> (Self, tokio::sync::watch::Sender<Option<Instant>>, Moved) {
            let (go_tx, go) = tokio::sync::watch::channel(None);
            let (moved, moved_rx) = mpsc::unbounded_channel();
            (Self { go, moved }, go_tx, moved_rx)
        }
    }

    impl MuxDrain for TestDrain {
        async fn wait(&self) -> Instant {
            let mut go = self.go.clone();
            let by = match go.wait_for(|g| g.is_some()).await {
                Ok(by) => *by,
                Err(_) => None,
            };
            match by {
                Some(by) => by,
                None => std::future::pending().await,
            }
        }

        fn hand_over(&self, s: TcpStream, read: Vec<u8>, offset: u64, _: &ConnCtx, _: &'static str) {
            let _ = self.moved.send((s, read, offset));
        }
    }

    fn encoded<P: MuxProto>(frames: impl IntoIterator<Item = P::Frame>) -> BytesMut {
        let mut codec = P::Codec::default();
        let mut out = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut out).unwrap();
        }
        out
    }

    /// Until the proxy has read `n` bytes from its app connections.
    async fn read_by_proxy(m: &Mesh, n: u64) {
        let t0 = Instant::now();
        while m.pod.stats.bytes_upstream.load(Relaxed) < n {
            assert!(
                t0.elapsed() < WAIT,
                "the proxy read {} of {n} bytes",
                m.pod.stats.bytes_upstream.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn draining_answers_the_requests_in_flight_then_moves_the_socket_with_a_partial_frame() {
        const DELAY: Duration = Duration::from_millis(300);
        let v1 = server::<Bolt>("v1", DELAY, bolt_answer).await;
        let v2 = server::<Bolt>("v2", DELAY, bolt_answer).await;
        let (drain, go, mut moved) = TestDrain::new();
        let next_gen = TestDrain::new().0;
        let m = mesh_with::<Bolt, _>(policy("bolt", v1.addr, v2.addr, 5_000, 1), move || drain.clone()).await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        // Three requests, a heartbeat and a one-way request, then the first 10 bytes of the next
        // request: the proxy has read everything when the drain starts.
        let mut oneway = bolt_request(&t, 4, &[]);
        oneway.cmd_type = bolt::TYPE_REQUEST_ONEWAY;
        let whole = encoded::<Bolt>([
            bolt_request(&t, 1, &[]),
            bolt_request(&t, 2, &[]),
            bolt_request(&t, 3, &[]),
            Bolt::heartbeat(5),
            oneway,
        ]);
        let next = encoded::<Bolt>([bolt_request(&t, 6, &[])]);
        let sent = Instant::now();
        app.wr.write_all(&whole).await.unwrap();
        app.wr.write_all(&next[..10]).await.unwrap();
        read_by_proxy(&m, (whole.len() + 10) as u64).await;
        go.send_replace(Some(Instant::now() + WAIT));
        let (s, read, offset) = tokio::time::timeout(WAIT, moved.recv())
            .await
            .expect("moved in time")
            .expect("moved");
        // Not before the requests in flight were answered (the servers take DELAY)...
        assert!(sent.elapsed() >= DELAY, "moved after {:?}", sent.elapsed());
        // ... and written back: the answers are at the app already, the heartbeat's among them;
        // nothing for the one-way request.
        let mut ids: Vec<u32> = Vec::new();
        for _ in 0..4 {
            let r = app.recv().await;
            assert!(r.cmd_type == bolt::TYPE_RESPONSE, "{r:?}");
            ids.push(r.request_id);
        }
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 5]);
        // The bytes of the next frame moved with the socket, at their stream offset.
        assert_eq!(read, &next[..10]);
        assert_eq!(offset, whole.len() as u64);
        // The next generation serves the same socket from there.
        let ctx = test_ctx(&m.shared, &m.pod, app.wr.local_addr().unwrap());
        tokio::spawn(serve_with::<Bolt, _>(
            s,
            BytesMut::from(&read[..]),
            offset,
            ctx,
            next_gen,
        ));
        app.wr.write_all(&next[10..]).await.unwrap();
        let r = app.recv().await;
        assert_eq!((r.request_id, r.status), (6, bolt::status::SUCCESS));
        let r = app.call(bolt_request(&t, 7, &[])).await;
        assert_eq!((r.request_id, r.status), (7, bolt::status::SUCCESS));
        // Each request counted once: 1, 2, 3, the one-way 4, 6 and 7.
        let s = m.route_view("default", "v1");
        assert_eq!(s.requests + m.route_view("default", "v2").requests, 6);
        assert_eq!(m.errors("bolt", "upgrade_not_moved"), 0);
    }

    #[tokio::test]
    async fn dubbo_moves_at_a_frame_boundary_too() {
        let v1 = server::<Dubbo>("v1", Duration::from_millis(100), dubbo_answer).await;
        let v2 = server::<Dubbo>("v2", Duration::from_millis(100), dubbo_answer).await;
        let (drain, go, mut moved) = TestDrain::new();
        let m =
            mesh_with::<Dubbo, _>(policy("dubbo", v1.addr, v2.addr, 5_000, 1), move || drain.clone()).await;
        let t = frames::<Dubbo>(DUBBO).remove(0);
        let mut app = App::<Dubbo>::connect(&m).await;
        let whole = encoded::<Dubbo>([dubbo_request(&t, 1, &[]), dubbo_request(&t, 2, &[])]);
        let next = encoded::<Dubbo>([dubbo_request(&t, 3, &[])]);
        app.wr.write_all(&whole).await.unwrap();
        app.wr.write_all(&next[..20]).await.unwrap();
        read_by_proxy(&m, (whole.len() + 20) as u64).await;
        go.send_replace(Some(Instant::now() + WAIT));
        let (s, read, offset) = tokio::time::timeout(WAIT, moved.recv()).await.unwrap().unwrap();
        let mut ids = vec![app.recv().await.request_id, app.recv().await.request_id];
        ids.sort();
        assert_eq!(ids, [1, 2]);
        assert_eq!((read.as_slice(), offset), (&next[..20], whole.len() as u64));
        let ctx = test_ctx(&m.shared, &m.pod, app.wr.local_addr().unwrap());
        tokio::spawn(serve_with::<Dubbo, _>(
            s,
            BytesMut::from(&read[..]),
            offset,
            ctx,
            TestDrain::new().0,
        ));
        app.wr.write_all(&next[20..]).await.unwrap();
        assert_eq!(app.recv().await.request_id, 3);
    }

    #[tokio::test]
    async fn requests_unanswered_by_the_hand_over_deadline_keep_the_connection_until_answered() {
        let slow = server::<Bolt>("v1", Duration::from_millis(1500), bolt_answer).await;
        let slow2 = server::<Bolt>("v2", Duration::from_millis(1500), bolt_answer).await;
        let (drain, go, mut moved) = TestDrain::new();
        let m = mesh_with::<Bolt, _>(policy("bolt", slow.addr, slow2.addr, 5_000, 1), move || {
            drain.clone()
        })
        .await;
        let t = frames::<Bolt>(BOLT_V1).remove(0);
        let mut app = App::<Bolt>::connect(&m).await;
        let whole = encoded::<Bolt>([bolt_request(&t, 1, &[])]);
        app.wr.write_all(&whole).await.unwrap();
        read_by_proxy(&m, whole.len() as u64).await;
        go.send_replace(Some(Instant::now() + Duration::from_millis(100)));
        // The late answer still reaches the app, then the connection closes; nothing moved.
        let got = app.expect_closed().await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].request_id, got[0].status), (1, bolt::status::SUCCESS));
        assert!(moved.try_recv().is_err(), "moved with a request in flight");
        assert_eq!(m.errors("bolt", "upgrade_not_moved"), 1);
    }
}
