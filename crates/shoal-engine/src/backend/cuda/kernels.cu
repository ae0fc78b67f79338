// shoal's inference kernels (compiled at run time with NVRTC; no headers needed).
//
// Conventions: activations are row-major f32; linear weights are row-major bf16
// [out, in] (stored as raw 16-bit words); norm weights, biases and RoPE frequencies are
// f32. `step` points at the pass's parameters in device memory (a batch of sequences, each
// a run of tokens at consecutive positions of its own cache): step[0] = tokens, step[1] =
// sequences, then for token t: its id step[TOK + t], its position step[POS + t] and the
// offset of its sequence's block table in `table` step[TAB + t]; step[LAST + s] is the row
// of sequence s's last token. A block table lists the block ids of positions
// [16 i, 16 i + 16). Kernels read positions and tables from `step`, never from their
// arguments, so a recorded step (a CUDA graph) stays valid as the sessions grow.
//
// KV pool (bf16): block b holds, for each layer l, 16 positions of K then 16 of V:
//   K(b, l, p) = pool + ((b * n_layers + l) * 2 + 0) * 16 * kv_dim + p * kv_dim
//   V(b, l, p) = pool + ((b * n_layers + l) * 2 + 1) * 16 * kv_dim + p * kv_dim

typedef unsigned short bf16;
typedef unsigned long long u64;

#define KV_BLOCK 16
#define MAX_CHUNK 512    // tokens per pass
#define MAX_SEQS 256     // sequences per pass
#define TOK 4
#define POS (TOK + MAX_CHUNK)
#define TAB (POS + MAX_CHUNK)
#define LAST (TAB + MAX_CHUNK)
#define TILES (LAST + 2 * MAX_SEQS)   // after the last rows and the chosen tokens
#define TILE_KEYS 32                   // keys a tiled attention block loads at once
#define MAX_GROUP 8      // query heads per key/value head
#define MAX_PER_LANE 4   // head_dim / 32
#define ATT_WARPS 4
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf(bf16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ float bf_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16 to_bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? part[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// out[t] = table[tokens[t]], one block per token.
extern "C" __global__ void shoal_embed(float* out, const bf16* table, const int* step, int dim) {
    int t = blockIdx.x;
    const bf16* src = table + (u64)step[TOK + t] * dim;
    float* dst = out + (u64)t * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = bf(src[i]);
}

// out = x / sqrt(mean(x^2) + eps) * w, one block per row.
extern "C" __global__ void shoal_rmsnorm(float* out, const float* x, const float* w, int dim, float eps) {
    const float* xr = x + (u64)blockIdx.x * dim;
    float* o = out + (u64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * r * w[i];
}

// x rounded to bf16, as the batched path rounds activations for cuBLAS: a sequence's
// numbers do not depend on how many others share its pass (seeded sampling gives the same
// tokens alone and in any batch).
__device__ __forceinline__ float4 rb4(float4 v) {
    return make_float4(bf(to_bf(v.x)), bf(to_bf(v.y)), bf(to_bf(v.z)), bf(to_bf(v.w)));
}

// This thread's share of dot(W[row], x): W bf16 [.., k], x f32 [k] (rounded to bf16); `t` of
// `tpr` threads take 8 values (16 bytes of W) at a time.
__device__ __forceinline__ float row_part(const bf16* wr, const float* x, int k, int t, int tpr) {
    float acc = 0.0f;
    if ((k & 7) == 0) {
        const uint4* w4 = (const uint4*)wr;
        const float4* x4 = (const float4*)x;
        int chunks = k >> 3;
#pragma unroll 4
        for (int c = t; c < chunks; c += tpr) {
            uint4 w = __ldg(w4 + c);
            float4 a = rb4(__ldg(x4 + 2 * c)), b = rb4(__ldg(x4 + 2 * c + 1));
            acc += bf_lo(w.x) * a.x + bf_hi(w.x) * a.y + bf_lo(w.y) * a.z + bf_hi(w.y) * a.w
                 + bf_lo(w.z) * b.x + bf_hi(w.z) * b.y + bf_lo(w.w) * b.z + bf_hi(w.w) * b.w;
        }
    } else {
        for (int i = t; i < k; i += tpr) acc += bf(wr[i]) * bf(to_bf(x[i]));
    }
    return acc;
}

// Sums `v` over the `tpr` threads (a multiple of 32, at most 1024) that share a row;
// the result is valid in the row's first thread.
__device__ __forceinline__ float row_sum(float v, int tpr) {
    __shared__ float part[32];
    v = warp_sum(v);
    if (tpr == 32) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float s = 0.0f;
    if ((threadIdx.x % tpr) == 0) {
        int w0 = warp, nw = tpr >> 5;
        for (int i = 0; i < nw; i++) s += part[w0 + i];
    }
    return s;
}

// out[r] (+)= dot(W[r], x) for one token: `tpr` threads per output row (blockDim.x / tpr
// rows per block), so long rows are split over more threads and short ones packed.
extern "C" __global__ void shoal_gemv(float* out, const float* x, const bf16* w, int n, int k, int accumulate, int tpr) {
    int row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    int t = threadIdx.x % tpr;
    float d = row < n ? row_part(w + (u64)row * k, x, k, t, tpr) : 0.0f;
    d = row_sum(d, tpr);
    if (row < n && t == 0) out[row] = accumulate ? out[row] + d : d;
}

// The Q, K and V projections of one token in one launch: rows [0, n0) of w0, then n1 rows
// of w1, then n2 rows of w2, all of `k` inputs.
extern "C" __global__ void shoal_gemv3(float* o0, float* o1, float* o2, const float* x, const bf16* w0,
                                       const bf16* w1, const bf16* w2, int n0, int n1, int n2, int k, int tpr) {
    int row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    int t = threadIdx.x % tpr;
    float* o = o0;
    const bf16* w = w0;
    int r = row;
    if (r >= n0) { r -= n0; o = o1; w = w1;
        if (r >= n1) { r -= n1; o = o2; w = w2; }
    }
    bool live = row < n0 + n1 + n2;
    float d = live ? row_part(w + (u64)r * k, x, k, t, tpr) : 0.0f;
    d = row_sum(d, tpr);
    if (live && t == 0) o[r] = d;
}

// out[r] = silu(dot(G[r], x)) * dot(U[r], x) for one token: the fused SwiGLU projection.
extern "C" __global__ void shoal_gemv_swiglu(float* out, const float* x, const bf16* g, const bf16* u, int n, int k,
                                             int tpr) {
    int row = blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
    int t = threadIdx.x % tpr;
    float a = 0.0f, b = 0.0f;
    if (row < n) {
        a = row_part(g + (u64)row * k, x, k, t, tpr);
        b = row_part(u + (u64)row * k, x, k, t, tpr);
    }
    a = row_sum(a, tpr);
    __syncthreads();
    b = row_sum(b, tpr);
    if (row < n && t == 0) out[row] = silu(a) * b;
}

extern "C" __global__ void shoal_to_bf16(bf16* dst, const float* src, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] = to_bf(src[i]);
}

// gate = silu(gate) * up.
extern "C" __global__ void shoal_swiglu(float* gate, const float* up, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        gate[i] = silu(gate[i]) * up[i];
}

// x[r, :] += b, one block per row.
extern "C" __global__ void shoal_add_bias(float* x, const float* b, int width) {
    float* xr = x + (u64)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) xr[i] += b[i];
}

// Rotary embedding, one block per token; pairs (2j, 2j+1) or (j, j+half) when neox.
extern "C" __global__ void shoal_rope(float* x, const float* inv_freq, const int* step, int heads, int head_dim,
                                      int half, int neox) {
    int t = blockIdx.x;
    double pos = (double)step[POS + t];
    float* xr = x + (u64)t * heads * head_dim;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        double s, c;
        sincos(pos * (double)inv_freq[j], &s, &c);
        float sf = (float)s, cf = (float)c;
        int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        float* hx = xr + h * head_dim;
        float x0 = hx[a], x1 = hx[b];
        hx[a] = x0 * cf - x1 * sf;
        hx[b] = x0 * sf + x1 * cf;
    }
}

