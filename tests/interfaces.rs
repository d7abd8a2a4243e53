//! The interfaces people already use, against real node processes: the
//! `openai` Python client, Prometheus' text-format parser, and the
//! dashboard in headless Chromium.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::mycel;
use crate::testnet::{Guard, down, peers_seen_by, test_models, up, up_with_models};

/// The Python with `openai` and `prometheus_client` (`scripts/test.sh`
/// makes it).
fn python() -> PathBuf {
    let path = std::env::var_os("MYCEL_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python"));
    assert!(path.exists(), "{} missing: run scripts/test.sh, which installs the openai client", path.display());
    path
}

/// Debian's Chromium (`scripts/test.sh` installs it).
fn chromium() -> PathBuf {
    let path =
        std::env::var_os("MYCEL_TEST_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(path.exists(), "{} missing: run scripts/test.sh, which installs chromium", path.display());
    path
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python").join(name)
}

fn run_python(args: &[&std::ffi::OsStr]) -> String {
    run_script("openai_check.py", args)
}

fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python()).arg(script(name)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Waits until `node` sees at least `models` models advertised by peers.
fn wait_for_models(node: &mycel_testnet::net::NodeEntry, models: usize) {
    let started = Instant::now();
    loop {
        let peers = peers_seen_by(node);
        let seen: usize =
            peers.as_array().into_iter().flatten().map(|p| p["models"].as_array().map_or(0, Vec::len)).sum();
        if seen >= models {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "models not advertised: {peers:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_openai_client_works_against_the_swarm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    // The node the client talks to serves no model: every answer comes
    // through the market from its peers.
    let manifest = up_with_models(&dir, 3, &["all-minilm-l6-v2,smollm2-135m-instruct", "all-minilm-l6-v2", "none"]);
    let _guard = Guard(&dir);
    wait_for_models(&manifest.nodes[2], 3);

    let texts = tmp.path().join("texts.txt");
    let lines: Vec<String> =
        (0..40).map(|i| format!("sentence {i} about {}", ["cats", "ships", "rain", "code"][i % 4])).collect();
    std::fs::write(&texts, lines.join("\n")).unwrap();
    let local = mycel()
        .args(["infer", "embed", "--model", "all-minilm-l6-v2", "--dir"])
        .arg(test_models())
        .arg("--input")
        .arg(&texts)
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let expected = tmp.path().join("expected.jsonl");
    std::fs::write(&expected, &local.stdout).unwrap();

    let out = run_python(&[manifest.nodes[2].api.as_ref(), expected.as_os_str(), texts.as_os_str()]);
    assert!(out.contains("all ok"), "{out}");
    eprintln!("{out}");

    // A node whose API listens beyond loopback wants its token. (The test
    // still talks to it over 127.0.0.1.)
    let data = tmp.path().join("exposed");
    let bootstrap = manifest.nodes[0].listen_addrs[0].clone();
    let mut child = mycel()
        .args(["node", "--no-mdns", "--api", "0.0.0.0:0", "--api-token", "s3cret", "--model", "none"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &bootstrap, "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let api = loop {
        if let Ok(info) = std::fs::read_to_string(data.join("node.json")) {
            let info: serde_json::Value = serde_json::from_str(&info).unwrap();
            break info["api"].as_str().unwrap().replace("0.0.0.0", "127.0.0.1");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the exposed node did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = run_python(&["--token".as_ref(), api.as_ref(), "s3cret".as_ref()]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(out.contains("token: missing 401"), "{out}");
    down(&dir);
}

/// Tool calls, JSON mode, log probabilities, legacy completions, the
/// Ollama routes and strict parameters, through the real `openai`,
/// `langchain-openai` and `ollama` clients, to a node that serves nothing
/// itself.
#[test]
fn agents_get_tools_json_logprobs_completions_and_ollama() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let all = "all-minilm-l6-v2,smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct";
    // A second SmolLM2 worker, for a task run twice and compared.
    let manifest = up_with_models(&dir, 3, &[all, "none", "smollm2-135m-instruct"]);
    let _guard = Guard(&dir);
    wait_for_models(&manifest.nodes[1], 4);
    let out = run_script("agents_check.py", &[manifest.nodes[1].api.as_ref()]);
    eprintln!("{out}");
    assert!(out.contains("all ok"), "{out}");
    down(&dir);
}

#[test]
fn the_dashboard_shows_the_swarm_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("net");
    let manifest = up(&dir, 3);
    let _guard = Guard(&dir);
    let url = format!("{}/", manifest.nodes[0].api);
    let profile = tmp.path().join("chromium");
    let browser = |extra: &[&str]| {
        Command::new(chromium())
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=5000", "--window-size=1400,1000"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    // The page fills itself from the API: rendered rows carry the peer ids
    // (the script's own template text has `${...}` there instead).
    let started = Instant::now();
    let dom = loop {
        let out = browser(&["--dump-dom"]);
        let dom = String::from_utf8_lossy(&out.stdout).to_string();
        let rows = dom.matches("data-peer=\"12D3KooW").count();
        if rows == 3 {
            break dom;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "dashboard shows {rows} peers:\n{dom}");
        std::thread::sleep(Duration::from_millis(500));
    };
    for node in &manifest.nodes {
        assert!(dom.contains(&format!("data-peer=\"{}\"", node.peer_id)), "{} missing from the table", node.name);
        assert!(dom.contains(&format!("data-node=\"{}\"", node.peer_id)), "{} missing from the picture", node.name);
    }
    assert!(dom.contains("3 in the swarm"), "{dom}");

    // A screenshot for people to look at.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let out = browser(&[&format!("--screenshot={}", png.display())]);
    assert!(png.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{} bytes", bytes.len());
    down(&dir);
}
