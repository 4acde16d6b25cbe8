//! Abusive and measuring clients for the abuse tests (`tests/tests/abuse.rs`), run as `peer`
//! subcommands inside pods (std only, like the rest of `peer`), plus the test-side helpers: the
//! servers they talk to and readers of a process's memory, descriptors and CPU in `/proc`.
//!
//! ```text
//! peer http-serve --listen ADDR
//! peer rate --connect ADDR --rps N --seconds S
//! peer slowloris --connect ADDR --conns N --seconds S [--interval-ms I]
//! peer hold --connect ADDR --conns N --seconds S [--proto http|echo|none]
//! ```
//!
//! `http-serve`: a keep-alive HTTP/1.1 server (a thread per connection) answering every request
//! `200 ok`; prints `listening <addr>`.
//!
//! `rate`: HTTP/1.1 GETs at a constant rate over one keep-alive connection, open loop: request
//! `i` is due at `start + i / rps` and its latency counts from then, so a stall delays every
//! request behind it and shows in the percentiles (no coordinated omission). A failed request
//! is counted and the connection reopened. Prints one JSON line
//! `{"sent","ok","failed","p50_us","p90_us","p99_us","max_us","errors"}`.
//!
//! `slowloris`: keeps `--conns` connections each trickling one byte of a request head that
//! never ends every `--interval-ms` (default 500); a connection the server closes is counted
//! (`closed`, and `got_408` when it answered 408 first) and reopened. Prints
//! `{"opened","closed","got_408","resets","open_at_end"}` after `--seconds`.
//!
//! `hold`: opens `--conns` connections one after the other; with `--proto http` each makes one
//! keep-alive request first, with `echo` one 5-byte round trip; then holds them all idle.
//! Prints `held <ok> failed <n>` once they are open, and after `--seconds` or EOF on stdin
//! closes them and prints `{"held","failed","closed_while_held","errors"}`.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

type Res<T> = std::result::Result<T, String>;

/// The `peer` subcommands of this module; `None` when `cmd` is not one of them.
pub fn run(cmd: &str, opts: &HashMap<String, String>) -> Option<Res<()>> {
    Some(match cmd {
        "http-serve" => http_serve(opts),
        "rate" => rate(opts),
        "slowloris" => slowloris(opts),
        "hold" => hold(opts),
        _ => return None,
    })
}

fn opt<'a>(opts: &'a HashMap<String, String>, k: &str) -> Res<&'a str> {
    opts.get(k)
        .map(String::as_str)
        .ok_or_else(|| format!("missing --{k}"))
}

fn num(opts: &HashMap<String, String>, k: &str, default: Option<u64>) -> Res<u64> {
    match (opts.get(k), default) {
        (Some(v), _) => v.parse().map_err(|_| format!("--{k}: not a number: {v:?}")),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(format!("missing --{k}")),
    }
}

fn addr(opts: &HashMap<String, String>, k: &str) -> Res<SocketAddr> {
    let a = opt(opts, k)?;
    a.to_socket_addrs()
        .map_err(|e| format!("bad address {a:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {a:?}"))
}

fn say(line: &str) {
    let mut o = io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().take(10).map(|s| json_str(s)).collect();
    format!("[{}]", items.join(","))
}

/// Raise this process's open-files soft limit to its hard limit (holding 10,000 sockets).
pub fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

const REQUEST: &[u8] = b"GET /abuse HTTP/1.1\r\nHost: abuse.test\r\n\r\n";

/// Reads one HTTP/1.1 response (head and a `content-length` body) from `s`, keeping what
/// follows in `buf`. Returns the status code.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other(format!("bad status line: {head:?}")))?;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// http-serve

fn http_serve(opts: &HashMap<String, String>) -> Res<()> {
    let listen = addr(opts, "listen")?;
    let l = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    say(&format!(
        "listening {}",
        l.local_addr().map_err(|e| e.to_string())?
    ));
    for c in l.incoming() {
        let Ok(s) = c else { continue };
        thread::spawn(move || {
            let _ = serve_http_conn(s);
        });
    }
    Ok(())
}

