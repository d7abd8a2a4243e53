//! The worker pool with the real models: results equal direct calls,
//! concurrent embedding requests are batched, a full queue refuses work,
//! callers that leave cancel their jobs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::models_dir;
use mycel_models::{ChatMessage, Device, Embedder, Generator, LoadOptions, Pool, PoolConfig, PoolError};
use mycel_protocol::{FinishReason, GenerateParams};

fn embedder() -> Arc<Embedder> {
    Arc::new(Embedder::load(&models_dir().join("all-minilm-l6-v2"), &Device::Cpu).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embeddings_are_batched_and_match_direct_calls() {
    let model = embedder();
    let texts: Vec<String> =
        (0..40).map(|i| format!("sentence number {i} about {}", "swarms ".repeat(i % 7))).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let direct = model.embed(&refs, 8).unwrap();
    let token_counts: Vec<u64> = model.encode(&refs).unwrap().iter().map(|e| e.len() as u64).collect();

    let pool = Pool::new(PoolConfig { replicas: 1, threads: 1, queue: 64, max_batch: 64, idle_threads: 1 }).unwrap();
    // Occupy the single replica, so the next 40 requests queue up together.
    let blocker = pool.embed(model.clone(), vec!["x ".repeat(200); 16]).unwrap();
    let receivers: Vec<_> = texts.iter().map(|t| pool.embed(model.clone(), vec![t.clone()]).unwrap()).collect();
    blocker.await.unwrap().unwrap();
    for ((rx, expected), tokens) in receivers.into_iter().zip(&direct).zip(token_counts) {
        let got = rx.await.unwrap().unwrap();
        let cos: f32 = got.vectors[0].iter().zip(expected).map(|(a, b)| a * b).sum();
        assert!(cos > 0.99999, "cosine {cos}");
        assert_eq!(got.input_tokens, tokens, "each job's own token count, out of the shared batch");
    }
    let load = pool.load();
    assert!(load.batches <= 3, "40 queued requests ran in {} batches", load.batches);
    assert_eq!((load.queued, load.active), (0, 0));
}

/// A small embedding that finds the pool idle runs on the idle threads
/// (same vectors); one that arrives while another job runs, or one too
/// large, keeps its replica's single thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_small_embedding_borrows_the_idle_threads() {
    let model = embedder();
    let prompt = "Write a function that returns the n-th Fibonacci number, iteratively.".to_string();
    let direct = model.embed(&[prompt.as_str()], 8).unwrap();
    let pool = Pool::new(PoolConfig { replicas: 2, threads: 1, queue: 8, max_batch: 1, idle_threads: 2 }).unwrap();

    let alone = pool.embed(model.clone(), vec![prompt.clone()]).unwrap().await.unwrap().unwrap();
    assert_eq!(pool.load().widened, 1, "the lone prompt ran on the idle threads");
    let cos: f32 = alone.vectors[0].iter().zip(&direct[0]).map(|(a, b)| a * b).sum();
    assert!(cos > 0.99999, "cosine {cos} to the single-threaded vectors");

    // Too many tokens to lend the cores for: its replica's thread only.
    let large = vec!["swarm ".repeat(120); 8];
    pool.embed(model.clone(), large.clone()).unwrap().await.unwrap().unwrap();
    assert_eq!(pool.load().widened, 1, "a large batch stays on one thread");

    // While a large job runs on one replica, a prompt on the other does not
    // borrow.
    let blocker = pool.embed(model.clone(), vec!["y ".repeat(250); 48]).unwrap();
    let started = std::time::Instant::now();
    while pool.load().active == 0 {
        assert!(started.elapsed().as_secs() < 30, "the replica never started the blocker");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let beside = pool.embed(model.clone(), vec![prompt]).unwrap().await.unwrap().unwrap();
    assert!(pool.load().active > 0, "the blocker should outlast one prompt");
    assert_eq!(pool.load().widened, 1, "a prompt beside other work keeps its own thread");
    assert_eq!(beside.vectors, alone.vectors, "split between threads by outputs, the sums are the same");
    blocker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_abandoned_jobs_are_skipped() {
    let model = embedder();
    let pool = Pool::new(PoolConfig { replicas: 1, threads: 1, queue: 2, max_batch: 1, idle_threads: 1 }).unwrap();
    let blocker = pool.embed(model.clone(), vec!["y ".repeat(250); 32]).unwrap();
    // Wait until the replica has taken the blocker off the queue.
    let started = std::time::Instant::now();
    while pool.load().active == 0 {
        assert!(started.elapsed().as_secs() < 30, "the replica never started the blocker");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let dropped = pool.embed(model.clone(), vec!["dropped".into()]).unwrap();
    let kept = pool.embed(model.clone(), vec!["kept".into()]).unwrap();
    assert_eq!(pool.embed(model.clone(), vec!["refused".into()]).unwrap_err(), PoolError::Busy(2));
    drop(dropped);
    blocker.await.unwrap().unwrap();
    assert_eq!(kept.await.unwrap().unwrap().vectors.len(), 1);
    assert_eq!(pool.load().cancelled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_streams_and_stops_when_the_caller_leaves() {
    let path = models_dir().join("smollm2-135m-instruct");
    let model = Arc::new(Generator::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap());
    let prompt =
        model.encode(&model.chat_prompt(&[ChatMessage::user("Write a long story about a ship.")]).unwrap()).unwrap();
    let pool = Pool::new(PoolConfig { replicas: 2, threads: 1, queue: 4, max_batch: 8, idle_threads: 1 }).unwrap();

    let params = GenerateParams { max_tokens: 24, ..GenerateParams::default() };
    let (mut stream, done) = pool.generate(model.clone(), prompt.clone(), params.clone()).unwrap();
    let mut streamed = String::new();
    while let Some(piece) = stream.recv().await {
        streamed.push_str(&piece);
    }
    let generation = done.await.unwrap().unwrap();
    assert_eq!(streamed, generation.text);
    assert_eq!((generation.tokens, generation.finish), (24, FinishReason::Length));
    // The same request run directly gives the same text (greedy).
    let direct = model.generate(&prompt, &params, &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(direct, generation);

    // A caller that reads one piece and leaves stops the work early.
    let long = GenerateParams { max_tokens: 2000, ..GenerateParams::default() };
    let (mut stream, done) = pool.generate(model, prompt, long).unwrap();
    stream.recv().await.unwrap();
    drop(stream);
    drop(done);
    let started = std::time::Instant::now();
    while pool.load().cancelled == 0 {
        assert!(started.elapsed().as_secs() < 30, "generation was not cancelled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The executor for each kind of work: a shard's items in, the output a
/// claim commits to out, with the text of each generated item streamed
/// while the model runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_by_kind_with_each_items_text_streamed() {
    use mycel_models::shard::{self, Model, ShardError};
    use mycel_protocol::{ShardOutput, Work};

    let pool = Pool::new(PoolConfig { replicas: 1, threads: 1, queue: 4, max_batch: 8, idle_threads: 1 }).unwrap();
    let embed = Work::Embed { texts: vec!["one".into(), "two words".into()] };
    let run = shard::run(&pool, Model::Embedder(embedder()), embed.clone(), 0, None).await.unwrap();
    let ShardOutput::Embeddings { dimensions, values } = &run.output else { panic!("vectors") };
    assert_eq!((*dimensions, values.len()), (384, 768));
    assert!(run.input_tokens >= 4);

    let path = models_dir().join("smollm2-135m-instruct");
    let generator = Arc::new(Generator::load(&path, &LoadOptions::default(), &Device::Cpu).unwrap());
    let params = GenerateParams { max_tokens: 6, ..GenerateParams::default() };
    let work = Work::Generate { prompts: vec!["Hi".into(), "Name a colour.".into()], params };
    let (streams, mut items) = tokio::sync::mpsc::channel::<(u64, tokio::sync::mpsc::Receiver<String>)>(1);
    let reader = tokio::spawn(async move {
        let mut texts = Vec::new();
        while let Some((item, mut stream)) = items.recv().await {
            let mut text = String::new();
            while let Some(piece) = stream.recv().await {
                text.push_str(&piece);
            }
            texts.push((item, text));
        }
        texts
    });
    let run = shard::run(&pool, Model::Generator(generator.clone()), work, 10, Some(streams)).await.unwrap();
    let streamed = reader.await.unwrap();
    let ShardOutput::Generations(answers) = &run.output else { panic!("answers") };
    assert_eq!(answers.len(), 2);
    assert_eq!(streamed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![10, 11], "items by their place in the task");
    for ((_, text), answer) in streamed.iter().zip(answers) {
        assert_eq!(text, &answer.text);
    }
    // Work of another kind than the model's is refused, not run.
    let wrong = shard::run(&pool, Model::Generator(generator), embed, 0, None).await;
    assert!(matches!(wrong, Err(ShardError::WrongModel)), "{wrong:?}");
}
