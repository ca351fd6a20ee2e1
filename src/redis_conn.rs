//! The one shared Redis connection (`rate_limit.backend = "redis"`): plain or TLS
//! (`rediss://`), a single server or a Redis Cluster (`rate_limit.redis_cluster`).
//!
//! Everything that talks to Redis (the layered limiter, the ticket and webhook replay
//! guards) holds a [`RedisConn`], a cheap clone that implements the crate's
//! `aio::ConnectionLike`, so TLS and cluster are decided here, once:
//!
//! - TLS goes through the `redis` crate's rustls support. That crate enables no rustls
//!   provider feature of its own and builds its `ClientConfig` with the process default,
//!   which is the aws-lc-rs provider `main` installs (no `ring` in the tree). The roots are
//!   the system's (`rustls-native-certs`); `rate_limit.redis_ca_file` *adds* a CA. The crate
//!   takes custom roots only as a replacement PEM, so the system roots are re-encoded into it.
//! - A cluster connection is made on first use (as `ConnectionManager::new_lazy` does for a
//!   single server): the gateway starts and serves while Redis is down, applying
//!   `on_backend_error`, and a failed attempt is retried by the next call. Once made, the
//!   crate's cluster connection follows slot moves and reconnects to nodes by itself.
//! - [`prepare`] builds the client without connecting. `check` calls it too, so it refuses
//!   exactly what the run would (bad URL, unreadable or empty CA file, cluster over a unix
//!   socket or on a database other than 0, unreadable system roots).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, Value};

use crate::ratelimit::redis::CALL_TIMEOUT;

/// What `[rate_limit]` says about the connection.
#[derive(Debug, Clone, Copy)]
pub struct RedisOptions<'a> {
    pub url: &'a str,
    /// Resolved `rate_limit.redis_ca_file`.
    pub ca_file: Option<&'a Path>,
    pub cluster: bool,
}

/// Why the connection cannot be set up, named by the config key to change.
#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    #[error("rate_limit.redis_url: {0}")]
    Url(String),
    #[error("rate_limit.redis_ca_file: {0}")]
    CaFile(String),
    #[error("rate_limit.redis_cluster: {0}")]
    Cluster(String),
}

impl RedisConnError {
    /// The dotted config key, for `check`.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Url(_) => "rate_limit.redis_url",
            Self::CaFile(_) => "rate_limit.redis_ca_file",
            Self::Cluster(_) => "rate_limit.redis_cluster",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Self::Url(d) | Self::CaFile(d) | Self::Cluster(d) => d,
        }
    }
}

/// A built client that has not connected yet.
// Built once at start-up (and by `check`) and consumed at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Prepared {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// Builds the client for `options` without any network traffic.
pub fn prepare(options: RedisOptions<'_>) -> Result<Prepared, RedisConnError> {
    let url = url::Url::parse(options.url)
        .map_err(|e| RedisConnError::Url(format!("invalid Redis URL: {e}")))?;
    let tls = match url.scheme() {
        "rediss" => true,
        "redis" => false,
        "unix" | "redis+unix" if options.cluster => {
            return Err(RedisConnError::Cluster(
                "a cluster is reached over TCP (its nodes announce IP:port): use redis:// or rediss:// with one seed node".into(),
            ))
        }
        "unix" | "redis+unix" => false,
        other => {
            return Err(RedisConnError::Url(format!(
                "unsupported scheme {other:?} (expected redis://, rediss:// or unix://)"
            )))
        }
    };
    let certificates = match options.ca_file {
        Some(path) if !tls => {
            return Err(RedisConnError::CaFile(format!(
                "{} is only used with a rediss:// URL",
                path.display()
            )))
        }
        Some(path) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(roots_with_ca(path)?),
        }),
        None if tls => {
            // The crate loads the system roots on every TLS connect and fails the
            // connect on any error there: refuse that now, not on the first request.
            system_roots_pem()?;
            None
        }
        None => None,
    };
    let bad_url = |e: redis::RedisError| RedisConnError::Url(e.to_string());
    if options.cluster {
        if url
            .path()
            .trim_matches('/')
            .parse::<i64>()
            .is_ok_and(|db| db != 0)
        {
            return Err(RedisConnError::Cluster(
                "a cluster has only database 0: drop the /N from rate_limit.redis_url".into(),
            ));
        }
        let mut builder = ClusterClientBuilder::new(vec![options.url])
            .connection_timeout(CALL_TIMEOUT)
            .response_timeout(CALL_TIMEOUT)
            // The caller bounds each call by CALL_TIMEOUT anyway; a short retry budget keeps
            // requests abandoned by that bound from piling up inside the connection.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates);
        }
        builder.build().map(Prepared::Cluster).map_err(bad_url)
    } else {
        let client = match certificates {
            Some(certificates) => redis::Client::build_with_tls(options.url, certificates),
            None => redis::Client::open(options.url),
        };
        client.map(Prepared::Single).map_err(bad_url)
    }
}

