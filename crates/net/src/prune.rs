//! A bound on connections, so a node's cost follows what it uses rather
//! than the size of the swarm.
//!
//! Connections never idle out on their own: gossipsub keeps a stream open
//! with every connected peer, and libp2p keeps a connection alive while a
//! stream is open, so Kademlia's walks and the market's dials leave a node
//! connected to most of the swarm. Past a high-water mark (the target plus a
//! quarter), the connections least worth keeping are closed, down to the
//! target, as go-libp2p's connection manager does.
//!
//! Never closed, whatever the count: peers the caller protects (our advert
//! mesh, relays and the peers relaying through us, peers with requests in
//! flight) and connections younger than the grace period or used within
//! it, where forwarding us others' adverts counts as use (such a peer holds
//! us in *its* mesh: mesh membership is not always symmetric, and dropping
//! such a link from both ends can leave a node with no path for its
//! adverts), and so does a worker's own advert on the topic of a model we
//! use (with `--adverts used`, the workers we need). A worker's caller also
//! protects the peers listening to the topic of a model it serves (its
//! users). Bootstrap peers are not spared: a bootstrap node would
//! otherwise hold a connection to every node. Of the rest, the longest
//! unused go first.
//!
//! Below [`FLOOR`] connections a node dials known peers (see
//! `EventLoop::keep_floor`), so what others prune never leaves it alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Fewer connections than this and a node dials more: gossipsub's lowest
/// mesh size (`mesh_n_low`, 5 by default), so a mesh can form.
pub const FLOOR: usize = 5;

/// When a peer connected and when it was last of use.
#[derive(Debug, Clone, Copy)]
struct Usage {
    since: Instant,
    used: Instant,
}

/// Tracks connected peers' use and picks which to close.
#[derive(Debug)]
pub struct Pruner {
    target: usize,
    grace: Duration,
    peers: HashMap<PeerId, Usage>,
}

impl Pruner {
    /// Keeps about `target` connections; a connection younger than
    /// `grace`, or used within it, is kept.
    pub fn new(target: usize, grace: Duration) -> Self {
        Self { target: target.max(FLOOR), grace, peers: HashMap::new() }
    }

    /// Past this many connected peers, some are closed.
    pub fn high_water(&self) -> usize {
        self.target + self.target / 4
    }

    /// A peer's first connection opened.
    pub fn connected(&mut self, peer: PeerId, now: Instant) {
        self.peers.entry(peer).or_insert(Usage { since: now, used: now });
    }

    /// A peer's last connection closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// The peer was of use now: a request or response either way, or gossip
    /// it forwarded to us.
    pub fn used(&mut self, peer: &PeerId, now: Instant) {
        if let Some(usage) = self.peers.get_mut(peer) {
            usage.used = now;
        }
    }

    /// Peers to disconnect now: none at or under the high-water mark, else
    /// the longest unused of those not protected, until `target` remain.
    pub fn to_close(&self, now: Instant, protected: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        if self.peers.len() <= self.high_water() {
            return Vec::new();
        }
        let recent = |at: Instant| now.saturating_duration_since(at) < self.grace;
        let mut idle: Vec<(&PeerId, &Usage)> =
            self.peers.iter().filter(|(p, u)| !recent(u.since) && !recent(u.used) && !protected(p)).collect();
        idle.sort_by_key(|(p, u)| (u.used, **p));
        let excess = self.peers.len() - self.target;
        idle.into_iter().take(excess).map(|(p, _)| *p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    /// A pruner of `target` and `grace` (s) with `n` peers connected at
    /// `start`.
    fn connected(n: usize, target: usize, grace: u64, start: Instant) -> (Pruner, Vec<PeerId>) {
        let mut pruner = Pruner::new(target, Duration::from_secs(grace));
        let all = peers(n);
        for p in &all {
            pruner.connected(*p, start);
        }
        (pruner, all)
    }

    #[test]
    fn nothing_closes_at_or_under_the_high_water_mark() {
        let start = Instant::now();
        let (pruner, _) = connected(10, 8, 1, start);
        assert_eq!(pruner.high_water(), 10);
        assert!(pruner.to_close(start + Duration::from_secs(60), |_| false).is_empty());
    }

    #[test]
    fn past_it_the_longest_unused_go_down_to_the_target_sparing_the_protected_and_the_recent() {
        let start = Instant::now();
        let (mut pruner, all) = connected(14, 8, 10, start);
        // Peer i was last used i seconds after the start; 13 just now.
        let now = start + Duration::from_secs(30);
        for (i, p) in all.iter().enumerate() {
            pruner.used(p, start + Duration::from_secs(i as u64));
        }
        pruner.used(&all[13], now);
        let protected = |p: &PeerId| *p == all[0] || *p == all[1];
        let closed = pruner.to_close(now, protected);
        // 14 connected, target 8: six go, the longest unused that are
        // neither protected (0, 1) nor used within the grace period (13).
        assert_eq!(closed, all[2..8].to_vec());
    }

    #[test]
    fn young_connections_are_kept_even_past_the_mark() {
        let start = Instant::now();
        let (pruner, _) = connected(12, 5, 10, start);
        assert!(pruner.to_close(start + Duration::from_secs(5), |_| false).is_empty());
        assert_eq!(pruner.to_close(start + Duration::from_secs(11), |_| false).len(), 7);
    }

    #[test]
    fn the_target_never_goes_under_the_floor() {
        let pruner = Pruner::new(1, Duration::from_secs(1));
        assert_eq!(pruner.target, FLOOR);
    }
}
