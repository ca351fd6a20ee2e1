//! Redis where operators run it: over TLS (`rediss://`, a CA and server certificate made
//! here, `rate_limit.redis_ca_file`) and as a Redis Cluster (`rate_limit.redis_cluster`,
//! three primaries made with `redis-cli --cluster create`), against real `redis-server`s
//! on loopback. Client IPs are distinct loopback addresses (all of 127.0.0.0/8 is local).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use crate::common::certs::{install_provider, Alpn, KeyFormat, TestPki};
use crate::common::fake_cdp::{FakeCdp, TestKey};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::metric;
use crate::common::redis::{RedisCluster, RedisServer};
use crate::common::upstream::Upstream;

const ONRAMP: &str = "/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base";
const NO_LIMIT: &str = "requests_per_minute = 60000\nburst = 1000";
const ERRORS_METRIC: &str = "onramp_gateway_rate_limiter_errors_total";
/// Bound on every "wait until ready / recovered" poll.
const DEADLINE: Duration = Duration::from_secs(20);
/// Timing-sensitive sequences (one token per second) are re-run from fresh client IPs
/// when the machine was too slow for their window.
const TIMING_ATTEMPTS: u8 = 4;
const WINDOW: Duration = Duration::from_millis(1000);
const TICKET_SECRET: &str = "integration-ticket-secret-0123456789abcdef";

struct Fixture {
    upstream: Upstream,
    key: TestKey,
    cdp: FakeCdp,
}

async fn fixture() -> Fixture {
    install_provider();
    let upstream = Upstream::start().await;
    let key = TestKey::es256_sec1();
    let cdp = FakeCdp::start(&key);
    Fixture { upstream, key, cdp }
}

