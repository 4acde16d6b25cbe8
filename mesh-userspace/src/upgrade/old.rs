//! Generation N's side: the rendezvous listener, the admin `upgrade` request (start the new
//! binary, wait for the outcome) and the hand-off session.

use std::{
    ffi::OsString,
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::json;
use tracing::{info, warn};

use super::{
    counters,
    wire::{self, Body, FdInfo, FdKind, Offer, Refuse},
};
use crate::{conn::Direction, daemon::Daemon};

/// The successor must say `Hello` this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and `Ready` this soon after the offer (it adopts the kernel state and runs the
/// acceleration self-test in between).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and `Started` this soon after `Commit`.
const STARTED_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole `sockmesh upgrade` request, from starting the binary to `Started`.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a draining generation sends its counters.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);

/// What generation N shares with its successor.
pub struct Ctx {
    pub daemon: Arc<Daemon>,
    pub state_file: PathBuf,
    pub lock: std::fs::File,
    pub admin: OwnedFd,
    pub metrics: OwnedFd,
}

struct Listening {
    ctx: Ctx,
    /// The daemon's runtime: to serve admin, metrics and connections again after a take-back.
    rt: tokio::runtime::Handle,
}

struct Session {
    /// Set by main once the drain is over: the session sends the last snapshot and ends.
    drained: AtomicBool,
    done: AtomicBool,
}

static BUSY: AtomicBool = AtomicBool::new(false);
static HANDED_OFF: AtomicBool = AtomicBool::new(false);
static SESSION: Mutex<Option<Arc<Session>>> = Mutex::new(None);
static OWN_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);
/// The admin and metrics accept loops: stopped the moment the successor serves them.
static SERVING: Mutex<Vec<tokio::task::AbortHandle>> = Mutex::new(Vec::new());

/// Register the accept loops of the sockets the successor takes over (admin, metrics).
pub fn stop_on_handoff(tasks: Vec<tokio::task::AbortHandle>) {
    *SERVING.lock().expect("serving lock") = tasks;
}
/// Outcome of the latest session per successor pid, for the admin request waiting on it.
static OUTCOMES: Mutex<Vec<(u32, Result<u64, String>)>> = Mutex::new(Vec::new());

/// Whether this generation handed over (main then stops serving admin and metrics, and drains).
pub fn handed_off() -> bool {
    HANDED_OFF.load(SeqCst)
}

/// The successor this generation handed over to: (generation, pid as it said, whether it is a
/// `run --take-over` beside this one rather than this process's child).
static SUCCESSOR: Mutex<Option<(u64, u32, bool)>> = Mutex::new(None);

/// The generation this one handed over to and its pid, while handed over.
pub fn successor() -> Option<(u64, u32)> {
    SUCCESSOR
        .lock()
        .expect("successor lock")
        .filter(|_| handed_off())
        .map(|(g, p, _)| (g, p))
}

/// Whether this generation handed over to a `run --take-over` (a DaemonSet's surge pod): after
/// its drain it stays, not ready and serving nothing, until SIGTERM, instead of exiting.
pub fn handed_to_take_over() -> bool {
    handed_off()
        && SUCCESSOR
            .lock()
            .expect("successor lock")
            .is_some_and(|(_, _, t)| t)
}

