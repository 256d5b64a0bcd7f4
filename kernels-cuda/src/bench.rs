//! `kimi-hybrid bench gpu`: the GPU kernels at Kimi K2 shapes against references measured
//! in the same run on the same device: MLA decode attention's bytes per second against
//! the device's copy bandwidth, and the INT4 expert GEMV/GEMM against cuBLAS's BF16 GEMM
//! at the same shapes. Each figure is the best of `repeats` rounds of back-to-back
//! launches timed by device events, over copies of the inputs several times the size of
//! the L2 cache (so weights and latents come from device memory, as in a model).

use crate::blas::{bf16_gemm, BLAS_MIN_TOKENS};
use crate::device::GpuDevice;
use crate::ops::{
    GroupedExperts, LatentPool, MlaDecodeShape, INT4_TC_MAX_TOKENS, INT4_TC_MIN_TOKENS,
};
use crate::CudaError;
use cudarc::driver::DevicePtr;
use std::fmt::Write;

fn failed(what: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("{what} failed: {e}"))
}

/// Bytes of inputs a timed kernel cycles through: several times the L2 cache of any
/// current GPU (50 MB on an H100), so each launch reads its weights from device memory.
const ROTATED_BYTES: usize = 256 << 20;

/// How many copies of an input of `bytes` make up [`ROTATED_BYTES`] (at most 64).
fn copies_for(bytes: usize) -> usize {
    ROTATED_BYTES.div_ceil(bytes.max(1)).clamp(1, 64)
}

