//! Heap settings for a process that runs models.
//!
//! candle's CPU backend allocates a fresh buffer for every intermediate
//! tensor, and a forward pass of a batch makes dozens of them, each from a
//! few hundred KiB to tens of MiB. glibc serves allocations over its mmap
//! threshold (128 KiB at start, raised as it sees large frees) with fresh
//! mappings, and hands heap tops over its trim threshold back to the kernel
//! at every free: every batch then page-faults in megabytes of zeroed pages
//! again. Measured on this project's 2-core machine (BENCHMARKS.md): a
//! 640x384 by 384x384 linear layer with bias ran at 63 GFLOP/s, 93 with the
//! memory kept; `mycel infer embed`, 3,000 short texts on one thread, 210
//! texts/s before, 268 after, at the same peak RSS.

/// Allocations smaller than this come from the heap (and are reused) rather
/// than from fresh mappings: above any one activation of a batch of short
/// texts, below model weights.
const MMAP_THRESHOLD: usize = 32 << 20;

/// Freed memory at the top of a heap is returned to the kernel only beyond
/// this much: a batch's working set stays mapped between batches.
const TRIM_THRESHOLD: usize = 128 << 20;

/// Keeps freed model buffers in the process for reuse instead of returning
/// them to the kernel after each use. Process-wide: call once, early in
/// `main` of a program that runs models. Does nothing where the C library
/// is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |param, value: usize| {
            let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only changes glibc's allocator parameters; it
            // takes the allocator's own lock and is safe to call at any time.
            #[allow(unsafe_code)]
            let ok = unsafe { libc::mallopt(param, value) } == 1;
            if !ok {
                tracing::debug!(param, value, "mallopt refused a setting");
            }
        };
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
