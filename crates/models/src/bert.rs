//! A BERT encoder for sentence embeddings: the same computation as
//! Hugging Face's `BertModel` (and candle-transformers'), arranged for
//! speed on the CPU.
//!
//! Where the time went with candle-transformers' BERT (perf, batch 32 of
//! short texts, one thread): 19% in the exact GELU, whose `erf` is libm's
//! scalar `erff` (with an `expf` inside); softmax composed of five tensor
//! passes. Here GELU is one pass with a branch-free rational `erf` that the
//! compiler vectorises (within 1e-6 of libm's), softmax is one pass per row
//! of one text's scores, and the attention scale is folded into the query
//! weights at load. Dense layers on the CPU run on the packed kernels of
//! `dense.rs` (chosen for the CPU at run time), into an output already
//! holding the bias (and the residual, where one follows): no zero-filled
//! output, no separate passes for the additions. The query, key and value
//! projections are one product, and attention runs one (text, head) pair
//! per job, so a single long text uses every thread.
//!
//! On the CPU, [`Bert::forward_packed`] runs a batch without padding:
//! texts back to back, every per-token operation on real tokens only,
//! attention within each text, layer norms in place. The padded
//! [`Bert::forward`] is plain candle, for other devices (and the tests'
//! reference).

use candle_core::{CpuStorage, DType, Device, Layout, Module, Storage, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use crate::dense::{Disjoint, Packed};
use crate::math::{softmax_rows, sum_lanes};
use crate::simd::{Isa, multiversion};

/// The encoder; `forward` returns the last hidden states.
#[derive(Debug)]
pub struct Bert {
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    embed_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    head_size: usize,
}

#[derive(Debug)]
struct Layer {
    /// The query, key and value projections as one: outputs `[q | k | v]`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    act: HiddenAct,
    output: Dense,
    output_norm: Norm,
}

fn dense(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Dense> {
    Dense::new(vb.get((outputs, inputs), "weight")?, vb.get(outputs, "bias")?)
}

fn layer_norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<Norm> {
    Ok(Norm(LayerNorm::new(vb.get(size, "weight")?, vb.get(size, "bias")?, eps)))
}

impl Bert {
    /// Loads the weights under `bert.`, `<model_type>.` or the root,
    /// whichever holds them.
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        if config.position_embedding_type != PositionEmbeddingType::Absolute {
            candle_core::bail!("only absolute position embeddings are supported");
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else if let Some(prefix) =
            config.model_type.as_ref().filter(|t| vb.contains_tensor(&format!("{t}.embeddings.word_embeddings.weight")))
        {
            vb.pp(prefix)
        } else {
            vb
        };
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            candle_core::bail!("hidden size {hidden} does not split into {heads} attention heads");
        }
        let head_size = hidden / heads;
        let e = vb.pp("embeddings");
        let embedding = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(e.pp(name).get((rows, hidden), "weight")?, hidden))
        };
        let words = embedding("word_embeddings", config.vocab_size)?;
        let positions = embedding("position_embeddings", config.max_position_embeddings)?;
        let token_types = embedding("token_type_embeddings", config.type_vocab_size)?;
        let embed_norm = layer_norm(&e.pp("LayerNorm"), hidden, config.layer_norm_eps)?;

        // softmax(q.k / sqrt(d)) == softmax((q / sqrt(d)).k): scale the
        // query projection once instead of every score matrix.
        let scale = 1.0 / (head_size as f64).sqrt();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let part = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                    let p = a.pp(format!("self.{name}"));
                    Ok((p.get((hidden, hidden), "weight")?, p.get(hidden, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let (q_weight, q_bias) = ((q.0 * scale)?, (q.1 * scale)?);
                let qkv =
                    Dense::new(Tensor::cat(&[&q_weight, &k.0, &v.0], 0)?, Tensor::cat(&[&q_bias, &k.1, &v.1], 0)?)?;
                Ok(Layer {
                    qkv,
                    attention_out: dense(&a.pp("output.dense"), hidden, hidden)?,
                    attention_norm: layer_norm(&a.pp("output.LayerNorm"), hidden, config.layer_norm_eps)?,
                    intermediate: dense(&l.pp("intermediate.dense"), hidden, config.intermediate_size)?,
                    act: config.hidden_act,
                    output: dense(&l.pp("output.dense"), config.intermediate_size, hidden)?,
                    output_norm: layer_norm(&l.pp("output.LayerNorm"), hidden, config.layer_norm_eps)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { words, positions, token_types, embed_norm, layers, heads, head_size })
    }

    /// Hidden states `(batch, tokens, hidden)` for `ids` and `types`
    /// `(batch, tokens)`; `mask` `(batch, tokens)` is 1 for real tokens and
    /// 0 for padding. Plain candle operations, any device; on the CPU
    /// [`Self::forward_packed`] does the same work without the padding.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (_, tokens) = ids.dims2()?;
        let positions = Tensor::arange(0u32, tokens as u32, ids.device())?;
        let x = (self.words.forward(ids)? + self.token_types.forward(types)?)?
            .broadcast_add(&self.positions.forward(&positions)?)?;
        let mut x = self.embed_norm.0.forward(&x)?;
        // Padding gets the most negative score, as in Hugging Face's
        // extended attention mask: (1 - mask) * f32::MIN, (batch, 1, 1, tokens).
        let mask = mask.to_dtype(x.dtype())?;
        let bias = ((mask.ones_like()? - &mask)? * f64::from(f32::MIN))?.unsqueeze(1)?.unsqueeze(1)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias)?;
        }
        Ok(x)
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, tokens, self.heads, self.head_size))?.transpose(1, 2)?.contiguous()
        };
        let qkv = l.qkv.forward(x, None)?;
        let (q, k, v) = (qkv.narrow(2, 0, hidden)?, qkv.narrow(2, hidden, hidden)?, qkv.narrow(2, 2 * hidden, hidden)?);
        let scores = heads(q)?.matmul(&heads(k)?.t()?)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&heads(v)?)?.transpose(1, 2)?.contiguous()?.reshape((batch, tokens, hidden))?;
        let attended = l.attention_norm.0.forward(&l.attention_out.forward(&context, Some(x))?)?;
        let inner = match l.act {
            HiddenAct::Gelu => l.intermediate.forward(&attended, None)?.gelu_erf()?,
            HiddenAct::GeluApproximate => l.intermediate.forward(&attended, None)?.gelu()?,
            HiddenAct::Relu => l.intermediate.forward(&attended, None)?.relu()?,
        };
        l.output_norm.0.forward(&l.output.forward(&inner, Some(&attended))?)
    }

    /// Whether [`Self::forward_packed`] applies: the weights are f32 on the CPU.
    pub fn packs(&self) -> bool {
        let table = self.words.embeddings();
        matches!(table.device(), Device::Cpu) && table.dtype() == DType::F32
    }

    /// The last hidden states of the real tokens only, on the CPU in f32:
    /// `ids` and `types` hold every text's tokens back to back, `lengths`
    /// how many each text has; the result is `(sum of lengths, hidden)`,
    /// row-major, in the same order. Nothing is computed for padding, and
    /// that is exact: every operation but attention works token by token,
    /// and attention gives padded keys a weight of exactly 0. `threads`
    /// splits each matrix product and the attention (1: this thread
    /// only). An error where the weights are not f32 on the CPU (see
    /// [`Self::packs`]).
    pub fn forward_packed(
        &self,
        ids: &[u32],
        types: &[u32],
        lengths: &[usize],
        threads: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let total: usize = lengths.iter().sum();
        if ids.len() != total || types.len() != total {
            candle_core::bail!("{} ids and {} types for texts of {total} tokens", ids.len(), types.len());
        }
        let hidden = self.heads * self.head_size;
        let (words, words_layout) = self.words.embeddings().storage_and_layout();
        let (types_table, types_layout) = self.token_types.embeddings().storage_and_layout();
        let (positions, positions_layout) = self.positions.embeddings().storage_and_layout();
        let (words, types_table, positions) = (
            cpu_f32(&words, words_layout)?,
            cpu_f32(&types_table, types_layout)?,
            cpu_f32(&positions, positions_layout)?,
        );
        fn row<'a>(table: &'a [f32], i: u32, hidden: usize, what: &str) -> candle_core::Result<&'a [f32]> {
            let at = i as usize * hidden;
            match table.get(at..at + hidden) {
                Some(row) => Ok(row),
                None => candle_core::bail!("{what} {i} is past the model's table of {}", table.len() / hidden),
            }
        }
        // (word + token type) + position, in Hugging Face's order of additions.
        let mut x = Vec::with_capacity(total * hidden);
        let mut at = 0;
        for &n in lengths {
            for p in 0..n {
                let w = row(words, ids[at + p], hidden, "token id")?;
                let t = row(types_table, types[at + p], hidden, "token type")?;
                let pos = row(positions, p as u32, hidden, "position")?;
                x.extend(w.iter().zip(t).zip(pos).map(|((w, t), p)| (w + t) + p));
            }
            at += n;
        }
        let spans = spans(lengths);
        self.embed_norm.apply(&mut x)?;
        for l in &self.layers {
            x = self.layer_packed(l, &x, &spans, threads)?;
        }
        Ok(x)
    }

    fn layer_packed(&self, l: &Layer, x: &[f32], spans: &[Span], threads: usize) -> candle_core::Result<Vec<f32>> {
        let hidden = self.heads * self.head_size;
        let then = match l.act {
            HiddenAct::Gelu => Then::GeluErf,
            HiddenAct::GeluApproximate => Then::GeluTanh,
            HiddenAct::Relu => Then::Relu,
        };
        let qkv = l.qkv.apply(x, None, Then::Nothing, threads)?;
        let context = attention(&qkv, hidden, self.heads, spans, threads);
        let mut attended = l.attention_out.apply(&context, Some(x), Then::Nothing, threads)?;
        l.attention_norm.apply(&mut attended)?;
        let inner = l.intermediate.apply(&attended, None, then, threads)?;
        let mut out = l.output.apply(&inner, Some(&attended), Then::Nothing, threads)?;
        l.output_norm.apply(&mut out)?;
        Ok(out)
    }
}

