//! All-GPU plans over several real GPUs (skipped with a message where there are none):
//! every golden fixture with the b200x8 plan folded onto two GPUs, data-parallel and
//! tensor-parallel, against the CPU; and NCCL against host memory. The same layouts on
//! stand-in devices are tested in tests/forward.rs.

mod common;

use common::{fixture, golden, max_abs_diff, prefill_and_three_steps as run, FIXTURES};
use kimi_hybrid::model::Model;
use kimi_hybrid::placement::{plan, ModelDesc, Profile};
use kimi_hybrid::weights::Checkpoint;
use std::sync::Arc;

/// Two CUDA devices (GPUs 0 and 1, or both on GPU 0 when there is one), through the
/// same upload path `serve` uses. The GPU sums in its own order: logits within 2e-3 of
/// the CPU run.
#[test]
fn expert_parallel_on_real_gpus_matches_cpu_on_every_fixture() {
    use kimi_hybrid::device::cuda::CudaBackend;
    use kimi_hybrid::runtime::cuda::{data_parallel_on_gpus, tensor_parallel_on_gpus};
    let first = match CudaBackend::open(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            common::no_gpu(
                "expert_parallel_on_real_gpus_matches_cpu_on_every_fixture",
                e,
            );
            return;
        }
    };
    let second = Arc::new(
        CudaBackend::open(1)
            .or_else(|_| CudaBackend::open(0))
            .expect("a second context"),
    );
    let profile = Profile::resolve("b200x8").expect("profile");
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = plan(
            &ModelDesc::from_checkpoint(&ckpt),
            &profile,
            &profile.workload,
            None,
        );
        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let want = run(&model, common::cpu_pass("cpu-f32").as_ref(), &g.prompt_ids);
        model.apply_plan(&p);
        // Eight planned GPUs folded onto two.
        for e in model.layers.iter_mut().filter_map(|l| match &mut l.ffn {
            kimi_hybrid::model::Ffn::Moe(m) => Some(m),
            _ => None,
        }) {
            for x in &mut e.experts {
                x.gpu = x.gpu.map(|g| g % 2);
            }
        }
        let gpus = vec![first.clone(), second.clone()];
        // The resident data-parallel pass the b200x8 plan runs (its exchange over NCCL
        // when the two contexts are two GPUs with libnccl, else through host memory).
        let dp = data_parallel_on_gpus(&model, gpus.clone()).expect("fits");
        let resident = run(&model, &dp, &g.prompt_ids);
        let dp_diff = max_abs_diff(&resident, &want);
        // Launch by launch too, so a failure says whether the recorded steps are at fault.
        gpus.iter().for_each(|g| g.set_recording(false));
        let eager = run(&model, &dp, &g.prompt_ids);
        gpus.iter().for_each(|g| g.set_recording(true));
        let eager_diff = max_abs_diff(&eager, &want);
        let vocab = model.config.vocab_size;
        let per_step = |got: &[f32]| -> Vec<String> {
            got.chunks(vocab)
                .zip(want.chunks(vocab))
                .map(|(a, b)| format!("{:.1e}", max_abs_diff(a, b)))
                .collect()
        };
        println!(
            "{name}: data-parallel per step {:?} recorded, {:?} launch by launch",
            per_step(&resident),
            per_step(&eager)
        );
        // The tensor-parallel pass (heads split over the two, partial sums all-reduced).
        let tp = tensor_parallel_on_gpus(&model, gpus).expect("fits");
        let tp_diff = max_abs_diff(&run(&model, &tp, &g.prompt_ids), &want);
        println!(
            "{name} on {}: max abs diff vs CPU {dp_diff:.1e} data-parallel, {tp_diff:.1e} tensor-parallel",
            first.gpu().name
        );
        assert!(dp_diff <= 2e-3, "{name}: resident {dp_diff}");
        assert!(
            eager_diff <= 2e-3,
            "{name}: resident launch by launch {eager_diff}"
        );
        assert!(tp_diff <= 2e-3, "{name}: tensor-parallel {tp_diff}");
    }
}

/// NCCL moves buffers between two GPUs exactly as host memory does (skipped with a
/// message without two GPUs and libnccl).
#[test]
fn nccl_moves_what_host_memory_moves() -> Result<(), kimi_hybrid::device::DeviceError> {
    use kimi_hybrid::device::cuda::{CudaBackend, NcclFabric};
    use kimi_hybrid::device::{DeviceOps, Fabric, ThroughHost};
    let gpus = match (CudaBackend::open(0), CudaBackend::open(1)) {
        (Ok(a), Ok(b)) => vec![Arc::new(a), Arc::new(b)],
        (a, b) => {
            let why = a
                .err()
                .or(b.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            eprintln!("skipping nccl_moves_what_host_memory_moves: two GPUs needed ({why})");
            return Ok(());
        }
    };
    let fabric = match NcclFabric::open(&gpus) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping nccl_moves_what_host_memory_moves: {e}");
            return Ok(());
        }
    };
    let data = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32 ^ seed) % 1000) as f32 * 0.001 - 0.5)
            .collect()
    };
    let moves = || -> Result<_, kimi_hybrid::device::DeviceError> {
        Ok(vec![
            (0, 1, gpus[0].upload(&data(7168 * 3, 1))?),
            (1, 0, gpus[1].upload(&data(7168 * 5, 2))?),
            (0, 0, gpus[0].upload(&data(7168, 3))?),
            (1, 0, gpus[1].upload(&data(11, 4))?),
        ])
    };
    let via_nccl = fabric.transfer(&gpus, moves()?)?;
    let via_host = ThroughHost.transfer(&gpus, moves()?)?;
    for ((to, a), b) in [1usize, 0, 0, 0].iter().zip(&via_nccl).zip(&via_host) {
        let (mut x, mut y) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
        gpus[*to].finish_download(gpus[*to].begin_download(a)?, &mut x)?;
        gpus[*to].finish_download(gpus[*to].begin_download(b)?, &mut y)?;
        assert_eq!(x, y);
    }
    Ok(())
}
