//! The libp2p behaviours mycel runs, one field per concern.

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, connection_limits, gossipsub, identify, identity, kad, mdns, ping, request_response};
use mycel_protocol::{limits, version};

use crate::codec::RpcCodec;

/// Everything a mycel node speaks.
// The libp2p behaviours it holds implement no Debug.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps connections, so a flood of dials can't exhaust the node.
    pub limits: connection_limits::Behaviour,
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
}

/// Knobs for building the behaviour.
#[derive(Debug, Clone)]
pub(crate) struct BehaviourConfig {
    pub mdns: bool,
    pub max_connections: u32,
    pub request_timeout: Duration,
    pub gossip_heartbeat: Duration,
    pub metrics: std::sync::Arc<mycel_metrics::Metrics>,
}

impl Behaviour {
    pub(crate) fn new(key: &identity::Keypair, cfg: &BehaviourConfig) -> Result<Self, crate::NetError> {
        let peer_id = key.public().to_peer_id();

        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(cfg.max_connections))
                // One connection per peer. gossipsub keeps its per-peer state
                // (subscriptions, send queue) from the first connection: a
                // reconnection that overlaps a dead connection still being
                // closed (after a partition heals) left the two ends
                // disagreeing about each other's subscriptions, and a healed
                // testnet never reconverged. Refused, the redial lands once
                // the dead connection is gone, as a first connection.
                .with_max_established_per_peer(Some(1))
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(64)),
        );

        let identify = identify::Behaviour::new(
            identify::Config::new(version::IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("mycel/{}", version::SOFTWARE_VERSION)),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(version::KAD_PROTOCOL));
        kad_config.set_query_timeout(Duration::from_secs(30));
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

        Ok(Self {
            limits,
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
        })
    }
}
