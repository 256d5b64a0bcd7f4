//! Row kernels and the prefill GEMM at Kimi K2 expert shapes, every ISA path this CPU
//! has, on one core with the weights in cache: the fast paths' ratio to `scalar` is the
//! speedup. For DRAM-resident figures (working set far beyond the caches, next to
//! measured read bandwidth and the measured instruction peak) run
//! `kimi-hybrid bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kernels_avx512::int4::{dot_row, dot_row_f32, Q8Activations};
use kernels_avx512::int4_gemm::{panel_times_tokens, Panel, Q16Tokens, PANEL_ROWS};
use kernels_avx512::int4_i16::Q16Activations;
use kernels_avx512::Isa;
use std::hint::black_box;

const ROWS: usize = 256;
const COLS: usize = 7168;

fn data(n: usize) -> Vec<u8> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn activations(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect()
}

fn int4(c: &mut Criterion) {
    let packed = data(ROWS * COLS / 2);
    let scales: Vec<u8> = (0..ROWS * COLS / 32)
        .flat_map(|_| 0x3c24u16.to_le_bytes())
        .collect();
    let x = activations(COLS);
    let q8 = Q8Activations::new(&x);
    let q16 = Q16Activations::new(&x);
    let (pw, sw) = (COLS / 2, COLS / 32 * 2);
    let row = |r: usize| (&packed[r * pw..(r + 1) * pw], &scales[r * sw..(r + 1) * sw]);
    let mut g = c.benchmark_group("int4_gemv_256x7168");
    g.throughput(Throughput::Bytes((packed.len() + scales.len()) as u64));
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        g.bench_function(format!("int16-activations/{}", isa.name()), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    let (p, s) = row(r);
                    kernels_avx512::int4_i16::dot_row(isa, p, s, &[&q16], &mut out);
                    black_box(out);
                }
            })
        });
        g.bench_function(format!("int8-activations/{}", isa.name()), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    let (p, s) = row(r);
                    dot_row(isa, p, s, &[&q8], &mut out);
                    black_box(out);
                }
            })
        });
        g.bench_function(format!("f32-activations/{}", isa.name()), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    let (p, s) = row(r);
                    dot_row_f32(isa, p, s, &[&x], &mut out);
                    black_box(out);
                }
            })
        });
    }
    g.finish();
}

/// One 32-row panel times 128 tokens: the GEMM against the row kernel over the same
/// products (8 tokens per call), in multiply-accumulates.
fn int4_gemm(c: &mut Criterion) {
    const TOKENS: usize = 128;
    let packed = data(PANEL_ROWS * COLS / 2);
    let scales: Vec<u8> = (0..PANEL_ROWS * COLS / 32)
        .flat_map(|_| 0x3c24u16.to_le_bytes())
        .collect();
    let x = activations(TOKENS * COLS);
    let q = Q16Tokens::new(&x, COLS);
    let rows_q: Vec<Q16Activations> = x.chunks_exact(COLS).map(Q16Activations::new).collect();
    let mut g = c.benchmark_group("int4_gemm_32x7168x128");
    g.throughput(Throughput::Elements((PANEL_ROWS * COLS * TOKENS) as u64));
    let mut panel = Panel::new(COLS);
    panel.fill(&packed, &scales, COLS, 0, PANEL_ROWS);
    g.bench_function("panel-gemm", |b| {
        let mut out = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
        b.iter(|| {
            panel.fill(&packed, &scales, COLS, 0, PANEL_ROWS);
            panel_times_tokens(&panel, &q, &mut out, &[]);
            black_box(&out);
        })
    });
    let (pw, sw) = (COLS / 2, COLS / 32 * 2);
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        g.bench_function(format!("row-kernel/{}", isa.name()), |b| {
            let mut out = [0.0f32; 8];
            b.iter(|| {
                for r in 0..PANEL_ROWS {
                    for tile in rows_q.chunks(8) {
                        let xs: Vec<&Q16Activations> = tile.iter().collect();
                        kernels_avx512::int4_i16::dot_row(
                            isa,
                            &packed[r * pw..(r + 1) * pw],
                            &scales[r * sw..(r + 1) * sw],
                            &xs,
                            &mut out[..xs.len()],
                        );
                        black_box(out);
                    }
                }
            })
        });
    }
    g.finish();
}

fn bf16(c: &mut Criterion) {
    let w = data(ROWS * COLS * 2);
    let x = activations(COLS);
    let mut g = c.benchmark_group("bf16_gemv_256x7168");
    g.throughput(Throughput::Bytes(w.len() as u64));
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        g.bench_function(isa.name(), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    kernels_avx512::bf16::dot_row(
                        isa,
                        &w[r * COLS * 2..(r + 1) * COLS * 2],
                        &[&x],
                        &mut out,
                    );
                    black_box(out);
                }
            })
        });
    }
    g.finish();
}

fn fp8(c: &mut Criterion) {
    let w: Vec<u8> = data(ROWS * COLS)
        .into_iter()
        .map(|b| if b & 0x7f == 0x7f { 0x38 } else { b })
        .collect();
    let scales: Vec<u8> = (0..COLS / 128)
        .flat_map(|_| 0.01f32.to_le_bytes())
        .collect();
    let x = activations(COLS);
    let mut g = c.benchmark_group("fp8_block_gemv_256x7168");
    g.throughput(Throughput::Bytes(w.len() as u64));
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        g.bench_function(isa.name(), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    kernels_avx512::fp8::dot_row(
                        isa,
                        &w[r * COLS..(r + 1) * COLS],
                        &scales,
                        128,
                        &[&x],
                        &mut out,
                    );
                    black_box(out);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, int4, int4_gemm, bf16, fp8);
criterion_main!(benches);
