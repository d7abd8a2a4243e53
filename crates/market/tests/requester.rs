//! The requester state machine under virtual time: every path of a task's
//! life, driven by a small simulated swarm of signing workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use mycel_market::requester::Phase;
use mycel_market::{Action, Candidate, Config, Event, Pool, Requester, Timer};
use mycel_protocol::{
    Award, Bid, Cfp, Digest, FinishReason, GenerateParams, Generation, Keypair, ModelKind, ModelSelector, Price,
    PublicKey, RejectReason, ResultClaim, ShardOutput, ShardResult, Signed, Split, TaskId, TaskSpec, Timings, Verdict,
    Work, merkle,
};

const DIM: usize = 4;

fn model() -> Digest {
    Digest::of(b"weights")
}

/// The "model": a deterministic vector per text.
fn embed(text: &str) -> Vec<f32> {
    let n = text.len() as f32;
    let v = [1.0, n, (n * 0.37).sin(), 0.5];
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn spec(texts: usize, per_shard: u32, redundancy: u8) -> TaskSpec {
    TaskSpec {
        work: Work::Embed { texts: (0..texts).map(|i| format!("text number {i}")).collect() },
        model: ModelSelector::Digest(model()),
        split: Split::ItemsPerShard(per_shard),
        redundancy,
        spot_check_permille: 0,
        aggregation: mycel_protocol::Aggregation::Concat,
        deadline_ms: 0,
        budget_micros: None,
    }
}

struct Worker {
    key: Keypair,
    /// Returns wrong vectors.
    liar: bool,
}

/// A requester plus the world around it: signs CFPs, keeps timers and
/// awards, lets tests decide who answers what and when.
struct Sim {
    requester: Requester,
    key: Keypair,
    workers: Vec<Worker>,
    now: u64,
    timers: BTreeMap<u64, Vec<Timer>>,
    /// The current signed CFP.
    cfp: Option<Signed<Cfp>>,
    gossiped: usize,
    /// Awards received, per worker, not yet answered.
    inbox: BTreeMap<PublicKey, Vec<Award>>,
    acks: Vec<(PublicKey, Verdict)>,
    penalised: Vec<(PublicKey, RejectReason)>,
    rewarded: Vec<PublicKey>,
    done: Option<(ShardOutput, mycel_protocol::Receipt)>,
    failed: Option<String>,
    persisted: usize,
    /// The journal as the driver would hold it: the latest head, the plan,
    /// each shard's latest progress.
    journal: Journal,
}

#[derive(Default, Clone)]
struct Journal {
    head: Vec<u8>,
    plan: Vec<u8>,
    shards: BTreeMap<u32, Vec<u8>>,
}

impl Journal {
    fn restore(&self) -> Result<Requester, mycel_market::requester::JournalError> {
        let shards: Vec<(u32, Vec<u8>)> = self.shards.iter().map(|(i, b)| (*i, b.clone())).collect();
        Requester::from_journal(&self.head, &self.plan, &shards)
    }
}

impl Sim {
    fn new(spec: &TaskSpec, workers: usize, config: Config) -> Self {
        let workers: Vec<Worker> =
            (0..workers).map(|_| Worker { key: Keypair::generate().unwrap(), liar: false }).collect();
        let candidates = workers
            .iter()
            .map(|w| Candidate { peer: w.key.public(), units_per_s: 100.0, load: 0.0, reputation: 0.9 })
            .collect();
        let requester = Requester::new(
            TaskId([7; 16]),
            spec,
            model(),
            ModelKind::Embedding,
            Pool { candidates, prefill_weight: 0.3 },
            config,
            [3; 32],
        )
        .unwrap();
        let mut sim = Sim {
            requester,
            key: Keypair::generate().unwrap(),
            workers,
            now: 1_000_000,
            timers: BTreeMap::new(),
            cfp: None,
            gossiped: 0,
            inbox: BTreeMap::new(),
            acks: Vec::new(),
            penalised: Vec::new(),
            rewarded: Vec::new(),
            done: None,
            failed: None,
            persisted: 0,
            journal: Journal::default(),
        };
        let actions = sim.requester.start(sim.now);
        sim.apply(actions);
        sim
    }

    fn apply(&mut self, actions: Vec<Action>) {
        // Persist always comes before anything that leaves the node and
        // depends on a state change (a bare rejection changes nothing).
        let only_rejections =
            actions.iter().all(|a| matches!(a, Action::Ack { ack, .. } if ack.verdict != Verdict::Accepted));
        if only_rejections {
        } else if let Some(first_send) = actions
            .iter()
            .position(|a| matches!(a, Action::SendCfp { .. } | Action::SendAward { .. } | Action::Ack { .. }))
        {
            assert!(
                actions[..first_send].iter().any(|a| matches!(a, Action::Persist)),
                "a message left before the state was persisted: {actions:?}"
            );
        }
        for action in actions {
            match action {
                Action::Persist => {
                    self.persisted += 1;
                    let entry = self.requester.journal().unwrap();
                    self.journal.head = entry.head;
                    if let Some(plan) = entry.plan {
                        self.journal.plan = plan;
                    }
                    self.journal.shards.extend(entry.shards);
                }
                Action::SendCfp { cfp, gossip, .. } => {
                    self.gossiped += usize::from(gossip);
                    self.sign_cfp(cfp);
                }
                Action::SendAward { to, award } => self.inbox.entry(to).or_default().push(award),
                Action::Ack { to, ack } => self.acks.push((to, ack.verdict)),
                Action::SetTimer { at_ms, timer } => self.timers.entry(at_ms).or_default().push(timer),
                Action::Penalise { peer, reason } => self.penalised.push((peer, reason)),
                Action::Reward { peer } => self.rewarded.push(peer),
                Action::Complete { output, receipt } => self.done = Some((output, receipt)),
                Action::Fail { reason } => self.failed = Some(reason),
            }
        }
    }

    fn sign_cfp(&mut self, cfp: Cfp) {
        let signed = Signed::sign(&self.key, &cfp).unwrap();
        let actions = self.requester.cfp_signed(cfp.round, signed.digest());
        self.apply(actions);
        self.cfp = Some(signed);
    }

    fn event(&mut self, event: Event) {
        let actions = self.requester.handle(self.now, event);
        self.apply(actions);
    }

    fn bid(&mut self, worker: usize, capacity: u32) {
        self.bid_at(worker, capacity, Price::default());
    }

    /// A bid for the current round's CFP, at 100 units/s, capacity 1.
    fn fresh_bid(&self) -> Bid {
        let cfp = self.cfp.clone().unwrap();
        Bid {
            task: self.requester.task(),
            round: cfp.verify().unwrap().round,
            cfp: cfp.digest(),
            model: model(),
            price: Price::default(),
            queue_ms: 0,
            units_per_s: 100.0,
            capacity: 1,
            expires_ms: self.now + 60_000,
        }
    }

    fn bid_at(&mut self, worker: usize, capacity: u32, price: Price) {
        let bid = Bid { capacity, price, ..self.fresh_bid() };
        let w = &self.workers[worker];
        let signed = Signed::sign(&w.key, &bid).unwrap();
        let from = w.key.public();
        self.event(Event::bid(from, signed, 0.9));
    }

    /// Advances virtual time, firing due timers.
    fn advance(&mut self, ms: u64) {
        let until = self.now + ms;
        while let Some((&at, _)) = self.timers.iter().next() {
            if at > until {
                break;
            }
            let timers = self.timers.remove(&at).unwrap();
            self.now = at;
            for t in timers {
                self.event(Event::Timer(t));
            }
        }
        self.now = until;
    }

    fn result_for(&self, worker: usize, award: &Award, shard: usize) -> ShardResult {
        let w = &self.workers[worker];
        let s = &award.shards[shard];
        if let Work::Generate { prompts, params } = &s.work {
            // Greedy answers are the same everywhere; samples differ by worker.
            let answers = prompts
                .iter()
                .map(|p| {
                    let text = if params.temperature > 0.0 { format!("{p} #{worker}") } else { p.to_uppercase() };
                    Generation::text(text, 2, FinishReason::Length)
                })
                .collect();
            return self.sign_result(worker, award, shard, ShardOutput::Generations(answers));
        }
        let Work::Embed { texts } = &s.work else { panic!("embed or generate") };
        let mut values: Vec<f32> = texts.iter().flat_map(|t| embed(t)).collect();
        if w.liar {
            for v in values.iter_mut().step_by(DIM) {
                *v = -*v;
            }
        }
        let output = ShardOutput::Embeddings { dimensions: DIM as u32, values };
        self.sign_result(worker, award, shard, output)
    }

    fn sign_result(&self, worker: usize, award: &Award, shard: usize, output: ShardOutput) -> ShardResult {
        let w = &self.workers[worker];
        let s = &award.shards[shard];
        let claim = ResultClaim {
            task: award.task,
            shard: s.shard,
            first_item: s.first_item,
            items: s.work.items() as u32,
            input: s.work.digest().unwrap(),
            model: award.model,
            output: output.digest().unwrap(),
            timings: Timings::default(),
            input_tokens: s.work.items() as u64 * 5,
            spot_commitment: self.cfp.as_ref().unwrap().verify().unwrap().spot_commitment,
        };
        ShardResult { claim: Signed::sign(&w.key, &claim).unwrap(), output }
    }

    /// Lets `worker` answer every shard it holds.
    fn work(&mut self, worker: usize) -> usize {
        let key = self.workers[worker].key.public();
        let awards = self.inbox.remove(&key).unwrap_or_default();
        let mut n = 0;
        for award in &awards {
            for i in 0..award.shards.len() {
                let result = self.result_for(worker, award, i);
                self.event(Event::result(key, result));
                n += 1;
            }
        }
        n
    }

    /// Every worker answers what it holds until nothing is left.
    fn run_all(&mut self) {
        for _ in 0..1000 {
            if self.done.is_some() || self.failed.is_some() {
                return;
            }
            let mut any = 0;
            for w in 0..self.workers.len() {
                any += self.work(w);
            }
            if any == 0 {
                self.advance(1_000);
            }
        }
        panic!("task never finished");
    }

    fn peer(&self, worker: usize) -> PublicKey {
        self.workers[worker].key.public()
    }
}

fn expected(spec: &TaskSpec) -> Vec<f32> {
    let Work::Embed { texts } = &spec.work else { unreachable!() };
    texts.iter().flat_map(|t| embed(t)).collect()
}

fn check_output(sim: &Sim, spec: &TaskSpec) {
    let (output, receipt) = sim.done.clone().expect("task complete");
    let ShardOutput::Embeddings { dimensions, values } = &output else { panic!("embeddings") };
    assert_eq!(*dimensions as usize, DIM);
    assert_eq!(values, &expected(spec), "output in input order");
    assert_eq!(receipt.shards.len(), sim.requester.shard_count());
    let leaves: Vec<Digest> = receipt.shards.iter().map(Signed::digest).collect();
    assert_eq!(receipt.root, merkle::root(&leaves));
    assert_eq!(receipt.output, output.digest().unwrap());
    for (i, claim) in receipt.shards.iter().enumerate() {
        assert_eq!(claim.verify().unwrap().shard as usize, i, "receipt lists shards in order");
    }
}

#[test]
fn shards_are_auctioned_awarded_verified_and_aggregated_in_order() {
    let spec = spec(100, 10, 1);
    let mut sim = Sim::new(&spec, 3, Config::default());
    assert_eq!(sim.requester.shard_count(), 10);
    for w in 0..3 {
        sim.bid(w, 2);
    }
    // Three bids < enough_bids: the window closes on its timer.
    assert!(sim.inbox.is_empty());
    sim.advance(Config::default().bid_window_ms);
    assert_eq!(sim.inbox.len(), 3, "each bidder got a batch");
    assert!(sim.inbox.values().all(|a| a.len() == 1 && a[0].shards.len() == 2), "one award of 2 shards each");
    sim.run_all();
    check_output(&sim, &spec);
    // Workers that finished were offered the rest: all three did work.
    let executors = sim.requester.executors();
    for w in 0..3 {
        assert!(executors.iter().filter(|e| **e == Some(sim.peer(w))).count() >= 2);
    }
    assert!(sim.acks.iter().all(|(_, v)| *v == Verdict::Accepted));
    assert_eq!(sim.rewarded.len(), 10);
    assert!(sim.penalised.is_empty());
}

/// Copies of one input (an ensemble's samples of one prompt) go to
/// different peers while there are free ones, even where one peer could
/// take them all; shards of different inputs still go to the best bidder
/// first, as before.
#[test]
fn copies_of_one_input_go_to_different_peers() {
    let awards = |texts: Vec<String>| {
        let spec = TaskSpec { work: Work::Embed { texts }, ..spec(3, 1, 1) };
        let mut sim = Sim::new(&spec, 3, Config::default());
        for w in 0..3 {
            sim.bid(w, 4);
        }
        sim.advance(Config::default().bid_window_ms);
        let mut shards: Vec<usize> = sim.inbox.values().map(|a| a.iter().map(|a| a.shards.len()).sum()).collect();
        sim.run_all();
        check_output(&sim, &spec);
        shards.sort_unstable();
        shards
    };
    assert_eq!(awards(vec!["the same prompt".to_string(); 3]), [1, 1, 1], "one copy per peer");
    let distinct = (0..3).map(|i| format!("text number {i}")).collect();
    assert_eq!(awards(distinct), [3], "the best bidder takes what it can, as before");
}

#[test]
fn usage_sums_the_accepted_claims_and_progress_names_the_busy_peers() {
    let spec = spec(40, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config::default());
    sim.bid(0, 1);
    sim.bid(1, 1);
    sim.advance(Config::default().bid_window_ms);
    assert_eq!(sim.requester.peers_working(), 2);
    let award = sim.inbox[&sim.peer(0)][0].clone();
    assert!(sim.requester.is_running(award.shards[0].shard, &sim.peer(0)));
    assert!(!sim.requester.is_running(award.shards[0].shard, &sim.peer(1)));
    sim.run_all();
    check_output(&sim, &spec);
    assert_eq!(sim.requester.input_tokens(), 40 * 5);
    assert_eq!(sim.requester.peers_working(), 0);
}

#[test]
fn a_cancelled_task_fails_once_and_answers_late_results_as_late() {
    let spec = spec(20, 10, 1);
    let mut sim = Sim::new(&spec, 1, Config::default());
    sim.bid(0, 2);
    sim.advance(Config::default().bid_window_ms);
    let actions = sim.requester.cancel("cancelled by the user");
    assert!(matches!(actions[0], Action::Persist), "journaled first: {actions:?}");
    sim.apply(actions);
    assert_eq!(sim.failed.as_deref(), Some("cancelled by the user"));
    assert!(sim.requester.cancel("again").is_empty(), "a finished task cannot be cancelled twice");
    sim.work(0);
    assert!(sim.done.is_none());
    assert!(sim.acks.iter().all(|(_, v)| *v == Verdict::Rejected(RejectReason::AlreadyComplete)), "{:?}", sim.acks);
}

#[test]
fn enough_bids_close_the_window_early() {
    let spec = spec(20, 10, 1);
    let config = Config { enough_bids: 2, ..Config::default() };
    let mut sim = Sim::new(&spec, 3, config);
    sim.bid(0, 1);
    assert!(sim.inbox.is_empty());
    sim.bid(1, 1);
    assert_eq!(sim.inbox.len(), 2, "awarded without waiting for the timer");
}

#[test]
fn lost_bids_mean_new_rounds_then_failure() {
    let spec = spec(10, 10, 1);
    let config = Config { max_rounds: 3, ..Config::default() };
    let mut sim = Sim::new(&spec, 3, config.clone());
    // Three direct candidates: no gossip in round one.
    assert_eq!(sim.gossiped, 0);
    sim.advance(config.bid_window_ms);
    assert_eq!(sim.cfp.as_ref().unwrap().verify().unwrap().round, 2);
    assert_eq!(sim.gossiped, 1, "a round without bids also gossips");
    // A bid for the old round does not count.
    sim.advance(config.bid_window_ms * 2);
    assert_eq!(sim.requester.phase(), Phase::Failed);
    assert!(sim.failed.as_deref().unwrap().contains("no usable bids"));
}

#[test]
fn bids_for_another_cfp_model_or_signer_are_ignored() {
    let spec = spec(10, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 1, ..Config::default() });
    let good = Bid { units_per_s: 10.0, ..sim.fresh_bid() };
    let w0 = sim.peer(0);
    for bad in [
        Bid { cfp: Digest::of(b"other cfp"), ..good.clone() },
        Bid { model: Digest::of(b"other weights"), ..good.clone() },
        Bid { round: 9, ..good.clone() },
        Bid { expires_ms: sim.now, ..good.clone() },
    ] {
        let signed = Signed::sign(&sim.workers[0].key, &bad).unwrap();
        sim.event(Event::bid(w0, signed, 0.9));
    }
    assert!(sim.inbox.is_empty());
    // Signed by worker 1 but sent as worker 0: forged.
    let forged = Signed::sign(&sim.workers[1].key, &good).unwrap();
    sim.event(Event::bid(w0, forged, 0.9));
    assert!(sim.inbox.is_empty());
    assert_eq!(sim.penalised, vec![(w0, RejectReason::BadSignature)]);
}

