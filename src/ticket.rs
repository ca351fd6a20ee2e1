//! App-signed tickets (`addresses.source = "ticket"`).
//!
//! The app proves which wallet belongs to the signed-in user by signing a short-lived
//! HS256 JWT with a secret it shares with the gateway; the browser carries it as the
//! `ticket` parameter. The gateway mints only for the addresses inside a valid, fresh,
//! unused ticket, so a link on another website cannot choose the destination.
//!
//! Verification is `jsonwebtoken`'s (signature, `alg` pinned to HS256 so `none`, HS512
//! and RS256/HS256 confusion are refused, `exp` required); on top of it this module
//! checks what the crate does not: `exp - iat <= ticket_max_age_s` (or `exp - now` when
//! `iat` is absent), `iat` not in the future, `jti` present, `flow` bound to the route,
//! and single use of each `jti` through a [`ReplayGuard`] (memory, or Redis with the
//! Redis backend so every replica sees every use).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::onramp::request::Flow;
use crate::ratelimit::{BoxFuture, LimiterError};

/// Shortest accepted HS256 key (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest `jti` remembered (keeps replay keys small).
pub const MAX_JTI_LEN: usize = 256;
/// Clock skew tolerated between the app and the gateway on `exp` and `iat`.
pub const LEEWAY_S: u64 = 5;

/// The HS256 key, read once from the environment. Never printed.
pub struct TicketSecret(Vec<u8>);

impl fmt::Debug for TicketSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketSecret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketSetupError {
    #[error("addresses.source = \"ticket\" needs the HS256 key in the environment variable {0} (at least 32 bytes); it is not set")]
    Unset(String),
    #[error("addresses.ticket_secret_env: the key in {name} is {len} bytes; at least {MIN_SECRET_BYTES} are required")]
    TooShort { name: String, len: usize },
}

impl TicketSecret {
    /// Reads the key from the variable `name` (`addresses.ticket_secret_env`).
    pub fn from_env(name: &str) -> Result<Self, TicketSetupError> {
        let value = std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| TicketSetupError::Unset(name.to_string()))?;
        Self::from_bytes(name, value.into_encoded_bytes())
    }

    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, TicketSetupError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(TicketSetupError::TooShort {
                name: name.to_string(),
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }
}

/// Why a ticket was refused. Statuses are decided in `error.rs`.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// Missing, malformed, bad signature, wrong algorithm, expired, too long-lived: `401`.
    #[error("ticket invalid: {0}")]
    Invalid(String),
    /// A valid ticket used for the other route: `403`.
    #[error("ticket is for {ticket}, not {route}")]
    WrongFlow {
        ticket: &'static str,
        route: &'static str,
    },
    /// Its `jti` was used before: `409`.
    #[error("ticket already used")]
    Replayed,
    /// The replay store could not answer (Redis down, memory full): policy applies.
    #[error(transparent)]
    Store(#[from] LimiterError),
}

/// The claims, as the app signs them. Unknown claims are kept in `extra` (later
/// features read buyer identity from them).
#[derive(Debug, Clone, Deserialize)]
struct RawClaims {
    addresses: Value,
    #[serde(default)]
    assets: Option<Value>,
    #[serde(default, rename = "partnerUserRef")]
    partner_user_ref: Option<Value>,
    #[serde(default)]
    flow: Option<String>,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A verified, unused ticket.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// `{"addresses":..,"assets":..,"partnerUserRef":..}`: the same shape as the app's
    /// upstream context answer, so both sources go through one validation.
    pub context_json: Vec<u8>,
    /// Every other claim (e.g. buyer identity for headless orders).
    pub extra: Map<String, Value>,
}

/// A ticket whose signature and claims are good; single use not yet recorded.
#[derive(Debug, Clone)]
pub struct Verified {
    jti: String,
    exp: u64,
    pub ticket: Ticket,
}

/// Remembers used `jti`s until their ticket expires.
pub trait ReplayGuard: Send + Sync + 'static {
    /// `Ok(true)` the first time `jti` is seen, `Ok(false)` on a replay. `exp` (Unix
    /// seconds) is when it may be forgotten.
    fn first_use(&self, jti: &str, exp: u64, now: u64)
        -> BoxFuture<'_, Result<bool, LimiterError>>;

    /// Forgets `jti` again. Tickets never do; a webhook delivery the app did not take is
    /// forgotten so Coinbase's retry is forwarded, not answered as a duplicate.
    fn forget(&self, jti: &str) -> BoxFuture<'_, Result<(), LimiterError>>;
}

