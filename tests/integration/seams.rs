//! Issue 10, "close the proxy's seams": one regression test per defect, each driving the
//! real binary over real TLS (raw sockets where a client library would hide the bytes).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::certs::Alpn;
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::metric;
use crate::common::upstream::Upstream;

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn connections_active(gw: &Gateway) -> f64 {
    let (_, m) = gw.admin_get("/metrics").await;
    metric(&m, "onramp_gateway_connections_active", &[]).unwrap_or(-1.0)
}

/// Polls `/metrics` until `connections_active` is `want` (the gateway notices a close
/// asynchronously; the gauge is the signal). Panics after 5 s.
async fn wait_active(gw: &Gateway, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = connections_active(gw).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections_active stayed {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_ws(gw: &Gateway) -> Wss {
    let tls = gw.tls_connect(Alpn::Http11).await;
    let url = format!("wss://localhost:{}/ws", gw.https_addr.port());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    // A round trip proves the tunnel (not only the 101) is up.
    ws.send(Message::text("up?")).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .expect("open")
        .expect("ok");
    assert_eq!(m.to_text().unwrap(), "up?");
    ws
}

/// True when the TLS handshake to the gateway completes within `within`.
async fn tls_handshake_completes(gw: &Gateway, within: Duration) -> bool {
    let cfg = gw.client_config(Alpn::Http11);
    matches!(
        tokio::time::timeout(
            within,
            crate::common::gateway::tls_connect(gw.https_addr, cfg)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Item 1: a WebSocket tunnel keeps its `max_connections` slot and stays in
/// `connections_active` until it closes (before: six tunnels with a limit of three, gauge 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_keep_their_connection_slot() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "max_connections = 3")
        .start()
        .await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(open_ws(&gw).await);
    }
    // The HTTP connections behind the tunnels are finished; the tunnels still count.
    wait_active(&gw, 3.0).await;
    // A fourth client is not served while the three tunnels hold every slot.
    let cfg = gw.client_config(Alpn::Http11);
    let addr = gw.https_addr;
    let fourth = tokio::spawn(crate::common::gateway::tls_connect(addr, cfg));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !fourth.is_finished(),
        "a fourth connection was served while three tunnels were open"
    );
    // Closing one tunnel frees its slot: the waiting client gets through.
    let mut ws = tunnels.pop().unwrap();
    ws.close(None).await.unwrap();
    drop(ws);
    let got = tokio::time::timeout(Duration::from_secs(5), fourth)
        .await
        .expect("the waiting client was not served after a tunnel closed")
        .unwrap();
    assert!(got.is_ok(), "{got:?}");
    wait_active(&gw, 3.0).await;
}

/// Item 2: `max_connections_per_ip` is counted at accept (before TLS) and tunnels count;
/// over it the new connection is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_cap_closes_the_extra_connection_at_once() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "max_connections_per_ip = 2")
        .start()
        .await;
    let _tunnel = open_ws(&gw).await;
    let plain = gw.tls_connect(Alpn::Http11).await;
    wait_active(&gw, 2.0).await;

    // The third connection from 127.0.0.1 is closed before any TLS byte is answered.
    let mut raw = TcpStream::connect(gw.https_addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut buf))
        .await
        .expect("an over-the-cap connection must be closed at once, not left open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!tls_handshake_completes(&gw, Duration::from_secs(3)).await);

    let (_, m) = gw.admin_get("/metrics").await;
    assert!(
        metric(
            &m,
            "onramp_gateway_connections_refused_total",
            &[("reason", "per_ip")]
        )
        .is_some_and(|n| n >= 2.0),
        "{m}"
    );
    // A freed slot is usable again.
    drop(plain);
    wait_active(&gw, 1.0).await;
    assert!(tls_handshake_completes(&gw, Duration::from_secs(5)).await);
}

/// Item 3: the admin listener has its own `max_connections` and `idle_timeout_ms`, so idle
/// connections cannot starve the probes (before: 64 fixed slots and the 60 s client idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_idle_connections_are_cut_and_cannot_starve_probes() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("admin", "max_connections = 2\nidle_timeout_ms = 300")
        .start()
        .await;
    // Two idle keep-alives (one after a request, one that never spoke) take both slots.
    let mut spoke = TcpStream::connect(gw.admin_addr()).await.unwrap();
    spoke
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = spoke.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut silent = TcpStream::connect(gw.admin_addr()).await.unwrap();

    // The probe still gets its answer, because the idle ones are closed after 300 ms.
    let started = Instant::now();
    let (status, _) = gw.admin_get("/healthz").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(3));
    for (what, s) in [("keep-alive", &mut spoke), ("silent", &mut silent)] {
        let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} admin connection still open after 3 s"));
        assert!(matches!(r, Ok(0) | Err(_)), "{what}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1 and HTTP/2 helpers.

/// Writes `request` on a fresh TLS connection (HTTP/1.1) and reads until the gateway
/// closes it (requests here say `Connection: close`, or end in a refusal that closes).
async fn raw_h1(gw: &Gateway, request: &[u8]) -> String {
    let mut tls = gw.tls_connect(Alpn::Http11).await;
    tls.write_all(request).await.unwrap();
    read_to_close(&mut tls, Duration::from_secs(10)).await
}

async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "connection not closed within {within:?}; got so far:\n{}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(raw: &str) -> u16 {
    raw.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {raw:?}"))
}

