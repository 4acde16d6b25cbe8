//! The app's HTTP/2 frames on their way to h2, parsed for their 9-byte headers: the frame clock
//! (slow frames after the preface, below), and, while the proxy closes the connection gracefully
//! (upgrade drain, idle timeout), [`LateFrames`] drops the one kind of frame h2 0.4 turns into a
//! connection error after its final GOAWAY.
//!
//! h2's graceful shutdown sends GOAWAY(2^31-1) and a PING; when the PING's ACK comes back it
//! sends GOAWAY(last processed stream) and from then on ignores HEADERS, DATA and RST_STREAM
//! of higher streams (`Streams::recv_headers`, `recv_data`, `recv_reset` compare with
//! `max_stream_id`). A WINDOW_UPDATE of such a stream is not compared: `recv_window_update`
//! finds no stream, `ensure_not_idle` sees an id at or above `next_stream_id` (ignored
//! HEADERS do not advance it) and h2 ends the connection with GOAWAY(PROTOCOL_ERROR). Every
//! request still in flight on it is lost.
//!
//! gRPC clients (grpc-core, seen with grpcio 1.85) send HEADERS, a 5-byte stream
//! WINDOW_UPDATE, then DATA for every call, and can write a call's HEADERS after the PING ACK
//! (a stream started before they read the first GOAWAY). The RFC lets the GOAWAY's sender
//! discard frames of streams above its last stream id (RFC 9113 section 6.8), which is what
//! this filter does for WINDOW_UPDATE: after the shutdown PING ACK, a stream WINDOW_UPDATE of
//! a stream above the highest one opened before it is dropped (and counted). The client
//! learns from the final GOAWAY that such a stream was not processed and retries it.
//!
//! The same parse keeps the frame clock of the connection (the slowloris defence after the
//! preface; h2 has none, and its keep-alive PING is answered by a trickling client too): a
//! frame, or a header block (HEADERS or PUSH_PROMISE without END_HEADERS and its CONTINUATION
//! frames), is *in progress* from the read that brought its first byte until its last byte is
//! read. [`FrameStart`] holds when the one in progress began; the session closes the connection
//! once that is `request_head_timeout` ago (`frame_timeout`). Complete frames never count, so a
//! large upload in many frames is not limited, only one frame (at most 16 KiB, h2's default
//! `SETTINGS_MAX_FRAME_SIZE`) or one header block taking that long.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tracing::debug;

/// The HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;
/// A frame header.
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The payload of h2's graceful-shutdown PING (h2 0.4 `frame::ping::SHUTDOWN_PAYLOAD`).
pub(super) const H2_SHUTDOWN_PING: [u8; 8] = [0x0b, 0x7b, 0xa2, 0xf0, 0x8b, 0x9b, 0xfe, 0x54];

/// Follows the frames the app sends on one HTTP/2 connection (the bytes h2 will read, in
/// order) and drops stream WINDOW_UPDATEs h2 would answer with GOAWAY(PROTOCOL_ERROR) (see the
/// module docs). Frames are only parsed for their 9-byte header (and a PING ACK's payload).
#[derive(Debug)]
pub(super) struct LateFrames {
    /// Preface bytes still to pass.
    preface_left: usize,
    /// The start of a frame header that ended a read (passed on with the rest of it).
    carry: [u8; HEADER_LEN],
    carry_len: usize,
    /// Payload bytes of the current frame still to pass (or drop).
    payload_left: usize,
    dropping: bool,
    /// The current frame is a PING ACK: its payload so far.
    ping: Option<([u8; 8], usize)>,
    /// The highest stream a HEADERS frame opened before the shutdown PING ACK.
    max_opened: u32,
    /// The proxy asked h2 to shut down gracefully (only then is a shutdown PING ACK h2's).
    armed: bool,
    /// h2 has its final GOAWAY out: it ignores streams above `max_opened`.
    acked: bool,
    /// WINDOW_UPDATE frames dropped.
    pub(super) dropped: u64,
    /// A header block is open: its HEADERS or PUSH_PROMISE had no END_HEADERS, the
    /// CONTINUATION with it has not come yet.
    in_block: bool,
    /// A frame (or header block) ended since [`LateFrames::take_ended`] was last called.
    ended: bool,
}

