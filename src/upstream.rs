//! The one HTTP client to the app (one connection pool, one set of idle settings), used
//! by the proxy and by the minting routes' app-context call, and the request body it
//! sends.
//!
//! [`UpstreamBody`] streams a client's request body to the app and owns what the
//! gateway must know about that upload: when it has been sent completely (the response
//! timeout starts then, not before), whether the client stalled it (no bytes for
//! `idle_timeout_ms`: 408) or sent a malformed body (bad chunked framing: 400, the
//! client's fault, not a 502), and the connection's in-flight hold, released at body
//! EOF so full-duplex HTTP/1.1 is not mistaken for a slow request head.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::listener::RequestHold;

pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The process's upstream client, built on first use. One pool for every caller: the
/// app sees one set of keep-alive connections with one idle policy. Every caller passes
/// the same `upstream.connect_timeout_ms` (there is one `[upstream]`); the first wins.
pub fn shared_client(connect_timeout: Duration) -> UpstreamClient {
    static CLIENT: OnceLock<UpstreamClient> = OnceLock::new();
    CLIENT.get_or_init(|| build_client(connect_timeout)).clone()
}

fn build_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        // Below typical app servers' keep-alive (Node 5 s is the outlier, so retry
        // on a connection it closed is left to hyper's idle detection).
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        // Host is part of the forwarding rules (crate::forwarding), never guessed here.
        .set_host(false)
        .build(connector)
}

/// Why an upload ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFailure {
    /// No bytes from the client for the idle timeout.
    Stalled,
    /// The client's body was malformed (e.g. broken chunked framing) or cut off.
    Malformed,
}

/// Shared between the body (which hyper's client owns) and the proxy waiting on it.
#[derive(Debug, Default)]
pub struct UploadState {
    sent: AtomicBool,
    failure: AtomicU8,
    notify: Notify,
}

impl UploadState {
    /// Resolves once the whole body has been handed to the upstream connection.
    pub async fn sent(&self) {
        // Most requests (GET, HEAD) have no body: sent before anyone asks, and a waiter
        // registered and removed on the Notify (a lock each way) would be wasted.
        if self.sent.load(Ordering::Acquire) {
            return;
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.sent.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    pub fn failure(&self) -> Option<UploadFailure> {
        match self.failure.load(Ordering::Acquire) {
            1 => Some(UploadFailure::Stalled),
            2 => Some(UploadFailure::Malformed),
            _ => None,
        }
    }

    fn mark_sent(&self) {
        self.sent.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn fail(&self, f: UploadFailure) {
        let v = match f {
            UploadFailure::Stalled => 1,
            UploadFailure::Malformed => 2,
        };
        self.failure.store(v, Ordering::Release);
    }
}

/// A request body on its way to the app.
pub struct UpstreamBody {
    inner: Option<Incoming>,
    /// A body already in memory (a verified webhook delivery), sent as one frame.
    buffered: Option<Bytes>,
    state: Arc<UploadState>,
    idle: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    stall_armed: bool,
    hold: Option<RequestHold>,
}

impl UpstreamBody {
    /// No body (the app-context call).
    pub fn empty() -> Self {
        let state = Arc::new(UploadState::default());
        state.mark_sent();
        Self {
            inner: None,
            buffered: None,
            state,
            idle: Duration::MAX,
            stall: None,
            stall_armed: false,
            hold: None,
        }
    }

    /// Streams `body`; a pause of `idle` with no bytes from the client fails it.
    pub fn streamed(body: Incoming, idle: Duration, hold: Option<RequestHold>) -> Self {
        let state = Arc::new(UploadState::default());
        if body.is_end_stream() {
            state.mark_sent();
        }
        Self {
            inner: Some(body),
            buffered: None,
            state,
            idle,
            stall: None,
            stall_armed: false,
            hold,
        }
    }

    /// `bytes`, already received in full (nothing can stall it).
    pub fn full(bytes: Bytes) -> Self {
        let mut body = Self::empty();
        body.buffered = (!bytes.is_empty()).then_some(bytes);
        body
    }

    pub fn state(&self) -> Arc<UploadState> {
        self.state.clone()
    }

    fn finish(&mut self) {
        self.inner = None;
        self.stall = None;
        // Body EOF: the request is no longer in flight on the client connection's
        // account (the handler's own share may still hold it).
        self.hold = None;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(bytes) = this.buffered.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall_armed = false;
                if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.finish();
                    this.state.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.fail(UploadFailure::Malformed);
                this.finish();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                this.state.mark_sent();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Only time spent waiting for the *client* counts: when the app is slow
                // to read, hyper does not poll us and this timer does not run.
                let idle = this.idle;
                let sleep = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if !this.stall_armed {
                    this.stall_armed = true;
                    let at = tokio::time::Instant::now()
                        .checked_add(idle)
                        .unwrap_or_else(far_future);
                    sleep.as_mut().reset(at);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    this.state.fail(UploadFailure::Stalled);
                    this.finish();
                    return Poll::Ready(Some(Err(
                        "request body stalled: no bytes within idle_timeout_ms".into(),
                    )));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(bytes) = &self.buffered {
            return SizeHint::with_exact(bytes.len() as u64);
        }
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 86_400)
}
