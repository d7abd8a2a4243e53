//! The market driver: runs the `mycel_market` state machines with the
//! network, a real clock, the store and the local worker pool.
//!
//! One task owns every requester and the worker; everything reaches it as a
//! [`Command`] on a bounded channel (API calls, network messages, timers,
//! finished jobs), so state changes happen in one place and in order.
//! Messages to this node itself (it may bid on its own task) are looped
//! back without touching the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use mycel_api::{ApiError, SubmitRequest, Submitted, TaskEvent, TaskSummary, TaskView, Watch};
use mycel_market::requester::Phase;
use mycel_market::{
    Action, AwardOutcome, Candidate, Config, Done, Event, Job, Reputation, Requester, Served, Timer, Worker,
    WorkerConfig,
};
use mycel_metrics::Metrics;
use mycel_net::{Handle, now_ms};
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{
    ChatTurn, GenerateParams, Generation, Keypair, ModelKind, ModelSelector, PeerId, PublicKey, Receipt, Role,
    ShardOutput, ShardResult, Signed, Split, TaskId, TaskSpec, Wire, Work,
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
        reply: oneshot::Sender<HashMap<String, f64>>,
    },
    /// Brings the task and shard gauges up to date.
    RefreshMetrics {
        reply: oneshot::Sender<()>,
    },
    ModelsReady(Arc<LocalModels>),
    Inbound {
        from: PeerId,
        message: Box<Market>,
    },
    Timer {
        task: TaskId,
        timer: Timer,
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

/// A request's spot-check share (0-1; the node's default when absent) in
/// thousandths, as task specs carry it.
fn spot_check_permille(share: Option<f32>) -> Result<u16, ApiError> {
    let share = share.unwrap_or(DEFAULT_SPOT_CHECK);
    if !(0.0..=1.0).contains(&share) {
        return Err(ApiError::BadRequest(format!("spot_check {share} not in 0..=1")));
    }
    Ok((share * 1000.0).round() as u16)
}

/// Reputation of a peer never seen before.
pub const DEFAULT_REPUTATION: f64 = mycel_market::reputation::DEFAULT;

/// Events buffered per watched task (a slow watcher skips progress).
const WATCH_BUFFER: usize = 1024;

/// A finished task.
#[derive(Debug, Clone)]
enum Outcome {
    Done { output: ShardOutput, receipt: Box<Signed<Receipt>>, input_tokens: u64 },
    Failed(String),
}

/// What the API shows of a task beyond the requester's state.
#[derive(Debug, Clone)]
struct TaskMeta {
    /// `embed`, `generate` or `chat`.
    kind: String,
    /// The model's advertised id.
    model: String,
}

/// The market driver's state.
pub struct Driver {
    key: Keypair,
    me: PublicKey,
    net: Handle,
    store: Arc<SledStore>,
    tx: mpsc::Sender<Command>,
    models: Option<Arc<LocalModels>>,
    worker: Option<Worker>,
    tasks: HashMap<TaskId, Requester>,
    outcomes: HashMap<TaskId, Outcome>,
    reputation: HashMap<PublicKey, Reputation>,
    meta: HashMap<TaskId, TaskMeta>,
    watchers: HashMap<TaskId, broadcast::Sender<TaskEvent>>,
    /// Who streams each item of a task (the first runner heard from).
    streaming: HashMap<(TaskId, u64), PublicKey>,
    /// When each task's current CFP left, for the auction latency.
    auction_started: HashMap<TaskId, Instant>,
    /// CFP-to-first-award times per task, in ms.
    auction_ms: HashMap<TaskId, Vec<u64>>,
    metrics: Arc<Metrics>,
    /// Finished tasks, oldest first; beyond `keep_finished` the oldest are
    /// forgotten, journal entry included.
    finished: std::collections::VecDeque<TaskId>,
    keep_finished: usize,
    fault: Option<Fault>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("tasks", &self.tasks.len()).finish_non_exhaustive()
    }
}

