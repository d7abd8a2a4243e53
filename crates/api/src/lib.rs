//! The node's HTTP API, on axum.
//!
//! - [`types`]: the JSON bodies, shared with the CLI that reads them.
//! - [`router`]: the routes, over any [`NodeView`] (the node implements it;
//!   tests can too), so this crate needs no network or store.
//! - [`serve`]: runs a router on a listener until shutdown.
//!
//! Native routes live under `/api/v1/`; OpenAI's under `/v1/`
//! ([`openai`]); Ollama's at `/api/tags`, `/api/chat`... ([`ollama`]). The API listens on loopback by
//! default; anywhere else it requires a bearer token ([`Auth`]).

mod compat;
pub mod limit;
pub mod ollama;
pub mod openai;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use tokio_util::sync::CancellationToken;

pub use types::{
    ChatTurnView, ClassifyRequest, ClassifyResult, EnsembleStage, EnsembleView, Feedback, GenerationView, Labelled,
    ModelView, Outcome, PeerView, PipelineView, Prediction, Proposal, RouterShare, SearchHit, SearchRequest,
    SearchResult, StatusView, SubmitRequest, Submitted, SummarizeRequest, TaskEvent, TaskSummary, TaskView,
};

/// A task's state now, and everything that happens to it from now on.
#[derive(Debug)]
pub struct Watch {
    /// Where it stands.
    pub progress: TaskSummary,
    /// Later events; closed (or a final `Progress`) when it finishes.
    pub events: tokio::sync::broadcast::Receiver<TaskEvent>,
}

/// What the API needs from a node.
pub trait NodeView: Send + Sync + 'static {
    /// This node.
    fn status(&self) -> impl Future<Output = Result<StatusView, ApiError>> + Send;
    /// The peers it knows from adverts.
    fn peers(&self) -> impl Future<Output = Result<Vec<PeerView>, ApiError>> + Send;
    /// Hands work to the swarm.
    fn submit(&self, request: SubmitRequest) -> impl Future<Output = Result<Submitted, ApiError>> + Send;
    /// A task's state and result.
    fn task(&self, id: String) -> impl Future<Output = Result<TaskView, ApiError>> + Send;
    /// The tasks this node requested.
    fn tasks(&self) -> impl Future<Output = Result<Vec<TaskSummary>, ApiError>> + Send;
    /// Follows a task.
    fn watch(&self, id: String) -> impl Future<Output = Result<Watch, ApiError>> + Send;
    /// Gives up on a task.
    fn cancel(&self, id: String) -> impl Future<Output = Result<TaskSummary, ApiError>> + Send;
    /// Labels texts from the embedders (zero-shot or a trained head).
    fn classify(&self, request: ClassifyRequest) -> impl Future<Output = Result<ClassifyResult, ApiError>> + Send;
    /// Starts a map-reduce summary; follow it like a task.
    fn summarize(&self, request: SummarizeRequest) -> impl Future<Output = Result<Submitted, ApiError>> + Send;
    /// The corpus texts most like a query, embedded across the swarm.
    fn search(&self, request: SearchRequest) -> impl Future<Output = Result<SearchResult, ApiError>> + Send;
    /// [`NodeView::search`] as a job to follow like a task (its view's
    /// `search` holds the answer); a bad request fails here, at once.
    fn start_search(&self, request: SearchRequest) -> impl Future<Output = Result<Submitted, ApiError>> + Send;
    /// [`NodeView::classify`] as a job to follow like a task.
    fn start_classify(&self, request: ClassifyRequest) -> impl Future<Output = Result<Submitted, ApiError>> + Send;
    /// What `mycel/auto` would choose for `request`, without running it.
    fn choose(&self, request: SubmitRequest) -> impl Future<Output = Result<mycel_router::Decision, ApiError>> + Send;
    /// What this node's router learned, signed, to share.
    fn export_router(&self) -> impl Future<Output = Result<RouterShare, ApiError>> + Send;
    /// Learns what another node's router shared; how many outcomes.
    fn import_router(&self, share: RouterShare) -> impl Future<Output = Result<RouterShare, ApiError>> + Send;
    /// An outcome for the router to learn from.
    fn learn(&self, outcome: Outcome) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// A verdict (0 bad .. 1 good) on a routed task's answer, for the router.
    fn feedback(&self, id: String, score: f32) -> impl Future<Output = Result<mycel_router::Routed, ApiError>> + Send;
    /// Metrics in Prometheus' text format.
    fn metrics(&self) -> impl Future<Output = Result<String, ApiError>> + Send;
}

