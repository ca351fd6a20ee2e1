//! `onramp-gateway` command line: run (default), `check`, `mint`, `webhooks`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use onramp_gateway::acme::Acme;
use onramp_gateway::cdp::key::CdpKey;
use onramp_gateway::config::{self, AddressSource, Settings};
use onramp_gateway::server::{self, Prepared};
use onramp_gateway::ticket::TicketSecret;
use onramp_gateway::tls::{self, CertSource, CertStore};
use onramp_gateway::webhook::signature::WebhookSecrets;
use onramp_gateway::webhook::subscriptions::{self, WebhooksCommand};
use onramp_gateway::{cli_mint, logging};

#[derive(Parser, Debug)]
#[command(
    name = "onramp-gateway",
    version,
    about = "TLS sidecar that mints Coinbase Onramp/Offramp session tokens and proxies everything else to your app"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "ONRAMP_GATEWAY_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration, certificates and CDP key; print a summary.
    Check,
    /// Mint one session token with the configured key and print the Coinbase URL.
    Mint(cli_mint::MintArgs),
    /// Coinbase webhook subscriptions for the transaction events.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tls::install_default_provider();
    let settings = match config::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        None => run(settings),
        Some(Command::Check) => check(settings),
        Some(Command::Mint(args)) => match prepare(settings) {
            Ok(prepared) => cli_mint::run(prepared, args),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        // Only the CDP key: the webhook secret does not exist before the first subscribe.
        Some(Command::Webhooks(command)) => match load_cdp_key(&settings) {
            Ok(Some(key)) => subscriptions::run(&settings, key, command),
            Ok(None) => {
                eprintln!("error: no CDP API key: set CDP_API_KEY_ID and CDP_API_KEY_SECRET, or [cdp] key_file");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn load_cdp_key(settings: &Settings) -> Result<Option<CdpKey>, String> {
    match &settings.cdp_key_file {
        Some(path) => Ok(Some(
            CdpKey::from_key_file(path).map_err(|e| e.to_string())?,
        )),
        None => CdpKey::from_env().map_err(|e| e.to_string()),
    }
}

/// Loads what the config points at (certificate, CDP key), without binding anything.
fn prepare(settings: Settings) -> Result<Prepared, String> {
    // Before the certificate: a cache_dir that cannot be created or written is refused
    // here, by `check` too, not later by the order task.
    let acme = match &settings.acme {
        Some(a) => Some(Acme::prepare(a.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    let source = if let Some(a) = &settings.acme {
        CertSource::Acme {
            cert: a.cert_path(),
            key: a.key_path(),
            domains: a.domains.clone(),
        }
    } else if settings.config.tls.self_signed {
        CertSource::SelfSigned
    } else {
        CertSource::Files {
            cert: settings.tls_cert.clone(),
            key: settings.tls_key.clone(),
        }
    };
    let certs = CertStore::load(source).map_err(|e| e.to_string())?;
    let cdp_key = load_cdp_key(&settings)?;
    let ticket_secret = match settings.config.addresses.source {
        AddressSource::Ticket => Some(
            TicketSecret::from_env(&settings.config.addresses.ticket_secret_env)
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    // Read once, like the ticket key: a receiver without secrets would refuse every
    // delivery, so it is a start-up error (for `check` too).
    let webhook_secrets = if settings.config.webhooks.path.is_empty() {
        None
    } else {
        Some(
            WebhookSecrets::from_env(&settings.config.webhooks.secrets_env)
                .map_err(|e| e.to_string())?,
        )
    };
    Ok(Prepared {
        settings: Arc::new(settings),
        certs,
        cdp_key,
        ticket_secret,
        webhook_secrets,
        acme,
    })
}

fn run(settings: Settings) -> ExitCode {
    let _log_guard = logging::init(&settings.config.log);
    if let Some(warning) = request_source_warning(&settings) {
        tracing::warn!("{warning}");
    }
    let workers = settings.conn.workers;
    let prepared = match prepare(settings) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if prepared.settings.config.tls.self_signed {
        tracing::warn!(
            "tls.self_signed = true: serving an in-memory self-signed certificate for localhost. \
             DEVELOPMENT ONLY: browsers will warn and clients cannot verify this gateway"
        );
    }
    // One worker: a current-thread runtime (no work-stealing overhead), which is what
    // a sidecar pinned to one CPU wants. Otherwise a multi-thread runtime.
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b.enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(server::run(prepared)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(settings: Settings) -> ExitCode {
    let summary = summary_lines(&settings);
    if let Some(warning) = request_source_warning(&settings) {
        eprintln!("warning: {warning}");
    }
    match prepare(settings) {
        Ok(prepared) => {
            for line in summary {
                println!("{line}");
            }
            match &prepared.cdp_key {
                Some(key) => println!(
                    "cdp key:        {} ({})",
                    key.id(),
                    key.algorithm().as_str()
                ),
                None => println!(
                    "cdp key:        none (onramp/offramp will answer 503; /readyz not ready)"
                ),
            }
            if let Some(secrets) = &prepared.webhook_secrets {
                let w = &prepared.settings.config.webhooks;
                println!(
                    "webhooks:       {} -> app {} ({} secret(s), tolerance {} s)",
                    w.path,
                    w.forward_path,
                    secrets.len(),
                    w.tolerance_s
                );
            }
            if prepared.settings.config.orders.enabled {
                println!(
                    "orders:         {}/orders (domain {:?})",
                    prepared.settings.config.api.prefix, prepared.settings.config.orders.domain
                );
            }
            let cert = prepared.certs.current();
            println!("tls chain:      {} certificate(s)", cert.cert.len());
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `addresses.source = "request"` on a public listener lets any website choose the
/// destination wallet of a mint for its visitors (within the cross-site rules).
fn request_source_warning(s: &Settings) -> Option<String> {
    (s.config.addresses.source == AddressSource::Request && !s.listen.ip().is_loopback()).then(|| {
        format!(
            "addresses.source = \"request\" on {}: the browser chooses the destination address; \
             use \"upstream\" or \"ticket\" so only your signed-in users mint for their own wallets",
            s.listen
        )
    })
}

fn summary_lines(s: &Settings) -> Vec<String> {
    let c = &s.config;
    vec![
        format!("config:         {}", s.config_file.display()),
        format!("listen:         https://{}", s.listen),
        format!(
            "http redirect:  {}",
            s.http_listen
                .map_or("off".to_string(), |a| format!("http://{a}"))
        ),
        format!(
            "admin:          {}",
            s.admin_listen
                .map_or("off".to_string(), |a| format!("http://{a}"))
        ),
        format!(
            "tls:            {}",
            if let Some(a) = &s.acme {
                format!(
                    "acme {} for {} (cache {})",
                    a.directory_url,
                    a.domains.join(", "),
                    a.cache_dir.display()
                )
            } else if c.tls.self_signed {
                "self-signed (development only)".to_string()
            } else {
                format!("{} + {}", s.tls_cert.display(), s.tls_key.display())
            }
        ),
        format!("upstream:       {}", s.upstream),
        format!(
            "cdp api:        {}{}",
            s.cdp_api_base,
            s.cdp_ca.as_ref().map_or(String::new(), |r| format!(
                " (+ {} CA certificate(s) from {})",
                r.certs().len(),
                r.path().display()
            ))
        ),
        format!("onramp:         {} -> {}", c.onramp.path, s.onramp_url),
        format!("offramp:        {} -> {}", c.offramp.path, s.offramp_url),
        format!(
            "rate limit:     {}/min, burst {}, backend {:?}",
            c.rate_limit.requests_per_minute, c.rate_limit.burst, c.rate_limit.backend
        ),
        format!("trusted proxies: {}", s.trusted_proxies.len()),
        format!(
            "addresses:      {:?}{}",
            c.addresses.source,
            if c.addresses.source == AddressSource::Ticket {
                format!(" (key from ${})", c.addresses.ticket_secret_env)
            } else {
                String::new()
            }
        ),
        format!(
            "onramp api:     {:?}{} (platform {})",
            c.onramp.api,
            if c.onramp.sandbox { ", sandbox" } else { "" },
            s.cdp_platform_base
        ),
        format!(
            "json api:       {}",
            if c.api.prefix.is_empty() {
                "off".to_string()
            } else {
                format!("{}/* (cache {} s)", c.api.prefix, c.api.cache_s)
            }
        ),
    ]
}
