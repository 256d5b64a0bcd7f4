//! Model configuration: DeepSeek-V3 style `config.json` and the Kimi K2.5/K2.6 wrapper
//! (`KimiK25ForConditionalGeneration`, text fields under `text_config`).
//!
//! Every number the maths depends on is read from the file, never assumed: the same
//! code serves Kimi K2 (384 experts, n_group 1) and DeepSeek-V3 (256 experts, n_group 8).
//! Unknown enum values and inconsistent combinations are errors naming the field.

use serde_json::{Map, Value};
use std::path::Path;

/// The K2.6 config, bundled so `plan` can describe the real model without a checkpoint.
pub const KIMI_K26_CONFIG_JSON: &str = include_str!("configs/kimi-k2.6.json");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("config field `{field}`: {reason}")]
    Field { field: String, reason: String },
}

fn field_err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// DeepSeek-V3/Kimi: selection on `score + e_score_correction_bias`, groups scored
    /// by the sum of their two best biased scores.
    NoauxTc,
    /// Plain top-k over all experts (DeepSeek-V2-Lite).
    Greedy,
    /// Groups scored by their best score, best `topk_group` groups kept (DeepSeek-V2).
    GroupLimitedGreedy,
}

/// YaRN rope scaling parameters (`rope_scaling` with `type` or `rope_type` = "yarn").
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// compressed-tensors `pack-quantized` INT weights.
#[derive(Debug, Clone, PartialEq)]
pub struct PackQuantized {
    pub num_bits: usize,
    pub group_size: usize,
    /// Module targets of the quantization group ("Linear", names or `re:` patterns).
    pub targets: Vec<String>,
    /// Modules left unquantized: exact names or `re:` patterns (matched at the start).
    pub ignore: IgnoreList,
}

/// compressed-tensors' `ignore` entries, with the `re:` patterns compiled once.
#[derive(Debug, Clone)]
pub struct IgnoreList {
    entries: Vec<String>,
    /// `Some(regex)` for `re:` entries, anchored at the start as `re.match` is.
    compiled: Vec<Option<regex::Regex>>,
}

impl IgnoreList {
    fn new(entries: Vec<String>, field: &str) -> Result<Self, ConfigError> {
        let compiled = entries
            .iter()
            .map(|pattern| match pattern.strip_prefix("re:") {
                Some(re) => regex::Regex::new(&format!("^(?:{re})"))
                    .map(Some)
                    .map_err(|e| field_err(field, format!("bad regex {pattern:?}: {e}"))),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(IgnoreList { entries, compiled })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.entries
            .iter()
            .zip(&self.compiled)
            .any(|(entry, re)| match re {
                Some(re) => re.is_match(name),
                None => entry == name,
            })
    }
}

impl PartialEq for IgnoreList {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Quantization {
    PackQuantized(PackQuantized),
    /// FP8 E4M3 weights with F32 `weight_scale_inv` per `block` = [rows, cols].
    Fp8Block {
        block: [usize; 2],
    },
}

/// The text model's configuration (what `DeepseekV3ForCausalLM` reads).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Top-level architecture name, e.g. `DeepseekV3ForCausalLM` or `KimiK25ForConditionalGeneration`.
    pub architecture: String,
    pub model_type: String,
    /// Prefix of the text model's tensor names: empty, or `language_model.` for K2.5/K2.6.
    pub tensor_prefix: String,
    /// True when the checkpoint declares a vision tower (K2.5/K2.6).
    pub has_vision: bool,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub rms_norm_eps: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub num_nextn_predict_layers: usize,
    pub quantization: Option<Quantization>,
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = crate::files::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ConfigError::Json { source, .. } => ConfigError::Json {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// The bundled Kimi K2.6 configuration.
    pub fn kimi_k26() -> Self {
        // The bundled text is part of the binary and covered by a test.
        Self::from_json_str(KIMI_K26_CONFIG_JSON).expect("bundled K2.6 config parses")
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: "config.json".into(),
            source,
        })?;
        let top = value
            .as_object()
            .ok_or_else(|| field_err("<root>", "config.json must be a JSON object"))?;
        let architecture = top
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .unwrap_or("DeepseekV3ForCausalLM")
            .to_string();
        let model_type = top
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("deepseek_v3")
            .to_string();
        let wrapped = architecture == "KimiK25ForConditionalGeneration" || model_type == "kimi_k25";
        if wrapped {
            let text_cfg = top
                .get("text_config")
                .ok_or_else(|| {
                    field_err(
                        "text_config",
                        "missing (required by KimiK25ForConditionalGeneration)",
                    )
                })?
                .as_object()
                .ok_or_else(|| field_err("text_config", "must be an object"))?;
            let reader = Fields {
                obj: text_cfg,
                prefix: "text_config.",
            };
            let mut cfg = parse_text(&reader, architecture, model_type)?;
            cfg.tensor_prefix = "language_model.".into();
            cfg.has_vision = top.get("vision_config").is_some_and(|v| !v.is_null());
            Ok(cfg)
        } else {
            match architecture.as_str() {
                "DeepseekV3ForCausalLM" | "DeepseekV2ForCausalLM" => {}
                other => {
                    return Err(field_err(
                        "architectures",
                        format!("unsupported architecture {other:?}; expected DeepseekV3ForCausalLM, DeepseekV2ForCausalLM or KimiK25ForConditionalGeneration"),
                    ))
                }
            }
            let reader = Fields {
                obj: top,
                prefix: "",
            };
            parse_text(&reader, architecture, model_type)
        }
    }

    /// Whether decoder layer `layer` has a routed-expert MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// Per-head query/key width: nope + rope.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer by absorbed MLA: normalised latent + rotated key.
    pub fn latent_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Softmax scale of attention, including YaRN's `mscale_all_dim` correction.
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.rope_scaling {
            if y.mscale_all_dim != 0.0 {
                let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
                scale *= m * m;
            }
        }
        scale as f32
    }

