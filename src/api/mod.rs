//! `[api]`: the JSON backend that browser SDKs (`@coinbase/cdp-react`'s `<Fund>`, the
//! `create-cdp-app` template) expect, so a team wires them to the gateway instead of
//! writing a server that holds the CDP secret.
//!
//! - `GET {prefix}/buy-config` → CDP `GET /onramp/v1/buy/config`, cached.
//! - `GET {prefix}/buy-options?country=US[&subdivision=NY][&networks=base,..]` →
//!   `GET /onramp/v1/buy/options`, cached per normalised query.
//! - `POST {prefix}/buy-quote` → `POST /onramp/v1/buy/quote`; with a destination address
//!   from the configured address source the answer carries a minted `onrampUrl`.
//! - `GET {prefix}/transactions[?flow=offramp&pageKey=..&pageSize=..]` →
//!   `GET /onramp/v1/{buy|sell}/user/{partnerUserRef}/transactions`, `partnerUserRef` only
//!   from the app context or the ticket.
//!
//! - `POST {prefix}/orders`, `GET {prefix}/orders/{orderId}` (`orders.enabled`):
//!   headless Apple Pay / Google Pay orders ([`orders`]), the buyer's identity only from
//!   the app context or the ticket.
//!
//! Every endpoint passes the same gate as the minting routes (cross-site refusal, CORS),
//! then its own per-IP bucket (`api.requests_per_minute`/`api.burst`). Answers are
//! camelCase ([`camel`]); errors are problem+json with an `error` member.
//! A cache miss is loaded once per key even under a burst (moka coalesces concurrent
//! misses), so CDP is asked at most once per key per `cache_s`.

pub mod camel;
pub mod orders;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use url::Url;

use crate::body::{full, ResponseBody};
use crate::client_ip::ClientIp;
use crate::config::{AddressSource, Settings};
use crate::error::GatewayError;
use crate::gate::{Gate, Pass};
use crate::metrics::Metrics;
use crate::mint::{Input, Known, Minter, Purpose};
use crate::onramp::address;
use crate::onramp::request::{ClientInput, Flow};
use crate::onramp::session_v2::is_coinbase_pay_url;
use crate::ratelimit::{response_headers, RateLimiter};

/// Quote bodies are a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Distinct cached answers held at most (one per normalised options query).
const CACHE_ENTRIES: u64 = 1024;

pub struct Api {
    prefix: String,
    minter: Arc<Minter>,
    gate: Gate,
    /// `api.requests_per_minute`/`api.burst` per client.
    limiter: Arc<dyn RateLimiter>,
    /// CDP allows 10 buy/sell quotes per second per app: the gateway answers 503 before
    /// Coinbase would refuse (shared through Redis with that backend).
    quote_budget: Arc<dyn RateLimiter>,
    cache: moka::future::Cache<String, Bytes>,
    /// `api.cache_s = 0` turns the cache off.
    caching: bool,
    cache_control: HeaderValue,
    v1_base: Url,
    blockchains: Vec<String>,
    sandbox: bool,
    metrics: Arc<Metrics>,
    /// `orders.enabled`, `orders.domain`, and where v2 lives.
    orders: bool,
    orders_domain: String,
    platform_base: Url,
}

/// The `[api]` endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    BuyConfig,
    BuyOptions,
    BuyQuote,
    Transactions,
    CreateOrder,
    GetOrder,
}

impl Api {
    pub fn new(
        settings: &Settings,
        minter: Arc<Minter>,
        limiter: Arc<dyn RateLimiter>,
        quote_budget: Arc<dyn RateLimiter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache_s = settings.config.api.cache_s;
        let cache = moka::future::Cache::builder()
            .max_capacity(CACHE_ENTRIES)
            .time_to_live(Duration::from_secs(cache_s.max(1)))
            .build();
        let cache_control = HeaderValue::from_str(&format!("private, max-age={cache_s}"))
            .unwrap_or(HeaderValue::from_static("no-store"));
        Self {
            prefix: settings.config.api.prefix.clone(),
            minter,
            gate: Gate::new(settings),
            limiter,
            quote_budget,
            cache,
            caching: cache_s > 0,
            cache_control,
            v1_base: settings.cdp_api_base.clone(),
            blockchains: settings.config.onramp.blockchains.clone(),
            sandbox: settings.config.onramp.sandbox,
            metrics,
            orders: settings.config.orders.enabled,
            orders_domain: settings.config.orders.domain.clone(),
            platform_base: settings.cdp_platform_base.clone(),
        }
    }

