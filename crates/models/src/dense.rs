//! f32 dense layers on the CPU: `out += x W^T`, the weights packed once at
//! load, one kernel per instruction set, chosen at run time ([`Isa`]).
//!
//! Why not the general GEMM: for an encoder's few rows (one short text is
//! about 20 tokens) a general GEMM repacks the weight on most calls and
//! tiles rows by a column of registers, and the weight is the whole cost.
//! Here the weight is laid out once in panels of [`PANEL`] outputs, each
//! panel's rows (one per input) contiguous, so the kernel streams it in
//! order; the outputs of a panel sit in vector registers and each token's
//! inputs are broadcast, a tile of tokens at a time. Work is split by
//! panels (and by tokens when there are many), so at batch 1 each thread
//! reads only its share of the weight.
//!
//! Every kernel computes the same sums in the same order (per output: the
//! inputs in order, one fused multiply-add each; the portable kernel's
//! `mul_add` is fused too), so the instruction sets agree to the bit
//! (tested on every set the CPU has).

use crate::simd::Isa;

/// Outputs per panel: two AVX-512 registers, four AVX2 ones.
const PANEL: usize = 32;

/// Token rows per tile, by instruction set: as many as keep the
/// accumulators in registers with room to spare (AVX-512: 8 x 2 of 32
/// registers; 12 x 2 measured slower, the compiler spilled; AVX2: 6 x 2 of
/// 16, half a panel at a time).
const fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 8,
        Isa::Avx2 => 6,
        Isa::Portable => 4,
    }
}

/// The most rows any kernel's tile has.
const MAX_TILE_ROWS: usize = 12;

/// Rows of tokens per job when a product is split between threads.
const JOB_ROWS: usize = 48;

/// A weight `W` (outputs x inputs) packed for [`Packed::accumulate`].
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    inputs: usize,
    outputs: usize,
    /// Panel `p`, input `k`, output `j` of the panel at
    /// `start + (p * inputs + k) * PANEL + j`; outputs past the last are 0.
    values: Vec<f32>,
    /// Where the panels start in `values`: a 64-byte boundary.
    start: usize,
}

impl Packed {
    /// Packs `W^T`, given as (inputs x outputs) row-major.
    pub(crate) fn from_transposed(w_t: &[f32], inputs: usize, outputs: usize) -> Self {
        assert_eq!(w_t.len(), inputs * outputs, "a {inputs}x{outputs} weight of {} values", w_t.len());
        let panels = outputs.div_ceil(PANEL);
        let len = panels * inputs * PANEL;
        // 16 spare values, so the panels can start on a cache line.
        let mut values = vec![0f32; len + 16];
        let start = values.as_ptr().align_offset(64).min(16);
        let packed = &mut values[start..start + len];
        for p in 0..panels {
            let width = PANEL.min(outputs - p * PANEL);
            for k in 0..inputs {
                let from = &w_t[k * outputs + p * PANEL..][..width];
                packed[(p * inputs + k) * PANEL..][..width].copy_from_slice(from);
            }
        }
        Self { inputs, outputs, values, start }
    }

    /// `W^T` back, (inputs x outputs) row-major: what
    /// [`Self::from_transposed`] was given.
    pub(crate) fn unpack_transposed(&self) -> Vec<f32> {
        let mut w_t = vec![0f32; self.inputs * self.outputs];
        for p in 0..self.outputs.div_ceil(PANEL) {
            let width = PANEL.min(self.outputs - p * PANEL);
            for (k, row) in self.panel(p).chunks_exact(PANEL).enumerate() {
                w_t[k * self.outputs + p * PANEL..][..width].copy_from_slice(&row[..width]);
            }
        }
        w_t
    }

    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.values[self.start + p * self.inputs * PANEL..][..self.inputs * PANEL]
    }

    /// `out += x W^T` for the rows of `x` (each `inputs` wide; `out` rows
    /// `outputs` wide), with the kernel for `isa` (which the CPU must
    /// have: see [`Isa::supported`]), split into jobs over `threads`
    /// threads of the current rayon pool (1: this thread only).
    pub(crate) fn accumulate(&self, x: &[f32], out: &mut [f32], threads: usize, isa: Isa) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        assert!(inputs > 0 && x.len().is_multiple_of(inputs), "{} values for rows of {inputs}", x.len());
        let rows = x.len() / inputs;
        assert_eq!(out.len(), rows * outputs, "output for {rows} rows of {outputs}");
        assert!(isa.supported(), "the {} kernels on a CPU without them", isa.name());
        let panels = outputs.div_ceil(PANEL);
        let chunks = if threads > 1 { rows.div_ceil(JOB_ROWS) } else { 1 };
        let jobs = panels * chunks;
        let chunk_rows = rows.div_ceil(chunks.max(1));
        // Job `j`: panel `j / chunks`, rows of chunk `j % chunks`.
        let out = Disjoint::new(out);
        let job = |j: usize| {
            let (p, c) = (j / chunks, j % chunks);
            let first = c * chunk_rows;
            let last = rows.min(first + chunk_rows);
            self.panel_rows(p, first, last, x, &out, isa);
        };
        if threads > 1 && jobs > 1 {
            use rayon::prelude::*;
            // Contiguous runs of jobs per thread: a thread keeps its panels.
            (0..jobs).into_par_iter().with_min_len(jobs.div_ceil(4 * threads)).for_each(job);
        } else {
            (0..jobs).for_each(job);
        }
    }

    /// Rows `first..last` of panel `p`'s outputs, a tile at a time.
    fn panel_rows(&self, p: usize, first: usize, last: usize, x: &[f32], out: &Disjoint, isa: Isa) {
        let inputs = self.inputs;
        let panel = self.panel(p);
        let column = p * PANEL;
        let width = PANEL.min(self.outputs - column);
        let step = tile_rows(isa);
        // The kernels overwrite a tile's rows: one tile serves every call.
        // (Passes over part of the inputs at a time, to keep the panel in
        // the first-level cache, measured no faster.)
        let mut tile = [[0f32; PANEL]; MAX_TILE_ROWS];
        let mut row = first;
        while row < last {
            let n = step.min(last - row);
            kernel(isa, n, panel, &x[row * inputs..(row + n) * inputs], inputs, &mut tile[..n]);
            for (r, sums) in tile[..n].iter().enumerate() {
                // SAFETY: jobs split the output by panel and by rows:
                // this one alone writes rows `first..last` of columns
                // `column..column + width`.
                #[allow(unsafe_code)]
                unsafe {
                    out.add(row + r, column, self.outputs, &sums[..width])
                };
            }
            row += n;
        }
    }
}

