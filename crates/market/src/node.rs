//! The node's whole market as one state machine: every requester, the
//! worker, the reputation book, the capability index, retention and a
//! single timer queue.
//!
//! [`Node::handle`] takes an [`Input`] (an advert, a peer message, a
//! finished job, a timer tick, ...) with the time, and returns [`Action`]s
//! (journal these writes, send this message, run this job, ...). It reads no
//! clock, no random source and no hash-map order: the same inputs give the
//! same actions, so the node's binary is only an interpreter of them and a
//! simulator can drive thousands of these machines.
//!
//! It signs what it sends (CFPs, bids, awards, acks, results, receipts):
//! signing is pure computation, and doing it here means a digest the state
//! depends on (a CFP's, a bid's) is known in the same step.
//!
//! Order matters in the actions: a [`Action::Journal`] always comes before
//! any message whose meaning depends on the state it stores.

use std::collections::{BTreeMap, VecDeque};

use mycel_protocol::rpc::Market;
use mycel_protocol::{
    Advert, Aggregation, Bid, Digest, Keypair, Load, ModelAdvert, ModelKind, ModelSelector, PublicKey, Receipt,
    ResultClaim, ShardOutput, ShardResult, Signed, Split, StagedReceipt, TaskId, TaskSpec, Wire, Work,
};

use crate::requester::{self, Candidate, Phase, Pool, Requester, Timer};
use crate::worker::{AwardOutcome, Done, Job, Served, Worker, WorkerConfig};
use crate::{Reputation, reputation};

/// Tuning of the node's market.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Each task's auction.
    pub auction: requester::Config,
    /// The worker's bids.
    pub worker: WorkerConfig,
    /// Finished tasks kept (outputs, receipts); the oldest go first.
    pub keep_finished: usize,
    /// An advert older than this no longer makes its sender a candidate.
    pub advert_ttl_ms: u64,
    /// Misbehaviour on purpose, for testing the swarm's defences.
    pub fault: Option<Fault>,
    /// Tasks running at once (a staged task counts once); past this a new
    /// submission is refused with [`SubmitError::Busy`], so a flood of
    /// submissions cannot grow the node without bound.
    pub max_running: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            auction: requester::Config::default(),
            worker: WorkerConfig::default(),
            keep_finished: 100,
            advert_ttl_ms: 30_000,
            fault: None,
            max_running: 256,
        }
    }
}

impl NodeConfig {
    /// With this many finished tasks kept.
    pub fn with_keep_finished(mut self, n: usize) -> Self {
        self.keep_finished = n;
        self
    }

    /// With a fault injected.
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    /// With at most this many tasks running at once.
    pub fn with_max_running(mut self, n: usize) -> Self {
        self.max_running = n.max(1);
        self
    }

    /// With this advert lifetime.
    pub fn with_advert_ttl_ms(mut self, ms: u64) -> Self {
        self.advert_ttl_ms = ms;
        self
    }
}

/// Misbehaviour on demand (`mycel node --fault`), for tests of the swarm's
/// defences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Returns wrong embeddings (and reversed answers), signed as its own.
    Perturb,
    /// Corrupts the signature of every result it sends.
    Forge,
    /// Lies like [`Fault::Perturb`], on about one shard in four (chosen by
    /// the shard's task and index, so a retried shard lies again): the
    /// cheat who hopes most shards go unchecked.
    Sometimes,
    /// Bids, wins, runs the work and never answers.
    Silent,
}

impl Fault {
    /// Whether this fault lies about `job` (a wrong output, signed).
    fn lies_about(self, job: &Job) -> bool {
        match self {
            Fault::Perturb => true,
            Fault::Sometimes => {
                let at = job.shard.to_le_bytes();
                Digest::of_parts(&[b"mycel/fault-sometimes", &job.task.0, &at]).0[0] < 64
            }
            _ => false,
        }
    }
}

/// A task as a user hands it over, already mapped from the API's request.
#[derive(Debug, Clone)]
pub struct Submission {
    /// What the user called it (`embed`, `generate`, `chat`), for display.
    pub label: String,
    /// The model kind the work needs.
    pub kind: ModelKind,
    /// A model id or weights digest; `None` for any model of the kind.
    pub model: Option<String>,
    /// The work.
    pub work: Work,
    /// How to cut it.
    pub split: Split,
    /// Copies of each shard.
    pub redundancy: u8,
    /// Share of single-run shards also run elsewhere, per mille.
    pub spot_check_permille: u16,
    /// Later stages, each fed the output of the one before (empty: a task
    /// of one stage).
    pub then: Vec<Stage>,
}

/// A later stage of a staged task: a task of its own whose items are the
/// previous stage's output items ([`crate::kind::feed`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stage {
    /// What the user calls it (`embed`, `generate`), for display.
    pub label: String,
    /// The model kind it needs.
    pub kind: ModelKind,
    /// A model id or weights digest; `None` for any model of the kind.
    pub model: Option<String>,
    /// How to cut it.
    pub split: Split,
    /// Copies of each shard.
    pub redundancy: u8,
    /// Share of single-run shards also run elsewhere, per mille.
    pub spot_check_permille: u16,
    /// Generation settings, for a generation stage.
    pub params: mycel_protocol::GenerateParams,
}

impl Stage {
    /// The stage as a task of its own, on `work` (the stage before's output).
    fn submission(&self, work: Work) -> Submission {
        Submission {
            label: self.label.clone(),
            kind: self.kind,
            model: self.model.clone(),
            work,
            split: self.split,
            redundancy: self.redundancy,
            spot_check_permille: self.spot_check_permille,
            then: Vec::new(),
        }
    }
}

/// A staged task: its stages, the child task running each, and the
/// receipts of those done.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    /// What the user called its first stage.
    pub label: String,
    /// Derives each stage's task id and spot-check secret.
    seed: [u8; 32],
    /// The stages after the first.
    stages: Vec<Stage>,
    /// The child task of each stage started so far, in order.
    pub children: Vec<TaskId>,
    /// The signed receipt of each stage done, in order.
    receipts: Vec<Signed<Receipt>>,
    /// How it ended, once it did, and when (ms).
    pub outcome: Option<StagedOutcome>,
    ended_ms: u64,
}

/// How a staged task ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum StagedOutcome {
    /// Every stage done: the last stage's output and a receipt over all.
    Done { output: ShardOutput, receipt: Box<Signed<StagedReceipt>> },
    /// A stage failed, and why.
    Failed(String),
}

