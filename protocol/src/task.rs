//! What a user asks of the swarm ([`TaskSpec`]) and the proof of what the
//! swarm did ([`Receipt`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::rules::{at_most, non_negative, short};
use crate::market::{ResultClaim, ShardOutput};
use crate::{Digest, Signed, limits};

/// Names one task everywhere: journal, messages, receipts. Random, so two
/// requesters never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TaskId(pub [u8; 16]);

impl TaskId {
    /// A fresh random id.
    pub fn random() -> Result<Self, crate::KeyError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| crate::KeyError::Random(e.to_string()))?;
        Ok(Self(id))
    }

    /// Parses the 32 hex digits users see.
    pub fn from_hex(s: &str) -> Result<Self, hex::FromHexError> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut id)?;
        Ok(Self(id))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({self})")
    }
}

/// Knobs for text generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GenerateParams {
    /// Most tokens to generate per prompt.
    pub max_tokens: u32,
    /// Sampling temperature; 0 means greedy (argmax), which is what
    /// redundant execution compares exactly.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Seed for sampling, so a shard run twice gives the same text. Item
    /// `i` of the task samples with `seed.wrapping_add(i)`, so identical
    /// prompts in one task can still differ, however the task is split.
    pub seed: u64,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// The requester wants text as it is produced ([`crate::rpc::Market::Partial`]);
    /// the signed result stays the answer.
    pub stream: bool,
    /// Log probabilities of the generated tokens: `None` for none,
    /// `Some(k)` for each token's and the `k` most likely alternatives'
    /// (at most [`limits::TOP_LOGPROBS`]).
    pub logprobs: Option<u8>,
    /// The shape the answer must take; the worker constrains decoding to it.
    pub format: OutputFormat,
    /// Functions the model may call (chat only): each an OpenAI-style
    /// function definition (`{"type": "function", "function": {...}}`) as
    /// JSON text, rendered with the model's own chat template.
    #[cfg_attr(test, proptest(strategy = "proptest::collection::vec(proptest::arbitrary::any::<String>(), 0..2)"))]
    pub tools: Vec<String>,
    /// Whether the answer must call a tool.
    pub tool_choice: ToolChoice,
}

/// Whether a chat with tools must call one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum ToolChoice {
    /// The model decides: text, calls, or both.
    #[default]
    Auto,
    /// The answer is one call of one of the tools.
    Required,
    /// The answer is one call of this tool.
    Function(String),
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            stream: false,
            logprobs: None,
            format: OutputFormat::Text,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
        }
    }
}

/// What shape a generated answer must take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum OutputFormat {
    /// Any text.
    #[default]
    Text,
    /// One JSON object, whatever its members.
    JsonObject,
    /// One JSON value valid for this JSON Schema (as JSON text, at most
    /// [`limits::JSON_SCHEMA`] bytes).
    JsonSchema(String),
}

impl GenerateParams {
    /// Checks the parameters against the protocol's limits; the message
    /// says which one is out of range.
    pub fn check(&self) -> Result<(), String> {
        if self.max_tokens == 0 || self.max_tokens > limits::MAX_TOKENS {
            return Err(format!("max_tokens {} not in 1..={}", self.max_tokens, limits::MAX_TOKENS));
        }
        non_negative("temperature", self.temperature)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} not in (0, 1]", self.top_p));
        }
        at_most("stop", &self.stop, limits::STOP_SEQUENCES)?;
        for s in &self.stop {
            short("stop sequence", s, limits::SHORT_STRING)?;
        }
        if let Some(k) = self.logprobs
            && usize::from(k) > limits::TOP_LOGPROBS
        {
            return Err(format!("top_logprobs {k} not in 0..={}", limits::TOP_LOGPROBS));
        }
        if let OutputFormat::JsonSchema(schema) = &self.format {
            short("JSON schema", schema, limits::JSON_SCHEMA)?;
        }
        at_most("tools", &self.tools, limits::TOOLS)?;
        match &self.tool_choice {
            ToolChoice::Auto => {}
            _ if self.tools.is_empty() => return Err("tool_choice: a call is required but no tools are offered".into()),
            ToolChoice::Function(name) => short("tool_choice", name, limits::SHORT_STRING)?,
            _ => {}
        }
        for tool in &self.tools {
            short("tool definition", tool, limits::TOOL_DEFINITION)?;
        }
        Ok(())
    }
}

