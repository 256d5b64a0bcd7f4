//! The planner: golden plans for every shipped profile (bundled K2.6 INT4 config),
//! invariants on every plan, statistics-driven placement, checkpoint sizes, bad input.
//! Regenerate the golden plans with `UPDATE_GOLDENS=1 cargo test --test placement`.

mod common;

use common::{fixture, FIXTURES};
use kimi_hybrid::config::ModelConfig;
use kimi_hybrid::placement::planner::ExpertSets;
use kimi_hybrid::placement::profile::BUILTIN;
use kimi_hybrid::placement::PlanLayout;
use kimi_hybrid::placement::{plan, ExpertStats, ModelDesc, Plan, Profile};
use kimi_hybrid::weights::Checkpoint;
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;

fn k26() -> ModelDesc {
    ModelDesc::from_config(&ModelConfig::kimi_k26(), "Kimi K2.6 (bundled config, INT4)")
}

fn ids(sets: &ExpertSets) -> Vec<(usize, usize)> {
    sets.iter()
        .flat_map(|(l, rs)| {
            rs.iter()
                .flat_map(move |r| (r[0]..r[1]).map(move |e| (*l, e)))
        })
        .collect()
}

/// Invariants every plan must satisfy.
fn check_invariants(p: &Plan, m: &ModelDesc) {
    let ctx = format!(
        "{} (context {}, concurrency {})",
        p.profile, p.workload.context, p.workload.concurrency
    );
    // Every (layer, expert) exactly once.
    let mut seen = HashSet::new();
    let all = p
        .gpus
        .iter()
        .flat_map(|g| ids(&g.experts))
        .chain(p.numa.iter().flat_map(|n| ids(&n.experts)))
        .chain(ids(&p.disk.experts));
    for key in all {
        assert!(seen.insert(key), "{ctx}: expert {key:?} placed twice");
    }
    assert_eq!(
        seen.len(),
        m.moe_layers.len() * m.experts_per_layer,
        "{ctx}: every expert placed"
    );
    for (i, &l) in m.moe_layers.iter().enumerate() {
        let t = &p.per_layer[i];
        assert_eq!(t.layer, l);
        assert_eq!(
            t.gpu + t.cpu + t.disk,
            m.experts_per_layer,
            "{ctx}: layer {l} tier counts"
        );
    }
    // Budgets hold whenever the plan says it is feasible.
    if p.feasible {
        for g in &p.gpus {
            assert!(
                g.used_bytes <= g.budget_bytes,
                "{ctx}: GPU {} over budget",
                g.index
            );
            assert!(g.budget_bytes < g.capacity_bytes);
        }
        for n in &p.numa {
            assert!(
                n.used_bytes <= n.budget_bytes,
                "{ctx}: NUMA {} over budget",
                n.node
            );
        }
    }
    // Bytes: expert bytes per device agree with the expert sets.
    let expert_bytes = |sets: &ExpertSets| -> u64 {
        ids(sets)
            .iter()
            .map(|&(l, e)| m.expert_bytes[m.moe_index(l).unwrap()][e])
            .sum()
    };
    let placed_experts: u64 = p.gpus.iter().map(|g| expert_bytes(&g.experts)).sum::<u64>()
        + p.numa.iter().map(|n| expert_bytes(&n.experts)).sum::<u64>()
        + p.disk.bytes;
    assert_eq!(
        placed_experts,
        m.routed_expert_bytes(),
        "{ctx}: routed expert bytes"
    );
    assert_eq!(p.model.text_model_bytes, m.text_model_bytes());
    let holds_total = |holds: &[kimi_hybrid::placement::planner::Item]| -> u64 {
        holds
            .iter()
            .filter(|h| !h.what.starts_with("latent KV"))
            .map(|h| h.bytes)
            .sum()
    };
    if p.layout != PlanLayout::AllGpu {
        // Hybrid and CPU: every byte of the text model sits in exactly one place.
        let total: u64 = p.gpus.iter().map(|g| holds_total(&g.holds)).sum::<u64>()
            + p.numa.iter().map(|n| holds_total(&n.holds)).sum::<u64>()
            + p.disk.bytes;
        assert_eq!(
            total,
            m.text_model_bytes(),
            "{ctx}: placed bytes equal the text model"
        );
        for g in &p.gpus {
            let kv: u64 = g
                .holds
                .iter()
                .filter(|h| h.what.starts_with("latent KV"))
                .map(|h| h.bytes)
                .sum();
            assert_eq!(
                g.used_bytes,
                holds_total(&g.holds) + kv,
                "{ctx}: GPU {} used bytes",
                g.index
            );
        }
    } else {
        for g in &p.gpus {
            assert_eq!(
                g.used_bytes,
                g.holds.iter().map(|h| h.bytes).sum::<u64>(),
                "{ctx}: GPU {} used bytes",
                g.index
            );
        }
    }
    let e = &p.estimate;
    for v in [
        e.decode_tokens_per_s_batch1,
        e.decode_tokens_per_s_aggregate,
        e.prefill_tokens_per_s,
    ] {
        assert!(v.is_finite() && v > 0.0, "{ctx}: estimate {v}");
    }
    assert!(
        e.decode_tokens_per_s_aggregate >= e.decode_tokens_per_s_batch1 * 0.999,
        "{ctx}: batching never lowers throughput"
    );
}

