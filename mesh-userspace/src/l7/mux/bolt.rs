//! The SOFA Bolt adapter: [`MuxProto`] for Bolt, its header lookup (the header map, then a
//! SofaRequest's `requestProps`) and heartbeats.

use tracing::debug;

use super::{
    colour_value, Fail, MuxPools, MuxProto, Plan, Pool, BOLT_METHOD_HEADER, ERROR_HEADER, SUBSET_KEY,
};
use crate::{
    l7::ConnCtx,
    protocol::{
        bolt::{self, BoltCodec, BoltError, BoltFrame},
        sofa::{self, SofaRequestInfo},
    },
    routing::{
        colour::{self, ColourId},
        HeaderLookup, Policy, ProtocolHint, RequestInfo,
    },
};

pub(super) struct Bolt;

/// Case-insensitive lookup in a Bolt header map, then in the SofaRequest's `requestProps`.
struct BoltHeaders<'a> {
    frame: &'a BoltFrame,
    body: Option<&'a SofaRequestInfo<'a>>,
}

impl HeaderLookup for BoltHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        let in_map = self
            .frame
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|h| h.value.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok());
        in_map.or_else(|| self.body?.prop(name))
    }
}

/// The routing fields of a Bolt request's SofaRequest content, when it has one that decodes.
/// Anything else (another class or codec, a malformed body, one over the decoder's limits) is
/// `None`, and not an error: the request is routed on its header map.
fn bolt_body(f: &BoltFrame) -> Option<SofaRequestInfo<'_>> {
    match sofa::decode_request(&f.class_name, f.codec, &f.content) {
        Ok(body) => body,
        Err(e) => {
            debug!(
                id = f.request_id,
                reason = e.reason(),
                "bolt: routing on the header map only: {e}"
            );
            None
        }
    }
}

fn bolt_heartbeat_ack(req: &BoltFrame) -> BoltFrame {
    BoltFrame {
        cmd_code: bolt::CMD_HEARTBEAT,
        ..req.error_response_to(bolt::status::SUCCESS)
    }
}

impl MuxProto for Bolt {
    type Frame = BoltFrame;
    type Codec = BoltCodec;
    type Error = BoltError;
    const NAME: &'static str = "bolt";
    const MAX_ID: u64 = u32::MAX as u64;

    fn pool(pools: &MuxPools) -> &Pool<Self> {
        &pools.here().bolt
    }

    fn id(f: &BoltFrame) -> u64 {
        u64::from(f.request_id)
    }

    fn set_id(f: &mut BoltFrame, id: u64) {
        f.request_id = id as u32;
    }

    fn is_response(f: &BoltFrame) -> bool {
        f.is_response()
    }

    fn heartbeat(id: u64) -> BoltFrame {
        BoltFrame {
            cmd_type: bolt::TYPE_REQUEST,
            cmd_code: bolt::CMD_HEARTBEAT,
            timeout: 1000,
            status: 0,
            ..bolt::error_response(id as u32, 0)
        }
    }

    fn heartbeat_reply(f: &BoltFrame) -> Option<BoltFrame> {
        (f.is_heartbeat() && f.cmd_type == bolt::TYPE_REQUEST).then(|| bolt_heartbeat_ack(f))
    }

    fn plan(
        ctx: &ConnCtx,
        policy: &Policy,
        mut f: BoltFrame,
        propagated: Option<ColourId>,
    ) -> Plan<BoltFrame> {
        if f.is_response() {
            ctx.l7().errors.count(Self::NAME, "unexpected_response");
            return Plan::Ignore;
        }
        if f.is_heartbeat() {
            return Self::heartbeat_reply(&f).map_or(Plan::Ignore, Plan::Reply);
        }
        let oneway = f.cmd_type == bolt::TYPE_REQUEST_ONEWAY;
        let routed = {
            let body = bolt_body(&f);
            let mut target = f.header_str(bolt::HEADER_SERVICE).unwrap_or("").split(':');
            let (service, version) = match target.next().filter(|s| !s.is_empty()) {
                Some(service) => (Some(service), target.next().filter(|s| !s.is_empty())),
                None => body
                    .as_ref()
                    .map_or((None, None), SofaRequestInfo::service_version),
            };
            let method = f
                .header_str(BOLT_METHOD_HEADER)
                .or_else(|| body.as_ref()?.method.as_deref());
            let headers = BoltHeaders {
                frame: &f,
                body: body.as_ref(),
            };
            let had_colour = colour::header_of(&headers).is_some();
            let info = RequestInfo {
                protocol: ProtocolHint::Bolt,
                host: None,
                path: None,
                service,
                method,
                version,
                headers: &headers,
            };
            let (choice, routed) = ctx.route(policy, &info, propagated);
            (colour_value(policy, &choice, had_colour), routed)
        };
        let (colour_value, routed) = routed;
        if let Some(v) = colour_value {
            f.set_header(colour::COLOUR_HEADER, v);
        }
        match routed {
            Ok(decision) => {
                if &*decision.service != "passthrough" {
                    f.set_header(SUBSET_KEY, &decision.subset);
                }
                Plan::Forward {
                    frame: f,
                    decision,
                    oneway,
                }
            }
            Err(e) => {
                ctx.l7().errors.count(Self::NAME, e.reason());
                debug!(id = f.request_id, "bolt: {e}");
                if oneway {
                    return Plan::Ignore;
                }
                let mut reply = f.error_response_to(bolt::status::NO_PROCESSOR);
                reply.set_header(ERROR_HEADER, &format!("sockmesh: {e}"));
                Plan::Reply(reply)
            }
        }
    }

    fn fail_reply(req: &BoltFrame, why: Fail, msg: &str) -> BoltFrame {
        let status = match why {
            Fail::Timeout => bolt::status::TIMEOUT,
            Fail::Connect => bolt::status::ERROR_COMM,
            Fail::Closed => bolt::status::CONNECTION_CLOSED,
        };
        let mut reply = req.error_response_to(status);
        reply.set_header(ERROR_HEADER, msg);
        reply
    }

    fn error_reason(e: &BoltError) -> &'static str {
        e.reason()
    }

    fn error_id(e: &BoltError) -> Option<u64> {
        e.request_id().map(u64::from)
    }

    fn bad_input_reply(prefix: &[u8], id: u64, msg: &str) -> BoltFrame {
        // Answer in the frame's own version when its fixed header is still at hand.
        let mut reply = bolt::error_response(id as u32, bolt::status::CODEC_EXCEPTION);
        match prefix {
            [bolt::PROTO_V2, ver1, _, _, _, _, _, _, _, _, codec, switch, ..] => {
                reply.proto = bolt::PROTO_V2;
                reply.ver1 = *ver1;
                reply.codec = *codec;
                reply.switch = *switch;
            }
            [bolt::PROTO_V1, _, _, _, _, _, _, _, _, codec, ..] => reply.codec = *codec,
            _ => {}
        }
        reply.set_header(ERROR_HEADER, msg);
        reply
    }
}
