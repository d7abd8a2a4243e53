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

use anyhow::{Context, Result, anyhow, bail};
use mycel_api::{SubmitRequest, Submitted, TaskView};
use mycel_market::requester::Phase;
use mycel_market::{
    Action, AwardOutcome, Candidate, Config, Event, Job, Requester, Served, Timer, Worker, WorkerConfig,
};
use mycel_net::{Handle, now_ms};
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{
    GenerateParams, Generation, Keypair, ModelKind, ModelSelector, PeerId, PublicKey, Receipt, ShardOutput,
    ShardResult, Signed, Split, TaskId, TaskSpec, Wire, Work,
};
use mycel_store::{Batch, SledStore, Store, Tree};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::local::LocalModels;

/// What the driver is asked to do.
#[derive(Debug)]
pub enum Command {
    Submit { request: SubmitRequest, reply: oneshot::Sender<Result<Submitted>> },
    Get { task: String, reply: oneshot::Sender<Result<TaskView>> },
    List { reply: oneshot::Sender<Result<Vec<mycel_api::TaskSummary>>> },
    ModelsReady(Arc<LocalModels>),
    Inbound { from: PeerId, message: Box<Market> },
    Timer { task: TaskId, timer: Timer },
    JobDone { job: Box<Job>, output: Result<ShardOutput, String>, compute_ms: u32 },
    SendFailed { to: PublicKey, message: Box<Market> },
}

/// Reputation of a peer never seen before.
const DEFAULT_REPUTATION: f64 = 0.8;

/// A finished task.
#[derive(Debug, Clone)]
enum Outcome {
    Done { output: ShardOutput, receipt: Box<Signed<Receipt>> },
    Failed(String),
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
    reputation: HashMap<PublicKey, f64>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("tasks", &self.tasks.len()).finish_non_exhaustive()
    }
}

