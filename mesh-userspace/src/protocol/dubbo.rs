//! Dubbo 2 frames (the `dubbo://` exchange protocol) and the request body fields routing needs.
//!
//! ```text
//!  0      1      2      3      4 ...                   11  12 ... 15  16 ...
//!  +------+------+------+------+-------------------------+-----------+---------
//!  | 0xda | 0xbb | flag |status|  request id (u64, BE)   | body len  | body
//!  +------+------+------+------+-------------------------+-----------+---------
//!  flag: 0x80 request, 0x40 two-way, 0x20 event, low 5 bits serialization id (2 = hessian2)
//! ```
//!
//! A request body (Hessian2) is: dubbo version, service path, service version, method name,
//! parameter types descriptor (all strings), one value per parameter, then the attachments map.
//! [`decode_request_body`] reads the strings and the attachments and steps over the arguments;
//! [`add_attachment`] re-emits a body with one more attachment, leaving every other byte as it
//! was.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

use super::hessian2::{self, count_descriptor_args, is_string_tag, tag, Hessian2Error, Reader};

pub const MAGIC: [u8; 2] = [0xda, 0xbb];
pub const HEADER_LEN: usize = 16;
pub const FLAG_REQUEST: u8 = 0x80;
pub const FLAG_TWO_WAY: u8 = 0x40;
pub const FLAG_EVENT: u8 = 0x20;
pub const SERIALIZATION_MASK: u8 = 0x1f;
/// Serialization id of Hessian2, the default.
pub const SERIALIZATION_HESSIAN2: u8 = 2;
/// Dubbo's default payload limit (`payload`, 8 MiB).
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;

/// Response status codes (`org.apache.dubbo.remoting.exchange.Response`).
pub mod status {
    pub const OK: u8 = 20;
    pub const CLIENT_TIMEOUT: u8 = 30;
    pub const SERVER_TIMEOUT: u8 = 31;
    pub const BAD_REQUEST: u8 = 40;
    pub const BAD_RESPONSE: u8 = 50;
    pub const SERVICE_NOT_FOUND: u8 = 60;
    pub const SERVICE_ERROR: u8 = 70;
    pub const SERVER_ERROR: u8 = 80;
    pub const CLIENT_ERROR: u8 = 90;
    pub const SERVER_THREADPOOL_EXHAUSTED: u8 = 100;
}

/// Attachment keys the request body carries outside the map (Dubbo adds them when decoding).
pub mod attachment {
    pub const DUBBO_VERSION: &str = "dubbo";
    pub const PATH: &str = "path";
    pub const VERSION: &str = "version";
    pub const GROUP: &str = "group";
}

/// Bad Dubbo framing.
#[derive(Debug, Error)]
pub enum DubboError {
    #[error("bad dubbo magic {found:02x?}")]
    BadMagic { found: [u8; 2] },
    #[error("dubbo body of {len} bytes exceeds the limit of {max} (request id {request_id})")]
    FrameTooLarge { len: u64, max: usize, request_id: u64 },
    #[error("dubbo frame truncated: {have} bytes buffered at end of stream")]
    Truncated { have: usize },
    #[error("dubbo io error")]
    Io(#[from] std::io::Error),
}

impl DubboError {
    /// A short, stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadMagic { .. } => "dubbo_bad_magic",
            Self::FrameTooLarge { .. } => "dubbo_frame_too_large",
            Self::Truncated { .. } => "dubbo_truncated",
            Self::Io(_) => "dubbo_io",
        }
    }

    /// The request id, when the header was read: the peer can then get an error response.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::FrameTooLarge { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }
}

/// One Dubbo frame. The encoded form is a function of these fields, so
/// `encode(decode(bytes)) == bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DubboFrame {
    pub flag: u8,
    pub status: u8,
    pub request_id: u64,
    pub body: Bytes,
}

impl DubboFrame {
    pub fn is_request(&self) -> bool {
        self.flag & FLAG_REQUEST != 0
    }

    pub fn is_two_way(&self) -> bool {
        self.flag & FLAG_TWO_WAY != 0
    }