    /// Experts per routing group.
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group.max(1)
    }
}

/// YaRN magnitude correction `0.1 * m * ln(factor) + 1` (1 for factor <= 1).
pub fn yarn_get_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// Typed access to one JSON object, naming fields with their full path in errors.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl Fields<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                field_err(
                    &self.name(key),
                    format!("expected a non-negative integer, got {v}"),
                )
            }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?
            .ok_or_else(|| field_err(&self.name(key), "missing"))
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self.usize_req(key)?;
        if n == 0 {
            return Err(field_err(&self.name(key), "must be greater than 0"));
        }
        Ok(n)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| field_err(&self.name(key), format!("expected a number, got {v}"))),
        }
    }

    fn f64_req(&self, key: &str) -> Result<f64, ConfigError> {
        self.f64_opt(key)?
            .ok_or_else(|| field_err(&self.name(key), "missing"))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                field_err(&self.name(key), format!("expected true or false, got {v}"))
            }),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| field_err(&self.name(key), format!("expected a string, got {v}"))),
        }
    }

    /// An id or a list of ids (`eos_token_id` is either).
    fn ids(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        let bad = |v: &Value| {
            field_err(
                &self.name(key),
                format!("expected a token id or a list of ids, got {v}"),
            )
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(i))
                })
                .collect(),
            Some(v) => Ok(vec![v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(v))?]),
        }
    }
}

