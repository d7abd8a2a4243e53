//! Convergence of an in-process swarm: N nodes on one tokio runtime, real
//! TCP on 127.0.0.1, each bootstrapping from the first. Measures the time
//! from the last node's start until every node holds every other node's
//! advert (when the last advert arrived, by the nodes' clock), and the whole
//! run from the first start until the poll saw it. Then, once connections
//! had time to be pruned (the pruner's grace and two advert intervals), what
//! a node costs as the swarm grows: connections per node, adverts and mycel
//! bytes each node receives per minute of idling, the process's memory per node, and
//! how long a requester joining the settled swarm takes to know three
//! workers for a model one node in ten serves.
//!
//!     cargo bench -p mycel-net --bench convergence -- [NODES...]
//!
//! `MYCEL_BENCH_WORKERS=K` caps the nodes serving the bench model at K (the
//! swarm grows around a fixed set of workers).
//!
//! `MYCEL_BENCH_PROCESSES=P` (with `used` adverts, below) spreads the nodes
//! over P processes: this one and P-1 shards (this binary with `--shard`),
//! each node still joining through the first. One process's open-file
//! limit (20,000 here, two descriptors per connection between two of its
//! nodes) otherwise caps the swarm at a few hundred.
//!
//! With `MYCEL_BENCH_ADVERTS=used` every node listens only to the adverts of
//! the models it uses ([`mycel_net::AdvertScope::Used`]): tables never hold
//! the whole swarm, so "converged" is when every node has a connection; one
//! node in ten uses the bench model (asks for its workers once, at start),
//! and the joining requester finds workers with `Handle::find_workers`
//! (through the DHT). Idle traffic is then reported for all nodes and for
//! those users.
//!
//! Memory is reported three ways, each divided by the nodes: the process's
//! RSS as the allocator keeps it, its RSS after `malloc_trim` (free pages
//! handed back), and the bytes the nodes' live allocations hold (a counting
//! allocator, less what was live before the first node started): the last
//! is what the nodes' state costs, free of the allocator's fragmentation.
//! And one more node, the probe, runs in a process of its own (this binary
//! with `--probe`): it joins once the swarm has, uses the bench model, and
//! reports its own RSS and live heap after the idle minute, which is what
//! one node costs as the swarm around it grows.
//!
//! (default: 50 100 200). Not a criterion bench: one convergence is a
//! single long measurement, reported as-is with the run's parameters.

// A benchmark binary: failing loudly on setup errors is what we want.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use std::sync::Arc;

use mycel_metrics::Metrics;
use mycel_net::{Config, Handle};
use mycel_protocol::{Advert, Digest, Hardware, Keypair, Load, ModelAdvert, ModelKind, Price, Quantization, version};
use tokio_util::sync::CancellationToken;

/// The system allocator, counting the bytes live at any moment.
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call goes straight to the system allocator with the same
// arguments; the counter only adds and subtracts the sizes asked for.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

/// One node in [`SERVER_EVERY`] serves the bench model (and, with
/// `used`, one in ten uses it), unless `MYCEL_BENCH_WORKERS` caps the
/// servers: then the swarm grows around a fixed set of workers.
const SERVER_EVERY: usize = 10;

/// `MYCEL_BENCH_WORKERS`: at most this many nodes serve the bench model.
fn workers_cap() -> usize {
    std::env::var("MYCEL_BENCH_WORKERS").ok().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX)
}

/// Whether node `i` serves the bench model.
fn serves_model(i: usize) -> bool {
    i % SERVER_EVERY == 1 && i / SERVER_EVERY < workers_cap()
}
/// Workers a joining requester must know before it counts as found.
const WORKERS_WANTED: usize = 3;
/// How long the settled swarm idles while its traffic is counted.
const IDLE: Duration = Duration::from_secs(60);

fn bench_model() -> ModelAdvert {
    ModelAdvert {
        id: "bench-model".into(),
        kind: ModelKind::Embedding,
        weights: Digest::of(b"bench-model"),
        dimensions: 384,
        context: 256,
        quantization: Quantization::F32,
        throughput: Default::default(),
        profile: Default::default(),
        tools: false,
    }
}

