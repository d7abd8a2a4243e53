//! The worker's side of the market interpreter: running a job on the local
//! models off the loop, streaming generated text to the requester as it
//! comes, and reporting the result back as a [`Command::JobDone`].

use std::time::Instant;

use mycel_market::Job;
use mycel_net::Handle;
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{GenerateParams, Generation, PublicKey, ShardOutput, TaskId, Work};
use tokio::sync::mpsc;

use super::{Command, Driver};

/// A shard the local models finished (or failed).
#[derive(Debug)]
pub struct JobDone {
    pub(super) job: Job,
    pub(super) output: Result<ShardOutput, String>,
    pub(super) compute_ms: u32,
    pub(super) input_tokens: u64,
}

/// Sends a streaming shard's text to its requester as it is produced, one
/// message at a time so pieces arrive in order.
struct PartialSink {
    net: Handle,
    tx: mpsc::Sender<Command>,
    me: PublicKey,
    to: PublicKey,
    task: TaskId,
}

/// Streamed text goes out at most this often per answer.
const PARTIAL_EVERY: std::time::Duration = std::time::Duration::from_millis(125);

impl PartialSink {
    /// Forwards the model's pieces in order. Text the requester did not
    /// take (busy, unreachable) stays pending and goes with the next
    /// message, so what it shows never has a gap.
    async fn forward(self, mut stream: mpsc::Receiver<String>, shard: u32, item: u64) {
        let mut pending = String::new();
        let mut open = true;
        while open || !pending.is_empty() {
            let tick = tokio::time::Instant::now() + PARTIAL_EVERY;
            // Wait for text, then gather what comes until the tick.
            if open && pending.is_empty() {
                match stream.recv().await {
                    Some(text) => pending.push_str(&text),
                    None => open = false,
                }
            }
            while open {
                match tokio::time::timeout_at(tick, stream.recv()).await {
                    Ok(Some(text)) => pending.push_str(&text),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            if pending.is_empty() {
                continue;
            }
            let mut sent = 0;
            for piece in split_text(&pending, mycel_protocol::limits::PARTIAL_TEXT) {
                if !self.send(shard, item, piece).await {
                    break;
                }
                sent += piece.len();
            }
            pending.drain(..sent);
            if !open && sent == 0 {
                // The answer is complete and the requester does not take
                // the rest: the signed result carries it anyway.
                return;
            }
        }
    }

    async fn send(&self, shard: u32, item: u64, text: &str) -> bool {
        let message = Market::Partial { task: self.task, shard, item, text: text.to_string() };
        if self.to == self.me {
            let from = self.me.to_peer_id();
            return self.tx.send(Command::Inbound { from, message: Box::new(message) }).await.is_ok();
        }
        matches!(
            self.net.request(self.to.to_peer_id(), Request::Market(Box::new(message))).await,
            Ok(Response::Accepted)
        )
    }
}

/// `text` in pieces of at most `max` bytes, cut on character boundaries.
fn split_text(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        pieces.push(head);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

impl Driver {
    /// Runs a job on the local models off the loop; reports back with
    /// [`Command::JobDone`]. A job the models cannot take fails at once.
    pub(super) fn execute(&mut self, job: Job) {
        let tx = self.tx.clone();
        let fail = |job: Job, why: &str| {
            let done = JobDone { job, output: Err(why.to_string()), compute_ms: 0, input_tokens: 0 };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(Command::JobDone(Box::new(done))).await;
            });
        };
        let Some(models) = self.models.clone() else { return fail(job, "no models loaded") };
        let started = Instant::now();
        let (conversations, params) = match job.work.clone() {
            Work::Embed { texts } => {
                let Some(served) = models.embedders.iter().find(|s| s.advert.weights == job.model) else {
                    return fail(job, "not our model");
                };
                let Ok(rx) = models.pool.embed(served.model.clone(), texts) else {
                    return fail(job, "worker pool busy");
                };
                tokio::spawn(async move {
                    // Usage: the tokens the model read (truncated as it truncates).
                    let (output, input_tokens) = match rx.await {
                        Ok(Ok(embedded)) => {
                            let dimensions = embedded.vectors.first().map_or(0, Vec::len) as u32;
                            let values = embedded.vectors.concat();
                            (Ok(ShardOutput::Embeddings { dimensions, values }), embedded.input_tokens)
                        }
                        Ok(Err(e)) => (Err(e.to_string()), 0),
                        Err(_) => (Err("worker pool stopped".to_string()), 0),
                    };
                    let compute_ms = started.elapsed().as_millis() as u32;
                    let done = JobDone { job, output, compute_ms, input_tokens };
                    let _ = tx.send(Command::JobDone(Box::new(done))).await;
                });
                return;
            }
            Work::Generate { prompts, params } => {
                (prompts.into_iter().map(|p| vec![mycel_models::ChatMessage::user(p)]).collect::<Vec<_>>(), params)
            }
            Work::Chat { conversations, params } => {
                let conversations = conversations
                    .into_iter()
                    .map(|turns| {
                        turns
                            .into_iter()
                            .map(|t| mycel_models::ChatMessage { role: t.role.as_str().into(), content: t.content })
                            .collect()
                    })
                    .collect();
                (conversations, params)
            }
            _ => return fail(job, "a kind of work this node cannot run"),
        };
        let Some(served) = models.generators.iter().find(|s| s.advert.weights == job.model) else {
            return fail(job, "not our model");
        };
        let model = served.model.clone();
        let (net, me) = (self.net.clone(), self.me);
        tokio::spawn(async move {
            let mut generations: Vec<Generation> = Vec::with_capacity(conversations.len());
            let mut input_tokens = 0u64;
            let mut failure = None;
            for (i, messages) in conversations.into_iter().enumerate() {
                let ids = match model.chat_prompt(&messages).and_then(|p| model.encode(&p)) {
                    Ok(ids) => ids,
                    Err(e) => {
                        failure = Some(e.to_string());
                        break;
                    }
                };
                input_tokens += ids.len() as u64;
                let item = job.first_item + i as u64;
                // Each item samples with its own seed: the same prompt twice
                // in one task may differ, yet a rerun gives the same text.
                let item_params = GenerateParams { seed: params.seed.wrapping_add(item), ..params.clone() };
                let Ok((stream, done)) = models.pool.generate(model.clone(), ids, item_params) else {
                    failure = Some("worker pool busy".into());
                    break;
                };
                let result = if params.stream {
                    let sink = PartialSink { net: net.clone(), tx: tx.clone(), me, to: job.requester, task: job.task };
                    let (_, result) = tokio::join!(sink.forward(stream, job.shard, item), done);
                    result
                } else {
                    // Nobody reads the pieces: dropping the receiver lets
                    // the model run without waiting on it.
                    drop(stream);
                    done.await
                };
                match result {
                    Ok(Ok(g)) => generations.push(g),
                    Ok(Err(e)) => {
                        failure = Some(e.to_string());
                        break;
                    }
                    Err(_) => {
                        failure = Some("worker pool stopped".into());
                        break;
                    }
                }
            }
            let output = match failure {
                Some(e) => Err(e),
                None => Ok(ShardOutput::Generations(generations)),
            };
            let compute_ms = started.elapsed().as_millis() as u32;
            let done = JobDone { job, output, compute_ms, input_tokens };
            let _ = tx.send(Command::JobDone(Box::new(done))).await;
        });
    }
}
