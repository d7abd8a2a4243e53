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
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use mycel_protocol::{
    FinishReason, GenerateParams, Generation, OutputFormat, Quantization, TokenLogprob, ToolCall, ToolChoice,
    TopLogprob,
};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::json::{Json, Schema};
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
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant's calls, as chat templates read them:
    /// `{"type": "function", "function": {"name", "arguments"}}`.
    #[serde(default)]
    pub tool_calls: Vec<serde_json::Value>,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new() }
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message that called functions.
    pub fn with_calls(mut self, calls: &[ToolCall]) -> Self {
        self.tool_calls = calls
            .iter()
            .map(|c| {
                // Templates print the arguments with `tojson`: hand them an
                // object, not a string holding one.
                let arguments = serde_json::from_str::<serde_json::Value>(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                serde_json::json!({ "type": "function", "function": { "name": c.name, "arguments": arguments } })
            })
            .collect();
        self
    }
}

/// Where a model's tool calls start in its output (Hermes-style, as
/// Qwen2.5's template asks for them).
const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";

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
    /// Each token's bytes, built the first time decoding is constrained.
    vocab: OnceLock<std::result::Result<Vocab, String>>,
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
        Ok(Self {
            weights,
            tokenizer,
            specials,
            stop_ids,
            template,
            context,
            quantization,
            device: device.clone(),
            vocab: OnceLock::new(),
        })
    }

    /// Whether the chat template offers tools to the model, in the format
    /// [`Self::generate`] reads calls back from.
    pub fn supports_tools(&self) -> bool {
        self.template.as_deref().is_some_and(|t| t.contains("tools") && t.contains(TOOL_CALL_OPEN))
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
        self.chat_prompt_with_tools(messages, &[])
    }

    /// [`Self::chat_prompt`], offering the model `tools` (OpenAI-style
    /// function definitions) where its template has a place for them.
    pub fn chat_prompt_with_tools(&self, messages: &[ChatMessage], tools: &[serde_json::Value]) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::Invalid("a chat needs at least one message".into()));
        }
        let uses_tools = !tools.is_empty() || messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        if uses_tools && !self.supports_tools() {
            return Err(ModelError::Invalid("this model's chat template has no format for tools".into()));
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
        env.add_filter("tojson", tojson);
        env.add_template("chat", template).map_err(|e| ModelError::Invalid(format!("chat template: {e}")))?;
        let rendered = env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    tools => (!tools.is_empty()).then_some(tools),
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
    ///
    /// With [`OutputFormat::JsonObject`] every token is one that keeps the
    /// answer a valid JSON prefix, and the answer ends when the object
    /// closes; near the end of `max_tokens` the shortest completion is
    /// forced, a byte per token, so the answer is valid JSON whenever
    /// `max_tokens` leaves room for `{}`. With tools, a call's JSON is
    /// constrained the same way and calls are read out of the text into
    /// [`Generation::tool_calls`] (never streamed as text).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid("empty prompt".into()));
        }
        let tools = !params.tools.is_empty();
        if tools && !self.supports_tools() {
            return Err(ModelError::Invalid("this model's chat template has no format for tools".into()));
        }
        // A call the answer must be: it starts with the call tag, and its
        // JSON names one of the allowed tools.
        let forced_call = match &params.tool_choice {
            ToolChoice::Auto => None,
            choice => Some(call_schema(&params.tools, choice)?),
        };
        let mut prompt = std::borrow::Cow::Borrowed(prompt);
        if forced_call.is_some() {
            let tag = self
                .tokenizer
                .encode(format!("{TOOL_CALL_OPEN}\n"), false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            prompt.to_mut().extend_from_slice(tag.get_ids());
        }
        let prompt = prompt.as_ref();
        if prompt.len() >= self.context {
            return Err(ModelError::TooLong { tokens: prompt.len(), max: self.context - 1 });
        }
        let mut constraint = match &params.format {
            _ if forced_call.is_some() => forced_call.clone().map(|s| Json::with_schema(Arc::new(s))),
            OutputFormat::Text => None,
            OutputFormat::JsonObject => Some(Json::object()),
            OutputFormat::JsonSchema(schema) => Some(Json::with_schema(Arc::new(
                crate::json::Schema::root(schema).map_err(|e| ModelError::Invalid(format!("JSON schema: {e}")))?,
            ))),
            other => return Err(ModelError::Invalid(format!("output format {other:?} is not supported"))),
        };
        let vocab = if constraint.is_some() || tools { Some(self.vocab()?) } else { None };
        let budget = (params.max_tokens as usize).min(self.context - prompt.len());
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling(params));
        let mut session = self.session();
        let mut logits = session.feed(prompt)?;

        let mut generated: Vec<u32> = Vec::new();
        let mut logprobs: Vec<TokenLogprob> = Vec::new();
        let mut text = String::new();
        let mut shown = 0usize;
        // Never shown while it is produced: the start of a stop sequence,
        // and (with tools) the start of a call.
        let mut held: Vec<String> = params.stop.clone();
        if tools {
            held.push(TOOL_CALL_OPEN.into());
        }
        let longest_stop = params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut finish = FinishReason::Length;
        while generated.len() < budget {
            let next = match (&mut constraint, vocab) {
                (Some(json), Some(vocab)) => {
                    self.constrained(&mut sampler, &logits, json, vocab, budget - generated.len())?
                }
                _ => sampler.sample(&Tensor::new(logits.as_slice(), &self.device)?)?,
            };
            if self.stop_ids.contains(&next) {
                finish = FinishReason::EndOfSequence;
                break;
            }
            if let Some(k) = params.logprobs {
                logprobs.push(self.logprob(&logits, next, usize::from(k))?);
            }
            generated.push(next);
            let object_closed = constraint.as_ref().is_some_and(Json::is_done);
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
                let mut safe = text.len() - held_back(&text, &held);
                if tools && let Some(call) = text.find(TOOL_CALL_OPEN) {
                    safe = safe.min(call);
                }
                if tools && text.trim_start().starts_with('{') {
                    // Perhaps a call without its tags: held until the end.
                    safe = 0;
                }
                if safe > shown {
                    if on_text(&text[shown..safe]).is_break() {
                        return Err(ModelError::Cancelled);
                    }
                    shown = safe;
                }
            }
            if object_closed {
                constraint = None;
                if !tools || forced_call.is_some() {
                    // The JSON answer (or the one call) is whole: nothing
                    // may follow it.
                    finish = FinishReason::EndOfSequence;
                    break;
                }
            } else if tools && constraint.is_none() && text.ends_with(TOOL_CALL_OPEN) {
                // A call starts: its JSON is held to the grammar.
                constraint = Some(Json::object());
            }
            if generated.len() < budget {
                logits = session.feed(&[next])?;
            }
        }
        if finish != FinishReason::Stop {
            text = self.decode(&generated)?;
        }
        if forced_call.is_some() {
            text = format!("{TOOL_CALL_OPEN}\n{text}");
        }
        let tool_calls = if tools {
            let names: Vec<String> = params
                .tools
                .iter()
                .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .filter_map(|t| t.pointer("/function/name").and_then(|n| n.as_str()).map(str::to_string))
                .collect();
            let (before, calls) = read_tool_calls(&text, &names);
            if !calls.is_empty() {
                text = before;
            }
            calls
        } else {
            Vec::new()
        };
        if text.len() > shown && on_text(&text[shown..]).is_break() {
            return Err(ModelError::Cancelled);
        }
        let tokens = u32::try_from(generated.len()).unwrap_or(u32::MAX);
        Ok(Generation { text, tokens, finish, logprobs, tool_calls })
    }

    /// Picks the next token under a JSON constraint: the sampler's choice
    /// among the tokens that keep the text valid and leave room to close it
    /// within `remaining` tokens. Tries the sampler's favourites first (a
    /// model asked for JSON mostly wants a valid token), and masks the whole
    /// vocabulary only when those fail.
    fn constrained(
        &self,
        sampler: &mut LogitsProcessor,
        logits: &[f32],
        json: &mut Json,
        vocab: &Vocab,
        remaining: usize,
    ) -> Result<u32> {
        const TRIES: usize = 32;
        let closing = json.completion();
        // The longest token that starts the completion (a byte's token at
        // least), so closing takes as few steps as the vocabulary allows.
        let forced = |json: &mut Json| -> Result<u32> {
            let b = closing[0];
            let mut best = vocab.byte_token[usize::from(b)]
                .ok_or_else(|| ModelError::Invalid(format!("no token for the byte {b:#04x}")))?;
            let mut best_len = 1;
            for (id, bytes) in vocab.bytes.iter().enumerate() {
                if let Some(bytes) = bytes
                    && bytes.len() > best_len
                    && closing.starts_with(bytes)
                {
                    (best, best_len) = (id as u32, bytes.len());
                }
            }
            json.push_all(&closing[..best_len]);
            Ok(best)
        };
        if closing.len() >= remaining {
            // Out of room: close the JSON, a byte per token.
            return forced(json);
        }
        let fits = |id: u32| -> Option<Json> {
            let bytes = vocab.bytes.get(id as usize)?.as_deref()?;
            let mut next = json.clone();
            (!bytes.is_empty() && next.push_all(bytes) && next.completion().len() < remaining).then_some(next)
        };
        let mut masked = logits.to_vec();
        for _ in 0..TRIES {
            let id = sampler.sample(&Tensor::new(masked.as_slice(), &self.device)?)?;
            if let Some(next) = fits(id) {
                *json = next;
                return Ok(id);
            }
            masked[id as usize] = f32::NEG_INFINITY;
        }
        let mut any = false;
        for (id, l) in masked.iter_mut().enumerate() {
            if *l > f32::NEG_INFINITY && fits(id as u32).is_none() {
                *l = f32::NEG_INFINITY;
            }
            any |= *l > f32::NEG_INFINITY;
        }
        if !any {
            return forced(json);
        }
        let id = sampler.sample(&Tensor::new(masked.as_slice(), &self.device)?)?;
        match fits(id) {
            Some(next) => {
                *json = next;
                Ok(id)
            }
            None => forced(json),
        }
    }

    /// The log probability of `chosen` under `logits`, and the `top` most
    /// likely tokens'.
    fn logprob(&self, logits: &[f32], chosen: u32, top: usize) -> Result<TokenLogprob> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let log_z = max + sum.ln() as f32;
        let text = |id: u32| self.tokenizer.decode(&[id], false).map_err(|e| ModelError::Tokenizer(e.to_string()));
        let mut best: Vec<(f32, u32)> = Vec::new();
        if top > 0 {
            best = logits.iter().enumerate().map(|(i, &l)| (l, i as u32)).collect();
            let k = top.min(best.len());
            best.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            best.truncate(k);
            best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        Ok(TokenLogprob {
            token: text(chosen)?,
            logprob: logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |l| l - log_z),
            top: best
                .into_iter()
                .map(|(l, id)| Ok(TopLogprob { token: text(id)?, logprob: l - log_z }))
                .collect::<Result<_>>()?,
        })
    }

    fn vocab(&self) -> Result<&Vocab> {
        self.vocab.get_or_init(|| Vocab::new(&self.tokenizer)).as_ref().map_err(|e| ModelError::Invalid(e.clone()))
    }
}