// Rotary embedding of queries (heads_q) and keys (heads_k) in one launch, one block per
// token.
extern "C" __global__ void shoal_rope_qk(float* q, float* k, const float* inv_freq, const int* step, int heads_q,
                                         int heads_k, int head_dim, int half, int neox) {
    int t = blockIdx.x;
    double pos = (double)step[POS + t];
    for (int i = threadIdx.x; i < (heads_q + heads_k) * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float* hx = h < heads_q ? q + ((u64)t * heads_q + h) * head_dim : k + ((u64)t * heads_k + h - heads_q) * head_dim;
        double s, c;
        sincos(pos * (double)inv_freq[j], &s, &c);
        float sf = (float)s, cf = (float)c;
        int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        float x0 = hx[a], x1 = hx[b];
        hx[a] = x0 * cf - x1 * sf;
        hx[b] = x0 * sf + x1 * cf;
    }
}

__device__ __forceinline__ bf16* kv_at(bf16* pool, const int* table, int pos, int layer, int n_layers, int kv_dim,
                                       int which) {
    u64 blk = (u64)table[pos / KV_BLOCK];
    return pool + ((blk * n_layers + layer) * 2 + which) * KV_BLOCK * (u64)kv_dim + (u64)(pos % KV_BLOCK) * kv_dim;
}

// Writes the pass's keys and values into each token's session's blocks, one block per token.
extern "C" __global__ void shoal_kv_store(bf16* pool, const float* k, const float* v, const int* step,
                                          const int* tables, int layer, int n_layers, int kv_dim) {
    int t = blockIdx.x;
    int pos = step[POS + t];
    const int* table = tables + step[TAB + t];
    bf16* kd = kv_at(pool, table, pos, layer, n_layers, kv_dim, 0);
    bf16* vd = kv_at(pool, table, pos, layer, n_layers, kv_dim, 1);
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kd[i] = to_bf(k[(u64)t * kv_dim + i]);
        vd[i] = to_bf(v[(u64)t * kv_dim + i]);
    }
}

