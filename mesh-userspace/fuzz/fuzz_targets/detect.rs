//! `detect` never panics, and once it decides, more bytes never change the decision.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::detect::{detect, Detection};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(protocol::detect::PEEK_BYTES)];
    let mut decided = None;
    for n in 0..=data.len() {
        let got = detect(&data[..n]);
        match (decided, got) {
            (None, Detection::NeedMore) => {}
            (None, d) => decided = Some(d),
            (Some(d), got) => assert_eq!(d, got, "decision changed at {n} bytes"),
        }
    }
});