/// Jinja's `tojson` as Hugging Face's chat templates have it: Python's
/// `json.dumps` (separators `", "` and `": "`, keys in their order, no
/// HTML escaping), which is what the models saw in training.
fn tojson(value: minijinja::Value) -> std::result::Result<minijinja::Value, minijinja::Error> {
    struct Python;
    impl serde_json::ser::Formatter for Python {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let fail = |e: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e);
    let json = serde_json::to_value(&value).map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::new();
    serde::Serialize::serialize(&json, &mut serde_json::Serializer::with_formatter(&mut out, Python))
        .map_err(|e| fail(e.to_string()))?;
    Ok(minijinja::Value::from_safe_string(String::from_utf8(out).map_err(|e| fail(e.to_string()))?))
}

/// Each token's bytes, for checking tokens against a grammar.
struct Vocab {
    /// By token id; `None` for control tokens, which never appear in text.
    bytes: Vec<Option<Box<[u8]>>>,
    /// The token that is exactly this one byte.
    byte_token: [Option<u32>; 256],
}

impl Vocab {
    /// Reads a byte-level BPE vocabulary (GPT-2's byte-to-character map);
    /// other vocabularies cannot be constrained byte by byte.
    fn new(tokenizer: &Tokenizer) -> std::result::Result<Self, String> {
        let mut char_byte = std::collections::HashMap::new();
        let mut byte_char = ['\0'; 256];
        let mut extra = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                char::from(b)
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('\0')
            };
            char_byte.insert(c, b);
            byte_char[usize::from(b)] = c;
        }
        let added = tokenizer.get_added_tokens_decoder();
        let size = tokenizer.get_vocab_size(true);
        let bytes = (0..size as u32)
            .map(|id| match added.get(&id) {
                Some(token) if token.special => None,
                Some(token) => Some(token.content.as_bytes().into()),
                None => tokenizer.id_to_token(id).map(|piece| {
                    piece
                        .chars()
                        .flat_map(|c| char_byte.get(&c).map_or_else(|| c.to_string().into_bytes(), |b| vec![*b]))
                        .collect()
                }),
            })
            .collect();
        let mut byte_token = [None; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            *slot = tokenizer.token_to_id(&byte_char[b].to_string());
        }
        // Closing a JSON text takes printable ASCII only.
        if let Some(b) = (0x20..0x7F).find(|&b| byte_token[b].is_none()) {
            return Err(format!(
                "constrained decoding needs a byte-level BPE vocabulary with a token for each printable byte \
                 (none for {:?})",
                char::from(b as u8)
            ));
        }
        Ok(Self { bytes, byte_token })
    }
}

