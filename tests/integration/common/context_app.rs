//! A fake app for `addresses.source = "upstream"`: it answers the gateway's
//! `GET /.well-known/onramp-context` the way a real app with a cookie session would.
//!
//! - With `Cookie: session=<user>` for a known user: `200` JSON
//!   `{"addresses":[{"address":..,"blockchains":[..]}],"assets":[..],"partnerUserRef":<user>}`.
//! - Without a session: what [`Anonymous`] says: the app's own `401`, or its `302` to
//!   `/login`, each with a marker header and body so a test can check they were relayed
//!   unchanged.
//! - [`ContextApp::set_broken`] makes the context route answer `500` (the gateway must
//!   then answer `502`, not relay the app's error page).
//!
//! - [`ContextApp::set_identity`] adds the buyer identity headless orders need (`email`,
//!   `phoneNumber`, `phoneNumberVerifiedAt`, `agreementAcceptedAt`) to the answer; a
//!   second user, `bob` (`Cookie: session=bob`), exists for ownership checks.
//!
//! Every request is recorded (path and headers) so tests can check what the gateway sent.
//! Any other path answers `200 app page` with `x-upstream: context-app`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The context route, as in the gateway's default `addresses.context_path`.
pub const CONTEXT_PATH: &str = "/.well-known/onramp-context";
/// The signed-in user's wallet, as the app knows it.
pub const APP_ADDRESS: &str = "0xa11ce00000000000000000000000000000000a11";
/// The cookie that makes the app see a signed-in user (`alice`).
pub const SESSION_COOKIE: &str = "session=alice";
/// The second user's cookie and wallet.
pub const BOB_COOKIE: &str = "session=bob";
pub const BOB_ADDRESS: &str = "0xb0b0000000000000000000000000000000000b0b";
/// Alice's verified contact data, as the app holds it (with `set_identity(true)`).
pub const ALICE_EMAIL: &str = "alice@example.com";
pub const ALICE_PHONE: &str = "+12125550123";
pub const VERIFIED_AT: &str = "2026-11-30T10:00:00Z";

/// Body of the app's 401, to prove it was relayed byte for byte.
pub const LOGIN_REQUIRED_BODY: &str = "context-app: login required";
/// Where the app's 302 sends an anonymous user.
pub const LOGIN_LOCATION: &str = "/login?next=%2Fonramp";

/// What the app answers when the request carries no session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anonymous {
    /// `401` with `WWW-Authenticate` and [`LOGIN_REQUIRED_BODY`].
    Unauthorized,
    /// `302 Location: /login?next=%2Fonramp`.
    RedirectToLogin,
}

/// One request as the app saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub path: String,
    pub headers: HeaderMap,
}

#[derive(Debug)]
struct State {
    anonymous: Anonymous,
    broken: bool,
    identity: bool,
    seen: Vec<SeenRequest>,
}

/// A running context app; stops accepting when dropped.
pub struct ContextApp {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl ContextApp {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start(anonymous: Anonymous) -> ContextApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind context app");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            anonymous,
            broken: false,
            identity: false,
            seen: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ContextApp { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`, for `upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Make the context route answer `500`.
    pub fn set_broken(&self, broken: bool) {
        self.lock().broken = broken;
    }

    /// Include the buyer identity fields in the context answer.
    pub fn set_identity(&self, on: bool) {
        self.lock().identity = on;
    }

    /// Requests received so far, oldest first.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ContextApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header("x-upstream", "context-app")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let (anonymous, broken, identity) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.seen.push(SeenRequest {
            path: path.clone(),
            headers: req.headers().clone(),
        });
        (s.anonymous, s.broken, s.identity)
    };
    if path != CONTEXT_PATH {
        return Ok(response(StatusCode::OK, "text/plain", "app page".into()));
    }
    if broken {
        return Ok(response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/html",
            "<h1>context-app exploded</h1>".into(),
        ));
    }
    let has_cookie = |cookie: &str| {
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|c| c.trim() == cookie)
    };
    let user = if has_cookie(SESSION_COOKIE) {
        Some(("alice", APP_ADDRESS, ALICE_EMAIL, ALICE_PHONE))
    } else if has_cookie(BOB_COOKIE) {
        Some(("bob", BOB_ADDRESS, "bob@example.com", "+12125550199"))
    } else {
        None
    };
    if let Some((name, address, email, phone)) = user {
        let mut body = json!({
            "addresses": [{"address": address, "blockchains": ["base"]}],
            "assets": ["USDC"],
            "partnerUserRef": name,
        });
        if identity {
            body["email"] = json!(email);
            body["phoneNumber"] = json!(phone);
            body["phoneNumberVerifiedAt"] = json!(VERIFIED_AT);
            body["agreementAcceptedAt"] = json!(VERIFIED_AT);
        }
        return Ok(response(
            StatusCode::OK,
            "application/json",
            body.to_string(),
        ));
    }
    let mut r = match anonymous {
        Anonymous::Unauthorized => {
            let mut r = response(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                LOGIN_REQUIRED_BODY.into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Cookie realm=\"context-app\""),
            );
            r
        }
        Anonymous::RedirectToLogin => {
            let mut r = response(StatusCode::FOUND, "text/plain", String::new());
            r.headers_mut().insert(
                header::LOCATION,
                http::HeaderValue::from_static(LOGIN_LOCATION),
            );
            r
        }
    };
    // A Set-Cookie on the relayed answer must reach the browser too (e.g. a login nonce).
    r.headers_mut().insert(
        header::SET_COOKIE,
        http::HeaderValue::from_static("login_nonce=n1; Path=/; HttpOnly"),
    );
    Ok(r)
}