/// A text's rows in a batch: the first, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    len: usize,
}

/// The spans of texts of `lengths` tokens laid back to back.
fn spans(lengths: &[usize]) -> Vec<Span> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let span = Span { start, len };
            start += len;
            span
        })
        .collect()
}

/// Self-attention one text and head at a time, straight from the fused
/// projection's layout: `qkv` is (rows, 3 x hidden), each row `[q | k |
/// v]` with the heads side by side (the query already scaled), and each
/// text attends only within its span. That is what Hugging Face's
/// additive mask computes for right-padded texts: padded keys get a
/// weight of exactly 0 (exp(f32::MIN - max) underflows), and a real
/// token's output never depends on a padded query. The result is
/// (rows, hidden); rows outside every span are 0. Against candle's
/// batched path this makes no per-head copies of q, k and v, no (batch,
/// heads, tokens, tokens) score tensors, and no transpose of the result:
/// a text's scores for one head (at most 256 x 256 here) stay in cache.
/// With `threads` > 1 the (text, head) pairs run in parallel, so one
/// long text uses every thread too.
fn attention(qkv: &[f32], hidden: usize, heads: usize, spans: &[Span], threads: usize) -> Vec<f32> {
    assert!(heads > 0 && hidden.is_multiple_of(heads), "{hidden} columns do not split into {heads} heads");
    let stride = 3 * hidden;
    assert!(qkv.len().is_multiple_of(stride), "attention shapes");
    let rows = qkv.len() / stride;
    let head_size = hidden / heads;
    let mut context = vec![0f32; rows * hidden];
    for pair in spans.windows(2) {
        assert!(pair[0].start + pair[0].len <= pair[1].start, "attention spans overlap or are out of order");
    }
    assert!(spans.last().is_none_or(|s| s.start + s.len <= rows), "a span past the rows");
    let work: Vec<(Span, usize)> =
        spans.iter().filter(|s| s.len > 0).flat_map(|&s| (0..heads).map(move |h| (s, h))).collect();
    let out = Disjoint::new(&mut context);
    let one = |&(span, h): &(Span, usize)| {
        let n = span.len;
        let at = span.start * stride + h * head_size;
        let (q, k, v) = (&qkv[at..], &qkv[at + hidden..], &qkv[at + 2 * hidden..]);
        // scores = q_h k_h^T: (n x head_size) by (head_size x n), the
        // head's rows `stride` apart.
        let mut scores = vec![0f32; n * n];
        let q_h = View { rows: n, cols: head_size, row_stride: stride, col_stride: 1 };
        let k_h_t = View { rows: head_size, cols: n, row_stride: 1, col_stride: stride };
        matmul(&mut scores, n, false, (q, q_h), (k, k_h_t), gemm::Parallelism::None);
        softmax_rows(&mut scores, n);
        // out_h = scores v_h: (n x n) by (n x head_size).
        let mut out_h = vec![0f32; n * head_size];
        let v_h = View { rows: n, cols: head_size, row_stride: stride, col_stride: 1 };
        let scores_view = View { rows: n, cols: n, row_stride: n, col_stride: 1 };
        matmul(&mut out_h, head_size, false, (&scores, scores_view), (v, v_h), gemm::Parallelism::None);
        for (r, values) in out_h.chunks_exact(head_size).enumerate() {
            // SAFETY: spans do not overlap (checked above) and each
            // (text, head) pair is one job: this one alone writes its
            // text's rows in its head's columns.
            #[allow(unsafe_code)]
            unsafe {
                out.add(span.start + r, h * head_size, hidden, values)
            };
        }
    };
    if threads > 1 {
        use rayon::prelude::*;
        work.par_iter().for_each(one);
    } else {
        work.iter().for_each(one);
    }
    context
}