fn parse_text(
    f: &Fields,
    architecture: String,
    model_type: String,
) -> Result<ModelConfig, ConfigError> {
    let hidden_size = f.positive("hidden_size")?;
    let num_attention_heads = f.positive("num_attention_heads")?;
    let n_routed_experts = f.usize_opt("n_routed_experts")?.unwrap_or(0);
    let moe = n_routed_experts > 0;

    let hidden_act = f.str_opt("hidden_act")?.unwrap_or("silu");
    if hidden_act != "silu" {
        return Err(field_err(
            &f.name("hidden_act"),
            format!("unsupported activation {hidden_act:?}; only \"silu\""),
        ));
    }
    if f.bool_opt("attention_bias")?.unwrap_or(false) {
        return Err(field_err(
            &f.name("attention_bias"),
            "true is not supported (no Kimi or DeepSeek-V3 checkpoint uses attention biases)",
        ));
    }

    let scoring_func = match f.str_opt("scoring_func")?.unwrap_or("softmax") {
        "sigmoid" => ScoringFunc::Sigmoid,
        "softmax" => ScoringFunc::Softmax,
        other => {
            return Err(field_err(
                &f.name("scoring_func"),
                format!("unknown value {other:?}; expected \"sigmoid\" or \"softmax\""),
            ))
        }
    };
    let topk_method = match f.str_opt("topk_method")?.unwrap_or("greedy") {
        "noaux_tc" => TopkMethod::NoauxTc,
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        other => return Err(field_err(&f.name("topk_method"), format!("unknown value {other:?}; expected \"noaux_tc\", \"greedy\" or \"group_limited_greedy\""))),
    };

    let (
        moe_intermediate_size,
        num_experts_per_tok,
        n_group,
        topk_group,
        routed_scaling_factor,
        norm_topk_prob,
        n_shared_experts,
    ) = if moe {
        (
            f.positive("moe_intermediate_size")?,
            f.positive("num_experts_per_tok")?,
            f.usize_opt("n_group")?.unwrap_or(1),
            f.usize_opt("topk_group")?.unwrap_or(1),
            f.f64_opt("routed_scaling_factor")?.unwrap_or(1.0) as f32,
            f.bool_opt("norm_topk_prob")?.unwrap_or(false),
            f.usize_opt("n_shared_experts")?.unwrap_or(0),
        )
    } else {
        (0, 0, 1, 1, 1.0, false, 0)
    };

    let cfg = ModelConfig {
        architecture,
        model_type,
        tensor_prefix: String::new(),
        has_vision: false,
        vocab_size: f.positive("vocab_size")?,
        hidden_size,
        intermediate_size: f.positive("intermediate_size")?,
        moe_intermediate_size,
        num_hidden_layers: f.positive("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        n_routed_experts,
        n_shared_experts,
        num_experts_per_tok,
        n_group,
        topk_group,
        topk_method,
        scoring_func,
        routed_scaling_factor,
        norm_topk_prob,
        first_k_dense_replace: f.usize_opt("first_k_dense_replace")?.unwrap_or(0),
        moe_layer_freq: f.usize_opt("moe_layer_freq")?.unwrap_or(1),
        q_lora_rank: f.usize_opt("q_lora_rank")?,
        kv_lora_rank: f.positive("kv_lora_rank")?,
        qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
        qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
        v_head_dim: f.positive("v_head_dim")?,
        tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        max_position_embeddings: f.positive("max_position_embeddings")?,
        rope_theta: f.f64_req("rope_theta")?,
        rope_scaling: parse_rope_scaling(f)?,
        rms_norm_eps: f.f64_req("rms_norm_eps")? as f32,
        bos_token_id: f.ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.ids("eos_token_id")?,
        num_nextn_predict_layers: f.usize_opt("num_nextn_predict_layers")?.unwrap_or(0),
        quantization: parse_quantization(f)?,
    };
    validate(&cfg, f)?;
    Ok(cfg)
}

/// Bounds on config sizes, far above every published model (K2: 61 layers, 64 heads, 384
/// experts, width 18432, 163840 tokens; DeepSeek-V3: 128 heads, 129280 tokens).
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 4096;
const MAX_EXPERTS: usize = 1 << 16;
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;

fn validate(c: &ModelConfig, f: &Fields) -> Result<(), ConfigError> {
    if c.q_lora_rank == Some(0) {
        return Err(field_err(
            &f.name("q_lora_rank"),
            "must be null or greater than 0",
        ));
    }
    if !c.qk_rope_head_dim.is_multiple_of(2) {
        return Err(field_err(
            &f.name("qk_rope_head_dim"),
            format!(
                "{} is odd; rotary pairs need an even width",
                c.qk_rope_head_dim
            ),
        ));
    }
    // Sizes far beyond any published model are refused before they size an allocation
    // (a billion layers would ask for terabytes at start-up).
    for (key, value, most) in [
        ("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS),
        ("num_attention_heads", c.num_attention_heads, MAX_HEADS),
        ("num_key_value_heads", c.num_key_value_heads, MAX_HEADS),
        ("n_routed_experts", c.n_routed_experts, MAX_EXPERTS),
        ("n_shared_experts", c.n_shared_experts, MAX_EXPERTS),
        ("hidden_size", c.hidden_size, MAX_WIDTH),
        ("intermediate_size", c.intermediate_size, MAX_WIDTH),
        ("moe_intermediate_size", c.moe_intermediate_size, MAX_WIDTH),
        ("kv_lora_rank", c.kv_lora_rank, MAX_WIDTH),
        ("q_lora_rank", c.q_lora_rank.unwrap_or(0), MAX_WIDTH),
        ("qk_nope_head_dim", c.qk_nope_head_dim, MAX_WIDTH),
        ("qk_rope_head_dim", c.qk_rope_head_dim, MAX_WIDTH),
        ("v_head_dim", c.v_head_dim, MAX_WIDTH),
        ("vocab_size", c.vocab_size, MAX_VOCAB),
        (
            "num_nextn_predict_layers",
            c.num_nextn_predict_layers,
            MAX_LAYERS,
        ),
    ] {
        if value > most {
            return Err(field_err(
                &f.name(key),
                format!("{value} is beyond any model this runtime serves (at most {most})"),
            ));
        }
    }
    // theta^(-2i/d) for a theta below 1 (or not finite) gives no rotary frequencies.
    if !(c.rope_theta.is_finite() && c.rope_theta >= 1.0) {
        return Err(field_err(
            &f.name("rope_theta"),
            format!("{} must be a finite number of at least 1", c.rope_theta),
        ));
    }
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0) {
        return Err(field_err(
            &f.name("rms_norm_eps"),
            format!("{} must be between 0 and 1", c.rms_norm_eps),
        ));
    }
    if !c.routed_scaling_factor.is_finite() {
        return Err(field_err(
            &f.name("routed_scaling_factor"),
            "must be a finite number",
        ));
    }
    for id in c.eos_token_ids.iter().chain(&c.bos_token_id) {
        if *id as usize >= c.vocab_size {
            let key = if c.bos_token_id == Some(*id) {
                "bos_token_id"
            } else {
                "eos_token_id"
            };
            return Err(field_err(
                &f.name(key),
                format!("{id} is outside the vocabulary of {}", c.vocab_size),
            ));
        }
    }
    if c.moe_layer_freq == 0 {
        return Err(field_err(
            &f.name("moe_layer_freq"),
            "must be greater than 0",
        ));
    }
    if c.first_k_dense_replace > c.num_hidden_layers {
        return Err(field_err(
            &f.name("first_k_dense_replace"),
            format!(
                "{} exceeds num_hidden_layers {}",
                c.first_k_dense_replace, c.num_hidden_layers
            ),
        ));
    }
    if c.n_routed_experts > 0 {
        if c.num_experts_per_tok > c.n_routed_experts {
            return Err(field_err(
                &f.name("num_experts_per_tok"),
                format!(
                    "{} exceeds n_routed_experts {}",
                    c.num_experts_per_tok, c.n_routed_experts
                ),
            ));
        }
        if c.n_group == 0 || !c.n_routed_experts.is_multiple_of(c.n_group) {
            return Err(field_err(
                &f.name("n_group"),
                format!(
                    "{} does not divide n_routed_experts {}",
                    c.n_group, c.n_routed_experts
                ),
            ));
        }
        if c.topk_group == 0 || c.topk_group > c.n_group {
            return Err(field_err(
                &f.name("topk_group"),
                format!(
                    "{} must be between 1 and n_group {}",
                    c.topk_group, c.n_group
                ),
            ));
        }
        let grouped = c.n_group > 1 && c.topk_method != TopkMethod::Greedy;
        if grouped && c.num_experts_per_tok > c.topk_group * c.experts_per_group() {
            return Err(field_err(
                &f.name("num_experts_per_tok"),
                format!(
                    "{} exceeds the {} experts in the topk_group {} kept groups",
                    c.num_experts_per_tok,
                    c.topk_group * c.experts_per_group(),
                    c.topk_group
                ),
            ));
        }
        if c.topk_method == TopkMethod::NoauxTc && c.n_group > 1 && c.experts_per_group() < 2 {
            return Err(field_err(
                &f.name("n_group"),
                "noaux_tc scores a group by its two best experts; groups need at least 2 experts",
            ));
        }
    }
    if let Some(y) = &c.rope_scaling {
        if c.max_position_embeddings < y.original_max_position_embeddings {
            return Err(field_err(
                &f.name("max_position_embeddings"),
                format!(
                    "{} is below rope_scaling.original_max_position_embeddings {}",
                    c.max_position_embeddings, y.original_max_position_embeddings
                ),
            ));
        }
    }
    if let Some(Quantization::PackQuantized(q)) = &c.quantization {
        if !c.moe_intermediate_size.is_multiple_of(q.group_size) && c.n_routed_experts > 0 {
            return Err(field_err(
                &f.name("quantization_config.config_groups.weights.group_size"),
                format!(
                    "{} does not divide moe_intermediate_size {}",
                    q.group_size, c.moe_intermediate_size
                ),
            ));
        }
    }
    Ok(())
}

fn parse_rope_scaling(f: &Fields) -> Result<Option<Yarn>, ConfigError> {
    let Some(v) = f.get("rope_scaling") else {
        return Ok(None);
    };
    let obj = v
        .as_object()
        .ok_or_else(|| field_err(&f.name("rope_scaling"), "must be an object or null"))?;
    let prefix = f.name("rope_scaling.");
    let r = Fields {
        obj,
        prefix: &prefix,
    };
    let kind = match (r.str_opt("type")?, r.str_opt("rope_type")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(field_err(&r.name("type"), "missing (expected \"yarn\")")),
    };
    match kind {
        "yarn" => {}
        "default" | "none" => return Ok(None),
        other => {
            return Err(field_err(
                &r.name("type"),
                format!("unsupported rope scaling {other:?}; only \"yarn\" (or none)"),
            ))
        }
    }
    let factor = r.f64_req("factor")?;
    if factor < 1.0 {
        return Err(field_err(&r.name("factor"), format!("{factor} is below 1")));
    }
    let original = r.positive("original_max_position_embeddings")?;
    // Defaults are those of the DeepSeek reference implementation.
    let y = Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: r.f64_opt("beta_fast")?.unwrap_or(32.0),
        beta_slow: r.f64_opt("beta_slow")?.unwrap_or(1.0),
        mscale: r.f64_opt("mscale")?.unwrap_or(1.0),
        mscale_all_dim: r.f64_opt("mscale_all_dim")?.unwrap_or(0.0),
    };
    if y.beta_fast <= 0.0 || y.beta_slow <= 0.0 {
        return Err(field_err(
            &r.name("beta_fast"),
            "beta_fast and beta_slow must be positive",
        ));
    }
    Ok(Some(y))
}