/// Two workers, one shard: worker 0 takes it, worker 1 bids after, and
/// worker 0's deadline passes (100 ms of expected work x 4 + 5 s grace).
/// Returns the task then, and worker 0's result, computed but not sent.
fn worker_0_late() -> (TaskSpec, Sim, ShardResult) {
    let spec = spec(10, 10, 1);
    // No backup copies here: this is about the deadline.
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 1, straggler_factor: 1e9, ..Config::default() });
    sim.bid(0, 1);
    let award = sim.inbox.remove(&sim.peer(0)).unwrap().remove(0);
    let late = sim.result_for(0, &award, 0);
    sim.bid(1, 1);
    sim.advance(6_000);
    (spec, sim, late)
}

#[test]
fn a_late_worker_is_replaced_yet_its_result_counts_if_it_comes_first() {
    let (spec, mut sim, late) = worker_0_late();
    let (w0, w1) = (sim.peer(0), sim.peer(1));
    let replacement = sim.inbox.remove(&w1).expect("re-awarded to the other worker").remove(0);
    // Worker 0 was only slow (a loaded machine): its result, first after
    // all, is accepted; the replacement's is then answered as complete.
    sim.event(Event::result(w0, late));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Accepted));
    check_output(&sim, &spec);
    assert_eq!(sim.requester.executors(), vec![Some(w0)]);
    let second = sim.result_for(1, &replacement, 0);
    sim.event(Event::result(w1, second));
    assert_eq!(sim.acks.last().unwrap(), &(w1, Verdict::Rejected(RejectReason::AlreadyComplete)));
    // First after all: late, but no fault.
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);
}

