//! The forward pass (`kimi_hybrid::forward`) on stand-in GPUs (CPU twins of the CUDA
//! device): every golden fixture, all-on-device and hybrid with half the experts in host
//! RAM, pipelined, data- and tensor-parallel, through a contiguous cache and through the
//! engine's paged cache with scattered block tables. The stand-ins compute with the exact
//! f32 CPU kernels, so they are held to the CPU device within the attention-form
//! tolerance (they attend in the absorbed form for prefill too, the CPU device in the
//! naive one) and to transformers' golden logits within the reference's 2e-3.

mod common;

use common::{
    fixture, golden, greedy, half_on_gpu, hybrid_plan, max_abs_diff, prefill_and_three_steps,
    FIXTURES,
};
use kimi_hybrid::device::cpu::kernels::{by_name, CpuKernels};
use kimi_hybrid::device::cpu::CpuDevice;
use kimi_hybrid::engine::kv::{KvDtype, KvPool, PagedBatch};
use kimi_hybrid::engine::sampling::argmax;
use kimi_hybrid::forward::handoff::HandoffCounter;
use kimi_hybrid::forward::{on_cpu, Forward, HeadSplit, Pass, VocabSplit};
use kimi_hybrid::model::{AttentionForm, BatchEntry, Logits, Model};
use kimi_hybrid::placement::PlanLayout;
use kimi_hybrid::weights::Checkpoint;
use std::sync::Arc;

/// Between attention forms and summation orders of the exact f32 kernels.
const FORM_TOLERANCE: f32 = 1e-4;
/// The same through a BF16 latent cache: two summation orders can leave a latent on either
/// side of a BF16 rounding boundary (one ulp, 2⁻⁸ relative), which moves logits by more
/// than the f32 differences themselves.
const BF16_FORM_TOLERANCE: f32 = 5e-4;
/// Against transformers.
const GOLDEN_TOLERANCE: f32 = 2e-3;

fn load(name: &str) -> Model {
    Model::load(&Checkpoint::open(&fixture(name)).expect("fixture")).expect("model")
}

fn exact() -> Arc<dyn CpuKernels> {
    Arc::from(by_name("cpu-f32").expect("cpu-f32 backend"))
}

/// The resident pass on the twin; `host` set makes it hybrid, counting hand-off bytes
/// on `accounting`.
fn resident(
    host: Option<Arc<dyn CpuKernels>>,
    accounting: Option<Arc<HandoffCounter>>,
) -> Pass<CpuDevice> {
    let twin = Arc::new(CpuDevice::stand_in(exact()));
    Pass::new(twin, host, accounting)
}

