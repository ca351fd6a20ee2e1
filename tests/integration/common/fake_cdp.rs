//! A fake Coinbase CDP API that checks requests the way the real one would.
//!
//! It answers `POST /onramp/v1/token` on plain HTTP at `127.0.0.1:<ephemeral>` (or, started
//! with [`FakeCdp::start_tls`], over TLS with ALPN `h2` and `http/1.1` like the real API) and
//! verifies
//! every request: the bearer JWT's signature (against the public half of the [`TestKey`] it was
//! started with), every header field and claim the official SDKs send, nonce freshness, the
//! `uris` binding to its own address, and the exact JSON body shape. A request that fails a
//! check gets the google.rpc-style error the real API uses (`401 {"code":16,..}` for auth,
//! `400 {"code":3,..}` for the body) and is recorded as failed, so a test can assert
//! `fake.assert_all_verified()`.
//!
//! The server runs on its own thread and Tokio runtime, so it works from `#[test]` and from
//! any flavour of `#[tokio::test]`, and it stops when the `FakeCdp` is dropped.
//!
//! ```ignore
//! let key = TestKey::es256_sec1();
//! let fake = FakeCdp::start(&key);
//! // gateway config: [cdp] api_base = fake.api_base(); env CDP_API_KEY_ID = key.id,
//! //                 CDP_API_KEY_SECRET = key.secret_string
//! fake.set_mode(Mode::RateLimited);
//! assert_eq!(fake.requests()[0].body["clientIp"], "127.0.0.2");
//! ```

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsBigEndian, AsDer, Curve25519SeedBin};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey, VerificationAlgorithm,
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use onramp_gateway::cdp::key::KeyAlgorithm;
use serde_json::{json, Value};

use super::certs::TestPki;

/// The one route the fake serves.
pub const TOKEN_PATH: &str = "/onramp/v1/token";
/// v2 Create Onramp Session, under the `/platform` prefix the gateway is configured with
/// (`cdp.platform_base = <api_base>/platform`).
pub const SESSIONS_PATH: &str = "/platform/v2/onramp/sessions";
/// v2 Create Onramp Order (headless Apple Pay / Google Pay); `GET {ORDERS_PATH}/{id}` reads one.
pub const ORDERS_PATH: &str = "/platform/v2/onramp/orders";
/// Webhook subscriptions (create with POST, list with GET).
pub const SUBSCRIPTIONS_PATH: &str = "/platform/v2/data/webhooks/subscriptions";

/// The endpoints the fake knows, each verified like the real API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Session,
    BuyConfig,
    BuyOptions,
    BuyQuote,
    /// `GET /onramp/v1/{buy|sell}/user/{ref}/transactions`
    Transactions,
    /// `POST /platform/v2/onramp/orders`
    Order,
    /// `GET /platform/v2/onramp/orders/{orderId}`
    GetOrder,
    /// `POST /platform/v2/data/webhooks/subscriptions`
    Subscribe,
    /// `GET /platform/v2/data/webhooks/subscriptions`
    ListSubscriptions,
}

fn endpoint_of(method: &http::Method, path: &str) -> Option<Endpoint> {
    use http::Method;
    let e = match (method, path) {
        (&Method::POST, TOKEN_PATH) => Endpoint::Token,
        (&Method::POST, SESSIONS_PATH) => Endpoint::Session,
        (&Method::GET, "/onramp/v1/buy/config") => Endpoint::BuyConfig,
        (&Method::GET, "/onramp/v1/buy/options") => Endpoint::BuyOptions,
        (&Method::POST, "/onramp/v1/buy/quote") => Endpoint::BuyQuote,
        (&Method::POST, ORDERS_PATH) => Endpoint::Order,
        (&Method::POST, SUBSCRIPTIONS_PATH) => Endpoint::Subscribe,
        (&Method::GET, SUBSCRIPTIONS_PATH) => Endpoint::ListSubscriptions,
        (&Method::GET, p) if p.starts_with(ORDERS_PATH) => {
            let id = p.strip_prefix(ORDERS_PATH)?.strip_prefix('/')?;
            if id.is_empty() || id.contains('/') {
                return None;
            }
            Endpoint::GetOrder
        }
        (&Method::GET, p) => {
            let rest = p
                .strip_prefix("/onramp/v1/buy/user/")
                .or_else(|| p.strip_prefix("/onramp/v1/sell/user/"))?;
            let reference = rest.strip_suffix("/transactions")?;
            if reference.is_empty() || reference.contains('/') {
                return None;
            }
            Endpoint::Transactions
        }
        _ => return None,
    };
    Some(e)
}

/// Allowed clock skew between the gateway's `nbf`/`iat` and the fake's clock.
const CLOCK_SKEW_SECS: i64 = 5;

/// Request bodies larger than this are refused (the real body is a few hundred bytes).
const MAX_REQUEST_BODY: usize = 1 << 20;

/// Size of the body sent in [`Mode::Huge`].
pub const HUGE_BODY_BYTES: usize = 10 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Test keys
// ---------------------------------------------------------------------------------------------

/// A freshly generated CDP key for tests. Never written to the repository.
#[derive(Clone)]
pub struct TestKey {
    /// Key id (a random UUID unless changed with [`TestKey::with_id`]).
    pub id: String,
    /// The secret exactly as it goes in `CDP_API_KEY_SECRET` (PEM with real newlines, or
    /// base64 for Ed25519).
    pub secret_string: String,
    pub algorithm: KeyAlgorithm,
    /// Raw public key: the uncompressed point `04||x||y` (P-256) or 32 bytes (Ed25519).
    pub public_key: Vec<u8>,
    /// The public key as an SPKI PEM (`BEGIN PUBLIC KEY`), for external verifiers.
    pub public_key_pem: String,
    /// For `jsonwebtoken::decode`.
    pub decoding_key: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl TestKey {
    /// ECDSA P-256 key as a SEC1 PEM (`BEGIN EC PRIVATE KEY`), the form the CDP portal gives.
    pub fn es256_sec1() -> Self {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256");
        let der = pair.private_key().as_der().expect("SEC1 DER");
        Self::es256_from(&pair, pem_encode("EC PRIVATE KEY", der.as_ref()))
    }

    /// ECDSA P-256 key as a PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn es256_pkcs8() -> Self {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256");
        let der = pair.to_pkcs8v1().expect("PKCS#8 DER");
        Self::es256_from(&pair, pem_encode("PRIVATE KEY", der.as_ref()))
    }

    /// Ed25519 key as base64 of the 64 bytes seed‖public key (the CDP portal's default).
    pub fn ed25519() -> Self {
        let pair = Ed25519KeyPair::generate().expect("generate Ed25519");
        let seed = pair.seed().expect("seed");
        let seed: Curve25519SeedBin<'static> = seed.as_be_bytes().expect("seed bytes");
        let public = pair.public_key().as_ref().to_vec();
        let mut raw = seed.as_ref().to_vec();
        raw.extend_from_slice(&public);
        let spki = pair.public_key().as_der().expect("SPKI");
        TestKey {
            id: random_uuid(),
            secret_string: STANDARD.encode(raw),
            algorithm: KeyAlgorithm::EdDsa,
            decoding_key: jsonwebtoken::DecodingKey::from_ed_der(&public),
            public_key: public,
            public_key_pem: pem_encode("PUBLIC KEY", spki.as_ref()),
        }
    }

