//! Start-up and lifecycle: bind the listeners, serve, and shut down the way
//! Kubernetes expects (readiness off at once, keep accepting for
//! `shutdown_delay_ms`, then drain within `shutdown_grace_ms`, exit 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use proxy_header::io::ProxiedStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, HealthCheck, Readiness};
use crate::api::Api;
use crate::body::{full, ResponseBody};
use crate::cdp::client::CdpClient;
use crate::cdp::key::CdpKey;
use crate::client_ip::{ClientIpPolicy, ConnInfo};
use crate::config::{LimiterBackend, Settings};
use crate::conn_limit::{ConnLease, ConnLimits};
use crate::listener::{
    accept_loop, http_builder, serve_http, ConnTimeouts, Handler, HttpBuilders, HttpSettings,
    Protocol,
};
use crate::metrics::Metrics;
use crate::mint::Minter;
use crate::proxy::{Proxy, ProxySettings};
use crate::proxy_protocol;
use crate::ratelimit::{LayeredMemory, Layers, Policy, RateLimiter, RedisLimiter};
use crate::redis_conn::RedisConn;
use crate::routes::App;
use crate::ticket::{
    MemoryReplayGuard, RedisReplayGuard, ReplayGuard, TicketSecret, TicketVerifier,
};
use crate::tls::{self, CertStore, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Aborts a background task when dropped (the ACME order task ends with the server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything loaded and checked before any socket is bound.
pub struct Prepared {
    pub settings: Arc<Settings>,
    pub certs: Arc<CertStore>,
    pub cdp_key: Option<CdpKey>,
    /// The HS256 ticket key (`addresses.source = "ticket"`), read at start-up.
    pub ticket_secret: Option<TicketSecret>,
    /// The webhook subscription secrets (`webhooks.path` set), read at start-up.
    pub webhook_secrets: Option<crate::webhook::signature::WebhookSecrets>,
    /// `[tls.acme]`: the order task, started once the HTTPS listener is bound.
    pub acme: Option<crate::acme::Acme>,
}

pub async fn run(prepared: Prepared) -> Result<(), StartError> {
    let Prepared {
        settings,
        certs,
        cdp_key,
        ticket_secret,
        webhook_secrets,
        acme,
    } = prepared;
    let c = &settings.config;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %settings.config_file.display(),
        listen = %settings.listen,
        upstream = %settings.upstream,
        cdp_api_base = %settings.cdp_api_base,
        cdp_key_id = cdp_key.as_ref().map_or("none", |k| k.id()),
        onramp_path = %c.onramp.path,
        offramp_path = %c.offramp.path,
        address_source = ?c.addresses.source,
        rate_limit_rpm = c.rate_limit.requests_per_minute,
        rate_limit_burst = c.rate_limit.burst,
        rate_limit_backend = ?c.rate_limit.backend,
        proxy_protocol = settings.conn.proxy_protocol,
        trusted_proxies = settings.trusted_proxies.len(),
        cors_origins = c.cors.allowed_origins.len(),
        "starting onramp-gateway"
    );
    let metrics = Arc::new(Metrics::new());
    let connections = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let drain = CancellationToken::new();

    let redis = match settings.config.rate_limit.backend {
        LimiterBackend::Redis => Some(
            crate::redis_conn::connect_lazy(crate::redis_conn::RedisOptions {
                url: &settings.config.rate_limit.redis_url,
                ca_file: settings.redis_ca_file.as_deref(),
                cluster: settings.config.rate_limit.redis_cluster,
            })
            .map_err(|e| StartError::Other(e.to_string()))?,
        ),
        LimiterBackend::Memory => None,
    };
    let limiter = build_limiter(&settings, redis.clone())?;
    let mut checks: Vec<(&'static str, HealthCheck)> = Vec::new();
    if settings.config.rate_limit.backend == LimiterBackend::Redis {
        let limiter = limiter.clone();
        checks.push((
            "redis",
            Arc::new(move || {
                let limiter = limiter.clone();
                Box::pin(async move { limiter.health().await.map_err(|e| e.to_string()) })
            }),
        ));
    }
    let readiness = Arc::new(Readiness::new(cdp_key.is_some(), checks));
    if cdp_key.is_none() {
        tracing::warn!(
            "no CDP API key configured (CDP_API_KEY_ID/CDP_API_KEY_SECRET or [cdp] key_file): \
             onramp/offramp answer 503 and /readyz reports not ready; proxying works"
        );
    }

    // One upstream pool for the proxy and the minting routes' app-context call.
    let upstream = crate::upstream::shared_client(settings.upstream_connect_timeout());
    let proxy = Proxy::new(
        upstream,
        ProxySettings {
            upstream: settings.upstream.clone(),
            response_timeout: settings.upstream_response_timeout(),
            idle_timeout: settings.idle_timeout(),
            upgrade_protocols: settings.conn.upgrade_protocols.clone(),
        },
        connections.clone(),
    );
    let webhooks = webhook_secrets
        .map(|secrets| build_webhooks(&settings, secrets, redis.clone(), metrics.clone()));
    let minter = match cdp_key {
        Some(key) => {
            let tickets =
                ticket_secret.map(|secret| build_tickets(&settings, &secret, redis.clone()));
            Some(Arc::new(build_minter(
                &settings,
                key,
                limiter,
                metrics.clone(),
                tickets,
            )?))
        }
        None => None,
    };
    let api = match &minter {
        Some(minter) if !settings.config.api.prefix.is_empty() => Some(build_api(
            &settings,
            minter.clone(),
            redis,
            metrics.clone(),
        )?),
        _ => None,
    };
    let app =
        Arc::new(App::new(&settings, metrics.clone(), proxy, minter, api).with_webhooks(webhooks));

    // Bind everything first: a port in use fails start-up before anything is served.
    let https = bind("server.listen", settings.listen).await?;
    let http = match settings.http_listen {
        Some(addr) => Some(bind("server.http_listen", addr).await?),
        None => None,
    };
    let admin = match settings.admin_listen {
        Some(addr) => Some(bind("admin.listen", addr).await?),
        None => None,
    };
    let https_addr = local_addr(&https, settings.listen);
    tracing::info!(listener = "https", addr = %https_addr, "listening");
    if let Some(l) = &http {
        tracing::info!(listener = "http", addr = %local_addr(l, settings.listen), "listening");
    }
    if let Some(l) = &admin {
        tracing::info!(listener = "admin", addr = %local_addr(l, settings.listen), "listening");
    }

    let http_settings = HttpSettings {
        header_read_timeout: settings.header_read_timeout(),
        idle_timeout: settings.idle_timeout(),
        max_header_bytes: settings.conn.max_header_bytes,
    };
    let builder = Arc::new(http_builder(&http_settings));
    let timeouts = ConnTimeouts::new(settings.header_read_timeout(), settings.idle_timeout());
    // One set of slots for client traffic (HTTPS and the redirect listener).
    let limits = Arc::new(ConnLimits::new(
        settings.conn.max_connections,
        settings.conn.max_connections_per_ip,
        ClientIpPolicy::new(settings.trusted_proxies.clone()),
    ));
    let acceptor = TlsAcceptor::from(tls::server_config(certs.clone())?);
    {
        let metrics = metrics.clone();
        certs.observe(Box::new(move |key| {
            if let Some(t) = tls::not_after(key) {
                metrics.tls_cert_not_after.set(t);
            }
        }));
    }
    let _cert_watch = tls::spawn_file_watch(certs.clone());

    let accepting = TaskTracker::new();
    {
        let frontend = Arc::new(TlsFrontend {
            acceptor,
            builder: builder.clone(),
            app: app.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            handshake_timeout: settings.header_read_timeout(),
            timeouts,
            proxy_protocol: settings
                .conn
                .proxy_protocol
                .then(|| ClientIpPolicy::new(settings.trusted_proxies.clone())),
            fallback_local: https_addr,
            limits: limits.clone(),
        });
        accepting.spawn(accept_loop(
            https,
            limits.clone(),
            Some(metrics.clone()),
            stop_accepting.clone(),
            connections.clone(),
            move |stream, peer, lease| frontend.clone().serve(stream, peer, lease),
        ));
    }
    if let Some(listener) = http {
        let redirect = Arc::new(RedirectToHttps {
            https_port: https_addr.port(),
        });
        let (builder, metrics, drain) = (builder.clone(), metrics.clone(), drain.clone());
        accepting.spawn(accept_loop(
            listener,
            limits.clone(),
            Some(metrics.clone()),
            stop_accepting.clone(),
            connections.clone(),
            move |stream, peer, lease| {
                serve_plain(
                    stream,
                    peer,
                    lease,
                    builder.clone(),
                    redirect.clone(),
                    timeouts,
                    drain.clone(),
                    Some(metrics.clone()),
                )
            },
        ));
    }
    // The admin listener lives until the very end so /readyz can report the drain.
    let admin_stop = CancellationToken::new();
    let admin_tasks = TaskTracker::new();
    if let Some(listener) = admin {
        let handler = Arc::new(Admin {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        });
        let (builder, stop) = (builder.clone(), admin_stop.clone());
        // Its own slots and a short idle timeout: idle keep-alives (or a scraper that
        // leaks connections) must not block the kubelet's probes.
        let admin_limits = Arc::new(ConnLimits::new(
            settings.conn.admin_max_connections,
            0,
            ClientIpPolicy::default(),
        ));
        let admin_idle = settings.conn.admin_idle_timeout;
        let admin_timeouts =
            ConnTimeouts::new(settings.header_read_timeout().min(admin_idle), admin_idle);
        admin_tasks.spawn(accept_loop(
            listener,
            admin_limits,
            // Not counted in connections_active: that gauge is about client traffic.
            None,
            admin_stop.clone(),
            admin_tasks.clone(),
            move |stream, peer, lease| {
                serve_plain(
                    stream,
                    peer,
                    lease,
                    builder.clone(),
                    handler.clone(),
                    admin_timeouts,
                    stop.clone(),
                    None,
                )
            },
        ));
    }

    // After the listener is accepting: the CA's validation connects to it. Aborted when
    // `run` returns (dropping the handle alone would leave the task running).
    let acme_task = acme.map(|a| AbortOnDrop(a.spawn(certs.clone())));
    readiness.set_listeners_bound();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ready");

    wait_for_shutdown_signal(&certs).await?;
    readiness.set_shutting_down();
    let delay = settings.shutdown_delay();
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        grace_ms = settings.shutdown_grace().as_millis() as u64,
        "shutdown requested: readiness is now false"
    );
    tokio::time::sleep(delay).await;

    stop_accepting.cancel();
    accepting.close();
    accepting.wait().await;
    tracing::info!("stopped accepting; draining in-flight requests");
    drain.cancel();
    connections.close();
    if tokio::time::timeout(settings.shutdown_grace(), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "shutdown grace period over; closing the remaining connections"
        );
    }
    admin_stop.cancel();
    admin_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_tasks.wait()).await;
    drop(acme_task);
    tracing::info!("shutdown complete");
    Ok(())
}

