//! One task, from the requester's side: call for proposals, collect signed
//! bids, award shards, verify signed results, re-auction what fails, and
//! put the outputs together with a receipt.
//!
//! The life of a shard:
//!
//! ```text
//! Open --award--> Running { executors } --k agreeing results--> Done
//!   ^                  |  timeout / peer lost / refused
//!   +------------------+  (the executor is dropped; the shard is re-awarded)
//! ```
//!
//! A shard is run by `redundancy` distinct peers; their outputs are compared
//! (embeddings by cosine, generations exactly). When they disagree a
//! tie-breaker peer runs it too and the majority wins; the peers outvoted
//! are reported ([`Action::Penalise`]). The first valid result of a shard
//! run once completes it; anything after that is answered
//! `AlreadyComplete`, so every shard completes exactly once.
//!
//! Time is whatever the driver says it is (`now_ms` in every event).

use std::collections::{BTreeMap, BTreeSet};

use mycel_protocol::{
    Aggregation, Award, AwardedShard, Bid, Cfp, Digest, ModelKind, PublicKey, Receipt, RejectReason, ResultAck,
    ResultClaim, ShardOutput, ShardResult, Signed, TaskId, TaskSpec, Verdict, Verified, VerifiedResult, Wire, limits,
    merkle, spot,
};
use serde::{Deserialize, Serialize};

use crate::kind::{self, Check, TaskKind};
use crate::plan::{self, Plan, PlanError, PlannedShard};

/// Most executions of one shard (redundancy plus tie-breakers).
const MAX_EXECUTIONS: usize = limits::MAX_REDUNDANCY as usize + 2;

/// Open shards a CFP lists (about 50 bytes each encoded).
const CFP_SHARDS: usize = 256;

/// Tuning of the auction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// How long bids are collected.
    pub bid_window_ms: u64,
    /// Close the bid window early once this many bids are in.
    pub enough_bids: usize,
    /// CFPs go directly to at most this many candidates.
    pub fanout: usize,
    /// With fewer known candidates than this, the CFP is also gossiped.
    pub min_direct: usize,
    /// Rounds of CFPs without any usable bid before the task fails.
    pub max_rounds: u32,
    /// A shard's deadline: its expected time times this, plus `grace_ms`.
    pub deadline_factor: f64,
    /// A shard still running after its expected time times this gets a
    /// backup copy on a free bidder; the first valid result wins.
    pub straggler_factor: f64,
    /// Added to every shard deadline (transfer, queueing).
    pub grace_ms: u64,
    /// Cosine at or above which two embedding outputs agree.
    pub min_cosine: f64,
    /// Peers below this reputation get no work.
    pub min_reputation: f64,
    /// Time a task may take when its spec says 0: past it the task fails
    /// with that reason, whatever is still out.
    pub default_deadline_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bid_window_ms: 500,
            enough_bids: 8,
            fanout: 16,
            min_direct: 3,
            max_rounds: 5,
            deadline_factor: 4.0,
            straggler_factor: 2.0,
            grace_ms: 5_000,
            min_cosine: 0.999,
            min_reputation: 0.2,
            default_deadline_ms: 30 * 60_000,
        }
    }
}

/// A peer the capability table says serves the task's model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Its key.
    pub peer: PublicKey,
    /// Advertised units per second on this model.
    pub units_per_s: f32,
    /// Queued shards over capacity, from its advert.
    pub load: f32,
    /// Its reputation, 0..=1.
    pub reputation: f64,
}

/// The peers able to run a task, as the capability table describes them.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    /// Who serves the task's weights.
    pub candidates: Vec<Candidate>,
    /// What a prompt token costs in generated tokens on them (their decode
    /// speed over their prefill speed; see [`crate::kind::TaskKind::units`]).
    pub prefill_weight: f64,
}

/// Something that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A bid arrived from `from` (the authenticated sender), its signature
    /// checked where it entered; `reputation` is the bidder's standing in
    /// the node's book now (a stranger's default for a peer never seen).
    Bid { from: PublicKey, bid: Box<Verified<Bid>>, reputation: f64 },
    /// A shard result arrived from `from`, its claim's signature checked.
    Result { from: PublicKey, result: Box<VerifiedResult> },
    /// A bid or result from `from` that failed its signature check. `shard`
    /// is what an unverified claim names and `claim` its envelope's digest:
    /// used only to answer the sender and free it from that shard at once,
    /// which can harm nobody else.
    Forged { from: PublicKey, shard: Option<u32>, claim: Option<Digest> },
    /// A worker turned an award down, or could not be reached.
    Refused { from: PublicKey, shard: u32 },
    /// A peer's advert expired: it may be gone, or only its adverts may
    /// have stopped reaching us (a gossip hub died) while it works on.
    PeerLost(PublicKey),
    /// A timer set by [`Action::SetTimer`] fired.
    Timer(Timer),
}

impl Event {
    /// A bid as it arrived: its signature is checked here, once.
    pub fn bid(from: PublicKey, bid: Signed<Bid>, reputation: f64) -> Self {
        match bid.into_verified() {
            Ok(bid) => Event::Bid { from, bid: Box::new(bid), reputation },
            Err(_) => Event::Forged { from, shard: None, claim: None },
        }
    }

    /// A result as it arrived: its claim's signature is checked here, once.
    pub fn result(from: PublicKey, result: ShardResult) -> Self {
        let claim = result.claim.digest();
        let shard = ResultClaim::decode(result.claim.payload()).ok().map(|c| c.shard);
        match result.into_verified() {
            Ok(result) => Event::Result { from, result: Box::new(result) },
            Err(_) => Event::Forged { from, shard, claim: Some(claim) },
        }
    }
}

/// The pause in awards to a peer after its first refusal; it doubles with
/// each further one.
const REFUSAL_PAUSE_MS: u64 = 500;
/// The longest such pause.
const MAX_REFUSAL_PAUSE_MS: u64 = 60_000;

