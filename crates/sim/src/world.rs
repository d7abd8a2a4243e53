//! The event loop: one queue of timed events, one seeded generator, and
//! the real [`mycel_market::Node`] of every simulated node. Nothing here
//! reads a clock or a thread: the seed decides every latency, loss, crash
//! and lie, so a run replays event for event.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use mycel_market::node::{Action, Entropy, Fault, Input, Metric, Outcome, Submission, Write};
use mycel_market::{Job, Node, NodeConfig};
use mycel_protocol::rpc::Market;
use mycel_protocol::{
    Advert, Digest, Hardware, Keypair, Load, ModelAdvert, ModelKind, Price, PublicKey, Quantization, ShardOutput,
    ShardResult, Split, TaskId, Throughput, Wire, Work,
};

use crate::check::Checker;
use crate::report::Report;
use crate::rng::Rng;
use crate::scenario::{Behaviour, Scenario};

/// Dimensions of the simulated embedding model.
const DIM: usize = 8;
/// Virtual time starts here (ms since the Unix epoch), so timestamps look
/// like real ones.
const EPOCH_MS: u64 = 1_700_000_000_000;
/// Adverts go out this often (as `mycel node` does).
const ADVERT_EVERY_MS: u64 = 10_000;
/// Submissions start after the first adverts have spread.
const FIRST_SUBMIT_MS: u64 = 1_000;
/// A slow node takes this many times longer than it advertises.
const SLOW_FACTOR: u64 = 20;
/// Results a replayer remembers to copy from.
const OVERHEARD: usize = 256;

