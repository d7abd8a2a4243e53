//! `mycel node`: wires identity, store, network and API together and runs
//! until told to stop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use mycel_api::types::{RUNTIME_FILE, RuntimeInfo};
use mycel_api::{ApiError, ModelView, NodeView, PeerView, StatusView};
use mycel_metrics::Metrics;
use mycel_net::Event;
use mycel_protocol::{Advert, Load, ModelAdvert, ModelKind, Price, Quantization, version};
use mycel_store::SledStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::NodeConfig;

struct View {
    net: mycel_net::Handle,
    adverts: mycel_net::AdvertScope,
    market: tokio::sync::mpsc::Sender<crate::market::Command>,
    started: Instant,
    metrics: Arc<Metrics>,
    routing: Arc<crate::route::Routing>,
    jobs: crate::tasks::Jobs,
    searches: Arc<crate::search::Searches>,
}

/// An error from the market driver as the API reports it: the [`ApiError`]
/// inside where the driver said what kind it is (client mistakes are always
/// raised that way), else ours: a 500 with what went wrong, never a 400.
fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>().unwrap_or_else(|e| ApiError::Internal(format!("{e:#}")))
}

impl View {
    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> crate::market::Command,
    ) -> Result<T, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.market.send(make(reply)).await.map_err(|_| ApiError::Unavailable("the market stopped".into()))?;
        // The driver raises client mistakes as `ApiError`s; anything else
        // is ours: a 500, never a 400.
        rx.await.map_err(|_| ApiError::Unavailable("the market stopped".into()))?.map_err(api_error)
    }

    /// Every advert known: the peers' and this node's own.
    async fn adverts(&self) -> Result<Vec<Advert>, ApiError> {
        let mut adverts: Vec<Advert> =
            self.net.peers().await.map_err(unavailable)?.into_iter().map(|e| e.advert).collect();
        adverts.extend(self.net.own_advert().await.map_err(unavailable)?);
        Ok(adverts)
    }

    async fn reputations(&self) -> std::collections::HashMap<String, f64> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if self.market.send(crate::market::Command::Reputations { reply }).await.is_err() {
            return Default::default();
        }
        rx.await.unwrap_or_default()
    }
}

fn model_view(m: &ModelAdvert) -> ModelView {
    ModelView {
        id: m.id.clone(),
        kind: match m.kind {
            ModelKind::Embedding => "embedding",
            ModelKind::Generation => "generation",
            _ => "other",
        }
        .into(),
        weights: m.weights.to_hex(),
        dimensions: m.dimensions,
        context: m.context,
        quantization: match &m.quantization {
            Quantization::Other(name) => name.clone(),
            q => format!("{q:?}").to_lowercase(),
        },
        embeddings_per_s: m.throughput.embeddings_per_s,
        decode_tokens_per_s: m.throughput.decode_tokens_per_s,
        tools: m.tools,
    }
}

/// How long a request waits for a DHT lookup of its model's workers when
/// the node knows none (see [`View::find_workers`]).
const FIND_WORKERS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Workers found handed to the market at once, at most.
const WORKERS_HANDED: usize = 16;

/// Which workers a request needs: those of the model it names, or (none
/// named, `mycel/auto` or an ensemble, which choose among models) of any
/// model of its kind.
fn workers_key(request: &mycel_api::SubmitRequest) -> Option<mycel_net::ModelKey> {
    Some(model_key(ModelKind::for_task(&request.kind)?, request.model.as_deref()))
}

/// The model named (by weights or id), or any of `kind`.
fn model_key(kind: ModelKind, model: Option<&str>) -> mycel_net::ModelKey {
    match model {
        Some(m) if !crate::route::is_auto(model) && crate::ensemble::Method::of(model).is_none() => {
            mycel_net::ModelKey::named(m)
        }
        _ => mycel_net::ModelKey::Kind(kind),
    }
}

