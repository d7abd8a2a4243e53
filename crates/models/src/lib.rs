//! mycel's local model runtime.
//!
//! Today: [`hardware`], the profile of the machine a node advertises (CPU,
//! cores, SIMD, memory, GPUs). The candle model registry, embedding and
//! generation, self-benchmark and worker pool build on it.

pub mod hardware;
