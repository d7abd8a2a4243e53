//! What the OpenAI and Ollama routes share: reading a request strictly
//! (every parameter honoured or refused by name, never dropped), and
//! running a task to its end or following it piece by piece.

use std::sync::Arc;

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};

use crate::types::{ModelView, SubmitRequest, TaskEvent, TaskView};
use crate::{ApiError, NodeView};

/// How a request parameter that mycel does not act on is treated.
pub(crate) enum Param {
    /// Read and acted on by the route.
    Honoured,
    /// Accepted only at the value that asks for nothing (for example a
    /// penalty of 0), which is what mycel does; refused otherwise, saying why.
    Neutral(fn(&Value) -> bool, &'static str),
    /// Refused whenever it is given (not null), saying why.
    Refused(&'static str),
}

/// A JSON body whose every member is in `known`: anything else, and any
/// known one at a value mycel cannot honour, is a 400 naming it. Nulls
/// count as absent.
pub(crate) fn strict<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    known: &[(&str, Param)],
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let Value::Object(members) = value else {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    };
    check(&members, known)?;
    serde_json::from_value(Value::Object(members)).map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
}

/// Checks each member of `members` against `known` (see [`strict`]).
pub(crate) fn check(members: &Map<String, Value>, known: &[(&str, Param)]) -> Result<(), ApiError> {
    for (name, value) in members {
        if value.is_null() {
            continue;
        }
        let refuse = |message: &str| Err(ApiError::Param { param: name.clone(), message: message.into() });
        match known.iter().find(|(k, _)| k == name).map(|(_, p)| p) {
            Some(Param::Honoured) => {}
            Some(Param::Neutral(accepts, _)) if accepts(value) => {}
            Some(Param::Neutral(_, why) | Param::Refused(why)) => return refuse(why),
            None => return refuse("unknown parameter"),
        }
    }
    Ok(())
}

/// `value` is the number 0.
pub(crate) fn is_zero(value: &Value) -> bool {
    value.as_f64() == Some(0.0)
}

/// `value` is `false`.
pub(crate) fn is_false(value: &Value) -> bool {
    value == &Value::Bool(false)
}

/// `value` is an empty object or array.
pub(crate) fn is_empty(value: &Value) -> bool {
    value.as_object().is_some_and(Map::is_empty) || value.as_array().is_some_and(Vec::is_empty)
}

/// Every model the swarm offers now (this node's and its peers' adverts),
/// by name, with how many nodes serve it.
pub(crate) async fn swarm_models<N: NodeView>(node: &N) -> Result<Vec<(ModelView, usize)>, ApiError> {
    let status = node.status().await?;
    let peers = node.peers().await?;
    let mut owners: std::collections::BTreeMap<String, (ModelView, usize)> = Default::default();
    for m in status.models.iter().chain(peers.iter().flat_map(|p| p.models.iter())) {
        owners.entry(m.id.clone()).or_insert_with(|| (m.clone(), 0)).1 += 1;
    }
    Ok(owners.into_values().collect())
}

/// A function call as a client sends it back in an assistant message
/// (OpenAI and Ollama alike): `{"function": {"name", "arguments"}}`, the
/// arguments a JSON object or text holding one.
#[derive(Debug, Deserialize)]
pub(crate) struct ToolCallIn {
    function: FunctionIn,
}

#[derive(Debug, Deserialize)]
struct FunctionIn {
    name: String,
    #[serde(default)]
    arguments: Value,
}

impl ToolCallIn {
    pub(crate) fn into_call(self) -> mycel_protocol::ToolCall {
        let arguments = match self.function.arguments {
            Value::String(s) => s,
            Value::Null => "{}".into(),
            other => other.to_string(),
        };
        mycel_protocol::ToolCall { name: self.function.name, arguments }
    }
}

/// An answer's per-token log probabilities as OpenAI and Ollama both give
/// them: token, log probability, bytes, and the top alternatives alike.
pub(crate) fn logprob_entries(g: &crate::types::GenerationView) -> Vec<Value> {
    let entry = |token: &str, logprob: f32| serde_json::json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    g.logprobs
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(&a.token, a.logprob)).collect();
            e
        })
        .collect()
}

/// Cancels the task if the request goes away before it finished (the
/// client hung up), so the swarm stops working for nobody.
pub(crate) struct CancelOnDrop<N: NodeView> {
    node: Arc<N>,
    task: Option<String>,
}

impl<N: NodeView> CancelOnDrop<N> {
    pub(crate) fn new(node: Arc<N>, task: String) -> Self {
        Self { node, task: Some(task) }
    }

    pub(crate) fn disarm(&mut self) {
        self.task = None;
    }
}

