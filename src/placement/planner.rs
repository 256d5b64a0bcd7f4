//! The planner: `plan(model, profile, workload, stats) -> Plan`, a pure function.
//!
//! Layouts:
//! - **hybrid** (GPUs too small for the model): the decoder layers are split into
//!   contiguous runs, one per GPU. Each GPU holds, in this order of priority, its layers'
//!   attention (with norms and router), their latent KV cache for the workload, their
//!   shared experts and dense MLPs, then lm_head (last GPU) and embeddings (first GPU);
//!   whatever does not fit spills to host RAM with a warning. The GPU memory left is filled
//!   with the hottest routed experts of its layers. The remaining routed experts go to
//!   host RAM, hottest first, spread over the NUMA nodes layer by layer in proportion to
//!   their memory; the coldest that do not fit are read from disk when used.
//! - **all-gpu**: attention tensor-parallel (heads split, latent KV replicated) or
//!   data-parallel (weights replicated, each GPU its own sequences' KV); routed experts
//!   expert-parallel (a contiguous 1/N of every layer's experts per GPU); shared experts
//!   and dense MLPs replicated; embeddings and lm_head split by vocabulary.
//! - **cpu**: everything in host RAM.
//!
//! "Hottest" is the measured visit probability when statistics are given; without them
//! every expert is equally hot and ties are broken by expert id then layer, which spreads
//! the GPU's experts evenly over the layers.
//!
//! The estimate is a roofline (see `estimate_*`): decode is bound by the bytes each step
//! reads from each tier over that tier's bandwidth, prefill by FLOPs over throughput.

use super::model_desc::ModelDesc;
use super::profile::{AttentionParallel, KvDtype, Layout, Profile, Workload, GIB};
use super::stats::ExpertStats;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: &str = "kimi-hybrid-plan/1";

/// Fraction of peak memory bandwidth reached by decode kernels on each tier.
pub const GPU_BW_EFFICIENCY: f64 = 0.8;
pub const CPU_BW_EFFICIENCY: f64 = 0.7;
/// Fraction of the GPU's dense BF16 peak reached by prefill GEMMs.
pub const GPU_FLOP_EFFICIENCY: f64 = 0.5;
/// Fixed cost of one GPU<->CPU hand-off (launch, sync) per MoE layer, seconds.
pub const HANDOFF_LATENCY_S: f64 = 20e-6;
/// Fixed cost of one all-to-all (dispatch or combine) between GPUs, seconds.
pub const ALL_TO_ALL_LATENCY_S: f64 = 15e-6;
/// Tokens per prefill chunk assumed by the prefill estimate.
pub const PREFILL_CHUNK: u64 = 2048;

/// How a plan runs the model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PlanLayout {
    /// Every weight on GPUs.
    AllGpu,
    /// GPUs hold attention, dense layers, shared and hot routed experts; the other
    /// routed experts are in host RAM (or read from disk).
    Hybrid,
    /// Everything in host RAM.
    Cpu,
}

impl std::fmt::Display for PlanLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanLayout::AllGpu => "all-gpu",
            PlanLayout::Hybrid => "hybrid",
            PlanLayout::Cpu => "cpu",
        })
    }
}

/// What kind of thing a device holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Holding {
    /// Non-expert weights: attention, norms, routers, shared experts, dense MLPs,
    /// embeddings, lm_head.
    Weights,
    /// The latent KV cache.
    KvCache,
    /// Routed experts (on a GPU of a hybrid plan: its hot ones).
    RoutedExperts,
}

/// One thing a device holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(from = "StoredItem")]
pub struct Item {
    pub kind: Holding,
    /// The decoder layer it belongs to, for per-layer weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// What it is, in words (without the layer).
    pub what: String,
    pub bytes: u64,
}

impl Item {
    fn new(kind: Holding, what: impl Into<String>, bytes: u64) -> Self {
        Item {
            kind,
            layer: None,
            what: what.into(),
            bytes,
        }
    }

    fn in_layer(layer: usize, what: impl Into<String>, bytes: u64) -> Self {
        Item {
            layer: Some(layer),
            ..Item::new(Holding::Weights, what, bytes)
        }
    }

    /// The item in words, its layer first.
    pub fn describe(&self) -> String {
        match self.layer {
            Some(l) => format!("layer {l} {}", self.what),
            None => self.what.clone(),
        }
    }
}

/// An [`Item`] as a plan file holds it. Plans written before items had kinds say only
/// `what`; their kind and layer are read from its words.
#[derive(Deserialize)]
struct StoredItem {
    kind: Option<Holding>,
    layer: Option<usize>,
    what: String,
    bytes: u64,
}

impl From<StoredItem> for Item {
    fn from(s: StoredItem) -> Self {
        if let Some(kind) = s.kind {
            return Item {
                kind,
                layer: s.layer,
                what: s.what,
                bytes: s.bytes,
            };
        }
        let (layer, what) = s
            .what
            .strip_prefix("layer ")
            .and_then(|rest| rest.split_once(' '))
            .and_then(|(n, rest)| Some((Some(n.parse().ok()?), rest.to_string())))
            .unwrap_or((None, s.what.clone()));
        let kind = if what.contains("KV cache") {
            Holding::KvCache
        } else if what.contains("routed experts") {
            Holding::RoutedExperts
        } else {
            Holding::Weights
        };
        Item {
            kind,
            layer,
            what,
            bytes: s.bytes,
        }
    }
}

