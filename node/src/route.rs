//! `mycel/auto`: the requester picks the model for each request (then the
//! market picks the peer). The prompt is embedded with this node's fastest
//! embedding model, the swarm's generation models are scored by
//! [`mycel_router::Router`], and the decision is kept with the task for its
//! view (`mycel task ID`) and its feedback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use mycel_api::{ApiError, SubmitRequest};
use mycel_models::Embedder;
use mycel_protocol::{Advert, Digest, ModelKind, TaskId};
use mycel_router::{Candidate, Decision, Router};
use mycel_store::Store;

use crate::local::LocalModels;

/// This router's own outcomes, signed, with what the signed bytes hold.
struct SignedShare {
    signed: mycel_protocol::Signed<mycel_protocol::router::RouterOutcomes>,
    outcomes: usize,
    embedder: Digest,
}

/// Model names that ask for routing.
pub fn is_auto(model: Option<&str>) -> bool {
    matches!(model, Some("auto" | "mycel/auto"))
}

/// Prompts embedded per request (their mean is what is routed on).
const PROMPTS_EMBEDDED: usize = 8;

/// The node's routing state: empty until its models are loaded.
pub struct Routing {
    store: Arc<dyn Store>,
    /// Signs what this router shares.
    key: mycel_protocol::Keypair,
    inner: Mutex<Option<Loaded>>,
    metrics: Arc<mycel_metrics::Metrics>,
    default_cost_weight: f32,
}

struct Loaded {
    models: Arc<LocalModels>,
    /// Index into `models.embedders`; `None`: this node has no embedder.
    embedder: Option<usize>,
    router: Option<Router>,
    /// Profile embeddings by model weights.
    profiles: HashMap<Digest, Vec<f32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// One text for a profile: what is embedded to place it among prompts.
fn profile_text(m: &mycel_protocol::ModelAdvert) -> Option<String> {
    let p = &m.profile;
    (!p.description.is_empty() || !p.tags.is_empty()).then(|| format!("{}. {}", p.description, p.tags.join(", ")))
}

impl Routing {
    pub fn new(
        store: Arc<dyn Store>,
        key: mycel_protocol::Keypair,
        metrics: Arc<mycel_metrics::Metrics>,
        default_cost_weight: f32,
    ) -> Self {
        Self { store, key, inner: Mutex::new(None), metrics, default_cost_weight }
    }

    /// The outcomes this node learned itself (at most a share's worth,
    /// newest first), signed by the node.
    pub fn export(&self) -> Result<mycel_api::RouterShare, ApiError> {
        let share = self.signed_share(mycel_protocol::limits::ROUTER_OUTCOMES)?.ok_or_else(|| {
            ApiError::Unavailable("this node has no router (no embedding model, or still loading)".into())
        })?;
        Ok(mycel_api::RouterShare {
            signed: hex::encode(mycel_protocol::Wire::encode(&share.signed).map_err(internal)?),
            outcomes: share.outcomes,
            signer: self.key.public().to_peer_id().to_string(),
            embedder: share.embedder.to_hex(),
        })
    }

    /// Up to `max` of the outcomes this node learned itself, newest first,
    /// signed; `None` without a router.
    fn signed_share(&self, max: usize) -> Result<Option<SignedShare>, ApiError> {
        use mycel_protocol::router::{RouterOutcome, RouterOutcomes};
        let guard = lock(&self.inner);
        let Some(router) = guard.as_ref().and_then(|l| l.router.as_ref()) else { return Ok(None) };
        let outcomes: Vec<RouterOutcome> = router
            .export(max)
            .into_iter()
            .filter(|(_, v, _)| v.len() <= mycel_protocol::limits::ROUTER_DIMENSIONS)
            .map(|(model, vector, score)| RouterOutcome { model, score, vector })
            .collect();
        let (embedder, count) = (router.embedder(), outcomes.len());
        let share = RouterOutcomes { embedder, created_ms: mycel_net::now_ms(), outcomes };
        let signed = mycel_protocol::Signed::sign(&self.key, &share).map_err(internal)?;
        Ok(Some(SignedShare { signed, outcomes: count, embedder }))
    }

    /// Learns what another node shared: checked (signature, bounds, the
    /// same embedding space) and kept as peer outcomes, never shared on.
    pub fn import(&self, share: &mycel_api::RouterShare) -> Result<mycel_api::RouterShare, ApiError> {
        use mycel_protocol::router::RouterOutcomes;
        let bytes =
            hex::decode(share.signed.trim()).map_err(|e| ApiError::BadRequest(format!("signed: not hex: {e}")))?;
        let signed = <mycel_protocol::Signed<RouterOutcomes> as mycel_protocol::Wire>::decode(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("signed: {e}")))?;
        self.import_signed(&signed, None)
    }

