//! The OpenAI-compatible routes: `/v1/models`, `/v1/embeddings` and
//! `/v1/chat/completions`, so existing clients (the `openai` SDKs, curl
//! scripts, tools built on them) can point at any node.
//!
//! Every request becomes a swarm task through [`NodeView::submit`]: the
//! API never runs a model itself (the task may still land on this node if
//! it wins the auction). Errors use OpenAI's JSON shape and status codes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::types::{ChatTurnView, SubmitRequest, TaskEvent, TaskView};
use crate::{ApiError, NodeView};

/// Most choices (`n`) one chat request may ask for.
const MAX_CHOICES: u32 = 8;
/// Default answer length when the request names none.
const DEFAULT_MAX_TOKENS: u32 = 512;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(e: ApiError) -> Response {
    let (kind, code) = match &e {
        ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
        ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
        ApiError::BadRequest(_) => ("invalid_request_error", None),
        ApiError::TooLarge => ("invalid_request_error", Some("request_too_large")),
        ApiError::RateLimited(_) => ("rate_limit_error", Some("rate_limit_exceeded")),
        ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
        ApiError::NoCapablePeer(_) | ApiError::Unavailable(_) => ("service_unavailable", Some("no_capable_peer")),
        ApiError::Internal(_) => ("server_error", None),
    };
    let body = json!({ "error": { "message": e.to_string(), "type": kind, "param": null, "code": code } });
    (e.status(), Json(body)).into_response()
}

/// [`ApiError`] answered in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        error_response(self.0)
    }
}

/// Unknown `/v1/...` paths.
pub async fn not_found() -> OpenAiError {
    OpenAiError(ApiError::NotFound("no such endpoint".into()))
}

/// A JSON body, with every way of getting it wrong answered in OpenAI's
/// shape (413 over the size limit, 400 for anything malformed).
fn parse<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---- /v1/models --------------------------------------------------------

/// Model names that are not one model: routing and ensembles.
pub const VIRTUAL_MODELS: [&str; 4] = ["mycel/auto", "mycel/vote", "mycel/best-of", "mycel/moa"];

fn is_ensemble(model: Option<&str>) -> bool {
    matches!(model, Some("mycel/vote" | "mycel/best-of" | "mycel/moa"))
}

/// Every model the swarm offers now (this node's and its peers' adverts),
/// with how many nodes serve it.
pub async fn models<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<Value>, OpenAiError> {
    let status = node.status().await?;
    let peers = node.peers().await?;
    let mut owners: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let own = status.models.iter().map(|m| (m, true));
    let theirs = peers.iter().flat_map(|p| p.models.iter().map(|m| (m, false)));
    for (m, _) in own.chain(theirs) {
        let entry = owners.entry(m.id.clone()).or_insert_with(|| (m.kind.clone(), 0));
        entry.1 += 1;
    }
    let created = unix_now();
    let mut data: Vec<Value> = owners
        .into_iter()
        .map(|(id, (kind, count))| {
            json!({ "id": id, "object": "model", "created": created, "owned_by": "mycel",
                    "kind": kind, "owners": count })
        })
        .collect();
    // Ways of combining the generation models above, where there are some.
    if data.iter().any(|m| m["kind"] == "generation") {
        for id in VIRTUAL_MODELS {
            data.push(json!({ "id": id, "object": "model", "created": created, "owned_by": "mycel",
                              "kind": "generation", "owners": 0 }));
        }
    }
    Ok(Json(json!({ "object": "list", "data": data })))
}

// ---- tasks -------------------------------------------------------------

/// Cancels the task if the request goes away before it finished (the
/// client hung up), so the swarm stops working for nobody.
struct CancelOnDrop<N: NodeView> {
    node: Arc<N>,
    task: Option<String>,
}

impl<N: NodeView> CancelOnDrop<N> {
    fn disarm(&mut self) {
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
async fn run_task<N: NodeView>(node: &Arc<N>, request: SubmitRequest) -> Result<TaskView, ApiError> {
    let submitted = node.submit(request).await?;
    let mut guard = CancelOnDrop { node: node.clone(), task: Some(submitted.task.clone()) };
    let mut watch = node.watch(submitted.task.clone()).await?;
    let mut progress = watch.progress;
    while !progress.finished() {
        match watch.events.recv().await {
            Ok(TaskEvent::Progress(p)) => progress = p,
            Ok(TaskEvent::Text { .. }) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    guard.disarm();
    let view = node.task(submitted.task).await?;
    finished(view)
}

/// A finished task, or why it is not one.
fn finished(view: TaskView) -> Result<TaskView, ApiError> {
    match view.state.as_str() {
        "done" => Ok(view),
        _ => {
            let why = view.error.unwrap_or_else(|| "the task did not finish".into());
            Err(ApiError::NoCapablePeer(format!("the swarm could not complete the request: {why}")))
        }
    }
}

// ---- /v1/embeddings ----------------------------------------------------

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
}

/// `input` as texts: a string or an array of strings.
fn texts(input: Value) -> Result<Vec<String>, ApiError> {
    let tokens = || ApiError::BadRequest("token arrays are not supported as `input`: send the text".into());
    match input {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) if items.is_empty() => Err(ApiError::BadRequest("`input` is an empty array".into())),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Number(_) | Value::Array(_) => Err(tokens()),
                _ => Err(ApiError::BadRequest("`input` must be a string or an array of strings".into())),
            })
            .collect(),
        _ => Err(ApiError::BadRequest("`input` must be a string or an array of strings".into())),
    }
}

