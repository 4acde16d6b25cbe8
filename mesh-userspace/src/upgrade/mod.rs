//! Upgrading the daemon under load (`sockmesh upgrade --binary PATH`).
//!
//! Generation N (the running daemon) listens on a per-generation rendezvous Unix socket
//! (`<state_file stem>.upgrade.<gen>.sock`, mode 0600) whose path it writes into its lock file.
//! Generation N+1 (`sockmesh run ... --upgrade`, started by N so it shares N's cgroup) reads the
//! lock file, connects, and the two speak [`wire`]: a version handshake, then N passes the
//! *same* listening sockets (pods' outbound and inbound listeners, admin, metrics) and its
//! lock file by `SCM_RIGHTS`. N+1 adopts the pinned kernel state as a restart does, says
//! `Ready`, gets `Commit`, starts accepting on the shared sockets and says `Started`; only then
//! does N stop accepting and drain, sending its counters to N+1 until it exits without
//! unpinning anything. While it drains, live app connections move to N+1 with the bytes already
//! read: HTTP/1.1 at a request boundary, Bolt and Dubbo at a frame boundary once their requests
//! in flight are answered, opaque TCP as a pair of sockets after a deadline; HTTP/2 gets GOAWAY.
//! Until `Started`, N has changed nothing: a successor that fails at any step leaves N serving
//! and its rendezvous in place for the next try.
//!
//! See docs/upgrade.md for what moves, what drains and the failure cases.

pub mod counters;
pub mod new;
pub mod old;
pub mod takeover;
pub mod tcp;
pub mod wire;

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{
            AtomicBool, AtomicU64, AtomicU8,
            Ordering::{Relaxed, SeqCst},
        },
        Mutex, OnceLock,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::json;

/// An HTTP/1.1 app connection of a draining generation that sends no request for this long is
/// closed (gracefully, when idle). Connections that do send one get `Connection: close` on its
/// response and are closed by the client's own reconnect.
pub const HTTP1_DRAIN_IDLE_CLOSE: Duration = Duration::from_secs(1);

/// After a hand-off the old generation stays at least this long (bounded by its drain
/// deadline), even with every connection moved: if the successor dies meanwhile, it takes the
/// hand-off back and serves again (a successor that dies later is a daemon crash).
pub const STANDBY_AFTER_HANDOFF: Duration = Duration::from_secs(2);

/// This process's generation (1 for a daemon started from nothing).
static GENERATION: AtomicU64 = AtomicU64::new(1);
/// Set once this generation handed over to its successor and drains.
static DRAINING: OnceLock<tokio::sync::watch::Sender<bool>> = OnceLock::new();
/// False once the admin socket path belongs to the successor (or, in a successor, until it
/// took over): only then may this process remove it at exit.
static OWNS_ADMIN: AtomicBool = AtomicBool::new(true);
/// Listening sockets received from the previous generation, not yet adopted by a pod: pod,
/// address, member of the address's group (see [`crate::proxy::ListenerGroup`]), socket.
static INHERITED: Mutex<Vec<(String, SocketAddr, u32, OwnedFd)>> = Mutex::new(Vec::new());
static STATUS: Mutex<Status> = Mutex::new(Status::new());

/// What `sockmesh status` shows about upgrades.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `idle`, `offered`, `ready`, `committed`, `draining` (N after the hand-off),
    /// `taking_over` (N+1 before `Started`).
    pub phase: &'static str,
    /// The other generation's pid while an upgrade is in progress.
    pub peer_pid: Option<u32>,
    pub attempts: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Of `failed`: refused at the handshake (protocol version, busy).
    pub refused: u64,
    pub last_error: Option<String>,
    /// Live connections handed over: sent (N) or taken (N+1), over this process's life.
    pub moved: u64,
    /// Of those, bytes already read from the client but not yet answered (moved with them).
    pub moved_read_bytes: u64,
    /// Of `moved`: opaque TCP relays (a pair of sockets each).
    pub moved_opaque: u64,
    /// Of `moved`: Bolt and Dubbo connections (moved at a frame boundary once every request
    /// in flight on them was answered).
    pub moved_mux: u64,
    /// In N+1: the previous generation while it drains.
    pub previous: Option<Previous>,
    /// Of `succeeded`: hand-offs this generation took back because its successor died while
    /// this generation still drained (it serves again).
    pub taken_back: u64,
    /// In N+1: the upstream connections it opened before it took over, to the sizes of the
    /// previous generation's pools.
    pub preconnected: Option<Preconnected>,
}

