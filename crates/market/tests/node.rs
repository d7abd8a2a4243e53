//! The node-level market machine under virtual time: a swarm of
//! [`mycel_market::Node`]s wired by a simulated network, each an honest,
//! silent or lying worker, with deliveries, losses, duplicates and timers
//! in an order a seed decides.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use mycel_market::node::{Action, Entropy, Fault, Input, Outcome, Stage, StagedOutcome, Submission, Write};
use mycel_market::{Job, Node, NodeConfig};
use mycel_protocol::rpc::Market;
use mycel_protocol::{
    Advert, Digest, FinishReason, GenerateParams, Generation, Hardware, Keypair, Load, ModelAdvert, ModelKind, Price,
    PublicKey, Quantization, ShardOutput, Split, TaskId, Throughput, Verdict, Work,
};
use proptest::prelude::*;

const DIM: usize = 4;

fn weights(name: &str) -> Digest {
    Digest::of(name.as_bytes())
}

fn generator(name: &str) -> ModelAdvert {
    ModelAdvert {
        kind: ModelKind::Generation,
        throughput: Throughput { decode_tokens_per_s: 50.0, ..Throughput::default() },
        ..model(name, 0.0)
    }
}

fn model(name: &str, per_s: f32) -> ModelAdvert {
    ModelAdvert {
        id: name.into(),
        kind: ModelKind::Embedding,
        weights: weights(name),
        dimensions: DIM as u32,
        context: 256,
        quantization: Quantization::F32,
        throughput: Throughput { embeddings_per_s: per_s, ..Throughput::default() },
        profile: Default::default(),
        tools: false,
    }
}

/// The "model": a deterministic vector per text.
fn embed(text: &str) -> Vec<f32> {
    let n = text.len() as f32;
    let v = [1.0, n, (n * 0.37).sin(), 0.5];
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Takes work and never answers.
    Silent,
    /// Signs wrong vectors as its own (the machine's own fault injection).
    Liar,
}

/// How the simulated network treats a message.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Deliver,
    Lose,
    Duplicate,
}

struct Sim {
    nodes: Vec<Node>,
    keys: Vec<PublicKey>,
    behaviour: Vec<Behaviour>,
    models: Vec<Vec<ModelAdvert>>,
    now: u64,
    /// Messages in flight: (from, to, message).
    wire: VecDeque<(usize, usize, Market, u32)>,
    /// Awards to these nodes are refused by the network (the sender hears).
    refuse_awards_to: BTreeSet<usize>,
    /// Whether gossiped CFPs reach anyone.
    gossip: bool,
    /// Resends, and awards sent the first time, per target node.
    resends: Vec<usize>,
    awards: Vec<usize>,
    /// Jobs running: (node, job), answered in order.
    jobs: VecDeque<(usize, Job)>,
    /// Every journal write, per node, in order.
    journal: Vec<Vec<Write>>,
    /// Accepted results seen by workers, per (task, shard): the
    /// "never accepted twice" check.
    accepted: BTreeMap<(TaskId, u32), usize>,
    /// Loads advertised, per node.
    loads: Vec<Vec<Load>>,
    /// Shards given to each node to run.
    given: Vec<usize>,
    rng: u64,
    lose_permille: u64,
    duplicate_permille: u64,
}

impl Sim {
    fn new(behaviour: &[Behaviour]) -> Self {
        Self::with_config(behaviour, NodeConfig::default())
    }

    fn with_config(behaviour: &[Behaviour], config: NodeConfig) -> Self {
        let n = behaviour.len();
        let mut sim = Sim {
            nodes: Vec::new(),
            keys: Vec::new(),
            behaviour: behaviour.to_vec(),
            models: vec![vec![model("minilm", 100.0), generator("smol")]; n],
            now: 1_000_000,
            wire: VecDeque::new(),
            refuse_awards_to: BTreeSet::new(),
            gossip: true,
            resends: vec![0; n],
            awards: vec![0; n],
            jobs: VecDeque::new(),
            journal: vec![Vec::new(); n],
            accepted: BTreeMap::new(),
            loads: vec![Vec::new(); n],
            given: vec![0; n],
            rng: 7,
            lose_permille: 0,
            duplicate_permille: 0,
        };
        for (i, b) in behaviour.iter().enumerate() {
            let key = Keypair::from_secret_bytes(&[i as u8 + 1; 32]);
            sim.keys.push(key.public());
            let fault = (*b == Behaviour::Liar).then_some(Fault::Perturb);
            sim.nodes.push(Node::new(key, config.clone().with_fault(fault)));
        }
        for i in 0..n {
            let models = sim.models[i].clone();
            sim.input(i, Input::ModelsReady { models, capacity: 2 });
        }
        sim.advertise_all();
        sim
    }

