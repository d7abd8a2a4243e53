//! The self-benchmark a node runs on its models at start, so its advert
//! says what it can really do: embeddings per second through the worker
//! pool (all replicas busy), and prefill and decode tokens per second for
//! one sequence. Results are cached by (weights digest, hardware, pool
//! shape, software version), so a node measures once per machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use mycel_protocol::{GenerateParams, Hardware, Throughput};

use crate::error::{ModelError, Result};
use crate::pool::Pool;
use crate::{ChatMessage, Embedder, Generator};

/// File in the models folder holding measured throughput, shared by the
/// nodes that serve from that folder.
pub const CACHE_FILE: &str = ".mycel-throughput.json";

/// Bumped when the runtime's speed changes within a version (2: mycel's
/// own BERT encoder; 3: kept heap, truly single-threaded replicas, fused
/// dense layers; 4: mycel's own llama kernels; 5: embeddings without
/// padding, batches split between threads; 6: grouped attention over an
/// f16 KV cache), so nodes measure again
/// instead of advertising old figures.
const RUNTIME_REVISION: u32 = 6;

/// The cache key for a model on this machine and pool.
pub fn cache_key(weights_hex: &str, hardware: &Hardware, pool: &Pool, threads: usize) -> String {
    let gpus: Vec<&str> = hardware.gpus.iter().map(|g| g.name.as_str()).collect();
    format!(
        "{weights_hex}|{}|{} cores|{}|gpus {}|{}x{threads}|{}-r{RUNTIME_REVISION}{}",
        hardware.cpu_model,
        hardware.cores,
        hardware.simd.join(","),
        gpus.join(","),
        pool.config().replicas,
        env!("CARGO_PKG_VERSION"),
        // A debug build is slower: never let its figures stand for a release's.
        if cfg!(debug_assertions) { "|debug" } else { "" }
    )
}

/// Measured figures by cache key, kept in a small JSON file.
#[derive(Debug, Default)]
pub struct Cache {
    entries: BTreeMap<String, [f32; 3]>,
}

