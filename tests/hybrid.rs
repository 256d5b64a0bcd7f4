//! Hybrid execution on the simulated accelerator: every golden fixture runs with a plan
//! that puts some routed experts on the "GPU" and the rest in host RAM. The logits equal
//! the CPU-only run, and the bytes moved between host and device per token equal the
//! planner's figure.

mod common;

use common::{
    fixture, golden, half_on_gpu, hybrid_plan, max_abs_diff, prefill_and_three_steps, FIXTURES,
};
use kimi_hybrid::device::cpu::kernels::{by_name, CpuKernels};
use kimi_hybrid::device::cpu::CpuDevice;
use kimi_hybrid::forward::handoff::HandoffCounter;
use kimi_hybrid::forward::{on_cpu, Forward, Pass};
use kimi_hybrid::model::{AttentionForm, KvCache, Logits, Model};
use kimi_hybrid::placement::PlanLayout;
use kimi_hybrid::runtime::budget::{reserve_hybrid_share, BudgetError, DeviceBudget};
use kimi_hybrid::runtime::{assemble, GpuLayout, HostExperts};
use kimi_hybrid::weights::Checkpoint;
use std::sync::Arc;

/// Prefill and three decode steps: the logits, and how many tokens they cover.
fn run(model: &Model, backend: &dyn Forward, prompt: &[u32]) -> (Vec<f32>, usize) {
    (
        prefill_and_three_steps(model, backend, prompt),
        prompt.len() + 3,
    )
}

#[test]
fn hybrid_on_the_simulated_accelerator_matches_cpu_and_the_plan() {
    // Exact f32 kernels: the stand-in GPU attends in the absorbed form, the CPU device in
    // the naive one for prefill, and only f32 rounding may separate them.
    let cpu: Arc<dyn CpuKernels> = Arc::from(by_name("cpu-f32").expect("cpu backend"));
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        assert!(p.feasible, "{name}: {:?}", p.problems);
        assert_eq!(p.layout, PlanLayout::Hybrid);
        let (gpu_experts, host_experts) = p
            .per_layer
            .iter()
            .fold((0, 0), |(g, h), l| (g + l.gpu, h + l.cpu + l.disk));
        assert!(
            gpu_experts > 0 && host_experts > 0,
            "{name}: {gpu_experts} / {host_experts}"
        );

        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let (want, _) = run(&model, &on_cpu(cpu.clone()), &g.prompt_ids);

        let (on_gpu, on_host) = model.apply_plan(&p);
        assert_eq!(on_gpu, gpu_experts);
        assert_eq!(on_host, host_experts);
        // What the plan puts on the device fits its budget.
        let budget = DeviceBudget::new("sim-gpu0", p.gpus[0].budget_bytes);
        reserve_hybrid_share(&model, &p, &budget).expect("fits");
        assert!(budget.used_bytes() <= budget.budget_bytes());
        // The hybrid layout on a stand-in GPU, as `--simulate-gpus` builds it.
        let handoff = Arc::new(HandoffCounter::new());
        let host = HostExperts {
            plan: &p,
            kernels: cpu.clone(),
            handoff: handoff.clone(),
        };
        let stand_in = vec![Arc::new(CpuDevice::stand_in(cpu.clone()))];
        let hybrid = assemble(GpuLayout::Hybrid, &model, stand_in, Some(host)).expect("layout");
        let (got, tokens) = run(&model, &hybrid, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let moved = handoff.transfers().total();
        let per_token = moved / tokens as u64;
        println!(
            "{name}: {gpu_experts} experts on the device, {host_experts} on the host; max abs diff vs CPU {diff:.1e}; {per_token} B/token moved (plan: {})",
            p.estimate.handoff_bytes_per_token
        );
        assert!(diff <= 1e-4, "{name}: {diff}");
        assert_eq!(moved % tokens as u64, 0);
        assert_eq!(per_token, p.estimate.handoff_bytes_per_token, "{name}");
    }
}