impl Fixture {
    fn gateway(&self, rate_limit: &str) -> GatewayBuilder {
        let mut b = GatewayBuilder::new(&self.upstream.url())
            .section("cdp", &format!("api_base = \"{}\"", self.cdp.api_base()))
            .section("rate_limit", rate_limit);
        for (k, v) in self.key.env() {
            b = b.env(&k, &v);
        }
        b
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A client for `gw` whose connections leave from `local`.
fn client_from(gw: &Gateway, local: IpAddr) -> reqwest::Client {
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

/// Status and `RateLimit-Policy` of `path`; panics on anything but 302/409/429/503, so a
/// 400 or 502 never passes for "not limited".
async fn get(client: &reqwest::Client, gw: &Gateway, path: &str) -> (u16, String) {
    let resp = client
        .get(gw.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let policy = resp
        .headers()
        .get("ratelimit-policy")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let body = resp.text().await.unwrap_or_default();
    assert!(
        [302, 409, 429, 503].contains(&status),
        "unexpected {status} from {path}: {body}\n{}",
        gw.logs()
    );
    (status, policy)
}

async fn onramp(client: &reqwest::Client, gw: &Gateway) -> (u16, String) {
    get(client, gw, ONRAMP).await
}

async fn wait_readyz(gw: &Gateway, want: u16) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = gw.admin_get("/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} (wanted {want}) for {DEADLINE:?}: {body}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn limiter_errors(gw: &Gateway) -> f64 {
    let (_, text) = gw.admin_get("/metrics").await;
    metric(&text, ERRORS_METRIC, &[]).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

struct TlsRedis {
    pki: TestPki,
    ca_file: std::path::PathBuf,
    server: RedisServer,
}

fn tls_redis() -> TlsRedis {
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let ca_file = pki.write_ca_pem();
    let server = RedisServer::start_tls(&pki.cert_path, &pki.key_path, &ca_file);
    TlsRedis {
        pki,
        ca_file,
        server,
    }
}

/// Two replicas on a TLS-only Redis (no plain port at all) with the test CA added through
/// `redis_ca_file`: one per-IP budget across both, counted in that Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_ca_file_shares_the_limit_across_replicas() {
    let fx = fixture().await;
    let redis = tls_redis();
    assert!(redis.server.url().starts_with("rediss://"));
    let rl = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nredis_ca_file = {:?}\n\
         requests_per_minute = 60\nburst = 2\non_backend_error = \"deny\"",
        redis.server.url(),
        redis.ca_file.display().to_string()
    );
    let a = fx.gateway(&rl).start().await;
    let b = fx.gateway(&rl).start().await;
    wait_readyz(&a, 200).await;
    wait_readyz(&b, 200).await;

    let mut verified = None;
    for attempt in 0..TIMING_ATTEMPTS {
        let ip = v4(127, 0, 0, 20 + attempt);
        let clients = [client_from(&a, ip), client_from(&b, ip)];
        let gws = [&a, &b];
        let started = Instant::now();
        let mut statuses = Vec::new();
        for i in 0..4 {
            statuses.push(onramp(&clients[i % 2], gws[i % 2]).await.0);
        }
        if started.elapsed() >= WINDOW {
            eprintln!("attempt {attempt}: too slow for the window, retrying");
            continue;
        }
        assert_eq!(statuses, [302, 302, 429, 429], "A,B,A,B from {ip}");
        verified = Some(ip);
        break;
    }
    let ip = verified.expect("no attempt fitted the 1 s window; machine too loaded");
    // The bucket lives in the TLS Redis.
    let mut con = redis
        .server
        .client()
        .get_connection()
        .expect("TLS connection from the test");
    let tat: Option<String> = redis::cmd("GET")
        .arg(format!("onramp-gateway:rl:ip:{ip}"))
        .query(&mut con)
        .unwrap();
    assert!(tat.is_some(), "no bucket for {ip} in the TLS Redis");
    assert_eq!(limiter_errors(&a).await + limiter_errors(&b).await, 0.0);
    drop(redis.pki);
}

/// Without the CA the server's certificate is not trusted (system roots only): the gateway
/// still starts (Redis is connected lazily, as for a Redis that is down), `/readyz` is not
/// ready naming Redis, and `on_backend_error = "deny"` answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_without_the_ca_is_not_ready_and_applies_the_policy() {
    let fx = fixture().await;
    let redis = tls_redis();
    let rl = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\n{NO_LIMIT}\non_backend_error = \"deny\"",
        redis.server.url()
    );
    let gw = fx.gateway(&rl).start().await;
    let body = wait_readyz(&gw, 503).await;
    assert!(body.to_lowercase().contains("redis"), "{body}");
    let client = client_from(&gw, v4(127, 0, 0, 2));
    assert_eq!(onramp(&client, &gw).await.0, 503);
    assert!(limiter_errors(&gw).await >= 1.0);
    assert_eq!(
        fx.cdp.count(),
        0,
        "a request reached CDP without a limiter verdict"
    );
    // Nothing was counted in Redis: the handshake never completed.
    let mut con = redis.server.client().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// `check` refuses an unreadable `redis_ca_file` by its key (the run would not start) and
/// accepts the readable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_an_unreadable_redis_ca_file() {
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let ca_file = pki.write_ca_pem();
    let missing = pki.dir.path().join("no-such-ca.pem");
    let config = |ca: &std::path::Path| {
        format!(
            "backend = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380/0\"\nredis_ca_file = {:?}",
            ca.display().to_string()
        )
    };
    let out = GatewayBuilder::new("http://127.0.0.1:3000")
        .section("rate_limit", &config(&missing))
        .check();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "check accepted a missing CA: {text}");
    assert!(text.contains("rate_limit.redis_ca_file"), "{text}");
    assert!(text.contains("no-such-ca.pem"), "{text}");
    let out = GatewayBuilder::new("http://127.0.0.1:3000")
        .section("rate_limit", &config(&ca_file))
        .check();
    assert!(
        out.status.success(),
        "check refused a readable CA: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

fn cluster_rate_limit(cluster: &RedisCluster, rest: &str) -> String {
    format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nredis_cluster = true\n\
         on_backend_error = \"deny\"\n{rest}",
        cluster.seed_url()
    )
}

/// Per-IP, per-prefix and global buckets on a cluster whose keys sit on different nodes
/// (one script call per bucket): each layer refuses when it should, and names itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_enforces_ip_prefix_and_global_buckets_across_slots() {
    let fx = fixture().await;
    let cluster = RedisCluster::start();
    let layered = cluster_rate_limit(
        &cluster,
        "requests_per_minute = 60\nburst = 2\naggregate_ipv4_prefix = 24\n\
         aggregate_requests_per_minute = 60\naggregate_burst = 3",
    );
    let gw = fx.gateway(&layered).start().await;
    wait_readyz(&gw, 200).await;

