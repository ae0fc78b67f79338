//! Round trips of every record, and their byte offsets against the tables of `docs/abi.md`.

use core::mem::offset_of;

use crate::wasi_nn::{GraphBuilder, Tensor, TensorType};
use crate::*;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Bytes that differ at every position, so that a field read from the wrong offset shows.
fn pattern<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    b
}

fn gemm_desc() -> GemmDesc {
    GemmDesc {
        dtype: DType::Bf16.code(),
        flags: GEMM_TRANS_B | GEMM_BUFFERS,
        m: 0x0101_0001,
        n: 0x0202_0002,
        k: 0x0303_0003,
        lda: 0x0404_0004,
        ldb: 0x0505_0005,
        ldc: 0x0606_0006,
        alpha: 1.5,
        beta: -0.25,
        a: View { offset: 0x1111_2222_3333_4444, len: 0x5555_6666_7777_8888 },
        b: View { offset: 0x0102_0304_0506_0708, len: 0x1020_3040_5060_7080 },
        c: View { offset: 0xfedc_ba98_7654_3210, len: 0x0123_4567_89ab_cdef },
    }
}

#[test]
fn gemm_desc_round_trips() {
    let d = gemm_desc();
    assert_eq!(GemmDesc::from_bytes(&d.to_bytes()), d);
    // Any 88 bytes decode, and encode back to themselves (NaN scales keep their bits).
    let raw = pattern::<{ GemmDesc::SIZE }>();
    assert_eq!(GemmDesc::from_bytes(&raw).to_bytes(), raw);
    let mut nan = d;
    nan.alpha = f32::from_bits(0x7fc0_1234);
    assert_eq!(GemmDesc::from_bytes(&nan.to_bytes()).alpha.to_bits(), 0x7fc0_1234);
}

/// docs/abi.md, "GEMM descriptor": dtype 0, flags 4, m 8, n 12, k 16, lda 20, ldb 24, ldc 28,
/// alpha 32, beta 36, A offset/length 40/48, B 56/64, C 72/80; 88 bytes; the handles at
/// 88, 92, 96 with flag bit 2 (100 bytes).
#[test]
fn gemm_desc_offsets_are_the_documented_ones() {
    assert_eq!(GemmDesc::SIZE, 88);
    assert_eq!(GemmDesc::SIZE_WITH_HANDLES, 100);
    let fields = [
        (offset_of!(GemmDesc, dtype), 0),
        (offset_of!(GemmDesc, flags), 4),
        (offset_of!(GemmDesc, m), 8),
        (offset_of!(GemmDesc, n), 12),
        (offset_of!(GemmDesc, k), 16),
        (offset_of!(GemmDesc, lda), 20),
        (offset_of!(GemmDesc, ldb), 24),
        (offset_of!(GemmDesc, ldc), 28),
        (offset_of!(GemmDesc, alpha), 32),
        (offset_of!(GemmDesc, beta), 36),
        (offset_of!(GemmDesc, a.offset), 40),
        (offset_of!(GemmDesc, a.len), 48),
        (offset_of!(GemmDesc, b.offset), 56),
        (offset_of!(GemmDesc, b.len), 64),
        (offset_of!(GemmDesc, c.offset), 72),
        (offset_of!(GemmDesc, c.len), 80),
    ];
    for (at, documented) in fields {
        assert_eq!(at, documented);
    }

    let d = gemm_desc();
    let b = d.to_bytes();
    assert_eq!(u32_at(&b, 0), 2); // bf16
    assert_eq!(u32_at(&b, 4), 2 | 4);
    assert_eq!(u32_at(&b, 8), d.m);
    assert_eq!(u32_at(&b, 12), d.n);
    assert_eq!(u32_at(&b, 16), d.k);
    assert_eq!(u32_at(&b, 20), d.lda);
    assert_eq!(u32_at(&b, 24), d.ldb);
    assert_eq!(u32_at(&b, 28), d.ldc);
    assert_eq!(u32_at(&b, 32), 1.5f32.to_bits());
    assert_eq!(u32_at(&b, 36), (-0.25f32).to_bits());
    assert_eq!((u64_at(&b, 40), u64_at(&b, 48)), d.a.into());
    assert_eq!((u64_at(&b, 56), u64_at(&b, 64)), d.b.into());
    assert_eq!((u64_at(&b, 72), u64_at(&b, 80)), d.c.into());

    let h = GemmHandles { a: 7, b: 0, c: 9 };
    let full = d.to_bytes_with_handles(&h);
    assert_eq!(full[..88], b);
    assert_eq!([u32_at(&full, 88), u32_at(&full, 92), u32_at(&full, 96)], [7, 0, 9]);
}

