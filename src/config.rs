//! `config.toml`: typed, strict (unknown keys refused), validated once at start-up.
//!
//! Parsing (serde + toml) catches unknown keys and wrong types; [`Config::validate`]
//! then checks what types cannot express (addresses parse, timeouts > 0, paths start
//! with `/`, ...). Every problem found is reported, each naming the file and the key,
//! the way oauth2-proxy collects all messages instead of stopping at the first one.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::onramp::request::RedirectRule;

/// One bad key (or an unreadable/unparsable file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `server.listen`; empty when the file as a whole is the problem.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.file.display(), p.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), p.key, p.message)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub cdp: CdpConfig,
    pub onramp: OnrampConfig,
    pub offramp: OfframpConfig,
    pub addresses: AddressesConfig,
    pub rate_limit: RateLimitConfig,
    pub cors: CorsConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
    pub webhooks: WebhooksConfig,
    pub orders: OrdersConfig,
}

/// `[webhooks]`: Coinbase transaction webhooks, verified and forwarded to the app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where Coinbase delivers; `""` = off.
    pub path: String,
    /// Environment variable with the subscription secret(s), comma-separated (rotation).
    pub secrets_env: String,
    pub tolerance_s: u64,
    /// Verified deliveries are POSTed to `{upstream.url}{forward_path}`; never proxied.
    pub forward_path: String,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            secrets_env: "CDP_WEBHOOK_SECRETS".into(),
            tolerance_s: 300,
            forward_path: "/onramp-events".into(),
        }
    }
}

/// `[orders]`: headless Apple Pay / Google Pay orders (`POST {api.prefix}/orders`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    pub enabled: bool,
    /// The site the payment link is embedded on (CDP's `domain`); `""` = not sent.
    pub domain: String,
}

/// `[api]`: JSON endpoints for browser SDKs (buy config/options/quote, transactions).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `""` disables the endpoints (the paths are then proxied like any other).
    pub prefix: String,
    pub cache_s: u64,
    pub requests_per_minute: u32,
    pub burst: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            prefix: "/onramp/api".into(),
            cache_s: 300,
            requests_per_minute: 60,
            burst: 20,
        }
    }
}

/// `onramp.api`: which Coinbase API mints onramp sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnrampApi {
    /// Session token (`/onramp/v1/token`) + `onramp.url`.
    V1,
    /// Create Onramp Session (`/v2/onramp/sessions`): Coinbase returns the URL.
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub http_listen: String,
    pub workers: usize,
    pub max_connections: usize,
    /// 0 = off; counted at accept, before TLS; WebSocket tunnels count.
    pub max_connections_per_ip: usize,
    /// `Upgrade` tokens passed to the app (case-insensitive); any other: 400.
    pub upgrade_protocols: Vec<String>,
    pub header_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub shutdown_delay_ms: u64,
    pub shutdown_grace_ms: u64,
    pub proxy_protocol: ProxyProtocol,
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".into(),
            http_listen: String::new(),
            workers: 0,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            upgrade_protocols: vec!["websocket".into()],
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_header_bytes: 65_536,
            shutdown_delay_ms: 0,
            shutdown_grace_ms: 30_000,
            proxy_protocol: ProxyProtocol::Off,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    Off,
    On,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
    /// `[tls.acme]`: automatic certificates; `cert`/`key` are then unused.
    pub acme: Option<AcmeConfig>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: "certs/tls.crt".into(),
            key: "certs/tls.key".into(),
            self_signed: false,
            acme: None,
        }
    }
}

/// `[tls.acme]`: certificates ordered and renewed over ACME with TLS-ALPN-01.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    pub domains: Vec<String>,
    /// `mailto:` URI for the CA's expiry and incident mail.
    pub contact: String,
    /// Account key and issued certificate; relative to the config file's directory.
    pub cache_dir: PathBuf,
    /// Extra trust for the directory's HTTPS certificate (a private or test CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: String,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout_ms: 2_000,
            response_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    /// Own limit, so client traffic (or idle keep-alives) cannot starve the probes.
    pub max_connections: usize,
    /// Admin connections idle longer than this are closed.
    pub idle_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9901".into(),
            max_connections: 64,
            idle_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdpConfig {
    pub api_base: String,
    pub key_file: String,
    pub timeout_ms: u64,
    pub substitute_private_client_ip: String,
    /// v2 APIs (sessions, orders, webhooks subscriptions), with the `/platform` prefix.
    pub platform_base: String,
    /// PEM CA certificates the CDP client trusts in addition to its built-in roots
    /// (a corporate egress TLS proxy, a test CA); "" = none.
    pub ca_file: String,
}

