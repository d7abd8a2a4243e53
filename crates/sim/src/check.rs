//! The invariants, checked as the run goes (every award, ack and ending)
//! and once at its end:
//!
//! 1. every task completes, or fails with a reason, by its deadline (or
//!    at its requester's first step after it, if the requester was down);
//! 2. every accepted result was awarded to its signer and its signature
//!    verifies (the receipt's claims, slices and root all check);
//! 3. no shard is accepted twice: all acceptances of a shard come from one
//!    decision, unless everyone accepted was since caught lying in that
//!    task (the requester then reopens what they decided alone: counted as
//!    revoked);
//! 4. nothing accepted is lost across restarts (the receipt holds the
//!    claim that was accepted, even if the requester died in between);
//! 5. honest work is never discarded because of a liar (never outvoted,
//!    never called a forgery or a mismatch), except where colluding sybils
//!    held the majority of a shard's copies: counted, since no vote can
//!    tell them from the truth;
//! 6. liars end with lower reputation than honest peers, at every
//!    requester that caught them.

use std::collections::{BTreeMap, BTreeSet};

use mycel_protocol::rpc::Market;
use mycel_protocol::{
    Award, Digest, PublicKey, Receipt, RejectReason, ResultAck, ShardOutput, Signed, TaskId, Verdict, Wire,
};

use crate::scenario::Behaviour;
use crate::world::{SimNode, TaskRecord};

/// One broken invariant: when (virtual ms since the start) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time, ms since the run started.
    pub at_ms: u64,
    /// What went wrong.
    pub what: String,
}

/// How one shard was decided: the step that decided it and each accepted
/// claim with its signer.
#[derive(Debug)]
struct Decision {
    step: u64,
    accepted: Vec<(Digest, usize)>,
}

/// What the invariants watch, and what they found.
#[derive(Debug, Default)]
pub struct Checker {
    pub(crate) violations: Vec<Violation>,
    /// Who was awarded each shard, ever.
    awarded: BTreeMap<(TaskId, u32), BTreeSet<usize>>,
    decided: BTreeMap<(TaskId, u32), Decision>,
    /// Honest results outvoted, to judge once the shard is decided.
    outvoted: Vec<(TaskId, u32, usize)>,
    /// Lying peers each requester caught (a lie-shaped rejection).
    pub(crate) caught: BTreeMap<usize, BTreeSet<usize>>,
    /// Liars caught in each task.
    liars_in: BTreeSet<(TaskId, usize)>,
    /// Acceptances revoked because their signer was caught lying.
    pub(crate) revoked: u64,
    /// Results of truthful peers refused, by reason (late ones, and ones
    /// for shards done elsewhere, are not counted).
    pub(crate) honest_refused: BTreeMap<String, u64>,
    /// Honest results outvoted by colluding sybils.
    pub(crate) collusion_wins: u64,
    pub(crate) done: u64,
    pub(crate) failed: BTreeMap<String, u64>,
    pub(crate) shards_accepted: u64,
    /// Accepted shards whose output is not the honest one.
    pub(crate) wrong_shards: u64,
    start_ms: u64,
}

fn truthful(b: Behaviour) -> bool {
    !b.lies()
}

impl Checker {
    pub(crate) fn starting_at(mut self, ms: u64) -> Self {
        self.start_ms = ms;
        self
    }

    pub(crate) fn violation(&mut self, now_ms: u64, what: String) {
        self.violations.push(Violation { at_ms: now_ms.saturating_sub(self.start_ms), what });
    }

    /// A message a node's machine sent (not a retry).
    pub(crate) fn sent(&mut self, now_ms: u64, step: u64, node: usize, to: usize, message: &Market, nodes: &[SimNode]) {
        match message {
            Market::Award(signed) => {
                let Ok(award) = Award::decode(signed.payload()) else { return };
                for s in award.shards {
                    self.awarded.entry((award.task, s.shard)).or_default().insert(to);
                }
            }
            Market::Ack(signed) => {
                let Ok(ack) = ResultAck::decode(signed.payload()) else { return };
                self.ack(now_ms, step, node, to, &ack, nodes);
            }
            _ => {}
        }
    }

    fn ack(&mut self, now_ms: u64, step: u64, node: usize, to: usize, ack: &ResultAck, nodes: &[SimNode]) {
        let key = (ack.task, ack.shard);
        match ack.verdict {
            Verdict::Accepted => {
                let d = self.decided.entry(key).or_insert(Decision { step, accepted: Vec::new() });
                if d.step != step {
                    // Decided again: only allowed when everyone accepted
                    // before was since caught lying in this task (the
                    // requester reopens what a liar decided alone).
                    let revoked = d.accepted.iter().all(|(_, n)| self.liars_in.contains(&(ack.task, *n)));
                    if !revoked {
                        let what =
                            format!("shard {} of task {} accepted twice (second time: node {to})", ack.shard, ack.task);
                        self.violation(now_ms, what);
                        return;
                    }
                    self.revoked += 1;
                    *d = Decision { step, accepted: Vec::new() };
                }
                d.accepted.push((ack.claim, to));
            }
            Verdict::Rejected(RejectReason::Late | RejectReason::AlreadyComplete) => {}
            Verdict::Rejected(reason) => {
                let target = nodes[to].behaviour;
                if !truthful(target) {
                    self.caught.entry(node).or_default().insert(to);
                    self.liars_in.insert((ack.task, to));
                    return;
                }
                match reason {
                    RejectReason::Disagreement => self.outvoted.push((ack.task, ack.shard, to)),
                    RejectReason::NotAwarded => *self.honest_refused.entry(format!("{reason:?}")).or_default() += 1,
                    _ => {
                        let what = format!(
                            "node {node} refused truthful node {to}'s result for shard {} of task {}: {reason:?}",
                            ack.shard, ack.task
                        );
                        self.violation(now_ms, what);
                    }
                }
            }
            // A verdict this simulator does not know yet: say so.
            _ => self.violation(now_ms, format!("unknown verdict {:?}", ack.verdict)),
        }
    }

