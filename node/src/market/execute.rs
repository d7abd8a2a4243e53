//! The worker's side of the market interpreter: running a job on the local
//! models off the loop, streaming generated text to the requester as it
//! comes, and reporting the result back as a [`Command::JobDone`].

use std::time::Instant;

use mycel_market::Job;
use mycel_models::shard;
use mycel_net::Handle;
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{PublicKey, ShardOutput, TaskId, Work};
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
    async fn forward(&self, mut stream: mpsc::Receiver<String>, shard: u32, item: u64) {
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
    /// Runs a job on the local models off the loop ([`shard::run`], the
    /// executor for each kind of work); reports back with
    /// [`Command::JobDone`]. A job the models cannot take fails at once.
    pub(super) fn execute(&mut self, job: Job) {
        let tx = self.tx.clone();
        let (net, me) = (self.net.clone(), self.me);
        let models = self.models.clone();
        let slow = self.slow;
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match models.as_ref().and_then(|m| m.model(&job.model).map(|model| (m, model))) {
                None => Err("not a model of ours".to_string()),
                Some((models, model)) => {
                    let streaming =
                        matches!(&job.work, Work::Generate { params, .. } | Work::Chat { params, .. } if params.stream);
                    let (text, forward) = if streaming {
                        // Each item's text goes to the requester as it is made.
                        let (streams, mut items) = mpsc::channel::<(u64, mpsc::Receiver<String>)>(1);
                        let sink = PartialSink { net, tx: tx.clone(), me, to: job.requester, task: job.task };
                        let shard = job.shard;
                        let forward = tokio::spawn(async move {
                            while let Some((item, stream)) = items.recv().await {
                                sink.forward(stream, shard, item).await;
                            }
                        });
                        (Some(streams), Some(forward))
                    } else {
                        (None, None)
                    };
                    let result = shard::run(&models.pool, model, job.work.clone(), job.first_item, text).await;
                    if let Some(forward) = forward {
                        // The answer's last pieces go out before its result.
                        let _ = forward.await;
                    }
                    result.map_err(|e| e.to_string())
                }
            };
            let compute_ms = started.elapsed().as_millis() as u32;
            if slow {
                tokio::time::sleep(started.elapsed() * 9).await;
            }
            let (output, input_tokens) = match result {
                Ok(run) => (Ok(run.output), run.input_tokens),
                Err(e) => (Err(e), 0),
            };
            let done = JobDone { job, output, compute_ms, input_tokens };
            let _ = tx.send(Command::JobDone(Box::new(done))).await;
        });
    }
}
