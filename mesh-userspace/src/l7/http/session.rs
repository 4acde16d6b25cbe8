//! The app's side of an HTTP connection: the byte-counting socket ([`Counted`]), requests in
//! flight for the idle timeout ([`Inflight`]), the request-head clock and its 408
//! ([`HeadClock`]), and the connection drivers ([`serve_with`]): HTTP/2, and HTTP/1.1 with its
//! hyper sessions parked while the connection is idle.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{body::Incoming, server::conn as hs, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use super::{
    forward::handle,
    late_frames::{frame_clock, frame_expired, FrameStart, LateFramesIo},
    ConnCtx, ConnState, HttpVersion, RespBody, HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT,
    HTTP2_MAX_CONCURRENT_STREAMS, MAX_HTTP2_HEADER_LIST_BYTES,
};

/// The app's socket, counting bytes into the connection's and the pod's counters.
struct Counted {
    inner: TcpStream,
    st: Arc<ConnState>,
    /// Bytes read but not parsed: by a parked HTTP/1.1 session, or by a previous generation
    /// before it handed the connection over (upgrade). Replayed first, not counted again.
    prefix: Bytes,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let st = &*self.st;
            st.ctx.entry.bytes_to_upstream.fetch_add(n, Relaxed);
            st.ctx.pod.stats.bytes_upstream.fetch_add(n, Relaxed);
            st.on_read(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl Counted {
    fn count_written(&self, n: usize) {
        let ctx = &self.st.ctx;
        ctx.entry.bytes_to_client.fetch_add(n as u64, Relaxed);
        ctx.pod.stats.bytes_downstream.fetch_add(n as u64, Relaxed);
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.st.keep_open.load(Relaxed) {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if self.st.head.parking.load(Relaxed) {
            // hyper ends its session on an idle connection we park: the socket stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests in flight on one app connection (until the response body ends), for the idle
/// timeout.
pub(super) struct Inflight {
    count: AtomicUsize,
    last_change: Mutex<Instant>,
    /// While this generation drains: a response's head is written and its body holds back
    /// ([`HeadOut`]), so hyper reads no further head until it goes on. Stopping the session
    /// now loses nothing and adds no `Connection: close` to a head.
    head_out: AtomicBool,
}

/// A request in flight on its connection, until dropped.
pub(super) struct InflightGuard(Arc<ConnState>);

impl Inflight {
    fn new() -> Self {
        Self {
            count: AtomicUsize::new(0),
            last_change: Mutex::new(Instant::now()),
            head_out: AtomicBool::new(false),
        }
    }

    /// Resolves (when polled) while a response head is out and its body holds back, taking
    /// the signal (the body goes on). [`HeadOut`] wakes the task when it starts holding back.
    async fn head_out(&self) {
        std::future::poll_fn(|_| {
            if self.head_out.swap(false, Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once nothing has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = *self.last_change.lock().expect("inflight lock");
            if self.count.load(Relaxed) == 0 && last.elapsed() >= idle {
                return;
            }
            let wake = if self.count.load(Relaxed) == 0 {
                last + idle
            } else {
                Instant::now() + idle
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl ConnState {
    fn new(ctx: ConnCtx, version: HttpVersion) -> Arc<Self> {
        let st = Arc::new(Self {
            ctx,
            version,
            inflight: Inflight::new(),
            head: HeadClock::new(),
            keep_open: AtomicBool::new(false),
            last_pool: Default::default(),
        });
        if version == HttpVersion::Http2 {
            st.head.start();
        }
        st
    }

    /// A request of this connection is in flight until the guard is dropped.
    pub(super) fn in_flight(self: &Arc<Self>) -> InflightGuard {
        self.inflight.count.fetch_add(1, Relaxed);
        *self.inflight.last_change.lock().expect("inflight lock") = Instant::now();
        InflightGuard(self.clone())
    }

    /// `n` bytes were read from the app: the request-head clock starts (HTTP/1.1, nothing in
    /// flight) or counts them towards the preface (HTTP/2).
    fn on_read(&self, n: u64) {
        let head = &self.head;
        match self.version {
            HttpVersion::Http1 => {
                if !head.running.load(Relaxed) && self.inflight.count.load(Relaxed) == 0 {
                    head.start();
                }
            }
            HttpVersion::Http2 => {
                if head.running.load(Relaxed)
                    && head.read.fetch_add(n as usize, Relaxed) + n as usize >= HTTP2_PREFACE_LEN
                {
                    head.stop();
                }
            }
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let inflight = &self.0.inflight;
        *inflight.last_change.lock().expect("inflight lock") = Instant::now();
        inflight.count.fetch_sub(1, Relaxed);
    }
}

/// An HTTP/1.1 response body that, while this generation drains for an upgrade with a
/// successor to hand connections to, holds back before its first frame and says so in
/// [`Inflight::head_out`]: hyper has written the head and reads no further head until this body
/// ends, so `h1_session` can stop the session at this request boundary. It holds until
/// `h1_session` took the signal (it clears the flag), at most [`HEAD_OUT_HOLD`]. (Holding for
/// one poll was not enough: with pipelined requests in its buffer hyper polls the body again
/// within the same poll of the connection.)
pub(super) struct HeadOut {
    inner: RespBody,
    st: Arc<ConnState>,
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl HeadOut {
    pub(super) fn new(inner: RespBody, st: Arc<ConnState>) -> HeadOut {
        HeadOut {
            inner,
            st,
            hold: None,
            done: false,
        }
    }
}

/// The longest a response body holds back for the upgrade's hand-over signal.
const HEAD_OUT_HOLD: Duration = Duration::from_millis(5);

impl hyper::body::Body for HeadOut {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, super::BoxError>>> {
        let this = &mut *self;
        if !this.done && crate::upgrade::is_draining() && crate::upgrade::can_hand_over() {
            this.done = true;
            this.st.inflight.head_out.store(true, Relaxed);
            this.hold = Some(Box::pin(tokio::time::sleep(HEAD_OUT_HOLD)));
            debug!("upgrade: a response head is out; its body holds back");
            // The session's select runs its other branches now (the hold's timer is the
            // bound).
            cx.waker().wake_by_ref();
        }
        this.done = true;
        if let Some(hold) = this.hold.as_mut() {
            if this.st.inflight.head_out.load(Relaxed)
                && std::future::Future::poll(hold.as_mut(), cx).is_pending()
            {
                return Poll::Pending;
            }
            this.hold = None;
            this.st.inflight.head_out.store(false, Relaxed);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for HeadOut {
    fn drop(&mut self) {
        if self.hold.is_some() {
            self.st.inflight.head_out.store(false, Relaxed);
        }
    }
}

/// The request-head clock of one app connection (`[limits] request_head_timeout_ms`, the
/// slowloris defence). HTTP/1.1: started by the first byte read while no request is in
/// flight, stopped when a head is parsed (the handler runs). HTTP/2: started at accept,
/// stopped once the 24-byte preface is in. hyper's own header timer is not used: it also runs
/// while a keep-alive connection waits for its next request, so it closed every idle
/// keep-alive connection after the timeout.
pub(super) struct HeadClock {
    running: AtomicBool,
    started: Mutex<Option<Instant>>,
    /// Bytes read so far (HTTP/2, until the preface is in).
    read: AtomicUsize,
    notify: tokio::sync::Notify,
    /// An idle HTTP/1.1 session is being ended to park the connection ([`H1_PARK_AFTER`]).
    parking: AtomicBool,
    /// Requests whose head was parsed on this connection.
    served: AtomicUsize,
}

/// The HTTP/2 connection preface (`PRI * HTTP/2.0...`).
const HTTP2_PREFACE_LEN: usize = 24;

impl HeadClock {
    fn new() -> Self {
        Self {
            running: AtomicBool::new(false),
            started: Mutex::new(None),
            read: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
            parking: AtomicBool::new(false),
            served: AtomicUsize::new(0),
        }
    }

    fn start(&self) {
        let mut s = self.started.lock().expect("head clock lock");
        if s.is_none() {
            *s = Some(Instant::now());
            self.running.store(true, Relaxed);
            self.notify.notify_one();
        }
    }

    fn running(&self) -> bool {
        self.running.load(Relaxed)
    }

    /// A request head was parsed: the clock stops.
    pub(super) fn request_started(&self) {
        self.served.fetch_add(1, Relaxed);
        self.stop();
    }

    fn stop(&self) {
        if self.running.swap(false, Relaxed) {
            *self.started.lock().expect("head clock lock") = None;
        }
    }

    /// Resolves once a head (or the preface) has been on its way for `timeout`.
    async fn expired(&self, timeout: Duration) {
        loop {
            let started = *self.started.lock().expect("head clock lock");
            match started {
                None => self.notify.notified().await,
                Some(t) => {
                    tokio::time::sleep_until(t + timeout).await;
                    if *self.started.lock().expect("head clock lock") == Some(t) {
                        return;
                    }
                }
            }
        }
    }
}

/// Answer 408 on the app's socket `fd` (HTTP/1.1, no request in flight, so nothing else is
/// being written), just before the connection is dropped.
fn answer_408(fd: std::os::fd::RawFd) {
    const R: &[u8] =
        b"HTTP/1.1 408 Request Timeout\r\nserver: sockmesh\r\nsockmesh-error: header_timeout\r\n\
connection: close\r\ncontent-length: 0\r\n\r\n";
    // SAFETY: `fd` is the app's socket, still open (its owner is dropped only after this);
    // a non-blocking send of a few bytes.
    unsafe {
        libc::send(
            fd,
            R.as_ptr().cast(),
            R.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// Serve one app connection: its [`ConnState`] and its driver, boxed. An HTTP/1.1 driver
/// ([`serve_h1`]) holds only the socket and the state while parked; HTTP/2's is apart.
pub(super) fn serve_with(
    client: TcpStream,
    prefix: Bytes,
    version: HttpVersion,
    ctx: ConnCtx,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let st = ConnState::new(ctx, version);
    let io = Counted {
        inner: client,
        st,
        prefix,
    };
    match version {
        HttpVersion::Http1 => Box::pin(serve_h1(TokioIo::new(io))),
        HttpVersion::Http2 => Box::pin(serve_h2(io)),
    }
}

/// One request of the connection `st`, for hyper.
async fn respond(req: Request<Incoming>, st: Arc<ConnState>) -> Result<Response<RespBody>, Infallible> {
    let version = st.version;
    let mut resp = handle(req, st).await;
    // A draining generation (upgrade) that cannot hand the connection over: the client's next
    // request goes to the successor on a new connection.
    crate::upgrade::close_after_response(
        version == HttpVersion::Http1 && !crate::upgrade::can_hand_over(),
        &mut resp,
    );
    Ok(resp)
}

/// Count how the connection ended: `Err`, the reason it was cut; `Ok(Err)`, hyper's error.
fn finish(st: &ConnState, result: Result<Result<(), hyper::Error>, &'static str>) {
    let version = st.version;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let reason = conn_error_reason(&e, version);
            debug!(reason, "app connection ended: {e}");
            st.ctx.l7().errors.count(version.label(), reason);
        }
        Err(reason) => {
            debug!(reason, "slow app connection: closed");
            st.ctx.l7().errors.count(version.label(), reason);
        }
    }
}

/// Run an HTTP/2 connection; after the idle timeout ask it to finish gracefully and keep
/// driving it until it does.
async fn serve_h2(counted: Counted) {
    let st = counted.st.clone();
    let ctx = &st.ctx;
    let limits = &ctx.shared.limits;
    // Set just before the session asks hyper to shut down gracefully.
    let goaway = Arc::new(AtomicBool::new(false));
    let mut b = hs::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
    // The app's frames pass LateFramesIo (h2 must not see a WINDOW_UPDATE of a stream it
    // ignored after its final GOAWAY).
    let c = ctx.clone();
    let dropped = Box::new(move || c.l7().errors.count("http2", "window_update_after_goaway"));
    // When the app's frame (or header block) in progress began (see late_frames).
    let frame_start = FrameStart::new();
    let io = TokioIo::new(LateFramesIo::new(
        counted,
        goaway.clone(),
        frame_start.clone(),
        dropped,
    ));
    let svc_st = st.clone();
    let conn = b.serve_connection(io, service_fn(move |req| respond(req, svc_st.clone())));
    tokio::pin!(conn);
    let clock = frame_clock();
    tokio::pin!(clock);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            // The connection first: its reads move `frame_start` (see frame_expired).
            biased;
            r = conn.as_mut() => break Ok(r),
            // Also while closing: a trickled frame holds the connection just the same.
            _ = frame_expired(&frame_start, clock.as_mut(), limits.request_head_timeout) => {
                break Err("frame_timeout");
            }
            _ = st.inflight.idle_for(limits.client_idle_timeout), if !closing => {
                debug!("idle app connection: closing");
                ctx.l7().errors.count("http2", "idle_timeout");
                goaway.store(true, Relaxed);
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = st.head.expired(limits.request_head_timeout), if !closing => {
                break Err("preface_timeout");
            }
            _ = crate::upgrade::drain_close(true), if !closing => {
                debug!("upgrade: draining app connection");
                goaway.store(true, Relaxed);
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    finish(&st, result);
}

/// An idle HTTP/1.1 keep-alive connection gives back hyper's session (its 8 KiB read and write
/// buffers, the cached header map, the boxed request handler) after this long without a
/// request and with no head on its way; the next request's first byte starts a new session on
/// the same socket. A new connection gets its first session with its first byte.
pub const H1_PARK_AFTER: Duration = Duration::from_secs(1);

/// Drive an HTTP/1.1 app connection: hyper sessions on the socket, parked while idle (see
/// [`H1_PARK_AFTER`]), with the idle and head time-outs. While parked (also before the first
/// request) the connection holds only `io` (the socket and its [`ConnState`]) and the three
/// futures it waits on: a session and everything it needs are made with the next byte.
///
/// (A function returning a block rather than an `async fn`: the block keeps `io` where it was
/// captured, an `async fn` would keep a second copy of its argument.)
#[allow(clippy::manual_async_fn)]
fn serve_h1(mut io: TokioIo<Counted>) -> impl Future<Output = ()> + Send {
    async move {
        let st = io.inner().st.clone();
        let limits = &st.ctx.shared.limits;
        let result = loop {
            if io.inner().prefix.is_empty() {
                tokio::select! {
                    // Readiness through the socket's own reader slot (no waiter of its own to
                    // keep: nothing else reads while parked).
                    r = std::future::poll_fn(|cx| io.inner().inner.poll_read_ready(cx)) => {
                        if r.is_err() {
                            break Some(Ok(()));
                        }
                    }
                    _ = st.inflight.idle_for(limits.client_idle_timeout) => {
                        debug!("idle app connection: closing");
                        st.ctx.l7().errors.count("http1", "idle_timeout");
                        break Some(Ok(()));
                    }
                    // An upgrade drains this generation: a parked connection is between requests.
                    hand = crate::upgrade::drain_http1(std::future::ready(())) => {
                        debug!(hand, "upgrade: draining a parked app connection");
                        if hand {
                            let counted = io.into_inner();
                            let read = counted.prefix.to_vec();
                            crate::upgrade::hand_over_http1(counted.inner, read, &st.ctx);
                        }
                        break Some(Ok(()));
                    }
                }
            }
            // Boxed: a parked connection keeps no room for hyper's session state.
            match Box::pin(h1_session(io)).await {
                H1Session::Done(r) => break r,
                H1Session::Parked(i) => {
                    io = i;
                    st.ctx.shared.memory.freed();
                }
            }
        };
        finish(&st, result.ok_or("header_timeout"));
    }
}

/// How one hyper session on an HTTP/1.1 app connection ended.
enum H1Session {
    /// The connection is done; `None`: a head took too long (408 sent).
    Done(Option<Result<(), hyper::Error>>),
    /// Idle: hyper's state is dropped, the socket (with any unparsed bytes) is back.
    Parked(TokioIo<Counted>),
}

/// One hyper session: until the connection ends, or is idle long enough to park.
async fn h1_session(io: TokioIo<Counted>) -> H1Session {
    let st = io.inner().st.clone();
    let (inflight, head) = (&st.inflight, &st.head);
    let limits = &st.ctx.shared.limits;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&io.inner().inner);
    let mut b = hs::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_request_head_bytes)
        .keep_alive(true);
    head.parking.store(false, Relaxed);
    let svc_st = st.clone();
    let svc = service_fn(move |req| respond(req, svc_st.clone()));
    let mut conn = b.serve_connection(io, svc).with_upgrades();
    let (mut closing, mut parking, mut handing) = (false, false, false);
    let park = parkable(inflight, head, head.served.load(Relaxed));
    tokio::pin!(park);
    let r = loop {
        tokio::select! {
            r = &mut conn => break r,
            _ = inflight.idle_for(limits.client_idle_timeout), if !closing => {
                debug!("idle app connection: closing");
                st.ctx.l7().errors.count("http1", "idle_timeout");
                Pin::new(&mut conn).graceful_shutdown();
                closing = true;
            }
            _ = &mut park, if !closing => {
                head.parking.store(true, Relaxed);
                Pin::new(&mut conn).graceful_shutdown();
                (closing, parking) = (true, true);
            }
            _ = head.expired(limits.request_head_timeout), if !closing => {
                answer_408(fd);
                return H1Session::Done(None);
            }
            // While an upgrade drains this generation: stop at a request boundary and hand the
            // socket (with any bytes already read) to the successor instead of closing it.
            // The boundary is 2 ms with nothing in flight, or (a pipelining client never
            // leaves that gap) a response whose head is written and whose body holds back
            // one poll: hyper then finishes that response (its head already out, so without
            // the `Connection: close` it would add to a head written after the stop) and reads
            // no further head; the pipelined requests stay in its read buffer and move.
            hand = crate::upgrade::drain_http1(async {
                tokio::select! {
                    _ = inflight.idle_for(Duration::from_millis(2)) => {}
                    _ = inflight.head_out() => {}
                }
            }), if !closing => {
                debug!(hand, "upgrade: draining app connection");
                closing = true;
                if hand {
                    st.keep_open.store(true, Relaxed);
                    handing = true;
                }
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if handing && r.is_ok() {
        if let Some(parts) = conn.into_parts() {
            let counted = parts.io.into_inner();
            let mut read = parts.read_buf.to_vec();
            read.extend_from_slice(&counted.prefix);
            crate::upgrade::hand_over_http1(counted.inner, read, &st.ctx);
            return H1Session::Done(Some(Ok(())));
        }
        return H1Session::Done(Some(r));
    }
    if !parking || r.is_err() {
        return H1Session::Done(Some(r));
    }
    // Upgraded (the socket went with the upgrade): done.
    let Some(parts) = conn.into_parts() else {
        return H1Session::Done(Some(r));
    };
    let mut io = parts.io;
    if !parts.read_buf.is_empty() {
        io.inner_mut().prefix = parts.read_buf;
    }
    H1Session::Parked(io)
}

/// Resolves when an HTTP/1.1 session can be parked: it served a request (so hyper is between
/// requests: ending it loses nothing), nothing has been in flight for [`H1_PARK_AFTER`] and no
/// head is on its way.
async fn parkable(inflight: &Inflight, head: &HeadClock, served_at_start: usize) {
    loop {
        inflight.idle_for(H1_PARK_AFTER).await;
        if head.served.load(Relaxed) > served_at_start && !head.running() {
            return;
        }
        tokio::time::sleep(H1_PARK_AFTER).await;
    }
}

/// The counted reason of a connection-level hyper error on the app's side.
fn conn_error_reason(e: &hyper::Error, version: HttpVersion) -> &'static str {
    if e.is_parse_too_large() {
        "header_too_large"
    } else if e.is_parse() {
        "malformed"
    } else if e.is_timeout() {
        match version {
            HttpVersion::Http1 => "header_timeout",
            HttpVersion::Http2 => "keepalive_timeout",
        }
    } else if e.is_incomplete_message() {
        "incomplete"
    } else if std::error::Error::source(e).is_some_and(|s| s.is::<io::Error>()) {
        "io"
    } else {
        "connection_error"
    }
}
