//! Address helpers. IP addresses are kept as the kernel hands them: `[u32; 4]` words whose
//! memory bytes are in network order (`*_be`); IPv4 uses word 0 only. Ports are normalised to
//! host order at the edge of each hook, because every context stores them differently:
//! - `bpf_sock_addr.user_port`: network order in the low 16 bits;
//! - `bpf_sock_ops.remote_port`, `sk_msg_md.remote_port`: network order shifted left by 16;
//! - `bpf_sock_ops.local_port`, `sk_msg_md.local_port`, `bpf_sock.src_port`: host order;
//! - `bpf_sock.dst_port`: network order in the low 16 bits.

/// `user_port` (network order, low 16 bits) → host order.
pub const fn port_from_user_port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// Host order → `user_port`.
pub const fn user_port_from_port(port: u16) -> u32 {
    port.to_be() as u32
}

/// `remote_port` of sock_ops / sk_msg (network order << 16) → host order.
pub const fn port_from_shifted_be(remote_port: u32) -> u16 {
    u16::from_be((remote_port >> 16) as u16)
}

/// The second byte-word of `::ffff:0:0/96`, as it sits in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `Some(v4)` when `ip6` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
pub const fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD {
        Some(ip6[3])
    } else {
        None
    }
}

/// `::ffff:a.b.c.d` for an IPv4 address word.
pub const fn map_v4(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4_be]
}

/// `127.0.0.0/8`.
pub const fn is_loopback_v4(ip4_be: u32) -> bool {
    ip4_be.to_ne_bytes()[0] == 127
}

/// `::1`, or an IPv4-mapped loopback address.
pub const fn is_loopback_v6(ip6: &[u32; 4]) -> bool {
    if let Some(v4) = v4_mapped(ip6) {
        return is_loopback_v4(v4);
    }
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

/// `0.0.0.0` or `::` (a connect to "any" reaches a local listener; never captured).
pub const fn is_unspecified(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && (ip6[2] == 0 || ip6[2] == V4_MAPPED_WORD) && ip6[3] == 0
}

/// `127.0.0.1` as an address word.
pub const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1` as address words.
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_trip_each_context_order() {
        // user_port for 8080 holds bytes 0x1f 0x90 in memory order.
        let up = user_port_from_port(8080);
        assert_eq!(up.to_ne_bytes()[..2], [0x1f, 0x90]);
        assert_eq!(port_from_user_port(up), 8080);
        let shifted = (8080u16.to_be() as u32) << 16;
        assert_eq!(port_from_shifted_be(shifted), 8080);
    }

    #[test]
    fn v4_mapped_and_loopback() {
        let ip = u32::from_ne_bytes([198, 18, 0, 3]);
        let m = map_v4(ip);
        assert_eq!(v4_mapped(&m), Some(ip));
        assert!(!is_loopback_v6(&m));
        assert!(is_loopback_v6(&map_v4(LOOPBACK_V4)));
        assert!(is_loopback_v6(&LOOPBACK_V6));
        assert!(is_loopback_v4(u32::from_ne_bytes([127, 9, 9, 9])));
        assert!(!is_loopback_v4(ip));
        assert_eq!(v4_mapped(&LOOPBACK_V6), None);
        assert!(is_unspecified(&[0; 4]));
        assert!(is_unspecified(&map_v4(0)));
        assert!(!is_unspecified(&m));
        // std agrees on the mapped form.
        let std_m = std::net::Ipv4Addr::new(198, 18, 0, 3).to_ipv6_mapped().octets();
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_ne_bytes(std_m[i * 4..i * 4 + 4].try_into().unwrap());
        }
        assert_eq!(words, m);
    }
}

#[cfg(test)]
extern crate std;
