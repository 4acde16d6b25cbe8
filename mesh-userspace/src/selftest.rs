//! Startup self-test for the sk_msg short-circuit, on a loopback pair in the daemon's own netns
//! that is put in `SM_SOCKS` by hand. Acceleration stays on only if all of these hold:
//! 1. a small message is redirected (the counter moves) and arrives intact;
//! 2. the reader's epoll sees it readable, and FIONREAD reports its length (the sockmap FIONREAD
//!    change broke both for nginx, Java NIO and others);
//! 3. a fast writer of 64 KiB writes never gets an error (ENOMEM was the failure mode) and every
//!    byte arrives in order, because the flow falls back to TCP; and its half-close arrives as EOF.
//!
//! A separate check, [`blocking_reads`], decides whether acceleration may be on *by default*: a
//! blocking reader on a socket in the map must never get EAGAIN before its time-out. This kernel
//! (6.18.44) fails it: a client that sends, half-closes and blocks in `read()` for the answer gets
//! EAGAIN at the moment the answer is redirected into its socket, with 0 bytes read, whether or
//! not a stream-verdict program is on the map. The return comes from `tcp_bpf_recvmsg_parser()`
//! / `tcp_bpf_recvmsg()` (net/ipv4/tcp_bpf.c): after one `tcp_msg_wait_data()` wake-up (a single
//! `sk_wait_event()`) that does not end in a copy they return -EAGAIN, where
//! `tcp_recvmsg_locked()` would wait again until its time-out. Non-blocking readers (epoll,
//! asyncio, tokio, nginx, Node) never notice: EAGAIN is what they expect, and they retry.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use mesh_common::{flow::ConnTuple, stats::reason};

use crate::{ebpf::Kernel, sys};

const SMALL: &[u8] = b"sockmesh self-test: small message";
const BULK_WRITE: usize = 64 * 1024;
const BULK_TOTAL: usize = 32 * 1024 * 1024;
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The blocking-reader check: upload sizes (one redirected, one that falls back to TCP), the
/// server's think time after the half-close (longer than a delayed ACK, so the ACK of the FIN
/// reaches the waiting reader), the reader's time-out (an EAGAIN well before it is the kernel
/// bug), and how many rounds to try.
const BLOCKING_UPLOADS: [usize; 2] = [1000, 100 * 1024];
const BLOCKING_THINK: Duration = Duration::from_millis(150);
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(4);
const BLOCKING_TRIES: usize = 2;

/// Run the test; `Ok(summary)` or `Err(what failed)`.
pub fn run(kernel: &mut Kernel) -> Result<String, String> {
    with_pair(kernel, checks)
}

/// A loopback pair (client, server), both in `SM_SOCKS` while `f` runs.
fn with_pair(
    kernel: &mut Kernel,
    f: impl FnOnce(&Kernel, TcpStream, TcpStream) -> Result<String, String>,
) -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let client = TcpStream::connect(l.local_addr().unwrap()).map_err(|e| format!("connect: {e}"))?;
    let (server, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    let cookie = sys::netns_cookie(client.as_raw_fd()).map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    let key = |s: &TcpStream| -> Result<ConnTuple, String> {
        let local: SocketAddr = s.local_addr().map_err(|e| e.to_string())?;
        let peer: SocketAddr = s.peer_addr().map_err(|e| e.to_string())?;
        Ok(ConnTuple::from_addrs(cookie, local, peer))
    };
    let (ck, sk) = (key(&client)?, key(&server)?);
    kernel.sockhash_insert(ck, &client).map_err(|e| e.to_string())?;
    kernel.sockhash_insert(sk, &server).map_err(|e| e.to_string())?;
    let result = f(kernel, client, server);
    kernel.sockhash_remove(&ck);
    kernel.sockhash_remove(&sk);
    result
}

/// Whether a blocking reader on a socket in the map can get EAGAIN before its time-out (see the
/// module docs): `Ok(summary)` when it never did in [`BLOCKING_TRIES`] tries, `Err(what happened)`
/// at the first premature EAGAIN. A thread-per-connection app that uploads, half-closes and waits
/// for the answer does exactly this, and would see `read()` fail.
pub fn blocking_reads(kernel: &mut Kernel) -> Result<String, String> {
    for attempt in 0..BLOCKING_TRIES {
        for size in BLOCKING_UPLOADS {
            with_pair(kernel, |_, c, s| blocking_read_once(c, s, size))
                .map_err(|e| format!("try {} ({size}-byte upload): {e}", attempt + 1))?;
        }
    }
    Ok(format!(
        "blocking readers: no early EAGAIN in {} upload/half-close/wait exchanges",
        BLOCKING_TRIES * BLOCKING_UPLOADS.len()
    ))
}

