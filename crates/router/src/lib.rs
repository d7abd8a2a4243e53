//! The model router behind `mycel/auto`: for each request, the model that
//! should answer it, before the market picks the peer.
//!
//! It is learned, not rules. Every outcome the node hears of (a user's
//! feedback on a routed task, an evaluation harness's test result, later a
//! judge's verdict) is kept as an example: the prompt's embedding, the
//! model, a score in 0..=1. For a new prompt each candidate model's quality
//! is predicted from its nearest examples (k nearest by cosine, weighted
//! by similarity; a plain kNN over prompt embeddings is known to match far
//! more complex routers), pulled toward a prior from the model's capability
//! profile (how close the prompt is to the profile's description and tags,
//! relative to the other candidates) while there is little evidence. The
//! choice trades quality for cost: `utility = quality - cost_weight *
//! cost`, cost being the model's time per token relative to the slowest
//! candidate. Sweeping `cost_weight` from 0 up traces the quality/cost
//! curve RouteLLM reports.
//!
//! Examples are only comparable within one embedding model's space, so a
//! router belongs to one embedder (its weights digest) and ignores examples
//! stored for another. What it learned persists in the node's store
//! (bounded per model, the oldest dropped first) and survives restarts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mycel_protocol::{Digest, TaskId};
use mycel_store::{Batch, Store, StoreError, Tree};
use serde::{Deserialize, Serialize};

/// Neighbours consulted per model.
pub const K: usize = 8;
/// How fast a neighbour's weight falls with distance: `exp((cos - 1) /
/// SOFTNESS)`, so an identical prompt weighs 1, one at cosine 0.8 weighs
/// 0.14, one at 0.5 almost nothing.
pub const SOFTNESS: f32 = 0.1;
/// What the profile prior is worth, in identical-prompt examples.
pub const PRIOR_WEIGHT: f32 = 0.5;
/// Examples this node learned itself kept per model; the oldest go first.
pub const MAX_EXAMPLES_PER_MODEL: usize = 2048;
/// What a peer's outcome weighs against one this node saw itself:
/// second-hand evidence, from a signer that is not vetted, counts half.
pub const PEER_WEIGHT: f32 = 0.5;
/// Examples from peers kept per model, besides those; the oldest of theirs
/// go first, so what peers share never pushes out what this node learned.
pub const MAX_PEER_EXAMPLES_PER_MODEL: usize = MAX_EXAMPLES_PER_MODEL / 2;
/// Routed tasks remembered (for their view and feedback).
pub const MAX_ROUTED: usize = 2048;
/// Default trade-off: a model must predict this much more quality per unit
/// of relative cost to be worth it.
pub const DEFAULT_COST_WEIGHT: f32 = 0.15;
/// Longest embedding accepted.
pub const MAX_DIMENSIONS: usize = 4096;

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A user's feedback on a task (`POST /api/v1/tasks/{id}/feedback`).
    User,
    /// An evaluation harness's check (a unit test, an expected answer).
    Eval,
    /// A judge model's verdict.
    Judge,
    /// Another node's router, imported (never exported again).
    Peer,
}

impl Source {
    fn tag(self) -> u8 {
        match self {
            Source::User => 1,
            Source::Eval => 2,
            Source::Judge => 3,
            Source::Peer => 4,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Source::User),
            2 => Some(Source::Eval),
            3 => Some(Source::Judge),
            4 => Some(Source::Peer),
            _ => None,
        }
    }
}

/// A model the router may choose.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its advertised id.
    pub id: String,
    /// Its weights digest (its identity).
    pub weights: Digest,
    /// Embedding of its profile's description and tags (`None`: no profile).
    pub profile: Option<Vec<f32>>,
    /// Best advertised decode speed, tokens per second (0: unknown).
    pub tokens_per_s: f32,
}

/// The router's view of one candidate for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Model id.
    pub model: String,
    /// Predicted quality, 0..=1.
    pub quality: f32,
    /// Time per token relative to the slowest candidate, 0..=1.
    pub cost: f32,
    /// `quality - cost_weight * cost`: the highest wins.
    pub utility: f32,
    /// The outcomes behind the prediction, in identical-prompt examples
    /// (similarity-weighted); 0: the profile prior alone.
    pub evidence: f32,
}

