//! The Bolt decoder never panics, and every frame it accepts re-encodes to exactly the bytes it
//! consumed.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::bolt::{BoltCodec, BoltLimits};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let limits = BoltLimits {
        max_class_name: 256,
        max_header_bytes: 4096,
        max_content: 64 * 1024,
    };
    let mut codec = BoltCodec::new(limits);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = &before[..before.len() - buf.len()];
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
