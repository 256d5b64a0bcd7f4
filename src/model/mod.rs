//! The DeepSeek-V3 / Kimi K2 text model as data and maths rules: its weights, RoPE,
//! routing, RMSNorm and the MLA dimensions; the forward pass that runs it on devices is
//! `crate::forward`. One token's path: embedding -> per layer [RMSNorm -> MLA ->
//! residual -> RMSNorm -> dense MLP or MoE -> residual] -> final RMSNorm -> lm_head.
//!
//! MLA keeps a latent cache of `kv_lora_rank + qk_rope_head_dim` values per token per
//! layer (the normalised `c_kv` and the rotated shared `k_pe`). Two equivalent forms read
//! it: the naive form expands every cached latent through `kv_b_proj` into per-head keys
//! and values (cheap for a batch of new tokens), the absorbed form folds `W_UK` into the
//! query and `W_UV` into the output so attention runs directly over the latents (cheap
//! for one new token over a long context).

pub mod rope;
pub mod router;

use crate::config::{ModelConfig, TopkMethod};
use crate::weights::{Checkpoint, LinearWeight, WeightLoader, WeightsError};
pub use rope::Rope;
use std::collections::BTreeSet;
use std::ops::Range;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("token id {token} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("sequence of {needed} tokens exceeds the context limit of {limit}")]
    ContextFull { needed: usize, limit: usize },
    #[error("no input tokens")]
    Empty,
    /// The device running the pass failed (out of memory for a long batch, a lost GPU);
    /// the batch fails, the process goes on.
    #[error("the device failed during the forward pass: {0}")]
    Device(String),
}

/// Called with (layer, the token's routed (expert, weight) pairs) for every token.
pub type RouteObserver<'a> = dyn FnMut(usize, &[(usize, f32)]) + 'a;

/// Which MLA form a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionForm {
    /// Naive for several new tokens (prefill), absorbed for one (decode).
    Auto,
    Naive,
    Absorbed,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

impl Logits {
    /// Which of an entry's rows `first..first + len` get logits when it asks for `wanted`.
    pub(crate) fn rows(wanted: Option<Logits>, first: usize, len: usize) -> Range<usize> {
        match wanted {
            Some(Logits::All) => first..first + len,
            Some(Logits::Last) => first + len - 1..first + len,
            None => first..first,
        }
    }
}

/// The three projections of a SiLU-gated feed-forward block (dense MLP, shared expert or
/// one routed expert): `down(silu(gate x) * up x)`.
#[derive(Debug, Clone)]
pub struct FfnWeights {
    pub gate: LinearWeight,
    pub up: LinearWeight,
    pub down: LinearWeight,
    /// The NUMA node whose threads compute this FFN (routed experts placed by a plan).
    pub numa_node: Option<usize>,
    /// (layer, expert) of a routed expert.
    pub expert: Option<(usize, usize)>,
    /// The GPU that holds this routed expert, when a plan puts it on one.
    pub gpu: Option<usize>,
}

impl FfnWeights {
    /// Gate, up and down.
    pub fn matrices(&self) -> [&LinearWeight; 3] {
        [&self.gate, &self.up, &self.down]
    }

    pub fn stored_bytes(&self) -> usize {
        self.gate.stored_bytes() + self.up.stored_bytes() + self.down.stored_bytes()
    }
}

pub enum QueryProj {
    /// `q_b(RMSNorm(q_a(x)))`
    LowRank {
        a: LinearWeight,
        norm: Vec<f32>,
        b: LinearWeight,
    },
    /// `q_proj(x)` (q_lora_rank null)
    Full(LinearWeight),
}

pub struct Attention {
    pub q: QueryProj,
    pub kv_a: LinearWeight,
    pub kv_a_norm: Vec<f32>,
    pub kv_b: LinearWeight,
    pub o: LinearWeight,
}

pub struct Moe {
    pub router: LinearWeight,
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Vec<FfnWeights>,
    pub shared: Option<FfnWeights>,
}

pub enum Ffn {
    Dense(FfnWeights),
    Moe(Moe),
}

pub struct Layer {
    pub input_norm: Vec<f32>,
    pub attn: Attention,
    pub post_attn_norm: Vec<f32>,
    pub ffn: Ffn,
}

