//! A fake upstream app: a plain HTTP/1.1 hyper server on an ephemeral loopback port,
//! running on the calling test's tokio runtime.
//!
//! Routes:
//! - `/echo[/...]` (any method): JSON `{method, path, query, version, headers, body}` of the
//!   request as the upstream saw it, so tests can check what the gateway forwarded.
//! - `POST /hash`: consumes the body frame by frame, answers `{len, sha256}`.
//! - `/big?bytes=N`: streams N bytes of [`pattern_bytes`] (chunked, no Content-Length).
//! - `/drip?chunks=N&interval_ms=M`: sends a line, then waits, N times (checks streaming).
//! - `/slow?ms=N`: waits N ms before sending response headers.
//! - `/abort?bytes=N`: sends headers and N bytes, then fails the body (the connection is
//!   cut mid-response).
//! - `/ws`: WebSocket echo.
//! - `/status/N`: answers status N.
//! - `/hop`: answers 200 with hop-by-hop response headers that a proxy must strip.
//!
//! Every response carries `x-upstream: fake` so tests can tell a proxied answer from one the
//! gateway made itself.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// A running fake upstream; the accept loop stops when this is dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, counter.clone()));
                    // Errors here are clients (the gateway) hanging up mid-request, which
                    // several tests do on purpose.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (counted when the request head arrives).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived, or panics after `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.requests() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream saw {} requests, expected {n} within {timeout:?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address where nothing listens (bound, then released), for 502 tests.
pub fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap()
}

/// The deterministic content of `/big?bytes=N`: byte `i` is `i % 251` (a prime, so chunk
/// boundaries never line up with the pattern and a dropped or repeated chunk changes the hash).
pub fn pattern_bytes(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-upstream", "fake")
        .body(full(v.to_string()))
        .unwrap()
}

fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-upstream", "fake")
        .body(full(text.to_string()))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    counter: Arc<AtomicUsize>,
) -> Result<Response<Body>, Infallible> {
    counter.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let resp = if path == "/echo" || path.starts_with("/echo/") {
        echo(req).await
    } else if path == "/hash" && req.method() == Method::POST {
        hash(req).await
    } else if path == "/big" {
        let n: usize = query_param(&req, "bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        big(n)
    } else if path == "/abort" {
        let n: usize = query_param(&req, "bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        abort_after(n)
    } else if path == "/drip" {
        let chunks: usize = query_param(&req, "chunks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let ms: u64 = query_param(&req, "interval_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        drip(chunks, Duration::from_millis(ms))
    } else if path == "/slow" {
        let ms: u64 = query_param(&req, "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        text_response(StatusCode::OK, "slow done")
    } else if path == "/ws" {
        websocket(req)
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => text_response(status, &format!("status {}", status.as_u16())),
            None => text_response(StatusCode::BAD_REQUEST, "bad status"),
        }
    } else if path == "/hop" {
        Response::builder()
            .status(StatusCode::OK)
            .header("x-upstream", "fake")
            .header(header::CONNECTION, "X-Hop-Resp")
            .header("x-hop-resp", "must-not-reach-client")
            .header("keep-alive", "timeout=5, max=100")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authenticate", "Basic realm=\"upstream\"")
            .header("x-end-to-end", "kept")
            .body(full("hop"))
            .unwrap()
    } else {
        text_response(StatusCode::NOT_FOUND, "no such route on the fake upstream")
    };
    Ok(resp)
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text_response(StatusCode::BAD_REQUEST, &format!("body error: {e}")),
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }),
    )
}

async fn hash(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len();
                    hasher.update(data);
                }
            }
            Err(e) => return text_response(StatusCode::BAD_REQUEST, &format!("body error: {e}")),
        }
    }
    json_response(
        StatusCode::OK,
        serde_json::json!({ "len": len, "sha256": hex(&hasher.finalize()) }),
    )
}

fn big(total: usize) -> Response<Body> {
    const CHUNK: usize = 64 * 1024;
    let stream = futures_util::stream::unfold(0usize, move |offset| async move {
        if offset >= total {
            return None;
        }
        let n = CHUNK.min(total - offset);
        let frame = Frame::data(Bytes::from(pattern_bytes(offset, n)));
        Some((Ok::<_, BoxError>(frame), offset + n))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-upstream", "fake")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn abort_after(n: usize) -> Response<Body> {
    // The error comes a little later: failing at once would let hyper drop the connection
    // before the head and data are flushed, and the gateway would (rightly) see no response.
    let stream = futures_util::stream::unfold(0u8, move |step| async move {
        match step {
            0 => Some((Ok(Frame::data(Bytes::from(pattern_bytes(0, n)))), 1)),
            1 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((
                    Err(BoxError::from("fake upstream: deliberate mid-body abort")),
                    2,
                ))
            }
            _ => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-upstream", "fake")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn drip(chunks: usize, interval: Duration) -> Response<Body> {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let frame = Frame::data(Bytes::from(format!("chunk {i}\n")));
        Some((Ok::<_, BoxError>(frame), i + 1))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-upstream", "fake")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text_response(StatusCode::BAD_REQUEST, "missing sec-websocket-key");
    };
    if !is_upgrade {
        return text_response(StatusCode::BAD_REQUEST, "missing upgrade: websocket");
    }
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(&mut req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            // Pings are answered by tungstenite itself; echo data frames only.
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header("x-upstream", "fake")
        .body(full(Bytes::new()))
        .unwrap()
}

/// Self-checks of the fake upstream, talking to it directly (no gateway), so a failing
/// proxy test can be blamed on the gateway rather than the fixture.
#[cfg(test)]
mod selftest {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fake_upstream_routes() {
        crate::common::certs::install_provider();
        let up = Upstream::start().await;
        let c = reqwest::Client::builder().no_proxy().build().unwrap();

        let v: serde_json::Value = c
            .post(format!("{}/echo/x?a=1", up.url()))
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body("hi")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/echo/x");
        assert_eq!(v["query"], "a=1");
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["body"], "hi");
        assert_eq!(v["headers"]["x-multi"], serde_json::json!(["1", "2"]));

        let body = pattern_bytes(0, 300_000);
        let v: serde_json::Value = c
            .post(format!("{}/hash", up.url()))
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["len"], 300_000);
        assert_eq!(v["sha256"], sha256_hex(&body));

        let got = c
            .get(format!("{}/big?bytes=300000", up.url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], &body[..]);

        let r = c
            .get(format!("{}/abort?bytes=1000", up.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err(), "/abort must end in a body error");

        let r = c
            .get(format!("{}/status/418", up.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 418);
        let r = c.get(format!("{}/hop", up.url())).send().await.unwrap();
        assert_eq!(r.headers()["x-hop-resp"], "must-not-reach-client");
        assert_eq!(up.requests(), 6);

        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", up.addr))
            .await
            .unwrap();
        ws.send(Message::text("ping?")).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), "ping?");
    }
}
