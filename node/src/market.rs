//! The market interpreter: carries out what [`mycel_market::Node`] decides,
//! with the network, a real clock, the store, the local worker pool and the
//! API.
//!
//! One task owns the machine; everything reaches it as a [`Command`] on a
//! bounded channel (API calls, adverts, network messages, finished jobs),
//! and the machine's single timer queue is served by sleeping until its
//! next due time. No market decision is made here: this file only turns
//! actions into I/O and API requests into inputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use mycel_api::{ApiError, SubmitRequest, Submitted, TaskEvent, TaskSummary, TaskView, Watch};
use mycel_market::node::{Action, Entropy, Input, Metric, Outcome, Submission, SubmitError, Write};
use mycel_market::requester::Phase;
use mycel_market::{Job, Node, NodeConfig};
use mycel_metrics::Metrics;
use mycel_net::{Handle, now_ms};
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{
    Advert, ChatTurn, GenerateParams, Generation, Keypair, ModelKind, PeerId, PublicKey, Role, ShardOutput, Split,
    TaskId, Work,
};
use mycel_store::{Batch, SledStore, Store, Tree};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::local::LocalModels;

/// What the driver is asked to do.
#[derive(Debug)]
pub enum Command {
    Submit {
        request: SubmitRequest,
        reply: oneshot::Sender<Result<Submitted>>,
    },
    Get {
        task: String,
        reply: oneshot::Sender<Result<TaskView>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<TaskSummary>>>,
    },
    Watch {
        task: String,
        reply: oneshot::Sender<Result<Watch>>,
    },
    Cancel {
        task: String,
        reply: oneshot::Sender<Result<TaskSummary>>,
    },
    /// Reputation per peer (PeerId as text).
    Reputations {
        reply: oneshot::Sender<std::collections::HashMap<String, f64>>,
    },
    /// Brings the task and shard gauges up to date.
    RefreshMetrics {
        reply: oneshot::Sender<()>,
    },
    ModelsReady(Arc<LocalModels>),
    /// A peer's advert, verified by the network.
    Advert {
        peer: PeerId,
        advert: Box<Advert>,
    },
    Inbound {
        from: PeerId,
        message: Box<Market>,
    },
    JobDone(Box<JobDone>),
    SendFailed {
        to: PublicKey,
        message: Box<Market>,
    },
    /// A peer's advert expired: it is gone.
    PeerLost(PeerId),
}

/// Misbehaviour on demand, for testing the swarm's defences
/// (`mycel node --fault`, `mycel testnet up --fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Returns wrong embeddings (and altered answers), signed as its own.
    Perturb,
    /// Corrupts the signature of every result it sends.
    Forge,
}

impl From<Fault> for mycel_market::node::Fault {
    fn from(f: Fault) -> Self {
        match f {
            Fault::Perturb => Self::Perturb,
            Fault::Forge => Self::Forge,
        }
    }
}

/// A shard the local models finished (or failed).
#[derive(Debug)]
pub struct JobDone {
    job: Job,
    output: Result<ShardOutput, String>,
    compute_ms: u32,
    input_tokens: u64,
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

/// Sends a market message, retrying a few times while the peer says it is
/// busy or cannot be reached (a result lost to a full queue would cost the
/// whole shard).
async fn deliver(net: &Handle, to: PublicKey, message: &Market) -> bool {
    let mut wait = std::time::Duration::from_millis(100);
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        if matches!(
            net.request(to.to_peer_id(), Request::Market(Box::new(message.clone()))).await,
            Ok(Response::Accepted)
        ) {
            return true;
        }
    }
    false
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

/// Share of shards spot-checked when the request does not say.
const DEFAULT_SPOT_CHECK: f32 = 0.05;

/// Events buffered per watched task (a slow watcher skips progress).
const WATCH_BUFFER: usize = 1024;

/// Messages queued for one peer; past this a send counts as failed.
const OUTBOX: usize = 256;

/// The interpreter's state: the machine and the I/O around it.
pub struct Driver {
    market: Node,
    me: PublicKey,
    net: Handle,
    store: Arc<SledStore>,
    tx: mpsc::Sender<Command>,
    models: Option<Arc<LocalModels>>,
    watchers: BTreeMap<TaskId, broadcast::Sender<TaskEvent>>,
    /// Messages waiting for each peer, bounded ([`OUTBOX`]).
    outboxes: BTreeMap<PublicKey, mpsc::Sender<Market>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("me", &self.me).finish_non_exhaustive()
    }
}

