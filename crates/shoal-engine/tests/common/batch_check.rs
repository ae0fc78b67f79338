#![allow(dead_code)] // each test crate uses a part
//! "Batched equals alone", for any backend: sessions decoded one at a time against the same
//! sessions decoded together in passes of many sequences of mixed lengths.

use shoal_engine::backend::{Backend, KvStore, Output, Seq, Want};
use shoal_engine::models::Llama;
use shoal_engine::sampler::Sampler;

fn argmax(l: &[f32]) -> u32 {
    Sampler::greedy().sample(l, &[], 0).expect("logits")
}

fn scale(l: &[f32]) -> f32 {
    l.iter().fold(0.0f32, |s, v| s.max(v.abs()))
}

/// Whether the two best logits of `l` are within `tol` of each other (a near tie, where a
/// rounding difference may pick either).
fn near_tie(l: &[f32], tol: f32) -> bool {
    let mut v = l.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1] <= tol
}

/// What [`greedy_matches`] saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Steps whose logits and token were compared.
    pub compared: usize,
    /// Sequences that parted at a near tie (compared no further).
    pub ties: usize,
    /// The largest difference of logits, relative to the logits' scale.
    pub max_rel: f32,
}

/// Runs every prompt alone (prefill, then `steps` greedy tokens) and all together in batches
/// (prefill in passes of at most the backend's chunk, then decode passes of every sequence),
/// and checks that the logits agree within `tol` of their scale and the greedy tokens are the
/// same (a sequence may part only at a near tie of the lone run's logits).
pub fn greedy_matches<B: Backend>(model: &Llama<B>, prompts: &[Vec<u32>], steps: usize, tol: f32) -> Report {
    // Alone.
    let mut alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = Vec::new();
    for p in prompts {
        let mut cache = model.new_cache(256).unwrap();
        let mut l = model.forward(p, &mut cache).unwrap();
        let (mut toks, mut logits) = (Vec::new(), vec![l.clone()]);
        for _ in 0..steps {
            let t = argmax(&l);
            toks.push(t);
            l = model.forward(&[t], &mut cache).unwrap();
            logits.push(l.clone());
        }
        alone.push((toks, logits));
    }
    // Together: prefill in passes that fit the backend.
    let mut caches: Vec<B::Cache> = prompts.iter().map(|_| model.new_cache(256).unwrap()).collect();
    let mut last: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let (most_tokens, most_seqs) = (model.backend().max_chunk(), model.backend().max_seqs());
    let mut i = 0;
    while i < prompts.len() {
        let (mut j, mut used) = (i, 0);
        while j < prompts.len() && j - i < most_seqs && used + prompts[j].len() <= most_tokens {
            used += prompts[j].len();
            j += 1;
        }
        let mut seqs: Vec<Seq<'_, B::Cache>> = prompts[i..j]
            .iter()
            .zip(caches[i..j].iter_mut())
            .map(|(p, c)| Seq { tokens: p, cache: c, want: Want::Logits })
            .collect();
        for (k, out) in model.forward_batch(&mut seqs).unwrap().into_iter().enumerate() {
            let Output::Logits(l) = out else { panic!("asked for logits") };
            last[i + k] = l;
        }
        i = j;
    }
    let mut report = Report::default();
    let mut live: Vec<bool> = vec![true; prompts.len()];
    let mut bad = Vec::new();
    for step in 0..=steps {
        let mut next: Vec<(usize, u32)> = Vec::new();
        for s in 0..prompts.len() {
            if !live[s] {
                continue;
            }
            let want = &alone[s].1[step];
            let rel = last[s].iter().zip(want).fold(0.0f32, |d, (a, b)| d.max((a - b).abs())) / scale(want).max(1e-6);
            if rel > tol {
                bad.push(format!("sequence {s} ({} prompt tokens) step {step}: {rel}", prompts[s].len()));
                live[s] = false;
                continue;
            }
            report.max_rel = report.max_rel.max(rel);
            report.compared += 1;
            if step == steps {
                continue;
            }
            let t = argmax(&last[s]);
            if t != alone[s].0[step] {
                assert!(
                    near_tie(want, tol * scale(want)),
                    "sequence {s} step {step}: {t} in a batch, {} alone, and not at a near tie",
                    alone[s].0[step]
                );
                report.ties += 1;
                live[s] = false;
                continue;
            }
            next.push((s, t));
        }
        if step == steps || next.is_empty() {
            break;
        }
        // One decode pass of every live sequence (in chunks of the backend's limits).
        for group in next.chunks(most_seqs.min(most_tokens)) {
            let toks: Vec<[u32; 1]> = group.iter().map(|&(_, t)| [t]).collect();
            let mut refs: Vec<Option<&mut B::Cache>> = caches.iter_mut().map(Some).collect();
            let mut seqs: Vec<Seq<'_, B::Cache>> = group
                .iter()
                .zip(&toks)
                .map(|(&(s, _), t)| Seq { tokens: t, cache: refs[s].take().unwrap(), want: Want::Logits })
                .collect();
            for (k, out) in model.forward_batch(&mut seqs).unwrap().into_iter().enumerate() {
                let Output::Logits(l) = out else { panic!("asked for logits") };
                last[group[k].0] = l;
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} sequences' logits differ by more than {tol} of their scale:\n{}",
        bad.len(),
        bad.join("\n")
    );
    for (s, c) in caches.iter().enumerate() {
        if live[s] {
            assert_eq!(c.len(), prompts[s].len() + steps, "sequence {s}'s cache length");
        }
    }
    report
}

/// `n` prompts of mixed lengths (1 to 13 tokens) drawn from `base`.
pub fn mixed_prompts(base: &[u32], n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7) % 13;
            (0..len).map(|j| base[(i * 3 + j * 5) % base.len()]).collect()
        })
        .collect()
}

