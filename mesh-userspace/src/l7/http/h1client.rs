//! The HTTP/1.1 upstream client, driven inline by the request's own task: no connection task,
//! no channel between the request and its connection. A pooled connection ([`H1Conn`]) is the
//! socket and its read buffer. [`exchange`] writes the request head (serialised here) and the
//! body and reads the response head; the response body ([`H1Body`]) owns the connection and
//! reads it as the app's side polls it, then hands it back to its pool when the response ended
//! cleanly and both sides keep it open (see [`H1Body`]).
//!
//! Request bodies: `Content-Length` as the app sent it; without one, the body's exact size
//! when it is known up front, else chunked (trailers then go out as chunked trailers; with a
//! `Content-Length` they are dropped). A body with no bytes and no length goes without a
//! body (`content-length: 0` for POST, PUT and PATCH).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::Arc,
    task::{ready, Context, Poll, Waker},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, Method, Request};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{
    h1wire::{
        keep_alive, parse_response_head, response_framing, write_request_head, Chunk, ChunkDecoder, Framing,
        ResponseHead, WireError,
    },
    Body, BoxError,
};
use crate::{conn::Shared, propagate::ColourKernel};

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Request body bytes gathered into the first write with the head.
const FIRST_WRITE_MAX: usize = 64 * 1024;

/// A connection to one upstream endpoint.
pub(super) struct H1Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Our end's address (the app side's peer, for kernel propagation).
    pub(super) local: SocketAddr,
    endpoint: SocketAddr,
    /// An inbound delivery connection of a propagating pod: its colour is forgotten on close.
    propagation: Option<ColourKernel>,
}

impl H1Conn {
    pub(super) fn new(
        io: TcpStream,
        endpoint: SocketAddr,
        propagation: Option<ColourKernel>,
    ) -> io::Result<Self> {
        let local = io.local_addr()?;
        Ok(Self {
            io,
            buf: BytesMut::new(),
            local,
            endpoint,
            propagation,
        })
    }

    /// Whether an idle connection is still open. Reads tokio's cached readiness: only when the
    /// socket is readable (the upstream closed it, or sent bytes nobody asked for) does it read,
    /// and then the connection is unusable either way. No system call otherwise.
    pub(super) fn idle_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut b = [0u8; 1];
                matches!(self.io.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        // tokio clears the read readiness on a short read: no extra read to find WouldBlock.
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Read what is there now without waiting (`Ok(None)`: nothing).
    fn fill_now(&mut self) -> io::Result<Option<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_fill(&mut cx) {
            Poll::Ready(r) => r.map(Some),
            Poll::Pending => Ok(None),
        }
    }
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        if let Some(p) = self.propagation.take() {
            let (app_local, app_remote) = crate::propagate::app_side_of_delivering(self.local, self.endpoint);
            p.clear_inbound(app_local, app_remote);
        }
    }
}

/// Why an exchange failed.
pub(super) enum Failed {
    /// Not a byte was written: the request, whole again.
    NotSent(Box<Request<Body>>),
    /// The request (or part of it) went out and no valid response came (closed, reset, or the
    /// app's request body failed).
    Sent(BoxError),
    /// The upstream's answer was not a valid HTTP/1.1 response.
    Malformed(WireError),
}

/// A response head read, with what follows it.
pub(super) struct Exchanged {
    pub(super) head: ResponseHead,
    framing: Framing,
    reusable: bool,
}

/// How the request body goes out.
#[derive(Clone, Copy, PartialEq)]
enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

/// Encodes request body frames into the output buffer.
struct ReqEncoder {
    framing: ReqFraming,
    sent: u64,
    trailers: Option<HeaderMap>,
}

