//! End to end with a real browser: headless Chromium opens the app through the gateway over
//! TLS, clicks "Buy crypto", follows the gateway's 302 and lands on a local stand-in for
//! Coinbase's hosted page with the session token the (fake) CDP API minted.
//!
//! What only a browser shows: the link's query string survives HTML and the click as the
//! gateway expects it, Chromium accepts the gateway's TLS (ALPN h2, the served chain) for
//! exactly the pinned key, and it follows the 302 `Location` to the right place.
//!
//! ```text
//! Chromium --TLS--> gateway --HTTP--> fake app   (GET /: page with the link)
//! Chromium --TLS--> gateway --HTTP+JWT--> FakeCdp (GET /onramp: mint) --302-->
//! Chromium --HTTP--> Coinbase stand-in           (GET /buy/select-asset?sessionToken=..)
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::Locator;
use http::{Request, StatusCode};
use hyper::body::Incoming;

use crate::common::browser::{tools_or_skip, Browser, CertTrust};
use crate::common::fake_cdp::{FakeCdp, TestKey};
use crate::common::gateway::{field_str, GatewayBuilder};
use crate::common::page_server::{tls_acceptor, PageServer};

/// A lower-case EVM address (no EIP-55 checksum to get wrong).
const ADDRESS: &str = "0x71c7656ec7ab88b098defb751b7401b5f6d8976f";
/// The other website's wallet.
const ATTACKER: &str = "0x000000000000000000000000000000000000dead";
/// Where the stand-in pretends Coinbase's hosted onramp lives.
const STANDIN_PATH: &str = "/buy/select-asset";
/// The whole test, browser start included; a healthy run takes a few seconds.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

/// The existing app: a page with the "Buy crypto" link (anything else: 404).
fn app_page(req: &Request<Incoming>) -> (StatusCode, String) {
    if req.uri().path() != "/" {
        return (StatusCode::NOT_FOUND, "<h1>not found</h1>".into());
    }
    let html = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Example app</title></head>
<body style="font-family: sans-serif">
<h1>Example app</h1>
<p>Your wallet: <code>{ADDRESS}</code></p>
<p><a id="buy" href="/onramp?address={ADDRESS}&amp;blockchains=base&amp;defaultAsset=USDC">Buy crypto</a></p>
</body></html>"#
    );
    (StatusCode::OK, html)
}

/// Where the other site's link points (set once the gateway is up).
static GATEWAY_ONRAMP: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Another website (another origin: its own port on 127.0.0.1, while the gateway is
/// `https://localhost`) linking to the gateway's onramp with *its* wallet.
fn other_site_page(req: &Request<Incoming>) -> (StatusCode, String) {
    if req.uri().path() != "/" {
        return (StatusCode::NOT_FOUND, "<h1>not found</h1>".into());
    }
    let target = GATEWAY_ONRAMP.get().cloned().unwrap_or_default();
    let html = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Other site</title></head>
<body><h1>Free crypto!</h1>
<p><a id="lure" href="{}">Claim</a></p>
</body></html>"#,
        escape(&target)
    );
    (StatusCode::OK, html)
}

/// Stands in for pay.coinbase.com: shows the query it was opened with.
fn standin_page(req: &Request<Incoming>) -> (StatusCode, String) {
    standin_page_at(req, STANDIN_PATH)
}

fn standin_page_at(req: &Request<Incoming>, path: &str) -> (StatusCode, String) {
    if req.uri().path() != path {
        return (StatusCode::NOT_FOUND, "<h1>not found</h1>".into());
    }
    let params: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let rows: String = params
        .iter()
        .map(|(k, v)| {
            format!(
                "<tr><th>{}</th><td id=\"param-{}\">{}</td></tr>\n",
                escape(k),
                escape(k),
                escape(v)
            )
        })
        .collect();
    let html = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Coinbase stand-in</title></head>
<body style="font-family: sans-serif">
<h1 id="standin">Coinbase stand-in</h1>
<p>Opened at <code>{}</code> with:</p>
<table border="1" cellpadding="4">
{rows}</table>
</body></html>"#,
        escape(req.uri().path())
    );
    (StatusCode::OK, html)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `target/test-artifacts/` (next to Cargo's own `target/tmp`), created if needed.
fn artifacts_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_buys_crypto_through_the_gateway() {
    let Some(tools) = tools_or_skip("browser::chromium_buys_crypto_through_the_gateway") else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, run(tools))
        .await
        .unwrap_or_else(|_| panic!("browser test did not finish within {TEST_TIMEOUT:?}"));
}

