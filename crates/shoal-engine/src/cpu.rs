//! CPU kernels for the model forward passes: matrix products (through the `gemm` crate),
//! RMSNorm, rotary position embeddings, softmax, SwiGLU and causal attention.
//!
//! The kernels work on plain row-major f32 slices and spread their work over the rayon
//! thread pool where it is large enough to pay for it. They trust their caller for shapes the
//! way a backend does (STYLE "an unsafe layer under a safe layer"), with one exception: every
//! length that an `unsafe` call depends on is checked, and a mismatch panics (a bug in the
//! model code, never a property of the input; models validate shapes when they load).

use rayon::prelude::*;

/// Work (multiply-adds) below which a kernel runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, or `out += …` when `accumulate` is set.
///
/// `w` is laid out like a GGUF/PyTorch linear weight: `n` rows (outputs) of `k` values
/// (inputs), so this is the `y = x Wᵀ` of a linear layer applied to `m` tokens at once.
///
/// # Panics
///
/// If the slice lengths are not `m * k`, `n * k` and `m * n`.
pub fn matmul_t(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(x.len(), m * k, "matmul_t: x is not m × k");
    assert_eq!(w.len(), n * k, "matmul_t: w is not n × k");
    assert_eq!(out.len(), m * n, "matmul_t: out is not m × n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let work = m * n * k;
    if m == 1 && work >= PARALLEL_MIN_WORK {
        // One token: a matrix–vector product. gemm runs those on one thread, so split the
        // weight rows over the pool and give each piece its own single-threaded product.
        let threads = rayon::current_num_threads().max(1);
        let rows = n.div_ceil(threads * 4).max(16);
        out.par_chunks_mut(rows)
            .zip(w.par_chunks(rows * k))
            .for_each(|(o, wc)| gemm_rows(o, x, wc, 1, k, o.len(), accumulate, false));
    } else {
        gemm_rows(out, x, w, m, k, n, accumulate, work >= PARALLEL_MIN_WORK);
    }
}

/// One call to `gemm` for `out[m, n] (+)= x[m, k] · w[n, k]ᵀ`; lengths already checked.
#[expect(clippy::too_many_arguments, reason = "a private shim over gemm's argument list")]
fn gemm_rows(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, accumulate: bool, parallel: bool) {
    debug_assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // Slice lengths are at most isize::MAX, so these strides fit.
    let (n_i, k_i) = (n as isize, k as isize);
    // SAFETY: `out` is m × n row-major (column stride 1, row stride n), `x` is m × k
    // row-major (column stride 1, row stride k), and the right-hand side is wᵀ, k × n, whose
    // element (r, c) is w[c * k + r] (row stride 1, column stride k). The callers checked
    // (or derived) the three lengths, so every index gemm forms lies inside its slice. `out`
    // is borrowed mutably and the inputs shared, so the destination aliases neither input.
    // With `read_dst == false` gemm never reads `out`, so its old contents need no
    // initialisation guarantees beyond being f32 (they are).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n_i,
            accumulate,
            x.as_ptr(),
            1,
            k_i,
            w.as_ptr(),
            k_i,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Dot product of two equally long slices (the shorter length is used otherwise), with
/// several accumulators so that the compiler vectorizes it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`, element-wise (a vectorizable axpy).
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()` values) into `out`:
/// `out = x / sqrt(mean(x²) + eps) * weight`.
///
/// # Panics
///
/// If `x` and `out` differ in length or are not whole rows.
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert_eq!(out.len(), x.len(), "rmsnorm: out and x differ in length");
    if d == 0 {
        return;
    }
    assert_eq!(x.len() % d, 0, "rmsnorm: x is not whole rows");
    let row = |(o, xr): (&mut [f32], &[f32])| {
        let ss: f32 = dot(xr, xr);
        let scale = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(weight) {
            *o = xv * scale * wv;
        }
    };
    if x.len() >= PARALLEL_MIN_WORK {
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(row);
    } else {
        out.chunks_mut(d).zip(x.chunks(d)).for_each(row);
    }
}

/// Numerically stable softmax, in place. A slice whose entries are all `-inf` (or NaN)
/// becomes uniform rather than NaN.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let u = 1.0 / x.len().max(1) as f32;
        x.fill(u);
        return;
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU (swish): `x · σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU in place: `gate = silu(gate) * up`.
///
/// # Panics
///
/// If `gate` and `up` differ in length.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    let f = |(g, u): (&mut [f32], &[f32])| {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = silu(*g) * u;
        }
    };
    if gate.len() >= PARALLEL_MIN_WORK {
        gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(f);
    } else {
        f((gate, up));
    }
}

