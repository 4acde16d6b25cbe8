//! `sockmesh-cni`'s input handling never panics: the first bytes pick the command and split
//! the rest into `CNI_ARGS` and stdin; every outcome is a plan or a CNI error object, and ADD's
//! output is the `prevResult` it was given.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/cni.rs"]
mod cni;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let command = ["ADD", "DEL", "CHECK", "VERSION", "GC"][usize::from(sel) % 5];
    let cut = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let args = String::from_utf8_lossy(&rest[..cut]).into_owned();
    let stdin = rest.get(cut + 1..).unwrap_or_default().to_vec();
    let inv = cni::Invocation {
        command: Some(command.into()),
        container_id: Some("fuzz".into()),
        netns: Some("/run/netns/fuzz".into()),
        ifname: Some("eth0".into()),
        args: Some(args),
        stdin,
    };
    match cni::plan(&inv) {
        Ok(p) => {
            if command == "ADD" {
                let conf = p.conf.expect("ADD parses a config");
                if let Some(prev) = conf.prev_result.as_deref().map(|r| r.get()).filter(|r| *r != "null") {
                    assert_eq!(p.stdout, prev);
                }
            }
        }
        Err(e) => assert!(e.code > 0 && serde_json::to_string(&e).is_ok()),
    }
});
