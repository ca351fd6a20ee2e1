//! Headless Apple Pay / Google Pay orders through the real binary: the buyer's identity
//! from the app context (or a ticket), never the browser; the exact CDP body (checked by
//! the fake against the order schema, JWT `uris` with `/platform`); the payment link's
//! host check and sandbox flag; each buyer error type passed on; order lookup only by
//! the user it belongs to.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::certs::Alpn;
use crate::common::context_app::{
    Anonymous, ContextApp, ALICE_EMAIL, ALICE_PHONE, APP_ADDRESS, BOB_COOKIE, SESSION_COOKIE,
    VERIFIED_AT,
};
use crate::common::fake_cdp::{Endpoint, FakeCdp, Mode, RecordedRequest, TestKey, ORDERS_PATH};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::Upstream;

const NO_LIMIT: &str = "requests_per_minute = 60000\nburst = 1000";
const ORDERS: &str = "/onramp/api/orders";
const TICKET_SECRET: &str = "integration-ticket-secret-0123456789abcdef";
const TICKET_ADDR: &str = "0x3333333333333333333333333333333333333333";

struct Rig {
    fake: FakeCdp,
    gw: Gateway,
    client: reqwest::Client,
    app: Option<ContextApp>,
    _up: Option<Upstream>,
}

#[derive(Clone, Copy, PartialEq)]
enum Source {
    Context { identity: bool },
    Ticket,
}

async fn start(source: Source, configure: impl FnOnce(GatewayBuilder) -> GatewayBuilder) -> Rig {
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let (app, up, url, source_toml) = match source {
        Source::Context { identity } => {
            let app = ContextApp::start(Anonymous::Unauthorized).await;
            app.set_identity(identity);
            let url = app.url();
            (Some(app), None, url, "source = \"upstream\"")
        }
        Source::Ticket => {
            let up = Upstream::start().await;
            let url = up.url();
            (None, Some(up), url, "source = \"ticket\"")
        }
    };
    let mut b = GatewayBuilder::new(&url)
        .section(
            "cdp",
            &format!(
                "api_base = \"{0}\"\nplatform_base = \"{0}/platform\"",
                fake.api_base()
            ),
        )
        .section("rate_limit", NO_LIMIT)
        .section("api", NO_LIMIT)
        .section("addresses", source_toml)
        .section("orders", "enabled = true\ndomain = \"shop.example.com\"")
        .env("ONRAMP_TICKET_SECRET", TICKET_SECRET);
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = configure(b).start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    Rig {
        fake,
        gw,
        client,
        app,
        _up: up,
    }
}

fn order(method: &str) -> Value {
    json!({"paymentAmount": "100", "paymentCurrency": "USD", "purchaseCurrency": "USDC",
        "destinationNetwork": "base", "paymentMethod": method})
}

