//! `kimi-hybrid bench kernels`: the CPU expert kernels at the real Kimi K2 shapes
//! (gate/up 2048x7168, down 7168x2048, INT4 group 32) over a working set of distinct
//! experts far larger than the last-level cache (a whole 384-expert layer where memory
//! allows), so weights stream from DRAM as in real decode. Every figure is reported next
//! to a reference measured in the same run: the machine's streaming read bandwidth over
//! the same bytes (interleaved with the kernels, best of each), the scalar path, and the
//! `vpdpwssd` peak of all threads issuing it at once (the prefill GEMM's instruction).

use crate::device::cpu::kernels::{Activations, CpuBackend, CpuKernels, FfnWeights};
use crate::weights::{DenseDtype, LinearWeight, TensorData};
use kernels_avx512::Isa;
use memmap2::MmapMut;
use rayon::prelude::*;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

pub const HIDDEN: usize = 7168;
pub const INTER: usize = 2048;

/// Bytes of one INT4 K2 expert (packed + BF16 scales, three matrices).
pub fn expert_bytes() -> usize {
    3 * (INTER * HIDDEN / 2 + INTER * HIDDEN / 32 * 2)
}

#[derive(Debug, Clone)]
pub struct KernelBenchOptions {
    /// Bytes of distinct INT4 experts to stream; `None`: a whole K2 layer (384 experts,
    /// 9.5 GB) where memory allows, else 2 GB.
    pub working_set_bytes: Option<usize>,
    pub repeats: usize,
}

/// Experts in one Kimi K2 MoE layer, and how many a token is routed to.
const K2_EXPERTS: usize = 384;
const K2_ACTIVE: usize = 8;
/// Bytes of each dense (BF16, FP8) working set: far beyond the last-level cache.
const DENSE_SET_BYTES: usize = 2 << 30;

/// Fills `buf` with pseudo-random bytes in parallel (xorshift per 1 MiB chunk).
fn fill_random(buf: &mut [u8]) {
    buf.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            for b in chunk.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
        });
}

/// Available memory in bytes (Linux `MemAvailable`), if known.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    crate::topology::kib_field(&text, "MemAvailable:").map(|b| b as usize)
}

/// (steal, total) CPU time in clock ticks since boot (Linux `/proc/stat`), if known: time a
/// hypervisor gave this machine's CPUs to someone else skews every figure of a run.
fn cpu_steal_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

/// A read-only anonymous map of `len` bytes prepared by `fill`.
fn anon_map(len: usize, fill: impl FnOnce(&mut [u8])) -> std::io::Result<Arc<memmap2::Mmap>> {
    let mut map = MmapMut::map_anon(len)?;
    fill(&mut map);
    Ok(Arc::new(map.make_read_only()?))
}

fn view(map: &Arc<memmap2::Mmap>, start: usize, len: usize) -> std::io::Result<TensorData> {
    TensorData::new(map.clone(), start, start + len)
        .ok_or_else(|| std::io::Error::other("bad view"))
}

/// `count` K2-shaped INT4 experts in one anonymous map: random nibbles, small BF16 scales.
fn make_experts(count: usize) -> std::io::Result<(Arc<memmap2::Mmap>, Vec<FfnWeights>)> {
    let (gate_packed, gate_scales) = (INTER * HIDDEN / 2, INTER * HIDDEN / 32 * 2);
    let per = expert_bytes();
    let map = anon_map(per * count, |map| {
        fill_random(map);
        // Scales: BF16 0.01 everywhere, so outputs stay finite.
        map.par_chunks_mut(per).for_each(|expert| {
            for (start, len) in [
                (gate_packed, gate_scales),
                (2 * gate_packed + gate_scales, gate_scales),
                (3 * gate_packed + 2 * gate_scales, gate_scales),
            ] {
                for pair in expert[start..start + len].chunks_exact_mut(2) {
                    pair.copy_from_slice(&0x3c24u16.to_le_bytes());
                }
            }
        });
    })?;
    let mut experts = Vec::with_capacity(count);
    for e in 0..count {
        let base = e * per;
        let linear = |offset: usize, rows: usize, cols: usize| -> std::io::Result<LinearWeight> {
            let packed = rows * cols / 2;
            Ok(LinearWeight::Int4 {
                packed: view(&map, base + offset, packed)?,
                scales: view(&map, base + offset + packed, rows * cols / 32 * 2)?,
                rows,
                cols,
                group: 32,
            })
        };
        let one = gate_packed + gate_scales;
        experts.push(FfnWeights {
            gate: linear(0, INTER, HIDDEN)?,
            up: linear(one, INTER, HIDDEN)?,
            down: linear(2 * one, HIDDEN, INTER)?,
            numa_node: None,
            expert: Some((0, e)),
            gpu: None,
        });
    }
    Ok((map, experts))
}

