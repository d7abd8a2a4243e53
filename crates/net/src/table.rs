//! The capability table: the newest signed advert of every peer heard from.
//!
//! Pure state with the time passed in, so it is tested without a network
//! or a clock. An advert is admitted only if its signature verifies, it
//! came from its own author when gossiped, it is neither stale nor from the
//! future, and its sequence number is newer than what is held. Entries not
//! refreshed within the TTL expire.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;
use mycel_protocol::{Advert, Signed, VerifyError};

/// Limits of the table.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// An entry not refreshed for this long is dropped, and an advert
    /// older than this is stale on arrival.
    pub ttl: Duration,
    /// How far in the future an advert's timestamp may be (clock skew).
    pub max_skew: Duration,
    /// Most peers held; new peers beyond this are refused (existing ones
    /// still update).
    pub max_entries: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(30), max_skew: Duration::from_secs(30), max_entries: 10_000 }
    }
}

/// One peer as the table knows it.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// The peer.
    pub peer: PeerId,
    /// Its advert, verified.
    pub advert: Advert,
    /// The advert as signed, for forwarding to peers that sync from us.
    pub signed: Signed<Advert>,
    /// When we accepted it (ms since the Unix epoch, our clock).
    pub received_ms: u64,
}

/// How an advert reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Gossiped; libp2p vouches for the original publisher (`None` for an
    /// anonymous message), which must be the advert's signer.
    Gossip(Option<PeerId>),
    /// Forwarded in a table sync: only the signature speaks for it.
    Sync,
}

/// Why an advert was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// A peer we did not hold.
    New,
    /// A newer advert of a peer we held.
    Updated,
}

/// Why an advert was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Signature or payload invalid: the sender misbehaves.
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// Gossiped by a source other than its signer: forged or replayed.
    #[error("advert signed by {signer} was gossiped by another source")]
    ForgedSource { signer: PeerId },
    /// Older than the TTL.
    #[error("advert from {peer} is stale ({age_ms} ms old)")]
    Stale { peer: PeerId, age_ms: u64 },
    /// Timestamp too far ahead of our clock.
    #[error("advert from {peer} is {ahead_ms} ms in the future")]
    Future { peer: PeerId, ahead_ms: u64 },
    /// We hold this sequence number or a newer one (duplicate, replay).
    #[error("advert from {peer} has seq {seq}, we hold {held}")]
    Superseded { peer: PeerId, seq: u64, held: u64 },
    /// Our own advert, echoed back.
    #[error("our own advert")]
    Own,
    /// The table is full.
    #[error("capability table full")]
    Full,
}

impl Refused {
    /// True when the advert proves the sender misbehaved (as opposed to a
    /// benign duplicate or a late copy).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(self, Refused::Invalid(_) | Refused::ForgedSource { .. } | Refused::Future { .. })
    }
}

/// Newest advert per peer.
#[derive(Debug)]
pub struct CapabilityTable {
    local: PeerId,
    config: TableConfig,
    entries: HashMap<PeerId, PeerEntry>,
    grew_at_ms: Option<u64>,
}

impl CapabilityTable {
    /// An empty table for the node `local`.
    pub fn new(local: PeerId, config: TableConfig) -> Self {
        Self { local, config, entries: HashMap::new(), grew_at_ms: None }
    }

    /// Considers an advert that arrived `via` gossip or sync.
    pub fn offer(&mut self, signed: Signed<Advert>, via: Via, now_ms: u64) -> Result<Admitted, Refused> {
        let peer = signed.signer().to_peer_id();
        if let Via::Gossip(source) = via
            && source != Some(peer)
        {
            return Err(Refused::ForgedSource { signer: peer });
        }
        if peer == self.local {
            return Err(Refused::Own);
        }
        // Most adverts a node sees are copies of ones it holds (gossip
        // duplicates, syncs). Decoding is cheap and safe on untrusted bytes;
        // checking the signature is not cheap, so do it only for adverts
        // that would change the table. Nothing is stored unless it verifies.
        let claimed = <Advert as mycel_protocol::Wire>::decode(signed.payload())
            .map_err(|e| Refused::Invalid(VerifyError::Payload(e)))?;
        let admitted = match self.entries.get(&peer) {
            Some(held) if held.advert.seq >= claimed.seq => {
                return Err(Refused::Superseded { peer, seq: claimed.seq, held: held.advert.seq });
            }
            Some(_) => Admitted::Updated,
            None if self.entries.len() >= self.config.max_entries => return Err(Refused::Full),
            None => Admitted::New,
        };
        let ttl_ms = self.config.ttl.as_millis() as u64;
        let skew_ms = self.config.max_skew.as_millis() as u64;
        if claimed.timestamp_ms > now_ms.saturating_add(skew_ms) {
            return Err(Refused::Future { peer, ahead_ms: claimed.timestamp_ms - now_ms });
        }
        let age_ms = now_ms.saturating_sub(claimed.timestamp_ms);
        if age_ms > ttl_ms {
            return Err(Refused::Stale { peer, age_ms });
        }
        let advert = signed.verify()?;
        self.entries.insert(peer, PeerEntry { peer, advert, signed, received_ms: now_ms });
        if admitted == Admitted::New {
            self.grew_at_ms = Some(now_ms);
        }
        Ok(admitted)
    }

