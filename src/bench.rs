//! `kimi-hybrid bench kernels`: the CPU expert kernels at the real Kimi K2 shapes
//! (gate/up 2048x7168, down 7168x2048, INT4 group 32) over a working set of distinct
//! experts far larger than the last-level cache, so weights stream from DRAM as in real
//! decode. Every figure is reported next to a reference measured in the same run: the
//! machine's streaming read bandwidth, the scalar path, the per-core `vpdpbusd` peak.

use crate::backend::{Activations, Backend, CpuBackend, FfnWeights};
use crate::weights::{LinearWeight, TensorData};
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
    pub working_set_bytes: usize,
    pub repeats: usize,
}

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

/// `count` K2-shaped INT4 experts in one anonymous map: random nibbles, small BF16 scales.
fn make_experts(count: usize) -> std::io::Result<Vec<FfnWeights>> {
    let (gate_packed, gate_scales) = (INTER * HIDDEN / 2, INTER * HIDDEN / 32 * 2);
    let per = expert_bytes();
    let mut map = MmapMut::map_anon(per * count)?;
    fill_random(&mut map);
    // Scales: BF16 0.01 everywhere, so outputs stay finite.
    for e in 0..count {
        let base = e * per;
        for (start, len) in [
            (gate_packed, gate_scales),
            (2 * gate_packed + gate_scales, gate_scales),
            (3 * gate_packed + 2 * gate_scales, gate_scales),
        ] {
            for pair in map[base + start..base + start + len].chunks_exact_mut(2) {
                pair.copy_from_slice(&0x3c24u16.to_le_bytes());
            }
        }
    }
    let map = Arc::new(map.make_read_only()?);
    let view = |start: usize, len: usize| {
        TensorData::new(map.clone(), start, start + len)
            .ok_or_else(|| std::io::Error::other("bad view"))
    };
    let mut experts = Vec::with_capacity(count);
    for e in 0..count {
        let base = e * per;
        let linear = |offset: usize, rows: usize, cols: usize| -> std::io::Result<LinearWeight> {
            let packed = rows * cols / 2;
            Ok(LinearWeight::Int4 {
                packed: view(base + offset, packed)?,
                scales: view(base + offset + packed, rows * cols / 32 * 2)?,
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
    Ok(experts)
}

/// Best wall time of `repeats` runs of `f`, in seconds.
fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Streaming read bandwidth of `buf` on all threads, bytes/s.
fn read_bandwidth(buf: &[u8], repeats: usize) -> f64 {
    let isa = Isa::detect();
    let secs = best_of(repeats, || {
        let sum: u64 = buf
            .par_chunks(4 << 20)
            .map(|c| kernels_avx512::stream::read_sum(isa, c))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
    });
    buf.len() as f64 / secs
}

/// One token through each expert in turn (gate, up, SiLU, down): decode streaming every
/// expert's weights once. Returns bytes/s of weights.
fn expert_stream(backend: &dyn Backend, experts: &[FfnWeights], repeats: usize) -> f64 {
    let x: Vec<f32> = (0..HIDDEN)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let secs = best_of(repeats, || {
        let mut out = vec![0.0f32; HIDDEN];
        for e in experts {
            backend.ffn_accumulate(e, &x, &[(0, 1.0)], &mut out);
        }
        std::hint::black_box(&out);
    });
    (experts.len() * expert_bytes()) as f64 / secs
}

pub fn kernels(opts: &KernelBenchOptions) -> std::io::Result<String> {
    let mut s = String::new();
    let threads = rayon::current_num_threads();
    let isa = Isa::detect();
    let count = opts.working_set_bytes.div_ceil(expert_bytes()).max(2);
    let _ = writeln!(
        s,
        "kernels: {} on {threads} threads; working set {count} distinct K2 INT4 experts = {:.2} GB",
        isa.name(),
        (count * expert_bytes()) as f64 / 1e9
    );

    let mut buf = vec![0u8; count * expert_bytes()];
    fill_random(&mut buf);
    let bw = read_bandwidth(&buf, opts.repeats);
    drop(buf);
    let _ = writeln!(
        s,
        "streaming read (reference)          {:>8.2} GB/s",
        bw / 1e9
    );

    let experts = make_experts(count)?;
    let exact = CpuBackend::new(isa, Activations::F32);
    let int8 = CpuBackend::new(isa, Activations::Int8);
    let scalar = CpuBackend::new(Isa::Scalar, Activations::F32);
    let fast = expert_stream(&exact, &experts, opts.repeats);
    let fast8 = expert_stream(&int8, &experts, opts.repeats);
    // The scalar path is slow: measure it on a slice still well beyond the caches.
    let slice = &experts[..experts.len().min(8)];
    let slow = expert_stream(&scalar, slice, 1);
    let _ = writeln!(s, "INT4 expert decode, f32 activations {:>8.2} GB/s  {:>5.1}% of read bandwidth  {:>6.1}x scalar", fast / 1e9, fast / bw * 100.0, fast / slow);
    let _ = writeln!(s, "INT4 expert decode, int8 activations{:>8.2} GB/s  {:>5.1}% of read bandwidth  {:>6.1}x scalar", fast8 / 1e9, fast8 / bw * 100.0, fast8 / slow);
    let _ = writeln!(
        s,
        "INT4 expert decode, scalar          {:>8.2} GB/s",
        slow / 1e9
    );

    // Prefill: one gate matrix times T tokens, int8 path; ops = 2 x rows x cols x T.
    let peak_core = kernels_avx512::stream::vnni_macs_per_s_one_core(20_000_000 / 8);
    let gate = &experts[0].gate;
    for tokens in [128usize, 512, 2048] {
        let x: Vec<f32> = (0..tokens * HIDDEN)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let mut y = vec![0.0f32; tokens * INTER];
        let secs = best_of(opts.repeats.min(2), || {
            int8.linear(gate, 0..INTER, &x, &mut y)
        });
        let ops = 2.0 * (INTER * HIDDEN * tokens) as f64 / secs;
        match peak_core {
            Some(p) => {
                let peak = 2.0 * p * threads as f64;
                let _ = writeln!(s, "INT4 prefill GEMM, {tokens:>4} tokens       {:>8.2} Tops/s  {:>5.1}% of vpdpbusd peak ({:.2} Tops/s)", ops / 1e12, ops / peak * 100.0, peak / 1e12);
            }
            None => {
                let _ = writeln!(s, "INT4 prefill GEMM, {tokens:>4} tokens       {:>8.2} Tops/s  (no AVX-512 VNNI peak on this CPU)", ops / 1e12);
            }
        }
    }

    // A MoE layer at K2 routing (8 active experts per token) over the working set.
    let mut seed = 12345u64;
    let mut pick = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let decode_routes: Vec<Vec<usize>> = (0..64)
        .map(|_| (0..8).map(|_| pick(count)).collect())
        .collect();
    let x1: Vec<f32> = (0..HIDDEN)
        .map(|i| ((i * 13 % 89) as f32 - 44.0) / 44.0)
        .collect();
    let secs = best_of(1, || {
        let mut out = vec![0.0f32; HIDDEN];
        for route in &decode_routes {
            for &e in route {
                exact.ffn_accumulate(&experts[e], &x1, &[(0, 0.125)], &mut out);
            }
        }
        std::hint::black_box(&out);
    });
    let _ = writeln!(s, "MoE layer decode (8 of {count} experts)   {:>8.1} tokens/s (one token at a time, f32 activations)", decode_routes.len() as f64 / secs);
    let prefill_tokens = 512;
    let xs: Vec<f32> = (0..prefill_tokens * HIDDEN)
        .map(|i| ((i * 7 % 83) as f32 - 41.0) / 41.0)
        .collect();
    let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); count];
    for t in 0..prefill_tokens {
        for _ in 0..8 {
            groups[pick(count)].push((t, 0.125));
        }
    }
    let secs = best_of(1, || {
        let mut out = vec![0.0f32; prefill_tokens * HIDDEN];
        for (e, tokens) in groups.iter().enumerate() {
            if !tokens.is_empty() {
                int8.ffn_accumulate(&experts[e], &xs, tokens, &mut out);
            }
        }
        std::hint::black_box(&out);
    });
    let _ = writeln!(
        s,
        "MoE layer prefill, 512 tokens        {:>8.1} tokens/s (int8 activations)",
        prefill_tokens as f64 / secs
    );
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

/// Runs `count` requests at once and returns their timelines.
fn run_concurrent(
    engine: &crate::engine::EngineHandle,
    count: usize,
    prompt: usize,
    generate: usize,
    salt: u64,
) -> anyhow::Result<Vec<Timeline>> {
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
                events: tx,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
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
                        Event::Error(e) => return Err(anyhow::anyhow!("{e}")),
                        Event::PromptLogprobs(_) => {}
                    }
                }
                Err(anyhow::anyhow!("the engine stopped"))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a benchmark client thread panicked"))?
        })
        .collect()
}

