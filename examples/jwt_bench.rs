//! Micro benchmark of CDP JWT minting (one `build_jwt` per CDP call).
//!
//! `cargo run --release --example jwt_bench [iterations]` prints µs per token for ES256 and
//! EdDSA. Target: ≤ 50 µs each in release. Keys are generated in memory at start.

use std::hint::black_box;
use std::time::Instant;

use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use onramp_gateway::cdp::jwt::{build_jwt, unix_now};
use onramp_gateway::cdp::key::CdpKey;

const ID: &str = "3f1c0e2a-9b7d-4c55-8e21-0a6b1d2c3e4f";

fn es256_key() -> Result<CdpKey, Box<dyn std::error::Error>> {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)?;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pair.to_pkcs8v1()?.as_ref())
    );
    Ok(CdpKey::from_parts(ID, &pem)?)
}

fn ed25519_key() -> Result<CdpKey, Box<dyn std::error::Error>> {
    let pair = Ed25519KeyPair::generate()?;
    let seed: Curve25519SeedBin<'static> = pair.seed()?.as_be_bytes()?;
    let mut raw = seed.as_ref().to_vec();
    raw.extend_from_slice(pair.public_key().as_ref());
    Ok(CdpKey::from_parts(ID, &STANDARD.encode(raw))?)
}

fn bench(name: &str, key: &CdpKey, iterations: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let url = url::Url::parse("https://api.developer.coinbase.com/onramp/v1/token")?;
    let now = unix_now();
    for _ in 0..iterations / 10 {
        black_box(build_jwt(key, "POST", &url, now)?);
    }
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(build_jwt(black_box(key), "POST", &url, now)?);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
    let cpu = per_iter_us(cpu0, thread_cpu_ns(), iterations);
    println!("{name:6} {us:8.2} µs/token wall, {cpu} on-CPU  ({iterations} tokens)");
    Ok(us)
}

/// Nanoseconds this thread has spent on a CPU (Linux schedstat). On a shared, busy machine the
/// wall clock also counts time spent waiting for a core; this does not.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn per_iter_us(before: Option<u64>, after: Option<u64>, iterations: u32) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!("{:8.2} µs", (a - b) as f64 / 1e3 / f64::from(iterations)),
        _ => "n/a".to_owned(),
    }
}

/// Where the time goes (`JWT_BENCH_BREAKDOWN=1`): a signature with a key pair parsed once,
/// and the PKCS#8 parse that `jsonwebtoken::encode` would add to every token — the reason
/// `CdpKey` keeps the parsed pair instead of a `jsonwebtoken::EncodingKey`.
fn breakdown(iterations: u32) -> Result<(), Box<dyn std::error::Error>> {
    let msg = [b'x'; 400];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ec_doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
    let ed_doc = Ed25519KeyPair::generate_pkcs8(&rng)?;
    let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec_doc.as_ref())?;
    let ed = Ed25519KeyPair::from_pkcs8(ed_doc.as_ref())?;
    let time = |name: &str, f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| {
        let cpu0 = thread_cpu_ns();
        let start = Instant::now();
        for _ in 0..iterations {
            f()?;
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations);
        let cpu = per_iter_us(cpu0, thread_cpu_ns(), iterations);
        println!("  {name:34} {us:8.2} µs wall, {cpu} on-CPU");
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    println!("breakdown (aws-lc-rs directly):");
    time("ES256 sign, key parsed once", &mut || {
        black_box(ec.sign(&rng, black_box(&msg))?);
        Ok(())
    })?;
    time("ES256 parse PKCS#8 only", &mut || {
        black_box(EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            black_box(ec_doc.as_ref()),
        )?);
        Ok(())
    })?;
    time("EdDSA sign, key parsed once", &mut || {
        black_box(ed.sign(black_box(&msg)));
        Ok(())
    })?;
    time("EdDSA parse PKCS#8 only", &mut || {
        black_box(Ed25519KeyPair::from_pkcs8(black_box(ed_doc.as_ref()))?);
        Ok(())
    })?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 20_000,
    };
    if cfg!(debug_assertions) {
        println!("note: debug build; run with --release for meaningful numbers");
    }
    let es = bench("ES256", &es256_key()?, iterations)?;
    let ed = bench("EdDSA", &ed25519_key()?, iterations)?;
    if std::env::var_os("JWT_BENCH_BREAKDOWN").is_some() {
        breakdown(iterations)?;
    }
    let target = 50.0;
    println!(
        "target ≤ {target} µs: ES256 {}, EdDSA {}",
        if es <= target { "ok" } else { "OVER" },
        if ed <= target { "ok" } else { "OVER" }
    );
    Ok(())
}