/// Timers the requester asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Timer {
    /// The bid window of a round closes.
    BidsClose { round: u32 },
    /// A shard's executor is late. `since_ms` names the award it times
    /// (when it was made): a timer of an earlier award to the same peer is
    /// stale.
    ShardDeadline { shard: u32, peer: PublicKey, since_ms: u64 },
    /// A shard's executor is slower than expected: time for a backup copy.
    Straggler { shard: u32, peer: PublicKey, since_ms: u64 },
    /// The whole task's time is up.
    TaskDeadline,
    /// Peers paused after giving work back may be awarded again.
    Resume,
    /// Rounds ran out while a late executor may still deliver: time to ask
    /// once more whether anyone else can run the open shards.
    Reopen,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Store the requester's state (see [`Requester::snapshot`]) before
    /// doing anything after this.
    Persist,
    /// Sign this CFP once, send it to these peers directly and, when
    /// `gossip` (too few candidates known, or a round without bids),
    /// publish it on the CFP topic too.
    SendCfp { to: Vec<PublicKey>, gossip: bool, cfp: Cfp },
    /// Send this award to its winner.
    SendAward { to: PublicKey, award: Award },
    /// Answer a result (the driver signs the ack).
    Ack { to: PublicKey, ack: ResultAck },
    /// Fire [`Event::Timer`] at this time.
    SetTimer { at_ms: u64, timer: Timer },
    /// A peer did something wrong: lower its reputation.
    Penalise { peer: PublicKey, reason: RejectReason },
    /// A peer delivered a valid result: raise its reputation.
    Reward { peer: PublicKey },
    /// The task is done: the output in item order and the receipt to sign.
    Complete { output: ShardOutput, receipt: Receipt },
    /// The task cannot be completed.
    Fail { reason: String },
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for bids.
    Bidding,
    /// Shards out; re-auctions as needed.
    Running,
    /// All shards done.
    Done,
    /// Gave up.
    Failed,
}

/// One shard's progress.
///
/// Journaled on its own, without its plan (written once for the task), and
/// only when it changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardState {
    #[serde(skip)]
    plan: PlannedShard,
    /// Peers running it now.
    running: BTreeSet<PublicKey>,
    /// Peers that failed or lied on it: never asked again.
    excluded: BTreeSet<PublicKey>,
    /// Valid results so far, by executor. Boxed: a map of one or two
    /// entries still allocates a node of eleven slots, and a result is
    /// ~350 bytes, so unboxed each shard carried ~4 KB of empty slots
    /// (measured in `mycel sim`). Serialised the same either way.
    results: BTreeMap<PublicKey, Box<VerifiedResult>>,
    /// Executions wanted: the task's redundancy, plus tie-breakers, plus
    /// one for a spot check.
    wanted: usize,
    /// Picked for a spot check: one execution more than the redundancy,
    /// compared like redundant ones, given up if no other peer can run it.
    spot: bool,
    /// Whose result was accepted, once decided (it stays in `results`, so
    /// the journal holds each output once).
    accepted: Option<PublicKey>,
}

/// Shards whose input another shard repeats, by input digest.
fn copies(shards: &[ShardState]) -> BTreeMap<Digest, Vec<u32>> {
    let mut by_input: BTreeMap<Digest, Vec<u32>> = BTreeMap::new();
    for s in shards {
        by_input.entry(s.plan.input).or_default().push(s.plan.index);
    }
    by_input.retain(|_, shards| shards.len() > 1);
    by_input
}

impl ShardState {
    /// The accepted result, once decided.
    fn done(&self) -> Option<&VerifiedResult> {
        self.accepted.as_ref().and_then(|p| self.results.get(p)).map(|r| &**r)
    }
}

/// A standing offer from a worker for this task.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offer {
    bid: Bid,
    digest: Digest,
    reputation: f64,
}

/// The requester's state for one task. Serializable: this is what the
/// journal stores, in three parts ([`Requester::journal`]): this head,
/// the plan once, and each shard's progress when it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Requester {
    task: TaskId,
    spec_digest: Digest,
    model: Digest,
    kind: ModelKind,
    config: Config,
    phase: Phase,
    round: u32,
    /// Digest of the current round's CFP, once the driver has signed it.
    cfp: Option<Digest>,
    #[serde(skip)]
    shards: Vec<ShardState>,
    /// Shards changed since the last journal write; whether the plan was
    /// written.
    #[serde(skip)]
    dirty: BTreeSet<u32>,
    #[serde(skip)]
    plan_journaled: bool,
    offers: BTreeMap<PublicKey, Offer>,
    candidates: Vec<Candidate>,
    /// Shards each peer runs now.
    busy: BTreeMap<PublicKey, BTreeSet<u32>>,
    /// Peers caught lying or forging on this task: no more of its work.
    banned: BTreeSet<PublicKey>,
    /// Peers that gave shards back ("busy after all"): how many times, and
    /// until when they get no new award. A refusal is no fault and keeps
    /// no peer off a shard, but each one doubles the pause (from
    /// [`REFUSAL_PAUSE_MS`] up to [`MAX_REFUSAL_PAUSE_MS`]), so a busy peer
    /// is asked less often and one that bids and never runs costs a round a
    /// minute at most. Not journaled: a restart forgives.
    #[serde(skip)]
    refusals: BTreeMap<PublicKey, (u32, u64)>,
    /// When each running copy was awarded: a shard given back and awarded
    /// again to the same peer must not be cut short by the first award's
    /// timers. Not journaled: a restart sets fresh timers.
    #[serde(skip)]
    awarded_ms: BTreeMap<(u32, PublicKey), u64>,
    /// Executors taken off a shard for missing its deadline, with what
    /// their execution would cost. Late is not wrong: a loaded machine
    /// finishes late, and when its result comes before anyone else's it is
    /// accepted (and paid for, so the charge still counts against the
    /// budget), without penalty; the penalty comes when another's result
    /// decides the shard first or the task fails. While one is awaited the
    /// task does not give up for want of bids. Not journaled: after a
    /// restart their results are answered as late.
    #[serde(skip)]
    late: BTreeMap<(u32, PublicKey), u64>,
    /// Executors taken off a shard because their adverts stopped, with
    /// what their execution would cost. Silence is no proof of death: a
    /// result that still comes is accepted (and paid for, if the budget
    /// still has room) without penalty, but nothing waits for it. Not
    /// journaled, like `late`.
    #[serde(skip)]
    lost: BTreeMap<(u32, PublicKey), u64>,
    rounds_without_bids: u32,
    /// Most the task may spend (micro-credits), what accepted executions
    /// cost so far, and what each running one will cost, by (shard, peer).
    budget_micros: Option<u64>,
    spent_micros: u64,
    charges: BTreeMap<(u32, PublicKey), u64>,
    /// How redundant copies are compared, and shard outputs combined.
    check: Check,
    aggregation: Aggregation,
    /// The secret spot checks are drawn from ([`mycel_protocol::spot`]):
    /// committed to in every CFP, revealed in the receipt.
    spot_secret: [u8; 32],
    spot_permille: u16,
    /// Time the task may take (its spec's, or the default), and when that
    /// runs out, once started.
    deadline_ms: u64,
    deadline_at_ms: Option<u64>,
    /// When it completed (the receipt's time), or why it failed.
    completed_ms: Option<u64>,
    failure: Option<String>,
    /// Shards whose input another shard repeats (an ensemble's samples of
    /// one prompt), by input digest: such copies go to different peers
    /// where there are. Rebuilt from the plan, not journaled.
    #[serde(skip)]
    copies: BTreeMap<Digest, Vec<u32>>,
}

