//! The headers idemgate adds or removes on the proxy path: its own
//! (`Idempotency-Fence` upstream, `Idempotent-*` on replays) and the
//! connection-specific ones a proxy never passes on.

use http::header::{self, HeaderMap, HeaderName};

/// Request header carrying the lease's fence to the upstream.
pub const IDEMPOTENCY_FENCE: HeaderName = HeaderName::from_static("idempotency-fence");
/// Response header marking a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Response header marking a replay whose record came from reconciliation
/// (the upstream's own account of an earlier attempt).
pub const IDEMPOTENT_RECONCILED: HeaderName = HeaderName::from_static("idempotent-reconciled");
/// Response header marking a replay whose body was too large to store.
pub const IDEMPOTENT_BODY_OMITTED: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// How many names `HOP_BY_HOP` holds.
const HOPS: usize = 8;

/// RFC 9110 §7.6.1 connection-specific fields, plus the de-facto
/// `proxy-connection` and `keep-alive`. (`Trailer` is not one: it names the
/// trailer fields end to end, and HTTP/1.1 sends trailers only where it
/// names them.)
const HOP_BY_HOP: [HeaderName; HOPS] = [
    // First: `strip_hop_by_hop` reads the names it lists.
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers and those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass comparing the names the message has, then a removal only
    // for those it has: most messages carry none of them, or only
    // `Connection`, and each removal hashes its name (measured:
    // benches/RESULTS.md, "Moves and lookups").
    let mut present = [false; HOPS];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, here) in HOP_BY_HOP.iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_listed_and_standard_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept");
            assert_eq!(h.len(), 1);
        }
    }
}
