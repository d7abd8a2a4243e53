//! Running ordinary market tasks from inside the node (ensembles,
//! pipelines, searches): submit, follow, read the result; and jobs, work
//! made of several tasks that the API follows like one.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use mycel_api::{ApiError, SubmitRequest, Submitted, TaskEvent, TaskSummary, TaskView, Watch};
use mycel_protocol::{JobReceipt, Keypair, Receipt, Signed, TaskId, Wire};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::market::Command;

/// Finished jobs remembered.
const KEEP: usize = 256;

/// Work made of several tasks (an ensemble, a summary): a view the API
/// shows like a task's, and its progress events.
pub struct Job {
    id: TaskId,
    kind: &'static str,
    view: Mutex<TaskView>,
    events: broadcast::Sender<TaskEvent>,
    /// The receipts of the tasks it ran, and where its answer is: what its
    /// own receipt will hold.
    proof: Mutex<Proof>,
}

#[derive(Default)]
struct Proof {
    tasks: Vec<Signed<Receipt>>,
    /// (index into `tasks`, item in that task's output).
    answer: Option<(u32, u64)>,
}

impl Job {
    /// Changes the view and tells watchers.
    pub fn update(&self, f: &mut dyn FnMut(&mut TaskView)) {
        let mut view = lock(&self.view);
        f(&mut view);
        let _ = self.events.send(TaskEvent::Progress(self.summary(&view)));
    }

    /// Keeps a finished task's receipt for the job's own receipt; its index
    /// there.
    pub fn receipted(&self, task: &TaskView) -> Result<u32, String> {
        let bytes = task.receipt.as_deref().map(hex::decode).ok_or("a task ended without a receipt")?;
        let receipt =
            bytes.ok().and_then(|b| Signed::<Receipt>::decode(&b).ok()).ok_or("a task's receipt does not decode")?;
        let mut proof = lock(&self.proof);
        proof.tasks.push(receipt);
        Ok(proof.tasks.len() as u32 - 1)
    }

    /// The job's answer is item `item` of task `task` (an index from
    /// [`Job::receipted`]), alone in its shard.
    pub fn answer_is(&self, task: u32, item: u64) {
        lock(&self.proof).answer = Some((task, item));
    }

    /// The job's receipt, signed by `key`, once it named its answer.
    fn seal(&self, key: &Keypair) -> Option<Result<Signed<JobReceipt>, String>> {
        let proof = lock(&self.proof);
        let (task, item) = proof.answer?;
        Some((|| {
            let receipt = proof.tasks.get(task as usize).ok_or("the answer's task has no receipt")?;
            let receipt = receipt.verify().map_err(|e| format!("a task's receipt: {e}"))?;
            let claim = receipt
                .shards
                .iter()
                .filter_map(|s| s.verify().ok())
                .find(|c| c.first_item == item && c.items == 1)
                .ok_or("the answer is not alone in a shard")?;
            let job = JobReceipt {
                job: self.id,
                kind: self.kind.to_string(),
                tasks: proof.tasks.clone(),
                answer_task: task,
                answer_item: item,
                answer: claim.output,
            };
            Signed::sign(key, &job).map_err(|e| format!("signing the job's receipt: {e}"))
        })())
    }

    /// Shows where the one task this job waits on stands, as the job's own
    /// progress.
    pub fn follow(&self, task: &TaskSummary) {
        self.update(&mut |view| {
            view.shards = task.shards;
            view.shards_done = task.shards_done;
            view.peers_working = task.peers_working;
        });
    }

    fn summary(&self, view: &TaskView) -> TaskSummary {
        TaskSummary {
            task: view.task.clone(),
            state: view.state.clone(),
            shards: view.shards,
            shards_done: view.shards_done,
            kind: self.kind.into(),
            workers: Default::default(),
            peers_working: 0,
            error: view.error.clone(),
        }
    }
}

/// The jobs this node runs.
pub struct Jobs {
    runs: Mutex<Runs>,
    /// Signs the jobs' receipts: the node's key, as for its tasks'.
    key: Arc<Keypair>,
}