fn unavailable(e: mycel_net::NetError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

impl View {
    /// Before a request is planned: the workers of its model, from the
    /// network's table or, when it knows too few, from provider records in
    /// the DHT (a node listening only to the models it uses knows none of
    /// a model it was never asked for). Those found are handed to the
    /// market here, ahead of the task, so it does not answer "no such
    /// model" before their adverts reach it the usual way.
    ///
    /// A node that hears every advert (`--adverts all`, the default) has
    /// them all already: nothing to find or hand over.
    async fn find_workers(&self, key: Option<mycel_net::ModelKey>) {
        if self.adverts == mycel_net::AdvertScope::All {
            return;
        }
        let Some(key) = key else { return };
        let Ok(Ok(found)) = tokio::time::timeout(FIND_WORKERS_WAIT, self.net.find_workers(key, 1)).await else {
            return;
        };
        for entry in found.into_iter().take(WORKERS_HANDED) {
            let advert = Box::new(entry.advert);
            let _ = self.market.send(crate::market::Command::Advert { peer: entry.peer, advert }).await;
        }
    }
}

impl NodeView for View {
    async fn submit(&self, mut request: mycel_api::SubmitRequest) -> Result<mycel_api::Submitted, ApiError> {
        // Settings of routing and ensembles mean nothing elsewhere: refused, not ignored.
        let ensemble = crate::ensemble::Method::of(request.model.as_deref());
        if ensemble.is_none() && (request.n.is_some() || !request.members.is_empty() || request.judge.is_some()) {
            return Err(ApiError::BadRequest(
                "n, members and judge go with an ensemble model (mycel/vote, mycel/best-of, mycel/moa)".into(),
            ));
        }
        if !crate::route::is_auto(request.model.as_deref()) && request.cost_weight.is_some() {
            return Err(ApiError::BadRequest("cost_weight goes with model mycel/auto".into()));
        }
        self.find_workers(workers_key(&request)).await;
        if let Some(method) = ensemble {
            if request.json || request.json_schema.is_some() || request.logprobs.is_some() || !request.tools.is_empty()
            {
                return Err(ApiError::BadRequest(
                    "JSON mode, logprobs and tools are not supported with ensembles: name one model".into(),
                ));
            }
            let adverts = self.adverts().await?;
            return crate::ensemble::start(
                &self.jobs,
                method,
                request,
                &adverts,
                self.market.clone(),
                self.routing.clone(),
            );
        }
        if !crate::route::is_auto(request.model.as_deref()) {
            return self.ask(|reply| crate::market::Command::Submit { request, reply }).await;
        }
        // mycel/auto: choose the model here, then submit as usual.
        let mut adverts: Vec<Advert> =
            self.net.peers().await.map_err(unavailable)?.into_iter().map(|e| e.advert).collect();
        adverts.extend(self.net.own_advert().await.map_err(unavailable)?);
        let (decision, query) = self.routing.route(&request, &adverts).await?;
        request.model = Some(decision.weights.clone());
        let submitted = self.ask(|reply| crate::market::Command::Submit { request, reply }).await?;
        if let Ok(task) = mycel_protocol::TaskId::from_hex(&submitted.task) {
            info!(%task, model = %decision.model, overhead_ms = decision.overhead_ms, "routed");
            self.routing.remember(task, decision, &query);
        }
        Ok(submitted)
    }

    async fn task(&self, id: String) -> Result<mycel_api::TaskView, ApiError> {
        if let Some(view) = self.jobs.view(&id) {
            return Ok(view);
        }
        let route = self.routing.routed(&id);
        let mut view = self.ask(|reply| crate::market::Command::Get { task: id, reply }).await?;
        view.route = route;
        Ok(view)
    }

    async fn classify(&self, request: mycel_api::ClassifyRequest) -> Result<mycel_api::ClassifyResult, ApiError> {
        self.find_workers(Some(model_key(ModelKind::Embedding, request.model.as_deref()))).await;
        let adverts = self.adverts().await?;
        crate::classify::classify(&self.searches, request, &adverts, &self.market).await
    }

    async fn summarize(&self, request: mycel_api::SummarizeRequest) -> Result<mycel_api::Submitted, ApiError> {
        self.find_workers(Some(model_key(ModelKind::Generation, request.model.as_deref()))).await;
        let adverts = self.adverts().await?;
        crate::summarize::start(&self.jobs, request, &adverts, self.market.clone())
    }

    async fn search(&self, request: mycel_api::SearchRequest) -> Result<mycel_api::SearchResult, ApiError> {
        self.find_workers(Some(model_key(ModelKind::Embedding, request.model.as_deref()))).await;
        let adverts = self.adverts().await?;
        self.searches.search(request, &adverts, &self.market).await
    }

    async fn start_search(&self, request: mycel_api::SearchRequest) -> Result<mycel_api::Submitted, ApiError> {
        self.find_workers(Some(model_key(ModelKind::Embedding, request.model.as_deref()))).await;
        let adverts = self.adverts().await?;
        let search = crate::search::Search::check(request, &adverts)?;
        let (searches, market) = (self.searches.clone(), self.market.clone());
        self.jobs.spawn("search", crate::tasks::Jobs::blank_view(search.model()), move |job| async move {
            let result = searches.run(search, &market, &|p| job.follow(p)).await.map_err(|e| e.to_string())?;
            job.update(&mut |view| view.search = Some(result.clone()));
            Ok(())
        })
    }

    async fn start_classify(&self, request: mycel_api::ClassifyRequest) -> Result<mycel_api::Submitted, ApiError> {
        self.find_workers(Some(model_key(ModelKind::Embedding, request.model.as_deref()))).await;
        let adverts = self.adverts().await?;
        let classify = crate::classify::Classify::check(request, &adverts)?;
        let (searches, market) = (self.searches.clone(), self.market.clone());
        self.jobs.spawn("classify", crate::tasks::Jobs::blank_view(classify.model()), move |job| async move {
            let result = crate::classify::run(&searches, classify, &market, &|p| job.follow(p))
                .await
                .map_err(|e| e.to_string())?;
            job.update(&mut |view| view.classify = Some(result.clone()));
            Ok(())
        })
    }

    async fn choose(&self, request: mycel_api::SubmitRequest) -> Result<mycel_router::Decision, ApiError> {
        let adverts = self.adverts().await?;
        Ok(self.routing.route(&request, &adverts).await?.0)
    }

    async fn export_router(&self) -> Result<mycel_api::RouterShare, ApiError> {
        self.routing.export()
    }

    async fn import_router(&self, share: mycel_api::RouterShare) -> Result<mycel_api::RouterShare, ApiError> {
        self.routing.import(&share)
    }

    async fn learn(&self, outcome: mycel_api::Outcome) -> Result<(), ApiError> {
        let adverts = self.adverts().await?;
        self.routing.learn(outcome, &adverts).await
    }

    async fn feedback(&self, id: String, score: f32) -> Result<mycel_router::Routed, ApiError> {
        self.routing.feedback(&id, score)
    }

    async fn tasks(&self) -> Result<Vec<mycel_api::TaskSummary>, ApiError> {
        self.ask(|reply| crate::market::Command::List { reply }).await
    }

    async fn watch(&self, id: String) -> Result<mycel_api::Watch, ApiError> {
        if let Some(watch) = self.jobs.watch(&id) {
            return Ok(watch);
        }
        self.ask(|reply| crate::market::Command::Watch { task: id, reply }).await
    }

    async fn cancel(&self, id: String) -> Result<mycel_api::TaskSummary, ApiError> {
        self.ask(|reply| crate::market::Command::Cancel { task: id, reply }).await
    }

    async fn metrics(&self) -> Result<String, ApiError> {
        self.metrics.peers_connected.set(self.net.connected().await.map_err(unavailable)?.len() as f64);
        self.metrics.peers_known.set(self.net.peer_count().await.map_err(unavailable)?.peers as f64);
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.market
            .send(crate::market::Command::RefreshMetrics { reply })
            .await
            .map_err(|_| ApiError::Unavailable("the market stopped".into()))?;
        let _ = rx.await;
        Ok(self.metrics.render())
    }

    async fn status(&self) -> Result<StatusView, ApiError> {
        let own = self.net.own_advert().await.map_err(unavailable)?;
        let table = self.net.peer_count().await.map_err(unavailable)?;
        Ok(StatusView {
            peer_id: self.net.local_peer_id().to_string(),
            version: version::SOFTWARE_VERSION.to_string(),
            listen_addrs: self.net.listen_addrs().await.map_err(unavailable)?.iter().map(ToString::to_string).collect(),
            connected_peers: self.net.connected().await.map_err(unavailable)?.len(),
            known_peers: table.peers,
            adverts: self.adverts.as_str().into(),
            table_grew_at_ms: table.grew_at_ms,
            models: own.map(|a| a.models.iter().map(model_view).collect()).unwrap_or_default(),
            uptime_s: self.started.elapsed().as_secs(),
            reachability: {
                let r = self.net.reachability().await.map_err(unavailable)?;
                mycel_api::types::ReachabilityView {
                    reach: r.reach.as_str().into(),
                    relayed_addrs: r.relayed_addrs.iter().map(ToString::to_string).collect(),
                    hole_punches_ok: r.hole_punches_ok,
                    hole_punches_failed: r.hole_punches_failed,
                }
            },
        })
    }

    async fn peers(&self) -> Result<Vec<PeerView>, ApiError> {
        let now = mycel_net::now_ms();
        let reputations = self.reputations().await;
        let paths: HashMap<String, &'static str> = self
            .net
            .paths()
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|p| {
                let how = match (p.direct > 0, p.relayed > 0) {
                    (true, true) => "direct and relayed",
                    (true, false) => "direct",
                    (false, true) => "relayed",
                    (false, false) => "",
                };
                (p.peer.to_string(), how)
            })
            .collect();
        let mut peers: Vec<PeerView> = self
            .net
            .peers()
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|e| PeerView {
                peer_id: e.peer.to_string(),
                software: e.advert.software.clone(),
                models: e.advert.models.iter().map(model_view).collect(),
                cpu: e.advert.hardware.cpu_model.clone(),
                cores: e.advert.hardware.cores,
                memory_bytes: e.advert.hardware.memory_bytes,
                gpus: e.advert.hardware.gpus.iter().map(|g| g.name.clone()).collect(),
                queued_shards: e.advert.load.queued_shards,
                active_shards: e.advert.load.active_shards,
                capacity: e.advert.load.capacity,
                listen_addrs: e.advert.listen_addrs.clone(),
                advert_seq: e.advert.seq,
                last_seen_ms: now.saturating_sub(e.received_ms),
                reputation: reputations.get(&e.peer.to_string()).copied().unwrap_or(mycel_market::reputation::DEFAULT),
                connection: paths.get(&e.peer.to_string()).copied().unwrap_or_default().to_string(),
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        Ok(peers)
    }
}

/// Runs a node until `shutdown` is cancelled.
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> Result<()> {
    let data_dir = config.data_dir.clone();
    // File I/O, sled recovery and hardware probing (which may run
    // nvidia-smi) block: keep them off the async workers.
    let dir = data_dir.clone();
    let chosen_config = config.clone();
    let (key, store, hardware, chosen) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (key, _) = mycel_store::identity::load_or_create(&dir)
            .with_context(|| format!("loading the node identity from {}", dir.display()))?;
        // Opening the store also locks the data dir against a second node.
        let store = SledStore::open(&dir.join("store")).context("opening the node's store")?;
        // Unknown model ids fail here, before the node joins anything.
        let chosen = crate::local::choose(&chosen_config)?;
        Ok((key, store, mycel_models::hardware::detect(), chosen))
    })
    .await
    .context("node start-up task failed")??;
    let peer_id = key.peer_id();
    info!(%peer_id, data_dir = %data_dir.display(), "starting node");

    let auth = mycel_api::Auth::new(config.api_token.clone());
    let listener = mycel_api::bind(config.api, &auth).await?;
    let metrics = Arc::new(Metrics::new());
    let api_addr = listener.local_addr().context("reading the API address")?;

    let net_config = mycel_net::Config::default()
        .with_listen(config.listen.clone())
        .with_bootstrap(config.bootstrap.clone())
        .with_mdns(config.mdns)
        .with_advert_interval(config.advert_interval)
        .with_metrics(metrics.clone());
    let net_config = mycel_net::Config {
        relay_server: config.relay_server,
        peer_target: config.peers,
        advert_scope: config.adverts,
        relays: config.relays.clone(),
        external_addrs: config.external_addrs.clone(),
        autonat_global_only: !config.probe_private_addrs,
        ..net_config
    };
    let (net, mut events, event_loop) = mycel_net::start(&key, net_config)?;
    let net_task = tokio::spawn(event_loop.run(shutdown.clone()));

    let mut advert = Advert {
        seq: 0,
        timestamp_ms: 0,
        software: version::SOFTWARE_VERSION.to_string(),
        models: Vec::new(),
        hardware: hardware.clone(),
        load: Load::default(),
        price: Price::default(),
        listen_addrs: Vec::new(),
    };
    if let Err(e) = net.set_advert(advert.clone()).await {
        // Stopped before it started: the network went first.
        if shutdown.is_cancelled() {
            let _ = net_task.await;
            info!("stopped");
            return Ok(());
        }
        return Err(e.into());
    }

    // Models load (and are measured, once per machine) in the background:
    // the node is in the swarm meanwhile and advertises them when ready.
    let load_config = config.clone();
    let mut loading = Some(tokio::task::spawn_blocking(move || crate::local::load(&load_config, chosen, &hardware)));

    let market_key = mycel_protocol::Keypair::from_secret_bytes(&key.secret_bytes());
    if let Some(fault) = config.fault {
        warn!(?fault, "this node misbehaves on purpose (--fault): for testing only");
    }
    let settings = crate::market::Settings {
        keep_finished: config.keep_finished,
        max_running: config.max_running_tasks,
        // As the network judges adverts: three intervals.
        advert_ttl: config.advert_interval * 3,
        fault: config.fault,
    };
    let store = Arc::new(store);
    let routing = Arc::new(crate::route::Routing::new(
        store.clone(),
        mycel_protocol::Keypair::from_secret_bytes(&key.secret_bytes()),
        metrics.clone(),
        mycel_router::DEFAULT_COST_WEIGHT,
    ));
    let market = crate::market::start(market_key, net.clone(), store.clone(), metrics.clone(), settings);
    let view = Arc::new(View {
        net: net.clone(),
        adverts: config.adverts,
        market: market.clone(),
        started: Instant::now(),
        metrics,
        routing: routing.clone(),
        jobs: crate::tasks::Jobs::new(mycel_protocol::Keypair::from_secret_bytes(&key.secret_bytes())),
        searches: Arc::new(crate::search::Searches::new(store.clone())),
    });
    let api_config = mycel_api::ApiConfig {
        auth,
        rate_per_s: config.api_rate_limit,
        burst: (config.api_rate_limit * 2.0).max(1.0),
        ..mycel_api::ApiConfig::default()
    };
    // What the routers learn spreads between peers, one peer per round.
    let share_task = (!config.router_share_interval.is_zero()).then(|| {
        let (routing, net, every, stop) =
            (routing.clone(), net.clone(), config.router_share_interval, shutdown.clone());
        tokio::spawn(async move {
            let mut turn = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => routing.share_round(&net, &mut turn).await,
                }
            }
        })
    });
    let router = mycel_api::router(view, api_config);
    let api_task = tokio::spawn(mycel_api::serve(listener, router, shutdown.clone()));
    info!(api = %format!("http://{api_addr}"), "API listening");

    // Listen addresses arrive as events; publish the runtime file once the
    // first ones are known.
    let runtime_file = RuntimeFileWriter {
        data_dir: data_dir.clone(),
        api: format!("http://{api_addr}"),
        peer_id: peer_id.to_string(),
    };
    let mut written = false;
    let outcome: Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                loaded = async {
                    match loading.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if loading.is_some() => {
                    loading = None;
                    let models = loaded.context("model loading task failed")??;
                    advert.models = models.adverts();
                    advert.load.capacity = models.pool.config().replicas as u32;
                    net.set_advert(advert.clone()).await?;
                    info!(models = advert.models.len(), "models ready");
                    let models = Arc::new(models);
                    if let Err(e) = routing.models_ready(models.clone()) {
                        warn!(error = %format!("{e:#}"), "mycel/auto is off: the router could not open");
                    }
                    let _ = market.send(crate::market::Command::ModelsReady(models)).await;
                }
                event = events.recv() => {
                    let Some(event) = event else { break };
                    match event {
                        Event::Listening(_) => {
                            let addrs = net.listen_addrs().await.unwrap_or_default();
                            runtime_file.write(&addrs)?;
                            written = true;
                        }
                        Event::Advert { peer, new, advert } => {
                            if new {
                                info!(%peer, "peer joined");
                            }
                            let _ = market.send(crate::market::Command::Advert { peer, advert }).await;
                        }
                        Event::Expired(peer) => {
                            info!(%peer, "peer expired");
                            let _ = market.send(crate::market::Command::PeerLost(peer)).await;
                        }
                        Event::Misbehaviour { peer, reason } => warn!(%peer, %reason, "peer misbehaved"),
                        Event::Market { peer, message } => {
                            let _ = market.send(crate::market::Command::Inbound { from: peer, message }).await;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    info!("shutting down");
    let stop_requested = shutdown.is_cancelled();
    shutdown.cancel();
    let _ = net_task.await;
    if let Some(task) = share_task {
        let _ = task.await;
    }
    match api_task.await {
        Ok(Err(e)) => warn!(error = %e, "API server ended with an error"),
        Err(e) => warn!(error = %e, "API task failed"),
        Ok(Ok(())) => {}
    }
    if written {
        let _ = std::fs::remove_file(data_dir.join(RUNTIME_FILE));
    }
    match outcome {
        // A stop asked for while starting can stop the network under a
        // step that needs it: the stop is what happened, not an error.
        Err(e) if !stop_requested => Err(e),
        _ => {
            info!("stopped");
            Ok(())
        }
    }
}

struct RuntimeFileWriter {
    data_dir: PathBuf,
    api: String,
    peer_id: String,
}

impl RuntimeFileWriter {
    fn write(&self, addrs: &[mycel_net::Multiaddr]) -> Result<()> {
        RuntimeInfo {
            pid: std::process::id(),
            peer_id: self.peer_id.clone(),
            api: self.api.clone(),
            listen_addrs: addrs.iter().map(|a| format!("{a}/p2p/{}", self.peer_id)).collect(),
        }
        .write(&self.data_dir)
        .with_context(|| format!("writing {}", self.data_dir.join(RUNTIME_FILE).display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_failures_are_ours_unless_it_says_otherwise() {
        // A failure inside the node (here: the journal) is a 500; once it
        // came back as 400 Bad Request.
        let ours = api_error(anyhow::anyhow!("journal: no space left on device"));
        assert!(matches!(ours, ApiError::Internal(_)), "{ours:?}");
        assert_eq!(ours.status().as_u16(), 500);
        // What the driver marks as the client's mistake stays a 4xx.
        let theirs = api_error(ApiError::BadRequest("no inputs".into()).into());
        assert!(matches!(theirs, ApiError::BadRequest(_)));
        let missing = api_error(anyhow::Error::from(ApiError::NotFound("no task".into())).context("looking it up"));
        assert!(matches!(missing, ApiError::NotFound(_)), "{missing:?}");
    }
}
