//! At most one direct and one relayed connection per peer.
//!
//! gossipsub keeps its per-peer state (subscriptions, send queue) from the
//! first connection. A direct reconnection that overlapped a dead direct
//! connection still being closed (after a partition heals) left the two
//! ends disagreeing about each other's subscriptions, and a healed testnet
//! never reconverged; refused, the redial lands once the dead connection is
//! gone, as a first connection. Two overlaps are fine, because both ends
//! see the new connection as a second one and so agree:
//! - hole punching: peers that met over a relay open a direct connection
//!   beside the relayed one (DCUtR);
//! - AutoNAT: a peer dials us back on the address it sees, beside the
//!   connection we asked over. That connection is alive (it answered a ping
//!   moments ago); a dead one, left over from a partition, has not.
//!
//! So: one relayed connection per peer, and a second direct one only
//! beside a direct one that answered a ping within [`ALIVE_WITHIN`].
//!
//! Hole punching then retires the relayed connection, but only once the
//! direct one has answered a ping: the answer proves that the other end's
//! swarm holds the direct connection (handlers run only after it is
//! registered). Closed any earlier, the other end could see the relayed
//! connection close before the direct one arrive, take the peer for gone
//! and back, and resend its subscriptions to an end that, having seen no
//! gap, never resends its own: that end's adverts then reached nobody (the
//! other never learnt it listens), and once the relay died the pair
//! stopped hearing each other.

