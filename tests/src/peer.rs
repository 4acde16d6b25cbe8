//! `peer`: a small, real TCP server and client for sockmesh's tests (std only, one thread per
//! connection).
//!
//! ```text
//! peer serve --listen ADDR --mode echo|whoami|sink [--seconds-limit S]
//! peer load --connect ADDR [--connections N] [--sizes LIST] [--seconds-limit S]
//! peer get --connect ADDR [--send TEXT] [--hold-ms MS] [--seconds-limit S]
//! peer interactive --connect ADDR
//! peer conns --connect ADDR [--count N | --seconds S] [--threads T] [--log FILE] [--seconds-limit S]
//! ```
//!
//! `serve` prints `listening <addr>` once bound and `accepted peer=<ip:port> local=<ip:port>` per
//! connection (stdout, flushed). Modes: `whoami` writes `peer=<ip>:<port> local=<ip>:<port>\n` and
//! closes; `echo` echoes until EOF; `sink` reads to EOF, then writes `bytes=<n> fnv1a64=<hex>\n`.
//!
//! `load` opens N concurrent connections to an echo server; connection `i` sends a deterministic
//! pseudo-random payload of `sizes[i % len]` bytes (a writer thread), half-closes, and reads the
//! echo back concurrently, verifying every byte. It prints one JSON summary
//! `{"ok":..,"failed":..,"timed_out":..,"bytes":..,"elapsed_ms":..,"errors":[..]}` and exits 1 on
//! any failure or time-out. Sizes accept `K`, `M`, `KiB`, `MiB` suffixes (powers of 1024).
//!
//! `get` connects, optionally waits `--hold-ms` (so the connection can be seen in `sockmesh
//! status`), sends TEXT if given, half-closes, prints what it receives to stdout and
//! `connected local=.. peer=..` to stderr.
//!
//! `conns` opens many short connections to a `whoami` server from `--threads` threads (default
//! 4), each one after the other: `--count` in all, or for `--seconds`. Per connection it checks
//! that `getpeername()` is the address it dialled, reads the server's `peer=.. local=..` line and
//! counts the server's `local` address (the endpoint that answered) and the `peer` IP the server
//! saw. `--log FILE` writes `<unix µs at connect> <endpoint or FAIL>` per connection. It prints
//! `{"ok":..,"failed":..,"getpeername_mismatch":..,"by_endpoint":{..},"peer_ips":{..},
//! "elapsed_ms":..,"errors":[..]}` and exits 1 on any failure.
//!
//! `interactive` connects, prints `connected local=<a> peer=<b>`, then for each stdin line sends it
//! and prints `echo <line>` once the echo is back; on stdin EOF it half-closes, drains and prints
//! `closed`.
//!
//! Lives in the library so that both the `peer` binary and `sockmesh-demo` (which runs itself as
//! `sockmesh-demo peer ...`, so `cargo xtask demo` needs only that one binary) can run it.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BUF: usize = 256 * 1024;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const MAX_ERRORS_REPORTED: usize = 10;

type Res<T> = Result<T, String>;

/// Runs the peer with `args` (without the program name); returns the exit code.
pub fn run(args: &[String]) -> i32 {
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => usage(),
    };
    let result = parse_opts(rest).and_then(|opts| match cmd {
        "serve" => serve(&opts),
        "load" => load(&opts),
        "get" => get(&opts),
        "interactive" => interactive(&opts),
        "conns" => conns(&opts),
        "-h" | "--help" | "help" => usage(),
        // The abuse tests' clients and server (`crate::abuse`).
        other => crate::abuse::run(other, &opts).unwrap_or_else(|| Err(format!("unknown command {other:?}"))),
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("peer {cmd}: {e}");
            1
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage:\n  peer serve --listen ADDR --mode echo|whoami|sink [--seconds-limit S]\n  \
         peer load --connect ADDR [--connections N] [--sizes 1,1K,64MiB] [--seconds-limit S]\n  \
         peer get --connect ADDR [--send TEXT] [--hold-ms MS] [--seconds-limit S]\n  \
         peer interactive --connect ADDR"
    );
    process::exit(2)
}

fn parse_opts(args: &[String]) -> Res<HashMap<String, String>> {
    let mut m = HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| format!("expected --option, got {k:?}"))?;
        let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        m.insert(key.to_owned(), v.clone());
    }
    Ok(m)
}

fn opt<'a>(opts: &'a HashMap<String, String>, k: &str) -> Res<&'a str> {
    opts.get(k)
        .map(String::as_str)
        .ok_or_else(|| format!("missing --{k}"))
}

