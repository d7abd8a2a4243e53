//! The worker's side of the market: which CFPs to bid on and at what
//! estimate, which awards to accept, and the claim that goes with each
//! result. Sans IO like the requester: the driver verifies transport
//! identity, signs what this returns, runs the model, and reports back.

use std::collections::{BTreeMap, VecDeque};

use mycel_protocol::{
    Award, Bid, Cfp, Digest, Load, ModelKind, Price, PublicKey, ResultClaim, ShardOutput, Signed, TaskId, Timings, Work,
};
use serde::{Deserialize, Serialize};

/// A model this worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Served {
    /// What it does.
    pub kind: ModelKind,
    /// Measured units per second (texts, or generated tokens).
    pub units_per_s: f32,
}

/// Worker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Shards run at once (the worker pool's replicas).
    pub capacity: u32,
    /// Asking price per unit of work.
    pub price: Price,
    /// How long a bid stands.
    pub bid_ttl_ms: u64,
    /// Don't bid when this much work is already queued.
    pub max_queue_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { capacity: 1, price: Price::default(), bid_ttl_ms: 30_000, max_queue_ms: 60_000 }
    }
}

/// A shard to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Who awarded it (gets the result).
    pub requester: PublicKey,
    /// The task.
    pub task: TaskId,
    /// Shard index.
    pub shard: u32,
    /// Position of its first item in the task.
    pub first_item: u64,
    /// The weights to use.
    pub model: Digest,
    /// The items.
    pub work: Work,
    /// Digest of `work`.
    pub input: Digest,
    /// The spot-check commitment of the CFP bid on, for the claim.
    pub spot_commitment: Digest,
    /// When it was accepted, for the claim's timings.
    pub accepted_ms: u64,
}

/// A finished job, as the driver reports it to [`Worker::on_done`].
#[derive(Debug, Clone, Copy)]
pub struct Done<'a> {
    /// What the model produced.
    pub output: &'a ShardOutput,
    /// Time spent computing.
    pub compute_ms: u32,
    /// Input tokens read.
    pub input_tokens: u64,
}

/// What the driver does with an award.
#[derive(Debug, Clone, PartialEq)]
pub enum AwardOutcome {
    /// Queue these jobs on the worker pool.
    Run(Vec<Job>),
    /// Not ours to run: no bid of ours matches, or another model.
    Refuse(&'static str),
    /// The same award again (a retried delivery): already running or run.
    Duplicate,
}

/// Awards remembered, so a retried delivery runs nothing twice.
const AWARDS_REMEMBERED: usize = 4096;
/// Bids remembered (an award must match one). Past this, expired bids are
/// forgotten first, and if every one is still open no new bid is made: a
/// flood of calls for proposals cannot grow the worker without bound.
pub const BIDS_REMEMBERED: usize = 4096;

/// Bids made, by (task, round): what an award must match.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Made {
    requester: PublicKey,
    /// The signed bid's digest, once the driver has signed it.
    bid: Option<Digest>,
    model: Digest,
    expires_ms: u64,
    spot_commitment: Digest,
}

/// The worker's market state.
#[derive(Debug, Clone)]
pub struct Worker {
    config: WorkerConfig,
    models: BTreeMap<Digest, Served>,
    bids: BTreeMap<(TaskId, u32), Made>,
    /// Units of work queued or running, for estimates.
    queue: VecDeque<(TaskId, u32, u64)>,
    /// Awards taken, by the signed award's digest (their id), oldest first.
    awards: VecDeque<Digest>,
}

impl Worker {
    /// A worker serving `models`.
    pub fn new(config: WorkerConfig, models: BTreeMap<Digest, Served>) -> Self {
        Self { config, models, bids: BTreeMap::new(), queue: VecDeque::new(), awards: VecDeque::new() }
    }

    /// Milliseconds of queued work ahead of a new shard for `model`.
    pub fn queue_ms(&self, model: &Digest) -> u64 {
        let speed = self.models.get(model).map_or(1.0, |m| f64::from(m.units_per_s.max(1e-3)));
        let units: u64 = self.queue.iter().map(|(_, _, u)| u).sum();
        // Work spreads over the replicas.
        (units as f64 * 1000.0 / speed / f64::from(self.config.capacity.max(1))) as u64
    }

    /// What to advertise as load: shards running (up to capacity) and
    /// waiting beyond it.
    pub fn load(&self) -> Load {
        let capacity = self.config.capacity.max(1);
        let shards = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        Load { queued_shards: shards.saturating_sub(capacity), active_shards: shards.min(capacity), capacity }
    }

