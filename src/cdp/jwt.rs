//! The CDP API bearer JWT, built the way Coinbase's current official SDKs build it
//! (cdp-sdk `typescript/.../auth/utils/jwt.ts`, `python/cdp/auth/utils/jwt.py`, `go/auth/jwt.go`):
//!
//! ```text
//! header: {"typ":"JWT","alg":"ES256"|"EdDSA","kid":<key id>,"nonce":<32 hex chars>}
//! claims: {"sub":<key id>,"iss":"cdp","nbf":now,"iat":now,"exp":now+120,
//!          "uris":["POST api.developer.coinbase.com/onramp/v1/token"]}
//! ```
//!
//! The token is bound to one method + host + path and lives two minutes, so a fresh one is
//! built for every call. The header is `jsonwebtoken::Header` serialized by serde, as
//! `jsonwebtoken::encode` would; the compact JWS is assembled here rather than by `encode` so
//! the signature comes from the key pair parsed once at load (see `key.rs` for the numbers). Differences from individual SDKs, all deliberate: the nonce is hex
//! like TS/Go (Python uses 16 decimal digits); `iat` is sent like TS/Go (Python omits it); no
//! `aud` (Python writes `"aud": null`, TS/Go/Rust omit it).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Header;
use serde::Serialize;

use super::key::{CdpKey, SignError};

/// JWT lifetime, the SDKs' default and what Coinbase documents ("expires after 2 minutes").
pub const JWT_LIFETIME_SECS: u64 = 120;

/// Bytes of CSPRNG output in the header nonce (hex-encoded to 32 characters).
const NONCE_BYTES: usize = 16;

/// Why a JWT could not be built. Never carries the key or the token.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the system random number generator failed while making a JWT nonce")]
    Random,
    #[error("serializing the CDP JWT failed: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("signing the CDP JWT failed: {0}")]
    Sign(#[from] SignError),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'static str,
    nbf: u64,
    iat: u64,
    exp: u64,
    uris: [String; 1],
}

/// The `uris` entry for a request: `"POST api.developer.coinbase.com/onramp/v1/token"`.
///
/// Method (upper-cased, as the SDKs do), a space, then host, `:port` only when the URL names a
/// non-default port, and the path. No scheme, no query, no userinfo — the same string the
/// Python SDK derives with `urlparse(host + path)`.
pub fn request_uri(method: &str, url: &url::Url) -> String {
    let method = method.to_ascii_uppercase();
    let host = url.host_str().unwrap_or_default();
    let path = url.path();
    // `Url::port` is None when the port is the scheme's default, which is what we want: an
    // explicit ":443" in the configured base URL must not change the signed string.
    match url.port() {
        Some(port) => format!("{method} {host}:{port}{path}"),
        None => format!("{method} {host}{path}"),
    }
}

/// A fresh JWT for one CDP API call to `method url`, valid from `now_unix` for two minutes.
pub fn build_jwt(
    key: &CdpKey,
    method: &str,
    url: &url::Url,
    now_unix: u64,
) -> Result<String, JwtError> {
    let mut header = Header::new(key.algorithm().jwt_algorithm());
    // Header::new already sets typ = "JWT"; set it anyway so the contract does not rest on a
    // library default.
    header.typ = Some("JWT".to_owned());
    header.kid = Some(key.id().to_owned());
    header.nonce = Some(nonce()?);
    let claims = Claims {
        sub: key.id(),
        iss: "cdp",
        nbf: now_unix,
        iat: now_unix,
        exp: now_unix.saturating_add(JWT_LIFETIME_SECS),
        uris: [request_uri(method, url)],
    };
    let header = serde_json::to_vec(&header).map_err(JwtError::Serialize)?;
    let claims = serde_json::to_vec(&claims).map_err(JwtError::Serialize)?;

    // Compact JWS (RFC 7515 §7.1): b64url(header) "." b64url(claims) "." b64url(signature),
    // unpadded; the signature covers the first two parts as ASCII.
    let mut jws = String::with_capacity((header.len() + claims.len() + 64) * 4 / 3 + 8);
    URL_SAFE_NO_PAD.encode_string(&header, &mut jws);
    jws.push('.');
    URL_SAFE_NO_PAD.encode_string(&claims, &mut jws);
    let signature = key.sign(jws.as_bytes())?;
    jws.push('.');
    URL_SAFE_NO_PAD.encode_string(&signature, &mut jws);
    Ok(jws)
}

