//! Response body type shared by every handler.
//!
//! Proxied responses stream the upstream's `Incoming` body untouched; responses the
//! gateway makes itself are a single `Bytes` buffer. `Either` keeps both without
//! boxing, so the proxy hot path allocates nothing extra per response.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

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