/// Starts the driver; commands go in through the returned sender.
pub fn start(key: Keypair, net: Handle, store: Arc<SledStore>) -> mpsc::Sender<Command> {
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
                Ok(_) => {}
                Err(e) => warn!(task = %hex::encode(id), error = %e, "unreadable journal entry; skipped"),
            }
        }
    }

    /// Reputation per peer, as the journal has it.
    fn load_reputation(&mut self) {
        match self.store.scan_prefix(Tree::Reputation, &[]) {
            Ok(entries) => {
                for (key, value) in entries {
                    let (Ok(key), Ok(value)) =
                        (<[u8; 32]>::try_from(key.as_slice()), <[u8; 8]>::try_from(value.as_slice()))
                    else {
                        continue;
                    };
                    if let Ok(peer) = PublicKey::from_bytes(&key) {
                        self.reputation.insert(peer, f64::from_le_bytes(value).clamp(0.0, 1.0));
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read reputations"),
        }
    }

    /// Changes a peer's reputation and journals it: halved on a fault,
    /// +0.02 per valid result (slow to earn back), below
    /// `Config::min_reputation` no work.
    fn adjust_reputation(&mut self, peer: PublicKey, fault: bool) -> f64 {
        let r = self.reputation.entry(peer).or_insert(DEFAULT_REPUTATION);
        *r = if fault { *r * 0.5 } else { (*r + 0.02).min(1.0) };
        let value = *r;
        let mut batch = Batch::new();
        batch.put(Tree::Reputation, peer.to_bytes().to_vec(), value.to_le_bytes().to_vec());
        if let Err(e) = tokio::task::block_in_place(|| self.store.commit(&batch)) {
            warn!(error = %e, "cannot journal a reputation");
        }
        value
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
                    let mut list: Vec<mycel_api::TaskSummary> = self
                        .tasks
                        .keys()
                        .filter_map(|t| self.view(&hex::encode(t.0)).ok())
                        .map(|v| mycel_api::TaskSummary {
                            task: v.task,
                            state: v.state,
                            shards: v.shards,
                            shards_done: v.shards_done,
                        })
                        .collect();
                    list.sort_by(|a, b| a.task.cmp(&b.task));
                    let _ = reply.send(Ok(list));
                }
                Command::ModelsReady(models) => self.models_ready(models),
                Command::Inbound { from, message } => self.inbound(from, *message),
                Command::Timer { task, timer } => self.step(task, Event::Timer(timer)),
                Command::JobDone { job, output, compute_ms } => self.job_done(*job, output, compute_ms),
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
            "generate" => ModelKind::Generation,
            other => bail!("unknown task kind {other:?} (embed or generate)"),
        };
        if request.inputs.is_empty() {
            bail!("no inputs");
        }
        // Pin the model to one digest.
        let chosen = adverts
            .iter()
            .flat_map(|(_, a)| a.models.iter())
            .find(|m| {
                m.kind == kind && request.model.as_ref().is_none_or(|want| *want == m.id || *want == m.weights.to_hex())
            })
            .cloned()
            .with_context(|| match &request.model {
                Some(m) => format!("no peer serves a {} model {m:?}", request.kind),
                None => format!("no peer serves a {} model", request.kind),
            })?;
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
        let work = match kind {
            ModelKind::Embedding => Work::Embed { texts: request.inputs },
            _ => Work::Generate {
                prompts: request.inputs,
                params: GenerateParams {
                    max_tokens: request.max_tokens.unwrap_or(128),
                    temperature: request.temperature.unwrap_or(0.0),
                    seed: request.seed.unwrap_or(0),
                    ..GenerateParams::default()
                },
            },
        };
        let spec = TaskSpec {
            work,
            model: ModelSelector::Digest(chosen.weights),
            split: request.items_per_shard.map_or(Split::Auto, Split::ItemsPerShard),
            redundancy: request.redundancy.clamp(1, mycel_protocol::limits::MAX_REDUNDANCY),
            spot_check_permille: 0,
            aggregation: mycel_protocol::Aggregation::Concat,
            deadline_ms: 0,
            budget_micros: None,
        };
        spec.validate().map_err(|e| anyhow!("invalid task: {e}"))?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| anyhow!("no randomness for a task id: {e}"))?;
        let task = TaskId(id);
        let mut requester = Requester::new(task, &spec, chosen.weights, kind, candidates, Config::default())?;
        info!(task = %hex::encode(id), shards = requester.shard_count(), model = %chosen.id, "task submitted");
        let actions = requester.start(now_ms());
        self.tasks.insert(task, requester);
        self.apply(task, actions);
        Ok(Submitted { task: hex::encode(id) })
    }

    fn reputation_of(&self, peer: &PublicKey) -> f64 {
        self.reputation.get(peer).copied().unwrap_or(DEFAULT_REPUTATION)
    }

    fn step(&mut self, task: TaskId, event: Event) {
        let Some(requester) = self.tasks.get_mut(&task) else { return };
        let actions = requester.handle(now_ms(), event);
        self.apply(task, actions);
    }

    fn apply(&mut self, task: TaskId, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Persist => {
                    if let Some(r) = self.tasks.get(&task)
                        && let Err(e) = self.persist(task, r)
                    {
                        // Nothing that depends on this state may leave.
                        warn!(error = %e, "cannot journal the task; failing it");
                        self.tasks.remove(&task);
                        self.outcomes.insert(task, Outcome::Failed(format!("journal: {e}")));
                        return;
                    }
                }
                Action::SendCfp { to, cfp } => {
                    let Ok(signed) = Signed::sign(&self.key, &cfp) else { continue };
                    if let Some(r) = self.tasks.get_mut(&task) {
                        queue.extend(r.cfp_signed(cfp.round, signed.digest()));
                    }
                    for peer in to {
                        self.send(peer, Market::Cfp(signed.clone()));
                    }
                }
                Action::GossipCfp { .. } => {
                    // CFPs travel directly to the known candidates; the gossip
                    // fallback for swarms that don't know enough peers is not
                    // wired yet.
                    debug!("CFP gossip fallback not wired; direct CFPs only");
                }
                Action::SendAward { to, award } => {
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
                    let reputation = self.adjust_reputation(peer, true);
                    warn!(peer = %peer.to_peer_id(), ?reason, reputation, "peer penalised");
                }
                Action::Reward { peer } => {
                    self.adjust_reputation(peer, false);
                }
                Action::Complete { output, receipt } => match Signed::sign(&self.key, &receipt) {
                    Ok(signed) => {
                        info!(task = %hex::encode(task.0), shards = receipt.shards.len(), "task complete");
                        self.outcomes.insert(task, Outcome::Done { output, receipt: Box::new(signed) });
                    }
                    Err(e) => {
                        self.outcomes.insert(task, Outcome::Failed(format!("signing the receipt: {e}")));
                    }
                },
                Action::Fail { reason } => {
                    warn!(task = %hex::encode(task.0), %reason, "task failed");
                    self.outcomes.insert(task, Outcome::Failed(reason));
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

    fn view(&self, id: &str) -> Result<TaskView> {
        let bytes: [u8; 16] = hex::decode(id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{id:?} is not a task id (32 hex digits)"))?;
        let task = TaskId(bytes);
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
        };
        match self.outcomes.get(&task) {
            Some(Outcome::Done { output, receipt }) => {
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
            let delivered = matches!(
                net.request(to.to_peer_id(), Request::Market(Box::new(message.clone()))).await,
                Ok(Response::Accepted)
            );
            if !delivered {
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
                    self.send(sender, Market::Bid(signed_bid));
                }
            }
            Market::Bid(signed) => {
                if let Ok(bid) = signed.verify() {
                    self.step(bid.task, Event::Bid { from: sender, bid: Box::new(signed) });
                }
            }
            Market::Award(signed) => {
                let Ok(award) = signed.verify_from(&sender) else { return };
                let Some(worker) = self.worker.as_mut() else { return };
                match worker.on_award(now, sender, &award) {
                    AwardOutcome::Run(jobs) => {
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
                if let Ok(claim) = result.claim.verify() {
                    self.step(claim.task, Event::Result { from: sender, result: Box::new(result) });
                }
            }
            Market::Ack(signed) => {
                if let Ok(ack) = signed.verify_from(&sender) {
                    debug!(shard = ack.shard, verdict = ?ack.verdict, "result acknowledged");
                }
            }
            Market::Refuse { task, shard } => self.step(task, Event::Refused { from: sender, shard }),
            _ => {}
        }
    }

    // ---- worker side ----------------------------------------------------

    fn run_job(&mut self, job: Job) {
        let Some(models) = self.models.clone() else { return };
        let tx = self.tx.clone();
        let started = Instant::now();
        match job.work.clone() {
            Work::Embed { texts } => {
                let Some(served) = models.embedders.iter().find(|s| s.advert.weights == job.model) else {
                    return self.refuse(job);
                };
                match models.pool.embed(served.model.clone(), texts) {
                    Ok(rx) => {
                        tokio::spawn(async move {
                            let output = match rx.await {
                                Ok(Ok(vectors)) => {
                                    let dimensions = vectors.first().map_or(0, Vec::len) as u32;
                                    Ok(ShardOutput::Embeddings { dimensions, values: vectors.concat() })
                                }
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("worker pool stopped".to_string()),
                            };
                            let compute_ms = started.elapsed().as_millis() as u32;
                            let _ = tx.send(Command::JobDone { job: Box::new(job), output, compute_ms }).await;
                        });
                    }
                    Err(_) => self.refuse(job),
                }
            }
            Work::Generate { prompts, params } => {
                let Some(served) = models.generators.iter().find(|s| s.advert.weights == job.model) else {
                    return self.refuse(job);
                };
                let model = served.model.clone();
                tokio::spawn(async move {
                    let mut generations: Vec<Generation> = Vec::with_capacity(prompts.len());
                    let mut failure = None;
                    for prompt in prompts {
                        let ids = match model
                            .chat_prompt(&[mycel_models::ChatMessage::user(prompt)])
                            .and_then(|p| model.encode(&p))
                        {
                            Ok(ids) => ids,
                            Err(e) => {
                                failure = Some(e.to_string());
                                break;
                            }
                        };
                        let Ok((_stream, done)) = models.pool.generate(model.clone(), ids, params.clone()) else {
                            failure = Some("worker pool busy".into());
                            break;
                        };
                        match done.await {
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
                    let _ = tx.send(Command::JobDone { job: Box::new(job), output, compute_ms }).await;
                });
            }
            _ => self.refuse(job),
        }
    }

    fn refuse(&mut self, job: Job) {
        if let Some(w) = self.worker.as_mut() {
            w.forget(job.task, job.shard);
        }
        self.send(job.requester, Market::Refuse { task: job.task, shard: job.shard });
    }

    fn job_done(&mut self, job: Job, output: Result<ShardOutput, String>, compute_ms: u32) {
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, shard = job.shard, "shard failed");
                return self.refuse(job);
            }
        };
        let Some(worker) = self.worker.as_mut() else { return };
        let Some(claim) = worker.on_done(now_ms(), &job, &output, compute_ms) else { return self.refuse(job) };
        match Signed::sign(&self.key, &claim) {
            Ok(signed) => self.send(job.requester, Market::Result(ShardResult { claim: signed, output })),
            Err(e) => warn!(error = %e, "cannot sign a result"),
        }
    }
}
