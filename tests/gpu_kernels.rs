//! Every CUDA kernel against its CPU twin, on the real Kimi K2 shapes. Each test skips
//! with a message when no usable GPU exists (no driver, no device, unsupported
//! architecture); with a GPU present they must pass.

mod common;

use kernels_avx512::scalar::{decode_fp8_row, decode_int4_row};
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::device::GpuDevice;
use kernels_cuda::ops::MlaDecodeShape;
use kimi_hybrid::config::ModelConfig;
use kimi_hybrid::device::cpu::kernels::{AttentionShape, CpuKernels, KvView, ReferenceBackend};
use kimi_hybrid::device::DeviceError;
use kimi_hybrid::model::rope::Rope;
use kimi_hybrid::model::{rms_norm, router};

fn gpu(test: &str) -> Option<GpuDevice> {
    match GpuDevice::open(0, 0) {
        Ok(d) => Some(d),
        Err(e) => {
            common::no_gpu(test, e);
            None
        }
    }
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

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    values(n, seed)
        .iter()
        .map(|v| ((v + 1.0) * 127.5) as u8)
        .collect()
}

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f32 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn rms_norm_rope_silu_and_embedding_match_cpu() {
    let Some(d) = gpu("rms_norm_rope_silu_and_embedding_match_cpu") else {
        return;
    };
    let s = &d.stream;
    let (rows, dim) = (5, 7168);
    let x = values(rows * dim, 1);
    let w = values(dim, 2);
    let want = rms_norm(&x, &w, 1e-6);
    let (mut gx, gw) = (s.memcpy_stod(&x).unwrap(), s.memcpy_stod(&w).unwrap());
    d.rms_norm_rows(&mut gx, &gw, rows, dim, dim, 1e-6).unwrap();
    assert!(rel_l2(&s.memcpy_dtov(&gx).unwrap(), &want) < 1e-5);

    // YaRN RoPE on the rope part of 64 heads of K2 queries (dn 128, dr 64).
    let cfg = ModelConfig::kimi_k26();
    let rope = Rope::new(&cfg);
    let (heads, dq, dn, dr) = (64, 192, 128, 64);
    let positions: Vec<i32> = vec![0, 1, 4095, 70_000];
    let mut q = values(positions.len() * heads * dq, 3);
    let mut gq = s.memcpy_stod(&q).unwrap();
    let gp = s.memcpy_stod(&positions).unwrap();
    let gf = s.memcpy_stod(rope.inv_freq()).unwrap();
    d.rope_yarn(
        &mut gq,
        &gp,
        &gf,
        rope.magnitude(),
        positions.len(),
        heads,
        heads * dq,
        dq,
        dn,
        dr / 2,
    )
    .unwrap();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let at = (t * heads + h) * dq + dn;
            rope.apply(&mut q[at..at + dr], p as usize);
        }
    }
    assert!(rel_l2(&s.memcpy_dtov(&gq).unwrap(), &q) < 1e-5);

    let n = 4 * 2048;
    let (g, u) = (values(n, 4), values(n, 5));
    let want: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let mut gg = s.memcpy_stod(&g).unwrap();
    d.silu_mul(&mut gg, &s.memcpy_stod(&u).unwrap(), n).unwrap();
    assert!(rel_l2(&s.memcpy_dtov(&gg).unwrap(), &want) < 1e-6);

    let (vocab, hidden) = (1000, 7168);
    let table: Vec<u16> = values(vocab * hidden, 6)
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect();
    let ids = [3i32, 999, 0];
    let mut out = s.alloc_zeros::<f32>(ids.len() * hidden).unwrap();
    d.embedding_bf16(
        &s.memcpy_stod(&table).unwrap(),
        &s.memcpy_stod(&ids[..]).unwrap(),
        &mut out,
        ids.len(),
        hidden,
    )
    .unwrap();
    let got = s.memcpy_dtov(&out).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        for k in 0..hidden {
            let want = half::bf16::from_bits(table[id as usize * hidden + k]).to_f32();
            assert_eq!(got[t * hidden + k], want);
        }
    }
}

