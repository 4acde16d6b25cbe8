//! The Hessian2 reader never panics on any input (as a stream of values and as a Dubbo request
//! body), and a body that decodes takes an added attachment.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::{dubbo, hessian2};

fuzz_target!(|data: &[u8]| {
    let _ = hessian2::Reader::new(data).skip_all();
    let _ = hessian2::Reader::new(data).read_string();
    if let Ok(inv) = dubbo::decode_request_body(data) {
        assert!(inv.args.end <= data.len());
        let body = dubbo::add_attachment(data, "x-fuzz", "1").expect("a decoded body takes an attachment");
        let again = dubbo::decode_request_body(&body).expect("the new body decodes");
        assert_eq!(again.attachment("x-fuzz"), Some("1"));
        assert_eq!(again.method, inv.method);
    }
});
