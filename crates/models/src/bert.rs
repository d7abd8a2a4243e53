//! A BERT encoder for sentence embeddings: the same computation as
//! Hugging Face's `BertModel` (and candle-transformers'), arranged for
//! speed on the CPU.
//!
//! Where the time went with candle-transformers' BERT (perf, batch 32 of
//! short texts, one thread): 19% in the exact GELU, whose `erf` is libm's
//! scalar `erff` (with an `expf` inside); softmax composed of five tensor
//! passes. Here GELU is one pass with a branch-free rational `erf` that the
//! compiler vectorises (within 1e-6 of libm's), softmax is candle's fused
//! last-dimension kernel, and the attention scale is folded into the query
//! weights at load. Dense layers on the CPU are one GEMM each, into an
//! output already holding the bias (and the residual, where one follows):
//! no zero-filled output, no separate passes for the additions.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Storage, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use crate::math::softmax_in_place;

/// The encoder; `forward` returns the last hidden states.
#[derive(Debug)]
pub struct Bert {
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_size: usize,
}

#[derive(Debug)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    act: HiddenAct,
    output: Dense,
    output_norm: LayerNorm,
}

fn dense(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Dense> {
    Ok(Dense(Linear::new(vb.get((outputs, inputs), "weight")?, Some(vb.get(outputs, "bias")?))))
}

fn layer_norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(size, "weight")?, vb.get(size, "bias")?, eps))
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
                let Dense(query) = dense(&a.pp("self.query"), hidden, hidden)?;
                let query = Dense(Linear::new((query.weight() * scale)?, query.bias().map(|b| b * scale).transpose()?));
                Ok(Layer {
                    query,
                    key: dense(&a.pp("self.key"), hidden, hidden)?,
                    value: dense(&a.pp("self.value"), hidden, hidden)?,
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
    /// 0 for padding.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (_, tokens) = ids.dims2()?;
        let positions = Tensor::arange(0u32, tokens as u32, ids.device())?;
        let x = (self.words.forward(ids)? + self.token_types.forward(types)?)?
            .broadcast_add(&self.positions.forward(&positions)?)?;
        let mut x = self.embed_norm.forward(&x)?;
        // Padding gets the most negative score, as in Hugging Face's
        // extended attention mask: (1 - mask) * f32::MIN, (batch, 1, 1, tokens).
        let mask = mask.to_dtype(x.dtype())?;
        let bias = ((mask.ones_like()? - &mask)? * f64::from(f32::MIN))?.unsqueeze(1)?.unsqueeze(1)?;
        let lengths = prefix_lengths(&mask)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias, lengths.as_deref())?;
        }
        Ok(x)
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor, lengths: Option<&[usize]>) -> candle_core::Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let (q, k, v) = (l.query.forward(x, None)?, l.key.forward(x, None)?, l.value.forward(x, None)?);
        let fused = match lengths {
            Some(lengths) => attention_cpu(&q, &k, &v, lengths, self.heads)?,
            None => None,
        };
        let context = match fused {
            Some(context) => context,
            None => {
                let heads = |t: Tensor| -> candle_core::Result<Tensor> {
                    t.reshape((batch, tokens, self.heads, self.head_size))?.transpose(1, 2)?.contiguous()
                };
                let scores = heads(q)?.matmul(&heads(k)?.t()?)?.broadcast_add(bias)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                probs.matmul(&heads(v)?)?.transpose(1, 2)?.contiguous()?.reshape((batch, tokens, hidden))?
            }
        };
        let attended = l.attention_norm.forward(&l.attention_out.forward(&context, Some(x))?)?;
        let inner = match l.act {
            HiddenAct::Gelu => l.intermediate.forward_then(&attended, None, Then::GeluErf)?,
            act => activate(act, &l.intermediate.forward(&attended, None)?)?,
        };
        l.output_norm.forward(&l.output.forward(&inner, Some(&attended))?)
    }
}

