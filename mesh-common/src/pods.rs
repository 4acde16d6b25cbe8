//! `SM_PODS`: cgroup id → the enrolled pod that owns sockets created in that cgroup.

use core::mem::{offset_of, size_of};

/// No per-pod option.
pub const POD_FLAG_NONE: u32 = 0;
/// Kernel colour propagation: the pod's outbound proxy-bound sockets get a colour ledger
/// (`SM_LEDGER`) and the sending thread's colour is recorded per stream offset.
pub const POD_FLAG_PROPAGATE: u32 = 1 << 0;
/// Bits 8..16 of [`PodInfo::flags`] hold the pod's own colour id (1..=255; 0 = base, no colour).
pub const POD_COLOUR_SHIFT: u32 = 8;
pub const POD_COLOUR_MASK: u32 = 0xff << POD_COLOUR_SHIFT;

/// `PodInfo::flags` for a pod with the given options.
pub const fn pod_flags(propagate: bool, colour: u8) -> u32 {
    let mut f = POD_FLAG_NONE;
    if propagate {
        f |= POD_FLAG_PROPAGATE;
    }
    f | ((colour as u32) << POD_COLOUR_SHIFT)
}

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

    /// The pod's colour id (0 = base).
    pub const fn colour(&self) -> u8 {
        ((self.flags & POD_COLOUR_MASK) >> POD_COLOUR_SHIFT) as u8
    }

    /// Kernel colour propagation is on for the pod.
    pub const fn propagate(&self) -> bool {
        self.flags & POD_FLAG_PROPAGATE != 0
    }
}

/// How many cgroup ancestor levels the connect hook walks to find an enrolled pod (so processes
/// in a pod's child cgroups, such as per-container cgroups, are captured too).
pub const MAX_ANCESTOR_WALK: u32 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_carry_propagate_and_colour_independently() {
        assert_eq!(pod_flags(false, 0), POD_FLAG_NONE);
        let p = PodInfo::new(1, pod_flags(true, 0), 9);
        assert!(p.propagate());
        assert_eq!(p.colour(), 0);
        let p = PodInfo::new(1, pod_flags(false, 255), 9);
        assert!(!p.propagate());
        assert_eq!(p.colour(), 255);
        let p = PodInfo::new(1, pod_flags(true, 7), 9);
        assert!(p.propagate());
        assert_eq!(p.colour(), 7);
        assert_eq!(p.flags, 1 | (7 << 8));
    }
}
