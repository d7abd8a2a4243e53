//! Convergence of an in-process swarm: N nodes on one tokio runtime, real
//! TCP on 127.0.0.1, each bootstrapping from the first. Measures the time
//! from the last node's start until every node holds every other node's
//! advert, and from the first node's start.
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

/// Time after the last start and after the first start, or `None` with the
/// smallest table size if the swarm did not converge within two minutes.
async fn run(n: usize) -> Result<(Duration, Duration), usize> {
    let stop = CancellationToken::new();
    let config = |bootstrap: Vec<mycel_net::Multiaddr>| {
        Config::default()
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")])
            .with_bootstrap(bootstrap)
            .with_mdns(false)
            .with_advert_interval(Duration::from_secs(10))
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
    let trace = std::env::var_os("MYCEL_BENCH_TRACE").is_some();
    let mut next_trace = Duration::ZERO;
    loop {
        let mut sizes = Vec::with_capacity(nodes.len());
        for h in &nodes {
            sizes.push(h.peers().await.expect("peers").len());
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
            break;
        }
        if last_start.elapsed() > Duration::from_secs(120) {
            stop.cancel();
            return Err(sizes.iter().min().copied().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = (last_start.elapsed(), first_start.elapsed());
    stop.cancel();
    Ok(result)
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![50, 100, 200] } else { sizes };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!("in-process swarm convergence ({} cores)", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("{:>6}  {:>22}  {:>20}", "nodes", "after last start (s)", "after first start (s)");
    for n in sizes {
        match runtime.block_on(run(n)) {
            Ok((after_last, total)) => {
                println!("{n:>6}  {:>22.2}  {:>20.2}", after_last.as_secs_f64(), total.as_secs_f64())
            }
            Err(min) => println!("{n:>6}  not converged after 120 s (smallest table {min} of {})", n - 1),
        }
        // Let sockets of the previous swarm close before the next.
        std::thread::sleep(Duration::from_secs(1));
    }
}
