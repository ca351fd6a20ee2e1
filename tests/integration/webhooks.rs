//! Transaction webhooks through the real binary: deliveries signed here by an independent
//! HMAC-SHA256 (RFC 2104 over the `sha2` crate, checked against RFC 4231 — not the
//! gateway's code), the app's view of what was forwarded, and the `webhooks subscribe` /
//! `webhooks list` commands against the verifying fake CDP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::certs::Alpn;
use crate::common::fake_cdp::{Endpoint, FakeCdp, TestKey, SUBSCRIPTIONS_PATH};
use crate::common::gateway::{run_binary, Gateway, GatewayBuilder};
use crate::common::upstream::dead_address;

const HOOK_PATH: &str = "/onramp/webhooks";
const FORWARD_PATH: &str = "/onramp-events";
const OLD_SECRET: &str = "0b9f6c1e-old0-4a7e-9c55-6f1d2c3b4a59";
const NEW_SECRET: &str = "7d2e9a40-new0-4b1f-8e66-1a2b3c4d5e6f";
const BODY: &str = r#"{"eventType":"onramp.transaction.success","orderId":"3f2c0c9e-7d55-4c43-9d0e-0c1f2a3b4c5d","status":"ONRAMP_ORDER_STATUS_COMPLETED","partnerUserRef":"alice"}"#;