/// In-process replay guard: `jti → exp`, expired entries purged when the map reaches
/// its cap; still full after that → [`LimiterError::Full`] (fail per policy, never grow).
pub struct MemoryReplayGuard {
    seen: Mutex<HashMap<String, u64>>,
    max_entries: usize,
}

impl MemoryReplayGuard {
    pub fn new(max_entries: usize) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    fn record(&self, jti: &str, exp: u64, now: u64) -> Result<bool, LimiterError> {
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still a valid map.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&until) = seen.get(jti) {
            if until >= now {
                return Ok(false);
            }
        }
        if seen.len() >= self.max_entries {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.max_entries {
                return Err(LimiterError::Full {
                    max_keys: self.max_entries,
                });
            }
        }
        seen.insert(jti.to_string(), exp);
        Ok(true)
    }
}

impl ReplayGuard for MemoryReplayGuard {
    fn first_use(
        &self,
        jti: &str,
        exp: u64,
        now: u64,
    ) -> BoxFuture<'_, Result<bool, LimiterError>> {
        Box::pin(std::future::ready(self.record(jti, exp, now)))
    }

    fn forget(&self, jti: &str) -> BoxFuture<'_, Result<(), LimiterError>> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(jti);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Replay guard in Redis: `SET {prefix}jti:{jti} 1 NX PX <until exp>`; shared by replicas.
pub struct RedisReplayGuard {
    connection: crate::redis_conn::RedisConn,
    prefix: String,
}

impl RedisReplayGuard {
    pub fn new(connection: crate::redis_conn::RedisConn, key_prefix: &str) -> Self {
        Self {
            connection,
            prefix: key_prefix.to_string(),
        }
    }
}

impl ReplayGuard for RedisReplayGuard {
    fn first_use(
        &self,
        jti: &str,
        exp: u64,
        now: u64,
    ) -> BoxFuture<'_, Result<bool, LimiterError>> {
        let key = format!("{}jti:{jti}", self.prefix);
        // Kept until exp plus the leeway, at least one second.
        let ttl_ms = (exp.saturating_sub(now) + LEEWAY_S).max(1) * 1000;
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let reply: Option<String> = crate::ratelimit::redis::bounded(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut connection),
            )
            .await?;
            Ok(reply.is_some())
        })
    }

    fn forget(&self, jti: &str) -> BoxFuture<'_, Result<(), LimiterError>> {
        let key = format!("{}jti:{jti}", self.prefix);
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let _: i64 = crate::ratelimit::redis::bounded(
                redis::cmd("DEL").arg(&key).query_async(&mut connection),
            )
            .await?;
            Ok(())
        })
    }
}

/// Verifies tickets with one key and one replay guard.
pub struct TicketVerifier {
    key: DecodingKey,
    validation: Validation,
    max_age_s: u64,
    replay: Arc<dyn ReplayGuard>,
}