    /// Whether `path` is one of ours (`{prefix}/...`).
    pub fn owns(prefix: &str, path: &str) -> bool {
        !prefix.is_empty()
            && path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    pub async fn handle(&self, req: Request<Incoming>, client: ClientIp) -> Response<ResponseBody> {
        let endpoint = match req.uri().path().strip_prefix(self.prefix.as_str()) {
            Some("/buy-config") => Some(Endpoint::BuyConfig),
            Some("/buy-options") => Some(Endpoint::BuyOptions),
            Some("/buy-quote") => Some(Endpoint::BuyQuote),
            Some("/transactions") => Some(Endpoint::Transactions),
            Some("/orders") if self.orders => Some(Endpoint::CreateOrder),
            Some(p) if self.orders && p.starts_with("/orders/") => Some(Endpoint::GetOrder),
            _ => None,
        };
        let (outcome, origin) = match self.gate.admit(&req, &self.metrics) {
            Err((e, origin)) => (Err(e), origin),
            Ok(Pass::Preflight(r, origin)) => (Ok(r), origin),
            Ok(Pass::Serve(origin)) => (self.serve(endpoint, req, client).await, origin),
        };
        let cacheable = matches!(endpoint, Some(Endpoint::BuyConfig | Endpoint::BuyOptions))
            && outcome.as_ref().is_ok_and(|r| r.status() == StatusCode::OK);
        let mut response = outcome.unwrap_or_else(GatewayError::into_api_response);
        let cache_control = if cacheable {
            self.cache_control.clone()
        } else {
            HeaderValue::from_static("no-store")
        };
        Gate::decorate(&mut response, &origin, cache_control);
        response
    }

    async fn serve(
        &self,
        endpoint: Option<Endpoint>,
        req: Request<Incoming>,
        client: ClientIp,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let Some(endpoint) = endpoint else {
            return Err(GatewayError::NotFound);
        };
        let method = if matches!(endpoint, Endpoint::BuyQuote | Endpoint::CreateOrder) {
            Method::POST
        } else {
            Method::GET
        };
        if req.method() != method {
            return Err(GatewayError::MethodNotAllowed);
        }
        self.api_rate_limit(client.ip).await?;
        let (parts, body) = req.into_parts();
        let query = parts.uri.query().unwrap_or("").to_string();
        match endpoint {
            Endpoint::BuyConfig => self.cached("config".into(), self.v1("buy/config")?).await,
            Endpoint::BuyOptions => {
                let q = OptionsQuery::parse(&query)?;
                let mut url = self.v1("buy/options")?;
                q.apply(&mut url);
                self.cached(format!("options?{}", q.key()), url).await
            }
            Endpoint::BuyQuote => {
                let body = read_json(&parts, body).await?;
                self.quote(&parts.headers, body, client.ip).await
            }
            Endpoint::Transactions => self.transactions(&parts.headers, &query, client.ip).await,
            Endpoint::CreateOrder => {
                let body = read_json(&parts, body).await?;
                self.create_order(&parts.headers, body, client.ip).await
            }
            Endpoint::GetOrder => {
                let id = parts
                    .uri
                    .path()
                    .strip_prefix(self.prefix.as_str())
                    .and_then(|p| p.strip_prefix("/orders/"))
                    .unwrap_or_default()
                    .to_string();
                self.get_order(&parts.headers, &id, &query, client.ip).await
            }
        }
    }

    async fn api_rate_limit(&self, ip: IpAddr) -> Result<(), GatewayError> {
        match self.limiter.check(ip).await {
            Ok(v) if !v.is_allowed() => {
                self.metrics.rate_limited.inc();
                Err(GatewayError::RateLimited {
                    headers: response_headers(&v),
                })
            }
            Ok(_) => Ok(()),
            Err(e) => self.minter.backend_failed(e),
        }
    }

    fn v1(&self, path: &str) -> Result<Url, GatewayError> {
        self.v1_base
            .join(&format!("/onramp/v1/{path}"))
            .map_err(|_| GatewayError::CdpUnavailable)
    }

    /// A cached GET: at most one CDP call per key per `cache_s`, concurrent misses
    /// coalesced; failures are not cached.
    async fn cached(&self, key: String, url: Url) -> Result<Response<ResponseBody>, GatewayError> {
        let load = async {
            let (value, _) = self.call(Method::GET, &url, None).await?;
            Ok::<_, GatewayError>(Bytes::from(camel::camel_case(value).to_string()))
        };
        let body = if self.caching {
            self.cache
                .try_get_with(key, load)
                .await
                .map_err(|e| (*e).clone())?
        } else {
            load.await?
        };
        Ok(json_response(StatusCode::OK, body))
    }

    async fn call(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<(Value, Duration), GatewayError> {
        let result = self
            .minter
            .cdp()
            .call_json(method, url, body)
            .await
            .map_err(|e| crate::cdp::failure(e, "api", crate::cdp::Rejections::BadRequestPassedOn));
        if let Ok((_, took)) = &result {
            self.metrics
                .cdp_request_duration
                .observe(took.as_secs_f64());
        }
        result
    }

    async fn quote(
        &self,
        headers: &HeaderMap,
        body: Map<String, Value>,
        ip: IpAddr,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let q = QuoteRequest::parse(&body, &self.blockchains)?;
        // An absent or empty destinationAddress is the kit's exchange-rate probe: no
        // address source lookup, no mint.
        let destination = match (&q.destination_address, self.minter.source()) {
            (None, _) => None,
            (Some(a), AddressSource::Request) => {
                address::check(a, &q.purchase_network).map_err(|reason| {
                    GatewayError::BadRequest(format!("destinationAddress: {reason}"))
                })?;
                Some(a.clone())
            }
            (Some(_), _) => match self.known_from_body(headers, &body, ip).await? {
                Known::Relay(r) => return Ok(r),
                Known::Browser => None,
                Known::App(request, _) => Some(
                    request
                        .addresses
                        .iter()
                        .find(|a| a.blockchains.contains(&q.purchase_network))
                        .map(|a| a.address.clone())
                        .ok_or(GatewayError::NoAppIdentity(
                            "no address of the signed-in user for purchaseNetwork",
                        ))?,
                ),
            },
        };
        if destination.is_some() {
            // It mints (the token inside onrampUrl): the minting buckets apply too.
            self.minter.rate_limit(ip).await?;
        }
        match self.quote_budget.check(ip).await {
            Ok(v) if !v.is_allowed() => {
                let retry_after = match v.decision {
                    crate::ratelimit::Decision::Limited { retry_after, .. } => retry_after,
                    _ => Duration::from_secs(1),
                };
                return Err(GatewayError::CdpRateLimited { retry_after });
            }
            Ok(_) => {}
            Err(e) => self.minter.backend_failed(e)?,
        }
        let mut cdp_body = q.cdp_body();
        if let Some(a) = &destination {
            cdp_body["destination_address"] = json!(a);
        }
        let (answer, _) = self
            .call(Method::POST, &self.v1("buy/quote")?, Some(&cdp_body))
            .await?;
        let mut answer = camel::camel_case(answer);
        if destination.is_some() {
            let url = answer
                .get("onrampUrl")
                .and_then(Value::as_str)
                .and_then(|u| Url::parse(u).ok())
                .filter(|u| self.coinbase_url(u))
                .ok_or_else(|| {
                    tracing::warn!("CDP quote answer has no usable onramp_url");
                    GatewayError::CdpUnavailable
                })?;
            answer["onrampUrl"] = json!(url.as_str());
        } else if let Some(obj) = answer.as_object_mut() {
            // A probe never hands out a URL (it would carry a token nobody asked for).
            obj.remove("onrampUrl");
        }
        Ok(json_response(
            StatusCode::OK,
            Bytes::from(answer.to_string()),
        ))
    }

    /// The address source's view of the user for a JSON call that mints (a ticket, if
    /// that is the source, travels in the body's `ticket` member).
    async fn known_from_body(
        &self,
        headers: &HeaderMap,
        body: &Map<String, Value>,
        ip: IpAddr,
    ) -> Result<Known, GatewayError> {
        let input = Input::Json(Bytes::from(Value::Object(body.clone()).to_string()));
        self.minter
            .known(
                headers,
                &input,
                Purpose::Mint(Flow::Onramp),
                ip,
                ClientInput::None,
            )
            .await
    }

    fn coinbase_url(&self, u: &Url) -> bool {
        is_coinbase_pay_url(u, self.sandbox)
    }

    async fn transactions(
        &self,
        headers: &HeaderMap,
        query: &str,
        ip: IpAddr,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let q = TransactionsQuery::parse(query)?;
        if self.minter.source() == AddressSource::Request {
            return Err(GatewayError::NoAppIdentity(
                "transactions need addresses.source = \"upstream\" or \"ticket\"",
            ));
        }
        let input = Input::Query(query.to_string());
        let partner_user_ref = match self
            .minter
            .known(
                headers,
                &input,
                Purpose::Identity(q.flow),
                ip,
                ClientInput::None,
            )
            .await?
        {
            Known::Relay(r) => return Ok(r),
            Known::Browser => None,
            Known::App(request, _) => request
                .presets
                .into_iter()
                .find(|(k, _)| k == "partnerUserRef")
                .map(|(_, v)| v),
        }
        .ok_or(GatewayError::NoAppIdentity(
            "the application named no partnerUserRef for this user",
        ))?;
        let side = if q.flow == Flow::Offramp {
            "sell"
        } else {
            "buy"
        };
        let mut url = self.v1(&format!("{side}/user/"))?;
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .push(&partner_user_ref)
                .push("transactions");
        }
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(k) = &q.page_key {
                pairs.append_pair("page_key", k);
            }
            if let Some(n) = q.page_size {
                pairs.append_pair("page_size", &n.to_string());
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let (answer, _) = self.call(Method::GET, &url, None).await?;
        Ok(json_response(
            StatusCode::OK,
            Bytes::from(camel::camel_case(answer).to_string()),
        ))
    }
}

impl Api {
    /// `POST {prefix}/orders`: what to buy from the browser, who buys from the app.
    async fn create_order(
        &self,
        headers: &HeaderMap,
        body: Map<String, Value>,
        ip: IpAddr,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let q = orders::OrderRequest::parse(&body, &self.blockchains)
            .map_err(GatewayError::BadRequest)?;
        let (request, app) = match self.known_from_body(headers, &body, ip).await? {
            Known::Relay(r) => return Ok(r),
            Known::Browser => {
                return Err(GatewayError::NoAppIdentity(
                    "headless orders need the buyer's identity from the application",
                ))
            }
            Known::App(request, app) => (request, app),
        };
        let buyer = orders::Buyer::from_app(&request, &app, &q.destination_network, self.sandbox)
            .map_err(GatewayError::NoAppIdentity)?;
        // It creates a payment session: the minting buckets apply too.
        self.minter.rate_limit(ip).await?;
        let client_ip = self.minter.cdp_client_ip(ip).to_string();
        let cdp_body = orders::order_body(&q, &buyer, &client_ip, &self.orders_domain);
        let url = self
            .platform_base
            .join(orders::ORDERS_PATH)
            .map_err(|_| GatewayError::CdpUnavailable)?;
        let (answer, took) = self
            .minter
            .cdp()
            .call_json(Method::POST, &url, Some(&cdp_body))
            .await
            .map_err(|e| crate::cdp::failure(e, "order", crate::cdp::Rejections::BuyerPassedOn))?;
        self.metrics
            .cdp_request_duration
            .observe(took.as_secs_f64());
        let out = orders::order_answer(&answer, q.payment_method, self.sandbox).map_err(|m| {
            tracing::warn!(problem = %m, "CDP order answer refused");
            GatewayError::CdpUnavailable
        })?;
        Ok(json_response(
            StatusCode::CREATED,
            Bytes::from(out.to_string()),
        ))
    }

    /// `GET {prefix}/orders/{orderId}`: the order, only for the user it belongs to; any
    /// other (or unknown) order is `404`, so ids of other users' orders reveal nothing.
    async fn get_order(
        &self,
        headers: &HeaderMap,
        id: &str,
        query: &str,
        ip: IpAddr,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        if !orders::is_order_id(id) {
            return Err(GatewayError::NotFound);
        }
        let input = Input::Query(query.to_string());
        let caller = match self
            .minter
            .known(
                headers,
                &input,
                Purpose::Identity(Flow::Onramp),
                ip,
                ClientInput::None,
            )
            .await?
        {
            Known::Relay(r) => return Ok(r),
            Known::Browser => None,
            Known::App(request, _) => orders::partner_user_ref(&request, self.sandbox),
        }
        .ok_or(GatewayError::NoAppIdentity(
            "the application named no partnerUserRef for this user",
        ))?;
        let url = self
            .platform_base
            .join(&format!("{}/{id}", orders::ORDERS_PATH))
            .map_err(|_| GatewayError::CdpUnavailable)?;
        let answer = match self.minter.cdp().call_json(Method::GET, &url, None).await {
            Ok((answer, took)) => {
                self.metrics
                    .cdp_request_duration
                    .observe(took.as_secs_f64());
                answer
            }
            Err(crate::cdp::client::CdpError::Rejected { status: 404, .. }) => {
                return Err(GatewayError::NotFound)
            }
            Err(e) => {
                return Err(crate::cdp::failure(
                    e,
                    "order",
                    crate::cdp::Rejections::BuyerPassedOn,
                ))
            }
        };
        let order = orders::owned_order(&answer, &caller).ok_or(GatewayError::NotFound)?;
        Ok(json_response(
            StatusCode::OK,
            Bytes::from(order.to_string()),
        ))
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        http::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn read_json(
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<Map<String, Value>, GatewayError> {
    if crate::body::media_type(&parts.headers) != "application/json" {
        return Err(GatewayError::UnsupportedMediaType);
    }
    let bytes = crate::body::read_small(&parts.headers, body, MAX_BODY_BYTES).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(GatewayError::BadRequest(
            "body: must be a JSON object".into(),
        )),
    }
}

fn bad(field: &str, reason: &str) -> GatewayError {
    GatewayError::BadRequest(format!("{field}: {reason}"))
}

/// `name=value` pairs of a query; a name given twice is refused.
fn unique_pairs(query: &str, known: &[&str]) -> Result<Vec<(String, String)>, GatewayError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !known.contains(&k.as_ref()) {
            continue;
        }
        if out.iter().any(|(n, _)| *n == k) {
            return Err(bad(&k, "given more than once"));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn country(value: &str, field: &str) -> Result<String, GatewayError> {
    if value.len() == 2 && value.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(value.to_ascii_uppercase())
    } else {
        Err(bad(
            field,
            "must be an ISO 3166-1 alpha-2 country code, e.g. US",
        ))
    }
}

fn subdivision(value: &str, field: &str) -> Result<String, GatewayError> {
    if (1..=8).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(value.to_ascii_uppercase())
    } else {
        Err(bad(field, "must be a subdivision code, e.g. NY"))
    }
}

/// `buy-options` query, normalised (upper-case codes, sorted unique networks) so
/// equivalent queries share one cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OptionsQuery {
    country: String,
    subdivision: Option<String>,
    networks: Vec<String>,
}

impl OptionsQuery {
    fn parse(query: &str) -> Result<Self, GatewayError> {
        let pairs = unique_pairs(query, &["country", "subdivision", "networks"])?;
        let country = country(
            get(&pairs, "country").ok_or_else(|| bad("country", "required"))?,
            "country",
        )?;
        let subdivision = get(&pairs, "subdivision")
            .map(|s| subdivision(s, "subdivision"))
            .transpose()?;
        let mut networks = Vec::new();
        if let Some(list) = get(&pairs, "networks") {
            for n in list.split(',') {
                let n = n.trim().to_ascii_lowercase();
                if n.is_empty()
                    || n.len() > 64
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(bad("networks", "comma-separated network names"));
                }
                networks.push(n);
            }
            if networks.len() > 32 {
                return Err(bad("networks", "at most 32 networks"));
            }
        }
        networks.sort();
        networks.dedup();
        Ok(Self {
            country,
            subdivision,
            networks,
        })
    }

    fn key(&self) -> String {
        format!(
            "country={}&subdivision={}&networks={}",
            self.country,
            self.subdivision.as_deref().unwrap_or(""),
            self.networks.join(",")
        )
    }

    fn apply(&self, url: &mut Url) {
        let mut pairs = url.query_pairs_mut();
        pairs.append_pair("country", &self.country);
        if let Some(s) = &self.subdivision {
            pairs.append_pair("subdivision", s);
        }
        if !self.networks.is_empty() {
            pairs.append_pair("networks", &self.networks.join(","));
        }
    }
}

/// `buy-quote` body (`fetchBuyQuote`'s parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
struct QuoteRequest {
    purchase_currency: String,
    purchase_network: String,
    payment_amount: String,
    payment_currency: String,
    payment_method: String,
    country: String,
    subdivision: Option<String>,
    destination_address: Option<String>,
}

impl QuoteRequest {
    fn parse(body: &Map<String, Value>, blockchains: &[String]) -> Result<Self, GatewayError> {
        // Strings, or numbers for amounts (rendered as JSON writes them).
        let field = |name: &str| -> Result<Option<String>, GatewayError> {
            match body.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) if s.len() <= 256 => Ok(Some(s.clone())),
                Some(Value::Number(n)) if name == "paymentAmount" => Ok(Some(n.to_string())),
                _ => Err(bad(name, "must be a string")),
            }
        };
        let required = |name: &str| field(name)?.ok_or_else(|| bad(name, "required"));
        let token = |name: &str, v: String, max: usize| {
            if !v.is_empty()
                && v.len() <= max
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                Ok(v)
            } else {
                Err(bad(name, "invalid value"))
            }
        };
        let purchase_network = required("purchaseNetwork")?.to_ascii_lowercase();
        if !blockchains
            .iter()
            .any(|b| b.eq_ignore_ascii_case(&purchase_network))
        {
            return Err(bad("purchaseNetwork", "not one of onramp.blockchains"));
        }
        let payment_amount = required("paymentAmount")?;
        if !is_amount(&payment_amount) {
            return Err(bad(
                "paymentAmount",
                "must be a positive decimal, e.g. \"100\"",
            ));
        }
        Ok(Self {
            purchase_currency: token("purchaseCurrency", required("purchaseCurrency")?, 64)?,
            purchase_network,
            payment_amount,
            payment_currency: token("paymentCurrency", required("paymentCurrency")?, 16)?,
            payment_method: token("paymentMethod", required("paymentMethod")?, 64)?,
            country: country(&required("country")?, "country")?,
            subdivision: field("subdivision")?
                .map(|s| subdivision(&s, "subdivision"))
                .transpose()?,
            destination_address: field("destinationAddress")?,
        })
    }

    /// The CDP request, in v1's snake_case (the destination is added by the caller).
    fn cdp_body(&self) -> Value {
        let mut b = json!({
            "purchase_currency": self.purchase_currency,
            "purchase_network": self.purchase_network,
            "payment_amount": self.payment_amount,
            "payment_currency": self.payment_currency,
            "payment_method": self.payment_method,
            "country": self.country,
        });
        if let Some(s) = &self.subdivision {
            b["subdivision"] = json!(s);
        }
        b
    }
}

