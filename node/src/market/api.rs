//! The API's side of the market interpreter: requests mapped to
//! submissions, and what the API shows of tasks (views, progress events,
//! gauges). Presentation only: every decision is the machine's.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow};
use mycel_api::{ApiError, SubmitRequest, Submitted, TaskEvent, TaskSummary, TaskView, Watch};
use mycel_market::node::{Entropy, Input, Outcome, Submission, SubmitError};
use mycel_market::requester::Phase;
use mycel_net::now_ms;
use mycel_protocol::{
    ChatTurn, GenerateParams, ModelKind, OutputFormat, Role, ShardOutput, Split, TaskId, ToolChoice, Work,
};
use tokio::sync::broadcast;
use tracing::info;

use super::Driver;

/// Share of shards spot-checked when the request does not say.
const DEFAULT_SPOT_CHECK: f32 = 0.05;

/// Events buffered per watched task (a slow watcher skips progress).
const WATCH_BUFFER: usize = 1024;

impl Driver {
    pub(super) async fn submit(&mut self, request: SubmitRequest) -> Result<Submitted> {
        let submission = submission(request)?;
        let mut random = [0u8; 48];
        getrandom::fill(&mut random).map_err(|e| anyhow!("no randomness for a task: {e}"))?;
        let entropy = Entropy::from_bytes(random);
        let (task, actions) = self.market.submit(now_ms(), entropy, submission).map_err(|e| match e {
            SubmitError::ModelNotFound { .. } => ApiError::ModelNotFound(e.to_string()).into(),
            SubmitError::NoCapablePeer(_) => ApiError::NoCapablePeer(e.to_string()).into(),
            SubmitError::Invalid(_) => ApiError::BadRequest(e.to_string()).into(),
            SubmitError::Busy { .. } => ApiError::Unavailable(format!("{e} (--max-running-tasks)")).into(),
            other => anyhow::Error::from(other),
        })?;
        if let Some(t) = self.market.task(&task) {
            info!(%task, shards = t.requester.shard_count(), model = %t.model, "task submitted");
        }
        self.perform(actions);
        Ok(Submitted { task: task.to_string() })
    }

    /// Tells the task's watchers where it stands; forgets them once it
    /// finished.
    pub(super) fn notify(&mut self, task: TaskId) {
        if !self.watchers.contains_key(&task) {
            return;
        }
        let Some(summary) = self.summary(task) else {
            self.watchers.remove(&task);
            return;
        };
        let finished = summary.finished();
        if let Some(tx) = self.watchers.get(&task) {
            let _ = tx.send(TaskEvent::Progress(summary));
        }
        if finished {
            self.watchers.remove(&task);
        }
    }

    /// A task id the user typed, known to this node.
    pub(super) fn known(&self, id: &str) -> Result<TaskId> {
        let task = TaskId::from_hex(id)
            .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (32 hex digits)")))?;
        if self.market.task(&task).is_none() {
            return Err(ApiError::NotFound(format!("no task {id} on this node")).into());
        }
        Ok(task)
    }

    /// The task's state now, and a receiver for what happens next.
    pub(super) fn watch(&mut self, id: &str) -> Result<Watch> {
        let task = self.known(id)?;
        let progress = self.summary(task).context("task vanished")?;
        let events = if progress.finished() {
            // Nothing more will happen: a closed channel says so.
            broadcast::channel(1).1
        } else {
            self.watchers.entry(task).or_insert_with(|| broadcast::channel(WATCH_BUFFER).0).subscribe()
        };
        Ok(Watch { progress, events })
    }

    /// Gives up on a task: journaled as failed ("cancelled"); workers'
    /// late results are answered as late.
    pub(super) fn cancel(&mut self, id: &str) -> Result<TaskSummary> {
        let task = self.known(id)?;
        info!(task = %id, "task cancelled");
        self.input(Input::Cancel(task));
        self.summary(task).context("task vanished")
    }

    /// One line about a task.
    pub(super) fn summary(&self, task: TaskId) -> Option<TaskSummary> {
        let t = self.market.task(&task)?;
        let requester = &t.requester;
        let mut workers = BTreeMap::new();
        for peer in requester.executors().into_iter().flatten() {
            *workers.entry(peer.to_peer_id().to_string()).or_insert(0) += 1;
        }
        let (state, error) = match (&t.outcome, requester.phase()) {
            (Some(Outcome::Done { .. }), _) | (None, Phase::Done) => ("done", None),
            (Some(Outcome::Failed(why)), _) => ("failed", Some(why.clone())),
            (None, Phase::Failed) => ("failed", None),
            (None, _) => ("running", None),
        };
        Some(TaskSummary {
            task: task.to_string(),
            state: state.into(),
            shards: requester.shard_count(),
            shards_done: requester.shards_done(),
            kind: t.label.clone(),
            workers,
            peers_working: requester.peers_working(),
            error,
        })
    }

    /// Task and shard gauges from the tasks held.
    pub(super) fn refresh_metrics(&self) {
        let mut tasks: BTreeMap<&str, f64> = [("running", 0.0), ("done", 0.0), ("failed", 0.0)].into();
        let (mut shards_done, mut shards_open) = (0.0, 0.0);
        for (task, _) in self.market.tasks() {
            if let Some(s) = self.summary(*task) {
                let state = match s.state.as_str() {
                    "done" => "done",
                    "failed" => "failed",
                    _ => "running",
                };
                *tasks.entry(state).or_default() += 1.0;
                shards_done += s.shards_done as f64;
                shards_open += (s.shards - s.shards_done) as f64;
            }
        }
        for (state, n) in tasks {
            self.metrics.tasks.with(state).set(n);
        }
        self.metrics.shards.with("done").set(shards_done);
        self.metrics.shards.with("open").set(shards_open);
    }