/// A layer norm; on the CPU applied in place, row by row.
#[derive(Debug)]
struct Norm(LayerNorm);

impl Norm {
    /// Normalises each row of `x` (rows of the weight's width) in place:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`, the variance over
    /// the centred values (two passes, as PyTorch computes it).
    fn apply(&self, x: &mut [f32]) -> candle_core::Result<()> {
        let Some(bias) = self.0.bias() else { candle_core::bail!("a layer norm without bias") };
        let (w_storage, w_layout) = self.0.weight().storage_and_layout();
        let (b_storage, b_layout) = bias.storage_and_layout();
        let (w, b) = (cpu_f32(&w_storage, w_layout)?, cpu_f32(&b_storage, b_layout)?);
        let width = w.len();
        if width == 0 || b.len() != width || !x.len().is_multiple_of(width) {
            candle_core::bail!("layer norm of width {width} over {} values", x.len());
        }
        layer_norm_rows(x, w, b, self.0.eps() as f32);
        Ok(())
    }
}

multiversion! {
    /// [`layer_norm_row`] on each row of `x`, rows as wide as `weight`.
    fn layer_norm_rows(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        for row in x.chunks_exact_mut(weight.len()) {
            layer_norm_row(row, weight, bias, eps);
        }
    }
}

#[inline(always)]
fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = sum_lanes(row, |v| v) / n;
    let var = sum_lanes(row, |v| (v - mean) * (v - mean)) / n;
    let scale = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * scale * w + b;
    }
}

