//! The CDP session-token client: `POST {api_base}/onramp/v1/token`.
//!
//! One pooled reqwest client (rustls, HTTP/2 when the server offers it), a fresh JWT
//! per call, the whole exchange bounded by `cdp.timeout_ms`, and the answer read with
//! a size cap: only `token` is taken from it.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::jwt::{build_jwt, unix_now, JwtError};
use super::key::CdpKey;
use crate::ca_file::ExtraRoots;
use crate::onramp::request::AddressEntry;

/// The CDP answer is a few hundred bytes; anything past this is not a token response.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// When CDP says 429 without `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A minted session token. Deliberately not `Display` and redacted in `Debug` so it
/// cannot end up in a log line by accident.
pub struct SessionToken(String);

impl SessionToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdpError {
    #[error("CDP API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("CDP API unreachable: {0}")]
    Unreachable(String),
    #[error("CDP API answered {status} (server error)")]
    ServerError { status: u16 },
    #[error("CDP API rate limited the request")]
    RateLimited { retry_after: Duration },
    /// `message` is v1's google.rpc `message` or v2's `errorMessage`; `error_type` and
    /// `correlation_id` are v2's (`errorType`, `correlationId`).
    #[error("CDP API refused the request with {status}: {message}")]
    Rejected {
        status: u16,
        message: String,
        error_type: Option<String>,
        correlation_id: Option<String>,
    },
    #[error("CDP API answer unusable: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// `rate_limit.max_concurrent_cdp_calls` calls were in flight for the whole wait.
    #[error("{max} CDP calls in flight; none finished within {waited:?}")]
    Busy { max: usize, waited: Duration },
}

impl CdpError {
    /// Metric/log label.
    pub fn kind(&self) -> &'static str {
        match self {
            CdpError::Timeout(_) => "cdp-timeout",
            CdpError::Unreachable(_) => "cdp-unavailable",
            CdpError::ServerError { .. } => "cdp-server-error",
            CdpError::RateLimited { .. } => "cdp-rate-limited",
            CdpError::Rejected { .. } => "cdp-rejected",
            CdpError::BadResponse(_) => "cdp-bad-response",
            CdpError::Jwt(_) => "jwt-error",
            CdpError::Busy { .. } => "cdp-busy",
        }
    }
}

/// The token request body, exactly the documented shape.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequestBody<'a> {
    addresses: &'a [AddressEntry],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    assets: &'a [String],
    client_ip: String,
}

