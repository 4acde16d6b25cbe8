//! `sk_lookup`, attached to each enrolled pod's netns that has meshed inbound ports: a TCP
//! connection for one of the pod's addresses and meshed ports goes to the daemon's inbound
//! listener for that pod. No listener in the map (daemon gone), a port not meshed, or a
//! connection from the pod's own address or arriving on `lo` (the daemon delivering to the app,
//! or the pod talking to itself): normal delivery. Always `SK_PASS`; a failed assign also falls back to normal delivery.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{
    inbound::{InboundKey, ANY_PORT, LOOPBACK_IFINDEX},
    stats::reason,
    AF_INET, AF_INET6, IPPROTO_TCP,
};

use crate::{
    ctx_ip6, ctx_u32,
    maps::{config, count, INBOUND, INBOUND_EXCLUDE, LISTENERS},
};

const ENOENT: i32 = 2;

#[sk_lookup]
pub fn sm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let _ = handle(&ctx);
    SK_PASS
}

fn handle(ctx: &SkLookupContext) -> Option<()> {
    let l = ctx.lookup;
    if ctx_u32!(l, protocol) != IPPROTO_TCP || ctx_u32!(l, ingress_ifindex) == LOOPBACK_IFINDEX {
        return None;
    }
    let cfg = config()?;
    if !cfg.active() {
        return None;
    }
    let port = ctx_u32!(l, local_port) as u16;
    // A connection from the pod's own address to itself is the daemon delivering to the app
    // (or the app calling itself): local traffic is not always seen as arriving on `lo`.
    let key = match ctx_u32!(l, family) {
        AF_INET => {
            let local = ctx_u32!(l, local_ip4);
            if ctx_u32!(l, remote_ip4) == local {
                return None;
            }
            InboundKey::v4(local, port)
        }
        AF_INET6 => {
            let local = ctx_ip6!(l, local_ip6);
            if ctx_ip6!(l, remote_ip6) == local {
                return None;
            }
            InboundKey::v6(local, port)
        }
        _ => return None,
    };
    if port == cfg.outbound_port || port == cfg.inbound_port {
        return None;
    }
    let target = match unsafe { INBOUND.get(&key) } {
        Some(t) => *t,
        None => {
            // All ports of the address meshed, minus the exclusions?
            let t = *unsafe { INBOUND.get(&key.with_port(ANY_PORT)) }?;
            if unsafe { INBOUND_EXCLUDE.get(&key) }.is_some() {
                count(reason::LOOKUP_EXCLUDED);
                return None;
            }
            t
        }
    };
    match LISTENERS.redirect_sk_lookup(ctx, target.slot, 0) {
        Ok(()) => count(reason::LOOKUP_ASSIGNED),
        Err(e) if e == -ENOENT => count(reason::LOOKUP_NO_LISTENER),
        Err(_) => count(reason::LOOKUP_ASSIGN_FAILED),
    }
    Some(())
}