    /// Task number `t` was refused at submission.
    pub(crate) fn refused(&mut self, _t: usize, reason: String) {
        *self.failed.entry(format!("refused: {reason}")).or_default() += 1;
    }

    /// Task number `t` failed.
    pub(crate) fn failed(&mut self, _t: usize, reason: String) {
        // Shard numbers and counts vary; the reason's shape is what counts.
        let shape: String = reason.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
        *self.failed.entry(shape).or_default() += 1;
    }

    /// Task number `t` completed: its receipt, its output and what was
    /// accepted on the way must agree.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn done(
        &mut self,
        now_ms: u64,
        task: TaskId,
        output: &ShardOutput,
        receipt: &Signed<Receipt>,
        expected: &ShardOutput,
        nodes: &[SimNode],
        index: &BTreeMap<PublicKey, usize>,
    ) {
        self.done += 1;
        let receipt = match receipt.verify() {
            Ok(r) => r,
            Err(e) => return self.violation(now_ms, format!("task {task}: receipt signature: {e}")),
        };
        if let Err(e) = receipt.check_claims().and_then(|()| receipt.check_output(output)) {
            self.violation(now_ms, format!("task {task}: receipt does not check: {e}"));
        }
        for (i, claim) in receipt.shards.iter().enumerate() {
            let key = (task, i as u32);
            let signer = index.get(claim.signer()).copied();
            let awarded = signer.is_some_and(|s| self.awarded.get(&key).is_some_and(|a| a.contains(&s)));
            if !awarded {
                self.violation(now_ms, format!("task {task}: shard {i} accepted from a peer never awarded it"));
            }
            match self.decided.get(&key) {
                Some(d) if d.accepted.iter().any(|(c, _)| *c == claim.digest()) => {}
                Some(_) => self.violation(now_ms, format!("task {task}: shard {i}'s accepted result was replaced")),
                None => self.violation(now_ms, format!("task {task}: shard {i} in the receipt was never accepted")),
            }
            self.shards_accepted += 1;
            let Ok(c) = mycel_protocol::ResultClaim::decode(claim.payload()) else { continue };
            let (first, items) = (c.first_item as usize, c.items as usize);
            if output.slice(first, items) != expected.slice(first, items) {
                self.wrong_shards += 1;
            }
        }
        if output.items() != expected.items() {
            self.violation(now_ms, format!("task {task}: {} items out of {}", output.items(), expected.items()));
        }
        self.judge_outvoted(now_ms, Some(task), nodes);
        // The task is over: what was tracked for it can go.
        self.awarded.retain(|(t, _), _| *t != task);
        self.decided.retain(|(t, _), _| *t != task);
        self.liars_in.retain(|(t, _)| *t != task);
    }

    /// Honest results outvoted: only colluding sybils may have done it.
    fn judge_outvoted(&mut self, now_ms: u64, task: Option<TaskId>, nodes: &[SimNode]) {
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.outvoted).into_iter().partition(|(t, _, _)| task.is_none_or(|x| x == *t));
        self.outvoted = later;
        for (t, shard, node) in now {
            let winners = self.decided.get(&(t, shard)).map(|d| d.accepted.iter().map(|(_, n)| *n).collect::<Vec<_>>());
            match winners {
                Some(w) if !w.is_empty() && w.iter().all(|n| nodes[*n].behaviour == Behaviour::Sybil) => {
                    self.collusion_wins += 1;
                }
                _ => {
                    self.violation(now_ms, format!("task {t}: honest node {node}'s result for shard {shard} outvoted"))
                }
            }
        }
    }

    /// A task ended: was it in time?
    pub(crate) fn ended_in_time(&mut self, deadline_ms: u64, record: &TaskRecord, requester: &SimNode) {
        let Some(ended) = record.ended_ms else { return };
        let due = record.submitted_ms + deadline_ms;
        // A requester that was down at the deadline ends the task when it
        // is back.
        if ended > due && requester.restarted_ms < due {
            let late = ended - due;
            self.violation(ended, format!("task {:?} ended {late} ms after its deadline", record.id));
        }
    }

    /// What only the end shows: tasks that never ended, reputations.
    pub(crate) fn finish(&mut self, nodes: &[SimNode], tasks: &[TaskRecord], now_ms: u64) {
        for (t, record) in tasks.iter().enumerate() {
            if record.ended_ms.is_none() {
                self.violation(now_ms, format!("task number {t} ({:?}) never ended", record.id));
            }
        }
        self.judge_outvoted(now_ms, None, nodes);
        for (requester, caught) in self.caught.clone() {
            let Some(machine) = nodes[requester].machine.as_ref() else { continue };
            let book: BTreeMap<PublicKey, f64> = machine.reputations(now_ms).collect();
            let score = |n: &usize| book.get(&nodes[*n].key).copied();
            let liars: Vec<f64> = caught.iter().filter_map(score).collect();
            let honest: Vec<f64> = (0..nodes.len())
                .filter(|n| nodes[*n].behaviour == Behaviour::Honest && *n != requester)
                .filter_map(|n| score(&n))
                .collect();
            if liars.is_empty() || honest.is_empty() {
                continue;
            }
            let (l, h) = (mean(&liars), mean(&honest));
            if l >= h {
                self.violation(
                    now_ms,
                    format!("node {requester}: liars it caught average reputation {l:.3}, honest peers {h:.3}"),
                );
            }
        }
    }
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}
