//! The libp2p behaviours mycel runs, one field per concern.

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, autonat, connection_limits, dcutr, gossipsub, identify, identity, kad, mdns, ping, relay,
    request_response,
};
use mycel_protocol::{limits, version};

use crate::codec::RpcCodec;

/// Everything a mycel node speaks.
// The libp2p behaviours it holds implement no Debug.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps connections, so a flood of dials can't exhaust the node.
    pub limits: connection_limits::Behaviour,
    /// At most one direct and one relayed connection per peer.
    pub paths: crate::paths::OnePerPath,
    /// Tells peers our listen addresses and protocols; feeds Kademlia.
    pub identify: identify::Behaviour,
    /// Keeps connections alive and measures round trips.
    pub ping: ping::Behaviour,
    /// The DHT: peer routing, and provider records keyed by model weight
    /// digest ("who serves this model?").
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Finds peers on the local network; off with `--no-mdns`.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Signed gossip with peer scoring: adverts and broadcast CFPs.
    pub gossipsub: gossipsub::Behaviour,
    /// Direct messages with mycel's codec (size caps from `protocol`).
    pub rpc: request_response::Behaviour<RpcCodec>,
    /// Reachable through relays (circuit relay v2) when not directly.
    pub relay_client: relay::client::Behaviour,
    /// Relays for others; on with `--relay-server`.
    pub relay: Toggle<relay::Behaviour>,
    /// Upgrades relayed connections to direct ones (hole punching).
    pub dcutr: dcutr::Behaviour,
    /// Learns whether this node is reachable from outside: peers dial it
    /// back on the addresses they see.
    pub autonat: autonat::Behaviour,
}

/// How long a relay keeps one relayed connection open.
const RELAYED_FOR: Duration = Duration::from_secs(60 * 60);
/// Bytes a relay carries over one relayed connection.
const RELAYED_BYTES: u64 = 256 << 20;

/// Knobs for building the behaviour.
#[derive(Debug, Clone)]
pub(crate) struct BehaviourConfig {
    pub mdns: bool,
    pub max_connections: u32,
    pub request_timeout: Duration,
    pub gossip_heartbeat: Duration,
    pub relay_server: bool,
    pub autonat_global_only: bool,
    pub metrics: std::sync::Arc<mycel_metrics::Metrics>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &identity::Keypair,
        relay_client: relay::client::Behaviour,
        cfg: &BehaviourConfig,
    ) -> Result<Self, crate::NetError> {
        let peer_id = key.public().to_peer_id();

        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(cfg.max_connections))
                // Two direct (one only briefly) and one relayed: `paths`
                // has the finer rule.
                .with_max_established_per_peer(Some(3))
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(64)),
        );

        let identify = identify::Behaviour::new(
            identify::Config::new(version::IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("mycel/{}", version::SOFTWARE_VERSION)),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(version::KAD_PROTOCOL));
        kad_config.set_query_timeout(Duration::from_secs(30));
        // The event loop puts peers in the routing table itself, without
        // the dial Kademlia makes for a full bucket (see `kad_add`).
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        // Kademlia's periodic bootstrap walks toward every bucket in turn
        // (the whole of a swarm of a few hundred), and nodes started
        // together run it together; the event loop keeps its table fresh
        // with a lookup of its own id instead (see `refresh_dht`).
        kad_config.set_periodic_bootstrap_interval(None);
        let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Serve the DHT even without a confirmed public address (local
        // swarms, testnets): otherwise peers never add us to their tables.
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if cfg.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| crate::NetError::Setup(format!("mDNS: {e}")))?,
            )
        } else {
            None
        };

        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(cfg.gossip_heartbeat)
            .validation_mode(gossipsub::ValidationMode::Strict)
            // We check adverts ourselves before they are forwarded.
            .validate_messages()
            .max_transmit_size(limits::ADVERT.max(limits::CFP) + 4096)
            .build()
            .map_err(|e| crate::NetError::Setup(format!("gossipsub config: {e}")))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)
                .map_err(|e| crate::NetError::Setup(format!("gossipsub: {e}")))?;
        // Peer scoring penalises many peers behind one IP (sybils). Peers on
        // loopback are a local testnet by definition: exempt them, or a
        // swarm of more than ten local nodes graylists itself.
        let mut score_params = gossipsub::PeerScoreParams::default();
        score_params.ip_colocation_factor_whitelist.extend([
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ]);
        gossipsub
            .with_peer_score(score_params, gossipsub::PeerScoreThresholds::default())
            .map_err(|e| crate::NetError::Setup(format!("gossipsub scoring: {e}")))?;

        let rpc = request_response::Behaviour::with_codec(
            RpcCodec::new(cfg.metrics.clone()),
            [(StreamProtocol::new(version::RPC_PROTOCOL), request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(cfg.request_timeout)
                .with_max_concurrent_streams(64),
        );

        let relay = cfg.relay_server.then(|| {
            relay::Behaviour::new(
                peer_id,
                relay::Config {
                    // A relayed connection carries auctions and results until
                    // hole punching replaces it (or for good, where it
                    // cannot): libp2p's defaults (2 minutes, 128 KiB) end it
                    // mid-task.
                    max_circuit_duration: RELAYED_FOR,
                    max_circuit_bytes: RELAYED_BYTES,
                    // Pairs that cannot punch (symmetric NATs) keep their
                    // circuit: room for many (libp2p's default is 16).
                    max_circuits: 256,
                    max_circuits_per_peer: 8,
                    ..relay::Config::default()
                },
            )
        });
        let autonat = autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                // Ask soon after joining, so a node behind NAT takes a
                // relay within seconds rather than a quarter of a minute.
                boot_delay: Duration::from_secs(2),
                retry_interval: Duration::from_secs(30),
                // Testnets in namespaces use non-global addresses
                // (198.18.0.0/15): they turn this off.
                only_global_ips: cfg.autonat_global_only,
                ..autonat::Config::default()
            },
        );

        Ok(Self {
            limits,
            paths: crate::paths::OnePerPath::default(),
            identify,
            ping: ping::Behaviour::new(
                // Dead connections are found within 15 s (a partition),
                // then closed and dialled again.
                ping::Config::new().with_interval(Duration::from_secs(5)).with_timeout(Duration::from_secs(10)),
            ),
            kad,
            mdns: mdns.into(),
            gossipsub,
            rpc,
            relay_client,
            relay: relay.into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat,
        })
    }
}
