use kernels_avx512::int4_gemm::{panel_times_tokens, Panel, Q16Tokens, PANEL_ROWS};
use std::time::Instant;
fn main() {
    const COLS: usize = 7168;
    let tokens: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let threads: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let packed: Vec<u8> = (0..PANEL_ROWS * COLS / 2)
        .map(|i| (i * 7 + 3) as u8)
        .collect();
    let scales: Vec<u8> = (0..PANEL_ROWS * COLS / 32)
        .flat_map(|_| 0x3c24u16.to_le_bytes())
        .collect();
    let x: Vec<f32> = (0..tokens * COLS)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
        .collect();
    let q = Q16Tokens::new(&x, COLS);
    let (mut best_peak, mut best) = (0.0f64, 0.0f64);
    for _ in 0..15 {
        let peak = kernels_avx512::stream::vnni16_macs_per_s_one_core(20_000_000).unwrap();
        best_peak = best_peak.max(peak);
        let reps = 10;
        let rates: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut panel = Panel::new(COLS);
                        let mut out = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
                        let t = Instant::now();
                        for _ in 0..reps {
                            panel.fill(&packed, &scales, COLS, 0, PANEL_ROWS);
                            panel_times_tokens(&panel, &q, &mut out);
                            std::hint::black_box(&out);
                        }
                        (PANEL_ROWS * COLS * tokens * reps) as f64 / t.elapsed().as_secs_f64()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let per = rates.iter().sum::<f64>() / threads as f64;
        best = best.max(per);
    }
    println!("{threads} threads, {tokens} tokens: per-thread best {:.3} of one-core best peak {:.3} = {:.1}%", best/1e9, best_peak/1e9, 100.0*best/best_peak);
}