/// The work itself: a whole task's input, or one shard's slice of it.
/// Tasks split by item, so a shard's `Work` is the same kind with fewer
/// items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Work {
    /// One embedding vector per text.
    Embed {
        /// Texts to embed, in order.
        texts: Vec<String>,
    },
    /// One completion per prompt.
    Generate {
        /// Prompts (user messages) in order.
        prompts: Vec<String>,
        /// Shared generation settings.
        params: GenerateParams,
    },
    /// One continuation per prompt: the text as given, no chat template
    /// (OpenAI's legacy completions).
    Complete {
        /// Prompts in order.
        prompts: Vec<String>,
        /// Shared generation settings.
        params: GenerateParams,
    },
    /// One reply per conversation, each rendered with the model's own chat
    /// template.
    Chat {
        /// Conversations in order.
        conversations: Vec<Vec<ChatTurn>>,
        /// Shared generation settings.
        params: GenerateParams,
    },
}

/// Who said a [`ChatTurn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The person.
    User,
    /// The model, earlier in the conversation.
    Assistant,
    /// What a function the model called returned.
    Tool,
}

impl Role {
    /// The name chat templates use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ChatTurn {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
    /// The functions an assistant turn called.
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(proptest::arbitrary::any::<crate::ToolCall>(), 0..2)")
    )]
    pub tool_calls: Vec<crate::ToolCall>,
}

impl ChatTurn {
    /// A turn of plain text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new() }
    }
}

impl Work {
    /// Number of items (texts or prompts).
    pub fn items(&self) -> usize {
        match self {
            Work::Embed { texts } => texts.len(),
            Work::Generate { prompts, .. } | Work::Complete { prompts, .. } => prompts.len(),
            Work::Chat { conversations, .. } => conversations.len(),
        }
    }

    /// Content hash of the encoded work: what results must name as input.
    pub fn digest(&self) -> Result<Digest, crate::EncodeError> {
        Ok(Digest::of(&crate::Wire::encode(self)?))
    }

    fn check(&self) -> Result<(), String> {
        match self {
            Work::Embed { .. } => Ok(()),
            Work::Generate { params, .. } | Work::Complete { params, .. } => {
                if !params.tools.is_empty() {
                    return Err("tools are for chat work only".into());
                }
                params.check()
            }
            Work::Chat { conversations, params } => {
                for turns in conversations {
                    if turns.is_empty() {
                        return Err("a conversation with no messages".into());
                    }
                    at_most("messages in a conversation", turns, limits::CHAT_TURNS)?;
                    for turn in turns {
                        at_most("tool calls in a message", &turn.tool_calls, limits::TOOLS)?;
                        for call in &turn.tool_calls {
                            short("tool name", &call.name, limits::SHORT_STRING)?;
                        }
                    }
                }
                params.check()
            }
        }
    }
}

// A shard's work is never larger than its task's.
crate::wire!(Work, limits::TASK_SPEC, validate = Work::check);

/// Which model a task wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum ModelSelector {
    /// Exactly these weights.
    Digest(Digest),
    /// Any advertised model with this name; the requester pins it to one
    /// digest when planning, so all shards use the same weights.
    Name(String),
}

/// How to cut a task into shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Split {
    /// Size shards from the candidates' advertised speed (a few seconds of
    /// work each).
    Auto,
    /// Fixed number of items per shard.
    ItemsPerShard(u32),
}

/// How shard outputs become the task's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Aggregation {
    /// Shard outputs in shard order (map tasks: one output per item).
    Concat,
}

