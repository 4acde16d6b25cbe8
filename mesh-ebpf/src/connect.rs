//! `cgroup/connect4` and `cgroup/connect6`: send an enrolled pod's outbound TCP connect to the
//! daemon's listener inside the same pod netns, after recording where it was going.
//!
//! The rewrite happens only when the listener is really there (`bpf_sk_lookup_tcp` in the
//! socket's netns): if the daemon is gone, the connect goes direct. Always returns 1 (allow).
//!
//! A connect to a kernel-routed service (`SM_SVC`, see `mesh_common::service`) is rewritten
//! straight to an endpoint chosen by weight, daemon or not: no proxy hop. The original
//! destination is recorded the same way, so `getpeername` still shows the VIP.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    addr,
    config::MeshConfig,
    connect::{precheck, ConnectFacts},
    flow::{OrigDst, ORIG_FLAG_KERNEL, ORIG_FLAG_PROPAGATE, ORIG_FLAG_V4_MAPPED},
    pods::{PodInfo, MAX_ANCESTOR_WALK},
    service::{choose, SvcKey},
    stats::reason,
    AF_INET, AF_INET6,
};

use crate::maps::{
    config, count, BYPASS_CIDRS, BYPASS_PORTS, ORIG_BY_COOKIE, PODS, SVC, SVC_COUNTS, SVC_ENDPOINTS,
};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sm_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields are 4-byte loads at the offsets the kernel exposes.
    let ip4 = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = addr::port_from_user_port(unsafe { read_volatile(addr_of!((*sa).user_port)) });
    match on_connect(
        &ctx,
        Dst::V4 {
            ip: ip4,
            mapped: false,
        },
        port,
    ) {
        // The stores live in each entry point, with fixed ctx offsets: when they were shared,
        // LLVM merged them into one store at a computed offset and the verifier said
        // "dereference of modified ctx ptr R3 off=4 disallowed".
        Some(Rewrite::Listener(new_port)) => {
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), addr::LOOPBACK_V4);
                write_volatile(addr_of_mut!((*sa).user_port), new_port);
            }
            count(reason::CONNECT_CAPTURED);
        }
        Some(Rewrite::Endpoint { ip, user_port }) => {
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), ip[0]);
                write_volatile(addr_of_mut!((*sa).user_port), user_port);
            }
            count(reason::KROUTE_ROUTED);
        }
        None => {}
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sm_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip6 = unsafe { read_ip6(sa) };
    let port = addr::port_from_user_port(unsafe { read_volatile(addr_of!((*sa).user_port)) });
    let dst = match addr::v4_mapped(&ip6) {
        Some(ip) => Dst::V4 { ip, mapped: true },
        None => Dst::V6(ip6),
    };
    match on_connect(&ctx, dst, port) {
        Some(Rewrite::Listener(new_port)) => {
            let to = match dst {
                Dst::V4 { .. } => addr::map_v4(addr::LOOPBACK_V4),
                Dst::V6(_) => addr::LOOPBACK_V6,
            };
            unsafe {
                write_ip6(sa, to);
                write_volatile(addr_of_mut!((*sa).user_port), new_port);
            }
            count(reason::CONNECT_CAPTURED);
        }
        Some(Rewrite::Endpoint { ip, user_port }) => {
            // An IPv4 service reached through an AF_INET6 socket: its IPv4 endpoint, mapped.
            let to = match dst {
                Dst::V4 { .. } => addr::map_v4(ip[0]),
                Dst::V6(_) => ip,
            };
            unsafe {
                write_ip6(sa, to);
                write_volatile(addr_of_mut!((*sa).user_port), user_port);
            }
            count(reason::KROUTE_ROUTED);
        }
        None => {}
    }
    ALLOW
}

/// Where a captured connect goes instead.
#[derive(Clone, Copy)]
enum Rewrite {
    /// The pod's outbound listener (`user_port`).
    Listener(u32),
    /// A kernel-routed service's endpoint: address words (IPv4 in word 0) and `user_port`.
    Endpoint { ip: [u32; 4], user_port: u32 },
}

#[derive(Clone, Copy)]
enum Dst {
    V4 { ip: u32, mapped: bool },
    V6([u32; 4]),
}

/// `user_ip6` one 4-byte word at a time (the verifier rejects wider ctx loads).
unsafe fn read_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

unsafe fn write_ip6(sa: *mut bpf_sock_addr, ip6: [u32; 4]) {
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip6[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip6[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip6[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip6[3]);
    }
}

/// The enrolled pod owning the calling task's cgroup or one of its ancestors.
#[inline(always)]
fn find_pod() -> Option<PodInfo> {
    let cg = unsafe { bpf_get_current_cgroup_id() };
    if let Some(p) = unsafe { PODS.get(&cg) } {
        return Some(*p);
    }
    let mut level = 1;
    while level <= MAX_ANCESTOR_WALK as i32 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == cg {
            break;
        }
        if let Some(p) = unsafe { PODS.get(&id) } {
            return Some(*p);
        }
        level += 1;
    }
    None
}

