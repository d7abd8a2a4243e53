//! Element-wise math shared by the encoder (`bert.rs`) and the llama
//! forward pass (`llama.rs`), written so loops over it vectorise.

use crate::simd::multiversion;

multiversion! {
    /// Softmax of each row of `scores` (rows `width` wide), in place.
    pub(crate) fn softmax_rows(scores: &mut [f32], width: usize) {
        scores.chunks_exact_mut(width.max(1)).for_each(softmax_in_place);
    }
}

/// Softmax of one row of scores, in place.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let inv = 1.0 / sum_lanes(row, |v| v);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// The sum of `f` over `xs` in sixteen interleaved lanes, so it
/// vectorises (a plain fold is a chain of additions the compiler must keep
/// in order): one AVX-512 register, or two AVX2 ones, the same sums in the
/// same order on both.
#[inline(always)]
pub(crate) fn sum_lanes(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` without branches or calls, so loops over it vectorise (libm's
/// `expf` is a call per value): Cephes' single-precision method, 2^n times
/// a degree-7 polynomial on the remainder. Within 2 ulp of `f32::exp`
/// (tested below); stops at 2^-126 below -87.3 and at e^88 above 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.0);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    // x - n ln 2, with ln 2 split in two so the product is exact.
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
    let mut p = r.mul_add(1.987_569_1e-4, 1.398_199_9e-3);
    p = r.mul_add(p, 8.333_452e-3);
    p = r.mul_add(p, 4.166_579_6e-2);
    p = r.mul_add(p, 1.666_666_5e-1);
    p = r.mul_add(p, 0.5);
    let p = (r * r).mul_add(p, r) + 1.0;
    // 2^n, built in the exponent bits. Not `n as i32`: Rust's saturating
    // float-to-int cast keeps the loop scalar (a tenth of a long text's
    // encoding went to softmax's exp). Adding 1.5 * 2^23 puts the integer
    // n + 127 (1..=255 here) in the low bits of the mantissa; the shift
    // moves it into the exponent and the rest out of the word.
    let biased = (n + (127.0 + 12_582_912.0)).to_bits();
    p * f32::from_bits(biased << 23)
}

/// Values in [-1, 1) from a fixed linear congruential sequence: test data
/// that is the same on every machine.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for i in -87_000..=87_900 {
            let x = i as f32 * 1e-3 + 1.234e-4;
            let (ours, libm) = (exp(x), x.exp());
            let ulp = (libm.to_bits() as i64 - ours.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm} ({ulp} ulp)");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = vec![1.0, 3.0, 2.0, -50.0];
        softmax_in_place(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[2] && row[2] > row[0] && row[0] > row[3]);
        let e = 1f32.exp() / (1f32.exp() + 3f32.exp() + 2f32.exp() + (-50f32).exp());
        assert!((row[0] - e).abs() < 1e-7);
    }
}
