//! Running behind a load balancer and as several replicas: the Redis rate-limit backend
//! shared by two gateways (and what happens when Redis dies and comes back), agreement of
//! the Redis GCRA with the in-memory one, the PROXY protocol in front of TLS, trusted
//! `X-Forwarded-For` chains, and spoofing attempts from clients that are not proxies.
//!
//! Several tests talk from other loopback addresses (127.0.0.2, 127.0.0.10, ...): on Linux
//! all of 127.0.0.0/8 is local, so a client bound to one of them is a distinct client IP
//! to the gateway without any network setup.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proxy_header::{ProxiedAddress, ProxyHeader};
use redis::AsyncCommands;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::certs::{install_provider, Alpn};
use crate::common::fake_cdp::{FakeCdp, TestKey};
use crate::common::gateway::{field_str, Gateway, GatewayBuilder};
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

const ONRAMP: &str = "/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base";
const ERRORS_METRIC: &str = "onramp_gateway_rate_limiter_errors_total";
/// Bound on every "wait until the gateway recovers / the key expires" poll.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(10);
/// Timing-sensitive rate-limit sequences are re-run from a fresh client IP when the
/// machine was too slow for their window; this many tries before giving up.
const TIMING_ATTEMPTS: u8 = 4;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

struct Fixture {
    upstream: Upstream,
    key: TestKey,
    cdp: FakeCdp,
}

async fn fixture() -> Fixture {
    let upstream = Upstream::start().await;
    let key = TestKey::es256_sec1();
    let cdp = FakeCdp::start(&key);
    Fixture { upstream, key, cdp }
}

impl Fixture {
    /// A gateway builder wired to the fake app and the fake CDP, with a CDP key.
    fn gateway(&self) -> GatewayBuilder {
        let mut b = GatewayBuilder::new(&self.upstream.url())
            .section("cdp", &format!("api_base = \"{}\"", self.cdp.api_base()));
        for (k, v) in self.key.env() {
            b = b.env(&k, &v);
        }
        b
    }

    /// `clientIp` of every CDP call so far, oldest first.
    fn cdp_client_ips(&self) -> Vec<String> {
        self.cdp
            .requests()
            .iter()
            .map(|r| r.body["clientIp"].as_str().unwrap_or("<none>").to_string())
            .collect()
    }

    fn last_cdp_client_ip(&self) -> String {
        self.cdp_client_ips()
            .pop()
            .expect("the fake CDP received no request")
    }
}

fn redis_rate_limit(redis: &RedisServer, rpm: u32, burst: u32, on_error: &str) -> String {
    format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nrequests_per_minute = {rpm}\nburst = {burst}\n\
         on_backend_error = \"{on_error}\"",
        redis.url()
    )
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A reqwest client for `gw` (trusting its CA) whose connections leave from `local`.
fn client_from(gw: &Gateway, local: IpAddr) -> reqwest::Client {
    install_provider();
    reqwest::Client::builder()
        .use_preconfigured_tls((*gw.client_config(Alpn::Http11)).clone())
        .resolve("localhost", gw.https_addr)
        .local_address(local)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("build reqwest client")
}

/// GET the onramp route; panics with the body on anything but the answers these tests
/// expect (302, 429, 503), so a 400/502 never passes as "not rate limited".
async fn onramp(client: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    let resp = client
        .get(gw.url(ONRAMP))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {ONRAMP} on {}: {e}", gw.https_addr));
    let status = resp.status().as_u16();
    assert!(
        [302, 429, 503].contains(&status),
        "unexpected {status} from /onramp: {}",
        resp.text().await.unwrap_or_default()
    );
    resp
}

async fn onramp_status(client: &reqwest::Client, gw: &Gateway) -> u16 {
    onramp(client, gw).await.status().as_u16()
}

/// Values of header `name` as the fake app received them.
fn header_values(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The sum of a Prometheus/OpenMetrics sample over all its label sets; `None` if the
/// metric does not appear at all (so a renamed metric fails loudly instead of reading 0).
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labels) = rest.strip_prefix('{') {
            // Label values may contain spaces: the value follows the closing brace.
            labels.split_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // a longer metric name sharing the prefix
        };
        if let Some(v) = value
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

