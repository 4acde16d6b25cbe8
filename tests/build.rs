//! The CRI client of the Kubernetes node suite (src/k8s.rs): the same proto and the same
//! generation code as mesh-userspace's discovery client (`mesh-userspace/proto/cri/`).

include!("../mesh-userspace/proto/cri/build_client.rs");

fn main() {
    println!("cargo:rerun-if-changed=../mesh-userspace/proto/cri/build_client.rs");
    cri_client("../mesh-userspace/proto/cri/api.proto");
}
