//! Node configuration: defaults, then the TOML file, then `MYCEL_*`
//! variables and flags (flags win over variables; clap resolves those two).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mycel_net::Multiaddr;
use serde::Deserialize;

use crate::cli::NodeArgs;

/// Everything `mycel node` runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Key, journal and runtime files.
    pub data_dir: PathBuf,
    /// Peer-to-peer listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through.
    pub bootstrap: Vec<Multiaddr>,
    /// Local HTTP API address.
    pub api: SocketAddr,
    /// Bearer token for the API (required off loopback).
    pub api_token: Option<String>,
    /// Requests per second per client on the OpenAI-compatible API (0: no limit).
    pub api_rate_limit: f64,
    /// Discover peers on the LAN.
    pub mdns: bool,
    /// Relay for peers behind NAT.
    pub relay_server: bool,
    /// Relays to stay reachable through.
    pub relays: Vec<Multiaddr>,
    /// Addresses known to reach this node from outside.
    pub external_addrs: Vec<Multiaddr>,
    /// Connected peers to keep about (the least used past a quarter more
    /// are closed).
    pub peers: usize,
    /// Whose periodic adverts to listen to: only those serving the models
    /// this node uses (and the catalogue: one per model), or every node's.
    pub adverts: mycel_net::AdvertScope,
    /// AutoNAT probes private addresses too (testnets).
    pub probe_private_addrs: bool,
    /// How often to re-publish our advert.
    pub advert_interval: Duration,
    /// How often the router offers what it learned and learns from one
    /// peer's (zero: never).
    pub router_share_interval: Duration,
    /// Folder of model folders.
    pub models_dir: PathBuf,
    /// Models to serve (ids or paths); `None`: all in `models_dir`.
    pub models: Option<Vec<String>>,
    /// Model worker replicas.
    pub replicas: usize,
    /// Compute threads per replica.
    pub threads: usize,
    /// Threads a short embedding (a routed prompt) may use while the model
    /// pool has nothing else to do.
    pub idle_threads: usize,
    /// Finished tasks (with their outputs) kept for `mycel task` and the
    /// API; older ones are dropped, from the journal too.
    pub keep_finished: usize,
    /// Tasks run at once as requester.
    pub max_running_tasks: usize,
    /// Misbehave on purpose (testing only).
    pub fault: Option<crate::market::Fault>,
}

/// Connected peers a node keeps about by default.
pub const DEFAULT_PEERS: usize = mycel_net::DEFAULT_PEER_TARGET;

/// The default API address: loopback only.
pub const DEFAULT_API: &str = "127.0.0.1:7700";

impl NodeConfig {
    /// The model worker pool these settings ask for.
    pub fn pool(&self) -> mycel_models::PoolConfig {
        mycel_models::PoolConfig {
            replicas: self.replicas,
            threads: self.threads,
            idle_threads: self.idle_threads,
            ..mycel_models::PoolConfig::for_cores(self.replicas)
        }
    }

    fn defaults(data_dir: PathBuf) -> Self {
        Self {
            listen: vec![parse_addr("/ip4/0.0.0.0/tcp/4001"), parse_addr("/ip4/0.0.0.0/udp/4001/quic-v1")],
            bootstrap: Vec::new(),
            api: DEFAULT_API.parse().unwrap_or_else(|_| unreachable!("valid literal")),
            api_token: None,
            api_rate_limit: 20.0,
            mdns: true,
            relay_server: false,
            relays: Vec::new(),
            external_addrs: Vec::new(),
            peers: DEFAULT_PEERS,
            adverts: mycel_net::AdvertScope::Used,
            probe_private_addrs: false,
            advert_interval: Duration::from_secs(10),
            router_share_interval: Duration::from_secs(300),
            models_dir: data_dir.join("models"),
            models: None,
            replicas: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: 1,
            idle_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            keep_finished: 100,
            max_running_tasks: 256,
            fault: None,
            data_dir,
        }
    }