async fn run(tools: crate::common::browser::Tools) {
    let started = Instant::now();
    let app = PageServer::html(app_page, None).await;
    let standin = PageServer::html(standin_page, None).await;
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);

    let mut builder = GatewayBuilder::new(&format!("http://{}", app.addr))
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section(
            "onramp",
            &format!(
                "url = \"http://{}{STANDIN_PATH}\"\nblockchains = [\"base\", \"ethereum\"]",
                standin.addr
            ),
        );
    for (k, v) in key.env() {
        builder = builder.env(&k, &v);
    }
    let gateway = builder.start().await;
    let trust = CertTrust::pin_leaf_of(&gateway.config.pki);
    let _ =
        GATEWAY_ONRAMP.set(gateway.url(&format!("/onramp?address={ATTACKER}&blockchains=base")));
    let other_site = PageServer::html(other_site_page, None).await;

    let browser = Browser::launch(&tools, trust).await;
    let c = browser.client();

    // 1. The app's page, through the gateway, over TLS Chromium verified against the pin.
    let home = gateway.url("/");
    browser.step("open the app", STEP, c.goto(&home)).await;
    let title = browser.step("read the title", STEP, c.title()).await;
    assert_eq!(
        title, "Example app",
        "Chromium did not get the app's page from {home}"
    );

    // 1b. Another website's link to the gateway with its own wallet: Chromium labels the
    //     navigation Sec-Fetch-Site: cross-site itself; the gateway refuses, mints nothing.
    browser
        .step(
            "open the other site",
            STEP,
            c.goto(&format!("http://{}/", other_site.addr)),
        )
        .await;
    let lure = browser
        .step("find the lure", STEP, c.find(Locator::Id("lure")))
        .await;
    browser.step("click the lure", STEP, lure.click()).await;
    let refused = browser
        .step("read the refusal", STEP, async {
            c.wait()
                .at_most(STEP)
                .for_element(Locator::Css("h1"))
                .await?
                .text()
                .await
        })
        .await;
    assert!(
        refused.starts_with("403"),
        "expected the 403 page, got {refused:?}"
    );
    let body = browser
        .step("refusal text", STEP, async {
            c.find(Locator::Css("body")).await?.text().await
        })
        .await;
    assert!(body.contains("cross-site request refused"), "{body}");
    assert_eq!(
        fake.count(),
        0,
        "the other site's link minted: {:#?}",
        fake.requests()
    );
    let ev = gateway
        .wait_for_log(Duration::from_secs(5), "cross-site access log", |e| {
            field_str(e, "message") == Some("request") && field_str(e, "path") == Some("/onramp")
        })
        .await;
    assert_eq!(ev.get("status").and_then(|s| s.as_u64()), Some(403), "{ev}");
    // Refused on Chromium's own Sec-Fetch-Site (not the Referer fallback).
    let (_, metrics) = gateway.admin_get("/metrics").await;
    assert_eq!(
        crate::common::metric(
            &metrics,
            "onramp_gateway_mint_refused_total",
            &[("reason", "fetch_site")]
        ),
        Some(1.0),
        "{metrics}"
    );
    browser.step("back to the app", STEP, c.goto(&home)).await;

    // 2. Click the link on the app's own page (same origin); the gateway mints and 302s
    //    to the stand-in.
    let link = browser
        .step(
            "find the link",
            STEP,
            c.find(Locator::LinkText("Buy crypto")),
        )
        .await;
    browser.step("click Buy crypto", STEP, link.click()).await;
    browser
        .step(
            "land on the Coinbase stand-in",
            STEP,
            c.wait().at_most(STEP).for_element(Locator::Css("#standin")),
        )
        .await;

    // 3. Where the browser ended up.
    let url = browser.step("current URL", STEP, c.current_url()).await;
    let tokens = fake.tokens();
    assert_eq!(tokens.len(), 1, "exactly one mint: {:#?}", fake.requests());
    let token = &tokens[0];
    assert_eq!(url.scheme(), "http");
    assert_eq!(url.host_str(), Some("127.0.0.1"));
    assert_eq!(url.port(), Some(standin.addr.port()));
    assert_eq!(url.path(), STANDIN_PATH);
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("sessionToken"), Some(token.as_str()), "{url}");
    assert_eq!(
        get("defaultAsset"),
        Some("USDC"),
        "preset passed through: {url}"
    );
    assert!(
        !url.as_str().to_lowercase().contains(ADDRESS),
        "the address must never appear in the Location: {url}"
    );

    let text = browser
        .step("page text", STEP, async {
            c.find(Locator::Css("body")).await?.text().await
        })
        .await;
    assert!(text.contains("Coinbase stand-in"), "{text}");
    assert!(
        text.contains(token.as_str()),
        "token not shown on the page:\n{text}"
    );

    // 4. The mint the browser caused was a correct one.
    fake.assert_all_verified();
    let req = &fake.requests()[0];
    assert_eq!(req.body["addresses"][0]["address"], ADDRESS);
    assert_eq!(
        req.body["addresses"][0]["blockchains"],
        serde_json::json!(["base"])
    );
    assert_eq!(
        req.body["clientIp"], "127.0.0.1",
        "client IP from the browser's socket"
    );

    // The app saw the page request via the gateway, never the onramp route.
    let app_seen = app.seen();
    let home_req = app_seen
        .iter()
        .find(|s| s.path_and_query == "/")
        .expect("the app served /");
    assert_eq!(
        home_req
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok()),
        Some("https")
    );
    assert!(
        !app_seen
            .iter()
            .any(|s| s.path_and_query.starts_with("/onramp")),
        "/onramp must not be proxied: {app_seen:?}"
    );
    let standin_seen = standin.seen();
    assert!(
        standin_seen
            .iter()
            .any(|s| s.path_and_query.starts_with(STANDIN_PATH)),
        "{standin_seen:?}"
    );

    // The gateway logged the browser's request to the onramp route as a 302.
    let ev = gateway
        .wait_for_log(Duration::from_secs(5), "onramp access log", |e| {
            field_str(e, "message") == Some("request")
                && field_str(e, "path") == Some("/onramp")
                && e.get("status").and_then(|s| s.as_u64()) == Some(302)
        })
        .await;
    assert_eq!(ev.get("status").and_then(|s| s.as_u64()), Some(302), "{ev}");

    // 5. A screenshot for humans (CI artifact).
    let png = browser.step("screenshot", STEP, c.screenshot()).await;
    let path = artifacts_dir().join("browser-onramp.png");
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let written = std::fs::read(&path).expect("read screenshot back");
    assert!(
        written.len() > 1000 && written.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a non-empty PNG ({} bytes)",
        path.display(),
        written.len()
    );

    // 6. The pin is specific: a gateway with another certificate is refused, so the TLS
    //    checks above were real (not a browser waving every certificate through).
    let other = GatewayBuilder::new(&format!("http://{}", app.addr))
        .start()
        .await;
    let homes_before = app
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/")
        .count();
    // Chromium shows its certificate interstitial; chromedriver reports the navigation
    // itself as done, so the outcome is read from the page, not from goto's result.
    let _ = tokio::time::timeout(STEP, c.goto(&other.url("/"))).await;
    let other_title = browser.step("title after refusal", STEP, c.title()).await;
    assert_ne!(
        other_title, "Example app",
        "Chromium accepted a certificate it was not pinned to"
    );
    let homes_after = app
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/")
        .count();
    assert_eq!(
        homes_after, homes_before,
        "no request may pass the refused handshake"
    );

    browser.quit().await;
    eprintln!(
        "browser e2e: ok in {:?}, screenshot at {}",
        started.elapsed(),
        path.display()
    );
}

