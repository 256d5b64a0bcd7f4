//! The DeepSeek-V3 / Kimi K2 text model, written as plain maths against the `Backend`
//! trait. One token's path: embedding -> per layer [RMSNorm -> MLA -> residual ->
//! RMSNorm -> dense MLP or MoE -> residual] -> final RMSNorm -> lm_head.
//!
//! MLA keeps a latent cache of `kv_lora_rank + qk_rope_head_dim` values per token per
//! layer (the normalised `c_kv` and the rotated shared `k_pe`). Two equivalent forms read
//! it: the naive form expands every cached latent through `kv_b_proj` into per-head keys
//! and values (cheap for a batch of new tokens), the absorbed form folds `W_UK` into the
//! query and `W_UV` into the output so attention runs directly over the latents (cheap
//! for one new token over a long context).

pub mod rope;
pub mod router;

use crate::backend::{AttentionShape, Backend, FfnWeights, KvView};
use crate::config::{ModelConfig, TopkMethod};
use crate::weights::{Checkpoint, LinearWeight, WeightLoader, WeightsError};
pub use rope::Rope;
use std::borrow::Cow;
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

/// Where the latents of the sequences in a forward pass live. Sequence `seq` is the
/// index of its entry in the batch; positions are absolute.
pub trait LatentStore {
    /// Values per token per layer (`kv_lora_rank + qk_rope_head_dim`).
    fn width(&self) -> usize;
    /// Stores the latent of `seq` at `pos` in `layer`. Positions are written in order,
    /// each once per forward, and every earlier position is already present.
    fn write(&mut self, seq: usize, layer: usize, pos: usize, latent: &[f32]);
    /// The latents of positions `0..len` of `seq` in `layer`, `[len, width]`.
    fn read(&self, seq: usize, layer: usize, len: usize) -> Cow<'_, [f32]>;
    /// The block size and the blocks holding positions `0..len` of `seq`, in position
    /// order: where a device-resident cache puts the same latents.
    fn block_table(&self, seq: usize, len: usize) -> (usize, Vec<u32>);
    /// Whether latents are kept in BF16 (rounded on write), as a device cache should too.
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

/// Block size of a contiguous [`KvCache`] seen as a paged one.
const CONTIGUOUS_BLOCK: usize = 64;

/// The latent KV cache of one sequence, contiguous per layer.
pub struct KvCache {
    width: usize,
    layers: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        KvCache {
            width: config.latent_cache_width(),
            layers: vec![Vec::new(); config.num_hidden_layers],
            len: 0,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl LatentStore for KvCache {
    fn width(&self) -> usize {
        self.width
    }

    fn write(&mut self, _seq: usize, layer: usize, pos: usize, latent: &[f32]) {
        let rows = &mut self.layers[layer];
        rows.truncate(pos * self.width);
        rows.extend_from_slice(latent);
    }

    fn read(&self, _seq: usize, layer: usize, len: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(&self.layers[layer][..len * self.width])
    }

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

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending their
    /// latents to `cache`. Returns logits `[n, vocab]` (`Logits::All`) or `[vocab]` for
    /// the last token.
    pub fn forward(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        cache: &mut KvCache,
        form: AttentionForm,
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_observed(backend, tokens, cache, form, logits, &mut |_, _| {})
    }

    /// `forward`, calling `on_route(layer, experts)` with every token's routed experts
    /// (used to collect activation statistics).
    pub fn forward_observed(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        cache: &mut KvCache,
        form: AttentionForm,
        logits: Logits,
        on_route: &mut RouteObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let entry = BatchEntry {
            tokens,
            start: cache.len,
            logits: Some(logits),
        };
        let mut out = self.forward_batch(backend, &[entry], cache, form, on_route)?;
        cache.len += tokens.len();
        Ok(out.pop().flatten().unwrap_or_default())
    }

    /// One forward pass over several sequences at once: every weight is read once for
    /// all their tokens (each routed expert once for all tokens routed to it), attention
    /// runs per sequence over its own latents in `store`. Per-token results do not depend
    /// on what else is in the batch. Returns, per entry, its logits (`[n, vocab]` or
    /// `[vocab]`) when asked for.
    pub fn forward_batch(
        &self,
        backend: &dyn Backend,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        form: AttentionForm,
        on_route: &mut RouteObserver,
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        if let Some(whole) = backend.whole_forward() {
            if let Some(result) = whole.forward_batch(self, batch, store, form, on_route) {
                return result;
            }
        }
        self.check_batch(batch)?;
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let seqs: Vec<SeqSpan> = {
            let mut offset = 0;
            batch
                .iter()
                .map(|e| {
                    let span = SeqSpan {
                        first: offset,
                        start: e.start,
                        len: e.tokens.len(),
                        form: match form {
                            AttentionForm::Auto if e.tokens.len() == 1 => AttentionForm::Absorbed,
                            AttentionForm::Auto => AttentionForm::Naive,
                            f => f,
                        },
                    };
                    offset += e.tokens.len();
                    span
                })
                .collect()
        };
        let n: usize = batch.iter().map(|e| e.tokens.len()).sum();

        let mut x = vec![0.0f32; n * h];
        for (t, &id) in batch.iter().flat_map(|e| e.tokens).enumerate() {
            self.embed
                .decode_row(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        // Outputs of experts deferred by the previous layer.
        let mut deferred: Option<Vec<f32>> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps);
            let attn = self.attention(backend, l, &xn, &seqs, store);
            add_in_place(&mut x, &attn);
            let xn = rms_norm(&x, &layer.post_attn_norm, cfg.rms_norm_eps);
            let (ffn, later) = self.ffn(backend, l, &layer.ffn, &xn, on_route);
            add_in_place(&mut x, &ffn);
            if let Some(d) = deferred.take() {
                add_in_place(&mut x, &d);
            }
            deferred = later;
        }
        if let Some(d) = deferred {
            add_in_place(&mut x, &d);
        }

        // lm_head once over every row that needs logits.
        let mut rows = Vec::new();
        for (e, s) in batch.iter().zip(&seqs) {
            rows.extend(Logits::rows(e.logits, s.first, s.len));
        }
        let mut picked = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            picked.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let xn = rms_norm(&picked, &self.norm, cfg.rms_norm_eps);
        let vocab = cfg.vocab_size;
        let mut all = vec![0.0f32; rows.len() * vocab];
        if !rows.is_empty() {
            backend.linear(&self.lm_head, 0..vocab, &xn, &mut all);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0;
        for (e, s) in batch.iter().zip(&seqs) {
            let count = Logits::rows(e.logits, 0, s.len).len();
            out.push(
                e.logits
                    .map(|_| all[next * vocab..(next + count) * vocab].to_vec()),
            );
            next += count;
        }
        Ok(out)
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

    fn attention(
        &self,
        backend: &dyn Backend,
        layer: usize,
        x: &[f32],
        seqs: &[SeqSpan],
        store: &mut dyn LatentStore,
    ) -> Vec<f32> {
        let cfg = &self.config;
        let a = &self.layers[layer].attn;
        let n = x.len() / cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let (dn, dr, dv, c) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let dq = dn + dr;
        let positions: Vec<usize> = seqs.iter().flat_map(|s| s.start..s.start + s.len).collect();

        // Queries [n, heads, dn + dr], rope on the last dr of each head.
        let mut q = vec![0.0f32; n * heads * dq];
        match &a.q {
            QueryProj::LowRank { a: qa, norm, b } => {
                let mut lat = vec![0.0f32; n * qa.rows()];
                backend.linear(qa, 0..qa.rows(), x, &mut lat);
                let lat = rms_norm(&lat, norm, cfg.rms_norm_eps);
                backend.linear(b, 0..b.rows(), &lat, &mut q);
            }
            QueryProj::Full(w) => backend.linear(w, 0..w.rows(), x, &mut q),
        }
        for (i, &pos) in positions.iter().enumerate() {
            for hd in 0..heads {
                let start = (i * heads + hd) * dq + dn;
                self.rope.apply(&mut q[start..start + dr], pos);
            }
        }

        // New latents: normalised c_kv and rotated k_pe, written to the store.
        let width = store.width();
        let mut kv = vec![0.0f32; n * width];
        backend.linear(&a.kv_a, 0..width, x, &mut kv);
        for (i, &pos) in positions.iter().enumerate() {
            let row = &mut kv[i * width..(i + 1) * width];
            let normed = rms_norm(&row[..c], &a.kv_a_norm, cfg.rms_norm_eps);
            row[..c].copy_from_slice(&normed);
            self.rope.apply(&mut row[c..], pos);
        }
        for (s_idx, s) in seqs.iter().enumerate() {
            for i in 0..s.len {
                let t = s.first + i;
                store.write(s_idx, layer, s.start + i, &kv[t * width..(t + 1) * width]);
            }
        }

        let scale = cfg.softmax_scale();
        let kv_b_rows = dn + dv;
        let mut heads_out = vec![0.0f32; n * heads * dv];

        // Absorbed sequences: fold W_UK into their queries together (one read of kv_b for
        // all of them), attend per sequence over the latents, unfold W_UV together.
        let absorbed: Vec<(usize, &SeqSpan)> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.form == AttentionForm::Absorbed)
            .collect();
        let m: usize = absorbed.iter().map(|(_, s)| s.len).sum();
        if m > 0 {
            let rows: Vec<usize> = absorbed
                .iter()
                .flat_map(|(_, s)| s.first..s.first + s.len)
                .collect();
            // q~_h = q_nope_h W_UK_h (c values), followed by q_pe_h: one MQA query of
            // width c + dr against the latent cache; values are the c_kv latents.
            let dims = MlaDims::of(cfg);
            let mut q_rows = Vec::with_capacity(m * heads * dq);
            for &t in &rows {
                q_rows.extend_from_slice(&q[t * heads * dq..(t + 1) * heads * dq]);
            }
            let q_lat = absorb_queries(backend, &a.kv_b, &q_rows, dims, m);
            let mut o_lat = vec![0.0f32; m * heads * c];
            let mut done = 0;
            for &(seq, s) in &absorbed {
                let latents = store.read(seq, layer, s.start + s.len);
                let view = KvView {
                    data: &latents,
                    token_stride: width,
                    head_stride: 0,
                    offset: 0,
                };
                backend.attention(
                    &q_lat[done * heads * width..(done + s.len) * heads * width],
                    view,
                    view,
                    AttentionShape {
                        heads,
                        kv_heads: 1,
                        qk_dim: width,
                        v_dim: c,
                    },
                    &positions[s.first..s.first + s.len],
                    scale,
                    &mut o_lat[done * heads * c..(done + s.len) * heads * c],
                );
                done += s.len;
            }
            // o_h = W_UV_h o_lat_h
            let v = expand_values(backend, &a.kv_b, &o_lat, dims, m);
            for (i, &t) in rows.iter().enumerate() {
                heads_out[t * heads * dv..(t + 1) * heads * dv]
                    .copy_from_slice(&v[i * heads * dv..(i + 1) * heads * dv]);
            }
        }

        // Naive sequences: expand every cached latent into per-head keys [nope | rope]
        // and values.
        for (seq, s) in seqs.iter().enumerate() {
            if s.form == AttentionForm::Absorbed {
                continue;
            }
            let total = s.start + s.len;
            let latents = store.read(seq, layer, total);
            let mut c_kv = Vec::with_capacity(total * c);
            for t in 0..total {
                c_kv.extend_from_slice(&latents[t * width..t * width + c]);
            }
            let mut expanded = vec![0.0f32; total * heads * kv_b_rows];
            backend.linear(&a.kv_b, 0..heads * kv_b_rows, &c_kv, &mut expanded);
            let mut keys = vec![0.0f32; total * heads * dq];
            for t in 0..total {
                for hd in 0..heads {
                    let src = (t * heads + hd) * kv_b_rows;
                    let dst = (t * heads + hd) * dq;
                    keys[dst..dst + dn].copy_from_slice(&expanded[src..src + dn]);
                    keys[dst + dn..dst + dq]
                        .copy_from_slice(&latents[t * width + c..(t + 1) * width]);
                }
            }
            backend.attention(
                &q[s.first * heads * dq..(s.first + s.len) * heads * dq],
                KvView {
                    data: &keys,
                    token_stride: heads * dq,
                    head_stride: dq,
                    offset: 0,
                },
                KvView {
                    data: &expanded,
                    token_stride: heads * kv_b_rows,
                    head_stride: kv_b_rows,
                    offset: dn,
                },
                AttentionShape {
                    heads,
                    kv_heads: heads,
                    qk_dim: dq,
                    v_dim: dv,
                },
                &positions[s.first..s.first + s.len],
                scale,
                &mut heads_out[s.first * heads * dv..(s.first + s.len) * heads * dv],
            );
        }
        let mut out = vec![0.0f32; n * cfg.hidden_size];
        backend.linear(&a.o, 0..cfg.hidden_size, &heads_out, &mut out);
        out
    }

    fn ffn(
        &self,
        backend: &dyn Backend,
        layer: usize,
        ffn: &Ffn,
        x: &[f32],
        on_route: &mut RouteObserver,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let n = x.len() / h;
        let mut out = vec![0.0f32; n * h];
        let mut later = None;
        match ffn {
            Ffn::Dense(w) => {
                let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
                backend.ffn_accumulate(w, x, &all, &mut out);
            }
            Ffn::Moe(moe) => {
                let e = cfg.n_routed_experts;
                let mut router_logits = vec![0.0f32; n * e];
                backend.linear(&moe.router, 0..e, x, &mut router_logits);
                // Group tokens by expert so each expert's weights are read once.
                let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
                let mut per_expert_later: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
                for t in 0..n {
                    let routes = router::route(
                        cfg,
                        &router_logits[t * e..(t + 1) * e],
                        moe.correction_bias.as_deref(),
                    );
                    on_route(layer, &routes);
                    let deferred = self.deferred_routes(moe, &routes);
                    for (expert, weight) in routes {
                        let list = if deferred.contains(&expert) {
                            &mut per_expert_later
                        } else {
                            &mut per_expert
                        };
                        list[expert].push((t, weight));
                    }
                }
                let now = expert_work(&moe.experts, &per_expert);
                backend.moe_accumulate(&now, x, &mut out);
                let next = expert_work(&moe.experts, &per_expert_later);
                if !next.is_empty() {
                    let mut d = vec![0.0f32; n * h];
                    backend.moe_accumulate(&next, x, &mut d);
                    later = Some(d);
                }
                if let Some(shared) = &moe.shared {
                    let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
                    backend.ffn_accumulate(shared, x, &all, &mut out);
                }
            }
        }
        (out, later)
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
}

/// Absorbed queries `[tokens, heads, latent + rope]` from `q` `[tokens, heads, nope +
/// rope]`: per head `[q_nope · W_UK_h | q_pe]`, folding every token's head through one
/// transposed product over that head's band of `kv_b`.
pub(crate) fn absorb_queries(
    backend: &dyn Backend,
    kv_b: &LinearWeight,
    q: &[f32],
    d: MlaDims,
    tokens: usize,
) -> Vec<f32> {
    let (width, qk) = (d.width(), d.qk());
    let mut out = vec![0.0f32; tokens * d.heads * width];
    let mut nope = vec![0.0f32; tokens * d.nope];
    let mut folded = vec![0.0f32; tokens * d.latent];
    for h in 0..d.heads {
        for t in 0..tokens {
            let src = (t * d.heads + h) * qk;
            nope[t * d.nope..(t + 1) * d.nope].copy_from_slice(&q[src..src + d.nope]);
        }
        let uk = h * d.kv_b_rows()..h * d.kv_b_rows() + d.nope;
        backend.linear_transposed(kv_b, uk, &nope, &mut folded);
        for t in 0..tokens {
            let dst = (t * d.heads + h) * width;
            out[dst..dst + d.latent].copy_from_slice(&folded[t * d.latent..(t + 1) * d.latent]);
            let src = (t * d.heads + h) * qk + d.nope;
            out[dst + d.latent..dst + width].copy_from_slice(&q[src..src + d.rope]);
        }
    }
    out
}

/// Per head `W_UV_h · o_h`: values `[tokens, heads, v]` from attended latents `[tokens,
/// heads, latent]`.
pub(crate) fn expand_values(
    backend: &dyn Backend,
    kv_b: &LinearWeight,
    o: &[f32],
    d: MlaDims,
    tokens: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; tokens * d.heads * d.v];
    let mut lat = vec![0.0f32; tokens * d.latent];
    let mut v = vec![0.0f32; tokens * d.v];
    for h in 0..d.heads {
        for t in 0..tokens {
            let src = (t * d.heads + h) * d.latent;
            lat[t * d.latent..(t + 1) * d.latent].copy_from_slice(&o[src..src + d.latent]);
        }
        let uv = h * d.kv_b_rows() + d.nope..(h + 1) * d.kv_b_rows();
        backend.linear(kv_b, uv, &lat, &mut v);
        for t in 0..tokens {
            let dst = (t * d.heads + h) * d.v;
            out[dst..dst + d.v].copy_from_slice(&v[t * d.v..(t + 1) * d.v]);
        }
    }
    out
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

/// Where one sequence's tokens sit in a batch.
#[derive(Debug, Clone, Copy)]
struct SeqSpan {
    /// Index of its first token among the batch's tokens.
    first: usize,
    /// Its position before this pass.
    start: usize,
    len: usize,
    form: AttentionForm,
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
