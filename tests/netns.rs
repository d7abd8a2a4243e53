//! Network faults between real node processes: each node in a network
//! namespace of its own (`testnet up --netns`), the network between them
//! cut and healed. Needs root; skips with the reason otherwise.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mycel_testnet::net::{Manifest, NodeEntry};

use crate::market::{assert_exact, submit_embed};
use crate::support::mycel;
use crate::testnet::{Guard, down, up_with_args};

/// Why these tests cannot run here, if they cannot.
fn cannot_run() -> Option<String> {
    mycel_testnet::netns::check_root().err().map(|e| e.to_string())
}

/// How many peers serving a model `node` knows, asked with its token.
fn serving_peers(node: &NodeEntry) -> usize {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into();
    let Ok(mut response) = node.get(&agent, "/api/v1/peers").call() else { return 0 };
    let peers: serde_json::Value = response.body_mut().read_json().unwrap_or_default();
    peers.as_array().into_iter().flatten().filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty())).count()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// Six namespaced nodes serving the embedder in `dir`, once node-00 sees
/// the other five serving. (Guard `dir` first: a testnet left running holds
/// namespaces until someone takes it down.)
fn six_namespaced_nodes(dir: &Path) -> Manifest {
    let manifest: Manifest = up_with_args(dir, 6, &["all-minilm-l6-v2"], &["--netns"]);
    assert!(manifest.nodes[0].api_token.is_some(), "a --netns testnet has an API token");
    wait_until("workers advertised", Duration::from_secs(180), || serving_peers(&manifest.nodes[0]) >= 5);
    manifest
}

