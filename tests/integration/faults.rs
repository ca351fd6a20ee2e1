//! Fault tests: the app and the CDP API misbehave in the ways real ones do, and each fault
//! maps to the status README/SPEC document ("Upstream refused: 502; no response headers
//! within response_timeout_ms: 504"; "CDP unreachable, 5xx or unusable answer: 502; CDP
//! timeout: 504"), while the same process keeps serving: after every fault a normal proxied
//! request and a normal mint must work.
//!
//! The faulty app is a raw TCP server here ([`RawApp`]): hyper would refuse to write
//! garbage, half a head or a short body, which is exactly what these tests need.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::certs::Alpn;
use crate::common::fake_cdp::{FakeCdp, Mode, TestKey};
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::Upstream;

const ADDR: &str = "0x1111111111111111111111111111111111111111";
/// The app's time to answer headers in these tests; "never answers" becomes 504 after it.
const RESPONSE_TIMEOUT_MS: u64 = 500;
/// CDP deadline in these tests; "never finishes" becomes 504 after it.
const CDP_TIMEOUT_MS: u64 = 1000;
/// Any single faulty exchange must be over well before this (timeouts above plus slack
/// for a loaded 2-core machine); a hang is a failure, not a slow pass.
const FAULT_DEADLINE: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------------------
// A raw-socket app