/// `POST /v1/embeddings`.
pub async fn embeddings<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let request: EmbeddingsRequest = parse(body)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("encoding_format {other:?}: float or base64")).into()),
    };
    let inputs = texts(request.input)?;
    let mut submit = SubmitRequest::new("embed", inputs);
    // Interactive requests: no spot-check copies (they would only add
    // latency to one-shard tasks); batch work through /api/v1 has them.
    submit.spot_check = Some(0.0);
    submit.model = request.model.filter(|m| !m.is_empty());
    let view = run_task(&node, submit).await?;
    let vectors = view.embeddings.unwrap_or_default();
    if let Some(want) = request.dimensions
        && vectors.first().is_some_and(|v| v.len() != want as usize)
    {
        // Checked after the fact: the width is the model's, known once it ran.
        let got = vectors.first().map_or(0, Vec::len);
        return Err(ApiError::BadRequest(format!("dimensions {want}: this model gives {got}")).into());
    }
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let tokens = view.input_tokens;
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": view.model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

// ---- /v1/chat/completions ----------------------------------------------

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Value,
}

fn turn(m: ChatMessageIn) -> Result<ChatTurnView, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => return Err(ApiError::BadRequest(format!("messages: role {other:?} is not supported"))),
    };
    let content = match m.content {
        Value::String(s) => s,
        Value::Null => String::new(),
        // Content parts: text only.
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(ApiError::BadRequest("messages: only text content parts are supported".into())),
                }
            }
            text
        }
        _ => return Err(ApiError::BadRequest("messages: content must be a string or text parts".into())),
    };
    Ok(ChatTurnView { role: role.into(), content })
}

fn stops(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::BadRequest("stop: strings only".into())),
            })
            .collect(),
        Some(_) => Err(ApiError::BadRequest("stop: a string or an array of strings".into())),
    }
}

fn finish_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "length",
        _ => "stop",
    }
}

/// `POST /v1/chat/completions`, streamed or not.
pub async fn chat<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, OpenAiError> {
    let request: ChatRequest = parse(body)?;
    if request.messages.is_empty() {
        return Err(ApiError::BadRequest("messages: at least one is needed".into()).into());
    }
    let n = request.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::BadRequest(format!("n {n} not in 1..={MAX_CHOICES}")).into());
    }
    let conversation: Vec<ChatTurnView> = request.messages.into_iter().map(turn).collect::<Result<_, _>>()?;
    let mut submit = SubmitRequest::new("chat", Vec::new());
    submit.spot_check = Some(0.0);
    submit.model = request.model.filter(|m| !m.is_empty());
    // An ensemble gives one answer: `n` is how many proposals it weighs.
    let n = if is_ensemble(submit.model.as_deref()) {
        if request.stream {
            return Err(ApiError::BadRequest(
                "stream: an ensemble's answer is chosen once every proposal is in; ask without stream".into(),
            )
            .into());
        }
        submit.n = request.n;
        1
    } else {
        n
    };
    submit.conversations = vec![conversation; n as usize];
    submit.max_tokens = Some(request.max_completion_tokens.or(request.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS));
    submit.temperature = request.temperature;
    submit.top_p = request.top_p;
    submit.seed = request.seed;
    submit.stop = stops(request.stop)?;
    submit.stream = request.stream;
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream_chat(node, submit, n, include_usage).await?.into_response());
    }
    let view = run_task(&node, submit).await?;
    let answers = view.generations.unwrap_or_default();
    let choices: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(index, g)| {
            json!({
                "index": index,
                "message": { "role": "assistant", "content": g.text },
                "finish_reason": finish_reason(&g.finish),
                "logprobs": null,
            })
        })
        .collect();
    let completion: u64 = answers.iter().map(|g| u64::from(g.tokens)).sum();
    // n copies of one conversation: the prompt counts once, as OpenAI does.
    let prompt = view.input_tokens / u64::from(n);
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", view.task),
        "object": "chat.completion",
        "created": unix_now(),
        "model": view.model,
        "choices": choices,
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion },
        "system_fingerprint": null,
    }))
    .into_response())
}

