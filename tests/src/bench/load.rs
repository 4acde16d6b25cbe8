//! The bench's own servers and load generators. They run as hidden subcommands of the
//! `sockmesh-bench` binary (`__serve`, `__rr`, `__bulk`, `__connrate`, `__http`) re-executed inside a pod's
//! network namespace and cgroup, so the kernel hooks see them exactly as they see an application.
//!
//! Every loop is bounded by a deadline; every socket has read and write time-outs. A generator
//! prints one JSON line ([`LoadResult`]) on stdout and exits 0, or prints the error and exits 1.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Size of every write of the bulk stream.
pub const BULK_WRITE: usize = 64 * 1024;
/// The body size of the HTTP server's response.
pub const HTTP_BODY: usize = 1024;
/// Socket time-out for every blocking call of a generator or server.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Part of each request/response run spent warming up (not recorded), at most [`MAX_WARMUP`].
const WARMUP_FRACTION: f64 = 0.1;
const MAX_WARMUP: Duration = Duration::from_millis(300);
/// The servers' listen backlog (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// What a generator reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadResult {
    /// Requests (or connections) completed in the measured window.
    pub requests: u64,
    /// Requests completed over the whole process lifetime (warm-up included): what the proxy's
    /// CPU time is divided by.
    pub total_requests: u64,
    /// The measured window.
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Bytes sent (bulk only).
    pub bytes: u64,
    /// Bytes the sink counted (bulk only): must equal `bytes`.
    pub server_bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Parses `--key value` pairs.
pub fn opts(args: &[String]) -> Result<std::collections::HashMap<String, String>> {
    let mut m = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| anyhow!("expected --option, got {k:?}"))?;
        let v = it.next().ok_or_else(|| anyhow!("--{key} needs a value"))?;
        m.insert(key.to_owned(), v.clone());
    }
    Ok(m)
}

fn get<T: std::str::FromStr>(m: &std::collections::HashMap<String, String>, k: &str) -> Result<T> {
    let v = m.get(k).ok_or_else(|| anyhow!("missing --{k}"))?;
    v.parse().map_err(|_| anyhow!("bad --{k} {v:?}"))
}

/// Runs a hidden subcommand; `None` when `cmd` is not one.
pub fn dispatch(cmd: &str, args: &[String]) -> Option<Result<()>> {
    let run =
        |f: fn(&std::collections::HashMap<String, String>) -> Result<()>| opts(args).and_then(|o| f(&o));
    Some(match cmd {
        "__serve" => run(serve),
        "__rr" => run(rr),
        "__bulk" => run(bulk),
        "__connrate" => run(connrate),
        "__http" => run(http),
        _ => return None,
    })
}

