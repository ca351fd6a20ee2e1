//! Cross-site refusal for the minting routes (and the JSON API routes).
//!
//! A link, `<img>` or auto-submitted form on *another* website is a top-level or
//! no-cors request that carries no `Origin` (GET) or a foreign one the CORS gate would
//! catch only for fetch/XHR. Browsers label every request with `Sec-Fetch-Site`
//! (Fetch Metadata, all current engines), which the page cannot forge: a request whose
//! value is not in `onramp.allowed_fetch_sites` is refused before it costs anything —
//! no rate-limit slot (so embeds cannot spend the visitor's budget either), no app call,
//! no CDP call. Older browsers without Fetch Metadata are judged by `Referer` instead;
//! a request with neither (curl, server-to-server) is not a browser being steered by
//! another site and is allowed. An `Origin` listed in `cors.allowed_origins` is the
//! operator's explicit trust in that site and passes.

use http::header::{HeaderMap, HeaderName, ORIGIN, REFERER};

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// A `Sec-Fetch-Site` value (Fetch Metadata Request Headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSite {
    SameOrigin,
    SameSite,
    CrossSite,
    /// User-initiated: typed URL, bookmark, a link opened from outside any page.
    None,
}

impl FetchSite {
    /// The exact lowercase token (headers and config alike).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "same-origin" => Some(FetchSite::SameOrigin),
            "same-site" => Some(FetchSite::SameSite),
            "cross-site" => Some(FetchSite::CrossSite),
            "none" => Some(FetchSite::None),
            _ => None,
        }
    }
}

/// Why a request was refused; the `reason` label of `onramp_gateway_mint_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossSite {
    /// `Sec-Fetch-Site` outside the allowed list (or not a known value).
    FetchSite,
    /// No `Sec-Fetch-Site`, and a `Referer` from a foreign (or unparsable) origin.
    Referer,
}

impl CrossSite {
    pub fn reason(self) -> &'static str {
        match self {
            CrossSite::FetchSite => "fetch_site",
            CrossSite::Referer => "referer",
        }
    }
}

/// `onramp.allowed_fetch_sites` + `cors.allowed_origins`, parsed once.
#[derive(Debug, Clone)]
pub struct CrossSitePolicy {
    allowed: Vec<FetchSite>,
    cors_origins: Vec<String>,
}

impl CrossSitePolicy {
    /// Unknown values in `allowed_fetch_sites` are dropped here; config validation has
    /// already refused them.
    pub fn new(allowed_fetch_sites: &[String], cors_origins: &[String]) -> Self {
        Self {
            allowed: allowed_fetch_sites
                .iter()
                .filter_map(|s| FetchSite::parse(s))
                .collect(),
            cors_origins: cors_origins.to_vec(),
        }
    }

    /// Decides for one request. `own_origin` is the gateway's own origin as the client
    /// addressed it (`https://` + `Host`/`:authority`), when known.
    pub fn check(&self, headers: &HeaderMap, own_origin: Option<&str>) -> Result<(), CrossSite> {
        let listed = |origin: &str| self.cors_origins.iter().any(|o| o == origin);
        if let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) {
            if listed(origin) {
                return Ok(());
            }
        }
        let mut sites = headers.get_all(&SEC_FETCH_SITE).iter();
        if let Some(site) = sites.next() {
            // One value, known, and allowed. Two values would be a forged header (a
            // browser sends exactly one), so they are refused too.
            let ok = sites.next().is_none()
                && site
                    .to_str()
                    .ok()
                    .and_then(FetchSite::parse)
                    .is_some_and(|s| self.allowed.contains(&s));
            return if ok {
                Ok(())
            } else {
                Err(CrossSite::FetchSite)
            };
        }
        let Some(referer) = headers.get(REFERER) else {
            return Ok(());
        };
        let referer_origin = referer
            .to_str()
            .ok()
            .and_then(|r| url::Url::parse(r).ok())
            .map(|u| u.origin().ascii_serialization());
        match referer_origin {
            Some(o) if listed(&o) => Ok(()),
            Some(o) if own_origin.is_some_and(|own| own.eq_ignore_ascii_case(&o)) => Ok(()),
            _ => Err(CrossSite::Referer),
        }
    }
}

