//! Spot checks that a worker cannot predict and a requester cannot choose
//! after the fact.
//!
//! The requester draws a secret per task and puts its commitment (a hash)
//! in every CFP it signs. Workers copy the commitment into the claims they
//! sign, so every claim proves the commitment existed before its work was
//! done. Which shards get a second execution is a hash of the secret and
//! the shard index; the receipt reveals the secret, and anyone can then
//! check it against the claims' commitment and recompute the choice.

use crate::Digest;

/// Commitment to a task's spot-check secret.
pub fn commitment(secret: &[u8; 32]) -> Digest {
    Digest::of_parts(&[b"mycel/spot-commitment", secret])
}

/// Whether shard `index` is spot-checked at `permille` under `secret`.
pub fn checked(secret: &[u8; 32], index: u32, permille: u16) -> bool {
    if permille == 0 {
        return false;
    }
    let digest = Digest::of_parts(&[b"mycel/spot-check", secret, &index.to_le_bytes()]);
    let draw = u16::from_le_bytes([digest.0[0], digest.0[1]]) % 1000;
    draw < permille
}

/// The secret as a receipt reveals it, with the rate it was drawn at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reveal {
    /// The task's spot-check secret.
    pub secret: [u8; 32],
    /// The share of shards checked, per mille.
    pub permille: u16,
}

impl Reveal {
    /// The commitment every claim of the task must carry.
    pub fn commitment(&self) -> Digest {
        commitment(&self.secret)
    }

    /// The shards of `count` that were spot-checked.
    pub fn checked_shards(&self, count: usize) -> Vec<u32> {
        (0..count as u32).filter(|i| checked(&self.secret, *i, self.permille)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_follows_the_secret_not_the_task() {
        let (a, b) = (Reveal { secret: [1; 32], permille: 300 }, Reveal { secret: [2; 32], permille: 300 });
        let (ca, cb) = (a.checked_shards(200), b.checked_shards(200));
        assert_ne!(ca, cb, "two secrets, two choices, whatever the task id");
        for checked in [&ca, &cb] {
            assert!((40..=80).contains(&checked.len()), "about 30% of 200: {}", checked.len());
        }
        assert_ne!(a.commitment(), b.commitment());
        assert!(Reveal { secret: [1; 32], permille: 0 }.checked_shards(200).is_empty());
        assert_eq!(Reveal { secret: [1; 32], permille: 1000 }.checked_shards(200).len(), 200);
    }
}
