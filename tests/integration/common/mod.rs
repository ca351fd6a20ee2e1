//! Shared fixtures for the integration tests.
#![allow(dead_code)]

pub mod browser;
pub mod certs;
pub mod context_app;
pub mod fake_cdp;
pub mod gateway;
pub mod page_server;
pub mod pebble;
pub mod redis;
pub mod upstream;

/// Sums the samples of `name` whose labels include every `labels` pair in a Prometheus
/// text page (`None` when there is no such sample).
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}
