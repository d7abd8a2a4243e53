//! Convergence of an in-process swarm: N nodes on one tokio runtime, real
//! TCP on 127.0.0.1, each bootstrapping from the first. Measures the time
//! from the last node's start until every node holds every other node's
//! advert (when the last advert arrived, by the nodes' clock), and the whole
//! run from the first start until the poll saw it.
//!
//!     cargo bench -p mycel-net --bench convergence -- [NODES...]
//!
//! (default: 50 100 200). Not a criterion bench: one convergence is a
//! single long measurement, reported as-is with the run's parameters.

// A benchmark binary: failing loudly on setup errors is what we want.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use mycel_net::{Config, Handle};
use mycel_protocol::{Advert, Hardware, Keypair, Load, Price, version};
use tokio_util::sync::CancellationToken;

fn advert(i: usize) -> Advert {
    Advert {
        seq: 0,
        timestamp_ms: 0,
        software: version::SOFTWARE_VERSION.into(),
        models: vec![],
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

/// Time after the last start until converged, and the whole run until the
/// poll confirmed it, or the smallest table size if the swarm did not
/// converge within [`GIVE_UP`].
async fn run(n: usize) -> Result<(Duration, Duration), usize> {
    let stop = CancellationToken::new();
    let config = |bootstrap: Vec<mycel_net::Multiaddr>| {
        Config::default()
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")])
            .with_bootstrap(bootstrap)
            .with_mdns(false)
            .with_advert_interval(advert_interval())
    };
    let start = |i: usize, bootstrap: Vec<mycel_net::Multiaddr>| {
        let key = Keypair::generate().expect("key");
        let (handle, _events, event_loop) = mycel_net::start(&key, config(bootstrap)).expect("start");
        tokio::spawn(event_loop.run(stop.clone()));
        (handle, i)
    };

    let first_start = Instant::now();
    let (first, _) = start(0, vec![]);
    first.set_advert(advert(0)).await.expect("advert");
    let boot: mycel_net::Multiaddr = loop {
        if let Some(a) = first.listen_addrs().await.expect("addrs").first() {
            break format!("{a}/p2p/{}", first.local_peer_id()).parse().expect("addr");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut nodes: Vec<Handle> = vec![first];
    for i in 1..n {
        let (h, _) = start(i, vec![boot.clone()]);
        h.set_advert(advert(i)).await.expect("advert");
        nodes.push(h);
    }
    let last_start = Instant::now();
    let last_start_ms = mycel_net::now_ms();
    let trace = std::env::var_os("MYCEL_BENCH_TRACE").is_some();
    let mut next_trace = Duration::ZERO;
    loop {
        let mut sizes = Vec::with_capacity(nodes.len());
        let mut grew_at_ms = 0;
        for h in &nodes {
            let table = h.peer_count().await.expect("peer count");
            sizes.push(table.peers);
            grew_at_ms = grew_at_ms.max(table.grew_at_ms.unwrap_or(0));
        }
        if trace && last_start.elapsed() >= next_trace {
            let connected = nodes[n - 1].connected().await.expect("connected").len();
            let full = sizes.iter().filter(|s| **s == n - 1).count();
            eprintln!(
                "  t={:5.1}s  table min {:3} max {:3}  full {full:3}/{n}  (last node: {connected} connections)",
                last_start.elapsed().as_secs_f64(),
                sizes.iter().min().copied().unwrap_or(0),
                sizes.iter().max().copied().unwrap_or(0),
            );
            next_trace += Duration::from_secs(1);
        }
        if sizes.iter().all(|s| *s >= n - 1) {
            // When the last advert arrived, by the nodes' clock: the poll
            // itself (here, on the same runtime) only confirms it.
            let converged = Duration::from_millis(grew_at_ms.saturating_sub(last_start_ms));
            let result = (converged.min(last_start.elapsed()), first_start.elapsed());
            stop.cancel();
            return Ok(result);
        }
        if last_start.elapsed() > GIVE_UP {
            stop.cancel();
            return Err(sizes.iter().min().copied().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![50, 100, 200] } else { sizes };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "in-process swarm convergence ({} cores, advert interval {} s)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        advert_interval().as_secs()
    );
    println!("{:>6}  {:>22}  {:>20}", "nodes", "after last start (s)", "run until seen (s)");
    for n in sizes {
        match runtime.block_on(run(n)) {
            Ok((after_last, total)) => {
                println!("{n:>6}  {:>22.2}  {:>20.2}", after_last.as_secs_f64(), total.as_secs_f64())
            }
            Err(min) => {
                println!("{n:>6}  not converged after {} s (smallest table {min} of {})", GIVE_UP.as_secs(), n - 1)
            }
        }
        // Let sockets of the previous swarm close before the next.
        std::thread::sleep(Duration::from_secs(1));
    }
}
