//! mycel's own llama forward pass for the CPU, on Q4_1 and Q8_0 weights.
//!
//! candle's quantized llama spends half of each decoded token in a generic
//! Q8_0 dot product, re-concatenates the whole KV cache at every step and
//! wakes its thread pool for every small op (profiles in BENCHMARKS.md).
//! This module does what llama.cpp does instead:
//!
//! - weights in ggml's blocks of 32: Q4_1 kept byte for byte as the GGUF
//!   ships it, Q8_0 as two flat arrays (quants, scales);
//! - activations quantised to 8-bit blocks with their sums, and integer dot
//!   products (AVX2 where the build has it, portable code otherwise), four
//!   prompt tokens per unpacked weight block;
//! - a KV cache that grows in place, one buffer per layer;
//! - the query, key and value projections as one matrix, and the gate and
//!   up projections as another, so each layer runs four matrix products;
//! - rayon only around the matrix products (one piece per thread) and
//!   attention heads, with the whole pass inside the pool.
//!
//! Loaded only for llama-architecture GGUFs on the CPU whose matrices are
//! Q4_1 or Q8_0 (Q4_1 optionally converted to Q8_0 at load); anything else
//! stays on candle's model (see `generate.rs`).

use std::io::{Read, Seek};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::math::{exp, softmax_in_place};

/// Values per Q8_0 block.
const BLOCK: usize = 32;

/// Shapes and constants of one model.
#[derive(Debug, Clone)]
struct Config {
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    eps: f32,
    /// Rotary frequencies, one per rotated pair.
    inv_freq: Vec<f32>,
    /// Which dimensions rotate together.
    rope: RopeStyle,
}

/// How a head's dimensions pair up for the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeStyle {
    /// Adjacent pairs `(0, 1), (2, 3), ..`: llama in GGUF, whose converter
    /// permutes the query and key rows to this layout.
    Adjacent,
    /// The two halves `(i, i + head_dim / 2)`: qwen2, as Hugging Face
    /// computes it (llama.cpp's "neox" rope).
    Halves,
}

impl Config {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A matrix of `rows` x `cols` in Q8_0 blocks along each row.
#[derive(Debug, Clone, Default)]
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    /// `rows * cols` quants, row-major.
    quants: Vec<i8>,
    /// One scale per block: `rows * cols / 32`.
    scales: Vec<f32>,
}

impl QMatrix {
    /// Quantises rows of f32 values (as ggml's Q8_0: scale = max |x| / 127,
    /// quants rounded to nearest).
    pub(crate) fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && values.len() == rows * cols, "{rows}x{cols} from {}", values.len());
        let mut m = Self { rows, cols, quants: vec![0; rows * cols], scales: vec![0.0; rows * cols / BLOCK] };
        quantize_blocks(values, &mut m.quants, &mut m.scales);
        m
    }

    /// From GGUF Q8_0 data: blocks of an f16 scale and 32 quants.
    fn from_q8_0(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        Self::from_blocks(bytes, rows, cols, 2 + BLOCK, |quants, out| out.extend(quants.iter().map(|&b| b as i8)))
    }

    /// From GGUF Q5_0 data, losslessly: per block an f16 scale `d`, 32 high
    /// bits and 32 low nibbles of 5-bit quants `q`, each value `d * (q -
    /// 16)`; `q - 16` fits a Q8_0 quant as it is.
    fn from_q5_0(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        Self::from_blocks(bytes, rows, cols, 2 + 4 + BLOCK / 2, |block, out| {
            let high = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            let low = &block[4..];
            let quant = |i: usize, nibble: u8| (nibble | (((high >> i) & 1) as u8) << 4) as i8 - 16;
            out.extend((0..BLOCK / 2).map(|j| quant(j, low[j] & 0x0f)));
            out.extend((0..BLOCK / 2).map(|j| quant(j + BLOCK / 2, low[j] >> 4)));
        })
    }

    /// From GGUF blocks of `block_bytes`, each an f16 scale then what
    /// `quants` turns into the block's 32 Q8_0 quants.
    fn from_blocks(
        bytes: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        quants: impl Fn(&[u8], &mut Vec<i8>),
    ) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * block_bytes {
            return None;
        }
        let mut m = Self {
            rows,
            cols,
            quants: Vec::with_capacity(rows * cols),
            scales: Vec::with_capacity(rows * cols / BLOCK),
        };
        for block in bytes.chunks_exact(block_bytes) {
            m.scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            quants(&block[2..], &mut m.quants);
        }
        Some(m)
    }

    /// `other`'s rows below this matrix's (same width: [`Matrix::stack`] checks).
    fn append(&mut self, other: QMatrix) {
        self.rows += other.rows;
        self.quants.extend(other.quants);
        self.scales.extend(other.scales);
    }

    fn row_quants(&self, r: usize) -> &[i8] {
        &self.quants[r * self.cols..(r + 1) * self.cols]
    }

    fn row_scales(&self, r: usize) -> &[f32] {
        let n = self.cols / BLOCK;
        &self.scales[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 values, into `out`.
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for ((out, q), s) in
            out.chunks_exact_mut(BLOCK).zip(self.row_quants(r).chunks_exact(BLOCK)).zip(self.row_scales(r))
        {
            for (o, &q) in out.iter_mut().zip(q) {
                *o = f32::from(q) * s;
            }
        }
    }
}

/// Quantises consecutive blocks of 32 values.
fn quantize_blocks(values: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    for ((x, q), s) in values.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round() as i8;
        }
        *s = d;
    }
}

/// Rows of activations quantised to Q8_0 blocks, ready for [`matmul`],
/// with each block's sum (scale times the sum of its quants) for weights
/// that carry an offset (Q4_1), as ggml's Q8_1.
#[derive(Debug, Default)]
struct QActivations {
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// One row of [`QActivations`].
#[derive(Debug, Clone, Copy)]
struct ActRow<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [f32],
}