#[test]
fn stand_in_pass_matches_the_cpu_device_and_golden_on_every_fixture() {
    let cpu = exact();
    for name in FIXTURES {
        let model = load(name);
        let g = golden(name);
        let want = prefill_and_three_steps(&model, &on_cpu(cpu.clone()), &g.prompt_ids);
        let got = prefill_and_three_steps(&model, &resident(None, None), &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let prefill = got.len() - 3 * model.config.vocab_size;
        let vs_golden = max_abs_diff(&got[..prefill], &g.logits);
        println!("{name}: resident twin vs CPU device {diff:.1e}, vs golden {vs_golden:.1e}");
        assert!(diff <= FORM_TOLERANCE, "{name}: {diff}");
        assert!(vs_golden <= GOLDEN_TOLERANCE, "{name}: {vs_golden}");
        let vocab = model.config.vocab_size;
        for (a, b) in got.chunks(vocab).zip(want.chunks(vocab)) {
            assert_eq!(argmax(a), argmax(b), "{name}: greedy token differs");
        }
    }
}

#[test]
fn hybrid_resident_pass_matches_cpu_and_moves_the_planned_bytes() {
    let cpu = exact();
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let want = prefill_and_three_steps(&model, &on_cpu(cpu.clone()), &g.prompt_ids);
        let (on_gpu, on_host) = model.apply_plan(&p);
        assert!(on_gpu > 0 && on_host > 0, "{name}: {on_gpu} / {on_host}");
        let device = Arc::new(HandoffCounter::new());
        let backend = resident(Some(cpu.clone()), Some(device.clone()));
        let got = prefill_and_three_steps(&model, &backend, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let tokens = (g.prompt_ids.len() + 3) as u64;
        let moved = device.transfers().total();
        println!(
            "{name}: {on_gpu} experts on the device, {on_host} on the host; vs CPU {diff:.1e}; {} B/token handed off (plan: {})",
            moved / tokens,
            p.estimate.handoff_bytes_per_token
        );
        assert!(diff <= FORM_TOLERANCE, "{name}: {diff}");
        assert_eq!(moved % tokens, 0, "{name}");
        assert_eq!(moved / tokens, p.estimate.handoff_bytes_per_token, "{name}");
    }
}

/// Deferral of host experts to the next layer computes the same numbers on one stand-in
/// GPU as pipelined over two (the host worker's sums arrive at another device), and
/// changes them against no deferral.
#[test]
fn deferred_host_experts_agree_between_one_device_and_a_pipeline() {
    let cpu = exact();
    for name in ["kimi-int4", "deepseek-groups"] {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        let mut model = Model::load(&ckpt).expect("model");
        model.apply_plan(&p);
        let g = golden(name);
        let undeferred =
            prefill_and_three_steps(&model, &resident(Some(cpu.clone()), None), &g.prompt_ids);
        model.defer_host_experts = 2;
        let one =
            prefill_and_three_steps(&model, &resident(Some(cpu.clone()), None), &g.prompt_ids);
        let layers = model.layers.len();
        let halves: Vec<usize> = (0..layers).map(|l| usize::from(l >= layers / 2)).collect();
        let pipeline = Pass::pipeline(twins(2), halves, Some(cpu.clone()), None);
        let piped = prefill_and_three_steps(&model, &pipeline, &g.prompt_ids);
        let diff = max_abs_diff(&piped, &one);
        let moved = max_abs_diff(&one, &undeferred);
        println!(
            "{name}: deferral, pipelined vs one device {diff:.1e}; vs no deferral {moved:.1e}"
        );
        assert!(diff <= FORM_TOLERANCE, "{name}: {diff}");
        assert!(moved > 0.0, "{name}: deferral changes the numbers");
    }
}

/// Two sequences in one pass through the engine's paged cache (f32 and BF16 latents),
/// their blocks scattered over the pool, then one decode step each: the resident pass
/// against the CPU device on the same kind of pool, and the f32 runs against
/// each sequence run alone.
#[test]
fn paged_batches_read_the_blocks_their_tables_name() {
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = load(name);
    let g = golden(name);
    let a: Vec<u32> = g.prompt_ids.clone();
    let b: Vec<u32> = g.prompt_ids.iter().rev().copied().collect();
    let vocab = model.config.vocab_size;
    let mut resident_f32: Vec<Vec<f32>> = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let want = paged_pair(&model, &on_cpu(cpu.clone()), &a, &b, dtype);
        let got = paged_pair(&model, &resident(None, None), &a, &b, dtype);
        if dtype == KvDtype::Bf16 {
            // The BF16 pool really rounds: its logits move off the f32 ones.
            let moved = max_abs_diff(&got[2], &resident_f32[2]);
            assert!(
                moved > 10.0 * FORM_TOLERANCE,
                "bf16 latents not rounded: {moved}"
            );
        }
        let tolerance = match dtype {
            KvDtype::Bf16 => BF16_FORM_TOLERANCE,
            _ => FORM_TOLERANCE,
        };
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            let diff = max_abs_diff(x, y);
            println!("paged {dtype:?}: output {i} resident vs CPU device {diff:.1e}");
            assert!(diff <= tolerance, "{dtype:?} output {i}: {diff}");
        }
        if dtype == KvDtype::F32 {
            // Alone: every prompt position, then three decode steps.
            for (prompt, prefill, step) in [(&a, &got[0], &got[2]), (&b, &got[1], &got[3])] {
                let alone = prefill_and_three_steps(&model, &on_cpu(cpu.clone()), prompt);
                let at = alone.len() - 4 * vocab;
                assert!(max_abs_diff(prefill, &alone[at..at + vocab]) <= FORM_TOLERANCE);
                assert!(max_abs_diff(step, &alone[at + vocab..at + 2 * vocab]) <= FORM_TOLERANCE);
            }
            resident_f32 = got;
        }
    }
}

/// Prefill of `a` and `b` together in a paged pool with scattered tables, then one
/// greedy step each: [prefill a, prefill b, step a, step b] last-position logits.
fn paged_pair(
    model: &Model,
    backend: &dyn Forward,
    a: &[u32],
    b: &[u32],
    dtype: KvDtype,
) -> Vec<Vec<f32>> {
    let block = 4;
    let mut pool = KvPool::with_dtype(64, block, dtype);
    let blocks =
        |n: usize, first: u32| -> Vec<u32> { (0..n as u32).map(|i| first + 3 * i).collect() };
    let (table_a, table_b) = (
        blocks(a.len() / block + 2, 17),
        blocks(b.len() / block + 2, 1),
    );
    let mut store = PagedBatch {
        pool: &mut pool,
        tables: vec![&table_a, &table_b],
    };
    let entry = |tokens, start| BatchEntry {
        tokens,
        start,
        logits: Some(Logits::Last),
    };
    let prefill = last_logits(model, backend, &[entry(a, 0), entry(b, 0)], &mut store);
    let (na, nb) = ([argmax(&prefill[0])], [argmax(&prefill[1])]);
    let step = last_logits(
        model,
        backend,
        &[entry(&na, a.len()), entry(&nb, b.len())],
        &mut store,
    );
    prefill.into_iter().chain(step).collect()
}