    /// The bid to sign and send for a CFP (signed by `requester`), if this
    /// worker wants the work. The driver calls [`Self::bid_signed`] with
    /// the signed bid's digest.
    pub fn on_cfp(&mut self, now_ms: u64, cfp: &Signed<Cfp>) -> Option<Bid> {
        let requester = *cfp.signer();
        let call = cfp.verify().ok()?;
        if self.bids.contains_key(&(call.task, call.round)) {
            // The same call reached us twice (directly and by gossip): one
            // bid per round, or the requester and we could disagree on
            // which one an award names.
            return None;
        }
        if self.bids.len() >= BIDS_REMEMBERED {
            self.bids.retain(|_, m| m.expires_ms > now_ms);
            if self.bids.len() >= BIDS_REMEMBERED {
                return None;
            }
        }
        let served = self.models.get(&call.model)?;
        if served.kind != call.kind || call.bids_close_ms <= now_ms || call.shards.is_empty() {
            return None;
        }
        let queue_ms = self.queue_ms(&call.model);
        if queue_ms > self.config.max_queue_ms {
            return None;
        }
        if let Some(max) = call.max_price
            && self.config.price > max
        {
            return None;
        }
        let bid = Bid {
            task: call.task,
            round: call.round,
            cfp: cfp.digest(),
            model: call.model,
            price: self.config.price,
            queue_ms,
            units_per_s: served.units_per_s,
            capacity: self.config.capacity,
            expires_ms: now_ms + self.config.bid_ttl_ms,
        };
        // Remember it as unsigned until the driver reports the digest.
        self.bids.insert(
            (call.task, call.round),
            Made {
                requester,
                bid: None,
                model: call.model,
                expires_ms: bid.expires_ms,
                spot_commitment: call.spot_commitment,
            },
        );
        Some(bid)
    }

    /// The driver signed the bid: awards must name this digest.
    pub fn bid_signed(&mut self, bid: &Signed<Bid>) {
        if let Ok(b) = bid.verify()
            && let Some(made) = self.bids.get_mut(&(b.task, b.round))
        {
            made.bid = Some(bid.digest());
        }
    }

    /// Checks an award from `from` against the bids made; the jobs to run.
    /// `id` names the signed award: the same award delivered again (the
    /// requester retried) runs nothing twice.
    pub fn on_award(&mut self, now_ms: u64, from: PublicKey, award: &Award, id: Digest) -> AwardOutcome {
        if self.awards.contains(&id) {
            return AwardOutcome::Duplicate;
        }
        self.bids.retain(|_, m| m.expires_ms + 600_000 > now_ms);
        let Some(made) = self.bids.get(&(award.task, award.round)) else {
            return AwardOutcome::Refuse("no bid of ours for this round");
        };
        if made.requester != from || made.bid != Some(award.bid) {
            return AwardOutcome::Refuse("the award does not name our bid");
        }
        if made.model != award.model {
            return AwardOutcome::Refuse("awarded for other weights than we bid with");
        }
        if self.awards.len() >= AWARDS_REMEMBERED {
            self.awards.pop_front();
        }
        self.awards.push_back(id);
        let mut jobs = Vec::with_capacity(award.shards.len());
        for s in &award.shards {
            let Ok(input) = s.work.digest() else {
                return AwardOutcome::Refuse("a shard's work cannot be encoded");
            };
            let units = s.work.items() as u64 * crate::kind::of(&s.work).units_per_item(&s.work);
            self.queue.push_back((award.task, s.shard, units));
            jobs.push(Job {
                requester: from,
                task: award.task,
                shard: s.shard,
                first_item: s.first_item,
                model: award.model,
                work: s.work.clone(),
                input,
                spot_commitment: made.spot_commitment,
                accepted_ms: now_ms,
            });
        }
        AwardOutcome::Run(jobs)
    }

    /// A job finished: the claim to sign and send with its output.
    pub fn on_done(&mut self, now_ms: u64, job: &Job, done: Done<'_>) -> Option<ResultClaim> {
        let Done { output, compute_ms, input_tokens } = done;
        self.forget(job.task, job.shard);
        let output_digest = output.digest().ok()?;
        Some(ResultClaim {
            task: job.task,
            shard: job.shard,
            first_item: job.first_item,
            items: job.work.items() as u32,
            input: job.input,
            model: job.model,
            output: output_digest,
            timings: Timings {
                queued_ms: u32::try_from(now_ms.saturating_sub(job.accepted_ms))
                    .unwrap_or(u32::MAX)
                    .saturating_sub(compute_ms),
                compute_ms,
            },
            input_tokens,
            spot_commitment: job.spot_commitment,
        })
    }

    /// A job was dropped (failed, cancelled).
    pub fn forget(&mut self, task: TaskId, shard: u32) {
        self.queue.retain(|(t, s, _)| !(*t == task && *s == shard));
    }
}

#[cfg(test)]
mod tests {
    use mycel_protocol::{AwardedShard, Keypair, ShardOffer};