    fn advert(&self, i: usize) -> Advert {
        Advert {
            seq: 1,
            timestamp_ms: self.now,
            software: "test".into(),
            models: self.models[i].clone(),
            hardware: Hardware::default(),
            load: Load::default(),
            price: Price::default(),
            listen_addrs: Vec::new(),
        }
    }

    fn advertise_all(&mut self) {
        for from in 0..self.nodes.len() {
            for to in 0..self.nodes.len() {
                if from != to {
                    let (peer, advert) = (self.keys[from], self.advert(from));
                    self.input(to, Input::Advert { peer, advert });
                }
            }
        }
    }

    fn index(&self, key: &PublicKey) -> usize {
        self.keys.iter().position(|k| k == key).expect("a node of the swarm")
    }

    fn next_random(&mut self) -> u64 {
        // xorshift: the seed decides everything.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn input(&mut self, node: usize, input: Input) {
        let actions = self.nodes[node].handle(self.now, input);
        self.perform(node, actions);
    }

    fn perform(&mut self, node: usize, actions: Vec<Action>) {
        let mut journaled = false;
        for action in actions {
            match action {
                Action::Journal(writes) => {
                    journaled = true;
                    self.journal[node].extend(writes);
                }
                Action::Resend { to, message, attempt } => {
                    let to = self.index(&to);
                    self.resends[to] += 1;
                    self.wire.push_back((node, to, message, attempt));
                }
                Action::Send { to, message } => {
                    // Awards and acceptances depend on state: it was
                    // journaled first in the same step.
                    if matches!(message, Market::Award(_))
                        || matches!(&message, Market::Ack(a) if a.verify().unwrap().verdict == Verdict::Accepted)
                    {
                        assert!(journaled, "node {node} sent {message:?} before journaling");
                    }
                    if let Market::Ack(a) = &message {
                        let ack = a.verify().unwrap();
                        if ack.verdict == Verdict::Accepted {
                            *self.accepted.entry((ack.task, ack.shard)).or_default() += 1;
                        }
                    }
                    let to = self.index(&to);
                    self.awards[to] += usize::from(matches!(message, Market::Award(_)));
                    self.wire.push_back((node, to, message, 0));
                }
                Action::Gossip(cfp) => {
                    for to in (0..self.nodes.len()).filter(|_| self.gossip) {
                        if to != node {
                            self.wire.push_back((node, to, Market::Cfp(cfp.clone()), 0));
                        }
                    }
                }
                Action::Execute(job) => {
                    self.given[node] += 1;
                    if self.behaviour[node] != Behaviour::Silent {
                        self.jobs.push_back((node, job));
                    }
                }
                Action::Load(load) => self.loads[node].push(load),
                Action::Text { .. } | Action::Progress(_) | Action::Metric(_) => {}
            }
        }
    }

