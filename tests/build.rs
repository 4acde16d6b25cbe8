//! The CRI client of the Kubernetes node suite (src/k8s.rs), generated like mesh-userspace's
//! from the vendored `mesh-userspace/proto/cri/api.proto` by protox (no protoc needed).

use std::{env, fs, path::PathBuf};

fn main() {
    let proto = "../mesh-userspace/proto/cri/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    // protox 0.7 does not know `[debug_redact = true]` (it only hides fields from loggers).
    let text = fs::read_to_string(proto).expect("read the CRI proto");
    let dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("cri-proto");
    fs::create_dir_all(&dir).expect("create the proto dir");
    fs::write(dir.join("api.proto"), text.replace(" [debug_redact = true]", ""))
        .expect("write the proto copy");
    let fds = protox::compile(["api.proto"], [&dir]).expect("compile the CRI proto");
    tonic_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the CRI client");
}