impl TicketVerifier {
    pub fn new(secret: &TicketSecret, max_age_s: u64, replay: Arc<dyn ReplayGuard>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp"]);
        // Time claims are checked below against the caller's `now` (one clock for every
        // rule, and deterministic under test and fuzzing).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        Self {
            key: DecodingKey::from_secret(&secret.0),
            validation,
            max_age_s,
            replay,
        }
    }

    /// Verifies `token` for `route` at `now` (Unix seconds) and records its `jti`.
    /// Order: signature and claims (401), flow (403), then single use (409) — a ticket
    /// refused for another reason is not burned.
    pub async fn verify(&self, token: &str, route: Flow, now: u64) -> Result<Ticket, TicketError> {
        let verified = self.check(token, route, now)?;
        if !self.first_use(&verified, now).await? {
            return Err(TicketError::Replayed);
        }
        Ok(verified.ticket)
    }

    /// Records the ticket's `jti`: `Ok(false)` if it was used before.
    pub async fn first_use(&self, v: &Verified, now: u64) -> Result<bool, LimiterError> {
        self.replay.first_use(&v.jti, v.exp, now).await
    }

    /// Signature and claims (401) and flow (403), without the replay check.
    pub fn check(&self, token: &str, route: Flow, now: u64) -> Result<Verified, TicketError> {
        let claims = self.claims(token, route, now)?;
        let jti = claims.jti.clone().unwrap_or_default();
        let exp = claims.exp;
        let mut context = Map::new();
        context.insert("addresses".into(), claims.addresses);
        if let Some(assets) = claims.assets {
            context.insert("assets".into(), assets);
        }
        if let Some(r) = claims.partner_user_ref {
            context.insert("partnerUserRef".into(), r);
        }
        Ok(Verified {
            jti,
            exp,
            ticket: Ticket {
                context_json: Value::Object(context).to_string().into_bytes(),
                extra: claims.extra,
            },
        })
    }

    /// Everything but the replay check (pure; fuzzed).
    fn claims(&self, token: &str, route: Flow, now: u64) -> Result<RawClaims, TicketError> {
        let invalid = |m: &str| TicketError::Invalid(m.to_string());
        if token.is_empty() {
            return Err(invalid("missing"));
        }
        let data = decode::<RawClaims>(token, &self.key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            TicketError::Invalid(
                match e.kind() {
                    K::ExpiredSignature => "expired",
                    K::ImmatureSignature => "not yet valid",
                    K::InvalidSignature => "bad signature",
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm must be HS256",
                    K::MissingRequiredClaim(_) => "exp is required",
                    K::Json(_) => "claims malformed (addresses and exp are required)",
                    _ => "malformed",
                }
                .to_string(),
            )
        })?;
        let claims = data.claims;
        if claims.exp.saturating_add(LEEWAY_S) < now {
            return Err(invalid("expired"));
        }
        match claims.iat {
            Some(iat) if iat > now + LEEWAY_S => return Err(invalid("iat is in the future")),
            Some(iat) if claims.exp.saturating_sub(iat) > self.max_age_s => {
                return Err(invalid("lives longer than addresses.ticket_max_age_s"))
            }
            None if claims.exp.saturating_sub(now) > self.max_age_s + LEEWAY_S => {
                return Err(invalid("lives longer than addresses.ticket_max_age_s"))
            }
            _ => {}
        }
        match claims.jti.as_deref() {
            None | Some("") => return Err(invalid("jti is required")),
            Some(j) if j.len() > MAX_JTI_LEN => return Err(invalid("jti is too long")),
            Some(_) => {}
        }
        if let Some(flow) = claims.flow.as_deref() {
            if flow != route.as_str() {
                return Err(TicketError::WrongFlow {
                    ticket: if flow == "offramp" {
                        "offramp"
                    } else if flow == "onramp" {
                        "onramp"
                    } else {
                        return Err(invalid("flow must be \"onramp\" or \"offramp\""));
                    },
                    route: route.as_str(),
                });
            }
        }
        Ok(claims)
    }
}

/// The `ticket` parameter of a query string or form body (`None` if absent; given twice
/// is invalid: which one would the app have meant?).
pub fn from_pairs(text: &str) -> Result<Option<String>, TicketError> {
    let mut found = None;
    for (k, v) in form_urlencoded::parse(text.as_bytes()) {
        if k == "ticket" && found.replace(v.into_owned()).is_some() {
            return Err(TicketError::Invalid("given more than once".into()));
        }
    }
    Ok(found)
}

