//! Ensembles over peers: `mycel/vote`, `mycel/best-of`, `mycel/moa`.
//!
//! An ensemble is a few ordinary market tasks run one after another by the
//! node that was asked: the proposals (each model's copies of the
//! conversation, one shard per copy so they spread over peers, each copy
//! with its own seed), then, for best-of, a judge's task and, for
//! mixture-of-agents, an aggregator's. Every stage is auctioned, verified
//! and receipted like any task; the ensemble's view lists them, so each
//! proposal, judgement and synthesis can be checked on its own.
//!
//! - **vote** (self-consistency): the answer given most often wins. Answers
//!   are compared by their first line, lower-cased, with only letters,
//!   digits and single spaces kept; a tie goes to the answer first given
//!   (the lowest proposal number). Each model's first proposal is its
//!   greedy answer and further copies are sampled (temperature 0.7, unless
//!   the request sets one), so with no majority the vote falls back to the
//!   first proposal: the largest model's own best answer.
//! - **best-of**: a judge model reads the question and the numbered
//!   proposals and names the best, asked twice with the proposals in
//!   opposite orders. When the two verdicts agree, that proposal wins; when
//!   they do not (the judge prefers a position, not an answer), the vote
//!   decides. Proposals come from the largest model first, so a vote with
//!   no majority falls to the largest model's answer.
//! - **moa** (mixture of agents): an aggregator model writes an answer
//!   from the proposals. One layer; at most [`MAX_MEMBERS`] proposals.
//!   Small aggregators rewrite working answers into broken ones (measured:
//!   below the best member), so the synthesis is guarded: the judge compares
//!   it with the first proposal (the largest model's greedy answer), asked
//!   twice in opposite orders, and the synthesis is the answer only when
//!   preferred both times; otherwise the first proposal is. A synthesis
//!   identical to the first proposal needs no judge.

use std::sync::Arc;

use mycel_api::{
    ApiError, ChatTurnView, EnsembleStage, EnsembleView, GenerationView, Proposal, SubmitRequest, Submitted, TaskView,
};
use mycel_protocol::{Advert, ModelKind};
use tokio::sync::mpsc;

use crate::tasks::{Job, Jobs, run_task};

use crate::market::Command;

/// Most proposals one ensemble may ask for.
pub const MAX_MEMBERS: u32 = 8;
/// Proposals when the request does not say.
const DEFAULT_MEMBERS: u32 = 3;
/// Temperature for copies of one model when the request gives none (they
/// must differ to be worth comparing).
const SAMPLING_TEMPERATURE: f32 = 0.7;

/// An ensemble method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Vote,
    BestOf,
    Moa,
}

impl Method {
    /// The method a model name asks for, if any.
    pub fn of(model: Option<&str>) -> Option<Self> {
        match model? {
            "mycel/vote" => Some(Self::Vote),
            "mycel/best-of" => Some(Self::BestOf),
            "mycel/moa" => Some(Self::Moa),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Vote => "vote",
            Self::BestOf => "best-of",
            Self::Moa => "moa",
        }
    }
}

/// Generation models in the swarm: id and best decode speed, by weights.
fn generation_models(adverts: &[Advert]) -> Vec<(String, f32)> {
    let mut models: Vec<(String, mycel_protocol::Digest, f32)> = Vec::new();
    for m in adverts.iter().flat_map(|a| &a.models).filter(|m| m.kind == ModelKind::Generation) {
        match models.iter_mut().find(|(_, w, _)| *w == m.weights) {
            Some(entry) => entry.2 = entry.2.max(m.throughput.decode_tokens_per_s),
            None => models.push((m.id.clone(), m.weights, m.throughput.decode_tokens_per_s)),
        }
    }
    // Fastest first; the last is the largest.
    models.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
    models.into_iter().map(|(id, _, speed)| (id, speed)).collect()
}

