//! Soak: mixed proxy + mint + WebSocket load against the local fakes for `SOAK_MINUTES`,
//! reporting requests, errors by status, and the gateway's RSS and open fds (from
//! /proc/PID) at the start, every minute, at the end, and once the clients are gone.
//!
//! Not part of the default run (`#[ignore]`, and it needs `SOAK_MINUTES`): run it with
//! `scripts/soak MINUTES`. Loopback only; concurrency is fixed (closed-loop workers), so
//! the load is bounded whatever the machine.
//!
//! It fails if any request fails, or if fds or RSS once the clients are gone exceed those
//! after the first minute (the start, for shorter soaks) by more than noise ([`FD_SLACK`],
//! [`RSS_SLACK_KIB`]): growth over minutes is a leak.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::certs::Alpn;
use crate::common::fake_cdp::{FakeCdp, TestKey};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::{sha256_hex, Upstream};

const PROXY_WORKERS: usize = 6;
const MINT_WORKERS: usize = 2;
const WS_WORKERS: usize = 2;
/// Open fds may differ by this much between "start" and "after" (pooled connections
/// the gateway keeps to the app and to CDP come and go).
const FD_SLACK: usize = 16;
/// RSS may grow by this much: allocator caches and pools warming up, not a leak.
const RSS_SLACK_KIB: u64 = 32 * 1024;
const ADDR: &str = "0x1111111111111111111111111111111111111111";

/// Outcomes by kind: `"200"`, `"302"`, `"ws ok"`, or an error label.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, kind: impl Into<String>) {
        *self.0.lock().unwrap().entry(kind.into()).or_default() += 1;
    }
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }
}

/// Kinds that count as success.
fn is_ok(kind: &str) -> bool {
    matches!(kind, "proxy 200" | "hash 200" | "mint 302" | "ws ok")
}

struct Proc {
    rss_kib: u64,
    fds: usize,
}

fn proc_stats(pid: u32) -> Proc {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc fd")
        .count();
    Proc { rss_kib, fds }
}

fn report(label: &str, gw: &Gateway, tally: &Tally, started: Instant) {
    let p = proc_stats(gw.pid);
    let counts = tally.snapshot();
    let total: u64 = counts.values().sum();
    let errors: BTreeMap<_, _> = counts.iter().filter(|(k, _)| !is_ok(k)).collect();
    // Raw stderr: libtest captures eprintln!, and a soak's report must be seen.
    let line = format!(
        "soak {label:>6} t={:>4}s requests={total} by_kind={counts:?} errors={errors:?} rss_kib={} fds={}\n",
        started.elapsed().as_secs(),
        p.rss_kib,
        p.fds
    );
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

async fn proxy_worker(gw: Arc<Gateway>, tally: Arc<Tally>, stop: Arc<AtomicBool>, i: usize) {
    // Half HTTP/2, half HTTP/1.1 keep-alive, as browsers and API clients mix.
    let alpn = if i % 2 == 0 { Alpn::H2 } else { Alpn::Http11 };
    let client = gw.https_client(alpn);
    let body = vec![b'x'; 16 * 1024];
    let want_sha = sha256_hex(&body);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if n % 4 == 0 {
            match client.post(gw.url("/hash")).body(body.clone()).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match r.json::<serde_json::Value>().await {
                        Ok(v) if status == 200 && v["sha256"] == want_sha.as_str() => {
                            tally.add("hash 200")
                        }
                        Ok(_) => tally.add(format!("hash {status} or wrong digest")),
                        Err(e) => tally.add(format!("hash body error {}", kind(&e))),
                    }
                }
                Err(e) => tally.add(format!("hash {}", kind(&e))),
            }
        } else {
            match client.get(gw.url("/echo/soak?n=1")).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    match r.bytes().await {
                        Ok(_) => tally.add(format!("proxy {status}")),
                        Err(e) => tally.add(format!("proxy body error {}", kind(&e))),
                    }
                }
                Err(e) => tally.add(format!("proxy {}", kind(&e))),
            }
        }
    }
}

async fn mint_worker(gw: Arc<Gateway>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let client = gw.https_client(Alpn::H2AndHttp11);
    let url = gw.url(&format!("/onramp?address={ADDR}&blockchains=base"));
    while !stop.load(Ordering::Relaxed) {
        match client.get(&url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let has_token = r
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .is_some_and(|l| l.contains("sessionToken=fake-session-token-"));
                let _ = r.bytes().await;
                if status == 302 && !has_token {
                    tally.add("mint 302 without token");
                } else {
                    tally.add(format!("mint {status}"));
                }
            }
            Err(e) => tally.add(format!("mint {}", kind(&e))),
        }
    }
}

