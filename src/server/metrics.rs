//! Prometheus metrics in the text exposition format: request and token counters,
//! time-to-first-token, inter-token and end-to-end latency histograms, and the engine's
//! live gauges (running / waiting sequences, KV blocks).

use crate::engine::EngineStats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

pub struct Metrics {
    requests_ok: AtomicU64,
    requests_error: AtomicU64,
    requests_aborted: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    e2e: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_error: AtomicU64::new(0),
            requests_aborted: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            itl: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            e2e: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
        }
    }
}

fn observe(h: &Mutex<Histogram>, v: f64) {
    if let Ok(mut h) = h.lock() {
        h.observe(v);
    }
}

impl Metrics {
    pub fn time_to_first_token(&self, seconds: f64) {
        observe(&self.ttft, seconds);
    }

    pub fn inter_token(&self, seconds: f64) {
        observe(&self.itl, seconds);
    }

    pub fn finished(&self, seconds: f64, prompt_tokens: usize, generated: usize) {
        observe(&self.e2e, seconds);
        self.requests_ok.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.requests_error.fetch_add(1, Ordering::Relaxed);
    }

    pub fn aborted(&self) {
        self.requests_aborted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kimi_hybrid_requests_total Requests by outcome.\n# TYPE kimi_hybrid_requests_total counter"
        );
        for (outcome, v) in [
            ("success", &self.requests_ok),
            ("error", &self.requests_error),
            ("aborted", &self.requests_aborted),
        ] {
            let _ = writeln!(
                out,
                "kimi_hybrid_requests_total{{outcome=\"{outcome}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let counters = [
            (
                "kimi_hybrid_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_generation_tokens_total",
                "Generated tokens of finished requests.",
                self.generation_tokens.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache.",
                engine.prefix_cached_tokens.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_preemptions_total",
                "Sequences preempted because the KV cache was full.",
                engine.preemptions.load(Ordering::Relaxed),
            ),
            (
                "kimi_hybrid_engine_steps_total",
                "Batched forward passes run.",
                engine.steps.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let used = engine.kv_blocks_used.load(Ordering::SeqCst);
        let total = engine.kv_blocks_total.load(Ordering::SeqCst);
        let gauges = [
            (
                "kimi_hybrid_num_requests_running",
                "Sequences in the running batch.",
                engine.running.load(Ordering::SeqCst) as f64,
            ),
            (
                "kimi_hybrid_num_requests_waiting",
                "Sequences waiting to be admitted.",
                engine.waiting.load(Ordering::SeqCst) as f64,
            ),
            (
                "kimi_hybrid_kv_blocks_used",
                "KV cache blocks referenced by sequences.",
                used as f64,
            ),
            (
                "kimi_hybrid_kv_blocks_total",
                "KV cache blocks in the pool.",
                total as f64,
            ),
            (
                "kimi_hybrid_kv_cache_usage_perc",
                "Fraction of KV blocks in use.",
                if total == 0 {
                    0.0
                } else {
                    used as f64 / total as f64
                },
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        for (h, name, help) in [
            (
                &self.ttft,
                "kimi_hybrid_time_to_first_token_seconds",
                "Time to first token.",
            ),
            (
                &self.itl,
                "kimi_hybrid_inter_token_latency_seconds",
                "Time between tokens.",
            ),
            (
                &self.e2e,
                "kimi_hybrid_e2e_request_latency_seconds",
                "Request latency.",
            ),
        ] {
            if let Ok(h) = h.lock() {
                h.render(name, help, &mut out);
            }
        }
        out
    }
}