// The end of a decode attention block: merges its warps' online softmaxes (maxima `sm_m`,
// sums `sm_l`, weighted values `acc(warp, head, dim)`) and writes one partial record per query
// head of the group to `part` ([token][q head][split] records of (max, sum, acc[head_dim])),
// which shoal_attention_merge combines across splits.
template <typename Acc>
__device__ __forceinline__ void write_split(float* part, const float (*sm_m)[MAX_GROUP], const float (*sm_l)[MAX_GROUP],
                                            Acc acc, int t, int kvh, int group, int n_heads, int head_dim) {
    int split = blockIdx.z, splits = gridDim.z, rec = head_dim + 2;
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
        int g = i / head_dim, d = i % head_dim;
        float mx = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, sm_m[w][g]);
        float sum = 0.0f, a = 0.0f;
        if (mx != NEG_INF) {
            for (int w = 0; w < ATT_WARPS; w++) {
                float f = expf(sm_m[w][g] - mx);
                sum += sm_l[w][g] * f;
                a += acc(w, g, d) * f;
            }
        }
        float* r = part + (((u64)t * n_heads + kvh * group + g) * splits + split) * rec;
        if (d == 0) {
            r[0] = mx;
            r[1] = sum;
        }
        r[2 + d] = a;
    }
}

// Causal attention, split over positions. Block (kv head, token, split) handles the query
// heads sharing one key/value head, so each key and value row is read once for all of
// them; its warps take positions split*ATT_WARPS + warp, + splits*ATT_WARPS, ... with an
// online softmax. Partial results go to `part` as [token][q head][split] records of
// (max, sum, acc[head_dim]); shoal_attention_merge combines them.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention(float* part, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    int kvh = blockIdx.x, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * head_dim, q_dim = n_heads * head_dim;
    int len = step[POS + t] + 1;
    const int* table = tables + step[TAB + t];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    float qr[MAX_GROUP][MAX_PER_LANE], acc[MAX_GROUP][MAX_PER_LANE], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int d = 0; d < MAX_PER_LANE; d++) {
            acc[g][d] = 0.0f;
            qr[g][d] = (g < group && lane + 32 * d < head_dim) ? q[(u64)t * q_dim + (kvh * group + g) * head_dim + lane + 32 * d] * scale
                                              : 0.0f;
        }
    }
    for (int s = split * ATT_WARPS + warp; s < len; s += splits * ATT_WARPS) {
        const bf16* kr = kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 0) + kvh * head_dim;
        const bf16* vr = kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 1) + kvh * head_dim;
        float kk[MAX_PER_LANE], vv[MAX_PER_LANE];
#pragma unroll
        for (int d = 0; d < MAX_PER_LANE; d++) {
            kk[d] = lane + 32 * d < head_dim ? bf(kr[lane + 32 * d]) : 0.0f;
            vv[d] = lane + 32 * d < head_dim ? bf(vr[lane + 32 * d]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g < group) {
                float sc = 0.0f;
#pragma unroll
                for (int d = 0; d < MAX_PER_LANE; d++) sc += qr[g][d] * kk[d];
                sc = warp_sum(sc);
                float mn = fmaxf(m[g], sc);
                float corr = expf(m[g] - mn), p = expf(sc - mn);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int d = 0; d < MAX_PER_LANE; d++) acc[g][d] = acc[g][d] * corr + p * vv[d];
                m[g] = mn;
            }
        }
    }
    // Combine this block's warps.
    __shared__ float sm_m[ATT_WARPS][MAX_GROUP], sm_l[ATT_WARPS][MAX_GROUP];
    __shared__ float sm_acc[ATT_WARPS][MAX_GROUP][MAX_PER_LANE * 32];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int d = 0; d < MAX_PER_LANE; d++) sm_acc[warp][g][lane + 32 * d] = acc[g][d];
    }
    __syncthreads();
    write_split(part, sm_m, sm_l, [&](int w, int g, int d) { return sm_acc[w][g][d]; }, t, kvh, group, n_heads,
                head_dim);
}