/// The JSON body of a raw `Content-Length` response (the fake upstream's `/echo`).
fn json_body(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

fn header_values(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn h2_client(gw: &Gateway) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = gw.tls_connect(Alpn::H2).await;
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One HTTP/2 request without a body: status and body.
async fn h2_request(
    send: &h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> (u16, Vec<u8>) {
    let mut send = send.clone().ready().await.expect("h2 ready");
    let (resp, _) = send.send_request(req, true).expect("send_request");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("h2 response within 10 s")
        .expect("h2 response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("h2 body");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, out)
}

fn h2_get(gw: &Gateway, path: &str) -> http::request::Builder {
    http::Request::get(format!("https://localhost:{}{path}", gw.https_addr.port()))
}

async fn metrics_text(gw: &Gateway) -> String {
    gw.admin_get("/metrics").await.1
}

/// Polls `/metrics` until `name{labels}` reaches `want` (counters bumped when a
/// connection ends may trail the client's view by a moment); panics after 3 s.
async fn wait_metric_at_least(gw: &Gateway, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = metrics_text(gw).await;
        if metric(&m, name, labels).is_some_and(|n| n >= want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} did not reach {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------

/// Item 4: a client named by a PROXY header is the client, even inside `trusted_proxies`:
/// its own `X-Forwarded-For` is never believed (before: it chose its IP and bucket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_named_client_cannot_choose_its_ip_with_xff() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
        )
        .start()
        .await;
    let mut tls = tls_via_proxy_header(&gw, "127.0.0.9")
        .await
        .expect("TLS after the PROXY header");
    tls.write_all(
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let raw = read_to_close(&mut tls, Duration::from_secs(10)).await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(
        header_values(&json_body(&raw), "x-forwarded-for"),
        vec!["127.0.0.9"]
    );
}

/// TLS after a PROXY v1 header naming `client` (the socket peer, 127.0.0.1, is the
/// trusted balancer); `None` when the gateway closed the connection instead.
async fn tls_via_proxy_header(
    gw: &Gateway,
    client: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(gw.https_addr).await.unwrap();
    let header = format!("PROXY TCP4 {client} 127.0.0.1 5555 8443\r\n");
    tcp.write_all(header.as_bytes()).await.unwrap();
    let connect = tokio_rustls::TlsConnector::from(gw.client_config(Alpn::Http11)).connect(
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        tcp,
    );
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .expect("closed or served within 5 s, not left hanging")
        .ok()
}

/// `max_connections_per_ip` holds for clients behind a PROXY-protocol balancer too: the
/// balancer itself is exempt, and the client its header names takes the slot (before:
/// such clients were not capped at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_applies_to_clients_named_by_the_proxy_header() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section(
            "server",
            "proxy_protocol = \"on\"\ntrusted_proxies = [\"127.0.0.0/8\"]\nmax_connections_per_ip = 2",
        )
        .start()
        .await;
    let a = tls_via_proxy_header(&gw, "203.0.113.7")
        .await
        .expect("first");
    let _b = tls_via_proxy_header(&gw, "203.0.113.7")
        .await
        .expect("second");
    assert!(
        tls_via_proxy_header(&gw, "203.0.113.7").await.is_none(),
        "a third connection for the same client must be closed before TLS"
    );
    // Another client behind the same balancer is not affected.
    let mut other = tls_via_proxy_header(&gw, "203.0.113.8")
        .await
        .expect("another client");
    other
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut other, Duration::from_secs(10)).await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    let (_, m) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &m,
            "onramp_gateway_connections_refused_total",
            &[("reason", "per_ip")]
        ),
        Some(1.0),
        "{m}"
    );
    // A freed slot is usable again (once the gateway has seen the close: only `b` open).
    drop(a);
    wait_active(&gw, 1.0).await;
    assert!(tls_via_proxy_header(&gw, "203.0.113.7").await.is_some());
}

