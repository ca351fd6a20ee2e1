//! Response body type shared by every handler.
//!
//! Proxied responses stream the upstream's `Incoming` body untouched; responses the
//! gateway makes itself are a single `Bytes` buffer. `Either` keeps both without
//! boxing, so the proxy hot path allocates nothing extra per response.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::error::GatewayError;

pub type ResponseBody = Either<Incoming, Full<Bytes>>;

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(bytes.into()))
}

pub fn empty() -> ResponseBody {
    Either::Right(Full::new(Bytes::new()))
}

pub fn streamed(body: Incoming) -> ResponseBody {
    Either::Left(body)
}

/// How long reading a small request body (a form, a JSON call, a webhook) may take.
pub const SMALL_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The request's media type, lower case, without parameters (`""` when absent).
pub fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Reads a body the gateway consumes itself (never a proxied one) into memory: refused
/// with `413` before reading when `Content-Length` says more than `max`, cut at `max`
/// otherwise, and `400` when it does not arrive within [`SMALL_BODY_TIMEOUT`] — a slow
/// client cannot hold the handler, a large one cannot grow it. The one reader for the
/// minting routes, the `[api]` endpoints and the webhook receiver.
pub async fn read_small(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
) -> Result<Bytes, GatewayError> {
    if headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > max as u64)
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    match tokio::time::timeout(SMALL_BODY_TIMEOUT, Limited::new(body, max).collect()).await {
        Err(_) => Err(GatewayError::BadRequest(
            "body: not received in time".into(),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge)
        }
        Ok(Err(_)) => Err(GatewayError::BadRequest("body: could not be read".into())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}