/// `100`, `100.5`, `0.01`: digits, at most one `.`, not zero, at most 18 decimals.
fn is_amount(s: &str) -> bool {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    !int.is_empty()
        && int.len() <= 15
        && int.bytes().all(|b| b.is_ascii_digit())
        && (s.find('.').is_none() || (!frac.is_empty() && frac.len() <= 18))
        && frac.bytes().all(|b| b.is_ascii_digit())
        && s.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TransactionsQuery {
    flow: Flow,
    page_key: Option<String>,
    page_size: Option<u16>,
}

impl TransactionsQuery {
    fn parse(query: &str) -> Result<Self, GatewayError> {
        let pairs = unique_pairs(query, &["flow", "pageKey", "pageSize"])?;
        let flow = match get(&pairs, "flow") {
            None | Some("onramp") => Flow::Onramp,
            Some("offramp") => Flow::Offramp,
            Some(_) => return Err(bad("flow", "must be \"onramp\" or \"offramp\"")),
        };
        let page_key = get(&pairs, "pageKey")
            .map(|k| {
                if k.len() <= 512
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_=.~+/".contains(&b))
                {
                    Ok(k.to_string())
                } else {
                    Err(bad("pageKey", "invalid value"))
                }
            })
            .transpose()?;
        let page_size = get(&pairs, "pageSize")
            .map(|n| match n.parse::<u16>() {
                Ok(n @ 1..=1000) => Ok(n),
                _ => Err(bad("pageSize", "must be between 1 and 1000")),
            })
            .transpose()?;
        Ok(Self {
            flow,
            page_key,
            page_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_queries_normalise_to_one_key() {
        let a = OptionsQuery::parse("country=us&subdivision=ny&networks=ethereum,base").unwrap();
        let b =
            OptionsQuery::parse("networks=base,ethereum,base&country=US&subdivision=NY").unwrap();
        assert_eq!(a.key(), b.key());
        assert!(OptionsQuery::parse("subdivision=NY").is_err());
        assert!(OptionsQuery::parse("country=USA").is_err());
        assert!(OptionsQuery::parse("country=US&country=CA").is_err());
        assert!(OptionsQuery::parse("country=US&networks=base,,x").is_err());
        let mut url = Url::parse("https://api.example/onramp/v1/buy/options").unwrap();
        a.apply(&mut url);
        assert_eq!(
            url.query(),
            Some("country=US&subdivision=NY&networks=base%2Cethereum")
        );
    }

    #[test]
    fn quote_fields_are_checked_and_mapped() {
        let chains = vec!["base".to_string()];
        let body = json!({"purchaseCurrency": "USDC", "purchaseNetwork": "base",
            "paymentAmount": "100", "paymentCurrency": "USD", "paymentMethod": "CARD",
            "country": "US", "subdivision": "NY", "destinationAddress": ""});
        let q = QuoteRequest::parse(body.as_object().unwrap(), &chains).unwrap();
        assert_eq!(q.destination_address, None, "empty address is the probe");
        assert_eq!(
            q.cdp_body(),
            json!({"purchase_currency": "USDC", "purchase_network": "base",
                "payment_amount": "100", "payment_currency": "USD", "payment_method": "CARD",
                "country": "US", "subdivision": "NY"})
        );
        for (field, value) in [
            ("purchaseNetwork", json!("solana")),
            ("paymentAmount", json!("0")),
            ("paymentAmount", json!("1e5")),
            ("paymentMethod", json!("CARD\r\nX")),
            ("country", json!("U")),
            ("purchaseCurrency", json!(5)),
        ] {
            let mut b = body.clone();
            b[field] = value;
            let e = QuoteRequest::parse(b.as_object().unwrap(), &chains).unwrap_err();
            assert!(e.to_string().starts_with(field), "{field}: {e}");
        }
        let mut b = body.clone();
        b["paymentAmount"] = json!(100);
        assert_eq!(
            QuoteRequest::parse(b.as_object().unwrap(), &chains)
                .unwrap()
                .payment_amount,
            "100"
        );
    }

    #[test]
    fn amounts() {
        for ok in ["100", "0.01", "100.50", "1"] {
            assert!(is_amount(ok), "{ok}");
        }
        for bad in ["", "0", "0.00", ".5", "5.", "-1", "1e3", "1.2.3", "１"] {
            assert!(!is_amount(bad), "{bad}");
        }
    }

    #[test]
    fn transactions_query() {
        let q = TransactionsQuery::parse("flow=offramp&pageKey=abc&pageSize=10").unwrap();
        assert_eq!(q.flow, Flow::Offramp);
        assert_eq!(q.page_size, Some(10));
        assert!(TransactionsQuery::parse("pageSize=0").is_err());
        assert!(TransactionsQuery::parse("pageSize=1001").is_err());
        assert!(TransactionsQuery::parse("flow=sideways").is_err());
        assert_eq!(TransactionsQuery::parse("").unwrap().flow, Flow::Onramp);
    }

    #[test]
    fn owns_only_paths_under_the_prefix() {
        assert!(Api::owns("/onramp/api", "/onramp/api/buy-quote"));
        assert!(!Api::owns("/onramp/api", "/onramp/apix"));
        assert!(!Api::owns("/onramp/api", "/onramp/api"));
        assert!(!Api::owns("", "/anything"));
    }
}
