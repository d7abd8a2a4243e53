//! The `mycel` binary's library: command-line definitions, configuration,
//! and the wiring of protocol, store, network, models and API into the
//! commands users run.

mod classify;
pub mod cli;
mod client;
pub mod config;
mod ensemble;
mod infer;
mod local;
mod logging;
mod market;
mod models;
mod node;
mod route;
mod search;
mod sim;
mod submit;
mod summarize;
mod tasks;
mod testnet;

use anyhow::{Context, Result};
use cli::{Cli, Command};
use mycel_store::identity::{self, Origin};
use tokio_util::sync::CancellationToken;

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    logging::init(cli.log_format)?;
    match cli.command {
        Command::Node(args) => {
            let config = config::NodeConfig::load(&args)?;
            set_compute_threads(config.threads);
            run_node(config)
        }
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
        Command::Peers(args) => client::peers(&args),
        Command::Status(args) => client::status(&args),
        Command::Testnet(cmd) => testnet::run(cmd),
        Command::Models(cmd) => {
            set_compute_threads(cmd.threads().unwrap_or(0));
            models::run(cmd)
        }
        Command::Submit(cmd) => submit::run(cmd),
        Command::Verify(args) => submit::verify(args),
        Command::Tasks(args) => submit::tasks(&args),
        Command::Task(args) => submit::task(&args),
        Command::Feedback(args) => submit::feedback(&args),
        Command::Sim(args) => sim::run(&args),
        Command::Infer(cmd) => {
            set_compute_threads(cmd.threads().unwrap_or(0));
            infer::run(cmd)
        }
    }
}

/// Fixes how many threads each of candle's CPU kernels uses. candle reads
/// two settings: `RAYON_NUM_THREADS` (how many parts a matmul splits into,
/// and the size of rayon's global pool) and `CANDLE_NUM_THREADS` (its
/// element-wise kernels' pool, read once). Setting only the latter left
/// "single-threaded" replicas splitting every matmul across all cores.
/// 0 keeps candle's defaults (all physical cores); a value the user set in
/// the environment wins.
#[allow(unsafe_code)]
fn set_compute_threads(threads: usize) {
    if threads == 0 {
        return;
    }
    for name in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(name).is_none() {
            // SAFETY: called from `run` on the main thread before any
            // runtime, pool or model thread exists, so nothing reads the
            // environment concurrently.
            unsafe { std::env::set_var(name, threads.to_string()) };
        }
    }
}

/// Runs a node on a fresh runtime until SIGINT or SIGTERM.
fn run_node(config: config::NodeConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
        let result = node::run(config, shutdown).await;
        signals.abort();
        result
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM; stop the node with Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stop requested");
    shutdown.cancel();
}
