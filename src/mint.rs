//! The token-minting routes (`onramp.path`, `offramp.path`).
//!
//! Order matters and follows Coinbase's security requirements: CORS gate (a
//! disallowed origin never costs anything), per-IP rate limit (before any body is
//! read, any app call or any CDP call), input validation, then one CDP call, then a
//! redirect (`302` for GET, `303` for a form POST) or JSON for single-page apps.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{full, ResponseBody};
use crate::cdp::client::{CdpClient, CdpError};
use crate::client_ip::{is_private, ClientIp};
use crate::config::{AddressSource, OnBackendError, Settings};
use crate::error::GatewayError;
use crate::metrics::{Metrics, Route};
use crate::onramp::request::{self, ClientInput, ErrorOrigin, Flow, MintRequest, Rules};
use crate::proxy::strip_hop_by_hop;
use crate::ratelimit::{response_headers, Decision, RateLimiter};

/// Form and JSON bodies of these routes are a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// The app's context answer is small too; a larger one is a misconfiguration.
const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// How long reading the (small) request body may take.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Minter {
    settings: Arc<Settings>,
    cdp: CdpClient,
    limiter: Arc<dyn RateLimiter>,
    metrics: Arc<Metrics>,
    context: Option<ContextClient>,
    private_ip_warned: AtomicBool,
}

/// What the client sent, once the body (if any) is read.
enum Input {
    Query(String),
    Form(Bytes),
    Json(Bytes),
}

/// How the answer is shaped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Redirect302,
    Redirect303,
    Json,
}

impl Minter {
    pub fn new(
        settings: Arc<Settings>,
        cdp: CdpClient,
        limiter: Arc<dyn RateLimiter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let context = (settings.config.addresses.source == AddressSource::Upstream)
            .then(|| ContextClient::new(&settings));
        Self {
            settings,
            cdp,
            limiter,
            metrics,
            context,
            private_ip_warned: AtomicBool::new(false),
        }
    }

    pub async fn handle(
        &self,
        req: Request<Incoming>,
        route: Route,
        client: ClientIp,
    ) -> Response<ResponseBody> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(str::to_string);
        let origin = decide_origin(
            req.headers(),
            host.as_deref(),
            &self.settings.config.cors.allowed_origins,
        );
        let json = crate::error::wants_json(req.headers());
        let mut response = match self.mint(req, route, client, &origin).await {
            Ok(r) => {
                self.metrics.count_mint(route, "ok");
                r
            }
            Err(e) => {
                if !matches!(e, GatewayError::MethodNotAllowed) {
                    self.metrics.count_mint(route, e.kind());
                }
                e.into_response_as(json)
            }
        };
        let headers = response.headers_mut();
        // Answers depend on Origin; caches must key on it. Tokens are single-use.
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let OriginDecision::Allowed(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        response
    }

    async fn mint(
        &self,
        req: Request<Incoming>,
        route: Route,
        client: ClientIp,
        origin: &OriginDecision,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let flow = if route == Route::offramp {
            Flow::Offramp
        } else {
            Flow::Onramp
        };
        if matches!(origin, OriginDecision::Denied) {
            return Err(GatewayError::OriginNotAllowed);
        }
        if req.method() == Method::OPTIONS {
            return preflight(origin);
        }
        if req.method() != Method::GET && req.method() != Method::POST {
            return Err(GatewayError::MethodNotAllowed);
        }

        self.rate_limit(client.ip).await?;

        let (parts, body) = req.into_parts();
        let (input, answer) = read_input(&parts, body).await?;
        let mint_request = match &self.context {
            None => validate(&input, &self.rules(flow))?,
            Some(context) => {
                let context_json = match context.fetch(&parts.headers, client.ip).await? {
                    ContextAnswer::Json(bytes) => bytes,
                    ContextAnswer::Relay(response) => return Ok(response),
                };
                let client_input = match &input {
                    Input::Query(q) => ClientInput::Query(q),
                    Input::Form(b) => ClientInput::Form(b),
                    Input::Json(b) => ClientInput::Json(b),
                };
                request::from_upstream_context(&context_json, client_input, &self.rules(flow))
                    .map_err(validation_error)?
            }
        };

        let cdp_ip = self.cdp_client_ip(client.ip);
        let token = match self
            .cdp
            .create_token(&mint_request.addresses, &mint_request.assets, cdp_ip)
            .await
        {
            Ok((token, took)) => {
                self.metrics
                    .cdp_request_duration
                    .observe(took.as_secs_f64());
                token
            }
            Err(e) => return Err(self.cdp_failure(e)),
        };
        let base = if flow == Flow::Offramp {
            &self.settings.offramp_url
        } else {
            &self.settings.onramp_url
        };
        let location = request::build_location(base, token.expose(), &mint_request);
        answer_with(answer, token.expose(), &location)
    }

