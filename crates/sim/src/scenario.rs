//! What a run simulates: the swarm, the work, the network and the faults.
//! Scenarios are small TOML files (see `crates/sim/scenarios/`); every
//! field has a default, so a file names only what it changes.

use serde::Deserialize;

/// A whole simulated run, less its seed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Nodes in the swarm.
    pub nodes: usize,
    /// Tasks submitted in all.
    pub tasks: usize,
    /// Shards in each task.
    pub shards_per_task: u32,
    /// Texts in each shard.
    pub items_per_shard: u32,
    /// Copies of each shard, compared.
    pub redundancy: u8,
    /// Share of single-copy shards also run elsewhere, per mille.
    pub spot_check_permille: u16,
    /// Nodes that submit tasks (always honest: they stand for users). At
    /// most `nodes`.
    pub requesters: usize,
    /// Adverts each requester hears (a random set of peers): the part of
    /// the swarm it can hire from.
    pub view: usize,
    /// Tasks are submitted at random times over this many milliseconds.
    pub submit_over_ms: u64,
    /// Shards a node runs at once.
    pub capacity: u32,
    /// Jobs a node's model pool holds waiting; past it a job fails at once
    /// and its shard is given back (the node's pool holds 64).
    pub pool_queue: usize,
    /// Each node's speed, in texts per second, drawn uniformly from this
    /// range.
    pub speed: [f32; 2],
    /// The network.
    pub network: Network,
    /// Nodes crashing and restarting.
    pub crashes: Crashes,
    /// Partitions, each healed after a while.
    #[serde(rename = "partition")]
    pub partitions: Vec<Partition>,
    /// Misbehaving nodes, as shares of the swarm.
    pub misbehaving: Misbehaving,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            nodes: 12,
            tasks: 8,
            shards_per_task: 6,
            items_per_shard: 4,
            redundancy: 1,
            spot_check_permille: 100,
            requesters: 3,
            view: 256,
            submit_over_ms: 5_000,
            capacity: 2,
            pool_queue: 64,
            speed: [50.0, 400.0],
            network: Network::default(),
            crashes: Crashes::default(),
            partitions: Vec::new(),
            misbehaving: Misbehaving::default(),
        }
    }
}

/// How messages travel.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// Every message takes at least this long.
    pub min_latency_ms: u64,
    /// Mean of the exponential delay added to the minimum: messages
    /// overtake each other, so they arrive reordered.
    pub mean_extra_latency_ms: u64,
    /// Requests lost, per mille: half the time before the receiver sees
    /// them, half after (only the reply is lost, so a retry duplicates).
    pub loss_permille: u32,
    /// Requests delivered twice, per mille.
    pub duplicate_permille: u32,
    /// A request that gets no reply fails after this long (libp2p's
    /// request-response timeout).
    pub request_timeout_ms: u64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            min_latency_ms: 5,
            mean_extra_latency_ms: 20,
            loss_permille: 0,
            duplicate_permille: 0,
            request_timeout_ms: 10_000,
        }
    }
}

/// Crashes: a random node dies (kill -9: only what it journaled
/// survives) and comes back after a while.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Crashes {
    /// Mean time between crashes anywhere in the swarm (0: none).
    pub every_ms: u64,
    /// How long a crashed node stays down.
    pub down_ms: u64,
    /// Whether requesters crash too (their tasks must resume).
    pub requesters: bool,
}

impl Default for Crashes {
    fn default() -> Self {
        Self { every_ms: 0, down_ms: 3_000, requesters: true }
    }
}

/// A set of nodes cut off from the rest, then reconnected.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// When it starts.
    pub at_ms: u64,
    /// How long it lasts.
    pub for_ms: u64,
    /// Share of the nodes cut off (at least one).
    pub share: f64,
}

/// Shares of the swarm that misbehave, each in its own way. Requesters are
/// never among them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Misbehaving {
    /// Return wrong vectors, each its own, signed as their own.
    pub liars: f64,
    /// Lie on about one shard in four, hoping those go unchecked (the
    /// node's own `sometimes` fault).
    pub sneaky: f64,
    /// Send results whose signature does not verify (the node's own
    /// `forge` fault).
    pub forgers: f64,
    /// Answer with a signed claim copied from elsewhere (another peer's
    /// result for the same shard, or their own for another shard).
    pub replayers: f64,
    /// Bid, win, and never answer (the node's own `silent` fault).
    pub silent: f64,
    /// Run every shard 20 times slower than they advertise.
    pub slow: f64,
    /// Bid on everything and give every award back ("busy"): bids never
    /// honoured.
    pub refusers: f64,
    /// One operator's many identities: they lie with the same wrong
    /// answer, so copies of a shard given to two of them agree.
    pub sybils: f64,
}