/// One forward pass; every entry's logits (each asks for its last position's).
fn last_logits(
    model: &Model,
    backend: &dyn Forward,
    batch: &[BatchEntry],
    store: &mut PagedBatch,
) -> Vec<Vec<f32>> {
    backend
        .forward_batch(model, batch, store, AttentionForm::Auto, &mut |_, _| {})
        .expect("forward")
        .into_iter()
        .map(|l| l.expect("logits"))
        .collect()
}

/// `n` stand-in devices, each a twin with its own log.
fn twins(n: usize) -> Vec<Arc<CpuDevice>> {
    (0..n)
        .map(|_| Arc::new(CpuDevice::stand_in(exact())))
        .collect()
}

/// `n` stand-in devices that record (see `CpuDevice::recording`).
fn recording_twins(n: usize) -> Vec<Arc<CpuDevice>> {
    (0..n)
        .map(|_| Arc::new(CpuDevice::recording(exact())))
        .collect()
}

/// The b200x8 plan (all-GPU, data-parallel attention, or tensor-parallel when
/// `tensor_parallel`) applied to a fixture's model.
fn on_b200x8(name: &str, tensor_parallel: bool) -> (Model, kimi_hybrid::placement::Plan) {
    use kimi_hybrid::placement::profile::AttentionParallel;
    use kimi_hybrid::placement::{plan, ModelDesc, Profile};
    let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
    let profile = Profile::resolve("b200x8").expect("profile");
    let mut workload = profile.workload.clone();
    if tensor_parallel {
        workload.attention = AttentionParallel::Tp;
    }
    let p = plan(
        &ModelDesc::from_checkpoint(&ckpt),
        &profile,
        &workload,
        None,
    );
    assert!(p.feasible, "{name}: {:?}", p.problems);
    assert_eq!(p.layout, PlanLayout::AllGpu);
    let want = if tensor_parallel {
        AttentionParallel::Tp
    } else {
        AttentionParallel::Dp
    };
    assert_eq!(p.workload.attention, Some(want));
    let mut model = Model::load(&ckpt).expect("model");
    model.apply_plan(&p);
    (model, p)
}

/// Checks that every routed expert a stand-in device computed is one the plan gave it
/// (the plan's GPU modulo the devices there are); returns how many devices computed
/// experts.
fn experts_on_their_devices(name: &str, model: &Model, devices: &[Arc<CpuDevice>]) -> usize {
    let mut computed = 0;
    for (index, d) in devices.iter().enumerate() {
        let log = d.log();
        computed += usize::from(!log.experts.is_empty());
        for &(l, e) in &log.experts {
            let placed = match &model.layers[l].ffn {
                kimi_hybrid::model::Ffn::Moe(m) => m.experts[e].gpu,
                kimi_hybrid::model::Ffn::Dense(_) => None,
            };
            assert_eq!(
                placed.map(|g| g % devices.len()),
                Some(index),
                "{name}: expert ({l}, {e}) ran off its device"
            );
        }
    }
    computed
}

/// Three prompts of a golden fixture's: its own, reversed, and its first half.
fn three_prompts(name: &str) -> Vec<Vec<u32>> {
    let g = golden(name);
    vec![
        g.prompt_ids.clone(),
        g.prompt_ids.iter().rev().copied().collect(),
        g.prompt_ids[..g.prompt_ids.len() / 2].to_vec(),
    ]
}

/// Prefills `prompts` together and decodes two greedy steps, each sequence's blocks
/// `tables`; per sequence, the last logits of each of the three passes.
fn prefill_and_two_steps(
    model: &Model,
    backend: &dyn Forward,
    prompts: &[Vec<u32>],
    store: &mut PagedBatch,
) -> Vec<Vec<Vec<f32>>> {
    let mut last: Vec<Vec<f32>> = Vec::new();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    for step in 0..3 {
        let next: Vec<[u32; 1]> = last.iter().map(|l| [argmax(l)]).collect();
        let batch: Vec<BatchEntry> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| BatchEntry {
                tokens: if step == 0 { prompt } else { &next[i] },
                start: if step == 0 {
                    0
                } else {
                    prompt.len() + step - 1
                },
                logits: Some(Logits::Last),
            })
            .collect();
        last = last_logits(model, backend, &batch, store);
        for (i, l) in last.iter().enumerate() {
            got[i].push(l.clone());
        }
    }
    got
}

/// The largest difference between each sequence's logits from
/// [`prefill_and_two_steps`] and the same sequence alone on the exact CPU path.
fn worst_vs_alone(model: &Model, prompts: &[Vec<u32>], got: &[Vec<Vec<f32>>]) -> f32 {
    let vocab = model.config.vocab_size;
    let cpu = exact();
    let mut worst = 0.0f32;
    for (prompt, got) in prompts.iter().zip(got) {
        let alone = prefill_and_three_steps(model, &on_cpu(cpu.clone()), prompt);
        let at = alone.len() - 4 * vocab;
        for (k, l) in got.iter().enumerate() {
            worst = worst.max(max_abs_diff(
                l,
                &alone[at + k * vocab..at + (k + 1) * vocab],
            ));
        }
    }
    worst
}