/// The layered limiter of the minting routes, per `rate_limit.backend` (`redis` is
/// the shared connection when that backend is configured).
fn build_limiter(
    settings: &Settings,
    redis: Option<RedisConn>,
) -> Result<Arc<dyn RateLimiter>, StartError> {
    let rl = &settings.config.rate_limit;
    let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
    let layers = Layers::from_config(rl).map_err(|e| other(&e))?;
    let limiter: Arc<dyn RateLimiter> = match redis {
        None => Arc::new(LayeredMemory::new(&layers, rl.max_keys).map_err(|e| other(&e))?),
        Some(connection) => {
            tracing::info!(
                on_backend_error = ?rl.on_backend_error,
                tls = rl.redis_url.starts_with("rediss://"),
                extra_ca = !rl.redis_ca_file.is_empty(),
                cluster = connection.is_cluster(),
                "rate limits shared through Redis"
            );
            Arc::new(
                RedisLimiter::new(&layers, connection, &rl.redis_key_prefix)
                    .map_err(|e| other(&e))?,
            )
        }
    };
    Ok(limiter)
}

/// CDP allows 10 buy/sell quote requests per second per app ID.
const CDP_QUOTES_PER_SECOND: u32 = 10;

/// The `[api]` endpoints with their own per-IP bucket and the quote budget (both in
/// Redis with that backend, under their own key prefixes).
fn build_api(
    settings: &Settings,
    minter: Arc<Minter>,
    redis: Option<RedisConn>,
    metrics: Arc<Metrics>,
) -> Result<Api, StartError> {
    let rl = &settings.config.rate_limit;
    let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
    let per_ip = Layers::per_ip(Policy {
        requests_per_minute: settings.config.api.requests_per_minute,
        burst: settings.config.api.burst,
        ipv6_prefix: rl.ipv6_prefix,
    })
    .map_err(|e| other(&e))?;
    let quotes = Layers::global(CDP_QUOTES_PER_SECOND).map_err(|e| other(&e))?;
    let build = |layers: &Layers, name: &str| -> Result<Arc<dyn RateLimiter>, StartError> {
        Ok(match &redis {
            None => Arc::new(LayeredMemory::new(layers, rl.max_keys).map_err(|e| other(&e))?),
            Some(connection) => Arc::new(
                RedisLimiter::new(
                    layers,
                    connection.clone(),
                    &format!("{}{name}:", rl.redis_key_prefix),
                )
                .map_err(|e| other(&e))?,
            ),
        })
    };
    Ok(Api::new(
        settings,
        minter,
        build(&per_ip, "api")?,
        build(&quotes, "quote")?,
        metrics,
    ))
}

