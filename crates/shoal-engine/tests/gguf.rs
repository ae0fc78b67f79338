//! GGUF parsing and dequantization: files written here by a small writer, packed by
//! hand (or with packers that follow llama.cpp's quantizers), corrupted in many ways,
//! and the real SmolLM2 model when it has been fetched.

use std::path::PathBuf;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_engine::gguf::{GgmlType, GgufError, GgufFile, TensorInfo, Value};
use shoal_engine::quant;

// ---------------------------------------------------------------------------------------
// A minimal GGUF writer.

fn wire_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array still names an element type; any will do.
            out.extend_from_slice(&items.first().map_or(4, wire_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// A tensor to write: name, dims (innermost first), ggml type id, data.
struct T {
    name: &'static str,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

/// Writes a GGUF file. The data section ends with the last tensor (no trailing padding),
/// so that any cut of the file loses bytes something needs.
fn write_gguf(version: u32, kvs: &[(&str, Value)], tensors: &[T]) -> Vec<u8> {
    let alignment =
        kvs.iter().find(|(k, _)| *k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(32) as usize;
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        out.extend_from_slice(&wire_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(alignment);
    }
    for t in tensors {
        out.resize(out.len().next_multiple_of(alignment), 0);
        out.extend_from_slice(&t.data);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Packers for the block formats, written from llama.cpp's quantizers (the direction
// opposite to the dequantizers under test).

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// One Q8_0 block: scale `d` and 32 quants.
fn pack_q8_0(d: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend(q.iter().map(|&x| x as u8));
    b
}

/// One Q4_0 block: scale `d` and 32 quants in 0..16 (value `(q - 8) * d`).
fn pack_q4_0(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    b
}

/// One Q4_1 block: scale `d`, min `m` and 32 quants in 0..16 (value `q * d + m`).
fn pack_q4_1(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend_from_slice(&f16_bytes(m));
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    b
}

/// The `qh` word and `qs` bytes of a Q5_0/Q5_1 block of 5-bit quants.
fn pack_q5_bits(q: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let (x0, x1) = (q[j], q[j + 16]);
        qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= u32::from((x0 & 0x10) >> 4) << j;
        qh |= u32::from((x1 & 0x10) >> 4) << (j + 16);
    }
    (qh.to_le_bytes(), qs)
}

fn pack_q5_0(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let (qh, qs) = pack_q5_bits(q);
    [&f16_bytes(d)[..], &qh, &qs].concat()
}

fn pack_q5_1(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let (qh, qs) = pack_q5_bits(q);
    [&f16_bytes(d)[..], &f16_bytes(m), &qh, &qs].concat()
}

/// The 12 bytes of eight 6-bit scales and mins of a Q4_K/Q5_K block.
fn pack_k_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j], mn[j]);
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    s
}

/// One Q4_K block: `x[e] = d * sc[e / 32] * q[e] - dmin * mn[e / 32]`, `q` in 0..16.
fn pack_q4_k(d: f32, dmin: f32, sc: &[u8; 8], mn: &[u8; 8], q: &[u8; 256]) -> Vec<u8> {
    let mut b = [&f16_bytes(d)[..], &f16_bytes(dmin), &pack_k_scales(sc, mn)].concat();
    for n in (0..256).step_by(64) {
        b.extend((0..32).map(|l| q[n + l] | (q[n + l + 32] << 4)));
    }
    assert_eq!(b.len(), 144);
    b
}

/// One Q5_K block: as Q4_K with `q` in 0..32.
fn pack_q5_k(d: f32, dmin: f32, sc: &[u8; 8], mn: &[u8; 8], q: &[u8; 256]) -> Vec<u8> {
    let mut qh = [0u8; 32];
    let mut ql = Vec::new();
    let (mut m1, mut m2) = (1u8, 2u8);
    for n in (0..256).step_by(64) {
        for j in 0..32 {
            let (mut l1, mut l2) = (q[n + j], q[n + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql.push(l1 | (l2 << 4));
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    let b = [&f16_bytes(d)[..], &f16_bytes(dmin), &pack_k_scales(sc, mn), &qh, &ql].concat();
    assert_eq!(b.len(), 176);
    b
}

/// One Q6_K block: `x[e] = d * sc[e / 16] * (q[e] - 32)`, `q` in 0..64.
fn pack_q6_k(d: f32, sc: &[i8; 16], q: &[u8; 256]) -> Vec<u8> {
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (h, j) in (0..256).step_by(128).enumerate() {
        for l in 0..32 {
            let (a, b, c, e) = (q[j + l], q[j + l + 32], q[j + l + 64], q[j + l + 96]);
            ql[64 * h + l] = (a & 0x0F) | ((c & 0x0F) << 4);
            ql[64 * h + l + 32] = (b & 0x0F) | ((e & 0x0F) << 4);
            qh[32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    let sc: Vec<u8> = sc.iter().map(|&s| s as u8).collect();
    let b = [&ql[..], &qh, &sc, &f16_bytes(d)].concat();
    assert_eq!(b.len(), 210);
    b
}

fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    quant::dequantize(ty, bytes, n, &mut out).unwrap();
    out
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w}");
    }
}

// ---------------------------------------------------------------------------------------
// Metadata.

fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-120)),
        ("t.u16", Value::U16(65_000)),
        ("t.i16", Value::I16(-32_000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-5)),
        ("t.bool", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.string", Value::String("héllo, ĠGGUF ✓".into())),
        ("t.empty_string", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 1)),
        ("t.f64", Value::F64(-2.5e300)),
        ("t.array_u32", Value::Array(vec![Value::U32(1), Value::U32(2), Value::U32(3)])),
        ("t.array_str", Value::Array(vec![Value::String("<|im_start|>".into()), Value::String("Ġthe".into())])),
        ("t.array_f32", Value::Array(vec![Value::F32(0.0), Value::F32(-1.25)])),
        ("t.array_bool", Value::Array(vec![Value::Bool(false), Value::Bool(true)])),
        ("t.array_i64", Value::Array(vec![Value::I64(-1), Value::I64(i64::MAX)])),
        ("t.array_empty", Value::Array(vec![])),
        (
            "t.array_nested",
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::U8(2)]), Value::Array(vec![Value::U8(3)])]),
        ),
        ("general.architecture", Value::String("llama".into())),
    ]
}

