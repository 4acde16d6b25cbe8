//! The hand-off protocol between generation N (the running daemon) and N+1 (the successor):
//! length-prefixed prost messages on the rendezvous Unix socket, with descriptors riding as
//! `SCM_RIGHTS` ancillary data on the same `sendmsg` as the frame that describes them.
//!
//! Frame: 4-byte big-endian length, then one [`Envelope`]. The first message is always the
//! successor's [`Hello`]; N answers [`Offer`] (with the descriptors) or [`Refuse`].

use std::{
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use prost::Message;

/// The hand-off protocol this binary speaks. A successor that speaks another one is refused
/// before anything moves (Envoy's v1.5→v1.6 hot-restart break is the lesson).
///
/// 2: a moved app connection (`Conn`) says its protocol (`protocol`, `stream_offset`): Bolt and
/// Dubbo connections move too. A version-1 successor would serve them as HTTP/1.1.
///
/// 3: listening addresses are `SO_REUSEPORT` groups: the successor says its worker count
/// (`Hello.workers`), the offer carries every member of each group (`FdInfo.member`), and
/// descriptors beyond one message's [`MAX_FDS`] follow in [`Fds`] frames. A version-2
/// successor takes one socket per address, so it is sent member 0 only and the draining
/// generation closes the others (their queues migrate, see `Daemon::drain_handed_off`).
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest hand-off protocol this binary still speaks, both ways: an upgrade from (or a
/// rollback to) a version-1 binary works, with Bolt and Dubbo connections finishing on the
/// old generation as version 1 did (only version 2 moves them).
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first version whose hand-off moves Bolt and Dubbo connections.
pub const MUX_MOVES_SINCE: u32 = 2;
// Version 1 never moved Bolt/Dubbo connections.
const _: () = assert!(MUX_MOVES_SINCE > MIN_PROTOCOL_VERSION);
/// The first version whose successor takes whole listener groups.
pub const LISTENER_GROUPS_SINCE: u32 = 3;
const _: () = assert!(LISTENER_GROUPS_SINCE > MIN_PROTOCOL_VERSION);

/// Whether this binary speaks the version another generation asked for (then both speak it).
/// A successor newer than this daemon is refused with this daemon's version in the `Refuse`
/// and asks again in it when it still speaks it (see `new::connect`).
pub fn negotiate(theirs: u32) -> Option<u32> {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
        .contains(&theirs)
        .then_some(theirs)
}
/// A frame larger than this is refused (a counter snapshot of 4096 pods is ~300 KiB).
pub const MAX_FRAME: usize = 1 << 20;
/// A frame's payload buffer starts this large and grows with what arrives.
const READ_CHUNK: usize = 64 * 1024;
/// Descriptors one frame may carry (the kernel's limit per `SCM_RIGHTS` message is 253).
pub const MAX_FDS: usize = 253;

#[derive(Clone, PartialEq, Message)]
pub struct Envelope {
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10")]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "1")]
    Hello(Hello),
    #[prost(message, tag = "2")]
    Refuse(Refuse),
    #[prost(message, tag = "3")]
    Offer(Offer),
    #[prost(message, tag = "4")]
    Ready(Ready),
    #[prost(message, tag = "5")]
    Commit(Commit),
    #[prost(message, tag = "6")]
    Started(Started),
    #[prost(message, tag = "7")]
    Snapshot(Snapshot),
    #[prost(message, tag = "8")]
    Abort(Abort),
    #[prost(message, tag = "9")]
    Conn(Conn),
    #[prost(message, tag = "10")]
    Fds(Fds),
}

/// N → N+1 right after an `Offer` whose descriptors do not fit one message (version 3): the
/// next ones, in the order of the offer's `fds`, at most [`MAX_FDS`] per frame.
#[derive(Clone, PartialEq, Message)]
pub struct Fds {
    #[prost(uint32, tag = "1")]
    pub count: u32,
}

/// N → N+1 while N drains: one live app connection, stopped at a request boundary (HTTP/1.1)
/// or a frame boundary (Bolt, Dubbo); its socket rides along as the only descriptor. Or an
/// opaque TCP relay (`opaque`), with two.
#[derive(Clone, PartialEq, Message)]
pub struct Conn {
    #[prost(string, tag = "1")]
    pub pod: String,
    #[prost(bool, tag = "2")]
    pub inbound: bool,
    /// The app's address (outbound) or the remote client's (inbound).
    #[prost(string, tag = "3")]
    pub client: String,
    /// Where the app meant to go (not asked again from the kernel).
    #[prost(string, tag = "4")]
    pub orig: String,
    /// The accepted socket's own address.
    #[prost(string, tag = "5")]
    pub local: String,
    /// Bytes read from the socket but not yet answered (a partial or pipelined request);
    /// opaque TCP: read from the client, not yet written upstream.
    #[prost(bytes = "vec", tag = "6")]
    pub read: Vec<u8>,
    /// An opaque TCP relay: two descriptors (client, upstream); `local` is the upstream target.
    #[prost(bool, tag = "7")]
    pub opaque: bool,
    /// Opaque TCP: read from upstream, not yet written to the client.
    #[prost(bytes = "vec", tag = "8")]
    pub to_client: Vec<u8>,
    /// Opaque TCP: the client half-closed (passed on upstream already).
    #[prost(bool, tag = "9")]
    pub client_eof: bool,
    /// Opaque TCP: the upstream half-closed (passed on to the client already).
    #[prost(bool, tag = "10")]
    pub upstream_eof: bool,
    /// The app protocol the successor serves the connection with (not for `opaque`).
    #[prost(enumeration = "AppProtocol", tag = "11")]
    pub protocol: i32,
    /// Bolt, Dubbo: the stream offset of `read`'s first byte (bytes the app sent before it), so
    /// the successor keeps the offsets the kernel's colour ledger is keyed by.
    #[prost(uint64, tag = "12")]
    pub stream_offset: u64,
    /// When N stopped serving the connection (unix time, microseconds; 0 when unknown, as
    /// from a binary before it was added): the successor measures how long the app's next
    /// request could have waited for the move (`sockmesh_upgrade_handover_wait_seconds`).
    /// Optional: a peer that does not know the field skips it (any protocol version).
    #[prost(uint64, tag = "13")]
    pub stopped_unix_us: u64,
}

/// What a moved app connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AppProtocol {
    Http1 = 0,
    Bolt = 1,
    Dubbo = 2,
}

/// N+1 → N, first: who is asking, and which protocol it speaks.
#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    /// `sockmesh --version` of the successor, for the logs.
    #[prost(string, tag = "3")]
    pub binary_version: String,
    /// Version 3: the successor's proxy workers. N grows each listener group to at least this
    /// many members before the offer (0: unknown, no growth).
    #[prost(uint32, tag = "4")]
    pub workers: u32,
    /// The successor is a `run --take-over` beside N (a DaemonSet's surge pod), not N's own
    /// child: after the drain N stays, serving nothing and not ready, until SIGTERM (its
    /// container's exit would make the kubelet restart it). Older daemons ignore it and exit.
    #[prost(bool, tag = "5")]
    pub take_over: bool,
}

