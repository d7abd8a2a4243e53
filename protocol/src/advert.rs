//! Node adverts: what a node offers, gossiped and refreshed periodically.

use serde::{Deserialize, Serialize};

use crate::codec::rules::{at_most, short, speed};
use crate::{Digest, limits};

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum ModelKind {
    /// Text in, one vector out (sentence embeddings).
    Embedding,
    /// Text in, text out (instruction-tuned language model).
    Generation,
}

impl ModelKind {
    /// The kind of model a task kind needs: `embed`, or `generate`,
    /// `complete` and `chat`.
    pub fn for_task(task: &str) -> Option<ModelKind> {
        match task {
            "embed" => Some(ModelKind::Embedding),
            "generate" | "complete" | "chat" => Some(ModelKind::Generation),
            _ => None,
        }
    }
}

/// What a requester asks workers for: the weights, a model's id, or any
/// model of a kind. Each is also a provider record key in the DHT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelKey {
    /// These exact weights.
    Weights(Digest),
    /// A model id as adverts name it (`smollm2-135m-instruct`), any case.
    Id(String),
    /// Any model of this kind.
    Kind(ModelKind),
}

impl ModelKey {
    /// The model a request names: a weights digest in hex, or an id, of
    /// which only the part after the last `/` counts (`mycel/smollm2`,
    /// `HuggingFaceTB/SmolLM2-135M-Instruct`-style names).
    pub fn named(want: &str) -> ModelKey {
        match Digest::from_hex(want) {
            Ok(d) => ModelKey::Weights(d),
            Err(_) => ModelKey::Id(want.rsplit('/').next().unwrap_or(want).to_string()),
        }
    }

    /// The key of its provider records in the DHT.
    pub fn record_key(&self) -> Vec<u8> {
        match self {
            ModelKey::Weights(d) => d.0.to_vec(),
            ModelKey::Id(id) => Digest::of_parts(&[b"mycel/model-id", id.to_ascii_lowercase().as_bytes()]).0.to_vec(),
            ModelKey::Kind(kind) => {
                let kind = match kind {
                    ModelKind::Embedding => "embedding",
                    ModelKind::Generation => "generation",
                };
                Digest::of_parts(&[b"mycel/model-kind", kind.as_bytes()]).0.to_vec()
            }
        }
    }

    /// Whether an advertised model is one of these.
    pub fn matches(&self, model: &ModelAdvert) -> bool {
        match self {
            ModelKey::Weights(d) => model.weights == *d,
            ModelKey::Id(id) => model.id.eq_ignore_ascii_case(id),
            ModelKey::Kind(kind) => model.kind == *kind,
        }
    }

    /// Every key a served model is found by.
    pub fn of(model: &ModelAdvert) -> [ModelKey; 3] {
        [ModelKey::Weights(model.weights), ModelKey::Id(model.id.clone()), ModelKey::Kind(model.kind)]
    }
}

/// How a model's weights are stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Quantization {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// GGML Q8_0 blocks.
    Q8_0,
    /// GGML Q4_0 blocks.
    Q4_0,
    /// GGML Q4_1 blocks.
    Q4_1,
    /// Any other scheme, by name.
    Other(String),
}

/// Speed a node measured for one model on its own hardware. Zero where a
/// figure does not apply to the model's kind.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Throughput {
    /// Short texts embedded per second at the node's best batch size.
    pub embeddings_per_s: f32,
    /// Prompt tokens processed per second.
    pub prefill_tokens_per_s: f32,
    /// Tokens generated per second, one sequence.
    pub decode_tokens_per_s: f32,
}

/// One model a node serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ModelAdvert {
    /// Human-readable name, e.g. `all-minilm-l6-v2`. Not an identity.
    pub id: String,
    /// What it does.
    pub kind: ModelKind,
    /// SHA-256 of the weights file: the model's identity in the swarm.
    pub weights: Digest,
    /// Output vector width for embedding models; 0 otherwise.
    pub dimensions: u32,
    /// Longest input in tokens the model takes.
    pub context: u32,
    /// Weight format.
    pub quantization: Quantization,
    /// Measured speed on this node.
    pub throughput: Throughput,
    /// What the model is good at, as its owner describes it.
    pub profile: ModelProfile,
    /// Whether its chat template offers tools to the model and the worker
    /// reads its tool calls back (chat with `tools` goes only to these).
    pub tools: bool,
}