/// Items 4 and 9: `check` refuses what the run would refuse (exit 0 means it starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_configs_the_run_would_refuse() {
    let cases = [
        (
            "server",
            "max_connections = 4611686018427387904",
            "server.max_connections",
        ),
        (
            "server",
            "trusted_proxies = [\"0.0.0.0/0\"]",
            "server.trusted_proxies[0]",
        ),
        (
            "server",
            "trusted_proxies = [\"::/0\"]",
            "server.trusted_proxies[0]",
        ),
        (
            "rate_limit",
            "backend = \"redis\"\nredis_url = \"unix:///run/redis.sock\"\nredis_cluster = true",
            "rate_limit.redis_cluster",
        ),
    ];
    for (section, snippet, expect) in cases {
        let out = GatewayBuilder::new("http://127.0.0.1:3000")
            .section(section, snippet)
            .check();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "check accepted {snippet}: {text}");
        assert!(text.contains(expect), "{snippet}: {text}");
    }
}

/// Item 5: only `server.upgrade_protocols` are passed to the app; `h2c` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_upgrade_protocols_reach_the_app() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let raw = raw_h1(
        &gw,
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 400, "{raw}");
    assert_eq!(up.requests(), 0, "an h2c upgrade reached the app");
    // WebSocket (any case) still works.
    let _ws = open_ws(&gw).await;
}

/// Item 6: owned headers are set after hop-by-hop stripping (`Connection: x-request-id`
/// cannot remove them) and HTTP/1.1 without `Host` is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_gateway_headers_and_host_is_required() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let raw = raw_h1(
        &gw,
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\
          Connection: close, x-request-id, x-forwarded-for, x-forwarded-proto, x-forwarded-host\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    let echo = json_body(&raw);
    let rid = header_values(&echo, "x-request-id");
    assert_eq!(rid.len(), 1, "{echo}");
    assert!(
        raw.to_ascii_lowercase()
            .contains(&format!("x-request-id: {}", rid[0])),
        "the app's id differs from the client's: {raw}"
    );
    assert_eq!(header_values(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(header_values(&echo, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(header_values(&echo, "x-forwarded-host"), vec!["localhost"]);

    let before = up.requests();
    let raw = raw_h1(&gw, b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&raw), 400, "{raw}");
    assert_eq!(up.requests(), before);
}

/// Item 7: the response timeout starts when the upload is complete; a slow but moving
/// upload longer than it is served (before: 504 mid-upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_is_not_cut_by_the_response_timeout() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("upstream", "response_timeout_ms = 1000")
        .start()
        .await;
    let mut tls = gw.tls_connect(Alpn::Http11).await;
    tls.write_all(b"POST /hash HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // ~1.5 s of upload, longer than the 1 s response timeout.
    for _ in 0..3 {
        tls.write_all(&[b'x'; 10]).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let raw = read_to_close(&mut tls, Duration::from_secs(10)).await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(json_body(&raw)["len"], 30);
}

/// Item 7: a stalled upload is bounded by `idle_timeout_ms`: 408, then the connection
/// closes (before: held until the 60 s response timeout, then 504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_is_408_after_the_idle_timeout() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "idle_timeout_ms = 500")
        .start()
        .await;
    let mut tls = gw.tls_connect(Alpn::Http11).await;
    tls.write_all(
        b"POST /hash HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let raw = read_to_close(&mut tls, Duration::from_secs(5)).await;
    assert_eq!(status_of(&raw), 408, "{raw}");
    assert!(started.elapsed() >= Duration::from_millis(400), "too early");
}

/// A raw app that answers the head at once, then echoes the request body as it arrives
/// (full-duplex HTTP/1.1, what gRPC-web or streaming uploads with progress do).
async fn duplex_app() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                let mut got = buf.len() - head_end;
                if got > 0 {
                    let body = buf[head_end..].to_vec();
                    let _ = s
                        .write_all(format!("{:x}\r\n", body.len()).as_bytes())
                        .await;
                    let _ = s.write_all(&body).await;
                    let _ = s.write_all(b"\r\n").await;
                }
                while got < len {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got += n;
                    let _ = s.write_all(format!("{n:x}\r\n").as_bytes()).await;
                    let _ = s.write_all(&chunk[..n]).await;
                    let _ = s.write_all(b"\r\n").await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, task)
}

/// Item 8: full-duplex HTTP/1.1 (the app answers before the upload ends) is not cut at
/// `header_read_timeout_ms`: body bytes never restart the request-head timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_upload_outlives_the_header_timeout() {
    let (url, _app) = duplex_app().await;
    let gw = GatewayBuilder::new(&url)
        .section("server", "header_read_timeout_ms = 400")
        .start()
        .await;
    let mut tls = gw.tls_connect(Alpn::Http11).await;
    tls.write_all(b"POST /duplex HTTP/1.1\r\nHost: localhost\r\nContent-Length: 60\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // 6 pieces, 300 ms apart: the upload lasts ~4 times the head timeout.
    for i in 0..6u8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tls.write_all(&[b'a' + i; 10]).await.unwrap();
        tls.flush().await.unwrap();
    }
    let raw = read_to_close(&mut tls, Duration::from_secs(10)).await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    for i in 0..6u8 {
        let piece = String::from_utf8(vec![b'a' + i; 10]).unwrap();
        assert!(
            raw.contains(&piece),
            "{piece} missing (cut early?): {raw:?}"
        );
    }
    assert!(raw.ends_with("0\r\n\r\n"), "response not complete: {raw:?}");
}

/// Item 10: HTTP/2 cookie crumbs reach the HTTP/1.1 app as one `Cookie` joined with "; ".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_are_joined_for_the_app() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let send = h2_client(&gw).await;
    let req = h2_get(&gw, "/echo")
        .header("cookie", "session=abc")
        .header("cookie", "csrf=def")
        .header("cookie", "theme=dark")
        .body(())
        .unwrap();
    let (status, body) = h2_request(&send, req).await;
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        header_values(&echo, "cookie"),
        vec!["session=abc; csrf=def; theme=dark"]
    );
    assert_eq!(header_values(&echo, "host").len(), 1, "{echo}");
}