/// How a simulated node behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Behaviour {
    /// Does the work, truthfully.
    Honest,
    /// See [`Misbehaving::liars`].
    Liar,
    /// See [`Misbehaving::sneaky`].
    Sneaky,
    /// See [`Misbehaving::forgers`].
    Forger,
    /// See [`Misbehaving::replayers`].
    Replayer,
    /// See [`Misbehaving::silent`].
    Silent,
    /// See [`Misbehaving::slow`].
    Slow,
    /// See [`Misbehaving::refusers`].
    Refuser,
    /// See [`Misbehaving::sybils`].
    Sybil,
}

impl Behaviour {
    /// Whether it ever puts a false statement in a signed result (lies,
    /// forges, replays): what reputation must end up punishing.
    pub fn lies(self) -> bool {
        matches!(self, Self::Liar | Self::Sneaky | Self::Forger | Self::Replayer | Self::Sybil)
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Honest => "honest",
            Self::Liar => "liar",
            Self::Sneaky => "sneaky",
            Self::Forger => "forger",
            Self::Replayer => "replayer",
            Self::Silent => "silent",
            Self::Slow => "slow",
            Self::Refuser => "refuser",
            Self::Sybil => "sybil",
        }
    }
}

impl Scenario {
    /// A scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let scenario: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks the numbers make a run; says which does not.
    pub fn validate(&self) -> Result<(), String> {
        let limits = mycel_protocol::limits::SHARDS_PER_TASK;
        if self.nodes < 2 {
            return Err("nodes: at least 2".into());
        }
        if self.requesters == 0 || self.requesters > self.nodes {
            return Err(format!("requesters: between 1 and nodes ({})", self.nodes));
        }
        if self.shards_per_task == 0 || self.shards_per_task as usize > limits {
            return Err(format!("shards_per_task: between 1 and {limits}"));
        }
        if self.items_per_shard == 0 || self.items_per_shard > 1024 {
            return Err("items_per_shard: between 1 and 1024".into());
        }
        if !(1..=mycel_protocol::limits::MAX_REDUNDANCY).contains(&self.redundancy) {
            return Err(format!("redundancy: between 1 and {}", mycel_protocol::limits::MAX_REDUNDANCY));
        }
        if self.spot_check_permille > 1000 {
            return Err("spot_check_permille: at most 1000".into());
        }
        if self.view == 0 || self.capacity == 0 {
            return Err("view and capacity: at least 1".into());
        }
        if !(self.speed[0] > 0.0 && self.speed[0] <= self.speed[1]) {
            return Err("speed: [low, high] with 0 < low <= high".into());
        }
        if self.network.loss_permille > 500 || self.network.duplicate_permille > 500 {
            return Err("network: loss and duplication at most 500 per mille".into());
        }
        for p in &self.partitions {
            if !(p.share > 0.0 && p.share < 1.0) {
                return Err("partition share: between 0 and 1".into());
            }
        }
        let m = &self.misbehaving;
        let shares = [m.liars, m.sneaky, m.forgers, m.replayers, m.silent, m.slow, m.sybils, m.refusers];
        if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 0.9 {
            return Err("misbehaving: each share in [0, 1], together at most 0.9".into());
        }
        Ok(())
    }

    /// How many nodes behave each way (at least one of a kind whose share
    /// is above 0), in a fixed order.
    pub fn behaviours(&self) -> Vec<(Behaviour, usize)> {
        let m = &self.misbehaving;
        let workers = self.nodes - self.requesters;
        let count = |share: f64| if share > 0.0 { ((share * self.nodes as f64).round() as usize).max(1) } else { 0 };
        let mut left = workers;
        let mut out = Vec::new();
        for (b, share) in [
            (Behaviour::Liar, m.liars),
            (Behaviour::Sneaky, m.sneaky),
            (Behaviour::Forger, m.forgers),
            (Behaviour::Replayer, m.replayers),
            (Behaviour::Silent, m.silent),
            (Behaviour::Slow, m.slow),
            (Behaviour::Sybil, m.sybils),
            (Behaviour::Refuser, m.refusers),
        ] {
            let n = count(share).min(left);
            left -= n;
            out.push((b, n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_names_only_what_it_changes() {
        let s = Scenario::from_toml("nodes = 40\n[network]\nloss_permille = 20\n").unwrap();
        assert_eq!(s.nodes, 40);
        assert_eq!(s.network.loss_permille, 20);
        assert_eq!(s.tasks, Scenario::default().tasks);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = Scenario::from_toml("nodez = 4").unwrap_err();
        assert!(e.contains("nodez"), "{e}");
        let e = Scenario::from_toml("nodes = 4\nrequesters = 9").unwrap_err();
        assert!(e.contains("requesters"), "{e}");
        let e = Scenario::from_toml("[misbehaving]\nliars = 0.6\nsilent = 0.5").unwrap_err();
        assert!(e.contains("misbehaving"), "{e}");
    }
}