impl Default for CdpConfig {
    fn default() -> Self {
        Self {
            platform_base: "https://api.cdp.coinbase.com/platform".into(),
            api_base: "https://api.developer.coinbase.com".into(),
            key_file: String::new(),
            timeout_ms: 5_000,
            substitute_private_client_ip: String::new(),
            ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnrampConfig {
    pub path: String,
    pub url: String,
    pub blockchains: Vec<String>,
    pub assets: Vec<String>,
    /// `Sec-Fetch-Site` values that may mint (see `crate::fetch_site`).
    pub allowed_fetch_sites: Vec<String>,
    pub api: OnrampApi,
    /// v2: `sandbox-` partnerUserRef prefix and the pay-sandbox host.
    pub sandbox: bool,
}

impl Default for OnrampConfig {
    fn default() -> Self {
        Self {
            path: "/onramp".into(),
            url: "https://pay.coinbase.com/buy/select-asset".into(),
            blockchains: vec!["base".into(), "ethereum".into()],
            assets: Vec::new(),
            allowed_fetch_sites: vec!["same-origin".into(), "none".into()],
            api: OnrampApi::V1,
            sandbox: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfframpConfig {
    pub path: String,
    pub url: String,
    pub redirect_url_allowlist: Vec<String>,
}

impl Default for OfframpConfig {
    fn default() -> Self {
        Self {
            path: "/offramp".into(),
            url: "https://pay.coinbase.com/v3/sell/input".into(),
            redirect_url_allowlist: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSource {
    Request,
    Upstream,
    Ticket,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddressesConfig {
    pub source: AddressSource,
    pub context_path: String,
    /// Name of the environment variable holding the HS256 ticket key (`source = "ticket"`).
    pub ticket_secret_env: String,
    pub ticket_max_age_s: u64,
}

impl Default for AddressesConfig {
    fn default() -> Self {
        Self {
            source: AddressSource::Request,
            context_path: "/.well-known/onramp-context".into(),
            ticket_secret_env: "ONRAMP_TICKET_SECRET".into(),
            ticket_max_age_s: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimiterBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub ipv6_prefix: u8,
    pub backend: LimiterBackend,
    pub redis_url: String,
    /// Extension to SPEC.md: prefix of the Redis keys (one per client IP).
    pub redis_key_prefix: String,
    /// PEM CA added to the system roots for a `rediss://` URL ("" = system roots only).
    pub redis_ca_file: String,
    /// `redis_url` names one seed node of a Redis Cluster.
    pub redis_cluster: bool,
    pub on_backend_error: OnBackendError,
    pub aggregate_ipv4_prefix: u8,
    pub aggregate_ipv6_prefix: u8,
    /// 0 = no aggregate (prefix) bucket.
    pub aggregate_requests_per_minute: u32,
    /// 0 = 4 x burst.
    pub aggregate_burst: u32,
    /// 0 = no global bucket.
    pub global_mints_per_second: u32,
    pub max_concurrent_cdp_calls: usize,
    pub max_keys: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 10,
            burst: 5,
            ipv6_prefix: 64,
            backend: LimiterBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_key_prefix: "onramp-gateway:rl:".into(),
            redis_ca_file: String::new(),
            redis_cluster: false,
            on_backend_error: OnBackendError::Deny,
            aggregate_ipv4_prefix: 24,
            aggregate_ipv6_prefix: 48,
            aggregate_requests_per_minute: 0,
            aggregate_burst: 0,
            global_mints_per_second: 0,
            max_concurrent_cdp_calls: 256,
            max_keys: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Values derived from the raw config during validation, in the types the server uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The file it was read from (empty when validated from a string).
    pub config_file: PathBuf,
    /// Directory of the config file: relative file paths in it are resolved against it.
    pub base_dir: PathBuf,
    pub listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub upstream: http::Uri,
    pub cdp_api_base: url::Url,
    /// `cdp.platform_base`, always ending in `/` so `join("v2/...")` keeps `/platform`.
    pub cdp_platform_base: url::Url,
    pub cdp_key_file: Option<PathBuf>,
    /// `cdp.ca_file`, resolved against the config file's directory, read and checked.
    pub cdp_ca: Option<crate::ca_file::ExtraRoots>,
    /// `rate_limit.redis_ca_file`, resolved against the config file's directory.
    pub redis_ca_file: Option<PathBuf>,
    pub substitute_private_client_ip: Option<IpAddr>,
    pub onramp_url: url::Url,
    pub offramp_url: url::Url,
    pub redirect_allowlist: Vec<RedirectRule>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// `[tls.acme]`, validated, paths resolved.
    pub acme: Option<crate::acme::AcmeSettings>,
    /// `[server]`/`[admin]` connection limits and the upgrade allowlist, typed.
    pub conn: ConnSettings,
}

/// The connection-level settings of `[server]` and `[admin]`, validated and typed, so
/// runtime code does not read the raw `Config` for them.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub max_connections: usize,
    /// 0 = off.
    pub max_connections_per_ip: usize,
    /// Lower-case `Upgrade` protocol names the app may be switched to.
    pub upgrade_protocols: Vec<String>,
    pub max_header_bytes: usize,
    pub workers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    /// `server.proxy_protocol = "on"`.
    pub proxy_protocol: bool,
    pub upstream_connect_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub admin_max_connections: usize,
    pub admin_idle_timeout: Duration,
}

/// The largest `max_connections` accepted: far above what one process can hold open
/// (each connection costs tens of KiB), and far below tokio's semaphore limit, which
/// panics at start-up when exceeded.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl Settings {
    // `[server]` and `[upstream]` values come from the typed `conn` settings, never
    // from the raw `Config`.
    pub fn header_read_timeout(&self) -> Duration {
        self.conn.header_read_timeout
    }
    pub fn idle_timeout(&self) -> Duration {
        self.conn.idle_timeout
    }
    pub fn shutdown_delay(&self) -> Duration {
        self.conn.shutdown_delay
    }
    pub fn shutdown_grace(&self) -> Duration {
        self.conn.shutdown_grace
    }
    pub fn upstream_connect_timeout(&self) -> Duration {
        self.conn.upstream_connect_timeout
    }
    pub fn upstream_response_timeout(&self) -> Duration {
        self.conn.upstream_response_timeout
    }
    pub fn cdp_timeout(&self) -> Duration {
        Duration::from_millis(self.config.cdp.timeout_ms)
    }
}

/// Where the config file is: `--config`, else `ONRAMP_GATEWAY_CONFIG`, else `config.toml`
/// (clap resolves the first two).
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let fail = |message: String| ConfigError {
        file: path.to_path_buf(),
        problems: vec![ConfigProblem {
            key: String::new(),
            message,
        }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let config = parse(&text).map_err(|(key, message)| ConfigError {
        file: path.to_path_buf(),
        problems: vec![ConfigProblem { key, message }],
    })?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut settings = config.validate(&base_dir).map_err(|problems| ConfigError {
        file: path.to_path_buf(),
        problems,
    })?;
    settings.config_file = path.to_path_buf();
    Ok(settings)
}

/// Parses the TOML text. On error returns the dotted key (when there is one) and a
/// one-line message: serde_path_to_error tracks where in the document a type error
/// happened, which serde alone forgets ("invalid value" without the key).
pub fn parse(text: &str) -> Result<Config, (String, String)> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| (String::new(), one_line(&e)))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let key = if key == "." { String::new() } else { key };
        (key, one_line(&inner))
    })
}

/// toml's message plus the line it is on, flattened to one line for container logs.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

/// Collects problems while checking every key.
struct Checker {
    problems: Vec<ConfigProblem>,
}

impl Checker {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.bad(
                    key,
                    format!("invalid socket address {value:?} (expected e.g. \"0.0.0.0:8443\" or \"[::]:8443\")"),
                );
                None
            }
        }
    }

    fn optional_socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        if value.is_empty() {
            None
        } else {
            self.socket_addr(key, value)
        }
    }

    fn positive(&mut self, key: &str, value: u64) {
        if value == 0 {
            self.bad(key, "must be greater than 0");
        }
    }

    fn route_path(&mut self, key: &str, value: &str) {
        if !value.starts_with('/') {
            self.bad(key, format!("must start with '/' (got {value:?})"));
        } else if value.contains(['?', '#', ' ']) {
            self.bad(
                key,
                format!("must be a plain path without query or fragment (got {value:?})"),
            );
        }
    }

    fn url(&mut self, key: &str, value: &str, allow_http: bool) -> Option<url::Url> {
        match url::Url::parse(value) {
            Ok(u) if u.scheme() == "https" || (allow_http && u.scheme() == "http") => {
                if u.host_str().is_none() {
                    self.bad(key, format!("URL has no host: {value:?}"));
                    None
                } else {
                    Some(u)
                }
            }
            Ok(u) => {
                self.bad(
                    key,
                    format!("unsupported scheme {:?} in {value:?}", u.scheme()),
                );
                None
            }
            Err(e) => {
                self.bad(key, format!("invalid URL {value:?}: {e}"));
                None
            }
        }
    }

    fn readable_file(&mut self, key: &str, path: &Path) {
        if let Err(e) = std::fs::File::open(path) {
            self.bad(key, format!("cannot read {}: {e}", path.display()));
        }
    }
}

impl Config {
    /// Checks every key and derives [`Settings`]. Returns all problems found.
    pub fn validate(self, base_dir: &Path) -> Result<Settings, Vec<ConfigProblem>> {
        let mut c = Checker {
            problems: Vec::new(),
        };
        let s = &self.server;
        let listen = c.socket_addr("server.listen", &s.listen);
        let http_listen = c.optional_socket_addr("server.http_listen", &s.http_listen);
        if s.max_connections == 0 || s.max_connections > MAX_CONNECTIONS_LIMIT {
            c.bad(
                "server.max_connections",
                format!(
                    "must be between 1 and {MAX_CONNECTIONS_LIMIT} (got {})",
                    s.max_connections
                ),
            );
        }
        if s.max_connections_per_ip > MAX_CONNECTIONS_LIMIT {
            c.bad(
                "server.max_connections_per_ip",
                format!(
                    "must be between 0 (off) and {MAX_CONNECTIONS_LIMIT} (got {})",
                    s.max_connections_per_ip
                ),
            );
        }
        let mut upgrade_protocols = Vec::new();
        for (i, p) in s.upgrade_protocols.iter().enumerate() {
            if is_token(p) {
                upgrade_protocols.push(p.to_ascii_lowercase());
            } else {
                c.bad(
                    &format!("server.upgrade_protocols[{i}]"),
                    format!("not an HTTP token {p:?} (e.g. \"websocket\")"),
                );
            }
        }
        c.positive("server.header_read_timeout_ms", s.header_read_timeout_ms);
        c.positive("server.idle_timeout_ms", s.idle_timeout_ms);
        c.positive("server.shutdown_grace_ms", s.shutdown_grace_ms);
        if s.max_header_bytes < 1024 || s.max_header_bytes > 1024 * 1024 {
            c.bad(
                "server.max_header_bytes",
                "must be between 1024 and 1048576",
            );
        }
        if s.workers > 1024 {
            c.bad("server.workers", "must be between 0 (one per CPU) and 1024");
        }
        let mut trusted_proxies = Vec::new();
        for (i, cidr) in s.trusted_proxies.iter().enumerate() {
            match parse_cidr(cidr) {
                Some(net) if net.prefix_len() == 0 => c.bad(
                    &format!("server.trusted_proxies[{i}]"),
                    format!("{cidr:?} trusts every address on the Internet: anyone could choose their client IP; list the balancer's ranges"),
                ),
                Some(net) => trusted_proxies.push(net),
                None => c.bad(
                    &format!("server.trusted_proxies[{i}]"),
                    format!("invalid CIDR or IP address {cidr:?}"),
                ),
            }
        }
        if s.proxy_protocol == ProxyProtocol::On && trusted_proxies.is_empty() {
            c.bad(
                "server.proxy_protocol",
                "\"on\" needs server.trusted_proxies: a PROXY header is only believed from a trusted peer",
            );
        }

        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        let tls_cert = resolve(&self.tls.cert);
        let tls_key = resolve(&self.tls.key);
        let acme = self
            .tls
            .acme
            .as_ref()
            .and_then(|a| check_acme(&mut c, a, self.tls.self_signed, &resolve));
        if !self.tls.self_signed && self.tls.acme.is_none() {
            c.readable_file("tls.cert", &tls_cert);
            c.readable_file("tls.key", &tls_key);
        }

        let upstream = match self.upstream.url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {
                if u.path() != "/" && !u.path().is_empty() || u.query().is_some() {
                    c.bad(
                        "upstream.url",
                        format!("must be an origin without path or query, e.g. \"http://127.0.0.1:3000\" (got {:?})", self.upstream.url),
                    );
                }
                Some(u)
            }
            Ok(_) => {
                c.bad(
                    "upstream.url",
                    format!(
                        "must be a plain http:// origin such as \"http://127.0.0.1:3000\" (got {:?}); the app is reached over the pod or host network",
                        self.upstream.url
                    ),
                );
                None
            }
            Err(e) => {
                c.bad(
                    "upstream.url",
                    format!("invalid URL {:?}: {e}", self.upstream.url),
                );
                None
            }
        };
        c.positive(
            "upstream.connect_timeout_ms",
            self.upstream.connect_timeout_ms,
        );
        c.positive(
            "upstream.response_timeout_ms",
            self.upstream.response_timeout_ms,
        );

        let admin_listen = c.optional_socket_addr("admin.listen", &self.admin.listen);
        if self.admin.max_connections == 0 || self.admin.max_connections > 10_000 {
            c.bad("admin.max_connections", "must be between 1 and 10000");
        }
        c.positive("admin.idle_timeout_ms", self.admin.idle_timeout_ms);

        let cdp_api_base = c.url("cdp.api_base", &self.cdp.api_base, true);
        let cdp_platform_base = c
            .url("cdp.platform_base", &self.cdp.platform_base, true)
            .map(|mut u| {
                if !u.path().ends_with('/') {
                    let path = format!("{}/", u.path());
                    u.set_path(&path);
                }
                u
            });
        let api = &self.api;
        if !api.prefix.is_empty() {
            c.route_path("api.prefix", &api.prefix);
            if api.prefix.ends_with('/') {
                c.bad("api.prefix", "must not end with '/'");
            }
            for (key, path) in [
                ("onramp.path", &self.onramp.path),
                ("offramp.path", &self.offramp.path),
            ] {
                if path.starts_with(&format!("{}/", api.prefix)) || *path == api.prefix {
                    c.bad("api.prefix", format!("must not contain {key} ({path:?})"));
                }
            }
        }
        if api.cache_s > 86_400 {
            c.bad("api.cache_s", "must be at most 86400");
        }
        let api_policy = crate::ratelimit::Policy {
            requests_per_minute: api.requests_per_minute,
            burst: api.burst,
            ipv6_prefix: self.rate_limit.ipv6_prefix.clamp(1, 128),
        };
        if let Err(e) = api_policy.validate() {
            c.bad("api", e.to_string().replace("rate_limit.", "api."));
        }
        self.check_webhooks_and_orders(&mut c);
        let cdp_key_file = if self.cdp.key_file.is_empty() {
            None
        } else {
            let p = resolve(Path::new(&self.cdp.key_file));
            c.readable_file("cdp.key_file", &p);
            Some(p)
        };
        // Loaded here, by the loader the client uses: `check` refuses exactly what the run
        // would, and the run builds its CDP clients from these roots, not from the raw key.
        let cdp_ca = if self.cdp.ca_file.is_empty() {
            None
        } else {
            match crate::ca_file::ExtraRoots::load(&resolve(Path::new(&self.cdp.ca_file))) {
                // Like redis_ca_file without rediss://, a CA no TLS call uses would
                // silently do nothing.
                Ok(_)
                    if [&cdp_api_base, &cdp_platform_base]
                        .iter()
                        .all(|u| u.as_ref().is_some_and(|u| u.scheme() == "http")) =>
                {
                    c.bad(
                        "cdp.ca_file",
                        "only used for https:// (cdp.api_base and cdp.platform_base are both http://)",
                    );
                    None
                }
                Ok(roots) => Some(roots),
                Err(e) => {
                    c.bad("cdp.ca_file", e);
                    None
                }
            }
        };
        c.positive("cdp.timeout_ms", self.cdp.timeout_ms);
        let substitute_private_client_ip = if self.cdp.substitute_private_client_ip.is_empty() {
            None
        } else {
            match self.cdp.substitute_private_client_ip.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    c.bad(
                        "cdp.substitute_private_client_ip",
                        format!(
                            "not an IP address: {:?}",
                            self.cdp.substitute_private_client_ip
                        ),
                    );
                    None
                }
            }
        };

        c.route_path("onramp.path", &self.onramp.path);
        let onramp_url = c.url("onramp.url", &self.onramp.url, true);
        if self.onramp.blockchains.is_empty() {
            c.bad("onramp.blockchains", "must list at least one blockchain");
        }
        for (i, b) in self.onramp.blockchains.iter().enumerate() {
            if b.is_empty()
                || !b
                    .bytes()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == b'-' || ch == b'_')
            {
                c.bad(
                    &format!("onramp.blockchains[{i}]"),
                    format!("invalid blockchain name {b:?}"),
                );
            }
        }
        for (i, a) in self.onramp.assets.iter().enumerate() {
            if a.is_empty()
                || a.len() > 64
                || !a.bytes().all(|ch| ch.is_ascii_alphanumeric() || ch == b'-')
            {
                c.bad(
                    &format!("onramp.assets[{i}]"),
                    format!("invalid asset {a:?}"),
                );
            }
        }

