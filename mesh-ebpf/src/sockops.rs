//! `sockops`: when a captured app socket reaches ESTABLISHED, move its original destination from
//! the cookie-keyed record to one keyed by the connection (netns cookie + 4-tuple), where
//! `cgroup/getsockopt` finds it for the proxy's accepted socket. With acceleration on, both ends
//! of a local app↔proxy pair (and only those) go into `SM_SOCKS`.
//!
//! Attached at the configured cgroup root, so both the pod's app socket and the daemon's
//! accepted socket (which belongs to the daemon's cgroup) are seen.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    addr,
    colour::Ledger,
    flow::{ConnTuple, ORIG_FLAG_KERNEL, ORIG_FLAG_PROPAGATE},
    stats::reason,
    AF_INET, AF_INET6,
};

use crate::{
    ctx_ip6, ctx_u32,
    maps::{config, count, FLOWS, FLOW_STATE, LEDGER, ORIG_BY_COOKIE, SOCKS},
};

/// A fresh ledger (272 bytes: too big for the 512-byte stack next to the rest, so it lives in
/// `.rodata` and the helper copies it from there).
static ZERO_LEDGER: Ledger = Ledger::new();

#[sock_ops]
pub fn sm_sockops(ctx: SockOpsContext) -> u32 {
    let _ = handle(&ctx);
    1
}

/// This socket's tuple (`None` for non-IP families).
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> Option<ConnTuple> {
    let ops = ctx.ops;
    let family = ctx_u32!(ops, family);
    let (local, remote) = match family {
        AF_INET => (
            [ctx_u32!(ops, local_ip4), 0, 0, 0],
            [ctx_u32!(ops, remote_ip4), 0, 0, 0],
        ),
        AF_INET6 => (ctx_ip6!(ops, local_ip6), ctx_ip6!(ops, remote_ip6)),
        _ => return None,
    };
    let local_port = ctx_u32!(ops, local_port) as u16;
    let remote_port = addr::port_from_shifted_be(ctx_u32!(ops, remote_port));
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    Some(ConnTuple::new(
        netns,
        family,
        local,
        local_port,
        remote,
        remote_port,
    ))
}

fn handle(ctx: &SockOpsContext) -> Option<()> {
    let op = ctx_u32!(ctx.ops, op);
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return None;
    }
    let cfg = config()?;
    if !cfg.active() {
        return None;
    }
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // An app socket we redirected at connect time?
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let orig = *unsafe { ORIG_BY_COOKIE.get(&cookie) }?;
            let t = tuple(ctx)?;
            if FLOWS.insert(&t, &orig, BPF_ANY as u64).is_err() {
                count(reason::SOCKOPS_FLOW_MAP_FULL);
                return None;
            }
            count(reason::SOCKOPS_FLOW_RECORDED);
            // The cookie record serves getpeername() until the app socket closes.
            let flags = ctx_u32!(ctx.ops, bpf_sock_ops_cb_flags);
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            // Colour propagation: a zeroed ledger from the first byte (sk_msg counts the
            // stream offset in it), and the socket in SM_SOCKS so sk_msg sees its writes.
            // The proxy side does not join for propagation alone.
            let propagate = cfg.propagate() && orig.flags & ORIG_FLAG_PROPAGATE != 0;
            if propagate {
                if LEDGER.insert(&t, &ZERO_LEDGER, BPF_ANY as u64).is_ok() {
                    count(reason::LEDGER_CREATED);
                } else {
                    count(reason::LEDGER_MAP_FULL);
                }
            }
            // A connection routed in the kernel has no proxy side to short-circuit to: in the
            // sockhash it would only take tcp_bpf's send and receive paths on every call (and,
            // where acceleration is forced on, their EAGAIN to blocking readers).
            let kernel_routed = orig.flags & ORIG_FLAG_KERNEL != 0;
            if (cfg.accelerate() && !kernel_routed) || propagate {
                add_to_sockhash(ctx, t);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if ctx_u32!(ctx.ops, local_port) as u16 != cfg.outbound_port {
                return None;
            }
            // The proxy side of a pair whose app side was recorded a moment ago.
            let t = tuple(ctx)?;
            unsafe { FLOWS.get(&t.reversed()) }?;
            // The flow record lives until this (proxy) socket closes: the app may close first,
            // even before the proxy has accepted and asked for the original destination.
            let flags = ctx_u32!(ctx.ops, bpf_sock_ops_cb_flags);
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            if cfg.accelerate() {
                add_to_sockhash(ctx, t);
            }
        }
        _ => {
            // BPF_SOCK_OPS_STATE_CB (only captured sockets ask for it): args[1] is the new state.
            if ctx_u32!(ctx.ops, __bindgen_anon_1.args[1]) != BPF_TCP_CLOSE {
                return None;
            }
            let t = tuple(ctx)?;
            let _ = FLOW_STATE.remove(&t);
            if t.local_port == cfg.outbound_port {
                // Proxy side: the flow record is no longer needed by anyone, nor the app
                // socket's ledger (the proxy has read all it will read; the app side may have
                // closed long before, like for the flow record).
                let _ = FLOWS.remove(&t.reversed());
                let _ = LEDGER.remove(&t.reversed());
                count(reason::SOCKOPS_FLOW_CLOSED);
            } else {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                // Routed in the kernel: no proxy side will ever close, so the app side drops
                // the flow record.
                if let Some(o) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
                    if o.flags & ORIG_FLAG_KERNEL != 0 {
                        let _ = FLOWS.remove(&t);
                    }
                }
                let _ = ORIG_BY_COOKIE.remove(&cookie);
            }
        }
    }
    Some(())
}

#[inline(always)]
fn add_to_sockhash(ctx: &SockOpsContext, mut t: ConnTuple) {
    let ops = unsafe { &mut *ctx.ops };
    match SOCKS.update(&mut t, ops, BPF_ANY as u64) {
        Ok(()) => count(reason::SOCKOPS_SOCKHASH_ADDED),
        Err(_) => count(reason::SOCKOPS_SOCKHASH_FAILED),
    }
}
