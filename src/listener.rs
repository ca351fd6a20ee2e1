//! Accepting and serving client connections.
//!
//! The accept loop gives each open connection a lease (crate::conn_limit: global and
//! per-IP slot, gauge) that lives as long as the connection or the tunnel it becomes.
//! At `max_connections` the keep-alive idle the longest is closed for a waiting client;
//! with none idle, further clients wait in the kernel's accept backlog instead of being
//! accepted and starved. Each connection then gets: the TLS handshake within
//! `header_read_timeout_ms`, hyper's HTTP/1.1 + HTTP/2 server (with the header read
//! timeout that cuts slowloris clients off), an idle timeout driven by real socket
//! activity, and a graceful shutdown when the gateway drains.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ResponseBody;
use crate::client_ip::ConnInfo;
use crate::conn_limit::{ConnLease, ConnLimits};
use crate::h2_resets::{reason_label, StreamRefusals};
use crate::metrics::{ConnectionGuard, Metrics};

/// Per-connection HTTP settings derived from `[server]`.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Which HTTP a connection speaks, decided before hyper sees a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// TLS decides by ALPN: `h2` is HTTP/2, anything else (`http/1.1`, or no ALPN at
    /// all) is HTTP/1.1. RFC 9113 §3.3 allows HTTP/2 without negotiation only over
    /// cleartext, so a preface on an `http/1.1` TLS connection is an error, as in nginx.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        }
    }
}

/// hyper's servers for client connections, one per protocol. Choosing the protocol
/// ourselves (ALPN) instead of hyper-util's `auto` sniffing of the first bytes saves a
/// buffer per connection: `auto` hands HTTP/1.1 the sniffed 24 bytes first, and the
/// read that follows doubles hyper's 8 KiB read buffer to 16 KiB for the life of the
/// connection (measured with massif). Idle keep-alives hold that memory.
#[derive(Clone)]
pub struct HttpBuilders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

pub fn http_builder(settings: &HttpSettings) -> HttpBuilders {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Our own head timer (see serve_http) replaces hyper's.
        .header_read_timeout(None)
        // hyper answers 431 itself when a request head outgrows its read buffer; its
        // minimum is 8 KiB. Smaller limits are enforced exactly per request (routes).
        .max_buf_size(settings.max_header_bytes.max(8192) + 8192)
        .keep_alive(true);
    // HTTP/2 limits, all set here rather than left to hyper/h2 defaults, because they
    // decide what one connection may cost and defaults change between releases:
    // - windows: hyper's 1 MiB stream + connection windows let one client park ~1 MiB
    //   per connection in our buffers when the app reads slowly; 256 KiB per stream and
    //   512 KiB per connection still fill a 10 ms-RTT path at ~50 MB/s, and adaptive
    //   windows (which would grow them again) stay off.
    // - max_concurrent_streams 128 (nginx's default): bounds per-connection work.
    // - max_pending_accept_reset_streams / max_local_error_reset_streams: the
    //   "rapid reset" (CVE-2023-44487) and "made you reset" defences; a client that
    //   resets or provokes resets faster than this gets GOAWAY(ENHANCE_YOUR_CALM).
    // - max_header_list_size: the same head budget as HTTP/1.1; h2 also counts
    //   CONTINUATION frames against it, which bounds a CONTINUATION flood.
    // - max_send_buf_size 64 KiB per stream (hyper: ~400 KiB): response bytes queued
    //   for a slow reader are bounded by flow control plus this.
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_frame_size(16_384)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(64)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buf_size(64 * 1024)
        // Idle HTTP/2 connections are closed by our idle timer, which counts streams,
        // not PINGs (see Activity); no keep-alive pings of our own.
        .keep_alive_interval(None);
    HttpBuilders { http1, http2 }
}

const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 512 * 1024;
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// Handles one request on a connection.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;
}