pub struct Model {
    pub config: ModelConfig,
    pub embed: LinearWeight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: LinearWeight,
    pub rope: Rope,
    /// Every checkpoint tensor the model uses (with prefix); the rest is reported by `inspect`.
    pub used_tensors: BTreeSet<String>,
    /// Expert deferral (off at 0): per token, this many of its host-placed routed experts
    /// with the lowest weights are added to the hidden state one layer later, so the host
    /// can compute them while the device runs the next layer. Changes the numbers.
    pub defer_host_experts: usize,
    /// A number no other model loaded by this process has: a pass keeps what it
    /// prepared for one model (uploaded norms, latent pools) under it.
    pub id: u64,
}

/// Where the latents of the sequences in a forward pass go: each sequence's block table.
/// Sequence `seq` is the index of its entry in the batch; positions are absolute. The
/// latents themselves live on the pass's devices, in pools numbered by these blocks (the
/// engine's block allocator and prefix cache decide which block a position lives in).
pub trait LatentStore {
    /// The block size and the blocks holding positions `0..len` of `seq`, in position
    /// order.
    fn block_table(&self, seq: usize, len: usize) -> (usize, Vec<u32>);
    /// Whether latents are kept in BF16 (rounded on write) rather than f32.
    fn bf16_latents(&self) -> bool {
        false
    }
    /// Into how many partitions the store's blocks fall (block id mod partitions); every
    /// sequence's blocks lie in one, so a pass over several devices can keep each
    /// sequence's latents on one device.
    fn partitions(&self) -> usize {
        1
    }
}

/// Block size of a [`KvCache`].
const CONTIGUOUS_BLOCK: usize = 64;

/// One sequence on its own (`run`, tools, tests): positions `0..len` in blocks `0, 1,
/// ...` of the pass's latent pools. A pass keeps latents by block number, so one
/// sequence at a time uses a pass this way (the engine's paged pool serves many).
pub struct KvCache {
    len: usize,
}

impl KvCache {
    pub fn new(_config: &ModelConfig) -> Self {
        KvCache { len: 0 }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Counts `n` more tokens as cached (after a pass wrote their latents).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl LatentStore for KvCache {
    fn block_table(&self, _seq: usize, len: usize) -> (usize, Vec<u32>) {
        let blocks = len.div_ceil(CONTIGUOUS_BLOCK) as u32;
        (CONTIGUOUS_BLOCK, (0..blocks).collect())
    }
}

/// One sequence's part of a batched forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the store.
    pub start: usize,
    /// Which of its positions get logits (`None`: a prefill chunk that is not the last).
    pub logits: Option<Logits>,
}

impl Model {
    /// Every matrix the model multiplies by except the routed experts' (lm_head included;
    /// the embedding table not: it is gathered, not multiplied).
    pub fn non_expert_matrices(&self) -> Vec<&LinearWeight> {
        let mut out = vec![&self.lm_head];
        for l in 0..self.layers.len() {
            out.extend(self.layer_matrices(l));
        }
        out
    }

    /// Decoder layer `l`'s matrices outside its routed experts: attention, and the
    /// dense MLP or the router and shared experts.
    pub fn layer_matrices(&self, l: usize) -> Vec<&LinearWeight> {
        let Some(layer) = self.layers.get(l) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let a = &layer.attn;
        match &a.q {
            QueryProj::LowRank { a, b, .. } => out.extend([a, b]),
            QueryProj::Full(w) => out.push(w),
        }
        out.extend([&a.kv_a, &a.kv_b, &a.o]);
        match &layer.ffn {
            Ffn::Dense(f) => out.extend(f.matrices()),
            Ffn::Moe(moe) => {
                out.push(&moe.router);
                out.extend(moe.shared.iter().flat_map(FfnWeights::matrices));
            }
        }
        out
    }