// The journal stores the requester with the protocol's codec, in parts: the
// head (small: offers, candidates, phase), the plan (the task's input, once)
// and each shard's progress (its results).
mycel_protocol::wire!(Requester, limits::TASK_SPEC);

/// The plan as journaled.
#[derive(Debug, Serialize, Deserialize)]
struct PlanRecord(Vec<PlannedShard>);
mycel_protocol::wire!(PlanRecord, limits::TASK_SPEC);

// One shard's progress: up to every execution's output.
mycel_protocol::wire!(ShardState, limits::SHARD_RESULT * (MAX_EXECUTIONS + 1));

/// What changed in a requester since its last journal write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The head: always written (small).
    pub head: Vec<u8>,
    /// The plan: written once, with the first entry.
    pub plan: Option<Vec<u8>>,
    /// Each changed shard's progress, by index.
    pub shards: Vec<(u32, Vec<u8>)>,
}

/// Why journaled parts could not be read back into a requester.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A part did not decode.
    #[error(transparent)]
    Decode(#[from] mycel_protocol::DecodeError),
    /// A part is missing.
    #[error("the journal has no {0}")]
    Missing(String),
}

/// Why a task could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The spec could not be hashed.
    #[error("encoding the task: {0}")]
    Encode(#[from] mycel_protocol::EncodeError),
    /// The task's kind cannot combine its outputs as asked.
    #[error("{kind} tasks cannot be combined by {aggregation:?}")]
    Aggregation { kind: &'static str, aggregation: Aggregation },
    /// The plan needs more shards than one CFP may list.
    #[error("{0} shards is more than a task may have")]
    TooManyShards(usize),
}

impl Requester {
    /// Plans a task for `model` (already pinned to one digest) among the
    /// pool's candidates. `spot_secret` is fresh randomness, known only to
    /// this requester until the receipt reveals it.
    pub fn new(
        task: TaskId,
        spec: &TaskSpec,
        model: Digest,
        kind: ModelKind,
        Pool { candidates, prefill_weight }: Pool,
        config: Config,
        spot_secret: [u8; 32],
    ) -> Result<Self, StartError> {
        let speeds: Vec<f32> = candidates.iter().map(|c| c.units_per_s).collect();
        let Plan { shards } = plan::plan(&spec.work, spec.split, &speeds, prefill_weight)?;
        if shards.len() > limits::SHARDS_PER_TASK {
            return Err(StartError::TooManyShards(shards.len()));
        }
        let wanted = usize::from(spec.redundancy.clamp(1, limits::MAX_REDUNDANCY));
        let deadline_ms = if spec.deadline_ms == 0 { config.default_deadline_ms } else { spec.deadline_ms };
        let task_kind = kind::of(&spec.work);
        if !task_kind.combines(spec.aggregation) {
            return Err(StartError::Aggregation { kind: task_kind.name(), aggregation: spec.aggregation });
        }
        let check = task_kind.check(&spec.work, config.min_cosine);
        let shards: Vec<ShardState> = shards
            .into_iter()
            .map(|plan| {
                // A sample is one answer of many: nothing to compare it with.
                let spot =
                    check != Check::Independent && spot::checked(&spot_secret, plan.index, spec.spot_check_permille);
                ShardState {
                    plan,
                    running: BTreeSet::new(),
                    excluded: BTreeSet::new(),
                    results: BTreeMap::new(),
                    wanted: wanted + usize::from(spot),
                    spot,
                    accepted: None,
                }
            })
            .collect();
        Ok(Self {
            copies: copies(&shards),
            task,
            spec_digest: Digest::of(&spec.encode()?),
            model,
            kind,
            config,
            phase: Phase::Bidding,
            round: 0,
            cfp: None,
            dirty: (0..shards.len() as u32).collect(),
            plan_journaled: false,
            shards,
            offers: BTreeMap::new(),
            candidates,
            busy: BTreeMap::new(),
            refusals: BTreeMap::new(),
            awarded_ms: BTreeMap::new(),
            late: BTreeMap::new(),
            lost: BTreeMap::new(),
            banned: BTreeSet::new(),
            rounds_without_bids: 0,
            spot_secret,
            spot_permille: spec.spot_check_permille,
            check,
            aggregation: spec.aggregation,
            budget_micros: spec.budget_micros,
            spent_micros: 0,
            charges: BTreeMap::new(),
            deadline_ms,
            deadline_at_ms: None,
            completed_ms: None,
            failure: None,
        })
    }

    /// What changed since the last call, encoded for the journal: the
    /// head always, the plan the first time, and the shards that changed.
    /// A 10,000-text task writes one shard's results per result instead of
    /// every shard's.
    pub fn journal(&mut self) -> Result<JournalEntry, mycel_protocol::EncodeError> {
        let head = self.encode()?;
        let plan = if self.plan_journaled {
            None
        } else {
            Some(PlanRecord(self.shards.iter().map(|s| s.plan.clone()).collect()).encode()?)
        };
        let mut shards = Vec::with_capacity(self.dirty.len());
        for index in &self.dirty {
            if let Some(state) = self.shards.get(*index as usize) {
                shards.push((*index, state.encode()?));
            }
        }
        self.plan_journaled = true;
        self.dirty.clear();
        Ok(JournalEntry { head, plan, shards })
    }

    /// A requester back from its journaled parts (see [`Self::journal`]).
    pub fn from_journal(head: &[u8], plan: &[u8], shards: &[(u32, Vec<u8>)]) -> Result<Self, JournalError> {
        let mut requester = Self::decode(head)?;
        let PlanRecord(plan) = PlanRecord::decode(plan)?;
        let progress: BTreeMap<u32, &Vec<u8>> = shards.iter().map(|(i, b)| (*i, b)).collect();
        requester.shards = Vec::with_capacity(plan.len());
        for (index, planned) in plan.into_iter().enumerate() {
            let bytes = progress.get(&(index as u32)).ok_or_else(|| JournalError::Missing(format!("shard {index}")))?;
            let mut state = ShardState::decode(bytes)?;
            state.plan = planned;
            requester.shards.push(state);
        }
        requester.plan_journaled = true;
        requester.copies = copies(&requester.shards);
        Ok(requester)
    }

    /// The weights it runs on, and their kind.
    pub fn model(&self) -> Digest {
        self.model
    }

    /// The kind of model it needs.
    pub fn model_kind(&self) -> ModelKind {
        self.kind
    }

    /// A peer that joined after the task was planned: asked directly from
    /// the next round on. (Its state goes to the journal with the next
    /// change; lost in a crash, it is found again by its next advert.)
    pub fn add_candidate(&mut self, candidate: Candidate) {
        if !self.candidates.iter().any(|c| c.peer == candidate.peer) {
            self.candidates.push(candidate);
        }
    }

    /// The task.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Shards in the plan.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shards decided.
    pub fn shards_done(&self) -> usize {
        self.shards.iter().filter(|s| s.done().is_some()).count()
    }

    /// Who ran each decided shard (the accepted result's signer), by shard.
    pub fn executors(&self) -> Vec<Option<PublicKey>> {
        self.shards.iter().map(|s| s.done().map(|r| *r.claim.signer())).collect()
    }

    /// `embed`, `generate` or `chat`.
    pub fn kind_name(&self) -> &'static str {
        self.task_kind().name()
    }

    /// The kind of work: how it splits, checks and combines.
    fn task_kind(&self) -> &'static dyn TaskKind {
        // A task has at least one item, so at least one shard.
        self.shards.first().map_or(&kind::embed::Embed, |s| kind::of(&s.plan.work))
    }

    /// Peers running at least one of its shards now.
    pub fn peers_working(&self) -> usize {
        self.busy.values().filter(|shards| !shards.is_empty()).count()
    }

    /// Whether `peer` is running `shard` now (so text it streams for the
    /// shard is worth showing).
    pub fn is_running(&self, shard: u32, peer: &PublicKey) -> bool {
        self.shards.get(shard as usize).is_some_and(|s| s.running.contains(peer))
    }

    /// When the task completed (ms since the Unix epoch); `None` while it
    /// runs and for a failed task.
    pub fn completed_ms(&self) -> Option<u64> {
        self.completed_ms
    }

    /// Input tokens over the accepted results, as their workers signed them.
    pub fn input_tokens(&self) -> u64 {
        self.shards.iter().filter_map(|s| s.done()).map(|r| r.claim.input_tokens).fold(0, u64::saturating_add)
    }

    /// The user gave up on the task: it fails with `reason`. Results still
    /// in flight are answered as late.
    pub fn cancel(&mut self, reason: &str) -> Vec<Action> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.fail(reason.to_string(), &mut out);
        out
    }

    /// Opens the first round.
    pub fn start(&mut self, now_ms: u64) -> Vec<Action> {
        let at_ms = now_ms.saturating_add(self.deadline_ms);
        self.deadline_at_ms = Some(at_ms);
        let mut out = vec![Action::Persist, Action::SetTimer { at_ms, timer: Timer::TaskDeadline }];
        self.open_round(now_ms, &mut out);
        out
    }

    /// Picks up after a restart from the journal: timers died with the old
    /// process, so every executor still running a shard gets a fresh
    /// deadline (its result is accepted if it comes), and a task that was
    /// waiting for bids asks again.
    pub fn resume(&mut self, now_ms: u64) -> Vec<Action> {
        let at_ms = *self.deadline_at_ms.get_or_insert(now_ms.saturating_add(self.deadline_ms));
        let mut out = vec![Action::Persist, Action::SetTimer { at_ms, timer: Timer::TaskDeadline }];
        match self.phase {
            Phase::Bidding => self.open_round(now_ms, &mut out),
            Phase::Running => {
                let at_ms = now_ms + self.config.grace_ms * 2;
                for (index, shard) in self.shards.iter().enumerate() {
                    for peer in &shard.running {
                        out.push(Action::SetTimer {
                            at_ms,
                            timer: Timer::ShardDeadline { shard: index as u32, peer: *peer, since_ms: now_ms },
                        });
                    }
                }
                self.award_open(now_ms, &mut out);
            }
            Phase::Done | Phase::Failed => return Vec::new(),
        }
        out
    }

    /// The driver signed the round's CFP: bids must name this digest.
    pub fn cfp_signed(&mut self, round: u32, digest: Digest) -> Vec<Action> {
        if round == self.round {
            self.cfp = Some(digest);
            vec![Action::Persist]
        } else {
            Vec::new()
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            // Late results still get an answer, so the worker stops waiting.
            if let Event::Result { from, result } = event {
                let ack = self.ack(&result.claim, Verdict::Rejected(RejectReason::AlreadyComplete));
                return vec![Action::Ack { to: from, ack }];
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            Event::Bid { from, bid, reputation } => self.on_bid(now_ms, from, *bid, reputation, &mut out),
            Event::Result { from, result } => self.on_result(now_ms, from, *result, &mut out),
            Event::Forged { from, shard, claim } => {
                if let Some(claim) = claim {
                    let verdict = Verdict::Rejected(RejectReason::BadSignature);
                    let ack = ResultAck { task: self.task, shard: shard.unwrap_or(u32::MAX), claim, verdict };
                    out.push(Action::Ack { to: from, ack });
                }
                out.push(Action::Penalise { peer: from, reason: RejectReason::BadSignature });
                self.exclude(now_ms, from, shard, &mut out);
            }
            Event::Refused { from, shard } => {
                let (count, until) = self.refusals.entry(from).or_default();
                let pause = REFUSAL_PAUSE_MS.saturating_mul(1 << (*count).min(16)).min(MAX_REFUSAL_PAUSE_MS);
                *count += 1;
                *until = now_ms.saturating_add(pause);
                self.release(now_ms, shard, from, None, false, &mut out);
            }
            Event::Timer(Timer::Resume) => {
                if self.phase == Phase::Running {
                    self.award_open(now_ms, &mut out);
                }
            }
            Event::PeerLost(peer) => {
                self.offers.remove(&peer);
                // Maybe gone: its shards go to others and nothing waits
                // for it, but its results are still taken if they come,
                // and should it bid again it may run the same shards.
                let late: Vec<((u32, PublicKey), u64)> =
                    self.late.iter().filter(|((_, p), _)| *p == peer).map(|(k, c)| (*k, *c)).collect();
                for (key, charge) in late {
                    self.late.remove(&key);
                    self.lost.insert(key, charge);
                }
                let shards: Vec<u32> = self.busy.get(&peer).map(|s| s.iter().copied().collect()).unwrap_or_default();
                for shard in shards {
                    let charge = self.charges.get(&(shard, peer)).copied().unwrap_or(0);
                    self.lost.insert((shard, peer), charge);
                    self.release(now_ms, shard, peer, None, false, &mut out);
                }
            }
            Event::Timer(Timer::BidsClose { round }) => {
                if round == self.round && self.phase == Phase::Bidding {
                    self.close_bidding(now_ms, &mut out);
                }
            }
            Event::Timer(Timer::Straggler { shard, peer, since_ms }) => {
                if self.current_award(shard, peer, since_ms) {
                    self.back_up(now_ms, shard, peer, &mut out);
                }
            }
            Event::Timer(Timer::TaskDeadline) => {
                let took = self.deadline_ms / 1000;
                self.fail(
                    format!(
                        "deadline: not done within {took} s ({} of {} shards)",
                        self.shards_done(),
                        self.shards.len()
                    ),
                    &mut out,
                );
            }
            Event::Timer(Timer::ShardDeadline { shard, peer, since_ms }) => {
                let still = self.shards.get(shard as usize).is_some_and(|s| s.running.contains(&peer));
                if still && self.current_award(shard, peer, since_ms) {
                    // Penalised only if someone else's result decides the
                    // shard first, or the task ends without its result.
                    let charge = self.charges.get(&(shard, peer)).copied().unwrap_or(0);
                    self.late.insert((shard, peer), charge);
                    self.drop_executor(now_ms, shard, peer, None, &mut out);
                }
            }
            Event::Timer(Timer::Reopen) => {
                let unrun = self.shards.iter().any(|s| s.done().is_none() && s.running.is_empty());
                if self.phase == Phase::Running && unrun {
                    self.open_round(now_ms, &mut out);
                }
            }
        }
        if !out.is_empty() && !matches!(out.first(), Some(Action::Persist)) {
            out.insert(0, Action::Persist);
        }
        out
    }

    /// Whether a timer set for the award made at `since_ms` still times the
    /// peer's current copy of the shard (after a restart, the resumed
    /// timers are the only ones, and count).
    fn current_award(&self, shard: u32, peer: PublicKey, since_ms: u64) -> bool {
        self.awarded_ms.get(&(shard, peer)).is_none_or(|at| *at == since_ms)
    }

    fn open_round(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        self.round += 1;
        self.cfp = None;
        self.phase = Phase::Bidding;
        let cfp = Cfp {
            task: self.task,
            round: self.round,
            model: self.model,
            kind: self.kind,
            // A sample of the open shards describes the work; awards may
            // cover any open shard. Bounded so the CFP stays under its
            // 16 KiB cap (and gossip's 64 KiB) however big the task.
            shards: self
                .shards
                .iter()
                .filter(|s| s.done().is_none() && s.running.len() < s.wanted)
                .map(|s| s.plan.offer())
                .take(CFP_SHARDS)
                .collect(),
            max_price: None,
            bids_close_ms: now_ms + self.config.bid_window_ms,
            spot_commitment: spot::commitment(&self.spot_secret),
        };
        let mut ranked: Vec<&Candidate> =
            self.candidates.iter().filter(|c| c.reputation >= self.config.min_reputation).collect();
        ranked.sort_by(|a, b| score(b).total_cmp(&score(a)));
        let to: Vec<PublicKey> = ranked.iter().take(self.config.fanout).map(|c| c.peer).collect();
        let gossip = to.len() < self.config.min_direct || self.rounds_without_bids > 0;
        out.push(Action::SendCfp { to, gossip, cfp });
        out.push(Action::SetTimer {
            at_ms: now_ms + self.config.bid_window_ms,
            timer: Timer::BidsClose { round: self.round },
        });
    }

    fn on_bid(&mut self, now_ms: u64, from: PublicKey, bid: Verified<Bid>, reputation: f64, out: &mut Vec<Action>) {
        if *bid.signer() != from {
            out.push(Action::Penalise { peer: from, reason: RejectReason::BadSignature });
            return;
        }
        let fresh = bid.task == self.task
            && bid.round == self.round
            && Some(bid.cfp) == self.cfp
            && bid.model == self.model
            && bid.expires_ms > now_ms
            && bid.capacity > 0
            && bid.units_per_s > 0.0;
        // Standing comes from the node's book, never from whether the
        // bidder happened to be a candidate: a banned peer stays banned.
        if !fresh || self.banned.contains(&from) || reputation.is_nan() || reputation < self.config.min_reputation {
            return;
        }
        self.offers.insert(from, Offer { bid: Bid::clone(&bid), digest: bid.digest(), reputation });
        out.push(Action::Persist);
        if self.phase == Phase::Running {
            // A late bidder joins the pool of workers for open shards.
            self.award_open(now_ms, out);
        } else if self.offers.len() >= self.config.enough_bids {
            self.close_bidding(now_ms, out);
        }
    }

    fn close_bidding(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        self.offers.retain(|_, o| o.bid.expires_ms > now_ms);
        if self.offers.is_empty() {
            self.round_without_bids(now_ms, "", out);
            return;
        }
        self.phase = Phase::Running;
        if !self.any_usable_offer() {
            // Bids came, but from peers that each failed every shard still
            // open: another round would hear the same. Counted like a
            // round without bids, so the task ends instead of asking
            // forever.
            self.round_without_bids(now_ms, ": every bidder already failed the open shards", out);
            return;
        }
        self.rounds_without_bids = 0;
        self.award_open(now_ms, out);
    }

    /// A round closed with nothing to award: ask again, or after
    /// `max_rounds` give up, unless a late executor may still deliver. Then
    /// the task waits for it (its deadline bounds the wait), asking again
    /// every `grace_ms` in case someone new can run the open shards.
    fn round_without_bids(&mut self, now_ms: u64, why: &str, out: &mut Vec<Action>) {
        self.rounds_without_bids = self.rounds_without_bids.saturating_add(1);
        if self.rounds_without_bids < self.config.max_rounds {
            self.open_round(now_ms, out);
        } else if self.awaiting_late() {
            self.phase = Phase::Running;
            out.push(Action::SetTimer { at_ms: now_ms.saturating_add(self.config.grace_ms), timer: Timer::Reopen });
        } else {
            self.fail(format!("no usable bids after {} rounds{why}", self.rounds_without_bids), out);
        }
    }

    /// Whether an open shard's late executor may still send its result.
    fn awaiting_late(&self) -> bool {
        self.late.keys().any(|(shard, _)| self.shards.get(*shard as usize).is_some_and(|s| s.done().is_none()))
    }

    /// Whether some offer's peer may run some open shard (capacity and
    /// price aside: those free up or are judged when awarding).
    fn any_usable_offer(&self) -> bool {
        self.shards.iter().filter(|s| s.done().is_none() && s.running.len() + s.results.len() < s.wanted).any(|s| {
            self.offers.keys().any(|p| !s.running.contains(p) && !s.results.contains_key(p) && !s.excluded.contains(p))
        })
    }

    /// Awards every shard that needs an executor, each to the free bidder
    /// that would finish it first, up to each bidder's capacity; one award
    /// message per bidder.
    fn award_open(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let mut batches: BTreeMap<PublicKey, Vec<AwardedShard>> = BTreeMap::new();
        for index in 0..self.shards.len() {
            loop {
                let shard = &self.shards[index];
                if shard.done().is_some() || shard.running.len() + shard.results.len() >= shard.wanted {
                    break;
                }
                let Some(peer) = self.best_free_bidder(now_ms, shard) else {
                    // A spot check nobody else can ever run is given up
                    // rather than holding the shard forever.
                    if shard.spot && shard.wanted > 1 && !self.anyone_eligible(shard) {
                        self.dirty.insert(index as u32);
                        let shard = &mut self.shards[index];
                        shard.spot = false;
                        shard.wanted -= 1;
                        self.decide(now_ms, index, out);
                        self.finish_if_done(now_ms, out);
                        continue;
                    }
                    break;
                };
                let awarded = self.assign(now_ms, index, peer, out);
                batches.entry(peer).or_default().push(awarded);
            }
        }
        for (peer, shards) in batches {
            let bid = self.offers[&peer].digest;
            out.push(Action::SendAward {
                to: peer,
                award: Award { task: self.task, round: self.round, bid, model: self.model, shards },
            });
        }
        // Shards nobody can take now wait for a worker to free up; if no
        // one is working at all, ask again.
        let waiting = self.shards.iter().any(|s| s.done().is_none() && s.running.len() + s.results.len() < s.wanted);
        let anyone_busy = self.busy.values().any(|s| !s.is_empty());
        if waiting && !anyone_busy && self.phase == Phase::Running {
            let priced_out = self.budget_micros.is_some()
                && !self.offers.is_empty()
                && self.shards.iter().filter(|s| s.done().is_none()).all(|s| {
                    self.offers
                        .values()
                        .all(|o| !self.affordable(o.bid.price.micros_per_unit.saturating_mul(s.plan.units)))
                });
            // A bidder paused after giving work back takes it again when
            // its pause ends: no need to ask everyone again before that.
            let resume = self
                .offers
                .keys()
                .filter_map(|p| self.refusals.get(p).map(|(_, until)| *until))
                .filter(|until| *until > now_ms)
                .min();
            if priced_out {
                let (spent, budget) = (self.spent_micros, self.budget_micros.unwrap_or(0));
                self.fail(format!("budget: {spent} of {budget} micro-credits spent; no bid fits the rest"), out);
            } else if let Some(at_ms) = resume {
                out.push(Action::SetTimer { at_ms, timer: Timer::Resume });
            } else {
                self.open_round(now_ms, out);
            }
        }
    }

    /// Whether `cost` more fits the task's budget, with what is spent and
    /// what running shards will cost.
    fn affordable(&self, cost: u64) -> bool {
        let Some(budget) = self.budget_micros else { return true };
        let committed = self.charges.values().chain(self.late.values()).fold(0u64, |a, c| a.saturating_add(*c));
        self.spent_micros.saturating_add(committed).saturating_add(cost) <= budget
    }

    /// Gives shard `index` to `peer`, with its deadline and straggler timers.
    fn assign(&mut self, now_ms: u64, index: usize, peer: PublicKey, out: &mut Vec<Action>) -> AwardedShard {
        let shard = &self.shards[index];
        let offer = &self.offers[&peer];
        // Peer-sent numbers are bounded at decode; the sums saturate anyway,
        // so no bid can wrap a deadline around.
        let expected_ms = offer
            .bid
            .queue_ms
            .saturating_add((shard.plan.units as f64 * 1000.0 / f64::from(offer.bid.units_per_s.max(1e-3))) as u64);
        let deadline = now_ms
            .saturating_add((expected_ms as f64 * self.config.deadline_factor) as u64)
            .saturating_add(self.config.grace_ms);
        let awarded = AwardedShard {
            shard: shard.plan.index,
            first_item: shard.plan.first_item,
            work: shard.plan.work.clone(),
            deadline_ms: deadline,
        };
        let cost = offer.bid.price.micros_per_unit.saturating_mul(shard.plan.units);
        self.charges.insert((index as u32, peer), cost);
        self.dirty.insert(index as u32);
        self.shards[index].running.insert(peer);
        self.busy.entry(peer).or_default().insert(index as u32);
        self.awarded_ms.insert((index as u32, peer), now_ms);
        let (shard, since_ms) = (index as u32, now_ms);
        out.push(Action::SetTimer { at_ms: deadline, timer: Timer::ShardDeadline { shard, peer, since_ms } });
        let slow =
            now_ms.saturating_add((expected_ms as f64 * self.config.straggler_factor) as u64).saturating_add(250);
        if slow < deadline {
            out.push(Action::SetTimer { at_ms: slow, timer: Timer::Straggler { shard, peer, since_ms } });
        }
        awarded
    }

    /// `peer` is slow on `shard`: if a bidder is free, it runs a backup
    /// copy. Whichever valid result comes first decides; the other is
    /// answered as late, without penalty.
    fn back_up(&mut self, now_ms: u64, shard: u32, peer: PublicKey, out: &mut Vec<Action>) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(state) = self.shards.get(shard as usize) else { return };
        let slow = state.done().is_none() && state.running.contains(&peer);
        // One backup per slow executor: not when copies already exceed
        // what the shard needs.
        if !slow || state.running.len() + state.results.len() > state.wanted {
            return;
        }
        let Some(backup) = self.best_free_bidder(now_ms, state) else { return };
        let awarded = self.assign(now_ms, shard as usize, backup, out);
        let bid = self.offers[&backup].digest;
        out.push(Action::Persist);
        out.push(Action::SendAward {
            to: backup,
            award: Award { task: self.task, round: self.round, bid, model: self.model, shards: vec![awarded] },
        });
    }

    /// Whether any bidder could still run `shard`, busy or not.
    fn anyone_eligible(&self, shard: &ShardState) -> bool {
        self.offers.keys().any(|peer| {
            !shard.running.contains(peer) && !shard.results.contains_key(peer) && !shard.excluded.contains(peer)
        })
    }

    fn best_free_bidder(&self, now_ms: u64, shard: &ShardState) -> Option<PublicKey> {
        // Copies of one input (samples for a vote) are worth most on
        // different peers: a peer holding one already comes after every
        // free peer holding none. 0 for everyone on other tasks.
        let held = |peer: &PublicKey| {
            self.copies.get(&shard.plan.input).map_or(0, |copies| {
                copies
                    .iter()
                    .filter_map(|i| self.shards.get(*i as usize))
                    .filter(|s| s.running.contains(peer) || s.results.contains_key(peer))
                    .count()
            })
        };
        self.offers
            .iter()
            .filter(|(peer, offer)| {
                let load = self.busy.get(*peer).map_or(0, BTreeSet::len);
                let paused = self.refusals.get(*peer).is_some_and(|(_, until)| *until > now_ms);
                !paused
                    && load < offer.bid.capacity as usize
                    && !shard.running.contains(*peer)
                    && !shard.results.contains_key(*peer)
                    && !shard.excluded.contains(*peer)
                    && self.affordable(offer.bid.price.micros_per_unit.saturating_mul(shard.plan.units))
            })
            .min_by(|(pa, a), (pb, b)| {
                let finish =
                    |o: &Offer| o.bid.queue_ms as f64 + shard.plan.units as f64 * 1000.0 / f64::from(o.bid.units_per_s);
                held(pa)
                    .cmp(&held(pb))
                    .then(finish(a).total_cmp(&finish(b)))
                    .then(a.bid.price.cmp(&b.bid.price))
                    .then(b.reputation.total_cmp(&a.reputation))
            })
            .map(|(peer, _)| *peer)
    }

    /// Takes `peer` off `shard` (late, lost, refused or wrong) and finds
    /// someone else.
    fn drop_executor(
        &mut self,
        now_ms: u64,
        shard: u32,
        peer: PublicKey,
        penalty: Option<RejectReason>,
        out: &mut Vec<Action>,
    ) {
        self.release(now_ms, shard, peer, penalty, true, out);
    }

    /// Takes `shard` back from `peer`; with `exclude`, the peer is never
    /// asked to run it again.
    fn release(
        &mut self,
        now_ms: u64,
        shard: u32,
        peer: PublicKey,
        penalty: Option<RejectReason>,
        exclude: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(state) = self.shards.get_mut(shard as usize) else { return };
        if !state.running.remove(&peer) {
            return;
        }
        if exclude {
            state.excluded.insert(peer);
        }
        self.dirty.insert(shard);
        if let Some(set) = self.busy.get_mut(&peer) {
            set.remove(&shard);
        }
        // An execution that failed is not paid for.
        self.charges.remove(&(shard, peer));
        // A peer that failed once loses its standing offer for this task.
        self.offers.remove(&peer);
        if let Some(reason) = penalty {
            out.push(Action::Penalise { peer, reason });
        }
        out.push(Action::Persist);
        if self.phase == Phase::Running {
            self.award_open(now_ms, out);
        }
    }

    fn on_result(&mut self, now_ms: u64, from: PublicKey, result: VerifiedResult, out: &mut Vec<Action>) {
        let index = match self.check(&from, &result) {
            Ok(index) => index,
            Err(reason) => {
                let ack = self.ack(&result.claim, Verdict::Rejected(reason));
                out.push(Action::Ack { to: from, ack });
                match reason {
                    RejectReason::AlreadyComplete | RejectReason::Late => {}
                    // Someone else's claim, or a shard it does not run: a
                    // fault, but no lie about work it was given.
                    RejectReason::NotAwarded => out.push(Action::Penalise { peer: from, reason }),
                    // Its own signed claim about its own shard does not
                    // hold up: a lie, and the end of its part in this task.
                    _ => {
                        out.push(Action::Penalise { peer: from, reason });
                        self.exclude(now_ms, from, Some(result.claim.shard), out);
                    }
                }
                return;
            }
        };
        self.dirty.insert(index as u32);
        // A late or lost executor's result, first after all: paid for
        // like any.
        if let Some(charge) =
            self.late.remove(&(index as u32, from)).or_else(|| self.lost.remove(&(index as u32, from)))
        {
            self.charges.insert((index as u32, from), charge);
        }
        let state = &mut self.shards[index];
        state.running.remove(&from);
        if let Some(set) = self.busy.get_mut(&from) {
            set.remove(&(index as u32));
        }
        state.results.insert(from, Box::new(result));
        out.push(Action::Persist);
        self.decide(now_ms, index, out);
        // Whatever was decided, the worker has a free slot: offer it more.
        if self.phase == Phase::Running {
            self.award_open(now_ms, out);
        }
        self.finish_if_done(now_ms, out);
    }

    /// `peer` was caught lying or forging: it gets nothing more of this
    /// task. Its standing offer goes, every shard it runs is re-awarded, and
    /// any shard decided on its word alone is opened again.
    fn exclude(&mut self, now_ms: u64, peer: PublicKey, shard: Option<u32>, out: &mut Vec<Action>) {
        self.banned.insert(peer);
        self.offers.remove(&peer);
        self.late.retain(|(_, p), _| *p != peer);
        self.lost.retain(|(_, p), _| *p != peer);
        let mut reopened = false;
        for (index, state) in self.shards.iter_mut().enumerate() {
            let alone = state.accepted == Some(peer) && state.results.len() <= 1;
            if alone {
                state.accepted = None;
                state.results.remove(&peer);
                state.excluded.insert(peer);
                self.dirty.insert(index as u32);
                reopened = true;
            }
        }
        if reopened {
            out.push(Action::Persist);
        }
        let mut running: Vec<u32> = self.busy.get(&peer).map(|s| s.iter().copied().collect()).unwrap_or_default();
        if let Some(shard) = shard
            && !running.contains(&shard)
        {
            running.push(shard);
        }
        for shard in running {
            self.drop_executor(now_ms, shard, peer, None, out);
        }
        if reopened && self.phase == Phase::Running {
            self.award_open(now_ms, out);
        }
    }

    /// Verifies a result against the shard it claims to be for.
    fn check(&self, from: &PublicKey, result: &VerifiedResult) -> Result<usize, RejectReason> {
        let claim = &result.claim;
        let signer = *claim.signer();
        if signer != *from || claim.task != self.task {
            return Err(RejectReason::NotAwarded);
        }
        let index = claim.shard as usize;
        let state = self.shards.get(index).ok_or(RejectReason::NotAwarded)?;
        if state.done().is_some() || state.results.contains_key(&signer) {
            return Err(RejectReason::AlreadyComplete);
        }
        let key = (claim.shard, signer);
        if !state.running.contains(&signer) && !self.late.contains_key(&key) {
            match self.lost.get(&key) {
                // Its charge is no longer committed: taken only if it fits.
                Some(charge) if self.affordable(*charge) => {}
                Some(_) => return Err(RejectReason::Late),
                None if state.excluded.contains(&signer) => return Err(RejectReason::Late),
                None => return Err(RejectReason::NotAwarded),
            }
        }
        if claim.input != state.plan.input || claim.first_item != state.plan.first_item {
            return Err(RejectReason::InputMismatch);
        }
        if claim.model != self.model {
            return Err(RejectReason::ModelMismatch);
        }
        if claim.spot_commitment != spot::commitment(&self.spot_secret) {
            // Not the CFP we signed: its work proves nothing about when we
            // committed to the checks.
            return Err(RejectReason::InputMismatch);
        }
        let output_ok = result.output.digest().is_ok_and(|d| d == claim.output)
            && claim.items == state.plan.items()
            && self.task_kind().fits(&result.output, state.plan.items() as usize);
        if !output_ok {
            return Err(RejectReason::OutputMismatch);
        }
        Ok(index)
    }

    /// With `wanted` results in, accepts the strict majority's output, or
    /// asks for one more execution to break the tie.
    fn decide(&mut self, now_ms: u64, index: usize, out: &mut Vec<Action>) {
        let check = self.check;
        self.dirty.insert(index as u32);
        let state = &mut self.shards[index];
        if state.results.len() < state.wanted {
            return;
        }
        let peers: Vec<PublicKey> = state.results.keys().copied().collect();
        let mut best: Vec<PublicKey> = Vec::new();
        for p in &peers {
            let group: Vec<PublicKey> = peers
                .iter()
                .copied()
                .filter(|q| kind::agree(check, &state.results[p].output, &state.results[q].output))
                .collect();
            if group.len() > best.len() {
                best = group;
            }
        }
        if best.len() * 2 <= peers.len() {
            if peers.len() >= MAX_EXECUTIONS {
                self.fail(format!("shard {index}: {} executions and no majority", peers.len()), out);
            } else {
                state.wanted = peers.len() + 1;
            }
            return;
        }
        state.accepted = Some(best[0]);
        let results: Vec<(PublicKey, Verified<ResultClaim>)> =
            state.results.iter().map(|(p, r)| (*p, r.claim.clone())).collect();
        // Anyone still running it (a backup copy) is freed; its result will
        // be answered AlreadyComplete.
        let still: Vec<PublicKey> = std::mem::take(&mut state.running).into_iter().collect();
        // Nor is a late executor awaited any more: it was late, and lost.
        let lost: Vec<PublicKey> =
            self.late.keys().filter(|(shard, _)| *shard == index as u32).map(|(_, peer)| *peer).collect();
        for peer in lost {
            self.late.remove(&(index as u32, peer));
            out.push(Action::Penalise { peer, reason: RejectReason::Late });
        }
        // Nor one whose adverts stopped (no fault known).
        self.lost.retain(|(shard, _), _| *shard != index as u32);
        for peer in still {
            self.charges.remove(&(index as u32, peer));
            if let Some(set) = self.busy.get_mut(&peer) {
                set.remove(&(index as u32));
            }
        }
        let mut outvoted = Vec::new();
        for (peer, claim) in results {
            // Every valid execution is paid for, agreeing or not; its
            // charge moves from committed to spent.
            let charge = self.charges.remove(&(index as u32, peer)).unwrap_or(0);
            self.spent_micros = self.spent_micros.saturating_add(charge);
            if best.contains(&peer) {
                out.push(Action::Ack { to: peer, ack: self.ack(&claim, Verdict::Accepted) });
                out.push(Action::Reward { peer });
            } else {
                let reason = RejectReason::Disagreement;
                out.push(Action::Ack { to: peer, ack: self.ack(&claim, Verdict::Rejected(reason)) });
                out.push(Action::Penalise { peer, reason });
                outvoted.push(peer);
            }
        }
        // A peer caught lying is done with this task at once.
        for peer in outvoted {
            self.exclude(now_ms, peer, None, out);
        }
    }

    fn finish_if_done(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.phase == Phase::Done || self.shards.iter().any(|s| s.done().is_none()) {
            return;
        }
        match self.assemble(now_ms) {
            Ok((output, receipt)) => {
                self.phase = Phase::Done;
                self.completed_ms = Some(now_ms);
                out.push(Action::Persist);
                out.push(Action::Complete { output, receipt });
            }
            Err(reason) => self.fail(reason, out),
        }
    }

    /// A finished task's result as it was handed out: for a completed one
    /// the same output and receipt (so the same signature), for a failed
    /// one its reason. `None` while it runs. Lets a restarted node keep
    /// serving what it finished before.
    pub fn outcome(&self) -> Option<Result<(ShardOutput, Receipt), String>> {
        match self.phase {
            Phase::Done => Some(self.assemble(self.completed_ms.unwrap_or(0))),
            Phase::Failed => Some(Err(self.failure.clone().unwrap_or_else(|| "failed".into()))),
            _ => None,
        }
    }

    /// The output in item order and the receipt over the accepted results.
    fn assemble(&self, completed_ms: u64) -> Result<(ShardOutput, Receipt), String> {
        let results: Vec<&VerifiedResult> = self.shards.iter().filter_map(|s| s.done()).collect();
        let outputs: Vec<&ShardOutput> = results.iter().map(|r| &r.output).collect();
        let output = self.task_kind().combine(self.aggregation, &outputs).map_err(|e| e.to_string())?;
        let claims: Vec<Signed<ResultClaim>> = results.iter().map(|r| r.claim.signed().clone()).collect();
        let leaves: Vec<Digest> = claims.iter().map(Signed::digest).collect();
        let output_digest = output.digest().map_err(|_| "the aggregated output is too large to encode".to_string())?;
        let receipt = Receipt {
            task: self.task,
            spec: self.spec_digest,
            model: self.model,
            root: merkle::root(&leaves),
            shards: claims,
            output: output_digest,
            completed_ms,
            spot: spot::Reveal { secret: self.spot_secret, permille: self.spot_permille },
        };
        Ok((output, receipt))
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        // Executors past their deadline never delivered.
        for (_, peer) in std::mem::take(&mut self.late).into_keys() {
            out.push(Action::Penalise { peer, reason: RejectReason::Late });
        }
        self.lost.clear();
        self.phase = Phase::Failed;
        self.failure = Some(reason.clone());
        out.push(Action::Persist);
        out.push(Action::Fail { reason });
    }

    fn ack(&self, claim: &Verified<ResultClaim>, verdict: Verdict) -> ResultAck {
        ResultAck { task: self.task, shard: claim.shard, claim: claim.digest(), verdict }
    }
}

/// How attractive a candidate is before any bid: speed, discounted by load
/// and reputation.
fn score(c: &Candidate) -> f64 {
    f64::from(c.units_per_s) * c.reputation / (1.0 + f64::from(c.load.max(0.0)))
}
