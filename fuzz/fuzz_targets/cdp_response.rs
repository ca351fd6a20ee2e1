//! CDP token-API answer parsing (src/cdp/client.rs `parse_token`, `ErrorBody`).
//!
//! The answer comes from the network; whatever it is, the gateway must not panic, must only
//! ever accept a token it would be safe to put in a `Location` header, and must only ever
//! log a short, control-free error message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onramp_gateway::cdp::client::{parse_token, ErrorBody};

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = parse_token(data) {
        let t = token.expose();
        assert!(!t.is_empty() && t.len() <= 4096, "token length {}", t.len());
        // Graphic ASCII only: no CR/LF/space can reach the Location header.
        assert!(t.bytes().all(|b| b.is_ascii_graphic()), "token {t:?}");
        // And it is really the document's `token`, not something else in it. (Only when
        // the whole document is valid: serde skips ignored fields without checking their
        // UTF-8, so `{"x":"\xff","token":"t"}` is accepted, harmlessly; found by this target.)
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            assert_eq!(v.get("token").and_then(|x| x.as_str()), Some(t));
        }
    }
    // v1 google.rpc and v2 {errorType, errorMessage, correlationId} error answers.
    let e = ErrorBody::parse(data);
    let m = e.message;
    assert!(
        m.chars().count() <= 300,
        "message of {} chars",
        m.chars().count()
    );
    assert!(!m.chars().any(char::is_control), "control char in {m:?}");
    // errorType reaches clients: a token or nothing.
    if let Some(t) = e.error_type {
        assert!(
            !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "errorType {t:?}"
        );
    }
    if let Some(c) = e.correlation_id {
        assert!(c.chars().count() <= 128 && !c.chars().any(char::is_control), "{c:?}");
    }
});