/// JSON equality, numbers compared with a relative tolerance (libm may differ in the last bit).
fn same(a: &Value, b: &Value, path: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
                "{path}: {x} != {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: array length");
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                same(u, v, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            let kx: Vec<_> = x.keys().collect();
            let ky: Vec<_> = y.keys().collect();
            assert_eq!(kx, ky, "{path}: keys");
            for (k, v) in x {
                same(v, &y[k], &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

#[test]
fn golden_plans_for_every_shipped_profile() {
    let m = k26();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plans");
    let update = std::env::var_os("UPDATE_GOLDENS").is_some();
    for (name, _) in BUILTIN {
        let profile = Profile::resolve(name).unwrap();
        let p = plan(&m, &profile, &profile.workload, None);
        check_invariants(&p, &m);
        assert!(p.feasible, "{name}: {:?}", p.problems);
        let json = serde_json::to_value(&p).unwrap();
        let path = dir.join(format!("{name}.json"));
        if update {
            std::fs::write(&path, serde_json::to_string(&json).unwrap() + "\n").unwrap();
        }
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!("{} missing; run with UPDATE_GOLDENS=1", path.display())
            }))
            .unwrap();
        same(&json, &golden, name);
    }
}

/// Plans written before holdings had kinds (tests/fixtures/plans/before-kinds/: `what`
/// only, the layer inside its words) still load for `serve --plan`, and read back as
/// today's plan for the same profile: each holding's kind and layer recovered.
#[test]
fn plans_written_before_holdings_had_kinds_still_load() {
    use kimi_hybrid::placement::Holding;
    let m = k26();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plans/before-kinds");
    for name in ["1xH100+512GB", "b200x8", "cpu-only"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        assert!(!text.contains("\"kind\""), "{name}: written before kinds");
        let old: kimi_hybrid::placement::Plan = serde_json::from_str(&text).unwrap();
        let profile = Profile::resolve(name).unwrap();
        let now = plan(&m, &profile, &profile.workload, None);
        assert_eq!(
            (old.layout, &old.workload, &old.per_layer),
            (now.layout, &now.workload, &now.per_layer),
            "{name}"
        );
        let holds = |p: &kimi_hybrid::placement::Plan| -> Vec<kimi_hybrid::placement::Item> {
            let gpus = p.gpus.iter().flat_map(|g| g.holds.iter().cloned());
            gpus.chain(p.numa.iter().flat_map(|n| n.holds.iter().cloned()))
                .collect()
        };
        let (old_holds, now_holds) = (holds(&old), holds(&now));
        assert_eq!(old_holds.len(), now_holds.len(), "{name}");
        for (a, b) in old_holds.iter().zip(&now_holds) {
            assert_eq!(a, b, "{name}");
        }
        let kinds: Vec<Holding> = now_holds.iter().map(|i| i.kind).collect();
        for kind in [Holding::Weights, Holding::KvCache, Holding::RoutedExperts] {
            assert!(kinds.contains(&kind), "{name}: no {kind:?}");
        }
    }
}