/// What an ensemble will do, checked before anything runs.
struct Plan {
    method: Method,
    conversation: Vec<ChatTurnView>,
    /// The model of each proposal, in order.
    members: Vec<String>,
    /// The temperature of each proposal.
    temperatures: Vec<f32>,
    judge: String,
    request: SubmitRequest,
    /// The swarm's adverts when it started (to name models to the router).
    adverts: Vec<Advert>,
}

fn plan(method: Method, request: SubmitRequest, adverts: &[Advert]) -> Result<Plan, ApiError> {
    let conversation = match (request.kind.as_str(), request.inputs.as_slice(), request.conversations.as_slice()) {
        ("generate", [prompt], []) => vec![ChatTurnView::new("user", prompt.clone())],
        ("chat", [], [conversation]) => conversation.clone(),
        ("generate" | "chat", ..) => {
            return Err(ApiError::BadRequest("an ensemble answers one prompt or conversation at a time".into()));
        }
        _ => return Err(ApiError::BadRequest(format!("mycel/{} answers prompts, not embeddings", method.name()))),
    };
    let n = request.n.unwrap_or(DEFAULT_MEMBERS);
    if !(2..=MAX_MEMBERS).contains(&n) {
        return Err(ApiError::BadRequest(format!("n {n}: an ensemble takes 2..={MAX_MEMBERS} proposals")));
    }
    let swarm = generation_models(adverts);
    let Some((largest, _)) = swarm.last().cloned() else {
        return Err(ApiError::NoCapablePeer("no generation model in the swarm".into()));
    };
    let known = |id: &str| swarm.iter().any(|(m, _)| m == id);
    if let Some(unknown) = request.members.iter().chain(&request.judge).find(|m| !known(m)) {
        return Err(ApiError::ModelNotFound(format!("no generation model {unknown:?} in the swarm")));
    }
    let pool: Vec<String> = match (request.members.is_empty(), method) {
        (false, _) => request.members.clone(),
        (true, Method::Vote) => vec![largest.clone()],
        // Largest first: where the vote decides and every answer differs,
        // the tie goes to the first proposal, the largest model's.
        (true, _) => swarm.iter().rev().map(|(id, _)| id.clone()).collect(),
    };
    let members: Vec<String> = (0..n as usize).map(|i| pool[i % pool.len()].clone()).collect();
    let repeats = members.len() > pool.len();
    let temperatures: Vec<f32> = match request.temperature {
        Some(t) if t > 0.0 || !repeats => vec![t; members.len()],
        // Copies of a model must differ to be worth comparing: each model's
        // first proposal is its own best (greedy) answer, further copies
        // are sampled. A vote without a majority falls back to the first
        // proposal: the largest model's greedy answer.
        _ if repeats => members
            .iter()
            .enumerate()
            .map(|(i, m)| if members[..i].contains(m) { SAMPLING_TEMPERATURE } else { 0.0 })
            .collect(),
        _ => vec![0.0; members.len()],
    };
    let judge = request.judge.clone().unwrap_or(largest);
    Ok(Plan { method, conversation, members, temperatures, judge, request, adverts: adverts.to_vec() })
}

/// Starts an ensemble as a job of `jobs`: its id works like a task's.
pub fn start(
    jobs: &Jobs,
    method: Method,
    request: SubmitRequest,
    adverts: &[Advert],
    market: mpsc::Sender<Command>,
    routing: Arc<crate::route::Routing>,
) -> Result<Submitted, ApiError> {
    let plan = plan(method, request, adverts)?;
    let mut view = Jobs::blank_view(&format!("mycel/{}", method.name()));
    view.ensemble = Some(EnsembleView { method: method.name().into(), ..EnsembleView::default() });
    jobs.spawn("ensemble", view, move |job| async move { orchestrate(&plan, &market, &job, &routing).await })
}