/// Ticket verification with its replay guard: in Redis when the limits are (so every
/// replica refuses a `jti` any replica has seen), else in memory, bounded by `max_keys`.
fn build_tickets(
    settings: &Settings,
    secret: &TicketSecret,
    redis: Option<RedisConn>,
) -> TicketVerifier {
    let rl = &settings.config.rate_limit;
    let replay: Arc<dyn ReplayGuard> = match redis {
        Some(connection) => Arc::new(RedisReplayGuard::new(connection, &rl.redis_key_prefix)),
        None => Arc::new(MemoryReplayGuard::new(rl.max_keys)),
    };
    TicketVerifier::new(secret, settings.config.addresses.ticket_max_age_s, replay)
}

/// The webhook receiver; delivery ids in the ticket replay store's kind of store (Redis
/// with that backend, under their own key prefix; else memory, bounded by `max_keys`).
fn build_webhooks(
    settings: &Settings,
    secrets: crate::webhook::signature::WebhookSecrets,
    redis: Option<RedisConn>,
    metrics: Arc<Metrics>,
) -> crate::webhook::WebhookReceiver {
    let rl = &settings.config.rate_limit;
    let seen: Arc<dyn ReplayGuard> = match redis {
        Some(connection) => Arc::new(RedisReplayGuard::new(
            connection,
            &format!("{}webhook:", rl.redis_key_prefix),
        )),
        None => Arc::new(MemoryReplayGuard::new(rl.max_keys)),
    };
    tracing::info!(
        path = %settings.config.webhooks.path,
        forward_path = %settings.config.webhooks.forward_path,
        secrets = secrets.len(),
        "webhook receiver enabled"
    );
    crate::webhook::WebhookReceiver::new(settings, secrets, seen, metrics)
}