    /// Builds the configuration from the command line (which carries the
    /// environment) and the config file it names, if any.
    pub fn load(args: &NodeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => Some(FileConfig::read(path)?),
            None => None,
        };
        let data_dir = match (&args.data_dir.path, file.as_ref().and_then(|f| f.data_dir.clone())) {
            (Some(flag), _) => flag.clone(),
            (None, Some(from_file)) => from_file,
            (None, None) => args.data_dir.resolve()?,
        };
        let mut c = Self::defaults(data_dir);
        if let Some(f) = file {
            f.apply(&mut c).with_context(|| {
                format!("in config file {}", args.config.as_ref().map_or(Path::new(""), |p| p).display())
            })?;
        }
        if !args.listen.is_empty() {
            c.listen = args.listen.clone();
        }
        if !args.bootstrap.is_empty() {
            c.bootstrap = args.bootstrap.clone();
        }
        if let Some(api) = args.api {
            c.api = api;
        }
        if let Some(token) = &args.api_token {
            c.api_token = Some(token.clone());
        }
        if let Some(rate) = args.api_rate_limit {
            c.api_rate_limit = rate;
        }
        if !(c.api_rate_limit.is_finite() && c.api_rate_limit >= 0.0) {
            bail!("api rate limit {} must be 0 (no limit) or more", c.api_rate_limit);
        }
        if args.no_mdns {
            c.mdns = false;
        }
        if args.relay_server {
            c.relay_server = true;
        }
        if !args.relay.is_empty() {
            c.relays = args.relay.clone();
        }
        if !args.external_address.is_empty() {
            c.external_addrs = args.external_address.clone();
        }
        if args.probe_private_addresses {
            c.probe_private_addrs = true;
        }
        if let Some(peers) = args.peers {
            c.peers = peers;
        }
        if let Some(scope) = args.adverts {
            c.adverts = scope;
        }
        if c.peers < mycel_net::PRUNE_FLOOR {
            bail!(
                "peers {}: a node needs at least {} connected peers for gossip to work",
                c.peers,
                mycel_net::PRUNE_FLOOR
            );
        }
        if let Some(bad) = c.relays.iter().find(|a| !matches!(a.iter().last(), Some(mycel_net::Protocol::P2p(_)))) {
            bail!("relay {bad} must end with /p2p/<peer id> (the relay's id, from its log or `mycel status`)");
        }
        if let Some(interval) = args.advert_interval {
            c.advert_interval = interval.0;
        }
        if let Some(interval) = args.router_share_interval {
            c.router_share_interval = interval.0;
        }
        if let Some(dir) = &args.models_dir {
            c.models_dir = dir.clone();
        }
        if !args.models.is_empty() {
            c.models = Some(args.models.clone());
        }
        if let Some(n) = args.replicas {
            c.replicas = n;
        }
        if let Some(n) = args.threads {
            c.threads = n;
        }
        if let Some(n) = args.idle_threads {
            c.idle_threads = n;
        }
        if let Some(n) = args.keep_finished {
            c.keep_finished = n;
        }
        if let Some(n) = args.max_running_tasks {
            c.max_running_tasks = n;
        }
        c.fault = args.fault;
        if c.models.as_ref().is_some_and(|m| m.iter().any(|id| id == "none")) {
            c.models = Some(Vec::new());
        }
        if c.replicas == 0 || c.threads == 0 || c.idle_threads == 0 {
            bail!("replicas, threads and idle-threads must be at least 1");
        }
        if c.max_running_tasks == 0 {
            bail!("max-running-tasks must be at least 1");
        }
        if c.keep_finished == 0 {
            bail!("keep-finished must be at least 1 (a task's result must outlive its completion)");
        }
        if c.advert_interval < Duration::from_millis(100) {
            bail!("advert interval {:?} is too short (at least 100ms)", c.advert_interval);
        }
        Ok(c)
    }
}

fn parse_addr(s: &str) -> Multiaddr {
    s.parse().unwrap_or_else(|_| unreachable!("valid literal {s}"))
}

/// The TOML file. Every field is optional; unknown fields are an error, so
/// a typo does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    api: Option<String>,
    api_token: Option<String>,
    api_rate_limit: Option<f64>,
    mdns: Option<bool>,
    relay_server: Option<bool>,
    relays: Option<Vec<String>>,
    external_addresses: Option<Vec<String>>,
    peers: Option<usize>,
    adverts: Option<String>,
    advert_interval: Option<String>,
    router_share_interval: Option<String>,
    models_dir: Option<PathBuf>,
    models: Option<Vec<String>>,
    replicas: Option<usize>,
    threads: Option<usize>,
    idle_threads: Option<usize>,
    keep_finished: Option<usize>,
    max_running_tasks: Option<usize>,
}

