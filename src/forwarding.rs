//! What the app learns about a request, in one place: the request-head checks every
//! route relies on (`Host`, HTTP/2 `:authority`, cookie crumbs, the request target), and
//! the headers sent to the app, by the proxy and by the app-context call alike.
//!
//! Order matters: hop-by-hop fields (and whatever `Connection` names) are removed first,
//! headers a client may not speak for are removed next, and the gateway's own headers
//! (`Host`, `X-Forwarded-*`, `X-Request-Id`) are set last, so no client field can remove
//! or replace them.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Version};

use crate::client_ip::ClientIp;
use crate::error::GatewayError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

const HOP_BY_HOP_COUNT: usize = 9;

/// RFC 9110 §7.6.1 connection-specific fields (plus the de-facto `Keep-Alive` and
/// `Proxy-Connection`). They describe one hop and must not be forwarded.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Client-IP and routing headers that frameworks or CDN-aware middleware may believe
/// (`request.ip`, URL rewriting). From a peer that is not a trusted proxy they are the
/// client's own claims, so they are removed; the gateway's `X-Forwarded-For/-Proto/-Host`
/// replace them. Names, not strings: a lookup by `&str` parses the name on every call.
const CLIENT_CLAIMS: [HeaderName; 12] = [
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Checks and normalises a request head before it is routed, so the proxy, the minting
/// routes and the app-context call all see the same request:
/// - two `Host` lines: 400; HTTP/1.1 without `Host`: 400 (RFC 9112 §3.2);
/// - an absolute-form target or HTTP/2 `:authority` that disagrees with `Host`: 400,
///   else `Host` is set from `:authority` (HTTP/2 clients send no `Host`);
/// - HTTP/2 `cookie` crumbs are joined with `"; "` into one field (RFC 9113 §8.2.3),
///   which an HTTP/1.1 app requires;
/// - a request target with raw non-ASCII bytes (HTTP/2 lets them through) is
///   percent-encoded, so the HTTP/1.1 request line to the app stays valid.
pub fn normalize_request<B>(req: &mut Request<B>) -> Result<(), GatewayError> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(GatewayError::BadRequest("more than one Host header".into()));
    }
    if req.version() == Version::HTTP_11 && hosts == 0 {
        return Err(GatewayError::BadRequest(
            "HTTP/1.1 request without a Host header".into(),
        ));
    }
    // RFC 9112 §3.2: an invalid Host is 400. It is echoed to the app (Host,
    // X-Forwarded-Host) and compared with Origin, so only `host[:port]` passes.
    if let Some(host) = req.headers().get(header::HOST) {
        let valid = host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| !a.as_str().contains('@') && !a.host().is_empty());
        if !valid {
            return Err(GatewayError::BadRequest("invalid Host header".into()));
        }
    }
    if let Some(authority) = req.uri().authority() {
        let authority = authority.as_str();
        match req.headers().get(header::HOST) {
            Some(host) if !host.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) => {
                return Err(GatewayError::BadRequest(
                    "Host header does not match the request's authority".into(),
                ));
            }
            Some(_) => {}
            None => {
                let v = HeaderValue::from_str(authority)
                    .map_err(|_| GatewayError::BadRequest("invalid authority".into()))?;
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }
    join_cookies(req.headers_mut());
    if let Some(pq) = req.uri().path_and_query() {
        if let Some(encoded) = percent_encode_target(pq.as_str()) {
            let pq = PathAndQuery::try_from(encoded)
                .map_err(|_| GatewayError::BadRequest("invalid request target".into()))?;
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            *req.uri_mut() = http::Uri::from_parts(parts)
                .map_err(|_| GatewayError::BadRequest("invalid request target".into()))?;
        }
    }
    Ok(())
}