#[test]
fn metadata_of_every_type_round_trips() {
    let kvs = all_values();
    for version in [2, 3] {
        let file = GgufFile::from_bytes(write_gguf(version, &kvs, &[])).unwrap();
        assert_eq!(file.version, version);
        assert_eq!(file.metadata.len(), kvs.len());
        assert!(file.tensors.is_empty());
        for (k, v) in &kvs {
            assert_eq!(file.get(k), Some(v), "{k}");
        }
    }
}

#[test]
fn typed_getters_convert_and_name_the_key() {
    let file = GgufFile::from_bytes(write_gguf(3, &all_values(), &[])).unwrap();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("t.u8").unwrap(), 250);
    assert_eq!(file.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(file.get_u64("t.u64").unwrap(), u64::MAX - 1);
    assert_eq!(file.get_f32("t.f32").unwrap(), 1.5e-5);
    assert_eq!(file.get_f32("t.u16").unwrap(), 65_000.0);
    assert_eq!(file.get_str("t.string").unwrap(), "héllo, ĠGGUF ✓");
    assert_eq!(file.get("t.array_str").and_then(Value::as_array).map(<[Value]>::len), Some(2));
    assert_eq!(file.get("t.array_str").unwrap().as_array().unwrap()[1].as_str(), Some("Ġthe"));
    assert_eq!(Value::I32(-3).as_u64(), None);
    assert_eq!(Value::I32(3).as_u64(), Some(3));
    assert_eq!(Value::String("x".into()).as_f32(), None);

    let err = file.get_u64("t.i32").unwrap_err();
    assert!(matches!(&err, GgufError::WrongType { key, .. } if key == "t.i32"), "{err}");
    assert!(err.to_string().contains("t.i32") && err.to_string().contains("-2000000000"), "{err}");
    let err = file.get_str("t.u8").unwrap_err();
    assert!(matches!(&err, GgufError::WrongType { key, .. } if key == "t.u8"), "{err}");
    let err = file.get_f32("t.array_f32").unwrap_err();
    assert!(err.to_string().contains("array of 2 float32"), "{err}");
    let err = file.get_u64("llama.block_count").unwrap_err();
    assert!(matches!(&err, GgufError::MissingKey(k) if k == "llama.block_count"), "{err}");
    assert!(err.to_string().contains("llama.block_count"));
}

// ---------------------------------------------------------------------------------------
// Tensors.

