//! PROXY protocol v1/v2 (HAProxy's spec) in front of TLS, parsed by the maintained
//! `proxy-header` crate.
//!
//! Only a peer in `trusted_proxies` may speak it: anyone else could claim any client
//! address. As HAProxy and nginx do when the protocol is expected, a connection from an
//! untrusted peer, or one whose header is missing, garbled or slow, is closed. A v2
//! `LOCAL` command (the balancer's own health check) and v1 `UNKNOWN` keep the socket
//! address.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use proxy_header::io::ProxiedStream;
use proxy_header::{ParseConfig, Protocol};
use tokio::net::TcpStream;

use crate::client_ip::ClientIpPolicy;

/// A well-behaved balancer sends the header with the first packet; anything slower is
/// a stuck or hostile peer (rpxy uses 50 ms; this leaves room for a loaded host).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("peer {0} is not in server.trusted_proxies")]
    UntrustedPeer(SocketAddr),
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("invalid or missing PROXY header: {0}")]
    Invalid(io::Error),
    #[error("PROXY header declares a datagram (UDP) connection")]
    Datagram,
}

impl ProxyProtocolError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyProtocolError::UntrustedPeer(_) => "proxy_protocol_untrusted_peer",
            ProxyProtocolError::Timeout(_) => "proxy_protocol_timeout",
            ProxyProtocolError::Invalid(_) => "proxy_protocol_invalid",
            ProxyProtocolError::Datagram => "proxy_protocol_invalid",
        }
    }
}

/// Reads the PROXY header from a freshly accepted connection. Returns the stream
/// (positioned at the first byte after the header) and the client address it names.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    policy: &ClientIpPolicy,
) -> Result<(ProxiedStream<TcpStream>, SocketAddr), ProxyProtocolError> {
    if !policy.is_trusted(peer.ip()) {
        return Err(ProxyProtocolError::UntrustedPeer(peer));
    }
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    let proxied = tokio::time::timeout(
        HEADER_TIMEOUT,
        ProxiedStream::create_from_tokio(stream, config),
    )
    .await
    .map_err(|_| ProxyProtocolError::Timeout(HEADER_TIMEOUT))?
    .map_err(ProxyProtocolError::Invalid)?;
    let client = client_address(proxied.proxy_header(), peer)?;
    Ok((proxied, client))
}

/// The client address a parsed header names: the socket peer for `LOCAL`/`UNKNOWN`, the
/// header's source for a stream. Pure, so the fuzz target (fuzz/fuzz_targets/client_ip.rs)
/// checks the very mapping [`accept`] uses.
pub fn client_address(
    header: &proxy_header::ProxyHeader<'_>,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyProtocolError> {
    match header.proxied_address() {
        None => Ok(peer),
        Some(a) if a.protocol == Protocol::Stream => Ok(a.source),
        Some(_) => Err(ProxyProtocolError::Datagram),
    }
}