#[test]
fn gemm_flags_and_dtypes() {
    // docs/abi.md: flag bit 0 trans_a, bit 1 trans_b, bit 2 operands in device buffers;
    // dtype 0 f32, 1 f16, 2 bf16.
    assert_eq!((GEMM_TRANS_A, GEMM_TRANS_B, GEMM_BUFFERS, GEMM_FLAGS), (1, 2, 4, 7));
    assert_eq!([DType::F32.code(), DType::F16.code(), DType::Bf16.code()], [0, 1, 2]);
    for t in [DType::F32, DType::F16, DType::Bf16] {
        assert_eq!(DType::from_u32(t.code()), Some(t));
    }
    assert_eq!(DType::from_u32(3), None);
    assert_eq!((DType::F32.size(), DType::F16.size(), DType::Bf16.size()), (4, 2, 2));

    let mut d = GemmDesc { flags: GEMM_TRANS_A | 8, dtype: 9, ..GemmDesc::default() };
    assert!(d.trans_a() && !d.trans_b() && !d.buffers());
    assert_eq!(d.unknown_flags(), 8);
    assert_eq!(d.dtype(), None);
    d.flags = GEMM_FLAGS;
    assert!(d.trans_a() && d.trans_b() && d.buffers());
    assert_eq!(d.unknown_flags(), 0);
}

#[test]
fn gemm_handles_round_trip() {
    let h = GemmHandles { a: 1, b: 0xdead_beef, c: 0 };
    assert_eq!(GemmHandles::from_bytes(&h.to_bytes()), h);
    assert_eq!(h.as_array(), [1, 0xdead_beef, 0]);
    assert!(h.any());
    assert!(!GemmHandles::default().any());
    let raw = pattern::<{ GemmHandles::SIZE }>();
    assert_eq!(GemmHandles::from_bytes(&raw).to_bytes(), raw);
}

#[test]
fn device_info_round_trips() {
    let d = DeviceInfo::new(Backend::Cuda.code(), DEVICE_IN_PLACE | DEVICE_BF16, "NVIDIA H200");
    assert_eq!(DeviceInfo::from_bytes(&d.to_bytes()), d);
    assert_eq!(d.abi_version, ABI_VERSION);
    assert_eq!(d.name(), b"NVIDIA H200");
    assert!(d.in_place());
    let raw = pattern::<{ DeviceInfo::SIZE }>();
    assert_eq!(DeviceInfo::from_bytes(&raw).to_bytes(), raw);
    // A name_len past the room is clamped when read.
    assert_eq!(DeviceInfo::from_bytes(&raw).name().len(), 48);
}

#[test]
fn device_info_name_is_cut_at_a_character_boundary() {
    // 47 ASCII bytes then a 2-byte character: the character does not fit in 48.
    let mut long = [b'x'; 49];
    long[47..49].copy_from_slice("é".as_bytes());
    let name = core::str::from_utf8(&long).unwrap();
    let d = DeviceInfo::new(0, 0, name);
    assert_eq!(d.name_len, 47);
    assert_eq!(d.name(), &long[..47]);
    assert_eq!(d.name[47], 0);
    assert_eq!(DeviceInfo::new(0, 0, &name[..47]).name_len, 47);
}

