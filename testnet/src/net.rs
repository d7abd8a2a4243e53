//! `mycel testnet`: a swarm of real `mycel node` processes on 127.0.0.1.
//!
//! Each node gets its own data directory under the testnet directory, free
//! ports (it binds port 0 and reports the real ones in its `node.json`),
//! mDNS off, and the first node as bootstrap. The processes run in their
//! own process group, so they outlive the `up` command and a Ctrl-C in its
//! terminal; `down` stops exactly the pids recorded in `testnet.json`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mycel_api::types::{PeerView, RuntimeInfo, StatusView};
use serde::{Deserialize, Serialize};

/// The manifest of a running testnet, `DIR/testnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// One entry per node, in start order; the first is the bootstrap.
    pub nodes: Vec<NodeEntry>,
    /// The network namespaces the nodes run in, if `up --netns` made them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<crate::netns::Netns>,
}

/// One node of a testnet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    /// `node-00`, `node-01`, ...
    pub name: String,
    /// Its PeerId.
    pub peer_id: String,
    /// Its API base URL.
    pub api: String,
    /// Its process id.
    pub pid: u32,
    /// Its peer-to-peer listen addresses.
    pub listen_addrs: Vec<String>,
    /// Its data directory (log in `node.log` there).
    pub data_dir: PathBuf,
    /// The bearer token its API wants, if any (nodes in network namespaces
    /// listen beyond loopback, so they need one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
}

impl NodeEntry {
    /// A GET of `path` on this node's API, with its token if it has one.
    pub fn get(&self, agent: &ureq::Agent, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let request = agent.get(format!("{}{path}", self.api));
        match &self.api_token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }
}

/// The user's node settings, which testnet nodes never read.
pub(crate) const NODE_ENV: [&str; 10] = [
    "MYCEL_ADVERTS",
    "MYCEL_API_TOKEN",
    "MYCEL_CONFIG",
    "MYCEL_BOOTSTRAP",
    "MYCEL_LISTEN",
    "MYCEL_API",
    "MYCEL_DATA_DIR",
    "MYCEL_MODELS_DIR",
    "MYCEL_MODELS",
    "MYCEL_REPLICAS",
];

/// File name of the manifest in the testnet directory.
pub const MANIFEST: &str = "testnet.json";

/// Options of `testnet up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `mycel` binary to run.
    pub bin: PathBuf,
    /// Number of nodes.
    pub nodes: u32,
    /// Testnet directory.
    pub dir: PathBuf,
    /// Advert interval of every node.
    pub advert_interval: Duration,
    /// Longest wait for convergence.
    pub timeout: Duration,
    /// Extra arguments per node, used round-robin: node `i` gets
    /// `node_args[i % len]` (e.g. which models it loads). Empty: none.
    pub node_args: Vec<Vec<String>>,
    /// Run each node in a network namespace of its own (needs root).
    pub netns: bool,
    /// Put every node but node 0 behind a NAT router of these kinds, in
    /// turn (implies `netns`); node 0 relays for them. Empty: no NAT.
    pub nat: Vec<crate::netns::NatKind>,
    /// Every node listens only to the adverts of the models it uses
    /// (`mycel node --adverts used`): tables never hold the whole testnet,
    /// so it is up once every node is connected, not converged.
    pub adverts_used: bool,
}

/// What `up` measured.
#[derive(Debug, Clone)]
pub struct UpReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// From the last node's start until every node held every other
    /// node's advert, by the nodes' own clocks (when the last advert
    /// arrived), so what it takes to poll 50 busy nodes is not counted.
    pub converged_after_last_start: Duration,
    /// From the last node's start until polling confirmed convergence.
    pub confirmed_after_last_start: Duration,
    /// From the first node's start until convergence.
    pub total: Duration,
}

impl Manifest {
    /// Reads `DIR/testnet.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no testnet in {} (reading {})", dir.display(), path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, dir.join(MANIFEST)).with_context(|| format!("writing {}", dir.join(MANIFEST).display()))
    }
}

/// A started node process, until it reports its runtime file.
pub(crate) struct Starting {
    name: String,
    data_dir: PathBuf,
    child: Child,
    token: Option<String>,
}