fn advert(i: usize) -> Advert {
    Advert {
        seq: 0,
        timestamp_ms: 0,
        software: version::SOFTWARE_VERSION.into(),
        models: if serves_model(i) { vec![bench_model()] } else { vec![] },
        hardware: Hardware { cpu_model: format!("bench-{i}"), cores: 2, ..Hardware::default() },
        load: Load::default(),
        price: Price::default(),
        listen_addrs: vec![],
    }
}

/// How long a swarm may take before the run reports it as not converged.
const GIVE_UP: Duration = Duration::from_secs(300);

/// `MYCEL_BENCH_ADVERT_INTERVAL_S`, 10 s unless set (a node's default).
fn advert_interval() -> Duration {
    let secs = std::env::var("MYCEL_BENCH_ADVERT_INTERVAL_S").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    Duration::from_secs(secs)
}

/// `MYCEL_BENCH_IDLE_TIMEOUT_S`: how long an unused connection stays open;
/// a node's default unless set.
fn idle_timeout() -> Duration {
    std::env::var("MYCEL_BENCH_IDLE_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Config::default().idle_timeout, Duration::from_secs)
}

/// `MYCEL_BENCH_PEERS` and `MYCEL_BENCH_PRUNE_GRACE_S`: the peer target
/// and the grace period of the connection pruner; a node's defaults unless
/// set.
fn peer_target() -> (usize, Duration) {
    let default = Config::default();
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    (
        var("MYCEL_BENCH_PEERS").map_or(default.peer_target, |n| n as usize),
        var("MYCEL_BENCH_PRUNE_GRACE_S").map_or(default.prune_grace, Duration::from_secs),
    )
}

/// What one swarm size measured.
struct Figures {
    /// After the last start until converged, and the whole run until the
    /// poll confirmed it; or the smallest table if it never converged.
    converged: Result<(Duration, Duration), usize>,
    /// Connections per node, average and most.
    connections: (f64, usize),
    /// Adverts and mycel bytes one node receives per idle minute (average).
    idle_per_minute: (f64, f64),
    /// Adverts a node using the bench model receives per idle minute
    /// (average over them; with `MYCEL_BENCH_ADVERTS=used` only).
    users_per_minute: Option<f64>,
    /// The process's resident memory divided by the nodes (MiB), as the
    /// allocator keeps it (freed memory of the joining storm included),
    /// and after it handed free memory back (what the nodes hold).
    rss_per_node_mib: (f64, f64),
    /// The nodes' live allocations divided by the nodes (MiB).
    live_per_node_mib: f64,
    /// The node in a process of its own; `None` if it failed.
    probe: Option<Probe>,
    /// A joining requester's time until it knows [`WORKERS_WANTED`]
    /// workers; `None` if not within [`GIVE_UP`].
    find_workers: Option<Duration>,
    /// What kept the connections open when they were counted, and how
    /// many the pruners had closed by then (see [`Tally::kept_line`]).
    kept: String,
}

/// What the nodes of one process hold and have received, summed, so that
/// the shares of several processes add up (see `--shard`).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    nodes: u64,
    /// Adverts (valid or not) and mycel bytes received, so far.
    adverts: u64,
    bytes: u64,
    /// The same adverts, by the nodes using the bench model only, and how
    /// many such nodes.
    user_adverts: u64,
    users: u64,
    /// Connections, summed over the nodes, and the most one node has.
    connections: u64,
    max_connections: u64,
    /// Connections by what keeps them open (`mycel_connections`, at each
    /// node's last pruning tick), summed, in [`KEPT`]'s order; and the
    /// connections the nodes' pruners closed so far.
    kept: [f64; 6],
    pruned: u64,
    /// The process's live heap since before its first node (MiB), and its
    /// RSS after handing free memory back.
    live_mib: f64,
    rss_mib: f64,
}

/// The reasons of `mycel_connections`.
const KEPT: [&str; 6] = ["mesh", "users", "other", "young", "used", "idle"];

