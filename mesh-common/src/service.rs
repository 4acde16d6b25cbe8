//! The policy table in the kernel: L4 services routed inside `connect()`.
//!
//! The daemon compiles every service of the live policy that qualifies for the kernel path
//! (`mode = "kernel"`: opaque TCP, one catch-all route, no colours) into three maps:
//!
//! - `SM_SVC` (`HashMap<SvcKey, SvcEntry>`): VIP:port → the service's slot, its live endpoint
//!   table half, how many entries it has and the policy generation it was written for;
//! - `SM_SVC_EP` (`Array<SvcEndpoint>`): two halves of [`SVC_SLOTS`] × [`SVC_MAX_ENDPOINTS`]
//!   entries. Entry `i` of a service is one (subset, endpoint) pair of its route's split with
//!   its cumulative weight;
//! - `SM_SVC_COUNT` (`PerCpuArray<u64>`): connects routed per (service slot, entry).
//!
//! **Never half-written.** An update writes every service's endpoints into the half no entry
//! points at, then rewrites each `SM_SVC` entry (one map update, so one atomic value) to point
//! at it. A connect reads its entry once and then only the half it names.
//!
//! **Choice.** Weights are normalised by the daemon to [`WEIGHT_SCALE`] (2^24) and stored
//! cumulatively; the hook takes 24 bits of `bpf_get_prandom_u32()` and picks the first entry
//! whose cumulative weight is above it ([`choose`]). A zero-width entry (weight 0, or an
//! endpoint the daemon marked down) is never chosen but keeps its counter slot.

use core::mem::{offset_of, size_of};

use crate::{AF_INET, AF_INET6};

/// Kernel-routed services at once (slots).
pub const SVC_SLOTS: u32 = 256;
/// (subset, endpoint) entries per kernel-routed service.
pub const SVC_MAX_ENDPOINTS: u32 = 32;
/// VIP:port keys in `SM_SVC` (a service may have several addresses).
pub const SVC_KEYS_MAX: u32 = 1024;
/// Entries of `SM_SVC_EP`: two halves.
pub const SVC_EP_ENTRIES: u32 = 2 * SVC_SLOTS * SVC_MAX_ENDPOINTS;
/// Entries of `SM_SVC_COUNT`.
pub const SVC_COUNT_ENTRIES: u32 = SVC_SLOTS * SVC_MAX_ENDPOINTS;

/// Bits of the random number the choice uses; cumulative weights end at `1 << WEIGHT_BITS`.
pub const WEIGHT_BITS: u32 = 24;
pub const WEIGHT_SCALE: u32 = 1 << WEIGHT_BITS;

/// `SvcEndpoint::flags`: the daemon marked the endpoint down (zero width).
pub const EP_FLAG_DOWN: u32 = 1 << 0;

/// A VIP:port as the connect hook sees it. IPv4 (also IPv4-mapped) in word 0 with `AF_INET`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcKey {
    pub family: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad0: u16,
    pub ip_be: [u32; 4],
}

const _: () = {
    assert!(size_of::<SvcKey>() == 24);
    assert!(offset_of!(SvcKey, port) == 4);
    assert!(offset_of!(SvcKey, ip_be) == 8);
};

impl SvcKey {
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self {
            family: AF_INET,
            port,
            _pad0: 0,
            ip_be: [ip_be, 0, 0, 0],
        }
    }

    pub const fn v6(ip_be: [u32; 4], port: u16) -> Self {
        Self {
            family: AF_INET6,
            port,
            _pad0: 0,
            ip_be,
        }
    }
}

/// `SM_SVC` value: where a service's endpoints are. Written whole by one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcEntry {
    /// Slot `0..SVC_SLOTS`: the service's place in each table half and in `SM_SVC_COUNT`.
    pub slot: u32,
    /// Which half of `SM_SVC_EP` holds this generation's endpoints (0 or 1).
    pub half: u32,
    /// Entries in use (`<= SVC_MAX_ENDPOINTS`).
    pub count: u32,
    /// The daemon's table generation this entry was written for.
    pub generation: u32,
}

