//! The OpenAI-compatible routes: `/v1/models`, `/v1/embeddings`,
//! `/v1/chat/completions` and `/v1/completions`, so existing clients (the
//! `openai` SDKs, LangChain, curl scripts, tools built on them) can point
//! at any node.
//!
//! Every request becomes a swarm task through [`NodeView::submit`]: the
//! API never runs a model itself (the task may still land on this node if
//! it wins the auction). Errors use OpenAI's JSON shape and status codes.
//! Every documented parameter is either honoured or refused with a 400
//! that names it (the tables below say which, and why); none is dropped.

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

use crate::compat::{self, Followed, Param, ToolCallIn, is_empty, is_false, is_zero, run_task};
use crate::types::{ChatTurnView, GenerationView, SubmitRequest, TaskView};
use crate::{ApiError, NodeView};

/// Most choices (`n`) one chat request may ask for.
const MAX_CHOICES: u32 = 8;
/// Default answer length when the request names none.
const DEFAULT_MAX_TOKENS: u32 = 512;
/// Default length of a legacy completion (OpenAI's).
const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// Most alternatives per token the legacy completions API reports.
const MAX_LEGACY_LOGPROBS: u8 = 5;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(e: ApiError) -> Response {
    let (kind, code) = match &e {
        ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
        ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
        ApiError::BadRequest(_) => ("invalid_request_error", None),
        ApiError::Param { .. } => ("invalid_request_error", Some("unsupported_parameter")),
        ApiError::TooLarge => ("invalid_request_error", Some("request_too_large")),
        ApiError::RateLimited(_) => ("rate_limit_error", Some("rate_limit_exceeded")),
        ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
        ApiError::NoCapablePeer(_) | ApiError::Unavailable(_) => ("service_unavailable", Some("no_capable_peer")),
        ApiError::Internal(_) => ("server_error", None),
    };
    let param = match &e {
        ApiError::Param { param, .. } => Some(param.clone()),
        _ => None,
    };
    let body = json!({ "error": { "message": e.to_string(), "type": kind, "param": param, "code": code } });
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
    let created = unix_now();
    let mut data: Vec<Value> = compat::swarm_models(node.as_ref())
        .await?
        .into_iter()
        .map(|(m, owners)| {
            json!({ "id": m.id, "object": "model", "created": created, "owned_by": "mycel",
                    "kind": m.kind, "owners": owners })
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

// ---- parameters every route shares --------------------------------------

/// Labels a client attaches to a request for its own bookkeeping: written
/// to the node's log with the request, which is all they ask for.
const LABELS: [&str; 4] = ["user", "safety_identifier", "prompt_cache_key", "metadata"];

fn log_labels(route: &str, labels: &Value) {
    if labels.as_object().is_some_and(|l| !l.is_empty()) {
        tracing::info!(route, labels = %labels, "request labels");
    }
}

/// The labels of a request body, for [`log_labels`].
fn labels(members: &serde_json::Map<String, Value>) -> Value {
    Value::Object(
        members
            .iter()
            .filter(|(k, v)| LABELS.contains(&k.as_str()) && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

fn penalty() -> Param {
    Param::Neutral(is_zero, "only 0 is supported: mycel samples without repetition penalties")
}

fn no_logit_bias() -> Param {
    Param::Neutral(is_empty, "logit biases are not supported")
}

fn label_params() -> impl Iterator<Item = (&'static str, Param)> {
    LABELS.into_iter().map(|l| (l, Param::Honoured))
}

/// Reads a body strictly ([`compat::strict`]) and logs its labels.
fn read<T: for<'de> Deserialize<'de>>(
    route: &str,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    known: &[(&str, Param)],
) -> Result<T, ApiError> {
    let value: Value = compat::strict(body, known)?;
    if let Value::Object(members) = &value {
        log_labels(route, &labels(members));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("invalid request: {e}")))
}

// ---- /v1/embeddings ----------------------------------------------------

fn embeddings_params() -> Vec<(&'static str, Param)> {
    let mut p = vec![
        ("input", Param::Honoured),
        ("model", Param::Honoured),
        ("encoding_format", Param::Honoured),
        ("dimensions", Param::Honoured),
    ];
    p.extend(label_params());
    p
}

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
pub(crate) fn texts(input: Value) -> Result<Vec<String>, ApiError> {
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
    let request: EmbeddingsRequest = read("/v1/embeddings", body, &embeddings_params())?;
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
        return Err(ApiError::Param {
            param: "dimensions".into(),
            message: format!("{want} asked; this model gives {got} (shortening vectors is not supported)"),
        }
        .into());
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

/// Every chat parameter OpenAI documents, and what mycel does with it.
fn chat_params() -> Vec<(&'static str, Param)> {
    let mut p = vec![
        ("messages", Param::Honoured),
        ("model", Param::Honoured),
        ("max_tokens", Param::Honoured),
        ("max_completion_tokens", Param::Honoured),
        ("temperature", Param::Honoured),
        ("top_p", Param::Honoured),
        ("seed", Param::Honoured),
        ("stop", Param::Honoured),
        ("n", Param::Honoured),
        ("stream", Param::Honoured),
        ("stream_options", Param::Honoured),
        ("logprobs", Param::Honoured),
        ("top_logprobs", Param::Honoured),
        ("response_format", Param::Honoured),
        ("tools", Param::Honoured),
        ("tool_choice", Param::Honoured),
        ("parallel_tool_calls", Param::Honoured),
        ("frequency_penalty", penalty()),
        ("presence_penalty", penalty()),
        ("logit_bias", no_logit_bias()),
        ("store", Param::Neutral(is_false, "mycel does not store completions for later use")),
        ("service_tier", Param::Neutral(|v| v == "auto" || v == "default", "only \"auto\" and \"default\"")),
        ("modalities", Param::Neutral(|v| v == &json!(["text"]), "text output only")),
        ("audio", Param::Refused("audio output is not supported")),
        ("prediction", Param::Refused("predicted outputs are not supported")),
        ("reasoning_effort", Param::Refused("no reasoning model is served")),
        ("verbosity", Param::Refused("not supported")),
        ("web_search_options", Param::Refused("web search is not available")),
        ("functions", Param::Refused("deprecated by OpenAI and not supported: use `tools`")),
        ("function_call", Param::Refused("deprecated by OpenAI and not supported: use `tool_choice`")),
        // Non-OpenAI: mycel's ensembles and router.
        ("members", Param::Honoured),
        ("judge", Param::Honoured),
        ("cost_weight", Param::Honoured),
    ];
    p.extend(label_params());
    p
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u8>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    members: Option<Vec<String>>,
    #[serde(default)]
    judge: Option<String>,
    #[serde(default)]
    cost_weight: Option<f32>,
}

/// What chat and legacy completions share.
#[derive(Debug, Deserialize)]
struct Sampling {
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
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

impl Sampling {
    fn apply(&self, submit: &mut SubmitRequest, default_tokens: u32) -> Result<(), ApiError> {
        submit.max_tokens = Some(self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_tokens));
        submit.temperature = self.temperature;
        submit.top_p = self.top_p;
        submit.seed = self.seed;
        submit.stop = stops(self.stop.clone())?;
        submit.stream = self.stream();
        if self.stream_options.as_ref().is_some_and(|o| o.include_obfuscation == Some(true)) {
            return Err(ApiError::Param {
                param: "stream_options.include_obfuscation".into(),
                message: "stream obfuscation is not supported".into(),
            });
        }
        Ok(())
    }

    fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    #[serde(default)]
    include_obfuscation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// OpenAI's `response_format.json_schema`: the schema under `schema`;
/// `strict` may say true (what mycel always is) or false.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchemaFormat {
    #[allow(dead_code)]
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    schema: Value,
    #[serde(default)]
    #[allow(dead_code)]
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallIn>>,
}

fn turn(m: ChatMessageIn) -> Result<ChatTurnView, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
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
    let tool_calls = m.tool_calls.unwrap_or_default().into_iter().map(ToolCallIn::into_call).collect();
    Ok(ChatTurnView { role: role.into(), content, tool_calls })
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

fn finish_reason(g: &GenerationView) -> &'static str {
    if !g.tool_calls.is_empty() {
        return "tool_calls";
    }
    match g.finish.as_str() {
        "length" => "length",
        _ => "stop",
    }
}

/// A chat answer's log probabilities in OpenAI's shape.
fn chat_logprobs(g: &GenerationView) -> Value {
    json!({ "content": compat::logprob_entries(g), "refusal": null })
}

/// A chat answer's calls in OpenAI's shape; ids are the task's and the
/// answer's, so they are unique and stable.
fn tool_calls(task: &str, choice: usize, g: &GenerationView, streamed: bool) -> Vec<Value> {
    g.tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": format!("call_{}_{choice}_{i}", &task[..task.len().min(12)]),
                "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            });
            if streamed {
                call["index"] = json!(i);
            }
            call
        })
        .collect()
}

/// `POST /v1/chat/completions`, streamed or not.
pub async fn chat<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, OpenAiError> {
    let request: ChatRequest = read("/v1/chat/completions", body, &chat_params())?;
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
    request.sampling.apply(&mut submit, DEFAULT_MAX_TOKENS)?;
    submit.logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, Some(top)) if top > 0 => {
            return Err(
                ApiError::Param { param: "top_logprobs".into(), message: "needs `logprobs: true`".into() }.into()
            );
        }
        _ => None,
    };
    match request.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => submit.json = true,
        Some(ResponseFormat::JsonSchema { json_schema }) => submit.json_schema = Some(json_schema.schema),
    }
    let tools = request.tools.unwrap_or_default();
    let named = request.tool_choice.as_ref().and_then(|c| match c.pointer("/function/name") {
        Some(Value::String(name)) if c.get("type").and_then(Value::as_str) == Some("function") => Some(name.clone()),
        _ => None,
    });
    (submit.tools, submit.tool_choice) = match (request.tool_choice.as_ref().and_then(Value::as_str), named) {
        (None, None) if request.tool_choice.is_some() => {
            return Err(ApiError::Param {
                param: "tool_choice".into(),
                message: "\"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
                    .into(),
            }
            .into());
        }
        (None | Some("auto"), None) => (tools, None),
        (Some("none"), _) => (Vec::new(), None),
        (Some("required"), _) => (tools, Some("required".to_string())),
        (Some(other), _) => {
            return Err(
                ApiError::Param { param: "tool_choice".into(), message: format!("{other:?} is not a choice") }.into()
            );
        }
        (None, Some(name)) => (tools, Some(name)),
    };
    let one_call = request.parallel_tool_calls == Some(false);
    submit.members = request.members.unwrap_or_default();
    submit.judge = request.judge;
    submit.cost_weight = request.cost_weight;
    // An ensemble gives one answer: `n` is how many proposals it weighs.
    let n = if is_ensemble(submit.model.as_deref()) {
        if submit.stream {
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
    if submit.stream {
        let include_usage = request.sampling.include_usage();
        return Ok(stream_chat(node, submit, n, include_usage, one_call).await?);
    }
    let view = run_task(&node, submit).await?;
    let mut answers = view.generations.clone().unwrap_or_default();
    if one_call {
        answers.iter_mut().for_each(|g| g.tool_calls.truncate(1));
    }
    let choices: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(index, g)| {
            let mut message = json!({ "role": "assistant", "content": g.text });
            if !g.tool_calls.is_empty() {
                message["tool_calls"] = json!(tool_calls(&view.task, index, g, false));
                if g.text.is_empty() {
                    message["content"] = Value::Null;
                }
            }
            let logprobs = if g.logprobs.is_empty() { Value::Null } else { chat_logprobs(g) };
            json!({ "index": index, "message": message, "finish_reason": finish_reason(g), "logprobs": logprobs })
        })
        .collect();
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", view.task),
        "object": "chat.completion",
        "created": unix_now(),
        "model": view.model,
        "choices": choices,
        "usage": usage(&view, &answers, n),
        "system_fingerprint": null,
    }))
    .into_response())
}

