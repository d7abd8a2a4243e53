//! The event loop that owns the swarm, and the handle that talks to it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, TransportError, autonat, dcutr, gossipsub, identify, kad, mdns, noise,
    relay, tcp, yamux,
};
use mycel_protocol::rpc::{Request, Response};
use mycel_protocol::{Advert, Cfp, Digest, Keypair, Signed, Wire, limits, version};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::behaviour::{Behaviour, BehaviourConfig, BehaviourEvent};
use crate::prune::Protection;
use crate::table::{CapabilityTable, PeerEntry, Refused, TableConfig, Via};
use crate::{AdvertScope, Config, Event, ModelKey, NetError, RequestError, now_ms};

/// Commands queued for the loop; beyond this, callers wait.
const COMMAND_QUEUE: usize = 256;
/// Requesters whose gossiped-CFP allowance is tracked at once.
const CFP_SIGNERS: usize = 4096;
/// Events queued for the node; beyond this, events are dropped (the table
/// stays the source of truth, so nothing is lost but a notification).
const EVENT_QUEUE: usize = 1024;
/// Delay before re-publishing our advert after a peer joins the advert
/// topic, so a burst of joins costs one publish.
const REPUBLISH_DEBOUNCE: Duration = Duration::from_millis(250);
/// Peers a node asks for their capability table after it starts. One full
/// table is enough to join; a few guard against a peer that lies by
/// omission. After that, gossip keeps the table current.
const SYNC_PEERS: usize = 3;
/// A node that joins is in nobody's gossip mesh for its first heartbeat or
/// two, so adverts published then by nodes it is not connected to pass it
/// by, and its first sync may predate them. One more sync this long after
/// the first closes that gap; it costs one response of adverts, almost all
/// already held, which are decoded but not re-verified.
const RESYNC_AFTER: Duration = Duration::from_millis(1500);
/// The same gap from the other side: a node's first advert can miss peers
/// that joined together with it. One repeat this long after the first
/// delivery, once every neighbour's mesh exists, reaches them.
const JOIN_REPEAT_AFTER: Duration = Duration::from_millis(2000);
/// Relays a node behind NAT keeps a reservation with: one more than
/// needed, so losing one relay does not make it unreachable.
const RELAYS_WANTED: usize = 2;
/// After an advert expired, this long a node not connected to any bootstrap
/// peer dials them (the swarm may have split, see `redial_bootstrap`).
const REDIAL_AFTER_EXPIRY: Duration = Duration::from_secs(300);
/// A node looks up its own id in the DHT about this often (a quarter more or
/// less, drawn each time): see `refresh_dht`.
const DHT_REFRESH: Duration = Duration::from_secs(600);
/// A peer for a full DHT bucket holding a disconnected entry is let in (and
/// that entry dialled, to see whether it is still alive) at most this often;
/// see `kad_add`.
const REVIVE_EVERY: Duration = Duration::from_secs(30);

/// A node's table knowing fewer workers than this for a model it is asked
/// for looks up more in the DHT.
const LOOKUP_BELOW: usize = 3;
/// Providers a lookup asks for their advert, at most.
const LOOKUP_ASK: usize = 16;
/// One DHT lookup per model this often, at most: a model served by fewer
/// than [`LOOKUP_BELOW`] nodes would otherwise cost one per request.
const LOOKUP_EVERY: Duration = Duration::from_secs(30);
/// After a lookup that found no worker, the next may come this soon: a
/// worker that just became reachable (a relay took it) re-announces itself
/// within seconds, and the user asking again should find it.
const LOOKUP_AGAIN_AFTER_NONE: Duration = Duration::from_secs(5);
/// Keys whose last lookup is remembered (for [`LOOKUP_EVERY`]).
const LOOKUPS_REMEMBERED: usize = 1024;
/// With [`AdvertScope::Used`], a model not asked for this long is no
/// longer listened to.
const USE_IDLE: Duration = Duration::from_secs(600);
/// Model advert topics a node listens to at most: adverts name models
/// freely, and each topic costs a gossip mesh.
const MODEL_TOPICS: usize = 256;
/// Models whose last catalogue advert a node remembers, at most.
const CATALOGUE_MODELS: usize = 4096;

/// A search for the workers of a model: a DHT lookup, then one advert
/// request to each provider found (up to [`LOOKUP_ASK`]), all of them even
/// after the callers waiting had what they wanted, so the table knows
/// several workers, not just the first to answer.
struct Lookup {
    key: ModelKey,
    asked: HashSet<PeerId>,
    /// Advert requests not answered yet.
    outstanding: usize,
    query_done: bool,
    /// Callers waiting until the table knows this many workers.
    waiting: Vec<(usize, Reply<Vec<PeerEntry>>)>,
}

/// What AutoNAT found about this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Not probed yet (or peers disagree).
    Unknown,
    /// Peers reached it on an address they saw.
    Public,
    /// Peers could not dial it back: behind NAT or a firewall.
    Private,
}

impl Reach {
    /// The word the API and the CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Unknown => "unknown",
            Reach::Public => "public",
            Reach::Private => "private",
        }
    }
}

/// How this node is reached from outside.
#[derive(Debug, Clone)]
pub struct Reachability {
    /// What AutoNAT found.
    pub reach: Reach,
    /// Addresses through relays this node listens on.
    pub relayed_addrs: Vec<Multiaddr>,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches_ok: u64,
    /// Hole punches that failed (the relayed connection stays).
    pub hole_punches_failed: u64,
}

/// The connections held to one peer, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPaths {
    /// The peer.
    pub peer: PeerId,
    /// Direct connections.
    pub direct: u8,
    /// Connections through a relay.
    pub relayed: u8,
}

type Reply<T> = oneshot::Sender<T>;

/// The size of the capability table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSize {
    /// Peers held.
    pub peers: usize,
    /// When a peer last joined (ms since the Unix epoch); `None` before
    /// the first.
    pub grew_at_ms: Option<u64>,
}
/// Providers found so far, and who waits for them.
type ProviderQuery = (HashSet<PeerId>, Reply<Result<Vec<PeerId>, NetError>>);

