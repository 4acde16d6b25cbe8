//! Kernel colour propagation through thread-per-request apps (no SDK, no header forwarding).
//!
//! 1. The proxy marks an inbound connection with a colour: `SM_COLOUR_IN`
//!    ([`InboundColourKey`] → `u32` colour), written before it delivers the request bytes.
//! 2. `tp_btf/sock_recv_length` runs in the app thread that reads them: the socket's tuple is
//!    looked up there and the thread's colour is remembered (`SM_TID_COLOUR`, tid → colour).
//!    An uncoloured (0) entry clears it; `tp_btf/sock_send_length` on such a socket (the app
//!    writing its response) clears it too: the request scope ends.
//! 3. `sk_msg` on the app's outbound, proxy-bound socket (a pod with `POD_FLAG_PROPAGATE`) reads
//!    the sending thread's colour and records it in the socket's [`Ledger`]
//!    (`SM_LEDGER`, keyed by the app-side `ConnTuple`) at the message's stream offset. No
//!    byte of the stream changes.
//! 4. The proxy, parsing a request that starts at stream offset `o` of that connection, asks
//!    [`Ledger::lookup`]`(o)`.
//!
//! Colour ids are small numbers 1..=255; 0 is the base (no colour).

use core::mem::{offset_of, size_of};

use crate::{AF_INET, AF_INET6};

/// The app's accepted (inbound) socket as the app sees it: local = the pod address and port,
/// remote = the proxy's delivering socket. Ports in host order. IPv4 only (IPv4-mapped IPv6
/// sockets are normalised to IPv4); the recv hook reads no IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundColourKey {
    pub family: u32,
    pub local_port: u16,
    pub remote_port: u16,
    /// IPv4 in word 0, the other words zero.
    pub local_ip_be: [u32; 4],
    pub remote_ip_be: [u32; 4],
}

const _: () = {
    assert!(size_of::<InboundColourKey>() == 40);
    assert!(offset_of!(InboundColourKey, local_port) == 4);
    assert!(offset_of!(InboundColourKey, remote_port) == 6);
    assert!(offset_of!(InboundColourKey, local_ip_be) == 8);
    assert!(offset_of!(InboundColourKey, remote_ip_be) == 24);
};

impl InboundColourKey {
    pub const fn v4(local_ip_be: u32, local_port: u16, remote_ip_be: u32, remote_port: u16) -> Self {
        Self {
            family: AF_INET,
            local_port,
            remote_port,
            local_ip_be: [local_ip_be, 0, 0, 0],
            remote_ip_be: [remote_ip_be, 0, 0, 0],
        }
    }
}

/// The first 18 bytes of `struct sock_common`, as the recv/send hooks read them with one
/// `bpf_probe_read_kernel`. These offsets have not moved in a decade (the tracepoints
/// themselves need 6.3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCommonHead {
    /// `skc_daddr` (network order).
    pub daddr_be: u32,
    /// `skc_rcv_saddr` (network order).
    pub rcv_saddr_be: u32,
    /// `skc_hash`.
    pub hash: u32,
    /// `skc_dport` (network order).
    pub dport_be: u16,
    /// `skc_num` (host order).
    pub num: u16,
    /// `skc_family`.
    pub family: u16,
}

const _: () = {
    assert!(offset_of!(SockCommonHead, rcv_saddr_be) == 4);
    assert!(offset_of!(SockCommonHead, dport_be) == 12);
    assert!(offset_of!(SockCommonHead, num) == 14);
    assert!(offset_of!(SockCommonHead, family) == 16);
};

/// `LOOPBACK4_IPV6` (127.0.0.6): what the kernel puts in `skc_daddr`/`skc_rcv_saddr` of an
/// AF_INET6 socket whose peer is real IPv6. Any other value on an AF_INET6 socket is the IPv4
/// address of an IPv4-mapped connection.
pub const LOOPBACK4_IPV6_BE: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

impl SockCommonHead {
    /// The key of this socket, or `None` for a socket the hooks cannot name (not IP, or a real
    /// IPv6 connection).
    pub const fn inbound_key(&self) -> Option<InboundColourKey> {
        let fam = self.family as u32;
        if fam == AF_INET || (fam == AF_INET6 && self.daddr_be != LOOPBACK4_IPV6_BE && self.daddr_be != 0) {
            Some(InboundColourKey::v4(
                self.rcv_saddr_be,
                self.num,
                self.daddr_be,
                u16::from_be(self.dport_be),
            ))
        } else {
            None
        }
    }
}