impl<N: NodeView> Drop for CancelOnDrop<N> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            let node = self.node.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = node.cancel(task).await;
                });
            }
        }
    }
}

/// Submits and waits for the result.
pub(crate) async fn run_task<N: NodeView>(node: &Arc<N>, request: SubmitRequest) -> Result<TaskView, ApiError> {
    let submitted = node.submit(request).await?;
    let mut guard = CancelOnDrop::new(node.clone(), submitted.task.clone());
    let mut watch = node.watch(submitted.task.clone()).await?;
    let mut progress = watch.progress;
    while !progress.finished() {
        match watch.events.recv().await {
            Ok(TaskEvent::Progress(p)) => progress = p,
            Ok(TaskEvent::Text { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    guard.disarm();
    let view = node.task(submitted.task).await?;
    finished(view)
}

/// A finished task, or why it is not one.
pub(crate) fn finished(view: TaskView) -> Result<TaskView, ApiError> {
    match view.state.as_str() {
        "done" => Ok(view),
        _ => {
            let why = view.error.unwrap_or_else(|| "the task did not finish".into());
            Err(ApiError::NoCapablePeer(format!("the swarm could not complete the request: {why}")))
        }
    }
}

/// What following a streamed task gives, in order: text as it is
/// produced, then the finished task (or why it failed).
#[derive(Debug)]
pub(crate) enum Followed {
    /// More text of answer `item`.
    Text { item: usize, text: String },
    /// The task finished; every answer's text has been sent in full
    /// before this (what the signed result adds to the streamed text is
    /// sent as a last piece).
    Done(Box<TaskView>),
    /// It did not finish.
    Failed(ApiError),
}

/// Submits a streamed generation task and follows it. The task's id and
/// model come back at once; dropping the receiver before the end cancels
/// the task.
pub(crate) async fn follow<N: NodeView>(
    node: Arc<N>,
    request: SubmitRequest,
    answers: usize,
) -> Result<(String, String, mpsc::Receiver<Followed>), ApiError> {
    let submitted = node.submit(request).await?;
    let watch = node.watch(submitted.task.clone()).await?;
    let model = node.task(submitted.task.clone()).await.map(|v| v.model).unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Followed>(256);
    let task = submitted.task.clone();
    tokio::spawn(async move {
        let mut guard = CancelOnDrop::new(node.clone(), task.clone());
        let mut sent: Vec<String> = vec![String::new(); answers];
        let mut progress = watch.progress;
        let mut events = watch.events;
        while !progress.finished() {
            match events.recv().await {
                Ok(TaskEvent::Progress(p)) => progress = p,
                Ok(TaskEvent::Text { item, text }) => {
                    let Some(so_far) = sent.get_mut(item as usize) else { continue };
                    so_far.push_str(&text);
                    if tx.send(Followed::Text { item: item as usize, text }).await.is_err() {
                        return; // client gone: the guard cancels the task
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        guard.disarm();
        let view = match node.task(task).await.and_then(finished) {
            Ok(view) => view,
            Err(e) => {
                let _ = tx.send(Followed::Failed(e)).await;
                return;
            }
        };
        for (item, g) in view.generations.iter().flatten().enumerate() {
            let streamed = sent.get(item).map_or("", String::as_str);
            // The signed result is the answer: send what the stream missed.
            // (If another worker's text was streamed, it cannot be taken
            // back; the final text then differs, which is logged.)
            match g.text.strip_prefix(streamed) {
                Some("") => {}
                Some(rest) => {
                    let _ = tx.send(Followed::Text { item, text: rest.to_string() }).await;
                }
                None => tracing::warn!(task = %view.task, item, "streamed text differs from the signed result"),
            }
        }
        let _ = tx.send(Followed::Done(Box::new(view))).await;
    });
    Ok((submitted.task, model, rx))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_member_is_honoured_or_refused_by_name() {
        let known = [
            ("model", Param::Honoured),
            ("presence_penalty", Param::Neutral(is_zero, "only 0 is supported")),
            ("audio", Param::Refused("audio output is not supported")),
        ];
        let ok = |v: Value| check(v.as_object().unwrap(), &known);
        assert!(ok(json!({"model": "x", "presence_penalty": 0, "audio": null})).is_ok());
        let refused = |v: Value| match ok(v) {
            Err(ApiError::Param { param, message }) => format!("{param}: {message}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(json!({"presence_penalty": 0.5})), "presence_penalty: only 0 is supported");
        assert_eq!(refused(json!({"audio": {}})), "audio: audio output is not supported");
        assert_eq!(refused(json!({"temprature": 1})), "temprature: unknown parameter");
    }
}