/// A successor's pre-connect before `Started` (see `new::preconnect`).
#[derive(Debug, Clone, Serialize)]
pub struct Preconnected {
    /// (pod, endpoint) pools the previous generation named.
    pub pools: u64,
    /// Connections opened.
    pub opened: u64,
    /// Pools none of whose connections opened (or that this generation does not serve).
    pub failed: u64,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Previous {
    pub pid: u32,
    pub generation: u64,
    pub connections_left: u64,
    pub exited: bool,
}

impl Status {
    const fn new() -> Self {
        Self {
            phase: "idle",
            peer_pid: None,
            attempts: 0,
            succeeded: 0,
            failed: 0,
            refused: 0,
            last_error: None,
            moved: 0,
            moved_read_bytes: 0,
            moved_opaque: 0,
            moved_mux: 0,
            previous: None,
            taken_back: 0,
            preconnected: None,
        }
    }
}

pub fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

fn set_generation(g: u64) {
    GENERATION.store(g, Relaxed);
}

fn status_mut<R>(f: impl FnOnce(&mut Status) -> R) -> R {
    f(&mut STATUS.lock().expect("upgrade status lock"))
}

/// The `upgrade` object of `sockmesh status`.
pub fn status_json() -> serde_json::Value {
    let st = STATUS.lock().expect("upgrade status lock").clone();
    let in_progress = !matches!(st.phase, "idle") || st.previous.as_ref().is_some_and(|p| !p.exited);
    let mut v = serde_json::to_value(&st).unwrap_or(json!({}));
    v["in_progress"] = in_progress.into();
    v["pid"] = std::process::id().into();
    let (buckets, sum, max) = handover_wait();
    let n: u64 = buckets.iter().sum();
    v["handover_wait"] = json!({
        "connections": n,
        "max_ms": (max * 1e4).round() / 10.0,
        "mean_ms": if n > 0 { (sum / n as f64 * 1e4).round() / 10.0 } else { 0.0 },
    });
    v
}

/// `sockmesh_upgrade_total`: (result, hand-offs) of this process as the old generation.
pub fn outcome_totals() -> Vec<(&'static str, u64)> {
    let st = STATUS.lock().expect("upgrade status lock");
    vec![
        ("succeeded", st.succeeded),
        ("failed", st.failed.saturating_sub(st.refused)),
        ("refused", st.refused),
        ("successor_died", st.taken_back),
    ]
}

/// The `generation` line of `sockmesh status`.
pub fn render_status(generation: &serde_json::Value, up: &serde_json::Value) -> String {
    let mut line = format!("generation {generation}");
    let phase = up["phase"].as_str().unwrap_or("idle");
    if phase != "idle" {
        line += &format!(
            "; upgrade in progress: {phase} (other generation pid {})",
            up["peer_pid"]
        );
    }
    if let Some(p) = up["previous"].as_object() {
        if p.get("exited").and_then(|v| v.as_bool()) == Some(false) {
            line += &format!(
                "; upgrade in progress: previous generation {} (pid {}) draining, {} connections left",
                p["generation"], p["pid"], p["connections_left"]
            );
        }
    }
    let back = up["taken_back"].as_u64().unwrap_or(0);
    if back > 0 {
        line += &format!(
            "; took the hand-off back {back} time(s) (the successor died while this generation drained)"
        );
    }
    let failed = up["failed"].as_u64().unwrap_or(0);
    if failed > 0 {
        line += &format!(
            "; {failed} failed upgrade(s), last: {}",
            up["last_error"].as_str().unwrap_or("?")
        );
    }
    line.push('\n');
    line
}

fn drain_tx() -> &'static tokio::sync::watch::Sender<bool> {
    DRAINING.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// This generation handed over: connections finish and close.
pub fn set_draining() {
    AFTER_HANDOFF.store(HANDOFF_DRAINING, SeqCst);
    drain_tx().send_replace(true);
}

/// After a hand-off: this generation drains ...
const HANDOFF_DRAINING: u8 = 0;
/// ... took it back (its successor died first) and serves again ...
const HANDOFF_TAKEN_BACK: u8 = 1;
/// ... or drained and exits.
const HANDOFF_DRAINED: u8 = 2;
static AFTER_HANDOFF: AtomicU8 = AtomicU8::new(HANDOFF_DRAINING);

/// The successor died while this generation drained: take the hand-off back unless the drain
/// is already over (then this generation exits as it would have). Connections stop draining.
fn take_back() -> bool {
    let won = AFTER_HANDOFF
        .compare_exchange(HANDOFF_DRAINING, HANDOFF_TAKEN_BACK, SeqCst, SeqCst)
        .is_ok();
    if won {
        drain_tx().send_replace(false);
    }
    won
}

/// Whether this generation took its hand-off back (checked by its drain, see
/// [`crate::daemon::Daemon::drain_handed_off`]).
pub fn taken_back() -> bool {
    is_handoff_state(HANDOFF_TAKEN_BACK)
}

fn is_handoff_state(s: u8) -> bool {
    AFTER_HANDOFF.load(SeqCst) == s
}

/// The drain after a hand-off is over: true when this generation is to exit now, false when
/// it took the hand-off back meanwhile (it serves again).
pub fn drain_over() -> bool {
    AFTER_HANDOFF
        .compare_exchange(HANDOFF_DRAINING, HANDOFF_DRAINED, SeqCst, SeqCst)
        .is_ok()
        || is_handoff_state(HANDOFF_DRAINED)
}

pub fn is_draining() -> bool {
    *drain_tx().borrow()
}

/// Resolves once this generation drains (never, otherwise).
pub async fn draining() {
    let mut rx = drain_tx().subscribe();
    let _ = rx.wait_for(|d| *d).await;
}

/// For an app connection's drive loop: resolves when the connection should be asked to finish
/// gracefully because this generation drains. HTTP/2 at once (GOAWAY); HTTP/1.1 after
/// [`HTTP1_DRAIN_IDLE_CLOSE`], so that a client with a request on the way gets its answer
/// (with `Connection: close`) instead of a close racing its request.
pub async fn drain_close(http2: bool) {
    draining().await;
    if !http2 {
        tokio::time::sleep(HTTP1_DRAIN_IDLE_CLOSE).await;
    }
}

/// For an HTTP/1.1 app connection's drive loop: resolves when this generation drains, with
/// `true` once the connection is idle and can be handed over to the successor (`idle`
/// resolves when no request is in flight), `false` after [`HTTP1_DRAIN_IDLE_CLOSE`] when it
/// cannot (it is then closed gracefully).
pub async fn drain_http1(idle: impl std::future::Future<Output = ()>) -> bool {
    draining().await;
    if can_hand_over() {
        idle.await;
        true
    } else {
        tokio::time::sleep(HTTP1_DRAIN_IDLE_CLOSE).await;
        false
    }
}

/// Whether live connections can be handed over now (a successor reads them).
///
/// Not with the sockmap short-circuit on: moved accelerated relays stalled in the tests (4 of 4
/// streams stopped after the move; not understood yet), so with acceleration their connections
/// drain on the old generation instead (HTTP/1.1: `Connection: close`).
pub fn can_hand_over() -> bool {
    !ACCELERATED.load(Relaxed) && HANDOVER.lock().expect("handover lock").is_some()
}

/// The hand-off protocol agreed with the successor (see [`wire::negotiate`]).
static PEER_PROTOCOL: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(wire::PROTOCOL_VERSION);

pub fn set_peer_protocol(v: u32) {
    PEER_PROTOCOL.store(v, Relaxed);
}

/// Whether this generation runs with the sockmap short-circuit on (no connection moves).
static ACCELERATED: AtomicBool = AtomicBool::new(false);

pub fn set_accelerated(on: bool) {
    ACCELERATED.store(on, Relaxed);
}

/// A connection on its way to the successor.
pub struct HandOver {
    pub meta: wire::Conn,
    /// HTTP/1.1: the client's socket; opaque TCP: the client's, then the upstream's.
    pub fds: Vec<OwnedFd>,
}

/// Queue a connection for the successor; false (the descriptors closed) when there is none.
fn send_handover(meta: wire::Conn, fds: Vec<OwnedFd>) -> bool {
    let tx = HANDOVER.lock().expect("handover lock").clone();
    match tx {
        Some(tx) => tx.send(HandOver { meta, fds }).is_ok(),
        None => false,
    }
}

/// The protocols a moved app connection is counted under in
/// `sockmesh_upgrade_moved_connections_total` (`tcp`: an opaque relay).
pub const MOVED_PROTOCOLS: [&str; 4] = ["http1", "bolt", "dubbo", "tcp"];
/// App connections moved into a generation by upgrades, by [`MOVED_PROTOCOLS`]: this
/// generation's own and, carried over, its predecessors'.
static MOVED_TOTAL: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// `sockmesh_upgrade_moved_connections_total`: (protocol, connections) along the chain of
/// generations.
pub fn moved_totals() -> Vec<(&'static str, u64)> {
    MOVED_PROTOCOLS
        .iter()
        .zip(&MOVED_TOTAL)
        .map(|(p, n)| (*p, n.load(Relaxed)))
        .collect()
}

/// Count `n` connections of `protocol` (one of [`MOVED_PROTOCOLS`]; others are ignored).
pub(crate) fn add_moved(protocol: &str, n: u64) {
    if let Some(i) = MOVED_PROTOCOLS.iter().position(|p| *p == protocol) {
        MOVED_TOTAL[i].fetch_add(n, Relaxed);
    }
}

/// What a moved connection is counted as.
fn moved_protocol(c: &wire::Conn) -> &'static str {
    if c.opaque {
        return "tcp";
    }
    match wire::AppProtocol::try_from(c.protocol) {
        Ok(wire::AppProtocol::Http1) => "http1",
        Ok(wire::AppProtocol::Bolt) => "bolt",
        Ok(wire::AppProtocol::Dubbo) => "dubbo",
        Err(_) => "unknown",
    }
}

