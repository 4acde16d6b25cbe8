//! `SM_STATS`: per-CPU counters indexed by reason. Every hook outcome, including every way it
//! fails open, has a reason here, so `sockmesh status` can say why a connect was not captured.

/// Reason indexes. `u32` constants, not a Rust enum: the value crosses a map.
pub mod reason {
    pub const CONNECT_CAPTURED: u32 = 0;
    pub const CONNECT_NOT_ENROLLED: u32 = 1;
    pub const CONNECT_DAEMON_SOCKET: u32 = 2;
    pub const CONNECT_NOT_TCP: u32 = 3;
    pub const CONNECT_BYPASS_LOOPBACK: u32 = 4;
    pub const CONNECT_BYPASS_CIDR: u32 = 5;
    pub const CONNECT_BYPASS_PORT: u32 = 6;
    pub const CONNECT_NETNS_MISMATCH: u32 = 7;
    pub const CONNECT_NO_LISTENER: u32 = 8;
    pub const CONNECT_ORIG_MAP_FULL: u32 = 9;
    pub const CONNECT_INACTIVE: u32 = 10;
    pub const SOCKOPS_FLOW_RECORDED: u32 = 11;
    pub const SOCKOPS_FLOW_MAP_FULL: u32 = 12;
    pub const SOCKOPS_SOCKHASH_ADDED: u32 = 13;
    pub const SOCKOPS_SOCKHASH_FAILED: u32 = 14;
    pub const MSG_REDIRECTED: u32 = 15;
    pub const MSG_NO_PEER: u32 = 16;
    pub const MSG_FALLBACK_SIZE: u32 = 17;
    pub const MSG_FALLBACK_BUDGET: u32 = 18;
    pub const MSG_PASSED_AFTER_FALLBACK: u32 = 19;
    pub const GETSOCKOPT_ANSWERED: u32 = 20;
    pub const GETSOCKOPT_NO_FLOW: u32 = 21;
    pub const GETPEERNAME_REWRITTEN: u32 = 22;
    pub const CONNECT_UNSPECIFIED_DST: u32 = 23;
    pub const SOCKOPS_FLOW_CLOSED: u32 = 24;
    pub const MSG_REDIRECT_FAILED: u32 = 25;
    pub const LOOKUP_ASSIGNED: u32 = 26;
    pub const LOOKUP_NO_LISTENER: u32 = 27;
    pub const LOOKUP_ASSIGN_FAILED: u32 = 28;
    pub const LOOKUP_EXCLUDED: u32 = 29;
    pub const RECV_COLOURED: u32 = 30;
    pub const RECV_CLEARED: u32 = 31;
    pub const SEND_CLEARED: u32 = 32;
    pub const LEDGER_CREATED: u32 = 33;
    pub const LEDGER_MAP_FULL: u32 = 34;
    pub const LEDGER_RECORDED: u32 = 35;
    pub const LEDGER_MISSING: u32 = 36;
    /// A connect to a kernel-routed service went straight to an endpoint.
    pub const KROUTE_ROUTED: u32 = 37;
    /// A kernel-routed service had no endpoint up: the connect took the proxy path.
    pub const KROUTE_NO_ENDPOINT: u32 = 38;
    /// The original-destination record could not be written: the connect took the proxy path.
    pub const KROUTE_ORIG_MAP_FULL: u32 = 39;
    pub const COUNT: u32 = 40;
}

/// Metric names, indexed like [`reason`].
pub const REASON_NAMES: [&str; reason::COUNT as usize] = [
    "connect_captured",
    "connect_not_enrolled",
    "connect_daemon_socket",
    "connect_not_tcp",
    "connect_bypass_loopback",
    "connect_bypass_cidr",
    "connect_bypass_port",
    "connect_netns_mismatch",
    "connect_no_listener",
    "connect_orig_map_full",
    "connect_inactive",
    "sockops_flow_recorded",
    "sockops_flow_map_full",
    "sockops_sockhash_added",
    "sockops_sockhash_failed",
    "msg_redirected",
    "msg_no_peer",
    "msg_fallback_size",
    "msg_fallback_budget",
    "msg_passed_after_fallback",
    "getsockopt_answered",
    "getsockopt_no_flow",
    "getpeername_rewritten",
    "connect_unspecified_dst",
    "sockops_flow_closed",
    "msg_redirect_failed",
    "lookup_assigned",
    "lookup_no_listener",
    "lookup_assign_failed",
    "lookup_excluded",
    "recv_coloured",
    "recv_cleared",
    "send_cleared",
    "ledger_created",
    "ledger_map_full",
    "ledger_recorded",
    "ledger_missing",
    "kroute_routed",
    "kroute_no_endpoint",
    "kroute_orig_map_full",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_snake_case() {
        for (i, a) in REASON_NAMES.iter().enumerate() {
            assert!(a.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{a}");
            for b in &REASON_NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            REASON_NAMES[reason::CONNECT_CAPTURED as usize],
            "connect_captured"
        );
        assert_eq!(
            REASON_NAMES[reason::MSG_REDIRECT_FAILED as usize],
            "msg_redirect_failed"
        );
    }
}
