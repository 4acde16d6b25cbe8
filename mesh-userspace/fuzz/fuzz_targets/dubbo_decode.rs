//! The Dubbo decoder never panics, frames re-encode byte-exact, and request bodies either fail
//! with a typed error or take an added attachment.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::dubbo::{add_attachment, decode_request_body, DubboCodec, DubboLimits};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = DubboCodec::new(DubboLimits { max_body: 64 * 1024 });
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = &before[..before.len() - buf.len()];
                if frame.is_request() && !frame.is_event() {
                    if decode_request_body(&frame.body).is_ok() {
                        let body = add_attachment(&frame.body, "x-fuzz", "1")
                            .expect("a decoded body takes an attachment");
                        let inv = decode_request_body(&body).expect("the new body decodes");
                        assert_eq!(inv.attachment("x-fuzz"), Some("1"));
                    }
                }
                let mut out = BytesMut::new();
                codec.encode(frame, &mut out).expect("a decoded frame encodes");
                assert_eq!(&out[..], consumed, "re-encoding differs");
            }
            Ok(None) => break,
            Err(err) => {
                assert!(!err.reason().is_empty());
                break;
            }
        }
    }
});