    fn es256_from(pair: &EcdsaKeyPair, secret_pem: String) -> Self {
        let public = pair.public_key().as_ref().to_vec();
        let spki = pair.public_key().as_der().expect("SPKI");
        TestKey {
            id: random_uuid(),
            secret_string: secret_pem,
            algorithm: KeyAlgorithm::Es256,
            // jsonwebtoken's "EC DER" verifying key is the uncompressed point.
            decoding_key: jsonwebtoken::DecodingKey::from_ec_der(&public),
            public_key: public,
            public_key_pem: pem_encode("PUBLIC KEY", spki.as_ref()),
        }
    }

    /// Same key under another id, e.g. a legacy `organizations/../apiKeys/..` name.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// A legacy-style id: `organizations/<uuid>/apiKeys/<uuid>`.
    pub fn legacy_id() -> String {
        format!("organizations/{}/apiKeys/{}", random_uuid(), random_uuid())
    }

    /// The secret with its newlines written as the two characters `\n`, as it often ends up in
    /// env files; the gateway must accept this too.
    pub fn secret_env_escaped(&self) -> String {
        self.secret_string.replace('\n', "\\n")
    }

    /// Environment for the gateway: `CDP_API_KEY_ID` + `CDP_API_KEY_SECRET`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CDP_API_KEY_ID".to_owned(), self.id.clone()),
            ("CDP_API_KEY_SECRET".to_owned(), self.secret_string.clone()),
        ]
    }

    /// A key file as the CDP portal downloads it today: `{"id", "privateKey"}`.
    pub fn key_file_json(&self) -> String {
        json!({ "id": self.id, "privateKey": self.secret_string }).to_string()
    }

    /// A legacy key file: `{"name", "privateKey"}`.
    pub fn legacy_key_file_json(&self) -> String {
        json!({ "name": self.id, "privateKey": self.secret_string }).to_string()
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so this never fails.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

// ---------------------------------------------------------------------------------------------
// The fake server
// ---------------------------------------------------------------------------------------------

/// How the fake answers a request that passed verification. Requests failing verification
/// always get 401/400, whatever the mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `200 {"token":"<unique>","channel_id":""}`.
    Ok,
    /// `500 {"code":13,"message":"internal error"}`.
    ServerError,
    /// `400 {"code":3,"message":"invalid address"}`.
    InvalidAddress,
    /// `429 {"code":8,"message":"rate_limit_exceeded"}`.
    RateLimited,
    /// Wait this long, then answer like [`Mode::Ok`].
    Slow(Duration),
    /// `200` with a non-JSON body.
    Garbage,
    /// `200` with a ~10 MB body streamed in chunks (no Content-Length), valid JSON whose
    /// `token` is 10 MB long: a client must cap what it reads.
    Huge,
    /// `200 {"channel_id":""}` (no token).
    NoToken,
    /// Any status and body (sent as `application/json`).
    Custom { status: u16, body: String },
    /// Close the connection without answering.
    Hangup,
    /// `200` headers and the start of a JSON body (`{"token":"`), then nothing, forever: the
    /// answer never finishes, so only the client's own deadline ends the call.
    Stall,
    /// Like [`Mode::Huge`] but with the 10 MB declared in `Content-Length` up front.
    HugeWithLength,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: http::HeaderMap,
    /// Decoded JWT header (`Value::Null` if there was no parseable JWT).
    pub jwt_header: Value,
    /// Decoded JWT claims (`Value::Null` if there was no parseable JWT).
    pub claims: Value,
    /// Request body as JSON (`Value::Null` if it was not JSON).
    pub body: Value,
    pub raw_body: Bytes,
    /// `Ok` if every check passed, else what failed.
    pub verification: Result<(), String>,
    /// HTTP status the fake answered with (0 for [`Mode::Hangup`]).
    pub status: u16,
    /// The session token answered, if any.
    pub token: Option<String>,
    pub received_at: Instant,
    /// HTTP version the request came over (`HTTP_2` only on a TLS fake, by ALPN).
    pub version: http::Version,
    /// Which endpoint it was for (`None`: an unknown route, answered 404).
    pub endpoint: Option<Endpoint>,
}

impl RecordedRequest {
    pub fn verified(&self) -> bool {
        self.verification.is_ok()
    }
}

/// What the fake verifies signatures against.
#[derive(Clone, Debug)]
struct Verifier {
    key_id: String,
    algorithm: KeyAlgorithm,
    public_key: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    mode: Option<Mode>,
    requests: Vec<RecordedRequest>,
    nonces: HashSet<String>,
    issued: u64,
    reject_private_client_ip: bool,
    /// Orders created (`orderId` → the `order` object), for `GET /orders/{id}`.
    orders: std::collections::HashMap<String, Value>,
    /// Webhook subscriptions created, as CDP stores them (with their secret).
    subscriptions: Vec<Value>,
}

