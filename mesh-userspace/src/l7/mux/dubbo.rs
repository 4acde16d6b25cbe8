//! The Dubbo 2 adapter: [`MuxProto`] for Dubbo, its attachment lookup and heartbeats.

use bytes::Bytes;

use tracing::debug;

use super::{colour_value, Fail, MuxPools, MuxProto, Plan, Pool, SUBSET_KEY};
use crate::{
    l7::ConnCtx,
    protocol::dubbo::{self, DubboCodec, DubboError, DubboFrame},
    routing::{
        colour::{self, ColourId},
        HeaderLookup, Policy, ProtocolHint, RequestInfo,
    },
};

pub(super) struct Dubbo;

/// Case-insensitive lookup in a Dubbo request's string attachments (the last one wins, as in
/// Java's map).
struct DubboAttachments<'a>(&'a [(String, String)]);

impl HeaderLookup for DubboAttachments<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Hessian2 `null`: the body of a heartbeat and of its response.
const HESSIAN2_NULL: &[u8] = b"N";

impl MuxProto for Dubbo {
    type Frame = DubboFrame;
    type Codec = DubboCodec;
    type Error = DubboError;
    const NAME: &'static str = "dubbo";
    const MAX_ID: u64 = u64::MAX;

    fn pool(pools: &MuxPools) -> &Pool<Self> {
        &pools.here().dubbo
    }

    fn id(f: &DubboFrame) -> u64 {
        f.request_id
    }

    fn set_id(f: &mut DubboFrame, id: u64) {
        f.request_id = id;
    }

    fn is_response(f: &DubboFrame) -> bool {
        !f.is_request()
    }

    fn heartbeat(id: u64) -> DubboFrame {
        DubboFrame {
            flag: dubbo::FLAG_REQUEST
                | dubbo::FLAG_TWO_WAY
                | dubbo::FLAG_EVENT
                | dubbo::SERIALIZATION_HESSIAN2,
            status: 0,
            request_id: id,
            body: Bytes::from_static(HESSIAN2_NULL),
        }
    }

    fn heartbeat_reply(f: &DubboFrame) -> Option<DubboFrame> {
        (f.is_request() && f.is_event() && f.is_two_way()).then(|| DubboFrame {
            flag: dubbo::FLAG_EVENT | f.serialization_id(),
            status: dubbo::status::OK,
            request_id: f.request_id,
            body: Bytes::from_static(HESSIAN2_NULL),
        })
    }

    fn plan(
        ctx: &ConnCtx,
        policy: &Policy,
        mut f: DubboFrame,
        propagated: Option<ColourId>,
    ) -> Plan<DubboFrame> {
        if !f.is_request() {
            ctx.l7().errors.count(Self::NAME, "unexpected_response");
            return Plan::Ignore;
        }
        if f.is_event() {
            // Heartbeats; one-way events (read-only notices) concern this hop only.
            return Self::heartbeat_reply(&f).map_or(Plan::Ignore, Plan::Reply);
        }
        let oneway = !f.is_two_way();
        let invocation = if f.serialization_id() == dubbo::SERIALIZATION_HESSIAN2 {
            match dubbo::decode_request_body(&f.body) {
                Ok(inv) => Some(inv),
                Err(e) => {
                    ctx.l7().errors.count(Self::NAME, e.reason());
                    debug!(id = f.request_id, "dubbo: undecodable body: {e}");
                    if oneway {
                        return Plan::Ignore;
                    }
                    let msg = format!("sockmesh: cannot decode the request body: {e}");
                    return Plan::Reply(dubbo::error_response(
                        f.request_id,
                        dubbo::status::BAD_REQUEST,
                        &msg,
                    ));
                }
            }
        } else {
            None
        };
        let (colour_value, routed) = match &invocation {
            Some(inv) => {
                let headers = DubboAttachments(&inv.attachments);
                let (choice, routed) = ctx.route(
                    policy,
                    &RequestInfo {
                        protocol: ProtocolHint::Dubbo,
                        host: None,
                        path: None,
                        service: Some(&inv.service_path),
                        method: Some(&inv.method),
                        version: Some(&inv.service_version)
                            .filter(|v| !v.is_empty())
                            .map(|v| v.as_str()),
                        headers: &headers,
                    },
                    propagated,
                );
                let had_colour = colour::header_of(&headers).is_some();
                (colour_value(policy, &choice, had_colour), routed)
            }
            None => {
                let (choice, routed) = ctx.route(policy, &RequestInfo::bare(ProtocolHint::Dubbo), propagated);
                (colour_value(policy, &choice, false), routed)
            }
        };
        if let (Some(v), Some(_)) = (colour_value, &invocation) {
            // The body decoded above, so this cannot fail; forward it unchanged if it does.
            if let Ok(body) = dubbo::add_attachment(&f.body, colour::COLOUR_HEADER, v) {
                f.body = body.into();
            }
        }
        match routed {
            Ok(decision) => {
                if invocation.is_some() && &*decision.service != "passthrough" {
                    // The body decoded above, so this cannot fail; forward it unchanged if it does.
                    if let Ok(body) = dubbo::add_attachment(&f.body, SUBSET_KEY, &decision.subset) {
                        f.body = body.into();
                    }
                }
                Plan::Forward {
                    frame: f,
                    decision,
                    oneway,
                }
            }
            Err(e) => {
                ctx.l7().errors.count(Self::NAME, e.reason());
                debug!(id = f.request_id, "dubbo: {e}");
                if oneway {
                    return Plan::Ignore;
                }
                let msg = format!("sockmesh: {e}");
                Plan::Reply(dubbo::error_response(
                    f.request_id,
                    dubbo::status::SERVICE_NOT_FOUND,
                    &msg,
                ))
            }
        }
    }

    fn fail_reply(req: &DubboFrame, why: Fail, msg: &str) -> DubboFrame {
        let status = match why {
            Fail::Timeout => dubbo::status::SERVER_TIMEOUT,
            Fail::Connect => dubbo::status::SERVICE_ERROR,
            Fail::Closed => dubbo::status::SERVER_ERROR,
        };
        dubbo::error_response(req.request_id, status, msg)
    }

    fn error_reason(e: &DubboError) -> &'static str {
        e.reason()
    }

    fn error_id(e: &DubboError) -> Option<u64> {
        e.request_id()
    }

    fn bad_input_reply(_prefix: &[u8], id: u64, msg: &str) -> DubboFrame {
        dubbo::error_response(id, dubbo::status::BAD_REQUEST, msg)
    }
}
