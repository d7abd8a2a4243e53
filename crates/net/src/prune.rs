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
//! flight), connections opened within [`YOUNG`] (or the grace period, if
//! shorter) and connections used within the grace period, where
//! forwarding us others' adverts counts as use (such a peer holds
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

/// Why the caller protects a peer from pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// In our mesh of an advert topic.
    Mesh,
    /// Listening to the topic of a model we serve.
    Users,
    /// A relay, a peer relaying through us, or a request in flight.
    Other,
}

/// Connected peers by what keeps them: what an operator (or a bench) reads
/// to see why a node holds more connections than its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Protected: in an advert mesh.
    pub mesh: usize,
    /// Protected: users of a model we serve.
    pub users: usize,
    /// Protected: relays, relayed peers, requests in flight.
    pub other: usize,
    /// Opened within [`YOUNG`] (or the grace period, if shorter), unused.
    pub young: usize,
    /// Used within the grace period.
    pub used: usize,
    /// None of these: closed first when past the high-water mark.
    pub idle: usize,
}

impl Census {
    /// `(label, count)` per reason, in order.
    pub fn by_reason(&self) -> [(&'static str, usize); 6] {
        [
            ("mesh", self.mesh),
            ("users", self.users),
            ("other", self.other),
            ("young", self.young),
            ("used", self.used),
            ("idle", self.idle),
        ]
    }
}

/// A new connection that nothing has used is kept this long (or the grace
/// period, if shorter): long enough for what opened it to use it (a request
/// marks its peer used as it is sent; a gossip mesh forms within a
/// heartbeat), while the connections a DHT query opened, which nothing uses
/// once it moved on, go soon after. Kademlia's bootstrap walks most of a
/// small swarm: with the whole grace period for each, a node joining a
/// swarm of 150 held about 120 connections for a minute, and a swarm
/// joining all at once stayed there while its walks went on.
pub const YOUNG: Duration = Duration::from_secs(15);

/// When a peer connected and when it was last of use (`None`: never).
#[derive(Debug, Clone, Copy)]
struct Usage {
    since: Instant,
    used: Option<Instant>,
}

/// Tracks connected peers' use and picks which to close.
#[derive(Debug)]
pub struct Pruner {
    target: usize,
    grace: Duration,
    peers: HashMap<PeerId, Usage>,
}

impl Pruner {
    /// Keeps about `target` connections; a connection used within `grace`
    /// is kept, and a new one for [`YOUNG`] (or `grace`, if shorter).
    pub fn new(target: usize, grace: Duration) -> Self {
        Self { target: target.max(FLOOR), grace, peers: HashMap::new() }
    }

    /// Past this many connected peers, some are closed.
    pub fn high_water(&self) -> usize {
        self.target + self.target / 4
    }

    /// A peer's first connection opened.
    pub fn connected(&mut self, peer: PeerId, now: Instant) {
        self.peers.entry(peer).or_insert(Usage { since: now, used: None });
    }

    /// A peer's last connection closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// The peer was of use now: a request or response either way, or gossip
    /// it forwarded to us.
    pub fn used(&mut self, peer: &PeerId, now: Instant) {
        if let Some(usage) = self.peers.get_mut(peer) {
            usage.used = Some(now);
        }
    }

    /// Whether a connection is too new to close: see [`YOUNG`].
    fn young(&self, usage: &Usage, now: Instant) -> bool {
        now.saturating_duration_since(usage.since) < self.grace.min(YOUNG)
    }

    /// Whether a connection was used within the grace period.
    fn recently_used(&self, usage: &Usage, now: Instant) -> bool {
        usage.used.is_some_and(|at| now.saturating_duration_since(at) < self.grace)
    }

    /// Why each connected peer is kept (or not) now: `protected` says
    /// why the caller protects a peer, if it does. Each peer counts once,
    /// under the first reason that holds, in [`Census`]'s order.
    pub fn census(&self, now: Instant, protected: impl Fn(&PeerId) -> Option<Protection>) -> Census {
        let mut census = Census::default();
        for (peer, usage) in &self.peers {
            let slot = match protected(peer) {
                Some(Protection::Mesh) => &mut census.mesh,
                Some(Protection::Users) => &mut census.users,
                Some(Protection::Other) => &mut census.other,
                None if self.young(usage, now) => &mut census.young,
                None if self.recently_used(usage, now) => &mut census.used,
                None => &mut census.idle,
            };
            *slot += 1;
        }
        census
    }

    /// Peers to disconnect now: none at or under the high-water mark, else
    /// the longest unused of those not protected, until `target` remain.
    pub fn to_close(&self, now: Instant, protected: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        if self.peers.len() <= self.high_water() {
            return Vec::new();
        }
        let mut idle: Vec<(&PeerId, &Usage)> = self
            .peers
            .iter()
            .filter(|(p, u)| !self.young(u, now) && !self.recently_used(u, now) && !protected(p))
            .collect();
        idle.sort_by_key(|(p, u)| (u.used.unwrap_or(u.since), **p));
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
    fn a_connection_nothing_used_goes_once_it_is_no_longer_young_well_within_the_grace() {
        let start = Instant::now();
        let (mut pruner, all) = connected(9, 5, 60, start);
        pruner.used(&all[0], start + Duration::from_secs(1));
        // Within YOUNG of opening: all kept.
        assert!(pruner.to_close(start + YOUNG - Duration::from_secs(1), |_| false).is_empty());
        // Past it: the used one stays (used within the grace), four of the
        // eight others go, down to the target.
        let closed = pruner.to_close(start + YOUNG + Duration::from_secs(1), |_| false);
        assert_eq!(closed.len(), 4);
        assert!(!closed.contains(&all[0]));
    }

    #[test]
    fn the_census_counts_each_peer_once_under_its_first_reason() {
        let start = Instant::now();
        let (mut pruner, all) = connected(6, 5, 60, start);
        let now = start + Duration::from_secs(30);
        pruner.used(&all[1], now);
        pruner.used(&all[2], now);
        let late = PeerId::random();
        pruner.connected(late, now);
        let protected = |p: &PeerId| (*p == all[0] || *p == all[1]).then_some(Protection::Mesh);
        let census = pruner.census(now, protected);
        // 0 and 1 protected (1 also used: counted once, as protected), 2
        // used, the late one young, the other three idle.
        assert_eq!(census, Census { mesh: 2, young: 1, used: 1, idle: 3, ..Census::default() });
        assert_eq!(census.by_reason().iter().map(|(_, n)| n).sum::<usize>(), 7);
    }

    #[test]
    fn the_target_never_goes_under_the_floor() {
        let pruner = Pruner::new(1, Duration::from_secs(1));
        assert_eq!(pruner.target, FLOOR);
    }
}