impl FileConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    fn apply(self, c: &mut NodeConfig) -> Result<()> {
        if let Some(listen) = self.listen {
            c.listen = listen.iter().map(|a| parse_multiaddr(a)).collect::<Result<_>>()?;
        }
        if let Some(bootstrap) = self.bootstrap {
            c.bootstrap = bootstrap.iter().map(|a| parse_multiaddr(a)).collect::<Result<_>>()?;
        }
        if let Some(api) = self.api {
            c.api = api.parse().with_context(|| format!("api = {api:?} is not HOST:PORT"))?;
        }
        if self.api_token.is_some() {
            c.api_token = self.api_token;
        }
        if let Some(rate) = self.api_rate_limit {
            c.api_rate_limit = rate;
        }
        if let Some(mdns) = self.mdns {
            c.mdns = mdns;
        }
        if let Some(on) = self.relay_server {
            c.relay_server = on;
        }
        if let Some(relays) = self.relays {
            c.relays = relays.iter().map(|a| parse_multiaddr(a)).collect::<Result<_>>()?;
        }
        if let Some(addrs) = self.external_addresses {
            c.external_addrs = addrs.iter().map(|a| parse_multiaddr(a)).collect::<Result<_>>()?;
        }
        if let Some(peers) = self.peers {
            c.peers = peers;
        }
        if let Some(scope) = self.adverts {
            c.adverts = scope.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(interval) = self.advert_interval {
            c.advert_interval = parse_duration(&interval)?;
        }
        if let Some(interval) = self.router_share_interval {
            c.router_share_interval = parse_duration(&interval)?;
        }
        if let Some(dir) = self.models_dir {
            c.models_dir = dir;
        }
        if self.models.is_some() {
            c.models = self.models;
        }
        if let Some(n) = self.replicas {
            c.replicas = n;
        }
        if let Some(n) = self.threads {
            c.threads = n;
        }
        if let Some(n) = self.idle_threads {
            c.idle_threads = n;
        }
        if let Some(n) = self.keep_finished {
            c.keep_finished = n;
        }
        if let Some(n) = self.max_running_tasks {
            c.max_running_tasks = n;
        }
        Ok(())
    }
}

/// Parses a multiaddr with an error that says what one looks like.
pub fn parse_multiaddr(s: &str) -> Result<Multiaddr> {
    s.parse().map_err(|e| anyhow::anyhow!("{s:?} is not a multiaddr ({e}); e.g. /ip4/127.0.0.1/tcp/4001"))
}

/// Parses `500ms`, `2s`, `1m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, ""), |i| s.split_at(i));
    let value: f64 = num.parse().map_err(|_| anyhow::anyhow!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use ms, s or m)"),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| anyhow::anyhow!("{s:?} is not a valid duration"))
}

/// A duration flag value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DurationArg(pub Duration);