/// The gateway's own origin for a request: `https://` + `Host` (HTTP/1.1) or
/// `:authority` (HTTP/2).
pub fn own_origin<B>(req: &http::Request<B>) -> Option<String> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(|host| format!("https://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy(sites: &[&str]) -> CrossSitePolicy {
        let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        CrossSitePolicy::new(&sites, &["https://partner.example".to_string()])
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const OWN: Option<&str> = Some("https://gw.example:8443");

    #[test]
    fn fetch_metadata_decides_when_present() {
        let p = policy(&["same-origin", "none"]);
        assert_eq!(
            p.check(&headers(&[("sec-fetch-site", "same-origin")]), OWN),
            Ok(())
        );
        assert_eq!(
            p.check(&headers(&[("sec-fetch-site", "none")]), OWN),
            Ok(())
        );
        for bad in ["cross-site", "same-site", "SAME-ORIGIN", "", "bogus"] {
            assert_eq!(
                p.check(&headers(&[("sec-fetch-site", bad)]), OWN),
                Err(CrossSite::FetchSite),
                "{bad:?}"
            );
        }
        // A same-origin Referer does not rescue a cross-site fetch.
        assert_eq!(
            p.check(
                &headers(&[
                    ("sec-fetch-site", "cross-site"),
                    ("referer", "https://gw.example:8443/")
                ]),
                OWN
            ),
            Err(CrossSite::FetchSite)
        );
        // Two values: forged.
        assert_eq!(
            p.check(
                &headers(&[("sec-fetch-site", "none"), ("sec-fetch-site", "none")]),
                OWN
            ),
            Err(CrossSite::FetchSite)
        );
        let sibling = policy(&["same-origin", "same-site", "none"]);
        assert_eq!(
            sibling.check(&headers(&[("sec-fetch-site", "same-site")]), OWN),
            Ok(())
        );
    }

    #[test]
    fn listed_cors_origin_passes() {
        let p = policy(&["same-origin"]);
        let h = headers(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://partner.example"),
        ]);
        assert_eq!(p.check(&h, OWN), Ok(()));
        let h = headers(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(p.check(&h, OWN), Err(CrossSite::FetchSite));
    }

    #[test]
    fn referer_is_the_fallback() {
        let p = policy(&["same-origin", "none"]);
        assert_eq!(p.check(&HeaderMap::new(), OWN), Ok(()));
        assert_eq!(
            p.check(
                &headers(&[("referer", "https://gw.example:8443/shop?x=1")]),
                OWN
            ),
            Ok(())
        );
        assert_eq!(
            p.check(
                &headers(&[("referer", "https://partner.example/page")]),
                OWN
            ),
            Ok(())
        );
        for bad in [
            "https://evil.example/",
            "http://gw.example:8443/",
            "https://gw.example:8443.evil.net/",
            "not a url",
        ] {
            assert_eq!(
                p.check(&headers(&[("referer", bad)]), OWN),
                Err(CrossSite::Referer),
                "{bad}"
            );
        }
        assert_eq!(
            p.check(&headers(&[("referer", "https://gw.example:8443/")]), None),
            Err(CrossSite::Referer)
        );
    }

    #[test]
    fn own_origin_from_host_or_authority() {
        let r = http::Request::builder()
            .uri("/onramp")
            .header("host", "gw.example:8443")
            .body(())
            .unwrap();
        assert_eq!(own_origin(&r).as_deref(), Some("https://gw.example:8443"));
        let r = http::Request::builder()
            .uri("https://gw.example/onramp")
            .body(())
            .unwrap();
        assert_eq!(own_origin(&r).as_deref(), Some("https://gw.example"));
    }
}