/// A file with a tensor of each supported type, and the values each must dequantize to.
fn tensor_file(alignment: Option<u32>) -> (Vec<u8>, Vec<(&'static str, Vec<f32>)>) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tensors = Vec::new();
    let mut expected = Vec::new();

    // F32 2x3 ([3, 2] innermost first): rows of 3.
    let v: Vec<f32> = vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 1e30];
    tensors.push(T { name: "f32", dims: vec![3, 2], ty: 0, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() });
    expected.push(("f32", v));

    // F16 and BF16: values exactly representable.
    let v: Vec<f32> = vec![0.5, -1.0, 65504.0, 2f32.powi(-14), 0.0, -0.125, 3.0, 1024.0];
    tensors.push(T {
        name: "f16",
        dims: vec![8],
        ty: 1,
        data: v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
    });
    expected.push(("f16", v.clone()));
    let v: Vec<f32> = vec![0.5, -1.0, 3.0e38, 1.0e-30, 0.0, -0.125, 3.0, 1024.0];
    let data: Vec<u8> = v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    let v: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    tensors.push(T { name: "bf16", dims: vec![8], ty: 30, data });
    expected.push(("bf16", v));

    // Q8_0, two blocks (a [32, 2] matrix): d = 0.5, q = -128..-96 and then 95..127.
    let mut data = Vec::new();
    let mut v = Vec::new();
    for (d, base) in [(0.5f32, -128i32), (0.25, 95)] {
        let q: [i8; 32] = std::array::from_fn(|i| (base + i as i32) as i8);
        data.extend(pack_q8_0(d, &q));
        v.extend(q.iter().map(|&x| f32::from(x) * d));
    }
    tensors.push(T { name: "q8_0", dims: vec![32, 2], ty: 8, data });
    expected.push(("q8_0", v));

    // Q4_0: d = 0.25, q = i % 16, so element i is (i % 16 - 8) / 4; checks that low
    // nibbles are elements 0..16 and high nibbles 16..32.
    let q: [u8; 32] = std::array::from_fn(|i| (i % 16) as u8);
    let q_rev: [u8; 32] = std::array::from_fn(|i| 15 - (i % 16) as u8);
    let mut data = pack_q4_0(0.25, &q);
    assert_eq!(data[2], 0x00);
    assert_eq!(data[3], 0x11);
    data.extend(pack_q4_0(-2.0, &q_rev));
    let mut v: Vec<f32> = q.iter().map(|&x| (f32::from(x) - 8.0) * 0.25).collect();
    v.extend(q_rev.iter().map(|&x| (f32::from(x) - 8.0) * -2.0));
    tensors.push(T { name: "q4_0", dims: vec![64], ty: 2, data });
    expected.push(("q4_0", v));

    // Q4_1: d = 0.5, m = -1, q = (3 i) % 16.
    let q: [u8; 32] = std::array::from_fn(|i| ((3 * i) % 16) as u8);
    let data = pack_q4_1(0.5, -1.0, &q);
    let v: Vec<f32> = q.iter().map(|&x| f32::from(x) * 0.5 - 1.0).collect();
    tensors.push(T { name: "q4_1", dims: vec![32], ty: 3, data });
    expected.push(("q4_1", v));

    // Q5_0 / Q5_1: random 5-bit quants.
    let q: [u8; 32] = std::array::from_fn(|_| rng.random_range(0..32));
    tensors.push(T { name: "q5_0", dims: vec![32], ty: 6, data: pack_q5_0(0.125, &q) });
    expected.push(("q5_0", q.iter().map(|&x| (f32::from(x) - 16.0) * 0.125).collect()));
    tensors.push(T { name: "q5_1", dims: vec![32], ty: 7, data: pack_q5_1(0.25, 0.5, &q) });
    expected.push(("q5_1", q.iter().map(|&x| f32::from(x) * 0.25 + 0.5).collect()));

    // Q4_K / Q5_K: random 6-bit scales and mins, random quants.
    let sc: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
    let mn: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
    let (d, dmin) = (f16::from_f32(0.01).to_f32(), f16::from_f32(0.003).to_f32());
    let k_value = |e: usize, q: u8| d * f32::from(sc[e / 32]) * f32::from(q) - dmin * f32::from(mn[e / 32]);
    let q4: [u8; 256] = std::array::from_fn(|_| rng.random_range(0..16));
    tensors.push(T { name: "q4_k", dims: vec![256], ty: 12, data: pack_q4_k(d, dmin, &sc, &mn, &q4) });
    expected.push(("q4_k", (0..256).map(|e| k_value(e, q4[e])).collect()));
    let q5: [u8; 256] = std::array::from_fn(|_| rng.random_range(0..32));
    tensors.push(T { name: "q5_k", dims: vec![256], ty: 13, data: pack_q5_k(d, dmin, &sc, &mn, &q5) });
    expected.push(("q5_k", (0..256).map(|e| k_value(e, q5[e])).collect()));

    // Q6_K: random signed 8-bit scales, random 6-bit quants.
    let sc6: [i8; 16] = std::array::from_fn(|_| rng.random());
    let q6: [u8; 256] = std::array::from_fn(|_| rng.random_range(0..64));
    let d6 = f16::from_f32(0.002).to_f32();
    tensors.push(T { name: "q6_k", dims: vec![256], ty: 14, data: pack_q6_k(d6, &sc6, &q6) });
    expected.push(("q6_k", (0..256).map(|e| d6 * f32::from(sc6[e / 16]) * (f32::from(q6[e]) - 32.0)).collect()));

    let mut kvs = vec![("general.architecture", Value::String("test".into()))];
    if let Some(a) = alignment {
        kvs.push(("general.alignment", Value::U32(a)));
    }
    (write_gguf(3, &kvs, &tensors), expected)
}

#[test]
fn tensors_of_every_supported_type_dequantize() {
    for alignment in [None, Some(64), Some(1)] {
        let (bytes, expected) = tensor_file(alignment);
        let file = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(file.alignment(), u64::from(alignment.unwrap_or(32)));
        assert_eq!(file.data_offset() % file.alignment(), 0);
        assert_eq!(file.tensors.len(), expected.len());
        for (name, want) in &expected {
            let got = file.tensor_f32(name).unwrap();
            assert_close(&got, want, name);
        }
        let info = file.tensor("f32").unwrap();
        assert_eq!(info.dims, vec![3, 2]);
        assert_eq!(info.ggml_type, GgmlType::F32);
        assert_eq!(info.n_elements(), 6);
        assert_eq!(info.n_bytes().unwrap(), 24);
        assert_eq!(file.tensor_bytes(info).unwrap().len(), 24);
        let info = file.tensor("q6_k").unwrap();
        assert_eq!((info.ggml_type, info.n_bytes().unwrap()), (GgmlType::Q6K, 210));
        assert!(matches!(file.tensor_f32("nope"), Err(GgufError::MissingTensor(n)) if n == "nope"));
    }
}

