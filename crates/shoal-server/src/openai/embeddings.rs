//! `POST /v1/embeddings`: each input's embedding under a loaded model (the engine's
//! embedding mode, `shoal_host::embed`: the last token's final hidden state, L2-normalised),
//! as floats or, as OpenAI's clients ask by default, base64 of little-endian f32s.
//!
//! Bounded before anything is computed: at most [`MAX_INPUTS`] inputs, each at most
//! [`MAX_INPUT_TOKENS`] tokens (and the model's context), [`MAX_TOTAL_TOKENS`] in all; one
//! input at a time, each with a cache of exactly its length, dropped after.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::api::blocking;
use crate::body::read_json;
use crate::error::{ApiError, shown};

/// The most inputs of one request.
pub const MAX_INPUTS: usize = 256;
/// The most tokens of one input.
pub const MAX_INPUT_TOKENS: usize = 8192;
/// The most tokens of one request.
pub const MAX_TOTAL_TOKENS: usize = 65_536;

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    input: Input,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    #[serde(default, rename = "user")]
    _user: Option<Value>,
}

fn bad(m: String, p: &'static str) -> ApiError {
    ApiError::bad(m).param(p)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(app): State<Arc<App>>, body: Body) -> Result<Json<Value>, ApiError> {
    let r: EmbeddingRequest = read_json(body, app.body).await?;
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(bad(
                format!("`encoding_format` is `{}`; give float or base64", shown(f, 32)),
                "encoding_format",
            ));
        }
    };
    let model = r.model.unwrap_or_else(|| app.default_model.clone());
    let loaded = app.models.get(&model).map_err(|e| {
        ApiError::new(StatusCode::NOT_FOUND, format!("model_not_found: {e}")).code("model_not_found").param("model")
    })?;
    let dim = loaded.llama.config().dim;
    if let Some(d) = r.dimensions
        && d != dim as i64
    {
        return Err(ApiError::bad(format!("`dimensions` is {d}; {model}'s embeddings have {dim} (leave it out)"))
            .code("unsupported_parameter")
            .param("dimensions"));
    }
    let vocab = loaded.tokenizer.vocab_size();
    let texts_or_ids: Vec<Result<String, Vec<i64>>> = match r.input {
        Input::Text(t) => vec![Ok(t)],
        Input::Texts(v) => v.into_iter().map(Ok).collect(),
        Input::Tokens(ids) => vec![Err(ids)],
        Input::TokenLists(v) => v.into_iter().map(Err).collect(),
    };
    if texts_or_ids.is_empty() || texts_or_ids.len() > MAX_INPUTS {
        return Err(bad(format!("{} inputs; give 1 to {MAX_INPUTS}", texts_or_ids.len()), "input"));
    }
    let most = MAX_INPUT_TOKENS.min(loaded.llama.config().context_length.max(1));
    let mut inputs = Vec::with_capacity(texts_or_ids.len());
    let mut total = 0;
    for (i, x) in texts_or_ids.into_iter().enumerate() {
        let ids: Vec<u32> = match x {
            Ok(t) => {
                // Bounded before tokenizing: no token of a real vocabulary is 64 bytes long.
                if t.len() > most * 64 {
                    return Err(bad(format!("input {i} is {} bytes, far more than {most} tokens", t.len()), "input"));
                }
                loaded.tokenizer.encode(&t, false)
            }
            Err(ids) => {
                if let Some(b) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                    return Err(bad(format!("input {i}: token {b} is not in the vocabulary of {vocab}"), "input"));
                }
                ids.into_iter().map(|t| t as u32).collect()
            }
        };
        if ids.is_empty() || ids.len() > most {
            return Err(bad(format!("input {i} is {} tokens; give 1 to {most}", ids.len()), "input"));
        }
        total += ids.len();
        if total > MAX_TOTAL_TOKENS {
            return Err(bad(format!("the inputs are more than {MAX_TOTAL_TOKENS} tokens in all"), "input"));
        }
        inputs.push(ids);
    }
    let l = loaded.clone();
    let vectors =
        blocking(move || inputs.iter().map(|ids| shoal_host::embed::embedding(&l, ids)).collect::<Result<Vec<_>, _>>())
            .await?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the embedding failed: {e}")))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": total, "total_tokens": total}})))
}