/// Data-parallel attention and expert-parallel experts over eight stand-in devices:
/// three sequences through a pool split into one partition per device (each sequence's
/// blocks in one), prefilled together and decoded for two steps, against each sequence
/// alone on one device. Every device's experts are the ones the plan gave it, and the
/// sequences' attention ran on different devices. Again on devices that record (CUDA
/// graphs' fixed-buffer decode schedule): each attended device's decode steps went
/// through `replay`, every layer once per step.
#[test]
fn data_parallel_pass_over_eight_devices_matches_one_device_on_every_fixture() {
    for (name, recording) in FIXTURES.iter().flat_map(|n| [(*n, false), (*n, true)]) {
        let (model, p) = on_b200x8(name, false);
        let prompts = three_prompts(name);
        let devices = match recording {
            false => twins(p.gpus.len()),
            true => recording_twins(p.gpus.len()),
        };
        // The lm_head split by vocabulary, as the plan budgets it.
        let vocab = VocabSplit::new(&model.lm_head, devices.len()).expect("bands");
        let whole = Pass::on_devices(devices.clone()).with_vocab_split(vocab);
        let backend = whole;
        assert_eq!(backend.devices(), 8);
        let cfg = &model.config;
        let block = 4;
        let mut pool = KvPool::new(8 * 24, block);
        assert!(pool.set_partitions(8));
        // Sequences in partitions 5, 2 and 7.
        let tables: Vec<Vec<u32>> = prompts
            .iter()
            .zip([5usize, 2, 7])
            .map(|(prompt, part)| {
                (0..prompt.len() / block + 2)
                    .map(|_| pool.allocate_in(part).expect("block"))
                    .collect()
            })
            .collect();
        let mut store = PagedBatch {
            pool: &mut pool,
            tables: tables.iter().map(Vec::as_slice).collect(),
        };
        let got = prefill_and_two_steps(&model, &backend, &prompts, &mut store);
        let worst = worst_vs_alone(&model, &prompts, &got);
        let attended = devices.iter().filter(|d| d.log().queries > 0).count();
        let computed = experts_on_their_devices(name, &model, &devices);
        println!(
            "{name}: 3 sequences over 8 devices (attention on {attended}, experts on {computed}); vs alone {worst:.1e}"
        );
        assert_eq!(attended, 3, "{name}");
        assert!(computed > 1, "{name}");
        assert!(worst <= FORM_TOLERANCE, "{name}: {worst}");
        for d in devices.iter().filter(|d| d.log().queries > 0) {
            let replays = d.log().replays.len();
            let want = if recording {
                2 * cfg.num_hidden_layers
            } else {
                0
            };
            assert_eq!(replays, want, "{name}: recording {recording}");
        }
    }
}

/// Tensor-parallel attention and expert-parallel experts over stand-in devices: three
/// sequences in one pool with scattered blocks, prefilled together and decoded for two
/// steps, against each sequence alone on one device. Every head of every query is
/// computed exactly once, split over min(devices, heads) devices; every device's experts
/// are the ones the plan gave it. Eight devices (the b200x8 plan) and three (heads that
/// do not divide evenly); the FP8 fixture's head cuts fall off its scale blocks and are
/// decoded to F32, with the same values.
#[test]
fn tensor_parallel_pass_matches_one_device_on_every_fixture() {
    for name in FIXTURES {
        let (model, p) = on_b200x8(name, true);
        let prompts = three_prompts(name);
        let heads = model.config.num_attention_heads;
        // Eight devices again as devices that record (each attending device's heads of a
        // decode step through `replay`).
        for (n, recording) in [(p.gpus.len(), false), (3, false), (2, false), (8, true)] {
            let devices = match recording {
                false => twins(n),
                true => recording_twins(n),
            };
            let split = HeadSplit::new(&model, n).expect("head cuts");
            let whole = Pass::tensor_parallel(devices.clone(), split);
            let backend = whole;
            assert_eq!(backend.devices(), 1, "latents on every device");
            let cfg = &model.config;
            let block = 4;
            let mut pool = KvPool::new(64, block);
            // Interleaved blocks, so every table is scattered.
            let mut tables: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
            for k in 0..prompts
                .iter()
                .map(|p| p.len() / block + 2)
                .max()
                .unwrap_or(0)
            {
                for (i, prompt) in prompts.iter().enumerate() {
                    if k < prompt.len() / block + 2 {
                        tables[i].push(pool.allocate().expect("block"));
                    }
                }
            }
            let mut store = PagedBatch {
                pool: &mut pool,
                tables: tables.iter().map(Vec::as_slice).collect(),
            };
            let got = prefill_and_two_steps(&model, &backend, &prompts, &mut store);
            let worst = worst_vs_alone(&model, &prompts, &got);
            let queries: usize = prompts.iter().map(|p| p.len() + 2).sum();
            let logs: Vec<_> = devices.iter().map(|d| d.log()).collect();
            let attended = logs.iter().filter(|l| l.queries > 0).count();
            let head_queries: usize = logs.iter().map(|l| l.query_heads).sum();
            let computed = experts_on_their_devices(name, &model, &devices);
            println!(
                "{name}: {heads} heads over {n} devices (attention on {attended}, experts on {computed}); vs alone {worst:.1e}"
            );
            assert_eq!(attended, n.min(heads), "{name}");
            assert_eq!(
                head_queries,
                queries * heads * cfg.num_hidden_layers,
                "{name}: every head of every query once per layer"
            );
            assert!(computed > 1, "{name}");
            assert!(worst <= FORM_TOLERANCE, "{name}: {worst}");
            for (d, log) in logs.iter().enumerate() {
                let want = if recording && log.queries > 0 {
                    2 * cfg.num_hidden_layers
                } else {
                    0
                };
                assert_eq!(log.replays.len(), want, "{name}: device {d} of {n}");
            }
        }
    }
}

