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
    let filter = EnvFilter::try_new(directives(&config.level))
        .unwrap_or_else(|_| EnvFilter::new(directives("info")));
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

/// The filter for `log.level`. rustls logs what a *peer* did wrong (an IP address sent
/// as SNI, as wrk and some scanners do; an unexpected alert) at WARN, once per
/// connection: any client could fill the log, one line per handshake. Those handshakes
/// are counted (`onramp_gateway_tls_handshake_failures_total`) and the gateway logs its
/// own line at debug, so rustls' lines are kept to errors unless the level names rustls.
pub fn directives(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn rustls_peer_warnings_stay_out_unless_asked_for() {
        assert_eq!(directives("info"), "info,rustls=error");
        assert_eq!(directives("debug"), "debug,rustls=error");
        assert_eq!(directives("info,rustls=debug"), "info,rustls=debug");
        for level in ["info", "warn,onramp_gateway=debug", "info,rustls=trace"] {
            assert!(
                tracing_subscriber::EnvFilter::try_new(directives(level)).is_ok(),
                "{level}"
            );
        }
    }
}
