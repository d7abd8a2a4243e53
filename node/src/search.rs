//! Corpus search (`POST /api/v1/search`, `mycel submit search`): the
//! corpus is embedded across the swarm, each text once per model (vectors
//! are kept by the SHA-256 of the model's weights and of the text), so a
//! second query over the same corpus costs one embedding; then the query is
//! embedded and the texts ranked by cosine similarity.
//!
//! Every vector used came from a market task (auctioned, verified,
//! receipted): the answer names the tasks this query ran; vectors from
//! earlier queries came from theirs.

use std::sync::Arc;

use mycel_api::{ApiError, SearchHit, SearchRequest, SearchResult, SubmitRequest};
use mycel_protocol::{Advert, Digest, ModelKind};
use mycel_store::{Batch, Store, Tree};
use tokio::sync::mpsc;

use crate::market::Command;
use crate::tasks::{Progress, run_task_with};

/// Most texts in one corpus.
pub const MAX_CORPUS: usize = 100_000;
/// Most hits returned.
pub const MAX_TOP: u32 = 1000;
/// Vectors kept at most; past this, new ones are computed but not kept.
const MAX_CACHED: usize = 200_000;
/// Longest embedding accepted from the cache.
const MAX_DIMENSIONS: usize = 4096;

/// Where the cache keeps its size (vector keys are 64 bytes: no clash).
const COUNT_KEY: &[u8] = b"count";

/// Vectors in the cache: its recorded size, or (a cache written before
/// the size was kept) a count of its keys.
fn held_vectors(store: &dyn Store) -> Result<usize, mycel_store::StoreError> {
    match store.get(Tree::Embeddings, COUNT_KEY)?.map(<[u8; 8]>::try_from) {
        Some(Ok(bytes)) => Ok(u64::from_le_bytes(bytes) as usize),
        _ => Ok(store.scan_prefix(Tree::Embeddings, &[])?.iter().filter(|(k, _)| k.len() == 64).count()),
    }
}

fn key(model: &Digest, text: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&model.0);
    k.extend_from_slice(&text.0);
    k
}

fn decode(bytes: &[u8]) -> Option<Vec<f32>> {
    (bytes.len().is_multiple_of(4) && !bytes.is_empty() && bytes.len() / 4 <= MAX_DIMENSIONS)
        .then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>())
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (dot, na, nb) =
        a.iter().zip(b).fold((0f32, 0f32, 0f32), |(d, na, nb), (x, y)| (d + x * y, na + x * x, nb + y * y));
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

/// The embedding model a search uses: the one named (id or digest), else
/// the one most nodes serve (ties: the fastest).
pub fn model(adverts: &[Advert], named: Option<&str>) -> Result<(String, Digest), ApiError> {
    let mut models: Vec<(String, Digest, usize, f32)> = Vec::new();
    for m in adverts.iter().flat_map(|a| &a.models).filter(|m| m.kind == ModelKind::Embedding) {
        match models.iter_mut().find(|e| e.1 == m.weights) {
            Some(e) => {
                e.2 += 1;
                e.3 = e.3.max(m.throughput.embeddings_per_s);
            }
            None => models.push((m.id.clone(), m.weights, 1, m.throughput.embeddings_per_s)),
        }
    }
    let found = match named {
        Some(name) => models.iter().find(|m| m.0.eq_ignore_ascii_case(name) || m.1.to_hex() == name),
        None => models.iter().max_by(|a, b| a.2.cmp(&b.2).then(a.3.total_cmp(&b.3))),
    };
    found.map(|m| (m.0.clone(), m.1)).ok_or_else(|| match named {
        Some(name) => ApiError::ModelNotFound(format!("no embedding model {name:?} in the swarm")),
        None => ApiError::NoCapablePeer("no embedding model in the swarm".into()),
    })
}

/// A search request that passed its checks, with the model it will use.
pub struct Search {
    request: SearchRequest,
    top: u32,
    model_id: String,
    weights: Digest,
}

impl Search {
    /// Checks `request` (sizes, an embedding model in the swarm): what is
    /// wrong with it, before any work starts.
    pub fn check(request: SearchRequest, adverts: &[Advert]) -> Result<Self, ApiError> {
        if request.corpus.is_empty() || request.corpus.len() > MAX_CORPUS {
            return Err(ApiError::BadRequest(format!("corpus: 1..={MAX_CORPUS} texts, got {}", request.corpus.len())));
        }
        if request.query.trim().is_empty() {
            return Err(ApiError::BadRequest("query: empty".into()));
        }
        let top = request.top.unwrap_or(5);
        if !(1..=MAX_TOP).contains(&top) {
            return Err(ApiError::BadRequest(format!("top {top} not in 1..={MAX_TOP}")));
        }
        let (model_id, weights) = model(adverts, request.model.as_deref())?;
        Ok(Self { request, top, model_id, weights })
    }

    /// The embedding model's id.
    pub fn model(&self) -> &str {
        &self.model_id
    }
}

