//! `kimi-hybrid bench gpu`: the GPU kernels at Kimi K2 shapes against references measured
//! in the same run on the same device: MLA decode attention's bytes per second against
//! the device's copy bandwidth, and the INT4 expert GEMV/GEMM against cuBLAS's BF16 GEMM
//! at the same shapes. Each figure is the best of `repeats` timed runs (each waited for
//! on the stream).

use crate::blas::bf16_gemm;
use crate::device::GpuDevice;
use crate::ops::{LatentPool, MlaDecodeShape};
use crate::NoCuda;
use std::fmt::Write;
use std::time::Instant;

fn failed(what: &str, e: impl std::fmt::Display) -> NoCuda {
    NoCuda {
        reason: format!("{what} failed: {e}"),
    }
}

/// Best wall time of `repeats` runs of `f`, each ended by a stream synchronisation.
fn best_seconds(
    d: &GpuDevice,
    repeats: usize,
    mut f: impl FnMut() -> Result<(), NoCuda>,
) -> Result<f64, NoCuda> {
    f()?; // warm-up: module loading, first-touch allocations
    d.stream
        .synchronize()
        .map_err(|e| failed("synchronize", e))?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        d.stream
            .synchronize()
            .map_err(|e| failed("synchronize", e))?;
        best = best.min(t.elapsed().as_secs_f64());
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
pub fn run(repeats: usize) -> Result<String, NoCuda> {
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
    let copy = best_seconds(&d, repeats, || {
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
            let latents = values(seqs * blocks_per_seq * block * width, 1);
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
            let tables: Vec<i32> = (0..(seqs * blocks_per_seq) as i32).collect();
            let tables = d.upload("block tables", &tables)?;
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
            let t = best_seconds(&d, repeats, || {
                d.mla_decode(&q, pool, &tables, &lens, len, shape, &mut out)
            })?;
            let bytes = if bf16 { 2 } else { 4 };
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
        "\nINT4 expert matmul vs cuBLAS BF16 GEMM          INT4 TFLOP/s  BF16 TFLOP/s  INT4/BF16  INT4 weight GB/s (of copy bw)  split-BF16 TFLOP/s"
    );
    for (rows, cols) in [(2048usize, 7168usize), (7168, 2048)] {
        let packed: Vec<u32> = values(rows * cols / 8, 3)
            .iter()
            .map(|v| v.to_bits() ^ 0x9E37_79B9)
            .collect();
        let scales: Vec<u16> = values(rows * cols / 32, 4)
            .iter()
            .map(|v| bf16_bits(0.01 + v.abs() * 0.01))
            .collect();
        let (packed, scales) = (d.upload("INT4", &packed)?, d.upload("scales", &scales)?);
        let wb: Vec<u16> = values(rows * cols, 5)
            .iter()
            .map(|v| bf16_bits(*v))
            .collect();
        let wb = d.upload("BF16 weights", &wb)?;
        let int4_bytes = (rows * cols / 2 + rows * cols / 32 * 2) as f64;
        for tokens in [1usize, 8, 128, 512, 2048] {
            let xf = values(tokens * cols, 6);
            let x = d.upload("x", &xf)?;
            let xb: Vec<u16> = xf.iter().map(|v| bf16_bits(*v)).collect();
            let xb = d.upload("x bf16", &xb)?;
            let mut y = d.zeros::<f32>("y", tokens * rows)?;
            let t4 = best_seconds(&d, repeats, || {
                d.int4_matmul(&packed, &scales, &x, &mut y, rows, cols, 32, tokens)
            })?;
            let flops = 2.0 * (rows * cols * tokens) as f64;
            let shape = (rows, cols, tokens);
            let (bf16, split) = match blas {
                Some(blas) => {
                    let tb = best_seconds(&d, repeats, || {
                        bf16_gemm(&d, blas, &wb, &xb, &mut y, shape, false)
                    })?;
                    let ts = best_seconds(&d, repeats, || {
                        d.bf16_matmul_blas(&wb, &x, &mut y, shape).map(|_| ())
                    })?;
                    (
                        format!("{:>12.2}  {:>8.2}x", flops / tb / 1e12, tb / t4),
                        format!("{:>10.2}", flops / ts / 1e12),
                    )
                }
                None => (format!("{:>12}  {:>9}", "-", "-"), format!("{:>10}", "-")),
            };
            let weight_rate = int4_bytes / t4;
            let _ = writeln!(
                s,
                "  {rows}x{cols}, {tokens:>4} tokens              {:>10.2}  {bf16}  {:>10.1} ({:.1}%)  {split}",
                flops / t4 / 1e12,
                weight_rate / 1e9,
                weight_rate / bw * 100.0
            );
        }
    }
    Ok(s)
}
