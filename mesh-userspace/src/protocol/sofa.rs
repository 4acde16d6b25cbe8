//! The routing fields of a SOFA RPC request carried in a Bolt frame's content: a Hessian2
//! `com.alipay.sofa.rpc.core.request.SofaRequest` object followed by the call's arguments.
//!
//! The npm client (`sofa-rpc-node` with `sofa-bolt-node`) writes only `service` into the Bolt
//! header map; the method name and the request properties (`requestProps`, where SOFA carries
//! per-request headers such as a canary tag) are only in this object. Its default codec writes
//! the Hessian 2.0 draft grammar (`O` class definition, `o` instance, `M ... z` map); with
//! `setHessianVersion('4.0')`, and in Java clients, it is Hessian 2.0 (`C`, `O`/`0x60`, `H ... Z`).
//! Both are read.
//!
//! [`decode_request`] reads the class definition and the instance's fields up to the last one
//! it needs (`methodName`, `targetServiceUniqueName`, `requestProps`), in whatever order the
//! class lists them, stepping over the others; the arguments after the object are never looked
//! at. Strings that fit in one chunk are borrowed from the content, not copied. Non-string
//! property keys and values are skipped. Bounds: [`MAX_PROPS`] properties and
//! [`MAX_STRING_BYTES`] of kept strings; beyond either the decoder gives up
//! ([`SofaError::is_limit`]), and the caller routes on the Bolt header alone.

use std::borrow::Cow;

use thiserror::Error;

use super::{
    bolt::CODEC_HESSIAN2,
    hessian2::{Dialect, Hessian2Error, Reader},
};

/// The Bolt class name (and Hessian2 class) of a SOFA RPC request.
pub const SOFA_REQUEST_CLASS: &str = "com.alipay.sofa.rpc.core.request.SofaRequest";
/// Most `requestProps` entries with string key and value the decoder keeps.
pub const MAX_PROPS: usize = 64;
/// Most bytes of strings the decoder keeps (method, service, property keys and values).
pub const MAX_STRING_BYTES: usize = 8 * 1024;
/// Class and field names longer than this are none of the ones looked for.
const MAX_NAME: usize = 128;

const FIELD_METHOD: &str = "methodName";
const FIELD_SERVICE: &str = "targetServiceUniqueName";
const FIELD_PROPS: &str = "requestProps";

/// A SofaRequest body the decoder did not read to the fields it needs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SofaError {
    #[error("sofa request body: {0}")]
    Hessian2(#[from] Hessian2Error),
    #[error("sofa request body starts with tag 0x{tag:02x}, not a class definition")]
    NotAnObject { tag: u8 },
    #[error("sofa request body holds another class than `{SOFA_REQUEST_CLASS}`")]
    WrongClass,
    #[error("sofa request has more than {max} string request props")]
    TooManyProps { max: usize },
    #[error("sofa request strings exceed {max} bytes")]
    StringsTooLarge { max: usize },
}

impl SofaError {
    /// A short, stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Hessian2(e) => e.reason(),
            Self::NotAnObject { .. } => "sofa_not_an_object",
            Self::WrongClass => "sofa_wrong_class",
            Self::TooManyProps { .. } => "sofa_too_many_props",
            Self::StringsTooLarge { .. } => "sofa_strings_too_large",
        }
    }

    /// Whether the body was given up on for a limit rather than for being malformed.
    pub fn is_limit(&self) -> bool {
        matches!(self, Self::TooManyProps { .. } | Self::StringsTooLarge { .. })
    }
}

/// What a SofaRequest says about where it goes. Strings borrow from the content when they can.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SofaRequestInfo<'a> {
    /// `methodName`.
    pub method: Option<Cow<'a, str>>,
    /// `targetServiceUniqueName`: `interface:version`.
    pub target_service: Option<Cow<'a, str>>,
    /// `requestProps` entries whose key and value are strings, in wire order.
    pub props: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl SofaRequestInfo<'_> {
    /// The first request property named `name` (ASCII case-insensitive).
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| &**v)
    }

    /// The interface and version of `targetServiceUniqueName` (`iface:version`), split like the
    /// Bolt `service` header; empty parts are `None`.
    pub fn service_version(&self) -> (Option<&str>, Option<&str>) {
        let mut parts = self.target_service.as_deref().unwrap_or("").split(':');
        let service = parts.next().filter(|s| !s.is_empty());
        let version = parts.next().filter(|s| !s.is_empty());
        (service, version)
    }
}

