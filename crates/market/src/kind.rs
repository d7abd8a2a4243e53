//! Kinds of work, each one module behind [`TaskKind`]: how a task of that
//! kind splits, what its units of work are, when two copies of a shard
//! agree, how shard outputs combine, and how the combined output is sliced
//! back per shard for the receipt.
//!
//! The requester, the planner and the worker ask the kind; none of them
//! matches on the work itself. Adding a kind means a [`Work`] variant (the
//! wire), a module here, its executor in `crates/models` and the API's
//! request mapping.
//!
//! Checking (do redundant copies of a shard agree? [`Check`]) is apart from
//! combining (how accepted shard outputs become the task's output,
//! [`TaskKind::combine`]).

use mycel_protocol::{Aggregation, ModelKind, ShardOutput, Work};

/// How redundant copies of a shard are compared.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Check {
    /// Item by item, vectors agreeing at or above this cosine.
    Cosine(f64),
    /// Exactly (greedy generation: the same weights give the same text).
    Exact,
    /// Not at all: each copy is an answer of its own (sampling at a
    /// temperature above 0). The first valid copy is the shard's, the
    /// others are not held against anyone, and no spot check is drawn.
    Independent,
}

/// A kind of work.
pub trait TaskKind: Sync {
    /// What users call it (`embed`, `generate`, `chat`).
    fn name(&self) -> &'static str;

    /// The kind of model it runs on.
    fn model_kind(&self) -> ModelKind;

    /// Units of work per item, as advertised speeds count them (texts for
    /// embeddings, tokens for generation).
    fn units_per_item(&self, work: &Work) -> u64;

    /// Units of all of `work`, reading its prompts where they cost time of
    /// their own: a prompt token counts `prefill_weight` of a generated
    /// token (a model's decode speed over its prefill speed), so a shard of
    /// long prompts is expected to take longer than one of short ones.
    fn units(&self, work: &Work, prefill_weight: f64) -> u64 {
        let _ = prefill_weight;
        work.items() as u64 * self.units_per_item(work)
    }

    /// Items `first..end` of `work`, as work of the same kind.
    fn slice(&self, work: &Work, first: usize, end: usize) -> Work;

    /// How redundant copies of `work`'s shards are compared.
    fn check(&self, work: &Work, min_cosine: f64) -> Check;

    /// Whether `output` is this kind's output for `items` items.
    fn fits(&self, output: &ShardOutput, items: usize) -> bool;

    /// Whether it can combine shard outputs by `aggregation`.
    fn combines(&self, aggregation: Aggregation) -> bool {
        aggregation == Aggregation::Concat
    }

    /// Shard outputs, in shard order, as the task's output.
    fn combine(&self, aggregation: Aggregation, outputs: &[&ShardOutput]) -> Result<ShardOutput, CombineError>;
}

/// Why shard outputs could not be combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CombineError {
    /// Shards returned vectors of different widths.
    #[error("shards returned vectors of different widths ({0} and {1})")]
    Widths(u32, u32),
    /// An output of another kind slipped through.
    #[error("a shard returned another kind of output")]
    WrongKind,
    /// This kind cannot combine that way.
    #[error("{kind} tasks cannot be combined by {aggregation:?}")]
    Unsupported { kind: &'static str, aggregation: Aggregation },
}

/// How far two honest copies' log probabilities may differ, in nats. The
/// tokens are compared exactly; their log probabilities are sums over the
/// whole vocabulary that differ in the last digits between CPUs (AVX2 and
/// AVX-512 kernels round differently). Measured between mycel and llama.cpp
/// on the same weights, logits differ by at most 0.35 (BENCHMARKS.md):
/// 0.5 covers that with room, and is far below what a different token or
/// model would show.
pub const LOGPROB_TOLERANCE: f32 = 0.5;