/// A task as submitted to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TaskSpec {
    /// What to compute.
    pub work: Work,
    /// With which model.
    pub model: ModelSelector,
    /// How to cut it up.
    pub split: Split,
    /// Peers that run each shard independently (1 = no redundancy). With 2
    /// or more, outputs are compared and a disagreement gets a tie-breaker.
    pub redundancy: u8,
    /// Of the shards run once, the share (per mille) also run on a second
    /// peer to catch liars.
    pub spot_check_permille: u16,
    /// How to combine shard outputs.
    pub aggregation: Aggregation,
    /// Time the whole task may take, in milliseconds; 0 for the node's
    /// default. Past it the task fails with that reason.
    pub deadline_ms: u64,
    /// Most micro-credits the task may spend; `None` for no limit. Every
    /// valid execution is paid at its bid's price per unit; shards that
    /// would go over are not awarded, and a task that cannot finish within
    /// it fails with that reason.
    pub budget_micros: Option<u64>,
}

impl TaskSpec {
    fn check(&self) -> Result<(), String> {
        crate::Wire::validate(&self.work)?;
        if self.work.items() == 0 {
            return Err("a task needs at least one item".into());
        }
        if let ModelSelector::Name(name) = &self.model {
            short("model name", name, limits::SHORT_STRING)?;
        }
        if let Split::ItemsPerShard(0) = self.split {
            return Err("items per shard must be at least 1".into());
        }
        if self.redundancy == 0 || self.redundancy > limits::MAX_REDUNDANCY {
            return Err(format!("redundancy {} not in 1..={}", self.redundancy, limits::MAX_REDUNDANCY));
        }
        if self.spot_check_permille > 1000 {
            return Err(format!("spot_check_permille {} over 1000", self.spot_check_permille));
        }
        Ok(())
    }
}

crate::wire!(TaskSpec, limits::TASK_SPEC, validate = TaskSpec::check);

/// Proof of how a task was done, signed by the requester. Anyone can check
/// it offline: every shard claim is signed by its executor, the Merkle root
/// covers the claims in shard order, and each claim's output hash covers
/// that shard's slice of the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The task.
    pub task: TaskId,
    /// Digest of the encoded [`TaskSpec`].
    pub spec: Digest,
    /// Weights every shard ran on.
    pub model: Digest,
    /// The accepted claim for each shard, in shard order.
    pub shards: Vec<Signed<ResultClaim>>,
    /// Merkle root over the claims' [`Signed::digest`]s.
    pub root: Digest,
    /// Digest of the aggregated output.
    pub output: Digest,
    /// When the task completed, milliseconds since the Unix epoch.
    pub completed_ms: u64,
    /// The spot-check secret, revealed: it matches every claim's
    /// commitment, and says which shards were run twice.
    pub spot: crate::spot::Reveal,
}

impl Receipt {
    fn check(&self) -> Result<(), String> {
        at_most("shards", &self.shards, limits::SHARDS_PER_TASK)
    }
}

/// Why a result does not match a receipt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiptMismatch {
    /// A claim's signature does not verify.
    #[error("shard {0}: the executor's signature is invalid")]
    BadClaim(usize),
    /// A claim is for another task, shard or weights.
    #[error("shard {0}: the claim is for another task, shard or weights")]
    Claim(usize),
    /// The Merkle root does not cover the claims.
    #[error("the Merkle root does not match the shards")]
    Root,
    /// The claims do not cover the result's items once each, in order.
    #[error("shard {0}: its items do not follow the previous shard's")]
    Coverage(usize),
    /// The result holds a different number of items than the claims.
    #[error("the result has {got} items, the shards claim {claimed}")]
    Items { got: usize, claimed: u64 },
    /// A shard's part of the result is not what its executor signed.
    #[error("shard {0}: its part of the result is not the output its executor signed")]
    Slice(usize),
    /// The result does not hash to the receipt's output digest.
    #[error("the result is not the output the receipt names")]
    Output,
    /// A claim's spot-check commitment is not the revealed secret's: the
    /// checks may have been chosen after the work was done.
    #[error("shard {0}: the revealed spot-check secret is not the one committed to before the work")]
    SpotCommitment(usize),
}

