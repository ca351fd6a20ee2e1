//! Coinbase Developer Platform: API key loading, JWT bearer auth, session-token client.

pub mod client;
pub mod jwt;
pub mod key;
