//! Who may mint: cross-site refusal, app-signed tickets, layered limits and the CDP
//! in-flight bound, end to end through the real binary (real TLS, verifying fake CDP,
//! real redis-server for the shared cases).

use std::net::Ipv4Addr;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::certs::{install_provider, Alpn};
use crate::common::fake_cdp::{FakeCdp, Mode, TestKey};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::metric;
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;
use crate::load_balancer::{connect_with_preamble, h1_get, v2};

const ADDR: &str = "0x1111111111111111111111111111111111111111";
const TICKET_ADDR: &str = "0x3333333333333333333333333333333333333333";
const ONRAMP: &str = "/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base";
const SECRET: &str = "integration-ticket-secret-0123456789abcdef";
const NO_LIMIT: &str = "requests_per_minute = 60000\nburst = 1000";
const REFUSED: &str = "onramp_gateway_mint_refused_total";

struct Rig {
    fake: FakeCdp,
    _up: Upstream,
    gw: Gateway,
    client: reqwest::Client,
}

async fn start(configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Rig {
    start_with_fake(FakeCdp::start, configure).await
}

async fn start_with_fake(
    fake: impl FnOnce(&TestKey) -> FakeCdp,
    configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
) -> Rig {
    let key = TestKey::es256_sec1();
    let fake = fake(&key);
    let up = Upstream::start().await;
    let mut b = GatewayBuilder::new(&up.url())
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section("rate_limit", NO_LIMIT)
        .env("ONRAMP_TICKET_SECRET", SECRET);
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = configure(b).start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    Rig {
        fake,
        _up: up,
        gw,
        client,
    }
}

impl Rig {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.get(self.gw.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("response")
    }

    async fn refused(&self, reason: &str) -> f64 {
        let (_, body) = self.gw.admin_get("/metrics").await;
        metric(&body, REFUSED, &[("reason", reason)]).unwrap_or(0.0)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ticket_claims(jti: &str) -> Value {
    json!({
        "addresses": [{"address": TICKET_ADDR, "blockchains": ["base"]}],
        "partnerUserRef": "user-42",
        "flow": "onramp",
        "iat": now(),
        "exp": now() + 120,
        "jti": jti,
    })
}

fn sign_with(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with(Algorithm::HS256, SECRET.as_bytes(), claims)
}

fn ticket_config(b: GatewayBuilder) -> GatewayBuilder {
    b.section("addresses", "source = \"ticket\"")
}

// ---------------------------------------------------------------------------------------
// Cross-site refusal

/// Six cross-site embeds neither mint nor spend the visitor's budget: with burst 5, the
/// visitor's own mint afterwards still succeeds (the old gateway answered 429 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_before_the_limiter() {
    let rig = start(|b| b.section("rate_limit", "requests_per_minute = 10\nburst = 5")).await;
    for _ in 0..6 {
        let r = rig.get(ONRAMP, &[("sec-fetch-site", "cross-site")]).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("cross-site request refused"));
    }
    let r = rig
        .get(
            ONRAMP,
            &[
                ("sec-fetch-site", "same-site"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "same-site is off by default"
    );
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "JSON clients get problem+json"
    );
    // Without Fetch Metadata, a foreign Referer is refused the same way.
    let r = rig
        .get(ONRAMP, &[("referer", "https://evil.example/page")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(rig.fake.count(), 0, "no CDP call for any refusal");
    assert_eq!(rig.refused("fetch_site").await, 7.0);
    assert_eq!(rig.refused("referer").await, 1.0);
    assert_eq!(rig.refused("rate_limited").await, 0.0);

    // The visitor's own requests: typed URL, same-origin link, own Referer, no headers.
    let own = format!("https://localhost:{}/shop", rig.gw.https_addr.port());
    for headers in [
        vec![("sec-fetch-site", "none")],
        vec![("sec-fetch-site", "same-origin")],
        vec![("referer", own.as_str())],
        vec![],
    ] {
        let r = rig.get(ONRAMP, &headers).await;
        assert_eq!(
            r.status(),
            StatusCode::FOUND,
            "{headers:?}: {}",
            rig.gw.logs()
        );
    }
    assert_eq!(rig.fake.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_cors_origin_may_mint_cross_site() {
    let rig = start(|b| b.section("cors", "allowed_origins = [\"https://partner.example\"]")).await;
    let body = json!({"addresses": [{"address": ADDR, "blockchains": ["base"]}]});
    let post = |origin: &'static str| {
        rig.client
            .post(rig.gw.url("/onramp"))
            .header("sec-fetch-site", "cross-site")
            .header("origin", origin)
            .header("accept", "application/json")
            .json(&body)
            .send()
    };
    let r = post("https://partner.example").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post("https://other.example").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(rig.fake.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_site_can_be_allowed() {
    let rig = start(|b| {
        b.section(
            "onramp",
            "allowed_fetch_sites = [\"same-origin\", \"same-site\", \"none\"]",
        )
    })
    .await;
    let r = rig.get(ONRAMP, &[("sec-fetch-site", "same-site")]).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let r = rig.get(ONRAMP, &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

// ---------------------------------------------------------------------------------------
// Tickets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_mints_for_its_own_address_once() {
    let rig = start(ticket_config).await;
    let t = sign(&ticket_claims("jti-1"));
    // The browser's address is ignored: the ticket's is minted for.
    let path = format!("{ONRAMP}&defaultAsset=USDC&ticket={t}");
    let r = rig.get(&path, &[]).await;
    assert_eq!(r.status(), StatusCode::FOUND, "{}", rig.gw.logs());
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.contains("defaultAsset=USDC"), "{loc}");
    assert!(loc.contains("partnerUserRef=user-42"), "{loc}");
    assert!(
        !loc.contains("ticket"),
        "the ticket never reaches Coinbase: {loc}"
    );
    let body = &rig.fake.requests()[0].body;
    assert_eq!(body["addresses"][0]["address"], TICKET_ADDR);
    rig.fake.assert_all_verified();

    // Replay: 409, no CDP call.
    let r = rig.get(&path, &[]).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(rig.fake.count(), 1);
    assert_eq!(rig.refused("ticket_replayed").await, 1.0);

    // JSON and form carriers.
    let r = rig
        .client
        .post(rig.gw.url("/onramp"))
        .header("accept", "application/json")
        .json(&json!({"ticket": sign(&ticket_claims("jti-json")), "addresses": [{"address": ADDR, "blockchains": ["base"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = rig
        .client
        .post(rig.gw.url("/onramp"))
        .form(&[("ticket", sign(&ticket_claims("jti-form")))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(rig
        .fake
        .requests()
        .iter()
        .all(|r| r.body["addresses"][0]["address"] == TICKET_ADDR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tickets_are_refused_without_cdp_calls() {
    let rig = start(ticket_config).await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut expired = ticket_claims("e");
    expired["iat"] = json!(now() - 600);
    expired["exp"] = json!(now() - 300);
    let mut no_jti = ticket_claims("x");
    no_jti.as_object_mut().unwrap().remove("jti");
    let mut too_long = ticket_claims("l");
    too_long["exp"] = json!(now() + 3600);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("garbage", Some("not.a.jwt".into())),
        ("expired", Some(sign(&expired))),
        (
            "wrong key",
            Some(sign_with(
                Algorithm::HS256,
                b"some-other-secret-some-other-secret!!",
                &ticket_claims("w"),
            )),
        ),
        (
            "HS512",
            Some(sign_with(
                Algorithm::HS512,
                SECRET.as_bytes(),
                &ticket_claims("h"),
            )),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
                b64.encode(ticket_claims("n").to_string())
            )),
        ),
        (
            "RS256 header",
            Some(format!(
                "{}.{}.{}",
                b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
                b64.encode(ticket_claims("r").to_string()),
                b64.encode([7u8; 64])
            )),
        ),
        ("missing jti", Some(sign(&no_jti))),
        ("too long-lived", Some(sign(&too_long))),
    ];
    for (name, ticket) in &cases {
        let path = match ticket {
            Some(t) => format!("{ONRAMP}&ticket={t}"),
            None => ONRAMP.to_string(),
        };
        let r = rig.get(&path, &[]).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
    assert_eq!(rig.fake.count(), 0);
    assert_eq!(rig.refused("ticket_invalid").await, cases.len() as f64);

    // Wrong flow: 403, and the ticket is not burned for its own route.
    let mut off = ticket_claims("flow-1");
    off["flow"] = json!("offramp");
    let t = sign(&off);
    let r = rig.get(&format!("{ONRAMP}&ticket={t}"), &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(rig.fake.count(), 0);
    // The gateway keeps serving.
    let r = rig
        .get(
            &format!("{ONRAMP}&ticket={}", sign(&ticket_claims("ok"))),
            &[],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FOUND);
}

#[test]
fn ticket_source_without_its_secret_is_refused_by_check() {
    let up_url = "http://127.0.0.1:9";
    let out = GatewayBuilder::new(up_url)
        .section("addresses", "source = \"ticket\"")
        .check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ONRAMP_TICKET_SECRET"), "{err}");
    let out = GatewayBuilder::new(up_url)
        .section("addresses", "source = \"ticket\"")
        .env("ONRAMP_TICKET_SECRET", "short")
        .check();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"));
    let out = GatewayBuilder::new(up_url)
        .section("addresses", "source = \"ticket\"")
        .env("ONRAMP_TICKET_SECRET", SECRET)
        .check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_warns_about_request_source_on_public_listener() {
    let out = GatewayBuilder::new("http://127.0.0.1:9")
        .section("server", "listen = \"0.0.0.0:0\"")
        .check();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: addresses.source = \"request\""),
        "{err}"
    );
    let out = GatewayBuilder::new("http://127.0.0.1:9")
        .section("server", "listen = \"127.0.0.1:0\"")
        .check();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// Two replicas sharing one Redis: a ticket used on one is refused on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_replay_is_refused_across_replicas() {
    install_provider();
    let redis = RedisServer::start();
    let redis_cfg = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\n{NO_LIMIT}",
        redis.url()
    );
    let a = start(|b| ticket_config(b).section("rate_limit", &redis_cfg)).await;
    let b = start(|b| ticket_config(b).section("rate_limit", &redis_cfg)).await;
    let t = sign(&ticket_claims("shared-jti"));
    let path = format!("{ONRAMP}&ticket={t}");
    assert_eq!(
        a.get(&path, &[]).await.status(),
        StatusCode::FOUND,
        "{}",
        a.gw.logs()
    );
    assert_eq!(b.get(&path, &[]).await.status(), StatusCode::CONFLICT);
    assert_eq!(a.get(&path, &[]).await.status(), StatusCode::CONFLICT);
    assert_eq!(a.fake.count() + b.fake.count(), 1);
    // The key expires with the ticket.
    let mut conn = redis.client().get_connection().unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("onramp-gateway:rl:jti:shared-jti")
        .query(&mut conn)
        .unwrap();
    assert!((100_000..=130_000).contains(&ttl), "PTTL {ttl}");
}

// ---------------------------------------------------------------------------------------
// Layered limits

/// A /48 spray through a trusted L4 balancer: each connection's PROXY v2 header names a
/// different /64; the per-IP bucket would let every one through, the /48 bucket holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash48_spray_is_held_by_the_prefix_bucket() {
    install_provider();
    let rig = start(|b| {
        b.section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
        )
        .section(
            "rate_limit",
            "requests_per_minute = 10\nburst = 2\naggregate_requests_per_minute = 6\naggregate_burst = 4",
        )
    })
    .await;
    let mut statuses = Vec::new();
    let mut last_policy = None;
    for n in 0..12u16 {
        let src = format!("[2001:db8:4242:{n:x}::1]:40000");
        let tls = connect_with_preamble(&rig.gw, None, &v2(&src, "[2001:db8::ffff]:443"))
            .await
            .expect("TLS over PROXY v2");
        let (status, headers, _) = h1_get(tls, ONRAMP, &[]).await;
        if status == 429 {
            last_policy = headers
                .get("ratelimit-policy")
                .map(|v| v.to_str().unwrap().to_string());
        }
        statuses.push(status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 302).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        8,
        "{statuses:?}"
    );
    assert_eq!(last_policy.as_deref(), Some("\"prefix\";q=4;w=40"));
    assert_eq!(rig.refused("aggregate_limited").await, 8.0);
    assert_eq!(rig.fake.count(), 4);
    // Another /48 is not affected.
    let tls = connect_with_preamble(
        &rig.gw,
        None,
        &v2("[2001:db8:9999::1]:1", "[2001:db8::ffff]:443"),
    )
    .await
    .unwrap();
    assert_eq!(h1_get(tls, ONRAMP, &[]).await.0, 302);
}

/// The global budget is one budget for all replicas on one Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_budget_holds_across_two_replicas() {
    install_provider();
    let redis = RedisServer::start();
    let cfg = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\n{NO_LIMIT}\nglobal_mints_per_second = 1",
        redis.url()
    );
    let a = start(|b| b.section("rate_limit", &cfg)).await;
    let b = start(|b| b.section("rate_limit", &cfg)).await;
    // Burst max(1, 1) = 1 across both; the next second's token may arrive mid-loop,
    // so at most 2 of 6 quick requests pass.
    let mut ok = 0;
    let mut limited = Vec::new();
    for i in 0..6 {
        let rig = if i % 2 == 0 { &a } else { &b };
        let r = rig.get(ONRAMP, &[]).await;
        match r.status() {
            StatusCode::FOUND => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited.push(
                r.headers()["ratelimit-policy"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            ),
            other => panic!("unexpected {other}"),
        }
    }
    assert!((1..=2).contains(&ok), "{ok} passed");
    assert!(
        limited.iter().all(|p| p == "\"global\";q=1;w=1"),
        "{limited:?}"
    );
    assert!(a.refused("global_limited").await + b.refused("global_limited").await >= 4.0);
}

/// `max_keys` reached: new clients meet `on_backend_error`, known ones are served, the
/// process keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_keys_applies_the_backend_policy() {
    install_provider();
    for (policy, expected) in [("deny", 503u16), ("allow", 302)] {
        let rig = start(|b| {
            b.section(
                "server",
                "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
            )
            .section(
                "rate_limit",
                &format!("{NO_LIMIT}\nmax_keys = 3\non_backend_error = \"{policy}\""),
            )
        })
        .await;
        let via = |ip: Ipv4Addr| {
            let gw = &rig.gw;
            async move {
                let tls =
                    connect_with_preamble(gw, None, &v2(&format!("{ip}:1000"), "192.0.2.200:443"))
                        .await
                        .unwrap();
                h1_get(tls, ONRAMP, &[]).await.0
            }
        };
        for d in 1..=3 {
            assert_eq!(via(Ipv4Addr::new(198, 51, 100, d)).await, 302);
        }
        for d in 10..20 {
            assert_eq!(
                via(Ipv4Addr::new(198, 51, 100, d)).await,
                expected,
                "{policy}"
            );
        }
        assert_eq!(
            via(Ipv4Addr::new(198, 51, 100, 1)).await,
            302,
            "known key served"
        );
        assert_eq!(rig.refused("limiter_full").await, 10.0);
    }
}

// ---------------------------------------------------------------------------------------
// CDP concurrency bound

/// A stalled CDP: at most `max_concurrent_cdp_calls` calls ever reach it at once; the
/// others wait up to `cdp.timeout_ms` and get 503 + Retry-After; all recovers with CDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_calls_in_flight_are_bounded() {
    const BOUND: usize = 4;
    let rig = start(|b| {
        b.section(
            "rate_limit",
            &format!("{NO_LIMIT}\nmax_concurrent_cdp_calls = {BOUND}"),
        )
        .section("cdp", "timeout_ms = 1500")
    })
    .await;
    rig.fake.set_mode(Mode::Slow(Duration::from_secs(30)));
    let mut tasks = Vec::new();
    for _ in 0..BOUND + 50 {
        let client = rig.client.clone();
        let url = rig.gw.url(ONRAMP);
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.expect("response");
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry)
        }));
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for t in tasks {
        let (status, retry) = t.await.unwrap();
        if status == 503 {
            assert_eq!(retry.as_deref(), Some("1"));
        }
        *by_status.entry(status).or_default() += 1;
    }
    // The first wave at the fake is exactly the bound. A call reaching the fake later
    // took a slot freed by a timed-out call (a waiter whose wait had not yet ended).
    let reqs = rig.fake.requests();
    let first = reqs
        .iter()
        .map(|r| r.received_at)
        .min()
        .expect("calls reached CDP");
    let first_wave = reqs
        .iter()
        .filter(|r| r.received_at < first + Duration::from_millis(1000))
        .count();
    assert_eq!(first_wave, BOUND, "{by_status:?}");
    // Every call that reached the stalled fake timed out (504); every other request got
    // 503 after its wait, without a CDP call.
    let n503 = by_status.get(&503).copied().unwrap_or(0);
    let n504 = by_status.get(&504).copied().unwrap_or(0);
    assert_eq!(n503 + n504, BOUND + 50, "{by_status:?}");
    assert_eq!(reqs.len(), n504, "{by_status:?}");
    assert!(n503 >= 40, "{by_status:?}");
    assert!(rig.refused("cdp_busy").await >= 40.0);

    rig.fake.set_mode(Mode::Ok);
    let r = rig.get(ONRAMP, &[]).await;
    assert_eq!(r.status(), StatusCode::FOUND);
}

/// The README's Python snippet (PyJWT), run as written, makes a ticket the gateway takes.
/// Needs the venv that `tests/run` sets up (`CDP_SDK_PYTHON`, which has PyJWT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_python_ticket_snippet_is_accepted() {
    let Some(python) = std::env::var_os("CDP_SDK_PYTHON") else {
        eprintln!(
            "SKIPPED mint_trust::readme_python_ticket_snippet_is_accepted: CDP_SDK_PYTHON unset (run ./tests/run)"
        );
        return;
    };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let heading = readme
        .find("Python ([PyJWT]")
        .expect("Python snippet heading");
    let code_start = readme[heading..].find("```python\n").expect("python block") + heading + 10;
    let code_end = readme[code_start..].find("```").expect("block end") + code_start;
    let snippet = &readme[code_start..code_end];
    let program = format!(
        "class User:\n    id = 42\nuser = User()\nwallet = {TICKET_ADDR:?}\n{snippet}\nprint(ticket)\n"
    );
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(&program)
        .env("ONRAMP_TICKET_SECRET", SECRET)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticket = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let rig = start(ticket_config).await;
    let r = rig
        .client
        .post(rig.gw.url("/onramp"))
        .form(&[("ticket", ticket.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{}", rig.gw.logs());
    assert_eq!(
        rig.fake.requests()[0].body["addresses"][0]["address"],
        TICKET_ADDR
    );
}