fn parse_quantization(f: &Fields) -> Result<Option<Quantization>, ConfigError> {
    let Some(v) = f.get("quantization_config") else {
        return Ok(None);
    };
    let obj = v
        .as_object()
        .ok_or_else(|| field_err(&f.name("quantization_config"), "must be an object"))?;
    let prefix = f.name("quantization_config.");
    let q = Fields {
        obj,
        prefix: &prefix,
    };
    match q.str_opt("quant_method")? {
        Some("compressed-tensors") => parse_compressed_tensors(&q).map(Some),
        Some("fp8") => {
            if let Some(fmt) = q.str_opt("fmt")? {
                if fmt != "e4m3" {
                    return Err(field_err(
                        &q.name("fmt"),
                        format!("unsupported FP8 format {fmt:?}; only \"e4m3\""),
                    ));
                }
            }
            let block = match q.get("weight_block_size") {
                None => [128, 128],
                Some(Value::Array(items)) if items.len() == 2 => {
                    let dim = |i: usize| {
                        items[i]
                            .as_u64()
                            .filter(|&n| n > 0)
                            .map(|n| n as usize)
                            .ok_or_else(|| {
                                field_err(
                                    &q.name("weight_block_size"),
                                    "expected two positive integers",
                                )
                            })
                    };
                    [dim(0)?, dim(1)?]
                }
                Some(_) => {
                    return Err(field_err(
                        &q.name("weight_block_size"),
                        "expected two positive integers",
                    ))
                }
            };
            Ok(Some(Quantization::Fp8Block { block }))
        }
        Some(other) => Err(field_err(
            &q.name("quant_method"),
            format!("unsupported {other:?}; expected \"compressed-tensors\" or \"fp8\""),
        )),
        None => Err(field_err(&q.name("quant_method"), "missing")),
    }
}