/// Which model a request went to, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The chosen model's id.
    pub model: String,
    /// Its weights digest, hex.
    pub weights: String,
    /// Every candidate's scores, best first.
    pub scores: Vec<Score>,
    /// The trade-off used.
    pub cost_weight: f32,
    /// One line for people.
    pub reason: String,
    /// Time spent routing (embedding the prompt and choosing), ms.
    pub overhead_ms: f32,
}

/// A routed task, remembered for its view and its feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routed {
    /// The decision.
    pub decision: Decision,
    /// Feedback given so far (the latest), 0..=1.
    pub feedback: Option<f32>,
    #[serde(skip)]
    vector: Vec<f32>,
    #[serde(skip)]
    seq: u64,
}

/// Why the router refused something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bad argument (the caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// No such routed task.
    #[error("task {0} was not routed by this node (feedback teaches the router: submit with model mycel/auto)")]
    NotRouted(TaskId),
}

#[derive(Debug, Clone)]
struct Example {
    vector: Vec<f32>,
    score: f32,
    source: Source,
    seq: u64,
}

/// The router: examples per model, routed tasks, and their persistence.
pub struct Router {
    embedder: Digest,
    examples: HashMap<Digest, VecDeque<Example>>,
    routed: HashMap<TaskId, Routed>,
    routed_order: VecDeque<(u64, TaskId)>,
    next_seq: u64,
    store: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("embedder", &self.embedder)
            .field("examples", &self.examples.values().map(VecDeque::len).sum::<usize>())
            .field("routed", &self.routed.len())
            .finish_non_exhaustive()
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 { v.iter().map(|x| x / norm).collect() } else { v.to_vec() }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn example_key(embedder: &Digest, model: &Digest, seq: u64) -> Vec<u8> {
    let mut key = format!("e/{}/{}/", embedder.to_hex(), model.to_hex()).into_bytes();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn routed_key(task: &TaskId) -> Vec<u8> {
    format!("t/{task}").into_bytes()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn float_bytes(values: &[f32]) -> impl Iterator<Item = u8> + '_ {
    values.iter().flat_map(|v| v.to_le_bytes())
}

impl Router {
    /// An empty router for `embedder`'s space that keeps nothing.
    pub fn in_memory(embedder: Digest) -> Self {
        Self {
            embedder,
            examples: HashMap::new(),
            routed: HashMap::new(),
            routed_order: VecDeque::new(),
            next_seq: 0,
            store: None,
        }
    }

    /// The router for `embedder`'s space, with what `store` kept of it.
    /// Entries that do not decode are dropped (and deleted): a router that
    /// forgets an outcome is better than a node that will not start.
    pub fn open(store: Arc<dyn Store>, embedder: Digest) -> Result<Self, RouterError> {
        let mut router = Self::in_memory(embedder);
        let mut junk = Batch::new();
        let prefix = format!("e/{}/", embedder.to_hex());
        for entry in store.scan_prefix(Tree::Router, prefix.as_bytes())? {
            let (key, value) = (&entry.0, &entry.1);
            let rest = &key[prefix.len()..];
            let parsed = (rest.len() == 64 + 1 + 8)
                .then(|| std::str::from_utf8(&rest[..64]).ok().and_then(|h| Digest::from_hex(h).ok()))
                .flatten()
                .zip(rest[65..].try_into().ok().map(u64::from_be_bytes))
                .zip(decode_example(value));
            match parsed {
                Some(((model, seq), (score, source, vector))) => {
                    router.next_seq = router.next_seq.max(seq + 1);
                    router.examples.entry(model).or_default().push_back(Example { vector, score, source, seq });
                }
                None => {
                    junk.delete(Tree::Router, key.clone());
                }
            }
        }
        for examples in router.examples.values_mut() {
            examples.make_contiguous().sort_by_key(|e| e.seq);
        }
        let mut routed = Vec::new();
        for entry in store.scan_prefix(Tree::Router, b"t/")? {
            let task = std::str::from_utf8(&entry.0[2..]).ok().and_then(|h| TaskId::from_hex(h).ok());
            match task.zip(decode_routed(&entry.1)) {
                Some((task, r)) => routed.push((task, r)),
                None => {
                    junk.delete(Tree::Router, entry.0.clone());
                }
            }
        }
        routed.sort_by_key(|(_, r)| r.seq);
        for (task, r) in routed {
            router.next_seq = router.next_seq.max(r.seq + 1);
            router.routed_order.push_back((r.seq, task));
            router.routed.insert(task, r);
        }
        if !junk.ops().is_empty() {
            store.commit(&junk)?;
        }
        router.store = Some(store);
        Ok(router)
    }

    /// The embedding model whose space this router works in.
    pub fn embedder(&self) -> Digest {
        self.embedder
    }

    /// Outcomes kept, per model.
    pub fn examples(&self) -> HashMap<Digest, usize> {
        self.examples.iter().map(|(m, e)| (*m, e.len())).collect()
    }

    /// Picks the model for a prompt embedded as `query`. `None` when there
    /// is no candidate.
    pub fn choose(&self, query: &[f32], candidates: &[Candidate], cost_weight: f32) -> Option<Decision> {
        if candidates.is_empty() {
            return None;
        }
        let query = normalized(query);
        // Relative cost: time per token against the slowest candidate.
        let seconds = |c: &Candidate| if c.tokens_per_s > 0.0 { 1.0 / c.tokens_per_s } else { f32::INFINITY };
        let slowest = candidates.iter().map(seconds).filter(|s| s.is_finite()).fold(0f32, f32::max);
        let cost = |c: &Candidate| {
            let s = seconds(c);
            if s.is_finite() && slowest > 0.0 { s / slowest } else { 1.0 }
        };
        // Profile prior: closeness to each profile, against the candidates' mean.
        let closeness: Vec<Option<f32>> =
            candidates.iter().map(|c| c.profile.as_ref().map(|p| dot(&query, &normalized(p)))).collect();
        let known: Vec<f32> = closeness.iter().flatten().copied().collect();
        let mean = if known.is_empty() { 0.0 } else { known.iter().sum::<f32>() / known.len() as f32 };
        let mut scores: Vec<(Score, &Candidate)> = candidates
            .iter()
            .zip(&closeness)
            .map(|(c, close)| {
                let prior = close.map_or(0.5, |s| (0.5 + 2.0 * (s - mean)).clamp(0.05, 0.95));
                let (sum, weight) = self.neighbours(&c.weights, &query);
                let quality = (sum + PRIOR_WEIGHT * prior) / (weight + PRIOR_WEIGHT);
                let cost = cost(c);
                let utility = quality - cost_weight * cost;
                (Score { model: c.id.clone(), quality, cost, utility, evidence: weight }, c)
            })
            .collect();
        // Best utility first; ties to the cheaper, then by id (stable).
        scores.sort_by(|(a, _), (b, _)| {
            b.utility.total_cmp(&a.utility).then(a.cost.total_cmp(&b.cost)).then(a.model.cmp(&b.model))
        });
        let (best, chosen) = &scores[0];
        let reason = format!(
            "predicted quality {:.2} from {} (cost {:.2} of the slowest, weight {cost_weight})",
            best.quality,
            if best.evidence > 0.01 {
                format!("{:.1} similar outcomes and its profile", best.evidence)
            } else {
                "its profile alone (no outcomes near this prompt yet)".into()
            },
            best.cost,
        );
        Some(Decision {
            model: chosen.id.clone(),
            weights: chosen.weights.to_hex(),
            scores: scores.iter().map(|(s, _)| s.clone()).collect(),
            cost_weight,
            reason,
            overhead_ms: 0.0,
        })
    }

    /// Similarity-weighted sum of the nearest examples' scores, and the sum
    /// of their weights.
    fn neighbours(&self, model: &Digest, query: &[f32]) -> (f32, f32) {
        let Some(examples) = self.examples.get(model) else { return (0.0, 0.0) };
        let mut near: Vec<(f32, f32, f32)> = examples
            .iter()
            .filter(|e| e.vector.len() == query.len())
            .map(|e| (dot(&e.vector, query), e.score, if e.source == Source::Peer { PEER_WEIGHT } else { 1.0 }))
            .collect();
        near.sort_by(|a, b| b.0.total_cmp(&a.0));
        near.iter().take(K).fold((0.0, 0.0), |(sum, weight), &(sim, score, trust)| {
            let w = trust * ((sim - 1.0) / SOFTNESS).exp();
            (sum + w * score, weight + w)
        })
    }

    /// Learns that `model` scored `score` (0..=1) on a prompt embedded as
    /// `vector`.
    pub fn learn(&mut self, model: Digest, vector: &[f32], score: f32, source: Source) -> Result<(), RouterError> {
        self.learn_many([(model, vector.to_vec(), score)], source).map(|_| ())
    }

    /// Learns several outcomes from one source in one durable write; all or
    /// none (a bad one refuses the lot). Returns how many were new: a
    /// peer's outcomes already held are not learned again.
    pub fn learn_many(
        &mut self,
        outcomes: impl IntoIterator<Item = (Digest, Vec<f32>, f32)>,
        source: Source,
    ) -> Result<usize, RouterError> {
        let outcomes: Vec<(Digest, Vec<f32>, f32)> = outcomes.into_iter().collect();
        for (_, vector, score) in &outcomes {
            if !(0.0..=1.0).contains(score) {
                return Err(RouterError::Invalid(format!("score {score} is not in 0..=1")));
            }
            if vector.is_empty() || vector.len() > MAX_DIMENSIONS || vector.iter().any(|x| !x.is_finite()) {
                return Err(RouterError::Invalid("the prompt embedding is empty, too long or not finite".into()));
            }
        }
        let mut batch = Batch::new();
        let mut staged: HashMap<Digest, VecDeque<Example>> = HashMap::new();
        // A peer's outcomes come again with each share it sends: those held
        // already (the same model, prompt and score, as many times as the
        // share repeats them) are not learned again.
        type Fingerprint = (Vec<u32>, u32);
        let fingerprint =
            |v: &[f32], score: f32| -> Fingerprint { (v.iter().map(|x| x.to_bits()).collect(), score.to_bits()) };
        let mut held_from_peers: HashMap<Digest, HashMap<Fingerprint, usize>> = HashMap::new();
        let mut in_share: HashMap<(Digest, Fingerprint), usize> = HashMap::new();
        let mut seq = self.next_seq;
        for (model, vector, score) in &outcomes {
            let example = Example { vector: normalized(vector), score: *score, source, seq };
            if source == Source::Peer {
                let held = held_from_peers.entry(*model).or_insert_with(|| {
                    let mut counts = HashMap::new();
                    let examples = self.examples.get(model).into_iter().flatten();
                    for e in examples.filter(|e| e.source == Source::Peer) {
                        *counts.entry(fingerprint(&e.vector, e.score)).or_default() += 1;
                    }
                    counts
                });
                let print = fingerprint(&example.vector, example.score);
                let have = held.get(&print).copied().unwrap_or(0);
                let seen = in_share.entry((*model, print)).or_default();
                *seen += 1;
                if *seen <= have {
                    continue;
                }
            }
            batch.put(Tree::Router, example_key(&self.embedder, model, seq), encode_example(&example));
            staged.entry(*model).or_default().push_back(example);
            seq += 1;
        }
        let learned = staged.values().map(VecDeque::len).sum();
        // What the bound pushes out, oldest first, in the same write. Peers'
        // outcomes have a bound of their own, so they never push out what
        // this node learned itself.
        let (bound, from_peer) = match source {
            Source::Peer => (MAX_PEER_EXAMPLES_PER_MODEL, true),
            _ => (MAX_EXAMPLES_PER_MODEL, false),
        };
        let mut evicted: HashMap<Digest, HashSet<u64>> = HashMap::new();
        for (model, new) in &mut staged {
            let held: Vec<u64> = self
                .examples
                .get(model)
                .into_iter()
                .flatten()
                .filter(|e| (e.source == Source::Peer) == from_peer)
                .map(|e| e.seq)
                .collect();
            let over = (held.len() + new.len()).saturating_sub(bound);
            let gone: HashSet<u64> = held.iter().copied().take(over).collect();
            let drop_new = over - gone.len();
            for s in gone.iter().copied().chain(new.iter().take(drop_new).map(|e| e.seq)) {
                batch.delete(Tree::Router, example_key(&self.embedder, model, s));
            }
            new.drain(..drop_new);
            evicted.insert(*model, gone);
        }
        if let Some(store) = &self.store {
            store.commit(&batch)?;
        }
        for (model, new) in staged {
            let examples = self.examples.entry(model).or_default();
            if let Some(gone) = evicted.get(&model).filter(|g| !g.is_empty()) {
                examples.retain(|e| !gone.contains(&e.seq));
            }
            examples.extend(new);
        }
        self.next_seq = seq;
        Ok(learned)
    }

    /// Up to `max` of the outcomes this node learned itself (not those
    /// imported from peers), newest first: `(model, unit vector, score)`.
    pub fn export(&self, max: usize) -> Vec<(Digest, Vec<f32>, f32)> {
        let mut all: Vec<(u64, Digest, &Example)> = self
            .examples
            .iter()
            .flat_map(|(m, examples)| examples.iter().filter(|e| e.source != Source::Peer).map(move |e| (e.seq, *m, e)))
            .collect();
        all.sort_by_key(|(seq, _, _)| std::cmp::Reverse(*seq));
        all.into_iter().take(max).map(|(_, m, e)| (m, e.vector.clone(), e.score)).collect()
    }

    /// Remembers that `task` was routed by `decision`, for prompts embedded
    /// as `vector`.
    pub fn routed_task(&mut self, task: TaskId, decision: Decision, vector: &[f32]) -> Result<(), RouterError> {
        let seq = self.next_seq;
        let routed = Routed { decision, feedback: None, vector: normalized(vector), seq };
        let mut batch = Batch::new();
        batch.put(Tree::Router, routed_key(&task), encode_routed(&routed));
        while self.routed_order.len() >= MAX_ROUTED {
            if let Some((_, old)) = self.routed_order.pop_front() {
                self.routed.remove(&old);
                batch.delete(Tree::Router, routed_key(&old));
            }
        }
        if let Some(store) = &self.store {
            store.commit(&batch)?;
        }
        self.routed_order.push_back((seq, task));
        self.routed.insert(task, routed);
        self.next_seq += 1;
        Ok(())
    }

    /// How `task` was routed, if this node routed it.
    pub fn routed(&self, task: &TaskId) -> Option<&Routed> {
        self.routed.get(task)
    }

    /// A user's verdict on a routed task's answer (0 bad .. 1 good): an
    /// outcome for the model that answered it.
    pub fn feedback(&mut self, task: TaskId, score: f32) -> Result<&Routed, RouterError> {
        let routed = self.routed.get(&task).ok_or(RouterError::NotRouted(task))?;
        let model = Digest::from_hex(&routed.decision.weights)
            .map_err(|_| RouterError::Invalid("a routed task with a bad digest".into()))?;
        let vector = routed.vector.clone();
        self.learn(model, &vector, score, Source::User)?;
        let routed = self.routed.get_mut(&task).ok_or(RouterError::NotRouted(task))?;
        routed.feedback = Some(score);
        if let Some(store) = &self.store {
            let mut batch = Batch::new();
            batch.put(Tree::Router, routed_key(&task), encode_routed(routed));
            store.commit(&batch)?;
        }
        Ok(routed)
    }
}

/// `[score f32][source u8][vector f32...]`, little-endian.
fn encode_example(e: &Example) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 4 * e.vector.len());
    out.extend_from_slice(&e.score.to_le_bytes());
    out.push(e.source.tag());
    out.extend(float_bytes(&e.vector));
    out
}

