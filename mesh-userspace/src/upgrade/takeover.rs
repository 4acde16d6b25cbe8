//! `sockmesh run --take-over`: a plain `run` started beside a running daemon (a DaemonSet's
//! `maxSurge` pod) takes the node over by itself, with the same hand-off as `run --upgrade`;
//! with no live daemon it starts fresh. It never takes over from a newer daemon unless asked
//! (`--take-over=any`): a restarted container of the old image would otherwise take the node
//! back. Meanwhile it waits, not ready, and retries; it does not exit (the kubelet would only
//! restart it). The generation that handed over to it stays, not ready, until SIGTERM
//! ([`idle`]).

use std::{
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tracing::{info, warn};

use super::{new::Inherited, wire, LockInfo};

/// From which running daemons `run --take-over` takes the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One of an older or the same version (hand-off protocol, then binary version).
    Older,
    /// Any (a rollback to an older image, asked for explicitly).
    Any,
}

/// How often a waiting `run --take-over` looks again.
const RETRY: Duration = Duration::from_secs(2);

/// This binary's version as the hand-off sees it (the lock file, `Hello`).
///
/// Test-only: `SOCKMESH_TEST_BINARY_VERSION` replaces it, so the tests can run an "older"
/// binary against a newer one; nothing but the tests sets it.
pub fn binary_version() -> String {
    match std::env::var("SOCKMESH_TEST_BINARY_VERSION") {
        Ok(v) if !v.is_empty() => v,
        _ => env!("CARGO_PKG_VERSION").into(),
    }
}

/// `MAJOR.MINOR.PATCH` of a version string (a `-pre` or `+build` suffix is ignored).
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    let v = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(v)
}

/// Why the daemon the lock names is newer than `ours` (protocol `our_protocol`, binary
/// `ours`): a higher hand-off protocol, or the same one and a higher binary version. `None`
/// when it is older or the same (a lock file without a binary version predates this check,
/// so it is older).
pub fn newer_than(info: &LockInfo, our_protocol: u32, ours: &str) -> Option<String> {
    if info.protocol_version != our_protocol {
        return (info.protocol_version > our_protocol).then(|| {
            format!(
                "it speaks hand-off protocol {}, this binary {our_protocol}",
                info.protocol_version
            )
        });
    }
    match (parse_version(&info.binary_version), parse_version(ours)) {
        (Some(theirs), Some(mine)) if theirs > mine => {
            Some(format!("it is sockmesh {}, this is {ours}", info.binary_version))
        }
        _ => None,
    }
}

/// What `run --take-over` found.
pub enum Start {
    /// No daemon held the lock: start fresh with it.
    Fresh(std::fs::File),
    /// Took the running generation's offer.
    TakeOver(Inherited),
    /// SIGTERM or SIGINT while waiting: exit.
    Stop,
}

/// Block SIGTERM and SIGINT in this (the main) thread before any other thread starts: a
/// waiting `run --take-over` takes them with [`wait_signal`]. Threads started meanwhile
/// inherit the mask; the daemon's runtime installs its handlers after [`unblock_signals`].
pub fn block_signals() {
    set_signal_mask(libc::SIG_BLOCK);
}

pub fn unblock_signals() {
    set_signal_mask(libc::SIG_UNBLOCK);
}

fn term_signals() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

fn set_signal_mask(how: libc::c_int) {
    let set = term_signals();
    // SAFETY: changes this thread's signal mask only.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
}