/// Token counts: n copies of one prompt count it once, as OpenAI does.
fn usage(view: &TaskView, answers: &[GenerationView], copies: u32) -> Value {
    let completion: u64 = answers.iter().map(|g| u64::from(g.tokens)).sum();
    let prompt = view.input_tokens / u64::from(copies.max(1));
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// Server-sent events from a channel, kept alive while the swarm works.
fn sse(rx: tokio::sync::mpsc::Receiver<SseEvent>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn stream_error(e: &ApiError) -> SseEvent {
    let body = json!({ "error": { "message": e.to_string(), "type": "service_unavailable",
                                  "param": null, "code": "task_failed" } });
    SseEvent::default().data(body.to_string())
}

/// Streams a chat task: a role chunk per choice, content chunks as the
/// worker produces text, then per choice its tool calls, log probabilities
/// and finish, optionally usage, then `[DONE]`. Text streamed ahead of the
/// signed result is checked against it at the end; anything the final
/// result adds is sent then.
async fn stream_chat<N: NodeView>(
    node: Arc<N>,
    request: SubmitRequest,
    n: u32,
    include_usage: bool,
    one_call: bool,
) -> Result<Response, ApiError> {
    let (task, model, mut followed) = compat::follow(node, request, n as usize).await?;
    let id = format!("chatcmpl-{task}");
    let created = unix_now();
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        let chunk = |model: &str, choices: Value, usage: Option<Value>| {
            let mut c = json!({ "id": id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": choices, "system_fingerprint": null });
            if let Some(u) = usage {
                c["usage"] = u;
            }
            SseEvent::default().data(c.to_string())
        };
        for i in 0..n {
            let first = json!([{ "index": i, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]);
            if tx.send(chunk(&model, first, None)).await.is_err() {
                return;
            }
        }
        while let Some(event) = followed.recv().await {
            match event {
                Followed::Text { item, text } => {
                    let delta = json!([{ "index": item, "delta": { "content": text }, "finish_reason": null }]);
                    if tx.send(chunk(&model, delta, None)).await.is_err() {
                        return; // client gone: dropping `followed` cancels the task
                    }
                }
                Followed::Failed(e) => {
                    let _ = tx.send(stream_error(&e)).await;
                    break;
                }
                Followed::Done(view) => {
                    let mut answers = view.generations.clone().unwrap_or_default();
                    if one_call {
                        answers.iter_mut().for_each(|g| g.tool_calls.truncate(1));
                    }
                    for (i, g) in answers.iter().enumerate() {
                        if !g.tool_calls.is_empty() {
                            let calls = tool_calls(&view.task, i, g, true);
                            let delta =
                                json!([{ "index": i, "delta": { "tool_calls": calls }, "finish_reason": null }]);
                            let _ = tx.send(chunk(&view.model, delta, None)).await;
                        }
                        let logprobs = if g.logprobs.is_empty() { Value::Null } else { chat_logprobs(g) };
                        let done = json!([{ "index": i, "delta": {}, "logprobs": logprobs,
                                            "finish_reason": finish_reason(g) }]);
                        let _ = tx.send(chunk(&view.model, done, None)).await;
                    }
                    if include_usage {
                        let _ = tx.send(chunk(&view.model, json!([]), Some(usage(&view, &answers, n)))).await;
                    }
                    break;
                }
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    Ok(sse(rx))
}

// ---- /v1/completions (legacy) ------------------------------------------

/// Every legacy completions parameter OpenAI documents, and what mycel
/// does with it.
fn completion_params() -> Vec<(&'static str, Param)> {
    let mut p = vec![
        ("model", Param::Honoured),
        ("prompt", Param::Honoured),
        ("max_tokens", Param::Honoured),
        ("temperature", Param::Honoured),
        ("top_p", Param::Honoured),
        ("seed", Param::Honoured),
        ("stop", Param::Honoured),
        ("n", Param::Honoured),
        ("stream", Param::Honoured),
        ("stream_options", Param::Honoured),
        ("logprobs", Param::Honoured),
        ("best_of", Param::Honoured),
        ("echo", Param::Neutral(is_false, "echoing the prompt is not supported")),
        ("suffix", Param::Neutral(|v| v == "", "insertion (a suffix) is not supported")),
        ("frequency_penalty", penalty()),
        ("presence_penalty", penalty()),
        ("logit_bias", no_logit_bias()),
    ];
    p.extend(label_params());
    p
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    logprobs: Option<u8>,
}

/// A legacy completion's log probabilities in OpenAI's shape.
fn completion_logprobs(g: &GenerationView) -> Value {
    let mut offset = 0usize;
    let mut text_offset = Vec::new();
    for t in &g.logprobs {
        text_offset.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": g.logprobs.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": g.logprobs.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": g.logprobs.iter().map(|t| {
            t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// `POST /v1/completions`: each prompt continued as it is (no chat
/// template), `n` times.
pub async fn completions<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, OpenAiError> {
    let request: CompletionRequest = read("/v1/completions", body, &completion_params())?;
    if is_ensemble(request.model.as_deref()) || request.model.as_deref() == Some("mycel/auto") {
        return Err(ApiError::Param {
            param: "model".into(),
            message: "routing and ensembles answer chats: use /v1/chat/completions".into(),
        }
        .into());
    }
    let prompts =
        texts(request.prompt).map_err(|e| ApiError::Param { param: "prompt".into(), message: e.to_string() })?;
    let n = request.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::BadRequest(format!("n {n} not in 1..={MAX_CHOICES}")).into());
    }
    if request.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::Param {
            param: "best_of".into(),
            message: "only equal to n (every candidate is returned; none is chosen server-side)".into(),
        }
        .into());
    }
    if request.logprobs.is_some_and(|k| k > MAX_LEGACY_LOGPROBS) {
        return Err(
            ApiError::Param { param: "logprobs".into(), message: format!("at most {MAX_LEGACY_LOGPROBS}") }.into()
        );
    }
    // Choice `p * n + j` is prompt p's j-th completion.
    let inputs: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n as usize)).collect();
    let choices = inputs.len();
    let mut submit = SubmitRequest::new("complete", inputs);
    submit.spot_check = Some(0.0);
    submit.model = request.model.filter(|m| !m.is_empty());
    request.sampling.apply(&mut submit, DEFAULT_COMPLETION_TOKENS)?;
    submit.logprobs = request.logprobs;
    let created = unix_now();
    if submit.stream {
        let include_usage = request.sampling.include_usage();
        let (task, model, mut followed) = compat::follow(node, submit, choices).await?;
        let id = format!("cmpl-{task}");
        let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
        tokio::spawn(async move {
            let chunk = |model: &str, choices: Value| {
                let c = json!({ "id": id, "object": "text_completion", "created": created, "model": model,
                                "choices": choices });
                SseEvent::default().data(c.to_string())
            };
            while let Some(event) = followed.recv().await {
                match event {
                    Followed::Text { item, text } => {
                        let c = json!([{ "index": item, "text": text, "logprobs": null, "finish_reason": null }]);
                        if tx.send(chunk(&model, c)).await.is_err() {
                            return;
                        }
                    }
                    Followed::Failed(e) => {
                        let _ = tx.send(stream_error(&e)).await;
                        break;
                    }
                    Followed::Done(view) => {
                        let answers = view.generations.clone().unwrap_or_default();
                        for (i, g) in answers.iter().enumerate() {
                            let logprobs = if g.logprobs.is_empty() { Value::Null } else { completion_logprobs(g) };
                            let c = json!([{ "index": i, "text": "", "logprobs": logprobs,
                                             "finish_reason": finish_reason(g) }]);
                            let _ = tx.send(chunk(&view.model, c)).await;
                        }
                        if include_usage {
                            let mut c = json!({ "id": id, "object": "text_completion", "created": created,
                                                "model": view.model, "choices": [] });
                            c["usage"] = usage(&view, &answers, n);
                            let _ = tx.send(SseEvent::default().data(c.to_string())).await;
                        }
                        break;
                    }
                }
            }
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        });
        return Ok(sse(rx));
    }
    let view = run_task(&node, submit).await?;
    let answers = view.generations.clone().unwrap_or_default();
    let out: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(index, g)| {
            let logprobs = if g.logprobs.is_empty() { Value::Null } else { completion_logprobs(g) };
            json!({ "index": index, "text": g.text, "logprobs": logprobs, "finish_reason": finish_reason(g) })
        })
        .collect();
    Ok(Json(json!({
        "id": format!("cmpl-{}", view.task),
        "object": "text_completion",
        "created": created,
        "model": view.model,
        "choices": out,
        "usage": usage(&view, &answers, n),
    }))
    .into_response())
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
        let m = |role: &str, content: Value| ChatMessageIn { role: role.into(), content, tool_calls: None };
        assert_eq!(turn(m("developer", json!("be brief"))).unwrap().role, "system");
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(turn(m("user", parts)).unwrap().content, "ab");
        assert_eq!(turn(m("tool", json!("22 C"))).unwrap().role, "tool");
        assert!(turn(m("function", json!("x"))).is_err());
        let call: ChatMessageIn = serde_json::from_value(json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}))
        .unwrap();
        let t = turn(call).unwrap();
        assert_eq!((t.tool_calls[0].name.as_str(), t.tool_calls[0].arguments.as_str()), ("f", "{\"a\":1}"));
        assert!(turn(m("user", json!([{"type": "image_url", "image_url": {}}]))).is_err());
        assert_eq!(stops(Some(json!("\n"))).unwrap(), vec!["\n"]);
        assert!(stops(Some(json!(3))).is_err());
    }
}