/// Item 11: two Host lines, an HTTP/2 `host` that differs from `:authority`: 400; a raw
/// non-ASCII HTTP/2 `:path` reaches the app percent-encoded; client-IP and routing
/// headers from an untrusted peer (and underscore names) are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hygiene_towards_the_app() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;

    let raw = raw_h1(
        &gw,
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 400, "{raw}");

    let send = h2_client(&gw).await;
    let req = h2_get(&gw, "/echo")
        .header("host", "evil.example")
        .body(())
        .unwrap();
    assert_eq!(h2_request(&send, req).await.0, 400);
    assert_eq!(up.requests(), 0, "a refused request reached the app");

    let req = h2_get(&gw, "/echo/caf\u{e9}?q=\u{e9}").body(()).unwrap();
    let (status, body) = h2_request(&send, req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/echo/caf%C3%A9");
    assert_eq!(echo["query"], "q=%C3%A9");

    let claims = [
        "True-Client-IP",
        "X-Client-IP",
        "Client-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "X-Cluster-Client-IP",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Forwarded-Scheme",
        "X-Forwarded-Ssl",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X_Forwarded_For",
        "X_Real_IP",
    ];
    let mut req = String::from(
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Kept: yes\r\n",
    );
    for c in claims {
        req.push_str(&format!("{c}: 6.6.6.6\r\n"));
    }
    req.push_str("\r\n");
    let raw = raw_h1(&gw, req.as_bytes()).await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    let echo = json_body(&raw);
    for c in claims {
        assert!(
            header_values(&echo, &c.to_ascii_lowercase()).is_empty(),
            "{c} reached the app: {echo}"
        );
    }
    assert_eq!(header_values(&echo, "x-kept"), vec!["yes"]);
    assert_eq!(header_values(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
}

/// Item 12: requests hyper refuses are logged (info, with peer and reason) and counted in
/// `onramp_gateway_protocol_errors_total{reason}`; a malformed chunked body on a proxied
/// request is 400, not 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_refusals_are_visible_and_bad_bodies_are_400() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let raw = raw_h1(
        &gw,
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 400, "{raw}");
    let ev = gw
        .wait_for_log(Duration::from_secs(5), "protocol refusal", |e| {
            crate::common::gateway::field_str(e, "message")
                == Some("request refused at the protocol level")
        })
        .await;
    assert_eq!(
        crate::common::gateway::field_str(&ev, "reason"),
        Some("http1_parse")
    );
    assert!(
        crate::common::gateway::field_str(&ev, "peer").is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    assert_eq!(
        ev.get("level").and_then(|l| l.as_str()),
        Some("INFO"),
        "{ev}"
    );
    let m = metrics_text(&gw).await;
    assert!(
        metric(
            &m,
            "onramp_gateway_protocol_errors_total",
            &[("reason", "http1_parse")]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );

    let raw = raw_h1(
        &gw,
        b"POST /hash HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\nzz-not-hex\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 400, "{raw}");
}

/// The client connection preface (RFC 9113 §3.4), before the client's SETTINGS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame: 9-byte header (length, type, flags, stream id) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS block of literal fields (never indexed, no Huffman): enough HPACK for a
/// test to write requests the h2 client crate would refuse to send.
fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x10);
        for s in [name, value] {
            assert!(s.len() < 127, "one-byte HPACK length");
            block.push(u8::try_from(s.len()).unwrap());
            block.extend_from_slice(s.as_bytes());
        }
    }
    block
}

/// Reads HTTP/2 frames until one of `kind` on `stream` arrives (acknowledging the
/// server's SETTINGS on the way); its payload.
async fn read_h2_frame_until<S>(s: &mut S, kind: u8, stream: u32) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.expect("frame header");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.expect("frame payload");
            if head[3] == 0x4 && head[4] & 0x1 == 0 {
                s.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
            }
            if head[3] == kind && id == stream {
                return payload;
            }
        }
    })
    .await
    .expect("the frame within 10 s")
}

