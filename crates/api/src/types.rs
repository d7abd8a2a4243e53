//! JSON bodies of the native API. The CLI deserialises the same types, so
//! a field renamed here is renamed for both.

use serde::{Deserialize, Serialize};

/// `GET /api/v1/status`: this node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    /// This node's PeerId.
    pub peer_id: String,
    /// mycel version.
    pub version: String,
    /// Addresses the node listens on for peers.
    pub listen_addrs: Vec<String>,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Peers whose advert the node holds.
    pub known_peers: usize,
    /// Whose adverts it listens to: `all` (the whole swarm's) or `used`
    /// (only the workers of the models it was asked for).
    #[serde(default)]
    pub adverts: String,
    /// When the last of them joined this node's table (ms since the Unix
    /// epoch; absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_grew_at_ms: Option<u64>,
    /// Models this node serves.
    pub models: Vec<ModelView>,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Whether peers can reach this node, through which relays, and how
    /// its hole punches went.
    #[serde(default)]
    pub reachability: ReachabilityView,
}

/// How a node is reached from outside.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReachabilityView {
    /// What AutoNAT found: `public`, `private` (behind NAT or a firewall)
    /// or `unknown` (not probed yet).
    pub reach: String,
    /// Addresses through relays the node listens on.
    pub relayed_addrs: Vec<String>,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches_ok: u64,
    /// Hole punches that failed (those peers stay on the relay).
    pub hole_punches_failed: u64,
}

/// A model as adverts describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelView {
    /// Human-readable name.
    pub id: String,
    /// `embedding` or `generation`.
    pub kind: String,
    /// SHA-256 of the weights, hex.
    pub weights: String,
    /// Embedding width (0 for generation models).
    pub dimensions: u32,
    /// Longest input in tokens.
    pub context: u32,
    /// Weight format.
    pub quantization: String,
    /// Measured embeddings per second (0 when not applicable).
    pub embeddings_per_s: f32,
    /// Measured decode tokens per second (0 when not applicable).
    pub decode_tokens_per_s: f32,
    /// Whether it can be offered tools (chat with `tools`).
    #[serde(default)]
    pub tools: bool,
}

/// `GET /api/v1/peers`: one peer from its advert.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    /// The peer.
    pub peer_id: String,
    /// Its mycel version.
    pub software: String,
    /// Models it serves.
    pub models: Vec<ModelView>,
    /// CPU model.
    pub cpu: String,
    /// Cores.
    pub cores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPU names.
    pub gpus: Vec<String>,
    /// Shards queued and running, and how many it runs at once.
    pub queued_shards: u32,
    /// Shards running.
    pub active_shards: u32,
    /// Shards it runs at once.
    pub capacity: u32,
    /// Its listen addresses.
    pub listen_addrs: Vec<String>,
    /// Sequence number of the advert held.
    pub advert_seq: u64,
    /// Milliseconds since its advert was received.
    pub last_seen_ms: u64,
    /// This node's opinion of it, 0..=1 (0.8 for a peer never worked with;
    /// below 0.2 it gets no work).
    #[serde(default)]
    pub reputation: f64,
    /// How this node is connected to it now: `direct`, `relayed`, `direct
    /// and relayed` (hole punching just succeeded) or empty (not
    /// connected).
    #[serde(default)]
    pub connection: String,
}

/// Error body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl ErrorBody {
    /// Wraps a message.
    pub fn new(error: String) -> Self {
        Self { error }
    }
}

/// Written to `<data dir>/node.json` while a node runs, so local tools (the
/// CLI, the testnet) find its API and addresses without guessing ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeInfo {
    /// Process id.
    pub pid: u32,
    /// The node's PeerId.
    pub peer_id: String,
    /// API base URL.
    pub api: String,
    /// Peer-to-peer listen addresses, with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
}

/// File name of [`RuntimeInfo`] in a node's data directory.
pub const RUNTIME_FILE: &str = "node.json";