enum Command {
    ListenAddrs(Reply<Vec<Multiaddr>>),
    Peers(Reply<Vec<PeerEntry>>),
    PeerCount(Reply<TableSize>),
    Connected(Reply<Vec<PeerId>>),
    Paths(Reply<Vec<PeerPaths>>),
    Reachability(Reply<Reachability>),
    SetAdvert(Box<Advert>),
    /// The load to carry in the next periodic advert.
    SetLoad(mycel_protocol::Load),
    OwnAdvert(Reply<Option<Advert>>),
    Dial(Multiaddr, Reply<Result<(), NetError>>),
    Request(PeerId, Request, Reply<Result<Response, RequestError>>),
    FindProviders(Digest, Reply<Result<Vec<PeerId>, NetError>>),
    FindWorkers(ModelKey, usize, Reply<Vec<PeerEntry>>),
    /// Bytes for a gossip topic, already checked (or deliberately not).
    Publish(&'static str, Vec<u8>),
    /// What to answer peers asking for our router's outcomes.
    SetRouterShare(Option<Box<Signed<mycel_protocol::router::RouterOutcomes>>>),
}

/// Cheap to clone; every method is one command to the [`EventLoop`].
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    local: PeerId,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Handle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Addresses the node listens on (concrete, with real ports).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(Command::ListenAddrs).await
    }

    /// Every peer in the capability table.
    pub async fn peers(&self) -> Result<Vec<PeerEntry>, NetError> {
        self.call(Command::Peers).await
    }

    /// How many peers the capability table holds, and since when (cheaper
    /// than `peers`).
    pub async fn peer_count(&self) -> Result<TableSize, NetError> {
        self.call(Command::PeerCount).await
    }

    /// Peers with an open connection.
    pub async fn connected(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(Command::Connected).await
    }

    /// Every connected peer, with how it is connected (directly, through a
    /// relay, or both while hole punching replaces the relay).
    pub async fn paths(&self) -> Result<Vec<PeerPaths>, NetError> {
        self.call(Command::Paths).await
    }

    /// Whether this node is reachable from outside, its relayed addresses
    /// and how its hole punches went.
    pub async fn reachability(&self) -> Result<Reachability, NetError> {
        self.call(Command::Reachability).await
    }

    /// Sets what this node advertises and publishes it soon. Sequence
    /// number, timestamp and listen addresses are filled in by the loop.
    pub async fn set_advert(&self, advert: Advert) -> Result<(), NetError> {
        self.commands.send(Command::SetAdvert(Box::new(advert))).await.map_err(|_| NetError::Stopped)
    }

    /// Sets the load the next periodic advert carries (no extra publish:
    /// load changes often, adverts go out every interval).
    pub async fn set_load(&self, load: mycel_protocol::Load) -> Result<(), NetError> {
        self.commands.send(Command::SetLoad(load)).await.map_err(|_| NetError::Stopped)
    }

    /// What to answer peers that ask for this node's router outcomes
    /// ([`Request::RouterOutcomes`]); `None`: refuse.
    pub async fn set_router_share(
        &self,
        share: Option<Signed<mycel_protocol::router::RouterOutcomes>>,
    ) -> Result<(), NetError> {
        self.commands.send(Command::SetRouterShare(share.map(Box::new))).await.map_err(|_| NetError::Stopped)
    }

    /// The advert as last published.
    pub async fn own_advert(&self) -> Result<Option<Advert>, NetError> {
        self.call(Command::OwnAdvert).await
    }

    /// Connects to an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|r| Command::Dial(addr, r)).await?
    }

    /// Sends a direct request and waits for its response (bounded by the
    /// request timeout).
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, RequestError> {
        self.call(|r| Command::Request(peer, request, r)).await.map_err(|_| RequestError::Stopped)?
    }

    /// Looks up in the DHT which peers provide a model by weight digest.
    pub async fn find_providers(&self, model: Digest) -> Result<Vec<PeerId>, NetError> {
        self.call(|r| Command::FindProviders(model, r)).await?
    }

    /// The peers serving a model, from the table. With
    /// [`AdvertScope::Used`], also marks the model used (the node listens
    /// to its adverts from now on) and, when the table knows fewer than a
    /// few, looks it up in the DHT, each provider found asked for its
    /// advert; waits for that lookup only while the table knows fewer than
    /// `want`.
    pub async fn find_workers(&self, model: ModelKey, want: usize) -> Result<Vec<PeerEntry>, NetError> {
        self.call(|r| Command::FindWorkers(model, want, r)).await
    }

    /// Publishes a signed call for proposals on the CFP gossip topic, for
    /// workers the requester does not know directly.
    pub async fn publish_cfp(&self, cfp: &Signed<Cfp>) -> Result<(), NetError> {
        let data = cfp.encode().map_err(|e| NetError::Encode(format!("a CFP: {e}")))?;
        self.commands.send(Command::Publish(version::CFP_TOPIC, data)).await.map_err(|_| NetError::Stopped)
    }

    /// Publishes raw bytes on a gossip topic, bypassing every check. For
    /// fault injection (misbehaving nodes in tests and the testnet) only.
    #[doc(hidden)]
    pub async fn publish_raw(&self, topic: &'static str, data: Vec<u8>) -> Result<(), NetError> {
        self.commands.send(Command::Publish(topic, data)).await.map_err(|_| NetError::Stopped)
    }
}

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// Signs our adverts (the same key as the swarm identity).
    key: Keypair,
    config: Config,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Newest verified advert per peer.
    table: CapabilityTable,
    /// What we advertise, as last set by the node; `None` until set.
    advert: Option<Advert>,
    /// The advert as last published (seq, timestamp, addresses filled in).
    published: Option<Advert>,
    /// The same, signed, for peers that ask for it.
    published_signed: Option<Signed<Advert>>,
    /// Model advert topics we listen to.
    model_topics: HashSet<String>,
    /// When a catalogue advert was last heard for each model's weights,
    /// and whether it was ours; a model missing counts as heard from
    /// another node when this one started.
    catalogue_heard: HashMap<Digest, (Instant, bool)>,
    /// When the node started, for [`Self::catalogue_heard`].
    started: Instant,
    /// With [`AdvertScope::Used`]: the models asked for, and when last.
    used: HashMap<Digest, Instant>,
    /// When each key may be looked up in the DHT again.
    looked_up: HashMap<ModelKey, Instant>,
    /// Worker lookups in progress, by DHT query.
    lookups: HashMap<kad::QueryId, Lookup>,
    /// Advert requests to the providers a lookup found.
    lookup_requests: HashMap<OutboundRequestId, kad::QueryId>,
    /// Sequence number of the last advert; starts from the wall clock so a
    /// restarted node's adverts supersede its old ones.
    last_seq: u64,
    /// Concrete listen addresses, from `NewListenAddr`.
    listen_addrs: Vec<Multiaddr>,
    /// When to re-publish early (a peer joined); `None` when not planned.
    republish_at: Option<Instant>,
    /// Announce our models in the DHT again with that republish (our
    /// external addresses changed).
    reannounce: bool,
    /// Provider record keys we announced.
    providing: HashSet<Vec<u8>>,
    /// Peers we asked for their adverts (at most [`SYNC_PEERS`]).
    synced: HashSet<PeerId>,
    /// Whether an advert of ours has reached at least one peer; until
    /// then, every peer joining the topic triggers a re-publish.
    advert_delivered: bool,
    /// When to ask one peer for its table again after joining; `None` once
    /// done or before the first sync.
    resync_at: Option<Instant>,
    /// Whether the re-sync after joining was scheduled already.
    resync_planned: bool,
    /// Our own advert-sync requests in flight.
    sync_requests: HashSet<OutboundRequestId>,
    /// Callers waiting for direct responses.
    pending_requests: HashMap<OutboundRequestId, (PeerId, Reply<Result<Response, RequestError>>)>,
    /// Callers waiting for provider lookups, with what was found so far.
    pending_providers: HashMap<kad::QueryId, ProviderQuery>,
    /// Bootstrap addresses, to name them when they fail.
    bootstrap_peers: HashSet<PeerId>,
    /// Bootstrap peers we warned about and have not reached since.
    bootstrap_warned: HashSet<PeerId>,
    /// Events dropped because the node was not reading them.
    dropped_events: u64,
    /// Inbound request allowance per peer; entries of disconnected peers
    /// are dropped, so this is bounded by the connection limit.
    inbound_rate: HashMap<PeerId, crate::rate::TokenBucket>,
    /// Gossiped CFPs allowed per requester (by signer), oldest first out
    /// past [`CFP_SIGNERS`].
    cfp_rate: HashMap<PeerId, crate::rate::TokenBucket>,
    /// Our router's latest signed outcomes, for peers that ask.
    router_share: Option<Box<Signed<mycel_protocol::router::RouterOutcomes>>>,
    /// What AutoNAT says about us.
    reach: Reach,
    /// Relay servers among our peers, with the address we dialled them on.
    relay_candidates: HashMap<PeerId, Multiaddr>,
    /// Relays we listen through (a reservation each).
    relay_listeners: HashMap<PeerId, ListenerId>,
    /// The address of every direct connection we dialled, to know how to
    /// reach a relay again.
    dialled: HashMap<ConnectionId, Multiaddr>,
    hole_punches_ok: u64,
    hole_punches_failed: u64,
    /// Connected peers' use, to keep to the peer target.
    pruner: crate::prune::Pruner,
    /// Peers holding a reservation with our relay, and the circuits we
    /// carry per peer: closing their connections would cut them off.
    relay_clients: HashSet<PeerId>,
    circuits: HashMap<PeerId, u32>,
    /// When an advert last expired.
    last_expiry: Option<Instant>,
    /// Whether a bootstrap peer was connected since then.
    bootstrap_reached: bool,
    /// When a full DHT bucket last took a new peer (see `kad_add`).
    last_revival: Option<Instant>,
    /// When the node next looks up its own id (see `refresh_dht`).
    next_dht_refresh: Instant,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").field("peer", self.swarm.local_peer_id()).field("peers", &self.table.len()).finish()
    }
}

