//! The Ollama API beside the OpenAI one: `/api/tags`, `/api/show`,
//! `/api/ps`, `/api/version`, `/api/chat`, `/api/generate` and
//! `/api/embed`, streaming as newline-delimited JSON, so chat front ends and
//! editor plugins built for Ollama work with a node unchanged.
//!
//! As with the OpenAI routes, each request is a swarm task, and every
//! parameter and option is honoured or refused with a 400 naming it.
//! Errors are Ollama's shape: `{"error": "..."}`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::compat::{self, Followed, Param, ToolCallIn, is_false, is_zero, run_task};
use crate::types::{ChatTurnView, GenerationView, ModelView, SubmitRequest, TaskView};
use crate::{ApiError, NodeView};

/// The Ollama API version these routes follow.
const OLLAMA_VERSION: &str = "0.6.3";
/// Answer length when `num_predict` is not given (Ollama's "until done",
/// bounded).
const DEFAULT_MAX_TOKENS: u32 = 512;

type Body_ = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// The routes, under `/api/`.
pub fn router<N: NodeView>() -> Router<Arc<N>> {
    Router::new()
        .route("/api/version", get(version))
        .route("/api/tags", get(tags::<N>))
        .route("/api/ps", get(tags::<N>))
        .route("/api/show", post(show::<N>))
        .route("/api/chat", post(chat::<N>))
        .route("/api/generate", post(generate::<N>))
        .route("/api/embed", post(embed::<N>))
}

/// An error in Ollama's shape.
#[derive(Debug)]
pub struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        (self.0.status(), Json(json!({ "error": self.0.to_string() }))).into_response()
    }
}

/// The time now as RFC 3339 in UTC, as Ollama writes `created_at`.
fn now() -> String {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(since.as_millis() as i64)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds: the civil
/// date from days since the epoch (Howard Hinnant's algorithm).
fn rfc3339(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

fn details(m: &ModelView) -> Value {
    json!({
        "format": if m.kind == "generation" { "gguf" } else { "safetensors" },
        "family": m.kind,
        "families": [m.kind],
        "parameter_size": "",
        "quantization_level": m.quantization.to_uppercase(),
    })
}

fn model_entry(m: &ModelView) -> Value {
    json!({
        "name": m.id, "model": m.id, "modified_at": now(), "size": 0, "digest": m.weights,
        "details": details(m),
    })
}

/// `GET /api/tags` (and `/api/ps`: every model is loaded somewhere while
/// it is advertised): the models the swarm serves.
async fn tags<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<Value>, OllamaError> {
    let models: Vec<Value> = compat::swarm_models(node.as_ref()).await?.iter().map(|(m, _)| model_entry(m)).collect();
    Ok(Json(json!({ "models": models })))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    #[serde(alias = "name")]
    model: String,
}

/// `POST /api/show`: one model's details and capabilities.
async fn show<N: NodeView>(State(node): State<Arc<N>>, body: Body_) -> Result<Json<Value>, OllamaError> {
    let known = [("model", Param::Honoured), ("name", Param::Honoured), ("verbose", Param::Honoured)];
    let request: ShowRequest = compat::strict(body, &known)?;
    let (m, _) = find(node.as_ref(), &request.model).await?;
    let mut capabilities = vec![if m.kind == "generation" { "completion" } else { "embedding" }];
    if m.tools {
        capabilities.push("tools");
    }
    Ok(Json(json!({
        "modelfile": "", "parameters": "", "template": "",
        "details": details(&m),
        "model_info": { "general.architecture": m.kind, "context_length": m.context,
                        "embedding_length": m.dimensions },
        "capabilities": capabilities,
        "modified_at": now(),
    })))
}

async fn find<N: NodeView>(node: &N, name: &str) -> Result<(ModelView, usize), ApiError> {
    let base = name.strip_suffix(":latest").unwrap_or(name);
    compat::swarm_models(node)
        .await?
        .into_iter()
        .find(|(m, _)| m.id.eq_ignore_ascii_case(base))
        .ok_or_else(|| ApiError::ModelNotFound(format!("model {name:?} not found in the swarm")))
}

// ---- options -------------------------------------------------------------

/// Ollama's `options`, and what mycel does with each.
fn option_params() -> Vec<(&'static str, Param)> {
    let runtime = "the swarm's workers decide how they run their models";
    let one = |v: &Value| v.as_f64() == Some(1.0);
    vec![
        ("temperature", Param::Honoured),
        ("top_p", Param::Honoured),
        ("seed", Param::Honoured),
        ("num_predict", Param::Honoured),
        ("stop", Param::Honoured),
        ("presence_penalty", Param::Neutral(is_zero, "only 0 is supported")),
        ("frequency_penalty", Param::Neutral(is_zero, "only 0 is supported")),
        ("repeat_penalty", Param::Neutral(one, "only 1 is supported (no repetition penalty)")),
        ("tfs_z", Param::Neutral(one, "only 1 is supported")),
        ("typical_p", Param::Neutral(one, "only 1 is supported")),
        ("min_p", Param::Neutral(is_zero, "only 0 is supported")),
        ("mirostat", Param::Neutral(is_zero, "only 0 (off) is supported")),
        ("top_k", Param::Refused("not supported: use top_p")),
        ("mirostat_tau", Param::Refused("mirostat is not supported")),
        ("mirostat_eta", Param::Refused("mirostat is not supported")),
        ("penalize_newline", Param::Refused("not supported")),
        ("repeat_last_n", Param::Refused("repetition penalties are not supported")),
        ("num_keep", Param::Refused("not supported")),
        ("num_ctx", Param::Refused("each model's context is its own (see /api/show)")),
        ("num_batch", Param::Refused(runtime)),
        ("num_gpu", Param::Refused(runtime)),
        ("main_gpu", Param::Refused(runtime)),
        ("num_thread", Param::Refused(runtime)),
        ("numa", Param::Refused(runtime)),
        ("low_vram", Param::Refused(runtime)),
        ("f16_kv", Param::Refused(runtime)),
        ("use_mmap", Param::Refused(runtime)),
        ("use_mlock", Param::Refused(runtime)),
        ("vocab_only", Param::Refused(runtime)),
        ("logits_all", Param::Refused(runtime)),
        ("embedding_only", Param::Refused(runtime)),
    ]
}

#[derive(Debug, Default, Deserialize)]
struct Options {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
}

/// The request's `options`, checked member by member.
fn options(value: Option<Value>) -> Result<Options, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(Options::default()) };
    let Value::Object(members) = &value else {
        return Err(ApiError::Param { param: "options".into(), message: "must be an object".into() });
    };
    compat::check(members, &option_params()).map_err(|e| match e {
        ApiError::Param { param, message } => ApiError::Param { param: format!("options.{param}"), message },
        other => other,
    })?;
    serde_json::from_value(value).map_err(|e| ApiError::Param { param: "options".into(), message: e.to_string() })
}