impl Cache {
    /// Reads the cache; a missing or unreadable file is an empty cache.
    pub fn load(dir: &Path) -> Self {
        let entries = std::fs::read_to_string(dir.join(CACHE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self { entries }
    }

    /// The figures for a key, if measured.
    pub fn get(&self, key: &str) -> Option<Throughput> {
        self.entries.get(key).map(|[e, p, d]| Throughput {
            embeddings_per_s: *e,
            prefill_tokens_per_s: *p,
            decode_tokens_per_s: *d,
        })
    }

    /// Figures measured for these weights on any pool shape, if any (for
    /// listings; adverts use [`Self::get`] with the exact key).
    pub fn for_weights(&self, weights_hex: &str) -> Option<Throughput> {
        let prefix = format!("{weights_hex}|");
        self.entries.keys().find(|k| k.starts_with(&prefix)).and_then(|k| self.get(k))
    }

    /// Records figures and writes the file (atomically).
    pub fn put(&mut self, dir: &Path, key: String, t: Throughput) -> Result<()> {
        self.entries.insert(key, [t.embeddings_per_s, t.prefill_tokens_per_s, t.decode_tokens_per_s]);
        let path = dir.join(CACHE_FILE);
        let tmp = dir.join(format!("{CACHE_FILE}.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(&self.entries).map_err(|e| ModelError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(ModelError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(ModelError::io(&path))
    }
}

/// Short texts of about 20 tokens, like a typical search query or title.
pub fn short_texts(n: usize) -> Vec<String> {
    const WORDS: [&str; 12] =
        ["swarm", "node", "model", "peer", "shard", "gossip", "auction", "vector", "token", "cache", "proof", "result"];
    (0..n)
        .map(|i| {
            let words: Vec<&str> = (0..14).map(|j| WORDS[(i * 7 + j * 5) % WORDS.len()]).collect();
            format!("Sentence {i}: {}.", words.join(" "))
        })
        .collect()
}

/// Embeddings per second with every replica busy on batches of 32 short
/// texts.
pub async fn embeddings_per_s(pool: &Pool, model: &Arc<Embedder>) -> Result<f32> {
    let batch = short_texts(32);
    let busy = pool.config().replicas;
    // Warm-up: first runs allocate.
    run_embeds(pool, model, &batch, busy).await?;
    let rounds = 2;
    let started = Instant::now();
    for _ in 0..rounds {
        run_embeds(pool, model, &batch, busy).await?;
    }
    let texts = (rounds * busy * batch.len()) as f64;
    Ok((texts / started.elapsed().as_secs_f64()) as f32)
}

async fn run_embeds(pool: &Pool, model: &Arc<Embedder>, batch: &[String], jobs: usize) -> Result<()> {
    let receivers = (0..jobs)
        .map(|_| pool.embed(model.clone(), batch.to_vec()).map_err(|e| ModelError::Invalid(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    for rx in receivers {
        rx.await.map_err(|_| ModelError::Cancelled)??;
    }
    Ok(())
}

/// Prefill and decode tokens per second for one sequence: a prompt of
/// about 128 tokens, then 32 generated tokens.
pub fn generation_tokens_per_s(model: &Generator) -> Result<(f32, f32)> {
    let prompt = model.chat_prompt(&[ChatMessage::user(short_texts(6).join(" "))])?;
    let ids = model.encode(&prompt)?;
    // Warm-up.
    model.session().feed(&ids)?;
    let started = Instant::now();
    model.session().feed(&ids)?;
    let prefill = ids.len() as f64 / started.elapsed().as_secs_f64();

    let params = GenerateParams { max_tokens: 32, stop: Vec::new(), ..GenerateParams::default() };
    let started = Instant::now();
    let generation = model.generate(&ids, &params, &mut |_| std::ops::ControlFlow::Continue(()))?;
    let total = started.elapsed().as_secs_f64();
    // Time after the prompt: total minus one prefill at the measured rate.
    let decode_secs = (total - ids.len() as f64 / prefill).max(1e-6);
    let decode = f64::from(generation.tokens.saturating_sub(1).max(1)) / decode_secs;
    Ok((prefill as f32, decode as f32))
}

#[cfg(test)]
mod tests {
    use mycel_protocol::Gpu;

    use super::*;
    use crate::PoolConfig;

    #[test]
    fn figures_are_kept_per_weights_hardware_and_pool() {
        let pool =
            |replicas| Pool::new(PoolConfig { replicas, threads: 1, queue: 1, max_batch: 1, idle_threads: 1 }).unwrap();
        let (one, two) = (pool(1), pool(2));
        let hw = Hardware { cpu_model: "EPYC".into(), cores: 2, simd: vec!["avx2".into()], ..Hardware::default() };
        let key = cache_key("aa", &hw, &one, 1);
        let with_gpu =
            Hardware { gpus: vec![Gpu { name: "H100".into(), memory_bytes: 1, compute_capability: 90 }], ..hw.clone() };
        let others = [
            cache_key("bb", &hw, &one, 1),
            cache_key("aa", &Hardware { cpu_model: "Xeon".into(), ..hw.clone() }, &one, 1),
            cache_key("aa", &Hardware { cores: 16, ..hw.clone() }, &one, 1),
            cache_key("aa", &Hardware { simd: vec!["avx512f".into()], ..hw.clone() }, &one, 1),
            cache_key("aa", &with_gpu, &one, 1),
            cache_key("aa", &hw, &two, 1),
            cache_key("aa", &hw, &one, 2),
        ];
        for other in &others {
            assert_ne!(&key, other);
        }
        assert_eq!(cache_key("aa", &hw, &one, 1), key, "stable");

        let dir = tempfile::tempdir().unwrap();
        let t = Throughput { embeddings_per_s: 300.0, prefill_tokens_per_s: 0.0, decode_tokens_per_s: 0.0 };
        let mut cache = Cache::load(dir.path());
        assert_eq!(cache.get(&key), None);
        cache.put(dir.path(), key.clone(), t).unwrap();
        let reloaded = Cache::load(dir.path());
        assert_eq!(reloaded.get(&key), Some(t));
        assert_eq!(reloaded.get(&others[5]), None, "another pool shape measures again");
        assert_eq!(reloaded.for_weights("aa"), Some(t));
        assert_eq!(reloaded.for_weights("a"), None, "a digest prefix is not the digest");

        // A damaged file is an empty cache (the node measures again).
        std::fs::write(dir.path().join(CACHE_FILE), "{ not json").unwrap();
        assert_eq!(Cache::load(dir.path()).get(&key), None);
    }
}
