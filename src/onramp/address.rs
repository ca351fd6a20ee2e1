//! Is an address well-formed for a blockchain's family?
//!
//! This is a syntax gate in front of Coinbase, not a wallet: it stops typos, junk and
//! injection attempts before a CDP call is spent on them. Where the format carries a
//! checksum that needs no extra crate (Bitcoin base58check via aws-lc-rs' SHA-256, which the
//! crate already links; bech32/bech32m, which is plain arithmetic) the checksum is verified,
//! because a mistyped Bitcoin address is otherwise indistinguishable from a valid one.
//!
//! Families:
//! - EVM ([`EVM_CHAINS`]): `0x` + 40 hex digits, either case. The EIP-55 mixed-case
//!   checksum is *not* verified (it needs Keccak-256, which no dependency provides); the
//!   all-zero address is refused because funds sent there are burnt.
//! - Solana ([`SOLANA_CHAINS`]): base58, 32..=44 characters, decoding to exactly 32 bytes.
//! - Bitcoin ([`BITCOIN_CHAINS`], mainnet only): bech32/bech32m `bc1…` segwit addresses
//!   (BIP-173/BIP-350: checksum, witness version, program length), or base58check
//!   P2PKH `1…` / P2SH `3…` (25 bytes, version byte 0x00/0x05, checksum).
//! - Anything else: a conservative charset `[A-Za-z0-9._:-]`, 3..=128 characters.

use aws_lc_rs::digest;

/// Chains whose addresses are EVM accounts (`0x` + 40 hex). Names as Coinbase spells
/// them where known, plus common aliases and testnets an operator might allowlist.
pub const EVM_CHAINS: &[&str] = &[
    "ethereum",
    "base",
    "polygon",
    "optimism",
    "arbitrum",
    "arbitrum-nova",
    "avalanche-c-chain",
    "avacchain",
    "avalanche",
    "bnb",
    "bsc",
    "bnb-chain",
    "binance-smart-chain",
    "zora",
    "celo",
    "fantom",
    "gnosis",
    "linea",
    "scroll",
    "zksync",
    "blast",
    "mantle",
    "unichain",
    "world-chain",
    "worldchain",
    "ink",
    "soneium",
    "monad",
    "sepolia",
    "ethereum-sepolia",
    "base-sepolia",
    "optimism-sepolia",
    "arbitrum-sepolia",
    "polygon-amoy",
];

/// Chains whose addresses are Solana public keys (base58 of 32 bytes).
pub const SOLANA_CHAINS: &[&str] = &["solana", "solana-devnet"];

/// Bitcoin mainnet. Testnets fall into the generic family on purpose: a mainnet-only
/// check would wrongly refuse `tb1…` addresses.
pub const BITCOIN_CHAINS: &[&str] = &["bitcoin"];

/// Address family of a blockchain, which decides the syntax check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Evm,
    Solana,
    Bitcoin,
    Other,
}

/// The family of `chain` (expected lowercase, as the request layer normalises it).
pub fn family(chain: &str) -> Family {
    if EVM_CHAINS.contains(&chain) {
        Family::Evm
    } else if SOLANA_CHAINS.contains(&chain) {
        Family::Solana
    } else if BITCOIN_CHAINS.contains(&chain) {
        Family::Bitcoin
    } else {
        Family::Other
    }
}

/// Checks `address` for `chain`. The error is a reason phrase, without the address
/// itself (error messages end up in HTML and logs; the caller names the field).
pub fn check(address: &str, chain: &str) -> Result<(), &'static str> {
    match family(chain) {
        Family::Evm => check_evm(address),
        Family::Solana => check_solana(address),
        Family::Bitcoin => check_bitcoin(address),
        Family::Other => check_generic(address),
    }
}

fn check_evm(address: &str) -> Result<(), &'static str> {
    const WANT: &str = "not a valid EVM address (0x followed by 40 hex digits)";
    let hex = address.strip_prefix("0x").ok_or(WANT)?;
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(WANT);
    }
    if hex.bytes().all(|b| b == b'0') {
        return Err("the zero address cannot receive funds");
    }
    Ok(())
}

fn check_solana(address: &str) -> Result<(), &'static str> {
    const WANT: &str = "not a valid Solana address (base58 of a 32-byte public key)";
    if !(32..=44).contains(&address.len()) {
        return Err(WANT);
    }
    match base58_decode(address) {
        Some(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(WANT),
    }
}

fn check_bitcoin(address: &str) -> Result<(), &'static str> {
    const WANT: &str = "not a valid Bitcoin mainnet address (bc1… segwit, or base58check 1…/3…)";
    let lower_prefix = address.get(..3).map(str::to_ascii_lowercase);
    let ok = if lower_prefix.as_deref() == Some("bc1") {
        is_segwit_mainnet(address)
    } else {
        is_base58check_mainnet(address)
    };
    if ok {
        Ok(())
    } else {
        Err(WANT)
    }
}