/// What `/api/chat` and `/api/generate` share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u8>,
}

fn common_params() -> Vec<(&'static str, Param)> {
    vec![
        ("model", Param::Honoured),
        ("stream", Param::Honoured),
        ("format", Param::Honoured),
        ("options", Param::Honoured),
        ("logprobs", Param::Honoured),
        ("top_logprobs", Param::Honoured),
        // Every advertised model stays loaded while its node runs.
        ("keep_alive", Param::Honoured),
        ("think", Param::Neutral(is_false, "no thinking model is served")),
        ("images", Param::Neutral(compat::is_empty, "images are not supported")),
    ]
}

impl Common {
    fn apply(self, submit: &mut SubmitRequest) -> Result<bool, ApiError> {
        let options = options(self.options)?;
        submit.model = Some(self.model);
        submit.spot_check = Some(0.0);
        submit.temperature = options.temperature;
        submit.top_p = options.top_p;
        submit.seed = options.seed;
        submit.stop = options.stop.unwrap_or_default();
        submit.max_tokens = Some(match options.num_predict {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
            Some(n) => {
                return Err(ApiError::Param {
                    param: "options.num_predict".into(),
                    message: format!("{n}: give a positive number of tokens"),
                });
            }
        });
        match self.format {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::String(s)) if s == "json" => submit.json = true,
            Some(schema @ Value::Object(_)) => submit.json_schema = Some(schema),
            Some(_) => {
                return Err(ApiError::Param {
                    param: "format".into(),
                    message: "\"json\" or a JSON Schema (an object)".into(),
                });
            }
        }
        submit.logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Some(top.unwrap_or(0)),
            _ => None,
        };
        // Ollama streams unless told not to.
        let stream = self.stream.unwrap_or(true);
        submit.stream = stream;
        Ok(stream)
    }
}