pub struct CdpClient {
    http: reqwest::Client,
    token_url: url::Url,
    key: Arc<CdpKey>,
    timeout: Duration,
    /// Bounds the calls in flight (`rate_limit.max_concurrent_cdp_calls`): a slow CDP
    /// must not let waiting mints, each holding buffers and a connection, pile up without
    /// bound. Callers queue for a permit up to `timeout`, then get [`CdpError::Busy`].
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

/// Default for [`CdpClient::with_max_concurrent`] (`rate_limit.max_concurrent_cdp_calls`).
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

impl CdpClient {
    /// `extra_roots` (`cdp.ca_file`) are trusted in addition to the built-in webpki roots.
    /// HTTP/2 is offered by ALPN (`h2`, then `http/1.1`), so against an h2 server every
    /// call in flight shares one connection.
    pub fn new(
        api_base: &url::Url,
        key: Arc<CdpKey>,
        timeout: Duration,
        extra_roots: Option<&ExtraRoots>,
    ) -> Result<Self, CdpError> {
        let token_url = api_base
            .join("/onramp/v1/token")
            .map_err(|e| CdpError::BadResponse(format!("cdp.api_base: {e}")))?;
        let mut builder = reqwest::Client::builder();
        if let Some(roots) = extra_roots {
            builder = roots.add_to(builder);
        }
        let http = builder
            .use_rustls_tls()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            // After a burst, keep a few warm connections, not one per request of the burst
            // (against the real API, HTTP/2 multiplexes on one connection anyway).
            .pool_max_idle_per_host(32)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("onramp-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CdpError::Unreachable(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            http,
            token_url,
            key,
            timeout,
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_CONCURRENT)),
            max_in_flight: DEFAULT_MAX_CONCURRENT,
        })
    }

    /// At most `max` CDP calls in flight at once (at least 1).
    pub fn with_max_concurrent(mut self, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        self.in_flight = Arc::new(Semaphore::new(max));
        self.max_in_flight = max;
        self
    }

    /// Waits (up to the call timeout) for a free slot among the calls in flight.
    async fn slot(&self) -> Result<SemaphorePermit<'_>, CdpError> {
        match tokio::time::timeout(self.timeout, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Err(_) from acquire means the semaphore was closed, which this code never does.
            _ => Err(CdpError::Busy {
                max: self.max_in_flight,
                waited: self.timeout,
            }),
        }
    }

    pub fn token_url(&self) -> &url::Url {
        &self.token_url
    }

    /// Mints one session token. `Ok` carries the token and how long the call took.
    pub async fn create_token(
        &self,
        addresses: &[AddressEntry],
        assets: &[String],
        client_ip: IpAddr,
    ) -> Result<(SessionToken, Duration), CdpError> {
        let body = TokenRequestBody {
            addresses,
            assets,
            client_ip: client_ip.to_string(),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| CdpError::BadResponse(format!("cannot encode the request: {e}")))?;
        let (bytes, took) = self
            .call(reqwest::Method::POST, &self.token_url, Some(body))
            .await?;
        Ok((parse_token(&bytes)?, took))
    }

    /// One CDP API call: `method url` with a fresh JWT whose `uris` is the URL's
    /// host and path (never its query: Coinbase rejects signed queries), an optional
    /// JSON body, the whole exchange bounded by the timeout and counted against the
    /// in-flight bound. `Ok` is the success body (at most 64 KiB) and the call's duration.
    /// Every CDP endpoint, v1 host or v2 platform, goes through here.
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: &url::Url,
        json_body: Option<Vec<u8>>,
    ) -> Result<(Vec<u8>, Duration), CdpError> {
        let _slot = self.slot().await?;
        let started = Instant::now();
        let jwt = build_jwt(&self.key, method.as_str(), url, unix_now())?;
        let result = tokio::time::timeout(
            self.timeout,
            self.exchange(method, url.clone(), jwt, json_body),
        )
        .await;
        let elapsed = started.elapsed();
        match result {
            Err(_) => Err(CdpError::Timeout(self.timeout)),
            Ok(r) => r.map(|bytes| (bytes, elapsed)),
        }
    }

    /// [`call`](Self::call), the answer parsed as JSON.
    pub async fn call_json(
        &self,
        method: reqwest::Method,
        url: &url::Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(serde_json::Value, Duration), CdpError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (bytes, took) = self.call(method, url, body).await?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|_| CdpError::BadResponse("answer is not JSON".into()))?;
        Ok((value, took))
    }

    async fn exchange(
        &self,
        method: reqwest::Method,
        url: url::Url,
        jwt: String,
        json_body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, CdpError> {
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(jwt)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = json_body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(e, self.timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = read_capped(response, self.timeout).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        match status.as_u16() {
            // A buyer's own limit (headless orders: `guest_transaction_limit`, ...) is a
            // refusal to show the user, not the API rate limit to back off from.
            429 => match ErrorBody::parse(&bytes) {
                ErrorBody {
                    message,
                    error_type: Some(t),
                    correlation_id,
                } if super::is_buyer_error(&t) => Err(CdpError::Rejected {
                    status: 429,
                    message,
                    error_type: Some(t),
                    correlation_id,
                }),
                _ => Err(CdpError::RateLimited {
                    retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                }),
            },
            s if s >= 500 => Err(CdpError::ServerError { status: s }),
            s => {
                let e = ErrorBody::parse(&bytes);
                Err(CdpError::Rejected {
                    status: s,
                    message: e.message,
                    error_type: e.error_type,
                    correlation_id: e.correlation_id,
                })
            }
        }
    }
}

fn transport_error(e: reqwest::Error, timeout: Duration) -> CdpError {
    if e.is_timeout() {
        CdpError::Timeout(timeout)
    } else {
        // reqwest's Display includes the URL (no secrets: the JWT is a header).
        CdpError::Unreachable(e.to_string())
    }
}

/// Reads the body chunk by chunk and gives up past [`MAX_RESPONSE_BYTES`], so a
/// misbehaving or hostile endpoint cannot make the gateway buffer megabytes.
async fn read_capped(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, CdpError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(CdpError::BadResponse("answer larger than 64 KiB".into()));
    }
    let mut out = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(CdpError::BadResponse("answer larger than 64 KiB".into()));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(transport_error(e, timeout)),
        }
    }
}

