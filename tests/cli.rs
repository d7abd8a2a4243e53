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