async fn metric(gw: &Gateway, name: &str) -> f64 {
    let (status, text) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    metric_sum(&text, name).unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

/// Polls `/readyz` until it answers `want`; returns the last body. Panics after `within`.
async fn wait_readyz(gw: &Gateway, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = gw.admin_get("/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} (wanted {want}) for {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every Redis key whose name ends with `suffix` (the client IP). The server belongs to
/// the test, so `KEYS` sees nothing else and the key prefix need not be known.
async fn redis_keys_ending(
    con: &mut redis::aio::MultiplexedConnection,
    suffix: &str,
) -> Vec<String> {
    let keys: Vec<String> = con.keys("*").await.expect("KEYS *");
    keys.into_iter().filter(|k| k.ends_with(suffix)).collect()
}

// ---------------------------------------------------------------------------------------
// Shared Redis backend
// ---------------------------------------------------------------------------------------

/// Two replicas behind one balancer share one budget per client: alternating between them
/// must not double the burst. Another client keeps its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_enforce_one_combined_limit() {
    let fx = fixture().await;
    let redis = RedisServer::start();
    // rpm 60: one request's budget returns per second, so the burst is exact as long as
    // the sequence fits in that second (checked below; a slow run is retried).
    let rl = redis_rate_limit(&redis, 60, 3, "deny");
    let a = fx.gateway().section("rate_limit", &rl).start().await;
    let b = fx.gateway().section("rate_limit", &rl).start().await;
    // Both replicas connect to Redis before the timed part (readiness PINGs it).
    wait_readyz(&a, 200, RECOVERY_DEADLINE).await;
    wait_readyz(&b, 200, RECOVERY_DEADLINE).await;

    let window = Duration::from_millis(1000);
    let expected = [302, 302, 302, 429, 429, 429, 429, 429];
    let mut verified_ip = None;
    for attempt in 0..TIMING_ATTEMPTS {
        let ip = v4(127, 0, 0, 10 + attempt);
        let clients = [client_from(&a, ip), client_from(&b, ip)];
        let gws = [&a, &b];
        // Warm the TLS connections on a route that is not rate limited.
        for (c, g) in clients.iter().zip(gws) {
            let r = c.get(g.url("/echo")).send().await.expect("warm-up /echo");
            assert_eq!(r.status(), 200);
        }
        let cdp_before = fx.cdp.count();
        let started = Instant::now();
        let mut statuses = Vec::new();
        let mut retry_after_missing = Vec::new();
        for i in 0..expected.len() {
            let resp = onramp(&clients[i % 2], gws[i % 2]).await;
            if resp.status() == 429 && resp.headers().get("retry-after").is_none() {
                retry_after_missing.push(i);
            }
            statuses.push(resp.status().as_u16());
        }
        let took = started.elapsed();
        if took >= window {
            eprintln!("attempt {attempt}: sequence took {took:?} (> {window:?}), retrying from a fresh IP");
            continue;
        }
        assert_eq!(
            statuses, expected,
            "requests alternated between two replicas (A,B,A,B..) from {ip} within {took:?}"
        );
        assert!(
            retry_after_missing.is_empty(),
            "429 without Retry-After at {retry_after_missing:?}"
        );
        let minted: Vec<String> = fx.cdp_client_ips()[cdp_before..].to_vec();
        assert_eq!(
            minted,
            vec![ip.to_string(); 3],
            "only the 3 allowed requests may reach CDP"
        );
        verified_ip = Some(ip);
        break;
    }
    let ip = verified_ip.expect("no attempt fitted the 1 s window; machine too loaded");

    // A different client is unaffected, on both replicas.
    let other = v4(127, 0, 0, 2);
    for g in [&a, &b] {
        let status = onramp_status(&client_from(g, other), g).await;
        assert_eq!(status, 302, "client {other} limited by {ip}'s budget");
        assert_eq!(fx.last_cdp_client_ip(), other.to_string());
    }
    fx.cdp.assert_all_verified();
}

/// Redis dies: "deny" fails closed (503, not ready), "allow" fails open (302, counted).
/// Redis comes back on the same address: both recover without a gateway restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_deny_and_allow_then_recovery() {
    let fx = fixture().await;
    let mut redis = RedisServer::start();
    let deny = fx
        .gateway()
        .section("rate_limit", &redis_rate_limit(&redis, 600, 100, "deny"))
        .start()
        .await;
    let allow = fx
        .gateway()
        .section("rate_limit", &redis_rate_limit(&redis, 600, 100, "allow"))
        .start()
        .await;
    let deny_client = deny.https_client(Alpn::Http11);
    let allow_client = allow.https_client(Alpn::Http11);
    wait_readyz(&deny, 200, RECOVERY_DEADLINE).await;
    wait_readyz(&allow, 200, RECOVERY_DEADLINE).await;
    assert_eq!(onramp_status(&deny_client, &deny).await, 302);
    assert_eq!(onramp_status(&allow_client, &allow).await, 302);

    redis.kill();

    // The gateway's pooled connection is dead and reconnects fail: the first request
    // already has to see the outage (bounded by the 500 ms limiter call timeout).
    let started = Instant::now();
    let resp = onramp(&deny_client, &deny).await;
    assert_eq!(
        resp.status(),
        503,
        "on_backend_error = \"deny\" with Redis down"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a dead Redis stalled the request for {:?}",
        started.elapsed()
    );
    let cdp_before = fx.cdp.count();
    assert_eq!(onramp_status(&deny_client, &deny).await, 503);
    assert_eq!(fx.cdp.count(), cdp_before, "fail-closed must not call CDP");
    let (status, body) = deny.admin_get("/readyz").await;
    assert_eq!(status, 503, "/readyz with Redis down: {body}");
    assert!(
        body.to_lowercase().contains("redis"),
        "/readyz should name Redis: {body}"
    );

    let errors_before = metric(&allow, ERRORS_METRIC).await;
    assert_eq!(
        onramp_status(&allow_client, &allow).await,
        302,
        "on_backend_error = \"allow\" with Redis down"
    );
    assert_eq!(onramp_status(&allow_client, &allow).await, 302);
    let errors_after = metric(&allow, ERRORS_METRIC).await;
    assert!(
        errors_after >= errors_before + 2.0,
        "{ERRORS_METRIC} went {errors_before} -> {errors_after} over two fail-open requests"
    );
    let (status, body) = allow.admin_get("/readyz").await;
    assert_eq!(status, 503, "fail-open still is not ready: {body}");
    assert!(body.to_lowercase().contains("redis"), "{body}");

    redis.restart();

    // Recovery without restarting either gateway.
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        let status = onramp_status(&deny_client, &deny).await;
        if status == 302 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deny gateway still {status} {RECOVERY_DEADLINE:?} after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_readyz(&deny, 200, RECOVERY_DEADLINE).await;
    wait_readyz(&allow, 200, RECOVERY_DEADLINE).await;

    // The fail-open replica really uses Redis again: no new limiter error, and the
    // client's bucket now lives in the (fresh) Redis.
    let errors_before = metric(&allow, ERRORS_METRIC).await;
    assert_eq!(onramp_status(&allow_client, &allow).await, 302);
    assert_eq!(
        metric(&allow, ERRORS_METRIC).await,
        errors_before,
        "a request after recovery still failed over to fail-open"
    );
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the restarted Redis");
    let keys = redis_keys_ending(&mut con, "127.0.0.1").await;
    assert_eq!(
        keys.len(),
        1,
        "expected the client's bucket in Redis after recovery"
    );
    fx.cdp.assert_all_verified();
}

/// One burst + refill probe against `gw` from `client`: 8 requests at once, then (after
/// one emission interval `t`) two more. `None` if the run did not fit the windows the
/// expected pattern relies on (the caller retries from a fresh client IP).
async fn gcra_probe(gw: &Gateway, client: &reqwest::Client, t: Duration) -> Option<Vec<bool>> {
    let margin = Duration::from_millis(50);
    let started = Instant::now();
    let mut pattern = Vec::new();
    let mut first_answer = started;
    for i in 0..8 {
        pattern.push(onramp_status(client, gw).await == 302);
        if i == 0 {
            first_answer = Instant::now();
        }
    }
    // The burst must be over before one interval's budget comes back.
    if started.elapsed() + margin >= t {
        return None;
    }
    // The gateway saw request 0 before `first_answer`, so after `t` more one unit of
    // budget is back for sure...
    tokio::time::sleep_until((first_answer + t + margin).into()).await;
    for _ in 0..2 {
        pattern.push(onramp_status(client, gw).await == 302);
    }
    // ...and the one after it is refused only while a second unit is not back yet.
    if started.elapsed() + margin >= 2 * t {
        return None;
    }
    Some(pattern)
}

/// The Redis Lua GCRA and the in-memory (governor) one allow and refuse the same requests;
/// Redis keys carry a TTL of the bucket's reset time and vanish when it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_memory_backends_agree_and_keys_expire() {
    let fx = fixture().await;
    let redis = RedisServer::start();
    let policy = "requests_per_minute = 120\nburst = 3";
    let memory = fx
        .gateway()
        .section("rate_limit", &format!("backend = \"memory\"\n{policy}"))
        .start()
        .await;
    let shared = fx
        .gateway()
        .section("rate_limit", &redis_rate_limit(&redis, 120, 3, "deny"))
        .start()
        .await;
    wait_readyz(&shared, 200, RECOVERY_DEADLINE).await;
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to test Redis");

    // burst 3 at once, the rest refused; one interval later exactly one more.
    let t = Duration::from_millis(500);
    let expected = vec![
        true, true, true, false, false, false, false, false, true, false,
    ];
    let mut patterns = Vec::new();
    for (name, gw) in [("memory", &memory), ("redis", &shared)] {
        let mut got = None;
        for attempt in 0..TIMING_ATTEMPTS {
            let ip = v4(127, 0, 0, 20 + attempt);
            let client = client_from(gw, ip);
            let warm = client.get(gw.url("/echo")).send().await.expect("warm-up");
            assert_eq!(warm.status(), 200);
            match gcra_probe(gw, &client, t).await {
                Some(p) => {
                    got = Some((ip, p));
                    break;
                }
                None => eprintln!("{name} attempt {attempt}: too slow for the window, retrying"),
            }
        }
        let (ip, pattern) =
            got.unwrap_or_else(|| panic!("{name}: no run fitted the window; machine too loaded"));
        if name == "redis" {
            // The bucket of a client who just used it has a TTL no longer than a full
            // refill (burst × T = 1.5 s): idle clients cost Redis nothing.
            let keys = redis_keys_ending(&mut con, &ip.to_string()).await;
            assert_eq!(keys.len(), 1, "one key per client, got {keys:?}");
            let pttl: i64 = con.pttl(&keys[0]).await.expect("PTTL");
            assert!(
                pttl > 0 && pttl <= 1500,
                "key {} has PTTL {pttl} ms, expected 1..=1500",
                keys[0]
            );
        }
        patterns.push((name, pattern));
    }
    assert_eq!(patterns[0].1, expected, "memory backend");
    assert_eq!(
        patterns[1].1, patterns[0].1,
        "redis backend disagrees with memory backend"
    );

    // A tiny window: rpm 600, burst 1 → T = 100 ms, so the key lives at most 100 ms.
    let tiny = fx
        .gateway()
        .section("rate_limit", &redis_rate_limit(&redis, 600, 1, "deny"))
        .start()
        .await;
    wait_readyz(&tiny, 200, RECOVERY_DEADLINE).await;
    let mut checked = None;
    for attempt in 0..TIMING_ATTEMPTS {
        let ip = v4(127, 0, 0, 40 + attempt);
        let client = client_from(&tiny, ip);
        assert_eq!(onramp_status(&client, &tiny).await, 302);
        let keys = redis_keys_ending(&mut con, &ip.to_string()).await;
        let Some(key) = keys.first() else {
            // Already expired before we looked (a slow machine): try again.
            eprintln!("tiny window attempt {attempt}: key already gone, retrying");
            continue;
        };
        let pttl: i64 = con.pttl(key).await.expect("PTTL");
        if pttl == -2 {
            continue;
        }
        assert!(
            (1..=100).contains(&pttl),
            "key {key} has PTTL {pttl} ms, expected 1..=100"
        );
        checked = Some(key.clone());
        break;
    }
    let key = checked.expect("never saw the tiny-window key before it expired");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let exists: bool = con.exists(&key).await.expect("EXISTS");
        if !exists {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "key {key} still present 2 s after a 100 ms TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No bucket is ever written without a TTL.
    let all: Vec<String> = con.keys("*").await.expect("KEYS *");
    for k in all {
        let pttl: i64 = con.pttl(&k).await.expect("PTTL");
        assert!(pttl != -1, "key {k} has no TTL");
    }
    fx.cdp.assert_all_verified();
}

// ---------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------

/// Opens TCP to `gw` (from `local` if given), writes `preamble` (a PROXY header, or
/// garbage), then does the TLS handshake. Bounded: a gateway that neither serves nor
/// closes fails the test.
pub(crate) async fn connect_with_preamble(
    gw: &Gateway,
    local: Option<IpAddr>,
    preamble: &[u8],
) -> io::Result<TlsStream<TcpStream>> {
    let attempt = async {
        let mut tcp = match local {
            Some(ip) => {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(gw.https_addr).await?
            }
            None => TcpStream::connect(gw.https_addr).await?,
        };
        tcp.set_nodelay(true)?;
        tcp.write_all(preamble).await?;
        TlsConnector::from(gw.client_config(Alpn::Http11))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| panic!("gateway neither served nor closed within 10 s"))
}

/// One HTTP/1.1 GET over an established TLS stream.
pub(crate) async fn h1_get(
    tls: TlsStream<TcpStream>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    let driver = tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("response within 20 s")
    .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    driver.abort();
    (status, headers, body)
}

fn v1(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    format!("PROXY TCP4 {src} {dst} {sport} {dport}\r\n").into_bytes()
}

pub(crate) fn v2(src: &str, dst: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    ProxyHeader::with_address(ProxiedAddress::stream(
        src.parse().unwrap(),
        dst.parse().unwrap(),
    ))
    .encode_v2(&mut buf)
    .expect("encode PROXY v2");
    buf
}

fn v2_local() -> Vec<u8> {
    let mut buf = Vec::new();
    ProxyHeader::with_local()
        .encode_v2(&mut buf)
        .expect("encode PROXY v2 LOCAL");
    buf
}

/// `/echo` over a PROXY-prefixed connection: the `X-Forwarded-For` values the app got.
async fn proxied_echo_xff(
    gw: &Gateway,
    local: Option<IpAddr>,
    preamble: &[u8],
    headers: &[(&str, &str)],
) -> Vec<String> {
    let tls = connect_with_preamble(gw, local, preamble)
        .await
        .expect("TLS over a valid PROXY header");
    let (status, _, body) = h1_get(tls, "/echo", headers).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).expect("echo JSON");
    header_values(&echo, "x-forwarded-for")
}