#[test]
fn a_late_result_after_the_replacements_is_answered_as_complete() {
    let (spec, mut sim, late) = worker_0_late();
    assert!(sim.penalised.is_empty(), "not yet: its result may still come first");
    sim.run_all();
    check_output(&sim, &spec);
    assert_eq!(sim.requester.executors(), vec![Some(sim.peer(1))]);
    let w0 = sim.peer(0);
    assert_eq!(sim.penalised, vec![(w0, RejectReason::Late)], "late, and beaten to it");
    sim.event(Event::result(w0, late));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Rejected(RejectReason::AlreadyComplete)));
}

/// The only worker that serves the model misses its deadline (its machine
/// is loaded): nobody else bids, yet the task waits for it instead of
/// failing for want of bids, and completes when its result comes.
#[test]
fn a_late_sole_worker_is_waited_for_not_given_up_on() {
    let spec = spec(10, 10, 1);
    let config = Config { enough_bids: 1, straggler_factor: 1e9, max_rounds: 3, ..Config::default() };
    let mut sim = Sim::new(&spec, 1, config.clone());
    sim.bid(0, 1);
    let w0 = sim.peer(0);
    let award = sim.inbox.remove(&w0).unwrap().remove(0);
    let late = sim.result_for(0, &award, 0);
    sim.advance(6_000);
    // Far more than max_rounds bid windows with nobody else bidding (the
    // worker itself bids again: it may not take the shard twice).
    for _ in 0..40 {
        sim.bid(0, 1);
        sim.advance(config.bid_window_ms);
    }
    assert_eq!(sim.failed, None);
    let round = sim.cfp.as_ref().unwrap().verify().unwrap().round;
    assert!(round > 3, "it kept asking for someone else: round {round}");
    sim.event(Event::result(w0, late));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Accepted));
    check_output(&sim, &spec);
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);

    // The same, but the late worker leaves: then nothing is awaited and
    // the task fails as before, within a grace period and a round.
    let mut sim = Sim::new(&spec, 1, config.clone());
    sim.bid(0, 1);
    let w0 = sim.peer(0);
    sim.advance(6_000);
    sim.event(Event::PeerLost(w0));
    sim.advance(config.grace_ms + config.bid_window_ms * u64::from(config.max_rounds + 1));
    assert!(sim.failed.as_deref().unwrap_or_default().contains("no usable bids"), "{:?}", sim.failed);
}