/// N → N+1: no hand-off (wrong protocol, another upgrade in progress, ...). N is untouched.
#[derive(Clone, PartialEq, Message)]
pub struct Refuse {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(uint32, tag = "2")]
    pub protocol_version: u32,
}

/// N → N+1: N's generation and the descriptors it shares, in the order of the ancillary data.
#[derive(Clone, PartialEq, Message)]
pub struct Offer {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    #[prost(message, repeated, tag = "3")]
    pub fds: Vec<FdInfo>,
    #[prost(uint32, tag = "4")]
    pub pid: u32,
}

/// What one passed descriptor is.
#[derive(Clone, PartialEq, Message)]
pub struct FdInfo {
    #[prost(enumeration = "FdKind", tag = "1")]
    pub kind: i32,
    /// Listeners: the pod and the address the socket is bound to.
    #[prost(string, tag = "2")]
    pub pod: String,
    #[prost(string, tag = "3")]
    pub addr: String,
    /// Version 3: the listener's place in its address's `SO_REUSEPORT` group (0: the socket in
    /// the `SM_LISTENERS` slot).
    #[prost(uint32, tag = "4")]
    pub member: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FdKind {
    Unknown = 0,
    /// The `flock`ed lock file: sharing the open file description shares the lock.
    Lock = 1,
    Admin = 2,
    Metrics = 3,
    /// A pod's outbound listener (127.0.0.1/::1:15001 in the pod's netns).
    Outbound = 4,
    /// A pod's inbound listener (the one in the `SM_LISTENERS` slot).
    Inbound = 5,
}

/// N+1 → N: kernel adopted, self-test done, policy loaded; it can take over.
#[derive(Clone, PartialEq, Message)]
pub struct Ready {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// N → N+1: go (start accepting on the shared listeners, serve admin and metrics).
#[derive(Clone, PartialEq, Message)]
pub struct Commit {
    /// The HTTP/1.1 upstream connections N's pools may need at once now, per (pod, endpoint):
    /// the larger of those pooled or busy and the app connections sending there. The
    /// successor opens as many before it says `Started`, so that the connections that move to
    /// it find warm upstreams. Optional (empty from a binary before it was added, and ignored
    /// by one that does not know it): any protocol version.
    #[prost(message, repeated, tag = "1")]
    pub pools: Vec<PoolSize>,
}

/// One (pod, endpoint)'s HTTP/1.1 upstream connections in the running generation.
#[derive(Clone, PartialEq, Message)]
pub struct PoolSize {
    #[prost(string, tag = "1")]
    pub pod: String,
    #[prost(string, tag = "2")]
    pub endpoint: String,
    #[prost(uint32, tag = "3")]
    pub connections: u32,
}

/// N+1 → N: accepting. N stops accepting and drains.
#[derive(Clone, PartialEq, Message)]
pub struct Started {
    #[prost(uint64, tag = "1")]
    pub generation: u64,
}

/// N → N+1 while N drains (and once more, `last`, before it exits): N's counters, which N+1
/// adds to its own.
#[derive(Clone, PartialEq, Message)]
pub struct Snapshot {
    #[prost(message, repeated, tag = "1")]
    pub pods: Vec<PodCounters>,
    #[prost(message, repeated, tag = "2")]
    pub proxy_errors: Vec<Counter>,
    #[prost(message, repeated, tag = "3")]
    pub admin_errors: Vec<Counter>,
    /// Connections N still serves.
    #[prost(uint64, tag = "4")]
    pub connections_left: u64,
    #[prost(bool, tag = "5")]
    pub last: bool,
    /// Per-route request counters (`sockmesh_requests_total` and its family).
    #[prost(message, repeated, tag = "6")]
    pub routes: Vec<RouteCounters>,
    /// Protocol errors, named `protocol/reason`.
    #[prost(message, repeated, tag = "7")]
    pub protocol_errors: Vec<Counter>,
    /// App connections moved into N (and its predecessors) by upgrades, by protocol
    /// (`sockmesh_upgrade_moved_connections_total`).
    #[prost(message, repeated, tag = "8")]
    pub moved: Vec<Counter>,
}

/// One route's counters (service, route, subset), as N has them.
#[derive(Clone, PartialEq, Message)]
pub struct RouteCounters {
    #[prost(string, tag = "1")]
    pub service: String,
    #[prost(string, tag = "2")]
    pub route: String,
    #[prost(string, tag = "3")]
    pub subset: String,
    #[prost(uint64, tag = "4")]
    pub requests: u64,
    #[prost(uint64, tag = "5")]
    pub retries: u64,
    #[prost(message, repeated, tag = "6")]
    pub failures: Vec<Counter>,
    /// Requests per latency bucket (not cumulative).
    #[prost(uint64, repeated, tag = "7")]
    pub buckets: Vec<u64>,
    #[prost(uint64, tag = "8")]
    pub latency_sum_us: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodCounters {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub connections_total: u64,
    #[prost(uint64, tag = "3")]
    pub connections_active: u64,
    #[prost(uint64, tag = "4")]
    pub bytes_upstream: u64,
    #[prost(uint64, tag = "5")]
    pub bytes_downstream: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Counter {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub value: u64,
}

/// Either side: giving up, with why.
#[derive(Clone, PartialEq, Message)]
pub struct Abort {
    #[prost(string, tag = "1")]
    pub reason: String,
}

impl Body {
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::Refuse(_) => "refuse",
            Body::Offer(_) => "offer",
            Body::Ready(_) => "ready",
            Body::Commit(_) => "commit",
            Body::Started(_) => "started",
            Body::Snapshot(_) => "snapshot",
            Body::Abort(_) => "abort",
            Body::Conn(_) => "conn",
            Body::Fds(_) => "fds",
        }
    }
}

/// Encode one frame (length prefix + envelope).
pub fn encode(body: Body) -> Vec<u8> {
    let env = Envelope { body: Some(body) };
    let mut out = Vec::with_capacity(4 + env.encoded_len());
    out.extend_from_slice(&(env.encoded_len() as u32).to_be_bytes());
    env.encode(&mut out).expect("a Vec grows");
    out
}

/// Decode a frame's payload (without the length prefix).
pub fn decode(payload: &[u8]) -> io::Result<Body> {
    let env = Envelope::decode(payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad hand-off message: {e}")))?;
    env.body
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty hand-off message"))
}

/// Send one frame, with `fds` as `SCM_RIGHTS` on its first byte.
pub fn send(s: &UnixStream, body: Body, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one message (at most {MAX_FDS})", fds.len()),
        ));
    }
    let frame = encode(body);
    let mut sent = 0;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(bytes) long, so the first header and its
        // data fit; the iovec points at `frame`, alive for the call.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), bytes);
            libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        sent = n as usize;
    }
    use std::io::Write as _;
    (&*s).write_all(&frame[sent..])
}