/// The same hybrid plans on a real GPU (skipped with a message where none exists): the
/// CUDA backend computes the device's share, the exact f32 CPU backend the host experts.
/// The GPU sums in its own order, so logits are held to 2e-3 of the CPU-only run and to
/// transformers' golden. Also a hybrid plan pipelined over two GPUs.
#[test]
fn hybrid_on_a_real_gpu_matches_cpu_on_every_fixture() {
    use kimi_hybrid::device::cuda::CudaBackend;
    use kimi_hybrid::runtime::cuda::{hybrid_on_gpu, pipeline_on_gpus};
    let gpu = match CudaBackend::open(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            common::no_gpu("hybrid_on_a_real_gpu_matches_cpu_on_every_fixture", e);
            return;
        }
    };
    let second = Arc::new(
        CudaBackend::open(1)
            .or_else(|_| CudaBackend::open(0))
            .expect("a second context"),
    );
    let cpu: Arc<dyn CpuKernels> = Arc::from(by_name("cpu-f32").expect("cpu backend"));
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let (want, _) = run(&model, &on_cpu(cpu.clone()), &g.prompt_ids);
        model.apply_plan(&p);
        let hybrid = hybrid_on_gpu(&model, &p, gpu.clone(), cpu.clone()).expect("fits");
        let (got, _) = run(&model, &hybrid, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let prefill = got.len() - 3 * model.config.vocab_size;
        let vs_golden = max_abs_diff(&got[..prefill], &g.logits);
        // The same hybrid pipelined over two GPUs (each a range of layers), on GPU 1 and
        // GPU 0, or twice on GPU 0 where there is one.
        let mut model = Model::load(&ckpt).expect("model");
        let p2 = hybrid_plan(&ckpt, "2xRTX6000Pro+768GB");
        assert_eq!(
            (p2.layout, p2.gpus.len()),
            (PlanLayout::Hybrid, 2),
            "{name}"
        );
        model.apply_plan(&p2);
        let pipeline =
            pipeline_on_gpus(&model, &p2, vec![gpu.clone(), second.clone()], cpu.clone())
                .expect("fits");
        let (piped, _) = run(&model, &pipeline, &g.prompt_ids);
        let piped_diff = max_abs_diff(&piped, &want);
        println!(
            "{name} on {}: max abs diff vs CPU {diff:.1e}, vs golden {vs_golden:.1e}; pipelined over two {piped_diff:.1e}",
            gpu.gpu().name
        );
        assert!(diff <= 2e-3, "{name}: {diff}");
        assert!(vs_golden <= 2e-3, "{name}: {vs_golden}");
        assert!(piped_diff <= 2e-3, "{name}: pipelined {piped_diff}");
    }
}

#[test]
fn a_device_too_small_for_the_plan_is_an_error_naming_what_did_not_fit() {
    let ckpt = Checkpoint::open(&fixture("kimi-int4")).expect("fixture");
    let p = half_on_gpu(&ckpt);
    let mut model = Model::load(&ckpt).expect("model");
    model.apply_plan(&p);
    let device = DeviceBudget::new("tiny", 1000);
    match reserve_hybrid_share(&model, &p, &device) {
        Err(BudgetError::OutOfMemory { what, budget, .. }) => {
            assert_eq!(budget, 1000);
            assert!(!what.is_empty());
        }
        Ok(_) => panic!("a 1000-byte device cannot hold the plan"),
    }
}

/// Expert deferral's accuracy cost: prefill logits against transformers' golden and the
/// greedy continuation, with 0, 1 and 2 host experts per token deferred a layer, under the
/// half-on-GPU plan. Deferral off must leave the numbers exactly as they were.
#[test]
fn expert_deferral_accuracy_cost_on_every_fixture() {
    use kimi_hybrid::generate::{generate, GenerateRequest, SamplingConfig};
    // The hybrid layout on a stand-in GPU: the host experts are the ones deferred.
    let host: Arc<dyn CpuKernels> = Arc::from(by_name("cpu").expect("cpu backend"));
    let stand_in = Arc::new(CpuDevice::stand_in(host.clone()));
    let cpu: Box<dyn Forward> = Box::new(Pass::new(stand_in, Some(host), None));
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        let mut model = Model::load(&ckpt).expect("model");
        model.apply_plan(&p);
        let g = golden(name);
        let mut baseline = None;
        for defer in [0usize, 1, 2] {
            model.defer_host_experts = defer;
            let mut cache = KvCache::new(&model.config);
            let logits = cpu
                .forward(
                    &model,
                    &g.prompt_ids,
                    &mut cache,
                    AttentionForm::Naive,
                    Logits::All,
                )
                .expect("prefill");
            let diff = max_abs_diff(&logits, &g.logits);
            let out = generate(
                &model,
                cpu.as_ref(),
                &GenerateRequest {
                    prompt: &g.prompt_ids,
                    max_new_tokens: g.greedy_ids.len(),
                    sampling: SamplingConfig::greedy(),
                    stop_ids: &[],
                    keep_prompt_logits: false,
                },
            )
            .expect("generate");
            let same = out
                .generated_ids
                .iter()
                .zip(&g.greedy_ids)
                .take_while(|(a, b)| a == b)
                .count();
            println!(
                "{name}: defer {defer}: prefill logits max abs diff vs golden {diff:.3e}; greedy agrees on {same}/{}",
                g.greedy_ids.len()
            );
            assert!(logits.iter().all(|v| v.is_finite()));
            if defer == 0 {
                assert!(diff < 5e-3, "{name}: deferral off must match the golden");
                assert_eq!(out.generated_ids, g.greedy_ids);
                baseline = Some(logits);
            } else if let Some(b) = &baseline {
                assert!(
                    max_abs_diff(&logits, b) > 0.0,
                    "{name}: deferral changes the numbers"
                );
            }
        }
    }
}

