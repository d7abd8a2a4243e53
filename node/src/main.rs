//! The `mycel` command. Parses the command line and hands off to the
//! library; everything else lives in `mycel_node` and the crates below it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before any thread starts: model buffers stay in the process between
    // batches (see mycel_models::heap).
    mycel_models::heap::keep_freed_memory();
    let cli = mycel_node::cli::Cli::parse();
    match mycel_node::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (plus causes), not a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
