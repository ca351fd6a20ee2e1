//! Address validation (src/onramp/address.rs `check`).
//!
//! Input: `<chain>\n<address>`; without a newline the whole input is the address and every
//! family is tried. An accepted address reaches the CDP request body and logs, so beyond "no
//! panic" it must satisfy its family's shape and never carry URL, header or HTML syntax.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onramp_gateway::onramp::address::{check, family, Family};

/// One chain per family plus a generic one.
const CHAINS: &[&str] = &["base", "ethereum", "solana", "bitcoin", "stellar"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.split_once('\n') {
        Some((chain, address)) => one(address, chain),
        None => CHAINS.iter().for_each(|c| one(text, c)),
    }
});

fn one(address: &str, chain: &str) {
    if check(address, chain).is_err() {
        return;
    }
    assert!(
        address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)),
        "accepted {address:?} for {chain:?}"
    );
    let len = address.len();
    match family(chain) {
        Family::Evm => {
            assert!(len == 42 && address.starts_with("0x"), "{address:?}");
            assert!(address[2..].bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                address[2..].bytes().any(|b| b != b'0'),
                "zero address accepted"
            );
        }
        Family::Solana => {
            assert!((32..=44).contains(&len), "{address:?}");
            // base58 alphabet: no 0, O, I, l
            assert!(!address.contains(['0', 'O', 'I', 'l']), "{address:?}");
        }
        Family::Bitcoin => {
            let lower = address.to_ascii_lowercase();
            assert!(
                lower.starts_with("bc1") || address.starts_with(['1', '3']),
                "{address:?}"
            );
            // bech32 is single-case (BIP-173)
            if lower.starts_with("bc1") {
                assert!(
                    address == lower || address == address.to_ascii_uppercase(),
                    "mixed-case bech32 {address:?}"
                );
            }
        }
        Family::Other => assert!((3..=128).contains(&len), "{address:?}"),
    }
}