/// `SM_COLOUR_PORTS`: `Array<u64>` of [`PORT_WORDS`] words, bit `p` set while local port `p` may
/// have an inbound colour entry. The recv hook, which runs on every recvmsg of the host, looks at
/// this bit before it builds a key and hashes it.
pub const PORT_WORDS: u32 = 1024;

/// (word index, bit) of a port in `SM_COLOUR_PORTS`.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port as u32) >> 6, 1u64 << (port & 63))
}

/// Slots in a [`Ledger`] ring (a power of two). Only colour *changes* take a slot, so a
/// connection may run this many changes ahead of the proxy's lookups.
pub const LEDGER_SLOTS: usize = 16;

const _: () = assert!(LEDGER_SLOTS.is_power_of_two());

/// From `offset` (inclusive) the stream carries `colour`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerSlot {
    pub offset: u64,
    pub colour: u32,
    pub _pad: u32,
}

/// `SM_LEDGER` value: one propagating app socket's colour changes by stream offset.
/// Created zeroed at sockops ACTIVE_ESTABLISHED (so `sent_bytes` counts from the first byte),
/// updated in place by sk_msg under the socket lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ledger {
    /// Bytes the app has sent on the socket (the next message's stream offset).
    pub sent_bytes: u64,
    /// Colour of the last message (0 at the start).
    pub last_colour: u32,
    /// Changes recorded so far; the next one goes to slot `changes % LEDGER_SLOTS`.
    pub changes: u32,
    pub slots: [LedgerSlot; LEDGER_SLOTS],
}