impl QActivations {
    fn from_rows(x: &[f32], cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols), "{} values in rows of {cols}", x.len());
        let mut a = Self { cols, quants: vec![0; x.len()], scales: vec![0.0; x.len() / BLOCK], sums: Vec::new() };
        quantize_blocks(x, &mut a.quants, &mut a.scales);
        a.sums = a
            .quants
            .chunks_exact(BLOCK)
            .zip(&a.scales)
            .map(|(q, d)| d * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32)
            .collect();
        a
    }

    fn rows(&self) -> usize {
        self.quants.len() / self.cols
    }

    fn row(&self, t: usize) -> ActRow<'_> {
        let n = self.cols / BLOCK;
        ActRow {
            quants: &self.quants[t * self.cols..(t + 1) * self.cols],
            scales: &self.scales[t * n..(t + 1) * n],
            sums: &self.sums[t * n..(t + 1) * n],
        }
    }
}

/// A matrix in ggml's Q4_1 blocks, as a GGUF stores it: per 32 values an
/// f16 scale `d`, an f16 offset `m` and 16 bytes of 4-bit quants (value
/// `i` in the low nibble of byte `i`, value `16 + i` in its high nibble);
/// each value is `d * q + m`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Q4Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<u8>,
}

/// Bytes per Q4_1 block.
const Q4_1_BYTES: usize = 4 + BLOCK / 2;

impl Q4Matrix {
    fn from_q4_1(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * Q4_1_BYTES {
            return None;
        }
        Some(Self { rows, cols, blocks: bytes.to_vec() })
    }

    /// `other`'s rows below this matrix's (same width: [`Matrix::stack`] checks).
    fn append(&mut self, other: Q4Matrix) {
        self.rows += other.rows;
        self.blocks.extend(other.blocks);
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.cols / BLOCK * Q4_1_BYTES;
        &self.blocks[r * n..(r + 1) * n]
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (out, block) in out.chunks_exact_mut(BLOCK).zip(self.row(r).chunks_exact(Q4_1_BYTES)) {
            let (d, m) = q4_1_scales(block);
            for (i, &byte) in block[4..].iter().enumerate() {
                out[i] = d * f32::from(byte & 0x0F) + m;
                out[i + BLOCK / 2] = d * f32::from(byte >> 4) + m;
            }
        }
    }
}

/// A Q4_1 block's scale and offset.
fn q4_1_scales(block: &[u8]) -> (f32, f32) {
    (half::f16::from_le_bytes([block[0], block[1]]).to_f32(), half::f16::from_le_bytes([block[2], block[3]]).to_f32())
}

/// A weight matrix in one of the block formats the kernels run.
#[derive(Debug, Clone)]
pub(crate) enum Matrix {
    Q8_0(QMatrix),
    Q4_1(Q4Matrix),
}

impl Matrix {
    fn rows(&self) -> usize {
        match self {
            Self::Q8_0(m) => m.rows,
            Self::Q4_1(m) => m.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Self::Q8_0(m) => m.cols,
            Self::Q4_1(m) => m.cols,
        }
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Self::Q8_0(m) => m.dequantize_row(r, out),
            Self::Q4_1(m) => m.dequantize_row(r, out),
        }
    }

    /// Matrices stacked by rows; `None` if they differ in format or width.
    fn stack(parts: Vec<Matrix>) -> Option<Self> {
        let mut parts = parts.into_iter();
        let mut stacked = parts.next()?;
        for part in parts {
            if part.cols() != stacked.cols() {
                return None;
            }
            match (&mut stacked, part) {
                (Self::Q8_0(m), Self::Q8_0(next)) => m.append(next),
                (Self::Q4_1(m), Self::Q4_1(next)) => m.append(next),
                _ => return None,
            }
        }
        Some(stacked)
    }
}