/// An error the API reports as JSON with a status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The node is shutting down or a component stopped.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// One parameter of the request is malformed or not supported.
    #[error("{param}: {message}")]
    Param {
        /// The parameter, as the request names it.
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// No peer advertises this model.
    #[error("{0}")]
    ModelNotFound(String),
    /// The model exists but no peer can take the work now.
    #[error("{0}")]
    NoCapablePeer(String),
    /// The body is over the node's limit.
    #[error("request body too large")]
    TooLarge,
    /// Too many requests from this client.
    #[error("rate limit: at most {0} requests per second; retry shortly")]
    RateLimited(f64),
    /// Missing or wrong bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// The node failed at something that is not the client's doing (the
    /// journal, signing, encoding): a 500 with what went wrong.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status it maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unavailable(_) | ApiError::NoCapablePeer(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) | ApiError::Param { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(types::ErrorBody::new(self.to_string()))).into_response()
    }
}

/// The API's knobs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Who may call it.
    pub auth: Auth,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Requests per second per client on the OpenAI-compatible routes
    /// (0 = unlimited), with bursts of `burst`.
    pub rate_per_s: f64,
    /// Requests a client may make at once after being idle.
    pub burst: f64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { auth: Auth::default(), max_body_bytes: 32 * 1024 * 1024, rate_per_s: 20.0, burst: 40.0 }
    }
}

/// Who may call the API.
#[derive(Clone, Default)]
pub struct Auth {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("token", &self.token.as_ref().map(|_| "<redacted>")).finish()
    }
}

/// Why the API refused to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Listening beyond loopback without a token would open the node to
    /// anyone on the network.
    #[error(
        "the API would listen on {0}, which is not loopback, without a token: set api_token in the config or \
         MYCEL_API_TOKEN, or listen on 127.0.0.1"
    )]
    TokenRequired(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for the API on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

impl Auth {
    /// Requires `token` as a bearer token when set.
    pub fn new(token: Option<String>) -> Self {
        Self { token: token.filter(|t| !t.is_empty()).map(Into::into) }
    }

    /// Checks that this configuration is safe for `addr`.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), ServeError> {
        if !addr.ip().is_loopback() && self.token.is_none() {
            return Err(ServeError::TokenRequired(addr));
        }
        Ok(())
    }

    fn allows(&self, request: &Request) -> bool {
        let Some(expected) = &self.token else { return true };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), expected.as_bytes())
    }
}

/// Compares without an early exit, so response time does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ x);
    }
    diff == 0
}

