//! The maps, named as `mesh_common::maps` says, and the small accessors every hook uses.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use mesh_common::{
    accel::FlowState,
    colour::{InboundColourKey, Ledger, PORT_WORDS},
    config::MeshConfig,
    flow::{ConnTuple, OrigDst},
    inbound::{InboundKey, InboundTarget},
    maps as m,
    pods::PodInfo,
    service::{SvcEndpoint, SvcEntry, SvcKey, SVC_COUNT_ENTRIES, SVC_EP_ENTRIES, SVC_KEYS_MAX},
    stats::reason,
};

#[map(name = "SM_CONFIG")]
pub static CONFIG: Array<MeshConfig> = Array::with_max_entries(1, 0);

#[map(name = "SM_PODS")]
pub static PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(m::PODS_MAX, 0);

/// LPM tries need `BPF_F_NO_PREALLOC`.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "SM_BYPASS_CIDR")]
pub static BYPASS_CIDRS: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(m::BYPASS_CIDRS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "SM_BYPASS_PORT")]
pub static BYPASS_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(m::BYPASS_PORTS_MAX, 0);

#[map(name = "SM_ORIG")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(m::ORIG_BY_COOKIE_MAX, 0);

#[map(name = "SM_FLOWS")]
pub static FLOWS: LruHashMap<ConnTuple, OrigDst> = LruHashMap::with_max_entries(m::FLOWS_MAX, 0);

#[map(name = "SM_SOCKS")]
pub static SOCKS: SockHash<ConnTuple> = SockHash::with_max_entries(m::SOCKS_MAX, 0);

#[map(name = "SM_FLOW_STATE")]
pub static FLOW_STATE: LruHashMap<ConnTuple, FlowState> = LruHashMap::with_max_entries(m::FLOW_STATE_MAX, 0);

#[map(name = "SM_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "SM_INBOUND")]
pub static INBOUND: HashMap<InboundKey, InboundTarget> = HashMap::with_max_entries(m::INBOUND_MAX, 0);

#[map(name = "SM_INBOUND_EXCL")]
pub static INBOUND_EXCLUDE: HashMap<InboundKey, u32> = HashMap::with_max_entries(m::INBOUND_MAX, 0);

#[map(name = "SM_LISTENERS")]
pub static LISTENERS: SockMap = SockMap::with_max_entries(m::LISTENERS_MAX, 0);

#[map(name = "SM_COLOUR_IN")]
pub static COLOUR_INBOUND: HashMap<InboundColourKey, u32> =
    HashMap::with_max_entries(m::COLOUR_INBOUND_MAX, 0);

#[map(name = "SM_COLOUR_PORTS")]
pub static COLOUR_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map(name = "SM_TID_COLOUR")]
pub static THREAD_COLOUR: LruHashMap<u32, u32> = LruHashMap::with_max_entries(m::THREAD_COLOUR_MAX, 0);

#[map(name = "SM_LEDGER")]
pub static LEDGER: LruHashMap<ConnTuple, Ledger> = LruHashMap::with_max_entries(m::COLOUR_LEDGER_MAX, 0);

// The policy table in the kernel (mesh_common::service).

#[map(name = "SM_SVC")]
pub static SVC: HashMap<SvcKey, SvcEntry> = HashMap::with_max_entries(SVC_KEYS_MAX, 0);

#[map(name = "SM_SVC_EP")]
pub static SVC_ENDPOINTS: Array<SvcEndpoint> = Array::with_max_entries(SVC_EP_ENTRIES, 0);

#[map(name = "SM_SVC_COUNT")]
pub static SVC_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SVC_COUNT_ENTRIES, 0);

/// The daemon's configuration, if it wrote one.
#[inline(always)]
pub fn config() -> Option<MeshConfig> {
    CONFIG.get(0).copied()
}

/// Count one event. Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(r: u32) {
    if let Some(p) = STATS.get_ptr_mut(r) {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// One 4-byte load of a context field at its fixed offset. Volatile, so LLVM neither merges
/// neighbouring loads nor derives a moved base pointer from the context; the verifier rejects
/// both ("dereference of modified ctx ptr R1 off=24 disallowed").
#[macro_export]
macro_rules! ctx_u32 {
    ($ptr:expr, $($field:tt)+) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// Four 4-byte loads of an IPv6 address field.
#[macro_export]
macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {
        [
            $crate::ctx_u32!($ptr, $field[0]),
            $crate::ctx_u32!($ptr, $field[1]),
            $crate::ctx_u32!($ptr, $field[2]),
            $crate::ctx_u32!($ptr, $field[3]),
        ]
    };
}
