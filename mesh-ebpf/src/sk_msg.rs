//! `sk_msg` on `SM_SOCKS`: hand each message straight to the peer socket's ingress queue,
//! skipping loopback TCP, within the budget `mesh_common::accel` decides. Any message that
//! takes TCP makes the flow take TCP for good (one-way), so bytes are never reordered.
//!
//! Also a no-op `sk_skb/stream_verdict` on the same map: with it attached, sockets in the map
//! keep correct FIONREAD and epoll readiness on kernels with the sockmap FIONREAD change.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_netns_cookie},
    macros::{sk_msg, stream_verdict},
    programs::{SkBuffContext, SkMsgContext},
};
use mesh_common::{
    accel::{self, FlowState, Verdict, FLOW_FELL_BACK},
    addr,
    flow::ConnTuple,
    stats::reason,
    AF_INET, AF_INET6,
};

use crate::{
    ctx_ip6, ctx_u32,
    maps::{config, count, FLOW_STATE, LEDGER, SOCKS, THREAD_COLOUR},
};

#[sk_msg]
pub fn sm_sk_msg(ctx: SkMsgContext) -> u32 {
    handle(&ctx);
    SK_PASS
}

#[stream_verdict]
pub fn sm_sk_skb_verdict(_ctx: SkBuffContext) -> u32 {
    SK_PASS
}

#[inline(always)]
fn tuple(ctx: &SkMsgContext) -> Option<ConnTuple> {
    let md = ctx.msg;
    let family = ctx_u32!(md, family);
    let (local, remote) = match family {
        AF_INET => (
            [ctx_u32!(md, local_ip4), 0, 0, 0],
            [ctx_u32!(md, remote_ip4), 0, 0, 0],
        ),
        AF_INET6 => (ctx_ip6!(md, local_ip6), ctx_ip6!(md, remote_ip6)),
        _ => return None,
    };
    let local_port = ctx_u32!(md, local_port);
    let remote_port = ctx_u32!(md, remote_port);
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    Some(ConnTuple::new(
        netns,
        family,
        local,
        local_port as u16,
        remote,
        addr::port_from_shifted_be(remote_port),
    ))
}

/// Returns after redirecting, or leaves the message to TCP (the caller returns `SK_PASS`;
/// after a successful redirect the kernel ignores the verdict's destination).
fn handle(ctx: &SkMsgContext) -> Option<()> {
    let cfg = config()?;
    let t = tuple(ctx)?;
    if cfg.abi_version == mesh_common::ABI_VERSION {
        // Also while capture is switching off: a ledger must count every byte of its stream.
        record_colour(ctx, &t, cfg.accelerate());
    }
    if !cfg.accelerate() {
        fall_back(&t);
        return None;
    }
    let size = ctx_u32!(ctx.msg, size);
    let state = match FLOW_STATE.get_ptr_mut(&t) {
        Some(p) => p,
        None => {
            let _ = FLOW_STATE.insert(&t, &FlowState::new(), BPF_NOEXIST as u64);
            FLOW_STATE.get_ptr_mut(&t)?
        }
    };
    // SAFETY: the socket lock serialises sendmsg on this socket, and with it this entry.
    let state = unsafe { &mut *state };
    match accel::decide(&cfg, state, size) {
        Verdict::Redirect => {
            let mut peer = t.reversed();
            let ret = SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64);
            if ret as u32 == SK_PASS {
                count(reason::MSG_REDIRECTED);
            } else {
                // No peer in the map (or it left): TCP from now on, for ordering.
                state.state = FLOW_FELL_BACK;
                count(reason::MSG_NO_PEER);
            }
        }
        Verdict::FallBack(r) => count(r),
        Verdict::AlreadyFellBack => count(reason::MSG_PASSED_AFTER_FALLBACK),
    }
    Some(())
}

/// Colour propagation: a socket with a ledger (created at sockops for pods with propagation on)
/// records the sending thread's colour at this message's stream offset. The bytes are never
/// touched. Sockets without a ledger pay one hash lookup.
#[inline(always)]
fn record_colour(ctx: &SkMsgContext, t: &ConnTuple, accelerate: bool) {
    let Some(l) = LEDGER.get_ptr_mut(t) else {
        if !accelerate {
            // Without acceleration only propagating sockets are in SM_SOCKS: this one lost its
            // ledger (LRU eviction). It is not recreated: its offsets would be wrong.
            count(reason::LEDGER_MISSING);
        }
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    let colour = unsafe { THREAD_COLOUR.get(&tid) }.copied().unwrap_or(0);
    let size = ctx_u32!(ctx.msg, size);
    // SAFETY: the socket lock serialises sendmsg on this socket, and with it this entry.
    if unsafe { (*l).on_message(size, colour) } {
        count(reason::LEDGER_RECORDED);
    }
}

/// Acceleration was switched off while the socket was in the map: never redirect it again.
#[inline(always)]
fn fall_back(t: &ConnTuple) {
    if let Some(p) = FLOW_STATE.get_ptr_mut(t) {
        unsafe { (*p).state = FLOW_FELL_BACK };
    } else {
        let mut s = FlowState::new();
        s.state = FLOW_FELL_BACK;
        let _ = FLOW_STATE.insert(t, &s, 0);
    }
    count(reason::MSG_PASSED_AFTER_FALLBACK);
}
