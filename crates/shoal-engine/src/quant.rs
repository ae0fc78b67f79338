//! ggml tensor types: block sizes and dequantization to `f32`.
//!
//! GGUF tensors are stored in ggml's block formats. A block holds a fixed number of
//! elements (32 for the classic types, 256 for the "K" types) in a fixed number of
//! bytes; every multi-byte field is little-endian. The layouts here follow
//! `ggml-common.h` and the reference `dequantize_row_*` functions of `ggml-quants.c`
//! exactly, including the order of the floating-point operations, so that the
//! results match llama.cpp's CPU reference bit for bit.
//!
//! | type  | elements | bytes | layout                                                   |
//! |-------|---------:|------:|----------------------------------------------------------|
//! | F32   |        1 |     4 | `f32`                                                    |
//! | F16   |        1 |     2 | IEEE half                                                |
//! | BF16  |        1 |     2 | bfloat16 (top half of an `f32`)                          |
//! | Q4_0  |       32 |    18 | `d: f16, qs: [u8; 16]`; `x = (q - 8) * d`                |
//! | Q4_1  |       32 |    20 | `d: f16, m: f16, qs: [u8; 16]`; `x = q * d + m`          |
//! | Q5_0  |       32 |    22 | `d: f16, qh: u32, qs: [u8; 16]`; `x = (q - 16) * d`      |
//! | Q5_1  |       32 |    24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `x = q * d + m` |
//! | Q8_0  |       32 |    34 | `d: f16, qs: [i8; 32]`; `x = q * d`                      |
//! | Q4_K  |      256 |   144 | `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`          |
//! | Q5_K  |      256 |   176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` |
//! | Q6_K  |      256 |   210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`  |
//!
//! In the 32-element types the low nibbles of `qs` are elements 0..16 and the high
//! nibbles elements 16..32 (not interleaved). Q8_1, Q2_K, Q3_K and Q8_K have known
//! sizes ([`type_size`]) but no dequantizer yet.

use crate::gguf::GgmlType;

/// Elements in a "K" super-block.
pub const QK_K: usize = 256;

/// Tensors with at least this many elements are dequantized on several threads.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// Block geometry of a ggml type: `(elements per block, bytes per block)`.
///
/// `None` for the types whose layout this crate does not know ([`GgmlType::Other`]).
pub fn type_size(ty: GgmlType) -> Option<(usize, usize)> {
    Some(match ty {
        GgmlType::F32 => (1, 4),
        GgmlType::F16 | GgmlType::BF16 => (1, 2),
        GgmlType::Q4_0 => (32, 18),
        GgmlType::Q4_1 => (32, 20),
        GgmlType::Q5_0 => (32, 22),
        GgmlType::Q5_1 => (32, 24),
        GgmlType::Q8_0 => (32, 34),
        GgmlType::Q8_1 => (32, 36),
        GgmlType::Q2K => (QK_K, 84),
        GgmlType::Q3K => (QK_K, 110),
        GgmlType::Q4K => (QK_K, 144),
        GgmlType::Q5K => (QK_K, 176),
        GgmlType::Q6K => (QK_K, 210),
        GgmlType::Q8K => (QK_K, 292),
        GgmlType::Other(_) => return None,
    })
}

/// Bytes that `n` elements of type `ty` take, or `None` if the type's layout is unknown
/// or `n` is not a whole number of blocks.
pub fn bytes_for(ty: GgmlType, n: usize) -> Option<usize> {
    let (block_elems, block_bytes) = type_size(ty)?;
    if !n.is_multiple_of(block_elems) {
        return None;
    }
    (n / block_elems).checked_mul(block_bytes)
}

/// Whether [`dequantize`] handles `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    kernel(ty).is_some()
}

/// A dequantizer for a run of whole blocks: `src` holds `k` blocks, `dst` their
/// `k * block_elems` elements.
type Kernel = fn(&[u8], &mut [f32]);

fn kernel(ty: GgmlType) -> Option<Kernel> {
    Some(match ty {
        GgmlType::F32 => dequant_f32,
        GgmlType::F16 => dequant_f16,
        GgmlType::BF16 => dequant_bf16,
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q4K => dequant_q4_k,
        GgmlType::Q5K => dequant_q5_k,
        GgmlType::Q6K => dequant_q6_k,
        _ => return None,
    })
}

