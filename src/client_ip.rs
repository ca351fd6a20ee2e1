//! Who the client is. The one place that decides the client IP used by the rate
//! limiter, the CDP `clientIp`, `X-Forwarded-For` to the app and the access log.
//!
//! Coinbase requires the IP from the network layer, never from a header a client can
//! write. So: the accepted socket's peer address, unless that peer is a configured
//! trusted proxy, in which case the right-most `X-Forwarded-For` hop that is not itself
//! trusted (what nginx's `real_ip_recursive on` does).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;
use ipnet::IpNet;

use crate::conn_limit::ConnLease;

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`, what a dual-stack `[::]` listener reports for
/// IPv4 clients) becomes plain IPv4 so one client has one key and one log spelling.
pub fn normalize(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Facts about one accepted connection, shared by every request on it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer (after normalisation), or the client a PROXY header named.
    pub peer: SocketAddr,
    /// The address the connection was accepted on.
    pub local: SocketAddr,
    /// True when `peer` came from a PROXY protocol header: an L4 balancer writes no
    /// `X-Forwarded-For`, so any on this connection was written by the client itself.
    pub proxy_named: bool,
    /// The connection's slots (limits, gauge). Whoever holds this `ConnInfo` keeps the
    /// connection counted: the HTTP connection task, then an upgraded tunnel.
    pub lease: Option<Arc<ConnLease>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            peer: SocketAddr::new(normalize(peer.ip()), peer.port()),
            local,
            proxy_named: false,
            lease: None,
        }
    }

    /// The client address was read from a PROXY protocol header.
    pub fn named_by_proxy_header(mut self) -> Self {
        self.proxy_named = true;
        self
    }

    pub fn with_lease(mut self, lease: ConnLease) -> Self {
        self.lease = Some(Arc::new(lease));
        self
    }
}

/// Decides the client IP of a request.
#[derive(Debug, Clone, Default)]
pub struct ClientIpPolicy {
    trusted: Vec<IpNet>,
}

/// The decision, and whether forwarding headers were believed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp {
    pub ip: IpAddr,
    /// True when the connection came from a trusted proxy; the app then gets the
    /// incoming `X-Forwarded-For` chain with the peer appended instead of a fresh one.
    pub peer_trusted: bool,
}

impl ClientIpPolicy {
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self { trusted }
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = normalize(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    pub fn resolve(&self, conn: &ConnInfo, headers: &HeaderMap) -> ClientIp {
        let peer = conn.peer.ip();
        // A PROXY header already named the client: it is the client, whatever its
        // address, and the headers on the connection are its own (never believed).
        if conn.proxy_named || self.trusted.is_empty() || !self.is_trusted(peer) {
            return ClientIp {
                ip: peer,
                peer_trusted: false,
            };
        }
        ClientIp {
            ip: self.rightmost_untrusted(peer, headers),
            peer_trusted: true,
        }
    }

    /// Walks the `X-Forwarded-For` hops from the right. Each trusted hop vouches for the
    /// one to its left; the first hop that is not trusted is the client. A malformed
    /// hop ends the walk: the last address vouched for is used, so garbage can never
    /// make the gateway believe an arbitrary address.
    fn rightmost_untrusted(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut current = peer;
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .collect();
        for value in values.iter().rev() {
            for hop in value.rsplit(',') {
                let hop = hop.trim();
                if hop.is_empty() {
                    continue;
                }
                let Some(ip) = parse_hop(hop) else {
                    return current;
                };
                current = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        current
    }
}

/// An XFF hop: `192.0.2.1`, `2001:db8::1`, and the bracketed or ported forms some
/// proxies write (`[2001:db8::1]:443`, `192.0.2.1:8080`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(normalize(ip));
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(normalize(sa.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .map(normalize)
}

/// Private, loopback, link-local, CGNAT or unique-local: addresses Coinbase refuses as
/// `clientIp`, and a sign the gateway sits behind a proxy it does not know about.
pub fn is_private(ip: IpAddr) -> bool {
    match normalize(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo::new(peer.parse().unwrap(), "127.0.0.1:8443".parse().unwrap())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn policy(nets: &[&str]) -> ClientIpPolicy {
        ClientIpPolicy::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    #[test]
    fn mapped_ipv6_is_normalised() {
        let c = conn("[::ffff:192.0.2.7]:5000");
        assert_eq!(c.peer.ip(), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let p = policy(&["10.0.0.0/8"]);
        let r = p.resolve(&conn("203.0.113.9:1"), &xff(&["1.2.3.4"]));
        assert_eq!(r.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert!(!r.peer_trusted);
        let none = ClientIpPolicy::default().resolve(&conn("203.0.113.9:1"), &xff(&["1.2.3.4"]));
        assert_eq!(none.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn proxy_named_client_inside_trusted_ranges_gets_no_xff_believed() {
        let p = policy(&["10.0.0.0/8"]);
        let c = conn("10.0.0.7:1").named_by_proxy_header();
        let r = p.resolve(&c, &xff(&["6.6.6.6"]));
        assert_eq!(r.ip, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert!(!r.peer_trusted);
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let p = policy(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let r = p.resolve(
            &conn("10.0.0.1:1"),
            &xff(&["6.6.6.6, 198.51.100.2, 10.1.1.1"]),
        );
        assert_eq!(r.ip, "198.51.100.2".parse::<IpAddr>().unwrap());
        let r = p.resolve(
            &conn("10.0.0.1:1"),
            &xff(&["6.6.6.6", "2001:db8::5, 2001:db8:ffff::1"]),
        );
        assert_eq!(r.ip, "2001:db8::5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn malformed_hop_stops_at_last_vouched_address() {
        let p = policy(&["10.0.0.0/8"]);
        let r = p.resolve(&conn("10.0.0.1:1"), &xff(&["1.2.3.4, bogus, 10.0.0.2"]));
        assert_eq!(r.ip, "10.0.0.2".parse::<IpAddr>().unwrap());
        let r = p.resolve(&conn("10.0.0.1:1"), &HeaderMap::new());
        assert_eq!(r.ip, "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn ported_and_bracketed_hops_parse() {
        assert_eq!(parse_hop("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("[2001:db8::1]"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("192.0.2.1:80"), "192.0.2.1".parse().ok());
        assert_eq!(parse_hop("unknown"), None);
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["192.0.2.1", "8.8.8.8", "2001:db8::1", "100.128.0.1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
