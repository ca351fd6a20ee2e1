//! Request routing: the gateway's own routes (`onramp.path`, `offramp.path`) and
//! everything else to the proxy. Also the per-request access log and request metrics,
//! so every response, whoever produced it, is counted and logged once.

use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::api::Api;
use crate::body::{self, ResponseBody};
use crate::client_ip::{ClientIp, ClientIpPolicy, ConnInfo};
use crate::config::Settings;
use crate::error::GatewayError;
use crate::forwarding;
use crate::listener::Handler;
use crate::metrics::{Metrics, Route};
use crate::mint::Minter;
use crate::proxy::Proxy;

pub struct App {
    metrics: Arc<Metrics>,
    proxy: Proxy,
    ip_policy: ClientIpPolicy,
    minter: Option<Arc<Minter>>,
    api: Option<Api>,
    api_prefix: String,
    onramp_path: String,
    offramp_path: String,
    max_header_bytes: usize,
    /// `webhooks.path` (off when `None`) and its receiver.
    webhooks: Option<crate::webhook::WebhookReceiver>,
    webhook_path: String,
    /// `webhooks.forward_path`: the app's delivery endpoint, never reachable by clients.
    forward_path: String,
}

impl App {
    pub fn new(
        settings: &Settings,
        metrics: Arc<Metrics>,
        proxy: Proxy,
        minter: Option<Arc<Minter>>,
        api: Option<Api>,
    ) -> Self {
        Self {
            metrics,
            proxy,
            ip_policy: ClientIpPolicy::new(settings.trusted_proxies.clone()),
            minter,
            api,
            api_prefix: settings.config.api.prefix.clone(),
            onramp_path: settings.config.onramp.path.clone(),
            offramp_path: settings.config.offramp.path.clone(),
            max_header_bytes: settings.conn.max_header_bytes,
            webhooks: None,
            webhook_path: settings.config.webhooks.path.clone(),
            forward_path: if settings.config.webhooks.path.is_empty() {
                String::new()
            } else {
                settings.config.webhooks.forward_path.clone()
            },
        }
    }

    /// Serves `webhooks.path` with `receiver` (and reserves `webhooks.forward_path`).
    pub fn with_webhooks(mut self, receiver: Option<crate::webhook::WebhookReceiver>) -> Self {
        self.webhooks = receiver;
        self
    }

    fn route_of(&self, path: &str) -> Route {
        if path == self.onramp_path {
            Route::onramp
        } else if path == self.offramp_path {
            Route::offramp
        } else if Api::owns(&self.api_prefix, path) {
            Route::api
        } else if !self.webhook_path.is_empty() && path == self.webhook_path {
            Route::webhook
        } else {
            Route::proxy
        }
    }

    /// Each route's future is boxed: hyper keeps one service future per connection,
    /// idle or not, sized for the largest state of every route inlined here (12 KiB
    /// measured in a release build before boxing); boxed, an idle connection holds a few
    /// hundred bytes and a request pays one allocation for what it actually runs.
    async fn dispatch(
        &self,
        req: Request<Incoming>,
        route: Route,
        client: ClientIp,
        conn: &Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        if header_bytes(&req) > self.max_header_bytes {
            return GatewayError::HeadersTooLarge.into_response(req.headers());
        }
        match route {
            // Only the gateway may deliver events to the app: a client asking for the
            // delivery endpoint (in any spelling the app might route the same) gets 404.
            Route::proxy if reserved(&self.forward_path, req.uri().path()) => {
                GatewayError::NotFound.into_response(req.headers())
            }
            // Every route's future is boxed: this one is as large as its largest arm, and
            // it is in flight for every request. The webhook arm inline made it 3.5 KiB
            // instead of 1.4 KiB, for proxied requests and mints too.
            Route::webhook => match &self.webhooks {
                Some(receiver) => Box::pin(receiver.handle(req, client, conn.peer.ip())).await,
                None => GatewayError::NotFound.into_response(req.headers()),
            },
            Route::proxy => {
                // Only what error rendering needs: no copy of the whole header map per request.
                let json = crate::error::wants_json(req.headers());
                match Box::pin(self.proxy.forward(req, client, conn)).await {
                    Ok(forwarded) => {
                        self.metrics
                            .upstream_request_duration
                            .observe(forwarded.upstream_time.as_secs_f64());
                        forwarded.response.map(body::streamed)
                    }
                    Err(e) => e.into_response_as(json),
                }
            }
            Route::api => match &self.api {
                Some(api) => Box::pin(api.handle(req, client)).await,
                None => GatewayError::MintingNotConfigured.into_api_response(),
            },
            Route::onramp | Route::offramp => match &self.minter {
                Some(minter) => Box::pin(minter.handle(req, route, client)).await,
                None => {
                    self.metrics
                        .count_mint(route, GatewayError::MintingNotConfigured.kind());
                    GatewayError::MintingNotConfigured.into_response(req.headers())
                }
            },
        }
    }
}