/// The number of real tokens of each text when `mask` (batch, tokens) is
/// ones followed by zeros in every row (right padding, as `Embedder`
/// builds it); `None` for any other mask or device.
fn prefix_lengths(mask: &Tensor) -> candle_core::Result<Option<Vec<usize>>> {
    if !matches!(mask.device(), Device::Cpu) {
        return Ok(None);
    }
    let rows: Vec<Vec<f32>> = mask.to_vec2()?;
    Ok(rows
        .iter()
        .map(|row| {
            let n = row.iter().take_while(|&&m| m == 1.0).count();
            row[n..].iter().all(|&m| m == 0.0).then_some(n)
        })
        .collect())
}

/// Self-attention on the CPU, one text and head at a time, straight from
/// the projections' layout: `q`, `k`, `v` are (batch, tokens, hidden) with
/// the heads side by side (the query already scaled). For each text only
/// its `lengths[b]` real tokens take part, which is exact: Hugging Face's
/// mask gives padded keys a weight of exactly 0 (exp(f32::MIN - max)
/// underflows), and a real token's output never depends on a padded
/// query. The padded rows of the result are 0 (pooling never reads them).
/// Against candle's batched path this makes no per-head copies of q, k and
/// v, no (batch, heads, tokens, tokens) score tensors, and no transpose of
/// the result: a text's scores for one head (at most 256 x 256) stay in
/// cache. `None` where it does not apply (another device or dtype).
fn attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
    heads: usize,
) -> candle_core::Result<Option<Tensor>> {
    let (batch, tokens, hidden) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!("attention inputs differ in shape: {:?} {:?} {:?}", q.dims(), k.dims(), v.dims());
    }
    if heads == 0 || !hidden.is_multiple_of(heads) || lengths.len() != batch || lengths.iter().any(|&n| n > tokens) {
        return Ok(None);
    }
    let head_size = hidden / heads;
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Some(q), Some(k), Some(v)) =
        (cpu_f32(&q_storage, q_layout), cpu_f32(&k_storage, k_layout), cpu_f32(&v_storage, v_layout))
    else {
        return Ok(None);
    };
    let per_text = tokens * hidden;
    if q.len() != batch * per_text || k.len() != q.len() || v.len() != q.len() {
        return Ok(None);
    }
    let mut context = vec![0f32; batch * per_text];
    let text = |b: usize, out: &mut [f32]| {
        let n = lengths[b];
        if n == 0 {
            return;
        }
        let mut scores = vec![0f32; n * n];
        for h in 0..heads {
            let at = b * per_text + h * head_size;
            let (q, k, v) = (&q[at..], &k[at..], &v[at..]);
            // scores = q_h k_h^T: (n x head_size) by (head_size x n), the
            // head's rows `hidden` apart in its text's slice.
            let q_h = View { rows: n, cols: head_size, row_stride: hidden, col_stride: 1 };
            let k_h_t = View { rows: head_size, cols: n, row_stride: 1, col_stride: hidden };
            matmul(&mut scores, n, false, (q, q_h), (k, k_h_t), gemm::Parallelism::None);
            scores.chunks_exact_mut(n).for_each(softmax_in_place);
            // out_h = scores v_h: (n x n) by (n x head_size), written into
            // the head's columns of the text's rows.
            let v_h = View { rows: n, cols: head_size, row_stride: hidden, col_stride: 1 };
            let scores_view = View { rows: n, cols: n, row_stride: n, col_stride: 1 };
            matmul(&mut out[h * head_size..], hidden, false, (&scores, scores_view), (v, v_h), gemm::Parallelism::None);
        }
    };
    if rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        context.par_chunks_mut(per_text).enumerate().for_each(|(b, out)| text(b, out));
    } else {
        context.chunks_mut(per_text).enumerate().for_each(|(b, out)| text(b, out));
    }
    Ok(Some(Tensor::from_vec(context, (batch, tokens, hidden), &Device::Cpu)?))
}

/// A dense layer with bias: `x W^T + b`, plus a residual when given one.
#[derive(Debug)]
struct Dense(Linear);

/// What a dense layer applies to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Nothing,
    /// The exact GELU, in place while the output is still in cache.
    GeluErf,
}