mycel_protocol::wire!(Pipeline, mycel_protocol::limits::TASK_SPEC);

/// Fresh randomness for a task, from the interpreter: the machine has no
/// random source of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entropy {
    /// Names the task.
    pub task_id: [u8; 16],
    /// Draws its spot checks; revealed only in the receipt.
    pub spot_secret: [u8; 32],
}

impl Entropy {
    /// Stage `index` of a staged task seeded with `seed`: unpredictable to
    /// anyone without the seed, and the same after a restart.
    fn stage(seed: &[u8; 32], index: usize) -> Self {
        let at = (index as u64).to_le_bytes();
        let id = Digest::of_parts(&[b"mycel/stage-id", seed, &at]);
        let secret = Digest::of_parts(&[b"mycel/stage-secret", seed, &at]);
        let mut task_id = [0u8; 16];
        task_id.copy_from_slice(&id.0[..16]);
        Self { task_id, spot_secret: secret.0 }
    }
}

impl Entropy {
    /// Entropy from 48 random bytes.
    pub fn from_bytes(bytes: [u8; 48]) -> Self {
        let mut task_id = [0u8; 16];
        let mut spot_secret = [0u8; 32];
        task_id.copy_from_slice(&bytes[..16]);
        spot_secret.copy_from_slice(&bytes[16..]);
        Self { task_id, spot_secret }
    }
}

/// Why a submission was refused. Every case but [`SubmitError::Start`] is
/// the user's to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// No known peer serves a model by that name.
    #[error("no peer serves {kind} model {name:?} (GET /v1/models lists what the swarm offers)")]
    ModelNotFound { kind: &'static str, name: String },
    /// No known peer serves any model of the kind.
    #[error("no peer serves {0} model yet")]
    NoCapablePeer(&'static str),
    /// The task breaks a protocol rule.
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The node runs as many tasks as it takes; the user may try later.
    #[error("this node is running {running} tasks, its limit: try again when some finish")]
    Busy { running: usize },
    /// The task could not be planned.
    #[error(transparent)]
    Start(#[from] requester::StartError),
}

/// Something that happened outside the machine.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// A peer's advert, verified by the network layer.
    Advert { peer: PublicKey, advert: Advert },
    /// A peer's advert expired or it left.
    PeerLost(PublicKey),
    /// A market message from `from` (the authenticated sender), decoded and
    /// size-checked but not verified: the machine checks signatures, once.
    Message { from: PublicKey, message: Market },
    /// A message the network could not deliver; `attempt` is 0 for a
    /// [`Action::Send`], else the [`Action::Resend`]'s.
    Undelivered { to: PublicKey, message: Market, attempt: u32 },
    /// The local models finished (or failed) a job.
    JobDone { job: Job, output: Result<ShardOutput, String>, compute_ms: u32, input_tokens: u64 },
    /// The local models are ready: their adverts, and shards run at once.
    ModelsReady { models: Vec<ModelAdvert>, capacity: u32 },
    /// The user gave up on a task.
    Cancel(TaskId),
    /// Time passed: fire the timers due by now (see [`Node::next_timer_ms`]).
    Tick,
}

/// One write to the journal.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Part of a task's state, at a key of the task tree ([`task_key`]).
    Task { key: Vec<u8>, value: Vec<u8> },
    /// A part of a forgotten task, removed.
    Forget { key: Vec<u8> },
    /// A peer's reputation, encoded.
    Reputation(PublicKey, Vec<u8>),
}

/// A part of a task's journaled state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The requester's head: phase, offers, candidates (small).
    Head,
    /// The plan: every shard's input (written once).
    Plan,
    /// One shard's progress: who runs it, its results.
    Shard(u32),
    /// A staged task's stages and progress.
    Pipeline,
}

/// Where a part of a task lives in the task tree: the task id, then the
/// part, so one task's parts sort together.
pub fn task_key(task: TaskId, part: Part) -> Vec<u8> {
    let mut key = task.0.to_vec();
    match part {
        Part::Head => key.push(0),
        Part::Plan => key.push(1),
        Part::Shard(index) => {
            key.push(2);
            key.extend_from_slice(&index.to_be_bytes());
        }
        Part::Pipeline => key.push(3),
    }
    key
}

/// One task's parts as read back from the journal.
#[derive(Debug, Default)]
struct Parts {
    head: Option<Vec<u8>>,
    plan: Option<Vec<u8>>,
    shards: Vec<(u32, Vec<u8>)>,
}

fn parse_task_key(key: &[u8]) -> Option<(TaskId, Part)> {
    let id: [u8; 16] = key.get(..16)?.try_into().ok()?;
    let part = match key.get(16..)? {
        [0] => Part::Head,
        [1] => Part::Plan,
        [2, rest @ ..] => Part::Shard(u32::from_be_bytes(rest.try_into().ok()?)),
        [3] => Part::Pipeline,
        _ => return None,
    };
    Some((TaskId(id), part))
}

/// Counted events, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    /// A bid went out.
    BidSent,
    /// An award of ours came in.
    BidWon,
    /// A task asked for bids again.
    Reauction,
    /// A CFP went out by gossip.
    CfpGossiped,
    /// A peer was penalised.
    VerificationFailure,
    /// From a round's CFP to its first award.
    AuctionLatencyMs(u64),
    /// A shard ran here.
    Inference { model: String, items: u64, tokens: u64, compute_ms: u32 },
}

/// What the interpreter must do, in order.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Store these, durably, before doing anything after this.
    Journal(Vec<Write>),
    /// Send a market message to a peer (or to ourselves, looped back),
    /// once; a failure comes back as [`Input::Undelivered`].
    Send { to: PublicKey, message: Market },
    /// Send again a message that failed `attempt` times.
    Resend { to: PublicKey, message: Market, attempt: u32 },
    /// Publish a signed CFP on the gossip topic.
    Gossip(Signed<mycel_protocol::Cfp>),
    /// Run a shard on the local models; report with [`Input::JobDone`].
    Execute(Job),
    /// Streamed text of a task's item, to show its watchers.
    Text { task: TaskId, item: u64, text: String },
    /// A task's progress changed (watchers may want to know).
    Progress(TaskId),
    /// The load this node should advertise changed.
    Load(Load),
    /// Count something.
    Metric(Metric),
}

