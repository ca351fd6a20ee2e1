//! Reverse proxy to the upstream app: streaming bodies, hop-by-hop header hygiene,
//! `X-Forwarded-*`, WebSocket (HTTP/1.1 `Upgrade`) tunnelling, pooled keep-alive
//! connections, and 502/504 on failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::client_ip::{ClientIp, ConnInfo};
use crate::error::GatewayError;
use crate::forwarding::{self, Origin};
use crate::listener::RequestHold;
use crate::upstream::{UploadFailure, UpstreamBody, UpstreamClient};

/// Kept for callers that strip a response's hop-by-hop fields (the rules live in
/// [`crate::forwarding`]).
pub use crate::forwarding::strip_hop_by_hop;

pub struct Proxy {
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    /// `Host` for a client that sent none (HTTP/1.0): the app's own authority.
    fallback_host: HeaderValue,
    response_timeout: Duration,
    /// WebSocket tunnels outlive their request; tracked so shutdown can wait for them.
    tunnels: TaskTracker,
    /// A tunnel with no bytes in either direction for this long is closed; also the
    /// longest pause allowed in a request body.
    idle_timeout: Duration,
    /// Lower-case `Upgrade` protocols the app may be switched to.
    upgrade_protocols: Vec<String>,
}

/// A proxied response and how long the upstream took to produce its headers.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub upstream_time: Duration,
}

/// How the proxy talks to the app.
pub struct ProxySettings {
    pub upstream: Uri,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub upgrade_protocols: Vec<String>,
}

impl Proxy {
    pub fn new(client: UpstreamClient, settings: ProxySettings, tunnels: TaskTracker) -> Self {
        let authority = settings
            .upstream
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1:3000"));
        Self {
            client,
            scheme: settings.upstream.scheme().cloned().unwrap_or(Scheme::HTTP),
            fallback_host: HeaderValue::from_str(authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            authority,
            response_timeout: settings.response_timeout,
            tunnels,
            idle_timeout: settings.idle_timeout,
            upgrade_protocols: settings.upgrade_protocols,
        }
    }

    /// Forwards a request already checked by [`forwarding::normalize_request`].
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: ClientIp,
        conn: &Arc<ConnInfo>,
    ) -> Result<Forwarded, GatewayError> {
        let upgrade = forwarding::requested_upgrade(&req, &self.upgrade_protocols)?;
        let origin = Origin::of(req.headers(), client, conn.peer.ip());
        // hyper keeps the pending client upgrade in the request; take it before the
        // request is rebuilt for the upstream.
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        // Rewrite the target to the upstream, keeping path and query byte for byte.
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(path_and_query);
        parts.uri = Uri::from_parts(uri)
            .map_err(|_| GatewayError::BadRequest("invalid request target".into()))?;
        // HTTP/2 clients reach an HTTP/1.1 upstream.
        parts.version = Version::HTTP_11;
        forwarding::upstream_headers(&mut parts.headers, &origin, &self.fallback_host);

        // The body carries the connection's in-flight hold until its EOF.
        let hold = parts.extensions.remove::<RequestHold>();
        if let Some(proto) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto.clone());
        }
        let body = UpstreamBody::streamed(body, self.idle_timeout, hold);
        let upload = body.state();
        let req = Request::from_parts(parts, body);

        let started = Instant::now();
        // The response timeout runs from the end of the upload, not its start: a slow
        // upload is bounded by the idle timeout (UpstreamBody), a slow app by this.
        let response_deadline = {
            let upload = upload.clone();
            let timeout = self.response_timeout;
            async move {
                upload.sent().await;
                tokio::time::sleep(timeout).await;
            }
        };
        let result = tokio::select! {
            r = self.client.request(req) => Some(r),
            _ = response_deadline => None,
        };
        let upstream_time = started.elapsed();
        let mut response = match result {
            None => return Err(GatewayError::UpstreamTimeout),
            Some(Err(e)) => {
                return Err(match upload.failure() {
                    Some(UploadFailure::Stalled) => GatewayError::RequestTimeout,
                    Some(UploadFailure::Malformed) => {
                        GatewayError::BadRequest("malformed request body".into())
                    }
                    None => classify(&e),
                })
            }
            Some(Ok(r)) => r,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let idle = self.idle_timeout;
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
