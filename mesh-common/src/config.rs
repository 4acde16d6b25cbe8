//! `SM_CONFIG`: the one-slot array every hook reads first.

use core::mem::{offset_of, size_of};

/// Capture is on. Cleared by the daemon while it shuts down, before it detaches.
pub const FLAG_ENABLED: u32 = 1 << 0;
/// Put local app↔proxy socket pairs in `SM_SOCKS` and short-circuit them with sk_msg.
pub const FLAG_ACCELERATE: u32 = 1 << 1;
/// Emit aya-log records from the hooks (off: the log calls are skipped by one branch).
pub const FLAG_LOG: u32 = 1 << 2;

/// Colour propagation is available (tracepoints and sk_msg attached): sockops gives the
/// sockets of `POD_FLAG_PROPAGATE` pods a ledger and puts them in `SM_SOCKS`.
pub const FLAG_PROPAGATE: u32 = 1 << 3;

/// Default per-message ceiling for the short-circuit: a larger write means bulk transfer, where
/// ingress redirect has no backpressure, so the flow falls back to TCP for good.
pub const DEFAULT_ACCEL_MAX_MSG: u32 = 16 * 1024;
/// Default bytes a flow may move through the short-circuit before it falls back for good.
pub const DEFAULT_ACCEL_FLOW_BUDGET: u64 = 16 * 1024 * 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    pub abi_version: u32,
    pub flags: u32,
    /// Outbound listener port inside each pod netns, host byte order.
    pub outbound_port: u16,
    /// Inbound listener port inside each pod netns, host byte order.
    pub inbound_port: u16,
    /// `SO_MARK` of the daemon's own sockets.
    pub daemon_mark: u32,
    pub accel_max_msg: u32,
    /// Depth of `cgroup_root` below the cgroup v2 mount (the mount is level 0).
    pub cgroup_root_level: u32,
    pub accel_flow_budget: u64,
    /// cgroup id of `cgroup_root`; 0: unknown. The colour tracepoints, which the kernel runs for
    /// every task of the host, act only for tasks below it.
    pub cgroup_root_id: u64,
}

const _: () = {
    assert!(size_of::<MeshConfig>() == 40);
    assert!(offset_of!(MeshConfig, flags) == 4);
    assert!(offset_of!(MeshConfig, outbound_port) == 8);
    assert!(offset_of!(MeshConfig, inbound_port) == 10);
    assert!(offset_of!(MeshConfig, daemon_mark) == 12);
    assert!(offset_of!(MeshConfig, accel_max_msg) == 16);
    assert!(offset_of!(MeshConfig, cgroup_root_level) == 20);
    assert!(offset_of!(MeshConfig, accel_flow_budget) == 24);
    assert!(offset_of!(MeshConfig, cgroup_root_id) == 32);
};

impl MeshConfig {
    pub const fn new(flags: u32, outbound_port: u16, inbound_port: u16, daemon_mark: u32) -> Self {
        Self {
            abi_version: crate::ABI_VERSION,
            flags,
            outbound_port,
            inbound_port,
            daemon_mark,
            accel_max_msg: DEFAULT_ACCEL_MAX_MSG,
            cgroup_root_level: 0,
            accel_flow_budget: DEFAULT_ACCEL_FLOW_BUDGET,
            cgroup_root_id: 0,
        }
    }

    /// True when the hooks may act: the right ABI and capture enabled.
    pub const fn active(&self) -> bool {
        self.abi_version == crate::ABI_VERSION && self.flags & FLAG_ENABLED != 0
    }

    pub const fn accelerate(&self) -> bool {
        self.active() && self.flags & FLAG_ACCELERATE != 0
    }

    pub const fn propagate(&self) -> bool {
        self.active() && self.flags & FLAG_PROPAGATE != 0
    }

    pub const fn log(&self) -> bool {
        self.flags & FLAG_LOG != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inactive_on_abi_mismatch_or_disabled() {
        let mut c = MeshConfig::new(FLAG_ENABLED | FLAG_ACCELERATE, 15001, 15006, 7);
        assert!(c.active() && c.accelerate());
        c.abi_version += 1;
        assert!(!c.active() && !c.accelerate());
        let c = MeshConfig::new(FLAG_ACCELERATE, 15001, 15006, 7);
        assert!(!c.active() && !c.accelerate());
    }
}