/// How a task ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Completed: the output in item order and the signed receipt.
    Done { output: ShardOutput, receipt: Box<Signed<Receipt>>, input_tokens: u64 },
    /// Failed, and why.
    Failed(String),
}

/// A task this node requested.
#[derive(Debug)]
pub struct Task {
    /// Its auction, verification and aggregation.
    pub requester: Requester,
    /// What the user called it.
    pub label: String,
    /// The chosen model's advertised id.
    pub model: String,
    /// How it ended, once it did.
    pub outcome: Option<Outcome>,
    /// CFP-to-first-award times per round, in ms.
    pub auction_ms: Vec<u64>,
    /// When the current round's CFP left, until its first award.
    cfp_sent_ms: Option<u64>,
}

/// Retries a failed delivery gets before the market gives up on it.
const RESENDS: u32 = 3;
/// Wait before the first retry; it doubles with each.
const RESEND_AFTER_MS: u64 = 100;
/// Most resends waiting at once; past this a failure is final at once.
const PENDING_RESENDS: usize = 1024;

/// What the timer queue holds.
#[derive(Debug)]
enum Due {
    /// A task's timer.
    Task(TaskId, Timer),
    /// A message to try again.
    Resend { to: PublicKey, message: Box<Market>, attempt: u32 },
}

/// A peer as its latest advert describes it.
#[derive(Debug, Clone)]
struct PeerEntry {
    advert: Advert,
    seen_ms: u64,
}

/// The node's market.
#[derive(Debug)]
pub struct Node {
    key: Keypair,
    me: PublicKey,
    config: NodeConfig,
    /// Capability index: each peer's latest advert and when it came.
    peers: BTreeMap<PublicKey, PeerEntry>,
    /// Our own models, once loaded.
    own: Vec<ModelAdvert>,
    /// Reputation book: every peer we have judged.
    book: BTreeMap<PublicKey, Reputation>,
    /// Tasks we requested, running and finished.
    tasks: BTreeMap<TaskId, Task>,
    /// Finished tasks, oldest first.
    finished: VecDeque<TaskId>,
    /// Our worker, once models are loaded.
    worker: Option<Worker>,
    /// The one timer queue: (due time, sequence) to what is due.
    timers: BTreeMap<(u64, u64), Due>,
    /// Resends waiting in the queue (at most [`PENDING_RESENDS`]).
    resends: usize,
    timer_seq: u64,
    /// Who streams each item of a task (the first runner heard from).
    streaming: BTreeMap<(TaskId, u64), PublicKey>,
    /// The load last advertised.
    load: Load,
    /// Staged tasks, by id, and which staged task each child belongs to.
    pipelines: BTreeMap<TaskId, Pipeline>,
    parents: BTreeMap<TaskId, TaskId>,
    /// Children finished in this step, whose staged task may move on.
    just_finished: Vec<TaskId>,
}

impl Node {
    /// A node's market, signing with `key`.
    pub fn new(key: Keypair, config: NodeConfig) -> Self {
        let me = key.public();
        Self {
            key,
            me,
            config,
            peers: BTreeMap::new(),
            own: Vec::new(),
            book: BTreeMap::new(),
            tasks: BTreeMap::new(),
            finished: VecDeque::new(),
            worker: None,
            timers: BTreeMap::new(),
            resends: 0,
            timer_seq: 0,
            streaming: BTreeMap::new(),
            load: Load::default(),
            pipelines: BTreeMap::new(),
            parents: BTreeMap::new(),
            just_finished: Vec::new(),
        }
    }

    /// This node's key.
    pub fn me(&self) -> PublicKey {
        self.me
    }

    /// Takes back what the journal holds after a restart: reputations, and
    /// tasks (unfinished ones resume: their timers died with the old
    /// process). Unreadable entries are skipped and named in the result.
    pub fn restore(
        &mut self,
        now_ms: u64,
        tasks: Vec<(Vec<u8>, Vec<u8>)>,
        reputations: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> (Vec<Action>, Vec<String>) {
        let mut skipped = Vec::new();
        for (key, value) in reputations {
            let peer = <[u8; 32]>::try_from(key.as_slice()).ok().and_then(|k| PublicKey::from_bytes(&k).ok());
            match (peer, Reputation::from_bytes(&value)) {
                (Some(peer), Some(r)) => {
                    self.book.insert(peer, r);
                }
                _ => skipped.push(format!("reputation entry {}", hex_short(&key))),
            }
        }
        let mut out = Vec::new();
        let mut finished = Vec::new();
        // Each task's parts, gathered by id.
        let mut parts: BTreeMap<TaskId, Parts> = BTreeMap::new();
        for (key, value) in tasks {
            let Some((task, part)) = parse_task_key(&key) else {
                skipped.push(format!("task entry {} (an older journal format?)", hex_short(&key)));
                continue;
            };
            let entry = parts.entry(task).or_default();
            match part {
                Part::Head => entry.head = Some(value),
                Part::Plan => entry.plan = Some(value),
                Part::Shard(index) => entry.shards.push((index, value)),
                Part::Pipeline => match Pipeline::decode(&value) {
                    Ok(p) => {
                        for child in &p.children {
                            self.parents.insert(*child, task);
                        }
                        self.pipelines.insert(task, p);
                    }
                    Err(e) => skipped.push(format!("staged task {task}: {e}")),
                },
            }
        }
        for (task, Parts { head, plan, shards }) in parts {
            if head.is_none() && plan.is_none() && shards.is_empty() {
                continue; // a staged task's own record only
            }
            let (Some(head), Some(plan)) = (head, plan) else {
                skipped.push(format!("task {task}: head or plan missing"));
                continue;
            };
            match Requester::from_journal(&head, &plan, &shards) {
                Ok(mut requester) if !matches!(requester.phase(), Phase::Done | Phase::Failed) => {
                    let actions = requester.resume(now_ms);
                    let label = requester.kind_name().to_string();
                    self.tasks.insert(task, Task::new(requester, label, String::new()));
                    self.apply(now_ms, task, actions, &mut out);
                }
                Ok(requester) => finished.push((requester.completed_ms().unwrap_or(0), task, requester)),
                Err(e) => skipped.push(format!("task {task}: {e}")),
            }
        }
        // Finished before the restart: still served, oldest first, as many
        // as the node keeps.
        finished.sort_by_key(|(at, task, _)| (*at, *task));
        for (_, task, requester) in finished {
            let outcome = match requester.outcome() {
                Some(Ok((output, receipt))) => self.signed_outcome(&requester, output, &receipt),
                Some(Err(reason)) => Outcome::Failed(reason),
                None => continue,
            };
            let label = requester.kind_name().to_string();
            self.tasks.insert(task, Task::new(requester, label, String::new()));
            self.finish(task, outcome, &mut out);
        }
        // A staged task whose stage finished just before the crash moves on.
        self.just_finished = self.pipelines.values().filter_map(|p| p.children.last().copied()).collect();
        self.advance_pipelines(now_ms, &mut out);
        (out, skipped)
    }

    /// A staged task, running or finished.
    pub fn pipeline(&self, task: &TaskId) -> Option<&Pipeline> {
        self.pipelines.get(task)
    }

    /// When the earliest timer is due, if any: the interpreter sends
    /// [`Input::Tick`] then.
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// A task, running or finished.
    pub fn task(&self, task: &TaskId) -> Option<&Task> {
        self.tasks.get(task)
    }

    /// Every task held, by id.
    pub fn tasks(&self) -> impl Iterator<Item = (&TaskId, &Task)> {
        self.tasks.iter()
    }

    /// Every peer's reputation now.
    pub fn reputations(&self, now_ms: u64) -> impl Iterator<Item = (PublicKey, f64)> + '_ {
        self.book.iter().map(move |(p, r)| (*p, r.score(now_ms)))
    }

