//! Connection identity and original destinations.
//!
//! A captured connection has two local sockets in the pod's netns: the app's (client) and the
//! daemon's accepted one (proxy). Every pod uses 127.0.0.1, so keys carry the netns cookie.
//! IPv4-mapped IPv6 endpoints are normalised to IPv4 so that an AF_INET6 app socket and the
//! AF_INET proxy socket it reaches name the same connection.

use core::mem::{offset_of, size_of};

use crate::{addr, AF_INET, AF_INET6};

/// One end's view of a TCP connection inside a netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub netns_cookie: u64,
    /// `AF_INET` or `AF_INET6` after normalisation.
    pub family: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub local_ip_be: [u32; 4],
    pub remote_ip_be: [u32; 4],
}

const _: () = {
    assert!(size_of::<ConnTuple>() == 48);
    assert!(offset_of!(ConnTuple, family) == 8);
    assert!(offset_of!(ConnTuple, local_port) == 12);
    assert!(offset_of!(ConnTuple, remote_port) == 14);
    assert!(offset_of!(ConnTuple, local_ip_be) == 16);
    assert!(offset_of!(ConnTuple, remote_ip_be) == 32);
};

impl ConnTuple {
    /// Build a tuple from a socket's view. `family` is the socket's; IPv4 addresses live in word 0
    /// when `family == AF_INET`. IPv4-mapped IPv6 endpoints become `AF_INET`.
    pub const fn new(
        netns_cookie: u64,
        family: u32,
        local_ip_be: [u32; 4],
        local_port: u16,
        remote_ip_be: [u32; 4],
        remote_port: u16,
    ) -> Self {
        let mut t = Self {
            netns_cookie,
            family,
            local_port,
            remote_port,
            local_ip_be,
            remote_ip_be,
        };
        if family == AF_INET6 {
            if let (Some(l), Some(r)) = (addr::v4_mapped(&local_ip_be), addr::v4_mapped(&remote_ip_be)) {
                t.family = AF_INET;
                t.local_ip_be = [l, 0, 0, 0];
                t.remote_ip_be = [r, 0, 0, 0];
            }
        } else {
            t.local_ip_be = [local_ip_be[0], 0, 0, 0];
            t.remote_ip_be = [remote_ip_be[0], 0, 0, 0];
        }
        t
    }

    /// The same connection seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            family: self.family,
            local_port: self.remote_port,
            remote_port: self.local_port,
            local_ip_be: self.remote_ip_be,
            remote_ip_be: self.local_ip_be,
        }
    }
}

/// The app asked for an IPv4 destination through an AF_INET6 socket (`::ffff:a.b.c.d`).
pub const ORIG_FLAG_V4_MAPPED: u32 = 1 << 0;

/// The connecting pod has kernel colour propagation on (`POD_FLAG_PROPAGATE`): sockops gives the
/// app socket a colour ledger and puts it in `SM_SOCKS` for the sk_msg program.
pub const ORIG_FLAG_PROPAGATE: u32 = 1 << 1;

/// The connect was routed in the kernel straight to an endpoint (no proxy): `getpeername`
/// rewrites whatever the peer is, and sockops drops the flow record when the app socket closes.
pub const ORIG_FLAG_KERNEL: u32 = 1 << 2;

/// Where the app meant to connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// `AF_INET` (also for IPv4-mapped destinations) or `AF_INET6`.
    pub family: u32,
    pub port_be: u16,
    pub _pad0: u16,
    /// IPv4 in word 0 when `family == AF_INET`.
    pub ip_be: [u32; 4],
    pub pod_id: u32,
    pub flags: u32,
}

const _: () = {
    assert!(size_of::<OrigDst>() == 32);
    assert!(offset_of!(OrigDst, port_be) == 4);
    assert!(offset_of!(OrigDst, ip_be) == 8);
    assert!(offset_of!(OrigDst, pod_id) == 24);
    assert!(offset_of!(OrigDst, flags) == 28);
};

