//! The onramp/offramp routes: request parsing, validation and the Coinbase redirect.

pub mod address;
pub mod redirect;
pub mod request;
pub mod session_v2;