#[test]
fn ggml_type_ids_round_trip() {
    let known = [
        (GgmlType::F32, 0, "F32"),
        (GgmlType::F16, 1, "F16"),
        (GgmlType::Q4_0, 2, "Q4_0"),
        (GgmlType::Q4_1, 3, "Q4_1"),
        (GgmlType::Q5_0, 6, "Q5_0"),
        (GgmlType::Q5_1, 7, "Q5_1"),
        (GgmlType::Q8_0, 8, "Q8_0"),
        (GgmlType::Q8_1, 9, "Q8_1"),
        (GgmlType::Q2K, 10, "Q2_K"),
        (GgmlType::Q3K, 11, "Q3_K"),
        (GgmlType::Q4K, 12, "Q4_K"),
        (GgmlType::Q5K, 13, "Q5_K"),
        (GgmlType::Q6K, 14, "Q6_K"),
        (GgmlType::Q8K, 15, "Q8_K"),
        (GgmlType::BF16, 30, "BF16"),
    ];
    for (ty, id, name) in known {
        assert_eq!(GgmlType::from_id(id), ty);
        assert_eq!(ty.id(), id);
        assert_eq!(ty.to_string(), name);
        assert!(quant::type_size(ty).is_some());
    }
    assert_eq!(GgmlType::from_id(16), GgmlType::Other(16));
    assert_eq!(GgmlType::Other(16).to_string(), "IQ2_XXS (ggml type 16)");
    assert_eq!(quant::type_size(GgmlType::Other(16)), None);
}

#[test]
fn unsupported_types_are_named() {
    // A Q2_K tensor (size known, no dequantizer) and an IQ2_XXS one (size unknown).
    let kvs = [("general.architecture", Value::String("test".into()))];
    let tensors = [
        T { name: "q2k", dims: vec![256], ty: 10, data: vec![0; 84] },
        T { name: "iq", dims: vec![256], ty: 16, data: vec![0; 66] },
    ];
    let file = GgufFile::from_bytes(write_gguf(3, &kvs, &tensors)).unwrap();
    for name in ["q2k", "iq"] {
        let err = file.tensor_f32(name).unwrap_err();
        assert!(matches!(&err, GgufError::UnsupportedType { tensor, .. } if tensor == name), "{err}");
    }
    let msg = file.tensor_f32("iq").unwrap_err().to_string();
    assert!(msg.contains("IQ2_XXS"), "{msg}");
    assert_eq!(file.tensor_bytes(file.tensor("q2k").unwrap()).unwrap().len(), 84);
    let mut out = vec![0.0; 256];
    let err = quant::dequantize(GgmlType::Q2K, &[0; 84], 256, &mut out).unwrap_err();
    assert!(err.contains("Q2_K"), "{err}");
}

#[test]
fn dequantize_checks_its_arguments() {
    let mut out = vec![0.0; 64];
    assert!(quant::dequantize(GgmlType::Q4_0, &[0; 18], 31, &mut out).is_err());
    assert!(quant::dequantize(GgmlType::Q4_0, &[0; 35], 64, &mut out).is_err());
    assert!(quant::dequantize(GgmlType::Q4_0, &[0; 36], 64, &mut out[..32]).is_err());
    assert!(quant::dequantize(GgmlType::Q4_0, &[0; 36], 64, &mut out).is_ok());
    assert_eq!(quant::bytes_for(GgmlType::Q4K, 512), Some(288));
    assert_eq!(quant::bytes_for(GgmlType::Q4K, 100), None);
}

#[test]
fn k_scale_packing_matches_get_scale_min_k4() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..1000 {
        let sc: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
        let mn: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
        let packed = pack_k_scales(&sc, &mn);
        for j in 0..8 {
            assert_eq!(quant::get_scale_min_k4(j, &packed), (sc[j], mn[j]));
        }
    }
}

