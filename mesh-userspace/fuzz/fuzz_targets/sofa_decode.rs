//! The SofaRequest body decoder never panics (on a bare body, in both Hessian grammars, and on
//! the content of any Bolt frame the codec accepts), and what it returns stays within its limits.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::{
    bolt::{BoltCodec, BoltLimits},
    sofa::{self, SofaRequestInfo, MAX_PROPS, MAX_STRING_BYTES},
};
use tokio_util::codec::Decoder;

fn check(result: Result<SofaRequestInfo<'_>, sofa::SofaError>) {
    match result {
        Ok(info) => {
            assert!(info.props.len() <= MAX_PROPS);
            let strings = info.method.as_deref().map_or(0, str::len)
                + info.target_service.as_deref().map_or(0, str::len)
                + info.props.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
            assert!(strings <= MAX_STRING_BYTES, "{strings}");
        }
        Err(err) => assert!(!err.reason().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    check(sofa::decode_sofa_request(data));
    // Both grammars on the same bytes: the first tag picks one.
    for first in [b'C', b'O'] {
        let mut body = Vec::with_capacity(data.len() + 1);
        body.push(first);
        body.extend_from_slice(data);
        check(sofa::decode_sofa_request(&body));
    }
    let limits = BoltLimits {
        max_class_name: 256,
        max_header_bytes: 4096,
        max_content: 64 * 1024,
    };
    let mut codec = BoltCodec::new(limits);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        if let Ok(Some(info)) = sofa::decode_request(&frame.class_name, frame.codec, &frame.content) {
            check(Ok(info));
        }
    }
});
