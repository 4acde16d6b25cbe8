//! SOFA Bolt frames, v1 and v2, requests and responses.
//!
//! ```text
//! v1 request  (22): proto=1 type cmdcode(2) ver2 id(4) codec timeout(4) classLen(2) headerLen(2) contentLen(4)
//! v1 response (20): proto=1 type cmdcode(2) ver2 id(4) codec status(2)  classLen(2) headerLen(2) contentLen(4)
//! v2 request  (24): proto=2 ver1 type cmdcode(2) ver2 id(4) codec switch timeout(4) classLen headerLen contentLen
//! v2 response (22): proto=2 ver1 type cmdcode(2) ver2 id(4) codec switch status(2)  classLen headerLen contentLen
//! then: class name, header, content, and in v2 with ver1 >= 2 and switch bit 0 set, a CRC32
//! of everything before it.
//! ```
//!
//! The header is Bolt's `SimpleMapSerializer` encoding: per entry, `i32` key length, key,
//! `i32` value length (`-1` for a null value), value. It is parsed into [`BoltHeader`]s, whose
//! encoding is canonical, so `encode(decode(bytes)) == bytes` for every frame the decoder
//! accepts (the CRC is recomputed on encode, so it stays right after a header change).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

pub const PROTO_V1: u8 = 0x01;
pub const PROTO_V2: u8 = 0x02;
/// Command types.
pub const TYPE_RESPONSE: u8 = 0x00;
pub const TYPE_REQUEST: u8 = 0x01;
pub const TYPE_REQUEST_ONEWAY: u8 = 0x02;
/// Command codes.
pub const CMD_HEARTBEAT: u16 = 0x0000;
pub const CMD_RPC_REQUEST: u16 = 0x0001;
pub const CMD_RPC_RESPONSE: u16 = 0x0002;
/// The only command version in use.
pub const VER2: u8 = 0x01;
/// Codec (serialization) ids.
pub const CODEC_HESSIAN2: u8 = 1;
pub const CODEC_PROTOBUF: u8 = 11;
/// v2 switch bit that turns the CRC32 trailer on (when `ver1 >= 2`).
pub const SWITCH_CRC: u8 = 0x01;
/// The first `ver1` that carries a CRC.
pub const VER1_CRC: u8 = 2;
/// Header key the SOFA clients put the target service (`interface:version`) in.
pub const HEADER_SERVICE: &str = "service";
pub const CRC_LEN: usize = 4;

/// Response status codes (`com.alipay.remoting.ResponseStatus`).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const ERROR: u16 = 0x0001;
    pub const SERVER_EXCEPTION: u16 = 0x0002;
    pub const UNKNOWN: u16 = 0x0003;
    pub const SERVER_THREADPOOL_BUSY: u16 = 0x0004;
    pub const ERROR_COMM: u16 = 0x0005;
    pub const NO_PROCESSOR: u16 = 0x0006;
    pub const TIMEOUT: u16 = 0x0007;
    pub const CLIENT_SEND_ERROR: u16 = 0x0008;
    pub const CODEC_EXCEPTION: u16 = 0x0009;
    pub const CONNECTION_CLOSED: u16 = 0x0010;
}

pub const DEFAULT_MAX_CLASS_NAME: usize = 1024;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_CONTENT: usize = 16 * 1024 * 1024;