impl Dense {
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_then(x, residual, Then::Nothing)
    }

    fn forward_then(&self, x: &Tensor, residual: Option<&Tensor>, then: Then) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, residual, then)? {
            return Ok(y);
        }
        let y = self.0.forward(x)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        match then {
            Then::Nothing => Ok(y),
            Then::GeluErf => activate(HiddenAct::Gelu, &y),
        }
    }

    /// The f32 CPU path: one GEMM, `dst = 1 * dst + 1 * x W^T`, over a
    /// destination filled with the bias (plus the residual). `None` where
    /// it does not apply (another device or dtype, strided inputs).
    fn forward_cpu(&self, x: &Tensor, residual: Option<&Tensor>, then: Then) -> candle_core::Result<Option<Tensor>> {
        let Some(bias) = self.0.bias() else { return Ok(None) };
        let weight = self.0.weight();
        let (outputs, inputs) = weight.dims2()?;
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == inputs => *last = outputs,
            _ => candle_core::bail!("a dense layer of {inputs} inputs was given shape {:?}", x.dims()),
        }
        if residual.is_some_and(|r| r.dims() != dims.as_slice()) {
            candle_core::bail!("residual of shape {:?} for a dense output of {dims:?}", residual.map(Tensor::dims));
        }
        let rows = x.elem_count() / inputs.max(1);
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (b_storage, b_layout) = bias.storage_and_layout();
        let r_storage = residual.map(Tensor::storage_and_layout);
        let (Some(x), Some(w), Some(b)) =
            (cpu_f32(&x_storage, x_layout), cpu_f32(&w_storage, w_layout), cpu_f32(&b_storage, b_layout))
        else {
            return Ok(None);
        };
        let r = match &r_storage {
            Some((storage, layout)) => match cpu_f32(storage, layout) {
                Some(r) => Some(r),
                None => return Ok(None),
            },
            None => None,
        };
        if x.len() != rows * inputs
            || w.len() != outputs * inputs
            || b.len() != outputs
            || r.is_some_and(|r| r.len() != rows * outputs)
        {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(rows * outputs);
        match r {
            Some(r) => r.chunks_exact(outputs).for_each(|row| out.extend(row.iter().zip(b).map(|(r, b)| r + b))),
            None => (0..rows).for_each(|_| out.extend_from_slice(b)),
        }
        // The rayon pool this runs in: a pool replica's own.
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        let x_view = View { rows, cols: inputs, row_stride: inputs, col_stride: 1 };
        // W (outputs x inputs, row-major) read as W^T.
        let w_t = View { rows: inputs, cols: outputs, row_stride: 1, col_stride: inputs };
        matmul(&mut out, outputs, true, (x, x_view), (w, w_t), parallelism);
        if then == Then::GeluErf {
            out.iter_mut().for_each(|v| *v = gelu_erf(*v));
        }
        Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
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
            1,
            stride(dst_row_stride),
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
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        return None;
    };
    data.get(start..end)
}

fn activate(act: HiddenAct, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 => {
            x.contiguous()?.apply_op1_no_bwd(&GeluErf)
        }
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluApproximate => x.gelu(),
        HiddenAct::Relu => x.relu(),
    }
}

