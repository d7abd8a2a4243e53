//! Tracing setup: human-readable by default, JSON for machines, filtered by
//! `RUST_LOG` (default: [`DEFAULT_FILTER`]). Logs go
//! to stderr so stdout stays clean for command output.

use anyhow::{Result, anyhow};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// mycel at info; dependencies at warn, except Kademlia's routine
/// "no known peers" warnings on a node that runs alone.
const DEFAULT_FILTER: &str = "warn,libp2p_kad=error,mycel=info";

pub fn init(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow!("cannot set up logging: {e}"))
}