// Causal attention for passes with prompt chunks, one block per (key/value head, tile): a tile
// is up to 32 / group consecutive tokens of one sequence, step[TILES + i] = first row | count
// << 16. Keys and values are loaded TILE_KEYS positions at a time into shared memory, once for
// every token of the tile and every query head sharing the key/value head (the per-token kernel
// above reads them once per token); a lane scores one key, then sums one value dimension, with
// an online softmax per (token, head) pair; a warp owns pairs warp, warp + 4, ... (at most 8).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention_tiled(float* out, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                      int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    __shared__ bf16 ks[TILE_KEYS][130];   // +2: rows start on different banks
    __shared__ bf16 vs[TILE_KEYS][128];
    __shared__ float qs[32][128];
    __shared__ float ps[ATT_WARPS][TILE_KEYS];
    int kvh = blockIdx.x;
    int desc = step[TILES + blockIdx.y];
    int r0 = desc & 0xffff, cnt = desc >> 16;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * head_dim, q_dim = n_heads * head_dim;
    int pos0 = step[POS + r0];
    const int* table = tables + step[TAB + r0];
    int last = pos0 + cnt - 1;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int pairs = cnt * group;
    for (int i = threadIdx.x; i < pairs * head_dim; i += blockDim.x) {
        int p = i / head_dim, d = i % head_dim;
        int t = p / group, g = p % group;
        qs[p][d] = q[(u64)(r0 + t) * q_dim + (kvh * group + g) * head_dim + d] * scale;
    }
    float m[8], l[8], acc[8][MAX_PER_LANE];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        m[j] = NEG_INF;
        l[j] = 0.0f;
#pragma unroll
        for (int d = 0; d < MAX_PER_LANE; d++) acc[j][d] = 0.0f;
    }
    for (int k0 = 0; k0 <= last; k0 += TILE_KEYS) {
        __syncthreads();
        for (int i = threadIdx.x; i < TILE_KEYS * head_dim; i += blockDim.x) {
            int j = i / head_dim, d = i % head_dim;
            int s = k0 + j;
            bf16 kv = 0, vv = 0;
            if (s <= last) {
                kv = kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 0)[kvh * head_dim + d];
                vv = kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 1)[kvh * head_dim + d];
            }
            ks[j][d] = kv;
            vs[j][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int p = warp + ATT_WARPS * j;
            if (p < pairs) {
                int tpos = pos0 + p / group;
                int s = k0 + lane;
                float sc = NEG_INF;
                if (s <= tpos) {
                    float a = 0.0f;
                    for (int d = 0; d < head_dim; d++) a += qs[p][d] * bf(ks[lane][d]);
                    sc = a;
                }
                float mn = fmaxf(m[j], warp_max(sc));
                if (mn != NEG_INF) {
                    float corr = expf(m[j] - mn);
                    float pj = expf(sc - mn);
                    l[j] = l[j] * corr + warp_sum(pj);
                    ps[warp][lane] = pj;
                    __syncwarp();
#pragma unroll
                    for (int dd = 0; dd < MAX_PER_LANE; dd++) {
                        int d = lane + 32 * dd;
                        if (d < head_dim) {
                            float a = acc[j][dd] * corr;
                            for (int k = 0; k < TILE_KEYS; k++) a += ps[warp][k] * bf(vs[k][d]);
                            acc[j][dd] = a;
                        }
                    }
                    __syncwarp();
                    m[j] = mn;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int p = warp + ATT_WARPS * j;
        if (p < pairs) {
            int t = p / group, g = p % group;
            float* o = out + (u64)(r0 + t) * q_dim + (kvh * group + g) * head_dim;
#pragma unroll
            for (int dd = 0; dd < MAX_PER_LANE; dd++) {
                int d = lane + 32 * dd;
                if (d < head_dim) o[d] = acc[j][dd] / l[j];
            }
        }
    }
}

// Decode attention for head sizes 64 and 128 (the per-token kernel above serves the others):
// the same blocks, splits and partial records as shoal_attention, but a warp takes 32
// consecutive positions at once (chunk c = split * ATT_WARPS + warp, + splits * ATT_WARPS, ...):
// lane j loads key and value row c * 32 + j whole (16-byte loads, every load of a chunk in
// flight together), scores its key for every query head of the group, and the warp updates
// its online softmax once per chunk (one max per head), not once per position. Values go
// through shared memory so that lane j then sums dimensions j * HD / 32 ... of all 32 rows.
template <int HD>
__device__ __forceinline__ void attention_chunks(float* part, const float* q, const bf16* pool, const int* step,
                                                 const int* tables, int layer, int n_layers, int n_heads,
                                                 int n_kv_heads, float scale) {
    constexpr int PL = HD / 32;  // value dimensions per lane
    constexpr int V8 = HD / 8;   // 16-byte loads per row
    __shared__ float qs[MAX_GROUP][HD];
    __shared__ float ps[ATT_WARPS][MAX_GROUP][32];
    __shared__ __align__(16) bf16 vs[ATT_WARPS][32][HD];  // later: each warp's partial sums
    __shared__ float sm_m[ATT_WARPS][MAX_GROUP], sm_l[ATT_WARPS][MAX_GROUP];
    int kvh = blockIdx.x, t = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * HD, q_dim = n_heads * HD;
    int len = step[POS + t] + 1;
    const int* table = tables + step[TAB + t];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x)
        qs[i / HD][i % HD] = q[(u64)t * q_dim + (u64)kvh * group * HD + i] * scale;
    __syncthreads();
    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][PL];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < PL; e++) acc[g][e] = 0.0f;
    }
    for (int c = split * ATT_WARPS + warp; c * 32 < len; c += splits * ATT_WARPS) {
        int s = c * 32 + lane;
        bool ok = s < len;
        uint4 kk[V8], vv[V8];
        if (ok) {
            const uint4* kr = (const uint4*)(kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 0) + kvh * HD);
            const uint4* vr = (const uint4*)(kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 1) + kvh * HD);