    fn submit(&mut self, node: usize, texts: usize, per_shard: u32, redundancy: u8) -> TaskId {
        let mut random = [0u8; 48];
        for chunk in random.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_random().to_le_bytes());
        }
        let random = Entropy::from_bytes(random);
        let submission = Submission {
            label: "embed".into(),
            kind: ModelKind::Embedding,
            model: None,
            work: Work::Embed { texts: (0..texts).map(|i| format!("text number {i}")).collect() },
            split: Split::ItemsPerShard(per_shard),
            redundancy,
            spot_check_permille: 0,
            then: Vec::new(),
        };
        let (task, actions) = self.nodes[node].submit(self.now, random, submission).unwrap();
        self.perform(node, actions);
        task
    }

    /// One step: a message, a job, or the next timer. `false` when idle.
    fn step(&mut self) -> bool {
        if let Some((from, to, message, attempt)) = self.wire.pop_front() {
            if matches!(message, Market::Award(_)) && self.refuse_awards_to.contains(&to) {
                let to = self.keys[to];
                self.input(from, Input::Undelivered { to, message, attempt });
                return true;
            }
            let fate = match self.next_random() % 1000 {
                r if r < self.lose_permille => Fate::Lose,
                r if r < self.lose_permille + self.duplicate_permille => Fate::Duplicate,
                _ => Fate::Deliver,
            };
            let from_key = self.keys[from];
            match fate {
                Fate::Lose => {}
                Fate::Deliver => self.input(to, Input::Message { from: from_key, message }),
                Fate::Duplicate => {
                    self.input(to, Input::Message { from: from_key, message: message.clone() });
                    self.input(to, Input::Message { from: from_key, message });
                }
            }
            return true;
        }
        if let Some((node, job)) = self.jobs.pop_front() {
            self.now += 10;
            let output = match &job.work {
                Work::Embed { texts } => {
                    let values: Vec<f32> = texts.iter().flat_map(|t| embed(t)).collect();
                    Ok(ShardOutput::Embeddings { dimensions: DIM as u32, values })
                }
                Work::Generate { prompts, .. } => Ok(ShardOutput::Generations(
                    prompts
                        .iter()
                        .map(|p| Generation::text(format!("answer to {p}"), 3, FinishReason::Length))
                        .collect(),
                )),
                other => panic!("no model for {other:?}"),
            };
            self.input(node, Input::JobDone { job, output, compute_ms: 10, input_tokens: 5 });
            return true;
        }
        let next = self.nodes.iter().filter_map(Node::next_timer_ms).min();
        let Some(at) = next else { return false };
        self.now = self.now.max(at);
        for node in 0..self.nodes.len() {
            if self.nodes[node].next_timer_ms().is_some_and(|t| t <= self.now) {
                self.input(node, Input::Tick);
            }
        }
        true
    }

    fn run(&mut self) {
        for _ in 0..200_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the swarm never went idle");
    }

    /// Kills node `node` and starts it again from its journal alone.
    fn restart(&mut self, node: usize) {
        let mut tasks: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut reputations: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for write in &self.journal[node] {
            match write {
                Write::Task { key, value } => {
                    tasks.insert(key.clone(), value.clone());
                }
                Write::Forget { key } => {
                    tasks.remove(key);
                }
                Write::Reputation(peer, value) => {
                    reputations.insert(peer.to_bytes().to_vec(), value.clone());
                }
            }
        }
        let key = Keypair::from_secret_bytes(&[node as u8 + 1; 32]);
        self.nodes[node] = Node::new(key, NodeConfig::default());
        self.jobs.retain(|(n, _)| *n != node);
        let models = self.models[node].clone();
        self.input(node, Input::ModelsReady { models, capacity: 2 });
        for from in (0..self.nodes.len()).filter(|f| *f != node) {
            let (peer, advert) = (self.keys[from], self.advert(from));
            self.input(node, Input::Advert { peer, advert });
        }
        let (actions, skipped) =
            self.nodes[node].restore(self.now, tasks.into_iter().collect(), reputations.into_iter().collect());
        assert!(skipped.is_empty(), "{skipped:?}");
        self.perform(node, actions);
    }

    fn staged(&mut self, node: usize, prompts: usize) -> TaskId {
        let mut random = [0u8; 48];
        for chunk in random.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_random().to_le_bytes());
        }
        let submission = staged_submission(prompts);
        let (task, actions) = self.nodes[node].submit(self.now, Entropy::from_bytes(random), submission).unwrap();
        self.perform(node, actions);
        task
    }

    /// A staged "generate, then embed the answers" task ended with the
    /// right vectors and a receipt tree that checks offline.
    fn check_staged(&self, node: usize, task: &TaskId, prompts: usize) {
        let pipeline = self.nodes[node].pipeline(task).expect("a staged task");
        let Some(StagedOutcome::Done { output, receipt }) = &pipeline.outcome else {
            panic!("not done: {:?}", pipeline.outcome)
        };
        let expected: Vec<f32> = (0..prompts).flat_map(|i| embed(&format!("answer to prompt {i}"))).collect();
        assert_eq!(output, &ShardOutput::Embeddings { dimensions: DIM as u32, values: expected });
        let tree = receipt.verify().unwrap();
        assert_eq!(tree.stages.len(), 2);
        tree.check_tree(&self.keys[node], Some(output)).unwrap();
        // Each stage is a task of its own, auctioned and receipted.
        assert_eq!(pipeline.children.len(), 2);
        let first = tree.stages[0].verify().unwrap();
        assert_eq!(first.shards.len(), prompts.div_ceil(2));
    }

    fn outcome(&self, node: usize, task: &TaskId) -> &Outcome {
        self.nodes[node].task(task).unwrap().outcome.as_ref().expect("the task ended")
    }

    /// The task completed with the honest vectors, in input order, and a
    /// receipt whose every slice checks.
    fn check_done(&self, node: usize, task: &TaskId, texts: usize) -> Vec<PublicKey> {
        let Outcome::Done { output, receipt, .. } = self.outcome(node, task) else {
            panic!("task failed: {:?}", self.outcome(node, task));
        };
        let expected: Vec<f32> = (0..texts).flat_map(|i| embed(&format!("text number {i}"))).collect();
        assert_eq!(output, &ShardOutput::Embeddings { dimensions: DIM as u32, values: expected });
        let receipt = receipt.verify().unwrap();
        receipt.check_output(output).unwrap();
        receipt.shards.iter().map(|c| *c.signer()).collect()
    }
}