/// The `ticket` member of a JSON body (`None` if absent or the body is not an object).
pub fn from_json(body: &[u8]) -> Result<Option<String>, TicketError> {
    #[derive(Deserialize)]
    struct Carrier {
        #[serde(default)]
        ticket: Option<Value>,
    }
    match serde_json::from_slice::<Carrier>(body) {
        Ok(Carrier {
            ticket: Some(Value::String(t)),
        }) => Ok(Some(t)),
        Ok(Carrier { ticket: Some(_) }) => Err(TicketError::Invalid("must be a string".into())),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
    const NOW: u64 = 1_800_000_000;

    fn verifier() -> TicketVerifier {
        let secret = TicketSecret::from_bytes("T", SECRET.to_vec()).unwrap();
        TicketVerifier::new(&secret, 300, Arc::new(MemoryReplayGuard::new(100)))
    }

    fn sign(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn good(jti: &str) -> Value {
        json!({
            "addresses": [{"address": "0x0000000000000000000000000000000000000001", "blockchains": ["base"]}],
            "partnerUserRef": "user-1",
            "exp": NOW + 120, "iat": NOW, "jti": jti, "flow": "onramp",
        })
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn invalid_reason(r: Result<Ticket, TicketError>) -> String {
        match r {
            Err(TicketError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn secret_rules() {
        assert_eq!(
            TicketSecret::from_bytes("X", vec![b'a'; 31]).unwrap_err(),
            TicketSetupError::TooShort {
                name: "X".into(),
                len: 31
            }
        );
        assert!(TicketSecret::from_bytes("X", vec![b'a'; 32]).is_ok());
        assert!(!format!(
            "{:?}",
            TicketSecret::from_bytes("X", vec![b'z'; 40]).unwrap()
        )
        .contains("zzz"));
    }

    #[test]
    fn valid_once_then_replayed() {
        let v = verifier();
        let t = sign(&good("a1"));
        let ticket = block_on(v.verify(&t, Flow::Onramp, NOW)).expect("valid");
        let ctx: Value = serde_json::from_slice(&ticket.context_json).unwrap();
        assert_eq!(ctx["partnerUserRef"], "user-1");
        assert!(matches!(
            block_on(v.verify(&t, Flow::Onramp, NOW + 1)),
            Err(TicketError::Replayed)
        ));
    }

    #[test]
    fn refusals() {
        let v = verifier();
        let check = |t: String| block_on(v.verify(&t, Flow::Onramp, NOW));
        // expired
        let mut c = good("e");
        c["exp"] = json!(NOW - 60);
        c["iat"] = json!(NOW - 120);
        assert_eq!(invalid_reason(check(sign(&c))), "expired");
        // wrong key
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &good("w"),
            &EncodingKey::from_secret(b"another-key-another-key-another-key!"),
        )
        .unwrap();
        assert_eq!(invalid_reason(check(wrong)), "bad signature");
        // HS512 with the same key: algorithm confusion refused
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &good("h"),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(invalid_reason(check(hs512)), "algorithm must be HS256");
        // alg none: header {"alg":"none"} + payload + empty signature
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(good("n").to_string())
        );
        assert!(matches!(check(none), Err(TicketError::Invalid(_))));
        // RS256 header with an HMAC signature
        let rs = format!(
            "{}.{}.{}",
            b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64.encode(good("r").to_string()),
            b64.encode([0u8; 32])
        );
        assert_eq!(invalid_reason(check(rs)), "algorithm must be HS256");
        // missing jti
        let mut c = good("x");
        c.as_object_mut().unwrap().remove("jti");
        assert_eq!(invalid_reason(check(sign(&c))), "jti is required");
        // missing exp
        let mut c = good("x2");
        c.as_object_mut().unwrap().remove("exp");
        assert!(matches!(check(sign(&c)), Err(TicketError::Invalid(_))));
        // missing addresses
        let mut c = good("x3");
        c.as_object_mut().unwrap().remove("addresses");
        assert!(matches!(check(sign(&c)), Err(TicketError::Invalid(_))));
        // too long-lived
        let mut c = good("l");
        c["exp"] = json!(NOW + 301);
        assert!(invalid_reason(check(sign(&c))).contains("ticket_max_age_s"));
        let mut c = good("l2");
        c.as_object_mut().unwrap().remove("iat");
        c["exp"] = json!(NOW + 3600);
        assert!(invalid_reason(check(sign(&c))).contains("ticket_max_age_s"));
        // iat in the future
        let mut c = good("f");
        c["iat"] = json!(NOW + 60);
        c["exp"] = json!(NOW + 120);
        assert_eq!(invalid_reason(check(sign(&c))), "iat is in the future");
        // garbage and empty
        assert!(matches!(
            check("a.b.c".into()),
            Err(TicketError::Invalid(_))
        ));
        assert_eq!(invalid_reason(check(String::new())), "missing");
    }

    #[test]
    fn flow_is_bound_to_the_route_and_not_burned() {
        let v = verifier();
        let t = sign(&good("flow"));
        assert!(matches!(
            block_on(v.verify(&t, Flow::Offramp, NOW)),
            Err(TicketError::WrongFlow { .. })
        ));
        // The refusal did not consume the jti.
        assert!(block_on(v.verify(&t, Flow::Onramp, NOW)).is_ok());
        // No flow claim: any route.
        let mut c = good("any");
        c.as_object_mut().unwrap().remove("flow");
        assert!(block_on(v.verify(&sign(&c), Flow::Offramp, NOW)).is_ok());
    }

    #[test]
    fn memory_guard_forgets_after_exp_and_is_bounded() {
        let g = MemoryReplayGuard::new(2);
        assert!(g.record("a", NOW + 10, NOW).unwrap());
        assert!(!g.record("a", NOW + 10, NOW + 5).unwrap());
        assert!(g.record("b", NOW + 10, NOW).unwrap());
        // Full with live entries: refused, not grown.
        assert!(matches!(
            g.record("c", NOW + 10, NOW),
            Err(LimiterError::Full { .. })
        ));
        // After exp the old ones are purged to make room.
        assert!(g.record("c", NOW + 100, NOW + 11).unwrap());
    }

    #[test]
    fn ticket_parameter_extraction() {
        assert_eq!(
            from_pairs("a=1&ticket=x.y.z").unwrap().as_deref(),
            Some("x.y.z")
        );
        assert_eq!(from_pairs("a=1").unwrap(), None);
        assert!(from_pairs("ticket=a&ticket=b").is_err());
        assert_eq!(
            from_json(br#"{"ticket":"t","x":1}"#).unwrap().as_deref(),
            Some("t")
        );
        assert!(from_json(br#"{"ticket":5}"#).is_err());
        assert_eq!(from_json(b"[]").unwrap(), None);
    }
}