async fn require_token(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    // The dashboard's page itself holds no data; it asks for the token.
    if auth.allows(&request) || (request.uri().path() == "/" && request.method() == axum::http::Method::GET) {
        next.run(request).await
    } else if request.uri().path().starts_with("/v1/") {
        openai::error_response(ApiError::Unauthorized)
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// The API's routes over `node`.
pub fn router<N: NodeView>(node: Arc<N>, config: ApiConfig) -> Router {
    let limiter = limit::RateLimiter::new(config.rate_per_s, config.burst);
    let limiter_for_ollama = limiter.clone();
    let openai = Router::new()
        .route("/v1/models", get(openai::models::<N>))
        .route("/v1/embeddings", post(openai::embeddings::<N>))
        .route("/v1/chat/completions", post(openai::chat::<N>))
        .route("/v1/completions", post(openai::completions::<N>))
        .fallback(openai::not_found)
        .layer(middleware::from_fn_with_state(limiter, limit::limit));
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics::<N>))
        .route("/api/v1/status", get(status::<N>))
        .route("/api/v1/peers", get(peers::<N>))
        .route("/api/v1/tasks", post(submit::<N>).get(tasks::<N>))
        .route("/api/v1/tasks/{id}", get(task::<N>).delete(cancel::<N>))
        .route("/api/v1/tasks/{id}/cancel", post(cancel::<N>))
        .route("/api/v1/tasks/{id}/feedback", post(feedback::<N>))
        .route("/api/v1/router/outcomes", post(learn::<N>))
        .route("/api/v1/router/choose", post(choose::<N>))
        .route("/api/v1/router/export", get(export_router::<N>))
        .route("/api/v1/router/import", post(import_router::<N>))
        .route("/api/v1/search", post(search::<N>))
        .route("/api/v1/summarize", post(summarize::<N>))
        .route("/api/v1/classify", post(classify::<N>))
        .route("/api/v1/tasks/{id}/events", get(events::<N>))
        .merge(openai)
        .merge(ollama::router::<N>().layer(middleware::from_fn_with_state(limiter_for_ollama, limit::limit)))
        .with_state(node)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn_with_state(config.auth, require_token))
}

async fn status<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(node.status().await?))
}

async fn peers<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<Vec<PeerView>>, ApiError> {
    Ok(Json(node.peers().await?))
}

/// The dashboard: one self-contained page (no build step, no CDN).
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn metrics<N: NodeView>(State(node): State<Arc<N>>) -> Result<Response, ApiError> {
    let text = node.metrics().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// Binds `addr` (after checking [`Auth::check_exposure`]).
pub async fn bind(addr: SocketAddr, auth: &Auth) -> Result<tokio::net::TcpListener, ServeError> {
    auth.check_exposure(addr)?;
    tokio::net::TcpListener::bind(addr).await.map_err(|error| ServeError::Bind { addr, error })
}

/// Serves `router` on `listener` until `shutdown`, then finishes the
/// requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Client addresses feed the per-client rate limit.
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn submit<N: NodeView>(
    State(node): State<Arc<N>>,
    request: Result<Json<SubmitRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Submitted>, ApiError> {
    let Json(request) = request.map_err(rejection)?;
    Ok(Json(node.submit(request).await?))
}

/// A body axum could not read, as our error.
pub(crate) fn rejection(e: axum::extract::rejection::JsonRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::TooLarge } else { ApiError::BadRequest(e.body_text()) }
}

async fn feedback<N: NodeView>(
    State(node): State<Arc<N>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Result<Json<Feedback>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<mycel_router::Routed>, ApiError> {
    let Json(body) = body.map_err(rejection)?;
    if !(0.0..=1.0).contains(&body.score) {
        return Err(ApiError::BadRequest(format!("score {} is not in 0..=1 (0 bad, 1 good)", body.score)));
    }
    Ok(Json(node.feedback(id, body.score).await?))
}

/// Whether the client asked to be answered at once with a task to follow
/// (RFC 7240's `Prefer: respond-async`) rather than when the work is done.
fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim().eq_ignore_ascii_case("respond-async")))
}

/// `202 Accepted` with the job to follow.
fn accepted(submitted: Submitted) -> Response {
    (StatusCode::ACCEPTED, Json(submitted)).into_response()
}

async fn classify<N: NodeView>(
    State(node): State<Arc<N>>,
    headers: HeaderMap,
    body: Result<Json<ClassifyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(rejection)?;
    if respond_async(&headers) {
        return Ok(accepted(node.start_classify(request).await?));
    }
    Ok(Json(node.classify(request).await?).into_response())
}

async fn summarize<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Json<SummarizeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Submitted>, ApiError> {
    let Json(request) = body.map_err(rejection)?;
    Ok(Json(node.summarize(request).await?))
}

