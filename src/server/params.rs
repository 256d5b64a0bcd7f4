//! The OpenAI-style request body (chat and text completions, `/tokenize`,
//! `/detokenize`) read into a typed struct, with errors naming the field
//! (`serde_path_to_error`), and the sampling parameters those routes share.

use super::error::ApiError;
use crate::engine::sampling::SamplingConfig;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Every field the OpenAI-style routes read; each route uses its own. Unknown fields
/// are ignored, as OpenAI-compatible servers do; `null` reads as absent.
#[derive(Deserialize, Default)]
pub struct OpenAiRequest {
    pub model: Option<String>,
    // Chat.
    pub messages: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
    // Text completions and `/tokenize`.
    pub prompt: Option<Value>,
    pub echo: Option<bool>,
    // `/detokenize`.
    pub tokens: Option<Value>,
    // Generation.
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Value>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub logprobs: Option<Logprobs>,
    pub top_logprobs: Option<u64>,
    // Sampling.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Test hook (`--allow-forced-output`).
    pub forced_output: Option<Value>,
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: chat's true/false, or text completions' count.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
pub enum Logprobs {
    Flag(bool),
    Count(u64),
}

/// Parses a body; a field of the wrong type is a 400 naming it in `param`.
pub fn parse_request(bytes: &[u8]) -> Result<OpenAiRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request(format!("the request body is not valid JSON: {inner}"));
        }
        if path == "." {
            return ApiError::bad_request(format!(
                "the request body must be a JSON object: {inner}"
            ));
        }
        let param = path.split(['.', '[']).next().unwrap_or("").to_string();
        let hint = match param.as_str() {
            "stop" => " (a string or a list of strings)",
            "logprobs" => " (true/false, or a count for text completions)",
            _ => "",
        };
        ApiError::param(&param, format!("{path}: {inner}{hint}"))
    })
}

/// A number inside `[min, max]`.
pub fn in_range(
    value: Option<f64>,
    name: &str,
    min: f32,
    max: f32,
) -> Result<Option<f32>, ApiError> {
    match value {
        Some(x) if !(min as f64..=max as f64).contains(&x) => Err(ApiError::param(
            name,
            format!("{name} must be between {min} and {max}, got {x}"),
        )),
        v => Ok(v.map(|x| x as f32)),
    }
}

/// `stop`, at most 16 strings.
pub fn stop_strings(stop: &Option<Stop>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if list.len() > 16 {
        return Err(ApiError::param("stop", "stop allows at most 16 entries"));
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
    req: &OpenAiRequest,
    defaults: SamplingDefaults,
    vocab: usize,
) -> Result<SamplingConfig, ApiError> {
    let mut c = SamplingConfig {
        temperature: in_range(req.temperature, "temperature", 0.0, 2.0)?
            .unwrap_or(defaults.temperature),
        top_p: in_range(req.top_p, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p),
        min_p: in_range(req.min_p, "min_p", 0.0, 1.0)?.unwrap_or(0.0),
        presence_penalty: in_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)?
            .unwrap_or(0.0),
        frequency_penalty: in_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)?
            .unwrap_or(0.0),
        repetition_penalty: in_range(req.repetition_penalty, "repetition_penalty", 0.01, 10.0)?
            .unwrap_or(1.0),
        seed: req.seed.map(|s| s as u64),
        ..SamplingConfig::default()
    };
    if c.top_p <= 0.0 {
        return Err(ApiError::param("top_p", "top_p must be greater than 0"));
    }
    if let Some(k) = req.top_k {
        // vLLM's convention: -1 or 0 keeps every token.
        if k < -1 {
            return Err(ApiError::param(
                "top_k",
                "top_k must be -1 (off) or positive",
            ));
        }
        c.top_k = k.max(0) as usize;
    }
    for (k, &b) in req.logit_bias.iter().flatten() {
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
        if !(-100.0..=100.0).contains(&b) {
            return Err(ApiError::param(
                "logit_bias",
                format!("logit_bias for {k} must be a number in [-100, 100]"),
            ));
        }
        c.logit_bias.push((id, b as f32));
    }
    Ok(c)
}
