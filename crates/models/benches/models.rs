//! Model speed on this machine, for BENCHMARKS.md (scripts/bench-models.sh
//! runs it beside ONNX Runtime and llama.cpp on the same models).
//!
//!     CANDLE_NUM_THREADS=2 RAYON_NUM_THREADS=2 cargo bench -p mycel-models --bench models -- MODELS_DIR
//!
//! (candle splits matmuls by `RAYON_NUM_THREADS` and element-wise kernels
//! by `CANDLE_NUM_THREADS`: set both.) `MYCEL_BENCH_REPLICAS=N` sizes the
//! pool line; `MYCEL_BENCH_EMBED_ONLY=1` stops after the embeddings
//! (`MYCEL_BENCH_EMBED=short|long` and `MYCEL_BENCH_BATCH=1` narrow them),
//! `MYCEL_BENCH_GENERATE_ONLY=1` skips them, `MYCEL_BENCH_WEIGHTS=q4_1`
//! (or `q8_0`, `q8_0_candle`) runs one generation row only (for profiles),
//! `MYCEL_BENCH_GGUF=qwen2.5-coder-0.5b-instruct` measures that model
//! instead of SmolLM2 (one row, `default`: as a node loads it).
//!
//! Prints one JSON object: embeddings/s at batch 1 and 32 for short (~20
//! token) and 128-token texts; prefill and decode tokens/s (after the Q8_0
//! conversion on mycel's kernels and on candle's, and with the Q4_1 weights
//! as shipped, on candle's); peak RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mycel_models::bench::short_texts;
use mycel_models::{ChatMessage, Device, Embedder, Generator, LoadOptions, Pool, PoolConfig};

/// Runs `f` repeatedly for at least `min` (after one warm-up), returns
/// items per second.
fn rate(items: usize, min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed() < min || runs < 2 {
        f();
        runs += 1;
    }
    (items * runs) as f64 / started.elapsed().as_secs_f64()
}