/// The closing fields of an answer: why it stopped, counts and durations
/// (nanoseconds, as Ollama gives them).
fn closing(view: &TaskView, g: &GenerationView, started: Instant) -> Value {
    let total = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut out = json!({
        "done": true,
        "done_reason": if g.finish == "length" { "length" } else { "stop" },
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": view.input_tokens,
        "eval_count": g.tokens,
    });
    if !g.logprobs.is_empty() {
        out["logprobs"] = compat::logprob_entries(g).into();
    }
    out
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Newline-delimited JSON from a followed task: `line` shapes a piece of
/// text, `last` the closing line.
fn ndjson(
    mut followed: tokio::sync::mpsc::Receiver<Followed>,
    line: impl Fn(&str) -> Value + Send + 'static,
    last: impl Fn(&TaskView, &GenerationView) -> Value + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(256);
    tokio::spawn(async move {
        let send = |v: Value| {
            let mut bytes = v.to_string().into_bytes();
            bytes.push(b'\n');
            Ok(Bytes::from(bytes))
        };
        while let Some(event) = followed.recv().await {
            let out = match event {
                Followed::Text { text, .. } => line(&text),
                Followed::Failed(e) => json!({ "error": e.to_string() }),
                Followed::Done(view) => {
                    let g = view.generations.iter().flatten().next().cloned();
                    let g = g.unwrap_or_else(|| GenerationView::text("", 0, "stop"));
                    last(&view, &g)
                }
            };
            if tx.send(send(out)).await.is_err() {
                return; // client gone: dropping `followed` cancels the task
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

// ---- /api/chat -----------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    messages: Vec<MessageIn>,
    #[serde(default)]
    tools: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallIn>>,
}

fn turn(m: MessageIn) -> Result<ChatTurnView, ApiError> {
    if m.images.is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::Param { param: "messages.images".into(), message: "images are not supported".into() });
    }
    if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
        return Err(ApiError::Param { param: "messages.role".into(), message: format!("{:?} is not a role", m.role) });
    }
    let tool_calls = m.tool_calls.unwrap_or_default().into_iter().map(ToolCallIn::into_call).collect();
    Ok(ChatTurnView { role: m.role, content: m.content.unwrap_or_default(), tool_calls })
}

/// An answer's calls in Ollama's shape (arguments as an object).
fn calls(g: &GenerationView) -> Vec<Value> {
    g.tool_calls
        .iter()
        .map(|c| {
            let arguments: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({ "function": { "name": c.name, "arguments": arguments } })
        })
        .collect()
}

/// `POST /api/chat`.
async fn chat<N: NodeView>(State(node): State<Arc<N>>, body: Body_) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let mut known = common_params();
    known.extend([("messages", Param::Honoured), ("tools", Param::Honoured)]);
    let request: ChatRequest = compat::strict(body, &known)?;
    let model = request.common.model.clone();
    let mut submit = SubmitRequest::new("chat", Vec::new());
    let stream = request.common.apply(&mut submit)?;
    if request.messages.is_empty() {
        // Ollama's way of loading a model: nothing to answer.
        return Ok(Json(json!({ "model": model, "created_at": now(),
                               "message": { "role": "assistant", "content": "" },
                               "done": true, "done_reason": "load" }))
        .into_response());
    }
    submit.conversations = vec![request.messages.into_iter().map(turn).collect::<Result<_, _>>()?];
    submit.tools = request.tools;
    let message = |content: &str| json!({ "role": "assistant", "content": content });
    if stream {
        let (_, model, followed) = compat::follow(node, submit, 1).await?;
        let name = model.clone();
        let line =
            move |text: &str| json!({ "model": name, "created_at": now(), "message": message(text), "done": false });
        let last = move |view: &TaskView, g: &GenerationView| {
            let mut m = message("");
            if !g.tool_calls.is_empty() {
                m["tool_calls"] = json!(calls(g));
            }
            merge(json!({ "model": view.model, "created_at": now(), "message": m }), closing(view, g, started))
        };
        return Ok(ndjson(followed, line, last));
    }
    let view = run_task(&node, submit).await?;
    let g = view.generations.iter().flatten().next().cloned().unwrap_or_else(|| GenerationView::text("", 0, "stop"));
    let mut m = message(&g.text);
    if !g.tool_calls.is_empty() {
        m["tool_calls"] = json!(calls(&g));
    }
    let out = merge(json!({ "model": view.model, "created_at": now(), "message": m }), closing(&view, &g, started));
    Ok(Json(out).into_response())
}

// ---- /api/generate -------------------------------------------------------

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: Option<bool>,
}

