//! The HTTP/1.1 upstream client's wire format, without I/O: the response head (`httparse`),
//! how its body is delimited (RFC 9112 §6.3), whether the connection stays open, the chunked
//! decoder and the request head it writes. Depends on `bytes`, `http` and `httparse` only, so
//! the fuzz target `h1_response` includes this file as is.

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// Largest response head (status line, headers, CRLFs) accepted from an upstream; a larger one
/// fails the request (502, `upstream_malformed`). Also bounds one chunk-size line and the
/// trailer section.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in a response head (or trailer section).
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// Bad bytes from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn bad(msg: impl Into<String>) -> WireError {
    WireError(msg.into())
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// `HTTP/1.0` (else 1.1).
    pub http10: bool,
    pub headers: HeaderMap,
}

/// Parse a response head at the start of `buf`: the head and its length, `None` while it is
/// incomplete (and within [`MAX_RESPONSE_HEAD_BYTES`]).
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, WireError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut r = httparse::Response::new(&mut fields);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD_BYTES => {
            return Err(bad(format!("response head over {MAX_RESPONSE_HEAD_BYTES} bytes")))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(format!("malformed response head: {e}"))),
    };
    if n > MAX_RESPONSE_HEAD_BYTES {
        return Err(bad(format!("response head over {MAX_RESPONSE_HEAD_BYTES} bytes")));
    }
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| bad("malformed response head: status code"))?;
    let http10 = r.version == Some(0);
    let headers = header_map(r.headers)?;
    Ok(Some((
        ResponseHead {
            status,
            http10,
            headers,
        },
        n,
    )))
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, WireError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| bad(format!("malformed header name {:?}", f.name)))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| bad(format!("malformed value of header {:?}", f.name)))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (the connection is not reused).
    UntilClose,
}

