//! The app's connection: [`serve`] / [`serve_with`] (reader, drain and hand-over on upgrade),
//! [`UpgradeDrain`], the writer back to the app, and one [`request`] task per request with
//! [`forward`] trying the decision's endpoints.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
};
use tokio_util::codec::Decoder;
use tracing::debug;

use super::{
    upstream::encode_into, CallError, Fail, MuxDrain, MuxProto, Plan, MAX_CONNECT_TIMEOUT, MAX_IN_FLIGHT,
    QUEUE, WRITE_BATCH,
};
use crate::{
    l7::ConnCtx,
    routing::{colour::ColourId, Decision, Outcome},
};

pub(super) async fn serve<P: MuxProto>(client: TcpStream, ctx: ConnCtx) {
    serve_with::<P, _>(client, BytesMut::new(), 0, ctx, UpgradeDrain).await
}

/// The real one: `sockmesh upgrade` (see [`crate::upgrade`]).
pub(super) struct UpgradeDrain;

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

pub(super) async fn serve_with<P: MuxProto, D: MuxDrain>(
    client: TcpStream,
    prefix: BytesMut,
    offset: u64,
    ctx: ConnCtx,
    drain: D,
) {
    let (mut rd, wr) = client.into_split();
    let (tx, rx) = mpsc::channel::<P::Frame>(QUEUE);
    // When the writer last wrote to the app, in ms since `opened` (for the idle clock).
    let opened = tokio::time::Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let mut writer = tokio::spawn(app_writer::<P>(wr, rx, ctx.clone(), (opened, written.clone())));
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
    // The frame clock: a frame must be complete `request_head_timeout` after the read that
    // brought its first byte (a client trickling a frame holds a connection and its buffer);
    // with no frame started and nothing in flight, the connection is closed after
    // `client_idle_timeout` without a byte (a heartbeat is a frame, so it keeps it open).
    let limits = &ctx.shared.limits;
    let mut frame_started: Option<tokio::time::Instant> = None;
    let mut last_read = tokio::time::Instant::now();
    let clock = tokio::time::sleep_until(last_read + limits.client_idle_timeout);
    tokio::pin!(clock);
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
                frame_started = None;
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
        if buf.is_empty() {
            frame_started = None;
        } else if frame_started.is_none() {
            frame_started = Some(last_read);
        }
        let due = match frame_started {
            Some(t) => t + limits.request_head_timeout,
            None => last_read + limits.client_idle_timeout,
        };
        // Only ever brought forward here; a later deadline is taken when the clock fires.
        if due < clock.deadline() {
            clock.as_mut().reset(due);
        }
        let got = tokio::select! {
            by = &mut draining, if hand_over_by.is_none() => {
                hand_over_by = Some(by);
                break;
            }
            r = rd.read_buf(&mut buf) => r,
            () = &mut clock => {
                let now = tokio::time::Instant::now();
                if frame_started.is_some() {
                    if now >= due {
                        ctx.l7().errors.count(P::NAME, "frame_timeout");
                        debug!(client = %ctx.client, buffered = buf.len(),
                            "{} frame not complete within the request head timeout: closing", P::NAME);
                        break;
                    }
                } else {
                    // A response written to the app counts as activity too.
                    last_read = last_read.max(opened + Duration::from_millis(written.load(Relaxed)));
                    if now >= last_read + limits.client_idle_timeout {
                        if in_flight.available_permits() == MAX_IN_FLIGHT {
                            ctx.l7().errors.count(P::NAME, "idle_timeout");
                            debug!(client = %ctx.client, "idle {} app connection: closing", P::NAME);
                            break;
                        }
                        // Requests in flight: the idle clock starts again.
                        last_read = now;
                    }
                }
                // Not due (bytes came since it was set), or restarted.
                clock.as_mut().reset(match frame_started {
                    Some(t) => t + limits.request_head_timeout,
                    None => last_read + limits.client_idle_timeout,
                });
                continue;
            }
        };
        match got {
            Ok(0) => eof = true,
            Ok(n) => {
                last_read = tokio::time::Instant::now();
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
    (opened, written): (tokio::time::Instant, Arc<AtomicU64>),
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
        written.store(opened.elapsed().as_millis() as u64, Relaxed);
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
