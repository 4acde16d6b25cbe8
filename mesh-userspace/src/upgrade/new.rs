//! Generation N+1's side (`sockmesh run ... --upgrade`): find N through the lock file, take
//! the offered descriptors, say `Ready` once the kernel state is adopted, and after `Commit`
//! start and say `Started`; then add N's counters to its own while N drains.

use std::{
    io,
    net::SocketAddr,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use tracing::{info, warn};

use super::{
    counters::Carry,
    wire::{self, Body, FdKind, Hello},
};
use crate::daemon::Daemon;

/// N must answer each step this soon.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// `Commit` after `Ready`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the successor took over.
pub struct Inherited {
    conn: UnixStream,
    pub lock: std::fs::File,
    pub admin: OwnedFd,
    pub metrics: OwnedFd,
    previous_pid: u32,
    previous_generation: u64,
}

/// Find the running generation through the lock file next to `state_file` and take its offer.
/// `workers`: this generation's proxy workers (N grows its listener groups to as many).
/// `take_over`: this is a `run --take-over` beside it (see [`wire::Hello::take_over`]), not its
/// child started by `sockmesh upgrade`.
pub fn connect(state_file: &Path, workers: usize, take_over: bool) -> anyhow::Result<Inherited> {
    let info = super::read_lock_info(state_file).ok_or_else(|| {
        anyhow!(
            "--upgrade: {} names no running daemon to take over from",
            super::lock_path(state_file).display()
        )
    })?;
    // The running generation's hand-off protocol is in its lock file: say Hello in it when
    // it is older than ours and we still speak it (a version-1 daemon ends the upgrade at a
    // refused Hello, so asking in ours first would fail it). Otherwise ours; a daemon that
    // speaks an older one refuses naming it, and we ask again in that one.
    let mut version = match wire::negotiate(info.protocol_version) {
        Some(v) if v < wire::PROTOCOL_VERSION => v,
        _ => wire::PROTOCOL_VERSION,
    };
    if version < wire::PROTOCOL_VERSION {
        info!(
            "--upgrade: generation {} speaks hand-off protocol {} (this binary {}): using {version}",
            info.generation,
            info.protocol_version,
            wire::PROTOCOL_VERSION
        );
    }
    // Test-only: announce this protocol and take no other (see `test_protocol_version`).
    let forced = test_protocol_version();
    let (conn, offer, fds) = loop {
        let conn = UnixStream::connect(&info.rendezvous).with_context(|| {
            format!(
                "--upgrade: cannot reach generation {} (pid {}) at {}",
                info.generation,
                info.pid,
                info.rendezvous.display()
            )
        })?;
        conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        conn.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        wire::send(
            &conn,
            Body::Hello(Hello {
                protocol_version: forced.unwrap_or(version),
                pid: std::process::id(),
                binary_version: super::takeover::binary_version(),
                workers: workers as u32,
                take_over,
            }),
            &[],
        )?;
        let (body, fds) = wire::recv(&conn).context("--upgrade: waiting for the offer")?;
        match body {
            Body::Offer(o) => break (conn, o, fds),
            Body::Refuse(r)
                if forced.is_none()
                    && r.protocol_version < version
                    && wire::negotiate(r.protocol_version).is_some() =>
            {
                info!(
                    "--upgrade: generation {} speaks hand-off protocol {} (this binary {}): asking again in {}",
                    info.generation, r.protocol_version, version, r.protocol_version
                );
                version = r.protocol_version;
            }
            Body::Refuse(r) => bail!(
                "generation {} (pid {}) refused the hand-off: {} (it speaks hand-off protocol {}, this binary {} to {})",
                info.generation,
                info.pid,
                r.reason,
                r.protocol_version,
                wire::MIN_PROTOCOL_VERSION,
                wire::PROTOCOL_VERSION
            ),
            other => bail!("--upgrade: protocol error: expected offer, got {}", other.name()),
        }
    };
    // Version 3: descriptors beyond one message follow the offer.
    let fds = wire::recv_offer_fds(&conn, &offer, fds).context("--upgrade: the offer's descriptors")?;
    if offer.fds.len() != fds.len() {
        bail!(
            "--upgrade: the offer describes {} descriptors but {} came",
            offer.fds.len(),
            fds.len()
        );
    }
    let (mut lock, mut admin, mut metrics) = (None, None, None);
    let mut listeners = Vec::new();
    for (fi, fd) in offer.fds.iter().zip(fds) {
        match FdKind::try_from(fi.kind).unwrap_or(FdKind::Unknown) {
            FdKind::Lock => lock = Some(std::fs::File::from(fd)),
            FdKind::Admin => admin = Some(fd),
            FdKind::Metrics => metrics = Some(fd),
            FdKind::Outbound | FdKind::Inbound => {
                let addr: SocketAddr = fi
                    .addr
                    .parse()
                    .map_err(|_| anyhow!("--upgrade: bad listener address {:?}", fi.addr))?;
                listeners.push((fi.pod.clone(), addr, fi.member, fd));
            }
            FdKind::Unknown => warn!("--upgrade: ignoring a descriptor of unknown kind {}", fi.kind),
        }
    }
    let (Some(lock), Some(admin), Some(metrics)) = (lock, admin, metrics) else {
        bail!("--upgrade: the offer lacks the lock, admin or metrics descriptor");
    };
    info!(
        from_pid = offer.pid,
        from_generation = offer.generation,
        listeners = listeners.len(),
        "upgrade: took the previous generation's offer"
    );
    *super::INHERITED.lock().expect("inherited lock") = listeners;
    test_pause("offer");
    super::set_generation(offer.generation + 1);
    super::OWNS_ADMIN.store(false, std::sync::atomic::Ordering::SeqCst);
    super::status_mut(|st| {
        st.phase = "taking_over";
        st.peer_pid = Some(offer.pid);
    });
    Ok(Inherited {
        conn,
        lock,
        admin,
        metrics,
        previous_pid: offer.pid,
        previous_generation: offer.generation,
    })
}

impl Inherited {
    /// Kernel state adopted: tell N, and wait for its `Commit`; returns the upstream pool sizes
    /// it names (empty from a binary that does not send them), for [`preconnect`].
    pub fn ready(&self) -> anyhow::Result<Vec<wire::PoolSize>> {
        wire::send(
            &self.conn,
            Body::Ready(wire::Ready {
                pid: std::process::id(),
            }),
            &[],
        )?;
        self.conn.set_read_timeout(Some(COMMIT_TIMEOUT))?;
        match wire::recv(&self.conn).context("--upgrade: waiting for commit")?.0 {
            Body::Commit(c) => {
                test_pause("commit");
                Ok(c.pools)
            }
            Body::Abort(a) => bail!("the previous generation aborted the upgrade: {}", a.reason),
            other => bail!("--upgrade: protocol error: expected commit, got {}", other.name()),
        }
    }

    /// Tell N something went wrong on this side (best effort).
    pub fn abort(&self, reason: &str) {
        let _ = wire::send(
            &self.conn,
            Body::Abort(wire::Abort {
                reason: reason.into(),
            }),
            &[],
        );
    }

    /// Accepting and serving admin: tell N (it stops accepting and drains), then carry its
    /// counters over until it exits.
    pub fn started(self, daemon: Arc<Daemon>) -> anyhow::Result<()> {
        wire::send(
            &self.conn,
            Body::Started(wire::Started {
                generation: super::generation(),
            }),
            &[],
        )?;
        test_pause("started");
        let left = super::drop_unadopted();
        if left > 0 {
            warn!(listeners = left, "closed inherited listeners no pod adopted");
        }
        super::OWNS_ADMIN.store(true, std::sync::atomic::Ordering::SeqCst);
        let prev = super::Previous {
            pid: self.previous_pid,
            generation: self.previous_generation,
            connections_left: 0,
            exited: false,
        };
        super::status_mut(|st| {
            st.phase = "idle";
            st.peer_pid = None;
            st.previous = Some(prev);
        });
        info!(
            generation = super::generation(),
            previous_pid = self.previous_pid,
            "upgrade: took over; the previous generation drains"
        );
        let conn = self.conn;
        std::thread::Builder::new()
            .name("sockmesh-upgrade-carry".into())
            .spawn(move || {
                let mut carry = Carry::default();
                // N sends a snapshot every 200 ms; its drain is bounded by its own deadline.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                loop {
                    match wire::recv(&conn) {
                        Ok((Body::Snapshot(s), _)) => {
                            let last = s.last;
                            let left = s.connections_left;
                            carry.apply(&daemon, s);
                            super::status_mut(|st| {
                                if let Some(p) = st.previous.as_mut() {
                                    p.connections_left = left;
                                    p.exited = last;
                                }
                            });
                            if last {
                                info!("upgrade: the previous generation finished draining");
                                break;
                            }
                        }
                        Ok((Body::Conn(c), mut fds)) if fds.len() == 1 + c.opaque as usize => {
                            super::add_moved(super::moved_protocol(&c), 1);
                            super::status_mut(|st| {
                                st.moved += 1;
                                st.moved_read_bytes += (c.read.len() + c.to_client.len()) as u64;
                                st.moved_opaque += c.opaque as u64;
                                st.moved_mux +=
                                    (!c.opaque && c.protocol != wire::AppProtocol::Http1 as i32) as u64;
                            });
                            if c.opaque {
                                let upstream = fds.pop().expect("two descriptors");
                                let client = fds.pop().expect("two descriptors");
                                // Served by a proxy worker, in turn, like an accepted one.
                                let workers = &daemon.proxy_shared().workers;
                                workers.spawn_any(super::tcp::adopt(daemon.clone(), c, client, upstream));
                            } else {
                                let fd = fds.pop().expect("one descriptor");
                                let workers = &daemon.proxy_shared().workers;
                                workers.spawn_any(adopt_app(daemon.clone(), c, fd));
                                test_pause("conn");
                            }
                        }
                        Ok((other, _)) => {
                            warn!("upgrade: unexpected {} while carrying counters", other.name())
                        }
                        Err(e) => {
                            let gone =
                                !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
                            warn!("upgrade: the previous generation's counters stopped: {e}");
                            if gone {
                                super::status_mut(|st| {
                                    if let Some(p) = st.previous.as_mut() {
                                        p.exited = true;
                                    }
                                });
                                break;
                            }
                        }
                    }
                }
                // The previous generation is done (it can no longer take the hand-off back):
                // listener groups smaller than this generation's workers (a single socket from
                // a binary before hand-off protocol 3) get their members now.
                let added = daemon.grow_listeners(daemon.proxy_shared().workers.count());
                if added > 0 {
                    info!(
                        added,
                        "upgrade: listener groups grown to this generation's workers"
                    );
                }
            })?;
        Ok(())
    }
}