/// A malformed HTTP/2 request (a connection-specific field, RFC 9113 §8.2.2) is refused
/// by h2 with RST_STREAM on its stream alone, without reaching hyper's service. The
/// gateway still logs it with peer and reason and counts it, and the connection goes on
/// serving the next stream. Each refusal is counted, but only the first on a connection
/// is an info line: a client cannot turn its own bad streams into a log flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_refusals_are_logged_and_counted() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let authority = format!("localhost:{}", gw.https_addr.port());
    let request = |extra: &[(&'static str, &'static str)]| {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/echo"),
            (":authority", authority.as_str()),
        ];
        fields.extend_from_slice(extra);
        hpack_literals(&fields)
    };
    let mut tls = gw.tls_connect(Alpn::H2).await;
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    // END_STREAM | END_HEADERS
    hello.extend(h2_frame(0x1, 0x5, 1, &request(&[("connection", "close")])));
    tls.write_all(&hello).await.unwrap();
    let code = read_h2_frame_until(&mut tls, 0x3, 1).await;
    assert_eq!(code, 1u32.to_be_bytes(), "RST_STREAM(PROTOCOL_ERROR)");

    // Counted before the client could read the RST_STREAM: it is counted as it is written.
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "onramp_gateway_protocol_errors_total",
            &[("reason", "http2_protocol")]
        ),
        Some(1.0),
        "{m}"
    );
    let ev = gw
        .wait_for_log(Duration::from_secs(5), "stream refusal", |e| {
            crate::common::gateway::field_str(e, "message")
                == Some("request refused at the protocol level")
                && crate::common::gateway::field_str(e, "scope") == Some("stream")
        })
        .await;
    assert_eq!(
        crate::common::gateway::field_str(&ev, "reason"),
        Some("http2_protocol")
    );
    assert!(
        crate::common::gateway::field_str(&ev, "peer").is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    assert_eq!(ev.get("level").and_then(|l| l.as_str()), Some("INFO"));

    // Two more on the same connection: counted, not logged at info again.
    for stream in [3, 5] {
        tls.write_all(&h2_frame(0x1, 0x5, stream, &request(&[("te", "gzip")])))
            .await
            .unwrap();
        let code = read_h2_frame_until(&mut tls, 0x3, stream).await;
        assert_eq!(code, 1u32.to_be_bytes(), "stream {stream}");
    }
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "onramp_gateway_protocol_errors_total",
            &[("reason", "http2_protocol")]
        ),
        Some(3.0),
        "{m}"
    );

    // The same connection serves a well-formed request on the next stream.
    tls.write_all(&h2_frame(0x1, 0x5, 7, &request(&[])))
        .await
        .unwrap();
    let head = read_h2_frame_until(&mut tls, 0x1, 7).await;
    assert!(!head.is_empty(), "a response HEADERS block for stream 7");
    assert_eq!(
        up.requests(),
        1,
        "only the well-formed request reached the app"
    );
    // Its access-log line comes after any line the refusals wrote.
    gw.wait_for_log(Duration::from_secs(5), "access log for stream 7", |e| {
        crate::common::gateway::field_str(e, "message") == Some("request")
    })
    .await;
    let info_lines = gw
        .log_events()
        .iter()
        .filter(|e| crate::common::gateway::field_str(e, "scope") == Some("stream"))
        .count();
    assert_eq!(info_lines, 1, "{}", gw.logs());
}

