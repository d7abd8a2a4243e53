//! mycel's network layer on rust-libp2p.
//!
//! - [`Behaviour`]: the protocols a node speaks (TCP and QUIC transports,
//!   identify, ping, Kademlia, mDNS, gossipsub, request-response), one field
//!   each.
//! - [`EventLoop`]: the only owner of the `Swarm`. It turns swarm events
//!   into domain [`Event`]s, runs the periodic advert, keeps the
//!   [`CapabilityTable`], and executes [`Handle`] commands.
//! - [`Handle`]: a cheap, cloneable front door. Every call is a command on
//!   a bounded channel with a oneshot reply.
//!
//! ```text
//!   node / api ──Handle──► [commands] ──► EventLoop ──► Swarm ──► peers
//!                 ◄──────── [events] ◄──────┘
//! ```

mod behaviour;
mod codec;
mod event_loop;
mod paths;
mod prune;
mod rate;
pub mod table;

use std::time::Duration;

pub use behaviour::Behaviour;
pub use event_loop::{EventLoop, Handle, PeerPaths, Reach, Reachability, TableSize, start};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use prune::FLOOR as PRUNE_FLOOR;

/// Connected peers a node keeps about unless told otherwise.
pub const DEFAULT_PEER_TARGET: usize = 32;

/// Whose periodic adverts a node listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdvertScope {
    /// Every model's: the node knows the whole swarm (the dashboard, the
    /// model list and `mycel/auto` see every model), at a cost that grows
    /// with the swarm. Right for small swarms and for gateways.
    #[default]
    All,
    /// Only the models it uses (asks for, see [`Handle::find_workers`]),
    /// found when first needed through provider records in the DHT. A node
    /// that only serves hears no other worker's periodic adverts, so its
    /// idle cost does not grow with the swarm; a requester's grows with the
    /// workers of the models it uses.
    Used,
}

impl AdvertScope {
    /// The word the flag, the config file and `mycel status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            AdvertScope::All => "all",
            AdvertScope::Used => "used",
        }
    }
}

impl std::str::FromStr for AdvertScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(AdvertScope::All),
            "used" => Ok(AdvertScope::Used),
            other => Err(format!("adverts: expected all or used, got {other:?}")),
        }
    }
}

pub use mycel_protocol::advert::ModelKey;
pub use table::{CapabilityTable, PeerEntry, TableConfig};

/// Network settings. `Default` gives a node listening on TCP and QUIC on
/// all interfaces, random ports, mDNS on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to connect to at start (with or without `/p2p/<id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network.
    pub mdns: bool,
    /// How often the node re-publishes its advert.
    pub advert_interval: Duration,
    /// Adverts not refreshed within this are dropped. At least twice the
    /// interval, so one lost advert does not drop a live peer.
    pub advert_ttl: Duration,
    /// Most connections held at once.
    pub max_connections: u32,
    /// Connected peers a node keeps about; past a quarter more, the least
    /// used are closed (see `prune`). Never under 5.
    pub peer_target: usize,
    /// A connection used this recently is never closed to keep to
    /// `peer_target`; nor is a new one, for 15 s or this, if shorter.
    pub prune_grace: Duration,
    /// How long an unused connection stays open.
    pub idle_timeout: Duration,
    /// How long a direct request may wait for its response.
    pub request_timeout: Duration,
    /// Gossipsub heartbeat (mesh maintenance).
    pub gossip_heartbeat: Duration,
    /// Relay connections between peers that cannot reach each other
    /// (circuit relay v2 server).
    pub relay_server: bool,
    /// Relays to stay reachable through, whatever AutoNAT finds (each with
    /// `/p2p/<id>`). Without any, a node AutoNAT finds private takes relay
    /// servers among its peers.
    pub relays: Vec<Multiaddr>,
    /// Addresses this node is known to be reachable on from outside (a
    /// public host's address, a forwarded port); announced as confirmed.
    pub external_addrs: Vec<Multiaddr>,
    /// AutoNAT dials back global addresses only. Namespaced testnets, which
    /// use 198.18.0.0/15, turn it off.
    pub autonat_global_only: bool,
    /// Whose periodic adverts to listen to.
    pub advert_scope: AdvertScope,
    /// Counters the network adds to (bytes, adverts).
    pub metrics: std::sync::Arc<mycel_metrics::Metrics>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().unwrap_or_else(|_| unreachable!("valid literal")),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().unwrap_or_else(|_| unreachable!("valid literal")),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            advert_interval: Duration::from_secs(10),
            advert_ttl: Duration::from_secs(30),
            max_connections: 256,
            peer_target: DEFAULT_PEER_TARGET,
            prune_grace: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            gossip_heartbeat: Duration::from_secs(1),
            relay_server: false,
            relays: Vec::new(),
            external_addrs: Vec::new(),
            autonat_global_only: true,
            advert_scope: AdvertScope::All,
            metrics: std::sync::Arc::default(),
        }
    }
}

impl Config {
    /// Sets the listen addresses.
    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Sets the bootstrap peers.
    pub fn with_bootstrap(mut self, bootstrap: Vec<Multiaddr>) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Counts into these metrics.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<mycel_metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Turns mDNS on or off.
    pub fn with_mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// Sets how long an unused connection stays open.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Keeps about `target` connected peers, closing the least used past a
    /// quarter more; none used more recently than `grace`, nor any new
    /// one for 15 s (or `grace`, if shorter).
    pub fn with_peer_target(mut self, target: usize, grace: Duration) -> Self {
        self.peer_target = target;
        self.prune_grace = grace;
        self
    }

    /// Sets whose periodic adverts the node listens to.
    pub fn with_advert_scope(mut self, scope: AdvertScope) -> Self {
        self.advert_scope = scope;
        self
    }

    /// Sets the advert interval and a TTL of three intervals.
    pub fn with_advert_interval(mut self, interval: Duration) -> Self {
        self.advert_interval = interval;
        self.advert_ttl = interval * 3;
        self
    }
}

/// Why the network could not start or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A behaviour or transport could not be built.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// Could not listen on an address (port in use, unsupported address).
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// Could not dial an address.
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    /// A message of ours did not encode (over its size cap).
    #[error("cannot encode {0}")]
    Encode(String),
    /// A DHT query failed.
    #[error("DHT query failed: {0}")]
    Query(String),
    /// The event loop has stopped (node shutting down).
    #[error("the network has stopped")]
    Stopped,
}

/// Why a direct request got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The peer could not be reached, closed the stream, timed out or
    /// answered something undecodable.
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
    /// The event loop has stopped.
    #[error("the network has stopped")]
    Stopped,
}

/// What the network tells the node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Now listening on an address.
    Listening(Multiaddr),
    /// First connection to a peer opened.
    Connected(PeerId),
    /// Last connection to a peer closed.
    Disconnected(PeerId),
    /// A peer's advert was admitted to the table (`new`: first time seen),
    /// its signature checked.
    Advert { peer: PeerId, new: bool, advert: Box<mycel_protocol::Advert> },
    /// A peer's advert expired.
    Expired(PeerId),
    /// An advert was refused because its sender misbehaved.
    Misbehaviour { peer: PeerId, reason: String },
    /// A market message from a peer (already size-checked and decoded;
    /// signatures are the market's to check).
    Market { peer: PeerId, message: Box<mycel_protocol::rpc::Market> },
}

/// Milliseconds since the Unix epoch: the clock adverts are stamped and
/// judged by.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
