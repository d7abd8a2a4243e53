//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::Command;

/// A `Command` for the workspace's `mycel` binary, built by the same cargo
/// invocation's profile (`scripts/test.sh` builds it before the tests).
pub fn mycel() -> Command {
    let mut cmd = Command::new(mycel_path());
    // Tests never read the developer's own node or config. Logs at warn,
    // unless MYCEL_TEST_LOG asks for more (a `RUST_LOG` filter, which the
    // nodes a testnet starts inherit): for chasing a failure.
    let log = std::env::var("MYCEL_TEST_LOG").unwrap_or_else(|_| "warn".to_string());
    cmd.env_remove("MYCEL_DATA_DIR").env_remove("MYCEL_NODE").env("RUST_LOG", log);
    cmd
}

fn mycel_path() -> PathBuf {
    // The test binary lives in target/<profile>/deps/; the mycel binary in
    // target/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps layout");
    let path = profile_dir.join("mycel");
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}