/// Accepts connections until `stop` fires, then returns (the listener is dropped,
/// so new clients are refused while accepted ones drain).
///
/// Each accepted socket gets a [`ConnLease`] (global slot, per-IP slot, and the
/// `connections_active` gauge when `metrics` is given) before anything is read from it:
/// a client over its per-IP cap is closed at once, before TLS.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    on_connection: F,
) where
    F: Fn(TcpStream, SocketAddr, ConnLease) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let free = limits.try_acquire();
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if limits.ip_full(peer.ip()) {
            refuse_per_ip(metrics.as_deref(), peer, stream);
            continue;
        }
        let permit = match free {
            Some(p) => p,
            None => {
                // Every slot is taken and a client is waiting: close the keep-alive that
                // has been idle the longest to make room (nginx reuses idle keep-alive
                // connections the same way). With none idle, the client waits for a
                // slot, and further clients wait in the kernel backlog.
                limits.evict_oldest_idle();
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    p = limits.acquire() => match p {
                        Some(p) => p,
                        None => break,
                    },
                }
            }
        };
        let counted = || metrics.as_deref().map(ConnectionGuard::new);
        let Some(lease) = limits.admit(permit, peer.ip(), counted) else {
            refuse_per_ip(metrics.as_deref(), peer, stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(on_connection(stream, peer, lease));
    }
}

/// Closes a connection over `max_connections_per_ip` at once: nothing has been read
/// from or written to it.
fn refuse_per_ip(metrics: Option<&Metrics>, peer: SocketAddr, stream: TcpStream) {
    if let Some(m) = metrics {
        m.count_connection_refused("per_ip");
    }
    tracing::debug!(peer = %peer, "connection refused: server.max_connections_per_ip");
    drop(stream);
}