/// The framing of a response to a `head_request` (or not) with `status` and `headers`.
pub fn response_framing(
    head_request: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, WireError> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The final coding decides; anything but chunked runs until close. A Content-Length
        // alongside is ignored (and the connection is not reused: see `keep_alive`).
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii())
                .ok_or_else(|| bad(format!("malformed content-length {v:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Whether `token` is among the comma-separated values of `name`.
pub fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the upstream keeps the connection open after this response (HTTP/1.1 unless
/// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`; never when both
/// Transfer-Encoding and Content-Length were sent).
pub fn keep_alive(head: &ResponseHead) -> bool {
    let h = &head.headers;
    if has_token(h, header::CONNECTION, "close") {
        return false;
    }
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return false;
    }
    !head.http10 || has_token(h, header::CONNECTION, "keep-alive")
}

/// What the chunked decoder produced.
#[derive(Debug, PartialEq)]
pub enum Chunk {
    Data(Bytes),
    /// The trailer section (only when it has fields).
    Trailers(HeaderMap),
    /// The body is complete (after the last chunk and the trailer section).
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decodes a chunked body (RFC 9112 §7.1) incrementally from a buffer. Chunk extensions are
/// ignored; a size line over [`MAX_RESPONSE_HEAD_BYTES`], a size that is not hex or overflows,
/// a chunk not followed by CRLF and a malformed or oversized trailer section are errors.
#[derive(Debug)]
pub struct ChunkDecoder {
    state: ChunkState,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkDecoder {
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size,
        }
    }

    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The next piece from `buf` (consumed), or `None` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let eol = find_crlf(buf);
                    if eol.unwrap_or(buf.len()) > MAX_RESPONSE_HEAD_BYTES {
                        return Err(bad("chunk size line too long"));
                    }
                    let Some(eol) = eol else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&buf[..eol])?;
                    buf.advance(eol + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    self.state = match left - n as u64 {
                        0 => ChunkState::DataEnd,
                        l => ChunkState::Data(l),
                    };
                    return Ok(Some(Chunk::Data(data)));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Some(Chunk::End));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((n, fields))) => {
                            if n > MAX_RESPONSE_HEAD_BYTES {
                                return Err(bad("trailer section too large"));
                            }
                            let trailers = header_map(fields)?;
                            buf.advance(n);
                            // The End follows on the next call.
                            self.state = ChunkState::Done;
                            return Ok(Some(if trailers.is_empty() {
                                Chunk::End
                            } else {
                                Chunk::Trailers(trailers)
                            }));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD_BYTES => {
                            return Err(bad("trailer section too large"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(e) => return Err(bad(format!("malformed trailer section: {e}"))),
                    }
                }
                ChunkState::Done => return Ok(Some(Chunk::End)),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `1a2b[;ext...]` (optional whitespace before the extensions).
fn parse_chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits_end..];
    let rest_ok = rest.is_empty() || rest.trim_ascii_start().first() == Some(&b';');
    if digits_end == 0 || digits_end > 16 || !rest_ok {
        return Err(bad(format!(
            "bad chunk size line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        )));
    }
    let hex = std::str::from_utf8(&line[..digits_end]).map_err(|_| bad("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))
}

/// Append an origin-form HTTP/1.1 request head to `out`: `method target HTTP/1.1`, the
/// headers as given, then `extra` (framing headers the client adds).
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    extra: &[(&str, &str)],
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in extra {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, usize), WireError> {
        let mut d = ChunkDecoder::new();
        let mut buf = BytesMut::from(input);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match d.decode(&mut buf)? {
                Some(Chunk::Data(b)) => data.extend_from_slice(&b),
                Some(Chunk::Trailers(t)) => trailers = Some(t),
                Some(Chunk::End) => return Ok((data, trailers, buf.len())),
                None => return Err(bad("incomplete")),
            }
        }
    }

    /// Responses captured from real servers (Node.js `http`, Python `http.server`; also the
    /// fuzz target's seeds): head, framing, keep-alive and body as those servers meant them.
    #[test]
    fn responses_captured_from_real_servers_parse() {
        let cases: [(&[u8], u16, Framing, bool, &[u8]); 5] = [
            (
                include_bytes!("../../protocol/testdata/http1_node_chunked_trailers.s2c.bin"),
                200,
                Framing::Chunked,
                true,
                b"hello world",
            ),
            (
                include_bytes!("../../protocol/testdata/http1_node_chunked_json.s2c.bin"),
                200,
                Framing::Chunked,
                true,
                b"{\"ok\":true}",
            ),
            (
                include_bytes!("../../protocol/testdata/http1_node_204.s2c.bin"),
                204,
                Framing::Empty,
                true,
                b"",
            ),
            (
                include_bytes!("../../protocol/testdata/http1_python_length.s2c.bin"),
                200,
                Framing::Length(20),
                true,
                b"content-length body\n",
            ),
            (
                include_bytes!("../../protocol/testdata/http1_python_http10_close.s2c.bin"),
                200,
                Framing::UntilClose,
                false,
                b"until close body from python http.server\n",
            ),
        ];
        for (wire, status, framing, keep, body) in cases {
            let (head, n) = parse_response_head(wire).unwrap().expect("a complete head");
            assert_eq!(head.status.as_u16(), status);
            let f = response_framing(false, head.status, &head.headers).unwrap();
            assert_eq!(f, framing);
            assert_eq!(keep_alive(&head), keep);
            let rest = &wire[n..];
            match f {
                Framing::Chunked => {
                    let (data, trailers, left) = decode_all(rest).unwrap();
                    assert_eq!((data.as_slice(), left), (body, 0));
                    if status == 200 && body == b"hello world" {
                        assert_eq!(trailers.expect("trailers")["x-sum"], "11");
                    }
                }
                _ => assert_eq!(rest, body),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, t, left) =
            decode_all(b"5\r\nhello\r\n6 ;x=y\r\n world\r\n0\r\nx-sum: 9\r\n\r\nEXTRA").unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(t.unwrap()["x-sum"], "9");
        assert_eq!(left, 5, "bytes after the body are left in the buffer");
        let (data, t, _) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!((data.len(), t), (10, None));
        for bad_input in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"5 garbage\r\nhello\r\n",
            b"0\r\nbad header\r\n\r\n",
        ] {
            assert!(decode_all(bad_input).is_err(), "{bad_input:?}");
        }
        // Byte by byte, the same result.
        let input = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkDecoder::new();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for &b in input {
            buf.extend_from_slice(&[b]);
            while let Some(c) = d.decode(&mut buf).unwrap() {
                match c {
                    Chunk::Data(b) => data.extend_from_slice(&b),
                    Chunk::End => break,
                    Chunk::Trailers(_) => unreachable!(),
                }
            }
        }
        assert_eq!((data.as_slice(), d.is_done()), (&b"abc"[..], true));
    }

    #[test]
    fn response_heads_framing_and_keep_alive() {
        let (h, n) = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, n, keep_alive(&h)), (StatusCode::OK, 38, true));
        assert_eq!(
            response_framing(false, h.status, &h.headers),
            Ok(Framing::Length(3))
        );
        assert_eq!(response_framing(true, h.status, &h.headers), Ok(Framing::Empty));
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nA: b\r\n")
            .unwrap()
            .is_none());
        assert!(parse_response_head(b"HTTX/1.1 200 OK\r\n\r\n").is_err());
        let huge = format!(
            "HTTP/1.1 200 OK\r\nx: {}\r\n",
            "a".repeat(MAX_RESPONSE_HEAD_BYTES)
        );
        assert!(parse_response_head(huge.as_bytes()).is_err());
        let (h, _) = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!keep_alive(&h));
        assert_eq!(
            response_framing(false, h.status, &h.headers),
            Ok(Framing::UntilClose)
        );
        let (h, _) = parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(keep_alive(&h));
        let (h, _) = parse_response_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            response_framing(false, h.status, &h.headers),
            Ok(Framing::Chunked)
        );
        assert!(!keep_alive(&h));
        let (h, _) = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(response_framing(false, h.status, &h.headers).is_err());
        let (h, _) = parse_response_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(response_framing(false, h.status, &h.headers), Ok(Framing::Empty));
    }
}