    /// A peer's reputation now: a stranger's default if never judged.
    pub fn reputation(&self, now_ms: u64, peer: &PublicKey) -> f64 {
        self.book.get(peer).map_or(reputation::DEFAULT, |r| r.score(now_ms))
    }

    /// The load to advertise: shards queued or running here.
    pub fn load(&self) -> Load {
        self.load
    }

    /// Hands a task to the market. `entropy` names it and draws its spot
    /// checks (fresh randomness from the interpreter). The model is chosen
    /// by a stated rule: the weights named (by digest or id), else, of the
    /// weights serving the kind, those with the most throughput from peers
    /// in good standing (speed times reputation, summed), ties broken by
    /// digest.
    pub fn submit(
        &mut self,
        now_ms: u64,
        entropy: Entropy,
        submission: Submission,
    ) -> Result<(TaskId, Vec<Action>), SubmitError> {
        let running = self.running();
        if running >= self.config.max_running {
            return Err(SubmitError::Busy { running });
        }
        self.start_task(now_ms, entropy, submission)
    }

    /// Tasks the user submitted that are still running: plain tasks, and
    /// staged tasks (each once, whatever stage it is at).
    pub fn running(&self) -> usize {
        let plain = self.tasks.iter().filter(|(id, t)| t.outcome.is_none() && !self.parents.contains_key(id)).count();
        plain + self.pipelines.values().filter(|p| p.outcome.is_none()).count()
    }

    /// Starts a task (or a staged task's first stage), whatever the load.
    fn start_task(
        &mut self,
        now_ms: u64,
        entropy: Entropy,
        submission: Submission,
    ) -> Result<(TaskId, Vec<Action>), SubmitError> {
        if !submission.then.is_empty() {
            return self.submit_staged(now_ms, entropy, submission);
        }
        let Submission { label, kind, model, work, split, redundancy, spot_check_permille, then: _ } = submission;
        let kind_name = if kind == ModelKind::Embedding { "an embedding" } else { "a generation" };
        let tools = uses_tools(&work);
        let (weights, id) = self.choose_model(now_ms, kind, model.as_deref(), tools).ok_or_else(|| {
            let named = model.as_deref().map(|name| format!(" {name:?}")).unwrap_or_default();
            match &model {
                _ if tools && self.choose_model(now_ms, kind, model.as_deref(), false).is_some() => {
                    SubmitError::Invalid(format!("the model{named} has no format for tools (its chat template)"))
                }
                Some(name) => SubmitError::ModelNotFound { kind: kind_name, name: name.clone() },
                None => SubmitError::NoCapablePeer(kind_name),
            }
        })?;
        let spec = TaskSpec {
            work,
            model: ModelSelector::Digest(weights),
            split,
            redundancy: redundancy.clamp(1, mycel_protocol::limits::MAX_REDUNDANCY),
            spot_check_permille,
            aggregation: Aggregation::Concat,
            deadline_ms: 0,
            budget_micros: None,
        };
        spec.validate().map_err(SubmitError::Invalid)?;
        let task = TaskId(entropy.task_id);
        let pool = Pool {
            candidates: self.candidates(now_ms, &weights, kind),
            prefill_weight: self.prefill_weight(now_ms, &weights),
        };
        let config = self.config.auction.clone();
        let mut requester = Requester::new(task, &spec, weights, kind, pool, config, entropy.spot_secret)?;
        let actions = requester.start(now_ms);
        self.tasks.insert(task, Task::new(requester, label, id));
        let mut out = Vec::new();
        self.apply(now_ms, task, actions, &mut out);
        self.advance_pipelines(now_ms, &mut out);
        Ok((task, out))
    }

    /// A staged task: the first stage starts now as a child task; each
    /// later one when the one before completes.
    fn submit_staged(
        &mut self,
        now_ms: u64,
        entropy: Entropy,
        mut submission: Submission,
    ) -> Result<(TaskId, Vec<Action>), SubmitError> {
        if submission.then.len() + 1 > mycel_protocol::limits::STAGES {
            return Err(SubmitError::Invalid(format!("at most {} stages", mycel_protocol::limits::STAGES)));
        }
        let parent = TaskId(entropy.task_id);
        let stages = std::mem::take(&mut submission.then);
        let pipeline = Pipeline {
            label: submission.label.clone(),
            seed: entropy.spot_secret,
            stages,
            children: Vec::new(),
            receipts: Vec::new(),
            outcome: None,
            ended_ms: 0,
        };
        self.pipelines.insert(parent, pipeline);
        let mut out = Vec::new();
        if let Err(e) = self.start_stage(now_ms, parent, 0, submission, &mut out) {
            // Nothing was sent or stored: the staged task never was.
            self.pipelines.remove(&parent);
            return Err(e);
        }
        Ok((parent, out))
    }