        c.route_path("offramp.path", &self.offramp.path);
        if self.offramp.path == self.onramp.path {
            c.bad("offramp.path", "must differ from onramp.path");
        }
        let offramp_url = c.url("offramp.url", &self.offramp.url, true);
        let mut redirect_allowlist = Vec::new();
        for (i, entry) in self.offramp.redirect_url_allowlist.iter().enumerate() {
            match RedirectRule::parse(entry) {
                Ok(rule) => redirect_allowlist.push(rule),
                Err(e) => c.bad(&format!("offramp.redirect_url_allowlist[{i}]"), e),
            }
        }

        c.route_path("addresses.context_path", &self.addresses.context_path);
        for (i, site) in self.onramp.allowed_fetch_sites.iter().enumerate() {
            if crate::fetch_site::FetchSite::parse(site).is_none() {
                c.bad(
                    &format!("onramp.allowed_fetch_sites[{i}]"),
                    format!("unknown Sec-Fetch-Site value {site:?} (expected \"same-origin\", \"same-site\", \"cross-site\" or \"none\")"),
                );
            }
        }
        let a = &self.addresses;
        if a.ticket_secret_env.is_empty()
            || !a
                .ticket_secret_env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            c.bad(
                "addresses.ticket_secret_env",
                "must be an environment variable name (letters, digits, '_')",
            );
        }
        if a.ticket_max_age_s == 0 || a.ticket_max_age_s > 86_400 {
            c.bad(
                "addresses.ticket_max_age_s",
                "must be between 1 and 86400 seconds",
            );
        }

        let rl = &self.rate_limit;
        if rl.requests_per_minute == 0 {
            c.bad("rate_limit.requests_per_minute", "must be greater than 0");
        }
        if rl.burst == 0 {
            c.bad("rate_limit.burst", "must be greater than 0");
        }
        if rl.ipv6_prefix == 0 || rl.ipv6_prefix > 128 {
            c.bad("rate_limit.ipv6_prefix", "must be between 1 and 128");
        }
        if rl.requests_per_minute > 0 && rl.burst > 0 && rl.ipv6_prefix > 0 {
            // The layered buckets (per IP, per prefix, global), checked as the limiter will
            // build them: one rule, so `check` refuses exactly what start-up would.
            if let Err(e) = crate::ratelimit::Layers::from_config(rl) {
                c.bad("rate_limit", e.to_string());
            }
        }
        if rl.max_concurrent_cdp_calls == 0 || rl.max_concurrent_cdp_calls > 100_000 {
            c.bad(
                "rate_limit.max_concurrent_cdp_calls",
                "must be between 1 and 100000",
            );
        }
        if rl.max_keys == 0 || rl.max_keys > 100_000_000 {
            c.bad("rate_limit.max_keys", "must be between 1 and 100000000");
        }
        if rl.redis_key_prefix.len() > 128 || rl.redis_key_prefix.chars().any(char::is_whitespace) {
            c.bad(
                "rate_limit.redis_key_prefix",
                "at most 128 characters, no whitespace",
            );
        }
        let redis_ca_file =
            (!rl.redis_ca_file.is_empty()).then(|| resolve(Path::new(&rl.redis_ca_file)));
        if rl.backend == LimiterBackend::Redis {
            match url::Url::parse(&rl.redis_url) {
                // The run builds its client with the same function (TLS roots, CA file,
                // cluster rules): whatever it would refuse, `check` refuses now.
                Ok(u) if matches!(u.scheme(), "redis" | "rediss" | "unix" | "redis+unix") => {
                    if let Err(e) = crate::redis_conn::prepare(crate::redis_conn::RedisOptions {
                        url: &rl.redis_url,
                        ca_file: redis_ca_file.as_deref(),
                        cluster: rl.redis_cluster,
                    }) {
                        // The crate's URL errors do not echo the URL; say which one.
                        let detail = match e {
                            crate::redis_conn::RedisConnError::Url(_) => format!(
                                "the Redis client refuses {:?}: {} (expected redis://host:port/db or rediss://...)",
                                redact_url(&rl.redis_url),
                                e.detail()
                            ),
                            _ => e.detail().to_string(),
                        };
                        c.bad(e.key(), detail);
                    }
                }
                _ => c.bad(
                    "rate_limit.redis_url",
                    format!(
                        "invalid Redis URL {:?} (expected redis://host:port/db or rediss://host:port/db)",
                        redact_url(&rl.redis_url)
                    ),
                ),
            }
        }

        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            if let Err(e) = check_origin(origin) {
                c.bad(&format!("cors.allowed_origins[{i}]"), e);
            }
        }

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            c.bad(
                "log.level",
                format!("invalid level or filter {:?}", self.log.level),
            );
        }

        if !c.problems.is_empty() {
            return Err(c.problems);
        }
        // Every Option below is Some when no problem was recorded; the fallbacks are
        // unreachable but keep this free of unwrap().
        let (
            Some(listen),
            Some(upstream),
            Some(cdp_api_base),
            Some(cdp_platform_base),
            Some(onramp_url),
            Some(offramp_url),
        ) = (
            listen,
            upstream,
            cdp_api_base,
            cdp_platform_base,
            onramp_url,
            offramp_url,
        )
        else {
            return Err(vec![ConfigProblem {
                key: String::new(),
                message: "internal error: validation incomplete".into(),
            }]);
        };
        Ok(Settings {
            config_file: PathBuf::new(),
            base_dir: base_dir.to_path_buf(),
            listen,
            http_listen,
            admin_listen,
            trusted_proxies,
            upstream,
            cdp_api_base,
            cdp_platform_base,
            cdp_key_file,
            cdp_ca,
            redis_ca_file,
            substitute_private_client_ip,
            onramp_url,
            offramp_url,
            redirect_allowlist,
            tls_cert,
            tls_key,
            acme,
            conn: ConnSettings {
                max_connections: self.server.max_connections,
                max_connections_per_ip: self.server.max_connections_per_ip,
                upgrade_protocols,
                max_header_bytes: self.server.max_header_bytes,
                workers: self.server.workers,
                header_read_timeout: Duration::from_millis(self.server.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(self.server.idle_timeout_ms),
                shutdown_delay: Duration::from_millis(self.server.shutdown_delay_ms),
                shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms),
                proxy_protocol: self.server.proxy_protocol == ProxyProtocol::On,
                upstream_connect_timeout: Duration::from_millis(self.upstream.connect_timeout_ms),
                upstream_response_timeout: Duration::from_millis(self.upstream.response_timeout_ms),
                admin_max_connections: self.admin.max_connections,
                admin_idle_timeout: Duration::from_millis(self.admin.idle_timeout_ms),
            },
            config: self,
        })
    }
}