#pragma unroll
            for (int i = 0; i < V8; i++) {
                kk[i] = kr[i];
                vv[i] = vr[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < V8; i++) kk[i] = vv[i] = make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < V8; i++) ((uint4*)vs[warp][lane])[i] = vv[i];
        float sc[MAX_GROUP];
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            float a = 0.0f;
            if (g < group) {
#pragma unroll
                for (int i = 0; i < V8; i++) {
                    const float* qg = &qs[g][i * 8];
                    a += qg[0] * bf_lo(kk[i].x) + qg[1] * bf_hi(kk[i].x) + qg[2] * bf_lo(kk[i].y) +
                         qg[3] * bf_hi(kk[i].y) + qg[4] * bf_lo(kk[i].z) + qg[5] * bf_hi(kk[i].z) +
                         qg[6] * bf_lo(kk[i].w) + qg[7] * bf_hi(kk[i].w);
                }
            }
            sc[g] = ok ? a : NEG_INF;
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g < group) {
                float mn = fmaxf(m[g], warp_max(sc[g]));  // finite: lane 0's position is < len
                float corr = expf(m[g] - mn), p = expf(sc[g] - mn);
                l[g] = l[g] * corr + p;  // this lane's share; summed over the warp at the end
                ps[warp][g][lane] = p;
#pragma unroll
                for (int e = 0; e < PL; e++) acc[g][e] *= corr;
                m[g] = mn;
            }
        }
        __syncwarp();
#pragma unroll 8
        for (int k = 0; k < 32; k++) {
            float v[PL];
            if constexpr (PL == 2) {
                unsigned w = *(const unsigned*)&vs[warp][k][lane * 2];
                v[0] = bf_lo(w);
                v[1] = bf_hi(w);
            } else {
                uint2 w = *(const uint2*)&vs[warp][k][lane * 4];
                v[0] = bf_lo(w.x);
                v[1] = bf_hi(w.x);
                v[2] = bf_lo(w.y);
                v[3] = bf_hi(w.y);
            }
#pragma unroll
            for (int g = 0; g < MAX_GROUP; g++) {
                if (g < group) {
                    float p = ps[warp][g][k];
#pragma unroll
                    for (int e = 0; e < PL; e++) acc[g][e] += p * v[e];
                }
            }
        }
        __syncwarp();
    }
    // Combine this block's warps (each warp's sums go where its values were).
    float* sm_acc = (float*)vs[warp];  // [MAX_GROUP][HD] floats fit in 32 * HD bf16
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
            float lw = warp_sum(l[g]);
            if (lane == 0) {
                sm_m[warp][g] = m[g];
                sm_l[warp][g] = lw;
            }
