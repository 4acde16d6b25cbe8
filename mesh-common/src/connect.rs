//! The connect-time capture decision, as a pure function of facts the hook gathers.

use crate::{addr, config::MeshConfig, stats::reason, IPPROTO_TCP, SOCK_STREAM};

/// What the connect hook knows before it looks for the pod's listener.
#[derive(Clone, Copy, Debug)]
pub struct ConnectFacts {
    pub sock_type: u32,
    pub protocol: u32,
    pub sock_mark: u32,
    /// The socket's netns cookie.
    pub netns_cookie: u64,
    /// The enrolled pod owning the calling cgroup: its netns cookie.
    pub pod_netns_cookie: Option<u64>,
    /// Destination as IPv6 words (IPv4 mapped), and port in host order.
    pub dst_ip6: [u32; 4],
    pub dst_port: u16,
    pub bypass_cidr: bool,
    pub bypass_port: bool,
}

/// `Ok(())`: capture if the pod's listener is alive. `Err(reason)`: leave the connect untouched.
/// Checks are ordered cheapest and most common first.
pub const fn precheck(cfg: &MeshConfig, f: &ConnectFacts) -> Result<(), u32> {
    if !cfg.active() {
        return Err(reason::CONNECT_INACTIVE);
    }
    if f.sock_type != SOCK_STREAM || (f.protocol != IPPROTO_TCP && f.protocol != 0) {
        return Err(reason::CONNECT_NOT_TCP);
    }
    let pod_cookie = match f.pod_netns_cookie {
        Some(c) => c,
        None => return Err(reason::CONNECT_NOT_ENROLLED),
    };
    if cfg.daemon_mark != 0 && f.sock_mark == cfg.daemon_mark {
        return Err(reason::CONNECT_DAEMON_SOCKET);
    }
    if pod_cookie != f.netns_cookie {
        return Err(reason::CONNECT_NETNS_MISMATCH);
    }
    if addr::is_loopback_v6(&f.dst_ip6) {
        return Err(reason::CONNECT_BYPASS_LOOPBACK);
    }
    if addr::is_unspecified(&f.dst_ip6) {
        return Err(reason::CONNECT_UNSPECIFIED_DST);
    }
    if f.dst_port == cfg.outbound_port || f.dst_port == cfg.inbound_port {
        // Never chase our own listeners, wherever they are.
        return Err(reason::CONNECT_BYPASS_PORT);
    }
    if f.bypass_port {
        return Err(reason::CONNECT_BYPASS_PORT);
    }
    if f.bypass_cidr {
        return Err(reason::CONNECT_BYPASS_CIDR);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FLAG_ENABLED;

    const MARK: u32 = 0x99;

    fn cfg() -> MeshConfig {
        MeshConfig::new(FLAG_ENABLED, 15001, 15006, MARK)
    }

    fn facts() -> ConnectFacts {
        ConnectFacts {
            sock_type: SOCK_STREAM,
            protocol: IPPROTO_TCP,
            sock_mark: 0,
            netns_cookie: 42,
            pod_netns_cookie: Some(42),
            dst_ip6: addr::map_v4(u32::from_ne_bytes([198, 18, 0, 3])),
            dst_port: 8080,
            bypass_cidr: false,
            bypass_port: false,
        }
    }

    #[test]
    fn enrolled_tcp_to_remote_is_captured() {
        assert_eq!(precheck(&cfg(), &facts()), Ok(()));
        let mut f = facts();
        f.protocol = 0; // socket(AF_INET, SOCK_STREAM, 0)
        assert_eq!(precheck(&cfg(), &f), Ok(()));
    }

    #[test]
    fn every_skip_has_its_reason() {
        let cases: [(fn(&mut ConnectFacts), u32); 9] = [
            (|f| f.sock_type = 2, reason::CONNECT_NOT_TCP),
            (|f| f.pod_netns_cookie = None, reason::CONNECT_NOT_ENROLLED),
            (|f| f.sock_mark = MARK, reason::CONNECT_DAEMON_SOCKET),
            (|f| f.netns_cookie = 1, reason::CONNECT_NETNS_MISMATCH),
            (
                |f| f.dst_ip6 = addr::map_v4(addr::LOOPBACK_V4),
                reason::CONNECT_BYPASS_LOOPBACK,
            ),
            (|f| f.dst_ip6 = addr::LOOPBACK_V6, reason::CONNECT_BYPASS_LOOPBACK),
            (|f| f.dst_ip6 = [0; 4], reason::CONNECT_UNSPECIFIED_DST),
            (|f| f.bypass_port = true, reason::CONNECT_BYPASS_PORT),
            (|f| f.bypass_cidr = true, reason::CONNECT_BYPASS_CIDR),
        ];
        for (mutate, want) in cases {
            let mut f = facts();
            mutate(&mut f);
            assert_eq!(precheck(&cfg(), &f), Err(want));
        }
        let mut f = facts();
        f.dst_port = 15001;
        assert_eq!(precheck(&cfg(), &f), Err(reason::CONNECT_BYPASS_PORT));
    }

    #[test]
    fn inactive_config_captures_nothing() {
        let mut c = cfg();
        c.flags = 0;
        assert_eq!(precheck(&c, &facts()), Err(reason::CONNECT_INACTIVE));
        let mut c = cfg();
        c.abi_version = 0;
        assert_eq!(precheck(&c, &facts()), Err(reason::CONNECT_INACTIVE));
    }

    #[test]
    fn zero_mark_config_does_not_treat_unmarked_sockets_as_daemon() {
        let mut c = cfg();
        c.daemon_mark = 0;
        assert_eq!(precheck(&c, &facts()), Ok(()));
    }
}
