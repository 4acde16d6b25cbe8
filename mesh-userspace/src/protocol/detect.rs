//! Protocol detection from the first bytes a client sends.
//!
//! [`detect`] is a pure function over a prefix; [`peek_detect`] peeks at a socket (without
//! consuming anything) until `detect` can decide, and gives up with [`Detection::Opaque`] on a
//! timeout or EOF, so a protocol where the server speaks first (SMTP, MySQL, ...) waits at most
//! the timeout before it is proxied as opaque TCP. A per-port hint skips detection entirely.

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 prior-knowledge connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/1 request methods recognised, each followed by a space on the wire.
pub const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
/// First byte of a Bolt v1 frame.
pub const BOLT_PROTO_V1: u8 = 0x01;
/// First byte of a Bolt v2 frame.
pub const BOLT_PROTO_V2: u8 = 0x02;
/// Bolt command types: response, request, one-way request.
pub const BOLT_TYPES: [u8; 3] = [0x00, 0x01, 0x02];
/// Bolt command codes: heartbeat, RPC request, RPC response.
pub const BOLT_CMD_CODES: [u16; 3] = [0x0000, 0x0001, 0x0002];
/// Bolt v2 protocol versions (`ver1`): 1 (v1 layout with the v2 header), 2 (CRC capable).
pub const BOLT_V2_VERSIONS: [u8; 2] = [0x01, 0x02];
/// Dubbo 2 magic.
pub const DUBBO_MAGIC: [u8; 2] = [0xda, 0xbb];
/// Bytes `peek_detect` asks for: enough for the longest signature (the h2 preface).
pub const PEEK_BYTES: usize = 64;
/// Default detection timeout.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(300);
/// First and last pause between peeks while a partial signature waits for more bytes.
const PEEK_BACKOFF_MIN: Duration = Duration::from_millis(1);
const PEEK_BACKOFF_MAX: Duration = Duration::from_millis(20);

/// A protocol the proxy can be told to assume for a port (a hint), or that detection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Bolt,
    Dubbo,
    Opaque,
}

/// The outcome of looking at a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detection {
    Http1,
    Http2,
    /// `version` is the Bolt proto byte (1 or 2); `None` when a hint said Bolt without peeking.
    Bolt {
        version: Option<u8>,
    },
    Dubbo,
    Opaque,
    /// The prefix is a proper prefix of some signature: more bytes are needed to decide.
    NeedMore,
}

impl Detection {
    /// The protocol, or `None` for [`Detection::NeedMore`].
    pub fn protocol(self) -> Option<Protocol> {
        match self {
            Self::Http1 => Some(Protocol::Http1),
            Self::Http2 => Some(Protocol::Http2),
            Self::Bolt { .. } => Some(Protocol::Bolt),
            Self::Dubbo => Some(Protocol::Dubbo),
            Self::Opaque => Some(Protocol::Opaque),
            Self::NeedMore => None,
        }
    }
}

impl From<Protocol> for Detection {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Http1 => Self::Http1,
            Protocol::Http2 => Self::Http2,
            Protocol::Bolt => Self::Bolt { version: None },
            Protocol::Dubbo => Self::Dubbo,
            Protocol::Opaque => Self::Opaque,
        }
    }
}

/// How a prefix relates to one signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    Yes,
    Maybe,
    No,
}

impl Match {
    /// Compare `prefix` with a literal: it matches when it starts with the literal, and may
    /// match when it is shorter and agrees so far.
    fn literal(prefix: &[u8], literal: &[u8]) -> Self {
        let n = prefix.len().min(literal.len());
        if prefix[..n] != literal[..n] {
            Self::No
        } else if n == literal.len() {
            Self::Yes
        } else {
            Self::Maybe
        }
    }
}

fn http1(prefix: &[u8]) -> Match {
    let mut best = Match::No;
    for method in HTTP1_METHODS {
        let n = prefix.len().min(method.len() + 1);
        let head = &prefix[..n];
        let m = if head.len() <= method.len() {
            if head == &method[..head.len()] {
                Match::Maybe
            } else {
                Match::No
            }
        } else if &head[..method.len()] == method && head[method.len()] == b' ' {
            Match::Yes
        } else {
            Match::No
        };
        match m {
            Match::Yes => return Match::Yes,
            Match::Maybe => best = Match::Maybe,
            Match::No => {}
        }
    }
    best
}

