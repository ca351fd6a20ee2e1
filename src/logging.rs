//! Structured logs on stdout: one JSON object per line (or human-readable text).
//!
//! Lines go through a background writer thread so a slow log consumer (a full pipe,
//! a busy container runtime) never blocks the request-serving threads. The writer is
//! not lossy: under extreme pressure the serving threads wait rather than drop
//! access-log lines an operator may need.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Keep the guard alive until exit: dropping it
/// flushes the lines still queued.
pub fn init(config: &LogConfig) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    // The level was validated with the config; fall back to "info" defensively.
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    let result = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging already initialised: {e}");
    }
    guard
}