/// The system roots plus the CA in `path` (read and checked by the one `*.ca_file`
/// loader, [`crate::ca_file`]), as one PEM bundle.
fn roots_with_ca(path: &Path) -> Result<Vec<u8>, RedisConnError> {
    let ca = crate::ca_file::ExtraRoots::load(path).map_err(RedisConnError::CaFile)?;
    let mut pem = system_roots_pem()?;
    for cert in ca.certs() {
        push_pem(&mut pem, cert.as_ref());
    }
    Ok(pem)
}

/// The system roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` or the distribution's bundle) as PEM.
/// None at all (a `FROM scratch` image without a bundle) is not an error: a CA file may
/// still be given.
fn system_roots_pem() -> Result<Vec<u8>, RedisConnError> {
    let loaded = rustls_native_certs::load_native_certs();
    if let Some(e) = loaded.errors.first() {
        return Err(RedisConnError::Url(format!(
            "cannot load the system CA roots for rediss://: {e}"
        )));
    }
    let mut pem = Vec::new();
    for cert in loaded.certs {
        push_pem(&mut pem, cert.as_ref());
    }
    Ok(pem)
}

/// Appends one certificate as a PEM block.
fn push_pem(pem: &mut Vec<u8>, der: &[u8]) {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.extend_from_slice(line);
        pem.push(b'\n');
    }
    pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
}

/// The shared connection: a cheap clone.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use; a failed attempt leaves it unmade, so the
/// next call tries again.
pub struct LazyCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// A lazily connecting, self-reconnecting connection whose connects and calls are bounded
/// by [`CALL_TIMEOUT`]. Does not touch the network.
pub fn connect_lazy(options: RedisOptions<'_>) -> Result<RedisConn, RedisConnError> {
    match prepare(options)? {
        Prepared::Single(client) => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            ConnectionManager::new_lazy_with_config(client, config)
                .map(RedisConn::Single)
                .map_err(|e| RedisConnError::Url(e.to_string()))
        }
        Prepared::Cluster(client) => Ok(RedisConn::Cluster(Arc::new(LazyCluster {
            client,
            connection: tokio::sync::OnceCell::new(),
        }))),
    }
}

impl RedisConn {
    /// With a cluster, each key is its own slot: a script is called once per key.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Readiness: `PING`. On a cluster one answering primary is enough: the keys of a
    /// failed node get `on_backend_error` per request, and a not-ready verdict would take
    /// every replica (and the proxying) out of the balancer for a partial outage.
    pub async fn ping(&mut self) -> RedisResult<String> {
        match self {
            Self::Single(connection) => redis::cmd("PING").query_async(connection).await,
            Self::Cluster(lazy) => {
                let mut connection = lazy.get().await?;
                let reply = connection
                    .route_command(
                        redis::cmd("PING"),
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllMasters,
                            Some(ResponsePolicy::OneSucceeded),
                        )),
                    )
                    .await?;
                String::from_redis_value(reply).map_err(Into::into)
            }
        }
    }
}

/// `EVALSHA`, and on `NOSCRIPT` an `EVAL` of the source on the same keys. Unlike the
/// crate's `Script::invoke_async` (which sends `SCRIPT LOAD`, routed to *every* node of a
/// cluster and failing when one is down), the fallback goes where the keys go and leaves
/// the script cached on that node: the script is loaded per node, as each node needs it
/// (a restarted node starts with an empty script cache).
pub async fn eval_script<T: FromRedisValue>(
    connection: &mut RedisConn,
    script: &Script,
    source: &str,
    keys: &[String],
    args: &[i64],
) -> RedisResult<T> {
    let call = |verb: &str, body: &str| {
        let mut cmd = redis::cmd(verb);
        cmd.arg(body).arg(keys.len()).arg(keys).arg(args);
        cmd
    };
    match call("EVALSHA", script.get_hash())
        .query_async(connection)
        .await
    {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            call("EVAL", source).query_async(connection).await
        }
        other => other,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            // A cluster has only database 0 (prepare refuses another).
            Self::Cluster(_) => 0,
        }
    }
}