fn testnet(dir: &Path, args: &[&str]) {
    let out = mycel().args(["testnet"]).args(args).arg("--dir").arg(dir).output().unwrap();
    assert!(out.status.success(), "testnet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn two_of_six_nodes_cut_off_for_30_s_then_healed_lose_nothing() {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let _guard = Guard(&dir);
    let manifest = six_namespaced_nodes(&dir);
    let requester = &manifest.nodes[0];

    let input = tmp.path().join("texts.txt");
    let lines: Vec<String> =
        (0..5000).map(|i| format!("partitioned text {i}: {}", "of small models ".repeat(i % 5))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let result = tmp.path().join("vectors.jsonl");
    let submit = submit_embed(requester, &input, &result, &["--items-per-shard", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Mid-task, nodes 3 and 4 are cut off for 30 s.
    std::thread::sleep(Duration::from_secs(2));
    testnet(&dir, &["partition", "--nodes", "3,4"]);
    let gone =
        wait_until("the cut-off nodes' adverts expire", Duration::from_secs(30), || serving_peers(requester) <= 3);
    std::thread::sleep(Duration::from_secs(30).saturating_sub(gone));
    testnet(&dir, &["heal"]);
    let reconverged =
        wait_until("membership reconverges after the heal", Duration::from_secs(60), || serving_peers(requester) >= 5);
    eprintln!(
        "partition: adverts expired {gone:?} after the cut; membership reconverged {reconverged:?} after the heal"
    );

    let out = submit.wait_with_output().unwrap();
    assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_exact(&result, &input, tmp.path(), 5000);
    down(&dir);
}

#[test]
fn partition_asks_for_a_testnet_with_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    crate::testnet::up(&dir, 1);
    let _guard = Guard(&dir);
    let out = mycel().args(["testnet", "partition", "--nodes", "0", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--netns"), "{err}");
    down(&dir);
}

#[test]
fn every_node_losing_2_percent_of_its_packets_loses_no_work() {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return;
    }
    if let Err(why) = mycel_testnet::netns::loss_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let _guard = Guard(&dir);
    let manifest = six_namespaced_nodes(&dir);
    let requester = &manifest.nodes[0];
    // 100 ms more per packet where the kernel can (netem); 2% loss always.
    if mycel_testnet::netns::netem_available() {
        testnet(&dir, &["degrade", "--loss", "2", "--delay", "100ms"]);
    } else {
        eprintln!("latency not added: this kernel has no netem qdisc; 2% loss only");
        testnet(&dir, &["degrade", "--loss", "2"]);
    }
    let input = tmp.path().join("texts.txt");
    let lines: Vec<String> =
        (0..5000).map(|i| format!("lossy text {i}: {}", "of small models ".repeat(i % 5))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let result = tmp.path().join("vectors.jsonl");
    let started = Instant::now();
    let out = submit_embed(requester, &input, &result, &["--items-per-shard", "50"]).output().unwrap();
    assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("5,000 texts through a 2%-loss network in {:.1} s", started.elapsed().as_secs_f64());
    testnet(&dir, &["degrade", "--loss", "0"]);
    assert_exact(&result, &input, tmp.path(), 5000);
    down(&dir);
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into()
}

/// What `node` knows of `peer`: its advert and how they are connected.
fn peer_seen_by(node: &NodeEntry, peer: &str) -> Option<serde_json::Value> {
    let mut response = node.get(&agent(), "/api/v1/peers").call().ok()?;
    let peers: serde_json::Value = response.body_mut().read_json().ok()?;
    peers.as_array()?.iter().find(|p| p["peer_id"] == peer).cloned()
}

fn connection(node: &NodeEntry, peer: &str) -> String {
    peer_seen_by(node, peer).and_then(|p| p["connection"].as_str().map(str::to_string)).unwrap_or_default()
}

fn hole_punches(node: &NodeEntry) -> u64 {
    let status: serde_json::Value =
        node.get(&agent(), "/api/v1/status").call().unwrap().body_mut().read_json().unwrap();
    status["reachability"]["hole_punches_ok"].as_u64().unwrap_or(0)
}

/// Whether the NAT tests cannot run here (no root or no iptables); says why.
fn skipped_without_nat() -> bool {
    let why = cannot_run().or_else(|| mycel_testnet::netns::loss_available().err().map(|e| e.to_string()));
    if let Some(why) = &why {
        eprintln!("skipped: {why}");
    }
    why.is_some()
}

/// A public node (node-00) and two homes behind NAT routers: node-01
/// serves nothing (the requester), node-02 embeds.
fn two_homes(dir: &Path, args: &[&str]) -> Manifest {
    up_with_args(dir, 3, &["none", "none", "all-minilm-l6-v2"], args)
}

/// Runs `test` on three nodes: node-00 public (bootstrap and relay),
/// node-01 (no models, the requester) and node-02 (the embedder), each
/// behind a NAT router of kind `kind`; once node-01 knows node-02's relayed
/// address. Skips without root and iptables.
fn with_two_homes_behind(kind: &str, test: impl FnOnce(&Path, &Manifest)) {
    if skipped_without_nat() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let _guard = Guard(&dir);
    let manifest = two_homes(&dir, &["--nat", kind]);
    let (requester, worker) = (&manifest.nodes[1], &manifest.nodes[2]);
    wait_until("the worker's relayed address reaches the requester", Duration::from_secs(60), || {
        peer_seen_by(requester, &worker.peer_id).is_some_and(|p| {
            let relayed = |a: &serde_json::Value| a.as_str().is_some_and(|a| a.contains("/p2p-circuit"));
            p["models"].as_array().is_some_and(|m| !m.is_empty())
                && p["listen_addrs"].as_array().into_iter().flatten().any(relayed)
        })
    });
    test(tmp.path(), &manifest);
    down(&dir);
}

fn embed_across(requester: &NodeEntry, tmp: &Path, name: &str, n: usize) {
    let input = tmp.join(format!("{name}.txt"));
    let lines: Vec<String> = (0..n).map(|i| format!("{name} text {i}: {}", "across the NAT ".repeat(i % 4))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let result = tmp.join(format!("{name}.jsonl"));
    let out = submit_embed(requester, &input, &result, &["--items-per-shard", "50"]).output().unwrap();
    assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_exact(&result, &input, tmp, n);
}

#[test]
fn a_task_crosses_two_port_restricted_nats_and_outlives_the_relay() {
    with_two_homes_behind("port-restricted", |tmp, manifest| {
        let (relay, requester, worker) = (&manifest.nodes[0], &manifest.nodes[1], &manifest.nodes[2]);
        // Auctioned from one home to the other: they meet through the relay.
        embed_across(requester, tmp, "first", 300);
        // Plain MASQUERADE keeps ports: hole punching replaces the relayed
        // connection with a direct one (at once, mostly before the first
        // results; the relayed one is closed then).
        let first = connection(requester, &worker.peer_id);
        eprintln!("when the first task ended, the nodes' connection was {first:?}");
        let punched = wait_until("a hole-punched direct connection", Duration::from_secs(30), || {
            connection(requester, &worker.peer_id) == "direct"
        });
        eprintln!("direct only {punched:?} after the first task");
        assert!(hole_punches(requester) + hole_punches(worker) >= 1, "the direct connection came from hole punching");

        // The relay dies; the punched connection carries the next task.
        let _ = std::process::Command::new("kill").args(["-9", &relay.pid.to_string()]).status();
        std::thread::sleep(Duration::from_secs(1));
        embed_across(requester, tmp, "second", 300);
        // With the relay dead there was no other path. The requester still
        // sees the worker directly connected (asked until it answers: on a
        // loaded machine its API may be slow, and with the gossip hub gone
        // the worker's advert may lapse for a moment before they graft each
        // other).
        wait_until("the requester sees the worker directly connected", Duration::from_secs(15), || {
            connection(requester, &worker.peer_id) == "direct"
        });
    });
}

#[test]
fn behind_symmetric_nats_the_relay_carries_what_hole_punching_cannot() {
    with_two_homes_behind("symmetric", |tmp, manifest| {
        let (requester, worker) = (&manifest.nodes[1], &manifest.nodes[2]);
        embed_across(requester, tmp, "symmetric", 300);
        // A new port per destination: the port the relay saw is not the one
        // the other home must use, so the punch fails and the relay stays.
        std::thread::sleep(Duration::from_secs(3));
        let how = connection(requester, &worker.peer_id);
        eprintln!("behind symmetric NATs the result came over a {how} connection");
        assert_eq!(how, "relayed");
    });
}

/// Every node listening only to the models it uses, two homes behind
/// port-restricted NATs: the requester holds no advert of the worker, finds
/// it through provider records that the public node keeps, reaches it
/// through the relay, and the task completes.
#[test]
fn with_used_adverts_a_task_crosses_two_nats_to_a_worker_found_in_the_dht() {
    if skipped_without_nat() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let _guard = Guard(&dir);
    let manifest = two_homes(&dir, &["--nat", "port-restricted", "--adverts", "used"]);
    let (requester, worker) = (&manifest.nodes[1], &manifest.nodes[2]);
    wait_until("the worker is reachable through the relay", Duration::from_secs(60), || {
        let status: serde_json::Value = worker
            .get(&agent(), "/api/v1/status")
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok())
            .unwrap_or_default();
        status["reachability"]["relayed_addrs"].as_array().is_some_and(|a| !a.is_empty())
    });
    // The requester may hold the worker's advert from the catalogue (its
    // only worker speaks for the model there) or not yet; either way it
    // looks the model up in the DHT (fewer than three workers known), where
    // the worker announces itself again with its relayed address (a few
    // seconds: the DHT walk first waits out peers it cannot dial). Until it
    // has a way to the worker, the requester is told no one serves the
    // model, or (holding the worker's first advert, from before its relay,
    // with only its private addresses) that no bid came, and asks again.
    let input = tmp.path().join("used.txt");
    let lines: Vec<String> = (0..200).map(|i| format!("used text {i}: {}", "across the NAT ".repeat(i % 4))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let result = tmp.path().join("used.jsonl");
    let started = Instant::now();
    loop {
        let out = submit_embed(requester, &input, &result, &["--items-per-shard", "50"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        assert!(stderr.contains("no peer serves") || stderr.contains("no usable bids"), "submit failed: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(60), "the worker was never found: {stderr}");
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "found and used after {:?}, over a {} connection",
        started.elapsed(),
        connection(requester, &worker.peer_id)
    );
    assert_exact(&result, &input, tmp.path(), 200);
    down(&dir);
}
