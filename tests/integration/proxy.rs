//! Everything that is not `/onramp` or `/offramp` is proxied to the upstream app:
//! streaming, forwarding headers, hop-by-hop stripping, HTTP/2 and WebSocket clients,
//! upstream failures, and what the admin listener and access log report about it.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::common::certs::Alpn;
use crate::common::gateway::{field, Gateway, GatewayBuilder};
use crate::common::metric as metric_value;
use crate::common::upstream::{dead_address, pattern_bytes, sha256_hex, Upstream};

const MIB5: usize = 5 * 1024 * 1024;

async fn start() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url()).start().await;
    (up, gw)
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_keep_path_and_query() {
    let (_up, gw) = start().await;
    let client = gw.https_client(Alpn::Http11);

    let resp = client
        .get(gw.url("/echo/a%20b/c?x=1&y=two%20words&empty="))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-upstream"],
        "fake",
        "answer not from upstream"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo/a%20b/c");
    assert_eq!(v["query"], "x=1&y=two%20words&empty=");

    let resp = client
        .post(gw.url("/echo/form?token=abc&n=2"))
        .header("content-type", "text/plain")
        .body("hello upstream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/echo/form");
    assert_eq!(v["query"], "token=abc&n=2");
    assert_eq!(v["body"], "hello upstream");
    assert_eq!(header_values(&v, "content-type"), vec!["text/plain"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_codes_pass_through() {
    let (_up, gw) = start().await;
    let client = gw.https_client(Alpn::Http11);
    for code in [201u16, 404, 500, 503] {
        let resp = client
            .get(gw.url(&format!("/status/{code}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
        // The upstream's own error, not one the gateway made up.
        assert_eq!(resp.headers()["x-upstream"], "fake");
        assert_eq!(resp.text().await.unwrap(), format!("status {code}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_5mib_with_content_length() {
    let (_up, gw) = start().await;
    let body = pattern_bytes(0, MIB5);
    let expected = sha256_hex(&body);
    let resp = gw
        .https_client(Alpn::Http11)
        .post(gw.url("/hash"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["len"], MIB5);
    assert_eq!(v["sha256"], expected);
}

/// A chunked upload (no Content-Length) from a raw hyper client: exercises the path where
/// `Transfer-Encoding` is hop-by-hop and the body must be re-framed for the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_5mib_chunked_streams() {
    let (_up, gw) = start().await;
    let tls = gw.tls_connect(Alpn::Http11).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    const CHUNK: usize = 64 * 1024;
    let frames =
        futures_util::stream::iter((0..MIB5 / CHUNK).map(|i| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(pattern_bytes(i * CHUNK, CHUNK))))
        }));
    let req = http::Request::post("/hash")
        .header("host", format!("localhost:{}", gw.https_addr.port()))
        .body(StreamBody::new(frames))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("chunked upload timed out")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["len"], MIB5);
    assert_eq!(v["sha256"], sha256_hex(&pattern_bytes(0, MIB5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_5mib() {
    let (_up, gw) = start().await;
    for alpn in [Alpn::Http11, Alpn::H2AndHttp11] {
        let resp = gw
            .https_client(alpn)
            .get(gw.url(&format!("/big?bytes={MIB5}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), MIB5, "{alpn:?}");
        assert_eq!(
            sha256_hex(&body),
            sha256_hex(&pattern_bytes(0, MIB5)),
            "{alpn:?}"
        );
    }
}

/// The gateway must forward response bytes as they come, not buffer the whole body: the
/// first chunk has to arrive well before the upstream sends the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_is_streamed_not_buffered() {
    let (_up, gw) = start().await;
    for alpn in [Alpn::Http11, Alpn::H2AndHttp11] {
        let start = Instant::now();
        let mut resp = gw
            .https_client(alpn)
            .get(gw.url("/drip?chunks=4&interval_ms=400"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut got = Vec::new();
        let mut first_at = None;
        while let Some(chunk) = resp.chunk().await.unwrap() {
            first_at.get_or_insert(start.elapsed());
            got.extend_from_slice(&chunk);
        }
        let last_at = start.elapsed();
        assert_eq!(
            String::from_utf8_lossy(&got),
            "chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
        );
        let first_at = first_at.unwrap();
        // The upstream spaces chunks 1.2 s apart in total; a buffering proxy delivers the
        // first byte together with the last.
        assert!(
            first_at + Duration::from_millis(700) < last_at,
            "{alpn:?}: first chunk at {first_at:?}, last at {last_at:?}: body was buffered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_replace_client_supplied_ones() {
    let (_up, gw) = start().await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo"))
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-real-ip", "5.6.7.8")
        .header("forwarded", "for=9.9.9.9;proto=http")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        header_values(&v, "x-forwarded-for"),
        vec!["127.0.0.1"],
        "{v}"
    );
    assert!(header_values(&v, "x-real-ip").is_empty(), "{v}");
    assert!(header_values(&v, "forwarded").is_empty(), "{v}");
    assert_eq!(header_values(&v, "x-forwarded-proto"), vec!["https"], "{v}");
    assert_eq!(
        header_values(&v, "x-forwarded-host"),
        vec![format!("localhost:{}", gw.https_addr.port())],
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stripped_on_request() {
    let (_up, gw) = start().await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo"))
        .header("connection", "X-Hop-Req")
        .header("x-hop-req", "must-not-reach-upstream")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    for h in [
        "x-hop-req",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "transfer-encoding",
    ] {
        assert!(
            header_values(&v, h).is_empty(),
            "`{h}` reached the upstream: {v}"
        );
    }
    for c in header_values(&v, "connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-hop-req"),
            "client's Connection value reached the upstream: {v}"
        );
    }
    assert_eq!(header_values(&v, "x-end-to-end"), vec!["kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stripped_on_response() {
    let (_up, gw) = start().await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/hop"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    for name in [
        "x-hop-resp",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
    ] {
        assert!(h.get(name).is_none(), "`{name}` reached the client: {h:?}");
    }
    for c in h.get_all("connection") {
        assert!(
            !c.to_str()
                .unwrap_or_default()
                .to_ascii_lowercase()
                .contains("x-hop-resp"),
            "upstream's Connection value reached the client: {h:?}"
        );
    }
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(resp.text().await.unwrap(), "hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_is_proxied_to_http11_upstream() {
    let (_up, gw) = start().await;
    let client = gw.https_client(Alpn::H2AndHttp11);
    let resp = client
        .get(gw.url("/echo/h2?q=1"))
        .header("x-forwarded-for", "1.2.3.4")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["path"], "/echo/h2");
    assert_eq!(v["query"], "q=1");
    assert_eq!(header_values(&v, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(header_values(&v, "x-forwarded-proto"), vec!["https"]);
    // HTTP/2 has no Host header: the :authority is what the client used.
    assert_eq!(
        header_values(&v, "x-forwarded-host"),
        vec![format!("localhost:{}", gw.https_addr.port())]
    );
    // The upstream needs a Host header even though the client sent :authority.
    assert_eq!(header_values(&v, "host").len(), 1, "{v}");

    let body = pattern_bytes(7, 1024 * 1024);
    let resp = client
        .post(gw.url("/hash"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["len"], body.len());
    assert_eq!(v["sha256"], sha256_hex(&body));
}

async fn ws_recv<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no WebSocket message within 5 s")
        .expect("WebSocket closed")
        .expect("WebSocket error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_gateway() {
    let (_up, gw) = start().await;
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

    ws.send(Message::text("hello through the gateway"))
        .await
        .unwrap();
    let m: Message = ws_recv(&mut ws).await;
    assert_eq!(m.to_text().unwrap(), "hello through the gateway");

    let big = pattern_bytes(3, 200 * 1024);
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m: Message = ws_recv(&mut ws).await;
    assert_eq!(m.into_data().as_ref(), big.as_slice());

    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_html_or_problem_json() {
    let gw = GatewayBuilder::new(&format!("http://{}", dead_address()))
        .start()
        .await;
    let client = gw.https_client(Alpn::Http11);

    let resp = client.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/html"), "content-type {ct}");

    for accept in ["application/json", "application/problem+json"] {
        let resp = client
            .get(gw.url("/echo"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            ct.starts_with("application/problem+json"),
            "Accept {accept}: content-type {ct}"
        );
        let v: Value = resp.json().await.expect("problem+json body parses");
        assert!(v.is_object(), "{v}");
        if let Some(s) = v.get("status") {
            assert_eq!(s, 502, "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("upstream", "response_timeout_ms = 300")
        .start()
        .await;
    let start = Instant::now();
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/slow?ms=5000"))
        .send()
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        took < Duration::from_millis(3000),
        "504 took {took:?} with a 300 ms response timeout"
    );
    // A fast request on the same gateway is unaffected.
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/slow?ms=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onramp_without_cdp_key_is_503_while_proxy_works() {
    let (up, gw) = start().await;
    let client = gw.https_client(Alpn::Http11);
    let q = "/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base";

    let resp = client.get(gw.url(q)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("x-upstream").is_none());

    let resp = client
        .get(gw.url(q))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/problem+json"), "{ct}");

    assert_eq!(up.requests(), 0, "/onramp must not be proxied");
    let resp = client.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.requests(), 1);

    // SPEC: without a key the pod is not ready, though alive and proxying.
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_metrics_count_proxied_requests() {
    let (_up, gw) = start().await;
    let client = gw.https_client(Alpn::Http11);
    for _ in 0..3 {
        assert_eq!(
            client.get(gw.url("/echo")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        client
            .get(gw.url("/status/404"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Counters may be bumped when the response body finishes, just after the client has
    // it: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(3);
    let (status, metrics) = loop {
        let (status, metrics) = gw.admin_get("/metrics").await;
        let ok = metric_value(
            &metrics,
            "onramp_gateway_requests_total",
            &[("route", "proxy"), ("status", "200")],
        ) == Some(3.0);
        if ok || Instant::now() > deadline {
            break (status, metrics);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(
            &metrics,
            "onramp_gateway_requests_total",
            &[("route", "proxy"), ("status", "200")]
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "onramp_gateway_requests_total",
            &[("route", "proxy"), ("status", "404")]
        ),
        Some(1.0),
        "{metrics}"
    );
    let active = metric_value(&metrics, "onramp_gateway_connections_active", &[]);
    assert!(
        active.is_some_and(|n| n >= 1.0),
        "connections_active missing or 0 while a keep-alive connection is open:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_line_per_request() {
    let (_up, gw) = start().await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/echo/logged?token=query-secret-xyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let ev = gw
        .wait_for_log(Duration::from_secs(5), "access log for /echo/logged", |e| {
            field(e, "message").and_then(Value::as_str) == Some("request")
                && field(e, "path").and_then(Value::as_str) == Some("/echo/logged")
        })
        .await;
    // The contract is a flat JSON object: fields at the top level, not under "fields".
    for k in [
        "timestamp",
        "level",
        "method",
        "path",
        "status",
        "duration_ms",
        "client_ip",
        "route",
    ] {
        assert!(
            ev.get(k).is_some(),
            "access log lacks top-level `{k}`: {ev}"
        );
    }
    assert_eq!(ev["method"], "GET");
    assert_eq!(ev["route"], "proxy");
    assert_eq!(ev["client_ip"], "127.0.0.1");
    assert!(
        ev["status"] == 200 || ev["status"] == "200",
        "status field: {ev}"
    );
    assert!(
        ev["duration_ms"].is_number(),
        "duration_ms is not a number: {ev}"
    );
    assert!(
        !gw.logs().contains("query-secret-xyz"),
        "query string logged:\n{}",
        gw.logs()
    );
}

/// An upstream that dies mid-body must not be turned into a clean, complete-looking
/// response: the client has to see an error (HTTP/1.1: no terminating chunk or a short
/// Content-Length; HTTP/2: RST_STREAM), or it would cache/process a truncated file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_body_is_an_error_for_the_client() {
    let (_up, gw) = start().await;
    for alpn in [Alpn::Http11, Alpn::H2AndHttp11] {
        let resp = gw
            .https_client(alpn)
            .get(gw.url("/abort?bytes=100000"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{alpn:?}");
        let body = resp.bytes().await;
        assert!(
            body.is_err(),
            "{alpn:?}: truncated upstream body delivered as a complete {}-byte response",
            body.map(|b| b.len()).unwrap_or_default()
        );
    }
    // And the gateway is fine afterwards.
    let resp = gw
        .https_client(Alpn::H2AndHttp11)
        .get(gw.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onramp_route_is_logged_and_counted_as_onramp() {
    let (_up, gw) = start().await;
    let resp = gw
        .https_client(Alpn::Http11)
        .get(gw.url("/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let ev = gw
        .wait_for_log(Duration::from_secs(5), "access log for /onramp", |e| {
            field(e, "message").and_then(Value::as_str) == Some("request")
                && field(e, "path").and_then(Value::as_str) == Some("/onramp")
        })
        .await;
    assert_eq!(
        field(&ev, "route").and_then(Value::as_str),
        Some("onramp"),
        "{ev}"
    );
    assert!(
        !gw.logs()
            .contains("0x1111111111111111111111111111111111111111"),
        "query string (wallet address) in logs:\n{}",
        gw.logs()
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "onramp_gateway_requests_total",
            &[("route", "onramp"), ("status", "503")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// A WebSocket tunnel where nothing moves for `idle_timeout_ms` is closed, so a stalled
/// peer cannot hold it (and its sockets) forever; traffic keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_tunnel_is_closed() {
    let up = Upstream::start().await;
    let gw = GatewayBuilder::new(&up.url())
        .section("server", "idle_timeout_ms = 600")
        .start()
        .await;
    let tls = gw.tls_connect(Alpn::Http11).await;
    let url = format!("wss://localhost:{}/ws", gw.https_addr.port());
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake through the gateway");

    // Traffic every 300 ms (half the idle timeout) for 1.2 s keeps the tunnel open.
    for i in 0..4 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let m: Message = ws_recv(&mut ws).await;
        assert_eq!(m.to_text().unwrap(), format!("ping {i}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Then silence: the gateway closes the tunnel (stream ends or errors).
    let start = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(
            next,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_))))
        ),
        "tunnel still open after 5 s of silence: {next:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "closed too early"
    );
}
