//! A text's embedding under a loaded model: the final hidden state of its last token (after
//! the output norm), L2-normalised. One definition for wasi-nn's embedding mode and the
//! daemon's `/v1/embeddings`.

use shoal_engine::models::EngineError;

use crate::models::LoadedModel;

/// The embedding of `ids` (a fresh cache of exactly their length, dropped after: an
/// embedding is of this text alone). The caller bounds `ids` and charges the cache.
pub fn embedding(model: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
    let mut cache = model.llama.new_cache(ids.len())?;
    let mut h = model.llama.hidden(ids, &mut cache)?;
    let norm = h.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
    if norm > 0.0 {
        h.iter_mut().for_each(|v| *v = (f64::from(*v) / norm) as f32);
    }
    Ok(h)
}
