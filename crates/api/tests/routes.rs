//! The routes over a fake node: shapes, status codes and limits, without a
//! network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use http_body_util::BodyExt;
use mycel_api::types::GenerationView;
use mycel_api::{
    ApiConfig, ApiError, Auth, ModelView, NodeView, PeerView, StatusView, SubmitRequest, Submitted, TaskEvent,
    TaskSummary, TaskView, Watch,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tower::ServiceExt;

struct Fake {
    submitted: Mutex<Vec<SubmitRequest>>,
    cancelled: Mutex<Vec<String>>,
    /// Whether watched tasks are still running (events come from `events`).
    running: bool,
    events: broadcast::Sender<TaskEvent>,
}

fn model(id: &str, kind: &str) -> ModelView {
    ModelView {
        id: id.into(),
        kind: kind.into(),
        weights: "ab".repeat(32),
        dimensions: 2,
        context: 256,
        quantization: "f32".into(),
        embeddings_per_s: 100.0,
        decode_tokens_per_s: 0.0,
        tools: false,
    }
}

fn summary(state: &str) -> TaskSummary {
    TaskSummary {
        task: "t1".into(),
        state: state.into(),
        shards: 2,
        shards_done: if state == "done" { 2 } else { 0 },
        kind: "embed".into(),
        workers: Default::default(),
        peers_working: 0,
        error: None,
    }
}

impl NodeView for Fake {
    async fn status(&self) -> Result<StatusView, ApiError> {
        Ok(StatusView {
            peer_id: "me".into(),
            version: "0".into(),
            listen_addrs: vec![],
            connected_peers: 1,
            known_peers: 1,
            adverts: "all".into(),
            table_grew_at_ms: None,
            models: vec![model("emb", "embedding")],
            uptime_s: 1,
            reachability: Default::default(),
        })
    }

    async fn peers(&self) -> Result<Vec<PeerView>, ApiError> {
        Ok(vec![PeerView {
            peer_id: "p".into(),
            software: "0".into(),
            models: vec![model("emb", "embedding"), model("gen", "generation")],
            cpu: "x".into(),
            cores: 2,
            memory_bytes: 1,
            gpus: vec![],
            queued_shards: 0,
            active_shards: 0,
            capacity: 1,
            listen_addrs: vec![],
            advert_seq: 1,
            last_seen_ms: 0,
            reputation: 0.8,
            connection: "direct".into(),
        }])
    }

    async fn submit(&self, request: SubmitRequest) -> Result<Submitted, ApiError> {
        if request.model.as_deref() == Some("missing") {
            return Err(ApiError::ModelNotFound("no peer serves \"missing\"".into()));
        }
        self.submitted.lock().unwrap().push(request);
        Ok(Submitted { task: "t1".into() })
    }

    async fn task(&self, id: String) -> Result<TaskView, ApiError> {
        let request = self.submitted.lock().unwrap().last().cloned().unwrap();
        let chat = request.kind == "chat";
        Ok(TaskView {
            task: id,
            state: "done".into(),
            shards: 1,
            shards_done: 1,
            executors: vec![Some("p".into())],
            error: None,
            embeddings: (!chat).then(|| request.inputs.iter().map(|_| vec![0.6, 0.8]).collect()),
            generations: chat
                .then(|| request.conversations.iter().map(|_| GenerationView::text("hi there", 3, "eos")).collect()),
            receipt: None,
            model: if chat { "gen".into() } else { "emb".into() },
            input_tokens: 10,
            peers_working: 0,
            auction_ms: Vec::new(),
            route: None,
            ensemble: None,
            pipeline: None,
            search: None,
            classify: None,
        })
    }

    async fn tasks(&self) -> Result<Vec<TaskSummary>, ApiError> {
        Ok(vec![summary("done")])
    }

    async fn watch(&self, _id: String) -> Result<Watch, ApiError> {
        let state = if self.running { "running" } else { "done" };
        Ok(Watch { progress: summary(state), events: self.events.subscribe() })
    }

    async fn cancel(&self, id: String) -> Result<TaskSummary, ApiError> {
        self.cancelled.lock().unwrap().push(id);
        Ok(summary("failed"))
    }

    async fn classify(&self, _request: mycel_api::ClassifyRequest) -> Result<mycel_api::ClassifyResult, ApiError> {
        Err(ApiError::Unavailable("no swarm".into()))
    }

    async fn summarize(&self, _request: mycel_api::SummarizeRequest) -> Result<Submitted, ApiError> {
        Err(ApiError::Unavailable("no swarm".into()))
    }

    async fn search(&self, _request: mycel_api::SearchRequest) -> Result<mycel_api::SearchResult, ApiError> {
        Err(ApiError::Unavailable("no swarm".into()))
    }

    async fn start_search(&self, request: mycel_api::SearchRequest) -> Result<Submitted, ApiError> {
        if request.query.is_empty() {
            return Err(ApiError::BadRequest("query: empty".into()));
        }
        Ok(Submitted { task: "search-job".into() })
    }

    async fn start_classify(&self, _request: mycel_api::ClassifyRequest) -> Result<Submitted, ApiError> {
        Ok(Submitted { task: "classify-job".into() })
    }

    async fn choose(&self, _request: SubmitRequest) -> Result<mycel_router::Decision, ApiError> {
        Err(ApiError::Unavailable("no router".into()))
    }

    async fn export_router(&self) -> Result<mycel_api::RouterShare, ApiError> {
        Err(ApiError::Unavailable("no router".into()))
    }

    async fn import_router(&self, _share: mycel_api::RouterShare) -> Result<mycel_api::RouterShare, ApiError> {
        Err(ApiError::Unavailable("no router".into()))
    }

    async fn learn(&self, _outcome: mycel_api::Outcome) -> Result<(), ApiError> {
        Ok(())
    }

    async fn feedback(&self, id: String, _score: f32) -> Result<mycel_router::Routed, ApiError> {
        Err(ApiError::NotFound(format!("task {id} was not routed")))
    }

    async fn metrics(&self) -> Result<String, ApiError> {
        Ok("# TYPE mycel_x counter\nmycel_x 1\n".into())
    }
}

fn fake(running: bool) -> Arc<Fake> {
    Arc::new(Fake {
        submitted: Mutex::default(),
        cancelled: Mutex::default(),
        running,
        events: broadcast::channel(16).0,
    })
}

fn app(node: Arc<Fake>, config: ApiConfig) -> axum::Router {
    mycel_api::router(node, config)
}

fn open() -> ApiConfig {
    ApiConfig { rate_per_s: 0.0, ..ApiConfig::default() }
}

async fn call(app: &axum::Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, bytes) = call_raw(app, method, path, body.map(|b| b.to_string()), None).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn call_raw(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::builder().method(method).uri(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request.body(body.map_or_else(Body::empty, Body::from)).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

fn assert_openai_error(body: &Value, kind: &str) {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(error["type"], kind, "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
}

#[tokio::test]
async fn embeddings_as_floats_or_base64_with_usage() {
    let node = fake(false);
    let app = app(node.clone(), open());
    let (status, body) = call(&app, "POST", "/v1/embeddings", Some(json!({"input": ["a", "b"], "model": "emb"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][0]["embedding"], json!([0.6f32, 0.8f32]));
    assert_eq!(body["usage"], json!({"prompt_tokens": 10, "total_tokens": 10}));
    assert_eq!(body["model"], "emb");
    let submitted = node.submitted.lock().unwrap()[0].clone();
    assert_eq!((submitted.kind.as_str(), submitted.inputs.len()), ("embed", 2));

    let (_, body) =
        call(&app, "POST", "/v1/embeddings", Some(json!({"input": "a", "encoding_format": "base64"}))).await;
    let bytes: Vec<u8> = [0.6f32, 0.8].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(body["data"][0]["embedding"], base64::engine::general_purpose::STANDARD.encode(bytes));
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let app = app(fake(false), open());
    let (status, body) = call(&app, "POST", "/v1/embeddings", Some(json!({"input": "a", "model": "missing"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, "invalid_request_error");
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, bytes) = call_raw(&app, "POST", "/v1/embeddings", Some("{not json".into()), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_openai_error(&serde_json::from_slice(&bytes).unwrap(), "invalid_request_error");

    for bad in [json!({"model": "emb"}), json!({"input": [1, 2]}), json!({"input": "a", "encoding_format": "int8"})] {
        let (status, body) = call(&app, "POST", "/v1/embeddings", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_openai_error(&body, "invalid_request_error");
    }
    let (status, body) =
        call(&app, "POST", "/v1/chat/completions", Some(json!({"messages": [], "model": "gen"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(&app, "GET", "/v1/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_openai_error(&body, "invalid_request_error");
}

#[tokio::test]
async fn bodies_over_the_cap_are_413() {
    let app = app(fake(false), ApiConfig { max_body_bytes: 1024, ..open() });
    let big = json!({"input": "x".repeat(4096)});
    let (status, body) = call(&app, "POST", "/v1/embeddings", Some(big.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_openai_error(&body, "invalid_request_error");
    let (status, _) = call(&app, "POST", "/api/v1/tasks", Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "the native API is capped too");
}

#[tokio::test]
async fn clients_over_their_rate_get_429() {
    let app = app(fake(false), ApiConfig { rate_per_s: 0.01, burst: 2.0, ..ApiConfig::default() });
    for _ in 0..2 {
        assert_eq!(call(&app, "GET", "/v1/models", None).await.0, StatusCode::OK);
    }
    let (status, body) = call(&app, "GET", "/v1/models", None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_openai_error(&body, "rate_limit_error");
    assert_eq!(call(&app, "GET", "/api/v1/status", None).await.0, StatusCode::OK, "the native API is not limited");
}

#[tokio::test]
async fn a_token_guards_everything_but_the_dashboard_page() {
    let app = app(fake(false), ApiConfig { auth: Auth::new(Some("tok".into())), ..open() });
    let (status, bytes) = call_raw(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_openai_error(&serde_json::from_slice(&bytes).unwrap(), "authentication_error");
    assert_eq!(call_raw(&app, "GET", "/v1/models", None, Some("nope")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call_raw(&app, "GET", "/v1/models", None, Some("tok")).await.0, StatusCode::OK);
    let (status, bytes) = call_raw(&app, "GET", "/api/v1/status", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(serde_json::from_slice::<Value>(&bytes).unwrap()["error"].is_string(), "native shape");
    assert_eq!(call_raw(&app, "GET", "/metrics", None, None).await.0, StatusCode::UNAUTHORIZED);
    let (status, page) = call_raw(&app, "GET", "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("<title>mycel"), "the page holds no data; it asks for the token");
}

#[tokio::test]
async fn models_lists_the_swarm_with_owner_counts() {
    let app = app(fake(false), open());
    let (_, body) = call(&app, "GET", "/v1/models", None).await;
    let data = body["data"].as_array().unwrap();
    assert_eq!((data[0]["id"].as_str(), data[0]["owners"].as_u64()), (Some("emb"), Some(2)));
    assert_eq!((data[1]["id"].as_str(), data[1]["owners"].as_u64()), (Some("gen"), Some(1)));
    assert_eq!(data[0]["object"], "model");
    // With a generation model in the swarm, the ways of combining it too.
    let virtual_models: Vec<&str> = data[2..].iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(virtual_models, ["mycel/auto", "mycel/vote", "mycel/best-of", "mycel/moa"]);
}

#[tokio::test]
async fn an_ensemble_request_asks_one_answer_of_n_proposals_and_refuses_to_stream() {
    let node = fake(false);
    let app = app(node.clone(), open());
    let ask = |stream: bool| json!({"model": "mycel/vote", "n": 3, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = call(&app, "POST", "/v1/chat/completions", Some(ask(false))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let submitted = node.submitted.lock().unwrap().last().cloned().unwrap();
    assert_eq!((submitted.conversations.len(), submitted.n), (1, Some(3)));
    let (status, body) = call(&app, "POST", "/v1/chat/completions", Some(ask(true))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("stream"), "{body}");
}

#[tokio::test]
async fn chat_maps_the_request_and_reports_usage_once_per_prompt() {
    let node = fake(false);
    let app = app(node.clone(), open());
    let request = json!({
        "model": "gen",
        "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 4, "stop": "\n", "n": 2,
    });
    let (status, body) = call(&app, "POST", "/v1/chat/completions", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    assert_eq!(body["choices"][1]["message"], json!({"role": "assistant", "content": "hi there"}));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"], json!({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}));
    let s = node.submitted.lock().unwrap()[0].clone();
    assert_eq!(s.kind, "chat");
    assert_eq!(s.conversations.len(), 2);
    assert_eq!(s.conversations[0][0].role, "system");
    assert_eq!(s.conversations[0][1].content, "hi");
    assert_eq!((s.max_tokens, s.seed, s.top_p, s.stop.clone()), (Some(9), Some(4), Some(0.9), vec!["\n".to_string()]));
}

#[tokio::test]
async fn chat_streams_chunks_then_done() {
    let node = fake(true);
    let app = app(node.clone(), open());
    let events = node.events.clone();
    tokio::spawn(async move {
        // Wait for the stream to subscribe, then play the task.
        while events.receiver_count() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let _ = events.send(TaskEvent::Text { item: 0, text: "hi".into() });
        let _ = events.send(TaskEvent::Progress(summary("done")));
    });
    let request = json!({"messages": [{"role": "user", "content": "x"}], "stream": true,
                         "stream_options": {"include_usage": true}});
    let (status, bytes) = call_raw(&app, "POST", "/v1/chat/completions", Some(request.to_string()), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes).unwrap();
    let chunks: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(chunks.last(), Some(&"[DONE]"), "{text}");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    assert!(parsed.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String =
        parsed.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(content, "hi there", "streamed text, then what the signed result adds");
    assert!(parsed.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(parsed.last().unwrap()["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn native_cancel_and_progress_events() {
    let node = fake(true);
    let app = app(node.clone(), open());
    let (status, body) = call(&app, "POST", "/api/v1/tasks/t1/cancel", None).await;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("failed")));
    assert_eq!(call(&app, "DELETE", "/api/v1/tasks/t2", None).await.0, StatusCode::OK);
    assert_eq!(*node.cancelled.lock().unwrap(), vec!["t1".to_string(), "t2".to_string()]);

    let events = node.events.clone();
    tokio::spawn(async move {
        while events.receiver_count() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let _ = events.send(TaskEvent::Progress(TaskSummary { shards_done: 1, ..summary("running") }));
        let _ = events.send(TaskEvent::Progress(summary("done")));
        let _ = events.send(TaskEvent::Progress(summary("never seen")));
    });
    let (status, bytes) = call_raw(&app, "GET", "/api/v1/tasks/t1/events", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.matches("event: progress").count(), 3, "now, one shard, done; then the stream ends:\n{text}");
    assert!(text.contains("\"shards_done\":1") && !text.contains("never seen"), "{text}");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = app(fake(false), open());
    let request = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
}

/// `Prefer: respond-async` turns a search or a classification into a job
/// answered at once (202 and its id); a bad request is still refused at
/// once; without the header the answer is the result itself.
#[tokio::test]
async fn search_and_classify_run_as_jobs_when_the_client_prefers_it() {
    let app = app(fake(true), open());
    let send = |path: &'static str, body: Value, prefer: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut request =
                Request::builder().method("POST").uri(path).header(header::CONTENT_TYPE, "application/json");
            if let Some(p) = prefer {
                request = request.header("prefer", p);
            }
            let response = app.oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };
    let search = json!({"corpus": ["a", "b"], "query": "a"});
    let (status, body) = send("/api/v1/search", search.clone(), Some("respond-async")).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"task": "search-job"})));
    let (status, _) = send("/api/v1/search", search.clone(), Some("wait=10, Respond-Async")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "one of several preferences, any case");
    let (status, _) = send("/api/v1/search", search.clone(), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "without the header: the synchronous call");
    let (status, _) = send("/api/v1/search", json!({"corpus": ["a"], "query": ""}), Some("respond-async")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let classify = json!({"inputs": ["x"], "labels": ["a", "b"]});
    let (status, body) = send("/api/v1/classify", classify, Some("respond-async")).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"task": "classify-job"})));
}