    // /24s whose ip and prefix buckets live on different nodes, so one script call over
    // both keys would be a CROSSSLOT error.
    let subnets: Vec<u8> = (10..=250u8)
        .filter(|s| {
            cluster.node_for(&format!("onramp-gateway:rl:ip:127.0.{s}.2"))
                != cluster.node_for(&format!("onramp-gateway:rl:prefix:127.0.{s}.0"))
        })
        .take(usize::from(TIMING_ATTEMPTS))
        .collect();
    assert_eq!(subnets.len(), usize::from(TIMING_ATTEMPTS));
    let mut verified = None;
    for s in subnets {
        let first = client_from(&gw, v4(127, 0, s, 2));
        let second = client_from(&gw, v4(127, 0, s, 3));
        let started = Instant::now();
        let seq = [
            onramp(&first, &gw).await,
            onramp(&first, &gw).await,
            onramp(&first, &gw).await, // ip bucket (burst 2) refuses; prefix not charged
            onramp(&second, &gw).await, // third of the /24's 3
            onramp(&second, &gw).await, // prefix bucket refuses
        ];
        if started.elapsed() >= WINDOW {
            eprintln!("127.0.{s}.0/24: too slow for the window, retrying");
            continue;
        }
        let statuses: Vec<u16> = seq.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, [302, 302, 429, 302, 429], "{seq:?}");
        assert!(seq[2].1.starts_with("\"ip\""), "{seq:?}");
        assert!(seq[4].1.starts_with("\"prefix\""), "{seq:?}");
        verified = Some(s);
        break;
    }
    let s = verified.expect("no attempt fitted the 1 s window; machine too loaded");
    assert!(cluster
        .get(&format!("onramp-gateway:rl:ip:127.0.{s}.2"))
        .is_some());
    assert!(cluster
        .get(&format!("onramp-gateway:rl:prefix:127.0.{s}.0"))
        .is_some());

    // The global bucket, through a second replica with its own key prefix.
    let global = cluster_rate_limit(
        &cluster,
        &format!("{NO_LIMIT}\nglobal_mints_per_second = 1\nredis_key_prefix = \"gw2:\""),
    );
    let a = fx.gateway(&global).start().await;
    let b = fx.gateway(&global).start().await;
    wait_readyz(&a, 200).await;
    wait_readyz(&b, 200).await;
    let mut ok = 0;
    let mut limited = Vec::new();
    for i in 0..6u8 {
        let rig = if i % 2 == 0 { &a } else { &b };
        // A different client each time: only the global bucket is shared.
        let (status, policy) = onramp(&client_from(rig, v4(127, 1, 0, 2 + i)), rig).await;
        match status {
            302 => ok += 1,
            429 => limited.push(policy),
            other => panic!("unexpected {other}"),
        }
    }
    // Burst 1; the next second's token may arrive mid-loop.
    assert!((1..=2).contains(&ok), "{ok} passed");
    assert!(
        limited.iter().all(|p| p == "\"global\";q=1;w=1"),
        "{limited:?}"
    );
    assert!(cluster.get("gw2:global:0.0.0.0").is_some());
    for g in [&gw, &a, &b] {
        assert_eq!(limiter_errors(g).await, 0.0, "{}", g.logs());
    }
}

fn ticket(jti: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "addresses": [{"address": "0x3333333333333333333333333333333333333333", "blockchains": ["base"]}],
        "partnerUserRef": "user-42",
        "flow": "onramp",
        "iat": now,
        "exp": now + 120,
        "jti": jti,
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(TICKET_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A ticket used on one replica is refused on the other: the replay guard's key lives in
/// the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_a_ticket_replay_across_replicas() {
    let fx = fixture().await;
    let cluster = RedisCluster::start();
    let rl = cluster_rate_limit(&cluster, NO_LIMIT);
    let start = || {
        fx.gateway(&rl)
            .section("addresses", "source = \"ticket\"")
            .env("ONRAMP_TICKET_SECRET", TICKET_SECRET)
            .start()
    };
    let a = start().await;
    let b = start().await;
    wait_readyz(&a, 200).await;
    let path = format!("{ONRAMP}&ticket={}", ticket("cluster-jti"));
    let ip = v4(127, 0, 0, 2);
    assert_eq!(get(&client_from(&a, ip), &a, &path).await.0, 302);
    assert_eq!(get(&client_from(&b, ip), &b, &path).await.0, 409);
    assert_eq!(get(&client_from(&a, ip), &a, &path).await.0, 409);
    assert_eq!(fx.cdp.count(), 1);
    assert!(cluster.get("onramp-gateway:rl:jti:cluster-jti").is_some());
}

/// Under load, one primary is SIGKILLed: requests whose bucket is on it get the policy
/// (`deny` → 503) while the others' keep being served; the node comes back (same slots,
/// empty script cache) and its keys recover without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_mid_load_holds_the_policy_and_recovers() {
    let fx = fixture().await;
    let mut cluster = RedisCluster::start();
    let gw = fx
        .gateway(&cluster_rate_limit(&cluster, NO_LIMIT))
        .start()
        .await;
    wait_readyz(&gw, 200).await;
    // The victim is node 1 (not the seed): a client whose bucket is on it, and one whose
    // bucket is on another node.
    let victim = 1;
    let key = |d: u8| format!("onramp-gateway:rl:ip:127.0.0.{d}");
    let on_victim = (2..=250u8)
        .find(|d| cluster.node_for(&key(*d)) == victim)
        .expect("an IP on the victim");
    let elsewhere = (2..=250u8)
        .find(|d| cluster.node_for(&key(*d)) != victim)
        .expect("an IP elsewhere");
    let hit = client_from(&gw, v4(127, 0, 0, on_victim));
    let spared = client_from(&gw, v4(127, 0, 0, elsewhere));
    assert_eq!(onramp(&hit, &gw).await.0, 302);
    assert_eq!(onramp(&spared, &gw).await.0, 302);

    // Load from the spared client for the whole outage.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(bool, u16)>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, seen, killed) = (stop.clone(), seen.clone(), killed.clone());
        let url = gw.url(ONRAMP);
        let client = spared.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let status = match client.get(&url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                seen.lock()
                    .unwrap()
                    .push((killed.load(Ordering::Relaxed), status));
            }
        })
    };
    // Some load before the kill.
    let deadline = Instant::now() + DEADLINE;
    while seen.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "no load got through");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.store(true, Ordering::Relaxed);
    cluster.kill(victim);

    // The victim's keys: denied, every time, within the per-call bound.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(onramp(&hit, &gw).await.0, 503, "bucket on the dead node");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a dead node stalled the request for {:?}",
            started.elapsed()
        );
    }
    // The others' keys: served (the load's own requests after the kill included).
    for _ in 0..5 {
        assert_eq!(onramp(&spared, &gw).await.0, 302, "bucket on a live node");
    }
    let deadline = Instant::now() + DEADLINE;
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|&(after, s)| after && s == 302)
    {
        assert!(
            Instant::now() < deadline,
            "the load got no 302 after the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One node down is a partial outage: the replica stays in the balancer.
    wait_readyz(&gw, 200).await;
    assert!(limiter_errors(&gw).await >= 5.0);

    cluster.restart(victim);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, _) = onramp(&hit, &gw).await;
        if status == 302 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            Instant::now() < deadline,
            "the restarted node's keys did not recover within {DEADLINE:?}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counted on the restarted node again: it came back with an empty script cache, and
    // the gateway's NOSCRIPT fallback (EVAL where the key is) loaded the script there.
    assert_eq!(cluster.cached_scripts(victim), 1);
    assert_eq!(onramp(&spared, &gw).await.0, 302);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|&(_, s)| s == 302),
        "the spared client's load saw {:?}",
        seen.iter().filter(|&&(_, s)| s != 302).collect::<Vec<_>>()
    );
}

