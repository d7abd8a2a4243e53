//! A model's capability profile: a one-line description and tags saying
//! what it is good at, advertised to the swarm beside the model's kind,
//! size and measured speed. The router starts from these before it has
//! outcomes of its own.
//!
//! The profile lives beside the weights in `mycel-profile.toml`:
//!
//! ```toml
//! description = "Code specialist that also chats"
//! tags = ["code", "chat", "python"]
//! ```
//!
//! `mycel models fetch` writes the defaults below for the models it
//! installs; users edit the file, or write one for their own models. A
//! model without one advertises no tags. Profiles are bounded (see
//! [`MAX_TAGS`] and friends) because every advert carries them.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The profile's file name in a model folder.
pub const FILE: &str = "mycel-profile.toml";
/// Most tags a profile may list.
pub const MAX_TAGS: usize = mycel_protocol::limits::PROFILE_TAGS;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = mycel_protocol::limits::PROFILE_TAG;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = mycel_protocol::limits::PROFILE_DESCRIPTION;

/// A profile as written in a model folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// One line: what the model is and is good at.
    #[serde(default)]
    pub description: String,
    /// Lower-case words (letters, digits, `-`), e.g. `code`, `chat`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Why a profile file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct ProfileError {
    path: String,
    why: String,
}

impl Profile {
    /// The profile in `dir`, or an empty one where there is none.
    pub fn load(dir: &Path) -> Result<Self, ProfileError> {
        let path = dir.join(FILE);
        let fail = |why: String| ProfileError { path: path.display().to_string(), why };
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(fail(e.to_string())),
        };
        let profile: Self = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        profile.check().map_err(fail)?;
        Ok(profile)
    }

    /// As adverts carry it.
    pub fn into_advert(self) -> mycel_protocol::ModelProfile {
        mycel_protocol::ModelProfile { description: self.description, tags: self.tags }
    }

    /// Whether the profile is within the bounds every advert holds to.
    pub fn check(&self) -> Result<(), String> {
        if self.description.len() > MAX_DESCRIPTION_LEN || self.description.contains('\n') {
            return Err(format!("the description must be one line of at most {MAX_DESCRIPTION_LEN} bytes"));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(format!("{} tags, at most {MAX_TAGS}", self.tags.len()));
        }
        for tag in &self.tags {
            let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            if tag.is_empty() || tag.len() > MAX_TAG_LEN || !tag.chars().all(word) {
                return Err(format!("tag {tag:?}: tags are 1-{MAX_TAG_LEN} lower-case letters, digits or '-'"));
            }
        }
        Ok(())
    }
}

/// A profile `mycel models fetch` writes for a model it installs.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// See [`Profile::description`].
    pub description: &'static str,
    /// See [`Profile::tags`].
    pub tags: &'static [&'static str],
}

impl Defaults {
    /// As a [`Profile`].
    pub fn profile(&self) -> Profile {
        Profile { description: self.description.into(), tags: self.tags.iter().map(|t| t.to_string()).collect() }
    }

    /// Writes `dir/mycel-profile.toml`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let body = toml::to_string(&self.profile()).map_err(std::io::Error::other)?;
        fs::write(
            dir.join(FILE),
            format!("# What this model is good at: advertised to the swarm, a starting point for routing.\n{body}"),
        )
    }
}

/// all-minilm-l6-v2.
pub const ALL_MINILM_L6_V2: Defaults = Defaults {
    description: "Sentence embeddings, 384 dims, 6 layers: semantic search, clustering, similarity",
    tags: &["embedding", "search", "similarity", "english"],
};

/// paraphrase-minilm-l3-v2.
pub const PARAPHRASE_MINILM_L3_V2: Defaults = Defaults {
    description: "Sentence embeddings, 384 dims, 3 layers: about twice as fast as all-minilm-l6-v2, a little less precise",
    tags: &["embedding", "paraphrase", "similarity", "fast"],
};

/// qwen2.5-coder-0.5b-instruct.
pub const QWEN25_CODER_05B: Defaults = Defaults {
    description: "Qwen2.5-Coder 0.5B Instruct: writes and explains code (Python first), also chats; tool calls",
    tags: &["code", "python", "chat", "tools"],
};

/// smollm2-135m-instruct.
pub const SMOLLM2_135M: Defaults = Defaults {
    description: "SmolLM2 135M Instruct: tiny and fast general chat, short answers and rewrites",
    tags: &["chat", "fast", "short-answers"],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_defaults_are_within_bounds_and_round_trip() {
        for d in [ALL_MINILM_L6_V2, PARAPHRASE_MINILM_L3_V2, QWEN25_CODER_05B, SMOLLM2_135M] {
            d.profile().check().unwrap_or_else(|e| panic!("{}: {e}", d.description));
            let dir = tempfile::tempdir().unwrap();
            d.write(dir.path()).unwrap();
            assert_eq!(Profile::load(dir.path()).unwrap(), d.profile());
        }
    }

    #[test]
    fn a_missing_profile_is_empty_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Profile::load(dir.path()).unwrap(), Profile::default());
        for bad in [
            "tags = [\"Code\"]",
            "tags = [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\"]",
            "description = \"two\\nlines\"",
            "colour = \"blue\"",
            "tags = \"code\"",
        ] {
            fs::write(dir.path().join(FILE), bad).unwrap();
            let err = Profile::load(dir.path()).unwrap_err();
            assert!(err.to_string().contains(FILE), "{bad}: {err}");
        }
    }
}