/// Upper bounds (seconds) of `sockmesh_upgrade_handover_wait_seconds`' buckets.
pub const HANDOVER_WAIT_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// Moved app connections this process adopted, by how long they waited between the previous
/// generation stopping them and this one serving them: per bucket (not cumulative, the last
/// one above 1 s), the sum and the largest (microseconds).
struct HandoverWait {
    buckets: [AtomicU64; HANDOVER_WAIT_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

static HANDOVER_WAIT: HandoverWait = HandoverWait {
    buckets: [const { AtomicU64::new(0) }; HANDOVER_WAIT_BUCKETS.len() + 1],
    sum_us: AtomicU64::new(0),
    max_us: AtomicU64::new(0),
};

pub use crate::sys::unix_us;

/// A moved app connection is served here: count how long it waited since the previous
/// generation stopped it at `stopped_unix_us` (0: a binary that does not say; not counted).
pub fn record_handover_wait(stopped_unix_us: u64) {
    if stopped_unix_us == 0 {
        return;
    }
    let us = unix_us().saturating_sub(stopped_unix_us);
    let secs = us as f64 / 1e6;
    let i = HANDOVER_WAIT_BUCKETS
        .iter()
        .position(|le| secs <= *le)
        .unwrap_or(HANDOVER_WAIT_BUCKETS.len());
    HANDOVER_WAIT.buckets[i].fetch_add(1, Relaxed);
    HANDOVER_WAIT.sum_us.fetch_add(us, Relaxed);
    HANDOVER_WAIT.max_us.fetch_max(us, Relaxed);
}

/// `sockmesh_upgrade_handover_wait_seconds`: (per-bucket counts as in
/// [`HANDOVER_WAIT_BUCKETS`] plus one above, sum in seconds, largest in seconds).
pub fn handover_wait() -> (Vec<u64>, f64, f64) {
    let w = &HANDOVER_WAIT;
    (
        w.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        w.sum_us.load(Relaxed) as f64 / 1e6,
        w.max_us.load(Relaxed) as f64 / 1e6,
    )
}

/// A Bolt or Dubbo connection that stopped reading at a frame boundary must have answered its
/// requests in flight this long before the drain deadline to move (the hand-over itself still
/// has to reach the successor before this generation exits).
pub const MUX_HANDOVER_MARGIN: Duration = Duration::from_secs(1);

/// When this generation's drain ends (set as it starts draining).
static DRAIN_DEADLINE: Mutex<Option<std::time::Instant>> = Mutex::new(None);

fn set_drain_deadline(at: std::time::Instant) {
    *DRAIN_DEADLINE.lock().expect("drain deadline lock") = Some(at);
}

/// For a Bolt or Dubbo app connection's reader: resolves when this generation drains, with
/// the instant by which the connection's requests in flight must be answered for it to move
/// (the drain deadline less [`MUX_HANDOVER_MARGIN`]); `None` when connections cannot move
/// (acceleration on, no successor), then the connection finishes on this generation.
pub async fn drain_mux() -> Option<std::time::Instant> {
    draining().await;
    if !can_hand_over() || PEER_PROTOCOL.load(Relaxed) < wire::MUX_MOVES_SINCE {
        return None;
    }
    let now = std::time::Instant::now();
    let deadline = DRAIN_DEADLINE
        .lock()
        .expect("drain deadline lock")
        .unwrap_or(now + MUX_HANDOVER_MARGIN);
    Some(deadline.checked_sub(MUX_HANDOVER_MARGIN).unwrap_or(now).max(now))
}

/// Hand a Bolt or Dubbo app connection (stopped at a frame boundary, every response written)
/// to the successor with the bytes read and not decoded (`read`, starting at stream offset
/// `offset`). Without a successor the socket is closed.
pub fn hand_over_mux(
    s: tokio::net::TcpStream,
    read: Vec<u8>,
    offset: u64,
    ctx: &crate::l7::ConnCtx,
    protocol: &'static str,
) {
    let app = match protocol {
        "bolt" => wire::AppProtocol::Bolt,
        "dubbo" => wire::AppProtocol::Dubbo,
        other => {
            tracing::warn!(
                protocol = other,
                "upgrade: no hand-over for this protocol: closed"
            );
            return;
        }
    };
    hand_over_app(s, read, offset, ctx, app);
}

/// Queue one app connection (its socket, the bytes read and not yet served from `offset` of
/// its stream) for the successor; without one the socket is closed.
fn hand_over_app(
    s: tokio::net::TcpStream,
    read: Vec<u8>,
    offset: u64,
    ctx: &crate::l7::ConnCtx,
    protocol: wire::AppProtocol,
) {
    let fd = match s.into_std() {
        Ok(s) => OwnedFd::from(s),
        Err(e) => {
            tracing::warn!("upgrade: connection not handed over: {e}");
            return;
        }
    };
    let meta = wire::Conn {
        pod: ctx.pod.name.clone(),
        inbound: ctx.inbound,
        client: ctx.client.to_string(),
        orig: ctx.orig.to_string(),
        local: ctx.local.to_string(),
        read,
        protocol: protocol as i32,
        stream_offset: offset,
        stopped_unix_us: unix_us(),
        ..Default::default()
    };
    if !send_handover(meta, vec![fd]) {
        tracing::warn!(client = %ctx.client, ?protocol, "upgrade: no successor to take the connection: closed");
    }
}

/// Filled by the hand-off session while the successor takes connections.
static HANDOVER: Mutex<Option<std::sync::mpsc::Sender<HandOver>>> = Mutex::new(None);

/// Hand an idle HTTP/1.1 app connection (stopped at a request boundary, with the bytes already
/// read) to the successor. Without one the socket is closed (cannot happen while
/// [`can_hand_over`] said yes, except when the successor died meanwhile).
pub fn hand_over_http1(s: tokio::net::TcpStream, read: Vec<u8>, ctx: &crate::l7::ConnCtx) {
    hand_over_app(s, read, 0, ctx, wire::AppProtocol::Http1);
}

/// A response on an HTTP/1.1 app connection while draining: `Connection: close`, so the client
/// opens its next connection to the successor. Protocol switches (101) are left alone.
pub fn close_after_response<B>(http1: bool, resp: &mut http::Response<B>) {
    mark_close(is_draining(), http1, resp)
}

fn mark_close<B>(draining: bool, http1: bool, resp: &mut http::Response<B>) {
    if http1 && draining && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
}

/// Whether this process may remove the admin socket path at exit.
pub fn owns_admin_socket() -> bool {
    OWNS_ADMIN.load(Relaxed)
}

/// The listening sockets the previous generation passed for `pod` bound to `addr`, member 0
/// first (taken: a second call gets none). Empty when there are none.
pub fn take_group(pod: &str, addr: SocketAddr) -> Vec<std::net::TcpListener> {
    let mut v = INHERITED.lock().expect("inherited lock");
    let mut group = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i].0 == pod && v[i].1 == addr {
            let (_, _, member, fd) = v.swap_remove(i);
            group.push((member, fd));
        } else {
            i += 1;
        }
    }
    group.sort_by_key(|(m, _)| *m);
    group
        .into_iter()
        .map(|(_, fd)| {
            let l = std::net::TcpListener::from(fd);
            if let Err(e) = l.set_nonblocking(true) {
                tracing::warn!(pod, %addr, "inherited listener: {e}");
            }
            l
        })
        .collect()
}