/// Opens a tunnel, echoes 20 messages through it, closes it; again until stopped.
async fn ws_worker(gw: Arc<Gateway>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let tls = gw.tls_connect(Alpn::Http11).await;
            let url = format!("wss://localhost:{}/ws", gw.https_addr.port());
            let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
                .await
                .map_err(|e| format!("handshake {e}"))?;
            for i in 0..20 {
                let msg = format!("soak message {i}");
                ws.send(Message::text(msg.clone()))
                    .await
                    .map_err(|e| format!("send {e}"))?;
                match ws.next().await {
                    Some(Ok(m)) if m.to_text().ok() == Some(msg.as_str()) => {}
                    other => return Err(format!("echo {other:?}")),
                }
            }
            ws.close(None).await.map_err(|e| format!("close {e}"))?;
            Ok::<(), String>(())
        })
        .await;
        match outcome {
            Ok(Ok(())) => tally.add("ws ok"),
            Ok(Err(e)) => tally.add(format!("ws {}", e.chars().take(60).collect::<String>())),
            Err(_) => tally.add("ws timeout"),
        }
    }
}

/// A short error label (errors by kind, not one entry per message).
fn kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "transport error"
    }
}

/// Polls the gateway's own connection gauge until it reads 0 (the signal that the
/// clients' connections are gone), bounded.
async fn wait_idle(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = gw.admin_get("/metrics").await;
        let active = metrics
            .lines()
            .filter(|l| l.starts_with("onramp_gateway_connections_active"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        if active == 0.0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with scripts/soak MINUTES"]
async fn soak() {
    let Some(minutes) = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse::<f64>().ok())
    else {
        use std::io::Write as _;
        let _ = std::io::stderr()
            .lock()
            .write_all(b"soak SKIPPED: set SOAK_MINUTES (scripts/soak MINUTES does)\n");
        return;
    };
    let duration = Duration::from_secs_f64(minutes * 60.0);

    let key = TestKey::es256_sec1();
    let fake = FakeCdp::start(&key);
    let up = Upstream::start().await;
    let mut b = GatewayBuilder::new(&up.url())
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section(
            "rate_limit",
            "requests_per_minute = 6000000\nburst = 100000",
        )
        // Access logs of millions of requests would measure the log pipe, not the gateway.
        .section("log", "level = \"info,access=off\"");
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = Arc::new(b.start().await);
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let start = proc_stats(gw.pid);
    report("start", &gw, &tally, started);

    let mut tasks = Vec::new();
    for i in 0..PROXY_WORKERS {
        tasks.push(tokio::spawn(proxy_worker(
            gw.clone(),
            tally.clone(),
            stop.clone(),
            i,
        )));
    }
    for _ in 0..MINT_WORKERS {
        tasks.push(tokio::spawn(mint_worker(
            gw.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..WS_WORKERS {
        tasks.push(tokio::spawn(ws_worker(
            gw.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }

    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    ticker.tick().await;
    let end = tokio::time::sleep(duration);
    tokio::pin!(end);
    // Leaks are judged against the state after the first minute of load (pools and
    // allocator caches warmed up), or against the start for a shorter soak.
    let mut baseline = None;
    loop {
        tokio::select! {
            _ = &mut end => break,
            _ = ticker.tick() => {
                report("minute", &gw, &tally, started);
                baseline.get_or_insert_with(|| proc_stats(gw.pid));
            }
        }
    }
    let baseline = baseline.unwrap_or(start);
    report("end", &gw, &tally, started);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("worker panicked");
    }
    wait_idle(&gw).await;
    report("after", &gw, &tally, started);
    let after = proc_stats(gw.pid);

    let counts = tally.snapshot();
    let errors: BTreeMap<_, _> = counts.iter().filter(|(k, _)| !is_ok(k)).collect();
    assert!(errors.is_empty(), "soak errors: {errors:?}\n{}", gw.logs());
    assert!(
        after.fds <= baseline.fds + FD_SLACK,
        "open fds {} -> {} over the soak",
        baseline.fds,
        after.fds
    );
    assert!(
        after.rss_kib <= baseline.rss_kib + RSS_SLACK_KIB,
        "RSS {} KiB -> {} KiB over the soak",
        baseline.rss_kib,
        after.rss_kib
    );
    assert_eq!(fake.failures(), Vec::<String>::new(), "CDP verification");
}