impl ReqEncoder {
    fn frame(&mut self, f: Frame<Bytes>, out: &mut Vec<u8>) -> Result<(), BoxError> {
        match f.into_data() {
            Ok(d) => {
                self.sent += d.len() as u64;
                match self.framing {
                    ReqFraming::Length(n) if self.sent > n => {
                        return Err("request body longer than its content-length".into())
                    }
                    ReqFraming::None if !d.is_empty() => {
                        return Err("request body where none was announced".into())
                    }
                    ReqFraming::Chunked if !d.is_empty() => {
                        out.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
                        out.extend_from_slice(&d);
                        out.extend_from_slice(b"\r\n");
                    }
                    ReqFraming::Chunked | ReqFraming::None => {}
                    ReqFraming::Length(_) => out.extend_from_slice(&d),
                }
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    self.trailers = Some(t);
                }
            }
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<u8>) -> Result<(), BoxError> {
        match self.framing {
            ReqFraming::Length(n) if self.sent != n => {
                Err("request body shorter than its content-length".into())
            }
            ReqFraming::Chunked => {
                out.extend_from_slice(b"0\r\n");
                for (k, v) in self.trailers.iter().flatten() {
                    out.extend_from_slice(k.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(v.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One frame of `body` if it is ready now (`Some(None)`: the body ended).
async fn frame_now(body: &mut Body) -> Option<Option<Result<Frame<Bytes>, hyper::Error>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(f) => Poll::Ready(Some(f)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// A body that first yields frames already taken from `rest`.
struct Prefixed {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    ended: bool,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// Write the request on `conn`, then read the response head (interim 1xx responses skipped).
pub(super) async fn exchange(conn: &mut H1Conn, req: Request<Body>) -> Result<Exchanged, Failed> {
    let (parts, mut body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut extra_len = String::new();
    let framing = if let Some(n) = declared {
        ReqFraming::Length(n)
    } else if body.is_end_stream() {
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            extra_len.push('0');
        }
        ReqFraming::None
    } else if let Some(n) = body.size_hint().exact() {
        extra_len = n.to_string();
        ReqFraming::Length(n)
    } else {
        ReqFraming::Chunked
    };
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if !extra_len.is_empty() {
        extra.push(("content-length", &extra_len));
    }
    if framing == ReqFraming::Chunked {
        extra.push(("transfer-encoding", "chunked"));
    }
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Vec::with_capacity(512);
    write_request_head(&mut out, &parts.method, target, &parts.headers, &extra);
    let head_request = parts.method == Method::HEAD;
    let mut enc = ReqEncoder {
        framing,
        sent: 0,
        trailers: None,
    };
    // The body frames ready now go out with the head.
    let mut taken = std::collections::VecDeque::new();
    let mut body_done = framing == ReqFraming::None && body.is_end_stream();
    while !body_done && out.len() < FIRST_WRITE_MAX {
        match frame_now(&mut body).await {
            None => break,
            Some(None) => {
                body_done = true;
                enc.end(&mut out).map_err(Failed::Sent)?;
            }
            Some(Some(Ok(f))) => {
                let copy = match f.data_ref() {
                    Some(d) => Frame::data(d.clone()),
                    None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
                };
                enc.frame(f, &mut out).map_err(Failed::Sent)?;
                taken.push_back(copy);
            }
            Some(Some(Err(e))) => return Err(Failed::Sent(e.into())),
        }
    }
    // First write: a failure before any byte went out gives the request back.
    let mut written = 0;
    loop {
        match conn.io.try_write(&out[written..]) {
            Ok(n) => {
                written += n;
                if written == out.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) if written == 0 => {
                let body = Prefixed {
                    frames: taken,
                    ended: body_done,
                    rest: body,
                };
                return Err(Failed::NotSent(Box::new(Request::from_parts(
                    parts,
                    body.boxed(),
                ))));
            }
            Err(e) => return Err(Failed::Sent(e.into())),
        }
    }
    drop(taken);
    out.drain(..written);
    // The rest of the body; response bytes arriving meanwhile are read (an early final
    // response stops the body, and the connection is not reused).
    let mut unfinished = false;
    while !(out.is_empty() && body_done) {
        tokio::select! {
            biased;
            r = conn.io.readable() => {
                r.map_err(|e| Failed::Sent(e.into()))?;
                match conn.fill_now() {
                    Ok(Some(0)) | Err(_) => {
                        unfinished = true;
                        break;
                    }
                    Ok(Some(_)) => {
                        if skip_interim(&mut conn.buf).map_err(Failed::Malformed)? {
                            unfinished = true;
                            break;
                        }
                    }
                    Ok(None) => {}
                }
            }
            w = conn.io.writable(), if !out.is_empty() => {
                w.map_err(|e| Failed::Sent(e.into()))?;
                match conn.io.try_write(&out) {
                    Ok(n) => { out.drain(..n); }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Failed::Sent(e.into())),
                }
            }
            f = body.frame(), if out.is_empty() && !body_done => match f {
                None => {
                    body_done = true;
                    enc.end(&mut out).map_err(Failed::Sent)?;
                }
                Some(Ok(f)) => enc.frame(f, &mut out).map_err(Failed::Sent)?,
                Some(Err(e)) => return Err(Failed::Sent(e.into())),
            },
        }
    }
    drop(body);
    // The response head.
    loop {
        match parse_response_head(&conn.buf).map_err(Failed::Malformed)? {
            Some((head, n)) => {
                conn.buf.advance(n);
                if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Failed::Malformed(WireError(
                        "101 Switching Protocols to a request without Upgrade".into(),
                    )));
                }
                if head.status.is_informational() {
                    continue;
                }
                let framing =
                    response_framing(head_request, head.status, &head.headers).map_err(Failed::Malformed)?;
                let reusable = keep_alive(&head) && !unfinished && framing != Framing::UntilClose;
                return Ok(Exchanged {
                    head,
                    framing,
                    reusable,
                });
            }
            None => {
                let had = conn.buf.len();
                match conn.fill().await {
                    Ok(0) if had == 0 => {
                        return Err(Failed::Sent(
                            "the upstream closed the connection before responding".into(),
                        ))
                    }
                    Ok(0) => {
                        return Err(Failed::Sent(
                            "the upstream closed the connection within the response head".into(),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(Failed::Sent(e.into())),
                }
            }
        }
    }
}

/// Drop complete interim (1xx but 101) heads at the start of `buf`; whether a final response
/// has started.
fn skip_interim(buf: &mut BytesMut) -> Result<bool, WireError> {
    loop {
        match parse_response_head(buf)? {
            Some((h, n))
                if h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS =>
            {
                buf.advance(n)
            }
            Some(_) => return Ok(true),
            None => return Ok(false),
        }
    }
}

/// Where a connection goes when its response ended cleanly (its pool, unless full); dropped
/// unused when the connection is not reusable (holding the pool's busy count until then).
pub(super) type Park = Box<dyn FnOnce(H1Conn) + Send + Sync>;

enum BodyState {
    Length(u64),
    Chunked(ChunkDecoder),
    UntilClose,
    Done,
}

/// A response body read from its connection as the app's side polls it: Content-Length,
/// chunked (trailers passed on as a trailers frame) or until close (RFC 9112 §6.3). When it
/// ends cleanly on a reusable connection with no byte left over, the connection is parked; a
/// body dropped before its end, an error, or extra bytes close the connection. Errors end the
/// body (hyper then cuts the app's connection: the head is already out) and are counted
/// (`upstream_malformed` for bad framing, `upstream_reset` for a close or reset mid-body,
/// `upstream_body_timeout` when the upstream sends nothing for `[limits]
/// upstream_body_idle_timeout_secs` while the body waits for it).
pub(super) struct H1Body {
    conn: Option<H1Conn>,
    state: BodyState,
    reusable: bool,
    pending: Option<Frame<Bytes>>,
    park: Option<Park>,
    shared: Arc<Shared>,
    /// Armed when a read finds nothing (most bodies end within their first read and never
    /// arm it), pushed back by every read that brings bytes.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl H1Body {
    pub(super) fn new(conn: H1Conn, ex: &Exchanged, park: Park, shared: Arc<Shared>) -> Self {
        let state = match ex.framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkDecoder::new()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut b = Self {
            conn: Some(conn),
            state,
            reusable: ex.reusable,
            pending: None,
            park: Some(park),
            shared,
            idle: None,
        };
        if matches!(b.state, BodyState::Done | BodyState::Length(0)) {
            b.finish();
        }
        b
    }

    /// The body ended cleanly: park the connection if it can be reused.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        let (Some(conn), Some(park)) = (self.conn.take(), self.park.take()) else {
            return;
        };
        if self.reusable && conn.buf.is_empty() {
            park(conn);
        }
    }

    fn fail(&mut self, reason: &'static str, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.shared.l7.errors.count("http1", reason);
        self.state = BodyState::Done;
        self.conn = None;
        self.park = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl hyper::body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.pending.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                BodyState::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(*left) as usize;
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(dec) => match dec.decode(&mut conn.buf) {
                    Err(e) => return this.fail("upstream_malformed", e.into()),
                    Ok(Some(Chunk::Data(d))) => {
                        // The rest may be in the buffer already: end now, so the app's side
                        // sees the end with the last data.
                        match dec.decode(&mut conn.buf) {
                            Ok(Some(Chunk::End)) => this.finish(),
                            Ok(Some(Chunk::Data(next))) => this.pending = Some(Frame::data(next)),
                            Ok(Some(Chunk::Trailers(t))) => {
                                this.pending = Some(Frame::trailers(t));
                                this.finish();
                            }
                            // An error shows again on the next poll.
                            Ok(None) | Err(_) => {}
                        }
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Ok(Some(Chunk::Trailers(t))) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Some(Chunk::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
                BodyState::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let conn = this.conn.as_mut().expect("checked above");
            let filled = match conn.poll_fill(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    let limit = this.shared.limits.upstream_body_idle_timeout;
                    let idle = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                    ready!(idle.as_mut().poll(cx));
                    return this.fail(
                        "upstream_body_timeout",
                        format!(
                            "the upstream sent nothing within the response body for {} s",
                            limit.as_secs_f64()
                        )
                        .into(),
                    );
                }
            };
            if let (Some(idle), Ok(n)) = (this.idle.as_mut(), &filled) {
                if *n > 0 {
                    let limit = this.shared.limits.upstream_body_idle_timeout;
                    idle.as_mut().reset(tokio::time::Instant::now() + limit);
                }
            }
            match filled {
                Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(
                        "upstream_reset",
                        "the upstream closed the connection within the response body".into(),
                    )
                }
                Ok(_) => {}
                Err(e) => return this.fail("upstream_reset", e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) if self.pending.is_none() => SizeHint::with_exact(n),
            BodyState::Done if self.pending.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