/// A weight format's row-by-activation dot product.
trait RowDot: Sync {
    fn dot(&self, r: usize, x: ActRow<'_>) -> f32;
    /// Row `r` against four activation rows at once.
    fn dot4(&self, r: usize, x: [ActRow<'_>; 4]) -> [f32; 4] {
        x.map(|x| self.dot(r, x))
    }
}

impl RowDot for QMatrix {
    fn dot(&self, r: usize, x: ActRow<'_>) -> f32 {
        kernels::dot_q8(self.row_quants(r), self.row_scales(r), x.quants, x.scales)
    }
}

impl RowDot for Q4Matrix {
    fn dot(&self, r: usize, x: ActRow<'_>) -> f32 {
        kernels::dot_q4_1(self.row(r), x)
    }

    fn dot4(&self, r: usize, x: [ActRow<'_>; 4]) -> [f32; 4] {
        kernels::dot4_q4_1(self.row(r), x)
    }
}

/// `out = x W^T` for `T` rows of `x` (already quantised): `out` is
/// `T x w.rows`, row-major.
fn matmul(x: &QActivations, w: &Matrix, out: &mut [f32]) {
    assert_eq!(x.cols, w.cols(), "matmul of width {} by width {}", x.cols, w.cols());
    match w {
        Matrix::Q8_0(m) => matmul_rows(x, m, w.rows(), out),
        Matrix::Q4_1(m) => matmul_rows(x, m, w.rows(), out),
    }
}

/// [`matmul`] for one weight format. The rows of `W` are split across the
/// current rayon pool's threads, one contiguous piece each.
fn matmul_rows<W: RowDot>(x: &QActivations, w: &W, w_rows: usize, out: &mut [f32]) {
    let tokens = x.rows();
    assert_eq!(out.len(), tokens * w_rows, "matmul output size");
    let threads = rayon::current_num_threads();
    let piece = w_rows.div_ceil(threads).max(16);
    // One weight row at a time against every token, so the row stays in L1.
    let rows = |first: usize, dst: &mut [f32], stride: usize| {
        let last = (first + piece).min(w_rows);
        if tokens == 1 {
            let x = x.row(0);
            for (d, r) in dst.iter_mut().zip(first..last) {
                *d = w.dot(r, x);
            }
            return;
        }
        for (i, r) in (first..last).enumerate() {
            let mut t = 0;
            while t + 4 <= tokens {
                let d = w.dot4(r, [x.row(t), x.row(t + 1), x.row(t + 2), x.row(t + 3)]);
                for (j, d) in d.into_iter().enumerate() {
                    dst[(t + j) * stride + i] = d;
                }
                t += 4;
            }
            for t in t..tokens {
                dst[t * stride + i] = w.dot(r, x.row(t));
            }
        }
    };
    if tokens == 1 {
        if threads == 1 {
            rows(0, out, 1);
        } else {
            out.par_chunks_mut(piece).enumerate().for_each(|(p, dst)| rows(p * piece, dst, 1));
        }
        return;
    }
    // Several tokens: each piece fills its own (tokens x piece) block, then
    // the blocks are copied into place.
    let pieces = w_rows.div_ceil(piece);
    let blocks: Vec<Vec<f32>> = (0..pieces)
        .into_par_iter()
        .map(|p| {
            let mut dst = vec![0f32; tokens * piece];
            rows(p * piece, &mut dst, piece);
            dst
        })
        .collect();
    for (p, block) in blocks.iter().enumerate() {
        let first = p * piece;
        let n = piece.min(w_rows - first);
        for t in 0..tokens {
            out[t * w_rows + first..t * w_rows + first + n].copy_from_slice(&block[t * piece..t * piece + n]);
        }
    }
}

/// One transformer layer's weights.
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections, stacked.
    qkv: Matrix,
    /// Their biases, stacked the same way (qwen2 has them, llama not).
    qkv_bias: Option<Vec<f32>>,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    /// Gate and up projections, stacked.
    gate_up: Matrix,
    down: Matrix,
}

/// A llama model's weights, ready for [`Llama::forward`].
#[derive(Debug)]
pub(crate) struct Llama {
    config: Config,
    embedding: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None`: the output projection is the embedding (tied weights).
    output: Option<Matrix>,
}

/// Why [`Llama::load`] did not load a GGUF.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// The file has something this module does not run (the reason):
    /// candle's model should run it instead.
    Unsupported(String),
    /// The file could not be read.
    Read(candle_core::Error),
}

impl From<candle_core::Error> for LoadError {
    fn from(e: candle_core::Error) -> Self {
        Self::Read(e)
    }
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError::Unsupported(why.into()))
}

impl Llama {
    /// Reads a llama or qwen2 GGUF's weights. Q8_0 and Q4_1 matrices are
    /// taken as they are, Q4_1 converted to Q8_0 when `convert_q4_1`, Q5_0
    /// losslessly to Q8_0; any other type candle can dequantize (the
    /// K-quants, f16...) is requantized to Q8_0.
    pub(crate) fn load<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        convert_q4_1: bool,
    ) -> Result<Self, LoadError> {
        let md = |key: &str| content.metadata.get(key);
        let arch = md("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let rope_style = match arch.as_str() {
            "llama" => RopeStyle::Adjacent,
            "qwen2" => RopeStyle::Halves,
            other => return unsupported(format!("architecture {other:?}")),
        };
        let key = |name: &str| format!("{arch}.{name}");
        let get_u32 = |name: &str| md(&key(name)).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
        let (Some(heads), Some(kv_heads), Some(layers), Some(dim)) = (
            get_u32("attention.head_count"),
            get_u32("attention.head_count_kv"),
            get_u32("block_count"),
            get_u32("embedding_length"),
        ) else {
            return unsupported(format!("missing {arch} shape metadata"));
        };
        if get_u32("expert_count").unwrap_or(0) > 0 {
            return unsupported("mixture of experts");
        }
        if heads == 0 || kv_heads == 0 || !dim.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return unsupported(format!("{heads} heads, {kv_heads} key/value heads, width {dim}"));
        }
        let head_dim = dim / heads;
        let rope_dim = get_u32("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim || !head_dim.is_multiple_of(2) {
            return unsupported(format!("rotary width {rope_dim} for heads of {head_dim}"));
        }
        let base = md(&key("rope.freq_base")).and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0);
        let eps = md(&key("attention.layer_norm_rms_epsilon")).and_then(|v| v.to_f32().ok()).unwrap_or(1e-5);
        // As candle and llama.cpp compute them, in f32.
        let inv_freq = (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();

        let cpu = Device::Cpu;
        let matrix = |reader: &mut R, name: &str| -> Result<Matrix, LoadError> {
            let Some(info) = content.tensor_infos.get(name) else {
                return unsupported(format!("no tensor {name}"));
            };
            let dims = info.shape.dims();
            let &[rows, cols] = dims else {
                return unsupported(format!("{name} has shape {dims:?}"));
            };
            if !cols.is_multiple_of(BLOCK) {
                return unsupported(format!("{name} is {cols} wide"));
            }
            let tensor = content.tensor(reader, name, &cpu)?;
            let matrix = match tensor.dtype() {
                GgmlDType::Q8_0 => QMatrix::from_q8_0(&tensor.data()?, rows, cols).map(Matrix::Q8_0),
                GgmlDType::Q5_0 => QMatrix::from_q5_0(&tensor.data()?, rows, cols).map(Matrix::Q8_0),
                GgmlDType::Q4_1 if convert_q4_1 => {
                    let values = tensor.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
                    Some(Matrix::Q8_0(QMatrix::quantize(&values, rows, cols)))
                }
                GgmlDType::Q4_1 => Q4Matrix::from_q4_1(&tensor.data()?, rows, cols).map(Matrix::Q4_1),
                _ => {
                    let values = tensor.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
                    Some(Matrix::Q8_0(QMatrix::quantize(&values, rows, cols)))
                }
            };
            matrix.map_or_else(|| unsupported(format!("{name}: data of the wrong size")), Ok)
        };
        let embedding = matrix(reader, "token_embd.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            Some(matrix(reader, "output.weight")?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(layers);
        for l in 0..layers {
            let p = format!("blk.{l}");
            let q = matrix(reader, &format!("{p}.attn_q.weight"))?;
            let k = matrix(reader, &format!("{p}.attn_k.weight"))?;
            let v = matrix(reader, &format!("{p}.attn_v.weight"))?;
            let wo = matrix(reader, &format!("{p}.attn_output.weight"))?;
            let gate = matrix(reader, &format!("{p}.ffn_gate.weight"))?;
            let up = matrix(reader, &format!("{p}.ffn_up.weight"))?;
            let down = matrix(reader, &format!("{p}.ffn_down.weight"))?;
            let kv_dim = kv_heads * head_dim;
            let ffn = gate.rows();
            let shapes_ok = q.rows() == dim
                && k.rows() == kv_dim
                && v.rows() == kv_dim
                && [&q, &k, &v, &gate, &up].iter().all(|m| m.cols() == dim)
                && (wo.rows(), wo.cols()) == (dim, dim)
                && (up.rows(), down.rows(), down.cols()) == (ffn, dim, ffn);
            if !shapes_ok {
                return unsupported(format!("layer {l} has unexpected shapes"));
            }
            let (Some(qkv), Some(gate_up)) = (Matrix::stack(vec![q, k, v]), Matrix::stack(vec![gate, up])) else {
                return unsupported(format!("layer {l} mixes weight formats"));
            };
            let bias = |reader: &mut R, which: &str, len: usize| -> candle_core::Result<Option<Vec<f32>>> {
                let name = format!("{p}.attn_{which}.bias");
                content.tensor_infos.contains_key(&name).then(|| vector(content, reader, &name, len)).transpose()
            };
            let qkv_bias = match (bias(reader, "q", dim)?, bias(reader, "k", kv_dim)?, bias(reader, "v", kv_dim)?) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v].concat()),
                (None, None, None) => None,
                _ => return unsupported(format!("layer {l} has biases on some of query, key and value only")),
            };
            blocks.push(Layer {
                attn_norm: vector(content, reader, &format!("{p}.attn_norm.weight"), dim)?,
                qkv,
                qkv_bias,
                wo,
                ffn_norm: vector(content, reader, &format!("{p}.ffn_norm.weight"), dim)?,
                gate_up,
                down,
            });
        }
        let ffn = blocks.first().map_or(0, |l| l.down.cols());
        let vocab = output.as_ref().unwrap_or(&embedding).rows();
        if embedding.cols() != dim || output.as_ref().is_some_and(|o| o.cols() != dim) || embedding.rows() != vocab {
            return unsupported("embedding and output shapes disagree");
        }
        let config = Config { dim, heads, kv_heads, head_dim, ffn, vocab, eps, inv_freq, rope: rope_style };
        let norm = vector(content, reader, "output_norm.weight", dim)?;
        Ok(Self { config, embedding, layers: blocks, norm, output })
    }

    /// An empty KV cache for one sequence.
    pub(crate) fn cache(&self) -> KvCache {
        KvCache { keys: vec![Vec::new(); self.layers.len()], values: vec![Vec::new(); self.layers.len()], len: 0 }
    }

    /// Runs `ids` at the positions after those in `cache`, appends their keys
    /// and values to it, and returns the logits after the last token.
    pub(crate) fn forward(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        if rayon::current_thread_index().is_none() {
            // Called from outside a rayon pool: move into the current one
            // first. Otherwise each of the ~120 parallel matrix products a
            // token needs hands its pieces to the pool's threads and puts
            // this thread to sleep until they finish (two wake-ups each;
            // measured: 2-thread decode 120 -> 170 tokens/s).
            return rayon::scope(|_| self.forward_in_pool(ids, cache));
        }
        self.forward_in_pool(ids, cache)
    }

    fn forward_in_pool(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        let c = &self.config;
        let tokens = ids.len();
        let start = cache.len;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({})", c.vocab);
        }
        let mut x = vec![0f32; tokens * c.dim];
        for (row, &id) in x.chunks_exact_mut(c.dim).zip(ids) {
            self.embedding.dequantize_row(id as usize, row);
        }
        // Rotations of each new position, shared by every layer and head.
        let (cos, sin) = rotations(&c.inv_freq, start, tokens);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_width = q_dim + 2 * kv_dim;
        let mut normed = vec![0f32; tokens * c.dim];
        let mut qkv = vec![0f32; tokens * qkv_width];
        let mut attended = vec![0f32; tokens * q_dim];
        let mut projected = vec![0f32; tokens * c.dim];
        let mut gate_up = vec![0f32; tokens * 2 * c.ffn];
        let mut hidden = vec![0f32; tokens * c.ffn];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.eps, &mut normed);
            matmul(&QActivations::from_rows(&normed, c.dim), &layer.qkv, &mut qkv);
            let (keys, values) = (&mut cache.keys[l], &mut cache.values[l]);
            for (t, row) in qkv.chunks_exact_mut(qkv_width).enumerate() {
                if let Some(bias) = &layer.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
                let (q, kv) = row.split_at_mut(q_dim);
                let (k, v) = kv.split_at_mut(kv_dim);
                let (cos, sin) = (
                    &cos[t * c.inv_freq.len()..][..c.inv_freq.len()],
                    &sin[t * c.inv_freq.len()..][..c.inv_freq.len()],
                );
                q.chunks_exact_mut(c.head_dim).for_each(|h| rope(c.rope, h, cos, sin));
                k.chunks_exact_mut(c.head_dim).for_each(|h| rope(c.rope, h, cos, sin));
                push_kv(keys, values, start + t, c.head_dim, k, v);
            }
            attention(c, &qkv, keys, values, start, &mut attended);
            matmul(&QActivations::from_rows(&attended, q_dim), &layer.wo, &mut projected);
            x.iter_mut().zip(&projected).for_each(|(x, p)| *x += p);

            rms_norm(&x, &layer.ffn_norm, c.eps, &mut normed);
            matmul(&QActivations::from_rows(&normed, c.dim), &layer.gate_up, &mut gate_up);
            for (h, gu) in hidden.chunks_exact_mut(c.ffn).zip(gate_up.chunks_exact(2 * c.ffn)) {
                let (g, u) = gu.split_at(c.ffn);
                for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                    *h = g / (1.0 + exp(-g)) * u;
                }
            }
            matmul(&QActivations::from_rows(&hidden, c.ffn), &layer.down, &mut projected);
            x.iter_mut().zip(&projected).for_each(|(x, p)| *x += p);
        }
        cache.len += tokens;
        let last = &x[(tokens - 1) * c.dim..];
        let mut normed = vec![0f32; c.dim];
        rms_norm(last, &self.norm, c.eps, &mut normed);
        let mut logits = vec![0f32; c.vocab];
        matmul(&QActivations::from_rows(&normed, c.dim), self.output.as_ref().unwrap_or(&self.embedding), &mut logits);
        Ok(logits)
    }
}

/// A 1-D f32 tensor of `len` values.
fn vector<R: Read + Seek>(content: &Content, reader: &mut R, name: &str, len: usize) -> candle_core::Result<Vec<f32>> {
    let values = content.tensor(reader, name, &Device::Cpu)?.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
    let values = values.flatten_all()?.to_vec1::<f32>()?;
    if values.len() != len {
        candle_core::bail!("{name} has {} values, expected {len}", values.len());
    }
    Ok(values)
}

/// Keys and values of the positions seen so far, per layer, in blocks of
/// [`KV_BLOCK`] positions (see [`push_kv`]). Grows in place. Held as f16,
/// as llama.cpp holds its cache by default: at long contexts attention is
/// bound by reading the cache (47 MB per token at 1,024 positions in f32
/// for SmolLM2-135M), and f16 halves that.
#[derive(Debug, Clone)]
pub(crate) struct KvCache {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    len: usize,
}

/// Positions per block of the KV cache.
const KV_BLOCK: usize = 64;

/// Stores the key and value of `position` (each `kv heads x head_dim`) in a
/// layer's cache. Each block of [`KV_BLOCK`] positions keeps one contiguous
/// run per key/value head, so attention streams through memory in order:
/// keys transposed, `[block][kv head][head dim][position in block]` (a
/// query's scores against a block are then lane-wise sums of contiguous
/// rows, no horizontal sums), values `[block][kv head][position in
/// block][head dim]`. A block is allocated, zeroed, when its first position
/// arrives.
fn push_kv(keys: &mut Vec<f16>, values: &mut Vec<f16>, position: usize, head_dim: usize, key: &[f32], value: &[f32]) {
    let block_len = KV_BLOCK * key.len();
    let (base, lane) = (position / KV_BLOCK * block_len, position % KV_BLOCK);
    if keys.len() < base + block_len {
        keys.resize(base + block_len, f16::ZERO);
        values.resize(base + block_len, f16::ZERO);
    }
    for (row, &k) in keys[base..][..block_len].chunks_exact_mut(KV_BLOCK).zip(key) {
        row[lane] = f16::from_f32(k);
    }
    let head_len = KV_BLOCK * head_dim;
    for (head, v) in values[base..][..block_len].chunks_exact_mut(head_len).zip(value.chunks_exact(head_dim)) {
        head[lane * head_dim..][..head_dim].convert_from_f32_slice(v);
    }
}

/// `x / rms(x) * weight`, row by row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = dot(x, x) / n as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = x * scale * w;
        }
    }
}

/// cos and sin of each new position's angles: `tokens x pairs` each.
fn rotations(inv_freq: &[f32], start: usize, tokens: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(tokens * inv_freq.len());
    let mut sin = Vec::with_capacity(tokens * inv_freq.len());
    for p in start..start + tokens {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Rotary embedding of one head: pair `i` (angle `cos[i]`, `sin[i]`) is
/// dimensions `2i, 2i + 1` or `i, i + head_dim / 2`, by `style`.
fn rope(style: RopeStyle, head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let turn = |a: f32, b: f32, c: f32, s: f32| (a * c - b * s, a * s + b * c);
    match style {
        RopeStyle::Adjacent => {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                (pair[0], pair[1]) = turn(pair[0], pair[1], c, s);
            }
        }
        RopeStyle::Halves => {
            let (first, second) = head.split_at_mut(head.len() / 2);
            for (((a, b), &c), &s) in first.iter_mut().zip(second).zip(cos).zip(sin) {
                (*a, *b) = turn(*a, *b, c, s);
            }
        }
    }
}

/// Causal attention of the new tokens' queries (in `qkv`, `tokens` rows)
/// over every cached position up to their own, into `out` (`tokens x
/// q_dim`). Query heads share key/value heads in groups; one piece of work
/// is a token's group, so each cached key and value row is fetched once for
/// all the heads that read it.
fn attention(c: &Config, qkv: &[f32], keys: &[f16], values: &[f16], start: usize, out: &mut [f32]) {
    let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let width = q_dim + 2 * kv_dim;
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let block_of = |cache, b, g| head_block(cache, b, g, hd, kv_dim);
    let one = |i: usize, out: &mut [f32], scores: &mut Vec<f32>| {
        let (t, g) = (i / c.kv_heads, i % c.kv_heads);
        let queries = &qkv[t * width + g * group * hd..][..group * hd];
        let seen = start + t + 1;
        // Scores of head j against position p at [j * padded + p], whole
        // key blocks at a time (the last one's extra lanes are not read).
        let blocks = seen.div_ceil(KV_BLOCK);
        let padded = blocks * KV_BLOCK;
        scores.clear();
        scores.resize(group * padded, 0.0);
        for (q, scores) in queries.chunks_exact(hd).zip(scores.chunks_exact_mut(padded)) {
            for (b, scores) in scores.chunks_exact_mut(KV_BLOCK).enumerate() {
                block_scores(q, block_of(keys, b, g), scale, scores);
            }
        }
        for (weights, out) in scores.chunks_exact_mut(padded).zip(out.chunks_exact_mut(hd)) {
            let weights = &mut weights[..seen];
            softmax_in_place(weights);
            weighted_values(weights, |b| block_of(values, b, g), out);
        }
    };
    let tokens = qkv.len() / width;
    let work = tokens * (start + tokens) * c.heads * hd;
    // Worth a parallel region from about 64 cached positions on.
    if rayon::current_num_threads() > 1 && work > 1 << 15 {
        out.par_chunks_mut(group * hd).enumerate().for_each_init(Vec::new, |scores, (i, o)| one(i, o, scores));
    } else {
        let mut scores = Vec::new();
        out.chunks_mut(group * hd).enumerate().for_each(|(i, o)| one(i, o, &mut scores));
    }
}

/// Key/value head `g`'s part of block `b` of a layer's keys or values.
fn head_block(cache: &[f16], b: usize, g: usize, head_dim: usize, kv_dim: usize) -> &[f16] {
    &cache[(b * kv_dim + g * head_dim) * KV_BLOCK..][..head_dim * KV_BLOCK]
}

/// A query's scaled scores against one block of keys (`[head dim][position
/// in block]`): `out[i] = scale * sum_d q[d] * block[d][i]`, the sums in
/// registers.
fn block_scores(q: &[f32], block: &[f16], scale: f32, out: &mut [f32]) {
    let mut acc = [0f32; KV_BLOCK];
    let mut row = [0f32; KV_BLOCK];
    for (&q, half_row) in q.iter().zip(block.chunks_exact(KV_BLOCK)) {
        half_row.convert_to_f32_slice(&mut row);
        for i in 0..KV_BLOCK {
            acc[i] = q.mul_add(row[i], acc[i]);
        }
    }
    out.iter_mut().zip(acc).for_each(|(o, a)| *o = a * scale);
}

/// `out = sum_p weights[p] * value(p)`, where the values of positions
/// `KV_BLOCK * b..` are the rows (`out.len()` wide) of `block(b)`. The sums
/// stay in registers, 64 columns at a time, instead of going through memory
/// once per position.
fn weighted_values<'a>(weights: &[f32], block: impl Fn(usize) -> &'a [f16], out: &mut [f32]) {
    const COLS: usize = 64;
    let width = out.len();
    let mut wide = [0f32; COLS];
    for (c, out) in out.chunks_mut(COLS).enumerate() {
        if let Ok(out) = <&mut [f32; COLS]>::try_from(&mut *out) {
            let mut acc = [0f32; COLS];
            for (b, weights) in weights.chunks(KV_BLOCK).enumerate() {
                for (&w, row) in weights.iter().zip(block(b).chunks_exact(width)) {
                    row[c * COLS..][..COLS].convert_to_f32_slice(&mut wide);
                    let row = &wide;
                    for i in 0..COLS {
                        acc[i] = w.mul_add(row[i], acc[i]);
                    }
                }
            }
            *out = acc;
        } else {
            out.fill(0.0);
            for (b, weights) in weights.chunks(KV_BLOCK).enumerate() {
                for (&w, row) in weights.iter().zip(block(b).chunks_exact(width)) {
                    let row = &row[c * COLS..][..out.len()];
                    out.iter_mut().zip(row).for_each(|(o, &r)| *o = w.mul_add(r.to_f32(), *o));
                }
            }
        }
    }
}

/// f32 dot product in eight lanes (so the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The Q8_0 dot product: `sum_b wd[b] * ad[b] * sum_i wq[32b+i] * aq[32b+i]`.
mod kernels {
    /// Portable version, and the reference the SIMD one is tested against.
    #[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"), allow(dead_code))]
    pub(super) fn dot_q8_portable(wq: &[i8], ws: &[f32], aq: &[i8], a_s: &[f32]) -> f32 {
        let mut sum = 0f32;
        for (((w, a), ws), a_s) in wq.chunks_exact(super::BLOCK).zip(aq.chunks_exact(super::BLOCK)).zip(ws).zip(a_s) {
            let int: i32 = w.iter().zip(a).map(|(&w, &a)| i32::from(w) * i32::from(a)).sum();
            sum += ws * a_s * int as f32;
        }
        sum
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    pub(super) use dot_q8_portable as dot_q8;

    /// Q4_1 weights by Q8 activations: per block `d * d_a * sum(q * a) +
    /// m * sum_a`. Portable version, and the SIMD one's reference.
    #[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"), allow(dead_code))]
    pub(super) fn dot_q4_1_portable(w: &[u8], x: super::ActRow<'_>) -> f32 {
        const B: usize = super::BLOCK;
        let mut sum = 0f32;
        for (((block, a), a_d), a_sum) in
            w.chunks_exact(super::Q4_1_BYTES).zip(x.quants.chunks_exact(B)).zip(x.scales).zip(x.sums)
        {
            let (d, m) = super::q4_1_scales(block);
            let mut int = 0i32;
            for (i, &byte) in block[4..].iter().enumerate() {
                int += i32::from(byte & 0x0F) * i32::from(a[i]) + i32::from(byte >> 4) * i32::from(a[i + B / 2]);
            }
            sum += d * a_d * int as f32 + m * a_sum;
        }
        sum
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    pub(super) use dot_q4_1_portable as dot_q4_1;

    /// AVX2: the nibbles unpacked to 32 unsigned bytes (`maddubs` needs no
    /// sign trick: 15 * 127 * 2 fits in i16), offsets added in scalar.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    pub(super) fn dot_q4_1(w: &[u8], x: super::ActRow<'_>) -> f32 {
        use std::arch::x86_64::*;
        const B: usize = super::BLOCK;
        const BYTES: usize = super::Q4_1_BYTES;
        let blocks = x.scales.len();
        assert!(
            w.len() == blocks * BYTES && x.quants.len() == blocks * B && x.sums.len() == blocks,
            "dot_q4_1 operand sizes"
        );
        let mut offsets = 0f32;
        // SAFETY: the build enables AVX2 and FMA (cfg above); block `b <
        // blocks` reads bytes 4..20 of `w[b * 20..]` and 32 bytes of
        // `x.quants[b * 32..]`, inside the slices checked above; unaligned
        // loads are used.
        #[allow(unsafe_code)]
        let acc = unsafe {
            let ones = _mm256_set1_epi16(1);
            let low = _mm_set1_epi8(0x0F);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            for b in 0..blocks {
                let block = &w[b * BYTES..(b + 1) * BYTES];
                let (d, m) = super::q4_1_scales(block);
                offsets += m * x.sums[b];
                let bytes = _mm_loadu_si128(block.as_ptr().add(4).cast::<__m128i>());
                let q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
                let a = _mm256_loadu_si256(x.quants.as_ptr().add(b * B).cast::<__m256i>());
                let ints = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones));
                let scale = _mm256_set1_ps(d * x.scales[b]);
                if b % 2 == 0 {
                    acc0 = _mm256_fmadd_ps(scale, ints, acc0);
                } else {
                    acc1 = _mm256_fmadd_ps(scale, ints, acc1);
                }
            }
            hsum(_mm256_add_ps(acc0, acc1))
        };
        acc + offsets
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    pub(super) fn dot4_q4_1(w: &[u8], x: [super::ActRow<'_>; 4]) -> [f32; 4] {
        x.map(|x| dot_q4_1(w, x))
    }

    /// [`dot_q4_1`] for four activation rows: each block unpacked once.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    pub(super) fn dot4_q4_1(w: &[u8], x: [super::ActRow<'_>; 4]) -> [f32; 4] {
        use std::arch::x86_64::*;
        const B: usize = super::BLOCK;
        const BYTES: usize = super::Q4_1_BYTES;
        let blocks = w.len() / BYTES;
        assert!(
            w.len() == blocks * BYTES
                && x.iter().all(|x| x.quants.len() == blocks * B && x.scales.len() == blocks && x.sums.len() == blocks),
            "dot4_q4_1 operand sizes"
        );
        let mut offsets = [0f32; 4];
        // SAFETY: as in `dot_q4_1`: AVX2 and FMA are enabled; block `b <
        // blocks` reads inside `w` and inside each of the four rows, whose
        // lengths are checked above.
        #[allow(unsafe_code)]
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let low = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..blocks {
                let block = &w[b * BYTES..(b + 1) * BYTES];
                let (d, m) = super::q4_1_scales(block);
                let bytes = _mm_loadu_si128(block.as_ptr().add(4).cast::<__m128i>());
                let q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
                for j in 0..4 {
                    offsets[j] += m * x[j].sums[b];
                    let a = _mm256_loadu_si256(x[j].quants.as_ptr().add(b * B).cast::<__m256i>());
                    let ints = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones));
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[j].scales[b]), ints, acc[j]);
                }
            }
            [hsum(acc[0]) + offsets[0], hsum(acc[1]) + offsets[1], hsum(acc[2]) + offsets[2], hsum(acc[3]) + offsets[3]]
        }
    }

    /// The sum of a vector's eight lanes.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[target_feature(enable = "avx2")]
    fn hsum(v: std::arch::x86_64::__m256) -> f32 {
        use std::arch::x86_64::*;
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)))
    }

    /// AVX2: per block, |w| times a with w's sign (`maddubs` multiplies
    /// unsigned by signed bytes), pairs summed to i32, scaled in f32.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    pub(super) fn dot_q8(wq: &[i8], ws: &[f32], aq: &[i8], a_s: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        const B: usize = super::BLOCK;
        let blocks = ws.len();
        assert!(wq.len() == blocks * B && aq.len() == blocks * B && a_s.len() == blocks, "dot_q8 operand sizes");
        // SAFETY: the build enables AVX2 and FMA (cfg above); every load
        // reads 32 bytes at block `b < blocks` of slices checked above to
        // hold `blocks * 32` bytes; unaligned loads are used.
        #[allow(unsafe_code)]
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let block = |b: usize| {
                let w = _mm256_loadu_si256(wq.as_ptr().add(b * B).cast::<__m256i>());
                let a = _mm256_loadu_si256(aq.as_ptr().add(b * B).cast::<__m256i>());
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
                _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones))
            };
            let mut b = 0;
            while b + 1 < blocks {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[b] * a_s[b]), block(b), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(ws[b + 1] * a_s[b + 1]), block(b + 1), acc1);
                b += 2;
            }
            if b < blocks {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[b] * a_s[b]), block(b), acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::pseudo_random;

    #[test]
    fn simd_dot_matches_portable_dot_including_extreme_quants() {
        for blocks in [1, 2, 3, 18, 48] {
            let w = pseudo_random(blocks * BLOCK, blocks as u64);
            let a = pseudo_random(blocks * BLOCK, 99);
            let mut m = QMatrix::quantize(&w, 1, blocks * BLOCK);
            // A file may hold -128, which ggml never writes: still exact.
            m.quants[0] = -128;
            m.quants[blocks * BLOCK - 1] = 127;
            let x = QActivations::from_rows(&a, blocks * BLOCK);
            let row = x.row(0);
            let simd = kernels::dot_q8(m.row_quants(0), m.row_scales(0), row.quants, row.scales);
            let portable = kernels::dot_q8_portable(m.row_quants(0), m.row_scales(0), row.quants, row.scales);
            assert!((simd - portable).abs() <= 1e-4 * portable.abs().max(1.0), "{blocks} blocks: {simd} vs {portable}");

            let q4 = q4_1(&w, 1, blocks * BLOCK);
            let four = kernels::dot4_q4_1(q4.row(0), [row; 4]);
            assert!(four.iter().all(|&f| f == four[0]), "{four:?}");
            let simd = kernels::dot_q4_1(q4.row(0), row);
            assert!((four[0] - simd).abs() <= 1e-4 * simd.abs().max(1.0), "{four:?} vs {simd}");
            let portable = kernels::dot_q4_1_portable(q4.row(0), row);
            assert!(
                (simd - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                "Q4_1, {blocks} blocks: {simd} vs {portable}"
            );
        }
    }

    /// Q4_1 blocks as ggml makes them: `d = (max - min) / 15`, `m = min`.
    fn q4_1(values: &[f32], rows: usize, cols: usize) -> Q4Matrix {
        let mut bytes = Vec::new();
        for x in values.chunks_exact(BLOCK) {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let q = |v: f32| if d > 0.0 { ((v - min) / d).round().clamp(0.0, 15.0) as u8 } else { 0 };
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            bytes.extend(half::f16::from_f32(min).to_le_bytes());
            bytes.extend((0..BLOCK / 2).map(|i| q(x[i]) | (q(x[i + BLOCK / 2]) << 4)));
        }
        Q4Matrix::from_q4_1(&bytes, rows, cols).unwrap()
    }

    #[test]
    fn quantized_matmul_equals_the_product_of_its_dequantized_operands() {
        let (rows, cols) = (45, 96);
        let values = pseudo_random(rows * cols, 7);
        for m in [Matrix::Q8_0(QMatrix::quantize(&values, rows, cols)), Matrix::Q4_1(q4_1(&values, rows, cols))] {
            let mut w = vec![0f32; rows * cols];
            w.chunks_exact_mut(cols).enumerate().for_each(|(r, row)| m.dequantize_row(r, row));
            // Dequantised Q4_1 is within half a step of the values.
            assert!(w.iter().zip(&values).all(|(w, v)| (w - v).abs() < 0.07), "{m:?}");
            for tokens in [1, 5, 9] {
                let x = QActivations::from_rows(&pseudo_random(tokens * cols, 3), cols);
                let mut out = vec![0f32; tokens * rows];
                matmul(&x, &m, &mut out);
                for t in 0..tokens {
                    let row = x.row(t);
                    let a: Vec<f32> =
                        row.quants.iter().enumerate().map(|(i, &q)| f32::from(q) * row.scales[i / BLOCK]).collect();
                    for r in 0..rows {
                        let exact = dot(&a, &w[r * cols..][..cols]);
                        let got = out[t * rows + r];
                        assert!((got - exact).abs() < 1e-4, "token {t} row {r}: {got} vs {exact}");
                    }
                }
            }
        }
    }

    #[test]
    fn stacking_keeps_rows_in_order_and_refuses_mixed_formats() {
        let a = QMatrix::quantize(&pseudo_random(64, 1), 2, 32);
        let b = QMatrix::quantize(&pseudo_random(32, 2), 1, 32);
        let Some(Matrix::Q8_0(stacked)) = Matrix::stack(vec![Matrix::Q8_0(a.clone()), Matrix::Q8_0(b.clone())]) else {
            panic!("not stacked");
        };
        assert_eq!((stacked.rows, stacked.cols), (3, 32));
        assert_eq!(stacked.row_quants(2), b.row_quants(0));
        assert_eq!(stacked.row_scales(1), a.row_scales(1));
        let q4 = q4_1(&pseudo_random(32, 3), 1, 32);
        assert!(Matrix::stack(vec![Matrix::Q8_0(a), Matrix::Q4_1(q4)]).is_none());
    }

    #[test]
    fn q8_0_bytes_load_as_ggml_lays_them_out() {
        // One block: scale 0.5 as f16, quants 0..32 with the first negative.
        let mut bytes = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        bytes.extend((0..32).map(|i: i8| if i == 0 { -3i8 as u8 } else { i as u8 }));
        let m = QMatrix::from_q8_0(&bytes, 1, 32).unwrap();
        let mut row = vec![0f32; 32];
        m.dequantize_row(0, &mut row);
        assert_eq!(row[0], -1.5);
        assert_eq!(row[31], 15.5);
        assert!(QMatrix::from_q8_0(&bytes[..33], 1, 32).is_none());
    }

    #[test]
    fn q5_0_converts_to_q8_0_without_loss() {
        let (rows, cols) = (3, 64);
        let values: Vec<f32> = pseudo_random(rows * cols, 11).iter().map(|x| x * 4.0).collect();
        let tensor = candle_core::Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q5 = candle_core::quantized::QTensor::quantize(&tensor, GgmlDType::Q5_0).unwrap();
        let expected = q5.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let m = QMatrix::from_q5_0(&q5.data().unwrap(), rows, cols).unwrap();
        let mut row = vec![0f32; cols];
        for (r, expected) in expected.iter().enumerate() {
            m.dequantize_row(r, &mut row);
            assert_eq!(&row, expected, "row {r}");
        }
        assert!(QMatrix::from_q5_0(&q5.data().unwrap()[1..], rows, cols).is_none());
    }

    #[test]
    fn rope_rotates_adjacent_pairs_or_halves() {
        let quarter_turn = std::f32::consts::FRAC_PI_2;
        let (cos, sin) = ([quarter_turn.cos(), 1.0], [quarter_turn.sin(), 0.0]);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-6);
        // Pair 0 turns a quarter, pair 1 not at all.
        let mut head = vec![1.0, 0.0, 0.0, 1.0];
        rope(RopeStyle::Adjacent, &mut head, &cos, &sin);
        assert!(close(&head, &[0.0, 1.0, 0.0, 1.0]), "{head:?}");
        // Pair 0 is dimensions 0 and 2.
        let mut head = vec![1.0, 0.0, 0.0, 1.0];
        rope(RopeStyle::Halves, &mut head, &cos, &sin);
        assert!(close(&head, &[0.0, 0.0, 1.0, 1.0]), "{head:?}");
    }

    /// Attention written out plainly: every head on its own, in f64.
    fn attention_reference(c: &Config, qkv: &[f32], keys: &[f32], values: &[f32], start: usize) -> Vec<f32> {
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let width = q_dim + 2 * kv_dim;
        let tokens = qkv.len() / width;
        let mut out = vec![0f32; tokens * q_dim];
        for t in 0..tokens {
            for h in 0..c.heads {
                let g = h / (c.heads / c.kv_heads);
                let q = &qkv[t * width + h * hd..][..hd];
                let seen = start + t + 1;
                let scores: Vec<f64> = (0..seen)
                    .map(|p| {
                        let k = &keys[p * kv_dim + g * hd..][..hd];
                        q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let v: f64 =
                        (0..seen).map(|p| weights[p] / total * f64::from(values[p * kv_dim + g * hd + d])).sum();
                    out[t * q_dim + h * hd + d] = v as f32;
                }
            }
        }
        out
    }

    #[test]
    fn grouped_attention_equals_attention_head_by_head() {
        // Head widths below, at and above the 64-column register block;
        // one, several and all query heads per key/value head; one new
        // token after a cache and several at once.
        for (heads, kv_heads, head_dim) in [(6, 2, 64), (4, 4, 40), (8, 1, 96), (3, 3, 128)] {
            for (start, tokens) in [(0, 1), (37, 1), (63, 1), (64, 1), (90, 5), (0, 7), (120, 20)] {
                let c = Config {
                    dim: heads * head_dim,
                    heads,
                    kv_heads,
                    head_dim,
                    ffn: 0,
                    vocab: 0,
                    eps: 0.0,
                    inv_freq: Vec::new(),
                    rope: RopeStyle::Adjacent,
                };
                let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
                let width = q_dim + 2 * kv_dim;
                let qkv: Vec<f32> = pseudo_random(tokens * width, 3).iter().map(|x| x * 3.0).collect();
                let keys = pseudo_random((start + tokens) * kv_dim, 5);
                let values = pseudo_random((start + tokens) * kv_dim, 7);
                // The cache holds f16, as llama.cpp's does by default.
                let f16_round =
                    |xs: Vec<f32>| -> Vec<f32> { xs.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() };
                let (keys, values) = (f16_round(keys), f16_round(values));
                let expected = attention_reference(&c, &qkv, &keys, &values, start);
                let (mut cached_keys, mut cached_values) = (Vec::new(), Vec::new());
                for (p, (k, v)) in keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim)).enumerate() {
                    push_kv(&mut cached_keys, &mut cached_values, p, head_dim, k, v);
                }
                let (keys, values) = (cached_keys, cached_values);
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut out = vec![f32::NAN; tokens * q_dim];
                    pool.install(|| attention(&c, &qkv, &keys, &values, start, &mut out));
                    let worst = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(
                        worst < 1e-5,
                        "{heads}/{kv_heads} heads of {head_dim}, {tokens} after {start}: off by {worst}"
                    );
                }
            }
        }
    }
}
