//! Journal cost of a big task: bytes written and time spent journaling per
//! shard result, as the node's market machine asks for them, committed to
//! a real sled store (durable, as the node commits).
//!
//! One node requests a 10,000-text embedding task (384-dimension vectors)
//! in shards of 100 texts and works it itself; every `Journal` action is
//! committed as the node would.
//!
//!     cargo bench -p mycel-market --bench journal

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mycel_market::node::{Action, Entropy, Input, Submission, Write};
use mycel_market::{Node, NodeConfig};
use mycel_protocol::rpc::Market;
use mycel_protocol::{Digest, Keypair, ModelAdvert, ModelKind, Quantization, ShardOutput, Split, Throughput, Work};
use mycel_store::{Batch, SledStore, Store, Tree};

const TEXTS: usize = 10_000;
const PER_SHARD: u32 = 100;
const DIM: usize = 384;

#[allow(clippy::unwrap_used, clippy::expect_used)]
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let me = key.public();
    let mut node = Node::new(key, NodeConfig::default());
    let model = ModelAdvert {
        id: "minilm".into(),
        kind: ModelKind::Embedding,
        weights: Digest::of(b"minilm"),
        dimensions: DIM as u32,
        context: 256,
        quantization: Quantization::F32,
        throughput: Throughput { embeddings_per_s: 300.0, ..Throughput::default() },
        profile: Default::default(),
        tools: false,
    };
    let mut now = 1_000_000u64;
    let mut pending: VecDeque<Action> =
        node.handle(now, Input::ModelsReady { models: vec![model], capacity: 4 }).into();
    let submission = Submission {
        label: "embed".into(),
        kind: ModelKind::Embedding,
        model: None,
        work: Work::Embed { texts: (0..TEXTS).map(|i| format!("text number {i} with a few more words")).collect() },
        split: Split::ItemsPerShard(PER_SHARD),
        redundancy: 1,
        spot_check_permille: 0,
        then: Vec::new(),
    };
    let (task, actions) = node.submit(now, Entropy::from_bytes([7; 48]), submission).unwrap();
    pending.extend(actions);

    let (mut bytes, mut commits, mut spent, mut results) = (0usize, 0usize, Duration::ZERO, 0usize);
    let started = Instant::now();
    loop {
        let Some(action) = pending.pop_front() else {
            match node.next_timer_ms() {
                Some(at) if node.task(&task).and_then(|t| t.outcome.as_ref()).is_none() => {
                    now = now.max(at);
                    pending.extend(node.handle(now, Input::Tick));
                    continue;
                }
                _ => break,
            }
        };
        match action {
            Action::Journal(writes) => {
                let timer = Instant::now();
                let mut batch = Batch::new();
                for w in writes {
                    match w {
                        Write::Task { key, value } => {
                            bytes += value.len();
                            batch.put(Tree::Tasks, key, value);
                        }
                        Write::Forget { key } => {
                            batch.delete(Tree::Tasks, key);
                        }
                        Write::Reputation(peer, value) => {
                            bytes += value.len();
                            batch.put(Tree::Reputation, peer.to_bytes().to_vec(), value);
                        }
                    }
                }
                store.commit(&batch).unwrap();
                spent += timer.elapsed();
                commits += 1;
            }
            Action::Send { to, message } if to == me => {
                if matches!(message, Market::Result(_)) {
                    results += 1;
                }
                now += 1;
                pending.extend(node.handle(now, Input::Message { from: me, message }));
            }
            Action::Execute(job) => {
                let values = vec![0.05f32; job.work.items() * DIM];
                let output = Ok(ShardOutput::Embeddings { dimensions: DIM as u32, values });
                now += 1;
                pending.extend(node.handle(now, Input::JobDone { job, output, compute_ms: 1, input_tokens: 1 }));
            }
            _ => {}
        }
    }
    let done = node.task(&task).and_then(|t| t.outcome.as_ref());
    assert!(matches!(done, Some(mycel_market::node::Outcome::Done { .. })), "{done:?}");
    let per = |x: f64| x / results.max(1) as f64;
    println!("10,000 texts, {results} shard results, {commits} journal commits");
    println!("journal bytes per shard result: {:.0} ({:.1} MB in all)", per(bytes as f64), bytes as f64 / 1e6);
    println!(
        "journal time per shard result: {:.2} ms ({:.2} s in all, of {:.2} s)",
        per(spent.as_secs_f64() * 1e3),
        spent.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