impl LateFrames {
    pub(super) fn new() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            carry: [0; HEADER_LEN],
            carry_len: 0,
            payload_left: 0,
            dropping: false,
            ping: None,
            max_opened: 0,
            armed: false,
            acked: false,
            dropped: 0,
            in_block: false,
            ended: false,
        }
    }

    /// A frame or header block is in progress: part of it was read, not all (the preface does
    /// not count; the session's head clock has it).
    pub(super) fn in_progress(&self) -> bool {
        self.carry_len > 0 || self.payload_left > 0 || self.in_block
    }

    /// Whether a frame (outside a header block) or a header block ended since the last call:
    /// then what is in progress now began in the latest read.
    pub(super) fn take_ended(&mut self) -> bool {
        std::mem::take(&mut self.ended)
    }

    /// The proxy is about to ask h2 for a graceful shutdown.
    pub(super) fn arm(&mut self) {
        self.armed = true;
    }

    /// Bytes of a frame header held back from the previous read (to go in front of the next).
    pub(super) fn take_carry(&mut self) -> Option<Vec<u8>> {
        if self.carry_len == 0 {
            return None;
        }
        let v = self.carry[..self.carry_len].to_vec();
        self.carry_len = 0;
        Some(v)
    }

    /// Filter `data` (the next bytes from the app, after any [`LateFrames::take_carry`]) in
    /// place: returns how many bytes at its start are to be passed on. A frame header cut by the
    /// end of `data` is held back until the next call.
    pub(super) fn filter(&mut self, data: &mut [u8]) -> usize {
        debug_assert_eq!(self.carry_len, 0, "take_carry first");
        let (mut r, mut w) = (0, 0);
        while r < data.len() {
            let left = data.len() - r;
            if self.preface_left > 0 {
                let n = self.preface_left.min(left);
                data.copy_within(r..r + n, w);
                (r, w) = (r + n, w + n);
                self.preface_left -= n;
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(left);
                if let Some((p, got)) = self.ping.as_mut() {
                    let k = n.min(p.len() - *got);
                    p[*got..*got + k].copy_from_slice(&data[r..r + k]);
                    *got += k;
                }
                if !self.dropping {
                    data.copy_within(r..r + n, w);
                    w += n;
                }
                r += n;
                self.payload_left -= n;
                if self.payload_left == 0 {
                    self.end_frame();
                }
                continue;
            }
            if left < HEADER_LEN {
                self.carry[..left].copy_from_slice(&data[r..]);
                self.carry_len = left;
                break;
            }
            let h = &data[r..r + HEADER_LEN];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let (kind, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let drop = kind == WINDOW_UPDATE && id != 0 && self.acked && id > self.max_opened;
            if kind == HEADERS && !self.acked {
                self.max_opened = self.max_opened.max(id);
            }
            self.ping = (kind == PING && flags & ACK != 0 && len == 8).then_some(([0; 8], 0));
            match kind {
                HEADERS | PUSH_PROMISE => self.in_block = flags & END_HEADERS == 0,
                CONTINUATION if flags & END_HEADERS != 0 => self.in_block = false,
                _ => {}
            }
            if drop {
                self.dropped += 1;
            } else {
                data.copy_within(r..r + HEADER_LEN, w);
                w += HEADER_LEN;
            }
            r += HEADER_LEN;
            (self.payload_left, self.dropping) = (len, drop);
            if len == 0 {
                self.end_frame();
            }
        }
        w
    }

    fn end_frame(&mut self) {
        if let Some((p, 8)) = self.ping.take() {
            if self.armed && p == H2_SHUTDOWN_PING {
                self.acked = true;
            }
        }
        self.dropping = false;
        if !self.in_block {
            self.ended = true;
        }
    }
}

/// When the app's frame or header block in progress began (see the module docs): set by
/// [`LateFramesIo`] on the read path, watched by [`frame_expired`] in the session's loop.
#[derive(Debug)]
pub(super) struct FrameStart {
    base: Instant,
    /// Nanoseconds after `base`; [`FrameStart::NONE`]: nothing in progress.
    at: AtomicU64,
}

impl FrameStart {
    const NONE: u64 = u64::MAX;

    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            at: AtomicU64::new(Self::NONE),
        })
    }

    fn set(&self, t: Option<Instant>) {
        let at = t.map_or(Self::NONE, |t| {
            t.saturating_duration_since(self.base)
                .as_nanos()
                .min(u128::from(Self::NONE - 1)) as u64
        });
        self.at.store(at, Relaxed);
    }

    pub(super) fn get(&self) -> Option<Instant> {
        match self.at.load(Relaxed) {
            Self::NONE => None,
            n => Some(self.base + Duration::from_nanos(n)),
        }
    }
}

/// Where the frame clock waits while no frame is in progress.
const NO_FRAME: Duration = Duration::from_secs(24 * 3600);