/// `[tls.acme]`. `cache_dir` is created (and proven writable) at start-up by `run` and
/// `check` alike; here only what the text can say.
fn check_acme(
    c: &mut Checker,
    a: &AcmeConfig,
    self_signed: bool,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<crate::acme::AcmeSettings> {
    let before = c.problems.len();
    if self_signed {
        c.bad(
            "tls.self_signed",
            "cannot be combined with [tls.acme] (which certificate would be served?)",
        );
    }
    c.url("tls.acme.directory_url", &a.directory_url, false);
    if a.domains.is_empty() {
        c.bad("tls.acme.domains", "must list at least one domain");
    }
    let mut domains = Vec::new();
    for (i, d) in a.domains.iter().enumerate() {
        let key = format!("tls.acme.domains[{i}]");
        let lower = d.to_ascii_lowercase();
        if lower.starts_with("*.") {
            c.bad(
                &key,
                format!(
                    "{d:?}: wildcards need DNS-01; TLS-ALPN-01 validates one name per connection"
                ),
            );
        } else if lower.parse::<IpAddr>().is_ok() {
            c.bad(&key, format!("{d:?}: an IP address, not a domain name"));
        } else if rustls_pki_types::DnsName::try_from(lower.as_str()).is_err()
            || !lower.contains('.') && lower != "localhost"
        {
            c.bad(
                &key,
                format!("{d:?} is not a DNS name (e.g. \"pay.example.com\")"),
            );
        } else if domains.contains(&lower) {
            c.bad(&key, format!("{d:?} is listed twice"));
        } else {
            domains.push(lower);
        }
    }
    match a.contact.strip_prefix("mailto:") {
        Some(addr)
            if addr
                .split_once('@')
                .is_some_and(|(l, h)| !l.is_empty() && h.contains('.'))
                && !addr.contains([' ', ',', '?', '<', '>']) => {}
        _ => c.bad(
            "tls.acme.contact",
            format!(
                "must be a mailto: URI such as \"mailto:ops@example.com\" (got {:?})",
                a.contact
            ),
        ),
    }
    if a.cache_dir.as_os_str().is_empty() {
        c.bad("tls.acme.cache_dir", "must name a directory");
    }
    let cache_dir = resolve(&a.cache_dir);
    if cache_dir.exists() && !cache_dir.is_dir() {
        c.bad(
            "tls.acme.cache_dir",
            format!("{} exists and is not a directory", cache_dir.display()),
        );
    }
    let ca_file = a.ca_file.as_deref().map(resolve);
    if let Some(path) = &ca_file {
        c.readable_file("tls.acme.ca_file", path);
    }
    (c.problems.len() == before).then(|| crate::acme::AcmeSettings {
        directory_url: a.directory_url.clone(),
        domains,
        contact: a.contact.clone(),
        cache_dir,
        ca_file,
    })
}

impl Config {
    /// `[webhooks]` and `[orders]`. The secrets themselves are read (and their absence
    /// refused) at start-up, by `run` and `check` alike.
    fn check_webhooks_and_orders(&self, c: &mut Checker) {
        let w = &self.webhooks;
        if !w.path.is_empty() {
            c.route_path("webhooks.path", &w.path);
            if w.forward_path.is_empty() {
                c.bad(
                    "webhooks.forward_path",
                    "required when webhooks.path is set",
                );
            } else {
                c.route_path("webhooks.forward_path", &w.forward_path);
            }
            // The app's delivery endpoint is answered 404 to clients: it must not shadow
            // one of the gateway's own routes.
            let prefix = &self.api.prefix;
            let own = [
                w.path.as_str(),
                self.onramp.path.as_str(),
                self.offramp.path.as_str(),
            ];
            if own.contains(&w.forward_path.as_str())
                || (!prefix.is_empty()
                    && (w.forward_path == *prefix
                        || w.forward_path.starts_with(&format!("{prefix}/"))))
            {
                c.bad(
                    "webhooks.forward_path",
                    "must differ from webhooks.path, onramp.path, offramp.path and api.prefix",
                );
            }
            for (key, path) in [
                ("onramp.path", &self.onramp.path),
                ("offramp.path", &self.offramp.path),
            ] {
                if *path == w.path {
                    c.bad("webhooks.path", format!("must differ from {key}"));
                }
            }
            let prefix = &self.api.prefix;
            if !prefix.is_empty() && w.path.starts_with(&format!("{prefix}/")) {
                c.bad("webhooks.path", "must not be under api.prefix");
            }
            if w.tolerance_s == 0 || w.tolerance_s > 3600 {
                c.bad("webhooks.tolerance_s", "must be between 1 and 3600 seconds");
            }
        }
        if w.secrets_env.is_empty()
            || !w
                .secrets_env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            c.bad(
                "webhooks.secrets_env",
                "must be an environment variable name (letters, digits, '_')",
            );
        }
        let o = &self.orders;
        if o.enabled {
            if self.api.prefix.is_empty() {
                c.bad(
                    "orders.enabled",
                    "needs api.prefix (the orders endpoints live there)",
                );
            }
            if self.addresses.source == AddressSource::Request {
                c.bad(
                    "orders.enabled",
                    "needs addresses.source = \"upstream\" or \"ticket\": the buyer's identity must come from the app",
                );
            }
        }
        let host_ok = o.domain.len() <= 253
            && o.domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !o.domain.starts_with(['.', '-']);
        if !host_ok {
            c.bad(
                "orders.domain",
                format!("must be a host name such as \"shop.example.com\" (no scheme, port or path), got {:?}", o.domain),
            );
        }
    }
}