fn parse_compressed_tensors(q: &Fields) -> Result<Quantization, ConfigError> {
    let format = q.str_opt("format")?.unwrap_or("");
    if format != "pack-quantized" {
        return Err(field_err(
            &q.name("format"),
            format!("unsupported compressed-tensors format {format:?}; only \"pack-quantized\""),
        ));
    }
    let groups = q
        .get("config_groups")
        .and_then(|g| g.as_object())
        .ok_or_else(|| field_err(&q.name("config_groups"), "missing or not an object"))?;
    if groups.len() != 1 {
        return Err(field_err(
            &q.name("config_groups"),
            format!(
                "{} groups; exactly one weight scheme is supported",
                groups.len()
            ),
        ));
    }
    let (group_name, group) = groups
        .iter()
        .next()
        .ok_or_else(|| field_err(&q.name("config_groups"), "empty"))?;
    let group_prefix = q.name(&format!("config_groups.{group_name}."));
    let group_obj = group
        .as_object()
        .ok_or_else(|| field_err(&group_prefix, "must be an object"))?;
    let g = Fields {
        obj: group_obj,
        prefix: &group_prefix,
    };
    let weights_prefix = g.name("weights.");
    let w_obj = g
        .get("weights")
        .and_then(|w| w.as_object())
        .ok_or_else(|| field_err(&g.name("weights"), "missing or not an object"))?;
    let w = Fields {
        obj: w_obj,
        prefix: &weights_prefix,
    };
    let num_bits = w.positive("num_bits")?;
    if num_bits != 4 {
        return Err(field_err(
            &w.name("num_bits"),
            format!("{num_bits}-bit weights are not supported; only 4"),
        ));
    }
    match w.str_opt("type")? {
        Some("int") => {}
        other => {
            return Err(field_err(
                &w.name("type"),
                format!("{other:?} is not supported; only \"int\""),
            ))
        }
    }
    if w.bool_opt("symmetric")? != Some(true) {
        return Err(field_err(
            &w.name("symmetric"),
            "only symmetric quantization (no zero point) is supported",
        ));
    }
    match w.str_opt("strategy")? {
        Some("group") => {}
        other => {
            return Err(field_err(
                &w.name("strategy"),
                format!("{other:?} is not supported; only \"group\""),
            ))
        }
    }
    let group_size = w.positive("group_size")?;
    if group_size % 8 != 0 {
        return Err(field_err(
            &w.name("group_size"),
            format!("{group_size} is not a multiple of 8 (one packed word)"),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>, ConfigError> {
        match q.obj.get(key).or_else(|| group_obj.get(key)) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| field_err(&q.name(key), "expected a list of strings"))
                })
                .collect(),
            Some(_) => Err(field_err(&q.name(key), "expected a list of strings")),
        }
    };
    let targets = match group_obj.get("targets") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| field_err(&g.name("targets"), "expected a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => vec!["Linear".to_string()],
    };
    let ignore = IgnoreList::new(strings("ignore")?, &q.name("ignore"))?;
    Ok(Quantization::PackQuantized(PackQuantized {
        num_bits,
        group_size,
        targets,
        ignore,
    }))
}

