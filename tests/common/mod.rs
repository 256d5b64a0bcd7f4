//! Shared helpers for the integration tests: fixture paths and golden files.
#![allow(dead_code)]

use kimi_hybrid::forward::Forward;
use std::path::PathBuf;
use std::sync::Arc;

/// The forward pass on the CPU alone with the kernels `backend` names (`cpu`,
/// `cpu-f32`, `reference`, ...).
pub fn cpu_pass(backend: &str) -> Box<dyn Forward> {
    let kernels = kimi_hybrid::device::cpu::kernels::by_name(backend).expect("cpu backend");
    Box::new(kimi_hybrid::forward::on_cpu(Arc::from(kernels)))
}

pub const FIXTURES: &[&str] = &[
    "kimi-bf16-yarn32",
    "kimi-int4",
    "deepseek-groups",
    "fp8-block",
    "kimi-k25-wrapper",
    "kimi-real-heads",
];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub struct Golden {
    pub prompt_ids: Vec<u32>,
    /// [prompt_len, vocab]
    pub logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
}

pub fn golden(name: &str) -> Golden {
    let bytes = std::fs::read(fixture(name).join("golden.safetensors")).expect("golden file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parses");
    let ids = |t: &str| -> Vec<u32> {
        st.tensor(t)
            .expect(t)
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    };
    let logits = st
        .tensor("logits")
        .expect("logits")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Golden {
        prompt_ids: ids("prompt_ids"),
        logits,
        greedy_ids: ids("greedy_ids"),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prefill logits at every prompt position, then the logits of three greedy decode steps.
pub fn prefill_and_three_steps(
    model: &kimi_hybrid::model::Model,
    pass: &dyn Forward,
    prompt: &[u32],
) -> Vec<f32> {
    use kimi_hybrid::model::{AttentionForm, KvCache, Logits};
    let mut cache = KvCache::new(&model.config);
    let mut all = pass
        .forward(model, prompt, &mut cache, AttentionForm::Auto, Logits::All)
        .expect("prefill");
    let vocab = model.config.vocab_size;
    let mut last = all[all.len() - vocab..].to_vec();
    for _ in 0..3 {
        let next = kimi_hybrid::engine::sampling::argmax(&last);
        last = pass
            .forward(
                model,
                &[next],
                &mut cache,
                AttentionForm::Auto,
                Logits::Last,
            )
            .expect("decode");
        all.extend_from_slice(&last);
    }
    all
}

const GIB: f64 = (1u64 << 30) as f64;

/// A one-GPU hybrid plan whose GPU holds the non-expert weights, the KV cache and about
/// half of the routed experts.
pub fn half_on_gpu(ckpt: &kimi_hybrid::weights::Checkpoint) -> kimi_hybrid::placement::Plan {
    hybrid_plan(ckpt, "1xH100+512GB")
}

/// A hybrid plan on `profile`'s GPUs, together sized for the non-expert weights, the KV
/// cache of one 64-token sequence and about half of the routed experts.
pub fn hybrid_plan(
    ckpt: &kimi_hybrid::weights::Checkpoint,
    profile: &str,
) -> kimi_hybrid::placement::Plan {
    use kimi_hybrid::placement::profile::Layout;
    use kimi_hybrid::placement::{plan, ModelDesc, Profile};
    let desc = ModelDesc::from_checkpoint(ckpt);
    let mut profile = Profile::resolve(profile).expect("profile");
    profile.layout = Layout::Hybrid;
    profile.reserves.gpu_context_gib = 0.0;
    profile.reserves.gpu_workspace_gib = 0.0;
    profile.workload.context = 64;
    profile.workload.concurrency = 1;
    let probe = plan(&desc, &profile, &profile.workload, None);
    let non_expert = probe.model.non_expert_bytes as f64;
    let kv = (probe.model.kv_bytes_per_token * 64) as f64;
    let experts = probe.model.routed_expert_bytes as f64;
    let gpus = profile.gpu.count.max(1) as f64;
    profile.gpu.memory_gib = (non_expert + kv + experts / 2.0) / gpus / GIB;
    plan(&desc, &profile, &profile.workload, None)
}

/// A greedy generation request for the engine, and the receiver of its events.
pub fn greedy(
    prompt: &[u32],
    max_tokens: usize,
) -> (
    kimi_hybrid::engine::GenRequest,
    tokio::sync::mpsc::UnboundedReceiver<kimi_hybrid::engine::Event>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (
        kimi_hybrid::engine::GenRequest {
            prompt: prompt.to_vec(),
            sampling: kimi_hybrid::engine::sampling::SamplingConfig {
                temperature: 0.0,
                ..kimi_hybrid::engine::sampling::SamplingConfig::default()
            },
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            skip_special_tokens: false,
            prompt_logprobs: None,
            forced: None,
            constraints: Vec::new(),
            client_backed_up: None,
            events: tx,
        },
        rx,
    )
}

/// A GPU test's way out when no device can be opened: a message and a skip, or, with
/// `KIMI_HYBRID_REQUIRE_GPU=1` (set where a device is expected: a GPU machine, or the CUDA
/// emulator's run in `tests/cuda-emulator/test.sh`), a failure saying why.
pub fn no_gpu(test: &str, why: impl std::fmt::Display) {
    if std::env::var_os("KIMI_HYBRID_REQUIRE_GPU").is_some_and(|v| v == "1") {
        panic!("{test} needs a GPU (KIMI_HYBRID_REQUIRE_GPU=1): {why}");
    }
    eprintln!("skipping {test}: {why}");
}
