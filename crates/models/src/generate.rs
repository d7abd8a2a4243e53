//! Text generation with llama-family GGUF models: chat template, KV cache,
//! greedy and seeded sampling, stop sequences and token streaming.
//!
//! On the CPU, models whose matrices are Q4_1 or Q8_0 run on mycel's own
//! forward pass (`llama.rs`: about 2x candle's speed, faster than llama.cpp
//! on the same GGUF; BENCHMARKS.md). Other weight types, and other devices,
//! run on candle's quantized llama. Q4_1 can be converted to Q8_0 at load
//! ([`LoadOptions::requantize_q4_1`]): candle has no SIMD Q4_1 kernel, ours
//! does, so by default the weights stay as shipped.

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, Cursor, Read, Seek};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use mycel_protocol::{FinishReason, GenerateParams, Generation, Quantization};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::llama::{KvCache, Llama, LoadError};
use crate::tokenizer::{self, Specials};

/// How to load a GGUF model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Convert Q4_1 weights to Q8_0 at load (about 1.7x the memory; with
    /// mycel's kernels as fast to prefill and ~15% slower to decode; with
    /// candle's, 1.4-1.7x faster).
    pub requantize_q4_1: bool,
    /// Run Q4_1 and Q8_0 models on the CPU with mycel's own kernels rather
    /// than candle's (about 2x faster; `false` is for comparisons).
    pub own_kernels: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { requantize_q4_1: false, own_kernels: true }
    }
}

/// What runs the model's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// mycel's own kernels ([`crate::llama`]).
    Mycel,
    /// candle-transformers' quantized llama.
    Candle,
}