/// The whole pre-connect before `Started` takes at most this long (it delays the hand-off).
const PRECONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Pods enrolled, before `Started`: open the HTTP/1.1 upstream connections the previous
/// generation had per (pod, endpoint) (`pools`, from its `Commit`), so that the connections it
/// moves here find warm pools instead of each first request waiting for a connect. Spread
/// over the workers as the moved connections are (evenly), concurrently, bounded by
/// [`PRECONNECT_TIMEOUT`]; failures are logged and counted in the status, never fatal (a
/// request then opens its own connection).
pub async fn preconnect(daemon: &Arc<Daemon>, pools: Vec<wire::PoolSize>) {
    if pools.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let shared = daemon.proxy_shared().clone();
    let (n, mut failed) = (pools.len() as u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    for p in pools {
        let (Some(pod), Ok(ep)) = (daemon.pod_ctx(&p.pod), p.endpoint.parse::<SocketAddr>()) else {
            warn!(pod = %p.pod, endpoint = %p.endpoint, "upgrade: no pre-connect for a pool of a pod this generation does not serve");
            failed += 1;
            continue;
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let want = p.connections as usize;
            let r = shared
                .l7
                .http
                .preconnect_h1(&shared, &pod, ep, want, &[ep], PRECONNECT_TIMEOUT)
                .await;
            (p.pod, ep, r)
        });
    }
    let mut opened = 0u64;
    let deadline = tokio::time::Instant::now() + PRECONNECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok((_, _, Ok(k))))) => opened += k as u64,
            Ok(Some(Ok((pod, ep, Err(e))))) => {
                warn!(%pod, endpoint = %ep, "upgrade: pre-connect: {e}");
                failed += 1;
            }
            Ok(Some(Err(_))) => failed += 1,
            Ok(None) => break,
            Err(_) => {
                failed += tasks.len() as u64;
                tasks.abort_all();
                break;
            }
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    info!(
        pools = n,
        opened,
        failed,
        ms = format!("{ms:.1}"),
        "upgrade: pre-connected the upstream pools before taking over"
    );
    super::status_mut(|st| {
        st.preconnected = Some(super::Preconnected {
            pools: n,
            opened,
            failed,
            ms: (ms * 10.0).round() / 10.0,
        })
    });
}