fn long_texts(n: usize) -> Vec<String> {
    // About 128 tokens each.
    (0..n).map(|i| format!("Document {i}. {}", short_texts(7)[i % 7..].join(" ").repeat(2))).collect()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Tokens of context for the long-context generation figures.
const LONG_CONTEXT: usize = 1024;

fn main() {
    mycel_models::heap::keep_freed_memory();
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-models"));
    let min = Duration::from_secs(3);
    let mut out = serde_json::Map::new();
    let threads = candle_core::utils::get_num_threads();
    out.insert("threads".into(), threads.into());

    if std::env::var_os("MYCEL_BENCH_GENERATE_ONLY").is_none() {
        embeddings(&dir, min, &mut out);
    }
    if std::env::var_os("MYCEL_BENCH_EMBED_ONLY").is_some() {
        println!("{}", serde_json::Value::Object(out));
        return;
    }

    let model = std::env::var("MYCEL_BENCH_GGUF").unwrap_or_else(|_| "smollm2-135m-instruct".into());
    let rows: &[(&str, bool, bool)] = if model == "smollm2-135m-instruct" {
        &[("q8_0", true, true), ("q8_0_candle", true, false), ("q4_1", false, true)]
    } else {
        &[("default", false, true)]
    };
    out.insert("generation_model".into(), model.clone().into());
    for &(name, requantize, own_kernels) in rows {
        if std::env::var("MYCEL_BENCH_WEIGHTS").is_ok_and(|only| only != name) {
            continue;
        }
        let options = LoadOptions { requantize_q4_1: requantize, own_kernels };
        let generator = Generator::load(&dir.join(&model), &options, &Device::Cpu).unwrap();
        out.insert(format!("engine_{name}"), format!("{:?}", generator.engine()).into());
        let prompt = generator.chat_prompt(&[ChatMessage::user(long_texts(1)[0].clone())]).unwrap();
        let ids = generator.encode(&prompt).unwrap();
        let ids = &ids[..ids.len().min(128)];
        let prefill = rate(ids.len(), min, || {
            generator.session().feed(ids).unwrap();
        });
        let steps = 64;
        let decode = {
            let mut session = generator.session();
            session.feed(ids).unwrap();
            let started = Instant::now();
            for i in 0..steps {
                session.feed(&[ids[i % ids.len()]]).unwrap();
            }
            steps as f64 / started.elapsed().as_secs_f64()
        };
        out.insert(format!("prefill_{name}_tokens_per_s"), prefill.into());
        out.insert(format!("decode_{name}_tokens_per_s"), decode.into());
        out.insert("prefill_prompt_tokens".into(), ids.len().into());
        eprintln!("generate {name}: prefill {prefill:.1} tok/s ({} tokens), decode {decode:.1} tok/s", ids.len());

        // A long context, where attention's share grows: the prompt's ids
        // repeated to LONG_CONTEXT tokens, fed at once, then decode steps.
        let context: Vec<u32> = ids.iter().cycle().take(LONG_CONTEXT).copied().collect();
        let mut session = generator.session();
        let started = Instant::now();
        session.feed(&context).unwrap();
        let prefill_long = context.len() as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..steps {
            session.feed(&[ids[i % ids.len()]]).unwrap();
        }
        let decode_long = steps as f64 / started.elapsed().as_secs_f64();
        out.insert(format!("prefill_long_{name}_tokens_per_s"), prefill_long.into());
        out.insert(format!("decode_long_{name}_tokens_per_s"), decode_long.into());
        out.insert("long_context_tokens".into(), LONG_CONTEXT.into());
        eprintln!(
            "generate {name}, {LONG_CONTEXT}-token context: prefill {prefill_long:.1} tok/s, then decode {decode_long:.1} tok/s"
        );
    }
    out.insert("peak_rss_mib".into(), peak_rss_mib().into());
    println!("{}", serde_json::Value::Object(out));
}

/// Embeddings/s, batch 1 and 32, short and long texts, and through the pool.
fn embeddings(dir: &std::path::Path, min: Duration, out: &mut serde_json::Map<String, serde_json::Value>) {
    let embedder = Embedder::load(&dir.join("all-minilm-l6-v2"), &Device::Cpu).unwrap();
    let short = short_texts(32);
    let long = long_texts(32);
    let tokens = |texts: &[String]| {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        embedder.encode(&refs).unwrap().iter().map(|e| e.len()).sum::<usize>() as f64 / texts.len() as f64
    };
    out.insert("short_tokens".into(), tokens(&short).into());
    out.insert("long_tokens".into(), tokens(&long).into());
    // `MYCEL_BENCH_EMBED=long` (or `short`) measures those texts only,
    // at batch 1 only with `MYCEL_BENCH_BATCH=1` (for profiles).
    let only = std::env::var("MYCEL_BENCH_EMBED").ok();
    let batch_1_only = std::env::var("MYCEL_BENCH_BATCH").is_ok_and(|b| b == "1");
    for (name, texts) in [("short", &short), ("long", &long)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let b1 = rate(8, min, || {
            for t in &refs[..8] {
                embedder.embed(&[t], 1).unwrap();
            }
        });
        out.insert(format!("embed_{name}_b1_per_s"), b1.into());
        if batch_1_only {
            eprintln!("embed {name}: batch 1 {b1:.1}/s");
            continue;
        }
        let b32 = rate(32, min, || {
            embedder.embed(&refs, 32).unwrap();
        });
        out.insert(format!("embed_{name}_b32_per_s"), b32.into());
        eprintln!("embed {name}: batch 1 {b1:.1}/s, batch 32 {b32:.1}/s");
    }
    if only.is_some() || batch_1_only {
        return;
    }
    // The node's way: the worker pool with N replicas (run with
    // RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 for single-threaded replicas), each job a batch of
    // 32 short texts.
    let replicas: usize = std::env::var("MYCEL_BENCH_REPLICAS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let pool = Pool::new(PoolConfig {
        replicas,
        threads: candle_core::utils::get_num_threads(),
        queue: 64,
        max_batch: 32,
        idle_threads: 1,
    })
    .unwrap();
    let shared = Arc::new(embedder);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // Four jobs per replica in flight, so no replica waits for another's
    // batch to finish before it gets its next one (as in a busy node).
    let jobs = 4 * replicas;
    let per_s = rate(32 * jobs, min, || {
        let receivers: Vec<_> = (0..jobs).map(|_| pool.embed(shared.clone(), short.clone()).unwrap()).collect();
        for rx in receivers {
            runtime.block_on(rx).unwrap().unwrap();
        }
    });
    out.insert("pool_replicas".into(), replicas.into());
    out.insert("embed_short_b32_pool_per_s".into(), per_s.into());
    eprintln!("embed short through the pool, {replicas} replicas: {per_s:.1}/s");
    drop(pool);
    drop(shared);
    out.insert("embed_peak_rss_mib".into(), peak_rss_mib().into());
}