pub fn engine(opts: &EngineBenchOptions) -> anyhow::Result<String> {
    use crate::engine::EngineConfig;
    use anyhow::Context;
    if opts.prompt_tokens == 0 || opts.gen_tokens < 2 {
        anyhow::bail!("-p must be at least 1 and -n at least 2");
    }
    if opts.concurrency.contains(&0) {
        anyhow::bail!("-c must be at least 1");
    }
    let dir = &opts.model_dir;
    let ckpt = crate::weights::Checkpoint::open(dir)
        .with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let model = crate::model::Model::load(&ckpt)
        .with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    // The benchmark feeds token ids and ignores end markers; a checkpoint without
    // tokenizer files runs with the demo's (its text output is not used).
    let tokenizer = match crate::tokenizer::Tokenizer::from_dir(dir) {
        Ok(t) => t,
        Err(_) => crate::tokenizer::Tokenizer::from_dir(&crate::demo::demo_checkpoint_dir()?)
            .with_context(|| {
                format!(
                    "{} has no tokenizer and the demo's cannot be loaded",
                    dir.display()
                )
            })?,
    };
    let backend = crate::backend::by_name(&opts.backend).map_err(anyhow::Error::msg)?;
    let max_c = opts.concurrency.iter().copied().max().unwrap_or(1);
    let len = opts.prompt_tokens + opts.gen_tokens + 1;
    if len > model.config.max_position_embeddings {
        anyhow::bail!(
            "-p + -n = {} exceeds the model's context of {}",
            len - 1,
            model.config.max_position_embeddings
        );
    }
    let block_size = 16;
    let config = EngineConfig {
        max_num_seqs: max_c,
        max_waiting: max_c,
        max_model_len: len,
        block_size,
        kv_blocks: max_c * len.div_ceil(block_size) + 1,
        max_batch_tokens: 512,
        prefix_caching: false,
        kv_dtype: crate::engine::kv::KvDtype::Bf16,
    };
    let name = model.config.model_type.clone();
    let layers = model.config.num_hidden_layers;
    let engine = crate::engine::start(model, backend, Arc::new(tokenizer), config)?;
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
    let pp = run_concurrent(&engine, 1, p, 1, 1)?;
    let pp_secs = (pp[0].tokens[0] - pp[0].submitted).as_secs_f64();
    let _ = writeln!(
        out,
        "pp{p}: {:.1} tokens/s (prompt of {p} tokens in {:.3} s)",
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