impl Tally {
    /// Counts `nodes` (with their indices in the swarm and metrics).
    async fn of(nodes: &[(usize, Handle, Arc<Metrics>)], live_before: f64) -> Tally {
        let mut t = Tally { nodes: nodes.len() as u64, ..Tally::default() };
        for (i, h, m) in nodes {
            let adverts = m.adverts_received.get() + m.adverts_rejected.get();
            t.adverts += adverts;
            t.bytes += m.bytes_in.get();
            if uses_model(*i) {
                t.user_adverts += adverts;
                t.users += 1;
            }
            let c = h.connected().await.expect("connected").len() as u64;
            t.connections += c;
            t.max_connections = t.max_connections.max(c);
            for (k, reason) in t.kept.iter_mut().zip(KEPT) {
                *k += m.connections.with(reason).get();
            }
            t.pruned += m.connections_pruned.get();
        }
        t.live_mib = live_mib() - live_before;
        t
    }

    fn add(&mut self, o: &Tally) {
        self.nodes += o.nodes;
        self.adverts += o.adverts;
        self.bytes += o.bytes;
        self.user_adverts += o.user_adverts;
        self.users += o.users;
        self.connections += o.connections;
        self.max_connections = self.max_connections.max(o.max_connections);
        for (a, b) in self.kept.iter_mut().zip(o.kept) {
            *a += b;
        }
        self.pruned += o.pruned;
        self.live_mib += o.live_mib;
        self.rss_mib += o.rss_mib;
    }

    /// One line, as a shard prints it for the main process.
    fn to_line(self) -> String {
        let kept: Vec<String> = self.kept.iter().map(|k| k.to_string()).collect();
        format!(
            "tally {} {} {} {} {} {} {} {} {} {} {}",
            self.nodes,
            self.adverts,
            self.bytes,
            self.user_adverts,
            self.users,
            self.connections,
            self.max_connections,
            self.pruned,
            self.live_mib,
            self.rss_mib,
            kept.join(" ")
        )
    }

    fn parse(line: &str) -> Option<Tally> {
        let mut v = line.strip_prefix("tally ")?.split_whitespace();
        let mut t = Tally {
            nodes: v.next()?.parse().ok()?,
            adverts: v.next()?.parse().ok()?,
            bytes: v.next()?.parse().ok()?,
            user_adverts: v.next()?.parse().ok()?,
            users: v.next()?.parse().ok()?,
            connections: v.next()?.parse().ok()?,
            max_connections: v.next()?.parse().ok()?,
            pruned: v.next()?.parse().ok()?,
            live_mib: v.next()?.parse().ok()?,
            rss_mib: v.next()?.parse().ok()?,
            kept: [0.0; 6],
        };
        for k in &mut t.kept {
            *k = v.next()?.parse().ok()?;
        }
        Some(t)
    }

    /// Connections per node by what keeps them open, and the connections
    /// the nodes' pruners closed so far.
    fn kept_line(&self) -> String {
        let n = self.nodes.max(1) as f64;
        let mut line = String::from("kept per node:");
        for (reason, k) in KEPT.iter().zip(self.kept) {
            line.push_str(&format!(" {reason} {:.1}", k / n));
        }
        line.push_str(&format!("; pruned {} in all", self.pruned));
        line
    }
}