fn print_result(r: &LoadResult) -> Result<()> {
    let line = serde_json::to_string(r)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn set_timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

// ---------------------------------------------------------------------------------------------
// servers

/// `__serve --bind IP --echo P --http P [--http-routed P] --sink P --accept P --seconds-limit S`:
/// the listeners in one process, a thread per connection (`--http-routed`: a second, identical
/// HTTP server, the port the bench's routing policy claims). Prints `listening` once all are
/// bound.
fn serve(o: &std::collections::HashMap<String, String>) -> Result<()> {
    let bind: String = get(o, "bind")?;
    let limit: u64 = get(o, "seconds-limit")?;
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(limit));
        eprintln!("__serve: --seconds-limit {limit} reached, exiting");
        std::process::exit(0);
    });
    let mut listeners = Vec::new();
    for (kind, f) in [
        ("echo", serve_echo as fn(TcpStream) -> io::Result<()>),
        ("http", serve_http),
        ("sink", serve_sink),
    ] {
        let port: u16 = get(o, kind)?;
        let l = TcpListener::bind((bind.as_str(), port)).with_context(|| format!("bind {bind}:{port}"))?;
        listeners.push((l, Some(f)));
    }
    if o.contains_key("http-routed") {
        let port: u16 = get(o, "http-routed")?;
        let l = TcpListener::bind((bind.as_str(), port)).with_context(|| format!("bind {bind}:{port}"))?;
        listeners.push((l, Some(serve_http as fn(TcpStream) -> io::Result<()>)));
    }
    let port: u16 = get(o, "accept")?;
    let l = TcpListener::bind((bind.as_str(), port)).with_context(|| format!("bind {bind}:{port}"))?;
    listeners.push((l, None));
    for (l, _) in &listeners {
        // std listens with a backlog of 128: a connect loop overflows that whenever the accept
        // thread is descheduled for a few milliseconds, and each overflow costs a 1 s SYN retry.
        // Listening again only raises the backlog.
        // SAFETY: listen(2) on a socket we own.
        if unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error()).context("listen");
        }
    }
    println!("listening {bind}");
    io::stdout().flush()?;
    let mut handles = Vec::new();
    for (l, f) in listeners {
        handles.push(thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(s) = conn else { continue };
                match f {
                    Some(f) => {
                        thread::spawn(move || {
                            let _ = set_timeouts(&s).and_then(|()| f(s));
                        });
                    }
                    // The connect-rate port accepts and resets: a FIN from this side would leave
                    // a time-wait entry that a later SYN from the same port runs into (1 s stall).
                    None => reset_close(s),
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn serve_echo(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    // An idle connection between runs must not time out: only writes are bounded.
    s.set_read_timeout(None)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
    }
    s.shutdown(Shutdown::Write)
}

fn serve_sink(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut count = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => count += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    s.write_all(format!("bytes={count}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)
}

/// HTTP/1.1 keep-alive: every request head (no body) gets a 200 with a 1 KiB body.
fn serve_http(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(None)?;
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {HTTP_BODY}\r\n\r\n"
    )
    .into_bytes();
    resp.extend(std::iter::repeat_n(b'x', HTTP_BODY));
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0usize;
    loop {
        if have == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = match s.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        have += n;
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = find_head_end(&buf[start..have]) {
            out.extend_from_slice(&resp);
            start += end;
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
        buf.copy_within(start..have, 0);
        have -= start;
    }
    Ok(())
}

/// The length of the first complete request head (through `\r\n\r\n`).
pub fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

// ---------------------------------------------------------------------------------------------
// generators

/// `__http --connect ADDR --seconds S`: GET / over one keep-alive connection, one request at a
/// time, for S seconds; every response must be a `200` with the server's [`HTTP_BODY`]-byte
/// body (a response the proxy made itself, e.g. a 502 with `server: sockmesh`, is an error). The
/// probe of the HTTP routing scenarios (wrk cannot run for less than a second).
fn http(o: &std::collections::HashMap<String, String>) -> Result<()> {
    let addr: SocketAddr = get(o, "connect")?;
    let seconds: f64 = get(o, "seconds")?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut hist = histogram();
    let mut r = LoadResult::default();
    let res = (|| -> Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        set_timeouts(&s)?;
        s.set_nodelay(true)?;
        let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sockmesh-bench\r\n\r\n");
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let t0 = Instant::now();
            s.write_all(req.as_bytes())?;
            read_http_response(&mut s, &mut buf)?;
            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
            r.requests += 1;
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    })();
    if let Err(e) = res {
        r.errors += 1;
        r.first_error = Some(format!("{e:#}"));
    }
    r.total_requests = r.requests;
    r.seconds = start.elapsed().as_secs_f64();
    r.p50_us = hist.value_at_quantile(0.5) as f64;
    r.p99_us = hist.value_at_quantile(0.99) as f64;
    r.p999_us = hist.value_at_quantile(0.999) as f64;
    print_result(&r)
}

/// Reads one response (head, then a `Content-Length` body) and checks it is the bench server's
/// `200` with [`HTTP_BODY`] bytes.
fn read_http_response(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut have = 0usize;
    let head_end = loop {
        if let Some(end) = find_head_end(&buf[..have]) {
            break end;
        }
        if have == buf.len() {
            bail!("response head larger than {} bytes", buf.len());
        }
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            bail!("connection closed before a response head");
        }
        have += n;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("status {status}: {}", head.trim());
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow!("no content-length: {}", head.trim()))?;
    if len != HTTP_BODY {
        bail!("content-length {len}, expected {HTTP_BODY}");
    }
    let mut body = have - head_end;
    if body > len {
        bail!("more bytes than one response (one request in flight)");
    }
    while body < len {
        let want = (len - body).min(buf.len());
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            bail!("connection closed in a response body");
        }
        body += n;
    }
    Ok(())
}

/// Closes with RST (SO_LINGER 0): no TIME_WAIT on either side.
fn reset_close(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an fd we own with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s with 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// `__rr --connect ADDR --size N --conns C --seconds S`: C connections, each sending N bytes and
/// reading the N-byte echo back, one request at a time, for S seconds after a short warm-up.
fn rr(o: &std::collections::HashMap<String, String>) -> Result<()> {
    let addr: SocketAddr = get(o, "connect")?;
    let size: usize = get(o, "size")?;
    let conns: usize = get(o, "conns")?;
    let seconds: f64 = get(o, "seconds")?;
    if conns == 0 || size == 0 || !(0.01..=600.0).contains(&seconds) {
        bail!("need --conns >= 1, --size >= 1 and 0.01 <= --seconds <= 600");
    }
    let window = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_secs_f64(seconds * WARMUP_FRACTION).min(MAX_WARMUP);
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut handles = Vec::new();
    for _ in 0..conns {
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || {
            rr_conn(addr, size, warmup, window, &barrier)
        }));
    }
    barrier.wait();
    let mut hist = histogram();
    let mut r = LoadResult {
        seconds,
        ..LoadResult::default()
    };
    for h in handles {
        match h.join() {
            Ok(Ok((hh, total, errs, first))) => {
                r.requests += hh.len();
                r.total_requests += total;
                hist.add(&hh).map_err(|e| anyhow!("merge histograms: {e:?}"))?;
                r.errors += errs;
                if r.first_error.is_none() {
                    r.first_error = first;
                }
            }
            Ok(Err(e)) => {
                r.errors += 1;
                r.first_error.get_or_insert(format!("{e:#}"));
            }
            Err(_) => bail!("a client thread panicked"),
        }
    }
    if !hist.is_empty() {
        r.p50_us = hist.value_at_quantile(0.5) as f64;
        r.p99_us = hist.value_at_quantile(0.99) as f64;
        r.p999_us = hist.value_at_quantile(0.999) as f64;
    }
    print_result(&r)
}