impl Rig {
    async fn post(&self, body: &Value, cookie: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.gw.url(ORDERS))
            .header("cookie", cookie)
            .json(body)
            .send()
            .await
            .expect("response");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, cookie: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.gw.url(path))
            .header("cookie", cookie)
            .send()
            .await
            .expect("response");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    fn calls(&self, e: Endpoint) -> Vec<RecordedRequest> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == Some(e))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apple_pay_order_is_made_for_the_signed_in_buyer_only() {
    let rig = start(Source::Context { identity: true }, |b| b).await;
    // The browser's identity fields are ignored, whatever it sends.
    let mut body = order("apple_pay");
    for (k, v) in [
        ("email", "mallory@evil.example"),
        ("phoneNumber", "+15555550100"),
        ("phoneNumberVerifiedAt", "2020-01-01T00:00:00Z"),
        ("agreementAcceptedAt", "2020-01-01T00:00:00Z"),
        ("partnerUserRef", "mallory"),
        (
            "destinationAddress",
            "0x9999999999999999999999999999999999999999",
        ),
        ("clientIp", "198.51.100.1"),
        ("domain", "evil.example"),
    ] {
        body[k] = json!(v);
    }
    let (status, answer) = rig.post(&body, SESSION_COOKIE).await;
    assert_eq!(status, 201, "{answer}\n{}", rig.gw.logs());
    rig.fake.assert_all_verified();
    let calls = rig.calls(Endpoint::Order);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].claims["uris"],
        json!([format!("POST {}{ORDERS_PATH}", rig.fake.addr())])
    );
    assert_eq!(
        calls[0].body,
        json!({
            "paymentAmount": "100", "paymentCurrency": "USD", "purchaseCurrency": "USDC",
            "paymentMethod": "GUEST_CHECKOUT_APPLE_PAY",
            "destinationAddress": APP_ADDRESS, "destinationNetwork": "base",
            "partnerUserRef": "alice", "email": ALICE_EMAIL, "phoneNumber": ALICE_PHONE,
            "phoneNumberVerifiedAt": VERIFIED_AT, "agreementAcceptedAt": VERIFIED_AT,
            "clientIp": "127.0.0.1", "domain": "shop.example.com",
        })
    );
    let token = calls[0].token.clone().unwrap();
    assert_eq!(
        answer["paymentLink"],
        json!({"url": format!("https://pay.coinbase.com/v2/api-onramp/apple-pay?sessionToken={token}"),
            "type": "PAYMENT_LINK_TYPE_APPLE_PAY_BUTTON"})
    );
    assert_eq!(answer["status"], "ONRAMP_ORDER_STATUS_PENDING_PAYMENT");
    assert_eq!(answer["quote"]["paymentTotal"], "101.50");
    assert!(answer["orderId"].as_str().is_some_and(|s| s.len() == 36));

    // The order is alice's: she reads it, bob does not, nor anybody without a session.
    let id = answer["orderId"].as_str().unwrap();
    let (status, got) = rig.get(&format!("{ORDERS}/{id}"), SESSION_COOKIE).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["orderId"], id);
    assert_eq!(got["partnerUserRef"], "alice");
    let (status, _) = rig.get(&format!("{ORDERS}/{id}"), BOB_COOKIE).await;
    assert_eq!(status, 404);
    let (status, _) = rig.get(&format!("{ORDERS}/{id}"), "").await;
    assert_eq!(status, 401, "the app's own 401 is relayed");
    let (status, _) = rig
        .get(
            &format!("{ORDERS}/00000000-0000-4000-8000-000000000000"),
            SESSION_COOKIE,
        )
        .await;
    assert_eq!(status, 404, "unknown at CDP");
    rig.fake
        .insert_order(json!({"orderId": "11111111-2222-4333-8444-555555555555",
        "status": "ONRAMP_ORDER_STATUS_COMPLETED", "partnerUserRef": "bob"}));
    let (status, _) = rig
        .get(
            &format!("{ORDERS}/11111111-2222-4333-8444-555555555555"),
            SESSION_COOKIE,
        )
        .await;
    assert_eq!(status, 404, "bob's order");
    let before = rig.fake.count();
    let (status, _) = rig.get(&format!("{ORDERS}/a.b"), SESSION_COOKIE).await;
    assert_eq!(status, 404);
    assert_eq!(rig.fake.count(), before, "a malformed id is not looked up");
    for r in rig.calls(Endpoint::GetOrder) {
        assert_eq!(
            r.claims["uris"],
            json!([format!("GET {}{}", rig.fake.addr(), r.path)])
        );
    }
    rig.fake.assert_all_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_prefixes_the_buyer_and_flags_the_pay_sheet() {
    let rig = start(Source::Context { identity: true }, |b| {
        b.section("onramp", "sandbox = true\napi = \"v2\"")
            .section("orders", "domain = \"\"")
    })
    .await;
    let (status, answer) = rig.post(&order("google_pay"), SESSION_COOKIE).await;
    assert_eq!(status, 201, "{answer}");
    let call = &rig.calls(Endpoint::Order)[0];
    assert_eq!(call.body["partnerUserRef"], "sandbox-alice");
    assert_eq!(call.body["paymentMethod"], "GUEST_CHECKOUT_GOOGLE_PAY");
    assert!(
        call.body.get("domain").is_none(),
        "no domain configured: none sent"
    );
    let url = answer["paymentLink"]["url"].as_str().unwrap();
    assert!(
        url.starts_with("https://pay.coinbase.com/v2/api-onramp/google-pay?sessionToken=")
            && url.ends_with("&useGooglePaySandbox=true"),
        "{url}"
    );
    // The sandbox user reads their own order back.
    let id = answer["orderId"].as_str().unwrap();
    let (status, _) = rig.get(&format!("{ORDERS}/{id}"), SESSION_COOKIE).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_buyers_identity_there_is_no_order() {
    let rig = start(Source::Context { identity: false }, |b| b).await;
    let mut body = order("apple_pay");
    // Even with every identity field from the browser.
    body["email"] = json!("mallory@evil.example");
    body["phoneNumber"] = json!("+15555550100");
    body["phoneNumberVerifiedAt"] = json!(VERIFIED_AT);
    body["agreementAcceptedAt"] = json!(VERIFIED_AT);
    let (status, answer) = rig.post(&body, SESSION_COOKIE).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"].as_str().is_some(), "{answer}");
    assert_eq!(rig.fake.count(), 0);
    // The app's context was asked (with the browser's cookie).
    assert!(rig
        .app
        .as_ref()
        .unwrap()
        .seen()
        .iter()
        .any(|r| r.path == "/.well-known/onramp-context"));
    // Bad input is refused (400) before anything else, without a CDP call.
    let mut eth = order("apple_pay");
    eth["paymentMethod"] = json!("card");
    let (status, _) = rig.post(&eth, SESSION_COOKIE).await;
    assert_eq!(status, 400);
    assert_eq!(rig.fake.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_carries_the_buyer_in_its_extra_claims() {
    let rig = start(Source::Ticket, |b| b).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ticket = |jti: &str, identity: bool| {
        let mut claims = json!({
            "addresses": [{"address": TICKET_ADDR, "blockchains": ["base"]}],
            "partnerUserRef": "user-42", "flow": "onramp",
            "iat": now, "exp": now + 120, "jti": jti,
        });
        if identity {
            claims["email"] = json!("user42@example.com");
            claims["phoneNumber"] = json!("+12125550142");
            claims["phoneNumberVerifiedAt"] = json!(VERIFIED_AT);
            claims["agreementAcceptedAt"] = json!(VERIFIED_AT);
        }
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(TICKET_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut body = order("apple_pay");
    body["ticket"] = json!(ticket("t-no-identity", false));
    let (status, _) = rig.post(&body, "").await;
    assert_eq!(status, 403);
    assert_eq!(rig.fake.count(), 0);
    body["ticket"] = json!(ticket("t-identity", true));
    let (status, answer) = rig.post(&body, "").await;
    assert_eq!(status, 201, "{answer}");
    let call = &rig.calls(Endpoint::Order)[0];
    assert_eq!(call.body["email"], "user42@example.com");
    assert_eq!(call.body["partnerUserRef"], "user-42");
    assert_eq!(call.body["destinationAddress"], TICKET_ADDR);
    rig.fake.assert_all_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_errors_reach_the_client_with_their_type() {
    let rig = start(Source::Context { identity: true }, |b| b).await;
    for (cdp_status, error_type, want) in [
        (400, "guest_permission_denied", 400),
        (400, "guest_region_forbidden", 400),
        (400, "phone_number_verification_expired", 400),
        (400, "otp_verification_required", 400),
        (400, "otp_verification_invalid", 400),
        (404, "otp_verification_not_found", 400),
        (429, "guest_transaction_limit", 429),
        (429, "guest_transaction_count", 429),
        (400, "network_not_tradable", 400),
    ] {
        rig.fake.set_mode(Mode::Custom {
            status: cdp_status,
            body: json!({"errorType": error_type, "errorMessage": format!("because {error_type}"),
                "correlationId": "corr-1"})
            .to_string(),
        });
        let (status, answer) = rig.post(&order("apple_pay"), SESSION_COOKIE).await;
        assert_eq!(status.as_u16(), want, "{error_type}: {answer}");
        assert_eq!(answer["errorType"], error_type, "{answer}");
        assert_eq!(answer["errorMessage"], format!("because {error_type}"));
        assert!(answer["error"].is_string());
    }
    // Coinbase's own rate limit and the gateway's key problems are not the buyer's.
    rig.fake.set_mode(Mode::Custom {
        status: 429,
        body: json!({"errorType": "rate_limit_exceeded", "errorMessage": "slow down"}).to_string(),
    });
    let r = rig
        .client
        .post(rig.gw.url(ORDERS))
        .header("cookie", SESSION_COOKIE)
        .json(&order("apple_pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    rig.fake.set_mode(Mode::Custom {
        status: 401,
        body: json!({"errorType": "unauthorized", "errorMessage": "no"}).to_string(),
    });
    let (status, _) = rig.post(&order("apple_pay"), SESSION_COOKIE).await;
    assert_eq!(status, 502);
    // A payment link on a foreign host is never handed out.
    rig.fake.set_mode(Mode::Custom {
        status: 201,
        body: json!({"order": {"orderId": "3f2c0c9e-7d55-4c43-9d0e-0c1f2a3b4c5d", "status": "x"},
            "paymentLink": {"url": "https://pay.coinbase.com.evil.example/apple-pay", "paymentLinkType": "x"}})
        .to_string(),
    });
    let (status, answer) = rig.post(&order("apple_pay"), SESSION_COOKIE).await;
    assert_eq!(status, 502);
    assert!(!answer.to_string().contains("evil"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_off_unless_enabled() {
    let rig = start(Source::Context { identity: true }, |b| {
        b.section("orders", "enabled = false")
    })
    .await;
    let (status, _) = rig.post(&order("apple_pay"), SESSION_COOKIE).await;
    assert_eq!(status, 404);
    assert_eq!(rig.fake.count(), 0);
    // And the config refuses orders without an app-provided identity.
    let out = GatewayBuilder::new("http://127.0.0.1:9")
        .section("orders", "enabled = true")
        .check();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("orders.enabled"));
}

/// Apple's domain-verification file is the app's, served through the proxy: `200` at
/// exactly that path, no redirect, nothing of the gateway's own in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apple_domain_association_file_is_the_apps_without_redirect() {
    let rig = start(Source::Context { identity: true }, |b| b).await;
    let path = "/.well-known/apple-developer-merchantid-domain-association";
    let r = rig.client.get(rig.gw.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("location").is_none());
    assert_eq!(r.headers()["x-upstream"], "context-app");
    let seen = rig.app.as_ref().unwrap().seen();
    assert!(seen.iter().any(|s| s.path == path), "{seen:?}");
}
