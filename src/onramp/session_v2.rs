//! `onramp.api = "v2"`: Coinbase's Create Onramp Session API
//! (`POST {platform_base}/v2/onramp/sessions`), which returns a ready one-click-buy URL
//! and, given payment method and country, a quote.
//!
//! [`session_body`] maps a validated [`MintRequest`] (plus the three v2-only parameters
//! `paymentMethod`, `country`, `subdivision`) onto the request schema; [`parse_session`]
//! checks the answer before the browser is sent anywhere: the URL must be
//! `https://pay.coinbase.com/...` (or the sandbox host with `onramp.sandbox`), so a
//! compromised or misconfigured `platform_base` can never turn the gateway into an open
//! redirect.

use serde_json::{json, Map, Value};
use url::Url;

use super::request::MintRequest;

pub const PAY_HOST: &str = "pay.coinbase.com";
pub const PAY_SANDBOX_HOST: &str = "pay-sandbox.coinbase.com";
/// The path under `cdp.platform_base` (which ends in `/`).
pub const SESSIONS_PATH: &str = "v2/onramp/sessions";

/// The v2-only request parameters (not presets: they never go into a v1 Location).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V2Params {
    pub payment_method: Option<String>,
    pub country: Option<String>,
    pub subdivision: Option<String>,
}

impl V2Params {
    /// Reads and checks `paymentMethod` (`CARD`, `ACH`, `APPLE_PAY`, …: upper-case
    /// tokens), `country` (ISO 3166-1 alpha-2) and `subdivision` (e.g. `NY`) from
    /// name/value pairs. Errors name the field.
    pub fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut out = V2Params::default();
        for (name, value) in pairs {
            let slot = match name {
                "paymentMethod" => &mut out.payment_method,
                "country" => &mut out.country,
                "subdivision" => &mut out.subdivision,
                _ => continue,
            };
            if value.is_empty() {
                continue;
            }
            if slot.is_some() {
                return Err(format!("{name}: given more than once"));
            }
            let ok = match name {
                "paymentMethod" => {
                    value.len() <= 32 && value.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                }
                "country" => value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase()),
                _ => {
                    (1..=8).contains(&value.len())
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
                }
            };
            if !ok {
                return Err(format!("{name}: invalid value"));
            }
            *slot = Some(value.to_string());
        }
        Ok(out)
    }
}

fn preset<'a>(req: &'a MintRequest, name: &str) -> Option<&'a str> {
    req.presets
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The session request body. `random_hex` supplies the 16 hex characters of a sandbox
/// `partnerUserRef` when the request has none. Errors are `"field: reason"` (400).
pub fn session_body(
    req: &MintRequest,
    v2: &V2Params,
    client_ip: &str,
    sandbox: bool,
    random_hex: impl FnOnce() -> String,
) -> Result<Value, String> {
    let first = req
        .addresses
        .first()
        .ok_or_else(|| "addresses: at least one address is required".to_string())?;
    let network = first
        .blockchains
        .first()
        .ok_or_else(|| "blockchains: at least one blockchain is required".to_string())?;
    let purchase_currency = preset(req, "defaultAsset")
        .or(req.assets.first().map(String::as_str))
        .ok_or_else(|| {
            "defaultAsset: required with onramp.api = \"v2\" (or assets, or onramp.assets)"
                .to_string()
        })?;
    let mut body = Map::new();
    body.insert("destinationAddress".into(), json!(first.address));
    body.insert("destinationNetwork".into(), json!(network));
    body.insert("purchaseCurrency".into(), json!(purchase_currency));
    match (
        preset(req, "presetFiatAmount"),
        preset(req, "presetCryptoAmount"),
    ) {
        (Some(_), Some(_)) => {
            return Err(
                "presetCryptoAmount: give presetFiatAmount or presetCryptoAmount, not both".into(),
            )
        }
        (Some(fiat), None) => {
            body.insert("paymentAmount".into(), json!(fiat));
        }
        (None, Some(crypto)) => {
            body.insert("purchaseAmount".into(), json!(crypto));
        }
        (None, None) => {}
    }
    if let Some(c) = preset(req, "fiatCurrency") {
        body.insert("paymentCurrency".into(), json!(c));
    }
    if let Some(m) = v2
        .payment_method
        .as_deref()
        .or(preset(req, "defaultPaymentMethod"))
    {
        body.insert("paymentMethod".into(), json!(m));
    }
    if let Some(c) = &v2.country {
        body.insert("country".into(), json!(c));
    }
    if let Some(s) = &v2.subdivision {
        body.insert("subdivision".into(), json!(s));
    }
    if let Some(r) = preset(req, "redirectUrl") {
        body.insert("redirectUrl".into(), json!(r));
    }
    let partner = match (preset(req, "partnerUserRef"), sandbox) {
        (Some(r), true) if r.starts_with("sandbox-") => Some(r.to_string()),
        (Some(r), true) => Some(format!("sandbox-{r}")),
        (Some(r), false) => Some(r.to_string()),
        (None, true) => Some(format!("sandbox-{}", random_hex())),
        (None, false) => None,
    };
    if let Some(p) = partner {
        body.insert("partnerUserRef".into(), json!(p));
    }
    body.insert("clientIp".into(), json!(client_ip));
    Ok(Value::Object(body))
}