/// A chat task of `conversations` on `model`, like the request otherwise.
fn stage_request(
    plan: &Plan,
    model: &str,
    conversations: Vec<Vec<ChatTurnView>>,
    temperature: f32,
    seed: u64,
) -> SubmitRequest {
    let mut r = SubmitRequest::new("chat", Vec::new());
    r.conversations = conversations;
    r.model = Some(model.to_string());
    // One shard per copy: copies go to different peers where there are.
    r.items_per_shard = Some(1);
    r.max_tokens = plan.request.max_tokens;
    r.temperature = Some(temperature);
    r.top_p = plan.request.top_p;
    r.seed = Some(seed);
    r.stop = plan.request.stop.clone();
    r.redundancy = plan.request.redundancy;
    r.spot_check = plan.request.spot_check;
    r
}

fn answers(view: &TaskView) -> Vec<GenerationView> {
    view.generations.clone().unwrap_or_default()
}

async fn orchestrate(
    plan: &Plan,
    market: &mpsc::Sender<Command>,
    job: &Job,
    routing: &crate::route::Routing,
) -> Result<(), String> {
    let update = |f: &mut dyn FnMut(&mut TaskView)| job.update(f);
    // Proposals: one task per distinct (model, temperature), its copies in
    // proposal order.
    let mut groups: Vec<(&String, f32)> = Vec::new();
    for (m, t) in plan.members.iter().zip(&plan.temperatures) {
        if !groups.iter().any(|g| g.0 == m && g.1 == *t) {
            groups.push((m, *t));
        }
    }
    let group_of = |m: &String, t: f32| groups.iter().position(|g| g.0 == m && g.1 == t);
    let seed = plan.request.seed.unwrap_or(0);
    let stages = groups.iter().map(|(m, t)| {
        let copies = plan.members.iter().zip(&plan.temperatures).filter(|(x, y)| x == m && *y == t).count();
        run_task(market, stage_request(plan, m, vec![plan.conversation.clone(); copies], *t, seed))
    });
    let views = futures::future::try_join_all(stages).await?;
    let receipted: Vec<u32> = views.iter().map(|v| job.receipted(v)).collect::<Result<_, _>>()?;
    let mut answers_of: Vec<std::vec::IntoIter<GenerationView>> =
        views.iter().map(|v| answers(v).into_iter()).collect();
    let mut proposals: Vec<(String, GenerationView)> = Vec::new();
    // Where each proposal is: (its task in the job's receipt, its item).
    let mut places: Vec<(u32, u64)> = Vec::new();
    let mut copies_seen = vec![0u64; groups.len()];
    for (m, t) in plan.members.iter().zip(&plan.temperatures) {
        let group = group_of(m, *t).ok_or("a proposal's task is missing")?;
        let answer = answers_of[group].next().ok_or("a proposal is missing")?;
        places.push((receipted[group], copies_seen[group]));
        copies_seen[group] += 1;
        proposals.push((m.clone(), answer));
    }
    update(&mut |view| {
        let e = view.ensemble.get_or_insert_with(EnsembleView::default);
        e.stages = groups
            .iter()
            .zip(&views)
            .map(|((m, _), v)| EnsembleStage { role: "proposals".into(), task: v.task.clone(), model: (*m).clone() })
            .collect();
        e.proposals = proposals.iter().map(|(m, g)| Proposal { model: m.clone(), text: g.text.clone() }).collect();
        view.input_tokens = views.iter().map(|v| v.input_tokens).sum();
        view.shards = proposals.len();
        view.shards_done = proposals.len();
    });

    let texts: Vec<&str> = proposals.iter().map(|(_, g)| g.text.as_str()).collect();
    let votes = tally(&texts);
    let majority = votes.first().map(|(_, _, first)| *first).unwrap_or(0);
    let question = last_user(&plan.conversation);
    let (answer_model, answer, chosen, verdicts, reason, extra) = match plan.method {
        Method::Vote => {
            let (key, count, _) = &votes[0];
            let reason = format!("{count} of {} proposals agree on {key:?}", proposals.len());
            job.answer_is(places[majority].0, places[majority].1);
            (
                proposals[majority].0.clone(),
                proposals[majority].1.clone(),
                Some(majority),
                Vec::new(),
                reason,
                Vec::new(),
            )
        }
        Method::BestOf => {
            let (first, second, stage) = judge_both_ways(plan, market, job, &question, &texts).await?;
            let (pick, reason) = match (first, second) {
                (Some(a), Some(b)) if a == b => {
                    teach_router(routing, plan, &proposals, a - 1).await;
                    (a - 1, format!("the judge picked proposal {a} in both orders"))
                }
                _ => (
                    majority,
                    format!(
                        "the judge's verdicts in the two orders disagree ({first:?} vs {second:?}): the vote decides, proposal {}",
                        majority + 1
                    ),
                ),
            };
            job.answer_is(places[pick].0, places[pick].1);
            (proposals[pick].0.clone(), proposals[pick].1.clone(), Some(pick), vec![first, second], reason, vec![stage])
        }
        Method::Moa => {
            let request =
                stage_request(plan, &plan.judge, vec![synthesis_prompt(&plan.conversation, &texts)], 0.0, seed);
            let view = run_task(market, request).await?;
            let task = job.receipted(&view)?;
            let synthesis = answers(&view).into_iter().next().ok_or("the aggregator gave no answer")?;
            let wrote = EnsembleStage { role: "synthesis".into(), task: view.task.clone(), model: plan.judge.clone() };
            let anchor = &proposals[0];
            if synthesis.text.trim() == anchor.1.text.trim() {
                job.answer_is(task, 0);
                let reason = format!(
                    "{} wrote the answer from {} proposals: the first one, word for word",
                    plan.judge,
                    texts.len()
                );
                (plan.judge.clone(), synthesis, None, Vec::new(), reason, vec![wrote])
            } else {
                let pair = [anchor.1.text.as_str(), synthesis.text.as_str()];
                let (first, second, judged) = judge_both_ways(plan, market, job, &question, &pair).await?;
                if synthesis_kept(first, second) {
                    job.answer_is(task, 0);
                    let reason = format!(
                        "{} wrote the answer from {} proposals; the judge preferred it to proposal 1 in both orders",
                        plan.judge,
                        texts.len()
                    );
                    (plan.judge.clone(), synthesis, None, vec![first, second], reason, vec![wrote, judged])
                } else {
                    job.answer_is(places[0].0, places[0].1);
                    let reason = format!(
                        "the judge did not prefer the synthesis to proposal 1 in both orders ({first:?} vs {second:?}, 2 = the synthesis): proposal 1 stands"
                    );
                    (anchor.0.clone(), anchor.1.clone(), Some(0), vec![first, second], reason, vec![wrote, judged])
                }
            }
        }
    };
    update(&mut |view| {
        view.model = answer_model.clone();
        view.generations = Some(vec![answer.clone()]);
        let e = view.ensemble.get_or_insert_with(EnsembleView::default);
        e.stages.extend(extra.iter().cloned());
        e.votes = votes.iter().map(|(k, c, _)| (k.clone(), *c)).collect();
        e.verdicts = verdicts.clone();
        e.chosen = chosen;
        e.reason = reason.clone();
    });
    Ok(())
}