#[test]
fn many_blocks_dequantize_like_single_blocks() {
    // Enough elements to take the multi-threaded path, for every supported type.
    let mut rng = StdRng::seed_from_u64(11);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let (be, bb) = quant::type_size(ty).unwrap();
        let n = (1 << 19) + 7 * 256;
        let mut bytes: Vec<u8> = (0..n / be * bb).map(|_| rng.random()).collect();
        // Keep scales finite: write small f16 values over the scale fields.
        if be > 1 {
            let scale_at: &[usize] = match ty {
                GgmlType::Q6K => &[208],
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                _ => &[0],
            };
            for block in bytes.chunks_exact_mut(bb) {
                for &at in scale_at {
                    block[at..at + 2].copy_from_slice(&f16_bytes(rng.random_range(-1.0..1.0)));
                }
            }
        }
        let all = dequant(ty, &bytes, n);
        // Four blocks at a time (the last run may be shorter).
        for (i, chunk) in bytes.chunks(4 * bb).enumerate() {
            let part = dequant(ty, chunk, chunk.len() / bb * be);
            let whole = &all[i * 4 * be..][..part.len()];
            assert!(part.iter().zip(whole).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty} chunk {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Corrupt and truncated files.

fn small_file() -> Vec<u8> {
    let kvs = [
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(vec![Value::String("hello".into()), Value::String("world".into())])),
        ("llama.block_count", Value::U32(2)),
        ("t.nested", Value::Array(vec![Value::Array(vec![Value::I16(-1)])])),
    ];
    let q: [u8; 32] = std::array::from_fn(|i| (i % 16) as u8);
    let tensors = [
        T { name: "a", dims: vec![32, 2], ty: 2, data: [pack_q4_0(1.0, &q), pack_q4_0(2.0, &q)].concat() },
        T { name: "b", dims: vec![5], ty: 0, data: vec![0; 20] },
    ];
    write_gguf(3, &kvs, &tensors)
}

fn open_all(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    let file = GgufFile::from_bytes(bytes)?;
    for t in &file.tensors {
        let _ = file.tensor_f32(&t.name);
    }
    Ok(file)
}

#[test]
fn every_cut_of_a_file_is_an_error() {
    let bytes = small_file();
    assert!(open_all(bytes.clone()).is_ok());
    for cut in (0..bytes.len()).step_by(7).chain(bytes.len() - 3..bytes.len()) {
        let err = GgufFile::from_bytes(bytes[..cut].to_vec()).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. } | GgufError::Corrupt(_)), "cut at {cut}: {err}");
    }
}

#[test]
fn bad_magic_and_versions_are_refused_with_a_hint() {
    let mut bytes = small_file();
    bytes[0] ^= 0x20;
    let err = GgufFile::from_bytes(bytes).unwrap_err();
    assert!(matches!(err, GgufError::NotGguf { .. }), "{err}");
    assert!(err.to_string().contains("GGUF"), "{err}");

    let err = GgufFile::from_bytes(b"version https://git-lfs.github.com/spec/v1\n".to_vec()).unwrap_err();
    assert!(err.to_string().contains("Git LFS"), "{err}");
    assert!(matches!(GgufFile::from_bytes(Vec::new()), Err(GgufError::Truncated { .. })));
    assert!(matches!(GgufFile::from_bytes(b"GG".to_vec()), Err(GgufError::Truncated { .. })));
    assert!(matches!(GgufFile::from_bytes(b"PK".to_vec()), Err(GgufError::NotGguf { .. })));

    for (version, hint) in [(1u32, "version 1"), (3u32.swap_bytes(), "big-endian"), (4, "newer")] {
        let mut bytes = small_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let err = GgufFile::from_bytes(bytes).unwrap_err();
        assert!(matches!(err, GgufError::Version { version: v } if v == version), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&version.to_string()) && msg.contains(hint), "{msg}");
    }
}

/// Offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn absurd_lengths_and_counts_are_errors_not_allocations() {
    let base = small_file();
    let patch = |at: usize, value: &[u8]| {
        let mut b = base.clone();
        b[at..at + value.len()].copy_from_slice(value);
        GgufFile::from_bytes(b)
    };
    let key_len_at = 24; // first key's length
    let arch = find(&base, b"general.architecture");
    let tokens = find(&base, b"tokenizer.ggml.tokens");
    let tensor_a = find(&base, b"\x01\x00\x00\x00\x00\x00\x00\x00a\x02\x00\x00\x00"); // name "a", 2 dims
    for (what, result) in [
        ("tensor count", patch(8, &u64::MAX.to_le_bytes())),
        ("tensor count", patch(8, &(1u64 << 40).to_le_bytes())),
        ("kv count", patch(16, &u64::MAX.to_le_bytes())),
        ("kv count", patch(16, &(1u64 << 33).to_le_bytes())),
        ("key length", patch(key_len_at, &u64::MAX.to_le_bytes())),
        ("key length", patch(key_len_at, &(1u64 << 31).to_le_bytes())),
        // The string value of general.architecture: its length follows the key and the type.
        ("string length", patch(arch + 20 + 4, &(u64::MAX - 3).to_le_bytes())),
        // The token array: element count after the key, the type and the element type.
        ("array count", patch(tokens + 21 + 4 + 4, &u64::MAX.to_le_bytes())),
        ("array count", patch(tokens + 21 + 4 + 4, &(1u64 << 28).to_le_bytes())),
        ("array element type", patch(tokens + 21 + 4, &99u32.to_le_bytes())),
        ("value type", patch(arch + 20, &13u32.to_le_bytes())),
        ("n_dims", patch(tensor_a + 9, &100u32.to_le_bytes())),
        ("dims overflow", patch(tensor_a + 13, &u64::MAX.to_le_bytes())),
        ("dims not whole blocks", patch(tensor_a + 13, &33u64.to_le_bytes())),
        ("tensor offset past the end", patch(tensor_a + 13 + 16 + 4, &(1u64 << 40).to_le_bytes())),
        ("tensor offset overflow", patch(tensor_a + 13 + 16 + 4, &(u64::MAX - 31).to_le_bytes())),
        ("misaligned tensor offset", patch(tensor_a + 13 + 16 + 4, &8u64.to_le_bytes())),
    ] {
        let err = result.expect_err(what);
        println!("{what}: {err}");
    }
    // A tensor offset past the end names the tensor.
    let err = patch(tensor_a + 13 + 16 + 4, &(1u64 << 40).to_le_bytes()).unwrap_err();
    assert!(err.to_string().contains("`a`"), "{err}");
}