/// A dense layer with bias: `x W^T + b`, plus a residual when given one.
/// On the CPU (f32) the weight is kept only packed for the kernels of
/// `dense.rs` (keeping candle's copy too cost 40 MiB for MiniLM-L6);
/// elsewhere as candle's `Linear`.
#[derive(Debug)]
struct Dense {
    /// candle's layer, on devices other than the CPU.
    linear: Option<Linear>,
    bias: Tensor,
    /// The weight packed for the CPU kernels (f32 on the CPU only).
    packed: Option<Packed>,
}

/// What a dense layer applies to its output, in place while it is still in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Nothing,
    /// The exact GELU.
    GeluErf,
    /// GELU's tanh approximation.
    GeluTanh,
    Relu,
}

impl Then {
    fn apply(self, out: &mut [f32]) {
        activate(self, out);
    }
}

multiversion! {
    fn activate(then: Then, out: &mut [f32]) {
        match then {
            Then::Nothing => {}
            Then::GeluErf => out.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            Then::GeluTanh => out.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            Then::Relu => out.iter_mut().for_each(|v| *v = v.max(0.0)),
        }
    }
}

impl Dense {
    fn new(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        if matches!(weight.device(), Device::Cpu) && weight.dtype() == DType::F32 {
            let (outputs, inputs) = weight.dims2()?;
            let packed = {
                let transposed = weight.t()?.contiguous()?;
                let (storage, layout) = transposed.storage_and_layout();
                Packed::from_transposed(cpu_f32(&storage, layout)?, inputs, outputs)
            };
            return Ok(Self { linear: None, bias, packed: Some(packed) });
        }
        Ok(Self { linear: Some(Linear::new(weight, Some(bias.clone()))), bias, packed: None })
    }

