//! Reading request fields out of a JSON body with errors that name the field, and the
//! sampling parameters shared by every endpoint.

use super::error::ApiError;
use crate::engine::sampling::SamplingConfig;
use serde_json::{Map, Value};

pub type Body = Map<String, Value>;

pub fn parse_body(bytes: &[u8]) -> Result<Body, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// A field that is absent or null reads as `None`.
pub fn field<'a>(body: &'a Body, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

pub fn opt_f32(body: &Body, name: &str, min: f32, max: f32) -> Result<Option<f32>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::param(name, format!("{name} must be a number")))?;
    if !(min as f64..=max as f64).contains(&x) {
        return Err(ApiError::param(
            name,
            format!("{name} must be between {min} and {max}, got {x}"),
        ));
    }
    Ok(Some(x as f32))
}

pub fn opt_u64(body: &Body, name: &str) -> Result<Option<u64>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(None);
    };
    v.as_u64()
        .map(Some)
        .ok_or_else(|| ApiError::param(name, format!("{name} must be a non-negative integer")))
}

pub fn opt_i64(body: &Body, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(None);
    };
    v.as_i64()
        .map(Some)
        .ok_or_else(|| ApiError::param(name, format!("{name} must be an integer")))
}

pub fn opt_bool(body: &Body, name: &str) -> Result<Option<bool>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(None);
    };
    v.as_bool()
        .map(Some)
        .ok_or_else(|| ApiError::param(name, format!("{name} must be true or false")))
}

pub fn opt_str<'a>(body: &'a Body, name: &str) -> Result<Option<&'a str>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(None);
    };
    v.as_str()
        .map(Some)
        .ok_or_else(|| ApiError::param(name, format!("{name} must be a string")))
}

/// `stop`: a string or a list of at most 16 strings.
pub fn stop_strings(body: &Body, name: &str) -> Result<Vec<String>, ApiError> {
    let Some(v) = field(body, name) else {
        return Ok(Vec::new());
    };
    let list = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::param(name, format!("{name} must hold strings")))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::param(
                name,
                format!("{name} must be a string or a list of strings"),
            ))
        }
    };
    if list.len() > 16 {
        return Err(ApiError::param(
            name,
            format!("{name} allows at most 16 entries"),
        ));
    }
    Ok(list)
}

/// Token ids in a list field, each inside the vocabulary.
pub fn token_ids(v: &Value, name: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::param(name, format!("{name} must be a list of token ids")))?;
    items
        .iter()
        .map(|i| match i.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            _ => Err(ApiError::param(
                name,
                format!(
                    "{name} holds {i}, which is not a token id below the vocabulary size {vocab}"
                ),
            )),
        })
        .collect()
}

/// Which mode's default sampling applies when the request gives none.
#[derive(Debug, Clone, Copy)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_p: f32,
}

/// The sampling fields OpenAI-style requests share (`chat/completions`, `completions`).
pub fn sampling(
    body: &Body,
    defaults: SamplingDefaults,
    vocab: usize,
) -> Result<SamplingConfig, ApiError> {
    let mut c = SamplingConfig {
        temperature: opt_f32(body, "temperature", 0.0, 2.0)?.unwrap_or(defaults.temperature),
        top_p: opt_f32(body, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p),
        min_p: opt_f32(body, "min_p", 0.0, 1.0)?.unwrap_or(0.0),
        presence_penalty: opt_f32(body, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: opt_f32(body, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        repetition_penalty: opt_f32(body, "repetition_penalty", 0.01, 10.0)?.unwrap_or(1.0),
        seed: opt_i64(body, "seed")?.map(|s| s as u64),
        ..SamplingConfig::default()
    };
    if c.top_p <= 0.0 {
        return Err(ApiError::param("top_p", "top_p must be greater than 0"));
    }
    if let Some(k) = opt_i64(body, "top_k")? {
        // vLLM's convention: -1 or 0 keeps every token.
        if k < -1 {
            return Err(ApiError::param(
                "top_k",
                "top_k must be -1 (off) or positive",
            ));
        }
        c.top_k = k.max(0) as usize;
    }
    if let Some(bias) = field(body, "logit_bias") {
        let map = bias.as_object().ok_or_else(|| {
            ApiError::param("logit_bias", "logit_bias must map token ids to numbers")
        })?;
        for (k, v) in map {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::param(
                        "logit_bias",
                        format!("logit_bias key {k:?} is not a token id below {vocab}"),
                    )
                })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::param(
                        "logit_bias",
                        format!("logit_bias for {k} must be a number in [-100, 100]"),
                    )
                })?;
            c.logit_bias.push((id, b as f32));
        }
    }
    Ok(c)
}
