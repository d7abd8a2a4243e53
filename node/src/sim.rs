//! `mycel sim`: a simulated swarm, run and checked in this process.

use anyhow::{Context, Result, bail};
use mycel_sim::{Scenario, Sim};

use crate::cli::SimArgs;

pub fn run(args: &SimArgs) -> Result<()> {
    let mut scenario = match &args.scenario {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading the scenario {}", path.display()))?;
            Scenario::from_toml(&text).map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?
        }
        None => Scenario::default(),
    };
    if let Some(n) = args.nodes {
        scenario.nodes = n;
        scenario.requesters = scenario.requesters.min(n);
    }
    if let Some(t) = args.tasks {
        scenario.tasks = t;
    }
    if let Some(s) = args.shards_per_task {
        scenario.shards_per_task = s;
    }
    scenario.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let seed = match args.seed {
        Some(seed) => seed,
        None => random_seed()?,
    };
    eprintln!(
        "simulating {} nodes, {} tasks of {} shards (seed {seed})...",
        scenario.nodes, scenario.tasks, scenario.shards_per_task
    );
    let report = Sim::new(scenario, seed).run();
    println!("{report}");
    if !report.ok() {
        let mut replay = format!("mycel sim --seed {seed}");
        if let Some(path) = &args.scenario {
            replay.push_str(&format!(" --scenario {}", path.display()));
        }
        for (flag, value) in [
            ("--nodes", args.nodes.map(|n| n.to_string())),
            ("--tasks", args.tasks.map(|n| n.to_string())),
            ("--shards-per-task", args.shards_per_task.map(|n| n.to_string())),
        ] {
            if let Some(v) = value {
                replay.push_str(&format!(" {flag} {v}"));
            }
        }
        bail!("{} invariant violations; replay with: {replay}", report.violations.len());
    }
    Ok(())
}

/// A fresh seed, for runs the user did not seed (printed, so they replay).
pub(crate) fn random_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a seed: {e}"))?;
    Ok(u64::from_le_bytes(bytes))
}
