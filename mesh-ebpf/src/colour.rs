//! Colour propagation, inbound half: BTF tracepoints on `sock:sock_recv_length` and
//! `sock:sock_send_length` (kernel 6.3+), which run in the thread that reads or writes.
//!
//! - recv on an app socket the proxy coloured (`SM_COLOUR_IN`): the thread now serves a request
//!   of that colour (`SM_TID_COLOUR[tid] = c`); colour 0 clears it.
//! - send on such a socket (the app writing its response): the request scope ends, the thread's
//!   colour is cleared.
//!
//! Every recvmsg/sendmsg of the host runs these programs, so the common path is short: one
//! `bpf_probe_read_kernel` of the socket's first 18 bytes and one bit of `SM_COLOUR_PORTS`
//! (an inlined array lookup); only a port with colour entries pays the tuple hash. The sk_msg
//! half (the ledger) is in `sk_msg.rs`. The kernel attaches tracepoints host-wide, so they act
//! only for tasks under the daemon's `cgroup_root` (an ancestor cgroup id check).

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use mesh_common::{
    colour::{port_bit, SockCommonHead},
    stats::reason,
};

use crate::maps::{config, count, COLOUR_INBOUND, COLOUR_PORTS, THREAD_COLOUR};

/// `MSG_PEEK`: the data stays queued; the real read comes later.
const MSG_PEEK: i32 = 2;

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sm_recv_colour(ctx: BtfTracePointContext) -> i32 {
    let _ = on_recv(&ctx);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sm_send_colour(ctx: BtfTracePointContext) -> i32 {
    let _ = on_send(&ctx);
    0
}

/// The colour entry of the tracepoint's socket (`struct sock *` is argument 0), if any.
#[inline(always)]
fn inbound_colour(ctx: &BtfTracePointContext) -> Option<u32> {
    let sk: *const SockCommonHead = ctx.arg(0);
    if sk.is_null() {
        return None;
    }
    // SAFETY: a kernel pointer read through the helper, which faults safely.
    let head = unsafe { bpf_probe_read_kernel(sk) }.ok()?;
    let (word, bit) = port_bit(head.num);
    if COLOUR_PORTS.get(word)? & bit == 0 {
        return None;
    }
    let key = head.inbound_key()?;
    let colour = unsafe { COLOUR_INBOUND.get(&key) }.copied()?;
    let cfg = config()?;
    if cfg.abi_version != mesh_common::ABI_VERSION {
        return None;
    }
    // Tracepoints are not cgroup-scoped: act only for tasks under the daemon's cgroup_root,
    // like every other hook.
    if cfg.cgroup_root_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(cfg.cgroup_root_level as i32) } != cfg.cgroup_root_id
    {
        return None;
    }
    Some(colour)
}

fn on_recv(ctx: &BtfTracePointContext) -> Option<()> {
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || flags & MSG_PEEK != 0 {
        return None;
    }
    let colour = inbound_colour(ctx)?;
    let tid = bpf_get_current_pid_tgid() as u32;
    let current = unsafe { THREAD_COLOUR.get(&tid) }.copied();
    if colour == 0 {
        if current.is_some() {
            let _ = THREAD_COLOUR.remove(&tid);
            count(reason::RECV_CLEARED);
        }
    } else if current != Some(colour) {
        if THREAD_COLOUR.insert(&tid, &colour, 0).is_ok() {
            count(reason::RECV_COLOURED);
        }
    }
    Some(())
}

fn on_send(ctx: &BtfTracePointContext) -> Option<()> {
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return None;
    }
    inbound_colour(ctx)?;
    let tid = bpf_get_current_pid_tgid() as u32;
    if unsafe { THREAD_COLOUR.get(&tid) }.is_some() {
        let _ = THREAD_COLOUR.remove(&tid);
        count(reason::SEND_CLEARED);
    }
    Some(())
}