/// Starts the driver; commands go in through the returned sender.
pub fn start(
    key: Keypair,
    net: Handle,
    store: Arc<SledStore>,
    metrics: Arc<Metrics>,
    keep_finished: usize,
    fault: Option<Fault>,
) -> mpsc::Sender<Command> {
    let (tx, rx) = mpsc::channel(1024);
    let me = key.public();
    let driver = Driver {
        key,
        me,
        net,
        store,
        tx: tx.clone(),
        models: None,
        worker: None,
        tasks: HashMap::new(),
        outcomes: HashMap::new(),
        reputation: HashMap::new(),
        meta: HashMap::new(),
        watchers: HashMap::new(),
        streaming: HashMap::new(),
        auction_started: HashMap::new(),
        auction_ms: HashMap::new(),
        metrics,
        finished: std::collections::VecDeque::new(),
        keep_finished,
        fault,
    };
    tokio::spawn(driver.run(rx));
    tx
}

impl Driver {
    /// Takes back the unfinished tasks the journal holds.
    fn resume(&mut self) {
        let entries = match self.store.scan_prefix(Tree::Tasks, &[]) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the task journal");
                return;
            }
        };
        let mut finished = Vec::new();
        for (key, value) in entries {
            let Ok(id) = <[u8; 16]>::try_from(key.as_slice()) else { continue };
            let task = TaskId(id);
            match Requester::decode(&value) {
                Ok(mut requester) if !matches!(requester.phase(), Phase::Done | Phase::Failed) => {
                    info!(task = %hex::encode(id), done = requester.shards_done(), of = requester.shard_count(), "resuming task");
                    let actions = requester.resume(now_ms());
                    self.tasks.insert(task, requester);
                    self.apply(task, actions);
                }
                Ok(requester) => finished.push((requester.completed_ms().unwrap_or(0), task, requester)),
                Err(e) => warn!(task = %hex::encode(id), error = %e, "unreadable journal entry; skipped"),
            }
        }
        // Finished before the restart: still listed and served, oldest
        // first (failed ones, which have no completion time, before them),
        // as many as the node keeps.
        finished.sort_by_key(|(at, _, _)| *at);
        for (_, task, requester) in finished {
            let outcome = match requester.outcome() {
                Some(Ok((output, receipt))) => match Signed::sign(&self.key, &receipt) {
                    Ok(signed) => {
                        Outcome::Done { output, receipt: Box::new(signed), input_tokens: requester.input_tokens() }
                    }
                    Err(e) => Outcome::Failed(format!("signing the receipt: {e}")),
                },
                Some(Err(reason)) => Outcome::Failed(reason),
                None => continue,
            };
            self.tasks.insert(task, requester);
            self.finish(task, outcome);
        }
    }

    /// Records a finished task's outcome, and forgets the oldest finished
    /// tasks beyond what the node keeps, in memory and in the journal.
    fn finish(&mut self, task: TaskId, outcome: Outcome) {
        self.outcomes.insert(task, outcome);
        self.auction_started.remove(&task);
        if !self.finished.contains(&task) {
            self.finished.push_back(task);
        }
        let mut batch = Batch::new();
        while self.finished.len() > self.keep_finished {
            let Some(old) = self.finished.pop_front() else { break };
            self.tasks.remove(&old);
            self.outcomes.remove(&old);
            self.meta.remove(&old);
            self.auction_ms.remove(&old);
            batch.delete(Tree::Tasks, old.0);
            debug!(task = %hex::encode(old.0), "finished task forgotten (--keep-finished)");
        }
        if !batch.is_empty()
            && let Err(e) = tokio::task::block_in_place(|| self.store.commit(&batch))
        {
            warn!(error = %e, "cannot drop old tasks from the journal; they come back after a restart");
        }
    }

    /// Reputation per peer, as the journal has it.
    fn load_reputation(&mut self) {
        match self.store.scan_prefix(Tree::Reputation, &[]) {
            Ok(entries) => {
                for (key, value) in entries {
                    let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) else { continue };
                    if let (Ok(peer), Some(r)) = (PublicKey::from_bytes(&key), Reputation::from_bytes(&value)) {
                        self.reputation.insert(peer, r);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read reputations"),
        }
    }

    /// Changes a peer's reputation and journals it (see
    /// [`mycel_market::reputation`]: halved per fault, earned back slowly
    /// over streaks of valid results, forgiven slowly with time).
    fn adjust_reputation(&mut self, peer: PublicKey, fault: bool) -> f64 {
        let now = now_ms();
        let r = self.reputation.entry(peer).or_default();
        if fault {
            r.fault(now);
        } else {
            r.valid(now);
        }
        let mut batch = Batch::new();
        batch.put(Tree::Reputation, peer.to_bytes().to_vec(), r.to_bytes());
        let score = r.score(now);
        if let Err(e) = tokio::task::block_in_place(|| self.store.commit(&batch)) {
            warn!(error = %e, "cannot journal a reputation");
        }
        score
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.load_reputation();
        self.resume();
        while let Some(command) = rx.recv().await {
            match command {
                Command::Submit { request, reply } => {
                    let result = self.submit(request).await;
                    let _ = reply.send(result);
                }
                Command::Get { task, reply } => {
                    let _ = reply.send(self.view(&task));
                }
                Command::List { reply } => {
                    let mut list: Vec<TaskSummary> = self.tasks.keys().filter_map(|t| self.summary(*t)).collect();
                    list.sort_by(|a, b| a.task.cmp(&b.task));
                    let _ = reply.send(Ok(list));
                }
                Command::Watch { task, reply } => {
                    let _ = reply.send(self.watch(&task));
                }
                Command::Cancel { task, reply } => {
                    let _ = reply.send(self.cancel(&task));
                }
                Command::Reputations { reply } => {
                    let now = now_ms();
                    let map = self.reputation.iter().map(|(k, v)| (k.to_peer_id().to_string(), v.score(now))).collect();
                    let _ = reply.send(map);
                }
                Command::RefreshMetrics { reply } => {
                    self.refresh_metrics();
                    let _ = reply.send(());
                }
                Command::ModelsReady(models) => self.models_ready(models),
                Command::Inbound { from, message } => self.inbound(from, *message),
                Command::Timer { task, timer } => self.step(task, Event::Timer(timer)),
                Command::JobDone(done) => self.job_done(*done),
                Command::PeerLost(peer) => {
                    if let Ok(peer) = PublicKey::from_peer_id(&peer) {
                        let open: Vec<TaskId> = self.tasks.keys().copied().collect();
                        for task in open {
                            self.step(task, Event::PeerLost(peer));
                        }
                    }
                }
                Command::SendFailed { to, message } => {
                    if let Market::Award(signed) = *message
                        && let Ok(award) = signed.verify()
                    {
                        for s in award.shards {
                            self.step(award.task, Event::Refused { from: to, shard: s.shard });
                        }
                    }
                }
            }
        }
    }

    fn models_ready(&mut self, models: Arc<LocalModels>) {
        let mut served = BTreeMap::new();
        for advert in models.adverts() {
            let units_per_s = match advert.kind {
                ModelKind::Embedding => advert.throughput.embeddings_per_s,
                _ => advert.throughput.decode_tokens_per_s,
            };
            served.insert(advert.weights, Served { kind: advert.kind, units_per_s: units_per_s.max(0.1) });
        }
        let capacity = models.pool.config().replicas as u32;
        self.worker = Some(Worker::new(WorkerConfig { capacity, ..WorkerConfig::default() }, served));
        self.models = Some(models);
    }

    // ---- requester side -------------------------------------------------

    async fn submit(&mut self, request: SubmitRequest) -> Result<Submitted> {
        let peers = self.net.peers().await.map_err(|e| anyhow!("{e}"))?;
        let mut adverts: Vec<(PublicKey, mycel_protocol::Advert)> =
            peers.into_iter().filter_map(|e| PublicKey::from_peer_id(&e.peer).ok().map(|k| (k, e.advert))).collect();
        if let Ok(Some(own)) = self.net.own_advert().await {
            adverts.push((self.me, own));
        }
        let kind = match request.kind.as_str() {
            "embed" => ModelKind::Embedding,
            "generate" | "chat" => ModelKind::Generation,
            other => {
                return Err(
                    ApiError::BadRequest(format!("unknown task kind {other:?} (embed, generate or chat)")).into()
                );
            }
        };
        if request.inputs.is_empty() && request.conversations.is_empty() {
            return Err(ApiError::BadRequest("no inputs".into()).into());
        }
        // Pin the model to one digest.
        let chosen = adverts
            .iter()
            .flat_map(|(_, a)| a.models.iter())
            .find(|m| m.kind == kind && request.model.as_ref().is_none_or(|want| model_matches(want, m)))
            .cloned();
        let chosen = match (chosen, &request.model) {
            (Some(m), _) => m,
            (None, Some(want)) => {
                return Err(ApiError::ModelNotFound(format!(
                    "no peer serves {} model {want:?} (GET /v1/models lists what the swarm offers)",
                    if kind == ModelKind::Embedding { "an embedding" } else { "a generation" }
                ))
                .into());
            }
            (None, None) => {
                return Err(ApiError::NoCapablePeer(format!(
                    "no peer serves {} model yet",
                    if kind == ModelKind::Embedding { "an embedding" } else { "a generation" }
                ))
                .into());
            }
        };
        let candidates: Vec<Candidate> = adverts
            .iter()
            .filter_map(|(peer, a)| {
                let m = a.models.iter().find(|m| m.weights == chosen.weights)?;
                let units_per_s = match kind {
                    ModelKind::Embedding => m.throughput.embeddings_per_s,
                    _ => m.throughput.decode_tokens_per_s,
                };
                let load = a.load.queued_shards as f32 / a.load.capacity.max(1) as f32;
                Some(Candidate { peer: *peer, units_per_s, load, reputation: self.reputation_of(peer) })
            })
            .collect();
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
        let spec = TaskSpec {
            work,
            model: ModelSelector::Digest(chosen.weights),
            split: request.items_per_shard.map_or(Split::Auto, Split::ItemsPerShard),
            redundancy: request.redundancy.clamp(1, mycel_protocol::limits::MAX_REDUNDANCY),
            spot_check_permille: spot_check_permille(request.spot_check)?,
            aggregation: mycel_protocol::Aggregation::Concat,
            deadline_ms: 0,
            budget_micros: None,
        };
        spec.validate().map_err(|e| ApiError::BadRequest(format!("invalid task: {e}")))?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| anyhow!("no randomness for a task id: {e}"))?;
        let task = TaskId(id);
        let mut requester = Requester::new(task, &spec, chosen.weights, kind, candidates, Config::default())?;
        info!(task = %hex::encode(id), shards = requester.shard_count(), model = %chosen.id, "task submitted");
        let actions = requester.start(now_ms());
        self.tasks.insert(task, requester);
        self.meta.insert(task, TaskMeta { kind: request.kind.clone(), model: chosen.id.clone() });
        self.apply(task, actions);
        Ok(Submitted { task: hex::encode(id) })
    }

    fn reputation_of(&self, peer: &PublicKey) -> f64 {
        self.reputation.get(peer).map_or(DEFAULT_REPUTATION, |r| r.score(now_ms()))
    }

    fn step(&mut self, task: TaskId, event: Event) {
        let Some(requester) = self.tasks.get_mut(&task) else { return };
        let actions = requester.handle(now_ms(), event);
        self.apply(task, actions);
    }

    /// Tells the task's watchers where it stands; forgets them once it
    /// finished.
    fn notify(&mut self, task: TaskId) {
        if !self.watchers.contains_key(&task) {
            return;
        }
        let Some(summary) = self.summary(task) else { return };
        let finished = summary.finished();
        if let Some(tx) = self.watchers.get(&task) {
            let _ = tx.send(TaskEvent::Progress(summary));
        }
        if finished {
            self.watchers.remove(&task);
            self.streaming.retain(|(t, _), _| *t != task);
        }
    }

    fn apply(&mut self, task: TaskId, actions: Vec<Action>) {
        let any = !actions.is_empty();
        self.apply_actions(task, actions);
        if any {
            self.notify(task);
        }
    }

    fn apply_actions(&mut self, task: TaskId, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Persist => {
                    if let Some(r) = self.tasks.get(&task)
                        && let Err(e) = self.persist(task, r)
                    {
                        // Nothing that depends on this state may leave.
                        warn!(error = %e, "cannot journal the task; failing it");
                        self.finish(task, Outcome::Failed(format!("journal: {e}")));
                        self.tasks.remove(&task);
                        return;
                    }
                }
                Action::SendCfp { to, gossip, cfp } => {
                    let Ok(signed) = Signed::sign(&self.key, &cfp) else { continue };
                    if let Some(r) = self.tasks.get_mut(&task) {
                        queue.extend(r.cfp_signed(cfp.round, signed.digest()));
                    }
                    if cfp.round > 1 {
                        self.metrics.reauctions.inc();
                    }
                    self.auction_started.insert(task, Instant::now());
                    for peer in to {
                        self.send(peer, Market::Cfp(signed.clone()));
                    }
                    if gossip {
                        // Too few candidates known directly: any peer on the
                        // CFP topic serving the model may bid.
                        self.metrics.cfps_gossiped.inc();
                        let net = self.net.clone();
                        tokio::spawn(async move {
                            if let Err(e) = net.publish_cfp(&signed).await {
                                debug!(error = %e, "CFP not gossiped");
                            }
                        });
                    }
                }
                Action::SendAward { to, award } => {
                    if let Some(started) = self.auction_started.remove(&task) {
                        let took = started.elapsed();
                        self.metrics.auction_latency.observe(took.as_secs_f64());
                        self.auction_ms.entry(task).or_default().push(took.as_millis() as u64);
                    }
                    if let Ok(signed) = Signed::sign(&self.key, &award) {
                        self.send(to, Market::Award(signed));
                    }
                }
                Action::Ack { to, ack } => {
                    if let Ok(signed) = Signed::sign(&self.key, &ack) {
                        self.send(to, Market::Ack(signed));
                    }
                }
                Action::SetTimer { at_ms, timer } => {
                    let tx = self.tx.clone();
                    let wait = at_ms.saturating_sub(now_ms());
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                        let _ = tx.send(Command::Timer { task, timer }).await;
                    });
                }
                Action::Penalise { peer, reason } => {
                    self.metrics.verification_failures.inc();
                    let reputation = self.adjust_reputation(peer, true);
                    warn!(peer = %peer.to_peer_id(), ?reason, reputation, "peer penalised");
                }
                Action::Reward { peer } => {
                    self.adjust_reputation(peer, false);
                }
                Action::Complete { output, receipt } => match Signed::sign(&self.key, &receipt) {
                    Ok(signed) => {
                        info!(task = %hex::encode(task.0), shards = receipt.shards.len(), "task complete");
                        let input_tokens = self.tasks.get(&task).map_or(0, Requester::input_tokens);
                        self.finish(task, Outcome::Done { output, receipt: Box::new(signed), input_tokens });
                    }
                    Err(e) => {
                        self.finish(task, Outcome::Failed(format!("signing the receipt: {e}")));
                    }
                },
                Action::Fail { reason } => {
                    warn!(task = %hex::encode(task.0), %reason, "task failed");
                    self.finish(task, Outcome::Failed(reason));
                }
            }
        }
    }

    fn persist(&self, task: TaskId, requester: &Requester) -> Result<()> {
        let mut batch = Batch::new();
        batch.put_wire(Tree::Tasks, task.0, requester)?;
        // A durable write (fsync) must finish before anything that depends
        // on it is sent; keep the runtime's other tasks moving meanwhile.
        tokio::task::block_in_place(|| self.store.commit(&batch))?;
        Ok(())
    }

    /// A task id the user typed, known to this node.
    fn known(&self, id: &str) -> Result<TaskId> {
        let task = TaskId::from_hex(id)
            .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (32 hex digits)")))?;
        if !self.tasks.contains_key(&task) {
            return Err(ApiError::NotFound(format!("no task {id} on this node")).into());
        }
        Ok(task)
    }

    /// One line about a task.
    fn summary(&self, task: TaskId) -> Option<TaskSummary> {
        let requester = self.tasks.get(&task)?;
        let mut workers = BTreeMap::new();
        for peer in requester.executors().into_iter().flatten() {
            *workers.entry(peer.to_peer_id().to_string()).or_insert(0) += 1;
        }
        let (state, error) = match (self.outcomes.get(&task), requester.phase()) {
            (Some(Outcome::Done { .. }), _) | (None, Phase::Done) => ("done", None),
            (Some(Outcome::Failed(why)), _) => ("failed", Some(why.clone())),
            (None, Phase::Failed) => ("failed", None),
            (None, _) => ("running", None),
        };
        let kind = match self.meta.get(&task) {
            Some(m) => m.kind.clone(),
            None => requester.kind_name().to_string(),
        };
        Some(TaskSummary {
            task: hex::encode(task.0),
            state: state.into(),
            shards: requester.shard_count(),
            shards_done: requester.shards_done(),
            kind,
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
        if let Some(requester) = self.tasks.get_mut(&task) {
            let actions = requester.cancel("cancelled");
            if !actions.is_empty() {
                info!(task = %id, "task cancelled");
            }
            self.apply(task, actions);
        }
        self.summary(task).context("task vanished")
    }

    /// Task and shard gauges from the tasks held.
    fn refresh_metrics(&self) {
        let mut tasks: BTreeMap<&str, f64> = [("running", 0.0), ("done", 0.0), ("failed", 0.0)].into();
        let (mut shards_done, mut shards_open) = (0.0, 0.0);
        for task in self.tasks.keys() {
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
        let requester = self.tasks.get(&task).with_context(|| format!("no task {id} on this node"))?;
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
            model: self.meta.get(&task).map(|m| m.model.clone()).unwrap_or_default(),
            input_tokens: 0,
            peers_working: requester.peers_working(),
            auction_ms: self.auction_ms.get(&task).cloned().unwrap_or_default(),
        };
        match self.outcomes.get(&task) {
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
                view.receipt = receipt.encode().ok().map(hex::encode);
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

    fn send(&self, to: PublicKey, message: Market) {
        if to == self.me {
            let tx = self.tx.clone();
            let from = self.me.to_peer_id();
            tokio::spawn(async move {
                let _ = tx.send(Command::Inbound { from, message: Box::new(message) }).await;
            });
            return;
        }
        let net = self.net.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if !deliver(&net, to, &message).await {
                debug!(peer = %to.to_peer_id(), "market message not delivered");
                let _ = tx.send(Command::SendFailed { to, message: Box::new(message) }).await;
            }
        });
    }

    fn inbound(&mut self, from: PeerId, message: Market) {
        let Ok(sender) = PublicKey::from_peer_id(&from) else { return };
        let now = now_ms();
        match message {
            Market::Cfp(signed) => {
                if *signed.signer() != sender {
                    return;
                }
                let Some(worker) = self.worker.as_mut() else { return };
                let Some(bid) = worker.on_cfp(now, &signed) else { return };
                if let Ok(signed_bid) = Signed::sign(&self.key, &bid) {
                    worker.bid_signed(&signed_bid);
                    self.metrics.bids_sent.inc();
                    self.send(sender, Market::Bid(signed_bid));
                }
            }
            Market::Bid(signed) => {
                // Routed by what the payload says; the signature is checked
                // once, in `Event::bid`.
                if let Ok(bid) = <mycel_protocol::Bid as Wire>::decode(signed.payload()) {
                    let reputation = self.reputation_of(&sender);
                    self.step(bid.task, Event::bid(sender, signed, reputation));
                }
            }
            Market::Award(signed) => {
                let Ok(award) = signed.verify_from(&sender) else { return };
                let Some(worker) = self.worker.as_mut() else { return };
                match worker.on_award(now, sender, &award) {
                    AwardOutcome::Run(jobs) => {
                        self.metrics.bids_won.inc();
                        for job in jobs {
                            self.run_job(job);
                        }
                    }
                    AwardOutcome::Refuse(why) => {
                        debug!(%why, "award refused");
                        for s in &award.shards {
                            self.send(sender, Market::Refuse { task: award.task, shard: s.shard });
                        }
                    }
                }
            }
            Market::Result(result) => {
                // Routed by the claim's task; the requester verifies the
                // signature (and penalises a bad one).
                if let Ok(claim) = <mycel_protocol::ResultClaim as Wire>::decode(result.claim.payload()) {
                    self.step(claim.task, Event::result(sender, result));
                }
            }
            Market::Ack(signed) => {
                if let Ok(ack) = signed.verify_from(&sender) {
                    debug!(shard = ack.shard, verdict = ?ack.verdict, "result acknowledged");
                }
            }
            Market::Refuse { task, shard } => self.step(task, Event::Refused { from: sender, shard }),
            Market::Partial { task, shard, item, text } => self.partial(task, shard, item, sender, text),
            _ => {}
        }
    }

    /// Streamed text from a worker: shown to the task's watchers if the
    /// sender runs that shard now and is the one streaming this item.
    fn partial(&mut self, task: TaskId, shard: u32, item: u64, from: PublicKey, text: String) {
        let Some(requester) = self.tasks.get(&task) else { return };
        if !requester.is_running(shard, &from) {
            return;
        }
        let Some(tx) = self.watchers.get(&task) else { return };
        if *self.streaming.entry((task, item)).or_insert(from) != from {
            return; // a redundant copy streams too; one voice per item
        }
        let _ = tx.send(TaskEvent::Text { item, text });
    }

    // ---- worker side ----------------------------------------------------

    fn run_job(&mut self, job: Job) {
        let Some(models) = self.models.clone() else { return };
        let tx = self.tx.clone();
        let started = Instant::now();
        let (conversations, params) = match job.work.clone() {
            Work::Embed { texts } => {
                let Some(served) = models.embedders.iter().find(|s| s.advert.weights == job.model) else {
                    return self.refuse(job);
                };
                let Ok(rx) = models.pool.embed(served.model.clone(), texts) else { return self.refuse(job) };
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
            _ => return self.refuse(job),
        };
        let Some(served) = models.generators.iter().find(|s| s.advert.weights == job.model) else {
            return self.refuse(job);
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

    /// Throughput counters per model, from a finished shard.
    fn count_inference(&self, job: &Job, output: &ShardOutput, compute_ms: u32) {
        let Some(models) = &self.models else { return };
        let Some(advert) = models.adverts().into_iter().find(|a| a.weights == job.model) else { return };
        self.metrics.shards_executed.inc();
        self.metrics.inference_items.with(&advert.id).add(output.items() as u64);
        if let ShardOutput::Generations(g) = output {
            self.metrics.inference_tokens.with(&advert.id).add(g.iter().map(|g| u64::from(g.tokens)).sum());
        }
        self.metrics.add_inference_seconds(&advert.id, f64::from(compute_ms) / 1000.0);
    }

    fn refuse(&mut self, job: Job) {
        if let Some(w) = self.worker.as_mut() {
            w.forget(job.task, job.shard);
        }
        self.send(job.requester, Market::Refuse { task: job.task, shard: job.shard });
    }

    fn job_done(&mut self, done: JobDone) {
        let JobDone { job, output, compute_ms, input_tokens } = done;
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, shard = job.shard, "shard failed");
                return self.refuse(job);
            }
        };
        self.count_inference(&job, &output, compute_ms);
        let output = match self.fault {
            Some(Fault::Perturb) => perturb(output),
            _ => output,
        };
        let Some(worker) = self.worker.as_mut() else { return };
        let Some(claim) = worker.on_done(now_ms(), &job, Done { output: &output, compute_ms, input_tokens }) else {
            return self.refuse(job);
        };
        match Signed::sign(&self.key, &claim) {
            Ok(signed) => {
                let claim = match self.fault {
                    Some(Fault::Forge) => {
                        let mut bad = *signed.signature();
                        bad.0[0] ^= 0x01;
                        Signed::from_parts(*signed.signer(), bad, signed.payload().to_vec())
                    }
                    _ => signed,
                };
                self.send(job.requester, Market::Result(ShardResult { claim, output }))
            }
            Err(e) => warn!(error = %e, "cannot sign a result"),
        }
    }
}

/// Whether `want` (from a user) names advert `m`: its id (any case, with or
/// without an organisation prefix like `sentence-transformers/`) or its
/// weights digest.
fn model_matches(want: &str, m: &mycel_protocol::ModelAdvert) -> bool {
    let name = want.rsplit('/').next().unwrap_or(want);
    want.eq_ignore_ascii_case(&m.id) || name.eq_ignore_ascii_case(&m.id) || want == m.weights.to_hex()
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

/// A wrong answer that looks right: every other component of each vector
/// negated (cosine far below any agreement threshold), answers reversed.
fn perturb(output: ShardOutput) -> ShardOutput {
    match output {
        ShardOutput::Embeddings { dimensions, mut values } => {
            for v in values.iter_mut().step_by(2) {
                *v = -*v;
            }
            ShardOutput::Embeddings { dimensions, values }
        }
        ShardOutput::Generations(mut answers) => {
            for a in &mut answers {
                a.text = a.text.chars().rev().collect();
            }
            ShardOutput::Generations(answers)
        }
        other => other,
    }
}