use std::collections::{HashMap, HashSet};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Whether a connection runs through a relay (its address has
/// `/p2p-circuit`).
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn endpoint_is_relayed(endpoint: &ConnectedPoint) -> bool {
    match endpoint {
        ConnectedPoint::Dialer { address, .. } => is_relayed(address),
        ConnectedPoint::Listener { local_addr, send_back_addr } => is_relayed(local_addr) || is_relayed(send_back_addr),
    }
}

/// How recently a direct connection must have answered a ping for a
/// second one beside it to be let in: two ping intervals.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);

/// A second direct (or relayed) connection to a peer already holding one.
#[derive(Debug, thiserror::Error)]
#[error("already connected to {peer} {}", if *.relayed { "through a relay" } else { "directly" })]
pub struct SecondConnection {
    peer: PeerId,
    relayed: bool,
}

/// The rule as a behaviour: counts established connections per peer and
/// path, refuses what would exceed one of each.
#[derive(Debug, Default)]
pub struct OnePerPath {
    /// Per peer: direct and relayed connections established.
    counts: HashMap<PeerId, [u8; 2]>,
    /// The path of every connection counted, to uncount it on close.
    paths: HashMap<ConnectionId, (PeerId, bool)>,
    /// Per peer: when a direct connection last answered a ping.
    alive: HashMap<PeerId, Instant>,
    /// Peers whose relayed connection goes once a direct one answers.
    retiring: HashSet<PeerId>,
}

impl OnePerPath {
    fn check(&self, peer: PeerId, relayed: bool) -> Result<(), ConnectionDenied> {
        let held = self.counts.get(&peer).map_or(0, |c| c[usize::from(relayed)]);
        let beside_a_live_one =
            !relayed && held == 1 && self.alive.get(&peer).is_some_and(|at| at.elapsed() < ALIVE_WITHIN);
        if held > 0 && !beside_a_live_one {
            Err(ConnectionDenied::new(SecondConnection { peer, relayed }))
        } else {
            Ok(())
        }
    }

    /// A connection answered a ping: the relayed connections to close now
    /// (see [`OnePerPath::retire_relayed`]).
    #[must_use = "the relayed connections returned are to be closed"]
    pub fn answered(&mut self, connection: ConnectionId) -> Vec<ConnectionId> {
        let Some(&(peer, false)) = self.paths.get(&connection) else { return Vec::new() };
        self.alive.insert(peer, Instant::now());
        if self.retiring.remove(&peer) { self.relayed_to(&peer) } else { Vec::new() }
    }

    /// Hole punching opened a direct connection to `peer`: its relayed
    /// connections are to close once a direct one answers a ping. Returns
    /// those to close now (one already did).
    #[must_use = "the relayed connections returned are to be closed"]
    pub fn retire_relayed(&mut self, peer: PeerId) -> Vec<ConnectionId> {
        if self.alive.contains_key(&peer) {
            self.relayed_to(&peer)
        } else {
            self.retiring.insert(peer);
            Vec::new()
        }
    }

    /// The relayed connections to `peer`.
    fn relayed_to(&self, peer: &PeerId) -> Vec<ConnectionId> {
        self.paths.iter().filter(|(_, (p, relayed))| p == peer && *relayed).map(|(c, _)| *c).collect()
    }

    /// Connections held per peer: (direct, relayed).
    pub fn clone_counts(&self) -> Vec<(PeerId, (u8, u8))> {
        self.counts.iter().map(|(p, c)| (*p, (c[0], c[1]))).collect()
    }
}

impl NetworkBehaviour for OnePerPath {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, is_relayed(local_addr) || is_relayed(remote_addr))?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer, is_relayed(addr))?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let relayed = endpoint_is_relayed(e.endpoint);
                self.counts.entry(e.peer_id).or_default()[usize::from(relayed)] += 1;
                self.paths.insert(e.connection_id, (e.peer_id, relayed));
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some((peer, relayed)) = self.paths.remove(&e.connection_id)
                    && let Some(c) = self.counts.get_mut(&peer)
                {
                    c[usize::from(relayed)] = c[usize::from(relayed)].saturating_sub(1);
                    if *c == [0, 0] {
                        self.counts.remove(&peer);
                        self.retiring.remove(&peer);
                    }
                    if !relayed {
                        self.alive.remove(&peer);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _peer: PeerId, _connection: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_are_relayed() {
        let relayed: Multiaddr =
            "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWA1pqFXdNW3qgHXX8k2fFDnRKHVgNfw4gTjdsvNoLR9VX/p2p-circuit"
                .parse()
                .unwrap_or_else(|_| unreachable!());
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(&"/ip4/198.18.0.1/tcp/4001".parse().unwrap_or_else(|_| unreachable!())));
    }

    #[test]
    fn one_direct_and_one_relayed_connection_per_peer() {
        let mut rule = OnePerPath::default();
        let peer = PeerId::random();
        assert!(rule.check(peer, false).is_ok());
        rule.counts.insert(peer, [0, 1]);
        assert!(rule.check(peer, false).is_ok(), "a direct connection beside a relayed one (hole punching)");
        assert!(rule.check(peer, true).is_err(), "a second relayed one");
        rule.counts.insert(peer, [1, 1]);
        let refused = rule
            .check(peer, false)
            .err()
            .and_then(|e| e.downcast_ref::<SecondConnection>().map(ToString::to_string))
            .unwrap_or_default();
        assert!(refused.contains("directly"), "a second direct one beside one not known alive: {refused}");
        rule.alive.insert(peer, Instant::now());
        assert!(rule.check(peer, false).is_ok(), "beside one that just answered a ping (AutoNAT's dial-back)");
        rule.counts.insert(peer, [2, 1]);
        assert!(rule.check(peer, false).is_err(), "never a third");
        rule.alive.insert(peer, Instant::now() - ALIVE_WITHIN);
        rule.counts.insert(peer, [1, 0]);
        assert!(rule.check(peer, false).is_err(), "beside one silent for too long (a partition)");
        assert!(rule.check(PeerId::random(), false).is_ok(), "other peers are not affected");
    }

    #[test]
    fn a_punched_peers_relayed_connection_goes_only_once_the_direct_one_answers() {
        let mut rule = OnePerPath::default();
        let (peer, other) = (PeerId::random(), PeerId::random());
        let (relayed, direct, others) =
            (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2), ConnectionId::new_unchecked(3));
        rule.paths.insert(relayed, (peer, true));
        rule.paths.insert(direct, (peer, false));
        rule.paths.insert(others, (other, false));
        rule.counts.insert(peer, [1, 1]);
        assert!(rule.retire_relayed(peer).is_empty(), "the other end may not hold the direct connection yet");
        assert!(rule.answered(others).is_empty(), "another peer's answer retires nothing");
        assert!(rule.answered(relayed).is_empty(), "the relayed connection's own answer proves nothing");
        assert_eq!(rule.answered(direct), vec![relayed], "the direct one answered: the relayed one goes");
        assert!(rule.answered(direct).is_empty(), "once");
        assert_eq!(rule.retire_relayed(peer), vec![relayed], "punched again beside a live direct one: at once");
    }
}