/// A checked session answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Where the browser goes: Coinbase's own host (sandbox host with `sandbox`).
    pub url: Url,
    /// The `sessionToken` in that URL, if any (for the JSON answer).
    pub session_token: Option<String>,
    pub quote: Option<Value>,
}

/// Whether `u` is Coinbase's payment host (`https://pay.coinbase.com`, or the sandbox
/// host with `sandbox`), with no port and no userinfo: the one check before any URL from
/// a CDP answer is handed to a browser (redirect, quote `onrampUrl`, order payment link).
pub fn is_coinbase_pay_url(u: &Url, sandbox: bool) -> bool {
    let host = u.host_str().unwrap_or_default();
    u.scheme() == "https"
        && u.port().is_none()
        && u.username().is_empty()
        && u.password().is_none()
        && (host == PAY_HOST || (sandbox && host == PAY_SANDBOX_HOST))
}

/// Checks `{session:{onrampUrl}, quote?}`. With `sandbox`, a `pay.coinbase.com` URL is
/// rewritten to `pay-sandbox.coinbase.com`. Anything else is an error (`502`).
pub fn parse_session(answer: &Value, sandbox: bool) -> Result<Session, String> {
    let raw = answer
        .get("session")
        .and_then(|s| s.get("onrampUrl"))
        .and_then(Value::as_str)
        .ok_or("no session.onrampUrl in the answer")?;
    let mut url = Url::parse(raw).map_err(|_| "session.onrampUrl is not a URL")?;
    let host = url.host_str().unwrap_or_default().to_string();
    if !is_coinbase_pay_url(&url, sandbox) {
        return Err(format!(
            "session.onrampUrl points to {}://{host}, not https://{}",
            url.scheme(),
            if sandbox { PAY_SANDBOX_HOST } else { PAY_HOST }
        ));
    }
    if sandbox && host == PAY_HOST {
        url.set_host(Some(PAY_SANDBOX_HOST))
            .map_err(|_| "cannot rewrite the sandbox host")?;
    }
    if url.as_str().contains(['\r', '\n']) || url.as_str().len() > 8192 {
        return Err("session.onrampUrl has an unexpected form".into());
    }
    let session_token = url
        .query_pairs()
        .find(|(k, _)| k == "sessionToken")
        .map(|(_, v)| v.into_owned());
    Ok(Session {
        url,
        session_token,
        quote: answer.get("quote").filter(|q| q.is_object()).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onramp::request::AddressEntry;

    fn request(presets: &[(&str, &str)]) -> MintRequest {
        MintRequest {
            addresses: vec![AddressEntry {
                address: "0xabc".into(),
                blockchains: vec!["base".into(), "ethereum".into()],
            }],
            assets: vec!["ETH".into()],
            presets: presets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn maps_presets_onto_the_session_schema() {
        let req = request(&[
            ("defaultAsset", "USDC"),
            ("presetFiatAmount", "100"),
            ("fiatCurrency", "USD"),
            ("defaultPaymentMethod", "CARD"),
            ("redirectUrl", "https://app.example/done"),
            ("partnerUserRef", "u1"),
        ]);
        let v2 = V2Params {
            payment_method: Some("APPLE_PAY".into()),
            country: Some("US".into()),
            subdivision: Some("NY".into()),
        };
        let body = session_body(&req, &v2, "203.0.113.9", false, || unreachable!()).unwrap();
        assert_eq!(
            body,
            json!({
                "destinationAddress": "0xabc", "destinationNetwork": "base",
                "purchaseCurrency": "USDC", "paymentAmount": "100", "paymentCurrency": "USD",
                "paymentMethod": "APPLE_PAY", "country": "US", "subdivision": "NY",
                "redirectUrl": "https://app.example/done", "partnerUserRef": "u1",
                "clientIp": "203.0.113.9",
            })
        );
        // defaultPaymentMethod when paymentMethod is absent; first asset when no defaultAsset.
        let body = session_body(
            &request(&[
                ("defaultPaymentMethod", "CARD"),
                ("presetCryptoAmount", "0.1"),
            ]),
            &V2Params::default(),
            "203.0.113.9",
            false,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(body["paymentMethod"], "CARD");
        assert_eq!(body["purchaseCurrency"], "ETH");
        assert_eq!(body["purchaseAmount"], "0.1");
    }

    #[test]
    fn refusals_name_the_field() {
        let both = request(&[("presetFiatAmount", "1"), ("presetCryptoAmount", "1")]);
        let e =
            session_body(&both, &V2Params::default(), "1.2.3.4", false, String::new).unwrap_err();
        assert!(e.starts_with("presetCryptoAmount"), "{e}");
        let mut none = request(&[]);
        none.assets.clear();
        let e =
            session_body(&none, &V2Params::default(), "1.2.3.4", false, String::new).unwrap_err();
        assert!(e.starts_with("defaultAsset"), "{e}");
        let pairs = [("country", "usa")];
        assert!(V2Params::from_pairs(pairs.iter().copied())
            .unwrap_err()
            .starts_with("country"));
        let pairs = [("paymentMethod", "card\r\n")];
        assert!(V2Params::from_pairs(pairs.iter().copied()).is_err());
        let pairs = [("country", "US"), ("country", "CA")];
        assert!(V2Params::from_pairs(pairs.iter().copied()).is_err());
    }

    #[test]
    fn sandbox_prefixes_partner_user_ref() {
        let b = session_body(
            &request(&[("partnerUserRef", "u1")]),
            &V2Params::default(),
            "1.2.3.4",
            true,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(b["partnerUserRef"], "sandbox-u1");
        let b = session_body(&request(&[]), &V2Params::default(), "1.2.3.4", true, || {
            "0123456789abcdef".into()
        })
        .unwrap();
        assert_eq!(b["partnerUserRef"], "sandbox-0123456789abcdef");
    }

    #[test]
    fn only_coinbase_hosts_are_followed() {
        let answer =
            |u: &str| json!({"session": {"onrampUrl": u}, "quote": {"paymentTotal": "101"}});
        let s = parse_session(
            &answer("https://pay.coinbase.com/buy?sessionToken=abc"),
            false,
        )
        .unwrap();
        assert_eq!(s.session_token.as_deref(), Some("abc"));
        assert_eq!(s.quote.unwrap()["paymentTotal"], "101");
        let s = parse_session(
            &answer("https://pay.coinbase.com/buy?sessionToken=abc"),
            true,
        )
        .unwrap();
        assert_eq!(s.url.host_str(), Some(PAY_SANDBOX_HOST));
        assert!(parse_session(&answer("https://pay-sandbox.coinbase.com/buy"), true).is_ok());
        for bad in [
            "https://pay-sandbox.coinbase.com/buy",
            "https://evil.example/buy",
            "http://pay.coinbase.com/buy",
            "https://pay.coinbase.com.evil.net/buy",
            "https://pay.coinbase.com:8443/buy",
            "https://user@pay.coinbase.com/buy",
            "javascript:alert(1)",
        ] {
            assert!(parse_session(&answer(bad), false).is_err(), "{bad}");
        }
        assert!(parse_session(&json!({"session": {}}), false).is_err());
    }
}