/// `x += y`, element-wise.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Adds `bias` to every row of `x` (rows of `bias.len()` values).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in x.chunks_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// Which pairs of a head's values a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)` (GPT-J; what GGUF `llama` files expect, their Q and K
    /// weights being permuted at conversion).
    Interleaved,
    /// Halves `(i, i + d/2)` (GPT-NeoX; Hugging Face Llama, GGUF `qwen2`).
    Neox,
}

/// The inverse frequencies `base^(-2i / rot_dim) / factor_i` of a rotary embedding over
/// `rot_dim` values (`rot_dim / 2` of them). `freq_factors`, when given (Llama 3's
/// `rope_freqs.weight`), divides each frequency.
pub fn rope_inv_freq(rot_dim: usize, base: f32, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let half = rot_dim / 2;
    (0..half)
        .map(|i| {
            let f = (base as f64).powf(-2.0 * i as f64 / rot_dim as f64);
            let factor = freq_factors.and_then(|ff| ff.get(i)).copied().unwrap_or(1.0);
            (f / factor as f64) as f32
        })
        .collect()
}

/// Applies the rotary embedding in place to `x`, `n_tokens` rows of `n_heads` heads of
/// `head_dim` values, the token in row `t` being at position `pos0 + t`. The first
/// `2 * inv_freq.len()` values of each head are rotated, the rest left alone.
///
/// # Panics
///
/// If `x` is not whole rows of `n_heads * head_dim` values, or `inv_freq` covers more than a
/// head.
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, pos0: usize, inv_freq: &[f32], style: RopeStyle) {
    let row_len = n_heads * head_dim;
    let half = inv_freq.len();
    assert!(2 * half <= head_dim, "rope: rotating more than a head");
    if row_len == 0 {
        return;
    }
    assert_eq!(x.len() % row_len, 0, "rope: x is not whole rows");
    let per_row = |(t, row): (usize, &mut [f32])| {
        let pos = (pos0 + t) as f64;
        let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
        for &f in inv_freq {
            let (s, c) = (pos * f as f64).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    };
    if x.len() >= PARALLEL_MIN_WORK {
        x.par_chunks_mut(row_len).enumerate().for_each(per_row);
    } else {
        x.chunks_mut(row_len).enumerate().for_each(per_row);
    }
}

/// The shape of a causal attention step; see [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// New tokens (rows of `q` and `out`).
    pub n_tokens: usize,
    /// Position of the first new token; positions `..pos0 + n_tokens` are in the cache.
    pub pos0: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention: `n_heads / n_kv_heads` query heads share one).
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Causal multi-head attention with grouped-query heads.
///
/// `q` and `out` are `[n_tokens, n_heads * head_dim]`; `k` and `v` are caches of rows of
/// `n_kv_heads * head_dim` values holding at least `pos0 + n_tokens` positions (the new
/// tokens' keys and values already written). Token `t` attends to positions `0..=pos0 + t`
/// with scores scaled by `1 / sqrt(head_dim)`. Work is spread over (token, head) pairs.
///
/// # Panics
///
/// If the slices are shorter than the shape says, or `n_heads` is not a multiple of
/// `n_kv_heads`.
pub fn attention(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) {
    let AttentionShape { n_tokens, pos0, n_heads, n_kv_heads, head_dim: hd } = shape;
    if n_tokens == 0 || n_heads == 0 || hd == 0 {
        return;
    }
    assert!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        "attention: {n_heads} query heads cannot share {n_kv_heads} key/value heads"
    );
    let q_dim = n_heads * hd;
    let kv_dim = n_kv_heads * hd;
    let n_ctx = pos0 + n_tokens;
    assert_eq!(q.len(), n_tokens * q_dim, "attention: q has the wrong length");
    assert_eq!(out.len(), n_tokens * q_dim, "attention: out has the wrong length");
    assert!(
        k.len() >= n_ctx * kv_dim && v.len() >= n_ctx * kv_dim,
        "attention: the cache holds fewer than {n_ctx} positions"
    );
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let one = |scores: &mut Vec<f32>, (i, o): (usize, &mut [f32])| {
        let (t, h) = (i / n_heads, i % n_heads);
        let kv_off = (h / group) * hd;
        let qv = &q[t * q_dim + h * hd..][..hd];
        let len = pos0 + t + 1;
        scores.clear();
        scores.extend((0..len).map(|s| dot(qv, &k[s * kv_dim + kv_off..][..hd]) * scale));
        softmax(scores);
        o.fill(0.0);
        for (s, &p) in scores.iter().enumerate() {
            axpy(o, p, &v[s * kv_dim + kv_off..][..hd]);
        }
    };
    let work = n_tokens * n_heads * n_ctx * hd;
    if work >= PARALLEL_MIN_WORK {
        out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, one);
    } else {
        let mut scores = Vec::new();
        out.chunks_mut(hd).enumerate().for_each(|item| one(&mut scores, item));
    }
}