impl Receipt {
    /// Checks what needs no output: every claim signed by its executor, for
    /// this task, shard by shard in order, on the receipt's weights, with
    /// the spot-check commitment the receipt reveals, and the Merkle root
    /// over them.
    pub fn check_claims(&self) -> Result<(), ReceiptMismatch> {
        let mut leaves = Vec::with_capacity(self.shards.len());
        for (i, signed) in self.shards.iter().enumerate() {
            let claim = signed.verify().map_err(|_| ReceiptMismatch::BadClaim(i))?;
            if claim.task != self.task || claim.shard as usize != i || claim.model != self.model {
                return Err(ReceiptMismatch::Claim(i));
            }
            if claim.spot_commitment != self.spot.commitment() {
                return Err(ReceiptMismatch::SpotCommitment(i));
            }
            leaves.push(signed.digest());
        }
        if crate::merkle::root(&leaves) != self.root {
            return Err(ReceiptMismatch::Root);
        }
        Ok(())
    }

    /// Checks `output` (a concatenated result) against the receipt: it is
    /// the output the requester signed, and each shard's slice of it hashes
    /// to what that shard's executor signed. So a requester cannot sign a
    /// receipt over outputs its executors never produced.
    pub fn check_output(&self, output: &ShardOutput) -> Result<(), ReceiptMismatch> {
        if output.digest().ok() != Some(self.output) {
            return Err(ReceiptMismatch::Output);
        }
        let mut next = 0u64;
        for (i, signed) in self.shards.iter().enumerate() {
            let claim = signed.verify().map_err(|_| ReceiptMismatch::BadClaim(i))?;
            if claim.spot_commitment != self.spot.commitment() {
                return Err(ReceiptMismatch::SpotCommitment(i));
            }
            if claim.first_item != next {
                return Err(ReceiptMismatch::Coverage(i));
            }
            let slice = usize::try_from(claim.first_item)
                .ok()
                .and_then(|first| output.slice(first, claim.items as usize))
                .ok_or(ReceiptMismatch::Coverage(i))?;
            if slice.digest().ok() != Some(claim.output) {
                return Err(ReceiptMismatch::Slice(i));
            }
            next = next.saturating_add(u64::from(claim.items));
        }
        if next != output.items() as u64 {
            return Err(ReceiptMismatch::Items { got: output.items(), claimed: next });
        }
        Ok(())
    }
}

crate::wire!(Receipt, limits::RECEIPT, validate = Receipt::check);

impl crate::SignedKind for Receipt {
    const DOMAIN: &'static str = "mycel/receipt/2";
}

/// Proof of how a staged task was done: each stage a task of its own
/// (auctioned, checked, receipted), the input of each stage after the
/// first being the output of the one before. Signed by the requester.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedReceipt {
    /// The staged task.
    pub task: TaskId,
    /// Each stage's signed receipt, in order.
    pub stages: Vec<Signed<Receipt>>,
    /// Digest of the final output (the last stage's).
    pub output: Digest,
}

/// Why a staged receipt does not hold up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StagedMismatch {
    /// A staged task has at least one stage.
    #[error("a staged receipt with no stages")]
    Empty,
    /// A stage's receipt is not signed by the staged receipt's signer.
    #[error("stage {0}: signed by another node than the staged task")]
    Signer(usize),
    /// A stage's receipt does not verify.
    #[error("stage {0}: the receipt's signature is invalid")]
    BadStage(usize),
    /// A stage's receipt fails its own checks.
    #[error("stage {stage}: {error}")]
    Stage { stage: usize, error: ReceiptMismatch },
    /// The final output is not the last stage's.
    #[error("the staged task's output is not its last stage's")]
    Output,
}

impl StagedReceipt {
    fn check(&self) -> Result<(), String> {
        at_most("stages", &self.stages, limits::STAGES)
    }

