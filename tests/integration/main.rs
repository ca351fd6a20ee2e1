//! Integration tests: the real gateway binary on ephemeral loopback ports, real TLS,
//! a fake upstream app and a fake CDP API. One test crate so the suite links once.

mod common;

mod acme;
mod browser;
mod cdp_tls;
mod container;
mod deploy_manifests;
mod faults;
mod jwt_crosscheck;
mod load_balancer;
mod mint_trust;
mod minting;
mod operations;
mod orders;
mod orders_browser;
mod proxy;
mod redis_ops;
mod seams;
mod soak;
mod startup;
mod tls_listener;
mod v2_flows;
mod webhooks;
