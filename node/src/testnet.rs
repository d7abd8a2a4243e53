//! `mycel testnet up|status|down`: the CLI face of `mycel_testnet::net`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mycel_testnet::net::{self, Manifest, UpOptions};

use crate::cli::TestnetCommand;
use crate::client::print_table;

pub fn run(cmd: TestnetCommand) -> Result<()> {
    match cmd {
        TestnetCommand::Up(args) => {
            let models = models_folder(&args)?;
            let opts = UpOptions {
                bin: std::env::current_exe().context("locating the mycel binary")?,
                nodes: args.nodes,
                dir: args.dir.path.clone(),
                advert_interval: args.advert_interval.0,
                timeout: args.timeout.0,
                node_args: node_args(&args, models.as_ref().map(|m| m.dir.as_path())),
                netns: args.netns,
                nat: args.nat.clone(),
                adverts_used: args.adverts == mycel_net::AdvertScope::Used,
            };
            if let Some(Models { dir: models, .. }) = &models {
                // Measure the models once, alone, before the nodes start:
                // nodes measuring at the same moment would slow each other
                // down and advertise (and cache) wrong figures.
                eprintln!("measuring the models in {} (once per machine) ...", models.display());
                let status = std::process::Command::new(&opts.bin)
                    .args(["models", "bench", "--keep", "--replicas", &args.replicas.to_string(), "--dir"])
                    .arg(models)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("running mycel models bench")?;
                anyhow::ensure!(status.success(), "measuring the models failed");
            }
            eprintln!("starting {} nodes in {} ...", opts.nodes, opts.dir.display());
            let report = net::up(&opts)?;
            let rows: Vec<[String; 4]> = report
                .manifest
                .nodes
                .iter()
                .map(|n| {
                    let listen = n.listen_addrs.first().map(|a| a.split("/p2p/").next().unwrap_or(a).to_string());
                    [n.name.clone(), n.peer_id.clone(), listen.unwrap_or_default(), n.api.clone()]
                })
                .collect();
            print_table(&["NAME", "PEER ID", "LISTEN", "API"], &rows);
            eprintln!(
                "\n{} nodes {} {:.2}s after the last one started, by their clocks \
                 (confirmed by polling after {:.2}s; {:.2}s in all).\nmanifest: {}\nstop with: mycel testnet down --dir {}",
                report.manifest.nodes.len(),
                if opts.adverts_used {
                    "connected (each hears only the adverts of the models it uses)"
                } else {
                    "converged"
                },
                report.converged_after_last_start.as_secs_f64(),
                report.confirmed_after_last_start.as_secs_f64(),
                report.total.as_secs_f64(),
                args.dir.path.join(net::MANIFEST).display(),
                args.dir.path.display(),
            );
            if let Some(models) = &models {
                let expected = expected_models(&args, &models.ids);
                let count: usize = expected.iter().map(BTreeSet::len).sum();
                if count > 0 {
                    eprintln!(
                        "waiting until the nodes serve their {count} models (loading, measured once per machine) ..."
                    );
                    let started = Instant::now();
                    let missing = net::wait_models(
                        &report.manifest,
                        &expected,
                        opts.adverts_used,
                        Instant::now() + args.models_timeout.0,
                    );
                    if missing.is_empty() {
                        eprintln!("every node serves its models ({:.1}s).", started.elapsed().as_secs_f64());
                    } else {
                        eprintln!(
                            "after {:.0}s not every model is served yet (the testnet stays up):\n  {}",
                            started.elapsed().as_secs_f64(),
                            missing.join("\n  ")
                        );
                    }
                }
            }
            Ok(())
        }
        TestnetCommand::Status(args) => {
            let manifest = Manifest::read(&args.dir.path)?;
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into();
            let rows: Vec<[String; 5]> = manifest
                .nodes
                .iter()
                .map(|n| {
                    let running = net::is_our_node(n);
                    let peers = if running {
                        net::known_peers(&agent, n).map_or("?".to_string(), |p| p.len().to_string())
                    } else {
                        "-".into()
                    };
                    [
                        n.name.clone(),
                        n.peer_id.clone(),
                        n.pid.to_string(),
                        if running { "running".into() } else { "stopped".into() },
                        peers,
                    ]
                })
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&manifest)?);
            } else {
                print_table(&["NAME", "PEER ID", "PID", "STATE", "PEERS KNOWN"], &rows);
            }
            Ok(())
        }
        TestnetCommand::Chaos(args) => {
            let seed = match args.seed {
                Some(seed) => seed,
                None => crate::sim::random_seed()?,
            };
            let opts = mycel_testnet::chaos::ChaosOptions {
                dir: args.dir.path.clone(),
                kill_every: args.kill_every.0,
                down: args.down.0,
                seed,
                duration: args.duration.map(|d| d.0),
                spare: if args.spare.is_empty() { vec![0] } else { args.spare.clone() },
            };
            // The log goes to stdout, a line per step, as it happens.
            let report = mycel_testnet::chaos::chaos(&opts, &mut std::io::stdout())?;
            anyhow::ensure!(
                report.restarted == report.killed.len(),
                "{} of {} killed nodes did not come back (see the log above)",
                report.killed.len() - report.restarted,
                report.killed.len()
            );
            Ok(())
        }
        TestnetCommand::Partition(args) => {
            let manifest = Manifest::read(&args.dir.path)?;
            let netns = manifest.netns.context("this testnet has no network namespaces: start it with --netns")?;
            if let Some(bad) = args.nodes.iter().find(|i| **i >= netns.nodes) {
                anyhow::bail!("no node {bad}: the testnet has {} nodes", netns.nodes);
            }
            netns.partition(&args.nodes)?;
            eprintln!(
                "cut off nodes {:?} from the rest; undo with: mycel testnet heal --dir {}",
                args.nodes,
                args.dir.path.display()
            );
            Ok(())
        }
        TestnetCommand::Degrade(args) => {
            let manifest = Manifest::read(&args.dir.path)?;
            let netns = manifest.netns.context("this testnet has no network namespaces: start it with --netns")?;
            match args.delay {
                Some(delay) => netns.netem(delay.0.as_millis() as u32, args.loss)?,
                None => netns.loss(args.loss)?,
            }
            eprintln!(
                "every node now loses {}% of its packets{}",
                args.loss,
                args.delay.map_or(String::new(), |d| format!(", {:?} later", d.0))
            );
            Ok(())
        }
        TestnetCommand::Heal(args) => {
            let manifest = Manifest::read(&args.dir.path)?;
            let netns = manifest.netns.context("this testnet has no network namespaces: start it with --netns")?;
            netns.heal()?;
            eprintln!("every node reconnected");
            Ok(())
        }
        TestnetCommand::Down(args) => {
            let started = Instant::now();
            let stopped = net::down(&args.dir.path, Duration::from_secs(10))?;
            eprintln!(
                "stopped {stopped} nodes in {:.1}s and removed {}",
                started.elapsed().as_secs_f64(),
                args.dir.path.display()
            );
            Ok(())
        }
    }
}

