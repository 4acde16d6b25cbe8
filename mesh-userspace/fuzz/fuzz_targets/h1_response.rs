//! The HTTP/1.1 upstream client's parsers (src/l7/http/h1wire.rs) on whatever an upstream may
//! send: the response head parser, the framing and keep-alive decisions and the chunked
//! decoder never panic; a head is never longer than its input; the decoder gives the same
//! data, trailers and end whether the bytes come at once or split at any point.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/l7/http/h1wire.rs"]
mod h1wire;

use bytes::BytesMut;
use h1wire::{Chunk, ChunkDecoder};
use libfuzzer_sys::fuzz_target;

/// What the decoder made of `parts` fed one after the other: (data, trailers, ended, error).
fn decode(parts: &[&[u8]]) -> (Vec<u8>, Option<http::HeaderMap>, bool, bool) {
    let mut dec = ChunkDecoder::new();
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    for p in parts {
        buf.extend_from_slice(p);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Chunk::Data(d))) => {
                    assert!(!d.is_empty(), "empty data chunk");
                    data.extend_from_slice(&d);
                }
                Ok(Some(Chunk::Trailers(t))) => trailers = Some(t),
                Ok(Some(Chunk::End)) => return (data, trailers, true, false),
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.0.is_empty());
                    return (data, trailers, false, true);
                }
            }
        }
    }
    (data, trailers, false, false)
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, data)) = input.split_first() else {
        return;
    };
    if let Ok(Some((head, n))) = h1wire::parse_response_head(data) {
        assert!(n <= data.len());
        let _ = h1wire::keep_alive(&head);
        for head_request in [false, true] {
            let _ = h1wire::response_framing(head_request, head.status, &head.headers);
        }
    }
    let whole = decode(&[data]);
    let at = (split as usize * data.len()) / 255;
    let (a, b) = data.split_at(at);
    let parts = decode(&[a, b]);
    // Split input may stop earlier only by needing more bytes, never decode differently.
    assert_eq!(whole, parts, "split at {at}");
    assert!(whole.0.len() <= data.len());
});