/// Serve an app connection the previous generation handed over: HTTP/1.1 between requests,
/// Bolt or Dubbo at a frame boundary; the same socket, the bytes it had read first. Counted as
/// active here (its total was counted by the generation that accepted it, and carried over).
pub(super) async fn adopt_app(daemon: Arc<Daemon>, c: wire::Conn, fd: OwnedFd) {
    let Ok(protocol) = wire::AppProtocol::try_from(c.protocol) else {
        warn!(
            protocol = c.protocol,
            client = %c.client,
            "upgrade: a handed-over connection of an unknown protocol: closed"
        );
        daemon.l7().errors.count("upgrade", "unknown_protocol");
        return;
    };
    let parse = |s: &str| s.parse::<SocketAddr>().ok();
    let (Some(client), Some(orig), Some(local)) = (parse(&c.client), parse(&c.orig), parse(&c.local)) else {
        warn!(?c.client, "upgrade: a handed-over connection with bad addresses: closed");
        return;
    };
    let Some(pod) = daemon.pod_ctx(&c.pod) else {
        warn!(pod = %c.pod, "upgrade: a connection of a pod this generation does not serve: closed");
        return;
    };
    let std = std::net::TcpStream::from(fd);
    let s = match std
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(std))
    {
        Ok(s) => s,
        Err(e) => {
            warn!("upgrade: a handed-over connection: {e}");
            return;
        }
    };
    let shared = daemon.proxy_shared().clone();
    let dir = if c.inbound {
        crate::conn::Direction::Inbound
    } else {
        crate::conn::Direction::Outbound
    };
    let entry = shared.registry.add(&pod.name, dir, client, orig);
    pod.stats
        .connections_active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ctx = crate::l7::ConnCtx {
        pod: pod.clone(),
        shared: shared.clone(),
        client,
        orig,
        entry: entry.clone(),
        inbound: c.inbound,
        local,
    };
    // From the previous generation's stop to here, the app's next request waited (if it sent one).
    super::record_handover_wait(c.stopped_unix_us);
    match protocol {
        wire::AppProtocol::Http1 => crate::l7::http::serve_handed_over(s, c.read.into(), ctx).await,
        wire::AppProtocol::Bolt => {
            Box::pin(crate::l7::mux::serve_bolt_handed_over(
                s,
                c.read,
                c.stream_offset,
                ctx,
            ))
            .await
        }
        wire::AppProtocol::Dubbo => {
            Box::pin(crate::l7::mux::serve_dubbo_handed_over(
                s,
                c.read,
                c.stream_offset,
                ctx,
            ))
            .await
        }
    }
    pod.stats
        .connections_active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    shared.registry.remove(entry.id);
}