fn proxy_protocol_rate_limit() -> &'static str {
    "requests_per_minute = 600\nburst = 100"
}

/// A trusted balancer names the client in a v1 or v2 header: the app and CDP see that
/// client, not the balancer, and headers from the client cannot override it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_name_the_client() {
    let fx = fixture().await;
    let gw = fx
        .gateway()
        .section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
        )
        .section("rate_limit", proxy_protocol_rate_limit())
        .start()
        .await;
    let https = gw.https_addr.to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "v1 TCP4",
            v1("203.0.113.7", "127.0.0.1", 5555, 443),
            "203.0.113.7",
        ),
        ("v2 TCP4", v2("203.0.113.8:5555", &https), "203.0.113.8"),
        (
            "v2 TCP6",
            v2("[2001:db8::7]:5555", "[2001:db8::1]:443"),
            "2001:db8::7",
        ),
    ];
    for (name, header, client) in &cases {
        // The named client is not a trusted proxy, so its own XFF is not believed.
        let xff = proxied_echo_xff(
            &gw,
            None,
            header,
            &[("x-forwarded-for", "6.6.6.6"), ("x-real-ip", "6.6.6.6")],
        )
        .await;
        assert_eq!(
            xff,
            vec![client.to_string()],
            "{name}: X-Forwarded-For to the app"
        );

        let tls = connect_with_preamble(&gw, None, header)
            .await
            .expect("TLS over a valid PROXY header");
        let (status, _, body) = h1_get(tls, ONRAMP, &[("x-forwarded-for", "6.6.6.6")]).await;
        assert_eq!(status, 302, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(fx.last_cdp_client_ip(), *client, "{name}: CDP clientIp");
    }

    // LOCAL (the balancer's own health check): the socket address is the client.
    let xff = proxied_echo_xff(&gw, None, &v2_local(), &[]).await;
    assert_eq!(
        xff,
        vec!["127.0.0.1"],
        "v2 LOCAL: X-Forwarded-For to the app"
    );
    let tls = connect_with_preamble(&gw, None, &v2_local())
        .await
        .expect("TLS over PROXY v2 LOCAL");
    let (status, _, _) = h1_get(tls, ONRAMP, &[]).await;
    assert_eq!(status, 302);
    assert_eq!(
        fx.last_cdp_client_ip(),
        "127.0.0.1",
        "v2 LOCAL: CDP clientIp"
    );

    // The access log agrees with what CDP was told.
    gw.wait_for_log(Duration::from_secs(5), "access log for 2001:db8::7", |e| {
        field_str(e, "message") == Some("request")
            && field_str(e, "client_ip") == Some("2001:db8::7")
    })
    .await;
    fx.cdp.assert_all_verified();
}

