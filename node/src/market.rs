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

use anyhow::Result;
use mycel_api::{SubmitRequest, Submitted, TaskEvent, TaskSummary, TaskView, Watch};
use mycel_market::node::{Action, Input, Metric, Write};
use mycel_market::{Node, NodeConfig};
use mycel_metrics::Metrics;
use mycel_net::{Handle, now_ms};
use mycel_protocol::rpc::{Market, Request, Response};
use mycel_protocol::{Advert, Keypair, PeerId, PublicKey, TaskId};
use mycel_store::{Batch, SledStore, Store, Tree};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::local::LocalModels;

mod api;
mod execute;
mod flood;

pub use execute::JobDone;

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
    /// A message the peer did not take, on its `attempt`-th try (0: the first).
    SendFailed {
        to: PublicKey,
        message: Box<Market>,
        attempt: u32,
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
    /// Lies like perturb, on about one shard in four.
    Sometimes,
    /// Takes work and never answers.
    Silent,
    /// Answers truthfully, ten times later than it should.
    Slow,
    /// Floods its peers with fake CFPs (gossip) and bids (requests).
    Flood,
}

impl Fault {
    /// The market machine's part of the fault, if it has one (slow and
    /// flood are the interpreter's alone).
    fn in_machine(self) -> Option<mycel_market::node::Fault> {
        use mycel_market::node::Fault as M;
        match self {
            Fault::Perturb => Some(M::Perturb),
            Fault::Forge => Some(M::Forge),
            Fault::Sometimes => Some(M::Sometimes),
            Fault::Silent => Some(M::Silent),
            Fault::Slow | Fault::Flood => None,
        }
    }
}

/// Sends a market message once; whether the peer took it. Retries are the
/// market's decision ([`Input::Undelivered`]).
async fn deliver(net: &Handle, to: PublicKey, message: &Market) -> bool {
    matches!(net.request(to.to_peer_id(), Request::Market(Box::new(message.clone()))).await, Ok(Response::Accepted))
}

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
    outboxes: BTreeMap<PublicKey, mpsc::Sender<(Market, u32)>>,
    metrics: Arc<Metrics>,
    /// `--fault slow`: each finished job is held back nine times its
    /// compute time before the market hears of it.
    slow: bool,
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
    /// Tasks running at once.
    pub max_running: usize,
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
        .with_max_running(settings.max_running)
        .with_advert_ttl_ms(settings.advert_ttl.as_millis() as u64)
        .with_fault(settings.fault.and_then(Fault::in_machine));
    if settings.fault == Some(Fault::Flood) {
        flood::spawn(Keypair::from_secret_bytes(&key.secret_bytes()), net.clone());
    }
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
        slow: settings.fault == Some(Fault::Slow),
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
            Command::SendFailed { to, message, attempt } => {
                self.input(Input::Undelivered { to, message: *message, attempt })
            }
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
                Action::Send { to, message } => self.send(to, message, 0),
                Action::Resend { to, message, attempt } => self.send(to, message, attempt),
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

    // ---- both sides: messages ------------------------------------------

    /// Queues a message on its peer's outbox. A full outbox (the peer has
    /// not taken the last [`OUTBOX`] messages) is a failed delivery, told
    /// to the market at once rather than buffered without bound.
    fn send(&mut self, to: PublicKey, message: Market, attempt: u32) {
        if self.outboxes.get(&to).is_none_or(mpsc::Sender::is_closed) {
            let outbox = self.open_outbox(to);
            self.outboxes.insert(to, outbox);
        }
        let Some(outbox) = self.outboxes.get(&to) else { return };
        if let Err(e) = outbox.try_send((message, attempt)) {
            debug!(peer = %to.to_peer_id(), "outbox full; message not sent");
            let (message, attempt) = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            self.input(Input::Undelivered { to, message, attempt });
        }
    }

    /// One task per peer takes its messages in order: over the network
    /// (once each; a failure goes back to the market), or looped back to
    /// this node's own market.
    fn open_outbox(&self, to: PublicKey) -> mpsc::Sender<(Market, u32)> {
        let (outbox, mut queue) = mpsc::channel::<(Market, u32)>(OUTBOX);
        let (tx, net, me) = (self.tx.clone(), self.net.clone(), self.me);
        tokio::spawn(async move {
            while let Some((message, attempt)) = queue.recv().await {
                if to == me {
                    let from = me.to_peer_id();
                    if tx.send(Command::Inbound { from, message: Box::new(message) }).await.is_err() {
                        return;
                    }
                } else if !deliver(&net, to, &message).await {
                    debug!(peer = %to.to_peer_id(), attempt, "market message not delivered");
                    let _ = tx.send(Command::SendFailed { to, message: Box::new(message), attempt }).await;
                }
            }
        });
        outbox
    }
}