    /// Drops entries not refreshed within the TTL; returns who was dropped.
    pub fn expire(&mut self, now_ms: u64) -> Vec<PeerId> {
        let ttl_ms = self.config.ttl.as_millis() as u64;
        let expired: Vec<PeerId> =
            self.entries.values().filter(|e| now_ms.saturating_sub(e.received_ms) > ttl_ms).map(|e| e.peer).collect();
        for peer in &expired {
            self.entries.remove(peer);
        }
        expired
    }

    /// The entry of one peer.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.entries.get(peer)
    }

    /// All entries, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &PeerEntry> {
        self.entries.values()
    }

    /// A peer's advert, as held.
    pub fn advert(&self, peer: &PeerId) -> Option<&Advert> {
        self.entries.get(peer).map(|e| &e.advert)
    }

    /// Number of peers held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// When a peer last joined the table (ms since the Unix epoch): how a
    /// swarm measures when it converged, from the nodes' own clocks rather
    /// than from whoever polls them.
    pub fn grew_at_ms(&self) -> Option<u64> {
        self.grew_at_ms
    }

    /// True when no peer is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use mycel_protocol::{Hardware, Keypair, Load, Price, Wire};

    use super::*;

    const NOW: u64 = 1_000_000;

    fn advert(seq: u64, timestamp_ms: u64) -> Advert {
        Advert {
            seq,
            timestamp_ms,
            software: "test".into(),
            models: vec![],
            hardware: Hardware { cpu_model: "cpu".into(), cores: 2, ..Hardware::default() },
            load: Load::default(),
            price: Price::default(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        }
    }

    fn table() -> CapabilityTable {
        CapabilityTable::new(Keypair::from_secret_bytes(&[0; 32]).peer_id(), TableConfig::default())
    }

    fn signed(key: &Keypair, seq: u64, ts: u64) -> Signed<Advert> {
        Signed::sign(key, &advert(seq, ts)).unwrap()
    }

    #[test]
    fn keeps_the_newest_by_sequence() {
        let mut t = table();
        let k = Keypair::from_secret_bytes(&[1; 32]);
        let src = Via::Gossip(Some(k.peer_id()));
        assert_eq!(t.offer(signed(&k, 5, NOW), src, NOW).unwrap(), Admitted::New);
        assert!(matches!(t.offer(signed(&k, 5, NOW), src, NOW), Err(Refused::Superseded { .. })));
        assert!(matches!(t.offer(signed(&k, 4, NOW), src, NOW), Err(Refused::Superseded { .. })));
        assert_eq!(t.offer(signed(&k, 6, NOW), src, NOW).unwrap(), Admitted::Updated);
        assert_eq!(t.get(&k.peer_id()).unwrap().advert.seq, 6);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn remembers_when_a_peer_last_joined() {
        let mut t = table();
        assert_eq!(t.grew_at_ms(), None);
        let (a, b) = (Keypair::from_secret_bytes(&[1; 32]), Keypair::from_secret_bytes(&[2; 32]));
        t.offer(signed(&a, 1, NOW), Via::Sync, NOW).unwrap();
        assert_eq!(t.grew_at_ms(), Some(NOW));
        t.offer(signed(&b, 1, NOW), Via::Sync, NOW + 5).unwrap();
        assert_eq!(t.grew_at_ms(), Some(NOW + 5));
        // A newer advert of a peer already held is not a join.
        t.offer(signed(&a, 2, NOW + 9), Via::Sync, NOW + 9).unwrap();
        assert_eq!(t.grew_at_ms(), Some(NOW + 5));
    }

    #[test]
    fn bad_signature_is_refused() {
        let mut t = table();
        let k = Keypair::from_secret_bytes(&[1; 32]);
        let mut bytes = signed(&k, 1, NOW).encode().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let tampered = Signed::<Advert>::decode(&bytes).unwrap();
        let err = t.offer(tampered, Via::Sync, NOW).unwrap_err();
        assert!(matches!(err, Refused::Invalid(_)) && err.is_misbehaviour(), "{err}");
        assert!(t.is_empty());
    }

    #[test]
    fn a_newer_seq_with_a_bad_signature_changes_nothing() {
        let mut t = table();
        let k = Keypair::from_secret_bytes(&[1; 32]);
        t.offer(signed(&k, 1, NOW), Via::Sync, NOW).unwrap();
        // Re-sign seq 2 with another key, then put k's public key back in
        // front: the envelope claims k but the signature is not k's.
        let other = Keypair::from_secret_bytes(&[2; 32]);
        let mut bytes = signed(&other, 2, NOW).encode().unwrap();
        bytes[..32].copy_from_slice(&k.public().to_bytes());
        let forged = Signed::<Advert>::decode(&bytes).unwrap();
        assert!(matches!(t.offer(forged, Via::Sync, NOW), Err(Refused::Invalid(_))));
        assert_eq!(t.get(&k.peer_id()).unwrap().advert.seq, 1);
    }

    #[test]
    fn forged_gossip_source_is_refused() {
        let mut t = table();
        let author = Keypair::from_secret_bytes(&[1; 32]);
        let relay = Keypair::from_secret_bytes(&[2; 32]);
        let err = t.offer(signed(&author, 1, NOW), Via::Gossip(Some(relay.peer_id())), NOW).unwrap_err();
        assert!(matches!(err, Refused::ForgedSource { .. }) && err.is_misbehaviour(), "{err}");
        // Anonymous gossip (no source) is refused too.
        assert!(matches!(t.offer(signed(&author, 1, NOW), Via::Gossip(None), NOW), Err(Refused::ForgedSource { .. })));
        // The same advert by sync (no gossip source) stands on its signature.
        assert_eq!(t.offer(signed(&author, 1, NOW), Via::Sync, NOW).unwrap(), Admitted::New);
    }

    #[test]
    fn stale_and_future_adverts_are_refused() {
        let mut t = table();
        let k = Keypair::from_secret_bytes(&[1; 32]);
        let ttl = TableConfig::default().ttl.as_millis() as u64;
        let skew = TableConfig::default().max_skew.as_millis() as u64;
        assert!(matches!(t.offer(signed(&k, 1, NOW - ttl - 1), Via::Sync, NOW), Err(Refused::Stale { .. })));
        assert!(matches!(t.offer(signed(&k, 1, NOW + skew + 1), Via::Sync, NOW), Err(Refused::Future { .. })));
        assert!(t.offer(signed(&k, 1, NOW + skew), Via::Sync, NOW).is_ok());
    }

    #[test]
    fn entries_expire_unless_refreshed() {
        let mut t = table();
        let a = Keypair::from_secret_bytes(&[1; 32]);
        let b = Keypair::from_secret_bytes(&[2; 32]);
        let ttl = TableConfig::default().ttl.as_millis() as u64;
        t.offer(signed(&a, 1, NOW), Via::Sync, NOW).unwrap();
        t.offer(signed(&b, 1, NOW), Via::Sync, NOW).unwrap();
        // b refreshes halfway; a does not.
        t.offer(signed(&b, 2, NOW + ttl / 2), Via::Sync, NOW + ttl / 2).unwrap();
        assert!(t.expire(NOW + ttl).is_empty());
        assert_eq!(t.expire(NOW + ttl + 1), vec![a.peer_id()]);
        assert!(t.get(&b.peer_id()).is_some());
    }

    #[test]
    fn own_advert_and_overflow_are_refused() {
        let local = Keypair::from_secret_bytes(&[0; 32]);
        let mut t = CapabilityTable::new(local.peer_id(), TableConfig { max_entries: 1, ..TableConfig::default() });
        assert!(matches!(t.offer(signed(&local, 1, NOW), Via::Sync, NOW), Err(Refused::Own)));
        t.offer(signed(&Keypair::from_secret_bytes(&[1; 32]), 1, NOW), Via::Sync, NOW).unwrap();
        let err = t.offer(signed(&Keypair::from_secret_bytes(&[2; 32]), 1, NOW), Via::Sync, NOW).unwrap_err();
        assert!(matches!(err, Refused::Full));
    }
}
