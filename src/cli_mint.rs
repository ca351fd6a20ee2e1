//! `onramp-gateway mint`: an operator's smoke test of the configured CDP key. Mints
//! one session token exactly as the routes do (same validation, same CDP call) and
//! prints the Coinbase URL to stdout.

use std::net::IpAddr;
use std::process::ExitCode;

use crate::cdp::client::CdpClient;
use crate::onramp::request::{self, Flow, Rules};
use crate::server::Prepared;

#[derive(clap::Args, Debug)]
pub struct MintArgs {
    /// Wallet address the token is for.
    #[arg(long)]
    pub address: String,
    /// Comma-separated blockchains, e.g. base,ethereum.
    #[arg(long, value_delimiter = ',', required = true)]
    pub blockchains: Vec<String>,
    /// Comma-separated assets, e.g. USDC,ETH.
    #[arg(long, value_delimiter = ',')]
    pub assets: Vec<String>,
    /// Build an offramp URL instead of an onramp one (needs --partner-user-ref and --redirect-url).
    #[arg(long)]
    pub offramp: bool,
    /// partnerUserRef for the URL (required with --offramp).
    #[arg(long)]
    pub partner_user_ref: Option<String>,
    /// redirectUrl for the URL; must match offramp.redirect_url_allowlist.
    #[arg(long)]
    pub redirect_url: Option<String>,
    /// The clientIp sent to CDP (Coinbase binds the token to it). Default: cdp.substitute_private_client_ip or 192.0.2.1.
    #[arg(long)]
    pub client_ip: Option<IpAddr>,
}

pub fn run(prepared: Prepared, args: MintArgs) -> ExitCode {
    let Some(key) = prepared.cdp_key else {
        eprintln!(
            "error: no CDP API key: set CDP_API_KEY_ID and CDP_API_KEY_SECRET, or [cdp] key_file"
        );
        return ExitCode::from(1);
    };
    let settings = prepared.settings;
    let flow = if args.offramp {
        Flow::Offramp
    } else {
        Flow::Onramp
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("address", &args.address);
    query.append_pair("blockchains", &args.blockchains.join(","));
    if !args.assets.is_empty() {
        query.append_pair("assets", &args.assets.join(","));
    }
    if let Some(r) = &args.partner_user_ref {
        query.append_pair("partnerUserRef", r);
    }
    if let Some(u) = &args.redirect_url {
        query.append_pair("redirectUrl", u);
    }
    let rules = Rules {
        flow,
        blockchains: &settings.config.onramp.blockchains,
        assets: &settings.config.onramp.assets,
        redirect_allowlist: &settings.redirect_allowlist,
    };
    let mint_request = match request::from_query(&query.finish(), &rules) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let client_ip = args
        .client_ip
        .or(settings.substitute_private_client_ip)
        .unwrap_or(IpAddr::from([192, 0, 2, 1]));
    let cdp = match CdpClient::new(
        &settings.cdp_api_base,
        std::sync::Arc::new(key),
        settings.cdp_timeout(),
        settings.cdp_ca.as_ref(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cdp.create_token(
        &mint_request.addresses,
        &mint_request.assets,
        client_ip,
    ));
    match result {
        Ok((token, took)) => {
            let base = if args.offramp {
                &settings.offramp_url
            } else {
                &settings.onramp_url
            };
            println!(
                "{}",
                request::build_location(base, token.expose(), &mint_request)
            );
            eprintln!(
                "minted in {} ms for clientIp {client_ip}; the URL is single-use and expires in 5 minutes",
                took.as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
