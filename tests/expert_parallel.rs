//! All-GPU plans over several devices: every golden fixture runs with the b200x8 plan
//! (experts spread over 8 devices, dense work split by tokens, lm_head by rows) on
//! stand-in devices that compute with the exact CPU kernels and record what they were
//! given. The logits equal a one-device run, and every routed expert ran on the device
//! the plan put it on.

mod common;

use common::{fixture, golden, max_abs_diff, prefill_and_three_steps as run, FIXTURES};
use kimi_hybrid::accel::expert_parallel::ExpertParallel;
use kimi_hybrid::backend::{by_name, AttentionShape, Backend, FfnWeights, KvView};
use kimi_hybrid::model::Model;
use kimi_hybrid::placement::{plan, ModelDesc, Profile};
use kimi_hybrid::weights::{Checkpoint, LinearWeight};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A stand-in device: the CPU kernels, plus a log of the routed experts it computed.
struct Device {
    index: usize,
    compute: Box<dyn Backend>,
    experts: Mutex<Vec<(usize, Option<usize>)>>,
}

impl Backend for Device {
    fn name(&self) -> &'static str {
        "stand-in device"
    }
    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        self.compute.linear(w, rows, x, y)
    }
    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        self.compute.linear_transposed(w, rows, x, y)
    }
    fn ffn_accumulate(&self, f: &FfnWeights, x: &[f32], t: &[(usize, f32)], out: &mut [f32]) {
        kimi_hybrid::backend::ffn_accumulate_with(self, f, x, t, out)
    }
    fn ffn_contributions(&self, f: &FfnWeights, x: &[f32], t: &[(usize, f32)]) -> Vec<f32> {
        if f.expert.is_some() {
            if let Ok(mut log) = self.experts.lock() {
                log.push((self.index, f.gpu));
            }
        }
        self.compute.ffn_contributions(f, x, t)
    }
    fn attention(
        &self,
        q: &[f32],
        k: KvView,
        v: KvView,
        shape: AttentionShape,
        positions: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        self.compute
            .attention(q, k, v, shape, positions, scale, out)
    }
}

#[test]
fn expert_parallel_over_eight_devices_matches_one_device_on_every_fixture() {
    let profile = Profile::resolve("b200x8").expect("profile");
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).expect("fixture");
        let p = plan(
            &ModelDesc::from_checkpoint(&ckpt),
            &profile,
            &profile.workload,
            None,
        );
        assert!(p.feasible, "{name}: {:?}", p.problems);
        assert_eq!(p.layout, "all-gpu");
        let mut model = Model::load(&ckpt).expect("model");
        let g = golden(name);
        let single = by_name("cpu-f32").expect("cpu backend");
        let want = run(&model, single.as_ref(), &g.prompt_ids);

        let (on_gpus, _) = model.apply_plan(&p);
        let devices: Vec<Arc<Device>> = (0..p.gpus.len())
            .map(|index| {
                Arc::new(Device {
                    index,
                    compute: by_name("cpu-f32").expect("cpu backend"),
                    experts: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let as_backends: Vec<Arc<dyn Backend>> = devices
            .iter()
            .map(|d| d.clone() as Arc<dyn Backend>)
            .collect();
        let ep = ExpertParallel::new(as_backends, &model).expect("devices");
        let got = run(&model, &ep, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
        let mut used = 0;
        for d in &devices {
            let log = d.experts.lock().expect("log");
            used += usize::from(!log.is_empty());
            for &(ran_on, placed_on) in log.iter() {
                assert_eq!(Some(ran_on), placed_on, "{name}: expert ran off its device");
            }
        }
        println!(
            "{name}: {on_gpus} experts over {} devices ({used} used by this prompt); max abs diff vs one device {diff:.1e}",
            p.gpus.len()
        );
        assert!(used > 1, "{name}: the experts did not spread over devices");
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
}

/// The same on real GPUs (skipped with a message where none exists): two CUDA backends
/// (on GPUs 0 and 1, or both on GPU 0 when there is one) as the devices, through the
/// same upload path `serve` uses. The GPU sums in its own order: logits within 2e-3 of
/// the CPU run.
#[test]
fn expert_parallel_on_real_gpus_matches_cpu_on_every_fixture() {
    use kimi_hybrid::accel::cuda::{
        data_parallel_on_gpus, expert_parallel_on_gpus, tensor_parallel_on_gpus,
    };
    use kimi_hybrid::backend::CudaBackend;
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
        let want = run(
            &model,
            by_name("cpu-f32").expect("cpu").as_ref(),
            &g.prompt_ids,
        );
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
        let ep = expert_parallel_on_gpus(&model, gpus.clone()).expect("fits");
        let got = run(&model, &ep, &g.prompt_ids);
        let diff = max_abs_diff(&got, &want);
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
            "{name} on {}: max abs diff vs CPU {diff:.1e} per operation, {dp_diff:.1e} resident data-parallel, {tp_diff:.1e} resident tensor-parallel",
            first.gpu().name
        );
        assert!(diff <= 2e-3, "{name}: {diff}");
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
fn nccl_moves_what_host_memory_moves() {
    use kimi_hybrid::backend::{CudaBackend, NcclFabric};
    use kimi_hybrid::resident::{DeviceOps, Fabric, ThroughHost};
    let gpus = match (CudaBackend::open(0), CudaBackend::open(1)) {
        (Ok(a), Ok(b)) => vec![Arc::new(a), Arc::new(b)],
        (a, b) => {
            let why = a
                .err()
                .or(b.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            eprintln!("skipping nccl_moves_what_host_memory_moves: two GPUs needed ({why})");
            return;
        }
    };
    let fabric = match NcclFabric::open(&gpus) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping nccl_moves_what_host_memory_moves: {e}");
            return;
        }
    };
    let data = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32 ^ seed) % 1000) as f32 * 0.001 - 0.5)
            .collect()
    };
    let moves = || {
        vec![
            (0, 1, gpus[0].upload(&data(7168 * 3, 1))),
            (1, 0, gpus[1].upload(&data(7168 * 5, 2))),
            (0, 0, gpus[0].upload(&data(7168, 3))),
            (1, 0, gpus[1].upload(&data(11, 4))),
        ]
    };
    let via_nccl = fabric.transfer(&gpus, moves());
    let via_host = ThroughHost.transfer(&gpus, moves());
    for ((to, a), b) in [1usize, 0, 0, 0].iter().zip(&via_nccl).zip(&via_host) {
        let (mut x, mut y) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
        gpus[*to].finish_download(gpus[*to].begin_download(a), &mut x);
        gpus[*to].finish_download(gpus[*to].begin_download(b), &mut y);
        assert_eq!(x, y);
    }
}