    /// `x W^T + b (+ residual)` in candle's operations, any device. On the
    /// CPU the layer is rebuilt from the packed weight first (the padded
    /// path there is the tests' reference, not a served one).
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let y = match (&self.linear, &self.packed) {
            (Some(linear), _) => linear.forward(x)?,
            (None, Some(packed)) => {
                let w_t =
                    Tensor::from_vec(packed.unpack_transposed(), (packed.inputs(), packed.outputs()), x.device())?;
                Linear::new(w_t.t()?, Some(self.bias.clone())).forward(x)?
            }
            (None, None) => candle_core::bail!("a dense layer without weights"),
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// The f32 CPU path over rows of `x`: the packed kernels add `x W^T`
    /// to a destination filled with the bias (plus the residual), then
    /// `then` in place. No zero-filled output, no separate passes for the
    /// additions.
    fn apply(&self, x: &[f32], residual: Option<&[f32]>, then: Then, threads: usize) -> candle_core::Result<Vec<f32>> {
        let Some(packed) = &self.packed else { candle_core::bail!("a dense layer not f32 on the CPU") };
        let (b_storage, b_layout) = self.bias.storage_and_layout();
        let b = cpu_f32(&b_storage, b_layout)?;
        let (inputs, outputs) = (packed.inputs(), packed.outputs());
        if b.len() != outputs || !x.len().is_multiple_of(inputs) {
            candle_core::bail!("a dense layer of {inputs} inputs was given {} values", x.len());
        }
        let rows = x.len() / inputs;
        if residual.is_some_and(|r| r.len() != rows * outputs) {
            candle_core::bail!("residual of {} values for {rows} rows of {outputs}", residual.map_or(0, <[f32]>::len));
        }
        let mut out = Vec::with_capacity(rows * outputs);
        match residual {
            Some(r) => r.chunks_exact(outputs).for_each(|row| out.extend(row.iter().zip(b).map(|(r, b)| r + b))),
            None => (0..rows).for_each(|_| out.extend_from_slice(b)),
        }
        packed.accumulate(x, &mut out, threads, Isa::chosen());
        then.apply(&mut out);
        Ok(out)
    }
}

/// A matrix inside a slice: element (i, j) is at
/// `i * row_stride + j * col_stride`.
#[derive(Debug, Clone, Copy)]
struct View {
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl View {
    /// One past the last element the view reaches.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `dst = lhs rhs`, or `dst += lhs rhs` with `accumulate`, in f32 with the
/// `gemm` crate candle itself uses. `dst` is row-major, `dst_row_stride`
/// apart, its shape taken from the operands. Panics if the shapes disagree
/// or a view reaches past its slice, so the one `unsafe` call below only
/// ever sees pointers that cover what it reads and writes.
fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    (lhs, l): (&[f32], View),
    (rhs, r): (&[f32], View),
    parallelism: gemm::Parallelism,
) {
    let (m, n, k) = (l.rows, r.cols, l.cols);
    let d = View { rows: m, cols: n, row_stride: dst_row_stride, col_stride: 1 };
    assert_eq!(r.rows, k, "matmul of {m}x{k} by {}x{n}", r.rows);
    assert!(n <= dst_row_stride || m <= 1, "destination rows of {n} overlap at stride {dst_row_stride}");
    assert!(d.extent() <= dst.len() && l.extent() <= lhs.len() && r.extent() <= rhs.len(), "matmul out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    let stride = |s: usize| s as isize;
    // `gemm`'s kernels tile the destination's rows by a column of vector
    // registers (up to 64 rows with AVX-512) and its columns by a few
    // scalars: a 21-row product (one short text) would fill a third of
    // each tile. With fewer rows than columns, compute the transpose
    // instead, `dst^T = rhs^T lhs^T`: the same sums, the long side in
    // the registers. For a dense layer this also makes `W^T`, stored
    // (inputs x outputs) row-major, a column-major left operand, which
    // `gemm` reads as it is, without packing.
    let (m, n, (lhs, l), (rhs, r), dst_rs, dst_cs) = if m < n {
        let t = |v: View| View { rows: v.cols, cols: v.rows, row_stride: v.col_stride, col_stride: v.row_stride };
        (n, m, (rhs, t(r)), (lhs, t(l)), 1, dst_row_stride)
    } else {
        (m, n, (lhs, l), (rhs, r), dst_row_stride, 1)
    };
    // SAFETY: checked above: each pointer's view lies inside its slice, and
    // the destination's rows do not overlap one another; `dst` is a unique
    // borrow, so it aliases neither operand.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            stride(dst_cs),
            stride(dst_rs),
            accumulate,
            lhs.as_ptr(),
            stride(l.col_stride),
            stride(l.row_stride),
            rhs.as_ptr(),
            stride(r.col_stride),
            stride(r.row_stride),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The values of a contiguous f32 tensor on the CPU.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("expected contiguous f32 values on the CPU");
    };
    match data.get(start..end) {
        Some(values) => Ok(values),
        None => candle_core::bail!("a layout past its storage"),
    }
}

/// The exact (erf) GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's tanh approximation, as candle's `gelu` computes it.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// `erf` for f32 as a ratio of two polynomials in x (odd over even) on
/// [-4, 4], where f32's erf reaches +-1: no branches, no `exp`, so a loop
/// over it vectorises. Coefficients: the minimax fit used by Eigen and XLA
/// for f32 erf. Within 1e-6 of libm's `erff` (tested below).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906_3e-4);
    p = x2.mul_add(p, -2.954_600_1e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329_2e-3);
    q = x2.mul_add(q, -1.426_474e-2);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (converges quickly for |x| <= 4
    /// with enough terms), the reference for the f32 approximation.
    fn erf_f64(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 400.0 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_a_millionth_everywhere() {
        let mut worst = (0.0f64, 0.0f32);
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let err = (f64::from(erf(x)) - erf_f64(f64::from(x))).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 < 1e-6, "erf off by {} at {}", worst.0, worst.1);
        // Saturates (clamped at 4, where erf is 1 - 1.5e-8).
        assert!((erf(10.0) - 1.0).abs() < 1e-6 && (erf(-10.0) + 1.0).abs() < 1e-6);
    }

    /// The CPU path (one GEMM over bias + residual, activation in place)
    /// against candle's separate operations, on odd shapes; and the
    /// candle path through the transposed weight's view.
    #[test]
    fn dense_matches_linear_plus_residual_and_activation() {
        let d = Device::Cpu;
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for (rows, inputs, outputs) in [(21, 33, 17), (1, 384, 1536), (10, 64, 64), (80, 33, 17)] {
            let x = Tensor::randn(0f32, 1.0, (rows, inputs), &d).unwrap();
            let w = Tensor::randn(0f32, 0.2, (outputs, inputs), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, outputs, &d).unwrap();
            let r = Tensor::randn(0f32, 1.0, (rows, outputs), &d).unwrap();
            let dense = Dense::new(w.clone(), b.clone()).unwrap();
            let reference = Linear::new(w, Some(b)).forward(&x).unwrap();
            let (xs, rs) = (values(&x), values(&r));
            let cases = [
                (dense.apply(&xs, None, Then::Nothing, 1).unwrap(), values(&reference)),
                (dense.apply(&xs, Some(&rs), Then::Nothing, 2).unwrap(), values(&(&reference + &r).unwrap())),
                (dense.apply(&xs, None, Then::GeluErf, 1).unwrap(), values(&reference.gelu_erf().unwrap())),
                (dense.apply(&xs, None, Then::GeluTanh, 1).unwrap(), values(&reference.gelu().unwrap())),
                (dense.apply(&xs, None, Then::Relu, 1).unwrap(), values(&reference.relu().unwrap())),
                (values(&dense.forward(&x, Some(&r)).unwrap()), values(&(&reference + &r).unwrap())),
            ];
            for (i, (ours, theirs)) in cases.iter().enumerate() {
                assert_eq!(ours.len(), theirs.len());
                let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "case {i}, {rows}x{inputs}->{outputs}: off by {worst}");
            }
            assert!(dense.apply(&xs[1..], None, Then::Nothing, 1).is_err(), "a ragged input");
        }
    }

