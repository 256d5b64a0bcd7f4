//! Human-readable plan output, `--detail`, and `--emit vllm|sglang`.
//!
//! JSON schema `kimi-hybrid-plan/1` (`plan --json`), all sizes in bytes:
//! - `schema`, `profile`, `layout` ("hybrid" | "all-gpu" | "cpu"), `feasible`,
//!   `problems` (each with its exact shortfall), `warnings`
//! - `model`: `name`, `layers`, `moe_layers`, `experts_per_layer`, `top_k`,
//!   `text_model_bytes`, `routed_expert_bytes`, `routed_expert_count`, `non_expert_bytes`,
//!   `vision_bytes`, `unused_bytes`, `kv_bytes_per_token`
//! - `workload`: `context`, `concurrency`, `kv_dtype`, `attention` ("tp" | "dp" | null),
//!   `stats` (whether expert statistics were used)
//! - `gpus[]`: `index`, `name`, `capacity_bytes`, `budget_bytes`, `layers` ([first, end)),
//!   `holds[]` (`kind`: "weights" | "kv-cache" | "routed-experts", `layer` for per-layer
//!   weights, `what`, `bytes`), `kv_tokens`, `kv_capacity_tokens`, `experts`
//!   (MoE layer -> list of [start, end) expert-id ranges), `expert_count`, `used_bytes`
//! - `numa[]`: `node`, `capacity_bytes`, `budget_bytes`, `holds[]`, `experts`,
//!   `expert_count`, `used_bytes`
//! - `disk`: `experts`, `expert_count`, `bytes`, `ram_shortfall_bytes`
//! - `per_layer[]`: `layer`, `gpu`, `cpu`, `disk` (routed expert counts per tier)
//! - `estimate`: `decode_tokens_per_s_batch1`, `decode_step_batch1`, `concurrency`,
//!   `decode_tokens_per_s_aggregate`, `decode_step_aggregate`, `prefill_tokens_per_s`,
//!   `prefill_per_token` (each step as seconds per tier: `gpu_s`, `cpu_s`, `disk_s`,
//!   `transfer_s`), `formula`

use super::planner::{ExpertSets, Item, Plan, PlanLayout, TierTimes};
use super::profile::AttentionParallel;
use std::collections::BTreeMap;
use std::fmt::Write;

fn gb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / 1e9)
}

/// Groups per-layer items ("shared experts" of each layer) into one line per kind.
fn grouped(holds: &[Item]) -> Vec<(String, u64)> {
    let mut order: Vec<String> = Vec::new();
    let mut sums: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for item in holds {
        let key = match item.layer {
            Some(_) => format!("{} (# layers)", item.what),
            None => item.what.clone(),
        };
        if !sums.contains_key(&key) {
            order.push(key.clone());
        }
        let e = sums.entry(key).or_default();
        e.0 += 1;
        e.1 += item.bytes;
    }
    order
        .into_iter()
        .map(|k| {
            let (n, bytes) = sums[&k];
            (k.replace("(# layers)", &format!("({n} layers)")), bytes)
        })
        .collect()
}

fn share(t: &TierTimes) -> String {
    let total = t.gpu_s + t.cpu_s + t.disk_s + t.transfer_s;
    if total <= 0.0 {
        return String::new();
    }
    let mut parts = Vec::new();
    for (name, v) in [
        ("GPU", t.gpu_s),
        ("CPU", t.cpu_s),
        ("disk", t.disk_s),
        ("transfer", t.transfer_s),
    ] {
        if v > 0.0 {
            parts.push(format!("{name} {:.0}%", v / total * 100.0));
        }
    }
    parts.join(", ")
}