/// With the PROXY protocol expected, a connection without a (valid) header is closed
/// before TLS, and serves nothing; the listener keeps serving proper connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_missing_or_garbled_header_closes_the_connection() {
    let fx = fixture().await;
    let gw = fx
        .gateway()
        .section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
        )
        .section("rate_limit", proxy_protocol_rate_limit())
        .start()
        .await;
    let good = v1("203.0.113.7", "127.0.0.1", 5555, 443);
    let mut bad_version = v2("203.0.113.7:5555", "127.0.0.1:443");
    bad_version[12] = 0x11; // version 1 in the v2 binary format: invalid
    let refusals: Vec<(&str, Vec<u8>)> = vec![
        ("missing header (TLS straight away)", Vec::new()),
        (
            "v1 with missing fields",
            b"PROXY TCP4 203.0.113.7\r\n".to_vec(),
        ),
        (
            "v1 with a bad address",
            b"PROXY TCP4 203.0.113.999 127.0.0.1 5555 443\r\n".to_vec(),
        ),
        ("not PROXY at all", b"HELLO 203.0.113.7\r\n".to_vec()),
        ("v2 with a bad version", bad_version),
    ];
    for (name, preamble) in &refusals {
        let served_before = fx.upstream.requests();
        let result = connect_with_preamble(&gw, None, preamble).await;
        assert!(
            result.is_err(),
            "{name}: the gateway completed a TLS handshake instead of closing"
        );
        assert_eq!(
            fx.upstream.requests(),
            served_before,
            "{name}: a request was served"
        );

        let xff = proxied_echo_xff(&gw, None, &good, &[]).await;
        assert_eq!(
            xff,
            vec!["203.0.113.7"],
            "after {name}: a proper connection"
        );
    }
    assert_eq!(fx.cdp.count(), 0);
}