enum Weights {
    Mycel(Arc<Llama>),
    Candle(Box<ModelWeights>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

/// A loaded generation model. Cheap to share: each generation works on its
/// own clone of the weights' handles and its own KV cache.
pub struct Generator {
    weights: Weights,
    tokenizer: Tokenizer,
    specials: Specials,
    stop_ids: HashSet<u32>,
    template: Option<String>,
    context: usize,
    quantization: Quantization,
    device: Device,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("context", &self.context)
            .field("quantization", &self.quantization)
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

/// Control tokens that end a turn, besides the model's declared EOS.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"];

impl Generator {
    /// Loads a GGUF file, or the single `*.gguf` in a folder. A
    /// `tokenizer.json` beside it replaces the tokenizer in the metadata.
    pub fn load(path: &Path, options: &LoadOptions, device: &Device) -> Result<Self> {
        let file = if path.is_dir() { single_gguf(path)? } else { path.to_path_buf() };
        // Read tensor by tensor: a whole 500 MB file in memory beside its
        // converted weights would double the peak at load.
        let mut reader = BufReader::new(fs::File::open(&file).map_err(ModelError::io(&file))?);
        let content = Content::read(&mut reader).map_err(|e| ModelError::format(&file, e))?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        let candle_runs_it = arch.as_deref() == Some("llama");
        if !candle_runs_it && arch.as_deref() != Some("qwen2") {
            return Err(ModelError::format(
                &file,
                format!("architecture {arch:?} is not supported (llama and qwen2 GGUFs only)"),
            ));
        }
        let (mut tokenizer, specials) = tokenizer::from_gguf(&file, &content)?;
        let beside = file.with_file_name("tokenizer.json");
        if beside.exists() {
            tokenizer = tokenizer::from_file(&beside)?;
        }
        let template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        let declared = arch
            .as_deref()
            .and_then(|a| content.metadata.get(&format!("{a}.context_length")))
            .and_then(|v| v.to_u32().ok())
            .map(|c| c as usize);
        let context = declared.unwrap_or(MAX_SEQ_LEN).min(MAX_SEQ_LEN);

        let q4_1 = content.tensor_infos.values().any(|t| t.ggml_dtype == GgmlDType::Q4_1);
        let quantization = dominant_quantization(&content, options.requantize_q4_1);
        let own = if (options.own_kernels || !candle_runs_it) && device.is_cpu() {
            match Llama::load(&content, &mut reader, options.requantize_q4_1) {
                Ok(llama) => Some(llama),
                Err(LoadError::Unsupported(why)) if !candle_runs_it => {
                    return Err(ModelError::format(&file, format!("cannot run this {arch:?} model: {why}")));
                }
                Err(LoadError::Unsupported(why)) => {
                    tracing::info!(file = %file.display(), %why, "running this model on candle's kernels");
                    None
                }
                Err(LoadError::Read(e)) => return Err(ModelError::format(&file, e)),
            }
        } else {
            None
        };
        let weights = match own {
            Some(llama) => Weights::Mycel(Arc::new(llama)),
            None if !candle_runs_it => {
                return Err(ModelError::format(&file, format!("{arch:?} models run on the CPU only")));
            }
            None if q4_1 && options.requantize_q4_1 => {
                let (content, mut reader) = requantize(&file, content, &mut reader)?;
                Weights::Candle(Box::new(
                    ModelWeights::from_gguf(content, &mut reader, device).map_err(|e| ModelError::format(&file, e))?,
                ))
            }
            None => Weights::Candle(Box::new(
                ModelWeights::from_gguf(content, &mut reader, device).map_err(|e| ModelError::format(&file, e))?,
            )),
        };

        let mut stop_ids: HashSet<u32> = specials.eos.into_iter().collect();
        for (id, text) in &specials.control {
            if END_OF_TURN.contains(&text.as_str()) {
                stop_ids.insert(*id);
            }
        }
        Ok(Self { weights, tokenizer, specials, stop_ids, template, context, quantization, device: device.clone() })
    }

    /// Longest prompt plus answer, in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Weight format after loading.
    pub fn quantization(&self) -> &Quantization {
        &self.quantization
    }

    /// What runs the forward pass.
    pub fn engine(&self) -> Engine {
        match self.weights {
            Weights::Mycel(_) => Engine::Mycel,
            Weights::Candle(_) => Engine::Candle,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders a conversation with the model's chat template, ending where
    /// the assistant's answer starts. Models without a template get ChatML.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::Invalid("a chat needs at least one message".into()));
        }
        let Some(template) = &self.template else {
            let mut out = String::new();
            for m in messages {
                out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
            }
            out.push_str("<|im_start|>assistant\n");
            return Ok(out);
        };
        let token = |id: Option<u32>| id.and_then(|id| self.tokenizer.id_to_token(id)).unwrap_or_default();
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", template).map_err(|e| ModelError::Invalid(format!("chat template: {e}")))?;
        let rendered = env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => token(self.specials.bos),
                    eos_token => token(self.specials.eos),
                })
            })
            .map_err(|e| ModelError::Invalid(format!("chat template: {e}")))?;
        Ok(rendered)
    }

    /// Token ids of a prompt. Control tokens written in the text (such as
    /// `<|im_start|>`) become their ids; BOS is added when the model asks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.specials.add_bos
            && let Some(bos) = self.specials.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of token ids, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// A fresh sequence with its own KV cache, for callers that drive the
    /// model token by token (tests compare its logits with a reference).
    pub fn session(&self) -> Session {
        let state = match &self.weights {
            Weights::Mycel(llama) => State::Mycel { cache: llama.cache(), llama: Arc::clone(llama) },
            Weights::Candle(weights) => {
                let mut weights = weights.clone();
                weights.clear_kv_cache();
                State::Candle(weights)
            }
        };
        Session { state, position: 0, context: self.context, device: self.device.clone() }
    }

    /// Generates an answer to `prompt` (token ids, see [`Self::encode`]).
    /// `on_text` gets the answer as it grows, in pieces that never split a
    /// character and never show the start of a stop sequence that then
    /// completes; returning `Break` cancels the work.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid("empty prompt".into()));
        }
        if prompt.len() >= self.context {
            return Err(ModelError::TooLong { tokens: prompt.len(), max: self.context - 1 });
        }
        let budget = (params.max_tokens as usize).min(self.context - prompt.len());
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling(params));
        let mut session = self.session();
        let mut logits = session.feed(prompt)?;

        let mut generated: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut shown = 0usize;
        let longest_stop = params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut finish = FinishReason::Length;
        while generated.len() < budget {
            let next = sampler.sample(&Tensor::new(logits.as_slice(), &self.device)?)?;
            if self.stop_ids.contains(&next) {
                finish = FinishReason::EndOfSequence;
                break;
            }
            generated.push(next);
            let decoded = self.decode(&generated)?;
            // A token may end inside a multi-byte character: wait for the rest.
            if !decoded.ends_with('\u{FFFD}') {
                let searched_from = floor_char_boundary(&decoded, text.len().saturating_sub(longest_stop));
                text = decoded;
                if let Some(cut) = first_stop(&text, &params.stop, searched_from) {
                    text.truncate(cut);
                    finish = FinishReason::Stop;
                    break;
                }
                let safe = text.len() - held_back(&text, &params.stop);
                if safe > shown {
                    if on_text(&text[shown..safe]).is_break() {
                        return Err(ModelError::Cancelled);
                    }
                    shown = safe;
                }
            }
            if generated.len() < budget {
                logits = session.feed(&[next])?;
            }
        }
        if finish != FinishReason::Stop {
            text = self.decode(&generated)?;
        }
        if text.len() > shown && on_text(&text[shown..]).is_break() {
            return Err(ModelError::Cancelled);
        }
        let tokens = u32::try_from(generated.len()).unwrap_or(u32::MAX);
        Ok(Generation { text, tokens, finish })
    }
}