/// `tile[r][j] = sum_k xs[r * stride + k] * panel[k * PANEL + j]` over
/// the panel's `depth` inputs, for `n` rows of `xs` `stride` apart, with
/// the kernel for `isa`.
fn kernel(isa: Isa, n: usize, panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
    let depth = panel.len() / PANEL;
    assert!(
        n > 0
            && panel.len() == depth * PANEL
            && depth <= stride
            && xs.len() == (n - 1) * stride + depth
            && tile.len() == n,
        "kernel operand sizes"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(Isa::Avx512.supported() && n <= 12);
            // SAFETY: the CPU has AVX-512F (checked above); the operand
            // sizes were checked above, and the kernel reads and writes
            // only inside them.
            #[allow(unsafe_code)]
            unsafe {
                x86::tile_avx512(n, panel, xs, stride, tile)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(Isa::Avx2.supported() && n <= 6);
            // SAFETY: as above, for AVX2 and FMA.
            #[allow(unsafe_code)]
            unsafe {
                x86::tile_avx2(n, panel, xs, stride, tile)
            }
        }
        _ => portable(panel, xs, stride, tile),
    }
}

/// The reference kernel: each row's sums, inputs in order.
fn portable(panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
    let depth = panel.len() / PANEL;
    for (r, sums) in tile.iter_mut().enumerate() {
        *sums = [0.0; PANEL];
        for (&a, w) in xs[r * stride..][..depth].iter().zip(panel.chunks_exact(PANEL)) {
            for (s, &w) in sums.iter_mut().zip(w) {
                *s = a.mul_add(w, *s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// Expands `$body` with `$n` a constant for each tile height up to
    /// `$max`, so the accumulators of every height stay in registers.
    macro_rules! by_rows {
        ($rows:expr, $max:literal, $f:ident, $($arg:expr),*) => {
            match $rows {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                4 if $max >= 4 => $f::<4>($($arg),*),
                5 if $max >= 5 => $f::<5>($($arg),*),
                6 if $max >= 6 => $f::<6>($($arg),*),
                7 if $max >= 7 => $f::<7>($($arg),*),
                8 if $max >= 8 => $f::<8>($($arg),*),
                9 if $max >= 9 => $f::<9>($($arg),*),
                10 if $max >= 10 => $f::<10>($($arg),*),
                11 if $max >= 11 => $f::<11>($($arg),*),
                12 if $max >= 12 => $f::<12>($($arg),*),
                n => unreachable!("a tile of {n} rows"),
            }
        };
    }

    /// # Safety
    /// The CPU has AVX-512F; `panel` holds `depth * PANEL` values, `xs`
    /// `(n - 1) * stride + depth` with `depth <= stride`, `tile` `n` rows;
    /// `n <= 12`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(n: usize, panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
        #[target_feature(enable = "avx512f")]
        unsafe fn rows<const R: usize>(panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
            let (w, x, depth) = (panel.as_ptr(), xs.as_ptr(), panel.len() / PANEL);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for k in 0..depth {
                // SAFETY (all loads): k < depth, r < R = n: inside the
                // sizes the caller guarantees.
                let (w0, w1) = unsafe { (_mm512_loadu_ps(w.add(k * PANEL)), _mm512_loadu_ps(w.add(k * PANEL + 16))) };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(unsafe { *x.add(r * stride + k) });
                    acc[0] = _mm512_fmadd_ps(a, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a, w1, acc[1]);
                }
            }
            for (acc, out) in acc.iter().zip(tile.iter_mut()) {
                // SAFETY: each tile row holds PANEL = 32 values.
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr(), acc[0]);
                    _mm512_storeu_ps(out.as_mut_ptr().add(16), acc[1]);
                }
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { by_rows!(n, 12, rows, panel, xs, stride, tile) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; sizes as for [`tile_avx512`]; `n <= 6`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(n: usize, panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
        /// One half of the panel (16 outputs: one cache line per input)
        /// at a time, so each pass streams half as much of the panel per
        /// row: 6 rows x 2 registers of accumulators out of 16 registers.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn rows<const R: usize>(panel: &[f32], xs: &[f32], stride: usize, tile: &mut [[f32; PANEL]]) {
            let (w, x, depth) = (panel.as_ptr(), xs.as_ptr(), panel.len() / PANEL);
            for half in [0, 16] {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for k in 0..depth {
                    // SAFETY (all loads): as in `tile_avx512`. (No
                    // closures here: they would not inherit the target
                    // features.)
                    let (w0, w1) = unsafe {
                        let w = w.add(k * PANEL + half);
                        (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)))
                    };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm256_set1_ps(unsafe { *x.add(r * stride + k) });
                        acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
                    }
                }
                for (acc, out) in acc.iter().zip(tile.iter_mut()) {
                    // SAFETY: each tile row holds 32 values; half + 16 <= 32.
                    unsafe {
                        _mm256_storeu_ps(out.as_mut_ptr().add(half), acc[0]);
                        _mm256_storeu_ps(out.as_mut_ptr().add(half + 8), acc[1]);
                    }
                }
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { by_rows!(n, 6, rows, panel, xs, stride, tile) }
    }
}

/// A row-major output shared by parallel jobs that each write their own
/// elements (a rectangle of it): no two jobs may touch the same element,
/// which [`Disjoint::add`]'s callers promise.
pub(crate) struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _output: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer comes from a `&'a mut [f32]` held for the life of
// the `Disjoint`, and callers of `add` promise each element is written by
// one job only.
#[allow(unsafe_code)]
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        Self { ptr: out.as_mut_ptr(), len: out.len(), _output: std::marker::PhantomData }
    }

    /// Adds `values` to row `row`, columns `column..`, of the output
    /// seen as rows `stride` wide. Panics outside the output.
    ///
    /// # Safety
    /// No other thread reads or writes these elements while this runs.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn add(&self, row: usize, column: usize, stride: usize, values: &[f32]) {
        let at = row * stride + column;
        assert!(column + values.len() <= stride && at + values.len() <= self.len, "a write outside the output");
        // SAFETY: inside the output (checked above), and no other thread
        // touches these elements (the caller's promise).
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), values.len()) };
        out.iter_mut().zip(values).for_each(|(o, v)| *o += v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::pseudo_random;

    /// Every kernel this CPU can run, every tile height, ragged panels and
    /// 1 or 2 threads, against sums in f64: within f32 rounding of the
    /// exact sums, and every instruction set equal to the portable path
    /// to the bit (same products, same order, fused).
    #[test]
    fn every_kernel_matches_exact_sums_and_each_other() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (rows, inputs, outputs) in [(1, 7, 5), (13, 33, 17), (21, 384, 384), (100, 64, 96), (25, 40, 1152)] {
            let x = pseudo_random(rows * inputs, 1);
            let w_t = pseudo_random(inputs * outputs, 2);
            let start = pseudo_random(rows * outputs, 3);
            let packed = Packed::from_transposed(&w_t, inputs, outputs);
            assert_eq!(packed.unpack_transposed(), w_t, "packing loses nothing");
            let exact: Vec<f64> = (0..rows * outputs)
                .map(|i| {
                    let (r, o) = (i / outputs, i % outputs);
                    let dot: f64 =
                        (0..inputs).map(|k| f64::from(x[r * inputs + k]) * f64::from(w_t[k * outputs + o])).sum();
                    f64::from(start[i]) + dot
                })
                .collect();
            let mut portable = start.clone();
            packed.accumulate(&x, &mut portable, 1, Isa::Portable);
            for isa in Isa::available() {
                for threads in [1, 2] {
                    let mut out = start.clone();
                    pool.install(|| packed.accumulate(&x, &mut out, threads, isa));
                    for (i, (o, e)) in out.iter().zip(&exact).enumerate() {
                        let bound = 1e-5 * (inputs as f64).sqrt() * (1.0 + e.abs());
                        assert!((f64::from(*o) - e).abs() < bound, "{} {rows}x{inputs}->{outputs} [{i}]", isa.name());
                    }
                    assert_eq!(out, portable, "{} x{threads} against portable, {rows}x{inputs}->{outputs}", isa.name());
                }
            }
        }
    }
}