/// Bad Bolt framing. Variants that carry `request_id` were raised after the id was read.
#[derive(Debug, Error)]
pub enum BoltError {
    #[error("bad bolt proto byte 0x{found:02x}")]
    BadProto { found: u8 },
    #[error("bad bolt v2 version (ver1) 0x{found:02x}")]
    BadVersion { found: u8 },
    #[error("bad bolt command type 0x{found:02x}")]
    BadType { found: u8 },
    #[error("bolt {field} of {len} bytes exceeds the limit of {max} (request id {request_id})")]
    FrameTooLarge {
        field: &'static str,
        len: i64,
        max: usize,
        request_id: u32,
    },
    #[error("bad bolt header map at byte {at} of the header (request id {request_id})")]
    BadHeaderMap { at: usize, request_id: u32 },
    #[error("bolt crc32 mismatch: frame says 0x{expected:08x}, computed 0x{computed:08x} (request id {request_id})")]
    BadCrc {
        expected: u32,
        computed: u32,
        request_id: u32,
    },
    #[error("bolt frame truncated: {have} bytes buffered at end of stream")]
    Truncated { have: usize },
    #[error("bolt io error")]
    Io(#[from] std::io::Error),
}

impl BoltError {
    /// A short, stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadProto { .. } => "bolt_bad_proto",
            Self::BadVersion { .. } => "bolt_bad_version",
            Self::BadType { .. } => "bolt_bad_type",
            Self::FrameTooLarge { .. } => "bolt_frame_too_large",
            Self::BadHeaderMap { .. } => "bolt_bad_header_map",
            Self::BadCrc { .. } => "bolt_bad_crc",
            Self::Truncated { .. } => "bolt_truncated",
            Self::Io(_) => "bolt_io",
        }
    }

    /// The request id, when it was read: the peer can then get an error response.
    pub fn request_id(&self) -> Option<u32> {
        match self {
            Self::FrameTooLarge { request_id, .. }
            | Self::BadHeaderMap { request_id, .. }
            | Self::BadCrc { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }
}

/// One header entry. An empty key is written with length 0; a `None` value with length -1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoltHeader {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One Bolt frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoltFrame {
    /// [`PROTO_V1`] or [`PROTO_V2`].
    pub proto: u8,
    /// v2 protocol version; 0 in v1 frames.
    pub ver1: u8,
    pub cmd_type: u8,
    pub cmd_code: u16,
    pub ver2: u8,
    pub request_id: u32,
    pub codec: u8,
    /// v2 protocol switches; 0 in v1 frames.
    pub switch: u8,
    /// Requests only (milliseconds); 0 in responses.
    pub timeout: u32,
    /// Responses only; 0 in requests.
    pub status: u16,
    pub class_name: Bytes,
    pub headers: Vec<BoltHeader>,
    pub content: Bytes,
    /// The CRC32 the frame carried, if it had one. The encoder writes a fresh one.
    pub crc32: Option<u32>,
}

impl BoltFrame {
    pub fn is_response(&self) -> bool {
        self.cmd_type == TYPE_RESPONSE
    }

    pub fn is_heartbeat(&self) -> bool {
        self.cmd_code == CMD_HEARTBEAT
    }

    /// Whether the encoded frame ends with a CRC32.
    pub fn has_crc(&self) -> bool {
        has_crc(self.proto, self.ver1, self.switch)
    }

    /// The first value of header `key`, as bytes.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        let h = self.headers.iter().find(|h| h.key == key.as_bytes())?;
        h.value.as_deref()
    }

    /// The first value of header `key`, when it is UTF-8.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.header(key)?).ok()
    }

    /// Set header `key`: replace the first entry with that key, or append one.
    pub fn set_header(&mut self, key: &str, value: &str) {
        let value = Some(Bytes::copy_from_slice(value.as_bytes()));
        match self.headers.iter_mut().find(|h| h.key == key.as_bytes()) {
            Some(h) => h.value = value,
            None => self.headers.push(BoltHeader {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value,
            }),
        }
    }

    /// Remove every entry with `key`; whether there was one.
    pub fn remove_header(&mut self, key: &str) -> bool {
        let before = self.headers.len();
        self.headers.retain(|h| h.key != key.as_bytes());
        before != self.headers.len()
    }

    /// An error response to this request in the same protocol version, codec and CRC setting.
    pub fn error_response_to(&self, status: u16) -> BoltFrame {
        BoltFrame {
            proto: self.proto,
            ver1: self.ver1,
            codec: self.codec,
            switch: self.switch,
            ..error_response(self.request_id, status)
        }
    }

    fn fixed_len(&self) -> usize {
        fixed_len(self.proto, self.cmd_type)
    }
}