/// The kind of `work`.
pub fn of(work: &Work) -> &'static dyn TaskKind {
    match work {
        Work::Embed { .. } => &embed::Embed,
        Work::Chat { .. } => &generate::CHAT,
        Work::Complete { .. } => &generate::COMPLETE,
        _ => &generate::GENERATE,
    }
}

/// The work of a later stage, from the output of the stage before: each
/// answer of a generation becomes an item (a text to embed, a prompt).
pub fn feed(previous: &ShardOutput, stage: &crate::node::Stage) -> Result<Work, String> {
    let ShardOutput::Generations(answers) = previous else {
        return Err("only a generation stage's answers can feed another stage".into());
    };
    let items: Vec<String> = answers.iter().map(|g| g.text.clone()).collect();
    Ok(match stage.kind {
        ModelKind::Embedding => Work::Embed { texts: items },
        _ => Work::Generate { prompts: items, params: stage.params.clone() },
    })
}

/// Whether two outputs agree under `check`.
pub fn agree(check: Check, a: &ShardOutput, b: &ShardOutput) -> bool {
    match (check, a, b) {
        (Check::Independent, _, _) => true,
        (Check::Exact, ShardOutput::Generations(a), ShardOutput::Generations(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.agrees(b, LOGPROB_TOLERANCE))
        }
        (Check::Exact, a, b) => a == b,
        (
            Check::Cosine(min),
            ShardOutput::Embeddings { dimensions: da, values: va },
            ShardOutput::Embeddings { dimensions: db, values: vb },
        ) => {
            if da != db || va.len() != vb.len() {
                return false;
            }
            let d = (*da as usize).max(1);
            va.chunks(d).zip(vb.chunks(d)).all(|(x, y)| cosine(x, y) >= min)
        }
        _ => false,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += f64::from(*x) * f64::from(*y);
        na += f64::from(*x).powi(2);
        nb += f64::from(*y).powi(2);
    }
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Embedding: one vector per text.
pub mod embed {
    use super::*;

    /// `embed` tasks.
    #[derive(Debug)]
    pub struct Embed;

    impl TaskKind for Embed {
        fn name(&self) -> &'static str {
            "embed"
        }

        fn model_kind(&self) -> ModelKind {
            ModelKind::Embedding
        }

        fn units_per_item(&self, _: &Work) -> u64 {
            1
        }

        fn slice(&self, work: &Work, first: usize, end: usize) -> Work {
            match work {
                Work::Embed { texts } => Work::Embed { texts: texts[first..end].to_vec() },
                other => other.clone(),
            }
        }

        fn check(&self, _: &Work, min_cosine: f64) -> Check {
            // Two machines' floating point differs in the last bits.
            Check::Cosine(min_cosine)
        }

        fn fits(&self, output: &ShardOutput, items: usize) -> bool {
            matches!(output, ShardOutput::Embeddings { .. }) && output.items() == items
        }

        fn combine(&self, aggregation: Aggregation, outputs: &[&ShardOutput]) -> Result<ShardOutput, CombineError> {
            if aggregation != Aggregation::Concat {
                return Err(CombineError::Unsupported { kind: self.name(), aggregation });
            }
            let mut width = None;
            let mut values = Vec::new();
            for output in outputs {
                let ShardOutput::Embeddings { dimensions, values: v } = output else {
                    return Err(CombineError::WrongKind);
                };
                match width {
                    Some(w) if w != *dimensions => return Err(CombineError::Widths(w, *dimensions)),
                    _ => width = Some(*dimensions),
                }
                values.extend_from_slice(v);
            }
            Ok(ShardOutput::Embeddings { dimensions: width.unwrap_or(0), values })
        }
    }
}

/// Generation: one completion per prompt or conversation.
pub mod generate {
    use mycel_protocol::GenerateParams;

    use super::*;

    /// Generation: `generate` tasks (one user message per item) and `chat`
    /// tasks (one conversation per item) split, check and combine alike.
    #[derive(Debug)]
    pub struct Generate {
        name: &'static str,
    }