/// Builds the swarm, starts listening and dials the bootstrap peers. The
/// returned loop does nothing until [`EventLoop::run`] is awaited.
pub fn start(key: &Keypair, config: Config) -> Result<(Handle, mpsc::Receiver<Event>, EventLoop), NetError> {
    let behaviour_config = BehaviourConfig {
        mdns: config.mdns,
        max_connections: config.max_connections,
        request_timeout: config.request_timeout,
        gossip_heartbeat: config.gossip_heartbeat,
        relay_server: config.relay_server,
        autonat_global_only: config.autonat_global_only,
        metrics: config.metrics.clone(),
    };
    let mut swarm = SwarmBuilder::with_existing_identity(key.to_libp2p())
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Setup(format!("TCP transport: {e}")))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Setup(format!("relay client: {e}")))?
        .with_behaviour(|k, relay| Behaviour::new(k, relay, &behaviour_config).map_err(Into::into))
        .map_err(|e| NetError::Setup(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();

    for addr in &config.listen {
        listen(&mut swarm, addr)?;
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    // Fixed relays are listened on by `retake_fixed_relays`, below and on
    // every tick; here only their form is checked, so a bad one is an
    // error at start rather than a relay silently never used.
    if let Some(relay) = config.relays.iter().find(|r| !matches!(r.iter().last(), Some(Protocol::P2p(_)))) {
        return Err(NetError::Listen { addr: relay.clone(), reason: "a relay's address ends with /p2p/<id>".into() });
    }
    // A node listening only to the models it uses subscribes to their
    // topics as it uses them (`Handle::find_workers`).
    // Every node hears the catalogue (one advert per model, see
    // `publish_catalogue`).
    let general = (config.advert_scope == AdvertScope::All).then_some(version::ADVERT_TOPIC);
    for topic in general.into_iter().chain([version::CATALOGUE_TOPIC, version::CFP_TOPIC]) {
        let topic = gossipsub::IdentTopic::new(topic);
        swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| NetError::Setup(format!("subscribe: {e}")))?;
    }

    let mut bootstrap_peers = HashSet::new();
    for addr in &config.bootstrap {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            bootstrap_peers.insert(peer);
            let mut bare = addr.clone();
            bare.pop();
            swarm.behaviour_mut().kad.add_address(&peer, bare);
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let local = *swarm.local_peer_id();
    let (peer_target, prune_grace) = (config.peer_target, config.prune_grace);
    let table = CapabilityTable::new(
        local,
        TableConfig { ttl: config.advert_ttl, max_skew: Duration::from_secs(30), ..TableConfig::default() },
    );
    let mut event_loop = EventLoop {
        swarm,
        key: Keypair::from_secret_bytes(&key.secret_bytes()),
        config,
        commands: cmd_rx,
        events: ev_tx,
        table,
        advert: None,
        published: None,
        published_signed: None,
        model_topics: HashSet::new(),
        catalogue_heard: HashMap::new(),
        started: Instant::now(),
        used: HashMap::new(),
        looked_up: HashMap::new(),
        lookups: HashMap::new(),
        lookup_requests: HashMap::new(),
        last_seq: 0,
        listen_addrs: Vec::new(),
        republish_at: None,
        reannounce: false,
        providing: HashSet::new(),
        synced: HashSet::new(),
        advert_delivered: false,
        resync_at: None,
        resync_planned: false,
        sync_requests: HashSet::new(),
        pending_requests: HashMap::new(),
        pending_providers: HashMap::new(),
        bootstrap_peers,
        bootstrap_warned: HashSet::new(),
        dropped_events: 0,
        inbound_rate: HashMap::new(),
        cfp_rate: HashMap::new(),
        router_share: None,
        reach: Reach::Unknown,
        relay_candidates: HashMap::new(),
        relay_listeners: HashMap::new(),
        dialled: HashMap::new(),
        hole_punches_ok: 0,
        hole_punches_failed: 0,
        pruner: crate::prune::Pruner::new(peer_target, prune_grace),
        relay_clients: HashSet::new(),
        circuits: HashMap::new(),
        last_expiry: None,
        bootstrap_reached: false,
        last_revival: None,
        next_dht_refresh: Instant::now() + spread(DHT_REFRESH),
    };
    event_loop.retake_fixed_relays();
    Ok((Handle { commands: cmd_tx, local }, ev_rx, event_loop))
}

/// `period`, a quarter more or less, drawn anew each call: nodes started
/// together do not then act together.
fn spread(period: Duration) -> Duration {
    use std::hash::BuildHasher;
    let draw = (std::hash::RandomState::new().hash_one(Instant::now()) % 1000) as f64 / 1000.0;
    period.mul_f64(0.75 + 0.5 * draw)
}

fn listen(swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) -> Result<ListenerId, NetError> {
    preflight(addr)?;
    swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen {
        addr: addr.clone(),
        reason: match e {
            TransportError::MultiaddrNotSupported(_) => {
                "address not supported (use /ip4/HOST/tcp/PORT or /ip4/HOST/udp/PORT/quic-v1)".to_string()
            }
            TransportError::Other(io) if io.kind() == std::io::ErrorKind::AddrInUse => "port already in use".into(),
            TransportError::Other(io) => io.to_string(),
        },
    })
}

/// libp2p's TCP listeners set SO_REUSEPORT, so a second process asking
/// for a port already in use would silently share it (and half of the
/// incoming connections). Binding the port once without that option first
/// turns this into the clear error users expect.
fn preflight(addr: &Multiaddr) -> Result<(), NetError> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(n) => port = Some((n, true)),
            Protocol::Udp(n) => port = Some((n, false)),
            _ => {}
        }
    }
    let (Some(ip), Some((port, tcp))) = (ip, port) else { return Ok(()) };
    if port == 0 {
        return Ok(());
    }
    let socket = std::net::SocketAddr::new(ip, port);
    let result =
        if tcp { std::net::TcpListener::bind(socket).map(drop) } else { std::net::UdpSocket::bind(socket).map(drop) };
    result.map_err(|e| NetError::Listen {
        addr: addr.clone(),
        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
            "port already in use (is another mycel node running?)".into()
        } else {
            e.to_string()
        },
    })
}