impl RuntimeInfo {
    /// Reads a running node's file from its data directory.
    pub fn read(data_dir: &std::path::Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(data_dir.join(RUNTIME_FILE))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Writes the file atomically (temporary file, then rename), so a
    /// reader never sees half of it.
    pub fn write(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        let tmp = data_dir.join(format!(".{RUNTIME_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, data_dir.join(RUNTIME_FILE))
    }
}

/// `POST /api/v1/tasks`: work for the swarm.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubmitRequest {
    /// `embed`, `generate` (one user message per input), `complete` (the
    /// input as it is, no chat template) or `chat` (`conversations`).
    pub kind: String,
    /// Texts to embed, or prompts (user messages) to answer.
    pub inputs: Vec<String>,
    /// Model id (as advertised) or weights digest (hex); default: the
    /// first advertised model of the right kind.
    #[serde(default)]
    pub model: Option<String>,
    /// Peers that run each shard (1-5).
    #[serde(default = "one")]
    pub redundancy: u8,
    /// Share of shards (0-1) run once more on another peer and compared;
    /// default: the node's (5%).
    #[serde(default)]
    pub spot_check: Option<f32>,
    /// Items per shard; default: sized from the peers' measured speed.
    #[serde(default)]
    pub items_per_shard: Option<u32>,
    /// Generation: most tokens per answer.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Generation: sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Generation: temperature (0 = greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Generation: nucleus sampling mass (1 = off).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Generation: stop before any of these.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Generation: text arrives as `text` events while it is produced.
    #[serde(default)]
    pub stream: bool,
    /// `chat`: the conversations to answer, one reply each (`inputs` stays
    /// empty).
    #[serde(default)]
    pub conversations: Vec<Vec<ChatTurnView>>,
    /// With model `mycel/auto`: how much predicted quality a unit of
    /// relative cost must buy (0: quality alone); default the node's.
    #[serde(default)]
    pub cost_weight: Option<f32>,
    /// With an ensemble model (`mycel/vote`, `mycel/best-of`, `mycel/moa`):
    /// how many proposals (2-8, default 3).
    #[serde(default)]
    pub n: Option<u32>,
    /// With an ensemble: the models that propose, used in turn [default:
    /// vote: the largest generation model in the swarm; best-of and moa:
    /// every generation model, then again with other seeds].
    #[serde(default)]
    pub members: Vec<String>,
    /// With best-of or moa: the model that judges or writes the synthesis
    /// [default: the largest generation model in the swarm].
    #[serde(default)]
    pub judge: Option<String>,
    /// Generation: log probabilities of each generated token and of this
    /// many alternatives (0-20); absent for none.
    #[serde(default)]
    pub logprobs: Option<u8>,
    /// Generation: the answer is one JSON object (decoding is constrained
    /// to valid JSON).
    #[serde(default)]
    pub json: bool,
    /// Generation: the answer is a JSON object valid for this JSON Schema
    /// (a subset: types, properties, required, items, string enums).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<serde_json::Value>,
    /// Chat: functions the model may call, OpenAI-style
    /// (`{"type": "function", "function": {"name", "description", "parameters"}}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<serde_json::Value>,
    /// Chat with tools: `auto` (the default: the model decides),
    /// `required` (the answer is a call of one of them) or a tool's name
    /// (the answer is a call of that one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
}

impl SubmitRequest {
    /// A request of `kind` for `inputs`, everything else default.
    pub fn new(kind: &str, inputs: Vec<String>) -> Self {
        Self {
            kind: kind.into(),
            inputs,
            model: None,
            redundancy: 1,
            spot_check: None,
            items_per_shard: None,
            max_tokens: None,
            seed: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream: false,
            conversations: Vec::new(),
            cost_weight: None,
            n: None,
            members: Vec::new(),
            judge: None,
            logprobs: None,
            json: false,
            json_schema: None,
            tools: Vec::new(),
            tool_choice: None,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTurnView {
    /// `system`, `user`, `assistant` or `tool` (what a called function
    /// returned).
    pub role: String,
    /// What was said.
    pub content: String,
    /// The functions an assistant turn called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<mycel_protocol::ToolCall>,
}

impl ChatTurnView {
    /// A message of plain text.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new() }
    }
}

fn one() -> u8 {
    1
}

/// The answer to a submit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submitted {
    /// The task's id (hex).
    pub task: String,
}

/// `GET /api/v1/tasks/{id}`: a task's state, and its result once done.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskView {
    /// The task's id (hex).
    pub task: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Shards in the plan.
    pub shards: usize,
    /// Shards decided.
    pub shards_done: usize,
    /// PeerId of the peer whose result was accepted, per shard (null while open).
    pub executors: Vec<Option<String>>,
    /// Why it failed.
    pub error: Option<String>,
    /// Embeddings (one vector per input) once done.
    pub embeddings: Option<Vec<Vec<f32>>>,
    /// Generated answers (one per prompt) once done.
    pub generations: Option<Vec<GenerationView>>,
    /// The signed receipt, hex of its wire encoding, once done.
    pub receipt: Option<String>,
    /// The model, as advertised.
    #[serde(default)]
    pub model: String,
    /// Input tokens read over all accepted shards (the workers' word).
    #[serde(default)]
    pub input_tokens: u64,
    /// Peers running its shards now.
    #[serde(default)]
    pub peers_working: usize,
    /// Milliseconds from each auction round's CFP to its first award.
    #[serde(default)]
    pub auction_ms: Vec<u64>,
    /// How `mycel/auto` chose the model (scores per candidate), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<mycel_router::Routed>,
    /// For an ensemble (`mycel/vote`, `mycel/best-of`, `mycel/moa`): its
    /// stages, each a task of its own with its own receipt, and how the
    /// answer was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<EnsembleView>,
    /// For work made of several tasks (an ensemble, a summary): its kind
    /// and stage tasks, each with its own receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineView>,
    /// A search run in the background (`Prefer: respond-async`): its
    /// answer once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchResult>,
    /// A classification run in the background: its answer once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classify: Option<ClassifyResult>,
}

/// The stages of work made of several tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineView {
    /// `ensemble` or `summarize`.
    pub kind: String,
    /// Stage tasks, in the order they ran.
    pub stages: Vec<EnsembleStage>,
}

/// How an ensemble reached its answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnsembleView {
    /// `vote`, `best-of` or `moa`.
    pub method: String,
    /// Every stage task: proposals, then judgements or the synthesis.
    pub stages: Vec<EnsembleStage>,
    /// The proposals, in order: model and text.
    pub proposals: Vec<Proposal>,
    /// Vote: answers after normalisation and their counts, most first.
    #[serde(default)]
    pub votes: Vec<(String, usize)>,
    /// Best-of: the judge's pick in each order asked (1-based proposal
    /// numbers, as in the original order; `None`: no number in its reply).
    #[serde(default)]
    pub verdicts: Vec<Option<usize>>,
    /// The proposal chosen (0-based), for vote and best-of.
    #[serde(default)]
    pub chosen: Option<usize>,
    /// One line: how the answer was reached.
    pub reason: String,
}