impl Starting {
    fn spawn(
        opts: &UpOptions,
        netns: Option<&crate::netns::Netns>,
        index: u32,
        bootstrap: Option<&str>,
    ) -> Result<Self> {
        let name = format!("node-{index:02}");
        let data_dir = opts.dir.join(&name);
        fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        // A stale runtime file would be mistaken for this start's.
        let _ = fs::remove_file(data_dir.join(mycel_api::types::RUNTIME_FILE));
        let log = fs::File::create(data_dir.join("node.log")).context("creating the node log")?;
        let (mut cmd, addr) = match netns {
            Some(n) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &n.namespace(index)]).arg(&opts.bin);
                (cmd, n.addr(index))
            }
            None => (Command::new(&opts.bin), "127.0.0.1".to_string()),
        };
        let token = netns.map(|n| n.api_token.clone());
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("/ip4/{addr}/tcp/0"), "--api", &format!("{addr}:0"), "--no-mdns"])
            .arg("--advert-interval")
            .arg(format!("{}ms", opts.advert_interval.as_millis()))
            .args(opts.node_args.get(index as usize % opts.node_args.len().max(1)).into_iter().flatten());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        // Said either way: a node's own default is `used`.
        cmd.args(["--adverts", if opts.adverts_used { "used" } else { "all" }]);
        if netns.is_some_and(|n| !n.nat.is_empty()) {
            // Behind NAT: QUIC too (hole punching over UDP), and reachability
            // probed on these private test addresses. Node 0 relays.
            cmd.args(["--listen", &format!("/ip4/{addr}/udp/0/quic-v1"), "--probe-private-addresses"]);
            if index == 0 {
                cmd.arg("--relay-server");
            }
        }
        Self::launch(name, data_dir, cmd, token, log)
    }

    /// Starts `cmd` (a `mycel node` command line) as a testnet node: none
    /// of the user's node settings, the testnet's API token if it has one,
    /// output to `log`, in a process group of its own (so a Ctrl-C meant
    /// for the caller does not stop it).
    pub(crate) fn launch(
        name: String,
        data_dir: PathBuf,
        mut cmd: Command,
        token: Option<String>,
        log: fs::File,
    ) -> Result<Self> {
        for var in NODE_ENV {
            cmd.env_remove(var);
        }
        if let Some(token) = &token {
            cmd.env("MYCEL_API_TOKEN", token);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self { name, data_dir, child, token })
    }

    /// Waits for the node's runtime file; fails with the end of its log if
    /// the process exits first.
    pub(crate) fn wait_ready(&mut self, deadline: Instant) -> Result<NodeEntry> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) during start:\n{}", self.name, log_tail(&self.data_dir, 10));
            }
            if let Ok(info) = RuntimeInfo::read(&self.data_dir)
                && info.pid == self.child.id()
                && !info.listen_addrs.is_empty()
            {
                return Ok(NodeEntry {
                    name: self.name.clone(),
                    peer_id: info.peer_id,
                    api: info.api,
                    pid: info.pid,
                    listen_addrs: info.listen_addrs,
                    data_dir: self.data_dir.clone(),
                    api_token: self.token.clone(),
                });
            }
            if Instant::now() > deadline {
                bail!("{} did not start in time:\n{}", self.name, log_tail(&self.data_dir, 10));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn log_tail(data_dir: &Path, lines: usize) -> String {
    let text = fs::read_to_string(data_dir.join("node.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// Starts the testnet and waits until every node holds every other node's
/// advert (with [`UpOptions::adverts_used`], until every node is connected
/// to another). On failure, the nodes already started are stopped again.
pub fn up(opts: &UpOptions) -> Result<UpReport> {
    if let Ok(existing) = Manifest::read(&opts.dir)
        && existing.nodes.iter().any(is_our_node)
    {
        bail!(
            "a testnet is already running in {}: stop it with `mycel testnet down --dir {}`",
            opts.dir.display(),
            opts.dir.display()
        );
    }
    fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut starting: Vec<Starting> = Vec::new();
    let netns = if opts.netns || !opts.nat.is_empty() {
        Some(crate::netns::Netns::create(opts.nodes, opts.nat.clone())?)
    } else {
        None
    };
    let result = (|| {
        starting.push(Starting::spawn(opts, netns.as_ref(), 0, None)?);
        let first = starting[0].wait_ready(deadline)?;
        let bootstrap = first
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .cloned()
            .context("the first node reports no TCP address")?;
        for i in 1..opts.nodes {
            starting.push(Starting::spawn(opts, netns.as_ref(), i, Some(&bootstrap))?);
        }
        let last_start = Instant::now();
        let last_start_ms = unix_ms();
        let mut nodes = vec![first];
        for s in starting.iter_mut().skip(1) {
            nodes.push(s.wait_ready(deadline)?);
        }
        let manifest = Manifest { nodes, netns: netns.clone() };
        manifest.write(&opts.dir)?;
        let converged_ms =
            if opts.adverts_used { wait_connected(&manifest, deadline)? } else { wait_converged(&manifest, deadline)? };
        let confirmed = last_start.elapsed();
        let converged = Duration::from_millis(converged_ms.saturating_sub(last_start_ms)).min(confirmed);
        Ok(UpReport {
            manifest,
            converged_after_last_start: converged,
            confirmed_after_last_start: confirmed,
            total: started.elapsed(),
        })
    })();
    if result.is_err() {
        for s in &mut starting {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let _ = fs::remove_file(opts.dir.join(MANIFEST));
        if let Some(n) = &netns {
            n.destroy();
        }
    }
    result
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into()
}

/// The PeerIds in a node's capability table.
pub fn known_peers(agent: &ureq::Agent, node: &NodeEntry) -> Result<BTreeSet<String>> {
    let peers: Vec<PeerView> = get_json(agent, node, "peers")?;
    Ok(peers.into_iter().map(|p| p.peer_id).collect())
}

/// `GET /api/v1/{what}` on `node`, decoded.
fn get_json<T: serde::de::DeserializeOwned>(agent: &ureq::Agent, node: &NodeEntry, what: &str) -> Result<T> {
    node.get(agent, &format!("/api/v1/{what}"))
        .call()
        .with_context(|| format!("asking {} for its {what}", node.name))?
        .body_mut()
        .read_json()
        .with_context(|| format!("decoding {}'s {what}", node.name))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How many peers a node's capability table holds, and when the last one
/// joined it (ms since the Unix epoch).
pub fn peer_count(agent: &ureq::Agent, node: &NodeEntry) -> Result<(usize, Option<u64>)> {
    let status: StatusView = get_json(agent, node, "status")?;
    Ok((status.known_peers, status.table_grew_at_ms))
}

/// Polls every node until each holds all the others, or fails at
/// `deadline` naming who misses whom. Polls the cheap peer count while
/// waiting (the poll competes with the swarm for CPU), then checks the
/// actual peer ids once. Returns when, by the nodes' clocks, the last of
/// them completed its table (ms since the Unix epoch).
pub fn wait_converged(manifest: &Manifest, deadline: Instant) -> Result<u64> {
    let agent = agent();
    let all: BTreeSet<String> = manifest.nodes.iter().map(|n| n.peer_id.clone()).collect();
    let want = all.len() - 1;
    let mut pending: Vec<&NodeEntry> = manifest.nodes.iter().collect();
    let mut completed_ms = 0;
    loop {
        let counts = on_each(&pending, |n| peer_count(&agent, n));
        let mut still = Vec::new();
        for (n, count) in pending.iter().zip(counts) {
            match count {
                Ok((count, grew_at)) if count >= want => completed_ms = completed_ms.max(grew_at.unwrap_or(0)),
                _ => still.push(*n),
            }
        }
        pending = still;
        if pending.is_empty() {
            let everyone: Vec<&NodeEntry> = manifest.nodes.iter().collect();
            let mut wrong = Vec::new();
            for (n, known) in everyone.iter().zip(on_each(&everyone, |n| known_peers(&agent, n))) {
                let expected: BTreeSet<String> = all.iter().filter(|p| **p != n.peer_id).cloned().collect();
                if known? != expected {
                    wrong.push(n.name.as_str());
                }
            }
            if wrong.is_empty() {
                return Ok(completed_ms);
            }
            bail!("nodes {wrong:?} hold peers that are not part of the testnet");
        }
        if Instant::now() > deadline {
            let report: Vec<String> = pending
                .iter()
                .map(|n| {
                    let have = peer_count(&agent, n).map_or("?".to_string(), |(c, _)| c.to_string());
                    format!("{} holds {have} of {want} peers", n.name)
                })
                .collect();
            bail!("the testnet did not converge in time: {}", report.join("; "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls every node until each is connected to another (or alone in the
/// testnet), or fails at `deadline` naming who is not. Returns when that
/// was seen (ms since the Unix epoch).
pub fn wait_connected(manifest: &Manifest, deadline: Instant) -> Result<u64> {
    let agent = agent();
    let want = usize::from(manifest.nodes.len() > 1);
    let nodes: Vec<&NodeEntry> = manifest.nodes.iter().collect();
    loop {
        let statuses = on_each(&nodes, |n| get_json::<StatusView>(&agent, n, "status"));
        let alone: Vec<&str> = nodes
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| !s.as_ref().is_ok_and(|s| s.connected_peers >= want))
            .map(|(n, _)| n.name.as_str())
            .collect();
        if alone.is_empty() {
            return Ok(unix_ms());
        }
        if Instant::now() > deadline {
            bail!("the testnet did not connect in time: {} connected to no other node", alone.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls every node until it serves the models `expected[i]` (by id) and
/// every other node's table shows them in its advert, so a task sent to
/// any node finds them (with `adverts_used`, nodes hold no one's advert
/// until they use a model: then only until each serves its own, and a
/// task finds them through the DHT); or until `deadline`. Returns what is
/// still missing then, one line per node ("node-01 is still loading
/// ..."); empty when everything is served.
pub fn wait_models(
    manifest: &Manifest,
    expected: &[BTreeSet<String>],
    adverts_used: bool,
    deadline: Instant,
) -> Vec<String> {
    let agent = agent();
    let nodes: Vec<&NodeEntry> = manifest.nodes.iter().collect();
    let none = BTreeSet::new();
    let want = |i: usize| expected.get(i).unwrap_or(&none);
    loop {
        let views = on_each(&nodes, |n| served_models(&agent, n));
        let mut missing = Vec::new();
        for (i, (node, view)) in nodes.iter().zip(&views).enumerate() {
            let Ok((own, _)) = view else {
                missing.push(format!("{} does not answer", node.name));
                continue;
            };
            let loading: Vec<&String> = want(i).iter().filter(|m| !own.contains(*m)).collect();
            if !loading.is_empty() {
                missing.push(format!("{} is still loading {}", node.name, join(&loading)));
                continue;
            }
            if adverts_used {
                continue;
            }
            // Whether the others have this node's advert with its models.
            let unseen: Vec<&str> = nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter(|(j, _)| {
                    views[*j]
                        .as_ref()
                        .is_ok_and(|(_, seen)| !seen.get(&node.peer_id).is_some_and(|m| m.is_superset(want(i))))
                })
                .map(|(_, n)| n.name.as_str())
                .collect();
            if !unseen.is_empty() {
                missing.push(format!("{}'s models have not reached {} yet", node.name, unseen.join(", ")));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn join(ids: &[&String]) -> String {
    ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// The model ids a node serves, and those each peer in its table serves.
type Served = (BTreeSet<String>, std::collections::BTreeMap<String, BTreeSet<String>>);

fn served_models(agent: &ureq::Agent, node: &NodeEntry) -> Result<Served> {
    let status: StatusView = get_json(agent, node, "status")?;
    let peers: Vec<PeerView> = get_json(agent, node, "peers")?;
    let ids = |models: Vec<mycel_api::types::ModelView>| models.into_iter().map(|m| m.id).collect();
    Ok((ids(status.models), peers.into_iter().map(|p| (p.peer_id, ids(p.models))).collect()))
}

/// `f` for every node at once, results in the nodes' order: polling 50
/// busy nodes one after another takes seconds.
fn on_each<T: Send>(nodes: &[&NodeEntry], f: impl Fn(&NodeEntry) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = nodes.iter().map(|n| s.spawn(move || f(n))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// True when `pid` runs a mycel node for this entry's data directory, so
/// `down` never signals a recycled pid that now belongs to someone else.
pub fn is_our_node(node: &NodeEntry) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", node.pid)) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = node.data_dir.as_os_str().as_encoded_bytes();
    args.contains(&b"node".as_slice()) && args.contains(&dir)
}

/// Stops every node of the testnet in `dir` (SIGTERM, then SIGKILL after
/// `grace`), then removes the manifest and the nodes' directories.
/// Returns how many processes were stopped.
pub fn down(dir: &Path, grace: Duration) -> Result<usize> {
    let manifest = Manifest::read(dir)?;
    let ours: Vec<&NodeEntry> = manifest.nodes.iter().filter(|n| is_our_node(n)).collect();
    for n in &ours {
        crate::signal(n.pid as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ours.iter().any(|n| is_our_node(n)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in ours.iter().filter(|n| is_our_node(n)) {
        crate::signal(n.pid as libc::pid_t, libc::SIGKILL);
    }
    for n in &manifest.nodes {
        // Only directories this testnet created (node-NN under dir).
        if n.data_dir.parent() == Some(dir) && n.name.starts_with("node-") {
            let _ = fs::remove_dir_all(&n.data_dir);
        }
    }
    if let Some(n) = &manifest.netns {
        n.destroy();
    }
    fs::remove_file(dir.join(MANIFEST)).with_context(|| format!("removing {}", dir.join(MANIFEST).display()))?;
    let _ = fs::remove_dir(dir); // only if now empty
    Ok(ours.len())
}