impl Handler for App {
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let client = self.ip_policy.resolve(&conn, req.headers());
        let route = self.route_of(uri.path());
        let request_id = request_id(req.headers(), client.peer_trusted);
        // The app sees the same id as our access log (and the client, in the answer).
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // One view of the request head for every route (Host, cookies, target).
        let mut response = match forwarding::normalize_request(&mut req) {
            Ok(()) => self.dispatch(req, route, client, &conn).await,
            Err(e) => e.into_response(req.headers()),
        };
        // Unique per response: HTTP/2 must not add it to the HPACK table (each one would
        // evict the fields that do repeat, Content-Type, Server, Date, and make every
        // response re-send them literally). Sensitive = "never indexed" (RFC 7541 §6.2.3).
        let mut echoed = request_id.clone();
        echoed.set_sensitive(true);
        response.headers_mut().insert(X_REQUEST_ID, echoed);
        let status = response.status().as_u16();
        self.metrics.count_request(route, status);
        tracing::info!(
            target: "access",
            method = %method,
            path = uri.path(),
            status,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            client_ip = %client.ip,
            route = route.as_str(),
            request_id = request_id.to_str().unwrap_or(""),
            "request"
        );
        response
    }
}

use crate::forwarding::X_REQUEST_ID;

/// Whether `path` names `forward_path` (`""` = nothing reserved): the same path after
/// percent-decoding, ASCII case folding, `\` as `/`, empty and `.` segments dropped and
/// `..` applied, or anything under it, since app routers often treat those alike.
fn reserved(forward_path: &str, path: &str) -> bool {
    if forward_path.is_empty() {
        return false;
    }
    let p = canonical(&percent_decode(path));
    let f = canonical(forward_path.as_bytes());
    p == f
        || p.strip_prefix(f.as_slice())
            .is_some_and(|rest| rest.starts_with(b"/"))
}

fn canonical(path: &[u8]) -> Vec<u8> {
    let lower = path.to_ascii_lowercase();
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in lower.split(|&b| b == b'/' || b == b'\\') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for s in segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    out
}

fn percent_decode(path: &str) -> Vec<u8> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The request id: the one a trusted proxy already assigned (if well-formed), else a
/// fresh random 128-bit hex id. A client-chosen id from an untrusted peer is replaced,
/// so nobody can forge or collide ids in the app's logs.
fn request_id(headers: &http::HeaderMap, peer_trusted: bool) -> HeaderValue {
    if peer_trusted {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            let ok = (1..=128).contains(&v.len())
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
            if ok {
                return v.clone();
            }
        }
    }
    // Hex on the stack: one allocation (the header value's own) per request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = rand::random::<u128>();
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Size of the request head as the client sent it (HTTP/1.1 wire form): the limit
/// `max_header_bytes` applies to exactly this, for HTTP/1.1 and HTTP/2 alike.
fn header_bytes<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers().iter().fold(line, |acc, (name, value)| {
        acc + name.as_str().len() + value.len() + 4
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request in flight holds this future (boxed by the listener). Each route's
    /// own future is boxed inside it, so it stays the size of the common part; with one
    /// route inline it was the size of that route (3.5 KiB, for every proxied request).
    #[test]
    fn the_request_future_does_not_hold_any_routes_future() {
        use crate::test_support::returned_size;
        let request = returned_size(
            |(app, req, conn): (Arc<App>, Request<Incoming>, Arc<ConnInfo>)| async move {
                app.handle(req, conn).await
            },
        );
        assert!(request <= 2048, "the request future is {request} bytes");
    }

    #[test]
    fn forward_path_is_reserved_in_every_spelling() {
        for p in [
            "/onramp-events",
            "/onramp-events/",
            "/ONRAMP-events",
            "/onramp%2Devents",
            "/onramp-events/x",
            "//onramp-events",
            "/x/../onramp-events",
            "/./onramp-events",
            "\\onramp-events",
            "/a/%2e%2e/onramp-events",
        ] {
            assert!(reserved("/onramp-events", p), "{p}");
        }
        for p in ["/onramp-eventsx", "/onramp", "/", "/onramp-event%"] {
            assert!(!reserved("/onramp-events", p), "{p}");
        }
        assert!(!reserved("", "/onramp-events"));
    }

    #[test]
    fn request_ids() {
        let mut h = http::HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h, true), "abc-123");
        let fresh = request_id(&h, false);
        assert_ne!(fresh, "abc-123");
        assert_eq!(fresh.len(), 32);
        assert!(
            fresh
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
            "{fresh:?}"
        );
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id<script>"));
        assert_ne!(request_id(&h, true), "bad id<script>");
        assert_ne!(request_id(&http::HeaderMap::new(), false), fresh);
    }
}