/// `POST /api/generate`: one prompt answered with the model's chat
/// template (and `system`), or continued as it is with `raw`.
async fn generate<N: NodeView>(State(node): State<Arc<N>>, body: Body_) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let mut known = common_params();
    known.extend([
        ("prompt", Param::Honoured),
        ("system", Param::Honoured),
        ("raw", Param::Honoured),
        ("suffix", Param::Neutral(|v| v == "", "insertion (a suffix) is not supported")),
        ("template", Param::Refused("each model's own chat template is used")),
        ("context", Param::Refused("send the conversation to /api/chat instead")),
    ]);
    let request: GenerateRequest = compat::strict(body, &known)?;
    let model = request.common.model.clone();
    let prompt = request.prompt.unwrap_or_default();
    if prompt.is_empty() {
        return Ok(Json(json!({ "model": model, "created_at": now(), "response": "", "done": true,
                               "done_reason": "load" }))
        .into_response());
    }
    let raw = request.raw.unwrap_or(false);
    if raw && request.system.is_some() {
        return Err(ApiError::Param {
            param: "system".into(),
            message: "not applied with raw: put it in the prompt".into(),
        }
        .into());
    }
    let mut submit = if raw {
        SubmitRequest::new("complete", vec![prompt])
    } else {
        let mut s = SubmitRequest::new("chat", Vec::new());
        let mut conversation: Vec<ChatTurnView> =
            request.system.into_iter().map(|system| ChatTurnView::new("system", system)).collect();
        conversation.push(ChatTurnView::new("user", prompt));
        s.conversations = vec![conversation];
        s
    };
    let stream = request.common.apply(&mut submit)?;
    if stream {
        let (_, model, followed) = compat::follow(node, submit, 1).await?;
        let line = move |text: &str| json!({ "model": model, "created_at": now(), "response": text, "done": false });
        let last = move |view: &TaskView, g: &GenerationView| {
            merge(json!({ "model": view.model, "created_at": now(), "response": "" }), closing(view, g, started))
        };
        return Ok(ndjson(followed, line, last));
    }
    let view = run_task(&node, submit).await?;
    let g = view.generations.iter().flatten().next().cloned().unwrap_or_else(|| GenerationView::text("", 0, "stop"));
    let out =
        merge(json!({ "model": view.model, "created_at": now(), "response": g.text }), closing(&view, &g, started));
    Ok(Json(out).into_response())
}

// ---- /api/embed ----------------------------------------------------------

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    model: String,
    input: Value,
    #[serde(default)]
    options: Option<Value>,
}

/// `POST /api/embed`.
async fn embed<N: NodeView>(State(node): State<Arc<N>>, body: Body_) -> Result<Json<Value>, OllamaError> {
    let started = Instant::now();
    let known = [
        ("model", Param::Honoured),
        ("input", Param::Honoured),
        // Every model truncates to its context (Ollama's default).
        ("truncate", Param::Neutral(|v| v == &Value::Bool(true), "inputs are always truncated to the model's context")),
        ("options", Param::Honoured),
        ("keep_alive", Param::Honoured),
        ("dimensions", Param::Refused("shortening vectors is not supported")),
    ];
    let request: EmbedRequest = compat::strict(body, &known)?;
    if let Some(Value::Object(o)) = &request.options
        && let Some((name, _)) = o.iter().find(|(_, v)| !v.is_null())
    {
        return Err(
            ApiError::Param { param: format!("options.{name}"), message: "embedding takes no options".into() }.into()
        );
    }
    let mut submit = SubmitRequest::new("embed", crate::openai::texts(request.input)?);
    submit.model = Some(request.model);
    submit.spot_check = Some(0.0);
    let view = run_task(&node, submit).await?;
    let total = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    Ok(Json(json!({
        "model": view.model,
        "embeddings": view.embeddings.unwrap_or_default(),
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": view.input_tokens,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_890_814_000), "2026-11-28T18:33:34.000Z");
    }

    #[test]
    fn options_are_honoured_or_refused_by_name() {
        let o = options(Some(json!({"temperature": 0.5, "num_predict": 10, "repeat_penalty": 1.0}))).unwrap();
        assert_eq!(o.temperature, Some(0.5));
        let refused = |v: Value| options(Some(v)).unwrap_err().to_string();
        assert_eq!(
            refused(json!({"num_ctx": 4096})),
            "options.num_ctx: each model's context is its own (see /api/show)"
        );
        assert!(refused(json!({"repeat_penalty": 1.1})).starts_with("options.repeat_penalty"));
        assert_eq!(refused(json!({"bogus": 1})), "options.bogus: unknown parameter");
    }
}
