// C = alpha * op(A) * op(B) + beta * C over one tile of a row-major GEMM.
// Every index is relative to the window bound for the operand (see mod.rs: plan).
// All three operands are read_write storage so that one imported guest buffer can
// back several of them in the same dispatch.

struct Params {
    m: u32, n: u32, k: u32, flags: u32,   // flags: 1 trans_a, 2 trans_b, 4 read C (beta != 0)
    lda: u32, ldb: u32, ldc: u32, pad0: u32,
    a_off: u32, b_off: u32, c_off: u32, pad1: u32,
    alpha: f32, beta: f32, pad2: f32, pad3: f32,
}

@group(0) @binding(0) var<storage, read_write> A: array<f32>;
@group(0) @binding(1) var<storage, read_write> B: array<f32>;
@group(0) @binding(2) var<storage, read_write> C: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [kk][i], TK x TM
var<workgroup> Bs: array<f32, 1024>; // [kk][j], TK x TN

fn load_a(i: u32, p: u32) -> f32 {
    if (i >= P.m || p >= P.k) { return 0.0; }
    if ((P.flags & 1u) != 0u) { return A[P.a_off + p * P.lda + i]; }
    return A[P.a_off + i * P.lda + p];
}

fn load_b(p: u32, j: u32) -> f32 {
    if (p >= P.k || j >= P.n) { return 0.0; }
    if ((P.flags & 2u) != 0u) { return B[P.b_off + j * P.ldb + p]; }
    return B[P.b_off + p * P.ldb + j];
}

@compute @workgroup_size(16, 16, 1)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    let tid = lid.y * 16u + lid.x;
    let trans_a = (P.flags & 1u) != 0u;
    let trans_b = (P.flags & 2u) != 0u;
    var acc: array<f32, 16>;
    for (var p0 = 0u; p0 < P.k; p0 = p0 + TK) {
        for (var t = 0u; t < 4u; t = t + 1u) {
            let e = tid + t * 256u;
            // Consecutive threads read consecutive addresses of the stored matrix.
            var i: u32; var ka: u32;
            if (trans_a) { ka = e / TM; i = e % TM; } else { i = e / TK; ka = e % TK; }
            As[ka * TM + i] = load_a(row0 + i, p0 + ka);
            var j: u32; var kb: u32;
            if (trans_b) { j = e / TK; kb = e % TK; } else { kb = e / TN; j = e % TN; }
            Bs[kb * TN + j] = load_b(p0 + kb, col0 + j);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < 4u; r = r + 1u) { av[r] = As[kk * TM + lid.y * 4u + r]; }
            for (var c = 0u; c < 4u; c = c + 1u) { bv[c] = Bs[kk * TN + lid.x * 4u + c]; }
            for (var r = 0u; r < 4u; r = r + 1u) {
                for (var c = 0u; c < 4u; c = c + 1u) {
                    acc[r * 4u + c] = fma(av[r], bv[c], acc[r * 4u + c]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = row0 + lid.y * 4u + r;
        if (i >= P.m) { continue; }
        for (var c = 0u; c < 4u; c = c + 1u) {
            let j = col0 + lid.x * 4u + c;
            if (j >= P.n) { continue; }
            let idx = P.c_off + i * P.ldc + j;
            // With no product (k == 0) alpha is not applied, as on the CPU (BLAS).
            var v = 0.0;
            if (P.k > 0u) { v = P.alpha * acc[r * 4u + c]; }
            if ((P.flags & 4u) != 0u) { v = v + P.beta * C[idx]; }
            C[idx] = v;
        }
    }
}