impl OrigDst {
    pub const fn v4(ip_be: u32, port: u16, pod_id: u32, flags: u32) -> Self {
        Self {
            family: AF_INET,
            port_be: port.to_be(),
            _pad0: 0,
            ip_be: [ip_be, 0, 0, 0],
            pod_id,
            flags,
        }
    }

    pub const fn v6(ip_be: [u32; 4], port: u16, pod_id: u32) -> Self {
        Self {
            family: AF_INET6,
            port_be: port.to_be(),
            _pad0: 0,
            ip_be,
            pod_id,
            flags: 0,
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }

    /// The same destination with `flag` added.
    pub const fn with_flag(mut self, flag: u32) -> Self {
        self.flags |= flag;
        self
    }

    /// The destination as an AF_INET6 socket's `getpeername()` would report it.
    pub const fn as_v6_words(&self) -> [u32; 4] {
        if self.family == AF_INET {
            addr::map_v4(self.ip_be[0])
        } else {
            self.ip_be
        }
    }
}

#[cfg(feature = "user")]
mod user {
    extern crate std;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    fn words_to_v6(w: &[u32; 4]) -> Ipv6Addr {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
        }
        Ipv6Addr::from(b)
    }

    /// Address words from a std address; IPv4 in word 0.
    pub fn ip_to_words(ip: IpAddr) -> [u32; 4] {
        match ip {
            IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let mut w = [0u32; 4];
                for (i, x) in w.iter_mut().enumerate() {
                    *x = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
                }
                w
            }
        }
    }

    impl OrigDst {
        pub fn socket_addr(&self) -> SocketAddr {
            let ip = if self.family == AF_INET {
                IpAddr::V4(Ipv4Addr::from(self.ip_be[0].to_ne_bytes()))
            } else {
                IpAddr::V6(words_to_v6(&self.ip_be))
            };
            SocketAddr::new(ip, self.port())
        }
    }

    impl ConnTuple {
        /// Tuple for a socket of a netns, from std addresses.
        pub fn from_addrs(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> Self {
            let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
            ConnTuple::new(
                netns_cookie,
                family,
                ip_to_words(local.ip()),
                local.port(),
                ip_to_words(remote.ip()),
                remote.port(),
            )
        }
    }
}

#[cfg(feature = "user")]
pub use user::ip_to_words;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{map_v4, LOOPBACK_V4};

    #[test]
    fn v4_mapped_app_socket_matches_v4_proxy_socket() {
        let app_port = 40000;
        let app = ConnTuple::new(
            7,
            AF_INET6,
            map_v4(LOOPBACK_V4),
            app_port,
            map_v4(LOOPBACK_V4),
            15001,
        );
        let proxy = ConnTuple::new(
            7,
            AF_INET,
            [LOOPBACK_V4, 0, 0, 0],
            15001,
            [LOOPBACK_V4, 9, 9, 9],
            app_port,
        );
        assert_eq!(app.family, AF_INET);
        assert_eq!(app, proxy.reversed());
    }

    #[test]
    fn netns_cookie_separates_pods() {
        let a = ConnTuple::new(1, AF_INET, [LOOPBACK_V4, 0, 0, 0], 1, [LOOPBACK_V4, 0, 0, 0], 2);
        let b = ConnTuple::new(2, AF_INET, [LOOPBACK_V4, 0, 0, 0], 1, [LOOPBACK_V4, 0, 0, 0], 2);
        assert_ne!(a, b);
    }

    #[test]
    fn orig_dst_port_and_mapped_form() {
        let ip = u32::from_ne_bytes([198, 18, 0, 3]);
        let o = OrigDst::v4(ip, 8080, 3, ORIG_FLAG_V4_MAPPED);
        assert_eq!(o.port(), 8080);
        assert_eq!(o.as_v6_words(), map_v4(ip));
    }
}