    fn rules(&self, flow: Flow) -> Rules<'_> {
        Rules {
            flow,
            blockchains: &self.settings.config.onramp.blockchains,
            assets: &self.settings.config.onramp.assets,
            redirect_allowlist: &self.settings.redirect_allowlist,
        }
    }

    async fn rate_limit(&self, ip: IpAddr) -> Result<(), GatewayError> {
        match self.limiter.check(ip).await {
            Ok(decision @ Decision::Limited { .. }) => {
                self.metrics.rate_limited.inc();
                Err(GatewayError::RateLimited {
                    headers: response_headers(self.limiter.policy(), &decision),
                })
            }
            Ok(Decision::Allowed { .. }) => Ok(()),
            Err(e) => {
                self.metrics.rate_limiter_errors.inc();
                match self.settings.config.rate_limit.on_backend_error {
                    OnBackendError::Deny => {
                        tracing::warn!(error = %e, "rate limiter unavailable: denying (on_backend_error = \"deny\")");
                        Err(GatewayError::LimiterUnavailable)
                    }
                    OnBackendError::Allow => {
                        tracing::warn!(error = %e, "rate limiter unavailable: allowing (on_backend_error = \"allow\")");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Coinbase refuses private client IPs. Seeing one means the gateway is behind a
    /// proxy it was not told about (or it is a development machine): say so once.
    fn cdp_client_ip(&self, ip: IpAddr) -> IpAddr {
        if !is_private(ip) {
            return ip;
        }
        if !self.private_ip_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                client_ip = %ip,
                "private client IP seen on a minting route: the gateway is probably behind a proxy or load \
                 balancer without proxy_protocol or trusted_proxies configured; Coinbase refuses private IPs"
            );
        }
        self.settings.substitute_private_client_ip.unwrap_or(ip)
    }

    fn cdp_failure(&self, e: CdpError) -> GatewayError {
        match &e {
            CdpError::Rejected { status, message } => {
                tracing::warn!(cdp_status = status, cdp_message = %message, "CDP API refused the token request");
            }
            other => {
                tracing::warn!(error = %other, kind = other.kind(), "CDP token request failed")
            }
        }
        match e {
            CdpError::Timeout(_) => GatewayError::CdpTimeout,
            CdpError::RateLimited { retry_after } => GatewayError::CdpRateLimited { retry_after },
            CdpError::Rejected { .. } => GatewayError::CdpRejected,
            CdpError::Unreachable(_)
            | CdpError::ServerError { .. }
            | CdpError::BadResponse(_)
            | CdpError::Jwt(_) => GatewayError::CdpUnavailable,
        }
    }
}

/// The CORS verdict for a request.
enum OriginDecision {
    /// No `Origin` header, or the gateway's own origin: not a cross-origin call.
    SameOrAbsent,
    /// Listed in `cors.allowed_origins`: answer with that exact origin, never `*`.
    Allowed(HeaderValue),
    /// Anything else (including `Origin: null`): `403` before any work.
    Denied,
}

fn decide_origin(headers: &HeaderMap, host: Option<&str>, allowed: &[String]) -> OriginDecision {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return OriginDecision::SameOrAbsent;
    };
    let Ok(origin_str) = origin.to_str() else {
        return OriginDecision::Denied;
    };
    if allowed.iter().any(|a| a == origin_str) {
        return OriginDecision::Allowed(origin.clone());
    }
    // Same-origin requests (a form on the app's own page, served through this
    // gateway) carry Origin = https://<Host> (or :authority for HTTP/2).
    if let (Some(rest), Some(host)) = (origin_str.strip_prefix("https://"), host) {
        if rest.eq_ignore_ascii_case(host) {
            return OriginDecision::SameOrAbsent;
        }
    }
    OriginDecision::Denied
}

fn preflight(origin: &OriginDecision) -> Result<Response<ResponseBody>, GatewayError> {
    match origin {
        OriginDecision::Allowed(_) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Content-Type, Authorization"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            Ok(r)
        }
        // A preflight without a listed Origin is not a CORS request we serve.
        _ => Err(GatewayError::OriginNotAllowed),
    }
}

