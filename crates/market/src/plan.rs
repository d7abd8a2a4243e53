//! Cutting a task into shards.
//!
//! Tasks split by item (texts, prompts, conversations), as their kind
//! ([`crate::kind`]) slices them.
//! With [`Split::Auto`], a shard is sized to take about
//! [`TARGET_SHARD_MS`] on the median candidate (from advertised speed), so
//! fast peers come back for more and a lost shard costs little.

use mycel_protocol::{Digest, EncodeError, ShardOffer, Split, Work, limits};
use serde::{Deserialize, Serialize};

/// How long one shard should take on a typical candidate.
pub const TARGET_SHARD_MS: u64 = 3_000;

/// One shard of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedShard {
    /// Index within the task.
    pub index: u32,
    /// Position of its first item in the task.
    pub first_item: u64,
    /// Its items, as work of the task's kind.
    pub work: Work,
    /// Digest of `work`: what results must name as input.
    pub input: Digest,
    /// Units of work (items for embeddings, max tokens for generation).
    pub units: u64,
}

impl Default for PlannedShard {
    /// A placeholder with no items; journaled shard progress is read into
    /// one before its plan is put back.
    fn default() -> Self {
        Self { index: 0, first_item: 0, work: Work::Embed { texts: Vec::new() }, input: Digest::default(), units: 0 }
    }
}

impl PlannedShard {
    /// Items in the shard.
    pub fn items(&self) -> u32 {
        self.work.items() as u32
    }

    /// What a CFP says about it.
    pub fn offer(&self) -> ShardOffer {
        ShardOffer { shard: self.index, items: self.items(), units: self.units }
    }
}

/// A task's shards, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The shards.
    pub shards: Vec<PlannedShard>,
}

/// Items per shard for `split`, given the candidates' speeds in units per
/// second (empty: unknown) and the units per item.
pub fn items_per_shard(split: Split, speeds: &[f32], units_per_item: u64, items: usize) -> usize {
    let n = match split {
        Split::ItemsPerShard(n) => n as usize,
        _ => {
            let mut known: Vec<f32> = speeds.iter().copied().filter(|s| s.is_finite() && *s > 0.0).collect();
            known.sort_by(f32::total_cmp);
            match known.get(known.len() / 2) {
                Some(median) => {
                    let units = f64::from(*median) * TARGET_SHARD_MS as f64 / 1000.0;
                    (units / units_per_item.max(1) as f64) as usize
                }
                // Nobody has said how fast they are: small shards.
                None => 16,
            }
        }
    };
    // Never more shards than the protocol allows, never more items per
    // shard than a CFP may describe.
    let floor = items.div_ceil(limits::SHARDS_PER_TASK);
    n.clamp(1, limits::ITEMS_PER_SHARD).max(floor)
}

/// Why a task could not be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A shard's work could not be encoded (to hash it).
    #[error("encoding a shard: {0}")]
    Encode(#[from] EncodeError),
}

/// Cuts `work` into shards. A generation prompt token counts
/// `prefill_weight` of a generated one in the shards' units (see
/// [`crate::kind::TaskKind::units`]).
pub fn plan(work: &Work, split: Split, speeds: &[f32], prefill_weight: f64) -> Result<Plan, PlanError> {
    let kind = crate::kind::of(work);
    let total = work.items();
    let units_per_item = kind.units(work, prefill_weight).div_ceil(total.max(1) as u64);
    let per = items_per_shard(split, speeds, units_per_item, total);
    let mut shards = Vec::with_capacity(total.div_ceil(per));
    let mut first = 0usize;
    while first < total {
        let end = (first + per).min(total);
        let part = kind.slice(work, first, end);
        let input = part.digest()?;
        shards.push(PlannedShard {
            index: shards.len() as u32,
            first_item: first as u64,
            units: kind.units(&part, prefill_weight),
            input,
            work: part,
        });
        first = end;
    }
    Ok(Plan { shards })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(n: usize) -> Work {
        Work::Embed { texts: (0..n).map(|i| format!("text {i}")).collect() }
    }

    #[test]
    fn shards_cover_every_item_once_in_order() {
        let plan = plan(&texts(1000), Split::ItemsPerShard(64), &[], 0.3).unwrap();
        assert_eq!(plan.shards.len(), 16);
        let mut next = 0u64;
        for (i, s) in plan.shards.iter().enumerate() {
            assert_eq!((s.index as usize, s.first_item), (i, next));
            assert_eq!(s.input, s.work.digest().unwrap());
            next += u64::from(s.items());
        }
        assert_eq!(next, 1000);
        assert_eq!(plan.shards.last().unwrap().items(), 1000 - 15 * 64);
    }

    #[test]
    fn auto_sizes_from_the_median_speed() {
        // Median 100 texts/s x 3 s = 300 per shard.
        assert_eq!(items_per_shard(Split::Auto, &[50.0, 100.0, 400.0], 1, 10_000), 300);
        // Generation: units are tokens; 60 tok/s x 3 s / 64 tokens per prompt = 2.
        assert_eq!(items_per_shard(Split::Auto, &[60.0], 64, 10), 2);
        // Unknown speeds: small shards; never zero.
        assert_eq!(items_per_shard(Split::Auto, &[], 1, 100), 16);
        assert_eq!(items_per_shard(Split::Auto, &[0.01], 1, 100), 1);
        assert_eq!(items_per_shard(Split::ItemsPerShard(0), &[], 1, 100), 1);
    }

    /// Long prompts make fewer prompts per shard and more units per shard:
    /// a shard's expected time (units over the bidder's decode speed)
    /// includes reading them.
    #[test]
    fn long_prompts_make_smaller_shards_with_more_units() {
        let work = |len: usize| Work::Generate {
            prompts: vec!["x".repeat(len); 40],
            params: mycel_protocol::GenerateParams { max_tokens: 16, ..Default::default() },
        };
        let short = plan(&work(20), Split::Auto, &[60.0], 0.3).unwrap();
        let long = plan(&work(4_000), Split::Auto, &[60.0], 0.3).unwrap();
        // 60 tok/s x 3 s = 180 units: 16 + ~3 per short prompt (9 a shard),
        // 16 + 302 per long one (1,004 tokens x 0.3, rounded up; 1 a shard).
        assert_eq!(short.shards[0].items(), 9);
        assert_eq!(long.shards[0].items(), 1);
        assert_eq!(long.shards[0].units, 16 + 302);
        assert_eq!(long.shards.iter().map(|s| s.units).sum::<u64>(), 40 * (16 + 302));
    }
}