/// Seconds since the Unix epoch, for `build_jwt`'s `now_unix`. A clock before 1970 reads as 0
/// (the JWT is then rejected upstream, which is the honest outcome).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn nonce() -> Result<String, JwtError> {
    let mut bytes = [0u8; NONCE_BYTES];
    // aws-lc's RNG is the same CSPRNG that produces the ECDSA nonces; it is fallible rather than
    // panicking, so a broken RNG becomes an error response, not a crash.
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| JwtError::Random)?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(NONCE_BYTES * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdp::key::KeyAlgorithm;
    use aws_lc_rs::signature::{
        EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    use base64::engine::general_purpose::STANDARD;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use std::collections::HashSet;

    const ID: &str = "3f1c0e2a-9b7d-4c55-8e21-0a6b1d2c3e4f";
    const NOW: u64 = 1_795_605_915;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    fn token_url() -> url::Url {
        url("https://api.developer.coinbase.com/onramp/v1/token")
    }

    /// (key, DecodingKey for its public half)
    fn es256_key() -> (CdpKey, DecodingKey) {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        let key = CdpKey::from_parts(ID, &pem).unwrap();
        // jsonwebtoken's "EC DER" decoding key is the uncompressed point (0x04 || x || y).
        let dk = DecodingKey::from_ec_der(pair.public_key().as_ref());
        (key, dk)
    }

    fn eddsa_key() -> (CdpKey, DecodingKey) {
        let pair = Ed25519KeyPair::generate().unwrap();
        let seed = aws_lc_rs::encoding::AsBigEndian::<
            aws_lc_rs::encoding::Curve25519SeedBin<'static>,
        >::as_be_bytes(&pair.seed().unwrap())
        .unwrap();
        let mut raw = seed.as_ref().to_vec();
        raw.extend_from_slice(pair.public_key().as_ref());
        let key = CdpKey::from_parts(ID, &STANDARD.encode(raw)).unwrap();
        let dk = DecodingKey::from_ed_der(pair.public_key().as_ref());
        (key, dk)
    }

    fn json_part(token: &str, idx: usize) -> serde_json::Value {
        let part = token.split('.').nth(idx).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn request_uri_forms() {
        assert_eq!(
            request_uri("POST", &token_url()),
            "POST api.developer.coinbase.com/onramp/v1/token"
        );
        assert_eq!(
            request_uri(
                "post",
                &url("https://api.developer.coinbase.com:443/onramp/v1/token?x=1#f")
            ),
            "POST api.developer.coinbase.com/onramp/v1/token"
        );
        assert_eq!(
            request_uri("POST", &url("http://127.0.0.1:18080/onramp/v1/token")),
            "POST 127.0.0.1:18080/onramp/v1/token"
        );
        assert_eq!(
            request_uri("POST", &url("http://localhost:80/onramp/v1/token")),
            "POST localhost/onramp/v1/token"
        );
        assert_eq!(
            request_uri("GET", &url("https://user:pw@example.com:8443/a/b")),
            "GET example.com:8443/a/b"
        );
        assert_eq!(
            request_uri("POST", &url("http://[::1]:9000/onramp/v1/token")),
            "POST [::1]:9000/onramp/v1/token"
        );
    }

    fn check_token(key: &CdpKey, dk: &DecodingKey, alg: Algorithm, alg_name: &str) {
        let token = build_jwt(key, "POST", &token_url(), NOW).unwrap();
        assert_eq!(token.split('.').count(), 3);

        let header = json_part(&token, 0);
        let header = header.as_object().unwrap();
        let mut names: Vec<_> = header.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["alg", "kid", "nonce", "typ"]);
        assert_eq!(header["alg"], alg_name);
        assert_eq!(header["kid"], ID);
        assert_eq!(header["typ"], "JWT");
        let nonce = header["nonce"].as_str().unwrap();
        assert_eq!(nonce.len(), 32);
        assert!(nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

        let claims = json_part(&token, 1);
        assert_eq!(
            claims,
            serde_json::json!({
                "sub": ID, "iss": "cdp", "nbf": NOW, "iat": NOW, "exp": NOW + 120,
                "uris": ["POST api.developer.coinbase.com/onramp/v1/token"],
            })
        );

        // Signature check with jsonwebtoken's own verifier; the timestamps are in the past
        // relative to the wall clock, so only the signature and algorithm are validated here.
        let mut v = Validation::new(alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, dk, &v).unwrap();
        assert_eq!(data.header.kid.as_deref(), Some(ID));

        // A token tampered with must not verify.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({"sub": ID, "iss": "cdp", "exp": NOW + 9999}))
                .unwrap(),
        );
        assert!(jsonwebtoken::decode::<serde_json::Value>(parts.join("."), dk, &v).is_err());
    }

    #[test]
    fn es256_token_fields_and_signature() {
        let (key, dk) = es256_key();
        assert_eq!(key.algorithm(), KeyAlgorithm::Es256);
        check_token(&key, &dk, Algorithm::ES256, "ES256");
        // JOSE ES256 signatures are raw r||s, 64 bytes (not DER).
        let token = build_jwt(&key, "POST", &token_url(), NOW).unwrap();
        let sig = URL_SAFE_NO_PAD
            .decode(token.rsplit('.').next().unwrap())
            .unwrap();
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn eddsa_token_fields_and_signature() {
        let (key, dk) = eddsa_key();
        assert_eq!(key.algorithm(), KeyAlgorithm::EdDsa);
        check_token(&key, &dk, Algorithm::EdDSA, "EdDSA");
    }

    #[test]
    fn token_verifies_with_wall_clock_validation() {
        let (key, dk) = eddsa_key();
        let token = build_jwt(&key, "POST", &token_url(), unix_now()).unwrap();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&["cdp"]);
        v.set_required_spec_claims(&["exp", "nbf", "sub", "iss"]);
        v.validate_nbf = true;
        jsonwebtoken::decode::<serde_json::Value>(&token, &dk, &v).unwrap();
    }

    #[test]
    fn nonces_are_unique() {
        let (key, _) = eddsa_key();
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let token = build_jwt(&key, "POST", &token_url(), NOW).unwrap();
            let nonce = json_part(&token, 0)["nonce"].as_str().unwrap().to_owned();
            assert!(seen.insert(nonce), "nonce repeated");
        }
    }

    #[test]
    fn legacy_key_id_goes_in_kid_and_sub_unchanged() {
        let legacy = "organizations/11111111-2222-3333-4444-555555555555/apiKeys/66666666-7777-8888-9999-000000000000";
        let pair = Ed25519KeyPair::generate().unwrap();
        let seed = aws_lc_rs::encoding::AsBigEndian::<
            aws_lc_rs::encoding::Curve25519SeedBin<'static>,
        >::as_be_bytes(&pair.seed().unwrap())
        .unwrap();
        let mut raw = seed.as_ref().to_vec();
        raw.extend_from_slice(pair.public_key().as_ref());
        let key = CdpKey::from_parts(legacy, &STANDARD.encode(raw)).unwrap();
        let token = build_jwt(&key, "POST", &token_url(), NOW).unwrap();
        assert_eq!(json_part(&token, 0)["kid"], legacy);
        assert_eq!(json_part(&token, 1)["sub"], legacy);
    }
}
