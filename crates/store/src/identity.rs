//! The node's key file.
//!
//! Created on first start as `<data dir>/node.key` with mode 0600, loaded
//! on every later start. A key file that exists but can't be read or parsed
//! is an error: replacing it would silently give the node a new identity
//! and orphan its reputation.
//!
//! Format (text, so a human can tell what it is):
//!
//! ```text
//! mycel-node-key-v1
//! <64 hex digits: the ed25519 secret seed>
//! ```

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mycel_protocol::Keypair;
use zeroize::Zeroizing;

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "node.key";
const HEADER: &str = "mycel-node-key-v1";

/// Why the node key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file exists but could not be read (permissions, I/O).
    #[error("cannot read node key {path}: {error}")]
    Unreadable { path: PathBuf, error: io::Error },
    /// The file exists but is not a mycel key. It was left untouched.
    #[error(
        "node key {path} is corrupt ({reason}); it was left untouched. Restore it from a backup, or move it \
         away to start this node with a new identity"
    )]
    Corrupt { path: PathBuf, reason: &'static str },
    /// A new key could not be written.
    #[error("cannot create node key {path}: {error}")]
    Create { path: PathBuf, error: io::Error },
    /// The OS gave no randomness for a new key.
    #[error("cannot generate a node key: {0}")]
    Random(#[from] mycel_protocol::KeyError),
}

/// Whether [`load_or_create`] found a key or made one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from an existing file.
    Loaded,
    /// Generated and written now.
    Created,
}

/// Loads the key from `data_dir`, creating the directory and a new key on
/// first start.
pub fn load_or_create(data_dir: &Path) -> Result<(Keypair, Origin), IdentityError> {
    let path = data_dir.join(KEY_FILE);
    match load(&path) {
        Ok(key) => return Ok((key, Origin::Loaded)),
        Err(IdentityError::Unreadable { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = Keypair::generate()?;
    match create(data_dir, &path, &key) {
        Ok(()) => Ok((key, Origin::Created)),
        // Another process created it first: use theirs.
        Err(IdentityError::Create { error, .. }) if error.kind() == io::ErrorKind::AlreadyExists => {
            Ok((load(&path)?, Origin::Loaded))
        }
        Err(e) => Err(e),
    }
}

/// Loads an existing key file.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let unreadable = |error| IdentityError::Unreadable { path: path.to_path_buf(), error };
    let corrupt = |reason| IdentityError::Corrupt { path: path.to_path_buf(), reason };

    let mut file = fs::File::open(path).map_err(unreadable)?;
    let mut text = Zeroizing::new(String::new());
    // A key file is ~100 bytes; refuse to read a huge file into memory.
    Read::by_ref(&mut file).take(4096).read_to_string(&mut text).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => corrupt("not text"),
        _ => unreadable(e),
    })?;

    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(corrupt("missing mycel-node-key-v1 header"));
    }
    let hex_seed = lines.next().ok_or_else(|| corrupt("no key line"))?.trim();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(corrupt("unexpected extra lines"));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_seed, seed.as_mut()).map_err(|_| corrupt("key line is not 64 hex digits"))?;
    Ok(Keypair::from_secret_bytes(&seed))
}

/// Writes `key` to `path` with mode 0600, never overwriting: the file is
/// written and synced under a temporary name, then hard-linked into place
/// (which fails if the name exists), and the directory is synced.
fn create(data_dir: &Path, path: &Path, key: &Keypair) -> Result<(), IdentityError> {
    let create_err = |error| IdentityError::Create { path: path.to_path_buf(), error };
    // Directories we create are private; existing ones keep their mode.
    fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(create_err)?;

    let tmp = data_dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        let text = Zeroizing::new(format!("{HEADER}\n{}\n", hex::encode(key.secret_bytes().as_ref())));
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)?;
        fs::File::open(data_dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(create_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (first, origin) = load_or_create(&data).unwrap();
        assert_eq!(origin, Origin::Created);
        let (again, origin) = load_or_create(&data).unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(first.public(), again.public());
    }

    #[test]
    fn key_file_and_new_data_dir_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        load_or_create(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let dir = dir.as_path();
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_key_is_an_error_and_left_untouched() {
        for bad in [&b"garbage"[..], b"mycel-node-key-v1\nnothex\n", b"mycel-node-key-v1\n", b"\xff\xfe", b""] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(KEY_FILE);
            fs::write(&path, bad).unwrap();
            let err = load_or_create(dir.path()).unwrap_err();
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains("left untouched"));
            assert_eq!(fs::read(&path).unwrap(), bad, "the file was changed");
        }
    }

    #[test]
    fn unreadable_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: exists, can't be read as one.
        fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Unreadable { .. }), "{err}");
    }

    #[test]
    fn secret_does_not_leak_into_errors_or_debug() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_create(dir.path()).unwrap();
        let secret_hex = hex::encode(key.secret_bytes().as_ref());
        assert!(!format!("{key:?}").contains(&secret_hex));
        // Damage the file after the secret: the error must not echo it.
        let path = dir.path().join(KEY_FILE);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("extra\n");
        fs::write(&path, &text).unwrap();
        let err = load(&path).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(&secret_hex));
    }
}
