//! The market's defences with real node processes: a peer that lies, one
//! that forges signatures, one that dies mid-shard.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mycel_testnet::net::{Manifest, NodeEntry};

use crate::support::mycel;
use crate::testnet::{Guard, cosine, down, peers_seen_by, read_vectors, test_models, up_with_args};

/// Waits until `node` sees `n` peers serving a model.
fn wait_for_workers(node: &NodeEntry, n: usize) {
    let started = Instant::now();
    loop {
        let peers = peers_seen_by(node);
        let serving =
            peers.as_array().into_iter().flatten().filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()));
        if serving.count() >= n {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "models not advertised: {peers:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn write_texts(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n).map(|i| format!("text {i}: {}", "swarm of small models ".repeat(i % 5))).collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// `mycel infer embed` of the same file: what the swarm must agree with.
fn local_vectors(input: &Path, dir: &Path) -> Vec<Vec<f64>> {
    let out = mycel().args(["infer", "embed", "--dir"]).arg(test_models()).arg("--input").arg(input).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("local.jsonl");
    std::fs::write(&path, &out.stdout).unwrap();
    read_vectors(&path)
}

fn reputation_of(seen_by: &NodeEntry, peer: &str) -> f64 {
    let peers = peers_seen_by(seen_by);
    let entry = peers.as_array().unwrap().iter().find(|p| p["peer_id"] == peer).cloned();
    entry.and_then(|p| p["reputation"].as_f64()).unwrap_or_else(|| panic!("{peer} not seen: {peers:#}"))
}

fn metric(node: &NodeEntry, name: &str) -> f64 {
    let text = ureq::get(&format!("{}/metrics", node.api)).call().unwrap().into_body().read_to_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

fn verify(result: &Path) -> std::process::Output {
    let receipt = format!("{}.receipt", result.display());
    mycel().args(["verify", &receipt, "--result"]).arg(result).output().unwrap()
}

#[test]
fn a_liar_is_outvoted_and_a_forger_rejected_while_the_task_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    // node-03 corrupts its result signatures, node-04 returns wrong vectors.
    let manifest: Manifest =
        up_with_args(&dir, 5, &["all-minilm-l6-v2"], &["--fault", "3=forge", "--fault", "4=perturb"]);
    let _guard = Guard(&dir);
    let (requester, forger, liar) = (&manifest.nodes[0], &manifest.nodes[3], &manifest.nodes[4]);
    wait_for_workers(requester, 4);

    let input = tmp.path().join("texts.txt");
    write_texts(&input, 400);
    let result = tmp.path().join("vectors.jsonl");
    let out = mycel()
        .args(["submit", "embed", "--redundancy", "2", "--items-per-shard", "20", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&result)
        .arg("--node")
        .arg(&requester.api)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "submit failed: {stderr}");

    // The answer is the honest one, in order.
    let (swarm, alone) = (read_vectors(&result), local_vectors(&input, tmp.path()));
    assert_eq!(swarm.len(), 400);
    for (i, (a, b)) in swarm.iter().zip(&alone).enumerate() {
        let c = cosine(a, b);
        assert!(c >= 0.9999, "line {i}: cosine {c} (a lie got through)");
    }
    let verified = verify(&result);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    // Neither cheat is named as the executor of any shard.
    assert!(!stderr.contains(&forger.peer_id) && !stderr.contains(&liar.peer_id), "{stderr}");

    // Both were caught, and it cost them.
    assert!(metric(requester, "mycel_verification_failures_total") >= 2.0);
    let (r_forger, r_liar) = (reputation_of(requester, &forger.peer_id), reputation_of(requester, &liar.peer_id));
    assert!(r_forger < 0.8 && r_liar < 0.8, "forger {r_forger}, liar {r_liar}");
    let honest = reputation_of(requester, &manifest.nodes[1].peer_id);
    assert!(honest > 0.8, "an honest worker earns reputation: {honest}");
    down(&dir);
}

#[test]
fn a_worker_killed_mid_task_leaves_the_task_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let manifest = up_with_args(&dir, 4, &["all-minilm-l6-v2"], &[]);
    let _guard = Guard(&dir);
    let requester = &manifest.nodes[0];
    wait_for_workers(requester, 3);

    let input = tmp.path().join("texts.txt");
    write_texts(&input, 1000);
    let result = tmp.path().join("vectors.jsonl");
    let submit = mycel()
        .args(["submit", "embed", "--items-per-shard", "25", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&result)
        .arg("--node")
        .arg(&requester.api)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Once work is under way, kill -9 a worker.
    let started = Instant::now();
    loop {
        let out = mycel().args(["tasks", "--json", "--node"]).arg(&requester.api).output().unwrap();
        let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if tasks[0]["shards_done"].as_u64().is_some_and(|n| n >= 3) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress: {tasks}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = &manifest.nodes[3];
    assert!(mycel_testnet::signal(victim.pid as i32, 9));

    let out = submit.wait_with_output().unwrap();
    assert!(out.status.success(), "submit failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_vectors(&result).len(), 1000);
    let verified = verify(&result);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    down(&dir);
}