#[test]
fn many_tasks_at_once_complete_with_receipts_that_check() {
    let mut sim = Sim::new(&[Behaviour::Honest; 4]);
    let tasks: Vec<TaskId> = (0..6).map(|i| sim.submit(i % 2, 40 + i, 8, 1)).collect();
    sim.run();
    for (i, task) in tasks.iter().enumerate() {
        let executors = sim.check_done(i % 2, task, 40 + i);
        assert!(executors.iter().collect::<BTreeSet<_>>().len() > 1, "shards spread over peers");
    }
    assert!(sim.accepted.values().all(|n| *n == 1), "every shard accepted exactly once");
    // Workers advertised load while they worked, and none once idle.
    assert!(sim.loads.iter().flatten().any(|l| l.active_shards > 0));
    assert!(sim.nodes.iter().all(|n| n.load().active_shards == 0 && n.load().queued_shards == 0));
}

#[test]
fn a_worker_that_never_answers_is_replaced_and_loses_standing() {
    let mut sim = Sim::new(&[Behaviour::Honest, Behaviour::Silent, Behaviour::Honest]);
    let task = sim.submit(0, 30, 5, 1);
    sim.run();
    let executors = sim.check_done(0, &task, 30);
    let silent = sim.keys[1];
    assert!(sim.given[1] > 0, "it was given work");
    assert!(!executors.contains(&silent));
    // Those who did the work earned standing, and the book was journaled.
    let honest = sim.keys[2];
    assert!(sim.nodes[0].reputation(sim.now, &honest) > mycel_market::reputation::DEFAULT);
    assert!(sim.journal[0].iter().any(|w| matches!(w, Write::Reputation(p, _) if *p == honest)));
}

#[test]
fn a_liar_is_outvoted_and_gets_no_more_of_the_task() {
    let mut sim = Sim::new(&[Behaviour::Honest, Behaviour::Liar, Behaviour::Honest, Behaviour::Honest]);
    let task = sim.submit(0, 40, 5, 2);
    sim.run();
    let executors = sim.check_done(0, &task, 40);
    let liar = sim.keys[1];
    assert!(!executors.contains(&liar));
    assert!(sim.nodes[0].reputation(sim.now, &liar) < 0.5, "halved at least once");
}

