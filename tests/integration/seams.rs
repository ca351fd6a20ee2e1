//! Issue 10, "close the proxy's seams": one regression test per defect, each driving the
//! real binary over real TLS (raw sockets where a client library would hide the bytes).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::certs::Alpn;
use crate::common::gateway::{Gateway, GatewayBuilder};
use crate::common::upstream::Upstream;

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Sums the samples of `name` (with every `labels` pair) in a Prometheus text page.
fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

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
