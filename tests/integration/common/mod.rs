//! Shared fixtures for the integration tests.
#![allow(dead_code)]

pub mod browser;
pub mod certs;
pub mod context_app;
pub mod fake_cdp;
pub mod gateway;
pub mod pebble;
pub mod redis;
pub mod upstream;