const _: () = {
    assert!(size_of::<LedgerSlot>() == 16);
    assert!(size_of::<Ledger>() == 16 + 16 * LEDGER_SLOTS);
    assert!(offset_of!(Ledger, last_colour) == 8);
    assert!(offset_of!(Ledger, changes) == 12);
    assert!(offset_of!(Ledger, slots) == 16);
};

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    pub const fn new() -> Self {
        Self {
            sent_bytes: 0,
            last_colour: 0,
            changes: 0,
            slots: [LedgerSlot {
                offset: 0,
                colour: 0,
                _pad: 0,
            }; LEDGER_SLOTS],
        }
    }

    /// A message starting at `msg_offset` carries `colour`: append a slot when the colour
    /// changes (wrapping the ring). Returns whether a slot was written.
    #[inline(always)]
    pub fn record(&mut self, msg_offset: u64, colour: u32) -> bool {
        if colour == self.last_colour {
            return false;
        }
        let i = (self.changes as usize) & (LEDGER_SLOTS - 1);
        self.slots[i] = LedgerSlot {
            offset: msg_offset,
            colour,
            _pad: 0,
        };
        self.last_colour = colour;
        self.changes = self.changes.wrapping_add(1);
        true
    }

    /// sk_msg: a message of `size` bytes sent by a thread of `colour`. Records at the current
    /// stream offset, then advances it. Returns whether a slot was written.
    #[inline(always)]
    pub fn on_message(&mut self, size: u32, colour: u32) -> bool {
        let recorded = self.record(self.sent_bytes, colour);
        self.sent_bytes += size as u64;
        recorded
    }

    /// The colour of the stream at `offset`: that of the last change at or before it, 0 before
    /// any change. `None` when the ring has wrapped past the change that covers `offset` (the
    /// proxy fell more than [`LEDGER_SLOTS`] changes behind).
    pub fn lookup(&self, offset: u64) -> Option<u32> {
        let n = self.changes as usize;
        let kept = if n < LEDGER_SLOTS { n } else { LEDGER_SLOTS };
        let first = n - kept;
        let mut found: Option<u32> = None;
        let mut k = first;
        while k < n {
            let s = &self.slots[k & (LEDGER_SLOTS - 1)];
            if s.offset <= offset {
                found = Some(s.colour);
            } else {
                break;
            }
            k += 1;
        }
        match found {
            Some(c) => Some(c),
            // Before every kept change: the base colour if nothing was dropped.
            None if first == 0 => Some(0),
            None => None,
        }
    }

    /// [`Ledger::lookup`] with an evicted offset read as base (0).
    pub fn colour_at(&self, offset: u64) -> u32 {
        self.lookup(offset).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_ledger_is_base_everywhere() {
        let l = Ledger::new();
        assert_eq!(l.lookup(0), Some(0));
        assert_eq!(l.colour_at(12345), 0);
    }

    #[test]
    fn records_only_changes_and_looks_up_by_offset() {
        let mut l = Ledger::new();
        // offsets: 0 (c0, no slot), 100 (c2), 150 (c2, no slot), 200 (c1), 260 (c0)
        assert!(!l.on_message(100, 0));
        assert!(l.on_message(50, 2));
        assert!(!l.on_message(50, 2));
        assert!(l.on_message(60, 1));
        assert!(l.on_message(10, 0));
        assert_eq!(l.changes, 3);
        assert_eq!(l.sent_bytes, 270);
        assert_eq!(l.colour_at(0), 0);
        assert_eq!(l.colour_at(99), 0);
        assert_eq!(l.colour_at(100), 2);
        assert_eq!(l.colour_at(150), 2);
        assert_eq!(l.colour_at(199), 2);
        assert_eq!(l.colour_at(200), 1);
        assert_eq!(l.colour_at(260), 0);
        assert_eq!(l.colour_at(10_000), 0);
    }

    #[test]
    fn wrapping_keeps_the_last_slots_and_reports_evicted_offsets() {
        let mut l = Ledger::new();
        // Alternate colours 1, 2, 1, 2 ... one 10-byte message each: every message is a change.
        let total = LEDGER_SLOTS as u64 * 3 + 5;
        for i in 0..total {
            assert!(l.on_message(10, 1 + (i % 2) as u32));
        }
        assert_eq!(l.changes as u64, total);
        let oldest_kept = (total - LEDGER_SLOTS as u64) * 10;
        // Everything older than the oldest kept change is unknown, not base.
        assert_eq!(l.lookup(0), None);
        assert_eq!(l.lookup(oldest_kept - 1), None);
        assert_eq!(l.colour_at(oldest_kept - 1), 0);
        for i in (total - LEDGER_SLOTS as u64)..total {
            let want = 1 + (i % 2) as u32;
            assert_eq!(l.lookup(i * 10), Some(want), "message {i}");
            assert_eq!(l.lookup(i * 10 + 9), Some(want), "inside message {i}");
        }
    }

    #[test]
    fn same_offset_twice_takes_the_later() {
        let mut l = Ledger::new();
        assert!(l.record(40, 1));
        assert!(l.record(40, 3));
        assert_eq!(l.lookup(40), Some(3));
        assert_eq!(l.lookup(39), Some(0));
    }

    #[test]
    fn sock_common_head_keys() {
        let ip = u32::from_ne_bytes([198, 18, 0, 3]);
        let peer = u32::from_ne_bytes([198, 18, 0, 3]);
        let h = SockCommonHead {
            daddr_be: peer,
            rcv_saddr_be: ip,
            hash: 0,
            dport_be: 40000u16.to_be(),
            num: 8080,
            family: AF_INET as u16,
        };
        assert_eq!(h.inbound_key(), Some(InboundColourKey::v4(ip, 8080, peer, 40000)));
        // An IPv4-mapped AF_INET6 socket names the same connection.
        let mapped = SockCommonHead {
            family: AF_INET6 as u16,
            ..h
        };
        assert_eq!(mapped.inbound_key(), h.inbound_key());
        // A real IPv6 connection, and a unix socket, have no key.
        let v6 = SockCommonHead {
            daddr_be: LOOPBACK4_IPV6_BE,
            ..mapped
        };
        assert_eq!(v6.inbound_key(), None);
        let unix = SockCommonHead { family: 1, ..h };
        assert_eq!(unix.inbound_key(), None);
    }

    #[test]
    fn port_bits() {
        assert_eq!(port_bit(0), (0, 1));
        assert_eq!(port_bit(63), (0, 1 << 63));
        assert_eq!(port_bit(64), (1, 1));
        assert_eq!(port_bit(65535), (PORT_WORDS - 1, 1 << 63));
    }
}