#[test]
fn k26_sizes_and_layouts() {
    let m = k26();
    assert_eq!(m.routed_expert_bytes(), 570_761_994_240);
    let expect = [
        ("1xH100+512GB", PlanLayout::Hybrid),
        ("b200x8", PlanLayout::AllGpu),
        ("8xH200", PlanLayout::AllGpu),
        ("4xH100", PlanLayout::Hybrid),
        ("1x4090+384GB", PlanLayout::Hybrid),
        ("2xRTX6000Pro+768GB", PlanLayout::Hybrid),
        ("cpu-only", PlanLayout::Cpu),
    ];
    for (name, layout) in expect {
        let profile = Profile::resolve(name).unwrap();
        let p = plan(&m, &profile, &profile.workload, None);
        assert_eq!(p.layout, layout, "{name}");
    }
    let profile = Profile::resolve("b200x8").unwrap();
    let p = plan(&m, &profile, &profile.workload, None);
    for g in &p.gpus {
        assert_eq!(
            g.expert_count,
            48 * 60,
            "expert parallelism: 384 / 8 per layer"
        );
    }
    // Without statistics the GPU's experts are spread evenly over the layers.
    let profile = Profile::resolve("1xH100+512GB").unwrap();
    let p = plan(&m, &profile, &profile.workload, None);
    let counts: Vec<usize> = p.per_layer.iter().map(|t| t.gpu).collect();
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    // NUMA nodes share every layer's CPU experts.
    for (l, _) in p.numa[0].experts.iter() {
        assert!(
            p.numa[1].experts.contains_key(l),
            "layer {l} only on node 0"
        );
    }
}

#[test]
fn invariants_hold_across_workloads() {
    let m = k26();
    for (name, _) in BUILTIN {
        let profile = Profile::resolve(name).unwrap();
        for (context, concurrency) in [(1024, 1), (8192, 4), (65536, 2), (262144, 1), (131072, 16)]
        {
            let mut w = profile.workload.clone();
            w.context = context;
            w.concurrency = concurrency;
            check_invariants(&plan(&m, &profile, &w, None), &m);
        }
    }
}

fn skewed_stats(m: &ModelDesc) -> ExpertStats {
    // Expert e of every layer is visited in proportion to (e * 7919) % 384 + 1: a fixed,
    // non-monotonic order of hotness.
    let mut s = ExpertStats::new("synthetic", m.top_k);
    for &l in &m.moe_layers {
        let counts = (0..m.experts_per_layer)
            .map(|e| ((e * 7919) % m.experts_per_layer + 1) as u64 * 10)
            .collect();
        s.layers.insert(l.to_string(), counts);
    }
    s.tokens = 1_000_000;
    s
}

#[test]
fn statistics_put_hot_experts_on_gpu_and_cold_ones_on_disk() {
    let m = k26();
    let stats = skewed_stats(&m);
    let heat = |l: usize, e: usize| stats.layers[&l.to_string()][e];
    let profile = Profile::resolve("1x4090+384GB").unwrap();
    let p = plan(&m, &profile, &profile.workload, Some(&stats));
    check_invariants(&p, &m);
    assert!(p.workload.stats);
    assert!(p.disk.expert_count > 0 && p.gpus[0].expert_count > 0);
    let coolest_gpu = ids(&p.gpus[0].experts)
        .iter()
        .map(|&(l, e)| heat(l, e))
        .min()
        .unwrap();
    let hottest_ram = p
        .numa
        .iter()
        .flat_map(|n| ids(&n.experts))
        .map(|(l, e)| heat(l, e))
        .max()
        .unwrap();
    let coolest_ram = p
        .numa
        .iter()
        .flat_map(|n| ids(&n.experts))
        .map(|(l, e)| heat(l, e))
        .min()
        .unwrap();
    let hottest_disk = ids(&p.disk.experts)
        .iter()
        .map(|&(l, e)| heat(l, e))
        .max()
        .unwrap();
    assert!(
        coolest_gpu >= hottest_ram,
        "GPU holds the hottest: {coolest_gpu} < {hottest_ram}"
    );
    assert!(
        coolest_ram >= hottest_disk,
        "disk holds the coldest: {coolest_ram} < {hottest_disk}"
    );
    // Knowing the hot set makes decode faster than assuming uniform routing.
    let uniform = plan(&m, &profile, &profile.workload, None);
    assert!(p.estimate.decode_tokens_per_s_batch1 > uniform.estimate.decode_tokens_per_s_batch1);
}