fn opt_num(opts: &HashMap<String, String>, k: &str, default: u64) -> Res<u64> {
    match opts.get(k) {
        None => Ok(default),
        Some(v) => parse_size(v).map_err(|e| format!("--{k}: {e}")),
    }
}

fn resolve(addr: &str) -> Res<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {addr:?}"))
}

/// `123`, `4K`, `4KiB`, `16M`, `16MiB`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Res<u64> {
    let s = s.trim();
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mul = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("bad size suffix in {s:?}")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("size overflows: {s:?}"))
}

fn say(line: &str) {
    let stdout = io::stdout();
    let mut l = stdout.lock();
    let _ = writeln!(l, "{line}");
    let _ = l.flush();
}

fn addrs(s: &TcpStream) -> (String, String) {
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    let local = s
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    (peer, local)
}

// ---------------------------------------------------------------------------------------------
// serve

fn serve(opts: &HashMap<String, String>) -> Res<()> {
    let listen = resolve(opt(opts, "listen")?)?;
    let mode = opt(opts, "mode")?.to_owned();
    if !matches!(mode.as_str(), "echo" | "whoami" | "sink") {
        return Err(format!("unknown --mode {mode:?} (echo|whoami|sink)"));
    }
    if let Some(limit) = opts.get("seconds-limit") {
        let secs: u64 = limit
            .parse()
            .map_err(|_| format!("bad --seconds-limit {limit:?}"))?;
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(secs));
            eprintln!("peer serve: --seconds-limit {secs} reached, exiting");
            process::exit(0);
        });
    }
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    say(&format!("listening {bound} mode={mode}"));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("peer serve: accept: {e}");
                continue;
            }
        };
        let (peer, local) = addrs(&stream);
        say(&format!("accepted peer={peer} local={local}"));
        let mode = mode.clone();
        thread::spawn(move || {
            let r = match mode.as_str() {
                "whoami" => serve_whoami(stream, &peer, &local),
                "echo" => serve_echo(stream),
                _ => serve_sink(stream),
            };
            if let Err(e) = r {
                eprintln!("peer serve: {mode} connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

fn serve_whoami(mut s: TcpStream, peer: &str, local: &str) -> io::Result<()> {
    s.write_all(format!("peer={peer} local={local}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    // Drain whatever the client sent so closing does not turn into a RST, but never for long.
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

fn serve_echo(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
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
    let mut buf = vec![0u8; BUF];
    let mut count = 0u64;
    let mut hash = FNV_OFFSET;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        count += n as u64;
        hash = fnv1a64(hash, &buf[..n]);
    }
    s.write_all(format!("bytes={count} fnv1a64={hash:016x}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn fnv1a64(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// load

/// A deterministic byte stream (splitmix64), independent of how it is chunked.
struct Stream {
    state: u64,
    spare: [u8; 8],
    spare_len: usize,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            state: seed,
            spare: [0; 8],
            spare_len: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.spare_len > 0 {
            out[i] = self.spare[8 - self.spare_len];
            self.spare_len -= 1;
            i += 1;
        }
        let rest = &mut out[i..];
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.spare = self.next_u64().to_le_bytes();
            self.spare_len = 8;
            for b in tail.iter_mut() {
                *b = self.spare[8 - self.spare_len];
                self.spare_len -= 1;
            }
        }
    }
}

fn seed_for(conn: u64, size: u64) -> u64 {
    let mut s = Stream::new(conn.wrapping_mul(0x1000_0000_01b3) ^ size.rotate_left(17));
    s.next_u64()
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "seconds limit reached"));
    }
    Ok((deadline - now).max(Duration::from_millis(1)))
}

fn run_conn(i: u64, addr: SocketAddr, size: u64, deadline: Instant) -> Res<u64> {
    let ctx = |what: &str, e: io::Error| format!("conn {i} ({size} bytes): {what}: {e}");
    let s = TcpStream::connect_timeout(&addr, remaining(deadline).map_err(|e| ctx("connect", e))?)
        .map_err(|e| ctx("connect", e))?;
    let left = remaining(deadline).map_err(|e| ctx("setup", e))?;
    s.set_read_timeout(Some(left)).map_err(|e| ctx("setup", e))?;
    s.set_write_timeout(Some(left)).map_err(|e| ctx("setup", e))?;
    let mut w = s.try_clone().map_err(|e| ctx("clone", e))?;
    let seed = seed_for(i, size);
    let writer = thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || -> io::Result<()> {
            let mut gen = Stream::new(seed);
            let mut buf = vec![0u8; BUF.min(size.max(1) as usize)];
            let mut left = size;
            while left > 0 {
                let n = (buf.len() as u64).min(left) as usize;
                gen.fill(&mut buf[..n]);
                w.write_all(&buf[..n])?;
                left -= n as u64;
            }
            w.shutdown(Shutdown::Write)
        })
        .map_err(|e| ctx("spawn writer", e))?;

    let mut r = s;
    let mut expect = Stream::new(seed);
    let mut buf = vec![0u8; BUF];
    let mut want = vec![0u8; BUF];
    let mut got = 0u64;
    let read_result: Res<()> = loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(ctx(&format!("read after {got} bytes"), e)),
        };
        if got + n as u64 > size {
            break Err(format!(
                "conn {i} ({size} bytes): received more than sent ({} bytes)",
                got + n as u64
            ));
        }
        expect.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let off = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            break Err(format!(
                "conn {i} ({size} bytes): corrupt byte at offset {}",
                got + off as u64
            ));
        }
        got += n as u64;
    };
    let write_result = writer.join().map_err(|_| format!("conn {i}: writer panicked"))?;
    read_result?;
    write_result.map_err(|e| ctx("write", e))?;
    if got != size {
        return Err(format!(
            "conn {i} ({size} bytes): EOF after {got} bytes (short echo)"
        ));
    }
    Ok(got)
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn load(opts: &HashMap<String, String>) -> Res<()> {
    let addr = resolve(opt(opts, "connect")?)?;
    let conns = opt_num(opts, "connections", 1)?;
    let limit = opt_num(opts, "seconds-limit", 60)?;
    let sizes: Vec<u64> = opts
        .get("sizes")
        .map(String::as_str)
        .unwrap_or("1000")
        .split(',')
        .map(parse_size)
        .collect::<Res<_>>()?;
    if sizes.is_empty() || conns == 0 {
        return Err("need at least one size and one connection".into());
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(limit);
    let (tx, rx) = mpsc::channel();
    for i in 0..conns {
        let size = sizes[(i % sizes.len() as u64) as usize];
        let tx = tx.clone();
        thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = tx.send(run_conn(i, addr, size, deadline));
            })
            .map_err(|e| format!("spawn connection thread: {e}"))?;
    }
    drop(tx);
    let (mut ok, mut failed, mut bytes) = (0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    while ok + failed < conns {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left + Duration::from_millis(500)) {
            Ok(Ok(b)) => {
                ok += 1;
                bytes += b;
            }
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < MAX_ERRORS_REPORTED {
                    errors.push(e);
                }
            }
            Err(_) => break,
        }
    }
    let timed_out = conns - ok - failed;
    if timed_out > 0 {
        errors.push(format!(
            "{timed_out} connection(s) unfinished after --seconds-limit {limit}"
        ));
    }
    let errs: Vec<String> = errors.iter().map(|e| json_str(e)).collect();
    say(&format!(
        "{{\"ok\":{ok},\"failed\":{failed},\"timed_out\":{timed_out},\"bytes\":{bytes},\
         \"elapsed_ms\":{},\"errors\":[{}]}}",
        start.elapsed().as_millis(),
        errs.join(",")
    ));
    if failed > 0 || timed_out > 0 {
        // Do not wait for stuck threads.
        process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// conns

/// One short connection of `conns`: (endpoint that answered, peer IP it saw, getpeername ok).
fn one_conn(addr: SocketAddr, timeout: Duration) -> Res<(String, String, bool)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let peer_ok = s.peer_addr().map(|p| p == addr).unwrap_or(false);
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    s.read_to_string(&mut line).map_err(|e| format!("read: {e}"))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {k} in {line:?}"))
    };
    let local = field("local=")?;
    let peer = field("peer=")?;
    let peer_ip = peer.rsplit_once(':').map(|(ip, _)| ip.to_owned()).unwrap_or(peer);
    Ok((local, peer_ip, peer_ok))
}

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn conns(opts: &HashMap<String, String>) -> Res<()> {
    let addr = resolve(opt(opts, "connect")?)?;
    let count = opt_num(opts, "count", 0)?;
    let seconds = opt_num(opts, "seconds", 0)?;
    if (count == 0) == (seconds == 0) {
        return Err("give one of --count N or --seconds S".into());
    }
    let threads = opt_num(opts, "threads", 4)?.clamp(1, 64);
    let limit = Duration::from_secs(opt_num(opts, "seconds-limit", 120)?);
    let start = Instant::now();
    let deadline = start + limit;
    let stop_at = (seconds > 0).then(|| start + Duration::from_secs(seconds));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<(u128, Res<(String, String, bool)>)>();
    for _ in 0..threads {
        let (tx, next) = (tx.clone(), next.clone());
        thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || loop {
                let now = Instant::now();
                if now >= deadline || stop_at.is_some_and(|t| now >= t) {
                    break;
                }
                if count > 0 && next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= count {
                    break;
                }
                let at = unix_micros();
                let r = one_conn(addr, Duration::from_secs(5).min(deadline - now));
                if tx.send((at, r)).is_err() {
                    break;
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
    }
    drop(tx);
    let mut log = match opts.get("log") {
        Some(p) => Some(io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("--log {p}: {e}"))?,
        )),
        None => None,
    };
    let (mut ok, mut failed, mut mismatch) = (0u64, 0u64, 0u64);
    let mut by_endpoint: std::collections::BTreeMap<String, u64> = Default::default();
    let mut peer_ips: std::collections::BTreeMap<String, u64> = Default::default();
    let mut errors = Vec::new();
    while let Ok((at, r)) = rx.recv() {
        match r {
            Ok((local, peer_ip, peer_ok)) => {
                ok += 1;
                if !peer_ok {
                    mismatch += 1;
                }
                if let Some(l) = log.as_mut() {
                    let _ = writeln!(l, "{at} {local}");
                }
                *by_endpoint.entry(local).or_default() += 1;
                *peer_ips.entry(peer_ip).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                if let Some(l) = log.as_mut() {
                    let _ = writeln!(l, "{at} FAIL");
                }
                if errors.len() < MAX_ERRORS_REPORTED {
                    errors.push(e);
                }
            }
        }
    }
    if let Some(mut l) = log {
        let _ = l.flush();
    }
    let map = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{}:{v}", json_str(k)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let errs: Vec<String> = errors.iter().map(|e| json_str(e)).collect();
    say(&format!(
        "{{\"ok\":{ok},\"failed\":{failed},\"getpeername_mismatch\":{mismatch},\
         \"by_endpoint\":{{{}}},\"peer_ips\":{{{}}},\"elapsed_ms\":{},\"errors\":[{}]}}",
        map(&by_endpoint),
        map(&peer_ips),
        start.elapsed().as_millis(),
        errs.join(",")
    ));
    if failed > 0 || mismatch > 0 || (count > 0 && ok < count) {
        process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// get / interactive

fn get(opts: &HashMap<String, String>) -> Res<()> {
    let addr = resolve(opt(opts, "connect")?)?;
    let limit = Duration::from_secs(opt_num(opts, "seconds-limit", 20)?);
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let (peer, local) = addrs(&s);
    eprintln!("connected local={local} peer={peer}");
    let hold = opt_num(opts, "hold-ms", 0)?;
    if hold > 0 {
        thread::sleep(Duration::from_millis(hold.min(limit.as_millis() as u64)));
    }
    if let Some(text) = opts.get("send") {
        s.write_all(text.as_bytes()).map_err(|e| format!("write: {e}"))?;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    io::stdout().write_all(&out).map_err(|e| e.to_string())?;
    io::stdout().flush().map_err(|e| e.to_string())
}

fn interactive(opts: &HashMap<String, String>) -> Res<()> {
    let addr = resolve(opt(opts, "connect")?)?;
    let timeout = Duration::from_secs(opt_num(opts, "seconds-limit", 30)?);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let (peer, local) = addrs(&s);
    say(&format!("connected local={local} peer={peer}"));
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let msg = format!("{line}\n");
        s.write_all(msg.as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| format!("read echo: {e}"))?;
        if back != msg.as_bytes() {
            return Err(format!(
                "echo mismatch: sent {msg:?}, got {:?}",
                String::from_utf8_lossy(&back)
            ));
        }
        say(&format!("echo {line}"));
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).map_err(|e| format!("drain: {e}"))?;
    say("closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("12x").is_err());
    }

    #[test]
    fn stream_is_chunking_independent() {
        let mut a = Stream::new(42);
        let mut whole = vec![0u8; 1000];
        a.fill(&mut whole);
        let mut b = Stream::new(42);
        let mut parts = vec![0u8; 1000];
        let mut off = 0;
        for n in [1, 3, 7, 8, 9, 100, 5, 867] {
            b.fill(&mut parts[off..off + n]);
            off += n;
        }
        assert_eq!(off, 1000);
        assert_eq!(whole, parts);
    }

    #[test]
    fn fnv_matches_reference() {
        assert_eq!(fnv1a64(FNV_OFFSET, b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn load_against_local_echo() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || serve_echo(s));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, size) in [1u64, 1000, 65536, 3 << 20].into_iter().enumerate() {
            assert_eq!(run_conn(i as u64, addr, size, deadline).unwrap(), size);
        }
    }
}