    /// Attention one text and head at a time, on real tokens only, against
    /// candle's batched attention with Hugging Face's additive mask: equal
    /// on every real token's row; padded rows left at 0.
    #[test]
    fn attention_matches_masked_batched_attention() {
        let d = Device::Cpu;
        let (batch, tokens, heads, head_size) = (3, 6, 2, 4);
        let hidden = heads * head_size;
        let lengths = [6, 2, 4];
        let (q, k, v) = (
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
        );
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let spans: Vec<Span> = lengths.iter().enumerate().map(|(b, &len)| Span { start: b * tokens, len }).collect();
        let qkv = flat(&Tensor::cat(&[&q, &k, &v], 2).unwrap());
        let ours = attention(&qkv, hidden, heads, &spans, 1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(pool.install(|| attention(&qkv, hidden, heads, &spans, 2)), ours);

        let mask: Vec<f32> =
            lengths.iter().flat_map(|&n| (0..tokens).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (batch, tokens), &d).unwrap();
        let bias = ((mask.ones_like().unwrap() - &mask).unwrap() * f64::from(f32::MIN)).unwrap();
        let bias = bias.unsqueeze(1).unwrap().unsqueeze(1).unwrap();
        let split = |t: &Tensor| {
            t.reshape((batch, tokens, heads, head_size)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let scores = split(&q).matmul(&split(&k).t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let theirs = probs.matmul(&split(&v)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let theirs = flat(&theirs);
        for (b, &n) in lengths.iter().enumerate() {
            for t in 0..tokens {
                let at = (b * tokens + t) * hidden;
                for (a, e) in ours[at..at + hidden].iter().zip(&theirs[at..at + hidden]) {
                    if t < n {
                        assert!((a - e).abs() < 1e-5, "text {b} token {t}: {a} vs {e}");
                    } else {
                        assert_eq!(*a, 0.0, "padded rows are left at 0");
                    }
                }
            }
        }
    }

    /// A small BERT with random weights (2 layers, 3 heads of 4).
    fn tiny_bert(act: &str) -> Bert {
        let d = Device::Cpu;
        let config: Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 20, "hidden_act": act, "hidden_dropout_prob": 0.0,
            "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
        }))
        .unwrap();
        let mut tensors = std::collections::HashMap::new();
        let mut add = |name: String, shape: &[usize]| {
            tensors.insert(name, Tensor::randn(0f32, 0.5, shape, &d).unwrap());
        };
        add("embeddings.word_embeddings.weight".into(), &[40, 12]);
        add("embeddings.position_embeddings.weight".into(), &[16, 12]);
        add("embeddings.token_type_embeddings.weight".into(), &[2, 12]);
        for norm in ["embeddings.LayerNorm".to_string()].into_iter().chain((0..2).flat_map(|i| {
            [format!("encoder.layer.{i}.attention.output.LayerNorm"), format!("encoder.layer.{i}.output.LayerNorm")]
        })) {
            add(format!("{norm}.weight"), &[12]);
            add(format!("{norm}.bias"), &[12]);
        }
        for i in 0..2 {
            let l = format!("encoder.layer.{i}");
            for (name, outputs, inputs) in [
                ("attention.self.query", 12, 12),
                ("attention.self.key", 12, 12),
                ("attention.self.value", 12, 12),
                ("attention.output.dense", 12, 12),
                ("intermediate.dense", 20, 12),
                ("output.dense", 12, 20),
            ] {
                add(format!("{l}.{name}.weight"), &[outputs, inputs]);
                add(format!("{l}.{name}.bias"), &[outputs]);
            }
        }
        Bert::load(VarBuilder::from_tensors(tensors, DType::F32, &d), &config).unwrap()
    }

    /// The packed path (real tokens only, own layer norm, texts split
    /// between threads or products split) against the padded one with
    /// Hugging Face's mask and candle's layer norm: the same hidden state
    /// for every real token.
    #[test]
    fn packed_encoder_matches_padded_encoder() {
        let d = Device::Cpu;
        let lengths = [5usize, 1, 9, 3];
        let tokens = 9;
        let ids: Vec<Vec<u32>> =
            lengths.iter().enumerate().map(|(b, &n)| (0..n).map(|t| ((b * 7 + t * 3) % 40) as u32).collect()).collect();
        let types: Vec<Vec<u32>> = lengths.iter().map(|&n| (0..n).map(|t| u32::from(t >= n / 2)).collect()).collect();
        let pad = |rows: &[Vec<u32>]| -> Tensor {
            let flat: Vec<u32> =
                rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, tokens - r.len()))).collect();
            Tensor::from_vec(flat, (rows.len(), tokens), &d).unwrap()
        };
        let mask: Vec<f32> =
            lengths.iter().flat_map(|&n| (0..tokens).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (lengths.len(), tokens), &d).unwrap();
        let flat = |rows: &[Vec<u32>]| -> Vec<u32> { rows.concat() };
        for act in ["gelu", "relu", "geluapproximate"] {
            let bert = tiny_bert(act);
            let padded: Vec<Vec<Vec<f32>>> = bert.forward(&pad(&ids), &pad(&types), &mask).unwrap().to_vec3().unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            for threads in [1, 2] {
                let packed =
                    pool.install(|| bert.forward_packed(&flat(&ids), &flat(&types), &lengths, threads)).unwrap();
                assert_eq!(packed.len(), lengths.iter().sum::<usize>() * 12);
                let mut rows = packed.chunks_exact(12);
                for (b, &n) in lengths.iter().enumerate() {
                    for (t, expected) in padded[b][..n].iter().enumerate() {
                        for (a, e) in rows.next().unwrap().iter().zip(expected) {
                            assert!((a - e).abs() < 1e-4, "{act}, {threads} threads, text {b} token {t}: {a} vs {e}");
                        }
                    }
                }
            }
            // Ids past the tables are an error, not a panic.
            let err = bert.forward_packed(&[3, 40], &[0, 0], &[2], 1).unwrap_err().to_string();
            assert!(err.contains("token id 40"), "{err}");
            let err = bert.forward_packed(&[3; 17], &[0; 17], &[17], 1).unwrap_err().to_string();
            assert!(err.contains("position 16"), "{err}");
            assert!(bert.forward_packed(&[3, 4], &[0], &[2], 1).is_err(), "types shorter than ids");
        }
    }

