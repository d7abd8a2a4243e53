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
    // A first node holds a port. The port was free when asked for, but
    // another test's outgoing connection may take it before the node binds
    // it (the node then exits): then a fresh port, a few times at most.
    let (mut first, addr) = (0..5)
        .find_map(|_| {
            let port = free_port();
            let addr = format!("/ip4/127.0.0.1/tcp/{port}");
            let mut node = mycel()
                .args(["node", "--no-mdns", "--api", "127.0.0.1:0", "--listen", &addr, "--data-dir"])
                .arg(tmp.path().join("a"))
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if node.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = node.kill();
                    let _ = node.wait();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Some((node, addr))
        })
        .expect("the first node never listened, on five ports");

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

/// A stop asked for while the node is still starting (systemd's stop
/// right after start, Ctrl-C at once) is a clean stop, whatever step the
/// node had reached: it once failed with "the network has stopped" when
/// the signal beat the first advert.
#[test]
fn sigterm_at_any_moment_of_startup_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..16u64 {
        let data = tmp.path().join(format!("n{i}"));
        let child = mycel()
            .args(["node", "--no-mdns", "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(&data)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // From before the process has set up its signal handler to after
        // it is serving, in steps of 3 ms.
        std::thread::sleep(Duration::from_millis(3 * i));
        assert!(mycel_testnet::signal(child.id() as i32, 15));
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Killed by the signal before the handler was installed is the
        // other acceptable ending; an error exit is not.
        let by_signal = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(15);
        assert!(out.status.success() || by_signal, "SIGTERM after {} ms: {:?}\n{err}", 3 * i, out.status);
        assert!(!err.contains("error"), "SIGTERM after {} ms:\n{err}", 3 * i);
    }
}

/// The shipped systemd unit (`node/systemd/mycel-node.service`): it
/// passes `systemd-analyze verify` where systemd is installed, and the
/// settings it gives in `Environment=` lines, with nothing on the command
/// line but its own flags, start a node on the listen addresses it names
/// that stops cleanly on SIGTERM (ports and data directory swapped for
/// free ones here).
#[test]
fn the_systemd_unit_verifies_and_its_settings_start_a_node() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../node/systemd/mycel-node.service")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mycel_bin = mycel().get_program().to_owned();
    match std::process::Command::new("systemd-analyze").arg("--version").output() {
        Ok(_) => {
            let copy = tmp.path().join("mycel-node.service");
            std::fs::write(&copy, unit.replace("/usr/local/bin/mycel", &mycel_bin.to_string_lossy())).unwrap();
            let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
            assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
        }
        Err(_) => eprintln!("skipping systemd-analyze verify: systemd-analyze is not installed"),
    }
    let env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let listen = &env.iter().find(|(k, _)| k == "MYCEL_LISTEN").expect("the unit names listen addresses").1;
    assert!(listen.contains("/tcp/4001") && listen.contains("/udp/4001/quic-v1"), "{listen}");
    let (tcp, udp) = (free_port(), free_port());
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/mycel ")).expect("ExecStart");
    let data = tmp.path().join("data");
    let mut child = mycel()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("MYCEL_DATA_DIR", &data)
        .env("MYCEL_API", "127.0.0.1:0")
        .env("MYCEL_NO_MDNS", "true")
        .env(
            "MYCEL_LISTEN",
            listen
                .replace("0.0.0.0", "127.0.0.1")
                .replace("tcp/4001", &format!("tcp/{tcp}"))
                .replace("udp/4001", &format!("udp/{udp}")),
        )
        .args(exec.split_whitespace())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the node to say it listens on both addresses (the ports
    // being bound is not enough: the log line comes a moment later).
    let (lines_tx, lines) = std::sync::mpsc::sync_channel(256);
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let (want_tcp, want_udp) = (format!("/tcp/{tcp}"), format!("/udp/{udp}/quic-v1"));
    let mut err = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(err.contains(&want_tcp) && err.contains(&want_udp)) {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => err.push_str(&(line + "\n")),
            Err(_) => panic!("the node never said it listens on {want_tcp} and {want_udp}:\n{err}"),
        }
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok(), "TCP port {tcp} accepts connections");
    assert!(mycel_testnet::signal(child.id() as i32, 15));
    // Read to the end (the node closing stderr as it exits), then reap it.
    err.extend(lines.iter().map(|l| l + "\n"));
    reader.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM should stop the node cleanly: {status:?}\n{err}");
    assert!(err.contains("\"stopped\""), "the node says it stopped: {err}");
}
