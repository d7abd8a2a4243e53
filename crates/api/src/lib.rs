//! The node's HTTP API, on axum.
//!
//! - [`types`]: the JSON bodies, shared with the CLI that reads them.
//! - [`router`]: the routes, over any [`NodeView`] (the node implements it;
//!   tests can too), so this crate needs no network or store.
//! - [`serve`]: runs a router on a listener until shutdown.
//!
//! Native routes live under `/api/v1/`. The API listens on loopback by
//! default; anywhere else it requires a bearer token ([`Auth`]).

pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

pub use types::{GenerationView, ModelView, PeerView, StatusView, SubmitRequest, Submitted, TaskSummary, TaskView};

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
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        (status, Json(types::ErrorBody::new(self.to_string()))).into_response()
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
    if auth.allows(&request) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, Json(types::ErrorBody::new("missing or wrong bearer token".into()))).into_response()
    }
}

/// The API's routes over `node`.
pub fn router<N: NodeView>(node: Arc<N>, auth: Auth) -> Router {
    Router::new()
        .route("/api/v1/status", get(status::<N>))
        .route("/api/v1/peers", get(peers::<N>))
        .route("/api/v1/tasks", axum::routing::post(submit::<N>).get(tasks::<N>))
        .route("/api/v1/tasks/{id}", get(task::<N>))
        .with_state(node)
        .layer(middleware::from_fn_with_state(auth, require_token))
}

async fn status<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<StatusView>, ApiError> {
    Ok(Json(node.status().await?))
}

async fn peers<N: NodeView>(State(node): State<Arc<N>>) -> Result<Json<Vec<PeerView>>, ApiError> {
    Ok(Json(node.peers().await?))
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
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn submit<N: NodeView>(
    State(node): State<Arc<N>>,
    Json(request): Json<SubmitRequest>,
) -> Result<Json<Submitted>, ApiError> {
    Ok(Json(node.submit(request).await?))
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