/// Streams a chat task: a role chunk per choice, content chunks as the
/// worker produces text, a finish chunk per choice, optionally usage, then
/// `[DONE]`. Text streamed ahead of the signed result is checked against
/// it at the end; anything the final result adds is sent then.
async fn stream_chat<N: NodeView>(
    node: Arc<N>,
    request: SubmitRequest,
    n: u32,
    include_usage: bool,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let submitted = node.submit(request).await?;
    let watch = node.watch(submitted.task.clone()).await?;
    let id = format!("chatcmpl-{}", submitted.task);
    let created = unix_now();
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        let mut guard = CancelOnDrop { node: node.clone(), task: Some(submitted.task.clone()) };
        let chunk = |model: &str, choices: Value, usage: Option<Value>| {
            let mut c = json!({ "id": id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": choices, "system_fingerprint": null });
            if let Some(u) = usage {
                c["usage"] = u;
            }
            SseEvent::default().data(c.to_string())
        };
        let model = node.task(submitted.task.clone()).await.map(|v| v.model).unwrap_or_default();
        for i in 0..n {
            let first = json!([{ "index": i, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]);
            if tx.send(chunk(&model, first, None)).await.is_err() {
                return;
            }
        }
        let mut sent: Vec<String> = vec![String::new(); n as usize];
        let mut progress = watch.progress;
        let mut events = watch.events;
        while !progress.finished() {
            match events.recv().await {
                Ok(TaskEvent::Progress(p)) => progress = p,
                Ok(TaskEvent::Text { item, text }) => {
                    let Some(so_far) = sent.get_mut(item as usize) else { continue };
                    so_far.push_str(&text);
                    let delta = json!([{ "index": item, "delta": { "content": text }, "finish_reason": null }]);
                    if tx.send(chunk(&model, delta, None)).await.is_err() {
                        return; // client gone: the guard cancels the task
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        guard.disarm();
        let view = match node.task(submitted.task.clone()).await.and_then(finished) {
            Ok(v) => v,
            Err(e) => {
                let body = json!({ "error": { "message": e.to_string(), "type": "service_unavailable",
                                              "param": null, "code": "task_failed" } });
                let _ = tx.send(SseEvent::default().data(body.to_string())).await;
                let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                return;
            }
        };
        let answers = view.generations.unwrap_or_default();
        for (i, g) in answers.iter().enumerate() {
            let streamed = sent.get(i).map_or("", String::as_str);
            // The signed result is the answer: send what the stream missed.
            // (If another worker's text was streamed, it cannot be taken
            // back; the final text then differs, which is logged.)
            match g.text.strip_prefix(streamed) {
                Some(rest) if !rest.is_empty() => {
                    let delta = json!([{ "index": i, "delta": { "content": rest }, "finish_reason": null }]);
                    let _ = tx.send(chunk(&view.model, delta, None)).await;
                }
                Some(_) => {}
                None => tracing::warn!(task = %view.task, choice = i, "streamed text differs from the signed result"),
            }
            let done = json!([{ "index": i, "delta": {}, "finish_reason": finish_reason(&g.finish) }]);
            let _ = tx.send(chunk(&view.model, done, None)).await;
        }
        if include_usage {
            let completion: u64 = answers.iter().map(|g| u64::from(g.tokens)).sum();
            let prompt = view.input_tokens / u64::from(n);
            let usage = json!({ "prompt_tokens": prompt, "completion_tokens": completion,
                                "total_tokens": prompt + completion });
            let _ = tx.send(chunk(&view.model, json!([]), Some(usage))).await;
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_strings_yes_tokens_no() {
        assert_eq!(texts(json!("a")).unwrap(), vec!["a"]);
        assert_eq!(texts(json!(["a", "b"])).unwrap(), vec!["a", "b"]);
        assert!(texts(json!([1, 2])).unwrap_err().to_string().contains("token arrays"));
        assert!(texts(json!([[1, 2]])).unwrap_err().to_string().contains("token arrays"));
        assert!(texts(json!([])).is_err());
        assert!(texts(json!({"a": 1})).is_err());
    }

    #[test]
    fn roles_and_content_parts() {
        let m = |role: &str, content: Value| ChatMessageIn { role: role.into(), content };
        assert_eq!(turn(m("developer", json!("be brief"))).unwrap().role, "system");
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(turn(m("user", parts)).unwrap().content, "ab");
        assert!(turn(m("tool", json!("x"))).is_err());
        assert!(turn(m("user", json!([{"type": "image_url", "image_url": {}}]))).is_err());
        assert_eq!(stops(Some(json!("\n"))).unwrap(), vec!["\n"]);
        assert!(stops(Some(json!(3))).is_err());
    }
}
