//! The worker pool: model work runs here, off the async runtime.
//!
//! The pool is `replicas` OS threads taking jobs from one bounded queue. A
//! full queue refuses new work at once ([`PoolError::Busy`]) rather than
//! letting it pile up: the market turns that into "no bid". Models are
//! shared between replicas (`Arc`); each generation gets its own KV cache.
//!
//! Size it from the hardware as replicas x threads, not one big pool: on
//! CPUs, single-threaded replicas on their own cores embed far more in
//! total than one model using every core (see [`PoolConfig::for_cores`]).
//! Each replica runs inside a rayon thread pool of its own, `threads`
//! strong: candle's parallel kernels (GEMM, softmax, layer norm) use the
//! rayon pool they are called from, so one replica's kernels never queue
//! behind another's in a shared global pool. (Measured: 2 single-threaded
//! replicas sharing rayon's global pool embedded 276-309 texts/s on this
//! project's 2-core machine, where two separate processes did 337.)
//! candle also reads two process-wide settings once: `RAYON_NUM_THREADS`
//! (how many parts its own matmuls split into) and `CANDLE_NUM_THREADS`
//! (its element-wise kernels' thread pool); set both to `threads` before
//! any model runs (the `mycel` command does).
//!
//! Embedding jobs are batched dynamically: a replica that picks up an
//! embedding job also takes the embedding jobs for the same model waiting
//! behind it, up to `max_batch` texts, and runs them as one batch.
//!
//! Idle cores are lent to latency: a small embedding batch (one request's
//! prompt, at most [`WIDEN_MAX_TOKENS`] tokens) that finds nothing else
//! running or queued runs on `idle_threads` threads instead of its
//! replica's `threads` (a pool of its own, shared by the replicas). That
//! is the routing step of `mycel/auto`, milliseconds in front of every
//! routed request; under load every job keeps its own threads, which is
//! what gives the throughput above. Another job arriving meanwhile shares
//! the cores for those few milliseconds.
//!
//! Cancellation: a job whose caller has gone (dropped its receiver) is
//! skipped; a generation stops at the next token once its stream is closed.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mycel_protocol::{GenerateParams, Generation};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ModelError, Result};
use crate::{Embedder, Generator};

/// How big the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Worker threads, each running one job at a time.
    pub replicas: usize,
    /// Compute threads per replica.
    pub threads: usize,
    /// Jobs waiting beyond those running; more are refused.
    pub queue: usize,
    /// Most texts in one embedding batch.
    pub max_batch: usize,
    /// Threads a small embedding batch may use when it is the pool's only
    /// work (never fewer than `threads`; equal: nothing is lent).
    pub idle_threads: usize,
}

impl PoolConfig {
    /// One single-threaded replica per core: measured on a 16-core machine,
    /// 8 single-threaded replicas embedded 869 sentences/s where one
    /// 16-thread model did 267.
    pub fn for_cores(cores: usize) -> Self {
        Self { replicas: cores.max(1), threads: 1, queue: 64, max_batch: 64, idle_threads: cores.max(1) }
    }
}

/// The most tokens an embedding batch may hold to run on the idle threads:
/// a few milliseconds of work, so a job arriving meanwhile waits for its
/// core no longer than that.
pub const WIDEN_MAX_TOKENS: u64 = 512;

/// Why the pool did not take a job.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// The queue is full.
    #[error("the worker pool is busy ({0} jobs waiting)")]
    Busy(usize),
    /// The pool has shut down.
    #[error("the worker pool has stopped")]
    Stopped,
}

/// How busy the pool is, for adverts and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolLoad {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs running.
    pub active: usize,
    /// Replicas.
    pub capacity: usize,
    /// Embedding batches run so far.
    pub batches: u64,
    /// Jobs dropped because their caller had gone.
    pub cancelled: u64,
    /// Embedding batches run on the idle threads (alone in the pool).
    pub widened: u64,
}

/// Texts per forward pass inside a batch (sorted by length first).
const EMBED_BATCH: usize = 32;

type Reply<T> = oneshot::Sender<Result<T>>;

/// What one embedding job gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read for these texts (after truncation), for usage
    /// accounting without tokenizing again.
    pub input_tokens: u64,
}