#[test]
fn a_straggler_gets_a_backup_and_the_first_result_wins() {
    let spec = spec(20, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 2, ..Config::default() });
    sim.bid(0, 1);
    sim.bid(1, 1);
    let (w0, w1) = (sim.peer(0), sim.peer(1));
    let slow_award = sim.inbox.remove(&w0).unwrap().remove(0);
    let slow_result = sim.result_for(0, &slow_award, 0);
    // Worker 1 finishes its shard at once; worker 0 is slow.
    assert_eq!(sim.work(1), 1);
    assert!(!sim.inbox.contains_key(&w1), "nothing left to give it yet");
    // Past twice the expected 100 ms, worker 1 is given a backup copy,
    // long before worker 0's deadline (4 x 100 ms + 5 s).
    sim.advance(500);
    let backup = sim.inbox.get(&w1).expect("a backup copy for the free worker");
    assert_eq!(backup[0].shards[0].shard, slow_award.shards[0].shard);
    assert_eq!(sim.work(1), 1);
    check_output(&sim, &spec);
    assert_eq!(sim.requester.executors(), vec![Some(w1), Some(w1)]);
    // The slow worker's result is answered as late but not held against it.
    sim.event(Event::result(w0, slow_result));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Rejected(RejectReason::AlreadyComplete)));
    sim.advance(10_000);
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);
}

