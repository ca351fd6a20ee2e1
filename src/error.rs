//! Every error a request can end in, and the one place that turns it into a response.
//!
//! Layers have their own error types (config, TLS, CDP, rate limiter, validation); by
//! the time something reaches a client it is a [`GatewayError`], whose status code,
//! public message and extra headers are decided here and nowhere else. Messages are
//! written for the person in front of the browser and never carry secrets, JWTs or
//! upstream internals; details go to the log.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{full, ResponseBody};

/// `Clone`: a cached load's failure is handed to every caller that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("the upstream application is unreachable")]
    UpstreamUnavailable,
    #[error("the upstream application did not answer in time")]
    UpstreamTimeout,
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// The client stopped sending its request body for `idle_timeout_ms`.
    #[error("the request body stopped arriving")]
    RequestTimeout,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unsupported content type: use application/x-www-form-urlencoded or application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    BadRequest(String),
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("not found")]
    NotFound,
    /// The address source gave no identity for what was asked (`403`).
    #[error("{0}")]
    NoAppIdentity(&'static str),
    #[error("cross-site request refused: start from this site's own page")]
    CrossSiteRefused,
    /// The message says what is wrong with the ticket (never its content).
    #[error("{0}")]
    TicketInvalid(String),
    #[error("{0}")]
    TicketWrongFlow(String),
    #[error("ticket already used: ask the application for a new one")]
    TicketReplayed,
    #[error("too many Coinbase API calls in flight, try again shortly")]
    CdpBusy,
    #[error("too many requests")]
    /// `headers`: Retry-After, RateLimit-Policy and RateLimit, as the limiter renders them.
    RateLimited {
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    #[error("rate limiter unavailable")]
    LimiterUnavailable,
    #[error("token minting not configured: no CDP API key (set CDP_API_KEY_ID and CDP_API_KEY_SECRET or [cdp] key_file)")]
    MintingNotConfigured,
    #[error("the Coinbase API is unavailable")]
    CdpUnavailable,
    #[error("the Coinbase API did not answer in time")]
    CdpTimeout,
    #[error("the Coinbase API is rate limiting this application, try again shortly")]
    CdpRateLimited { retry_after: Duration },
    #[error("the Coinbase API refused the request")]
    CdpRejected,
    /// A v2 / read-API `400`: the client's input; Coinbase's words are passed on.
    #[error("{message}")]
    CdpInvalidRequest { error_type: String, message: String },
    #[error("the application's onramp context could not be read")]
    ContextUnavailable,
    /// A webhook delivery whose signature, timestamp or signed headers do not check out.
    #[error("webhook signature invalid")]
    WebhookUnauthorized,
    /// A headless order refused for the buyer (`guest_transaction_limit`, ...): Coinbase's
    /// `429` with its `errorType`, which the app shows the user (not a retry signal).
    #[error("{message}")]
    CdpBuyerLimited { error_type: String, message: String },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            UpstreamUnavailable | CdpUnavailable | CdpRejected | ContextUnavailable => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamTimeout | CdpTimeout => StatusCode::GATEWAY_TIMEOUT,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BadRequest(_) | CdpInvalidRequest { .. } => StatusCode::BAD_REQUEST,
            OriginNotAllowed | CrossSiteRefused | TicketWrongFlow(_) | NoAppIdentity(_) => {
                StatusCode::FORBIDDEN
            }
            NotFound => StatusCode::NOT_FOUND,
            TicketInvalid(_) | WebhookUnauthorized => StatusCode::UNAUTHORIZED,
            CdpBuyerLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            TicketReplayed => StatusCode::CONFLICT,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            LimiterUnavailable | MintingNotConfigured | CdpRateLimited { .. } | CdpBusy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A short stable identifier, used in problem+json `type` and in logs.
    pub fn kind(&self) -> &'static str {
        use GatewayError::*;
        match self {
            UpstreamUnavailable => "upstream-unavailable",
            UpstreamTimeout => "upstream-timeout",
            HeadersTooLarge => "headers-too-large",
            RequestTimeout => "request-timeout",
            PayloadTooLarge => "payload-too-large",
            MethodNotAllowed => "method-not-allowed",
            UnsupportedMediaType => "unsupported-media-type",
            BadRequest(_) => "invalid-request",
            OriginNotAllowed => "origin-not-allowed",
            NotFound => "not-found",
            NoAppIdentity(_) => "no-app-identity",
            CrossSiteRefused => "cross-site-refused",
            TicketInvalid(_) => "ticket-invalid",
            TicketWrongFlow(_) => "ticket-wrong-flow",
            TicketReplayed => "ticket-replayed",
            CdpBusy => "cdp-busy",
            RateLimited { .. } => "rate-limited",
            LimiterUnavailable => "rate-limiter-unavailable",
            MintingNotConfigured => "minting-not-configured",
            CdpUnavailable => "cdp-unavailable",
            CdpTimeout => "cdp-timeout",
            CdpRateLimited { .. } => "cdp-rate-limited",
            CdpRejected => "cdp-rejected",
            CdpInvalidRequest { .. } => "cdp-invalid-request",
            ContextUnavailable => "context-unavailable",
            WebhookUnauthorized => "webhook-unauthorized",
            CdpBuyerLimited { .. } => "cdp-buyer-limited",
        }
    }

    fn extra_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            GatewayError::RateLimited { headers } => headers.clone(),
            GatewayError::CdpRateLimited { retry_after } => {
                vec![(http::header::RETRY_AFTER, retry_after_value(*retry_after))]
            }
            // A queue that stayed full for the whole CDP timeout: come back in a second.
            GatewayError::CdpBusy => vec![(
                http::header::RETRY_AFTER,
                retry_after_value(Duration::from_secs(1)),
            )],
            // The rest of a stalled body may still arrive: the connection cannot be
            // reused, so HTTP/1.1 closes it after this answer (HTTP/2 drops the field).
            GatewayError::RequestTimeout => {
                vec![(http::header::CONNECTION, HeaderValue::from_static("close"))]
            }
            GatewayError::MethodNotAllowed => vec![(
                http::header::ALLOW,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            )],
            _ => Vec::new(),
        }
    }

    /// Renders the error for a client that sent `request_headers`.
    pub fn into_response(self, request_headers: &HeaderMap) -> Response<ResponseBody> {
        self.into_response_as(wants_json(request_headers))
    }

    /// Renders the error as problem+json (`json`) or a small HTML page.
    pub fn into_response_as(self, json: bool) -> Response<ResponseBody> {
        self.render(if json { Shape::Problem } else { Shape::Html })
    }

    /// The `[api]` endpoints' form: problem+json with an extra `error` member holding the
    /// same message (what Coinbase's client code reads).
    pub fn into_api_response(self) -> Response<ResponseBody> {
        self.render(Shape::ApiProblem)
    }

    fn render(self, shape: Shape) -> Response<ResponseBody> {
        let status = self.status();
        let detail = self.to_string();
        let (content_type, body) = if shape != Shape::Html {
            let mut problem = serde_json::json!({
                "type": format!("urn:onramp-gateway:error:{}", self.kind()),
                "title": status.canonical_reason().unwrap_or("Error"),
                "status": status.as_u16(),
                "detail": detail,
            });
            if let GatewayError::CdpInvalidRequest {
                error_type,
                message,
            }
            | GatewayError::CdpBuyerLimited {
                error_type,
                message,
            } = &self
            {
                problem["errorType"] = error_type.clone().into();
                problem["errorMessage"] = message.clone().into();
            }
            if shape == Shape::ApiProblem {
                problem["error"] = detail.clone().into();
            }
            ("application/problem+json", Bytes::from(problem.to_string()))
        } else {
            (
                "text/html; charset=utf-8",
                Bytes::from(html_page(status, &detail)),
            )
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        for (name, value) in self.extra_headers() {
            headers.append(name, value);
        }
        response
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Html,
    Problem,
    ApiProblem,
}

/// `Retry-After` in whole seconds, rounded up and never 0 (the rate limiter's rule, so
/// both 429 and 503 answers count the same way).
pub fn retry_after_value(d: Duration) -> HeaderValue {
    HeaderValue::from(crate::ratelimit::retry_after_secs(d))
}

/// True when the client prefers a machine-readable error (fetch/XHR from a SPA).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let media = item.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/json")
                || media.eq_ignore_ascii_case("application/problem+json")
        })
}

fn html_page(status: StatusCode, detail: &str) -> String {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1><p>{d}</p></body></html>\n",
        t = escape_html(&title),
        d = escape_html(detail)
    )
}

/// Messages can contain a client-supplied field name; never reflect markup.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[tokio::test]
    async fn problem_json_when_accepted() {
        let r = GatewayError::UpstreamTimeout
            .into_response(&accept("text/html;q=0.5, application/json"));
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 504);
        assert_eq!(v["type"], "urn:onramp-gateway:error:upstream-timeout");
    }

    #[tokio::test]
    async fn html_escapes_detail() {
        let r =
            GatewayError::BadRequest("address: <script>".into()).into_response(&HeaderMap::new());
        assert_eq!(r.status(), 400);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("&lt;script&gt;") && !text.contains("<script>"));
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_value(Duration::from_millis(0)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(5200)), "6");
        assert_eq!(retry_after_value(Duration::from_secs(6)), "6");
    }
}