#pragma unroll
            for (int e = 0; e < PL; e++) sm_acc[g * HD + lane * PL + e] = acc[g][e];
        }
    }
    __syncthreads();
    write_split(part, sm_m, sm_l, [&](int w, int g, int d) { return ((const float*)vs[w])[g * HD + d]; }, t, kvh,
                group, n_heads, HD);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention_d64(float* part, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                    int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    attention_chunks<64>(part, q, pool, step, tables, layer, n_layers, n_heads, n_kv_heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention_d128(float* part, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                     int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    attention_chunks<128>(part, q, pool, step, tables, layer, n_layers, n_heads, n_kv_heads, scale);
}

// Prompt attention on tensor cores (sm_80 and later; head sizes 64 and 128), flash-attention
// style: one block of 4 warps per (key/value head, tile), a tile being up to 64 / group
// consecutive tokens of one sequence, so its 64 rows are (token, query head) pairs of one
// key/value head (a warp owns 16 rows). Keys and values are copied into shared memory
// (cp.async, two buffers: the next positions load while these are used) BK positions at a
// time, once for all the tile's rows; S = Q K^T and O += P V are bf16 mma.sync m16n8k16
// products with f32 accumulation, their B operands read with ldmatrix (values transposed on
// the way), the online softmax runs on the accumulators (base 2), and P is rounded to bf16
// for the second product.
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// Four 8x8 bf16 matrices from shared memory (lanes 8i..8i+7 give matrix i's row addresses);
// `trans` hands each lane the transposed fragment.
template <bool TRANS>
__device__ __forceinline__ void ldsm4(unsigned* r, unsigned addr) {
#if __CUDA_ARCH__ >= 800
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#else
    __trap();
#endif
}

// 16 bytes global -> shared without registers; zeros when !ok.
__device__ __forceinline__ void cp16(unsigned dst, const void* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
#else
    __trap();
#endif
}

__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

__device__ __forceinline__ void cp_wait_1() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}

__device__ __forceinline__ unsigned pack_bf(float lo, float hi) {
    return (unsigned)to_bf(lo) | ((unsigned)to_bf(hi) << 16);
}

template <int HD>
__device__ __forceinline__ void attention_mma(float* out, const float* q, const bf16* pool, const int* step,
                                              const int* tables, int layer, int n_layers, int n_heads,
                                              int n_kv_heads, float scale) {
    constexpr int BK = HD == 64 ? 64 : 32;  // positions per tile (two buffers of K and V fit 48 KB)
    constexpr int KP = HD + 8;              // row pitch (bf16): 16-byte rows on distinct banks
    __shared__ __align__(16) bf16 ks[2][BK * KP];
    __shared__ __align__(16) bf16 vs[2][BK * KP];
    int kvh = blockIdx.x;
    int desc = step[TILES + blockIdx.y];
    int r0 = desc & 0xffff, cnt = desc >> 16;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * HD, q_dim = n_heads * HD;
    int pos0 = step[POS + r0];
    const int* table = tables + step[TAB + r0];
    int last = pos0 + cnt - 1;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gq = lane >> 2, tq = lane & 3;
    // Copies a tile of positions k0.. into buffer b.
    auto load = [&](int k0, int b) {
        for (int i = threadIdx.x; i < BK * (HD / 8); i += blockDim.x) {
            int j = i / (HD / 8), d8 = (i % (HD / 8)) * 8;
            int s = k0 + j;
            bool ok = s <= last;
            const bf16* kr = ok ? kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 0) + kvh * HD + d8 : pool;
            const bf16* vr = ok ? kv_at((bf16*)pool, table, s, layer, n_layers, kv_dim, 1) + kvh * HD + d8 : pool;
            cp16(smem_addr(&ks[b][j * KP + d8]), kr, ok);
            cp16(smem_addr(&vs[b][j * KP + d8]), vr, ok);
        }
        cp_commit();
    };
    int tiles = last / BK + 1;
    load(0, 0);
    // This thread's rows: a = 16 warp + gq and b = a + 8 (rows past the tile repeat its last
    // token and are not written).
    int ra = warp * 16 + gq, rb = ra + 8;
    int ta = min(ra / group, cnt - 1), tb = min(rb / group, cnt - 1);
    int pa = pos0 + ta, pb = pos0 + tb;
    int warp_last = pos0 + min((warp * 16 + 15) / group, cnt - 1);
    const float* qa = q + (u64)(r0 + ta) * q_dim + (kvh * group + ra % group) * HD;
    const float* qb = q + (u64)(r0 + tb) * q_dim + (kvh * group + rb % group) * HD;
    float sl = scale * 1.4426950408889634f;
    unsigned qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        int c = kk * 16 + tq * 2;
        qf[kk][0] = pack_bf(qa[c] * sl, qa[c + 1] * sl);
        qf[kk][1] = pack_bf(qb[c] * sl, qb[c + 1] * sl);
        qf[kk][2] = pack_bf(qa[c + 8] * sl, qa[c + 9] * sl);
        qf[kk][3] = pack_bf(qb[c + 8] * sl, qb[c + 9] * sl);
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;
    // ldmatrix row addresses: K as B of S = Q K^T (rows = positions, two 8-wide column
    // halves per 16 of the head); V as B of P V, transposed (rows = positions).
    int k_row = lane & 7, k_col = ((lane >> 3) & 1) * 8 + (lane >> 4) * 16;
    int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_col = (lane >> 4) * 8;
    for (int it = 0; it < tiles; it++) {
        int k0 = it * BK, b = it & 1;
        if (it + 1 < tiles) load(k0 + BK, b ^ 1);
        else cp_commit();  // an empty group keeps the count of groups to wait for the same
        cp_wait_1();
        __syncthreads();
        if (k0 <= warp_last) {
            float s[BK / 8][4];
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk += 2) {
                    unsigned r[4];
                    ldsm4<false>(r, smem_addr(&ks[b][(n * 8 + k_row) * KP + kk * 16 + k_col]));
                    mma_bf16(s[n], qf[kk], r[0], r[1]);
                    mma_bf16(s[n], qf[kk + 1], r[2], r[3]);
                }
            }
            float mxa = ma, mxb = mb;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                int key = k0 + n * 8 + tq * 2;
                if (key > pa) s[n][0] = NEG_INF;
                if (key + 1 > pa) s[n][1] = NEG_INF;
                if (key > pb) s[n][2] = NEG_INF;
                if (key + 1 > pb) s[n][3] = NEG_INF;
                mxa = fmaxf(mxa, fmaxf(s[n][0], s[n][1]));
                mxb = fmaxf(mxb, fmaxf(s[n][2], s[n][3]));
            }
            mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
            mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
            // Position 0 is in the first tile and before every row: the maxima are finite.
            float ca = exp2f(ma - mxa), cb = exp2f(mb - mxb);
            ma = mxa;
            mb = mxb;
            la *= ca;
            lb *= cb;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[n][0] *= ca;
                o[n][1] *= ca;
                o[n][2] *= cb;
                o[n][3] *= cb;
            }
            unsigned pf[BK / 16][4];
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                float p0 = exp2f(s[n][0] - ma), p1 = exp2f(s[n][1] - ma);
                float p2 = exp2f(s[n][2] - mb), p3 = exp2f(s[n][3] - mb);
                la += p0 + p1;
                lb += p2 + p3;
                pf[n / 2][(n & 1) * 2] = pack_bf(p0, p1);
                pf[n / 2][(n & 1) * 2 + 1] = pack_bf(p2, p3);
            }