    /// Every routed expert of every MoE layer.
    pub fn routed_experts(&self) -> Vec<&FfnWeights> {
        self.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Ffn::Moe(moe) => Some(moe.experts.iter()),
                Ffn::Dense(_) => None,
            })
            .flatten()
            .collect()
    }

    /// Maps every tensor the text model needs, checking names, shapes and dtypes.
    pub fn load(ckpt: &Checkpoint) -> Result<Self, ModelError> {
        let cfg = ckpt.config.clone();
        let w = WeightLoader::new(ckpt);
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = match cfg.q_lora_rank {
                Some(rank) => QueryProj::LowRank {
                    a: w.linear(&format!("{p}.self_attn.q_a_proj"), rank, h)?,
                    norm: w.vector(&format!("{p}.self_attn.q_a_layernorm.weight"), rank)?,
                    b: w.linear(
                        &format!("{p}.self_attn.q_b_proj"),
                        heads * cfg.qk_head_dim(),
                        rank,
                    )?,
                },
                None => QueryProj::Full(w.linear(
                    &format!("{p}.self_attn.q_proj"),
                    heads * cfg.qk_head_dim(),
                    h,
                )?),
            };
            let attn = Attention {
                q,
                kv_a: w.linear(
                    &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                    cfg.latent_cache_width(),
                    h,
                )?,
                kv_a_norm: w.vector(
                    &format!("{p}.self_attn.kv_a_layernorm.weight"),
                    cfg.kv_lora_rank,
                )?,
                kv_b: w.linear(
                    &format!("{p}.self_attn.kv_b_proj"),
                    heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                    cfg.kv_lora_rank,
                )?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, heads * cfg.v_head_dim)?,
            };
            let ffn_weights = |module: &str, inter: usize| -> Result<FfnWeights, WeightsError> {
                Ok(FfnWeights {
                    gate: w.linear(&format!("{module}.gate_proj"), inter, h)?,
                    up: w.linear(&format!("{module}.up_proj"), inter, h)?,
                    down: w.linear(&format!("{module}.down_proj"), h, inter)?,
                    numa_node: None,
                    expert: None,
                    gpu: None,
                })
            };
            let ffn = if cfg.is_moe_layer(l) {
                let n = cfg.n_routed_experts;
                let correction_bias = match cfg.topk_method {
                    TopkMethod::NoauxTc => {
                        Some(w.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), n)?)
                    }
                    _ => None,
                };
                let experts = (0..n)
                    .map(|e| {
                        let mut f = ffn_weights(
                            &format!("{p}.mlp.experts.{e}"),
                            cfg.moe_intermediate_size,
                        )?;
                        f.expert = Some((l, e));
                        Ok(f)
                    })
                    .collect::<Result<Vec<_>, WeightsError>>()?;
                let shared = if cfg.n_shared_experts > 0 {
                    Some(ffn_weights(
                        &format!("{p}.mlp.shared_experts"),
                        cfg.moe_intermediate_size * cfg.n_shared_experts,
                    )?)
                } else {
                    None
                };
                Ffn::Moe(Moe {
                    router: w.dense_matrix(&format!("{p}.mlp.gate.weight"), n, h)?,
                    correction_bias,
                    experts,
                    shared,
                })
            } else {
                Ffn::Dense(ffn_weights(&format!("{p}.mlp"), cfg.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: w.vector(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                post_attn_norm: w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn,
            });
        }
        let embed = w.dense_matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            w.linear("lm_head", cfg.vocab_size, h)?
        };
        let norm = w.vector("model.norm.weight", h)?;
        Ok(Model {
            rope: Rope::new(&cfg),
            embed,
            layers,
            norm,
            lm_head,
            used_tensors: w.used(),
            defer_host_experts: 0,
            id: next_model_id(),
            config: cfg,
        })
    }

    /// Places routed experts as a plan says: on a GPU (`gpu`), or in a NUMA node's RAM
    /// (`numa_node`, computed by that node's threads). Returns (GPU, NUMA) counts.
    pub fn apply_plan(&mut self, plan: &crate::placement::Plan) -> (usize, usize) {
        let mut counts = (0, 0);
        let mut place = |sets: &crate::placement::planner::ExpertSets,
                         set: &mut dyn FnMut(&mut FfnWeights)| {
            let mut n = 0;
            for (&layer, ranges) in sets {
                let Some(Layer {
                    ffn: Ffn::Moe(moe), ..
                }) = self.layers.get_mut(layer)
                else {
                    continue;
                };
                for r in ranges {
                    for e in r[0]..r[1] {
                        if let Some(expert) = moe.experts.get_mut(e) {
                            set(expert);
                            n += 1;
                        }
                    }
                }
            }
            n
        };
        for g in &plan.gpus {
            counts.0 += place(&g.experts, &mut |f| {
                f.gpu = Some(g.index);
                f.numa_node = None;
            });
        }
        for node in &plan.numa {
            counts.1 += place(&node.experts, &mut |f| {
                f.numa_node = Some(node.node);
                f.gpu = None;
            });
        }
        counts
    }

    /// Rejects an empty batch, token ids outside the vocabulary and passes that would
    /// run past the context limit.
    pub fn check_batch(&self, batch: &[BatchEntry]) -> Result<(), ModelError> {
        let cfg = &self.config;
        if batch.is_empty() || batch.iter().any(|e| e.tokens.is_empty()) {
            return Err(ModelError::Empty);
        }
        for e in batch {
            if let Some(&bad) = e.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    token: bad,
                    vocab: cfg.vocab_size,
                });
            }
            let needed = e.start + e.tokens.len();
            if needed > cfg.max_position_embeddings {
                return Err(ModelError::ContextFull {
                    needed,
                    limit: cfg.max_position_embeddings,
                });
            }
        }
        Ok(())
    }

    /// The experts of one token's routes whose output waits a layer: its
    /// `defer_host_experts` lowest-weighted experts among those in host memory.
    pub(crate) fn deferred_routes(&self, moe: &Moe, routes: &[(usize, f32)]) -> Vec<usize> {
        if self.defer_host_experts == 0 {
            return Vec::new();
        }
        let mut host: Vec<(usize, f32)> = routes
            .iter()
            .copied()
            .filter(|&(e, _)| moe.experts.get(e).is_some_and(|f| f.gpu.is_none()))
            .collect();
        host.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        host.truncate(self.defer_host_experts);
        host.into_iter().map(|(e, _)| e).collect()
    }
}