fn check_generic(address: &str) -> Result<(), &'static str> {
    let ok = (3..=128).contains(&address.len())
        && address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err("not a plausible address (3 to 128 characters of letters, digits and . _ : -)")
    }
}

const BASE58_ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Plain base58 decoding (Bitcoin alphabet). Quadratic, which is fine: callers bound the
/// input to a few dozen characters before calling.
fn base58_decode(s: &str) -> Option<Vec<u8>> {
    // Little-endian big number while accumulating; reversed at the end.
    let mut num: Vec<u8> = Vec::with_capacity(s.len());
    for c in s.bytes() {
        let digit = BASE58_ALPHABET.iter().position(|&a| a == c)?;
        let mut carry = digit as u32;
        for byte in num.iter_mut() {
            carry += u32::from(*byte) * 58;
            *byte = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            num.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    // Each leading '1' encodes one leading zero byte.
    let zeros = s.bytes().take_while(|&c| c == b'1').count();
    num.extend(std::iter::repeat_n(0u8, zeros));
    num.reverse();
    Some(num)
}

/// P2PKH (`1…`, version 0x00) or P2SH (`3…`, version 0x05), with its 4-byte
/// double-SHA-256 checksum.
fn is_base58check_mainnet(address: &str) -> bool {
    if !(26..=35).contains(&address.len()) {
        return false;
    }
    let Some(bytes) = base58_decode(address) else {
        return false;
    };
    if bytes.len() != 25 || !matches!(bytes[0], 0x00 | 0x05) {
        return false;
    }
    let (payload, checksum) = bytes.split_at(21);
    let first = digest::digest(&digest::SHA256, payload);
    let second = digest::digest(&digest::SHA256, first.as_ref());
    second.as_ref().get(..4) == Some(checksum)
}

const BECH32_CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
const BECH32_CONST: u32 = 1;
const BECH32M_CONST: u32 = 0x2bc8_30a3;

fn bech32_polymod(values: impl Iterator<Item = u8>) -> u32 {
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let mut chk: u32 = 1;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(v);
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk
}

/// A BIP-173/BIP-350 segwit address with human-readable part `bc`: checksum variant
/// matching the witness version, program 2..=40 bytes (20 or 32 for version 0),
/// zero padding.
fn is_segwit_mainnet(address: &str) -> bool {
    // 3 ("bc1") + 1 (version) + data + 6 (checksum); programs of 2..=40 bytes give
    // 4..=64 data characters.
    if !(14..=74).contains(&address.len()) {
        return false;
    }
    let has_lower = address.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = address.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper {
        return false; // BIP-173: mixed case is invalid
    }
    let lower = address.to_ascii_lowercase();
    let Some(data_part) = lower.strip_prefix("bc1") else {
        return false;
    };
    let mut data = Vec::with_capacity(data_part.len());
    for c in data_part.bytes() {
        match BECH32_CHARSET.iter().position(|&x| x == c) {
            Some(v) => data.push(v as u8),
            None => return false,
        }
    }
    let hrp = b"bc";
    let expanded = hrp
        .iter()
        .map(|c| c >> 5)
        .chain(std::iter::once(0))
        .chain(hrp.iter().map(|c| c & 31));
    let variant = bech32_polymod(expanded.chain(data.iter().copied()));
    let Some((&version, rest)) = data.split_first() else {
        return false;
    };
    let Some(program5) = rest.get(..rest.len().saturating_sub(6)) else {
        return false;
    };
    if rest.len() < 6 || version > 16 {
        return false;
    }
    let want_variant = if version == 0 {
        BECH32_CONST
    } else {
        BECH32M_CONST
    };
    if variant != want_variant {
        return false;
    }
    let Some(program) = convert_5_to_8(program5) else {
        return false;
    };
    if !(2..=40).contains(&program.len()) {
        return false;
    }
    version != 0 || program.len() == 20 || program.len() == 32
}

/// Regroups 5-bit values into bytes, refusing more than 4 bits of padding or
/// non-zero padding (BIP-173).
fn convert_5_to_8(data: &[u8]) -> Option<Vec<u8>> {
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut out = Vec::with_capacity(data.len() * 5 / 8);
    for &v in data {
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    if bits >= 5 || (acc & ((1 << bits) - 1)) != 0 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        assert_eq!(family("base"), Family::Evm);
        assert_eq!(family("ethereum"), Family::Evm);
        assert_eq!(family("avalanche-c-chain"), Family::Evm);
        assert_eq!(family("bsc"), Family::Evm);
        assert_eq!(family("solana"), Family::Solana);
        assert_eq!(family("bitcoin"), Family::Bitcoin);
        assert_eq!(family("stellar"), Family::Other);
        assert_eq!(family("bitcoin-testnet"), Family::Other);
    }

    #[test]
    fn evm() {
        assert!(check("0x742d35Cc6634C0532925a3b844Bc454e4438f44e", "base").is_ok());
        assert!(check("0x742d35cc6634c0532925a3b844bc454e4438f44e", "ethereum").is_ok());
        assert!(check("0X742d35cc6634c0532925a3b844bc454e4438f44e", "ethereum").is_err());
        assert!(check("742d35cc6634c0532925a3b844bc454e4438f44e", "ethereum").is_err());
        assert!(check("0x742d35cc6634c0532925a3b844bc454e4438f44", "ethereum").is_err());
        assert!(check("0x742d35cc6634c0532925a3b844bc454e4438f44e0", "ethereum").is_err());
        assert!(check("0x742d35cc6634c0532925a3b844bc454e4438f44g", "ethereum").is_err());
        assert!(check(" 0x742d35cc6634c0532925a3b844bc454e4438f44e", "ethereum").is_err());
        assert_eq!(
            check("0x0000000000000000000000000000000000000000", "base"),
            Err("the zero address cannot receive funds")
        );
        assert!(check("", "base").is_err());
        assert!(check("0x", "base").is_err());
        // Multi-byte characters must not trip any slicing.
        assert!(check("0xé42d35cc6634c0532925a3b844bc454e4438f44", "base").is_err());
    }

    #[test]
    fn solana() {
        for ok in [
            "So11111111111111111111111111111111111111112",
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            "11111111111111111111111111111111",
        ] {
            assert!(check(ok, "solana").is_ok(), "{ok}");
        }
        for bad in [
            "So1111111111111111111111111111111111111111I", // 'I' not base58
            "0PjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v", // '0' not base58
            "1111111111111111111111111111111",             // 31 chars
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", // 44 chars, > 32 bytes
            "0x742d35cc6634c0532925a3b844bc454e4438f44e",
            "",
        ] {
            assert!(check(bad, "solana").is_err(), "{bad}");
        }
    }

    #[test]
    fn bitcoin_base58() {
        for ok in [
            "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",
            "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2",
            "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",
        ] {
            assert!(check(ok, "bitcoin").is_ok(), "{ok}");
        }
        for bad in [
            "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb", // checksum
            "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLz", // checksum
            "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfN",  // truncated
            "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn", // testnet P2PKH
            "0A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",
            "",
        ] {
            assert!(check(bad, "bitcoin").is_err(), "{bad}");
        }
    }

    #[test]
    fn bitcoin_segwit() {
        // BIP-173 / BIP-350 test vectors (mainnet ones).
        for ok in [
            "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
            "BC1SW50QGDZ25J",
            "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs",
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        ] {
            assert!(check(ok, "bitcoin").is_ok(), "{ok}");
        }
        for bad in [
            // v1 with bech32 (not bech32m) checksum
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd",
            // v16 with bech32 checksum
            "BC1S0XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ54WELL",
            // v0 with bech32m checksum
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh",
            // v0 program of 16 bytes
            "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",
            // non-zero padding
            "bc1zw508d6qejxtdg4y5r3zarvaryvqyzf3du",
            // empty data
            "bc1gmk9yu",
            // program too short
            "bc1rw5uspcuh",
            // mixed case
            "bc1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
            // typo in checksum
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5",
            // testnet hrp
            "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx",
            // 'b' is not in the bech32 charset
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3tb",
        ] {
            assert!(check(bad, "bitcoin").is_err(), "{bad}");
        }
    }

    #[test]
    fn generic() {
        assert!(check("GABC123", "stellar").is_ok());
        assert!(check("cosmos1abc:memo-1.x_y", "cosmos").is_ok());
        assert!(check("ab", "stellar").is_err());
        assert!(check(&"a".repeat(128), "stellar").is_ok());
        assert!(check(&"a".repeat(129), "stellar").is_err());
        assert!(check("abc def", "stellar").is_err());
        assert!(check("abc<script>", "stellar").is_err());
        assert!(check("abc/def", "stellar").is_err());
        assert!(check("ébc", "stellar").is_err());
    }

    #[test]
    fn base58_roundtrip_values() {
        assert_eq!(base58_decode("1"), Some(vec![0]));
        assert_eq!(base58_decode("2"), Some(vec![1]));
        assert_eq!(base58_decode("z"), Some(vec![57]));
        assert_eq!(base58_decode("21"), Some(vec![58]));
        assert_eq!(base58_decode("5Q"), Some(vec![0xff]));
        assert_eq!(base58_decode("0"), None);
        assert_eq!(base58_decode(""), Some(vec![]));
    }
}
