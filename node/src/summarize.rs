//! Map-reduce summaries (`POST /api/v1/summarize`, `mycel submit
//! summarize`): a long document is cut into chunks at paragraph (then
//! sentence) boundaries, the chunks are summarised in parallel across peers
//! (one shard per chunk), then the summaries are combined a few at a time,
//! level after level, until one remains. Every level is a market task of
//! its own, auctioned, verified and receipted; the job's view lists them.

use mycel_api::{ApiError, ChatTurnView, EnsembleStage, PipelineView, SubmitRequest, Submitted, SummarizeRequest};
use mycel_protocol::{Advert, ModelKind};
use tokio::sync::mpsc;

use crate::market::Command;
use crate::tasks::{Job, Jobs, run_task};

/// Longest document, in bytes.
pub const MAX_TEXT: usize = 16 << 20;
const DEFAULT_CHUNK_CHARS: u32 = 2400;
const DEFAULT_FAN_IN: u32 = 4;
const DEFAULT_MAX_TOKENS: u32 = 160;

const MAP: &str = "Summarise the following passage in two or three sentences. Keep names, places and events.";
const REDUCE: &str = "These are summaries of consecutive parts of one document. Combine them into a single summary \
                      of three or four sentences that keeps the main events in order.";

/// Cuts `text` into chunks of at most `max` characters: whole paragraphs
/// where they fit, long paragraphs at sentence ends, overlong sentences at
/// character boundaries. No chunk is empty.
pub fn chunks(text: &str, max: usize) -> Vec<String> {
    let max = max.max(1);
    let mut pieces: Vec<String> = Vec::new();
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let paragraph = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        if paragraph.chars().count() <= max {
            pieces.push(paragraph);
            continue;
        }
        let mut sentence = String::new();
        for word in paragraph.split(' ') {
            if !sentence.is_empty() && sentence.chars().count() + 1 + word.chars().count() > max {
                pieces.push(std::mem::take(&mut sentence));
            }
            if !sentence.is_empty() {
                sentence.push(' ');
            }
            sentence.push_str(word);
            let ends = word.ends_with(['.', '!', '?']);
            if ends && sentence.chars().count() * 2 > max {
                pieces.push(std::mem::take(&mut sentence));
            }
        }
        if !sentence.is_empty() {
            pieces.push(sentence);
        }
    }
    // Words longer than a chunk: cut at character boundaries.
    let pieces: Vec<String> = pieces
        .into_iter()
        .flat_map(|p| {
            let chars: Vec<char> = p.chars().collect();
            chars.chunks(max).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>()
        })
        .collect();
    // Pack small pieces together.
    let mut out: Vec<String> = Vec::new();
    for p in pieces {
        match out.last_mut() {
            Some(last) if last.chars().count() + 2 + p.chars().count() <= max => {
                last.push_str("\n\n");
                last.push_str(&p);
            }
            _ => out.push(p),
        }
    }
    out
}

/// Items at each level for `chunks` chunks combined `fan_in` at a time.
fn levels(chunks: usize, fan_in: usize) -> Vec<usize> {
    let mut out = vec![chunks];
    while let Some(&n) = out.last().filter(|&&n| n > 1) {
        out.push(n.div_ceil(fan_in));
    }
    out
}

fn turn(instruction: &str, body: String) -> Vec<ChatTurnView> {
    vec![ChatTurnView::new("user", format!("{instruction}\n\n{body}"))]
}