/// Listen on this generation's rendezvous socket and advertise it in the lock file.
pub fn listen(ctx: Ctx) -> io::Result<PathBuf> {
    let g = super::generation();
    let path = super::rendezvous_path(&ctx.state_file, g);
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    super::write_lock_info(
        &ctx.lock,
        &super::LockInfo {
            pid: std::process::id(),
            generation: g,
            rendezvous: path.clone(),
            protocol_version: wire::PROTOCOL_VERSION,
            binary_version: super::takeover::binary_version(),
        },
    )?;
    *OWN_PATH.lock().expect("path lock") = Some(path.clone());
    info!(path = %path.display(), generation = g, "upgrade rendezvous listening");
    let rt = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let ctx = Arc::new(Listening { ctx, rt });
    std::thread::Builder::new()
        .name("sockmesh-upgrade".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                if handed_off() {
                    let _ = refuse(&s, "this generation already handed over; ask its successor");
                    continue;
                }
                if BUSY.swap(true, SeqCst) {
                    let _ = refuse(&s, "another upgrade is in progress");
                    super::status_mut(|st| {
                        st.failed += 1;
                        st.refused += 1;
                    });
                    continue;
                }
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    let r = session(&ctx.ctx, &ctx.rt, s);
                    BUSY.store(false, SeqCst);
                    if let Err((pid, e)) = r {
                        warn!(
                            successor = pid,
                            "upgrade failed, this generation keeps serving: {e}"
                        );
                        super::status_mut(|st| {
                            st.phase = "idle";
                            st.peer_pid = None;
                            st.failed += 1;
                            st.last_error = Some(e.clone());
                        });
                        OUTCOMES.lock().expect("outcomes").push((pid, Err(e)));
                    }
                });
            }
        })?;
    Ok(path)
}

fn refuse(s: &UnixStream, reason: &str) -> io::Result<()> {
    s.set_write_timeout(Some(HELLO_TIMEOUT))?;
    wire::send(
        s,
        Body::Refuse(Refuse {
            reason: reason.into(),
            protocol_version: wire::PROTOCOL_VERSION,
        }),
        &[],
    )
}

fn expect(s: &UnixStream, timeout: Duration, want: &'static str) -> Result<Body, String> {
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    match wire::recv(s) {
        Ok((Body::Abort(a), _)) => Err(format!("the successor gave up: {}", a.reason)),
        Ok((b, _)) if b.name() == want => Ok(b),
        Ok((b, _)) => Err(format!("protocol error: expected {want}, got {}", b.name())),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(format!("no {want} from the successor within {timeout:?}"))
        }
        Err(e) => Err(format!("waiting for {want}: {e}")),
    }
}

