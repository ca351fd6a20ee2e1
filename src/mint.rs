//! The token-minting routes (`onramp.path`, `offramp.path`).
//!
//! Order matters and follows Coinbase's security requirements: cross-site refusal
//! (Fetch Metadata / Referer: a link, embed or form on another website never costs
//! anything), CORS gate (a disallowed origin neither), layered rate limit (per IP, per
//! prefix, global; before any body is read, any app call or any CDP call), input
//! validation and the address source (request, app context, or app-signed ticket), then
//! one CDP call (at most `max_concurrent_cdp_calls` in flight), then a redirect (`302`
//! for GET, `303` for a form POST) or JSON for single-page apps.

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
use crate::cdp::jwt::unix_now;
use crate::cdp::Rejections;
use crate::client_ip::{is_private, ClientIp};
use crate::config::{AddressSource, OnBackendError, OnrampApi, Settings};
use crate::error::GatewayError;
use crate::gate::{Gate, Pass};
use crate::metrics::{Metrics, Route};
use crate::onramp::request::{self, ClientInput, ErrorOrigin, Flow, MintRequest, Rules};
use crate::onramp::session_v2::{self, V2Params};
use crate::proxy::strip_hop_by_hop;
use crate::ratelimit::{response_headers, LimiterError, RateLimiter};
use crate::ticket::{self, TicketError, TicketVerifier};

/// Form and JSON bodies of these routes are a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// The app's context answer is small too; a larger one is a misconfiguration.
const MAX_CONTEXT_BYTES: usize = 64 * 1024;

pub struct Minter {
    settings: Arc<Settings>,
    cdp: CdpClient,
    limiter: Arc<dyn RateLimiter>,
    metrics: Arc<Metrics>,
    context: Option<ContextClient>,
    /// `addresses.source = "ticket"`.
    tickets: Option<TicketVerifier>,
    gate: Gate,
    private_ip_warned: AtomicBool,
}

/// Why [`Minter::known`] is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// To mint for `flow`: its validation rules apply.
    Mint(Flow),
    /// To learn who the user is (their addresses, partnerUserRef) for `flow`'s data.
    Identity(Flow),
}

/// What the address source knows (see [`Minter::known`]).
pub(crate) enum Known {
    Browser,
    /// The validated request, and every member of the app's context answer (or every
    /// extra claim of the ticket): buyer identity for headless orders lives there.
    App(MintRequest, serde_json::Map<String, serde_json::Value>),
    Relay(Response<ResponseBody>),
}

