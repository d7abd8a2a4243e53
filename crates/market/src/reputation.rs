//! How much a requester trusts a worker, from what it has seen of it.
//!
//! - A fault (a lie caught by redundancy, a bad signature, a missed
//!   deadline) halves the score and ends the peer's streak.
//! - Valid results earn it back slowly, faster over a streak of
//!   consecutive ones: +0.005 per result, growing to +0.04 after eight.
//! - Below [`crate::Config::min_reputation`] a peer gets no work, so it
//!   cannot earn anything back by working; time does it instead: the score
//!   drifts back toward [`DEFAULT`] at [`FORGIVE_PER_HOUR`] after the last
//!   fault. A peer that keeps cheating keeps being halved.

use serde::{Deserialize, Serialize};

/// A peer never worked with.
pub const DEFAULT: f64 = 0.8;
/// Recovery per hour without a fault, up to [`DEFAULT`].
pub const FORGIVE_PER_HOUR: f64 = 0.05;
/// Reward per valid result at the start of a streak.
const STEP: f64 = 0.005;
/// Streak length at which the reward stops growing.
const MAX_STREAK: u32 = 8;

/// One peer's standing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    score: f64,
    streak: u32,
    last_fault_ms: u64,
}

impl Default for Reputation {
    fn default() -> Self {
        Self { score: DEFAULT, streak: 0, last_fault_ms: 0 }
    }
}

impl Reputation {
    /// The score now, 0..=1, with time's forgiveness applied.
    pub fn score(&self, now_ms: u64) -> f64 {
        if self.score >= DEFAULT || self.last_fault_ms == 0 {
            return self.score;
        }
        let hours = now_ms.saturating_sub(self.last_fault_ms) as f64 / 3_600_000.0;
        (self.score + hours * FORGIVE_PER_HOUR).min(DEFAULT)
    }

    /// A fault: halved, streak over.
    pub fn fault(&mut self, now_ms: u64) {
        self.score = self.score(now_ms) * 0.5;
        self.streak = 0;
        self.last_fault_ms = now_ms.max(1);
    }

    /// A valid result.
    pub fn valid(&mut self, now_ms: u64) {
        self.score = self.score(now_ms);
        if self.score < DEFAULT {
            // Forgiveness so far is banked; time counts again from here.
            self.last_fault_ms = now_ms.max(1);
        }
        self.streak = self.streak.saturating_add(1);
        self.score = (self.score + STEP * f64::from(self.streak.min(MAX_STREAK))).min(1.0);
    }

    /// Stored form: score, streak, last fault (20 bytes, little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&self.score.to_le_bytes());
        b.extend_from_slice(&self.streak.to_le_bytes());
        b.extend_from_slice(&self.last_fault_ms.to_le_bytes());
        b
    }

    /// Reads [`Self::to_bytes`] (or the older bare 8-byte score); `None`
    /// for anything else.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let f64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(f64::from_le_bytes);
        let score = f64_at(0)?;
        if !score.is_finite() {
            return None;
        }
        let score = score.clamp(0.0, 1.0);
        match b.len() {
            8 => Some(Self { score, ..Self::default() }),
            20 => Some(Self {
                score,
                streak: u32::from_le_bytes(b[8..12].try_into().ok()?),
                last_fault_ms: u64::from_le_bytes(b[12..20].try_into().ok()?),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn faults_halve_and_streaks_earn_back_faster() {
        let mut r = Reputation::default();
        r.fault(1_000);
        assert!((r.score(1_000) - 0.4).abs() < 1e-9);
        // Eight valid results in a row: 0.005 x (1 + 2 + ... + 8) = 0.18.
        for _ in 0..8 {
            r.valid(1_000);
        }
        assert!((r.score(1_000) - 0.58).abs() < 1e-9, "{}", r.score(1_000));
        // A fault ends the streak: the next result earns the smallest step.
        r.fault(2_000);
        let before = r.score(2_000);
        r.valid(2_000);
        assert!((r.score(2_000) - before - 0.005).abs() < 1e-9);
    }

    #[test]
    fn a_banned_peer_is_forgiven_slowly_by_time_alone() {
        let mut r = Reputation::default();
        for _ in 0..3 {
            r.fault(HOUR);
        }
        assert!((r.score(HOUR) - 0.1).abs() < 1e-9, "below the 0.2 threshold: no work");
        assert!((r.score(3 * HOUR) - 0.2).abs() < 1e-9, "two hours later it may work again");
        assert!((r.score(100 * HOUR) - DEFAULT).abs() < 1e-9, "never past a stranger's standing");
        let mut good = Reputation::default();
        for _ in 0..100 {
            good.valid(HOUR);
        }
        assert!((good.score(HOUR) - 1.0).abs() < 1e-9);
        assert!((good.score(100 * HOUR) - 1.0).abs() < 1e-9, "time only forgives; it does not erode");
    }

    #[test]
    fn stored_form_round_trips_and_reads_the_old_one() {
        let mut r = Reputation::default();
        r.fault(5);
        r.valid(7);
        assert_eq!(Reputation::from_bytes(&r.to_bytes()), Some(r));
        let old = Reputation::from_bytes(&0.3f64.to_le_bytes()).unwrap();
        assert!((old.score(0) - 0.3).abs() < 1e-9);
        assert_eq!(Reputation::from_bytes(&[1, 2, 3]), None);
        assert_eq!(Reputation::from_bytes(&f64::NAN.to_le_bytes()), None);
    }
}
