//! A virtual-node harness for sockmesh's privileged end-to-end tests and the demo.
//!
//! A [`VirtualNode`] is a node network namespace holding a bridge, one network namespace per pod
//! (`eth0` on the bridge, `198.18.0.(2+i)/24`) and a test-owned cgroup v2 subtree
//! (`<cgroup2>/sockmesh-test-<pid>-<n>/` with `daemon/` and `pod-<name>/` children). Processes are
//! started inside a pod's cgroup and network namespace with [`spawn_in`] / [`pod_exec`]; the daemon
//! runs under a [`Daemon`] guard. Every resource is owned by a guard whose `Drop` tears it down, even
//! when a test panics, and no guard's `Drop` panics.
//!
//! Privileged tests start with `if !require_privileged() { return; }` and run one at a time
//! (`--test-threads=1`): kernel state (attachments, pinned maps) is shared.
//!
//! Safety rules the harness keeps: nothing is attached or created outside the test-owned cgroup
//! subtree; traffic only goes to loopback or to namespaces the harness created; every wait is
//! bounded. What a killed test process left behind (no `Drop` ran) is removed by the next harness
//! start ([`sweep`]): every resource name carries its owner's pid.

pub mod abuse;
pub mod bench;
pub mod cgroup;
pub mod checks;
pub mod cluster;
pub mod daemon;
pub mod dual_link;
pub mod k8s;
pub mod node;
pub mod peer;
pub mod process;
pub mod rpc;
pub mod servers;
pub mod sweep;
pub mod tools;
pub mod upgrade;
pub mod util;

pub use cgroup::{cgroup2_mount, try_cgroup2_mount};
pub use daemon::Daemon;
pub use node::{Pod, VirtualNode};
pub use process::{exec_in, pod_exec, run_host, spawn_in, GuardedChild, LineChild};
pub use servers::Server;
pub use util::{
    attached_programs, eventually, last_json, peer_bin, peer_command, peers_dir, python, require_privileged,
    require_root, sockmesh_bin, workspace_root, TempDir,
};