/// Only a trusted peer may speak the PROXY protocol: anyone else could claim any address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_untrusted_peer_is_refused() {
    let fx = fixture().await;
    // 127.0.0.1 is untrusted; 127.0.0.2 stands in for the real balancer, so the test can
    // show a proper connection still works after each refusal.
    let gw = fx
        .gateway()
        .section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.2/32\"]",
        )
        .section("rate_limit", proxy_protocol_rate_limit())
        .start()
        .await;
    let balancer = Some(v4(127, 0, 0, 2));
    let untrusted = Some(v4(127, 0, 0, 1));
    let https = gw.https_addr.to_string();
    let attempts: Vec<(&str, Vec<u8>)> = vec![
        ("v1 header", v1("203.0.113.7", "127.0.0.1", 5555, 443)),
        ("v2 header", v2("203.0.113.7:5555", &https)),
        ("v2 LOCAL", v2_local()),
        ("no header", Vec::new()),
    ];
    for (name, preamble) in &attempts {
        let served_before = fx.upstream.requests();
        let result = connect_with_preamble(&gw, untrusted, preamble).await;
        assert!(
            result.is_err(),
            "{name} from an untrusted peer: TLS handshake completed instead of a close"
        );
        assert_eq!(
            fx.upstream.requests(),
            served_before,
            "{name}: a request was served"
        );

        let xff =
            proxied_echo_xff(&gw, balancer, &v1("198.51.100.4", "127.0.0.1", 1, 443), &[]).await;
        assert_eq!(
            xff,
            vec!["198.51.100.4"],
            "after {name}: the balancer's connection"
        );
    }
    assert_eq!(fx.cdp.count(), 0);
}

