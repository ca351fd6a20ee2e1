//! Accepting and serving client connections.
//!
//! The accept loop holds a semaphore permit per open connection, so at
//! `max_connections` further clients wait in the kernel's accept backlog instead of
//! being accepted and starved. Each connection then gets: the TLS handshake within
//! `header_read_timeout_ms`, hyper's HTTP/1.1 + HTTP/2 server (with the header read
//! timeout that cuts slowloris clients off), an idle timeout driven by real socket
//! activity, and a graceful shutdown when the gateway drains.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ResponseBody;
use crate::client_ip::ConnInfo;

/// Per-connection HTTP settings derived from `[server]`.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// hyper's builder for every client connection: HTTP/1.1 and HTTP/2 (chosen by the
/// connection preface, which matches ALPN for TLS clients).
pub fn http_builder(settings: &HttpSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // hyper answers 431 itself when a request head outgrows its read buffer; its
        // minimum is 8 KiB. Smaller limits are enforced exactly per request (routes).
        .max_buf_size(settings.max_header_bytes.max(8192) + 8192)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(250);
    builder
}

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
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
    on_connection: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let _ = stream.set_nodelay(true);
        tracker.spawn(on_connection(stream, peer, permit));
    }
}

/// Serves HTTP on an established (already TLS-terminated, if any) stream until the
/// client closes, the idle timeout passes, or the gateway drains.
pub async fn serve_http<IO, H>(
    io: IO,
    conn: Arc<ConnInfo>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
    idle_timeout: Duration,
    drain: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(ActivityIo {
        inner: io,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let conn = conn.clone();
        let guard = InFlight::start(service_activity.clone());
        async move {
            let response = handler.handle(req, conn).await;
            drop(guard);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);

    let mut shutting_down = false;
    let idle_check = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle_check);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = drain.cancelled(), if !shutting_down => {
                // HTTP/1.1: close once the in-flight response is done (idle ones at
                // once); HTTP/2: GOAWAY, then finish the open streams.
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_check.as_mut() => {
                let idle = activity.idle_for();
                if activity.in_flight() == 0 && idle >= idle_timeout {
                    if shutting_down {
                        // Asked to close politely one idle period ago and still here.
                        break;
                    }
                    shutting_down = true;
                    connection.as_mut().graceful_shutdown();
                    idle_check.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                } else {
                    let remaining = idle_timeout.saturating_sub(idle).max(Duration::from_millis(100));
                    idle_check.as_mut().reset(tokio::time::Instant::now() + remaining);
                }
            }
        }
    }
}

/// Last socket activity and requests in progress on one connection.
struct Activity {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Activity {
    fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(clock_ms()),
            in_flight: AtomicUsize::new(0),
        }
    }
    fn touch(&self) {
        self.last_ms.store(clock_ms(), Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request being handled: a connection waiting on a slow upstream is not idle.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Records when bytes last moved in either direction.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
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
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
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