/// Several `cookie` fields become one, joined with `"; "`.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// `Some(encoded)` when `target` holds bytes that may not appear raw in an HTTP/1.1
/// request line (non-ASCII, controls, space); existing `%XX` escapes are kept.
fn percent_encode_target(target: &str) -> Option<String> {
    let needs = |b: u8| b <= b' ' || b >= 0x7f;
    if !target.bytes().any(needs) {
        return None;
    }
    let mut out = String::with_capacity(target.len() * 3);
    for b in target.bytes() {
        if needs(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    Some(out)
}

/// The protocol a client may be switched to: `Ok(None)` without an upgrade request,
/// `Ok(Some(Upgrade value))` when every offered protocol is in `allowed` (lower-case
/// names, e.g. `websocket`), and 400 for anything else (`h2c` included: the app must
/// never be talked into a protocol the gateway does not proxy).
pub fn requested_upgrade<B>(
    req: &Request<B>,
    allowed: &[String],
) -> Result<Option<HeaderValue>, GatewayError> {
    let Some(upgrade) = req.headers().get(header::UPGRADE) else {
        return Ok(None);
    };
    let wants = req.version() == Version::HTTP_11
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !wants {
        // An `Upgrade` that `Connection` does not name is a stray hop-by-hop field:
        // removed with the others.
        return Ok(None);
    }
    let offered: Vec<&str> = upgrade
        .to_str()
        .unwrap_or("\u{0}")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let ok = !offered.is_empty()
        && offered.iter().all(|t| {
            let name = t.split('/').next().unwrap_or("");
            allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        });
    if ok {
        Ok(Some(upgrade.clone()))
    } else {
        Err(GatewayError::BadRequest(
            "this Upgrade protocol is not supported".into(),
        ))
    }
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop fields, including any the sender named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs on every request and every response. One pass over the few fields present
    // finds the hop-by-hop ones (name comparisons, no hashing); only those are removed.
    // Nine removals by name on every message were 3% of the proxy's instructions.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    // `Connection` is HOP_BY_HOP[0]: the fields it names go too.
    if present[0] {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

/// Who the request is from, and the gateway's own facts about it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub client: ClientIp,
    /// The socket peer (the last hop, appended to a trusted proxy's chain).
    pub peer: IpAddr,
    /// `Host` as normalised by [`normalize_request`].
    pub host: Option<HeaderValue>,
    /// The gateway's request id (the access log's).
    pub request_id: Option<HeaderValue>,
}

impl Origin {
    /// Reads the gateway's facts from a normalised request head; call it before any
    /// header is stripped.
    pub fn of(headers: &HeaderMap, client: ClientIp, peer: IpAddr) -> Self {
        Self {
            client,
            peer,
            host: headers.get(header::HOST).cloned(),
            request_id: headers.get(&X_REQUEST_ID).cloned(),
        }
    }
}

/// Turns a client's request headers into the ones the app receives (the proxy's rule).
/// `fallback_host` (the upstream authority) is used when the client sent no `Host`
/// (HTTP/1.0): the HTTP/1.1 request to the app must carry one.
pub fn upstream_headers(headers: &mut HeaderMap, origin: &Origin, fallback_host: &HeaderValue) {
    strip_hop_by_hop(headers);
    if !origin.client.peer_trusted {
        strip_client_claims(headers);
    }
    set_owned_headers(headers, origin, fallback_host);
}

/// The headers of the app-context call: the browser's credentials (`Cookie`,
/// `Authorization`) and the same owned headers the proxy sets.
pub fn context_headers(
    browser: &HeaderMap,
    client_ip: IpAddr,
    fallback_host: &HeaderValue,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [header::COOKIE, header::AUTHORIZATION] {
        for v in browser.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    join_cookies(&mut h);
    let origin = Origin {
        client: ClientIp {
            ip: client_ip,
            peer_trusted: false,
        },
        peer: client_ip,
        host: browser.get(header::HOST).cloned(),
        request_id: browser.get(&X_REQUEST_ID).cloned(),
    };
    set_owned_headers(&mut h, &origin, fallback_host);
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h
}

/// The headers of a verified webhook delivery forwarded to the app: its `Content-Type`
/// and delivery id (`X-Hook0-Id`, so the app can be idempotent too), and the same owned
/// headers the proxy sets. Nothing else of Coinbase's request (not its signature).
pub fn delivery_headers(
    delivery: &HeaderMap,
    client: ClientIp,
    peer: IpAddr,
    fallback_host: &HeaderValue,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [header::CONTENT_TYPE, HeaderName::from_static("x-hook0-id")] {
        if let Some(v) = delivery.get(&name) {
            h.insert(name, v.clone());
        }
    }
    set_owned_headers(&mut h, &Origin::of(delivery, client, peer), fallback_host);
    h
}

/// Headers an untrusted client may not send the app: the client-IP and routing claims
/// above, and every name with `_` (CGI, WSGI and Rack map `X_Forwarded_For` and
/// `X-Forwarded-For` onto the same `HTTP_X_FORWARDED_FOR`; nginx drops them too).
fn strip_client_claims(headers: &mut HeaderMap) {
    // One pass over the (few) fields the client sent instead of a lookup per claim
    // name: in the common case nothing matches and nothing is allocated.
    let claimed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_') || CLIENT_CLAIMS.contains(n))
        .cloned()
        .collect();
    for name in claimed {
        headers.remove(name);
    }
}

/// `Host`, `X-Forwarded-For`, `-Proto`, `-Host` and `X-Request-Id`, set last. Client-sent
/// forwarding headers are dropped, unless the peer is a trusted proxy, whose
/// `X-Forwarded-For` chain is kept and extended with the peer (nginx's
/// `$proxy_add_x_forwarded_for`).
fn set_owned_headers(headers: &mut HeaderMap, origin: &Origin, fallback_host: &HeaderValue) {
    let client = origin.client;
    headers.remove(X_REAL_IP);
    headers.remove(FORWARDED);
    let xff = if client.peer_trusted {
        let mut chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let peer = origin.peer.to_string();
        chain.push(&peer);
        HeaderValue::from_str(&chain.join(", ")).unwrap_or_else(|_| ip_value(client.ip))
    } else {
        ip_value(client.ip)
    };
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    match &origin.host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host.clone());
            headers.insert(header::HOST, host.clone());
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
            headers.insert(header::HOST, fallback_host.clone());
        }
    }
    match &origin.request_id {
        Some(id) => headers.insert(X_REQUEST_ID, id.clone()),
        None => headers.remove(X_REQUEST_ID),
    };
}

fn ip_value(ip: IpAddr) -> HeaderValue {
    use std::io::Write as _;
    // Formatted on the stack (at most 39 bytes for IPv6): one allocation per request.
    let mut buf = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    // An IP address is always a valid header value.
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALLBACK: HeaderValue = HeaderValue::from_static("127.0.0.1:3000");

    fn untrusted(ip: &str) -> ClientIp {
        ClientIp {
            ip: ip.parse().unwrap(),
            peer_trusted: false,
        }
    }

    fn origin(client: ClientIp, host: Option<&'static str>) -> Origin {
        Origin {
            client,
            peer: client.ip,
            host: host.map(HeaderValue::from_static),
            request_id: Some(HeaderValue::from_static("rid-1")),
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn each_hop_by_hop_field_is_removed_on_its_own() {
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), "x".parse().unwrap());
            h.insert("x-end-to-end", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(&name), "{name} kept");
            assert!(
                h.contains_key("x-end-to-end"),
                "{name}: end-to-end field lost"
            );
        }
    }

    #[test]
    fn owned_headers_survive_connection_naming_them() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "x-request-id, x-forwarded-for, host".parse().unwrap(),
        );
        h.insert(X_REQUEST_ID, "client-chosen".parse().unwrap());
        let o = origin(untrusted("203.0.113.5"), Some("app.example"));
        upstream_headers(&mut h, &o, &FALLBACK);
        assert_eq!(h[&X_REQUEST_ID], "rid-1");
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h[header::HOST], "app.example");
        assert_eq!(h["x-forwarded-host"], "app.example");
    }

    #[test]
    fn spoofed_forwarding_and_client_ip_headers_are_removed() {
        let mut h = HeaderMap::new();
        for n in [
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "x_forwarded_for",
        ] {
            h.insert(HeaderName::from_static(n), "6.6.6.6".parse().unwrap());
        }
        for n in CLIENT_CLAIMS {
            h.insert(n, "6.6.6.6".parse().unwrap());
        }
        h.insert("x-end-to-end", "1".parse().unwrap());
        upstream_headers(&mut h, &origin(untrusted("203.0.113.5"), None), &FALLBACK);
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h[header::HOST], "127.0.0.1:3000");
        for n in CLIENT_CLAIMS.iter().map(HeaderName::as_str).chain([
            "x-real-ip",
            "forwarded",
            "x_forwarded_for",
        ]) {
            assert!(!h.contains_key(n), "{n} kept: {h:?}");
        }
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn trusted_peer_chain_is_extended_and_its_headers_kept() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.9".parse().unwrap());
        h.append("cf-connecting-ip", "198.51.100.1".parse().unwrap());
        let client = ClientIp {
            ip: "198.51.100.1".parse().unwrap(),
            peer_trusted: true,
        };
        let mut o = origin(client, None);
        o.peer = "10.0.0.2".parse().unwrap();
        upstream_headers(&mut h, &o, &FALLBACK);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 10.0.0.9, 10.0.0.2");
        assert!(h.contains_key("cf-connecting-ip"));
    }

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn host_rules() {
        let mut r = req(Version::HTTP_11, "/", &[]);
        assert!(normalize_request(&mut r).is_err(), "HTTP/1.1 without Host");
        let mut r = req(Version::HTTP_11, "/", &[("host", "a"), ("host", "b")]);
        assert!(normalize_request(&mut r).is_err(), "two Host lines");
        let mut r = req(
            Version::HTTP_2,
            "https://good.example/x",
            &[("host", "evil")],
        );
        assert!(normalize_request(&mut r).is_err(), "h2 host != :authority");
        let mut r = req(Version::HTTP_2, "https://good.example/x", &[]);
        normalize_request(&mut r).unwrap();
        assert_eq!(r.headers()[header::HOST], "good.example");
        let mut r = req(Version::HTTP_10, "/", &[]);
        assert!(normalize_request(&mut r).is_ok(), "HTTP/1.0 may omit Host");
        for bad in ["a/b", "user@host", "", "a b"] {
            let mut r = req(Version::HTTP_11, "/", &[("host", bad)]);
            assert!(normalize_request(&mut r).is_err(), "Host {bad:?}");
        }
        for good in ["app.example", "app.example:8443", "[::1]:8443", "127.0.0.1"] {
            let mut r = req(Version::HTTP_11, "/", &[("host", good)]);
            assert!(normalize_request(&mut r).is_ok(), "Host {good:?}");
        }
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut r = req(
            Version::HTTP_2,
            "https://a.example/",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")],
        );
        normalize_request(&mut r).unwrap();
        let all: Vec<_> = r.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(all, vec!["a=1; b=2; c=3"]);
    }

    #[test]
    fn non_ascii_target_is_percent_encoded() {
        assert_eq!(percent_encode_target("/a%20b?q=1"), None);
        assert_eq!(
            percent_encode_target("/caf\u{e9}?x=\u{e9}").as_deref(),
            Some("/caf%C3%A9?x=%C3%A9")
        );
    }

    #[test]
    fn only_listed_upgrades_pass() {
        let allowed = vec!["websocket".to_string()];
        let up = |v: &str| {
            req(
                Version::HTTP_11,
                "/",
                &[("host", "a"), ("connection", "Upgrade"), ("upgrade", v)],
            )
        };
        assert!(requested_upgrade(&up("WebSocket"), &allowed)
            .unwrap()
            .is_some());
        assert!(requested_upgrade(&up("h2c"), &allowed).is_err());
        assert!(requested_upgrade(&up("websocket, h2c"), &allowed).is_err());
        let stray = req(Version::HTTP_11, "/", &[("host", "a"), ("upgrade", "h2c")]);
        assert_eq!(requested_upgrade(&stray, &allowed).unwrap(), None);
    }
}