/// docs/abi.md, "`device_info` record": ABI version 0, backend 4, flags 8, name_len 12, the
/// name's 48 bytes at 16; 64 bytes. Backend 0 cpu, 1 vulkan, 2 cuda, 3 metal; flag bit 0 in
/// place, bit 1 f16, bit 2 bf16.
#[test]
fn device_info_offsets_are_the_documented_ones() {
    assert_eq!(DeviceInfo::SIZE, 64);
    assert_eq!(offset_of!(DeviceInfo, abi_version), 0);
    assert_eq!(offset_of!(DeviceInfo, backend), 4);
    assert_eq!(offset_of!(DeviceInfo, flags), 8);
    assert_eq!(offset_of!(DeviceInfo, name_len), 12);
    assert_eq!(offset_of!(DeviceInfo, name), 16);
    assert_eq!(DeviceInfo::NAME_CAP, 48);
    assert_eq!([Backend::Cpu, Backend::Vulkan, Backend::Cuda, Backend::Metal].map(Backend::code), [0, 1, 2, 3]);
    for code in 0..4 {
        assert_eq!(Backend::from_u32(code).map(Backend::code), Some(code));
    }
    assert_eq!(Backend::from_u32(4), None);
    assert_eq!((DEVICE_IN_PLACE, DEVICE_F16, DEVICE_BF16), (1, 2, 4));

    let b = DeviceInfo::new(3, 5, "gpu").to_bytes();
    assert_eq!([u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8), u32_at(&b, 12)], [1, 3, 5, 3]);
    assert_eq!(&b[16..19], b"gpu");
    assert!(b[19..].iter().all(|&x| x == 0));
}

#[test]
fn last_op_round_trips() {
    let op = LastOp { path: Path::Dma.code(), dispatches: 12, bytes_copied: 1 << 40, rss_delta_bytes: -4096 };
    assert_eq!(LastOp::from_bytes(&op.to_bytes()), op);
    let raw = pattern::<{ LastOp::SIZE }>();
    assert_eq!(LastOp::from_bytes(&raw).to_bytes(), raw);
}

/// docs/abi.md, "`last_op` record": path 0, dispatches 4, bytes copied (u64) 8, RSS growth
/// (i64) 16; 24 bytes. Path 0 in place, 1 copy, 2 DMA, 3 device.
#[test]
fn last_op_offsets_are_the_documented_ones() {
    assert_eq!(LastOp::SIZE, 24);
    assert_eq!(offset_of!(LastOp, path), 0);
    assert_eq!(offset_of!(LastOp, dispatches), 4);
    assert_eq!(offset_of!(LastOp, bytes_copied), 8);
    assert_eq!(offset_of!(LastOp, rss_delta_bytes), 16);
    assert_eq!([Path::InPlace, Path::Copy, Path::Dma, Path::Device].map(Path::code), [0, 1, 2, 3]);
    for code in 0..4 {
        assert_eq!(Path::from_u32(code).map(Path::code), Some(code));
    }
    assert_eq!(Path::from_u32(4), None);

    let b = LastOp { path: 3, dispatches: 7, bytes_copied: 0x0102_0304_0506_0708, rss_delta_bytes: -1 }.to_bytes();
    assert_eq!((u32_at(&b, 0), u32_at(&b, 4), u64_at(&b, 8)), (3, 7, 0x0102_0304_0506_0708));
    assert_eq!(u64_at(&b, 16), u64::MAX);
}

#[test]
fn model_info_round_trips() {
    let m = ModelInfo::new(49152, 8192, Some(1), None, &[2, 0, 5, 6]);
    assert_eq!(ModelInfo::from_bytes(&m.to_bytes()), m);
    assert_eq!((m.bos_id(), m.eos_id()), (Some(1), None));
    assert_eq!(m.eos, ModelInfo::NO_TOKEN);
    // At most 3 stop tokens are kept, and n_stop counts those.
    assert_eq!(m.n_stop, 3);
    assert_eq!(m.stop_ids(), &[2, 0, 5]);
    let raw = pattern::<{ ModelInfo::SIZE }>();
    let read = ModelInfo::from_bytes(&raw);
    assert_eq!(read.to_bytes(), raw);
    assert_eq!(read.stop_ids().len(), 3); // a larger n_stop is clamped when read
}