    /// [`Routing::import`] of a decoded share; with `models`, only the
    /// outcomes of those models are learned.
    fn import_signed(
        &self,
        signed: &mycel_protocol::Signed<mycel_protocol::router::RouterOutcomes>,
        models: Option<&std::collections::HashSet<Digest>>,
    ) -> Result<mycel_api::RouterShare, ApiError> {
        let mut outcomes = signed.verify().map_err(|e| ApiError::BadRequest(format!("signed: {e}")))?;
        if let Some(models) = models {
            outcomes.outcomes.retain(|o| models.contains(&o.model));
        }
        let signer = signed.signer().to_peer_id().to_string();
        tokio::task::block_in_place(|| {
            let mut guard = lock(&self.inner);
            let router = guard.as_mut().and_then(|l| l.router.as_mut()).ok_or_else(|| {
                ApiError::Unavailable("this node has no router (no embedding model, or still loading)".into())
            })?;
            if outcomes.embedder != router.embedder() {
                return Err(ApiError::BadRequest(format!(
                    "these outcomes were learned with embedding model {}; this node routes with {}",
                    outcomes.embedder.to_hex(),
                    router.embedder().to_hex()
                )));
            }
            let n = router
                .learn_many(
                    outcomes.outcomes.into_iter().map(|o| (o.model, o.vector, o.score)),
                    mycel_router::Source::Peer,
                )
                .map_err(|e| match e {
                    mycel_router::RouterError::Invalid(why) => ApiError::BadRequest(why),
                    e => internal(e),
                })?;
            if n > 0 {
                tracing::info!(%signer, learned = n, "learned a peer's router outcomes");
            }
            Ok(mycel_api::RouterShare {
                signed: String::new(),
                outcomes: n,
                signer,
                embedder: outcomes.embedder.to_hex(),
            })
        })
    }

    /// One round of sharing with the swarm: offers what this router learned
    /// to peers that ask (as much as one response carries), then asks one
    /// peer that routes in the same embedding space (it serves the same
    /// embedding model) for its outcomes and learns the new ones. Taking
    /// turns over those peers, one per round, keeps the traffic at one
    /// response per interval whatever the swarm's size.
    pub async fn share_round(&self, net: &mycel_net::Handle, turn: &mut usize) {
        use mycel_protocol::rpc::{Request, Response};
        let Some(embedder) = lock(&self.inner).as_ref().and_then(|l| l.router.as_ref()).map(Router::embedder) else {
            return;
        };
        let dims = lock(&self.inner)
            .as_ref()
            .and_then(|l| l.embedder.and_then(|i| l.models.embedders.get(i)))
            .map_or(mycel_protocol::limits::ROUTER_DIMENSIONS, |e| e.advert.dimensions as usize);
        let max = mycel_protocol::router::RouterOutcomes::most_in_a_response(dims);
        match self.signed_share(max) {
            Ok(share) => {
                let share = share.filter(|s| s.outcomes > 0).map(|s| s.signed);
                if net.set_router_share(share).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sign this router's outcomes to share"),
        }
        let Ok(peers) = net.peers().await else { return };
        let mut same_space: Vec<mycel_protocol::PeerId> = peers
            .iter()
            .filter(|p| p.advert.models.iter().any(|m| m.kind == ModelKind::Embedding && m.weights == embedder))
            .map(|p| p.peer)
            .collect();
        if same_space.is_empty() {
            return;
        }
        same_space.sort();
        // Outcomes of models the swarm serves, no others: a peer cannot grow
        // the router with models nobody runs.
        let mut models: std::collections::HashSet<Digest> =
            peers.iter().flat_map(|p| p.advert.models.iter().map(|m| m.weights)).collect();
        if let Some(loaded) = lock(&self.inner).as_ref() {
            models.extend(loaded.models.adverts().iter().map(|m| m.weights));
        }
        let peer = same_space[*turn % same_space.len()];
        *turn = turn.wrapping_add(1);
        match net.request(peer, Request::RouterOutcomes).await {
            // Only a peer's own outcomes: a share is worth what its signer is.
            Ok(Response::RouterOutcomes(signed)) if signed.signer().to_peer_id() == peer => {
                if let Err(e) = self.import_signed(&signed, Some(&models)) {
                    tracing::debug!(%peer, error = %e, "a peer's router outcomes were refused");
                }
            }
            Ok(Response::RouterOutcomes(_)) => tracing::debug!(%peer, "a peer sent router outcomes it did not sign"),
            Ok(_) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "asking a peer for its router outcomes failed"),
        }
    }