/// Slots of the wanted fields in the position table.
const SLOT_METHOD: usize = 0;
const SLOT_SERVICE: usize = 1;
const SLOT_PROPS: usize = 2;
/// A wanted field the class does not have.
const ABSENT: usize = usize::MAX;

/// Read the routing fields of a Bolt request's content. `Ok(None)` when there is nothing to
/// look at: the class is not a SofaRequest or the codec is not Hessian2.
pub fn decode_request<'a>(
    class_name: &[u8],
    codec: u8,
    content: &'a [u8],
) -> Result<Option<SofaRequestInfo<'a>>, SofaError> {
    if class_name != SOFA_REQUEST_CLASS.as_bytes() || codec != CODEC_HESSIAN2 {
        return Ok(None);
    }
    decode_sofa_request(content).map(Some)
}

/// Read the routing fields of a Hessian2 SofaRequest (the start of a Bolt request's content).
pub fn decode_sofa_request(content: &[u8]) -> Result<SofaRequestInfo<'_>, SofaError> {
    let dialect = match content.first() {
        Some(b'C') => Dialect::V2,
        Some(b'O') => Dialect::Draft,
        Some(&tag) => return Err(SofaError::NotAnObject { tag }),
        None => return Err(Hessian2Error::Truncated { at: 0 }.into()),
    };
    let mut r = Reader::with_dialect(content, dialect);
    // Field positions of methodName, targetServiceUniqueName and requestProps in the
    // SofaRequest class (only it is defined before the top-level instance in practice; any
    // other definition is read and remembered too).
    let mut positions = [ABSENT; 3];
    let mut sofa_class = None;
    while r.at_class_def()? {
        let mut found = [ABSENT; 3];
        let def = r.read_class_def(MAX_NAME, |i, name| {
            let slot = match name {
                Some(FIELD_METHOD) => SLOT_METHOD,
                Some(FIELD_SERVICE) => SLOT_SERVICE,
                Some(FIELD_PROPS) => SLOT_PROPS,
                _ => return,
            };
            if found[slot] == ABSENT {
                found[slot] = i;
            }
        })?;
        if def.name.as_deref() == Some(SOFA_REQUEST_CLASS) {
            sofa_class = Some(def.index);
            positions = found;
        }
    }
    if sofa_class != Some(r.read_instance_start()?) {
        return Err(SofaError::WrongClass);
    }
    let mut info = SofaRequestInfo::default();
    // Fields in wire order, up to the last wanted one.
    let Some(last) = positions.iter().copied().filter(|&p| p != ABSENT).max() else {
        return Ok(info);
    };
    let mut budget = MAX_STRING_BYTES;
    for i in 0..=last {
        match positions.iter().position(|&p| p == i) {
            Some(SLOT_METHOD) => info.method = read_field_string(&mut r, &mut budget)?,
            Some(SLOT_SERVICE) => info.target_service = read_field_string(&mut r, &mut budget)?,
            Some(_) => read_props(&mut r, &mut budget, &mut info.props)?,
            None => r.skip_value()?,
        }
    }
    Ok(info)
}

/// A string of at most `max` bytes as returned (invalid UTF-8 is replaced, which can make it
/// longer than on the wire).
fn read_bounded<'a>(r: &mut Reader<'a>, max: usize) -> Result<Cow<'a, str>, SofaError> {
    r.read_str_max(max)?
        .filter(|s| s.len() <= max)
        .ok_or(SofaError::StringsTooLarge {
            max: MAX_STRING_BYTES,
        })
}