fn decode_example(bytes: &[u8]) -> Option<(f32, Source, Vec<f32>)> {
    if bytes.len() < 5 || !(bytes.len() - 5).is_multiple_of(4) || (bytes.len() - 5) / 4 > MAX_DIMENSIONS {
        return None;
    }
    let score = f32::from_le_bytes(bytes[..4].try_into().ok()?);
    let source = Source::from_tag(bytes[4])?;
    let vector = floats(&bytes[5..]);
    ((0.0..=1.0).contains(&score) && vector.iter().all(|x| x.is_finite())).then_some((score, source, vector))
}

/// `[seq u64][json length u32][json][vector f32...]`, little-endian.
fn encode_routed(r: &Routed) -> Vec<u8> {
    let json = serde_json::to_vec(r).unwrap_or_default();
    let mut out = Vec::with_capacity(12 + json.len() + 4 * r.vector.len());
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend(float_bytes(&r.vector));
    out
}

fn decode_routed(bytes: &[u8]) -> Option<Routed> {
    let seq = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let json = bytes.get(12..12usize.checked_add(len)?)?;
    let rest = &bytes[12 + len..];
    if !rest.len().is_multiple_of(4) || rest.len() / 4 > MAX_DIMENSIONS {
        return None;
    }
    let mut routed: Routed = serde_json::from_slice(json).ok()?;
    routed.vector = floats(rest);
    routed.seq = seq;
    Some(routed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mycel_store::SledStore;

    fn digest(name: &str) -> Digest {
        Digest::of(name.as_bytes())
    }

    /// Unit vectors on two axes and in between.
    fn code() -> Vec<f32> {
        vec![1.0, 0.0, 0.0]
    }
    fn chat() -> Vec<f32> {
        vec![0.0, 1.0, 0.0]
    }

    fn candidates() -> Vec<Candidate> {
        vec![
            Candidate { id: "big".into(), weights: digest("big"), profile: None, tokens_per_s: 50.0 },
            Candidate { id: "small".into(), weights: digest("small"), profile: None, tokens_per_s: 200.0 },
        ]
    }

    #[test]
    fn without_outcomes_the_cheaper_model_wins_and_outcomes_move_the_choice() {
        let mut r = Router::in_memory(digest("embedder"));
        let d = r.choose(&code(), &candidates(), DEFAULT_COST_WEIGHT).unwrap();
        assert_eq!(d.model, "small", "{d:?}");
        assert!(d.reason.contains("profile alone"), "{}", d.reason);
        // The small model fails code prompts, the big one passes them; both
        // do fine on chat.
        for _ in 0..5 {
            r.learn(digest("small"), &code(), 0.0, Source::Eval).unwrap();
            r.learn(digest("big"), &code(), 1.0, Source::Eval).unwrap();
            r.learn(digest("small"), &chat(), 1.0, Source::Eval).unwrap();
            r.learn(digest("big"), &chat(), 1.0, Source::Eval).unwrap();
        }
        let d = r.choose(&[0.9, 0.1, 0.0], &candidates(), DEFAULT_COST_WEIGHT).unwrap();
        assert_eq!(d.model, "big", "{d:?}");
        assert!(d.scores[0].evidence > 1.0);
        let d = r.choose(&[0.1, 0.9, 0.0], &candidates(), DEFAULT_COST_WEIGHT).unwrap();
        assert_eq!(d.model, "small", "chat stays on the cheap model: {d:?}");
        // With cost not counted, quality alone decides: big is never worse.
        let d = r.choose(&[0.1, 0.9, 0.0], &candidates(), 0.0).unwrap();
        assert_eq!(d.model, "big", "{d:?}");
    }

    /// A peer's outcome is second-hand: where it and the node's own
    /// disagree on the same prompt, the node's own weighs twice as much.
    #[test]
    fn a_peers_outcome_counts_half_of_our_own() {
        let mut r = Router::in_memory(digest("embedder"));
        r.learn(digest("big"), &code(), 1.0, Source::Eval).unwrap();
        r.learn(digest("big"), &code(), 0.0, Source::Peer).unwrap();
        let d = r.choose(&code(), &candidates(), 0.0).unwrap();
        let big = d.scores.iter().find(|s| s.model == "big").unwrap();
        assert!((big.evidence - (1.0 + PEER_WEIGHT)).abs() < 1e-4, "{big:?}");
        // Without the profile prior, the prediction would be exactly 2/3.
        let alone = (1.0 * 1.0 + PEER_WEIGHT * 0.0) / (1.0 + PEER_WEIGHT);
        assert!(big.quality > 0.5 && (big.quality - alone).abs() < 0.2, "{big:?}");
    }

    #[test]
    fn the_profile_prior_leans_toward_the_closer_profile() {
        let r = Router::in_memory(digest("embedder"));
        let mut c = candidates();
        c[0].profile = Some(code());
        c[1].profile = Some(chat());
        let d = r.choose(&[1.0, 0.05, 0.0], &c, DEFAULT_COST_WEIGHT).unwrap();
        assert_eq!(d.model, "big", "{d:?}");
        let d = r.choose(&[0.05, 1.0, 0.0], &c, DEFAULT_COST_WEIGHT).unwrap();
        assert_eq!(d.model, "small", "{d:?}");
    }

    #[test]
    fn bad_outcomes_are_refused_and_change_nothing() {
        let mut r = Router::in_memory(digest("embedder"));
        assert!(r.learn(digest("m"), &code(), 1.5, Source::User).is_err());
        assert!(r.learn(digest("m"), &[f32::NAN, 0.0, 0.0], 1.0, Source::User).is_err());
        assert!(r.learn(digest("m"), &[], 1.0, Source::User).is_err());
        assert!(r.examples().is_empty());
        assert!(matches!(r.feedback(TaskId([7; 16]), 1.0), Err(RouterError::NotRouted(_))));
    }

    #[test]
    fn what_it_learned_survives_a_restart_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId([1; 16]);
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
            let mut r = Router::open(store, digest("embedder")).unwrap();
            for i in 0..MAX_EXAMPLES_PER_MODEL + 3 {
                r.learn(digest("small"), &[1.0, i as f32, 0.0], 0.25, Source::Eval).unwrap();
            }
            let d = r.choose(&code(), &candidates(), 0.1).unwrap();
            r.routed_task(task, d, &code()).unwrap();
            r.feedback(task, 0.0).unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Router::open(store.clone(), digest("embedder")).unwrap();
        assert_eq!(r.examples()[&digest("small")], MAX_EXAMPLES_PER_MODEL, "bounded, the oldest dropped");
        let routed = r.routed(&task).unwrap();
        assert_eq!((routed.decision.model.as_str(), routed.feedback), ("small", Some(0.0)));
        // The feedback was learned: the small model's code outcome is there.
        assert_eq!(r.examples().len(), 1);
        // Another embedder's space starts empty.
        let other = Router::open(store, digest("other embedder")).unwrap();
        assert!(other.examples().is_empty());
    }

    #[test]
    fn exports_hold_own_outcomes_newest_first_and_imports_are_not_exported_again() {
        let mut a = Router::in_memory(digest("embedder"));
        a.learn(digest("big"), &code(), 1.0, Source::Eval).unwrap();
        a.learn(digest("small"), &chat(), 0.5, Source::User).unwrap();
        let shared = a.export(10);
        assert_eq!(shared.len(), 2);
        assert_eq!((shared[0].0, shared[0].2), (digest("small"), 0.5), "newest first");
        let mut b = Router::in_memory(digest("embedder"));
        assert_eq!(b.learn_many(shared.clone(), Source::Peer).unwrap(), 2);
        assert_eq!(b.examples().values().sum::<usize>(), 2);
        assert!(b.export(10).is_empty(), "imported outcomes are not shared on");
        // A bad outcome refuses the lot.
        let mut bad = shared;
        bad[1].2 = 7.0;
        assert!(b.learn_many(bad, Source::Peer).is_err());
        assert_eq!(b.examples().values().sum::<usize>(), 2);
        // Past the bound, the oldest go, in memory and in the store.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut c = Router::open(store.clone(), digest("embedder")).unwrap();
        let many: Vec<(Digest, Vec<f32>, f32)> =
            (0..MAX_EXAMPLES_PER_MODEL + 10).map(|i| (digest("m"), vec![1.0, i as f32], 0.5)).collect();
        c.learn_many(many, Source::Eval).unwrap();
        assert_eq!(c.examples()[&digest("m")], MAX_EXAMPLES_PER_MODEL);
        let reopened = Router::open(store, digest("embedder")).unwrap();
        assert_eq!(reopened.examples()[&digest("m")], MAX_EXAMPLES_PER_MODEL);
    }

    #[test]
    fn a_peers_outcomes_are_learned_once_and_never_crowd_out_our_own() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut r = Router::open(store.clone(), digest("embedder")).unwrap();
        let own: Vec<(Digest, Vec<f32>, f32)> =
            (0..MAX_EXAMPLES_PER_MODEL).map(|i| (digest("m"), vec![1.0, i as f32], 1.0)).collect();
        r.learn_many(own, Source::Eval).unwrap();
        let share = |from: usize, n: usize| -> Vec<(Digest, Vec<f32>, f32)> {
            (from..from + n).map(|i| (digest("m"), vec![-1.0, i as f32], 0.0)).collect()
        };
        // The same share twice (a peer answers every time it is asked):
        // learned once.
        assert_eq!(r.learn_many(share(0, 10), Source::Peer).unwrap(), 10);
        assert_eq!(r.learn_many(share(0, 10), Source::Peer).unwrap(), 0);
        assert_eq!(r.learn_many(share(5, 10), Source::Peer).unwrap(), 5, "only what is new");
        // The same outcome learned three times by the peer is three
        // observations; sent again, none; a fourth time, one more.
        let same = |n: usize| vec![(digest("m"), vec![0.5, 0.5], 1.0); n];
        assert_eq!(r.learn_many(same(3), Source::Peer).unwrap(), 3);
        assert_eq!(r.learn_many(same(3), Source::Peer).unwrap(), 0);
        assert_eq!(r.learn_many(same(4), Source::Peer).unwrap(), 1);
        // A flood of them keeps at most their own bound, the newest; our
        // own outcomes all stay.
        r.learn_many(share(1000, 3 * MAX_PEER_EXAMPLES_PER_MODEL), Source::Peer).unwrap();
        let count = |r: &Router, source: Source| {
            r.examples.get(&digest("m")).into_iter().flatten().filter(|e| e.source == source).count()
        };
        assert_eq!(count(&r, Source::Peer), MAX_PEER_EXAMPLES_PER_MODEL);
        assert_eq!(count(&r, Source::Eval), MAX_EXAMPLES_PER_MODEL);
        // And ours, growing past their bound, push out only ours.
        r.learn(digest("m"), &[1.0, -1.0], 1.0, Source::User).unwrap();
        assert_eq!(count(&r, Source::Peer), MAX_PEER_EXAMPLES_PER_MODEL);
        assert_eq!(count(&r, Source::Eval) + count(&r, Source::User), MAX_EXAMPLES_PER_MODEL);
        let newest = r.examples[&digest("m")].iter().rev().find(|e| e.source == Source::Peer).unwrap();
        assert_eq!(newest.vector, normalized(&[-1.0, (1000 + 3 * MAX_PEER_EXAMPLES_PER_MODEL - 1) as f32]));
        // The store holds exactly the same.
        let reopened = Router::open(store, digest("embedder")).unwrap();
        assert_eq!(count(&reopened, Source::Peer), MAX_PEER_EXAMPLES_PER_MODEL);
        assert_eq!(count(&reopened, Source::Eval) + count(&reopened, Source::User), MAX_EXAMPLES_PER_MODEL);
    }

    #[test]
    fn corrupt_entries_are_dropped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut batch = Batch::new();
        batch.put(Tree::Router, example_key(&digest("embedder"), &digest("m"), 3), vec![1, 2, 3]);
        batch.put(Tree::Router, b"t/nonsense".to_vec(), vec![0; 40]);
        store.commit(&batch).unwrap();
        let r = Router::open(store.clone(), digest("embedder")).unwrap();
        assert!(r.examples().is_empty());
        assert!(store.scan_prefix(Tree::Router, b"").unwrap().is_empty(), "junk deleted");
    }
}