// ---------------------------------------------------------------------------------------
// X-Forwarded-For from trusted proxies, spoofing from everyone else
// ---------------------------------------------------------------------------------------

/// Behind an HTTP proxy in `trusted_proxies` (no PROXY protocol): the client is the
/// right-most untrusted `X-Forwarded-For` hop, and the app gets the chain plus the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_xff_rightmost_untrusted_hop() {
    let fx = fixture().await;
    let gw = fx
        .gateway()
        .section("server", "trusted_proxies = [\"127.0.0.0/8\"]")
        .section("rate_limit", "requests_per_minute = 600\nburst = 100")
        .start()
        .await;
    let client = gw.https_client(Alpn::Http11);
    // (X-Forwarded-For lines sent, client IP expected, XFF the app should receive)
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["198.51.100.9, 127.0.0.5"],
            "198.51.100.9",
            "198.51.100.9, 127.0.0.5, 127.0.0.1",
        ),
        // Hops left of the first untrusted one are the client's own claims: ignored.
        (
            vec!["6.6.6.6, 198.51.100.2, 127.0.0.9"],
            "198.51.100.2",
            "6.6.6.6, 198.51.100.2, 127.0.0.9, 127.0.0.1",
        ),
        // Several header lines form one chain, in order.
        (
            vec!["6.6.6.6", "198.51.100.3, 127.0.0.7"],
            "198.51.100.3",
            "6.6.6.6, 198.51.100.3, 127.0.0.7, 127.0.0.1",
        ),
        (
            vec!["2001:db8::9, 127.0.0.5"],
            "2001:db8::9",
            "2001:db8::9, 127.0.0.5, 127.0.0.1",
        ),
        (
            vec!["[2001:db8::10]:443, 127.0.0.5"],
            "2001:db8::10",
            "[2001:db8::10]:443, 127.0.0.5, 127.0.0.1",
        ),
        // A malformed hop stops the walk at the last address a trusted hop vouched for.
        (
            vec!["bogus, 127.0.0.5"],
            "127.0.0.5",
            "bogus, 127.0.0.5, 127.0.0.1",
        ),
        (
            vec!["198.51.100.66, bogus, 127.0.0.6"],
            "127.0.0.6",
            "198.51.100.66, bogus, 127.0.0.6, 127.0.0.1",
        ),
        // Every hop trusted: the left-most one is as far as the chain can be believed.
        (
            vec!["127.0.0.8, 127.0.0.5"],
            "127.0.0.8",
            "127.0.0.8, 127.0.0.5, 127.0.0.1",
        ),
        // No XFF: the trusted peer itself.
        (vec![], "127.0.0.1", "127.0.0.1"),
    ];
    for (sent, want_ip, want_xff) in &cases {
        let mut req = client.get(gw.url("/echo"));
        for v in sent {
            req = req.header("x-forwarded-for", *v);
        }
        let resp = req.send().await.expect("GET /echo");
        assert_eq!(resp.status(), 200);
        let echo: Value = resp.json().await.expect("echo JSON");
        assert_eq!(
            header_values(&echo, "x-forwarded-for"),
            vec![want_xff.to_string()],
            "XFF {sent:?}: what the app received"
        );

        let mut req = client.get(gw.url(ONRAMP));
        for v in sent {
            req = req.header("x-forwarded-for", *v);
        }
        let resp = req.send().await.expect("GET /onramp");
        assert_eq!(resp.status(), 302, "XFF {sent:?}");
        assert_eq!(
            fx.last_cdp_client_ip(),
            *want_ip,
            "XFF {sent:?}: CDP clientIp"
        );
    }

    // From a trusted peer too, only X-Forwarded-For counts: X-Real-IP and Forwarded are
    // neither believed nor passed on.
    let resp = client
        .get(gw.url("/echo"))
        .header("x-real-ip", "198.51.100.77")
        .header("forwarded", "for=198.51.100.77")
        .send()
        .await
        .expect("GET /echo");
    let echo: Value = resp.json().await.expect("echo JSON");
    assert_eq!(header_values(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert!(header_values(&echo, "x-real-ip").is_empty(), "{echo}");
    assert!(header_values(&echo, "forwarded").is_empty(), "{echo}");
    let resp = client
        .get(gw.url(ONRAMP))
        .header("x-real-ip", "198.51.100.77")
        .header("forwarded", "for=198.51.100.77")
        .send()
        .await
        .expect("GET /onramp");
    assert_eq!(resp.status(), 302);
    assert_eq!(fx.last_cdp_client_ip(), "127.0.0.1");
    fx.cdp.assert_all_verified();
}

/// Without trusted proxies, no header a client writes changes who it is: not for CDP,
/// not for the rate limit, not for the app, not in the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_headers_from_untrusted_peer_are_ignored() {
    let fx = fixture().await;
    // rpm 1: no budget comes back during the test, so the burst of 3 is all there is.
    let gw = fx
        .gateway()
        .section("rate_limit", "requests_per_minute = 1\nburst = 3")
        .start()
        .await;
    let client = gw.https_client(Alpn::Http11);
    let mut statuses = Vec::new();
    for i in 0..20u16 {
        let fake = format!("198.51.{}.{}", i / 8, 1 + i);
        let fake6 = format!("2001:db8:{i:x}::1");
        let resp = client
            .get(gw.url(ONRAMP))
            .header("x-forwarded-for", format!("{fake}, {fake6}"))
            .header("x-forwarded-for", fake.as_str())
            .header("x-real-ip", fake.as_str())
            .header("forwarded", format!("for={fake};proto=https"))
            .header("true-client-ip", fake.as_str())
            .header("cf-connecting-ip", fake.as_str())
            .send()
            .await
            .expect("GET /onramp");
        statuses.push(resp.status().as_u16());
    }
    let mut expected = vec![302u16; 3];
    expected.resize(20, 429);
    assert_eq!(
        statuses, expected,
        "every request is 127.0.0.1's, whatever it claims"
    );
    assert_eq!(
        fx.cdp_client_ips(),
        vec!["127.0.0.1"; 3],
        "CDP must only ever see the socket address"
    );

    // The app gets the socket address and none of the client's forwarding claims.
    let resp = client
        .get(gw.url("/echo"))
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-real-ip", "198.51.100.1")
        .header("forwarded", "for=198.51.100.1")
        .send()
        .await
        .expect("GET /echo");
    let echo: Value = resp.json().await.expect("echo JSON");
    assert_eq!(header_values(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert!(header_values(&echo, "x-real-ip").is_empty(), "{echo}");
    assert!(header_values(&echo, "forwarded").is_empty(), "{echo}");

    // The access log records 127.0.0.1 for every minting request.
    let onramp_lines = |gw: &Gateway| -> Vec<Value> {
        gw.log_events()
            .into_iter()
            .filter(|e| {
                field_str(e, "message") == Some("request")
                    && field_str(e, "path") == Some("/onramp")
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while onramp_lines(&gw).len() < 20 {
        assert!(
            Instant::now() < deadline,
            "expected 20 /onramp access log lines, got {}",
            onramp_lines(&gw).len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for line in onramp_lines(&gw) {
        assert_eq!(field_str(&line, "client_ip"), Some("127.0.0.1"), "{line}");
    }
    fx.cdp.assert_all_verified();
}