fn serve_http_conn(s: TcpStream) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut len = 0usize;
        let mut close = false;
        let mut first = true;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            } else if l.starts_with("connection:") && l.contains("close") {
                close = true;
            }
        }
        io::copy(&mut (&mut r).take(len as u64), &mut io::sink())?;
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")?;
        if close {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rate

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn rate(opts: &HashMap<String, String>) -> Res<()> {
    let target = addr(opts, "connect")?;
    let rps = num(opts, "rps", None)?.max(1);
    let secs = num(opts, "seconds", None)?;
    let total = rps * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rps);
    let timeout = Duration::from_secs(5);
    let mut lat: Vec<u64> = Vec::with_capacity(total as usize);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval * i as u32;
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            thread::sleep(w);
        }
        let r = (|| -> io::Result<u16> {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&target, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                s.set_nodelay(true)?;
                conn = Some((s, Vec::new()));
            }
            let (s, buf) = conn.as_mut().expect("connected above");
            s.write_all(REQUEST)?;
            read_response(s, buf)
        })();
        match r {
            Ok(200) => {
                ok += 1;
                lat.push(due.elapsed().as_micros() as u64);
            }
            Ok(st) => {
                failed += 1;
                errors.push(format!("request {i}: status {st}"));
                conn = None;
            }
            Err(e) => {
                failed += 1;
                errors.push(format!("request {i}: {e}"));
                conn = None;
            }
        }
    }
    lat.sort_unstable();
    say(&format!(
        "{{\"sent\":{total},\"ok\":{ok},\"failed\":{failed},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{},\"errors\":{}}}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        json_list(&errors)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// slowloris

fn slowloris(opts: &HashMap<String, String>) -> Res<()> {
    raise_own_nofile();
    let target = addr(opts, "connect")?;
    let n = num(opts, "conns", None)? as usize;
    let secs = num(opts, "seconds", None)?;
    let interval = Duration::from_millis(num(opts, "interval-ms", Some(500))?);
    let deadline = Instant::now() + Duration::from_secs(secs);
    // A head that never ends: one more header byte per tick.
    let trickle: &[u8] = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let (mut opened, mut closed, mut got_408, mut resets) = (0u64, 0u64, 0u64, 0u64);
    let mut slots: Vec<Option<(TcpStream, usize)>> = (0..n).map(|_| None).collect();
    while Instant::now() < deadline {
        let tick = Instant::now();
        for slot in slots.iter_mut() {
            if Instant::now() >= deadline {
                break;
            }
            match slot {
                None => {
                    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
                        continue;
                    };
                    if s.write_all(b"GET /slow HTTP/1.1\r\nHost: abuse.test\r\n")
                        .is_err()
                        || s.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    opened += 1;
                    *slot = Some((s, 0));
                }
                Some((s, pos)) => {
                    let mut b = [0u8; 256];
                    match s.read(&mut b) {
                        Ok(0) => {
                            closed += 1;
                            *slot = None;
                        }
                        Ok(k) => {
                            if b[..k].starts_with(b"HTTP/1.1 408") {
                                got_408 += 1;
                            }
                            closed += 1;
                            *slot = None;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let byte = [trickle[*pos % trickle.len()]];
                            *pos += 1;
                            if s.write(&byte).is_err() {
                                resets += 1;
                                *slot = None;
                            }
                        }
                        Err(_) => {
                            resets += 1;
                            *slot = None;
                        }
                    }
                }
            }
        }
        if let Some(w) = interval.checked_sub(tick.elapsed()) {
            thread::sleep(w.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
    let open = slots.iter().filter(|s| s.is_some()).count();
    say(&format!(
        "{{\"opened\":{opened},\"closed\":{closed},\"got_408\":{got_408},\"resets\":{resets},\"open_at_end\":{open}}}"
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hold

fn hold(opts: &HashMap<String, String>) -> Res<()> {
    raise_own_nofile();
    let target = addr(opts, "connect")?;
    let n = num(opts, "conns", None)? as usize;
    let secs = num(opts, "seconds", None)?;
    let proto = opts.get("proto").map(String::as_str).unwrap_or("none");
    if !matches!(proto, "http" | "echo" | "none") {
        return Err(format!("unknown --proto {proto:?} (http|echo|none)"));
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let timeout = Duration::from_secs(5);
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    let mut failed = 0u64;
    let mut errors = Vec::new();
    for i in 0..n {
        if Instant::now() >= deadline {
            errors.push(format!("time up after {i} connections"));
            break;
        }
        let r = (|| -> io::Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&target, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            match proto {
                "http" => {
                    s.write_all(REQUEST)?;
                    let st = read_response(&mut s, &mut Vec::new())?;
                    if st != 200 {
                        return Err(io::Error::other(format!("status {st}")));
                    }
                }
                "echo" => {
                    s.write_all(b"ping\n")?;
                    let mut b = [0u8; 5];
                    s.read_exact(&mut b)?;
                }
                _ => {}
            }
            Ok(s)
        })();
        match r {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                errors.push(format!("connection {i}: {e}"));
            }
        }
    }
    say(&format!("held {} failed {failed}", held.len()));
    // Hold until the deadline or EOF on stdin.
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let mut closed_while_held = 0u64;
    for s in &held {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 64];
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => closed_while_held += 1,
        }
    }
    let count = held.len();
    drop(held);
    say(&format!(
        "{{\"held\":{count},\"failed\":{failed},\"closed_while_held\":{closed_while_held},\"errors\":{}}}",
        json_list(&errors)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Test side

/// A python asyncio echo server (one thread, any number of connections) on `port` in `pod`:
/// the far end of 10,000 relayed connections, which a thread-per-connection server would not
/// hold well.
pub fn async_echo_server(pod: &crate::Pod, port: u16) -> Result<crate::Server> {
    const SRC: &str = r#"
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b:
                break
            w.write(b)
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=4096)
    print("listening", sys.argv[1], sys.argv[2], flush=True)
    await s.serve_forever()
asyncio.run(main())
"#;
    let mut cmd = std::process::Command::new(crate::python());
    cmd.arg("-c")
        .arg(SRC)
        .args([pod.ip.to_string(), port.to_string()]);
    crate::Server::start(&pod.cgroup, Some(&pod.netns), cmd)
}

/// `peer http-serve` on `pod`'s address.
pub fn http_server(pod: &crate::Pod, port: u16) -> Result<crate::Server> {
    let mut cmd = crate::peer_command();
    cmd.args(["http-serve", "--listen", &pod.addr(port)]);
    crate::Server::start(&pod.cgroup, Some(&pod.netns), cmd)
}

/// What `peer rate` measured.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Runs `peer rate` in `pod` against `target` for `seconds` at `rps` (bounded: it ends on its
/// own, and is killed after twice its time plus 20 s).
pub fn measure_rate(pod: &crate::Pod, target: &str, rps: u64, seconds: u64) -> Result<Latency> {
    let mut cmd = crate::peer_command();
    cmd.args([
        "rate",
        "--connect",
        target,
        "--rps",
        &rps.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    let out = crate::exec_in(
        &pod.cgroup,
        Some(&pod.netns),
        cmd,
        Duration::from_secs(2 * seconds + 20),
    )?;
    let v = crate::last_json("peer rate", &out);
    let g = |k: &str| v[k].as_u64().ok_or_else(|| anyhow!("peer rate: no {k} in {v}"));
    if g("failed")? > 0 {
        eprintln!("peer rate errors: {}", v["errors"]);
    }
    Ok(Latency {
        sent: g("sent")?,
        ok: g("ok")?,
        failed: g("failed")?,
        p50_us: g("p50_us")?,
        p99_us: g("p99_us")?,
        max_us: g("max_us")?,
    })
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    crate::util::status_field(&text, key)
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// `RssAnon` (the heap and stacks, without mapped files) of `pid` in KiB.
pub fn rss_anon_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "RssAnon:")
}

/// Open descriptors of `pid`.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list /proc/{pid}/fd"))?
        .count())
}

/// CPU time (user + system) of `pid` so far, in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// This process's open-files limits `(soft, hard)`.
pub fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}
