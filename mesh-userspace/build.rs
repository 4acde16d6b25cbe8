//! Embeds the kernel object that `cargo xtask build-ebpf` produced. When it is missing the
//! build still succeeds (stable, no bpf-linker) and the daemon says how to build it.
//!
//! Also generates the CRI client (Kubernetes discovery) from `proto/cri/api.proto`, with protox
//! compiling the proto in Rust: no protoc on the build machine (`proto/cri/build_client.rs`,
//! which tests/build.rs includes too).

use std::{env, fs, path::PathBuf};

fn main() {
    cri_client("proto/cri/api.proto");
    println!("cargo:rerun-if-changed=proto/cri/build_client.rs");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = env::var_os("SOCKMESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpfel-unknown-none/bpf/mesh-ebpf"));
    println!("cargo:rerun-if-env-changed=SOCKMESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: the daemon will refuse to start; run `cargo xtask build-ebpf`",
                object.display()
            );
            fs::write(&out, b"").expect("write empty eBPF object");
        }
    }
}

// The CRI client: proto/cri/build_client.rs, shared with tests/build.rs.
include!("proto/cri/build_client.rs");