/// The client uploads `size` bytes, half-closes and blocks in `read()`; the server reads to EOF,
/// thinks for [`BLOCKING_THINK`] (the ACK of the client's FIN arrives meanwhile), then answers.
fn blocking_read_once(mut client: TcpStream, mut server: TcpStream, size: usize) -> Result<String, String> {
    let drainer = std::thread::spawn(move || -> Result<(), String> {
        server.set_read_timeout(Some(STEP_TIMEOUT)).ok();
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        loop {
            let n = server.read(&mut buf).map_err(|e| format!("drain read: {e}"))?;
            if n == 0 {
                break;
            }
            seen += n;
        }
        if seen != size {
            return Err(format!("drained {seen} of {size} bytes"));
        }
        std::thread::sleep(BLOCKING_THINK);
        server
            .write_all(b"done")
            .map_err(|e| format!("answer write: {e}"))?;
        server.shutdown(std::net::Shutdown::Write).ok();
        Ok(())
    });
    client.set_read_timeout(Some(BLOCKING_TIMEOUT)).ok();
    client.set_write_timeout(Some(STEP_TIMEOUT)).ok();
    let chunk = vec![0x5au8; BULK_WRITE];
    let mut sent = 0usize;
    while sent < size {
        let n = (size - sent).min(BULK_WRITE);
        client
            .write_all(&chunk[..n])
            .map_err(|e| format!("upload write failed after {sent} bytes: {e}"))?;
        sent += n;
    }
    client.shutdown(std::net::Shutdown::Write).ok();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let waited = Instant::now();
    let outcome = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let drained = drainer.join().map_err(|_| "drainer panicked".to_string());
    match outcome {
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock)
                && waited.elapsed() < BLOCKING_TIMEOUT - Duration::from_millis(500) =>
        {
            return Err(format!(
                "a blocking read() returned EAGAIN after {} ms ({} bytes of the answer read), \
                 before its {} s time-out",
                waited.elapsed().as_millis(),
                got.len(),
                BLOCKING_TIMEOUT.as_secs()
            ))
        }
        Err(e) => return Err(format!("answer read: {e}")),
        Ok(()) => {}
    }
    drained??;
    if got != b"done" {
        return Err(format!("answer was {:?}", String::from_utf8_lossy(&got)));
    }
    Ok(String::new())
}

fn checks(kernel: &Kernel, mut client: TcpStream, mut server: TcpStream) -> Result<String, String> {
    // 1 + 2: a small message, watched through epoll and FIONREAD.
    let redirected_before = kernel.counter(reason::MSG_REDIRECTED);
    let ep = Epoll::new(&server).map_err(|e| format!("epoll: {e}"))?;
    client
        .write_all(SMALL)
        .map_err(|e| format!("small write failed: {e}"))?;
    if !ep
        .wait_readable(STEP_TIMEOUT)
        .map_err(|e| format!("epoll_wait: {e}"))?
    {
        return Err("epoll never reported the redirected message readable".into());
    }
    let pending = fionread(&server).map_err(|e| format!("FIONREAD: {e}"))?;
    if pending != SMALL.len() {
        return Err(format!(
            "FIONREAD reported {pending} bytes, {} were queued",
            SMALL.len()
        ));
    }
    let mut got = vec![0u8; SMALL.len()];
    server.set_read_timeout(Some(STEP_TIMEOUT)).ok();
    server
        .read_exact(&mut got)
        .map_err(|e| format!("small read: {e}"))?;
    if got != SMALL {
        return Err("the small message arrived corrupted".into());
    }
    if kernel.counter(reason::MSG_REDIRECTED) <= redirected_before {
        return Err("the small message was not redirected (sk_msg did not run)".into());
    }
    // 3: a fast 64 KiB writer against a slower reader.
    let reader = std::thread::spawn(move || -> Result<usize, String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut seen = 0usize;
        let start = Instant::now();
        while seen < BULK_TOTAL {
            if start.elapsed() > STEP_TIMEOUT * 4 {
                return Err(format!("bulk read stalled at {seen} bytes"));
            }
            let n = server.read(&mut buf).map_err(|e| format!("bulk read: {e}"))?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern(seen + i) {
                    return Err(format!("bulk byte {} out of order", seen + i));
                }
            }
            seen += n;
        }
        // The writer half-closes after the stream: the reader must see EOF, not hang.
        server.set_read_timeout(Some(STEP_TIMEOUT)).ok();
        match server.read(&mut buf) {
            Ok(0) => Ok(seen),
            Ok(n) => Err(format!("{n} bytes past the end of the bulk stream")),
            Err(e) => Err(format!("no EOF after the half-close of a fallen-back flow: {e}")),
        }
    });
    let mut chunk = vec![0u8; BULK_WRITE];
    let mut sent = 0usize;
    while sent < BULK_TOTAL {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = pattern(sent + i);
        }
        client
            .write_all(&chunk)
            .map_err(|e| format!("bulk write failed after {sent} bytes: {e}"))?;
        sent += BULK_WRITE;
    }
    client.shutdown(std::net::Shutdown::Write).ok();
    let seen = reader.join().map_err(|_| "bulk reader panicked".to_string())??;
    if seen != BULK_TOTAL {
        return Err(format!("bulk stream delivered {seen} of {BULK_TOTAL} bytes"));
    }
    Ok(format!(
        "self-test passed: redirect, epoll, FIONREAD, and a {} MiB stream of 64 KiB writes",
        BULK_TOTAL >> 20
    ))
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn fionread(s: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

struct Epoll(libc::c_int);

impl Epoll {
    fn new(s: &TcpStream) -> std::io::Result<Self> {
        // SAFETY: plain epoll syscalls on fds we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ep = Epoll(fd);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 1,
        };
        if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ep)
    }

    fn wait_readable(&self, t: Duration) -> std::io::Result<bool> {
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        let n = unsafe { libc::epoll_wait(self.0, ev.as_mut_ptr(), 1, t.as_millis() as i32) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n == 1 && ev[0].events & libc::EPOLLIN as u32 != 0)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}