/// `MYCEL_BENCH_PROCESSES=P`: the nodes are spread over P processes (this
/// one and P-1 shards), so that a swarm larger than one process's
/// open-file limit allows can run (`used` adverts only).
fn processes() -> usize {
    std::env::var("MYCEL_BENCH_PROCESSES").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// A shard: nodes in a process of its own, told what to do on stdin.
struct Shard {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Shard {
    /// Starts nodes `first..first + count` joining through `boot`.
    fn spawn(boot: &mycel_net::Multiaddr, first: usize, count: usize) -> Shard {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().expect("this binary"))
            .args(["--shard", &boot.to_string(), &first.to_string(), &count.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("a shard starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        Shard { child, stdin, stdout }
    }

    /// The shard's next line (blocking this worker thread only).
    fn read(&mut self) -> String {
        tokio::task::block_in_place(|| self.stdout.next().and_then(Result::ok)).expect("the shard answers")
    }

    /// Asks for its tally.
    fn tally(&mut self) -> Tally {
        use std::io::Write;
        writeln!(self.stdin, "count").expect("the shard listens");
        Tally::parse(&self.read()).expect("a tally")
    }
}

/// `--shard BOOT FIRST COUNT`: nodes `FIRST..FIRST+COUNT` of a swarm whose
/// first node is at BOOT, in a process of their own. Prints `joined` once
/// each has a connection, then (its users having asked for the bench
/// model's workers) `ready`; then a tally for each `count` on stdin, until
/// stdin closes.
fn shard(boot: &str, first: &str, count: &str) {
    let boot: mycel_net::Multiaddr = boot.parse().expect("a bootstrap address");
    let first: usize = first.parse().expect("first index");
    let count: usize = count.parse().expect("count");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let live_before = live_mib();
        let stop = CancellationToken::new();
        let mut nodes = Vec::with_capacity(count);
        for i in first..first + count {
            let key = Keypair::generate().expect("key");
            let metrics = Arc::new(Metrics::new());
            let (handle, _events, event_loop) =
                mycel_net::start(&key, node_config(vec![boot.clone()]).with_metrics(metrics.clone())).expect("start");
            tokio::spawn(event_loop.run(stop.clone()));
            handle.set_advert(advert(i)).await.expect("advert");
            nodes.push((i, handle, metrics));
        }
        'joining: loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for (_, h, _) in &nodes {
                if h.connected().await.expect("connected").is_empty() {
                    continue 'joining;
                }
            }
            break;
        }
        println!("joined");
        let key = mycel_net::ModelKey::Weights(bench_model().weights);
        for (_, h, _) in nodes.iter().filter(|(i, _, _)| uses_model(*i)) {
            let _ = h.find_workers(key.clone(), 1).await;
        }
        println!("ready");
        let mut lines = std::io::stdin().lines();
        while let Some(Ok(_)) = tokio::task::block_in_place(|| lines.next()) {
            let mut t = Tally::of(&nodes, live_before).await;
            trim_allocator();
            t.rss_mib = rss_mib();
            println!("{}", t.to_line());
        }
        stop.cancel();
    });
}

/// `MYCEL_BENCH_ADVERTS`: `all` (a node's default) or `used`.
fn advert_scope() -> mycel_net::AdvertScope {
    std::env::var("MYCEL_BENCH_ADVERTS").ok().map_or(mycel_net::AdvertScope::All, |s| s.parse().expect("all or used"))
}

/// With [`advert_scope`] `used`: node `i` asks for the bench model's workers.
fn uses_model(i: usize) -> bool {
    advert_scope() == mycel_net::AdvertScope::Used && i % SERVER_EVERY == 2
}

