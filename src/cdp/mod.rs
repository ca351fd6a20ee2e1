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
    /// Headless orders: as [`BadRequestPassedOn`](Self::BadRequestPassedOn), and the
    /// buyer's own refusals ([`is_buyer_error`]: `guest_*`, `otp_*`) reach the client with
    /// `errorType` kept, as `429` when Coinbase said `429` (a weekly or lifetime limit),
    /// else `400` (e.g. `otp_verification_not_found`, a `404`).
    BuyerPassedOn,
}

/// v2 error types about the buyer rather than the request or the gateway's key.
pub fn is_buyer_error(error_type: &str) -> bool {
    error_type.starts_with("guest_")
        || error_type.starts_with("otp_")
        || error_type == "phone_number_verification_expired"
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
            status,
            message,
            error_type: Some(error_type),
            ..
        } if rejections == Rejections::BuyerPassedOn && is_buyer_error(&error_type) => {
            if status == 429 {
                GatewayError::CdpBuyerLimited {
                    error_type,
                    message,
                }
            } else {
                GatewayError::CdpInvalidRequest {
                    error_type,
                    message,
                }
            }
        }
        CdpError::Rejected {
            status: 400,
            message,
            error_type,
            ..
        } if rejections != Rejections::Hidden => GatewayError::CdpInvalidRequest {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, error_type: &str) -> CdpError {
        CdpError::Rejected {
            status,
            message: "m".into(),
            error_type: Some(error_type.into()),
            correlation_id: None,
        }
    }

    #[test]
    fn buyer_errors_keep_their_type_only_for_orders() {
        let e = failure(
            rejected(429, "guest_transaction_limit"),
            "t",
            Rejections::BuyerPassedOn,
        );
        assert_eq!(e.status(), 429);
        assert!(
            matches!(e, GatewayError::CdpBuyerLimited { ref error_type, .. } if error_type == "guest_transaction_limit")
        );
        let e = failure(
            rejected(404, "otp_verification_not_found"),
            "t",
            Rejections::BuyerPassedOn,
        );
        assert_eq!(e.status(), 400);
        let e = failure(
            rejected(400, "guest_region_forbidden"),
            "t",
            Rejections::BuyerPassedOn,
        );
        assert!(
            matches!(e, GatewayError::CdpInvalidRequest { ref error_type, .. } if error_type == "guest_region_forbidden")
        );
        let e = failure(
            rejected(400, "invalid_request"),
            "t",
            Rejections::BuyerPassedOn,
        );
        assert_eq!(e.status(), 400);
        let e = failure(
            rejected(403, "unauthorized"),
            "t",
            Rejections::BuyerPassedOn,
        );
        assert_eq!(e.status(), 502);
        let e = failure(
            rejected(429, "guest_transaction_limit"),
            "t",
            Rejections::BadRequestPassedOn,
        );
        assert_eq!(e.status(), 502);
        let e = failure(rejected(400, "invalid_request"), "t", Rejections::Hidden);
        assert_eq!(e.status(), 502);
    }
}