/// One stage of an ensemble: a task of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleStage {
    /// `proposals`, `judge` or `synthesis`.
    pub role: String,
    /// The stage's task id (its receipt: `GET /api/v1/tasks/{task}`).
    pub task: String,
    /// The model it ran.
    pub model: String,
}

/// One proposal of an ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The model that wrote it.
    pub model: String,
    /// Its text.
    pub text: String,
}

/// An outcome to learn from (`POST /api/v1/router/outcomes`): how well a
/// model did on a prompt, e.g. an evaluation harness's test result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The prompt (the last user message of a chat).
    pub prompt: String,
    /// The model, as advertised (id) or its weights digest.
    pub model: String,
    /// 0 (bad) to 1 (good).
    pub score: f32,
    /// Where it comes from: `eval` (default), `judge` or `user`.
    #[serde(default)]
    pub source: Option<String>,
}

/// A verdict on a task's answer (`POST /api/v1/tasks/{id}/feedback`): it
/// teaches the router which model suits prompts like this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// 0 (bad) to 1 (good).
    pub score: f32,
}

/// One generated answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationView {
    /// The text.
    pub text: String,
    /// Tokens generated.
    pub tokens: u32,
    /// `eos`, `length` or `stop`.
    pub finish: String,
    /// Per generated token, when the request asked for `logprobs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<mycel_protocol::TokenLogprob>,
    /// Functions the model called (chat with `tools`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<mycel_protocol::ToolCall>,
}

impl GenerationView {
    /// An answer of plain text.
    pub fn text(text: impl Into<String>, tokens: u32, finish: &str) -> Self {
        Self { text: text.into(), tokens, finish: finish.into(), logprobs: Vec::new(), tool_calls: Vec::new() }
    }
}