/// An empty Bolt v1 response with `status` for `request_id` (Hessian2 codec, no class name,
/// header or content). Java's `RpcResponseResolver` turns statuses such as
/// [`status::SERVER_THREADPOOL_BUSY`], [`status::NO_PROCESSOR`] and
/// [`status::CODEC_EXCEPTION`] into exceptions without reading any content. Prefer
/// [`BoltFrame::error_response_to`] when the request frame is at hand.
pub fn error_response(request_id: u32, status: u16) -> BoltFrame {
    BoltFrame {
        proto: PROTO_V1,
        ver1: 0,
        cmd_type: TYPE_RESPONSE,
        cmd_code: CMD_RPC_RESPONSE,
        ver2: VER2,
        request_id,
        codec: CODEC_HESSIAN2,
        switch: 0,
        timeout: 0,
        status,
        class_name: Bytes::new(),
        headers: Vec::new(),
        content: Bytes::new(),
        crc32: None,
    }
}

fn has_crc(proto: u8, ver1: u8, switch: u8) -> bool {
    proto == PROTO_V2 && ver1 >= VER1_CRC && switch & SWITCH_CRC != 0
}

/// Length of the fixed part of a frame.
fn fixed_len(proto: u8, cmd_type: u8) -> usize {
    let v2_extra = if proto == PROTO_V2 { 2 } else { 0 };
    let response = cmd_type == TYPE_RESPONSE;
    (if response { 20 } else { 22 }) + v2_extra
}

/// CRC-32 (IEEE 802.3, as `java.util.zip.CRC32`).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Limits the decoder enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoltLimits {
    pub max_class_name: usize,
    pub max_header_bytes: usize,
    pub max_content: usize,
}

impl Default for BoltLimits {
    fn default() -> Self {
        Self {
            max_class_name: DEFAULT_MAX_CLASS_NAME,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_content: DEFAULT_MAX_CONTENT,
        }
    }
}

/// `tokio_util` codec for Bolt v1 and v2 frames (the version is read per frame).
#[derive(Clone, Debug, Default)]
pub struct BoltCodec {
    limits: BoltLimits,
}

