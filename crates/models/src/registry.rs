//! Local models on disk: which folders hold a model, of what kind, and the
//! SHA-256 of its weights (the model's identity in the swarm).
//!
//! A model is a folder. An embedding model has `config.json`, a
//! `*.safetensors` file and `tokenizer.json` (sentence-transformers layout,
//! as a model hub or our PyPI packages ship it); a generation model has one
//! `*.gguf` file, which carries its tokenizer. Any folder in that shape
//! works, so users can bring their own models.
//!
//! Hashing 100 MB of weights takes a while, so the digest is cached next to
//! the weights (`.mycel-digest`) together with the file's size and
//! modification time, and recomputed when either changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use mycel_protocol::{Digest, ModelKind, ModelProfile};

/// A model found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalModel {
    /// The folder name, used as the model's human-readable id.
    pub id: String,
    /// What it does.
    pub kind: ModelKind,
    /// The model folder.
    pub dir: PathBuf,
    /// The weights file.
    pub weights: PathBuf,
    /// SHA-256 of the weights file.
    pub digest: Digest,
    /// Size of the weights file in bytes.
    pub size: u64,
    /// What it is good at (`mycel-profile.toml` beside the weights).
    pub profile: ModelProfile,
}

/// Why a folder could not be read as a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The folder has neither a GGUF file nor safetensors with a config
    /// and tokenizer.
    #[error("{0} is not a model folder: expected one *.gguf file, or config.json + *.safetensors + tokenizer.json")]
    NotAModel(PathBuf),
    /// More than one candidate weights file.
    #[error("{dir} has several weights files ({files}); keep one per model folder")]
    Ambiguous { dir: PathBuf, files: String },
    /// The profile beside the weights is malformed or out of bounds.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// I/O error reading the folder or hashing the weights.
    #[error("reading {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |error| RegistryError::Io { path: path.to_path_buf(), error }
}

/// Every model folder directly under `root`, sorted by id. Folders that
/// are not models are skipped; a missing root is an empty list.
pub fn scan(root: &Path) -> Result<Vec<LocalModel>, RegistryError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root)(e)),
    };
    let mut models = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(root))?.path();
        if !path.is_dir() || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        match open(&path) {
            Ok(m) => models.push(m),
            Err(RegistryError::NotAModel(_)) => {}
            Err(e) => return Err(e),
        }
    }
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(models)
}

/// Reads one model folder.
pub fn open(dir: &Path) -> Result<LocalModel, RegistryError> {
    let files: Vec<PathBuf> =
        fs::read_dir(dir).map_err(io(dir))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    let with_ext =
        |ext: &str| -> Vec<&PathBuf> { files.iter().filter(|p| p.extension().is_some_and(|e| e == ext)).collect() };
    let has = |name: &str| files.iter().any(|p| p.file_name().is_some_and(|n| n == name));
    let (kind, weights) = match (with_ext("gguf").as_slice(), with_ext("safetensors").as_slice()) {
        ([gguf], _) => (ModelKind::Generation, (*gguf).clone()),
        ([], [st]) if has("config.json") && has("tokenizer.json") => (ModelKind::Embedding, (*st).clone()),
        (g, s) if g.len() > 1 || (g.is_empty() && s.len() > 1 && has("config.json")) => {
            let names: Vec<String> = g
                .iter()
                .chain(s.iter())
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            return Err(RegistryError::Ambiguous { dir: dir.to_path_buf(), files: names.join(", ") });
        }
        _ => return Err(RegistryError::NotAModel(dir.to_path_buf())),
    };
    let size = fs::metadata(&weights).map_err(io(&weights))?.len();
    let digest = digest_cached(&weights)?;
    let id = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
    let profile = crate::profile::Profile::load(dir)?.into_advert();
    Ok(LocalModel { id, kind, dir: dir.to_path_buf(), weights, digest, size, profile })
}

const DIGEST_CACHE: &str = ".mycel-digest";

/// The weights' SHA-256, from the cache when size and mtime still match.
pub fn digest_cached(weights: &Path) -> Result<Digest, RegistryError> {
    let meta = fs::metadata(weights).map_err(io(weights))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let stamp = format!(
        "{} {} {mtime}",
        weights.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        meta.len()
    );
    let cache = weights.with_file_name(DIGEST_CACHE);
    if let Ok(text) = fs::read_to_string(&cache)
        && let Some((cached_stamp, hex)) = text.trim().rsplit_once(' ')
        && cached_stamp == stamp
        && let Ok(d) = Digest::from_hex(hex)
    {
        return Ok(d);
    }
    let digest = Digest::of_reader(fs::File::open(weights).map_err(io(weights))?).map_err(io(weights))?;
    // A cache we can't write only costs a re-hash next time.
    let _ = fs::write(&cache, format!("{stamp} {}\n", digest.to_hex()));
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &[u8]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(name), data).unwrap();
    }

    #[test]
    fn finds_both_kinds_and_skips_other_folders() {
        let root = tempfile::tempdir().unwrap();
        let emb = root.path().join("minilm");
        write(&emb, "model.safetensors", b"weights-a");
        write(&emb, "config.json", b"{}");
        write(&emb, "tokenizer.json", b"{}");
        let gen_dir = root.path().join("smol");
        write(&gen_dir, "smol.Q4_1.gguf", b"weights-b");
        write(&root.path().join("notes"), "readme.txt", b"hi");
        fs::create_dir_all(root.path().join(".tmp-fetch")).unwrap();

        let models = scan(root.path()).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!((models[0].id.as_str(), models[0].kind), ("minilm", ModelKind::Embedding));
        assert_eq!(models[0].digest, Digest::of(b"weights-a"));
        assert_eq!((models[1].id.as_str(), models[1].kind), ("smol", ModelKind::Generation));
        assert_eq!(models[1].digest, Digest::of(b"weights-b"));
        assert_eq!(models[1].size, 9);
        assert!(scan(&root.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn digest_cache_is_used_and_invalidated() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "m.gguf", b"one");
        let w = root.path().join("m.gguf");
        assert_eq!(digest_cached(&w).unwrap(), Digest::of(b"one"));
        // A forged cache for the same stamp is trusted: that is what makes
        // it a cache...
        let text = fs::read_to_string(root.path().join(DIGEST_CACHE)).unwrap();
        let stamp = text.trim().rsplit_once(' ').unwrap().0.to_string();
        fs::write(root.path().join(DIGEST_CACHE), format!("{stamp} {}\n", Digest::of(b"cached").to_hex())).unwrap();
        assert_eq!(digest_cached(&w).unwrap(), Digest::of(b"cached"));
        // ...and any change to the file (here its size) invalidates it.
        fs::write(&w, b"two!").unwrap();
        assert_eq!(digest_cached(&w).unwrap(), Digest::of(b"two!"));
    }

    #[test]
    fn unclear_folders_are_errors() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "a.gguf", b"1");
        write(root.path(), "b.gguf", b"2");
        assert!(matches!(open(root.path()), Err(RegistryError::Ambiguous { .. })));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(open(empty.path()), Err(RegistryError::NotAModel(_))));
    }
}
