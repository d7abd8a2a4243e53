//! Tokenizers: `tokenizer.json` files for embedding models, and byte-level
//! BPE tokenizers rebuilt from a GGUF file's metadata for generation models.
//!
//! A GGUF file carries its tokenizer as metadata (`tokenizer.ggml.*`). We
//! rebuild it as a Hugging Face `tokenizers` definition rather than with
//! candle's helper, which prepends a space and so gets the first token of
//! every prompt wrong. The pre-tokenizer follows llama.cpp's table for the
//! `tokenizer.ggml.pre` names we know; an unknown name is an error, not a
//! guess, because a wrong split silently degrades every answer.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// GGUF token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens, also matched whole.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// Control tokens that are part of the answer's text: a tool call's tags
/// (Qwen2.5's tokenizer.json marks them not special; its GGUF marks them
/// control). Decoding keeps them, so the worker can read the calls.
const TEXT_MARKERS: [&str; 2] = ["<tool_call>", "</tool_call>"];

/// Loads a `tokenizer.json` with its padding and truncation removed: the
/// caller decides both, so a file's fixed padding never leaks into results.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::format(path, e))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| ModelError::format(path, e))?;
    Ok(tokenizer)
}

/// What a generation model's tokenizer says about special tokens.
#[derive(Debug, Clone)]
pub struct Specials {
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether prompts start with `bos`.
    pub add_bos: bool,
    /// The text of every control token, by id.
    pub control: HashMap<u32, String>,
}

/// Rebuilds the tokenizer stored in a GGUF file's metadata.
pub fn from_gguf(path: &Path, content: &Content) -> Result<(Tokenizer, Specials)> {
    let md = &content.metadata;
    let get = |key: &str| md.get(key).ok_or_else(|| ModelError::format(path, format!("no {key} in the GGUF metadata")));
    let string = |key: &str| -> Result<String> {
        get(key)?.to_string().cloned().map_err(|e| ModelError::format(path, format!("{key}: {e}")))
    };
    let model = string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ModelError::format(
            path,
            format!(
                "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
                 put a tokenizer.json next to the GGUF file to use this model"
            ),
        ));
    }
    let pre =
        md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned()).unwrap_or_else(|| "default".into());
    let pre_tokenizer = pre_tokenizer(&pre).ok_or_else(|| {
        ModelError::format(
            path,
            format!(
                "pre-tokenizer {pre:?} is not supported; put a tokenizer.json next to the GGUF file to use this model"
            ),
        )
    })?;

    let tokens = strings(path, get("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges = strings(path, get("tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(id, token)| (token.clone(), json!(id))).collect();
    if vocab.len() != tokens.len() {
        return Err(ModelError::format(path, "the GGUF vocabulary has duplicate tokens"));
    }
    let mut control = HashMap::new();
    let mut added = Vec::new();
    for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
        if *kind == TOKEN_TYPE_CONTROL || *kind == TOKEN_TYPE_USER_DEFINED {
            let id = u32::try_from(id).map_err(|_| ModelError::format(path, "vocabulary too large"))?;
            if *kind == TOKEN_TYPE_CONTROL {
                control.insert(id, token.clone());
            }
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *kind == TOKEN_TYPE_CONTROL && !TEXT_MARKERS.contains(&token.as_str()),
            }));
        }
    }
    let definition = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let bytes = serde_json::to_vec(&definition).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| ModelError::format(path, format!("tokenizer: {e}")))?;

    let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let specials = Specials {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        control,
    };
    Ok((tokenizer, specials))
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name, as llama.cpp splits.
fn pre_tokenizer(name: &str) -> Option<serde_json::Value> {
    let byte_level = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    match name {
        // GPT-2's own split.
        "gpt2" | "gpt-2" | "default" => Some(byte_level),
        // SmolLM: every digit on its own, then GPT-2's split.
        "smollm" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [{ "type": "Digits", "individual_digits": true }, byte_level],
        })),
        // Qwen2: GPT-4's split with single digits (llama.cpp's
        // LLAMA_VOCAB_PRE_TYPE_QWEN2), then bytes to symbols only.
        "qwen2" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": QWEN2_SPLIT },
                    "behavior": "Isolated",
                    "invert": false,
                },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
            ],
        })),
        _ => None,
    }
}

/// Qwen2's pre-tokenizer pattern, as its `tokenizer.json` and llama.cpp have it.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(path: &Path, value: &Value, key: &str) -> Result<Vec<String>> {
    let Value::Array(values) = value else {
        return Err(ModelError::format(path, format!("{key} is not an array")));
    };
    values.iter().map(|v| v.to_string().cloned().map_err(|e| ModelError::format(path, format!("{key}: {e}")))).collect()
}
