//! Protocol and topic names. A wire change is a new version: add a new
//! constant and keep the old one while peers still speak it; when several are
//! offered, the newest comes first.

/// Request-response protocol for direct messages between two nodes
/// ([`crate::rpc`]): advert sync now, market messages (CFP, bid, award,
/// shard result, ack) as the market lands.
pub const RPC_PROTOCOL: &str = "/mycel/rpc/4";
/// Kademlia protocol name: mycel runs its own DHT, not the public IPFS one.
pub const KAD_PROTOCOL: &str = "/mycel/kad/1";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/mycel/id/1";
/// Gossipsub topic carrying signed node adverts.
pub const ADVERT_TOPIC: &str = "mycel/adverts/3";
/// Gossipsub topic carrying calls for proposals when too few capable peers
/// are known to ask directly.
pub const CFP_TOPIC: &str = "mycel/cfp/3";
/// This build's software version, advertised to peers.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