/// The token-minting side: CDP client, per-IP rate limiter, validation rules.
fn build_minter(
    settings: &Arc<Settings>,
    key: CdpKey,
    limiter: Arc<dyn RateLimiter>,
    metrics: Arc<Metrics>,
    tickets: Option<TicketVerifier>,
) -> Result<Minter, StartError> {
    if settings.cdp_api_base.scheme() == "http" {
        tracing::warn!(
            api_base = %settings.cdp_api_base,
            "cdp.api_base is plain http: only for a local fake CDP, never for Coinbase"
        );
    }
    let key_id = key.id().to_string();
    let algorithm = key.algorithm().as_str();
    let cdp = CdpClient::new(
        &settings.cdp_api_base,
        Arc::new(key),
        settings.cdp_timeout(),
        settings.cdp_ca.as_ref(),
    )
    .map_err(|e| StartError::Other(e.to_string()))?
    .with_max_concurrent(settings.config.rate_limit.max_concurrent_cdp_calls);
    tracing::info!(key_id = %key_id, algorithm, token_url = %cdp.token_url(), "CDP API key loaded");
    Ok(Minter::new(
        settings.clone(),
        cdp,
        limiter,
        metrics,
        tickets,
    ))
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// Waits for SIGTERM or SIGINT. SIGHUP in the meantime reloads the certificate.
async fn wait_for_shutdown_signal(certs: &CertStore) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "SIGTERM", "signal received"); return Ok(()); }
            _ = int.recv() => { tracing::info!(signal = "SIGINT", "signal received"); return Ok(()); }
            _ = hup.recv() => match certs.reload() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: certificate reload failed; keeping the current one"),
            },
        }
    }
}

