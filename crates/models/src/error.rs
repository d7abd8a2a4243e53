//! One error type for loading and running models.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("reading {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A file was read but is not what a model of this kind needs.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// Text could not be tokenized or decoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The input does not fit the model.
    #[error("input of {tokens} tokens does not fit: the model takes at most {max}")]
    TooLong { tokens: usize, max: usize },
    /// The caller's request makes no sense for this model.
    #[error("{0}")]
    Invalid(String),
    /// The caller stopped the work.
    #[error("cancelled")]
    Cancelled,
    /// The tensor library failed while running the model.
    #[error("inference failed: {0}")]
    Backend(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Backend(e.to_string())
    }
}

impl ModelError {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        ModelError::Format { path: path.into(), reason: reason.to_string() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| ModelError::Io { path, error }
    }
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