#[test]
fn inconsistent_metadata_is_refused() {
    let arch = ("general.architecture", Value::String("x".into()));
    for (what, kvs) in [
        ("duplicate key", vec![arch.clone(), arch.clone()]),
        ("zero alignment", vec![arch.clone(), ("general.alignment", Value::U32(0))]),
        ("odd alignment", vec![arch.clone(), ("general.alignment", Value::U32(48))]),
        ("string alignment", vec![arch.clone(), ("general.alignment", Value::String("32".into()))]),
    ] {
        let err = GgufFile::from_bytes(write_gguf(3, &kvs, &[])).expect_err(what);
        assert!(matches!(err, GgufError::Corrupt(_)), "{what}: {err}");
    }
    // A bool that is neither 0 nor 1.
    let mut bytes = write_gguf(3, &[("b", Value::Bool(true))], &[]);
    *bytes.last_mut().unwrap() = 2;
    assert!(GgufFile::from_bytes(bytes).is_err());
    // Arrays nested too deep.
    let mut v = Value::U8(1);
    for _ in 0..20 {
        v = Value::Array(vec![v]);
    }
    assert!(GgufFile::from_bytes(write_gguf(3, &[("deep", v)], &[])).is_err());
    // Duplicate tensor names.
    let t = || T { name: "w", dims: vec![4], ty: 0, data: vec![0; 16] };
    assert!(GgufFile::from_bytes(write_gguf(3, std::slice::from_ref(&arch), &[t(), t()])).is_err());
}

#[test]
fn tensor_bytes_checks_infos_from_elsewhere() {
    let file = GgufFile::from_bytes(small_file()).unwrap();
    let mut info: TensorInfo = file.tensor("b").unwrap().clone();
    assert!(file.tensor_bytes(&info).is_ok());
    info.offset += 1 << 20;
    assert!(matches!(file.tensor_bytes(&info), Err(GgufError::Truncated { .. })));
    info.offset = u64::MAX;
    assert!(file.tensor_bytes(&info).is_err());
    info.offset = 0;
    info.dims = vec![u64::MAX, 2];
    assert!(file.tensor_bytes(&info).is_err());
}

#[test]
fn random_corruption_never_panics() {
    let mut rng = StdRng::seed_from_u64(42);
    let base = small_file();
    let (typed, _) = tensor_file(None);
    let mut ok = 0;
    for i in 0..20_000 {
        let mut bytes = if i % 2 == 0 { base.clone() } else { typed.clone() };
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[at] ^= 1 << rng.random_range(0..8),
                1 => bytes[at] = rng.random(),
                _ => bytes[at] = [0x00, 0xFF, 0x7F, 0x80][rng.random_range(0..4)],
            }
        }
        if rng.random_range(0..4) == 0 {
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
        }
        if let Ok(file) = open_all(bytes) {
            ok += 1;
            for k in file.metadata.keys() {
                let _ = (file.get_u64(k), file.get_f32(k), file.get_str(k));
            }
        }
    }
    println!("{ok} of 20000 corrupted files still parsed");
}