/// `GET /api/v1/tasks`: one line per task this node requested.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskSummary {
    /// The task's id (hex).
    pub task: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Shards in the plan.
    pub shards: usize,
    /// Shards decided.
    pub shards_done: usize,
    /// `embed`, `generate` or `chat`.
    #[serde(default)]
    pub kind: String,
    /// Shards decided per executor (PeerId).
    #[serde(default)]
    pub workers: std::collections::BTreeMap<String, usize>,
    /// Peers running its shards now.
    #[serde(default)]
    pub peers_working: usize,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// Something that happened to a task, as `GET /api/v1/tasks/{id}/events`
/// streams it (the SSE event name is the tag).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TaskEvent {
    /// Shards moved; the last one of a stream has a final `state`.
    Progress(TaskSummary),
    /// Text generated so far continues with `text`, for item `item`
    /// (streaming tasks only; advisory until the signed result is in).
    Text {
        /// The item's index in the task.
        item: u64,
        /// The new text.
        text: String,
    },
}

impl TaskSummary {
    /// Whether the task will not change any more.
    pub fn finished(&self) -> bool {
        self.state != "running"
    }
}

/// `POST /api/v1/search`: the texts of `corpus` most like `query`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The texts to search (at most 100,000).
    pub corpus: Vec<String>,
    /// What to look for.
    pub query: String,
    /// Hits to return (1-1000, default 5).
    #[serde(default)]
    pub top: Option<u32>,
    /// Embedding model id or digest [default: the one most nodes serve].
    #[serde(default)]
    pub model: Option<String>,
}

/// One text found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// Its position in the corpus.
    pub index: usize,
    /// Cosine similarity to the query.
    pub score: f32,
    /// The text.
    pub text: String,
}

/// A search's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// The embedding model used.
    pub model: String,
    /// Best first (ties: corpus order).
    pub hits: Vec<SearchHit>,
    /// Texts embedded for this query (not cached before), the query included.
    pub embedded: usize,
    /// Texts whose vectors came from the cache.
    pub cached: usize,
    /// The embedding tasks this query ran (their receipts cover the new vectors).
    pub tasks: Vec<String>,
}

/// `POST /api/v1/summarize`: one summary of a long text, map-reduce over
/// the swarm. Answers with a task id to follow like any task's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummarizeRequest {
    /// The document.
    pub text: String,
    /// Generation model id or digest [default: the market's choice, kept
    /// for every level].
    #[serde(default)]
    pub model: Option<String>,
    /// Longest chunk, in characters (200-20000, default 2400).
    #[serde(default)]
    pub chunk_chars: Option<u32>,
    /// Summaries combined at a time (2-16, default 4).
    #[serde(default)]
    pub fan_in: Option<u32>,
    /// Longest summary, in tokens (16-1024, default 160).
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// `POST /api/v1/classify`: a label for each input, from the embedders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// Texts to label.
    pub inputs: Vec<String>,
    /// The labels (2-64): `name`, or `name: description` (the description
    /// is what zero-shot compares texts with).
    pub labels: Vec<String>,
    /// Labelled examples: with them a small head is trained and predicts;
    /// without, zero-shot.
    #[serde(default)]
    pub train: Vec<Labelled>,
    /// Embedding model id or digest [default: the one most nodes serve].
    #[serde(default)]
    pub model: Option<String>,
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    /// The text.
    pub text: String,
    /// Its label's name.
    pub label: String,
}

/// One input's label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The label's name.
    pub label: String,
    /// Zero-shot: cosine to the label; trained head: its probability.
    pub score: f32,
}

/// A classification's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyResult {
    /// The embedding model used.
    pub model: String,
    /// `zero-shot` or `trained head`.
    pub method: String,
    /// One per input, in order.
    pub predictions: Vec<Prediction>,
    /// With 10 or more examples: the head's 5-fold cross-validated accuracy.
    pub cross_validated_accuracy: Option<f32>,
    /// Texts embedded now through the swarm.
    pub embedded: usize,
    /// Texts whose vectors came from the cache.
    pub cached: usize,
    /// The embedding tasks run now.
    pub tasks: Vec<String>,
}

/// What a node's router learned, signed by the node
/// (`GET /api/v1/router/export`), for another node to import
/// (`POST /api/v1/router/import`, `signed` alone is enough).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterShare {
    /// The signed outcomes, hex of their wire encoding.
    pub signed: String,
    /// How many outcomes.
    #[serde(default)]
    pub outcomes: usize,
    /// The signer's PeerId.
    #[serde(default)]
    pub signer: String,
    /// The embedding model whose space they are in (weights digest).
    #[serde(default)]
    pub embedder: String,
}