#[test]
fn duplicate_wrong_signer_and_tampered_results_are_rejected() {
    let spec = spec(20, 10, 1);
    let mut sim = Sim::new(&spec, 3, Config { enough_bids: 2, ..Config::default() });
    sim.bid(0, 1);
    sim.bid(1, 1);
    let (w0, w1, w2) = (sim.peer(0), sim.peer(1), sim.peer(2));
    let a0 = sim.inbox.remove(&w0).unwrap().remove(0);
    let a1 = sim.inbox.remove(&w1).unwrap().remove(0);

    // Worker 2 was never awarded anything: its result is refused.
    let mut stranger = sim.result_for(2, &a0, 0);
    stranger.claim = Signed::sign(&sim.workers[2].key, &stranger.claim.verify().unwrap()).unwrap();
    sim.event(Event::result(w2, stranger));
    assert_eq!(sim.acks.last().unwrap(), &(w2, Verdict::Rejected(RejectReason::NotAwarded)));

    // A result signed by worker 0 but delivered by worker 1.
    let relayed = sim.result_for(0, &a0, 0);
    sim.event(Event::result(w1, relayed));
    assert_eq!(sim.acks.last().unwrap(), &(w1, Verdict::Rejected(RejectReason::NotAwarded)));

    // Output edited after signing.
    let mut tampered = sim.result_for(0, &a0, 0);
    if let ShardOutput::Embeddings { values, .. } = &mut tampered.output {
        values[0] += 0.5;
    }
    sim.event(Event::result(w0, tampered));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Rejected(RejectReason::OutputMismatch)));
    assert!(sim.penalised.contains(&(w0, RejectReason::OutputMismatch)));

    // Worker 1's honest result is accepted once; a replay is not counted.
    let good = sim.result_for(1, &a1, 0);
    sim.event(Event::result(w1, good.clone()));
    assert_eq!(sim.acks.last().unwrap(), &(w1, Verdict::Accepted));
    sim.event(Event::result(w1, good));
    assert_eq!(sim.acks.last().unwrap(), &(w1, Verdict::Rejected(RejectReason::AlreadyComplete)));
    assert_eq!(sim.requester.shards_done(), 1);

    // Worker 0's shard went back on offer when its tampered result was
    // caught; worker 1 takes it.
    sim.run_all();
    check_output(&sim, &spec);
    assert!(sim.requester.executors().iter().all(|e| *e == Some(w1)));
}

#[test]
fn a_forged_signature_frees_the_shard_at_once() {
    let spec = spec(20, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 2, ..Config::default() });
    sim.bid(0, 1);
    sim.bid(1, 1);
    let (w0, w1) = (sim.peer(0), sim.peer(1));
    let a0 = sim.inbox.remove(&w0).unwrap().remove(0);
    let mut forged = sim.result_for(0, &a0, 0);
    let mut signature = *forged.claim.signature();
    signature.0[0] ^= 1;
    forged.claim = Signed::from_parts(*forged.claim.signer(), signature, forged.claim.payload().to_vec());
    sim.event(Event::result(w0, forged));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Rejected(RejectReason::BadSignature)));
    assert!(sim.penalised.contains(&(w0, RejectReason::BadSignature)));
    // No time passes, yet the shard is back on offer: worker 1 finishes
    // everything.
    let now = sim.now;
    while sim.work(1) > 0 {}
    assert_eq!(sim.now, now);
    check_output(&sim, &spec);
    assert!(sim.requester.executors().iter().all(|e| *e == Some(w1)));
}

/// Runs `spec` on three workers of capacity 2, the first a liar: the task
/// completes with honest output, the liar is penalised for disagreeing
/// and named for no shard.
fn liar_among_three(spec: &TaskSpec) -> Sim {
    let mut sim = Sim::new(spec, 3, Config::default());
    sim.workers[0].liar = true;
    for w in 0..3 {
        sim.bid(w, 2);
    }
    sim.advance(Config::default().bid_window_ms);
    sim.run_all();
    check_output(&sim, spec);
    let liar = sim.peer(0);
    assert!(sim.penalised.iter().any(|(p, r)| *p == liar && *r == RejectReason::Disagreement));
    assert!(sim.requester.executors().iter().all(|e| *e != Some(liar)));
    sim
}

#[test]
fn redundancy_catches_a_liar_with_a_tie_breaker() {
    // 3 shards x 2 executions over 3 workers of capacity 2: the liar works.
    let sim = liar_among_three(&spec(30, 10, 2));
    let liar = sim.peer(0);
    assert!(sim.penalised.iter().all(|(p, _)| *p == liar), "only the liar is penalised: {:?}", sim.penalised);
}

#[test]
fn spot_checks_catch_a_liar_without_redundancy() {
    let mut spec = spec(30, 10, 1);
    spec.spot_check_permille = 1000;
    let sim = liar_among_three(&spec);
    // Every shard ran at least twice.
    assert!(sim.acks.len() >= 6, "{:?}", sim.acks);
}

#[test]
fn a_spot_check_nobody_else_can_run_is_given_up() {
    let mut spec = spec(30, 10, 1);
    spec.spot_check_permille = 1000;
    let mut sim = Sim::new(&spec, 1, Config::default());
    sim.bid(0, 3);
    sim.advance(Config::default().bid_window_ms);
    sim.run_all();
    check_output(&sim, &spec);
    assert_eq!(sim.acks.len(), 3, "one execution per shard: {:?}", sim.acks);
}

#[test]
fn spot_checks_pick_about_the_asked_share_of_shards() {
    // 2,000 shards: more than one CFP lists.
    let mut spec = spec(2000, 1, 1);
    spec.spot_check_permille = 100;
    let mut sim = Sim::new(&spec, 3, Config::default());
    for w in 0..3 {
        sim.bid(w, 4000);
    }
    sim.advance(Config::default().bid_window_ms);
    let awarded: usize = sim.inbox.values().flatten().map(|a| a.shards.len()).sum();
    let extra = awarded - 2000;
    assert!((150..=250).contains(&extra), "{extra} of 2000 shards spot-checked at 10%");
}