impl std::str::FromStr for DurationArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_duration(s).map(DurationArg)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn node_args(args: &[&str]) -> NodeArgs {
        let cli = Cli::try_parse_from([&["mycel", "node"], args].concat()).unwrap();
        match cli.command {
            Command::Node(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn each_flag_reaches_its_field() {
        let c = NodeConfig::load(&node_args(&[
            "--data-dir",
            "/tmp/d",
            "--listen",
            "/ip4/127.0.0.1/tcp/5000",
            "--listen",
            "/ip4/127.0.0.1/udp/5000/quic-v1",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/6000",
            "--api",
            "127.0.0.1:9999",
            "--api-token",
            "tok",
            "--no-mdns",
            "--advert-interval",
            "250ms",
            "--models-dir",
            "/tmp/m",
            "--model",
            "a",
            "--model",
            "b",
            "--replicas",
            "3",
            "--threads",
            "2",
            "--idle-threads",
            "4",
            "--keep-finished",
            "7",
        ]))
        .unwrap();
        assert_eq!(c.keep_finished, 7);
        assert_eq!(c.models_dir, PathBuf::from("/tmp/m"));
        assert_eq!(c.models, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!((c.replicas, c.threads, c.idle_threads), (3, 2, 4));
        assert_eq!(c.pool().idle_threads, 4);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(
            c.listen,
            vec![parse_addr("/ip4/127.0.0.1/tcp/5000"), parse_addr("/ip4/127.0.0.1/udp/5000/quic-v1")]
        );
        assert_eq!(c.bootstrap, vec![parse_addr("/ip4/127.0.0.1/tcp/6000")]);
        assert_eq!(c.api, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.api_token.as_deref(), Some("tok"));
        assert!(!c.mdns);
        assert_eq!(c.advert_interval, Duration::from_millis(250));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mycel.toml");
        std::fs::write(
            &file,
            "data_dir = \"/tmp/from-file\"\nlisten = [\"/ip4/127.0.0.1/tcp/7001\"]\napi = \"127.0.0.1:8001\"\nmdns = false\nadvert_interval = \"3s\"\nmodels = [\"all-minilm-l6-v2\"]\nreplicas = 2\nidle_threads = 1\nkeep_finished = 5\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = NodeConfig::load(&node_args(&["--config", path])).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/from-file"));
        assert_eq!(c.listen, vec![parse_addr("/ip4/127.0.0.1/tcp/7001")]);
        assert_eq!(c.api, "127.0.0.1:8001".parse().unwrap());
        assert!(!c.mdns);
        assert_eq!(c.advert_interval, Duration::from_secs(3));
        assert_eq!(c.models, Some(vec!["all-minilm-l6-v2".to_string()]));
        assert_eq!(c.models_dir, PathBuf::from("/tmp/from-file/models"));
        assert_eq!((c.replicas, c.idle_threads), (2, 1));
        assert_eq!(c.keep_finished, 5);

        let c = NodeConfig::load(&node_args(&["--config", path, "--api", "127.0.0.1:8002", "--data-dir", "/tmp/flag"]))
            .unwrap();
        assert_eq!(c.api, "127.0.0.1:8002".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/tmp/flag"));
    }

    #[test]
    fn bad_input_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "lisen = []\n").unwrap();
        let err = NodeConfig::load(&node_args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field `lisen`"), "{err:#}");

        let err = Cli::try_parse_from(["mycel", "node", "--listen", "not-an-addr"]).unwrap_err();
        assert!(err.to_string().contains("is not a multiaddr"), "{err}");
        assert!(Cli::try_parse_from(["mycel", "node", "--advert-interval", "5 parsecs"]).is_err());
        let err = NodeConfig::load(&node_args(&["--advert-interval", "10ms"])).unwrap_err();
        assert!(err.to_string().contains("too short"));
        let err = NodeConfig::load(&node_args(&["--keep-finished", "0"])).unwrap_err();
        assert!(err.to_string().contains("keep-finished"), "{err}");
        let err = NodeConfig::load(&node_args(&["--peers", "2"])).unwrap_err();
        assert!(err.to_string().contains("at least 5 connected peers"), "{err}");
    }

    #[test]
    fn the_peer_target_comes_from_the_flag_or_the_file() {
        assert_eq!(NodeConfig::load(&node_args(&[])).unwrap().peers, DEFAULT_PEERS);
        assert_eq!(NodeConfig::load(&node_args(&["--peers", "12"])).unwrap().peers, 12);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "peers = 20\n").unwrap();
        assert_eq!(NodeConfig::load(&node_args(&["--config", file.to_str().unwrap()])).unwrap().peers, 20);
    }

    #[test]
    fn the_advert_scope_comes_from_the_flag_or_the_file() {
        use mycel_net::AdvertScope;
        assert_eq!(NodeConfig::load(&node_args(&[])).unwrap().adverts, AdvertScope::Used);
        assert_eq!(NodeConfig::load(&node_args(&["--adverts", "all"])).unwrap().adverts, AdvertScope::All);
        assert!(Cli::try_parse_from(["mycel", "node", "--adverts", "some"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mycel.toml");
        std::fs::write(&file, "adverts = \"all\"\n").unwrap();
        assert_eq!(
            NodeConfig::load(&node_args(&["--config", file.to_str().unwrap()])).unwrap().adverts,
            AdvertScope::All
        );
        std::fs::write(&file, "adverts = \"most\"\n").unwrap();
        let err = NodeConfig::load(&node_args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("expected all or used"), "{err:#}");
    }

    #[test]
    fn relay_settings_come_from_flags_and_the_file() {
        let relay = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWA1pqFXdNW3qgHXX8k2fFDnRKHVgNfw4gTjdsvNoLR9VX";
        let c = NodeConfig::load(&node_args(&[
            "--relay-server",
            "--relay",
            relay,
            "--external-address",
            "/ip4/203.0.113.8/tcp/4001",
        ]))
        .unwrap();
        assert!(c.relay_server);
        assert_eq!(c.relays, vec![parse_addr(relay)]);
        assert_eq!(c.external_addrs, vec![parse_addr("/ip4/203.0.113.8/tcp/4001")]);
        assert!(!c.probe_private_addrs, "AutoNAT probes global addresses only unless asked");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, format!("relay_server = true\nrelays = [\"{relay}\"]\n")).unwrap();
        let c = NodeConfig::load(&node_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert!(c.relay_server);
        assert_eq!(c.relays, vec![parse_addr(relay)]);

        // A relay without its PeerId cannot be used: one clear error.
        let err = NodeConfig::load(&node_args(&["--relay", "/ip4/203.0.113.7/tcp/4001"])).unwrap_err();
        assert!(err.to_string().contains("/p2p/<peer id>"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("").is_err());
    }
}