// ---------------------------------------------------------------------------------------
// The fund page (examples/fund-page): <Fund>-shaped calls to the [api] endpoints

const FUND_PAGE: &str = include_str!("../../examples/fund-page/index.html");

/// The app serves the example page at `/`.
fn fund_app_page(req: &Request<Incoming>) -> (StatusCode, String) {
    if req.uri().path() == "/" {
        (StatusCode::OK, FUND_PAGE.to_string())
    } else {
        (StatusCode::NOT_FOUND, "<h1>not found</h1>".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_buys_through_the_fund_page() {
    let Some(tools) = tools_or_skip("browser::chromium_buys_through_the_fund_page") else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, run_fund_page(tools))
        .await
        .unwrap_or_else(|_| panic!("fund page test did not finish within {TEST_TIMEOUT:?}"));
}

async fn run_fund_page(tools: crate::common::browser::Tools) {
    crate::common::certs::install_provider();
    let app = PageServer::html(fund_app_page, None).await;
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let mut builder = GatewayBuilder::new(&format!("http://{}", app.addr))
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section("onramp", "blockchains = [\"base\"]");
    for (k, v) in key.env() {
        builder = builder.env(&k, &v);
    }
    let gateway = builder.start().await;
    // Coinbase's host, resolved by Chromium to a loopback TLS stand-in.
    let standin = PageServer::html(
        |req| standin_page_at(req, "/buy"),
        Some(tls_acceptor(&gateway.config.pki)),
    )
    .await;
    let trust = CertTrust::pin_leaf_of(&gateway.config.pki);
    let rules = format!(
        "--host-resolver-rules=MAP pay.coinbase.com 127.0.0.1:{}",
        standin.addr.port()
    );
    let browser = Browser::launch_with(&tools, trust, &[rules]).await;
    let c = browser.client();

    browser
        .step("open the fund page", STEP, c.goto(&gateway.url("/")))
        .await;
    // Options loaded (the asset list) and a probe quote shown.
    let quote = browser
        .step("wait for the quote", STEP, async {
            let el = c
                .wait()
                .at_most(STEP)
                .for_element(Locator::Css("#quote"))
                .await?;
            let deadline = Instant::now() + STEP;
            loop {
                let text = el.text().await?;
                if text.starts_with("You pay") || Instant::now() > deadline {
                    return Ok::<_, fantoccini::error::CmdError>(text);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    assert_eq!(
        quote, "You pay 101.50 USD for 99.80 USDC",
        "page shows the quote"
    );
    let calls = |path: &str| {
        fake.requests()
            .iter()
            .filter(|r| r.path.starts_with(path))
            .count()
    };
    assert_eq!(calls("/onramp/v1/buy/options"), 1);
    assert_eq!(calls("/onramp/v1/buy/quote"), 1, "the probe");
    assert!(fake.tokens().is_empty(), "a probe mints nothing");

    let wallet = browser
        .step("find the wallet field", STEP, c.find(Locator::Id("wallet")))
        .await;
    browser
        .step("type the wallet", STEP, wallet.send_keys(ADDRESS))
        .await;
    let buy = browser
        .step("find Buy", STEP, c.find(Locator::Id("buy")))
        .await;
    browser.step("click Buy", STEP, buy.click()).await;
    browser
        .step(
            "land on the Coinbase stand-in",
            STEP,
            c.wait().at_most(STEP).for_element(Locator::Css("#standin")),
        )
        .await;
    let url = browser.step("current URL", STEP, c.current_url()).await;
    assert_eq!(url.host_str(), Some("pay.coinbase.com"), "{url}");
    let tokens = fake.tokens();
    assert_eq!(tokens.len(), 1, "{:#?}", fake.requests());
    let token = url
        .query_pairs()
        .find(|(k, _)| k == "sessionToken")
        .map(|(_, v)| v.into_owned());
    assert_eq!(token.as_deref(), Some(tokens[0].as_str()), "{url}");
    let minted = fake
        .requests()
        .into_iter()
        .find(|r| r.body.get("destination_address").is_some())
        .expect("the addressed quote");
    assert_eq!(minted.body["destination_address"], ADDRESS);
    fake.assert_all_verified();

    let png = browser.step("screenshot", STEP, c.screenshot()).await;
    std::fs::write(artifacts_dir().join("browser-fund-page.png"), &png).expect("screenshot");
    browser.quit().await;
}
