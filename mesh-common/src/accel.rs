//! The sk_msg short-circuit budget. Ingress redirect has no backpressure, so a flow that shows
//! bulk behaviour (a large write, or too many bytes in total) leaves the short-circuit for good.
//! The switch is one-way: redirected bytes are read before TCP bytes, so order is kept.

use core::mem::size_of;

use crate::config::MeshConfig;

pub const FLOW_REDIRECTING: u32 = 0;
pub const FLOW_FELL_BACK: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub bytes: u64,
    pub msgs: u32,
    pub state: u32,
}

const _: () = assert!(size_of::<FlowState>() == 16);

impl FlowState {
    pub const fn new() -> Self {
        Self {
            bytes: 0,
            msgs: 0,
            state: FLOW_REDIRECTING,
        }
    }
}

impl Default for FlowState {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirect this message to the peer's ingress queue.
    Redirect,
    /// Let the message take TCP; the flow has fallen back (reason given on the first message).
    FallBack(u32),
    /// The flow fell back earlier.
    AlreadyFellBack,
}

/// Decide for one message of `size` bytes and update `state`.
pub fn decide(cfg: &MeshConfig, state: &mut FlowState, size: u32) -> Verdict {
    use crate::stats::reason;
    if state.state == FLOW_FELL_BACK {
        return Verdict::AlreadyFellBack;
    }
    if size > cfg.accel_max_msg {
        state.state = FLOW_FELL_BACK;
        return Verdict::FallBack(reason::MSG_FALLBACK_SIZE);
    }
    let total = state.bytes.saturating_add(size as u64);
    if total > cfg.accel_flow_budget {
        state.state = FLOW_FELL_BACK;
        return Verdict::FallBack(reason::MSG_FALLBACK_BUDGET);
    }
    state.bytes = total;
    state.msgs = state.msgs.saturating_add(1);
    Verdict::Redirect
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FLAG_ACCELERATE, FLAG_ENABLED};
    use crate::stats::reason;

    fn cfg() -> MeshConfig {
        let mut c = MeshConfig::new(FLAG_ENABLED | FLAG_ACCELERATE, 15001, 15006, 0);
        c.accel_max_msg = 1000;
        c.accel_flow_budget = 2500;
        c
    }

    #[test]
    fn small_messages_redirect_until_budget_then_fall_back_for_good() {
        let c = cfg();
        let mut s = FlowState::new();
        assert_eq!(decide(&c, &mut s, 1000), Verdict::Redirect);
        assert_eq!(decide(&c, &mut s, 1000), Verdict::Redirect);
        assert_eq!(
            decide(&c, &mut s, 1000),
            Verdict::FallBack(reason::MSG_FALLBACK_BUDGET)
        );
        // One-way: even a tiny message now takes TCP.
        assert_eq!(decide(&c, &mut s, 1), Verdict::AlreadyFellBack);
        assert_eq!(s.bytes, 2000);
        assert_eq!(s.msgs, 2);
    }

    #[test]
    fn a_large_write_falls_back_at_once() {
        let c = cfg();
        let mut s = FlowState::new();
        assert_eq!(
            decide(&c, &mut s, 64 * 1024),
            Verdict::FallBack(reason::MSG_FALLBACK_SIZE)
        );
        assert_eq!(decide(&c, &mut s, 10), Verdict::AlreadyFellBack);
        assert_eq!(s.bytes, 0);
    }
}