/// Hands the allocator's free memory back to the system, so RSS shows what
/// is in use rather than the joining storm's high-water mark.
#[allow(unsafe_code)]
fn trim_allocator() {
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Every node's settings: loopback, no mDNS, the bench's interval, idle
/// timeout, peer target and advert scope.
fn node_config(bootstrap: Vec<mycel_net::Multiaddr>) -> Config {
    let (peers, grace) = peer_target();
    Config::default()
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")])
        .with_bootstrap(bootstrap)
        .with_mdns(false)
        .with_advert_interval(advert_interval())
        .with_idle_timeout(idle_timeout())
        .with_peer_target(peers, grace)
        .with_advert_scope(advert_scope())
}

/// What the probe, one node in a process of its own, held at the end.
struct Probe {
    rss_mib: f64,
    live_mib: f64,
    connections: usize,
    adverts_per_minute: f64,
}

/// `--probe ADDR SECONDS`: one node in a process of its own (so its memory
/// is its own, not a share of a heap that a whole swarm fragmented),
/// joining the swarm at ADDR and using the bench model as one node in ten
/// does; it idles for the last [`IDLE`] of SECONDS, then prints its RSS,
/// its live heap, its connections and the adverts it received per idle
/// minute.
fn probe(addr: &str, seconds: &str) {
    let boot: mycel_net::Multiaddr = addr.parse().expect("a bootstrap address");
    let total = Duration::from_secs(seconds.parse().expect("seconds"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let key = Keypair::generate().expect("key");
        let (handle, _events, event_loop) =
            mycel_net::start(&key, node_config(vec![boot]).with_metrics(metrics.clone())).expect("start");
        tokio::spawn(event_loop.run(stop.clone()));
        handle.set_advert(advert(0)).await.expect("advert");
        let _ = handle.find_workers(mycel_net::ModelKey::Weights(bench_model().weights), 1).await;
        tokio::time::sleep(total.saturating_sub(IDLE)).await;
        let heard = || metrics.adverts_received.get() + metrics.adverts_rejected.get();
        let before = heard();
        tokio::time::sleep(IDLE).await;
        let adverts = (heard() - before) as f64 / (IDLE.as_secs_f64() / 60.0);
        let connections = handle.connected().await.expect("connected").len();
        trim_allocator();
        println!("probe {:.3} {:.3} {connections} {adverts:.1}", rss_mib(), live_mib());
        stop.cancel();
    });
}

fn read_probe(output: std::io::Result<std::process::Output>) -> Option<Probe> {
    let output = output.ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("probe "))?;
    let mut v = line.split_whitespace();
    Some(Probe {
        rss_mib: v.next()?.parse().ok()?,
        live_mib: v.next()?.parse().ok()?,
        connections: v.next()?.parse().ok()?,
        adverts_per_minute: v.next()?.parse().ok()?,
    })
}