    /// Starts stage `index` of `parent` as a child task. The staged task's
    /// record, naming the child, is journaled before anything the child
    /// sends, so a restart never starts the same stage twice.
    fn start_stage(
        &mut self,
        now_ms: u64,
        parent: TaskId,
        index: usize,
        submission: Submission,
        out: &mut Vec<Action>,
    ) -> Result<(), SubmitError> {
        let Some(seed) = self.pipelines.get(&parent).map(|p| p.seed) else { return Ok(()) };
        let (child, actions) = self.start_task(now_ms, Entropy::stage(&seed, index), submission)?;
        self.parents.insert(child, parent);
        if let Some(p) = self.pipelines.get_mut(&parent) {
            p.children.push(child);
        }
        self.journal_pipeline(parent, out);
        out.extend(actions);
        Ok(())
    }

    /// Moves on every staged task whose current stage finished: the next
    /// stage starts on its output, or the staged task ends.
    fn advance_pipelines(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        while let Some(child) = self.just_finished.pop() {
            let Some(parent) = self.parents.get(&child).copied() else { continue };
            let Some(p) = self.pipelines.get(&parent) else { continue };
            if p.outcome.is_some() || p.children.last() != Some(&child) {
                continue;
            }
            let stage = p.children.len() - 1;
            let ended = match self.tasks.get(&child).and_then(|t| t.outcome.clone()) {
                None => continue,
                Some(Outcome::Failed(reason)) => Some(StagedOutcome::Failed(format!("stage {stage}: {reason}"))),
                Some(Outcome::Done { output, receipt, .. }) => {
                    self.stage_done(now_ms, parent, stage, output, *receipt, out)
                }
            };
            // A next stage started has journaled the record already.
            if let Some(ended) = ended
                && let Some(p) = self.pipelines.get_mut(&parent)
            {
                p.outcome = Some(ended);
                p.ended_ms = now_ms;
                self.journal_pipeline(parent, out);
                self.retire_pipelines(out);
            }
        }
    }

    /// Stage `stage` of `parent` completed: the next stage starts on its
    /// output, or after the last one the staged receipt is signed. Returns
    /// how the staged task ended, if it did.
    fn stage_done(
        &mut self,
        now_ms: u64,
        parent: TaskId,
        stage: usize,
        output: ShardOutput,
        receipt: Signed<Receipt>,
        out: &mut Vec<Action>,
    ) -> Option<StagedOutcome> {
        let p = self.pipelines.get_mut(&parent)?;
        p.receipts.push(receipt);
        let Some(next) = p.stages.get(stage).cloned() else {
            let staged = output.digest().map(|digest| StagedReceipt {
                task: parent,
                stages: p.receipts.clone(),
                output: digest,
            });
            return Some(match staged.map(|s| Signed::sign(&self.key, &s)) {
                Ok(Ok(receipt)) => StagedOutcome::Done { output, receipt: Box::new(receipt) },
                _ => StagedOutcome::Failed("signing the staged receipt".into()),
            });
        };
        let started = crate::kind::feed(&output, &next)
            .map_err(SubmitError::Invalid)
            .and_then(|work| self.start_stage(now_ms, parent, stage + 1, next.submission(work), out));
        started.err().map(|e| StagedOutcome::Failed(format!("stage {}: {e}", stage + 1)))
    }

    fn journal_pipeline(&self, parent: TaskId, out: &mut Vec<Action>) {
        if let Some(Ok(value)) = self.pipelines.get(&parent).map(Pipeline::encode) {
            out.push(Action::Journal(vec![Write::Task { key: task_key(parent, Part::Pipeline), value }]));
        }
    }

    /// Finished staged tasks are kept like finished tasks: the oldest
    /// beyond `keep_finished` are forgotten, journal entry included.
    fn retire_pipelines(&mut self, out: &mut Vec<Action>) {
        let done = self.pipelines.values().filter(|p| p.outcome.is_some()).count();
        let Some(excess) = done.checked_sub(self.config.keep_finished).filter(|n| *n > 0) else { return };
        // Oldest first: by when they ended, then by id.
        let mut finished: Vec<(u64, TaskId)> =
            self.pipelines.iter().filter(|(_, p)| p.outcome.is_some()).map(|(id, p)| (p.ended_ms, *id)).collect();
        finished.sort();
        let mut forget = Vec::new();
        for (_, id) in finished.into_iter().take(excess) {
            if let Some(p) = self.pipelines.remove(&id) {
                for child in p.children {
                    self.parents.remove(&child);
                }
            }
            forget.push(Write::Forget { key: task_key(id, Part::Pipeline) });
        }
        out.push(Action::Journal(forget));
    }