#[test]
fn peers_joining_and_leaving_mid_task() {
    let mut sim = Sim::new(&[Behaviour::Honest, Behaviour::Silent, Behaviour::Honest]);
    let task = sim.submit(0, 60, 5, 1);
    // Let the auction run a little, then the silent peer leaves.
    for _ in 0..20 {
        sim.step();
    }
    let gone = sim.keys[1];
    sim.input(0, Input::PeerLost(gone));
    sim.run();
    let executors = sim.check_done(0, &task, 60);
    assert!(!executors.contains(&gone));
}

#[test]
fn the_model_is_chosen_by_throughput_then_digest_never_by_map_order() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    // Nodes 1 and 2 also serve a second embedding model. Throughput in
    // good standing: minilm 100 (itself, trusted) + 2 x 100 x 0.8 = 260.
    for i in 1..3 {
        sim.models[i] = vec![model("minilm", 100.0), model("fast", 150.0)];
    }
    sim.advertise_all();
    let task = sim.submit(0, 10, 5, 1);
    assert_eq!(sim.nodes[0].task(&task).unwrap().model, "minilm", "fast: 2 x 150 x 0.8 = 240");
    for i in 1..3 {
        sim.models[i] = vec![model("minilm", 100.0), model("fast", 200.0)];
    }
    sim.advertise_all();
    let task = sim.submit(0, 10, 5, 1);
    assert_eq!(sim.nodes[0].task(&task).unwrap().model, "fast", "2 x 200 x 0.8 = 320");
    // Stale adverts make nobody a candidate: the peers' model is gone.
    sim.now += 10 * 60_000;
    let submission = Submission {
        label: "embed".into(),
        kind: ModelKind::Embedding,
        model: Some("fast".into()),
        work: Work::Embed { texts: vec!["a".into()] },
        split: Split::Auto,
        redundancy: 1,
        spot_check_permille: 0,
        then: Vec::new(),
    };
    let err = sim.nodes[0].submit(sim.now, Entropy::from_bytes([9; 48]), submission).unwrap_err();
    assert!(err.to_string().contains("no peer serves"), "{err}");
}

#[test]
fn the_same_inputs_give_the_same_actions() {
    let run = || {
        let mut sim = Sim::new(&[Behaviour::Honest, Behaviour::Liar, Behaviour::Honest]);
        sim.lose_permille = 50;
        let task = sim.submit(0, 25, 5, 2);
        sim.run();
        (format!("{:?}", sim.outcome(0, &task)), sim.journal)
    };
    let (a, b) = (run(), run());
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
}

#[test]
fn a_task_past_its_deadline_fails_with_that_reason() {
    // Every worker silent: shards keep timing out until the task's time is
    // up.
    let mut sim = Sim::new(&[Behaviour::Silent; 3]);
    let task = sim.submit(0, 10, 5, 1);
    sim.run();
    let Outcome::Failed(reason) = sim.outcome(0, &task) else { panic!("completed with no worker") };
    assert!(reason.starts_with("deadline") || reason.contains("no usable bids"), "{reason}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any interleaving of deliveries, losses, duplicates and timer
    /// firings: no shard is accepted twice, none is lost, and every task
    /// ends (done, or failed with a reason) by its deadline.
    #[test]
    fn any_interleaving_keeps_the_invariants(
        seed in 1u64..u64::MAX,
        lose in 0u64..300,
        duplicate in 0u64..300,
        liar in any::<bool>(),
        redundancy in 1u8..=2,
    ) {
        // A consistent liar is caught only by a second copy.
        let redundancy = if liar { 2 } else { redundancy };
        let second = if liar { Behaviour::Liar } else { Behaviour::Honest };
        let mut sim = Sim::new(&[Behaviour::Honest, second, Behaviour::Honest, Behaviour::Honest]);
        sim.rng = seed;
        sim.lose_permille = lose;
        sim.duplicate_permille = duplicate;
        let started = sim.now;
        let tasks: Vec<TaskId> = (0..3).map(|i| sim.submit(i, 20, 4, redundancy)).collect();
        sim.run();
        let deadline = started + mycel_market::requester::Config::default().default_deadline_ms;
        for (i, task) in tasks.iter().enumerate() {
            match sim.outcome(i, task) {
                Outcome::Done { .. } => { sim.check_done(i, task, 20); }
                Outcome::Failed(reason) => prop_assert!(!reason.is_empty()),
            }
        }
        prop_assert!(sim.now <= deadline + 60_000, "ran until {} (deadline {deadline})", sim.now);
        for ((task, shard), n) in &sim.accepted {
            prop_assert!(*n <= usize::from(redundancy) + 1, "task {task} shard {shard} accepted {n} times");
        }
    }
}

#[test]
fn every_message_delivered_twice_runs_every_shard_once() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    sim.duplicate_permille = 1000;
    let task = sim.submit(0, 40, 5, 1);
    sim.run();
    sim.check_done(0, &task, 40);
    // Eight shards: each award ran once, however often it arrived.
    assert_eq!(sim.given.iter().sum::<usize>(), 8, "{:?}", sim.given);
    assert!(sim.accepted.values().all(|n| *n == 1));
}