    /// Checks every stage's receipt offline: signed by `signer` (who signed
    /// this), each claim signed by its executor, Merkle roots, spot-check
    /// commitments; and the final output is the last stage's. `output`, when
    /// given, is checked against the last stage shard by shard.
    pub fn check_tree(&self, signer: &crate::PublicKey, output: Option<&ShardOutput>) -> Result<(), StagedMismatch> {
        let last = self.stages.len().checked_sub(1).ok_or(StagedMismatch::Empty)?;
        for (i, signed) in self.stages.iter().enumerate() {
            if signed.signer() != signer {
                return Err(StagedMismatch::Signer(i));
            }
            let receipt = signed.verify().map_err(|_| StagedMismatch::BadStage(i))?;
            receipt.check_claims().map_err(|error| StagedMismatch::Stage { stage: i, error })?;
            if i == last {
                if receipt.output != self.output {
                    return Err(StagedMismatch::Output);
                }
                if let Some(output) = output {
                    receipt.check_output(output).map_err(|error| StagedMismatch::Stage { stage: i, error })?;
                }
            }
        }
        Ok(())
    }
}

crate::wire!(StagedReceipt, limits::RECEIPT, validate = StagedReceipt::check);

impl crate::SignedKind for StagedReceipt {
    const DOMAIN: &'static str = "mycel/staged-receipt/1";
}

/// Proof of how a job was done: work a node split into several tasks of
/// its own (a summary's map and reduce levels, an ensemble's proposals,
/// judge and synthesis), each auctioned, checked and receipted. Holds every
/// task's signed receipt and says which item of which task is the answer,
/// so the answer can be checked against what its executor signed. Signed
/// by the node that ran the job, the requester of every task in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReceipt {
    /// The job.
    pub job: TaskId,
    /// What kind of job (`summarize`, `vote`, `best-of`, `moa`).
    pub kind: String,
    /// Each task's signed receipt, in the order they ran.
    pub tasks: Vec<Signed<Receipt>>,
    /// The task whose output holds the answer (an index into `tasks`).
    pub answer_task: u32,
    /// The answer's item in that task's output; its shard holds it alone.
    pub answer_item: u64,
    /// [`ShardOutput::digest`] of the answer alone (one item).
    pub answer: Digest,
}

/// Why a job receipt does not hold up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobMismatch {
    /// A job has at least one task.
    #[error("a job receipt with no tasks")]
    Empty,
    /// A task's receipt is not signed by the job receipt's signer.
    #[error("task {0}: signed by another node than the job")]
    Signer(usize),
    /// A task's receipt does not verify.
    #[error("task {0}: the receipt's signature is invalid")]
    BadTask(usize),
    /// A task's receipt fails its own checks.
    #[error("task {task}: {error}")]
    Task { task: usize, error: ReceiptMismatch },
    /// The answer's task or item is not in the receipt, or its shard holds
    /// other items too (so its executor's signature is not over it alone).
    #[error("the answer is not one shard of the task named")]
    AnswerPlace,
    /// The answer is not what its executor signed.
    #[error("the answer is not what its executor signed")]
    Answer,
}

impl JobReceipt {
    fn check(&self) -> Result<(), String> {
        at_most("tasks", &self.tasks, limits::JOB_TASKS)?;
        short("kind", &self.kind, limits::SHORT_STRING)
    }

    /// Checks every task's receipt offline (signed by `signer`, who signed
    /// this; each claim by its executor; Merkle roots; spot-check
    /// commitments), and that the answer is one shard's whole output, as
    /// that shard's executor signed it. `answer`, when given, must be that
    /// output.
    pub fn check_tree(&self, signer: &crate::PublicKey, answer: Option<&ShardOutput>) -> Result<(), JobMismatch> {
        if self.tasks.is_empty() {
            return Err(JobMismatch::Empty);
        }
        let mut receipts = Vec::with_capacity(self.tasks.len());
        for (i, signed) in self.tasks.iter().enumerate() {
            if signed.signer() != signer {
                return Err(JobMismatch::Signer(i));
            }
            let receipt = signed.verify().map_err(|_| JobMismatch::BadTask(i))?;
            receipt.check_claims().map_err(|error| JobMismatch::Task { task: i, error })?;
            receipts.push(receipt);
        }
        let task = receipts.get(self.answer_task as usize).ok_or(JobMismatch::AnswerPlace)?;
        // check_claims verified every claim's signature.
        let claim = task
            .shards
            .iter()
            .filter_map(|s| s.verify().ok())
            .find(|c| c.first_item == self.answer_item && c.items == 1)
            .ok_or(JobMismatch::AnswerPlace)?;
        if claim.output != self.answer {
            return Err(JobMismatch::Answer);
        }
        if let Some(answer) = answer
            && (answer.items() != 1 || answer.digest().ok() != Some(self.answer))
        {
            return Err(JobMismatch::Answer);
        }
        Ok(())
    }
}