    use super::*;

    fn setup() -> (Worker, Keypair, Digest) {
        let model = Digest::of(b"weights");
        let mut models = BTreeMap::new();
        models.insert(model, Served { kind: ModelKind::Embedding, units_per_s: 100.0 });
        (
            Worker::new(WorkerConfig { capacity: 2, ..WorkerConfig::default() }, models),
            Keypair::generate().unwrap(),
            model,
        )
    }

    fn cfp(key: &Keypair, model: Digest) -> Signed<Cfp> {
        let cfp = Cfp {
            task: TaskId([1; 16]),
            round: 1,
            model,
            kind: ModelKind::Embedding,
            shards: vec![ShardOffer { shard: 0, items: 10, units: 10 }],
            max_price: None,
            bids_close_ms: 2_000,
            spot_commitment: Digest::of(b"commitment"),
        };
        Signed::sign(key, &cfp).unwrap()
    }

    #[test]
    fn bids_only_on_served_models_and_open_windows() {
        let (mut w, requester, model) = setup();
        assert!(w.on_cfp(1_000, &cfp(&requester, Digest::of(b"other"))).is_none());
        assert!(w.on_cfp(5_000, &cfp(&requester, model)).is_none(), "window closed");
        let bid = w.on_cfp(1_000, &cfp(&requester, model)).unwrap();
        assert_eq!((bid.units_per_s, bid.capacity, bid.queue_ms), (100.0, 2, 0));
        // The same call again (direct and by gossip): one bid per round.
        assert!(w.on_cfp(1_100, &cfp(&requester, model)).is_none());
    }

    #[test]
    fn a_flood_of_calls_for_proposals_leaves_the_bids_remembered_bounded() {
        let (mut w, requester, model) = setup();
        let call = |task: u32, close: u64| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&task.to_le_bytes());
            let cfp = Cfp { task: TaskId(id), bids_close_ms: close, ..cfp(&requester, model).verify().unwrap() };
            Signed::sign(&requester, &cfp).unwrap()
        };
        let n = BIDS_REMEMBERED as u32;
        let made = (0..n + 100).filter(|t| w.on_cfp(1_000, &call(*t, 2_000)).is_some()).count();
        assert_eq!(made, BIDS_REMEMBERED, "no bids past the bound while all are open");
        assert_eq!(w.bids.len(), BIDS_REMEMBERED);
        // Once they expire (bid ttl 30 s), room is made again.
        assert!(w.on_cfp(40_000, &call(n + 200, 50_000)).is_some());
        assert_eq!(w.bids.len(), 1);
    }

    #[test]
    fn awards_must_name_our_signed_bid_and_grow_the_queue() {
        let (mut w, requester, model) = setup();
        let me = Keypair::generate().unwrap();
        let signed_cfp = cfp(&requester, model);
        let bid = Signed::sign(&me, &w.on_cfp(1_000, &signed_cfp).unwrap()).unwrap();
        w.bid_signed(&bid);
        let award = Award {
            task: TaskId([1; 16]),
            round: 1,
            bid: bid.digest(),
            model,
            shards: vec![AwardedShard {
                shard: 0,
                first_item: 0,
                work: Work::Embed { texts: vec!["a".into(); 10] },
                deadline_ms: 9_000,
            }],
        };
        let stranger = Keypair::generate().unwrap().public();
        assert!(matches!(w.on_award(1_100, stranger, &award, Digest::of(b"a")), AwardOutcome::Refuse(_)));
        let forged = Award { bid: Digest::of(b"not our bid"), ..award.clone() };
        assert!(matches!(w.on_award(1_100, requester.public(), &forged, Digest::of(b"b")), AwardOutcome::Refuse(_)));
        let AwardOutcome::Run(jobs) = w.on_award(1_100, requester.public(), &award, Digest::of(b"c")) else {
            panic!("refused")
        };
        assert_eq!(jobs.len(), 1);
        // The same award delivered again runs nothing twice.
        assert_eq!(w.on_award(1_150, requester.public(), &award, Digest::of(b"c")), AwardOutcome::Duplicate);
        // 10 queued units at 100/s over 2 replicas: 50 ms ahead of new work.
        assert_eq!(w.queue_ms(&model), 50);
        let output = ShardOutput::Embeddings { dimensions: 1, values: vec![0.5; 10] };
        let claim = w.on_done(1_300, &jobs[0], Done { output: &output, compute_ms: 150, input_tokens: 40 }).unwrap();
        assert_eq!((claim.items, claim.input, claim.output), (10, jobs[0].input, output.digest().unwrap()));
        assert_eq!(claim.input_tokens, 40);
        assert_eq!((claim.timings.queued_ms, claim.timings.compute_ms), (50, 150));
        assert_eq!(w.queue_ms(&model), 0);
    }
}
