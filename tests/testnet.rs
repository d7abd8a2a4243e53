//! `mycel testnet` with real node processes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use mycel_testnet::net::{Manifest, is_our_node, known_peers};

use crate::support::mycel;

pub(crate) fn up(dir: &Path, nodes: u32) -> Manifest {
    let out = mycel()
        .args(["testnet", "up", "--nodes", &nodes.to_string(), "--advert-interval", "1s", "--no-models", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "testnet up failed: {}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), nodes as usize + 1, "one table row per node:\n{table}");
    Manifest::read(dir).unwrap()
}

pub(crate) fn down(dir: &Path) {
    let out = mycel().args(["testnet", "down", "--dir"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "testnet down failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Stops the testnet even when an assertion fails midway.
pub(crate) struct Guard<'a>(pub(crate) &'a Path);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.0.join("testnet.json").exists() {
            let _ = mycel().args(["testnet", "down", "--dir"]).arg(self.0).output();
        }
    }
}

#[test]
fn five_processes_converge_expire_a_killed_node_and_go_down_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let manifest = up(&dir, 5);
    let _guard = Guard(&dir);

    assert_eq!(manifest.nodes.len(), 5);
    let ids: BTreeSet<String> = manifest.nodes.iter().map(|n| n.peer_id.clone()).collect();
    assert_eq!(ids.len(), 5, "distinct identities");
    for n in &manifest.nodes {
        assert!(n.peer_id.starts_with("12D3KooW") && n.api.starts_with("http://127.0.0.1:") && n.pid > 0, "{n:?}");
        assert!(is_our_node(n), "{} not running", n.name);
    }

    // `up` returned, so it saw convergence; check it independently.
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    for n in &manifest.nodes {
        let known = known_peers(&agent, n).unwrap();
        let others: BTreeSet<String> = ids.iter().filter(|p| **p != n.peer_id).cloned().collect();
        assert_eq!(known, others, "{} does not hold exactly the other four", n.name);
    }

    // Crash one node; the others drop it within the advert TTL (3 x 1s),
    // allowing one more interval for the expiry sweep.
    let victim = &manifest.nodes[3];
    assert!(mycel_testnet::signal(victim.pid as i32, 9));
    let killed = Instant::now();
    let survivors: Vec<_> = manifest.nodes.iter().filter(|n| n.pid != victim.pid).collect();
    loop {
        let still: Vec<&str> = survivors
            .iter()
            .filter(|n| known_peers(&agent, n).unwrap().contains(&victim.peer_id))
            .map(|n| n.name.as_str())
            .collect();
        if still.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "{still:?} still hold the killed node after {:?}",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expired_after = killed.elapsed();
    assert!(expired_after > Duration::from_secs(1), "expired too soon ({expired_after:?}): TTL is 3s");
    // The others stay converged among themselves.
    for n in &survivors {
        assert_eq!(known_peers(&agent, n).unwrap().len(), 3, "{}", n.name);
    }

    down(&dir);
    for n in &manifest.nodes {
        assert!(!is_our_node(n), "{} still running after down", n.name);
    }
    assert!(!dir.join("testnet.json").exists());
}

#[test]
fn up_refuses_a_directory_with_a_running_testnet() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    up(&dir, 1);
    let _guard = Guard(&dir);
    let out = mycel().args(["testnet", "up", "--nodes", "1", "--no-models", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running") && err.contains("testnet down"), "{err}");
    down(&dir);
}

/// The test models (`scripts/test.sh` fetches them).
pub(crate) fn test_models() -> std::path::PathBuf {
    let dir = std::env::var_os("MYCEL_TEST_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-models"));
    assert!(dir.join("all-minilm-l6-v2").is_dir(), "test models missing in {}: run scripts/test.sh", dir.display());
    dir
}

/// `testnet up` with the test models, `node_models` used round-robin.
pub(crate) fn up_with_models(dir: &Path, nodes: u32, node_models: &[&str]) -> Manifest {
    up_with_args(dir, nodes, node_models, &[])
}

/// [`up_with_models`] with more `testnet up` flags (faults).
pub(crate) fn up_with_args(dir: &Path, nodes: u32, node_models: &[&str], extra: &[&str]) -> Manifest {
    up_with_env(dir, nodes, node_models, extra, &[])
}

/// [`up_with_args`] with node settings in the environment (`MYCEL_*`),
/// which every node of the testnet inherits.
pub(crate) fn up_with_env(
    dir: &Path,
    nodes: u32,
    node_models: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Manifest {
    let mut cmd = mycel();
    cmd.envs(env.iter().copied());
    cmd.args(["testnet", "up", "--nodes", &nodes.to_string(), "--advert-interval", "1s", "--models-dir"])
        .arg(test_models());
    for models in node_models {
        cmd.args(["--node-models", models]);
    }
    cmd.args(extra);
    let out = cmd.arg("--dir").arg(dir).output().unwrap();
    assert!(out.status.success(), "testnet up failed: {}", String::from_utf8_lossy(&out.stderr));
    Manifest::read(dir).unwrap()
}

/// A node's view of its peers (`mycel peers --json`).
pub(crate) fn peers_seen_by(node: &mycel_testnet::net::NodeEntry) -> serde_json::Value {
    let out = mycel().args(["peers", "--json", "--node"]).arg(&node.api).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn testnet_nodes_serve_the_models_they_are_given() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    // Copy-free: the nodes read the shared test models folder.
    let manifest = up_with_models(&dir, 3, &["all-minilm-l6-v2,smollm2-135m-instruct", "all-minilm-l6-v2", "none"]);
    let _guard = Guard(&dir);

    // Models load (and are measured) after the node joins: wait until the
    // third node, which serves none, sees the others' models.
    let expected: Vec<(String, Vec<&str>)> = vec![
        (manifest.nodes[0].peer_id.clone(), vec!["all-minilm-l6-v2", "smollm2-135m-instruct"]),
        (manifest.nodes[1].peer_id.clone(), vec!["all-minilm-l6-v2"]),
    ];
    let started = Instant::now();
    loop {
        let peers = peers_seen_by(&manifest.nodes[2]);
        let models_of = |peer: &str| -> Vec<String> {
            peers
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["peer_id"] == peer)
                .and_then(|p| p["models"].as_array())
                .map(|ms| ms.iter().filter_map(|m| m["id"].as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        if expected.iter().all(|(peer, want)| models_of(peer) == *want) {
            // Measured speed travels with the advert.
            let first = peers.as_array().unwrap().iter().find(|p| p["peer_id"] == expected[0].0).unwrap();
            let embed = first["models"].as_array().unwrap().iter().find(|m| m["id"] == "all-minilm-l6-v2").unwrap();
            assert!(embed["embeddings_per_s"].as_f64().unwrap() > 0.0, "{embed}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "models not advertised in time: {peers:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    down(&dir);
}

/// A newcomer's first run: `mycel models fetch` fills the default models
/// folder, then `mycel testnet up` with no model flags serves what is
/// there, and returns only once every node serves its models and sees the
/// others', so the next command is answered at once (no 503).
#[test]
fn first_run_serves_the_fetched_models_from_the_default_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("net"));
    // As `mycel models fetch` leaves it (one model, linked, not copied).
    std::fs::create_dir_all(data.join("models")).unwrap();
    std::os::unix::fs::symlink(test_models().join("all-minilm-l6-v2"), data.join("models/all-minilm-l6-v2")).unwrap();
    let out = mycel()
        .env("MYCEL_DATA_DIR", &data)
        .env_remove("MYCEL_MODELS_DIR")
        .args(["testnet", "up", "--nodes", "2", "--advert-interval", "1s", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let _guard = Guard(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "testnet up failed: {stderr}");
    assert!(stderr.contains("every node serves its models"), "{stderr}");
    let manifest = Manifest::read(&dir).unwrap();

    // No waiting from here on: each node serves the model, each sees the other's.
    for (i, node) in manifest.nodes.iter().enumerate() {
        let other = &manifest.nodes[1 - i];
        let peers = peers_seen_by(node);
        let theirs = peers.as_array().unwrap().iter().find(|p| p["peer_id"] == other.peer_id.as_str()).unwrap();
        assert_eq!(theirs["models"][0]["id"], "all-minilm-l6-v2", "{} sees {theirs}", node.name);
    }
    let input = tmp.path().join("texts.txt");
    std::fs::write(&input, "a first run\nthat just works\n").unwrap();
    let vectors = tmp.path().join("vectors.jsonl");
    let out = mycel()
        .args(["submit", "embed", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&vectors)
        .args(["--node", &manifest.nodes[0].api])
        .output()
        .unwrap();
    assert!(out.status.success(), "submit failed at once after up: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_vectors(&vectors).len(), 2);

    // Without models there, the user is told how to get some.
    let (empty, dir2) = (tmp.path().join("empty"), tmp.path().join("net2"));
    let out = mycel()
        .env("MYCEL_DATA_DIR", &empty)
        .env_remove("MYCEL_MODELS_DIR")
        .args(["testnet", "up", "--nodes", "1", "--dir"])
        .arg(&dir2)
        .output()
        .unwrap();
    let _guard2 = Guard(&dir2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("mycel models fetch"), "{stderr}");
}

pub(crate) fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub(crate) fn read_vectors(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn the_swarm_embeds_a_file_with_a_receipt_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let models = test_models();
    let manifest = up_with_models(&dir, 4, &["all-minilm-l6-v2"]);
    let _guard = Guard(&dir);
    // Wait until node-00 sees three peers serving the model.
    let started = Instant::now();
    loop {
        let peers = peers_seen_by(&manifest.nodes[0]);
        let serving = peers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["models"].as_array().is_some_and(|m| !m.is_empty()))
            .count();
        if serving >= 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "models not advertised: {peers:#}");
        std::thread::sleep(Duration::from_millis(300));
    }

    let input = tmp.path().join("texts.txt");
    let lines: Vec<String> = (0..1000).map(|i| format!("line {i}: {}", "peer to peer ".repeat(i % 6))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let result = tmp.path().join("vectors.jsonl");
    let out = mycel()
        .args(["submit", "embed", "--items-per-shard", "50", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&result)
        .arg("--node")
        .arg(&manifest.nodes[0].api)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "submit failed: {stderr}");
    // Work was spread: the summary lists the peers that did shards.
    let workers = stderr.lines().filter(|l| l.trim_start().starts_with("12D3KooW") && l.contains("shards")).count();
    assert!(workers >= 3, "work done by {workers} peers:\n{stderr}");

    // The node lists the task, and says which peer did each shard.
    let id =
        stderr.lines().find_map(|l| l.strip_prefix("task ")).and_then(|l| l.split(':').next()).unwrap().to_string();
    let out = mycel().args(["tasks", "--json", "--node"]).arg(&manifest.nodes[0].api).output().unwrap();
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tasks[0]["task"], id.as_str());
    assert_eq!(tasks[0]["state"], "done");
    let out = mycel().args(["task", &id, "--json", "--node"]).arg(&manifest.nodes[0].api).output().unwrap();
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let executors: std::collections::BTreeSet<&str> =
        task["executors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(task["shards"], 20);
    assert!(executors.len() >= 3, "{task}");

    // Same vectors as the model run locally, in input order.
    let local = mycel()
        .args(["infer", "embed", "--model", "all-minilm-l6-v2", "--dir"])
        .arg(&models)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(local.status.success());
    let local_path = tmp.path().join("local.jsonl");
    std::fs::write(&local_path, &local.stdout).unwrap();
    let (swarm, alone) = (read_vectors(&result), read_vectors(&local_path));
    assert_eq!(swarm.len(), 1000);
    assert_eq!(alone.len(), 1000);
    for (i, (a, b)) in swarm.iter().zip(&alone).enumerate() {
        let c = cosine(a, b);
        assert!(c >= 0.9999, "line {i}: cosine {c}");
    }

    // The receipt verifies offline; an edited vector does not.
    let receipt = tmp.path().join("vectors.jsonl.receipt");
    let ok = mycel().arg("verify").arg(&receipt).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let text = std::fs::read_to_string(&result).unwrap();
    let mut edited: Vec<String> = text.lines().map(String::from).collect();
    let mut v: Vec<f64> = serde_json::from_str(&edited[500]).unwrap();
    v[0] += 0.01;
    edited[500] = serde_json::to_string(&v).unwrap();
    std::fs::write(&result, edited.join("\n") + "\n").unwrap();
    let bad = mycel().arg("verify").arg(&receipt).output().unwrap();
    assert!(!bad.status.success(), "an edited result must not verify");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not match the receipt"));
    down(&dir);
}