const _: () = {
    assert!(size_of::<SvcEntry>() == 16);
    assert!(offset_of!(SvcEntry, half) == 4);
    assert!(offset_of!(SvcEntry, count) == 8);
    assert!(offset_of!(SvcEntry, generation) == 12);
};

impl SvcEntry {
    pub const fn new(slot: u32, half: u32, count: u32, generation: u32) -> Self {
        Self {
            slot,
            half,
            count,
            generation,
        }
    }

    /// Index of entry `i` of this service in `SM_SVC_EP`.
    pub const fn ep_index(&self, i: u32) -> u32 {
        ep_index(self.half, self.slot, i)
    }

    /// Index of entry `i` of this service in `SM_SVC_COUNT`.
    pub const fn count_index(&self, i: u32) -> u32 {
        count_index(self.slot, i)
    }
}

pub const fn ep_index(half: u32, slot: u32, i: u32) -> u32 {
    (half & 1) * SVC_SLOTS * SVC_MAX_ENDPOINTS + slot * SVC_MAX_ENDPOINTS + i
}

pub const fn count_index(slot: u32, i: u32) -> u32 {
    slot * SVC_MAX_ENDPOINTS + i
}

/// `SM_SVC_EP` value: one (subset, endpoint) entry of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcEndpoint {
    /// `AF_INET` or `AF_INET6`: always the VIP's family.
    pub family: u32,
    pub port_be: u16,
    pub _pad0: u16,
    /// IPv4 in word 0 when `family == AF_INET`.
    pub ip_be: [u32; 4],
    /// Cumulative weight up to and including this entry, out of [`WEIGHT_SCALE`].
    pub cum_weight: u32,
    pub flags: u32,
}

const _: () = {
    assert!(size_of::<SvcEndpoint>() == 32);
    assert!(offset_of!(SvcEndpoint, port_be) == 4);
    assert!(offset_of!(SvcEndpoint, ip_be) == 8);
    assert!(offset_of!(SvcEndpoint, cum_weight) == 24);
    assert!(offset_of!(SvcEndpoint, flags) == 28);
};

impl SvcEndpoint {
    pub const fn zeroed() -> Self {
        Self {
            family: 0,
            port_be: 0,
            _pad0: 0,
            ip_be: [0; 4],
            cum_weight: 0,
            flags: 0,
        }
    }

