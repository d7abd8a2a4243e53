//! Protocol and topic names. A wire change is a new version: add a new
//! constant and keep the old one while peers still speak it; when several are
//! offered, the newest comes first.

/// Request-response protocol for direct messages between two nodes
/// ([`crate::rpc`]): advert sync now, market messages (CFP, bid, award,
/// shard result, ack) as the market lands.
pub const RPC_PROTOCOL: &str = "/mycel/rpc/5";
/// Kademlia protocol name: mycel runs its own DHT, not the public IPFS one.
pub const KAD_PROTOCOL: &str = "/mycel/kad/1";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/mycel/id/1";
/// Gossipsub topic carrying every node's signed adverts, for the nodes
/// that listen to the whole swarm. Each node also publishes its advert on
/// [`model_advert_topic`] for every model it serves.
pub const ADVERT_TOPIC: &str = "mycel/adverts/4";
/// Gossipsub topic carrying calls for proposals when too few capable peers
/// are known to ask directly.
pub const CFP_TOPIC: &str = "mycel/cfp/3";
/// The topic carrying the adverts of the nodes serving the model with these
/// weights, for the nodes that listen only to the models they use.
pub fn model_advert_topic(weights: &crate::Digest) -> String {
    format!("{ADVERT_TOPIC}/{}", weights.to_hex())
}

/// The swarm's catalogue of models: for each model, one recent advert of a
/// node serving it, so that nodes listening only to the models they use
/// still know every model there is (see `mycel-net`'s event loop).
pub const CATALOGUE_TOPIC: &str = "mycel/adverts/4/catalogue";

/// Whether a topic carries adverts ([`ADVERT_TOPIC`], a model's or the
/// catalogue).
pub fn is_advert_topic(topic: &str) -> bool {
    topic.strip_prefix(ADVERT_TOPIC).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// This build's software version, advertised to peers.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