/// One sequence being decoded.
pub struct Session {
    state: State,
    position: usize,
    context: usize,
    device: Device,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("position", &self.position).finish_non_exhaustive()
    }
}

enum State {
    Mycel { llama: Arc<Llama>, cache: KvCache },
    Candle(Box<ModelWeights>),
}

impl Session {
    /// Appends tokens to the sequence; the logits after the last one.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(ModelError::Invalid("no tokens to feed".into()));
        }
        if self.position + ids.len() > self.context {
            return Err(ModelError::TooLong { tokens: self.position + ids.len(), max: self.context });
        }
        let logits = match &mut self.state {
            State::Mycel { llama, cache } => llama.forward(ids, cache)?,
            State::Candle(weights) => {
                let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
                weights.forward(&input, self.position)?.squeeze(0)?.to_vec1::<f32>()?
            }
        };
        self.position += ids.len();
        Ok(logits)
    }

    /// Tokens in the sequence so far.
    pub fn position(&self) -> usize {
        self.position
    }
}

fn sampling(params: &GenerateParams) -> Sampling {
    let temperature = f64::from(params.temperature);
    let top_p = f64::from(params.top_p);
    if temperature <= 0.0 {
        Sampling::ArgMax
    } else if top_p < 1.0 {
        Sampling::TopP { p: top_p, temperature }
    } else {
        Sampling::All { temperature }
    }
}

/// Where the first stop sequence starting at or after `from` begins.
fn first_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min()
}

/// How many bytes at the end of `text` could be the start of a stop
/// sequence, and so must not be shown yet.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > hold && text.ends_with(&stop[..i]) {
                hold = i;
            }
        }
    }
    hold
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Rewrites a GGUF in memory with its Q4_1 tensors as Q8_0.
fn requantize<R: Read + Seek>(file: &Path, content: Content, reader: &mut R) -> Result<(Content, Cursor<Vec<u8>>)> {
    let fail = |e: candle_core::Error| ModelError::format(file, e);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(content.tensor_infos.len());
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let tensor = content.tensor(reader, name, &Device::Cpu).map_err(fail)?;
        let tensor = if tensor.dtype() == GgmlDType::Q4_1 {
            QTensor::quantize(&tensor.dequantize(&Device::Cpu).map_err(fail)?, GgmlDType::Q8_0).map_err(fail)?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensor_refs).map_err(fail)?;
    drop(tensors);
    out.set_position(0);
    let content = Content::read(&mut out).map_err(fail)?;
    Ok((content, out))
}

fn dominant_quantization(content: &Content, requantize_q4_1: bool) -> Quantization {
    let mut counts: std::collections::HashMap<GgmlDType, u64> = std::collections::HashMap::new();
    for info in content.tensor_infos.values() {
        if info.shape.rank() >= 2 {
            *counts.entry(info.ggml_dtype).or_default() += info.shape.elem_count() as u64;
        }
    }
    let Some((dtype, _)) = counts.into_iter().max_by_key(|(_, n)| *n) else {
        return Quantization::F32;
    };
    match dtype {
        GgmlDType::Q4_1 if requantize_q4_1 => Quantization::Q8_0,
        GgmlDType::Q4_1 => Quantization::Q4_1,
        GgmlDType::Q4_0 => Quantization::Q4_0,
        GgmlDType::Q8_0 => Quantization::Q8_0,
        GgmlDType::F16 => Quantization::F16,
        GgmlDType::BF16 => Quantization::Bf16,
        GgmlDType::F32 => Quantization::F32,
        other => Quantization::Other(format!("{other:?}")),
    }
}

fn single_gguf(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(ModelError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ModelError::format(dir, "no *.gguf file")),
        _ => Err(ModelError::format(dir, "several *.gguf files; keep one per model folder")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_found_and_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(first_stop("hello\nUser: hi", &stops, 0), Some(5));
        assert_eq!(first_stop("hello END", &stops, 0), Some(6));
        assert_eq!(first_stop("hello", &stops, 0), None);
        assert_eq!(held_back("hello\nUs", &stops), 3);
        assert_eq!(held_back("hello EN", &stops), 2);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("héllo", &["ö".to_string()]), 0);
    }
}