/// Starts a summary as a job of `jobs`, if the swarm (`adverts`) has a
/// generation model to run it.
pub fn start(
    jobs: &Jobs,
    request: SummarizeRequest,
    adverts: &[Advert],
    market: mpsc::Sender<Command>,
) -> Result<Submitted, ApiError> {
    let mut generators = adverts.iter().flat_map(|a| &a.models).filter(|m| m.kind == ModelKind::Generation);
    match &request.model {
        Some(name) if !generators.any(|m| m.id.eq_ignore_ascii_case(name) || m.weights.to_hex() == *name) => {
            return Err(ApiError::ModelNotFound(format!("no generation model {name:?} in the swarm")));
        }
        None if generators.next().is_none() => {
            return Err(ApiError::NoCapablePeer("no generation model in the swarm yet".into()));
        }
        _ => {}
    }
    if request.text.trim().is_empty() || request.text.len() > MAX_TEXT {
        return Err(ApiError::BadRequest(format!("text: 1..={MAX_TEXT} bytes of text, got {}", request.text.len())));
    }
    let chunk_chars = request.chunk_chars.unwrap_or(DEFAULT_CHUNK_CHARS);
    let fan_in = request.fan_in.unwrap_or(DEFAULT_FAN_IN);
    let max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if !(200..=20_000).contains(&chunk_chars) || !(2..=16).contains(&fan_in) || !(16..=1024).contains(&max_tokens) {
        return Err(ApiError::BadRequest("chunk_chars 200..=20000, fan_in 2..=16, max_tokens 16..=1024".into()));
    }
    let pieces = chunks(&request.text, chunk_chars as usize);
    let plan = levels(pieces.len(), fan_in as usize);
    let mut view = Jobs::blank_view(request.model.as_deref().unwrap_or("summarize"));
    view.shards = plan.iter().sum();
    view.pipeline = Some(PipelineView { kind: "summarize".into(), stages: Vec::new() });
    jobs.spawn("summarize", view, move |job| async move {
        run(&job, &market, pieces, request.model, fan_in as usize, max_tokens).await
    })
}

async fn run(
    job: &Job,
    market: &mpsc::Sender<Command>,
    pieces: Vec<String>,
    mut model: Option<String>,
    fan_in: usize,
    max_tokens: u32,
) -> Result<(), String> {
    let mut conversations: Vec<Vec<ChatTurnView>> = pieces.into_iter().map(|c| turn(MAP, c)).collect();
    let mut level = 0;
    loop {
        let mut request = SubmitRequest::new("chat", Vec::new());
        request.conversations = conversations;
        request.model = model.clone();
        request.items_per_shard = Some(1);
        request.max_tokens = Some(max_tokens);
        let view = run_task(market, request).await?;
        let index = job.receipted(&view)?;
        let generations = view.generations.clone().unwrap_or_default();
        let summaries: Vec<String> = generations.iter().map(|g| g.text.clone()).collect();
        // Every level runs the model the first one got.
        model.get_or_insert_with(|| view.model.clone());
        let role = if level == 0 { "map".to_string() } else { format!("reduce {level}") };
        job.update(&mut |v| {
            v.shards_done += summaries.len();
            v.model = view.model.clone();
            v.input_tokens += view.input_tokens;
            if let Some(p) = v.pipeline.as_mut() {
                p.stages.push(EnsembleStage { role: role.clone(), task: view.task.clone(), model: view.model.clone() });
            }
            if generations.len() == 1 {
                // As its executor signed it: the job's receipt points at it.
                v.generations = Some(generations.clone());
            }
        });
        if generations.len() == 1 {
            job.answer_is(index, 0);
        }
        if summaries.len() <= 1 {
            return if summaries.is_empty() { Err("no summary came back".into()) } else { Ok(()) };
        }
        conversations = summaries
            .chunks(fan_in)
            .map(|group| {
                let numbered: Vec<String> =
                    group.iter().enumerate().map(|(i, s)| format!("{}. {}", i + 1, s.trim())).collect();
                turn(REDUCE, numbered.join("\n\n"))
            })
            .collect();
        level += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_paragraphs_split_long_ones_and_never_exceed_the_size() {
        let text = "First paragraph.\n\nSecond one, short.\n\n\n".to_string()
            + &"A long sentence that goes on. ".repeat(40)
            + "\n\n"
            + &"x".repeat(250);
        let out = chunks(&text, 100);
        assert!(out.iter().all(|c| !c.is_empty() && c.chars().count() <= 100), "{out:?}");
        assert!(
            out[0].starts_with("First paragraph.\n\nSecond one, short.\n\n"),
            "small pieces packed together: {out:?}"
        );
        let joined: String = out.join(" ").split_whitespace().collect();
        let original: String = text.split_whitespace().collect();
        assert_eq!(joined, original, "no text lost or added");
        assert!(chunks("  \n\n ", 100).is_empty());
        assert_eq!(chunks("é".repeat(5).as_str(), 2), vec!["éé", "éé", "é"]);
    }

    #[test]
    fn levels_shrink_by_the_fan_in_to_one() {
        assert_eq!(levels(1, 4), vec![1]);
        assert_eq!(levels(9, 4), vec![9, 3, 1]);
        assert_eq!(levels(300, 4), vec![300, 75, 19, 5, 2, 1]);
    }
}