/// A field that should be a string: `None` for a null or any other kind of value (skipped).
fn read_field_string<'a>(r: &mut Reader<'a>, budget: &mut usize) -> Result<Option<Cow<'a, str>>, SofaError> {
    if !r.at_string()? {
        r.skip_value()?;
        return Ok(None);
    }
    let s = read_bounded(r, *budget)?;
    *budget -= s.len();
    Ok(Some(s))
}

/// The `requestProps` map: string entries into `out`, any other entry skipped. A null (or a
/// reference, or anything but a map) leaves `out` empty.
fn read_props<'a>(
    r: &mut Reader<'a>,
    budget: &mut usize,
    out: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), SofaError> {
    if !r.at_map()? {
        r.skip_value()?;
        return Ok(());
    }
    r.read_map_start()?;
    while !r.read_end()? {
        let key = if r.at_string()? {
            Some(read_bounded(r, *budget)?)
        } else {
            r.skip_value()?;
            None
        };
        let left = *budget - key.as_ref().map_or(0, |k| k.len());
        let value = if key.is_some() && r.at_string()? {
            Some(read_bounded(r, left)?)
        } else {
            r.skip_value()?;
            None
        };
        if let (Some(key), Some(value)) = (key, value) {
            if out.len() == MAX_PROPS {
                return Err(SofaError::TooManyProps { max: MAX_PROPS });
            }
            *budget = left - value.len();
            out.push((key, value));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    use super::*;
    use crate::protocol::{
        bolt::{BoltCodec, BoltFrame, CODEC_PROTOBUF},
        hessian2::{tag, write_string},
    };

    const V1_C2S: &[u8] = include_bytes!("testdata/bolt_v1.c2s.bin");
    const V2_C2S: &[u8] = include_bytes!("testdata/bolt_v2_crc.c2s.bin");
    /// `sofa-rpc-node` 2.10.0 / `sofa-bolt-node` 2.0.1, default codec (Hessian 2.0 draft),
    /// `echo('hello', 42)` with requestProps `service`, `x-canary=true`, `tenant=acme`,
    /// `x-long` (40 × `l`), `x-utf8=zürich-東京`, `x-num=7` (an int), `x-null=null`.
    const PROPS: &[u8] = include_bytes!("testdata/bolt_props.c2s.bin");
    /// The same call with `bolt.setHessianVersion('4.0')` (Hessian 2.0).
    const PROPS_H4: &[u8] = include_bytes!("testdata/bolt_props_hessian4.c2s.bin");
    const SERVICE: &str = "com.sockmesh.test.EchoService:1.0";

    fn frames(bytes: &[u8]) -> Vec<BoltFrame> {
        let mut codec = BoltCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn decode(f: &BoltFrame) -> SofaRequestInfo<'_> {
        decode_request(&f.class_name, f.codec, &f.content)
            .unwrap()
            .unwrap()
    }

    fn props<'a>(info: &'a SofaRequestInfo<'_>) -> Vec<(&'a str, &'a str)> {
        info.props.iter().map(|(k, v)| (&**k, &**v)).collect()
    }

    #[test]
    fn real_client_requests_in_both_bolt_versions() {
        let v1 = frames(V1_C2S);
        let v2 = frames(V2_C2S);
        for (f, method) in [(&v1[0], "echo"), (&v1[1], "fail"), (&v2[0], "echo")] {
            let info = decode(f);
            assert_eq!(info.method.as_deref(), Some(method));
            assert_eq!(info.target_service.as_deref(), Some(SERVICE));
            assert_eq!(
                info.service_version(),
                (Some("com.sockmesh.test.EchoService"), Some("1.0"))
            );
            assert_eq!(props(&info), [("service", SERVICE), ("x-mesh-colour", "blue")]);
            assert_eq!(info.prop("X-Mesh-Colour"), Some("blue"));
            // Nothing copied: every string is one chunk of valid UTF-8.
            assert!(matches!(info.method, Some(Cow::Borrowed(_))));
            assert!(info
                .props
                .iter()
                .all(|(k, v)| matches!((k, v), (Cow::Borrowed(_), Cow::Borrowed(_)))));
        }
    }

    #[test]
    fn request_props_in_both_hessian_grammars() {
        let want = [
            ("service", SERVICE),
            ("x-canary", "true"),
            ("tenant", "acme"),
            ("x-long", "llllllllllllllllllllllllllllllllllllllll"),
            ("x-utf8", "zürich-東京"),
        ];
        for capture in [PROPS, PROPS_H4] {
            let f = frames(capture).remove(0);
            assert_eq!(f.headers.len(), 1);
            let info = decode(&f);
            assert_eq!(info.method.as_deref(), Some("echo"));
            assert_eq!(info.target_service.as_deref(), Some(SERVICE));
            // `x-num` (an int) and `x-null` (a null) are skipped.
            assert_eq!(props(&info), want);
            assert_eq!(info.prop("x-num"), None);
        }
        assert_eq!(frames(PROPS)[0].content[0], b'O');
        assert_eq!(frames(PROPS_H4)[0].content[0], b'C');
    }

    #[test]
    fn stops_before_the_arguments() {
        // The arguments ('hello', 42) are garbage here: the decoder never reaches them.
        let mut f = frames(PROPS).remove(0);
        let mut content = f.content.to_vec();
        let args = content.len() - 7;
        assert_eq!(&content[args..], b"\x05hello\xba");
        content.truncate(args);
        content.push(0x40);
        f.content = content.into();
        assert_eq!(decode(&f).method.as_deref(), Some("echo"));
    }

    #[test]
    fn not_a_sofa_request_or_not_hessian2_is_nothing_to_read() {
        let f = frames(V1_C2S).remove(0);
        assert_eq!(decode_request(b"other.Class", f.codec, &f.content), Ok(None));
        assert_eq!(
            decode_request(&f.class_name, CODEC_PROTOBUF, &f.content),
            Ok(None)
        );
    }

    /// A Hessian 2.0 SofaRequest: class definition with `fields`, then the instance's values.
    fn h2_request(fields: &[&str], values: &[u8]) -> Vec<u8> {
        let mut out = vec![tag::CLASS_DEF];
        write_string(&mut out, SOFA_REQUEST_CLASS);
        out.push(0x90 + fields.len() as u8);
        for f in fields {
            write_string(&mut out, f);
        }
        out.push(0x60);
        out.extend_from_slice(values);
        out
    }

    fn h2_props(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut out = vec![tag::UNTYPED_MAP];
        for (k, v) in entries {
            write_string(&mut out, k);
            write_string(&mut out, v);
        }
        out.push(tag::END);
        out
    }

    #[test]
    fn java_field_order_and_chunked_strings() {
        // Java's order: targetAppName, requestProps, then RequestBase's fields.
        let long = "m".repeat(0x8000 + 5);
        let mut values = vec![tag::NULL];
        values.extend(h2_props(&[("x-canary", "true")]));
        write_string(&mut values, &long);
        values.extend_from_slice(&[0x71, 0x01, b'x', 0x90]); // methodArgSigs: a typed list
        write_string(&mut values, SERVICE);
        let body = h2_request(
            &[
                "targetAppName",
                FIELD_PROPS,
                FIELD_METHOD,
                "methodArgSigs",
                FIELD_SERVICE,
            ],
            &values,
        );
        let err = decode_sofa_request(&body).unwrap_err();
        assert_eq!(
            err,
            SofaError::StringsTooLarge {
                max: MAX_STRING_BYTES
            }
        );
        assert!(err.is_limit());

        let short = "m".repeat(40);
        let mut values = vec![tag::NULL];
        values.extend(h2_props(&[("x-canary", "true")]));
        // A non-final chunk then the final one: copied, not borrowed.
        values.extend_from_slice(&[tag::STRING_CHUNK, 0, 20]);
        values.extend_from_slice(&short.as_bytes()[..20]);
        write_string(&mut values, &short[20..]);
        values.extend_from_slice(&[0x71, 0x01, b'x', 0x90]);
        write_string(&mut values, SERVICE);
        let body = h2_request(
            &[
                "targetAppName",
                FIELD_PROPS,
                FIELD_METHOD,
                "methodArgSigs",
                FIELD_SERVICE,
            ],
            &values,
        );
        let info = decode_sofa_request(&body).unwrap();
        assert_eq!(info.method.as_deref(), Some(short.as_str()));
        assert!(matches!(info.method, Some(Cow::Owned(_))));
        assert_eq!(info.target_service.as_deref(), Some(SERVICE));
        assert_eq!(info.prop("x-canary"), Some("true"));
    }

    #[test]
    fn limits_give_up_on_the_body() {
        let keys: Vec<String> = (0..=MAX_PROPS).map(|i| format!("k{i}")).collect();
        let entries: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        let body = h2_request(&[FIELD_PROPS], &h2_props(&entries[..MAX_PROPS]));
        assert_eq!(decode_sofa_request(&body).unwrap().props.len(), MAX_PROPS);
        let body = h2_request(&[FIELD_PROPS], &h2_props(&entries));
        assert_eq!(
            decode_sofa_request(&body).unwrap_err(),
            SofaError::TooManyProps { max: MAX_PROPS }
        );

        // 8 KiB in all: exactly fits, one byte more does not.
        let value = "v".repeat(MAX_STRING_BYTES - 1);
        let body = h2_request(&[FIELD_PROPS], &h2_props(&[("k", &value)]));
        assert_eq!(decode_sofa_request(&body).unwrap().props.len(), 1);
        let body = h2_request(&[FIELD_PROPS], &h2_props(&[("kk", &value)]));
        assert_eq!(
            decode_sofa_request(&body).unwrap_err().reason(),
            "sofa_strings_too_large"
        );
        // Invalid UTF-8 is replaced (3 bytes per bad byte): the budget counts what is returned.
        // 3000 overlong `c0 80` pairs: 6000 bytes on the wire, 18000 once replaced.
        let units = 3000;
        let mut map = vec![tag::UNTYPED_MAP, 0x01, b'k', tag::STRING_FINAL];
        map.extend_from_slice(&(units as u16).to_be_bytes());
        for _ in 0..units {
            map.extend_from_slice(&[0xc0, 0x80]);
        }
        map.push(tag::END);
        let body = h2_request(&[FIELD_PROPS], &map);
        assert_eq!(
            decode_sofa_request(&body).unwrap_err(),
            SofaError::StringsTooLarge {
                max: MAX_STRING_BYTES
            }
        );
        // Skipped entries (non-string values) cost nothing.
        let mut map = vec![tag::UNTYPED_MAP];
        for _ in 0..MAX_PROPS * 2 {
            map.extend_from_slice(&[0x01, b'k', 0x91]);
        }
        map.push(tag::END);
        let body = h2_request(&[FIELD_PROPS], &map);
        assert!(decode_sofa_request(&body).unwrap().props.is_empty());
    }

    #[test]
    fn malformed_bodies_are_typed_errors() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "hessian2_truncated"),
            (b"\x90", "sofa_not_an_object"),
            (b"C\x03abc\x90\x60", "sofa_wrong_class"),
            (b"C\x03abc\x90\x61", "hessian2_bad_class_ref"),
            (
                b"O\xbccom.alipay.sofa.rpc.core.request.SofaRequest\x91",
                "hessian2_truncated",
            ),
        ];
        for (body, reason) in cases {
            let err = decode_sofa_request(body).unwrap_err();
            assert_eq!(err.reason(), reason, "{body:02x?}: {err}");
            assert!(!err.is_limit());
        }
        // Every truncation of a real body is an error, never a panic.
        let f = frames(PROPS).remove(0);
        let end = f.content.len() - 7;
        for cut in 0..end {
            assert!(decode_sofa_request(&f.content[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_sofa_request(&f.content[..end]).is_ok());
    }
}