/// Send an `Offer` with its descriptors: the first [`MAX_FDS`] on the offer's frame, the rest
/// (version 3 only) in [`Fds`] frames right after it.
pub fn send_offer(s: &UnixStream, offer: Offer, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS && offer.protocol_version < LISTENER_GROUPS_SINCE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors do not fit one message of hand-off protocol {}",
                fds.len(),
                offer.protocol_version
            ),
        ));
    }
    let mut chunks = fds.chunks(MAX_FDS);
    send(s, Body::Offer(offer), chunks.next().unwrap_or(&[]))?;
    for more in chunks {
        send(
            s,
            Body::Fds(Fds {
                count: more.len() as u32,
            }),
            more,
        )?;
    }
    Ok(())
}

/// After an `Offer` that came with `fds`: the descriptors that follow it in [`Fds`] frames
/// (version 3), until there are as many as the offer describes.
pub fn recv_offer_fds(s: &UnixStream, offer: &Offer, mut fds: Vec<OwnedFd>) -> io::Result<Vec<OwnedFd>> {
    while fds.len() < offer.fds.len() && offer.protocol_version >= LISTENER_GROUPS_SINCE {
        match recv(s)? {
            (Body::Fds(f), more) if more.len() == f.count as usize && !more.is_empty() => fds.extend(more),
            (other, more) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "expected the offer's descriptors, got {} with {}",
                        other.name(),
                        more.len()
                    ),
                ))
            }
        }
    }
    Ok(fds)
}

