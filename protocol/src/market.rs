//! Contract-net messages between a requester and workers: call for
//! proposals, bid, award, result claim and output, acknowledgement.
//!
//! The order of a shard's life: the requester sends a [`Cfp`]; workers
//! answer with signed [`Bid`]s; the requester sends each winner an
//! [`Award`] carrying the shard inputs; the worker computes and sends a
//! [`ShardResult`] (a signed [`ResultClaim`] plus the output it commits to)
//! as its own message; the requester answers with a signed [`ResultAck`].

use serde::{Deserialize, Serialize};

use crate::advert::{ModelKind, Price};
use crate::codec::rules::{at_most, bounded, speed};
use crate::{Digest, Signed, TaskId, Work, limits};

/// One shard on offer in a CFP: enough to estimate the work, not the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ShardOffer {
    /// Shard index within the task.
    pub shard: u32,
    /// Items (texts or prompts) in the shard.
    pub items: u32,
    /// Units of work: items for embeddings, max tokens for generation.
    pub units: u64,
}

/// Call for proposals: "who will run these shards on these weights?"
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Cfp {
    /// The task the shards belong to.
    pub task: TaskId,
    /// Auction round; a re-auction of failed shards gets a new round.
    pub round: u32,
    /// Weights the shards must run on.
    pub model: Digest,
    /// The model's kind.
    pub kind: ModelKind,
    /// The shards offered.
    pub shards: Vec<ShardOffer>,
    /// Highest price the requester accepts; `None` for any.
    pub max_price: Option<Price>,
    /// Bids arriving after this (ms since the Unix epoch) are ignored.
    pub bids_close_ms: u64,
    /// Commitment to the task's spot-check secret ([`crate::spot`]):
    /// workers copy it into their claims.
    pub spot_commitment: Digest,
}

impl Cfp {
    fn check(&self) -> Result<(), String> {
        at_most("shards", &self.shards, limits::SHARDS_PER_CFP)
    }
}

crate::wire!(Cfp, limits::CFP, validate = Cfp::check);

impl crate::SignedKind for Cfp {
    const DOMAIN: &'static str = "mycel/cfp/2";
}

/// A worker's offer to run shards of a CFP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Bid {
    /// The task.
    pub task: TaskId,
    /// The CFP round answered.
    pub round: u32,
    /// Digest of the signed CFP answered, so a bid can't be moved to
    /// another auction.
    pub cfp: Digest,
    /// Weights the worker will use.
    pub model: Digest,
    /// Asking price.
    pub price: Price,
    /// Milliseconds of work already queued ahead of a new shard.
    pub queue_ms: u64,
    /// Units of work per second the worker measured on this model.
    pub units_per_s: f32,
    /// Shards it will take at once.
    pub capacity: u32,
    /// The bid is void after this (ms since the Unix epoch).
    pub expires_ms: u64,
}

impl Bid {
    /// Every number here feeds the requester's arithmetic (finish times,
    /// deadlines): each is bounded so none can overflow it.
    fn check(&self) -> Result<(), String> {
        speed("units_per_s", self.units_per_s)?;
        bounded("queue_ms", self.queue_ms, limits::MAX_QUEUE_MS)?;
        bounded("capacity", self.capacity, limits::MAX_CAPACITY)
    }
}

crate::wire!(Bid, limits::BID, validate = Bid::check);

impl crate::SignedKind for Bid {
    const DOMAIN: &'static str = "mycel/bid/1";
}

/// One shard given to a worker, with its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AwardedShard {
    /// Shard index within the task.
    pub shard: u32,
    /// Index of the shard's first item in the task's input.
    pub first_item: u64,
    /// The shard's input.
    pub work: Work,
    /// The result is late after this (ms since the Unix epoch).
    pub deadline_ms: u64,
}

/// The requester's acceptance of a bid, carrying the shards to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Award {
    /// The task.
    pub task: TaskId,
    /// The auction round.
    pub round: u32,
    /// Digest of the signed bid accepted.
    pub bid: Digest,
    /// Weights to run on.
    pub model: Digest,
    /// The shards given.
    pub shards: Vec<AwardedShard>,
}