/// Bolt: proto byte, (v2: a known `ver1`), a known command type, a known command code.
fn bolt(prefix: &[u8]) -> (Match, u8) {
    let Some(&proto) = prefix.first() else {
        return (Match::Maybe, 0);
    };
    let rest = match proto {
        BOLT_PROTO_V1 => &prefix[1..],
        BOLT_PROTO_V2 => match prefix.get(1) {
            None => return (Match::Maybe, proto),
            Some(ver1) if BOLT_V2_VERSIONS.contains(ver1) => &prefix[2..],
            Some(_) => return (Match::No, proto),
        },
        _ => return (Match::No, proto),
    };
    match rest {
        [] => (Match::Maybe, proto),
        [ty, ..] if !BOLT_TYPES.contains(ty) => (Match::No, proto),
        [_] | [_, _] => (Match::Maybe, proto),
        [_, hi, lo, ..] if BOLT_CMD_CODES.contains(&u16::from_be_bytes([*hi, *lo])) => (Match::Yes, proto),
        _ => (Match::No, proto),
    }
}

/// Decide the protocol from the first bytes of a connection.
///
/// Returns [`Detection::NeedMore`] while the prefix (including an empty one) could still become
/// a known signature, and [`Detection::Opaque`] as soon as it cannot.
pub fn detect(prefix: &[u8]) -> Detection {
    if prefix.is_empty() {
        return Detection::NeedMore;
    }
    let mut maybe = false;
    match Match::literal(prefix, H2_PREFACE) {
        Match::Yes => return Detection::Http2,
        Match::Maybe => maybe = true,
        Match::No => {}
    }
    match http1(prefix) {
        Match::Yes => return Detection::Http1,
        Match::Maybe => maybe = true,
        Match::No => {}
    }
    match bolt(prefix) {
        (Match::Yes, version) => {
            return Detection::Bolt {
                version: Some(version),
            }
        }
        (Match::Maybe, _) => maybe = true,
        (Match::No, _) => {}
    }
    match Match::literal(prefix, &DUBBO_MAGIC) {
        Match::Yes => return Detection::Dubbo,
        Match::Maybe => maybe = true,
        Match::No => {}
    }
    if maybe {
        Detection::NeedMore
    } else {
        Detection::Opaque
    }
}

/// Peek at `stream` until [`detect`] decides, without consuming any byte.
///
/// A `hint` (per-port configuration) wins without peeking. Otherwise the result is
/// [`Detection::Opaque`] when the peer sends nothing within `timeout` (a server-speaks-first
/// protocol), closes, the socket fails, or the bytes match no signature. Never returns
/// [`Detection::NeedMore`].
pub async fn peek_detect(stream: &TcpStream, timeout: Duration, hint: Option<Protocol>) -> Detection {
    if let Some(protocol) = hint {
        return protocol.into();
    }
    tokio::time::timeout(timeout, peek_until_decided(stream))
        .await
        .unwrap_or(Detection::Opaque)
}