/// docs/abi.md, "Inference", `model_info`: 32 bytes, `vocab_size`, `context_length`, `bos`,
/// `eos` (u32, 0xffffffff = none), `n_stop` (≤ 3), then up to 3 stop token ids: u32s at 0, 4,
/// 8, 12, 16 and 20, 24, 28.
#[test]
fn model_info_offsets_are_the_documented_ones() {
    assert_eq!(ModelInfo::SIZE, 32);
    assert_eq!(offset_of!(ModelInfo, vocab_size), 0);
    assert_eq!(offset_of!(ModelInfo, context_length), 4);
    assert_eq!(offset_of!(ModelInfo, bos), 8);
    assert_eq!(offset_of!(ModelInfo, eos), 12);
    assert_eq!(offset_of!(ModelInfo, n_stop), 16);
    assert_eq!(offset_of!(ModelInfo, stop), 20);
    assert_eq!(ModelInfo::NO_TOKEN, 0xffff_ffff);
    let b = ModelInfo::new(100, 200, None, Some(3), &[7, 8]).to_bytes();
    let words: [u32; 8] = core::array::from_fn(|i| u32_at(&b, 4 * i));
    assert_eq!(words, [100, 200, u32::MAX, 3, 2, 7, 8, 0]);
}

#[test]
fn sampler_round_trips() {
    let s = SamplerParams { temperature: 0.7, top_k: 40, top_p: 0.95, repetition_penalty: 1.1, seed: u64::MAX - 3 };
    assert_eq!(SamplerParams::from_bytes(&s.to_bytes()), s);
    let raw = pattern::<{ SamplerParams::SIZE }>();
    assert_eq!(SamplerParams::from_bytes(&raw).to_bytes(), raw);
}

/// docs/abi.md, "Inference", `session_decode`: the sampler is 24 bytes, `temperature` f32,
/// `top_k` u32, `top_p` f32, `repetition_penalty` f32, `seed` u64: at 0, 4, 8, 12 and 16.
#[test]
fn sampler_offsets_are_the_documented_ones() {
    assert_eq!(SamplerParams::SIZE, 24);
    assert_eq!(offset_of!(SamplerParams, temperature), 0);
    assert_eq!(offset_of!(SamplerParams, top_k), 4);
    assert_eq!(offset_of!(SamplerParams, top_p), 8);
    assert_eq!(offset_of!(SamplerParams, repetition_penalty), 12);
    assert_eq!(offset_of!(SamplerParams, seed), 16);
    let b =
        SamplerParams { temperature: 0.5, top_k: 9, top_p: 0.25, repetition_penalty: 2.0, seed: 1 << 33 }.to_bytes();
    assert_eq!(u32_at(&b, 0), 0.5f32.to_bits());
    assert_eq!(u32_at(&b, 4), 9);
    assert_eq!(u32_at(&b, 8), 0.25f32.to_bits());
    assert_eq!(u32_at(&b, 12), 2.0f32.to_bits());
    assert_eq!(u64_at(&b, 16), 1 << 33);
}

/// docs/abi.md, "Inference", `chat_render`: 16-byte records `{role_ptr, role_len,
/// content_ptr, content_len}` (u32 each): at 0, 4, 8, 12.
#[test]
fn chat_message_round_trips_at_the_documented_offsets() {
    let m = ChatMessage { role_ptr: 0x100, role_len: 4, content_ptr: 0x2000, content_len: 77 };
    assert_eq!(ChatMessage::from_bytes(&m.to_bytes()), m);
    let raw = pattern::<{ ChatMessage::SIZE }>();
    assert_eq!(ChatMessage::from_bytes(&raw).to_bytes(), raw);
    assert_eq!(ChatMessage::SIZE, 16);
    assert_eq!(offset_of!(ChatMessage, role_ptr), 0);
    assert_eq!(offset_of!(ChatMessage, role_len), 4);
    assert_eq!(offset_of!(ChatMessage, content_ptr), 8);
    assert_eq!(offset_of!(ChatMessage, content_len), 12);
    let b = m.to_bytes();
    assert_eq!([u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8), u32_at(&b, 12)], [0x100, 4, 0x2000, 77]);
}