/// Item 13: an HTTP/2 connection with no open stream is idle whatever PINGs it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_pings_do_not_keep_an_idle_connection_open() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "idle_timeout_ms = 600")
        .start()
        .await;
    let tls = gw.tls_connect(Alpn::H2).await;
    let (send, mut conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let mut ping_pong = conn.ping_pong().expect("ping_pong");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    // One request first: a connection that was used is as idle afterwards.
    let req = h2_get(&gw, "/echo").body(()).unwrap();
    assert_eq!(h2_request(&send, req).await.0, 200);
    let started = Instant::now();
    while !conn.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "PINGs kept an HTTP/2 connection without streams open"
        );
        let _ = tokio::time::timeout(
            Duration::from_millis(150),
            ping_pong.ping(h2::Ping::opaque()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
}

/// Reads exactly one `Content-Length` response from a keep-alive connection.
async fn read_one_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..i]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if out.len() >= i + 4 + len {
                    return;
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("one response within 10 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// Item 13: at `max_connections`, a new client gets the slot of the keep-alive that has
/// been idle the longest, instead of waiting in the kernel backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_the_oldest_idle_keep_alive_makes_room() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "max_connections = 2")
        .start()
        .await;
    let get = b"GET /status/204 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut oldest = gw.tls_connect(Alpn::Http11).await;
    oldest.write_all(get).await.unwrap();
    assert_eq!(status_of(&read_one_response(&mut oldest).await), 204);
    let mut newer = gw.tls_connect(Alpn::Http11).await;
    newer.write_all(get).await.unwrap();
    assert_eq!(status_of(&read_one_response(&mut newer).await), 204);

    assert!(
        tls_handshake_completes(&gw, Duration::from_secs(3)).await,
        "a new client waited although idle keep-alives held every slot"
    );
    // The oldest idle one was closed; the newer one still serves.
    let _ = read_to_close(&mut oldest, Duration::from_secs(3)).await;
    newer.write_all(get).await.unwrap();
    assert_eq!(status_of(&read_one_response(&mut newer).await), 204);
}

/// Items 10 and 14: the app-context call (addresses.source = "upstream") follows the
/// proxy's forwarding rules: HTTP/2 cookie crumbs joined into one `Cookie`, `Host` from
/// `:authority`, the gateway's request id and `X-Forwarded-*` (before: cookies as sent,
/// no Host for HTTP/2 clients, no request id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_context_call_uses_the_proxys_forwarding_rules() {
    use crate::common::context_app::{self, Anonymous, ContextApp};
    use crate::common::fake_cdp::{FakeCdp, TestKey};
    let key = TestKey::ed25519();
    let fake = FakeCdp::start(&key);
    let app = ContextApp::start(Anonymous::Unauthorized).await;
    let mut b = GatewayBuilder::new(&app.url())
        .section("cdp", &format!("api_base = \"{}\"", fake.api_base()))
        .section("rate_limit", "requests_per_minute = 60000\nburst = 1000")
        .section("addresses", "source = \"upstream\"");
    for (k, v) in key.env() {
        b = b.env(&k, &v);
    }
    let gw = b.start().await;
    let send = h2_client(&gw).await;
    let req = h2_get(&gw, "/onramp?defaultAsset=USDC")
        .header("cookie", "theme=dark")
        .header("cookie", context_app::SESSION_COOKIE)
        .header("x-request-id", "client-chosen")
        .body(())
        .unwrap();
    let (status, body) = h2_request(&send, req).await;
    assert_eq!(
        status,
        302,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        gw.logs()
    );
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let h = &seen[0].headers;
    let all = |n: &str| -> Vec<String> {
        h.get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        all("cookie"),
        vec![format!("theme=dark; {}", context_app::SESSION_COOKIE)]
    );
    let authority = format!("localhost:{}", gw.https_addr.port());
    assert_eq!(all("host"), vec![authority.clone()]);
    assert_eq!(all("x-forwarded-host"), vec![authority]);
    assert_eq!(all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(all("x-forwarded-proto"), vec!["https"]);
    let rid = all("x-request-id");
    assert_eq!(rid.len(), 1);
    assert_ne!(rid[0], "client-chosen");
    assert_eq!(rid[0].len(), 32, "{rid:?}");
}

// ---------------------------------------------------------------------------------------
// Abuse tests: bounded in count and time, loopback only.

/// A raw-socket app that parses requests itself (Content-Length or chunked) and records
/// every request line it sees, so a desync between gateway and app shows up as an extra
/// request.
struct RecordingApp {
    url: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl RecordingApp {
    async fn start() -> RecordingApp {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = serve_recorded(s, seen).await;
                });
            }
        });
        RecordingApp {
            url,
            lines,
            _task: task,
        }
    }

    fn request_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

async fn serve_recorded(
    mut s: TcpStream,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    // Reads until `buf` holds at least `n` bytes.
    async fn fill(
        s: &mut TcpStream,
        buf: &mut Vec<u8>,
        chunk: &mut [u8],
        n: usize,
    ) -> std::io::Result<()> {
        while buf.len() < n {
            let got = s.read(chunk).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..got]);
        }
        Ok(())
    }
    async fn line(
        s: &mut TcpStream,
        buf: &mut Vec<u8>,
        chunk: &mut [u8],
    ) -> std::io::Result<String> {
        loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&buf[..i]).into_owned();
                buf.drain(..i + 2);
                return Ok(l);
            }
            let n = buf.len() + 1;
            fill(s, buf, chunk, n).await?;
        }
    }
    loop {
        let request_line = line(&mut s, &mut buf, &mut chunk).await?;
        seen.lock().unwrap().push(request_line);
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            let h = line(&mut s, &mut buf, &mut chunk)
                .await?
                .to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if h.starts_with("transfer-encoding:") && h.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                let size = line(&mut s, &mut buf, &mut chunk).await?;
                let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or(0);
                fill(&mut s, &mut buf, &mut chunk, size + 2).await?;
                buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            fill(&mut s, &mut buf, &mut chunk, len).await?;
            buf.drain(..len);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: raw\r\n\r\nok")
            .await?;
    }
}

