//! What the planner needs to know about a model: the bytes of every placeable piece (per
//! layer: attention, router, shared experts, dense MLP; per (layer, expert): routed expert;
//! embeddings, lm_head), the latent KV width and the parameter counts behind the FLOPs.
//! Built exactly from a checkpoint's safetensors headers, or computed from a config and
//! its stored formats (the bundled K2.6 config with its INT4 layout).

use crate::config::{ModelConfig, Quantization};
use crate::weights::Checkpoint;
use serde::Serialize;

/// Bytes of one decoder layer's non-expert parts.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LayerBytes {
    /// MLA projections and their norms.
    pub attention: u64,
    /// The part of `attention` every tensor-parallel rank keeps whole: q_a/kv_a
    /// projections and their norms (q_b/q_proj, kv_b and o_proj split by heads).
    pub attention_replicated: u64,
    /// input/post-attention RMSNorm weights.
    pub norms: u64,
    /// Router weight and correction bias (MoE layers).
    pub router: u64,
    pub shared_experts: u64,
    /// The dense MLP (dense layers).
    pub dense_mlp: u64,
}

impl LayerBytes {
    pub fn total(&self) -> u64 {
        self.attention + self.norms + self.router + self.shared_experts + self.dense_mlp
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelDesc {
    pub name: String,
    pub num_layers: usize,
    /// Indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub layers: Vec<LayerBytes>,
    /// `expert_bytes[i][e]`: routed expert e of MoE layer `moe_layers[i]`.
    #[serde(skip)]
    pub expert_bytes: Vec<Vec<u64>>,
    pub embed_bytes: u64,
    pub lm_head_bytes: u64,
    pub final_norm_bytes: u64,
    /// Vision tower and projector (K2.5/K2.6): counted, not placed.
    pub vision_bytes: u64,
    /// Anything else in the checkpoint (e.g. multi-token-prediction layers): counted, not placed.
    pub unused_bytes: u64,
    /// Latent values cached per token per layer (kv_lora_rank + qk_rope_head_dim).
    pub kv_width: usize,
    /// Parameters read per token outside the routed experts (attention, shared, dense, lm_head).
    pub dense_params_per_token: u64,
    /// Parameters of one routed expert.
    pub expert_params: u64,
    /// Attention FLOPs per token per cached position per layer (scores + weighted sum).
    pub attention_flops_per_position: u64,
}

impl ModelDesc {
    pub fn routed_expert_bytes(&self) -> u64 {
        self.expert_bytes.iter().flatten().sum()
    }

    /// Bytes of the text model (everything the plan places).
    pub fn text_model_bytes(&self) -> u64 {
        self.routed_expert_bytes()
            + self.layers.iter().map(LayerBytes::total).sum::<u64>()
            + self.embed_bytes
            + self.lm_head_bytes
            + self.final_norm_bytes
    }

    pub fn moe_index(&self, layer: usize) -> Option<usize> {
        self.moe_layers.iter().position(|&l| l == layer)
    }

    /// From a config alone, with the tensor sizes its stored formats imply.
    pub fn from_config(cfg: &ModelConfig, name: &str) -> Self {
        let h = cfg.hidden_size as u64;
        let heads = cfg.num_attention_heads as u64;
        let linear = |module: &str, out: u64, inp: u64| linear_bytes(cfg, module, out, inp);
        let norm = |n: u64| 2 * n;
        let mut layers = Vec::new();
        let mut expert_bytes = Vec::new();
        let mut moe_layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qk = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) as u64;
            let q = match cfg.q_lora_rank {
                Some(r) => {
                    linear(&format!("{p}.self_attn.q_a_proj"), r as u64, h)
                        + norm(r as u64)
                        + linear(&format!("{p}.self_attn.q_b_proj"), heads * qk, r as u64)
                }
                None => linear(&format!("{p}.self_attn.q_proj"), heads * qk, h),
            };
            let c = cfg.kv_lora_rank as u64;
            let kv_a = linear(
                &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                c + cfg.qk_rope_head_dim as u64,
                h,
            ) + norm(c);
            let attention_replicated = kv_a
                + match cfg.q_lora_rank {
                    Some(r) => {
                        linear(&format!("{p}.self_attn.q_a_proj"), r as u64, h) + norm(r as u64)
                    }
                    None => 0,
                };
            let attention =
                q + linear(
                    &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                    c + cfg.qk_rope_head_dim as u64,
                    h,
                ) + norm(c)
                    + linear(
                        &format!("{p}.self_attn.kv_b_proj"),
                        heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) as u64,
                        c,
                    )
                    + linear(
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        heads * cfg.v_head_dim as u64,
                    );
            let ffn = |module: &str, inter: u64| {
                linear(&format!("{module}.gate_proj"), inter, h)
                    + linear(&format!("{module}.up_proj"), inter, h)
                    + linear(&format!("{module}.down_proj"), h, inter)
            };
            let mut lb = LayerBytes {
                attention,
                attention_replicated,
                norms: 2 * norm(h),
                ..Default::default()
            };
            if cfg.is_moe_layer(l) {
                let e = cfg.n_routed_experts as u64;
                lb.router = e * h * 2 + e * 4;
                let inter = cfg.moe_intermediate_size as u64;
                lb.shared_experts = if cfg.n_shared_experts > 0 {
                    ffn(
                        &format!("{p}.mlp.shared_experts"),
                        inter * cfg.n_shared_experts as u64,
                    )
                } else {
                    0
                };
                moe_layers.push(l);
                expert_bytes.push(
                    (0..cfg.n_routed_experts)
                        .map(|x| ffn(&format!("{p}.mlp.experts.{x}"), inter))
                        .collect(),
                );
            } else {
                lb.dense_mlp = ffn(&format!("{p}.mlp"), cfg.intermediate_size as u64);
            }
            layers.push(lb);
        }
        let vocab = cfg.vocab_size as u64;
        let mut d = Self::skeleton(cfg, name);
        d.layers = layers;
        d.moe_layers = moe_layers;
        d.expert_bytes = expert_bytes;
        d.embed_bytes = vocab * h * 2;
        d.lm_head_bytes = if cfg.tie_word_embeddings {
            0
        } else {
            vocab * h * 2
        };
        d.final_norm_bytes = norm(h);
        d
    }

    /// Exact sizes from a checkpoint's safetensors headers.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Self {
        let cfg = &ckpt.config;
        let mut d = Self::skeleton(cfg, &ckpt.dir.display().to_string());
        d.layers = vec![LayerBytes::default(); cfg.num_hidden_layers];
        d.moe_layers = (0..cfg.num_hidden_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .collect();
        d.expert_bytes = vec![vec![0; cfg.n_routed_experts]; d.moe_layers.len()];
        for t in ckpt.tensors() {
            let bytes = t.byte_len() as u64;
            let name = t.name.strip_prefix(&cfg.tensor_prefix).unwrap_or(&t.name);
            if t.name.starts_with("vision_tower.") || t.name.starts_with("mm_projector.") {
                d.vision_bytes += bytes;
            } else if name.starts_with("model.embed_tokens.") {
                d.embed_bytes += bytes;
            } else if name.starts_with("lm_head.") {
                d.lm_head_bytes += bytes;
            } else if name.starts_with("model.norm.") {
                d.final_norm_bytes += bytes;
            } else if let Some(rest) = name.strip_prefix("model.layers.") {
                let (num, sub) = rest.split_once('.').unwrap_or((rest, ""));
                match num.parse::<usize>() {
                    Ok(l) if l < cfg.num_hidden_layers => d.add_layer_tensor(l, sub, bytes),
                    _ => d.unused_bytes += bytes,
                }
            } else {
                d.unused_bytes += bytes;
            }
        }
        d
    }

    fn add_layer_tensor(&mut self, layer: usize, sub: &str, bytes: u64) {
        let lb = &mut self.layers[layer];
        if let Some(rest) = sub.strip_prefix("mlp.experts.") {
            let expert = rest.split('.').next().and_then(|e| e.parse::<usize>().ok());
            match (self.moe_index(layer), expert) {
                (Some(i), Some(e)) if e < self.experts_per_layer => {
                    self.expert_bytes[i][e] += bytes
                }
                _ => self.unused_bytes += bytes,
            }
        } else if sub.starts_with("mlp.shared_experts.") {
            lb.shared_experts += bytes;
        } else if sub.starts_with("mlp.gate.") {
            lb.router += bytes;
        } else if sub.starts_with("mlp.") {
            lb.dense_mlp += bytes;
        } else if sub.starts_with("self_attn.") {
            lb.attention += bytes;
            if sub.starts_with("self_attn.q_a_") || sub.starts_with("self_attn.kv_a_") {
                lb.attention_replicated += bytes;
            }
        } else if sub.contains("layernorm") {
            lb.norms += bytes;
        } else {
            self.unused_bytes += bytes;
        }
    }

    /// Shape facts shared by both constructors (sizes filled in by the caller).
    fn skeleton(cfg: &ModelConfig, name: &str) -> Self {
        let h = cfg.hidden_size as u64;
        let heads = cfg.num_attention_heads as u64;
        let qk = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) as u64;
        let c = cfg.kv_lora_rank as u64;
        let q_params = match cfg.q_lora_rank {
            Some(r) => r as u64 * h + heads * qk * r as u64,
            None => heads * qk * h,
        };
        let attn_params = q_params
            + (c + cfg.qk_rope_head_dim as u64) * h
            + heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) as u64 * c
            + h * heads * cfg.v_head_dim as u64;
        let moe_count = (0..cfg.num_hidden_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .count() as u64;
        let dense_count = cfg.num_hidden_layers as u64 - moe_count;
        let shared = 3 * h * cfg.moe_intermediate_size as u64 * cfg.n_shared_experts as u64;
        let dense_params = cfg.num_hidden_layers as u64 * attn_params
            + moe_count * (shared + cfg.n_routed_experts as u64 * h)
            + dense_count * 3 * h * cfg.intermediate_size as u64
            + cfg.vocab_size as u64 * h;
        ModelDesc {
            name: name.to_string(),
            num_layers: cfg.num_hidden_layers,
            moe_layers: Vec::new(),
            experts_per_layer: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            hidden_size: cfg.hidden_size,
            layers: Vec::new(),
            expert_bytes: Vec::new(),
            embed_bytes: 0,
            lm_head_bytes: 0,
            final_norm_bytes: 0,
            vision_bytes: 0,
            unused_bytes: 0,
            kv_width: cfg.latent_cache_width(),
            dense_params_per_token: dense_params,
            expert_params: 3 * h * cfg.moe_intermediate_size as u64,
            // Absorbed MLA per head: scores over c + dr, weighted sum over c: 2 FLOPs each.
            attention_flops_per_position: 2 * heads * (2 * c + cfg.qk_rope_head_dim as u64),
        }
    }
}