/// The simulated embedding model: a fixed unit vector per text.
pub fn embed(text: &str) -> [f32; DIM] {
    let digest = Digest::of(text.as_bytes());
    let mut v = [0f32; DIM];
    for (i, x) in v.iter_mut().enumerate() {
        *x = f32::from(digest.0[i]) - 127.5;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.map(|x| x / norm)
}

fn texts(task: usize, items: usize) -> Vec<String> {
    (0..items).map(|i| format!("task {task} text {i}")).collect()
}

/// The honest output of `texts`.
pub fn honest(texts: &[String]) -> ShardOutput {
    ShardOutput::Embeddings { dimensions: DIM as u32, values: texts.iter().flat_map(|t| embed(t)).collect() }
}

/// A wrong output: each liar its own (`salt`), every sybil the same.
fn lie(output: ShardOutput, salt: u64) -> ShardOutput {
    match output {
        ShardOutput::Embeddings { dimensions, mut values } => {
            let at = (salt % DIM as u64) as usize;
            for item in values.chunks_mut(DIM) {
                item[at] += 0.5 + (salt % 7) as f32 * 0.1;
            }
            ShardOutput::Embeddings { dimensions, values }
        }
        other => other,
    }
}

#[derive(Debug)]
enum Event {
    /// Task number `n` is handed to its requester.
    Submit(usize),
    /// A message arrives.
    Deliver { from: usize, to: usize, message: Market },
    /// The sender learns a request failed (no reply in time).
    Undelivered { node: usize, epoch: u32, to: usize, message: Market, attempt: u32 },
    /// The node's model pool had no room for a job: it fails at once.
    PoolFull { node: usize, epoch: u32, job: Job },
    /// A job finished on a node's model.
    JobDone { node: usize, epoch: u32, job: Job, output: ShardOutput, compute_ms: u32 },
    /// A node's timer is due.
    Tick { node: usize, epoch: u32 },
    /// Every node advertises to those who hear it.
    Adverts,
    /// A random node crashes.
    Crash,
    /// A crashed node comes back from its journal.
    Restart(usize),
    /// Partition number `n` starts.
    Split(usize),
    /// Partition number `n` heals.
    Heal(usize),
}

impl Event {
    fn tag(&self) -> (u8, usize) {
        match self {
            Event::Submit(n) => (0, *n),
            Event::Deliver { to, .. } => (1, *to),
            Event::Undelivered { node, .. } => (2, *node),
            Event::JobDone { node, .. } => (3, *node),
            Event::PoolFull { node, .. } => (10, *node),
            Event::Tick { node, .. } => (4, *node),
            Event::Adverts => (5, 0),
            Event::Crash => (6, 0),
            Event::Restart(n) => (7, *n),
            Event::Split(n) => (8, *n),
            Event::Heal(n) => (9, *n),
        }
    }
}

/// An event and when it happens; the sequence number keeps equal times in
/// the order they were scheduled.
#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One simulated node: its market machine (none while it is down), what
/// it journaled, and its model pool.
#[derive(Debug)]
pub(crate) struct SimNode {
    secret: [u8; 32],
    pub(crate) key: PublicKey,
    pub(crate) behaviour: Behaviour,
    pub(crate) machine: Option<Node>,
    /// Bumped at each crash: events for an earlier life are dropped.
    epoch: u32,
    speed: f32,
    load: Load,
    /// The journal as a store would hold it: task tree and reputations.
    tasks: BTreeMap<Vec<u8>, Vec<u8>>,
    reputations: BTreeMap<Vec<u8>, Vec<u8>>,
    /// When its earliest timer is scheduled.
    tick_at: Option<u64>,
    /// Jobs running now, and waiting for a free replica.
    running: u32,
    waiting: VecDeque<Job>,
    /// Peers whose adverts it hears (requesters only).
    view: Vec<usize>,
    /// Which side of a partition it is on (0: the main swarm).
    side: usize,
    /// When it last came back from a crash.
    pub(crate) restarted_ms: u64,
}

/// A submitted task, as the simulator tracks it.
#[derive(Debug)]
pub(crate) struct TaskRecord {
    pub(crate) requester: usize,
    pub(crate) id: Option<TaskId>,
    pub(crate) submitted_ms: u64,
    pub(crate) ended_ms: Option<u64>,
}

/// Counts the report shows.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Messages sent (sends, resends, gossip copies).
    pub messages: u64,
    /// Requests lost (before or after the receiver saw them).
    pub lost: u64,
    /// Requests delivered twice.
    pub duplicated: u64,
    /// Requests that failed because the receiver was down or cut off.
    pub unreachable: u64,
    /// Re-auctions.
    pub reauctions: u64,
    /// Crashes, and how many of them hit a requester.
    pub crashes: u64,
    pub requester_crashes: u64,
    /// Shards run (jobs started) and results replayed from elsewhere.
    pub jobs: u64,
    /// Results replaced by a copy from elsewhere.
    pub replays: u64,
    /// Shards given back by workers ("busy after all").
    pub given_back: u64,
}

/// The simulation of one scenario from one seed.
#[derive(Debug)]
pub struct Sim {
    pub(crate) scenario: Scenario,
    seed: u64,
    rng: Rng,
    pub(crate) now: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    pub(crate) nodes: Vec<SimNode>,
    index: BTreeMap<PublicKey, usize>,
    pub(crate) tasks: Vec<TaskRecord>,
    pub(crate) task_index: BTreeMap<TaskId, usize>,
    pub(crate) check: Checker,
    pub(crate) stats: Stats,
    /// Folded over every event: equal for equal runs.
    trace: u64,
    /// Results seen on the wire, for replayers to copy.
    overheard: VecDeque<ShardResult>,
    /// Which nodes each partition cut off.
    partitions: Vec<Vec<usize>>,
    /// Tasks not yet ended.
    open: usize,
    last_submit_ms: u64,
    /// Every perform call: acks of one decision share it.
    step: u64,
}