impl Award {
    fn check(&self) -> Result<(), String> {
        at_most("shards", &self.shards, limits::SHARDS_PER_CFP)?;
        for s in &self.shards {
            crate::Wire::validate(&s.work)?;
            if s.work.items() > limits::ITEMS_PER_SHARD {
                return Err(format!("shard {} has {} items", s.shard, s.work.items()));
            }
        }
        Ok(())
    }
}

crate::wire!(Award, limits::AWARD, validate = Award::check);

impl crate::SignedKind for Award {
    const DOMAIN: &'static str = "mycel/award/1";
}

/// Time spent on a shard, as reported by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Timings {
    /// Waiting in the worker's queue.
    pub queued_ms: u32,
    /// Computing.
    pub compute_ms: u32,
}

/// What a worker signs about a shard it ran: small, so receipts can carry
/// one per shard and be checked without the outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ResultClaim {
    /// The task.
    pub task: TaskId,
    /// Shard index.
    pub shard: u32,
    /// Index of the shard's first item in the task's input.
    pub first_item: u64,
    /// Items in the shard.
    pub items: u32,
    /// [`Work::digest`] of the input the worker ran.
    pub input: Digest,
    /// Weights it ran on.
    pub model: Digest,
    /// [`ShardOutput::digest`] of the output.
    pub output: Digest,
    /// Time taken.
    pub timings: Timings,
    /// Input tokens the model read (texts after truncation, or rendered
    /// prompts): what usage reports count. The worker's word.
    pub input_tokens: u64,
    /// The spot-check commitment of the CFP the worker bid on: proof that
    /// the requester committed to its checks before this work was done.
    pub spot_commitment: Digest,
}

crate::wire!(ResultClaim, limits::RESULT_CLAIM);

impl crate::SignedKind for ResultClaim {
    const DOMAIN: &'static str = "mycel/result/2";
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum FinishReason {
    /// The model emitted its end-of-sequence token.
    EndOfSequence,
    /// `max_tokens` reached.
    Length,
    /// A stop sequence was produced.
    Stop,
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Generation {
    /// The text, stop sequence and tool calls excluded.
    pub text: String,
    /// Tokens generated.
    pub tokens: u32,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Per generated token, when the work asked for them
    /// ([`crate::GenerateParams::logprobs`]); empty otherwise.
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::collection::vec(proptest::arbitrary::any::<TokenLogprob>(), 0..3)")
    )]
    pub logprobs: Vec<TokenLogprob>,
    /// Functions the model asked to call (chat with tools), in order.
    #[cfg_attr(test, proptest(strategy = "proptest::collection::vec(proptest::arbitrary::any::<ToolCall>(), 0..2)"))]
    pub tool_calls: Vec<ToolCall>,
}

impl Generation {
    /// A plain answer: no log probabilities, no tool calls.
    pub fn text(text: impl Into<String>, tokens: u32, finish: FinishReason) -> Self {
        Self { text: text.into(), tokens, finish, logprobs: Vec::new(), tool_calls: Vec::new() }
    }

    /// Whether two copies of one greedy answer agree: the same text, tokens
    /// and calls exactly, and log probabilities within `tolerance` (nats).
    /// Log probabilities are floating-point sums whose last digits depend
    /// on the CPU's kernels (AVX2 or AVX-512), so they cannot be compared
    /// exactly; the tokens chosen can, and are.
    pub fn agrees(&self, other: &Self, tolerance: f32) -> bool {
        let close = |a: f32, b: f32| (a - b).abs() <= tolerance || (a == b);
        let same_top = |a: &[TopLogprob], b: &[TopLogprob]| {
            // Alternatives within the tolerance of each other may swap
            // places or fall off the end of the list: compare those found
            // in both, and require the rest to be near the other's cut.
            let floor = |l: &[TopLogprob]| l.last().map_or(f32::NEG_INFINITY, |t| t.logprob);
            a.len() == b.len()
                && a.iter().all(|x| match b.iter().find(|y| y.token == x.token) {
                    Some(y) => close(x.logprob, y.logprob),
                    None => x.logprob <= floor(b) + tolerance,
                })
                && b.iter().all(|y| a.iter().any(|x| x.token == y.token) || y.logprob <= floor(a) + tolerance)
        };
        self.text == other.text
            && self.tokens == other.tokens
            && self.finish == other.finish
            && self.tool_calls == other.tool_calls
            && self.logprobs.len() == other.logprobs.len()
            && self
                .logprobs
                .iter()
                .zip(&other.logprobs)
                .all(|(a, b)| a.token == b.token && close(a.logprob, b.logprob) && same_top(&a.top, &b.top))
    }
}