/// A kernel-routed service's endpoint for this connect, chosen by weight and counted, with the
/// original destination recorded under the socket cookie. `None`: not a kernel-routed VIP, or
/// no endpoint up, or no record (then the proxy path decides).
#[inline(always)]
fn kernel_route(sa: *mut bpf_sock_addr, dst: Dst, port: u16, mut orig: OrigDst) -> Option<Rewrite> {
    let key = match dst {
        Dst::V4 { ip, .. } => SvcKey::v4(ip, port),
        Dst::V6(ip6) => SvcKey::v6(ip6, port),
    };
    let e = *unsafe { SVC.get(&key) }?;
    let rand = unsafe { bpf_get_prandom_u32() } as u32;
    let Some(i) = choose(rand, e.count, |i| {
        SVC_ENDPOINTS.get(e.ep_index(i)).map(|x| x.cum_weight)
    }) else {
        count(reason::KROUTE_NO_ENDPOINT);
        return None;
    };
    let ep = *SVC_ENDPOINTS.get(e.ep_index(i))?;
    let want_family = match dst {
        Dst::V4 { .. } => AF_INET,
        Dst::V6(_) => AF_INET6,
    };
    if ep.family != want_family {
        count(reason::KROUTE_NO_ENDPOINT);
        return None;
    }
    orig = orig.with_flag(ORIG_FLAG_KERNEL);
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(reason::KROUTE_ORIG_MAP_FULL);
        return None;
    }
    if let Some(p) = SVC_COUNTS.get_ptr_mut(e.count_index(i)) {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        unsafe { *p += 1 };
    }
    Some(Rewrite::Endpoint {
        ip: ep.ip_be,
        user_port: ep.port_be as u32,
    })
}

/// Where to send the connect (the pod's listener or a kernel-routed endpoint); `None` leaves
/// it alone.
fn on_connect(ctx: &SockAddrContext, dst: Dst, port: u16) -> Option<Rewrite> {
    let Some(cfg) = config() else {
        count(reason::CONNECT_INACTIVE);
        return None;
    };
    let sa = ctx.sock_addr;
    // The common case on a node: a socket of a pod that is not enrolled. One lookup, done.
    let Some(pod) = find_pod() else {
        count(reason::CONNECT_NOT_ENROLLED);
        return None;
    };
    let dst_ip6 = match dst {
        Dst::V4 { ip, .. } => addr::map_v4(ip),
        Dst::V6(ip6) => ip6,
    };
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let facts = ConnectFacts {
        sock_type: unsafe { read_volatile(addr_of!((*sa).type_)) },
        protocol: unsafe { read_volatile(addr_of!((*sa).protocol)) },
        sock_mark: unsafe { read_volatile(addr_of!((*sk).mark)) },
        netns_cookie: unsafe { bpf_get_netns_cookie(sa.cast()) },
        pod_netns_cookie: Some(pod.netns_cookie),
        dst_ip6,
        dst_port: port,
        bypass_port: unsafe { BYPASS_PORTS.get(&(port as u32)) }.is_some(),
        bypass_cidr: BYPASS_CIDRS.get(&Key::new(128, dst_ip6)).is_some(),
    };
    if let Err(r) = precheck(&cfg, &facts) {
        count(r);
        return None;
    }
    let mut orig = match dst {
        Dst::V4 { ip, mapped } => {
            OrigDst::v4(ip, port, pod.pod_id, if mapped { ORIG_FLAG_V4_MAPPED } else { 0 })
        }
        Dst::V6(ip6) => OrigDst::v6(ip6, port, pod.pod_id),
    };
    if pod.propagate() {
        // sockops gives this socket a colour ledger once it is established.
        orig = orig.with_flag(ORIG_FLAG_PROPAGATE);
    }
    // Kernel-routed services first: they need no listener, so they keep routing with the
    // daemon dead.
    if let Some(r) = kernel_route(sa, dst, port, orig) {
        return Some(r);
    }
    let listener_v4 = matches!(dst, Dst::V4 { .. });
    if !listener_alive(sa, &cfg, listener_v4) {
        count(reason::CONNECT_NO_LISTENER);
        if cfg.log() {
            debug!(
                ctx,
                "pod {} connect to port {}: no listener, going direct", pod.pod_id, port
            );
        }
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        // Without the record the proxy could not know where to go: leave the connect alone.
        count(reason::CONNECT_ORIG_MAP_FULL);
        return None;
    }
    if cfg.log() {
        debug!(ctx, "pod {} connect to port {}: captured", pod.pod_id, port);
    }
    Some(Rewrite::Listener(addr::user_port_from_port(cfg.outbound_port)))
}

/// Is the daemon's outbound listener for this family bound in the socket's netns?
#[inline(always)]
fn listener_alive(sa: *mut bpf_sock_addr, cfg: &MeshConfig, v4: bool) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let dport = cfg.outbound_port.to_be();
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = addr::LOOPBACK_V4;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = addr::LOOPBACK_V6;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    let sk = unsafe { bpf_sk_lookup_tcp(sa.cast(), &mut tuple, size as u32, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