    pub const fn new(family: u32, ip_be: [u32; 4], port: u16, cum_weight: u32, flags: u32) -> Self {
        Self {
            family,
            port_be: port.to_be(),
            _pad0: 0,
            ip_be,
            cum_weight,
            flags,
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// The entry a connect goes to: the first of `count` entries whose cumulative weight is above
/// `rand`'s top [`WEIGHT_BITS`] bits. `cum(i)` reads entry `i`'s cumulative weight (`None`: the
/// map refused the index, stop). `None` when every entry has zero width (all down or weight 0).
/// The loop is bounded by [`SVC_MAX_ENDPOINTS`] for the verifier.
#[inline(always)]
pub fn choose(rand: u32, count: u32, mut cum: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
    let r = rand >> (32 - WEIGHT_BITS);
    let mut i = 0;
    while i < SVC_MAX_ENDPOINTS {
        if i >= count {
            return None;
        }
        if r < cum(i)? {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Cumulative weights out of [`WEIGHT_SCALE`] for `weights` (any scale; 0 = never chosen), into
/// `out` (same length). The last entry with a weight ends exactly at `WEIGHT_SCALE`, so no
/// random value falls past the table. Returns false when every weight is 0.
pub fn cumulative(weights: &[u64], out: &mut [u32]) -> bool {
    let total: u128 = weights.iter().map(|w| *w as u128).sum();
    let mut acc: u128 = 0;
    let last = weights.iter().rposition(|w| *w > 0);
    for (i, w) in weights.iter().enumerate() {
        acc += *w as u128;
        out[i] = if total == 0 {
            0
        } else if Some(i) >= last {
            WEIGHT_SCALE
        } else {
            // Round to nearest, so shares are exact to 2^-24.
            ((acc * WEIGHT_SCALE as u128 + total / 2) / total) as u32
        };
    }
    total > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(rand: u32, cum: &[u32]) -> Option<u32> {
        choose(rand, cum.len() as u32, |i| cum.get(i as usize).copied())
    }

    #[test]
    fn cumulative_weights_end_at_the_scale() {
        let mut out = [0u32; 3];
        assert!(cumulative(&[90, 10, 0], &mut out));
        assert_eq!(out[0], (0.9f64 * WEIGHT_SCALE as f64).round() as u32);
        assert_eq!(out[1], WEIGHT_SCALE);
        assert_eq!(out[2], WEIGHT_SCALE, "a trailing zero weight has zero width");
        let mut out = [7u32; 2];
        assert!(!cumulative(&[0, 0], &mut out));
        assert_eq!(out, [0, 0]);
        // Huge weights do not overflow.
        let mut out = [0u32; 2];
        assert!(cumulative(&[u64::MAX / 2, u64::MAX / 2], &mut out));
        assert_eq!(out, [WEIGHT_SCALE / 2, WEIGHT_SCALE]);
    }

    #[test]
    fn choice_follows_the_boundaries() {
        let mut cum = [0u32; 3];
        cumulative(&[90, 10, 0], &mut cum);
        assert_eq!(pick(0, &cum), Some(0));
        let edge = cum[0] << (32 - WEIGHT_BITS);
        assert_eq!(pick(edge - 1, &cum), Some(0));
        assert_eq!(pick(edge, &cum), Some(1));
        assert_eq!(pick(u32::MAX, &cum), Some(1));
        // A down or zero-weight entry first is skipped.
        let mut cum = [0u32; 2];
        cumulative(&[0, 5], &mut cum);
        assert_eq!(pick(0, &cum), Some(1));
        // Nothing up: no choice.
        assert_eq!(pick(0, &[0, 0]), None);
        assert_eq!(pick(0, &[]), None);
        // A map that refuses an index stops the walk.
        assert_eq!(choose(u32::MAX, 2, |i| (i == 0).then_some(1)), None);
    }

    #[test]
    fn shares_over_the_whole_random_range_match_the_weights() {
        // Every 2^12th random value: 2^20 draws spread evenly over the range.
        let mut cum = [0u32; 4];
        let weights = [90u64, 10, 0, 3];
        cumulative(&weights, &mut cum);
        let mut hits = [0u64; 4];
        let mut r: u64 = 0;
        while r <= u32::MAX as u64 {
            hits[pick(r as u32, &cum).unwrap() as usize] += 1;
            r += 1 << 12;
        }
        let n: u64 = hits.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let want = *w as f64 / 103.0;
            let got = hits[i] as f64 / n as f64;
            assert!((got - want).abs() < 1e-4, "entry {i}: {got} vs {want}");
        }
    }

    #[test]
    fn indexes_stay_inside_the_maps() {
        let e = SvcEntry::new(SVC_SLOTS - 1, 1, SVC_MAX_ENDPOINTS, 1);
        assert_eq!(e.ep_index(SVC_MAX_ENDPOINTS - 1), SVC_EP_ENTRIES - 1);
        assert_eq!(e.count_index(SVC_MAX_ENDPOINTS - 1), SVC_COUNT_ENTRIES - 1);
        assert_eq!(SvcEntry::new(0, 0, 1, 1).ep_index(0), 0);
        assert_eq!(
            SvcEntry::new(0, 1, 1, 1).ep_index(0),
            SVC_SLOTS * SVC_MAX_ENDPOINTS
        );
    }
}
