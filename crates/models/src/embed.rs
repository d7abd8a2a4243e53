//! Sentence embeddings with BERT-family models, computed the way
//! sentence-transformers computes them: tokens truncated at the model's
//! `max_seq_length`, batches padded to their longest text, the encoder's
//! output pooled over the attention mask (mean or CLS, from
//! `1_Pooling/config.json`) and L2-normalised when the model's
//! `modules.json` has a `Normalize` step.
//!
//! Texts are sorted by length before batching, so a batch pads to
//! neighbours of similar length instead of to the longest text overall;
//! results come back in input order.

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
    /// included, as sentence-transformers counts them).
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        texts
            .iter()
            .map(|text| self.tokenizer.encode(*text, true).map_err(|e| ModelError::Tokenizer(e.to_string())))
            .collect()
    }

    /// Embeds texts in batches of at most `batch_size`, similar lengths
    /// together; vectors in input order.
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let encodings = self.encode(texts)?;
        self.embed_encoded(&encodings, batch_size)
    }

    /// [`Self::embed`] for texts already tokenized with [`Self::encode`].
    pub fn embed_encoded(&self, encodings: &[Encoding], batch_size: usize) -> Result<Vec<Vec<f32>>> {
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

    /// One padded batch through the encoder, then pooling.
    fn forward(&self, batch: &[&Encoding]) -> Result<Vec<Vec<f32>>> {
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