/// The same paged batches on a real GPU (skipped with a message where none exists): the
/// CUDA backend's resident pass over scattered f32 and BF16 pools, against the exact
/// CPU deviceeration path on the same kind of pool, within the GPU's 2e-3.
#[test]
fn paged_batches_on_a_real_gpu_read_the_blocks_their_tables_name() {
    use kimi_hybrid::device::cuda::CudaBackend;
    let gpu = match CudaBackend::open(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            common::no_gpu(
                "paged_batches_on_a_real_gpu_read_the_blocks_their_tables_name",
                e,
            );
            return;
        }
    };
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = load(name);
    let g = golden(name);
    let a: Vec<u32> = g.prompt_ids.clone();
    let b: Vec<u32> = g.prompt_ids.iter().rev().copied().collect();
    let backend = Pass::new(gpu, None, None);
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let want = paged_pair(&model, &on_cpu(cpu.clone()), &a, &b, dtype);
        let got = paged_pair(&model, &backend, &a, &b, dtype);
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            let diff = max_abs_diff(x, y);
            println!("paged {dtype:?} on a GPU: output {i} vs CPU device {diff:.1e}");
            assert!(diff <= 2e-3, "{dtype:?} output {i}: {diff}");
        }
    }
}

/// The engine over a data-parallel pass on three stand-in devices: its pool splits into
/// three partitions, concurrent requests land on different devices, and every request
/// generates the tokens the one-device engine generates.
#[test]
fn engine_over_three_devices_generates_what_one_device_does() {
    use kimi_hybrid::engine::{self, EngineConfig, Event};
    use kimi_hybrid::tokenizer::Tokenizer;
    let name = "kimi-int4";
    let g = golden(name);
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|k| {
            let mut p = g.prompt_ids.clone();
            p.rotate_left(k * 3);
            p
        })
        .collect();
    let generate = |backend: Box<dyn Forward>, model: Model| -> (Vec<Vec<u32>>, usize) {
        let config = EngineConfig {
            max_num_seqs: 8,
            max_waiting: 16,
            max_model_len: 256,
            block_size: 16,
            kv_blocks: 48,
            max_batch_tokens: 512,
            prefix_caching: true,
            kv_dtype: KvDtype::Bf16,
        };
        let tokenizer = Tokenizer::from_dir(&fixture(name)).expect("tokenizer");
        let h = engine::start(model, backend, Arc::new(tokenizer), config).expect("engine");
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (req, rx) = greedy(p, 6);
                h.submit(req).expect("submitted");
                rx
            })
            .collect();
        let ids = receivers
            .into_iter()
            .map(|mut rx| {
                let mut ids = Vec::new();
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { id, .. } => ids.push(id),
                        Event::Finished { .. } => break,
                        Event::Error(e) => panic!("engine error: {e}"),
                        Event::PromptLogprobs(_) => {}
                    }
                }
                ids
            })
            .collect();
        (
            ids,
            h.stats
                .kv_blocks_total
                .load(std::sync::atomic::Ordering::SeqCst),
        )
    };
    let (model, _) = on_b200x8(name, false);
    let (want, _) = generate(Box::new(on_cpu(exact())), model);
    let devices = twins(3);
    let backend = Pass::on_devices(devices.clone());
    let (model, _) = on_b200x8(name, false);
    let (got, blocks) = generate(Box::new(backend), model);
    let attended = devices.iter().filter(|d| d.log().queries > 0).count();
    println!("engine over 3 devices: attention on {attended}; {got:?}");
    assert_eq!(blocks, 48);
    assert!(attended >= 2, "requests did not spread over the devices");
    assert_eq!(got, want);
}