    /// Heartbeats and other events.
    pub fn is_event(&self) -> bool {
        self.flag & FLAG_EVENT != 0
    }

    pub fn serialization_id(&self) -> u8 {
        self.flag & SERIALIZATION_MASK
    }

    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Limits the decoder enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DubboLimits {
    pub max_body: usize,
}

impl Default for DubboLimits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// `tokio_util` codec for Dubbo frames.
#[derive(Clone, Debug, Default)]
pub struct DubboCodec {
    limits: DubboLimits,
}

impl DubboCodec {
    pub fn new(limits: DubboLimits) -> Self {
        Self { limits }
    }
}

impl Decoder for DubboCodec {
    type Item = DubboFrame;
    type Error = DubboError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<DubboFrame>, DubboError> {
        // Check the magic as soon as its bytes are there, so garbage fails fast.
        let have = src.len().min(MAGIC.len());
        if src[..have] != MAGIC[..have] {
            let mut found = [0; 2];
            found[..have].copy_from_slice(&src[..have]);
            return Err(DubboError::BadMagic { found });
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let request_id = u64::from_be_bytes(src[4..12].try_into().expect("8 bytes"));
        // Java reads the length as an int: a negative one is as bad as a huge one.
        let len = i32::from_be_bytes(src[12..16].try_into().expect("4 bytes"));
        let body_len = match usize::try_from(len) {
            Ok(n) if n <= self.limits.max_body => n,
            _ => {
                return Err(DubboError::FrameTooLarge {
                    len: u64::from(len as u32),
                    max: self.limits.max_body,
                    request_id,
                })
            }
        };
        if src.len() < HEADER_LEN + body_len {
            src.reserve(HEADER_LEN + body_len - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(HEADER_LEN + body_len);
        frame.advance(2);
        let flag = frame.get_u8();
        let status = frame.get_u8();
        frame.advance(12);
        Ok(Some(DubboFrame {
            flag,
            status,
            request_id,
            body: frame.freeze(),
        }))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<DubboFrame>, DubboError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(DubboError::Truncated { have: buf.len() }),
        }
    }
}

impl Encoder<DubboFrame> for DubboCodec {
    type Error = DubboError;

    fn encode(&mut self, frame: DubboFrame, dst: &mut BytesMut) -> Result<(), DubboError> {
        let len = frame.body.len();
        if len > self.limits.max_body || i32::try_from(len).is_err() {
            return Err(DubboError::FrameTooLarge {
                len: len as u64,
                max: self.limits.max_body,
                request_id: frame.request_id,
            });
        }
        dst.reserve(frame.encoded_len());
        dst.put_slice(&MAGIC);
        dst.put_u8(frame.flag);
        dst.put_u8(frame.status);
        dst.put_u64(frame.request_id);
        dst.put_u32(len as u32);
        dst.put_slice(&frame.body);
        Ok(())
    }
}

/// An error response for `request_id`: Hessian2 serialization, `status` (not [`status::OK`]),
/// and the message as the body, the way a Dubbo provider reports a failure.
pub fn error_response(request_id: u64, status: u8, message: &str) -> DubboFrame {
    let mut body = Vec::with_capacity(message.len() + 3);
    hessian2::write_string(&mut body, message);
    DubboFrame {
        flag: SERIALIZATION_HESSIAN2,
        status,
        request_id,
        body: body.into(),
    }
}

/// Where one attachment sits in the body.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EntrySpan {
    key: Range<usize>,
    value: Range<usize>,
    /// The key, when it is a string.
    key_str: Option<String>,
    value_is_string: bool,
}

/// Where the attachments map sits in the body.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MapSpan {
    /// The map tag and, for a typed map, its type.
    head: Range<usize>,
    entries: Vec<EntrySpan>,
    /// Through the `Z` end marker.
    whole: Range<usize>,
}

/// The routing-relevant fields of a Dubbo request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub dubbo_version: String,
    pub service_path: String,
    pub service_version: String,
    pub method: String,
    /// Java descriptor of the parameter types, e.g. `Ljava/lang/String;I`.
    pub param_types: String,
    /// Number of arguments (from the descriptor).
    pub arg_count: usize,
    /// Byte range of the arguments in the body.
    pub args: Range<usize>,
    /// String-valued attachments in wire order (entries with other values are stepped over).
    pub attachments: Vec<(String, String)>,
    map: Option<MapSpan>,
}