fn ranges(r: &[[usize; 2]]) -> String {
    r.iter()
        .map(|[a, b]| {
            if b - a == 1 {
                a.to_string()
            } else {
                format!("{a}-{}", b - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The default text output.
pub fn render(plan: &Plan, detail: bool) -> String {
    let mut s = String::new();
    let m = &plan.model;
    let _ = writeln!(
        s,
        "plan for {} on {} ({} layout){}",
        m.name,
        plan.profile,
        plan.layout,
        if plan.feasible {
            ""
        } else {
            "  ** INFEASIBLE **"
        }
    );
    let expert_each = if m.routed_expert_count > 0 {
        m.routed_expert_bytes as f64 / m.routed_expert_count as f64 / 1e6
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "model: {} layers ({} MoE x {} experts, top {}); text model {} GB = routed experts {} GB ({} x {:.2} MB) + other {} GB",
        m.layers, m.moe_layers, m.experts_per_layer, m.top_k, gb(m.text_model_bytes), gb(m.routed_expert_bytes), m.routed_expert_count, expert_each, gb(m.non_expert_bytes)
    );
    let w = &plan.workload;
    let _ = writeln!(
        s,
        "workload: context {} x {} sequence(s), latent KV {:.1} KB/token ({}){}{}",
        w.context,
        w.concurrency,
        m.kv_bytes_per_token as f64 / 1e3,
        w.kv_dtype,
        w.attention
            .as_ref()
            .map(|a| format!(
                ", attention {}",
                if *a == AttentionParallel::Dp {
                    "data-parallel"
                } else {
                    "tensor-parallel"
                }
            ))
            .unwrap_or_default(),
        if w.stats {
            ", experts ranked by measured frequency"
        } else {
            ", experts uniform (no statistics)"
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<26} {:<52} {:>9}  share", "device", "holds", "GB");
    let mut device = |name: String, holds: &[Item], used: u64, budget: u64, capacity: u64| {
        let items = grouped(holds);
        for (i, (what, bytes)) in items.iter().enumerate() {
            let label = if i == 0 { name.as_str() } else { "" };
            let _ = writeln!(s, "{label:<26} {what:<52} {:>9}", gb(*bytes));
        }
        let _ = writeln!(
            s,
            "{:<26} {:<52} {:>9}  {:.0}% of {} GB budget ({} GB installed)",
            if items.is_empty() { name.as_str() } else { "" },
            "total",
            gb(used),
            used as f64 / budget.max(1) as f64 * 100.0,
            gb(budget),
            gb(capacity)
        );
    };
    for g in &plan.gpus {
        device(
            format!("GPU {} {}", g.index, g.name),
            &g.holds,
            g.used_bytes,
            g.budget_bytes,
            g.capacity_bytes,
        );
    }
    for n in &plan.numa {
        device(
            format!("NUMA node {}", n.node),
            &n.holds,
            n.used_bytes,
            n.budget_bytes,
            n.capacity_bytes,
        );
    }
    if plan.disk.expert_count > 0 {
        let _ = writeln!(
            s,
            "{:<26} {:<52} {:>9}",
            "disk (paged on use)",
            format!("cold routed experts ({})", plan.disk.expert_count),
            gb(plan.disk.bytes)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "routed experts per layer (GPU / CPU / disk):");
    let mut i = 0;
    while i < plan.per_layer.len() {
        let cur = &plan.per_layer[i];
        let mut j = i;
        while j + 1 < plan.per_layer.len()
            && (
                plan.per_layer[j + 1].gpu,
                plan.per_layer[j + 1].cpu,
                plan.per_layer[j + 1].disk,
            ) == (cur.gpu, cur.cpu, cur.disk)
        {
            j += 1;
        }
        let layers = if i == j {
            format!("layer {}", cur.layer)
        } else {
            format!("layers {}-{}", cur.layer, plan.per_layer[j].layer)
        };
        let _ = writeln!(s, "  {layers:<16} {} / {} / {}", cur.gpu, cur.cpu, cur.disk);
        i = j + 1;
    }
    let e = &plan.estimate;
    let _ = writeln!(s);
    let _ = writeln!(s, "estimate (roofline):");
    let _ = writeln!(
        s,
        "  decode, 1 sequence:   {:>9.1} tokens/s   ({})",
        e.decode_tokens_per_s_batch1,
        share(&e.decode_step_batch1)
    );
    if e.concurrency > 1 {
        let _ = writeln!(
            s,
            "  decode, {:>3} sequences: {:>8.1} tokens/s total ({})",
            e.concurrency,
            e.decode_tokens_per_s_aggregate,
            share(&e.decode_step_aggregate)
        );
    }
    let _ = writeln!(
        s,
        "  prefill:              {:>9.1} tokens/s   ({})",
        e.prefill_tokens_per_s,
        share(&e.prefill_per_token)
    );
    if let Some(g) = plan.gpus.first() {
        if plan.layout == PlanLayout::Hybrid {
            let _ = writeln!(s, "  latent KV: {} tokens reserved per GPU; up to {} if the GPU held no routed experts", g.kv_tokens, g.kv_capacity_tokens);
        } else {
            let _ = writeln!(
                s,
                "  latent KV: {} tokens per GPU for the workload; room for {} after the weights",
                g.kv_tokens, g.kv_capacity_tokens
            );
        }
    }
    for p in &plan.problems {
        let _ = writeln!(s, "problem: {p}");
    }
    for w in &plan.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    if detail {
        let _ = writeln!(s);
        let _ = writeln!(s, "expert ids per tier:");
        let mut list = |tier: String, sets: &ExpertSets| {
            for (layer, r) in sets {
                let _ = writeln!(s, "  {tier:<12} layer {layer:<3} {}", ranges(r));
            }
        };
        for g in &plan.gpus {
            list(format!("GPU {}", g.index), &g.experts);
        }
        for n in &plan.numa {
            list(format!("NUMA {}", n.node), &n.experts);
        }
        list("disk".into(), &plan.disk.experts);
    }
    s
}

/// Why a plan has no equivalent launch command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    #[error("--emit is for all-GPU plans; this plan's layout is {0}")]
    NotAllGpu(PlanLayout),
    #[error("--emit takes vllm or sglang, not {0:?}")]
    UnknownEngine(String),
}

/// The equivalent vLLM or SGLang launch command for an all-GPU plan.
pub fn emit(plan: &Plan, engine: &str, model_path: &str) -> Result<String, EmitError> {
    if plan.layout != PlanLayout::AllGpu {
        return Err(EmitError::NotAllGpu(plan.layout));
    }
    let n = plan.gpus.len();
    let dp = plan.workload.attention == Some(AttentionParallel::Dp);
    let (ctx, seqs) = (plan.workload.context, plan.workload.concurrency);
    match engine {
        "vllm" => {
            let parallel = if dp {
                format!("--data-parallel-size {n} --tensor-parallel-size 1")
            } else {
                format!("--tensor-parallel-size {n}")
            };
            Ok(format!(
                "vllm serve {model_path} {parallel} --enable-expert-parallel --max-model-len {ctx} --max-num-seqs {seqs} --trust-remote-code --tool-call-parser kimi_k2 --reasoning-parser kimi_k2 --enable-auto-tool-choice"
            ))
        }
        "sglang" => {
            let dp_flags = if dp {
                format!(" --enable-dp-attention --dp {n}")
            } else {
                String::new()
            };
            Ok(format!(
                "python -m sglang.launch_server --model-path {model_path} --tp {n} --ep {n}{dp_flags} --context-length {ctx} --max-running-requests {seqs} --trust-remote-code --tool-call-parser kimi_k2 --reasoning-parser kimi_k2"
            ))
        }
        other => Err(EmitError::UnknownEngine(other.to_string())),
    }
}