#[test]
fn a_two_stage_task_generates_then_embeds_the_answers_with_one_receipt_tree() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    let task = sim.staged(0, 5);
    sim.run();
    sim.check_staged(0, &task, 5);
    // A receipt tree with a stage swapped for another task's does not hold.
    let Some(StagedOutcome::Done { receipt, output }) = &sim.nodes[0].pipeline(&task).unwrap().outcome else {
        panic!("done")
    };
    let mut tree = receipt.verify().unwrap();
    tree.stages.swap(0, 1);
    assert!(tree.check_tree(&sim.keys[0], Some(output)).is_err());
    assert!(receipt.verify().unwrap().check_tree(&sim.keys[1], None).is_err(), "another signer");
}

#[test]
fn a_staged_task_survives_a_restart_between_its_stages() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    let task = sim.staged(0, 4);
    // Run until the first stage is done, then kill the requester.
    for _ in 0..100_000 {
        let p = sim.nodes[0].pipeline(&task).unwrap();
        if p.children.len() == 2 || p.outcome.is_some() {
            break;
        }
        assert!(sim.step(), "went idle in stage 0");
    }
    sim.restart(0);
    sim.run();
    sim.check_staged(0, &task, 4);
}

#[test]
fn an_award_that_cannot_be_delivered_is_tried_three_more_times_then_given_to_another() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    sim.refuse_awards_to.insert(1);
    let task = sim.submit(0, 30, 5, 1);
    sim.run();
    let executors = sim.check_done(0, &task, 30);
    assert_eq!(sim.given[1], 0, "nothing reached it");
    assert!(!executors.contains(&sim.keys[1]));
    // Every award to it was resent three times, 100, 200 and 400 ms apart,
    // before its shards went to someone else.
    assert!(sim.awards[1] > 0);
    assert_eq!(sim.resends[1], 3 * sim.awards[1]);
    assert_eq!(sim.resends[0] + sim.resends[2], 0);
}

#[test]
fn a_peer_that_joins_mid_task_is_asked_directly() {
    // No gossip and no minimum of direct candidates: a CFP reaches only
    // the candidates the requester knows.
    let mut config = NodeConfig::default();
    config.auction.min_direct = 0;
    let mut sim = Sim::with_config(&[Behaviour::Silent, Behaviour::Silent, Behaviour::Honest], config);
    sim.gossip = false;
    // The requester has not heard of node 2 yet.
    let late = sim.keys[2];
    sim.input(0, Input::PeerLost(late));
    let task = sim.submit(0, 20, 5, 1);
    let started = sim.now;
    while sim.now < started + 3_000 {
        assert!(sim.step(), "idle at +{} ms: {:?}", sim.now - started, sim.nodes[0].task(&task).unwrap().outcome);
    }
    let t = sim.nodes[0].task(&task).unwrap();
    assert_eq!((t.requester.shards_done(), t.outcome.is_none()), (0, true), "nobody who works knows of it");
    // Node 2's advert arrives: the running task's next round asks it.
    let advert = sim.advert(2);
    sim.input(0, Input::Advert { peer: late, advert });
    sim.run();
    let executors = sim.check_done(0, &task, 20);
    assert!(executors.iter().all(|e| *e == late));
}

