//! Inbound capture: `sk_lookup` in an enrolled pod's netns hands connections for the pod's
//! meshed ports to the daemon's inbound listener for that pod (held in `SM_LISTENERS`), without
//! iptables and without packet NAT: the accepted socket's local address is the original
//! destination.

use core::mem::{offset_of, size_of};

use crate::{AF_INET, AF_INET6};

/// `lo` is ifindex 1 in every network namespace. Lookups for packets that arrive on it are
/// never captured: that is how the daemon delivers to the application (and how a pod talks to
/// itself) without being captured again.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The port of an [`InboundKey`] that stands for every port of the address (all ports meshed,
/// minus the exclusions in `SM_INBOUND_EXCL`).
pub const ANY_PORT: u16 = 0;

/// A pod address and a meshed port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// IPv4 in word 0.
    pub ip_be: [u32; 4],
}

const _: () = {
    assert!(size_of::<InboundKey>() == 24);
    assert!(offset_of!(InboundKey, port) == 4);
    assert!(offset_of!(InboundKey, ip_be) == 8);
};

impl InboundKey {
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self {
            family: AF_INET,
            port: port as u32,
            ip_be: [ip_be, 0, 0, 0],
        }
    }

    pub const fn v6(ip_be: [u32; 4], port: u16) -> Self {
        Self {
            family: AF_INET6,
            port: port as u32,
            ip_be,
        }
    }

    /// The same address with another port.
    pub const fn with_port(&self, port: u16) -> Self {
        Self {
            family: self.family,
            port: port as u32,
            ip_be: self.ip_be,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundTarget {
    /// Index into `SM_LISTENERS`.
    pub slot: u32,
    pub pod_id: u32,
}

const _: () = assert!(size_of::<InboundTarget>() == 8);

/// The listener slot of a pod for one family: two per pod id, so slots never collide.
pub const fn listener_slot(pod_id: u32, v6: bool) -> u32 {
    pod_id * 2 + if v6 { 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_per_pod_and_family() {
        assert_eq!(listener_slot(1, false), 2);
        assert_eq!(listener_slot(1, true), 3);
        assert_eq!(listener_slot(2, false), 4);
        assert!(listener_slot(crate::maps::PODS_MAX, true) < crate::maps::LISTENERS_MAX);
    }

    #[test]
    fn keys_zero_unused_words() {
        let k = InboundKey::v4(0x0300_12c6, 8080);
        assert_eq!(k.ip_be[1..], [0, 0, 0]);
        assert_eq!(k.port, 8080);
    }
}
