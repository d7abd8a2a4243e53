//! The models this node serves: which ones (from the config), loading them
//! into the worker pool, and measuring them for the advert.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mycel_models::bench;
use mycel_models::registry::{self, LocalModel};
use mycel_models::{Embedder, Generator, LoadOptions, Pool, PoolConfig};
use mycel_protocol::{Hardware, ModelAdvert, ModelKind, Quantization, Throughput};
use tracing::info;

use crate::config::NodeConfig;

/// A loaded model and what the swarm is told about it.
#[derive(Debug)]
pub struct Served<M> {
    pub model: Arc<M>,
    pub advert: ModelAdvert,
}

/// Everything the node runs models with.
#[derive(Debug)]
pub struct LocalModels {
    pub pool: Pool,
    pub embedders: Vec<Served<Embedder>>,
    pub generators: Vec<Served<Generator>>,
}

impl LocalModels {
    /// The model with these weights, to run a shard on.
    pub fn model(&self, weights: &mycel_protocol::Digest) -> Option<mycel_models::shard::Model> {
        let embedder = self.embedders.iter().find(|s| s.advert.weights == *weights);
        let generator = self.generators.iter().find(|s| s.advert.weights == *weights);
        match (embedder, generator) {
            (Some(s), _) => Some(mycel_models::shard::Model::Embedder(s.model.clone())),
            (None, Some(s)) => Some(mycel_models::shard::Model::Generator(s.model.clone())),
            (None, None) => None,
        }
    }

    /// What the advert lists.
    pub fn adverts(&self) -> Vec<ModelAdvert> {
        self.embedders
            .iter()
            .map(|s| s.advert.clone())
            .chain(self.generators.iter().map(|s| s.advert.clone()))
            .collect()
    }
}

/// The model folders the config asks for. An id that is not there is an
/// error naming what is.
pub fn choose(config: &NodeConfig) -> Result<Vec<LocalModel>> {
    let dir = &config.models_dir;
    let Some(wanted) = &config.models else {
        return registry::scan(dir).with_context(|| format!("reading models in {}", dir.display()));
    };
    wanted
        .iter()
        .map(|name| {
            let path = PathBuf::from(name);
            let folder = if path.is_absolute() || name.contains('/') {
                if path.is_file() { path.parent().map(Path::to_path_buf).unwrap_or_default() } else { path }
            } else {
                dir.join(name)
            };
            if !folder.is_dir() {
                let have: Vec<String> = registry::scan(dir).unwrap_or_default().into_iter().map(|m| m.id).collect();
                bail!(
                    "model {name:?} not found in {} (have: {}); get models with `mycel models fetch`",
                    dir.display(),
                    if have.is_empty() { "none".to_string() } else { have.join(", ") }
                );
            }
            registry::open(&folder).with_context(|| format!("reading the model {name}"))
        })
        .collect()
}

/// Loads the chosen models, measures them (or reads the cached figures),
/// and starts the worker pool. Blocking: run it off the async workers.
pub fn load(config: &NodeConfig, chosen: Vec<LocalModel>, hardware: &Hardware) -> Result<LocalModels> {
    load_with(&config.models_dir, config.pool(), chosen, hardware, false)
}

/// [`load`] without a node: `remeasure` ignores cached figures.
pub fn load_with(
    models_dir: &Path,
    pool: PoolConfig,
    chosen: Vec<LocalModel>,
    hardware: &Hardware,
    remeasure: bool,
) -> Result<LocalModels> {
    let threads = pool.threads;
    let pool = Pool::new(pool).context("starting the model worker pool")?;
    let mut cache = bench::Cache::load(models_dir);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut embedders = Vec::new();
    let mut generators = Vec::new();
    for info in chosen {
        let key = bench::cache_key(&info.digest.to_hex(), hardware, &pool, threads);
        match info.kind {
            ModelKind::Embedding => {
                let model = Arc::new(
                    Embedder::load(&info.dir, &mycel_models::best_device())
                        .with_context(|| format!("loading {}", info.id))?,
                );
                let throughput = match cache.get(&key).filter(|_| !remeasure) {
                    Some(t) => t,
                    None => {
                        info!(model = %info.id, "measuring embedding throughput");
                        let per_s = runtime.block_on(bench::embeddings_per_s(&pool, &model))?;
                        let t = Throughput { embeddings_per_s: per_s, ..Throughput::default() };
                        remember(&mut cache, models_dir, key, t);
                        t
                    }
                };
                let advert = ModelAdvert {
                    id: info.id.clone(),
                    kind: ModelKind::Embedding,
                    weights: info.digest,
                    dimensions: model.dimensions() as u32,
                    context: model.max_tokens() as u32,
                    quantization: Quantization::F32,
                    throughput,
                    profile: info.profile.clone(),
                    tools: false,
                };
                info!(model = %info.id, embeddings_per_s = throughput.embeddings_per_s, "serving");
                embedders.push(Served { model, advert });
            }
            ModelKind::Generation => {
                let model = Arc::new(
                    Generator::load(&info.weights, &LoadOptions::default(), &mycel_models::best_device())
                        .with_context(|| format!("loading {}", info.id))?,
                );
                let throughput = match cache.get(&key).filter(|_| !remeasure) {
                    Some(t) => t,
                    None => {
                        info!(model = %info.id, "measuring generation speed");
                        let (prefill, decode) = bench::generation_tokens_per_s(&model)?;
                        let t = Throughput {
                            prefill_tokens_per_s: prefill,
                            decode_tokens_per_s: decode,
                            ..Throughput::default()
                        };
                        remember(&mut cache, models_dir, key, t);
                        t
                    }
                };
                let advert = ModelAdvert {
                    id: info.id.clone(),
                    kind: ModelKind::Generation,
                    weights: info.digest,
                    dimensions: 0,
                    context: model.context() as u32,
                    quantization: model.quantization().clone(),
                    throughput,
                    profile: info.profile.clone(),
                    tools: model.supports_tools(),
                };
                info!(
                    model = %info.id,
                    prefill_tokens_per_s = throughput.prefill_tokens_per_s,
                    decode_tokens_per_s = throughput.decode_tokens_per_s,
                    "serving"
                );
                generators.push(Served { model, advert });
            }
            _ => bail!("{}: unsupported model kind", info.id),
        }
    }
    Ok(LocalModels { pool, embedders, generators })
}

/// Caches figures; a read-only models folder only costs a re-measure.
fn remember(cache: &mut bench::Cache, dir: &Path, key: String, t: Throughput) {
    if let Err(e) = cache.put(dir, key, t) {
        tracing::warn!(error = %e, "cannot cache the measured speed");
    }
}