/// Best time per launch of `f(i)` (`i` picks the copy of the inputs to read), over
/// `repeats` rounds of at least 10 back-to-back launches timed by device events, so the
/// host's launch and synchronisation costs stay out of the figure.
fn best_seconds(
    d: &GpuDevice,
    repeats: usize,
    copies: usize,
    mut f: impl FnMut(usize) -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f(0)?; // warm-up: module loading, first-touch allocations
    let launches = copies.max(10);
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = d
            .stream
            .record_event(timing)
            .map_err(|e| failed("recording a timing event", e))?;
        for i in 0..launches {
            f(i % copies.max(1))?;
        }
        let end = d
            .stream
            .record_event(timing)
            .map_err(|e| failed("recording a timing event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| failed("reading a timing event", e))?;
        best = best.min(ms as f64 / 1e3 / launches as f64);
    }
    Ok(best)
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// Runs the GPU benchmark on GPU 0 and returns its report.
pub fn run(repeats: usize) -> Result<String, CudaError> {
    let d = GpuDevice::open(0, 0)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "gpu: {} (sm_{}{}), {:.1} GiB; best of {repeats} runs each",
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        d.total_bytes as f64 / (1u64 << 30) as f64
    );

    // Reference: a device-to-device copy of 1 GiB (bytes read plus bytes written).
    let copy_bytes = 1usize << 30;
    let a = d.zeros::<u8>("copy source", copy_bytes)?;
    let mut b = d.zeros::<u8>("copy target", copy_bytes)?;
    let copy = best_seconds(&d, repeats, 1, |_| {
        d.stream
            .memcpy_dtod(&a, &mut b)
            .map_err(|e| failed("memcpy_dtod", e))
    })?;
    drop((a, b));
    let bw = 2.0 * copy_bytes as f64 / copy;
    let _ = writeln!(
        s,
        "\ndevice copy bandwidth (read + write, reference)      {:>8.1} GB/s",
        bw / 1e9
    );

    // MLA decode over the paged latent cache at K2's shapes: 64 heads, latent 512 + rope
    // 64, 64-token blocks, BF16 latents (the served default) and f32; bytes = the latents
    // read.
    let _ = writeln!(
        s,
        "\nMLA decode attention (absorbed)                      GB/s   of copy bw"
    );
    let (heads, width, c, block) = (64usize, 576usize, 512usize, 64usize);
    for bf16 in [true, false] {
        for (seqs, len) in [(1usize, 4096usize), (1, 32768), (16, 4096), (64, 4096)] {
            let blocks_per_seq = len.div_ceil(block);
            // Copies of the whole cache, each with its own block tables.
            let bytes = if bf16 { 2 } else { 4 };
            let copies = copies_for(seqs * blocks_per_seq * block * width * bytes);
            let latents = values(copies * seqs * blocks_per_seq * block * width, 1);
            let pool32 = if bf16 {
                None
            } else {
                Some(d.upload("latents", &latents)?)
            };
            let pool16 = if bf16 {
                let bits: Vec<u16> = latents.iter().map(|v| bf16_bits(*v)).collect();
                Some(d.upload("latents", &bits)?)
            } else {
                None
            };
            let pool = match (&pool32, &pool16) {
                (Some(p), _) => LatentPool::F32(p),
                (_, Some(p)) => LatentPool::Bf16(p),
                _ => unreachable!("one of the pools was uploaded"),
            };
            let tables = (0..copies)
                .map(|k| {
                    let first = (k * seqs * blocks_per_seq) as i32;
                    let table: Vec<i32> = (0..(seqs * blocks_per_seq) as i32)
                        .map(|b| first + b)
                        .collect();
                    d.upload("block tables", &table)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let lens = d.upload("lengths", &vec![len as i32; seqs])?;
            let q = d.upload("queries", &values(seqs * heads * width, 2))?;
            let mut out = d.zeros::<f32>("out", seqs * heads * c)?;
            let shape = MlaDecodeShape {
                seqs,
                heads,
                width,
                c,
                block_size: block,
                max_blocks: blocks_per_seq,
                scale: 1.0 / (192f32).sqrt(),
            };
            let t = best_seconds(&d, repeats, copies, |k| {
                d.mla_decode(&q, pool, &tables[k], &lens, len, shape, &mut out)
            })?;
            let rate = (seqs * len * width * bytes) as f64 / t;
            let _ = writeln!(
                s,
                "  {} {seqs:>3} seq x {len:>5} tokens                   {:>8.1}   {:>6.1}%",
                if bf16 { "bf16" } else { "f32 " },
                rate / 1e9,
                rate / bw * 100.0
            );
        }
    }

    // INT4 expert matmuls against cuBLAS BF16 at the same shapes, and the backend's
    // f32-accurate BF16 product (split activations, two cuBLAS GEMMs).
    let blas = d.blas();
    if blas.is_none() {
        let _ = writeln!(
            s,
            "\n(libcublas could not be loaded, so no BF16 reference: install the CUDA \
             toolkit's cuBLAS or the nvidia-cublas-cu12 wheel and add it to LD_LIBRARY_PATH)"
        );
    }
    let _ = writeln!(
        s,
        "\nINT4 expert matmul (TFLOP/s)  tensor-core    CUDA-core  INT4 cuBLAS  cuBLAS BF16  served/BF16  tensor-core weight GB/s (of copy bw)  split-BF16"
    );
    for (rows, cols) in [(2048usize, 7168usize), (7168, 2048)] {
        let int4_bytes = (rows * cols / 2 + rows * cols / 32 * 2) as f64;
        // Copies of each weight, so every launch streams its weights from memory.
        let int4_copies = copies_for(int4_bytes as usize);
        let bf16_copies = copies_for(rows * cols * 2);
        let int4 = (0..int4_copies)
            .map(|k| {
                let packed: Vec<u32> = values(rows * cols / 8, 3 + 100 * k as u64)
                    .iter()
                    .map(|v| v.to_bits() ^ 0x9E37_79B9)
                    .collect();
                let scales: Vec<u16> = values(rows * cols / 32, 4)
                    .iter()
                    .map(|v| bf16_bits(0.01 + v.abs() * 0.01))
                    .collect();
                Ok((d.upload("INT4", &packed)?, d.upload("scales", &scales)?))
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        let wbs = (0..bf16_copies)
            .map(|k| {
                let wb: Vec<u16> = values(rows * cols, 5 + 100 * k as u64)
                    .iter()
                    .map(|v| bf16_bits(*v))
                    .collect();
                d.upload("BF16 weights", &wb)
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        for tokens in [1usize, 8, 32, 128, 256, 512, 2048] {
            let xf = values(tokens * cols, 6);
            let x = d.upload("x", &xf)?;
            let xb: Vec<u16> = xf.iter().map(|v| bf16_bits(*v)).collect();
            let xb = d.upload("x bf16", &xb)?;
            let mut y = d.zeros::<f32>("y", tokens * rows)?;
            let t4 = best_seconds(&d, repeats, int4_copies, |k| {
                let (packed, scales) = &int4[k];
                d.int4_tc_matmul(packed, scales, &x, &mut y, rows, cols, 32, tokens)
            })?;
            let tcuda = best_seconds(&d, repeats, int4_copies, |k| {
                let (packed, scales) = &int4[k];
                d.int4_matmul_cuda_cores(packed, scales, &x, &mut y, rows, cols, 32, tokens)
            })?;
            let flops = 2.0 * (rows * cols * tokens) as f64;
            let shape = (rows, cols, tokens);
            let tflops = |t: f64| format!("{:>10.2}", flops / t / 1e12);
            let dash = || format!("{:>10}", "-");
            // What the backend serves at this size: the CUDA-core GEMV for one token, the
            // tensor-core kernel up to INT4_TC_MAX_TOKENS, the BF16 pair through cuBLAS
            // above.
            let mut served = if tokens < INT4_TC_MIN_TOKENS {
                tcuda
            } else {
                t4
            };
            let (pair, bf16, split) = match blas {
                Some(blas) => {
                    let pair = if tokens >= BLAS_MIN_TOKENS {
                        let tp = best_seconds(&d, repeats, int4_copies, |k| {
                            let (packed, scales) = &int4[k];
                            d.int4_matmul_blas(packed, scales, &x, &mut y, shape, 32)
                                .map(|_| ())
                        })?;
                        if tokens > INT4_TC_MAX_TOKENS {
                            served = tp;
                        }
                        tflops(tp)
                    } else {
                        dash()
                    };
                    let tb = best_seconds(&d, repeats, bf16_copies, |k| {
                        bf16_gemm(&d, blas, &wbs[k], &xb, &mut y, shape, false)
                    })?;
                    let ts = best_seconds(&d, repeats, bf16_copies, |k| {
                        d.bf16_matmul_blas(&wbs[k], &x, &mut y, shape).map(|_| ())
                    })?;
                    (
                        pair,
                        format!("{}  {:>8.2}x", tflops(tb), tb / served),
                        tflops(ts),
                    )
                }
                None => (dash(), format!("{}  {:>9}", dash(), "-"), dash()),
            };
            let weight_rate = int4_bytes / t4;
            let _ = writeln!(
                s,
                "  {rows}x{cols}, {tokens:>4} tokens  {}  {}  {pair}  {bf16}  {:>8.1} ({:>4.1}%)  {split}",
                tflops(t4),
                tflops(tcuda),
                weight_rate / 1e9,
                weight_rate / bw * 100.0
            );
        }
    }
    grouped_experts(&d, repeats, bw, &mut s)?;
    Ok(s)
}

/// A K2 MoE layer's routed experts for decode (hidden 7168, intermediate 2048, INT4 group
/// 32, 8 experts a token) through the grouped launches: the bytes of the distinct experts
/// read per call against the copy bandwidth.
fn grouped_experts(
    d: &GpuDevice,
    repeats: usize,
    bw: f64,
    s: &mut String,
) -> Result<(), CudaError> {
    let (hidden, inter, per_token) = (7168usize, 2048usize, 8usize);
    let _ = writeln!(
        s,
        "\nK2 routed experts, grouped (decode)       GB/s (of copy bw)"
    );
    let words = hidden * inter / 8;
    let groups = hidden * inter / 32;
    let expert_bytes = 3 * (words * 4 + groups * 2);
    for tokens in [1usize, 8] {
        // Each token its own 8 experts (a worst case for reuse, and usual at 384 experts).
        let slots = tokens * per_token;
        let copies = copies_for(slots * expert_bytes);
        // The uploads the tables point at, kept alive while they are timed.
        let mut weights = Vec::new();
        let mut tables = Vec::new();
        for k in 0..copies {
            let mut addrs = vec![0u64; 6 * slots];
            for e in 0..slots {
                for (m, seed) in [(0usize, 1u64), (1, 2), (2, 3)] {
                    let packed: Vec<u32> = values(words, 1000 * k as u64 + 10 * e as u64 + seed)
                        .iter()
                        .map(|v| v.to_bits() ^ 0x9E37_79B9)
                        .collect();
                    let scales: Vec<u16> = values(groups, 7)
                        .iter()
                        .map(|v| bf16_bits(0.01 + v.abs() * 0.01))
                        .collect();
                    let p = d.upload("expert weights", &packed)?;
                    let sc = d.upload("expert scales", &scales)?;
                    addrs[2 * m * slots + e] = p.device_ptr(&d.stream).0;
                    addrs[(2 * m + 1) * slots + e] = sc.device_ptr(&d.stream).0;
                    weights.push((p, sc));
                }
            }
            tables.push(d.upload("expert table", &addrs)?);
        }
        let mut index = Vec::new();
        for t in 0..tokens {
            for j in 0..per_token {
                index.extend_from_slice(&[t as i32, (t * per_token + j) as i32]);
            }
        }
        index.extend((0..=tokens).map(|t| (t * per_token) as i32));
        let index = d.upload("pairs", &index)?;
        let route = d.upload("routing weights", &vec![0.125f32; slots])?;
        let x = d.upload("x", &values(tokens * hidden, 8))?;
        let mut out = d.zeros::<f32>("out", tokens * hidden)?;
        let t = best_seconds(d, repeats, copies, |k| {
            let g = GroupedExperts {
                experts: &tables[k],
                slots,
                index: &index,
                weights: &route,
                pairs: slots,
                tokens,
                hidden,
                inter,
                group: 32,
            };
            d.grouped_int4_experts(&g, &x, &mut out)
        })?;
        let rate = (slots * expert_bytes) as f64 / t;
        let _ = writeln!(
            s,
            "  {tokens} token(s) x {per_token} experts                  {:>8.1} ({:>4.1}%)",
            rate / 1e9,
            rate / bw * 100.0
        );
    }
    Ok(())
}
