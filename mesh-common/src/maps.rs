//! Map names (at most 15 bytes: `BPF_OBJ_NAME_LEN`) and sizes, used by both sides.

/// `Array<MeshConfig>` with one slot: ABI version, ports, daemon mark, flags.
pub const CONFIG: &str = "SM_CONFIG";
/// `HashMap<u64 cgroup id, PodInfo>`: the enrolled pods.
pub const PODS: &str = "SM_PODS";
/// `LpmTrie<[u32; 4], u32>`: bypassed destination CIDRs (IPv4 stored IPv4-mapped).
pub const BYPASS_CIDRS: &str = "SM_BYPASS_CIDR";
/// `HashMap<u32 port (host order), u32>`: bypassed destination ports.
pub const BYPASS_PORTS: &str = "SM_BYPASS_PORT";
/// `LruHashMap<u64 socket cookie, OrigDst>`: written at connect, read at sockops/getpeername.
pub const ORIG_BY_COOKIE: &str = "SM_ORIG";
/// `LruHashMap<ConnTuple, OrigDst>`: the app side of a captured connection → its original
/// destination; read by `cgroup/getsockopt` for the proxy side.
pub const FLOWS: &str = "SM_FLOWS";
/// `SockHash<ConnTuple>`: local app↔proxy sockets eligible for the sk_msg short-circuit.
pub const SOCKS: &str = "SM_SOCKS";
/// `LruHashMap<ConnTuple, FlowState>`: per-socket short-circuit budget.
pub const FLOW_STATE: &str = "SM_FLOW_STATE";
/// `PerCpuArray<u64>` indexed by [`crate::stats::reason`].
pub const STATS: &str = "SM_STATS";
/// `HashMap<InboundKey, InboundTarget>`: a pod address and meshed port → its listener slot.
pub const INBOUND: &str = "SM_INBOUND";
/// `HashMap<InboundKey, u32>`: pod address and port never captured inbound (with all ports meshed).
pub const INBOUND_EXCLUDE: &str = "SM_INBOUND_EXCL";
/// `SockMap`: listener slot → the daemon's inbound listener inside that pod's netns.
pub const LISTENERS: &str = "SM_LISTENERS";

/// `HashMap<InboundColourKey, u32>`: an app's inbound (accepted) socket → the colour of the request
/// the proxy is delivering on it (0: uncoloured). Written by the proxy, read by the recv/send
/// tracepoints.
pub const COLOUR_INBOUND: &str = "SM_COLOUR_IN";
/// `Array<u64>` bitmap of local ports that have (or had) an inbound colour entry: the recv hook's
/// cheap filter.
pub const COLOUR_PORTS: &str = "SM_COLOUR_PORTS";
/// `LruHashMap<u32 tid, u32 colour>`: the colour of the request each app thread is serving.
pub const THREAD_COLOUR: &str = "SM_TID_COLOUR";
/// `LruHashMap<ConnTuple, Ledger>`: a propagating app socket (app view, as `SM_FLOWS`) → the
/// colours of its stream by offset.
pub const COLOUR_LEDGER: &str = "SM_LEDGER";

/// `HashMap<SvcKey, SvcEntry>`: a kernel-routed service's VIP:port → its endpoint table
/// ([`crate::service`]).
pub const SVC: &str = "SM_SVC";
/// `Array<SvcEndpoint>`: two halves of per-service (subset, endpoint) entries.
pub const SVC_ENDPOINTS: &str = "SM_SVC_EP";
/// `PerCpuArray<u64>`: connects routed in the kernel per (service slot, entry).
pub const SVC_COUNTS: &str = "SM_SVC_COUNT";

/// aya-log's ring buffer (pinned with the others so a restarted daemon reads the old programs' logs).
pub const AYA_LOGS: &str = "AYA_LOGS";

/// Every map the daemon pins under `<pin_dir>/maps/`.
pub const PINNED: [&str; 20] = [
    CONFIG,
    PODS,
    BYPASS_CIDRS,
    BYPASS_PORTS,
    ORIG_BY_COOKIE,
    FLOWS,
    SOCKS,
    FLOW_STATE,
    STATS,
    INBOUND,
    INBOUND_EXCLUDE,
    LISTENERS,
    COLOUR_INBOUND,
    COLOUR_PORTS,
    THREAD_COLOUR,
    COLOUR_LEDGER,
    AYA_LOGS,
    SVC,
    SVC_ENDPOINTS,
    SVC_COUNTS,
];