struct State {
    verifier: Verifier,
    expected_uri: String,
    port: u16,
    inner: Mutex<Inner>,
    /// TCP connections accepted (TLS handshake or not).
    connections: std::sync::atomic::AtomicUsize,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not make every later assertion panic too.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake CDP API. Stops when dropped.
pub struct FakeCdp {
    addr: SocketAddr,
    /// Serving HTTPS (h2 + http/1.1 by ALPN) rather than plain HTTP/1.1.
    tls: bool,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeCdp {
    /// Start a fake that accepts JWTs signed by `key` (and only those).
    pub fn start(key: &TestKey) -> Self {
        Self::start_with(&key.id, key.algorithm, &key.public_key)
    }

    /// Start a fake verifying against an arbitrary key id, algorithm and raw public key.
    pub fn start_with(key_id: &str, algorithm: KeyAlgorithm, public_key: &[u8]) -> Self {
        Self::start_inner(key_id, algorithm, public_key, None)
    }

    /// Like [`start`](Self::start), but serving HTTPS with the leaf of `pki` (valid for
    /// `127.0.0.1`) and ALPN `h2`, `http/1.1`, as the real API does. Clients must trust
    /// `pki`'s CA (`pki.write_ca_pem()` for the gateway's `cdp.ca_file`). The JWT checks are
    /// the same: `uris` binds `127.0.0.1:<port>` + path, never the scheme.
    pub fn start_tls(key: &TestKey, pki: &TestPki) -> Self {
        Self::start_inner(
            &key.id,
            key.algorithm,
            &key.public_key,
            Some(tls_acceptor(pki)),
        )
    }

    fn start_inner(
        key_id: &str,
        algorithm: KeyAlgorithm,
        public_key: &[u8],
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake CDP");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            verifier: Verifier {
                key_id: key_id.to_owned(),
                algorithm,
                public_key: public_key.to_vec(),
            },
            expected_uri: format!("POST 127.0.0.1:{}{TOKEN_PATH}", addr.port()),
            port: addr.port(),
            inner: Mutex::new(Inner::default()),
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_state = state.clone();
        let is_tls = tls.is_some();
        let thread = std::thread::Builder::new()
            .name(format!("fake-cdp-{}", addr.port()))
            .spawn(move || serve(listener, thread_state, tls, rx))
            .expect("spawn fake CDP thread");
        FakeCdp {
            addr,
            tls: is_tls,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn api_base(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    /// Full token endpoint URL.
    pub fn token_url(&self) -> String {
        format!("{}://{}{TOKEN_PATH}", self.scheme(), self.addr)
    }

    /// TCP connections accepted so far (with TLS: including failed handshakes).
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The `uris` entry the fake requires: `POST 127.0.0.1:<port>/onramp/v1/token`.
    pub fn expected_uri(&self) -> &str {
        &self.state.expected_uri
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().mode = Some(mode);
    }

    pub fn mode(&self) -> Mode {
        self.state.lock().mode.clone().unwrap_or(Mode::Ok)
    }

    /// Refuse (400, code 3) a `clientIp` that is private/loopback, as the real API does.
    /// Off by default so tests from 127.0.0.1 work without `substitute_private_client_ip`.
    pub fn set_reject_private_client_ip(&self, on: bool) {
        self.state.lock().reject_private_client_ip = on;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().requests.len()
    }

    /// Why each failed request failed (empty when all verified).
    pub fn failures(&self) -> Vec<String> {
        self.state
            .lock()
            .requests
            .iter()
            .filter_map(|r| r.verification.clone().err())
            .collect()
    }

    /// Panics listing the failures if any request failed verification.
    #[track_caller]
    pub fn assert_all_verified(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "fake CDP rejected {} request(s): {failures:#?}",
            failures.len()
        );
    }

    /// Secrets of the webhook subscriptions created, oldest first.
    pub fn subscription_secrets(&self) -> Vec<String> {
        self.state
            .lock()
            .subscriptions
            .iter()
            .filter_map(|s| s["secret"].as_str().map(str::to_string))
            .collect()
    }

    /// Stores an order as if another user had created it (for ownership checks).
    pub fn insert_order(&self, order: Value) {
        let id = order["orderId"].as_str().unwrap_or_default().to_string();
        self.state.lock().orders.insert(id, order);
    }

    /// Session tokens handed out, oldest first.
    pub fn tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .requests
            .iter()
            .filter_map(|r| r.token.clone())
            .collect()
    }

    /// Forget recorded requests (seen nonces are kept: a replay is still a replay).
    pub fn clear(&self) {
        self.state.lock().requests.clear();
    }

    /// Wait (async) until at least `n` requests were received, or `timeout` passes.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeCdp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Returns promptly: the accept loop exits and the runtime drop cancels the
            // connection tasks (including any Slow-mode sleeps).
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("fake CDP runtime: {e}"),
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => panic!("fake CDP listener: {e}"),
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    let Ok((stream, _peer)) = accepted else { continue };
                    state
                        .connections
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let state = state.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            handle(state.clone(), req)
                        });
                        match tls {
                            // HTTPS as the real API serves it: h2 or http/1.1, by ALPN.
                            Some(acceptor) => {
                                let Ok(stream) = acceptor.accept(stream).await else {
                                    return;
                                };
                                let _ = hyper_util::server::conn::auto::Builder::new(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                            }
                            None => {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(
                                        hyper_util::rt::TokioIo::new(stream),
                                        service,
                                    )
                                    .await;
                            }
                        }
                    });
                }
            }
        }
    });
}

/// The fake's TLS side: `pki`'s leaf, ALPN `h2` then `http/1.1`.
fn tls_acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    pki.acceptor(&[b"h2", b"http/1.1"])
}

type Body = BoxBody<Bytes, Infallible>;

/// Returned by the service to make hyper drop the connection without a response.
#[derive(Debug)]
struct Hangup;

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake CDP hangup mode")
    }
}

impl std::error::Error for Hangup {}

fn json_response(status: u16, body: Value) -> Response<Body> {
    raw_response(status, "application/json", Bytes::from(body.to_string()))
}

fn raw_response(status: u16, content_type: &str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// The v2 error shape: `{errorType, errorMessage, correlationId}`.
fn v2_error(status: u16, _code: i32, message: &str) -> Response<Body> {
    let error_type = match status {
        400 => "invalid_request",
        401 => "unauthorized",
        429 => "rate_limit_exceeded",
        _ => "internal_server_error",
    };
    json_response(
        status,
        json!({
            "errorType": error_type,
            "errorMessage": message,
            "correlationId": format!("fake-corr-{}", hex(&random_bytes::<4>())),
        }),
    )
}

/// Request checks of the non-token endpoints, in the real casing: v2 camelCase,
/// v1 snake_case; query parameters as documented.
fn check_other(
    e: Endpoint,
    headers: &http::HeaderMap,
    query: Option<&str>,
    raw: &[u8],
) -> Result<(), String> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let json_body = || -> Result<serde_json::Map<String, Value>, String> {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(format!("Content-Type is {ct:?}, expected application/json"));
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("body is not a JSON object".into()),
        }
    };
    let only = |m: &serde_json::Map<String, Value>, allowed: &[&str], required: &[&str]| {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(format!("unexpected body field {k:?}"));
            }
            if !m[k].is_string() {
                return Err(format!("body field {k:?} is not a string"));
            }
        }
        for r in required {
            if m.get(*r).and_then(Value::as_str).is_none_or(str::is_empty) {
                return Err(format!("missing required field {r:?}"));
            }
        }
        Ok(())
    };
    match e {
        Endpoint::Token => Ok(()),
        Endpoint::Order => {
            let m = json_body()?;
            only(
                &m,
                &[
                    "paymentAmount",
                    "purchaseAmount",
                    "paymentCurrency",
                    "purchaseCurrency",
                    "paymentMethod",
                    "destinationAddress",
                    "destinationNetwork",
                    "partnerUserRef",
                    "partnerOrderRef",
                    "email",
                    "phoneNumber",
                    "phoneNumberVerifiedAt",
                    "agreementAcceptedAt",
                    "clientIp",
                    "domain",
                ],
                &[
                    "paymentCurrency",
                    "purchaseCurrency",
                    "paymentMethod",
                    "destinationAddress",
                    "destinationNetwork",
                    "partnerUserRef",
                ],
            )?;
            if m.contains_key("paymentAmount") == m.contains_key("purchaseAmount") {
                return Err("exactly one of paymentAmount and purchaseAmount".into());
            }
            if !matches!(
                m["paymentMethod"].as_str(),
                Some("GUEST_CHECKOUT_APPLE_PAY" | "GUEST_CHECKOUT_GOOGLE_PAY")
            ) {
                return Err(format!(
                    "paymentMethod {} is not a guest checkout method",
                    m["paymentMethod"]
                ));
            }
            // Headless mode: the contact data and its verification are enforced.
            if m.contains_key("email") || m.contains_key("phoneNumber") {
                for r in [
                    "email",
                    "phoneNumber",
                    "phoneNumberVerifiedAt",
                    "agreementAcceptedAt",
                ] {
                    if !m.contains_key(r) {
                        return Err(format!("headless order without {r}"));
                    }
                }
            }
            Ok(())
        }
        Endpoint::Subscribe => {
            let m = json_body()?;
            for k in m.keys() {
                if ![
                    "description",
                    "eventTypes",
                    "target",
                    "labels",
                    "metadata",
                    "isEnabled",
                ]
                .contains(&k.as_str())
                {
                    return Err(format!("unexpected body field {k:?}"));
                }
            }
            let events = m
                .get("eventTypes")
                .and_then(Value::as_array)
                .ok_or("eventTypes must be an array")?;
            if events.is_empty() || !events.iter().all(Value::is_string) {
                return Err("eventTypes must be a non-empty array of strings".into());
            }
            if m.get("target")
                .and_then(|t| t.get("url"))
                .and_then(Value::as_str)
                .is_none()
            {
                return Err("target.url is required".into());
            }
            if !m.get("isEnabled").is_some_and(Value::is_boolean) {
                return Err("isEnabled must be a boolean".into());
            }
            Ok(())
        }
        Endpoint::GetOrder | Endpoint::ListSubscriptions => {
            if !raw.is_empty() {
                return Err("a GET carries no body".into());
            }
            let allowed: &[&str] = if e == Endpoint::GetOrder {
                &[]
            } else {
                &["pageSize", "pageToken"]
            };
            for (k, _) in &params {
                if !allowed.contains(&k.as_str()) {
                    return Err(format!("unexpected query parameter {k:?}"));
                }
            }
            Ok(())
        }
        Endpoint::Session => {
            let m = json_body()?;
            only(
                &m,
                &[
                    "destinationAddress",
                    "destinationNetwork",
                    "purchaseCurrency",
                    "paymentAmount",
                    "purchaseAmount",
                    "paymentCurrency",
                    "paymentMethod",
                    "country",
                    "subdivision",
                    "redirectUrl",
                    "clientIp",
                    "partnerUserRef",
                ],
                &[
                    "destinationAddress",
                    "destinationNetwork",
                    "purchaseCurrency",
                ],
            )?;
            if m.contains_key("paymentAmount") && m.contains_key("purchaseAmount") {
                return Err("Providing both paymentAmount and purchaseAmount".into());
            }
            Ok(())
        }
        Endpoint::BuyQuote => {
            let m = json_body()?;
            only(
                &m,
                &[
                    "purchase_currency",
                    "purchase_network",
                    "payment_amount",
                    "payment_currency",
                    "payment_method",
                    "country",
                    "subdivision",
                    "destination_address",
                ],
                &[
                    "purchase_currency",
                    "payment_amount",
                    "payment_currency",
                    "payment_method",
                    "country",
                ],
            )
        }
        Endpoint::BuyConfig | Endpoint::BuyOptions | Endpoint::Transactions => {
            if !raw.is_empty() {
                return Err("a GET carries no body".into());
            }
            let allowed: &[&str] = match e {
                Endpoint::BuyConfig => &[],
                Endpoint::BuyOptions => &["country", "subdivision", "networks"],
                _ => &["page_key", "page_size"],
            };
            for (k, _) in &params {
                if !allowed.contains(&k.as_str()) {
                    return Err(format!("unexpected query parameter {k:?}"));
                }
            }
            if e == Endpoint::BuyOptions
                && !params.iter().any(|(k, v)| k == "country" && !v.is_empty())
            {
                return Err("country is required".into());
            }
            Ok(())
        }
    }
}