async fn peek_until_decided(stream: &TcpStream) -> Detection {
    let mut buf = [0u8; PEEK_BYTES];
    let mut backoff = PEEK_BACKOFF_MIN;
    let mut last_len = 0;
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Detection::Opaque,
            Ok(n) => n,
        };
        match detect(&buf[..n]) {
            Detection::NeedMore if n < buf.len() => {
                // `peek` returns at once while any byte is queued: pause before looking again,
                // starting over from the shortest pause whenever new bytes arrived.
                if n != last_len {
                    backoff = PEEK_BACKOFF_MIN;
                    last_len = n;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PEEK_BACKOFF_MAX);
            }
            Detection::NeedMore => return Detection::Opaque,
            decided => return decided,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
    };

    #[test]
    fn empty_prefix_needs_more() {
        assert_eq!(detect(b""), Detection::NeedMore);
    }

    #[test]
    fn http1_methods_followed_by_a_space() {
        for method in HTTP1_METHODS {
            let mut line = method.to_vec();
            line.extend_from_slice(b" /index.html HTTP/1.1\r\n");
            assert_eq!(
                detect(&line),
                Detection::Http1,
                "{}",
                String::from_utf8_lossy(method)
            );
            // Every proper prefix of "METHOD " is undecided.
            for n in 1..=method.len() {
                assert_eq!(detect(&line[..n]), Detection::NeedMore, "{:?}", &line[..n]);
            }
        }
        assert_eq!(detect(b"GETX / HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"GET"), Detection::NeedMore);
        assert_eq!(detect(b"BREW / HTCPCP/1.0\r\n"), Detection::Opaque);
    }

    #[test]
    fn h2_preface() {
        assert_eq!(detect(H2_PREFACE), Detection::Http2);
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&with_settings), Detection::Http2);
        // "P", "PR", ... are undecided (they also start POST/PUT/PATCH until they diverge).
        for n in 1..H2_PREFACE.len() {
            assert_eq!(detect(&H2_PREFACE[..n]), Detection::NeedMore, "{n}");
        }
        assert_eq!(detect(b"PRI * HTTP/1.1\r\n"), Detection::Opaque);
        assert_eq!(detect(b"PUT /x HTTP/1.1\r\n"), Detection::Http1);
    }

    #[test]
    fn bolt_v1_and_v2() {
        // v1 request: proto, type=request, cmdcode=rpc request, ver2.
        assert_eq!(
            detect(&[0x01, 0x01, 0x00, 0x01, 0x01]),
            Detection::Bolt { version: Some(1) }
        );
        // v1 heartbeat.
        assert_eq!(
            detect(&[0x01, 0x01, 0x00, 0x00]),
            Detection::Bolt { version: Some(1) }
        );
        // v2 request, ver1=2.
        assert_eq!(
            detect(&[0x02, 0x02, 0x01, 0x00, 0x01]),
            Detection::Bolt { version: Some(2) }
        );
        assert_eq!(
            detect(&[0x02, 0x01, 0x02, 0x00, 0x01]),
            Detection::Bolt { version: Some(2) }
        );
        // Undecided prefixes.
        assert_eq!(detect(&[0x01]), Detection::NeedMore);
        assert_eq!(detect(&[0x01, 0x01, 0x00]), Detection::NeedMore);
        assert_eq!(detect(&[0x02, 0x02, 0x01, 0x00]), Detection::NeedMore);
        // Bad type, bad command code, bad ver1.
        assert_eq!(detect(&[0x01, 0x07]), Detection::Opaque);
        assert_eq!(detect(&[0x01, 0x01, 0x00, 0x09]), Detection::Opaque);
        assert_eq!(detect(&[0x01, 0x01, 0x01, 0x01]), Detection::Opaque);
        assert_eq!(detect(&[0x02, 0x09]), Detection::Opaque);
    }

    #[test]
    fn captured_client_bytes_are_detected() {
        let v1 = include_bytes!("testdata/bolt_v1.c2s.bin");
        let v2 = include_bytes!("testdata/bolt_v2_crc.c2s.bin");
        let dubbo = include_bytes!("testdata/dubbo.c2s.bin");
        assert_eq!(detect(v1), Detection::Bolt { version: Some(1) });
        assert_eq!(detect(v2), Detection::Bolt { version: Some(2) });
        assert_eq!(detect(dubbo), Detection::Dubbo);
    }

    #[test]
    fn dubbo_magic() {
        assert_eq!(detect(&[0xda, 0xbb, 0xc2, 0x00]), Detection::Dubbo);
        assert_eq!(detect(&[0xda]), Detection::NeedMore);
        assert_eq!(detect(&[0xda, 0xbc]), Detection::Opaque);
    }

    #[test]
    fn anything_else_is_opaque() {
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x02, 0x00]), Detection::Opaque); // TLS hello
        assert_eq!(detect(b"SSH-2.0-OpenSSH_9.2\r\n"), Detection::Opaque);
        assert_eq!(detect(&[0x00]), Detection::Opaque);
    }

    #[test]
    fn hint_maps_to_detection() {
        assert_eq!(Detection::from(Protocol::Bolt), Detection::Bolt { version: None });
        assert_eq!(
            Detection::from(Protocol::Opaque).protocol(),
            Some(Protocol::Opaque)
        );
        assert_eq!(Detection::NeedMore.protocol(), None);
    }

    /// A connected pair on loopback: (client, accepted server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn peek_detect_does_not_consume() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let got = peek_detect(&server, Duration::from_secs(5), None).await;
        assert_eq!(got, Detection::Http1);
        let mut buf = [0u8; 3];
        let n = server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET");
    }

    #[tokio::test]
    async fn peek_detect_waits_for_a_split_signature() {
        let (mut client, server) = pair().await;
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(&H2_PREFACE[5..]).await.unwrap();
            client
        });
        let got = peek_detect(&server, Duration::from_secs(5), None).await;
        assert_eq!(got, Detection::Http2);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn server_speaks_first_times_out_as_opaque() {
        let (_client, server) = pair().await;
        let start = std::time::Instant::now();
        let got = peek_detect(&server, Duration::from_millis(50), None).await;
        assert_eq!(got, Detection::Opaque);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn stalled_partial_signature_times_out_as_opaque() {
        let (mut client, server) = pair().await;
        client.write_all(b"PO").await.unwrap();
        let got = peek_detect(&server, Duration::from_millis(50), None).await;
        assert_eq!(got, Detection::Opaque);
    }

    #[tokio::test]
    async fn eof_is_opaque() {
        let (client, server) = pair().await;
        drop(client);
        let got = peek_detect(&server, Duration::from_secs(5), None).await;
        assert_eq!(got, Detection::Opaque);
    }

    #[tokio::test]
    async fn hint_skips_peeking() {
        let (_client, server) = pair().await;
        let got = peek_detect(&server, Duration::from_secs(5), Some(Protocol::Dubbo)).await;
        assert_eq!(got, Detection::Dubbo);
    }
}