/// A plain-HTTP connection (the HTTP→HTTPS redirect listener, the admin listener):
/// HTTP/1.1, what probes, scrapers and browsers speak there (no h2c).
#[allow(clippy::too_many_arguments)]
async fn serve_plain<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    lease: ConnLease,
    builder: Arc<HttpBuilders>,
    handler: Arc<H>,
    timeouts: ConnTimeouts,
    drain: CancellationToken,
    metrics: Option<Arc<Metrics>>,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let conn = Arc::new(ConnInfo::new(peer, local).with_lease(lease));
    serve_http(
        stream,
        Protocol::Http1,
        conn,
        builder,
        handler,
        timeouts,
        drain,
        metrics,
    )
    .await;
}

/// The HTTPS listener's per-connection work: optional PROXY header, TLS handshake
/// (bounded by the header read timeout), then HTTP.
struct TlsFrontend {
    acceptor: TlsAcceptor,
    builder: Arc<HttpBuilders>,
    app: Arc<App>,
    metrics: Arc<Metrics>,
    drain: CancellationToken,
    handshake_timeout: Duration,
    timeouts: ConnTimeouts,
    /// `Some` when `proxy_protocol = "on"`: who may send the header.
    proxy_protocol: Option<ClientIpPolicy>,
    /// The listener's slots: a client named by a PROXY header takes its per-IP slot.
    limits: Arc<ConnLimits>,
    fallback_local: SocketAddr,
}

/// A client connection once it is past the PROXY header (if any) and the TLS handshake.
enum Accepted {
    Direct(TlsStream<TcpStream>, ConnInfo),
    Proxied(TlsStream<ProxiedStream<TcpStream>>, ConnInfo),
}

impl TlsFrontend {
    /// A client connection, start to end, in two phases with very different footprints:
    /// getting to HTTP (PROXY header, TLS handshake with rustls' whole state inline,
    /// ~3.5 KiB) and serving HTTP (~0.5 KiB, for as long as the keep-alive lasts). A
    /// future is as large as its largest state, and an `async fn` keeps its arguments
    /// for its whole life; so the first phase is a boxed future that owns the socket and
    /// is freed when it ends, and the connection's task holds only that box and then the
    /// HTTP future (4 KiB → 0.5 KiB per connection, for its whole life).
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        lease: ConnLease,
    ) -> impl Future<Output = ()> + Send + 'static {
        let accepting = Box::pin(self.clone().accept(stream, peer, lease));
        async move {
            let Some(accepted) = accepting.await else {
                return;
            };
            self.serve_accepted(accepted).await;
        }
    }

    /// The PROXY header when it is on (and the per-IP slot of the client it names),
    /// then the TLS handshake. `None`: refused or already answered (counted and logged
    /// where that was decided).
    async fn accept(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        lease: ConnLease,
    ) -> Option<Accepted> {
        let local = stream.local_addr().unwrap_or(self.fallback_local);
        let Some(policy) = &self.proxy_protocol else {
            let tls = self.handshake(stream, peer).await?;
            return Some(Accepted::Direct(
                tls,
                ConnInfo::new(peer, local).with_lease(lease),
            ));
        };
        match proxy_protocol::accept(stream, peer, policy).await {
            Ok((stream, client)) => {
                let mut lease = lease;
                if !self.limits.admit_named_client(&mut lease, client.ip()) {
                    self.metrics.count_connection_refused("per_ip");
                    tracing::debug!(
                        peer = %peer,
                        client = %client,
                        "connection refused: server.max_connections_per_ip (client named by the PROXY header)"
                    );
                    return None;
                }
                let conn = ConnInfo::new(client, local)
                    .named_by_proxy_header()
                    .with_lease(lease);
                let tls = self.handshake(stream, client).await?;
                Some(Accepted::Proxied(tls, conn))
            }
            Err(e) => {
                self.metrics.count_handshake_failure(e.reason());
                tracing::debug!(peer = %peer, error = %e, "connection refused: PROXY protocol");
                None
            }
        }
    }

    /// Not an `async fn`, so the accepted connection is moved straight into the HTTP
    /// future and never kept beside it.
    fn serve_accepted(&self, accepted: Accepted) -> impl Future<Output = ()> + Send + 'static {
        match accepted {
            Accepted::Direct(tls, conn) => Either::Left(self.serve_tls(tls, conn)),
            Accepted::Proxied(tls, conn) => Either::Right(self.serve_tls(tls, conn)),
        }
    }

    /// HTTP on an established TLS stream. Not an `async fn`: the stream is borrowed (for
    /// its ALPN) and moved on here, outside the caller's state. A borrowed local of an
    /// `async fn` keeps its storage in the future until its scope ends, so reading the
    /// ALPN there kept a second, dead copy of the TLS stream (1.2 KiB) beside the HTTP
    /// future in every connection's task.
    fn serve_tls<IO>(
        &self,
        tls: TlsStream<IO>,
        conn: ConnInfo,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let protocol = Protocol::from_alpn(tls.get_ref().1.alpn_protocol());
        serve_http(
            tls,
            protocol,
            Arc::new(conn),
            self.builder.clone(),
            self.app.clone(),
            self.timeouts,
            self.drain.clone(),
            Some(self.metrics.clone()),
        )
    }

    /// The TLS handshake within the header read timeout; `None` when it failed (counted
    /// and logged here) or when it was the whole exchange (a TLS-ALPN-01 validation).
    async fn handshake<IO>(&self, io: IO, peer: SocketAddr) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io)).await {
            // A TLS-ALPN-01 validation: the handshake was the whole answer (RFC 8737 §3).
            Ok(Ok(mut tls))
                if tls.get_ref().1.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) =>
            {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                None
            }
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                self.metrics.count_handshake_failure(reason);
                tracing::debug!(peer = %peer, reason, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.metrics.count_handshake_failure("timeout");
                tracing::debug!(peer = %peer, "TLS handshake timed out");
                None
            }
        }
    }
}