/// A model's capability profile: a one-line description and tags (`code`,
/// `chat`...), a router's starting point before it has outcomes of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ModelProfile {
    /// One line, at most [`limits::PROFILE_DESCRIPTION`] bytes.
    pub description: String,
    /// At most [`limits::PROFILE_TAGS`], each a short word.
    pub tags: Vec<String>,
}

/// A GPU the node can use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Gpu {
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// CUDA compute capability as `major * 10 + minor` (90 for Hopper); 0
    /// when unknown or not CUDA.
    pub compute_capability: u32,
}

/// The machine a node runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hardware {
    /// CPU model name as the OS reports it.
    pub cpu_model: String,
    /// Logical cores available to the node.
    pub cores: u32,
    /// SIMD extensions detected at run time (`avx2`, `avx512f`, `neon`...).
    pub simd: Vec<String>,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// GPUs the node will use.
    pub gpus: Vec<Gpu>,
}

/// How busy a node is right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Load {
    /// Shards waiting in the node's queue.
    pub queued_shards: u32,
    /// Shards being computed now.
    pub active_shards: u32,
    /// Shards the node runs at once (its worker replicas).
    pub capacity: u32,
}

/// A price in micro-credits per unit of work (one embedded text, or one
/// generated token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Price {
    /// Micro-credits per unit.
    pub micros_per_unit: u64,
}

/// A node's signed description of itself, gossiped on
/// [`crate::version::ADVERT_TOPIC`]. The signer is the node; receivers keep
/// the one with the highest `seq` per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Advert {
    /// Increases with every advert a node publishes; restarts from the
    /// wall clock so a restarted node's adverts still win.
    pub seq: u64,
    /// When it was made, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// mycel version of the node.
    pub software: String,
    /// Models it serves.
    pub models: Vec<ModelAdvert>,
    /// Its machine.
    pub hardware: Hardware,
    /// Its current load.
    pub load: Load,
    /// What it asks per unit of work.
    pub price: Price,
    /// Multiaddrs it listens on, as text.
    pub listen_addrs: Vec<String>,
}

impl Advert {
    fn check(&self) -> Result<(), String> {
        short("software", &self.software, limits::SHORT_STRING)?;
        at_most("models", &self.models, limits::MODELS_PER_ADVERT)?;
        for m in &self.models {
            short("model id", &m.id, limits::SHORT_STRING)?;
            if let Quantization::Other(name) = &m.quantization {
                short("quantization", name, limits::SHORT_STRING)?;
            }
            short("model description", &m.profile.description, limits::PROFILE_DESCRIPTION)?;
            at_most("model tags", &m.profile.tags, limits::PROFILE_TAGS)?;
            for t in &m.profile.tags {
                short("model tag", t, limits::PROFILE_TAG)?;
            }
            speed("embeddings_per_s", m.throughput.embeddings_per_s)?;
            speed("prefill_tokens_per_s", m.throughput.prefill_tokens_per_s)?;
            speed("decode_tokens_per_s", m.throughput.decode_tokens_per_s)?;
        }
        let hw = &self.hardware;
        short("cpu_model", &hw.cpu_model, limits::SHORT_STRING)?;
        at_most("simd", &hw.simd, limits::SIMD_FEATURES)?;
        for s in &hw.simd {
            short("simd feature", s, limits::SHORT_STRING)?;
        }
        at_most("gpus", &hw.gpus, limits::GPUS_PER_ADVERT)?;
        for g in &hw.gpus {
            short("gpu name", &g.name, limits::SHORT_STRING)?;
        }
        at_most("listen_addrs", &self.listen_addrs, limits::ADDRS_PER_ADVERT)?;
        for a in &self.listen_addrs {
            short("listen addr", a, limits::SHORT_STRING)?;
        }
        Ok(())
    }
}

crate::wire!(Advert, limits::ADVERT, validate = Advert::check);

impl crate::SignedKind for Advert {
    const DOMAIN: &'static str = "mycel/advert/1";
}