/// Dequantizes the first `n` elements stored in `bytes` (type `ty`) into `out[..n]`.
///
/// `n` must be a whole number of blocks, `bytes` must hold at least those blocks
/// (extra bytes are ignored) and `out` at least `n` elements. Supported: F32, F16,
/// BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K; any other type is an
/// error naming it. Large tensors are split over the available cores.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize, out: &mut [f32]) -> Result<(), String> {
    let Some(kernel) = kernel(ty) else {
        return Err(format!(
            "cannot dequantize ggml type {ty}: supported are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"
        ));
    };
    let (block_elems, block_bytes) = type_size(ty).expect("every supported type has a size");
    if !n.is_multiple_of(block_elems) {
        return Err(format!("{n} elements of {ty} are not a whole number of {block_elems}-element blocks"));
    }
    let blocks = n / block_elems;
    let need =
        blocks.checked_mul(block_bytes).ok_or_else(|| format!("{n} elements of {ty} overflow the address space"))?;
    if bytes.len() < need {
        return Err(format!("{n} elements of {ty} need {need} bytes, but only {} were given", bytes.len()));
    }
    if out.len() < n {
        return Err(format!("output holds {} elements, {n} needed", out.len()));
    }
    let (src, dst) = (&bytes[..need], &mut out[..n]);

    let threads = if n >= PARALLEL_MIN_ELEMENTS {
        std::thread::available_parallelism().map_or(1, |t| t.get()).min(blocks)
    } else {
        1
    };
    if threads <= 1 {
        kernel(src, dst);
        return Ok(());
    }
    let blocks_per_thread = blocks.div_ceil(threads);
    std::thread::scope(|scope| {
        for (s, d) in src.chunks(blocks_per_thread * block_bytes).zip(dst.chunks_mut(blocks_per_thread * block_elems)) {
            scope.spawn(move || kernel(s, d));
        }
    });
    Ok(())
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16_at(b, 0);
    }
}

fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        for j in 0..16 {
            y[j] = (i32::from(qs[j] & 0x0F) - 8) as f32 * d;
            y[j + 16] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
        }
    }
}

fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        for j in 0..16 {
            y[j] = f32::from(qs[j] & 0x0F) * d + m;
            y[j + 16] = f32::from(qs[j] >> 4) * d + m;
        }
    }
}

/// The low four bits of elements `j` and `j + 16` of a Q5 block, with their fifth
/// bits from `qh` (bit `j` and bit `j + 16`).
#[inline]
fn q5_pair(qs: &[u8], qh: u32, j: usize) -> (i32, i32) {
    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
    (i32::from((qs[j] & 0x0F) | xh0), i32::from((qs[j] >> 4) | xh1))
}

fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        for j in 0..16 {
            let (x0, x1) = q5_pair(qs, qh, j);
            y[j] = (x0 - 16) as f32 * d;
            y[j + 16] = (x1 - 16) as f32 * d;
        }
    }
}

fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        for j in 0..16 {
            let (x0, x1) = q5_pair(qs, qh, j);
            y[j] = x0 as f32 * d + m;
            y[j + 16] = x1 as f32 * d + m;
        }
    }
}

fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
            *yj = f32::from(q as i8) * d;
        }
    }
}

/// The 6-bit scale and 6-bit min of sub-block `j` (0..8) of a Q4_K/Q5_K block, packed
/// in 12 bytes: sub-blocks 0..4 keep theirs in the low six bits of bytes `j` (scale)
/// and `j + 4` (min); sub-blocks 4..8 split theirs between a nibble of byte `j + 4`
/// and the top two bits of bytes `j - 4` (scale) and `j` (min). ggml's `get_scale_min_k4`.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        // Four chunks of 64 elements; each takes 32 bytes of `qs`: low nibbles are the
        // first 32 elements (sub-block 2c), high nibbles the next 32 (sub-block 2c + 1).
        for (c, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = get_scale_min_k4(2 * c, scales);
            let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
            let (sc, m) = get_scale_min_k4(2 * c + 1, scales);
            let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
                y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        // As Q4_K, plus a fifth bit: element `l` of sub-block `s` has it in bit `s` of `qh[l]`.
        for (c, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let (sc, m) = get_scale_min_k4(2 * c, scales);
            let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
            let (sc, m) = get_scale_min_k4(2 * c + 1, scales);
            let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
                y[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
            }
        }
    }
}

fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let sc = &b[192..208];
        let d = f16_at(b, 208);
        // Two halves of 128 elements, each with 64 bytes of `ql`, 32 of `qh` and 8
        // scales (one per 16 elements). Element `32k + l` of a half (k in 0..4) takes
        // its low four bits from `ql[l + 32 (k & 1)]` (low nibble for k < 2, else high)
        // and its top two from bits 2k..2k+2 of `qh[l]`.
        for h in 0..2 {
            let (ql, qh, sc, y) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..], &mut y[128 * h..]);
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * f32::from(sc[is] as i8) * q1 as f32;
                y[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
                y[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
                y[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
            }
        }
    }
}
