//! `SM_PODS`: cgroup id → the enrolled pod that owns sockets created in that cgroup.

use core::mem::{offset_of, size_of};

/// Reserved for per-pod options (colour, inbound capture) as they land.
pub const POD_FLAG_NONE: u32 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The daemon's id for the pod (1-based; 0 is never used).
    pub pod_id: u32,
    pub flags: u32,
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`). A socket of the pod's cgroup
    /// living in another netns is not captured: the pod's listener is not there.
    pub netns_cookie: u64,
}

const _: () = {
    assert!(size_of::<PodInfo>() == 16);
    assert!(offset_of!(PodInfo, flags) == 4);
    assert!(offset_of!(PodInfo, netns_cookie) == 8);
};

impl PodInfo {
    pub const fn new(pod_id: u32, flags: u32, netns_cookie: u64) -> Self {
        Self {
            pod_id,
            flags,
            netns_cookie,
        }
    }
}

/// How many cgroup ancestor levels the connect hook walks to find an enrolled pod (so processes
/// in a pod's child cgroups, such as per-container cgroups, are captured too).
pub const MAX_ANCESTOR_WALK: u32 = 8;