/// How likely the model found one token it generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TokenLogprob {
    /// The token's text (a token may hold part of a character: its bytes
    /// then decode lossily).
    pub token: String,
    /// Natural log of its probability, before sampling settings.
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first.
    #[cfg_attr(test, proptest(strategy = "proptest::collection::vec(proptest::arbitrary::any::<TopLogprob>(), 0..3)"))]
    pub top: Vec<TopLogprob>,
}

/// One alternative at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
}

/// A function call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ToolCall {
    /// The function's name, as the tool definition gives it.
    pub name: String,
    /// Its arguments: a JSON object, as text.
    pub arguments: String,
}

/// A shard's output, one entry per input item in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum ShardOutput {
    /// Row-major vectors, `values.len() == items * dimensions`.
    Embeddings {
        /// Width of each vector.
        dimensions: u32,
        /// All vectors back to back.
        values: Vec<f32>,
    },
    /// One completion per prompt.
    Generations(Vec<Generation>),
}

impl ShardOutput {
    /// Items in the output.
    pub fn items(&self) -> usize {
        match self {
            ShardOutput::Embeddings { dimensions: 0, .. } => 0,
            ShardOutput::Embeddings { dimensions, values } => values.len() / *dimensions as usize,
            ShardOutput::Generations(g) => g.len(),
        }
    }

    /// Content hash of the encoded output: what a claim commits to.
    pub fn digest(&self) -> Result<Digest, crate::EncodeError> {
        Ok(Digest::of(&crate::Wire::encode(self)?))
    }

    /// Items `first..first + items` as an output of their own: a shard's
    /// part of a concatenated result. `None` when out of range.
    pub fn slice(&self, first: usize, items: usize) -> Option<ShardOutput> {
        let end = first.checked_add(items)?;
        if end > self.items() {
            return None;
        }
        Some(match self {
            ShardOutput::Embeddings { dimensions, values } => {
                let d = *dimensions as usize;
                ShardOutput::Embeddings { dimensions: *dimensions, values: values[first * d..end * d].to_vec() }
            }
            ShardOutput::Generations(g) => ShardOutput::Generations(g[first..end].to_vec()),
        })
    }

    fn check(&self) -> Result<(), String> {
        match self {
            ShardOutput::Embeddings { dimensions, values } => {
                if *dimensions == 0 && !values.is_empty() {
                    return Err("vectors of zero dimensions".into());
                }
                if *dimensions != 0 && values.len() % *dimensions as usize != 0 {
                    return Err(format!("{} values is not a whole number of {dimensions}-vectors", values.len()));
                }
                if values.iter().any(|v| !v.is_finite()) {
                    return Err("non-finite value in an embedding".into());
                }
                Ok(())
            }
            ShardOutput::Generations(g) => at_most("generations", g, limits::ITEMS_PER_SHARD),
        }
    }
}

crate::wire!(ShardOutput, limits::SHARD_RESULT, validate = ShardOutput::check);

/// A worker's result for one shard: the signed claim and the output it
/// commits to. Sent as its own message once computed, never as the
/// response to a long-held request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardResult {
    /// The worker's signed claim.
    pub claim: Signed<ResultClaim>,
    /// The output; its digest must equal the claim's `output`.
    pub output: ShardOutput,
}

crate::wire!(ShardResult, limits::SHARD_RESULT, validate = |r: &ShardResult| crate::Wire::validate(&r.output));