/// Stored bytes of linear module `module` [out, in] under the config's quantization.
fn linear_bytes(cfg: &ModelConfig, module: &str, out: u64, inp: u64) -> u64 {
    match &cfg.quantization {
        Some(Quantization::PackQuantized(q))
            if !q.is_ignored(module)
                && !q.is_ignored(&format!("{}{module}", cfg.tensor_prefix)) =>
        {
            let g = q.group_size as u64;
            // weight_packed I32 [out, in/8] + weight_scale BF16 [out, in/g] + weight_shape I64 [2]
            out * inp / 8 * 4 + out * inp.div_ceil(g) * 2 + 16
        }
        Some(Quantization::Fp8Block { block }) if !module.ends_with("lm_head") => {
            out * inp + out.div_ceil(block[0] as u64) * inp.div_ceil(block[1] as u64) * 4
        }
        _ => out * inp * 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k26_int4_sizes_match_the_spec() {
        let d = ModelDesc::from_config(&ModelConfig::kimi_k26(), "K2.6");
        assert_eq!(d.moe_layers.len(), 60);
        assert_eq!(
            d.expert_bytes[0][0], 24_772_656,
            "one INT4 expert: 3 x (packed 7.34 MB + scales 0.92 MB + shape)"
        );
        let routed = d.routed_expert_bytes();
        assert_eq!(routed, 24_772_656 * 384 * 60);
        assert!((routed as f64 / 1e9 - 570.8).abs() < 0.05, "{routed}");
        assert_eq!(d.kv_width, 576);
    }
}