/// A process-wide number for each loaded model (see [`Model::id`]).
fn next_model_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Widths of the absorbed MLA computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    pub heads: usize,
    /// qk_nope_head_dim
    pub nope: usize,
    /// qk_rope_head_dim
    pub rope: usize,
    /// v_head_dim
    pub v: usize,
    /// kv_lora_rank
    pub latent: usize,
}

impl MlaDims {
    pub fn of(cfg: &ModelConfig) -> Self {
        MlaDims {
            heads: cfg.num_attention_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v: cfg.v_head_dim,
            latent: cfg.kv_lora_rank,
        }
    }

    /// Values per cached token: the latent and the rotated key part.
    pub fn width(&self) -> usize {
        self.latent + self.rope
    }

    /// Query values per head.
    pub fn qk(&self) -> usize {
        self.nope + self.rope
    }

    /// Rows of kv_b per head: W_UK (nope rows) then W_UV (v rows).
    pub fn kv_b_rows(&self) -> usize {
        self.nope + self.v
    }

    /// Multiply-adds of one layer's attention in the naive form over `keys` cached
    /// tokens, `visible` (query, key) pairs in all: every key through kv_b once (all
    /// heads), then `qk + v` per pair and head.
    pub fn naive_work(&self, keys: usize, visible: usize) -> usize {
        let h = self.heads;
        keys * h * self.kv_b_rows() * self.latent + visible * h * (self.qk() + self.v)
    }

    /// The same in the absorbed form for `queries` queries: every query folded through
    /// W_UK and its output through W_UV once, then `width + latent` per pair and head.
    pub fn absorbed_work(&self, queries: usize, visible: usize) -> usize {
        let h = self.heads;
        queries * h * self.kv_b_rows() * self.latent + visible * h * (self.width() + self.latent)
    }
}

/// RMSNorm over rows of `w.len()` values: `x * rsqrt(mean(x^2) + eps) * w`, in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
    out
}

/// The (expert, tokens) pairs of the experts some token visits, in expert order.
pub(crate) fn expert_work<'a>(
    experts: &'a [FfnWeights],
    per_expert: &'a [Vec<(usize, f32)>],
) -> Vec<(&'a FfnWeights, &'a [(usize, f32)])> {
    per_expert
        .iter()
        .enumerate()
        .filter(|(_, tokens)| !tokens.is_empty())
        .map(|(e, tokens)| (&experts[e], tokens.as_slice()))
        .collect()
}