/// The token out of a 2xx answer body. `pub` for the fuzz target (fuzz/fuzz_targets/cdp_response.rs).
pub fn parse_token(bytes: &[u8]) -> Result<SessionToken, CdpError> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
    }
    // serde also fills a struct from a JSON array (`["t"]`), which is no token answer
    // (found by fuzz/fuzz_targets/cdp_response.rs): only an object is one.
    let is_object = bytes.trim_ascii_start().first() == Some(&b'{');
    let parsed: TokenResponse = serde_json::from_slice(bytes)
        .ok()
        .filter(|_| is_object)
        .ok_or_else(|| CdpError::BadResponse("not a JSON token response".into()))?;
    match parsed.token {
        Some(t) if !t.is_empty() && t.len() <= 4096 && t.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(SessionToken(t))
        }
        Some(_) => Err(CdpError::BadResponse("token has an unexpected form".into())),
        None => Err(CdpError::BadResponse("no token in the answer".into())),
    }
}

/// An error answer: v1's google.rpc Status (`message`) or v2's
/// `{errorType, errorMessage, correlationId}`, each field shortened and made log-safe.
/// `pub` for the fuzz target.
pub struct ErrorBody {
    pub message: String,
    pub error_type: Option<String>,
    pub correlation_id: Option<String>,
}

impl ErrorBody {
    pub fn parse(bytes: &[u8]) -> Self {
        let v = serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_default();
        let field = |name: &str, max: usize| {
            v.get(name)
                .and_then(|m| m.as_str())
                .map(|m| m.chars().filter(|c| !c.is_control()).take(max).collect())
        };
        ErrorBody {
            message: field("errorMessage", 300)
                .or_else(|| field("message", 300))
                .unwrap_or_else(|| "(no message)".to_string()),
            // Only token characters: these reach clients and metric-free logs.
            error_type: field("errorType", 64)
                .filter(|t: &String| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')),
            correlation_id: field("correlationId", 128),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_documented_shape() {
        let addresses = vec![AddressEntry {
            address: "0x0000000000000000000000000000000000000001".into(),
            blockchains: vec!["base".into()],
        }];
        let body = TokenRequestBody {
            addresses: &addresses,
            assets: &[],
            client_ip: "192.0.2.1".into(),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"addresses":[{"address":"0x0000000000000000000000000000000000000001","blockchains":["base"]}],"clientIp":"192.0.2.1"}"#
        );
        let assets = vec!["USDC".to_string()];
        let body = TokenRequestBody {
            addresses: &addresses,
            assets: &assets,
            client_ip: "192.0.2.1".into(),
        };
        assert!(serde_json::to_string(&body)
            .unwrap()
            .contains(r#""assets":["USDC"]"#));
    }

    #[test]
    fn token_parsing() {
        assert_eq!(
            parse_token(br#"{"token":"abc","channel_id":""}"#)
                .unwrap()
                .expose(),
            "abc"
        );
        assert!(parse_token(br#"{"channelId":""}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
        assert!(parse_token(br#"{"token":"a b"}"#).is_err());
        // An array deserialises into the struct positionally; it is not a token answer.
        assert!(parse_token(br#"["t{["]"#).is_err());
        assert!(parse_token(br#" ["tok"]"#).is_err());
        assert!(parse_token(b" \n{\"token\":\"tok\"}").is_ok());
        assert_eq!(
            format!("{:?}", SessionToken("secret".into())),
            "SessionToken(<redacted>)"
        );
    }

    #[test]
    fn error_message_is_bounded_and_clean() {
        let message = |b: &[u8]| ErrorBody::parse(b).message;
        assert_eq!(
            message(br#"{"code":3,"message":"invalid\naddress"}"#),
            "invalidaddress"
        );
        assert_eq!(message(b"garbage"), "(no message)");
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(1000));
        assert_eq!(message(long.as_bytes()).len(), 300);
    }

    #[test]
    fn v2_error_shape_is_read() {
        let e = ErrorBody::parse(
            br#"{"errorType":"invalid_request","errorMessage":"Missing required parameters.","correlationId":"abc-1"}"#,
        );
        assert_eq!(e.message, "Missing required parameters.");
        assert_eq!(e.error_type.as_deref(), Some("invalid_request"));
        assert_eq!(e.correlation_id.as_deref(), Some("abc-1"));
        // A type that is not a token is dropped, not passed to clients.
        let e = ErrorBody::parse(br#"{"errorType":"<script>","errorMessage":"x"}"#);
        assert_eq!(e.error_type, None);
    }
}