/// Answers of the non-token endpoints in the real casing (v1 snake_case with one field
/// the gateway has never heard of, to prove it is passed through; v2 camelCase).
fn answer_other(e: Option<Endpoint>, body: &Value, path: &str, token: &str) -> (u16, Value) {
    match e {
        Some(Endpoint::Session) => {
            let mut answer = json!({
                "session": {"onrampUrl": format!("https://pay.coinbase.com/buy?sessionToken={token}")}
            });
            if body.get("paymentMethod").is_some() && body.get("country").is_some() {
                answer["quote"] = json!({
                    "paymentTotal": "101.50", "paymentSubtotal": "100.00",
                    "paymentCurrency": body.get("paymentCurrency").cloned().unwrap_or(json!("USD")),
                    "purchaseAmount": "99.8", "purchaseCurrency": body["purchaseCurrency"],
                    "destinationNetwork": body["destinationNetwork"],
                    "fees": [{"type": "FEE_TYPE_NETWORK", "amount": "0.01", "currency": "USD"}],
                    "exchangeRate": "1.0",
                });
            }
            (201, answer)
        }
        Some(Endpoint::BuyConfig) => (
            200,
            json!({"countries": [{"id": "US", "subdivisions": ["NY", "CA"],
                "payment_methods": [{"id": "CARD"}, {"id": "ACH_BANK_ACCOUNT"}]}]}),
        ),
        Some(Endpoint::BuyOptions) => (
            200,
            json!({
                "payment_currencies": [{"id": "USD", "limits": [
                    {"id": "CARD", "min": "1.00", "max": "500.00"},
                    {"id": "ACH_BANK_ACCOUNT", "min": "1.00", "max": "25000.00"}]}],
                "purchase_currencies": [{"id": "2b92315d-eab7-5bef-84fa-089a131333f5",
                    "name": "USD Coin", "symbol": "USDC", "icon_url": "https://example.invalid/usdc.png",
                    "networks": [{"name": "base", "display_name": "Base", "chain_id": "8453",
                        "contract_address": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
                        "icon_url": "https://example.invalid/base.png"}]}],
                "brand_new_field": {"nested_value": 1},
            }),
        ),
        Some(Endpoint::BuyQuote) => {
            let amount = |v: &str, c: &Value| json!({"value": v, "currency": c});
            let fiat = body
                .get("payment_currency")
                .cloned()
                .unwrap_or(json!("USD"));
            let crypto = body
                .get("purchase_currency")
                .cloned()
                .unwrap_or(json!("USDC"));
            let mut q = json!({
                "payment_total": amount("101.50", &fiat),
                "payment_subtotal": amount("100.00", &fiat),
                "purchase_amount": amount("99.80", &crypto),
                "coinbase_fee": amount("1.49", &fiat),
                "network_fee": amount("0.01", &fiat),
                "quote_id": format!("quote-{}", hex(&random_bytes::<4>())),
            });
            if body.get("destination_address").is_some() {
                q["onramp_url"] = json!(format!(
                    "https://pay.coinbase.com/buy?sessionToken={token}&quoteId={}",
                    q["quote_id"].as_str().unwrap_or("")
                ));
            }
            (200, q)
        }
        Some(Endpoint::Transactions) => {
            let reference = path.split('/').rev().nth(1).unwrap_or_default().to_string();
            (
                200,
                json!({"transactions": [{"status": "ONRAMP_TRANSACTION_STATUS_SUCCESS",
                    "partner_user_ref": reference, "tx_hash": "0xabc",
                    "purchase_amount": {"value": "10", "currency": "USDC"}}],
                    "next_page_key": "", "total_count": "1"}),
            )
        }
        Some(
            Endpoint::Token
            | Endpoint::Order
            | Endpoint::GetOrder
            | Endpoint::Subscribe
            | Endpoint::ListSubscriptions,
        )
        | None => (404, json!({})),
    }
}

