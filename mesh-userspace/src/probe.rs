//! This process's own health and readiness on a Unix socket (`run --probe-socket PATH`), for
//! the kubelet's exec probes (`sockmesh probe --socket PATH ready|healthz`).
//!
//! The metrics endpoint's `/ready` cannot tell two generations apart: its socket moves to the
//! successor at a hand-off, and on a `hostNetwork` node a DaemonSet's old and new pod would
//! probe the same port. This socket is the process's own (a path in its pod's own `emptyDir`),
//! so each pod's probe reaches its own generation:
//!
//! - `GET /ready`: 200 once this generation serves (pods enrolled, the first discovery done);
//!   503 with the reason otherwise (starting, waiting to take over, taking over, handed over);
//! - `GET /healthz`: 200 while the process runs (and its control runtime ticks); a generation
//!   that handed over stays healthy and not ready.
//!
//! Plain HTTP/1.0 (`curl --unix-socket PATH http://x/ready` works), one request per connection.

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use tracing::{info, warn};

/// Where this process serves its probe (set from `--probe-socket`).
static PATH: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Why this process is not ready whatever else says so (waiting to take over, handed over).
static NOT_READY: Mutex<Option<String>> = Mutex::new(None);
/// Unix ms of the control runtime's last tick (0: no runtime yet, or none any more).
static BEAT: AtomicU64 = AtomicU64::new(0);
/// `/healthz` fails when the control runtime has not ticked for this long.
const STALE: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub fn configure(path: Option<PathBuf>) {
    *PATH.lock().expect("probe path lock") = path;
}

pub fn path() -> Option<PathBuf> {
    PATH.lock().expect("probe path lock").clone()
}

/// Not ready for `reason` until [`clear`].
pub fn set_not_ready(reason: impl Into<String>) {
    *NOT_READY.lock().expect("probe lock") = Some(reason.into());
}

pub fn clear() {
    *NOT_READY.lock().expect("probe lock") = None;
}

/// Called every second by the control runtime: `/healthz` sees it hang.
pub async fn tick() {
    loop {
        BEAT.store(crate::sys::unix_ms(), Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn readiness() -> Result<(), String> {
    if let Some(r) = NOT_READY.lock().expect("probe lock").clone() {
        return Err(r);
    }
    if crate::upgrade::is_draining() {
        return Err(match crate::upgrade::old::successor() {
            Some((g, pid)) => format!("handed over to generation {g} (pid {pid}); draining"),
            None => "handed over to the next generation; draining".into(),
        });
    }
    if !crate::metrics::is_ready() {
        return Err("starting".into());
    }
    Ok(())
}

fn health() -> Result<(), String> {
    let beat = BEAT.load(Relaxed);
    let age = crate::sys::unix_ms().saturating_sub(beat);
    if beat != 0 && age > STALE.as_millis() as u64 {
        return Err(format!("the control runtime has not run for {age} ms"));
    }
    Ok(())
}

/// Serve the configured probe socket (if any) on a thread of its own: it answers while this
/// process waits, serves or stays after a hand-off. A stale file at the path (this pod's
/// previous container) is replaced.
pub fn start() {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(path) = path() else { return };
    if STARTED.swap(true, Relaxed) {
        return;
    }
    if let Err(e) = listen(&path) {
        warn!(path = %path.display(), "the probe socket failed: {e}");
    }
}

fn listen(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    info!(path = %path.display(), "probe socket listening");
    std::thread::Builder::new()
        .name("sockmesh-probe".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let _ = answer(s);
            }
        })?;
    Ok(())
}

fn answer(mut s: UnixStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 2048 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let mut parts = line.split_whitespace();
    let (code, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/ready")) => match readiness() {
            Ok(()) => ("200 OK", "ready\n".to_string()),
            Err(r) => ("503 Service Unavailable", format!("not ready: {r}\n")),
        },
        (Some("GET"), Some("/healthz")) => match health() {
            Ok(()) => ("200 OK", "ok\n".to_string()),
            Err(r) => ("503 Service Unavailable", format!("unhealthy: {r}\n")),
        },
        (Some(_), Some(_)) => ("404 Not Found", "not found\n".to_string()),
        _ => ("400 Bad Request", "bad request\n".to_string()),
    };
    write!(
        s,
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `sockmesh probe --socket PATH ready|healthz`: exit 0 when the process answers 200, 1 (with
/// its answer) otherwise. For the kubelet's exec probes.
pub fn query(path: &Path, what: &str) -> std::process::ExitCode {
    let ask = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        write!(s, "GET /{what} HTTP/1.0\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    };
    match ask() {
        Ok(resp) => {
            let ok = resp.split_whitespace().nth(1) == Some("200");
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(&resp);
            print!("{body}");
            if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            std::process::ExitCode::FAILURE
        }
    }
}
