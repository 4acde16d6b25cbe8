//! `cgroup/getpeername4|6`: an app whose connect was redirected sees its original peer, not the
//! proxy. Rewrites only when the socket is ours (recorded at connect) and still points at the
//! loopback listener. Always returns 1.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_common::{addr, flow::ORIG_FLAG_KERNEL, stats::reason, AF_INET};

use crate::maps::{config, count, ORIG_BY_COOKIE};

#[cgroup_sock_addr(getpeername4)]
pub fn sm_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = rewrite(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sm_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = rewrite(&ctx, true);
    1
}

fn rewrite(ctx: &SockAddrContext, v6: bool) -> Option<()> {
    let sa = ctx.sock_addr;
    let cfg = config()?;
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let orig = *unsafe { ORIG_BY_COOKIE.get(&cookie) }?;
    // Routed in the kernel: the peer is the chosen endpoint, whatever it is.
    let kernel = orig.flags & ORIG_FLAG_KERNEL != 0;
    let port = addr::port_from_user_port(unsafe { read_volatile(addr_of!((*sa).user_port)) });
    if !kernel && port != cfg.outbound_port {
        return None;
    }
    unsafe {
        if v6 {
            let cur = [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ];
            if !kernel && !addr::is_loopback_v6(&cur) {
                return None;
            }
            let ip = orig.as_v6_words();
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
        } else {
            if orig.family != AF_INET {
                return None;
            }
            let cur = read_volatile(addr_of!((*sa).user_ip4));
            if !kernel && !addr::is_loopback_v4(cur) {
                return None;
            }
            write_volatile(addr_of_mut!((*sa).user_ip4), orig.ip_be[0]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), orig.port_be as u32);
    }
    count(reason::GETPEERNAME_REWRITTEN);
    Some(())
}