/// How the market is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Finished tasks kept.
    pub keep_finished: usize,
    /// How long a peer's advert stays good.
    pub advert_ttl: std::time::Duration,
    /// Misbehaviour on purpose, for tests.
    pub fault: Option<Fault>,
}

/// Starts the driver; commands go in through the returned sender.
pub fn start(
    key: Keypair,
    net: Handle,
    store: Arc<SledStore>,
    metrics: Arc<Metrics>,
    settings: Settings,
) -> mpsc::Sender<Command> {
    let (tx, rx) = mpsc::channel(1024);
    let me = key.public();
    let config = NodeConfig::default()
        .with_keep_finished(settings.keep_finished)
        .with_advert_ttl_ms(settings.advert_ttl.as_millis() as u64)
        .with_fault(settings.fault.map(Into::into));
    let driver = Driver {
        market: Node::new(key, config),
        me,
        net,
        store,
        tx: tx.clone(),
        models: None,
        watchers: BTreeMap::new(),
        outboxes: BTreeMap::new(),
        metrics,
    };
    tokio::spawn(driver.run(rx));
    tx
}

impl Driver {
    /// Hands the journal to the machine: unfinished tasks resume.
    fn restore(&mut self) {
        let read = |tree| match self.store.scan_prefix(tree, &[]) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, ?tree, "cannot read the journal");
                Vec::new()
            }
        };
        let (tasks, reputations) = (read(Tree::Tasks), read(Tree::Reputation));
        let (actions, skipped) = self.market.restore(now_ms(), tasks, reputations);
        for entry in skipped {
            warn!(%entry, "unreadable journal entry; skipped");
        }
        for (task, t) in self.market.tasks() {
            if t.outcome.is_none() {
                info!(%task, done = t.requester.shards_done(), of = t.requester.shard_count(), "resuming task");
            }
        }
        self.perform(actions);
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.restore();
        loop {
            // The machine's one timer queue: sleep until its next due time.
            let due = self.market.next_timer_ms().map(|at| {
                let wait = at.saturating_sub(now_ms());
                tokio::time::Instant::now() + std::time::Duration::from_millis(wait)
            });
            let command = tokio::select! {
                command = rx.recv() => match command {
                    Some(c) => c,
                    None => break,
                },
                () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                    self.input(Input::Tick);
                    continue;
                }
            };
            self.command(command).await;
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Submit { request, reply } => {
                let result = self.submit(request).await;
                let _ = reply.send(result);
            }
            Command::Get { task, reply } => {
                let _ = reply.send(self.view(&task));
            }
            Command::List { reply } => {
                let list = self.market.tasks().filter_map(|(t, _)| self.summary(*t)).collect();
                let _ = reply.send(Ok(list));
            }
            Command::Watch { task, reply } => {
                let _ = reply.send(self.watch(&task));
            }
            Command::Cancel { task, reply } => {
                let _ = reply.send(self.cancel(&task));
            }
            Command::Reputations { reply } => {
                let map = self.market.reputations(now_ms()).map(|(k, v)| (k.to_peer_id().to_string(), v)).collect();
                let _ = reply.send(map);
            }
            Command::RefreshMetrics { reply } => {
                self.refresh_metrics();
                let _ = reply.send(());
            }
            Command::ModelsReady(models) => {
                let input =
                    Input::ModelsReady { models: models.adverts(), capacity: models.pool.config().replicas as u32 };
                self.models = Some(models);
                self.input(input);
            }
            Command::Advert { peer, advert } => {
                if let Ok(peer) = PublicKey::from_peer_id(&peer) {
                    self.input(Input::Advert { peer, advert: *advert });
                }
            }
            Command::Inbound { from, message } => {
                if let Ok(from) = PublicKey::from_peer_id(&from) {
                    self.input(Input::Message { from, message: *message });
                }
            }
            Command::JobDone(done) => {
                let JobDone { job, output, compute_ms, input_tokens } = *done;
                if let Err(e) = &output {
                    warn!(error = %e, shard = job.shard, "shard failed");
                }
                self.input(Input::JobDone { job, output, compute_ms, input_tokens });
            }
            Command::PeerLost(peer) => {
                if let Ok(peer) = PublicKey::from_peer_id(&peer) {
                    // Its outbox task ends once what is queued is tried.
                    self.outboxes.remove(&peer);
                    self.input(Input::PeerLost(peer));
                }
            }
            Command::SendFailed { to, message } => self.input(Input::Undelivered { to, message: *message }),
        }
    }

    fn input(&mut self, input: Input) {
        let actions = self.market.handle(now_ms(), input);
        self.perform(actions);
    }

    /// Carries out the machine's actions in order. A journal write that
    /// fails stops the rest: nothing that depends on it may leave.
    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Journal(writes) => {
                    if let Err(e) = self.journal(writes) {
                        warn!(error = %e, "cannot journal; dropping what depends on it");
                        return;
                    }
                }
                Action::Send { to, message } => self.send(to, message),
                Action::Gossip(signed) => {
                    let net = self.net.clone();
                    tokio::spawn(async move {
                        if let Err(e) = net.publish_cfp(&signed).await {
                            debug!(error = %e, "CFP not gossiped");
                        }
                    });
                }
                Action::Execute(job) => self.execute(job),
                Action::Text { task, item, text } => {
                    if let Some(tx) = self.watchers.get(&task) {
                        let _ = tx.send(TaskEvent::Text { item, text });
                    }
                }
                Action::Progress(task) => self.notify(task),
                Action::Load(load) => {
                    let net = self.net.clone();
                    tokio::spawn(async move {
                        let _ = net.set_load(load).await;
                    });
                }
                Action::Metric(metric) => self.count(metric),
            }
        }
    }

    fn journal(&self, writes: Vec<Write>) -> Result<()> {
        let mut batch = Batch::new();
        for write in writes {
            match write {
                Write::Task { key, value } => {
                    batch.put(Tree::Tasks, key, value);
                }
                Write::Forget { key } => {
                    batch.delete(Tree::Tasks, key);
                }
                Write::Reputation(peer, bytes) => {
                    batch.put(Tree::Reputation, peer.to_bytes().to_vec(), bytes);
                }
            }
        }
        // A durable write (fsync) must finish before anything that depends
        // on it is sent; keep the runtime's other tasks moving meanwhile.
        tokio::task::block_in_place(|| self.store.commit(&batch))?;
        Ok(())
    }

    fn count(&self, metric: Metric) {
        let m = &self.metrics;
        match metric {
            Metric::BidSent => m.bids_sent.inc(),
            Metric::BidWon => m.bids_won.inc(),
            Metric::Reauction => m.reauctions.inc(),
            Metric::CfpGossiped => m.cfps_gossiped.inc(),
            Metric::VerificationFailure => m.verification_failures.inc(),
            Metric::AuctionLatencyMs(ms) => m.auction_latency.observe(ms as f64 / 1000.0),
            Metric::Inference { model, items, tokens, compute_ms } => {
                m.shards_executed.inc();
                m.inference_items.with(&model).add(items);
                m.inference_tokens.with(&model).add(tokens);
                m.add_inference_seconds(&model, f64::from(compute_ms) / 1000.0);
            }
        }
    }

    // ---- requester side: the API ----------------------------------------

    async fn submit(&mut self, request: SubmitRequest) -> Result<Submitted> {
        let submission = submission(request)?;
        let mut random = [0u8; 48];
        getrandom::fill(&mut random).map_err(|e| anyhow!("no randomness for a task: {e}"))?;
        let entropy = Entropy::from_bytes(random);
        let (task, actions) = self.market.submit(now_ms(), entropy, submission).map_err(|e| match e {
            SubmitError::ModelNotFound { .. } => ApiError::ModelNotFound(e.to_string()).into(),
            SubmitError::NoCapablePeer(_) => ApiError::NoCapablePeer(e.to_string()).into(),
            SubmitError::Invalid(_) => ApiError::BadRequest(e.to_string()).into(),
            other => anyhow::Error::from(other),
        })?;
        if let Some(t) = self.market.task(&task) {
            info!(%task, shards = t.requester.shard_count(), model = %t.model, "task submitted");
        }
        self.perform(actions);
        Ok(Submitted { task: task.to_string() })
    }

    /// Tells the task's watchers where it stands; forgets them once it
    /// finished.
    fn notify(&mut self, task: TaskId) {
        if !self.watchers.contains_key(&task) {
            return;
        }
        let Some(summary) = self.summary(task) else {
            self.watchers.remove(&task);
            return;
        };
        let finished = summary.finished();
        if let Some(tx) = self.watchers.get(&task) {
            let _ = tx.send(TaskEvent::Progress(summary));
        }
        if finished {
            self.watchers.remove(&task);
        }
    }

    /// A task id the user typed, known to this node.
    fn known(&self, id: &str) -> Result<TaskId> {
        let task = TaskId::from_hex(id)
            .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (32 hex digits)")))?;
        if self.market.task(&task).is_none() {
            return Err(ApiError::NotFound(format!("no task {id} on this node")).into());
        }
        Ok(task)
    }

    /// One line about a task.
    fn summary(&self, task: TaskId) -> Option<TaskSummary> {
        let t = self.market.task(&task)?;
        let requester = &t.requester;
        let mut workers = BTreeMap::new();
        for peer in requester.executors().into_iter().flatten() {
            *workers.entry(peer.to_peer_id().to_string()).or_insert(0) += 1;
        }
        let (state, error) = match (&t.outcome, requester.phase()) {
            (Some(Outcome::Done { .. }), _) | (None, Phase::Done) => ("done", None),
            (Some(Outcome::Failed(why)), _) => ("failed", Some(why.clone())),
            (None, Phase::Failed) => ("failed", None),
            (None, _) => ("running", None),
        };
        Some(TaskSummary {
            task: task.to_string(),
            state: state.into(),
            shards: requester.shard_count(),
            shards_done: requester.shards_done(),
            kind: t.label.clone(),
            workers,
            peers_working: requester.peers_working(),
            error,
        })
    }

    /// The task's state now, and a receiver for what happens next.
    fn watch(&mut self, id: &str) -> Result<Watch> {
        let task = self.known(id)?;
        let progress = self.summary(task).context("task vanished")?;
        let events = if progress.finished() {
            // Nothing more will happen: a closed channel says so.
            broadcast::channel(1).1
        } else {
            self.watchers.entry(task).or_insert_with(|| broadcast::channel(WATCH_BUFFER).0).subscribe()
        };
        Ok(Watch { progress, events })
    }

    /// Gives up on a task: journaled as failed ("cancelled"); workers'
    /// late results are answered as late.
    fn cancel(&mut self, id: &str) -> Result<TaskSummary> {
        let task = self.known(id)?;
        info!(task = %id, "task cancelled");
        self.input(Input::Cancel(task));
        self.summary(task).context("task vanished")
    }

    /// Task and shard gauges from the tasks held.
    fn refresh_metrics(&self) {
        let mut tasks: BTreeMap<&str, f64> = [("running", 0.0), ("done", 0.0), ("failed", 0.0)].into();
        let (mut shards_done, mut shards_open) = (0.0, 0.0);
        for (task, _) in self.market.tasks() {
            if let Some(s) = self.summary(*task) {
                let state = match s.state.as_str() {
                    "done" => "done",
                    "failed" => "failed",
                    _ => "running",
                };
                *tasks.entry(state).or_default() += 1.0;
                shards_done += s.shards_done as f64;
                shards_open += (s.shards - s.shards_done) as f64;
            }
        }
        for (state, n) in tasks {
            self.metrics.tasks.with(state).set(n);
        }
        self.metrics.shards.with("done").set(shards_done);
        self.metrics.shards.with("open").set(shards_open);
    }

    fn view(&self, id: &str) -> Result<TaskView> {
        let task = self.known(id)?;
        let t = self.market.task(&task).with_context(|| format!("no task {id} on this node"))?;
        let requester = &t.requester;
        let mut view = TaskView {
            task: id.to_string(),
            state: match requester.phase() {
                Phase::Done => "done",
                Phase::Failed => "failed",
                _ => "running",
            }
            .into(),
            shards: requester.shard_count(),
            shards_done: requester.shards_done(),
            executors: requester.executors().iter().map(|e| e.map(|k| k.to_peer_id().to_string())).collect(),
            error: None,
            embeddings: None,
            generations: None,
            receipt: None,
            model: t.model.clone(),
            input_tokens: 0,
            peers_working: requester.peers_working(),
            auction_ms: t.auction_ms.clone(),
        };
        match &t.outcome {
            Some(Outcome::Done { output, receipt, input_tokens }) => {
                view.input_tokens = *input_tokens;
                view.state = "done".into();
                match output {
                    ShardOutput::Embeddings { dimensions, values } => {
                        let d = (*dimensions as usize).max(1);
                        view.embeddings = Some(values.chunks(d).map(<[f32]>::to_vec).collect());
                    }
                    ShardOutput::Generations(g) => {
                        view.generations = Some(
                            g.iter()
                                .map(|g| mycel_api::GenerationView {
                                    text: g.text.clone(),
                                    tokens: g.tokens,
                                    finish: crate::submit::finish_name(g.finish).into(),
                                })
                                .collect(),
                        )
                    }
                    _ => {}
                }
                view.receipt = mycel_protocol::Wire::encode(receipt.as_ref()).ok().map(hex::encode);
            }
            Some(Outcome::Failed(reason)) => {
                view.state = "failed".into();
                view.error = Some(reason.clone());
            }
            None => {}
        }
        Ok(view)
    }

    // ---- both sides: messages ------------------------------------------

    /// Queues a message on its peer's outbox. A full outbox (the peer has
    /// not taken the last [`OUTBOX`] messages) is a failed delivery, told
    /// to the market at once rather than buffered without bound.
    fn send(&mut self, to: PublicKey, message: Market) {
        if self.outboxes.get(&to).is_none_or(mpsc::Sender::is_closed) {
            let outbox = self.open_outbox(to);
            self.outboxes.insert(to, outbox);
        }
        let Some(outbox) = self.outboxes.get(&to) else { return };
        if let Err(e) = outbox.try_send(message) {
            debug!(peer = %to.to_peer_id(), "outbox full; message not sent");
            let message = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            self.input(Input::Undelivered { to, message });
        }
    }

    /// One task per peer takes its messages in order: over the network,
    /// with retries, or looped back to this node's own market.
    fn open_outbox(&self, to: PublicKey) -> mpsc::Sender<Market> {
        let (outbox, mut queue) = mpsc::channel::<Market>(OUTBOX);
        let (tx, net, me) = (self.tx.clone(), self.net.clone(), self.me);
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                if to == me {
                    let from = me.to_peer_id();
                    if tx.send(Command::Inbound { from, message: Box::new(message) }).await.is_err() {
                        return;
                    }
                } else if !deliver(&net, to, &message).await {
                    debug!(peer = %to.to_peer_id(), "market message not delivered");
                    let _ = tx.send(Command::SendFailed { to, message: Box::new(message) }).await;
                }
            }
        });
        outbox
    }

    // ---- worker side: the local models ---------------------------------

    /// Runs a job on the local models off the loop; reports back with
    /// [`Command::JobDone`]. A job the models cannot take fails at once.
    fn execute(&mut self, job: Job) {
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

/// The API's request as the market's submission: the request mapping for
/// each kind of work. Every error here is the client's (a 400).
fn submission(request: SubmitRequest) -> Result<Submission> {
    let kind = match request.kind.as_str() {
        "embed" => ModelKind::Embedding,
        "generate" | "chat" => ModelKind::Generation,
        other => {
            return Err(ApiError::BadRequest(format!("unknown task kind {other:?} (embed, generate or chat)")).into());
        }
    };
    if request.inputs.is_empty() && request.conversations.is_empty() {
        return Err(ApiError::BadRequest("no inputs".into()).into());
    }
    let params = GenerateParams {
        max_tokens: request.max_tokens.unwrap_or(128),
        temperature: request.temperature.unwrap_or(0.0),
        top_p: request.top_p.unwrap_or(1.0),
        seed: request.seed.unwrap_or(0),
        stop: request.stop.clone(),
        stream: request.stream,
    };
    let work = match request.kind.as_str() {
        "embed" => Work::Embed { texts: request.inputs },
        "generate" => Work::Generate { prompts: request.inputs, params },
        _ => {
            let conversations = request
                .conversations
                .into_iter()
                .map(|turns| turns.into_iter().map(chat_turn).collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>()?;
            Work::Chat { conversations, params }
        }
    };
    Ok(Submission {
        label: request.kind,
        kind,
        model: request.model,
        work,
        split: request.items_per_shard.map_or(Split::Auto, Split::ItemsPerShard),
        redundancy: request.redundancy,
        spot_check_permille: spot_check_permille(request.spot_check)?,
        then: Vec::new(),
    })
}

/// A request's spot-check share (0-1; the node's default when absent) in
/// thousandths, as task specs carry it.
fn spot_check_permille(share: Option<f32>) -> Result<u16, ApiError> {
    let share = share.unwrap_or(DEFAULT_SPOT_CHECK);
    if !(0.0..=1.0).contains(&share) {
        return Err(ApiError::BadRequest(format!("spot_check {share} not in 0..=1")));
    }
    Ok((share * 1000.0).round() as u16)
}

fn chat_turn(t: mycel_api::ChatTurnView) -> Result<ChatTurn> {
    let role = match t.role.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => return Err(ApiError::BadRequest(format!("unknown chat role {other:?}")).into()),
    };
    Ok(ChatTurn { role, content: t.content })
}