type ConnStats = (Histogram<u64>, u64, u64, Option<String>);

fn rr_conn(
    addr: SocketAddr,
    size: usize,
    warmup: Duration,
    window: Duration,
    barrier: &Barrier,
) -> Result<ConnStats> {
    let connected = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect {addr}"))
        .and_then(|s| {
            set_timeouts(&s)?;
            s.set_nodelay(true)?;
            Ok(s)
        });
    // Everyone starts together, also when this connection failed (the barrier must be passed).
    barrier.wait();
    let mut s = connected?;
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    let mut hist = histogram();
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + window;
    let mut total = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if let Err(e) = s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
            return Ok((hist, total, 1, Some(format!("request {total}: {e}"))));
        }
        total += 1;
        if t0 >= record_from {
            let us = (t0.elapsed().as_nanos() / 1000).max(1) as u64;
            hist.saturating_record(us);
        }
    }
    Ok((hist, total, 0, None))
}

/// `__bulk --connect ADDR --seconds S`: one connection writing 64 KiB chunks for S seconds, then
/// a half-close; the sink's byte count must equal what was written.
fn bulk(o: &std::collections::HashMap<String, String>) -> Result<()> {
    let addr: SocketAddr = get(o, "connect")?;
    let seconds: f64 = get(o, "seconds")?;
    let mut r = LoadResult::default();
    let start = Instant::now();
    let outcome = (|| -> Result<()> {
        let mut s =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
        set_timeouts(&s)?;
        let chunk = vec![0xa5u8; BULK_WRITE];
        let end = start + Duration::from_secs_f64(seconds);
        while Instant::now() < end {
            s.write_all(&chunk)
                .with_context(|| format!("write after {} bytes", r.bytes))?;
            r.bytes += BULK_WRITE as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).context("read the sink's count")?;
        r.server_bytes = reply
            .trim()
            .strip_prefix("bytes=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("bad reply from the sink: {reply:?}"))?;
        if r.server_bytes != r.bytes {
            bail!("sink counted {} bytes, {} were sent", r.server_bytes, r.bytes);
        }
        Ok(())
    })();
    r.seconds = start.elapsed().as_secs_f64();
    r.requests = r.bytes / BULK_WRITE as u64;
    r.total_requests = r.requests;
    if let Err(e) = outcome {
        r.errors = 1;
        r.first_error = Some(format!("{e:#}"));
    }
    print_result(&r)
}

/// `__connrate --connect ADDR --seconds S`: connect, then close with RST (no TIME_WAIT to run
/// out of ports), one at a time, for S seconds.
fn connrate(o: &std::collections::HashMap<String, String>) -> Result<()> {
    let addr: SocketAddr = get(o, "connect")?;
    let seconds: f64 = get(o, "seconds")?;
    let warmup = Duration::from_secs_f64(seconds * WARMUP_FRACTION).min(MAX_WARMUP);
    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + Duration::from_secs_f64(seconds);
    let mut r = LoadResult {
        seconds,
        ..LoadResult::default()
    };
    let mut hist = histogram();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let outcome = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => {
                reset_close(s);
                Ok(())
            }
            // The server accepts and resets at once; a reset (not a refusal) can only come after
            // the handshake completed, so the connection was made.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                r.total_requests += 1;
                if t0 >= record_from {
                    r.requests += 1;
                    hist.saturating_record((t0.elapsed().as_nanos() / 1000).max(1) as u64);
                }
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(format!("connect {addr}: {e}"));
                if r.errors > 100 {
                    break;
                }
            }
        }
    }
    if !hist.is_empty() {
        r.p50_us = hist.value_at_quantile(0.5) as f64;
        r.p99_us = hist.value_at_quantile(0.99) as f64;
        r.p999_us = hist.value_at_quantile(0.999) as f64;
    }
    print_result(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_split() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"), Some(27));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn options_parse() {
        let a: Vec<String> = ["--size", "64", "--conns", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = opts(&a).unwrap();
        assert_eq!(get::<usize>(&o, "size").unwrap(), 64);
        assert!(get::<usize>(&o, "seconds").is_err());
        assert!(opts(&["size".to_string()]).is_err());
    }
}