#pragma unroll
            for (int kt = 0; kt < BK / 16; kt++) {
#pragma unroll
                for (int n = 0; n < HD / 8; n += 2) {
                    unsigned r[4];
                    ldsm4<true>(r, smem_addr(&vs[b][(kt * 16 + v_row) * KP + n * 8 + v_col]));
                    mma_bf16(o[n], pf[kt], r[0], r[1]);
                    mma_bf16(o[n + 1], pf[kt], r[2], r[3]);
                }
            }
        }
        __syncthreads();  // the next iteration loads into the buffer just read
    }
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    if (ra / group < cnt) {
        float* oa = out + (u64)(r0 + ta) * q_dim + (kvh * group + ra % group) * HD + tq * 2;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) *(float2*)&oa[n * 8] = make_float2(o[n][0] / la, o[n][1] / la);
    }
    if (rb / group < cnt) {
        float* ob = out + (u64)(r0 + tb) * q_dim + (kvh * group + rb % group) * HD + tq * 2;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) *(float2*)&ob[n * 8] = make_float2(o[n][2] / lb, o[n][3] / lb);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention_mma64(float* out, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                      int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    attention_mma<64>(out, q, pool, step, tables, layer, n_layers, n_heads, n_kv_heads, scale);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
shoal_attention_mma128(float* out, const float* q, const bf16* pool, const int* step, const int* tables, int layer,
                       int n_layers, int n_heads, int n_kv_heads, int head_dim, float scale) {
    attention_mma<128>(out, q, pool, step, tables, layer, n_layers, n_heads, n_kv_heads, scale);
}

// out[t, h, :] from the splits' partial records; one block per (q head, token).
extern "C" __global__ void shoal_attention_merge(float* out, const float* part, int n_heads, int head_dim, int splits) {
    int h = blockIdx.x, t = blockIdx.y;
    int rec = head_dim + 2;
    const float* r = part + ((u64)t * n_heads + h) * splits * rec;
    float mx = NEG_INF;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, r[s * rec]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f, a = 0.0f;
        for (int s = 0; s < splits; s++) {
            float m = r[s * rec];
            if (m == NEG_INF) continue;
            float f = expf(m - mx);
            sum += r[s * rec + 1] * f;
            a += r[s * rec + 2 + d] * f;
        }
        out[((u64)t * n_heads + h) * head_dim + d] = a / sum;
    }
}

// out[s] = x[row of sequence s's last token], one block per sequence.
extern "C" __global__ void shoal_gather_rows(float* out, const float* x, const int* step, int width) {
    const float* src = x + (u64)step[LAST + blockIdx.x] * width;
    float* dst = out + (u64)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// The repetition penalty of each sequence of a pass (blockIdx.y): `buf` holds offs[n_seqs + 1],
// then penalties[n_seqs] (float bits), then the ids, distinct and in the vocabulary per
// sequence, of sequence s at [offs[s], offs[s + 1]).
extern "C" __global__ void shoal_penalize(float* logits, const int* buf, int n_seqs, int vocab) {
    int s = blockIdx.y;
    const int* offs = buf;
    float penalty = __int_as_float(buf[n_seqs + 1 + s]);
    const int* ids = buf + 2 * n_seqs + 1;
    int i = offs[s] + blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= offs[s + 1] || penalty == 1.0f) return;
    float* row = logits + (u64)s * vocab;
    float v = row[ids[i]];
    row[ids[i]] = v > 0.0f ? v / penalty : v * penalty;
}

// Index of the largest logit (the first on ties; NaN never wins), one block of 1024.
// The largest value across a warp and its smallest index (ties go to the lower index).
__device__ __forceinline__ void warp_argmax(float& best, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
}

// One block per row of `logits` ([rows, n]): out[row].
extern "C" __global__ void shoal_argmax(int* out, const float* logits, int n) {
    out += blockIdx.x;
    logits += (u64)blockIdx.x * n;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = logits[i];
        if (v > best || (v == best && i < bi)) {
            best = v;
            bi = i;
        }
    }
    warp_argmax(best, bi);
    __shared__ float sv[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : NEG_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        warp_argmax(best, bi);
        if (lane == 0) out[0] = bi == 0x7fffffff ? 0 : bi;
    }
}

