//! `cgroup/getsockopt`: answer `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST`
//! (`SOL_IPV6`) on the proxy side of a captured connection, so any transparent proxy (the
//! daemon itself, Envoy's `original_dst` listener filter, MOSN) learns where the app meant to go.
//!
//! Every other option is left exactly as the kernel answered it: no write to `optlen`,
//! `retval` or the buffer (an option larger than a page keeps the kernel's own buffer).
//! Always returns 1: returning 0 would make the caller's getsockopt fail with EPERM.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sockopt, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use mesh_common::{
    flow::ConnTuple, stats::reason, AF_INET, AF_INET6, IP6T_SO_ORIGINAL_DST, SOL_IP, SOL_IPV6,
    SO_ORIGINAL_DST,
};

use crate::{
    ctx_ip6, ctx_u32,
    maps::{count, FLOWS},
};

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn sm_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = handle(ctx.sockopt);
    1
}

fn handle(so: *mut bpf_sockopt) -> Option<()> {
    let level = ctx_u32!(so, level);
    let optname = ctx_u32!(so, optname);
    let want_v4 = level == SOL_IP && optname == SO_ORIGINAL_DST;
    let want_v6 = level == SOL_IPV6 && optname == IP6T_SO_ORIGINAL_DST;
    if !want_v4 && !want_v6 {
        return None;
    }
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    let family = ctx_u32!(sk, family);
    let (local, remote) = match family {
        AF_INET => ([ctx_u32!(sk, src_ip4), 0, 0, 0], [ctx_u32!(sk, dst_ip4), 0, 0, 0]),
        AF_INET6 => (ctx_ip6!(sk, src_ip6), ctx_ip6!(sk, dst_ip6)),
        _ => return None,
    };
    // src_port is host order; dst_port is network order in 16 bits.
    let local_port = ctx_u32!(sk, src_port) as u16;
    let remote_port = u16::from_be(unsafe { read_volatile(addr_of!((*sk).dst_port)) });
    let netns = unsafe { bpf_get_netns_cookie(so.cast()) };
    // The proxy's accepted socket; the flow is keyed by the app's (the other end's) view.
    let app_view = ConnTuple::new(netns, family, local, local_port, remote, remote_port).reversed();
    let Some(orig) = (unsafe { FLOWS.get(&app_view) }).copied() else {
        count(reason::GETSOCKOPT_NO_FLOW);
        return None;
    };
    let optval = unsafe { (*so).__bindgen_anon_2.optval } as usize;
    let optval_end = unsafe { (*so).__bindgen_anon_3.optval_end } as usize;
    if want_v4 {
        if orig.family != AF_INET || optval + SOCKADDR_IN_LEN > optval_end {
            return None;
        }
        let p = optval as *mut u8;
        unsafe {
            // struct sockaddr_in { sa_family_t (host order), in_port_t (be), in_addr (be), zero[8] }
            write_volatile(p.cast::<u16>(), AF_INET as u16);
            write_volatile(p.add(2).cast::<u16>(), orig.port_be);
            write_volatile(p.add(4).cast::<u32>(), orig.ip_be[0]);
            write_volatile(p.add(8).cast::<u32>(), 0);
            write_volatile(p.add(12).cast::<u32>(), 0);
        }
        set_answer(so, SOCKADDR_IN_LEN as i32);
    } else {
        if orig.family != AF_INET6 || optval + SOCKADDR_IN6_LEN > optval_end {
            return None;
        }
        let p = optval as *mut u8;
        unsafe {
            // struct sockaddr_in6 { family, port (be), flowinfo, addr[16], scope_id }
            write_volatile(p.cast::<u16>(), AF_INET6 as u16);
            write_volatile(p.add(2).cast::<u16>(), orig.port_be);
            write_volatile(p.add(4).cast::<u32>(), 0);
            write_volatile(p.add(8).cast::<u32>(), orig.ip_be[0]);
            write_volatile(p.add(12).cast::<u32>(), orig.ip_be[1]);
            write_volatile(p.add(16).cast::<u32>(), orig.ip_be[2]);
            write_volatile(p.add(20).cast::<u32>(), orig.ip_be[3]);
            write_volatile(p.add(24).cast::<u32>(), 0);
        }
        set_answer(so, SOCKADDR_IN6_LEN as i32);
    }
    count(reason::GETSOCKOPT_ANSWERED);
    Some(())
}

#[inline(always)]
fn set_answer(so: *mut bpf_sockopt, len: i32) {
    unsafe {
        write_volatile(addr_of_mut!((*so).optlen), len);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
}