/// Texts of one embedding job and where its result goes.
type EmbedRequest = (Vec<String>, Reply<Embedded>);

enum Job {
    Embed {
        model: Arc<Embedder>,
        texts: Vec<String>,
        reply: Reply<Embedded>,
    },
    Generate {
        model: Arc<Generator>,
        prompt: Vec<u32>,
        params: GenerateParams,
        pieces: mpsc::Sender<String>,
        reply: Reply<Generation>,
    },
}

impl Job {
    fn abandoned(&self) -> bool {
        match self {
            Job::Embed { reply, .. } => reply.is_closed(),
            Job::Generate { reply, pieces, .. } => reply.is_closed() && pieces.is_closed(),
        }
    }
}

#[derive(Default)]
struct Counters {
    queued: AtomicUsize,
    active: AtomicUsize,
    batches: AtomicU64,
    cancelled: AtomicU64,
    widened: AtomicU64,
}

/// The worker pool. Dropping it lets running jobs finish and stops the
/// replicas.
pub struct Pool {
    sender: Option<SyncSender<Job>>,
    config: PoolConfig,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("config", &self.config).field("load", &self.load()).finish()
    }
}

impl Pool {
    /// Starts the replicas.
    pub fn new(config: PoolConfig) -> std::io::Result<Self> {
        let config = PoolConfig {
            replicas: config.replicas.max(1),
            threads: config.threads.max(1),
            max_batch: config.max_batch.max(1),
            idle_threads: config.idle_threads.max(config.threads).max(1),
            ..config
        };
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.queue);
        let receiver = Arc::new(Mutex::new(receiver));
        let counters = Arc::new(Counters::default());
        let wide = if config.idle_threads > config.threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(config.idle_threads)
                .thread_name(|t| format!("mycel-model-idle.{t}"))
                .build()
                .map_err(std::io::Error::other)?;
            Some(Arc::new(pool))
        } else {
            None
        };
        let threads = (0..config.replicas)
            .map(|i| {
                let receiver = receiver.clone();
                let counters = counters.clone();
                let wide = wide.clone();
                let compute = rayon::ThreadPoolBuilder::new()
                    .num_threads(config.threads)
                    .thread_name(move |t| format!("mycel-model-{i}.{t}"))
                    .build()
                    .map_err(std::io::Error::other)?;
                std::thread::Builder::new()
                    .name(format!("mycel-model-{i}"))
                    // The replica's loop runs on a thread of its own pool, so
                    // the kernels it calls split across that pool alone.
                    .spawn(move || compute.install(|| replica(&receiver, &counters, config.max_batch, wide.as_deref())))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { sender: Some(sender), config, counters, threads })
    }

    /// The pool's size.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// How busy it is now.
    pub fn load(&self) -> PoolLoad {
        PoolLoad {
            queued: self.counters.queued.load(Ordering::Relaxed),
            active: self.counters.active.load(Ordering::Relaxed),
            capacity: self.config.replicas,
            batches: self.counters.batches.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
            widened: self.counters.widened.load(Ordering::Relaxed),
        }
    }

    fn submit(&self, job: Job) -> Result<(), PoolError> {
        let sender = self.sender.as_ref().ok_or(PoolError::Stopped)?;
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        sender.try_send(job).map_err(|e| {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => PoolError::Busy(self.config.queue),
                TrySendError::Disconnected(_) => PoolError::Stopped,
            }
        })
    }

    /// Queues texts to embed; the vectors (in order) and the token count
    /// arrive on the receiver.
    /// Dropping the receiver cancels the job if it has not started.
    pub fn embed(
        &self,
        model: Arc<Embedder>,
        texts: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embedded>>, PoolError> {
        let (reply, receiver) = oneshot::channel();
        self.submit(Job::Embed { model, texts, reply })?;
        Ok(receiver)
    }

    /// Queues a generation. Text arrives on the first receiver as it is
    /// produced (bounded: a slow reader slows the model), the summary on
    /// the second. Dropping both cancels it, even mid-answer.
    #[allow(clippy::type_complexity)]
    pub fn generate(
        &self,
        model: Arc<Generator>,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<(mpsc::Receiver<String>, oneshot::Receiver<Result<Generation>>), PoolError> {
        let (pieces, stream) = mpsc::channel(64);
        let (reply, receiver) = oneshot::channel();
        self.submit(Job::Generate { model, prompt, params, pieces, reply })?;
        Ok((stream, receiver))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.sender.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn replica(receiver: &Mutex<Receiver<Job>>, counters: &Counters, max_batch: usize, wide: Option<&rayon::ThreadPool>) {
    let mut local: VecDeque<Job> = VecDeque::new();
    loop {
        let job = match local.pop_front() {
            Some(job) => job,
            None => {
                let Ok(guard) = receiver.lock() else { return };
                let Ok(job) = guard.recv() else { return };
                // Batch: take the embedding jobs for the same model queued
                // right behind this one.
                if let Job::Embed { model, texts, .. } = &job {
                    let mut size = texts.len();
                    while size < max_batch {
                        let Ok(next) = guard.try_recv() else { break };
                        let same = matches!(&next, Job::Embed { model: m, .. } if Arc::ptr_eq(m, model));
                        size += if let Job::Embed { texts, .. } = &next { texts.len() } else { 0 };
                        local.push_back(next);
                        if !same {
                            break;
                        }
                    }
                }
                job
            }
        };
        counters.queued.fetch_sub(1, Ordering::Relaxed);
        if job.abandoned() {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.active.fetch_add(1, Ordering::Relaxed);
        match job {
            Job::Embed { model, texts, reply } => {
                let mut batch = vec![(texts, reply)];
                while let Some(Job::Embed { model: m, .. }) = local.front()
                    && Arc::ptr_eq(m, &model)
                {
                    if let Some(Job::Embed { texts, reply, .. }) = local.pop_front() {
                        counters.queued.fetch_sub(1, Ordering::Relaxed);
                        if reply.is_closed() {
                            counters.cancelled.fetch_add(1, Ordering::Relaxed);
                        } else {
                            batch.push((texts, reply));
                        }
                    }
                }
                run_embed_batch(&model, batch, counters, wide);
            }
            Job::Generate { model, prompt, params, pieces, reply } => {
                let result = model.generate(&prompt, &params, &mut |piece| {
                    if pieces.blocking_send(piece.to_string()).is_err() && reply.is_closed() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
                if matches!(result, Err(ModelError::Cancelled)) {
                    counters.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                // The job is over before its caller hears so: a caller that
                // reads the load right after its answer sees it finished.
                counters.active.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send(result);
            }
        }
    }
}

fn run_embed_batch(model: &Embedder, batch: Vec<EmbedRequest>, counters: &Counters, wide: Option<&rayon::ThreadPool>) {
    counters.batches.fetch_add(1, Ordering::Relaxed);
    let all: Vec<&str> = batch.iter().flat_map(|(texts, _)| texts.iter().map(String::as_str)).collect();
    let result = model.encode(&all).and_then(|encodings| {
        let tokens: Vec<u64> = encodings.iter().map(|e| e.len() as u64).collect();
        // Alone: this replica is the only one running and nothing waits.
        let alone = counters.active.load(Ordering::Relaxed) == 1 && counters.queued.load(Ordering::Relaxed) == 0;
        let vectors = match wide {
            Some(wide) if alone && tokens.iter().sum::<u64>() <= WIDEN_MAX_TOKENS => {
                counters.widened.fetch_add(1, Ordering::Relaxed);
                wide.install(|| model.embed_encoded(&encodings, EMBED_BATCH))?
            }
            _ => model.embed_encoded(&encodings, EMBED_BATCH)?,
        };
        Ok((vectors, tokens))
    });
    counters.active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((mut vectors, mut tokens)) => {
            for (texts, reply) in batch.into_iter().rev() {
                let vectors = vectors.split_off(vectors.len() - texts.len());
                let input_tokens = tokens.split_off(tokens.len() - texts.len()).iter().sum();
                let _ = reply.send(Ok(Embedded { vectors, input_tokens }));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for (_, reply) in batch {
                let _ = reply.send(Err(ModelError::Backend(message.clone())));
            }
        }
    }
}
