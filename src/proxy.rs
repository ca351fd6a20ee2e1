//! Reverse proxy to the upstream app: streaming bodies, hop-by-hop header hygiene,
//! `X-Forwarded-*`, WebSocket (HTTP/1.1 `Upgrade`) tunnelling, pooled keep-alive
//! connections, and 502/504 on failure.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::task::TaskTracker;

use crate::client_ip::{ClientIp, ConnInfo};
use crate::error::GatewayError;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// RFC 9110 §7.6.1 connection-specific fields (plus the de-facto `Keep-Alive` and
/// `Proxy-Connection`). They describe one hop and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
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

pub struct Proxy {
    client: Client<HttpConnector, Incoming>,
    scheme: Scheme,
    authority: Authority,
    response_timeout: Duration,
    /// WebSocket tunnels outlive their request; tracked so shutdown can wait for them.
    tunnels: TaskTracker,
    /// A tunnel with no bytes in either direction for this long is closed.
    tunnel_idle_timeout: Duration,
}

/// A proxied response and how long the upstream took to produce its headers.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub upstream_time: Duration,
}

impl Proxy {
    pub fn new(
        upstream: &Uri,
        connect_timeout: Duration,
        response_timeout: Duration,
        tunnel_idle_timeout: Duration,
        tunnels: TaskTracker,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            // Below typical app servers' keep-alive (Node 5 s is the outlier, so retry
            // on a connection it closed is left to hyper's idle detection).
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .set_host(false)
            .build(connector);
        Self {
            client,
            scheme: upstream.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: upstream
                .authority()
                .cloned()
                .unwrap_or_else(|| Authority::from_static("127.0.0.1:3000")),
            response_timeout,
            tunnels,
            tunnel_idle_timeout,
        }
    }

    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: ClientIp,
        conn: &Arc<ConnInfo>,
    ) -> Result<Forwarded, GatewayError> {
        let peer = conn.peer.ip();
        let upgrade = requested_upgrade(&req);
        let original_host = original_host(&req);

        // Rewrite the target to the upstream, keeping path and query byte for byte.
        let path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| GatewayError::BadRequest("invalid request target".into()))?;
        // HTTP/2 clients reach an HTTP/1.1 upstream.
        *req.version_mut() = Version::HTTP_11;

        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        set_forwarding_headers(headers, client, peer, original_host.as_ref());
        if let Some(host) = original_host {
            // HTTP/2 requests carry :authority instead of Host; the app sees a Host either way.
            headers.entry(header::HOST).or_insert(host);
        }
        let client_upgrade = if let Some(proto) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };

        let started = Instant::now();
        let result = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        let upstream_time = started.elapsed();
        let mut response = match result {
            Err(_) => return Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(r)) => r,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let idle = self.tunnel_idle_timeout;
                // The tunnel holds the connection's lease: it keeps its max_connections
                // and per-IP slots, and stays in connections_active, until it closes.
                let conn = conn.clone();
                self.tunnels.spawn(async move {
                    let _lease = conn;
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client_io, upstream_io)) => {
                            tunnel(TokioIo::new(client_io), TokioIo::new(upstream_io), idle).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
                return Ok(Forwarded {
                    response,
                    upstream_time,
                });
            }
            // A 101 nobody asked for cannot be relayed meaningfully.
            return Err(GatewayError::UpstreamUnavailable);
        }
        strip_hop_by_hop(response.headers_mut());
        Ok(Forwarded {
            response,
            upstream_time,
        })
    }
}