/// The exact (erf) GELU, `x * (1 + erf(x / sqrt 2)) / 2`, over f32 on the
/// CPU in one vectorisable pass.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "mycel-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("mycel-gelu-erf takes contiguous f32");
        };
        let out: Vec<f32> = data[start..end].iter().map(|&x| gelu_erf(x)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
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

    /// The fused CPU path (one GEMM over bias + residual, GELU in place)
    /// against candle's separate operations, on odd shapes.
    #[test]
    fn dense_matches_linear_plus_residual_and_gelu() {
        let d = Device::Cpu;
        for (batch, tokens, inputs, outputs) in [(3, 7, 33, 17), (1, 1, 384, 1536), (2, 5, 64, 64)] {
            let x = Tensor::randn(0f32, 1.0, (batch, tokens, inputs), &d).unwrap();
            let w = Tensor::randn(0f32, 0.2, (outputs, inputs), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, outputs, &d).unwrap();
            let r = Tensor::randn(0f32, 1.0, (batch, tokens, outputs), &d).unwrap();
            let dense = Dense(Linear::new(w.clone(), Some(b.clone())));
            let reference = Linear::new(w, Some(b)).forward(&x).unwrap();
            let cases = [
                (dense.forward(&x, None).unwrap(), reference.clone()),
                (dense.forward(&x, Some(&r)).unwrap(), (&reference + &r).unwrap()),
                (dense.forward_then(&x, None, Then::GeluErf).unwrap(), reference.gelu_erf().unwrap()),
            ];
            for (ours, theirs) in cases {
                assert_eq!(ours.dims(), theirs.dims());
                let worst: f32 =
                    (ours - theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(worst < 1e-4, "{batch}x{tokens}x{inputs}->{outputs}: off by {worst}");
            }
        }
        // A strided input takes candle's path and still agrees.
        let x = Tensor::randn(0f32, 1.0, (8, 4), &d).unwrap().t().unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 8), &d).unwrap();
        let dense = Dense(Linear::new(w.clone(), Some(Tensor::zeros(3, DType::F32, &d).unwrap())));
        let ours: Vec<Vec<f32>> = dense.forward(&x, None).unwrap().to_vec2().unwrap();
        let theirs: Vec<Vec<f32>> = x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap();
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    /// Attention one text and head at a time, on real tokens only, against
    /// candle's batched attention with Hugging Face's additive mask: equal
    /// on every real token's row.
    #[test]
    fn fused_attention_matches_masked_batched_attention() {
        let d = Device::Cpu;
        let (batch, tokens, heads, head_size) = (3, 6, 2, 4);
        let hidden = heads * head_size;
        let lengths = [6, 2, 4];
        let (q, k, v) = (
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
            Tensor::randn(0f32, 1.0, (batch, tokens, hidden), &d).unwrap(),
        );
        let mask: Vec<f32> =
            lengths.iter().flat_map(|&n| (0..tokens).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (batch, tokens), &d).unwrap();
        assert_eq!(prefix_lengths(&mask).unwrap().as_deref(), Some(&lengths[..]));
        let ours: Vec<Vec<Vec<f32>>> = attention_cpu(&q, &k, &v, &lengths, heads).unwrap().unwrap().to_vec3().unwrap();

        let bias = ((mask.ones_like().unwrap() - &mask).unwrap() * f64::from(f32::MIN)).unwrap();
        let bias = bias.unsqueeze(1).unwrap().unsqueeze(1).unwrap();
        let split = |t: &Tensor| {
            t.reshape((batch, tokens, heads, head_size)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
        };
        let scores = split(&q).matmul(&split(&k).t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let theirs = probs.matmul(&split(&v)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let theirs: Vec<Vec<Vec<f32>>> = theirs.reshape((batch, tokens, hidden)).unwrap().to_vec3().unwrap();
        for (b, &n) in lengths.iter().enumerate() {
            for t in 0..tokens {
                for (a, e) in ours[b][t].iter().zip(&theirs[b][t]) {
                    if t < n {
                        assert!((a - e).abs() < 1e-5, "text {b} token {t}: {a} vs {e}");
                    } else {
                        assert_eq!(*a, 0.0, "padded rows are left at 0");
                    }
                }
            }
        }
        // A mask with a hole is not right padding: the batched path runs.
        let holed = Tensor::new(&[[1f32, 0.0, 1.0]], &d).unwrap();
        assert_eq!(prefix_lengths(&holed).unwrap(), None);
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
    fn gelu_matches_candle() {
        let xs: Vec<f32> = (-800..800).map(|i| i as f32 * 0.01).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let ours: Vec<f32> = activate(HiddenAct::Gelu, &t).unwrap().to_vec1().unwrap();
        let theirs: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
        for ((a, b), x) in ours.iter().zip(&theirs).zip(&xs) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + x.abs()), "gelu({x}): {a} vs {b}");
        }
    }
}
