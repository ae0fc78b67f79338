//! Continuous batching on the CPU: sessions decoded alone and inside passes of 64 sequences of
//! mixed lengths give the same greedy tokens (logits within rounding), seeded sampling gives
//! the same tokens in any batch, and callers on many threads share passes.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-model.sh`); skips with a
//! message where it is missing. The same checks run on CUDA in `tests/cuda.rs`.

#[path = "common/batch_check.rs"]
mod batch_check;

use std::path::PathBuf;
use std::sync::{Barrier, OnceLock};

use shoal_engine::gguf::GgufFile;
use shoal_engine::models::Llama;
use shoal_engine::sampler::Sampler;
use shoal_engine::tokenizer::Tokenizer;

struct Loaded {
    model: Llama,
    tokenizer: Tokenizer,
}

fn smollm2() -> Option<&'static Loaded> {
    static MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
            if !path.exists() {
                return None;
            }
            let file = GgufFile::open(&path).expect("open the model");
            Some(Loaded {
                model: Llama::from_gguf(&file).expect("load the model"),
                tokenizer: Tokenizer::from_gguf(&file).expect("load the tokenizer"),
            })
        })
        .as_ref()
        .or_else(|| {
            println!("skipping: run scripts/fetch-model.sh");
            None
        })
}

fn base(t: &Tokenizer) -> Vec<u32> {
    t.encode(
        "The quick brown fox jumps over the lazy dog while the sea, grey and cold, rolls on the shore of a town",
        false,
    )
}

#[test]
fn sixty_four_sequences_in_one_batch_decode_as_they_do_alone() {
    let Some(m) = smollm2() else { return };
    let prompts = batch_check::mixed_prompts(&base(&m.tokenizer), 64);
    let r = batch_check::greedy_matches(&m.model, &prompts, 4, 1e-3);
    eprintln!("{r:?}");
    assert!(r.compared >= 64 * 4, "too few steps compared: {r:?}");
}

#[test]
fn seeded_sampling_gives_the_same_tokens_in_a_batch() {
    let Some(m) = smollm2() else { return };
    let prompts = batch_check::mixed_prompts(&base(&m.tokenizer), 16);
    assert_eq!(batch_check::sampled_tokens_match(&m.model, &prompts, 6), 16);
}

#[test]
fn callers_on_many_threads_share_passes_and_get_their_own_answers() {
    let Some(loaded) = smollm2() else { return };
    let prompts = batch_check::mixed_prompts(&base(&loaded.tokenizer), 8);
    // A model of its own: the other tests' calls must not count in its batcher's numbers.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = Llama::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let m = &model;
    let decode = |p: &Vec<u32>, seed: u64| {
        let s = Sampler { temperature: 0.7, top_k: 40, top_p: 0.9, repetition_penalty: 1.0, seed };
        let mut cache = m.new_cache(128).unwrap();
        let mut t = m.forward_sample(p, &mut cache, &s, &[], 0).unwrap();
        let mut out = vec![t];
        for step in 1..12 {
            t = m.forward_sample(&[t], &mut cache, &s, &[], step).unwrap();
            out.push(t);
        }
        out
    };
    let alone: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| decode(p, i as u64)).collect();
    let before = m.batch_stats();
    let barrier = Barrier::new(prompts.len());
    let together: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    decode(p, i as u64)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    let after = m.batch_stats();
    let (passes, seqs) = (after.passes - before.passes, after.seqs - before.seqs);
    assert_eq!(seqs, 8 * 12, "every call ran in some pass");
    assert!(passes < seqs, "{seqs} calls from 8 threads at once ran in {passes} passes: none were shared");
}

#[test]
fn a_batch_refuses_bad_input_and_leaves_every_cache_as_it_was() {
    use shoal_engine::backend::{Seq, Want};
    let Some(m) = smollm2() else { return };
    let mut a = m.model.new_cache(16).unwrap();
    let mut b = m.model.new_cache(16).unwrap();
    m.model.forward(&[1, 2, 3], &mut a).unwrap();
    let good = [5u32, 6];
    let bad = [7u32, 1 << 30];
    let mut seqs = [
        Seq { tokens: &good, cache: &mut a, want: Want::Logits },
        Seq { tokens: &bad, cache: &mut b, want: Want::Logits },
    ];
    let e = m.model.forward_batch(&mut seqs).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let long = [1u32; 20];
    let mut seqs = [
        Seq { tokens: &good, cache: &mut a, want: Want::Logits },
        Seq { tokens: &long, cache: &mut b, want: Want::Logits },
    ];
    let e = m.model.forward_batch(&mut seqs).unwrap_err().to_string();
    assert!(e.contains("20"), "{e}");
    assert_eq!((a.len(), b.len()), (3, 0));
    let mut seqs = [Seq { tokens: &good, cache: &mut a, want: Want::Hidden }];
    assert!(m.model.forward_batch(&mut seqs).is_err());
    assert_eq!(a.len(), 3);
}

#[test]
fn a_caller_past_its_deadline_is_dropped_between_passes_and_the_others_go_on() {
    use shoal_engine::interrupt::{Interrupt, Interrupted};
    use shoal_engine::models::EngineError;
    let Some(m) = smollm2() else { return };
    // A prompt of 1,500 tokens takes three passes of at most 512; its deadline passes during
    // the first, so it is dropped before the second, its cache as it was.
    let long: Vec<u32> = (0..1500u32).map(|i| 100 + (i * 37) % 5000).collect();
    let short = m.tokenizer.encode("The capital of France is", false);
    let greedy = Sampler::greedy();
    let decode = || {
        let mut c = m.model.new_cache(64).unwrap();
        let mut t = m.model.forward_sample(&short, &mut c, &greedy, &[], 0).unwrap();
        let mut out = vec![t];
        for step in 1..8 {
            t = m.model.forward_sample(&[t], &mut c, &greedy, &[], step).unwrap();
            out.push(t);
        }
        out
    };
    let alone = decode();
    std::thread::scope(|s| {
        let late = s.spawn(|| {
            let i = Interrupt::new();
            i.set_deadline(Some(std::time::Duration::from_millis(20)));
            let _in = i.enter();
            let mut c = m.model.new_cache(2048).unwrap();
            (m.model.forward(&long, &mut c), c)
        });
        let beside = s.spawn(decode);
        let (r, c) = late.join().unwrap();
        assert!(matches!(r, Err(EngineError::Interrupted(Interrupted::Deadline))), "{r:?}");
        assert_eq!(c.len(), 0, "the dropped prompt left its cache as it found it");
        assert_eq!(beside.join().unwrap(), alone, "the neighbour's answer is its own");
    });
}
