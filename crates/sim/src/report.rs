//! What a run shows: a summary for people, with the invariant violations
//! (if any) and the command that replays the run.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::check::{Violation, mean};
use crate::scenario::Behaviour;
use crate::world::{Sim, Stats};

/// The outcome of one simulated run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed that replays it.
    pub seed: u64,
    /// Nodes, and how many behaved each way.
    pub nodes: usize,
    pub behaviours: BTreeMap<Behaviour, usize>,
    /// Tasks submitted, completed, and failed (by reason).
    pub tasks: usize,
    pub done: u64,
    pub failed: BTreeMap<String, u64>,
    /// Shards in the completed tasks' receipts; of those, with a wrong
    /// output (a lie that went unchecked, or colluders' majority).
    pub shards_accepted: u64,
    pub wrong_shards: u64,
    /// Network, crash and market counts.
    pub stats: Stats,
    /// Lying nodes, and how many of them at least one requester caught.
    pub liars: usize,
    pub liars_caught: usize,
    /// Honest results outvoted by colluding sybils.
    pub collusion_wins: u64,
    /// Acceptances revoked once their signer was caught lying.
    pub revoked: u64,
    /// Truthful peers' results refused, by reason.
    pub honest_refused: BTreeMap<String, u64>,
    /// Mean reputation requesters hold of each kind of peer they judged.
    pub reputation: BTreeMap<Behaviour, f64>,
    /// Invariants broken.
    pub violations: Vec<Violation>,
    /// Virtual time the run covered, and wall time it took.
    pub virtual_ms: u64,
    pub wall: Duration,
    /// Peak resident memory of this process, if the system says.
    pub peak_rss_bytes: Option<u64>,
    /// A digest of every event in order: equal runs, equal traces.
    pub trace: u64,
}

impl Report {
    pub(crate) fn new(sim: &Sim, wall: Duration) -> Self {
        let mut behaviours = BTreeMap::new();
        for n in &sim.nodes {
            *behaviours.entry(n.behaviour).or_default() += 1;
        }
        let liars = sim.nodes.iter().filter(|n| n.behaviour.lies()).count();
        let caught: std::collections::BTreeSet<usize> = sim.check.caught.values().flatten().copied().collect();
        let mut scores: BTreeMap<Behaviour, Vec<f64>> = BTreeMap::new();
        let index: BTreeMap<_, _> = sim.nodes.iter().map(|n| (n.key, n.behaviour)).collect();
        for r in sim.nodes.iter().take(sim.scenario.requesters) {
            let Some(m) = &r.machine else { continue };
            for (peer, score) in m.reputations(sim.now) {
                if let Some(b) = index.get(&peer) {
                    scores.entry(*b).or_default().push(score);
                }
            }
        }
        let first = sim.tasks.iter().map(|t| t.submitted_ms).min().unwrap_or(sim.now);
        Self {
            seed: sim.seed(),
            nodes: sim.nodes.len(),
            behaviours,
            tasks: sim.tasks.len(),
            done: sim.check.done,
            failed: sim.check.failed.clone(),
            shards_accepted: sim.check.shards_accepted,
            wrong_shards: sim.check.wrong_shards,
            stats: sim.stats.clone(),
            liars,
            liars_caught: caught.len(),
            collusion_wins: sim.check.collusion_wins,
            revoked: sim.check.revoked,
            honest_refused: sim.check.honest_refused.clone(),
            reputation: scores.into_iter().map(|(b, s)| (b, mean(&s))).collect(),
            violations: sim.check.violations.clone(),
            virtual_ms: sim.now.saturating_sub(first),
            wall,
            peak_rss_bytes: peak_rss(),
            trace: sim.trace(),
        }
    }

    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Tasks that failed, whatever the reason.
    pub fn failed_count(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The process's peak resident set (VmHWM), on Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self.behaviours.iter().map(|(b, n)| format!("{n} {}", b.name())).collect();
        writeln!(f, "seed {}: {} nodes ({})", self.seed, self.nodes, kinds.join(", "))?;
        writeln!(f, "tasks: {} submitted, {} done, {} failed", self.tasks, self.done, self.failed_count())?;
        for (reason, n) in &self.failed {
            writeln!(f, "  failed x{n}: {reason}")?;
        }
        let s = &self.stats;
        writeln!(
            f,
            "shards: {} accepted ({} wrong), {} runs, {} given back, {} re-auctions",
            self.shards_accepted, self.wrong_shards, s.jobs, s.given_back, s.reauctions
        )?;
        writeln!(
            f,
            "network: {} messages, {} lost, {} duplicated, {} unreachable; {} crashes ({} of requesters)",
            s.messages, s.lost, s.duplicated, s.unreachable, s.crashes, s.requester_crashes
        )?;
        writeln!(
            f,
            "liars: {} caught of {}; {} acceptances revoked; {} replayed results; {} honest results outvoted by colluders",
            self.liars_caught, self.liars, self.revoked, s.replays, self.collusion_wins
        )?;
        if !self.honest_refused.is_empty() {
            writeln!(f, "truthful results refused: {:?}", self.honest_refused)?;
        }
        let reps: Vec<String> = self.reputation.iter().map(|(b, r)| format!("{} {r:.3}", b.name())).collect();
        writeln!(f, "mean reputation held by requesters: {}", reps.join(", "))?;
        let rss = self.peak_rss_bytes.map_or("unknown".into(), |b| format!("{} MiB", b / (1024 * 1024)));
        writeln!(
            f,
            "time: {:.1} s virtual, {:.2} s wall, {} events; peak memory {rss}; trace {:016x}",
            self.virtual_ms as f64 / 1000.0,
            self.wall.as_secs_f64(),
            s.events,
            self.trace
        )?;
        if self.violations.is_empty() {
            write!(f, "invariants: all held")
        } else {
            writeln!(f, "invariants: {} violations", self.violations.len())?;
            for v in self.violations.iter().take(20) {
                writeln!(f, "  at {} ms: {}", v.at_ms, v.what)?;
            }
            if self.violations.len() > 20 {
                writeln!(f, "  ... and {} more", self.violations.len() - 20)?;
            }
            Ok(())
        }
    }
}