/// Answers of the endpoints that remember what they created (orders, subscriptions).
fn answer_stateful(
    inner: &mut Inner,
    e: Option<Endpoint>,
    body: &Value,
    path: &str,
    token: &str,
) -> Option<(u16, Value)> {
    match e? {
        Endpoint::Order => {
            let apple = body["paymentMethod"] == "GUEST_CHECKOUT_APPLE_PAY";
            let id = random_uuid();
            let order = json!({
                "orderId": id,
                "paymentTotal": "101.50", "paymentSubtotal": "100.00",
                "paymentCurrency": body["paymentCurrency"], "paymentMethod": body["paymentMethod"],
                "purchaseAmount": body.get("purchaseAmount").cloned().unwrap_or(json!("99.8")),
                "purchaseCurrency": body["purchaseCurrency"],
                "fees": [{"feeType": "FEE_TYPE_NETWORK", "feeAmount": "0.01", "feeCurrency": "USD"}],
                "exchangeRate": "1.0",
                "destinationAddress": body["destinationAddress"],
                "destinationNetwork": body["destinationNetwork"],
                "status": "ONRAMP_ORDER_STATUS_PENDING_PAYMENT",
                "createdAt": "2026-12-01T21:00:00Z", "updatedAt": "2026-12-01T21:00:00Z",
                "partnerUserRef": body["partnerUserRef"],
            });
            inner.orders.insert(id, order.clone());
            let (kind, link_type) = if apple {
                ("apple-pay", "PAYMENT_LINK_TYPE_APPLE_PAY_BUTTON")
            } else {
                ("google-pay", "PAYMENT_LINK_TYPE_GOOGLE_PAY_BUTTON")
            };
            Some((
                201,
                json!({"order": order, "paymentLink": {
                    "url": format!("https://pay.coinbase.com/v2/api-onramp/{kind}?sessionToken={token}"),
                    "paymentLinkType": link_type}}),
            ))
        }
        Endpoint::GetOrder => {
            let id = path.rsplit('/').next().unwrap_or_default();
            Some(match inner.orders.get(id) {
                Some(order) => (200, json!({"order": order})),
                None => (
                    404,
                    json!({"errorType": "not_found", "errorMessage": "Order not found"}),
                ),
            })
        }
        Endpoint::Subscribe => {
            let sub = json!({
                "subscriptionId": random_uuid(),
                "eventTypes": body["eventTypes"],
                "isEnabled": body["isEnabled"],
                "secret": random_uuid(),
                "target": body["target"],
                "description": body.get("description").cloned().unwrap_or(Value::Null),
                "createdAt": "2026-12-01T21:00:00Z",
            });
            inner.subscriptions.push(sub.clone());
            Some((201, sub))
        }
        // The stored form, secret included: the CLI must not print it.
        Endpoint::ListSubscriptions => Some((
            200,
            json!({"subscriptions": inner.subscriptions, "nextPageToken": ""}),
        )),
        _ => None,
    }
}

fn rpc_error(status: u16, code: i32, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({ "code": code, "message": message, "details": [] }),
    )
}

fn huge_response() -> Response<Body> {
    // One shared 64 KiB chunk sent ~160 times: 10 MB on the wire, 64 KiB in memory.
    let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
    let n = HUGE_BODY_BYTES / chunk.len();
    let frames = std::iter::once(Bytes::from_static(b"{\"token\":\""))
        .chain(std::iter::repeat_n(chunk, n))
        .chain(std::iter::once(Bytes::from_static(
            b"\",\"channel_id\":\"\"}",
        )))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Bytes [`huge_response`] sends in all.
fn huge_response_len() -> usize {
    let chunk = 64 * 1024;
    b"{\"token\":\"".len() + (HUGE_BODY_BYTES / chunk) * chunk + b"\",\"channel_id\":\"\"}".len()
}

/// [`Mode::Stall`]: the first bytes of a token answer, then a body that never ends.
fn stalled_response() -> Response<Body> {
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
        Bytes::from_static(b"{\"token\":\""),
    ))])
    .chain(futures_util::stream::pending());
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Hangup> {
    let received_at = Instant::now();
    let (parts, body) = req.into_parts();
    let method = parts.method.to_string();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let raw_body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body_json: Value = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);

    let endpoint = endpoint_of(&parts.method, parts.uri.path());
    // The real API signs host + path only: a query in `uris` is refused.
    let expected_uri = format!(
        "{} 127.0.0.1:{}{}",
        parts.method,
        state.port,
        parts.uri.path()
    );
    let (jwt_header, claims, auth_result) = check_auth(&state, &parts.headers, &expected_uri);
    let reject_private = state.lock().reject_private_client_ip;
    let v2 = matches!(
        endpoint,
        Some(
            Endpoint::Session
                | Endpoint::Order
                | Endpoint::GetOrder
                | Endpoint::Subscribe
                | Endpoint::ListSubscriptions
        )
    );

    // Checks in the order the real API would apply them: route, then auth, then body.
    let failure: Option<(u16, i32, String)> = match endpoint {
        None => Some((
            404,
            5,
            format!("no route for {method} {}", parts.uri.path()),
        )),
        Some(_) if auth_result.is_err() => {
            Some((401, 16, auth_result.clone().err().unwrap_or_default()))
        }
        Some(Endpoint::Token) => check_body(&parts.headers, &raw_body, reject_private)
            .err()
            .map(|e| (400, 3, e)),
        Some(e) => check_other(e, &parts.headers, parts.uri.query(), &raw_body)
            .err()
            .map(|m| (400, 3, m)),
    };

    let (response, delay) = {
        let mut inner = state.lock();
        // Nonce freshness is judged after signature verification, so that only genuine tokens
        // consume a nonce, and under the same lock as the recording so concurrent replays race
        // deterministically.
        let mut failure = failure;
        if failure.is_none() {
            if let Some(nonce) = jwt_header.get("nonce").and_then(Value::as_str) {
                if !inner.nonces.insert(nonce.to_owned()) {
                    failure = Some((401, 16, "JWT nonce was already used (replay)".to_owned()));
                }
            }
        }
        let mode = inner.mode.clone().unwrap_or(Mode::Ok);
        let mut token = None;
        let error = |status: u16, code: i32, msg: &str| {
            if v2 {
                v2_error(status, code, msg)
            } else {
                rpc_error(status, code, msg)
            }
        };
        let (status, response): (u16, Option<Response<Body>>) = match &failure {
            Some((status, code, msg)) => (*status, Some(error(*status, *code, msg))),
            None => match &mode {
                Mode::Ok | Mode::Slow(_) if endpoint != Some(Endpoint::Token) => {
                    inner.issued += 1;
                    let t = format!(
                        "fake-session-token-{}-{}",
                        inner.issued,
                        hex(&random_bytes::<8>())
                    );
                    let (status, body) =
                        answer_stateful(&mut inner, endpoint, &body_json, parts.uri.path(), &t)
                            .unwrap_or_else(|| {
                                answer_other(endpoint, &body_json, parts.uri.path(), &t)
                            });
                    if matches!(endpoint, Some(Endpoint::Session | Endpoint::Order))
                        || body.get("onramp_url").is_some()
                    {
                        token = Some(t);
                    }
                    (status, Some(json_response(status, body)))
                }
                Mode::Ok | Mode::Slow(_) => {
                    inner.issued += 1;
                    let t = format!(
                        "fake-session-token-{}-{}",
                        inner.issued,
                        hex(&random_bytes::<8>())
                    );
                    token = Some(t.clone());
                    (
                        200,
                        Some(json_response(200, json!({ "token": t, "channel_id": "" }))),
                    )
                }
                Mode::ServerError => (500, Some(error(500, 13, "internal error"))),
                Mode::InvalidAddress => (400, Some(error(400, 3, "invalid address"))),
                Mode::RateLimited => (429, Some(error(429, 8, "rate_limit_exceeded"))),
                Mode::Garbage => (
                    200,
                    Some(raw_response(
                        200,
                        "text/html",
                        Bytes::from_static(b"<html>upstream oops</html>"),
                    )),
                ),
                Mode::Huge => (200, Some(huge_response())),
                Mode::NoToken => (200, Some(json_response(200, json!({ "channel_id": "" })))),
                Mode::Custom { status, body } => (
                    *status,
                    Some(raw_response(
                        *status,
                        "application/json",
                        Bytes::from(body.clone()),
                    )),
                ),
                Mode::Hangup => (0, None),
                Mode::Stall => (200, Some(stalled_response())),
                Mode::HugeWithLength => {
                    let mut resp = huge_response();
                    let len = huge_response_len().to_string();
                    resp.headers_mut().insert(
                        http::header::CONTENT_LENGTH,
                        http::HeaderValue::from_str(&len).expect("digits"),
                    );
                    (200, Some(resp))
                }
            },
        };
        let delay = match (&failure, &mode) {
            (None, Mode::Slow(d)) => Some(*d),
            _ => None,
        };
        inner.requests.push(RecordedRequest {
            method,
            path,
            headers: parts.headers,
            jwt_header,
            claims,
            body: body_json,
            raw_body,
            verification: match failure {
                Some((_, _, msg)) => Err(msg),
                None => Ok(()),
            },
            status,
            token,
            received_at,
            version: parts.version,
            endpoint,
        });
        (response, delay)
    };

    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response.ok_or(Hangup)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn decode_json_part(part: &str, what: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("JWT {what} is not unpadded base64url"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| format!("JWT {what} is not JSON"))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(format!("JWT {what} is not a JSON object"))
    }
}