/// docs/abi.md, "wasi-nn", `set_input`: the tensor is 20 bytes `{dims_ptr, dims_len, type
/// (u8, padded to 4), data_ptr, data_len}`: at 0, 4, 8, 12, 16.
#[test]
fn wasi_nn_tensor_round_trips_at_the_documented_offsets() {
    let t = Tensor::new(0x40, 1, TensorType::U8.code(), 0x80, 12);
    assert_eq!(Tensor::from_bytes(&t.to_bytes()), t);
    assert_eq!(t.tensor_type(), Some(TensorType::U8));
    assert_eq!(Tensor::SIZE, 20);
    assert_eq!(offset_of!(Tensor, dims_ptr), 0);
    assert_eq!(offset_of!(Tensor, dims_len), 4);
    assert_eq!(offset_of!(Tensor, ty), 8);
    assert_eq!(offset_of!(Tensor, data_ptr), 12);
    assert_eq!(offset_of!(Tensor, data_len), 16);
    let b = t.to_bytes();
    assert_eq!([u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8), u32_at(&b, 12), u32_at(&b, 16)], [0x40, 1, 3, 0x80, 12]);
    // The padding is not read: a type written as a u32 with garbage above it is the same.
    let mut raw = b;
    raw[9..12].copy_from_slice(&[0xaa, 0xbb, 0xcc]);
    assert_eq!(Tensor::from_bytes(&raw), t);
    for code in 0..6 {
        assert_eq!(TensorType::from_u8(code).map(TensorType::code), Some(code));
    }
    assert_eq!(TensorType::from_u8(6), None);

    let g = GraphBuilder { ptr: 0x1000, len: 0x20 };
    assert_eq!(GraphBuilder::from_bytes(&g.to_bytes()), g);
    assert_eq!(GraphBuilder::SIZE, 8);
    assert_eq!((offset_of!(GraphBuilder, ptr), offset_of!(GraphBuilder, len)), (0, 4));
}

/// docs/abi.md, "Status codes": 0 Ok … 14 LimitExceeded, with the SDK names of the table.
#[test]
fn status_codes_are_the_documented_ones() {
    let table: [(i32, &str); 15] = [
        (0, "ok"),
        (1, "invalid argument"),
        (2, "out of bounds"),
        (3, "misaligned"),
        (4, "overlap"),
        (5, "too large"),
        (6, "bad handle"),
        (7, "unsupported"),
        (8, "device error"),
        (9, "busy"),
        (10, "no memory export"),
        (11, "model not found"),
        (12, "buffer too small"),
        (13, "context full"),
        (14, "limit exceeded"),
    ];
    for (code, name) in table {
        let s = Status::from_i32(code).unwrap();
        assert_eq!(s.code(), code);
        assert_eq!(i32::from(s), code);
        assert_eq!(s as i32, code);
        assert_eq!(s.name(), name);
        assert_eq!(s.is_ok(), code == 0);
    }
    assert_eq!(Status::from_i32(4), Some(Status::Overlap));
    assert_eq!(Status::from_i32(13), Some(Status::ContextFull));
    assert_eq!(Status::from_i32(14), Some(Status::LimitExceeded));
    assert_eq!(Status::from_i32(15), None);
    assert_eq!(Status::from_i32(-1), None);
    assert_eq!(Status::from_i32(i32::MIN), None);
    assert_eq!(MODULE, "shoal_v1");
    assert_eq!(ABI_VERSION, 1);
    assert_eq!((MAX_FENCES, MAX_BUFFERS), (64, 4096));
}
