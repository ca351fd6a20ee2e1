//! Coinbase Developer Platform: API key loading, JWT bearer auth, the one CDP client, and
//! the one mapping of CDP failures to client-facing errors.

pub mod client;
pub mod jwt;
pub mod key;

use client::CdpError;

use crate::error::GatewayError;

/// How a CDP `4xx` other than `429` reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejections {
    /// `502`: the v1 token API's refusals are the gateway's problem (SPEC: "other CDP 4xx:
    /// 502"), the message goes to the log only.
    Hidden,
    /// v2 sessions and the `[api]` read endpoints: a `400` is the client's input (amount,
    /// network, address), passed on as `400` with `errorType`/`errorMessage`; `401`,
    /// `403`, `404` and the rest are the gateway's configuration: `502`.
    BadRequestPassedOn,
}

/// Logs a failed CDP call (status, message, v2 `correlationId`; never the JWT) and maps
/// it to the client-facing error. `what` names the call in the log.
pub fn failure(e: CdpError, what: &'static str, rejections: Rejections) -> GatewayError {
    match &e {
        CdpError::Rejected {
            status,
            message,
            error_type,
            correlation_id,
        } => tracing::warn!(
            call = what,
            cdp_status = status,
            cdp_message = %message,
            cdp_error_type = error_type.as_deref().unwrap_or(""),
            correlation_id = correlation_id.as_deref().unwrap_or(""),
            "CDP API refused the request"
        ),
        other => {
            tracing::warn!(call = what, error = %other, kind = other.kind(), "CDP request failed")
        }
    }
    match e {
        CdpError::Timeout(_) => GatewayError::CdpTimeout,
        CdpError::Busy { .. } => GatewayError::CdpBusy,
        CdpError::RateLimited { retry_after } => GatewayError::CdpRateLimited { retry_after },
        CdpError::Rejected {
            status: 400,
            message,
            error_type,
            ..
        } if rejections == Rejections::BadRequestPassedOn => GatewayError::CdpInvalidRequest {
            error_type: error_type.unwrap_or_else(|| "invalid_request".into()),
            message,
        },
        CdpError::Rejected { .. } => GatewayError::CdpRejected,
        CdpError::Unreachable(_)
        | CdpError::ServerError { .. }
        | CdpError::BadResponse(_)
        | CdpError::Jwt(_) => GatewayError::CdpUnavailable,
    }
}