#[test]
fn open_maps_files_and_names_missing_ones() {
    let path = std::env::temp_dir().join(format!("shoal-gguf-test-{}.gguf", std::process::id()));
    let (bytes, expected) = tensor_file(None);
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    let file = file.unwrap();
    for (name, want) in &expected {
        assert_close(&file.tensor_f32(name).unwrap(), want, name);
    }
    let empty = std::env::temp_dir().join(format!("shoal-gguf-empty-{}.gguf", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let result = GgufFile::open(&empty);
    std::fs::remove_file(&empty).unwrap();
    assert!(matches!(result, Err(GgufError::Truncated { .. })));

    let missing = PathBuf::from("/nonexistent/shoal/model.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(&err, GgufError::Io { path, .. } if *path == missing), "{err}");
    assert!(err.to_string().contains("/nonexistent/shoal/model.gguf"), "{err}");
}

// ---------------------------------------------------------------------------------------
// The real model.

#[test]
fn smollm2_model_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!("skipping: run scripts/fetch-model.sh");
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    println!("{file:?}");
    for (k, v) in &file.metadata {
        match v {
            Value::Array(a) => println!("  {k}: array of {} {}", a.len(), a.first().map_or("?", Value::type_name)),
            Value::String(s) if s.len() > 80 => println!("  {k}: string of {} bytes", s.len()),
            v => println!("  {k}: {v:?}"),
        }
    }
    assert_eq!(file.version, 3);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.tensors.len(), 272);
    assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_u64("llama.embedding_length").unwrap(), 576);
    let vocab = file.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap();
    assert_eq!(vocab.len(), 49152);

    let emb = file.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.dims, vec![576, 49152]);
    let mut types = std::collections::BTreeMap::new();
    for t in &file.tensors {
        *types.entry(t.ggml_type.to_string()).or_insert(0) += 1;
        // Every tensor's bytes lie inside the file.
        file.tensor_bytes(t).unwrap();
    }
    println!("tensor types: {types:?}");

    let emb_values = file.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(emb_values.len(), 576 * 49152);
    assert!(emb_values.iter().all(|x| x.is_finite() && x.abs() < 10.0));

    let q41 = file.tensors.iter().find(|t| t.ggml_type == GgmlType::Q4_1).expect("a Q4_1 tensor");
    let values = file.tensor_f32(&q41.name).unwrap();
    assert_eq!(values.len() as u64, q41.n_elements());
    assert!(values.iter().all(|x| x.is_finite() && x.abs() < 10.0), "{}", q41.name);
    let rms = (values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32).sqrt();
    println!("{} {:?} {}: rms {rms}", q41.name, q41.dims, q41.ggml_type);
    assert!(rms > 1e-3 && rms < 1.0, "rms {rms}");
    for t in &file.tensors {
        if quant::is_supported(t.ggml_type) {
            let v = file.tensor_f32(&t.name).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hostile files: refused before they allocate, and described without being quoted.

/// A GGUF v3 file: the header's counts, then `body` as it is.
fn raw_gguf(tensor_count: u64, kv_count: u64, body: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&tensor_count.to_le_bytes());
    out.extend_from_slice(&kv_count.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A key (any bytes) and its value type.
fn raw_key(key: &[u8], ty: u32) -> Vec<u8> {
    let mut out = (key.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(key);
    out.extend_from_slice(&ty.to_le_bytes());
    out
}

/// An array's element type and count.
fn raw_array(elem: u32, count: u64) -> Vec<u8> {
    [elem.to_le_bytes().as_slice(), &count.to_le_bytes()].concat()
}

/// A string value: length, then the bytes.
fn raw_str(s: &[u8]) -> Vec<u8> {
    [(s.len() as u64).to_le_bytes().as_slice(), s].concat()
}

/// An error message is short and printable, whatever the file held.
fn assert_described(err: &GgufError) -> String {
    let msg = err.to_string();
    assert!(msg.len() <= 1024, "{} bytes: {}", msg.len(), msg.chars().take(300).collect::<String>());
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    msg
}

#[test]
fn arrays_that_would_take_gigabytes_are_refused_before_they_are_allocated() {
    // The report: 64 Mi uint8 elements are 64 MiB in the file but were 2 GiB of 32-byte
    // `Value`s, allocated before the file was refused (tests/fuzz_parsers.rs measures it).
    let mut bytes = raw_gguf(0, 1, &[raw_key(b"a", 9), raw_array(0, 64 << 20)].concat());
    bytes.resize(bytes.len() + (64 << 20), 7);
    let err = GgufFile::from_bytes(bytes).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt(_)), "{err}");
    let msg = assert_described(&err);
    assert!(msg.contains("67108864 uint8 values") && msg.contains("would take 2147483648 bytes"), "{msg}");

    // Empty strings: 8 bytes each in the file, 32 parsed.
    let mut bytes = raw_gguf(0, 1, &[raw_key(b"s", 9), raw_array(8, 9 << 20)].concat());
    bytes.resize(bytes.len() + (72 << 20), 0);
    let msg = assert_described(&GgufFile::from_bytes(bytes).unwrap_err());
    assert!(msg.contains("9437184 string values"), "{msg}");

    // The budget is the whole file's: three arrays nested in one, each within it, are
    // refused together.
    let mut body = [raw_key(b"n", 9), raw_array(9, 3)].concat();
    for _ in 0..3 {
        body.extend_from_slice(&raw_array(0, 3 << 20));
        body.resize(body.len() + (3 << 20), 0);
    }
    let msg = assert_described(&GgufFile::from_bytes(raw_gguf(0, 1, &body)).unwrap_err());
    assert!(msg.contains("3145728 uint8 values") && msg.contains("would take"), "{msg}");

    // A real vocabulary's worth is fine.
    let mut bytes = raw_gguf(0, 1, &[raw_key(b"ok", 9), raw_array(5, 1 << 20)].concat());
    bytes.resize(bytes.len() + (4 << 20), 0);
    let file = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(file.get("ok").and_then(Value::as_array).map(<[_]>::len), Some(1 << 20));
}

#[test]
fn counts_and_lengths_past_fixed_limits_are_refused() {
    use shoal_engine::gguf::{MAX_METADATA_KEYS, MAX_TENSORS};
    for (what, bytes, says) in [
        ("2^32 tensors", raw_gguf(1 << 32, 0, &[0; 64]), "4294967296 tensors"),
        ("too many tensors", raw_gguf(MAX_TENSORS + 1, 0, &[0; 64]), "tensors; shoal reads at most"),
        ("2^32 keys", raw_gguf(0, 1 << 32, &[0; 64]), "4294967296 metadata keys"),
        ("too many keys", raw_gguf(0, MAX_METADATA_KEYS + 1, &[0; 64]), "metadata keys; shoal reads at most"),
        ("a 70,000-byte key", raw_gguf(0, 1, &raw_key(&[b'k'; 70_000], 4)), "70000 bytes long"),
    ] {
        let err = GgufFile::from_bytes(bytes).expect_err(what);
        assert!(matches!(err, GgufError::Corrupt(_)), "{what}: {err}");
        let msg = assert_described(&err);
        assert!(msg.contains(says), "{what}: {msg}");
    }
    // A tensor name longer than 256 bytes.
    let long = "w".repeat(300);
    let t = || T { name: Box::leak(long.clone().into_boxed_str()), dims: vec![4], ty: 0, data: vec![0; 16] };
    let err = GgufFile::from_bytes(write_gguf(3, &[], &[t()])).unwrap_err();
    assert!(assert_described(&err).contains("300 bytes long"), "{err}");
}

#[test]
fn binary_keys_names_and_strings_are_escaped_and_cut_in_errors() {
    // The report: 290 KB of binary printed by one error. Binary with terminal escapes:
    let binary: Vec<u8> = (0..290_000u32).map(|i| [0x1B, b'[', 0xFF, 0, b'\n', 0xC3][i as usize % 6]).collect();
    // Valid UTF-8, but full of control characters (keys may have up to 65,535 bytes).
    let controls: Vec<u8> = b"\x1b[2J\x1b]0;owned\x07\r\n".iter().copied().cycle().take(60_000).collect();
    let mut cases: Vec<(&str, GgufError)> = Vec::new();
    let parse_err = |bytes: Vec<u8>| GgufFile::from_bytes(bytes).unwrap_err();

    // A key that is not UTF-8.
    cases.push(("binary key", parse_err(raw_gguf(0, 1, &raw_key(&binary[..60_000], 4)))));
    // A key of control characters whose value is cut off.
    cases.push(("controls key, truncated", parse_err(raw_gguf(0, 1, &raw_key(&controls, 4)))));
    // The same key twice.
    let kv = [raw_key(&controls, 4), 1u32.to_le_bytes().to_vec()].concat();
    cases.push(("controls key twice", parse_err(raw_gguf(0, 2, &[kv.clone(), kv].concat()))));
    // An array retyped as strings over binary bytes: the strings' lengths are binary too,
    // and the next key is read from the middle of them.
    let mut body = [raw_key(b"tokenizer.ggml.tokens", 9), raw_array(8, 2), raw_str(&binary)].concat();
    body.extend_from_slice(&[raw_str(b"ok"), raw_str(&binary[1..]), binary.clone()].concat());
    cases.push(("retyped array", parse_err(raw_gguf(0, 2, &body))));
    // general.alignment as a binary string.
    let body = [raw_key(b"general.alignment", 8), raw_str(&binary)].concat();
    cases.push(("alignment string", parse_err(raw_gguf(0, 1, &body))));
    // A key whose value is an unexpected type, asked for by a getter.
    let body = [raw_key(b"general.architecture", 8), raw_str(&binary), raw_key(&controls, 4), vec![0; 4]].concat();
    let file = GgufFile::from_bytes(raw_gguf(0, 2, &body)).unwrap();
    cases.push(("wrong type", file.get_u64("general.architecture").unwrap_err()));
    let key = String::from_utf8(controls.clone()).unwrap();
    cases.push(("wrong type, controls key", file.get_str(&key).unwrap_err()));
    cases.push(("missing key", file.get_u64(&format!("{key}.x")).unwrap_err()));
    cases.push(("missing tensor", file.tensor_f32(&key).unwrap_err()));
    // Tensor names: binary, and duplicated with control characters.
    let info = |name: &[u8]| [raw_str(name), 1u32.to_le_bytes().to_vec(), vec![0; 8 + 4 + 8]].concat();
    cases.push(("binary tensor name", parse_err(raw_gguf(1, 0, &info(&binary[..200])))));
    let name = &controls[..250];
    cases.push(("tensor twice", parse_err(raw_gguf(2, 0, &[info(name), info(name)].concat()))));
    // A tensor whose data is missing, and one of an unknown type read anyway.
    let mut lost = info(name);
    let n = lost.len();
    lost[n - 8..].copy_from_slice(&(1u64 << 20).to_le_bytes());
    cases.push(("tensor data missing", parse_err(raw_gguf(1, 0, &lost))));

    for (what, err) in &cases {
        let msg = assert_described(err);
        println!("{what}: {msg}");
        assert!(msg.len() < 400, "{what}: {msg}");
    }
    // Escaped, and cut with the length said.
    let shown: Vec<String> = cases.iter().map(|(_, e)| e.to_string()).collect();
    assert!(shown[0].contains(r"\u{1b}[\xff\0\n") && shown[0].contains("…(60000 bytes)"), "{}", shown[0]);
    assert!(shown[1].contains(r"\u{1b}[2J\u{1b}]0;owned\u{7}\r\n"), "{}", shown[1]);
    // The getters' fields hold the key escaped and cut too.
    let Err(GgufError::WrongType { key: k, .. }) = file.get_str(&key) else { panic!() };
    assert!(k.len() < 100 && k.ends_with("…(60000 bytes)"), "{k}");
}