/// Reads the query or the (size-capped) body, and decides the answer's shape.
async fn read_input(
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(Input, Answer), GatewayError> {
    if parts.method == Method::GET {
        let query = parts.uri.query().unwrap_or("").to_string();
        return Ok((Input::Query(query), Answer::Redirect302));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let is_json = content_type == "application/json";
    if !is_json && content_type != "application/x-www-form-urlencoded" {
        return Err(GatewayError::UnsupportedMediaType);
    }
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match collected {
        Err(_) => {
            return Err(GatewayError::BadRequest(
                "body: not received in time".into(),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::PayloadTooLarge)
        }
        Ok(Err(_)) => return Err(GatewayError::BadRequest("body: could not be read".into())),
        Ok(Ok(c)) => c.to_bytes(),
    };
    if is_json {
        Ok((Input::Json(bytes), Answer::Json))
    } else {
        Ok((Input::Form(bytes), Answer::Redirect303))
    }
}

fn validate(input: &Input, rules: &Rules<'_>) -> Result<MintRequest, GatewayError> {
    match input {
        Input::Query(q) => request::from_query(q, rules),
        Input::Form(b) => request::from_form(b, rules),
        Input::Json(b) => request::from_json(b, rules),
    }
    .map_err(validation_error)
}

fn validation_error(e: request::ValidationError) -> GatewayError {
    match e.origin {
        ErrorOrigin::Client => GatewayError::BadRequest(e.to_string()),
        ErrorOrigin::Upstream => {
            tracing::warn!(error = %e, "the app's onramp context answer is invalid");
            GatewayError::ContextUnavailable
        }
    }
}

fn answer_with(
    answer: Answer,
    token: &str,
    location: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    let location_value =
        HeaderValue::from_str(location).map_err(|_| GatewayError::CdpUnavailable)?;
    let mut r = match answer {
        Answer::Json => {
            let body = serde_json::json!({ "sessionToken": token, "url": location });
            let mut r = Response::new(full(body.to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Answer::Redirect302 | Answer::Redirect303 => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = if answer == Answer::Redirect302 {
                StatusCode::FOUND
            } else {
                StatusCode::SEE_OTHER
            };
            r.headers_mut().insert(header::LOCATION, location_value);
            r
        }
    };
    r.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    Ok(r)
}

/// `addresses.source = "upstream"`: asks the app who the signed-in user is.
struct ContextClient {
    /// The proxy's client: one pool and one idle policy towards the app.
    client: crate::upstream::UpstreamClient,
    url: http::Uri,
    /// `Host` when the browser sent none: the app's own authority.
    fallback_host: HeaderValue,
    timeout: Duration,
}

enum ContextAnswer {
    Json(Bytes),
    /// The app's own 401/403/3xx, passed to the browser as is (its login flow).
    Relay(Response<ResponseBody>),
}

impl ContextClient {
    fn new(settings: &Settings) -> Self {
        let client = crate::upstream::shared_client(settings.upstream_connect_timeout());
        let authority = settings
            .upstream
            .authority()
            .map_or("127.0.0.1:3000", |a| a.as_str())
            .to_string();
        let url = format!(
            "http://{authority}{}",
            settings.config.addresses.context_path
        )
        .parse()
        .unwrap_or_else(|_| {
            http::Uri::from_static("http://127.0.0.1:3000/.well-known/onramp-context")
        });
        Self {
            client,
            url,
            fallback_host: HeaderValue::from_str(&authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            timeout: settings
                .upstream_response_timeout()
                .min(Duration::from_secs(10)),
        }
    }

    /// The same forwarding rules as the proxy (crate::forwarding): joined cookies,
    /// Host, X-Forwarded-*, X-Request-Id.
    async fn fetch(
        &self,
        browser: &HeaderMap,
        client_ip: IpAddr,
    ) -> Result<ContextAnswer, GatewayError> {
        let mut req = Request::new(crate::upstream::UpstreamBody::empty());
        *req.uri_mut() = self.url.clone();
        *req.headers_mut() =
            crate::forwarding::context_headers(browser, client_ip, &self.fallback_host);

        let response = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => {
                tracing::warn!("onramp context: the app did not answer in time");
                return Err(GatewayError::ContextUnavailable);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "onramp context: the app is unreachable");
                return Err(GatewayError::ContextUnavailable);
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let relay = status == StatusCode::UNAUTHORIZED
            || status == StatusCode::FORBIDDEN
            || status.is_redirection();
        if !status.is_success() && !relay {
            tracing::warn!(
                status = status.as_u16(),
                "onramp context: unexpected status from the app"
            );
            return Err(GatewayError::ContextUnavailable);
        }
        let (mut parts, body) = response.into_parts();
        let bytes = match tokio::time::timeout(
            self.timeout,
            Limited::new(body, MAX_CONTEXT_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(c)) => c.to_bytes(),
            _ => {
                tracing::warn!("onramp context: answer unreadable, too slow or larger than 64 KiB");
                return Err(GatewayError::ContextUnavailable);
            }
        };
        if relay {
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::CONTENT_LENGTH);
            let mut r = Response::from_parts(parts, full(bytes));
            *r.version_mut() = http::Version::HTTP_11;
            return Ok(ContextAnswer::Relay(r));
        }
        if status != StatusCode::OK {
            tracing::warn!(
                status = status.as_u16(),
                "onramp context: expected 200 with JSON"
            );
            return Err(GatewayError::ContextUnavailable);
        }
        Ok(ContextAnswer::Json(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn origin_rules() {
        let allowed = vec!["https://app.example".to_string()];
        let d = |h: &[(&str, &str)], host: Option<&str>, allowed: &[String]| {
            decide_origin(&headers(h), host, allowed)
        };
        assert!(matches!(
            d(&[], None, &allowed),
            OriginDecision::SameOrAbsent
        ));
        assert!(matches!(
            d(&[("origin", "https://app.example")], None, &allowed),
            OriginDecision::Allowed(_)
        ));
        assert!(matches!(
            d(
                &[("origin", "https://app.example.evil.net")],
                None,
                &allowed
            ),
            OriginDecision::Denied
        ));
        assert!(matches!(
            d(&[("origin", "null")], None, &allowed),
            OriginDecision::Denied
        ));
        assert!(matches!(
            d(
                &[("origin", "https://gw.example:8443")],
                Some("gw.example:8443"),
                &[]
            ),
            OriginDecision::SameOrAbsent
        ));
        assert!(matches!(
            d(&[("origin", "http://gw.example")], Some("gw.example"), &[]),
            OriginDecision::Denied
        ));
    }
}