/// The node's search state: the vector cache.
pub struct Searches {
    store: Arc<dyn Store>,
    /// Vectors in the cache, counted on first use.
    cached: tokio::sync::Mutex<Option<usize>>,
}

/// Vectors for some texts, and where they came from.
pub struct Embedded {
    /// One per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Distinct texts embedded now, through the swarm.
    pub embedded: usize,
    /// Distinct texts found in the cache.
    pub cached: usize,
    /// The embedding task run now, if any.
    pub tasks: Vec<String>,
}

impl Searches {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, cached: tokio::sync::Mutex::new(None) }
    }

    /// Vectors of `texts` by the model `weights`: from the cache, the rest
    /// embedded through the swarm in one task (and kept).
    pub async fn embed(
        &self,
        texts: &[&str],
        weights: Digest,
        market: &mpsc::Sender<Command>,
        progress: &Progress<'_>,
    ) -> Result<Embedded, ApiError> {
        let store = &self.store;
        let internal = |e: mycel_store::StoreError| ApiError::Internal(e.to_string());
        let digests: Vec<Digest> = texts.iter().map(|t| Digest::of(t.as_bytes())).collect();
        let mut vectors: std::collections::HashMap<Digest, Vec<f32>> = std::collections::HashMap::new();
        let mut missing: Vec<(Digest, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // Store reads and the durable write below block: the runtime is told.
        tokio::task::block_in_place(|| -> Result<(), ApiError> {
            for (t, d) in texts.iter().zip(&digests) {
                if !seen.insert(*d) {
                    continue;
                }
                match store.get(Tree::Embeddings, &key(&weights, d)).map_err(internal)?.as_deref().and_then(decode) {
                    Some(v) => {
                        vectors.insert(*d, v);
                    }
                    None => missing.push((*d, (*t).to_string())),
                }
            }
            Ok(())
        })?;
        let cached = vectors.len();
        let mut tasks = Vec::new();
        if !missing.is_empty() {
            let mut embed = SubmitRequest::new("embed", missing.iter().map(|(_, t)| t.clone()).collect());
            embed.model = Some(weights.to_hex());
            let view = run_task_with(market, embed, progress)
                .await
                .map_err(|why| ApiError::NoCapablePeer(format!("embedding: {why}")))?;
            let computed = view.embeddings.clone().unwrap_or_default();
            if computed.len() != missing.len() {
                return Err(ApiError::Internal(format!("{} vectors for {} texts", computed.len(), missing.len())));
            }
            let mut count = self.cached.lock().await;
            let held = match *count {
                Some(n) => n,
                None => tokio::task::block_in_place(|| held_vectors(store.as_ref())).map_err(internal)?,
            };
            let room = MAX_CACHED.saturating_sub(held).min(missing.len());
            if room < missing.len() {
                tracing::warn!(held, "the embedding cache is full: new vectors are not kept");
            }
            let mut batch = Batch::new();
            batch.put(Tree::Embeddings, COUNT_KEY, ((held + room) as u64).to_le_bytes().to_vec());
            for ((d, _), v) in missing.iter().zip(computed) {
                // The first op is the count.
                if batch.ops().len() <= room {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    batch.put(Tree::Embeddings, key(&weights, d), bytes);
                }
                vectors.insert(*d, v);
            }
            tokio::task::block_in_place(|| store.commit(&batch)).map_err(internal)?;
            *count = Some(held + room);
            tasks.push(view.task);
        }
        let vectors = digests.iter().map(|d| vectors.get(d).cloned().unwrap_or_default()).collect();
        Ok(Embedded { vectors, embedded: missing.len(), cached, tasks })
    }

    /// Runs a search.
    pub async fn search(
        &self,
        request: SearchRequest,
        adverts: &[Advert],
        market: &mpsc::Sender<Command>,
    ) -> Result<SearchResult, ApiError> {
        let search = Search::check(request, adverts)?;
        self.run(search, market, &|_| {}).await
    }

    /// Runs a checked search, telling `progress` how its embedding task moves.
    pub async fn run(
        &self,
        search: Search,
        market: &mpsc::Sender<Command>,
        progress: &Progress<'_>,
    ) -> Result<SearchResult, ApiError> {
        let Search { request, top, model_id, weights } = search;
        let mut texts: Vec<&str> = request.corpus.iter().map(String::as_str).collect();
        texts.push(&request.query);
        let Embedded { vectors, embedded, cached, tasks } = self.embed(&texts, weights, market, progress).await?;
        let (query, corpus) = vectors.split_last().ok_or_else(|| ApiError::Internal("no vectors".into()))?;
        let mut hits: Vec<SearchHit> = request
            .corpus
            .iter()
            .zip(corpus)
            .enumerate()
            .map(|(index, (text, v))| SearchHit { index, score: cosine(query, v), text: text.clone() })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        hits.truncate(top as usize);
        Ok(SearchResult { model: model_id, hits, embedded, cached, tasks })
    }
}