    /// Handles one input.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Advert { peer, advert } => {
                if peer != self.me {
                    let new = !self.peers.contains_key(&peer);
                    self.peers.insert(peer, PeerEntry { advert, seen_ms: now_ms });
                    if new {
                        self.offer_to_running(now_ms, peer);
                    }
                }
            }
            Input::PeerLost(peer) => {
                self.peers.remove(&peer);
                let open: Vec<TaskId> = self.running_tasks();
                for task in open {
                    self.step(now_ms, task, requester::Event::PeerLost(peer), &mut out);
                }
            }
            Input::Message { from, message } => self.message(now_ms, from, message, &mut out),
            Input::Undelivered { to, message, attempt } => self.undelivered(now_ms, to, message, attempt, &mut out),
            Input::JobDone { job, output, compute_ms, input_tokens } => {
                self.job_done(now_ms, job, output, compute_ms, input_tokens, &mut out)
            }
            Input::ModelsReady { models, capacity } => {
                let served = models
                    .iter()
                    .map(|m| (m.weights, Served { kind: m.kind, units_per_s: speed(m, m.kind).max(0.1) }))
                    .collect();
                let worker = WorkerConfig { capacity: capacity.max(1), ..self.config.worker.clone() };
                self.worker = Some(Worker::new(worker, served));
                self.own = models;
            }
            Input::Cancel(task) => {
                if let Some(t) = self.tasks.get_mut(&task) {
                    let actions = t.requester.cancel("cancelled");
                    self.apply(now_ms, task, actions, &mut out);
                }
            }
            Input::Tick => {
                while let Some(entry) = self.timers.first_entry() {
                    if entry.key().0 > now_ms {
                        break;
                    }
                    match entry.remove() {
                        Due::Task(task, timer) => self.step(now_ms, task, requester::Event::Timer(timer), &mut out),
                        Due::Resend { to, message, attempt } => {
                            self.resends = self.resends.saturating_sub(1);
                            out.push(Action::Resend { to, message: *message, attempt });
                        }
                    }
                }
            }
        }
        self.advance_pipelines(now_ms, &mut out);
        self.refresh_load(&mut out);
        out
    }

    // ---- choosing models and peers -------------------------------------

    /// Every advert we know that is fresh, ours included, by peer.
    fn adverts(&self, now_ms: u64) -> impl Iterator<Item = (PublicKey, &[ModelAdvert], Load)> {
        let ttl = self.config.advert_ttl_ms;
        let own = std::iter::once((self.me, self.own.as_slice(), self.load));
        let peers = self
            .peers
            .iter()
            .filter(move |(_, e)| now_ms.saturating_sub(e.seen_ms) <= ttl)
            .map(|(p, e)| (*p, e.advert.models.as_slice(), e.advert.load));
        own.chain(peers)
    }

    /// The model a task runs on: the one named (or any of `kind`), able to
    /// take `tools` if the work offers some, with the most throughput.
    fn choose_model(&self, now_ms: u64, kind: ModelKind, want: Option<&str>, tools: bool) -> Option<(Digest, String)> {
        let min = self.config.auction.min_reputation;
        // Weights digest -> (throughput from peers in good standing, id).
        let mut options: BTreeMap<Digest, (f64, String)> = BTreeMap::new();
        for (peer, models, _) in self.adverts(now_ms) {
            let reputation = if peer == self.me { 1.0 } else { self.reputation(now_ms, &peer) };
            let fits =
                |m: &&ModelAdvert| m.kind == kind && want.is_none_or(|w| model_matches(w, m)) && (m.tools || !tools);
            for m in models.iter().filter(fits) {
                let entry = options.entry(m.weights).or_insert((0.0, m.id.clone()));
                if reputation >= min {
                    entry.0 += f64::from(speed(m, kind)) * reputation;
                }
            }
        }
        // The best throughput; among equals the smallest digest (BTreeMap
        // order, and `max_by` keeps the last of equals, so iterate reversed).
        options.into_iter().rev().max_by(|a, b| a.1.0.total_cmp(&b.1.0)).map(|(digest, (_, id))| (digest, id))
    }

    fn candidates(&self, now_ms: u64, weights: &Digest, kind: ModelKind) -> Vec<Candidate> {
        self.adverts(now_ms)
            .filter_map(|(peer, models, load)| {
                let m = models.iter().find(|m| m.weights == *weights)?;
                Some(Candidate {
                    peer,
                    units_per_s: speed(m, kind),
                    load: load.queued_shards as f32 / load.capacity.max(1) as f32,
                    reputation: self.reputation(now_ms, &peer),
                })
            })
            .collect()
    }

    /// What a prompt token costs in generated tokens on these weights: the
    /// median over their adverts of decode speed over prefill speed (both
    /// measured by each node at load), or [`PREFILL_WEIGHT`] where none says.
    fn prefill_weight(&self, now_ms: u64, weights: &Digest) -> f64 {
        let mut ratios: Vec<f64> = self
            .adverts(now_ms)
            .filter_map(|(_, models, _)| models.iter().find(|m| m.weights == *weights))
            .map(|m| (f64::from(m.throughput.decode_tokens_per_s), f64::from(m.throughput.prefill_tokens_per_s)))
            .filter(|(decode, prefill)| decode.is_finite() && prefill.is_finite() && *decode > 0.0 && *prefill > 0.0)
            .map(|(decode, prefill)| (decode / prefill).min(1.0))
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios.get(ratios.len() / 2).copied().unwrap_or(PREFILL_WEIGHT)
    }

    // ---- requester side --------------------------------------------------

    /// A peer that just joined becomes a candidate of every running task
    /// whose weights it serves: their next CFP goes to it directly.
    fn offer_to_running(&mut self, now_ms: u64, peer: PublicKey) {
        let reputation = self.reputation(now_ms, &peer);
        let Some(entry) = self.peers.get(&peer) else { return };
        for t in self.tasks.values_mut().filter(|t| t.outcome.is_none()) {
            let (model, kind) = (t.requester.model(), t.requester.model_kind());
            if let Some(m) = entry.advert.models.iter().find(|m| m.weights == model) {
                let load = &entry.advert.load;
                t.requester.add_candidate(Candidate {
                    peer,
                    units_per_s: speed(m, kind),
                    load: load.queued_shards as f32 / load.capacity.max(1) as f32,
                    reputation,
                });
            }
        }
    }

    fn running_tasks(&self) -> Vec<TaskId> {
        self.tasks.iter().filter(|(_, t)| t.outcome.is_none()).map(|(id, _)| *id).collect()
    }

    fn step(&mut self, now_ms: u64, task: TaskId, event: requester::Event, out: &mut Vec<Action>) {
        let Some(t) = self.tasks.get_mut(&task) else { return };
        let actions = t.requester.handle(now_ms, event);
        self.apply(now_ms, task, actions, out);
    }

    /// Carries out a requester's actions: journal, sign and send, timers,
    /// the reputation book, completion.
    fn apply(&mut self, now_ms: u64, task: TaskId, actions: Vec<requester::Action>, out: &mut Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let mut queue: VecDeque<requester::Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                requester::Action::Persist => {
                    if !self.journal(task, out) {
                        return;
                    }
                }
                requester::Action::SendCfp { to, gossip, cfp } => {
                    let Ok(signed) = Signed::sign(&self.key, &cfp) else { continue };
                    let Some(t) = self.tasks.get_mut(&task) else { return };
                    t.cfp_sent_ms = Some(now_ms);
                    // Bids must name this CFP's digest: journaled before it leaves.
                    if !t.requester.cfp_signed(cfp.round, signed.digest()).is_empty() && !self.journal(task, out) {
                        return;
                    }
                    if cfp.round > 1 {
                        out.push(Action::Metric(Metric::Reauction));
                    }
                    for peer in to {
                        out.push(Action::Send { to: peer, message: Market::Cfp(signed.clone()) });
                    }
                    if gossip {
                        out.push(Action::Metric(Metric::CfpGossiped));
                        out.push(Action::Gossip(signed));
                    }
                }
                requester::Action::SendAward { to, award } => {
                    if let Some(t) = self.tasks.get_mut(&task)
                        && let Some(sent) = t.cfp_sent_ms.take()
                    {
                        let took = now_ms.saturating_sub(sent);
                        t.auction_ms.push(took);
                        out.push(Action::Metric(Metric::AuctionLatencyMs(took)));
                    }
                    if let Ok(signed) = Signed::sign(&self.key, &award) {
                        out.push(Action::Send { to, message: Market::Award(signed) });
                    }
                }
                requester::Action::Ack { to, ack } => {
                    if let Ok(signed) = Signed::sign(&self.key, &ack) {
                        out.push(Action::Send { to, message: Market::Ack(signed) });
                    }
                }
                requester::Action::SetTimer { at_ms, timer } => {
                    self.timer_seq += 1;
                    self.timers.insert((at_ms, self.timer_seq), Due::Task(task, timer));
                }
                requester::Action::Penalise { peer, .. } => {
                    out.push(Action::Metric(Metric::VerificationFailure));
                    self.judge(now_ms, peer, true, out);
                }
                requester::Action::Reward { peer } => self.judge(now_ms, peer, false, out),
                requester::Action::Complete { output, receipt } => {
                    let Some(t) = self.tasks.get(&task) else { return };
                    let outcome = self.signed_outcome(&t.requester, output, &receipt);
                    self.finish(task, outcome, out);
                }
                requester::Action::Fail { reason } => self.finish(task, Outcome::Failed(reason), out),
            }
        }
        out.push(Action::Progress(task));
    }

    /// Journals a task's state; a task whose state cannot be stored fails,
    /// since nothing that depends on it may leave. `false` then.
    fn journal(&mut self, task: TaskId, out: &mut Vec<Action>) -> bool {
        let Some(t) = self.tasks.get_mut(&task) else { return false };
        match t.requester.journal() {
            Ok(entry) => {
                let mut writes = vec![Write::Task { key: task_key(task, Part::Head), value: entry.head }];
                if let Some(plan) = entry.plan {
                    writes.push(Write::Task { key: task_key(task, Part::Plan), value: plan });
                }
                for (index, value) in entry.shards {
                    writes.push(Write::Task { key: task_key(task, Part::Shard(index)), value });
                }
                out.push(Action::Journal(writes));
                true
            }
            Err(e) => {
                if let Some(t) = self.tasks.get_mut(&task) {
                    let _ = t.requester.cancel("the journal refused the task");
                }
                self.finish(task, Outcome::Failed(format!("journal: {e}")), out);
                false
            }
        }
    }

    fn signed_outcome(&self, requester: &Requester, output: ShardOutput, receipt: &Receipt) -> Outcome {
        match Signed::sign(&self.key, receipt) {
            Ok(signed) => Outcome::Done { output, receipt: Box::new(signed), input_tokens: requester.input_tokens() },
            Err(e) => Outcome::Failed(format!("signing the receipt: {e}")),
        }
    }

    /// A fault (halved) or a valid result (earned back), journaled.
    fn judge(&mut self, now_ms: u64, peer: PublicKey, fault: bool, out: &mut Vec<Action>) {
        let r = self.book.entry(peer).or_default();
        if fault {
            r.fault(now_ms);
        } else {
            r.valid(now_ms);
        }
        out.push(Action::Journal(vec![Write::Reputation(peer, r.to_bytes())]));
    }

    /// Records how a task ended, drops its timers, and forgets the oldest
    /// finished tasks beyond what the node keeps.
    fn finish(&mut self, task: TaskId, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(t) = self.tasks.get_mut(&task) else { return };
        t.outcome = Some(outcome);
        t.cfp_sent_ms = None;
        if self.parents.contains_key(&task) {
            self.just_finished.push(task);
        }
        self.timers.retain(|_, due| !matches!(due, Due::Task(owner, _) if *owner == task));
        self.streaming.retain(|(owner, _), _| *owner != task);
        if !self.finished.contains(&task) {
            self.finished.push_back(task);
        }
        let mut forget = Vec::new();
        while self.finished.len() > self.config.keep_finished {
            let Some(old) = self.finished.pop_front() else { break };
            let shards = self.tasks.remove(&old).map_or(0, |t| t.requester.shard_count());
            forget.push(Write::Forget { key: task_key(old, Part::Head) });
            forget.push(Write::Forget { key: task_key(old, Part::Plan) });
            for index in 0..shards as u32 {
                forget.push(Write::Forget { key: task_key(old, Part::Shard(index)) });
            }
        }
        if !forget.is_empty() {
            out.push(Action::Journal(forget));
        }
    }

    // ---- messages --------------------------------------------------------

    fn message(&mut self, now_ms: u64, from: PublicKey, message: Market, out: &mut Vec<Action>) {
        match message {
            Market::Cfp(signed) => self.on_cfp(now_ms, from, signed, out),
            Market::Bid(signed) => {
                // Routed by what the payload says; the signature is checked
                // once, in `Event::bid`.
                if let Ok(bid) = <Bid as Wire>::decode(signed.payload()) {
                    let reputation = self.reputation(now_ms, &from);
                    self.step(now_ms, bid.task, requester::Event::bid(from, signed, reputation), out);
                }
            }
            Market::Award(signed) => self.on_award(now_ms, from, signed, out),
            Market::Result(result) => {
                if let Ok(claim) = <ResultClaim as Wire>::decode(result.claim.payload()) {
                    self.step(now_ms, claim.task, requester::Event::result(from, result), out);
                }
            }
            Market::Refuse { task, shard } => self.step(now_ms, task, requester::Event::Refused { from, shard }, out),
            Market::Partial { task, shard, item, text } => {
                let Some(t) = self.tasks.get(&task) else { return };
                if !t.requester.is_running(shard, &from) {
                    return;
                }
                // A redundant copy streams too: one voice per item.
                if *self.streaming.entry((task, item)).or_insert(from) == from {
                    out.push(Action::Text { task, item, text });
                }
            }
            // Acks are informational; other kinds are not the market's.
            _ => {}
        }
    }

    /// A message that did not arrive. Awards, results, acks and refusals
    /// are tried again after 100, 200 and 400 ms (the peer may be busy or
    /// reconnecting; a lost result costs the whole shard); bids and CFPs
    /// are not (their auction moves on without them). Once given up, an
    /// award's shards go to someone else; a result is left to the
    /// requester's deadline.
    fn undelivered(&mut self, now_ms: u64, to: PublicKey, message: Market, attempt: u32, out: &mut Vec<Action>) {
        let worth_retrying =
            matches!(message, Market::Award(_) | Market::Result(_) | Market::Ack(_) | Market::Refuse { .. });
        if worth_retrying && attempt < RESENDS && self.resends < PENDING_RESENDS {
            self.timer_seq += 1;
            self.resends += 1;
            let at = now_ms.saturating_add(RESEND_AFTER_MS << attempt);
            self.timers
                .insert((at, self.timer_seq), Due::Resend { to, message: Box::new(message), attempt: attempt + 1 });
            return;
        }
        if let Market::Award(signed) = message
            && let Ok(award) = signed.verify()
        {
            for s in award.shards {
                self.step(now_ms, award.task, requester::Event::Refused { from: to, shard: s.shard }, out);
            }
        }
    }

    // ---- worker side -----------------------------------------------------

    fn on_cfp(&mut self, now_ms: u64, from: PublicKey, signed: Signed<mycel_protocol::Cfp>, out: &mut Vec<Action>) {
        if *signed.signer() != from {
            return;
        }
        let Some(worker) = self.worker.as_mut() else { return };
        let Some(bid) = worker.on_cfp(now_ms, &signed) else { return };
        if let Ok(signed_bid) = Signed::sign(&self.key, &bid) {
            worker.bid_signed(&signed_bid);
            out.push(Action::Metric(Metric::BidSent));
            out.push(Action::Send { to: from, message: Market::Bid(signed_bid) });
        }
    }

    fn on_award(&mut self, now_ms: u64, from: PublicKey, signed: Signed<mycel_protocol::Award>, out: &mut Vec<Action>) {
        let Ok(award) = signed.verify_from(&from) else { return };
        let Some(worker) = self.worker.as_mut() else { return };
        match worker.on_award(now_ms, from, &award, signed.digest()) {
            AwardOutcome::Duplicate => {}
            AwardOutcome::Run(jobs) => {
                out.push(Action::Metric(Metric::BidWon));
                out.extend(jobs.into_iter().map(Action::Execute));
            }
            AwardOutcome::Refuse(_) => {
                for s in &award.shards {
                    out.push(Action::Send { to: from, message: Market::Refuse { task: award.task, shard: s.shard } });
                }
            }
        }
    }

    fn job_done(
        &mut self,
        now_ms: u64,
        job: Job,
        output: Result<ShardOutput, String>,
        compute_ms: u32,
        input_tokens: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(worker) = self.worker.as_mut() else { return };
        let refuse = Action::Send { to: job.requester, message: Market::Refuse { task: job.task, shard: job.shard } };
        let Ok(output) = output else {
            worker.forget(job.task, job.shard);
            out.push(refuse);
            return;
        };
        if let Some(m) = self.own.iter().find(|m| m.weights == job.model) {
            let tokens = match &output {
                ShardOutput::Generations(g) => g.iter().map(|g| u64::from(g.tokens)).sum(),
                _ => 0,
            };
            out.push(Action::Metric(Metric::Inference {
                model: m.id.clone(),
                items: output.items() as u64,
                tokens,
                compute_ms,
            }));
        }
        let output = match self.config.fault {
            Some(fault) if fault.lies_about(&job) => perturb(output),
            Some(Fault::Silent) => {
                // Gone quiet: the work is done and nobody hears of it.
                worker.forget(job.task, job.shard);
                return;
            }
            _ => output,
        };
        let Some(claim) = worker.on_done(now_ms, &job, Done { output: &output, compute_ms, input_tokens }) else {
            out.push(refuse);
            return;
        };
        let Ok(signed) = Signed::sign(&self.key, &claim) else {
            out.push(refuse);
            return;
        };
        let claim = match self.config.fault {
            Some(Fault::Forge) => {
                let mut bad = *signed.signature();
                bad.0[0] ^= 0x01;
                Signed::from_parts(*signed.signer(), bad, signed.payload().to_vec())
            }
            _ => signed,
        };
        out.push(Action::Send { to: job.requester, message: Market::Result(ShardResult { claim, output }) });
    }

    fn refresh_load(&mut self, out: &mut Vec<Action>) {
        let Some(worker) = &self.worker else { return };
        let load = worker.load();
        if load != self.load {
            self.load = load;
            out.push(Action::Load(load));
        }
    }
}

