//! Sentence embeddings with BERT-family models, computed the way
//! sentence-transformers computes them: tokens truncated at the model's
//! `max_seq_length`, the encoder's output pooled over each text's real
//! tokens (mean or CLS, from `1_Pooling/config.json`) and L2-normalised
//! when the model's `modules.json` has a `Normalize` step.
//!
//! On the CPU a batch runs without padding (texts back to back); on other
//! devices it is padded to its longest text, and padding never reaches the
//! results. Texts are sorted by length before batching, so a padded batch
//! pads to neighbours of similar length, and a batch split between threads
//! splits evenly; results come back in input order.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use serde::Deserialize;
use tokenizers::{Encoding, Tokenizer};

use crate::bert::Bert;
use crate::error::{ModelError, Result};
use crate::tokenizer;

/// How token vectors become one text vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps.
    Mean,
    /// The first (`[CLS]`) token's vector.
    Cls,
}

/// A loaded embedding model.
pub struct Embedder {
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    dimensions: usize,
    pad_id: u32,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_tokens", &self.max_tokens)
            .field("dimensions", &self.dimensions)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(ModelError::io(path))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, e))
}

fn read_json_if_present<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if path.exists() { read_json(path).map(Some) } else { Ok(None) }
}

impl Embedder {
    /// Loads a model folder: `config.json`, one `*.safetensors`,
    /// `tokenizer.json`, and the sentence-transformers files when present
    /// (without them: mean pooling, normalised, the model's full context).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: Config = read_json(&config_path)?;
        let raw: serde_json::Value = read_json(&config_path)?;
        let positions = raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(512) as usize;

        let max_tokens = read_json_if_present::<SentenceBertConfig>(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.max_seq_length)
            .unwrap_or(positions)
            .min(positions);
        let modules: Vec<Module> = read_json_if_present(&dir.join("modules.json"))?.unwrap_or_default();
        let (pooling, normalize) = if modules.is_empty() {
            (Pooling::Mean, true)
        } else {
            let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
            let pooling_dir = modules.iter().find(|m| m.kind.ends_with(".Pooling")).map(|m| dir.join(&m.path));
            let pooling = match pooling_dir {
                Some(p) => pooling_from(&p.join("config.json"))?,
                None => Pooling::Mean,
            };
            (pooling, normalize)
        };

        let weights = single_safetensors(dir)?;
        let tensors = candle_core::safetensors::load(&weights, device).map_err(|e| ModelError::format(&weights, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = Bert::load(vb, &config).map_err(|e| ModelError::format(&weights, e))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizer::from_file(&tokenizer_path)?;
        let truncation = tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() };
        tokenizer.with_truncation(Some(truncation)).map_err(|e| ModelError::format(&tokenizer_path, e))?;
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);
        let dimensions = raw.get("hidden_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        Ok(Self { model, tokenizer, pooling, normalize, max_tokens, dimensions, pad_id, device: device.clone() })
    }