/// The JSON a forced call must be: `{"name": <one of the allowed tools>,
/// "arguments": {...}}`, the arguments held to the tool's parameter schema
/// where there is one tool and its schema is one [`Schema`] reads (a JSON
/// object otherwise: the schema then only guides the model, in the prompt).
fn call_schema(tools: &[String], choice: &ToolChoice) -> Result<Schema> {
    let defined: Vec<(String, Option<serde_json::Value>)> = tools
        .iter()
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .filter_map(|t| {
            let name = t.pointer("/function/name")?.as_str()?.to_string();
            Some((name, t.pointer("/function/parameters").cloned()))
        })
        .collect();
    let allowed: Vec<&(String, Option<serde_json::Value>)> = match choice {
        ToolChoice::Function(name) => defined.iter().filter(|(n, _)| n == name).collect(),
        _ => defined.iter().collect(),
    };
    if allowed.is_empty() {
        return Err(ModelError::Invalid(format!("tool_choice: {choice:?} names no offered tool")));
    }
    let arguments = match allowed.as_slice() {
        [(_, Some(parameters))] => match Schema::compile(parameters) {
            Ok(s @ (Schema::Object { .. } | Schema::AnyObject)) => s,
            _ => Schema::AnyObject,
        },
        _ => Schema::AnyObject,
    };
    let names = allowed.iter().map(|(n, _)| n.clone()).collect();
    Ok(Schema::Object {
        properties: vec![
            ("name".into(), Arc::new(Schema::String(Some(names)))),
            ("arguments".into(), Arc::new(arguments)),
        ],
        required: vec!["name".into(), "arguments".into()],
    })
}