/// Test-only (`SOCKMESH_TEST_HANDOFF_PROTOCOL=N`): announce hand-off protocol N in the
/// `Hello` instead of this binary's, so the tests can run a real successor that the running
/// generation must refuse. Not a configuration knob: nothing but the tests sets it.
fn test_protocol_version() -> Option<u32> {
    let v = std::env::var("SOCKMESH_TEST_HANDOFF_PROTOCOL").ok()?;
    let n = v.parse().ok()?;
    warn!("SOCKMESH_TEST_HANDOFF_PROTOCOL: announcing hand-off protocol {n} (tests only)");
    Some(n)
}

/// Test-only (`SOCKMESH_TEST_UPGRADE_PAUSE=<point>:<dir>`): at `point` of the hand-off
/// (`offer`: descriptors taken, kernel state not yet adopted; `commit`: `Ready` said and
/// `Commit` read, not accepting yet; `started`: `Started` said; `conn`: the first moved
/// HTTP/1.1 connection adopted), write this process's pid to `<dir>/<point>` and wait (at most
/// 60 s) until `<dir>/<point>.go` exists, so that a test can `kill -9` either generation at a
/// known step. Nothing but the tests sets it.
fn test_pause(point: &str) {
    let Ok(v) = std::env::var("SOCKMESH_TEST_UPGRADE_PAUSE") else {
        return;
    };
    let Some((at, dir)) = v.split_once(':') else {
        return;
    };
    if at != point {
        return;
    }
    let dir = Path::new(dir);
    warn!(
        point,
        "SOCKMESH_TEST_UPGRADE_PAUSE: pausing the hand-off (tests only)"
    );
    let _ = std::fs::write(dir.join(point), std::process::id().to_string());
    let go = dir.join(format!("{point}.go"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !go.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How much nicer a successor is while it prepares (loads, adopts, builds its runtimes): its
/// start-up work shares the node's CPUs with the generation that still serves every request,
/// and on a small node it showed up as the slowest requests of the upgrade window.
const PREPARE_NICE: i32 = 10;

/// A successor's preparation runs at a lower CPU priority ([`PREPARE_NICE`] more): called
/// first thing, so that every thread it starts inherits it. Returns the nice value to go
/// back to ([`restore_priority`]), `None` when it could not be changed.
pub fn lower_priority_while_preparing() -> Option<i32> {
    // SAFETY: getpriority/setpriority on the calling thread; errno is cleared first because
    // -1 is a valid nice value.
    unsafe {
        *libc::__errno_location() = 0;
        let old = libc::getpriority(libc::PRIO_PROCESS, 0);
        if old == -1 && *libc::__errno_location() != 0 {
            return None;
        }
        (libc::setpriority(libc::PRIO_PROCESS, 0, (old + PREPARE_NICE).min(19)) == 0).then_some(old)
    }
}

/// Back to `nice` for every thread of the process (on Linux a nice value is per thread),
/// once the successor takes over. Raising the priority again needs CAP_SYS_NICE (the daemon
/// runs as root); a failure is logged and the daemon serves on.
pub fn restore_priority(nice: i32) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let mut failed = 0;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<libc::id_t>().ok()) else {
            continue;
        };
        // SAFETY: setpriority on one of this process's threads.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            failed += 1;
        }
    }
    if failed > 0 {
        warn!(
            threads = failed,
            nice, "upgrade: could not restore the CPU priority of some threads"
        );
    }
}