/// The models folder a testnet serves, and the ids of the models in it.
struct Models {
    dir: PathBuf,
    ids: Vec<String>,
}

/// `--models-dir`, else `$MYCEL_MODELS_DIR`, else the data directory's
/// `models` (where `mycel models fetch` puts them); none with
/// `--no-models`. A folder named on purpose must hold models; the default
/// one may be empty (the nodes then serve none, and the user is told how
/// to get some).
fn models_folder(args: &crate::cli::TestnetUpArgs) -> Result<Option<Models>> {
    if args.no_models {
        return Ok(None);
    }
    // Where `mycel models fetch` put them, by the same rule.
    let named = args.models_dir.clone().or_else(|| std::env::var_os("MYCEL_MODELS_DIR").map(PathBuf::from));
    let dir =
        crate::cli::ModelsDirArgs { dir: named.clone(), data_dir: crate::cli::DataDir { path: args.data_dir.clone() } }
            .resolve()?;
    let ids: Vec<String> = mycel_models::registry::scan(&dir)
        .with_context(|| format!("reading models in {}", dir.display()))?
        .into_iter()
        .map(|m| m.id)
        .collect();
    if ids.is_empty() {
        if named.is_some() {
            anyhow::bail!("no models in {} (get some with `mycel models fetch --dir {0}`)", dir.display());
        }
        anyhow::ensure!(
            args.node_models.is_empty(),
            "--node-models: no models in {} (get some with `mycel models fetch`, or pass --models-dir)",
            dir.display()
        );
        eprintln!(
            "no models in {}: the nodes serve none (get some with `mycel models fetch`; --no-models says you mean it)",
            dir.display()
        );
        return Ok(None);
    }
    Ok(Some(Models { dir, ids }))
}

/// The model ids each node is to serve: its `--node-models` entry
/// (round-robin), or every model in the folder.
fn expected_models(args: &crate::cli::TestnetUpArgs, all: &[String]) -> Vec<BTreeSet<String>> {
    (0..args.nodes as usize)
        .map(|i| match args.node_models.get(i % args.node_models.len().max(1)) {
            None => all.iter().cloned().collect(),
            Some(list) if list == "none" => BTreeSet::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| Path::new(m).file_name().map_or(m.to_string(), |f| f.to_string_lossy().into_owned()))
                .collect(),
        })
        .collect()
}

/// Each node's flags: models round-robin, then any fault it was given.
fn node_args(args: &crate::cli::TestnetUpArgs, models: Option<&Path>) -> Vec<Vec<String>> {
    let models = model_args(args, models);
    if args.fault.is_empty() {
        return models;
    }
    (0..args.nodes)
        .map(|i| {
            let mut a = models[i as usize % models.len()].clone();
            if let Some((_, kind)) = args.fault.iter().find(|(index, _)| *index == i) {
                use clap::ValueEnum as _;
                let name = kind.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
                a.extend(["--fault".to_string(), name]);
            }
            a
        })
        .collect()
}

/// Each node's model flags, from the models folder and `--node-models`.
fn model_args(args: &crate::cli::TestnetUpArgs, models: Option<&Path>) -> Vec<Vec<String>> {
    let Some(dir) = models else {
        return vec![vec!["--model".into(), "none".into()]];
    };
    let base = vec![
        "--models-dir".to_string(),
        dir.display().to_string(),
        "--replicas".to_string(),
        args.replicas.to_string(),
        "--threads".to_string(),
        "1".to_string(),
    ];
    if args.node_models.is_empty() {
        return vec![base];
    }
    args.node_models
        .iter()
        .map(|models| {
            let mut a = base.clone();
            a.extend(["--model".to_string(), models.clone()]);
            a
        })
        .collect()
}