/// Serves HTTP/1.1 by hand on 127.0.0.1; the request path picks the misbehaviour:
/// - `/garbage`: answers bytes that are not HTTP, then closes;
/// - `/close`: reads the request, closes without a byte;
/// - `/never`: reads the request and holds the connection, answering nothing;
/// - `/partial-head`: half a status line's headers, then holds the connection;
/// - `/endless-head`: a head that never ends (2 MiB of header lines), then holds;
/// - `/short-body`: `Content-Length: 1000`, 10 bytes, then closes;
/// - anything else: `200 ok`, keep-alive.
struct RawApp {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawApp {
    async fn start() -> RawApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw app");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        RawApp { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head; `None` at EOF. Bodies are not expected (GETs only).
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Holds the connection until the gateway gives up on it (its read sees EOF), so "never
/// answers" needs no timer of its own.
async fn hold(mut stream: TcpStream) {
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn serve(mut stream: TcpStream) {
    while let Some(head) = read_head(&mut stream).await {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let w = &mut stream;
        match path.as_str() {
            "/garbage" => {
                let _ = w
                    .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage\r\n\r\n")
                    .await;
                return;
            }
            "/close" => return,
            "/never" => return hold(stream).await,
            "/partial-head" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Ty").await;
                return hold(stream).await;
            }
            "/endless-head" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\n").await;
                let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
                for _ in 0..2048 {
                    if w.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
                return hold(stream).await;
            }
            "/short-body" => {
                let _ = w
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                    .await;
                return;
            }
            _ => {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: raw\r\n\r\nok";
                if w.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn raw_app_gateway() -> (RawApp, Gateway) {
    let app = RawApp::start().await;
    let gw = GatewayBuilder::new(&app.url())
        .section(
            "upstream",
            &format!("response_timeout_ms = {RESPONSE_TIMEOUT_MS}"),
        )
        .start()
        .await;
    (app, gw)
}

/// The process still serves: a normal proxied request on a fresh connection, both HTTP
/// versions, and the admin listener.
async fn assert_still_serving(gw: &Gateway, after: &str) {
    for alpn in [Alpn::Http11, Alpn::H2] {
        let resp = gw
            .https_client(alpn)
            .get(gw.url("/ok"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("after {after}: {e}\n{}", gw.logs()));
        assert_eq!(resp.status(), StatusCode::OK, "after {after}");
        assert_eq!(resp.text().await.unwrap(), "ok", "after {after}");
    }
    assert_eq!(gw.admin_get("/healthz").await.0, 200, "after {after}");
}

/// `GET path` must be answered `want` by the gateway itself, within [`FAULT_DEADLINE`].
async fn assert_fault_status(gw: &Gateway, alpn: Alpn, path: &str, want: StatusCode) {
    let started = Instant::now();
    let resp = tokio::time::timeout(
        FAULT_DEADLINE,
        gw.https_client(alpn).get(gw.url(path)).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("{path}: no answer within {FAULT_DEADLINE:?}"))
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(resp.status(), want, "{path} ({alpn:?})\n{}", gw.logs());
    // The gateway's own answer, not something relayed from the app.
    assert!(resp.headers().get("x-upstream").is_none(), "{path}");
    if want == StatusCode::GATEWAY_TIMEOUT {
        assert!(
            started.elapsed() >= Duration::from_millis(RESPONSE_TIMEOUT_MS),
            "{path}: 504 before the response timeout"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The app misbehaves

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_garbage_or_close_before_headers_is_502_and_serving_continues() {
    let (_app, gw) = raw_app_gateway().await;
    assert_still_serving(&gw, "start").await;
    for path in ["/garbage", "/close", "/endless-head"] {
        for alpn in [Alpn::Http11, Alpn::H2] {
            assert_fault_status(&gw, alpn, path, StatusCode::BAD_GATEWAY).await;
            assert_still_serving(&gw, path).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_never_answers_is_504_and_serving_continues() {
    let (_app, gw) = raw_app_gateway().await;
    for path in ["/never", "/partial-head"] {
        for alpn in [Alpn::Http11, Alpn::H2] {
            assert_fault_status(&gw, alpn, path, StatusCode::GATEWAY_TIMEOUT).await;
            assert_still_serving(&gw, path).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_closing_mid_body_is_a_body_error_never_a_clean_end() {
    let (_app, gw) = raw_app_gateway().await;
    for alpn in [Alpn::Http11, Alpn::H2] {
        let outcome = tokio::time::timeout(FAULT_DEADLINE, async {
            let resp = gw
                .https_client(alpn)
                .get(gw.url("/short-body"))
                .send()
                .await?;
            // The status was already on its way when the app hung up.
            assert_eq!(resp.status(), StatusCode::OK);
            resp.bytes().await
        })
        .await
        .expect("the exchange ends within the deadline");
        // What must not happen is a body that looks complete (10 bytes and a clean end, or
        // padding to 1000). Over HTTP/2 the stream reset may even overtake the head, so the
        // error can surface at either step.
        assert!(
            outcome.is_err(),
            "{alpn:?}: truncated body ended cleanly: {outcome:?}"
        );
        assert_still_serving(&gw, "/short-body").await;
    }
}

// ---------------------------------------------------------------------------------------
// The CDP API misbehaves

struct MintRig {
    fake: FakeCdp,
    _up: Upstream,
    gw: Gateway,
    client: reqwest::Client,
}

impl MintRig {
    async fn start() -> MintRig {
        let key = TestKey::es256_sec1();
        let fake = FakeCdp::start(&key);
        let up = Upstream::start().await;
        let mut b = GatewayBuilder::new(&up.url())
            .section(
                "cdp",
                &format!(
                    "api_base = \"{}\"\ntimeout_ms = {CDP_TIMEOUT_MS}",
                    fake.api_base()
                ),
            )
            .section("rate_limit", "requests_per_minute = 60000\nburst = 1000");
        for (k, v) in key.env() {
            b = b.env(&k, &v);
        }
        let gw = b.start().await;
        let client = gw.https_client(Alpn::H2AndHttp11);
        MintRig {
            fake,
            _up: up,
            gw,
            client,
        }
    }

    async fn mint(&self) -> reqwest::Response {
        let q = format!("/onramp?address={ADDR}&blockchains=base");
        tokio::time::timeout(
            FAULT_DEADLINE,
            self.client
                .get(self.gw.url(&q))
                .header("accept", "application/json")
                .send(),
        )
        .await
        .expect("mint answered within the deadline")
        .expect("mint request")
    }

    /// With `mode` set, a mint answers `want` (no Location); then, back to normal, a mint
    /// works and proxying works: the fault left nothing behind.
    async fn fault_then_recover(&self, mode: Mode, want: StatusCode) {
        self.fake.set_mode(mode.clone());
        let started = Instant::now();
        let resp = self.mint().await;
        assert_eq!(resp.status(), want, "{mode:?}\n{}", self.gw.logs());
        assert!(resp.headers().get("location").is_none(), "{mode:?}");
        if want == StatusCode::GATEWAY_TIMEOUT {
            assert!(
                started.elapsed() >= Duration::from_millis(CDP_TIMEOUT_MS),
                "{mode:?}: 504 before cdp.timeout_ms"
            );
        }
        self.fake.set_mode(Mode::Ok);
        let resp = self.mint().await;
        assert_eq!(resp.status(), StatusCode::FOUND, "after {mode:?}");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let token = self.fake.tokens().last().cloned().expect("a token");
        assert!(location.contains(&token), "after {mode:?}: {location}");
        let echo = self.client.get(self.gw.url("/echo")).send().await.unwrap();
        assert_eq!(echo.status(), StatusCode::OK, "proxy after {mode:?}");
    }
}

/// VmRSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_10mb_answers_are_502_without_buffering_them() {
    let rig = MintRig::start().await;
    assert_eq!(rig.mint().await.status(), StatusCode::FOUND);
    let before = rss_kib(rig.gw.pid);
    // Chunked and with a declared length (the early refusal path); several times, so
    // buffering even one of them would show as tens of MiB.
    for _ in 0..3 {
        rig.fault_then_recover(Mode::Huge, StatusCode::BAD_GATEWAY)
            .await;
        rig.fault_then_recover(Mode::HugeWithLength, StatusCode::BAD_GATEWAY)
            .await;
    }
    let after = rss_kib(rig.gw.pid);
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB over six 10 MB answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_invalid_json_or_no_token_is_502() {
    let rig = MintRig::start().await;
    let bodies = [
        // invalid JSON with a JSON content type (Mode::Garbage is text/html)
        r#"{"token":"abc"#,
        r#"{"token":"abc",}"#,
        // valid JSON, but no usable token
        r#"{"channel_id":""}"#,
        r#"{"token":null}"#,
        r#"{"token":42}"#,
        r#"{"token":""}"#,
        r#"{"token":"has space"}"#,
        r#"["fake-session-token"]"#,
        "",
    ];
    for body in bodies {
        rig.fault_then_recover(
            Mode::Custom {
                status: 200,
                body: body.into(),
            },
            StatusCode::BAD_GATEWAY,
        )
        .await;
    }
    rig.fault_then_recover(Mode::NoToken, StatusCode::BAD_GATEWAY)
        .await;
    rig.fake.assert_all_verified();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_answer_that_never_finishes_is_504() {
    let rig = MintRig::start().await;
    // Headers and half a body, then nothing: the deadline covers the body, not only the head.
    rig.fault_then_recover(Mode::Stall, StatusCode::GATEWAY_TIMEOUT)
        .await;
    // And no answer at all.
    rig.fault_then_recover(
        Mode::Slow(Duration::from_secs(30)),
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await;
    rig.fake.assert_all_verified();
}