/// Jobs by id, and their ids oldest first.
#[derive(Default)]
struct Runs {
    by_id: HashMap<String, Arc<Job>>,
    order: VecDeque<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Jobs {
    /// No jobs yet; their receipts signed with `key`.
    pub fn new(key: Keypair) -> Self {
        Self { runs: Mutex::default(), key: Arc::new(key) }
    }

    /// A running job's first view: `model` as the API shows it.
    pub fn blank_view(model: &str) -> TaskView {
        TaskView {
            task: String::new(),
            state: "running".into(),
            shards: 0,
            shards_done: 0,
            executors: Vec::new(),
            error: None,
            embeddings: None,
            generations: None,
            receipt: None,
            model: model.into(),
            input_tokens: 0,
            peers_working: 0,
            auction_ms: Vec::new(),
            route: None,
            ensemble: None,
            pipeline: None,
            search: None,
            classify: None,
        }
    }

    /// Runs `work` as a new job of `kind` starting from `view`; its id.
    pub fn spawn<F, Fut>(&self, kind: &'static str, mut view: TaskView, work: F) -> Result<Submitted, ApiError>
    where
        F: FnOnce(Arc<Job>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
        let task_id = TaskId(id);
        let id = hex::encode(id);
        view.task = id.clone();
        let job = Arc::new(Job {
            id: task_id,
            kind,
            view: Mutex::new(view),
            events: broadcast::channel(64).0,
            proof: Mutex::default(),
        });
        {
            let mut runs = lock(&self.runs);
            runs.by_id.insert(id.clone(), job.clone());
            runs.order.push_back(id.clone());
            while runs.order.len() > KEEP {
                if let Some(old) = runs.order.pop_front() {
                    runs.by_id.remove(&old);
                }
            }
        }
        let key = self.key.clone();
        tokio::spawn(async move {
            let mut result = work(job.clone()).await;
            let receipt = match (&result, job.seal(&key)) {
                (Ok(()), Some(Ok(signed))) => signed.encode().map(hex::encode).ok(),
                (Ok(()), Some(Err(why))) => {
                    result = Err(format!("the job's receipt: {why}"));
                    None
                }
                _ => None,
            };
            job.update(&mut |view| {
                if receipt.is_some() {
                    view.receipt = receipt.clone();
                }
                match &result {
                    Ok(()) => view.state = "done".into(),
                    Err(why) => {
                        view.state = "failed".into();
                        view.error = Some(why.clone());
                    }
                }
            });
        });
        Ok(Submitted { task: id })
    }

    /// A job's view, if `id` is one.
    pub fn view(&self, id: &str) -> Option<TaskView> {
        let job = lock(&self.runs).by_id.get(id).cloned()?;
        let view = lock(&job.view).clone();
        Some(view)
    }

    /// Follows a job, if `id` is one.
    pub fn watch(&self, id: &str) -> Option<Watch> {
        let job = lock(&self.runs).by_id.get(id).cloned()?;
        let view = lock(&job.view);
        let progress = job.summary(&view);
        // Finished: a closed channel says nothing more will come.
        let events = if progress.finished() { broadcast::channel(1).1 } else { job.events.subscribe() };
        Some(Watch { progress, events })
    }
}

/// Runs a task through the market to its end: its view.
pub async fn run_task(market: &mpsc::Sender<Command>, request: SubmitRequest) -> Result<TaskView, String> {
    run_task_with(market, request, &|_| {}).await
}

/// Told where a task stands each time it moves.
pub type Progress<'a> = dyn Fn(&TaskSummary) + Send + Sync + 'a;

/// [`run_task`], telling `progress` where the task stands as it moves.
pub async fn run_task_with(
    market: &mpsc::Sender<Command>,
    request: SubmitRequest,
    progress: &Progress<'_>,
) -> Result<TaskView, String> {
    async fn ask<T>(
        market: &mpsc::Sender<Command>,
        make: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Command,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        market.send(make(reply)).await.map_err(|_| "the market stopped".to_string())?;
        rx.await.map_err(|_| "the market stopped".to_string())?.map_err(|e| format!("{e:#}"))
    }
    let submitted = ask(market, |reply| Command::Submit { request, reply }).await?;
    let task = submitted.task;
    let mut watch = ask(market, |reply| Command::Watch { task: task.clone(), reply }).await?;
    let mut now = watch.progress;
    progress(&now);
    while !now.finished() {
        match watch.events.recv().await {
            Ok(TaskEvent::Progress(p)) => {
                progress(&p);
                now = p;
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    let view = ask(market, |reply| Command::Get { task: task.clone(), reply }).await?;
    if view.state != "done" {
        return Err(format!("stage task {task} {}: {}", view.state, view.error.unwrap_or_default()));
    }
    Ok(view)
}