    /// `generate` tasks.
    pub static GENERATE: Generate = Generate { name: "generate" };
    /// `chat` tasks.
    pub static CHAT: Generate = Generate { name: "chat" };
    /// `complete` tasks (prompts continued as they are).
    pub static COMPLETE: Generate = Generate { name: "complete" };

    /// Bytes of text per token, the usual rate of byte-level BPE
    /// vocabularies on English prose (about 4; code runs nearer 3, so code
    /// prompts are underestimated by a quarter: the deadline's factor
    /// covers that).
    const BYTES_PER_TOKEN: usize = 4;
    /// Tokens a chat template adds around each turn (role markers).
    const TOKENS_PER_TURN: usize = 4;

    /// About how many tokens a prompt of `bytes` in `turns` turns is.
    fn prompt_tokens(bytes: usize, turns: usize) -> usize {
        bytes.div_ceil(BYTES_PER_TOKEN) + turns * TOKENS_PER_TURN
    }

    fn params(work: &Work) -> Option<&GenerateParams> {
        match work {
            Work::Generate { params, .. } | Work::Chat { params, .. } | Work::Complete { params, .. } => Some(params),
            _ => None,
        }
    }

    impl TaskKind for Generate {
        fn name(&self) -> &'static str {
            self.name
        }

        fn model_kind(&self) -> ModelKind {
            ModelKind::Generation
        }

        fn units_per_item(&self, work: &Work) -> u64 {
            params(work).map_or(1, |p| u64::from(p.max_tokens))
        }