/// Asks the judge which of `texts` answers `question` best, twice, the
/// second time in reverse order: both verdicts as 1-based positions in
/// `texts` (`None` where the reply names none), and the judge's stage.
async fn judge_both_ways(
    plan: &Plan,
    market: &mpsc::Sender<Command>,
    job: &Job,
    question: &str,
    texts: &[&str],
) -> Result<(Option<usize>, Option<usize>, EnsembleStage), String> {
    let forward = judge_prompt(question, texts);
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let backward = judge_prompt(question, &reversed);
    let seed = plan.request.seed.unwrap_or(0);
    let view = run_task(market, stage_request(plan, &plan.judge, vec![forward, backward], 0.0, seed)).await?;
    job.receipted(&view)?;
    let replies = answers(&view);
    let n = texts.len();
    let first = replies.first().and_then(|g| verdict(&g.text, n));
    let second = replies.get(1).and_then(|g| verdict(&g.text, n)).map(|k| n + 1 - k);
    let stage = EnsembleStage { role: "judge".into(), task: view.task.clone(), model: plan.judge.clone() };
    Ok((first, second, stage))
}

/// Whether mixture-of-agents keeps its synthesis: only when the judge,
/// shown [first proposal, synthesis] and then the reverse, picked the
/// synthesis (position 2) both times.
pub fn synthesis_kept(first: Option<usize>, second: Option<usize>) -> bool {
    first == Some(2) && second == Some(2)
}

