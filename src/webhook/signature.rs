//! The `X-Hook0-Signature` check, exactly as Coinbase documents it (cdp-v2 notes §4):
//!
//! `X-Hook0-Signature: t=<unix seconds>,h=<space-separated lower-case header names>,v1=<hex>`,
//! `v1 = hex(HMAC-SHA256(secret, t + "." + h + "." + <values of the headers named in h,
//! joined with ".">  + "." + <raw body>))`, compared in constant time, `|now - t| <=
//! tolerance`. Several secrets may be configured (rotation): any one verifying is enough.
//!
//! Where the docs are loose, this is strict: a header named in `h` that is missing (or
//! sent twice) refuses the delivery (the docs' sample code signs `""` for it, which would
//! let a forwarder drop a signed header unnoticed); the legacy `v0` (timestamp + body
//! only) is not accepted, because it does not bind the headers.

use std::fmt;

use aws_lc_rs::hmac;
use http::header::{HeaderMap, HeaderName};

/// The header Coinbase (Hook0) signs deliveries with.
pub const SIGNATURE_HEADER: &str = "x-hook0-signature";
/// At most this many signed header names (Coinbase signs two or three).
const MAX_SIGNED_HEADERS: usize = 32;
/// A longer signature header is not Coinbase's.
const MAX_HEADER_LEN: usize = 4096;

/// The subscription secrets, read once at start-up. Never printed.
pub struct WebhookSecrets(Vec<hmac::Key>);

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecrets(<{} redacted>)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretsError {
    #[error("webhooks.path is set, so the subscription secret(s) must be in the environment variable {0} (comma-separated for rotation); it is not set or empty")]
    Unset(String),
}

impl WebhookSecrets {
    /// Reads `name` (`webhooks.secrets_env`): comma-separated secrets, blanks ignored.
    pub fn from_env(name: &str) -> Result<Self, SecretsError> {
        let value = std::env::var(name).unwrap_or_default();
        Self::parse(&value).ok_or_else(|| SecretsError::Unset(name.to_string()))
    }

    /// `None` when the list holds no secret.
    pub fn parse(list: &str) -> Option<Self> {
        let keys: Vec<hmac::Key> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            // The secret string's UTF-8 bytes are the key, as-is (Coinbase: a UUID).
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes()))
            .collect();
        (!keys.is_empty()).then_some(Self(keys))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a delivery was refused (all answered `401`; the reason is logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-Hook0-Signature header")]
    Missing,
    #[error("X-Hook0-Signature is malformed")]
    Malformed,
    #[error("a header named in h is missing or repeated")]
    SignedHeaderMissing,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no configured secret verifies the signature")]
    Mismatch,
}

impl SignatureError {
    /// Metric label (`result`).
    pub fn label(self) -> &'static str {
        match self {
            SignatureError::Missing | SignatureError::Malformed => "malformed",
            SignatureError::SignedHeaderMissing => "signed_header_missing",
            SignatureError::Stale => "stale",
            SignatureError::Mismatch => "invalid_signature",
        }
    }
}

/// The parsed header: `t`, `h` as sent, and every `v1` given (raw tags).
#[derive(Debug, PartialEq, Eq)]
struct Parsed<'a> {
    t: u64,
    t_text: &'a str,
    h: &'a str,
    v1: Vec<Vec<u8>>,
}