/// Running out of GPU memory in the middle of a request (here the CUDA emulator's third
/// GPU, which `tests/cuda-emulator/test.sh` gives 2 MiB: the model fits, a 600-token
/// prompt's latents and attention scratch do not) fails that request with an error
/// naming the GPU, the operation and the reason (a `DeviceError` returned up the pass,
/// not a panic), and the engine goes on serving: the next request gets the
/// tokens the same request got before. Skipped with a message anywhere else.
#[test]
fn a_gpu_out_of_memory_mid_request_fails_the_request_not_the_engine() {
    use kimi_hybrid::device::cuda::CudaBackend;
    use kimi_hybrid::engine::kv::KvDtype;
    use kimi_hybrid::engine::{self, EngineConfig, Event};
    use kimi_hybrid::runtime::cuda::resident_on_gpu;
    let gpu = match CudaBackend::open(2) {
        Ok(g) if g.gpu().name.starts_with("CUDA emulator") && g.gpu().total_bytes < 8 << 20 => {
            Arc::new(g)
        }
        _ => {
            // Under test.sh (which sets the emulated devices) the small GPU must be there.
            assert!(
                std::env::var_os("KIMI_HYBRID_EMULATED_GPU_GIB").is_none(),
                "the CUDA emulator's third GPU should be a 2 MiB one"
            );
            eprintln!(
                "skipping a_gpu_out_of_memory_mid_request_fails_the_request_not_the_engine: \
                 needs the CUDA emulator's small third GPU (tests/cuda-emulator/test.sh)"
            );
            return;
        }
    };
    let name = "kimi-int4";
    let model = Model::load(&Checkpoint::open(&fixture(name)).expect("fixture")).expect("model");
    let backend = resident_on_gpu(&model, gpu).expect("the model fits");
    let config = EngineConfig {
        max_num_seqs: 4,
        max_waiting: 8,
        max_model_len: 1024,
        block_size: 16,
        kv_blocks: 80,
        max_batch_tokens: 1024,
        prefix_caching: true,
        kv_dtype: KvDtype::F32,
    };
    let tokenizer = kimi_hybrid::tokenizer::Tokenizer::from_dir(&fixture(name)).expect("tokenizer");
    let h = engine::start(model, Box::new(backend), Arc::new(tokenizer), config).expect("engine");
    let ask = |prompt: &[u32]| -> Result<Vec<u32>, String> {
        let (req, mut rx) = common::greedy(prompt, 4);
        h.submit(req).expect("submitted");
        let mut ids = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Finished { .. } => return Ok(ids),
                Event::Error(e) => return Err(e),
                Event::PromptLogprobs(_) => {}
            }
        }
        Err("the engine closed the request".into())
    };
    let short = golden(name).prompt_ids;
    let before = ask(&short).expect("a short prompt fits");
    let long: Vec<u32> = (0..600u32).map(|i| i % 1000 + 1).collect();
    let err = ask(&long).expect_err("a 600-token prompt cannot fit in 2 MiB");
    println!("600 tokens on a 2 MiB GPU: {err}");
    // The message names the device, what it was doing and why, and no panic unwound.
    assert!(err.contains("device failed"), "{err}");
    assert!(err.contains("GPU 2 (CUDA emulator"), "names the GPU: {err}");
    assert!(err.contains("failed during "), "names the operation: {err}");
    assert!(err.contains("out of memory"), "says why: {err}");
    assert_eq!(ask(&short).expect("the engine goes on"), before);
}