async fn run(n: usize) -> Figures {
    let live_before = live_mib();
    let stop = CancellationToken::new();
    let (_, grace) = peer_target();
    let used = advert_scope() == mycel_net::AdvertScope::Used;
    let key = mycel_net::ModelKey::Weights(bench_model().weights);
    let start = |bootstrap: Vec<mycel_net::Multiaddr>| {
        let key = Keypair::generate().expect("key");
        let metrics = Arc::new(Metrics::new());
        let (handle, _events, event_loop) =
            mycel_net::start(&key, node_config(bootstrap).with_metrics(metrics.clone())).expect("start");
        tokio::spawn(event_loop.run(stop.clone()));
        (handle, metrics)
    };

    let first_start = Instant::now();
    let (first, first_metrics) = start(vec![]);
    first.set_advert(advert(0)).await.expect("advert");
    let boot: mycel_net::Multiaddr = loop {
        if let Some(a) = first.listen_addrs().await.expect("addrs").first() {
            break format!("{a}/p2p/{}", first.local_peer_id()).parse().expect("addr");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // This process's share of the nodes; shards run the rest.
    let local = n.div_ceil(processes());
    assert!(local == n || used, "MYCEL_BENCH_PROCESSES needs MYCEL_BENCH_ADVERTS=used");
    let mut nodes: Vec<Handle> = vec![first];
    let mut metrics: Vec<Arc<Metrics>> = vec![first_metrics];
    for i in 1..local {
        let (h, m) = start(vec![boot.clone()]);
        h.set_advert(advert(i)).await.expect("advert");
        nodes.push(h);
        metrics.push(m);
    }
    let mut shards: Vec<Shard> =
        (local..n).step_by(local).map(|first| Shard::spawn(&boot, first, local.min(n - first))).collect();
    let last_start = Instant::now();
    let last_start_ms = mycel_net::now_ms();
    let trace = std::env::var_os("MYCEL_BENCH_TRACE").is_some();
    let mut next_trace = Duration::ZERO;
    let converged = loop {
        let mut sizes = Vec::with_capacity(nodes.len());
        let mut grew_at_ms = 0;
        for h in &nodes {
            let table = h.peer_count().await.expect("peer count");
            sizes.push(table.peers);
            grew_at_ms = grew_at_ms.max(table.grew_at_ms.unwrap_or(0));
        }
        if trace && last_start.elapsed() >= next_trace {
            let connected = nodes[nodes.len() - 1].connected().await.expect("connected").len();
            let full = sizes.iter().filter(|s| **s == n - 1).count();
            eprintln!(
                "  t={:5.1}s  table min {:3} max {:3}  full {full:3}/{n}  (last node: {connected} connections)",
                last_start.elapsed().as_secs_f64(),
                sizes.iter().min().copied().unwrap_or(0),
                sizes.iter().max().copied().unwrap_or(0),
            );
            next_trace += Duration::from_secs(1);
        }
        if used {
            let mut alone = false;
            for h in &nodes {
                alone |= h.connected().await.expect("connected").is_empty();
            }
            if !alone {
                for shard in &mut shards {
                    assert_eq!(shard.read(), "joined");
                }
                break Ok((last_start.elapsed(), first_start.elapsed()));
            }
        } else if sizes.iter().all(|s| *s >= n - 1) {
            // When the last advert arrived, by the nodes' clock: the poll
            // itself (here, on the same runtime) only confirms it.
            let converged = Duration::from_millis(grew_at_ms.saturating_sub(last_start_ms));
            break Ok((converged.min(last_start.elapsed()), first_start.elapsed()));
        }
        if last_start.elapsed() > GIVE_UP {
            break Err(sizes.iter().min().copied().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    for (i, h) in nodes.iter().enumerate().filter(|(i, _)| uses_model(*i)) {
        let found = h.find_workers(key.clone(), 1).await.expect("find workers");
        if trace {
            eprintln!("  node {i} uses the bench model: {} workers found", found.len());
        }
    }
    for shard in &mut shards {
        assert_eq!(shard.read(), "ready");
    }
    let own: Vec<(usize, Handle, Arc<Metrics>)> =
        nodes.iter().cloned().zip(metrics.iter().cloned()).enumerate().map(|(i, (h, m))| (i, h, m)).collect();
    // Every node's tally: this process's and each shard's.
    let tally_all = async |shards: &mut Vec<Shard>| {
        let mut t = Tally::of(&own, live_before).await;
        for shard in shards.iter_mut() {
            t.add(&shard.tally());
        }
        t
    };
    // The probe joins through a node in the middle and lives through the
    // settling and the idle minute.
    let settle = grace + advert_interval() * 2;
    let probe = {
        let h = &nodes[nodes.len() / 2];
        let a = h.listen_addrs().await.expect("addrs").first().cloned().expect("a listen address");
        std::process::Command::new(std::env::current_exe().expect("this binary"))
            .args(["--probe", &format!("{a}/p2p/{}", h.local_peer_id()), &(settle + IDLE).as_secs().to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the probe starts")
    };
    // Settle: connections opened while joining are closed only once older
    // than the pruner's grace period, at an advert tick.
    if trace {
        let settled = Instant::now() + settle;
        while Instant::now() < settled {
            tokio::time::sleep(advert_interval().min(settled - Instant::now())).await;
            eprintln!("  settling: {}", tally_all(&mut shards).await.kept_line());
        }
    } else {
        tokio::time::sleep(settle).await;
    }
    // Idle: what each node receives while nothing happens but adverts.
    let before = tally_all(&mut shards).await;
    tokio::time::sleep(IDLE).await;
    let after = tally_all(&mut shards).await;
    let minutes = IDLE.as_secs_f64() / 60.0;
    let idle_per_minute = (
        (after.adverts - before.adverts) as f64 / n as f64 / minutes,
        (after.bytes - before.bytes) as f64 / n as f64 / minutes,
    );
    let users_per_minute =
        (after.users > 0).then(|| (after.user_adverts - before.user_adverts) as f64 / after.users as f64 / minutes);
    // The shards' RSS is as they left it after handing free memory back.
    let shards_rss = after.rss_mib;
    let rss_kept = (rss_mib() + shards_rss) / n as f64;
    trim_allocator();
    let rss_per_node_mib = (rss_kept, (rss_mib() + shards_rss) / n as f64);
    let live_per_node_mib = after.live_mib / n as f64;

    let probe = read_probe(tokio::task::spawn_blocking(move || probe.wait_with_output()).await.expect("joined"));
    // A requester joins through a node in the middle of the swarm.
    let mid: mycel_net::Multiaddr = {
        let h = &nodes[nodes.len() / 2];
        let a = h.listen_addrs().await.expect("addrs").first().cloned().expect("a listen address");
        format!("{a}/p2p/{}", h.local_peer_id()).parse().expect("addr")
    };
    let joined = Instant::now();
    let (requester, _) = start(vec![mid]);
    requester.set_advert(advert(0)).await.expect("advert");
    let wanted = WORKERS_WANTED.min((0..n).filter(|i| serves_model(*i)).count()).max(1);
    let find_workers = loop {
        let peers = if used {
            requester.find_workers(key.clone(), wanted).await.expect("find workers")
        } else {
            requester.peers().await.expect("peers")
        };
        let found = peers.iter().filter(|p| !p.advert.models.is_empty()).count();
        if trace {
            eprintln!("  requester: {found} workers known after {:.2} s", joined.elapsed().as_secs_f64());
        }
        if found >= wanted {
            break Some(joined.elapsed());
        }
        if joined.elapsed() > GIVE_UP {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.cancel();
    for shard in shards {
        // Its stdin closes: it stops.
        let Shard { mut child, stdin, .. } = shard;
        drop(stdin);
        let _ = child.wait();
    }
    Figures {
        converged,
        connections: (after.connections as f64 / n as f64, after.max_connections as usize),
        idle_per_minute,
        users_per_minute,
        rss_per_node_mib,
        live_per_node_mib,
        probe,
        find_workers,
        kept: after.kept_line(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, addr, seconds, ..] = args.as_slice()
        && flag == "--probe"
    {
        return probe(addr, seconds);
    }
    if let [_, flag, boot, first, count, ..] = args.as_slice()
        && flag == "--shard"
    {
        return shard(boot, first, count);
    }
    let sizes: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![50, 100, 200] } else { sizes };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "in-process swarm ({} cores, advert interval {} s, idle connections closed after {} s, \
         peer target {} with a {} s grace, adverts: {:?}, serving the bench model: {})",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        advert_interval().as_secs(),
        idle_timeout().as_secs(),
        peer_target().0,
        peer_target().1.as_secs(),
        advert_scope(),
        match workers_cap() {
            usize::MAX => "one node in ten".to_string(),
            k => format!("one node in ten, at most {k}"),
        },
    );
    println!(
        "{:>6}  {:>22}  {:>14}  {:>16}  {:>17}  {:>23}  {:>14}  {:>12}  {:>17}  {:>30}",
        "nodes",
        "converged after last",
        "conns avg/max",
        "adverts/node/min",
        "KiB in/node/min",
        "RSS/node MiB kept/used",
        "live MiB/node",
        "find 3 (s)",
        "users' adverts/min",
        "probe RSS/live MiB, conns, ads"
    );
    for n in sizes {
        let f = runtime.block_on(run(n));
        let converged = match f.converged {
            Ok((after_last, _)) => format!("{:.2} s", after_last.as_secs_f64()),
            Err(min) => format!("no ({min} of {} at {} s)", n - 1, GIVE_UP.as_secs()),
        };
        println!(
            "{n:>6}  {converged:>22}  {:>14}  {:>16.0}  {:>17.1}  {:>23}  {:>14.2}  {:>12}  {:>17}  {:>30}",
            format!("{:.1}/{}", f.connections.0, f.connections.1),
            f.idle_per_minute.0,
            f.idle_per_minute.1 / 1024.0,
            format!("{:.2}/{:.2}", f.rss_per_node_mib.0, f.rss_per_node_mib.1),
            f.live_per_node_mib,
            f.find_workers.map_or("not found".into(), |d| format!("{:.2}", d.as_secs_f64())),
            f.users_per_minute.map_or("-".into(), |a| format!("{a:.0}")),
            f.probe.as_ref().map_or("failed".into(), |p| format!(
                "{:.2}/{:.2}, {}, {:.0}",
                p.rss_mib, p.live_mib, p.connections, p.adverts_per_minute
            )),
        );
        println!("{n:>6}  {}", f.kept);
        // Let sockets of the previous swarm close before the next.
        std::thread::sleep(Duration::from_secs(1));
    }
}