    pub(super) fn view(&self, id: &str) -> Result<TaskView> {
        let task = self.known(id)?;
        let t = self.market.task(&task).with_context(|| format!("no task {id} on this node"))?;
        let requester = &t.requester;
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
            model: t.model.clone(),
            input_tokens: 0,
            peers_working: requester.peers_working(),
            auction_ms: t.auction_ms.clone(),
            route: None,
            ensemble: None,
            pipeline: None,
            search: None,
            classify: None,
        };
        match &t.outcome {
            Some(Outcome::Done { output, receipt, input_tokens }) => {
                view.input_tokens = *input_tokens;
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
                                    logprobs: g.logprobs.clone(),
                                    tool_calls: g.tool_calls.clone(),
                                })
                                .collect(),
                        )
                    }
                    _ => {}
                }
                view.receipt = mycel_protocol::Wire::encode(receipt.as_ref()).ok().map(hex::encode);
            }
            Some(Outcome::Failed(reason)) => {
                view.state = "failed".into();
                view.error = Some(reason.clone());
            }
            None => {}
        }
        Ok(view)
    }
}

/// The API's request as the market's submission: the request mapping for
/// each kind of work. Every error here is the client's (a 400).
fn submission(request: SubmitRequest) -> Result<Submission> {
    let Some(kind) = ModelKind::for_task(&request.kind) else {
        return Err(ApiError::BadRequest(format!(
            "unknown task kind {:?} (embed, generate, complete or chat)",
            request.kind
        ))
        .into());
    };
    if request.inputs.is_empty() && request.conversations.is_empty() {
        return Err(ApiError::BadRequest("no inputs".into()).into());
    }
    let generation_only = request.logprobs.is_some() || request.json || request.json_schema.is_some();
    if kind == ModelKind::Embedding && (generation_only || !request.tools.is_empty()) {
        return Err(ApiError::BadRequest("logprobs, json and tools are for generation".into()).into());
    }
    if !request.tools.is_empty() && request.kind != "chat" {
        return Err(ApiError::BadRequest("tools are for chat tasks".into()).into());
    }
    let tools = request
        .tools
        .iter()
        .map(|t| {
            let name = t.pointer("/function/name").and_then(|n| n.as_str());
            if t.get("type").and_then(|k| k.as_str()) != Some("function") || name.is_none_or(str::is_empty) {
                return Err(ApiError::BadRequest(
                    "tools: each must be {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                ));
            }
            Ok(t.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let params = GenerateParams {
        max_tokens: request.max_tokens.unwrap_or(128),
        temperature: request.temperature.unwrap_or(0.0),
        top_p: request.top_p.unwrap_or(1.0),
        seed: request.seed.unwrap_or(0),
        stop: request.stop.clone(),
        stream: request.stream,
        logprobs: request.logprobs,
        tool_choice: match request.tool_choice.as_deref() {
            None | Some("auto") => ToolChoice::Auto,
            Some(_) if request.tools.is_empty() => {
                return Err(ApiError::Param { param: "tool_choice".into(), message: "no tools offered".into() }.into());
            }
            Some("required") => ToolChoice::Required,
            Some(name) => {
                if !request.tools.iter().any(|t| t.pointer("/function/name").and_then(|n| n.as_str()) == Some(name)) {
                    return Err(ApiError::Param {
                        param: "tool_choice".into(),
                        message: format!("{name:?} is not among the tools"),
                    }
                    .into());
                }
                ToolChoice::Function(name.to_string())
            }
        },
        format: match (&request.json_schema, request.json) {
            (Some(_), true) => {
                return Err(ApiError::BadRequest("json and json_schema: ask for one".into()).into());
            }
            (Some(schema), false) => {
                let text = schema.to_string();
                mycel_models::json::Schema::root(&text)
                    .map_err(|e| ApiError::Param { param: "json_schema".into(), message: e })?;
                OutputFormat::JsonSchema(text)
            }
            (None, true) => OutputFormat::JsonObject,
            (None, false) => OutputFormat::Text,
        },
        tools,
    };
    let work = match request.kind.as_str() {
        "embed" => Work::Embed { texts: request.inputs },
        "generate" => Work::Generate { prompts: request.inputs, params },
        "complete" => Work::Complete { prompts: request.inputs, params },
        _ => {
            let conversations = request
                .conversations
                .into_iter()
                .map(|turns| turns.into_iter().map(chat_turn).collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>()?;
            Work::Chat { conversations, params }
        }
    };
    Ok(Submission {
        label: request.kind,
        kind,
        model: request.model,
        work,
        split: request.items_per_shard.map_or(Split::Auto, Split::ItemsPerShard),
        redundancy: request.redundancy,
        spot_check_permille: spot_check_permille(request.spot_check)?,
        then: Vec::new(),
    })
}

/// A request's spot-check share (0-1; the node's default when absent) in
/// thousandths, as task specs carry it.
fn spot_check_permille(share: Option<f32>) -> Result<u16, ApiError> {
    let share = share.unwrap_or(DEFAULT_SPOT_CHECK);
    if !(0.0..=1.0).contains(&share) {
        return Err(ApiError::BadRequest(format!("spot_check {share} not in 0..=1")));
    }
    Ok((share * 1000.0).round() as u16)
}

fn chat_turn(t: mycel_api::ChatTurnView) -> Result<ChatTurn> {
    let role = match t.role.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => return Err(ApiError::BadRequest(format!("unknown chat role {other:?}")).into()),
    };
    if !t.tool_calls.is_empty() && role != Role::Assistant {
        return Err(ApiError::BadRequest("only assistant messages carry tool calls".into()).into());
    }
    Ok(ChatTurn { role, content: t.content, tool_calls: t.tool_calls })
}