impl ShardResult {
    /// Checks the claim's signature, once: what the market core takes.
    pub fn into_verified(self) -> Result<VerifiedResult, crate::VerifyError> {
        Ok(VerifiedResult { claim: self.claim.into_verified()?, output: self.output })
    }
}

/// A [`ShardResult`] whose claim's signature was checked where it entered
/// the node. Whether the output matches the claim is the requester's
/// question, not this type's. Stored in the same form as `ShardResult`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifiedResult {
    /// The worker's claim, signature checked.
    pub claim: crate::Verified<ResultClaim>,
    /// The output the claim commits to (unchecked).
    pub output: ShardOutput,
}

impl VerifiedResult {
    /// The wire form, to send on.
    pub fn to_wire(&self) -> ShardResult {
        ShardResult { claim: self.claim.signed().clone(), output: self.output.clone() }
    }
}

/// Why a requester refused a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum RejectReason {
    /// The claim's signature is invalid.
    BadSignature,
    /// Signed by a peer the shard was not awarded to.
    NotAwarded,
    /// Input digest differs from the shard's.
    InputMismatch,
    /// Model digest differs from the award's.
    ModelMismatch,
    /// The output does not hash to the claim's output digest, or has the
    /// wrong number of items.
    OutputMismatch,
    /// Arrived after the shard was completed by someone else.
    AlreadyComplete,
    /// Arrived after the deadline.
    Late,
    /// Outvoted by other executions of the same shard.
    Disagreement,
}

/// What the requester thought of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Verdict {
    /// Counted.
    Accepted,
    /// Not counted, and why.
    Rejected(RejectReason),
}

/// The requester's signed answer to a [`ShardResult`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ResultAck {
    /// The task.
    pub task: TaskId,
    /// Shard index.
    pub shard: u32,
    /// Digest of the signed claim this answers.
    pub claim: Digest,
    /// Accepted or not.
    pub verdict: Verdict,
}

crate::wire!(ResultAck, limits::RESULT_ACK);

impl crate::SignedKind for ResultAck {
    const DOMAIN: &'static str = "mycel/ack/1";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token, its log probability and its alternatives'.
    type Step<'a> = (&'a str, f32, &'a [(&'a str, f32)]);

    fn answer(logprobs: &[Step]) -> Generation {
        let mut g = Generation::text("ab", logprobs.len() as u32, FinishReason::Length);
        g.logprobs = logprobs
            .iter()
            .map(|(token, logprob, top)| TokenLogprob {
                token: (*token).into(),
                logprob: *logprob,
                top: top.iter().map(|(t, l)| TopLogprob { token: (*t).into(), logprob: *l }).collect(),
            })
            .collect();
        g
    }

    #[test]
    fn copies_agree_on_tokens_exactly_and_on_log_probabilities_within_the_tolerance() {
        let a = answer(&[("a", -0.10, &[("a", -0.10), ("x", -2.90), ("y", -3.00)]), ("b", -1.0, &[])]);
        // Another CPU: the numbers moved a little, two close alternatives
        // swapped, the last one fell off for one near the cut.
        let b = answer(&[("a", -0.12, &[("a", -0.12), ("y", -2.95), ("z", -3.02)]), ("b", -1.1, &[])]);
        assert!(a.agrees(&b, 0.5) && b.agrees(&a, 0.5));
        assert!(!a.agrees(&b, 0.01), "beyond the tolerance");
        // A different token, however close its probability, is a different answer.
        let c = answer(&[("a", -0.10, &[("a", -0.10), ("x", -2.90), ("y", -3.00)]), ("c", -1.0, &[])]);
        assert!(!a.agrees(&c, 0.5));
        // An alternative far above the other's cut cannot simply be missing.
        let d = answer(&[("a", -0.10, &[("a", -0.10), ("q", -0.20), ("y", -3.00)]), ("b", -1.0, &[])]);
        assert!(!a.agrees(&d, 0.5));
        // Text, calls and finish compare exactly.
        let mut e = a.clone();
        e.tool_calls.push(ToolCall { name: "f".into(), arguments: "{}".into() });
        assert!(!a.agrees(&e, 0.5));
        assert!(a.agrees(&a.clone(), 0.0));
    }
}