#[test]
fn router_matches_cpu_on_k2_and_grouped_configs() {
    let Some(d) = gpu("router_matches_cpu_on_k2_and_grouped_configs") else {
        return;
    };
    let s = &d.stream;
    let mut grouped = ModelConfig::kimi_k26();
    grouped.n_routed_experts = 256;
    grouped.n_group = 8;
    grouped.topk_group = 4;
    for cfg in [ModelConfig::kimi_k26(), grouped] {
        let (tokens, e, k) = (16, cfg.n_routed_experts, cfg.num_experts_per_tok);
        let logits = values(tokens * e, 7);
        let bias: Vec<f32> = values(e, 8).iter().map(|v| v * 0.1).collect();
        let mut ids = s.alloc_zeros::<i32>(tokens * k).unwrap();
        let mut w = s.alloc_zeros::<f32>(tokens * k).unwrap();
        let method = 0; // noaux_tc
        d.route_topk(
            &s.memcpy_stod(&logits).unwrap(),
            Some(&s.memcpy_stod(&bias).unwrap()),
            tokens,
            e,
            (cfg.n_group, cfg.topk_group),
            k,
            false,
            method,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
            &mut ids,
            &mut w,
        )
        .unwrap();
        let (ids, w) = (s.memcpy_dtov(&ids).unwrap(), s.memcpy_dtov(&w).unwrap());
        for t in 0..tokens {
            let want = router::route(&cfg, &logits[t * e..(t + 1) * e], Some(&bias));
            for (j, (we, ww)) in want.iter().enumerate() {
                assert_eq!(ids[t * k + j] as usize, *we, "token {t} rank {j}");
                assert!((w[t * k + j] - ww).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn int4_and_fp8_matmuls_match_cpu_on_k2_expert_shapes() {
    let Some(d) = gpu("int4_and_fp8_matmuls_match_cpu_on_k2_expert_shapes") else {
        return;
    };
    let s = &d.stream;
    // gate/up 2048x7168 and down 7168x2048 for decode (1, 8 tokens), the tensor-core range
    // (40: a part-filled tile and block) and prefill (512); small weights for the tensor-core
    // kernel's edges (3, 9, 17, 40 tokens, rows that leave a part-filled block, columns
    // dealt unevenly to the warps, groups of 128) and the CUDA-core kernels at every count.
    for (rows, cols, group) in [
        (2048usize, 7168usize, 32usize),
        (7168, 2048, 32),
        (100, 544, 32),
        (60, 1024, 128),
    ] {
        let big = rows * cols > 1 << 20;
        let packed_bytes = bytes(rows * cols / 2, 9);
        let packed: Vec<u32> = packed_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let scales: Vec<u16> = values(rows * cols / group, 10)
            .iter()
            .map(|v| half::bf16::from_f32(0.01 + v.abs() * 0.01).to_bits())
            .collect();
        let scale_bytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut dense = vec![0.0f32; rows * cols];
        for r in 0..rows {
            decode_int4_row(
                &packed_bytes[r * cols / 2..(r + 1) * cols / 2],
                &scale_bytes[r * cols / group * 2..(r + 1) * cols / group * 2],
                group,
                &mut dense[r * cols..(r + 1) * cols],
            );
        }
        let (gp, gs) = (
            s.memcpy_stod(&packed).unwrap(),
            s.memcpy_stod(&scales).unwrap(),
        );
        let token_counts: &[usize] = if big {
            &[1, 8, 40, 512]
        } else {
            &[1, 3, 9, 17, 40, 300]
        };
        for &tokens in token_counts {
            let x = values(tokens * cols, 11 + tokens as u64);
            let mut want = vec![0.0f32; tokens * rows];
            for t in 0..tokens {
                for r in 0..rows {
                    want[t * rows + r] = dense[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
            let gx = s.memcpy_stod(&x).unwrap();
            // Each path's product against the CPU's, with its name in the log.
            let check = |path: &str, run: &dyn Fn(&mut CudaSlice<f32>)| {
                let mut y = s.alloc_zeros::<f32>(tokens * rows).unwrap();
                run(&mut y);
                let err = rel_l2(&s.memcpy_dtov(&y).unwrap(), &want);
                eprintln!("int4 {path} {rows}x{cols} g{group} tokens {tokens}: rel L2 {err:.2e}");
                assert!(err < 1e-4, "{path}");
            };
            check("served", &|y| {
                d.int4_matmul(&gp, &gs, &gx, y, rows, cols, group, tokens)
                    .unwrap()
            });
            // The tensor-core kernel itself, where int4_matmul did not take it (small
            // weights and one token go to the CUDA cores).
            if tokens <= 40 && !(big && tokens >= kernels_cuda::ops::INT4_TC_MIN_TOKENS) {
                check("tensor cores", &|y| {
                    d.int4_tc_matmul(&gp, &gs, &gx, y, rows, cols, group, tokens)
                        .unwrap()
                });
            }
            // The CUDA-core kernels, which shapes outside the tensor-core kernels' take.
            if tokens <= 8 || !big {
                check("CUDA cores", &|y| {
                    d.int4_matmul_cuda_cores(&gp, &gs, &gx, y, rows, cols, group, tokens)
                        .unwrap()
                });
            }
            // Prefill sizes through cuBLAS (the weight as an exact BF16 pair), where
            // libcublas loads; the same accuracy is owed.
            let mut y = s.alloc_zeros::<f32>(tokens * rows).unwrap();
            if d.int4_matmul_blas(&gp, &gs, &gx, &mut y, (rows, cols, tokens), group)
                .unwrap()
            {
                let err = rel_l2(&s.memcpy_dtov(&y).unwrap(), &want);
                eprintln!("int4 {rows}x{cols} tokens {tokens} through cuBLAS: rel L2 {err:.2e}");
                assert!(err < 1e-4);
            } else {
                eprintln!(
                    "int4 {rows}x{cols} tokens {tokens}: no cuBLAS here, its path not checked"
                );
            }
        }
    }
    // FP8 with partial edge blocks.
    let (rows, cols) = (300usize, 520usize);
    let data = bytes(rows * cols, 12)
        .into_iter()
        .map(|b| b & 0x77) // finite values only
        .collect::<Vec<u8>>();
    let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
    let scale_inv = values(br * bc, 13)
        .iter()
        .map(|v| 0.5 + v.abs())
        .collect::<Vec<f32>>();
    let scale_bytes: Vec<u8> = scale_inv.iter().flat_map(|v| v.to_le_bytes()).collect();
    for tokens in [3usize, 100] {
        let x = values(tokens * cols, 14);
        let mut want = vec![0.0f32; tokens * rows];
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            let srow = &scale_bytes[(r / 128) * bc * 4..(r / 128 + 1) * bc * 4];
            decode_fp8_row(&data[r * cols..(r + 1) * cols], srow, 128, &mut row);
            for t in 0..tokens {
                want[t * rows + r] = row
                    .iter()
                    .zip(&x[t * cols..(t + 1) * cols])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        let mut y = s.alloc_zeros::<f32>(tokens * rows).unwrap();
        d.fp8_matmul(
            &s.memcpy_stod(&data).unwrap(),
            &s.memcpy_stod(&scale_inv).unwrap(),
            &s.memcpy_stod(&x).unwrap(),
            &mut y,
            rows,
            cols,
            [128, 128],
            tokens,
        )
        .unwrap();
        assert!(rel_l2(&s.memcpy_dtov(&y).unwrap(), &want) < 1e-4);
    }
}

#[test]
fn mla_decode_matches_cpu_attention() {
    let Some(d) = gpu("mla_decode_matches_cpu_attention") else {
        return;
    };
    let s = &d.stream;
    let cpu = ReferenceBackend;
    // Decode, absorbed form at K2 sizes: width 576, c 512, two sequences with long and
    // short contexts in a shuffled paged pool; f32 latents (one head per block) and BF16
    // (the tensor-core kernel, 16 heads per block; 12 heads leave a part-filled block, as
    // a head split over GPUs can).
    let (width, c, bs) = (576usize, 512usize, 16usize);
    let lens = [1000usize, 37];
    let max_blocks = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(1);
    let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let mut tables = vec![0i32; lens.len() * max_blocks];
    let mut next = blocks as i32;
    for (si, l) in lens.iter().enumerate() {
        for b in 0..l.div_ceil(bs) {
            next -= 1;
            tables[si * max_blocks + b] = next;
        }
    }
    let scale = 0.07;
    for (heads, bf16) in [(64usize, false), (64, true), (12, true)] {
        let mut pool = values(blocks * bs * width, 15);
        let bits: Vec<u16> = pool
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        if bf16 {
            pool = bits
                .iter()
                .map(|b| half::bf16::from_bits(*b).to_f32())
                .collect();
        }
        let q = values(lens.len() * heads * width, 16);
        let mut out = s.alloc_zeros::<f32>(lens.len() * heads * c).unwrap();
        let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let pool_f32 = s.memcpy_stod(&pool).unwrap();
        let pool_bf16 = s.memcpy_stod(&bits).unwrap();
        d.mla_decode(
            &s.memcpy_stod(&q).unwrap(),
            if bf16 {
                kernels_cuda::ops::LatentPool::Bf16(&pool_bf16)
            } else {
                kernels_cuda::ops::LatentPool::F32(&pool_f32)
            },
            &s.memcpy_stod(&tables).unwrap(),
            &s.memcpy_stod(&seq_lens).unwrap(),
            lens[0],
            MlaDecodeShape {
                seqs: lens.len(),
                heads,
                width,
                c,
                block_size: bs,
                max_blocks,
                scale,
            },
            &mut out,
        )
        .unwrap();
        let got = s.memcpy_dtov(&out).unwrap();
        for (si, &len) in lens.iter().enumerate() {
            let mut latents = Vec::with_capacity(len * width);
            for t in 0..len {
                let b = tables[si * max_blocks + t / bs] as usize;
                let at = (b * bs + t % bs) * width;
                latents.extend_from_slice(&pool[at..at + width]);
            }
            let view = KvView {
                data: &latents,
                token_stride: width,
                head_stride: 0,
                offset: 0,
            };
            let mut want = vec![0.0f32; heads * c];
            cpu.attention(
                &q[si * heads * width..(si + 1) * heads * width],
                view,
                view,
                AttentionShape {
                    heads,
                    kv_heads: 1,
                    qk_dim: width,
                    v_dim: c,
                },
                &[len - 1],
                scale,
                &mut want,
            );
            let err = rel_l2(&got[si * heads * c..(si + 1) * heads * c], &want);
            assert!(
                err < 1e-4,
                "{heads} heads, bf16 {bf16}, sequence {si}: {err}"
            );
        }
    }
}

/// `y[t, r] = sum_k dense[r, k] x[t, k]` on the host.
fn host_matmul(dense: &[f32], x: &[f32], rows: usize, cols: usize, tokens: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            y[t * rows + r] = dense[r * cols..(r + 1) * cols]
                .iter()
                .zip(&x[t * cols..(t + 1) * cols])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    y
}

#[test]
fn bf16_f32_band_and_transposed_products_match_cpu() {
    use kernels_cuda::weights::{DeviceData, DeviceWeight};
    let Some(d) = gpu("bf16_f32_band_and_transposed_products_match_cpu") else {
        return;
    };
    // A BF16 attention projection at K2's q_b shape (1536 -> 64 heads x 192).
    let (rows, cols) = (12288usize, 1536usize);
    let bits: Vec<u16> = values(rows * cols, 21)
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_bits())
        .collect();
    let dense: Vec<f32> = bits
        .iter()
        .map(|b| half::bf16::from_bits(*b).to_f32())
        .collect();
    let bf16 = DeviceWeight {
        rows,
        cols,
        data: DeviceData::Bf16(d.upload("w", &bits).unwrap()),
    };
    let f32w = DeviceWeight {
        rows,
        cols,
        data: DeviceData::F32(d.upload("w", &dense).unwrap()),
    };
    for tokens in [1usize, 8, 37] {
        let x = values(tokens * cols, 22 + tokens as u64);
        let xd = d.upload("x", &x).unwrap();
        let want = host_matmul(&dense, &x, rows, cols, tokens);
        for w in [&bf16, &f32w] {
            let mut y = d.zeros::<f32>("y", tokens * rows).unwrap();
            d.matmul(w, &xd, &mut y, tokens).unwrap();
            let err = rel_l2(&d.download("y", &y).unwrap(), &want);
            eprintln!("dense {rows}x{cols} tokens {tokens}: rel L2 {err:.2e}");
            assert!(err < 1e-5);
        }
        // A band of rows that starts off any block boundary, then its transposed product.
        let band_rows = 100..292;
        let n = band_rows.len();
        let mut band = d.zeros::<f32>("band", n * cols).unwrap();
        d.dequant_rows(&bf16, band_rows.start, n, &mut band)
            .unwrap();
        assert_eq!(
            d.download("band", &band).unwrap(),
            dense[band_rows.start * cols..band_rows.end * cols].to_vec()
        );
        let xt = values(tokens * n, 23);
        let mut want_t = vec![0.0f32; tokens * cols];
        for t in 0..tokens {
            for i in 0..n {
                let r = band_rows.start + i;
                for k in 0..cols {
                    want_t[t * cols + k] += xt[t * n + i] * dense[r * cols + k];
                }
            }
        }
        let mut yt = d.zeros::<f32>("y", tokens * cols).unwrap();
        d.f32_matmul_transposed(
            &band,
            &d.upload("x", &xt).unwrap(),
            &mut yt,
            n,
            cols,
            tokens,
        )
        .unwrap();
        assert!(rel_l2(&d.download("y", &yt).unwrap(), &want_t) < 1e-5);
    }
    // INT4 and FP8 bands decode exactly as the CPU decoders do.
    let (rows, cols) = (300usize, 512usize);
    let packed_bytes = bytes(rows * cols / 2, 24);
    let scales: Vec<u16> = values(rows * cols / 32, 25)
        .iter()
        .map(|v| half::bf16::from_f32(0.01 + v.abs() * 0.01).to_bits())
        .collect();
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
    let int4 = DeviceWeight {
        rows,
        cols,
        data: DeviceData::Int4 {
            packed: d
                .upload(
                    "packed",
                    &packed_bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect::<Vec<u32>>(),
                )
                .unwrap(),
            scales: d.upload("scales", &scales).unwrap(),
            group: 32,
        },
    };
    let fp8_data: Vec<u8> = bytes(rows * cols, 26)
        .into_iter()
        .map(|b| b & 0x77)
        .collect();
    let scale_inv: Vec<f32> = values(3 * 4, 27).iter().map(|v| 0.5 + v.abs()).collect();
    let scale_inv_bytes: Vec<u8> = scale_inv.iter().flat_map(|v| v.to_le_bytes()).collect();
    let fp8 = DeviceWeight {
        rows,
        cols,
        data: DeviceData::Fp8 {
            data: d.upload("fp8", &fp8_data).unwrap(),
            scale_inv: d.upload("scale_inv", &scale_inv).unwrap(),
            block: [128, 128],
        },
    };
    let (first, n) = (77usize, 150usize);
    let mut want_int4 = vec![0.0f32; n * cols];
    let mut want_fp8 = vec![0.0f32; n * cols];
    for i in 0..n {
        let r = first + i;
        decode_int4_row(
            &packed_bytes[r * cols / 2..(r + 1) * cols / 2],
            &scale_bytes[r * cols / 16..(r + 1) * cols / 16],
            32,
            &mut want_int4[i * cols..(i + 1) * cols],
        );
        decode_fp8_row(
            &fp8_data[r * cols..(r + 1) * cols],
            &scale_inv_bytes[(r / 128) * 16..(r / 128 + 1) * 16],
            128,
            &mut want_fp8[i * cols..(i + 1) * cols],
        );
    }
    for (w, want) in [(&int4, &want_int4), (&fp8, &want_fp8)] {
        let mut band = d.zeros::<f32>("band", n * cols).unwrap();
        d.dequant_rows(w, first, n, &mut band).unwrap();
        assert_eq!(&d.download("band", &band).unwrap(), want);
    }
    // A band past the last row is an error, not a fault.
    let mut band = d.zeros::<f32>("band", n * cols).unwrap();
    assert!(d.dequant_rows(&int4, rows - 10, n, &mut band).is_err());
}

/// The resident pass's device operations on the GPU against the CPU twin, with weights
/// from the fixtures (real K2 head widths in `kimi-real-heads`, INT4 experts in
/// `kimi-int4`): norms over strided latent rows, rope, cache writes and reads through
/// scattered block tables (contexts long enough to split), the absorbed projections,
/// routing, an expert FFN with its scatter-add, and the page-locked hand-off copies.
#[test]
fn resident_device_ops_match_the_cpu_twin() -> Result<(), DeviceError> {
    use kimi_hybrid::device::cpu::kernels::by_name;
    use kimi_hybrid::device::cpu::CpuDevice;
    use kimi_hybrid::device::cuda::CudaBackend;
    use kimi_hybrid::device::{DeviceOps, DeviceRope, QueryBlocks, RopeLayout};
    use kimi_hybrid::model::MlaDims;
    use kimi_hybrid::model::{Ffn, Model};
    use kimi_hybrid::weights::Checkpoint;
    use std::sync::Arc;
    let gpu = match CudaBackend::open(0) {
        Ok(g) => g,
        Err(e) => {
            common::no_gpu("resident_device_ops_match_the_cpu_twin", e);
            return Ok(());
        }
    };
    let twin = CpuDevice::stand_in(Arc::from(by_name("cpu-f32").expect("cpu-f32")));
    let read = |b: &kimi_hybrid::device::cuda::GpuBuf<f32>, n: usize| {
        let mut out = vec![0.0f32; n];
        gpu.finish_download(gpu.begin_download(b)?, &mut out)?;
        Ok::<_, DeviceError>(out)
    };
    let fixture = |name: &str| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        Model::load(&Checkpoint::open(&dir).expect("fixture")).expect("model")
    };
    let model = fixture("kimi-real-heads");
    let cfg = &model.config;
    let d = MlaDims::of(cfg);
    let (width, n) = (d.width(), 6);

    // Strided norm of the latent part; rope on the query layout.
    let x = values(n * width, 21);
    let w = values(d.latent, 22);
    let (mut xg, mut xt) = (gpu.upload(&x)?, twin.upload(&x)?);
    gpu.rms_norm(&mut xg, &gpu.upload(&w)?, n, width, d.latent, 1e-6)?;
    twin.rms_norm(&mut xt, &w, n, width, d.latent, 1e-6)?;
    assert!(rel_l2(&read(&xg, n * width)?, &xt) < 1e-5, "rms_norm_rows");
    let positions: Vec<i32> = (0..n as i32).map(|i| 7 + 300 * i).collect();
    let q = values(n * d.heads * d.qk(), 23);
    let rope_g = DeviceRope {
        host: model.rope.clone(),
        inv_freq: gpu.upload(model.rope.inv_freq())?,
    };
    let rope_t = DeviceRope {
        host: model.rope.clone(),
        inv_freq: model.rope.inv_freq().to_vec(),
    };
    let layout = RopeLayout {
        tokens: n,
        heads: d.heads,
        token_stride: d.heads * d.qk(),
        head_stride: d.qk(),
        offset: d.nope,
    };
    let (mut qg, mut qt) = (gpu.upload(&q)?, twin.upload(&q)?);
    gpu.rope(&mut qg, &rope_g, &gpu.upload_ints(&positions)?, layout)?;
    twin.rope(&mut qt, &rope_t, &positions, layout)?;
    assert!(rel_l2(&read(&qg, q.len())?, &qt) < 1e-5, "rope");

    // Absorbed projections with a real kv_b.
    let kv_b = &model.layers[0].attn.kv_b;
    let ag = gpu.absorb_queries(kv_b, &qg, d, n)?;
    let at = twin.absorb_queries(kv_b, &qt, d, n)?;
    assert!(
        rel_l2(&read(&ag, at.len())?, &at) < 1e-4,
        "mla_absorb_queries"
    );
    let o = values(n * d.heads * d.latent, 24);
    let vg = gpu.expand_values(kv_b, &gpu.upload(&o)?, d, n)?;
    let vt = twin.expand_values(kv_b, &o, d, n)?;
    assert!(
        rel_l2(&read(&vg, vt.len())?, &vt) < 1e-4,
        "mla_expand_values"
    );

    // take_rows on a plain buffer.
    let table = values(40 * width, 25);
    let picked = [3usize, 0, 39];
    assert_eq!(
        read(
            &gpu.take_rows(&gpu.upload(&table)?, &picked, width)?,
            3 * width
        )?,
        twin.take_rows(&table, &picked, width)?,
        "take_rows"
    );

    // Pools of 16-token blocks, f32 and BF16: filled through write_rows, grown, a few
    // rows rewritten; each query reads its own scattered block table.
    let (block, blocks) = (16, 80);
    let lens: Vec<i32> = positions.iter().map(|p| p + 1).collect();
    let max_len = *lens.iter().max().expect("lens") as usize;
    let max_blocks = max_len.div_ceil(block);
    let tables: Vec<i32> = (0..n)
        .flat_map(|i| (0..max_blocks).map(move |b| ((b * 7 + i * 3) % blocks) as i32))
        .collect();
    let half = blocks / 2 * block;
    let latents = values(blocks * block * width, 26);
    let first: Vec<i32> = (0..half as i32).collect();
    let second: Vec<i32> = (half as i32..(blocks * block) as i32).collect();
    let slots: Vec<i32> = vec![5, 77, 1000, 1279];
    let rows = values(slots.len() * width, 27);
    let qa = values(n * d.heads * width, 28);
    let scale = cfg.softmax_scale();
    for bf16 in [false, true] {
        let mut pool_g = gpu.pool(half * width, bf16)?;
        let mut pool_t = twin.pool(half * width, bf16)?;
        let (lo, hi) = latents.split_at(half * width);
        gpu.write_rows(
            &mut pool_g,
            &gpu.upload(lo)?,
            &gpu.upload_ints(&first)?,
            width,
        )?;
        twin.write_rows(&mut pool_t, &lo.to_vec(), &first, width)?;
        let mut pool_g = gpu.grow_pool(&pool_g, latents.len())?;
        let mut pool_t = twin.grow_pool(&pool_t, latents.len())?;
        gpu.write_rows(
            &mut pool_g,
            &gpu.upload(hi)?,
            &gpu.upload_ints(&second)?,
            width,
        )?;
        twin.write_rows(&mut pool_t, &hi.to_vec(), &second, width)?;
        gpu.write_rows(
            &mut pool_g,
            &gpu.upload(&rows)?,
            &gpu.upload_ints(&slots)?,
            width,
        )?;
        twin.write_rows(&mut pool_t, &rows, &slots, width)?;
        let og = gpu.mla(
            &gpu.upload(&qa)?,
            &pool_g,
            &blocks_of(
                gpu.upload_ints(&tables)?,
                gpu.upload_ints(&lens)?,
                n,
                max_blocks,
                max_len,
            ),
            d,
            scale,
        )?;
        let ot = twin.mla(
            &qa,
            &pool_t,
            &blocks_of(tables.clone(), lens.clone(), n, max_blocks, max_len),
            d,
            scale,
        )?;
        assert!(
            rel_l2(&read(&og, ot.len())?, &ot) < 1e-4,
            "mla over block tables, bf16 {bf16}"
        );
    }
    fn blocks_of<I>(
        tables: I,
        lens: I,
        n: usize,
        max_blocks: usize,
        max_len: usize,
    ) -> QueryBlocks<I> {
        QueryBlocks {
            tables,
            lens,
            queries: n,
            max_blocks,
            block_size: 16,
            max_len,
        }
    }

    // Routing and one INT4 expert with its weighted scatter-add.
    let model = fixture("kimi-int4");
    let cfg = &model.config;
    let Some(moe) = model.layers.iter().find_map(|l| match &l.ffn {
        Ffn::Moe(m) => Some(m),
        Ffn::Dense(_) => None,
    }) else {
        panic!("kimi-int4 has MoE layers");
    };
    let logits = values(n * cfg.n_routed_experts, 28);
    let bias = moe.correction_bias.clone();
    let bias_g = bias.as_ref().map(|b| gpu.upload(b)).transpose()?;
    let rg = gpu.route(cfg, &gpu.upload(&logits)?, bias_g.as_ref(), n)?;
    let rt = twin.route(cfg, &logits, bias.as_ref(), n)?;
    for (a, b) in rg.iter().zip(&rt) {
        let ids = |r: &Vec<(usize, f32)>| r.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b), "route_topk");
    }
    let h = cfg.hidden_size;
    let xs = values(n * h, 29);
    let tokens = [(0usize, 0.7f32), (2, 0.2), (5, 1.3)];
    let mut out_g = gpu.upload(&values(n * h, 30))?;
    let mut out_t = values(n * h, 30);
    DeviceOps::ffn_accumulate(
        &gpu,
        &moe.experts[1],
        &gpu.upload(&xs)?,
        &tokens,
        &mut out_g,
    )?;
    twin.ffn_accumulate(&moe.experts[1], &xs, &tokens, &mut out_t)?;
    assert!(
        rel_l2(&read(&out_g, out_t.len())?, &out_t) < 1e-4,
        "expert ffn"
    );
    // A layer's experts at once: packed indices, each expert's slice by offset.
    let lists: Vec<Vec<(usize, f32)>> = vec![
        vec![(1, 0.3), (4, 0.9)],
        Vec::new(),
        vec![(0, 0.5), (1, 0.25), (2, 1.0), (5, 0.1)],
        vec![(3, 2.0)],
    ];
    let layer: Vec<(
        &kimi_hybrid::device::cpu::kernels::FfnWeights,
        &[(usize, f32)],
    )> = moe
        .experts
        .iter()
        .zip(&lists)
        .map(|(f, t)| (f, t.as_slice()))
        .collect();
    let mut out_g = gpu.upload(&values(n * h, 32))?;
    let mut out_t = values(n * h, 32);
    gpu.experts_accumulate(&layer, &gpu.upload(&xs)?, &mut out_g)?;
    twin.experts_accumulate(&layer, &xs, &mut out_t)?;
    assert!(
        rel_l2(&read(&out_g, out_t.len())?, &out_t) < 1e-4,
        "a layer's experts"
    );

    // The staged hand-off, larger than the initial staging buffers.
    let big = values(300_000, 31);
    assert_eq!(
        read(&gpu.upload_staged(&big)?, big.len())?,
        big,
        "staged round trip"
    );
    Ok(())
}

/// BF16 weights at prefill sizes go through cuBLAS with split activations: as accurate as
/// the f32 kernels (and far more than one BF16 GEMM of rounded activations), at K2's
/// attention shapes.
#[test]
fn bf16_products_through_cublas_keep_f32_accuracy() {
    let Some(d) = gpu("bf16_products_through_cublas_keep_f32_accuracy") else {
        return;
    };
    let Some(blas) = d.blas() else {
        eprintln!(
            "skipping bf16_products_through_cublas_keep_f32_accuracy: libcublas cannot be loaded"
        );
        return;
    };
    let s = &d.stream;
    for (rows, cols, tokens) in [(1536usize, 7168usize, 128usize), (7168, 8192, 64)] {
        let w: Vec<u16> = values(rows * cols, 40)
            .iter()
            .map(|v| half::bf16::from_f32(*v * 0.05).to_bits())
            .collect();
        let x = values(tokens * cols, 41);
        let mut want = vec![0.0f32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                let row = &w[r * cols..(r + 1) * cols];
                let mut acc = 0.0f64;
                for (k, &b) in row.iter().enumerate() {
                    acc += half::bf16::from_bits(b).to_f32() as f64 * x[t * cols + k] as f64;
                }
                want[t * rows + r] = acc as f32;
            }
        }
        let wd = s.memcpy_stod(&w).unwrap();
        let xd = s.memcpy_stod(&x).unwrap();
        let mut y = s.alloc_zeros::<f32>(tokens * rows).unwrap();
        assert!(d
            .bf16_matmul_blas(&wd, &xd, &mut y, (rows, cols, tokens))
            .unwrap());
        let split = rel_l2(&s.memcpy_dtov(&y).unwrap(), &want);
        let xb: Vec<u16> = x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let xb = s.memcpy_stod(&xb).unwrap();
        kernels_cuda::blas::bf16_gemm(&d, blas, &wd, &xb, &mut y, (rows, cols, tokens), false)
            .unwrap();
        let rounded = rel_l2(&s.memcpy_dtov(&y).unwrap(), &want);
        println!(
            "{rows}x{cols}, {tokens} tokens: split BF16 {split:.1e}, rounded BF16 {rounded:.1e}"
        );
        assert!(split < 1e-5, "{split}");
        assert!(split * 10.0 < rounded, "{split} vs {rounded}");
    }
}

/// The grouped INT4 expert path (three launches for a layer's experts at decode: gate and
/// up with SiLU, down, the weighted sum per token) on the K2 expert shape (7168 hidden,
/// 2048 intermediate, group 32) against the exact f32 CPU backend, with tokens shared
/// between experts and an expert with none.
#[test]
fn grouped_int4_experts_match_cpu_on_the_k2_expert_shape() -> Result<(), DeviceError> {
    use kimi_hybrid::device::cpu::kernels::{by_name, FfnWeights};
    use kimi_hybrid::device::cuda::CudaBackend;
    use kimi_hybrid::device::DeviceOps;
    use kimi_hybrid::weights::{LinearWeight, TensorData};
    let gpu = match CudaBackend::open(0) {
        Ok(g) => g,
        Err(e) => {
            common::no_gpu("grouped_int4_experts_match_cpu_on_the_k2_expert_shape", e);
            return Ok(());
        }
    };
    let (hidden, inter, group) = (7168usize, 2048usize, 32usize);
    let int4 = |rows: usize, cols: usize, seed: u64| {
        let scales: Vec<u8> = values(rows * cols / group, seed + 1)
            .iter()
            .flat_map(|v| half::bf16::from_f32(0.02 + 0.01 * v).to_le_bytes())
            .collect();
        LinearWeight::Int4 {
            packed: TensorData::owned(&bytes(rows * cols / 2, seed)).expect("weights"),
            scales: TensorData::owned(&scales).expect("scales"),
            rows,
            cols,
            group,
        }
    };
    let experts: Vec<FfnWeights> = (0..4u64)
        .map(|e| FfnWeights {
            gate: int4(inter, hidden, 100 + 10 * e),
            up: int4(inter, hidden, 103 + 10 * e),
            down: int4(hidden, inter, 106 + 10 * e),
            numa_node: None,
            expert: Some((1, e as usize)),
            gpu: Some(0),
        })
        .collect();
    let lists: Vec<Vec<(usize, f32)>> = vec![
        vec![(0, 0.5), (2, 0.3)],
        vec![(1, 0.7)],
        vec![(0, 0.1), (1, 0.2), (2, 0.9)],
        Vec::new(),
    ];
    let layer: Vec<(&FfnWeights, &[(usize, f32)])> = experts
        .iter()
        .zip(&lists)
        .map(|(f, t)| (f, t.as_slice()))
        .collect();
    let n = 3;
    let x = values(n * hidden, 40);
    let start = values(n * hidden, 41);
    let mut want = start.clone();
    by_name("cpu-f32")
        .expect("cpu")
        .moe_accumulate(&layer, &x, &mut want);
    let mut out = gpu.upload(&start)?;
    gpu.experts_accumulate(&layer, &gpu.upload(&x)?, &mut out)?;
    let mut got = vec![0.0f32; n * hidden];
    gpu.finish_download(gpu.begin_download(&out)?, &mut got)?;
    let err = rel_l2(&got, &want);
    eprintln!("grouped INT4 experts {hidden}x{inter}, 6 pairs over 3 tokens: rel L2 {err:.2e}");
    assert!(err < 1e-5, "{err}");
    Ok(())
}