// ---------------------------------------------------------------------------------------
// An independent HMAC-SHA256 and the documented signing recipe

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_test_hmac_matches_rfc_4231() {
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 6: a key longer than the block.
    assert_eq!(
        hex(&hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A delivery as Coinbase sends it: headers (Content-Type, X-Hook0-Id, signature over
/// `t.h.<content-type>.<id>.<body>`) and the body.
struct Delivery {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn delivery(secret: &str, t: u64, id: &str, body: &str) -> Delivery {
    let h = "content-type x-hook0-id";
    let content_type = "application/json";
    let mut msg = format!("{t}.{h}.{content_type}.{id}.").into_bytes();
    msg.extend_from_slice(body.as_bytes());
    let v1 = hex(&hmac_sha256(secret.as_bytes(), &msg));
    Delivery {
        headers: vec![
            ("content-type".into(), content_type.into()),
            ("x-hook0-id".into(), id.into()),
            ("x-hook0-signature".into(), format!("t={t},h={h},v1={v1}")),
        ],
        body: body.as_bytes().to_vec(),
    }
}

impl Delivery {
    fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(k, _)| k != name);
        self
    }

    fn signature(&self) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k == "x-hook0-signature")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// The app: records what reaches it, answers a settable status

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

struct EventsApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    status: Arc<AtomicU16>,
    task: JoinHandle<()>,
}

impl EventsApp {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let (s, st) = (seen.clone(), status.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, st) = (s.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, st) = (s.clone(), st.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            s.lock().unwrap().push(Seen {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                            });
                            let mut r = Response::new(Full::new(Bytes::from_static(b"app")));
                            *r.status_mut() = StatusCode::from_u16(st.load(Ordering::SeqCst))
                                .unwrap_or(StatusCode::OK);
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            status,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }
}

impl Drop for EventsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------

fn hooks(b: GatewayBuilder) -> GatewayBuilder {
    b.section("webhooks", &format!("path = \"{HOOK_PATH}\""))
        .env(
            "CDP_WEBHOOK_SECRETS",
            &format!("{OLD_SECRET}, {NEW_SECRET}"),
        )
}

async fn start(app_url: &str) -> (Gateway, reqwest::Client) {
    let gw = hooks(GatewayBuilder::new(app_url)).start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    (gw, client)
}

async fn deliver(gw: &Gateway, client: &reqwest::Client, d: &Delivery) -> (u16, String) {
    let mut r = client.post(gw.url(HOOK_PATH)).body(d.body.clone());
    for (k, v) in &d.headers {
        r = r.header(k, v);
    }
    let r = r.send().await.expect("response");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn metric(gw: &Gateway, event_type: &str, result: &str) -> u64 {
    let (_, text) = gw.admin_get("/metrics").await;
    let needle = format!(
        "onramp_gateway_webhook_deliveries_total{{event_type=\"{event_type}\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_delivery_reaches_the_app_raw_with_its_event_type() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    let d = delivery(NEW_SECRET, now(), "evt-valid-1", BODY);
    let (status, text) = deliver(&gw, &client, &d).await;
    assert_eq!(status, 200, "{text}\n{}", gw.logs());
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.path, FORWARD_PATH);
    assert_eq!(s.body, BODY.as_bytes(), "the raw body, byte for byte");
    assert_eq!(s.headers["content-type"], "application/json");
    assert_eq!(
        s.headers["x-onramp-gateway-event"],
        "onramp.transaction.success"
    );
    assert_eq!(s.headers["x-hook0-id"], "evt-valid-1");
    assert!(s.headers.get("x-hook0-signature").is_none());
    assert_eq!(
        metric(&gw, "onramp.transaction.success", "forwarded").await,
        1
    );
    // Neither secret nor signature in the logs.
    let logs = format!("{}{}", gw.logs(), gw.stderr());
    for secret in [OLD_SECRET, NEW_SECRET] {
        assert!(!logs.contains(secret), "secret logged");
    }
    let v1 = d.signature().rsplit("v1=").next().unwrap().to_string();
    assert!(!logs.contains(&v1), "signature logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_delivery_is_401_and_nothing_is_forwarded() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    let t = now();
    let mut altered = delivery(OLD_SECRET, t, "evt-bad-5", BODY);
    // One byte of the body changed after signing.
    altered.body[2] ^= 0x01;
    let cases = [
        (
            "unknown secret",
            delivery("not-a-configured-secret", t, "evt-bad-1", BODY),
        ),
        ("stale", delivery(OLD_SECRET, t - 330, "evt-bad-2", BODY)),
        ("future", delivery(OLD_SECRET, t + 330, "evt-bad-3", BODY)),
        (
            "signed header missing",
            delivery(OLD_SECRET, t, "evt-bad-4", BODY).without("x-hook0-id"),
        ),
        ("body altered", altered),
        (
            "no signature",
            delivery(OLD_SECRET, t, "evt-bad-6", BODY).without("x-hook0-signature"),
        ),
    ];
    for (what, d) in &cases {
        let (status, _) = deliver(&gw, &client, d).await;
        assert_eq!(status, 401, "{what}");
    }
    assert!(app.seen().is_empty(), "forwarded: {:?}", app.seen());
    assert_eq!(metric(&gw, "other", "stale").await, 2);
    assert_eq!(metric(&gw, "other", "invalid_signature").await, 2);
    assert_eq!(metric(&gw, "other", "signed_header_missing").await, 1);
    // Inside the tolerance (300 s) still passes. Margins of 20-30 s keep a loaded machine
    // (the gateway reads its clock later than the test) off the boundary, which the unit
    // tests pin exactly.
    let (status, _) = deliver(&gw, &client, &delivery(OLD_SECRET, t - 280, "evt-ok", BODY)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_secrets_are_both_accepted_during_rotation() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    for (i, secret) in [OLD_SECRET, NEW_SECRET].iter().enumerate() {
        let (status, _) = deliver(
            &gw,
            &client,
            &delivery(secret, now(), &format!("evt-rot-{i}"), BODY),
        )
        .await;
        assert_eq!(status, 200, "secret #{i}");
    }
    assert_eq!(app.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_delivery_id_is_answered_without_forwarding_twice() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    let d = delivery(OLD_SECRET, now(), "evt-dup-1", BODY);
    assert_eq!(deliver(&gw, &client, &d).await.0, 200);
    assert_eq!(deliver(&gw, &client, &d).await.0, 200);
    // Coinbase's own re-send: same id, fresh signature.
    let again = delivery(NEW_SECRET, now(), "evt-dup-1", BODY);
    assert_eq!(deliver(&gw, &client, &again).await.0, 200);
    assert_eq!(app.seen().len(), 1, "the app sees the event once");
    assert_eq!(
        metric(&gw, "onramp.transaction.success", "duplicate").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_failure_is_502_and_coinbases_retry_is_forwarded() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    app.set_status(500);
    let first = delivery(OLD_SECRET, now(), "evt-retry-1", BODY);
    assert_eq!(deliver(&gw, &client, &first).await.0, 502);
    app.set_status(204);
    let retry = delivery(OLD_SECRET, now(), "evt-retry-1", BODY);
    assert_eq!(deliver(&gw, &client, &retry).await.0, 200);
    assert_eq!(app.seen().len(), 2, "the failed attempt and the retry");
    assert_eq!(
        metric(&gw, "onramp.transaction.success", "app_error").await,
        1
    );

    // No app at all.
    let down = format!("http://{}", dead_address());
    let (gw, client) = start(&down).await;
    let d = delivery(OLD_SECRET, now(), "evt-down-1", BODY);
    assert_eq!(deliver(&gw, &client, &d).await.0, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_reach_the_forward_path_and_big_bodies_are_413() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    for path in [
        FORWARD_PATH,
        "/onramp-events/",
        "/ONRAMP-EVENTS",
        "/onramp%2Devents",
        "/onramp-events?x=1",
        "//onramp-events",
    ] {
        let r = client
            .post(gw.url(path))
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let r = client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "GET {path}");
    }
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    // Everything else is still proxied.
    let r = client.get(gw.url("/onramp-eventsx")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.seen().len(), 1);

    let big = "x".repeat(5 * 1024 * 1024);
    let d = delivery(OLD_SECRET, now(), "evt-big", &big);
    let (status, _) = deliver(&gw, &client, &d).await;
    assert_eq!(status, 413);
    assert_eq!(app.seen().len(), 1, "nothing forwarded");
    // A GET on the webhook path: 405, nothing forwarded.
    let r = client.get(gw.url(HOOK_PATH)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
}

#[test]
fn start_up_and_check_refuse_a_receiver_without_secrets() {
    let b = || {
        GatewayBuilder::new("http://127.0.0.1:9")
            .section("webhooks", &format!("path = \"{HOOK_PATH}\""))
    };
    let out = b().check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CDP_WEBHOOK_SECRETS"), "{err}");
    let (out, _) = b()
        .env("CDP_WEBHOOK_SECRETS", " , ")
        .run_expect_exit(Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CDP_WEBHOOK_SECRETS"));
    let out = b()
        .env("CDP_WEBHOOK_SECRETS", &format!("{OLD_SECRET},{NEW_SECRET}"))
        .check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 secret(s)"), "{stdout}");
    assert!(!stdout.contains(OLD_SECRET) && !stdout.contains(NEW_SECRET));
}

#[test]
fn subscribe_prints_the_secret_once_and_list_never() {
    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let mut b = GatewayBuilder::new("http://127.0.0.1:9")
        .section(
            "cdp",
            &format!("platform_base = \"{}/platform\"", fake.api_base()),
        )
        // Set, without a secret yet: subscribing is how the secret is obtained.
        .section("webhooks", &format!("path = \"{HOOK_PATH}\""));
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let w = b.write();
    let config = w.path.to_string_lossy().into_owned();
    let target = "https://gw.example.com/onramp/webhooks";
    let args: Vec<String> = [
        "webhooks",
        "subscribe",
        "--url",
        target,
        "--config",
        &config,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_binary(&args, &w.env, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    fake.assert_all_verified();
    let secrets = fake.subscription_secrets();
    assert_eq!(secrets.len(), 1);
    assert_eq!(stdout.matches(secrets[0].as_str()).count(), 1, "{stdout}");
    assert!(stdout.contains(&format!("secret: {}", secrets[0])));
    assert!(!stderr.contains(&secrets[0]), "secret on stderr");
    let calls = fake.requests();
    assert_eq!(calls[0].endpoint, Some(Endpoint::Subscribe));
    assert_eq!(
        calls[0].claims["uris"],
        json!([format!("POST {}{SUBSCRIPTIONS_PATH}", fake.addr())])
    );
    let body = &calls[0].body;
    let events: Vec<&str> = body["eventTypes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut want = Vec::new();
    for side in ["onramp", "offramp"] {
        for e in ["created", "updated", "success", "failed"] {
            want.push(format!("{side}.transaction.{e}"));
        }
    }
    assert_eq!(events, want);
    assert_eq!(body["isEnabled"], true);
    assert_eq!(body["target"]["url"], target);

    let args: Vec<String> = ["webhooks", "list", "--config", &config]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = run_binary(&args, &w.env, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(target) && stdout.contains("enabled=true"),
        "{stdout}"
    );
    assert!(stdout.contains("onramp.transaction.success"));
    assert!(!stdout.contains(&secrets[0]), "list printed the secret");
    fake.assert_all_verified();
    let list = &fake.requests()[1];
    assert_eq!(list.endpoint, Some(Endpoint::ListSubscriptions));
    assert_eq!(list.path, format!("{SUBSCRIPTIONS_PATH}?pageSize=100"));
    assert_eq!(
        list.claims["uris"],
        json!([format!("GET {}{SUBSCRIPTIONS_PATH}", fake.addr())])
    );
}

/// Two replicas sharing one Redis: a delivery forwarded by one is a duplicate on the
/// other, and a delivery the app refused is forgotten, so the retry on either goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_delivery_ids_through_redis() {
    let redis = crate::common::redis::RedisServer::start();
    let app = EventsApp::start().await;
    let with_redis = |b: GatewayBuilder| {
        hooks(b).section(
            "rate_limit",
            &format!("backend = \"redis\"\nredis_url = \"{}\"", redis.url()),
        )
    };
    let a = with_redis(GatewayBuilder::new(&app.url())).start().await;
    let b = with_redis(GatewayBuilder::new(&app.url())).start().await;
    let (ca, cb) = (
        a.https_client(Alpn::H2AndHttp11),
        b.https_client(Alpn::H2AndHttp11),
    );
    let d = delivery(OLD_SECRET, now(), "evt-shared-1", BODY);
    assert_eq!(deliver(&a, &ca, &d).await.0, 200, "{}", a.logs());
    assert_eq!(deliver(&b, &cb, &d).await.0, 200);
    assert_eq!(app.seen().len(), 1, "forwarded once across replicas");
    let mut conn = redis.client().get_connection().unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("onramp-gateway:rl:webhook:jti:evt-shared-1")
        .query(&mut conn)
        .unwrap();
    assert!((290_000..=306_000).contains(&ttl), "PTTL {ttl}");

    app.set_status(503);
    let failed = delivery(OLD_SECRET, now(), "evt-shared-2", BODY);
    assert_eq!(deliver(&a, &ca, &failed).await.0, 502);
    app.set_status(200);
    assert_eq!(
        deliver(&b, &cb, &failed).await.0,
        200,
        "the retry is forwarded"
    );
    assert_eq!(app.seen().len(), 3);
}

/// Not a correctness test: what verification and forwarding cost per delivery, next to a
/// proxied POST of the same body (`cargo test --test integration webhooks::measure --
/// --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_delivery_latency() {
    let app = EventsApp::start().await;
    let (gw, client) = start(&app.url()).await;
    let n = 2000;
    let percentiles = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let mut hooks = Vec::with_capacity(n);
    for i in 0..n {
        let d = delivery(NEW_SECRET, now(), &format!("evt-measure-{i}"), BODY);
        let started = std::time::Instant::now();
        assert_eq!(deliver(&gw, &client, &d).await.0, 200);
        hooks.push(started.elapsed());
    }
    let mut proxied = Vec::with_capacity(n);
    for _ in 0..n {
        let started = std::time::Instant::now();
        let r = client
            .post(gw.url("/some-app-path"))
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        proxied.push(started.elapsed());
    }
    let (h50, h99) = percentiles(hooks);
    let (p50, p99) = percentiles(proxied);
    println!("webhook deliveries: p50 {h50:?} p99 {h99:?}; proxied POSTs: p50 {p50:?} p99 {p99:?} (n = {n})");
}