/// Waits up to `timeout` (forever with `None`) for a blocked SIGTERM or SIGINT; true if one came.
fn wait_signal(timeout: Option<Duration>) -> bool {
    let set = term_signals();
    loop {
        let r = match timeout {
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                };
                // SAFETY: waits for a signal of `set`, which this thread blocks.
                unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) }
            }
            // SAFETY: as above, without a time-out.
            None => unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) },
        };
        if r > 0 {
            return true;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Take the node: the lock when it is free (no daemon runs), else the running generation's
/// hand-off unless it is newer (with [`Mode::Older`]). Waits and retries, not ready, for as long
/// as it takes; `prepare_nice` gets the priority to go back to once it takes over.
pub fn acquire(
    state_file: &Path,
    mode: Mode,
    workers: usize,
    prepare_nice: &mut Option<i32>,
) -> anyhow::Result<Start> {
    let lock_path = super::lock_path(state_file);
    let ours = binary_version();
    let mut last = String::new();
    // Logged when it changes; always what the probe says.
    let mut say = |why: String, warn: bool| {
        if why != last {
            if warn {
                warn!("--take-over: {why}");
            } else {
                info!("--take-over: {why}");
            }
            last = why.clone();
        }
        crate::probe::set_not_ready(why);
    };
    loop {
        match crate::sys::lock_file(&lock_path) {
            Ok(f) => {
                info!(
                    "--take-over: no daemon runs ({} was free): starting fresh",
                    lock_path.display()
                );
                return Ok(Start::Fresh(f));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).with_context(|| format!("failed to open {}", lock_path.display())),
        }
        match super::read_lock_info(state_file) {
            None => say(
                format!(
                    "{} is held but names no daemon yet (one is starting): waiting",
                    lock_path.display()
                ),
                false,
            ),
            Some(info) => {
                let newer = newer_than(&info, wire::PROTOCOL_VERSION, &ours);
                match newer {
                    Some(why) if mode == Mode::Older => say(
                        format!(
                            "not taking over from generation {} (pid {}), which is newer ({why}): \
                             a `run` never takes over from a newer daemon unless asked (`--take-over=any`, \
                             or `run --upgrade`); not ready, looking again every {}s",
                            info.generation,
                            info.pid,
                            RETRY.as_secs()
                        ),
                        true,
                    ),
                    _ => {
                        say(
                            format!(
                                "taking over from generation {} (pid {}, sockmesh {}, hand-off protocol {})",
                                info.generation,
                                info.pid,
                                if info.binary_version.is_empty() {
                                    "unknown"
                                } else {
                                    &info.binary_version
                                },
                                info.protocol_version
                            ),
                            false,
                        );
                        if prepare_nice.is_none() {
                            *prepare_nice = super::new::lower_priority_while_preparing();
                        }
                        match super::new::connect(state_file, workers, true) {
                            Ok(i) => return Ok(Start::TakeOver(i)),
                            Err(e) => say(
                                format!(
                                    "taking over from generation {} (pid {}) failed: {e:#}; trying again every {}s",
                                    info.generation,
                                    info.pid,
                                    RETRY.as_secs()
                                ),
                                true,
                            ),
                        }
                    }
                }
            }
        }
        if wait_signal(Some(RETRY)) {
            info!("--take-over: stopping while waiting (SIGTERM/SIGINT); nothing was taken");
            return Ok(Start::Stop);
        }
    }
}

/// After handing over to a `run --take-over` and draining: become [`idle`] in place (same pid,
/// so the container stays up and the kubelet restarts nothing) by executing this binary
/// again. The exec closes every descriptor of the daemon (the lock, the listeners, admin,
/// metrics, the kernel objects: all pinned, none detached), so nothing of the successor's stays
/// held. SIGTERM and SIGINT stay blocked across it and wait for the idle process.
pub fn become_idle(reason: &str) -> anyhow::Error {
    block_signals();
    // SAFETY: marks descriptors 3.. close-on-exec (CLOSE_RANGE_CLOEXEC, Linux 5.11+).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) };
    if r != 0 {
        return anyhow::anyhow!("close_range: {}", std::io::Error::last_os_error());
    }
    let exe = std::ffi::CString::new("/proc/self/exe").expect("no nul");
    let mut args: Vec<std::ffi::CString> = vec![
        std::ffi::CString::new("sockmesh").expect("no nul"),
        std::ffi::CString::new("handed-over").expect("no nul"),
        std::ffi::CString::new("--reason").expect("no nul"),
        std::ffi::CString::new(reason.replace('\0', "")).expect("no nul"),
    ];
    if let Some(p) = crate::probe::path() {
        args.push(std::ffi::CString::new("--probe-socket").expect("no nul"));
        args.push(std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default());
    }
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a NULL-terminated argv that outlive the call; the
    // environment is this process's.
    unsafe { libc::execv(exe.as_ptr(), argv.as_ptr()) };
    anyhow::anyhow!(
        "exec {}: {}",
        exe.to_string_lossy(),
        std::io::Error::last_os_error()
    )
}

/// `sockmesh handed-over` (internal, see [`become_idle`]): the generation that handed the node
/// to a `run --take-over` stays alive so its container is not restarted (a restarted `run`
/// would try to take the node back). It serves nothing, holds nothing, answers its probe
/// (`/ready` 503 with `reason`, `/healthz` 200), and exits 0 at SIGTERM or SIGINT without
/// touching anything (the successor's state is the successor's).
pub fn idle(probe: Option<PathBuf>, reason: &str) -> std::process::ExitCode {
    block_signals();
    crate::probe::configure(probe);
    crate::probe::set_not_ready(reason);
    crate::probe::start();
    info!("{reason}");
    wait_signal(None);
    info!("handed over: exiting at SIGTERM; nothing detached or unpinned (the successor serves)");
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(protocol: u32, version: &str) -> LockInfo {
        LockInfo {
            pid: 1,
            generation: 3,
            rendezvous: PathBuf::from("/run/sockmesh/state.upgrade.3.sock"),
            protocol_version: protocol,
            binary_version: version.into(),
        }
    }

    #[test]
    fn newer_is_the_protocol_first_then_the_binary_version() {
        assert_eq!(newer_than(&lock(2, "0.1.0"), 2, "0.1.0"), None, "the same");
        assert_eq!(newer_than(&lock(2, "0.1.0"), 2, "0.2.0"), None, "older binary");
        assert_eq!(newer_than(&lock(1, "9.0.0"), 2, "0.1.0"), None, "older protocol");
        assert!(newer_than(&lock(3, "0.0.1"), 2, "0.1.0")
            .unwrap()
            .contains("protocol 3"));
        let why = newer_than(&lock(2, "0.10.0"), 2, "0.9.3").expect("0.10 is newer than 0.9");
        assert!(why.contains("0.10.0"), "{why}");
        assert!(newer_than(&lock(2, "1.0.0-rc1"), 2, "0.9.0").is_some());
        // A lock file of a binary before the check has no version: older.
        assert_eq!(newer_than(&lock(2, ""), 2, "0.1.0"), None);
        assert_eq!(newer_than(&lock(2, "garbage"), 2, "0.1.0"), None);
    }

    #[test]
    fn lock_files_without_a_binary_version_still_parse() {
        let old = r#"{"pid":7,"generation":2,"rendezvous":"/x.sock","protocol_version":2}"#;
        let info: LockInfo = serde_json::from_str(old).unwrap();
        assert_eq!(info.binary_version, "");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("0.1.0"), Some((0, 1, 0)));
        assert_eq!(parse_version("1.2.3-beta.1"), Some((1, 2, 3)));
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.3.4"), None);
    }
}