/// Receive one frame and the descriptors that came with it (close-on-exec set).
pub fn recv(s: &UnixStream) -> io::Result<(Body, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let mut fds = Vec::new();
    let mut got = 0;
    // The descriptors travel with the frame's first byte: read the prefix with recvmsg.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    while got < 4 {
        let mut iov = libc::iovec {
            iov_base: len[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: 4 - got,
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: iov and control buffer outlive the call and have the lengths given.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages the kernel wrote, inside msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let n =
                        ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    for i in 0..n {
                        let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors truncated (more than the protocol allows)",
            ));
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other generation closed the hand-off socket",
            ));
        }
        got += n as usize;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hand-off frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    // Grown as bytes arrive, not allocated as the prefix claims: a peer that announces 1 MiB
    // and sends 3 bytes costs 3 bytes.
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK));
    Read::take(s, len as u64).read_to_end(&mut payload)?;
    if payload.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the other generation closed the hand-off socket mid-frame ({} of {len} bytes)",
                payload.len()
            ),
        ));
    }
    Ok((decode(&payload)?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn generations_agree_on_the_lower_protocol_both_ways() {
        // An upgrade from a version-1 daemon, and a rollback to a version-1 binary.
        assert_eq!(negotiate(1), Some(1));
        assert_eq!(negotiate(PROTOCOL_VERSION), Some(PROTOCOL_VERSION));
        // A newer successor is refused (naming ours), and asks again in ours if it can.
        assert_eq!(negotiate(PROTOCOL_VERSION + 1), None);
        assert_eq!(negotiate(0), None);
    }

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let offer = Offer {
            protocol_version: PROTOCOL_VERSION,
            generation: 7,
            pid: 42,
            fds: vec![
                FdInfo {
                    kind: FdKind::Outbound as i32,
                    pod: "web".into(),
                    addr: l1.local_addr().unwrap().to_string(),
                    member: 0,
                },
                FdInfo {
                    kind: FdKind::Inbound as i32,
                    pod: "web".into(),
                    addr: l2.local_addr().unwrap().to_string(),
                    member: 1,
                },
            ],
        };
        send(&a, Body::Offer(offer.clone()), &[l1.as_raw_fd(), l2.as_raw_fd()]).unwrap();
        send(&a, Body::Commit(Commit::default()), &[]).unwrap();
        let (got, fds) = recv(&b).unwrap();
        assert_eq!(got, Body::Offer(offer));
        assert_eq!(fds.len(), 2);
        // The received descriptors are the same listening sockets: a connect to l1's address
        // is accepted through the passed copy.
        let passed = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(passed.local_addr().unwrap(), l1.local_addr().unwrap());
        let _c = std::net::TcpStream::connect(l1.local_addr().unwrap()).unwrap();
        passed.accept().unwrap();
        let (got, fds) = recv(&b).unwrap();
        assert_eq!(got, Body::Commit(Commit::default()));
        assert!(fds.is_empty());
    }

    #[test]
    fn an_offer_of_more_descriptors_than_one_message_takes_follows_in_fds_frames() {
        // 600 listener descriptors: a node of 75 pods with two workers (4 addresses each).
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let raw: Vec<RawFd> = vec![l.as_raw_fd(); 600];
        let info = |i: usize| FdInfo {
            kind: FdKind::Outbound as i32,
            pod: format!("pod{}", i / 4),
            addr: l.local_addr().unwrap().to_string(),
            member: (i % 2) as u32,
        };
        let offer = Offer {
            protocol_version: LISTENER_GROUPS_SINCE,
            generation: 1,
            pid: 1,
            fds: (0..600).map(info).collect(),
        };
        let sender = std::thread::spawn({
            let offer = offer.clone();
            move || send_offer(&a, offer, &raw)
        });
        let (got, fds) = recv(&b).unwrap();
        let Body::Offer(got) = got else {
            panic!("not an offer")
        };
        assert_eq!(got, offer);
        assert_eq!(
            fds.len(),
            MAX_FDS,
            "the offer's own frame carries one message's worth"
        );
        let fds = recv_offer_fds(&b, &got, fds).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(fds.len(), 600);
        // Each is the same listening socket.
        let last = std::net::TcpListener::from(fds.into_iter().last().unwrap());
        assert_eq!(last.local_addr().unwrap(), l.local_addr().unwrap());
        // Version 2 cannot carry them: refused before anything is sent.
        let (a, _b) = UnixStream::pair().unwrap();
        let old = Offer {
            protocol_version: 2,
            ..offer
        };
        let e = send_offer(&a, old, &vec![l.as_raw_fd(); 300]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused_not_trusted() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).unwrap();
        let e = recv(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        let e = recv(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // An empty envelope is not a message either.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[0, 0, 0, 0]).unwrap();
        assert!(recv(&b).is_err());
        // A frame that claims 1 MiB and brings 3 bytes: EOF, not a 1 MiB buffer waiting.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(MAX_FRAME as u32).to_be_bytes()).unwrap();
        (&a).write_all(&[0x0a, 0, 0]).unwrap();
        drop(a);
        let e = recv(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("3 of 1048576 bytes"), "{e}");
        // EOF mid-prefix.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[0, 0]).unwrap();
        drop(a);
        assert_eq!(recv(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever arrives on the rendezvous (a confused or hostile peer), decoding it is an
        /// error or a message, never a panic; a message re-encodes to one that decodes the same.
        #[test]
        fn arbitrary_frames_decode_or_are_refused(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(b) = decode(&payload) {
                let again = encode(b.clone());
                prop_assert_eq!(decode(&again[4..]).unwrap(), b);
            }
        }

        /// A handed-over connection's description survives the wire byte for byte.
        #[test]
        fn conn_messages_round_trip_through_a_socket(
            pod in "[a-z0-9.-]{0,40}",
            read in proptest::collection::vec(any::<u8>(), 0..4096),
            inbound in any::<bool>(),
            protocol in 0i32..3,
            stream_offset in any::<u64>(),
        ) {
            let (a, b) = UnixStream::pair().unwrap();
            let c = Conn {
                pod,
                inbound,
                client: "127.0.0.1:40000".into(),
                orig: "10.96.0.10:8080".into(),
                local: "127.0.0.1:15001".into(),
                to_client: read.iter().rev().copied().collect(),
                read,
                opaque: inbound,
                client_eof: !inbound,
                upstream_eof: false,
                protocol,
                stream_offset,
                stopped_unix_us: stream_offset / 2,
            };
            send(&a, Body::Conn(c.clone()), &[a.as_raw_fd()]).unwrap();
            let (got, fds) = recv(&b).unwrap();
            prop_assert_eq!(got, Body::Conn(c));
            prop_assert_eq!(fds.len(), 1);
        }

        /// Arbitrary bytes on the socket: an error or a message, never a panic or a hang.
        #[test]
        fn arbitrary_bytes_on_the_socket_end_in_a_message_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(&bytes).unwrap();
            drop(a);
            while recv(&b).is_ok() {}
        }
    }

    #[test]
    fn the_pool_sizes_in_commit_and_the_stop_time_in_conn_are_skipped_by_binaries_before_them() {
        // What a binary before the fields decoded: a Commit without fields, a Conn without
        // the stop time. prost skips unknown fields, so either side may be the older one.
        #[derive(Clone, PartialEq, Message)]
        struct OldCommit {}
        #[derive(Clone, PartialEq, Message)]
        struct OldConn {
            #[prost(string, tag = "1")]
            pod: String,
            #[prost(uint64, tag = "12")]
            stream_offset: u64,
        }
        let commit = Commit {
            pools: vec![PoolSize {
                pod: "client".into(),
                endpoint: "10.0.0.2:8080".into(),
                connections: 8,
            }],
        };
        assert_eq!(OldCommit::decode(&*commit.encode_to_vec()).unwrap(), OldCommit {});
        // ... and the other way: an old Commit (empty) is a Commit without pools.
        assert_eq!(
            Commit::decode(&*OldCommit {}.encode_to_vec()).unwrap(),
            Commit::default()
        );
        let conn = Conn {
            pod: "web".into(),
            stream_offset: 9,
            stopped_unix_us: 1_800_000_000_000_000,
            ..Default::default()
        };
        let old = OldConn::decode(&*conn.encode_to_vec()).unwrap();
        assert_eq!((old.pod.as_str(), old.stream_offset), ("web", 9));
        let from_old = Conn::decode(&*old.encode_to_vec()).unwrap();
        assert_eq!(from_old.stopped_unix_us, 0);
        // Both round-trip in the envelope.
        assert_eq!(
            decode(&encode(Body::Commit(commit.clone()))[4..]).unwrap(),
            Body::Commit(commit)
        );
    }

    #[test]
    fn a_moved_connection_says_its_protocol_and_one_from_version_1_is_http1() {
        // Version 1 had no protocol field: such a message decodes as HTTP/1.1 (0), which is why
        // the version went up when Bolt and Dubbo connections started moving.
        let v1 = Conn {
            pod: "web".into(),
            read: b"GET".to_vec(),
            ..Default::default()
        };
        let Body::Conn(got) = decode(&encode(Body::Conn(v1))[4..]).unwrap() else {
            panic!("not a conn");
        };
        assert_eq!(AppProtocol::try_from(got.protocol), Ok(AppProtocol::Http1));
        let bolt = Conn {
            protocol: AppProtocol::Bolt as i32,
            stream_offset: 1 << 40,
            read: vec![1, 0, 1],
            ..Default::default()
        };
        assert_eq!(
            decode(&encode(Body::Conn(bolt.clone()))[4..]).unwrap(),
            Body::Conn(bolt)
        );
        // A protocol this binary does not know is visible as such (the successor refuses it).
        let odd = Conn {
            protocol: 7,
            ..Default::default()
        };
        let Body::Conn(got) = decode(&encode(Body::Conn(odd))[4..]).unwrap() else {
            panic!("not a conn");
        };
        assert!(AppProtocol::try_from(got.protocol).is_err());
    }

    #[test]
    fn a_hello_is_a_few_bytes_a_python_peer_can_write_by_hand() {
        // The tests' fake successors (tests/peers/upgrade_fake.py) hand-encode this.
        let f = encode(Body::Hello(Hello {
            protocol_version: 99,
            pid: 1,
            binary_version: String::new(),
            workers: 0,
            take_over: false,
        }));
        assert_eq!(f, vec![0, 0, 0, 6, 0x0a, 4, 0x08, 99, 0x10, 1]);
    }
}
