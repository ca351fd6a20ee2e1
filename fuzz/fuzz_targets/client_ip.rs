//! Client-IP decision (src/client_ip.rs `ClientIpPolicy::resolve`, src/proxy_protocol.rs
//! `client_address`): socket peer + PROXY header bytes + `X-Forwarded-For` + trusted CIDRs.
//!
//! Input layout (lenient, so any bytes are an input):
//! - byte 0: socket peer, an index into [`PEERS`];
//! - byte 1: which of [`CIDRS`] are `trusted_proxies` (bit mask);
//! - byte 2: bit 0 set = `proxy_protocol = "on"`; then byte 3 = n, the next n bytes are
//!   what the peer sent before TLS (a PROXY v1 or v2 header);
//! - the rest: `X-Forwarded-For` values, one per line.
//!
//! Invariant (Coinbase requires the network-layer IP): an untrusted peer's headers never
//! change the answer, and the answer is always the peer or a hop vouched for by trusted
//! hops to its right.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use onramp_gateway::client_ip::{normalize, ClientIpPolicy, ConnInfo};
use onramp_gateway::proxy_protocol::client_address;
use proxy_header::{ParseConfig, ProxyHeader};

const PEERS: [&str; 8] = [
    "10.0.0.1:40000",
    "192.0.2.1:40000",
    "203.0.113.5:40000",
    "[::1]:40000",
    "[::ffff:10.0.0.2]:40000",
    "[2001:db8::1]:40000",
    "127.0.0.1:40000",
    "198.51.100.7:40000",
];
const CIDRS: [&str; 8] = [
    "10.0.0.0/8",
    "127.0.0.1/32",
    "::1/128",
    "2001:db8::/32",
    "192.0.2.0/24",
    "203.0.113.0/24",
    "0.0.0.0/0",
    "::/0",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let peer: SocketAddr = PEERS[data[0] as usize % PEERS.len()].parse().unwrap();
    let trusted: Vec<IpNet> = (0..8)
        .filter(|i| data[1] & (1 << i) != 0)
        .map(|i| CIDRS[i].parse().unwrap())
        .collect();
    let proxy_on = data[2] & 1 == 1;
    let n = (data[3] as usize).min(data.len() - 4);
    let (proxy_bytes, rest) = data[4..].split_at(n);
    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append("x-forwarded-for", v);
        }
    }
    let policy = ClientIpPolicy::new(trusted);
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();

    // The address the connection is attributed to before any header is read.
    let client = if proxy_on {
        // proxy_protocol::accept refuses untrusted peers before reading a byte.
        if !policy.is_trusted(peer.ip()) {
            return;
        }
        let config = ParseConfig {
            include_tlvs: false,
            allow_v1: true,
            allow_v2: true,
        };
        let Ok((header, _len)) = ProxyHeader::parse(proxy_bytes, config) else {
            return;
        };
        match client_address(&header, peer) {
            Ok(c) => c,
            Err(_) => return,
        }
    } else {
        peer
    };
    // As server.rs does: every connection that came through a PROXY header is marked.
    let conn = if proxy_on {
        ConnInfo::new(client, local).named_by_proxy_header()
    } else {
        ConnInfo::new(client, local)
    };
    let decided = policy.resolve(&conn, &headers);
    let without_headers = policy.resolve(&conn, &HeaderMap::new());
    let conn_ip = normalize(client.ip());
    assert_eq!(without_headers.ip, conn_ip);

    if !policy.is_trusted(conn_ip) {
        assert_eq!(
            decided, without_headers,
            "untrusted {conn_ip}'s XFF changed the answer"
        );
        assert!(!decided.peer_trusted);
    }
    if decided.ip != conn_ip {
        assert!(
            decided.peer_trusted,
            "{} from XFF of an untrusted peer",
            decided.ip
        );
        assert!(
            hops(&headers).contains(&decided.ip),
            "{} came from nowhere",
            decided.ip
        );
    }
    if proxy_on {
        // Issue 10 defect 4: a client named by a PROXY header is never a proxy itself, so
        // its X-Forwarded-For must not be consulted.
        assert_eq!(
            decided, without_headers,
            "PROXY-named {conn_ip} chose its IP via XFF"
        );
    }
});

/// Every address written in the XFF values, in any of the spellings resolve() accepts.
fn hops(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| {
            let h = h.trim();
            h.parse::<IpAddr>()
                .ok()
                .or_else(|| h.parse::<SocketAddr>().ok().map(|s| s.ip()))
                .or_else(|| {
                    h.strip_prefix('[')?
                        .strip_suffix(']')?
                        .parse::<IpAddr>()
                        .ok()
                })
        })
        .map(normalize)
        .collect()
}