impl Sim {
    /// A swarm for `scenario`, everything drawn from `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = scenario.nodes;
        // Who misbehaves how: requesters are the first nodes, honest; the
        // rest are shuffled so misbehaviour lands anywhere.
        let mut behaviour = vec![Behaviour::Honest; n];
        let mut workers: Vec<usize> = (scenario.requesters..n).collect();
        for i in (1..workers.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            workers.swap(i, j);
        }
        let mut next = workers.into_iter();
        for (b, count) in scenario.behaviours() {
            for node in next.by_ref().take(count) {
                behaviour[node] = b;
            }
        }
        let mut nodes = Vec::with_capacity(n);
        let mut index = BTreeMap::new();
        for (i, b) in behaviour.into_iter().enumerate() {
            let secret: [u8; 32] = rng.bytes();
            let key = Keypair::from_secret_bytes(&secret).public();
            index.insert(key, i);
            let [low, high] = scenario.speed;
            let speed = low + (high - low) * rng.unit() as f32;
            nodes.push(SimNode {
                secret,
                key,
                behaviour: b,
                machine: None,
                epoch: 0,
                speed,
                load: Load::default(),
                tasks: BTreeMap::new(),
                reputations: BTreeMap::new(),
                tick_at: None,
                running: 0,
                waiting: VecDeque::new(),
                view: Vec::new(),
                side: 0,
                restarted_ms: 0,
            });
        }
        for (r, requester) in nodes.iter_mut().enumerate().take(scenario.requesters) {
            // A random sample of the swarm, without repeats.
            let want = scenario.view.min(n - 1);
            let mut seen = std::collections::BTreeSet::new();
            while seen.len() < want {
                let p = rng.below(n as u64) as usize;
                if p != r {
                    seen.insert(p);
                }
            }
            requester.view = seen.into_iter().collect();
        }
        let tasks = (0..scenario.tasks)
            .map(|t| TaskRecord { requester: t % scenario.requesters, id: None, submitted_ms: 0, ended_ms: None })
            .collect();
        let mut sim = Sim {
            open: scenario.tasks,
            scenario,
            seed,
            rng,
            now: EPOCH_MS,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes,
            index,
            tasks,
            task_index: BTreeMap::new(),
            check: Checker::default().starting_at(EPOCH_MS),
            stats: Stats::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            overheard: VecDeque::new(),
            partitions: Vec::new(),
            last_submit_ms: EPOCH_MS,
            step: 0,
        };
        for node in 0..n {
            sim.boot(node);
        }
        sim.schedule(0, Event::Adverts);
        for t in 0..sim.scenario.tasks {
            let at = FIRST_SUBMIT_MS + sim.rng.below(sim.scenario.submit_over_ms.max(1));
            sim.last_submit_ms = sim.last_submit_ms.max(EPOCH_MS + at);
            sim.schedule(at, Event::Submit(t));
        }
        if sim.scenario.crashes.every_ms > 0 {
            let after = sim.rng.exponential(sim.scenario.crashes.every_ms as f64) as u64;
            sim.schedule(after, Event::Crash);
        }
        for (i, p) in sim.scenario.partitions.clone().iter().enumerate() {
            sim.partitions.push(Vec::new());
            sim.schedule(p.at_ms, Event::Split(i));
            sim.schedule(p.at_ms + p.for_ms, Event::Heal(i));
        }
        sim
    }

    /// Runs to the end: every task ended, or time ran out. Then checks
    /// what only the end can show, and reports.
    pub fn run(mut self) -> Report {
        let wall = std::time::Instant::now();
        let deadline = mycel_market::Config::default().default_deadline_ms;
        let give_up = self.last_submit_ms + deadline + 10 * 60_000 + self.scenario.crashes.down_ms;
        while self.open > 0 {
            let Some(Reverse(next)) = self.queue.pop() else { break };
            if next.at > give_up {
                break;
            }
            self.now = self.now.max(next.at);
            self.stats.events += 1;
            let (kind, who) = next.event.tag();
            self.fold(&[next.at, u64::from(kind), who as u64]);
            self.event(next.event);
        }
        self.check.finish(&self.nodes, &self.tasks, self.now);
        Report::new(&self, wall.elapsed())
    }

    /// The seed this run was drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub(crate) fn trace(&self) -> u64 {
        self.trace
    }

    fn fold(&mut self, words: &[u64]) {
        for w in words {
            for b in w.to_le_bytes() {
                self.trace ^= u64::from(b);
                self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at: self.now + after_ms, seq: self.seq, event }));
    }

    fn latency(&mut self) -> u64 {
        let net = &self.scenario.network;
        let extra = net.mean_extra_latency_ms as f64;
        net.min_latency_ms + self.rng.exponential(extra).min(extra * 20.0) as u64
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Submit(n) => self.submit(n),
            Event::Deliver { from, to, message } => {
                if self.reachable(from, to) {
                    let from = self.nodes[from].key;
                    self.input(to, Input::Message { from, message });
                }
            }
            Event::Undelivered { node, epoch, to, message, attempt } => {
                if self.nodes[node].epoch == epoch {
                    let to = self.nodes[to].key;
                    self.input(node, Input::Undelivered { to, message, attempt });
                }
            }
            Event::JobDone { node, epoch, job, output, compute_ms } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                self.nodes[node].running -= 1;
                self.start_jobs(node);
                self.input(node, Input::JobDone { job, output: Ok(output), compute_ms, input_tokens: 0 });
            }
            Event::PoolFull { node, epoch, job } => {
                if self.nodes[node].epoch == epoch {
                    let output = Err("the worker pool is busy".to_string());
                    self.input(node, Input::JobDone { job, output, compute_ms: 0, input_tokens: 0 });
                }
            }
            Event::Tick { node, epoch } => {
                let n = &mut self.nodes[node];
                if n.epoch != epoch || n.tick_at != Some(self.now) {
                    return; // superseded by an earlier timer
                }
                n.tick_at = None;
                self.input(node, Input::Tick);
            }
            Event::Adverts => {
                self.adverts();
                if self.open > 0 {
                    self.schedule(ADVERT_EVERY_MS, Event::Adverts);
                }
            }
            Event::Crash => {
                self.crash();
                if self.open > 0 {
                    let after = self.rng.exponential(self.scenario.crashes.every_ms as f64) as u64;
                    self.schedule(after.max(1), Event::Crash);
                }
            }
            Event::Restart(node) => self.restart(node),
            Event::Split(i) => {
                let share = self.scenario.partitions[i].share;
                let count = ((share * self.nodes.len() as f64).round() as usize).clamp(1, self.nodes.len() - 1);
                let mut cut = Vec::new();
                while cut.len() < count {
                    let n = self.rng.below(self.nodes.len() as u64) as usize;
                    if self.nodes[n].side == 0 {
                        self.nodes[n].side = i + 1;
                        cut.push(n);
                    }
                }
                self.partitions[i] = cut;
            }
            Event::Heal(i) => {
                for n in std::mem::take(&mut self.partitions[i]) {
                    self.nodes[n].side = 0;
                }
            }
        }
    }

    fn up(&self, node: usize) -> bool {
        self.nodes[node].machine.is_some()
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        self.up(to) && self.nodes[from].side == self.nodes[to].side
    }

    /// A node starts (first boot or restart): models loaded, then what its
    /// journal holds, then the adverts it hears.
    fn boot(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        // The machine's own fault injection (what `mycel node --fault`
        // uses) where it has one; the rest is the simulator's doing.
        let fault = match n.behaviour {
            Behaviour::Forger => Some(Fault::Forge),
            Behaviour::Sneaky => Some(Fault::Sometimes),
            Behaviour::Silent => Some(Fault::Silent),
            _ => None,
        };
        let config = NodeConfig::default().with_fault(fault);
        n.machine = Some(Node::new(Keypair::from_secret_bytes(&n.secret), config));
        let models = vec![model(n.speed)];
        let capacity = self.scenario.capacity;
        self.input(node, Input::ModelsReady { models, capacity });
        for peer in self.nodes[node].view.clone() {
            self.advert_to(peer, node);
        }
        let n = &mut self.nodes[node];
        let tasks = n.tasks.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let reputations = n.reputations.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let Some(machine) = n.machine.as_mut() else { return };
        let (actions, skipped) = machine.restore(self.now, tasks, reputations);
        if !skipped.is_empty() {
            self.check.violation(self.now, format!("node {node} could not read back its journal: {skipped:?}"));
        }
        self.perform(node, actions);
    }

    fn advert_to(&mut self, peer: usize, node: usize) {
        if !self.reachable(peer, node) || !self.up(peer) {
            return;
        }
        let p = &self.nodes[peer];
        let advert = Advert {
            seq: self.now,
            timestamp_ms: self.now,
            software: "mycel-sim".into(),
            models: vec![model(p.speed)],
            hardware: Hardware::default(),
            load: p.load,
            price: Price::default(),
            listen_addrs: Vec::new(),
        };
        let peer = p.key;
        self.input(node, Input::Advert { peer, advert });
    }

    fn adverts(&mut self) {
        for r in 0..self.scenario.requesters {
            if !self.up(r) {
                continue;
            }
            for peer in self.nodes[r].view.clone() {
                self.advert_to(peer, r);
            }
        }
    }

    fn crash(&mut self) {
        let first = if self.scenario.crashes.requesters { 0 } else { self.scenario.requesters };
        if first >= self.nodes.len() {
            return;
        }
        let node = first + self.rng.below((self.nodes.len() - first) as u64) as usize;
        let n = &mut self.nodes[node];
        if n.machine.is_none() {
            return;
        }
        // kill -9: the machine and its queues are gone; the journal stays.
        n.machine = None;
        n.epoch += 1;
        n.tick_at = None;
        n.running = 0;
        n.waiting.clear();
        n.load = Load::default();
        self.stats.crashes += 1;
        self.stats.requester_crashes += u64::from(node < self.scenario.requesters);
        let down = self.scenario.crashes.down_ms;
        self.schedule(down, Event::Restart(node));
    }

    fn restart(&mut self, node: usize) {
        self.nodes[node].restarted_ms = self.now;
        self.boot(node);
    }

    fn submit(&mut self, t: usize) {
        let node = self.tasks[t].requester;
        self.tasks[t].submitted_ms = self.now;
        if !self.up(node) {
            // The user retries once their node is back.
            self.schedule(1_000, Event::Submit(t));
            return;
        }
        let items = (self.scenario.shards_per_task * self.scenario.items_per_shard) as usize;
        let submission = Submission {
            label: "embed".into(),
            kind: ModelKind::Embedding,
            model: None,
            work: Work::Embed { texts: texts(t, items) },
            split: Split::ItemsPerShard(self.scenario.items_per_shard),
            redundancy: self.scenario.redundancy,
            spot_check_permille: self.scenario.spot_check_permille,
            then: Vec::new(),
        };
        let entropy = Entropy::from_bytes(self.rng.bytes());
        let Some(machine) = self.nodes[node].machine.as_mut() else { return };
        match machine.submit(self.now, entropy, submission) {
            Ok((id, actions)) => {
                self.tasks[t].id = Some(id);
                self.task_index.insert(id, t);
                self.perform(node, actions);
            }
            Err(e) => {
                // Refused at the door is an ending with a reason.
                self.tasks[t].ended_ms = Some(self.now);
                self.open -= 1;
                self.check.refused(t, e.to_string());
            }
        }
    }

    /// Hands `input` to a node's machine and carries out what it says.
    fn input(&mut self, node: usize, input: Input) {
        let Some(machine) = self.nodes[node].machine.as_mut() else { return };
        let actions = machine.handle(self.now, input);
        self.perform(node, actions);
    }

    fn perform(&mut self, node: usize, actions: Vec<Action>) {
        self.step += 1;
        // A task's ending is checked once every action of the step is seen:
        // the machine's state is already the step's last.
        let mut progressed = Vec::new();
        for action in actions {
            match action {
                Action::Journal(writes) => self.journal(node, writes),
                Action::Send { to, message } => {
                    self.stats.given_back += u64::from(matches!(message, Market::Refuse { .. }));
                    let message = self.tamper(node, message);
                    if let Some(&peer) = self.index.get(&to) {
                        self.check.sent(self.now, self.step, node, peer, &message, &self.nodes);
                    }
                    self.send(node, to, message, 0);
                }
                Action::Resend { to, message, attempt } => self.send(node, to, message, attempt),
                Action::Gossip(cfp) => {
                    for peer in self.nodes[node].view.clone() {
                        if self.reachable(node, peer) {
                            let after = self.latency();
                            self.stats.messages += 1;
                            self.schedule(
                                after,
                                Event::Deliver { from: node, to: peer, message: Market::Cfp(cfp.clone()) },
                            );
                        }
                    }
                }
                Action::Execute(job) => {
                    let refuses = self.nodes[node].behaviour == Behaviour::Refuser;
                    if refuses || self.nodes[node].waiting.len() >= self.scenario.pool_queue {
                        // As the node's pool does: a bounded queue, and a
                        // job it cannot take fails (the shard goes back).
                        let epoch = self.nodes[node].epoch;
                        self.schedule(0, Event::PoolFull { node, epoch, job });
                    } else {
                        self.nodes[node].waiting.push_back(job);
                        self.start_jobs(node);
                    }
                }
                Action::Load(load) => self.nodes[node].load = load,
                Action::Progress(task) => progressed.push(task),
                Action::Metric(Metric::Reauction) => self.stats.reauctions += 1,
                Action::Text { .. } | Action::Metric(_) => {}
            }
        }
        for task in progressed {
            self.progress(node, task);
        }
        self.reschedule_tick(node);
    }

    fn journal(&mut self, node: usize, writes: Vec<Write>) {
        let n = &mut self.nodes[node];
        for write in writes {
            match write {
                Write::Task { key, value } => {
                    n.tasks.insert(key, value);
                }
                Write::Forget { key } => {
                    n.tasks.remove(&key);
                }
                Write::Reputation(peer, value) => {
                    n.reputations.insert(peer.to_bytes().to_vec(), value);
                }
            }
        }
    }

    fn reschedule_tick(&mut self, node: usize) {
        let n = &self.nodes[node];
        let Some(next) = n.machine.as_ref().and_then(Node::next_timer_ms) else { return };
        if n.tick_at.is_some_and(|at| at <= next) {
            return;
        }
        let (epoch, after) = (n.epoch, next.saturating_sub(self.now));
        self.nodes[node].tick_at = Some(self.now + after);
        self.schedule(after, Event::Tick { node, epoch });
    }

    /// One request over the simulated network.
    fn send(&mut self, from: usize, to: PublicKey, message: Market, attempt: u32) {
        let Some(&to) = self.index.get(&to) else { return };
        self.stats.messages += 1;
        let epoch = self.nodes[from].epoch;
        let timeout = self.scenario.network.request_timeout_ms;
        if from == to {
            // Looped back inside the node: no network.
            self.schedule(0, Event::Deliver { from, to, message });
            return;
        }
        if !self.reachable(from, to) {
            self.stats.unreachable += 1;
            let after = if self.up(to) { timeout } else { 2 * self.scenario.network.min_latency_ms };
            self.schedule(after, Event::Undelivered { node: from, epoch, to, message, attempt });
            return;
        }
        let net = self.scenario.network.clone();
        let latency = self.latency();
        if self.rng.permille(net.loss_permille) {
            self.stats.lost += 1;
            if self.rng.permille(500) {
                // Only the reply was lost: it arrived, and the sender will
                // think it did not.
                self.schedule(latency, Event::Deliver { from, to, message: message.clone() });
            }
            self.schedule(timeout, Event::Undelivered { node: from, epoch, to, message, attempt });
            return;
        }
        if self.rng.permille(net.duplicate_permille) {
            self.stats.duplicated += 1;
            let again = self.latency();
            self.schedule(again, Event::Deliver { from, to, message: message.clone() });
        }
        self.schedule(latency, Event::Deliver { from, to, message });
    }

    /// What a misbehaving node does to its own results before they leave.
    fn tamper(&mut self, node: usize, message: Market) -> Market {
        let Market::Result(result) = message else { return message };
        if self.nodes[node].behaviour != Behaviour::Replayer {
            if self.nodes[node].behaviour == Behaviour::Honest {
                if self.overheard.len() == OVERHEARD {
                    self.overheard.pop_front();
                }
                self.overheard.push_back(result.clone());
            }
            return Market::Result(result);
        }
        // A copy of someone's signed result: for the same shard if one was
        // overheard (a lazy worker copying a colleague), else any.
        let claim = mycel_protocol::ResultClaim::decode(result.claim.payload()).ok();
        let same = self.overheard.iter().find(|r| {
            let c = mycel_protocol::ResultClaim::decode(r.claim.payload()).ok();
            matches!((&c, &claim), (Some(a), Some(b)) if a.task == b.task && a.shard == b.shard)
        });
        let copy = match same {
            Some(r) => Some(r.clone()),
            None if !self.overheard.is_empty() => {
                let at = self.rng.below(self.overheard.len() as u64) as usize;
                self.overheard.get(at).cloned()
            }
            None => None,
        };
        match copy {
            Some(copy) => {
                self.stats.replays += 1;
                Market::Result(copy)
            }
            None => Market::Result(result),
        }
    }

    /// Starts waiting jobs on free replicas.
    fn start_jobs(&mut self, node: usize) {
        while self.nodes[node].running < self.scenario.capacity {
            let Some(job) = self.nodes[node].waiting.pop_front() else { return };
            let n = &self.nodes[node];
            let Work::Embed { texts } = &job.work else { continue };
            let mut ms = (texts.len() as f64 * 1000.0 / f64::from(n.speed)).ceil() as u64;
            if n.behaviour == Behaviour::Slow {
                ms *= SLOW_FACTOR;
            }
            let mut output = honest(texts);
            match n.behaviour {
                Behaviour::Liar => output = lie(output, node as u64 + 1),
                Behaviour::Sybil => output = lie(output, 0),
                _ => {}
            }
            let epoch = n.epoch;
            self.nodes[node].running += 1;
            self.stats.jobs += 1;
            let compute_ms = u32::try_from(ms).unwrap_or(u32::MAX);
            self.schedule(ms, Event::JobDone { node, epoch, job, output, compute_ms });
        }
    }

    /// A task's state changed: if it just ended, check how.
    fn progress(&mut self, node: usize, task: TaskId) {
        let Some(&t) = self.task_index.get(&task) else { return };
        if self.tasks[t].ended_ms.is_some() || self.tasks[t].requester != node {
            return;
        }
        let Some(outcome) = self.nodes[node].machine.as_ref().and_then(|m| m.task(&task)?.outcome.clone()) else {
            return;
        };
        self.tasks[t].ended_ms = Some(self.now);
        self.open -= 1;
        let items = (self.scenario.shards_per_task * self.scenario.items_per_shard) as usize;
        let expected = honest(&texts(t, items));
        match outcome {
            Outcome::Done { output, receipt, .. } => {
                self.check.done(self.now, task, &output, &receipt, &expected, &self.nodes, &self.index)
            }
            Outcome::Failed(reason) => self.check.failed(t, reason),
        }
        let deadline = mycel_market::Config::default().default_deadline_ms;
        self.check.ended_in_time(deadline, &self.tasks[t], &self.nodes[node]);
    }
}

/// The one model every simulated node serves.
fn model(speed: f32) -> ModelAdvert {
    ModelAdvert {
        id: "sim-embedder".into(),
        kind: ModelKind::Embedding,
        weights: Digest::of(b"sim-embedder"),
        dimensions: DIM as u32,
        context: 256,
        quantization: Quantization::F32,
        throughput: Throughput { embeddings_per_s: speed, ..Throughput::default() },
        profile: Default::default(),
        tools: false,
    }
}
