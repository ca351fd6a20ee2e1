//! Coinbase transaction webhooks, verified at the edge (`webhooks.path`).
//!
//! A delivery is checked ([`signature`]: HMAC-SHA256 with each configured secret, raw
//! bytes, constant time, `tolerance_s`), then its raw body is POSTed to the app at
//! `{upstream.url}{forward_path}` with its `Content-Type` and `X-Onramp-Gateway-Event:
//! <eventType>`. Any failed check: `401`, nothing forwarded. The app's `2xx` becomes `200`
//! to Coinbase, anything else (or no answer) `502`, so Coinbase's own retries do the
//! queueing and the gateway holds no delivery in memory. A delivery id (`X-Hook0-Id`)
//! already forwarded within the tolerance is answered `200` without forwarding again; the
//! ids live in the same replay store as tickets (memory, or Redis with that backend, so
//! replicas agree). An id is remembered only once the app took the delivery: a retry after
//! a `502` is forwarded.

pub mod signature;
pub mod subscriptions;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, ResponseBody};
use crate::cdp::jwt::unix_now;
use crate::client_ip::ClientIp;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::ticket::ReplayGuard;
use crate::upstream::{UpstreamBody, UpstreamClient};
use signature::{SignatureError, WebhookSecrets};

/// The eight event types a subscription is created for (and the only metric labels).
pub const EVENT_TYPES: [&str; 8] = [
    "onramp.transaction.created",
    "onramp.transaction.updated",
    "onramp.transaction.success",
    "onramp.transaction.failed",
    "offramp.transaction.created",
    "offramp.transaction.updated",
    "offramp.transaction.success",
    "offramp.transaction.failed",
];
/// Coinbase's payloads are a few KiB; larger is not a transaction event.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The delivery id header (Hook0's).
const DELIVERY_ID: &str = "x-hook0-id";
/// Longest delivery id remembered (keeps replay keys small).
const MAX_ID_LEN: usize = 256;
pub const X_ONRAMP_GATEWAY_EVENT: HeaderName = HeaderName::from_static("x-onramp-gateway-event");

pub struct WebhookReceiver {
    secrets: WebhookSecrets,
    tolerance_s: u64,
    client: UpstreamClient,
    forward_uri: http::Uri,
    /// `Host` when Coinbase's request had none (HTTP/1.0): the app's own authority.
    fallback_host: HeaderValue,
    timeout: Duration,
    seen: Arc<dyn ReplayGuard>,
    metrics: Arc<Metrics>,
}

/// How a delivery ended: the answer, and the metric's `result` label.
struct Outcome {
    response: Result<Response<ResponseBody>, GatewayError>,
    result: &'static str,
}

impl WebhookReceiver {
    pub fn new(
        settings: &Settings,
        secrets: WebhookSecrets,
        seen: Arc<dyn ReplayGuard>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let authority = settings
            .upstream
            .authority()
            .map_or("127.0.0.1:3000", |a| a.as_str())
            .to_string();
        let forward_uri = format!(
            "http://{authority}{}",
            settings.config.webhooks.forward_path
        )
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1:3000/onramp-events"));
        Self {
            secrets,
            tolerance_s: settings.config.webhooks.tolerance_s,
            client: crate::upstream::shared_client(settings.upstream_connect_timeout()),
            forward_uri,
            fallback_host: HeaderValue::from_str(&authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            timeout: settings.upstream_response_timeout(),
            seen,
            metrics,
        }
    }

    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: ClientIp,
        peer: IpAddr,
    ) -> Response<ResponseBody> {
        let (event, outcome) = self.receive(req, client, peer).await;
        self.metrics.count_webhook(event, outcome.result);
        let mut response = outcome
            .response
            .unwrap_or_else(|e| e.into_response_as(true));
        if response.status() == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }

    /// Returns the event type label and the outcome.
    async fn receive(
        &self,
        req: Request<Incoming>,
        client: ClientIp,
        peer: IpAddr,
    ) -> (&'static str, Outcome) {
        let fail = |e: GatewayError, result| Outcome {
            response: Err(e),
            result,
        };
        if req.method() != Method::POST {
            return (
                "other",
                fail(GatewayError::MethodNotAllowed, "method_not_allowed"),
            );
        }
        let (parts, body) = req.into_parts();
        let body = match crate::body::read_small(&parts.headers, body, MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(e) => return ("other", fail(e, "bad_body")),
        };
        let now = unix_now();
        if let Err(e) =
            signature::verify(&parts.headers, &body, &self.secrets, now, self.tolerance_s)
        {
            // The reason only: never the signature, the secret or the body.
            tracing::warn!(reason = %e, client_ip = %client.ip, "webhook delivery refused");
            let result = SignatureError::label(e);
            return ("other", fail(GatewayError::WebhookUnauthorized, result));
        }
        let event_type = event_type(&body);
        let label = EVENT_TYPES
            .iter()
            .copied()
            .find(|t| Some(*t) == event_type.as_deref())
            .unwrap_or("other");
        let id = parts
            .headers
            .get(DELIVERY_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_ID_LEN)
            .map(str::to_string);
        if let Some(id) = &id {
            match self.seen.first_use(id, now + self.tolerance_s, now).await {
                Ok(true) => {}
                Ok(false) => return (label, ok("duplicate")),
                // A store that cannot answer must not lose events: forward (the app may
                // then see a duplicate, which it can recognise by X-Hook0-Id).
                Err(e) => {
                    tracing::warn!(error = %e, "webhook replay store unavailable: forwarding without the duplicate check")
                }
            }
        }
        let outcome = self
            .forward(&parts.headers, body, event_type.as_deref(), client, peer)
            .await;
        if outcome.response.is_err() {
            if let Some(id) = &id {
                if let Err(e) = self.seen.forget(id).await {
                    tracing::warn!(error = %e, "webhook replay store: could not forget a delivery the app refused");
                }
            }
        }
        (label, outcome)
    }

    async fn forward(
        &self,
        delivery: &HeaderMap,
        body: Bytes,
        event_type: Option<&str>,
        client: ClientIp,
        peer: IpAddr,
    ) -> Outcome {
        let mut req = Request::new(UpstreamBody::full(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.forward_uri.clone();
        let mut headers =
            crate::forwarding::delivery_headers(delivery, client, peer, &self.fallback_host);
        let event = event_type
            .and_then(|t| HeaderValue::from_str(t).ok())
            .unwrap_or_else(|| HeaderValue::from_static("unknown"));
        headers.insert(X_ONRAMP_GATEWAY_EVENT, event);
        *req.headers_mut() = headers;
        let answer = tokio::time::timeout(self.timeout, self.client.request(req)).await;
        let status = match answer {
            Ok(Ok(r)) => r.status(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "webhook: the app is unreachable");
                return Outcome {
                    response: Err(GatewayError::UpstreamUnavailable),
                    result: "app_unreachable",
                };
            }
            Err(_) => {
                tracing::warn!("webhook: the app did not answer in time");
                return Outcome {
                    response: Err(GatewayError::UpstreamTimeout),
                    result: "app_unreachable",
                };
            }
        };
        if status.is_success() {
            ok("forwarded")
        } else {
            tracing::warn!(
                status = status.as_u16(),
                "webhook: the app refused the delivery; Coinbase will retry"
            );
            Outcome {
                response: Err(GatewayError::UpstreamUnavailable),
                result: "app_error",
            }
        }
    }
}

fn ok(result: &'static str) -> Outcome {
    let mut r = Response::new(full(Bytes::from_static(b"{\"received\":true}")));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Outcome {
        response: Ok(r),
        result,
    }
}

/// `eventType` of a JSON payload, if it is a plain token (it goes into a header).
fn event_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Payload {
        #[serde(rename = "eventType")]
        event_type: Option<String>,
    }
    serde_json::from_slice::<Payload>(body)
        .ok()?
        .event_type
        .filter(|t| {
            (1..=128).contains(&t.len())
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_tokens_or_nothing() {
        assert_eq!(
            event_type(br#"{"eventType":"onramp.transaction.success","x":1}"#).as_deref(),
            Some("onramp.transaction.success")
        );
        assert_eq!(event_type(br#"{"eventType":"a\r\nb"}"#), None);
        assert_eq!(event_type(b"not json"), None);
        assert_eq!(event_type(br#"{"eventType":5}"#), None);
    }
}