/// A consistent verdict between different models' proposals is an outcome
/// for the router: the chosen proposal's model did well on this prompt,
/// the others less so.
async fn teach_router(
    routing: &crate::route::Routing,
    plan: &Plan,
    proposals: &[(String, GenerationView)],
    pick: usize,
) {
    let mut models: Vec<&String> = proposals.iter().map(|(m, _)| m).collect();
    models.sort();
    models.dedup();
    if models.len() < 2 {
        return;
    }
    let winner = &proposals[pick].0;
    for model in models {
        let outcome = mycel_api::Outcome {
            prompt: last_user(&plan.conversation),
            model: model.clone(),
            score: if model == winner { 1.0 } else { 0.0 },
            source: Some("judge".into()),
        };
        if let Err(e) = routing.learn(outcome, &plan.adverts).await {
            tracing::debug!(error = %e, "the router did not take a judge's verdict");
        }
    }
}

/// How an answer is compared in a vote: its first non-empty line,
/// lower-cased, letters and digits only, single spaces.
pub fn vote_key(text: &str) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    let kept: String = line.chars().map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Answers grouped by [`vote_key`]: (key, count, first proposal index),
/// most votes first, ties to the earliest.
pub fn tally(texts: &[&str]) -> Vec<(String, usize, usize)> {
    let mut groups: Vec<(String, usize, usize)> = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let key = vote_key(t);
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some(g) => g.1 += 1,
            None => groups.push((key, 1, i)),
        }
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    groups
}

fn last_user(conversation: &[ChatTurnView]) -> String {
    conversation.iter().rev().find(|t| t.role == "user").map(|t| t.content.clone()).unwrap_or_default()
}

fn judge_prompt(question: &str, answers: &[&str]) -> Vec<ChatTurnView> {
    let mut text = format!("Question:\n{question}\n\nCandidate answers:\n");
    for (i, a) in answers.iter().enumerate() {
        text.push_str(&format!("\nAnswer {}:\n{}\n", i + 1, a.trim()));
    }
    text.push_str("\nWhich answer is the most correct and helpful? Reply with its number only.");
    vec![ChatTurnView::new("system", "You are a careful, impartial judge of answers."), ChatTurnView::new("user", text)]
}

/// The first number in a judge's reply, if it names a proposal.
pub fn verdict(reply: &str, n: usize) -> Option<usize> {
    let digits: String = reply.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|k| (1..=n).contains(k))
}