/// Copies both ways until either side closes or nothing has moved for `idle` (like
/// nginx's `proxy_read_timeout` for WebSockets: a stalled peer must not hold a tunnel,
/// and its sockets, forever). WebSocket apps that ping more often than that are kept.
async fn tunnel<A, B>(mut client: A, mut upstream: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(&mut client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(&mut upstream);
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let (mut up_open, mut down_open) = (true, true);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while up_open || down_open {
        tokio::select! {
            r = client_read.read(&mut up_buf), if up_open => match r {
                Ok(0) | Err(_) => {
                    up_open = false;
                    let _ = upstream_write.shutdown().await;
                }
                // A peer that stops reading stalls the write: bounded by the same idle time.
                Ok(n) => match tokio::time::timeout(idle, upstream_write.write_all(&up_buf[..n])).await {
                    Ok(Ok(())) => {}
                    _ => break,
                },
            },
            r = upstream_read.read(&mut down_buf), if down_open => match r {
                Ok(0) | Err(_) => {
                    down_open = false;
                    let _ = client_write.shutdown().await;
                }
                Ok(n) => match tokio::time::timeout(idle, client_write.write_all(&down_buf[..n])).await {
                    Ok(Ok(())) => {}
                    _ => break,
                },
            },
            _ = tokio::time::sleep(idle) => {
                tracing::debug!(idle_ms = idle.as_millis() as u64, "upgraded tunnel idle: closing");
                break;
            }
        }
    }
}

/// Connect failures are 502, except a connect timeout, which like nginx is 504.
fn classify(e: &hyper_util::client::legacy::Error) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return GatewayError::UpstreamTimeout;
            }
        }
        source = s.source();
    }
    tracing::debug!(error = %e, connect = e.is_connect(), "upstream request failed");
    GatewayError::UpstreamUnavailable
}

/// The protocol a client asks to switch to (HTTP/1.1 only: `Connection: upgrade` +
/// `Upgrade`). HTTP/2 has no `Upgrade`; extended CONNECT is not supported.
fn requested_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if wants {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
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
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
}

/// The Host the client addressed: `Host` (HTTP/1.1) or `:authority` (HTTP/2).
fn original_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(h) = req.headers().get(header::HOST) {
        return Some(h.clone());
    }
    req.uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
}

/// `X-Forwarded-For`, `-Proto`, `-Host`. Client-sent forwarding headers are dropped,
/// unless the peer is a trusted proxy, whose `X-Forwarded-For` chain is kept and
/// extended with the peer (what nginx's `$proxy_add_x_forwarded_for` does).
fn set_forwarding_headers(
    headers: &mut HeaderMap,
    client: ClientIp,
    peer: IpAddr,
    host: Option<&HeaderValue>,
) {
    headers.remove(X_REAL_IP);
    headers.remove(FORWARDED);
    headers.remove(X_FORWARDED_PROTO);
    headers.remove(X_FORWARDED_HOST);
    let xff = if client.peer_trusted {
        // Keep the chain the trusted proxy built and add the hop we received it from.
        let mut chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let peer = peer.to_string();
        chain.push(&peer);
        HeaderValue::from_str(&chain.join(", ")).unwrap_or_else(|_| ip_value(client.ip))
    } else {
        ip_value(client.ip)
    };
    headers.remove(&X_FORWARDED_FOR);
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

fn ip_value(ip: IpAddr) -> HeaderValue {
    // An IP address is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn spoofed_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert("x-real-ip", "6.6.6.6".parse().unwrap());
        h.insert("forwarded", "for=6.6.6.6".parse().unwrap());
        let client = ClientIp {
            ip: "203.0.113.5".parse().unwrap(),
            peer_trusted: false,
        };
        set_forwarding_headers(
            &mut h,
            client,
            client.ip,
            Some(&HeaderValue::from_static("app.example")),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert!(!h.contains_key("x-real-ip") && !h.contains_key("forwarded"));
    }

    #[test]
    fn trusted_peer_chain_is_extended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.9".parse().unwrap());
        let client = ClientIp {
            ip: "198.51.100.1".parse().unwrap(),
            peer_trusted: true,
        };
        set_forwarding_headers(&mut h, client, "10.0.0.2".parse().unwrap(), None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 10.0.0.9, 10.0.0.2");
    }
}
