//! onramp-gateway: a TLS sidecar that mints Coinbase Onramp/Offramp session tokens
//! and reverse-proxies everything else to the app it sits in front of.
//!
//! Module map (one job each):
//! - [`config`]: `config.toml` into typed, validated settings.
//! - [`tls`]: certificates and the rustls server config (reloadable); [`acme`]: ordering
//!   and renewing them over ACME (TLS-ALPN-01) into that same store.
//! - [`listener`]: accept loop, connection limits, timeouts, per-connection HTTP;
//!   [`h2_resets`]: the HTTP/2 streams h2 refuses on its own, counted and logged.
//! - [`client_ip`]: the client IP decision (socket peer; trusted proxies).
//! - [`routes`]: routing, access log, request metrics.
//! - [`api`]: the JSON endpoints for browser SDKs (buy options/quote, transactions) and
//!   headless Apple Pay / Google Pay orders.
//! - [`proxy`]: forwarding to the upstream app; [`forwarding`]: the header rules it and
//!   the app-context call share; [`upstream`]: the one client to the app.
//! - [`conn_limit`]: connection slots (global, per IP) and their one owner.
//! - [`mint`]: the onramp/offramp routes; [`onramp`] parses and validates their input.
//! - [`cdp`]: CDP API key, JWT, token client; [`ca_file`]: the one loader of the extra CA
//!   certificates every `*.ca_file` key adds to a client's roots. [`ratelimit`]: per-IP limits.
//!   [`redis_conn`]: the one shared Redis connection (TLS, cluster).
//! - [`admin`], [`metrics`]: health, readiness and Prometheus metrics.
//! - [`fetch_site`]: cross-site refusal, [`gate`]: it plus CORS for every own route;
//!   [`ticket`]: app-signed address tickets.
//! - [`error`]: every client-facing error and its response, in one place.
//! - [`server`]: start-up and graceful shutdown.
//! - [`webhook`]: Coinbase's transaction webhooks, verified and forwarded to the app; the
//!   `webhooks subscribe`/`list` commands.

pub mod acme;
pub mod admin;
pub mod api;
pub mod body;
pub mod ca_file;
pub mod cdp;
pub mod cli_mint;
pub mod client_ip;
pub mod config;
pub mod conn_limit;
pub mod error;
pub mod fetch_site;
pub mod forwarding;
pub mod gate;
pub mod h2_resets;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod mint;
pub mod onramp;
pub mod proxy;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod redis_conn;
pub mod routes;
pub mod server;
pub mod ticket;
pub mod tls;
pub mod upstream;
pub mod webhook;

/// Helpers for the crate's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// The size of what `f` returns, from its type alone: nothing is built or run (for
    /// tests that keep long-lived futures small).
    pub fn returned_size<A, R>(_: impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }
}