/// What the client sent, once the body (if any) is read.
pub(crate) enum Input {
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
        tickets: Option<TicketVerifier>,
    ) -> Self {
        let context = (settings.config.addresses.source == AddressSource::Upstream)
            .then(|| ContextClient::new(&settings));
        let gate = Gate::new(&settings);
        Self {
            settings,
            cdp,
            limiter,
            metrics,
            context,
            tickets,
            gate,
            private_ip_warned: AtomicBool::new(false),
        }
    }

    pub async fn handle(
        &self,
        req: Request<Incoming>,
        route: Route,
        client: ClientIp,
    ) -> Response<ResponseBody> {
        let json = crate::error::wants_json(req.headers());
        let (outcome, origin) = match self.gate.admit(&req, &self.metrics) {
            Err((e, origin)) => (Err(e), origin),
            Ok(Pass::Preflight(r, origin)) => (Ok(r), origin),
            Ok(Pass::Serve(origin)) => (self.mint(req, route, client).await, origin),
        };
        let mut response = match outcome {
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
        // Answers depend on Origin; caches must key on it. Tokens are single-use.
        Gate::decorate(&mut response, &origin, HeaderValue::from_static("no-store"));
        response
    }

    async fn mint(
        &self,
        req: Request<Incoming>,
        route: Route,
        client: ClientIp,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let flow = if route == Route::offramp {
            Flow::Offramp
        } else {
            Flow::Onramp
        };
        if req.method() != Method::GET && req.method() != Method::POST {
            return Err(GatewayError::MethodNotAllowed);
        }

        self.rate_limit(client.ip).await?;

        let (parts, body) = req.into_parts();
        let (input, answer) = read_input(&parts, body).await?;
        let client_input = match &input {
            Input::Query(q) => ClientInput::Query(q),
            Input::Form(b) => ClientInput::Form(b),
            Input::Json(b) => ClientInput::Json(b),
        };
        let mint_request = match self
            .known(
                &parts.headers,
                &input,
                Purpose::Mint(flow),
                client.ip,
                client_input,
            )
            .await?
        {
            Known::Browser => validate(&input, &self.rules(flow))?,
            Known::App(request, _) => request,
            Known::Relay(response) => return Ok(response),
        };

        let cdp_ip = self.cdp_client_ip(client.ip);
        if flow == Flow::Onramp && self.settings.config.onramp.api == OnrampApi::V2 {
            return self.mint_v2(&input, &mint_request, cdp_ip, answer).await;
        }
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
            Err(e) => return Err(self.cdp_failure(e, Rejections::Hidden)),
        };
        let base = if flow == Flow::Offramp {
            &self.settings.offramp_url
        } else {
            &self.settings.onramp_url
        };
        let location = request::build_location(base, token.expose(), &mint_request);
        answer_with(answer, Some(token.expose()), &location, None)
    }

    /// `onramp.api = "v2"`: Create Onramp Session; Coinbase returns the URL (checked to be
    /// Coinbase's own host before the browser is sent there) and maybe a quote.
    async fn mint_v2(
        &self,
        input: &Input,
        mint_request: &MintRequest,
        cdp_ip: IpAddr,
        answer: Answer,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let sandbox = self.settings.config.onramp.sandbox;
        let pairs = input_pairs(input);
        let v2 = V2Params::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(GatewayError::BadRequest)?;
        let body =
            session_v2::session_body(mint_request, &v2, &cdp_ip.to_string(), sandbox, || {
                format!("{:016x}", rand::random::<u64>())
            })
            .map_err(GatewayError::BadRequest)?;
        let url = self
            .settings
            .cdp_platform_base
            .join(session_v2::SESSIONS_PATH)
            .map_err(|_| GatewayError::CdpUnavailable)?;
        let (reply, took) = self
            .cdp
            .call_json(reqwest::Method::POST, &url, Some(&body))
            .await
            .map_err(|e| self.cdp_failure(e, Rejections::BadRequestPassedOn))?;
        self.metrics
            .cdp_request_duration
            .observe(took.as_secs_f64());
        let session = session_v2::parse_session(&reply, sandbox).map_err(|m| {
            tracing::warn!(problem = %m, "CDP onramp session answer refused");
            GatewayError::CdpUnavailable
        })?;
        answer_with(
            answer,
            session.session_token.as_deref(),
            session.url.as_str(),
            session.quote,
        )
    }

    /// What the configured address source says about this request: the app's context
    /// (`upstream`) or a verified, now used, ticket (`ticket`, bound to `flow`), validated
    /// with `purpose`'s rules and the client's presets from `client_input`; or nothing
    /// (`request`: the browser's input is all there is). The one place the `[api]`
    /// endpoints and the minting routes learn who the user is.
    pub(crate) async fn known(
        &self,
        headers: &HeaderMap,
        input: &Input,
        purpose: Purpose,
        client_ip: IpAddr,
        client_input: ClientInput<'_>,
    ) -> Result<Known, GatewayError> {
        let (flow, rules_flow) = match purpose {
            Purpose::Mint(flow) => (flow, flow),
            // Reading the user's history needs their identity, not offramp's mint rules
            // (partnerUserRef and redirectUrl required).
            Purpose::Identity(flow) => (flow, Flow::Onramp),
        };
        if let Some(context) = &self.context {
            let context_json = match context.fetch(headers, client_ip).await? {
                ContextAnswer::Json(bytes) => bytes,
                ContextAnswer::Relay(response) => return Ok(Known::Relay(response)),
            };
            let extra = match serde_json::from_slice(&context_json) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            };
            return request::from_upstream_context(
                &context_json,
                client_input,
                &self.rules(rules_flow),
            )
            .map(|r| Known::App(r, extra))
            .map_err(validation_error);
        }
        if let Some(tickets) = &self.tickets {
            let ticket = self.verify_ticket(tickets, input, flow).await?;
            return request::from_upstream_context(
                &ticket.context_json,
                client_input,
                &self.rules(rules_flow),
            )
            .map(|r| Known::App(r, ticket.extra))
            .map_err(|e| match e.origin {
                ErrorOrigin::Client => GatewayError::BadRequest(e.to_string()),
                // Signed by the app, but not a mintable request: the ticket is bad.
                ErrorOrigin::Upstream => {
                    self.metrics.count_mint_refused("ticket_invalid");
                    GatewayError::TicketInvalid(format!("ticket invalid: {e}"))
                }
            });
        }
        Ok(Known::Browser)
    }

    /// The configured address source.
    pub(crate) fn source(&self) -> AddressSource {
        self.settings.config.addresses.source
    }

    pub(crate) fn cdp(&self) -> &CdpClient {
        &self.cdp
    }

    fn rules(&self, flow: Flow) -> Rules<'_> {
        Rules {
            flow,
            blockchains: &self.settings.config.onramp.blockchains,
            assets: &self.settings.config.onramp.assets,
            redirect_allowlist: &self.settings.redirect_allowlist,
        }
    }

    /// The minting buckets (also used by an `[api]` quote that mints).
    pub(crate) async fn rate_limit(&self, ip: IpAddr) -> Result<(), GatewayError> {
        match self.limiter.check(ip).await {
            Ok(verdict) if !verdict.is_allowed() => {
                self.metrics.rate_limited.inc();
                self.metrics
                    .count_mint_refused(verdict.bucket.refused_reason());
                Err(GatewayError::RateLimited {
                    headers: response_headers(&verdict),
                })
            }
            Ok(_) => Ok(()),
            Err(e) => self.backend_failed(e),
        }
    }

    /// A limiter or replay store that cannot answer (Redis down, `max_keys` reached):
    /// `rate_limit.on_backend_error` decides, the one place that policy is applied.
    pub(crate) fn backend_failed(&self, e: LimiterError) -> Result<(), GatewayError> {
        if matches!(e, LimiterError::Full { .. }) {
            self.metrics.count_mint_refused("limiter_full");
        }
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

    /// The `ticket` parameter, verified for this route and used once.
    async fn verify_ticket(
        &self,
        tickets: &TicketVerifier,
        input: &Input,
        flow: Flow,
    ) -> Result<ticket::Ticket, GatewayError> {
        let found = match input {
            Input::Query(q) => ticket::from_pairs(q),
            Input::Form(b) => ticket::from_pairs(&String::from_utf8_lossy(b)),
            Input::Json(b) => ticket::from_json(b),
        };
        let checked =
            found.and_then(|token| tickets.check(token.as_deref().unwrap_or(""), flow, unix_now()));
        let refused = match checked {
            Ok(verified) => match tickets.first_use(&verified, unix_now()).await {
                Ok(true) => return Ok(verified.ticket),
                Ok(false) => TicketError::Replayed,
                // Replay store down or full: the operator's policy decides; "allow" mints
                // without the single-use guarantee (logged and counted as limiter errors).
                Err(e) => {
                    self.backend_failed(e)?;
                    return Ok(verified.ticket);
                }
            },
            Err(e) => e,
        };
        match refused {
            // check() never touches the store.
            TicketError::Store(e) => {
                self.backend_failed(e)?;
                Err(GatewayError::LimiterUnavailable)
            }
            e @ TicketError::Invalid(_) => {
                self.metrics.count_mint_refused("ticket_invalid");
                Err(GatewayError::TicketInvalid(e.to_string()))
            }
            e @ TicketError::WrongFlow { .. } => {
                self.metrics.count_mint_refused("ticket_invalid");
                Err(GatewayError::TicketWrongFlow(e.to_string()))
            }
            TicketError::Replayed => {
                self.metrics.count_mint_refused("ticket_replayed");
                Err(GatewayError::TicketReplayed)
            }
        }
    }

    /// Coinbase refuses private client IPs. Seeing one means the gateway is behind a
    /// proxy it was not told about (or it is a development machine): say so once.
    pub(crate) fn cdp_client_ip(&self, ip: IpAddr) -> IpAddr {
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

    fn cdp_failure(&self, e: CdpError, rejections: Rejections) -> GatewayError {
        if matches!(e, CdpError::Busy { .. }) {
            self.metrics.count_mint_refused("cdp_busy");
        }
        crate::cdp::failure(e, "mint", rejections)
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
    let content_type = crate::body::media_type(&parts.headers);
    let is_json = content_type == "application/json";
    if !is_json && content_type != "application/x-www-form-urlencoded" {
        return Err(GatewayError::UnsupportedMediaType);
    }
    let bytes = crate::body::read_small(&parts.headers, body, MAX_BODY_BYTES).await?;
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

/// Name/value pairs of the client's input (query, form, or a JSON object's string
/// members), for parameters read outside the preset table.
fn input_pairs(input: &Input) -> Vec<(String, String)> {
    match input {
        Input::Query(q) => form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
        Input::Form(b) => form_urlencoded::parse(b).into_owned().collect(),
        Input::Json(b) => match serde_json::from_slice::<serde_json::Value>(b) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
                .collect(),
            _ => Vec::new(),
        },
    }
}

fn answer_with(
    answer: Answer,
    token: Option<&str>,
    location: &str,
    quote: Option<serde_json::Value>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let location_value =
        HeaderValue::from_str(location).map_err(|_| GatewayError::CdpUnavailable)?;
    let mut r = match answer {
        Answer::Json => {
            let mut body = serde_json::json!({ "url": location });
            if let Some(token) = token {
                body["sessionToken"] = token.into();
            }
            if let Some(quote) = quote {
                body["quote"] = quote;
            }
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
