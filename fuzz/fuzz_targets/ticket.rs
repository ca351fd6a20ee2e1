//! App-signed ticket verification (src/ticket.rs `TicketVerifier::check`), everything but
//! the replay store.
//!
//! The ticket comes from the browser; whatever it is, the gateway must not panic, and an
//! accepted ticket must satisfy every rule: a `jti`, a lifetime within the maximum, and
//! context JSON in the shape the address validation expects. The fuzzer cannot forge an
//! HMAC, so the input is also signed with the test key half the time: that explores the
//! claim rules behind the signature.
#![no_main]

use std::sync::Arc;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use onramp_gateway::onramp::request::Flow;
use onramp_gateway::ticket::{MemoryReplayGuard, TicketSecret, TicketVerifier};

const SECRET: &[u8] = b"fuzz-ticket-secret-0123456789abcdef";
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let secret = TicketSecret::from_bytes("FUZZ", SECRET.to_vec()).expect("long enough");
    let verifier = TicketVerifier::new(&secret, 300, Arc::new(MemoryReplayGuard::new(16)));
    let flow = if mode & 2 == 0 { Flow::Onramp } else { Flow::Offramp };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // Sign whatever JSON the fuzzer wrote, so the claim checks are reached.
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
            return;
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode")
    };
    if let Ok(verified) = verifier.check(&token, flow, NOW) {
        let ctx: serde_json::Value =
            serde_json::from_slice(&verified.ticket.context_json).expect("context is JSON");
        assert!(ctx.get("addresses").is_some(), "{ctx}");
        // Only a signed ticket can pass.
        assert_eq!(mode & 1, 1, "an unsigned input was accepted: {token:?}");
        let claims: serde_json::Value = serde_json::from_slice(rest).expect("signed JSON");
        let exp = claims["exp"].as_u64().expect("exp");
        assert!(exp + 5 >= NOW, "expired accepted");
        match claims.get("iat").and_then(|v| v.as_u64()) {
            Some(iat) => assert!(exp.saturating_sub(iat) <= 300 && iat <= NOW + 5),
            None => assert!(exp <= NOW + 305),
        }
        let jti = claims["jti"].as_str().expect("jti");
        assert!(!jti.is_empty() && jti.len() <= 256);
        if let Some(f) = claims.get("flow").and_then(|v| v.as_str()) {
            assert_eq!(f, flow.as_str());
        }
    }
});