/// Returns (header, claims, verdict). Header/claims are `Null` when the JWT could not be split
/// and decoded; they are returned even when a later check fails, for test assertions.
fn check_auth(
    state: &State,
    headers: &http::HeaderMap,
    expected_uri: &str,
) -> (Value, Value, Result<(), String>) {
    let mut header = Value::Null;
    let mut claims = Value::Null;
    let verdict = (|| {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .ok_or("missing Authorization header")?
            .to_str()
            .map_err(|_| "Authorization header is not ASCII")?;
        let jwt = auth
            .strip_prefix("Bearer ")
            .ok_or("Authorization is not `Bearer <jwt>`")?;
        let mut parts = jwt.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("bearer token is not a three-part JWS".to_owned());
        };
        header = decode_json_part(h, "header")?;
        claims = decode_json_part(c, "claims")?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| "JWT signature is not unpadded base64url")?;

        check_header(&state.verifier, &header)?;

        let alg: &dyn VerificationAlgorithm = match state.verifier.algorithm {
            KeyAlgorithm::Es256 => &ECDSA_P256_SHA256_FIXED,
            KeyAlgorithm::EdDsa => &ED25519,
        };
        let signing_input = &jwt[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(alg, &state.verifier.public_key)
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| "JWT signature does not verify with the key's public key")?;

        check_claims(expected_uri, &header, &claims)
    })();
    (header, claims, verdict)
}

fn check_header(verifier: &Verifier, header: &Value) -> Result<(), String> {
    let obj = header.as_object().ok_or("JWT header is not an object")?;
    let mut names: Vec<&str> = obj.keys().map(String::as_str).collect();
    names.sort_unstable();
    if names != ["alg", "kid", "nonce", "typ"] {
        return Err(format!(
            "JWT header fields are {names:?}, expected exactly [alg, kid, nonce, typ]"
        ));
    }
    let want_alg = verifier.algorithm.to_string();
    if obj["alg"] != want_alg.as_str() {
        return Err(format!(
            "JWT header alg is {}, expected {want_alg}",
            obj["alg"]
        ));
    }
    if obj["kid"] != verifier.key_id.as_str() {
        return Err(format!(
            "JWT header kid is {}, expected {:?}",
            obj["kid"], verifier.key_id
        ));
    }
    if obj["typ"] != "JWT" {
        return Err(format!(
            "JWT header typ is {}, expected \"JWT\"",
            obj["typ"]
        ));
    }
    let nonce = obj["nonce"]
        .as_str()
        .ok_or("JWT header nonce is not a string")?;
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "JWT header nonce {nonce:?} is not 32 hex characters"
        ));
    }
    Ok(())
}

fn check_claims(expected_uri: &str, header: &Value, claims: &Value) -> Result<(), String> {
    let obj = claims.as_object().ok_or("JWT claims are not an object")?;
    let mut names: Vec<&str> = obj.keys().map(String::as_str).collect();
    names.sort_unstable();
    if names != ["exp", "iat", "iss", "nbf", "sub", "uris"] {
        return Err(format!(
            "JWT claims are {names:?}, expected exactly [exp, iat, iss, nbf, sub, uris]"
        ));
    }
    if obj["iss"] != "cdp" {
        return Err(format!("JWT iss is {}, expected \"cdp\"", obj["iss"]));
    }
    if obj["sub"] != header["kid"] {
        return Err(format!(
            "JWT sub {} differs from kid {}",
            obj["sub"], header["kid"]
        ));
    }
    let int = |name: &str| {
        obj[name]
            .as_i64()
            .ok_or_else(|| format!("JWT {name} is not an integer"))
    };
    let (nbf, iat, exp) = (int("nbf")?, int("iat")?, int("exp")?);
    let now = unix_now();
    for (name, v) in [("nbf", nbf), ("iat", iat)] {
        if (v - now).abs() > CLOCK_SKEW_SECS {
            return Err(format!(
                "JWT {name} = {v} is more than {CLOCK_SKEW_SECS}s from now ({now})"
            ));
        }
    }
    if exp != nbf + 120 {
        return Err(format!("JWT exp - nbf = {}, expected 120", exp - nbf));
    }
    if obj["uris"] != json!([expected_uri]) {
        return Err(format!(
            "JWT uris is {}, expected [{expected_uri:?}]",
            obj["uris"]
        ));
    }
    Ok(())
}

fn check_body(headers: &http::HeaderMap, raw: &[u8], reject_private: bool) -> Result<(), String> {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = ct.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Err(format!("Content-Type is {ct:?}, expected application/json"));
    }
    let body: Value = serde_json::from_slice(raw).map_err(|e| format!("body is not JSON: {e}"))?;
    let obj = body.as_object().ok_or("body is not a JSON object")?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "addresses" | "assets" | "clientIp") {
            return Err(format!("unexpected body field {k:?}"));
        }
    }

    let addresses = obj
        .get("addresses")
        .ok_or("body lacks `addresses`")?
        .as_array()
        .ok_or("`addresses` is not an array")?;
    if addresses.is_empty() {
        return Err("`addresses` is empty".to_owned());
    }
    for (i, entry) in addresses.iter().enumerate() {
        let e = entry
            .as_object()
            .ok_or_else(|| format!("addresses[{i}] is not an object"))?;
        let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
        keys.sort_unstable();
        if keys != ["address", "blockchains"] {
            return Err(format!(
                "addresses[{i}] fields are {keys:?}, expected exactly [address, blockchains]"
            ));
        }
        if e["address"].as_str().is_none_or(str::is_empty) {
            return Err(format!("addresses[{i}].address is not a non-empty string"));
        }
        non_empty_string_array(&e["blockchains"], &format!("addresses[{i}].blockchains"))?;
    }

    if let Some(assets) = obj.get("assets") {
        // The contract says: omitted when empty, so `[]` is a (small) bug too.
        non_empty_string_array(assets, "assets")?;
    }

    let ip = obj
        .get("clientIp")
        .ok_or("body lacks `clientIp`")?
        .as_str()
        .ok_or("`clientIp` is not a string")?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("`clientIp` {ip:?} is not an IP address"))?;
    if reject_private && !is_public(ip) {
        return Err(format!("clientIp {ip} is a private address"));
    }
    Ok(())
}

