//! Criterion micro-benchmarks of the per-mint CPU steps (issue 13), through the library's
//! public API:
//!
//! - `jwt/*`: one CDP JWT (`cdp::jwt::build_jwt`), ES256 and Ed25519 keys;
//! - `client_ip/*`: the client-IP decision, a trusted balancer with an `X-Forwarded-For`
//!   chain vs an untrusted peer (headers ignored);
//! - `limiter/*`: the memory backend's layered check, allowed path, one key and 100,000
//!   keys (per-IP bucket; per-IP + /24 prefix bucket);
//! - `location/*`: the Coinbase redirect, `build_location` alone and with the query parse
//!   and validation before it.
//!
//! `cargo bench --bench micro [-- <filter>] [-- --warm-up-time 1 --measurement-time 3]`.
//! Keys are generated in memory; nothing touches the network.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::DefaultClock;
use http::{HeaderMap, HeaderValue};
use onramp_gateway::cdp::jwt::{build_jwt, unix_now};
use onramp_gateway::cdp::key::CdpKey;
use onramp_gateway::client_ip::{ClientIpPolicy, ConnInfo};
use onramp_gateway::config::RateLimitConfig;
use onramp_gateway::onramp::redirect::RedirectRule;
use onramp_gateway::onramp::request::{build_location, from_query, Flow, Rules};
use onramp_gateway::ratelimit::{LayeredMemory, Layers};

const KEY_ID: &str = "3f1c0e2a-9b7d-4c55-8e21-0a6b1d2c3e4f";

fn es256_key() -> CdpKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 key");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pair.to_pkcs8v1().expect("PKCS#8").as_ref())
    );
    CdpKey::from_parts(KEY_ID, &pem).expect("ES256 CdpKey")
}

fn ed25519_key() -> CdpKey {
    let pair = Ed25519KeyPair::generate().expect("Ed25519 key");
    let seed: Curve25519SeedBin<'static> = pair
        .seed()
        .expect("seed")
        .as_be_bytes()
        .expect("seed bytes");
    let mut raw = seed.as_ref().to_vec();
    raw.extend_from_slice(pair.public_key().as_ref());
    CdpKey::from_parts(KEY_ID, &STANDARD.encode(raw)).expect("EdDSA CdpKey")
}

fn jwt(c: &mut Criterion) {
    let url = url::Url::parse("https://api.developer.coinbase.com/onramp/v1/token").unwrap();
    let mut g = c.benchmark_group("jwt");
    for (name, key) in [("es256", es256_key()), ("ed25519", ed25519_key())] {
        g.bench_function(name, |b| {
            b.iter(|| build_jwt(black_box(&key), "POST", black_box(&url), unix_now()).unwrap())
        });
    }
    g.finish();
}

fn client_ip(c: &mut Criterion) {
    let policy = ClientIpPolicy::new(vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.168.0.0/16".parse().unwrap(),
    ]);
    let local: SocketAddr = "10.9.9.9:8443".parse().unwrap();
    let balancer = ConnInfo::new("10.0.0.7:51234".parse().unwrap(), local);
    let stranger = ConnInfo::new("203.0.113.9:51234".parse().unwrap(), local);
    let mut headers = HeaderMap::new();
    // client, then two proxies of ours: the decision walks three hops from the right.
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.23, 10.3.4.5, 192.168.7.1"),
    );
    headers.insert("user-agent", HeaderValue::from_static("Mozilla/5.0 bench"));
    let mut g = c.benchmark_group("client_ip");
    g.bench_function("trusted_peer_xff_chain", |b| {
        b.iter(|| policy.resolve(black_box(&balancer), black_box(&headers)))
    });
    g.bench_function("untrusted_peer", |b| {
        b.iter(|| policy.resolve(black_box(&stranger), black_box(&headers)))
    });
    g.finish();
}

/// Distinct IPv4 clients for the many-keys runs (10.0.0.0 up: 391 distinct /24 prefixes).
const MANY_KEYS: u32 = 100_000;

fn limiter(c: &mut Criterion) {
    // Rates far above what one thread can ask for: every check takes the allowed path.
    let open = RateLimitConfig {
        requests_per_minute: 4_000_000_000,
        burst: 1_000_000_000,
        max_keys: 10_000_000,
        ..RateLimitConfig::default()
    };
    let with_prefix = RateLimitConfig {
        aggregate_requests_per_minute: 4_000_000_000,
        aggregate_burst: 1_000_000_000,
        ..open.clone()
    };
    let build = |rl: &RateLimitConfig| {
        let layers = Layers::from_config(rl).expect("layers");
        LayeredMemory::with_clock(&layers, rl.max_keys, DefaultClock::default).expect("limiter")
    };
    let clients: Vec<IpAddr> = (0..MANY_KEYS)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let mut g = c.benchmark_group("limiter");
    let one = build(&open);
    let ip: IpAddr = "198.51.100.23".parse().unwrap();
    g.bench_function("per_ip/one_key", |b| {
        b.iter(|| {
            let v = one.check_now(black_box(ip)).unwrap();
            assert!(v.is_allowed());
        })
    });
    for (name, rl) in [
        ("per_ip/100k_keys", &open),
        ("per_ip+prefix/100k_keys", &with_prefix),
    ] {
        let lim = build(rl);
        // Every key exists before timing: the steady state of a busy gateway.
        for ip in &clients {
            lim.check_now(*ip).unwrap();
        }
        let mut next = clients.iter().cycle();
        g.bench_function(name, |b| {
            b.iter(|| {
                let ip = *next.next().unwrap();
                let v = lim.check_now(black_box(ip)).unwrap();
                assert!(v.is_allowed());
            })
        });
    }
    g.finish();
}

fn location(c: &mut Criterion) {
    let blockchains = vec!["base".to_string(), "ethereum".to_string()];
    let allowlist = vec![RedirectRule::parse("https://app.example.com").unwrap()];
    let rules = Rules {
        flow: Flow::Onramp,
        blockchains: &blockchains,
        assets: &[],
        redirect_allowlist: &allowlist,
    };
    let base = url::Url::parse("https://pay.coinbase.com/buy/select-asset").unwrap();
    let query = "address=0x1111111111111111111111111111111111111111&blockchains=base,ethereum\
                 &defaultAsset=USDC&defaultNetwork=base&presetFiatAmount=50&fiatCurrency=USD\
                 &partnerUserRef=user-1234&redirectUrl=https%3A%2F%2Fapp.example.com%2Fdone";
    let token = "ZWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY3ODkwYWJjZGVmZ2hpams";
    let req = from_query(query, &rules).expect("valid request");
    let mut g = c.benchmark_group("location");
    g.bench_function("build_location", |b| {
        b.iter(|| build_location(black_box(&base), black_box(token), black_box(&req)))
    });
    g.bench_function("parse_validate_and_build", |b| {
        b.iter(|| {
            let req = from_query(black_box(query), &rules).unwrap();
            build_location(&base, black_box(token), &req)
        })
    });
    g.finish();
}

criterion_group!(benches, jwt, client_ip, limiter, location);
criterion_main!(benches);