async fn search<N: NodeView>(
    State(node): State<Arc<N>>,
    headers: HeaderMap,
    body: Result<Json<SearchRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(rejection)?;
    if respond_async(&headers) {
        return Ok(accepted(node.start_search(request).await?));
    }
    Ok(Json(node.search(request).await?).into_response())
}

/// The router's decision for a request (`kind` and `inputs` or
/// `conversations` as for a task; `cost_weight`), nothing submitted.
async fn choose<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Json<SubmitRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<mycel_router::Decision>, ApiError> {
    let Json(request) = body.map_err(rejection)?;
    Ok(Json(node.choose(request).await?))
}

async fn export_router<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<RouterShare>, ApiError> {
    Ok(Json(node.export_router().await?))
}

async fn import_router<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Json<RouterShare>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<RouterShare>, ApiError> {
    let Json(share) = body.map_err(rejection)?;
    Ok(Json(node.import_router(share).await?))
}

async fn learn<N: NodeView>(
    State(node): State<Arc<N>>,
    body: Result<Json<Outcome>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(outcome) = body.map_err(rejection)?;
    if !(0.0..=1.0).contains(&outcome.score) {
        return Err(ApiError::BadRequest(format!("score {} is not in 0..=1", outcome.score)));
    }
    node.learn(outcome).await?;
    Ok(Json(serde_json::json!({ "learned": true })))
}

async fn cancel<N: NodeView>(
    State(node): State<Arc<N>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<TaskSummary>, ApiError> {
    Ok(Json(node.cancel(id).await?))
}

/// Server-sent events: `progress` (a [`TaskSummary`]) whenever shards move
/// and `text` while a streaming task generates; ends after the final
/// `progress`.
async fn events<N: NodeView>(
    State(node): State<Arc<N>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let watch = node.watch(id).await?;
    Ok(Sse::new(task_events(watch)).keep_alive(KeepAlive::default()))
}

fn sse_event(event: &TaskEvent) -> SseEvent {
    let name = match event {
        TaskEvent::Progress(_) => "progress",
        TaskEvent::Text { .. } => "text",
    };
    SseEvent::default().event(name).data(serde_json::to_string(event).unwrap_or_default())
}

/// A watch as a stream of SSE events, ending once the task finished.
fn task_events(watch: Watch) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let Watch { progress, events } = watch;
    let first = TaskEvent::Progress(progress.clone());
    futures::stream::unfold((Some(first), events, progress.finished()), |(pending, mut events, ended)| async move {
        if let Some(event) = pending {
            return Some((Ok(sse_event(&event)), (None, events, ended)));
        }
        if ended {
            return None;
        }
        loop {
            match events.recv().await {
                Ok(event) => {
                    let last = matches!(&event, TaskEvent::Progress(p) if p.finished());
                    return Some((Ok(sse_event(&event)), (None, events, last)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

async fn tasks<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<Vec<TaskSummary>>, ApiError> {
    Ok(Json(node.tasks().await?))
}

async fn task<N: NodeView>(
    State(node): State<Arc<N>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(node.task(id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_failures_are_5xx_and_the_clients_4xx() {
        assert_eq!(ApiError::Internal("journal".into()).status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(ApiError::Unavailable("x".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::BadRequest("x".into()).status(), StatusCode::BAD_REQUEST);
        let response = openai::error_response(ApiError::Internal("signing the receipt".into()));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let open: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        assert!(matches!(Auth::new(None).check_exposure(open), Err(ServeError::TokenRequired(_))));
        assert!(Auth::new(Some(String::new())).check_exposure(open).is_err(), "empty token counts as none");
        assert!(Auth::new(Some("t".into())).check_exposure(open).is_ok());
        assert!(Auth::new(None).check_exposure(local).is_ok());
        assert!(!format!("{:?}", Auth::new(Some("hunter2".into()))).contains("hunter2"));
    }
}