fn parse(value: &str) -> Result<Parsed<'_>, SignatureError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(SignatureError::Malformed);
    }
    let (mut t, mut h, mut v1) = (None, None, Vec::new());
    for part in value.split(',') {
        let Some((name, v)) = part.trim().split_once('=') else {
            continue;
        };
        match name.trim() {
            "t" if t.is_none() => t = Some(v),
            "h" if h.is_none() => h = Some(v),
            "v1" => v1.push(decode_hex(v.trim()).ok_or(SignatureError::Malformed)?),
            // A repeated t or h is ambiguous: which one was signed?
            "t" | "h" => return Err(SignatureError::Malformed),
            _ => {}
        }
    }
    let (Some(t_text), Some(h)) = (t, h) else {
        return Err(SignatureError::Malformed);
    };
    if v1.is_empty() || t_text.is_empty() || t_text.len() > 12 {
        return Err(SignatureError::Malformed);
    }
    let t = t_text
        .parse::<u64>()
        .map_err(|_| SignatureError::Malformed)?;
    Ok(Parsed { t, t_text, h, v1 })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    // An HMAC-SHA256 tag: 32 bytes.
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The signed message: `t.h.<header values joined by '.'>.<body>`.
fn signed_message(
    p: &Parsed<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<u8>, SignatureError> {
    let mut msg = Vec::with_capacity(body.len() + 256);
    msg.extend_from_slice(p.t_text.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(p.h.as_bytes());
    msg.push(b'.');
    let names: Vec<&str> = p.h.split(' ').filter(|n| !n.is_empty()).collect();
    if names.len() > MAX_SIGNED_HEADERS {
        return Err(SignatureError::Malformed);
    }
    for (i, name) in names.iter().enumerate() {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| SignatureError::Malformed)?;
        let mut values = headers.get_all(&name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(SignatureError::SignedHeaderMissing);
        };
        if i > 0 {
            msg.push(b'.');
        }
        msg.extend_from_slice(value.as_bytes());
    }
    msg.push(b'.');
    msg.extend_from_slice(body);
    Ok(msg)
}

/// Verifies a delivery: `headers` as received, the raw `body`, `now` in Unix seconds.
/// `Ok(t)` is the signed timestamp.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &WebhookSecrets,
    now: u64,
    tolerance_s: u64,
) -> Result<u64, SignatureError> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(SignatureError::Missing),
        (Some(v), None) => v.to_str().map_err(|_| SignatureError::Malformed)?,
        (Some(_), Some(_)) => return Err(SignatureError::Malformed),
    };
    let parsed = parse(value)?;
    // Past and future alike: a clock far ahead is as suspicious as a replay.
    if parsed.t.abs_diff(now) > tolerance_s {
        return Err(SignatureError::Stale);
    }
    let msg = signed_message(&parsed, headers, body)?;
    let ok = secrets.0.iter().any(|key| {
        parsed
            .v1
            .iter()
            .any(|tag| hmac::verify(key, &msg, tag).is_ok())
    });
    if ok {
        Ok(parsed.t)
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn sign(secret: &str, t: &str, h: &str, values: &[&str], body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut msg = format!("{t}.{h}.{}.", values.join(".")).into_bytes();
        msg.extend_from_slice(body);
        let tag = hmac::sign(&key, &msg);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn delivery(sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-hook0-id", HeaderValue::from_static("evt-1"));
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(sig).unwrap());
        h
    }

    const BODY: &[u8] = br#"{"eventType":"onramp.transaction.success"}"#;

    #[test]
    fn documented_recipe_verifies_and_rotation_works() {
        let secrets = WebhookSecrets::parse(" old-secret , new-secret ,").unwrap();
        assert_eq!(secrets.len(), 2);
        for s in ["old-secret", "new-secret"] {
            let v1 = sign(
                s,
                "1000",
                "content-type x-hook0-id",
                &["application/json", "evt-1"],
                BODY,
            );
            let h = delivery(&format!("t=1000,h=content-type x-hook0-id,v1={v1}"));
            assert_eq!(verify(&h, BODY, &secrets, 1000, 300), Ok(1000));
        }
        let v1 = sign(
            "other",
            "1000",
            "content-type x-hook0-id",
            &["application/json", "evt-1"],
            BODY,
        );
        let h = delivery(&format!("t=1000,h=content-type x-hook0-id,v1={v1}"));
        assert_eq!(
            verify(&h, BODY, &secrets, 1000, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refusals() {
        let secrets = WebhookSecrets::parse("s").unwrap();
        let v1 = sign(
            "s",
            "1000",
            "content-type x-hook0-id",
            &["application/json", "evt-1"],
            BODY,
        );
        let good = format!("t=1000,h=content-type x-hook0-id,v1={v1}");
        let h = delivery(&good);
        assert_eq!(verify(&h, BODY, &secrets, 1300, 300), Ok(1000));
        assert_eq!(
            verify(&h, BODY, &secrets, 1301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&h, BODY, &secrets, 699, 300),
            Err(SignatureError::Stale)
        );
        let mut altered = BODY.to_vec();
        altered[3] ^= 1;
        assert_eq!(
            verify(&h, &altered, &secrets, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        let mut missing = h.clone();
        missing.remove("x-hook0-id");
        assert_eq!(
            verify(&missing, BODY, &secrets, 1000, 300),
            Err(SignatureError::SignedHeaderMissing)
        );
        let mut twice = h.clone();
        twice.append("x-hook0-id", HeaderValue::from_static("evt-2"));
        assert_eq!(
            verify(&twice, BODY, &secrets, 1000, 300),
            Err(SignatureError::SignedHeaderMissing)
        );
        assert_eq!(
            verify(&HeaderMap::new(), BODY, &secrets, 1000, 300),
            Err(SignatureError::Missing)
        );
        for bad in [
            "t=1000,h=content-type".to_string(),
            format!("h=content-type,v1={v1}"),
            format!("t=abc,h=content-type,v1={v1}"),
            "t=1000,h=content-type,v1=zz".to_string(),
            format!("t=1000,t=1001,h=content-type x-hook0-id,v1={v1}"),
            format!("t=1000,h=bad(name,v1={v1}"),
        ] {
            let h = delivery(&bad);
            assert_eq!(
                verify(&h, BODY, &secrets, 1000, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        assert!(WebhookSecrets::parse(" , ").is_none());
        assert_eq!(
            format!("{:?}", WebhookSecrets::parse("topsecret").unwrap()),
            "WebhookSecrets(<1 redacted>)"
        );
    }
}