/// Expert ids per MoE layer, as half-open ranges `[start, end)`.
pub type ExpertSets = BTreeMap<usize, Vec<[usize; 2]>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpuPlan {
    pub index: usize,
    pub name: String,
    pub capacity_bytes: u64,
    /// Capacity less the CUDA context and workspace reserves.
    pub budget_bytes: u64,
    /// Decoder layers whose attention this GPU runs (all of them for all-gpu).
    pub layers: [usize; 2],
    pub holds: Vec<Item>,
    /// Latent KV tokens held for the workload (per GPU).
    pub kv_tokens: u64,
    /// Most latent KV tokens this GPU could hold: hybrid, if it gave up its hot routed
    /// experts; all-gpu, in what its weights leave free.
    pub kv_capacity_tokens: u64,
    pub experts: ExpertSets,
    pub expert_count: usize,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NumaPlan {
    pub node: usize,
    pub capacity_bytes: u64,
    /// Capacity less this node's share of the OS reserve.
    pub budget_bytes: u64,
    pub holds: Vec<Item>,
    pub experts: ExpertSets,
    pub expert_count: usize,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskPlan {
    pub experts: ExpertSets,
    pub expert_count: usize,
    pub bytes: u64,
    /// Bytes of routed experts that host RAM could not hold (read from disk when used).
    pub ram_shortfall_bytes: u64,
}

/// Routed experts of one MoE layer per tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerTiers {
    pub layer: usize,
    pub gpu: usize,
    pub cpu: usize,
    pub disk: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TierTimes {
    pub gpu_s: f64,
    pub cpu_s: f64,
    pub disk_s: f64,
    pub transfer_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    /// Decode tokens/s of one sequence running alone.
    pub decode_tokens_per_s_batch1: f64,
    pub decode_step_batch1: TierTimes,
    /// Concurrency used for the aggregate figure.
    pub concurrency: u64,
    /// Decode tokens/s summed over `concurrency` sequences.
    pub decode_tokens_per_s_aggregate: f64,
    pub decode_step_aggregate: TierTimes,
    pub prefill_tokens_per_s: f64,
    pub prefill_per_token: TierTimes,
    /// Host<->GPU bytes per token per forward pass (hybrid): every MoE layer with experts
    /// in host RAM or on disk ships the token's f32 hidden state to the host and its
    /// result back.
    pub handoff_bytes_per_token: u64,
    pub formula: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    pub layers: usize,
    pub moe_layers: usize,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub text_model_bytes: u64,
    pub routed_expert_bytes: u64,
    pub routed_expert_count: usize,
    pub non_expert_bytes: u64,
    pub vision_bytes: u64,
    pub unused_bytes: u64,
    pub kv_bytes_per_token: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkloadSummary {
    pub context: u64,
    pub concurrency: u64,
    pub kv_dtype: KvDtype,
    /// all-gpu only: tensor- or data-parallel attention.
    pub attention: Option<AttentionParallel>,
    pub stats: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub schema: String,
    pub profile: String,
    pub layout: PlanLayout,
    pub model: ModelSummary,
    pub workload: WorkloadSummary,
    pub gpus: Vec<GpuPlan>,
    pub numa: Vec<NumaPlan>,
    pub disk: DiskPlan,
    pub per_layer: Vec<LayerTiers>,
    pub estimate: Estimate,
    pub feasible: bool,
    /// Why the plan cannot run, each with the exact shortfall.
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Where one routed expert lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Gpu(usize),
    Numa(usize),
    Disk,
}

struct Builder<'a> {
    model: &'a ModelDesc,
    profile: &'a Profile,
    workload: &'a Workload,
    /// visit probability per token, [moe index][expert]
    heat: Vec<Vec<f64>>,
    tiers: Vec<Vec<Tier>>,
    gpus: Vec<GpuPlan>,
    numa: Vec<NumaPlan>,
    problems: Vec<String>,
    warnings: Vec<String>,
    /// all-gpu: attention is data-parallel.
    attention_dp: bool,
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

pub fn plan(
    model: &ModelDesc,
    profile: &Profile,
    workload: &Workload,
    stats: Option<&ExpertStats>,
) -> Plan {
    let heat: Vec<Vec<f64>> = model
        .moe_layers
        .iter()
        .map(|&l| match stats {
            Some(s) => s.visit_probability(l, model.experts_per_layer, model.top_k),
            None => vec![
                model.top_k as f64 / model.experts_per_layer.max(1) as f64;
                model.experts_per_layer
            ],
        })
        .collect();
    let mut layout = resolve_layout(model, profile, workload);
    let mut problems = Vec::new();
    if profile.gpu.count == 0 && matches!(layout, Layout::AllGpu | Layout::Hybrid) {
        problems.push(format!(
            "layout {} needs GPUs but profile {} has none (gpu.count = 0); use layout \"cpu\" or a profile with GPUs",
            if layout == Layout::AllGpu { "all-gpu" } else { "hybrid" },
            profile.name
        ));
        layout = Layout::Cpu;
    }
    let numa_budget = profile.numa_budget_bytes();
    let numa = profile
        .host
        .numa
        .iter()
        .enumerate()
        .map(|(i, n)| NumaPlan {
            node: i,
            capacity_bytes: (n.memory_gib * GIB) as u64,
            budget_bytes: numa_budget[i],
            holds: Vec::new(),
            experts: BTreeMap::new(),
            expert_count: 0,
            used_bytes: 0,
        })
        .collect();
    let mut b = Builder {
        model,
        profile,
        workload,
        tiers: heat.iter().map(|h| vec![Tier::Disk; h.len()]).collect(),
        heat,
        gpus: Vec::new(),
        numa,
        problems,
        warnings: Vec::new(),
        attention_dp: false,
    };
    let attention = match layout {
        Layout::AllGpu => Some(b.all_gpu()),
        Layout::Hybrid => {
            b.hybrid();
            None
        }
        _ => {
            b.cpu_only();
            None
        }
    };
    b.finish(layout, attention, stats.is_some())
}

/// `auto`: all-GPU when the text model and the workload's KV fit in the GPUs' budgets.
fn resolve_layout(model: &ModelDesc, profile: &Profile, workload: &Workload) -> Layout {
    match profile.layout {
        Layout::Auto if profile.gpu.count == 0 => Layout::Cpu,
        Layout::Auto => {
            let kv = kv_bytes_per_token(model, workload) * workload.context * workload.concurrency;
            if model.text_model_bytes() + kv
                <= profile.gpu_budget_bytes() * profile.gpu.count as u64
            {
                Layout::AllGpu
            } else {
                Layout::Hybrid
            }
        }
        l => l,
    }
}

pub fn kv_bytes_per_token(model: &ModelDesc, workload: &Workload) -> u64 {
    (model.kv_width * model.num_layers) as u64 * workload.kv_dtype.bytes()
}

impl Builder<'_> {
    fn new_gpu(&self, index: usize, layers: [usize; 2]) -> GpuPlan {
        GpuPlan {
            index,
            name: self.profile.gpu.name.clone(),
            capacity_bytes: (self.profile.gpu.memory_gib * GIB) as u64,
            budget_bytes: self.profile.gpu_budget_bytes(),
            layers,
            holds: Vec::new(),
            kv_tokens: 0,
            kv_capacity_tokens: 0,
            experts: BTreeMap::new(),
            expert_count: 0,
            used_bytes: 0,
        }
    }

    /// Puts an item on GPU g if it fits, else on the NUMA node with most room; says so.
    fn place_gpu_or_spill(&mut self, g: usize, item: Item) -> bool {
        let bytes = item.bytes;
        if bytes == 0 {
            return true;
        }
        let gpu = &mut self.gpus[g];
        if gpu.used_bytes + bytes <= gpu.budget_bytes {
            gpu.used_bytes += bytes;
            gpu.holds.push(item);
            return true;
        }
        self.warnings.push(format!(
            "{} ({}) does not fit on GPU {g}; kept in host RAM",
            item.describe(),
            gb(bytes)
        ));
        self.place_ram(item);
        false
    }

    fn place_ram(&mut self, item: Item) {
        let bytes = item.bytes;
        let node = (0..self.numa.len())
            .max_by_key(|&n| {
                self.numa[n]
                    .budget_bytes
                    .saturating_sub(self.numa[n].used_bytes)
            })
            .unwrap_or(0);
        let n = &mut self.numa[node];
        n.used_bytes += bytes;
        n.holds.push(item);
        if n.used_bytes > n.budget_bytes {
            self.problems.push(format!(
                "host RAM: NUMA node {node} needs {} for non-expert weights but has {}",
                gb(n.used_bytes),
                gb(n.budget_bytes)
            ));
        }
    }

    /// Experts ordered hottest first; ties by expert id then layer (round-robin over layers).
    fn heat_order(&self, filter: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        let mut order: Vec<(usize, usize)> = (0..self.model.moe_layers.len())
            .filter(|&i| filter(self.model.moe_layers[i]))
            .flat_map(|i| (0..self.model.experts_per_layer).map(move |e| (i, e)))
            .collect();
        order.sort_by(|a, b| {
            self.heat[b.0][b.1]
                .total_cmp(&self.heat[a.0][a.1])
                .then(a.1.cmp(&b.1))
                .then(a.0.cmp(&b.0))
        });
        order
    }

    fn hybrid(&mut self) {
        let m = self.model;
        let n_gpu = self.profile.gpu.count;
        let per = m.num_layers.div_ceil(n_gpu);
        for g in 0..n_gpu {
            let layers = [
                (g * per).min(m.num_layers),
                ((g + 1) * per).min(m.num_layers),
            ];
            self.gpus.push(self.new_gpu(g, layers));
        }
        let kv_per_layer_token = m.kv_width as u64 * self.workload.kv_dtype.bytes();
        let tokens = self.workload.context * self.workload.concurrency;
        // Mandatory first: attention and KV of every layer; then shared/dense; then the ends.
        for g in 0..n_gpu {
            let [a, b] = self.gpus[g].layers;
            for l in a..b {
                let lb = &m.layers[l];
                let bytes = lb.attention + lb.norms + lb.router;
                self.place_gpu_or_spill(g, Item::in_layer(l, "attention+norms+router", bytes));
            }
            let kv = kv_per_layer_token * tokens * (b - a) as u64;
            let gpu = &mut self.gpus[g];
            if gpu.used_bytes + kv > gpu.budget_bytes {
                let short = gpu.used_bytes + kv - gpu.budget_bytes;
                self.problems.push(format!(
                    "GPU {g}: the latent KV cache for {tokens} tokens ({} x {} sequences) of layers {a}..{b} needs {}, {} more than is left",
                    self.workload.context, self.workload.concurrency, gb(kv), gb(short)
                ));
            }
            gpu.used_bytes += kv;
            gpu.kv_tokens = tokens;
            let what = format!("latent KV cache, layers {a}..{b}, {tokens} tokens");
            gpu.holds.push(Item::new(Holding::KvCache, what, kv));
            for l in a..b {
                let lb = m.layers[l].clone();
                self.place_gpu_or_spill(g, Item::in_layer(l, "shared experts", lb.shared_experts));
                self.place_gpu_or_spill(g, Item::in_layer(l, "dense MLP", lb.dense_mlp));
            }
        }
        let head = m.lm_head_bytes + m.final_norm_bytes;
        self.place_gpu_or_spill(
            n_gpu - 1,
            Item::new(Holding::Weights, "lm_head + final norm", head),
        );
        self.place_gpu_or_spill(0, Item::new(Holding::Weights, "embeddings", m.embed_bytes));
        for g in 0..n_gpu {
            let left = self.gpus[g]
                .budget_bytes
                .saturating_sub(self.gpus[g].used_bytes);
            self.gpus[g].kv_capacity_tokens = tokens
                + left
                    / (kv_per_layer_token
                        * (self.gpus[g].layers[1] - self.gpus[g].layers[0]).max(1) as u64);
        }
        // Hot experts: each GPU takes the hottest experts of its own layers.
        for g in 0..n_gpu {
            let [a, b] = self.gpus[g].layers;
            for (i, e) in self.heat_order(|l| l >= a && l < b) {
                let bytes = m.expert_bytes[i][e];
                let gpu = &mut self.gpus[g];
                if gpu.used_bytes + bytes <= gpu.budget_bytes {
                    gpu.used_bytes += bytes;
                    self.tiers[i][e] = Tier::Gpu(g);
                }
            }
        }
        self.experts_to_ram();
    }

    fn cpu_only(&mut self) {
        let m = self.model;
        for l in 0..m.num_layers {
            let lb = &m.layers[l];
            self.place_ram(Item::in_layer(
                l,
                "attention+norms+router+shared+dense",
                lb.total(),
            ));
        }
        self.place_ram(Item::new(
            Holding::Weights,
            "embeddings + lm_head + final norm",
            m.embed_bytes + m.lm_head_bytes + m.final_norm_bytes,
        ));
        let kv = kv_bytes_per_token(m, self.workload)
            * self.workload.context
            * self.workload.concurrency;
        let tokens = self.workload.context * self.workload.concurrency;
        let what = format!("latent KV cache, {tokens} tokens");
        self.place_ram(Item::new(Holding::KvCache, what, kv));
        self.experts_to_ram();
    }

    /// Experts not on a GPU: hottest into RAM while the NUMA budgets last, spread per
    /// layer over the nodes in proportion to their budgets; the rest to disk.
    fn experts_to_ram(&mut self) {
        let m = self.model;
        let mut free: Vec<u64> = self
            .numa
            .iter()
            .map(|n| n.budget_bytes.saturating_sub(n.used_bytes))
            .collect();
        let mut ram_left: u64 = free.iter().sum();
        let order: Vec<(usize, usize)> = self
            .heat_order(|_| true)
            .into_iter()
            .filter(|&(i, e)| !matches!(self.tiers[i][e], Tier::Gpu(_)))
            .collect();
        let mut in_ram = vec![Vec::new(); m.moe_layers.len()];
        for (i, e) in order {
            let bytes = m.expert_bytes[i][e];
            if bytes <= ram_left {
                ram_left -= bytes;
                in_ram[i].push(e);
            }
        }
        // Per layer, each node takes a contiguous block of ids sized by its share of the
        // RAM budget, so every node's threads work on every layer from local memory.
        let weights: Vec<f64> = self.numa.iter().map(|n| n.budget_bytes as f64).collect();
        let total_weight: f64 = weights.iter().sum::<f64>().max(1.0);
        for (i, experts) in in_ram.iter_mut().enumerate() {
            experts.sort_unstable();
            let targets = proportional_counts(experts.len(), &weights, total_weight);
            let mut node = 0;
            let mut taken = 0;
            for &e in experts.iter() {
                let bytes = m.expert_bytes[i][e];
                while node < self.numa.len() && (taken >= targets[node] || free[node] < bytes) {
                    node += 1;
                    taken = 0;
                }
                // Shares used up or rounded away: any node with room.
                let n = if node < self.numa.len() {
                    node
                } else {
                    match (0..self.numa.len()).find(|&n| free[n] >= bytes) {
                        Some(n) => n,
                        None => continue,
                    }
                };
                free[n] -= bytes;
                taken += 1;
                self.numa[n].used_bytes += bytes;
                self.tiers[i][e] = Tier::Numa(n);
            }
        }
    }

    /// All-GPU: experts expert-parallel, attention TP or DP (which is returned).
    fn all_gpu(&mut self) -> AttentionParallel {
        let m = self.model;
        let n = self.profile.gpu.count.max(1);
        let dp = match self.workload.attention {
            AttentionParallel::Tp => false,
            AttentionParallel::Dp => true,
            AttentionParallel::Auto => self.workload.concurrency >= n as u64,
        };
        self.attention_dp = dp;
        let per_gpu_experts = m.experts_per_layer.div_ceil(n);
        for g in 0..n {
            let mut gpu = self.new_gpu(g, [0, m.num_layers]);
            let attention: u64 = m.layers.iter().map(|l| l.attention).sum();
            let replicated: u64 = m.layers.iter().map(|l| l.attention_replicated).sum();
            let attn_bytes = if dp {
                attention
            } else {
                replicated + (attention - replicated).div_ceil(n as u64)
            };
            let norms_router: u64 = m.layers.iter().map(|l| l.norms + l.router).sum();
            let shared_dense: u64 = m
                .layers
                .iter()
                .map(|l| l.shared_experts + l.dense_mlp)
                .sum();
            let vocab_parallel =
                (m.embed_bytes + m.lm_head_bytes).div_ceil(n as u64) + m.final_norm_bytes;
            let mut expert_bytes = 0u64;
            for (i, layer_bytes) in m.expert_bytes.iter().enumerate() {
                for (e, &bytes) in layer_bytes
                    .iter()
                    .enumerate()
                    .skip(g * per_gpu_experts)
                    .take(per_gpu_experts)
                {
                    expert_bytes += bytes;
                    self.tiers[i][e] = Tier::Gpu(g);
                }
            }
            let attention = if dp {
                "attention (data-parallel, full copy)".to_string()
            } else {
                format!("attention (tensor-parallel, 1/{n} of heads)")
            };
            let items = [
                Item::new(Holding::Weights, attention, attn_bytes),
                Item::new(Holding::Weights, "norms + routers", norms_router),
                Item::new(
                    Holding::Weights,
                    "shared experts + dense MLP (replicated)",
                    shared_dense,
                ),
                Item::new(
                    Holding::Weights,
                    format!("embeddings + lm_head (1/{n} of vocabulary)"),
                    vocab_parallel,
                ),
                Item::new(
                    Holding::RoutedExperts,
                    format!("routed experts ({per_gpu_experts} per layer)"),
                    expert_bytes,
                ),
            ];
            for item in items {
                gpu.used_bytes += item.bytes;
                gpu.holds.push(item);
            }
            // KV: TP replicates every sequence's latents on every GPU; DP splits sequences.
            let kv_token = kv_bytes_per_token(m, self.workload);
            let seqs = if dp {
                self.workload.concurrency.div_ceil(n as u64)
            } else {
                self.workload.concurrency
            };
            let kv_tokens = seqs * self.workload.context;
            let kv = kv_token * kv_tokens;
            let left = gpu.budget_bytes.saturating_sub(gpu.used_bytes);
            gpu.kv_capacity_tokens = left / kv_token.max(1);
            if kv > left {
                self.problems.push(format!(
                    "GPU {g}: the latent KV cache for {kv_tokens} tokens needs {} but only {} is left after weights ({} short); lower --context or --concurrency{}",
                    gb(kv), gb(left), gb(kv - left), if dp { "" } else { ", or use data-parallel attention" }
                ));
            }
            gpu.used_bytes += kv;
            gpu.kv_tokens = kv_tokens;
            let what = format!("latent KV cache, {kv_tokens} tokens");
            gpu.holds.push(Item::new(Holding::KvCache, what, kv));
            if gpu.used_bytes > gpu.budget_bytes && kv <= left {
                self.problems.push(format!(
                    "GPU {g}: weights need {} but the budget is {}",
                    gb(gpu.used_bytes),
                    gb(gpu.budget_bytes)
                ));
            }
            self.gpus.push(gpu);
        }
        if dp {
            AttentionParallel::Dp
        } else {
            AttentionParallel::Tp
        }
    }

    fn finish(
        mut self,
        layout: Layout,
        attention: Option<AttentionParallel>,
        has_stats: bool,
    ) -> Plan {
        let m = self.model;
        let mut disk = DiskPlan {
            experts: BTreeMap::new(),
            expert_count: 0,
            bytes: 0,
            ram_shortfall_bytes: 0,
        };
        let mut per_layer = Vec::new();
        let mut sets: BTreeMap<Tier, ExpertSets> = BTreeMap::new();
        for (i, tiers) in self.tiers.iter().enumerate() {
            let layer = m.moe_layers[i];
            let mut counts = LayerTiers {
                layer,
                gpu: 0,
                cpu: 0,
                disk: 0,
            };
            for (e, &t) in tiers.iter().enumerate() {
                match t {
                    Tier::Gpu(_) => counts.gpu += 1,
                    Tier::Numa(_) => counts.cpu += 1,
                    Tier::Disk => {
                        counts.disk += 1;
                        disk.bytes += m.expert_bytes[i][e];
                    }
                }
                push_id(sets.entry(t).or_default().entry(layer).or_default(), e);
            }
            per_layer.push(counts);
        }
        for (tier, set) in sets {
            let count = set.values().flatten().map(|r| r[1] - r[0]).sum();
            match tier {
                Tier::Gpu(g) => {
                    let gpu = &mut self.gpus[g];
                    let bytes = set_bytes(m, &set);
                    if layout == Layout::Hybrid {
                        let what = format!("hot routed experts ({count})");
                        gpu.holds
                            .push(Item::new(Holding::RoutedExperts, what, bytes));
                    }
                    gpu.experts = set;
                    gpu.expert_count = count;
                }
                Tier::Numa(n) => {
                    let node = &mut self.numa[n];
                    let bytes = set_bytes(m, &set);
                    let what = format!("routed experts ({count})");
                    node.holds
                        .push(Item::new(Holding::RoutedExperts, what, bytes));
                    node.experts = set;
                    node.expert_count = count;
                }
                Tier::Disk => {
                    disk.experts = set;
                    disk.expert_count = count;
                }
            }
        }
        if disk.expert_count > 0 {
            disk.ram_shortfall_bytes = disk.bytes;
            self.warnings.push(format!(
                "host RAM is {} short: the {} coldest routed experts stay on disk and are read at {} GB/s when used",
                gb(disk.bytes), disk.expert_count, self.profile.disk.read_gbs
            ));
        }
        let on_disk_total = m.text_model_bytes() + m.vision_bytes + m.unused_bytes;
        let disk_capacity = (self.profile.disk.capacity_gib * GIB) as u64;
        if on_disk_total > disk_capacity {
            self.problems.push(format!(
                "disk: the checkpoint needs {} but the disk holds {} ({} short)",
                gb(on_disk_total),
                gb(disk_capacity),
                gb(on_disk_total - disk_capacity)
            ));
        }
        if layout == Layout::Cpu
            && !self
                .profile
                .host
                .isa
                .iter()
                .any(|i| i == "avx512" || i == "avx2")
        {
            self.warnings
                .push("no AVX2/AVX-512 in host.isa: CPU kernels fall back to scalar code".into());
        }
        if m.vision_bytes > 0 {
            self.warnings.push(format!(
                "vision tower ({}) is not placed: image input is not supported yet",
                gb(m.vision_bytes)
            ));
        }
        let estimate = estimate(&self, layout);
        let non_expert = m.text_model_bytes() - m.routed_expert_bytes();
        Plan {
            schema: SCHEMA.into(),
            profile: self.profile.name.clone(),
            layout: match layout {
                Layout::AllGpu => PlanLayout::AllGpu,
                Layout::Hybrid => PlanLayout::Hybrid,
                _ => PlanLayout::Cpu,
            },
            model: ModelSummary {
                name: m.name.clone(),
                layers: m.num_layers,
                moe_layers: m.moe_layers.len(),
                experts_per_layer: m.experts_per_layer,
                top_k: m.top_k,
                text_model_bytes: m.text_model_bytes(),
                routed_expert_bytes: m.routed_expert_bytes(),
                routed_expert_count: m.moe_layers.len() * m.experts_per_layer,
                non_expert_bytes: non_expert,
                vision_bytes: m.vision_bytes,
                unused_bytes: m.unused_bytes,
                kv_bytes_per_token: kv_bytes_per_token(m, self.workload),
            },
            workload: WorkloadSummary {
                context: self.workload.context,
                concurrency: self.workload.concurrency,
                kv_dtype: self.workload.kv_dtype,
                attention,
                stats: has_stats,
            },
            feasible: self.problems.is_empty(),
            gpus: self.gpus,
            numa: self.numa,
            disk,
            per_layer,
            estimate,
            problems: self.problems,
            warnings: self.warnings,
        }
    }
}

impl PartialOrd for Tier {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Tier {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |t: &Tier| match t {
            Tier::Gpu(g) => (0, *g),
            Tier::Numa(n) => (1, *n),
            Tier::Disk => (2, 0),
        };
        key(self).cmp(&key(other))
    }
}

/// Splits `count` items over weights by largest remainder (the counts add up to `count`).
fn proportional_counts(count: usize, weights: &[f64], total: f64) -> Vec<usize> {
    let exact: Vec<f64> = weights.iter().map(|w| count as f64 * w / total).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let assigned: usize = counts.iter().sum();
    for &k in order.iter().take(count.saturating_sub(assigned)) {
        counts[k] += 1;
    }
    counts
}

/// Bytes of the routed experts in `set`.
fn set_bytes(m: &ModelDesc, set: &ExpertSets) -> u64 {
    set.iter()
        .flat_map(|(l, ranges)| {
            ranges
                .iter()
                .flat_map(move |r| (r[0]..r[1]).map(move |e| (*l, e)))
        })
        .map(|(l, e)| m.moe_index(l).map_or(0, |i| m.expert_bytes[i][e]))
        .sum()
}

/// Appends expert id `e` (ids arrive in increasing order) to a list of ranges.
fn push_id(ranges: &mut Vec<[usize; 2]>, e: usize) {
    match ranges.last_mut() {
        Some(r) if r[1] == e => r[1] = e + 1,
        _ => ranges.push([e, e + 1]),
    }
}

/// Expected number of distinct experts touched when `tokens` tokens each visit an expert
/// with probability `p`: `1 - (1 - p)^tokens`, summed by the caller.
fn touched(p: f64, tokens: u64) -> f64 {
    1.0 - (1.0 - p.min(1.0)).powf(tokens as f64)
}

/// Roofline estimate.
///
/// Decode, one step of `c` sequences (one new token each), per MoE layer l:
///   t_l = t_attn(l) + max(t_gpu_experts(l), t_transfer + t_cpu(l) + t_disk(l))
/// where every term is bytes read / (bandwidth x efficiency): attention reads its weights
/// and the sequences' latent KV (c x context x 576 values) on the GPU; a tier reads each
/// expert it holds once per step if any of the c tokens visits it (expected count
/// `sum_e 1 - (1 - p_e)^c`); the CPU tier's bandwidth is the sum of its NUMA nodes'; the
/// hand-off moves c hidden states each way over PCIe plus a fixed latency. The shared
/// expert runs on the GPU while the CPU works. Dense layers and lm_head add their bytes
/// over the GPU bandwidth. tokens/s = c / sum_l t_l.
///
/// Prefill, per token at chunk size 2048: FLOPs (2 per parameter read, plus attention
/// over half the context) over throughput (GPU: bf16 peak x 0.5; CPU: the NUMA nodes'
/// `matmul_tflops`), plus each tier's expert bytes read once per chunk; GPU and CPU
/// times are added (no overlap assumed).
///
/// All-GPU: attention per GPU (TP: 1/N of the heads; DP: full weights, own sequences),
/// experts touched on the busiest GPU, plus two all-to-all exchanges per MoE layer.
fn handoff_bytes_per_token(b: &Builder, layout: Layout) -> u64 {
    if layout != Layout::Hybrid {
        return 0;
    }
    let host_layers = b
        .tiers
        .iter()
        .filter(|tiers| tiers.iter().any(|t| !matches!(t, Tier::Gpu(_))))
        .count() as u64;
    2 * b.model.hidden_size as u64 * 4 * host_layers
}

fn estimate(b: &Builder, layout: Layout) -> Estimate {
    let c = b.workload.concurrency;
    let one = decode_step(b, layout, 1);
    let many = decode_step(b, layout, c);
    let pre = prefill_token(b, layout);
    let total = |t: &TierTimes| t.gpu_s + t.cpu_s + t.disk_s + t.transfer_s;
    Estimate {
        decode_tokens_per_s_batch1: 1.0 / total(&one).max(1e-12),
        decode_step_batch1: one,
        concurrency: c,
        decode_tokens_per_s_aggregate: c as f64 / total(&many).max(1e-12),
        decode_step_aggregate: many,
        prefill_tokens_per_s: 1.0 / total(&pre).max(1e-12),
        prefill_per_token: pre,
        handoff_bytes_per_token: handoff_bytes_per_token(b, layout),
        formula: "decode: per MoE layer t = t_attn + max(t_gpu_experts, t_pcie + t_cpu + t_disk), each term bytes read / (bandwidth x efficiency; GPU 0.8, CPU 0.7); experts read once per step if any token visits them; prefill: FLOPs / throughput (GPU bf16 x 0.5, CPU matmul_tflops) + expert bytes once per 2048-token chunk, GPU and CPU times added".into(),
    }
}

struct Bandwidths {
    gpu: f64,
    cpu: f64,
    disk: f64,
    pcie: f64,
}

fn bandwidths(p: &Profile) -> Bandwidths {
    Bandwidths {
        gpu: p.gpu.memory_bandwidth_gbs * 1e9 * GPU_BW_EFFICIENCY,
        cpu: p
            .host
            .numa
            .iter()
            .map(|n| n.dram_bandwidth_gbs)
            .sum::<f64>()
            * 1e9
            * CPU_BW_EFFICIENCY,
        disk: p.disk.read_gbs * 1e9,
        pcie: p.gpu.pcie_gbs * 1e9,
    }
}

/// Expected bytes of routed experts touched per tier in MoE layer index i by `tokens` tokens.
fn touched_bytes(b: &Builder, i: usize, tokens: u64) -> (Vec<f64>, f64, f64) {
    let mut gpu = vec![0.0; b.gpus.len().max(1)];
    let (mut cpu, mut disk) = (0.0, 0.0);
    for (e, &t) in b.tiers[i].iter().enumerate() {
        let bytes = touched(b.heat[i][e], tokens) * b.model.expert_bytes[i][e] as f64;
        match t {
            Tier::Gpu(g) => gpu[g] += bytes,
            Tier::Numa(_) => cpu += bytes,
            Tier::Disk => disk += bytes,
        }
    }
    (gpu, cpu, disk)
}

fn decode_step(b: &Builder, layout: Layout, c: u64) -> TierTimes {
    let m = b.model;
    let bw = bandwidths(b.profile);
    let kv_layer =
        (m.kv_width as u64 * b.workload.kv_dtype.bytes() * b.workload.context * c) as f64;
    let mut t = TierTimes {
        gpu_s: 0.0,
        cpu_s: 0.0,
        disk_s: 0.0,
        transfer_s: 0.0,
    };
    let n = b.profile.gpu.count.max(1) as f64;
    for l in 0..m.num_layers {
        let lb = &m.layers[l];
        let attn_bytes = (lb.attention + lb.norms + lb.router) as f64;
        let dense_bytes = (lb.shared_experts + lb.dense_mlp) as f64;
        let moe = m.moe_index(l);
        match layout {
            Layout::Cpu => {
                t.cpu_s += (attn_bytes + dense_bytes + kv_layer) / bw.cpu;
                if let Some(i) = moe {
                    let (_, cpu, disk) = touched_bytes(b, i, c);
                    t.cpu_s += cpu / bw.cpu;
                    t.disk_s += disk / bw.disk;
                }
            }
            Layout::AllGpu => {
                let attn = if b.attention_dp {
                    attn_bytes + kv_layer / n
                } else {
                    (lb.attention_replicated as f64)
                        + (lb.attention - lb.attention_replicated) as f64 / n
                        + (lb.norms + lb.router) as f64
                        + kv_layer
                };
                t.gpu_s += (attn + dense_bytes) / bw.gpu;
                if let Some(i) = moe {
                    let (gpu, _, _) = touched_bytes(b, i, c);
                    let busiest = gpu.iter().cloned().fold(0.0, f64::max);
                    t.gpu_s += busiest / bw.gpu;
                    let a2a = 2.0 * (c as f64 * m.hidden_size as f64 * 2.0 * m.top_k as f64)
                        / (b.profile.gpu.interconnect_gbs.max(1.0) * 1e9);
                    t.transfer_s += 2.0 * ALL_TO_ALL_LATENCY_S + a2a;
                }
            }
            _ => {
                let gpu_of_layer = b
                    .gpus
                    .iter()
                    .position(|g| l >= g.layers[0] && l < g.layers[1])
                    .unwrap_or(0);
                t.gpu_s += (attn_bytes + kv_layer) / bw.gpu;
                match moe {
                    Some(i) => {
                        let (gpu, cpu, disk) = touched_bytes(b, i, c);
                        let gpu_side = (gpu[gpu_of_layer] + dense_bytes) / bw.gpu;
                        let handoff = if cpu + disk > 0.0 {
                            HANDOFF_LATENCY_S
                                + 2.0 * (c as f64 * m.hidden_size as f64 * 4.0) / bw.pcie
                        } else {
                            0.0
                        };
                        let cpu_side = handoff + cpu / bw.cpu + disk / bw.disk;
                        // Attribute the overlapped time to whichever side is longer.
                        if gpu_side >= cpu_side {
                            t.gpu_s += gpu_side;
                        } else {
                            t.transfer_s += handoff;
                            t.cpu_s += cpu / bw.cpu;
                            t.disk_s += disk / bw.disk;
                        }
                    }
                    None => t.gpu_s += dense_bytes / bw.gpu,
                }
            }
        }
    }
    let ends = (m.lm_head_bytes + m.final_norm_bytes) as f64;
    match layout {
        Layout::Cpu => t.cpu_s += ends / bw.cpu,
        Layout::AllGpu => t.gpu_s += ends / n / bw.gpu,
        _ => t.gpu_s += ends / bw.gpu,
    }
    t
}

fn prefill_token(b: &Builder, layout: Layout) -> TierTimes {
    let m = b.model;
    let bw = bandwidths(b.profile);
    let chunk = PREFILL_CHUNK as f64;
    let n = b.profile.gpu.count.max(1) as f64;
    let gpu_flops = b.profile.gpu.bf16_tflops
        * 1e12
        * GPU_FLOP_EFFICIENCY
        * if layout == Layout::AllGpu { n } else { 1.0 };
    let cpu_flops: f64 = b
        .profile
        .host
        .numa
        .iter()
        .map(|x| x.matmul_tflops)
        .sum::<f64>()
        * 1e12;
    let attn_flops = m.attention_flops_per_position as f64
        * (b.workload.context as f64 / 2.0)
        * m.num_layers as f64;
    let dense_flops = 2.0 * m.dense_params_per_token as f64 + attn_flops;
    let mut t = TierTimes {
        gpu_s: 0.0,
        cpu_s: 0.0,
        disk_s: 0.0,
        transfer_s: 0.0,
    };
    let (mut gpu_expert_p, mut cpu_expert_p, mut cpu_bytes, mut disk_bytes) = (0.0, 0.0, 0.0, 0.0);
    for (i, tiers) in b.tiers.iter().enumerate() {
        for (e, &tier) in tiers.iter().enumerate() {
            let p = b.heat[i][e];
            let bytes = m.expert_bytes[i][e] as f64;
            match tier {
                Tier::Gpu(_) => gpu_expert_p += p,
                Tier::Numa(_) => {
                    cpu_expert_p += p;
                    cpu_bytes += bytes;
                }
                Tier::Disk => {
                    cpu_expert_p += p;
                    disk_bytes += bytes;
                }
            }
        }
    }
    let expert_flops = 2.0 * m.expert_params as f64;
    match layout {
        Layout::Cpu => {
            t.cpu_s = (dense_flops + expert_flops * (gpu_expert_p + cpu_expert_p)) / cpu_flops
                + cpu_bytes / bw.cpu / chunk
        }
        _ => {
            t.gpu_s = (dense_flops + expert_flops * gpu_expert_p) / gpu_flops;
            t.cpu_s = expert_flops * cpu_expert_p / cpu_flops + cpu_bytes / bw.cpu / chunk;
            if layout == Layout::Hybrid && cpu_expert_p > 0.0 {
                t.transfer_s =
                    2.0 * m.hidden_size as f64 * 4.0 * m.moe_layers.len() as f64 / bw.pcie;
            }
        }
    }
    t.disk_s = disk_bytes / bw.disk / chunk;
    t
}