#[test]
fn a_lost_peer_is_replaced() {
    let spec = spec(10, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config::default());
    sim.bid(0, 1);
    sim.bid(1, 1);
    sim.advance(Config::default().bid_window_ms);
    // One shard, two bidders: the winner disconnects before answering.
    let winner = if sim.inbox.contains_key(&sim.peer(0)) { 0 } else { 1 };
    sim.inbox.clear();
    let lost = sim.peer(winner);
    sim.event(Event::PeerLost(lost));
    assert!(sim.inbox.contains_key(&sim.peer(1 - winner)), "re-awarded at once");
    sim.run_all();
    check_output(&sim, &spec);
}

/// The only worker's adverts stop reaching the requester (the gossip hub
/// between them died) while it runs the shards: taken off them, but not
/// shut out. Its results, still coming over the direct connection, are
/// accepted without penalty, and when it bids again it may run the rest.
#[test]
fn a_worker_whose_adverts_stopped_still_delivers_and_may_bid_again() {
    let spec = spec(20, 10, 1);
    let config = Config { enough_bids: 1, straggler_factor: 1e9, ..Config::default() };
    let mut sim = Sim::new(&spec, 1, config.clone());
    sim.bid(0, 1);
    let w0 = sim.peer(0);
    let first = sim.inbox.remove(&w0).unwrap().remove(0);
    let result = sim.result_for(0, &first, 0);
    sim.event(Event::PeerLost(w0));
    assert_eq!(sim.requester.executors(), vec![None, None], "nothing waits for it");
    sim.event(Event::result(w0, result));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Accepted), "its result, still taken");
    assert_eq!(sim.requester.shards_done(), 1);
    // It bids in the next round and runs the other shard.
    sim.advance(config.bid_window_ms);
    sim.bid(0, 1);
    sim.run_all();
    check_output(&sim, &spec);
    assert_eq!(sim.requester.executors(), vec![Some(w0), Some(w0)]);
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);
}

/// A lost worker's result is paid for only if the budget still has room:
/// its charge stopped counting when it was taken off the shard, and the
/// budget went to the worker that took over.
#[test]
fn a_lost_workers_late_result_is_not_taken_past_the_budget() {
    // Two shards of 10 texts at 10 micro-credits a text: 100 each.
    let mut spec = spec(20, 10, 1);
    spec.budget_micros = Some(200);
    let config = Config { enough_bids: 1, straggler_factor: 1e9, ..Config::default() };
    let mut sim = Sim::new(&spec, 2, config.clone());
    sim.bid_at(0, 1, Price { micros_per_unit: 10 });
    let w0 = sim.peer(0);
    let award = sim.inbox.remove(&w0).unwrap().remove(0);
    let result = sim.result_for(0, &award, 0);
    sim.event(Event::PeerLost(w0));
    sim.advance(config.bid_window_ms);
    sim.bid_at(1, 2, Price { micros_per_unit: 10 });
    let w1 = sim.peer(1);
    let given: usize = sim.inbox.get(&w1).into_iter().flatten().map(|a| a.shards.len()).sum();
    assert_eq!(given, 2, "both shards to the worker that bid, the whole budget committed to it");
    sim.event(Event::result(w0, result));
    assert_eq!(sim.acks.last().unwrap(), &(w0, Verdict::Rejected(RejectReason::Late)), "no room left");
    sim.run_all();
    check_output(&sim, &spec);
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);
}

#[test]
fn every_shard_completes_exactly_once_when_all_results_arrive_twice() {
    let spec = spec(50, 5, 1);
    let mut sim = Sim::new(&spec, 4, Config { enough_bids: 4, ..Config::default() });
    for w in 0..4 {
        sim.bid(w, 4);
    }
    // Snapshot every award, answer each twice.
    let mut answered = 0;
    while sim.done.is_none() {
        let inbox = std::mem::take(&mut sim.inbox);
        assert!(!inbox.is_empty(), "stalled");
        for (peer, awards) in inbox {
            let w = sim.workers.iter().position(|x| x.key.public() == peer).unwrap();
            for award in awards {
                for i in 0..award.shards.len() {
                    let r = sim.result_for(w, &award, i);
                    sim.event(Event::result(peer, r.clone()));
                    sim.event(Event::result(peer, r));
                    answered += 1;
                }
            }
        }
    }
    assert_eq!(answered, 10);
    check_output(&sim, &spec);
    let accepted = sim.acks.iter().filter(|(_, v)| *v == Verdict::Accepted).count();
    assert_eq!(accepted, 10);
}

#[test]
fn a_restarted_requester_resumes_from_its_journal() {
    let spec = spec(40, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config::default());
    sim.bid(0, 2);
    sim.bid(1, 2);
    sim.advance(Config::default().bid_window_ms);
    // Two shards come back, then the node is killed: only what was
    // journaled survives.
    let w0 = sim.peer(0);
    let award = sim.inbox.get_mut(&w0).unwrap().remove(0);
    let plan_len = sim.journal.plan.len();
    for i in 0..award.shards.len() {
        let r = sim.result_for(0, &award, i);
        sim.event(Event::result(w0, r));
    }
    let done_before = sim.requester.shards_done();
    assert_eq!(done_before, 2);
    // The journal grew by the changed shards only: the plan (the task's
    // input) was written once.
    assert_eq!(sim.journal.plan.len(), plan_len);
    let journal = sim.journal.clone();

    sim.requester = journal.restore().unwrap();
    assert_eq!(sim.requester.shards_done(), done_before, "nothing lost");
    // Timers died with the process: resuming re-arms a deadline for every
    // shard still out.
    sim.timers.clear();
    let actions = sim.requester.resume(sim.now);
    let deadlines =
        actions.iter().filter(|a| matches!(a, Action::SetTimer { timer: Timer::ShardDeadline { .. }, .. })).count();
    assert_eq!(deadlines, 2, "worker 1's two shards");
    sim.apply(actions);
    // The workers still hold their awards and answer the restarted node.
    sim.run_all();
    check_output(&sim, &spec);
    let mut torn = journal.clone();
    torn.head.pop();
    assert!(torn.restore().is_err(), "a torn journal entry is refused");
    let mut lost = journal.clone();
    lost.shards.remove(&3);
    assert!(lost.restore().is_err(), "a missing shard is refused");

    // After another restart the finished task gives back the very output
    // and receipt it handed out (so the same signature).
    let mut finished = sim.journal.restore().unwrap();
    let (output, receipt) = finished.outcome().unwrap().unwrap();
    assert_eq!(Some((output, receipt)), sim.done.clone());
    assert!(finished.resume(sim.now).is_empty(), "nothing left to do");
}