    /// Width of the vectors.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokenizes texts, truncated at [`Self::max_tokens`] (special tokens
    /// included, as sentence-transformers counts them), split between the
    /// threads of the current rayon pool.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        use rayon::prelude::*;
        let one = |text: &&str| self.tokenizer.encode(*text, true).map_err(|e| ModelError::Tokenizer(e.to_string()));
        if rayon::current_num_threads() > 1 && texts.len() > 1 {
            texts.par_iter().map(one).collect()
        } else {
            texts.iter().map(one).collect()
        }
    }

    /// Embeds texts in batches of at most `batch_size`, similar lengths
    /// together; vectors in input order.
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let encodings = self.encode(texts)?;
        self.embed_encoded(&encodings, batch_size)
    }

    /// [`Self::embed`] for texts already tokenized with [`Self::encode`].
    pub fn embed_encoded(&self, encodings: &[Encoding], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        on_pool(|| self.embed_on_pool(encodings, batch_size))
    }

    fn embed_on_pool(&self, encodings: &[Encoding], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let batch_size = batch_size.max(1);
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut out = vec![Vec::new(); encodings.len()];
        for chunk in order.chunks(batch_size) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            for (&i, vector) in chunk.iter().zip(self.forward(&batch)?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    /// One batch through the encoder, then pooling.
    fn forward(&self, batch: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
        if self.model.packs() { self.forward_packed(batch) } else { self.forward_padded(batch) }
    }

    /// The CPU path: real tokens only, no padding (see
    /// [`Bert::forward_packed`]). With several threads and enough tokens,
    /// the batch is cut into one part per thread, similar in tokens, and
    /// the parts run side by side, each on one thread: whole layers in
    /// parallel instead of every matrix product split between threads and
    /// joined again (one model on 2 threads, batch 32 of short texts:
    /// 0.94x ONNX Runtime split per product; see BENCHMARKS.md for after).
    fn forward_packed(&self, batch: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
        let threads = rayon::current_num_threads().max(1);
        let tokens: usize = batch.iter().map(|e| e.len()).sum();
        let parts = threads.min(batch.len()).min(tokens / MIN_TOKENS_PER_PART).max(1);
        let run = |part: &[&Encoding], threads: usize| -> Result<Vec<Vec<f32>>> {
            let lengths: Vec<usize> = part.iter().map(|e| e.len()).collect();
            let ids: Vec<u32> = part.iter().flat_map(|e| e.get_ids()).copied().collect();
            let types: Vec<u32> = part.iter().flat_map(|e| e.get_type_ids()).copied().collect();
            let hidden = self.model.forward_packed(&ids, &types, &lengths, threads)?;
            Ok(self.pool(&hidden, &lengths))
        };
        if parts == 1 {
            return run(batch, threads);
        }
        use rayon::prelude::*;
        let per_part = threads / parts;
        let pieces: Vec<Vec<Vec<f32>>> =
            split_by_tokens(batch, parts).par_iter().map(|part| run(part, per_part)).collect::<Result<_>>()?;
        Ok(pieces.concat())
    }

    /// Pooling (and normalisation) of packed hidden states: each text's
    /// `lengths[i]` rows, back to back.
    fn pool(&self, hidden: &[f32], lengths: &[usize]) -> Vec<Vec<f32>> {
        let total: usize = lengths.iter().sum();
        let width = hidden.len().checked_div(total).unwrap_or(self.dimensions);
        let mut start = 0;
        lengths
            .iter()
            .map(|&n| {
                let rows = &hidden[start * width..(start + n) * width];
                start += n;
                let mut v = vec![0f32; width];
                match self.pooling {
                    Pooling::Mean => {
                        for row in rows.chunks_exact(width) {
                            v.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                        }
                        // sentence-transformers: sum / clamp(count, 1e-9).
                        let count = (n as f32).max(1e-9);
                        v.iter_mut().for_each(|s| *s /= count);
                    }
                    Pooling::Cls => {
                        if let Some(first) = rows.chunks_exact(width).next() {
                            v.copy_from_slice(first);
                        }
                    }
                }
                if self.normalize {
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect()
    }

    /// One padded batch through the encoder, then pooling: any device.
    fn forward_padded(&self, batch: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
        let longest = batch.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut types = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for encoding in batch {
            let n = encoding.len();
            ids.extend_from_slice(encoding.get_ids());
            ids.extend(std::iter::repeat_n(self.pad_id, longest - n));
            types.extend_from_slice(encoding.get_type_ids());
            types.extend(std::iter::repeat_n(0, longest - n));
            mask.extend(std::iter::repeat_n(1f32, n));
            mask.extend(std::iter::repeat_n(0f32, longest - n));
        }
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let types = Tensor::from_vec(types, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&ids, &types, &mask)?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&m)?.sum(1)?;
                let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let pooled = if self.normalize {
            let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
            pooled.broadcast_div(&norms)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }
}

/// Below this many tokens per part a batch is not split between threads
/// (a part this small is mostly per-operation overhead).
const MIN_TOKENS_PER_PART: usize = 64;

/// `batch` cut into `parts` runs of neighbouring texts, each cut where the
/// tokens before it come closest to their even share (none empty while
/// `parts` <= texts). Cutting at the first text that reaches the share
/// instead left 357 and 321 tokens of 678 in the benchmark's batch.
fn split_by_tokens<'a, 'b>(batch: &'a [&'b Encoding], parts: usize) -> Vec<&'a [&'b Encoding]> {
    let parts = parts.clamp(1, batch.len().max(1));
    let mut prefix = Vec::with_capacity(batch.len() + 1);
    prefix.push(0);
    for e in batch {
        prefix.push(prefix[prefix.len() - 1] + e.len());
    }
    let total = prefix[batch.len()];
    let mut cuts = vec![0];
    for k in 1..parts {
        // At least one text before this cut and one for each part after it.
        let (lo, hi) = (cuts[k - 1] + 1, batch.len() - (parts - k));
        let best = (lo..=hi).min_by_key(|&i| (prefix[i] * parts).abs_diff(total * k)).unwrap_or(lo);
        cuts.push(best);
    }
    cuts.push(batch.len());
    cuts.windows(2).map(|w| &batch[w[0]..w[1]]).collect()
}

fn pooling_from(path: &Path) -> Result<Pooling> {
    let config: PoolingConfig = read_json_if_present(path)?.unwrap_or_default();
    match config {
        PoolingConfig { pooling_mode_max_tokens: true, .. }
        | PoolingConfig { pooling_mode_mean_sqrt_len_tokens: true, .. } => {
            Err(ModelError::format(path, "only mean and CLS pooling are supported"))
        }
        PoolingConfig { pooling_mode_cls_token: true, pooling_mode_mean_tokens: false, .. } => Ok(Pooling::Cls),
        PoolingConfig { pooling_mode_cls_token: false, .. } => Ok(Pooling::Mean),
        PoolingConfig { .. } => Err(ModelError::format(path, "combined CLS and mean pooling is not supported")),
    }
}

fn single_safetensors(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(ModelError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ModelError::format(dir, "no *.safetensors weights")),
        _ => Err(ModelError::format(dir, "several *.safetensors files; keep one per model folder")),
    }
}

/// Runs `f` on a thread of the current rayon pool. A forward pass splits
/// some 30 products between threads: from a thread outside the pool each
/// one would go through the pool's queue and put the caller to sleep until
/// it is done (a futex wake per product, a fifth of the time for one short
/// text); from inside, the work is handed to the pool's other threads
/// directly. Inside a pool already (the worker pool's replicas), or with
/// one thread, `f` just runs.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() <= 1 {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encodings(lengths: &[usize]) -> Vec<Encoding> {
        lengths
            .iter()
            .map(|&n| {
                let ids = vec![1; n];
                Encoding::new(
                    ids.clone(),
                    vec![0; n],
                    vec![String::new(); n],
                    vec![None; n],
                    vec![(0, 0); n],
                    vec![0; n],
                    vec![1; n],
                    Vec::new(),
                    Default::default(),
                )
            })
            .collect()
    }

    fn split(lengths: &[usize], parts: usize) -> Vec<Vec<usize>> {
        let owned = encodings(lengths);
        let batch: Vec<&Encoding> = owned.iter().collect();
        split_by_tokens(&batch, parts).iter().map(|p| p.iter().map(|e| e.len()).collect()).collect()
    }

    #[test]
    fn batches_split_into_parts_of_similar_tokens_in_order() {
        assert_eq!(split(&[20; 32], 2), vec![vec![20; 16], vec![20; 16]]);
        // The nearest cut, not the first past the share: 16 + 16 texts.
        let lengths: Vec<usize> = (0..32).map(|i| if i < 10 { 20 } else { 22 }).collect();
        assert_eq!(split(&lengths, 2).iter().map(Vec::len).collect::<Vec<_>>(), [16, 16]);
        assert_eq!(split(&[10, 10, 10, 30], 2), vec![vec![10, 10, 10], vec![30]]);
        assert_eq!(split(&[100, 1, 1, 1], 2), vec![vec![100], vec![1, 1, 1]]);
        // Never an empty part while there are texts enough.
        assert_eq!(split(&[1, 1, 100], 3), vec![vec![1], vec![1], vec![100]]);
        assert_eq!(split(&[100, 1, 1], 3), vec![vec![100], vec![1], vec![1]]);
        assert_eq!(split(&[5, 6, 7], 1), vec![vec![5, 6, 7]]);
        for parts in 1..=7 {
            let lengths: Vec<usize> = (0..7).map(|i| 3 + i * i).collect();
            let got = split(&lengths, parts);
            assert_eq!(got.len(), parts);
            assert!(got.iter().all(|p| !p.is_empty()));
            assert_eq!(got.concat(), lengths, "order kept, nothing lost");
        }
    }
}
