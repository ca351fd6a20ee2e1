//! End to end with a real browser: headless Chromium opens the app through the gateway,
//! clicks "Pay with Apple Pay" (a real user gesture), the page creates a headless order at
//! `{api.prefix}/orders` and embeds the returned payment link in an iframe with the
//! attributes Coinbase requires; the iframe loads a loopback stand-in for
//! `pay.coinbase.com` (Chromium's `--host-resolver-rules`; the stand-in serves the
//! gateway's pinned test certificate) with the minted token and the sandbox flag, and
//! without a Referer.
//!
//! ```text
//! Chromium --TLS--> gateway --HTTP--> app (GET /: page, GET context: identity)
//! Chromium --TLS--> gateway --HTTP+JWT--> FakeCdp (POST /orders)
//! Chromium --TLS--> stand-in "pay.coinbase.com" (iframe)
//! ```

use std::time::Duration;

use fantoccini::Locator;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::common::browser::{tools_or_skip, Browser, CertTrust};
use crate::common::fake_cdp::{Endpoint, FakeCdp, TestKey};
use crate::common::gateway::GatewayBuilder;
use crate::common::page_server::{tls_acceptor, PageServer};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);
const WALLET: &str = "0x71c7656ec7ab88b098defb751b7401b5f6d8976f";

const HTML: &str = "text/html; charset=utf-8";

/// The app: its page (signing the visitor in as alice), and its onramp context with the
/// buyer's verified contact data.
fn app_page(req: &Request<Incoming>) -> (StatusCode, Vec<(&'static str, String)>, String) {
    match req.uri().path() {
        "/.well-known/onramp-context" => {
            let signed_in = req
                .headers()
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.split(';').any(|p| p.trim() == "session=alice"));
            if !signed_in {
                return (StatusCode::UNAUTHORIZED, vec![], "login".into());
            }
            let body = json!({
                "addresses": [{"address": WALLET, "blockchains": ["base"]}],
                "partnerUserRef": "alice",
                "email": "alice@example.com", "phoneNumber": "+12125550123",
                "phoneNumberVerifiedAt": "2026-11-30T10:00:00Z",
                "agreementAcceptedAt": "2026-11-30T10:00:00Z",
            });
            (
                StatusCode::OK,
                vec![("content-type", "application/json".into())],
                body.to_string(),
            )
        }
        "/" => (
            StatusCode::OK,
            vec![
                ("content-type", HTML.into()),
                ("set-cookie", "session=alice; Path=/; HttpOnly".into()),
            ],
            r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title></head>
<body><button id="buy">Pay with Apple Pay</button><div id="slot"></div>
<script>
document.getElementById('buy').addEventListener('click', async () => {
  const r = await fetch('/onramp/api/orders', {method: 'POST',
    headers: {'content-type': 'application/json'},
    body: JSON.stringify({paymentAmount: '25', paymentCurrency: 'USD',
      purchaseCurrency: 'USDC', destinationNetwork: 'base', paymentMethod: 'apple_pay'})});
  const order = await r.json();
  const f = document.createElement('iframe');
  f.id = 'pay';
  f.setAttribute('sandbox', 'allow-scripts allow-same-origin');
  f.setAttribute('referrerpolicy', 'no-referrer');
  f.setAttribute('allow', 'payment');
  f.src = order.paymentLink.url;
  document.getElementById('slot').appendChild(f);
  document.title = 'order ' + r.status;
});
</script></body></html>"#
                .into(),
        ),
        _ => (StatusCode::NOT_FOUND, vec![], "not found".into()),
    }
}

/// Stands in for pay.coinbase.com's payment page.
fn pay_page(req: &Request<Incoming>) -> (StatusCode, Vec<(&'static str, String)>, String) {
    if req.uri().path() != "/v2/api-onramp/apple-pay" {
        return (StatusCode::NOT_FOUND, vec![], "not found".into());
    }
    (
        StatusCode::OK,
        vec![("content-type", HTML.into())],
        "<!doctype html><html><body><h1 id=\"standin\">Pay stand-in</h1></body></html>".into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_embeds_the_payment_link_as_coinbase_requires() {
    let Some(tools) =
        tools_or_skip("orders_browser::chromium_embeds_the_payment_link_as_coinbase_requires")
    else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, run(tools))
        .await
        .unwrap_or_else(|_| panic!("browser test did not finish within {TEST_TIMEOUT:?}"));
}

async fn run(tools: crate::common::browser::Tools) {
    let app = PageServer::start(app_page, None).await;
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let mut builder = GatewayBuilder::new(&format!("http://{}", app.addr))
        .section(
            "cdp",
            &format!(
                "api_base = \"{0}\"\nplatform_base = \"{0}/platform\"",
                fake.api_base()
            ),
        )
        .section("onramp", "sandbox = true")
        .section("addresses", "source = \"upstream\"")
        .section("orders", "enabled = true");
    for (k, v) in key.env() {
        builder = builder.env(&k, &v);
    }
    let gateway = builder.start().await;
    let pay = PageServer::start(pay_page, Some(tls_acceptor(&gateway.config.pki))).await;
    let trust = CertTrust::pin_leaf_of(&gateway.config.pki);
    let browser = Browser::launch_with(
        &tools,
        trust,
        &[format!(
            "--host-resolver-rules=MAP pay.coinbase.com:443 127.0.0.1:{}",
            pay.addr.port()
        )],
    )
    .await;
    let c = browser.client();

    browser
        .step("open the shop", STEP, c.goto(&gateway.url("/")))
        .await;
    let buy = browser
        .step("find the button", STEP, c.find(Locator::Id("buy")))
        .await;
    browser.step("click Pay", STEP, buy.click()).await;
    let frame = browser
        .step("the iframe appears", STEP, async {
            c.wait().at_most(STEP).for_element(Locator::Id("pay")).await
        })
        .await;
    for (attr, want) in [
        ("sandbox", "allow-scripts allow-same-origin"),
        ("referrerpolicy", "no-referrer"),
        ("allow", "payment"),
    ] {
        let got = browser.step("read attribute", STEP, frame.attr(attr)).await;
        assert_eq!(got.as_deref(), Some(want), "{attr}");
    }
    browser
        .step("enter the iframe", STEP, frame.clone().enter_frame())
        .await;
    browser
        .step(
            "the stand-in loads in the iframe",
            STEP,
            c.wait().at_most(STEP).for_element(Locator::Id("standin")),
        )
        .await;

    fake.assert_all_verified();
    let orders: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Some(Endpoint::Order))
        .collect();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].body["partnerUserRef"], "sandbox-alice");
    assert_eq!(orders[0].body["destinationAddress"], WALLET);
    let token = orders[0].token.clone().expect("token");
    let seen = pay.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].path_and_query,
        format!("/v2/api-onramp/apple-pay?sessionToken={token}&useApplePaySandbox=true")
    );
    assert!(
        seen[0].headers.get("referer").is_none(),
        "referrerpolicy=no-referrer: {:?}",
        seen[0].headers
    );
    assert_eq!(seen[0].headers["sec-fetch-dest"], "iframe");
    browser.quit().await;
}