    /// The in-place layer norm against one computed in f64, and against
    /// candle's. Rows with a large common offset are where candle's
    /// one-pass variance (mean of squares minus squared mean) loses
    /// digits (3e-3 off here); the two-pass one here stays within 1e-4.
    #[test]
    fn layer_norm_matches_f64_and_candle() {
        let d = Device::Cpu;
        let width = 37;
        let (w, b) = (Tensor::randn(1f32, 0.3, width, &d).unwrap(), Tensor::randn(0f32, 0.3, width, &d).unwrap());
        let (wv, bv): (Vec<f32>, Vec<f32>) = (w.to_vec1().unwrap(), b.to_vec1().unwrap());
        let norm = Norm(LayerNorm::new(w, b, 1e-12));
        for offset in [0.0, 100.0] {
            let x = (Tensor::randn(0f32, 1.0, (5, width), &d).unwrap() + offset).unwrap();
            let mut ours: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let input = ours.clone();
            norm.apply(&mut ours).unwrap();
            for (row, out) in input.chunks(width).zip(ours.chunks(width)) {
                let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / width as f64;
                let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / width as f64;
                for (i, (&v, &o)) in row.iter().zip(out).enumerate() {
                    let e = (f64::from(v) - mean) / (var + 1e-12).sqrt() * f64::from(wv[i]) + f64::from(bv[i]);
                    // f32 holds 100 + x to ~8e-6: that much error is the input's own.
                    let tolerance = if offset == 0.0 { 1e-5 } else { 1e-4 };
                    assert!((f64::from(o) - e).abs() < tolerance, "offset {offset}: {o} vs {e}");
                }
            }
            if offset == 0.0 {
                let theirs: Vec<f32> = norm.0.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for (a, e) in ours.iter().zip(&theirs) {
                    assert!((a - e).abs() < 1e-5, "{a} vs candle's {e}");
                }
            }
        }
        assert!(norm.apply(&mut [0f32; 36]).is_err(), "a length not a multiple of the width");
    }

