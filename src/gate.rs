//! The gate in front of the gateway's own routes (minting routes and `[api]`): cross-site
//! refusal ([`crate::fetch_site`]) then the CORS origin rules, with the response headers
//! that go with them. Both route families call this one gate, so a rule change here
//! holds for every route the gateway answers itself.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{full, ResponseBody};
use crate::config::Settings;
use crate::error::GatewayError;
use crate::fetch_site::{self, CrossSitePolicy};
use crate::metrics::Metrics;

pub struct Gate {
    cross_site: CrossSitePolicy,
    allowed_origins: Vec<String>,
}

/// What the gate decided for a request that may go on.
pub enum Pass {
    /// A CORS preflight from a listed origin: answer this and stop.
    Preflight(Response<ResponseBody>, OriginDecision),
    /// Serve it; `origin` decides the CORS response headers.
    Serve(OriginDecision),
}

impl Gate {
    pub fn new(settings: &Settings) -> Self {
        Self {
            cross_site: CrossSitePolicy::new(
                &settings.config.onramp.allowed_fetch_sites,
                &settings.config.cors.allowed_origins,
            ),
            allowed_origins: settings.config.cors.allowed_origins.clone(),
        }
    }

    /// Cross-site refusal, then the origin gate, then the preflight: all before any
    /// rate-limit slot, app call or CDP call. Refusals are counted in
    /// `onramp_gateway_mint_refused_total{reason}`.
    pub fn admit<B>(
        &self,
        req: &Request<B>,
        metrics: &Metrics,
    ) -> Result<Pass, (GatewayError, OriginDecision)> {
        let own_origin = fetch_site::own_origin(req);
        let origin = decide_origin(req.headers(), own_origin.as_deref(), &self.allowed_origins);
        if let Err(refusal) = self.cross_site.check(req.headers(), own_origin.as_deref()) {
            metrics.count_mint_refused(refusal.reason());
            return Err((GatewayError::CrossSiteRefused, origin));
        }
        if matches!(origin, OriginDecision::Denied) {
            metrics.count_mint_refused("origin");
            return Err((GatewayError::OriginNotAllowed, origin));
        }
        if req.method() == Method::OPTIONS {
            return match preflight(&origin) {
                Ok(r) => Ok(Pass::Preflight(r, origin)),
                Err(e) => Err((e, origin)),
            };
        }
        Ok(Pass::Serve(origin))
    }

    /// The headers every answer of these routes carries: `Vary: Origin`, the given
    /// `Cache-Control`, `Referrer-Policy: no-referrer`, and the CORS headers for a listed
    /// origin (that exact origin, never `*`).
    pub fn decorate(
        response: &mut Response<ResponseBody>,
        origin: &OriginDecision,
        cache_control: HeaderValue,
    ) {
        let headers = response.headers_mut();
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        headers.insert(header::CACHE_CONTROL, cache_control);
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let OriginDecision::Allowed(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

/// The CORS verdict for a request.
pub enum OriginDecision {
    /// No `Origin` header, or the gateway's own origin: not a cross-origin call.
    SameOrAbsent,
    /// Listed in `cors.allowed_origins`: answer with that exact origin, never `*`.
    Allowed(HeaderValue),
    /// Anything else (including `Origin: null`): `403` before any work.
    Denied,
}

/// `own_origin`: `https://` + the request's Host (see [`fetch_site::own_origin`]).
pub fn decide_origin(
    headers: &HeaderMap,
    own_origin: Option<&str>,
    allowed: &[String],
) -> OriginDecision {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return OriginDecision::SameOrAbsent;
    };
    let Ok(origin_str) = origin.to_str() else {
        return OriginDecision::Denied;
    };
    if allowed.iter().any(|a| a == origin_str) {
        return OriginDecision::Allowed(origin.clone());
    }
    // Same-origin requests (a form on the app's own page, served through this
    // gateway) carry Origin = https://<Host> (or :authority for HTTP/2).
    if own_origin.is_some_and(|own| own.eq_ignore_ascii_case(origin_str)) {
        return OriginDecision::SameOrAbsent;
    }
    OriginDecision::Denied
}

fn preflight(origin: &OriginDecision) -> Result<Response<ResponseBody>, GatewayError> {
    match origin {
        OriginDecision::Allowed(_) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Content-Type, Authorization"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            Ok(r)
        }
        // A preflight without a listed Origin is not a CORS request we serve.
        _ => Err(GatewayError::OriginNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn origin_rules() {
        let allowed = vec!["https://app.example".to_string()];
        let d = |h: &[(&str, &str)], host: Option<&str>, allowed: &[String]| {
            decide_origin(&headers(h), host, allowed)
        };
        assert!(matches!(
            d(&[], None, &allowed),
            OriginDecision::SameOrAbsent
        ));
        assert!(matches!(
            d(&[("origin", "https://app.example")], None, &allowed),
            OriginDecision::Allowed(_)
        ));
        assert!(matches!(
            d(
                &[("origin", "https://app.example.evil.net")],
                None,
                &allowed
            ),
            OriginDecision::Denied
        ));
        assert!(matches!(
            d(&[("origin", "null")], None, &allowed),
            OriginDecision::Denied
        ));
        assert!(matches!(
            d(
                &[("origin", "https://gw.example:8443")],
                Some("https://gw.example:8443"),
                &[]
            ),
            OriginDecision::SameOrAbsent
        ));
        assert!(matches!(
            d(
                &[("origin", "http://gw.example")],
                Some("https://gw.example"),
                &[]
            ),
            OriginDecision::Denied
        ));
    }
}