/// RFC 9110 `token` (what an `Upgrade` protocol name is).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b))
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// A CORS origin must be exactly `scheme://host[:port]`: the browser's `Origin` header
/// is compared to it byte for byte, so anything else could never match.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" || origin.contains('*') {
        return Err(
            "wildcards are not allowed: list each approved origin (Coinbase forbids \"*\")".into(),
        );
    }
    let u = url::Url::parse(origin).map_err(|e| format!("invalid origin {origin:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!(
            "origin must be http(s)://host[:port], got {origin:?}"
        ));
    }
    if u.ascii_serialization_origin() != origin {
        return Err(format!(
            "origin must be exactly scheme://host[:port] with no path or trailing slash, e.g. {:?} (got {origin:?})",
            u.ascii_serialization_origin()
        ));
    }
    Ok(())
}

/// Never echo a Redis password back in an error message.
fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("REDACTED"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable>".into(),
    }
}

trait OriginExt {
    fn ascii_serialization_origin(&self) -> String;
}

impl OriginExt for url::Url {
    fn ascii_serialization_origin(&self) -> String {
        self.origin().ascii_serialization()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(toml_text: &str) -> Result<Settings, Vec<ConfigProblem>> {
        let config: Config = parse(toml_text).expect("parses");
        config.validate(Path::new("."))
    }

    const MINIMAL: &str = "[tls]\nself_signed = true\n";

    #[test]
    fn defaults_match_the_spec() {
        let s = validate(MINIMAL).expect("valid");
        assert_eq!(s.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(s.admin_listen, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(s.conn.max_connections, 10_000);
        assert_eq!(s.config.rate_limit.requests_per_minute, 10);
        assert_eq!(s.config.rate_limit.burst, 5);
        assert_eq!(s.config.onramp.path, "/onramp");
        assert_eq!(s.config.log.format, LogFormat::Json);
        assert_eq!(s.upstream, "http://127.0.0.1:3000");
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let (key, message) = parse("[server]\nlistn = \"1\"\n").unwrap_err();
        assert!(key.starts_with("server"), "{key}");
        assert!(message.contains("listn"), "{message}");
    }

    #[test]
    fn type_errors_name_the_dotted_key() {
        let (key, _) = parse("[upstream]\nresponse_timeout_ms = -5\n").unwrap_err();
        assert_eq!(key, "upstream.response_timeout_ms");
        let (key, message) = parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert_eq!(key, "log.format");
        assert!(message.contains("xml"), "{message}");
    }

    #[test]
    fn all_problems_are_reported_with_their_keys() {
        let problems = validate(
            "[server]\nlisten = \"nope\"\nidle_timeout_ms = 0\ntrusted_proxies = [\"10.0.0.0/33\"]\n\
             [tls]\nself_signed = true\n[onramp]\npath = \"onramp\"\n[cors]\nallowed_origins = [\"*\"]\n",
        )
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.listen",
            "server.idle_timeout_ms",
            "server.trusted_proxies[0]",
            "onramp.path",
            "cors.allowed_origins[0]",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn missing_cert_file_is_named() {
        let problems =
            validate("[tls]\ncert = \"/nonexistent/tls.crt\"\nkey = \"/nonexistent/tls.key\"\n")
                .unwrap_err();
        assert!(problems
            .iter()
            .any(|p| p.key == "tls.cert" && p.message.contains("/nonexistent/tls.crt")));
    }

    #[test]
    fn upstream_must_be_a_plain_http_origin() {
        for bad in [
            "https://app:443",
            "http://app:3000/prefix",
            "not a url",
            "ftp://x",
        ] {
            let t = format!("{MINIMAL}[upstream]\nurl = \"{bad}\"\n");
            let problems = validate(&t).unwrap_err();
            assert!(problems.iter().any(|p| p.key == "upstream.url"), "{bad}");
        }
    }

    #[test]
    fn cidrs_and_bare_addresses_are_accepted() {
        let s = validate(&format!(
            "{MINIMAL}[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"2001:db8::/32\"]\n"
        ))
        .expect("valid");
        assert_eq!(s.trusted_proxies.len(), 3);
        assert!(s.trusted_proxies[1].contains(&"192.168.1.7".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn proxy_protocol_needs_trusted_proxies() {
        let problems =
            validate(&format!("{MINIMAL}[server]\nproxy_protocol = \"on\"\n")).unwrap_err();
        assert_eq!(problems[0].key, "server.proxy_protocol");
    }

    #[test]
    fn cors_origins_must_be_exact() {
        assert!(check_origin("https://app.example.com").is_ok());
        assert!(check_origin("http://localhost:3000").is_ok());
        assert!(check_origin("https://app.example.com/").is_err());
        assert!(check_origin("https://*.example.com").is_err());
        assert!(check_origin("app.example.com").is_err());
    }

    #[test]
    fn check_refuses_what_the_run_would_refuse() {
        let problems = validate(&format!(
            "{MINIMAL}[server]\nmax_connections = 4611686018427387904\ntrusted_proxies = [\"0.0.0.0/0\", \"::/0\"]\n\
             [rate_limit]\nbackend = \"redis\"\nredis_url = \"rediss://r.example:6380/0\"\n"
        ))
        .unwrap_err();
        let find = |k: &str| {
            problems
                .iter()
                .find(|p| p.key == k)
                .map(|p| p.message.clone())
        };
        assert!(find("server.max_connections").unwrap().contains("1000000"));
        assert!(find("server.trusted_proxies[0]").is_some());
        assert!(find("server.trusted_proxies[1]").is_some());
        // TLS Redis is served now (system roots): nothing to refuse about it.
        assert_eq!(find("rate_limit.redis_url"), None);
        let problems = validate(&format!(
            "{MINIMAL}[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2@r.example:6379/notadb\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "rate_limit.redis_url");
        assert!(!problems[0].message.contains("hunter2"));
    }

    #[test]
    fn redis_tls_and_cluster_keys_are_checked_as_the_run_builds_them() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let problem = |rate_limit: &str| -> Option<(String, String)> {
            let text = format!("{MINIMAL}[rate_limit]\nbackend = \"redis\"\n{rate_limit}\n");
            let config = parse(&text).unwrap();
            match config.validate(dir.path()) {
                Ok(_) => None,
                Err(problems) => problems
                    .into_iter()
                    .find(|p| p.key.starts_with("rate_limit"))
                    .map(|p| (p.key, p.message)),
            }
        };
        // Accepted: TLS with system roots, a cluster seed (TLS or not).
        assert_eq!(problem("redis_url = \"rediss://r.example:6380/0\""), None);
        assert_eq!(
            problem("redis_url = \"redis://r.example:7000\"\nredis_cluster = true"),
            None
        );
        assert_eq!(
            problem("redis_url = \"rediss://r.example:7000\"\nredis_cluster = true"),
            None
        );
        let (key, message) = problem(&format!(
            "redis_url = \"rediss://r.example:6380/0\"\nredis_ca_file = {:?}",
            missing.display().to_string()
        ))
        .unwrap();
        assert_eq!(key, "rate_limit.redis_ca_file");
        assert!(message.contains("cannot read"), "{message}");
        let (key, message) = problem(&format!(
            "redis_url = \"rediss://r.example:6380/0\"\nredis_ca_file = {:?}",
            garbage.display().to_string()
        ))
        .unwrap();
        assert_eq!(key, "rate_limit.redis_ca_file");
        assert!(message.contains("no PEM certificate"), "{message}");
        // A CA file without TLS would silently do nothing.
        let (key, message) = problem(&format!(
            "redis_url = \"redis://r.example:6379/0\"\nredis_ca_file = {:?}",
            garbage.display().to_string()
        ))
        .unwrap();
        assert_eq!(key, "rate_limit.redis_ca_file");
        assert!(message.contains("rediss://"), "{message}");
        let (key, _) =
            problem("redis_url = \"unix:///run/redis.sock\"\nredis_cluster = true").unwrap();
        assert_eq!(key, "rate_limit.redis_cluster");
        let (key, message) =
            problem("redis_url = \"redis://r.example:7000/3\"\nredis_cluster = true").unwrap();
        assert_eq!(key, "rate_limit.redis_cluster");
        assert!(message.contains("database 0"), "{message}");
        let (key, _) = problem("redis_url = \"memcached://r.example:11211\"").unwrap();
        assert_eq!(key, "rate_limit.redis_url");
    }

    #[test]
    fn cdp_ca_file_is_loaded_and_checked_by_the_clients_loader() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").unwrap();
        let validate_cdp = |cdp: &str| {
            parse(&format!("{MINIMAL}[cdp]\n{cdp}\n"))
                .unwrap()
                .validate(dir.path())
        };
        let problem = |cdp: &str| -> (String, String) {
            let p = validate_cdp(cdp).expect_err("refused").remove(0);
            (p.key, p.message)
        };
        assert!(validate_cdp("").unwrap().cdp_ca.is_none());
        // Relative to the config file's directory, like every other path.
        let s = validate_cdp("ca_file = \"ca.pem\"").unwrap();
        let roots = s.cdp_ca.expect("loaded");
        assert_eq!(roots.path(), dir.path().join("ca.pem"));
        assert_eq!(roots.certs().len(), 1);
        let (key, message) = problem("ca_file = \"missing.pem\"");
        assert_eq!(key, "cdp.ca_file");
        assert!(message.contains("cannot read"), "{message}");
        let (key, message) = problem("ca_file = \"garbage.pem\"");
        assert_eq!(key, "cdp.ca_file");
        assert!(message.contains("no PEM certificate"), "{message}");
        let (key, message) = problem(
            "ca_file = \"ca.pem\"\napi_base = \"http://127.0.0.1:1\"\nplatform_base = \"http://127.0.0.1:1/platform\"",
        );
        assert_eq!(key, "cdp.ca_file");
        assert!(message.contains("https://"), "{message}");
        // One https base is enough for the CA to matter.
        assert!(validate_cdp("ca_file = \"ca.pem\"\napi_base = \"http://127.0.0.1:1\"").is_ok());
    }

    #[test]
    fn seams_keys_have_spec_defaults() {
        let s = validate(MINIMAL).expect("valid");
        assert_eq!(s.conn.max_connections_per_ip, 0);
        assert_eq!(s.conn.upgrade_protocols, vec!["websocket".to_string()]);
        assert_eq!(s.conn.admin_max_connections, 64);
        assert_eq!(s.conn.admin_idle_timeout, Duration::from_millis(5000));
        let problems = validate(&format!(
            "{MINIMAL}[server]\nupgrade_protocols = [\"web socket\"]\n[admin]\nmax_connections = 0\nidle_timeout_ms = 0\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.upgrade_protocols[0]",
            "admin.max_connections",
            "admin.idle_timeout_ms",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn redis_password_is_not_echoed() {
        let problems = validate(&format!(
            "{MINIMAL}[rate_limit]\nbackend = \"redis\"\nredis_url = \"http://user:hunter2@x\"\n"
        ))
        .unwrap_err();
        let msg = &problems[0].message;
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn webhooks_and_orders_keys() {
        let s = validate(MINIMAL).expect("valid");
        assert_eq!(s.config.webhooks.path, "");
        assert_eq!(s.config.webhooks.secrets_env, "CDP_WEBHOOK_SECRETS");
        assert_eq!(s.config.webhooks.tolerance_s, 300);
        assert_eq!(s.config.webhooks.forward_path, "/onramp-events");
        assert!(!s.config.orders.enabled);
        validate(&format!(
            "{MINIMAL}[webhooks]\npath = \"/onramp/webhooks\"\n[orders]\nenabled = true\ndomain = \"shop.example.com\"\n[addresses]\nsource = \"upstream\"\n"
        ))
        .expect("valid");
        let problems = validate(&format!(
            "{MINIMAL}[webhooks]\npath = \"/onramp\"\nforward_path = \"/onramp\"\ntolerance_s = 0\nsecrets_env = \"A B\"\n[orders]\nenabled = true\ndomain = \"https://x\"\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "webhooks.path",
            "webhooks.forward_path",
            "webhooks.tolerance_s",
            "webhooks.secrets_env",
            "orders.enabled",
            "orders.domain",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(parse("[webhooks]\nsecret = \"x\"\n").is_err());
        let problems = validate(&format!(
            "{MINIMAL}[webhooks]\npath = \"/hooks\"\nforward_path = \"/onramp/api/events\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "webhooks.forward_path", "{problems:?}");
    }

    const ACME: &str = "[tls.acme]\ndirectory_url = \"https://acme.example/dir\"\ndomains = [\"pay.example.com\"]\ncontact = \"mailto:ops@example.com\"\ncache_dir = \"/var/lib/onramp-gateway/acme\"\n";

    #[test]
    fn acme_replaces_the_certificate_files() {
        // No tls.cert/tls.key on disk: with [tls.acme] they are not needed.
        let s = validate(ACME).expect("valid");
        let a = s.acme.expect("acme settings");
        assert_eq!(a.domains, vec!["pay.example.com".to_string()]);
        assert_eq!(
            a.cert_path(),
            Path::new("/var/lib/onramp-gateway/acme/cert.pem")
        );
    }

    #[test]
    fn acme_keys_are_checked_and_named() {
        let bad = |from: &str, to: &str| -> Vec<String> {
            validate(&ACME.replace(from, to))
                .unwrap_err()
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert_eq!(
            bad("mailto:ops@example.com", "ops@example.com"),
            ["tls.acme.contact"]
        );
        assert_eq!(
            bad("\"pay.example.com\"", "\"*.example.com\""),
            ["tls.acme.domains[0]"]
        );
        assert_eq!(
            bad("\"pay.example.com\"", "\"10.0.0.1\""),
            ["tls.acme.domains[0]"]
        );
        assert_eq!(bad("[\"pay.example.com\"]", "[]"), ["tls.acme.domains"]);
        assert_eq!(
            bad("https://acme.example/dir", "http://acme.example/dir"),
            ["tls.acme.directory_url"]
        );
        assert_eq!(
            bad("[tls.acme]", "[tls]\nself_signed = true\n[tls.acme]"),
            ["tls.self_signed"]
        );
        assert_eq!(
            bad("cache_dir", "ca_file = \"/nonexistent/ca.pem\"\ncache_dir"),
            ["tls.acme.ca_file"]
        );
        let unknown = parse(&ACME.replace("cache_dir", "renew_days = 3\ncache_dir")).unwrap_err();
        assert!(unknown.1.contains("renew_days"), "{unknown:?}");
    }
}