#[test]
fn finished_staged_tasks_are_kept_like_finished_tasks() {
    let mut sim = Sim::with_config(&[Behaviour::Honest; 3], NodeConfig::default().with_keep_finished(1));
    let first = sim.staged(0, 2);
    sim.run();
    let second = sim.staged(0, 2);
    sim.run();
    sim.check_staged(0, &second, 2);
    assert!(sim.nodes[0].pipeline(&first).is_none(), "the older one is forgotten");
    let key = mycel_market::node::task_key(first, mycel_market::node::Part::Pipeline);
    assert!(sim.journal[0].iter().any(|w| matches!(w, Write::Forget { key: k } if *k == key)));
}

/// Generate an answer to each of `prompts` prompts, then embed the answers.
fn staged_submission(prompts: usize) -> Submission {
    let greedy = GenerateParams { max_tokens: 8, ..GenerateParams::default() };
    Submission {
        label: "generate".into(),
        kind: ModelKind::Generation,
        model: None,
        work: Work::Generate { prompts: (0..prompts).map(|i| format!("prompt {i}")).collect(), params: greedy },
        split: Split::ItemsPerShard(2),
        redundancy: 1,
        spot_check_permille: 0,
        then: vec![Stage {
            label: "embed".into(),
            kind: ModelKind::Embedding,
            model: None,
            split: Split::ItemsPerShard(3),
            redundancy: 1,
            spot_check_permille: 0,
            params: GenerateParams::default(),
        }],
    }
}

#[test]
fn a_stage_is_journaled_as_part_of_its_staged_task_before_its_child_sends_anything() {
    let mut sim = Sim::new(&[Behaviour::Honest; 3]);
    let (task, actions) = sim.nodes[0].submit(sim.now, Entropy::from_bytes([5; 48]), staged_submission(2)).unwrap();
    let key = mycel_market::node::task_key(task, mycel_market::node::Part::Pipeline);
    let names_it = |w: &Write| matches!(w, Write::Task { key: k, .. } if *k == key);
    let record = actions.iter().position(|a| matches!(a, Action::Journal(writes) if writes.iter().any(names_it)));
    let first_send = actions.iter().position(|a| matches!(a, Action::Send { .. } | Action::Gossip(_)));
    // Otherwise a crash in between would start the same stage again.
    assert!(record.unwrap() < first_send.unwrap(), "{actions:?}");
    // A staged task whose first stage cannot start leaves nothing behind.
    let mut hopeless = staged_submission(2);
    hopeless.model = Some("no such model".into());
    assert!(sim.nodes[0].submit(sim.now, Entropy::from_bytes([6; 48]), hopeless).is_err());
    assert!(sim.nodes[0].pipeline(&TaskId([6; 16])).is_none());
}

#[test]
fn a_node_at_its_running_limit_refuses_new_tasks_until_one_ends() {
    let config = NodeConfig::default().with_max_running(2);
    let mut sim = Sim::with_config(&[Behaviour::Honest; 3], config);
    let first = sim.submit(0, 8, 4, 1);
    let second = sim.submit(0, 8, 4, 1);
    let submission = Submission {
        label: "embed".into(),
        kind: ModelKind::Embedding,
        model: None,
        work: Work::Embed { texts: vec!["one more".into()] },
        split: Split::ItemsPerShard(1),
        redundancy: 1,
        spot_check_permille: 0,
        then: Vec::new(),
    };
    let entropy = Entropy::from_bytes([9; 48]);
    let refused = sim.nodes[0].submit(sim.now, entropy, submission.clone()).unwrap_err();
    assert!(matches!(refused, mycel_market::node::SubmitError::Busy { running: 2 }), "{refused}");
    assert!(refused.to_string().contains("running 2 tasks"), "{refused}");
    // Refused changed nothing: the two running tasks finish as before.
    sim.run();
    sim.check_done(0, &first, 8);
    sim.check_done(0, &second, 8);
    assert_eq!(sim.nodes[0].running(), 0);
    let (task, actions) = sim.nodes[0].submit(sim.now, entropy, submission).unwrap();
    sim.perform(0, actions);
    sim.run();
    let Outcome::Done { output, .. } = sim.outcome(0, &task) else { panic!("not done") };
    assert_eq!(output, &ShardOutput::Embeddings { dimensions: DIM as u32, values: embed("one more") });
}