/// Request smuggling probes never reach the app as two requests: each either is refused
/// or arrives as exactly one request, and the smuggled one never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_probes_never_reach_the_app_as_two_requests() {
    let app = RecordingApp::start().await;
    let gw = GatewayBuilder::new(&app.url).start().await;
    const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let probes: Vec<(&str, String)> = vec![
        (
            "CL+TE",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "TE+CL",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()),
        ),
        (
            "duplicate CL",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
        ),
        (
            "obs-fold TE",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\nTransfer-Encoding:\r\n chunked\r\n\r\n{SMUGGLED}"),
        ),
        (
            "bare LF",
            format!("POST /a HTTP/1.1\nHost: localhost\nConnection: close\nContent-Length: 0\n\n{SMUGGLED}"),
        ),
        (
            "chunked, identity",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "space before colon",
            format!("POST /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"),
        ),
    ];
    for (what, probe) in probes {
        let before = app.request_lines().len();
        let raw = raw_h1(&gw, probe.as_bytes()).await;
        let from_app = raw.matches("x-app: raw").count();
        let status = status_of(&raw);
        let lines = app.request_lines();
        let new = &lines[before..];
        assert!(
            new.iter().all(|l| !l.contains("/smuggled")),
            "{what}: the smuggled request reached the app: {new:?}"
        );
        assert!(new.len() <= 1, "{what}: the app saw {new:?}");
        assert_eq!(
            new.len(),
            from_app,
            "{what}: app requests vs app answers relayed (status {status}): {raw}"
        );
    }
    // Still serving normally.
    let raw = raw_h1(
        &gw,
        b"GET /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
}