/// The frame clock of one connection: resolves once the frame or header block in progress
/// (`start`) began `timeout` ago. `clock` is the connection's one timer; it is only brought
/// forward here and a later start is taken when it fires, so a busy connection whose frames
/// cross reads pays no timer update per read. Poll it after the connection in the same task
/// (a `biased` select): the reads that move `start` wake that task, not this future.
pub(super) async fn frame_expired(start: &FrameStart, mut clock: Pin<&mut Sleep>, timeout: Duration) {
    std::future::poll_fn(|cx| loop {
        let due = start.get().map(|t| t + timeout);
        if let Some(d) = due {
            if d < clock.deadline() {
                clock.as_mut().reset(d);
            }
        }
        ready!(clock.as_mut().poll(cx));
        match due {
            Some(d) if Instant::now() >= d => return Poll::Ready(()),
            Some(d) => clock.as_mut().reset(d),
            None => clock.as_mut().reset(Instant::now() + NO_FRAME),
        }
    })
    .await
}

/// A timer for [`frame_expired`] (nothing in progress yet).
pub(super) fn frame_clock() -> Sleep {
    tokio::time::sleep(NO_FRAME)
}

/// The app's side of an HTTP/2 connection for hyper: reads pass [`LateFrames`] (each dropped
/// frame calls `on_drop`) and move [`FrameStart`], writes go straight through.
pub(super) struct LateFramesIo<T> {
    inner: T,
    frames: LateFrames,
    /// When the frame or header block in progress began (shared with the session).
    start: Arc<FrameStart>,
    /// `start` is set.
    started: bool,
    /// Set by the session just before it asks hyper for a graceful shutdown.
    goaway: Arc<AtomicBool>,
    /// Filtered bytes that did not fit the caller's buffer.
    out: Vec<u8>,
    /// Counts dropped frames.
    on_drop: Box<dyn Fn() + Send>,
}

impl<T> LateFramesIo<T> {
    pub(super) fn new(
        inner: T,
        goaway: Arc<AtomicBool>,
        start: Arc<FrameStart>,
        on_drop: Box<dyn Fn() + Send>,
    ) -> Self {
        Self {
            inner,
            frames: LateFrames::new(),
            start,
            started: false,
            goaway,
            out: Vec::new(),
            on_drop,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LateFramesIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let f = &mut this.frames;
            if this.goaway.load(Relaxed) {
                f.arm();
            }
            let dropped = f.dropped;
            let carry = f.take_carry();
            if buf.filled().len() == before {
                // End of stream: a cut frame header goes to h2 as it is.
                match carry {
                    Some(c) => {
                        this.out = c;
                        continue;
                    }
                    None => return Poll::Ready(Ok(())),
                }
            }
            match carry {
                None => {
                    let kept = f.filter(&mut buf.filled_mut()[before..]);
                    buf.set_filled(before + kept);
                }
                Some(mut v) => {
                    v.extend_from_slice(&buf.filled()[before..]);
                    let kept = f.filter(&mut v);
                    v.truncate(kept);
                    buf.set_filled(before);
                    let fit = v.len().min(buf.remaining());
                    buf.put_slice(&v[..fit]);
                    v.drain(..fit);
                    this.out = v;
                }
            }
            // The frame clock: what is in progress after this read began in it if something
            // ended in it (or nothing was in progress before).
            let ended = f.take_ended();
            if f.in_progress() {
                if ended || !this.started {
                    this.start.set(Some(Instant::now()));
                    this.started = true;
                }
            } else if this.started {
                this.start.set(None);
                this.started = false;
            }
            if f.dropped > dropped {
                debug!("HTTP/2 app connection: a WINDOW_UPDATE of a stream opened after the final GOAWAY dropped");
                for _ in dropped..f.dropped {
                    (this.on_drop)();
                }
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // All of it held back or dropped: read on (a pending socket wakes this task).
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LateFramesIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        v.extend([kind, flags]);
        v.extend(id.to_be_bytes());
        v.extend(payload);
        v
    }

    fn window_update(id: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, id, &5u32.to_be_bytes())
    }

    /// The app's bytes around the final GOAWAY: stream 1 opened before the shutdown PING ACK,
    /// stream 3 after it (h2 ignores its HEADERS).
    fn racing_client() -> (Vec<u8>, Vec<u8>) {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let before = [
            preface,
            frame(0x4, 0, 0, &[]),
            frame(HEADERS, 0x4, 1, &[0x82, 0x86, 0x84]),
            window_update(1),
            frame(0x0, 0x1, 1, b"hello"),
            frame(PING, ACK, 0, &H2_SHUTDOWN_PING),
            frame(HEADERS, 0x4, 3, &[0x82, 0x86, 0x84]),
        ]
        .concat();
        let kept_after = [window_update(1), frame(0x0, 0x1, 3, b"hello"), window_update(0)].concat();
        (before, kept_after)
    }

    fn run(f: &mut LateFrames, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            let mut v = f.take_carry().unwrap_or_default();
            v.extend_from_slice(c);
            let n = f.filter(&mut v);
            out.extend_from_slice(&v[..n]);
        }
        out
    }