/// A short label for the TLS handshake failure metric.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidMessage(_) => "invalid_message",
            rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => "unexpected_message",
            rustls::Error::NoApplicationProtocol => "no_alpn_match",
            rustls::Error::PeerIncompatible(_) => "incompatible",
            rustls::Error::AlertReceived(_) => "alert_received",
            rustls::Error::PeerMisbehaved(_) => "peer_misbehaved",
            _ => "other",
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "eof",
        std::io::ErrorKind::ConnectionReset => "reset",
        _ => "io",
    }
}

/// The optional plain-HTTP listener: every request gets a 308 to the same host and
/// path on the HTTPS listener. The host is the one the client asked for (only a
/// syntactically valid host is echoed, so the redirect cannot be pointed elsewhere
/// with a crafted header).
struct RedirectToHttps {
    https_port: u16,
}

impl Handler for RedirectToHttps {
    async fn handle(&self, req: Request<Incoming>, _conn: Arc<ConnInfo>) -> Response<ResponseBody> {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|a| a.host().to_string());
        let Some(host) = host else {
            let mut r = Response::new(full("missing or invalid Host header\n"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{port}{path}");
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        match HeaderValue::from_str(&location) {
            Ok(v) => {
                r.headers_mut().insert(LOCATION, v);
            }
            Err(_) => *r.status_mut() = StatusCode::BAD_REQUEST,
        }
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::returned_size;

    /// Every open connection's task is this future, idle or not, for as long as the
    /// connection lasts. It held the TLS handshake's state (4 KiB in release builds)
    /// until the handshake moved into a boxed future of its own; this keeps it out.
    #[test]
    fn a_connection_task_does_not_keep_the_handshake_state() {
        let task = returned_size(
            |(frontend, stream, peer, lease): (
                Arc<TlsFrontend>,
                TcpStream,
                SocketAddr,
                ConnLease,
            )| { frontend.serve(stream, peer, lease) },
        );
        let tls_stream = std::mem::size_of::<TlsStream<TcpStream>>();
        assert!(
            task < tls_stream,
            "the connection task future is {task} bytes, more than a TLS stream ({tls_stream})"
        );
    }
}