#[test]
fn infeasible_inputs_are_plans_with_shortfalls() {
    let m = k26();
    let profile = Profile::resolve("b200x8").unwrap();
    let mut w = profile.workload.clone();
    w.context = 262144;
    w.concurrency = 1024;
    let p = plan(&m, &profile, &w, None);
    assert!(!p.feasible);
    assert!(
        p.problems
            .iter()
            .any(|x| x.contains("latent KV") && x.contains("short")),
        "{:?}",
        p.problems
    );

    let profile = Profile::resolve("1xH100+512GB").unwrap();
    let mut w = profile.workload.clone();
    w.context = 262144;
    w.concurrency = 8;
    let p = plan(&m, &profile, &w, None);
    assert!(
        !p.feasible && p.problems.iter().any(|x| x.contains("KV")),
        "{:?}",
        p.problems
    );

    let text = BUILTIN
        .iter()
        .find(|(n, _)| *n == "cpu-only")
        .unwrap()
        .1
        .replace("layout = \"cpu\"", "layout = \"all-gpu\"");
    let profile = Profile::from_toml(&text, "gpu-less.toml").unwrap();
    let p = plan(&m, &profile, &profile.workload, None);
    assert!(
        !p.feasible && p.problems.iter().any(|x| x.contains("needs GPUs")),
        "{:?}",
        p.problems
    );
    check_invariants(&p, &m);

    let text = BUILTIN
        .iter()
        .find(|(n, _)| *n == "1x4090+384GB")
        .unwrap()
        .1
        .replace("capacity_gib = 3800", "capacity_gib = 400");
    let profile = Profile::from_toml(&text, "small-disk.toml").unwrap();
    let p = plan(&m, &profile, &profile.workload, None);
    assert!(
        !p.feasible
            && p.problems
                .iter()
                .any(|x| x.starts_with("disk:") && x.contains("short")),
        "{:?}",
        p.problems
    );
}

#[test]
fn checkpoint_sizes_match_their_files() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let d = ModelDesc::from_checkpoint(&ckpt);
        // Tensor bytes = file bytes less each shard's 8-byte length and JSON header.
        let mut data_bytes = 0u64;
        for path in ckpt.shard_paths() {
            let bytes = std::fs::read(path).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            data_bytes += bytes.len() as u64 - 8 - header;
        }
        assert_eq!(
            d.text_model_bytes() + d.vision_bytes + d.unused_bytes,
            data_bytes,
            "{name}"
        );
        assert_eq!(d.unused_bytes, 0, "{name}");
        // The arithmetic from the config alone agrees with the headers (I64 weight_shape).
        if *name != "kimi-k25-wrapper" {
            let c = ModelDesc::from_config(&ckpt.config, name);
            assert_eq!(c.layers, d.layers, "{name}: per-layer bytes");
            assert_eq!(c.expert_bytes, d.expert_bytes, "{name}: expert bytes");
            assert_eq!(
                (c.embed_bytes, c.lm_head_bytes, c.final_norm_bytes),
                (d.embed_bytes, d.lm_head_bytes, d.final_norm_bytes),
                "{name}"
            );
        }
        let profile = Profile::resolve("1xH100+512GB").unwrap();
        let p = plan(&d, &profile, &profile.workload, None);
        check_invariants(&p, &d);
        assert_eq!(
            p.gpus[0].expert_count,
            d.moe_layers.len() * d.experts_per_layer,
            "{name}: a tiny model fits on the GPU"
        );
    }
}

#[test]
fn bad_statistics_name_the_field() {
    let m = k26();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("stats.json");
    let mut s = skewed_stats(&m);
    s.layers.get_mut("5").unwrap().pop();
    std::fs::write(&path, serde_json::to_string(&s).unwrap()).unwrap();
    let e = ExpertStats::load(&path)
        .unwrap()
        .validate(&m, "stats.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.5") && e.contains("383"), "{e}");
    let mut s = skewed_stats(&m);
    s.layers.insert("0".into(), vec![1; 384]);
    let e = s.validate(&m, "stats.json").unwrap_err().to_string();
    assert!(
        e.contains("layers.0") && e.contains("not a MoE layer"),
        "{e}"
    );
    std::fs::write(
        &path,
        "{\"format\": \"kimi-hybrid-expert-stats/1\",\n \"tokens\": \"many\"}",
    )
    .unwrap();
    let e = ExpertStats::load(&path).unwrap_err().to_string();
    assert!(e.contains("stats.json") && e.contains("line 2"), "{e}");
    std::fs::write(
        &path,
        r#"{"format": "other/9", "tokens": 1, "top_k": 8, "layers": {}}"#,
    )
    .unwrap();
    let e = ExpertStats::load(&path).unwrap_err().to_string();
    assert!(e.contains("format"), "{e}");
}
