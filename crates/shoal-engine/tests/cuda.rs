//! The CUDA backend against the CPU reference on SmolLM2-135M-Instruct, and its paged KV
//! pool: sessions interleaved on one pool, truncation, exhaustion, bad input.
//!
//! Needs an NVIDIA GPU (driver and cuBLAS) and the model (`$SHOAL_TEST_MODEL`, or
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` from `scripts/fetch-model.sh`); each test skips
//! with a message where either is missing.

#![cfg(feature = "cuda")]

#[path = "common/batch_check.rs"]
mod batch_check;

use std::path::PathBuf;
use std::sync::OnceLock;

use shoal_engine::backend::KvStore;
use shoal_engine::backend::cuda::{Cuda, KV_BLOCK};
use shoal_engine::gguf::GgufFile;
use shoal_engine::models::{EngineError, GenerateConfig, Llama, generate};
use shoal_engine::sampler::Sampler;
use shoal_engine::tokenizer::Tokenizer;

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("SHOAL_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    p.exists().then_some(p)
}

struct Pair {
    cpu: Llama,
    cuda: Llama<Cuda>,
    tokenizer: Tokenizer,
}

fn pair() -> Option<&'static Pair> {
    static PAIR: OnceLock<Option<Pair>> = OnceLock::new();
    PAIR.get_or_init(|| {
        if !Cuda::available() {
            eprintln!("skipped: no NVIDIA driver and cuBLAS on this machine");
            return None;
        }
        let Some(path) = model_path() else {
            eprintln!("skipped: no SmolLM2 model (scripts/fetch-model.sh, or set SHOAL_TEST_MODEL)");
            return None;
        };
        let file = GgufFile::open(&path).expect("open the model");
        let cuda = Llama::load_gguf(&file, Cuda::open().expect("a GPU is here: CUDA must open")).expect("load on CUDA");
        Some(Pair {
            cpu: Llama::from_gguf(&file).expect("load on the CPU"),
            cuda,
            tokenizer: Tokenizer::from_gguf(&file).unwrap(),
        })
    })
    .as_ref()
}

fn prompt(t: &Tokenizer, question: &str) -> Vec<u32> {
    t.encode(&format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"), true)
}

fn rel_err(reference: &[f32], other: &[f32]) -> f64 {
    let num: f64 = reference.iter().zip(other).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn greedy(n: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens: n, sampler: Sampler::greedy(), stop: Vec::new(), repeat_last_n: 64 }
}

#[test]
fn cuda_logits_and_greedy_tokens_match_the_cpu() {
    let Some(p) = pair() else { return };
    let ids = prompt(&p.tokenizer, "What is the capital of France?");
    let mut cc = p.cpu.new_cache(256).unwrap();
    let mut gc = p.cuda.new_cache(256).unwrap();
    let a = p.cpu.forward(&ids, &mut cc).unwrap();
    let b = p.cuda.forward(&ids, &mut gc).unwrap();
    let e = rel_err(&a, &b);
    // bf16 weights and bf16-rounded prompt activations on the GPU, f32 on the CPU.
    assert!(e < 0.05, "prompt logits differ: ||Δ||/||ref|| = {e}");
    for t in [11u32, 504, 2] {
        let a = p.cpu.forward(&[t], &mut cc).unwrap();
        let b = p.cuda.forward(&[t], &mut gc).unwrap();
        let e = rel_err(&a, &b);
        assert!(e < 0.05, "one-token logits differ: {e}");
    }

    let mut cc = p.cpu.new_cache(256).unwrap();
    let mut gc = p.cuda.new_cache(256).unwrap();
    let x = generate(&p.cpu, &p.tokenizer, &mut cc, &ids, &greedy(32), |_, _| {}).unwrap();
    let y = generate(&p.cuda, &p.tokenizer, &mut gc, &ids, &greedy(32), |_, _| {}).unwrap();
    assert_eq!(x.tokens, y.tokens, "greedy continuations differ");
    assert!(p.tokenizer.decode(&y.tokens).contains("Paris"), "{}", p.tokenizer.decode(&y.tokens));
}

#[test]
fn hidden_states_match_the_cpu_and_skip_the_recorded_step() {
    let Some(p) = pair() else { return };
    let ids = prompt(&p.tokenizer, "Embed me.");
    let mut cc = p.cpu.new_cache(64).unwrap();
    let mut gc = p.cuda.new_cache(64).unwrap();
    let a = p.cpu.hidden(&ids, &mut cc).unwrap();
    let b = p.cuda.hidden(&ids, &mut gc).unwrap();
    assert!(rel_err(&a, &b) < 0.05, "{}", rel_err(&a, &b));
    // One-token steps are recorded as a graph; a one-token hidden state must not replay it.
    for t in [11u32, 504, 2] {
        let a = p.cpu.hidden(&[t], &mut cc).unwrap();
        let b = p.cuda.hidden(&[t], &mut gc).unwrap();
        assert_eq!(b.len(), p.cuda.config().dim);
        assert!(rel_err(&a, &b) < 0.05, "{}", rel_err(&a, &b));
        // Both caches take the token once more, so the next step sees the same context.
        let l = p.cuda.forward(&[t], &mut gc).unwrap();
        assert_eq!(l.len(), p.cuda.config().vocab_size);
        p.cpu.forward(&[t], &mut cc).unwrap();
    }
}

#[test]
fn sessions_interleaved_on_one_pool_answer_as_if_alone() {
    let Some(p) = pair() else { return };
    let questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."];
    let alone: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let mut c = p.cuda.new_cache(128).unwrap();
            generate(&p.cuda, &p.tokenizer, &mut c, &prompt(&p.tokenizer, q), &greedy(24), |_, _| {}).unwrap().tokens
        })
        .collect();
    // The same sessions, one step each in turn: each step swaps the block table.
    let greedy = Sampler::greedy();
    let mut caches: Vec<_> = questions.iter().map(|_| p.cuda.new_cache(128).unwrap()).collect();
    let mut next: Vec<u32> = questions
        .iter()
        .zip(&mut caches)
        .map(|(q, c)| p.cuda.forward_sample(&prompt(&p.tokenizer, q), c, &greedy, &[], 0).unwrap())
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); questions.len()];
    for step in 0..24 {
        for i in 0..questions.len() {
            out[i].push(next[i]);
            if step + 1 < 24 {
                next[i] = p.cuda.forward_sample(&[next[i]], &mut caches[i], &greedy, &[], step as u64 + 1).unwrap();
            }
        }
    }
    assert_eq!(out, alone);
    for c in &caches {
        assert!(c.blocks() * KV_BLOCK >= c.len(), "{} blocks for {} positions", c.blocks(), c.len());
    }
}

#[test]
fn truncating_rewinds_and_frees_blocks() {
    let Some(p) = pair() else { return };
    let backend = p.cuda.backend();
    let ids = prompt(&p.tokenizer, "Write a sentence about the sea.");
    let mut c = p.cuda.new_cache(512).unwrap();
    let first = generate(&p.cuda, &p.tokenizer, &mut c, &ids, &greedy(40), |_, _| {}).unwrap().tokens;
    let held = c.blocks();
    assert_eq!(held, c.len().div_ceil(KV_BLOCK));
    c.truncate(ids.len() - 1);
    assert!(c.blocks() < held);
    // Re-running the last prompt token continues exactly as before.
    let again = generate(&p.cuda, &p.tokenizer, &mut c, &ids[ids.len() - 1..], &greedy(40), |_, _| {}).unwrap().tokens;
    assert_eq!(first, again);
    let (_, free_before) = backend.pool_positions();
    drop(c);
    let (_, free_after) = backend.pool_positions();
    assert!(free_after > free_before, "dropping a session gives its blocks back");
}

#[test]
fn a_full_pool_is_a_clear_error_and_loses_nothing() {
    let Some(p) = pair() else { return };
    let path = model_path().unwrap();
    let file = GgufFile::open(&path).unwrap();
    // SmolLM2: 30 layers × 2 × 16 positions × 192 values × 2 bytes (bf16) = 368,640 bytes a
    // block.
    let small = Llama::load_gguf(&file, Cuda::open_with_pool(Some(4 * 368_640)).unwrap()).unwrap();
    let mut a = small.new_cache(2048).unwrap();
    // The pool is made with the first cache.
    assert_eq!(small.backend().pool_positions(), (4 * KV_BLOCK, 4 * KV_BLOCK));
    let long: Vec<u32> = (0..100).map(|i| 200 + i).collect();
    match small.forward(&long, &mut a) {
        Err(EngineError::KvPoolFull { needed, free, .. }) => assert_eq!((needed, free), (7, 4)),
        other => panic!("expected KvPoolFull, got {other:?}"),
    }
    assert_eq!(a.len(), 0);
    // What fits still runs, and matches the big pool's answer.
    let ids = prompt(&p.tokenizer, "Hi");
    let x = small.forward(&ids, &mut a).unwrap();
    let mut b = p.cuda.new_cache(64).unwrap();
    let y = p.cuda.forward(&ids, &mut b).unwrap();
    assert!(rel_err(&y, &x) < 1e-5);
}

#[test]
fn bad_input_is_an_error() {
    let Some(p) = pair() else { return };
    let mut c = p.cuda.new_cache(8).unwrap();
    assert!(matches!(p.cuda.forward(&[], &mut c), Err(EngineError::EmptyInput)));
    assert!(matches!(p.cuda.forward(&[1 << 30], &mut c), Err(EngineError::TokenOutOfRange { .. })));
    assert!(matches!(p.cuda.forward(&[1; 9], &mut c), Err(EngineError::Kv(_))));
    assert_eq!(c.len(), 0);
    assert!(p.cuda.forward(&[1; 8], &mut c).is_ok());
    assert!(matches!(p.cuda.forward(&[1], &mut c), Err(EngineError::Kv(_))));
}

#[test]
fn sampling_on_the_gpu_draws_what_the_cpu_sampler_draws() {
    let Some(p) = pair() else { return };
    let ids = prompt(&p.tokenizer, "Tell me a story.");
    let mut a = p.cuda.new_cache(64).unwrap();
    let logits = p.cuda.forward(&ids, &mut a).unwrap();
    let history: Vec<u32> = ids[ids.len().saturating_sub(8)..].to_vec();
    p.cuda.backend().set_gpu_sampling(true);
    let samplers = [
        Sampler { temperature: 1.0, top_k: 40, top_p: 0.9, repetition_penalty: 1.0, seed: 7 },
        Sampler { temperature: 0.7, top_k: 1024, top_p: 1.0, repetition_penalty: 1.3, seed: 1 },
        Sampler { temperature: 2.0, top_k: 5, top_p: 0.5, repetition_penalty: 0.8, seed: 99 },
        // No top-k bound: sampled on the host from the copied logits.
        Sampler { temperature: 1.0, top_k: 0, top_p: 0.95, repetition_penalty: 1.1, seed: 3 },
    ];
    let mut b = p.cuda.new_cache(64).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for s in &samplers {
        for step in 0..40u64 {
            b.truncate(0);
            let on_gpu = p.cuda.forward_sample(&ids, &mut b, s, &history, step).unwrap();
            let on_cpu = s.sample(&logits, &history, step).unwrap();
            assert_eq!(on_gpu, on_cpu, "{s:?} step {step}");
            distinct.insert(on_gpu);
        }
    }
    p.cuda.backend().set_gpu_sampling(false);
    assert!(distinct.len() > 4, "sampling should vary with the step: {distinct:?}");
}

/// The kernels compile (NVRTC only: no GPU needed; `make test` provides NVRTC).
#[test]
fn kernels_compile_for_hopper_and_ampere() {
    if !shoal_cuda::nvrtc_available() {
        eprintln!("skipped: NVRTC (libnvrtc.so.13) is not installed");
        return;
    }
    for (major, minor) in [(9, 0), (8, 0)] {
        let ptx = shoal_cuda::compile_source("engine", shoal_engine::backend::cuda::KERNELS_SOURCE, major, minor)
            .unwrap_or_else(|e| panic!("sm_{major}{minor}: {e}"));
        for k in [
            "shoal_gemv",
            "shoal_gemv3",
            "shoal_attention",
            "shoal_attention_d64",
            "shoal_attention_d128",
            "shoal_attention_mma64",
            "shoal_attention_mma128",
            "shoal_sample",
            "shoal_argmax",
            "shoal_rope_qk",
        ] {
            assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing from the PTX");
        }
    }
}

#[test]
fn a_session_moves_from_cuda_to_cpu_and_back() {
    let Some(p) = pair() else { return };
    let ids = prompt(&p.tokenizer, "Name three colours.");
    let greedy = Sampler::greedy();
    let mut g = p.cuda.new_cache(128).unwrap();
    let first = p.cuda.forward_sample(&ids, &mut g, &greedy, &[], 0).unwrap();
    let snap = p.cuda.export_cache(&g).unwrap();
    // CUDA → CPU: the CPU continues from the GPU's cache as from its own.
    let mut c = p.cpu.import_cache(&snap, 128).unwrap();
    let mut cc = p.cpu.new_cache(128).unwrap();
    p.cpu.forward(&ids, &mut cc).unwrap();
    let a = p.cpu.forward(&[first], &mut c).unwrap();
    let b = p.cpu.forward(&[first], &mut cc).unwrap();
    assert!(rel_err(&b, &a) < 0.05, "{}", rel_err(&b, &a));
    // CPU → CUDA: back on the GPU, the continuation is the one that never left.
    let mut back = p.cuda.import_cache(&p.cpu.export_cache(&c).unwrap(), 128).unwrap();
    let mut stay = p.cuda.new_cache(128).unwrap();
    p.cuda.forward(&ids, &mut stay).unwrap();
    p.cuda.forward(&[first], &mut stay).unwrap();
    let (mut x, mut y) = (11u32, 11u32);
    for step in 0..8 {
        x = p.cuda.forward_sample(&[x], &mut stay, &greedy, &[], step).unwrap();
        y = p.cuda.forward_sample(&[y], &mut back, &greedy, &[], step).unwrap();
    }
    assert_eq!(x, y);
}

#[test]
fn a_parked_cache_comes_back_by_dma_and_converts_to_the_portable_form() {
    use shoal_engine::kv::KvImage;
    let Some(p) = pair() else { return };
    // Longer than one 16 MiB run of blocks would be for a bigger model; several blocks here.
    let ids = prompt(&p.tokenizer, &"the quiet river runs past old stone mills ".repeat(12));
    let greedy = Sampler::greedy();
    let mut g = p.cuda.new_cache(512).unwrap();
    let first = p.cuda.forward_sample(&ids, &mut g, &greedy, &[], 0).unwrap();
    let image = p.cuda.park_cache(&g).unwrap();
    assert!(matches!(image, KvImage::Native(_)), "CUDA parks in its own form");
    assert_eq!(image.len(), g.len());
    // Its portable form is exactly what export gives.
    assert_eq!(*image.snapshot(), p.cuda.export_cache(&g).unwrap());
    // Written straight from the pinned image, the file is the portable form's, byte for byte.
    let (mut streamed, mut portable) = (Vec::new(), Vec::new());
    image.write_safetensors(&mut streamed).unwrap();
    image.snapshot().write_safetensors(&mut portable).unwrap();
    assert_eq!(streamed.len(), portable.len());
    assert!(streamed == portable, "the streamed safetensors differ from the portable form's");
    // Back on the GPU (DMA alone), the continuation is the one that never left.
    let mut back = p.cuda.import_image(&image, 512).unwrap();
    assert_eq!(back.len(), g.len());
    let (mut x, mut y) = (first, first);
    for step in 0..12 {
        x = p.cuda.forward_sample(&[x], &mut g, &greedy, &[], step).unwrap();
        y = p.cuda.forward_sample(&[y], &mut back, &greedy, &[], step).unwrap();
        assert_eq!(x, y, "step {step}");
    }
    // On the CPU it goes through the portable form.
    let c = p.cpu.import_image(&image, 512).unwrap();
    assert_eq!(c.len(), image.len());
    // Too long for the context asked: a clear error.
    assert!(p.cuda.import_image(&image, 16).is_err());
}

#[test]
fn an_interrupted_prompt_leaves_the_cache_and_its_blocks_as_they_were() {
    use shoal_engine::interrupt::{Interrupt, Interrupted};
    use shoal_engine::models::EngineError;
    let Some(p) = pair() else { return };
    let ids = prompt(&p.tokenizer, "Write a sentence about the sea.");
    let mut c = p.cuda.new_cache(512).unwrap();
    let first = p.cuda.forward(&ids[..4], &mut c).unwrap();
    let (len, blocks) = (c.len(), c.blocks());
    {
        let stop = Interrupt::new();
        stop.kill();
        let _in = stop.enter();
        let e = p.cuda.forward(&ids[4..], &mut c).unwrap_err();
        assert!(matches!(e, EngineError::Interrupted(Interrupted::Killed)), "{e}");
    }
    assert_eq!((c.len(), c.blocks()), (len, blocks), "the stopped prompt left its positions behind");
    // The rest of the prompt then gives what one uninterrupted pass gives.
    let rest = p.cuda.forward(&ids[4..], &mut c).unwrap();
    let mut whole = p.cuda.new_cache(512).unwrap();
    let want = p.cuda.forward(&ids, &mut whole).unwrap();
    assert!(rel_err(&want, &rest) < 1e-3, "{}", rel_err(&want, &rest));
    assert!(!first.is_empty());
}

#[test]
fn sixty_four_sequences_in_one_batch_decode_as_they_do_alone_on_cuda() {
    let Some(p) = pair() else { return };
    drop(p.cuda.new_cache(16).unwrap()); // the pool exists from here on
    let (total, free0) = p.cuda.backend().pool_positions();
    let base =
        p.tokenizer.encode("The quick brown fox jumps over the lazy dog while the sea rolls on the shore", false);
    let prompts = batch_check::mixed_prompts(&base, 64);
    // bf16 activations: a pass of many rows goes through cuBLAS, one row through the GEMV
    // kernel; the sums are ordered differently, so logits agree to bf16 rounding (a few
    // percent of their scale at most, as CUDA against the CPU), and greedy tokens agree except
    // at near ties.
    let r = batch_check::greedy_matches(&p.cuda, &prompts, 8, 5e-2);
    eprintln!("{r:?}");
    assert!(r.compared >= 64 * 6, "too few steps compared: {r:?}");
    assert_eq!(p.cuda.backend().pool_positions(), (total, free0), "every KV block came back to the pool");
}

#[test]
fn a_seeded_batch_on_cuda_is_reproducible() {
    // Sampling on CUDA is reproducible for a batch of the same sequences; a lone sequence may
    // sample differently (its sums are ordered differently: see docs/benchmarks.md), which the
    // CPU test `seeded_sampling_gives_the_same_tokens_in_a_batch` checks exactly.
    let Some(p) = pair() else { return };
    let base = p.tokenizer.encode("Write one sentence about the sea, the shore and the town", false);
    let prompts = batch_check::mixed_prompts(&base, 32);
    let a = batch_check::sampled_in_a_batch(&p.cuda, &prompts, 8);
    let b = batch_check::sampled_in_a_batch(&p.cuda, &prompts, 8);
    assert_eq!(a, b);
    assert!(a.iter().all(|t| t.len() == 8));
}