/// BF16 and FP8-block matrices of 2048 x 7168 (a K2 shared expert's gate/up shape) over
/// one `DENSE_SET_BYTES` map: values in +-[0.0039, 2), block scales 0.01.
fn make_dense() -> std::io::Result<(Vec<LinearWeight>, Vec<LinearWeight>)> {
    let (rows, cols) = (INTER, HIDDEN);
    let map = anon_map(DENSE_SET_BYTES, |m| {
        fill_random(m);
        // Keep every BF16 high byte (and so every other FP8 byte) normal and moderate.
        m.par_chunks_mut(2)
            .for_each(|pair| pair[1] = 0x3b + (pair[1] & 0x83) % 4);
    })?;
    let block_rows = rows.div_ceil(128) * cols.div_ceil(128);
    let scales = anon_map(block_rows * 4, |m| {
        for c in m.chunks_exact_mut(4) {
            c.copy_from_slice(&0.01f32.to_le_bytes());
        }
    })?;
    let bf16 = (0..DENSE_SET_BYTES / (rows * cols * 2))
        .map(|i| {
            Ok(LinearWeight::Dense {
                dtype: DenseDtype::Bf16,
                data: view(&map, i * rows * cols * 2, rows * cols * 2)?,
                rows,
                cols,
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let fp8 = (0..DENSE_SET_BYTES / (rows * cols))
        .map(|i| {
            Ok(LinearWeight::Fp8 {
                data: view(&map, i * rows * cols, rows * cols)?,
                scale_inv: view(&scales, 0, block_rows * 4)?,
                rows,
                cols,
                block: [128, 128],
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((bf16, fp8))
}

/// Streaming read of `buf` on all threads; returns seconds.
fn read_once(buf: &[u8]) -> f64 {
    let isa = Isa::detect();
    let t = Instant::now();
    let sum: u64 = buf
        .par_chunks(4 << 20)
        .map(|c| kernels_avx512::stream::read_sum(isa, c))
        .reduce(|| 0, u64::wrapping_add);
    std::hint::black_box(sum);
    t.elapsed().as_secs_f64()
}

/// One token through each expert in turn (gate, up, SiLU, down), as decode streams every
/// expert's weights once; returns seconds.
fn experts_once(backend: &dyn CpuKernels, experts: &[FfnWeights]) -> f64 {
    let x = probe_activations(HIDDEN, 1);
    let t = Instant::now();
    let mut out = vec![0.0f32; HIDDEN];
    for e in experts {
        backend.ffn_accumulate(e, &x, &[(0, 1.0)], &mut out);
    }
    std::hint::black_box(&out);
    t.elapsed().as_secs_f64()
}

/// One token through each matrix; returns seconds.
fn matrices_once(backend: &dyn CpuKernels, matrices: &[LinearWeight]) -> f64 {
    let x = probe_activations(HIDDEN, 1);
    let mut y = vec![0.0f32; INTER];
    let t = Instant::now();
    for m in matrices {
        backend.linear(m, 0..m.rows(), &x, &mut y);
    }
    std::hint::black_box(&y);
    t.elapsed().as_secs_f64()
}

/// Deterministic activations in [-1, 1] for `tokens` tokens of width `cols`.
fn probe_activations(cols: usize, tokens: usize) -> Vec<f32> {
    (0..cols * tokens)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect()
}

/// Per-instruction peak of all threads at once: each runs the one-core probe
/// concurrently; the sum, in operations (2 per multiply-accumulate) per second.
/// A one-core instruction-peak probe: multiply-adds per second for a number of rounds.
type PeakProbe = fn(u64) -> Option<f64>;

fn peak_all_threads(probe: PeakProbe) -> Option<f64> {
    let per_thread: Vec<Option<f64>> = rayon::broadcast(|_| probe(4_000_000));
    per_thread
        .into_iter()
        .sum::<Option<f64>>()
        .map(|macs| 2.0 * macs)
}

/// A figure measured in every round, best kept.
struct Best {
    seconds: f64,
}

impl Best {
    fn new() -> Self {
        Best {
            seconds: f64::INFINITY,
        }
    }
    fn add(&mut self, seconds: f64) {
        self.seconds = self.seconds.min(seconds);
    }
    fn rate(&self, amount: f64) -> f64 {
        amount / self.seconds
    }
}

pub fn kernels(opts: &KernelBenchOptions) -> std::io::Result<String> {
    let mut s = String::new();
    let threads = rayon::current_num_threads();
    let isa = Isa::detect();
    let layer_bytes = K2_EXPERTS * expert_bytes();
    let wanted = opts.working_set_bytes.unwrap_or_else(|| {
        let room = available_memory().unwrap_or(0);
        if room > layer_bytes + DENSE_SET_BYTES + (3 << 30) {
            layer_bytes
        } else {
            2_000_000_000
        }
    });
    let count = wanted.div_ceil(expert_bytes()).max(2);
    let repeats = opts.repeats.max(1);
    let _ = writeln!(
        s,
        "kernels: {} on {threads} threads; {count} distinct K2 INT4 experts ({:.2} GB) + {:.2} GB each of BF16 and FP8 matrices; best of {repeats} interleaved rounds",
        isa.name(),
        (count * expert_bytes()) as f64 / 1e9,
        DENSE_SET_BYTES as f64 / 1e9,
    );
    let steal_before = cpu_steal_ticks();
    let (expert_map, experts) = make_experts(count)?;
    let (bf16, fp8) = make_dense()?;
    let default = CpuBackend::new(isa, Activations::Int16);
    let exact = CpuBackend::new(isa, Activations::F32);
    let int8 = CpuBackend::new(isa, Activations::Int8);

    // Decode: the reference read and every kernel in each round, so all figures share the
    // machine's state.
    let (mut read, mut k16, mut kf32, mut k8, mut kbf16, mut kfp8) = (
        Best::new(),
        Best::new(),
        Best::new(),
        Best::new(),
        Best::new(),
        Best::new(),
    );
    for _ in 0..repeats {
        read.add(read_once(&expert_map));
        k16.add(experts_once(&default, &experts));
        kf32.add(experts_once(&exact, &experts));
        k8.add(experts_once(&int8, &experts));
        kbf16.add(matrices_once(&default, &bf16));
        kfp8.add(matrices_once(&default, &fp8));
    }
    // Scalar paths are slow: a slice still far beyond the caches, measured once.
    let slice = &experts[..experts.len().min(4)];
    let scalar16 = experts_once(&CpuBackend::new(Isa::Scalar, Activations::Int16), slice);
    let scalar_f32 = experts_once(&CpuBackend::new(Isa::Scalar, Activations::F32), slice);
    let scalar8 = experts_once(&CpuBackend::new(Isa::Scalar, Activations::Int8), slice);
    let scalar_bf16 = matrices_once(
        &CpuBackend::new(Isa::Scalar, Activations::Int16),
        &bf16[..4],
    );
    let scalar_fp8 = matrices_once(&CpuBackend::new(Isa::Scalar, Activations::Int16), &fp8[..4]);
    let slice_bytes = (slice.len() * expert_bytes()) as f64;
    let matrix = (INTER * HIDDEN) as f64;

    let bw = read.rate(expert_map.len() as f64);
    let _ = writeln!(
        s,
        "\ndecode, one token, weights streamed from DRAM       GB/s   of read   vs scalar"
    );
    let _ = writeln!(
        s,
        "  streaming read (reference)                     {:>8.2}    100.0%",
        bw / 1e9
    );
    let mut decode_row = |name: &str, fast: f64, scalar: f64| {
        let _ = writeln!(
            s,
            "  {name:<46} {:>8.2}    {:>5.1}%   {:>6.1}x",
            fast / 1e9,
            fast / bw * 100.0,
            fast / scalar
        );
    };
    let expert_total = (experts.len() * expert_bytes()) as f64;
    decode_row(
        "INT4 expert, int16 activations (cpu)",
        k16.rate(expert_total),
        slice_bytes / scalar16,
    );
    decode_row(
        "INT4 expert, int8 activations (cpu-int8)",
        k8.rate(expert_total),
        slice_bytes / scalar8,
    );
    decode_row(
        "INT4 expert, f32 activations (cpu-f32)",
        kf32.rate(expert_total),
        slice_bytes / scalar_f32,
    );
    decode_row(
        "BF16 GEMV 2048x7168",
        kbf16.rate(bf16.len() as f64 * matrix * 2.0),
        4.0 * matrix * 2.0 / scalar_bf16,
    );
    decode_row(
        "FP8-block GEMV 2048x7168",
        kfp8.rate(fp8.len() as f64 * matrix),
        4.0 * matrix / scalar_fp8,
    );

    // Prefill: one 2048 x 7168 matrix (an expert's INT4 gate, a BF16 or FP8 matrix) times T
    // tokens through each backend's GEMM; ops = 2 x rows x cols x T. Each is a share of
    // the peak of the instruction it is built on, the peaks measured in every round next
    // to the GEMMs (best of each kept); the int16 GEMM is also given as a share of the
    // int8 peak, the rate the `cpu-int8` GEMM runs at.
    use kernels_avx512::stream::{
        bf16_macs_per_s_one_core, f32_macs_per_s_one_core, vnni16_macs_per_s_one_core,
        vnni8_macs_per_s_one_core,
    };
    let probes: [(&str, PeakProbe); 4] = [
        ("vpdpbusd (int8)", vnni8_macs_per_s_one_core),
        ("vpdpwssd (int16)", vnni16_macs_per_s_one_core),
        ("vdpbf16ps (BF16)", bf16_macs_per_s_one_core),
        ("FMA (f32)", f32_macs_per_s_one_core),
    ];
    let (int8_peak, int16_peak, bf16_peak, f32_peak) = (0, 1, 2, 3);
    let gate = &experts[0].gate;
    let dense = &bf16[0];
    let block_fp8 = &fp8[0];
    // (name, backend, matrix, peaks it is a share of)
    let gemms: [(&str, &CpuBackend, &LinearWeight, &[usize]); 5] = [
        (
            "INT4, int16 GEMM (cpu)",
            &default,
            gate,
            &[int16_peak, int8_peak],
        ),
        ("INT4, int8 GEMM (cpu-int8)", &int8, gate, &[int8_peak]),
        ("BF16, f32 GEMM (cpu)", &default, dense, &[f32_peak]),
        ("BF16, BF16 GEMM (cpu-int8)", &int8, dense, &[bf16_peak]),
        (
            "FP8-block, f32 GEMM (every backend)",
            &default,
            block_fp8,
            &[f32_peak],
        ),
    ];
    let token_counts = [128usize, 512, 2048];
    let inputs: Vec<Vec<f32>> = token_counts
        .iter()
        .map(|&t| probe_activations(HIDDEN, t))
        .collect();
    let mut y = vec![0.0f32; 2048 * INTER];
    for (_, backend, w, _) in &gemms {
        for x in &inputs {
            // Once first, so buffers of each size are mapped before timing.
            backend.linear(w, 0..INTER, x, &mut y[..x.len() / HIDDEN * INTER]);
        }
    }
    let mut timings: Vec<Vec<Best>> = gemms
        .iter()
        .map(|_| token_counts.iter().map(|_| Best::new()).collect())
        .collect();
    let mut peaks: Vec<Option<f64>> = vec![None; probes.len()];
    for _ in 0..repeats {
        for ((_, probe), best) in probes.iter().zip(peaks.iter_mut()) {
            if let Some(p) = peak_all_threads(*probe) {
                *best = Some(best.map_or(p, |b| b.max(p)));
            }
        }
        for ((_, backend, w, _), bests) in gemms.iter().zip(timings.iter_mut()) {
            for (x, best) in inputs.iter().zip(bests.iter_mut()) {
                let t = Instant::now();
                backend.linear(w, 0..INTER, x, &mut y[..x.len() / HIDDEN * INTER]);
                best.add(t.elapsed().as_secs_f64());
            }
        }
    }
    // The scalar reference on 64 rows x 128 tokens, scaled per operation.
    let scalar_ops = {
        let x = &inputs[0];
        let mut y = vec![0.0f32; 128 * 64];
        let scalar = CpuBackend::new(Isa::Scalar, Activations::Int16);
        let t = Instant::now();
        scalar.linear(gate, 0..64, x, &mut y);
        2.0 * (64 * HIDDEN * 128) as f64 / t.elapsed().as_secs_f64()
    };
    let _ = writeln!(
        s,
        "\nprefill GEMM, 2048x7168, all threads                 Tops/s   share of peak"
    );
    for ((name, _), peak) in probes.iter().zip(&peaks) {
        let figure = peak.map_or("not on this CPU".to_string(), |p| {
            format!("{:>8.3}", p / 1e12)
        });
        let _ = writeln!(s, "  {:<50} {figure}", format!("{name} peak (measured)"));
    }
    for ((name, _, _, shares), bests) in gemms.iter().zip(&timings) {
        for (tokens, best) in token_counts.iter().zip(bests) {
            let rate = best.rate(2.0 * (INTER * HIDDEN * tokens) as f64);
            let of_peaks: Vec<String> = shares
                .iter()
                .map(|&i| match peaks[i] {
                    Some(p) => format!("{:.1}% of {}", rate / p * 100.0, probes[i].0),
                    None => format!("{} not measured", probes[i].0),
                })
                .collect();
            let _ = writeln!(
                s,
                "  {:<50} {:>8.3}   {}",
                format!("{tokens:>4} tokens, {name}"),
                rate / 1e12,
                of_peaks.join(", ")
            );
        }
    }
    let int16_512 = timings[0][1].rate(2.0 * (INTER * HIDDEN * 512) as f64);
    let _ = writeln!(
        s,
        "  (the int16 GEMM at 512 tokens is {:.1}x the scalar INT4 reference)",
        int16_512 / scalar_ops
    );

    // A whole MoE layer at K2 routing over up to 384 distinct experts, through the
    // backend's MoE operator as the model calls it.
    let layer = &experts[..experts.len().min(K2_EXPERTS)];
    let mut seed = 12345u64;
    let mut route = |tokens: usize| -> Vec<Vec<(usize, f32)>> {
        let mut groups = vec![Vec::new(); layer.len()];
        for t in 0..tokens {
            let mut chosen = Vec::with_capacity(K2_ACTIVE);
            while chosen.len() < K2_ACTIVE.min(layer.len()) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let e = (seed % layer.len() as u64) as usize;
                if !chosen.contains(&e) {
                    chosen.push(e);
                    groups[e].push((t, 1.0 / K2_ACTIVE as f32));
                }
            }
        }
        groups
    };
    let _ = writeln!(
        s,
        "\nMoE layer, {} experts, {K2_ACTIVE} active per token (cpu backend)         tokens/s",
        layer.len()
    );
    let decode_steps: Vec<Vec<Vec<(usize, f32)>>> = (0..32).map(|_| route(1)).collect();
    let x1 = probe_activations(HIDDEN, 1);
    let mut best = Best::new();
    for _ in 0..repeats.min(2) {
        let t = Instant::now();
        for groups in &decode_steps {
            let work: Vec<(&FfnWeights, &[(usize, f32)])> = layer
                .iter()
                .zip(groups)
                .filter(|(_, g)| !g.is_empty())
                .map(|(e, g)| (e, g.as_slice()))
                .collect();
            let mut out = vec![0.0f32; HIDDEN];
            default.moe_accumulate(&work, &x1, &mut out);
            std::hint::black_box(&out);
        }
        best.add(t.elapsed().as_secs_f64());
    }
    let decode_rate = best.rate(decode_steps.len() as f64);
    let _ = writeln!(
        s,
        "  decode, one token per step                              {:>8.1}   ({:.2} GB/s of expert weights, {:.1}% of read)",
        decode_rate,
        decode_rate * (K2_ACTIVE * expert_bytes()) as f64 / 1e9,
        decode_rate * (K2_ACTIVE * expert_bytes()) as f64 / bw * 100.0
    );
    let prefill_tokens = 512;
    let groups = route(prefill_tokens);
    let xs = probe_activations(HIDDEN, prefill_tokens);
    let work: Vec<(&FfnWeights, &[(usize, f32)])> = layer
        .iter()
        .zip(&groups)
        .filter(|(_, g)| !g.is_empty())
        .map(|(e, g)| (e, g.as_slice()))
        .collect();
    let mut best = Best::new();
    for _ in 0..repeats.min(2) {
        let t = Instant::now();
        let mut out = vec![0.0f32; prefill_tokens * HIDDEN];
        default.moe_accumulate(&work, &xs, &mut out);
        std::hint::black_box(&out);
        best.add(t.elapsed().as_secs_f64());
    }
    let _ = writeln!(
        s,
        "  prefill, {prefill_tokens} tokens                                      {:>8.1}",
        best.rate(prefill_tokens as f64)
    );
    if let (Some((steal0, total0)), Some((steal1, total1))) = (steal_before, cpu_steal_ticks()) {
        let share = (steal1 - steal0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
        let _ = writeln!(
            s,
            "\nCPU time stolen by the hypervisor during the run: {share:.1}% (figures of runs above a few percent are not comparable)"
        );
    }
    Ok(s)
}

/// `kimi-hybrid bench -p P -n N -c C`: the engine's prompt and generation speed.
#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    pub model_dir: std::path::PathBuf,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub concurrency: Vec<usize>,
    pub backend: String,
    /// Place the model for this hardware profile (see `serve --profile`).
    pub profile: Option<String>,
    /// Run the profile's GPUs as stand-ins on the host (see `serve --simulate-gpus`).
    pub simulate_gpus: bool,
    /// No CUDA graphs (see `serve --enforce-eager`).
    pub enforce_eager: bool,
}

/// Token arrival times of one request.
struct Timeline {
    submitted: Instant,
    tokens: Vec<Instant>,
}

/// Deterministic pseudo-random prompt ids in `[0, vocab)`, distinct per request.
fn bench_prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Why an engine benchmark cannot run or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad `-p`, `-n` or `-c` for the model.
    #[error("{0}")]
    Options(String),
    #[error("cannot load checkpoint {dir}: {cause}")]
    Checkpoint {
        dir: std::path::PathBuf,
        cause: Box<crate::weights::WeightsError>,
    },
    #[error("cannot load checkpoint {dir}: {cause}")]
    Model {
        dir: std::path::PathBuf,
        cause: Box<crate::model::ModelError>,
    },
    #[error("{dir} has no tokenizer and the demo's cannot be loaded: {cause}")]
    Tokenizer {
        dir: std::path::PathBuf,
        cause: String,
    },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("cannot start the engine thread: {0}")]
    Engine(std::io::Error),
    /// A request of the benchmark failed or the engine stopped.
    #[error("{0}")]
    Request(String),
}

/// Runs `count` requests at once and returns their timelines.
fn run_concurrent(
    engine: &crate::engine::EngineHandle,
    count: usize,
    prompt: usize,
    generate: usize,
    salt: u64,
) -> Result<Vec<Timeline>, BenchError> {
    use crate::engine::{sampling::SamplingConfig, Event, GenRequest};
    let vocab = engine.model_config.vocab_size;
    let mut receivers = Vec::with_capacity(count);
    let submitted = Instant::now();
    for i in 0..count {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(GenRequest {
                prompt: bench_prompt(prompt, vocab, salt + i as u64),
                sampling: SamplingConfig {
                    temperature: 0.0,
                    ..SamplingConfig::default()
                },
                max_tokens: generate,
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                ignore_eos: true,
                skip_special_tokens: true,
                prompt_logprobs: None,
                forced: None,
                constraints: Vec::new(),
                client_backed_up: None,
                events: tx,
            })
            .map_err(|e| BenchError::Request(e.to_string()))?;
        receivers.push(rx);
    }
    let handles: Vec<_> = receivers
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut t = Timeline {
                    submitted,
                    tokens: Vec::new(),
                };
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { .. } => t.tokens.push(Instant::now()),
                        Event::Finished { .. } => return Ok(t),
                        Event::Error(e) => return Err(BenchError::Request(e)),
                        Event::PromptLogprobs(_) => {}
                    }
                }
                Err(BenchError::Request("the engine stopped".into()))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| BenchError::Request("a benchmark client thread panicked".into()))?
        })
        .collect()
}