#[test]
fn a_bid_claiming_an_endless_queue_is_refused_not_overflowed() {
    let spec = spec(10, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 1, ..Config::default() });
    let bid = Bid { queue_ms: u64::MAX, ..sim.fresh_bid() };
    let w0 = sim.peer(0);
    // Once this overflowed the deadline sum (a panic in debug builds, a
    // wrapped deadline in release). Now it never decodes.
    let signed = Signed::sign(&sim.workers[0].key, &bid).unwrap();
    sim.event(Event::bid(w0, signed, 0.9));
    assert!(sim.inbox.is_empty());
    // A bid that does not verify ends the sender's part in the task.
    assert_eq!(sim.penalised, vec![(w0, RejectReason::BadSignature)]);
    // The largest numbers allowed give a far deadline, never a wrapped one.
    let w1 = sim.peer(1);
    let slowest = Bid { queue_ms: mycel_protocol::limits::MAX_QUEUE_MS, units_per_s: 1e-30, ..bid };
    let signed = Signed::sign(&sim.workers[1].key, &slowest).unwrap();
    sim.event(Event::bid(w1, signed, 0.9));
    let award = &sim.inbox[&w1][0];
    assert!(award.shards[0].deadline_ms > sim.now + mycel_protocol::limits::MAX_QUEUE_MS);
}

#[test]
fn a_banned_bidder_gets_no_work_whether_or_not_it_was_a_candidate() {
    let spec = spec(10, 10, 1);
    // Two candidates; a third peer hears the CFP by gossip and bids.
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 1, ..Config::default() });
    sim.workers.push(Worker { key: Keypair::generate().unwrap(), liar: false });
    let bid = Bid { units_per_s: 1000.0, ..sim.fresh_bid() };
    let stranger = sim.peer(2);
    // Its standing in the node's book is below the ban line: no offer,
    // however good its bid (once, an unknown bidder read as 0.5).
    let signed = Signed::sign(&sim.workers[2].key, &bid).unwrap();
    sim.event(Event::bid(stranger, signed.clone(), 0.1));
    assert!(sim.inbox.is_empty());
    // A stranger in good standing may work.
    sim.event(Event::bid(stranger, signed, 0.8));
    assert!(sim.inbox.contains_key(&stranger));
}

#[test]
fn a_peer_caught_lying_is_out_of_the_task_and_its_unchecked_work_is_redone() {
    let spec = spec(30, 10, 1);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 2, ..Config::default() });
    sim.workers[0].liar = true;
    let (liar, honest) = (sim.peer(0), sim.peer(1));
    sim.bid(0, 2);
    sim.bid(1, 1);
    let award = sim.inbox.remove(&liar).unwrap().remove(0);
    assert_eq!(award.shards.len(), 2, "the liar holds two shards");
    // Its first lie is consistent and, with no second copy, accepted.
    let first = sim.result_for(0, &award, 0);
    sim.event(Event::result(liar, first));
    assert_eq!(sim.acks.last().unwrap(), &(liar, Verdict::Accepted));
    assert_eq!(sim.requester.shards_done(), 1);
    // Its second is caught (output edited after signing).
    let mut second = sim.result_for(0, &award, 1);
    if let ShardOutput::Embeddings { values, .. } = &mut second.output {
        values[0] += 0.5;
    }
    sim.event(Event::result(liar, second));
    assert!(sim.penalised.contains(&(liar, RejectReason::OutputMismatch)));
    // What it decided alone is open again; it gets nothing more of this
    // task, even bidding in a new round.
    assert_eq!(sim.requester.shards_done(), 0);
    sim.run_all();
    assert!(!sim.inbox.contains_key(&liar));
    check_output(&sim, &spec);
    assert!(sim.requester.executors().iter().all(|e| *e == Some(honest)));
}

#[test]
fn spot_checks_follow_the_requesters_secret_which_the_receipt_reveals() {
    let mut spec = spec(300, 1, 1);
    spec.spot_check_permille = 200;
    let mut sim = Sim::new(&spec, 3, Config::default());
    for w in 0..3 {
        sim.bid(w, 1000);
    }
    sim.advance(Config::default().bid_window_ms);
    // Which shards run twice: decided by the secret, not by anything a
    // worker knows at award time (the task id and shard index are the
    // same for every secret).
    let mut runs: BTreeMap<u32, usize> = BTreeMap::new();
    for award in sim.inbox.values().flatten() {
        for s in &award.shards {
            *runs.entry(s.shard).or_default() += 1;
        }
    }
    let twice: Vec<u32> = runs.iter().filter(|(_, n)| **n == 2).map(|(s, _)| *s).collect();
    let reveal = mycel_protocol::spot::Reveal { secret: [3; 32], permille: 200 };
    assert_eq!(twice, reveal.checked_shards(300));
    let other = mycel_protocol::spot::Reveal { secret: [4; 32], ..reveal };
    assert_ne!(twice, other.checked_shards(300), "another secret, other shards");
    // Every CFP carried the commitment; the receipt reveals the secret.
    assert_eq!(sim.cfp.as_ref().unwrap().verify().unwrap().spot_commitment, reveal.commitment());
    sim.run_all();
    let (output, receipt) = sim.done.clone().unwrap();
    assert_eq!(receipt.spot, reveal);
    receipt.check_output(&output).unwrap();
}