/// Layer-pipelined hybrid over two stand-in GPUs: logits equal the CPU-only run, each
/// device ran attention and the experts of its own layers only, and the host hand-off
/// moves the planner's bytes per token.
#[test]
fn pipelined_hybrid_over_two_devices_matches_cpu_and_the_plan() {
    let cpu = exact();
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = hybrid_plan(&ckpt, "2xRTX6000Pro+768GB");
        assert!(p.feasible, "{name}: {:?}", p.problems);
        assert_eq!((p.layout, p.gpus.len()), (PlanLayout::Hybrid, 2), "{name}");
        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let want = prefill_and_three_steps(&model, &on_cpu(cpu.clone()), &g.prompt_ids);
        let (on_gpu, on_host) = model.apply_plan(&p);
        let layer_devices = kimi_hybrid::forward::layer_devices(&p, model.layers.len());
        let devices = twins(2);
        let sim = Arc::new(HandoffCounter::new());
        let backend = Pass::pipeline(
            devices.clone(),
            layer_devices.clone(),
            Some(cpu.clone()),
            Some(sim.clone()),
        );
        let got = prefill_and_three_steps(&model, &backend, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let tokens = (g.prompt_ids.len() + 3) as u64;
        let moved = sim.transfers().total();
        for (index, d) in devices.iter().enumerate() {
            let log = d.log();
            assert!(log.queries > 0, "{name}: device {index} ran no attention");
            for &(l, _) in &log.experts {
                assert_eq!(
                    layer_devices[l], index,
                    "{name}: layer {l}'s expert ran off its device"
                );
            }
        }
        println!(
            "{name}: layers {:?} over 2 devices, {on_gpu} experts on them, {on_host} on the host; vs CPU {diff:.1e}; {} B/token handed off (plan: {})",
            p.gpus.iter().map(|g| g.layers).collect::<Vec<_>>(),
            moved / tokens,
            p.estimate.handoff_bytes_per_token
        );
        assert!(diff <= FORM_TOLERANCE, "{name}: {diff}");
        assert_eq!(moved / tokens, p.estimate.handoff_bytes_per_token, "{name}");
        assert_eq!(moved % tokens, 0, "{name}");
    }
}

/// Chunked prefill and mixed batches: one sequence's prompt fed in chunks of three (each
/// chunk's queries attend to the earlier chunks' latents and causally within the chunk,
/// every position's logits asked for) while another sequence decodes in the same passes;
/// every logit row against the CPU device on the same store.
#[test]
fn chunked_prefill_beside_decoding_matches_the_cpu_device() {
    let cpu = exact();
    for name in ["kimi-real-heads", "deepseek-groups"] {
        let model = load(name);
        let g = golden(name);
        let long = g.prompt_ids.clone();
        let short: Vec<u32> = g.prompt_ids.iter().rev().take(3).copied().collect();
        let run = |backend: &dyn Forward| -> Vec<Vec<f32>> {
            let mut pool = KvPool::new(32, 4);
            let table_a: Vec<u32> = (0..8).map(|i| 31 - i).collect();
            let table_b: Vec<u32> = (0..8).map(|i| 2 * i).collect();
            let mut store = PagedBatch {
                pool: &mut pool,
                tables: vec![&table_a, &table_b],
            };
            let mut rows = Vec::new();
            // The short prompt first, alone.
            let first = [BatchEntry {
                tokens: &short,
                start: 0,
                logits: Some(Logits::Last),
            }];
            let mut store_b = PagedBatch {
                pool: store.pool,
                tables: vec![&table_b],
            };
            let mut last = last_logits(&model, backend, &first, &mut store_b).remove(0);
            store.pool = store_b.pool;
            for (pos, (i, chunk)) in (short.len()..).zip(long.chunks(3).enumerate()) {
                let next = [argmax(&last)];
                let batch = [
                    BatchEntry {
                        tokens: chunk,
                        start: i * 3,
                        logits: Some(Logits::All),
                    },
                    BatchEntry {
                        tokens: &next,
                        start: pos,
                        logits: Some(Logits::Last),
                    },
                ];
                let out = last_logits(&model, backend, &batch, &mut store);
                last = out[1].clone();
                rows.extend(out);
            }
            rows
        };
        let want = run(&on_cpu(cpu.clone()));
        let got = run(&resident(None, None));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0f32, f32::max);
        println!("{name}: chunked prefill beside decoding, resident vs CPU device {worst:.1e}");
        assert!(worst <= FORM_TOLERANCE, "{name}: {worst}");
    }
}

