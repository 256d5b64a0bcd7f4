//! Row kernels at Kimi K2 expert shapes, every ISA path this CPU has, as bytes of weights
//! per second: the fast paths' ratio to `scalar` is the speedup. For DRAM-resident figures
//! (working set far beyond the caches, next to measured read bandwidth) run
//! `kimi-hybrid bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kernels_avx512::int4::{dot_row, dot_row_f32, Q8Activations};
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

fn int4(c: &mut Criterion) {
    let packed = data(ROWS * COLS / 2);
    let scales: Vec<u8> = (0..ROWS * COLS / 32)
        .flat_map(|_| 0x3c24u16.to_le_bytes())
        .collect();
    let x: Vec<f32> = (0..COLS)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let q = Q8Activations::new(&x);
    let (pw, sw) = (COLS / 2, COLS / 32 * 2);
    let mut g = c.benchmark_group("int4_gemv_256x7168");
    g.throughput(Throughput::Bytes((packed.len() + scales.len()) as u64));
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        g.bench_function(format!("f32-activations/{}", isa.name()), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    dot_row_f32(
                        isa,
                        &packed[r * pw..(r + 1) * pw],
                        &scales[r * sw..(r + 1) * sw],
                        &[&x],
                        &mut out,
                    );
                    black_box(out);
                }
            })
        });
        g.bench_function(format!("int8-activations/{}", isa.name()), |b| {
            b.iter(|| {
                let mut out = [0.0f32];
                for r in 0..ROWS {
                    dot_row(
                        isa,
                        &packed[r * pw..(r + 1) * pw],
                        &scales[r * sw..(r + 1) * sw],
                        &[&q],
                        &mut out,
                    );
                    black_box(out);
                }
            })
        });
    }
    g.finish();
}

fn bf16(c: &mut Criterion) {
    let w = data(ROWS * COLS * 2);
    let x: Vec<f32> = (0..COLS)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut g = c.benchmark_group("bf16_gemv_rows");
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

criterion_group!(benches, int4, bf16);
criterion_main!(benches);