/// Whether the successor takes whole listener groups (hand-off protocol 3 on both sides; set
/// at its `Hello`). An older successor takes one socket per address: the draining generation
/// then closes the other members once it stopped accepting (see
/// [`crate::daemon::Daemon::drain_handed_off`]).
pub fn peer_takes_groups() -> bool {
    PEER_PROTOCOL.load(Relaxed) >= wire::LISTENER_GROUPS_SINCE
}

/// Close the inherited listeners no pod adopted (their pods are gone).
fn drop_unadopted() -> usize {
    let left = std::mem::take(&mut *INHERITED.lock().expect("inherited lock"));
    left.len()
}

/// What the lock file says (written by the daemon that holds the lock).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockInfo {
    pub pid: u32,
    pub generation: u64,
    pub rendezvous: PathBuf,
    pub protocol_version: u32,
    /// The daemon's `sockmesh --version` (empty in lock files of binaries before `--take-over`):
    /// a `run --take-over` never takes over from a newer one unless asked.
    #[serde(default)]
    pub binary_version: String,
}

/// The lock file of a state file (the daemon's `flock`).
pub fn lock_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("lock")
}

/// Generation `g`'s rendezvous socket: next to the state file, one name per generation, so a
/// process only ever removes its own (MOSN #1817: the old process unlinked the path the new
/// one listened on).
pub fn rendezvous_path(state_file: &Path, g: u64) -> PathBuf {
    let stem = state_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sockmesh".into());
    state_file.with_file_name(format!("{stem}.upgrade.{g}.sock"))
}