// An order-preserving unsigned key of a float; NaN sorts below everything.
__device__ __forceinline__ unsigned fkey(float f) {
    unsigned b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

#define SAMPLE_MAX 1024

// Samples one token as shoal's CPU sampler does (crate::sampler::Sampler): the top_k
// (1..=1024) largest logits, scaled by inv_temp, sorted (value desc, then id), softmax in
// f64, the top_p nucleus, then the token where u (in [0, 1), from the seed and step) falls.
// One block of 1024 threads. Ties at the top-k boundary keep the lowest ids.
extern "C" __global__ void __launch_bounds__(1024)
shoal_sample(int* out, const float* logits, int n, float inv_temp, int top_k, float top_p, double u) {
    __shared__ float sv[SAMPLE_MAX];
    __shared__ int si[SAMPLE_MAX];
    __shared__ double sp[SAMPLE_MAX];
    __shared__ int hist[256];
    __shared__ int ties[1024];
    __shared__ unsigned s_prefix, s_mask;
    __shared__ int s_remaining, s_above;
    int tid = threadIdx.x, nt = blockDim.x;
    int k = top_k < n ? top_k : n;
    if (tid == 0) {
        s_prefix = 0u;
        s_mask = 0u;
        s_remaining = k;
        s_above = 0;
    }
    __syncthreads();
    // Radix select: the key of the k-th largest, 8 bits a pass.
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += nt) hist[i] = 0;
        __syncthreads();
        unsigned prefix = s_prefix, mask = s_mask;
        for (int i = tid; i < n; i += nt) {
            unsigned key = fkey(logits[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
        }
        __syncthreads();
        if (tid == 0) {
            int rem = s_remaining, above = 0;
            for (int b = 255; b >= 0; b--) {
                if (above + hist[b] >= rem) {
                    s_prefix = prefix | ((unsigned)b << shift);
                    s_mask = mask | (255u << shift);
                    s_remaining = rem - above;
                    break;
                }
                above += hist[b];
            }
        }
        __syncthreads();
    }
    unsigned thr = s_prefix;
    int take_ties = s_remaining;   // how many logits equal to the threshold to keep
    int n_above = k - take_ties;
    // Gather: everything above the threshold (any order: sorted below), then the
    // lowest-id ties, in id order (a scan over contiguous chunks).
    int chunk = (n + nt - 1) / nt;
    int lo = tid * chunk, hi = min(n, lo + chunk);
    int my_ties = 0;
    for (int i = lo; i < hi; i++) {
        unsigned key = fkey(logits[i]);
        if (key > thr) {
            int slot = atomicAdd(&s_above, 1);
            sv[slot] = logits[i];
            si[slot] = i;
        } else if (key == thr) {
            my_ties++;
        }
    }
    ties[tid] = my_ties;
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int t = 0; t < nt; t++) {
            int c = ties[t];
            ties[t] = run;
            run += c;
        }
    }
    __syncthreads();
    int rank = ties[tid];
    for (int i = lo; i < hi && rank < take_ties; i++) {
        if (fkey(logits[i]) == thr) {
            sv[n_above + rank] = logits[i];
            si[n_above + rank] = i;
            rank++;
        }
    }
    for (int i = k + tid; i < SAMPLE_MAX; i += nt) {
        sv[i] = NEG_INF;
        si[i] = 0x7fffffff;
    }
    __syncthreads();
    // Bitonic sort of SAMPLE_MAX entries: value descending, then id ascending.
    for (int size = 2; size <= SAMPLE_MAX; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < SAMPLE_MAX; i += nt) {
                int j = i ^ stride;
                if (j > i) {
                    bool desc = (i & size) == 0;
                    float a = sv[i], b = sv[j];
                    int ia = si[i], ib = si[j];
                    // "a before b" in the final order.
                    bool a_first = a > b || (a == b && ia < ib) || (b != b && a == a);
                    if (desc != a_first) {
                        sv[i] = b; sv[j] = a;
                        si[i] = ib; si[j] = ia;
                    }
                }
            }
            __syncthreads();
        }
    }
    // Probabilities as the CPU sampler computes them.
    float top = sv[0] * inv_temp;
    for (int i = tid; i < k; i += nt) {
        float d = sv[i] * inv_temp - top;
        sp[i] = exp((double)d);
    }
    __syncthreads();
    if (tid == 0) {
        if (!(top == top) || top == __int_as_float(0x7f800000) || top == NEG_INF) {
            out[0] = si[0];
            return;
        }
        double total = 0.0;
        for (int i = 0; i < k; i++) total += sp[i];
        int keep = k;
        if (top_p > 0.0f && top_p < 1.0f) {
            double target = (double)top_p * total, cum = 0.0;
            for (int i = 0; i < k; i++) {
                cum += sp[i];
                if (cum >= target) {
                    keep = i + 1;
                    break;
                }
            }
        }
        double kept = 0.0;
        for (int i = 0; i < keep; i++) kept += sp[i];
        double x = u * kept;
        int pick = si[keep - 1];
        for (int i = 0; i < keep; i++) {
            if (x < sp[i]) {
                pick = si[i];
                break;
            }
            x -= sp[i];
        }
        out[0] = pick;
    }
}
