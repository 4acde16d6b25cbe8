//! Embeds the kernel object that `cargo xtask build-ebpf` produced. When it is missing the
//! build still succeeds (stable, no bpf-linker) and the daemon says how to build it.
//!
//! Also generates the CRI client (Kubernetes discovery) from `proto/cri/api.proto`, with protox
//! compiling the proto in Rust: no protoc on the build machine.

use std::{env, fs, path::PathBuf};

fn main() {
    cri_client();
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

fn cri_client() {
    let proto = "proto/cri/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    // `[debug_redact = true]` (newer descriptor.proto) is unknown to protox 0.7; it only tells
    // loggers to hide a field, so compile a copy without it.
    let text = fs::read_to_string(proto).expect("read the CRI proto");
    let dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("cri-proto");
    fs::create_dir_all(&dir).expect("create the proto dir");
    fs::write(dir.join("api.proto"), text.replace(" [debug_redact = true]", ""))
        .expect("write the CRI proto copy");
    let fds = protox::compile(["api.proto"], [&dir]).expect("compile the CRI proto");
    tonic_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the CRI client");
}
