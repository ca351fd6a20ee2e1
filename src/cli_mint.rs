//! `onramp-gateway mint`: an operator's smoke test of the configured CDP key.

use std::process::ExitCode;

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
    /// Build an offramp URL instead of an onramp one.
    #[arg(long)]
    pub offramp: bool,
}

pub fn run(_prepared: Prepared, _args: MintArgs) -> ExitCode {
    eprintln!("error: mint is not implemented yet");
    ExitCode::from(1)
}