/// Rendezvous sockets of any generation next to `state_file`.
pub fn rendezvous_files(state_file: &Path) -> Vec<PathBuf> {
    let stem = state_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sockmesh".into());
    let prefix = format!("{stem}.upgrade.");
    let dir = state_file.parent().unwrap_or(Path::new("."));
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock"))
        })
        .collect();
    v.sort();
    v
}

pub fn read_lock_info(state_file: &Path) -> Option<LockInfo> {
    let text = std::fs::read_to_string(lock_path(state_file)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Rewrite the lock file's contents (the `flock` is on the open file, not the contents).
fn write_lock_info(lock: &std::fs::File, info: &LockInfo) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let text = serde_json::to_vec(info).expect("serialisable");
    lock.set_len(0)?;
    lock.write_all_at(&text, 0)?;
    Ok(())
}

/// At a fresh start (not an upgrade): the generation after the one the lock file names (a
/// restart continues the count), and stale rendezvous files of dead daemons removed.
pub fn fresh_start(state_file: &Path) {
    if let Some(info) = read_lock_info(state_file) {
        set_generation(info.generation + 1);
    }
    for p in rendezvous_files(state_file) {
        tracing::info!(path = %p.display(), "removing a stale upgrade rendezvous socket");
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_connections_wait_lands_in_its_bucket_and_an_unknown_stop_is_not_counted() {
        // The histogram is the process's: compare before and after (no other test records).
        let (before, sum0, _) = handover_wait();
        record_handover_wait(0);
        record_handover_wait(unix_us() - 300_000);
        record_handover_wait(unix_us() - 2_000_000);
        let (after, sum1, max) = handover_wait();
        let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        // 300 ms: the 0.5 s bucket (index 8); 2 s: above the last bound.
        assert_eq!(d, vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1], "{d:?}");
        assert!(sum1 - sum0 >= 2.3 && max >= 2.0, "sum {} max {max}", sum1 - sum0);
        assert_eq!(
            status_json()["handover_wait"]["connections"],
            after.iter().sum::<u64>()
        );
    }

    #[test]
    fn rendezvous_names_are_per_generation_and_found_again() {
        let dir = std::env::temp_dir().join(format!("sm-upg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sf = dir.join("state.json");
        let a = rendezvous_path(&sf, 1);
        let b = rendezvous_path(&sf, 2);
        assert_ne!(a, b);
        assert_eq!(a, dir.join("state.upgrade.1.sock"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        std::fs::write(dir.join("other.upgrade.1.sock"), "").unwrap();
        assert_eq!(rendezvous_files(&sf), vec![a, b]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn draining_http1_responses_say_close_but_not_switches() {
        // (The process-wide flag is never set in unit tests: other tests share the process.)
        let mut r = http::Response::new(());
        close_after_response(true, &mut r);
        assert!(r.headers().get("connection").is_none(), "not draining");
        mark_close(true, true, &mut r);
        assert_eq!(r.headers()["connection"], "close");
        let mut h2 = http::Response::new(());
        mark_close(true, false, &mut h2);
        assert!(h2.headers().get("connection").is_none());
        let mut sw = http::Response::new(());
        *sw.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        mark_close(true, true, &mut sw);
        assert!(sw.headers().get("connection").is_none());
    }
}
