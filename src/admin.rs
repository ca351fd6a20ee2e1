//! The admin listener (plain HTTP, keep it on loopback or the pod network):
//! `/healthz` (process alive), `/readyz` (ready for traffic), `/metrics` (Prometheus).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, ResponseBody};
use crate::client_ip::ConnInfo;
use crate::listener::Handler;
use crate::metrics::Metrics;

/// A dependency whose health `/readyz` reports (the Redis rate limiter, later others).
pub type HealthCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What `/readyz` is made of.
pub struct Readiness {
    listeners_bound: AtomicBool,
    shutting_down: AtomicBool,
    cdp_key_loaded: bool,
    checks: Vec<(&'static str, HealthCheck)>,
}

impl Readiness {
    pub fn new(cdp_key_loaded: bool, checks: Vec<(&'static str, HealthCheck)>) -> Self {
        Self {
            listeners_bound: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            cdp_key_loaded,
            checks,
        }
    }
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::SeqCst);
    }
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Ok, or the reasons the gateway is not ready.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.shutting_down.load(Ordering::SeqCst) {
            reasons.push("shutting down".to_string());
        }
        if !self.listeners_bound.load(Ordering::SeqCst) {
            reasons.push("listeners not bound yet".to_string());
        }
        if !self.cdp_key_loaded {
            reasons.push("no CDP API key configured: token minting is off".to_string());
        }
        for (name, check) in &self.checks {
            if let Err(e) = check().await {
                reasons.push(format!("{name}: {e}"));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _conn: Arc<ConnInfo>) -> Response<ResponseBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.readiness.check().await {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(reasons) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", reasons.join("; ")),
                ),
            },
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
