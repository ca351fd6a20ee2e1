//! The routes the gateway answers itself (`/onramp`, `/offramp`), end to end through the
//! real binary: real TLS from the test client, a verifying fake CDP API (every JWT and body
//! checked), and a fake app.
//!
//! Every test starts its own gateway and fakes. Most tests raise the rate limit out of the
//! way ([`NO_LIMIT`]) so that only the rate-limit tests ever meet the limiter. "No CDP call"
//! is asserted with `fake.count()` after the response: the gateway calls CDP before it
//! answers, so the count is final by then and needs no waiting.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::certs::{self, Alpn};
use crate::common::context_app::{self, Anonymous, ContextApp};
use crate::common::fake_cdp::{FakeCdp, Mode, TestKey};
use crate::common::gateway::{field_str, run_binary, Gateway, GatewayBuilder};
use crate::common::metric;
use crate::common::upstream::{dead_address, Upstream};

/// A well-formed EVM address (lowercase: the EIP-55 checksum is not in play).
const ADDR: &str = "0x1111111111111111111111111111111111111111";
const OTHER_ADDR: &str = "0x2222222222222222222222222222222222222222";
const ONRAMP_URL: &str = "https://pay.coinbase.com/buy/select-asset";
const ALLOWED_ORIGIN: &str = "https://app.example.com";
/// So generous that only the rate-limit tests ever see a 429.
const NO_LIMIT: &str = "requests_per_minute = 60000\nburst = 1000";
/// Bounds every wait on a log line.
const LOG_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Fixtures

/// A gateway wired to its own fake CDP and fake app.
struct Rig {
    fake: FakeCdp,
    key: TestKey,
    up: Upstream,
    gw: Gateway,
    client: reqwest::Client,
}

impl Rig {
    /// `key` in `CDP_API_KEY_ID`/`CDP_API_KEY_SECRET`, `api_base` = the fake, no limit,
    /// then `configure` for the test's own settings (later sections override).
    async fn start(key: TestKey, configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Rig {
        let fake = FakeCdp::start(&key);
        let up = Upstream::start().await;
        let mut b = GatewayBuilder::new(&up.url())
            .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
            .section("rate_limit", NO_LIMIT);
        for (k, v) in key.env() {
            b = b.env(&k, &v);
        }
        let gw = configure(b).start().await;
        let client = gw.https_client(Alpn::H2AndHttp11);
        Rig {
            fake,
            key,
            up,
            gw,
            client,
        }
    }

    async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(self.gw.url(path_and_query))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
    }

    /// GET asking for `application/problem+json` errors.
    async fn get_json(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(self.gw.url(path_and_query))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
    }

    /// A plain onramp GET that must mint: 302 with the fake's newest token.
    async fn assert_mints(&self) {
        let before = self.fake.count();
        let resp = self.get(&onramp_query(ADDR, "base")).await;
        assert_eq!(resp.status(), StatusCode::FOUND, "{}", self.gw.logs());
        let token = self.fake.tokens().last().cloned().expect("a token");
        assert_eq!(param(&location(&resp), "sessionToken"), Some(token));
        assert_eq!(self.fake.count(), before + 1);
    }

    async fn metrics(&self) -> String {
        let (status, body) = self.gw.admin_get("/metrics").await;
        assert_eq!(status, 200);
        body
    }
}

/// Everything a key-form test needs: mint via GET and check the fake verified the JWT.
async fn assert_key_form_mints(
    key: TestKey,
    configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
) {
    let fake = FakeCdp::start(&key);
    let up = Upstream::start().await;
    let b = GatewayBuilder::new(&up.url())
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section("rate_limit", NO_LIMIT);
    let gw = configure(b).start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    // Two mints: each needs its own JWT (fresh nonce), or the fake refuses a replay.
    for _ in 0..2 {
        let resp = client
            .get(gw.url(&onramp_query(ADDR, "base")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::FOUND,
            "fake CDP failures: {:?}\nlogs:\n{}",
            fake.failures(),
            gw.logs()
        );
        let token = fake.tokens().last().cloned().expect("a token");
        assert_eq!(param(&location(&resp), "sessionToken"), Some(token));
    }
    fake.assert_all_verified();
    assert_eq!(fake.count(), 2);
    let want_alg = key.algorithm.to_string();
    for r in fake.requests() {
        assert_eq!(r.jwt_header["alg"], want_alg.as_str());
        assert_eq!(r.jwt_header["kid"], key.id.as_str());
        assert_eq!(r.claims["sub"], key.id.as_str());
    }
}

fn with_env(mut b: GatewayBuilder, vars: &[(&str, &str)]) -> GatewayBuilder {
    for (k, v) in vars {
        b = b.env(k, v);
    }
    b
}

/// Writes `json` to a fresh directory and points `[cdp] key_file` at it. The directory is
/// returned so it outlives the gateway start.
fn with_key_file(b: GatewayBuilder, json: &str) -> (GatewayBuilder, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cdp_api_key.json");
    std::fs::write(&path, json).expect("write key file");
    let path = path.to_string_lossy().into_owned();
    // Merge into [cdp] without losing api_base.
    (b.section("cdp", &format!("key_file = {path:?}")), dir)
}

fn onramp_query(address: &str, blockchains: &str) -> String {
    format!("/onramp?address={address}&blockchains={blockchains}")
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("location")
        .unwrap_or_else(|| panic!("no Location on {}", resp.status()))
        .to_str()
        .expect("ASCII Location")
        .to_string()
}

/// Decoded query pairs of a URL, in order.
fn query_pairs(url: &str) -> Vec<(String, String)> {
    url::Url::parse(url)
        .unwrap_or_else(|e| panic!("{url:?} is not a URL: {e}"))
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param(url: &str, name: &str) -> Option<String> {
    query_pairs(url)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn vary_has_origin(h: &HeaderMap) -> bool {
    h.get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("origin"))
}

/// The `detail` of a problem+json answer (asserting the content type).
async fn problem_detail(resp: reqwest::Response) -> String {
    let ct = header(resp.headers(), "content-type")
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct}"
    );
    let v: Value = resp.json().await.expect("problem+json body");
    v["detail"].as_str().unwrap_or_default().to_string()
}

