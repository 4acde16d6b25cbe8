// The CRI client generation, shared by the two build scripts that need it: mesh-userspace's
// (Kubernetes discovery, src/k8s/cri.rs) and the test crate's (tests/src/k8s.rs plays the
// kubelet). One proto, `proto/cri/api.proto` beside this file, one way to compile it (protox:
// no protoc needed). Each build script `include!`s this file and calls `cri_client(path)`.

/// Generate the `runtime.v1` client from `proto` into `OUT_DIR` (`tonic::include_proto!`).
fn cri_client(proto: &str) {
    println!("cargo:rerun-if-changed={proto}");
    // `[debug_redact = true]` (newer descriptor.proto) is unknown to protox 0.7; it only tells
    // loggers to hide a field, so compile a copy without it.
    let text = std::fs::read_to_string(proto).expect("read the CRI proto");
    let dir =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("cri-proto");
    std::fs::create_dir_all(&dir).expect("create the proto dir");
    std::fs::write(dir.join("api.proto"), text.replace(" [debug_redact = true]", ""))
        .expect("write the CRI proto copy");
    let fds = protox::compile(["api.proto"], [&dir]).expect("compile the CRI proto");
    tonic_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)
        .expect("generate the CRI client");
}
