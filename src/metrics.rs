//! Prometheus metrics (the `prometheus-client` crate, the Prometheus project's own).
//!
//! All names carry the `onramp_gateway_` prefix; counters get `_total` from the
//! encoder. Label values are small closed sets (route names, status codes, result
//! kinds) so cardinality stays bounded whatever clients send.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    proxy,
    onramp,
    offramp,
    /// The `[api]` JSON endpoints.
    api,
    /// `webhooks.path`: Coinbase's deliveries.
    webhook,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::proxy => "proxy",
            Route::onramp => "onramp",
            Route::offramp => "offramp",
            Route::api => "api",
            Route::webhook => "webhook",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MintLabels {
    pub kind: Route,
    /// `ok`, or the error kind (`cdp-timeout`, `rate-limited`, ...).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// One of the eight transaction event types, else `other`.
    pub event_type: &'static str,
    /// `forwarded`, `duplicate`, `app_error`, `app_unreachable`, `invalid_signature`,
    /// `stale`, `signed_header_missing`, `malformed`, `bad_body`, `method_not_allowed`.
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Handles into `requests`, by route and status: counting a request is then one
    /// atomic add instead of the family's lock and SipHash lookup on every response.
    request_counters: Box<[std::sync::OnceLock<Counter>]>,
    pub connections_active: Gauge,
    pub connections_accepted: Counter,
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    pub token_mints: Family<MintLabels, Counter>,
    pub cdp_request_duration: Histogram,
    pub upstream_request_duration: Histogram,
    pub rate_limited: Counter,
    pub rate_limiter_errors: Counter,
    pub tls_cert_not_after: Gauge,
    /// Minting requests refused before CDP, by reason (`fetch_site`, `referer`, `origin`,
    /// `ticket_invalid`, `ticket_replayed`, `rate_limited`, `aggregate_limited`,
    /// `global_limited`, `cdp_busy`, `limiter_full`).
    pub mint_refused: Family<ReasonLabels, Counter>,
    /// Connections or requests hyper refused at the protocol level (malformed HTTP/1.1,
    /// HTTP/2 protocol errors): a smuggling or fuzzing campaign shows up here.
    pub protocol_errors: Family<ReasonLabels, Counter>,
    /// Accepted sockets closed at once by a connection limit (`per_ip`).
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Webhook deliveries, by event type and result.
    pub webhook_deliveries: Family<WebhookLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Statuses 100..=599 of each route have a cached counter handle (others, which hyper
/// allows up to 999, go through the family).
const CACHED_STATUSES: std::ops::RangeInclusive<u16> = 100..=599;
const ROUTES: usize = Route::webhook as usize + 1;

fn request_counter_slot(route: Route, status: u16) -> Option<usize> {
    CACHED_STATUSES.contains(&status).then(|| {
        let per_route = CACHED_STATUSES.len();
        route as usize * per_route + usize::from(status - CACHED_STATUSES.start())
    })
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("onramp_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "connections_active",
            "Client connections currently open (TLS and plain HTTP)",
            connections_active.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            connections_accepted.clone(),
        );
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            tls_handshake_failures.clone(),
        );
        let token_mints = Family::<MintLabels, Counter>::default();
        registry.register(
            "token_mints",
            "Session token mint attempts, by kind (onramp/offramp) and result",
            token_mints.clone(),
        );
        // 5 ms .. ~10 s: the CDP call is an Internet round trip plus signing.
        let cdp_request_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register_with_unit(
            "cdp_request_duration",
            "Duration of POST /onramp/v1/token calls to the CDP API",
            Unit::Seconds,
            cdp_request_duration.clone(),
        );
        // 0.5 ms .. ~65 s: time to the upstream's response headers.
        let upstream_request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        registry.register_with_unit(
            "upstream_request_duration",
            "Time from forwarding a request to the upstream until its response headers",
            Unit::Seconds,
            upstream_request_duration.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused by the per-IP rate limit",
            rate_limited.clone(),
        );
        let rate_limiter_errors = Counter::default();
        registry.register(
            "rate_limiter_errors",
            "Rate-limiter backend errors (the on_backend_error policy was applied)",
            rate_limiter_errors.clone(),
        );
        let tls_cert_not_after = Gauge::default();
        registry.register_with_unit(
            "tls_cert_not_after",
            "notAfter of the served certificate, seconds since the Unix epoch (alert well before it)",
            Unit::Seconds,
            tls_cert_not_after.clone(),
        );
        let mint_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mint_refused",
            "Minting requests refused before any CDP call, by reason",
            mint_refused.clone(),
        );
        let protocol_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "protocol_errors",
            "Requests or connections refused at the HTTP protocol level, by reason",
            protocol_errors.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Accepted connections closed at once by a connection limit, by reason",
            connections_refused.clone(),
        );
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Coinbase webhook deliveries received, by event type and result",
            webhook_deliveries.clone(),
        );
        Self {
            registry,
            webhook_deliveries,
            mint_refused,
            tls_cert_not_after,
            protocol_errors,
            connections_refused,
            requests,
            request_counters: (0..ROUTES * CACHED_STATUSES.len())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            connections_active,
            connections_accepted,
            tls_handshake_failures,
            token_mints,
            cdp_request_duration,
            upstream_request_duration,
            rate_limited,
            rate_limiter_errors,
        }
    }

    pub fn count_request(&self, route: Route, status: u16) {
        let labels = || RequestLabels { route, status };
        match request_counter_slot(route, status).and_then(|i| self.request_counters.get(i)) {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
    }

    pub fn count_mint(&self, kind: Route, result: &'static str) {
        self.token_mints
            .get_or_create(&MintLabels { kind, result })
            .inc();
    }

    pub fn count_mint_refused(&self, reason: &'static str) {
        self.mint_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn count_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn count_protocol_error(&self, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn count_connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn count_webhook(&self, event_type: &'static str, result: &'static str) {
        self.webhook_deliveries
            .get_or_create(&WebhookLabels { event_type, result })
            .inc();
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Lets later components (cert expiry, limiter) register their own metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}

/// Decrements `connections_active` when a connection ends, however it ends. Owned (the
/// gauge is a shared handle) so it can live in a connection's lease, which a WebSocket
/// tunnel keeps after the HTTP connection task has finished.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl ConnectionGuard {
    pub fn new(metrics: &Metrics) -> Self {
        metrics.connections_active.inc();
        metrics.connections_accepted.inc();
        Self(metrics.connections_active.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_metric_names_are_rendered() {
        let m = Metrics::new();
        m.count_request(Route::proxy, 200);
        m.count_mint(Route::onramp, "ok");
        m.cdp_request_duration.observe(0.1);
        m.rate_limited.inc();
        m.count_protocol_error("http1_parse");
        let text = m.render();
        for name in [
            "onramp_gateway_requests_total{route=\"proxy\",status=\"200\"} 1",
            "onramp_gateway_token_mints_total{kind=\"onramp\",result=\"ok\"} 1",
            "onramp_gateway_cdp_request_duration_seconds_bucket",
            "onramp_gateway_rate_limited_total 1",
            "onramp_gateway_connections_active 0",
            "onramp_gateway_protocol_errors_total{reason=\"http1_parse\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn cached_request_counters_count_into_the_family() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.count_request(Route::proxy, 200);
        }
        m.count_request(Route::webhook, 599);
        m.count_request(Route::api, 100);
        // Outside the cached range: counted through the family directly.
        m.count_request(Route::proxy, 999);
        let text = m.render();
        for line in [
            "onramp_gateway_requests_total{route=\"proxy\",status=\"200\"} 3",
            "onramp_gateway_requests_total{route=\"webhook\",status=\"599\"} 1",
            "onramp_gateway_requests_total{route=\"api\",status=\"100\"} 1",
            "onramp_gateway_requests_total{route=\"proxy\",status=\"999\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // Every (route, status) has its own slot.
        let slots: std::collections::HashSet<usize> = [
            Route::proxy,
            Route::onramp,
            Route::offramp,
            Route::api,
            Route::webhook,
        ]
        .into_iter()
        .flat_map(|r| CACHED_STATUSES.map(move |s| request_counter_slot(r, s).unwrap()))
        .collect();
        assert_eq!(slots.len(), ROUTES * CACHED_STATUSES.len());
        assert!(slots.iter().all(|&i| i < m.request_counters.len()));
    }
}
