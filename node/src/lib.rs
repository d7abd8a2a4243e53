//! The `mycel` binary's library: command-line definitions, configuration,
//! and the wiring of protocol, store (and later network, models, market
//! and API) into the commands users run.

pub mod cli;
mod logging;

use anyhow::{Context, Result};
use cli::{Cli, Command};
use mycel_store::identity::{self, Origin};

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    logging::init(cli.log_format)?;
    match cli.command {
        Command::Id(args) => {
            let dir = args.data_dir.resolve()?;
            let (key, origin) = identity::load_or_create(&dir)
                .with_context(|| format!("loading the node identity from {}", dir.display()))?;
            if origin == Origin::Created {
                tracing::info!(data_dir = %dir.display(), peer = %key.peer_id(), "created a new node identity");
            }
            println!("{}", key.peer_id());
            Ok(())
        }
    }
}