crate::wire!(JobReceipt, limits::RECEIPT, validate = JobReceipt::check);

impl crate::SignedKind for JobReceipt {
    const DOMAIN: &'static str = "mycel/job-receipt/1";
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::codec::Wire as _;
    use crate::{Keypair, Timings, merkle};

    fn vectors(values: &[f32]) -> ShardOutput {
        ShardOutput::Embeddings { dimensions: 2, values: values.to_vec() }
    }

    /// A receipt of task `id` over `shards` (their outputs, in order), each
    /// signed by an executor, for `output` (what the requester says the
    /// result is).
    fn receipt_of(id: u8, shards: &[&ShardOutput], output: &ShardOutput) -> Receipt {
        let executor = Keypair::from_secret_bytes(&[9; 32]);
        let mut first_item = 0u64;
        let claims: Vec<Signed<ResultClaim>> = shards
            .iter()
            .enumerate()
            .map(|(i, out)| {
                let claim = ResultClaim {
                    task: TaskId([id; 16]),
                    shard: i as u32,
                    first_item,
                    items: out.items() as u32,
                    input: Digest::of(b"input"),
                    model: Digest::of(b"model"),
                    output: out.digest().unwrap(),
                    timings: Timings::default(),
                    input_tokens: 0,
                    spot_commitment: crate::spot::commitment(&[5; 32]),
                };
                first_item += out.items() as u64;
                Signed::sign(&executor, &claim).unwrap()
            })
            .collect();
        let leaves: Vec<Digest> = claims.iter().map(Signed::digest).collect();
        Receipt {
            task: TaskId([id; 16]),
            spec: Digest::of(b"spec"),
            model: Digest::of(b"model"),
            root: merkle::root(&leaves),
            shards: claims,
            output: output.digest().unwrap(),
            completed_ms: 1,
            spot: crate::spot::Reveal { secret: [5; 32], permille: 50 },
        }
    }

    /// A receipt over two shards of two items each.
    fn receipt(shards: [&ShardOutput; 2], output: &ShardOutput) -> Receipt {
        receipt_of(1, &shards, output)
    }