/// Splits an answer into its text and the calls it makes
/// (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or
/// more). Small models sometimes leave the tags out: an answer that is
/// nothing but such an object, naming one of the offered `tools`, is a
/// call too. An answer whose calls do not all read as calls is all text.
fn read_tool_calls(text: &str, tools: &[String]) -> (String, Vec<ToolCall>) {
    let call = |inner: &str| -> Option<ToolCall> {
        let serde_json::Value::Object(call) = serde_json::from_str::<serde_json::Value>(inner.trim()).ok()? else {
            return None;
        };
        let name = call.get("name")?.as_str()?.to_string();
        let arguments = match call.get("arguments") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v @ serde_json::Value::Object(_)) => v.to_string(),
            None => "{}".into(),
            Some(_) => return None,
        };
        Some(ToolCall { name, arguments })
    };
    let Some(first) = text.find(TOOL_CALL_OPEN) else {
        return match call(text) {
            Some(c) if tools.contains(&c.name) => (String::new(), vec![c]),
            _ => (text.to_string(), Vec::new()),
        };
    };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(TOOL_CALL_OPEN) {
        let body = &rest[start + TOOL_CALL_OPEN.len()..];
        let (inner, after) = match body.find(TOOL_CALL_CLOSE) {
            Some(end) => (&body[..end], &body[end + TOOL_CALL_CLOSE.len()..]),
            None => (body, ""),
        };
        let Some(c) = call(inner) else { return (text.to_string(), Vec::new()) };
        calls.push(c);
        rest = after;
    }
    (text[..first].trim_end().to_string(), calls)
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
    fn tool_calls_are_read_out_of_the_text() {
        let tools = ["weather".to_string(), "time".to_string()];
        let (text, calls) = read_tool_calls(
            "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}",
            &tools,
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(calls[1].arguments, "{}");
        let broken = "<tool_call>{\"name\": 3}</tool_call>";
        assert_eq!(read_tool_calls(broken, &tools), (broken.to_string(), vec![]));
        assert_eq!(read_tool_calls("plain", &tools), ("plain".to_string(), vec![]));
        // Untagged: a call only if it names an offered tool.
        let bare = " {\"name\": \"time\", \"arguments\": {\"zone\": \"UTC\"}}\n";
        assert_eq!(read_tool_calls(bare, &tools).1[0].arguments, r#"{"zone":"UTC"}"#);
        let json_answer = "{\"name\": \"Ada\", \"arguments\": {}}";
        assert_eq!(read_tool_calls(json_answer, &tools).1, vec![]);
    }

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