impl EventLoop {
    /// Runs until `shutdown` is cancelled or every [`Handle`] is dropped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.advert_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The catalogue's turns are finer than the advert interval.
        let mut catalogue = tokio::time::interval(self.config.advert_interval / 4);
        catalogue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let republish = self.republish_at;
            let resync = self.resync_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = catalogue.tick() => self.publish_catalogue(),
                _ = tick.tick() => {
                    self.publish_advert();
                    self.expire();
                    self.redial_bootstrap();
                    self.retake_fixed_relays();
                    self.prune();
                    self.keep_floor();
                    self.forget_unused();
                    self.refresh_dht();
                }
                _ = async { tokio::time::sleep_until(republish.unwrap_or_else(Instant::now)).await },
                    if republish.is_some() => {
                    self.republish_at = None;
                    self.publish_advert();
                    if std::mem::take(&mut self.reannounce) {
                        self.reannounce_models();
                    }
                }
                _ = async { tokio::time::sleep_until(resync.unwrap_or_else(Instant::now)).await },
                    if resync.is_some() => {
                    self.resync_at = None;
                    self.resync();
                }
            }
        }
        info!(peer = %self.swarm.local_peer_id(), "network stopped");
    }

    /// Dials the bootstrap peers when connected to none of them and the
    /// swarm may have split (adverts expired lately, and no bootstrap peer
    /// reached since) or the node is nearly alone: after a partition heals,
    /// this is how the two sides find each other again. Not otherwise: a
    /// bootstrap node may have closed our connection to keep to its peer
    /// target, and redialling at once would make it hold one to every node.
    fn redial_bootstrap(&mut self) {
        if self.bootstrap_peers.iter().any(|p| self.swarm.is_connected(p)) {
            return;
        }
        let lonely = self.swarm.connected_peers().count() < crate::prune::FLOOR;
        // Once reached, a bootstrap peer that closes our connection again
        // is keeping to its peer target, not across a split: each node
        // redialling it every tick kept a bootstrap node of a 200-node
        // swarm at 179 connections.
        let split = !self.bootstrap_reached && self.last_expiry.is_some_and(|at| at.elapsed() < REDIAL_AFTER_EXPIRY);
        if !lonely && !split {
            return;
        }
        let missing: Vec<PeerId> = self.bootstrap_peers.iter().copied().collect();
        for peer in missing {
            if let Err(e) = self.swarm.dial(peer) {
                debug!(%peer, error = %e, "redial of a bootstrap peer failed");
            }
        }
    }

    /// Every [`DHT_REFRESH`] or so, looks up the node's own id: its
    /// neighbourhood in the DHT stays known to it and it to them (where
    /// provider records are kept), at the cost of one walk, about twenty
    /// peers. It replaces Kademlia's periodic bootstrap, which also walks
    /// toward every farther bucket (see `Behaviour::new`).
    fn refresh_dht(&mut self) {
        if Instant::now() < self.next_dht_refresh {
            return;
        }
        self.next_dht_refresh = Instant::now() + spread(DHT_REFRESH);
        let local = *self.swarm.local_peer_id();
        self.swarm.behaviour_mut().kad.get_closest_peers(local);
    }

    /// Puts a peer's address in the DHT routing table, as Kademlia would on
    /// connection, with a bound on the dials that costs. A full bucket
    /// holding a disconnected entry takes a new peer only after dialling
    /// that entry to see whether it is alive; with the pruner closing
    /// connections, far buckets fill with such entries (alive, merely
    /// pruned), so every new connection from a peer not in the table would
    /// dial a pruned peer. Here a peer goes in at once where its bucket has
    /// room (or holds it already); a full bucket takes one, with its check,
    /// at most every [`REVIVE_EVERY`]. A peer left out is still found
    /// through others' tables, and dead entries are still replaced, only
    /// more slowly. (A bound, not the cure of the churn measured at 200
    /// nodes: that was the bootstrap's walks, see `on_kad_query`.)
    fn kad_add(&mut self, peer: PeerId, addr: Multiaddr) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let room = match kad.kbucket(peer) {
            // Our own id.
            None => return,
            Some(bucket) => {
                bucket.num_entries() < kad::K_VALUE.get() || bucket.iter().any(|e| *e.node.key.preimage() == peer)
            }
        };
        if !room {
            if self.last_revival.is_some_and(|at| at.elapsed() < REVIVE_EVERY) {
                return;
            }
            self.last_revival = Some(Instant::now());
        }
        kad.add_address(&peer, addr);
    }

    /// Closes the least used connections past the high-water mark (see
    /// [`crate::prune`]).
    fn prune(&mut self) {
        // The advert meshes carry what every node must hear; the CFP
        // topic's mesh re-forms among whoever stays connected.
        let gossip = &self.swarm.behaviour().gossipsub;
        let mut protected: HashMap<PeerId, Protection> = HashMap::new();
        for peer in gossip.topics().filter(|t| version::is_advert_topic(t.as_str())).flat_map(|t| gossip.mesh_peers(t))
        {
            protected.insert(*peer, Protection::Mesh);
        }
        // A worker's users: peers listening to the topic of a model we
        // serve (with `--adverts used`, the requesters of our models).
        // Closing them would cut them off our adverts; these connections
        // are what serving costs, and grow with our users, not the swarm.
        let served: HashSet<gossipsub::TopicHash> = self
            .advert
            .iter()
            .flat_map(|a| &a.models)
            .map(|m| gossipsub::IdentTopic::new(version::model_advert_topic(&m.weights)).hash())
            .collect();
        if !served.is_empty() {
            for (peer, _) in gossip.all_peers().filter(|(_, topics)| topics.iter().any(|t| served.contains(t))) {
                protected.entry(*peer).or_insert(Protection::Users);
            }
        }
        let others = self
            .relay_listeners
            .keys()
            .chain(&self.relay_clients)
            .chain(self.circuits.keys())
            .chain(self.pending_requests.values().map(|(peer, _)| peer));
        for peer in others {
            protected.entry(*peer).or_insert(Protection::Other);
        }
        let now = std::time::Instant::now();
        let census = self.pruner.census(now, |p| protected.get(p).copied());
        for (reason, n) in census.by_reason() {
            self.config.metrics.connections.with(reason).set(n as f64);
        }
        let closing = self.pruner.to_close(now, |p| protected.contains_key(p));
        if !closing.is_empty() {
            debug!(
                closing = closing.len(),
                target = self.config.peer_target,
                ?census,
                "closing the least used connections"
            );
            self.config.metrics.connections_pruned.add(closing.len() as u64);
        }
        for peer in closing {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Under [`crate::prune::FLOOR`] connected peers (others pruned us, or
    /// a partition healed), dials peers from the table until at it.
    fn keep_floor(&mut self) {
        let connected = self.swarm.connected_peers().count();
        let Some(missing) = crate::prune::FLOOR.checked_sub(connected).filter(|m| *m > 0) else { return };
        let local = *self.swarm.local_peer_id();
        let known: Vec<PeerId> = self
            .table
            .entries()
            .map(|e| e.peer)
            .filter(|p| *p != local && !self.swarm.is_connected(p))
            .take(missing)
            .collect();
        for peer in known {
            if let Err(e) = self.swarm.dial(peer) {
                debug!(%peer, error = %e, "dial to keep the floor failed");
            }
        }
    }

    fn emit(&mut self, event: Event) {
        if self.events.try_send(event).is_err() {
            self.dropped_events += 1;
            if self.dropped_events.is_power_of_two() {
                debug!(dropped = self.dropped_events, "network events dropped (nobody reading)");
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(r) => {
                let _ = r.send(self.listen_addrs.clone());
            }
            Command::Peers(r) => {
                let _ = r.send(self.table.entries().cloned().collect());
            }
            Command::PeerCount(r) => {
                let _ = r.send(TableSize { peers: self.table.len(), grew_at_ms: self.table.grew_at_ms() });
            }
            Command::Connected(r) => {
                let _ = r.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Paths(r) => {
                let paths = self.swarm.behaviour().paths.clone_counts();
                let _ = r.send(
                    paths.into_iter().map(|(peer, (direct, relayed))| PeerPaths { peer, direct, relayed }).collect(),
                );
            }
            Command::Reachability(r) => {
                let _ = r.send(Reachability {
                    reach: self.reach,
                    relayed_addrs: self.listen_addrs.iter().filter(|a| crate::paths::is_relayed(a)).cloned().collect(),
                    hole_punches_ok: self.hole_punches_ok,
                    hole_punches_failed: self.hole_punches_failed,
                });
            }
            Command::SetAdvert(advert) => {
                self.provide_models(&advert);
                self.advert = Some(*advert);
                self.republish_at = Some(Instant::now());
            }
            Command::SetRouterShare(share) => self.router_share = share,
            Command::SetLoad(load) => {
                if let Some(advert) = &mut self.advert {
                    advert.load = load;
                }
            }
            Command::OwnAdvert(r) => {
                let _ = r.send(self.published.clone());
            }
            Command::Dial(addr, r) => {
                let result = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| NetError::Dial { addr: addr.clone(), reason: e.to_string() });
                let _ = r.send(result);
            }
            Command::Request(peer, request, r) => {
                self.pruner.used(&peer, std::time::Instant::now());
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.pending_requests.insert(id, (peer, r));
            }
            Command::FindWorkers(key, want, r) => self.find_workers(key, want, r),
            Command::FindProviders(model, r) => {
                let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&model.0));
                self.pending_providers.insert(id, (HashSet::new(), r));
            }
            Command::Publish(topic, data) => {
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), data) {
                    debug!(%topic, error = %e, "publish failed");
                }
            }
        }
    }

    /// Behind NAT (or with relays named), keeps reservations with up to
    /// [`RELAYS_WANTED`] relays. Once taken they are kept, even if AutoNAT
    /// later finds the node public: its verdicts can flip while a node
    /// starts (one probe on QUIC fails, one on TCP works), and a peer that
    /// just learned the relayed address would find nothing there. A public
    /// node advertises its external addresses first anyway.
    fn take_relays(&mut self) {
        if self.reach != Reach::Private {
            return;
        }
        let wanted: Vec<(PeerId, Multiaddr)> = self
            .relay_candidates
            .iter()
            .filter(|(p, _)| !self.relay_listeners.contains_key(p))
            .take(RELAYS_WANTED.saturating_sub(self.relay_listeners.len()))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in wanted {
            let circuit = addr.with_p2p(peer).unwrap_or_else(|a| a).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    info!(relay = %peer, "behind NAT: asking a relay for a reservation");
                    self.relay_listeners.insert(peer, id);
                }
                Err(e) => warn!(%circuit, error = %e, "cannot listen through a relay"),
            }
        }
    }

    /// Listens through the named relays: at start, and again whenever a
    /// reservation ended.
    fn retake_fixed_relays(&mut self) {
        for relay in &self.config.relays {
            let Some(Protocol::P2p(peer)) = relay.iter().last() else { continue };
            if self.relay_listeners.contains_key(&peer) {
                continue;
            }
            match self.swarm.listen_on(relay.clone().with(Protocol::P2pCircuit)) {
                Ok(id) => {
                    self.relay_listeners.insert(peer, id);
                }
                Err(e) => debug!(%relay, error = %e, "cannot listen through a named relay"),
            }
        }
    }

    /// Announces provider records for models we did not announce yet: by
    /// weights, by id and by kind (see [`ModelKey`]).
    fn provide_models(&mut self, advert: &Advert) {
        for model in &advert.models {
            for key in ModelKey::of(model) {
                let key = key.record_key();
                if self.providing.insert(key.clone())
                    && let Err(e) = self.swarm.behaviour_mut().kad.start_providing(kad::RecordKey::new(&key))
                {
                    warn!(model = %model.id, error = %e, "cannot announce model in the DHT");
                }
            }
        }
    }

    /// Announces every served model's provider records again: they carry
    /// the external addresses we had when they were announced, and a node
    /// behind NAT has a dialable one only once a relay took it.
    fn reannounce_models(&mut self) {
        debug!(external = ?self.swarm.external_addresses().collect::<Vec<_>>(), "announcing our models again");
        self.providing.clear();
        if let Some(advert) = self.advert.clone() {
            self.provide_models(&advert);
        }
    }

    fn listen_to(&mut self, topic: String) {
        if self.model_topics.contains(&topic) {
            return;
        }
        if self.model_topics.len() >= MODEL_TOPICS {
            debug!(%topic, "too many model topics; not listening to another");
            return;
        }
        match self.swarm.behaviour_mut().gossipsub.subscribe(&gossipsub::IdentTopic::new(topic.clone())) {
            Ok(_) => {
                self.model_topics.insert(topic);
            }
            Err(e) => debug!(%topic, error = %e, "cannot subscribe"),
        }
    }

    /// With [`AdvertScope::Used`], listens to the adverts of the models a
    /// key names (those the table knows).
    fn mark_used(&mut self, key: &ModelKey) {
        if self.config.advert_scope != AdvertScope::Used {
            return;
        }
        let mut models: HashSet<Digest> =
            self.table.entries().flat_map(|e| &e.advert.models).filter(|m| key.matches(m)).map(|m| m.weights).collect();
        if let ModelKey::Weights(d) = key {
            models.insert(*d);
        }
        let now = Instant::now();
        for model in models {
            self.used.insert(model, now);
            self.listen_to(version::model_advert_topic(&model));
        }
    }

    /// With [`AdvertScope::Used`], stops listening to models not asked for
    /// in [`USE_IDLE`]; forgets old lookups.
    fn forget_unused(&mut self) {
        let idle: Vec<Digest> = self.used.iter().filter(|(_, at)| at.elapsed() >= USE_IDLE).map(|(d, _)| *d).collect();
        for model in idle {
            self.used.remove(&model);
            let topic = version::model_advert_topic(&model);
            if self.model_topics.remove(&topic) {
                let _ = self.swarm.behaviour_mut().gossipsub.unsubscribe(&gossipsub::IdentTopic::new(topic));
            }
        }
        let now = Instant::now();
        self.looked_up.retain(|_, again| *again > now);
    }

    /// The table's peers serving a model.
    fn workers_of(&self, key: &ModelKey) -> Vec<PeerEntry> {
        self.table.entries().filter(|e| e.advert.models.iter().any(|m| key.matches(m))).cloned().collect()
    }

    fn find_workers(&mut self, key: ModelKey, want: usize, reply: Reply<Vec<PeerEntry>>) {
        self.mark_used(&key);
        let known = self.workers_of(&key);
        let mut reply = Some(reply);
        if known.len() >= want {
            let _ = reply.take().map(|r| r.send(known.clone()));
        }
        if let Some(lookup) = self.lookups.values_mut().find(|l| l.key == key) {
            lookup.waiting.extend(reply.map(|r| (want, r)));
            return;
        }
        // A node that hears every advert knows every worker already.
        let listens_to_all = self.config.advert_scope == AdvertScope::All;
        let recent = self.looked_up.get(&key).is_some_and(|again| *again > Instant::now());
        if listens_to_all || known.len() >= LOOKUP_BELOW || recent || self.looked_up.len() >= LOOKUPS_REMEMBERED {
            let _ = reply.map(|r| r.send(known));
            return;
        }
        self.looked_up.insert(key.clone(), Instant::now() + LOOKUP_EVERY);
        let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&key.record_key()));
        let waiting = reply.into_iter().map(|r| (want, r)).collect();
        self.lookups.insert(id, Lookup { key, asked: HashSet::new(), outstanding: 0, query_done: false, waiting });
    }

    /// Providers found by a lookup: each is asked for its advert, while
    /// the query still holds the addresses it learned for them.
    fn on_lookup(&mut self, id: kad::QueryId, result: kad::GetProvidersResult, last: bool) {
        let local = *self.swarm.local_peer_id();
        let Some(lookup) = self.lookups.get_mut(&id) else { return };
        let failed = result.is_err();
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
            for peer in providers {
                if peer != local && lookup.asked.len() < LOOKUP_ASK && lookup.asked.insert(peer) {
                    let request = self.swarm.behaviour_mut().rpc.send_request(&peer, Request::OwnAdvert);
                    self.lookup_requests.insert(request, id);
                    lookup.outstanding += 1;
                }
            }
        }
        lookup.query_done |= last || failed;
        self.answer_lookup(id);
    }

    /// Answers the callers of a lookup whose wait is over: the table knows
    /// the workers they want, or nothing more will come (then the lookup
    /// ends).
    fn answer_lookup(&mut self, id: kad::QueryId) {
        let Some(key) = self.lookups.get(&id).map(|l| l.key.clone()) else { return };
        self.mark_used(&key);
        let found = self.workers_of(&key);
        let Some(lookup) = self.lookups.get_mut(&id) else { return };
        let done = lookup.query_done && lookup.outstanding == 0;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut lookup.waiting).into_iter().partition(|(want, _)| done || found.len() >= *want);
        lookup.waiting = waiting;
        for (_, reply) in ready {
            let _ = reply.send(found.clone());
        }
        if done && let Some(lookup) = self.lookups.remove(&id) {
            debug!(key = ?lookup.key, found = found.len(), asked = lookup.asked.len(), "worker lookup done");
            if found.is_empty() {
                self.looked_up.insert(lookup.key, Instant::now() + LOOKUP_AGAIN_AFTER_NONE);
            }
        }
    }

    fn publish_advert(&mut self) {
        let Some(content) = &self.advert else { return };
        let now = now_ms();
        self.last_seq = (self.last_seq + 1).max(now);
        let mut advert = content.clone();
        advert.seq = self.last_seq;
        advert.timestamp_ms = now;
        advert.listen_addrs =
            self.dialable_addrs().iter().take(limits::ADDRS_PER_ADVERT).map(ToString::to_string).collect();
        let (signed, bytes) = match Signed::sign(&self.key, &advert).and_then(|s| s.encode().map(|b| (s, b))) {
            Ok(signed) => signed,
            Err(e) => {
                warn!(error = %e, "cannot encode our advert; not published");
                return;
            }
        };
        self.published_signed = Some(signed);
        // To the general topic, for the nodes that listen to every advert,
        // and to each served model's, for those that listen to the models
        // they use (where none is connected, that publish costs nothing).
        let mut topics = vec![version::ADVERT_TOPIC.to_string()];
        topics.extend(advert.models.iter().map(|m| version::model_advert_topic(&m.weights)));
        self.published = Some(advert);
        let size = bytes.len() as u64;
        let mut delivered = false;
        for topic in topics {
            match self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), bytes.clone()) {
                Ok(_) => {
                    self.config.metrics.bytes_out.add(size);
                    delivered = true;
                }
                // No peer on the topic yet: the next tick or join retries.
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::AllQueuesFull(_)) => {}
                Err(e) => debug!(error = %e, "advert not published"),
            }
        }
        if delivered && !self.advert_delivered {
            self.advert_delivered = true;
            self.republish_at = Some(Instant::now() + JOIN_REPEAT_AFTER);
        }
    }

    /// The swarm's catalogue of models. With `--adverts used` a node holds
    /// only the adverts of the models it serves or uses, yet its model
    /// list, dashboard and `mycel/auto` need every model there is. So, for
    /// each model, one recent advert of a node serving it circulates on the
    /// catalogue topic, which every node hears: a node publishes its advert
    /// there when, for one of its models, none was heard for a while: 1.5
    /// advert intervals if the last was its own, else 2 to 2.75 (drawn
    /// afresh each turn, so the first to get there speaks and the others
    /// hear it and keep quiet; checked every quarter interval). The
    /// speaker keeps the turn while it lives, so each model's entry in the
    /// tables stays the same node's instead of one expiring every round.
    /// Adverts live 3 intervals, so an entry is renewed before it expires,
    /// and each node hears about one catalogue advert per model every 1.5
    /// intervals, however many nodes serve it. A node that just started
    /// counts every model as heard from another then: it listens before it
    /// speaks, so joining costs nothing here.
    fn publish_catalogue(&mut self) {
        let (Some(advert), Some(signed)) = (&self.published, &self.published_signed) else { return };
        if advert.models.is_empty() {
            return;
        }
        use std::hash::BuildHasher;
        let spread = (std::hash::RandomState::new().hash_one(self.last_seq) % 1000) as f64 / 1000.0;
        let interval = self.config.advert_interval;
        let now = Instant::now();
        let due = |w: &Digest| {
            let (at, own) = self.catalogue_heard.get(w).copied().unwrap_or((self.started, false));
            let quiet = if own { interval.mul_f64(1.5) } else { interval.mul_f64(2.0 + 0.75 * spread) };
            now.duration_since(at) >= quiet
        };
        if !advert.models.iter().any(|m| due(&m.weights)) {
            return;
        }
        let Ok(bytes) = signed.encode() else { return };
        let size = bytes.len() as u64;
        let topic = gossipsub::IdentTopic::new(version::CATALOGUE_TOPIC);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
            Ok(_) => {
                self.config.metrics.bytes_out.add(size);
                self.config.metrics.catalogue_published.inc();
                let weights: Vec<Digest> = advert.models.iter().map(|m| m.weights).collect();
                for w in weights {
                    self.heard_in_catalogue(w, now, true);
                }
            }
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::AllQueuesFull(_)) => {}
            Err(e) => debug!(error = %e, "catalogue advert not published"),
        }
    }

    /// Notes a catalogue advert for a model, keeping the memory bounded.
    fn heard_in_catalogue(&mut self, weights: Digest, now: Instant, own: bool) {
        if self.catalogue_heard.len() >= CATALOGUE_MODELS && !self.catalogue_heard.contains_key(&weights) {
            // Long silent models first: their adverts have expired anyway.
            let ttl = self.config.advert_ttl;
            self.catalogue_heard.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if self.catalogue_heard.len() >= CATALOGUE_MODELS {
                return;
            }
        }
        self.catalogue_heard.insert(weights, (now, own));
    }

    /// The addresses peers should dial us on, best first, before the
    /// advert's cap cuts any: confirmed external ones (AutoNAT found them
    /// reachable, or they were configured: a forwarded port, a public
    /// host), then behind NAT the relayed ones, then what we listen on.
    fn dialable_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        let mut listening: Vec<&Multiaddr> = self.listen_addrs.iter().collect();
        if self.reach == Reach::Private {
            listening.sort_by_key(|a| !crate::paths::is_relayed(a));
        }
        for a in listening {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
        addrs
    }

    fn expire(&mut self) {
        for peer in self.table.expire(now_ms()) {
            self.last_expiry = Some(Instant::now());
            self.bootstrap_reached = false;
            info!(%peer, "peer advert expired");
            self.emit(Event::Expired(peer));
        }
    }

    fn admit(&mut self, signed: Signed<Advert>, via: Via) -> Result<(), Refused> {
        let peer = signed.signer().to_peer_id();
        let addrs_before = self.table.advert(&peer).map(|a| a.listen_addrs.clone());
        let admitted = match self.table.offer(signed, via, now_ms()) {
            Ok(a) => {
                self.config.metrics.adverts_received.inc();
                a
            }
            Err(refused) => {
                self.config.metrics.adverts_rejected.inc();
                return Err(refused);
            }
        };
        let new = admitted == crate::table::Admitted::New;
        if new {
            debug!(%peer, peers = self.table.len(), "new peer advert");
        }
        if let Some(advert) = self.table.advert(&peer) {
            // How to dial the peer: a relayed address is the only way to a
            // peer behind NAT that we never met (and it comes in a later
            // advert than the first, once the peer has a reservation).
            if addrs_before.as_ref() != Some(&advert.listen_addrs) {
                for addr in advert.listen_addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
                    self.swarm.add_peer_address(peer, addr);
                }
            }
            let advert = Box::new(advert.clone());
            self.emit(Event::Advert { peer, new, advert });
        }
        Ok(())
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if crate::paths::is_relayed(&address) {
                    // Peers behind other NATs reach us only this way: tell
                    // them now, not at the next periodic advert; and in our
                    // provider records, which carry our external addresses
                    // (a node that never hears our adverts finds us there).
                    self.republish_at.get_or_insert_with(|| Instant::now() + REPUBLISH_DEBOUNCE);
                    self.swarm.add_external_address(address.clone());
                    self.reannounce = true;
                }
                // A relay server must tell clients where it is reached;
                // without addresses named, those it listens on are it
                // (loopback only for a relay that listens nowhere else).
                let local_only = self.config.listen.iter().all(is_loopback);
                if self.config.relay_server
                    && self.config.external_addrs.is_empty()
                    && !crate::paths::is_relayed(&address)
                    && (local_only || !is_loopback(&address))
                {
                    self.swarm.add_external_address(address.clone());
                }
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address.clone());
                }
                self.emit(Event::Listening(address));
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                if !crate::paths::is_relayed(&address) {
                    info!(%address, "reachable from outside on this address");
                }
                self.republish_at.get_or_insert_with(|| Instant::now() + REPUBLISH_DEBOUNCE);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                if crate::paths::is_relayed(&address) {
                    self.swarm.remove_external_address(&address);
                }
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
                if let Err(e) = reason {
                    warn!(?addresses, error = %e, "listener closed");
                }
                for a in &addresses {
                    self.listen_addrs.retain(|l| l != a);
                    if crate::paths::is_relayed(a) {
                        self.swarm.remove_external_address(a);
                    }
                }
                // A relay's reservation ended (the relay went away or
                // refused): free the slot for another, and forget that relay
                // until it identifies again, so a refusal is not retried in
                // a loop.
                let ended: Vec<PeerId> =
                    self.relay_listeners.iter().filter(|(_, id)| **id == listener_id).map(|(p, _)| *p).collect();
                for peer in ended {
                    self.relay_listeners.remove(&peer);
                    self.relay_candidates.remove(&peer);
                    info!(relay = %peer, "relay reservation ended");
                }
                self.take_relays();
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                if endpoint.is_dialer() && !crate::paths::is_relayed(endpoint.get_remote_address()) {
                    self.dialled.insert(connection_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 {
                    self.config.metrics.connections_opened.inc();
                    self.pruner.connected(peer_id, std::time::Instant::now());
                    if self.bootstrap_peers.contains(&peer_id) {
                        self.bootstrap_reached = true;
                    }
                    if self.bootstrap_warned.remove(&peer_id) {
                        info!(peer = %peer_id, "bootstrap peer reached");
                    }
                    self.emit(Event::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { connection_id, peer_id, num_established, .. } => {
                self.dialled.remove(&connection_id);
                if num_established == 0 {
                    self.pruner.disconnected(&peer_id);
                    self.inbound_rate.remove(&peer_id);
                    self.relay_candidates.remove(&peer_id);
                    self.emit(Event::Disconnected(peer_id));
                }
            }
            // Kademlia retries on its own; say it once until it works.
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. }
                if self.bootstrap_peers.contains(&peer) && self.bootstrap_warned.insert(peer) =>
            {
                warn!(%peer, error = %first_line(&error.to_string()), "bootstrap peer unreachable; will keep trying");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, error = %first_line(&error.to_string()), "dial failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id }) => {
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME)
                    && let Some(addr) = self.dialled.get(&connection_id)
                {
                    let addr = addr.clone();
                    self.relay_candidates.insert(peer_id, addr);
                    self.take_relays();
                }
                let kad_protocol = libp2p::StreamProtocol::new(version::KAD_PROTOCOL);
                if info.protocols.contains(&kad_protocol) {
                    for addr in info.listen_addrs {
                        self.kad_add(peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.reach = match new {
                    autonat::NatStatus::Public(_) => Reach::Public,
                    autonat::NatStatus::Private => Reach::Private,
                    autonat::NatStatus::Unknown => Reach::Unknown,
                };
                info!(reach = ?self.reach, "reachability from outside");
                // Peers that cannot dial us must not keep us in their DHT
                // routing tables (their lookups would stall on us): behind
                // NAT, a DHT client only.
                let mode = if self.reach == Reach::Private { kad::Mode::Client } else { kad::Mode::Server };
                self.swarm.behaviour_mut().kad.set_mode(Some(mode));
                self.take_relays();
                // Peers learn our relayed addresses from the next advert.
                self.republish_at.get_or_insert_with(|| Instant::now() + REPUBLISH_DEBOUNCE);
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => info!(relay = %relay_peer_id, "reachable through a relay"),
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => match result {
                Ok(_) => {
                    self.hole_punches_ok += 1;
                    info!(peer = %remote_peer_id, "hole punched: a direct connection replaces the relayed one");
                    // Requests are spread over a peer's connections: with
                    // the relayed one gone, results take the direct path
                    // and the relay carries nothing more for this pair. It
                    // goes once the direct one answers a ping (see paths).
                    for relayed in self.swarm.behaviour_mut().paths.retire_relayed(remote_peer_id) {
                        self.swarm.close_connection(relayed);
                    }
                }
                Err(e) => {
                    self.hole_punches_failed += 1;
                    info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying on the relay");
                }
            },
            BehaviourEvent::Ping(libp2p::ping::Event { connection, result: Ok(_), .. }) => {
                for relayed in self.swarm.behaviour_mut().paths.answered(connection) {
                    self.swarm.close_connection(relayed);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.kad_add(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                // It forwards us others' adverts: we are in its mesh; keep
                // it. (Its own come to every peer it has: flood publishing.)
                // On the topic of a model we use, even its own advert is
                // use: it is a worker we need, and it publishes to that
                // topic without joining its mesh, so no mesh protects it.
                let topic = message.topic.as_str();
                if version::is_advert_topic(topic)
                    && (message.source != Some(propagation_source) || self.model_topics.contains(topic))
                {
                    self.pruner.used(&propagation_source, std::time::Instant::now());
                }
                let acceptance = self.on_gossip(&message);
                let _ = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == gossipsub::IdentTopic::new(version::ADVERT_TOPIC).hash() =>
            {
                // Joining: publish our advert as soon as someone listens,
                // and ask the first few peers for what they know, so a new
                // node neither waits for nor waits to be heard by the
                // periodic adverts. Once joined, gossip does the rest: a
                // re-publish or sync per join would cost O(N^2) per join.
                if !self.advert_delivered && self.republish_at.is_none() {
                    self.republish_at = Some(Instant::now() + REPUBLISH_DEBOUNCE);
                }
                // (A node listening to the models it uses only takes no
                // one's whole table.)
                if self.config.advert_scope == AdvertScope::All
                    && self.synced.len() < SYNC_PEERS
                    && !self.synced.contains(&peer_id)
                {
                    self.sync_with(peer_id);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if self.config.advert_scope == AdvertScope::Used
                    && self.synced.is_empty()
                    && topic == gossipsub::IdentTopic::new(version::CATALOGUE_TOPIC).hash() =>
            {
                // A node listening to the models it uses learns the
                // catalogue from its first peer rather than wait for it to
                // come round (a model per advert: see `on_sync_response`).
                self.sync_with(peer_id);
            }
            BehaviourEvent::Rpc(event) => self.on_rpc(event),
            BehaviourEvent::Relay(event) => self.on_relay_server(event),
            // A connection that stops answering pings is dead (a cut cable,
            // a partition): closing it lets both sides dial again once the
            // network is back, instead of waiting on TCP's retransmission
            // backoff, which grows to minutes.
            BehaviourEvent::Ping(libp2p::ping::Event { peer, connection, result: Err(error) }) => {
                debug!(%peer, %error, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            // Peers kad would have put in its table on connection (it is
            // told to leave that to us: see `kad_add`).
            BehaviourEvent::Kad(kad::Event::RoutablePeer { peer, address }) => self.kad_add(peer, address),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. }) => {
                self.on_kad_query(id, result, step.last);
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, message: &gossipsub::Message) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        self.config.metrics.bytes_in.add(message.data.len() as u64);
        if message.topic == gossipsub::IdentTopic::new(version::CFP_TOPIC).hash() {
            return self.on_gossip_cfp(message);
        }
        if !version::is_advert_topic(message.topic.as_str()) {
            return Ignore;
        }
        let signed = match Signed::<Advert>::decode(&message.data) {
            Ok(s) => s,
            Err(e) => {
                if let Some(peer) = message.source {
                    self.emit(Event::Misbehaviour { peer, reason: e.to_string() });
                }
                return Reject;
            }
        };
        // On the catalogue, the advert's models are heard (once it is
        // admitted, or is the very advert we hold: it arrived first on a
        // model's topic, and is passed on here all the same).
        let catalogue = (message.topic == gossipsub::IdentTopic::new(version::CATALOGUE_TOPIC).hash())
            .then(|| Advert::decode(signed.payload()).ok())
            .flatten();
        let result = self.admit(signed, Via::Gossip(message.source));
        if let Some(advert) = catalogue
            && match &result {
                Ok(()) => true,
                Err(Refused::Superseded { seq, held, .. }) => seq == held,
                Err(_) => false,
            }
        {
            let now = Instant::now();
            for m in &advert.models {
                self.heard_in_catalogue(m.weights, now, false);
            }
            return Accept;
        }
        match result {
            Ok(()) => Accept,
            Err(refused) if refused.is_misbehaviour() => {
                debug!(source = ?message.source, reason = %refused, "advert rejected");
                if let Some(peer) = message.source {
                    self.emit(Event::Misbehaviour { peer, reason: refused.to_string() });
                }
                Reject
            }
            Err(_) => Ignore,
        }
    }

    /// A gossiped call for proposals: relayed only if its signature holds
    /// and its bid window is open, and handed to the node as if the
    /// requester (its signer) had sent it directly.
    fn on_gossip_cfp(&mut self, message: &gossipsub::Message) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        let Ok(signed) = Signed::<Cfp>::decode(&message.data) else { return Reject };
        let Ok(cfp) = signed.verify() else { return Reject };
        if cfp.bids_close_ms <= now_ms() {
            return Ignore;
        }
        let peer = signed.signer().to_peer_id();
        if peer == *self.swarm.local_peer_id() {
            return Ignore;
        }
        // One requester's CFPs are rate-limited wherever they come from:
        // a flood is neither relayed nor bid on.
        let now = std::time::Instant::now();
        if self.cfp_rate.len() >= CFP_SIGNERS && !self.cfp_rate.contains_key(&peer) {
            self.cfp_rate.clear(); // many signers at once: start over, bounded
        }
        let allowed = self
            .cfp_rate
            .entry(peer)
            .or_insert_with(|| {
                crate::rate::TokenBucket::with_rate(now, crate::rate::CFP_BURST, crate::rate::CFPS_PER_SECOND)
            })
            .allow(now);
        if !allowed {
            self.config.metrics.rate_limited.inc();
            return Ignore;
        }
        let market = mycel_protocol::rpc::Market::Cfp(signed);
        if self.events.try_send(Event::Market { peer, message: Box::new(market) }).is_err() {
            debug!("gossiped CFP dropped: the node is busy");
        }
        Accept
    }

    /// Keeps track of who relies on our relay.
    fn on_relay_server(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                self.relay_clients.insert(src_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id } | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.relay_clients.remove(&src_peer_id);
            }
            relay::Event::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                for peer in [src_peer_id, dst_peer_id] {
                    *self.circuits.entry(peer).or_default() += 1;
                }
            }
            relay::Event::CircuitClosed { src_peer_id, dst_peer_id, .. } => {
                for peer in [src_peer_id, dst_peer_id] {
                    if let Some(n) = self.circuits.get_mut(&peer) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            self.circuits.remove(&peer);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_rpc(&mut self, event: request_response::Event<Request, Response>) {
        if let request_response::Event::Message { peer, .. } = &event {
            self.pruner.used(peer, std::time::Instant::now());
        }
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => self.on_request(peer, request, channel),
                request_response::Message::Response { request_id, response } => {
                    if self.sync_requests.remove(&request_id) {
                        self.on_sync_response(peer, response);
                    } else if let Some(lookup) = self.lookup_requests.remove(&request_id) {
                        self.on_lookup_response(peer, lookup, Some(response));
                    } else if let Some((_, reply)) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if self.sync_requests.remove(&request_id) {
                    debug!(%peer, %error, "advert sync failed");
                } else if let Some(lookup) = self.lookup_requests.remove(&request_id) {
                    debug!(%peer, %error, "a provider's advert could not be fetched");
                    self.on_lookup_response(peer, lookup, None);
                } else if let Some((_, reply)) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(RequestError::Failed { peer, reason: error.to_string() }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        let now = std::time::Instant::now();
        let allowed = self.inbound_rate.entry(peer).or_insert_with(|| crate::rate::TokenBucket::new(now)).allow(now);
        let response = if !allowed {
            debug!(%peer, "request refused: rate limited");
            self.config.metrics.rate_limited.inc();
            Response::Refused("rate limited".into())
        } else if let Request::Market(message) = request {
            // Market messages go to the node; the sender learns at once
            // whether it took them.
            match self.events.try_send(Event::Market { peer, message }) {
                Ok(()) => Response::Accepted,
                Err(_) => Response::Refused("busy".into()),
            }
        } else {
            self.answer(request)
        };
        if self.swarm.behaviour_mut().rpc.send_response(channel, response).is_err() {
            debug!(%peer, "response not sent: the peer went away");
        }
    }

    fn answer(&mut self, request: Request) -> Response {
        match request {
            Request::Adverts => Response::Adverts(
                self.table.entries().take(limits::ADVERTS_PER_SYNC).map(|e| e.signed.clone()).collect(),
            ),
            Request::OwnAdvert => Response::Adverts(self.published_signed.iter().cloned().collect()),
            Request::RouterOutcomes => match &self.router_share {
                Some(share) => Response::RouterOutcomes(share.clone()),
                None => Response::Refused("no router outcomes to share".into()),
            },
            _ => Response::Refused("unsupported request".into()),
        }
    }

    /// Asks one connected peer on the advert topic for its table.
    fn resync(&mut self) {
        let topic = gossipsub::IdentTopic::new(version::ADVERT_TOPIC).hash();
        let peers: Vec<PeerId> = self.swarm.behaviour().gossipsub.mesh_peers(&topic).copied().collect();
        // Prefer a peer we have not synced with: it may know other nodes.
        let pick = peers.iter().find(|p| !self.synced.contains(p)).or(peers.first()).copied();
        if let Some(peer) = pick {
            self.sync_with(peer);
        }
    }

    /// Asks `peer` for the adverts it holds (see `on_sync_response`).
    fn sync_with(&mut self, peer: PeerId) {
        self.synced.insert(peer);
        let id = self.swarm.behaviour_mut().rpc.send_request(&peer, Request::Adverts);
        self.sync_requests.insert(id);
    }

    /// A provider's advert, asked for by a lookup (`None`: it failed).
    fn on_lookup_response(&mut self, peer: PeerId, lookup: kad::QueryId, response: Option<Response>) {
        if let Some(Response::Adverts(adverts)) = response {
            // Its own advert, nobody else's: what else it sends is dropped.
            for signed in adverts.into_iter().filter(|s| s.signer().to_peer_id() == peer).take(1) {
                if let Err(refused) = self.admit(signed, Via::Sync)
                    && refused.is_misbehaviour()
                {
                    self.emit(Event::Misbehaviour { peer, reason: refused.to_string() });
                }
            }
        }
        if let Some(l) = self.lookups.get_mut(&lookup) {
            l.outstanding = l.outstanding.saturating_sub(1);
        }
        self.answer_lookup(lookup);
    }

    fn on_sync_response(&mut self, peer: PeerId, response: Response) {
        if !self.resync_planned {
            self.resync_planned = true;
            self.resync_at = Some(Instant::now() + RESYNC_AFTER);
        }
        let Response::Adverts(adverts) = response else { return };
        let mut admitted = 0;
        // Listening to the models it uses, a node takes one advert per
        // model it does not hold yet (the catalogue), not a peer's table.
        let mut covered: Option<HashSet<Digest>> = (self.config.advert_scope == AdvertScope::Used)
            .then(|| self.table.entries().flat_map(|e| e.advert.models.iter().map(|m| m.weights)).collect());
        for signed in adverts {
            if let Some(covered) = &mut covered {
                let Ok(claimed) = Advert::decode(signed.payload()) else { continue };
                if claimed.models.iter().all(|m| covered.contains(&m.weights)) {
                    continue;
                }
                covered.extend(claimed.models.iter().map(|m| m.weights));
            }
            match self.admit(signed, Via::Sync) {
                Ok(()) => admitted += 1,
                Err(refused) if refused.is_misbehaviour() => {
                    self.emit(Event::Misbehaviour { peer, reason: refused.to_string() });
                }
                Err(_) => {}
            }
        }
        debug!(%peer, admitted, "advert sync");
    }

    fn on_kad_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        // Kademlia bootstraps a node whose table is small (joining): a
        // lookup of its own id, which is what joining needs, then a walk
        // toward each farther bucket in turn, which in a swarm of a few
        // hundred dials most of it, one walk after another. Connections
        // the pruner closed in between were dialled again by the next
        // walk: 200 nodes joining together made 290 connections each. Each
        // of those walks is finished before it sends anything.
        if matches!(result, kad::QueryResult::Bootstrap(_))
            && !last
            && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
        {
            q.finish();
        }
        if let kad::QueryResult::StartProviding(r) = &result {
            debug!(result = ?r, "announced a model in the DHT");
        }
        let kad::QueryResult::GetProviders(result) = result else { return };
        if self.lookups.contains_key(&id) {
            return self.on_lookup(id, result, last);
        }
        let Some((found, _)) = self.pending_providers.get_mut(&id) else { return };
        let error = match result {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                found.extend(providers);
                None
            }
            Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
            Err(e) => Some(e.to_string()),
        };
        if last || error.is_some() {
            if let Some((found, reply)) = self.pending_providers.remove(&id) {
                let result = match error {
                    Some(e) if found.is_empty() => Err(NetError::Query(e)),
                    _ => Ok(found.into_iter().collect()),
                };
                let _ = reply.send(result);
            }
            if !last && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
