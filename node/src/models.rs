//! `mycel models fetch|list`.

use anyhow::{Context, Result};
use mycel_models::{PoolConfig, fetch, registry};
use mycel_protocol::ModelKind;

use crate::cli::ModelsCommand;
use crate::client::print_table;

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Fetch(args) => {
            let dir = args.dir.resolve()?;
            if let Some(unknown) = args.only.iter().find(|id| !fetch::PACKAGES.iter().any(|p| p.id == id.as_str())) {
                let known: Vec<&str> = fetch::PACKAGES.iter().map(|p| p.id).collect();
                anyhow::bail!("no model {unknown:?} to fetch; known: {}", known.join(", "));
            }
            // A model that borrows another's tokenizer brings it along.
            let mut only = args.only.clone();
            for p in fetch::PACKAGES.iter().filter(|p| args.only.iter().any(|o| o == p.id)) {
                if let fetch::Source::OnnxBert { tokenizer_from, .. } = p.source {
                    only.push(tokenizer_from.to_string());
                }
            }
            let wanted = |id: &str| only.is_empty() || only.iter().any(|o| o == id);
            for package in fetch::PACKAGES.iter().filter(|p| wanted(p.id)) {
                eprintln!("{} ({})", package.id, package.specs());
                let outcome = fetch::fetch(package, &dir, &mut |line| eprintln!("  {line}"))
                    .with_context(|| format!("fetching {}", package.id))?;
                match outcome {
                    fetch::Outcome::Installed => eprintln!("  installed in {}", dir.join(package.id).display()),
                    fetch::Outcome::Present => eprintln!("  already present"),
                }
            }
            Ok(())
        }
        ModelsCommand::Bench(args) => {
            let dir = args.dir.resolve()?;
            let models = registry::scan(&dir).with_context(|| format!("reading models in {}", dir.display()))?;
            if models.is_empty() {
                anyhow::bail!("no models in {} (get some with `mycel models fetch`)", dir.display());
            }
            let hardware = mycel_models::hardware::detect();
            eprintln!("measuring {} models with {} replica(s) x 1 thread ...", models.len(), args.replicas);
            // Throughput under load: no idle cores lent.
            let pool = PoolConfig { threads: 1, idle_threads: 1, ..PoolConfig::for_cores(args.replicas as usize) };
            let loaded = crate::local::load_with(&dir, pool, models, &hardware, !args.keep)?;
            for m in loaded.adverts() {
                let t = m.throughput;
                match m.kind {
                    ModelKind::Embedding => println!("{:<24} {:.0} embeddings/s", m.id, t.embeddings_per_s),
                    _ => println!(
                        "{:<24} prefill {:.0} tok/s, decode {:.0} tok/s",
                        m.id, t.prefill_tokens_per_s, t.decode_tokens_per_s
                    ),
                }
            }
            Ok(())
        }
        ModelsCommand::List(args) => {
            let dir = args.dir.resolve()?;
            let models = registry::scan(&dir).with_context(|| format!("reading models in {}", dir.display()))?;
            // Speeds nodes measured on this machine, if any.
            let measured = mycel_models::bench::Cache::load(&dir);
            let speed = |m: &registry::LocalModel| measured.for_weights(&m.digest.to_hex());
            if args.json {
                let rows: Vec<serde_json::Value> = models
                    .iter()
                    .map(|m| {
                        let t = speed(m);
                        serde_json::json!({
                            "id": m.id, "kind": kind(m.kind), "digest": m.digest.to_hex(),
                            "size_bytes": m.size, "path": m.weights,
                            "description": m.profile.description, "tags": m.profile.tags,
                            "embeddings_per_s": t.map(|t| t.embeddings_per_s),
                            "prefill_tokens_per_s": t.map(|t| t.prefill_tokens_per_s),
                            "decode_tokens_per_s": t.map(|t| t.decode_tokens_per_s),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if models.is_empty() {
                println!("no models in {} (get some with `mycel models fetch`)", dir.display());
            } else {
                let rows: Vec<[String; 6]> = models
                    .iter()
                    .map(|m| {
                        let speed = match (m.kind, speed(m)) {
                            (_, None) => "not measured yet (a node measures at start)".to_string(),
                            (ModelKind::Embedding, Some(t)) => format!("{:.0} embeddings/s", t.embeddings_per_s),
                            (_, Some(t)) => format!(
                                "prefill {:.0} tok/s, decode {:.0} tok/s",
                                t.prefill_tokens_per_s, t.decode_tokens_per_s
                            ),
                        };
                        [
                            m.id.clone(),
                            kind(m.kind).into(),
                            m.digest.to_hex(),
                            format!("{:.1} MB", m.size as f64 / 1e6),
                            m.profile.tags.join(","),
                            speed,
                        ]
                    })
                    .collect();
                print_table(&["MODEL", "KIND", "WEIGHTS SHA-256", "SIZE", "GOOD AT", "MEASURED SPEED"], &rows);
            }
            Ok(())
        }
    }
}

fn kind(k: ModelKind) -> &'static str {
    match k {
        ModelKind::Embedding => "embedding",
        ModelKind::Generation => "generation",
        _ => "other",
    }
}
