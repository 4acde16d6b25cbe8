//! Header and request helpers: the HTTP/1.1 head size, case-insensitive header lookup for
//! routing, gRPC detection and `grpc-message` encoding, the `Host` as sent, and hop-by-hop
//! stripping.

use http::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Request, Uri,
};

use super::HttpVersion;
use crate::routing::HeaderLookup;

/// The size of an HTTP/1.1 request head as sent (request line, headers, CRLFs).
pub(super) fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + uri_len(req.uri()) + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    line + headers + 2
}

/// The length of `uri` as `Display` writes it (scheme `://`, authority, path, `?` query),
/// without writing it.
fn uri_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// Case-insensitive lookup over an `http::HeaderMap` (its `&str` lookup ignores ASCII case).
pub(super) struct Headers<'a>(pub(super) &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
pub(super) fn grpc_service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// Host as the app sent it: `Host` for HTTP/1.1 (else the absolute URI's authority),
/// `:authority` for HTTP/2 (else `Host`).
pub(super) fn request_host<'a>(
    version: HttpVersion,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Option<&'a str> {
    let from_header = || headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let from_uri = || uri.authority().map(|a| a.as_str());
    match version {
        HttpVersion::Http1 => from_header().or_else(from_uri),
        HttpVersion::Http2 => from_uri().or_else(from_header),
    }
}

/// Remove the headers that describe one hop only: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `TE` (except `trailers`), `Transfer-Encoding` and `Upgrade`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard names compare as tags, no
    // hashing) spares the lookups and removals below.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in proxy {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `name` is one [`strip_hop_by_hop`] always removes, or `Connection` (which names
/// more).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// `grpc-message` is percent-encoded (printable ASCII except `%` passes as is).
pub(super) fn grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Thing"));
        h.insert("x-thing", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(left, ["host=a", "te=trailers"]);
    }

    #[test]
    fn end_to_end_headers_are_left_as_they_are() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.append("x-proxy", HeaderValue::from_static("1"));
        h.append("x-proxy", HeaderValue::from_static("2"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        // One hop-by-hop name among them: only it goes.
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn uri_length_is_that_of_the_uri_as_written() {
        for u in [
            "/",
            "*",
            "/a/b?c=d&e",
            "/?",
            "http://example.com",
            "http://example.com:8080/x?y",
            "example.com:443",
            "https://user@h/p",
        ] {
            let uri: Uri = u.parse().unwrap();
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{u}");
        }
    }

    #[test]
    fn request_info_helpers() {
        assert_eq!(
            grpc_service_method("/pkg.Svc/Method"),
            Some(("pkg.Svc", "Method"))
        );
        assert_eq!(grpc_service_method("/pkg.Svc"), None);
        assert_eq!(grpc_service_method("/a/b/c"), None);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("true"));
        assert_eq!(Headers(&h).header("X-Canary"), Some("true"));
        assert_eq!(Headers(&h).header("x-other"), None);
        assert_eq!(grpc_message("50% off\n"), "50%25 off%0A");
    }
}