/// 200 slowloris clients (a request head trickled a byte at a time) are cut at
/// `header_read_timeout_ms` while a normal client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_while_others_are_served() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "header_read_timeout_ms = 1500")
        .start()
        .await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut tls = gw.tls_connect(Alpn::Http11).await;
        tls.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(Some(tls));
    }
    let client = gw.https_client(Alpn::Http11);
    let started = Instant::now();
    let mut served = 0;
    while slow.iter().any(Option::is_some) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} slowloris connections still open after 10 s",
            slow.iter().filter(|s| s.is_some()).count()
        );
        // A normal request is answered promptly meanwhile.
        let t = Instant::now();
        let r = client.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "normal client starved"
        );
        served += 1;
        // Every slow client sends one more byte; a closed one errors (or reads EOF).
        for s in slow.iter_mut() {
            if let Some(tls) = s {
                let gone = tls.write_all(b"a").await.is_err() || {
                    let mut b = [0u8; 64];
                    matches!(
                        tokio::time::timeout(Duration::from_millis(1), tls.read(&mut b)).await,
                        Ok(Ok(0)) | Ok(Err(_)) | Ok(Ok(_))
                    )
                };
                if gone {
                    *s = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "slow clients were cut before header_read_timeout_ms"
    );
    assert!(served >= 3);
    assert_eq!(up.requests(), served, "a slowloris head reached the app");
}

/// HTTP/2 rapid reset (open a stream, reset it at once, repeat) is bounded: the gateway
/// answers with GOAWAY (ENHANCE_YOUR_CALM), counts it, and keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_bounded() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let tls = gw.tls_connect(Alpn::H2).await;
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    let flood = async {
        let mut send = send;
        for _ in 0..5000 {
            let Ok(ready) = send.clone().ready().await else {
                break;
            };
            send = ready;
            let req = h2_get(&gw, "/slow?ms=2000").body(()).unwrap();
            let Ok((_resp, mut stream)) = send.send_request(req, false) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .expect("flood bounded in time");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the flooding connection was not closed")
        .unwrap();
    let err = ended.expect_err("the connection should end with GOAWAY");
    // The client may be mid-write when the gateway closes after its GOAWAY (then it sees
    // a broken pipe first); the gateway's own count below is the reliable signal.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?}"
    );
    assert!(opened < 5000, "all {opened} streams were accepted");
    assert!(
        up.requests() < 200,
        "{} reset streams reached the app",
        up.requests()
    );
    // Counted when the gateway's side of the connection ends.
    wait_metric_at_least(
        &gw,
        "onramp_gateway_protocol_errors_total",
        &[("reason", "http2_enhance_your_calm")],
        1.0,
    )
    .await;
    let r = gw
        .https_client(Alpn::H2)
        .get(gw.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Item 13: the HTTP/2 limits are the gateway's own, not hyper's defaults: 128
/// concurrent streams and a 256 KiB stream window (hyper: 1 MiB, which let one slow
/// upload park ~1.3 MiB per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_are_set_explicitly() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let send = h2_client(&gw).await;
    // One exchange first, so the server's SETTINGS have been applied.
    let req = h2_get(&gw, "/echo").body(()).unwrap();
    assert_eq!(h2_request(&send, req).await.0, 200);
    assert_eq!(send.current_max_send_streams(), 128);

    let mut ready = send.clone().ready().await.unwrap();
    let req = http::Request::post(format!("https://localhost:{}/hash", gw.https_addr.port()))
        .body(())
        .unwrap();
    let (resp, mut stream) = ready.send_request(req, false).unwrap();
    stream.reserve_capacity(4 << 20);
    // Capacity is granted up to the stream window; wait until it stops growing.
    let mut granted = 0;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(
        Duration::from_millis(300),
        std::future::poll_fn(|cx| stream.poll_capacity(cx)),
    )
    .await
    {
        granted = stream.capacity();
    }
    assert_eq!(granted, 256 * 1024, "initial stream window");
    stream
        .send_data(bytes::Bytes::from_static(b"x"), true)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// HTTP/2 CONTINUATION flood (a header block that never ends): the gateway closes the
/// connection once the block outgrows `max_header_bytes`, long before the flood is
/// over, and keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_flood_is_bounded() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    let tls = gw.tls_connect(Alpn::H2).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    // HPACK: :method GET, :scheme https, :path /, :authority localhost.
    let mut first = vec![0x82, 0x87, 0x84, 0x41, 9];
    first.extend_from_slice(b"localhost");
    // Ten literal `x-a: vvv…` fields (~1 KiB) per CONTINUATION frame.
    let mut block = Vec::new();
    for _ in 0..10 {
        block.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 100]);
        block.extend_from_slice(&[b'v'; 100]);
    }
    let block_len = block.len();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let mut out = H2_PREFACE.to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[]));
        // HEADERS with END_STREAM but without END_HEADERS, then CONTINUATION forever.
        out.extend(h2_frame(0x1, 0x1, 1, &first));
        if wr.write_all(&out).await.is_err() {
            return sent;
        }
        for _ in 0..4096 {
            if wr.write_all(&h2_frame(0x9, 0, 1, &block)).await.is_err() {
                break;
            }
            sent += block.len();
        }
        let _ = wr.flush().await;
        sent
    });
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the flooding connection was not closed");
    let sent = writer.await.unwrap();
    assert!(
        sent < 4096 * block_len,
        "the whole 4 MiB header block was accepted"
    );
    assert_eq!(up.requests(), 0);
    // Counted (as any HTTP/2 refusal) when the gateway's side of the connection ends.
    wait_metric_at_least(&gw, "onramp_gateway_protocol_errors_total", &[], 1.0).await;
    let r = gw
        .https_client(Alpn::H2)
        .get(gw.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Abuse: 2,000 idle TLS keep-alives (each served one request, then silent) while normal
/// traffic goes on. The cap holds (`connections_active` never above `max_connections`), a
/// new client still gets in (the oldest idle keep-alive makes room), every normal
/// request is answered, and the gateway keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_tls_connections_and_normal_traffic() {
    const IDLE: usize = 2000;
    const CAP: usize = 2000;
    const BATCH: usize = 100;
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section(
            "server",
            &format!("max_connections = {CAP}\nidle_timeout_ms = 120000"),
        )
        .start()
        .await;
    let get = b"GET /status/204 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut idle = Vec::with_capacity(IDLE);
    while idle.len() < IDLE {
        assert!(
            Instant::now() < deadline,
            "only {} idle connections opened",
            idle.len()
        );
        // Batches: concurrent handshakes, bounded.
        let batch: Vec<_> = (0..BATCH)
            .map(|_| {
                let gw = &gw;
                async move {
                    let mut s = gw.tls_connect(Alpn::Http11).await;
                    s.write_all(get).await.unwrap();
                    s.flush().await.unwrap();
                    assert_eq!(status_of(&read_one_response(&mut s).await), 204);
                    s
                }
            })
            .collect();
        let done = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::future::join_all(batch),
        )
        .await;
        let Ok(done) = done else {
            let logs = gw.logs();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            panic!(
                "a batch stalled after {} connections; app saw {} requests; active {}; logs:\n{}",
                idle.len(),
                up.requests(),
                connections_active(&gw).await,
                tail.join("\n")
            );
        };
        idle.extend(done);
    }
    assert!(connections_active(&gw).await <= CAP as f64);
    // Normal traffic at the cap: each new client takes an idle slot and is served.
    let client = gw.https_client(Alpn::H2AndHttp11);
    for i in 0..50 {
        let r = tokio::time::timeout(Duration::from_secs(10), client.get(gw.url("/echo")).send())
            .await
            .unwrap_or_else(|_| panic!("request {i} waited at the cap"))
            .expect("served");
        assert_eq!(r.status(), 200);
    }
    let active = connections_active(&gw).await;
    assert!(
        active <= CAP as f64,
        "connections_active {active} above the cap {CAP}"
    );
    // Close the idle ones: the gauge comes back down and the gateway still serves.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections_active(&gw).await > 5.0 {
        assert!(
            Instant::now() < deadline,
            "closed connections stayed counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client.get(gw.url("/echo")).send().await.expect("served");
    assert_eq!(r.status(), 200);
}