    #[test]
    fn every_shards_slice_must_be_what_its_executor_signed() {
        let (a, b) = (vectors(&[1.0, 0.0, 0.0, 1.0]), vectors(&[0.5, 0.5, 0.6, 0.8]));
        let whole = vectors(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.6, 0.8]);
        assert_eq!(receipt([&a, &b], &whole).check_output(&whole), Ok(()));
        // The requester signs a receipt over an output of its own: the
        // result file hashes to the receipt, yet shard 1's part is not what
        // its executor produced.
        let swapped = vectors(&[1.0, 0.0, 0.0, 1.0, 0.8, 0.6, 0.5, 0.5]);
        assert_eq!(receipt([&a, &b], &swapped).check_output(&swapped), Err(ReceiptMismatch::Slice(1)));
        // A result that is not the receipt's output at all.
        assert_eq!(receipt([&a, &b], &whole).check_output(&swapped), Err(ReceiptMismatch::Output));
        // Claims that leave items out.
        let longer = vectors(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.6, 0.8, 1.0, 1.0]);
        assert_eq!(
            receipt([&a, &b], &longer).check_output(&longer),
            Err(ReceiptMismatch::Items { got: 5, claimed: 4 })
        );
        let shorter = vectors(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5]);
        assert_eq!(receipt([&a, &b], &shorter).check_output(&shorter), Err(ReceiptMismatch::Coverage(1)));
        // A secret revealed that is not the one the workers saw committed.
        let mut chosen_later = receipt([&a, &b], &whole);
        chosen_later.spot.secret = [6; 32];
        assert_eq!(chosen_later.check_output(&whole), Err(ReceiptMismatch::SpotCommitment(0)));
    }

    /// A task's receipt, signed by `requester`, whose shards are one
    /// generation each, signed by an executor.
    fn one_per_shard(requester: &Keypair, id: u8, texts: &[&str]) -> Signed<Receipt> {
        let g = |t: &str| crate::Generation::text(t, 1, crate::FinishReason::Stop);
        let shards: Vec<ShardOutput> = texts.iter().map(|t| ShardOutput::Generations(vec![g(t)])).collect();
        let whole = ShardOutput::Generations(texts.iter().map(|t| g(t)).collect());
        Signed::sign(requester, &receipt_of(id, &shards.iter().collect::<Vec<_>>(), &whole)).unwrap()
    }

    #[test]
    fn a_job_receipt_holds_every_task_and_the_answer_as_its_executor_signed_it() {
        let requester = Keypair::from_secret_bytes(&[1; 32]);
        let answer = |t: &str| ShardOutput::Generations(vec![crate::Generation::text(t, 1, crate::FinishReason::Stop)]);
        let job = JobReceipt {
            job: TaskId([7; 16]),
            kind: "best-of".into(),
            tasks: vec![one_per_shard(&requester, 1, &["four", "five", "four"]), one_per_shard(&requester, 2, &["1"])],
            answer_task: 0,
            answer_item: 2,
            answer: answer("four").digest().unwrap(),
        };
        let me = requester.public();
        assert_eq!(job.check_tree(&me, None), Ok(()));
        assert_eq!(job.check_tree(&me, Some(&answer("four"))), Ok(()));
        // An answer file that is not the one signed.
        assert_eq!(job.check_tree(&me, Some(&answer("five"))), Err(JobMismatch::Answer));
        // The job names an answer its executor never gave.
        let forged = JobReceipt { answer: answer("six").digest().unwrap(), ..job.clone() };
        assert_eq!(forged.check_tree(&me, Some(&answer("six"))), Err(JobMismatch::Answer));
        // Or one that is not there.
        let nowhere = JobReceipt { answer_item: 3, ..job.clone() };
        assert_eq!(nowhere.check_tree(&me, None), Err(JobMismatch::AnswerPlace));
        let nowhere = JobReceipt { answer_task: 2, ..job.clone() };
        assert_eq!(nowhere.check_tree(&me, None), Err(JobMismatch::AnswerPlace));
        // A task another node requested, slipped in.
        let other = Keypair::from_secret_bytes(&[2; 32]);
        let mut mixed = job.clone();
        mixed.tasks.push(one_per_shard(&other, 3, &["x"]));
        assert_eq!(mixed.check_tree(&me, None), Err(JobMismatch::Signer(2)));
        assert_eq!(JobReceipt { tasks: Vec::new(), ..job.clone() }.check_tree(&me, None), Err(JobMismatch::Empty));
        // Through the wire and the signature, unchanged.
        let signed = Signed::sign(&requester, &job).unwrap();
        let back = Signed::<JobReceipt>::decode(&signed.encode().unwrap()).unwrap().verify().unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn slices_cut_by_item() {
        let g = |t: &str| crate::Generation::text(t, 1, crate::FinishReason::Length);
        let out = ShardOutput::Generations(vec![g("a"), g("b"), g("c")]);
        assert_eq!(out.slice(1, 2), Some(ShardOutput::Generations(vec![g("b"), g("c")])));
        assert_eq!(out.slice(2, 2), None);
        assert_eq!(out.slice(usize::MAX, 2), None);
        assert_eq!(vectors(&[1.0, 2.0, 3.0, 4.0]).slice(1, 1), Some(vectors(&[3.0, 4.0])));
    }
}