fn synthesis_prompt(conversation: &[ChatTurnView], answers: &[&str]) -> Vec<ChatTurnView> {
    let mut system = String::from(
        "You have been given responses from several models to the user's latest question. Synthesize them into \
         one answer that is accurate and complete. Some responses may be wrong: judge them critically, do not \
         simply copy one.\n\nResponses:\n",
    );
    for (i, a) in answers.iter().enumerate() {
        system.push_str(&format!("\n{}. {}\n", i + 1, a.trim()));
    }
    let mut turns = vec![ChatTurnView::new("system", system)];
    turns.extend(conversation.iter().filter(|t| t.role != "system").cloned());
    turns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_compare_first_lines_loosely_and_ties_go_to_the_earliest() {
        assert_eq!(vote_key("  Paris.\nIt is the capital."), "paris");
        assert_eq!(vote_key("The answer is: 42!"), "the answer is 42");
        let t = tally(&["Paris", "paris!", "Lyon", "Marseille", "Lyon."]);
        assert_eq!(t[0], ("paris".into(), 2, 0), "two each: Paris came first");
        assert_eq!(t[1], ("lyon".into(), 2, 2));
        assert_eq!(t[2].1, 1);
    }

    fn swarm() -> Vec<Advert> {
        let generator = |id: &str, speed: f32| mycel_protocol::ModelAdvert {
            id: id.into(),
            kind: ModelKind::Generation,
            weights: mycel_protocol::Digest::of(id.as_bytes()),
            dimensions: 0,
            context: 2048,
            quantization: mycel_protocol::Quantization::Q8_0,
            throughput: mycel_protocol::Throughput { decode_tokens_per_s: speed, ..Default::default() },
            profile: Default::default(),
            tools: false,
        };
        vec![Advert {
            seq: 1,
            timestamp_ms: 1,
            software: "test".into(),
            models: vec![generator("small", 200.0), generator("large", 50.0)],
            hardware: Default::default(),
            load: Default::default(),
            price: Default::default(),
            listen_addrs: Vec::new(),
        }]
    }

    fn request(n: u32, temperature: Option<f32>) -> SubmitRequest {
        let mut r = SubmitRequest::new("generate", vec!["What is the capital of France?".into()]);
        r.n = Some(n);
        r.temperature = temperature;
        r
    }

    /// Copies of a model are sampled, but each model's first proposal is
    /// its greedy answer, and the first of all the largest model's: what a
    /// vote with no majority falls back to, so an ensemble starts from its
    /// best member's own answer.
    #[test]
    fn the_first_proposal_is_the_largest_models_greedy_answer() {
        let vote = plan(Method::Vote, request(3, None), &swarm()).unwrap();
        assert_eq!(vote.members, ["large", "large", "large"]);
        assert_eq!(vote.temperatures, [0.0, SAMPLING_TEMPERATURE, SAMPLING_TEMPERATURE]);
        let best_of = plan(Method::BestOf, request(3, None), &swarm()).unwrap();
        assert_eq!(best_of.members, ["large", "small", "large"]);
        assert_eq!(best_of.temperatures, [0.0, 0.0, SAMPLING_TEMPERATURE], "each model's first is greedy");
        // Every member once: nothing to sample, all greedy.
        let moa = plan(Method::Moa, request(2, None), &swarm()).unwrap();
        assert_eq!(moa.temperatures, [0.0, 0.0]);
        // A temperature the request sets is every proposal's.
        let asked = plan(Method::Vote, request(3, Some(0.9)), &swarm()).unwrap();
        assert_eq!(asked.temperatures, [0.9; 3]);
    }

    #[test]
    fn a_synthesis_stands_only_when_preferred_in_both_orders() {
        assert!(synthesis_kept(Some(2), Some(2)));
        // A judge that prefers a position, or cannot say, keeps the first
        // proposal.
        for (first, second) in
            [(Some(1), Some(2)), (Some(2), Some(1)), (Some(1), Some(1)), (None, Some(2)), (Some(2), None)]
        {
            assert!(!synthesis_kept(first, second), "{first:?} {second:?}");
        }
    }

    #[test]
    fn verdicts_are_the_first_number_in_range() {
        assert_eq!(verdict("2", 3), Some(2));
        assert_eq!(verdict("Answer 3 is best", 3), Some(3));
        assert_eq!(verdict("The best is 7", 3), None);
        assert_eq!(verdict("none of them", 3), None);
    }
}