impl BoltCodec {
    pub fn new(limits: BoltLimits) -> Self {
        Self { limits }
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Check a length field against its limit. Java reads the lengths as signed: negative ones
/// are rejected like oversized ones.
fn check_len(field: &'static str, len: i64, max: usize, request_id: u32) -> Result<usize, BoltError> {
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(BoltError::FrameTooLarge {
            field,
            len,
            max,
            request_id,
        }),
    }
}

fn parse_headers(raw: &[u8], request_id: u32) -> Result<Vec<BoltHeader>, BoltError> {
    let raw = Bytes::copy_from_slice(raw);
    let mut headers = Vec::new();
    let mut at = 0;
    let bad = |at| BoltError::BadHeaderMap { at, request_id };
    let read_len = |at: usize| -> Result<i32, BoltError> {
        let b = raw.get(at..at + 4).ok_or(bad(at))?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    while at < raw.len() {
        let key_len = usize::try_from(read_len(at)?).map_err(|_| bad(at))?;
        let key_start = at + 4;
        let key = raw.get(key_start..key_start + key_len).ok_or(bad(at))?;
        let key = raw.slice_ref(key);
        at = key_start + key_len;
        let value = match read_len(at)? {
            -1 => {
                at += 4;
                None
            }
            n => {
                let n = usize::try_from(n).map_err(|_| bad(at))?;
                let start = at + 4;
                let v = raw.get(start..start + n).ok_or(bad(at))?;
                let v = raw.slice_ref(v);
                at = start + n;
                Some(v)
            }
        };
        headers.push(BoltHeader { key, value });
    }
    Ok(headers)
}

fn headers_len(headers: &[BoltHeader]) -> usize {
    headers
        .iter()
        .map(|h| 8 + h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
        .sum()
}

impl Decoder for BoltCodec {
    type Item = BoltFrame;
    type Error = BoltError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BoltFrame>, BoltError> {
        let Some(&proto) = src.first() else {
            return Ok(None);
        };
        let base = match proto {
            PROTO_V1 => 1,
            PROTO_V2 => {
                let Some(&ver1) = src.get(1) else { return Ok(None) };
                if ver1 == 0 {
                    return Err(BoltError::BadVersion { found: ver1 });
                }
                2
            }
            found => return Err(BoltError::BadProto { found }),
        };
        let Some(&cmd_type) = src.get(base) else {
            return Ok(None);
        };
        if !matches!(cmd_type, TYPE_RESPONSE | TYPE_REQUEST | TYPE_REQUEST_ONEWAY) {
            return Err(BoltError::BadType { found: cmd_type });
        }
        let fixed = fixed_len(proto, cmd_type);
        if src.len() < fixed {
            return Ok(None);
        }
        let b = &src[..];
        let ver1 = if proto == PROTO_V2 { b[1] } else { 0 };
        let cmd_code = be_u16(b, base + 1);
        let ver2 = b[base + 3];
        let request_id = be_u32(b, base + 4);
        let codec = b[base + 8];
        let mut at = base + 9;
        let switch = if proto == PROTO_V2 {
            at += 1;
            b[at - 1]
        } else {
            0
        };
        let (timeout, status) = if cmd_type == TYPE_RESPONSE {
            at += 2;
            (0, be_u16(b, at - 2))
        } else {
            at += 4;
            (be_u32(b, at - 4), 0)
        };
        let limits = self.limits;
        let class_len = i64::from(be_u16(b, at) as i16);
        let header_len = i64::from(be_u16(b, at + 2) as i16);
        let content_len = i64::from(be_u32(b, at + 4) as i32);
        let class_len = check_len("class name", class_len, limits.max_class_name, request_id)?;
        let header_len = check_len("header", header_len, limits.max_header_bytes, request_id)?;
        let content_len = check_len("content", content_len, limits.max_content, request_id)?;
        let crc_len = if has_crc(proto, ver1, switch) { CRC_LEN } else { 0 };
        let total = fixed + class_len + header_len + content_len + crc_len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        let crc32 = if crc_len > 0 {
            let expected = be_u32(&frame, total - CRC_LEN);
            let computed = crc32(&frame[..total - CRC_LEN]);
            if expected != computed {
                return Err(BoltError::BadCrc {
                    expected,
                    computed,
                    request_id,
                });
            }
            Some(expected)
        } else {
            None
        };
        let class_end = fixed + class_len;
        let header_end = class_end + header_len;
        let headers = parse_headers(&frame[class_end..header_end], request_id)?;
        Ok(Some(BoltFrame {
            proto,
            ver1,
            cmd_type,
            cmd_code,
            ver2,
            request_id,
            codec,
            switch,
            timeout,
            status,
            class_name: frame.slice(fixed..class_end),
            headers,
            content: frame.slice(header_end..header_end + content_len),
            crc32,
        }))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BoltFrame>, BoltError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(BoltError::Truncated { have: buf.len() }),
        }
    }
}

impl Encoder<BoltFrame> for BoltCodec {
    type Error = BoltError;

    fn encode(&mut self, frame: BoltFrame, dst: &mut BytesMut) -> Result<(), BoltError> {
        if !matches!(frame.proto, PROTO_V1 | PROTO_V2) {
            return Err(BoltError::BadProto { found: frame.proto });
        }
        let header_len = headers_len(&frame.headers);
        // The wire lengths are signed (i16, i16, i32).
        let id = frame.request_id;
        check_len("class name", frame.class_name.len() as i64, i16::MAX as usize, id)?;
        check_len("header", header_len as i64, i16::MAX as usize, id)?;
        check_len("content", frame.content.len() as i64, i32::MAX as usize, id)?;
        let start = dst.len();
        let crc_len = if frame.has_crc() { CRC_LEN } else { 0 };
        dst.reserve(frame.fixed_len() + frame.class_name.len() + header_len + frame.content.len() + crc_len);
        dst.put_u8(frame.proto);
        if frame.proto == PROTO_V2 {
            dst.put_u8(frame.ver1);
        }
        dst.put_u8(frame.cmd_type);
        dst.put_u16(frame.cmd_code);
        dst.put_u8(frame.ver2);
        dst.put_u32(frame.request_id);
        dst.put_u8(frame.codec);
        if frame.proto == PROTO_V2 {
            dst.put_u8(frame.switch);
        }
        if frame.is_response() {
            dst.put_u16(frame.status);
        } else {
            dst.put_u32(frame.timeout);
        }
        dst.put_u16(frame.class_name.len() as u16);
        dst.put_u16(header_len as u16);
        dst.put_u32(frame.content.len() as u32);
        dst.put_slice(&frame.class_name);
        for h in &frame.headers {
            dst.put_u32(h.key.len() as u32);
            dst.put_slice(&h.key);
            match &h.value {
                Some(v) => {
                    dst.put_u32(v.len() as u32);
                    dst.put_slice(v);
                }
                None => dst.put_i32(-1),
            }
        }
        dst.put_slice(&frame.content);
        if crc_len > 0 {
            let crc = crc32(&dst[start..]);
            dst.put_u32(crc);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_C2S: &[u8] = include_bytes!("testdata/bolt_v1.c2s.bin");
    const V1_S2C: &[u8] = include_bytes!("testdata/bolt_v1.s2c.bin");
    const V2_C2S: &[u8] = include_bytes!("testdata/bolt_v2_crc.c2s.bin");
    const V2_S2C: &[u8] = include_bytes!("testdata/bolt_v2_crc.s2c.bin");
    const SOFA_REQUEST: &[u8] = b"com.alipay.sofa.rpc.core.request.SofaRequest";
    const SOFA_RESPONSE: &[u8] = b"com.alipay.sofa.rpc.core.response.SofaResponse";
    const SERVICE: &str = "com.sockmesh.test.EchoService:1.0";

    fn decode_all(bytes: &[u8]) -> Vec<BoltFrame> {
        let mut codec = BoltCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode_eof(&mut buf).unwrap() {
            frames.push(frame);
        }
        frames
    }

    fn encode_all(frames: &[BoltFrame]) -> Vec<u8> {
        let mut codec = BoltCodec::default();
        let mut out = BytesMut::new();
        for f in frames {
            codec.encode(f.clone(), &mut out).unwrap();
        }
        out.to_vec()
    }

    /// Byte offset of `needle` in `hay`.
    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn v1_requests_from_the_real_client() {
        let frames = decode_all(V1_C2S);
        assert_eq!(frames.len(), 2);
        for (f, id) in frames.iter().zip([1, 2]) {
            assert_eq!((f.proto, f.ver1, f.switch), (PROTO_V1, 0, 0));
            assert_eq!(
                (f.cmd_type, f.cmd_code, f.ver2),
                (TYPE_REQUEST, CMD_RPC_REQUEST, VER2)
            );
            assert_eq!((f.request_id, f.codec, f.timeout), (id, CODEC_HESSIAN2, 3000));
            assert_eq!(f.class_name, SOFA_REQUEST);
            assert_eq!(f.headers.len(), 1);
            assert_eq!(f.header_str(HEADER_SERVICE), Some(SERVICE));
            assert_eq!(f.crc32, None);
        }
        assert_eq!(frames[0].content.len(), 284);
        // The requestProps travel inside the Hessian2 SofaRequest, not in the Bolt header.
        assert!(find(&frames[0].content, b"x-mesh-colour").is_some());
        assert!(find(&frames[0].content, b"echo").is_some());
        assert_eq!(encode_all(&frames), V1_C2S);
    }

    #[test]
    fn v1_responses_from_the_real_server() {
        let frames = decode_all(V1_S2C);
        assert_eq!(frames.len(), 2);
        assert!(frames
            .iter()
            .all(|f| f.is_response() && f.class_name == SOFA_RESPONSE));
        assert!(frames
            .iter()
            .all(|f| f.headers.is_empty() && f.cmd_code == CMD_RPC_RESPONSE));
        assert_eq!(
            (frames[0].request_id, frames[0].status, frames[0].content.len()),
            (1, status::SUCCESS, 110)
        );
        assert_eq!(
            (frames[1].request_id, frames[1].status),
            (2, status::SERVER_EXCEPTION)
        );
        assert!(find(&frames[1].content, b"boom").is_some());
        assert_eq!(encode_all(&frames), V1_S2C);
    }

    #[test]
    fn v2_with_crc_from_the_real_client_and_server() {
        let req = decode_all(V2_C2S);
        assert_eq!(req.len(), 1);
        let r = &req[0];
        assert_eq!((r.proto, r.ver1, r.switch), (PROTO_V2, 2, SWITCH_CRC));
        assert_eq!((r.cmd_type, r.request_id, r.timeout), (TYPE_REQUEST, 3, 3000));
        assert_eq!(r.header_str(HEADER_SERVICE), Some(SERVICE));
        assert_eq!(r.crc32, Some(be_u32(V2_C2S, V2_C2S.len() - 4)));
        assert_eq!(encode_all(&req), V2_C2S);

        let res = decode_all(V2_S2C);
        assert_eq!(res.len(), 1);
        assert_eq!((res[0].proto, res[0].ver1, res[0].request_id), (PROTO_V2, 2, 3));
        assert_eq!(res[0].status, status::SUCCESS);
        assert!(res[0].crc32.is_some());
        assert_eq!(encode_all(&res), V2_S2C);
    }

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let whole = decode_all(V1_C2S);
        for cut in 1..V1_C2S.len() {
            let mut codec = BoltCodec::default();
            let mut buf = BytesMut::from(&V1_C2S[..cut]);
            let mut got = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&V1_C2S[cut..]);
            while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn set_header_reencodes_with_new_lengths_and_crc() {
        let mut f = decode_all(V2_C2S).remove(0);
        f.set_header("x-mesh-colour", "blue");
        f.set_header(HEADER_SERVICE, "other.Service:2.0");
        let bytes = encode_all(std::slice::from_ref(&f));
        let back = decode_all(&bytes);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].header_str("x-mesh-colour"), Some("blue"));
        assert_eq!(back[0].header_str(HEADER_SERVICE), Some("other.Service:2.0"));
        assert_eq!(back[0].content, f.content);
        let mut g = back[0].clone();
        assert!(g.remove_header("x-mesh-colour"));
        assert_eq!(g.header("x-mesh-colour"), None);
    }

    #[test]
    fn null_and_empty_header_values_round_trip() {
        let mut f = error_response(7, status::SUCCESS);
        f.headers = vec![
            BoltHeader {
                key: Bytes::from_static(b"n"),
                value: None,
            },
            BoltHeader {
                key: Bytes::from_static(b"e"),
                value: Some(Bytes::new()),
            },
            BoltHeader {
                key: Bytes::new(),
                value: Some(Bytes::from_static(b"v")),
            },
        ];
        let bytes = encode_all(std::slice::from_ref(&f));
        assert_eq!(decode_all(&bytes), vec![f.clone()]);
        assert_eq!(f.header("n"), None);
        assert_eq!(f.header("e"), Some(&b""[..]));
    }

    #[test]
    fn error_responses() {
        let v1 = error_response(9, status::SERVER_THREADPOOL_BUSY);
        let bytes = encode_all(std::slice::from_ref(&v1));
        assert_eq!(
            bytes,
            [1, 0, 0, 2, 1, 0, 0, 0, 9, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(decode_all(&bytes), vec![v1]);

        let req = decode_all(V2_C2S).remove(0);
        let res = req.error_response_to(status::CODEC_EXCEPTION);
        assert_eq!(
            (res.proto, res.ver1, res.switch, res.request_id),
            (PROTO_V2, 2, SWITCH_CRC, 3)
        );
        let bytes = encode_all(std::slice::from_ref(&res));
        assert_eq!(bytes.len(), 22 + CRC_LEN);
        let back = decode_all(&bytes).remove(0);
        assert_eq!((back.status, back.is_response()), (status::CODEC_EXCEPTION, true));
    }

    #[test]
    fn crc_matches_java() {
        // java.util.zip.CRC32 of "123456789".
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn bad_input_is_a_typed_error_with_the_request_id_when_known() {
        let mut codec = BoltCodec::default();
        let err = codec.decode(&mut BytesMut::from(&[0x07, 1, 2][..])).unwrap_err();
        assert_eq!(err.reason(), "bolt_bad_proto");
        let err = codec.decode(&mut BytesMut::from(&[0x01, 0x09][..])).unwrap_err();
        assert_eq!(err.reason(), "bolt_bad_type");
        let err = codec.decode(&mut BytesMut::from(&[0x02, 0x00][..])).unwrap_err();
        assert_eq!(err.reason(), "bolt_bad_version");

        let limits = BoltLimits {
            max_content: 100,
            ..BoltLimits::default()
        };
        let err = BoltCodec::new(limits)
            .decode(&mut BytesMut::from(V1_C2S))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BoltError::FrameTooLarge {
                    field: "content",
                    len: 284,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.request_id(), Some(1));
        let limits = BoltLimits {
            max_class_name: 10,
            ..BoltLimits::default()
        };
        let err = BoltCodec::new(limits)
            .decode(&mut BytesMut::from(V1_C2S))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BoltError::FrameTooLarge {
                    field: "class name",
                    ..
                }
            ),
            "{err}"
        );
        let limits = BoltLimits {
            max_header_bytes: 10,
            ..BoltLimits::default()
        };
        let err = BoltCodec::new(limits)
            .decode(&mut BytesMut::from(V1_C2S))
            .unwrap_err();
        assert!(
            matches!(err, BoltError::FrameTooLarge { field: "header", .. }),
            "{err}"
        );

        // A header whose key length runs past the header.
        let mut bad = V1_C2S[..398].to_vec();
        bad[22 + 44..22 + 44 + 4].copy_from_slice(&100i32.to_be_bytes());
        let err = BoltCodec::default()
            .decode(&mut BytesMut::from(&bad[..]))
            .unwrap_err();
        assert!(
            matches!(err, BoltError::BadHeaderMap { request_id: 1, .. }),
            "{err}"
        );

        // A flipped content byte breaks the CRC.
        let mut bad = V2_C2S.to_vec();
        bad[200] ^= 0xff;
        let err = BoltCodec::default()
            .decode(&mut BytesMut::from(&bad[..]))
            .unwrap_err();
        assert!(matches!(err, BoltError::BadCrc { request_id: 3, .. }), "{err}");

        // Negative content length.
        let mut bad = V1_C2S[..22].to_vec();
        bad[18..22].copy_from_slice(&(-5i32).to_be_bytes());
        let err = BoltCodec::default()
            .decode(&mut BytesMut::from(&bad[..]))
            .unwrap_err();
        assert_eq!(err.reason(), "bolt_frame_too_large");

        // Truncated at end of stream.
        let err = BoltCodec::default()
            .decode_eof(&mut BytesMut::from(&V1_C2S[..30]))
            .unwrap_err();
        assert_eq!(err.reason(), "bolt_truncated");
    }
}