/// Three prompts prefilled together in a paged pool (4-token blocks, scattered tables),
/// then `steps` decode steps with fixed next tokens (teacher-forced, so every backend
/// sees the same inputs): all three sequences decode together, then the last one stops
/// half way, so the step's token count changes, the tables widen past several powers of
/// two and the pools grow. Every step's logits, in order.
fn decode_steps(
    model: &Model,
    backend: &dyn Forward,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Vec<f32>> {
    let cfg = &model.config;
    let block = 4;
    let seqs = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + steps;
    let per_seq = longest / block + 1;
    let mut pool = KvPool::with_dtype(seqs * per_seq + 1, block, KvDtype::F32);
    // Sequence i's j-th block is block i + seqs * j (interleaved, never contiguous).
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|i| (0..per_seq).map(|j| (i + seqs * j) as u32).collect())
        .collect();
    let vocab = cfg.vocab_size as u32;
    let forced = |seq: usize, step: usize| (7 + 31 * seq as u32 + 13 * step as u32) % vocab;
    fn entry(tokens: &[u32], start: usize) -> BatchEntry<'_> {
        BatchEntry {
            tokens,
            start,
            logits: Some(Logits::Last),
        }
    }
    let mut out = Vec::new();
    {
        let mut store = PagedBatch {
            pool: &mut pool,
            tables: tables.iter().map(Vec::as_slice).collect(),
        };
        let batch: Vec<BatchEntry> = prompts.iter().map(|p| entry(p, 0)).collect();
        out.extend(last_logits(model, backend, &batch, &mut store));
    }
    for step in 0..steps {
        let active = if step < steps / 2 { seqs } else { seqs - 1 };
        let tokens: Vec<[u32; 1]> = (0..active).map(|s| [forced(s, step)]).collect();
        let mut store = PagedBatch {
            pool: &mut pool,
            tables: tables[..active].iter().map(Vec::as_slice).collect(),
        };
        let batch: Vec<BatchEntry> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| entry(t.as_slice(), prompts[s].len() + step))
            .collect();
        out.extend(last_logits(model, backend, &batch, &mut store));
    }
    out
}

/// Decode steps on a device that records (the pass's fixed-buffer schedule for CUDA
/// graphs, run on the twin): each layer's attention block of every decode step goes
/// through `replay`, keyed by its fixed buffers and the pools' generation, and the logits
/// equal the CPU device's at every step, while the token count changes, tables
/// widen and the pools grow.
#[test]
fn recorded_decode_steps_match_the_cpu_device() {
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = load(name);
    let prompts = three_prompts(name);
    let steps = 24;
    let want = decode_steps(&model, &on_cpu(cpu.clone()), &prompts, steps);
    let twin = Arc::new(CpuDevice::recording(cpu.clone()));
    let backend = Pass::new(twin.clone(), None, None);
    let got = decode_steps(&model, &backend, &prompts, steps);
    for (i, (x, y)) in got.iter().zip(&want).enumerate() {
        let diff = max_abs_diff(x, y);
        assert!(
            diff <= FORM_TOLERANCE,
            "output {i}: recorded vs CPU device {diff}"
        );
    }
    let replays = twin.log().replays;
    let layers = model.config.num_hidden_layers;
    // Every decode step, every layer; prefill is not recorded.
    assert_eq!(replays.len(), steps * layers);
    let ios: std::collections::BTreeSet<u64> = replays.iter().map(|k| k.io).collect();
    let generations: std::collections::BTreeSet<u64> =
        replays.iter().map(|k| k.generation).collect();
    println!(
        "{} replays over {} sets of fixed buffers and {} pool generations",
        replays.len(),
        ios.len(),
        generations.len()
    );
    // Three then two tokens, tables widening past powers of two: several buffer sets.
    assert!(ios.len() >= 3, "{ios:?}");
    assert!(generations.len() >= 2, "{generations:?}");
    for step in replays.chunks(layers) {
        let steps: Vec<usize> = step.iter().map(|k| k.step).collect();
        assert_eq!(steps, (0..layers).collect::<Vec<_>>());
    }
}

