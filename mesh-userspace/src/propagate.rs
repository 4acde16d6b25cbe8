//! Kernel colour propagation, the proxy's side. The mechanism and its limits are described in
//! ARCHITECTURE.md ("Colour propagation"); the maps live in `ebpf.rs` (the only module that
//! imports aya), which hands out a [`ColourKernel`].
//!
//! How the proxy uses it:
//! - **Inbound**, before writing a request's bytes to the app:
//!   `colour.set_inbound(app_local, app_remote, c)` where `app_local` is the pod address and
//!   port the app accepted on and `app_remote` the proxy's delivering socket as the app sees it
//!   (= the delivering socket's own local address). Never recolour while a request is in flight
//!   on that connection; `clear_inbound` when it closes.
//! - **Outbound**, parsing a request that starts at stream offset `o` on an accepted outbound
//!   connection: [`app_side_of_accepted`] gives the app socket's view, then
//!   `colour.ledger_colour(netns_cookie, app_local, app_remote, o)`.

use std::net::SocketAddr;

pub use crate::ebpf::ColourKernel;
#[cfg(test)]
use crate::ebpf::MAX_COLOUR;

/// The app socket's `(local, remote)` from the proxy's accepted socket on the outbound listener
/// (`accepted_local` = 127.0.0.1:15001, `accepted_peer` = the app's source address): the same
/// derivation `cgroup/getsockopt` uses for `SO_ORIGINAL_DST` (the reversed tuple). IPv4-mapped
/// addresses are normalised to IPv4 by the key itself (`ConnTuple::from_addrs`).
pub fn app_side_of_accepted(
    accepted_local: SocketAddr,
    accepted_peer: SocketAddr,
) -> (SocketAddr, SocketAddr) {
    (accepted_peer, accepted_local)
}

/// The app side of the proxy's delivering (inbound) socket: the app's accepted socket has
/// local = where the proxy connected (`delivering_peer`, the pod address and port) and
/// remote = the proxy's own source address (`delivering_local`).
pub fn app_side_of_delivering(
    delivering_local: SocketAddr,
    delivering_peer: SocketAddr,
) -> (SocketAddr, SocketAddr) {
    (delivering_peer, delivering_local)
}

#[cfg(test)]
mod tests {
    use mesh_common::flow::ConnTuple;

    use super::*;

    #[test]
    fn accepted_socket_gives_the_key_getsockopt_uses() {
        let listener: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let app: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let (l, r) = app_side_of_accepted(listener, app);
        let from_proxy = ConnTuple::from_addrs(7, listener, app).reversed();
        assert_eq!(ConnTuple::from_addrs(7, l, r), from_proxy);
        // An AF_INET6 app socket on ::ffff:127.0.0.1 names the same connection.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40123".parse().unwrap();
        let listener6: SocketAddr = "[::ffff:127.0.0.1]:15001".parse().unwrap();
        assert_eq!(ConnTuple::from_addrs(7, mapped, listener6), from_proxy);
    }

    #[test]
    fn delivering_socket_reverses() {
        let local: SocketAddr = "198.18.0.3:41000".parse().unwrap();
        let pod: SocketAddr = "198.18.0.3:8080".parse().unwrap();
        assert_eq!(app_side_of_delivering(local, pod), (pod, local));
    }

    #[test]
    fn unavailable_kernel_says_why_and_refuses() {
        let k = ColourKernel::disabled("kernel 5.15 has no sock_recv_length".into());
        assert_eq!(k.status(), Err("kernel 5.15 has no sock_recv_length".to_string()));
        let a: SocketAddr = "198.18.0.3:8080".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:41000".parse().unwrap();
        assert!(k.set_inbound(a, b, 1).unwrap_err().contains("unavailable"));
        assert_eq!(k.ledger_colour(1, a, b, 0), None);
        k.clear_inbound(a, b);
    }

    #[test]
    fn colour_range_and_ipv6_are_checked_first() {
        let k = ColourKernel::disabled("x".into());
        let a: SocketAddr = "198.18.0.3:8080".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:41000".parse().unwrap();
        assert!(k
            .set_inbound(a, b, MAX_COLOUR + 1)
            .unwrap_err()
            .contains("out of range"));
        let a6: SocketAddr = "[fd00::3]:8080".parse().unwrap();
        let b6: SocketAddr = "[fd00::3]:41000".parse().unwrap();
        assert!(k.set_inbound(a6, b6, 1).unwrap_err().contains("IPv4"));
    }
}
