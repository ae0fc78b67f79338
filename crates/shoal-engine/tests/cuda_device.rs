//! Models on one GPU share one device layer (`shoal_cuda::Device`) and its KV budget; a
//! model's KV pool grows in mapped chunks as sessions need blocks and gives them back when
//! sessions end.
//!
//! Its own test binary (so its own process and budget): `tests/cuda.rs` runs its tests in
//! parallel, each taking blocks from the same device budget, which would make the exact
//! budget accounting here race. The tests below take one lock each for the same reason.
//!
//! Needs an NVIDIA GPU (driver and cuBLAS) and the model (`$SHOAL_TEST_MODEL`, or
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` from `scripts/fetch-model.sh`); each test skips
//! with a message where either is missing.

#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use shoal_engine::backend::Backend;
use shoal_engine::backend::cuda::{Cuda, KV_BLOCK};
use shoal_engine::gguf::GgufFile;
use shoal_engine::models::{EngineError, Llama};

fn model_file() -> Option<GgufFile> {
    if !Cuda::available() {
        eprintln!("skipped: no NVIDIA driver and cuBLAS on this machine");
        return None;
    }
    let p = std::env::var_os("SHOAL_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !p.exists() {
        eprintln!("skipped: no SmolLM2 model (scripts/fetch-model.sh, or set SHOAL_TEST_MODEL)");
        return None;
    }
    Some(GgufFile::open(&p).expect("open the model"))
}

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn load(file: &GgufFile) -> Llama<Cuda> {
    Llama::load_gguf(file, Cuda::open().expect("a GPU is here: CUDA must open")).expect("load on CUDA")
}

fn rel_err(reference: &[f32], other: &[f32]) -> f64 {
    let num: f64 = reference.iter().zip(other).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn two_models_on_one_gpu_share_the_device_and_one_kv_budget() {
    let _serial = serial();
    let Some(file) = model_file() else { return };
    let (a, b) = (load(&file), load(&file));
    let device = a.backend().device().clone();
    assert!(Arc::ptr_eq(&device, b.backend().device()), "two models opened two devices");
    assert_eq!(device.raw_context(), b.backend().device().raw_context());
    let source = shoal_engine::backend::cuda::KERNELS_SOURCE;
    assert!(Arc::ptr_eq(&device.module("engine", source).unwrap(), &device.module("engine", source).unwrap()));

    // Both pools exist (their first chunk, with the sink, is mapped). The caches are made on
    // the backends, not the models, so that one may hold more positions than the model's
    // context: enough to ask for the whole budget.
    let (layers, kv_dim) = (a.config().n_layers, a.config().kv_dim());
    let mut ca = a.backend().new_cache(layers, kv_dim, 1 << 24).unwrap();
    let mut cb = b.backend().new_cache(layers, kv_dim, 1 << 24).unwrap();
    let budget = device.kv_budget().unwrap();
    let start = budget.used();
    let (_, a_free0) = a.backend().pool_positions();
    let (_, b_free0) = b.backend().pool_positions();
    assert!(b_free0 > 0);

    // Model A takes every block the budget can back.
    a.backend().reserve(&mut ca, a_free0).expect("A takes what the budget holds");
    assert!(budget.used() > start, "the pool grew");
    // What is left is less than one chunk (64 MiB), or A would have had it.
    assert!(budget.available() < 64 << 20, "A holds all the budget but {} bytes", budget.available());
    // One block more is over the device budget: a clear error, not a crash.
    match a.backend().reserve(&mut ca, a_free0 + KV_BLOCK) {
        Err(EngineError::KvPoolFull { device_budget: Some((used, limit)), .. }) => {
            assert_eq!((used, limit), (budget.used(), budget.limit()));
        }
        other => panic!("expected KvPoolFull with the device budget, got {other:?}"),
    }
    // Model B is held to what its own mapped chunk has left.
    let (_, b_free) = b.backend().pool_positions();
    assert!(b_free < b_free0, "B sees the budget A took: {b_free} of {b_free0} positions");
    let e = b.backend().reserve(&mut cb, b_free0).unwrap_err();
    assert!(matches!(e, EngineError::KvPoolFull { device_budget: Some(_), .. }), "{e}");
    assert!(e.to_string().contains("KV budget"), "{e}");

    // A's session ends: its chunks go back to the budget, and B can use them.
    drop(ca);
    assert_eq!(budget.used(), start, "A gave back every chunk it mapped");
    assert_eq!(a.backend().pool_positions().1, a_free0);
    b.backend().reserve(&mut cb, b_free0).expect("B uses the memory A released");
    assert!(budget.used() > start);
    drop(cb);
    assert_eq!(budget.used(), start, "B gave back every chunk it mapped");
}

#[test]
fn the_pool_grows_with_sessions_and_shrinks_back_when_they_end() {
    let _serial = serial();
    let Some(file) = model_file() else { return };
    let m = load(&file);
    let first = m.new_cache(4096).unwrap();
    let budget = m.backend().device().kv_budget().unwrap();
    let (start, positions0) = (budget.used(), m.backend().pool_positions());
    // Three sessions of 1,500 positions (94 blocks each): past the first 64 MiB chunk (182
    // blocks of SmolLM2).
    let prompt: Vec<u32> = (0..1500).map(|i| 200 + (i * 7919 % 20000) as u32).collect();
    let mut caches: Vec<_> = (0..3).map(|_| m.new_cache(4096).unwrap()).collect();
    let mut logits = Vec::new();
    for c in &mut caches {
        logits.push(m.forward(&prompt, c).unwrap());
        assert!(c.blocks() * KV_BLOCK >= prompt.len());
    }
    assert!(budget.used() > start, "the pool mapped more chunks: {} bytes from {start}", budget.used());
    // The last session's blocks lie in chunks mapped on demand; it answers as the first did.
    assert!(rel_err(&logits[0], &logits[2]) < 1e-4, "{}", rel_err(&logits[0], &logits[2]));
    // Ending the sessions gives the chunks back (the first session's blocks stay).
    drop(caches);
    assert_eq!(budget.used(), start, "every chunk mapped for the sessions went back to the budget");
    assert_eq!(m.backend().pool_positions(), positions0);
    // And the pool grows again when asked.
    let mut again = m.new_cache(4096).unwrap();
    let l = m.forward(&prompt, &mut again).unwrap();
    assert!(rel_err(&logits[0], &l) < 1e-4);
    drop((again, first));
    assert_eq!(budget.used(), start);
}