impl Task {
    fn new(requester: Requester, label: String, model: String) -> Self {
        Self { requester, label, model, outcome: None, auction_ms: Vec::new(), cfp_sent_ms: None }
    }
}

/// What a prompt token costs in generated tokens where no advert says:
/// Qwen2.5-Coder-0.5B measured 61.5 tokens/s decoding against 209 prefilling
/// (BENCHMARKS.md), about 0.3.
const PREFILL_WEIGHT: f64 = 0.3;

/// A model's advertised speed in the units its kind's work is planned in.
fn speed(m: &ModelAdvert, kind: ModelKind) -> f32 {
    match kind {
        ModelKind::Embedding => m.throughput.embeddings_per_s,
        _ => m.throughput.decode_tokens_per_s,
    }
}

/// Whether `work` offers the model tools or carries their calls and
/// results: it then needs a model whose chat template has a tool format.
fn uses_tools(work: &Work) -> bool {
    match work {
        Work::Chat { conversations, params } => {
            !params.tools.is_empty()
                || conversations
                    .iter()
                    .flatten()
                    .any(|t| t.role == mycel_protocol::Role::Tool || !t.tool_calls.is_empty())
        }
        _ => false,
    }
}

/// Whether `want` (from a user) names advert `m`: its id (any case, with or
/// without an organisation prefix like `sentence-transformers/`) or its
/// weights digest.
pub fn model_matches(want: &str, m: &ModelAdvert) -> bool {
    want.eq_ignore_ascii_case(&m.id) || mycel_protocol::advert::ModelKey::named(want).matches(m)
}

/// A wrong answer that looks right: every other component of each vector
/// negated (cosine far below any agreement threshold), answers reversed.
fn perturb(output: ShardOutput) -> ShardOutput {
    match output {
        ShardOutput::Embeddings { dimensions, mut values } => {
            for v in values.iter_mut().step_by(2) {
                *v = -*v;
            }
            ShardOutput::Embeddings { dimensions, values }
        }
        ShardOutput::Generations(mut answers) => {
            for a in &mut answers {
                a.text = a.text.chars().rev().collect();
            }
            ShardOutput::Generations(answers)
        }
        other => other,
    }
}

fn hex_short(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
