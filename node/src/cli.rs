//! Command-line definitions. Doc comments here are the `--help` text. Keep
//! command and flag names stable once released: scripts depend on them.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// mycel: a peer-to-peer swarm of cooperating AI nodes.
#[derive(Debug, Parser)]
#[command(name = "mycel", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MYCEL_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this node's PeerId (creating its identity on first use).
    Id(IdArgs),
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub data_dir: DataDir,
}

/// Where a node keeps its key and journal.
#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// Data directory [default: $XDG_DATA_HOME/mycel or ~/.local/share/mycel].
    #[arg(long = "data-dir", env = "MYCEL_DATA_DIR", value_name = "DIR")]
    pub path: Option<PathBuf>,
}

impl DataDir {
    /// The directory to use: the flag or variable, else the platform default.
    pub fn resolve(&self) -> Result<PathBuf> {
        if let Some(p) = &self.path {
            return Ok(p.clone());
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("mycel"));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".local/share/mycel")),
            None => bail!("no data directory: pass --data-dir DIR or set MYCEL_DATA_DIR"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn data_dir_flag_reaches_its_field() {
        let cli = Cli::try_parse_from(["mycel", "id", "--data-dir", "/tmp/x"]).unwrap();
        let Command::Id(args) = cli.command;
        assert_eq!(args.data_dir.resolve().unwrap(), PathBuf::from("/tmp/x"));
    }

    #[test]
    fn log_format_flag_reaches_its_field() {
        let cli = Cli::try_parse_from(["mycel", "--log-format", "json", "id"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["mycel", "--log-format", "xml", "id"]).is_err());
    }
}