    /// The node's models are loaded: open the router in the space of its
    /// fastest embedder.
    pub fn models_ready(&self, models: Arc<LocalModels>) -> anyhow::Result<()> {
        let embedder = models
            .embedders
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                a.advert.throughput.embeddings_per_s.total_cmp(&b.advert.throughput.embeddings_per_s)
            })
            .map(|(i, _)| i);
        // Reading what the store kept is blocking I/O.
        let router = match embedder {
            Some(i) => Some(tokio::task::block_in_place(|| {
                Router::open(self.store.clone(), models.embedders[i].advert.weights)
            })?),
            None => None,
        };
        if let (Some(i), Some(r)) = (embedder, &router) {
            let learned: usize = r.examples().values().sum();
            tracing::info!(embedder = %models.embedders[i].advert.id, learned, "router ready");
        }
        *lock(&self.inner) = Some(Loaded { models, embedder, router, profiles: HashMap::new() });
        Ok(())
    }

    /// Chooses the model for `request` among the generation models in
    /// `adverts` (this node's and its peers'). Returns the decision and the
    /// prompt's embedding.
    pub async fn route(&self, request: &SubmitRequest, adverts: &[Advert]) -> Result<(Decision, Vec<f32>), ApiError> {
        let started = Instant::now();
        let cost_weight = request.cost_weight.unwrap_or(self.default_cost_weight);
        if !(0.0..=10.0).contains(&cost_weight) {
            return Err(ApiError::BadRequest(format!("cost_weight {cost_weight} is not in 0..=10")));
        }
        let prompts: Vec<String> = match request.kind.as_str() {
            "generate" => request.inputs.iter().take(PROMPTS_EMBEDDED).cloned().collect(),
            "chat" => request
                .conversations
                .iter()
                .take(PROMPTS_EMBEDDED)
                .filter_map(|turns| turns.iter().rev().find(|t| t.role == "user").map(|t| t.content.clone()))
                .collect(),
            _ => {
                return Err(ApiError::BadRequest(
                    "mycel/auto chooses among generation models; name an embedding model".into(),
                ));
            }
        };
        if prompts.is_empty() {
            return Err(ApiError::BadRequest("no prompt to route on".into()));
        }
        // Candidates: generation models by weights, their best speed; with
        // tools, only those that can be offered them.
        let tools = !request.tools.is_empty();
        let mut candidates: Vec<(Candidate, Option<String>)> = Vec::new();
        let fits = |m: &&mycel_protocol::ModelAdvert| m.kind == ModelKind::Generation && (m.tools || !tools);
        for m in adverts.iter().flat_map(|a| &a.models).filter(fits) {
            match candidates.iter_mut().find(|(c, _)| c.weights == m.weights) {
                Some((c, _)) => c.tokens_per_s = c.tokens_per_s.max(m.throughput.decode_tokens_per_s),
                None => candidates.push((
                    Candidate {
                        id: m.id.clone(),
                        weights: m.weights,
                        profile: None,
                        tokens_per_s: m.throughput.decode_tokens_per_s,
                    },
                    profile_text(m),
                )),
            }
        }
        if candidates.is_empty() {
            return Err(ApiError::NoCapablePeer("no generation model in the swarm to route to".into()));
        }
        // What to embed: the prompts, and profiles not embedded yet.
        let (pool_job, missing) = {
            let guard = lock(&self.inner);
            let loaded = guard
                .as_ref()
                .ok_or_else(|| ApiError::Unavailable("this node's models are still loading; retry shortly".into()))?;
            let Some(e) = loaded.embedder else {
                return Err(ApiError::Unavailable(
                    "mycel/auto embeds the prompt on this node, which serves no embedding model \
                     (serve one, e.g. `mycel models fetch paraphrase-minilm-l3-v2`)"
                        .into(),
                ));
            };
            let missing: Vec<(Digest, String)> = candidates
                .iter()
                .filter(|(c, _)| !loaded.profiles.contains_key(&c.weights))
                .filter_map(|(c, text)| text.clone().map(|t| (c.weights, t)))
                .collect();
            let mut texts = prompts.clone();
            texts.extend(missing.iter().map(|(_, t)| t.clone()));
            let model: Arc<Embedder> = loaded.models.embedders[e].model.clone();
            let job = loaded.models.pool.embed(model, texts).map_err(internal)?;
            (job, missing)
        };
        let embedded = pool_job.await.map_err(internal)?.map_err(internal)?;
        let (prompt_vectors, profile_vectors) = embedded.vectors.split_at(prompts.len());
        let dims = prompt_vectors.first().map_or(0, Vec::len);
        let mut query = vec![0f32; dims];
        for v in prompt_vectors {
            query.iter_mut().zip(v).for_each(|(q, x)| *q += x / prompt_vectors.len() as f32);
        }

        let mut guard = lock(&self.inner);
        let loaded = guard.as_mut().ok_or_else(|| ApiError::Unavailable("models unloaded".into()))?;
        for ((weights, _), v) in missing.iter().zip(profile_vectors) {
            loaded.profiles.insert(*weights, v.clone());
        }
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .map(|(mut c, _)| {
                c.profile = loaded.profiles.get(&c.weights).cloned();
                c
            })
            .collect();
        let router = loaded.router.as_ref().ok_or_else(|| ApiError::Unavailable("no router".into()))?;
        let mut decision = router
            .choose(&query, &candidates, cost_weight)
            .ok_or_else(|| ApiError::NoCapablePeer("no generation model to route to".into()))?;
        let elapsed = started.elapsed();
        decision.overhead_ms = elapsed.as_secs_f32() * 1000.0;
        self.metrics.route_latency.observe(elapsed.as_secs_f64());
        Ok((decision, query))
    }

    /// Learns an outcome given directly (an evaluation harness's): the
    /// prompt is embedded here, the model named by id or digest.
    pub async fn learn(&self, outcome: mycel_api::Outcome, adverts: &[Advert]) -> Result<(), ApiError> {
        let source = match outcome.source.as_deref() {
            None | Some("eval") => mycel_router::Source::Eval,
            Some("judge") => mycel_router::Source::Judge,
            Some("user") => mycel_router::Source::User,
            Some(other) => return Err(ApiError::BadRequest(format!("source {other:?}: eval, judge or user"))),
        };
        let weights = adverts
            .iter()
            .flat_map(|a| &a.models)
            .find(|m| m.kind == ModelKind::Generation && (m.id == outcome.model || m.weights.to_hex() == outcome.model))
            .map(|m| m.weights)
            .ok_or_else(|| ApiError::ModelNotFound(format!("no generation model {:?} in the swarm", outcome.model)))?;
        let job = {
            let guard = lock(&self.inner);
            let loaded = guard.as_ref().ok_or_else(|| ApiError::Unavailable("models still loading".into()))?;
            let e = loaded
                .embedder
                .ok_or_else(|| ApiError::Unavailable("this node serves no embedding model to learn with".into()))?;
            loaded
                .models
                .pool
                .embed(loaded.models.embedders[e].model.clone(), vec![outcome.prompt])
                .map_err(internal)?
        };
        let embedded = job.await.map_err(internal)?.map_err(internal)?;
        let vector = embedded.vectors.into_iter().next().ok_or_else(|| internal("no embedding"))?;
        tokio::task::block_in_place(|| {
            let mut guard = lock(&self.inner);
            let router = guard.as_mut().and_then(|l| l.router.as_mut()).ok_or_else(|| internal("no router"))?;
            router.learn(weights, &vector, outcome.score, source).map_err(|e| match e {
                mycel_router::RouterError::Invalid(why) => ApiError::BadRequest(why),
                e => internal(e),
            })
        })
    }

    /// Keeps `decision` with the task it routed (a durable write: called
    /// from async code, it tells the runtime it blocks).
    pub fn remember(&self, task: TaskId, decision: Decision, query: &[f32]) {
        tokio::task::block_in_place(|| self.remember_now(task, decision, query));
    }

    fn remember_now(&self, task: TaskId, decision: Decision, query: &[f32]) {
        let mut guard = lock(&self.inner);
        if let Some(router) = guard.as_mut().and_then(|l| l.router.as_mut())
            && let Err(e) = router.routed_task(task, decision, query)
        {
            tracing::warn!(%task, error = %e, "could not keep the routing decision");
        }
    }

    /// How `task` was routed, if it was.
    pub fn routed(&self, task: &str) -> Option<mycel_router::Routed> {
        let task = TaskId::from_hex(task).ok()?;
        lock(&self.inner).as_ref()?.router.as_ref()?.routed(&task).cloned()
    }

    /// A verdict on a routed task (a durable write, like [`Self::remember`]).
    pub fn feedback(&self, task: &str, score: f32) -> Result<mycel_router::Routed, ApiError> {
        tokio::task::block_in_place(|| self.feedback_now(task, score))
    }

    fn feedback_now(&self, task: &str, score: f32) -> Result<mycel_router::Routed, ApiError> {
        let id = TaskId::from_hex(task)
            .map_err(|_| ApiError::BadRequest(format!("{task:?} is not a task id (32 hex digits)")))?;
        let mut guard = lock(&self.inner);
        let router = guard
            .as_mut()
            .and_then(|l| l.router.as_mut())
            .ok_or_else(|| ApiError::NotFound(format!("task {task} was not routed by this node")))?;
        match router.feedback(id, score) {
            Ok(r) => Ok(r.clone()),
            Err(mycel_router::RouterError::NotRouted(_)) => Err(ApiError::NotFound(format!(
                "task {task} was not routed by this node (feedback teaches the router: submit with model mycel/auto)"
            ))),
            Err(mycel_router::RouterError::Invalid(why)) => Err(ApiError::BadRequest(why)),
            Err(e) => Err(internal(e)),
        }
    }
}