    #[test]
    fn a_window_update_of_a_stream_opened_after_the_final_goaway_is_dropped_in_any_cut() {
        let (before, kept_after) = racing_client();
        // WINDOW_UPDATE of stream 3 (ignored by h2), then frames that must pass.
        let input = [before.clone(), window_update(3), kept_after.clone()].concat();
        let want = [before, kept_after].concat();
        for chunk in 1..=input.len() {
            let mut f = LateFrames::new();
            f.arm();
            assert_eq!(run(&mut f, &input, chunk), want, "reads of {chunk} bytes");
            assert_eq!(f.dropped, 1);
        }
    }

    /// The frame clock's view in every cut of the input: after each read, whether a frame or
    /// header block is in progress, and whether one ended in that read.
    #[test]
    fn frames_and_header_blocks_are_in_progress_until_their_last_byte_in_any_cut() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // (bytes, ends a unit): a frame outside a header block ends one; HEADERS or
        // PUSH_PROMISE without END_HEADERS and the CONTINUATIONs before the last do not.
        let units: Vec<(Vec<u8>, bool)> = vec![
            (frame(0x4, 0, 0, &[]), true),
            (frame(HEADERS, END_HEADERS, 1, &[0x82, 0x86, 0x84]), true),
            (frame(0x0, 0, 1, &[9; 40]), true),
            (frame(HEADERS, 0x1, 3, &[0x82]), false),
            (frame(CONTINUATION, 0, 3, &[0x86]), false),
            (frame(CONTINUATION, END_HEADERS, 3, &[0x84]), true),
            (frame(PUSH_PROMISE, 0, 3, &[0, 0, 0, 2, 0x82]), false),
            (frame(CONTINUATION, END_HEADERS, 3, &[]), true),
            (window_update(0), true),
        ];
        let mut input = preface.clone();
        // Offsets where nothing is in progress.
        let mut bounds = vec![];
        for (bytes, ends) in &units {
            input.extend(bytes);
            if *ends {
                bounds.push(input.len());
            }
        }
        for chunk in 1..=input.len() {
            let mut f = LateFrames::new();
            let mut at = 0;
            for c in input.chunks(chunk) {
                let mut v = f.take_carry().unwrap_or_default();
                v.extend_from_slice(c);
                let n = f.filter(&mut v);
                assert_eq!(n + f.carry_len, v.len(), "nothing dropped");
                let before = at;
                at += c.len();
                let idle = at <= preface.len() || bounds.contains(&at);
                assert_eq!(f.in_progress(), !idle, "reads of {chunk}, at {at}");
                let ended = bounds.iter().any(|b| (before + 1..=at).contains(b));
                assert_eq!(f.take_ended(), ended, "reads of {chunk}, at {at}");
            }
        }
    }

    /// Yields its bytes a few at a time (reads of 1..=7 bytes in turn).
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.1 = self.1 % 7 + 1;
            let n = self.1.min(self.0.len()).min(buf.remaining());
            buf.put_slice(&self.0[..n]);
            self.0.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn through_the_io_with_small_reads_and_small_buffers() {
        use std::sync::atomic::AtomicU64;
        use tokio::io::AsyncReadExt;
        let (before, kept_after) = racing_client();
        let input = [before.clone(), window_update(3), kept_after.clone()].concat();
        let want = [before, kept_after].concat();
        for size in [1, 3, 8, 9, 10, 64] {
            let dropped = Arc::new(AtomicU64::new(0));
            let d = dropped.clone();
            let mut io = LateFramesIo::new(
                Trickle(input.clone(), 0),
                Arc::new(AtomicBool::new(true)),
                FrameStart::new(),
                Box::new(move || {
                    d.fetch_add(1, Relaxed);
                }),
            );
            let (mut got, mut b) = (Vec::new(), vec![0; size]);
            loop {
                let n = io.read(&mut b).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            assert_eq!(got, want, "buffers of {size} bytes");
            assert_eq!(dropped.load(Relaxed), 1);
        }
    }

    #[test]
    fn nothing_is_dropped_unless_the_proxy_asked_for_the_shutdown() {
        let (before, kept_after) = racing_client();
        let input = [before, window_update(3), kept_after].concat();
        let mut f = LateFrames::new();
        assert_eq!(run(&mut f, &input, 7), input);
        assert_eq!(f.dropped, 0);
    }

    #[test]
    fn another_ping_ack_changes_nothing() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let input = [
            preface,
            frame(PING, ACK, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
            frame(HEADERS, 0x4, 1, &[0x82]),
            window_update(1),
            window_update(3),
        ]
        .concat();
        let mut f = LateFrames::new();
        f.arm();
        assert_eq!(run(&mut f, &input, 5), input);
        assert_eq!(f.dropped, 0);
    }
}