/// One hand-off. Errors carry the successor's pid (0 before its hello).
fn session(ctx: &Ctx, rt: &tokio::runtime::Handle, s: UnixStream) -> Result<(), (u32, String)> {
    let hello = match expect(&s, HELLO_TIMEOUT, "hello") {
        Ok(Body::Hello(h)) => h,
        Ok(_) => unreachable!("expect checks the kind"),
        Err(e) => return Err((0, e)),
    };
    let pid = hello.pid;
    super::status_mut(|st| st.attempts += 1);
    // SO_PEERCRED: only our own user may take the daemon over (the socket is 0600 anyway).
    let cred = peer_cred(&s).ok();
    if let Some(cred) = cred {
        // SAFETY: geteuid has no preconditions.
        if cred.uid != unsafe { libc::geteuid() } {
            let _ = refuse(&s, "not the daemon's user");
            super::status_mut(|st| st.refused += 1);
            return Err((pid, format!("refused a successor of uid {}", cred.uid)));
        }
    }
    // The successor's process as the kernel knows it (the hello's pid is its own word): after
    // `Started`, its death while this generation drains is seen on a pidfd of it.
    // A successor in another pid namespace (a DaemonSet's other pod) has pid 0 here: it is not
    // watched (its `Hello` pid is its own namespace's, e.g. 1), so no take-back.
    let watch = cred.map(|c| c.pid as u32).unwrap_or(pid);
    let successor = Successor::new(watch);
    let Some(version) = wire::negotiate(hello.protocol_version) else {
        let why = format!(
            "hand-off protocol {} is not one this daemon speaks ({} to {}; binary {})",
            hello.protocol_version,
            wire::MIN_PROTOCOL_VERSION,
            wire::PROTOCOL_VERSION,
            if hello.binary_version.is_empty() {
                "unknown"
            } else {
                &hello.binary_version
            }
        );
        let _ = refuse(&s, &why);
        super::status_mut(|st| st.refused += 1);
        return Err((pid, format!("refused: {why}")));
    };
    super::set_peer_protocol(version);
    if let Some(p) = super::status_mut(|st| st.previous.clone()).filter(|p| !p.exited) {
        let why = format!("the previous generation (pid {}) is still draining", p.pid);
        let _ = refuse(&s, &why);
        super::status_mut(|st| st.refused += 1);
        return Err((pid, format!("refused: {why}")));
    }
    info!(
        successor = pid,
        version = %hello.binary_version,
        take_over = hello.take_over,
        "upgrade: successor says hello"
    );
    super::status_mut(|st| {
        st.phase = "offered";
        st.peer_pid = Some(pid);
    });
    // Version 3: first grow each listener group to the successor's worker count, so that
    // every member it will accept on is one this generation holds (and accepts on) too: if the
    // successor dies, no member closes with connections in its queue.
    let groups = version >= wire::LISTENER_GROUPS_SINCE;
    if groups && hello.workers > 0 {
        let added = ctx.daemon.grow_listeners(hello.workers as usize);
        if added > 0 {
            info!(
                added,
                workers = hello.workers,
                "upgrade: listener groups grown to the successor's workers"
            );
        }
    }
    // What moves: the lock, admin and metrics listeners, every pod's listeners (the same
    // sockets: their accept queues, and the sk_lookup sockmap entries, stay as they are);
    // an older successor gets member 0 of each group only.
    let mut infos = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let dup = |fd: &dyn AsFd| fd.as_fd().try_clone_to_owned().map_err(|e| (pid, e.to_string()));
    for (kind, fd) in [
        (FdKind::Lock, ctx.lock.as_fd()),
        (FdKind::Admin, ctx.admin.as_fd()),
        (FdKind::Metrics, ctx.metrics.as_fd()),
    ] {
        fds.push(dup(&fd)?);
        infos.push(FdInfo {
            kind: kind as i32,
            pod: String::new(),
            addr: String::new(),
            member: 0,
        });
    }
    for (pod, addr, dir, member, fd) in ctx.daemon.listener_fds(groups) {
        infos.push(FdInfo {
            kind: match dir {
                Direction::Outbound => FdKind::Outbound,
                Direction::Inbound => FdKind::Inbound,
            } as i32,
            pod,
            addr: addr.to_string(),
            member,
        });
        fds.push(fd);
    }
    if !groups && fds.len() > wire::MAX_FDS {
        let _ = refuse(&s, "too many listeners for one hand-off message");
        return Err((pid, format!("{} listeners exceed one message", fds.len())));
    }
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    s.set_write_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| (pid, e.to_string()))?;
    wire::send_offer(
        &s,
        Offer {
            protocol_version: version,
            generation: super::generation(),
            fds: infos,
            pid: std::process::id(),
        },
        &raw,
    )
    .map_err(|e| (pid, format!("sending the offer: {e}")))?;
    drop(fds);
    expect(&s, READY_TIMEOUT, "ready").map_err(|e| (pid, e))?;
    super::status_mut(|st| st.phase = "ready");
    // The upstream pools in use now: the successor opens as many before it takes over.
    let pools = pool_sizes(&ctx.daemon);
    wire::send(&s, Body::Commit(wire::Commit { pools }), &[])
        .map_err(|e| (pid, format!("sending commit: {e}")))?;
    super::status_mut(|st| st.phase = "committed");
    let started = match expect(&s, STARTED_TIMEOUT, "started").map_err(|e| (pid, e))? {
        Body::Started(st) => st,
        _ => unreachable!("expect checks the kind"),
    };
    // Point of no return: the successor accepts on the shared listeners and serves admin.
    let sess = Arc::new(Session {
        drained: AtomicBool::new(false),
        done: AtomicBool::new(false),
    });
    *SESSION.lock().expect("session lock") = Some(sess.clone());
    *SUCCESSOR.lock().expect("successor lock") = Some((started.generation, pid, hello.take_over));
    HANDED_OFF.store(true, SeqCst);
    // From now on admin and metrics requests reach the successor only (requests already
    // accepted, this upgrade's own among them, are still answered).
    for t in SERVING.lock().expect("serving lock").drain(..) {
        t.abort();
    }
    super::OWNS_ADMIN.store(false, SeqCst);
    super::status_mut(|st| st.succeeded += 1);
    // A `run --take-over` was started by nobody here: no admin request waits for its outcome.
    if !hello.take_over {
        OUTCOMES
            .lock()
            .expect("outcomes")
            .push((pid, Ok(started.generation)));
        // Let the admin request that started the upgrade answer before this generation stops
        // (the drain can be over within milliseconds once connections move). Connections go on
        // being served here meanwhile: they stop only once this thread forwards them (below).
        // Stopping them first left every moved connection waiting 5-26 ms for this (the admin
        // request looks every 20 ms), and the app's next request with it.
        let picked = Instant::now() + Duration::from_secs(2);
        while OUTCOMES.lock().expect("outcomes").iter().any(|(p, _)| *p == pid) && Instant::now() < picked {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Live app connections come through this channel once at a boundary (set before draining
    // starts, so that they see a successor to go to); this thread forwards them at once.
    let (tx, rx) = std::sync::mpsc::channel::<super::HandOver>();
    *super::HANDOVER.lock().expect("handover lock") = Some(tx);
    super::set_drain_deadline(Instant::now() + ctx.daemon.drain_timeout());
    super::set_draining();
    super::status_mut(|st| st.phase = "draining");
    info!(
        successor = pid,
        generation = started.generation,
        "upgrade: handed over; this generation stops accepting and drains"
    );
    let pods = ctx.daemon.pod_stats();
    ctx.daemon.request_stop(true);
    // Connections as they come, counters every SNAPSHOT_EVERY, until the drain is over; then
    // the last counters. If the successor dies meanwhile, this generation takes the hand-off
    // back (see `take_back`).
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut ok = true;
    let mut next_snapshot = Instant::now();
    let fail = |ok: &mut bool, e: io::Error| {
        warn!("the successor stopped reading: {e}; live connections now close instead");
        *super::HANDOVER.lock().expect("handover lock") = None;
        *ok = false;
    };
    let moved_before = super::status_mut(|st| st.moved);
    let back = |why: String, pending: Option<super::HandOver>, rx| {
        let gen = started.generation;
        take_back(ctx, rt, &successor, gen, moved_before, why, pending, rx)
    };
    loop {
        let drained = sess.drained.load(SeqCst);
        if !drained && successor.exited(Duration::ZERO) {
            if back("it exited".into(), None, rx) {
                sess.done.store(true, SeqCst);
                return Ok(());
            }
            *super::HANDOVER.lock().expect("handover lock") = None;
            break;
        }
        let wait = next_snapshot
            .saturating_duration_since(Instant::now())
            .min(DEATH_CHECK_EVERY);
        let item = if drained {
            rx.try_recv().ok()
        } else {
            rx.recv_timeout(wait).ok()
        };
        if let Some(h) = item {
            if ok {
                let read = h.meta.read.len() as u64;
                let mux = !h.meta.opaque && h.meta.protocol != wire::AppProtocol::Http1 as i32;
                let raw: Vec<_> = h.fds.iter().map(|f| f.as_raw_fd()).collect();
                match wire::send(&s, Body::Conn(h.meta.clone()), &raw) {
                    Ok(()) => super::status_mut(|st| {
                        st.moved += 1;
                        st.moved_read_bytes += read;
                        st.moved_mux += mux as u64;
                    }),
                    // Not sent: the connection is still this generation's to serve.
                    Err(e) if !drained && successor.exited(DEATH_CONFIRM) => {
                        if back(format!("sending a connection: {e}"), Some(h), rx) {
                            sess.done.store(true, SeqCst);
                            return Ok(());
                        }
                        *super::HANDOVER.lock().expect("handover lock") = None;
                        break;
                    }
                    Err(e) => fail(&mut ok, e),
                }
            }
            if !drained {
                continue;
            }
        } else if drained {
            break;
        }
        if ok && Instant::now() >= next_snapshot {
            let snap = counters::snapshot(&ctx.daemon, &pods, false);
            if let Err(e) = wire::send(&s, Body::Snapshot(snap), &[]) {
                if !drained && successor.exited(DEATH_CONFIRM) {
                    if back(format!("sending counters: {e}"), None, rx) {
                        sess.done.store(true, SeqCst);
                        return Ok(());
                    }
                    *super::HANDOVER.lock().expect("handover lock") = None;
                    break;
                }
                fail(&mut ok, e);
            }
            next_snapshot = Instant::now() + SNAPSHOT_EVERY;
        }
    }
    *super::HANDOVER.lock().expect("handover lock") = None;
    if ok {
        let _ = wire::send(
            &s,
            Body::Snapshot(counters::snapshot(&ctx.daemon, &pods, true)),
            &[],
        );
    }
    sess.done.store(true, SeqCst);
    Ok(())
}

/// At most this many (pod, endpoint) pools are named in `Commit` (the largest): about 60
/// bytes each, well inside [`wire::MAX_FRAME`]; the others open on first use as before.
const MAX_COMMIT_POOLS: usize = 4096;

/// The HTTP/1.1 upstream demand of this generation per (pod, endpoint) (see
/// [`wire::Commit::pools`]), the [`MAX_COMMIT_POOLS`] largest.
fn pool_sizes(daemon: &Daemon) -> Vec<wire::PoolSize> {
    let mut v = daemon.l7().http.h1_demand_all();
    if v.len() > MAX_COMMIT_POOLS {
        v.sort_by_key(|p| std::cmp::Reverse(p.2));
        v.truncate(MAX_COMMIT_POOLS);
    }
    v.into_iter()
        .map(|(pod, ep, n)| wire::PoolSize {
            pod: pod.name.clone(),
            endpoint: ep.to_string(),
            connections: u32::try_from(n).unwrap_or(u32::MAX),
        })
        .collect()
}

/// How often a draining generation looks whether its successor still runs.
const DEATH_CHECK_EVERY: Duration = Duration::from_millis(50);
/// After a failed write to the successor: how long to wait for its exit to show.
const DEATH_CONFIRM: Duration = Duration::from_secs(1);

/// The successor's process, watched through a pidfd (or `/proc` where pidfds are missing).
struct Successor {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Successor {
    fn new(pid: u32) -> Self {
        if pid == 0 {
            return Self { pid, pidfd: None };
        }
        // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new descriptor
        // this process owns.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
        Self { pid, pidfd }
    }

    /// Whether the successor has exited (waiting up to `wait` for it).
    fn exited(&self, wait: Duration) -> bool {
        if self.pid == 0 {
            // Not visible from here (see `session`): never seen to exit.
            std::thread::sleep(wait);
            return false;
        }
        match &self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                let r = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
                r > 0 && p.revents & libc::POLLIN != 0
            }
            None => {
                let deadline = Instant::now() + wait;
                loop {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
                    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
                    if stat.is_empty() || state == Some('Z') {
                        return true;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// The successor died after `Started` while this generation still drains: serve again, as if
/// the hand-off had not happened. Returns false when the drain was already over (this
/// generation exits as it would have; nothing is taken back).
///
/// What this generation kept makes it possible: its own copies of the listening sockets (the
/// pods' accept queues, sockmap entries and outbound listeners never closed, see
/// [`crate::daemon::Daemon::drain_handed_off`], which accepts again and writes this
/// generation's kernel state over the successor's), of the admin and metrics sockets, of the
/// lock (the `flock` is shared) and its rendezvous socket (never removed). Here: connections
/// still on their way to the successor (and the one whose sending failed) are served by this
/// generation instead; admin and metrics are served again; the lock file names this generation
/// and the dead successor's rendezvous socket goes. Connections the successor had received die
/// with it.
#[allow(clippy::too_many_arguments)]
fn take_back(
    ctx: &Ctx,
    rt: &tokio::runtime::Handle,
    successor: &Successor,
    successor_generation: u64,
    moved_before: u64,
    why: String,
    pending: Option<super::HandOver>,
    rx: std::sync::mpsc::Receiver<super::HandOver>,
) -> bool {
    if !super::take_back() {
        return false;
    }
    let pid = successor.pid;
    let moved = super::status_mut(|st| st.moved) - moved_before;
    warn!(
        successor = pid,
        generation = successor_generation,
        lost = moved,
        "upgrade: the successor died while this generation drained ({why}): taking the hand-off back; the {moved} connection(s) it had received are lost"
    );
    // Handed-over connections from now on (the drives that had decided to move theirs, and the
    // one whose sending failed) are this generation's again: serve them as a successor would.
    let daemon = ctx.daemon.clone();
    let _ = std::thread::Builder::new()
        .name("sockmesh-upgrade-back".into())
        .spawn(move || {
            for h in pending.into_iter().chain(rx.iter()) {
                serve_here(&daemon, h);
            }
        });
    // Admin and metrics from the kept sockets.
    let serving = (|| -> io::Result<Vec<tokio::task::AbortHandle>> {
        let _g = rt.enter();
        let a = std::os::unix::net::UnixListener::from(ctx.admin.try_clone()?);
        a.set_nonblocking(true)?;
        let m = std::net::TcpListener::from(ctx.metrics.try_clone()?);
        m.set_nonblocking(true)?;
        let a = tokio::net::UnixListener::from_std(a)?;
        let m = tokio::net::TcpListener::from_std(m)?;
        Ok(vec![
            rt.spawn(crate::admin::serve(a, ctx.daemon.clone()))
                .abort_handle(),
            rt.spawn(crate::metrics::serve(m, ctx.daemon.clone()))
                .abort_handle(),
        ])
    })();
    match serving {
        Ok(tasks) => stop_on_handoff(tasks),
        Err(e) => warn!("upgrade: admin and metrics not served again: {e}"),
    }
    super::OWNS_ADMIN.store(true, SeqCst);
    // The lock file names this generation again; the dead successor's rendezvous socket goes
    // (its owner is gone: nobody else may remove it, and a later upgrade must find ours).
    let own = OWN_PATH.lock().expect("path lock").clone();
    if let Some(own) = own {
        let info = super::LockInfo {
            pid: std::process::id(),
            generation: super::generation(),
            rendezvous: own,
            protocol_version: wire::PROTOCOL_VERSION,
            binary_version: super::takeover::binary_version(),
        };
        if let Err(e) = super::write_lock_info(&ctx.lock, &info) {
            warn!("upgrade: the lock file was not rewritten: {e}");
        }
    }
    let theirs = super::rendezvous_path(&ctx.state_file, successor_generation);
    if theirs.exists() {
        let _ = std::fs::remove_file(&theirs);
    }
    // It was started by this process: reap it (no effect on a process of another parent).
    // SAFETY: waitpid on one pid, without blocking.
    unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
    *SESSION.lock().expect("session lock") = None;
    super::status_mut(|st| {
        st.phase = "idle";
        st.peer_pid = None;
        st.taken_back += 1;
        st.last_error = Some(format!(
            "the successor (pid {pid}, generation {successor_generation}) died while this generation drained ({why}): took the hand-off back; {moved} connection(s) it had received were lost"
        ));
    });
    true
}

/// Serve a connection that was on its way to the successor here instead, on a proxy worker
/// in turn (like an accepted one).
fn serve_here(daemon: &Arc<Daemon>, mut h: super::HandOver) {
    let workers = &daemon.proxy_shared().workers;
    if h.meta.opaque {
        if h.fds.len() != 2 {
            return;
        }
        let upstream = h.fds.pop().expect("two descriptors");
        let client = h.fds.pop().expect("two descriptors");
        workers.spawn_any(super::tcp::adopt(daemon.clone(), h.meta, client, upstream));
    } else if let Some(fd) = h.fds.pop() {
        workers.spawn_any(super::new::adopt_app(daemon.clone(), h.meta, fd));
    }
}

/// Main, once it serves again after a take-back: upgrades are welcome again.
pub fn served_again() {
    HANDED_OFF.store(false, SeqCst);
}

fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// At exit of a generation that handed over: send the last counters (bounded), then remove
/// this generation's own rendezvous socket (never another's).
pub fn finish() {
    let sess = SESSION.lock().expect("session lock").clone();
    if let Some(sess) = sess {
        sess.drained.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !sess.done.load(SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(p) = OWN_PATH.lock().expect("path lock").take() {
        let _ = std::fs::remove_file(p);
    }
}

/// The admin `upgrade` request: start `binary` with this daemon's own arguments plus
/// `--upgrade` (so it shares the config and the cgroup), and wait for the hand-off's outcome.
/// On any failure this generation has changed nothing and keeps serving.
pub async fn start(binary: &Path) -> Result<serde_json::Value, String> {
    if handed_off() {
        return Err("this generation already handed over to its successor".into());
    }
    if BUSY.load(SeqCst) {
        return Err("another upgrade is in progress".into());
    }
    let meta = std::fs::metadata(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", binary.display()));
    }
    let mut args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--upgrade").collect();
    args.push("--upgrade".into());
    let mut child = std::process::Command::new(binary)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("failed to start {}: {e}", binary.display()))?;
    let pid = child.id();
    let from = std::process::id();
    info!(successor = pid, binary = %binary.display(), "upgrade: started the new binary");
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    loop {
        let outcome = {
            let mut o = OUTCOMES.lock().expect("outcomes");
            o.iter().position(|(p, _)| *p == pid).map(|i| o.swap_remove(i).1)
        };
        match outcome {
            Some(Ok(generation)) => {
                // The successor keeps running; it is reaped by whoever adopts it after we exit.
                std::mem::forget(child);
                return Ok(json!({
                    "generation": generation,
                    "pid": pid,
                    "previous_pid": from,
                    "previous_generation": super::generation(),
                }));
            }
            Some(Err(e)) => {
                // It may still be running (e.g. refused): it exits on its own; reap it then.
                reap_later(child);
                return Err(e);
            }
            None => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            // Give a session that is still reading its last message a moment to record it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let late = {
                let mut o = OUTCOMES.lock().expect("outcomes");
                o.iter().position(|(p, _)| *p == pid).map(|i| o.swap_remove(i).1)
            };
            let recorded = late.is_some();
            let e = match late {
                Some(Err(e)) => format!("{e} (the new binary then exited: {st})"),
                _ => format!("the new binary exited before taking over: {st}"),
            };
            if !recorded {
                super::status_mut(|s| {
                    s.attempts += 1;
                    s.failed += 1;
                    s.last_error = Some(e.clone());
                });
            }
            warn!(
                successor = pid,
                "upgrade failed, this generation keeps serving: {e}"
            );
            return Err(e);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let e = format!("the new binary did not take over within {UPGRADE_TIMEOUT:?}: killed it");
            super::status_mut(|s| {
                s.failed += 1;
                s.last_error = Some(e.clone());
            });
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reap_later(mut child: std::process::Child) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    });
}

/// `sockmesh upgrade --binary PATH`: ask the daemon on `admin_socket`; longer time-out than
/// other admin calls (the successor adopts the kernel state and runs the self-test).
pub fn cli(admin_socket: &Path, binary: &Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let binary =
        std::fs::canonicalize(binary).map_err(|e| anyhow::anyhow!("--binary {}: {e}", binary.display()))?;
    let s = UnixStream::connect(admin_socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the daemon at {}: {e} (is `sockmesh run` up?)",
            admin_socket.display()
        )
    })?;
    s.set_read_timeout(Some(UPGRADE_TIMEOUT + Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(&json!({"op": "upgrade", "binary": binary}))?;
    line.push(b'\n');
    (&s).write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp)?;
    if resp.is_empty() {
        anyhow::bail!("the daemon closed the admin connection without answering");
    }
    let v: serde_json::Value = serde_json::from_str(&resp)?;
    if v["ok"].as_bool() != Some(true) {
        anyhow::bail!(
            "upgrade failed: {}",
            v["error"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(v["status"].clone())
}