impl Invocation {
    /// The value of attachment `key` (the last one, as a Java `HashMap` would keep).
    pub fn attachment(&self, key: &str) -> Option<&str> {
        self.attachments
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Decode the routing fields of a Hessian2 request body.
pub fn decode_request_body(body: &[u8]) -> Result<Invocation, Hessian2Error> {
    let mut r = Reader::new(body);
    let dubbo_version = r.read_string()?;
    let service_path = r.read_string()?;
    let service_version = r.read_nullable_string()?.unwrap_or_default();
    let method = r.read_string()?;
    let param_types = r.read_nullable_string()?.unwrap_or_default();
    let arg_count = count_descriptor_args(&param_types)?;
    let args_start = r.position();
    for _ in 0..arg_count {
        r.skip_value()?;
    }
    let args = args_start..r.position();
    let mut attachments = Vec::new();
    let map = if r.is_at_end() {
        None
    } else {
        Some(read_attachments(&mut r, &mut attachments)?)
    };
    Ok(Invocation {
        dubbo_version,
        service_path,
        service_version,
        method,
        param_types,
        arg_count,
        args,
        attachments,
        map,
    })
}

fn read_attachments(r: &mut Reader<'_>, out: &mut Vec<(String, String)>) -> Result<MapSpan, Hessian2Error> {
    let start = r.position();
    r.read_map_start()?;
    let head = start..r.position();
    let mut entries = Vec::new();
    while !r.read_end()? {
        let key_start = r.position();
        let key = if is_string_tag(r.peek()?) {
            Some(r.read_string()?)
        } else {
            r.skip_value()?;
            None
        };
        let value_start = r.position();
        let value = if is_string_tag(r.peek()?) {
            Some(r.read_string()?)
        } else {
            r.skip_value()?;
            None
        };
        let value_is_string = value.is_some();
        if let (Some(k), Some(v)) = (&key, value) {
            out.push((k.clone(), v));
        }
        entries.push(EntrySpan {
            key: key_start..value_start,
            value: value_start..r.position(),
            key_str: key,
            value_is_string,
        });
    }
    Ok(MapSpan {
        head,
        entries,
        whole: start..r.position(),
    })
}

/// A copy of `body` whose attachments carry `key = value`.
///
/// A new key is appended to the map, leaving every other byte unchanged. String values of an
/// existing key are replaced in place. An existing key with a non-string value keeps it (the
/// value may define classes or be the target of references that later bytes use), and the new
/// entry is appended after it: the last entry wins when Java or [`Invocation::attachment`]
/// reads the map. A body without an attachments map gets one.
pub fn add_attachment(body: &[u8], key: &str, value: &str) -> Result<Vec<u8>, Hessian2Error> {
    let inv = decode_request_body(body)?;
    let mut out = Vec::with_capacity(body.len() + key.len() + value.len() + 8);
    let Some(map) = &inv.map else {
        out.extend_from_slice(body);
        out.push(tag::UNTYPED_MAP);
        hessian2::write_string(&mut out, key);
        hessian2::write_string(&mut out, value);
        out.push(tag::END);
        return Ok(out);
    };
    let mut replaced = false;
    let mut kept_other = false;
    out.extend_from_slice(&body[..map.head.end]);
    for entry in &map.entries {
        out.extend_from_slice(&body[entry.key.clone()]);
        let matches = entry.key_str.as_deref() == Some(key);
        if matches && entry.value_is_string {
            hessian2::write_string(&mut out, value);
            replaced = true;
        } else {
            kept_other |= matches;
            out.extend_from_slice(&body[entry.value.clone()]);
        }
    }
    if !replaced || kept_other {
        hessian2::write_string(&mut out, key);
        hessian2::write_string(&mut out, value);
    }
    out.push(tag::END);
    out.extend_from_slice(&body[map.whole.end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C2S: &[u8] = include_bytes!("testdata/dubbo.c2s.bin");
    const S2C: &[u8] = include_bytes!("testdata/dubbo.s2c.bin");

    fn decode_all(bytes: &[u8]) -> Vec<DubboFrame> {
        let mut codec = DubboCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode_eof(&mut buf).unwrap() {
            frames.push(frame);
        }
        assert!(buf.is_empty());
        frames
    }

    fn encode_all(frames: &[DubboFrame]) -> Vec<u8> {
        let mut codec = DubboCodec::default();
        let mut out = BytesMut::new();
        for frame in frames {
            codec.encode(frame.clone(), &mut out).unwrap();
        }
        out.to_vec()
    }

    #[test]
    fn captured_requests_decode_and_reencode_byte_exact() {
        let frames = decode_all(C2S);
        assert_eq!(frames.len(), 2);
        for f in &frames {
            assert!(f.is_request() && f.is_two_way() && !f.is_event());
            assert_eq!(f.serialization_id(), SERIALIZATION_HESSIAN2);
            assert_eq!(f.status, 0);
        }
        // The body alone is kept as a seed for the hessian2 fuzz target.
        assert_eq!(
            &frames[0].body[..],
            include_bytes!("testdata/dubbo_echo.body.bin")
        );
        assert_eq!(frames[0].request_id, 4);
        assert_eq!(frames[1].request_id, 5);
        assert_eq!(encode_all(&frames), C2S);

        let echo = decode_request_body(&frames[0].body).unwrap();
        assert_eq!(echo.dubbo_version, "5.3.0");
        assert_eq!(echo.service_path, "com.sockmesh.test.EchoService");
        assert_eq!(echo.service_version, "1.0");
        assert_eq!(echo.method, "echo");
        assert_eq!(echo.arg_count, 12);
        assert!(echo
            .param_types
            .starts_with("Ljava/lang/String;IJDZLjava/lang/Object;[B"));
        assert_eq!(echo.attachment("x-mesh-colour"), Some("blue"));
        assert_eq!(echo.attachment("tenant"), Some("acme"));
        assert_eq!(
            echo.attachment(attachment::PATH),
            Some("com.sockmesh.test.EchoService")
        );
        assert_eq!(echo.attachment(attachment::VERSION), Some("1.0"));
        assert_eq!(echo.attachment(attachment::GROUP), Some("SOFA"));
        assert_eq!(echo.attachments.len(), 6);
        // The map is the last thing in the body.
        assert_eq!(echo.map.as_ref().unwrap().whole.end, frames[0].body.len());

        let fail = decode_request_body(&frames[1].body).unwrap();
        assert_eq!(fail.method, "fail");
        assert_eq!(fail.arg_count, 1);
        assert_eq!(fail.attachment("x-mesh-colour"), None);
    }

    #[test]
    fn captured_responses_decode_and_reencode_byte_exact() {
        let frames = decode_all(S2C);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| !f.is_request()));
        assert_eq!((frames[0].request_id, frames[0].status), (4, status::OK));
        // The provider's failure, as dubbo-remoting reports it: SERVER_ERROR and a message.
        assert_eq!(
            (frames[1].request_id, frames[1].status),
            (5, status::SERVER_ERROR)
        );
        assert_eq!(Reader::new(&frames[1].body).read_string().unwrap(), "boom");
        assert_eq!(encode_all(&frames), S2C);
    }

    #[test]
    fn error_response_matches_the_real_server_encoding() {
        let real = &decode_all(S2C)[1];
        let ours = error_response(5, status::SERVER_ERROR, "boom");
        assert_eq!(encode_all(&[ours]), encode_all(std::slice::from_ref(real)));
    }

    #[test]
    fn add_attachment_appends_and_keeps_everything_else() {
        let frame = &decode_all(C2S)[0];
        let body = add_attachment(&frame.body, "x-mesh-route", "canary").unwrap();
        let inv = decode_request_body(&body).unwrap();
        assert_eq!(inv.attachment("x-mesh-route"), Some("canary"));
        assert_eq!(inv.attachment("x-mesh-colour"), Some("blue"));
        assert_eq!(inv.attachments.len(), 7);
        // Only the map grew: the bytes before its end marker are untouched.
        let old_end = frame.body.len() - 1;
        assert_eq!(&body[..old_end], &frame.body[..old_end]);
        assert_eq!(&body[old_end..], b"\x0cx-mesh-route\x06canaryZ");

        // The frame re-encodes with the new length.
        let bigger = DubboFrame {
            body: body.clone().into(),
            ..frame.clone()
        };
        let bytes = encode_all(&[bigger]);
        assert_eq!(
            u32::from_be_bytes(bytes[12..16].try_into().unwrap()) as usize,
            body.len()
        );
    }

    #[test]
    fn add_attachment_replaces_an_existing_key() {
        let frame = &decode_all(C2S)[0];
        let body = add_attachment(&frame.body, "x-mesh-colour", "green").unwrap();
        let inv = decode_request_body(&body).unwrap();
        assert_eq!(inv.attachment("x-mesh-colour"), Some("green"));
        assert_eq!(inv.attachments.len(), 6);
        assert_eq!(body.len(), frame.body.len() + 1);
    }

    #[test]
    fn add_attachment_creates_a_missing_map() {
        let mut body = Vec::new();
        for s in ["2.0.2", "svc.Path", "", "ping", ""] {
            hessian2::write_string(&mut body, s);
        }
        assert!(decode_request_body(&body).unwrap().attachments.is_empty());
        let with = add_attachment(&body, "k", "v").unwrap();
        assert_eq!(decode_request_body(&with).unwrap().attachment("k"), Some("v"));
    }

    #[test]
    fn partial_frames_wait_and_truncation_at_eof_is_an_error() {
        let mut codec = DubboCodec::default();
        for cut in [1, 2, 15, 16, 100] {
            let mut buf = BytesMut::from(&C2S[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "{cut}");
            let err = codec.decode_eof(&mut buf).unwrap_err();
            assert_eq!(err.reason(), "dubbo_truncated");
        }
    }

    #[test]
    fn bad_magic_and_oversized_bodies_are_rejected() {
        let mut codec = DubboCodec::default();
        let err = codec
            .decode(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]))
            .unwrap_err();
        assert_eq!(err.reason(), "dubbo_bad_magic");
        assert_eq!(err.request_id(), None);

        let mut codec = DubboCodec::new(DubboLimits { max_body: 64 });
        let err = codec.decode(&mut BytesMut::from(C2S)).unwrap_err();
        assert!(
            matches!(
                err,
                DubboError::FrameTooLarge {
                    len: 386,
                    max: 64,
                    request_id: 4
                }
            ),
            "{err}"
        );
        assert_eq!(err.request_id(), Some(4));

        let mut negative = C2S[..HEADER_LEN].to_vec();
        negative[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        let err = DubboCodec::default()
            .decode(&mut BytesMut::from(&negative[..]))
            .unwrap_err();
        assert_eq!(err.reason(), "dubbo_frame_too_large");
    }

    #[test]
    fn invalid_bodies_are_typed_errors() {
        let body = &decode_all(C2S)[0].body;
        // Every truncation of a real body fails cleanly (or, cut right after the arguments,
        // decodes without a map).
        for cut in 0..body.len() {
            match decode_request_body(&body[..cut]) {
                Ok(inv) => assert!(inv.map.is_none(), "{cut}"),
                Err(err) => assert!(!err.reason().is_empty()),
            }
        }
        let mut bad_desc = Vec::new();
        for s in ["2.0.2", "svc", "", "m", "Lfoo"] {
            hessian2::write_string(&mut bad_desc, s);
        }
        assert_eq!(
            decode_request_body(&bad_desc).unwrap_err().reason(),
            "hessian2_bad_descriptor"
        );
        let mut not_a_map = Vec::new();
        for s in ["2.0.2", "svc", "", "m", ""] {
            hessian2::write_string(&mut not_a_map, s);
        }
        not_a_map.push(0x90);
        assert_eq!(
            decode_request_body(&not_a_map).unwrap_err().reason(),
            "hessian2_unexpected_tag"
        );
    }
}