#[test]
fn samples_at_a_temperature_are_answers_of_their_own_not_a_disagreement() {
    let prompts: Vec<String> = (0..4).map(|i| format!("prompt {i}")).collect();
    let mut spec = spec(4, 2, 2);
    let sampled = GenerateParams { temperature: 0.8, max_tokens: 8, ..GenerateParams::default() };
    spec.work = Work::Generate { prompts: prompts.clone(), params: sampled };
    spec.spot_check_permille = 1000;
    let mut sim = Sim::new(&spec, 3, Config::default());
    for w in 0..3 {
        sim.bid(w, 4);
    }
    sim.advance(Config::default().bid_window_ms);
    sim.run_all();
    let (output, receipt) = sim.done.clone().expect("complete");
    // Two different samples per shard: no tie-breaker, nobody penalised, no
    // spot checks (there is nothing to compare a sample with).
    assert!(sim.penalised.is_empty(), "{:?}", sim.penalised);
    assert_eq!(sim.acks.len(), 4, "two shards, two copies each: {:?}", sim.acks);
    receipt.check_output(&output).unwrap();
    // Greedy decoding is compared exactly: the same answers agree.
    let mut greedy = spec.clone();
    greedy.work = Work::Generate { prompts, params: GenerateParams { max_tokens: 8, ..GenerateParams::default() } };
    let mut sim = Sim::new(&greedy, 2, Config::default());
    sim.bid(0, 4);
    sim.bid(1, 4);
    sim.advance(Config::default().bid_window_ms);
    sim.run_all();
    let (output, _) = sim.done.clone().expect("complete");
    let ShardOutput::Generations(answers) = output else { panic!("answers") };
    assert_eq!(answers[3].text, "PROMPT 3");
}

#[test]
fn a_task_stops_at_its_budget_and_fails_with_that_reason() {
    // Three shards of 10 texts at 10 micro-credits a text: 100 each.
    let mut spec = spec(30, 10, 1);
    spec.budget_micros = Some(250);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 2, ..Config::default() });
    sim.bid_at(0, 3, Price { micros_per_unit: 10 });
    sim.bid_at(1, 3, Price { micros_per_unit: 10 });
    let awarded: usize = sim.inbox.values().flatten().map(|a| a.shards.len()).sum();
    assert_eq!(awarded, 2, "only what the budget covers goes out");
    sim.run_all();
    let reason = sim.failed.clone().expect("failed");
    assert!(reason.starts_with("budget: 200 of 250"), "{reason}");
    // Within budget, the same task completes.
    spec.budget_micros = Some(300);
    let mut sim = Sim::new(&spec, 2, Config { enough_bids: 2, ..Config::default() });
    sim.bid_at(0, 3, Price { micros_per_unit: 10 });
    sim.bid_at(1, 3, Price { micros_per_unit: 10 });
    sim.run_all();
    check_output(&sim, &spec);
}

#[test]
fn a_worker_that_gives_a_shard_back_may_take_it_again_in_a_later_round() {
    // The only worker is busy after all: it refuses, bids again, and gets
    // the shard back. (A refusal once kept a peer off the shard for good:
    // with every bidder refused, the task asked for bids until its deadline.)
    let spec = spec(10, 10, 1);
    let mut sim = Sim::new(&spec, 1, Config { enough_bids: 1, ..Config::default() });
    sim.bid(0, 1);
    let w0 = sim.peer(0);
    let award = sim.inbox.remove(&w0).unwrap().remove(0);
    sim.event(Event::Refused { from: w0, shard: award.shards[0].shard });
    assert!(sim.penalised.is_empty(), "giving work back is no fault");
    // Nobody else: a new round; the worker bids again and, after a short
    // pause, is awarded the same shard.
    sim.bid(0, 1);
    sim.advance(500);
    assert!(sim.inbox.contains_key(&w0), "the shard went back to the worker that refused it once");
    sim.run_all();
    check_output(&sim, &spec);
}

#[test]
fn a_worker_that_keeps_giving_shards_back_waits_longer_each_time() {
    // One worker, busy again and again: each refusal pauses its awards
    // twice as long (500 ms, 1 s, 2 s, 4 s, ...), without a penalty, and
    // the first award's timers never cut a later award of the same shard
    // short.
    let spec = spec(10, 10, 1);
    let mut sim = Sim::new(&spec, 1, Config { enough_bids: 1, ..Config::default() });
    let w0 = sim.peer(0);
    sim.bid(0, 1);
    for pause in [500u64, 1_000, 2_000, 4_000, 8_000] {
        let award = sim.inbox.remove(&w0).expect("awarded").remove(0);
        sim.event(Event::Refused { from: w0, shard: award.shards[0].shard });
        sim.bid(0, 1);
        assert!(!sim.inbox.contains_key(&w0), "paused after a refusal");
        sim.advance(pause - 1);
        assert!(!sim.inbox.contains_key(&w0), "still paused just before {pause} ms");
        sim.advance(1);
        assert!(sim.inbox.contains_key(&w0), "awarded again once the {pause} ms pause is over");
    }
    assert!(sim.penalised.is_empty(), "giving work back is no fault: {:?}", sim.penalised);
    sim.run_all();
    check_output(&sim, &spec);
}