pub const PODS_MAX: u32 = 4096;
pub const BYPASS_CIDRS_MAX: u32 = 1024;
pub const BYPASS_PORTS_MAX: u32 = 256;
pub const ORIG_BY_COOKIE_MAX: u32 = 65536;
pub const FLOWS_MAX: u32 = 65536;
pub const SOCKS_MAX: u32 = 65536;
pub const FLOW_STATE_MAX: u32 = 65536;
pub const INBOUND_MAX: u32 = 16384;
/// Two listener slots per pod id (IPv4, IPv6): see [`crate::inbound::listener_slot`].
pub const LISTENERS_MAX: u32 = 2 * (PODS_MAX + 1);
/// Inbound connections with a colour entry at once.
pub const COLOUR_INBOUND_MAX: u32 = 65536;
/// App threads with a colour at once (LRU: the oldest thread's colour goes first).
pub const THREAD_COLOUR_MAX: u32 = 65536;
/// Propagating app sockets with a ledger at once (LRU; each value is 272 bytes, preallocated).
pub const COLOUR_LEDGER_MAX: u32 = 16384;

/// Program names (the Rust function names in `mesh-ebpf`, which become the ELF symbols).
pub mod progs {
    pub const CONNECT4: &str = "sm_connect4";
    pub const CONNECT6: &str = "sm_connect6";
    pub const SOCKOPS: &str = "sm_sockops";
    pub const SK_MSG: &str = "sm_sk_msg";
    pub const SK_SKB_VERDICT: &str = "sm_sk_skb_verdict";
    pub const GETSOCKOPT: &str = "sm_getsockopt";
    pub const GETPEERNAME4: &str = "sm_getpeername4";
    pub const GETPEERNAME6: &str = "sm_getpeername6";
    pub const SK_LOOKUP: &str = "sm_sk_lookup";
    /// `tp_btf/sock_recv_length` and `tp_btf/sock_send_length` (colour propagation).
    pub const RECV_COLOUR: &str = "sm_recv_colour";
    pub const SEND_COLOUR: &str = "sm_send_colour";
    /// The kernel tracepoints they attach to (kernel 6.3+).
    pub const RECV_TRACEPOINT: &str = "sock_recv_length";
    pub const SEND_TRACEPOINT: &str = "sock_send_length";
    /// The BTF tracepoints, pinned as `links/<name>`.
    pub const TRACEPOINTS: [(&str, &str); 2] =
        [(RECV_COLOUR, RECV_TRACEPOINT), (SEND_COLOUR, SEND_TRACEPOINT)];

    /// The hooks attached to the cgroup root through pinned bpf links.
    pub const CGROUP_LINKED: [&str; 6] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        GETSOCKOPT,
        SOCKOPS,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            CONFIG,
            PODS,
            BYPASS_CIDRS,
            BYPASS_PORTS,
            ORIG_BY_COOKIE,
            FLOWS,
            SOCKS,
            FLOW_STATE,
            STATS,
            INBOUND,
            INBOUND_EXCLUDE,
            LISTENERS,
            COLOUR_INBOUND,
            COLOUR_PORTS,
            THREAD_COLOUR,
            COLOUR_LEDGER,
            SVC,
            SVC_ENDPOINTS,
            SVC_COUNTS,
        ] {
            assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN - 1");
        }
    }
}

#[cfg(test)]
mod pin_tests {
    use super::*;

    #[test]
    fn every_map_is_pinned() {
        for name in [
            CONFIG,
            PODS,
            BYPASS_CIDRS,
            BYPASS_PORTS,
            ORIG_BY_COOKIE,
            FLOWS,
            SOCKS,
            FLOW_STATE,
            STATS,
            INBOUND,
            INBOUND_EXCLUDE,
            LISTENERS,
            COLOUR_INBOUND,
            COLOUR_PORTS,
            THREAD_COLOUR,
            COLOUR_LEDGER,
            SVC,
            SVC_ENDPOINTS,
            SVC_COUNTS,
        ] {
            assert!(
                PINNED.contains(&name),
                "{name} is not pinned: a restart would lose it"
            );
        }
    }
}
