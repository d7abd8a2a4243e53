//! The `mycel` binary as users run it.

use crate::support::mycel;

#[test]
fn id_creates_the_key_once_and_prints_a_stable_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let run = || {
        let out = mycel().args(["id", "--data-dir"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let first = run();
    assert!(first.starts_with("12D3KooW"), "not an ed25519 PeerId: {first}");
    assert_eq!(run(), first);

    // The PeerId is the key's: recover the public key from it and compare
    // with the key file.
    let key = mycel_store::identity::load(&data.join("node.key")).unwrap();
    assert_eq!(key.peer_id().to_string(), first);
}

#[test]
fn id_honours_the_data_dir_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = mycel().arg("id").env("MYCEL_DATA_DIR", dir.path()).output().unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("node.key").exists());
}

#[test]
fn corrupt_key_fails_with_one_clear_line_and_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    std::fs::write(&key, "not a key\n").unwrap();
    let out = mycel().args(["id", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("corrupt") && err.contains("node.key"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key\n");
}

/// The test models seen through a fresh models directory (symlinks), so
/// that speeds measured here start out absent.
fn fresh_models_dir(tmp: &std::path::Path) -> std::path::PathBuf {
    let dir = tmp.join("models");
    std::fs::create_dir(&dir).unwrap();
    for id in ["all-minilm-l6-v2", "smollm2-135m-instruct"] {
        std::os::unix::fs::symlink(crate::testnet::test_models().join(id), dir.join(id)).unwrap();
    }
    dir
}

#[test]
fn models_list_shows_kind_digest_size_and_then_measured_speed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fresh_models_dir(tmp.path());
    let list = || -> Vec<serde_json::Value> {
        let out = mycel().args(["models", "list", "--json", "--dir"]).arg(&dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let rows = list();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for (id, kind, speed) in [
        ("all-minilm-l6-v2", "embedding", "embeddings_per_s"),
        ("smollm2-135m-instruct", "generation", "decode_tokens_per_s"),
    ] {
        let row = rows.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("{id} not listed: {rows:#?}"));
        assert_eq!(row["kind"], kind);
        let weights = std::path::PathBuf::from(row["path"].as_str().unwrap());
        assert_eq!(row["size_bytes"].as_u64(), Some(std::fs::metadata(&weights).unwrap().len()));
        // The digest is the weights file's SHA-256, as coreutils computes it.
        let sha = std::process::Command::new("sha256sum").arg(&weights).output().unwrap();
        let sha = String::from_utf8(sha.stdout).unwrap();
        assert_eq!(row["digest"].as_str(), sha.split_whitespace().next(), "{id}");
        assert!(row[speed].is_null(), "{id} measured before any bench: {row}");
    }

    let bench = mycel().args(["models", "bench", "--dir"]).arg(&dir).output().unwrap();
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
    let rows = list();
    for speed in ["embeddings_per_s", "decode_tokens_per_s"] {
        assert!(rows.iter().any(|r| r[speed].as_f64().is_some_and(|s| s > 0.0)), "no {speed} after a bench: {rows:#?}");
    }
    let table = mycel().args(["models", "list", "--dir"]).arg(&dir).output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("MODEL") && table.contains("embeddings/s") && table.contains("decode"), "{table}");
}

#[test]
fn infer_generate_streams_and_honours_its_flags() {
    use std::io::Read;
    let models = crate::testnet::test_models();
    let generate = |args: &[&str]| {
        let mut cmd = mycel();
        cmd.args(["infer", "generate", "--model", "smollm2-135m-instruct", "--dir"]).arg(&models).args(args);
        cmd
    };
    // Streams: the first words are out while the model still works.
    let mut child = generate(&["--max-tokens", "200", "Write a long story about a ship."])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    let n = stdout.read(&mut first).unwrap();
    assert!(n > 0, "no output");
    assert!(child.try_wait().unwrap().is_none(), "output arrived only at the end");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());

    // A seed fixes sampled text; --max-tokens bounds it; the summary says so.
    let run = |seed: &str| {
        let out = generate(&["--max-tokens", "12", "--temperature", "1", "--seed", seed, "Tell me about rain."])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (a, summary) = run("5");
    assert_eq!(run("5").0, a);
    assert!(summary.contains("12 generated") && summary.contains("Length"), "{summary}");
    let others: std::collections::HashSet<String> = ["6", "7", "8"].iter().map(|s| run(s).0).collect();
    assert!(others.len() > 1 || !others.contains(&a), "four seeds gave one text: {a:?}");

    // Out-of-range sampling is one clear error.
    let out = generate(&["--top-p", "0", "hi"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"), "{}", String::from_utf8_lossy(&out.stderr));
}