impl PackQuantized {
    /// Whether the `ignore` list exempts the module `name` (compressed-tensors semantics:
    /// `re:` patterns match from the start of the name, other entries match exactly).
    pub fn is_ignored(&self, name: &str) -> bool {
        self.ignore.matches(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bundled_k26_config_has_the_published_numbers() {
        let c = ModelConfig::kimi_k26();
        assert_eq!(c.tensor_prefix, "language_model.");
        assert!(c.has_vision);
        assert_eq!(c.hidden_size, 7168);
        assert_eq!(c.num_hidden_layers, 61);
        assert_eq!(c.n_routed_experts, 384);
        assert_eq!(c.num_experts_per_tok, 8);
        assert_eq!(c.latent_cache_width(), 576);
        assert_eq!(c.topk_method, TopkMethod::NoauxTc);
        assert_eq!(c.scoring_func, ScoringFunc::Sigmoid);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(60));
        let y = c.rope_scaling.clone().unwrap();
        assert_eq!((y.factor, y.beta_fast, y.beta_slow), (64.0, 32.0, 1.0));
        match &c.quantization {
            Some(Quantization::PackQuantized(q)) => {
                assert_eq!((q.num_bits, q.group_size), (4, 32));
                assert!(q.is_ignored("language_model.model.layers.3.self_attn.q_a_proj"));
                assert!(q.is_ignored("lm_head"));
                assert!(q.is_ignored("model.layers.0.mlp.down_proj"));
                assert!(!q.is_ignored("model.layers.3.mlp.experts.7.down_proj"));
            }
            other => panic!("unexpected quantization {other:?}"),
        }
    }

    #[test]
    fn softmax_scale_matches_spec_numbers() {
        // spec section 4: factor 64 -> 0.144680, factor 32 -> 0.130861 for d_n + d_r = 192.
        let c = ModelConfig::kimi_k26();
        assert!((c.softmax_scale() - 0.144_680).abs() < 1e-6);
        let c = k26_with(|v| v["text_config"]["rope_scaling"]["factor"] = 32.0.into()).unwrap();
        assert!((c.softmax_scale() - 0.130_861).abs() < 1e-6);
    }

    fn k26_with(edit: impl FnOnce(&mut Value)) -> Result<ModelConfig, ConfigError> {
        let mut v: Value = serde_json::from_str(KIMI_K26_CONFIG_JSON).unwrap();
        edit(&mut v);
        ModelConfig::from_json_str(&v.to_string())
    }

    fn err_text(r: Result<ModelConfig, ConfigError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = err_text(k26_with(|v| {
            v["text_config"]["scoring_func"] = "relu".into()
        }));
        assert!(
            e.contains("text_config.scoring_func") && e.contains("relu"),
            "{e}"
        );
        let e = err_text(k26_with(|v| {
            v["text_config"]["topk_method"] = "best".into()
        }));
        assert!(e.contains("text_config.topk_method"), "{e}");
        let e = err_text(k26_with(|v| v["text_config"]["n_group"] = 5.into()));
        assert!(e.contains("text_config.n_group"), "{e}");
        let e = err_text(k26_with(|v| {
            v["text_config"]["num_experts_per_tok"] = 400.into()
        }));
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = err_text(k26_with(|v| {
            v["text_config"]["rope_scaling"]["type"] = "longrope".into()
        }));
        assert!(e.contains("rope_scaling.type"), "{e}");
        let e = err_text(k26_with(|v| {
            v["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]
                ["num_bits"] = 8.into()
        }));
        assert!(e.contains("num_bits"), "{e}");
        let e = err_text(k26_with(|v| {
            v["text_config"]
                .as_object_mut()
                .unwrap()
                .remove("hidden_size");
        }));
        assert!(
            e.contains("text_config.hidden_size") && e.contains("missing"),
            "{e}"
        );
        // Values outside physical sense (hostile configs) name their field.
        for (key, value) in [
            ("num_hidden_layers", json!(1_000_000_000u64)),
            ("n_routed_experts", json!(1u64 << 40)),
            ("vocab_size", json!(1u64 << 40)),
            ("rope_theta", json!(5e-324)),
            ("rms_norm_eps", json!(1e308)),
            ("rms_norm_eps", json!(0.0)),
            ("eos_token_id", json!(200_000)),
            ("bos_token_id", json!(163_840)),
        ] {
            let e = err_text(k26_with(|v| v["text_config"][key] = value.clone()));
            assert!(e.contains(&format!("text_config.{key}")), "{key}: {e}");
        }
        let e = err_text(k26_with(|v| v["text_config"]["hidden_size"] = "big".into()));
        assert!(e.contains("text_config.hidden_size"), "{e}");
        let e = err_text(k26_with(|v| {
            v.as_object_mut().unwrap().remove("text_config");
        }));
        assert!(e.contains("text_config"), "{e}");
        let e = err_text(ModelConfig::from_json_str("{\"hidden_size\": 1,"));
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn rope_type_key_and_null_q_lora_are_accepted() {
        let c = k26_with(|v| {
            let r = v["text_config"]["rope_scaling"].as_object_mut().unwrap();
            r.remove("type");
            r.insert("rope_type".into(), "yarn".into());
            v["text_config"]["q_lora_rank"] = Value::Null;
        })
        .unwrap();
        assert!(c.rope_scaling.is_some());
        assert_eq!(c.q_lora_rank, None);
        let c = k26_with(|v| v["text_config"]["rope_scaling"] = Value::Null).unwrap();
        assert!(c.rope_scaling.is_none());
    }

    #[test]
    fn deepseek_v3_config_parses_with_fp8_and_groups() {
        let text = r#"{
          "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
          "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
          "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": true,
          "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
          "max_position_embeddings": 163840, "rope_theta": 10000, "rms_norm_eps": 1e-6,
          "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
             "quant_method": "fp8", "weight_block_size": [128, 128]},
          "eos_token_id": 1, "bos_token_id": 0, "num_nextn_predict_layers": 1
        }"#;
        let c = ModelConfig::from_json_str(text).unwrap();
        assert_eq!((c.n_group, c.topk_group, c.experts_per_group()), (8, 4, 32));
        assert_eq!(
            c.quantization,
            Some(Quantization::Fp8Block { block: [128, 128] })
        );
        assert_eq!(c.eos_token_ids, vec![1]);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
    }
}