fn non_empty_string_array(v: &Value, what: &str) -> Result<(), String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("`{what}` is not an array"))?;
    if arr.is_empty() {
        return Err(format!("`{what}` is empty"));
    }
    if !arr
        .iter()
        .all(|x| x.as_str().is_some_and(|s| !s.is_empty()))
    {
        return Err(format!(
            "`{what}` has an element that is not a non-empty string"
        ));
    }
    Ok(())
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let seg0 = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (seg0 & 0xfe00) == 0xfc00
                || (seg0 & 0xffc0) == 0xfe80)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Self-tests: the fake must accept what the crate's JWT code produces and refuse deviations,
// otherwise gateway tests built on it prove nothing.
// ---------------------------------------------------------------------------------------------
#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use onramp_gateway::cdp::jwt::{build_jwt, unix_now};
    use onramp_gateway::cdp::key::CdpKey;

    fn good_body() -> Value {
        json!({
            "addresses": [{"address": "0x1111111111111111111111111111111111111111",
                           "blockchains": ["base", "ethereum"]}],
            "assets": ["USDC"],
            "clientIp": "127.0.0.2",
        })
    }

    fn jwt_for(key: &TestKey, url: &str) -> String {
        let cdp = CdpKey::from_parts(&key.id, &key.secret_string).unwrap();
        build_jwt(&cdp, "POST", &url::Url::parse(url).unwrap(), unix_now()).unwrap()
    }

    struct Answer {
        status: u16,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }
    }

    async fn send(
        fake: &FakeCdp,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", fake.api_base()))
            .header("content-type", content_type);
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer { status, body })
    }

    async fn post_token(fake: &FakeCdp, jwt: &str, body: &Value) -> Answer {
        send(
            fake,
            "POST",
            TOKEN_PATH,
            Some(jwt),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn accepts_crate_jwts_for_every_key_form() {
        for key in [
            TestKey::es256_sec1(),
            TestKey::es256_pkcs8(),
            TestKey::ed25519(),
        ] {
            let fake = FakeCdp::start(&key);
            let jwt = jwt_for(&key, &fake.token_url());
            let a = post_token(&fake, &jwt, &good_body()).await;
            assert_eq!(a.status, 200, "{key:?}: {:?}", fake.failures());
            let token = a.json()["token"].as_str().unwrap().to_owned();
            assert_eq!(a.json()["channel_id"], "");
            fake.assert_all_verified();
            let r = &fake.requests()[0];
            assert_eq!(r.body["clientIp"], "127.0.0.2");
            assert_eq!(r.jwt_header["kid"], key.id.as_str());
            assert_eq!(r.claims["uris"][0], fake.expected_uri());
            assert_eq!(r.token.as_deref(), Some(token.as_str()));
            assert_eq!(fake.tokens(), vec![token]);
        }
    }

    #[tokio::test]
    async fn tokens_are_unique_and_legacy_ids_work() {
        let key = TestKey::ed25519().with_id(TestKey::legacy_id());
        let fake = FakeCdp::start(&key);
        let mut body = good_body();
        body.as_object_mut().unwrap().remove("assets");
        for _ in 0..3 {
            let a = post_token(&fake, &jwt_for(&key, &fake.token_url()), &body).await;
            assert_eq!(a.status, 200, "{:?}", fake.failures());
        }
        let t: HashSet<String> = fake.tokens().into_iter().collect();
        assert_eq!(t.len(), 3);
        assert_eq!(fake.count(), 3);
    }

    #[tokio::test]
    async fn rejects_bad_auth() {
        let key = TestKey::es256_sec1();
        let fake = FakeCdp::start(&key);
        let url = fake.token_url();

        // Replay of an accepted JWT.
        let jwt = jwt_for(&key, &url);
        assert_eq!(post_token(&fake, &jwt, &good_body()).await.status, 200);
        let a = post_token(&fake, &jwt, &good_body()).await;
        assert_eq!((a.status, a.json()["code"].clone()), (401, json!(16)));
        assert!(
            fake.failures()[0].contains("replay"),
            "{:?}",
            fake.failures()
        );

        let cases: Vec<(String, &str)> = vec![
            // Signed by another key with the right id.
            (
                jwt_for(&TestKey::es256_sec1().with_id(key.id.clone()), &url),
                "signature",
            ),
            // Another algorithm altogether.
            (
                jwt_for(&TestKey::ed25519().with_id(key.id.clone()), &url),
                "alg",
            ),
            // Right key, wrong id.
            (jwt_for(&key.clone().with_id("someone-else"), &url), "kid"),
            // Bound to the production host instead of the fake's address.
            (
                jwt_for(&key, "https://api.developer.coinbase.com/onramp/v1/token"),
                "uris",
            ),
            ("not-a-jwt".to_owned(), "three-part"),
        ];
        for (jwt, why) in cases {
            fake.clear();
            let a = post_token(&fake, &jwt, &good_body()).await;
            assert_eq!(a.status, 401, "{why}");
            let f = fake.failures();
            assert!(f.len() == 1 && f[0].contains(why), "{why}: {f:?}");
        }

        fake.clear();
        let a = send(
            &fake,
            "POST",
            TOKEN_PATH,
            None,
            "application/json",
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 401);
        assert!(fake.failures()[0].contains("Authorization"));
    }

    #[tokio::test]
    async fn rejects_stale_or_tampered_claims() {
        let key = TestKey::ed25519();
        let fake = FakeCdp::start(&key);
        let cdp = CdpKey::from_parts(&key.id, &key.secret_string).unwrap();
        let url = url::Url::parse(&fake.token_url()).unwrap();
        let stale = build_jwt(&cdp, "POST", &url, unix_now() - 60).unwrap();
        let a = post_token(&fake, &stale, &good_body()).await;
        assert_eq!(a.status, 401);
        assert!(fake.failures()[0].contains("nbf"), "{:?}", fake.failures());

        // Swap in different claims but keep the signature: must fail the signature check.
        fake.clear();
        let good = build_jwt(&cdp, "POST", &url, unix_now()).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            json!({"sub": key.id, "iss": "cdp", "nbf": unix_now(), "iat": unix_now(),
                   "exp": unix_now() + 9999, "uris": [fake.expected_uri()]})
            .to_string(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        let a = post_token(&fake, &forged, &good_body()).await;
        assert_eq!(a.status, 401);
        assert!(
            fake.failures()[0].contains("signature"),
            "{:?}",
            fake.failures()
        );
    }

    #[tokio::test]
    async fn rejects_bad_bodies() {
        let key = TestKey::ed25519();
        let fake = FakeCdp::start(&key);
        let addr = json!([{"address": "0xabc", "blockchains": ["base"]}]);
        let cases = vec![
            (
                json!({"addresses": addr, "clientIp": "1.2.3.4", "extra": 1}),
                "unexpected body field",
            ),
            (
                json!({"addresses": addr, "assets": [], "clientIp": "1.2.3.4"}),
                "`assets` is empty",
            ),
            (json!({"addresses": addr}), "clientIp"),
            (json!({"addresses": addr, "clientIp": "nope"}), "not an IP"),
            (
                json!({"addresses": [], "clientIp": "1.2.3.4"}),
                "`addresses` is empty",
            ),
            (json!({"clientIp": "1.2.3.4"}), "lacks `addresses`"),
            (
                json!({"addresses": [{"address": "0xabc", "blockchains": []}], "clientIp": "1.2.3.4"}),
                "blockchains",
            ),
            (
                json!({"addresses": [{"address": "0xabc", "blockchains": ["base"], "assets": ["X"]}],
                       "clientIp": "1.2.3.4"}),
                "expected exactly [address, blockchains]",
            ),
            (json!([1, 2]), "not a JSON object"),
        ];
        for (body, why) in cases {
            fake.clear();
            let a = post_token(&fake, &jwt_for(&key, &fake.token_url()), &body).await;
            assert_eq!(
                (a.status, a.json()["code"].clone()),
                (400, json!(3)),
                "{why}"
            );
            let f = fake.failures();
            assert!(f.len() == 1 && f[0].contains(why), "{why}: {f:?}");
            assert_eq!(fake.requests()[0].body, body);
        }

        fake.clear();
        let jwt = jwt_for(&key, &fake.token_url());
        let a = send(
            &fake,
            "POST",
            TOKEN_PATH,
            Some(&jwt),
            "text/plain",
            good_body().to_string().into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 400);
        assert!(fake.failures()[0].contains("Content-Type"));

        fake.clear();
        fake.set_reject_private_client_ip(true);
        let a = post_token(&fake, &jwt_for(&key, &fake.token_url()), &good_body()).await;
        assert_eq!(a.status, 400);
        let mut public = good_body();
        public["clientIp"] = json!("192.0.2.1");
        let a = post_token(&fake, &jwt_for(&key, &fake.token_url()), &public).await;
        assert_eq!(a.status, 200);
    }

    #[tokio::test]
    async fn other_routes_are_404() {
        let key = TestKey::ed25519();
        let fake = FakeCdp::start(&key);
        let jwt = jwt_for(&key, &fake.token_url());
        let a = send(
            &fake,
            "POST",
            "/onramp/v1/other",
            Some(&jwt),
            "application/json",
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 404);
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        // Routes are method + path, as in the real API: GET on the token path is unknown.
        let resp = client.get(fake.token_url().parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(fake.count(), 2);
        assert_eq!(fake.failures().len(), 2);
    }

    /// The two modes the fault tests added: a declared 10 MB body, and one that never ends.
    #[tokio::test]
    async fn huge_with_length_and_stall_modes() {
        let key = TestKey::es256_pkcs8();
        let fake = FakeCdp::start(&key);
        fake.set_mode(Mode::HugeWithLength);
        let a = post_token(&fake, &jwt_for(&key, &fake.token_url()), &good_body()).await;
        assert_eq!((a.status, a.body.len()), (200, huge_response_len()));
        assert_eq!(a.json()["token"].as_str().unwrap().len(), HUGE_BODY_BYTES);

        fake.set_mode(Mode::Stall);
        let stalled = tokio::time::timeout(
            Duration::from_millis(300),
            post_token(&fake, &jwt_for(&key, &fake.token_url()), &good_body()),
        )
        .await;
        assert!(stalled.is_err(), "a stalled answer must not complete");
        assert_eq!(fake.requests().last().unwrap().status, 200);
        fake.assert_all_verified();
    }

    #[tokio::test]
    async fn modes() {
        let key = TestKey::es256_pkcs8();
        let fake = FakeCdp::start(&key);
        let go =
            || async { post_token(&fake, &jwt_for(&key, &fake.token_url()), &good_body()).await };

        fake.set_mode(Mode::ServerError);
        assert_eq!(go().await.status, 500);
        fake.set_mode(Mode::InvalidAddress);
        let a = go().await;
        assert_eq!(
            (a.status, a.json()),
            (
                400,
                json!({"code": 3, "message": "invalid address", "details": []})
            )
        );
        fake.set_mode(Mode::RateLimited);
        assert_eq!(go().await.status, 429);
        fake.set_mode(Mode::Garbage);
        let a = go().await;
        assert_eq!(a.status, 200);
        assert!(serde_json::from_slice::<Value>(&a.body).is_err());
        fake.set_mode(Mode::NoToken);
        let a = go().await;
        assert_eq!((a.status, a.json()), (200, json!({"channel_id": ""})));
        fake.set_mode(Mode::Custom {
            status: 403,
            body: "{\"code\":7}".into(),
        });
        assert_eq!(go().await.status, 403);

        fake.set_mode(Mode::Slow(Duration::from_millis(300)));
        let t0 = Instant::now();
        assert_eq!(go().await.status, 200);
        assert!(t0.elapsed() >= Duration::from_millis(300));

        fake.set_mode(Mode::Huge);
        let a = go().await;
        assert_eq!(a.status, 200);
        assert!(a.body.len() >= HUGE_BODY_BYTES, "{}", a.body.len());
        assert_eq!(a.json()["token"].as_str().unwrap().len(), HUGE_BODY_BYTES);

        fake.set_mode(Mode::Hangup);
        let jwt = jwt_for(&key, &fake.token_url());
        let r = send(
            &fake,
            "POST",
            TOKEN_PATH,
            Some(&jwt),
            "application/json",
            good_body().to_string().into_bytes(),
        )
        .await;
        assert!(r.is_err(), "hangup must not produce a response");

        fake.set_mode(Mode::Ok);
        assert_eq!(go().await.status, 200);
        assert_eq!(fake.mode(), Mode::Ok);
        fake.assert_all_verified();
        let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [500, 400, 429, 200, 200, 403, 200, 200, 0, 200]);
        // Only the Ok/Slow answers carry a token.
        assert_eq!(fake.tokens().len(), 2);
        assert!(fake.wait_for_count(10, Duration::from_millis(10)).await);
    }

    #[test]
    fn works_from_a_plain_test_and_stops_on_drop() {
        let key = TestKey::ed25519();
        let fake = FakeCdp::start(&key);
        let addr = fake.addr();
        assert!(std::net::TcpStream::connect(addr).is_ok());
        drop(fake);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    #[test]
    fn test_key_helpers() {
        let k = TestKey::es256_sec1();
        assert!(k
            .secret_string
            .starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        assert!(!k.secret_env_escaped().contains('\n'));
        assert_eq!(k.public_key.len(), 65);
        assert!(TestKey::es256_pkcs8()
            .secret_string
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let e = TestKey::ed25519();
        assert_eq!(STANDARD.decode(&e.secret_string).unwrap().len(), 64);
        assert_eq!(e.public_key.len(), 32);
        assert!(e.public_key_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let file: Value = serde_json::from_str(&e.key_file_json()).unwrap();
        assert_eq!(file["id"], e.id.as_str());
        let legacy = TestKey::legacy_id();
        assert!(legacy.starts_with("organizations/") && legacy.contains("/apiKeys/"));
        assert!(!format!("{e:?}").contains(&e.secret_string));
        for key in [k, e] {
            let env = key.env();
            let loaded =
                CdpKey::from_env_with(|n| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
                    .unwrap()
                    .unwrap();
            assert_eq!(loaded.algorithm(), key.algorithm);
        }
    }
}
