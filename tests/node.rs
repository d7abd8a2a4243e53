//! `mycel node` as a process: bad input, shutdown.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::mycel;

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_briefly(args: &[&str], data: &std::path::Path) -> std::process::Output {
    let mut child = mycel()
        .arg("node")
        .arg("--data-dir")
        .arg(data)
        .args(["--no-mdns", "--api", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn port_in_use_and_bad_addresses_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let mut first = mycel()
        .args(["node", "--no-mdns", "--api", "127.0.0.1:0", "--listen", &addr, "--data-dir"])
        .arg(tmp.path().join("a"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first node holds the port.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "first node never listened");
        std::thread::sleep(Duration::from_millis(20));
    }

    let cases: [(&[&str], &str); 3] = [
        (&["--listen", &addr], "port already in use"),
        (&["--listen", "/dns4/example/tcp/1"], "address not supported"),
        (&["--listen", "not-a-multiaddr"], "is not a multiaddr"),
    ];
    for (args, expected) in cases {
        let out = run_briefly(args, &tmp.path().join("b"));
        let err = String::from_utf8_lossy(&out.stderr);
        let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(out.status.code(), Some(if expected == "is not a multiaddr" { 2 } else { 1 }), "{args:?}: {err}");
        assert_eq!(error_lines.len(), 1, "{args:?}: one error line expected:\n{err}");
        assert!(error_lines[0].contains(expected), "{args:?}: {err}");
    }
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn unreachable_bootstrap_is_one_warning_and_sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("n");
    let dead = format!("/ip4/127.0.0.1/tcp/{}/p2p/12D3KooWQSAz4uLuZQMMZdQFyTnevBw5mapz52NLjPd3UMvrbWSz", free_port());
    let child = mycel()
        .args(["node", "--no-mdns", "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &dead])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn,mycel=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Running: its runtime file appears; then let Kademlia retry a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("node.json").exists() {
        assert!(Instant::now() < deadline, "node never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(mycel_testnet::signal(child.id() as i32, 15));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SIGTERM should stop the node cleanly: {:?}\n{err}", out.status);
    assert_eq!(err.matches("bootstrap peer unreachable").count(), 1, "{err}");
    assert!(err.contains("stopped"), "{err}");
    assert!(!data.join("node.json").exists(), "runtime file removed on shutdown");
}