fn is_access_log(e: &Value, path: &str) -> bool {
    field_str(e, "message") == Some("request") && field_str(e, "path") == Some(path)
}

/// Waits until `n` access-log lines for `path` were written (the line follows the response).
async fn wait_access_logs(gw: &Gateway, path: &str, n: usize) {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let seen = gw
            .log_events()
            .iter()
            .filter(|e| is_access_log(e, path))
            .count();
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} of {n} access log lines for {path}; logs:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client whose TCP connections leave from `local` (any 127/8 address is loopback on Linux).
fn client_from(gw: &Gateway, local: IpAddr) -> reqwest::Client {
    client_to(gw, gw.https_addr, Some(local))
}

/// A client that connects to `target` (for `localhost` URLs), optionally from `local`.
fn client_to(gw: &Gateway, target: SocketAddr, local: Option<IpAddr>) -> reqwest::Client {
    certs::install_provider();
    reqwest::Client::builder()
        .use_preconfigured_tls((*gw.client_config(Alpn::Http11)).clone())
        .resolve("localhost", target)
        .local_address(local)
        .no_proxy()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

// ---------------------------------------------------------------------------------------
// Key forms

/// The key in CDP_API_KEY_ID / CDP_API_KEY_SECRET, as Coinbase's SDKs read it.
async fn assert_env_key_mints(key: TestKey) {
    let (id, secret) = (key.id.clone(), key.secret_string.clone());
    assert_key_form_mints(key, |b| {
        with_env(
            b,
            &[("CDP_API_KEY_ID", &id), ("CDP_API_KEY_SECRET", &secret)],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_key_es256_sec1_mints() {
    assert_env_key_mints(TestKey::es256_sec1()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_key_es256_pkcs8_mints() {
    assert_env_key_mints(TestKey::es256_pkcs8()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_key_ed25519_mints() {
    assert_env_key_mints(TestKey::ed25519()).await;
}

/// Env files and Kubernetes secrets often carry a PEM on one line with literal `\n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_key_with_literal_backslash_n_mints() {
    let key = TestKey::es256_sec1();
    let escaped = key.secret_env_escaped();
    assert!(!escaped.contains('\n') && escaped.contains("\\n"));
    let id = key.id.clone();
    assert_key_form_mints(key, |b| {
        with_env(
            b,
            &[("CDP_API_KEY_ID", &id), ("CDP_API_KEY_SECRET", &escaped)],
        )
    })
    .await;
}

/// The older variable name with an `organizations/../apiKeys/..` id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_key_legacy_name_variable_mints() {
    let key = TestKey::es256_pkcs8().with_id(TestKey::legacy_id());
    let (id, secret) = (key.id.clone(), key.secret_string.clone());
    assert_key_form_mints(key, |b| {
        with_env(
            b,
            &[("CDP_API_KEY_NAME", &id), ("CDP_API_KEY_SECRET", &secret)],
        )
    })
    .await;
}

/// Today's portal download: `{"id", "privateKey"}` (Ed25519, the portal default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_id_and_private_key_mints() {
    let key = TestKey::ed25519();
    let json = key.key_file_json();
    let mut dir = None;
    assert_key_form_mints(key, |b| {
        let (b, d) = with_key_file(b, &json);
        dir = Some(d);
        b
    })
    .await;
    drop(dir);
}

/// The legacy download: `{"name", "privateKey"}` with a SEC1 PEM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_name_and_private_key_mints() {
    let key = TestKey::es256_sec1().with_id(TestKey::legacy_id());
    let json = key.legacy_key_file_json();
    let mut dir = None;
    assert_key_form_mints(key, |b| {
        let (b, d) = with_key_file(b, &json);
        dir = Some(d);
        b
    })
    .await;
    drop(dir);
}

/// `{"id", "secret"}` spelling with a PKCS#8 PEM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_id_and_secret_mints() {
    let key = TestKey::es256_pkcs8();
    let json = json!({ "id": key.id, "secret": key.secret_string }).to_string();
    let mut dir = None;
    assert_key_form_mints(key, |b| {
        let (b, d) = with_key_file(b, &json);
        dir = Some(d);
        b
    })
    .await;
    drop(dir);
}

// ---------------------------------------------------------------------------------------
// Route forms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_redirects_302_to_onramp_url_with_token_and_presets() {
    let rig = Rig::start(TestKey::es256_sec1(), |b| b).await;
    // Unknown params, a client-supplied sessionToken and appId must not reach the Location;
    // partnerUserId is the older name of partnerUserRef.
    let q = format!(
        "/onramp?address={ADDR}&blockchains=base,ethereum&defaultNetwork=base\
         &presetFiatAmount=25.50&fiatCurrency=usd&defaultExperience=buy&partnerUserId=user-42\
         &foo=bar&sessionToken=forged&appId=evil&addresses=x"
    );
    let resp = rig.get(&q).await;
    assert_eq!(resp.status(), StatusCode::FOUND, "{}", rig.gw.logs());
    // The client offers h2 first, as browsers do; minting works over HTTP/2.
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let h = resp.headers();
    assert_eq!(header(h, "cache-control"), Some("no-store"));
    assert_eq!(header(h, "referrer-policy"), Some("no-referrer"));
    assert!(vary_has_origin(h), "{h:?}");
    assert!(h.get("x-upstream").is_none(), "answered by the gateway");

    let loc = location(&resp);
    let token = rig.fake.tokens()[0].clone();
    assert!(
        loc.starts_with(&format!("{ONRAMP_URL}?sessionToken=")),
        "{loc}"
    );
    assert_eq!(
        query_pairs(&loc),
        vec![
            ("sessionToken".to_string(), token),
            ("defaultNetwork".into(), "base".into()),
            ("presetFiatAmount".into(), "25.50".into()),
            ("fiatCurrency".into(), "USD".into()),
            ("defaultExperience".into(), "buy".into()),
            ("partnerUserRef".into(), "user-42".into()),
        ]
    );
    assert!(
        !loc.to_lowercase().contains(&ADDR[2..]),
        "address leaked: {loc}"
    );

    rig.fake.assert_all_verified();
    let reqs = rig.fake.requests();
    assert_eq!(reqs.len(), 1);
    // The exact documented body: `assets` omitted when empty, clientIp = the socket peer.
    assert_eq!(
        reqs[0].body,
        json!({
            "addresses": [{"address": ADDR, "blockchains": ["base", "ethereum"]}],
            "clientIp": "127.0.0.1",
        })
    );
    assert_eq!(rig.up.requests(), 0, "/onramp must not be proxied");

    wait_access_logs(&rig.gw, "/onramp", 1).await;
    let m = rig.metrics().await;
    assert_eq!(
        metric(
            &m,
            "onramp_gateway_token_mints_total",
            &[("kind", "onramp"), ("result", "ok")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "onramp_gateway_cdp_request_duration_seconds_count", &[]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_post_answers_303() {
    let rig = Rig::start(TestKey::ed25519(), |b| b).await;
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .form(&[
            ("address", ADDR),
            ("blockchains", "base"),
            ("assets", "USDC"),
            ("defaultAsset", "USDC"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{}", rig.gw.logs());
    assert_eq!(header(resp.headers(), "cache-control"), Some("no-store"));
    let loc = location(&resp);
    assert!(loc.starts_with(ONRAMP_URL), "{loc}");
    assert_eq!(
        param(&loc, "sessionToken"),
        Some(rig.fake.tokens()[0].clone())
    );
    assert_eq!(param(&loc, "defaultAsset").as_deref(), Some("USDC"));
    assert!(!loc.contains(&ADDR[2..]));
    rig.fake.assert_all_verified();
    assert_eq!(
        rig.fake.requests()[0].body,
        json!({
            "addresses": [{"address": ADDR, "blockchains": ["base"]}],
            "assets": ["USDC"],
            "clientIp": "127.0.0.1",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_post_answers_200_with_token_and_url() {
    let rig = Rig::start(TestKey::es256_pkcs8(), |b| b).await;
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .header("accept", "application/json")
        .json(&json!({
            "addresses": [
                {"address": ADDR, "blockchains": ["base"]},
                {"address": OTHER_ADDR, "blockchains": ["ethereum"]},
            ],
            "assets": ["USDC", "ETH"],
            "defaultNetwork": "ethereum",
            "presetCryptoAmount": "0.5",
            "unknownThing": "dropped",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", rig.gw.logs());
    assert_eq!(header(resp.headers(), "cache-control"), Some("no-store"));
    assert!(header(resp.headers(), "content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let v: Value = resp.json().await.unwrap();
    let token = rig.fake.tokens()[0].clone();
    assert_eq!(v["sessionToken"], token.as_str());
    let url = v["url"].as_str().expect("url").to_string();
    assert!(url.starts_with(ONRAMP_URL), "{url}");
    assert_eq!(
        query_pairs(&url),
        vec![
            ("sessionToken".to_string(), token),
            ("defaultNetwork".into(), "ethereum".into()),
            ("presetCryptoAmount".into(), "0.5".into()),
        ]
    );
    assert!(!url.contains(&ADDR[2..]) && !url.contains(&OTHER_ADDR[2..]));
    rig.fake.assert_all_verified();
    assert_eq!(
        rig.fake.requests()[0].body,
        json!({
            "addresses": [
                {"address": ADDR, "blockchains": ["base"]},
                {"address": OTHER_ADDR, "blockchains": ["ethereum"]},
            ],
            "assets": ["USDC", "ETH"],
            "clientIp": "127.0.0.1",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allowed_origin_gets_its_own_origin_back() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section(
            "cors",
            &format!("allowed_origins = [\"{ALLOWED_ORIGIN}\", \"https://other.example\"]"),
        )
    })
    .await;

    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .header("origin", ALLOWED_ORIGIN)
        .header("accept", "application/json")
        .json(&json!({"addresses": [{"address": ADDR, "blockchains": ["base"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", rig.gw.logs());
    let h = resp.headers();
    assert_eq!(
        header(h, "access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    assert_eq!(header(h, "access-control-allow-credentials"), Some("true"));
    assert!(vary_has_origin(h), "{h:?}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["sessionToken"], rig.fake.tokens()[0].as_str());

    // The gateway's own origin (a form on a page served through it) is not cross-origin.
    let own = format!("https://localhost:{}", rig.gw.https_addr.port());
    let resp = rig
        .client
        .get(rig.gw.url(&onramp_query(ADDR, "base")))
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    rig.fake.assert_all_verified();
    assert_eq!(rig.fake.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_from_allowed_origin_is_204() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("cors", &format!("allowed_origins = [\"{ALLOWED_ORIGIN}\"]"))
    })
    .await;
    let resp = rig
        .client
        .request(reqwest::Method::OPTIONS, rig.gw.url("/onramp"))
        .header("origin", ALLOWED_ORIGIN)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers();
    assert_eq!(
        header(h, "access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let methods = header(h, "access-control-allow-methods").unwrap_or_default();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let allowed_headers = header(h, "access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("content-type"),
        "{allowed_headers}"
    );
    assert!(vary_has_origin(h));
    assert_eq!(rig.fake.count(), 0, "a preflight never mints");
    assert_eq!(rig.up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_origin_is_403_without_cdp_call_or_rate_limit_slot() {
    // burst = 1: if any refused request took a rate-limit slot, the final good one would 429.
    let rig = Rig::start(TestKey::es256_sec1(), |b| {
        b.section("cors", &format!("allowed_origins = [\"{ALLOWED_ORIGIN}\"]"))
            .section("rate_limit", "requests_per_minute = 1\nburst = 1")
    })
    .await;
    let q = onramp_query(ADDR, "base");
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.net",
        "http://app.example.com",
        "null",
    ] {
        let resp = rig
            .client
            .get(rig.gw.url(&q))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "GET from {origin}");
        assert!(resp.headers().get("access-control-allow-origin").is_none());

        let resp = rig
            .client
            .post(rig.gw.url("/onramp"))
            .header("origin", origin)
            .header("accept", "application/json")
            .json(&json!({"addresses": [{"address": ADDR, "blockchains": ["base"]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "POST from {origin}");
        assert!(resp.headers().get("access-control-allow-origin").is_none());

        let resp = rig
            .client
            .request(reqwest::Method::OPTIONS, rig.gw.url("/onramp"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::FORBIDDEN,
            "OPTIONS from {origin}"
        );
        assert!(resp.headers().get("access-control-allow-origin").is_none());
    }
    assert_eq!(
        rig.fake.count(),
        0,
        "a refused origin must cost no CDP call"
    );
    assert_eq!(rig.up.requests(), 0);

    let resp = rig.get(&q).await;
    assert_eq!(
        resp.status(),
        StatusCode::FOUND,
        "refused origins must not have used the rate-limit slot"
    );
    rig.fake.assert_all_verified();
}

// ---------------------------------------------------------------------------------------
// Validation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_400_naming_the_field_without_cdp_call() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("offramp", "redirect_url_allowlist = [\"https://app.com\"]")
    })
    .await;
    let long_ref = "u".repeat(50);
    let cases: Vec<(String, &str)> = vec![
        (onramp_query("0x123", "base"), "address"),
        (onramp_query(&format!("{ADDR}zz"), "base"), "address"),
        (
            onramp_query("0x0000000000000000000000000000000000000000", "base"),
            "address",
        ),
        (onramp_query(ADDR, "solana"), "blockchains"),
        (onramp_query(ADDR, "base,polygon"), "blockchains"),
        ("/onramp?blockchains=base".to_string(), "address"),
        (format!("/onramp?address={ADDR}"), "blockchains"),
        (
            format!("{}&partnerUserRef={long_ref}", onramp_query(ADDR, "base")),
            "partnerUserRef",
        ),
        (
            format!("{}&partnerUserId={long_ref}", onramp_query(ADDR, "base")),
            "partnerUser",
        ),
        (
            format!(
                "{}&redirectUrl=https%3A%2F%2Fevil.net%2F",
                onramp_query(ADDR, "base")
            ),
            "redirectUrl",
        ),
        (
            format!("{}&presetFiatAmount=-5", onramp_query(ADDR, "base")),
            "presetFiatAmount",
        ),
    ];
    for (q, field_name) in &cases {
        let resp = rig.get_json(q).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{q}");
        let detail = problem_detail(resp).await;
        assert!(
            detail.starts_with(field_name),
            "{q}: detail {detail:?} does not name {field_name}"
        );
    }

    // A browser without Accept: JSON gets a small HTML page, still naming the field.
    let resp = rig.get(&onramp_query("0x123", "base")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let ct = header(resp.headers(), "content-type")
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(resp.text().await.unwrap().contains("address"));

    // 49 characters is the longest partnerUserRef Coinbase accepts ("less than 50").
    let ok_ref = "u".repeat(49);
    let before_ok = rig.fake.count();
    assert_eq!(before_ok, 0, "no validation failure may reach CDP");
    let resp = rig
        .get(&format!(
            "{}&partnerUserRef={ok_ref}",
            onramp_query(ADDR, "base")
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(param(&location(&resp), "partnerUserRef"), Some(ok_ref));
    rig.fake.assert_all_verified();
    assert_eq!(rig.fake.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_too_many_addresses_is_400() {
    let rig = Rig::start(TestKey::ed25519(), |b| b).await;
    let addresses: Vec<Value> = (1..=11)
        .map(|i| json!({"address": format!("0x{i:040x}"), "blockchains": ["base"]}))
        .collect();
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .header("accept", "application/json")
        .json(&json!({ "addresses": addresses }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let detail = problem_detail(resp).await;
    assert!(detail.starts_with("addresses"), "{detail}");

    // Malformed JSON and a missing addresses list are 400 too.
    for body in ["{not json", "{\"assets\":[\"USDC\"]}"] {
        let resp = rig
            .client
            .post(rig.gw.url("/onramp"))
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(rig.fake.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_and_unsupported_type_is_415() {
    let rig = Rig::start(TestKey::ed25519(), |b| b).await;

    // Announced by Content-Length.
    let padding = "x".repeat(17 * 1024);
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .form(&[
            ("address", ADDR),
            ("blockchains", "base"),
            ("quoteId", &padding),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Chunked, so the cap must hold while reading, not just on the header.
    let mut tls = rig.gw.tls_connect(Alpn::Http11).await;
    let chunk = format!(
        "address={ADDR}&blockchains=base&x={}",
        "y".repeat(20 * 1024)
    );
    let req = format!(
        "POST /onramp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    for ct in [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        let resp = rig
            .client
            .post(rig.gw.url("/onramp"))
            .header("content-type", ct)
            .body(format!("address={ADDR}&blockchains=base"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
    }
    let resp = rig
        .client
        .put(rig.gw.url(&onramp_query(ADDR, "base")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(header(resp.headers(), "allow").is_some_and(|a| a.contains("GET")));
    assert_eq!(rig.fake.count(), 0);
    assert_eq!(rig.up.requests(), 0, "the minting paths are never proxied");
    rig.assert_mints().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offramp_requires_partner_user_ref_and_redirect_url() {
    let offramp_url = "https://pay.example.test/v3/sell/input";
    let rig = Rig::start(TestKey::es256_sec1(), |b| {
        b.section("offramp", "redirect_url_allowlist = [\"https://app.com\"]")
            .section("offramp", &format!("url = \"{offramp_url}\""))
    })
    .await;
    let base = format!("/offramp?address={ADDR}&blockchains=base");
    let redirect = "redirectUrl=https%3A%2F%2Fapp.com%2Fdone";

    let resp = rig.get_json(&format!("{base}&{redirect}")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(problem_detail(resp).await.starts_with("partnerUserRef"));

    let resp = rig.get_json(&format!("{base}&partnerUserRef=user-7")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(problem_detail(resp).await.starts_with("redirectUrl"));
    assert_eq!(rig.fake.count(), 0);

    let resp = rig
        .get(&format!(
            "{base}&partnerUserRef=user-7&{redirect}&defaultCashoutMethod=ACH_BANK_ACCOUNT\
             &disableEdit=true&presetFiatAmount=10&junk=1"
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND, "{}", rig.gw.logs());
    assert_eq!(header(resp.headers(), "cache-control"), Some("no-store"));
    let loc = location(&resp);
    assert!(
        loc.starts_with(&format!("{offramp_url}?sessionToken=")),
        "{loc}"
    );
    assert_eq!(
        query_pairs(&loc),
        vec![
            ("sessionToken".to_string(), rig.fake.tokens()[0].clone()),
            ("presetFiatAmount".into(), "10".into()),
            ("partnerUserRef".into(), "user-7".into()),
            ("redirectUrl".into(), "https://app.com/done".into()),
            ("defaultCashoutMethod".into(), "ACH_BANK_ACCOUNT".into()),
            ("disableEdit".into(), "true".into()),
        ]
    );
    assert!(!loc.contains(&ADDR[2..]));
    rig.fake.assert_all_verified();
    assert_eq!(rig.fake.count(), 1);

    // The offramp-only presets are dropped on onramp.
    let resp = rig
        .get(&format!(
            "{}&defaultCashoutMethod=ACH_BANK_ACCOUNT&disableEdit=true",
            onramp_query(ADDR, "base")
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let names: Vec<String> = query_pairs(&location(&resp))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names, ["sessionToken"]);

    wait_access_logs(&rig.gw, "/offramp", 3).await;
    let m = rig.metrics().await;
    assert_eq!(
        metric(
            &m,
            "onramp_gateway_token_mints_total",
            &[("kind", "offramp"), ("result", "ok")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_url_allowlist_follows_portal_rules() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section(
            "offramp",
            "redirect_url_allowlist = [\"https://app.com\", \"https://*.example.org\", \"myapp://callback\"]",
        )
    })
    .await;
    let cases: &[(&str, bool)] = &[
        ("https://app.com", true),
        ("https://app.com/done?x=1", true),
        ("https://app.com.evil.net/", false),
        ("http://app.com/done", false),
        ("https://app.com:8443/", false),
        ("https://app.com@evil.net/", false),
        ("https://evil.com/https://app.com", false),
        ("https://shop.example.org/thanks", true),
        ("https://example.org.evil.net/", false),
        ("http://shop.example.org/", false),
        ("myapp://callback", true),
        ("myapp://callback/done", true),
        ("myapp://callbackx", false),
        ("otherapp://callback", false),
        ("javascript:alert(1)", false),
    ];
    let mut accepted = 0;
    for (url, ok) in cases {
        let enc: String = form_urlencoded::byte_serialize(url.as_bytes()).collect();
        let q = format!("{}&redirectUrl={enc}", onramp_query(ADDR, "base"));
        let resp = rig.get_json(&q).await;
        if *ok {
            accepted += 1;
            assert_eq!(resp.status(), StatusCode::FOUND, "{url} must be accepted");
            let sent = param(&location(&resp), "redirectUrl").expect("redirectUrl passed");
            // The normalised URL is forwarded; it must still be the same target.
            assert!(
                sent.trim_end_matches('/') == url.trim_end_matches('/'),
                "{url} forwarded as {sent}"
            );
        } else {
            assert_eq!(
                resp.status(),
                StatusCode::BAD_REQUEST,
                "{url} must be refused"
            );
            assert!(problem_detail(resp).await.starts_with("redirectUrl"));
        }
    }
    assert_eq!(rig.fake.count(), accepted, "refused URLs cost no CDP call");
    rig.fake.assert_all_verified();
}

// ---------------------------------------------------------------------------------------
// Client IP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_is_the_socket_peer_and_spoofed_headers_are_ignored() {
    let rig = Rig::start(TestKey::es256_sec1(), |b| b).await;
    let resp = rig
        .client
        .get(rig.gw.url(&onramp_query(ADDR, "base")))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-real-ip", "203.0.113.10")
        .header("forwarded", "for=203.0.113.11;proto=https")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    rig.fake.assert_all_verified();
    assert_eq!(rig.fake.requests()[0].body["clientIp"], "127.0.0.1");

    let ev = rig
        .gw
        .wait_for_log(LOG_WAIT, "access log for /onramp", |e| {
            is_access_log(e, "/onramp")
        })
        .await;
    assert_eq!(field_str(&ev, "client_ip"), Some("127.0.0.1"), "{ev}");
    // A loopback client on a minting route means an undeclared proxy: the operator is told.
    rig.gw
        .wait_for_log(LOG_WAIT, "private client IP warning", |e| {
            field_str(e, "message").is_some_and(|m| m.contains("private client IP"))
        })
        .await;
}

/// A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`; Coinbase must get `a.b.c.d`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_peer_is_sent_to_cdp_as_ipv4() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("server", "listen = \"[::]:0\"")
    })
    .await;
    let port = rig.gw.https_addr.port();
    let v4 = client_to(&rig.gw, SocketAddr::from(([127, 0, 0, 1], port)), None);
    let v6 = client_to(
        &rig.gw,
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        None,
    );
    let url = rig.gw.url(&onramp_query(ADDR, "base"));
    assert_eq!(
        v4.get(&url).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    assert_eq!(
        v6.get(&url).send().await.unwrap().status(),
        StatusCode::FOUND
    );
    rig.fake.assert_all_verified();
    let ips: Vec<Value> = rig
        .fake
        .requests()
        .iter()
        .map(|r| r.body["clientIp"].clone())
        .collect();
    assert_eq!(ips, [json!("127.0.0.1"), json!("::1")]);
    wait_access_logs(&rig.gw, "/onramp", 2).await;
    let logged: Vec<String> = rig
        .gw
        .log_events()
        .iter()
        .filter(|e| is_access_log(e, "/onramp"))
        .filter_map(|e| field_str(e, "client_ip").map(str::to_string))
        .collect();
    assert_eq!(logged, ["127.0.0.1", "::1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_client_ip_is_substituted_and_warned_about_once() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section(
            "cdp",
            "substitute_private_client_ip = \"192.0.2.1\"\ntimeout_ms = 5000",
        )
    })
    .await;
    // Like the real API: a private clientIp would be refused.
    rig.fake.set_reject_private_client_ip(true);
    for _ in 0..3 {
        rig.assert_mints().await;
    }
    rig.fake.assert_all_verified();
    for r in rig.fake.requests() {
        assert_eq!(r.body["clientIp"], "192.0.2.1");
    }
    wait_access_logs(&rig.gw, "/onramp", 3).await;
    let warnings: Vec<Value> = rig
        .gw
        .log_events()
        .into_iter()
        .filter(|e| field_str(e, "message").is_some_and(|m| m.contains("private client IP")))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    assert_eq!(field_str(w, "level"), Some("WARN"), "{w}");
    let text = w.to_string();
    assert!(
        text.contains("proxy_protocol") && text.contains("trusted_proxies"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_keyed_by_client_ip() {
    // One request per minute after a burst of 2: nothing refills during the test.
    let rig = Rig::start(TestKey::es256_sec1(), |b| {
        b.section("rate_limit", "requests_per_minute = 1\nburst = 2")
    })
    .await;
    let a = client_from(&rig.gw, "127.0.0.1".parse().unwrap());
    let b = client_from(&rig.gw, "127.0.0.2".parse().unwrap());
    let url = rig.gw.url(&onramp_query(ADDR, "base"));
    for _ in 0..2 {
        assert_eq!(
            a.get(&url).send().await.unwrap().status(),
            StatusCode::FOUND
        );
    }
    assert_eq!(
        a.get(&url).send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let resp = b.get(&url).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FOUND,
        "127.0.0.2 has its own bucket"
    );
    assert_eq!(
        param(&location(&resp), "sessionToken"),
        rig.fake.tokens().last().cloned()
    );
    assert_eq!(
        a.get(&url).send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    rig.fake.assert_all_verified();
    let ips: Vec<Value> = rig
        .fake
        .requests()
        .iter()
        .map(|r| r.body["clientIp"].clone())
        .collect();
    assert_eq!(
        ips,
        [json!("127.0.0.1"), json!("127.0.0.1"), json!("127.0.0.2")]
    );
    wait_access_logs(&rig.gw, "/onramp", 5).await;
    assert!(rig
        .gw
        .log_events()
        .iter()
        .any(|e| is_access_log(e, "/onramp") && field_str(e, "client_ip") == Some("127.0.0.2")));
}

// ---------------------------------------------------------------------------------------
// Rate limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_request_in_burst_is_429_with_headers_and_no_cdp_call() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("rate_limit", "requests_per_minute = 60\nburst = 2")
    })
    .await;
    let q = onramp_query(ADDR, "base");
    // The burst is spent well within the 1 s emission interval (local fakes answer in ms).
    for _ in 0..2 {
        assert_eq!(rig.get(&q).await.status(), StatusCode::FOUND);
    }
    let resp = rig.get_json(&q).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers().clone();
    let retry: u64 = header(&h, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // IETF httpapi draft: quota 2 per ceil(2 × 1 s) = 2 s.
    assert_eq!(
        header(&h, "ratelimit-policy"),
        Some("\"ip\";q=2;w=2"),
        "{h:?}"
    );
    let rl = header(&h, "ratelimit").expect("RateLimit header");
    assert!(rl.starts_with("\"ip\";r=0;t="), "{rl}");
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    assert!(!problem_detail(resp).await.is_empty());

    assert_eq!(
        rig.fake.count(),
        2,
        "the limited request must not reach CDP"
    );
    rig.fake.assert_all_verified();
    assert_eq!(rig.up.requests(), 0);

    let m = rig.metrics().await;
    assert_eq!(
        metric(&m, "onramp_gateway_rate_limited_total", &[]),
        Some(1.0),
        "{m}"
    );
}

/// The limit comes before validation (README: origin → method → rate limit → validation),
/// so a client cannot probe the validator, or the app's context route, without limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_count_against_the_rate_limit() {
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("rate_limit", "requests_per_minute = 1\nburst = 2")
    })
    .await;
    for _ in 0..2 {
        let resp = rig.get(&onramp_query("0xbad", "base")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    let resp = rig.get(&onramp_query(ADDR, "base")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(rig.fake.count(), 0);
}

// ---------------------------------------------------------------------------------------
// CDP failures: each mapped status, then the gateway must still mint.

/// One failing mint under `mode`, answered `want`; then a normal mint succeeds.
async fn cdp_failure_maps_to(mode: Mode, want: StatusCode) -> (Rig, HeaderMap) {
    let rig = Rig::start(TestKey::es256_sec1(), |b| {
        b.section("cdp", "timeout_ms = 1000")
    })
    .await;
    rig.fake.set_mode(mode.clone());
    let started = Instant::now();
    let resp = rig.get_json(&onramp_query(ADDR, "base")).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), want, "{mode:?}\n{}", rig.gw.logs());
    assert!(took < Duration::from_secs(5), "{mode:?} took {took:?}");
    let h = resp.headers().clone();
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    assert!(h.get("location").is_none());
    // No internals in the public answer (the fake's message goes to the log only).
    let detail = problem_detail(resp).await;
    assert!(
        !detail.contains("fake") && !detail.contains("invalid address"),
        "{detail}"
    );
    assert_eq!(rig.fake.count(), 1);
    rig.fake.assert_all_verified();

    rig.fake.set_mode(Mode::Ok);
    rig.assert_mints().await;
    rig.fake.assert_all_verified();
    (rig, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_500_is_502() {
    cdp_failure_maps_to(Mode::ServerError, StatusCode::BAD_GATEWAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_400_is_502_with_message_in_log() {
    let (rig, _) = cdp_failure_maps_to(Mode::InvalidAddress, StatusCode::BAD_GATEWAY).await;
    rig.gw
        .wait_for_log(LOG_WAIT, "CDP's message", |e| {
            e.to_string().contains("invalid address")
        })
        .await;

    // Another 4xx with a distinctive message.
    rig.fake.set_mode(Mode::Custom {
        status: 403,
        body: json!({"code": 7, "message": "permission denied: key lacks onramp scope 7f3a"})
            .to_string(),
    });
    let resp = rig.get(&onramp_query(ADDR, "base")).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    rig.gw
        .wait_for_log(LOG_WAIT, "CDP's 403 message", |e| {
            e.to_string().contains("key lacks onramp scope 7f3a")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_429_is_503_with_retry_after() {
    let (_rig, h) = cdp_failure_maps_to(Mode::RateLimited, StatusCode::SERVICE_UNAVAILABLE).await;
    let retry: u64 = header(&h, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!(retry >= 1, "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_slower_than_timeout_is_504() {
    // timeout_ms = 1000 in the fixture; the fake would take 10 s.
    cdp_failure_maps_to(
        Mode::Slow(Duration::from_secs(10)),
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_garbage_is_502() {
    cdp_failure_maps_to(Mode::Garbage, StatusCode::BAD_GATEWAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_huge_answer_is_502_and_gateway_stays_fine() {
    let (rig, _) = cdp_failure_maps_to(Mode::Huge, StatusCode::BAD_GATEWAY).await;
    assert_eq!(rig.gw.admin_get("/healthz").await.0, 200);
    assert_eq!(rig.get("/echo").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_answer_without_token_is_502() {
    cdp_failure_maps_to(Mode::NoToken, StatusCode::BAD_GATEWAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_hangup_is_502() {
    cdp_failure_maps_to(Mode::Hangup, StatusCode::BAD_GATEWAY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_unreachable_is_502_and_gateway_keeps_serving() {
    let key = TestKey::es256_sec1();
    let up = Upstream::start().await;
    let mut b = GatewayBuilder::new(&up.url())
        .section(
            "cdp",
            &format!(
                "api_base = \"http://{}\"\ntimeout_ms = 2000",
                dead_address()
            ),
        )
        .section("rate_limit", NO_LIMIT);
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = b.start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    for _ in 0..2 {
        let resp = client
            .get(gw.url(&onramp_query(ADDR, "base")))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert!(resp.headers().get("location").is_none());
    }
    let resp = client.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "proxying is unaffected");
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    gw.wait_for_log(LOG_WAIT, "CDP failure logged", |e| {
        field_str(e, "message").is_some_and(|m| m.contains("CDP request failed"))
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Addresses from the app (addresses.source = "upstream")

async fn context_rig(anonymous: Anonymous) -> (FakeCdp, ContextApp, Gateway, reqwest::Client) {
    let key = TestKey::ed25519();
    let fake = FakeCdp::start(&key);
    let app = ContextApp::start(anonymous).await;
    let mut b = GatewayBuilder::new(&app.url())
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section("rate_limit", NO_LIMIT)
        .section("addresses", "source = \"upstream\"");
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = b.start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    (fake, app, gw, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_mints_for_the_apps_address_only() {
    let (fake, app, gw, client) = context_rig(Anonymous::Unauthorized).await;
    // The client's own address and blockchains must be ignored.
    let resp = client
        .get(gw.url(&format!(
            "/onramp?address={OTHER_ADDR}&blockchains=ethereum&defaultAsset=USDC&partnerUserRef=mallory"
        )))
        .header("cookie", context_app::SESSION_COOKIE)
        .header("authorization", "Bearer app-session-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND, "{}", gw.logs());
    let loc = location(&resp);
    assert_eq!(param(&loc, "sessionToken"), fake.tokens().first().cloned());
    assert_eq!(param(&loc, "defaultAsset").as_deref(), Some("USDC"));
    // The app knows who the user is: its partnerUserRef wins over the client's.
    assert_eq!(param(&loc, "partnerUserRef").as_deref(), Some("alice"));
    assert!(!loc.contains(&context_app::APP_ADDRESS[2..]));

    fake.assert_all_verified();
    assert_eq!(
        fake.requests()[0].body,
        json!({
            "addresses": [{"address": context_app::APP_ADDRESS, "blockchains": ["base"]}],
            "assets": ["USDC"],
            "clientIp": "127.0.0.1",
        })
    );
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, context_app::CONTEXT_PATH);
    let h = &seen[0].headers;
    assert_eq!(header(h, "cookie"), Some(context_app::SESSION_COOKIE));
    assert_eq!(header(h, "authorization"), Some("Bearer app-session-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_relays_the_apps_401_unchanged() {
    let (fake, app, gw, client) = context_rig(Anonymous::Unauthorized).await;
    let resp = client
        .get(gw.url(&onramp_query(ADDR, "base")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "x-upstream"), Some("context-app"));
    assert_eq!(
        header(&h, "www-authenticate"),
        Some("Cookie realm=\"context-app\"")
    );
    assert_eq!(
        header(&h, "set-cookie"),
        Some("login_nonce=n1; Path=/; HttpOnly")
    );
    assert_eq!(resp.text().await.unwrap(), context_app::LOGIN_REQUIRED_BODY);
    assert_eq!(fake.count(), 0, "no session, no mint");
    assert_eq!(app.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_relays_the_apps_login_redirect() {
    let (fake, _app, gw, client) = context_rig(Anonymous::RedirectToLogin).await;
    let resp = client
        .get(gw.url(&onramp_query(ADDR, "base")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(location(&resp), context_app::LOGIN_LOCATION);
    assert_eq!(header(resp.headers(), "x-upstream"), Some("context-app"));
    assert_eq!(fake.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_app_error_is_502() {
    let (fake, app, gw, client) = context_rig(Anonymous::Unauthorized).await;
    app.set_broken(true);
    let resp = client
        .get(gw.url(&onramp_query(ADDR, "base")))
        .header("cookie", context_app::SESSION_COOKIE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers().get("x-upstream").is_none());
    assert!(!resp.text().await.unwrap().contains("exploded"));
    assert_eq!(fake.count(), 0);

    app.set_broken(false);
    let resp = client
        .get(gw.url(&onramp_query(ADDR, "base")))
        .header("cookie", context_app::SESSION_COOKIE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    fake.assert_all_verified();
}

// ---------------------------------------------------------------------------------------
// Secrets stay out of the logs

/// Mints through every route form plus a CDP refusal, then searches stdout and stderr.
async fn run_mints_and_collect_logs(rig: &Rig) -> String {
    rig.assert_mints().await;
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .form(&[("address", ADDR), ("blockchains", "base")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let resp = rig
        .client
        .post(rig.gw.url("/onramp"))
        .header("accept", "application/json")
        .json(&json!({"addresses": [{"address": ADDR, "blockchains": ["base"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = rig
        .get(&format!(
            "/offramp?address={ADDR}&blockchains=base&partnerUserRef=u1&redirectUrl=https%3A%2F%2Fapp.com%2F"
        ))
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    rig.fake.set_mode(Mode::InvalidAddress);
    assert_eq!(
        rig.get(&onramp_query(ADDR, "base")).await.status(),
        StatusCode::BAD_GATEWAY
    );
    rig.fake.set_mode(Mode::Ok);
    rig.fake.assert_all_verified();
    assert_eq!(rig.fake.tokens().len(), 4);
    wait_access_logs(&rig.gw, "/onramp", 4).await;
    wait_access_logs(&rig.gw, "/offramp", 1).await;
    format!("{}\n{}", rig.gw.logs(), rig.gw.stderr())
}

fn assert_no_jwt_or_token(rig: &Rig, logs: &str) {
    assert!(!logs.contains("Bearer"), "bearer credential in logs");
    // Every JWT starts with base64url of `{"` = `eyJ`; no log line may carry one.
    assert!(!logs.contains("eyJ"), "JWT-like text in logs:\n{logs}");
    for r in rig.fake.requests() {
        let auth = header(&r.headers, "authorization").expect("Authorization");
        let jwt = auth.trim_start_matches("Bearer ");
        for part in jwt.split('.') {
            assert!(!logs.contains(part), "JWT part {part:.12}… in logs");
        }
    }
    for t in rig.fake.tokens() {
        assert!(!logs.contains(&t), "session token {t} in logs");
    }
    assert!(!logs.contains("fake-session-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_jwt_or_session_token_in_logs_ed25519() {
    // trace level: a leak at any level an operator might turn on counts, including
    // dependencies (hyper, reqwest) that log at debug/trace.
    let rig = Rig::start(TestKey::ed25519(), |b| {
        b.section("offramp", "redirect_url_allowlist = [\"https://app.com\"]")
            .section("log", "level = \"trace\"")
    })
    .await;
    let logs = run_mints_and_collect_logs(&rig).await;
    let secret = &rig.key.secret_string;
    assert!(
        !logs.contains(secret.as_str()),
        "the key secret is in the logs"
    );
    assert!(
        !logs.contains(&secret[..20]),
        "the secret's first 20 characters are in the logs"
    );
    assert_no_jwt_or_token(&rig, &logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_jwt_or_session_token_in_logs_es256() {
    let rig = Rig::start(TestKey::es256_sec1(), |b| {
        b.section("offramp", "redirect_url_allowlist = [\"https://app.com\"]")
            .section("log", "level = \"trace\"")
    })
    .await;
    let logs = run_mints_and_collect_logs(&rig).await;
    // The PEM armour is public; the base64 body is the secret.
    let body: String = rig
        .key
        .secret_string
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(body.len() > 40);
    assert!(!logs.contains(&body[..20]), "secret prefix in logs");
    for line in rig
        .key
        .secret_string
        .lines()
        .filter(|l| !l.starts_with("-----"))
    {
        assert!(!logs.contains(line), "a secret PEM line is in the logs");
    }
    assert!(!logs.contains(&rig.key.secret_env_escaped()));
    assert_no_jwt_or_token(&rig, &logs);
}

// ---------------------------------------------------------------------------------------
// `onramp-gateway mint`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_mint_prints_the_coinbase_url_with_a_fresh_token() {
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let mut b = GatewayBuilder::new("http://127.0.0.1:9")
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()));
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let w = b.write();
    let args: Vec<String> = [
        "mint",
        "--address",
        ADDR,
        "--blockchains",
        "base",
        "--config",
        &w.path.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = w.env.clone();
    let out = tokio::task::spawn_blocking(move || run_binary(&args, &env, Duration::from_secs(20)))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    fake.assert_all_verified();
    let token = fake.tokens().first().cloned().expect("minted");
    let url = stdout
        .lines()
        .find(|l| l.starts_with("https://"))
        .unwrap_or_else(|| panic!("no URL printed:\n{stdout}"));
    assert!(
        url.starts_with(&format!("{ONRAMP_URL}?sessionToken=")),
        "{url}"
    );
    assert_eq!(param(url, "sessionToken"), Some(token));
    assert!(!url.contains(&ADDR[2..]));
    assert_eq!(
        fake.requests()[0].body["addresses"],
        json!([{"address": ADDR, "blockchains": ["base"]}])
    );
    // README: clientIp defaults to 192.0.2.1 (Coinbase refuses private IPs).
    assert_eq!(fake.requests()[0].body["clientIp"], "192.0.2.1");
    assert!(!stderr.contains(&key.secret_string));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_mint_with_bad_address_exits_1_naming_the_field() {
    let key = TestKey::ed25519();
    let fake = FakeCdp::start(&key);
    let mut b = GatewayBuilder::new("http://127.0.0.1:9")
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()));
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let w = b.write();
    let args: Vec<String> = [
        "mint",
        "--address",
        "0xnothex",
        "--blockchains",
        "base",
        "--config",
        &w.path.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = w.env.clone();
    let out = tokio::task::spawn_blocking(move || run_binary(&args, &env, Duration::from_secs(20)))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("address"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("sessionToken"));
    assert_eq!(fake.count(), 0);
}
