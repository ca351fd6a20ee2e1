//! Coinbase's current flows through the real binary: v2 Create Onramp Session on
//! `/onramp`, and the `[api]` endpoints browser SDKs call (buy config/options/quote,
//! transactions), against the verifying fake CDP (JWT `uris` checked per endpoint, with
//! the `/platform` prefix for v2 and never a query string).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::certs::Alpn;
use crate::common::context_app::{Anonymous, ContextApp, APP_ADDRESS, SESSION_COOKIE};
use crate::common::fake_cdp::{Endpoint, FakeCdp, Mode, TestKey, SESSIONS_PATH};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::Upstream;

const ADDR: &str = "0x1111111111111111111111111111111111111111";
const NO_LIMIT: &str = "requests_per_minute = 60000\nburst = 1000";
const API: &str = "/onramp/api";

struct Rig {
    fake: FakeCdp,
    gw: Gateway,
    client: reqwest::Client,
    _up: Option<Upstream>,
    _app: Option<ContextApp>,
}

enum App {
    Plain,
    Context,
}

async fn start(app: App, configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Rig {
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let (up, ctx, url) = match app {
        App::Plain => {
            let up = Upstream::start().await;
            let url = up.url();
            (Some(up), None, url)
        }
        App::Context => {
            let ctx = ContextApp::start(Anonymous::Unauthorized).await;
            let url = ctx.url();
            (None, Some(ctx), url)
        }
    };
    let mut b = GatewayBuilder::new(&url)
        .section(
            "cdp",
            &format!(
                "api_base = \"{0}\"\nplatform_base = \"{0}/platform\"",
                fake.api_base().trim_end_matches('/')
            ),
        )
        .section("rate_limit", NO_LIMIT)
        .section("api", "requests_per_minute = 60000\nburst = 1000");
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = configure(b).start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    Rig {
        fake,
        gw,
        client,
        _up: up,
        _app: ctx,
    }
}

fn v2(b: GatewayBuilder) -> GatewayBuilder {
    b.section(
        "onramp",
        "api = \"v2\"\nblockchains = [\"base\", \"ethereum\"]",
    )
}

impl Rig {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.gw.url(path))
            .send()
            .await
            .expect("response")
    }

    async fn post_json(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut r = self
            .client
            .post(self.gw.url(path))
            .header("accept", "application/json")
            .json(body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("response")
    }

    fn calls(&self, endpoint: Endpoint) -> Vec<crate::common::fake_cdp::RecordedRequest> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == Some(endpoint))
            .collect()
    }
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------
// v2 sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_session_redirects_to_the_returned_coinbase_url() {
    let rig = start(App::Plain, v2).await;
    let q = format!(
        "/onramp?address={ADDR}&blockchains=base&defaultAsset=USDC&presetFiatAmount=100\
         &fiatCurrency=USD&paymentMethod=CARD&country=US&subdivision=NY&partnerUserRef=u-7"
    );
    let r = rig.get(&q).await;
    assert_eq!(r.status(), StatusCode::FOUND, "{}", rig.gw.logs());
    let loc = location(&r);
    let calls = rig.calls(Endpoint::Session);
    assert_eq!(calls.len(), 1);
    let token = calls[0].token.clone().unwrap();
    assert_eq!(
        loc,
        format!("https://pay.coinbase.com/buy?sessionToken={token}")
    );
    rig.fake.assert_all_verified();
    assert_eq!(
        calls[0].claims["uris"],
        json!([format!(
            "POST 127.0.0.1:{}{SESSIONS_PATH}",
            rig.fake.addr().port()
        )])
    );
    assert_eq!(
        calls[0].body,
        json!({"destinationAddress": ADDR, "destinationNetwork": "base",
            "purchaseCurrency": "USDC", "paymentAmount": "100", "paymentCurrency": "USD",
            "paymentMethod": "CARD", "country": "US", "subdivision": "NY",
            "partnerUserRef": "u-7", "clientIp": "127.0.0.1"})
    );
    assert_eq!(r.headers()["cache-control"], "no-store");

    // JSON form: url, sessionToken and the quote.
    let body = json!({"addresses": [{"address": ADDR, "blockchains": ["base"]}],
        "defaultAsset": "USDC", "presetFiatAmount": "50", "paymentMethod": "APPLE_PAY", "country": "US"});
    let r = rig.post_json("/onramp", &body, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert!(v["url"]
        .as_str()
        .unwrap()
        .starts_with("https://pay.coinbase.com/buy?sessionToken="));
    assert!(v["sessionToken"].is_string());
    assert_eq!(v["quote"]["paymentTotal"], "101.50");

    // Offramp stays on v1.
    let r = rig
        .get(&format!(
            "/offramp?address={ADDR}&blockchains=base&partnerUserRef=u&redirectUrl=https%3A%2F%2Fapp.example.com%2Fdone"
        ))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "no allowlist configured"
    );
    assert_eq!(rig.calls(Endpoint::Token).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_offramp_still_uses_the_v1_token() {
    let rig = start(App::Plain, |b| {
        v2(b).section(
            "offramp",
            "redirect_url_allowlist = [\"https://app.example.com\"]",
        )
    })
    .await;
    let r = rig
        .get(&format!(
            "/offramp?address={ADDR}&blockchains=base&partnerUserRef=u&redirectUrl=https%3A%2F%2Fapp.example.com%2Fdone"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::FOUND, "{}", rig.gw.logs());
    assert_eq!(rig.calls(Endpoint::Token).len(), 1);
    assert_eq!(rig.calls(Endpoint::Session).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_bad_input_is_400_without_a_cdp_call() {
    let rig = start(App::Plain, v2).await;
    for (q, field) in [
        (format!("/onramp?address={ADDR}&blockchains=base"), "defaultAsset"),
        (
            format!("/onramp?address={ADDR}&blockchains=base&defaultAsset=USDC&presetFiatAmount=1&presetCryptoAmount=1"),
            "presetCryptoAmount",
        ),
        (
            format!("/onramp?address={ADDR}&blockchains=base&defaultAsset=USDC&country=USA"),
            "country",
        ),
    ] {
        let r = rig
            .client
            .get(rig.gw.url(&q))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].as_str().unwrap().starts_with(field), "{v}");
    }
    assert_eq!(rig.fake.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_errors_map_and_a_foreign_url_is_refused() {
    let rig = start(App::Plain, v2).await;
    let q = format!("/onramp?address={ADDR}&blockchains=base&defaultAsset=USDC");
    let get_json = |q: String| {
        rig.client
            .get(rig.gw.url(&q))
            .header("accept", "application/json")
            .send()
    };
    rig.fake.set_mode(Mode::InvalidAddress);
    let r = get_json(q.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errorType"], "invalid_request");
    assert_eq!(v["errorMessage"], "invalid address");
    for (mode, status) in [
        (Mode::RateLimited, StatusCode::SERVICE_UNAVAILABLE),
        (Mode::ServerError, StatusCode::BAD_GATEWAY),
        (
            Mode::Custom {
                status: 401,
                body: json!({"errorType": "unauthorized", "errorMessage": "no"}).to_string(),
            },
            StatusCode::BAD_GATEWAY,
        ),
        (
            Mode::Custom {
                status: 201,
                body: json!({"session": {"onrampUrl": "https://evil.example/buy?sessionToken=x"}})
                    .to_string(),
            },
            StatusCode::BAD_GATEWAY,
        ),
        (
            Mode::Custom {
                status: 201,
                body: json!({"session": {"onrampUrl": "https://pay-sandbox.coinbase.com/buy"}})
                    .to_string(),
            },
            StatusCode::BAD_GATEWAY,
        ),
    ] {
        rig.fake.set_mode(mode.clone());
        let r = get_json(q.clone()).await.unwrap();
        assert_eq!(r.status(), status, "{mode:?}");
        assert!(r.headers().get("location").is_none());
    }
    // The correlation id is logged (never the JWT).
    let logs = rig.gw.logs();
    assert!(logs.contains("fake-corr-"), "{logs}");
    rig.fake.set_mode(Mode::Ok);
    assert_eq!(get_json(q).await.unwrap().status(), StatusCode::FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_sandbox_prefixes_the_user_and_uses_the_sandbox_host() {
    let rig = start(App::Plain, |b| {
        b.section(
            "onramp",
            "api = \"v2\"\nsandbox = true\nblockchains = [\"base\"]",
        )
    })
    .await;
    let r = rig
        .get(&format!(
            "/onramp?address={ADDR}&blockchains=base&defaultAsset=USDC"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(location(&r).starts_with("https://pay-sandbox.coinbase.com/buy?sessionToken="));
    let body = &rig.calls(Endpoint::Session)[0].body;
    let partner = body["partnerUserRef"].as_str().unwrap();
    assert!(
        partner.starts_with("sandbox-") && partner.len() == 8 + 16,
        "{partner}"
    );
}

// ---------------------------------------------------------------------------------------
// [api]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buy_options_are_camel_cased_cached_and_coalesced() {
    let rig = start(App::Plain, |b| b).await;
    // 20 concurrent first requests for one key: one CDP call.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = rig.client.clone();
        let url = rig.gw.url(&format!(
            "{API}/buy-options?country=US&subdivision=NY&networks=base"
        ));
        tasks.push(tokio::spawn(
            async move { c.get(url).send().await.unwrap() },
        ));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["cache-control"], "private, max-age=300");
        bodies.push(r.json::<Value>().await.unwrap());
    }
    assert_eq!(rig.calls(Endpoint::BuyOptions).len(), 1, "misses coalesced");
    let v = &bodies[0];
    assert_eq!(v["paymentCurrencies"][0]["limits"][0]["id"], "CARD");
    assert_eq!(v["purchaseCurrencies"][0]["networks"][0]["chainId"], "8453");
    assert_eq!(
        v["purchaseCurrencies"][0]["iconUrl"],
        "https://example.invalid/usdc.png"
    );
    assert_eq!(
        v["brandNewField"]["nestedValue"], 1,
        "unknown fields passed through"
    );
    assert!(v.get("payment_currencies").is_none());
    // The equivalent query (other case, order) is a hit; another query is a miss.
    let r = rig
        .get(&format!(
            "{API}/buy-options?subdivision=ny&country=us&networks=base"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(rig.calls(Endpoint::BuyOptions).len(), 1);
    let r = rig.get(&format!("{API}/buy-options?country=CA")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let calls = rig.calls(Endpoint::BuyOptions);
    assert_eq!(calls.len(), 2);
    rig.fake.assert_all_verified();
    // GET calls sign the path only.
    for c in &calls {
        let uri = c.claims["uris"][0].as_str().unwrap();
        assert!(
            uri.ends_with("/onramp/v1/buy/options") && !uri.contains('?'),
            "{uri}"
        );
        assert!(c.path.contains("country="), "{}", c.path);
    }
    // Bad input: 400 naming the field, problem+json with `error`, no CDP call.
    let r = rig.get(&format!("{API}/buy-options?subdivision=NY")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().starts_with("country"), "{v}");
    assert_eq!(v["error"], v["detail"]);
    assert_eq!(rig.calls(Endpoint::BuyOptions).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buy_config_cache_expires() {
    let rig = start(App::Plain, |b| {
        b.section(
            "api",
            "cache_s = 1\nrequests_per_minute = 60000\nburst = 1000",
        )
    })
    .await;
    let r = rig.get(&format!("{API}/buy-config")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["countries"][0]["paymentMethods"][0]["id"], "CARD");
    assert_eq!(
        rig.get(&format!("{API}/buy-config")).await.status(),
        StatusCode::OK
    );
    assert_eq!(rig.calls(Endpoint::BuyConfig).len(), 1);
    // A TTL has no signal to wait for: poll until the entry has expired (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.calls(Endpoint::BuyConfig).len() < 2 {
        assert!(Instant::now() < deadline, "cache entry never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            rig.get(&format!("{API}/buy-config")).await.status(),
            StatusCode::OK
        );
    }
    // CDP failures are not cached and map like the minting routes'.
    rig.fake.set_mode(Mode::ServerError);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = rig.get(&format!("{API}/buy-config")).await.status();
        if s == StatusCode::BAD_GATEWAY {
            break;
        }
        assert!(Instant::now() < deadline, "never saw the 502");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buy_quote_probe_costs_no_mint_and_an_address_gets_an_onramp_url() {
    let rig = start(App::Plain, |b| b).await;
    let quote = json!({"purchaseCurrency": "USDC", "purchaseNetwork": "base",
        "paymentAmount": "100", "paymentCurrency": "USD", "paymentMethod": "CARD",
        "country": "US", "subdivision": "NY"});
    let r = rig
        .post_json(&format!("{API}/buy-quote"), &quote, &[])
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", rig.gw.logs());
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["paymentTotal"],
        json!({"value": "101.50", "currency": "USD"})
    );
    assert!(v["quoteId"].is_string());
    assert!(v.get("onrampUrl").is_none());
    let calls = rig.calls(Endpoint::BuyQuote);
    assert!(calls[0].body.get("destination_address").is_none());

    let mut with_addr = quote.clone();
    with_addr["destinationAddress"] = json!(ADDR);
    let r = rig
        .post_json(&format!("{API}/buy-quote"), &with_addr, &[])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert!(v["onrampUrl"]
        .as_str()
        .unwrap()
        .starts_with("https://pay.coinbase.com/buy?sessionToken="));
    assert_eq!(
        rig.calls(Endpoint::BuyQuote)[1].body["destination_address"],
        ADDR
    );
    rig.fake.assert_all_verified();

    // Bad input: 400 naming the field, no CDP call.
    let mut bad = quote.clone();
    bad["destinationAddress"] = json!("0xnot-an-address");
    let r = rig.post_json(&format!("{API}/buy-quote"), &bad, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let mut bad = quote.clone();
    bad["paymentAmount"] = json!("-5");
    let r = rig.post_json(&format!("{API}/buy-quote"), &bad, &[]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(rig.calls(Endpoint::BuyQuote).len(), 2);
    // GET is not the method.
    assert_eq!(
        rig.get(&format!("{API}/buy-quote")).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        rig.get(&format!("{API}/nope")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_source_supplies_the_quote_address_and_the_transactions_user() {
    let rig = start(App::Context, |b| {
        b.section("addresses", "source = \"upstream\"")
    })
    .await;
    let quote = json!({"purchaseCurrency": "USDC", "purchaseNetwork": "base",
        "paymentAmount": "100", "paymentCurrency": "USD", "paymentMethod": "CARD",
        "country": "US", "destinationAddress": ADDR});
    let r = rig
        .post_json(
            &format!("{API}/buy-quote"),
            &quote,
            &[("cookie", SESSION_COOKIE)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", rig.gw.logs());
    assert_eq!(
        rig.calls(Endpoint::BuyQuote)[0].body["destination_address"],
        APP_ADDRESS,
        "the browser's address is never trusted"
    );
    // Anonymous: the app's 401 is relayed, nothing asked of CDP.
    let r = rig
        .post_json(&format!("{API}/buy-quote"), &quote, &[])
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(rig.calls(Endpoint::BuyQuote).len(), 1);

    let r = rig
        .client
        .get(rig.gw.url(&format!("{API}/transactions?pageSize=5")))
        .header("cookie", SESSION_COOKIE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["transactions"][0]["partnerUserRef"], "alice");
    assert_eq!(v["nextPageKey"], "");
    let tx = rig.calls(Endpoint::Transactions);
    assert_eq!(
        tx[0].path,
        "/onramp/v1/buy/user/alice/transactions?page_size=5"
    );
    let uri = tx[0].claims["uris"][0].as_str().unwrap();
    assert!(
        uri.ends_with("/onramp/v1/buy/user/alice/transactions"),
        "{uri}"
    );
    // A partnerUserRef from the browser changes nothing; offramp uses the sell side.
    let r = rig
        .client
        .get(rig.gw.url(&format!(
            "{API}/transactions?flow=offramp&partnerUserRef=mallory"
        )))
        .header("cookie", SESSION_COOKIE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        rig.calls(Endpoint::Transactions)[1].path,
        "/onramp/v1/sell/user/alice/transactions"
    );
    rig.fake.assert_all_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_need_an_app_identity() {
    let rig = start(App::Plain, |b| b).await;
    let r = rig
        .get(&format!("{API}/transactions?partnerUserRef=victim"))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("upstream"), "{v}");
    assert_eq!(rig.fake.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_shares_the_gate_and_has_its_own_bucket() {
    let rig = start(App::Plain, |b| {
        b.section("cors", "allowed_origins = [\"https://app.example.com\"]")
            .section("api", "requests_per_minute = 60\nburst = 2")
    })
    .await;
    // Cross-site: refused before the bucket.
    for _ in 0..3 {
        let r = rig
            .client
            .get(rig.gw.url(&format!("{API}/buy-config")))
            .header("sec-fetch-site", "cross-site")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    // Preflight for a GET from a listed origin.
    let r = rig
        .client
        .request(
            reqwest::Method::OPTIONS,
            rig.gw.url(&format!("{API}/buy-options")),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allow = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allow.contains("content-type"), "{allow}");
    // The bucket: burst 2, then 429 with the api bucket's headers.
    for _ in 0..2 {
        assert_eq!(
            rig.get(&format!("{API}/buy-config")).await.status(),
            StatusCode::OK
        );
    }
    let r = rig.get(&format!("{API}/buy-config")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .starts_with("\"ip\";q=2"));
    // The minting routes have their own budget.
    let r = rig
        .get(&format!("/onramp?address={ADDR}&blockchains=base"))
        .await;
    assert_eq!(r.status(), StatusCode::FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quote_budget_answers_503_before_cdp_would_refuse() {
    let rig = start(App::Plain, |b| b).await;
    let quote = json!({"purchaseCurrency": "USDC", "purchaseNetwork": "base",
        "paymentAmount": "100", "paymentCurrency": "USD", "paymentMethod": "CARD", "country": "US"});
    let mut ok = 0;
    let mut busy = 0;
    for _ in 0..14 {
        let r = rig
            .post_json(&format!("{API}/buy-quote"), &quote, &[])
            .await;
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(r.headers().get("retry-after").is_some());
                busy += 1
            }
            s => panic!("{s}"),
        }
    }
    // Burst 10 at once, then one per 100 ms: 14 quick requests see some 503s.
    assert!(ok >= 10 && busy >= 1, "ok {ok} busy {busy}");
    assert_eq!(rig.calls(Endpoint::BuyQuote).len(), ok);
}

/// Every `[api]` route maps each CDP failure the way the minting routes do, and the
/// gateway recovers with CDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_map_every_cdp_failure() {
    let rig = start(App::Context, |b| {
        b.section("addresses", "source = \"upstream\"")
            .section("cdp", "timeout_ms = 800")
            .section(
                "api",
                "cache_s = 0\nrequests_per_minute = 60000\nburst = 1000",
            )
    })
    .await;
    let quote = json!({"purchaseCurrency": "USDC", "purchaseNetwork": "base",
        "paymentAmount": "100", "paymentCurrency": "USD", "paymentMethod": "CARD",
        "country": "US", "destinationAddress": "x"});
    let call = |route: &'static str| {
        let rig = &rig;
        let quote = quote.clone();
        async move {
            let url = rig.gw.url(&format!("{API}{route}"));
            let req = if route == "/buy-quote" {
                rig.client.post(url).json(&quote)
            } else {
                rig.client.get(url)
            };
            let r = req
                .header("cookie", SESSION_COOKIE)
                .send()
                .await
                .expect("response");
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v)
        }
    };
    let routes = [
        "/buy-config",
        "/buy-options?country=US",
        "/buy-quote",
        "/transactions",
    ];
    for (mode, want) in [
        (Mode::ServerError, StatusCode::BAD_GATEWAY),
        (Mode::RateLimited, StatusCode::SERVICE_UNAVAILABLE),
        (Mode::Garbage, StatusCode::BAD_GATEWAY),
        (Mode::Huge, StatusCode::BAD_GATEWAY),
        (Mode::Hangup, StatusCode::BAD_GATEWAY),
        (
            Mode::Slow(Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
        ),
        (
            Mode::Custom {
                status: 401,
                body: json!({"code": 16, "message": "unauthenticated"}).to_string(),
            },
            StatusCode::BAD_GATEWAY,
        ),
        (
            Mode::Custom {
                status: 400,
                body: json!({"code": 3, "message": "payment amount too small"}).to_string(),
            },
            StatusCode::BAD_REQUEST,
        ),
    ] {
        rig.fake.set_mode(mode.clone());
        for route in routes {
            let (status, v) = call(route).await;
            assert_eq!(status, want, "{mode:?} {route}: {v}");
            assert!(v["error"].is_string(), "{mode:?} {route}: {v}");
            if want == StatusCode::BAD_REQUEST {
                assert_eq!(v["errorMessage"], "payment amount too small", "{route}");
            }
        }
    }
    rig.fake.set_mode(Mode::Ok);
    for route in routes {
        assert_eq!(call(route).await.0, StatusCode::OK, "{route} recovers");
    }
}
