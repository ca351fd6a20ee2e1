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

use super::jwt::{build_jwt, unix_now, JwtError};
use super::key::CdpKey;
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
    #[error("CDP API refused the request with {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("CDP API answer unusable: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Jwt(#[from] JwtError),
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
}

impl CdpClient {
    pub fn new(api_base: &url::Url, key: Arc<CdpKey>, timeout: Duration) -> Result<Self, CdpError> {
        let token_url = api_base
            .join("/onramp/v1/token")
            .map_err(|e| CdpError::BadResponse(format!("cdp.api_base: {e}")))?;
        let http = reqwest::Client::builder()
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
        })
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
        let started = Instant::now();
        let jwt = build_jwt(&self.key, "POST", &self.token_url, unix_now())?;
        let body = TokenRequestBody {
            addresses,
            assets,
            client_ip: client_ip.to_string(),
        };
        let result = tokio::time::timeout(self.timeout, self.exchange(jwt, &body)).await;
        let elapsed = started.elapsed();
        match result {
            Err(_) => Err(CdpError::Timeout(self.timeout)),
            Ok(r) => r.map(|t| (t, elapsed)),
        }
    }

    async fn exchange(
        &self,
        jwt: String,
        body: &TokenRequestBody<'_>,
    ) -> Result<SessionToken, CdpError> {
        let response = self
            .http
            .post(self.token_url.clone())
            .bearer_auth(jwt)
            .header(reqwest::header::ACCEPT, "application/json")
            .json(body)
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
            return parse_token(&bytes);
        }
        match status.as_u16() {
            429 => Err(CdpError::RateLimited {
                retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            }),
            s if s >= 500 => Err(CdpError::ServerError { status: s }),
            s => Err(CdpError::Rejected {
                status: s,
                message: error_message(&bytes),
            }),
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

/// The google.rpc Status `message` of an error answer, shortened and made log-safe.
/// `pub` for the fuzz target.
pub fn error_message(bytes: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(no message)".to_string());
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
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
        assert_eq!(
            error_message(br#"{"code":3,"message":"invalid\naddress"}"#),
            "invalidaddress"
        );
        assert_eq!(error_message(b"garbage"), "(no message)");
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(1000));
        assert_eq!(error_message(long.as_bytes()).len(), 300);
    }
}