fn sampler(i: usize) -> Sampler {
    if i.is_multiple_of(2) {
        Sampler::greedy()
    } else {
        Sampler { temperature: 0.8, top_k: 40, top_p: 0.95, repetition_penalty: 1.1, seed: i as u64 }
    }
}

/// Each sequence's tokens from `steps` passes of [`Want::Token`] with its own sampler (even:
/// greedy; odd: temperature 0.8, top-k 40, top-p 0.95, seed = its index, penalty 1.1), all in
/// one batch.
pub fn sampled_in_a_batch<B: Backend>(model: &Llama<B>, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
    let mut caches: Vec<B::Cache> = prompts.iter().map(|_| model.new_cache(256).unwrap()).collect();
    let samplers: Vec<Sampler> = (0..prompts.len()).map(sampler).collect();
    let mut histories: Vec<Vec<u32>> = prompts.to_vec();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let inputs: Vec<Vec<u32>> =
            (0..prompts.len()).map(|i| if step == 0 { prompts[i].clone() } else { vec![got[i][step - 1]] }).collect();
        if step > 0 {
            for (h, g) in histories.iter_mut().zip(&got) {
                h.push(g[step - 1]);
            }
        }
        let mut seqs: Vec<Seq<'_, B::Cache>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(&samplers)
            .zip(&histories)
            .map(|(((t, c), s), h)| Seq {
                tokens: t,
                cache: c,
                want: Want::Token { sampler: s, history: h, step: step as u64 },
            })
            .collect();
        for (i, out) in model.forward_batch(&mut seqs).unwrap().into_iter().enumerate() {
            let Output::Token(t) = out else { panic!("asked for a token") };
            got[i].push(t);
        }
    }
    got
}

/// [`sampled_in_a_batch`] against the same sequences decoded alone with `forward_sample`:
/// every sequence's tokens must be the same. Returns how many sequences were compared.
pub fn sampled_tokens_match<B: Backend>(model: &Llama<B>, prompts: &[Vec<u32>], steps: usize) -> usize {
    let run_alone = |i: usize, p: &Vec<u32>| {
        let mut cache = model.new_cache(256).unwrap();
        let mut history = p.clone();
        let mut t = model.forward_sample(p, &mut cache, &sampler(i), &history, 0).unwrap();
        let mut out = vec![t];
        for step in 1..steps {
            history.push(t);
            t = model.forward_sample(&[t], &mut cache, &sampler(i), &history, step as u64).unwrap();
            out.push(t);
        }
        out
    };
    let alone: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| run_alone(i, p)).collect();
    let got = sampled_in_a_batch(model, prompts, steps);
    let bad: Vec<String> = alone
        .iter()
        .zip(&got)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| {
            format!(
                "sequence {i} ({} prompt tokens, {:?}): alone {a:?}, in a batch {b:?}",
                prompts[i].len(),
                sampler(i)
            )
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} sequences differ:\n{}", bad.len(), prompts.len(), bad.join("\n"));
    prompts.len()
}
