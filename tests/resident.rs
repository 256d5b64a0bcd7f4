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
use kimi_hybrid::engine::kv::{KvPool, PagedBatch};
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

/// Two sequences in one pass through the engine's paged cache, their blocks scattered
/// over the pool, then one decode step each, against each sequence run alone on the
/// per-operation path.
#[test]
fn paged_batches_read_the_blocks_their_tables_name() {
    let cpu = exact();
    let name = "kimi-real-heads";
    let model = Model::load(&Checkpoint::open(&fixture(name)).expect("fixture")).expect("model");
    let g = golden(name);
    let a: Vec<u32> = g.prompt_ids.clone();
    let b: Vec<u32> = g.prompt_ids.iter().rev().copied().collect();
    let alone = |prompt: &[u32]| prefill_and_three_steps(&model, cpu.as_ref(), prompt);
    let (want_a, want_b) = (alone(&a), alone(&b));
    let vocab = model.config.vocab_size;
    let last = |v: &[f32], from_end: usize| v[v.len() - from_end * vocab..].to_vec();

    let cfg = &model.config;
    let block = 4;
    let mut pool = KvPool::new(32, block, cfg.latent_cache_width(), cfg.num_hidden_layers);
    let blocks =
        |n: usize, first: u32| -> Vec<u32> { (0..n as u32).map(|i| first + 3 * i).collect() };
    let (table_a, table_b) = (
        blocks(a.len() / block + 2, 17),
        blocks(b.len() / block + 2, 1),
    );
    let backend = resident(None, None);
    let mut store = PagedBatch {
        pool: &mut pool,
        tables: vec![&table_a, &table_b],
    };
    let prefill = [
        BatchEntry {
            tokens: &a,
            start: 0,
            logits: Some(Logits::Last),
        },
        BatchEntry {
            tokens: &b,
            start: 0,
            logits: Some(Logits::Last),
        },
    ];
    let out = model
        .forward_batch(
            &backend,
            &prefill,
            &mut store,
            AttentionForm::Auto,
            &mut |_, _| {},
        )
        .expect("prefill");
    let (pa, pb) = (out[0].clone().expect("a"), out[1].clone().expect("b"));
    // want_* hold every prompt position, then three decode steps.
    let prompt_last = |w: &[f32]| w[w.len() - 4 * vocab..w.len() - 3 * vocab].to_vec();
    assert!(max_abs_diff(&pa, &prompt_last(&want_a)) <= FORM_TOLERANCE);
    assert!(max_abs_diff(&pb, &prompt_last(&want_b)) <= FORM_TOLERANCE);
    let (na, nb) = ([argmax(&pa)], [argmax(&pb)]);
    let step = [
        BatchEntry {
            tokens: &na,
            start: a.len(),
            logits: Some(Logits::Last),
        },
        BatchEntry {
            tokens: &nb,
            start: b.len(),
            logits: Some(Logits::Last),
        },
    ];
    let out = model
        .forward_batch(
            &backend,
            &step,
            &mut store,
            AttentionForm::Auto,
            &mut |_, _| {},
        )
        .expect("decode");
    let first_step = |w: &[f32]| last(w, 3)[..vocab].to_vec();
    let da = max_abs_diff(out[0].as_deref().expect("a"), &first_step(&want_a));
    let db = max_abs_diff(out[1].as_deref().expect("b"), &first_step(&want_b));
    println!("paged: decode step vs alone {da:.1e} / {db:.1e}");
    assert!(da <= FORM_TOLERANCE && db <= FORM_TOLERANCE, "{da} {db}");
}
