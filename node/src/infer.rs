//! `mycel infer embed|generate`: run a local model, no swarm.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mycel_models::registry::{self, LocalModel};
use mycel_models::{ChatMessage, Embedder, Generator, LoadOptions};
use mycel_protocol::{GenerateParams, ModelKind};

use crate::cli::{InferCommand, InferEmbedArgs, InferGenerateArgs, ModelChoice};

pub fn run(cmd: InferCommand) -> Result<()> {
    match cmd {
        InferCommand::Embed(args) => embed(args),
        InferCommand::Generate(args) => generate(args),
    }
}

fn embed(args: InferEmbedArgs) -> Result<()> {
    let model = choose(&args.model, ModelKind::Embedding)?;
    let texts = match &args.input {
        Some(path) => crate::submit::read_inputs(path)?,
        None => args.texts.clone(),
    };
    let started = Instant::now();
    let embedder =
        Embedder::load(&model.dir, &mycel_models::best_device()).with_context(|| format!("loading {}", model.id))?;
    tracing::debug!(model = %model.id, elapsed_ms = started.elapsed().as_millis() as u64, "model loaded");
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let started = Instant::now();
    let vectors = embedder.embed(&refs, args.batch_size as usize).context("embedding")?;
    tracing::info!(
        model = %model.id, texts = texts.len(),
        per_s = format!("{:.1}", texts.len() as f64 / started.elapsed().as_secs_f64()),
        "embedded"
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for v in vectors {
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn generate(args: InferGenerateArgs) -> Result<()> {
    let model = choose(&args.model, ModelKind::Generation)?;
    let options = LoadOptions { requantize_q4_1: args.q8_0, ..LoadOptions::default() };
    let generator = Generator::load(&model.weights, &options, &mycel_models::best_device())
        .with_context(|| format!("loading {}", model.id))?;
    let prompt = if args.raw {
        args.prompt.clone()
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        generator.chat_prompt(&messages)?
    };
    let ids = generator.encode(&prompt)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        ..GenerateParams::default()
    };
    params.check().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let generation = generator
        .generate(&ids, &params, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })
        .context("generating")?;
    writeln!(stdout)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2} s, finish: {:?}]",
        ids.len(),
        generation.tokens,
        secs,
        generation.finish
    );
    Ok(())
}

/// The model the user named, or the first local one of `kind`.
fn choose(choice: &ModelChoice, kind: ModelKind) -> Result<LocalModel> {
    let dir = choice.dir.resolve()?;
    let want = match kind {
        ModelKind::Embedding => "an embedding",
        _ => "a generation",
    };
    let model = match &choice.model {
        Some(name) if PathBuf::from(name).exists() => {
            let path = PathBuf::from(name);
            let folder = if path.is_file() { path.parent().map(PathBuf::from).unwrap_or_default() } else { path };
            registry::open(&folder).with_context(|| format!("reading the model at {name}"))?
        }
        Some(name) => {
            let folder = dir.join(name);
            if !folder.is_dir() {
                bail!("no model {name:?} in {} (see `mycel models list`)", dir.display());
            }
            registry::open(&folder).with_context(|| format!("reading the model {name}"))?
        }
        None => registry::scan(&dir)
            .with_context(|| format!("reading models in {}", dir.display()))?
            .into_iter()
            .filter(|m| m.kind == kind)
            .min_by_key(|m| m.size)
            .with_context(|| {
                format!("no {want} model in {}: run `mycel models fetch`, or pass --model PATH", dir.display())
            })?,
    };
    if model.kind != kind {
        bail!("{} is not {want} model", model.id);
    }
    Ok(model)
}