pub fn engine(opts: &EngineBenchOptions) -> Result<String, BenchError> {
    use crate::engine::EngineConfig;
    if opts.prompt_tokens == 0 || opts.gen_tokens < 2 {
        return Err(BenchError::Options(
            "-p must be at least 1 and -n at least 2".into(),
        ));
    }
    if opts.concurrency.contains(&0) {
        return Err(BenchError::Options("-c must be at least 1".into()));
    }
    let dir = &opts.model_dir;
    let ckpt = crate::weights::Checkpoint::open(dir).map_err(|cause| BenchError::Checkpoint {
        dir: dir.clone(),
        cause: Box::new(cause),
    })?;
    let mut model = crate::model::Model::load(&ckpt).map_err(|cause| BenchError::Model {
        dir: dir.clone(),
        cause: Box::new(cause),
    })?;
    let placement = crate::runtime::place(
        &ckpt,
        &mut model,
        opts.profile.as_deref(),
        None,
        opts.simulate_gpus,
    )?
    .eager(opts.enforce_eager);
    // The benchmark feeds token ids and ignores end markers; a checkpoint without
    // tokenizer files runs with the demo's (its text output is not used).
    let tokenizer = match crate::tokenizer::Tokenizer::from_dir(dir) {
        Ok(t) => t,
        Err(_) => crate::demo::demo_checkpoint_dir()
            .map_err(|e| e.to_string())
            .and_then(|demo| {
                crate::tokenizer::Tokenizer::from_dir(&demo).map_err(|e| e.to_string())
            })
            .map_err(|cause| BenchError::Tokenizer {
                dir: dir.clone(),
                cause,
            })?,
    };
    let pass = placement.forward(&model, &opts.backend)?;
    let max_c = opts.concurrency.iter().copied().max().unwrap_or(1);
    let len = opts.prompt_tokens + opts.gen_tokens + 1;
    if len > model.config.max_position_embeddings {
        return Err(BenchError::Options(format!(
            "-p + -n = {} exceeds the model's context of {}",
            len - 1,
            model.config.max_position_embeddings
        )));
    }
    let block_size = 16;
    let config = EngineConfig {
        max_num_seqs: max_c,
        max_waiting: max_c,
        max_model_len: len,
        block_size,
        kv_blocks: max_c * len.div_ceil(block_size) + 1,
        max_batch_tokens: crate::placement::planner::PREFILL_CHUNK as usize,
        prefix_caching: false,
        kv_dtype: crate::engine::kv::KvDtype::Bf16,
    };
    let name = model.config.model_type.clone();
    let layers = model.config.num_hidden_layers;
    let (cost, chunk) = (
        crate::engine::cost::StepCost::of(&model.config),
        config.max_batch_tokens,
    );
    let engine = crate::engine::start(model, pass, Arc::new(tokenizer), config)
        .map_err(BenchError::Engine)?;
    let (p, n) = (opts.prompt_tokens, opts.gen_tokens);

    // Warm-up: one short request, so first-use costs stay out of the figures.
    run_concurrent(&engine, 1, p.min(8), 2, 999)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "model: {} ({name}, {layers} layers), backend {}, threads {}",
        dir.display(),
        opts.backend,
        rayon::current_num_threads()
    );
    let attention_before = crate::device::cpu::attention_time();
    let pp = run_concurrent(&engine, 1, p, 1, 1)?;
    let pp_secs = (pp[0].tokens[0] - pp[0].submitted).as_secs_f64();
    let attention_secs = (crate::device::cpu::attention_time() - attention_before).as_secs_f64();
    // Attention measured where it runs on the CPU; on a GPU its work is asynchronous and
    // the share given is the arithmetic's (attention's multiply-adds of all of them).
    let share = if attention_secs > 0.0 {
        format!(
            "attention {:.0}% of the time",
            100.0 * (attention_secs / pp_secs).min(1.0)
        )
    } else {
        format!(
            "attention {:.0}% of the arithmetic",
            100.0 * cost.prefill_attention_share(p, chunk)
        )
    };
    let _ = writeln!(
        out,
        "pp{p}: {:.1} tokens/s (prompt of {p} tokens in {:.3} s; {share})",
        p as f64 / pp_secs,
        pp_secs
    );
    let tg = run_concurrent(&engine, 1, 1, n, 2)?;
    let tg_secs = (tg[0].tokens[n - 1] - tg[0].tokens[0]).as_secs_f64();
    let tg_rate = (n - 1) as f64 / tg_secs;
    let _ = writeln!(
        out,
        "tg{n}: {tg_rate:.1} tokens/s ({} tokens after the first in {tg_secs:.3} s)",
        n - 1
    );
    let mut single = None;
    for &c in &opts.concurrency {
        let runs = run_concurrent(&engine, c, p, n, 100 + c as u64 * 1000)?;
        // The window in which every sequence is decoding: after the last first token,
        // before the first sequence ends.
        let start = runs
            .iter()
            .map(|r| r.tokens[0])
            .max()
            .unwrap_or_else(Instant::now);
        let end = runs
            .iter()
            .map(|r| *r.tokens.last().unwrap_or(&start))
            .min()
            .unwrap_or(start);
        let in_window = runs
            .iter()
            .flat_map(|r| r.tokens.iter())
            .filter(|&&t| t > start && t <= end)
            .count();
        let window = (end - start).as_secs_f64();
        let decode = if window > 0.0 {
            in_window as f64 / window
        } else {
            0.0
        };
        let wall = runs
            .iter()
            .map(|r| *r.tokens.last().unwrap_or(&r.submitted) - r.submitted)
            .max()
            .unwrap_or_default()
            .as_secs_f64();
        let single_rate = *single.get_or_insert(decode);
        let _ = writeln!(
            out,
            "c{c}: aggregate decode {decode:.1} tokens/s ({:.2}x c=1's), {:.1} generated tokens/s over the whole run ({} requests of p{p}/n{n} in {wall:.2} s)",
            if single_rate > 0.0 { decode / single_rate } else { 0.0 },
            (c * n) as f64 / wall,
            c
        );
    }
    Ok(out)
}