/// Serves HTTP on an established (already TLS-terminated, if any) stream until the
/// client closes, a timeout passes, or the gateway drains.
///
/// Two timers, both driven by [`Activity`]:
/// - **request head** (`header_read_timeout`, HTTP/1.1): from the first byte of a request
///   head (or from the start of the connection, for the first request) until hyper hands
///   the complete head to the service. Cuts slowloris clients off. hyper's own header
///   timer is not used because it also runs while a keep-alive connection sits idle
///   between requests, which would make every idle keep-alive close after the header
///   timeout instead of `idle_timeout` (and make a load balancer with a longer upstream
///   keep-alive race the gateway's close: intermittent 502s).
/// - **idle** (`idle_timeout`): no bytes moving and no request in progress. A request is
///   in progress from its head until the handler has answered *and* its body has been
///   read to the end (full-duplex uploads stay "in progress"). On HTTP/2 only streams
///   count: PING/SETTINGS traffic on a connection with no open stream is still idle.
#[allow(clippy::too_many_arguments)]
///
/// Not an `async fn`: the stream is moved into the boxed hyper connection before the
/// returned future exists, so the future (which lives in every connection's task, idle
/// or not) holds a pointer to it instead of a second inline copy of the TLS state.
pub fn serve_http<IO, H>(
    io: IO,
    protocol: Protocol,
    conn: Arc<ConnInfo>,
    builder: Arc<HttpBuilders>,
    handler: Arc<H>,
    timeouts: ConnTimeouts,
    drain: CancellationToken,
    metrics: Option<Arc<Metrics>>,
) -> impl Future<Output = ()> + Send + 'static
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new(protocol));
    // A candidate for "close the oldest idle keep-alive" while this task serves HTTP;
    // an upgraded tunnel keeps the lease but is no longer a candidate.
    let registered = conn
        .lease
        .as_ref()
        .map(|lease| lease.register(activity.clone()));
    let peer = conn.peer;
    let io = TokioIo::new(ActivityIo {
        inner: io,
        activity: activity.clone(),
        refusals: (protocol == Protocol::Http2).then(|| StreamRefusals::new(peer, metrics.clone())),
    });
    let service_activity = activity.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        let handler = handler.clone();
        let conn = conn.clone();
        let guard = Arc::new(InFlight::start(service_activity.clone()));
        // The request stays in flight until its body has been read to the end, not only
        // until the response head: whoever streams the body (the proxy) takes this hold
        // and drops it at body EOF, so full-duplex HTTP/1.1 is never mistaken for a new,
        // slow request head.
        req.extensions_mut().insert(RequestHold(guard.clone()));
        let stream = StreamOpen::new(service_activity.clone());
        async move {
            // Boxed: hyper moves the service future by value (HTTP/2 spawns it as a
            // task per stream), so it should be a pointer, not the handler's whole state.
            let response = Box::pin(handler.handle(req, conn)).await;
            drop(guard);
            Ok::<_, Infallible>(response.map(|body| TrackedBody {
                inner: body,
                open: Some(stream),
            }))
        }
    });
    let mut connection = Served::new(&builder, protocol, io, service);
    async move {
        // Held (and the connection an eviction candidate) for as long as this future runs.
        let _registered = registered;
        let drained = drain.cancelled();
        tokio::pin!(drained);
        let evicted = activity.evict.notified();
        tokio::pin!(evicted);
        let mut evicting = false;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        // The deadline the timer is set to; None forces a re-arm (after it fired).
        let mut armed: Option<u64> = None;
        let mut shutting_down = false;

        loop {
            // Every wake-up of this task (socket readable, timer, drain) re-evaluates the
            // deadline, so a request head that starts while the timer is set for the idle
            // deadline still gets its own, shorter one.
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = connection.poll(cx) {
                    return Poll::Ready(Wake::Closed(result.err()));
                }
                if !shutting_down && drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Drain);
                }
                if !evicting && evicted.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Evict);
                }
                let deadline = activity.deadline_ms(&timeouts);
                if armed != Some(deadline) {
                    armed = Some(deadline);
                    timer.as_mut().reset(instant_at(deadline));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Closed(error) => {
                    if let Some(e) = error {
                        match protocol_error_reason(&e) {
                            Some(reason) => {
                                if let Some(m) = &metrics {
                                    m.count_protocol_error(reason);
                                }
                                tracing::info!(peer = %peer, reason, error = %e, "request refused at the protocol level");
                            }
                            None => tracing::debug!(error = %e, "connection ended with an error"),
                        }
                    }
                    break;
                }
                Wake::Evict => {
                    evicting = true;
                    tracing::debug!(peer = %peer, "idle keep-alive closed to make room at max_connections");
                    if !shutting_down {
                        shutting_down = true;
                        connection.graceful_shutdown();
                    }
                }
                Wake::Drain => {
                    // HTTP/1.1: close once the in-flight response is done (idle ones at
                    // once); HTTP/2: GOAWAY, then finish the open streams.
                    shutting_down = true;
                    connection.graceful_shutdown();
                }
                Wake::Timer => {
                    // The timer has fired: it must be set again whatever the next deadline is,
                    // or a completed timer would wake this loop over and over.
                    armed = None;
                    match activity.expired(&timeouts) {
                        Some(Expired::Head) => {
                            tracing::debug!(
                                "request head not received within header_read_timeout_ms: closing"
                            );
                            break;
                        }
                        Some(Expired::Idle) if shutting_down => break,
                        Some(Expired::Idle) => {
                            shutting_down = true;
                            connection.graceful_shutdown();
                            // If the client does not close within another idle period, drop it.
                            activity.touch();
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// A metric label when a connection ended because the client broke the protocol
/// (hyper answered 400/431 or sent GOAWAY itself); `None` for ordinary ends (client
/// went away, reset, our own shutdown).
fn protocol_error_reason(hyper_err: &hyper::Error) -> Option<&'static str> {
    if hyper_err.is_parse_too_large() {
        return Some("http1_head_too_large");
    }
    if hyper_err.is_parse_version_h2() {
        return Some("http1_unexpected_h2_preface");
    }
    if hyper_err.is_parse() {
        return Some("http1_parse");
    }
    let mut source = std::error::Error::source(hyper_err);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            // A GOAWAY we sent because of what the client did; a remote GOAWAY or an
            // I/O error is the client leaving, not a refusal.
            if h2e.is_remote() || h2e.is_io() {
                return None;
            }
            return h2e.reason().and_then(|r| reason_label(r.into()));
        }
        source = s.source();
    }
    None
}

/// The hyper connection of one client connection, boxed: the task that serves it then
/// holds a pointer, and an HTTP/1.1 connection pays only for HTTP/1.1's state (an
/// inline enum would be the size of the larger HTTP/2 one).
enum Served<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
{
    Http1(Pin<Box<hyper::server::conn::http1::UpgradeableConnection<TokioIo<IO>, S>>>),
    Http2(Pin<Box<hyper::server::conn::http2::Connection<TokioIo<IO>, S, TokioExecutor>>>),
}

impl<IO, S, B> Served<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(builders: &HttpBuilders, protocol: Protocol, io: TokioIo<IO>, service: S) -> Self {
        match protocol {
            Protocol::Http1 => Served::Http1(Box::pin(
                builders.http1.serve_connection(io, service).with_upgrades(),
            )),
            Protocol::Http2 => {
                Served::Http2(Box::pin(builders.http2.serve_connection(io, service)))
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        match self {
            Served::Http1(c) => c.as_mut().poll(cx),
            Served::Http2(c) => c.as_mut().poll(cx),
        }
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Served::Http1(c) => c.as_mut().graceful_shutdown(),
            Served::Http2(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

enum Wake {
    Closed(Option<hyper::Error>),
    Drain,
    Evict,
    Timer,
}

/// The per-connection timeouts from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    pub header_read_ms: u64,
    pub idle_ms: u64,
}

impl ConnTimeouts {
    pub fn new(header_read: Duration, idle: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            header_read_ms: ms(header_read),
            idle_ms: ms(idle),
        }
    }
}

enum Expired {
    Head,
    Idle,
}

fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the process-wide start instant (cheap to store in an atomic).
fn clock_ms() -> u64 {
    u64::try_from(clock_start().elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn instant_at(ms: u64) -> tokio::time::Instant {
    let at = clock_start()
        .checked_add(Duration::from_millis(ms))
        // Far future: a year is "never" for one connection.
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400));
    tokio::time::Instant::from_std(at)
}

/// Socket activity and request progress on one connection.
struct Activity {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// When the current HTTP/1.1 request head started arriving; 0 = no head pending.
    head_started_ms: AtomicU64,
    /// True between requests: the next bytes read begin a request head.
    awaiting_head: AtomicBool,
    /// HTTP/2 has no per-request head to time (frames of many streams interleave).
    is_h2: bool,
    /// Responses whose body has not ended yet (HTTP/2 idleness is about streams).
    open_streams: AtomicUsize,
    /// At least one request has been received: the connection is a keep-alive.
    served: AtomicBool,
    /// Set by the accept loop to close this connection if it is idle at the limit.
    evict: tokio::sync::Notify,
}

impl crate::conn_limit::Evictable for Activity {
    fn idle_since(&self) -> Option<u64> {
        let idle = self.served.load(Ordering::Relaxed)
            && self.in_flight() == 0
            && self.open_streams.load(Ordering::Relaxed) == 0;
        idle.then(|| self.last_ms.load(Ordering::Relaxed))
    }
    fn evict(&self) {
        // notify_one keeps the wake-up if the task is not polling right now.
        self.evict.notify_one();
    }
}

impl Activity {
    fn new(protocol: Protocol) -> Self {
        let now = clock_ms();
        Self {
            last_ms: AtomicU64::new(now),
            in_flight: AtomicUsize::new(0),
            // The first head is timed from the start of the connection, so a client
            // that connects and sends nothing is cut off like one that trickles.
            head_started_ms: AtomicU64::new(now.max(1)),
            awaiting_head: AtomicBool::new(true),
            is_h2: protocol == Protocol::Http2,
            open_streams: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
        }
    }
    fn touch(&self) {
        self.last_ms.store(clock_ms(), Ordering::Relaxed);
    }
    /// Bytes written to the client. On HTTP/2 they do not count: a connection with no
    /// open stream is idle whatever PING/SETTINGS frames go back and forth; streams
    /// starting and ending touch it instead (see [`InFlight`]).
    fn bytes_written(&self) {
        if !self.is_h2 || self.open_streams.load(Ordering::Relaxed) > 0 {
            self.touch();
        }
    }
    fn bytes_read(&self) {
        if self.is_h2 {
            return;
        }
        let now = clock_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.awaiting_head.load(Ordering::Relaxed)
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            self.head_started_ms.store(now.max(1), Ordering::Relaxed);
        }
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The next instant (in [`clock_ms`] units) at which a timeout could expire.
    fn deadline_ms(&self, t: &ConnTimeouts) -> u64 {
        let mut deadline = u64::MAX;
        if self.in_flight() == 0 {
            deadline = self
                .last_ms
                .load(Ordering::Relaxed)
                .saturating_add(t.idle_ms);
        }
        let started = self.head_started_ms.load(Ordering::Relaxed);
        if started != 0 && !self.is_h2 && self.awaiting_head.load(Ordering::Relaxed) {
            deadline = deadline.min(started.saturating_add(t.header_read_ms));
        }
        deadline
    }

    fn expired(&self, t: &ConnTimeouts) -> Option<Expired> {
        let now = clock_ms();
        let started = self.head_started_ms.load(Ordering::Relaxed);
        if started != 0
            && !self.is_h2
            && self.awaiting_head.load(Ordering::Relaxed)
            && now >= started.saturating_add(t.header_read_ms)
        {
            return Some(Expired::Head);
        }
        if self.in_flight() == 0
            && now
                >= self
                    .last_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(t.idle_ms)
        {
            return Some(Expired::Idle);
        }
        None
    }
}

/// A request being handled: its head is complete (the head timer stops) and the
/// connection is not idle while it runs (a slow upstream is not an idle client). It
/// ends when the handler has answered *and* the request body has been read to its end
/// (or dropped): the last of the two holders to let go ends it.
struct InFlight(Arc<Activity>);

/// The request-body holder's share of [`InFlight`], found in the request extensions.
/// Whoever streams the body takes it and drops it at body EOF.
#[derive(Clone)]
pub struct RequestHold(#[allow(dead_code)] Arc<InFlight>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.touch();
        activity.served.store(true, Ordering::Relaxed);
        activity.awaiting_head.store(false, Ordering::Relaxed);
        activity.head_started_ms.store(0, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
        self.0.awaiting_head.store(true, Ordering::Relaxed);
    }
}

/// One response whose body is still being sent.
struct StreamOpen(Arc<Activity>);

impl StreamOpen {
    fn new(activity: Arc<Activity>) -> Self {
        activity.open_streams.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks its stream closed at its end (or when dropped).
    struct TrackedBody<B> {
        #[pin]
        inner: B,
        open: Option<StreamOpen>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let result = this.inner.poll_frame(cx);
        if matches!(result, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.open.take();
        }
        result
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Records when bytes last moved in either direction.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// HTTP/2 only: the stream-level refusals in what the connection writes.
    refusals: Option<StreamRefusals>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl<T> ActivityIo<T> {
    /// The first `n` bytes of `bufs` went out.
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], n: usize) {
        if n == 0 {
            return;
        }
        self.activity.bytes_written();
        if let Some(refusals) = &mut self.refusals {
            refusals.wrote(bufs, n);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(&[io::IoSlice::new(buf)], n);
        }
        result
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(bufs, n);
        }
        result
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
