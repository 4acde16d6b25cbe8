//! The upstream side: shared connections to the endpoints ([`UpConn`], its writer and reader
//! tasks, the pending map and its guard), [`Slot`], [`Pool`] and [`MuxPools`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::{mpsc, oneshot},
    task::AbortHandle,
};
use tokio_util::codec::{Decoder, Encoder};
use tracing::debug;

use super::{
    Bolt, CallError, Dubbo, MuxProto, CONNS_PER_ENDPOINT, QUEUE, UPSTREAM_HEARTBEAT, UPSTREAM_IDLE_CLOSE,
    WRITE_BATCH,
};
use crate::{conn::worker::PerWorker, l7::ConnCtx};

struct UpState<F> {
    alive: bool,
    /// Upstream id → where its response goes (`None`: a one-way request not yet queued).
    pending: HashMap<u64, Option<oneshot::Sender<F>>>,
    last_used: Instant,
}

/// One shared upstream connection: a writer task fed by `tx`, a reader task that hands
/// responses to `pending`.
pub(super) struct UpConn<P: MuxProto> {
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
    pub(super) async fn call(
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

pub(super) fn encode_into<P: MuxProto>(codec: &mut P::Codec, frame: P::Frame, buf: &mut BytesMut) {
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
pub(super) struct Slot<P: MuxProto> {
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
pub(super) struct Pool<P: MuxProto> {
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
    pub(super) async fn get(
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

/// Shared upstream connections, per proxy worker and (pod, endpoint, protocol): a request
/// only ever uses the connections of the worker serving its app connection.
#[derive(Default)]
pub struct MuxPools {
    workers: PerWorker<WorkerPools>,
}

/// One worker's upstream connections.
#[derive(Default)]
pub(super) struct WorkerPools {
    pub(super) bolt: Pool<Bolt>,
    pub(super) dubbo: Pool<Dubbo>,
}

impl MuxPools {
    /// Pools for `workers` proxy workers.
    pub fn new(workers: usize) -> Self {
        Self {
            workers: PerWorker::new(workers, |_| WorkerPools::default()),
        }
    }

    /// The pools of the worker running this.
    pub(super) fn here(&self) -> &WorkerPools {
        self.workers.here()
    }

    /// Live upstream connections: (Bolt, Dubbo). Approximate while connects are under way.
    #[allow(dead_code)] // for status and tests
    pub fn live_connections(&self) -> (usize, usize) {
        self.workers
            .all()
            .iter()
            .fold((0, 0), |(b, d), w| (b + w.bolt.live(), d + w.dubbo.live()))
    }
}
