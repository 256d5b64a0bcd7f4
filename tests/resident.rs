//! The device-resident forward pass (`kimi_hybrid::resident`) on its CPU twin: every
//! golden fixture, all-on-device and hybrid with half the experts in host RAM, through
//! a contiguous cache and through the engine's paged cache with scattered block tables.
//! The twin computes with the exact f32 CPU kernels, so it is held to the per-operation
//! path within the attention-form tolerance (it attends in the absorbed form for prefill
//! too) and to transformers' golden logits within the reference's 2e-3.

mod common;

use common::{fixture, golden, half_on_gpu, max_abs_diff, prefill_and_three_steps, FIXTURES};
use kimi_hybrid::accel::hybrid::HybridBackend;
use kimi_hybrid::accel::sim::SimDevice;
use kimi_hybrid::accel::Accelerator;
use kimi_hybrid::backend::{by_name, Backend};
use kimi_hybrid::engine::kv::{KvDtype, KvPool, PagedBatch};
use kimi_hybrid::generate::argmax;
use kimi_hybrid::model::{AttentionForm, BatchEntry, Logits, Model};
use kimi_hybrid::resident::twin::TwinOps;
use kimi_hybrid::resident::{Resident, ResidentBackend};
use kimi_hybrid::weights::Checkpoint;
use std::sync::Arc;

/// Between attention forms and summation orders of the exact f32 kernels.
const FORM_TOLERANCE: f32 = 1e-4;
/// Against transformers.
const GOLDEN_TOLERANCE: f32 = 2e-3;

fn exact() -> Arc<dyn Backend> {
    Arc::from(by_name("cpu-f32").expect("cpu-f32 backend"))
}

/// The resident pass on the twin; `host` set makes it hybrid, counting hand-off bytes
/// on `accounting`.
fn resident(
    host: Option<Arc<dyn Backend>>,
    accounting: Option<Arc<dyn Accelerator>>,
) -> ResidentBackend {
    let cpu = exact();
    let twin = Arc::new(TwinOps::new(cpu.clone()));
    ResidentBackend::new(cpu, Box::new(Resident::new(twin, host, accounting)))
}

#[test]
fn resident_pass_matches_the_per_operation_path_and_golden_on_every_fixture() {
    let cpu = exact();
    for name in FIXTURES {
        let model =
            Model::load(&Checkpoint::open(&fixture(name)).expect("fixture")).expect("model");
        let g = golden(name);
        let want = prefill_and_three_steps(&model, cpu.as_ref(), &g.prompt_ids);
        let got = prefill_and_three_steps(&model, &resident(None, None), &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let prefill = got.len() - 3 * model.config.vocab_size;
        let vs_golden = max_abs_diff(&got[..prefill], &g.logits);
        println!("{name}: resident twin vs per-op {diff:.1e}, vs golden {vs_golden:.1e}");
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
        let want = prefill_and_three_steps(&model, cpu.as_ref(), &g.prompt_ids);
        let (on_gpu, on_host) = model.apply_plan(&p);
        assert!(on_gpu > 0 && on_host > 0, "{name}: {on_gpu} / {on_host}");
        let device = Arc::new(SimDevice::new("sim-gpu0", p.gpus[0].budget_bytes).expect("device"));
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

/// Deferral of host experts to the next layer computes the same numbers resident as on
/// the per-operation hybrid path.
#[test]
fn deferred_host_experts_match_the_per_operation_hybrid() {
    let cpu = exact();
    for name in ["kimi-int4", "deepseek-groups"] {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = half_on_gpu(&ckpt);
        let mut model = Model::load(&ckpt).expect("model");
        model.apply_plan(&p);
        model.defer_host_experts = 2;
        let g = golden(name);
        let device = Arc::new(SimDevice::new("sim", p.gpus[0].budget_bytes).expect("device"));
        let per_op =
            HybridBackend::new(&model, &p, device, cpu.clone(), cpu.clone()).expect("fits");
        let want = prefill_and_three_steps(&model, &per_op, &g.prompt_ids);
        let got =
            prefill_and_three_steps(&model, &resident(Some(cpu.clone()), None), &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        println!("{name}: deferral, resident vs per-op {diff:.1e}");
        assert!(diff <= FORM_TOLERANCE, "{name}: {diff}");
    }
}

/// Two sequences in one pass through the engine's paged cache (f32 and BF16 latents),
/// their blocks scattered over the pool, then one decode step each: the resident pass
/// against the per-operation path on the same kind of pool, and the f32 runs against
/// each sequence run alone.
#[test]
fn paged_batches_read_the_blocks_their_tables_name() {
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = Model::load(&Checkpoint::open(&fixture(name)).expect("fixture")).expect("model");
    let g = golden(name);
    let a: Vec<u32> = g.prompt_ids.clone();
    let b: Vec<u32> = g.prompt_ids.iter().rev().copied().collect();
    let vocab = model.config.vocab_size;
    let mut resident_f32: Vec<Vec<f32>> = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let want = paged_pair(&model, cpu.as_ref(), &a, &b, dtype);
        let got = paged_pair(&model, &resident(None, None), &a, &b, dtype);
        if dtype == KvDtype::Bf16 {
            // The BF16 pool really rounds: its logits move off the f32 ones.
            let moved = max_abs_diff(&got[2], &resident_f32[2]);
            assert!(
                moved > 10.0 * FORM_TOLERANCE,
                "bf16 latents not rounded: {moved}"
            );
        }
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            let diff = max_abs_diff(x, y);
            println!("paged {dtype:?}: output {i} resident vs per-op {diff:.1e}");
            assert!(diff <= FORM_TOLERANCE, "{dtype:?} output {i}: {diff}");
        }
        if dtype == KvDtype::F32 {
            // Alone: every prompt position, then three decode steps.
            for (prompt, prefill, step) in [(&a, &got[0], &got[2]), (&b, &got[1], &got[3])] {
                let alone = prefill_and_three_steps(&model, cpu.as_ref(), prompt);
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
    backend: &dyn Backend,
    a: &[u32],
    b: &[u32],
    dtype: KvDtype,
) -> Vec<Vec<f32>> {
    let cfg = &model.config;
    let block = 4;
    let mut pool = KvPool::with_dtype(
        64,
        block,
        cfg.latent_cache_width(),
        cfg.num_hidden_layers,
        dtype,
    );
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
    let mut run = |batch: &[BatchEntry]| -> Vec<Vec<f32>> {
        model
            .forward_batch(
                backend,
                batch,
                &mut store,
                AttentionForm::Auto,
                &mut |_, _| {},
            )
            .expect("forward")
            .into_iter()
            .map(|l| l.expect("logits"))
            .collect()
    };
    let prefill = run(&[entry(a, 0), entry(b, 0)]);
    let (na, nb) = ([argmax(&prefill[0])], [argmax(&prefill[1])]);
    let step = run(&[entry(&na, a.len()), entry(&nb, b.len())]);
    prefill.into_iter().chain(step).collect()
}