        fn units(&self, work: &Work, prefill_weight: f64) -> u64 {
            let tools: usize = params(work).map_or(0, |p| p.tools.iter().map(String::len).sum());
            let prompts: Vec<usize> = match work {
                Work::Generate { prompts, .. } | Work::Complete { prompts, .. } => {
                    prompts.iter().map(|p| prompt_tokens(p.len() + tools, 1)).collect()
                }
                Work::Chat { conversations, .. } => conversations
                    .iter()
                    .map(|turns| {
                        let bytes: usize = turns
                            .iter()
                            .map(|t| {
                                t.content.len()
                                    + t.tool_calls.iter().map(|c| c.name.len() + c.arguments.len()).sum::<usize>()
                            })
                            .sum();
                        prompt_tokens(bytes + tools, turns.len())
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let prefill: f64 = prompts.iter().map(|t| *t as f64 * prefill_weight.max(0.0)).sum();
            (work.items() as u64 * self.units_per_item(work)).saturating_add(prefill.ceil() as u64)
        }

        fn slice(&self, work: &Work, first: usize, end: usize) -> Work {
            match work {
                Work::Generate { prompts, params } => {
                    Work::Generate { prompts: prompts[first..end].to_vec(), params: params.clone() }
                }
                Work::Complete { prompts, params } => {
                    Work::Complete { prompts: prompts[first..end].to_vec(), params: params.clone() }
                }
                Work::Chat { conversations, params } => {
                    Work::Chat { conversations: conversations[first..end].to_vec(), params: params.clone() }
                }
                other => other.clone(),
            }
        }

        fn check(&self, work: &Work, _: f64) -> Check {
            // Greedy decoding is reproducible; a sample is one answer of many.
            match params(work) {
                Some(p) if p.temperature > 0.0 => Check::Independent,
                _ => Check::Exact,
            }
        }

        fn fits(&self, output: &ShardOutput, items: usize) -> bool {
            matches!(output, ShardOutput::Generations(_)) && output.items() == items
        }

        fn combine(&self, aggregation: Aggregation, outputs: &[&ShardOutput]) -> Result<ShardOutput, CombineError> {
            if aggregation != Aggregation::Concat {
                return Err(CombineError::Unsupported { kind: self.name, aggregation });
            }
            let mut all = Vec::new();
            for output in outputs {
                let ShardOutput::Generations(g) = output else { return Err(CombineError::WrongKind) };
                all.extend_from_slice(g);
            }
            Ok(ShardOutput::Generations(all))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use mycel_protocol::{ChatTurn, FinishReason, GenerateParams, Generation, Role};

    use super::generate::{CHAT, GENERATE};

    use super::*;

    fn answer(text: &str) -> ShardOutput {
        ShardOutput::Generations(vec![Generation::text(text, 3, FinishReason::Length)])
    }

    #[test]
    fn checking_follows_the_work_and_combining_the_aggregation() {
        let greedy = Work::Generate { prompts: vec!["hi".into()], params: GenerateParams::default() };
        let sampled = Work::Generate {
            prompts: vec!["hi".into()],
            params: GenerateParams { temperature: 0.8, ..Default::default() },
        };
        assert_eq!(of(&greedy).check(&greedy, 0.99), Check::Exact);
        assert_eq!(of(&sampled).check(&sampled, 0.99), Check::Independent);
        // Two samples that differ are two answers, not a disagreement.
        assert!(!agree(Check::Exact, &answer("a"), &answer("b")));
        assert!(agree(Check::Independent, &answer("a"), &answer("b")));

        let embed = Work::Embed { texts: vec!["a".into(), "b".into(), "c".into()] };
        assert_eq!(of(&embed).slice(&embed, 1, 3), Work::Embed { texts: vec!["b".into(), "c".into()] });
        let v = |values: Vec<f32>| ShardOutput::Embeddings { dimensions: 2, values };
        assert!(agree(Check::Cosine(0.999), &v(vec![1.0, 0.0]), &v(vec![2.0, 0.0])));
        assert!(!agree(Check::Cosine(0.999), &v(vec![1.0, 0.0]), &v(vec![0.0, 1.0])));
        let combined = of(&embed).combine(Aggregation::Concat, &[&v(vec![1.0, 0.0]), &v(vec![0.0, 1.0])]).unwrap();
        assert_eq!(combined, v(vec![1.0, 0.0, 0.0, 1.0]));
        let wide = ShardOutput::Embeddings { dimensions: 4, values: vec![0.0; 4] };
        assert_eq!(
            of(&embed).combine(Aggregation::Concat, &[&v(vec![1.0, 0.0]), &wide]),
            Err(CombineError::Widths(2, 4))
        );
        assert_eq!(of(&embed).combine(Aggregation::Concat, &[&answer("x")]), Err(CombineError::WrongKind));
        assert_eq!(of(&greedy).units_per_item(&greedy), 256);
        assert!(of(&greedy).fits(&answer("x"), 1) && !of(&embed).fits(&answer("x"), 1));
    }

    /// A prompt costs time before the first token: generation units count
    /// its tokens at the prefill weight, so a shard of long prompts is
    /// expected to take longer; embeddings count texts.
    #[test]
    fn generation_units_count_prompts_at_the_prefill_weight() {
        let params = GenerateParams { max_tokens: 100, ..Default::default() };
        let prompts = |len: usize| Work::Generate { prompts: vec!["x".repeat(len); 2], params: params.clone() };
        let (short, long) = (prompts(4), prompts(4_000));
        // Two prompts: 200 tokens to generate; 4,000 bytes are about 1,000
        // tokens (+4 for the turn) each, at 0.25 of a generated token.
        assert_eq!(GENERATE.units(&short, 0.0), 200);
        assert_eq!(GENERATE.units(&long, 0.0), 200);
        assert_eq!(GENERATE.units(&long, 0.25), 200 + 2 * 251);
        assert!(GENERATE.units(&short, 0.25) < 210);
        let chat = Work::Chat {
            conversations: vec![vec![ChatTurn::new(Role::System, "x".repeat(400)), ChatTurn::new(Role::User, "hi")]],
            params,
        };
        assert_eq!(CHAT.units(&chat, 1.0), 100 + 101 + 2 * 4);
        let embed = Work::Embed { texts: vec!["x".repeat(4_000); 3] };
        assert_eq!(of(&embed).units(&embed, 1.0), 3);
    }
}