    #[test]
    fn matmul_refuses_views_past_their_slices() {
        let a = [1f32, 2.0, 3.0, 4.0];
        let view = View { rows: 2, cols: 2, row_stride: 2, col_stride: 1 };
        let mut dst = [0f32; 4];
        matmul(&mut dst, 2, false, (&a, view), (&a, view), gemm::Parallelism::None);
        assert_eq!(dst, [7.0, 10.0, 15.0, 22.0]);
        let past_end = View { row_stride: 3, ..view };
        let run = |lhs: View, dst_len: usize| {
            std::panic::catch_unwind(|| {
                let mut dst = vec![0f32; dst_len];
                matmul(&mut dst, 2, false, (&a, lhs), (&a, view), gemm::Parallelism::None);
            })
        };
        assert!(run(past_end, 4).is_err(), "an operand view past its slice");
        assert!(run(view, 3).is_err(), "a destination too short");
    }

    #[test]
    fn activations_match_candle() {
        let xs: Vec<f32> = (-800..800).map(|i| i as f32 * 0.01).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        for (then, theirs) in [(Then::GeluErf, t.gelu_erf().unwrap()), (Then::GeluTanh, t.gelu().unwrap())] {
            let theirs: Vec<f32> = theirs.to_vec1().unwrap();
            let mut ours = xs.clone();
            then.apply(&mut ours);
            for ((a, b), x) in ours.iter().zip(&theirs).zip(&xs) {
                assert!((a - b).abs() <= 2e-6 * (1.0 + x.abs()), "{then:?}({x}): {a} vs {b}");
            }
        }
    }
}