/// The same decode steps on a real GPU (skipped with a message where none exists): with
/// CUDA graphs (the default) each layer's recordable block (attention, post-attention
/// norm, dense MLP or shared expert, router logits) is recorded on its second decode step
/// and replayed after, all-GPU and hybrid with half the experts in host RAM, and the
/// logits equal the kernel-by-kernel run's and, within the GPU's 2e-3, the exact
/// CPU deviceeration path's.
#[test]
fn decode_steps_replayed_as_cuda_graphs_match_kernel_by_kernel() {
    use kimi_hybrid::device::cuda::CudaBackend;
    let open = || match CudaBackend::open(0) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            common::no_gpu(
                "decode_steps_replayed_as_cuda_graphs_match_kernel_by_kernel",
                e,
            );
            None
        }
    };
    let (Some(graphs), Some(eager)) = (open(), open()) else {
        return;
    };
    eager.set_recording(false);
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = load(name);
    let prompts = three_prompts(name);
    let steps = 24;
    let want = decode_steps(&model, &on_cpu(cpu.clone()), &prompts, steps);
    let by_kernel = decode_steps(
        &model,
        &Pass::new(eager.clone(), None, None),
        &prompts,
        steps,
    );
    let replayed = decode_steps(
        &model,
        &Pass::new(graphs.clone(), None, None),
        &prompts,
        steps,
    );
    let stats = graphs.graph_stats();
    println!("{stats:?}");
    let layers = model.config.num_hidden_layers as u64;
    assert!(stats.recorded >= layers, "{stats:?}");
    assert!(stats.replayed > 2 * stats.recorded, "{stats:?}");
    assert_eq!(eager.graph_stats(), Default::default());
    replays_match("all-GPU", &replayed, &by_kernel, &want);
    // Hybrid, half the experts in host RAM: the recorded blocks feed the hand-off.
    use kimi_hybrid::runtime::cuda::hybrid_on_gpu;
    let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
    let p = half_on_gpu(&ckpt);
    let mut model = Model::load(&ckpt).expect("model");
    model.apply_plan(&p);
    let before = graphs.graph_stats();
    let hybrid = |gpu: &Arc<CudaBackend>| hybrid_on_gpu(&model, &p, gpu.clone(), cpu.clone());
    let by_kernel = decode_steps(&model, &hybrid(&eager).expect("fits"), &prompts, steps);
    let replayed = decode_steps(&model, &hybrid(&graphs).expect("fits"), &prompts, steps);
    let stats = graphs.graph_stats();
    println!("hybrid: {stats:?}");
    assert!(stats.replayed > before.replayed + 2 * layers, "{stats:?}");
    replays_match("hybrid", &replayed, &by_kernel, &want);
}

/// Every step's logits with CUDA graphs equal the kernel-by-kernel run's (within the
/// attention-form tolerance) and the exact CPU run's (within the GPU's 2e-3).
fn replays_match(what: &str, replayed: &[Vec<f32>], by_kernel: &[Vec<f32>], cpu: &[Vec<f32>]) {
    assert_eq!(replayed.len(), cpu.len(), "{what}");
    for (i, ((r, k), w)) in replayed.iter().zip(by_kernel).zip(cpu).enumerate() {
        let (vs_kernels, vs_cpu) = (max_abs_diff(r, k), max_abs_diff(r, w));
        assert!(
            vs_kernels <= FORM_TOLERANCE,
            "{what} {i}: graphs vs kernels {vs_kernels}"
        );
        assert!(vs_cpu <= 2e-3, "{what} {i}: graphs vs cpu {vs_cpu}");
    }
}

/// Every shipped profile's plan on stand-in GPUs, as `--simulate-gpus` builds it
/// (`runtime::place` and `Placement::forward`), on every golden fixture: prefill and three
/// greedy steps against the CPU device with the same exact kernels, and the prefill
/// against transformers. The CPU alone (`cpu-f32`) and the scalar reference are held to
/// transformers too. Prints each fixture and layout's largest difference.
#[test]
fn every_shipped_profile_on_stand_in_gpus_matches_the_cpu_on_every_fixture() {
    use kimi_hybrid::placement::profile::BUILTIN;
    use kimi_hybrid::runtime::place;
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let g = golden(name);
        let model = Model::load(&ckpt).expect("model");
        let vocab = model.config.vocab_size;
        let prefill = |all: &[f32]| all[..all.len() - 3 * vocab].to_vec();
        let want = prefill_and_three_steps(&model, &on_cpu(exact()), &g.prompt_ids);
        let reference = common::cpu_pass("reference");
        let by_reference = prefill_and_three_steps(&model, reference.as_ref(), &g.prompt_ids);
        let mut line = format!(
            "{name}: cpu-f32 vs transformers {:.1e}; reference vs transformers {:.1e}",
            max_abs_diff(&prefill(&want), &g.logits),
            max_abs_diff(&prefill(&by_reference), &g.logits)
        );
        assert!(max_abs_diff(&prefill(&want), &g.logits) <= GOLDEN_TOLERANCE);
        assert!(max_abs_diff(&prefill(&by_reference), &g.logits) <= GOLDEN_TOLERANCE);
        for (profile, _) in BUILTIN.iter().filter(|(p, _)| *p != "cpu-only") {
            let mut model = Model::load(&ckpt).expect("model");
            let placement = place(&ckpt, &mut model, Some(profile), None, true).expect("plan");
            let pass = placement.forward(&model, "cpu-f32").expect("layout");
            let got = prefill_and_three_steps(&model, pass.as_ref(), &g.prompt_ids);
            let vs_cpu = max_abs_diff(&got, &want);
            let vs_golden = max_abs_diff(&prefill(&got), &g.logits);
            line += &format!("; {profile} {vs_cpu:.1e} ({vs_golden:.1e})");
            assert!(vs_cpu <= FORM_TOLERANCE, "{name} on {profile}: {vs_cpu}");
            assert!(
                vs_golden <= GOLDEN_TOLERANCE,
                "{name} on {profile}: {vs_golden}"
            );
        }
        println!("{line}");
    }
}
