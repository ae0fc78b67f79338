//! Picking the next token from a model's logits.
//!
//! [`Sampler`] is plain data: temperature, top-k, top-p (nucleus), a repetition penalty and a
//! seed. Greedy decoding is temperature 0. Randomness comes from a small counter-based
//! generator (SplitMix64) keyed by the seed and the step number, so a sampler holds no hidden
//! state: the same seed, logits, history and step always give the same token, and a session's
//! sampling state is just `(sampler, step)`, which snapshots as plain values.

/// How to choose a token from logits. `Sampler::default()` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Divides the logits before the softmax; `0` (or anything not above 0) picks the most
    /// likely token (greedy). Typical values are 0.6–1.0.
    pub temperature: f32,
    /// Keeps only the `top_k` most likely tokens; `0` keeps all.
    pub top_k: usize,
    /// Keeps the smallest set of most likely tokens whose probabilities add up to at least
    /// `top_p`; `1.0` (or anything outside `(0, 1)`) keeps all.
    pub top_p: f32,
    /// Divides the positive logits (multiplies the negative ones) of tokens in the history
    /// given to [`Sampler::sample`], as in llama.cpp and CTRL; `1.0` turns it off.
    pub repetition_penalty: f32,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampler {
    /// Always the most likely token, no penalty.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }

    /// Whether this sampler always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }

    /// Chooses a token from `logits` (one value per vocabulary entry).
    ///
    /// `history` holds the tokens the repetition penalty applies to (typically the last 64
    /// of the context); ids outside the vocabulary are ignored. `step` numbers the choice
    /// within a generation (0, 1, 2, …) and keys the random draw. NaN logits count as `-inf`.
    /// Returns `None` only when `logits` is empty.
    pub fn sample(&self, logits: &[f32], history: &[u32], step: u64) -> Option<u32> {
        if logits.is_empty() {
            return None;
        }
        let mut l: Vec<f32> = logits.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }).collect();
        let p = self.repetition_penalty;
        if p.is_finite() && p > 0.0 && p != 1.0 {
            let mut seen: Vec<u32> = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(v) = l.get_mut(id as usize) {
                    *v = if *v > 0.0 { *v / p } else { *v * p };
                }
            }
        }
        if self.is_greedy() {
            return Some(argmax(&l));
        }

        let inv_t = 1.0 / self.temperature;
        let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v * inv_t)).collect();
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.select_nth_unstable_by(self.top_k - 1, by_logit_desc);
            cand.truncate(self.top_k);
        }
        cand.sort_unstable_by(by_logit_desc);
        let max = cand[0].1;
        if !max.is_finite() {
            // Everything is -inf (or +inf dominates): no distribution to draw from.
            return Some(cand[0].0);
        }
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut keep = probs.len();
        if self.top_p > 0.0 && self.top_p < 1.0 {
            let target = self.top_p as f64 * total;
            let mut cum = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        let mut u = uniform(self.seed, step) * kept;
        for (i, &q) in probs.iter().enumerate() {
            if u < q {
                return Some(cand[i].0);
            }
            u -= q;
        }
        // Rounding left `u` just past the end.
        Some(cand[keep - 1].0)
    }
}

impl Sampler {
    /// The uniform number in `[0, 1)` that [`Sampler::sample`] draws at `step` (for
    /// backends that sample elsewhere and must draw the same).
    pub fn draw(&self, step: u64) -> f64 {
        uniform(self.seed, step)
    }
}

/// Index of the largest value (the first one on ties); `-inf`/NaN never win over a number.
fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64's output function.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` determined by `(seed, step)`.
fn uniform(seed: u64, step: u64) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(step));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest() {
        let s = Sampler::greedy();
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.0], &[], 0), Some(1));
        assert_eq!(s.sample(&[], &[], 0), None);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[], 0), Some(0));
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let s = Sampler { repetition_penalty: 2.0, ..Sampler::greedy() };
        // 3.0 / 2 < 2.0: the repeated token loses; an out-of-range id is ignored.
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1, 1, 99], 0), Some(2));
        // A negative logit gets more negative.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0], 0), Some(1));
    }

    #[test]
    fn sampling_is_reproducible_and_respects_top_k_and_top_p() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let s = Sampler { temperature: 1.0, top_k: 5, top_p: 1.0, repetition_penalty: 1.0, seed: 42 };
        let a: Vec<u32> = (0..50).map(|i| s.sample(&logits, &[], i).unwrap()).collect();
        let b: Vec<u32> = (0..50).map(|i| s.sample(&logits, &[], i).unwrap()).collect();
        assert_eq!(a, b);
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(a.iter().all(|t| order[..5].contains(t)));
        assert!(a.iter().any(|&t| t != a[0]), "should not be constant: {a:?}");
        let other = Sampler { seed: 43, ..s };
        let c: Vec<u32> = (0..50).map(|i| other.sample(&logits, &[], i).unwrap()).collect();
        assert_ne!(a, c);

        // A tiny top-p keeps only the most likely token.
        let nucleus = Sampler { top_k: 0, top_p: 1e-6, ..s };
        for i in 0..20 {
            assert_eq!(nucleus.sample(&logits, &[], i), Some(order[0]));
        }
    }

    #[test]
    fn uniform_is_in_range() {
        for i in 0..1000 {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