/// The gateway starts while the whole cluster is down (the cluster connection is made on
/// first use): not ready, `deny` → 503; once the nodes are back it becomes ready and counts
/// in the cluster, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_down_at_start_then_up_without_a_restart() {
    let fx = fixture().await;
    let mut cluster = RedisCluster::start();
    for i in 0..cluster.nodes.len() {
        cluster.kill(i);
    }
    let gw = fx
        .gateway(&cluster_rate_limit(&cluster, NO_LIMIT))
        .start()
        .await;
    let body = wait_readyz(&gw, 503).await;
    assert!(body.to_lowercase().contains("redis"), "{body}");
    let client = client_from(&gw, v4(127, 0, 0, 2));
    assert_eq!(onramp(&client, &gw).await.0, 503);
    assert_eq!(fx.cdp.count(), 0);
    cluster.restart_all();
    wait_readyz(&gw, 200).await;
    assert_eq!(onramp(&client, &gw).await.0, 302);
    assert_eq!(fx.cdp.count(), 1);
    let node = cluster.node_for("onramp-gateway:rl:ip:127.0.0.2");
    assert_eq!(cluster.cached_scripts(node), 1);
}

/// Cluster over TLS (as ElastiCache with cluster mode and in-transit encryption): the seed
/// is `rediss://`, the nodes announce TLS ports, and every node's certificate verifies
/// against the added CA; buckets on two different nodes are both counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_counts_on_every_node() {
    let fx = fixture().await;
    let pki = TestPki::new(KeyFormat::Pkcs8Ecdsa);
    let ca_file = pki.write_ca_pem();
    let cluster = RedisCluster::start_tls(&pki.cert_path, &pki.key_path, &ca_file);
    assert!(cluster.seed_url().starts_with("rediss://"));
    let rl = cluster_rate_limit(
        &cluster,
        &format!(
            "{NO_LIMIT}\nredis_ca_file = {:?}",
            ca_file.display().to_string()
        ),
    );
    let gw = fx.gateway(&rl).start().await;
    wait_readyz(&gw, 200).await;
    let key = |d: u8| format!("onramp-gateway:rl:ip:127.0.0.{d}");
    let first = (2..=250u8)
        .find(|d| cluster.node_for(&key(*d)) == 0)
        .unwrap();
    let other = (2..=250u8)
        .find(|d| cluster.node_for(&key(*d)) == 2)
        .unwrap();
    for d in [first, other] {
        assert_eq!(
            onramp(&client_from(&gw, v4(127, 0, 0, d)), &gw).await.0,
            302
        );
    }
    assert_eq!(cluster.cached_scripts(0), 1);
    assert_eq!(cluster.cached_scripts(2), 1);
    assert_eq!(limiter_errors(&gw).await, 0.0);
}
