//! The upgrade hand-off messages (src/upgrade/wire.rs) from a confused or hostile peer on the
//! rendezvous socket: the prost envelope decoder and the length-prefixed frame reader never
//! panic, never hang and never allocate what a length prefix merely claims; every message
//! they accept re-encodes to one that decodes the same.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/upgrade/wire.rs"]
mod wire;

use std::io::Write as _;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;

/// More than this is not written to the socket pair in one go (the writer does not block on a
/// full socket buffer: the reader runs after it).
const MAX_STREAM: usize = 32 * 1024;

fuzz_target!(|data: &[u8]| {
    // One envelope, as the frame's payload.
    if let Ok(body) = wire::decode(data) {
        let again = wire::encode(body.clone());
        let len = u32::from_be_bytes(again[..4].try_into().unwrap()) as usize;
        assert_eq!(len, again.len() - 4, "the length prefix is the payload's");
        assert_eq!(wire::decode(&again[4..]).expect("a re-encoded message decodes"), body);
    }
    // A stream of frames on the socket, as `recv` reads it: messages until an error (a bad
    // length, a bad envelope, EOF), never a panic or a hang.
    let (a, b) = UnixStream::pair().expect("socketpair");
    (&a).write_all(&data[..data.len().min(MAX_STREAM)]).expect("write");
    drop(a);
    let mut frames = 0;
    loop {
        match wire::recv(&b) {
            Ok((body, fds)) => {
                assert!(fds.is_empty(), "no descriptors were sent");
                assert!(!body.name().is_empty());
                frames += 1;
                assert!(frames <= MAX_STREAM / 4, "more frames than prefixes fit");
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                break;
            }
        }
    }
});
